"""Images in and out: load a user's picture for image-to-image, turn it into the tensor the VAE
encoder takes, and turn decoded tensors back into pictures.

`prepare_init_image` and `to_pil` give exactly the numbers diffusers' ``VaeImageProcessor``
(``preprocess`` and ``postprocess(output_type="pil")``) gives for the same input, so img2img starts
from the same tensor as the reference pipeline and a decoded image saves to the same bytes.
"""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import SdtorchError

# Formats we open. Pillow reads more (EPS through Ghostscript among them); we keep to plain raster
# files. ("JPEG" also opens the multi-picture JPEGs many phones write, which Pillow calls MPO.)
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
_ACCEPTED_TEXT = "PNG, JPEG, WebP, BMP, TIFF, GIF"

MAX_PIXELS = 8192 * 8192
"""Most pixels `load_image` accepts by default: 8192 x 8192 (67 megapixels)."""

VAE_SCALE = 8  # the VAE halves the size 3 times: image sides must be multiples of 8


def load_image(path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open a user's image as an RGB PIL image, oriented as a viewer would show it.

    Conversions: EXIF orientation applied; transparency (RGBA, LA, P/L/RGB with a transparent
    colour) composited on white; greyscale to RGB, 16-bit and 32-bit integer greyscale scaled from
    0..65535, float greyscale taken as 0..1; CMYK by Pillow's plain formula; animations give their
    first frame. Colour profiles are not applied. Anything that cannot be read, or is larger than
    `max_pixels`, raises a one-line SdtorchError naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise SdtorchError(f"image file {str(path)!r} does not exist")
    if path.is_dir():
        raise SdtorchError(f"{str(path)!r} is a directory; give an image file ({_ACCEPTED_TEXT})")
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89 MP on; we refuse those ourselves, before decoding anything.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=ACCEPTED_FORMATS) as im:
                width, height = im.size  # from the header; nothing is decoded yet
                if width * height > max_pixels:
                    raise SdtorchError(
                        f"{str(path)!r} is {width}x{height} = {width * height:,} pixels; the limit is "
                        f"{max_pixels:,} pixels (8192x8192 by default); scale it down first"
                    )
                im.load()
                image = _apply_orientation(im, path)
    except Image.DecompressionBombError:  # Pillow's own limit (2 x 89 MP), hit while reading the header
        limit = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or max_pixels))
        raise SdtorchError(
            f"{str(path)!r} is too large: more than {limit:,} pixels; scale it down first"
        ) from None
    except UnidentifiedImageError:
        raise SdtorchError(
            f"{str(path)!r} is not an image in an accepted format ({_ACCEPTED_TEXT})"
        ) from None
    except PermissionError:
        raise SdtorchError(f"cannot read image {str(path)!r}: permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as e:
        raise SdtorchError(f"{str(path)!r} is a corrupt or truncated image ({e})") from None
    return to_rgb(image)


def _apply_orientation(im: Image.Image, path: Path) -> Image.Image:
    """Rotate/flip by the EXIF Orientation tag (a copy either way). Broken EXIF is ignored with a
    warning: the pixels decoded, so a viewer would show the picture too."""
    try:
        return ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError, struct.error) as e:
        warnings.warn(f"{path}: unreadable EXIF data ({e}); orientation not applied", stacklevel=3)
        return im.copy()


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> RGB, by the conversions `load_image` documents (transparency on white,
    16-bit greyscale scaled, not clipped as Pillow's own convert does)."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":  # "I", "I;16", "I;16B", ...: high-depth greyscale
        values = np.asarray(image)
        if mode == "F":
            grey = np.rint(np.clip(values.astype(np.float64), 0.0, 1.0) * 255.0)
        else:
            grey = (np.clip(values.astype(np.int64), 0, 65535) * 255 + 32767) // 65535  # round(v / 257)
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError:
        raise SdtorchError(f"images in colour mode {mode!r} are not supported; save it as RGB") from None


def prepare_init_image(
    image: Image.Image, width: int | None = None, height: int | None = None
) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) float32 in [-1, 1]: the VAE encoder's input for image-to-image.

    Converted to RGB by `to_rgb`. With `width`/`height` (multiples of 8) it is resized to them;
    a side left None keeps the image's size rounded down to a multiple of 8. Resizing uses Lanczos,
    then pixels map as p / 255 * 2 - 1: diffusers' VaeImageProcessor.preprocess, number for number.
    """
    image = to_rgb(image)
    for name, value in (("width", width), ("height", height)):
        if value is not None and (value < VAE_SCALE or value % VAE_SCALE):
            raise SdtorchError(f"{name} {value} is not accepted; use a multiple of 8, at least 8")
    w = width if width is not None else image.width - image.width % VAE_SCALE
    h = height if height is not None else image.height - image.height % VAE_SCALE
    if w < VAE_SCALE or h < VAE_SCALE:
        raise SdtorchError(
            f"the image is {image.width}x{image.height} pixels; image-to-image needs at least 8x8"
        )
    if (w, h) != image.size:
        image = image.resize((w, h), resample=Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).astype(np.float32) / 255.0)  # (H, W, 3)
    pixels = pixels.permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W)
    return (2.0 * pixels - 1.0).contiguous()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> B RGB PIL images: x / 2 + 1/2, clamped to [0, 1], * 255, rounded
    half to even, as diffusers' VaeImageProcessor.postprocess(output_type="pil").

    Half-precision input is widened to float32 first (diffusers does the first step in the input's
    dtype; for float32 input the two agree exactly). NaNs raise SdtorchError rather than give black.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    x = images.detach().to(device="cpu", dtype=torch.float32)
    if torch.isnan(x).any():
        raise SdtorchError(
            "the decoded image contains NaN values (often a float16 VAE overflowing); decode in float32"
        )
    x = (x * 0.5 + 0.5).clamp(0, 1)
    x = (x * 255).round().to(torch.uint8)
    array = x.permute(0, 2, 3, 1).contiguous().numpy()  # (B, H, W, 3)
    return [Image.fromarray(a) for a in array]
