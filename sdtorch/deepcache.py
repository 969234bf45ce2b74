"""DeepCache (Ma, Fang and Wang 2023, "DeepCache: Accelerating Diffusion Models for Free", arXiv 2312.00858):
a fast mode that reuses the UNet's deep features across steps.

Adjacent steps' high-level features barely change, so every `interval`-th step runs the whole UNet and keeps
the feature entering its last output block (the up path's result at the shallowest skip, branch 0 of the
paper); the steps between run only the first input block (conv_in), that last output block on the cached
feature and the fresh skip, and the output head. The steps are counted from the sampler's first, through its
StepEvents (`step_done`), so a two-call step (Heun) caches or not as one, as the authors' diffusers helper
counts the scheduler's timesteps. A call whose batch or size differs from the cached feature's runs whole.
"""

from __future__ import annotations

from torch import Tensor


class FeatureCache:
    """One generation's cache: the interval, the steps done so far, and the last whole step's deep feature."""

    def __init__(self, interval: int):
        self.interval, self.step, self.feature = interval, 0, None

    def step_done(self, event) -> None:
        self.step = event.step + 1

    def usable(self, shape) -> Tensor | None:
        """The cached deep feature when this step reuses it and it fits a call on `shape` (B, C, H, W)."""
        feature = self.feature
        if self.step % self.interval == 0 or feature is None:
            return None
        if feature.shape[0] != shape[0] or feature.shape[-2:] != shape[-2:]:
            return None
        return feature

    def keep(self, feature: Tensor) -> None:
        self.feature = feature
