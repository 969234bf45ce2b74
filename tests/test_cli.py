"""The `sdtorch` command, driven as a user would: a subprocess, files on disk, PNGs read back."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from oracles import randomise_
from PIL import Image

from sdtorch import cli, pipeline
from sdtorch.config import TINY
from sdtorch.loading import save_checkpoint
from sdtorch.metadata import read_png_parameters
from sdtorch.model import StableDiffusion


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdtorch.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_generate_writes_png_with_parameters_and_regenerates_from_it(checkpoint, tmp_path):
    out = tmp_path / "first.png"
    run = run_cli(
        "generate", "a red circle", "--model", checkpoint, "--negative", "blurry", "--steps", 5, "--cfg", 6,
        "--sampler", "dpmpp_2m", "--karras", "--seed", 1234, "--width", 32, "--height", 24, "--out", out,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"wrote {out} (seed 1234, 5 steps, DPM++ 2M Karras) in ")
    assert "5/5" in run.stderr  # the progress bar, with steps
    params = read_png_parameters(out)
    assert (params.prompt, params.negative_prompt, params.steps, params.cfg_scale) == ("a red circle", "blurry", 5, 6)
    assert (params.sampler, params.seed, params.width, params.height) == ("DPM++ 2M Karras", 1234, 32, 24)
    assert params.model == "tiny-model" and len(params.model_hash) == 10
    assert Image.open(out).size == (32, 24)

    again = tmp_path / "again.png"
    run = run_cli("generate", "--from-png", out, "--model", checkpoint, "--out", again, "--quiet")
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # --quiet: no progress bar
    assert again.read_bytes() == out.read_bytes()


def test_guidance_defaults_to_the_models_own(tmp_path):
    model = StableDiffusion.random(dataclasses.replace(TINY, default_cfg_scale=3.0))
    for net in model.networks().values():
        randomise_(net, seed=21)
    path = tmp_path / "tuned.safetensors"
    save_checkpoint(model, path)
    out = tmp_path / "out.png"
    run = run_cli("generate", "a cat", "--model", path, "--steps", 2, "--seed", 1, "--width", 32, "--height", 32,
                  "--out", out, "--quiet")
    assert run.returncode == 0, run.stderr
    assert read_png_parameters(out).cfg_scale == 3.0


def test_batch_and_img2img(checkpoint, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(init)
    run = run_cli(
        "generate", "a blue square", "--model", checkpoint, "--steps", 4, "--seed", 7, "--batch", 2,
        "--init-image", init, "--strength", 0.5, "--width", 32, "--height", 32, "--out", tmp_path / "b.png", "--quiet",
    )
    assert run.returncode == 0, run.stderr
    first, second = read_png_parameters(tmp_path / "b.png"), read_png_parameters(tmp_path / "b-1.png")
    assert (first.seed, second.seed) == (7, 8)
    assert first.denoising_strength == 0.5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--width", 100], "width 100 is not accepted; use a multiple of 8"),
        (["--steps", 0], "steps must be"),
        (["--sampler", "magic"], "unknown sampler 'magic'; valid samplers: ddim, pndm, lms, euler"),
        (["--init-image", "missing.png"], "does not exist"),
        (["--out", "no/such/folder/x.png"], "does not exist"),
        (["--model", "nothing.safetensors"], "no such file"),
        (["--strength", 2, "--init-image", "IMAGE"], "strength"),
    ],
)
def test_user_mistakes_give_one_line_and_no_traceback(checkpoint, tmp_path, args, message):
    image = tmp_path / "ok.png"
    Image.new("RGB", (16, 16)).save(image)
    args = [image if a == "IMAGE" else a for a in args]
    model = [] if "--model" in args else ["--model", checkpoint]
    run = run_cli("generate", "a cat", *model, "--quiet", *args, cwd=tmp_path)
    assert run.returncode == 2
    assert message in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert list(tmp_path.glob("sdtorch-*.png")) == []


def test_a_lost_embedded_model_is_one_clear_line(tmp_path, monkeypatch, capsys):
    # The shipped model is exercised in test_default_model; here an install that has lost its file.
    monkeypatch.setattr(pipeline, "EMBEDDED_MODEL", "data/default/gone.safetensors")
    out = tmp_path / "out.png"
    assert cli.main(["generate", "a red circle", "--steps", "2", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "embedded default model" in err and "--model PATH" in err, err
    assert not out.exists()


def test_save_steps_shows_noise_turning_into_the_image(checkpoint, tmp_path):
    steps_dir = tmp_path / "steps"
    out = tmp_path / "final.png"
    run = run_cli(
        "generate", "a green star", "--model", checkpoint, "--steps", 8, "--sampler", "euler", "--seed", 3,
        "--width", 32, "--height", 32, "--save-steps", steps_dir, "--out", out, "--quiet",
    )
    assert run.returncode == 0, run.stderr
    for step in range(8):
        assert (steps_dir / f"{step:03d}-latents.png").is_file()
        assert (steps_dir / f"{step:03d}-predicted.png").is_file()
    strip = Image.open(steps_dir / "strip.png")
    assert strip.width > 8 * 32 and strip.height > 2 * 32
    gif = Image.open(steps_dir / "steps.gif")
    assert gif.n_frames == 8

    final = np.asarray(Image.open(out), dtype=np.float64)
    distance = [
        np.abs(np.asarray(Image.open(steps_dir / f"{s:03d}-latents.png"), dtype=np.float64) - final).mean()
        for s in range(8)
    ]
    # The decoded latents approach the final image: far at first, nearly it at the end.
    assert distance[-1] < 0.05 * distance[0]
    assert all(later < distance[0] for later in distance[1:])
    assert sum(b <= a for a, b in zip(distance, distance[1:])) >= 6


def test_a_weighted_prompt_with_a_lora_regenerates_from_its_png(checkpoint, tmp_path):
    from oracles import kohya_lora
    from safetensors.torch import save_file

    from sdtorch.loading import load_model

    model = load_model(checkpoint)
    loras = tmp_path / "loras"
    loras.mkdir()
    save_file(kohya_lora(model.unet, model.text_encoder, conv=False), str(loras / "style.safetensors"))
    out = tmp_path / "first.png"
    run = run_cli("generate", "a (red:1.3) circle, [blue] background <lora:style:0.6>", "--model", checkpoint,
                  "--loras", loras, "--steps", 4, "--seed", 3, "--width", 32, "--height", 32, "--out", out, "--quiet")
    assert run.returncode == 0, run.stderr
    params = read_png_parameters(out)
    assert params.prompt == "a (red:1.3) circle, [blue] background <lora:style:0.6>"
    assert params.extra["Lora hashes"].startswith("style: ")
    again = tmp_path / "again.png"
    run = run_cli("generate", "--from-png", out, "--model", checkpoint, "--loras", loras, "--out", again, "--quiet")
    assert run.returncode == 0, run.stderr
    assert again.read_bytes() == out.read_bytes()

    # --lora FILE:WEIGHT is the same as writing the tag
    by_file = tmp_path / "by-file.png"
    run = run_cli("generate", "a (red:1.3) circle, [blue] background", "--model", checkpoint,
                  "--lora", f"{loras / 'style.safetensors'}:0.6", "--steps", 4, "--seed", 3, "--width", 32,
                  "--height", 32, "--out", by_file, "--quiet")
    assert run.returncode == 0, run.stderr
    assert np.array_equal(np.asarray(Image.open(by_file)), np.asarray(Image.open(out)))

    run = run_cli("generate", "a cat <lora:nothing:1>", "--model", checkpoint, "--loras", loras, "--steps", 2,
                  "--out", tmp_path / "x.png", "--quiet")
    assert run.returncode == 2 and "no LoRA named 'nothing'" in run.stderr and "Traceback" not in run.stderr


def test_python_dash_m_sdtorch_exits_with_the_cli_status():
    """`python -m sdtorch` is the `sdtorch` command: a user's mistake is one line on stderr and status 2."""
    done = subprocess.run([sys.executable, "-m", "sdtorch", "generate", "a red circle", "--width", "13"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done
    assert done.stderr.count("\n") == 1 and "width" in done.stderr and "Traceback" not in done.stderr
