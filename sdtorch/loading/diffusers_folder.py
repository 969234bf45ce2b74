"""Diffusers-format folders (model_index.json, unet/, vae/, text_encoder/, scheduler/): plan a load
through the name tables of `diffusers_format`, the schedule from the folder's scheduler config."""

from __future__ import annotations

from pathlib import Path

import torch

from sdtorch.config import ModelConfig
from sdtorch.diffusion import NoiseSchedule, check_prediction_type
from sdtorch.errors import CheckpointError, SdtorchError
from sdtorch.families import SD1, SD2, SDXL
from sdtorch.loading import diffusers_format as dfmt
from sdtorch.loading.build import NetworkSource
from sdtorch.loading.reader import TensorFile, open_tensors
from sdtorch.model import networks_of
from sdtorch.samplers.schedules import SPACINGS


def plan_diffusers_folder(path: Path) -> tuple[ModelConfig, dict[str, NetworkSource]]:
    if not (path / "model_index.json").is_file() and not (path / "unet" / "config.json").is_file():
        raise CheckpointError(f"{path}: a folder, but not a diffusers model (no model_index.json or unet/config.json)")
    unet_json = dfmt.read_json(path / "unet" / "config.json")
    unet_cfg = dfmt.unet_config(unet_json, path / "unet")
    vae_cfg = dfmt.vae_config(dfmt.read_json(path / "vae" / "config.json"))
    if not (path / "text_encoder" / "config.json").is_file() and (path / "text_encoder_2").is_dir():
        raise CheckpointError(f"{path}: this is the SDXL refiner (one OpenCLIP text encoder), which sdtorch "
                              "does not load; it runs SD 1.x, 2.x and SDXL base")
    text_cfg = dfmt.text_config(dfmt.read_json(path / "text_encoder" / "config.json"))
    text_2 = path / "text_encoder_2" / "config.json"
    text_2_cfg = dfmt.text_config(dfmt.read_json(text_2)) if text_2.is_file() else None
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    schedule = dfmt.read_json(scheduler_file) if scheduler_file.is_file() else {}
    index = dfmt.read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    defaults = ModelConfig()
    # SD 2.x's OpenCLIP tower (converted to transformers' CLIP) is the GELU one; OpenAI's uses quick GELU.
    family = SDXL if text_2_cfg is not None else SD2 if text_cfg.activation == "gelu" else SD1
    config = ModelConfig(
        family=family.name,
        default_cfg_scale=family.cfg_scale,
        image_size=unet_json.get("sample_size", 64) * vae_cfg.downscale,
        text=text_cfg,
        text_2=text_2_cfg,
        zero_empty_negative=family is SDXL and index.get("force_zeros_for_empty_prompt", True),
        unet=unet_cfg,
        vae=vae_cfg,
        prediction_type=schedule.get("prediction_type", defaults.prediction_type),
        beta_start=schedule.get("beta_start", defaults.beta_start),
        beta_end=schedule.get("beta_end", defaults.beta_end),
        beta_schedule=schedule.get("beta_schedule", defaults.beta_schedule),
        num_train_timesteps=schedule.get("num_train_timesteps", defaults.num_train_timesteps),
        timestep_spacing=schedule.get("timestep_spacing"),
    )
    _check_schedule(config, schedule, scheduler_file)
    # The text encoder keeps transformers' names, ours too: an empty table.
    name_tables = {"unet": dfmt.unet_module_names(unet_cfg), "vae": dfmt.vae_module_names(vae_cfg),
                   "text_encoder": {}, "text_encoder_2": {}}
    sources = {}
    for net_name, (kind, part) in networks_of(config).items():
        folder = path / net_name
        files = _weight_files(folder)
        tensors = {}
        for file in files:
            for stored, entry in file.tensors.items():
                # transformers 4 stores the text tower under `text_model.`, transformers 5 does not
                name = stored.removeprefix("text_model.") if net_name.startswith("text_encoder") else stored
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


def _check_schedule(config: ModelConfig, stored: dict, scheduler_file: Path) -> None:
    """A schedule we cannot reproduce is refused at load, naming the file, rather than run on SD's."""
    if stored.get("trained_betas") is not None:
        raise CheckpointError(f"{scheduler_file}: explicit trained_betas are not supported; give beta_start/beta_end")
    if config.timestep_spacing not in (None, *SPACINGS):
        raise CheckpointError(f"{scheduler_file}: unknown timestep_spacing {config.timestep_spacing!r}; "
                              f"accepted: {', '.join(SPACINGS)}")
    try:
        check_prediction_type(config.prediction_type)
        NoiseSchedule.of(config)
    except SdtorchError as e:
        raise CheckpointError(f"{scheduler_file}: {e}") from None


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
