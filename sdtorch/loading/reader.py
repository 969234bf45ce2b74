"""Read tensors from checkpoint files without holding two copies of the weights.

Each file becomes a table of `TensorEntry` (shape, dtype and a `read()` that loads that one
tensor), so the caller can check every name and shape before reading a byte of weights and then
read one tensor at a time straight into the model.

- `.safetensors`: the header is parsed here and each tensor is read with `readinto` into its
  final buffer. (safetensors' `safe_open` memory-maps the whole file, and every page it touches
  stays in our resident set until it closes: loading would then peak at two copies.) A tensor
  wanted in another dtype (`read_as`: an fp16 file loaded as fp32) is read into one staging buffer
  the file's tensors share, then converted into its final buffer: fresh memory is touched once,
  not twice, which is most of what reading costs once the file is in the page cache. A tensor
  kept as stored can instead be mapped (`map()`: that tensor's bytes alone, copy-on-write), so it
  costs resident memory only once it is used, and none once it is let go: a one-shot generation
  then never holds the text encoder, the UNet and the VAE at once. A mapped file must not be
  truncated in place while the model holds it (replacing it by a rename is safe).
- `.ckpt` / `.pt` / `.bin`: torch's weights-only unpickler, never plain pickle, so a hostile
  file cannot run code. Its tensors are in memory already; `read()` hands them over.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sdtorch.errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]
    # The tensor converted to a dtype, where the format can do better than `read().to(dtype)`.
    read_converted: Callable[[torch.dtype], torch.Tensor] | None = None
    # Each read makes a new tensor nothing else holds, so the caller may compute in it (a pickle's may share storage).
    owned: bool = False
    # The tensor as stored, memory-mapped from the file (copy-on-write); None where the format cannot.
    map: Callable[[], torch.Tensor] | None = None

    def read_as(self, dtype: torch.dtype | None) -> torch.Tensor:
        """The tensor, floating-point ones in `dtype` (None: as stored)."""
        if dtype is None or dtype == self.dtype or not self.dtype.is_floating_point:
            return self.read()
        if self.read_converted is not None:
            return self.read_converted(dtype)
        return self.read().to(dtype)


@dataclass
class TensorFile:
    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def open_tensors(path: str | os.PathLike) -> TensorFile:
    """List the tensors of a `.safetensors` or pickle checkpoint file; read none yet
    (pickles excepted: their unpickler cannot be lazy)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return _open_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _open_pickle(path)
    raise CheckpointError(f"{path}: unknown checkpoint type; accepted: .safetensors, {', '.join(PICKLE_SUFFIXES)}")


def _open_safetensors(path: Path) -> TensorFile:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: not a safetensors file, or truncated (header length {header_len})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors = {}
    staging = _Staging()
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(n) for n in info["shape"])
            begin, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor '{name}' has an unreadable or unsupported header entry") from None
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if end - begin != nbytes or data_start + end > size:
            raise CheckpointError(
                f"{path}: tensor '{name}' lies beyond the end of the file or has the wrong byte size "
                f"(file truncated or corrupt)"
            )
        offset = data_start + begin
        staging.largest = max(staging.largest, nbytes)
        tensors[name] = TensorEntry(shape, dtype, _safetensors_reader(path, offset, shape, dtype),
                                    _safetensors_converter(path, offset, shape, dtype, staging), owned=True,
                                    map=_safetensors_mapper(path, offset, shape, dtype))
    return TensorFile(path, tensors, dict(metadata))


def _read_bytes(path: Path, offset: int, buffer: torch.Tensor) -> None:
    """Fill `buffer` (contiguous, any dtype) with the file's bytes at `offset`."""
    if not buffer.numel():
        return
    view = memoryview(buffer.view(-1).view(torch.uint8).numpy())
    with open(path, "rb") as f:
        f.seek(offset)
        if f.readinto(view) != view.nbytes:
            raise CheckpointError(f"{path}: file ended while reading a tensor (truncated)")


def _safetensors_reader(path: Path, offset: int, shape: tuple[int, ...], dtype: torch.dtype):
    def read() -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype)
        _read_bytes(path, offset, tensor)
        return tensor

    return read


def _safetensors_mapper(path: Path, offset: int, shape: tuple[int, ...], dtype: torch.dtype):
    def map_tensor() -> torch.Tensor:
        import numpy as np

        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        # Copy-on-write: a write (none is made) would stay private to this process. The tensor keeps the
        # map alive; once nothing holds the tensor, the pages are unmapped.
        array = np.memmap(path, dtype=np.uint8, mode="c", offset=offset, shape=(nbytes,))
        return torch.from_numpy(array).view(dtype).view(shape)

    return map_tensor


class _Staging:
    """One byte buffer, grown to the largest tensor read through it, that a file's conversions share
    (about 80 MB for SD 1.5, the text encoder's token table); released with the file's entries."""

    def __init__(self):
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.largest = 0  # bytes of the file's largest tensor: the size grown to at the first need
        self.lock = threading.Lock()


def _safetensors_converter(path: Path, offset: int, shape: tuple[int, ...], dtype: torch.dtype, staging: _Staging):
    def read_converted(target: torch.dtype) -> torch.Tensor:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        out = torch.empty(shape, dtype=target)
        with staging.lock:
            if staging.buffer.numel() < nbytes:
                staging.buffer = torch.empty(max(nbytes, staging.largest), dtype=torch.uint8)
            stored = staging.buffer[:nbytes]
            _read_bytes(path, offset, stored)
            out.copy_(stored.view(dtype).view(shape))
        return out

    return read_converted


def _open_pickle(path: Path) -> TensorFile:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # The weights-only unpickler stops at the first global it does not allow, before calling it.
        found = re.search(r"GLOBAL (\S+)", str(e))
        asked = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"{path}: refused: its pickle asks to run code{asked}; only tensors are loaded") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, struct.error) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {first}") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]  # Lightning checkpoints nest the weights
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a checkpoint: it holds a {type(data).__name__}, not a dict of tensors")
    tensors = {}
    for name, value in data.items():
        if isinstance(value, torch.Tensor):
            tensors[name] = TensorEntry(tuple(value.shape), value.dtype, _pop_reader(data, name))
    return TensorFile(path, tensors, {})


def _pop_reader(data: dict, name: str):
    # Handing the tensor over and forgetting it lets its memory go once the model holds a converted copy.
    return lambda: data.pop(name)
