"""SD's discrete noise schedule and the timestep / sigma grids the samplers walk.

SD 1.x was trained as a DDPM (Ho et al. 2020) over 1000 timesteps with "scaled linear" betas.
Two views of one noise level are used side by side:

- VP (what the UNet sees, what the VAE decodes): x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps
- VE (k-diffusion, Karras et al. 2022): x = x0 + sigma * eps with sigma = sqrt((1 - abar) / abar),
  so x_vp = x_ve / sqrt(sigma^2 + 1).

Every grid below reproduces, to the last bit where it matters, what the diffusers scheduler of
the same method builds from the SD 1.5 scheduler config with its default options; each method's
choice of spacing is recorded beside it in `sdtorch.samplers`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
STEPS_OFFSET = 1  # SD's config: 'leading' timesteps end at t=1, not t=0


def alphas_cumprod(
    beta_start: float = BETA_START, beta_end: float = BETA_END, n: int = NUM_TRAIN_TIMESTEPS
) -> Tensor:
    """alpha-bar_t of SD's 'scaled_linear' betas (linear in sqrt(beta)), fp32 like the reference: (n,)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


ALPHAS_CUMPROD = alphas_cumprod()  # (1000,) fp32, index = timestep
TRAIN_SIGMAS = ((1 - ALPHAS_CUMPROD) / ALPHAS_CUMPROD) ** 0.5  # (1000,) fp32, ascending in t
_LOG_SIGMAS = TRAIN_SIGMAS.log().double()  # fp32 logs, as diffusers' np.log of the fp32 table


def vp_sigma(alpha_cumprod: Tensor | float) -> Tensor:
    """The VE sigma of a VP noise level: sqrt((1 - abar) / abar)."""
    a = torch.as_tensor(alpha_cumprod, dtype=torch.float32)
    return ((1 - a) / a) ** 0.5


def _linspace(start: float, stop: float, num: int) -> Tensor:
    """numpy.linspace's arithmetic in float64 (i * step + start, exact endpoint), so rounding agrees."""
    if num == 1:
        return torch.tensor([float(start)], dtype=torch.float64)
    y = torch.arange(num, dtype=torch.float64) * ((stop - start) / (num - 1)) + start
    y[-1] = stop
    return y


def leading_timesteps(steps: int) -> Tensor:
    """'leading' spacing (DDIM, PNDM, DDPM): t = i * (1000 // steps) + 1, descending, int64: (steps,)."""
    ratio = NUM_TRAIN_TIMESTEPS // steps
    return (torch.arange(steps, dtype=torch.int64) * ratio + STEPS_OFFSET).flip(0)


def linspace_timesteps(steps: int) -> Tensor:
    """'linspace' spacing (Euler, LMS, Heun, DPM2): steps fp32 points from 999 down to 0, fractional."""
    return _linspace(0, NUM_TRAIN_TIMESTEPS - 1, steps).float().flip(0)


def solver_timesteps(steps: int) -> Tensor:
    """DPM-Solver / UniPC 'linspace': steps+1 points over [0, 999] rounded, the final t=0 dropped."""
    return _linspace(0, NUM_TRAIN_TIMESTEPS - 1, steps + 1).round().flip(0)[:-1].to(torch.int64)


def sigma_at(t: Tensor) -> Tensor:
    """The training sigma at (fractional) timesteps t, linearly interpolated in t like np.interp: fp64."""
    t = t.double().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
    table = TRAIN_SIGMAS.double()
    low = t.floor().long().clamp(max=NUM_TRAIN_TIMESTEPS - 2)
    return table[low] + (t - low) * (table[low + 1] - table[low])


def sigma_to_t(sigma: Tensor) -> Tensor:
    """The (fractional) timestep of a sigma, interpolating linearly in log-sigma (k-diffusion's
    DiscreteSchedule), in fp64."""
    log_sigma = torch.as_tensor(sigma, dtype=torch.float64).clamp(min=1e-10).log()
    dists = log_sigma.reshape(-1, 1) - _LOG_SIGMAS  # (N, 1000)
    low = (dists >= 0).cumsum(dim=1).argmax(dim=1).clamp(max=NUM_TRAIN_TIMESTEPS - 2)
    lo, hi = _LOG_SIGMAS[low], _LOG_SIGMAS[low + 1]
    w = ((lo - log_sigma.reshape(-1)) / (lo - hi)).clamp(0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(log_sigma.shape)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. (5): sigmas evenly spaced in sigma^(1/rho) from sigma_max to sigma_min: fp64 (steps,)."""
    ramp = _linspace(0, 1, steps)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


@dataclass(frozen=True)
class SigmaSchedule:
    """A VE sigma grid and the UNet timestep that goes with each of its sigmas."""

    sigmas: Tensor  # (n+1,) fp32, descending, ending at 0
    timesteps: Tensor  # (n,) fp32: the timestep the UNet is given at sigmas[i]

    def timestep(self, sigma: Tensor) -> Tensor:
        """The UNet timestep for sigma: the grid's own where sigma is on it, else log-linear (DPM2's midpoints)."""
        hit = (self.sigmas[:-1] == sigma).nonzero()
        if len(hit):
            return self.timesteps[hit[0, 0]]
        return sigma_to_t(sigma).float()


def sigma_schedule(
    timesteps: Tensor,
    *,
    karras: bool = False,
    round_karras_timesteps: bool = False,
    karras_over_training_range: bool = False,
) -> SigmaSchedule:
    """Sigmas at the given timesteps, then 0; or as many Karras sigmas, their timesteps mapped back.

    Karras sigmas span the grid's own sigma range, or the whole training range (DPM-Solver, UniPC);
    the two differ only for a 1-step grid, which is just t = 0.
    """
    sigmas = sigma_at(timesteps)
    if karras:
        lo, hi = (
            (TRAIN_SIGMAS[0], TRAIN_SIGMAS[-1]) if karras_over_training_range else (sigmas[-1], sigmas[0])
        )
        sigmas = karras_sigmas(len(timesteps), lo.item(), hi.item())
        timesteps = sigma_to_t(sigmas)
        if round_karras_timesteps:
            timesteps = timesteps.round()
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).float()
    return SigmaSchedule(sigmas=sigmas, timesteps=timesteps.float())


def lms_coefficient(sigmas: Tensor, i: int, j: int, order: int) -> float:
    """Linear multistep weight: integral over [sigma_i, sigma_i+1] of the Lagrange basis polynomial of node i-j."""

    def basis(tau: float) -> float:
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - s[i - k]) / (s[i - j] - s[i - k])
        return prod

    s = sigmas.tolist()
    # 3-point Gauss-Legendre is exact for the polynomials here (degree <= 3 for order <= 4)
    a, b = s[i], s[i + 1]
    mid, half = (a + b) / 2, (b - a) / 2
    nodes = ((-math.sqrt(3 / 5), 5 / 9), (0.0, 8 / 9), (math.sqrt(3 / 5), 5 / 9))
    return half * sum(w * basis(mid + half * x) for x, w in nodes)
