"""The Linear layer of sdtorch's networks: `F.linear`, computed by oneDNN on AMD CPUs.

PyTorch's x86 wheels compute an fp32 `F.linear` with MKL's sgemm, which does not take its fast code on
AMD processors: on 2 Zen 5 cores (AVX-512) it ran the SD 1.5 UNet's shapes at 95-190 GFLOP/s where
oneDNN's matrix product, PyTorch's own `mkldnn._linear_pointwise` (the kernel inductor emits for CPU
linears), ran them at 220-400, and one 512x512 CFG call of the UNet took 7.4 s instead of 9.3 s. The
same products summed in another order, so equal up to float rounding. On Intel CPUs MKL's sgemm is at
the cores' peak (a 4096^2 product at 361 GFLOP/s on 2 Xeon cores, a 3x3 convolution's rate), so there
`F.linear` stays: oneDNN is not measured there.

Only fp32, and only where no gradient is wanted (the oneDNN op has no backward) and nothing traces the
call (a compiler chooses its own kernels); bf16 products already go to oneDNN inside PyTorch.
`SDTORCH_CPU_LINEAR=onednn|blas` pins the choice for a process, `linear_kernel` for a scope.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from sdtorch.errors import SdtorchError

CPU_LINEAR_VARIABLE = "SDTORCH_CPU_LINEAR"
KERNELS = ("onednn", "blas")


def onednn_linear_available() -> bool:
    """Whether this PyTorch has oneDNN's linear op and this is an x86 CPU (the only kind measured)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._linear_pointwise  # noqa: B018  (an attribute look-up that raises where the op is missing)
    except (AttributeError, RuntimeError):
        return False
    return True


def _cpu_vendor() -> str:
    """The CPU's vendor string (`AuthenticAMD`, `GenuineIntel`, ...), or '' where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("vendor_id")), "")
    except OSError:
        return platform.processor()  # Windows: "AMD64 Family 25 Model 33 Stepping 0, AuthenticAMD"


@functools.cache
def default_kernel() -> str:
    """The CPU's fp32 linear kernel in this process: SDTORCH_CPU_LINEAR's, else oneDNN on AMD (and Hygon)
    CPUs where it is available, BLAS elsewhere."""
    pinned = os.environ.get(CPU_LINEAR_VARIABLE)
    if pinned:
        return _checked(pinned, f"{CPU_LINEAR_VARIABLE}={pinned!r}")
    amd = any(vendor in _cpu_vendor() for vendor in ("AuthenticAMD", "HygonGenuine"))
    return "onednn" if amd and onednn_linear_available() else "blas"


def _checked(kernel: str, what: str) -> str:
    """`kernel`, where it is a kernel this PyTorch and CPU have; else one line naming `what` was asked."""
    if kernel not in KERNELS:
        raise SdtorchError(f"{what} is not a linear kernel; accepted: {', '.join(KERNELS)}")
    if kernel == "onednn" and not onednn_linear_available():
        raise SdtorchError(f"{what}: this PyTorch or CPU has no oneDNN linear; use blas")
    return kernel


_chosen: str | None = None  # a scope's choice (`linear_kernel`), else default_kernel()


@contextmanager
def linear_kernel(kernel: str) -> Iterator[None]:
    """Compute fp32 CPU linears with `kernel` ("onednn" or "blas") for the scope (benchmarks, tests)."""
    global _chosen
    previous, _chosen = _chosen, _checked(kernel, f"linear kernel {kernel!r}")
    try:
        yield
    finally:
        _chosen = previous


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if (_chosen or default_kernel()) != "onednn":  # first: elsewhere the rest is never looked at
        return False
    fp32 = torch.float32
    if x.device.type != "cpu" or x.dtype != fp32 or weight.dtype != fp32 or (bias is not None and bias.dtype != fp32):
        return False
    if x.dim() < 2 or x.numel() == 0 or torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)))


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias by oneDNN's matmul (no fused activation), any leading dimensions."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through oneDNN where this module's rules choose it."""
    if _onednn_applies(x, weight, bias):
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` computed by `linear`: the same parameters, names and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
