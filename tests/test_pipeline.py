"""Text-to-image and image-to-image against diffusers' pipelines built from the same weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from oracles import (
    SCHEDULER_CONFIG,
    kohya_lora,
    make_diffusers_folder,
    reference_tokenizer,
    sd15_reference_components,
)
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


SD_SCHEDULER = json.loads(SCHEDULER_CONFIG.read_text())


def reference_scheduler(name: str, config: dict = SD_SCHEDULER):
    import diffusers

    cls_name, options = DIFFUSERS_SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(config, **options)


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


def diffusers_pipeline(components: dict, sampler: str, img2img: bool = False, scheduler_config: dict = SD_SCHEDULER):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    pipe = cls(
        **components,
        scheduler=reference_scheduler(sampler, scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_both(ours: Pipeline, components: dict, sampler: str, size: int, seed: int, batch: int,
             scheduler_config: dict = SD_SCHEDULER, **kw):
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
    ref = diffusers_pipeline(components, sampler, img2img=init is not None, scheduler_config=scheduler_config)
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
    assert result.request.strength == 0.6 and result.request.img2img
    assert max_level_difference(result.images, expected) <= 2


def test_guidance_scale_one_runs_the_conditional_branch_only(tiny):
    ours, components = tiny
    result, expected = run_both(ours, components, "euler", size=32, seed=3, batch=1, steps=8, cfg_scale=1.0)
    assert max_level_difference(result.images, expected) <= 2


def test_image_of_a_batch_regenerates_alone_and_bytes_repeat(tiny, tmp_path):
    from sdtorch.metadata import infotext, write_png

    ours, _ = tiny
    settings = dict(steps=6, cfg_scale=5.0, sampler="euler_a", width=32, height=32, progress=False)
    batch = ours.generate(PROMPT, seed=100, batch=3, **settings)
    alone = ours.generate(PROMPT, seed=102, batch=1, **settings)
    assert np.array_equal(np.asarray(batch.images[2]), np.asarray(alone.images[0]))
    assert not np.array_equal(np.asarray(batch.images[0]), np.asarray(batch.images[1]))
    again = ours.generate(PROMPT, seed=102, batch=1, **settings)
    write_png(tmp_path / "a.png", alone.images[0], infotext(alone.per_image()[0]))
    write_png(tmp_path / "b.png", again.images[0], infotext(again.per_image()[0]))
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(width=100), "multiple of 8"),
        (dict(height=0), "multiple of 8"),
        (dict(steps=0), "steps"),
        (dict(sampler="euler_b"), "valid samplers: ddim, pndm"),
        (dict(sampler="ddim", schedule="karras"), "karras"),
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


def test_lora_on_sd15_matches_diffusers_load_lora_weights(sd15_file, tmp_path):
    """A random kohya LoRA (attention and MLP layers of UNet and text encoder) on the full SD 1.5
    architecture: our `<lora:style:0.8>` against diffusers' `load_lora_weights` + `lora_scale` 0.8."""
    from safetensors.torch import save_file

    from sdtorch.adapters.library import Adapters

    components = sd15_reference_components(sd15_file, tmp_path)
    lora = tmp_path / "style.safetensors"
    save_file(kohya_lora(components["unet"], components["text_encoder"], conv=False, scale=0.12), str(lora))
    adapters = Adapters()
    adapters.add_lora_file(lora)
    ours = Pipeline(load_model(sd15_file), sd15_file, adapters)
    settings = dict(negative_prompt=NEGATIVE, sampler="euler", seed=5, width=64, height=64, steps=6, cfg_scale=7.5)
    result = ours.generate(PROMPT + " <lora:style:0.8>", progress=False, **settings)
    plain = ours.generate(PROMPT, progress=False, **settings)

    ref = diffusers_pipeline(components, "euler")
    ref.load_lora_weights(str(lora))
    ref.fuse_lora(lora_scale=0.8)
    expected = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=7.5, height=64, width=64,
                   generator=[torch.Generator("cpu").manual_seed(5)]).images
    assert max_level_difference(result.images, expected) <= 2
    assert max_level_difference(plain.images, expected) > 10  # the LoRA changes the picture


def test_sizes_default_to_the_model_or_the_init_image(tiny):
    ours, _ = tiny
    txt2img = ours.generate(PROMPT, steps=2, seed=1, progress=False)
    assert txt2img.images[0].size == (ours.model.config.image_size,) * 2
    img2img = ours.generate(PROMPT, steps=2, seed=1, init_image=init_picture(44).crop((0, 0, 44, 37)), progress=False)
    assert img2img.images[0].size == (40, 32)  # rounded down to multiples of 8, as diffusers does
    assert (img2img.request.width, img2img.request.height) == (40, 32)


# A diffusers folder's own scheduler config decides the schedule and what the UNet predicts.
SCHEDULE_VARIANTS = {
    "v_prediction": SD_SCHEDULER | {"prediction_type": "v_prediction"},
    "linear_betas": SD_SCHEDULER | {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
}


@pytest.fixture(scope="module", params=list(SCHEDULE_VARIANTS))
def tiny_variant(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    unet, vae, text = make_diffusers_folder(folder)
    config = SCHEDULE_VARIANTS[request.param]
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    components = dict(unet=unet, vae=vae, text_encoder=text, tokenizer=reference_tokenizer(folder / "tokenizer"))
    return Pipeline(load_model(folder)), components, config


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "dpmpp_2m"])
def test_the_folders_schedule_and_prediction_match_diffusers(tiny_variant, sampler):
    ours, components, config = tiny_variant
    assert ours.model.config.prediction_type == config.get("prediction_type", "epsilon")
    result, expected = run_both(ours, components, sampler, size=32, seed=11, batch=2, steps=10, cfg_scale=7.0,
                                scheduler_config=config)
    assert max_level_difference(result.images, expected) <= 2
    # ... and not by accident: on SD's own schedule and eps the picture is another one
    plain = diffusers_pipeline(components, sampler)(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=7.0, height=32, width=32,
        generator=[torch.Generator("cpu").manual_seed(11 + i) for i in range(2)], num_images_per_prompt=2,
    ).images
    assert max_level_difference(result.images, plain) > 10


def test_a_schedule_we_cannot_reproduce_is_refused_at_load(tmp_path):
    from sdtorch.errors import CheckpointError

    make_diffusers_folder(tmp_path)
    for change, message in (({"prediction_type": "sample"}, "unknown prediction type 'sample'"),
                            ({"beta_schedule": "sigmoid"}, "unknown beta schedule 'sigmoid'"),
                            ({"trained_betas": [0.1] * 1000}, "trained_betas")):
        (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_SCHEDULER | change))
        with pytest.raises(CheckpointError, match=message):
            load_model(tmp_path)


@pytest.mark.parametrize("sampler, fraction", [("euler", 0.2), ("dpmpp_2m", 0.5)])
def test_cfg_cutoff_equals_diffusers_cutoff_callback(tiny, sampler, fraction):
    """The CFG cut-off fast mode against diffusers' documented way of doing it: a step-end callback that, at step
    index int(steps * fraction), keeps only the conditional embeddings and sets the guidance scale to 0."""
    ours, components = tiny
    steps, seed = 10, 9
    result = ours.generate(PROMPT, negative_prompt=NEGATIVE, sampler=sampler, seed=seed, width=32, height=32,
                           steps=steps, cfg_scale=7.5, cfg_cutoff=fraction, progress=False)

    def cutoff(pipe, step_index, timestep, callback_kwargs):
        if step_index == int(pipe.num_timesteps * fraction):
            callback_kwargs["prompt_embeds"] = callback_kwargs["prompt_embeds"].chunk(2)[-1]
            pipe._guidance_scale = 0.0
        return callback_kwargs

    ref = diffusers_pipeline(components, sampler)
    expected = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5, height=32,
                   width=32, generator=[torch.Generator("cpu").manual_seed(seed)], callback_on_step_end=cutoff,
                   callback_on_step_end_tensor_inputs=["prompt_embeds"]).images
    exact = ours.generate(PROMPT, negative_prompt=NEGATIVE, sampler=sampler, seed=seed, width=32, height=32,
                          steps=steps, cfg_scale=7.5, progress=False)
    levels, changed = max_level_difference(result.images, expected), max_level_difference(result.images, exact.images)
    print(f"{sampler} cut-off {fraction}: {levels} levels from diffusers' cut-off, {changed} from exact mode")
    assert levels <= 2
    assert changed > 2  # the cut-off changes the picture: the comparison above can fail
    from sdtorch.metadata import infotext, request_from_infotext

    text = infotext(result.per_image()[0])
    assert f"CFG cutoff: {fraction}" in text and request_from_infotext(text).cfg_cutoff == fraction


@pytest.mark.parametrize("sampler, interval", [("euler", 3), ("dpmpp_2m", 2)])
def test_deep_cache_equals_the_authors_diffusers_helper(tiny, sampler, interval):
    """The DeepCache fast mode against its authors' own implementation (the DeepCache package's
    DeepCacheSDHelper, which wraps a diffusers pipeline's UNet blocks), branch 0, on the same weights."""
    from DeepCache import DeepCacheSDHelper

    ours, components = tiny
    steps, seed = 9, 4
    settings = dict(negative_prompt=NEGATIVE, sampler=sampler, seed=seed, width=32, height=32, steps=steps,
                    cfg_scale=7.5, progress=False)
    result = ours.generate(PROMPT, deep_cache=interval, **settings)
    ref = diffusers_pipeline(components, sampler)
    helper = DeepCacheSDHelper(pipe=ref)
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.enable()
    try:
        expected = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5, height=32,
                       width=32, generator=[torch.Generator("cpu").manual_seed(seed)]).images
    finally:
        helper.disable()
    exact = ours.generate(PROMPT, **settings)
    levels, changed = max_level_difference(result.images, expected), max_level_difference(result.images, exact.images)
    print(f"{sampler} DeepCache {interval}: {levels} levels from the authors' helper, {changed} from exact mode")
    assert levels <= 2
    assert changed > 2  # reusing features changes the picture: the comparison above can fail
