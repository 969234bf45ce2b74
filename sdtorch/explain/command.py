"""`sdtorch explain PROMPT [generate's options] --out DIR [--decode-every N] [--words W,W]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdtorch.errors import SdtorchError

# generate's options that explain does not take: it writes its own image and steps into DIR.
NOT_TAKEN = {"help", "out", "save_steps", "preview", "taesd"}


def add_explain_parser(commands, generate: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The explain subcommand, with every option of `generate` (its argparse actions, shared) but --out,
    which names the report's folder here, and --save-steps / --preview / --taesd (the report writes DIR/steps/
    itself, with the linear preview)."""
    parser = commands.add_parser("explain", help="generate once while recording, and draw \"The Illustrated "
                                 "Stable Diffusion\" from it: DIR/report.html, report.json, attention/, steps/")
    for action in generate._actions:  # argparse's own way of sharing options (as `parents=` does)
        if action.dest not in NOT_TAKEN:
            parser._add_action(action)
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the report (created if missing)")
    parser.add_argument("--decode-every", type=int, default=1, metavar="N",
                        help="decode the latents with the full VAE every N steps (default 1; the cheap linear "
                        "preview is drawn at every step)")
    parser.add_argument("--words", type=lambda s: [w.strip() for w in s.split(",") if w.strip()], metavar="W,W",
                        help="the words whose attention maps are followed over the steps (default: all)")
    return parser


def explain_command(args: argparse.Namespace) -> int:
    from sdtorch.cli import load_pipeline, request_from_args

    request = request_from_args(args).with_seed()
    request.validate()
    if args.decode_every < 1:
        raise SdtorchError(f"--decode-every must be at least 1, got {args.decode_every}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SdtorchError(f"--out {str(out)!r} is a file; give a folder for the report")

    from sdtorch.explain import explain
    from sdtorch.images import load_image
    from sdtorch.progress import StepProgress

    if args.init_image:
        request = request.replace(init_image=load_image(args.init_image))
        request.validate()
    pipe, request = load_pipeline(args, request)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SdtorchError(f"cannot create the report folder {str(out)!r}: {e.strerror}") from None
    with StepProgress(request, disable=args.quiet) as bar:
        written = explain(pipe, request, out, decode_every=args.decode_every, words=args.words,
                          callback=bar.chain(None))
    print(f"wrote {written['html']} (seed {request.seed}, {request.steps} steps); image {written['image']}")
    return 0
