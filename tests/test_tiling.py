"""The tiled VAE (sdtorch.tiling): the exact tiled pass equals the whole pass, the blend is a partition of
unity, and auto tiling takes the way the memory allows."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracles import randomise_

from sdtorch import memory, tiling
from sdtorch.config import SD15, TINY
from sdtorch.pipeline import a1111_images
from sdtorch.vae import AutoencoderKL

# The embedded model's VAE shape: three levels, so two resamplers each way.
THREE_LEVELS = dataclasses.replace(TINY.vae, base_channels=16, channel_mult=(1, 2, 4), norm_groups=8)


def structured_latents(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Unit-scale latents with large smooth regions (as real pictures have: sky beside shadow) plus texture;
    per-tile GroupNorm statistics differ across such regions, which random noise alone would hide."""
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.randn(batch, 4, 3, 3, generator=g), size=(height, width), mode="bicubic",
                           align_corners=True)
    return 1.5 * smooth + 0.5 * torch.randn(batch, 4, height, width, generator=g)


def levels(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest difference, in 8-bit levels, between two decoded batches as pictures."""
    return max(int(np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max())
               for x, y in zip(a1111_images(a), a1111_images(b)))


def test_exact_tiled_decode_of_sd15_vae_at_512_equals_the_whole_decode():
    """SD 1.5's real VAE config with random weights, 512x512: eight bands at the full resolution, four at
    the half; within 2 levels per pixel (in fact the order of float sums apart)."""
    vae = randomise_(AutoencoderKL(SD15.vae), seed=3)
    z = structured_latents(1, 64, 64) / SD15.vae.scaling_factor
    with torch.no_grad():
        whole = vae.decode(z)
        exact = tiling.decode_exact(vae, z)
    assert 0.05 < (whole.abs() < 1).float().mean() < 0.95  # a picture, not all clipped: a fair test
    assert levels(exact, whole) <= 2
    assert (exact - whole).abs().max() < 1e-3


@pytest.mark.parametrize("cfg", [TINY.vae, THREE_LEVELS], ids=["two-levels", "three-levels"])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"])
def test_exact_tiled_decode_and_encode_equal_the_whole_pass(cfg, layout):
    vae = randomise_(AutoencoderKL(cfg), seed=5)
    vae.encoder.memory_format = vae.decoder.memory_format = layout
    f = cfg.downscale
    z = structured_latents(2, 72 // f, 40 // f, seed=1) * 3  # not square, a batch, rows not a multiple of the band
    images = torch.rand(2, 3, 72, 40, generator=torch.Generator().manual_seed(2)) * 2 - 1
    small_bands = 1  # bytes: every band is MIN_BAND_ROWS rows
    with torch.no_grad():
        whole, exact = vae.decode(z), tiling.decode_exact(vae, z, small_bands)
        posterior, tiled = vae.encode(images), tiling.encode_exact(vae, images, small_bands)
    torch.testing.assert_close(exact, whole, rtol=0, atol=1e-4)
    torch.testing.assert_close(tiled.mean, posterior.mean, rtol=0, atol=1e-4)
    torch.testing.assert_close(tiled.logvar, posterior.logvar, rtol=0, atol=1e-4)


def test_blended_tiles_are_a_partition_of_unity():
    """Through a map that sees only its own pixel (nearest x8), overlapping tiles blend back to it exactly:
    the ramps' weights sum to one everywhere, the tiles land where they belong."""
    x = torch.randn(1, 4, 50, 37)

    def up(t):
        return F.interpolate(t, scale_factor=8, mode="nearest")

    torch.testing.assert_close(tiling._blend(x, up, 8, 16, 6), up(x))
    down = torch.nn.AvgPool2d(8)
    torch.testing.assert_close(tiling._blend(up(x), down, 1 / 8, 128, 48), x)


def test_independent_tiles_cover_the_image_and_one_tile_is_the_whole_pass():
    vae = randomise_(AutoencoderKL(TINY.vae), seed=5)
    z = structured_latents(1, 40, 24) * 3
    with torch.no_grad():
        whole = vae.decode(z)
        assert torch.equal(tiling.decode_tiles(vae, z, tile=64), whole)
        tiles = tiling.decode_tiles(vae, z, tile=16, overlap=6)
    assert tiles.shape == whole.shape and torch.isfinite(tiles).all()
    assert levels(tiles, whole) > 2  # each tile normalises by its own statistics: why they are the last resort


def test_auto_tiling_takes_whole_then_exact_then_tiles_as_memory_shrinks():
    vae = randomise_(AutoencoderKL(THREE_LEVELS), seed=5)

    def way(mode, available, side=2048):
        return memory.vae_way(vae, "decode", side, side, torch.float32, mode, available=available)

    roomy = way("auto", 2**50)
    assert roomy.kind == "whole" and roomy.per_call > 1000
    whole, exact = roomy.need, roomy.exact_bytes
    assert exact < whole / 1.5  # at 2048x2048 the exact pass holds far less than the whole one
    def enough(n):  # available memory of which the usable share is just n
        return math.ceil(n / memory.USABLE) + 1

    assert (way("auto", enough(whole)).kind, way("auto", enough(whole)).per_call) == ("whole", 1)
    assert (way("auto", enough(whole) - 3).kind, way("auto", enough(exact)).kind) == ("exact", "exact")
    assert way("auto", enough(exact) - 3).kind == "tiles"
    assert (way("on", 2**50).kind, way("off", 1).kind, way("on", 1).kind) == ("exact", "whole", "tiles")


def test_decode_and_encode_follow_the_scope_and_the_memory_limit():
    vae = randomise_(AutoencoderKL(THREE_LEVELS), seed=5)
    z = structured_latents(3, 24, 16) * 3
    images = torch.rand(3, 3, 96, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    exact = memory.vae_way(vae, "decode", 96, 64, torch.float32, "on", available=2**50).exact_bytes
    with torch.no_grad():
        whole, posterior = vae.decode(z), vae.encode(images)
        with tiling.vae_tiling("on"), memory.memory_limit(math.ceil(exact / memory.USABLE) + 1):
            torch.testing.assert_close(tiling.decode(vae, z), whole, rtol=0, atol=1e-4)  # exact, an image a call
            torch.testing.assert_close(tiling.encode(vae, images).mean, posterior.mean, rtol=0, atol=1e-4)
        with tiling.vae_tiling("auto"), memory.memory_limit(1), warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            tiles = tiling.decode(vae, z)
    assert tiles.shape == whole.shape
    assert any("decoding 64x96 in independent tiles" in str(w.message) for w in seen)


def test_an_unknown_tiling_mode_is_one_line():
    from sdtorch.errors import SdtorchError

    with pytest.raises(SdtorchError, match="unknown VAE tiling 'sometimes'; accepted: auto, on, off"):
        tiling.check_tiling("sometimes")
