"""The `sdtorch` command.

    sdtorch generate "a red circle on a blue background" --steps 20 --seed 1 --out circle.png
    sdtorch generate --from-png circle.png          # the same image again, from its parameters
    sdtorch samplers                                # the sampler names and what they accept

A user mistake prints one line, `sdtorch: error: ...`, and exits with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdtorch.errors import SdtorchError

# Guidance is not here: its default is the model's own (7.5 for SD checkpoints; see ModelConfig).
DEFAULTS = {"steps": 20, "sampler": "euler_a", "strength": 0.75, "negative": ""}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdtorch", description="Stable Diffusion from scratch in PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="text-to-image, or image-to-image with --init-image")
    gen.add_argument("prompt", nargs="?", help="what to draw (not needed with --from-png)")
    gen.add_argument("--model", help="SD 1.x checkpoint (.safetensors, .ckpt) or diffusers folder; "
                     "default: the model embedded in sdtorch")
    gen.add_argument("--negative", help="negative prompt (default: empty)")
    gen.add_argument("--steps", type=int, help=f"sampling steps (default {DEFAULTS['steps']})")
    gen.add_argument("--cfg", type=float, help="classifier-free guidance scale "
                     "(default: the model's own; 7.5 for SD checkpoints)")
    gen.add_argument("--sampler", help=f"sampler name (default {DEFAULTS['sampler']}; see `sdtorch samplers`)")
    gen.add_argument("--karras", action="store_true", default=None, help="Karras et al. sigma spacing")
    gen.add_argument("--seed", type=int, help="seed of the first image; image i uses seed + i (default: random)")
    gen.add_argument("--width", type=int, help="multiple of 8 (default: the model's own size, or the init image's)")
    gen.add_argument("--height", type=int, help="multiple of 8 (default: the model's own size, or the init image's)")
    gen.add_argument("--batch", type=int, default=1, help="number of images (default 1)")
    gen.add_argument("--init-image", help="start from this image (image-to-image)")
    gen.add_argument("--strength", type=float, help=f"how much of the init image to redo, in (0, 1] "
                     f"(default {DEFAULTS['strength']})")
    gen.add_argument("--clip-skip", type=int, help="use the text encoder's N-th layer from the end (default 1)")
    gen.add_argument("--save-steps", metavar="DIR", help="write every step's latents and prediction, "
                     "decoded, plus a strip and a GIF, into DIR")
    gen.add_argument("--out", help="output PNG (default sdtorch-SEED.png; a batch adds -1, -2, ...)")
    gen.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default fp32 on the CPU, fp16 on a GPU")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default auto)")
    gen.add_argument("--from-png", metavar="FILE", help="regenerate from the parameters stored in this PNG; "
                     "options given here override them")
    gen.add_argument("--quiet", action="store_true", help="no progress bars, only the summary line")

    commands.add_parser("samplers", help="list the samplers")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "samplers":
            return list_samplers()
        return generate(args)
    except SdtorchError as e:
        print(f"sdtorch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdtorch: interrupted", file=sys.stderr)
        return 130


def list_samplers() -> int:
    from sdtorch.samplers import SAMPLERS

    for name, info in SAMPLERS.items():
        notes = ["--karras" if info.supports_karras else "", "stochastic" if info.stochastic else ""]
        print(f"{name:14s} {info.display_name:14s} {' '.join(n for n in notes if n)}")
    return 0


def settings_from_png(args: argparse.Namespace) -> None:
    """Fill every option the user did not give from the PNG's A1111 parameters."""
    from sdtorch.metadata import read_png_parameters, sampler_from_a1111

    params = read_png_parameters(args.from_png)
    sampler, karras = sampler_from_a1111(params.sampler) if params.sampler else (None, None)
    stored = {
        "prompt": params.prompt,
        "negative": params.negative_prompt,
        "steps": params.steps,
        "cfg": params.cfg_scale,
        "sampler": sampler,
        "karras": karras,
        "seed": params.seed,
        "width": params.width,
        "height": params.height,
        "strength": params.denoising_strength,
        "clip_skip": int(params.extra["Clip skip"]) if "Clip skip" in params.extra else None,
    }
    for key, value in stored.items():
        if getattr(args, key) is None and value is not None:
            setattr(args, key, value)
    if params.denoising_strength is not None and args.init_image is None:
        raise SdtorchError(f"{args.from_png} was made by image-to-image; give its starting image with --init-image")


def output_paths(out: str | None, seeds: list[int]) -> list[Path]:
    base = Path(out) if out else Path(f"sdtorch-{seeds[0]}.png")
    if base.suffix.lower() != ".png":
        raise SdtorchError(f"output {str(base)!r} must end in .png (the parameters are stored in the PNG)")
    if not base.parent.is_dir():
        raise SdtorchError(f"output folder {str(base.parent)!r} does not exist")
    if len(seeds) == 1:
        return [base]
    return [base.with_name(f"{base.stem}-{i}{base.suffix}") if i else base for i in range(len(seeds))]


def generate(args: argparse.Namespace) -> int:
    import random

    if args.from_png:
        settings_from_png(args)
    if not args.prompt:
        raise SdtorchError("give a prompt, e.g. sdtorch generate \"a red circle\" (or --from-png FILE)")
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    from sdtorch.images import load_image
    from sdtorch.metadata import write_png
    from sdtorch.pipeline import Pipeline, check_settings, default_model_path
    from sdtorch.preview import LatentPreview, StepRecorder, save_steps

    # Everything the user gave is checked before the model is loaded.
    check_settings(
        steps=args.steps, cfg_scale=args.cfg, sampler=args.sampler, karras=bool(args.karras), seed=args.seed,
        batch=args.batch, strength=args.strength, img2img=args.init_image is not None,
        width=args.width, height=args.height,
    )
    seed = random.randrange(2**32) if args.seed is None else args.seed
    paths = output_paths(args.out, [seed + i for i in range(args.batch)])

    init_image = load_image(args.init_image) if args.init_image else None
    model_path = args.model or default_model_path()
    pipe = Pipeline.load(model_path, device=args.device, dtype=args.dtype)
    recorder = StepRecorder() if args.save_steps else None
    result = pipe.generate(
        args.prompt,
        negative_prompt=args.negative,
        steps=args.steps,
        cfg_scale=args.cfg,
        sampler=args.sampler,
        karras=bool(args.karras),
        seed=seed,
        width=args.width,
        height=args.height,
        batch=args.batch,
        init_image=init_image,
        strength=args.strength,
        clip_skip=args.clip_skip or 1,
        callback=recorder,
        progress=not args.quiet,
    )
    for image, params, path in zip(result.images, result.params, paths):
        write_png(path, image, params)
    if recorder is not None:
        save_steps(args.save_steps, recorder, pipe.decode, LatentPreview.fit(pipe.model.vae))
    what = ", ".join(str(p) for p in paths)
    steps_note = f"; steps in {args.save_steps}" if args.save_steps else ""
    print(f"wrote {what} (seed {seed}, {args.steps} steps, {result.params[0].sampler}) "
          f"in {result.seconds:.1f} s{steps_note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
