"""README's examples run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_api_example_runs(tmp_path, tiny_checkpoint):
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "api.py"), str(tiny_checkpoint), "--steps", "4"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert Image.open(tmp_path / "lighthouse-8.png").size == (32, 32)
    assert Image.open(tmp_path / "emerging.gif").n_frames == 4
    assert "examples/api.py" in (ROOT / "README.md").read_text()
