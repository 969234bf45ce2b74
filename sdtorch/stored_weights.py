"""Weights kept as the file stores them, computed in a wider dtype.

An fp16 (or bf16) checkpoint run in fp32 need not be widened in memory: each Linear, Conv2d and
Embedding keeps its 16-bit weight and casts it to the compute dtype when it runs, one layer at a
time. fp16 -> fp32 (and bf16 -> fp32) is exact, so the outputs are bit-identical to loading the
weights as fp32, with the large weights taking half the memory; the cost is one cast per layer and
call (a copy of that layer's weight, released right after).

The seam is the module type: `keep_stored` turns such a layer into its `Stored*` subclass (same
parameters, names and state dict; only `forward` differs), which is all the rest of the code sees:
`compute_dtype(net)` is the dtype inputs must be given in, LoRA merges into a stored weight in that
dtype (`adapters.lora`), and `net.to(dtype=...)` converts every tensor as it always did, after
which the layers compute in that dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Only these exact types: a subclass may have its own forward, which a swap would lose.
STORABLE = (nn.Linear, nn.Conv2d, nn.Embedding)
# Stored dtypes that widen to the compute dtype exactly.
EXACT_UPCASTS = {(torch.float16, torch.float32), (torch.bfloat16, torch.float32)}


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

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stored={self.weight.dtype}, compute={self.compute_dtype}"


class StoredLinear(StoredWeights, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._cast(self.weight), self._cast(self.bias))


class StoredConv2d(StoredWeights, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self._cast(self.weight), self._cast(self.bias))


class StoredEmbedding(StoredWeights, nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Look up, then widen: the same numbers as widening the table first, for a fraction of the work.
        out = F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                          self.scale_grad_by_freq, self.sparse)
        return out.to(self.compute_dtype)


_STORED = {nn.Linear: StoredLinear, nn.Conv2d: StoredConv2d, nn.Embedding: StoredEmbedding}


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


def layer_compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype one layer's weight is used in (its own dtype, unless kept as stored)."""
    return module.compute_dtype if isinstance(module, StoredWeights) else module.weight.dtype
