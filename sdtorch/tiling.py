"""The VAE's decode and encode in pieces, for images whose whole-image pass would not fit in memory.

Two ways, and the whole pass, chosen per call from the memory there is (`sdtorch.memory`):

- **exact** (`decode_exact`, `encode_exact`): the maths of the whole-image pass, reordered. Outside its
  one attention block the VAE is convolutions and GroupNorms, and only the GroupNorms see the whole image.
  So each activation is kept whole, every convolution runs over horizontal bands of it with the halo
  of rows its kernel needs, and every GroupNorm normalises each band with the statistics of the whole
  tensor, gathered band by band first (the "synchronised GroupNorm" of pkuliyi2015's
  multidiffusion-upscaler Tiled VAE and of ScaleCrafter's SyncGN, here without its task queue: one
  layer at a time). The attention block runs on the whole (latent-sized) tensor. No seams, no
  blending: equal to the whole pass but for the order of floating-point sums. Peak: two or three
  activations of the widest level instead of the five or so temporaries of the whole pass.
- **tiles** (`decode_tiles`, `encode_tiles`): independent overlapping tiles, each through the whole VAE,
  blended with a cosine ramp over the overlap (diffusers' `AutoencoderKL.tiled_decode` with its
  `blend_v`/`blend_h`, stable-diffusion.cpp's `--vae-tiling`). Memory no longer grows with the image,
  but each tile normalises by its own statistics and attends only within itself, so tones can differ
  from tile to tile: the last resort, with a warning.

The way is a scope setting (`vae_tiling("auto" | "on" | "off")`), read by `decode` and `encode`, which
`StableDiffusion.decode_latents` / `encode_images` call: "auto" runs whole what fits, else exact, else
tiles; "on" at least exact; "off" never tiles. A batch is split into as many images per call as fit
(the VAE treats each image on its own: only float rounding can change).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdtorch import memory
from sdtorch.errors import SdtorchError
from sdtorch.runtime import freed_memory_reused
from sdtorch.vae import AutoencoderKL, DiagonalGaussian

TILING_MODES = ("auto", "on", "off")
_MODE: ContextVar[str] = ContextVar("sdtorch_vae_tiling", default="auto")

BAND_BYTES = 32 * 2**20  # one band's activation at its widest; the band's temporaries are a few of these
MIN_BAND_ROWS = 16  # the 2-row halo of a 3x3 convolution stays a small share of the work
TILE = 64  # latent pixels per side of an independent tile (512 pixels for SD), as diffusers
OVERLAP = 16  # latent pixels two neighbouring tiles share (diffusers' tile_overlap_factor 0.25)


def check_tiling(mode: str) -> str:
    if mode not in TILING_MODES:
        raise SdtorchError(f"unknown VAE tiling {mode!r}; accepted: {', '.join(TILING_MODES)}")
    return mode


@contextmanager
def vae_tiling(mode: str) -> Iterator[None]:
    """For the scope, decode and encode as `mode` says ("auto", "on", "off"); the previous setting after."""
    token = _MODE.set(check_tiling(mode))
    try:
        yield
    finally:
        _MODE.reset(token)


def decode(vae: AutoencoderKL, z: Tensor) -> Tensor:
    """Unscaled latents (B, C, h, w) -> images (B, 3, H, W), whole, exact-tiled or in tiles as memory and
    the scope's `vae_tiling` decide, a few images per call."""
    b, _, h, w = z.shape
    f = vae.config.downscale
    way = memory.vae_way(vae, "decode", h * f, w * f, z.dtype, _MODE.get())
    _warn(way, "decoding", h * f, w * f)
    run = {"whole": vae.decode, "exact": lambda part: decode_exact(vae, part),
           "tiles": lambda part: decode_tiles(vae, part)}[way.kind]
    with freed_memory_reused(False):  # the VAE's large blocks go back to the kernel, even within sampling steps
        return torch.cat([run(z[i : i + way.per_call]) for i in range(0, b, way.per_call)])


def encode(vae: AutoencoderKL, images: Tensor) -> DiagonalGaussian:
    """Images (B, 3, H, W) in [-1, 1] -> the posterior over unscaled latents, as `decode` chooses its way."""
    b, _, height, width = images.shape
    way = memory.vae_way(vae, "encode", height, width, images.dtype, _MODE.get())
    _warn(way, "encoding", height, width)
    run = {"whole": lambda part: _moments(vae.encode(part)), "exact": lambda part: _moments(encode_exact(vae, part)),
           "tiles": lambda part: _moments(encode_tiles(vae, part))}[way.kind]
    with freed_memory_reused(False):  # as decode's
        return DiagonalGaussian(torch.cat([run(images[i : i + way.per_call]) for i in range(0, b, way.per_call)]))


def _warn(way: memory.VAEWay, doing: str, height: int, width: int) -> None:
    if way.kind == "tiles":
        warnings.warn(f"{doing} {width}x{height} in independent tiles: an exact tiled pass needs about "
                      f"{memory.gb(way.exact_bytes)} and {memory.gb(way.available)} is available, and tiles "
                      "normalise on their own, so tones can shift between them", stacklevel=3)


def _moments(posterior: DiagonalGaussian) -> Tensor:
    return torch.cat([posterior.mean, posterior.logvar], dim=1)


# --- exact: whole activations, banded convolutions, whole-tensor GroupNorm statistics ------------------


def layout_of(network: nn.Module, device: torch.device) -> torch.memory_format:
    """The layout the VAE's encoder or decoder runs in (its `memory_format`; None: channels-last on the CPU)."""
    chosen = getattr(network, "memory_format", None)
    return chosen or (torch.channels_last if device.type == "cpu" else torch.contiguous_format)


@torch.no_grad()
def decode_exact(vae: AutoencoderKL, z: Tensor, band_bytes: int = BAND_BYTES) -> Tensor:
    """`vae.decode(z)`, one layer at a time over row bands (see the module's note)."""
    dec = vae.decoder
    run = _Banded(band_bytes)
    h = vae.post_quant_conv(z).contiguous(memory_format=layout_of(dec, z.device))
    h = run.conv(dec.conv_in, h)
    h = run.mid(dec.mid, h)
    for level in reversed(dec.up):
        h = run.level(level, h)
    return run.conv(dec.conv_out, h, norm=dec.norm_out).contiguous()


@torch.no_grad()
def encode_exact(vae: AutoencoderKL, images: Tensor, band_bytes: int = BAND_BYTES) -> DiagonalGaussian:
    """`vae.encode(images)`, one layer at a time over row bands (see the module's note)."""
    enc = vae.encoder
    run = _Banded(band_bytes)
    h = run.conv(enc.conv_in, images.contiguous(memory_format=layout_of(enc, images.device)))
    for level in enc.down:
        h = run.level(level, h)
    h = run.mid(enc.mid, h)
    h = run.conv(enc.conv_out, h, norm=enc.norm_out)
    return DiagonalGaussian(vae.quant_conv(h).contiguous())


Span = Callable[[int, int], tuple[int, int, int]]  # output rows [a, b) -> input rows [lo, hi), offset of a


class _Banded:
    """The VAE's layers run over bands of rows; each method takes a whole activation (B, C, H, W) and
    returns the layer's whole output. Helpers of `decode_exact` / `encode_exact`."""

    def __init__(self, band_bytes: int):
        self.band_bytes = band_bytes

    def _rows(self, channels: int, width: int, itemsize: int, height: int) -> int:
        return max(MIN_BAND_ROWS, min(height, self.band_bytes // max(1, channels * width * itemsize)))

    def _fill(self, out: Tensor, channels: int, span: Span, fn: Callable[[int, int], Tensor]) -> Tensor:
        """out[:, :, a:b] = the rows of fn(lo, hi) that are output rows a..b-1, band after band."""
        height, width = out.shape[2:]
        rows = self._rows(channels, width, out.element_size(), height)
        for a in range(0, height, rows):
            b = min(a + rows, height)
            lo, hi, first = span(a, b)
            out[:, :, a:b] = fn(lo, hi)[:, :, first : first + b - a]
        return out

    @staticmethod
    def _same(height: int, halo: int = 1) -> Span:
        """A same-size 3x3 convolution: `halo` rows either side (zero padding only at the image's edges)."""
        return lambda a, b: (max(a - halo, 0), min(b + halo, height), a - max(a - halo, 0))

    def conv(self, conv: nn.Module, x: Tensor, norm: nn.GroupNorm | None = None) -> Tensor:
        """conv(x), or conv(silu(norm(x))) with whole-tensor statistics."""
        affine = _norm_affine(x, norm, self) if norm is not None else None
        out = _empty(x, conv.out_channels, *x.shape[2:])
        step = (lambda t: conv(_norm_silu(t, affine))) if affine is not None else conv
        return self._fill(out, max(conv.in_channels, conv.out_channels), self._same(x.shape[2]),
                          lambda lo, hi: step(x[:, :, lo:hi]))

    def resnet(self, block: nn.Module, x: Tensor) -> Tensor:
        """vae.ResnetBlock: skip(x) + conv2(silu(norm2(conv1(silu(norm1(x)))))), written over x when the skip
        is the identity (each band of the sum reads x only in its own rows)."""
        h = self.conv(block.conv1, x, norm=block.norm1)
        affine = _norm_affine(h, block.norm2, self)
        out = x if isinstance(block.nin_shortcut, nn.Identity) else _empty(x, block.conv2.out_channels, *x.shape[2:])
        channels = max(x.shape[1], h.shape[1])
        return self._fill(out, channels, self._same(x.shape[2]),
                          lambda lo, hi: block.nin_shortcut(x[:, :, lo:hi]) + block.conv2(_norm_silu(h[:, :, lo:hi],
                                                                                                     affine)))

    def mid(self, mid: nn.Module, x: Tensor) -> Tensor:
        """vae.MidBlock: its res-blocks banded, its attention over the whole (latent-sized) tensor."""
        return self.resnet(mid.block_2, mid.attn_1(self.resnet(mid.block_1, x)))

    def level(self, level: nn.Module, x: Tensor) -> Tensor:
        """vae.Level: its res-blocks, then its resampler."""
        for block in level.block:
            x = self.resnet(block, x)
        if level.downsample is not None:
            x = self.downsample(level.downsample, x)
        if level.upsample is not None:
            x = self.upsample(level.upsample, x)
        return x

    def upsample(self, up: nn.Module, x: Tensor) -> Tensor:
        """Nearest x2 then a 3x3 convolution: output rows [a, b) need input rows a//2 - 1 .. (b+1)//2."""
        height = x.shape[2]

        def span(a: int, b: int) -> tuple[int, int, int]:
            lo, hi = max(a // 2 - 1, 0), min((b + 1) // 2 + 1, height)
            return lo, hi, a - 2 * lo

        out = _empty(x, x.shape[1], 2 * height, 2 * x.shape[3])
        return self._fill(out, x.shape[1], span, lambda lo, hi: up(x[:, :, lo:hi]))

    def downsample(self, down: nn.Module, x: Tensor) -> Tensor:
        """vae.Downsample (pad right and bottom by one, 3x3 stride 2): output rows [a, b) need input rows
        2a .. 2b; below the last band the module's own padding row is the image's."""
        height = x.shape[2]
        if height % 2:
            raise ValueError(f"exact tiling needs even sizes at every level, got {height} rows")
        out = _empty(x, x.shape[1], height // 2, x.shape[3] // 2)
        return self._fill(out, x.shape[1], lambda a, b: (2 * a, min(2 * b + 1, height), 0),
                          lambda lo, hi: down(x[:, :, lo:hi]))


def _empty(like: Tensor, channels: int, height: int, width: int) -> Tensor:
    layout = torch.channels_last if like.is_contiguous(memory_format=torch.channels_last) and like.shape[1] > 1 \
        else torch.contiguous_format
    return torch.empty(like.shape[0], channels, height, width, dtype=like.dtype, device=like.device,
                       memory_format=layout)


def _norm_affine(x: Tensor, norm: nn.GroupNorm, banded: _Banded) -> tuple[Tensor, Tensor]:
    """GroupNorm as a per-image, per-channel scale and shift (B, C, 1, 1), float32, from statistics of the
    whole of x: each band's per-channel sum and sum of squares (float32, a fast reduction), pooled over
    bands and the group's channels in float64."""
    b, c, height, width = x.shape
    groups = norm.num_groups
    rows = banded._rows(c, width, x.element_size(), height)
    total = torch.zeros(2, b, c, dtype=torch.float64, device=x.device)
    for a in range(0, height, rows):
        band = x[:, :, a : a + rows].float()
        total[0] += band.sum((2, 3)).double()
        total[1] += band.square().sum((2, 3)).double()
    n = height * width * (c // groups)
    s, ss = total.view(2, b, groups, c // groups).sum(-1) / n  # (B, G): E[x], E[x^2]
    rstd = ((ss - s**2).clamp_min(0) + norm.eps).rsqrt().repeat_interleave(c // groups, dim=1)  # (B, C)
    mean = s.repeat_interleave(c // groups, dim=1)
    weight = norm.weight.double() if norm.weight is not None else torch.ones(c, dtype=torch.float64, device=x.device)
    bias = norm.bias.double() if norm.bias is not None else torch.zeros(c, dtype=torch.float64, device=x.device)
    scale = rstd * weight
    shift = bias - mean * scale
    return scale.float()[:, :, None, None], shift.float()[:, :, None, None]


def _norm_silu(t: Tensor, affine: tuple[Tensor, Tensor]) -> Tensor:
    scale, shift = affine
    return F.silu(torch.addcmul(shift, t.float(), scale), inplace=True).to(t.dtype)


# --- tiles: independent overlapping tiles, blended ----------------------------------------------------


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering `size`: a stride of tile - overlap, the last tile flush with the end."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    return [*range(0, size - tile, stride), size - tile]


def _ramp(size: int, rise: bool, fall: bool, overlap: int) -> Tensor:
    """1 inside, a cosine rise over the first `overlap` entries (where a tile before overlaps) and a fall
    over the last (where one after does)."""
    w = torch.ones(size)
    edge = torch.sin(0.5 * math.pi * (torch.arange(overlap) + 0.5) / overlap) ** 2
    if rise:
        w[:overlap] = torch.minimum(w[:overlap], edge)
    if fall:
        w[size - overlap :] = torch.minimum(w[size - overlap :], edge.flip(0))
    return w


def _blend(x: Tensor, run: Callable[[Tensor], Tensor], scale: float, tile: int, overlap: int) -> Tensor:
    """run over overlapping tiles of x's last two dims (tile and overlap in x's pixels), the outputs
    (`scale` times the size) blended: each pixel the ramp-weighted mean of the tiles that cover it."""
    height, width = x.shape[2:]
    out = weight = None
    for y0 in _starts(height, tile, overlap):
        for x0 in _starts(width, tile, overlap):
            part = run(x[:, :, y0 : y0 + tile, x0 : x0 + tile]).float()
            if out is None:
                out = torch.zeros(part.shape[0], part.shape[1], round(height * scale), round(width * scale),
                                  device=part.device)
                weight = torch.zeros(1, 1, *out.shape[2:], device=part.device)
            th, tw = part.shape[2:]
            o = max(1, round(overlap * scale))
            w = (_ramp(th, y0 > 0, y0 + tile < height, o)[:, None]
                 * _ramp(tw, x0 > 0, x0 + tile < width, o)[None]).to(part.device)
            oy, ox = round(y0 * scale), round(x0 * scale)
            out[:, :, oy : oy + th, ox : ox + tw] += part * w
            weight[:, :, oy : oy + th, ox : ox + tw] += w
    return out / weight


@torch.no_grad()
def decode_tiles(vae: AutoencoderKL, z: Tensor, tile: int = TILE, overlap: int = OVERLAP) -> Tensor:
    """Latent tiles of `tile` (overlapping by `overlap`) latent pixels, each decoded alone, blended."""
    f = vae.config.downscale
    return _blend(z, vae.decode, f, tile, overlap).to(z.dtype)


@torch.no_grad()
def encode_tiles(vae: AutoencoderKL, images: Tensor, tile: int = TILE, overlap: int = OVERLAP) -> DiagonalGaussian:
    """Image tiles of `tile` latent pixels' worth (overlapping by `overlap`), each encoded alone, their
    posteriors' mean and log-variance blended."""
    f = vae.config.downscale
    moments = _blend(images, lambda part: _moments(vae.encode(part)), 1 / f, tile * f, overlap * f)
    return DiagonalGaussian(moments.to(images.dtype))
