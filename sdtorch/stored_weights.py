"""Weights kept narrower than they compute: as the file stores them, or quantised to int8.

An fp16 (or bf16) checkpoint run in fp32 need not be widened in memory: each Linear, Conv2d and
Embedding keeps its 16-bit weight and casts it to the compute dtype when it runs, one layer at a
time. fp16 -> fp32 (and bf16 -> fp32) is exact, so the outputs are bit-identical to loading the
weights as fp32, with the large weights taking half the memory; the cost is one cast per layer and
call. On the CPU the cast goes into one scratch buffer per thread, sized to the largest cast (below) and
reused by every layer: a fresh allocation per layer came back from glibc as fresh pages, each faulted
and zeroed by the kernel, which made the casts of an SD 1.5 UNet call 2.3 s instead of 0.35 s (2 AVX2
cores). Kernels do not keep their weight argument, so the next layer may overwrite it; where autograd
would keep it (gradients wanted) or a compiler traces the layer, the cast allocates as before. A layer
larger than `SCRATCH_ELEMENTS` runs in slices of its output channels, each widened in turn, their
outputs joined: the buffer stays at 32 MB where SD 1.5's largest layer (a 2560 -> 1280 3x3 convolution)
would make it 118 MB for the whole run, and those layers work at 8x8 to 32x32, where the join is small.

int8 (`quantize_int8`, the low-memory mode) goes a step further for Linear and Conv2d: weight-only,
symmetric, one scale per output channel (w ~ q * max|w_c| / 127, q in [-127, 127]), dequantised per
layer into the same scratch buffer, so a quarter of fp32's weight memory. This is the vector-wise
absmax quantisation of LLM.int8() (Dettmers et al. 2022, arXiv 2208.07339) without its outlier part;
stable-diffusion.cpp's q8_0 is the finer form, one scale per 32 values. It is not exact: the drift is
measured (README, bench/whole_process.py).

The seam is the module type: `keep_stored` turns such a layer into its `Stored*` subclass (same
parameters, names and state dict; only `forward` differs), which is all the rest of the code sees:
`compute_dtype(net)` is the dtype inputs must be given in, `dense_weight(layer)` the weight as it
computes (LoRA merges into that, `adapters.lora`), and `net.to(dtype=...)` converts every
floating-point tensor as it always did, after which the layers compute in that dtype. A quantised
layer's state dict holds its dequantised weight, so saving a model never writes bare int8 values.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from sdtorch.linear import Linear, linear

# Only these exact types: a subclass may have its own forward, which a swap would lose.
STORABLE = (nn.Linear, Linear, nn.Conv2d, nn.Embedding)
# Stored dtypes that widen to the compute dtype exactly.
EXACT_UPCASTS = {(torch.float16, torch.float32), (torch.bfloat16, torch.float32)}


class _Scratch(threading.local):
    """Per thread: (device, dtype) -> a flat buffer the per-layer casts are written into."""

    def __init__(self):
        self.buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


_SCRATCH = _Scratch()
# The most elements a layer widens at once into the scratch buffer; larger layers run in output slices.
SCRATCH_ELEMENTS = 8 * 2**20


def _scratch_like(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `tensor`'s shape and strides in `dtype`, a view of this thread's scratch buffer
    (grown to fit). `tensor` must be dense (contiguous in some order, as parameters are)."""
    key, n = (tensor.device, dtype), tensor.numel()
    buffer = _SCRATCH.buffers.get(key)
    if buffer is None or buffer.numel() < n:
        buffer = _SCRATCH.buffers[key] = None  # the smaller one is freed before the larger one is made
        buffer = _SCRATCH.buffers[key] = torch.empty(n, dtype=dtype, device=tensor.device)
    return buffer[:n].as_strided(tensor.shape, tensor.stride())


def release_scratch() -> None:
    """Free this thread's cast buffers (they are made again when a stored layer next runs)."""
    _SCRATCH.buffers.clear()


def _reusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a layer's widened weight may live in the scratch buffer: the CPU, nothing tracing the
    call, and no autograd graph that would keep the weight for a backward pass."""
    if weight.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if not (weight.is_contiguous() or weight.is_contiguous(memory_format=torch.channels_last)):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


class StoredWeights:
    """Mixin of the stored layers: `compute_dtype` is what the weight is cast to when it runs."""

    compute_dtype: torch.dtype

    def _apply(self, fn, recurse=True):
        # `.to(dtype)`, `.float()`, `.half()` convert every tensor: from then on the layer computes in
        # whatever dtype a tensor of its compute dtype becomes (device moves leave it as it was).
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.weight.device))
        module = super()._apply(fn, recurse)
        module.compute_dtype = probe.dtype
        return module

    def _cast(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(self.compute_dtype)

    def _widened_weight(self, x: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """The weight (its output channels `rows`) in the compute dtype, for this one call."""
        weight = self.weight if rows == slice(None) else self.weight[rows]
        if weight.dtype == self.compute_dtype:  # a LoRA merged in the compute dtype, or after .to()
            return weight
        if weight.dtype == torch.int8:  # widened, then scaled in place: torch.mul(q, scale, out=) makes a temporary
            out = _scratch_like(weight, self.compute_dtype) if _reusable(x, weight) else torch.empty_like(
                weight, dtype=self.compute_dtype)
            return out.copy_(weight).mul_(self.weight_scale[rows])
        if not _reusable(x, weight):
            return weight.to(self.compute_dtype)
        return _scratch_like(weight, self.compute_dtype).copy_(weight)

    def _run_widened(self, x: torch.Tensor, run, channel_dim: int) -> torch.Tensor:
        """`run(x, weight, bias)` with the weight and bias widened; a layer over `SCRATCH_ELEMENTS` runs
        on slices of its output channels (each an independent set of sums), joined along `channel_dim`."""
        weight, bias = self.weight, self.bias
        # (a grouped convolution's output slices would need their own input groups: it runs whole)
        whole = weight.numel() <= SCRATCH_ELEMENTS or getattr(self, "groups", 1) != 1
        if whole or weight.dtype == self.compute_dtype or not _reusable(x, weight):
            return run(x, self._widened_weight(x), self._cast(bias))
        step = max(1, SCRATCH_ELEMENTS // (weight.numel() // weight.shape[0]))  # output channels per slice
        slices = [slice(first, first + step) for first in range(0, weight.shape[0], step)]
        return torch.cat([run(x, self._widened_weight(x, rows), self._cast(None if bias is None else bias[rows]))
                          for rows in slices], dim=channel_dim)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.dtype == torch.int8:  # the numbers it computes with, never bare int8 values
            destination[prefix + "weight"] = dense_weight(self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stored={self.weight.dtype}, compute={self.compute_dtype}"


class StoredLinear(StoredWeights, Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run_widened(x, linear, channel_dim=-1)


class StoredConv2d(StoredWeights, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run_widened(x, self._conv_forward, channel_dim=1)


class StoredEmbedding(StoredWeights, nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Look up, then widen: the same numbers as widening the table first, for a fraction of the work.
        out = F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                          self.scale_grad_by_freq, self.sparse)
        return out.to(self.compute_dtype)


_STORED = {nn.Linear: StoredLinear, Linear: StoredLinear, nn.Conv2d: StoredConv2d, nn.Embedding: StoredEmbedding}


def storable_names(net: nn.Module) -> set[str]:
    """The parameter names (`layer.weight`) that `keep_stored` can leave in their stored dtype."""
    return {f"{name}.weight" if name else "weight" for name, m in net.named_modules() if type(m) in STORABLE}


def keeps_exactly(stored: torch.dtype, compute: torch.dtype) -> bool:
    """Whether a weight stored as `stored` may stay so for computing in `compute`: narrower, and exact."""
    return (stored, compute) in EXACT_UPCASTS


def keep_stored(net: nn.Module, compute: torch.dtype) -> nn.Module:
    """Make each Linear / Conv2d / Embedding of `net` whose weight is not in `compute` cast it to
    `compute` when it runs (in place; returns `net`). Everything else must already be in `compute`."""
    for module in net.modules():
        stored = _STORED.get(type(module))
        if stored is not None and module.weight.dtype != compute:
            module.__class__ = stored  # same state, names and parameters; only forward differs
            module.compute_dtype = compute
    return net


def keeps_stored(net: nn.Module) -> bool:
    """Whether some layer of `net` keeps its weight narrower than it computes."""
    return any(isinstance(m, StoredWeights) and m.weight.dtype != m.compute_dtype for m in net.modules())


def compute_dtype(net: nn.Module) -> torch.dtype:
    """The dtype `net` computes in, so the dtype its inputs must be given in: its stored layers'
    compute dtype, or else that of its parameters (the first with any decides, as before)."""
    for module in net.modules():
        if isinstance(module, StoredWeights):
            return module.compute_dtype
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                return param.dtype
    return torch.float32


def weight_and_bias_as_computed(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A Linear or Conv2d's (weight, bias) as its forward would use them on input `x`, for code that
    computes with them another way (`layers.Upsample`). A stored layer's widened weight may be a view
    of the scratch buffer: use it before the next stored layer runs."""
    if isinstance(layer, StoredWeights):
        return layer._widened_weight(x), layer._cast(layer.bias)
    return layer.weight, layer.bias


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A layer's weight as it computes: dequantised if int8, else the weight itself (in its dtype)."""
    weight = module.weight
    if weight.dtype == torch.int8:
        return (weight * module.weight_scale).to(module.compute_dtype)
    return weight


QUANTIZABLE = (nn.Linear, Linear, nn.Conv2d)


def quantizable_names(net: nn.Module) -> set[str]:
    """The parameter names (`layer.weight`) that `quantize_int8` turns into int8."""
    return {f"{name}.weight" if name else "weight" for name, m in net.named_modules() if type(m) in QUANTIZABLE}


def quantize_int8(weight: torch.Tensor, *, overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q, scale) with weight ~ q * scale, scale shaped to broadcast
    over the weight ((out, 1) or (out, 1, 1, 1)), in float32. An all-zero channel gets scale 1.
    `overwrite`: `weight` (float32, contiguous) is a temporary of the caller's and is computed in place
    (loading: one fp32 copy per layer instead of four)."""
    w = weight if overwrite and weight.dtype == torch.float32 and weight.is_contiguous() else weight.float().clone()
    low, high = torch.aminmax(w.view(w.shape[0], -1), dim=1)
    amax = torch.maximum(-low, high).view(-1, *([1] * (w.dim() - 1)))
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = w.div_(scale).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def attach_scales(net: nn.Module, scales: dict[str, torch.Tensor]) -> None:
    """Give each layer whose weight was loaded as int8 its scale (`quantize_int8`'s), as a buffer
    that moves with the layer and stays out of the state dict."""
    modules = dict(net.named_modules())
    for name, scale in scales.items():
        modules[name.rsplit(".", 1)[0] if "." in name else ""].register_buffer("weight_scale", scale, persistent=False)


def layer_compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype one layer's weight is used in (its own dtype, unless kept as stored)."""
    return module.compute_dtype if isinstance(module, StoredWeights) else module.weight.dtype
