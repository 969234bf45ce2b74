"""The coloured-shapes world: scenes, their pictures and their captions, from a seed.

A scene is one object (shape, colour, size, position) on a plain background of another colour.
`render` draws it anti-aliased (4x supersampled with Pillow, then a box filter down), with a
little jitter so that no two pictures of a scene are equal:

- position: the centre moves by up to +-2% of the image side in x and y (about 1.3 px at 64),
  then is clamped so that the object stays at least 1.5 px inside the image;
- size: the radius is scaled by a factor in [0.9, 1.1];
- rotation: square, triangle and star turn by up to +-15 degrees (a square never becomes a
  diamond, a triangle always points up, a star always has a tip near the top); circles do not turn.

Sizes are a base radius R as a fraction of the image side: small R = 0.13, large R = 0.22 (so with
the jitter, small is in [0.117, 0.143] and large in [0.198, 0.242]). Each shape draws itself from R:
a circle of radius 0.9 R, a square of circumradius 1.1 R, an equilateral triangle and a five-point
star (inner radius 0.45 of the outer) of circumradius 1.2 R, which gives them comparable areas
(`AREA_FACTOR` R^2). Position centres sit at 0.3, 0.5 and 0.7 of the side.

Captions are varied English (`caption`) and `parse_caption` reads back what a caption mentions.
`dataset(seed)` yields (image, caption, scene) forever or `n` times, the same for the same seed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")

# Object colours, far apart (nearest pairs: yellow/orange 81 apart in RGB, blue/purple 31 in CIELAB).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {**COLOURS, "gray": (128, 128, 128)}
"""Background colours: the object colours plus gray. A background never equals the object colour."""

SIZES: dict[str, float] = {"small": 0.13, "large": 0.22}
"""Base radius R as a fraction of the image side, before the +-10% jitter."""
SIZE_JITTER = 0.10

# (x, y) of the object's centre as fractions of the image side; y grows downwards.
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "left": (0.3, 0.5),
    "right": (0.7, 0.5),
    "top": (0.5, 0.3),
    "bottom": (0.5, 0.7),
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
}
POSITION_JITTER = 0.02  # of the image side, each axis
MAX_ROTATION = 15.0  # degrees, square / triangle / star

# Circumradius of each shape in units of the base radius R, and its area in units of R^2.
STAR_INNER = 0.45
SHAPE_RADIUS = {"circle": 0.9, "square": 1.1, "triangle": 1.2, "star": 1.2}
AREA_FACTOR = {
    "circle": math.pi * 0.9**2,  # 2.54
    "square": 2 * 1.1**2,  # 2.42
    "triangle": 3 * math.sqrt(3) / 4 * 1.2**2,  # 1.87
    "star": 5 * STAR_INNER * math.sin(math.radians(36)) * 1.2**2,  # 1.90
}

HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "star"),
    ("green", "triangle"),
    ("blue", "circle"),
    ("yellow", "square"),
)
"""(colour, shape) pairs never shown in training, to measure composition: four colours, four shapes."""

ATTRIBUTES = ("shape", "colour", "size", "position", "background")
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    background: str

    def __post_init__(self):
        for name, allowed in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES),
                              ("position", POSITIONS), ("background", BACKGROUNDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; expected one of {list(allowed)}")
        if self.colour == self.background:
            raise ValueError(f"object and background are both {self.colour}")


# --------------------------------------------------------------------------- sampling

ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)


def random_scene(rng: np.random.Generator, *, exclude_pairs: Iterable[tuple[str, str]] = HELD_OUT_PAIRS,
                 only_pairs: Iterable[tuple[str, str]] | None = None, **fixed: str) -> Scene:
    """A uniformly random scene. The (colour, shape) pair is drawn from `only_pairs` when given
    (which then overrides `exclude_pairs`), else from all 32 pairs less `exclude_pairs` (by
    default the held-out ones). Keyword arguments fix attributes (`shape="star"`, ...)."""
    unknown = set(fixed) - set(ATTRIBUTES)
    if unknown:
        raise TypeError(f"unknown attributes {sorted(unknown)}; expected some of {ATTRIBUTES}")
    excluded = {tuple(p) for p in exclude_pairs}
    pairs = list(only_pairs) if only_pairs is not None else [p for p in ALL_PAIRS if p not in excluded]
    pairs = [(c, s) for c, s in pairs
             if fixed.get("colour", c) == c and fixed.get("shape", s) == s and fixed.get("background") != c]
    if not pairs:
        raise ValueError(f"no (colour, shape) pair allowed with {fixed}")
    colour, shape = pairs[rng.integers(len(pairs))]
    size = fixed.get("size") or tuple(SIZES)[rng.integers(len(SIZES))]
    position = fixed.get("position") or tuple(POSITIONS)[rng.integers(len(POSITIONS))]
    if "background" in fixed:
        background = fixed["background"]
    else:
        choices = [b for b in BACKGROUNDS if b != colour]
        background = choices[rng.integers(len(choices))]
    return Scene(shape, colour, size, position, background)


# --------------------------------------------------------------------------- drawing

def _vertices(shape: str, radius: float, angle: float) -> np.ndarray:
    """Polygon vertices (n, 2) around the origin, image axes (y down), first tip pointing up."""
    if shape == "square":
        theta = np.radians(angle - 45.0) + np.arange(4) * (np.pi / 2)  # (-45, 45, 135, 225) deg
        r = np.full(4, radius)
    elif shape == "triangle":
        theta = np.radians(angle - 90.0) + np.arange(3) * (2 * np.pi / 3)
        r = np.full(3, radius)
    elif shape == "star":
        theta = np.radians(angle - 90.0) + np.arange(10) * (np.pi / 5)
        r = np.where(np.arange(10) % 2 == 0, radius, radius * STAR_INNER)
    else:
        raise ValueError(f"no polygon for {shape!r}")
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)


def render(scene: Scene, size: int = 64, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw `scene` as a (size, size, 3) uint8 RGB image. With `rng`, position, size and rotation
    are jittered (see the module docstring); without, the scene is drawn exactly at its nominal
    values."""
    if rng is not None:
        dx, dy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, 2)
        scale = rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
        angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION) if scene.shape != "circle" else 0.0
    else:
        dx = dy = angle = 0.0
        scale = 1.0
    radius = SIZES[scene.size] * scale * SHAPE_RADIUS[scene.shape] * size  # circumradius, pixels
    fx, fy = POSITIONS[scene.position]
    margin = radius + 1.5
    cx = min(max((fx + dx) * size, margin), size - margin)
    cy = min(max((fy + dy) * size, margin), size - margin)

    f = SUPERSAMPLE
    big = Image.new("RGB", (size * f, size * f), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(big)
    colour = COLOURS[scene.colour]
    # Pillow fills pixels by their centres at integer coordinates: shift by half a fine pixel so
    # that continuous coordinates (pixel i covers [i, i+1)) land where they should.
    if scene.shape == "circle":
        draw.ellipse([(cx - radius) * f - 0.5, (cy - radius) * f - 0.5,
                      (cx + radius) * f - 0.5, (cy + radius) * f - 0.5], fill=colour)
    else:
        points = (_vertices(scene.shape, radius, angle) + (cx, cy)) * f - 0.5
        draw.polygon([tuple(p) for p in points.tolist()], fill=colour)
    return np.asarray(big.resize((size, size), Image.Resampling.BOX))


# --------------------------------------------------------------------------- captions

_SIZE_WORDS = {"small": ("small", "small", "tiny", "little"), "large": ("large", "large", "big", "huge")}
_COLOUR_WORDS = {c: (c,) for c in BACKGROUNDS} | {"gray": ("gray", "grey")}
_POSITION_PHRASES = {
    "center": ("in the center", "in the middle", "in the centre", "at the center"),
    "left": ("on the left", "on the left side", "at the left", "to the left"),
    "right": ("on the right", "on the right side", "at the right", "to the right"),
    "top": ("at the top", "near the top", "at the top of the image"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom of the image"),
}
_TERSE_POSITIONS = {"center": ("center", "middle", "centre"), "left": ("left",), "right": ("right",),
                    "top": ("top",), "bottom": ("bottom",)}
for _v, _vv in (("top", "upper"), ("bottom", "lower")):
    for _h in ("left", "right"):
        _POSITION_PHRASES[f"{_v} {_h}"] = (f"in the {_v} {_h} corner", f"in the {_vv} {_h}",
                                           f"at the {_v} {_h}", f"in the {_v}-{_h} corner")
        _TERSE_POSITIONS[f"{_v} {_h}"] = (f"{_v} {_h}", f"{_vv} {_h}", f"{_v}-{_h}")
_PREFIXES = ("", "", "", "a picture of ", "an image of ", "a drawing of ", "there is ")
_BACKGROUND_PHRASES = ("on {} background", "on {} background", "against {} background",
                       "with {} background", ", {} background")  # {} takes 'a blue' / 'an orange'
_NO_SHAPE_NOUNS = ("shape", "object", "thing")

OMIT_PROBABILITY = {"shape": 0.05, "colour": 0.1, "size": 0.3, "position": 0.3, "background": 0.3}
"""Chance that `caption` leaves an attribute out when `omit` is not given."""


def _pick(rng: np.random.Generator, options):
    return options[rng.integers(len(options))]


def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def caption(scene: Scene, rng: np.random.Generator, omit: Iterable[str] | None = None) -> str:
    """A varied English caption of `scene`. Attributes in `omit` are not mentioned; with
    `omit=None` each is left out at random (`OMIT_PROBABILITY`). Five styles, e.g.
    'a large red circle on the left on a blue background', 'a small yellow star in the top right
    corner, gray background', 'green square, center, white background', 'a blue background with
    a purple triangle at the bottom', 'a picture of an orange circle'."""
    if omit is None:
        omit = {a for a in ATTRIBUTES if rng.random() < OMIT_PROBABILITY[a]}
    omit = set(omit)
    if not omit <= set(ATTRIBUTES):
        raise ValueError(f"unknown attributes to omit {sorted(omit - set(ATTRIBUTES))}")
    style = rng.integers(5)
    size = "" if "size" in omit else _pick(rng, _SIZE_WORDS[scene.size]) + " "
    colour = "" if "colour" in omit else _pick(rng, _COLOUR_WORDS[scene.colour]) + " "
    noun = _pick(rng, _NO_SHAPE_NOUNS) if "shape" in omit else scene.shape
    thing = size + colour + noun
    background = None if "background" in omit else _pick(rng, _COLOUR_WORDS[scene.background])
    if "position" in omit:
        position = None
    elif style == 2:
        position = _pick(rng, _TERSE_POSITIONS[scene.position])
    else:
        position = _pick(rng, _POSITION_PHRASES[scene.position])

    if style == 2:  # terse, comma separated: 'green square, center, white background'
        parts = [thing] + [position] * (position is not None)
        parts += [f"{background} background"] * (background is not None)
        return ", ".join(parts)
    if style == 3 and background is not None:  # background first
        text = f"{_with_article(background)} background with {_with_article(thing)}"
        return text + (f" {position}" if position else "")
    text = _pick(rng, _PREFIXES) + _with_article(thing) + (f" {position}" if position else "")
    if background is not None:
        phrase = ", {} background" if style == 1 else _pick(rng, _BACKGROUND_PHRASES)
        if phrase.startswith(","):
            text += phrase.format(background)
        else:
            text += " " + phrase.format(_with_article(background))
    return text


_COLOUR_LOOKUP = {w: c for c, words in _COLOUR_WORDS.items() for w in words}
_COLOUR_RE = "|".join(sorted(_COLOUR_LOOKUP, key=len, reverse=True))
_SIZE_LOOKUP = {w: s for s, words in _SIZE_WORDS.items() for w in words}
_SIZE_RE = "|".join(_SIZE_LOOKUP)
_BACKGROUND_RES = (  # a size word just before '<colour> background' describes the background
    re.compile(rf"\b(?:(?:{_SIZE_RE})\s+)?({_COLOUR_RE})\s+(?:colou?red\s+)?(?:background|backdrop)\b"),
    re.compile(rf"\b(?:background|backdrop)\s*(?:is|:|=|of|colou?r)\s*(?:a\s+)?({_COLOUR_RE})\b"),
)
_SHAPE_LOOKUP = {"circle": "circle", "circles": "circle", "disc": "circle", "disk": "circle",
                 "square": "square", "squares": "square",
                 "triangle": "triangle", "triangles": "triangle", "star": "star", "stars": "star"}


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a caption mentions, as {attribute: value} with the names of this module
    (e.g. {'shape': 'circle', 'colour': 'red', 'position': 'top left', 'background': 'gray'}).

    A keyword reader: '<colour> background' (or 'background: <colour>') names the background, the
    first other colour word the object; shape and size words anywhere; left/right combined with
    top/upper/bottom/lower name the position, center/centre/middle the centre."""
    text = text.lower().replace("-", " ")
    found: dict[str, str] = {}
    for pattern in _BACKGROUND_RES:
        m = pattern.search(text)
        if m:
            found["background"] = _COLOUR_LOOKUP[m.group(1)]
            text = text[: m.start()] + " " + text[m.end():]
            break
    words = re.findall(r"[a-z]+", text)
    for w in words:
        if "colour" not in found and w in _COLOUR_LOOKUP:
            found["colour"] = _COLOUR_LOOKUP[w]
        if "shape" not in found and w in _SHAPE_LOOKUP:
            found["shape"] = _SHAPE_LOOKUP[w]
        if "size" not in found and w in _SIZE_LOOKUP:
            found["size"] = _SIZE_LOOKUP[w]
    vocabulary = set(words)
    vertical = ("top" if vocabulary & {"top", "upper"} else
                "bottom" if vocabulary & {"bottom", "lower"} else None)
    horizontal = "left" if "left" in vocabulary else "right" if "right" in vocabulary else None
    if vertical or horizontal:
        found["position"] = " ".join(p for p in (vertical, horizontal) if p)
    elif vocabulary & {"center", "centre", "middle", "central", "centered", "centred"}:
        found["position"] = "center"
    return found


# --------------------------------------------------------------------------- datasets

def dataset(seed: int, n: int | None = None, size: int = 64, *,
            exclude_pairs: Iterable[tuple[str, str]] = HELD_OUT_PAIRS,
            only_pairs: Iterable[tuple[str, str]] | None = None) -> Iterator[tuple[np.ndarray, str, Scene]]:
    """(image uint8 (size, size, 3), caption, scene) triples, `n` of them or forever, the same for
    the same seed: one numpy PCG64 stream draws the scene, then the jitter, then the caption."""
    rng = np.random.Generator(np.random.PCG64(seed))
    exclude_pairs, only_pairs = tuple(exclude_pairs), None if only_pairs is None else tuple(only_pairs)
    i = 0
    while n is None or i < n:
        scene = random_scene(rng, exclude_pairs=exclude_pairs, only_pairs=only_pairs)
        image = render(scene, size, rng)
        yield image, caption(scene, rng), scene
        i += 1


def batch(seed: int, n: int, size: int = 64, **kwargs) -> tuple[np.ndarray, list[str], list[Scene]]:
    """The first `n` items of `dataset(seed, ...)` stacked: images (n, size, size, 3) uint8."""
    images, captions, scenes = zip(*dataset(seed, n, size, **kwargs))
    return np.stack(images), list(captions), list(scenes)
