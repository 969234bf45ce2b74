"""Where and how the networks run: device and dtype now, later tiling, caching and compilation.
Every runtime option is resolved here, in one place, rather than at each call site."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from sdtorch.errors import SdtorchError


def pick_device(device: str = "auto") -> torch.device:
    """'auto' takes CUDA, then Apple's MPS, then the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise SdtorchError(f"unknown device {device!r}; accepted: auto, cpu, cuda, cuda:N, mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SdtorchError("device 'cuda' asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise SdtorchError("device 'mps' asked for, but this PyTorch has no MPS support here; use --device cpu")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX on x86, the bf16 extension on Arm);
    elsewhere PyTorch emulates it, many times slower than fp32."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = {flag for line in info if line.startswith(("flags", "Features")) for flag in line.split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def default_dtype(device: torch.device) -> str:
    """Half precision where GPUs are made for it; fp32 on the CPU, where fp16 is slow."""
    return "fp32" if device.type == "cpu" else "fp16"


@dataclass(frozen=True)
class Runtime:
    """The resolved runtime options a model is loaded and run with."""

    device: torch.device
    dtype: str  # "fp32", "fp16" or "bf16"

    @classmethod
    def choose(cls, device: str = "auto", dtype: str | None = None) -> Runtime:
        target = pick_device(device)
        if target.type == "cpu" and dtype == "bf16" and not cpu_has_native_bf16():
            warnings.warn(
                "this CPU has no native bf16 (no AVX512-BF16 or AMX): PyTorch emulates it, typically 10-50x "
                "slower than fp32; leave --dtype out for fp32",
                stacklevel=2,
            )
        return cls(target, dtype or default_dtype(target))
