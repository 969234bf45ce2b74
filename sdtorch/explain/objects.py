"""Where the object of a shapes-world picture is, and how an attention map relates to it.

`object_coverage` follows steps 1-2 of `sdtorch.shapes.judge.judge` (border median as the
background, distance / contrast as coverage, the largest component of coverage > 1/2 grown by two
pixels) with the judge's own constants and helpers, returning the coverage the judge measures the
object by; None where the judge finds no object.
"""

from __future__ import annotations

import numpy as np

from sdtorch.shapes.judge import MIN_AREA, MIN_CONTRAST, _grow, largest_component


def object_coverage(image) -> np.ndarray | None:
    """(H, W) coverage in [0, 1] of the object in an (H, W, 3) uint8 picture, or None."""
    pixels = np.asarray(image).astype(np.float64)
    h, w, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    floor = np.median(np.linalg.norm(border - background, axis=-1))
    contrast = np.percentile(distance, 99.5)
    if contrast - floor < MIN_CONTRAST:
        return None
    mask = largest_component(distance > (contrast + floor) / 2)
    if mask.sum() < MIN_AREA * h * w:
        return None
    return np.clip((distance - floor) / (contrast - floor), 0, 1) * _grow(mask, 2)


def to_size(coverage: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-average an (H, W) coverage down to `size` (H and W multiples of it)."""
    h, w = size
    fh, fw = coverage.shape[0] // h, coverage.shape[1] // w
    return coverage[: h * fh, : w * fw].reshape(h, fh, w, fw).mean(axis=(1, 3))


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equal-shape arrays (nan where either is constant)."""
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def centroid(weights: np.ndarray) -> tuple[float, float]:
    """(x, y) centroid of non-negative weights, as fractions of the width and height."""
    h, w = weights.shape
    total = weights.sum()
    x = (weights.sum(0) @ (np.arange(w) + 0.5)) / total / w
    y = (weights.sum(1) @ (np.arange(h) + 0.5)) / total / h
    return float(x), float(y)


def relate(word_map: np.ndarray, coverage: np.ndarray) -> dict:
    """How a (h, w) map lies relative to the object of `coverage` (H, W): the correlation with the
    object at the map's size, the share of the map's mass on the object against the object's share
    of the area, and the offset of the map's centroid from the object's (fractions of the side)."""
    cover = to_size(coverage, word_map.shape)
    mass = word_map.sum()
    on_object = float((word_map * cover).sum() / mass) if mass > 0 else float("nan")
    mx, my = centroid(word_map) if mass > 0 else (float("nan"),) * 2
    ox, oy = centroid(coverage)
    return {"correlation": correlation(word_map, cover), "mass_on_object": on_object,
            "object_area": float(cover.mean()), "centroid_offset": float(np.hypot(mx - ox, my - oy)),
            "centroid_dx": float(mx - ox), "centroid_dy": float(my - oy)}
