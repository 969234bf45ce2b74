"""The references our numbers are compared with, built the same way for the parity tests and the
benchmarks: diffusers/transformers models with our configs, random weights that cannot hide a
wrong wiring, the SD 1.5 manifest and scheduler config, CLIP's vocabulary files for the reference
tokenizer. Nothing here is a test; bench/ imports it too."""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import json
import os
import sys
import types
from functools import cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import sdtorch
from sdtorch.config import TINY

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the oracles must never reach for a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# The exact tensor layout of a real SD 1.5 file, its original config and its diffusers scheduler
# config, kept with the tests so that a fresh clone runs them.
SD15_DATA = Path(__file__).resolve().parent / "data" / "sd15"
SD15_KEYS = SD15_DATA / "sd15_keys.json"
SD21_DATA = Path(__file__).resolve().parent / "data" / "sd21"  # the same for SD 2.1 768-v
SD15_YAML = SD15_DATA / "v1-inference.yaml"
SCHEDULER_CONFIG = SD15_DATA / "scheduler_config.json"

def max_rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def diffusers_unet_kwargs(cfg) -> dict:
    """diffusers UNet2DConditionModel arguments equal to our UNetConfig."""
    levels = range(len(cfg.channel_mult))
    down = ["CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels]
    up = ["CrossAttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D" for i in reversed(levels)]
    return dict(
        sample_size=16,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        block_out_channels=[cfg.model_channels * m for m in cfg.channel_mult],
        down_block_types=down,
        up_block_types=up,
        layers_per_block=cfg.num_res_blocks,
        attention_head_dim=cfg.num_heads,
        cross_attention_dim=cfg.context_dim,
        norm_num_groups=cfg.norm_groups,
        transformer_layers_per_block=cfg.transformer_depth,
        use_linear_projection=cfg.use_linear_proj,
    )


def diffusers_vae_kwargs(cfg) -> dict:
    n = len(cfg.channel_mult)
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        block_out_channels=[cfg.base_channels * m for m in cfg.channel_mult],
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_groups,
        scaling_factor=cfg.scaling_factor,
        sample_size=64,
    )


def transformers_clip_config(cfg):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_positions,
        hidden_size=cfg.width,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.mlp_width,
        hidden_act=cfg.activation,
        layer_norm_eps=cfg.layer_norm_eps,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def randomise_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter a random, non-degenerate value, so that zero-initialised layers
    (diffusers zeroes some output convolutions) cannot hide a wrong wiring."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name or "ln" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return module.eval()


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's byte table, restated so that the oracle's vocabulary is not built by our code."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_vocab(folder: Path) -> Path:
    """vocab.json + merges.txt for transformers' CLIPTokenizer, derived from the shipped merges
    file as OpenAI CLIP derives its vocabulary."""
    gz = Path(sdtorch.__file__).parent / "data" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.decompress(gz.read_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def random_sd15_state(manifest: dict, dtype=torch.float16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with the exact names, shapes and dtypes of a real SD 1.5 checkpoint.

    Weights are scaled by fan-in and norm gains sit near one, so activations stay in range and
    a wrong wiring shows in the outputs; the DDPM buffers get their true values."""
    g = torch.Generator().manual_seed(seed)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    buffers = {"betas": betas, "alphas_cumprod": alphas_cumprod}
    state = {}
    for name, info in manifest.items():
        shape = tuple(info["shape"])
        if info["dtype"].startswith("int"):
            value = torch.arange(shape[-1]).reshape(shape) if shape else torch.tensor(0)
            state[name] = value.to(getattr(torch, info["dtype"]))
            continue
        if name in buffers:
            value = buffers[name]
        elif "model_ema" in name or len(shape) == 1 and shape[0] == 1000:
            value = torch.rand(shape, generator=g, dtype=torch.float64)
        elif len(shape) == 1 and "norm" in name and name.endswith("weight"):
            value = 1 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) <= 1:
            value = 0.05 * torch.randn(shape, generator=g)
        else:
            value = torch.randn(shape, generator=g) / (torch.Size(shape[1:]).numel() ** 0.5)
        state[name] = value.to(dtype if len(shape) > 1 or name not in buffers else torch.float32)
    return state


def make_diffusers_folder(root: Path, *, safetensors: bool = True, legacy_text_names: bool = False):
    """A tiny SD pipeline folder written by diffusers'/transformers' own save_pretrained."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = randomise_(UNet2DConditionModel(**diffusers_unet_kwargs(TINY.unet)), seed=10)
    vae = randomise_(AutoencoderKL(**diffusers_vae_kwargs(TINY.vae)), seed=11)
    text = randomise_(CLIPTextModel(transformers_clip_config(TINY.text)), seed=12)
    unet.save_pretrained(root / "unet", safe_serialization=safetensors)
    vae.save_pretrained(root / "vae", safe_serialization=safetensors)
    text.save_pretrained(root / "text_encoder", safe_serialization=safetensors)
    if legacy_text_names:  # as transformers 4 wrote it, under `text_model.`
        file = root / "text_encoder" / "model.safetensors"
        save_file({"text_model." + k: v for k, v in load_file(str(file)).items()}, str(file))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(SCHEDULER_CONFIG.read_text())
    write_clip_vocab(root / "tokenizer")
    return unet, vae, text


def reference_tokenizer(folder: Path):
    """transformers' CLIPTokenizer over a `write_clip_vocab` folder, with SD's 77-token length."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def sd15_reference_components(checkpoint: Path, workdir: Path, dtype=torch.float32) -> dict:
    """diffusers' UNet, VAE and text encoder from an SD 1.5 single file through its own single-file
    loader, offline (the CLIP config and tokenizer come from files written here, not a hub)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    from sdtorch.config import SD15

    transformers_clip_config(SD15.text).save_pretrained(workdir / "clip")
    unet = UNet2DConditionModel.from_single_file(str(checkpoint), original_config=str(SD15_YAML), torch_dtype=dtype)
    vae = AutoencoderKL.from_single_file(str(checkpoint), original_config=str(SD15_YAML), torch_dtype=dtype)
    text = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, load_file(str(checkpoint)), config=str(workdir / "clip"), local_files_only=True
    )
    tokenizer = reference_tokenizer(write_clip_vocab(workdir / "tokenizer"))
    return dict(unet=unet, vae=vae, text_encoder=text.to(dtype), tokenizer=tokenizer)


# --- k-diffusion, the samplers' oracle (A1111's sampling code) -----------------------------------------

KDIFFUSION_ORACLE = "_kdiffusion_oracle"
KDIFFUSION_INSTALL = "pip install --no-deps k-diffusion==0.0.16"


@cache
def load_kdiffusion() -> types.SimpleNamespace:
    """k-diffusion's `sampling` and `external` modules, loaded from the installed package's files without
    running its `__init__`; skips the calling test when k-diffusion is not installed."""
    spec = importlib.util.find_spec("k_diffusion")  # finds, does not import
    if spec is None or not spec.submodule_search_locations:
        import pytest

        pytest.skip(f"the k-diffusion oracle is not installed ({KDIFFUSION_INSTALL})")
    package = types.ModuleType(KDIFFUSION_ORACLE)
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules[KDIFFUSION_ORACLE] = package
    stubs = {}
    if importlib.util.find_spec("torchvision") is None:  # utils.py imports it for image helpers we never call
        tv, transforms, functional = (types.ModuleType(n) for n in (
            "torchvision", "torchvision.transforms", "torchvision.transforms.functional"))
        tv.transforms, transforms.functional = transforms, functional
        stubs = {m.__name__: m for m in (tv, transforms, functional)}
    sys.modules.update(stubs)
    try:
        sampling = importlib.import_module(f"{KDIFFUSION_ORACLE}.sampling")
        external = importlib.import_module(f"{KDIFFUSION_ORACLE}.external")
    finally:
        for name in stubs:
            del sys.modules[name]
    from importlib.metadata import version

    return types.SimpleNamespace(sampling=sampling, external=external, version=version("k-diffusion"))


RANK = 4


def kohya_lora(
    unet, text_encoder, *, rank=RANK, seed=0, conv=True, alpha_dtype=torch.float16, scale: float = 0.2,
    text_encoder_2=None,
) -> dict:
    """A random LoRA named as kohya-ss `networks/lora.py` names it: the diffusers module path of each
    Linear / Conv2d inside the targeted blocks, '.' -> '_', under lora_unet_ / lora_te_ (SDXL, with
    `text_encoder_2`: lora_te1_ / lora_te2_); LoCon (conv=True) adds the res-blocks and samplers, 3x3
    kernels in lora_down; alpha = rank / 2."""
    g = torch.Generator().manual_seed(seed)
    state = {}

    def add(name: str, weight: torch.Tensor):
        kernel = tuple(weight.shape[2:])
        down = torch.randn(rank, weight.shape[1], *kernel, generator=g) * scale
        up = torch.randn(weight.shape[0], rank, *(1,) * len(kernel), generator=g) * scale
        state[f"{name}.lora_down.weight"] = down
        state[f"{name}.lora_up.weight"] = up
        state[f"{name}.alpha"] = torch.tensor(rank / 2, dtype=alpha_dtype)

    blocks = ["Transformer2DModel"] + (["ResnetBlock2D", "Downsample2D", "Upsample2D"] if conv else [])
    for name, block in unet.named_modules():
        if type(block).__name__ in blocks:
            for child_name, child in block.named_modules():
                if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                    add(f"lora_unet.{name}.{child_name}".replace(".", "_"), child.weight)
    towers = [("lora_te", text_encoder)] if text_encoder_2 is None else [("lora_te1", text_encoder),
                                                                          ("lora_te2", text_encoder_2)]
    for prefix, tower in towers:
        for name, block in tower.named_modules():
            if type(block).__name__ in ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"):
                for child_name, child in block.named_modules():
                    if isinstance(child, torch.nn.Linear):
                        # transformers 5 names the module without text_model.; kohya's files (from
                        # transformers 4) always have it
                        path = name if name.startswith("text_model.") else f"text_model.{name}"
                        add(f"{prefix}.{path}.{child_name}".replace(".", "_"), child.weight)
    return state


def make_inpaint_diffusers_folder(root: Path):
    """A tiny SD inpainting pipeline folder (a 9-channel UNet: latents, mask, masked-picture latents), written by
    diffusers'/transformers' own save_pretrained."""
    import dataclasses

    unet, vae, text = make_diffusers_folder(root)
    from diffusers import UNet2DConditionModel

    cfg = dataclasses.replace(TINY.unet, in_channels=9)
    unet = randomise_(UNet2DConditionModel(**diffusers_unet_kwargs(cfg)), seed=13)
    unet.save_pretrained(root / "unet")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionInpaintPipeline"}))
    return unet, vae, text


def openclip_state(ours: dict, cfg, prefix: str, *, extra_block_seed: int | None = None) -> dict[str, torch.Tensor]:
    """A text tower (our CLIP state dict `ours`, config `cfg`) in open_clip's names as SD 2.x and SDXL files
    store it under `prefix`: q, k, v fused into in_proj, and the contrastive head (`text_projection` applied
    as x @ P: ours transposed where the tower has one, else random; `logit_scale`). With `extra_block_seed`,
    one more random block at the end (the one SD 2 skips)."""
    state = {
        prefix + "token_embedding.weight": ours["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": ours["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": ours["final_layer_norm.weight"],
        prefix + "ln_final.bias": ours["final_layer_norm.bias"],
    }
    width, layers, mlp = cfg.width, cfg.layers, cfg.mlp_width
    g = torch.Generator().manual_seed(extra_block_seed or 0)
    for i in range(layers + (extra_block_seed is not None)):
        def get(name, shape, i=i):
            key = f"encoder.layers.{i}.{name}"
            return ours[key] if i < layers else torch.randn(shape, generator=g) * 0.05

        block = f"{prefix}transformer.resblocks.{i}."
        for kind, shape in (("weight", (width, width)), ("bias", (width,))):
            state[block + f"attn.in_proj_{kind}"] = torch.cat(
                [get(f"self_attn.{p}_proj.{kind}", shape) for p in "qkv"])
            state[block + f"attn.out_proj.{kind}"] = get(f"self_attn.out_proj.{kind}", shape)
        for theirs, mine, shape in (("ln_1", "layer_norm1", (width,)), ("ln_2", "layer_norm2", (width,))):
            state[block + f"{theirs}.weight"] = get(f"{mine}.weight", shape)
            state[block + f"{theirs}.bias"] = get(f"{mine}.bias", shape)
        state[block + "mlp.c_fc.weight"] = get("mlp.fc1.weight", (mlp, width))
        state[block + "mlp.c_fc.bias"] = get("mlp.fc1.bias", (mlp,))
        state[block + "mlp.c_proj.weight"] = get("mlp.fc2.weight", (width, mlp))
        state[block + "mlp.c_proj.bias"] = get("mlp.fc2.bias", (width,))
    if "text_projection.weight" in ours:
        state[prefix + "text_projection"] = ours["text_projection.weight"].t().contiguous()
    else:
        state[prefix + "text_projection"] = torch.randn(width, width, generator=g)
    state[prefix + "logit_scale"] = torch.tensor(4.6)
    return state
