"""SDXL base: an original single file in its real layout (CLIP-L under `conditioner.embedders.0`, OpenCLIP
bigG with fused projections and its `text_projection` under `conditioner.embedders.1`, a UNet with
per-level transformer depths and `label_emb`), detected from its tensors, and equal to diffusers' own
single-file conversion of the same file: text encoders, UNet with its added conditioning, and whole
StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline images; then a diffusers folder of the
same networks; then the real SDXL base 1.0 layout at full size."""

from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from oracles import max_rel_error, openclip_state, randomise_, reference_tokenizer, write_clip_vocab
from PIL import Image
from safetensors.torch import save_file

from sdtorch.conditioning import added_vector
from sdtorch.config import CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig
from sdtorch.loading import load_model
from sdtorch.metadata import infotext
from sdtorch.model import StableDiffusion
from sdtorch.pipeline import Pipeline

SDXL_DATA = Path(__file__).resolve().parent / "data" / "sdxl"

# The smallest SDXL that keeps its rules: two towers whose widths add up to a context diffusers reads as
# SDXL's (1280), 64-wide heads, no attention at the first level, different depths per level, label_emb
# over the pooled embedding and six 256-wide size embeddings, and an 8x VAE.
TINY_SDXL = ModelConfig(
    family="sdxl",
    text=CLIPTextConfig(width=256, layers=2, heads=4, mlp_width=512),
    text_2=CLIPTextConfig(width=1024, layers=3, heads=16, mlp_width=256, activation="gelu", projection_dim=256),
    unet=UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2),
                    transformer_depth=(0, 1, 2), head_dim=64, context_dim=1280, use_linear_proj=True,
                    adm_in_channels=256 + 6 * 256),
    vae=VAEConfig(base_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1, scaling_factor=0.13025),
    image_size=64,
    default_cfg_scale=5.0,
    zero_empty_negative=True,
)
TINY_YAML = """
model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.13025
    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        adm_in_channels: 1792
        num_classes: sequential
        in_channels: 4
        out_channels: 4
        model_channels: 64
        attention_resolutions: [2, 4]
        num_res_blocks: 1
        channel_mult: [1, 2, 2]
        num_head_channels: 64
        use_linear_in_transformer: True
        transformer_depth: [1, 1, 2]
        context_dim: 1280
    first_stage_config:
      target: sgm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 64
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 1, 2, 2]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
"""
CLIP_L = "conditioner.embedders.0.transformer.text_model."
BIGG = "conditioner.embedders.1.model."
PROMPT, NEGATIVE = "a watercolour of a lighthouse in a storm", "blurry, dark"


def sdxl_state(model: StableDiffusion) -> dict[str, torch.Tensor]:
    """The model as a real SDXL file stores it: bigG in open_clip's names, CLIP-L with its position ids."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("conditioner.embedders.1.")}
    state |= openclip_state(model.text_encoder_2.state_dict(), model.config.text_2, BIGG)
    state[CLIP_L + "embeddings.position_ids"] = torch.arange(77)[None]
    return state


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    """A tiny SDXL single file in the real layout (no sdtorch metadata: detected from its tensors)."""
    model = StableDiffusion.random(TINY_SDXL)
    for i, net in enumerate(model.networks().values()):
        randomise_(net, seed=50 + i)
    folder = tmp_path_factory.mktemp("sdxl")
    path = folder / "tiny-sdxl.safetensors"
    save_file({k: v.contiguous() for k, v in sdxl_state(model).items()}, str(path))
    (folder / "tiny-sdxl.yaml").write_text(TINY_YAML)
    return path, model


@pytest.fixture(scope="module")
def reference(sdxl_file, tmp_path_factory):
    """diffusers' own single-file conversion of the file: UNet and VAE from the yaml, the two towers through
    its CLIP and open_clip converters into transformers' CLIPTextModel / CLIPTextModelWithProjection."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig as RefConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path, _ = sdxl_file
    work = tmp_path_factory.mktemp("sdxl-ref")
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406)
    RefConfig(**common, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
              hidden_act="quick_gelu", eos_token_id=49407, pad_token_id=49407).save_pretrained(work / "clip_l")
    # As SDXL's real bigG config: eos_token_id 2, so transformers pools at the highest id (EOS), as open_clip
    RefConfig(**common, hidden_size=1024, num_hidden_layers=3, num_attention_heads=16, intermediate_size=256,
              hidden_act="gelu", eos_token_id=2, pad_token_id=1, projection_dim=256).save_pretrained(work / "bigg")
    state = load_file(str(path))
    text = create_diffusers_clip_model_from_ldm(CLIPTextModel, state, config=str(work / "clip_l"),
                                                local_files_only=True)
    text_2 = create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection, state, config=str(work / "bigg"),
                                                  local_files_only=True)
    yaml = str(path.parent / "tiny-sdxl.yaml")
    unet = UNet2DConditionModel.from_single_file(str(path), original_config=yaml)
    vae = AutoencoderKL.from_single_file(str(path), original_config=yaml)
    tokenizer = reference_tokenizer(write_clip_vocab(work / "tokenizer"))
    tokenizer_2 = reference_tokenizer(work / "tokenizer")
    tokenizer_2.pad_token = "!"  # OpenCLIP pads with id 0, as SDXL's tokenizer_2 does
    return dict(unet=unet, vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2)


def test_the_file_is_detected_as_sdxl_and_loads_exactly(sdxl_file):
    path, written = sdxl_file
    loaded = load_model(path)
    config = loaded.config
    assert config.family == "sdxl" and loaded.family.pad_id_2 == 0
    assert config.unet.transformer_depth == (0, 1, 2) and config.unet.attention_levels == (1, 2)
    assert (config.unet.context_dim, config.unet.adm_in_channels, config.unet.head_dim) == (1280, 1792, 64)
    assert (config.text_2.layers, config.text_2.activation, config.text_2.projection_dim) == (3, "gelu", 256)
    assert config.vae.scaling_factor == 0.13025 and config.zero_empty_negative
    assert config.image_size == 1024 and config.default_cfg_scale == 5.0
    for name, net in written.networks().items():
        stored = getattr(loaded, name).state_dict()
        for key, tensor in net.state_dict().items():
            assert torch.equal(stored[key], tensor), f"{name}.{key}"  # in_proj split, projection transposed


def test_text_encoders_match_transformers(sdxl_file, reference):
    """CLIP-L's hidden layer -2 and bigG's penultimate layer (no final norm), and bigG's pooled projection,
    as diffusers' SDXL pipeline takes them from transformers."""
    model = load_model(sdxl_file[0])
    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, 12], ids[:, 13:] = 49406, 49407, 0
    with torch.no_grad():
        ours_l, none = model.text_encoder.penultimate(ids)
        theirs_l = reference["text_encoder"](ids, output_hidden_states=True).hidden_states[-2]
        ours_g, pooled = model.text_encoder_2.penultimate(ids)
        out = reference["text_encoder_2"](ids, output_hidden_states=True)
    assert none is None
    assert max_rel_error(ours_l, theirs_l) <= 1e-5
    assert max_rel_error(ours_g, out.hidden_states[-2]) <= 1e-5
    assert max_rel_error(pooled, out.text_embeds) <= 1e-5


def test_unet_with_added_conditioning_matches_diffusers(sdxl_file, reference):
    """Our `label_emb` over `added_vector` (pooled + size/crop embeddings) against diffusers' UNet given
    the same pooled embedding and time ids through `added_cond_kwargs`."""
    model = load_model(sdxl_file[0])
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(2, 4, 12, 8, generator=g), torch.randn(2, 77, 1280, generator=g)
    pooled = torch.randn(2, 256, generator=g)
    time_ids = torch.tensor([[96.0, 64.0, 0.0, 0.0, 96.0, 64.0]] * 2)
    with torch.no_grad():
        ours = model.unet(x, torch.tensor(500.0), context, added_vector(pooled, 96, 64))
        theirs = reference["unet"](x, 500.0, context, added_cond_kwargs={"text_embeds": pooled,
                                                                          "time_ids": time_ids}).sample
    assert max_rel_error(ours, theirs) <= 1e-4


def reference_pipeline(reference, sampler: str, img2img: bool = False):
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
    )

    config = json.loads((SDXL_DATA / "scheduler_config.json").read_text())
    kind = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
            "dpmpp_2m": DPMSolverMultistepScheduler}[sampler]
    cls = StableDiffusionXLImg2ImgPipeline if img2img else StableDiffusionXLPipeline
    pipe = cls(**reference, scheduler=kind.from_config(config), force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixel_difference(ours: Image.Image, theirs: Image.Image) -> int:
    return int(np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(theirs, dtype=np.int16)).max())


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "dpmpp_2m"])
def test_txt2img_matches_diffusers_sdxl_pipeline(sdxl_file, reference, sampler):
    """With a negative prompt, and (euler) without one: diffusers then conditions the unconditional pass on
    zeros (`force_zeros_for_empty_prompt`), as sdtorch does for an empty negative prompt."""
    path, _ = sdxl_file
    ref = reference_pipeline(reference, sampler)
    ours = Pipeline(load_model(path), path)
    negatives = [NEGATIVE, None] if sampler == "euler" else [NEGATIVE]
    for negative in negatives:
        expected = ref(PROMPT, negative_prompt=negative, num_inference_steps=6, guidance_scale=6.0, height=64,
                       width=48, generator=[torch.Generator().manual_seed(9)]).images[0]
        result = ours.generate(PROMPT, negative_prompt=negative or "", sampler=sampler, steps=6, cfg_scale=6.0,
                               seed=9, width=48, height=64, progress=False)
        assert pixel_difference(result.images[0], expected) <= 2, (sampler, negative)


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m"])
def test_img2img_matches_diffusers_sdxl_img2img_pipeline(sdxl_file, reference, sampler):
    path, _ = sdxl_file
    g = torch.Generator().manual_seed(5)
    init = Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy())
    ref = reference_pipeline(reference, sampler, img2img=True)
    expected = ref(PROMPT, image=init, strength=0.6, negative_prompt=NEGATIVE, num_inference_steps=8,
                   guidance_scale=5.0, generator=[torch.Generator().manual_seed(4)]).images[0]
    result = Pipeline(load_model(path), path).generate(
        PROMPT, init_image=init, strength=0.6, negative_prompt=NEGATIVE, sampler=sampler, steps=8, cfg_scale=5.0,
        seed=4, width=64, height=64, progress=False)
    assert pixel_difference(result.images[0], expected) <= 2


def test_sdxl_diffusers_folder_matches_diffusers(sdxl_file, reference, tmp_path):
    """The same networks as diffusers saves an SDXL pipeline: text_encoder_2/ with its projection, a UNet
    config with `addition_embed_type: text_time` and per-level depths."""
    folder = tmp_path / "sdxl-folder"
    ref = reference_pipeline(reference, "euler")
    ref.save_pretrained(folder)
    ours = Pipeline(load_model(folder), folder)
    config = ours.model.config
    assert (config.family, config.unet.transformer_depth, config.unet.adm_in_channels) == ("sdxl", (0, 1, 2), 1792)
    assert config.text_2.projection_dim == 256 and config.zero_empty_negative
    expected = ref(PROMPT, num_inference_steps=5, guidance_scale=5.0, height=64, width=64,
                   generator=[torch.Generator().manual_seed(2)]).images[0]
    result = ours.generate(PROMPT, sampler="euler", steps=5, cfg_scale=5.0, seed=2, width=64, height=64,
                           progress=False)
    assert pixel_difference(result.images[0], expected) <= 2


def test_a_kohya_sdxl_lora_matches_diffusers_load_lora_weights(sdxl_file, reference, tmp_path):
    """A kohya-style SDXL LoRA (lora_unet_ on diffusers' module paths, lora_te1_ / lora_te2_ on the two towers)
    through `<lora:...>` against diffusers' `load_lora_weights` on the same pipeline: images within 2 levels."""
    from oracles import kohya_lora

    path, _ = sdxl_file
    loras = tmp_path / "loras"
    loras.mkdir()
    state = kohya_lora(reference["unet"], reference["text_encoder"], text_encoder_2=reference["text_encoder_2"],
                       conv=False, scale=0.1)
    save_file(state, str(loras / "style.safetensors"))
    ref = reference_pipeline(reference, "euler")
    ref.load_lora_weights(str(loras), weight_name="style.safetensors")
    try:
        expected = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=5.0, height=64,
                       width=64, generator=[torch.Generator().manual_seed(3)]).images[0]
    finally:
        ref.unload_lora_weights()
    pipe = Pipeline.load(path, device="cpu", lora_dir=loras)
    result = pipe.generate(PROMPT + " <lora:style:1>", negative_prompt=NEGATIVE, sampler="euler", steps=5,
                           cfg_scale=5.0, seed=3, width=64, height=64, progress=False)
    plain = pipe.generate(PROMPT, negative_prompt=NEGATIVE, sampler="euler", steps=5, cfg_scale=5.0, seed=3,
                          width=64, height=64, progress=False)
    assert pixel_difference(result.images[0], expected) <= 2
    assert pixel_difference(plain.images[0], expected) > 2  # the LoRA changed the picture


def test_an_sdxl_embedding_matches_diffusers_load_textual_inversion(sdxl_file, reference, tmp_path):
    """An SDXL textual-inversion file (clip_l + clip_g vectors) named in the prompt against diffusers loading
    each set into its tower (`load_textual_inversion(..., text_encoder_2, tokenizer_2)`): within 2 levels."""
    path, _ = sdxl_file
    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    g = torch.Generator().manual_seed(8)
    clip_l, clip_g = torch.randn(2, 256, generator=g) * 0.5, torch.randn(2, 1024, generator=g) * 0.5
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(embeddings / "glowstyle.safetensors"))
    ref = reference_pipeline(reference, "euler")
    ref.load_textual_inversion(clip_l, token="glowstyle", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(clip_g, token="glowstyle", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    prompt = "a lighthouse, glowstyle"
    try:
        expected = ref(prompt, negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=5.0, height=64,
                       width=64, generator=[torch.Generator().manual_seed(3)]).images[0]
    finally:
        ref.unload_textual_inversion("glowstyle", tokenizer=ref.tokenizer, text_encoder=ref.text_encoder)
        ref.unload_textual_inversion("glowstyle", tokenizer=ref.tokenizer_2, text_encoder=ref.text_encoder_2)
    pipe = Pipeline.load(path, device="cpu", embeddings_dir=embeddings)
    result = pipe.generate(prompt, negative_prompt=NEGATIVE, sampler="euler", steps=5, cfg_scale=5.0, seed=3,
                           width=64, height=64, progress=False)
    plain = pipe.generate("a lighthouse, glow", negative_prompt=NEGATIVE, sampler="euler", steps=5, cfg_scale=5.0,
                          seed=3, width=64, height=64, progress=False)
    assert pixel_difference(result.images[0], expected) <= 2
    assert pixel_difference(plain.images[0], expected) > 2  # the embedding's vectors made the difference
    assert 'TI hashes: "glowstyle: ' in infotext(result.request)


def test_a1111_mode_encodes_the_empty_negative_prompt(sdxl_file):
    """A1111 conditions an SDXL image's unconditional pass on the encoded "" (no zeros); with a negative prompt
    given, the zeros rule does not apply, and the diffusers-mode image is the same as with the encoded ""."""
    path, _ = sdxl_file
    pipe = Pipeline(load_model(path), path)
    settings = dict(steps=3, seed=1, width=64, height=64, sampler="euler", progress=False)
    zeros = pipe.generate(PROMPT, **settings)
    pipe.model.config = dataclasses.replace(pipe.model.config, zero_empty_negative=False)
    encoded = pipe.generate(PROMPT, **settings)
    assert not torch.equal(zeros.latents, encoded.latents)
    assert "Negative prompt" not in infotext(zeros.request)  # A1111 writes none for an empty one either


def test_explain_draws_an_sdxl_generation(sdxl_file, tmp_path):
    """The explain report runs on SDXL (its probes and training example give the UNet its added vector),
    and the image it explains is the one `generate` makes."""
    from sdtorch.explain.report import write_report
    from sdtorch.explain.run import record_generation
    from sdtorch.request import GenerationRequest

    path, _ = sdxl_file
    pipe = Pipeline(load_model(path), path)
    request = GenerationRequest(prompt="a red cat", negative_prompt="blurry", steps=4, seed=1, width=64, height=64)
    recording = record_generation(pipe, request, tmp_path)
    written = write_report(recording, tmp_path)
    expected = pipe.run(request).images[0]
    assert pixel_difference(Image.open(written["image"]).convert("RGB"), expected) == 0
    report = json.loads(written["json"].read_text())
    assert report["settings"]["prompt"] == "a red cat" and report["model"]["family"] == "sdxl"


@pytest.mark.parametrize("marker, named", [
    ("conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight", "the SDXL refiner"),
    ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "Stable Diffusion 3"),
    ("double_blocks.0.img_attn.qkv.weight", "Flux"),
    ("clf.1.weight", "Stable Cascade"),
])
def test_families_sdtorch_does_not_run_are_named(tmp_path, marker, named):
    from sdtorch.errors import CheckpointError

    path = tmp_path / "other.safetensors"
    save_file({marker: torch.zeros(2, 2), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)},
              str(path))
    with pytest.raises(CheckpointError, match=named):
        load_model(path)


def test_the_real_sdxl_base_layout_loads_and_matches_diffusers(tmp_path):
    """A random fp16 file with every name, shape and dtype of sd_xl_base_1.0 (2,515 tensors): detected as
    SDXL base with its real config, every tensor used, and both text encoders and the UNet (at a small latent
    size) equal to diffusers' conversion of the same file. Run one network at a time: the fp32 UNet alone is
    10.3 GB."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from oracles import random_sd15_state
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    manifest = json.loads((SDXL_DATA / "sdxl_base_keys.json").read_text())
    path = tmp_path / "sd_xl_base-random.safetensors"
    state = random_sd15_state(manifest, torch.float16, seed=6)
    save_file(state, str(path))
    del state
    gc.collect()

    ours = load_model(path)
    config = ours.config
    assert (config.family, config.image_size, config.prediction_type) == ("sdxl", 1024, "epsilon")
    assert (config.text.width, config.text.layers, config.text_2.width, config.text_2.layers) == (768, 12, 1280, 32)
    assert (config.unet.transformer_depth, config.unet.context_dim, config.unet.adm_in_channels) == ((0, 2, 10),
                                                                                                      2048, 2816)
    parameters = sum(p.numel() for p in ours.unet.parameters())
    assert 2_567_000_000 < parameters < 2_568_000_000  # 2,567.5 M, as the manifest's README counts

    ids = torch.randint(0, 49406, (1, 77), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, 20], ids[:, 21:] = 49406, 49407, 0
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 2048, generator=g)
    pooled = torch.randn(2, 1280, generator=g)
    with torch.no_grad():
        text_l = ours.text_encoder.penultimate(ids)[0]
        text_g, pooled_g = ours.text_encoder_2.penultimate(ids)
        unet_out = ours.unet(x, torch.tensor(700.0), context, added_vector(pooled, 64, 64))
    del ours
    gc.collect()

    stored = load_file(str(path))
    clip_l = create_diffusers_clip_model_from_ldm(CLIPTextModel, stored,
                                                  config=str(SDXL_DATA / "text_encoder_config"), local_files_only=True)
    with torch.no_grad():
        assert max_rel_error(text_l, clip_l(ids, output_hidden_states=True).hidden_states[-2]) <= 1e-4
    del clip_l
    bigg = create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection, stored,
                                                config=str(SDXL_DATA / "text_encoder_2_config"), local_files_only=True)
    with torch.no_grad():
        out = bigg(ids, output_hidden_states=True)
    assert max_rel_error(text_g, out.hidden_states[-2]) <= 1e-4
    assert max_rel_error(pooled_g, out.text_embeds) <= 1e-4
    del bigg, stored, out
    gc.collect()

    unet = UNet2DConditionModel.from_single_file(str(path), original_config=str(SDXL_DATA / "sd_xl_base.yaml"))
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
    with torch.no_grad():
        theirs = unet(x, 700.0, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert max_rel_error(unet_out, theirs) <= 1e-4
