"""The adapters a pipeline can use by name, as A1111 finds them: LoRAs in a folder, named in a prompt
as `<lora:name:weight>`, and textual-inversion embeddings in a folder, named by writing their name.

`Adapters.for_prompt(prompt)` takes the `<lora:...>` tags out of a prompt and gives back the LoRAs
to apply (loaded once, kept for later generations) and what the infotext records of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from sdtorch.adapters.lora import LoRA, load_lora
from sdtorch.adapters.textual_inversion import Embedding, load_embeddings
from sdtorch.errors import SdtorchError
from sdtorch.prompts import parse_extra_networks

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


@dataclass(frozen=True)
class PromptAdapters:
    """What a prompt asks for: its text without the tags, and each LoRA with (text encoder, UNet) weights."""

    prompt: str
    loras: tuple[tuple[LoRA, float, float], ...] = ()

    @property
    def hashes(self) -> str:
        """A1111's "Lora hashes" value: "alias: shorthash, ..."."""
        return ", ".join(f"{lora.alias}: {lora.shorthash}" for lora, _, _ in self.loras)


@dataclass
class Adapters:
    """The LoRA folder and the loaded embeddings of one pipeline (either may be absent)."""

    lora_dir: Path | None = None
    embeddings: dict[str, Embedding] = field(default_factory=dict)
    lora_files: dict[str, Path] = field(default_factory=dict)  # named one by one (--lora FILE), by stem
    warnings: list[str] = field(default_factory=list)  # files of the folders that were passed over
    _loaded: dict[Path, LoRA] = field(default_factory=dict, repr=False)

    @classmethod
    def from_folders(
        cls, lora_dir: str | os.PathLike | None = None, embeddings_dir: str | os.PathLike | None = None,
        width: int | tuple[int, ...] | None = None,
    ) -> Adapters:
        """`width`: the text encoder's (SDXL: both towers'); embeddings of other widths are passed over with a
        warning."""
        if lora_dir is not None and not Path(lora_dir).is_dir():
            raise SdtorchError(f"{lora_dir}: no such LoRA folder")
        embeddings, warnings = load_embeddings(embeddings_dir, width) if embeddings_dir else ({}, [])
        return cls(Path(lora_dir) if lora_dir else None, embeddings, warnings=warnings)

    def add_lora_file(self, path: str | os.PathLike) -> str:
        """Make one LoRA file usable as `<lora:STEM:...>`; returns its name."""
        path = Path(path)
        if not path.is_file():
            raise SdtorchError(f"{path}: no such LoRA file")
        self.lora_files[path.stem] = path
        return path.stem

    def lora_names(self) -> list[str]:
        names = set(self.lora_files)
        if self.lora_dir is not None:
            names |= {p.stem for p in self.lora_dir.rglob("*") if p.suffix.lower() in LORA_SUFFIXES}
        return sorted(names)

    def for_prompt(self, prompt: str) -> PromptAdapters:
        text, tags = parse_extra_networks(prompt)
        if not tags:
            return PromptAdapters(prompt)
        loras = []
        for tag in tags:
            if tag.kind != "lora":
                raise SdtorchError(f"<{tag.kind}:{tag.name}>: sdtorch reads <lora:...> tags only; remove it")
            te, unet = tag.lora_weights()
            loras.append((self._lora(tag.name), te, unet))
        return PromptAdapters(text, tuple(loras))

    def _lora(self, name: str) -> LoRA:
        if self.lora_dir is None and name not in self.lora_files:
            raise SdtorchError(f"the prompt asks for <lora:{name}>, but no LoRA folder was given (--loras DIR)")
        found = [self.lora_files[name]] if name in self.lora_files else [
            p for p in sorted(self.lora_dir.rglob("*")) if p.stem == name and p.suffix.lower() in LORA_SUFFIXES
        ]
        if not found:
            known = ", ".join(self.lora_names()[:10]) or "none"
            raise SdtorchError(f"no LoRA named {name!r} in {self.lora_dir} (found: {known})")
        path = found[0]
        if path not in self._loaded:
            self._loaded[path] = load_lora(path)
        return self._loaded[path]
