"""Turn a plan (which stored tensor feeds which parameter) into networks: every name and shape is
checked against the architecture before any weight is read, then each tensor is read once,
converted, and assigned in place, so loading never holds two copies of the weights."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdtorch.config import ModelConfig
from sdtorch.errors import CheckpointError, SdtorchError
from sdtorch.families import family_of
from sdtorch.loading.reader import TensorEntry
from sdtorch.model import NETWORKS, StableDiffusion

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif dtype in DTYPES:
        return DTYPES[dtype]
    raise SdtorchError(f"unsupported dtype {dtype!r}; accepted: {', '.join(DTYPES)}")


@dataclass
class NetworkSource:
    """Where each of one network's parameters comes from, under our names, and what is left over."""

    entries: dict[str, TensorEntry] = field(default_factory=dict)
    stored_names: dict[str, str] = field(default_factory=dict)  # our name -> the name in the file
    unexpected: list[str] = field(default_factory=list)


def assemble(
    config: ModelConfig, sources: dict[str, NetworkSource], path: Path, dtype: torch.dtype, device
) -> StableDiffusion:
    networks = _build(config, sources, path)
    for name, net in networks.items():
        _read_weights(net, sources[name], dtype, device)
    return StableDiffusion(config=config, source=os.fspath(path), **networks)


def _build(config: ModelConfig, sources: dict[str, NetworkSource], path: Path) -> dict[str, torch.nn.Module]:
    """Networks on the meta device, after checking every name and shape against the sources."""
    networks, missing, unexpected, misshapen = {}, [], [], []
    prefixes = family_of(config.family).prefixes
    for net_name, (kind, part) in NETWORKS.items():
        prefix = prefixes[net_name]
        with torch.device("meta"):
            net = kind(getattr(config, part))
        source = sources[net_name]
        expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        # Absent from a diffusers folder, a name is reported as we call it, with the network's prefix.
        missing += [prefix + k for k in expected if k not in source.entries]
        unexpected += source.unexpected + [source.stored_names[k] for k in source.entries if k not in expected]
        for k, shape in expected.items():
            entry = source.entries.get(k)
            if entry is not None and not _fits(entry.shape, shape):
                misshapen.append(f"{source.stored_names[k]} {list(entry.shape)} (expected {list(shape)})")
        networks[net_name] = net
    problems = [
        f"{len(items)} {what}: {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
        for what, items in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", misshapen))
        if items
    ]
    if problems:
        raise CheckpointError(f"{path}: tensors do not fit the detected architecture: " + "; ".join(problems))
    return networks


def _fits(stored: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    # 1x1 convolutions stored as linear layers (diffusers' VAE attention) fit by a reshape.
    return stored == expected or (expected[2:] == (1, 1) and stored == expected[:2])


def _read_weights(net: torch.nn.Module, source: NetworkSource, dtype: torch.dtype, device) -> None:
    state = {}
    for name, param in net.state_dict().items():
        tensor = source.entries[name].read().reshape(param.shape)
        state[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
    net.load_state_dict(state, assign=True, strict=True)
    net.eval().requires_grad_(False)

