"""One UNet CFG call and one VAE decode, ours and diffusers' interleaved call by call in one process.

    python bench/interleaved.py [--repeats 5] [--checkpoint FILE]

On a shared machine whose speed drifts from minute to minute (the same call measured 6 to 16 s on
2026-12-02), fresh processes run minutes apart (bench/bench.py) compare different machines. Here both
sides load the same random fp16 SD 1.5 file (written unless `--checkpoint` is given) into one process, in
fp32 as each one's default loads it (ours keeps the fp16 weights and widens per layer; diffusers widens at
load), and each repeat runs ours then diffusers' (the order alternating), on the same inputs: the UNet at
batch 2 (CFG's pair) on 64x64 latents, the VAE decoder on 1x4x64x64 latents. Medians and the median of
the per-repeat ratios; the outputs' largest difference is printed too, as a check that both computed the
same thing. Memory is not comparable here (both models share the process): bench/bench.py measures it. Nor, on 2 Zen 5
cores, was the VAE decode: diffusers' took 9.5-13.3 s here and 6.0-6.5 s alone in a fresh process (README):
check a VAE figure in fresh processes.
Needs the dev extras (diffusers, transformers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the random SD 1.5 layout and diffusers' set-up are the tests'
from bench import cpu_name  # noqa: E402  (bench/bench.py, beside this file)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(checkpoint: Path, repeats: int) -> None:
    import torch
    from oracles import sd15_reference_components

    from sdtorch.pipeline import Pipeline

    ours = Pipeline.load(checkpoint, device="cpu", dtype="fp32").model
    theirs = sd15_reference_components(checkpoint, Path(tempfile.mkdtemp()), torch.float32)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 77, 768, generator=g)
    latents, t = torch.randn(1, 4, 64, 64, generator=g), torch.tensor(500.0)
    calls = {
        "unet_512": (lambda: ours.unet(x, t, context),
                     lambda: theirs["unet"](x, t, encoder_hidden_states=context).sample),
        "vae_decode_512": (lambda: ours.vae.decode(latents), lambda: theirs["vae"].decode(latents).sample),
    }
    print(f"CPU: {cpu_name()}; threads: {torch.get_num_threads()}; {repeats} interleaved repeats after a warm-up")
    print("| call | sdtorch | diffusers | ratio (median of repeats) | max abs diff |")
    print("| --- | ---: | ---: | ---: | ---: |")
    with torch.no_grad():
        for name, (mine, reference) in calls.items():
            diff = (mine() - reference()).abs().max().item()  # warm-up, and the check
            times = {"sdtorch": [], "diffusers": []}
            for i in range(repeats):
                order = [("sdtorch", mine), ("diffusers", reference)]
                for side, fn in order if i % 2 == 0 else order[::-1]:
                    times[side].append(seconds(fn))
                print(f"  {name} repeat {i + 1}: sdtorch {times['sdtorch'][-1]:.2f} s, "
                      f"diffusers {times['diffusers'][-1]:.2f} s", file=sys.stderr, flush=True)
            ratio = statistics.median(a / b for a, b in zip(times["sdtorch"], times["diffusers"]))
            print(f"| {name} | {statistics.median(times['sdtorch']):.2f} s | "
                  f"{statistics.median(times['diffusers']):.2f} s | {ratio:.2f} | {diff:.1e} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkpoint", type=Path, help="an SD 1.5 file (default: a random one, written here)")
    args = parser.parse_args()
    if args.checkpoint:
        measure(args.checkpoint, args.repeats)
        return
    import torch
    from oracles import SD15_KEYS, random_sd15_state
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "random-sd15.safetensors"
        save_file(random_sd15_state(json.loads(SD15_KEYS.read_text()), torch.float16), str(checkpoint))
        measure(checkpoint, args.repeats)


if __name__ == "__main__":
    main()
