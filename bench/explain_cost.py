"""What `sdtorch explain` costs on SD 1.5 at 512x512 against a plain generation, by `--decode-every`.

    python bench/explain_cost.py [--steps 4] [--decode-every 1 4] [--size 512]

Writes a random fp16 checkpoint with the exact layout of SD 1.5 (as the tests do; random weights cost the
same time as real ones), loads it once, then times a plain `Pipeline.generate`, `explain` at each
`--decode-every`, and the plain generation again (the two plain runs bracket the others, so a machine that
got busier shows). Prints JSON: seconds of each run, and the explain / plain ratios. The embedded model's
figure is `python -m sdtorch.explain.measure --prompts 0 --repeats 3`. Run it alone on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the random SD 1.5 layout is the tests'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--decode-every", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()

    from oracles import SD15_KEYS, random_sd15_state

    from sdtorch.explain import explain
    from sdtorch.pipeline import Pipeline
    from sdtorch.request import GenerationRequest

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random-sd15.safetensors"
        save_file(random_sd15_state(json.loads(SD15_KEYS.read_text()), torch.float16), str(path))
        pipe = Pipeline.load(path, dtype="fp32")
        request = GenerationRequest(prompt="a photograph of an astronaut riding a horse", seed=1, steps=args.steps,
                                    width=args.size, height=args.size)

        def plain() -> float:
            start = time.perf_counter()
            pipe.generate(request, progress=False)
            return time.perf_counter() - start

        result = {"cpu": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                  "size": args.size, "steps": args.steps, "plain_s": [plain()], "explain_s": {}}
        for every in args.decode_every:
            with tempfile.TemporaryDirectory() as out:
                start = time.perf_counter()
                explain(pipe, request, out, decode_every=every)
                result["explain_s"][every] = time.perf_counter() - start
        result["plain_s"].append(plain())
        base = min(result["plain_s"])
        result["ratios"] = {every: seconds / base for every, seconds in result["explain_s"].items()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
