"""Where and how the networks run: device, dtype, how weights are held, layout and compilation.
Every runtime option is resolved here, in one place, rather than at each call site.

- dtype: fp16 on GPUs; on the CPU bf16 where the CPU computes it natively (AVX512-BF16, AMX, Arm's
  bf16), fp32 elsewhere (emulated bf16 runs 10-50x slower than fp32); SDTORCH_CPU_DTYPE=fp32|bf16 pins the CPU's.
- weights: "compute" widens every weight to the dtype; "stored" (the CPU's default) keeps a 16-bit
  file's large weights as stored and widens them per layer when computing in fp32
  (`sdtorch.stored_weights`: the same numbers, half the weight memory); "int8" quantises the UNet's.
- compile: `torch.compile` (inductor, no freezing, static shapes) of the UNet; it compiles at the first
  step of each new shape, and `compile_seconds()` says how long compiling has taken so far.
- vae_channels_last: the VAE's layout (None: channels-last on the CPU, `vae.Decoder`).
- keep_freed: `keep_freed_memory()` at load (whole-process), asked for (`--keep-freed-memory`): a 4-step
  512x512 SD 1.5 `generate` (2 cores, AVX512) took 0.34 M page faults instead of 4.1 M and 56.7 s instead of
  60.7 s at the same peak (2.51 GB against 2.59), but a 1024x1024 one peaked at 7.84 GB instead of 3.78 GB
  (every block under 1 GiB then comes from the heap and stays; which phase peaked is not traced), so it is
  no default. On AVX2 it was about 10% less CPU time at 512x512 and 0.5 GB more peak, before the UNet's
  feed-forward ran in chunks.
- low_memory: the least memory, the image changing a little: int8 UNet weights (unless `weights` says
  otherwise), guidance's passes one at a time (`guidance.passes_in_turn`) and an allocator that returns
  freed memory at once (`return_freed_memory_at_once`, from `Runtime.prepare`); `Pipeline.load` does all three.
- the CPU's fp32 linear kernel: oneDNN's on AMD CPUs, where MKL's sgemm runs at about half the speed,
  BLAS elsewhere; SDTORCH_CPU_LINEAR=onednn|blas pins it (`sdtorch.linear`; checked here, at start).
- unet_channels_last: the UNet's weights (and so its activations) channels-last; off unless asked,
  as it measured about even with the default layout on AVX2 (the VAE gains, the UNet hardly).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sdtorch import linear
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
    elsewhere PyTorch emulates it, many times slower than fp32. PyTorch's own CPU probe first (what
    its kernels dispatch on), then the kernel's flags."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if any(getattr(torch.cpu, probe, lambda: False)() for probe in probes):
        return True
    try:
        with open("/proc/cpuinfo") as info:
            flags = {flag for line in info if line.startswith(("flags", "Features")) for flag in line.split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


CPU_DTYPE_VARIABLE = "SDTORCH_CPU_DTYPE"  # the CPU's default dtype, where a user (or the test suite) pins one


def default_dtype(device: torch.device) -> str:
    """Half precision where GPUs are made for it; on the CPU the dtype SDTORCH_CPU_DTYPE names (fp32 for
    the exact images everywhere, bf16), else bf16 where it is native and fp32 elsewhere (fp16 and emulated
    bf16 are slow there)."""
    if device.type != "cpu":
        return "fp16"
    pinned = os.environ.get(CPU_DTYPE_VARIABLE)
    if pinned:
        if pinned not in ("fp32", "bf16"):
            raise SdtorchError(f"{CPU_DTYPE_VARIABLE}={pinned!r} is not a CPU dtype: use fp32 or bf16")
        return pinned
    return "bf16" if cpu_has_native_bf16() else "fp32"


def default_weights(device: torch.device, dtype: str) -> str:
    """How weights are held unless asked: on the CPU in fp32, as stored (a 16-bit file's weights stay
    16-bit, mapped and widened per layer into a reused buffer: the same image for 58% of the memory of
    a whole 512x512 SD 1.5 run, at 3% more of its time on 2 AVX2 cores, bench/whole_process.py; a file
    already in fp32 has nothing to keep narrow). Elsewhere widened at load."""
    return "stored" if device.type == "cpu" and dtype == "fp32" else "compute"


def _glibc(name: str):
    """glibc's function `name` through ctypes, or None off glibc."""
    import ctypes.util

    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse rather than hand it back to the kernel: blocks up
    to 1 GiB come from the heap instead of fresh mmaps (M_MMAP_THRESHOLD) and the heap is never
    trimmed (M_TRIM_THRESHOLD). Every large activation and per-layer cast otherwise arrives as fresh
    pages, each one faulted and zeroed by the kernel (some 6 million page faults in a 4-step 512x512
    generation). The process's memory then stays near its peak after the peak has passed. Whole-process
    and one-way; returns whether it took effect (False off glibc)."""
    global _KEPT_FREED
    mallopt = _glibc("mallopt")
    kept = mallopt is not None and _set_thresholds(mallopt, KEEP_MMAP_THRESHOLD, KEEP_TRIM_THRESHOLD)
    _KEPT_FREED = _KEPT_FREED or kept
    return kept


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters
KEEP_MMAP_THRESHOLD, KEEP_TRIM_THRESHOLD = 2**30, 2**31 - 1  # blocks under 1 GiB from the heap, never trimmed
# Where glibc's own thresholds settle once large blocks have been freed (DEFAULT_MMAP_THRESHOLD_MAX, twice it).
STEADY_MMAP_THRESHOLD, STEADY_TRIM_THRESHOLD = 32 * 2**20, 64 * 2**20


def _set_thresholds(mallopt, mmap_threshold: int, trim_threshold: int) -> bool:
    import ctypes

    return bool(mallopt(M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold))
                and mallopt(M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold)))


@contextmanager
def freed_memory_reused(reuse: bool = True) -> Iterator[None]:
    """For the scope, glibc's malloc keeps freed memory for reuse (`reuse`) or returns it as it does by default
    (not `reuse`, inside a reusing scope: a VAE pass within the sampling steps). A generation's sampling steps run
    in a reusing scope: each UNet call allocates the same blocks again, and served anew by the kernel (blocks over
    the mmap threshold, a heap trimmed between steps) they came as 0.68 M freshly faulted and zeroed pages per
    SD 1.5 step at 512x512 in fp32; kept, next to none after the first step, and the steps took 5.4-5.5 s instead
    of 6.1 s (2 Zen 5 cores, one `generate` each way), for a peak 80 MB higher (2.56 GB against 2.48: the heap
    stays at its high-water mark). The VAE's passes do not reuse (a 1024x1024 decode's blocks are 0.5 GB each,
    and a whole process that kept every block peaked at 7.84 GB there instead of 3.78, `keep_freed_memory`).
    Leaving a reusing scope sets the thresholds where glibc's own settle (32 MB, trims over 64 MB) and trims
    the heap. A no-op off glibc and where a whole-process allocator was asked for (`keep_freed_memory`, low
    memory's `return_freed_memory_at_once`)."""
    mallopt = _glibc("mallopt")
    if _KEPT_FREED or _PINNED or mallopt is None or reuse == _REUSING:
        yield
        return
    _set_reuse(mallopt, reuse)
    try:
        yield
    finally:
        _set_reuse(mallopt, not reuse)


def _set_reuse(mallopt, reuse: bool) -> None:
    global _REUSING
    _REUSING = reuse
    if reuse:
        _set_thresholds(mallopt, KEEP_MMAP_THRESHOLD, KEEP_TRIM_THRESHOLD)
    else:
        _set_thresholds(mallopt, STEADY_MMAP_THRESHOLD, STEADY_TRIM_THRESHOLD)
        return_freed_memory()


def return_freed_memory_at_once() -> bool:
    """Have glibc's malloc serve every block over 256 KiB by its own mmap, unmapped when freed
    (M_MMAP_THRESHOLD, fixed): the process's resident memory then follows the live tensors instead of
    keeping freed holes in the heap. The low-memory mode's allocator: a 512x512 SD 1.5 UNet call at
    batch 1 peaked 0.41 GB lower (1.55 against 1.96 GB, int8 weights) for about 1.2x its time on 2
    AVX2 cores (each block arrives as fresh pages). Whole-process and one-way; returns whether it took
    effect (False off glibc)."""
    import ctypes

    global _PINNED
    mallopt = _glibc("mallopt")
    pinned = mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, ctypes.c_int(256 * 1024)))
    _PINNED = _PINNED or pinned
    return pinned


def return_freed_memory() -> bool:
    """Hand the free pages inside glibc's heap back to the kernel (malloc_trim). Allocations under
    malloc's mmap threshold come from the heap, and what is freed between live blocks stays resident:
    quantising a UNet at load left 0.8 GB of such holes (2.30 GB resident for 1.28 GB of weights and
    0.22 GB of PyTorch). Called after loading and after a network is released; a no-op where the
    allocator keeps freed memory (by request, or inside `freed_memory_reused`), or off glibc. Returns whether it ran."""
    import ctypes

    trim = None if _KEPT_FREED or _REUSING else _glibc("malloc_trim")
    if trim is None:
        return False
    trim(ctypes.c_size_t(0))
    return True


_KEPT_FREED = False
_PINNED = False  # return_freed_memory_at_once took effect
_REUSING = False  # inside a freed_memory_reused scope
_COMPILE_SECONDS = 0.0


def compile_seconds() -> float:
    """Seconds spent so far in this process compiling networks (`Runtime(compile=True)`)."""
    return _COMPILE_SECONDS


def _compile(net: torch.nn.Module) -> None:
    """Compile `net`'s forward in place (its names, parameters and state dict stay), inductor without
    freezing: freezing folds the weights into the graph, which LoRA changes in place, and it measured
    slower here. The first call of each new input shape compiles; its time is added to `compile_seconds`."""
    if getattr(net, "_sdtorch_compiled", False):
        return
    compiled = torch.compile(net.forward, dynamic=False)
    shapes: set[tuple] = set()

    def forward(*args, **kwargs):
        global _COMPILE_SECONDS
        key = tuple((tuple(a.shape), a.dtype) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        if key in shapes:
            return compiled(*args, **kwargs)
        started = time.perf_counter()
        out = compiled(*args, **kwargs)
        _COMPILE_SECONDS += time.perf_counter() - started  # a first call: nearly all of it compiling
        shapes.add(key)
        return out

    net.forward = forward  # this instance only: hooks and the module's own call path stay eager
    net._sdtorch_compiled = True


@dataclass(frozen=True)
class Runtime:
    """The resolved runtime options a model is loaded and run with."""

    device: torch.device
    dtype: str  # "fp32", "fp16" or "bf16"
    weights: str = "compute"  # "compute", "stored" or "int8"
    compile: bool = False
    vae_channels_last: bool | None = None  # None: channels-last on the CPU
    unet_channels_last: bool = False
    keep_freed: bool = False  # the allocator keeps freed memory (process-wide, see keep_freed_memory)
    low_memory: bool = False  # int8 UNet, guidance passes in turn, freed memory returned at once

    @classmethod
    def choose(
        cls, device: str = "auto", dtype: str | None = None, *, weights: str | None = None, compile: bool = False,
        vae_channels_last: bool | None = None, unet_channels_last: bool = False, keep_freed: bool = False,
        low_memory: bool = False,
    ) -> Runtime:
        target = pick_device(device)
        if target.type == "cpu" and dtype == "bf16" and not cpu_has_native_bf16():
            warnings.warn(
                "this CPU has no native bf16 (no AVX512-BF16 or AMX): PyTorch emulates it, typically 10-50x "
                "slower than fp32; leave --dtype out for fp32",
                stacklevel=2,
            )
        if weights not in (None, "compute", "stored", "int8"):
            raise SdtorchError(f"unknown weights mode {weights!r}; accepted: compute, stored, int8")
        if low_memory and keep_freed:
            raise SdtorchError("low memory and keeping freed memory pull the allocator opposite ways; choose one")
        dtype = dtype or default_dtype(target)
        if target.type == "cpu":
            linear.default_kernel()  # a bad SDTORCH_CPU_LINEAR is told now, not at the first step
        weights = weights or ("int8" if low_memory else default_weights(target, dtype))
        return cls(target, dtype, weights, compile, vae_channels_last, unet_channels_last, keep_freed, low_memory)

    def prepare(self) -> None:
        """The options that act before loading: the low-memory allocator (so that loading's own
        temporaries are handed back at once)."""
        if self.low_memory:
            return_freed_memory_at_once()

    def apply(self, model):
        """Put the options that act after loading on `model` (a `StableDiffusion`, in place): the
        allocator that keeps freed memory, the layouts and compilation. Returns the model."""
        if self.keep_freed:
            keep_freed_memory()
        if self.vae_channels_last is not None:
            layout = torch.channels_last if self.vae_channels_last else torch.contiguous_format
            model.vae.encoder.memory_format = model.vae.decoder.memory_format = layout
        if self.unet_channels_last:  # convolutions follow their weights' layout, so the activations do too
            model.unet.to(memory_format=torch.channels_last)
        if self.compile:
            _compile(model.unet)
        return model
