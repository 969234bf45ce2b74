"""Context for the UNet step: OpenVINO and the machine's floor beside sdtorch and diffusers, same weights.

    pip install -e ".[dev,bench]"  # diffusers (the dev extra) and openvino, a benchmark-only extra
    python bench/openvino_unet.py [--size 512] [--rounds 3] [--precision f32|bf16]

One UNet call at batch 2 (CFG's pair), the random fp16 SD 1.5 file of the other benchmarks: diffusers' UNet
(fp32) converted once to OpenVINO's IR (`openvino.convert_model`, traced from the PyTorch module), then in
fresh processes, alternated round by round: OpenVINO's compiled model on the CPU (2 inference threads, its
inference precision pinned, since on a CPU with AMX or AVX512-BF16 OpenVINO would otherwise pick bf16), sdtorch's
UNet (Pipeline.load, default runtime) and diffusers'. Each worker times `--repeats` calls after one warm-up;
the figures are medians. The floor: the call's FLOPs (torch's FlopCounterMode on our UNet) over the cores'
measured peak (the best of a large matmul and a 3x3 convolution at the UNet's widths). Prints JSON lines.
Run it alone on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the random SD 1.5 layout and diffusers' loader are the tests'
THREADS = 2


def inputs(size: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size // 8, size // 8, generator=g).to(dtype)
    context = torch.randn(2, 77, 768, generator=g).to(dtype)
    return x, torch.tensor(500.0), context


def diffusers_unet(checkpoint: Path, dtype=torch.float32):
    from diffusers import UNet2DConditionModel
    from oracles import SD15_YAML

    return UNet2DConditionModel.from_single_file(str(checkpoint), original_config=str(SD15_YAML),
                                                 torch_dtype=dtype).eval()


class _Plain(torch.nn.Module):
    """diffusers' UNet returning a tensor, as the converter traces it."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def convert(checkpoint: Path, ir: Path, size: int) -> float:
    import openvino as ov

    start = time.perf_counter()
    with torch.no_grad():
        model = ov.convert_model(_Plain(diffusers_unet(checkpoint)), example_input=inputs(size))
    ov.save_model(model, str(ir), compress_to_fp16=False)  # the IR keeps fp32 weights
    return time.perf_counter() - start


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def worker(impl: str, checkpoint: str, ir: str, size: int, repeats: int, precision: str) -> dict:
    torch.set_num_threads(THREADS)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if impl == "openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(ir, "CPU", {"INFERENCE_NUM_THREADS": THREADS,
                                                       "INFERENCE_PRECISION_HINT": precision})
        feed = [t.numpy() for t in inputs(size)]
        return {"seconds": timed(lambda: compiled(feed), repeats)}
    x, t, context = inputs(size, dtype)
    if impl == "sdtorch":
        from sdtorch.pipeline import Pipeline

        unet = Pipeline.load(checkpoint, device="cpu", dtype="bf16" if precision == "bf16" else "fp32").model.unet
        with torch.no_grad():
            return {"seconds": timed(lambda: unet(x, t, context), repeats)}
    unet = diffusers_unet(Path(checkpoint), dtype)
    with torch.no_grad():
        return {"seconds": timed(lambda: unet(x, t, encoder_hidden_states=context), repeats)}


def floor(checkpoint: str, size: int, precision: str) -> dict:
    """FLOPs of one call, the measured peak FLOP/s of 2 threads in `precision`, and their quotient."""
    from torch.utils.flop_counter import FlopCounterMode

    from sdtorch.pipeline import Pipeline

    torch.set_num_threads(THREADS)
    unet = Pipeline.load(checkpoint, device="cpu", dtype="fp32").model.unet
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(*inputs(size))
    flops = counter.get_total_flops()

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(4096, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
    conv = torch.nn.Conv2d(640, 640, 3, padding=1).eval().to(dtype)
    feature = torch.randn(2, 640, 32, 32, dtype=dtype)
    with torch.no_grad():
        matmul_s = min(timed(lambda: a @ b, 5))
        conv_s = min(timed(lambda: conv(feature), 5))
    matmul = 2 * 4096**3 / matmul_s
    conv_rate = 2 * 2 * 640 * 640 * 9 * 32 * 32 / conv_s
    peak = max(matmul, conv_rate)
    return {"unet_gflop": round(flops / 1e9, 1), "matmul_gflops": round(matmul / 1e9, 1),
            "conv3x3_gflops": round(conv_rate / 1e9, 1), "floor_s": round(flops / peak, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", default="f32", choices=["f32", "bf16"])
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, checkpoint, ir, size, repeats, precision = args.worker
        result = floor(checkpoint, int(size), precision) if impl == "floor" else worker(
            impl, checkpoint, ir, int(size), int(repeats), precision)
        print(json.dumps(result))
        return

    from oracles import SD15_KEYS, random_sd15_state
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, ir = Path(tmp) / "random-sd15.safetensors", Path(tmp) / "unet.xml"
        save_file(random_sd15_state(json.loads(SD15_KEYS.read_text()), torch.float16), str(checkpoint))
        print(json.dumps({"converted_s": round(convert(checkpoint, ir, args.size), 1)}), flush=True)

        def run(impl: str) -> dict:
            command = [sys.executable, __file__, "--worker", impl, str(checkpoint), str(ir), str(args.size),
                       str(args.repeats), args.precision]
            return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)

        print(json.dumps({"floor": run("floor")}), flush=True)
        seconds: dict[str, list[float]] = {}
        for round_ in range(args.rounds):
            for impl in ("openvino", "sdtorch", "diffusers")[::1 if round_ % 2 == 0 else -1]:
                seconds.setdefault(impl, []).append(statistics.median(run(impl)["seconds"]))
                print(json.dumps({"round": round_, "impl": impl, "seconds": round(seconds[impl][-1], 2)}), flush=True)
        medians = {impl: statistics.median(s) for impl, s in seconds.items()}
        print(json.dumps({"size": args.size, "precision": args.precision, "threads": THREADS,
                          "cpu": torch.backends.cpu.get_cpu_capability(),
                          **{f"{impl}_s": round(s, 2) for impl, s in medians.items()},
                          "sdtorch_vs_diffusers": round(medians["sdtorch"] / medians["diffusers"], 2),
                          "sdtorch_vs_openvino": round(medians["sdtorch"] / medians["openvino"], 2)}), flush=True)


if __name__ == "__main__":
    main()
