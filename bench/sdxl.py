"""What an SDXL 1024x1024 generation costs on this machine: load, memory and time per step.

    python bench/sdxl.py [CHECKPOINT] [--dtype fp32] [--steps 2] [--size 1024]

With no checkpoint it writes a random fp16 file with the exact layout of sd_xl_base_1.0 (2,515 tensors,
from tests/data/sdxl/sdxl_base_keys.json) first. The generation runs in a fresh process, so the peak
resident set (VmHWM) is its own. Prints JSON: load seconds and peak, seconds of the text encoders +
first step, of each later step (CFG: a batch of 2), of the VAE decode, and the whole run's peak.
Needs about 20 GB of free memory in fp32; run it alone on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
import torch
from sdtorch.pipeline import Pipeline

def peak():
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM")).split()[1]) * 1024

path, dtype, steps, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
started = time.perf_counter()
pipe = Pipeline.load(path, device="cpu", dtype=dtype)
loaded = time.perf_counter()
load_peak = peak()
marks = []
result = pipe.generate("a photograph of a lighthouse on a cliff at dawn", negative_prompt="blurry", steps=steps,
                       sampler="euler", seed=1, width=size, height=size, progress=False,
                       callback=lambda event: marks.append(time.perf_counter()))
ended = time.perf_counter()
print(json.dumps({
    "dtype": dtype, "size": size, "steps": steps, "cpu": torch.backends.cpu.get_cpu_capability(),
    "threads": torch.get_num_threads(), "load_s": loaded - started, "load_peak_bytes": load_peak,
    "weights_bytes": sum(p.numel() * p.element_size() for n in pipe.model.networks().values() for p in n.parameters()),
    "text_and_first_step_s": marks[0] - loaded, "later_steps_s": [b - a for a, b in zip(marks, marks[1:])],
    "decode_s": ended - marks[-1], "peak_bytes": peak(),
}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()

    def run(path: Path) -> None:
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), args.dtype, str(args.steps), str(args.size)],
                             capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr)
        print(out.stdout.strip())

    if args.checkpoint:
        run(Path(args.checkpoint))
        return
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "tests"))
    from oracles import random_sd15_state

    manifest = json.loads((ROOT / "tests" / "data" / "sdxl" / "sdxl_base_keys.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sd_xl_base-random.safetensors"
        state = random_sd15_state(manifest, torch.float16, seed=6)
        save_file(state, str(path))
        del state
        run(path)


if __name__ == "__main__":
    main()
