"""The cheap linear latent preview, fitted to the model's own VAE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from oracles import randomise_

from sdtorch.config import SD15, TINY
from sdtorch.preview import LatentPreview
from sdtorch.vae import AutoencoderKL


def test_linear_preview_tracks_the_vae_decode_on_unseen_images():
    vae = randomise_(AutoencoderKL(TINY.vae), seed=41)
    preview = LatentPreview.fit(vae, seed=0)
    assert preview.weight.shape == (3, 4) and preview.downscale == TINY.vae.downscale

    # Unseen images: smooth colour fields drawn from another seed.
    g = torch.Generator().manual_seed(123)
    pixels = F.interpolate(torch.rand(3, 3, 4, 4, generator=g) * 2 - 1, size=(64, 64), mode="bicubic").clamp(-1, 1)
    with torch.no_grad():
        latents = vae.encode(pixels).mean
        target = F.avg_pool2d(vae.decode(latents), TINY.vae.downscale)  # colour per latent pixel
    scaled = latents * TINY.vae.scaling_factor
    predicted = torch.einsum("oc,bchw->bohw", preview.weight, scaled) + preview.bias[None, :, None, None]
    preview_error = (predicted - target).pow(2).mean()
    constant_error = (target - target.mean(dim=(0, 2, 3), keepdim=True)).pow(2).mean()
    # A random VAE is far from linear; the fit must still explain part of what it decodes.
    assert preview_error < 0.9 * constant_error

    images = preview(scaled)
    assert len(images) == 3 and images[0].size == (64, 64)


class LinearVAE(torch.nn.Module):
    """A stand-in whose decode is exactly linear per latent pixel: the fit must recover it."""

    def __init__(self, mixing: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.config = TINY.vae
        self.mixing, self.bias = torch.nn.Parameter(mixing), torch.nn.Parameter(bias)  # (3, 4), (3,)
        self.encoding = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(5)))

    def encode(self, pixels):
        pooled = F.avg_pool2d(pixels, self.config.downscale)
        # A product term, so that the latents span all four channels, not a 3-d subspace.
        latents = torch.einsum("co,bohw->bchw", self.encoding, pooled) + pooled[:, :1] * pooled[:, 1:2]
        return type("Posterior", (), {"mean": latents})

    def decode(self, latents):
        rgb = torch.einsum("oc,bchw->bohw", self.mixing, latents) + self.bias[None, :, None, None]
        return F.interpolate(rgb, scale_factor=self.config.downscale, mode="nearest")


def test_linear_preview_recovers_an_exactly_linear_decoder():
    g = torch.Generator().manual_seed(9)
    mixing, bias = torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    preview = LatentPreview.fit(LinearVAE(mixing, bias))
    # The preview reads scaled latents (what the sampler holds): W = mixing / scale factor.
    torch.testing.assert_close(preview.weight, mixing / TINY.vae.scaling_factor, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(preview.bias, bias, atol=1e-4, rtol=1e-4)


def test_preview_fit_is_cheap_for_the_full_vae_config():
    """The fit runs the VAE on a few 64x64 images only; the full SD 1.5 VAE does it in seconds."""
    vae = AutoencoderKL(SD15.vae).eval()
    preview = LatentPreview.fit(vae, images=2)
    assert torch.isfinite(preview.weight).all() and preview.downscale == 8
