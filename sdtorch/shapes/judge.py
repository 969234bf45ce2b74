"""Read a coloured-shapes picture back: background, object colour, shape, size and position.

No learned network, only colour and geometry, so that it can score any image, generated ones
included (blurred edges, shifted colours, noise, an uneven background):

1. background: the median colour of the one-pixel border, named by the nearest palette colour in
   CIELAB;
2. object: each pixel's RGB distance from that median. An anti-aliased edge pixel is the blend
   alpha * object + (1 - alpha) * background, whose distance is alpha times the full contrast, so
   with the contrast taken as a high percentile of the distances (less the border's noise floor),
   distance / contrast is the coverage alpha. The object is the largest 4-connected component of
   alpha > 1/2; its coverage is alpha on that component grown by two pixels;
3. object colour: the median of the component's core (pixels at least 3/4 of the contrast away
   from the background, not the blended edge), nearest object colour in CIELAB;
4. position: the coverage-weighted centroid, cut into a 3x3 grid at 0.4 and 0.6 of the side (the
   generator's centres sit at 0.3, 0.5 and 0.7);
5. shape: the radial profile r(theta) from the centroid (`radial_profile`, 72 rays) and the
   strength of its 3rd, 4th and 5th harmonics (`harmonics`): a triangle's profile repeats every
   120 degrees, a square's every 90, a star's every 72, a circle's is flat. Each strength is
   divided by its value for the perfect shape (triangle 0.28, square 0.14, star 0.31, measured
   on the generator's shapes); the largest wins when it is above 0.3, else it is a circle. This
   counts corners without finding them, is blind to rotation and barely moved by blur;
6. size: the equivalent base radius sqrt(area / AREA_FACTOR[shape]), area = the summed coverage,
   against the geometric mean of the generator's largest small and smallest large radius.

Fields that cannot be decided (nothing stands out from the background) are None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .world import AREA_FACTOR, BACKGROUNDS, COLOURS, SIZE_JITTER, SIZES

MIN_CONTRAST = 40.0  # RGB distance under which nothing stands out from the background
MIN_AREA = 0.003  # of the image: smaller components are specks, not objects
POSITION_CUTS = (0.4, 0.6)
SIZE_THRESHOLD = math.sqrt(SIZES["small"] * (1 + SIZE_JITTER) * SIZES["large"] * (1 - SIZE_JITTER))
# Harmonic of the radial profile that marks each polygon, and its strength for the perfect shape.
SHAPE_HARMONICS = {"triangle": (3, 0.28), "square": (4, 0.14), "star": (5, 0.31)}
MIN_HARMONIC = 0.3  # of the perfect shape's strength; below it for all three: a circle
RAYS = 72
RAY_STEP = 0.5  # pixels


@dataclass(frozen=True)
class Verdict:
    background: str | None
    colour: str | None
    shape: str | None
    size: str | None
    position: str | None


# --------------------------------------------------------------------------- colour

def _lab(rgb) -> np.ndarray:
    """sRGB (..., 3) in 0..255 to CIELAB (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = c @ np.array([[0.4124, 0.2126, 0.0193], [0.3576, 0.7152, 0.1192], [0.1805, 0.0722, 0.9505]])
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_PALETTE_NAMES = tuple(BACKGROUNDS)
_PALETTE_LAB = _lab([BACKGROUNDS[n] for n in _PALETTE_NAMES])


def nearest_colour(rgb, allowed=_PALETTE_NAMES) -> str:
    """The palette colour (among the `allowed` names) nearest to `rgb` in CIELAB."""
    distances = np.linalg.norm(_PALETTE_LAB - _lab(rgb), axis=-1)
    return min((d, n) for d, n in zip(distances.tolist(), _PALETTE_NAMES) if n in allowed)[1]


# --------------------------------------------------------------------------- masks

def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask, by min-label propagation with pointer
    jumping: every pixel takes the smallest label among itself and its neighbours, then the label
    that label's pixel holds, until nothing changes."""
    if not mask.any():
        return mask
    h, w = mask.shape
    none = h * w
    labels = np.where(mask, np.arange(none).reshape(h, w), none)
    while True:
        p = np.pad(labels, 1, constant_values=none)
        new = np.minimum.reduce([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        new = np.where(mask, new, none)
        flat = np.append(new.ravel(), none)
        new = flat[flat[new]]  # two hops along the chain of labels
        if np.array_equal(new, labels):
            break
        labels = new
    return labels == np.bincount(labels[mask]).argmax()


def _grow(mask: np.ndarray, steps: int) -> np.ndarray:
    """Dilate a boolean mask by `steps` pixels (4-neighbourhood)."""
    for _ in range(steps):
        p = np.pad(mask, 1)
        mask = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return mask


# --------------------------------------------------------------------------- shape

def radial_profile(alpha: np.ndarray, cx: float, cy: float) -> np.ndarray:
    """r(theta) for RAYS directions from (cx, cy) (pixel units; pixel i covers [i, i+1)): the
    integral of the bilinearly interpolated coverage along each ray. For a shape that is
    star-convex from that centre it is the distance to the boundary, to a fraction of a pixel."""
    h, w = alpha.shape
    theta = np.arange(RAYS) * (2 * np.pi / RAYS)
    t = np.arange(RAY_STEP / 2, max(h, w), RAY_STEP)
    x = cx - 0.5 + np.cos(theta)[:, None] * t  # (RAYS, T), in index coordinates
    y = cy - 0.5 + np.sin(theta)[:, None] * t
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    padded = np.pad(alpha, 1)  # index i of alpha is i + 1 here; the ring reads as zero
    x0, x1 = np.clip(x0 + 1, 0, w + 1), np.clip(x0 + 2, 0, w + 1)
    y0, y1 = np.clip(y0 + 1, 0, h + 1), np.clip(y0 + 2, 0, h + 1)
    value = (padded[y0, x0] * (1 - fx) * (1 - fy) + padded[y0, x1] * fx * (1 - fy)
             + padded[y1, x0] * (1 - fx) * fy + padded[y1, x1] * fx * fy)
    return value.sum(1) * RAY_STEP  # (RAYS,)


def harmonics(profile: np.ndarray) -> np.ndarray:
    """Strength of each harmonic k of a radial profile: 2 |c_k| / c_0 (k = 0 .. RAYS / 2)."""
    spectrum = np.abs(np.fft.rfft(profile))
    return 2 * spectrum / spectrum[0]


def classify_shape(strengths: np.ndarray) -> str:
    """circle / square / triangle / star from `harmonics` of the radial profile."""
    score = {s: strengths[k] / perfect for s, (k, perfect) in SHAPE_HARMONICS.items()}
    best = max(score, key=score.get)
    return best if score[best] >= MIN_HARMONIC else "circle"


# --------------------------------------------------------------------------- the judge

def judge(image: np.ndarray) -> Verdict:
    """What an (H, W, 3) uint8 RGB picture shows, in this world's words (see the module docstring)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 8:
        raise ValueError(f"expected an (H, W, 3) RGB image of at least 8x8, got shape {image.shape}")
    pixels = image.astype(np.float64)
    h, w, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background_rgb = np.median(border, axis=0)
    background = nearest_colour(background_rgb)
    nothing = Verdict(background, None, None, None, None)

    distance = np.linalg.norm(pixels - background_rgb, axis=-1)  # (H, W)
    floor = np.median(np.linalg.norm(border - background_rgb, axis=-1))  # the background's own noise
    contrast = np.percentile(distance, 99.5)
    if contrast - floor < MIN_CONTRAST:
        return nothing
    mask = largest_component(distance > (contrast + floor) / 2)
    if mask.sum() < MIN_AREA * h * w:
        return nothing
    alpha = np.clip((distance - floor) / (contrast - floor), 0, 1) * _grow(mask, 2)  # coverage

    inside = distance[mask]
    core = pixels[mask][inside >= 0.75 * np.percentile(inside, 95)]  # away from the blended edge
    colour = nearest_colour(np.median(core, axis=0), [c for c in COLOURS if c != background])

    area = alpha.sum()
    cx = (alpha.sum(0) @ (np.arange(w) + 0.5)) / area
    cy = (alpha.sum(1) @ (np.arange(h) + 0.5)) / area
    column = ("left", None, "right")[int(np.searchsorted(POSITION_CUTS, cx / w))]
    row = ("top", None, "bottom")[int(np.searchsorted(POSITION_CUTS, cy / h))]
    position = " ".join(p for p in (row, column) if p) or "center"

    shape = classify_shape(harmonics(radial_profile(alpha, cx, cy)))
    radius = math.sqrt(area / (h * w) / AREA_FACTOR[shape])
    size = "large" if radius > SIZE_THRESHOLD else "small"
    return Verdict(background, colour, shape, size, position)
