"""Inpainting, outpainting and the hires fix on the embedded shapes model, judged: a small sample of what
`python -m sdtorch.shapes.edits` measures over 100 pictures each (README, "Inpainting, hires fix, VAE and
TAESD"), on seeds of its own. The thresholds sit under the measured figures yet above what a broken mask,
blend, composite, outpaint canvas or hires pass gives: an inverted or ignored mask leaves the old colour (or
changes the outside), a composite that is not exact shows outside the blur band, a hires pass that does not
start from the upscaled first pass loses the object's place."""

from __future__ import annotations

import pytest

from sdtorch.pipeline import Pipeline, default_model_path
from sdtorch.shapes.edits import (
    HIRES_SEED,
    INPAINT_SEED,
    OUTPAINT_SEED,
    evaluate_hires,
    evaluate_inpaint,
    evaluate_outpaint,
)

OFFSET = 5_000_000  # neither the measurement's seeds (offset 0) nor those its settings were chosen on (1e6)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(default_model_path(), device="cpu")


def test_inpainting_repaints_the_object_and_keeps_every_pixel_outside_the_mask(pipe):
    result = evaluate_inpaint(pipe, n=12, seed=INPAINT_SEED + OFFSET)
    assert result["outside_max_diff"] == 0 and result["outside_share"] > 0.3, result
    assert result["colour"] >= 8 / 12, result  # measured over 100: see the README
    assert result["shape"] >= 9 / 12, result


def test_outpainting_keeps_the_picture_and_continues_the_background(pipe):
    result = evaluate_outpaint(pipe, n=6, seed=OUTPAINT_SEED + OFFSET)
    assert result["unchanged"] == 1.0, result
    assert result["background"] >= 5 / 6, result


def test_hires_fix_keeps_shape_colour_and_position(pipe):
    result = evaluate_hires(pipe, n=6, seed=HIRES_SEED + OFFSET)
    assert result["kept"] >= 4 / 6, result
