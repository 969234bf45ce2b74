"""Samplers in k-diffusion's VE space: x = x0 + sigma * eps, driven by a denoiser D(x, sigma) -> x0.

Each is a stateless loop over a descending sigma grid ending at 0 (Karras et al. 2022 notation), with
k-diffusion's arguments: `model(x, sigma)` the denoiser, `noise(sigma, sigma_next)` fresh standard
normal noise (stochastic methods only), `callback(i, sigma, x, denoised)` after step i with the new x
(VE) at its noise level sigma and the denoised estimate that step used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .noise import NoiseSource
from .schedules import lms_coefficient

Model = Callable[[Tensor, Tensor], Tensor]  # (x, sigma) -> denoised x0
Callback = Callable[[int, Tensor, Tensor, Tensor], None]


def _to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """dx/dsigma of the probability-flow ODE: (x - D(x, sigma)) / sigma."""
    return (x - denoised) / sigma


@torch.no_grad()
def sample_euler(model: Model, x: Tensor, sigmas: Tensor, *, noise: NoiseSource, callback: Callback) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        callback(i, sigmas[i + 1], x, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model: Model, x: Tensor, sigmas: Tensor, *, noise: NoiseSource, callback: Callback
) -> Tensor:
    """Ancestral Euler: an Euler step down to sigma_down, then fresh noise up to sigma_next (k-diffusion, eta=1)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x = x + _to_d(x, sigma, denoised) * (sigma_down - sigma)
        x = x + noise(sigma, sigma_next) * sigma_up  # drawn on the last step too, as diffusers does
        callback(i, sigma_next, x, denoised)
    return x


@torch.no_grad()
def sample_heun(model: Model, x: Tensor, sigmas: Tensor, *, noise: NoiseSource, callback: Callback) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1); a plain Euler step onto sigma = 0."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        d = _to_d(x, sigma, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            x_euler = x + d * (sigma_next - sigma)
            d_next = _to_d(x_euler, sigma_next, model(x_euler, sigma_next))
            x = x + (d + d_next) / 2 * (sigma_next - sigma)
        callback(i, sigma_next, x, denoised)
    return x


@torch.no_grad()
def sample_dpm_2(model: Model, x: Tensor, sigmas: Tensor, *, noise: NoiseSource, callback: Callback) -> Tensor:
    """DPM-Solver-2 as k-diffusion's sample_dpm_2: the slope at the log-space midpoint sigma
    (Lu et al. 2022 / Karras et al. 2022)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        d = _to_d(x, sigma, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            sigma_mid = sigma_next.log().lerp(sigma.log(), 0.5).exp()
            x_mid = x + d * (sigma_mid - sigma)
            d_mid = _to_d(x_mid, sigma_mid, model(x_mid, sigma_mid))
            x = x + d_mid * (sigma_next - sigma)
        callback(i, sigma_next, x, denoised)
    return x


@torch.no_grad()
def sample_lms(
    model: Model, x: Tensor, sigmas: Tensor, *, noise: NoiseSource, callback: Callback, order: int = 4, start: int = 0
) -> Tensor:
    """Linear multistep over sigma (k-diffusion's sample_lms, after Karras et al. 2022).

    `start` begins at sigmas[start] of the full grid; like diffusers' img2img, the method's order then
    counts from the grid's start, so the first steps use high-order weights with fewer slopes.
    """
    ds: list[Tensor] = []
    for i in range(start, len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        ds = (ds + [_to_d(x, sigmas[i], denoised)])[-order:]
        cur_order = min(i + 1, order)
        coeffs = [lms_coefficient(sigmas, i, j, cur_order) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        callback(i - start, sigmas[i + 1], x, denoised)
    return x


def _lambda(sigma: Tensor) -> Tensor:
    """Half log-SNR, lambda = -log(sigma) in VE terms (Lu et al. 2022)."""
    return -sigma.log()


@torch.no_grad()
def sample_dpmpp_2m(model: Model, x: Tensor, sigmas: Tensor, *, noise: NoiseSource, callback: Callback) -> Tensor:
    """DPM-Solver++(2M), multistep 2nd order in x0-prediction (Lu et al. 2022, Algorithm 2); first and
    last steps 1st order."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = _lambda(sigma_next) - _lambda(sigma)
            d = denoised
            if old_denoised is not None:
                r = (_lambda(sigma) - _lambda(sigmas[i - 1])) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - torch.expm1(-h) * d
        old_denoised = denoised
        callback(i, sigma_next, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model: Model, x: Tensor, sigmas: Tensor, *, noise: NoiseSource, callback: Callback) -> Tensor:
    """SDE-DPM-Solver++(2M), midpoint form, eta = 1 (Lu et al. 2022; k-diffusion's sample_dpmpp_2m_sde)."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        fresh = noise(sigma, sigma_next)  # drawn every step, the last included, as diffusers does
        if sigma_next == 0:
            x = denoised
        else:
            h = _lambda(sigma_next) - _lambda(sigma)
            x = (sigma_next / sigma) * torch.exp(-h) * x - torch.expm1(-2 * h) * denoised
            if old_denoised is not None:
                r = (_lambda(sigma) - _lambda(sigmas[i - 1])) / h
                x = x - 0.5 * torch.expm1(-2 * h) / r * (denoised - old_denoised)
            x = x + sigma_next * (-torch.expm1(-2 * h)).sqrt() * fresh
        old_denoised = denoised
        callback(i, sigma_next, x, denoised)
    return x


def _unipc_rhos(rks: list[Tensor], h: Tensor, order: int, corrector: bool) -> Tensor:
    """UniPC weights: solve R rho = b, R_kj = r_j^(k-1), b_k = k! (-h) phi_(k+1)(-h) / B(h),
    B(h) = expm1(-h) ('bh2') (Zhao et al. 2023)."""
    if order == 1 or (not corrector and order == 2):
        return torch.full((1,), 0.5)
    hh = -h
    r = torch.stack(rks + [torch.ones_like(h)])
    h_phi_k = torch.expm1(hh) / hh - 1
    factorial, b = 1, []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / torch.expm1(hh))
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = torch.stack([r ** (k - 1) for k in range(1, order + 1)])
    b = torch.stack(b)
    if corrector:
        return torch.linalg.solve(R, b)
    return torch.linalg.solve(R[:-1, :-1], b[:-1])


def _unipc_update(
    x: Tensor,
    denoised: list[Tensor],
    sigmas: Tensor,
    i: int,
    order: int,
    denoised_next: Tensor | None = None,
) -> Tensor:
    """One UniP (predictor) or, given D(x_next), UniC (corrector) step from sigmas[i] to sigmas[i+1] in x0 form."""
    h = _lambda(sigmas[i + 1]) - _lambda(sigmas[i])
    m0 = denoised[-1]
    rks = [(_lambda(sigmas[i - k]) - _lambda(sigmas[i])) / h for k in range(1, order)]
    d1s = [(denoised[-1 - k] - m0) / rk for k, rk in enumerate(rks, start=1)]
    rhos = _unipc_rhos(rks, h, order, corrector=denoised_next is not None)
    b_h = torch.expm1(-h)
    x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * m0
    res = sum((rho * d1 for rho, d1 in zip(rhos, d1s)), torch.zeros_like(x))
    if denoised_next is not None:
        res = res + rhos[-1] * (denoised_next - m0)
    return x - b_h * res


@torch.no_grad()
def sample_unipc(
    model: Model, x: Tensor, sigmas: Tensor, *, noise: NoiseSource, callback: Callback, order: int = 2
) -> Tensor:
    """UniPC-bh2: multistep predictor UniP plus corrector UniC reusing each new model call (Zhao et al. 2023)."""
    n = len(sigmas) - 1
    denoised: list[Tensor] = []
    x_prev, prev_order = None, 0
    for i in range(n):
        d = model(x, sigmas[i])
        if x_prev is not None:  # correct the last prediction with the model output just evaluated at it
            x = _unipc_update(x_prev, denoised, sigmas, i - 1, prev_order, denoised_next=d)
        denoised = (denoised + [d])[-order:]
        prev_order = min(order, n - i, len(denoised))  # warm up, and end at 1st order
        x_prev = x
        x = d if sigmas[i + 1] == 0 else _unipc_update(x, denoised, sigmas, i, prev_order)
        callback(i, sigmas[i + 1], x, d)
    return x
