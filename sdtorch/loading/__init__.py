"""Load a Stable Diffusion model from the files people have: an original single-file checkpoint
(`.safetensors`, `.ckpt`; `single_file`) or a diffusers folder (`diffusers_folder`), in fp32, fp16
or bf16.

The architecture is detected from the files (`detect`); `build` checks every name and shape before
any weight is read, so a checkpoint that does not fit fails with one message and no half-loaded
model, and reads each tensor once into its final place.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sdtorch.errors import CheckpointError
from sdtorch.loading.build import DTYPES, assemble, parse_dtype, parse_weights
from sdtorch.loading.diffusers_folder import plan_diffusers_folder
from sdtorch.loading.single_file import plan_single_file, save_checkpoint
from sdtorch.model import StableDiffusion

__all__ = ["DTYPES", "load_model", "parse_dtype", "save_checkpoint"]


def load_model(
    path: str | os.PathLike, dtype: str | torch.dtype = torch.float32, device="cpu", weights: str = "compute"
) -> StableDiffusion:
    """Load a model from a single-file checkpoint or a diffusers folder, computing in `dtype`.
    `weights="stored"` keeps 16-bit weights as stored when computing in fp32 (`sdtorch.stored_weights`)."""
    path = Path(path)
    dtype = parse_dtype(dtype)
    weights = parse_weights(weights)
    if path.is_dir():
        config, sources = plan_diffusers_folder(path)
    elif path.exists():
        config, sources = plan_single_file(path)
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    return assemble(config, sources, path, dtype, device, weights)
