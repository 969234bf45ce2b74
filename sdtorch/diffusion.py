"""The diffusion process a model was trained on: its noise schedule, what its UNet predicts, and the
`Denoiser` every sampler drives.

After k-diffusion's `external.py` (Crowson): a discrete DDPM schedule (Ho et al. 2020) seen two ways,

- VP (what the UNet sees, what the VAE decodes): x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps
- VE (Karras et al. 2022): x = x0 + sigma * eps with sigma = sqrt((1 - abar) / abar), so
  x_vp = x_ve / sqrt(sigma^2 + 1),

and the UNet's output turned into a clean-image estimate by two scalings, D = c_skip * x + c_out * F
(Karras et al. 2022, Table 1): epsilon prediction c_skip = 1, c_out = -sigma; v prediction
(Salimans & Ho 2022) c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1).

The schedule comes from the checkpoint's own config (betas, number of train steps), so a model
trained on another schedule, or predicting v, runs without the samplers knowing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sdtorch.errors import SdtorchError

PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")

# (x_vp, t) -> the UNet's raw output (eps or v, as the model predicts), guidance already applied.
ModelFn = Callable[[Tensor, Tensor], Tensor]


def _betas(kind: str, beta_start: float, beta_end: float, n: int) -> Tensor:
    """The training betas, fp32 as diffusers' schedulers build them (fp64 for the cosine schedule)."""
    if kind == "scaled_linear":  # linear in sqrt(beta): SD's schedule
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if kind == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, eq. 17, beta capped at 0.999

        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float32)
    raise SdtorchError(f"unknown beta schedule {kind!r}; accepted: {', '.join(BETA_SCHEDULES)}")


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A model's discrete training schedule: abar_t for t = 0 .. N-1, and its VE sigmas."""

    alphas_cumprod: Tensor  # (N,) fp32, index = timestep
    # The scheduler config's `timestep_spacing` (SDXL: 'leading'); None: each method's own, as diffusers
    # lays it out from SD 1.x's config, which names none (`sdtorch.samplers.registry`).
    spacing: str | None = None

    @classmethod
    def from_betas(
        cls, beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000,
        beta_schedule: str = "scaled_linear", spacing: str | None = None,
    ) -> NoiseSchedule:
        betas = _betas(beta_schedule, beta_start, beta_end, num_train_timesteps)
        return cls(torch.cumprod(1.0 - betas, dim=0), spacing)

    @classmethod
    def of(cls, config) -> NoiseSchedule:
        """The schedule a `ModelConfig` records (SD 1.x: scaled-linear 0.00085..0.012 over 1000 steps)."""
        return cls.from_betas(config.beta_start, config.beta_end, config.num_train_timesteps, config.beta_schedule,
                              config.timestep_spacing)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def sigmas(self) -> Tensor:
        """(N,) fp32 VE sigmas, ascending in t."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    @property
    def log_sigmas(self) -> Tensor:
        """fp32 logs held in fp64, as diffusers' np.log of the fp32 table."""
        return self.sigmas.log().double()

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1].item()

    def sigma_at(self, t: Tensor) -> Tensor:
        """The sigma at (fractional) timesteps t, linear in sigma between table entries (np.interp, as
        diffusers' schedulers do): fp64."""
        n = self.num_train_timesteps
        t = t.double().clamp(0, n - 1)
        table = self.sigmas.double()
        low = t.floor().long().clamp(max=n - 2)
        return table[low] + (t - low) * (table[low + 1] - table[low])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The (fractional) timestep of a sigma, linear in log-sigma (k-diffusion's DiscreteSchedule): fp64."""
        log_sigmas = self.log_sigmas
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).clamp(min=1e-10).log()
        dists = log_sigma.reshape(-1, 1) - log_sigmas  # (M, N)
        low = (dists >= 0).cumsum(dim=1).argmax(dim=1).clamp(max=self.num_train_timesteps - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - log_sigma.reshape(-1)) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).reshape(log_sigma.shape)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """The sigma at (fractional) timesteps t, linear in log-sigma (k-diffusion's DiscreteSchedule): fp64."""
        t = torch.as_tensor(t, dtype=torch.float64)
        low = t.floor().long().clamp(0, self.num_train_timesteps - 1)
        high = t.ceil().long().clamp(0, self.num_train_timesteps - 1)
        w = t - t.floor()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()


def check_prediction_type(prediction: str) -> str:
    if prediction not in PREDICTION_TYPES:
        raise SdtorchError(f"unknown prediction type {prediction!r}; accepted: {', '.join(PREDICTION_TYPES)}")
    return prediction


class Denoiser:
    """The model as the samplers see it, in either space.

    `denoise(x, sigma, t)`: VE latents at noise level sigma -> the clean estimate D(x, sigma), the UNet
    evaluated at timestep t (the sampler's grid decides t for its sigmas). `eps(x, t)`: VP latents at
    integer timestep t -> the noise estimate, for the DDPM-family samplers.
    """

    def __init__(self, model: ModelFn, schedule: NoiseSchedule, prediction: str = "epsilon"):
        self.model = model
        self.schedule = schedule
        self.prediction = check_prediction_type(prediction)

    def denoise(self, x: Tensor, sigma: Tensor, t: Tensor) -> Tensor:
        out = self.model(x / (sigma**2 + 1) ** 0.5, t).to(x.dtype)
        if self.prediction == "epsilon":
            return x - sigma * out
        return x / (sigma**2 + 1) - out * (sigma / (sigma**2 + 1) ** 0.5)

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        out = self.model(x, t.to(x.device, torch.float32)).to(x.dtype)
        if self.prediction == "epsilon":
            return out
        a = self.schedule.alphas_cumprod[t.long()].to(x.device)
        return a**0.5 * out + (1 - a) ** 0.5 * x  # eps from v (Salimans & Ho 2022, eq. 25 rearranged)
