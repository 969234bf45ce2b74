"""`sdtorch batch JOBFILE --out DIR`: every image of a job file, exactly once, resumably, here or on Ray.

    sdtorch batch prompts.txt --out shapes/ --steps 20 --seeds 0-99
    sdtorch batch jobs.jsonl --out sweep/ --sweep cfg=3,5,7 --per-prompt 4
    sdtorch batch prompts.txt --out /shared/run1 --ray auto --workers 8 --gpus-per-worker 1

`jobs` reads the file (A1111's "prompts from file" lines or JSON Lines) into one request per image;
`run` makes them with stable names and a manifest, skipping what a previous run finished;
`ray_backend` spreads them over a pool of Ray actors. The `generate` options apply to every line.
"""

from __future__ import annotations

import argparse
import sys

from sdtorch.batch.jobs import JobFileError, JobImage, JobSpec, parse_seeds, parse_sweep, read_job
from sdtorch.batch.run import LocalBackend, OutputDir, Worker, run_job

# The `generate` options a batch takes: those that set request fields (but the prompt, which the job file gives,
# and what needs a starting picture: batch is text-to-image), and the model's. Any other is left out rather than
# accepted and ignored.
_PICTURE_OPTIONS = {"prompt", "strength", "mask", "mask_blur", "invert_mask", "masked_content", "inpaint_area",
                    "inpaint_padding", "outpaint"}
_MODEL_OPTIONS = {"model", "lora_dir", "lora", "embeddings_dir", "dtype", "device"}


def add_batch_parser(commands, generate: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `batch` subcommand: its own options plus every `generate` option that applies to each line."""
    parser = commands.add_parser("batch", help="every image of a job file (prompts or JSON Lines), resumably; "
                                 "on this machine or a Ray cluster")
    parser.add_argument("job", metavar="JOBFILE", help="one prompt a line, A1111 'prompts from file' lines "
                        "(--prompt \"...\" --steps 20 --seed 5 ...), or JSON Lines of request fields (.jsonl)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the PNGs and manifest.jsonl go "
                        "(created; a rerun into the same DIR finishes what is missing)")
    parser.add_argument("--seeds", type=_seeds, metavar="LIST", help="make each line once per seed, e.g. 0-99 or "
                        "1,5,10-12 (lines that give their own seed keep it)")
    parser.add_argument("--per-prompt", type=int, default=1, metavar="N",
                        help="N images of each line, at its seed and the next ones (default 1)")
    parser.add_argument("--sweep", action="append", default=[], metavar="NAME=V,V,...",
                        help="make every line once per value, e.g. cfg=3,5,7 (repeatable: every combination)")
    parser.add_argument("--ray", nargs="?", const="auto", metavar="auto|ADDRESS", help="run on Ray: 'auto' (the "
                        "cluster `ray start` made here, or a new local one) or a cluster address (needs sdtorch[ray])")
    parser.add_argument("--workers", type=int, metavar="N", help="Ray actors, each holding one loaded model "
                        "(default: as many as the cluster's CPUs / GPUs fit)")
    parser.add_argument("--cpus-per-worker", type=float, default=1, metavar="N",
                        help="CPUs each Ray worker reserves and its torch threads (default 1)")
    parser.add_argument("--gpus-per-worker", type=float, default=0, metavar="N",
                        help="GPUs each Ray worker reserves (default 0: CPU workers)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, only the summary line")
    from sdtorch.cli import REQUEST_OPTIONS

    wanted = (set(REQUEST_OPTIONS) - _PICTURE_OPTIONS) | _MODEL_OPTIONS
    own = {s for action in parser._actions for s in action.option_strings}
    for action in generate._actions:  # the generate options, shared (not copied) so the two never drift
        if action.dest in wanted and not own.intersection(action.option_strings):
            parser._add_action(action)
    return parser


def _seeds(text: str) -> list[int]:
    try:
        return parse_seeds(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def job_spec(args: argparse.Namespace) -> JobSpec:
    """The command line's request and expansion options; an SdtorchError for a bad one."""
    from sdtorch.cli import REQUEST_OPTIONS, request_from_args
    from sdtorch.errors import SdtorchError

    namespace = argparse.Namespace(**{option: None for option in REQUEST_OPTIONS}, mask=None)
    vars(namespace).update(vars(args))
    namespace.prompt, namespace.from_png, namespace.init_image = "", None, None
    base = request_from_args(namespace)
    if args.per_prompt < 1:
        raise SdtorchError(f"--per-prompt must be at least 1, got {args.per_prompt}")
    sweeps = []
    for text in args.sweep:
        try:
            sweeps.append(parse_sweep(text, REQUEST_OPTIONS))
        except ValueError as e:
            raise SdtorchError(str(e)) from None
    return JobSpec(base=base, seeds=args.seeds, per_prompt=args.per_prompt, sweeps=tuple(sweeps),
                   schedule_given=args.schedule is not None, identity=identity(args))


def model_path(args: argparse.Namespace) -> str:
    from sdtorch.pipeline import default_model_path

    return str(args.model or default_model_path())


def identity(args: argparse.Namespace) -> dict:
    """What besides the request shapes an image's bytes, and so is part of its key: the model (A1111's hash
    of the file, or the folder's name), the LoRA options and the dtype."""
    from pathlib import Path

    from sdtorch.errors import SdtorchError
    from sdtorch.metadata import model_hash

    path = Path(model_path(args))
    if not path.exists():
        raise SdtorchError(f"model {str(path)!r} does not exist")
    model = model_hash(path) if path.is_file() else path.resolve().name
    return {"model": model, "lora": list(args.lora or ()), "dtype": args.dtype}


def worker_options(args: argparse.Namespace) -> dict:
    return {"model": model_path(args), "device": args.device, "dtype": args.dtype, "lora_dir": args.lora_dir,
            "embeddings_dir": args.embeddings_dir, "loras": tuple(args.lora or ())}


def batch(args: argparse.Namespace) -> int:
    """`sdtorch batch`: read and check the whole job, then make what DIR does not have yet."""
    from sdtorch.errors import SdtorchError

    try:
        images, duplicates = read_job(args.job, job_spec(args))
    except JobFileError as e:
        for problem in e.problems:
            print(f"sdtorch: error: {problem}", file=sys.stderr)
        return 2
    if duplicates:
        print(f"sdtorch: note: {duplicates} images asked for twice are made once", file=sys.stderr)
    if args.ray is None:
        if args.workers not in (None, 1):
            raise SdtorchError("without --ray one worker runs in this process; --workers needs --ray")
        backend = LocalBackend(worker_options(args))
    else:
        from sdtorch.batch.ray_backend import RayBackend, import_ray

        import_ray()
        if args.workers is not None and args.workers < 1:
            raise SdtorchError(f"--workers must be at least 1, got {args.workers}")
        backend = RayBackend(worker_options(args), address=args.ray, workers=args.workers,
                             cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker)
    counts = run_job(images, args.out, backend, quiet=args.quiet)
    made = counts["written"]
    rate = f", {made / counts['seconds']:.2f} images/s" if made else ""
    print(f"{args.out}: {counts['skipped'] + made} of {counts['total']} images ({counts['skipped']} already there, "
          f"{made} made{rate}) in {counts['seconds']:.1f} s")
    return 1 if counts["failed"] else 0


__all__ = ["JobImage", "JobSpec", "LocalBackend", "OutputDir", "Worker", "add_batch_parser", "batch", "read_job",
           "run_job"]
