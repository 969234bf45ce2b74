"""README's examples run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import randomise_
from PIL import Image

from sdtorch.config import TINY
from sdtorch.loading import save_checkpoint
from sdtorch.model import StableDiffusion

ROOT = Path(__file__).resolve().parents[1]


def test_api_example_runs(tmp_path):
    model = StableDiffusion.random(TINY)
    for net in model.networks().values():
        randomise_(net, seed=31)
    save_checkpoint(model, tmp_path / "tiny.safetensors")
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "api.py"), str(tmp_path / "tiny.safetensors"), "--steps", "4"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert Image.open(tmp_path / "lighthouse-8.png").size == (32, 32)
    assert Image.open(tmp_path / "emerging.gif").n_frames == 4
    assert "examples/api.py" in (ROOT / "README.md").read_text()
