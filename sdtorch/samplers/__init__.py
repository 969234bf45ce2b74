"""Samplers: stateless loops over a denoiser on SD's discrete schedule, one per method.

`sample(name, eps_model, noise, steps, ...)` runs one of `SAMPLERS` the way the diffusers scheduler
of the same method runs inside StableDiffusion(Img2Img)Pipeline when built from the SD 1.5 scheduler
config with its default options: the same timesteps, sigmas, model inputs and noise draws, to within
float rounding. Sigma-based methods work in k-diffusion's VE space (`sigma_samplers`), the DDPM
family in VP space over integer timesteps (`timestep_samplers`); the grids are in `schedules`.

img2img follows the reference too, odd corners included: LMS keeps counting its order from the
grid's start, and PLMS's warm start meets a slice of its grid that does not repeat t_1 (see
`sample_lms`, `sample_plms`). Both are what diffusers' img2img pipeline does with those schedulers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import SdtorchError
from . import schedules
from .schedules import ALPHAS_CUMPROD, NUM_TRAIN_TIMESTEPS, sigma_schedule
from .sigma_samplers import (
    Denoiser,
    Generators,
    sample_dpm_2,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
    sample_unipc,
)
from .timestep_samplers import sample_ddim, sample_ddpm, sample_plms

__all__ = ["SAMPLERS", "SamplerInfo", "a1111_name", "sample"]


@dataclass(frozen=True)
class SamplerInfo:
    """What a user-facing sampler is called and what it accepts."""

    display_name: str  # as AUTOMATIC1111 shows it (without " Karras")
    supports_karras: bool  # accepts Karras et al. 2022 sigmas (`karras=True`)
    stochastic: bool  # draws fresh noise every step (from `generator`); ddim only when eta > 0


SAMPLERS: dict[str, SamplerInfo] = {
    "ddim": SamplerInfo("DDIM", supports_karras=False, stochastic=False),
    "pndm": SamplerInfo("PLMS", supports_karras=False, stochastic=False),
    "lms": SamplerInfo("LMS", supports_karras=True, stochastic=False),
    "euler": SamplerInfo("Euler", supports_karras=True, stochastic=False),
    "euler_a": SamplerInfo("Euler a", supports_karras=False, stochastic=True),
    "heun": SamplerInfo("Heun", supports_karras=True, stochastic=False),
    "dpm2": SamplerInfo("DPM2", supports_karras=True, stochastic=False),
    "dpmpp_2m": SamplerInfo("DPM++ 2M", supports_karras=True, stochastic=False),
    "dpmpp_2m_sde": SamplerInfo("DPM++ 2M SDE", supports_karras=True, stochastic=True),
    "unipc": SamplerInfo("UniPC", supports_karras=True, stochastic=False),
    "ddpm": SamplerInfo("DDPM", supports_karras=False, stochastic=True),
}


class _Grid(NamedTuple):
    """How a sigma-space method lays out its grid, as its diffusers scheduler does from SD's config."""

    timesteps: Callable[[int], Tensor]  # the spacing of its timesteps for a step count
    round_karras_timesteps: bool  # Karras sigmas get integer timesteps
    solver: bool  # DPM-Solver style: Karras spans the whole training range, x starts as unit VP noise


_SIGMA_GRIDS: dict[str, _Grid] = {
    "lms": _Grid(schedules.linspace_timesteps, False, False),
    "euler": _Grid(schedules.linspace_timesteps, False, False),
    "euler_a": _Grid(schedules.linspace_timesteps, False, False),
    "heun": _Grid(schedules.linspace_timesteps, False, False),
    "dpm2": _Grid(schedules.linspace_timesteps, True, False),
    "dpmpp_2m": _Grid(schedules.solver_timesteps, True, True),
    "dpmpp_2m_sde": _Grid(schedules.solver_timesteps, True, True),
    "unipc": _Grid(schedules.solver_timesteps, True, True),
}


def _info(name: str, karras: bool = False) -> SamplerInfo:
    """The sampler's info, or an SdtorchError naming what is accepted."""
    if name not in SAMPLERS:
        raise SdtorchError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    info = SAMPLERS[name]
    if karras and not info.supports_karras:
        valid = ", ".join(n for n, i in SAMPLERS.items() if i.supports_karras)
        raise SdtorchError(f"sampler {name!r} does not take Karras sigmas; samplers that do: {valid}")
    return info


def a1111_name(name: str, karras: bool) -> str:
    """The sampler as AUTOMATIC1111 names it, e.g. 'DPM++ 2M Karras', 'Euler a'."""
    return _info(name, karras).display_name + (" Karras" if karras else "")


def _img2img_start(steps: int, strength: float) -> int:
    """Index of the first step img2img runs, as diffusers' StableDiffusionImg2ImgPipeline.get_timesteps."""
    if not 0.0 < strength <= 1.0:
        raise SdtorchError(f"strength must be in (0, 1], got {strength}")
    init_timestep = min(int(steps * strength), steps)
    if init_timestep == 0:
        raise SdtorchError(f"strength {strength} with {steps} steps runs no step; raise strength or steps")
    return max(steps - init_timestep, 0)


def sample(
    name: str,
    eps_model: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    steps: int,
    *,
    karras: bool = False,
    eta: float = 0.0,
    generator: Generators = None,
    init_latents: Tensor | None = None,
    strength: float = 1.0,
    callback: Callable[[int, int, float, Tensor, Tensor], None] | None = None,
    progress: bool = True,
) -> Tensor:
    """Run sampler `name` for `steps` steps from `noise` (or img2img from `init_latents` at `strength`).

    eps_model(x_in, t) is the UNet's eps prediction for the model input x_in at a 0-dim float timestep
    t (fractional on some grids). Stochastic samplers draw their per-step noise from `generator` in
    diffusers' order; a list of generators gives batch item i its noise from generator i, as in
    diffusers. callback(step, total, sigma, x, denoised) runs after each step with the new latents x
    at VE noise level sigma and the denoised estimate that step used, both in the scale the VAE
    decodes. Returns the final latents in that scale.
    """
    info = _info(name, karras)
    if eta != 0.0 and name != "ddim":
        raise SdtorchError(f"eta applies to the ddim sampler only, not {name!r}")
    if not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise SdtorchError(f"steps must be between 1 and {NUM_TRAIN_TIMESTEPS}, got {steps}")
    if init_latents is not None and init_latents.shape != noise.shape:
        raise SdtorchError(
            f"init latents {tuple(init_latents.shape)} and noise {tuple(noise.shape)} differ in shape"
        )
    start = 0 if init_latents is None else _img2img_start(steps, strength)
    total = steps - start

    bar = tqdm(total=total, desc=info.display_name, unit="step", disable=not progress)
    ve_space = name in _SIGMA_GRIDS

    def report(i: int, sigma: Tensor, x: Tensor, denoised: Tensor) -> None:
        bar.update(1)
        if callback is not None:
            x_vp = x / (sigma**2 + 1) ** 0.5 if ve_space else x
            callback(i, total, float(sigma), x_vp, denoised)

    try:
        if ve_space:
            return _sample_sigmas(
                name, eps_model, noise, steps, start, karras, init_latents, generator, report
            )
        return _sample_timesteps(name, eps_model, noise, steps, start, eta, init_latents, generator, report)
    finally:
        bar.close()


def _sample_sigmas(name, eps_model, noise, steps, start, karras, init_latents, generator, report) -> Tensor:
    """Build the method's sigma grid and starting x (VE), then run its loop from sigmas[start]."""
    grid = _SIGMA_GRIDS[name]
    schedule = sigma_schedule(
        grid.timesteps(steps),
        karras=karras,
        round_karras_timesteps=grid.round_karras_timesteps,
        karras_over_training_range=grid.solver,
    )
    model = Denoiser(eps_model, schedule)
    sigmas = schedule.sigmas
    if init_latents is not None:
        x = init_latents + noise * sigmas[start]
    elif grid.solver:  # unit-variance VP noise, not noise * sigma_max
        x = noise * (sigmas[0] ** 2 + 1) ** 0.5
    else:
        x = noise * sigmas[0]
    rest = sigmas[start:]
    if name == "lms":
        return sample_lms(model, x, sigmas, start=start, callback=report)
    if name == "euler_a":
        return sample_euler_ancestral(model, x, rest, generator=generator, callback=report)
    if name == "dpmpp_2m_sde":
        return sample_dpmpp_2m_sde(model, x, rest, generator=generator, callback=report)
    run = {
        "euler": sample_euler,
        "heun": sample_heun,
        "dpm2": sample_dpm_2,
        "dpmpp_2m": sample_dpmpp_2m,
        "unipc": sample_unipc,
    }[name]
    return run(model, x, rest, callback=report)


def _sample_timesteps(name, eps_model, noise, steps, start, eta, init_latents, generator, report) -> Tensor:
    """Build the method's timestep list and starting x (VP), then run its loop from the start-th step."""
    timesteps = schedules.leading_timesteps(steps)
    if name == "pndm":  # PLMS's warm start evaluates t1 twice: t0, t1, t1, t2, ...
        timesteps = torch.cat([timesteps[:2], timesteps[1:]])
    timesteps = timesteps[start:]
    if init_latents is None:
        x = noise
    else:
        a = ALPHAS_CUMPROD[timesteps[0]]
        x = a**0.5 * init_latents + (1 - a) ** 0.5 * noise
    # DDIM and PNDM end on abar_0 (SD's set_alpha_to_one=False), DDPM on abar = 1
    final_alpha = torch.tensor(1.0) if name == "ddpm" else ALPHAS_CUMPROD[0]
    if name == "ddim":
        return sample_ddim(eps_model, x, timesteps, ALPHAS_CUMPROD, final_alpha, eta, generator, report)
    if name == "pndm":
        stride = NUM_TRAIN_TIMESTEPS // steps
        return sample_plms(eps_model, x, timesteps, stride, ALPHAS_CUMPROD, final_alpha, report)
    return sample_ddpm(eps_model, x, timesteps, ALPHAS_CUMPROD, final_alpha, generator, report)
