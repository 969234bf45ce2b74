"""`python -m sdtorch ...`: the same as the `sdtorch` command."""

from sdtorch.cli import main

if __name__ == "__main__":
    raise SystemExit(main())  # main returns the exit status (2 for a user's mistake)
