"""sdtorch against diffusers on the same random SD 1.5 weights, in the same run.

    python bench/bench.py [--quick] [--dtypes fp32 bf16] [--steps 20]

Writes a random fp16 checkpoint with the exact layout of SD 1.5, then, for each dtype, runs ours
and diffusers in fresh processes (so each one's peak memory is its own) on the same inputs:
text encoder (batch 2), one UNet step at batch 2 (CFG's cond + uncond) at 256x256 and 512x512
image sizes, a VAE decode at 512x512, and a whole 512x512 txt2img of `--steps` Euler steps.
Times are medians over repeats after a warm-up; the table gives ours / diffusers ratios
(below 1: we are faster or leaner). Needs the dev extras (diffusers, transformers).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the oracles' set-up is shared with the parity tests

PROMPT = "a photograph of an astronaut riding a horse"


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, caches
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM"))
    return int(line.split()[1]) * 1024


def worker(impl: str, checkpoint: str, dtype_name: str, steps: int, quick: bool) -> dict:
    import torch

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    # Repeats after the warm-up: more for the short measurements, where noise matters most.
    reps = {"text": 1, 256: 1, 512: 1, "vae": 1} if quick else {"text": 5, 256: 3, 512: 2, "vae": 1}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    context = torch.randn(2, 77, 768, generator=g).to(dtype)
    latents = {size: torch.randn(2, 4, size // 8, size // 8, generator=g).to(dtype) for size in (256, 512)}
    decode_in = torch.randn(1, 4, 64, 64, generator=g).to(dtype)
    t = torch.tensor(500.0)
    results = {}

    started = time.perf_counter()
    if impl == "sdtorch":
        from sdtorch.pipeline import Pipeline

        pipe = Pipeline.load(checkpoint, device="cpu", dtype=dtype_name)
        model = pipe.model
        results["load_s"] = time.perf_counter() - started
        with torch.no_grad():
            results["text_encoder_s"] = timed(lambda: model.text_encoder(ids), reps["text"])
            for size, x in latents.items():
                results[f"unet_{size}_s"] = timed(lambda x=x: model.unet(x, t, context), reps[size])
            results["vae_decode_512_s"] = timed(lambda: model.vae.decode(decode_in), reps["vae"])

            def txt2img():
                pipe.generate(PROMPT, steps=steps, sampler="euler", seed=1, width=512, height=512, progress=False)
    else:
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
        from oracles import SCHEDULER_CONFIG
        from test_pipeline import sd15_reference_components

        components = sd15_reference_components(Path(checkpoint), Path(tempfile.mkdtemp()), dtype)
        scheduler = EulerDiscreteScheduler.from_config(json.loads(SCHEDULER_CONFIG.read_text()))
        pipe = StableDiffusionPipeline(
            **components, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        results["load_s"] = time.perf_counter() - started
        with torch.no_grad():
            results["text_encoder_s"] = timed(lambda: pipe.text_encoder(input_ids=ids), reps["text"])
            for size, x in latents.items():
                run = lambda x=x: pipe.unet(x, t, encoder_hidden_states=context)  # noqa: E731
                results[f"unet_{size}_s"] = timed(run, reps[size])
            results["vae_decode_512_s"] = timed(lambda: pipe.vae.decode(decode_in), reps["vae"])

            def txt2img():
                generator = torch.Generator("cpu").manual_seed(1)
                pipe(PROMPT, num_inference_steps=steps, generator=generator, height=512, width=512)

    start = time.perf_counter()
    txt2img()
    results[f"txt2img_512_{steps}steps_s"] = time.perf_counter() - start
    results["peak_rss_gb"] = peak_rss_bytes() / 1e9
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="one repeat per measurement")
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "CHECKPOINT", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.worker:
        impl, checkpoint, dtype = args.worker
        print(json.dumps(worker(impl, checkpoint, dtype, args.steps, args.quick)))
        return

    import torch
    from oracles import SD15_KEYS, random_sd15_state
    from safetensors.torch import save_file

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "random-sd15.safetensors"
        save_file(random_sd15_state(json.loads(SD15_KEYS.read_text()), torch.float16), str(checkpoint))
        for dtype in args.dtypes:
            for impl in ("sdtorch", "diffusers"):
                command = [sys.executable, __file__, "--worker", impl, str(checkpoint), dtype]
                command += ["--steps", str(args.steps)] + (["--quick"] if args.quick else [])
                print(f"running {impl} {dtype} ...", file=sys.stderr, flush=True)
                out = subprocess.run(command, capture_output=True, text=True, check=True)
                results[(impl, dtype)] = json.loads(out.stdout.strip().splitlines()[-1])
    print(table(results, args.dtypes, torch.get_num_threads()))
    if args.json:
        Path(args.json).write_text(json.dumps({f"{i}/{d}": r for (i, d), r in results.items()}, indent=2))


def table(results: dict, dtypes: list[str], threads: int) -> str:
    rows = ["| measurement | dtype | sdtorch | diffusers | ratio |", "| --- | --- | ---: | ---: | ---: |"]
    for dtype in dtypes:
        ours, theirs = results[("sdtorch", dtype)], results[("diffusers", dtype)]
        for key in ours:
            unit = "GB" if key.endswith("_gb") else "s"
            name = key.removesuffix("_s").removesuffix("_gb")
            ratio = ours[key] / theirs[key]
            rows.append(f"| {name} | {dtype} | {ours[key]:.2f} {unit} | {theirs[key]:.2f} {unit} | {ratio:.2f} |")
    return f"CPU threads: {threads}\n\n" + "\n".join(rows)


if __name__ == "__main__":
    main()
