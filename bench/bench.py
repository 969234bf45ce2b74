"""sdtorch against diffusers on the same random SD 1.5 weights, in the same run.

    python bench/bench.py [--quick] [--dtypes fp32 bf16] [--steps 20] [--rounds 3]
        [--variants default stored compile nchw-vae ...] [--weights stored] [--compile]
        [--channels-last-vae on|off] [--keep-freed]

Writes a random fp16 checkpoint with the exact layout of SD 1.5, then, for each dtype, runs ours
and diffusers in fresh processes (so each one's peak memory is its own) on the same inputs:
text encoder (batch 2), one UNet step at batch 2 (CFG's cond + uncond) at 256x256 and 512x512
image sizes, a VAE decode at 512x512, and a whole 512x512 txt2img of `--steps` Euler steps.
Times are medians over repeats after a warm-up; the table gives ours / diffusers ratios
(below 1: we are faster or leaner). Needs the dev extras (diffusers, transformers).

Runtime techniques are measured as sdtorch variants beside diffusers in the same run: each
`--variants` name (see VARIANTS) is one more sdtorch worker, with its own column and ratio; the
`--weights`, `--compile`, `--channels-last-vae` and `--keep-freed` flags change the "default" one.
`--rounds N` runs every worker N times, alternating, and reports the median of the rounds. With
`compile`, `compile_s` is the time spent compiling (the first call of each shape).
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
# sdtorch runtime variants: Pipeline.load's runtime options (sdtorch.runtime); "default" is what Pipeline.load
# and the CLI do unless asked (plus the --weights/--compile/--channels-last-vae/--keep-freed flags).
VARIANTS = {
    "default": {},
    "compute": {"weights": "compute"},  # every weight widened to the compute dtype
    "stored": {"weights": "stored"},  # 16-bit weights kept as stored, widened per layer (exact)
    "compile": {"compile": True},  # torch.compile of the UNet (inductor, no freezing)
    "nchw-vae": {"vae_channels_last": False},  # the VAE decoder in the default layout
    "cl-vae": {"vae_channels_last": True},
    "cl-unet": {"unet_channels_last": True},  # the UNet's weights and activations channels-last
    "keep-freed": {"keep_freed": True},
    "stored+keep-freed": {"weights": "stored", "keep_freed": True},
    "fast": {"compile": True, "keep_freed": True},
}


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


def worker(impl: str, checkpoint: str, dtype_name: str, steps: int, quick: bool, options: dict | None = None) -> dict:
    import torch

    options = dict(options or {})
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

        pipe = Pipeline.load(checkpoint, device="cpu", dtype=dtype_name, **options)
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
    if impl == "sdtorch" and options.get("compile"):
        from sdtorch.runtime import compile_seconds

        results["compile_s"] = compile_seconds()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="one repeat per measurement")
    parser.add_argument("--rounds", type=int, default=1, help="run every worker this many times, alternating")
    parser.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS),
                        help="sdtorch runtime variants to measure beside diffusers")
    parser.add_argument("--weights", choices=["compute", "stored"], help="the default variant's weights mode")
    parser.add_argument("--compile", action="store_true", help="the default variant compiles its UNet")
    parser.add_argument("--channels-last-vae", choices=["on", "off"], help="the default variant's VAE decoder layout")
    parser.add_argument("--keep-freed", action="store_true", help="the default variant's allocator keeps freed memory")
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "CHECKPOINT", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.worker:
        impl, checkpoint, dtype = args.worker
        print(json.dumps(worker(impl, checkpoint, dtype, args.steps, args.quick, json.loads(args.options))))
        return

    import torch
    from oracles import SD15_KEYS, random_sd15_state
    from safetensors.torch import save_file

    default = {"weights": args.weights, "compile": args.compile or None, "keep_freed": args.keep_freed or None,
               "vae_channels_last": {"on": True, "off": False}.get(args.channels_last_vae)}
    variants = {name: dict(VARIANTS[name]) for name in args.variants}
    if "default" in variants:
        variants["default"] = {k: v for k, v in default.items() if v is not None}
    workers = [(f"sdtorch:{name}", "sdtorch", options) for name, options in variants.items()]
    workers.append(("diffusers", "diffusers", {}))
    samples: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "random-sd15.safetensors"
        save_file(random_sd15_state(json.loads(SD15_KEYS.read_text()), torch.float16), str(checkpoint))
        for round_ in range(args.rounds):
            for dtype in args.dtypes:
                order = workers if round_ % 2 == 0 else workers[::-1]
                for label, impl, options in order:
                    command = [sys.executable, __file__, "--worker", impl, str(checkpoint), dtype]
                    command += ["--steps", str(args.steps), "--options", json.dumps(options)]
                    command += ["--quick"] if args.quick else []
                    print(f"round {round_ + 1}: running {label} {dtype} {options or ''} ...", file=sys.stderr,
                          flush=True)
                    out = subprocess.run(command, capture_output=True, text=True, check=True)
                    samples.setdefault((label, dtype), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {key: _median(runs) for key, runs in samples.items()}
    labels = [label for label, _, _ in workers]
    print(table(results, args.dtypes, labels, torch.get_num_threads(), args.rounds))
    if args.json:
        Path(args.json).write_text(json.dumps({f"{i}/{d}": r for (i, d), r in samples.items()}, indent=2))


def _median(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs if key in run) for key in runs[0]}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown")
    except OSError:
        name = "unknown"
    import torch

    return f"{name}, {torch.backends.cpu.get_cpu_capability()}"


def table(results: dict, dtypes: list[str], labels: list[str], threads: int, rounds: int = 1) -> str:
    ours = [label for label in labels if label != "diffusers"]
    head = " | ".join(ours)
    ratios = " | ".join(f"{label.removeprefix('sdtorch:')} / diffusers" for label in ours)
    rows = [f"| measurement | dtype | {head} | diffusers | {ratios} |",
            "| --- | --- |" + " ---: |" * (2 * len(ours) + 1)]
    for dtype in dtypes:
        theirs = results[("diffusers", dtype)]
        keys = list(dict.fromkeys(k for label in ours for k in results[(label, dtype)]))
        for key in keys:
            unit = "GB" if key.endswith("_gb") else "s"
            name = key.removesuffix("_s").removesuffix("_gb")
            values = [results[(label, dtype)].get(key) for label in ours]
            cells = " | ".join("-" if v is None else f"{v:.2f} {unit}" for v in values)
            base = theirs.get(key)
            ratio = " | ".join("-" if v is None or not base else f"{v / base:.2f}" for v in values)
            rows.append(f"| {name} | {dtype} | {cells} | {'-' if base is None else f'{base:.2f} {unit}'} | {ratio} |")
    return f"CPU: {cpu_name()}; threads: {threads}; medians of {rounds} round(s)\n\n" + "\n".join(rows)


if __name__ == "__main__":
    main()
