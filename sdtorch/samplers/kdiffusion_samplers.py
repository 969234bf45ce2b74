"""AUTOMATIC1111's samplers, each equal to the function of the same name in k-diffusion 0.0.16's
`sampling.py` (the version A1111 v1.6+ pins), or in A1111's own modules for Restart and LCM.

All share one calling convention, in k-diffusion's VE space (x = x0 + sigma * eps):

    sample_xxx(model, x, sigmas, *, noise, callback, **options) -> x

- `model(x, sigma) -> denoised`, sigma a 0-dim tensor;
- `sigmas` a descending 1-D grid, ending in 0 (A1111's KL Optimal ends at sigma_min; that works too);
- `noise(sigma, sigma_next) -> Tensor` shaped like x: k-diffusion's `noise_sampler`. Where k-diffusion
  draws `torch.randn_like(x)` instead (Euler and Heun's churn, Restart, LCM), we call `noise` at the same
  point of the loop, so a source that replays A1111's per-image generators gives A1111's numbers; the
  draws happen when k-diffusion makes them (Euler draws every step even with no churn), so the generators
  advance as A1111's do. `BrownianTreeNoise` is k-diffusion's BrownianTreeNoiseSampler;
- `callback(i, sigma_next, x, denoised)` after step i with the new x at its noise level (None: none);
- options are keyword-only with k-diffusion's defaults.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .schedule_types import karras_sigmas

Model = Callable[[Tensor, Tensor], Tensor]  # (x, sigma) -> denoised x0
NoiseSource = Callable[[Tensor, Tensor], Tensor]  # (sigma, sigma_next) -> standard normal noise like x
Callback = Callable[[int, Tensor, Tensor, Tensor], None] | None  # (i, sigma_next, x, denoised)


class BrownianTreeNoise:
    """Noise as normalised Brownian increments (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|), from a
    Brownian tree over [sigma_min, sigma_max] (Li et al. 2020, torchsde's BrownianTree): k-diffusion's
    BrownianTreeNoiseSampler. `seed` an int: one tree for the whole batch; a list: one tree per batch item
    (A1111 passes each image's seed), so image i's noise does not depend on the rest of its batch."""

    def __init__(self, x: Tensor, sigma_min: Tensor | float, sigma_max: Tensor | float, seed: int | Sequence[int]):
        import torchsde  # imported here: it costs a second at import time and only SDE samplers need it

        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        t0, t1, self._sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        self._batched = not isinstance(seed, int)
        seeds = list(seed) if self._batched else [seed]
        if self._batched and len(seeds) != x.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {x.shape[0]}")
        w0 = torch.zeros_like(x[0] if self._batched else x)
        self._trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s) for s in seeds]

    @classmethod
    def over(cls, x: Tensor, sigmas: Tensor, seed: int | Sequence[int]) -> BrownianTreeNoise:
        """A tree over a grid's range, smallest nonzero sigma to largest, as k-diffusion and A1111 build it."""
        return cls(x, sigmas[sigmas > 0].min(), sigmas.max(), seed)

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        with warnings.catch_warnings():  # torchsde warns of ends past the tree's by an fp32 rounding; harmless
            warnings.filterwarnings("ignore", message="Should have t[ab]", category=UserWarning)
            w = torch.stack([tree(lo, hi) for tree in self._trees]) * (self._sign * sign)
        return (w if self._batched else w[0]) / (t1 - t0).abs().sqrt()


def _to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """dx/dsigma of the probability-flow ODE: (x - D(x, sigma)) / sigma."""
    return (x - denoised) / sigma


def _ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float) -> tuple[Tensor, Tensor | float]:
    """(sigma_down, sigma_up): step deterministically down to sigma_down, then add noise of std sigma_up, so the
    marginal at sigma_next is kept; eta scales the noise (0: deterministic, 1: DDPM-like ancestral)."""
    if not eta:
        return sigma_next, 0.0
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def _callback(callback: Callback) -> Callable[[int, Tensor, Tensor, Tensor], None]:
    return callback if callback is not None else (lambda *args: None)


def _lam(sigma: Tensor) -> Tensor:
    """Half log-SNR lambda = -log sigma, the time variable of DPM-Solver (Lu et al. 2022)."""
    return -sigma.log()


def _sigma_of(lam: Tensor) -> Tensor:
    return (-lam).exp()


def _churn(
    x: Tensor, sigmas: Tensor, i: int, noise: NoiseSource, s_churn: float, s_tmin: float, s_tmax: float,
    s_noise: float,
) -> tuple[Tensor, Tensor]:
    """Karras et al. 2022, Algorithm 2, lines 4-6: raise the noise level from sigma_i to sigma_hat = (1 + gamma)
    sigma_i with fresh noise, gamma = min(s_churn / steps, sqrt 2 - 1) inside [s_tmin, s_tmax]. The noise is
    drawn every step, used or not, as k-diffusion draws it."""
    sigma = sigmas[i]
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    eps = noise(sigma, sigmas[i + 1]) * s_noise
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + eps * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


@torch.no_grad()
def sample_euler(
    model: Model, x: Tensor, sigmas: Tensor, *, noise: NoiseSource, callback: Callback = None,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
) -> Tensor:
    """Euler steps with stochastic churn (Karras et al. 2022, Algorithm 2 with Euler steps)."""
    cb = _callback(callback)
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat)
        x = x + _to_d(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)
        cb(i, sigmas[i + 1], x, denoised)
    return x


@torch.no_grad()
def sample_heun(
    model: Model, x: Tensor, sigmas: Tensor, *, noise: NoiseSource, callback: Callback = None,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
) -> Tensor:
    """Heun steps with stochastic churn (Karras et al. 2022, Algorithm 2); an Euler step onto sigma = 0."""
    cb = _callback(callback)
    for i in range(len(sigmas) - 1):
        sigma_next = sigmas[i + 1]
        x, sigma_hat = _churn(x, sigmas, i, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat)
        d = _to_d(x, sigma_hat, denoised)
        dt = sigma_next - sigma_hat
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigma_next, model(x_2, sigma_next))
            x = x + (d + d_2) / 2 * dt
        cb(i, sigma_next, x, denoised)
    return x


@torch.no_grad()
def sample_dpm_2(
    model: Model, x: Tensor, sigmas: Tensor, *, noise: NoiseSource, callback: Callback = None,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver-2 steps (slope at the log-space midpoint, Lu et al. 2022) with Karras et al. 2022's churn."""
    cb = _callback(callback)
    for i in range(len(sigmas) - 1):
        sigma_next = sigmas[i + 1]
        x, sigma_hat = _churn(x, sigmas, i, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat)
        d = _to_d(x, sigma_hat, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma_hat)
        else:
            sigma_mid = sigma_hat.log().lerp(sigma_next.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma_hat)
            x = x + _to_d(x_2, sigma_mid, model(x_2, sigma_mid)) * (sigma_next - sigma_hat)
        cb(i, sigma_next, x, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model: Model, x: Tensor, sigmas: Tensor, *, noise: NoiseSource, callback: Callback = None,
    eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """Ancestral Euler: an Euler step to sigma_down, then noise up to sigma_next (none onto sigma = 0)."""
    cb = _callback(callback)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        x = x + _to_d(x, sigma, denoised) * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
        cb(i, sigma_next, x, denoised)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(
    model: Model, x: Tensor, sigmas: Tensor, *, noise: NoiseSource, callback: Callback = None,
    eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """Ancestral DPM-Solver-2: a midpoint step to sigma_down (Lu et al. 2022), then noise up to sigma_next."""
    cb = _callback(callback)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        d = _to_d(x, sigma, denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            sigma_mid = sigma.log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma)
            x = x + _to_d(x_2, sigma_mid, model(x_2, sigma_mid)) * (sigma_down - sigma)
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
        cb(i, sigma_next, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    model: Model, x: Tensor, sigmas: Tensor, *, noise: NoiseSource, callback: Callback = None,
    eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """Ancestral DPM-Solver++(2S): a single-step 2nd-order x0-form step to sigma_down with its intermediate
    point at the lambda midpoint (Lu et al. 2022, DPM-Solver++ Algorithm 1), then noise up to sigma_next."""
    cb = _callback(callback)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + _to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            lam, lam_next = _lam(sigma), _lam(sigma_down)
            h = lam_next - lam
            lam_mid = lam + 0.5 * h
            x_2 = (_sigma_of(lam_mid) / _sigma_of(lam)) * x - (-h * 0.5).expm1() * denoised
            denoised_2 = model(x_2, _sigma_of(lam_mid))
            x = (_sigma_of(lam_next) / _sigma_of(lam)) * x - (-h).expm1() * denoised_2
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
        cb(i, sigma_next, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    model: Model, x: Tensor, sigmas: Tensor, *, noise: NoiseSource, callback: Callback = None,
    eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5,
) -> Tensor:
    """Stochastic DPM-Solver++ (k-diffusion's 'DPM++ SDE'): two ancestral x0-form substeps per step, the second
    from the blended estimate (1 - 1/(2r)) D_1 + 1/(2r) D_2 at lambda + r h (after Lu et al. 2022)."""
    cb = _callback(callback)
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if sigma_next == 0:
            x = x + _to_d(x, sigma, denoised) * (sigma_next - sigma)
        else:
            lam, lam_next = _lam(sigma), _lam(sigma_next)
            h = lam_next - lam
            lam_mid = lam + h * r
            # substep 1: to lambda + r h
            sd, su = _ancestral_step(_sigma_of(lam), _sigma_of(lam_mid), eta)
            lam_ = _lam(sd)
            x_2 = (_sigma_of(lam_) / _sigma_of(lam)) * x - (lam - lam_).expm1() * denoised
            x_2 = x_2 + noise(_sigma_of(lam), _sigma_of(lam_mid)) * s_noise * su
            denoised_2 = model(x_2, _sigma_of(lam_mid))
            # substep 2: the whole step, from the blended estimate
            sd, su = _ancestral_step(_sigma_of(lam), _sigma_of(lam_next), eta)
            lam_next_ = _lam(sd)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (_sigma_of(lam_next_) / _sigma_of(lam)) * x - (lam - lam_next_).expm1() * denoised_d
            x = x + noise(_sigma_of(lam), _sigma_of(lam_next)) * s_noise * su
        cb(i, sigma_next, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model: Model, x: Tensor, sigmas: Tensor, *, noise: NoiseSource, callback: Callback = None,
    eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint",
) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, DPM-Solver++ section 5), k-diffusion's form: the 2nd-order
    correction from the last two estimates in 'midpoint' or 'heun' form; a denoising step onto sigma = 0."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', not {solver_type!r}")
    cb = _callback(callback)
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        h = None
        if sigma_next == 0:
            x = denoised
        else:
            h = _lam(sigma_next) - _lam(sigma)
            eta_h = eta * h
            x = sigma_next / sigma * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                phi = (-h - eta_h).expm1().neg()
                if solver_type == "heun":
                    x = x + (phi / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * phi * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise(sigma, sigma_next) * sigma_next * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        old_denoised, h_last = denoised, h
        cb(i, sigma_next, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    model: Model, x: Tensor, sigmas: Tensor, *, noise: NoiseSource, callback: Callback = None,
    eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """SDE-DPM-Solver++(3M): 3rd-order multistep in x0 form with phi_2 / phi_3 corrections from the last three
    estimates (Lu et al. 2022; k-diffusion's sample_dpmpp_3m_sde); a denoising step onto sigma = 0."""
    cb = _callback(callback)
    denoised_1 = denoised_2 = None
    h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        h = None
        if sigma_next == 0:
            x = denoised
        else:
            h = _lam(sigma_next) - _lam(sigma)
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
            if eta:
                x = x + noise(sigma, sigma_next) * sigma_next * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
        cb(i, sigma_next, x, denoised)
    return x


# --- DPM-Solver (Lu et al. 2022, arXiv:2206.00927), in eps form over lambda = -log sigma ----------------


class _DPMSolver:
    """DPM-Solver-1/2/3 single steps from lambda to lambda_next (Lu et al. 2022, Algorithms 4-5, VE form)."""

    def __init__(self, model: Model):
        self.model = model

    def eps(self, x: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
        """(eps, denoised) at lambda."""
        sigma = _sigma_of(lam)
        denoised = self.model(x, sigma)
        return (x - denoised) / sigma, denoised

    def step_1(self, x: Tensor, lam: Tensor, lam_next: Tensor, eps: Tensor) -> Tensor:
        return x - _sigma_of(lam_next) * (lam_next - lam).expm1() * eps

    def midpoint(self, x: Tensor, lam: Tensor, lam_next: Tensor, eps: Tensor, r1: float) -> tuple[Tensor, Tensor]:
        """(u1, eps(u1)): the 1st-order point at lambda + r1 h and the model's eps there."""
        h = lam_next - lam
        s1 = lam + r1 * h
        u1 = x - _sigma_of(s1) * (r1 * h).expm1() * eps
        return u1, self.eps(u1, s1)[0]

    def step_2(self, x: Tensor, lam: Tensor, lam_next: Tensor, eps: Tensor, eps_r1: Tensor, r1: float) -> Tensor:
        h = lam_next - lam
        sigma_next = _sigma_of(lam_next)
        return x - sigma_next * h.expm1() * eps - sigma_next / (2 * r1) * h.expm1() * (eps_r1 - eps)

    def step_3(self, x: Tensor, lam: Tensor, lam_next: Tensor, eps: Tensor, eps_r1: Tensor) -> Tensor:
        r1, r2 = 1 / 3, 2 / 3
        h = lam_next - lam
        s2 = lam + r2 * h
        u2 = (x - _sigma_of(s2) * (r2 * h).expm1() * eps
              - _sigma_of(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(u2, s2)[0]
        sigma_next = _sigma_of(lam_next)
        return x - sigma_next * h.expm1() * eps - sigma_next / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)

    def step(self, x: Tensor, lam: Tensor, lam_next: Tensor, order: int, eps: Tensor) -> Tensor:
        if order == 1:
            return self.step_1(x, lam, lam_next, eps)
        r1 = 1 / 2 if order == 2 else 1 / 3
        _, eps_r1 = self.midpoint(x, lam, lam_next, eps, r1)
        if order == 2:
            return self.step_2(x, lam, lam_next, eps, eps_r1, r1)
        return self.step_3(x, lam, lam_next, eps, eps_r1)


def _grid_range(sigmas: Tensor) -> tuple[Tensor, Tensor]:
    """(sigma_min, sigma_max) of a grid: its last nonzero sigma and its first, as A1111 passes them to DPM fast
    and adaptive (sigma_sched[-2], sigma_sched[0]; for a whole uniform grid, the model's range)."""
    positive = sigmas[sigmas > 0]
    return positive[-1], sigmas[0]


def _ancestral_lambda(lam: Tensor, lam_next: Tensor, lam_end: Tensor, eta: float) -> tuple[Tensor, Tensor | float]:
    """DPM-Solver's ancestral variant: (the lambda to step to, the noise std to add there)."""
    if not eta:
        return lam_next, 0.0
    sd, _ = _ancestral_step(_sigma_of(lam), _sigma_of(lam_next), eta)
    lam_ = torch.minimum(lam_end, _lam(sd))
    return lam_, (_sigma_of(lam_next) ** 2 - _sigma_of(lam_) ** 2) ** 0.5


@torch.no_grad()
def sample_dpm_fast(
    model: Model, x: Tensor, sigmas: Tensor, *, noise: NoiseSource, callback: Callback = None,
    eta: float = 0.0, s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver-fast (Lu et al. 2022, section 3.4): len(sigmas) - 1 model calls as 3rd-order steps evenly
    spaced in lambda over the grid's range, the last one or two of lower order. Only the grid's range and
    length are used, as A1111 passes them."""
    sigma_min, sigma_max = _grid_range(sigmas)
    nfe = len(sigmas) - 1
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    cb = _callback(callback)
    solver = _DPMSolver(model)
    lam_start, lam_end = _lam(sigma_max), _lam(sigma_min)
    m = nfe // 3 + 1
    lams = torch.linspace(lam_start, lam_end, m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        lam, lam_next = lams[i], lams[i + 1]
        lam_next_, su = _ancestral_lambda(lam, lam_next, lam_end, eta)
        eps, denoised = solver.eps(x, lam)
        x = solver.step(x, lam, lam_next_, order, eps)
        x = x + su * s_noise * noise(_sigma_of(lam), _sigma_of(lam_next))  # drawn even when su = 0
        cb(i, _sigma_of(lam_next), x, denoised)
    return x


class _PIDStepSize:
    """A PID controller of the step size (Söderlind 2003, digital filters for adaptive step size control)."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float, accept_safety: float,
                 eps: float = 1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs: list[float] = []

    def propose_step(self, error: Tensor) -> bool:
        """Scale h from the error's history; True if the step just taken is accepted."""
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)  # a smooth limiter
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


@torch.no_grad()
def sample_dpm_adaptive(
    model: Model, x: Tensor, sigmas: Tensor, *, noise: NoiseSource, callback: Callback = None,
    order: int = 3, rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05, pcoeff: float = 0.0,
    icoeff: float = 1.0, dcoeff: float = 0.0, accept_safety: float = 0.81, eta: float = 0.0, s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver-12 / 23 with adaptive step size (Lu et al. 2022, Algorithm 5): an embedded pair of orders
    (order - 1, order) per step, the step size set by a PID controller on their difference. Only the grid's
    range is used; callback runs after each accepted step."""
    if order not in (2, 3):
        raise ValueError("order should be 2 or 3")
    sigma_min, sigma_max = _grid_range(sigmas)
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    cb = _callback(callback)
    solver = _DPMSolver(model)
    lam_end = _lam(sigma_min)
    s = _lam(sigma_max)
    atol_t, rtol_t = torch.tensor(atol), torch.tensor(rtol)
    pid = _PIDStepSize(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    x_prev, accepted = x, 0
    while s < lam_end - 1e-5:
        lam_next = torch.minimum(lam_end, s + pid.h)
        lam_next_, su = _ancestral_lambda(s, lam_next, lam_end, eta)
        eps, denoised = solver.eps(x, s)
        r1 = 1 / 2 if order == 2 else 1 / 3
        _, eps_r1 = solver.midpoint(x, s, lam_next_, eps, r1)
        if order == 2:
            x_low = solver.step_1(x, s, lam_next_, eps)
            x_high = solver.step_2(x, s, lam_next_, eps, eps_r1, r1)
        else:
            x_low = solver.step_2(x, s, lam_next_, eps, eps_r1, r1)
            x_high = solver.step_3(x, s, lam_next_, eps, eps_r1)
        delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        if pid.propose_step(error):
            x_prev = x_low
            x = x_high + su * s_noise * noise(_sigma_of(s), _sigma_of(lam_next))
            s = lam_next
            cb(accepted, _sigma_of(s), x, denoised)
            accepted += 1
    return x


# --- A1111's own samplers ------------------------------------------------------------------------------


@torch.no_grad()
def sample_lcm(model: Model, x: Tensor, sigmas: Tensor, *, noise: NoiseSource, callback: Callback = None) -> Tensor:
    """Latent Consistency Model multistep sampling (Luo et al. 2023, Algorithm 1): jump to the model's x0, then
    renoise to the next sigma (A1111's sample_lcm in sd_samplers_lcm.py)."""
    cb = _callback(callback)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        x = denoised
        if sigma_next > 0:
            x = x + sigma_next * noise(sigma, sigma_next)
        cb(i, sigma_next, x, denoised)
    return x


def _restart_segments(sigmas: Tensor, restart_list: dict[float, list] | None) -> list[tuple[Tensor, Tensor]]:
    """The (sigma, sigma_next) pairs Restart walks: the grid, with each restart interval's Karras sub-grid
    repeated after the step that reaches it. With no restart_list and 20 or more steps, A1111's default: the
    grid relaid as Karras over fewer steps and one (two from 36 steps) restart from sigma ~2 down to ~0.1."""
    steps = len(sigmas) - 1
    if restart_list is None:
        restart_list = {}
        if steps >= 20:
            restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
            sigmas = karras_sigmas(steps - restart_steps * restart_times, sigmas[-2].item(), sigmas[0].item()).to(
                sigmas.device
            )
            restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
    at_index = {int(torch.argmin((sigmas - key).abs(), dim=0)): value for key, value in restart_list.items()}
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in at_index:
            restart_steps, restart_times, restart_max = at_index[i + 1]
            min_idx, max_idx = i + 1, int(torch.argmin((sigmas - restart_max).abs(), dim=0))
            if max_idx < min_idx:
                sub = karras_sigmas(restart_steps, sigmas[min_idx].item(), sigmas[max_idx].item())[:-1]
                pairs.extend(list(zip(sub[:-1], sub[1:])) * restart_times)
    return pairs


@torch.no_grad()
def sample_restart(
    model: Model, x: Tensor, sigmas: Tensor, *, noise: NoiseSource, callback: Callback = None,
    s_noise: float = 1.0, restart_list: dict[float, list] | None = None,
) -> Tensor:
    """Restart sampling (Xu et al. 2023, 'Restart Sampling for Improving Generative Processes'): Heun steps,
    and at each restart point noise added back up to a higher sigma and that interval walked again (A1111's
    restart_sampler in sd_samplers_extra.py; restart_list {sigma: [steps, times, sigma_max]})."""
    cb = _callback(callback)
    last_sigma = None
    for step, (sigma, sigma_next) in enumerate(_restart_segments(sigmas, restart_list)):
        if last_sigma is None:
            last_sigma = sigma
        elif last_sigma < sigma:  # a restart: renoise from last_sigma up to sigma
            x = x + noise(sigma, last_sigma) * s_noise * (sigma**2 - last_sigma**2) ** 0.5
        denoised = model(x, sigma)
        d = _to_d(x, sigma, denoised)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            x = x + (d + _to_d(x_2, sigma_next, model(x_2, sigma_next))) / 2 * dt
        last_sigma = sigma_next
        cb(step, sigma_next, x, denoised)
    return x
