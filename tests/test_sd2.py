"""SD 2.x: an original single file in its real layout (OpenCLIP text tower with fused projections,
64-wide heads, linear transformer projections), detected and equal to diffusers' own single-file
conversion of the same file; and a diffusers folder of the same family."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from oracles import SCHEDULER_CONFIG, openclip_state, randomise_, reference_tokenizer, write_clip_vocab
from safetensors.torch import save_file

from sdtorch.config import CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig
from sdtorch.loading import load_model
from sdtorch.model import StableDiffusion
from sdtorch.pipeline import Pipeline

# The smallest SD 2.x that keeps its rules: CLIP heads 64 wide, UNet heads 64 wide, linear projections.
TINY_SD2 = ModelConfig(
    family="sd2",
    text=CLIPTextConfig(width=64, layers=2, heads=1, mlp_width=128, activation="gelu"),
    unet=UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                    head_dim=64, context_dim=64, use_linear_proj=True),
    vae=VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1),
    prediction_type="epsilon",
    image_size=32,
)
TINY_YAML = """
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    image_size: 4
    channels: 4
    scale_factor: 0.18215
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        in_channels: 4
        out_channels: 4
        model_channels: 64
        attention_resolutions: [1, 2]
        num_res_blocks: 1
        channel_mult: [1, 2]
        num_head_channels: 64
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: 1
        context_dim: 64
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 32
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 2]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
"""


@pytest.fixture(scope="module")
def sd2_file(tmp_path_factory):
    """A tiny SD 2.x single file in the real layout (no sdtorch metadata: detected from its tensors)."""
    model = StableDiffusion.random(TINY_SD2)
    for net in model.networks().values():
        randomise_(net, seed=41)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("cond_stage_model.")}
    state |= openclip_state(model.text_encoder.state_dict(), model.config.text, "cond_stage_model.model.",
                            extra_block_seed=3)
    folder = tmp_path_factory.mktemp("sd2")
    path = folder / "tiny-sd2.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    (folder / "tiny-v2.yaml").write_text(TINY_YAML)
    return path, model


def test_the_file_is_detected_as_sd2_and_loads_exactly(sd2_file):
    path, written = sd2_file
    loaded = load_model(path)
    assert loaded.config.family == "sd2" and loaded.family.pad_id == 0
    assert loaded.config.text.layers == 2 and loaded.config.text.activation == "gelu"  # the extra block left out
    assert loaded.config.unet.head_dim == 64 and loaded.config.unet.use_linear_proj
    assert loaded.config.prediction_type == "epsilon"  # no 768-v marker in this file
    for name, tensor in written.text_encoder.state_dict().items():
        assert torch.equal(loaded.text_encoder.state_dict()[name], tensor), name  # in_proj split exactly


def reference_components(path, workdir):
    """diffusers' own single-file conversion of the file: UNet and VAE from the yaml, the OpenCLIP
    tower through its open_clip converter into transformers' CLIPTextModel."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig as RefConfig
    from transformers import CLIPTextModel

    yaml = str(path.parent / "tiny-v2.yaml")
    RefConfig(vocab_size=49408, max_position_embeddings=77, hidden_size=64, num_hidden_layers=2,
              num_attention_heads=1, intermediate_size=128, hidden_act="gelu", bos_token_id=49406,
              eos_token_id=49407, pad_token_id=0).save_pretrained(workdir / "clip")
    state = load_file(str(path))
    # diffusers' converter skips SD 2's 24th block by name; in this small file the skipped block is the 3rd
    state = {k: v for k, v in state.items() if ".resblocks.2." not in k}
    text = create_diffusers_clip_model_from_ldm(CLIPTextModel, state, config=str(workdir / "clip"),
                                                local_files_only=True)
    unet = UNet2DConditionModel.from_single_file(str(path), original_config=yaml)
    vae = AutoencoderKL.from_single_file(str(path), original_config=yaml)
    tokenizer = reference_tokenizer(write_clip_vocab(workdir / "tokenizer"))
    tokenizer.pad_token = "!"  # OpenCLIP pads with id 0, as SD 2's tokenizer does
    return dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_sd2_file_matches_diffusers_single_file_pipeline(sd2_file, tmp_path, sampler):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    path, _ = sd2_file
    components = reference_components(path, tmp_path)
    config = json.loads(SCHEDULER_CONFIG.read_text())
    scheduler = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[sampler].from_config(config)
    ref = StableDiffusionPipeline(**components, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    prompt, negative = "a watercolour of a lighthouse in a storm", "blurry"
    expected = ref(prompt, negative_prompt=negative, num_inference_steps=8, guidance_scale=7.0, height=32, width=32,
                   generator=[torch.Generator().manual_seed(9)]).images[0]
    ours = Pipeline(load_model(path), path).generate(prompt, negative_prompt=negative, sampler=sampler, steps=8,
                                                     cfg_scale=7.0, seed=9, width=32, height=32, progress=False)
    diff = np.abs(np.asarray(ours.images[0], dtype=np.int16) - np.asarray(expected, dtype=np.int16)).max()
    assert diff <= 2


def test_sd2_diffusers_folder_with_v_prediction_matches_diffusers(sd2_file, tmp_path):
    """The same networks saved by diffusers as a folder (per-level head counts 1, 2; 23-layer-style
    text tower; OpenCLIP's '!' padding) with SD 2's v-prediction scheduler config."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    path, _ = sd2_file
    components = reference_components(path, tmp_path / "ref")
    folder = tmp_path / "folder"
    for name in ("unet", "vae", "text_encoder"):
        components[name].save_pretrained(folder / name)
    config = json.loads(SCHEDULER_CONFIG.read_text()) | {"prediction_type": "v_prediction"}
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    ours = Pipeline(load_model(folder), folder)
    assert (ours.model.config.family, ours.model.config.prediction_type) == ("sd2", "v_prediction")
    assert ours.model.config.unet.head_dim == 64

    ref = StableDiffusionPipeline(**components, scheduler=EulerDiscreteScheduler.from_config(config),
                                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    expected = ref("a lighthouse", num_inference_steps=8, guidance_scale=6.0, height=32, width=32,
                   generator=[torch.Generator().manual_seed(2)]).images[0]
    result = ours.generate("a lighthouse", sampler="euler", steps=8, cfg_scale=6.0, seed=2, width=32, height=32,
                           progress=False)
    diff = np.abs(np.asarray(result.images[0], dtype=np.int16) - np.asarray(expected, dtype=np.int16)).max()
    assert diff <= 2


def test_the_real_sd21_768v_layout_loads_and_matches_diffusers(tmp_path):
    """A random fp16 file with every name, shape and dtype of v2-1_768-ema-pruned (1,242 tensors): detected
    as SD 2.x predicting v at 768 (ComfyUI's norm-bias test), every tensor used, and its text encoder
    and UNet equal to diffusers' conversion of the same file."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from oracles import SD21_DATA, max_rel_error, random_sd15_state
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    manifest = json.loads((SD21_DATA / "sd21_v_keys.json").read_text())
    state = random_sd15_state(manifest, torch.float16, seed=4)
    probe = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    state[probe] = (torch.randn(state[probe].shape, generator=torch.Generator().manual_seed(1)) * 0.3).half()
    path = tmp_path / "v2-1_768-random.safetensors"
    save_file(state, str(path))
    del state
    ours = load_model(path)
    config = ours.config
    assert (config.family, config.prediction_type, config.image_size) == ("sd2", "v_prediction", 768)
    shape = (config.text.width, config.text.layers, config.unet.context_dim, config.unet.head_dim)
    assert shape == (1024, 23, 1024, 64)

    stored = load_file(str(path))
    text = create_diffusers_clip_model_from_ldm(CLIPTextModel, stored, config=str(SD21_DATA / "text_encoder_config"),
                                                local_files_only=True)
    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, 20:] = 49406, 0
    ids[:, 19] = 49407
    with torch.no_grad():
        assert max_rel_error(ours.text_encoder(ids), text(ids).last_hidden_state) <= 1e-4
    del text, stored
    unet = UNet2DConditionModel.from_single_file(str(path), original_config=str(SD21_DATA / "v2-inference-v.yaml"))
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 1024, generator=g)
    with torch.no_grad():
        assert max_rel_error(ours.unet(x, torch.tensor(500.0), context), unet(x, 500.0, context).sample) <= 1e-4
