"""Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word") from the files people have.

Read as AUTOMATIC1111 reads them (`modules/textual_inversion/textual_inversion.py`,
`image_embedding.py`; behaviour re-implemented, no code taken):

- A1111 `.pt`: a dict with `string_to_param` {'*': (n, width)} (and `string_to_token`, `step`,
  `sd_checkpoint`, `sd_checkpoint_name`), through torch's weights-only unpickler: a pickle that
  asks to run code is refused before anything runs (`sdtorch.loading.reader` gives the verdict);
- `.safetensors` or diffusers `.bin`: one tensor under one key (`emb_params`, or the token as
  diffusers' `learned_embeds` writes it), (n, width) or (width,);
- a PNG (or WebP) carrying A1111's embedding: base64 JSON in its `sd-ti-embedding` text chunk, or,
  when a site dropped the text, the same JSON zlib-packed into the picture's data columns.

The embedding's name, the word that calls it in a prompt, is the file stem, or for a picture the
name stored in it (as A1111). SDXL embeddings carry two sets of vectors, `clip_l` (for CLIP-L) and
`clip_g` (for OpenCLIP bigG); they load for SDXL models only, and SD 1.x/2.x embeddings for those only.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sdtorch.errors import CheckpointError, SdtorchError
from sdtorch.loading.reader import open_tensors

PICKLES = (".pt", ".bin")
IMAGES = (".png", ".webp", ".jxl", ".avif")
SUFFIXES = (*PICKLES, ".safetensors", *IMAGES)
ACCEPTED = (
    "accepted: A1111 .pt (string_to_param), .safetensors or diffusers .bin with one (n, width) tensor, "
    "or a PNG with an A1111 embedding"
)
PNG_CHUNK = "sd-ti-embedding"
MAX_PACKED_BYTES = 64 * 1024 * 1024  # an embedding packed into a picture is far smaller


class NoEmbeddingInPicture(SdtorchError):
    """A picture that carries no embedding: in an embeddings folder, a preview to pass over."""


@dataclass(frozen=True, eq=False)
class Embedding:
    """One embedding: `vectors` (n, width) float32 stand in a prompt where `name` is written; for SDXL,
    `vectors` are CLIP-L's (`clip_l`) and `vectors_2` bigG's (`clip_g`)."""

    name: str
    vectors: torch.Tensor = field(repr=False)  # (n, width)
    vectors_2: torch.Tensor | None = field(default=None, repr=False)  # (n, width_2): SDXL's second tower
    shorthash: str = ""  # A1111's "TI hashes" entry: the first 12 hex digits of the file's sha256
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    path: Path | None = None

    @property
    def width(self) -> int:
        return self.vectors.shape[1]

    @property
    def widths(self) -> tuple[int, ...]:
        return (self.width,) if self.vectors_2 is None else (self.width, self.vectors_2.shape[1])

    def for_second_tower(self) -> Embedding:
        """The same embedding with SDXL's bigG vectors in `vectors`, for the second tower's prompt encoder."""
        return dataclasses.replace(self, vectors=self.vectors_2, vectors_2=None)


def load_embedding(path: str | os.PathLike) -> Embedding:
    """One embedding file; any file that is not one gives an `SdtorchError` naming it."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise SdtorchError(f"{path}: no such embedding file")
    if suffix not in SUFFIXES:
        raise SdtorchError(f"{path}: not an embedding file type; {ACCEPTED}")
    name = path.stem
    if suffix in IMAGES:
        data = _read_image(path)
        if data is None:
            raise NoEmbeddingInPicture(f"{path}: a picture without an A1111 embedding in it; {ACCEPTED}")
        name = str(data.get("name") or name)
    elif suffix == ".safetensors":
        try:
            file = open_tensors(path)
        except CheckpointError as e:
            raise SdtorchError(f"{e}; {ACCEPTED}") from None
        data = {key: entry.read() for key, entry in file.tensors.items()}
    else:
        data = _read_pickle(path)
    if "clip_l" in data and "clip_g" in data:  # SDXL
        vectors, vectors_2 = _vectors({"clip_l": data["clip_l"]}, path), _vectors({"clip_g": data["clip_g"]}, path)
        if len(vectors) != len(vectors_2):
            raise SdtorchError(
                f"{path}: an SDXL embedding with {len(vectors)} clip_l and {len(vectors_2)} clip_g vectors")
    else:
        vectors, vectors_2 = _vectors(data, path), None
    return Embedding(
        name=name,
        vectors=vectors,
        vectors_2=vectors_2,
        shorthash=hashlib.sha256(path.read_bytes()).hexdigest()[:12],
        step=_optional(data.get("step"), int),
        sd_checkpoint=_optional(data.get("sd_checkpoint"), str),
        sd_checkpoint_name=_optional(data.get("sd_checkpoint_name"), str),
        path=path,
    )


def load_embeddings(
    folder: str | os.PathLike, width: int | tuple[int, ...] | None = None
) -> tuple[dict[str, Embedding], list[str]]:
    """Every embedding under `folder` (recursively, sorted by path) -> ({name: embedding}, warnings).

    A file that is not an embedding, or (with `width`: the text encoder's, or SDXL's two) whose widths do
    not fit the text encoders (A1111 skips those too), is left out with a one-line warning; so is a
    second file of a name already taken. Empty and hidden files and pictures without an embedding (previews) are
    passed over silently, as A1111 does.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SdtorchError(f"{folder}: no such embeddings folder")
    found: dict[str, Embedding] = {}
    warnings: list[str] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name.startswith(".") or path.stat().st_size == 0 or path.stem.lower().endswith(".preview"):
            continue
        try:
            embedding = load_embedding(path)
        except NoEmbeddingInPicture:
            continue
        except SdtorchError as e:
            warnings.append(f"skipped: {e}")
            continue
        wanted = (width,) if isinstance(width, int) else width
        if wanted is not None and embedding.widths != tuple(wanted):
            warnings.append(f"skipped: {path}: vectors {' + '.join(map(str, embedding.widths))} wide; this model's "
                            f"text encoders take {' + '.join(map(str, wanted))}")
        elif embedding.name in found:
            warnings.append(f"skipped: {path}: the name {embedding.name!r} is taken by {found[embedding.name].path}")
        else:
            found[embedding.name] = embedding
    return found, warnings


def _read_pickle(path: Path) -> dict:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        try:  # the checkpoint reader names the refusal (a global the pickle asks for) or the damage
            open_tensors(path)
        except CheckpointError as e:
            raise SdtorchError(f"{e}; {ACCEPTED}") from None
        raise SdtorchError(f"{path}: not a readable PyTorch file; {ACCEPTED}") from None
    if not isinstance(data, dict):
        raise SdtorchError(f"{path}: holds a {type(data).__name__}, not an embedding; {ACCEPTED}")
    return data


def _vectors(data: dict, path: Path) -> torch.Tensor:
    """The (n, width) float32 vectors of a loaded file, found as A1111 finds them."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # files saved as a ParameterDict
        if not isinstance(params, dict) or len(params) != 1:
            count = len(params) if isinstance(params, dict) else "no"
            raise SdtorchError(f"{path}: string_to_param holds {count} terms; an embedding has exactly one")
        tensor = next(iter(params.values()))
    else:
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1 or len(data) != 1:
            keys = ", ".join(list(map(str, data))[:4]) or "nothing"
            raise SdtorchError(f"{path}: not an embedding (it holds {keys}); {ACCEPTED}")
        tensor = next(iter(tensors.values()))
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.ndim not in (1, 2):
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise SdtorchError(f"{path}: embedding vectors must be a float (n, width) tensor, found {shape}")
    vectors = tensor.detach().reshape(-1, tensor.shape[-1]).to(torch.float32).contiguous()  # (n, width)
    if vectors.numel() == 0:
        raise SdtorchError(f"{path}: the embedding has no vectors")
    return vectors


def _optional(value, kind):
    return kind(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else None


# --- embeddings inside pictures ---------------------------------------------------------------


def _read_image(path: Path) -> dict | None:
    """The embedding dict a picture carries (text chunk first, then its data columns), or None."""
    try:
        with Image.open(path) as image:
            image.load()
            text = getattr(image, "text", {}) or {}
            if PNG_CHUNK in text:
                return _decode_tensors(_from_base64(text[PNG_CHUNK], path), path)
            packed = _unpack_data_columns(image)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise SdtorchError(f"{path}: not a readable picture ({e}); {ACCEPTED}") from None
    return None if packed is None else _decode_tensors(_from_json(packed, path), path)


def _from_base64(text: str, path: Path):
    try:
        return _from_json(base64.b64decode(text, validate=False), path)
    except binascii.Error as e:
        raise SdtorchError(f"{path}: its {PNG_CHUNK} text is not base64 ({e})") from None


def _from_json(raw: bytes, path: Path):
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SdtorchError(f"{path}: its embedding data is not JSON ({e})") from None


def _decode_tensors(value, path: Path):
    """A1111 writes each tensor as {"TORCHTENSOR": nested lists}; turn those back into tensors."""
    if isinstance(value, dict):
        if "TORCHTENSOR" in value:
            try:
                array = np.array(value["TORCHTENSOR"], dtype=np.float64)
            except (TypeError, ValueError):
                raise SdtorchError(f"{path}: an embedded tensor is not a numeric array") from None
            return torch.from_numpy(array)
        return {k: _decode_tensors(v, path) for k, v in value.items()}
    return value


def _lcg_nibbles(count: int) -> np.ndarray:
    """A1111's mask: a linear congruential generator (seed 0, a=1664525, c=1013904223, m=2^32), each
    value taken mod 255, low four bits."""
    out = np.empty(count, dtype=np.uint8)
    state = 0
    for i in range(count):
        state = (1664525 * state + 1013904223) & 0xFFFFFFFF
        out[i] = (state % 255) & 0x0F
    return out


def _unpack_data_columns(image: Image.Image) -> bytes | None:
    """A1111's `insert_image_data_embed`, read back: the picture, cropped to its non-black box, has a
    block of data columns on each side, split from it by a black column. The low nibbles of the left
    block and of the right block, each XORed with the LCG mask, are the low and high nibbles of the
    zlib-compressed JSON. None when the picture has no such blocks."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    lit = (pixels > 0).all(axis=2)
    rows, cols = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    if rows.size == 0:
        return None
    low = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] & 0x0F
    black = np.flatnonzero(low.sum(axis=(0, 2)) == 0)
    if black.size < 2:
        return None
    left, right = low[:, : black.min()], low[:, black.max() + 1 :]
    if left.shape != right.shape or left.size == 0:
        return None
    mask = _lcg_nibbles(left.size).reshape(left.shape)
    packed = (((right ^ mask) << 4) | (left ^ mask)).astype(np.uint8).tobytes()
    stream = zlib.decompressobj()
    try:
        data = stream.decompress(packed, MAX_PACKED_BYTES)
    except zlib.error:
        return None
    return data if stream.eof else None  # the blocks repeat the data to fill them: stop at its end
