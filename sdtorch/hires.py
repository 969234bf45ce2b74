"""Hires fix (A1111's "Hires. fix"): generate at the base size, upscale, then image-to-image at the large size.

The upscale is in latent space ("latent": bilinear, "latent-bicubic"), or in pixel space through the VAE
("lanczos", "nearest": decode, resize the picture, encode again). The second pass runs `hires_steps` steps
(0: as many as the first) at `hires_strength` (A1111's "Denoising strength" of a hires record), from fresh
noise at the large size drawn from the same per-image generators.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sdtorch.diffusion import Denoiser
from sdtorch.guidance import guided_model
from sdtorch.images import prepare_init_image, to_pil

# Our names -> A1111's "Hires upscaler" labels
UPSCALERS = {"latent": "Latent", "latent-bicubic": "Latent (bicubic)", "lanczos": "Lanczos", "nearest": "Nearest"}
_PIXEL_RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The second pass's size: the base size times `scale`, rounded down to multiples of 8."""
    return int(width * scale) // 8 * 8, int(height * scale) // 8 * 8


def upscale(model, latents: Tensor, upscaler: str, width: int, height: int) -> Tensor:
    """UNet-scale latents (B, C, h, w) -> latents at (width, height) pixels, by `upscaler`."""
    f = model.latent_format.downscale
    if upscaler in ("latent", "latent-bicubic"):
        mode = "bilinear" if upscaler == "latent" else "bicubic"
        return F.interpolate(latents, size=(height // f, width // f), mode=mode, align_corners=False)
    pictures = [p.resize((width, height), _PIXEL_RESAMPLE[upscaler]) for p in to_pil(model.decode_latents(latents))]
    pixels = torch.cat([prepare_init_image(p) for p in pictures])  # (B, 3, H, W) in [-1, 1]
    mean = model.vae.encode(pixels.to(model.device, model.dtype)).mean.float()  # the posterior's mean: no draw
    return model.latent_format.from_vae(mean).to(model.device)


def hires_pass(pipe, request, latents: Tensor, cond, uncond, generators, callback) -> Tensor:
    """The second pass of a resolved request with `hires_scale`: the final latents at the large size."""
    from sdtorch.samplers import GeneratorNoise, sample

    model = pipe.model
    width, height = hires_size(request.width, request.height, request.hires_scale)
    init_latents = upscale(model, latents, request.hires_upscaler, width, height)
    f = model.latent_format.downscale
    shape = (1, model.latent_format.channels, height // f, width // f)
    noise = torch.cat([GeneratorNoise(torch.empty(shape), g)() for g in generators]).to(model.device)
    denoiser = Denoiser(guided_model(model.unet, cond, uncond, request.cfg_scale, request.batch),
                        model.schedule, model.config.prediction_type)
    return sample(
        request.sampler, denoiser, noise, request.hires_steps or request.steps, schedule=request.schedule,
        noise_source=GeneratorNoise(noise, generators), init_latents=init_latents, strength=request.hires_strength,
        eta=request.eta, callback=callback,
    )
