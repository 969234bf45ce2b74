"""Where samplers get their fresh noise: a noise source called as k-diffusion's `noise_sampler`.

`GeneratorNoise` draws as diffusers' `randn_tensor` does: on each generator's own device, in the
latents' dtype, then moved; with one generator per batch item, item i's noise comes from generator
i, so image i of a batch regenerates alone with its own seed.

The generators themselves (`create_generator`): "cpu" is torch's CPU generator (diffusers, ComfyUI,
A1111's "CPU"); "gpu" and "nv" are `philox.PhiloxGenerator`, the numbers CUDA's torch.randn gives (A1111's
default "GPU" and its "NV"), computed on any device. `A1111Noise` is A1111's ImageRNG: the start noise with
variation seed and seed resize, ENSD, and the per-image draws its ancestral samplers make.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from sdtorch.errors import SdtorchError

from .philox import PhiloxGenerator

# (sigma, sigma_next) -> standard normal noise shaped like the latents
NoiseSource = Callable[[Tensor, Tensor], Tensor]


class GeneratorNoise:
    """Noise like `x` from a batch generator, or from one generator per batch item."""

    def __init__(self, like: Tensor, generators: torch.Generator | Sequence[torch.Generator] | None):
        if isinstance(generators, (list, tuple)) and len(generators) != like.shape[0]:
            raise ValueError(f"{len(generators)} generators for a batch of {like.shape[0]}")
        self.shape, self.dtype, self.device = like.shape, like.dtype, like.device
        self.generators = generators

    def __call__(self, sigma: Tensor | None = None, sigma_next: Tensor | None = None) -> Tensor:
        if isinstance(self.generators, (list, tuple)):
            return torch.cat([self._draw((1, *self.shape[1:]), g) for g in self.generators])
        return self._draw(self.shape, self.generators)

    def _draw(self, shape, generator: torch.Generator | None) -> Tensor:
        if isinstance(generator, PhiloxGenerator):  # CUDA's numbers, drawn on the CPU
            return generator.randn(shape).to(self.dtype).to(self.device)
        device = generator.device if generator is not None else self.device
        return torch.randn(shape, generator=generator, dtype=self.dtype, device=device).to(self.device)


# --- where the numbers come from: A1111's noise sources ------------------------------------------------

# Our names -> A1111's "Random number generator source" labels (its infotext's "RNG"; GPU, its default, unwritten).
RNG_SOURCES = {"cpu": "CPU", "gpu": "GPU", "nv": "NV"}


def rng_source(name: str) -> str:
    """Our name for a noise source given ours or A1111's label ("CPU", "GPU", "NV"), or one SdtorchError line."""
    key = str(name).strip().lower()
    if key not in RNG_SOURCES:
        raise SdtorchError(f"unknown RNG {name!r}; accepted: {', '.join(RNG_SOURCES)}")
    return key


def create_generator(rng: str, seed: int):
    """A generator for one image: "cpu", torch's CPU generator (diffusers, ComfyUI, A1111's CPU); "gpu" and "nv",
    the Philox generator equal to CUDA's torch.randn (A1111's GPU default and its NV), on any device."""
    if rng_source(rng) == "cpu":
        return torch.Generator("cpu").manual_seed(int(seed))
    return PhiloxGenerator(seed)


def randn(generator, shape) -> Tensor:
    """The generator's next draw of standard normals, float32 on the CPU."""
    if isinstance(generator, PhiloxGenerator):
        return generator.randn(shape)
    return torch.randn(shape, generator=generator, dtype=torch.float32, device=generator.device).cpu()


def slerp(val: float, low: Tensor, high: Tensor) -> Tensor:
    """A1111's spherical interpolation of variation noise (processing.slerp), quirks kept: the norms are taken
    along dim 1 of the (C, H, W) noise (its rows, not the whole tensor), and when the two are nearly parallel it
    falls back to `low * val + high * (1 - val)`, weights the other way round from the spherical branch."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


class A1111Noise:
    """AUTOMATIC1111's ImageRNG (modules/rng.py): one generator per image seeded with its seed; the first draw is
    the starting noise (variation seed mixed in by `slerp`, "Seed resize from" pasted in), after which the
    generators are reseeded with seed + ENSD when an eta noise seed delta is set; every later call (the
    ancestral and SDE samplers' noise) is the next draw of each image's generator, stacked.

    `shape` is one image's latents (C, H, W); `seed_resize_from` (width, height) in pixels, (0, 0) for none.
    """

    def __init__(self, shape, seeds, rng: str = "cpu", *, subseeds=None, subseed_strength: float = 0.0,
                 seed_resize_from: tuple[int, int] = (0, 0), ensd: int = 0, device=None):
        self.shape, self.seeds, self.rng = tuple(int(s) for s in shape), list(seeds), rng_source(rng)
        self.subseeds, self.subseed_strength = subseeds, float(subseed_strength)
        self.seed_resize_from, self.ensd = seed_resize_from, int(ensd)
        self.device = device if device is not None else torch.device("cpu")
        self.generators = [create_generator(self.rng, s) for s in self.seeds]
        self.draws = 0

    def _fresh(self, seed: int, shape) -> Tensor:
        """A1111's randn(seed, shape) without a generator: the global generator reseeded, i.e. a fresh one."""
        return randn(create_generator(self.rng, seed), shape)

    def first(self) -> Tensor:
        """The starting noise of every image: (B, C, H, W) float32."""
        rw, rh = self.seed_resize_from
        shape = self.shape
        noise_shape = shape if rh <= 0 or rw <= 0 else (shape[0], int(rh) // 8, int(rw) // 8)
        xs = []
        for i, (seed, generator) in enumerate(zip(self.seeds, self.generators)):
            subnoise = None
            if self.subseeds is not None and self.subseed_strength != 0:
                subseed = 0 if i >= len(self.subseeds) else self.subseeds[i]
                subnoise = self._fresh(subseed, noise_shape)
            noise = self._fresh(seed, noise_shape) if noise_shape != shape else randn(generator, shape)
            if subnoise is not None:
                noise = slerp(self.subseed_strength, noise, subnoise)
            if noise_shape != shape:  # paste the centre of the old size's noise into this size's
                x = randn(generator, shape)
                dx, dy = (shape[2] - noise_shape[2]) // 2, (shape[1] - noise_shape[1]) // 2
                w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
                h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
                tx, ty, dx, dy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
                x[:, ty:ty + h, tx:tx + w] = noise[:, dy:dy + h, dx:dx + w]
                noise = x
            xs.append(noise)
        if self.ensd:
            self.generators = [create_generator(self.rng, s + self.ensd) for s in self.seeds]
        self.draws += 1
        return torch.stack(xs).to(self.device)

    def __call__(self, sigma: Tensor | None = None, sigma_next: Tensor | None = None) -> Tensor:
        if self.draws == 0:
            return self.first()
        self.draws += 1
        return torch.stack([randn(g, self.shape) for g in self.generators]).to(self.device)
