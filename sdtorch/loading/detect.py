"""Tell the architecture of an original (CompVis-layout) single-file checkpoint from its tensors.

As ComfyUI's model detection does: which names exist and their shapes give every
hyper-parameter but two that shapes cannot show (attention head count and GroupNorm groups);
those come from the checkpoint's `sdtorch.config` metadata when sdtorch wrote it, else from the
SD 1.x convention.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from sdtorch.config import CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig
from sdtorch.errors import CheckpointError
from sdtorch.families import SD1, SD2, SDXL, UNSUPPORTED

UNET = SD1.prefixes["unet"]
VAE = SD1.prefixes["vae"]
TEXT = SD1.prefixes["text_encoder"]
CONFIG_METADATA_KEY = "sdtorch.config"


def normalise_names(names: list[str]) -> dict[str, str]:
    """Map each stored name to the name our modules use, for the spellings real files vary in."""
    out = {}
    for name in names:
        new = name
        # Files written by older transformers lack the `text_model.` level.
        if new.startswith("cond_stage_model.transformer.") and not new.startswith(TEXT):
            new = TEXT + new[len("cond_stage_model.transformer.") :]
        out[name] = new
    return out


def is_sdxl(names) -> bool:
    """SDXL base: both of its embedders (CLIP-L, OpenCLIP bigG) are in the file."""
    return all(any(name.startswith(marker) for name in names) for marker in SDXL.markers)


def detect_config(
    shapes: dict[str, tuple[int, ...]], metadata: dict[str, str], path: Path, openclip: bool = False,
    sdxl: bool = False,
) -> ModelConfig:
    """ModelConfig of an SD 1.x, 2.x or XL checkpoint (2.x: `openclip`, its text tower translated to our
    names; XL: `sdxl`, as `is_sdxl` tells from the stored names, its second tower translated), or a
    CheckpointError naming what it is instead."""
    if CONFIG_METADATA_KEY in metadata:
        try:
            return ModelConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
        except (json.JSONDecodeError, TypeError) as e:
            raise CheckpointError(f"{path}: its '{CONFIG_METADATA_KEY}' metadata is unreadable: {e}") from None
    if sdxl:
        return _sdxl_config(shapes, path)
    for marker, family in UNSUPPORTED:
        if any(name.startswith(marker) for name in shapes):
            raise CheckpointError(
                f"{path}: this is {family}, which sdtorch does not load; it runs SD 1.x, 2.x and SDXL base"
            )
    if UNET + "input_blocks.0.0.weight" not in shapes:
        sample = ", ".join(sorted(shapes)[:3]) or "none"
        raise CheckpointError(
            f"{path}: not a Stable Diffusion checkpoint: no '{UNET}*' tensors (first names: {sample})"
        )
    try:
        if openclip:
            family = SD2
            text = dataclasses.replace(_text_config(shapes), activation="gelu")
            unet = dataclasses.replace(_unet_config(shapes), head_dim=64)  # SD 2.x: 64-wide heads at every level
        else:
            family, text, unet = SD1, _text_config(shapes), _unet_config(shapes)
        return ModelConfig(family=family.name, text=text, unet=unet, vae=_vae_config(shapes),
                           prediction_type=family.prediction_type, image_size=family.image_size,
                           default_cfg_scale=family.cfg_scale)
    except KeyError as e:
        raise CheckpointError(f"{path}: incomplete checkpoint: missing tensor {e}") from None


def _sdxl_config(shapes, path: Path) -> ModelConfig:
    try:
        text_2 = _text_config(shapes, SDXL.prefixes["text_encoder_2"])
        projection = shapes[SDXL.prefixes["text_encoder_2"] + "text_projection.weight"][0]
        unet = _unet_config(shapes)
        return ModelConfig(
            family=SDXL.name,
            text=_text_config(shapes, SDXL.prefixes["text_encoder"]),
            text_2=dataclasses.replace(text_2, activation="gelu", projection_dim=projection),
            unet=dataclasses.replace(unet, head_dim=64, adm_in_channels=shapes[UNET + "label_emb.0.0.weight"][1]),
            vae=dataclasses.replace(_vae_config(shapes), scaling_factor=SDXL.latent_format.scale),
            prediction_type=SDXL.prediction_type,
            image_size=SDXL.image_size,
            default_cfg_scale=SDXL.cfg_scale,
            zero_empty_negative=True,  # diffusers' StableDiffusionXLPipeline default for the base model
            timestep_spacing="leading",  # SDXL base's scheduler config
        )
    except KeyError as e:
        raise CheckpointError(f"{path}: incomplete SDXL checkpoint: missing tensor {e}") from None


def _indices(shapes, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for name in shapes if (m := regex.match(name))})


def _unet_config(shapes) -> UNetConfig:
    ch, in_ch = shapes[UNET + "input_blocks.0.0.weight"][:2]
    levels: list[list[int]] = [[]]  # output channels of each res-block, grouped by level
    depths: dict[int, int] = {}  # transformer blocks at each level with attention
    for i in _indices(shapes, re.escape(UNET) + r"input_blocks\.(\d+)\.")[1:]:
        block = f"{UNET}input_blocks.{i}."
        if block + "0.op.weight" in shapes:
            levels.append([])
            continue
        levels[-1].append(shapes[block + "0.in_layers.2.weight"][0])
        if block + "1.proj_in.weight" in shapes:
            depths[len(levels) - 1] = len(_indices(shapes, re.escape(block) + r"1\.transformer_blocks\.(\d+)\."))
    attention_levels = sorted(depths)
    if len(set(depths.values())) <= 1:
        depth = next(iter(depths.values()), 1)
    else:  # SDXL: 0, 2, 10
        depth = tuple(depths.get(level, 0) for level in range(len(levels)))
    first_attn = next(n for n in shapes if n.startswith(UNET) and n.endswith("attn2.to_k.weight"))
    proj_in = shapes[UNET + "middle_block.1.proj_in.weight"]
    context_dim = shapes[first_attn][1]
    return UNetConfig(
        in_channels=in_ch,
        out_channels=shapes[UNET + "out.2.weight"][0],
        model_channels=ch,
        channel_mult=tuple(level[0] // ch for level in levels),
        num_res_blocks=len(levels[0]),
        attention_levels=tuple(attention_levels),
        num_heads=8,  # SD 1.x fixes 8 heads (SD 2.x: head_dim, set by the caller)
        transformer_depth=depth,
        context_dim=context_dim,
        use_linear_proj=len(proj_in) == 2,
    )


def _vae_config(shapes) -> VAEConfig:
    base, in_ch = shapes[VAE + "encoder.conv_in.weight"][:2]
    levels = _indices(shapes, re.escape(VAE) + r"encoder\.down\.(\d+)\.")
    return VAEConfig(
        in_channels=in_ch,
        out_channels=shapes[VAE + "decoder.conv_out.weight"][0],
        base_channels=base,
        channel_mult=tuple(shapes[f"{VAE}encoder.down.{i}.block.0.conv1.weight"][0] // base for i in levels),
        num_res_blocks=len(_indices(shapes, re.escape(VAE) + r"encoder\.down\.0\.block\.(\d+)\.")),
        latent_channels=shapes[VAE + "post_quant_conv.weight"][0],
    )


def _text_config(shapes, prefix: str = TEXT) -> CLIPTextConfig:
    vocab, width = shapes[prefix + "embeddings.token_embedding.weight"]
    return CLIPTextConfig(
        vocab_size=vocab,
        max_positions=shapes[prefix + "embeddings.position_embedding.weight"][0],
        width=width,
        layers=len(_indices(shapes, re.escape(prefix) + r"encoder\.layers\.(\d+)\.")),
        heads=width // 64,  # CLIP's text towers use 64-wide heads
        mlp_width=shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0],
    )
