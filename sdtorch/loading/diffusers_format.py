"""Diffusers-format folders: their config.json files, and the one name table per network,
generated from our config, that maps our (CompVis) parameter names to diffusers' names.

The table is built at module level (`input_blocks.4.0` <-> `down_blocks.1.resnets.0`) and then
inside each module kind (a res-block's `in_layers.2` <-> `conv1`), so it follows any config.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdtorch.config import CLIPTextConfig, UNetConfig, VAEConfig
from sdtorch.errors import CheckpointError

UNET_RESBLOCK = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
VAE_RESBLOCK = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: missing; a diffusers folder needs unet/, vae/ and text_encoder/ configs"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None


def unet_config(cfg: dict, path: Path) -> UNetConfig:
    channels = list(cfg["block_out_channels"])
    down = list(cfg.get("down_block_types", []))
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)  # diffusers' legacy naming
    per_level = list(heads) if isinstance(heads, list) else [heads] * len(channels)
    # One head count everywhere (SD 1.x), or one head width everywhere (SD 2.x: 5, 10, 20, 20 heads of 64).
    widths = {c // h for c, h in zip(channels, per_level)}
    heads = set(per_level)
    head_dim = widths.pop() if len(heads) != 1 and len(widths) == 1 else None
    depth = cfg.get("transformer_layers_per_block", 1)
    per_block = isinstance(depth, list) and any(isinstance(d, list) for d in depth)  # a depth per res-block
    if isinstance(depth, list) and not per_block:  # SDXL: [1, 2, 10], the first level without attention
        depth = tuple(d if t == "CrossAttnDownBlock2D" else 0 for d, t in zip(depth, down))
        depth = depth if len({d for d in depth if d}) > 1 else max(depth)
    added = cfg.get("addition_embed_type")
    unsupported = {
        "per-level head counts of varying width": len(heads) != 1 and head_dim is None,
        "transformer depths given per res-block": per_block,
        "class conditioning": bool(cfg.get("class_embed_type")),
        f"added conditioning {added!r}": added not in (None, "text_time"),
        "added time embeddings of a width other than 256": added == "text_time" and cfg.get(
            "addition_time_embed_dim", 256) != 256,
        "a non-standard time embedding": not cfg.get("flip_sin_to_cos", True) or cfg.get("freq_shift", 0) != 0,
        "unknown block types": any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down),
    }
    found = [name for name, bad in unsupported.items() if bad]
    if found:
        raise CheckpointError(f"{path}: UNet with {', '.join(found)}; sdtorch runs SD 1.x-style UNets")
    return UNetConfig(
        in_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("out_channels", 4),
        model_channels=channels[0],
        channel_mult=tuple(c // channels[0] for c in channels),
        num_res_blocks=cfg.get("layers_per_block", 2),
        attention_levels=tuple(i for i, t in enumerate(down) if t == "CrossAttnDownBlock2D"),
        num_heads=per_level[0],
        head_dim=head_dim,
        transformer_depth=depth,
        context_dim=cfg.get("cross_attention_dim", 768),
        use_linear_proj=cfg.get("use_linear_projection", False),
        norm_groups=cfg.get("norm_num_groups", 32),
        adm_in_channels=cfg.get("projection_class_embeddings_input_dim") if added == "text_time" else None,
    )


def vae_config(cfg: dict) -> VAEConfig:
    channels = list(cfg["block_out_channels"])
    return VAEConfig(
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        base_channels=channels[0],
        channel_mult=tuple(c // channels[0] for c in channels),
        num_res_blocks=cfg.get("layers_per_block", 2),
        latent_channels=cfg.get("latent_channels", 4),
        norm_groups=cfg.get("norm_num_groups", 32),
        scaling_factor=cfg.get("scaling_factor", 0.18215),
    )


def text_config(cfg: dict) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=cfg.get("vocab_size", 49408),
        max_positions=cfg.get("max_position_embeddings", 77),
        width=cfg["hidden_size"],
        layers=cfg["num_hidden_layers"],
        heads=cfg["num_attention_heads"],
        mlp_width=cfg["intermediate_size"],
        activation=cfg.get("hidden_act", "quick_gelu"),
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
        # transformers' CLIPTextModelWithProjection (SDXL's second tower) adds `text_projection`
        projection_dim=cfg.get("projection_dim") if "CLIPTextModelWithProjection" in cfg.get("architectures", [])
        else None,
    )


def unet_module_names(cfg: UNetConfig) -> dict[str, tuple[str, dict[str, str]]]:
    """Our module prefix -> (diffusers module prefix, the renames inside that module)."""
    same: dict[str, str] = {}
    table = {
        "time_embed.0": ("time_embedding.linear_1", same),
        "time_embed.2": ("time_embedding.linear_2", same),
        "label_emb.0.0": ("add_embedding.linear_1", same),  # SDXL
        "label_emb.0.2": ("add_embedding.linear_2", same),
        "input_blocks.0.0": ("conv_in", same),
        "middle_block.0": ("mid_block.resnets.0", UNET_RESBLOCK),
        "middle_block.1": ("mid_block.attentions.0", same),
        "middle_block.2": ("mid_block.resnets.1", UNET_RESBLOCK),
        "out.0": ("conv_norm_out", same),
        "out.2": ("conv_out", same),
    }
    levels, per_level = len(cfg.channel_mult), cfg.num_res_blocks
    block = 1
    for level in range(levels):
        for j in range(per_level):
            table[f"input_blocks.{block}.0"] = (f"down_blocks.{level}.resnets.{j}", UNET_RESBLOCK)
            table[f"input_blocks.{block}.1"] = (f"down_blocks.{level}.attentions.{j}", same)
            block += 1
        if level != levels - 1:
            table[f"input_blocks.{block}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", same)
            block += 1
    for up in range(levels):  # diffusers' up_blocks.0 is our lowest resolution, as output_blocks start
        level = levels - 1 - up
        for j in range(per_level + 1):
            block = up * (per_level + 1) + j
            table[f"output_blocks.{block}.0"] = (f"up_blocks.{up}.resnets.{j}", UNET_RESBLOCK)
            table[f"output_blocks.{block}.1"] = (f"up_blocks.{up}.attentions.{j}", same)
        if level != 0:
            position = 2 if level in cfg.attention_levels else 1
            table[f"output_blocks.{block}.{position}.conv"] = (f"up_blocks.{up}.upsamplers.0.conv", same)
    return table


def vae_module_names(cfg: VAEConfig) -> dict[str, tuple[str, dict[str, str]]]:
    same: dict[str, str] = {}
    levels = len(cfg.channel_mult)
    table = {"quant_conv": ("quant_conv", same), "post_quant_conv": ("post_quant_conv", same)}
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_in"] = (f"{part}.conv_in", same)
        table[f"{part}.conv_out"] = (f"{part}.conv_out", same)
        table[f"{part}.norm_out"] = (f"{part}.conv_norm_out", same)
        table[f"{part}.mid.block_1"] = (f"{part}.mid_block.resnets.0", VAE_RESBLOCK)
        table[f"{part}.mid.attn_1"] = (f"{part}.mid_block.attentions.0", VAE_ATTENTION)
        table[f"{part}.mid.block_2"] = (f"{part}.mid_block.resnets.1", VAE_RESBLOCK)
    for i in range(levels):
        for j in range(cfg.num_res_blocks):
            table[f"encoder.down.{i}.block.{j}"] = (f"encoder.down_blocks.{i}.resnets.{j}", VAE_RESBLOCK)
        table[f"encoder.down.{i}.downsample.conv"] = (f"encoder.down_blocks.{i}.downsamplers.0.conv", same)
        up = levels - 1 - i  # our decoder.up[i] works at encoder level i's resolution
        for j in range(cfg.num_res_blocks + 1):
            table[f"decoder.up.{i}.block.{j}"] = (f"decoder.up_blocks.{up}.resnets.{j}", VAE_RESBLOCK)
        table[f"decoder.up.{i}.upsample.conv"] = (f"decoder.up_blocks.{up}.upsamplers.0.conv", same)
    return table


def to_diffusers_name(name: str, table: dict[str, tuple[str, dict[str, str]]]) -> str:
    """Our parameter name -> the diffusers name, through the longest module prefix in the table."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            target, inner = table[prefix]
            rest = ".".join(parts[cut:])
            for ours, theirs in inner.items():
                if rest.startswith(ours + "."):
                    rest = theirs + rest[len(ours) :]
                    break
            return f"{target}.{rest}"
    return name
