"""Score a text-to-image model on the shapes world with the judge: `python -m sdtorch.shapes.evaluate`.

Prompts are drawn fresh (scenes and captions from seeds the training never used), written as the
training captions are, leaving some attributes out; only what a prompt states is scored, read back
from it with `parse_caption`. Each prompt is generated with a few seeds through `Pipeline.generate`
(one call per prompt, its seeds as one batch) and every picture is judged.

- `evaluate`: per-attribute accuracy and the share of pictures with every stated attribute right,
  on scenes of the training pairs or (held_out=True) of `HELD_OUT_PAIRS` only;
- `evaluate_img2img`: from a generated picture of a scene, the same scene with another object
  colour at strength 0.6; scores whether the new colour shows and the judged position is kept;
- `seconds_per_image`: one 64x64 picture at the default settings, median wall clock;
- `choose_guidance`: the guidance scale a freshly trained model gets as its default, picked on
  prompts of a validation seed, never on the evaluation's.

Guidance left None is the model's own default (`ModelConfig.default_cfg_scale`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from sdtorch.shapes.judge import judge
from sdtorch.shapes.world import ATTRIBUTES, COLOURS, HELD_OUT_PAIRS, caption, parse_caption, random_scene

SCORED = ("shape", "colour", "size", "position", "background")
EVAL_SEED = 777_000_000  # far from every training stream (those start at 1e6, 2e6 and 3e6)
VALIDATION_SEED = 555_000_000  # for choosing the default guidance; also far from the evaluation's


def draw_prompts(n: int, seed: int = EVAL_SEED, held_out: bool = False) -> list[tuple[str, dict[str, str]]]:
    """`n` fresh (prompt, stated attributes) pairs; every prompt names a shape or a colour."""
    rng = np.random.Generator(np.random.PCG64(seed))
    out = []
    while len(out) < n:
        scene = random_scene(rng, only_pairs=HELD_OUT_PAIRS) if held_out else random_scene(rng)
        text = caption(scene, rng)
        stated = parse_caption(text)
        if "shape" not in stated and "colour" not in stated:
            continue
        assert all(getattr(scene, k) == v for k, v in stated.items()), (text, scene)
        out.append((text, stated))
    return out


def _score(records: list[tuple[dict, object]]) -> dict:
    """Accuracies from (stated attributes, verdict) pairs."""
    result = {"n": len(records)}
    for attr in SCORED:
        judged = [getattr(v, attr) == s[attr] for s, v in records if attr in s]
        result[attr] = sum(judged) / len(judged) if judged else float("nan")
    result["all"] = sum(all(getattr(v, a) == x for a, x in s.items()) for s, v in records) / len(records)
    result["all_but_size"] = sum(
        all(getattr(v, a) == x for a, x in s.items() if a != "size") for s, v in records
    ) / len(records)
    return result


def evaluate(pipeline, n: int = 200, seed: int = EVAL_SEED, cfg_scale: float | None = None, held_out: bool = False,
             seeds_per_prompt: int = 2, steps: int = 20, sampler: str = "euler_a", **options) -> dict:
    """Judge `n` generated pictures (n / seeds_per_prompt fresh prompts, each with seeds_per_prompt
    seeds); returns {'n', one accuracy per attribute, 'all', 'all_but_size'}. `options` are more request fields
    for every picture (a fast mode: cfg_cutoff=0.5, deep_cache=3)."""
    size = pipeline.model.config.image_size
    records = []
    prompts = draw_prompts(-(-n // seeds_per_prompt), seed, held_out)
    for i, (prompt, stated) in enumerate(prompts):
        k = min(seeds_per_prompt, n - len(records))
        result = pipeline.generate(prompt, steps=steps, cfg_scale=cfg_scale, sampler=sampler, seed=seed + 1000 * i,
                                   width=size, height=size, batch=k, progress=False, **options)
        records += [(stated, judge(np.asarray(image))) for image in result.images]
    return _score(records)


def evaluate_img2img(pipeline, n: int = 300, seed: int = EVAL_SEED + 1, strength: float = 0.6,
                     cfg_scale: float | None = None, steps: int = 20) -> dict:
    """From a generated picture of a scene, prompt the same scene with another object colour.
    Returns {'n', 'colour' (the new colour judged), 'position' (the source's judged position kept),
    'source_ok' (the source picture judged as its prompt)}."""
    size = pipeline.model.config.image_size
    rng = np.random.Generator(np.random.PCG64(seed))
    colour_right = position_kept = source_ok = 0
    for i in range(n):
        scene = random_scene(rng)
        new_colour = [c for c in COLOURS if c not in (scene.colour, scene.background)][rng.integers(len(COLOURS) - 2)]
        source_prompt = caption(scene, rng, omit=())
        target_prompt = caption(type(scene)(scene.shape, new_colour, scene.size, scene.position, scene.background),
                                rng, omit=())
        source = pipeline.generate(source_prompt, steps=steps, cfg_scale=cfg_scale, seed=seed + i,
                                   width=size, height=size, progress=False).images[0]
        before = judge(np.asarray(source))
        after = judge(np.asarray(pipeline.generate(
            target_prompt, steps=steps, cfg_scale=cfg_scale, seed=seed + n + i, width=size, height=size,
            init_image=source, strength=strength, progress=False).images[0]))
        source_ok += all(getattr(before, a) == getattr(scene, a) for a in ATTRIBUTES)
        colour_right += after.colour == new_colour
        position_kept += after.position is not None and after.position == before.position
    return {"n": n, "colour": colour_right / n, "position": position_kept / n, "source_ok": source_ok / n}


def choose_guidance(pipeline, candidates: tuple[float, ...], n: int = 100, seed: int = VALIDATION_SEED,
                    log=print) -> float:
    """The candidate guidance scale with the most validation pictures fully right (ties go to the
    stronger guidance). SD's 7.5 was tuned for SD; a small model can over-shoot colours at it."""
    best = None
    for scale in candidates:
        score = evaluate(pipeline, n, seed=seed, cfg_scale=scale)["all"]
        log(f"guidance {scale}: {score:.3f} of {n} validation pictures fully right")
        if best is None or score >= best[1]:
            best = (scale, score)
    return best[0]


def seconds_per_image(pipeline, repeats: int = 5) -> float:
    """Median wall clock of one picture at the default settings (euler_a, 20 steps, the model's CFG)."""
    size = pipeline.model.config.image_size
    pipeline.generate("a red circle on a blue background", seed=0, width=size, height=size, progress=False)
    times = []
    for r in range(repeats):
        started = time.perf_counter()
        pipeline.generate("a red circle on a blue background", seed=r, width=size, height=size, progress=False)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    from sdtorch.pipeline import Pipeline, default_model_path

    parser = argparse.ArgumentParser(prog="python -m sdtorch.shapes.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint to score (default: the embedded model)")
    parser.add_argument("--n", type=int, default=200, help="pictures per text-to-image set")
    # 300, not 100: at 100 pictures a share near 0.8 is only known to about +-0.08 (95%).
    parser.add_argument("--img2img-n", type=int, default=300, help="pictures in the image-to-image set")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--quick", action="store_true", help="only the default text-to-image set")
    args = parser.parse_args(argv)
    import torch

    if args.device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    pipe = Pipeline.load(args.model or default_model_path(), device=args.device, dtype=args.dtype)
    cfg = pipe.model.config.default_cfg_scale
    print(f"model: {pipe.model_path} (default guidance {cfg:g})")
    rows = {}
    started = time.time()
    rows[f"txt2img cfg {cfg:g}"] = evaluate(pipe, args.n)
    if not args.quick:
        if cfg != 7.5:
            rows["txt2img cfg 7.5"] = evaluate(pipe, args.n, cfg_scale=7.5)
        rows["txt2img cfg 1.0"] = evaluate(pipe, args.n, cfg_scale=1.0)
        rows[f"held-out pairs cfg {cfg:g}"] = evaluate(pipe, args.n, held_out=True)
    header = f"{'set':<24}{'n':>5}" + "".join(f"{a:>12}" for a in SCORED) + f"{'all':>8}{'all-size':>10}"
    print(header)
    for name, r in rows.items():
        print(f"{name:<24}{r['n']:>5}" + "".join(f"{r[a]:>12.3f}" for a in SCORED) + f"{r['all']:>8.3f}"
              f"{r['all_but_size']:>10.3f}")
    if not args.quick:
        i2i = evaluate_img2img(pipe, args.img2img_n)
        rows["img2img strength 0.6"] = i2i
        print(f"img2img strength 0.6, cfg {cfg:g}, n={i2i['n']}: new colour right {i2i['colour']:.3f}, position kept "
              f"{i2i['position']:.3f} (source pictures fully right {i2i['source_ok']:.3f})")
        rows["seconds per image"] = seconds_per_image(pipe)
        print(f"one 64x64 image, euler_a 20 steps, CFG {cfg:g}: {rows['seconds per image']:.3f} s "
              f"(median of 5, {args.device}, {torch.get_num_threads()} threads)")
    print(f"evaluation took {time.time() - started:.0f} s")
    return rows


if __name__ == "__main__":
    main()
