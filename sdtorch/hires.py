"""Hires fix (A1111's "Hires. fix"): generate at the base size, upscale, then image-to-image at the large size.

The upscale is in latent space ("latent": bilinear, "latent-bicubic"), or in pixel space through the VAE
("lanczos", "nearest": decode, resize the picture, encode again); by a scale, or to a width and/or height
(`hires_target`; both given, the picture is upscaled to cover them and cropped). The second pass runs
`hires_steps` steps (0: as many as the first) at `hires_strength` (A1111's "Denoising strength" of a hires
record), from fresh noise at the large size drawn from the same per-image generators.
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


def hires_target(request) -> tuple[tuple[int, int], tuple[int, int]]:
    """(the size the first pass is upscaled to, the second pass's size) of a request with its size set, as A1111's
    `calculate_target_resolution` has them: by `hires_scale`; or to `hires_width` or `hires_height` alone, the
    other side following the aspect ratio; or to both, upscaled to cover them (aspect kept), then cropped to
    them about the centre. Upscaled sides are rounded down to multiples of 8."""
    width, height = request.width, request.height
    to_x, to_y = request.hires_width, request.hires_height
    if to_x is None and to_y is None:
        size = hires_size(width, height, request.hires_scale)
        return size, size
    if to_y is None:
        size = to_x, to_x * height // width // 8 * 8
        return size, size
    if to_x is None:
        size = to_y * width // height // 8 * 8, to_y
        return size, size
    if width / height < to_x / to_y:  # the picture is taller than the target: fit the width, crop the height
        return (to_x, to_x * height // width // 8 * 8), (to_x, to_y)
    return (to_y * width // height // 8 * 8, to_y), (to_x, to_y)


def crop_latents(latents: Tensor, width: int, height: int, downscale: int) -> Tensor:
    """(B, C, h, w) -> (B, C, height / f, width / f): the centre, the odd latent row or column taken off the
    far side (A1111's truncate_x / truncate_y slice)."""
    ty, tx = latents.shape[2] - height // downscale, latents.shape[3] - width // downscale
    return latents[:, :, ty // 2:ty // 2 + height // downscale, tx // 2:tx // 2 + width // downscale]


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
    """The second pass of a resolved request with the hires fix: the final latents at the large size."""
    from sdtorch.samplers import GeneratorNoise, sample

    model = pipe.model
    upscaled, (width, height) = hires_target(request)
    f = model.latent_format.downscale
    init_latents = crop_latents(upscale(model, latents, request.hires_upscaler, *upscaled), width, height, f)
    shape = (1, model.latent_format.channels, height // f, width // f)
    noise = torch.cat([GeneratorNoise(torch.empty(shape), g)() for g in generators]).to(model.device)
    denoiser = Denoiser(guided_model(model.unet, cond, uncond, request.cfg_scale, request.batch,
                                         model.latent_format.downscale),
                        model.schedule, model.config.prediction_type)
    return sample(
        request.sampler, denoiser, noise, request.hires_steps or request.steps, schedule=request.schedule,
        noise_source=GeneratorNoise(noise, generators), init_latents=init_latents, strength=request.hires_strength,
        eta=request.eta, callback=callback,
    )
