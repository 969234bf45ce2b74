"""Running a job: workers that hold a pipeline, and the driver that writes PNGs and the manifest, resumably.

The driver alone writes into DIR. Each image goes to a temporary name, is flushed to disk, then renamed
(os.replace) to its stable name; only then is its line appended to DIR/manifest.jsonl (one write, then
fsync). So a run killed at any moment leaves whole PNGs and whole manifest lines, plus perhaps a temporary
file and a last, partial line, which the next run removes. A rerun counts an image done when its
manifest line names a file of the recorded size and sha256; everything else is made again (the same
bytes), and the manifest is rewritten without the lines that no longer hold.

Workers run the same code in this process or as Ray actors (`sdtorch.batch.ray_backend`): a `Worker`
loads one `Pipeline` and turns a request into the image and its A1111 parameters exactly as
`sdtorch generate` does (the same `Pipeline.run`, `per_image`, `infotext`, `write_png`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from sdtorch.batch.jobs import JobImage, request_from_fields
from sdtorch.errors import SdtorchError

MANIFEST = "manifest.jsonl"
LOCK = ".sdtorch-batch.lock"
TEMP_SUFFIX = ".partial"


class Worker:
    """One loaded pipeline. `generate(fields)` -> {"image", "text", "seconds", "worker"}."""

    def __init__(self, model: str, device: str = "auto", dtype: str | None = None, *, lora_dir: str | None = None,
                 embeddings_dir: str | None = None, loras: tuple[str, ...] = (), threads: int | None = None,
                 name: str = "local"):
        import torch

        from sdtorch.cli import lora_tag
        from sdtorch.pipeline import Pipeline

        if threads:
            torch.set_num_threads(threads)
        self.pipe = Pipeline.load(model, device=device, dtype=dtype, lora_dir=lora_dir, embeddings_dir=embeddings_dir)
        self.warnings = list(self.pipe.adapters.warnings)
        self.tags = [lora_tag(self.pipe, spec) for spec in loras]  # --lora FILE:W, as generate appends it
        self.name = f"{name}@{socket.gethostname()}:{os.getpid()}/{torch.get_num_threads()}t"

    def validate(self, fields: dict) -> None:
        """The checks that need the model (clip skip, steps), before anything runs."""
        request_from_fields(fields).validate(self.pipe.model)

    def generate(self, fields: dict) -> dict:
        from sdtorch.metadata import infotext

        started = time.perf_counter()
        request = request_from_fields(fields)
        for tag in self.tags:
            request = request.replace(prompt=f"{request.prompt} {tag}".strip())
        result = self.pipe.run(request)
        one = result.per_image()[0]
        text = infotext(one, model_name=self.pipe.model_name, model_hash=self.pipe.model_hash)
        return {"image": result.images[0], "text": text, "seconds": time.perf_counter() - started,
                "worker": self.name}


class LocalBackend:
    """The job's images made one after another by one Worker in this process."""

    def __init__(self, worker_options: dict):
        self.worker_options = worker_options

    def results(self, images: list[JobImage]) -> Iterator[tuple[JobImage, dict | SdtorchError]]:
        worker = Worker(**self.worker_options, name="local")
        for warning in worker.warnings:
            print(f"sdtorch: {warning}", file=sys.stderr)
        problems = []
        for image in images:
            try:
                worker.validate(image.fields)
            except SdtorchError as e:
                problems.append(f"line {image.line}: {e}")
        if problems:
            raise SdtorchError("; ".join(dict.fromkeys(problems)))
        for image in images:
            try:
                yield image, worker.generate(image.fields)
            except SdtorchError as e:
                yield image, e


class OutputDir:
    """DIR: its lock, its manifest, and the atomic writes of PNGs and manifest lines."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = self.path / MANIFEST
        self._lock = None

    def __enter__(self) -> OutputDir:
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / LOCK, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise SdtorchError(f"another sdtorch batch is writing into {str(self.path)!r}") from None
        return self

    def __exit__(self, *exc) -> None:
        self._lock.close()  # releases the lock (so does the process dying)

    def done(self) -> dict[str, dict]:
        """key -> manifest record of every image that is really there; the manifest rewritten (atomically)
        without partial lines, duplicates and lines whose file is missing or different; temporary files of
        a killed run removed."""
        for leftover in self.path.glob(f".*{TEMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)
        if not self.manifest.exists():
            return {}
        raw = self.manifest.read_bytes()
        records, dropped = {}, 0
        for line in raw.split(b"\n"):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = record["key"]
                if not isinstance(record["file"], str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                dropped += 1  # a line cut short by a kill, or not ours
                continue
            if key in records:
                dropped += 1
            records[key] = record
        good = {key: r for key, r in records.items() if self._intact(r)}
        dropped += len(records) - len(good)
        if dropped or not raw.endswith(b"\n"):
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in good.values())
            temp = self.path / f".{MANIFEST}{TEMP_SUFFIX}"
            temp.write_text(text, encoding="utf-8")
            _fsync(temp)
            os.replace(temp, self.manifest)
        return good

    def _intact(self, record: dict) -> bool:
        path = self.path / record["file"]
        try:
            data = path.read_bytes()
        except OSError:
            return False
        return len(data) == record.get("bytes") and hashlib.sha256(data).hexdigest() == record.get("sha256")

    def write(self, image: JobImage, result: dict) -> dict:
        """The PNG under a temporary name, flushed, renamed; then its manifest line. Returns the record."""
        from sdtorch.metadata import write_png

        final = self.path / image.name
        temp = self.path / f".{image.name}.{os.getpid()}{TEMP_SUFFIX}"
        write_png(temp, result["image"], result["text"])
        data = temp.read_bytes()
        _fsync(temp)
        os.replace(temp, final)
        record = {"file": image.name, "key": image.key, "line": image.line, "request": image.fields,
                  "parameters": result["text"], "seconds": round(result["seconds"], 3), "worker": result["worker"],
                  "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
            while written < len(line):
                written += os.write(fd, line[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        return record


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_job(images: list[JobImage], out: str | Path, backend, *, quiet: bool = False,
            on_written: Callable[[dict], None] | None = None) -> dict:
    """Make every image of `images` not already in `out`; returns counts {"total", "skipped", "written",
    "failed", "seconds"}. `backend.results(todo)` yields (image, result or SdtorchError) as they finish."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    with OutputDir(out) as folder:
        done = folder.done()
        todo = [image for image in images if image.key not in done]
        skipped = len(images) - len(todo)
        written, failures = 0, []
        bar = tqdm(total=len(images), initial=skipped, unit="img", desc="batch", disable=quiet, dynamic_ncols=True)
        try:
            results: Iterable = backend.results(todo) if todo else ()
            for image, result in results:
                if isinstance(result, SdtorchError):
                    failures.append(f"line {image.line} (seed {image.request.seed}): {result}")
                    continue
                record = folder.write(image, result)
                written += 1
                bar.update(1)
                if on_written is not None:
                    on_written(record)
        finally:
            bar.close()
    for failure in failures:
        print(f"sdtorch: error: {failure}", file=sys.stderr)
    return {"total": len(images), "skipped": skipped, "written": written, "failed": len(failures),
            "seconds": time.perf_counter() - started}
