"""The embedded shapes model, as shipped: loaded by the normal loader, run by the normal pipeline,
scored by the judge. The thresholds sit well under what the model scores (see the figures in
`python -m sdtorch.shapes.evaluate`) yet far above what a broken tokenizer, sampler, guidance, VAE or
loader gives (a wrong scale factor or fp16 mix-up yields no readable object; a broken tokenizer or
text encoder loses the colours; broken guidance loses the gap to CFG 1.0)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdtorch.loading.reader import open_tensors
from sdtorch.pipeline import Pipeline, default_model_path
from sdtorch.shapes.evaluate import evaluate, evaluate_img2img
from sdtorch.shapes.judge import judge

MODEL = default_model_path()  # shipped in the package: a build without it fails here

N = 48
N_I2I = 24
SEED = 424_242  # not the evaluation command's seed, nor any training stream's


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(MODEL, device="cpu")  # fp16 file, fp32 on the CPU


@pytest.fixture(scope="module")
def scores(pipe):
    return evaluate(pipe, n=N, seed=SEED)


def test_file_is_an_sd_single_file_checkpoint(pipe):
    assert MODEL.stat().st_size <= 30 * 2**20
    names = set(open_tensors(MODEL).tensors)
    for prefix in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."):
        assert any(n.startswith(prefix) for n in names), prefix
    config = pipe.model.config
    assert config.image_size == 64 and config.text.vocab_size == 49408
    assert 0.05 < config.vae.scaling_factor < 5 and config.vae.scaling_factor != 0.18215


# On this set the shipped model scores shape 1.0, colour 0.97, background 0.96, position 1.0,
# all 0.98 at its own guidance (4), all 0.81 at CFG 1.0; chance is 1/4 for shape, about 1/8 for
# the colours.
THRESHOLDS = {"shape": 0.75, "colour": 0.7, "background": 0.8, "position": 0.9, "all": 0.6}


def test_judge_accepts_what_it_draws(scores):
    for attribute, least in THRESHOLDS.items():
        assert scores[attribute] >= least, (attribute, scores)


def test_guidance_raises_accuracy(pipe, scores):
    # Unguided, the model gets the shape or the colour wrong more often (0.81 against 0.98).
    assert pipe.model.config.default_cfg_scale > 1
    unguided = evaluate(pipe, n=N, seed=SEED, cfg_scale=1.0)
    assert unguided["all"] <= scores["all"] - 0.1, (unguided, scores)


def test_img2img_recolours_in_place(pipe):
    # Same scene, another object colour, strength 0.6: here new colour 0.92, position kept 1.0. An
    # img2img that kept too much of the init picture (as at strength 0.1: colour 0.29) or ignored the
    # new prompt keeps the old colour.
    edits = evaluate_img2img(pipe, n=N_I2I, seed=SEED)
    assert edits["colour"] >= 0.6 and edits["position"] >= 0.8, edits


def test_cli_default_model_draws_the_prompt(tmp_path):
    out = tmp_path / "circle.png"
    run = subprocess.run(
        [sys.executable, "-m", "sdtorch.cli", "generate", "a red circle on a blue background", "--seed", "1",
         "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    image = Image.open(out)
    assert image.size == (64, 64)
    verdict = judge(np.asarray(image.convert("RGB")))
    assert (verdict.shape, verdict.colour, verdict.background) == ("circle", "red", "blue"), verdict
