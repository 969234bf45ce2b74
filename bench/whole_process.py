"""Whole processes, as a user runs them: `sdtorch generate` against a diffusers script, on the same weights.

    python bench/whole_process.py [--steps 4] [--size 512] [--rounds 2] [--modes default compute low-memory bf16]
        [--accuracy 200]

Writes a random fp16 checkpoint with the exact layout of SD 1.5 (random weights cost what real ones do), then
runs, `--rounds` times and alternating the order, one fresh process per configuration: `sdtorch generate` (the
CLI, in each `--modes` mode) and a script that builds diffusers' StableDiffusionPipeline from the same file and
generates the same image (Euler, CFG 7.5, seed 1, torch's CPU generator: the settings the parity tests hold
equal). Each process's wall time (start to exit, import and PNG included), peak resident memory (ru_maxrss
from wait4) and minor page faults (ru_minflt: fresh pages the kernel maps, a cost of the allocator); medians
over the rounds; ratios to diffusers. The pictures are compared too: each mode's against diffusers' (exact
modes should be within 2 levels) and the low-memory one's drift (mean and max levels).
Every mode computes in fp32, as the diffusers script does, except `bf16` (the CLI's default on a CPU with native
bf16: faster, not exact).

`--accuracy N`: the embedded model's judged accuracy (`sdtorch.shapes.evaluate`, N pictures, 20 steps, Euler a)
with each mode's weights, since the low-memory mode changes the numbers. Run it alone on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the random SD 1.5 layout and diffusers' set-up are the tests'
from bench import cpu_name  # noqa: E402  (bench/bench.py, beside this file)

PROMPT = "a photograph of an astronaut riding a horse"
MODES = {  # sdtorch generate's options per mode
    "default": [],
    "compute": ["--weights", "compute"],
    "keep-freed": ["--keep-freed-memory"],  # glibc keeps freed memory: no page faults for reused activations
    "low-memory": ["--low-memory"],
    "bf16": ["--dtype", "bf16"],  # the CPU's default where bf16 is native (AVX512-BF16, AMX); not exact
}

DIFFUSERS_SCRIPT = """
import json, sys, tempfile
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from oracles import SCHEDULER_CONFIG, sd15_reference_components
components = sd15_reference_components(Path({checkpoint!r}), Path(tempfile.mkdtemp()))
scheduler = EulerDiscreteScheduler.from_config(json.loads(SCHEDULER_CONFIG.read_text()))
pipe = StableDiffusionPipeline(**components, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                               requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
with torch.no_grad():
    image = pipe({prompt!r}, num_inference_steps={steps}, generator=torch.Generator("cpu").manual_seed(1),
                 height={size}, width={size}, guidance_scale=7.5).images[0]
image.save({out!r})
"""


def run(command: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in GB, minor page faults) of one fresh process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    stderr = process.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command[:3]} failed:\n{stderr[-2000:]}")
    return seconds, usage.ru_maxrss * 1024 / 1e9, usage.ru_minflt


def levels(a: Path, b: Path) -> tuple[float, int]:
    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.int16)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.int16)
    diff = np.abs(x - y)
    return round(float(diff.mean()), 3), int(diff.max())


WRITE_CHECKPOINT = """
import json, sys
sys.path.insert(0, {tests!r})
import torch
from oracles import SD15_KEYS, random_sd15_state
from safetensors.torch import save_file
save_file(random_sd15_state(json.loads(SD15_KEYS.read_text()), torch.float16), {path!r})
"""


def speed(args) -> None:
    # Nothing large lives in this process: a forked child counts its parent's resident pages in its own
    # ru_maxrss until it execs, so the checkpoint is written by a child.
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = tmp / "random-sd15.safetensors"
        subprocess.run([sys.executable, "-c", WRITE_CHECKPOINT.format(tests=str(ROOT / "tests"), path=str(checkpoint))],
                       check=True)
        commands = {}
        for mode in args.modes:
            commands[mode] = [sys.executable, "-m", "sdtorch", "generate", PROMPT, "--model", str(checkpoint),
                              "--steps", str(args.steps), "--sampler", "euler", "--cfg", "7.5", "--seed", "1",
                              "--width", str(args.size), "--height", str(args.size), "--quiet",
                              "--out", str(tmp / f"{mode}.png"), *MODES[mode]]
            if "--dtype" not in MODES[mode]:  # exact modes compute in fp32, as the diffusers script does
                commands[mode] += ["--dtype", "fp32"]
        script = DIFFUSERS_SCRIPT.format(tests=str(ROOT / "tests"), checkpoint=str(checkpoint), prompt=PROMPT,
                                         steps=args.steps, size=args.size, out=str(tmp / "diffusers.png"))
        commands["diffusers"] = [sys.executable, "-c", script]
        samples: dict[str, list[tuple[float, float, int]]] = {}
        names = list(commands)
        for round_ in range(args.rounds):
            for name in names if round_ % 2 == 0 else names[::-1]:
                seconds, peak, faults = run(commands[name])
                samples.setdefault(name, []).append((seconds, peak, faults))
                print(f"round {round_ + 1} {name}: {seconds:.1f} s, {peak:.2f} GB, {faults / 1e6:.2f} M page faults",
                      file=sys.stderr, flush=True)
        ref_s = statistics.median(s for s, _, _ in samples["diffusers"])
        ref_gb = statistics.median(p for _, p, _ in samples["diffusers"])
        for name in names:
            seconds = statistics.median(s for s, _, _ in samples[name])
            peak = statistics.median(p for _, p, _ in samples[name])
            faults = statistics.median(f for _, _, f in samples[name])
            row = {"mode": name, "seconds": round(seconds, 1), "peak_gb": round(peak, 2),
                   "time_ratio": round(seconds / ref_s, 3), "memory_ratio": round(peak / ref_gb, 3),
                   "page_faults_m": round(faults / 1e6, 2),
                   "runs": [[round(s, 1), round(p, 2), round(f / 1e6, 2)] for s, p, f in samples[name]]}
            if name != "diffusers":
                row["levels_vs_diffusers"] = levels(tmp / f"{name}.png", tmp / "diffusers.png")
                if "compute" in commands and name != "compute":
                    row["levels_vs_compute"] = levels(tmp / f"{name}.png", tmp / "compute.png")
            print(json.dumps({**row, "steps": args.steps, "size": args.size, "cpu": cpu_name(),
                              "cores": len(os.sched_getaffinity(0))}), flush=True)


def accuracy(n: int, modes: list[str]) -> None:
    from sdtorch.pipeline import Pipeline, default_model_path
    from sdtorch.shapes.evaluate import evaluate

    for mode in modes:
        options = {"default": {}, "compute": {"weights": "compute"}, "keep-freed": {"keep_freed": True},
                   "low-memory": {"low_memory": True}, "bf16": {"dtype": "bf16"}}[mode]
        pipe = Pipeline.load(default_model_path(), **{"dtype": "fp32", **options})
        start = time.perf_counter()
        scores = evaluate(pipe, n=n)
        print(json.dumps({"mode": mode, "seconds": round(time.perf_counter() - start, 1),
                          **{k: round(v, 3) if isinstance(v, float) else v for k, v in scores.items()}}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--accuracy", type=int, metavar="N",
                        help="also judge N pictures of the embedded model per mode")
    parser.add_argument("--no-speed", action="store_true")
    args = parser.parse_args()
    if not args.no_speed:
        speed(args)
    if args.accuracy:
        accuracy(args.accuracy, args.modes)


if __name__ == "__main__":
    main()
