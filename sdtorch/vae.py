"""The KL-regularised autoencoder that maps images to SD's latent space and back.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", section 3
(Esser et al.'s VQGAN architecture with a KL bottleneck instead of a codebook). Module names are
CompVis' `ldm.modules.diffusionmodules.model` ones, so `first_stage_model.*` loads by
stripping the prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdtorch.config import VAEConfig
from sdtorch.layers import Upsample, attention, group_norm


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch, groups, eps=1e-6)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SiLU and the skip's add overwrite fresh results in place (autograd allows both there): at the
        # decoder's 512x512 level each new buffer is 134 MB of pages the kernel faults in and zeroes, and
        # three fewer per block made a 512x512 SD 1.5 decode 6.7 s instead of 7.9 s (2 Zen 5 cores), the
        # same numbers bit for bit.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections as CompVis stores them."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups, eps=1e-6)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        # flatten + transpose is a free view of a channels-last tensor (and the same copy as before of an NCHW one)
        q, k, v = (p(n).flatten(2).transpose(1, 2) for p in (self.q, self.k, self.v))  # (B, HW, C)
        # Back to (B, C, H, W) as a permuted view: channels-last strides throughout. A reshape of the
        # transpose gave a batch of 1 the stride C, which the convolutions read as NCHW, so the whole
        # decoder after its mid-block left channels-last (a 512x512 SD 1.5 decode about 10 s instead of 8; Xeon).
        out = attention(q, k, v, heads=1).view(b, h, w, c).permute(0, 3, 1, 2)
        return self.proj_out(out).add_(x)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution with CompVis' asymmetric padding (right and bottom only)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution of the encoder or decoder: res-blocks, then an optional resampler."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, groups: int, downsample=False, upsample=False):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(n_blocks))
        self.downsample = Downsample(out_ch) if downsample else None
        self.upsample = Upsample(out_ch) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        for resample in (self.downsample, self.upsample):
            if resample is not None:
                x = resample(x)
        return x


def _layout(memory_format: torch.memory_format | None, x: torch.Tensor) -> torch.memory_format:
    """The activations' layout: as set, or (None) channels-last on the CPU and the default elsewhere."""
    if memory_format is not None:
        return memory_format
    return torch.channels_last if x.device.type == "cpu" else torch.contiguous_format


class Encoder(nn.Module):
    """Image (B,3,H,W) in [-1,1] -> moments (B, 2*latent, H/f, W/f); `memory_format` as the decoder's."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        in_ch = cfg.base_channels
        for i, out_ch in enumerate(chans):
            last = i == len(chans) - 1
            self.down.append(Level(in_ch, out_ch, cfg.num_res_blocks, cfg.norm_groups, downsample=not last))
            in_ch = out_ch
        self.mid = MidBlock(in_ch, cfg.norm_groups)
        self.norm_out = group_norm(in_ch, cfg.norm_groups, eps=1e-6)
        self.conv_out = nn.Conv2d(in_ch, 2 * cfg.latent_channels, 3, padding=1)
        self.memory_format: torch.memory_format | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x.contiguous(memory_format=_layout(self.memory_format, x)))
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True)).contiguous()


class Decoder(nn.Module):
    """Latents (B, latent, h, w) -> image (B,3,h*f,w*f), roughly in [-1,1].

    `up[i]` works at the resolution of encoder level i, so it runs from the last index to 0.
    `memory_format` is the layout its activations take (the same maths): None picks channels-last on
    the CPU, where oneDNN's convolutions and GroupNorm run it faster (about 1.4x for this decoder on
    AVX2), and the default layout elsewhere."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.latent_channels, chans[-1], 3, padding=1)
        self.mid = MidBlock(chans[-1], cfg.norm_groups)
        levels = []
        in_ch = chans[-1]
        for i in reversed(range(len(chans))):
            levels.insert(0, Level(in_ch, chans[i], cfg.num_res_blocks + 1, cfg.norm_groups, upsample=i != 0))
            in_ch = chans[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(chans[0], cfg.norm_groups, eps=1e-6)
        self.conv_out = nn.Conv2d(chans[0], cfg.out_channels, 3, padding=1)
        self.memory_format: torch.memory_format | None = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z.contiguous(memory_format=_layout(self.memory_format, z))))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True)).contiguous()


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) over latents."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # Noise drawn on the generator's device in the mean's dtype, as diffusers' randn_tensor does,
        # so a seeded img2img consumes random numbers exactly as the reference does.
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """Images (B,3,H,W) in [-1,1] -> posterior over unscaled latents (B, latent, H/f, W/f)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> images (B,3,H,W), roughly in [-1,1]."""
        return self.decoder(self.post_quant_conv(latents))
