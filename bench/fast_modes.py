"""The fast modes against exact mode: speed on SD 1.5 at 512x512, judged accuracy on the embedded model.

    python bench/fast_modes.py [--steps 20] [--size 512] [--n 200] [--no-speed] [--no-accuracy]
        [--modes MODE ...] [--dtype fp32|bf16] [--seed S]

Speed: a random fp16 checkpoint with the exact layout of SD 1.5 (random weights cost what real ones do), loaded
once; one whole `generate` (text encoder, `--steps` Euler steps with CFG, decode) per mode, exact mode first
and last so that a machine that got busier shows; the TAESD final decode uses the published weights in
../shared/data/real/taesd when they are there (the mode is left out otherwise). Accuracy: the embedded shapes
model's text-to-image evaluation (`sdtorch.shapes.evaluate`, `--n` pictures, 20 steps, Euler a) in each mode;
TAESD is SD's latent space, not the embedded model's, so it has no accuracy row. Prints JSON lines. Run it alone
on a quiet machine.
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
from sdtorch.shapes.evaluate import EVAL_SEED  # noqa: E402

TAESD_DIR = ROOT.parent / "shared" / "data" / "real" / "taesd"

MODES = {
    "exact": {},
    "cfg-cutoff 0.5": {"cfg_cutoff": 0.5},
    "deepcache 3": {"deep_cache": 3},
    "deepcache 3 + cfg-cutoff 0.5": {"deep_cache": 3, "cfg_cutoff": 0.5},
    "deepcache 3 + cfg-cutoff 0.5 + taesd": {"deep_cache": 3, "cfg_cutoff": 0.5, "decoder": "taesd"},
    "deepcache 2": {"deep_cache": 2},
    "deepcache 2 + cfg-cutoff 0.5": {"deep_cache": 2, "cfg_cutoff": 0.5},
    "deepcache 2 + cfg-cutoff 0.5 + taesd": {"deep_cache": 2, "cfg_cutoff": 0.5, "decoder": "taesd"},
}


def speed(steps: int, size: int, modes: list[str], dtype: str) -> None:
    from oracles import SD15_KEYS, random_sd15_state

    from sdtorch.pipeline import Pipeline

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random-sd15.safetensors"
        save_file(random_sd15_state(json.loads(SD15_KEYS.read_text()), torch.float16), str(path))
        taesd = TAESD_DIR if (TAESD_DIR / "taesd_decoder.safetensors").is_file() else None
        pipe = Pipeline.load(path, dtype=dtype, taesd=taesd)
        seconds = {}
        for name in ["exact", *modes, "exact"]:
            if "decoder" in MODES[name] and taesd is None:
                continue
            start = time.perf_counter()
            pipe.generate("a photograph of an astronaut riding a horse", seed=1, steps=steps, width=size,
                          height=size, sampler="euler", progress=False, **MODES[name])
            seconds.setdefault(name, []).append(time.perf_counter() - start)
        exact = min(seconds["exact"])
        for name, times in seconds.items():
            print(json.dumps({"mode": name, "seconds": [round(t, 1) for t in times],
                              "speedup": round(exact / min(times), 2), "steps": steps, "size": size, "dtype": dtype,
                              "cpu": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}),
                  flush=True)


def accuracy(n: int, modes: list[str], seed: int, dtype: str) -> None:
    from sdtorch.pipeline import Pipeline, default_model_path
    from sdtorch.shapes.evaluate import evaluate

    pipe = Pipeline.load(default_model_path(), dtype=dtype)
    for name in ["exact", *modes]:
        options = MODES[name]
        if "decoder" in options:
            continue
        start = time.perf_counter()
        scores = evaluate(pipe, n=n, seed=seed, **options)
        print(json.dumps({"mode": name, "seconds": round(time.perf_counter() - start, 1),
                          **{k: round(v, 3) if isinstance(v, float) else v for k, v in scores.items()}}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--modes", nargs="+", choices=[m for m in MODES if m != "exact"],
                        default=[m for m in MODES if m != "exact"], help="fast modes to measure (exact always runs)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype of both parts")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="the accuracy evaluation's prompt seed")
    args = parser.parse_args()
    if not args.no_accuracy:
        accuracy(args.n, args.modes, args.seed, args.dtype)
    if not args.no_speed:
        speed(args.steps, args.size, args.modes, args.dtype)


if __name__ == "__main__":
    main()
