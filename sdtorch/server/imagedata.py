"""Images that arrive as text: raw or data-URL base64, decoded without trusting them.

The size is read from the header and refused before any pixel is decoded (a 50 kB PNG can claim
100000 x 100000 pixels); URLs are refused, never fetched; only plain raster formats are opened.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import warnings
import zlib

from PIL import Image, ImageOps, UnidentifiedImageError

from sdtorch.errors import SdtorchError
from sdtorch.images import ACCEPTED_FORMATS, to_rgb

MAX_IMAGE_PIXELS = 4096 * 4096
_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.+-]+)*;base64,", re.IGNORECASE)
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def decode_base64(text: str, what: str = "image") -> bytes:
    """The bytes of a base64 string, with or without a `data:...;base64,` prefix; SdtorchError otherwise."""
    if not isinstance(text, str):
        raise SdtorchError(f"{what} must be a base64 string, got {type(text).__name__}")
    text = text.strip()
    if _URL.match(text):
        raise SdtorchError(f"{what} is a URL; images are never fetched, send the image itself as base64")
    if text.startswith("data:"):
        match = _DATA_URL.match(text)
        if match is None:
            raise SdtorchError(f"{what} is a data URL that is not base64 ('data:image/png;base64,...' is accepted)")
        text = text[match.end():]
    text = "".join(text.split())
    text += "=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SdtorchError(f"{what} is not valid base64") from None
    if not data:
        raise SdtorchError(f"{what} is empty")
    return data


def open_image(data: bytes, what: str = "image", *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decoded image bytes -> an RGB PIL image (EXIF orientation applied, transparency on white)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as im:
                width, height = im.size  # from the header: nothing decoded yet
                if width * height > max_pixels:
                    raise SdtorchError(
                        f"{what} is {width}x{height} pixels; the limit is {max_pixels:,} pixels; scale it down first"
                    )
                im.load()
                try:
                    image = ImageOps.exif_transpose(im)
                except (OSError, SyntaxError, ValueError, KeyError, TypeError, struct.error):
                    image = im.copy()
    except Image.DecompressionBombError:
        raise SdtorchError(f"{what} is over the limit of {max_pixels:,} pixels; scale it down first") from None
    except UnidentifiedImageError:
        raise SdtorchError(f"{what} is not an image in an accepted format (PNG, JPEG, WebP, BMP, TIFF, GIF)") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as e:
        raise SdtorchError(f"{what} is a corrupt or truncated image ({e})") from None
    return to_rgb(image)


def image_from_base64(text: str, what: str = "image", *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    return open_image(decode_base64(text, what), what, max_pixels=max_pixels)


def png_text(data: bytes) -> dict[str, str]:
    """The text chunks of a PNG (or the text info of another format), without decoding its pixels
    beyond what Pillow needs for chunks after the image data."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as im:
                info = {k: v for k, v in im.info.items() if isinstance(v, str)}
                if im.format == "PNG" and "parameters" not in info:
                    width, height = im.size
                    if width * height <= MAX_IMAGE_PIXELS:
                        info |= {k: v for k, v in im.text.items() if isinstance(v, str)}
    except Image.DecompressionBombError:
        raise SdtorchError("the image is too large to read") from None
    except UnidentifiedImageError:
        raise SdtorchError("the image is not in an accepted format (PNG, JPEG, WebP, BMP, TIFF, GIF)") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as e:
        raise SdtorchError(f"the image is corrupt or truncated ({e})") from None
    return info


def resize_for(image: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """A1111's img2img resize modes: 0 and 3 stretch (left to the pipeline), 1 crops to the aspect then
    resizes, 2 fits inside and fills the rest with the stretched edges (modules/images.py resize_image)."""
    if mode in (0, 3) or image.size == (width, height):
        return image
    lanczos = Image.Resampling.LANCZOS
    ratio, src_ratio = width / height, image.width / image.height
    if mode == 1:
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
        resized = image.resize((src_w, src_h), resample=lanczos)
        out = Image.new("RGB", (width, height))
        out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        return out
    if mode == 2:
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
        resized = image.resize((src_w, src_h), resample=lanczos)
        out = Image.new("RGB", (width, height))
        out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        if ratio < src_ratio:
            fill = height // 2 - src_h // 2
            if fill > 0:
                out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
                out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                          box=(0, fill + src_h))
        elif ratio > src_ratio:
            fill = width // 2 - src_w // 2
            if fill > 0:
                out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
                out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                          box=(fill + src_w, 0))
        return out
    raise SdtorchError(f"resize_mode {mode} is not accepted; use 0 (resize), 1 (crop and resize), "
                       "2 (resize and fill) or 3 (latent resize)")
