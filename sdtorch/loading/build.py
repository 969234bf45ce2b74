"""Turn a plan (which stored tensor feeds which parameter) into networks: every name and shape is
checked against the architecture before any weight is read, then each tensor is read once,
converted, and assigned in place, so loading never holds two copies of the weights.

`weights="stored"` keeps the large layers' 16-bit weights as the file stores them when the model
computes in fp32 (`sdtorch.stored_weights`: exact, half the memory); "compute" converts them all;
"int8" (the low-memory mode) quantises the UNet's Linear and Conv2d weights to int8 as each is read
(not exact: a quarter of fp32's memory) and keeps the other networks as "stored"."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from sdtorch import stored_weights
from sdtorch.config import ModelConfig
from sdtorch.errors import CheckpointError, SdtorchError
from sdtorch.families import family_of
from sdtorch.loading.reader import TensorEntry
from sdtorch.model import StableDiffusion, networks_of
from sdtorch.runtime import return_freed_memory

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WEIGHTS = ("compute", "stored", "int8")
QUANTIZED_NETWORKS = ("unet",)  # int8 where most of the weights are; the others as stored


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


def parse_weights(weights: str) -> str:
    if weights not in WEIGHTS:
        raise SdtorchError(f"unknown weights mode {weights!r}; accepted: {', '.join(WEIGHTS)}")
    return weights


def assemble(
    config: ModelConfig, sources: dict[str, NetworkSource], path: Path, dtype: torch.dtype, device,
    weights: str = "compute",
) -> StableDiffusion:
    networks = _build(config, sources, path)
    for name, net in networks.items():
        mode = "stored" if weights == "int8" and name not in QUANTIZED_NETWORKS else weights
        _read_weights(net, sources[name], dtype, device, mode)
    return_freed_memory()  # the conversions' temporaries, freed between the weights they made
    return StableDiffusion(config=config, source=os.fspath(path), **networks)


# Initialising a network on the meta device computes nothing, yet costs: nn.init.normal_ on a meta
# tensor goes through a Python reference that imports torch._dynamo (2-3 s on a cold process).
# The weights are read from the file right after, so the initialisers are skipped there.
_INITIALISERS = {
    nn.init.normal_, nn.init.uniform_, nn.init.trunc_normal_, nn.init.constant_, nn.init.ones_, nn.init.zeros_,
    nn.init.kaiming_uniform_, nn.init.kaiming_normal_, nn.init.xavier_uniform_, nn.init.xavier_normal_,
    torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_,
}


class _NoInit(TorchFunctionMode):
    """Within it, weight initialisers given a meta tensor return it untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INITIALISERS:
            tensor = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def build_on_meta(kind: type[nn.Module], config) -> nn.Module:
    """`kind(config)` with every tensor on the meta device and no initialiser run."""
    with torch.device("meta"), _NoInit():
        return kind(config)


def _build(config: ModelConfig, sources: dict[str, NetworkSource], path: Path) -> dict[str, torch.nn.Module]:
    """Networks on the meta device, after checking every name and shape against the sources."""
    networks, missing, unexpected, misshapen = {}, [], [], []
    prefixes = family_of(config.family).prefixes
    for net_name, (kind, part) in networks_of(config).items():
        prefix = prefixes[net_name]
        net = build_on_meta(kind, getattr(config, part))
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


def _read_weights(
    net: torch.nn.Module, source: NetworkSource, dtype: torch.dtype, device, weights: str = "compute"
) -> None:
    weights = parse_weights(weights)
    storable = stored_weights.storable_names(net) if weights == "stored" else set()
    quantizable = stored_weights.quantizable_names(net) if weights == "int8" else set()
    state, scales = {}, {}
    for name, param in net.state_dict().items():
        entry = source.entries[name]
        if name in quantizable:
            wide = entry.read_as(torch.float32).reshape(param.shape)
            tensor, scale = stored_weights.quantize_int8(wide, overwrite=entry.owned)
            scales[name] = scale.to(dtype=dtype, device=device)
            if len(scales) % 64 == 0:  # each quantisation's fp32 temporaries leave holes between the int8 results
                return_freed_memory()
        else:
            keep = name in storable and stored_weights.keeps_exactly(entry.dtype, dtype)
            if keep and entry.map is not None and torch.device(device).type == "cpu":
                tensor = entry.map().reshape(param.shape)  # resident once used (sdtorch.loading.reader)
            else:
                tensor = entry.read_as(None if keep else dtype).reshape(param.shape)
        state[name] = tensor.to(device=device)
    net.requires_grad_(False)  # assign keeps each parameter's flag, and an int8 one cannot require gradients
    net.load_state_dict(state, assign=True, strict=True)
    stored_weights.attach_scales(net, scales)
    stored_weights.keep_stored(net, dtype)
    net.eval()

