"""The latent-diffusion UNet of Stable Diffusion 1.x, 2.x and XL.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models": the
ADM UNet of Dhariwal & Nichol 2021 (res-blocks with a timestep embedding) with a spatial
transformer (self-attention, cross-attention to the text context, GEGLU feed-forward) after
each res-block of the attention levels. Module names are CompVis' `openaimodel.UNetModel`
ones, so `model.diffusion_model.*` loads by stripping the prefix.

SDXL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image
Synthesis") is the same network with per-level transformer depths, no attention at the first level,
and a vector `y` (the pooled text embedding with the image's size and crop embedded) added to the
timestep embedding through `label_emb`, as sgm's `UNetModel(adm_in_channels=..., num_classes="sequential")`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdtorch.config import UNetConfig
from sdtorch.deepcache import FeatureCache
from sdtorch.layers import AttentionFn, Downsample, Upsample, attention, group_norm, timestep_embedding
from sdtorch.linear import Linear


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the timestep embedding added in between, plus a skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int):
        super().__init__()
        # The SiLUs after a norm, the embedding's and the skip's adds overwrite fresh results in place, as the
        # VAE's res-blocks do (`vae.ResnetBlock`); the embedding itself is shared by every block, so its SiLU is not.
        self.in_layers = nn.Sequential(
            group_norm(in_ch, groups), nn.SiLU(inplace=True), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_dim, out_ch))
        self.out_layers = nn.Sequential(
            group_norm(out_ch, groups), nn.SiLU(inplace=True), nn.Dropout(0.0), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        )
        self.skip_connection = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h += self.emb_layers(emb)[:, :, None, None]
        return self.out_layers(h).add_(self.skip_connection(x))


class CrossAttention(nn.Module):
    """Multi-head attention of x over itself (context None) or over the text context, through the
    swappable `attention_fn` (see `sdtorch.layers.swapped_attention`)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attention_fn: AttentionFn = attention
        self.to_q = Linear(dim, dim, bias=False)
        self.to_k = Linear(context_dim, dim, bias=False)
        self.to_v = Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        return self.to_out(self.attention_fn(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class GEGLU(nn.Module):
    """Shazeer 2020, "GLU Variants Improve Transformer": x * GELU(gate) from one projection."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled():  # autograd keeps both factors for the backward pass
            return x * F.gelu(gate)
        return F.gelu(gate).mul_(x)  # the same products, one 4C-wide temporary fewer


FEED_FORWARD_ROWS = 2048  # tokens per feed-forward chunk


class FeedForward(nn.Module):
    """GEGLU to 4x the width, then back. Each token is computed alone, so without autograd a long sequence runs
    in chunks of FEED_FORWARD_ROWS tokens and the wide temporaries exist for one chunk at a time: at a 64x64
    latent with CFG (8192 tokens of 320 channels) 31 MB instead of 168 MB, the largest activations of an SD 1.5
    step, for the same numbers (the live tensors of a 512x512 CFG call peak at 139 MB, 221 MB unchunked)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows <= FEED_FORWARD_ROWS or torch.is_grad_enabled():
            return self.net(x)
        flat = x.reshape(rows, x.shape[-1])
        out = flat.new_empty(rows, self.net[2].out_features)
        for start in range(0, rows, FEED_FORWARD_ROWS):
            out[start:start + FEED_FORWARD_ROWS] = self.net(flat[start:start + FEED_FORWARD_ROWS])
        return out.view(*x.shape[:-1], -1)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Flattens a feature map to tokens, runs transformer blocks on them, adds the result back."""

    def __init__(self, channels: int, cfg: UNetConfig, depth: int):
        super().__init__()
        self.norm = group_norm(channels, cfg.norm_groups, eps=1e-6)
        if cfg.use_linear_proj:
            self.proj_in, self.proj_out = Linear(channels, channels), Linear(channels, channels)
        else:
            self.proj_in, self.proj_out = nn.Conv2d(channels, channels, 1), nn.Conv2d(channels, channels, 1)
        self.linear = cfg.use_linear_proj
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, cfg.context_dim, cfg.heads_at(channels))
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.linear:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        if self.linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not self.linear:
            x = self.proj_out(x)
        return x + residual


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers, each given what it needs: res-blocks the timestep embedding,
    transformers the text context."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, upsample_size=None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """(latents (B,C,H,W), timesteps (B,) or scalar, context (B,T,D)[, y (B, adm_in_channels)]) ->
    predicted noise (B,C,H,W)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch, emb_dim, groups = cfg.model_channels, cfg.time_embed_dim, cfg.norm_groups
        self.time_embed = nn.Sequential(Linear(ch, emb_dim), nn.SiLU(), Linear(emb_dim, emb_dim))
        if cfg.adm_in_channels:
            self.label_emb = nn.Sequential(
                nn.Sequential(Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), Linear(emb_dim, emb_dim))
            )

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        levels = len(cfg.channel_mult)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, mult * cfg.model_channels, emb_dim, groups)]
                ch = mult * cfg.model_channels
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(ch, cfg, cfg.depth_at(level)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ch, emb_dim, groups), SpatialTransformer(ch, cfg, cfg.depth_at(None)),
            ResBlock(ch, ch, emb_dim, groups),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), mult * cfg.model_channels, emb_dim, groups)]
                ch = mult * cfg.model_channels
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(ch, cfg, cfg.depth_at(level)))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            group_norm(ch, groups), nn.SiLU(inplace=True), nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        )

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor, y: torch.Tensor | None = None,
        cache: FeatureCache | None = None,
    ) -> torch.Tensor:
        """With `cache` (the DeepCache fast mode, `sdtorch.deepcache`), a step that reuses the cached deep
        feature runs only conv_in, the last output block and the head; a whole step refreshes it."""
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))  # (B, 4*ch)
        if hasattr(self, "label_emb"):
            if y is None:
                raise ValueError("this UNet (SDXL) needs the added conditioning vector y")
            emb = emb + self.label_emb(y.to(emb.dtype))
        deep = cache.usable(x.shape) if cache is not None else None
        if deep is not None:
            h = torch.cat([deep, self.input_blocks[0](x, emb, context)], dim=1)
            return self.out(self.output_blocks[-1](h, emb, context))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for i, block in enumerate(self.output_blocks):
            if cache is not None and i == len(self.output_blocks) - 1:
                cache.keep(h)
            h = torch.cat([h, skips.pop()], dim=1)
            # Upsample to the next skip's size, which is not 2x when a level had an odd size.
            h = block(h, emb, context, upsample_size=skips[-1].shape[-2:] if skips else None)
        return self.out(h)
