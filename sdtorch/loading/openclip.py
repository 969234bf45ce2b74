"""SD 2.x's OpenCLIP text tower (ViT-H/14) and SDXL's (ViT-bigG/14) read into our CLIP text encoder.

The original single files store it as open_clip names it (`cond_stage_model.model.transformer.
resblocks.N.attn.in_proj_weight`, `ln_1`, `mlp.c_fc`, `positional_embedding`, `ln_final`), with the
query, key and value projections fused into one `in_proj`. The architecture is CLIP's (pre-norm,
GELU), so the tower loads into `sdtorch.clip.CLIPTextModel` under its names: `in_proj` is split at
load into `q_proj`, `k_proj`, `v_proj` (each a view read from the file when its weight is loaded),
the rest renamed. SD 2 conditions on the penultimate layer, so the last block is not loaded at all
(as diffusers' conversion does): our encoder's last layer is then the one SD 2 uses.

SDXL keeps every block (its pooled embedding comes from the last one) and the `text_projection`
matrix, which open_clip applies as `x @ P`: it loads, transposed, as our Linear `text_projection`.
"""

from __future__ import annotations

import re

from sdtorch.loading.reader import TensorEntry

OPENCLIP = "cond_stage_model.model."
OURS = "cond_stage_model.transformer.text_model."  # where the translated tower goes
SDXL_OPENCLIP = "conditioner.embedders.1.model."
SDXL_OURS = "conditioner.embedders.1.transformer.text_model."
NOT_LOADED = ("text_projection", "logit_scale")  # the contrastive head: SD 2 does not use it

_RENAMES = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
_BLOCK = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
# open_clip writes the fused projection as `attn.in_proj_weight` / `attn.in_proj_bias`, the rest `x.weight`
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(attn\.in_proj|.+)[._](weight|bias)$")


def has_openclip_tower(names, source: str = OPENCLIP) -> bool:
    return any(name.startswith(source + "transformer.resblocks.") for name in names)


def openclip_blocks(names, source: str = OPENCLIP) -> int:
    return len({m.group(1) for n in names if n.startswith(source) and (m := _RESBLOCK.match(n[len(source):]))})


def _transposed(entry: TensorEntry) -> TensorEntry:
    return TensorEntry(tuple(reversed(entry.shape)), entry.dtype, lambda: entry.read().t().contiguous())


def _part(entry: TensorEntry, index: int, parts: int = 3) -> TensorEntry:
    """One of the q, k, v thirds of a fused projection, read (and cut) when it is loaded."""
    rows = entry.shape[0] // parts
    return TensorEntry((rows, *entry.shape[1:]), entry.dtype, lambda: entry.read()[index * rows : (index + 1) * rows])


def translate(
    tensors: dict[str, TensorEntry], keep_layers: int, source: str = OPENCLIP, target: str = OURS,
    projection: bool = False,
) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The file's tensors with the OpenCLIP tower under `source` renamed to our CLIP names under `target`
    (blocks >= keep_layers and the contrastive head left out, except the projection where `projection`),
    and for each translated name the name stored in the file."""
    out: dict[str, TensorEntry] = {}
    stored: dict[str, str] = {}
    for name, entry in tensors.items():
        if not name.startswith(source):
            out[name] = entry
            continue
        rest = name[len(source) :]
        if projection and rest == "text_projection":
            out[target + "text_projection.weight"] = _transposed(entry)
            stored[target + "text_projection.weight"] = name
            continue
        if rest in NOT_LOADED:
            continue
        if rest in _RENAMES:
            out[target + _RENAMES[rest]] = entry
            stored[target + _RENAMES[rest]] = name
            continue
        m = _RESBLOCK.match(rest)
        if m is None:
            out[name] = entry  # unknown: reported as unexpected by the loader
            continue
        layer, module, kind = int(m.group(1)), m.group(2), m.group(3)
        if layer >= keep_layers:
            continue
        base = f"{target}encoder.layers.{layer}."
        if module == "attn.in_proj":
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{base}self_attn.{proj}.{kind}"] = _part(entry, i)
                stored[f"{base}self_attn.{proj}.{kind}"] = name
        elif module in _BLOCK:
            out[f"{base}{_BLOCK[module]}.{kind}"] = entry
            stored[f"{base}{_BLOCK[module]}.{kind}"] = name
        else:
            out[name] = entry
    return out, stored
