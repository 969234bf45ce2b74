"""Shared fixtures: the SD 1.5 manifest and a random checkpoint in its layout, and one tiny random
checkpoint for the tests that run the CLI or the API. The builders themselves are in `oracles`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from oracles import SD15_KEYS, random_sd15_state, randomise_
from safetensors.torch import save_file

from sdtorch.config import TINY

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Ray's single-machine mode: every address the test clusters bind and dial is 127.0.0.1 (else Ray takes
# the machine's own interface address). Read when ray is first imported, so set before any test runs;
# the driver subprocesses the batch tests start inherit it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# The parity and equality tests hold fp32 numbers: on a CPU with native bf16 the default dtype would be bf16
# (faster, not exact), so the suite pins the CPU's default to fp32, for its subprocesses too. The bf16 default
# itself is tested with the variable removed (test_runtime.py).
os.environ["SDTORCH_CPU_DTYPE"] = "fp32"


@pytest.fixture(scope="session")
def sd15_manifest() -> dict:
    return json.loads(SD15_KEYS.read_text())


@pytest.fixture(scope="session")
def sd15_file(tmp_path_factory, sd15_manifest) -> Path:
    """A random fp16 checkpoint with every name, shape and buffer of the real SD 1.5 file (~2 GB)."""
    path = tmp_path_factory.mktemp("sd15") / "random-sd15.safetensors"
    save_file(random_sd15_state(sd15_manifest, torch.float16), str(path))
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random SD 1.x single file, written by sdtorch (`tiny-model.safetensors`)."""
    from sdtorch.loading import save_checkpoint
    from sdtorch.model import StableDiffusion

    model = StableDiffusion.random(TINY)
    for net in model.networks().values():
        randomise_(net, seed=21)
    path = tmp_path_factory.mktemp("tiny") / "tiny-model.safetensors"
    save_checkpoint(model, path)
    return path
