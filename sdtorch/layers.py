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

from sdtorch.stored_weights import weight_and_bias_as_computed


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


# The smallest input (H * W) at which `Upsample` runs as one transposed convolution on the CPU. Below
# it, deriving the 4x4 kernel each call costs more than the convolution saves (SD 1.5's 1280-channel
# upsamplers at 8x8 and 16x16: 1.3-3.2x slower; 640 channels at 32x32: 0.62x; the VAE's 64x64 to
# 256x256: 0.47-0.57x, fp32, 2 Xeon cores).
TRANSPOSED_UPSAMPLE_MIN_PIXELS = 32 * 32


def _stride2_taps(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """The 4 taps along `dim` of a stride-2 transposed kernel equal to nearest x2 then 3 taps (w0, w1, w2):
    an even output row sees input rows i-1, i through (w0, w1 + w2), an odd one rows i, i+1 through
    (w0 + w1, w2); a transposed convolution with padding 1 reads them as taps (3, 1) and (2, 0)."""
    w0, w1, w2 = weight.unbind(dim)
    return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)


def nearest_upsample_kernel(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 convolution's weight (out, in, 3, 3) as the transposed-convolution weight (in, out, 4, 4)
    that, with stride 2 and padding 1, computes nearest-neighbour x2 followed by that convolution.

    Each output pixel of the upsampled convolution depends on a 2x2 patch of the input, so its 9 taps
    fold into 4 (the sub-pixel view of an upsampling layer: Shi et al. 2016, arXiv 1609.05158; Odena et
    al. 2016, "Deconvolution and checkerboard artifacts"): 4/9 of the multiply-adds, and no 4x larger
    upsampled input in memory. The same sums in another order, so equal up to float rounding; folded
    in float32 whatever the compute dtype, so a 16-bit kernel is rounded once."""
    folded = _stride2_taps(_stride2_taps(weight.float(), 2), 3)
    return folded.transpose(0, 1).to(weight.dtype)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution (UNet output blocks and VAE decoder).

    On the CPU, inputs of at least TRANSPOSED_UPSAMPLE_MIN_PIXELS run as one stride-2 transposed
    convolution with the folded kernel (`nearest_upsample_kernel`): the same result up to float
    rounding, about half the time. Other devices keep the two steps (the folded form is unmeasured
    there)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        doubled = size is None or tuple(size) == (2 * h, 2 * w)
        if doubled and x.device.type == "cpu" and h * w >= TRANSPOSED_UPSAMPLE_MIN_PIXELS:
            weight, bias = weight_and_bias_as_computed(self.conv, x)
            return F.conv_transpose2d(x, nearest_upsample_kernel(weight), bias, stride=2, padding=1)
        # An explicit size lets the UNet meet a skip of odd size (latents not a multiple of 8).
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))
