"""Peak memory of loading a checkpoint, in a fresh process.

    python bench/load_memory.py CHECKPOINT [--dtype fp16] [--weights stored]

Prints JSON: the loaded model's weight bytes, the process's peak resident set (VmHWM, which a
fresh exec starts from zero, unlike ru_maxrss) and its ratio. With no checkpoint given it writes a
random fp16 one with the exact SD 1.5 layout first (as the tests do).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, time
from sdtorch.loading import load_model
start = time.perf_counter()
model = load_model(sys.argv[1], dtype=sys.argv[2], weights=sys.argv[3])
seconds = time.perf_counter() - start
size = sum(p.numel() * p.element_size() for net in model.networks().values() for p in net.parameters())
with open("/proc/self/status") as status:
    peak = int(next(line for line in status if line.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({"model_bytes": size, "peak_rss_bytes": peak, "ratio": peak / size, "seconds": seconds}))
"""


def measure(checkpoint: Path, dtype: str, weights: str = "compute") -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(checkpoint), dtype, weights], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--weights", default="compute", choices=["compute", "stored", "int8"],
                        help="stored: keep a 16-bit file's weights as stored (mapped) for fp32 compute; int8: "
                             "the UNet's quantised")
    args = parser.parse_args()
    if args.checkpoint:
        print(json.dumps(measure(Path(args.checkpoint), args.dtype, args.weights)))
        return
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from oracles import SD15_KEYS, random_sd15_state

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random-sd15.safetensors"
        save_file(random_sd15_state(json.loads(SD15_KEYS.read_text()), torch.float16), str(path))
        print(json.dumps(measure(path, args.dtype, args.weights)))


if __name__ == "__main__":
    main()
