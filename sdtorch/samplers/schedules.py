"""The timestep and sigma grids the samplers walk, laid out over a model's `NoiseSchedule`.

Every grid reproduces, to the last bit where it matters, what the diffusers scheduler of the same
method builds from the model's scheduler config with its default options; which method uses which
spacing is recorded in its entry of `sdtorch.samplers.registry`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sdtorch.diffusion import NoiseSchedule
from sdtorch.errors import SdtorchError

STEPS_OFFSET = 1  # SD's scheduler configs: 'leading' timesteps end at t=1, not t=0


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


def leading_timesteps(steps: int, num_train_timesteps: int) -> Tensor:
    """'leading' spacing (DDIM, PNDM, DDPM): t = i * (N // steps) + 1, descending, int64: (steps,)."""
    ratio = num_train_timesteps // steps
    return (torch.arange(steps, dtype=torch.int64) * ratio + STEPS_OFFSET).flip(0)


def linspace_timesteps(steps: int, num_train_timesteps: int) -> Tensor:
    """'linspace' spacing (Euler, LMS, Heun, DPM2): steps fp32 points from N-1 down to 0, fractional."""
    return _linspace(0, num_train_timesteps - 1, steps).float().flip(0)


def solver_timesteps(steps: int, num_train_timesteps: int) -> Tensor:
    """DPM-Solver / UniPC 'linspace': steps+1 points over [0, N-1] rounded, the final t=0 dropped."""
    return _linspace(0, num_train_timesteps - 1, steps + 1).round().flip(0)[:-1].to(torch.int64)


SPACINGS = ("linspace", "leading", "trailing")


def spaced_timesteps(spacing: str, steps: int, num_train_timesteps: int, *, solver: bool = False) -> Tensor:
    """A scheduler config's `timestep_spacing` for the sigma samplers, as diffusers lays it out (Lin et al. 2023,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", table 2). 'leading' (SDXL's config):
    i * (N // steps) + 1; 'trailing': N - i * N / steps, rounded, - 1; descending. The DPM-Solver family
    (`solver`) spaces steps + 1 points and drops the last; it keeps integer timesteps."""
    n = num_train_timesteps
    if spacing == "linspace":
        return solver_timesteps(steps, n) if solver else linspace_timesteps(steps, n)
    points = steps + 1 if solver else steps
    i = torch.arange(points, dtype=torch.float64)
    if spacing == "leading":
        t = (i * (n // points)).round().flip(0) + STEPS_OFFSET
    elif spacing == "trailing":
        t = (n - i * (n / steps)).round() - 1
        points = steps  # numpy's arange(N, 0, -N/steps) stops above 0
        t = t[:points]
    else:
        raise SdtorchError(f"unknown timestep spacing {spacing!r}; accepted: {', '.join(SPACINGS)}")
    if solver:
        return (t[:-1] if spacing == "leading" else t).to(torch.int64)
    return t.float()


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. (5): sigmas evenly spaced in sigma^(1/rho) from sigma_max to sigma_min: fp64 (steps,)."""
    ramp = _linspace(0, 1, steps)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


@dataclass(frozen=True)
class SigmaGrid:
    """A VE sigma grid and the UNet timestep that goes with each of its sigmas."""

    sigmas: Tensor  # (n+1,) fp32, descending, ending at 0
    timesteps: Tensor  # (n,) fp32: the timestep the UNet is given at sigmas[i]
    schedule: NoiseSchedule

    def timestep(self, sigma: Tensor) -> Tensor:
        """The UNet timestep for sigma: the grid's own where sigma is on it, else log-linear (DPM2's midpoints)."""
        hit = (self.sigmas[:-1] == sigma).nonzero()
        if len(hit):
            return self.timesteps[hit[0, 0]]
        return self.schedule.sigma_to_t(sigma).float()


def sigma_grid(
    schedule: NoiseSchedule,
    timesteps: Tensor,
    *,
    karras: bool = False,
    round_karras_timesteps: bool = False,
    karras_over_training_range: bool = False,
) -> SigmaGrid:
    """Sigmas at the given timesteps, then 0; or as many Karras sigmas, their timesteps mapped back.

    Karras sigmas span the grid's own sigma range, or the whole training range (DPM-Solver, UniPC);
    the two differ only for a 1-step grid, which is just t = 0.
    """
    sigmas = schedule.sigma_at(timesteps)
    if karras:
        train = schedule.sigmas
        lo, hi = (train[0], train[-1]) if karras_over_training_range else (sigmas[-1], sigmas[0])
        sigmas = karras_sigmas(len(timesteps), lo.item(), hi.item())
        timesteps = schedule.sigma_to_t(sigmas)
        if round_karras_timesteps:
            timesteps = timesteps.round()
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).float()
    return SigmaGrid(sigmas=sigmas, timesteps=timesteps.float(), schedule=schedule)


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
