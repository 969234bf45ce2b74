"""Samplers of the DDPM family, in VP space over integer timesteps: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.

The same arguments as the sigma samplers, in their own space: `model` is the `Denoiser` (its `eps(x, t)`
and its schedule's alpha-bar table), the grid is a descending list of integer timesteps, and after the
last one the chain lands on `final_alpha` (abar of the level it ends at). `noise(sigma, sigma_next)`
gives fresh noise; `callback(i, sigma, x, denoised)` runs after step i with the new x (VP) at VE noise
level sigma.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdtorch.diffusion import Denoiser

from .noise import NoiseSource
from .schedules import vp_sigma
from .sigma_samplers import Callback


def _alphas(timesteps: Tensor, alphas_cumprod: Tensor, final_alpha: Tensor) -> tuple[Tensor, Tensor]:
    """abar at each timestep, and at the level each step goes to (the next timestep, or final_alpha)."""
    a = alphas_cumprod[timesteps]
    return a, torch.cat([a[1:], final_alpha.reshape(1)])


def _x0(x: Tensor, eps: Tensor, a: Tensor) -> Tensor:
    """x0 implied by eps at level abar = a."""
    return (x - (1 - a) ** 0.5 * eps) / a**0.5


@torch.no_grad()
def sample_ddim(
    model: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    *,
    noise: NoiseSource,
    callback: Callback,
    final_alpha: Tensor,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2020, eq. 12): deterministic at eta = 0, DDPM-like noise as eta -> 1."""
    alphas, alphas_next = _alphas(timesteps, model.schedule.alphas_cumprod, final_alpha)
    for i, (t, a, a_next) in enumerate(zip(timesteps, alphas, alphas_next)):
        eps = model.eps(x, t)
        x0 = _x0(x, eps, a)
        std = eta * ((1 - a_next) / (1 - a) * (1 - a / a_next)) ** 0.5  # eq. 16
        x = a_next**0.5 * x0 + (1 - a_next - std**2) ** 0.5 * eps
        if eta > 0:
            x = x + std * noise(vp_sigma(a), vp_sigma(a_next))
        callback(i, vp_sigma(a_next), x, x0)
    return x


def _pndm_transfer(x: Tensor, eps: Tensor, a: Tensor, a_next: Tensor) -> Tensor:
    """PNDM's transfer phi(x_t, eps, t -> t-delta) (Liu et al. 2022, eq. 11): the DDIM step written in eps."""
    denom = a * (1 - a_next) ** 0.5 + (a * (1 - a) * a_next) ** 0.5
    return (a_next / a) ** 0.5 * x - (a_next - a) * eps / denom


@torch.no_grad()
def sample_plms(
    model: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    *,
    noise: NoiseSource,
    callback: Callback,
    final_alpha: Tensor,
    stride: int,
) -> Tensor:
    """PLMS: pseudo linear multistep, 4th-order Adams-Bashforth on eps (Liu et al. 2022, PNDM, eq. 12).

    Call i steps t_i -> t_i - stride with a blend of the latest eps; the warm start is diffusers'
    PNDM with skip_prk_steps: call 1 redoes the first step, t_1 + stride -> t_1 from the sample call
    0 started from, with the mean of both eps (a Heun step). txt2img grids repeat t_1 for it
    (t_0, t_1, t_1, t_2, ...); img2img runs a slice of that grid with the same rule, as diffusers does.
    """

    alphas_cumprod = model.schedule.alphas_cumprod

    def alpha(t: Tensor) -> Tensor:
        return alphas_cumprod[t] if t >= 0 else final_alpha

    ets: list[Tensor] = []
    x_start = x
    for i, t in enumerate(timesteps):
        eps = model.eps(x, t)
        x0 = _x0(x, eps, alpha(t))
        t_from, t_to = (t + stride, t) if i == 1 else (t, t - stride)
        if i == 0:
            ets, e, x_start = [eps], eps, x
        elif i == 1:
            e, x = (eps + ets[-1]) / 2, x_start
        else:
            ets = (ets + [eps])[-4:]
            if len(ets) == 2:
                e = (3 * ets[-1] - ets[-2]) / 2
            elif len(ets) == 3:
                e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
            else:
                e = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
        x = _pndm_transfer(x, e, alpha(t_from), alpha(t_to))
        if i > 0 or len(timesteps) == 1:  # call 0 is provisional: call 1 redoes it
            callback(max(i - 1, 0), vp_sigma(alpha(t_to)), x, x0)
    return x


@torch.no_grad()
def sample_ddpm(
    model: Denoiser, x: Tensor, timesteps: Tensor, *, noise: NoiseSource, callback: Callback, final_alpha: Tensor
) -> Tensor:
    """Ancestral sampling from the posterior q(x_t-1 | x_t, x0) with variance beta-tilde (Ho et al. 2020, eqs. 6-7)."""
    alphas, alphas_next = _alphas(timesteps, model.schedule.alphas_cumprod, final_alpha)
    for i, (t, a, a_next) in enumerate(zip(timesteps, alphas, alphas_next)):
        eps = model.eps(x, t)
        x0 = _x0(x, eps, a)
        beta = 1 - a / a_next  # beta of the whole stride t -> t_next
        mean = a_next**0.5 * beta / (1 - a) * x0 + (1 - beta) ** 0.5 * (1 - a_next) / (1 - a) * x
        var = ((1 - a_next) / (1 - a) * beta).clamp(min=1e-20)
        x = mean
        if t > 0:
            x = x + var**0.5 * noise(vp_sigma(a), vp_sigma(a_next))
        callback(i, vp_sigma(a_next), x, x0)
    return x
