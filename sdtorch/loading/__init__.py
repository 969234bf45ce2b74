"""Load a Stable Diffusion model from the files people have: an original single-file checkpoint
(`.safetensors`, `.ckpt`) or a diffusers folder, in fp32, fp16 or bf16.

The architecture is detected from the files. Every name and shape is checked before any weight
is read, so a checkpoint that does not fit fails with one message and no half-loaded model. The
networks are built on the meta device and each tensor is read once, converted, and assigned in
place: loading never holds two copies of the weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdtorch.config import ModelConfig
from sdtorch.errors import CheckpointError, SdtorchError
from sdtorch.loading import diffusers_format as dfmt
from sdtorch.loading.detect import CONFIG_METADATA_KEY, detect_config, normalise_names
from sdtorch.loading.reader import TensorEntry, TensorFile, open_tensors
from sdtorch.model import NETWORKS, StableDiffusion

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Single-file tensors inside a network's prefix that are not weights of the network we run.
TOLERATED = ("cond_stage_model.transformer.text_model.embeddings.position_ids", "first_stage_model.loss.")


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


def load_model(path: str | os.PathLike, dtype: str | torch.dtype = torch.float32, device="cpu") -> StableDiffusion:
    """Load an SD 1.x model from a single-file checkpoint or a diffusers folder."""
    path = Path(path)
    dtype = parse_dtype(dtype)
    if path.is_dir():
        config, sources = _plan_diffusers_folder(path)
    elif path.exists():
        config, sources = _plan_single_file(path)
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    networks = _build(config, sources, path)
    for name, net in networks.items():
        _read_weights(net, sources[name], dtype, device)
    return StableDiffusion(config=config, source=str(path), **networks)


def save_checkpoint(model: StableDiffusion, path: str | os.PathLike) -> None:
    """Write the model as one `.safetensors` file in the original SD 1.x layout, with its config
    in the metadata so that what shapes cannot show (head counts, groups) survives."""
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())})


def _plan_single_file(path: Path) -> tuple[ModelConfig, dict[str, NetworkSource]]:
    file = open_tensors(path)
    renamed = normalise_names(list(file.tensors))
    shapes = {renamed[name]: entry.shape for name, entry in file.tensors.items()}
    config = detect_config(shapes, file.metadata, path)
    sources = {name: NetworkSource() for name in NETWORKS}
    for stored, entry in file.tensors.items():
        name = renamed[stored]
        if name.startswith(TOLERATED):
            continue
        for net_name, (_, _, prefix) in NETWORKS.items():
            if name.startswith(prefix):
                source = sources[net_name]
                source.entries[name[len(prefix) :]] = entry
                source.stored_names[name[len(prefix) :]] = stored
    return config, sources


def _plan_diffusers_folder(path: Path) -> tuple[ModelConfig, dict[str, NetworkSource]]:
    if not (path / "model_index.json").is_file() and not (path / "unet" / "config.json").is_file():
        raise CheckpointError(f"{path}: a folder, but not a diffusers model (no model_index.json or unet/config.json)")
    unet_json = dfmt.read_json(path / "unet" / "config.json")
    unet_cfg = dfmt.unet_config(unet_json, path / "unet")
    vae_cfg = dfmt.vae_config(dfmt.read_json(path / "vae" / "config.json"))
    text_cfg = dfmt.text_config(dfmt.read_json(path / "text_encoder" / "config.json"))
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    schedule = dfmt.read_json(scheduler_file) if scheduler_file.is_file() else {}
    config = ModelConfig(
        image_size=unet_json.get("sample_size", 64) * vae_cfg.downscale,
        text=text_cfg,
        unet=unet_cfg,
        vae=vae_cfg,
        prediction_type=schedule.get("prediction_type", "epsilon"),
        beta_start=schedule.get("beta_start", 0.00085),
        beta_end=schedule.get("beta_end", 0.012),
        num_train_timesteps=schedule.get("num_train_timesteps", 1000),
    )
    # The text encoder keeps transformers' names, ours too: an empty table.
    name_tables = {"unet": dfmt.unet_module_names(unet_cfg), "vae": dfmt.vae_module_names(vae_cfg), "text_encoder": {}}
    sources = {}
    for net_name, (kind, part, _) in NETWORKS.items():
        folder = path / net_name
        files = _weight_files(folder)
        tensors = {}
        for file in files:
            for stored, entry in file.tensors.items():
                # transformers 4 stores the text tower under `text_model.`, transformers 5 does not
                name = stored.removeprefix("text_model.") if net_name == "text_encoder" else stored
                tensors[name] = (stored, entry)
        with torch.device("meta"):
            ours = kind(getattr(config, part)).state_dict()
        source = NetworkSource()
        for name in ours:
            theirs = dfmt.to_diffusers_name(name, name_tables[net_name])
            if theirs in tensors:
                stored, entry = tensors.pop(theirs)
                source.entries[name] = entry
                source.stored_names[name] = f"{net_name}/{stored}"
        source.unexpected = [f"{net_name}/{tensors[n][0]}" for n in tensors if not n.endswith("position_ids")]
        sources[net_name] = source
    return config, sources


def _weight_files(folder: Path) -> list[TensorFile]:
    """The weights of one diffusers sub-folder: one file, a sharded set, fp32 preferred to fp16."""
    for stem in ("diffusion_pytorch_model", "model"):
        for variant in ("", ".fp16"):
            for suffix in (".safetensors", ".bin"):
                index = folder / f"{stem}{variant}{suffix}.index.json"
                if index.is_file():
                    shards = sorted(set(dfmt.read_json(index)["weight_map"].values()))
                    return [open_tensors(folder / shard) for shard in shards]
                single = folder / f"{stem}{variant}{suffix}"
                if single.is_file():
                    return [open_tensors(single)]
    if folder.name == "text_encoder":
        stem = "model.safetensors or pytorch_model.bin"
    else:
        stem = "diffusion_pytorch_model.safetensors or .bin"
    raise CheckpointError(f"{folder}: no weights found (expected {stem})")


def _build(config: ModelConfig, sources: dict[str, NetworkSource], path: Path) -> dict[str, torch.nn.Module]:
    """Networks on the meta device, after checking every name and shape against the sources."""
    networks, missing, unexpected, misshapen = {}, [], [], []
    for net_name, (kind, part, prefix) in NETWORKS.items():
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

