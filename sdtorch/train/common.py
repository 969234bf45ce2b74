"""What the three stages share: deterministic batches from the shapes world, the learning-rate
schedule, a logger that prints and appends to a file, and resumable stage checkpoints."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from sdtorch.shapes.world import batch as world_batch
from sdtorch.tokenizer import get_tokenizer


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], as the VAE takes images."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def training_batch(seed: int, step: int, n: int, device="cpu") -> tuple[torch.Tensor, list[str], list]:
    """Batch `step` of a stage whose data seed is `seed`: (images (n,3,64,64) in [-1,1], captions,
    scenes). Each step has its own seed, so a resumed run sees exactly the batches it would have."""
    images, captions, scenes = world_batch(seed + step, n)
    return images_to_tensor(images).to(device), captions, scenes


def tokenize(captions: list[str], device="cpu") -> torch.Tensor:
    return get_tokenizer()(captions).to(device)  # (B, 77)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimise(optimizer: torch.optim.Optimizer, loss: torch.Tensor, module: torch.nn.Module) -> None:
    """One update of every stage: gradients of `loss`, clipped to norm 1, then the optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    optimizer.step()


class Log:
    """Prints a line and appends it to `path` (with the wall-clock time since the log began)."""

    def __init__(self, path: Path | None, quiet: bool = False):
        self.path, self.quiet, self.start = path, quiet, time.time()

    def __call__(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} +{time.time() - self.start:7.1f}s] {message}"
        if not self.quiet:
            print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def save_state(path: Path, state: dict) -> None:
    """Write a stage checkpoint atomically (a crash mid-write never leaves a broken file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path) -> dict | None:
    # Tensors, numbers and dicts only: the weights-only unpickler, as for any checkpoint.
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


class EMA:
    """Exponential moving average of a module's parameters, with the usual warm-up of the decay
    (min(decay, (1 + n) / (10 + n))) so that early averages are not dominated by the initial weights."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}

    def copy_to(self, module: torch.nn.Module) -> None:
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()})


class Clock:
    """A stage's progress by steps and, optionally, by wall clock (summed over resumed runs).

    `position(step)` is the step the learning-rate schedule is at: the further along of the step
    count and the clock, so that a stage given a time budget on a busy machine still ends with its
    rate decayed. `done(step)` is true when either runs out."""

    def __init__(self, steps: int, budget: float | None = None, elapsed: float = 0.0):
        self.steps, self.budget, self.elapsed = steps, budget, elapsed
        self.last = time.time()

    def tick(self) -> None:
        now = time.time()
        self.elapsed, self.last = self.elapsed + now - self.last, now

    def position(self, step: int) -> int:
        if self.budget is None:
            return step
        return max(step, min(self.steps, round(self.steps * self.elapsed / self.budget)))

    def done(self, step: int) -> bool:
        return step >= self.steps or (self.budget is not None and self.elapsed >= self.budget)

    def remaining(self, step: int) -> float:
        """Seconds left at `step`: the remaining steps at the pace so far, or what is left of the
        budget, whichever ends first."""
        by_steps = (self.steps - step) * self.elapsed / max(step, 1)
        return by_steps if self.budget is None else min(by_steps, max(0.0, self.budget - self.elapsed))

    def eta(self, step: int) -> str:
        minutes, seconds = divmod(round(self.remaining(step)), 60)
        return f"{minutes}:{seconds:02d} left"


class ThreadTuner:
    """Chooses the number of torch CPU threads by timing steps, because the machine is shared.

    With other work on the same cores, 2 threads that wait on each other can be many times slower
    than 1; alone, 2 are faster. Every `every` steps it times `probe` steps with each candidate
    count and keeps the fastest (median)."""

    def __init__(self, max_threads: int, probe: int = 6, every: int = 150):
        self.candidates = sorted({max_threads, 1}, reverse=True)
        self.probe, self.every = probe, every
        self.times: dict[int, list[float]] = {}
        self.count = 0
        self.start = time.perf_counter()
        self._set(self.candidates[0])

    def _set(self, n: int) -> None:
        self.current = n
        torch.set_num_threads(n)

    def step_done(self) -> None:
        now = time.perf_counter()
        seconds, self.start = now - self.start, now
        if len(self.candidates) == 1:
            return
        self.count += 1
        cycle = self.count % (self.every + self.probe * len(self.candidates))
        if cycle < self.probe * len(self.candidates):  # probing: candidate cycle // probe
            if cycle == 0:
                self.times = {}
            self.times.setdefault(self.current, []).append(seconds)
            self._set(self.candidates[min(len(self.candidates) - 1, (cycle + 1) // self.probe)])
            if cycle + 1 == self.probe * len(self.candidates):
                best = min(self.times, key=lambda n: sorted(self.times[n])[len(self.times[n]) // 2])
                self._set(best)

    def restore(self) -> None:
        """Back to the largest count, for whatever runs next."""
        self._set(self.candidates[0])
