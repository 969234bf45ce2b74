"""Hires fix and outpainting on the tiny model, and their A1111 records read back."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdtorch import cli
from sdtorch.errors import SdtorchError
from sdtorch.metadata import infotext, parse_parameters, read_png_parameters, request_fields
from sdtorch.pipeline import Pipeline

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return Pipeline.load(tiny_checkpoint)


def levels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("upscaler", ["latent", "latent-bicubic", "lanczos", "nearest"])
def test_hires_fix_refines_the_upscaled_first_pass(pipe, upscaler):
    import torch.nn.functional as F

    from sdtorch.hires import upscale

    settings = dict(steps=4, sampler="euler", seed=7, width=16, height=16, progress=False)
    base = pipe.generate(PROMPT, **settings)
    light = pipe.generate(PROMPT, hires_scale=2, hires_steps=20, hires_strength=0.05, hires_upscaler=upscaler,
                          **settings)  # one step, at a low noise level
    heavy = pipe.generate(PROMPT, hires_scale=2, hires_steps=5, hires_strength=0.8, hires_upscaler=upscaler, **settings)
    assert light.images[0].size == heavy.images[0].size == (32, 32) and base.images[0].size == (16, 16)
    assert light.request.width == 16  # the record keeps the base size, as A1111's
    f = pipe.model.latent_format.downscale
    if upscaler.startswith("latent"):  # an independent upscale: torch's own interpolation of the latents
        mode = "bilinear" if upscaler == "latent" else "bicubic"
        upscaled = F.interpolate(base.latents, size=(32 // f, 32 // f), mode=mode)
    else:  # decoded, resized, encoded again
        upscaled = upscale(pipe.model, base.latents, upscaler, 32, 32)
        assert upscaled.shape == (1, 4, 32 // f, 32 // f)
    near, far = (light.latents - upscaled).abs().mean().item(), (heavy.latents - upscaled).abs().mean().item()
    assert near < 0.25 * far, (near, far)  # the second pass starts from the upscaled first pass


def test_hires_record_as_a1111_writes_it_and_read_back(pipe):
    result = pipe.generate(PROMPT, steps=2, seed=1, width=16, height=16, hires_scale=1.5, hires_steps=3,
                           hires_strength=0.5, hires_upscaler="latent-bicubic", progress=False)
    assert result.images[0].size == (24, 24)
    text = infotext(result.per_image()[0])
    assert "Size: 16x16" in text and "Denoising strength: 0.5" in text
    assert "Hires upscale: 1.5, Hires steps: 3, Hires upscaler: Latent (bicubic)" in text
    fields = request_fields(parse_parameters(text))
    assert (fields["hires_scale"], fields["hires_steps"], fields["hires_strength"], fields["hires_upscaler"]) == (
        1.5, 3, 0.5, "latent-bicubic")
    assert "strength" not in fields and "Hires upscale" not in fields.get("options", {})
    # An A1111 record's hires fix stays what it was (said as not applied by --from-png): options.
    a1111 = request_fields(parse_parameters("x\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, "
                                            "Denoising strength: 0.7, Hires upscale: 2, Hires upscaler: Latent"))
    assert "hires_scale" not in a1111 and a1111["options"]["Hires upscale"] == "2"


@pytest.mark.parametrize("settings, message", [
    (dict(hires_scale=1.0), "hires scale must be a number above 1"),
    (dict(hires_scale=2, hires_upscaler="esrgan"), "unknown hires upscaler 'esrgan'"),
    (dict(hires_scale=2, hires_strength=0.01), "the hires pass runs no step"),
    (dict(hires_scale=2, init_image=Image.new("RGB", (16, 16))), "text-to-image only"),
    (dict(outpaint=(0, 12, 0, 0), init_image=Image.new("RGB", (16, 16))), "multiples of 8"),
    (dict(outpaint=(0, 16, 0, 0)), "needs the picture to extend"),
])
def test_bad_hires_and_outpaint_settings_are_one_line_errors(pipe, settings, message):
    with pytest.raises(SdtorchError, match=message):
        pipe.generate(PROMPT, steps=2, seed=1, progress=False, **settings)


def test_outpainting_keeps_the_picture_and_paints_the_new_strip(pipe, tmp_path):
    y, x = np.mgrid[0:32, 0:32] / 32
    picture = Image.fromarray((np.stack([x, y, 0.5 + 0 * x], axis=-1) * 255).astype(np.uint8))
    result = pipe.generate(PROMPT, steps=3, seed=2, init_image=picture, outpaint=(0, 16, 8, 0), strength=1.0,
                           progress=False)
    out = levels(result.images[0])
    assert result.images[0].size == (48, 40)
    assert np.array_equal(out[8:, :32], levels(picture))  # the original area, exactly
    edge = np.repeat(levels(picture)[:, -1:], 16, axis=1)  # what the new strip started from (edge colours)
    assert np.abs(out[8:, 32:] - edge).mean() > 2  # painted, not just the edge colours left
    text = infotext(result.per_image()[0])
    assert "Outpaint: \"0,16,8,0\"" in text and "Mask blur: 4" in text  # quoted: it holds commas
    # The command line, and --from-png of its own record.
    picture.save(tmp_path / "in.png")
    out_png = tmp_path / "out.png"
    assert cli.main(["generate", PROMPT, "--model", str(pipe.model_path), "--init-image", str(tmp_path / "in.png"),
                     "--outpaint", "0,16,8,0", "--strength", "1", "--steps", "3", "--seed", "2", "--quiet",
                     "--out", str(out_png)]) == 0
    assert np.array_equal(levels(Image.open(out_png)), out)
    assert read_png_parameters(out_png).extra["Outpaint"] == "0,16,8,0"


@pytest.mark.parametrize("base, resize, upscaled, final", [
    ((16, 16), (40, None), (40, 40), (40, 40)),  # a width alone: the height follows the aspect ratio
    ((24, 16), (None, 32), (48, 32), (48, 32)),  # a height alone
    ((16, 16), (48, 32), (48, 48), (48, 32)),  # both, wider than the picture: cover the width, crop the height
    ((16, 24), (32, 32), (32, 48), (32, 32)),
    ((24, 16), (32, 32), (48, 32), (32, 32)),  # taller than the picture: cover the height, crop the width
])
def test_hires_target_as_a1111_computes_it(base, resize, upscaled, final):
    from sdtorch.hires import hires_target
    from sdtorch.request import GenerationRequest

    request = GenerationRequest(width=base[0], height=base[1], hires_width=resize[0], hires_height=resize[1])
    assert request.hires and hires_target(request) == (upscaled, final)
    assert hires_target(GenerationRequest(width=16, height=24, hires_scale=1.5)) == ((24, 36 // 8 * 8),) * 2


def test_hires_to_a_width_and_height_crops_the_centre_and_is_recorded_as_a1111(pipe):
    import torch.nn.functional as F

    settings = dict(steps=3, sampler="euler", seed=5, width=16, height=16, hires_steps=20, hires_strength=0.05,
                    progress=False)
    both = pipe.generate(PROMPT, hires_width=48, hires_height=32, **settings)  # upscaled to 48x48, cropped
    assert both.images[0].size == (48, 32) and both.request.width == 16
    f = pipe.model.latent_format.downscale
    base = pipe.generate(PROMPT, **{k: v for k, v in settings.items() if not k.startswith("hires")})
    covered = F.interpolate(base.latents, size=(48 // f, 48 // f), mode="bilinear")
    top = (48 // f - 32 // f) // 2
    centre, shifted = covered[:, :, top:top + 32 // f], covered[:, :, :32 // f]
    near = (both.latents - centre).abs().mean().item()
    assert near < 0.25 * (both.latents - shifted).abs().mean().item(), near  # the centre, not the top

    text = infotext(both.per_image()[0])
    assert "Hires resize: 48x32" in text and "Hires upscale:" not in text
    fields = request_fields(parse_parameters(text))
    assert (fields["hires_width"], fields["hires_height"], fields.get("hires_scale")) == (48, 32, None)
    one = pipe.generate(PROMPT, hires_width=40, **settings)
    assert one.images[0].size == (40, 40)
    assert "Hires resize: 40x0" in infotext(one.per_image()[0])
    fields = request_fields(parse_parameters(infotext(one.per_image()[0])))
    assert (fields["hires_width"], fields["hires_height"]) == (40, None)


@pytest.mark.parametrize("settings, message", [
    (dict(hires_width=44), "hires width 44 is not accepted"),
    (dict(hires_scale=2, hires_height=32), "a scale or a width/height"),
    (dict(width=512, height=16, hires_width=64), "too small"),
    (dict(hires_width=16384, hires_height=16384, batch=2), "too large for one image"),
])
def test_bad_hires_sizes_are_one_line_errors(pipe, settings, message):
    with pytest.raises(SdtorchError, match=message):
        pipe.generate(PROMPT, **{"steps": 2, "seed": 1, "progress": False} | settings)


def test_cli_hires_width_and_from_png_with_a_scale_on_top(pipe, tmp_path):
    out = tmp_path / "hires.png"
    common = ["--model", str(pipe.model_path), "--steps", "2", "--seed", "3", "--width", "16", "--height", "16",
              "--quiet"]
    assert cli.main(["generate", PROMPT, *common, "--hires-width", "32", "--hires-height", "24", "--hires-strength",
                     "0.5", "--out", str(out)]) == 0
    assert Image.open(out).size == (32, 24)
    assert read_png_parameters(out).extra["Hires resize"] == "32x24"
    again = tmp_path / "again.png"
    assert cli.main(["generate", "--from-png", str(out), *common, "--out", str(again)]) == 0
    assert np.array_equal(levels(Image.open(again)), levels(Image.open(out)))
    scaled = tmp_path / "scaled.png"  # a scale given beside the record replaces its resize
    assert cli.main(["generate", "--from-png", str(out), *common, "--hires-scale", "2", "--out", str(scaled)]) == 0
    assert Image.open(scaled).size == (32, 32) and read_png_parameters(scaled).extra["Hires upscale"] == "2"
