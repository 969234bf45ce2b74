"""Inpainting: an inpainting model (9-channel UNet) against diffusers' StableDiffusionInpaintPipeline on the same
random weights, and any model's blending, masks, masked content, inpaint area and final composite."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles import make_diffusers_folder, make_inpaint_diffusers_folder, reference_tokenizer
from PIL import Image, ImageFilter, ImageOps

from sdtorch import cli
from sdtorch.errors import SdtorchError
from sdtorch.inpaint import crop_region, is_inpainting_model, mask_of
from sdtorch.loading import load_model
from sdtorch.pipeline import Pipeline

PROMPT = "a red circle"
SIZE = 32


def picture(size: int = SIZE) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def square_mask(size: int = SIZE, box=(8, 8, 24, 20)) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, box)
    return mask


def levels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def nine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-inpaint")
    unet, vae, text = make_inpaint_diffusers_folder(folder)
    components = dict(unet=unet, vae=vae, text_encoder=text, tokenizer=reference_tokenizer(folder / "tokenizer"))
    return Pipeline(load_model(folder)), components


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-four")
    make_diffusers_folder(folder)
    return Pipeline(load_model(folder))


@pytest.mark.parametrize("sampler, strength", [("euler", 1.0), ("euler_a", 0.6)])
def test_inpainting_model_matches_diffusers_inpaint_pipeline(nine, sampler, strength):
    import diffusers

    ours, components = nine
    assert is_inpainting_model(ours.model) and ours.model.config.unet.in_channels == 9
    init, mask = picture(), square_mask()
    steps, seed = 6, 11
    result = ours.generate(PROMPT, negative_prompt="blurry", sampler=sampler, steps=steps, cfg_scale=6.0, seed=seed,
                           init_image=init, mask=mask, mask_blur=0, strength=strength, progress=False)
    scheduler = {"euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler"}[sampler]
    from test_pipeline import SD_SCHEDULER

    ref = diffusers.StableDiffusionInpaintPipeline(
        **components, scheduler=getattr(diffusers, scheduler).from_config(SD_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    expected = ref(PROMPT, negative_prompt="blurry", image=init, mask_image=mask, num_inference_steps=steps,
                   guidance_scale=6.0, strength=strength, height=SIZE, width=SIZE,
                   generator=[torch.Generator().manual_seed(seed)]).images[0]
    inside = np.asarray(mask) > 127
    difference = np.abs(levels(result.images[0]) - levels(expected))
    assert difference[inside].max() <= 2
    # diffusers leaves the unmasked area as the VAE decodes it; we composite the input back over it.
    assert np.array_equal(levels(result.images[0])[~inside], levels(init)[~inside])
    assert np.abs(levels(expected)[~inside] - levels(init)[~inside]).max() > 2  # so that the last line tells


def test_any_model_keeps_the_unmasked_latents_and_pixels(four):
    init, mask = picture(), square_mask()
    settings = dict(sampler="euler", steps=5, cfg_scale=5.0, seed=3, init_image=init, strength=0.8, progress=False)
    result = four.generate(PROMPT, mask=mask, mask_blur=2, **settings)
    plain = four.generate(PROMPT, **settings)  # image-to-image: the same start, no mask
    # The kept latent pixels end on the init latents (drawn as image-to-image draws them: same generator).
    model = four.model
    from sdtorch.images import prepare_init_image

    init_latents = model.encode_images(prepare_init_image(init), [torch.Generator().manual_seed(3)])
    f = model.latent_format.downscale
    blurred = mask.filter(ImageFilter.GaussianBlur(2))
    small = np.around(np.asarray(blurred.resize((SIZE // f, SIZE // f), Image.Resampling.BICUBIC)) / 255.0)
    keep = torch.from_numpy(small == 0)
    assert (result.latents[0][:, keep] - init_latents[0][:, keep]).abs().max() < 1e-5  # Euler's last step: rounding
    assert (plain.latents[0][:, keep] - init_latents[0][:, keep]).abs().max() > 1e-2
    assert (result.latents[0][:, ~keep] - plain.latents[0][:, ~keep]).abs().max() > 1e-3  # blending changed them
    # Pixels: outside the blurred mask exactly the input; inside, the generation shows.
    outside = np.asarray(blurred) == 0
    out = levels(result.images[0])
    assert np.array_equal(out[outside], levels(init)[outside])
    inside = np.asarray(mask) > 127
    assert np.abs(out[inside] - levels(init)[inside]).mean() > 3


def test_masks_rgba_alpha_and_invert_mean_the_same_thing(four):
    white = square_mask()
    rgba = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    rgba.paste((10, 20, 30, 255), (8, 8, 24, 20))  # opaque strokes where to repaint, as a painted mask
    assert np.array_equal(np.asarray(mask_of(rgba)), np.asarray(white))
    assert np.array_equal(np.asarray(mask_of(ImageOps.invert(white), invert=True)), np.asarray(white))
    assert np.array_equal(np.asarray(mask_of(white.convert("RGBA"))), np.asarray(white))  # opaque RGBA: its grey
    settings = dict(steps=3, seed=5, init_image=picture(), progress=False)
    a = four.generate(PROMPT, mask=white, **settings)
    b = four.generate(PROMPT, mask=rgba, **settings)
    c = four.generate(PROMPT, mask=ImageOps.invert(white), invert_mask=True, **settings)
    assert a.images[0].tobytes() == b.images[0].tobytes() == c.images[0].tobytes()


@pytest.mark.parametrize("content, sampler", [("fill", "euler_a"), ("original", "ddim"), ("latent_noise", "euler"),
                                             ("latent_nothing", "dpmpp_2m")])
def test_every_masked_content_keeps_the_outside(four, content, sampler):
    init, mask = picture(), square_mask()
    result = four.generate(PROMPT, steps=3, seed=2, init_image=init, mask=mask, mask_blur=0, masked_content=content,
                           strength=1.0, sampler=sampler, progress=False)
    inside = np.asarray(mask) > 127
    assert np.array_equal(levels(result.images[0])[~inside], levels(init)[~inside])
    assert result.request.masked_content == content


def test_fill_paints_the_masked_area_with_the_colours_around_it():
    from sdtorch.inpaint import fill

    image = Image.new("RGB", (32, 32), (200, 40, 40))
    image.paste((0, 255, 0), (8, 8, 24, 24))  # what the mask hides
    filled = np.asarray(fill(image, square_mask(box=(8, 8, 24, 24))), dtype=np.int16)
    assert np.abs(filled - np.array([200, 40, 40])).max() <= 8  # the green is gone, the red flows in (8-bit
    # premultiplied blurs round)


def test_only_masked_works_on_the_padded_box_at_full_size_and_pastes_back(four):
    assert crop_region(square_mask(64, (30, 10, 34, 14)), 4, 32, 32) == (26, 6, 38, 18)
    assert crop_region(square_mask(64, (30, 10, 34, 14)), 4, 32, 16) == (20, 6, 44, 18)  # widened to 2:1
    assert crop_region(square_mask(64, (0, 0, 4, 40)), 0, 32, 32) == (0, 0, 40, 40)  # grown inside the picture
    init = picture(64)
    mask = square_mask(64, (36, 36, 52, 52))
    whole = four.generate(PROMPT, steps=3, seed=4, init_image=init, mask=mask, mask_blur=0, progress=False)
    masked = four.generate(PROMPT, steps=3, seed=4, init_image=init, mask=mask, mask_blur=0, inpaint_area="masked",
                           inpaint_padding=4, progress=False)
    assert masked.images[0].size == (64, 64)
    inside = np.asarray(mask) > 127
    assert np.array_equal(levels(masked.images[0])[~inside], levels(init)[~inside])
    assert masked.latents.shape == whole.latents.shape  # the 24x24 box generated at 64x64
    assert np.abs(levels(masked.images[0])[inside] - levels(whole.images[0])[inside]).mean() > 1


@pytest.mark.parametrize("settings, message", [
    (dict(mask=square_mask()), "a mask needs the picture"),
    (dict(mask=square_mask(), init_image=picture(), masked_content="noise"), "unknown masked content 'noise'"),
    (dict(mask=square_mask(), init_image=picture(), inpaint_area="all"), "unknown inpaint area 'all'"),
    (dict(mask=square_mask(), init_image=picture(), mask_blur=-1), "mask blur must be a whole number"),
    (dict(mask=square_mask(), init_image=picture(), compat="a1111"), "diffusers mode only"),
    (dict(mask=Image.new("L", (SIZE, SIZE)), init_image=picture(), inpaint_area="masked"), "the mask is empty"),
])
def test_bad_inpaint_settings_are_one_line_errors(four, settings, message):
    with pytest.raises(SdtorchError, match=message):
        four.generate(PROMPT, steps=2, seed=1, progress=False, **settings)


def test_generate_inpaints_from_the_command_line(tiny_checkpoint, tmp_path):
    picture().save(tmp_path / "in.png")
    square_mask().save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert cli.main(["generate", PROMPT, "--model", str(tiny_checkpoint), "--init-image", str(tmp_path / "in.png"),
                     "--mask", str(tmp_path / "mask.png"), "--mask-blur", "0", "--masked-content", "fill",
                     "--steps", "2", "--seed", "1", "--quiet", "--out", str(out)]) == 0
    inside = np.asarray(square_mask()) > 127
    assert np.array_equal(levels(Image.open(out).convert("RGB"))[~inside], levels(picture())[~inside])


def test_an_inpainting_model_draws_without_a_mask_too(nine):
    ours, _ = nine
    txt2img = ours.generate(PROMPT, steps=2, seed=1, width=SIZE, height=SIZE, progress=False)
    img2img = ours.generate(PROMPT, steps=2, seed=1, init_image=picture(), strength=1.0, progress=False)
    assert txt2img.images[0].size == img2img.images[0].size == (SIZE, SIZE)
    # Without a mask all of the picture is repainted: nothing of the input is pasted back.
    assert np.abs(levels(img2img.images[0]) - levels(picture())).mean() > 3


def test_the_inpaint_settings_are_recorded_and_read_back():
    from sdtorch.metadata import infotext, parse_parameters, request_fields
    from sdtorch.request import GenerationRequest

    request = GenerationRequest(prompt=PROMPT, seed=1, width=SIZE, height=SIZE, cfg_scale=7.0, init_image=picture(),
                                mask=square_mask(), mask_blur=6, inpaint_area="masked", inpaint_padding=16,
                                masked_content="latent_noise", invert_mask=True, strength=0.5)
    text = infotext(request)
    assert ("Mask blur: 6, Inpaint area: Only masked, Masked area padding: 16, Masked content: latent noise, "
            "Mask mode: Inpaint not masked") in text
    fields = request_fields(parse_parameters(text))
    assert {k: fields[k] for k in ("mask_blur", "inpaint_area", "inpaint_padding", "masked_content", "invert_mask",
                                   "strength")} == dict(mask_blur=6, inpaint_area="masked", inpaint_padding=16,
                                                        masked_content="latent_noise", invert_mask=True, strength=0.5)
    assert "options" not in fields or not any(k.startswith("Mask") for k in fields["options"])
    assert "Mask" not in infotext(request.replace(mask=None, init_image=None))
