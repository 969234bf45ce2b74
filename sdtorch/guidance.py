"""Wrappers over the UNet that decide what the samplers' denoiser sees: classifier-free guidance.

`guided_model` returns the model function (x_vp, t) -> raw UNet output (eps or v) that
`sdtorch.diffusion.Denoiser` wraps. Guidance combines raw outputs; since eps, v and the denoised
estimate are affine in the output for a fixed x, guiding any of them gives the same result.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

from sdtorch.conditioning import Conditioning, added_vector
from sdtorch.deepcache import FeatureCache
from sdtorch.diffusion import ModelFn
from sdtorch.stored_weights import compute_dtype
from sdtorch.unet import UNet

_IN_TURN: ContextVar[bool] = ContextVar("sdtorch_guidance_in_turn", default=False)


@contextmanager
def passes_in_turn(enabled: bool = True) -> Iterator[None]:
    """Within it, guidance runs its passes (unconditional, each conditional part) as separate UNet calls
    rather than one batched call: about half the UNet's activation memory for CFG (the low-memory mode),
    at some speed (kernels use a larger batch better; not measured apart from the mode's whole runs); the
    outputs equal the batched call's to float rounding (kernels may block a batch of one differently).
    Not with DeepCache, whose cache holds one batched call."""
    token = _IN_TURN.set(enabled)
    try:
        yield
    finally:
        _IN_TURN.reset(token)


class GuidanceCutoff:
    """Guidance for the first `fraction` of a sampler's `total` steps, then none: diffusers' CFG cut-off (its
    documented step-end callback drops the unconditional embeddings and sets the scale to 0 at step index
    int(total * fraction)), so steps 0 to int(total * fraction) are guided. `step_done` is fed the sampler's
    StepEvents."""

    def __init__(self, fraction: float, total: int):
        self.guided_steps, self.done = min(total, int(total * fraction) + 1), 0

    def step_done(self, event) -> None:
        self.done = event.step + 1

    @property
    def guiding(self) -> bool:
        return self.done < self.guided_steps


def guided_model(
    unet: UNet, cond: Conditioning, uncond: Conditioning | None, scale: float, batch: int, downscale: int = 8,
    cutoff: GuidanceCutoff | None = None, feature_cache: FeatureCache | None = None,
) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022) over composable parts (Liu et al. 2022):
    out = out(uncond) + scale * sum_i w_i * (out(part_i) - out(uncond)), every pass of a call in one
    batched UNet call. Without `uncond` (scale <= 1, as diffusers decides) the conditional prediction
    alone (the weighted sum of the parts).

    The conditioning may change over the steps (prompt editing); the step is counted in model calls
    from 1, as A1111's CFGDenoiser counts it. An SDXL UNet also gets each pass's added vector (its
    pooled text embedding and the image size, `downscale` pixels per latent pixel). With `cutoff`, the steps
    after it run the conditional passes alone, as without `uncond`; with `feature_cache`, the UNet reuses its deep
    features between whole steps (DeepCache, `sdtorch.deepcache`).
    """
    extra = {"cache": feature_cache} if feature_cache is not None else {}
    dtype = compute_dtype(unet)
    calls = 0
    batched: dict[tuple[int, ...], Tensor] = {}  # the (n * B, T, width) context of each combination

    def context_for(contexts: list[Tensor]) -> Tensor:
        key = tuple(id(c) for c in contexts)
        if key not in batched:
            batched[key] = torch.cat([c.repeat(batch, 1, 1) for c in contexts])
        return batched[key]

    vectors: dict[tuple, Tensor] = {}  # SDXL: the (n * B, adm) vector of each combination and size

    def vector_for(x: Tensor, uncond: Conditioning | None) -> Tensor | None:
        pooled = cond.pooled_at(calls)
        if pooled is None:
            return None
        pooled = ([uncond.pooled_at(calls)[0]] if uncond is not None else []) + pooled
        height, width = x.shape[-2] * downscale, x.shape[-1] * downscale
        key = (*(id(p) for p in pooled), height, width)
        if key not in vectors:
            vectors[key] = added_vector(torch.cat([p.repeat(batch, 1) for p in pooled]), height, width).to(dtype)
        return vectors[key]

    full_uncond = uncond

    def model(x: Tensor, t: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        uncond = full_uncond if cutoff is None or cutoff.guiding else None
        parts = cond.at(calls)
        contexts = ([uncond.at(calls)[0][1]] if uncond is not None else []) + [c for _, c in parts]
        n = len(contexts)
        x_in = torch.cat([x] * n).to(dtype) if n > 1 else x.to(dtype)
        context, vector = context_for(contexts), vector_for(x, uncond)
        if n > 1 and _IN_TURN.get() and feature_cache is None:
            rows = x.shape[0]
            part = [slice(i * rows, (i + 1) * rows) for i in range(n)]
            outs = [unet(x_in[p], t, context[p], None if vector is None else vector[p]).float() for p in part]
        else:
            outs = unet(x_in, t, context, vector, **extra).float().chunk(n)
        if uncond is None:
            if len(parts) == 1 and parts[0][0] == 1.0:
                return outs[0]
            return sum(w * o for (w, _), o in zip(parts, outs))
        out_uncond, conds = outs[0], outs[1:]
        deltas = [(o - out_uncond) if w == 1.0 else w * (o - out_uncond) for (w, _), o in zip(parts, conds)]
        delta = deltas[0] if len(deltas) == 1 else sum(deltas)
        return out_uncond + scale * delta

    return model
