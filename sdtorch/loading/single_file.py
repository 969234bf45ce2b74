"""Original (CompVis-layout) single-file checkpoints, `.safetensors` or `.ckpt`: plan a load by
stripping each network's family prefix, and write one back."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from safetensors.torch import save_file

from sdtorch.config import ModelConfig
from sdtorch.families import family_of
from sdtorch.loading.build import NetworkSource
from sdtorch.loading.detect import CONFIG_METADATA_KEY, detect_config, is_sdxl, normalise_names
from sdtorch.loading.openclip import SDXL_OPENCLIP, SDXL_OURS, has_openclip_tower, openclip_blocks, translate
from sdtorch.loading.reader import open_tensors
from sdtorch.model import StableDiffusion, networks_of


def save_checkpoint(model: StableDiffusion, path: str | os.PathLike) -> None:
    """Write the model as one `.safetensors` file in the original layout of its family, with its config
    in the metadata so that what shapes cannot show (head counts, groups) survives."""
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())})


def plan_single_file(path: Path) -> tuple[ModelConfig, dict[str, NetworkSource]]:
    file = open_tensors(path)
    tensors, stored_as = file.tensors, {}
    sdxl = is_sdxl(tensors)
    openclip = not sdxl and has_openclip_tower(tensors)
    if sdxl:  # SDXL: the bigG tower under our CLIP names, every block and the projection kept
        tensors, stored_as = translate(tensors, openclip_blocks(tensors, SDXL_OPENCLIP), SDXL_OPENCLIP, SDXL_OURS,
                                       projection=True)
    elif openclip:  # SD 2.x: the OpenCLIP tower under our CLIP names, its last block left out
        keep = openclip_blocks(tensors) - 1
        if CONFIG_METADATA_KEY in file.metadata:
            keep = ModelConfig.from_dict(json.loads(file.metadata[CONFIG_METADATA_KEY])).text.layers
        tensors, stored_as = translate(tensors, keep)
    renamed = normalise_names(list(tensors))
    shapes = {renamed[name]: entry.shape for name, entry in tensors.items()}
    config = detect_config(shapes, file.metadata, path, openclip=openclip, sdxl=sdxl)
    if openclip and CONFIG_METADATA_KEY not in file.metadata:
        config = _sd2_prediction(config, tensors)
    family = family_of(config.family)
    sources = {name: NetworkSource() for name in networks_of(config)}
    for stored, entry in tensors.items():
        name = renamed[stored]
        if name.startswith(family.tolerated):
            continue
        for net_name, prefix in family.prefixes.items():
            if name.startswith(prefix):
                source = sources[net_name]
                source.entries[name[len(prefix) :]] = entry
                source.stored_names[name[len(prefix) :]] = stored_as.get(stored, stored)
    return config, sources


# ComfyUI's test (supported_models.SD20.model_type): SD 2.x 768-v UNets have a markedly wider spread in
# this norm's bias than the 512 epsilon models. A heuristic on real weights, as in ComfyUI; the
# file's sdtorch config, where present, says it outright.
V_PREDICTION_PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_PREDICTION_STD = 0.09


def _sd2_prediction(config: ModelConfig, tensors) -> ModelConfig:
    probe = tensors.get(V_PREDICTION_PROBE)
    if config.unet.in_channels != 4 or probe is None:  # inpainting models predict epsilon
        v = False
    else:
        v = probe.read().float().std(unbiased=False).item() > V_PREDICTION_STD
    return dataclasses.replace(
        config, prediction_type="v_prediction" if v else "epsilon", image_size=768 if v else 512
    )
