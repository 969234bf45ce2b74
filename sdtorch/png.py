"""PNG files and their text chunks: the bytes, nothing about what the text says.

Pictures are written with no time stamp, so the same pixels and text give the same file; text
goes in a tEXt chunk, or iTXt when it is not Latin-1 (as A1111 does through PngInfo.add_text).
Reading checks the signature first and turns every way a file can be broken into one line.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from sdtorch.errors import SdtorchError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_png(path: str | os.PathLike, image: Image.Image, text: dict[str, str]) -> None:
    """Save `image` as PNG with the given text chunks. The bytes depend only on the pixels (and any
    ICC profile or transparency the image carries) and the text."""
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    try:
        image.save(path, format="PNG", pnginfo=info)
    except OSError as e:
        raise SdtorchError(f"cannot write PNG {os.fspath(path)!r}: {e.strerror or e}") from None


def read_png_text(path: str | os.PathLike, key: str) -> str | None:
    """The text chunk `key` of a PNG file (None if it has none), or an SdtorchError for a file that is
    missing, not a PNG, or corrupt."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise SdtorchError(f"cannot read parameters: {str(path)!r} {what}; give a PNG file")
    try:
        with open(path, "rb") as f:
            if f.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
                raise SdtorchError(f"{str(path)!r} is not a PNG file; parameters are read from PNG text chunks")
            with Image.open(f, formats=["PNG"]) as im:
                text = im.info.get(key)
                if text is None:
                    text = im.text.get(key)  # chunks after the image data: decodes the image
    except Image.DecompressionBombError:
        raise SdtorchError(f"{str(path)!r} is too large for Pillow to open (over 178 megapixels)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        reason = "it cannot be decoded" if isinstance(e, UnidentifiedImageError) else str(e)
        raise SdtorchError(f"{str(path)!r} is a corrupt or truncated PNG file ({reason})") from None
    return text if isinstance(text, str) else None
