"""The `sdtorch` command.

    sdtorch generate "a red circle on a blue background" --steps 20 --seed 1 --out circle.png
    sdtorch generate --from-png circle.png          # the same image again, from its parameters
    sdtorch samplers                                # the sampler and schedule names

Options become one `GenerationRequest`; its defaults and checks are the request's own. A user
mistake prints one line, `sdtorch: error: ...`, and exits with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from sdtorch.errors import SdtorchError
from sdtorch.request import GenerationRequest

# argparse name -> GenerationRequest field, for the options that are request fields.
REQUEST_OPTIONS = {
    "prompt": "prompt", "negative": "negative_prompt", "steps": "steps", "cfg": "cfg_scale",
    "sampler": "sampler", "schedule": "schedule", "seed": "seed", "width": "width", "height": "height",
    "batch": "batch", "strength": "strength", "eta": "eta", "clip_skip": "clip_skip", "emphasis": "emphasis",
    "rng": "rng", "compat": "compat", "ensd": "ensd", "variation_seed": "variation_seed",
    "variation_strength": "variation_strength", "seed_resize_from": "seed_resize_from",
    "mask_blur": "mask_blur", "invert_mask": "invert_mask", "masked_content": "masked_content",
    "inpaint_area": "inpaint_area", "inpaint_padding": "inpaint_padding", "outpaint": "outpaint",
    "hires_scale": "hires_scale", "hires_steps": "hires_steps", "hires_strength": "hires_strength",
    "hires_upscaler": "hires_upscaler", "hires_width": "hires_width", "hires_height": "hires_height",
    "decoder": "decoder", "cfg_cutoff": "cfg_cutoff", "deep_cache": "deep_cache",
}
DEFAULTS = GenerationRequest()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdtorch", description="Stable Diffusion from scratch in PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="text-to-image, or image-to-image with --init-image")
    gen.add_argument("prompt", nargs="?",
                     help="what to draw (\"\" for an unconditional image; not needed with --from-png)")
    gen.add_argument("--model", help="SD 1.x, 2.x or SDXL checkpoint (.safetensors, .ckpt) or diffusers folder; "
                     "default: the model embedded in sdtorch")
    gen.add_argument("--negative", help="negative prompt (default: empty)")
    gen.add_argument("--steps", type=int, help=f"sampling steps (default {DEFAULTS.steps})")
    gen.add_argument("--cfg", type=float, help="classifier-free guidance scale "
                     "(default: the model's own; 7.5 for SD checkpoints)")
    gen.add_argument("--cfg-cutoff", type=float, metavar="F", help="fast mode: guide only the first fraction F of "
                     "the steps (e.g. 0.5), then the conditional pass alone: one UNet batch instead of two; "
                     "changes the image (default: every step guided)")
    gen.add_argument("--deep-cache", type=int, metavar="N", help="fast mode: DeepCache, the whole UNet every N-th "
                     "step and its deep features reused between (N=3: about 2x faster UNet steps); changes the "
                     "image (default: off)")
    gen.add_argument("--sampler", help=f"sampler name (default {DEFAULTS.sampler}; see `sdtorch samplers`)")
    gen.add_argument("--schedule", help=f"schedule type (default {DEFAULTS.schedule}; 'automatic' is A1111's "
                     "default for the sampler; see `sdtorch samplers`)")
    gen.add_argument("--karras", dest="schedule", action="store_const", const="karras",
                     help="the same as --schedule karras")
    gen.add_argument("--seed", type=int, help="seed of the first image; image i uses seed + i (default: random)")
    gen.add_argument("--width", type=int, help="multiple of 8 (default: the model's own size, or the init image's)")
    gen.add_argument("--height", type=int, help="multiple of 8 (default: the model's own size, or the init image's)")
    gen.add_argument("--batch", type=int, help="number of images (default 1)")
    gen.add_argument("--init-image", help="start from this image (image-to-image)")
    gen.add_argument("--strength", type=float, help=f"how much of the init image to redo, in (0, 1] "
                     f"(default {DEFAULTS.strength})")
    gen.add_argument("--mask", metavar="FILE", help="inpaint (with --init-image): repaint where this mask is white "
                     "(an RGBA mask: where it is opaque), keep the rest")
    gen.add_argument("--mask-blur", type=int, help=f"blur the mask's edge by this many pixels "
                     f"(default {DEFAULTS.mask_blur})")
    gen.add_argument("--invert-mask", action="store_const", const=True, help="repaint where the mask is black")
    gen.add_argument("--masked-content", choices=["fill", "original", "latent_noise", "latent_nothing"],
                     help="what the masked area starts from (default original; A1111's 'Masked content')")
    gen.add_argument("--inpaint-area", choices=["whole", "masked"], help="generate the whole picture (default), or "
                     "only the masked region at full size, pasted back")
    gen.add_argument("--inpaint-padding", type=int, help=f"pixels around the masked region with --inpaint-area "
                     f"masked (default {DEFAULTS.inpaint_padding})")
    gen.add_argument("--outpaint", type=_sides, metavar="L,R,T,B", help="extend --init-image by these many pixels "
                     "left, right, top, bottom (multiples of 8) and paint the new area")
    gen.add_argument("--hires-scale", type=float, help="hires fix: generate at the size, upscale by this factor, "
                     "then refine at the large size (image-to-image)")
    gen.add_argument("--hires-width", type=int, help="hires fix to this width instead of a scale (a multiple of 8; "
                     "alone, the height follows the aspect ratio; with --hires-height, upscaled to cover both, "
                     "then cropped to them, as A1111's 'Resize width to')")
    gen.add_argument("--hires-height", type=int, help="hires fix to this height instead of a scale (see --hires-width)")
    gen.add_argument("--hires-steps", type=int, help="steps of the hires pass (default 0: as many as --steps)")
    gen.add_argument("--hires-strength", type=float, help=f"denoising strength of the hires pass "
                     f"(default {DEFAULTS.hires_strength})")
    gen.add_argument("--hires-upscaler", choices=["latent", "latent-bicubic", "lanczos", "nearest"],
                     help="how the hires fix upscales: the latents (default latent) or the picture "
                     "(lanczos, nearest)")
    gen.add_argument("--eta", type=float, help="DDIM's eta, in [0, 1] (default 0: deterministic)")
    gen.add_argument("--clip-skip", type=int, help="use the text encoder's N-th layer from the end (default 1)")
    gen.add_argument("--emphasis", choices=["original", "no_norm"], help="how (word:1.2) weights apply: original "
                     "(A1111's default: scale, then restore each chunk's mean) or no_norm (scale only)")
    gen.add_argument("--loras", "--lora-dir", dest="lora_dir", metavar="DIR",
                     help="LoRA files that prompts name as <lora:NAME:WEIGHT>")
    gen.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]", help="apply this LoRA file (weight "
                     "default 1); the same as <lora:NAME:WEIGHT> in the prompt, and recorded so (repeatable)")
    gen.add_argument("--embeddings-dir", metavar="DIR", help="textual-inversion embeddings, used where a prompt "
                     "writes their name (file name, or the name inside an A1111 embedding PNG)")
    gen.add_argument("--rng", choices=["cpu", "gpu", "nv"], help="noise source: cpu (default; diffusers, ComfyUI, "
                     "A1111's CPU), gpu or nv (the numbers CUDA's torch.randn gives, A1111's default, on any device)")
    gen.add_argument("--compat", choices=["diffusers", "a1111"], help="sampling path: diffusers (default; equals "
                     "diffusers' pipelines) or a1111 (equals AUTOMATIC1111: k-diffusion grids, every A1111 sampler "
                     "and schedule type; set by --from-png for an A1111 image)")
    gen.add_argument("--ensd", type=int, help="A1111's eta noise seed delta (with --compat a1111; default 0)")
    gen.add_argument("--variation-seed", type=int, help="A1111's variation seed (with --compat a1111)")
    gen.add_argument("--variation-strength", type=float, help="how much of the variation seed's noise, in [0, 1]")
    gen.add_argument("--seed-resize-from", type=_size, metavar="WxH", help="A1111's 'Seed resize from': the noise "
                     "of this size, centred (with --compat a1111)")
    gen.add_argument("--save-steps", metavar="DIR", help="write every step's latents and prediction, "
                     "decoded, plus a strip and a GIF, into DIR")
    gen.add_argument("--vae", metavar="PATH", help="decode with this VAE instead of the model's own: a VAE file "
                     "(.safetensors, .ckpt, .pt; e.g. vae-ft-mse-840000-ema-pruned) or a diffusers vae/ folder")
    gen.add_argument("--preview", choices=["linear", "taesd"], help="the fast preview row of --save-steps: linear "
                     "(default; a colour map fitted to the VAE) or taesd (the tiny autoencoder; needs --taesd)")
    gen.add_argument("--taesd", metavar="PATH", help="TAESD weights: a folder with taesd_decoder.safetensors "
                     "(or .pth), or the decoder file")
    gen.add_argument("--decoder", choices=["vae", "taesd"], help="what decodes the final image: vae (default; the "
                     "model's or --vae's) or taesd (the tiny autoencoder, much faster, a little blurrier; needs "
                     "--taesd; recorded as A1111's 'VAE Decoder: TAESD')")
    gen.add_argument("--out", help="output PNG (default sdtorch-SEED.png; a batch adds -1, -2, ...)")
    gen.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default fp16 on a GPU; on the CPU bf16 where "
                     "it is native (AVX512-BF16, AMX), else fp32")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default auto)")
    gen.add_argument("--weights", choices=["compute", "stored", "int8"], help="stored (default on a CPU): keep a "
                     "16-bit file's weights as stored and widen them per layer for fp32 compute (the same image, "
                     "half the weight memory); compute: widen them all at load; int8: the UNet's weights "
                     "quantised to int8 (a quarter of fp32's memory; the image changes a little)")
    gen.add_argument("--low-memory", action="store_true", help="the least memory: --weights int8, guidance's "
                     "passes one after the other, freed memory returned at once (the image changes a little; "
                     "slower)")
    gen.add_argument("--compile", action="store_true", help="torch.compile the UNet (inductor): faster steps after "
                     "compiling at the first step of each size (a minute or more on a CPU; reported)")
    gen.add_argument("--keep-freed-memory", action="store_true", help="the allocator keeps freed memory for reuse "
                     "instead of returning it to the system: a tenth of the page faults and about 7%% less time at "
                     "512x512 on a CPU, but about twice the peak memory at 1024x1024")
    gen.add_argument("--from-png", metavar="FILE", help="regenerate from the parameters stored in this PNG; "
                     "options given here override them")
    gen.add_argument("--quiet", action="store_true", help="no progress bars, only the summary line")
    gen.add_argument("--vae-tiling", choices=["auto", "on", "off"], help="decode (and encode) the image in tiles: "
                     "auto (default: where the whole pass would not fit in memory), on, or off")
    gen.add_argument("--memory-limit", type=_byte_size, metavar="SIZE", help="plan as if at most this much memory "
                     "were free, e.g. 6G (default: what the machine has free); a batch runs in chunks that fit")

    commands.add_parser("samplers", help="list the samplers and schedule types")
    from sdtorch.server import add_serve_parser

    add_serve_parser(commands)
    from sdtorch.batch import add_batch_parser

    add_batch_parser(commands, gen)
    from sdtorch.explain.command import add_explain_parser

    add_explain_parser(commands, gen)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The command's warnings as it prints its errors: one line, no source location."""
    print(f"sdtorch: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _one_line_warning  # the documented hook for how an application shows warnings
    try:
        if args.command == "samplers":
            return list_samplers()
        if args.command == "serve":
            from sdtorch.server import serve

            return serve(args)
        if args.command == "batch":
            from sdtorch.batch import batch

            return batch(args)
        if args.command == "explain":
            from sdtorch.explain.command import explain_command

            return explain_command(args)
        return generate(args)
    except SdtorchError as e:
        print(f"sdtorch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdtorch: interrupted", file=sys.stderr)
        return 130


def _sides(text: str) -> tuple[int, int, int, int]:
    try:
        sides = tuple(int(v) for v in text.split(","))
    except ValueError:
        sides = ()
    if len(sides) != 4:
        raise argparse.ArgumentTypeError(f"expected left,right,top,bottom pixels, e.g. 0,64,0,0; got {text!r}")
    return sides


def _byte_size(text: str) -> int:
    units = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    number, unit = text.strip().lower().rstrip("ib").rstrip("b"), ""
    if number and number[-1] in units:
        number, unit = number[:-1], number[-1]
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size, e.g. 6G or 512M") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be above 0")
    return int(value)


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 512x768") from None
    return width, height


def list_samplers() -> int:
    from sdtorch.samplers import ALL_SAMPLERS, ALL_SCHEDULE_TYPES

    print("samplers (name, A1111 name, modes, default-mode schedule types, A1111 default schedule, notes):")
    for name, entry in ALL_SAMPLERS.items():
        notes = [*(f"--{option}" for option in entry.options), "stochastic" if entry.stochastic else "", entry.note]
        schedules = ",".join(entry.schedules) or "-"
        automatic = entry.a1111_default_schedule if "a1111" in entry.modes else "-"
        print(f"  {name:18s} {entry.display_name:18s} {','.join(entry.modes):16s} {schedules:14s} {automatic:12s} "
              f"{' '.join(n for n in notes if n)}".rstrip())
    print("schedule types (name, A1111 name, modes):")
    for name, kind in ALL_SCHEDULE_TYPES.items():
        if name == "automatic":
            continue
        modes = "diffusers,a1111" if name in ("uniform", "karras") else "a1111"
        print(f"  {name:18s} {kind.label:18s} {modes}")
    print("  automatic          A1111's default for the sampler (default mode: where it has it, else uniform)")
    print("modes (--compat): diffusers (default: equal to diffusers' pipelines), a1111 (equal to AUTOMATIC1111)")
    print("noise sources (--rng): cpu (default: torch's CPU generator), gpu and nv (CUDA's torch.randn numbers)")
    return 0


def request_from_args(args: argparse.Namespace) -> GenerationRequest:
    """The request the options describe: a PNG's parameters (--from-png) with the options given here
    on top, the request's own defaults for the rest."""
    fields = {}
    if args.from_png:
        fields, notes = record_fields(args.from_png)
        for note in notes:
            if not (args.sampler is not None and note.startswith("sampler ")):
                print(f"sdtorch: note: {note}", file=sys.stderr)
        if "strength" in fields and args.init_image is None:
            raise SdtorchError(f"{args.from_png} was made by image-to-image; give its starting image with --init-image")
    elif args.prompt is None:
        raise SdtorchError('give a prompt, e.g. sdtorch generate "a red circle" (or --from-png FILE)')
    given = {field: getattr(args, option) for option, field in REQUEST_OPTIONS.items()
             if getattr(args, option, None) is not None}
    if "hires_scale" in given:  # a scale given here replaces a record's resize, and a resize its scale
        fields.pop("hires_width", None), fields.pop("hires_height", None)
    if "hires_width" in given or "hires_height" in given:
        fields.pop("hires_scale", None)
    fields |= given
    if fields.get("compat") == "a1111" and "schedule" not in fields:
        fields["schedule"] = "automatic"  # A1111's own default: the sampler's schedule type
    return GenerationRequest(**fields)


def record_fields(path: str) -> tuple[dict, list[str]]:
    """The request fields an image's record gives (A1111's or ours) and a line for each thing it asks that will
    not be honoured; another tool's record, or none, is one SdtorchError line saying what it is."""
    from sdtorch.foreign_metadata import read_image_record, regeneration_fields

    record = read_image_record(path)
    if not record.regenerates:
        raise SdtorchError(f"{record.describe(path)}; sdtorch regenerates A1111 and sdtorch records only: "
                           "give those settings as options")
    return regeneration_fields(record.text)


def model_note(path: str, pipe) -> str | None:
    """A line when the record's model hash is not the loaded model's."""
    from sdtorch.foreign_metadata import model_hash_note, read_image_record
    from sdtorch.metadata import parse_parameters

    params = parse_parameters(read_image_record(path).text)
    if not params.model_hash:
        return None
    return model_hash_note(params.model_hash, params.model, pipe.model_hash, pipe.model_name)


def load_pipeline(args: argparse.Namespace, request: GenerationRequest):
    """The model the options name, with their LoRAs, embeddings and VAE; the request with --lora's tags
    added; one line each for what was passed over or differs from a --from-png record."""
    from sdtorch.pipeline import Pipeline, default_model_path

    vae = {"vae": args.vae} if getattr(args, "vae", None) else {}  # --vae, where the command has it
    if getattr(args, "taesd", None):  # --taesd, likewise
        vae["taesd"] = args.taesd
    runtime = {"weights": getattr(args, "weights", None), "low_memory": getattr(args, "low_memory", False),
               "compile": getattr(args, "compile", False),
               "keep_freed": getattr(args, "keep_freed_memory", False)}
    pipe = Pipeline.load(args.model or default_model_path(), device=args.device, dtype=args.dtype,
                         lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir, **vae, **runtime)
    pipe.vae_tiling = getattr(args, "vae_tiling", None) or pipe.vae_tiling  # --vae-tiling, --memory-limit
    pipe.memory_limit = getattr(args, "memory_limit", None)
    for warning in pipe.adapters.warnings:
        print(f"sdtorch: {warning}", file=sys.stderr)
    for spec in args.lora or ():
        request = request.replace(prompt=f"{request.prompt} {lora_tag(pipe, spec)}".strip())
    note = model_note(args.from_png, pipe) if args.from_png else None
    if note:
        print(f"sdtorch: note: {note}", file=sys.stderr)
    return pipe, request


def lora_tag(pipe, spec: str) -> str:
    """--lora FILE[:WEIGHT] -> the prompt tag <lora:NAME:WEIGHT> that applies it (and records it)."""
    path, _, weight = spec.rpartition(":") if ":" in Path(spec).name else (spec, "", "1")
    try:
        float(weight)
    except ValueError:
        raise SdtorchError(f"--lora {spec!r}: the weight after ':' must be a number, e.g. style.safetensors:0.8")\
            from None
    return f"<lora:{pipe.adapters.add_lora_file(path)}:{weight}>"


def output_paths(out: str | None, seeds: list[int]) -> list[Path]:
    base = Path(out) if out else Path(f"sdtorch-{seeds[0]}.png")
    if base.suffix.lower() != ".png":
        raise SdtorchError(f"output {str(base)!r} must end in .png (the parameters are stored in the PNG)")
    if not base.parent.is_dir():
        raise SdtorchError(f"output folder {str(base.parent)!r} does not exist")
    if len(seeds) == 1:
        return [base]
    return [base.with_name(f"{base.stem}-{i}{base.suffix}") if i else base for i in range(len(seeds))]


def load_mask(path: str):
    """A mask file as it is (an RGBA mask keeps its alpha: sdtorch.inpaint reads it)."""
    from PIL import Image

    from sdtorch.images import load_image

    load_image(path)  # the same checks as any picture: exists, a raster format, not too large
    with Image.open(path) as image:
        image.load()
        return image.copy()


def step_preview(args: argparse.Namespace, pipe):
    """The fast preview --preview asks for: TAESD's decoder, or the linear map fitted to the model's VAE."""
    if args.preview == "taesd":
        from sdtorch.taesd import TAESDPreview

        return TAESDPreview(pipe.taesd)  # loaded with the model (load_pipeline)
    from sdtorch.preview import LatentPreview

    return LatentPreview.fit(pipe.model.vae)


def generate(args: argparse.Namespace) -> int:
    # Everything the user gave is checked before the model is loaded; the seed is drawn once, here.
    request = request_from_args(args).with_seed()
    outpaint, request = request.outpaint, request.replace(outpaint=None)  # checked once the picture is loaded
    request.validate()
    if getattr(args, "preview", None) == "taesd" and not args.taesd:
        raise SdtorchError("--preview taesd needs --taesd PATH (a folder with taesd_decoder.safetensors)")
    if request.decoder == "taesd" and not getattr(args, "taesd", None):
        if args.decoder:
            raise SdtorchError("--decoder taesd needs --taesd PATH (a folder with taesd_decoder.safetensors)")
        raise SdtorchError(f"{args.from_png} was decoded by TAESD ('VAE Decoder: TAESD'): give --taesd PATH, "
                           "or --decoder vae for the full VAE")
    paths = output_paths(args.out, request.seeds)

    from sdtorch.images import load_image
    from sdtorch.metadata import infotext, write_png
    from sdtorch.preview import StepRecorder, save_steps
    from sdtorch.progress import StepProgress

    if args.init_image:
        request = request.replace(init_image=load_image(args.init_image))
        request.validate()
    if args.mask:
        request = request.replace(mask=load_mask(args.mask))
        request.validate()
    if outpaint is not None:
        request = request.replace(outpaint=outpaint)
        request.validate()
    pipe, request = load_pipeline(args, request)
    pipe.release_after_use = True  # one shot: each network is freed after its last use (a server keeps them)
    plan = pipe.plan(request.resolved(pipe.model), hold_results=False)  # one line now if even one image cannot fit
    if plan.chunks > 1:
        if args.save_steps:
            raise SdtorchError(f"--save-steps records one run; these {plan.images} images run in {plan.chunks} chunks "
                               f"(the memory available): use a batch of at most {plan.per_chunk}")
        print(f"sdtorch: note: {plan.images} images in {plan.chunks} chunks of up to {plan.per_chunk} "
              "(what fits in memory); each chunk is written as it is made", file=sys.stderr)
    recorder = StepRecorder() if args.save_steps else None
    seconds, written, result = 0.0, 0, None
    with StepProgress(request, disable=args.quiet) as bar:
        for result in pipe.run_chunks(request, bar.chain(recorder)):  # written and let go, chunk by chunk
            for warning in result.warnings:
                print(f"sdtorch: warning: {warning}", file=sys.stderr)
            for image, one, path in zip(result.images, result.per_image(), paths[written:]):
                write_png(path, image, infotext(one, model_name=pipe.model_name, model_hash=pipe.model_hash))
            written += len(result.images)
            seconds += result.seconds
    if recorder is not None:
        save_steps(args.save_steps, recorder, pipe.decode, step_preview(args, pipe))
    from sdtorch.samplers import a1111_name

    what = ", ".join(str(p) for p in paths) if len(paths) <= 10 else f"{paths[0]} ... {paths[-1]} ({len(paths)} images)"
    steps_note = f"; steps in {args.save_steps}" if args.save_steps else ""
    if getattr(args, "compile", False):
        from sdtorch.runtime import compile_seconds

        steps_note += f"; {compile_seconds():.1f} s of it compiling"
    sampler = a1111_name(result.request.sampler, result.request.schedule, result.request.compat)
    print(f"wrote {what} (seed {request.seed}, {request.steps} steps, {sampler}) in {seconds:.1f} s{steps_note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
