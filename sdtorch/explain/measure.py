"""Measured, not assumed: what the embedded shapes model's DAAM maps show, when the outline appears,
and what recording costs. `python -m sdtorch.explain.measure [--prompts 200] [--out FILE.json]`

- Words: fresh evaluation prompts that state a position (`sdtorch.shapes.evaluate.draw_prompts`),
  one seed each, 20 steps of euler_a at the model's own guidance. Every word of a prompt gets a kind
  (object colour, shape, size, position, background colour, the noun "background", filler) from the
  world's own vocabulary; its DAAM map (`AttentionRecorder`, the same code the report uses) is set
  against the object's coverage as the judge finds it in the generated picture: Pearson r at the
  latent size, the share of the map's mass on the object against the object's share of the area, and
  the offset of the map's centroid from the object's. "Mostly off the object" means r < 0 (the map is
  lower on the object than off it; equivalently its mass share on the object is below the object's
  share of the area).
- To fit on two CPU cores, the prompts run in batches through the same sampler, denoiser and
  attention seam as `Pipeline.run`, with classifier-free guidance over the batch written out here
  (uncond rows first, as sdtorch.guidance lays them out; one prompt per row instead of one for all).
- Outline: the first step whose decoded predicted image is within `OUTLINE_DISTANCE` (RMS, pixels in
  [0, 1]) of the final image, over the first `--outline-runs` runs.
- Cost: `explain` (full report, 20 steps) against a plain `Pipeline.generate`, median of `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from collections import defaultdict

import numpy as np
import torch

from sdtorch.conditioning import encode
from sdtorch.diffusion import Denoiser
from sdtorch.explain.objects import object_coverage, relate
from sdtorch.explain.record import AttentionRecorder, word_map, word_tokens
from sdtorch.explain.run import OUTLINE_DISTANCE, rms
from sdtorch.images import to_pil
from sdtorch.layers import swapped_attention
from sdtorch.pipeline import Pipeline, default_model_path
from sdtorch.request import GenerationRequest
from sdtorch.samplers import GeneratorNoise, create_generator, sample
from sdtorch.shapes import world
from sdtorch.shapes.evaluate import EVAL_SEED, draw_prompts

KINDS = ("object colour", "shape", "size", "position", "background colour", "'background'", "filler")
POSITION_WORDS = {"top", "bottom", "left", "right", "center", "centre", "middle", "upper", "lower", "corner", "side"}


def word_kinds(prompt: str, words) -> list[str]:
    """The kind of each word (as `word_tokens` found them) of a shapes-world caption."""
    text = prompt.lower()
    background_span = None
    for pattern in world._BACKGROUND_RES:
        m = pattern.search(text.replace("-", " "))
        if m:
            background_span = m.span(1)
            break
    spans = [m.span() for m in re.finditer(r"[^\W_]+(?:'[^\W_]+)?", text)]
    kinds, colour_seen = [], False
    for w, span in zip(words, spans):
        lw = w.word.lower()
        if background_span and span[0] >= background_span[0] and span[1] <= background_span[1]:
            kinds.append("background colour")
        elif lw in world._COLOUR_LOOKUP and not colour_seen:
            kinds.append("object colour")
            colour_seen = True
        elif lw in world._SHAPE_LOOKUP or lw in world._NO_SHAPE_NOUNS:
            kinds.append("shape")
        elif lw in world._SIZE_LOOKUP:
            kinds.append("size")
        elif lw in POSITION_WORDS:
            kinds.append("position")
        elif lw in ("background", "backdrop"):
            kinds.append("'background'")
        else:
            kinds.append("filler")
    return kinds


@torch.no_grad()
def run_batch(pipe: Pipeline, prompts: list[str], seeds: list[int], steps: int, decode_steps: bool):
    """Generate one picture per (prompt, seed) in one batch while recording; returns (images, recorder,
    per-step predicted images or None, per-prompt word lists)."""
    model = pipe.model
    request = GenerationRequest(prompt=prompts[0], steps=steps, seed=seeds[0]).resolved(model)
    scale, b = request.cfg_scale, len(prompts)
    conds, unconds = [], []
    for prompt in prompts:
        cond, uncond = encode(pipe.prompt_encoder, prompt, "", steps)
        conds.append(cond.at(1)[0][1])
        unconds.append(uncond.at(1)[0][1])
    context = torch.cat(unconds + conds)  # (2B, 77, width): uncond rows first

    def guided(x, t):
        out = model.unet(torch.cat([x, x]).to(model.dtype), t, context).float()
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + scale * (out_cond - out_uncond)

    generators = [create_generator("cpu", s) for s in seeds]
    _, noise = pipe.start_latents(request.replace(batch=b), generators)
    f = model.latent_format.downscale
    recorder = AttentionRecorder((request.height // f, request.width // f), b, True)
    predicted = [] if decode_steps else None

    def listen(event):
        recorder(event)
        if decode_steps:
            predicted.append(event.denoised.float().cpu())

    with swapped_attention(model.unet, recorder.choose):
        latents = sample(request.sampler, Denoiser(guided, model.schedule, model.config.prediction_type), noise,
                         steps, schedule=request.schedule, noise_source=GeneratorNoise(noise, generators),
                         callback=listen)
    images = to_pil(model.decode_latents(latents))
    if decode_steps:  # every step's prediction, decoded in large batches (cheaper than one call per step)
        flat = torch.cat(predicted)  # (steps * B, C, h, w)
        pictures = [p for i in range(0, len(flat), 100) for p in to_pil(model.decode_latents(flat[i : i + 100]))]
        predicted = [pictures[k * b : (k + 1) * b] for k in range(len(predicted))]
    words = [word_tokens(pipe.tokenizer, pipe.prompt_encoder.chunks(p), p) for p in prompts]
    return images, recorder, predicted, words


def summarise(values: list[float]) -> dict:
    v = [x for x in values if np.isfinite(x)]
    if not v:
        return {"n": 0}
    return {"n": len(v), "mean": float(np.mean(v)), "median": float(np.median(v)),
            "q10": float(np.quantile(v, 0.1)), "q90": float(np.quantile(v, 0.9))}


def measure_words(pipe, n_prompts: int, steps: int, batch: int, outline_runs: int, log=print) -> dict:
    prompts = [p for p, stated in draw_prompts(6 * n_prompts, EVAL_SEED + 18) if "position" in stated][:n_prompts]
    per_kind = defaultdict(list)  # kind -> [relation dicts]
    per_word = defaultdict(list)  # word -> [correlation]
    background_off, background_mass_off, no_object, outline_steps = [], [], 0, []
    started = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        seeds = [EVAL_SEED + 18 + 1000 * (i + j) for j in range(len(chunk))]
        decode = i < outline_runs
        images, recorder, predicted, words = run_batch(pipe, chunk, seeds, steps, decode)
        maps = recorder.mean()  # (B, K, h, w)
        for j, (prompt, image, found) in enumerate(zip(chunk, images, words)):
            if decode and i + j < outline_runs:
                distances = [rms(step_images[j], image) for step_images in predicted]
                outline_steps.append(next((k for k, d in enumerate(distances) if d <= OUTLINE_DISTANCE), None))
            coverage = object_coverage(np.asarray(image))
            if coverage is None:
                no_object += 1
                continue
            for w, kind in zip(found, word_kinds(prompt, found)):
                r = relate(word_map(maps[j], w.positions).numpy(), coverage)
                r["inside"] = _centroid_inside(word_map(maps[j], w.positions).numpy(), coverage)
                per_kind[kind].append(r)
                per_word[w.word.lower()].append(r["correlation"])
                if kind == "background colour":
                    background_off.append(r["correlation"] < 0)
                    background_mass_off.append(r["mass_on_object"] < 0.5)
        log(f"  {i + len(chunk)}/{len(prompts)} prompts, {time.perf_counter() - started:.0f} s")
    kinds = {}
    for kind in KINDS:
        rows = per_kind.get(kind, [])
        kinds[kind] = {
            "words": len(rows),
            "correlation": summarise([r["correlation"] for r in rows]),
            "share_negative": float(np.mean([r["correlation"] < 0 for r in rows])) if rows else None,
            "mass_on_object": summarise([r["mass_on_object"] for r in rows]),
            "object_area": summarise([r["object_area"] for r in rows]),
            "centroid_offset": summarise([r["centroid_offset"] for r in rows]),
            "centroid_inside_object": float(np.mean([r["inside"] for r in rows])) if rows else None,
        }
    common = sorted(per_word.items(), key=lambda kv: -len(kv[1]))[:25]
    histogram = defaultdict(int)
    for s in outline_steps:
        histogram["never" if s is None else s] += 1
    found_steps = [s for s in outline_steps if s is not None]
    return {
        "prompts": len(prompts), "steps": steps, "no_object_found": no_object, "kinds": kinds,
        "words": {w: summarise(v) for w, v in common},
        "background_colour_floor": {
            "prompts_with_background_colour": len(background_off),
            "share_off_object_r_below_0": float(np.mean(background_off)) if background_off else None,
            "share_mass_mostly_off_object": float(np.mean(background_mass_off)) if background_mass_off else None,
            "floor": 0.85,
            "passes": bool(background_off) and float(np.mean(background_off)) >= 0.85,
        },
        "outline": {"runs": len(outline_steps), "threshold_rms": OUTLINE_DISTANCE,
                    "histogram": {str(k): v for k, v in sorted(histogram.items(), key=lambda kv: (kv[0] == "never",
                                                                                                  str(kv[0]).zfill(3)))},
                    "median": float(statistics.median(found_steps)) if found_steps else None,
                    "mean": float(np.mean(found_steps)) if found_steps else None,
                    "q10": float(np.quantile(found_steps, 0.1)) if found_steps else None,
                    "q90": float(np.quantile(found_steps, 0.9)) if found_steps else None},
        "seconds": time.perf_counter() - started,
    }


def _centroid_inside(m: np.ndarray, coverage: np.ndarray) -> bool:
    from sdtorch.explain.objects import centroid

    x, y = centroid(m)
    h, w = coverage.shape
    return bool(coverage[min(h - 1, int(y * h)), min(w - 1, int(x * w))] > 0.5)


def measure_cost(pipe, repeats: int, steps: int = 20) -> dict:
    from sdtorch.explain import explain

    request = GenerationRequest(prompt="a red circle on a blue background", seed=1, steps=steps)
    plain, recorded, plain_cpu, recorded_cpu = [], [], [], []
    pipe.generate(request, progress=False)  # warm-up: the first run of a process is slower (allocations, threads)
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        pipe.generate(request, progress=False)
        plain.append(time.perf_counter() - t)
        plain_cpu.append(time.process_time() - c)
        with tempfile.TemporaryDirectory() as out:
            t, c = time.perf_counter(), time.process_time()
            explain(pipe, request, out)
            recorded.append(time.perf_counter() - t)
            recorded_cpu.append(time.process_time() - c)
    # CPU time as well as wall clock: on a shared machine the wall clock mostly measures the neighbours
    return {"steps": steps, "generate_s": plain, "explain_s": recorded, "generate_cpu_s": plain_cpu,
            "explain_cpu_s": recorded_cpu,
            "ratio_of_medians": statistics.median(recorded) / statistics.median(plain),
            "cpu_ratio_of_medians": statistics.median(recorded_cpu) / statistics.median(plain_cpu)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m sdtorch.explain.measure", description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--outline-runs", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the cost measurement (0: skip)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    pipe = Pipeline.load(default_model_path())
    result = {}

    def save() -> None:  # after each part, so that a long run keeps what it has measured
        if args.out:
            with open(args.out, "w") as f:
                f.write(json.dumps(result, indent=1))

    if args.prompts:
        result["words"] = measure_words(pipe, args.prompts, args.steps, args.batch, args.outline_runs)
        save()
    if args.repeats:
        result["cost"] = measure_cost(pipe, args.repeats, args.steps)
        save()
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
