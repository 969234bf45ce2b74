"""Small drawing helpers for the report, with Pillow and numpy only: colour maps, tiles, overlays,
PNG / GIF data URIs and inline SVG line plots."""

from __future__ import annotations

import base64
import io
import math
from html import escape

import numpy as np
import torch
from PIL import Image

# A perceptual dark-to-bright ramp (close to matplotlib's "magma"), and a diverging blue-white-red one.
_MAGMA = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                   [250, 193, 39], [252, 253, 191]], dtype=np.float64)
_DIVERGING = np.array([[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]],
                      dtype=np.float64)


def colourise(values: np.ndarray, lo: float | None = None, hi: float | None = None, diverging: bool = False
              ) -> Image.Image:
    """(h, w) values -> an RGB image through a colour ramp, lo..hi (default: the values' range; with
    `diverging`, symmetric about 0)."""
    v = np.asarray(values, dtype=np.float64)
    if diverging:
        m = float(np.abs(v).max()) if hi is None else hi
        lo, hi = -m, m
    lo = float(v.min()) if lo is None else lo
    hi = float(v.max()) if hi is None else hi
    x = np.clip((v - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(v)
    ramp = _DIVERGING if diverging else _MAGMA
    position = x * (len(ramp) - 1)
    i = np.clip(np.floor(position).astype(int), 0, len(ramp) - 2)
    frac = (position - i)[..., None]
    rgb = ramp[i] * (1 - frac) + ramp[i + 1] * frac
    return Image.fromarray(rgb.round().astype(np.uint8), "RGB")


def enlarge(image: Image.Image, at_least: int = 96) -> Image.Image:
    """Nearest-neighbour enlarge so the shorter side is at least `at_least` pixels (latents are tiny)."""
    k = max(1, math.ceil(at_least / min(image.size)))
    return image if k == 1 else image.resize((image.width * k, image.height * k), Image.NEAREST)


def channels(latents: torch.Tensor, size: int = 64, gap: int = 2) -> Image.Image:
    """(1, C, h, w) latents -> their C channels side by side, each on a diverging ramp (0 = white)."""
    z = latents.detach().float().cpu()[0].numpy()
    m = float(np.abs(z).max()) or 1.0
    tiles = [enlarge(colourise(c, hi=m, diverging=True), size) for c in z]
    w, h = tiles[0].size
    canvas = Image.new("RGB", (len(tiles) * (w + gap) - gap, h), "white")
    for i, tile in enumerate(tiles):
        canvas.paste(tile, (i * (w + gap), 0))
    return canvas


def overlay(image: Image.Image, values: np.ndarray, hi: float, alpha: float = 0.6) -> Image.Image:
    """A map over a picture: the map (0..hi, magma) resized bilinearly to the picture, blended in."""
    heat = colourise(values, 0.0, hi).resize(image.size, Image.BILINEAR)
    return Image.blend(image.convert("RGB"), heat, alpha)


def data_uri(image: Image.Image | bytes, kind: str = "png") -> str:
    """An image (or encoded bytes of `kind`) as a data: URI."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        image = buffer.getvalue()
    return f"data:image/{kind};base64,{base64.b64encode(image).decode('ascii')}"


def img(image: Image.Image | bytes, alt: str, kind: str = "png", width: int | None = None, cls: str = "") -> str:
    size = f' width="{width}"' if width else ""
    klass = f' class="{cls}"' if cls else ""
    return f'<img src="{data_uri(image, kind)}" alt="{escape(alt)}"{size}{klass}>'


def line_plot(series: dict[str, list[float | None]], *, x_label: str, y_label: str, width: int = 560,
              height: int = 220, log: bool = False, marks: dict[str, float] | None = None) -> str:
    """An inline SVG line plot of one or more series over their index (None values are gaps)."""
    left, right, top, bottom = 56, 12, 12, 36
    values = [v for s in series.values() for v in s if v is not None and (v > 0 or not log)]
    if not values:
        return "<p>(nothing to plot)</p>"
    f = (lambda v: math.log10(v)) if log else (lambda v: v)
    lo, hi = f(min(values)), f(max(values))
    if hi == lo:
        hi = lo + 1
    n = max(len(s) for s in series.values())
    sx = lambda i: left + (width - left - right) * (i / max(n - 1, 1))  # noqa: E731
    sy = lambda v: top + (height - top - bottom) * (1 - (f(v) - lo) / (hi - lo))  # noqa: E731
    colours = ["#c0392b", "#2471a3", "#239b56", "#7d3c98"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="{escape(y_label)}">',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             'fill="none" stroke="#999"/>']
    for frac in (0.0, 0.5, 1.0):
        v = lo + frac * (hi - lo)
        label = 10**v if log else v
        y = sy(10**v if log else v)
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{label:.3g}</text>')
    for i in sorted({0, n - 1, (n - 1) // 2}):
        parts.append(f'<text x="{sx(i):.1f}" y="{height - bottom + 14}" font-size="10" text-anchor="middle">{i}</text>')
    parts.append(f'<text x="{(left + width) / 2:.0f}" y="{height - 4}" font-size="11" text-anchor="middle">'
                 f'{escape(x_label)}</text>')
    parts.append(f'<text x="12" y="{top + (height - top - bottom) / 2:.0f}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 12 {top + (height - top - bottom) / 2:.0f})">{escape(y_label)}</text>')
    for s, colour in zip(series.values(), colours):
        runs, run = [], []
        for i, v in enumerate(s):
            if v is None or (log and v <= 0):
                runs.append(run)
                run = []
            else:
                run.append(f"{sx(i):.1f},{sy(v):.1f}")
        runs.append(run)
        for r in runs:
            if len(r) > 1:
                parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(r)}"/>')
            for point in r:
                x, y = point.split(",")
                parts.append(f'<circle cx="{x}" cy="{y}" r="2.5" fill="{colour}"/>')
    for name, value in (marks or {}).items():
        if lo <= f(value) <= hi:
            y = sy(value)
            parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#888" '
                         f'stroke-dasharray="4 3"/><text x="{width - right - 4}" y="{y - 4:.1f}" font-size="10" '
                         f'text-anchor="end">{escape(name)}</text>')
    if len(series) > 1:
        for k, ((name, _), colour) in enumerate(zip(series.items(), colours)):
            parts.append(f'<text x="{left + 8}" y="{top + 14 + 13 * k}" font-size="11" fill="{colour}">'
                         f'{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)
