"""A synthetic world of coloured shapes (pictures and captions from a seed) and a judge that reads
the pictures back without any learned network: data to train the embedded model on, and a way to
score what it draws."""

from .judge import Verdict, judge
from .world import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    batch,
    caption,
    dataset,
    parse_caption,
    random_scene,
    render,
)

__all__ = [
    "ATTRIBUTES", "BACKGROUNDS", "COLOURS", "HELD_OUT_PAIRS", "POSITIONS", "SHAPES", "SIZES",
    "Scene", "Verdict", "batch", "caption", "dataset", "judge", "parse_caption", "random_scene", "render",
]
