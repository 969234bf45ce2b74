"""A standalone VAE in place of a model's own, as A1111's VAE choice: a single file (`.safetensors`,
`.ckpt`, `.pt`), e.g. `vae-ft-mse-840000-ema-pruned.ckpt`, with the original names with or without
`first_stage_model.`, or diffusers' names (a `vae/` folder, or its weights file alone).

The VAE must fit the model's VAE architecture; `build` checks every name and shape (with the model's
other networks as they are) before a weight is read, so a VAE that does not fit is one clear error.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sdtorch.errors import CheckpointError
from sdtorch.loading import diffusers_format as dfmt
from sdtorch.loading.build import NetworkSource, _build, _read_weights
from sdtorch.loading.diffusers_folder import _weight_files
from sdtorch.loading.hashing import model_hash
from sdtorch.loading.reader import TensorEntry, TensorFile, open_tensors
from sdtorch.model import StableDiffusion
from sdtorch.stored_weights import compute_dtype, keeps_stored
from sdtorch.vae import AutoencoderKL

# What full (unpruned) VAE checkpoints carry besides the weights: the training loss, EMA copies.
TOLERATED = ("loss.", "model_ema.")


def vae_record(path: str | os.PathLike) -> dict[str, str]:
    """What A1111 records of a chosen VAE: "VAE hash" (sha256 of the file, 10 hex digits; none for a
    folder) and "VAE" (the file's name, extension included, as A1111 writes it)."""
    path = Path(path)
    record = {"VAE hash": model_hash(path)} if path.is_file() else {}
    record["VAE"] = path.name
    return record


def load_vae(path: str | os.PathLike, model: StableDiffusion) -> AutoencoderKL:
    """The VAE stored at `path`, built for `model`'s VAE config, on its device and in its VAE's dtype."""
    path = Path(path)
    if path.is_dir():
        files = _weight_files(path / "vae" if (path / "vae").is_dir() else path)
        tensors = {name: entry for file in files for name, entry in file.tensors.items()}
        diffusers_names = True
    elif path.exists():
        tensors = _vae_tensors(open_tensors(path))
        diffusers_names = any(name.startswith("encoder.down_blocks.") for name in tensors)
    else:
        raise CheckpointError(f"{path}: no such VAE file or folder")
    source = NetworkSource()
    ours = model.vae.state_dict()
    if diffusers_names:
        table = dfmt.vae_module_names(model.config.vae)
        theirs = {name: dfmt.to_diffusers_name(name, table) for name in ours}
    else:
        theirs = {name: name for name in ours}
    for name, stored in theirs.items():
        if stored in tensors:
            source.entries[name] = tensors.pop(stored)
            source.stored_names[name] = stored
    source.unexpected = sorted(tensors)
    # The model's other networks, as they are, so that build's one check covers exactly the VAE.
    sources = {"vae": source}
    for name, net in model.networks().items():
        if name != "vae":
            sources[name] = _as_source(net)
    vae = _build(model.config, sources, path)["vae"]
    param = next(model.vae.parameters())  # the new VAE is held and computes as the model's own
    weights = "stored" if keeps_stored(model.vae) else "compute"
    _read_weights(vae, source, compute_dtype(model.vae), param.device, weights)
    return vae


def use_vae(model: StableDiffusion, path: str | os.PathLike) -> StableDiffusion:
    """`model` with the VAE at `path` in place of its own (in place; returns the model)."""
    model.vae = load_vae(path, model)
    return model


def _vae_tensors(file: TensorFile) -> dict[str, TensorEntry]:
    """The file's VAE tensors under the VAE's own names: a whole checkpoint's `first_stage_model.`
    part, or a VAE file's names as they are; what a VAE file carries besides (loss, EMA) left out."""
    prefix = "first_stage_model."
    names = list(file.tensors)
    if any(n.startswith(prefix) for n in names):
        return {n[len(prefix):]: e for n, e in file.tensors.items()
                if n.startswith(prefix) and not n[len(prefix):].startswith(TOLERATED)}
    return {n: e for n, e in file.tensors.items() if not n.startswith(TOLERATED)}


def _as_source(net: torch.nn.Module) -> NetworkSource:
    source = NetworkSource()
    for name, tensor in net.state_dict().items():
        source.entries[name] = TensorEntry(tuple(tensor.shape), tensor.dtype, lambda t=tensor: t)
        source.stored_names[name] = name
    return source
