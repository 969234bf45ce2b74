"""Shared fixtures: tiny reference models from diffusers/transformers, and the SD 1.5 manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the oracles must never reach for a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SD15_KEYS = SHARED / "data" / "sd15" / "sd15_keys.json"
SD15_YAML = SHARED / "data" / "sd15" / "v1-inference.yaml"
SCHEDULER_CONFIG = SHARED / "data" / "sd15" / "scheduler_config.json"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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


@pytest.fixture(scope="session")
def sd15_manifest() -> dict:
    return json.loads(SD15_KEYS.read_text())


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
