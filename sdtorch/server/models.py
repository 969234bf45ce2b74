"""The checkpoints a server may load: the embedded model, `--model`, and every checkpoint in `--models`.

Each gets A1111's names (`title` "name.safetensors [hash]", `model_name`, the file's name relative
to its folder, the SHA-256), and `find` resolves any alias A1111 accepts for `sd_model_checkpoint`
(title, name, file name, stem, short or full hash). Nothing outside this list can be loaded, so no
client can point the server at a path of its own, and no absolute path is ever shown.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

from sdtorch.errors import SdtorchError
from sdtorch.pipeline import default_model_path

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class ModelEntry:
    name: str  # the file (or folder) name relative to its models folder: "sub/model.safetensors"
    path: Path  # never shown to clients
    sha256: str | None  # None for a diffusers folder

    @property
    def short_hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        return f"{self.name} [{self.short_hash}]" if self.sha256 else self.name

    @property
    def model_name(self) -> str:
        """A1111's model_name: the name without its extension, folders joined by '_'."""
        stem = self.name[: -len(self.path.suffix)] if self.path.is_file() and self.path.suffix else self.name
        return stem.replace("/", "_").replace("\\", "_")

    def aliases(self) -> set[str]:
        names = {self.title, self.name, self.model_name, Path(self.name).name, Path(self.name).stem}
        if self.sha256:
            names |= {self.sha256, self.short_hash, self.sha256[:8], f"{self.model_name} [{self.short_hash}]"}
        return {n.lower() for n in names}

    def a1111(self) -> dict:
        return {"title": self.title, "model_name": self.model_name, "hash": self.short_hash, "sha256": self.sha256,
                "filename": self.name, "config": None}


class ModelRegistry:
    """The selectable checkpoints, found by scanning; hashes are computed once per file version."""

    def __init__(self, model: str | Path | None = None, models_dir: str | Path | None = None):
        self.model = Path(model) if model else None
        self.models_dir = Path(models_dir) if models_dir else None
        if self.model is not None and not self.model.exists():
            raise SdtorchError(f"--model {str(self.model)!r} does not exist; give a checkpoint or diffusers folder")
        if self.models_dir is not None and not self.models_dir.is_dir():
            raise SdtorchError(f"--models {str(self.models_dir)!r} is not a folder")
        self._hashes: dict[tuple[Path, int, int], str] = {}
        self._lock = threading.Lock()
        self._entries: list[ModelEntry] = []
        self.refresh()

    @property
    def entries(self) -> list[ModelEntry]:
        return list(self._entries)

    def default(self) -> ModelEntry:
        """The model served first: --model if given, else the embedded one."""
        return self._entries[0]

    def refresh(self) -> None:
        found: list[tuple[str, Path]] = []
        if self.model is not None:
            found.append((self._relative_name(self.model), self.model))
        found.append((Path(default_model_path()).name, Path(default_model_path())))
        if self.models_dir is not None:
            found += [(p.relative_to(self.models_dir).as_posix(), p) for p in self._scan(self.models_dir)]
        entries, seen = [], set()
        for name, path in found:
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            entries.append(ModelEntry(name, path, self._sha256(path) if path.is_file() else None))
        with self._lock:
            self._entries = entries

    def _relative_name(self, path: Path) -> str:
        if self.models_dir is not None:
            try:
                return path.resolve().relative_to(self.models_dir.resolve()).as_posix()
            except ValueError:
                pass
        return path.name

    @staticmethod
    def _scan(folder: Path) -> list[Path]:
        """Checkpoint files and diffusers folders under `folder`, hidden ones skipped, sorted by name."""
        found = []
        for path in sorted(folder.rglob("*")):
            parts = path.relative_to(folder).parts
            if any(part.startswith(".") for part in parts):
                continue
            if any((folder.joinpath(*parts[:i]) / "model_index.json").is_file() for i in range(1, len(parts))):
                continue  # inside a diffusers folder
            checkpoint = path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES
            if checkpoint or (path.is_dir() and (path / "model_index.json").is_file()):
                found.append(path)
        return found

    def _sha256(self, path: Path) -> str:
        stat = path.stat()
        key = (path.resolve(), stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            try:
                with open(path, "rb") as f:
                    self._hashes[key] = hashlib.file_digest(f, "sha256").hexdigest()
            except OSError as e:
                raise SdtorchError(f"cannot read model {path.name!r}: {e.strerror or e}") from None
        return self._hashes[key]

    def find(self, alias: str) -> ModelEntry:
        """The entry `alias` names (any of A1111's forms, case-insensitive), or one line listing the titles."""
        if not isinstance(alias, str) or not alias.strip():
            raise SdtorchError("sd_model_checkpoint must be a model title from /sdapi/v1/sd-models")
        key = alias.strip().lower()
        for entry in self._entries:
            if key in entry.aliases():
                return entry
        titles = ", ".join(repr(e.title) for e in self._entries)
        raise SdtorchError(f"model {alias!r} not found; available: {titles}")
