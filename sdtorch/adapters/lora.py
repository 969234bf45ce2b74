"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") files as people have
them, merged into the weights and taken out again bit-exactly.

A layer's update is `multiplier * alpha / rank * up @ down` added to the weight it targets (A1111's
Lora extension, kohya-ss `networks/lora.py`); conv layers (LoCon) flatten the kernel into `down`'s
columns; a LoCon `lora_mid` (Tucker core) sits between: W[o,i,k,l] = sum up[o,n] mid[n,m,k,l] down[m,i].
Files read:

- kohya / A1111: `lora_unet_<module>` and `lora_te_<module>` with `.lora_up.weight`,
  `.lora_down.weight`, optional `.alpha` (default: the rank) and `.lora_mid.weight`, where
  `<module>` is the diffusers module path (kohya trains SD 1.x on diffusers' UNet) or the CompVis
  one (`input_blocks_4_1_...`), dots written as '_';
- diffusers / PEFT: `unet.<path>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<path>...`, and
  diffusers' older `.lora.down/.up` and `.processor.to_q_lora.down/.up` spellings; alpha from
  `.alpha` keys or from the PEFT config diffusers stores in the file's `lora_adapter_metadata`
  (`lora_alpha`, `alpha_pattern`, `use_rslora`: scale alpha/sqrt(rank)), else the rank.

Our networks keep CompVis names; the UNet's diffusers names come from the loader's name table
(`sdtorch.loading.diffusers_format`), read backwards. `apply_loras` keeps the touched tensors'
originals and `restore()` copies them back: no subtraction, no patched forward methods.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sdtorch.errors import CheckpointError, SdtorchError
from sdtorch.loading.diffusers_format import to_diffusers_name, unet_module_names
from sdtorch.loading.reader import open_tensors
from sdtorch.stored_weights import dense_weight, layer_compute_dtype

ACCEPTED = "accepted: kohya/A1111 LoRA and LoCon (lora_up, lora_down, alpha) or diffusers/PEFT (lora_A, lora_B)"
# Other adapter kinds, told by a key part only they use.
OTHER_KINDS = {
    "hada_w1_a": "LoHa",
    "hada_t1": "LoHa",
    "lokr_w1": "LoKr",
    "lokr_w1_a": "LoKr",
    "lokr_w2": "LoKr",
    "lokr_w2_a": "LoKr",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "on_input": "IA3",
    "oft_blocks": "OFT",
    "oft_diag": "OFT",
    "a1.weight": "GLoRA",
    "diff": "full weight difference",
    "diff_b": "full bias difference",
    "w_norm": "norm-layer update",
}
KOHYA_PARTS = {"lora_up.weight": "up", "lora_down.weight": "down", "lora_mid.weight": "mid", "alpha": "alpha"}
_PEFT_KEY = re.compile(
    r"^(?P<path>.+?)\.(?:lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight"
    r"|(?:lora|lora_linear_layer)\.(?P<ud>up|down)\.weight|(?P<alpha>alpha))$"
)
_PROCESSOR_KEY = re.compile(r"^(?P<path>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<ud>up|down)\.weight$")
_SDXL_MARKERS = ("lora_te1_", "lora_te2_", "text_encoder_2.")


@dataclass(frozen=True, eq=False)
class LoRALayer:
    """One targeted module: `network` ('unet' or 'text_encoder') and `target`, its module path with
    '_' for '.', as the file names it; `key` is the file's own prefix, for messages."""

    network: str
    target: str
    key: str
    up: torch.Tensor = field(repr=False)  # (out, rank) or (out, rank, 1, 1)
    down: torch.Tensor = field(repr=False)  # (rank, in) or (rank, in, kh, kw)
    mid: torch.Tensor | None = field(default=None, repr=False)  # (rank, rank, kh, kw)
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def delta(self, shape: torch.Size, device=None) -> torch.Tensor:
        """alpha/rank * up @ down in float32, shaped as the target weight (`shape`)."""
        up = self.up.to(device, torch.float32).flatten(1)  # (out, rank)
        down = self.down.to(device, torch.float32).flatten(1)  # (rank, in * kh * kw)
        if self.mid is not None:
            mid = self.mid.to(device, torch.float32)  # (rank, rank, kh, kw)
            product = torch.einsum("on,nmkl,mi->oikl", up, mid, down)  # (out, in, kh, kw)
        else:
            product = up @ down  # (out, in * kh * kw)
        if product.shape[0] != shape[0] or product.numel() != shape.numel():
            raise SdtorchError(
                f"LoRA layer {self.key}: its update is {tuple(product.shape)} but the weight it targets "
                f"is {tuple(shape)} (a LoRA for another model?)"
            )
        return product.reshape(shape) * self.scale


@dataclass(frozen=True, eq=False)
class LoRA:
    """A LoRA file: its layers, its name (file stem), A1111's alias and short hash."""

    name: str
    layers: tuple[LoRALayer, ...] = field(repr=False)
    path: Path | None = None
    alias: str = ""  # kohya's ss_output_name, A1111's default name in prompts and infotext
    shorthash: str = ""  # A1111's "Lora hashes" entry
    metadata: dict[str, str] = field(default_factory=dict, repr=False)
    sdxl: bool = False  # keys only SDXL LoRAs have (two text encoders)


def a1111_lora_hash(path: str | os.PathLike, metadata: dict[str, str] | None = None) -> str:
    """A1111's short hash of a LoRA ("Lora hashes" in infotext): the first 12 hex digits of kohya's
    `sshs_model_hash` metadata if present, else of the "addnet" hash (sha256 of a `.safetensors`
    file after its 8 + n header bytes), else (other files) of the file's sha256."""
    path = Path(path)
    if metadata and metadata.get("sshs_model_hash"):
        return metadata["sshs_model_hash"][:12]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix.lower() == ".safetensors":
            head = f.read(8)
            if len(head) == 8:
                f.seek(8 + struct.unpack("<Q", head)[0])
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def load_lora(path: str | os.PathLike) -> LoRA:
    """Read a LoRA file (`.safetensors`, or a weights-only pickle); any other content is an error naming it."""
    path = Path(path)
    try:
        file = open_tensors(path)
    except CheckpointError as e:
        raise SdtorchError(f"{e}; {ACCEPTED}") from None
    layers, sdxl = parse_lora_state({k: entry.read() for k, entry in file.tensors.items()}, str(path), file.metadata)
    return LoRA(
        name=path.stem,
        layers=layers,
        path=path,
        alias=file.metadata.get("ss_output_name") or path.stem,
        shorthash=a1111_lora_hash(path, file.metadata),
        metadata=file.metadata,
        sdxl=sdxl,
    )


def parse_lora_state(
    state: dict[str, torch.Tensor], source: str = "LoRA", metadata: dict[str, str] | None = None
) -> tuple[tuple[LoRALayer, ...], bool]:
    """A LoRA state dict (and its file's metadata) -> its layers, and whether its keys are SDXL's."""
    peft = _peft_config(metadata or {}, source)
    for key in state:
        for part, kind in OTHER_KINDS.items():
            if key.endswith("." + part) or f".{part}." in key:
                raise SdtorchError(f"{source}: a {kind} file (key {key!r}); sdtorch applies LoRA; {ACCEPTED}")
    groups: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        parsed = _parse_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        network, target, prefix, part = parsed
        groups.setdefault((network, target, prefix), {})[part] = tensor
    if unknown:
        raise SdtorchError(f"{source}: keys of no known LoRA layout ({', '.join(unknown[:3])}); {ACCEPTED}")
    layers = []
    for (network, target, prefix), parts in groups.items():
        if "up" not in parts or "down" not in parts:
            missing = "up" if "up" not in parts else "down"
            raise SdtorchError(f"{source}: layer {prefix} has no {missing} weight (file incomplete or corrupt)")
        alpha = parts.get("alpha")
        alpha = float(alpha.float().reshape(-1)[0]) if alpha is not None else _peft_alpha(peft, prefix, parts["down"])
        layers.append(LoRALayer(network, target, prefix, parts["up"], parts["down"], parts.get("mid"), alpha))
    if not layers:
        raise SdtorchError(f"{source}: no LoRA layers in it; {ACCEPTED}")
    return tuple(layers), any(key.startswith(_SDXL_MARKERS) for key in state)


def _peft_config(metadata: dict[str, str], source: str) -> dict:
    """diffusers' `lora_adapter_metadata`: each network's PEFT LoraConfig, keys prefixed 'unet.' etc."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        raise SdtorchError(f"{source}: its lora_adapter_metadata is not JSON") from None
    config: dict[str, dict] = {}
    for key, value in flat.items() if isinstance(flat, dict) else ():
        network, _, name = key.partition(".")
        config.setdefault(network, {})[name] = value
    return config


def _peft_alpha(peft: dict, prefix: str, down: torch.Tensor) -> float | None:
    """alpha such that alpha / rank is PEFT's scale for the module `prefix` ('unet.down_blocks...')."""
    network, _, module = prefix.partition(".")
    config = peft.get(network)
    if not config:
        return None
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        try:
            matched = re.fullmatch(rf"(.*\.)?({pattern})", module)  # PEFT matches a pattern at the name's end
        except re.error:
            continue
        if matched:
            alpha = value
            break
    if alpha is None:
        return None
    rank = down.shape[0]
    return float(alpha) * (math.sqrt(rank) if config.get("use_rslora") else 1.0)


def _parse_key(key: str) -> tuple[str, str, str, str] | None:
    """A file key -> (network, target with '_' for '.', the layer's key prefix, part) or None."""
    if key.startswith("lora_"):  # kohya: one dot-free module name, then the part
        prefix, _, part = key.partition(".")
        if part not in KOHYA_PARTS:
            return None
        for start, network in (("lora_unet_", "unet"), ("lora_te_", "text_encoder"), ("lora_te1_", "text_encoder"),
                               ("lora_te2_", "text_encoder_2")):
            if prefix.startswith(start):
                return network, prefix[len(start) :], prefix, KOHYA_PARTS[part]
        return "other", prefix, prefix, KOHYA_PARTS[part]
    network, _, rest = key.partition(".")
    if network not in ("unet", "text_encoder", "text_encoder_2"):
        network, rest = "unet", key  # diffusers' `save_attn_procs` writes UNet keys without a prefix
    if m := _PROCESSOR_KEY.match(rest):
        path = m["path"] + "." + ("to_out.0" if m["proj"] == "to_out" else m["proj"])
        part = m["ud"]
    elif m := _PEFT_KEY.match(rest):
        path = m["path"]
        part = "alpha" if m["alpha"] else {"A": "down", "B": "up"}.get(m["ab"]) or m["ud"]
    else:
        return None
    return network, path.replace(".", "_"), f"{network}.{path}", part


# --- applying ---------------------------------------------------------------------------------


def lora_targets(
    unet: nn.Module, text_encoder: nn.Module, text_encoder_2: nn.Module | None = None
) -> dict[str, dict[str, nn.Module]]:
    """Per network, every name a LoRA may use for each Linear/Conv2d -> that module.

    UNet: our CompVis path (kohya's SDXL files use it) and its diffusers path (from the loader's table),
    '.' written '_'. Text encoders (SDXL's second: `lora_te2_`, `text_encoder_2.`): our path below
    `text_model.`, '.' written '_' (`text_model_` is stripped from keys).
    """
    table = unet_module_names(unet.config)
    unet_names: dict[str, nn.Module] = {}
    for name, module in _weighted_modules(unet):
        diffusers = to_diffusers_name(name + ".weight", table).removesuffix(".weight")
        for alias in {name.replace(".", "_"), diffusers.replace(".", "_")}:
            assert unet_names.setdefault(alias, module) is module, f"two UNet modules read {alias}"
    towers = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    return {"unet": unet_names, **{network: {name.replace(".", "_"): module for name, module in _weighted_modules(net)}
                                   for network, net in towers.items() if net is not None}}


def _weighted_modules(net: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    return ((n, m) for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


class LoRAHandle:
    """Applied LoRAs: `restore()` copies the original tensors back (bit-exact); also a context manager.
    `warnings` lists, one line per LoRA, layers that matched nothing in the model."""

    def __init__(self, originals: list[tuple[torch.Tensor | nn.Module, torch.Tensor]], warnings: list[str]):
        self._originals = originals  # (weight, its copy), or (layer, its own weight parameter) for one kept as stored
        self.warnings = warnings

    def restore(self) -> None:
        with torch.no_grad():
            for target, original in reversed(self._originals):
                if isinstance(target, nn.Module):
                    target.weight = original
                else:
                    target.copy_(original)
        self._originals = []

    def __enter__(self) -> LoRAHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def apply_loras(model, loras: Sequence[tuple]) -> LoRAHandle:
    """Add each LoRA's update to `model`'s weights (`model.unet`, `model.text_encoder`).

    `loras`: (lora, weight) or (lora, text_encoder_weight, unet_weight), A1111's `<lora:name:te:unet>`.
    All updates of one weight are summed in float32 and added once, then cast to the weight's dtype
    (for a 16-bit weight kept as stored, to the dtype it computes in: an fp32 copy while applied).
    Apply over applied LoRAs only with `restore()` in the reverse order.
    """
    targets = lora_targets(model.unet, model.text_encoder, model.text_encoder_2)
    updates: dict[nn.Module, torch.Tensor] = {}
    warnings = []
    for entry in loras:
        lora, te_weight, unet_weight = (entry[0], entry[1], entry[1]) if len(entry) == 2 else entry
        label = str(lora.path or lora.name)
        if lora.sdxl and model.text_encoder_2 is None:
            raise SdtorchError(f"{label}: an SDXL LoRA (keys for two text encoders); this model is not SDXL")
        found, unmatched = [], []
        for layer in lora.layers:
            module = targets.get(layer.network, {}).get(_strip_text_model(layer))
            (found if module is not None else unmatched).append((layer, module))
        if not found:
            first = ", ".join(layer.key for layer, _ in unmatched[:3])
            raise SdtorchError(f"{label}: none of its {len(unmatched)} layers targets this model (first: {first})")
        if unmatched:
            first = ", ".join(layer.key for layer, _ in unmatched[:3])
            warnings.append(f"{label}: {len(unmatched)} of its layers match nothing in this model (first: {first})")
        for layer, module in found:
            multiplier = unet_weight if layer.network == "unet" else te_weight
            delta = layer.delta(module.weight.shape, module.weight.device) * multiplier
            updates[module] = updates[module] + delta if module in updates else delta
    originals = []
    with torch.no_grad():
        for module, delta in updates.items():
            weight = module.weight
            dtype = layer_compute_dtype(module)
            if dtype == weight.dtype:
                originals.append((weight, weight.detach().clone()))
                weight.copy_((weight.float() + delta).to(weight.dtype))
            else:  # a 16-bit or int8 weight kept narrow: merged in the dtype it computes in, as a wide load would be
                originals.append((module, weight))
                module.weight = nn.Parameter((dense_weight(module).float() + delta).to(dtype), requires_grad=False)
    return LoRAHandle(originals, warnings)


def _strip_text_model(layer: LoRALayer) -> str:
    if layer.network.startswith("text_encoder"):
        return layer.target.removeprefix("text_model_")
    return layer.target
