"""Text-to-image and image-to-image against diffusers' pipelines built from the same weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SCHEDULER_CONFIG, make_diffusers_folder, reference_tokenizer, sd15_reference_components
from PIL import Image

from sdtorch.errors import SdtorchError
from sdtorch.loading import load_model
from sdtorch.pipeline import Pipeline

DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
}
PROMPT, NEGATIVE = "a large red circle on the left on a blue background", "blurry"


def reference_scheduler(name: str):
    import diffusers

    cls_name, options = DIFFUSERS_SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(json.loads(SCHEDULER_CONFIG.read_text()), **options)


def max_level_difference(ours: list[Image.Image], theirs: list[Image.Image]) -> int:
    assert len(ours) == len(theirs)
    return max(
        int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max()) for a, b in zip(ours, theirs)
    )


def init_picture(size: int) -> Image.Image:
    """A smooth, non-trivial picture to start image-to-image from."""
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Our pipeline and diffusers' components, from one tiny diffusers folder."""
    folder = tmp_path_factory.mktemp("tiny-pipeline")
    unet, vae, text = make_diffusers_folder(folder)
    components = dict(unet=unet, vae=vae, text_encoder=text, tokenizer=reference_tokenizer(folder / "tokenizer"))
    return Pipeline(load_model(folder)), components


def diffusers_pipeline(components: dict, sampler: str, img2img: bool = False):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    pipe = cls(
        **components,
        scheduler=reference_scheduler(sampler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_both(ours: Pipeline, components: dict, sampler: str, size: int, seed: int, batch: int, **kw):
    init = kw.pop("init_image", None)
    result = ours.generate(
        PROMPT,
        negative_prompt=NEGATIVE,
        sampler=sampler,
        seed=seed,
        width=size,
        height=size,
        batch=batch,
        init_image=init,
        progress=False,
        **kw,
    )
    ref = diffusers_pipeline(components, sampler, img2img=init is not None)
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
    extra = {"image": init, "strength": kw["strength"]} if init is not None else {"height": size, "width": size}
    expected = ref(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=kw["steps"],
        guidance_scale=kw["cfg_scale"],
        num_images_per_prompt=batch,
        generator=generators,
        **extra,
    ).images
    return result, expected


@pytest.mark.parametrize("sampler", list(DIFFUSERS_SCHEDULERS))
def test_txt2img_matches_diffusers_tiny(tiny, sampler):
    ours, components = tiny
    result, expected = run_both(ours, components, sampler, size=32, seed=42, batch=2, steps=12, cfg_scale=7.5)
    assert result.seeds == [42, 43]
    assert max_level_difference(result.images, expected) <= 2


@pytest.mark.parametrize("sampler", ["ddim", "pndm", "euler", "dpmpp_2m"])
def test_img2img_matches_diffusers_tiny(tiny, sampler):
    ours, components = tiny
    result, expected = run_both(
        ours, components, sampler, size=32, seed=7, batch=2, steps=10, cfg_scale=6.0,
        init_image=init_picture(32), strength=0.6,
    )
    assert result.params[0].denoising_strength == 0.6
    assert max_level_difference(result.images, expected) <= 2


def test_guidance_scale_one_runs_the_conditional_branch_only(tiny):
    ours, components = tiny
    result, expected = run_both(ours, components, "euler", size=32, seed=3, batch=1, steps=8, cfg_scale=1.0)
    assert max_level_difference(result.images, expected) <= 2


def test_image_of_a_batch_regenerates_alone_and_bytes_repeat(tiny, tmp_path):
    from sdtorch.metadata import write_png

    ours, _ = tiny
    settings = dict(steps=6, cfg_scale=5.0, sampler="euler_a", width=32, height=32, progress=False)
    batch = ours.generate(PROMPT, seed=100, batch=3, **settings)
    alone = ours.generate(PROMPT, seed=102, batch=1, **settings)
    assert np.array_equal(np.asarray(batch.images[2]), np.asarray(alone.images[0]))
    assert not np.array_equal(np.asarray(batch.images[0]), np.asarray(batch.images[1]))
    again = ours.generate(PROMPT, seed=102, batch=1, **settings)
    write_png(tmp_path / "a.png", alone.images[0], alone.params[0])
    write_png(tmp_path / "b.png", again.images[0], again.params[0])
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(width=100), "multiple of 8"),
        (dict(height=0), "multiple of 8"),
        (dict(steps=0), "steps"),
        (dict(sampler="euler_b"), "valid samplers: ddim, pndm"),
        (dict(sampler="ddim", karras=True), "Karras"),
        (dict(batch=0), "batch"),
        (dict(seed=-1), "seed"),
        (dict(init_image=Image.new("RGB", (32, 32)), strength=0.0), "strength"),
        (dict(init_image=Image.new("RGB", (32, 32)), strength=1.5), "strength"),
    ],
)
def test_bad_settings_are_one_line_errors(tiny, settings, message):
    ours, _ = tiny
    with pytest.raises(SdtorchError, match=message) as info:
        ours.generate(PROMPT, **{"width": 32, "height": 32, "steps": 2, **settings})
    assert "\n" not in str(info.value)


def test_sd15_architecture_matches_diffusers_at_a_small_size(sd15_file, tmp_path):
    """The full SD 1.5 networks (random weights from the real layout), both pipelines, 64x64."""
    components = sd15_reference_components(sd15_file, tmp_path)
    ours = Pipeline(load_model(sd15_file))
    for sampler in ("ddim", "pndm", "euler", "dpmpp_2m"):
        result, expected = run_both(ours, components, sampler, size=64, seed=5, batch=1, steps=6, cfg_scale=7.5)
        assert max_level_difference(result.images, expected) <= 2, sampler
    result, expected = run_both(
        ours, components, "euler", size=64, seed=9, batch=1, steps=6, cfg_scale=7.5,
        init_image=init_picture(64), strength=0.5,
    )
    assert max_level_difference(result.images, expected) <= 2


def test_sizes_default_to_the_model_or_the_init_image(tiny):
    ours, _ = tiny
    txt2img = ours.generate(PROMPT, steps=2, seed=1, progress=False)
    assert txt2img.images[0].size == (ours.model.config.image_size,) * 2
    img2img = ours.generate(PROMPT, steps=2, seed=1, init_image=init_picture(44).crop((0, 0, 44, 37)), progress=False)
    assert img2img.images[0].size == (40, 32)  # rounded down to multiples of 8, as diffusers does
    assert (img2img.params[0].width, img2img.params[0].height) == (40, 32)
