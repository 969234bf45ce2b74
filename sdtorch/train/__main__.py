"""`python -m sdtorch.train --out DIR [--resume]`: train the embedded shapes model, all three stages.

Stage checkpoints (DIR/clip.pt, vae.pt, unet.pt, the UNet's written every `save_every` steps) make
the run resumable; the loss is printed and appended to DIR/train.log. After the three stages the
model's default guidance scale is chosen on validation prompts (`GuidanceChoice`). The result is
DIR/sdtorch-shapes.safetensors, an SD 1.x single-file checkpoint with the config in its metadata,
which `sdtorch.loading.load_model` (and so `sdtorch generate --model`) reads like any other.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from sdtorch.loading import save_checkpoint
from sdtorch.model import StableDiffusion
from sdtorch.pipeline import Pipeline
from sdtorch.shapes.evaluate import choose_guidance
from sdtorch.train.clip_stage import train_clip
from sdtorch.train.common import Log
from sdtorch.train.recipe import RECIPE, Recipe
from sdtorch.train.unet_stage import train_unet
from sdtorch.train.vae_stage import train_vae

MODEL_FILE = "sdtorch-shapes.safetensors"
EARLY_STAGE_SHARE = 0.13  # of --minutes, at most, for each of the CLIP and VAE stages; the UNet gets the rest


def train(recipe: Recipe, out: Path, resume: bool = False, device: str = "cpu", dtype: str = "fp16",
          quiet: bool = False, minutes: float | None = None) -> Path:
    """Train all three stages into `out` and write the single-file checkpoint; returns its path.
    With `minutes`, each stage may stop early (its learning rate decayed) so that the three stages,
    summed over resumes, take about that long on a busy machine; choosing the guidance adds ~2 min."""
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()  # the stages may tune it; the guidance choice gets it back
    log = Log(out / "train.log", quiet=quiet)
    recipe_file = out / "recipe.json"
    wanted = json.loads(json.dumps(recipe.to_dict()))
    if resume and recipe_file.is_file() and json.loads(recipe_file.read_text()) != wanted:
        raise SystemExit(f"{recipe_file} differs from this run's recipe: resume with the same settings or a new --out")
    recipe_file.write_text(json.dumps(recipe.to_dict(), indent=1))
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if resume and timings_file.is_file() else {}

    def timed(stage, fn, *args, **kwargs):
        started = time.time()
        result = fn(*args, **kwargs)
        timings[stage] = timings.get(stage, 0.0) + time.time() - started
        timings_file.write_text(json.dumps(timings))
        return result

    share = None if minutes is None else minutes * 60 * EARLY_STAGE_SHARE
    text_encoder = timed("clip", train_clip, recipe, out, log, device, resume, share)
    vae, scale = timed("vae", train_vae, recipe, out, log, device, resume, share)
    budget = None if minutes is None else max(60.0, minutes * 60 - timings["clip"] - timings["vae"])
    unet = timed("unet", train_unet, recipe, text_encoder, vae, scale, out, log, device, resume, budget)

    config = dataclasses.replace(recipe.model, vae=dataclasses.replace(recipe.model.vae, scaling_factor=scale))
    model = StableDiffusion(config=config, text_encoder=text_encoder.cpu(), unet=unet.cpu(), vae=vae.cpu())
    model.to(dtype={"fp16": torch.float16, "fp32": torch.float32}[dtype])
    path = out / MODEL_FILE
    save_checkpoint(model, path)

    # The default guidance is chosen on the model as it will be used: this file, loaded as users load it.
    torch.set_num_threads(threads)
    pipeline = Pipeline.load(path, device=device)
    cfg = timed("guidance", choose_guidance, pipeline, recipe.guidance.candidates, recipe.guidance.pictures, log=log)
    model.config = dataclasses.replace(config, default_cfg_scale=cfg)
    save_checkpoint(model, path)
    log(f"default guidance {cfg:g}")
    log("wall clock (summed over resumes): " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
        + f"; in all {sum(timings.values()) / 60:.1f} min")
    log(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {dtype})")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sdtorch.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for stage checkpoints, log and the model")
    parser.add_argument("--resume", action="store_true", help="continue from the stage checkpoints in --out")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="dtype the model file stores")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step count (quick runs)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                        help="override a recipe setting, e.g. --set unet.lr=1e-3 --set model.unet.model_channels=96")
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall-clock budget of the three stages; the UNet stage ends early to keep it "
                        "(choosing the guidance scale after them takes ~2 min more)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="log to DIR/train.log only, print nothing")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = RECIPE.override(args.set)
    if args.scale != 1.0:
        recipe = recipe.scaled(args.scale)
    train(recipe, args.out, resume=args.resume, device=args.device, dtype=args.dtype, quiet=args.quiet,
          minutes=args.minutes)


if __name__ == "__main__":
    main()
