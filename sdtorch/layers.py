"""Building blocks shared by the UNet and the VAE.

Module and parameter names follow the original CompVis checkpoints, so a single-file checkpoint
loads by stripping a prefix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, groups: int, eps: float = 1e-5) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=eps)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [cos | sin] halves as in CompVis.

    Vaswani et al. 2017, "Attention is all you need", section 3.5; the frequency ladder of
    DDPM (Ho et al. 2020). t: (B,) -> (B, dim), float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False) -> torch.Tensor:
    """Multi-head attention over (B, T, C) tensors through `F.scaled_dot_product_attention`."""
    b, tq, c = q.shape
    q, k, v = (x.reshape(b, x.shape[1], heads, c // heads).transpose(1, 2) for x in (q, k, v))  # (B, heads, T, d)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(b, tq, c)  # (B, T, C)


# The attention seam: layers that attend call their `attention_fn` (q, k, v, heads) -> out, over
# (B, T, C) tensors; `attention` unless a caller swaps it for a scope with `swapped_attention`.
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@contextmanager
def swapped_attention(
    network: nn.Module, choose: Callable[[str, nn.Module], AttentionFn | None]
) -> Iterator[None]:
    """For the scope, each attending layer of `network` (a module with an `attention_fn`) uses
    `choose(name, layer)`, its qualified name and itself, unless that returns None; the previous
    functions are put back on exit, whatever happens. Recording attention maps or trying another
    kernel goes through here, never by patching a module's methods."""
    previous = {}
    try:
        for name, layer in network.named_modules():
            if hasattr(layer, "attention_fn") and (fn := choose(name, layer)) is not None:
                previous[layer] = layer.attention_fn
                layer.attention_fn = fn
        yield
    finally:
        for layer, fn in previous.items():
            layer.attention_fn = fn


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (UNet input blocks); the parameter is named `op` as in CompVis."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution (UNet output blocks and VAE decoder)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # An explicit size lets the UNet meet a skip of odd size (latents not a multiple of 8).
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))
