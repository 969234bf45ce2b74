"""Inpainting: repaint where a mask is white, keep the rest, with any model (A1111's conventions).

- The mask: white (255) repaints, black keeps; an RGBA mask with transparency gives its alpha, thresholded
  at 128 (A1111's `create_binary_mask`); `invert_mask` swaps the two. It is blurred by a Gaussian of
  radius `mask_blur` pixels; the blurred mask is the alpha of the final composite.
- Inpaint area: "whole" picture, or "masked" only: the mask's bounding box plus `inpaint_padding` pixels,
  grown to the output's aspect ratio, cut out, generated at the full output size and pasted back.
- Masked content (what the masked area starts from): "original" (the picture), "fill" (the colours around
  it, blurred in), "latent_noise" (the seed's noise in latent space), "latent_nothing" (zero latents).
- Any model (4 latent channels in): at every step the kept region of x is replaced by the init latents
  noised to the current level, and of the denoised estimate by the clean init latents (ComfyUI's
  KSamplerX0Inpaint; diffusers' inpaint pipeline blends x the same way after each step).
- An inpainting model (a 9-channel UNet, detected from its input channels) instead sees, beside x, the
  latent-size mask and the latents of the picture with the masked area greyed out, as diffusers'
  `StableDiffusionInpaintPipeline` gives them; it needs no blending.
- Outpainting: the picture on a larger canvas whose new area takes the edge colours, inpainted there (the
  mask blurred outwards only, so the original pixels stay).
- Finally the decoded picture is composited over the input through the blurred mask: outside it, the
  pixels are the input's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from torch import Tensor, nn

from sdtorch.diffusion import Denoiser
from sdtorch.errors import SdtorchError
from sdtorch.guidance import guided_model
from sdtorch.images import prepare_init_image, to_pil, to_rgb

MASKED_CONTENT = ("fill", "original", "latent_noise", "latent_nothing")
INPAINT_AREAS = ("whole", "masked")
INPAINT_CHANNELS = 9  # latents (4) + mask (1) + masked-picture latents (4)


def is_inpainting_model(model) -> bool:
    return model.config.unet.in_channels == 2 * model.latent_format.channels + 1


def mask_of(image: Image.Image, invert: bool = False) -> Image.Image:
    """A user's mask -> greyscale "L", 255 = repaint. RGBA with any transparency: its alpha, thresholded at 128."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        mask = alpha.point(lambda a: 255 if a > 128 else 0) if alpha.getextrema() != (255, 255) else rgba.convert("L")
    else:
        mask = image.convert("L")
    return ImageOps.invert(mask) if invert else mask


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The box (x1, y1, x2, y2) "only masked" generates: the mask's bounding box plus `padding`, clipped to the
    picture, then grown (about its centre, within the picture) to the aspect ratio width : height, as A1111's
    get_crop_region and expand_crop_region do."""
    box = mask.getbbox()
    if box is None:
        raise SdtorchError("the mask is empty (all black): nothing to inpaint")
    w, h = mask.size
    x1, y1 = max(box[0] - padding, 0), max(box[1] - padding, 0)
    x2, y2 = min(box[2] + padding, w), min(box[3] + padding, h)
    ratio_crop, ratio_out = (x2 - x1) / (y2 - y1), width / height
    if ratio_crop > ratio_out:  # too wide: grow the height
        want = int((x2 - x1) / ratio_out)
        grow = want - (y2 - y1)
        y1 -= grow // 2
        y2 += grow - grow // 2
        if y2 >= h:
            y1, y2 = y1 - (y2 - h), h
        if y1 < 0:
            y2, y1 = min(y2 - y1, h), 0
    else:  # too tall: grow the width
        want = int((y2 - y1) * ratio_out)
        grow = want - (x2 - x1)
        x1 -= grow // 2
        x2 += grow - grow // 2
        if x2 >= w:
            x1, x2 = x1 - (x2 - w), w
        if x1 < 0:
            x2, x1 = min(x2 - x1, w), 0
    return x1, y1, x2, y2


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": the masked area painted with the colours around it, by compositing ever sharper blurs
    of the kept pixels (premultiplied by their alpha, so the masked area contributes nothing) over it."""
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


@dataclass
class InpaintSetup:
    """The picture and mask at the size the model works at, and how to put the result back."""

    image: Image.Image  # (W, H) RGB: what is encoded (after the masked-content fill)
    mask: Image.Image  # (W, H) "L", blurred
    base: Image.Image  # the input at the output size, composited over
    overlay_mask: Image.Image  # the blurred mask at the output size: the composite's alpha
    box: tuple[int, int, int, int] | None  # "only masked": where the generated picture goes in `base`


def outpainted(request):
    """Outpainting as inpainting: the (resolved) request's picture, at its size, on a canvas grown by `outpaint`
    (left, right, top, bottom pixels) whose new area takes the edge colours, masked white there."""
    left, right, top, bottom = request.outpaint
    image = to_rgb(request.init_image)
    if image.size != (request.width, request.height):
        image = image.resize((request.width, request.height), Image.Resampling.LANCZOS)
    canvas = np.pad(np.asarray(image), ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    mask[top:top + request.height, left:left + request.width] = 0
    return request.replace(init_image=Image.fromarray(canvas), mask=Image.fromarray(mask), invert_mask=False,
                           width=request.width + left + right, height=request.height + top + bottom)


def setup(request) -> InpaintSetup:
    """Resize, blur, crop (only masked) and fill as `request` asks; `request` is resolved (width, height set)."""
    width, height = request.width, request.height
    base = to_rgb(request.init_image)
    if base.size != (width, height):
        base = base.resize((width, height), Image.Resampling.LANCZOS)
    mask = mask_of(request.mask, request.invert_mask)
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.Resampling.LANCZOS)
    if request.mask_blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(request.mask_blur))
    if request.outpaint is not None:  # blurred outwards only: the original picture stays as it was
        left, right, top, bottom = request.outpaint
        mask.paste(0, (left, top, width - right, height - bottom))
    image, work_mask, box = base, mask, None
    if request.inpaint_area == "masked":
        box = crop_region(mask, request.inpaint_padding, width, height)
        image = base.crop(box).resize((width, height), Image.Resampling.LANCZOS)
        work_mask = mask.crop(box).resize((width, height), Image.Resampling.LANCZOS)
    if request.masked_content == "fill":
        image = fill(image, work_mask)
    return InpaintSetup(image, work_mask, base, mask, box)


def composite(generated: Image.Image, s: InpaintSetup) -> Image.Image:
    """The generated picture pasted back (only masked: resized into its box) and laid over the input through the
    blurred mask, so that where the mask is 0 the input's pixels stay exactly."""
    if s.box is not None:
        x1, y1, x2, y2 = s.box
        pasted = s.base.copy()
        pasted.paste(generated.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
        generated = pasted
    return Image.composite(generated, s.base, s.overlay_mask)


class InpaintDenoiser(Denoiser):
    """A denoiser that keeps the unmasked region on the init latents' path: before the model call the kept
    region of x is the init latents noised to the current level with the start noise, after it the kept
    region of the estimate is the clean init latents (ComfyUI's KSamplerX0Inpaint), in either space."""

    def __init__(self, base: Denoiser, init_latents: Tensor, noise: Tensor, repaint: Tensor):
        super().__init__(base.model, base.schedule, base.prediction)
        self.init, self.noise = init_latents, noise
        self.repaint, self.keep = repaint, 1 - repaint  # (B or 1, 1, h, w): 1 where the model paints

    def denoise(self, x: Tensor, sigma: Tensor, t: Tensor) -> Tensor:
        x = self.repaint * x + self.keep * (self.init + self.noise * sigma)  # VE: x = x0 + sigma * eps
        return self.repaint * super().denoise(x, sigma, t) + self.keep * self.init

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        a = self.schedule.alphas_cumprod[t.long()].to(x.device).reshape(-1, 1, 1, 1)
        x = self.repaint * x + self.keep * (a**0.5 * self.init + (1 - a) ** 0.5 * self.noise)  # VP
        return self.repaint * super().eps(x, t) + self.keep * self.noise  # the kept region's noise is known


class ConditionedUNet(nn.Module):
    """An inpainting UNet with its extra input channels fixed: x (n * B, 4, h, w) -> cat(x, extra) in."""

    def __init__(self, unet: nn.Module, extra: Tensor):
        super().__init__()
        self.unet, self.extra = unet, extra  # (B, 5, h, w): the mask, then the masked picture's latents

    def forward(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        extra = self.extra.to(x.dtype).repeat(x.shape[0] // self.extra.shape[0], 1, 1, 1)
        return self.unet(torch.cat([x, extra], dim=1), t, context, y)  # (n * B, 9, h, w)


def latent_mask(mask: Image.Image, size: tuple[int, int], device) -> Tensor:
    """The blurred mask at latent size (w, h), rounded to 0 / 1 as A1111 does: (1, 1, h, w)."""
    small = np.asarray(mask.resize(size, Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    return torch.from_numpy(np.around(small))[None, None].to(device)


def inpaint(pipe, request, cond, uncond, generators, callback, started):
    """The pipeline's inpainting path (`Pipeline._sample` hands over to it): returns a GenerationResult."""
    from sdtorch.pipeline import GenerationResult
    from sdtorch.samplers import GeneratorNoise, sample

    model = pipe.model
    if request.outpaint is not None:
        request = outpainted(request)
    f = model.latent_format.downscale
    latent_size = (request.width // f, request.height // f)
    nine = is_inpainting_model(model)
    if request.mask is None and not nine:
        raise SdtorchError("inpainting needs a mask")
    if request.mask is None and request.init_image is None:  # an inpainting model's text-to-image: all masked
        s = None
        repaint = torch.ones(1, 1, latent_size[1], latent_size[0], device=model.device)
    else:  # an inpainting model's image-to-image without a mask repaints all of the picture
        white = Image.new("L", request.init_image.size, 255)
        s = setup(request if request.mask is not None else request.replace(mask=white, mask_blur=0))
        repaint = latent_mask(s.mask, latent_size, model.device)
    work = request.replace(init_image=s.image if s else None, mask=None)
    if nine and request.strength >= 1.0:  # diffusers: from pure noise, the picture not encoded for the start
        work = work.replace(init_image=None)
    init_latents, noise = pipe.start_latents(work, generators)

    unet = model.unet
    if nine:
        if s is None:  # text-to-image: all masked, the masked picture all mid-grey (0), as diffusers masks it
            pixels = torch.zeros(1, 3, request.height, request.width)
            masked = model.latent_format.from_vae(model.vae.encode(pixels.to(model.device, model.dtype)).mean.float())
            masked = masked.repeat(request.batch, 1, 1, 1)
            binary = torch.ones(1, 1, request.height, request.width)
        else:
            pixels = prepare_init_image(s.image, request.width, request.height)  # (1, 3, H, W) in [-1, 1]
            binary = (torch.from_numpy(np.asarray(s.mask, dtype=np.float32) / 255.0) >= 0.5).float()[None, None]
            masked = model.encode_images(pixels * (binary < 0.5), generators)  # the masked area grey (0)
        small = F.interpolate(binary, size=(latent_size[1], latent_size[0])).to(model.device)  # nearest, as diffusers
        unet = ConditionedUNet(unet, torch.cat([small.repeat(request.batch, 1, 1, 1), masked], dim=1))
    elif init_latents is not None and request.masked_content in ("latent_noise", "latent_nothing"):
        fresh = noise if request.masked_content == "latent_noise" else torch.zeros_like(noise)
        keep_latents = init_latents
        init_latents = init_latents * (1 - repaint) + fresh * repaint
    guided = guided_model(unet, cond, uncond, request.cfg_scale, request.batch, model.latent_format.downscale)
    denoiser = Denoiser(guided,
                        model.schedule, model.config.prediction_type)
    if not nine:
        base = keep_latents if request.masked_content in ("latent_noise", "latent_nothing") else init_latents
        denoiser = InpaintDenoiser(denoiser, base, noise, repaint)
    latents = sample(
        request.sampler, denoiser, noise, request.steps, schedule=request.schedule,
        noise_source=GeneratorNoise(noise, generators), init_latents=init_latents,
        strength=request.strength if init_latents is not None else 1.0, eta=request.eta, callback=callback,
    )
    images = to_pil(pipe.decode(latents, request))
    if s is not None:
        images = [composite(image, s) for image in images]
    return GenerationResult(images, request, latents, time.perf_counter() - started)
