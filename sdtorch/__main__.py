"""`python -m sdtorch ...`: the same as the `sdtorch` command."""

from sdtorch.cli import main

if __name__ == "__main__":
    main()
