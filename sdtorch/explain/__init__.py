"""`sdtorch explain`: "The Illustrated Stable Diffusion" (Alammar 2022), drawn from one real generation.

    from sdtorch.explain import explain
    written = explain(pipe, GenerationRequest(prompt="a red circle on a blue background", seed=1), "out")

`record.py` records through the step events and the attention seam (DAAM maps), `run.py` runs the
generation and what is computed beside it, `report.py` writes the page, the JSON and the files,
`command.py` is the CLI subcommand, `measure.py` the measurement of what the maps show. Nothing is
imported here until `explain` is called, so that building the CLI's parser stays cheap.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["explain"]


def explain(pipe, request, out: str | Path, *, decode_every: int = 1, words: list[str] | None = None,
            callback=None) -> dict[str, Path]:
    """Generate `request` on `pipe` while recording, and write the report into `out`; returns the
    written paths (html, json, image, attention, steps)."""
    from sdtorch.explain.report import write_report
    from sdtorch.explain.run import record_generation

    recording = record_generation(pipe, request, out, decode_every=decode_every, words=words, callback=callback)
    return write_report(recording, out)
