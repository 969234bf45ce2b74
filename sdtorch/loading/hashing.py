"""A1111's model hash of a checkpoint file, so that records name the exact weights."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from sdtorch.errors import SdtorchError


def model_hash(path: str | os.PathLike, *, chunk_size: int = 1 << 20) -> str:
    """A1111's "Model hash" (AutoV2, v1.x+): the first 10 hex digits of the SHA-256 of the whole file.

    Read in `chunk_size` pieces so multi-GB checkpoints never sit in memory.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise SdtorchError(f"cannot hash model: {str(path)!r} {what}; give a checkpoint file")
    digest = hashlib.sha256()
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    try:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                digest.update(view[:n])
    except OSError as e:
        raise SdtorchError(f"cannot read model {str(path)!r}: {e.strerror or e}") from None
    return digest.hexdigest()[:10]
