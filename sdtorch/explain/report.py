"""Writing a `Recording` out: `report.html` (one self-contained page, every image a data: URI, no
script, no network), `report.json`, `tensors.npz`, `attention/<word>.npy|.png`, the final image as
`sdtorch generate` writes it, beside the `steps/` folder the recording wrote."""

from __future__ import annotations

import dataclasses
import json
import math
from html import escape
from pathlib import Path

import numpy as np
from PIL import Image

from sdtorch.explain.draw import channels, colourise, enlarge, img, line_plot, overlay
from sdtorch.explain.objects import object_coverage, relate
from sdtorch.explain.run import OUTLINE_DISTANCE, Recording
from sdtorch.metadata import infotext, write_png

SECTIONS = {
    "components": "1. The components",
    "text": "2. Text to numbers",
    "diffusion": "3. Diffusion, step by step",
    "guidance": "4. Guidance",
    "attention": "5. Which words go where",
    "training": "6. What the UNet learned to do",
}
PIXELATED = "pixelated"


def request_record(request) -> dict:
    """The request's fields as JSON values (the init image and mask by their size only)."""
    out = {}
    for f in dataclasses.fields(request):
        value = getattr(request, f.name)
        if f.name in ("init_image", "mask"):  # pictures: by their size only
            value = None if value is None else {"width": value.width, "height": value.height}
        elif f.name == "options":
            value = dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def image_paths(out: Path, batch: int) -> list[Path]:
    return [out / ("image.png" if i == 0 else f"image-{i}.png") for i in range(batch)]


def _finite(value):
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


def write_report(rec: Recording, out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result, request = rec.result, rec.request
    written = {}
    for image, one, path in zip(result.images, result.per_image(), image_paths(out, request.batch)):
        write_png(path, image, infotext(one, model_name=rec.model_name, model_hash=rec.model_hash))
    written["image"] = image_paths(out, request.batch)[0]
    final = result.images[0]

    # Attention maps: per word, over heads, layers and steps.
    folder = out / "attention"
    folder.mkdir(exist_ok=True)
    across = max((float(m.max()) for m in rec.word_maps.values()), default=1.0) or 1.0
    for name, m in rec.word_maps.items():
        np.save(folder / f"{name}.npy", m.astype(np.float32))
        enlarge(colourise(m, 0.0, float(m.max()) or 1.0), 64).save(folder / f"{name}.png")
    coverage = object_coverage(np.asarray(final))
    relations = {name: relate(m, coverage) for name, m in rec.word_maps.items()} if coverage is not None else {}

    settings = request_record(request)
    report = {
        "settings": settings,
        "model": {"name": rec.model_name, "hash": rec.model_hash, **rec.components},
        "tokens": rec.tokens,
        "sigmas": rec.sigmas,
        "timings": rec.timings,
        "decode_every": rec.decode_every,
        "outline_step": rec.outline_step,
        "outline_distance": OUTLINE_DISTANCE,
        "distances": rec.distances,
        "words": [{"word": w.word, "name": w.name, "positions": list(w.positions),
                   **{k: _finite(v) for k, v in relations.get(w.name, {}).items()}} for w in rec.words],
        "attention_layers": rec.attention_layers,
        "guidance": [{"step": p.step, "sigma": p.sigma, "t": p.t, "scale": request.cfg_scale} for p in rec.guidance],
        "training": [{"t": e.t, "alpha_cumprod": e.alpha_cumprod, "mse": e.mse} for e in rec.training],
        "roundtrip": rec.roundtrip_error,
        "files": {"image": "image.png", "steps": "steps/", "attention": "attention/", "tensors": "tensors.npz"},
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False))
    np.savez(out / "tensors.npz", x0=rec.x0.numpy(), training_noise=rec.training_noise.numpy(),
             training_t=np.array([e.t for e in rec.training]),
             training_alpha_cumprod=np.array([e.alpha_cumprod for e in rec.training]),
             training_noised=np.concatenate([e.noised.numpy() for e in rec.training]),
             training_predicted=np.concatenate([e.predicted.numpy() for e in rec.training]),
             attention=rec.maps.numpy(), context=rec.context.numpy())
    (out / "report.html").write_text(render_html(rec, report, final, across, relations), encoding="utf-8")
    written.update(html=out / "report.html", json=out / "report.json", attention=folder, steps=rec.steps_dir)
    return written


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    klass = f' class="{cls}"' if cls else ""
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def render_html(rec: Recording, report: dict, final: Image.Image, across: float, relations: dict) -> str:
    request = rec.request
    c = rec.components
    big = max(256, final.width)
    e = escape
    sections = {}

    # 1. Components
    t = rec.timings
    sections["components"] = _table(["network", "parameters", "shapes", "time"], [
        ["text encoder (CLIP)", f"{c['text_encoder']['parameters']:,}",
         f"ids (1, 77) -> context {tuple(c['text_encoder']['output'])}; {c['text_encoder']['layers']} layers, "
         f"width {c['text_encoder']['width']}", _seconds(t["text_encoder_s"])],
        ["UNet", f"{c['unet']['parameters']:,}",
         f"latents {tuple(c['unet']['latent'])} per call, {c['unet']['cross_attention_layers']} cross-attention "
         f"layers; {request.steps} steps of {e(request.sampler)}", _seconds(t["unet_sampling_s"])],
        ["VAE (decoder)", f"{c['vae']['parameters']:,}",
         f"latent {tuple(c['vae']['latent'])} -> image {tuple(c['vae']['image'])} (x{c['vae']['downscale']}, "
         f"scale {c['vae']['scaling_factor']:g})", _seconds(t["vae_decode_s"])],
    ]) + (f"<p>dtype {e(c['dtype'])} on {e(c['device'])}; {e(c['family'])}, predicts {e(c['prediction'])}. "
          f"Times are measured around the step events of this run (the UNet's includes the attention recording); "
          f"the recorder's own callbacks took {_seconds(t['recording_in_callbacks_s'])}, decoding the steps "
          f"{_seconds(t['steps_decode_s'])}.</p>")

    # 2. Text -> numbers
    prompt_rows, padding = [], []
    for row in rec.tokens:
        if row["kind"] == "padding":
            padding.append(row)
            continue
        weight = "" if row["weight"] == 1.0 else f"{row['weight']:g}"
        prompt_rows.append([str(row["chunk"] * 77 + row["position"]), e(row["text"]), str(row["id"]),
                            f'<span class="kind {row["kind"]}">{row["kind"]}</span>', weight])
    if padding:
        first, last = padding[0], padding[-1]
        prompt_rows.append([f"{first['chunk'] * 77 + first['position']}..{last['chunk'] * 77 + last['position']}",
                            e(first["text"]), str(first["id"]),
                            f'<span class="kind padding">padding x {len(padding)}</span>', ""])
    context = rec.context.numpy()  # (77k, width)
    used = [i for i, row in enumerate(rec.tokens) if row["kind"] != "padding"]
    pad = [i for i, row in enumerate(rec.tokens) if row["kind"] == "padding"]
    m = float(np.abs(context).max()) or 1.0
    heat_used = enlarge(colourise(context[used], hi=m, diverging=True), 8) if used else None
    heat_pad = colourise(context[pad], hi=m, diverging=True) if pad else None
    scale = max(1, 512 // context.shape[1])
    heat = []
    for name, image in (("prompt tokens (BOS .. EOS)", heat_used), ("padding", heat_pad)):
        if image is not None:
            rows = len(used) if name.startswith("prompt") else len(pad)
            image = image.resize((context.shape[1] * scale, rows * max(scale, 4)), Image.NEAREST)
            heat.append(f"<figure>{img(image, 'text encoder output: ' + name, cls=PIXELATED)}"
                        f"<figcaption>{e(name)}: {rows} x {context.shape[1]}</figcaption></figure>")
    sections["text"] = (f"<p>The prompt becomes {len(rec.tokens)} token ids ({len(rec.tokens) // 77} chunk(s) of 77: "
                        "BOS, the prompt's tokens, EOS, padding); the text encoder turns them into one "
                        f"{context.shape[1]}-wide vector each, the context every cross-attention layer reads.</p>"
                        + _table(["#", "token", "id", "kind", "weight"], prompt_rows, "tokens")
                        + f'<div class="row">{"".join(heat)}</div>')

    # 3. Diffusion step by step
    sigma_plot = line_plot({"sigma": rec.sigmas}, x_label="step", y_label="sigma after the step", log=True)
    distance_plot = line_plot({"distance to the final image": rec.distances}, x_label="step",
                              y_label="RMS distance", marks={f"outline threshold {OUTLINE_DISTANCE}": OUTLINE_DISTANCE})
    step_rows = []
    for i, (step, sigma, x, _d) in enumerate(rec.steps.steps):
        latents_img, predicted_img = rec.decoded.get(step, (None, None))
        def small(image, alt):
            return img(enlarge(image, 96), alt, width=96, cls=PIXELATED) if image is not None else "-"

        cells = [str(step), f"{sigma:.4g}", small(rec.previews[i], f"preview {step}"),
                 small(latents_img, f"latents {step}"), small(predicted_img, f"predicted {step}"),
                 img(channels(x[:1]), f"channels {step}", cls=PIXELATED),
                 "-" if rec.distances[i] is None else f"{rec.distances[i]:.3f}"]
        step_rows.append(cells)
    folder = rec.steps_dir if request.batch == 1 else rec.steps_dir / "image-0"
    gif = (folder / "steps.gif").read_bytes()
    outline = ("no step's prediction came within the threshold" if rec.outline_step is None else
               f"the outline appears at step {rec.outline_step} (0-based) of {len(rec.sigmas)}")
    sections["diffusion"] = (
        f"<p>The sampler starts from noise in the {tuple(c['vae']['latent'])} latent space and removes some at every "
        f"step. Below: the noise level after each step, every step's latents (the cheap linear preview at every step, "
        f"the full VAE every {rec.decode_every} step(s)), the predicted clean image, the 4 raw latent channels "
        f"(blue negative, red positive), and the distance of the prediction to the final image.</p>"
        f'<div class="row"><figure>{sigma_plot}<figcaption>noise schedule</figcaption></figure>'
        f"<figure>{distance_plot}<figcaption>prediction vs final image</figcaption></figure>"
        f'<figure>{img(gif, "the steps, animated", kind="gif", width=2 * big, cls=PIXELATED)}'
        f"<figcaption>latents | prediction, one frame per decoded step</figcaption></figure></div>"
        f'<p class="note">Measured: {outline} (first step whose predicted image is within RMS distance '
        f"{OUTLINE_DISTANCE} of the final image, pixels in [0, 1]).</p>"
        + _table(["step", "sigma", "linear preview", "latents (VAE)", "predicted image", "latent channels",
                  "distance"], step_rows, "steps"))

    # 4. Guidance
    g_rows = []
    for p in rec.guidance:
        g_rows.append([str(p.step), f"{p.sigma:.4g}", f"{p.t:.1f}", img(channels(p.x), "input"),
                       img(channels(p.uncond), "unconditional"), img(channels(p.cond), "conditional"),
                       img(channels(p.cond - p.uncond), "difference"), img(channels(p.guided), "guided")])
    guided = request.cfg_scale > 1
    sections["guidance"] = (
        f"<p>Classifier-free guidance: at every step the UNet predicts the noise twice, without the prompt (the "
        f"negative prompt {e(repr(request.negative_prompt))}) and with it; the sampler uses "
        f"uncond + {request.cfg_scale:g} x (cond - uncond)"
        + ("" if guided else " (here the scale is at most 1, so only the conditional prediction is used)")
        + ". Computed again beside the run from each step's input latents, the UNet called directly.</p>"
        + (_table(["step", "sigma", "t", "input x", "uncond", "cond", "cond - uncond", "guided"], g_rows)
           if g_rows else "<p>(too few steps for the guidance figure)</p>"))

    # 5. Which words go where
    w_rows = []
    for w in rec.words:
        mp = rec.word_maps[w.name]
        r = relations.get(w.name, {})
        corr = r.get("correlation")
        w_rows.append([e(w.word), ", ".join(map(str, w.positions)),
                       img(enlarge(colourise(mp, 0.0, float(mp.max()) or 1.0), 64), w.word + " per word", width=64,
                           cls=PIXELATED),
                       img(enlarge(colourise(mp, 0.0, across), 64), w.word + " across words", width=64, cls=PIXELATED),
                       img(overlay(enlarge(final, 128), mp, float(mp.max()) or 1.0), w.word + " over the image",
                           width=128),
                       "-" if corr is None or not math.isfinite(corr) else f"{corr:+.2f}",
                       "-" if not r else f"{r['mass_on_object']:.2f} / {r['object_area']:.2f}"])
    over_steps = []
    for name, maps in rec.step_word_maps.items():
        hi = (max(float(m.max()) for m in maps) if maps else 0.0) or 1.0
        tiles = "".join(img(enlarge(colourise(m, 0.0, hi), 40), f"{name} step {i}", width=40, cls=PIXELATED)
                        for i, m in enumerate(maps))
        word = next(w.word for w in rec.words if w.name == name)
        over_steps.append(f'<div class="steps-row"><span class="word">{e(word)}</span>{tiles}</div>')
    object_note = ("the object mask is the judge's coverage of the final image (sdtorch.shapes.judge)"
                   if relations else "no object stands out from the background in the final image, so no "
                   "correlation is given")
    sections["attention"] = (
        f"<p>DAAM (Tang et al. 2022): the softmax of every cross-attention layer's queries against the prompt's "
        f"tokens, conditional half of the batch, averaged over heads, the {len(rec.attention_layers)} layers and "
        f"every step, upsampled to the {tuple(c['vae']['latent'][1:])} latent grid; a word of several tokens is the "
        f"mean of its tokens. Normalised per word (each map to its own maximum) and across words (one maximum "
        f"for all). Correlation: Pearson's r between the map and the object's coverage at the map's size; "
        f"mass on the object vs the object's share of the area ({object_note}).</p>"
        + _table(["word", "token positions", "per word", "across words", "over the image", "r with object",
                  "mass on object / area"], w_rows, "words")
        + "<h3>Over the steps</h3><p>Each chosen word's map at every step (one maximum per word over the steps); "
        "early steps attend from noise, the layout settles as the outline emerges.</p>" + "".join(over_steps))

    # 6. Training example and VAE round trip
    t_rows = []
    for ex in rec.training:
        sigma = ((1 - ex.alpha_cumprod) / ex.alpha_cumprod) ** 0.5
        t_rows.append([str(ex.t), f"{ex.alpha_cumprod:.4f}", f"{sigma:.3g}",
                       img(channels(ex.noised), "noisy latents"), img(channels(rec.training_noise), "true noise"),
                       img(channels(ex.predicted), "predicted noise"), f"{ex.mse:.4f}"])
    rt = rec.roundtrip_error
    sections["training"] = (
        "<p>How the UNet was trained: take an image's latents x0 (here the final image, encoded by the VAE), add noise "
        "to a random training timestep t, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, and teach the UNet to predict "
        "eps. Below, the final image's latents noised to a few t with one fixed noise, the UNet's prediction (with the "
        "prompt) and its mean squared error.</p>"
        + _table(["t", "abar_t", "sigma", "noisy latents x_t", "true noise", "predicted", "MSE"], t_rows)
        + "<h3>The VAE's round trip</h3>"
        + f'<div class="row"><figure>{img(enlarge(final, big), "final image", width=big, cls=PIXELATED)}'
        f"<figcaption>image</figcaption></figure>"
        f"<figure>{img(channels(rec.x0, 96), 'latent channels', cls=PIXELATED)}<figcaption>"
        f"{tuple(c['vae']['latent'])} latents</figcaption></figure>"
        f'<figure>{img(enlarge(rec.roundtrip, big), "decoded again", width=big, cls=PIXELATED)}'
        f"<figcaption>decoded again</figcaption></figure></div>"
        f"<p>Reconstruction error: mean |difference| {rt['mean_abs_255']:.2f} of 255, PSNR {rt['psnr_db']:.1f} dB.</p>")

    header = _table(["prompt", "negative", "seed", "steps", "sampler", "CFG", "size", "model"], [[
        e(request.prompt), e(request.negative_prompt), str(request.seed), str(request.steps),
        e(f"{request.sampler} ({request.schedule})"), f"{request.cfg_scale:g}", f"{request.width}x{request.height}",
        e(rec.model_name or "?")]])
    body = "".join(f'<section id="{k}"><h2>{SECTIONS[k]}</h2>{v}</section>' for k, v in sections.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>The Illustrated Stable Diffusion: {e(request.prompt)}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: .6em 0; }} td, th {{ border: 1px solid #ddd; padding: 3px 6px; }}
th {{ background: #f4f4f4; }} img.pixelated {{ image-rendering: pixelated; }}
.row {{ display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }} figure {{ margin: 0; }}
figcaption {{ font-size: 12px; color: #555; }} .note {{ background: #fff8e1; padding: .4em .6em; }}
.kind {{ font-size: 11px; padding: 0 4px; border-radius: 3px; background: #eee; }}
.kind.BOS, .kind.EOS {{ background: #d6eaf8; }} .kind.padding {{ background: #f2f3f4; color: #777; }}
.steps-row {{ display: flex; align-items: center; gap: 2px; overflow-x: auto; margin: 2px 0; }}
.word {{ flex: 0 0 8em; }}
</style></head><body>
<h1>The Illustrated Stable Diffusion</h1>
<p>Drawn from one real generation by <code>sdtorch explain</code>.</p>
{header}
<figure>{img(enlarge(final, big), "the final image", width=big, cls=PIXELATED)}<figcaption>the final image
(the same pixels as <code>sdtorch generate</code> with these settings)</figcaption></figure>
{body}
</body></html>
"""
