"""Progress on a terminal: a tqdm bar over the sampler's `StepEvent`s (steps done, rate, ETA).

A display concern, so it lives above the pipeline: the CLI and the Python API's convenience wrapper
use it; the samplers and the pipeline only emit events.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from sdtorch.request import GenerationRequest
from sdtorch.samplers import SAMPLERS, StepCallback, StepEvent


class StepProgress:
    """`with StepProgress(request) as bar: pipe.run(request, bar.chain(callback))`; the bar opens on the
    first step, sized by the steps that really run (image-to-image runs fewer)."""

    def __init__(self, request: GenerationRequest, disable: bool = False):
        entry = SAMPLERS.get(request.sampler)
        self.label = entry.display_name if entry else request.sampler
        self.disable = disable
        self.bar: tqdm | None = None

    def __enter__(self) -> StepProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, event: StepEvent) -> None:
        if self.bar is not None and self.bar.n >= self.bar.total:  # a run after the first (a chunk, a hires pass)
            self.bar.close()
            self.bar = None
        if self.bar is None:
            self.bar = tqdm(total=event.total, desc=self.label, unit="step", disable=self.disable)
        self.bar.update(1)

    def chain(self, callback: StepCallback | None) -> StepCallback:
        """A callback that advances the bar, then calls `callback`."""

        def both(event: StepEvent) -> None:
            self.update(event)
            if callback is not None:
                callback(event)

        return both
