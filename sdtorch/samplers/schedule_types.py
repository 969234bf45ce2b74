"""AUTOMATIC1111's schedule types: the sigma grid a sampler walks, laid out over a model's `NoiseSchedule`.

Each is `(steps, schedule, **options) -> sigmas`: a descending fp32 grid as A1111 (v1.10,
modules/sd_schedulers.py, with k-diffusion 0.0.16's `get_sigmas_*`) hands it to the sampler, given the
model's discrete schedule (A1111's CompVisDenoiser, k-diffusion's DiscreteSchedule, built from the model's
`alphas_cumprod`). The range is the model's, `sigma_min = sigmas[0]`, `sigma_max = sigmas[-1]`, as
Python floats of the fp32 table. The arithmetic is done in the dtypes A1111 does it in (fp32 tensors,
fp64 Python floats, fp64 NumPy for Beta and Align Your Steps), so the grids agree to the last bit or two.

Two of A1111's grids do not have the usual form, and are kept as A1111 makes them: KL Optimal ends at
sigma_min instead of 0 (steps + 1 values, no appended zero), and DDIM has ceil((N - 1) / (N // steps)) + 1
values, which is steps + 1 only when `steps` divides N - 1 evenly enough (20 steps: 21; 30 steps: 32).

`SCHEDULE_TYPES` names them; `A1111_SAMPLERS` records A1111's per-sampler options (its default schedule
type, whether it drops the next-to-last sigma, ...), and `a1111_sigmas` applies both as A1111's
`KDiffusionSampler.get_sigmas` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sdtorch.diffusion import NoiseSchedule
from sdtorch.errors import SdtorchError

ScheduleFn = Callable[..., Tensor]  # (steps, schedule, **options) -> descending fp32 sigmas

# Align Your Steps (Sabour et al. 2024), the 10-step sigmas NVIDIA published for SD 1.5 and SDXL.
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _model_range(schedule: NoiseSchedule, sigma_min: float | None, sigma_max: float | None) -> tuple[float, float]:
    """The model's (sigma_min, sigma_max) as A1111 passes them (floats of the fp32 table), unless overridden."""
    lo = schedule.sigma_min if sigma_min is None else sigma_min
    return lo, schedule.sigma_max if sigma_max is None else sigma_max


def compvis_schedule(config=None, *, beta_start: float = 0.00085, beta_end: float = 0.012,
                     num_train_timesteps: int = 1000, beta_schedule: str = "scaled_linear") -> NoiseSchedule:
    """The model's discrete schedule as A1111's CompVisDenoiser holds it: the checkpoint's `alphas_cumprod`
    buffer, which CompVis's LatentDiffusion computes in fp64 (betas = linspace(sqrt(start), sqrt(end), N,
    float64) ** 2, abar = cumprod(1 - betas)) and stores in fp32. diffusers builds the betas in fp32, which
    differs by up to 9e-6 relative. `config` (a ModelConfig) supplies the betas when given; a schedule other
    than scaled_linear / linear is built as diffusers builds it (CompVis has no equal of it)."""
    if config is not None:
        beta_start, beta_end = config.beta_start, config.beta_end
        num_train_timesteps, beta_schedule = config.num_train_timesteps, config.beta_schedule
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    else:
        return NoiseSchedule.from_betas(beta_start, beta_end, num_train_timesteps, beta_schedule)
    return NoiseSchedule(torch.cumprod(1.0 - betas, dim=0).float())


class DiscreteSigmas:
    """The model's discrete sigma table with k-diffusion's log-linear maps between sigma and timestep, in
    fp32 as A1111's CompVisDenoiser computes them (`NoiseSchedule` does the same maps in fp64)."""

    def __init__(self, schedule: NoiseSchedule):
        ac = schedule.alphas_cumprod.float()
        self.sigmas = ((1 - ac) / ac) ** 0.5  # (N,) ascending
        self.log_sigmas = self.sigmas.log()

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The fractional timestep of each sigma: linear in log-sigma between the table entries around it."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        log_sigma = sigma.log()
        n = self.log_sigmas.shape[0]
        below = (log_sigma.reshape(1, -1) >= self.log_sigmas[:, None]).cumsum(dim=0)  # (N, M)
        low = below.argmax(dim=0).clamp(max=n - 2)  # the last table entry at or below log_sigma
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((lo - log_sigma.reshape(-1)) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """The sigma at fractional timesteps t: log-sigma interpolated linearly between the integer steps."""
        t = torch.as_tensor(t).float()
        w = t.frac()
        log_sigma = (1 - w) * self.log_sigmas[t.floor().long()] + w * self.log_sigmas[t.ceil().long()]
        return log_sigma.exp()


# --- grids over a sigma range (k-diffusion's get_sigmas_*) ---------------------------------------------


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho, then 0."""
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Evenly spaced in log sigma from sigma_max to sigma_min, then 0."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def polyexponential_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> Tensor:
    """log sigma a polynomial of degree rho in the step: log min + (1 - i/(n-1))^rho (log max - log min), then 0."""
    ramp = torch.linspace(1, 0, n) ** rho
    return _append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


# --- A1111's schedule types ----------------------------------------------------------------------------


def uniform(steps: int, schedule: NoiseSchedule) -> Tensor:
    """Evenly spaced timesteps from N - 1 down to 0, log-sigma interpolated (k-diffusion's
    DiscreteSchedule.get_sigmas; A1111's Uniform and the default of most samplers), then 0."""
    table = DiscreteSigmas(schedule)
    t = torch.linspace(len(table.sigmas) - 1, 0, steps)
    return _append_zero(table.t_to_sigma(t))


def karras(
    steps: int, schedule: NoiseSchedule, *, rho: float = 7.0, sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """Karras et al. 2022's rho = 7 grid over the model's sigma range."""
    return karras_sigmas(steps, *_model_range(schedule, sigma_min, sigma_max), rho=rho)


def exponential(
    steps: int, schedule: NoiseSchedule, *, sigma_min: float | None = None, sigma_max: float | None = None
) -> Tensor:
    """Evenly spaced in log sigma over the model's sigma range."""
    return exponential_sigmas(steps, *_model_range(schedule, sigma_min, sigma_max))


def polyexponential(
    steps: int, schedule: NoiseSchedule, *, rho: float = 1.0, sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """Polynomial in log sigma (rho = 1: the exponential grid) over the model's sigma range."""
    return polyexponential_sigmas(steps, *_model_range(schedule, sigma_min, sigma_max), rho=rho)


def _timestep_grid(table: DiscreteSigmas, schedule: NoiseSchedule, num: int) -> Tensor:
    """num evenly spaced timesteps from t(sigma_max) to t(sigma_min), fp32, as A1111 lays them out."""
    start = table.sigma_to_t(torch.tensor(schedule.sigma_max))
    end = table.sigma_to_t(torch.tensor(schedule.sigma_min))
    return torch.linspace(start, end, num)


def sgm_uniform(steps: int, schedule: NoiseSchedule) -> Tensor:
    """Stability's SGM 'uniform' discretisation: steps + 1 even timesteps from t(sigma_max) to t(sigma_min),
    the last dropped, log-sigma interpolated, then 0 (A1111's SGM Uniform)."""
    table = DiscreteSigmas(schedule)
    return _append_zero(table.t_to_sigma(_timestep_grid(table, schedule, steps + 1)[:-1]))


def normal(steps: int, schedule: NoiseSchedule) -> Tensor:
    """steps even timesteps from t(sigma_max) to t(sigma_min), log-sigma interpolated, then 0 (ComfyUI's
    'normal', A1111's Normal)."""
    table = DiscreteSigmas(schedule)
    return _append_zero(table.t_to_sigma(_timestep_grid(table, schedule, steps)))


def simple(steps: int, schedule: NoiseSchedule) -> Tensor:
    """Every (N / steps)-th entry of the model's sigma table from the top, truncated, then 0 (ComfyUI's
    'simple', A1111's Simple)."""
    table = DiscreteSigmas(schedule).sigmas
    stride = len(table) / steps
    return _append_zero(torch.stack([table[-(1 + int(i * stride))] for i in range(steps)]))


def ddim(steps: int, schedule: NoiseSchedule) -> Tensor:
    """The table's sigmas at t = 1, 1 + k, 1 + 2k, ... (k = N // steps) below N, descending, then 0 (DDIM's
    'leading' timesteps; A1111's DDIM schedule type, which can give more than steps + 1 values)."""
    table = DiscreteSigmas(schedule).sigmas
    stride = max(len(table) // steps, 1)
    return _append_zero(table[1::stride].flip(0))


def kl_optimal(
    steps: int, schedule: NoiseSchedule, *, sigma_min: float | None = None, sigma_max: float | None = None
) -> Tensor:
    """Evenly spaced in arctan(sigma) from sigma_max to sigma_min (Sabour et al. 2024, 'KL-optimal'); as in
    A1111, the steps + 1 values end at sigma_min, with no 0 appended."""
    lo, hi = _model_range(schedule, sigma_min, sigma_max)
    alpha_min, alpha_max = torch.arctan(torch.tensor(lo)), torch.arctan(torch.tensor(hi))
    frac = torch.arange(steps + 1) / steps
    return torch.tan(frac * alpha_min + (1.0 - frac) * alpha_max)


def _np_linspace(num: int) -> Tensor:
    """numpy.linspace(0, 1, num)'s fp64 values: i * (1 / (num - 1)), the last exactly 1."""
    if num == 1:
        return torch.zeros(1, dtype=torch.float64)
    y = torch.arange(num, dtype=torch.float64) * (1.0 / (num - 1))
    y[-1] = 1.0
    return y


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """numpy.interp in fp64: piecewise linear through (xp, fp), xp ascending, x within [xp[0], xp[-1]]."""
    j = (torch.searchsorted(xp, x, right=True) - 1).clamp(0, len(xp) - 2)
    slope = (fp[j + 1] - fp[j]) / (xp[j + 1] - xp[j])
    return torch.where(x == xp[-1], fp[-1], slope * (x - xp[j]) + fp[j])


def align_your_steps(steps: int, schedule: NoiseSchedule, *, table: tuple[float, ...] = AYS_SD15) -> Tensor:
    """Align Your Steps (Sabour et al. 2024): NVIDIA's optimised 10-step sigmas (SD 1.5 by default), log-linearly
    interpolated to `steps` as its how-to page says, then 0. The model's own schedule is not used."""
    if steps == len(table):
        return torch.tensor([*table, 0.0], dtype=torch.float32)
    ascending = torch.tensor(table[::-1], dtype=torch.float64)
    ys = _interp(_np_linspace(steps), _np_linspace(len(table)), ascending.log())
    return _append_zero(ys.exp().flip(0).float())


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function, by the modified Lentz method
    (Press et al., Numerical Recipes, 3rd ed., section 6.4)."""
    tiny, eps = 1e-300, 1e-16
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """The regularised incomplete beta function I_x(a, b): the Beta(a, b) distribution's CDF at x."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """The Beta(a, b) quantile: the x in [0, 1] with I_x(a, b) = q, by bisection on the monotone CDF."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if beta_cdf(mid, a, b) < q else (lo, mid)
    return 0.5 * (lo + hi)


def beta(
    steps: int, schedule: NoiseSchedule, *, alpha: float = 0.6, beta: float = 0.6, sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """'Beta Sampling is All You Need' (Lee et al. 2024): sigma_min + ppf_Beta(alpha, beta)(1 - i/(steps-1))
    (sigma_max - sigma_min), then 0; alpha = beta = 0.6 are A1111's defaults (its options beta_dist_alpha/beta)."""
    lo, hi = _model_range(schedule, sigma_min, sigma_max)
    qs = (1 - _np_linspace(steps)).tolist()
    return torch.tensor([lo + beta_ppf(q, alpha, beta) * (hi - lo) for q in qs] + [0.0], dtype=torch.float32)


# --- the table -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleType:
    """One of A1111's schedule types: our name, A1111's label (as its infotext's 'Schedule type' writes it),
    the grid function (None for 'automatic': the sampler's own default), and whether it reads the model's
    discrete sigma table (rather than only its sigma range)."""

    name: str
    label: str
    function: ScheduleFn | None
    needs_model_table: bool
    aliases: tuple[str, ...] = ()


SCHEDULE_TYPES: dict[str, ScheduleType] = {
    s.name: s
    for s in (
        ScheduleType("automatic", "Automatic", None, False),
        ScheduleType("uniform", "Uniform", uniform, True),
        ScheduleType("karras", "Karras", karras, False),
        ScheduleType("exponential", "Exponential", exponential, False),
        ScheduleType("polyexponential", "Polyexponential", polyexponential, False),
        ScheduleType("sgm_uniform", "SGM Uniform", sgm_uniform, True, aliases=("SGMUniform",)),
        ScheduleType("kl_optimal", "KL Optimal", kl_optimal, False),
        ScheduleType("align_your_steps", "Align Your Steps", align_your_steps, False),
        ScheduleType("simple", "Simple", simple, True),
        ScheduleType("normal", "Normal", normal, True),
        ScheduleType("ddim", "DDIM", ddim, True),
        # A1111 marks Beta as needing the model's table, but reads only its sigma range.
        ScheduleType("beta", "Beta", beta, False),
    )
}


def schedule_type(name: str) -> ScheduleType:
    """A schedule type by our name, A1111's label or an alias (case-insensitive), or one SdtorchError line."""
    key = name.strip().lower()
    for s in SCHEDULE_TYPES.values():
        if key in (s.name, s.label.lower(), *(a.lower() for a in s.aliases)):
            return s
    raise SdtorchError(f"unknown schedule type {name!r}; accepted: {', '.join(SCHEDULE_TYPES)}")


@dataclass(frozen=True)
class A1111Sampler:
    """A sampler as A1111 v1.10 lists it (samplers_k_diffusion in sd_samplers_kdiffusion.py, and LCM):
    its label, the k-diffusion function it runs, and its options."""

    label: str
    function: str  # k-diffusion's function name (A1111's for Restart and LCM)
    aliases: tuple[str, ...]
    scheduler: str | None = None  # the schedule type 'Automatic' means for it; None: uniform
    discard_next_to_last_sigma: bool = False  # one more step laid out, then the next-to-last sigma dropped
    second_order: bool = False  # two model calls a step (A1111 halves the steps' progress count for it)
    uses_ensd: bool = False  # draws ancestral noise from the generators, so the eta noise seed delta applies
    brownian_noise: bool = False  # noise from a Brownian tree per image, seeded with the image's seed
    solver_type: str | None = None  # sample_dpmpp_2m_sde's solver_type ('heun'), when not its default


A1111_SAMPLERS: dict[str, A1111Sampler] = {
    s.label: s
    for s in (
        A1111Sampler("DPM++ 2M", "sample_dpmpp_2m", ("k_dpmpp_2m",), scheduler="karras"),
        A1111Sampler("DPM++ SDE", "sample_dpmpp_sde", ("k_dpmpp_sde",), scheduler="karras", second_order=True,
                     brownian_noise=True),
        A1111Sampler("DPM++ 2M SDE", "sample_dpmpp_2m_sde", ("k_dpmpp_2m_sde",), scheduler="exponential",
                     brownian_noise=True),
        A1111Sampler("DPM++ 2M SDE Heun", "sample_dpmpp_2m_sde", ("k_dpmpp_2m_sde_heun",), scheduler="exponential",
                     brownian_noise=True, solver_type="heun"),
        A1111Sampler("DPM++ 2S a", "sample_dpmpp_2s_ancestral", ("k_dpmpp_2s_a",), scheduler="karras",
                     uses_ensd=True, second_order=True),
        A1111Sampler("DPM++ 3M SDE", "sample_dpmpp_3m_sde", ("k_dpmpp_3m_sde",), scheduler="exponential",
                     discard_next_to_last_sigma=True, brownian_noise=True),
        A1111Sampler("Euler a", "sample_euler_ancestral", ("k_euler_a", "k_euler_ancestral"), uses_ensd=True),
        A1111Sampler("Euler", "sample_euler", ("k_euler",)),
        A1111Sampler("LMS", "sample_lms", ("k_lms",)),
        A1111Sampler("Heun", "sample_heun", ("k_heun",), second_order=True),
        A1111Sampler("DPM2", "sample_dpm_2", ("k_dpm_2",), scheduler="karras", discard_next_to_last_sigma=True,
                     second_order=True),
        A1111Sampler("DPM2 a", "sample_dpm_2_ancestral", ("k_dpm_2_a",), scheduler="karras",
                     discard_next_to_last_sigma=True, uses_ensd=True, second_order=True),
        A1111Sampler("DPM fast", "sample_dpm_fast", ("k_dpm_fast",), uses_ensd=True),
        A1111Sampler("DPM adaptive", "sample_dpm_adaptive", ("k_dpm_ad",), uses_ensd=True),
        A1111Sampler("Restart", "restart_sampler", ("restart",), scheduler="karras", second_order=True),
        A1111Sampler("LCM", "sample_lcm", ("k_lcm",)),  # sd_samplers_lcm.py; A1111 also swaps the denoiser
    )
}

# A1111 passes s_churn, s_tmin, s_tmax, s_noise (its settings) only to these (sampler_extra_params).
A1111_CHURN_SAMPLERS = ("sample_euler", "sample_heun", "sample_dpm_2")


def a1111_sigmas(sampler: str, steps: int, schedule: NoiseSchedule, schedule_type_name: str = "automatic",
                 **options) -> Tensor:
    """The grid A1111 hands `sampler` (its label) for `steps` steps (KDiffusionSampler.get_sigmas): 'automatic'
    is the sampler's default schedule type (uniform if none); samplers that discard the next-to-last sigma get
    a grid of steps + 1 with that sigma dropped. `options` go to the schedule function (rho, sigma_min, ...)."""
    if sampler not in A1111_SAMPLERS:
        raise SdtorchError(f"unknown A1111 sampler {sampler!r}; accepted: {', '.join(A1111_SAMPLERS)}")
    entry = A1111_SAMPLERS[sampler]
    kind = schedule_type(schedule_type_name)
    if kind.function is None:
        kind = SCHEDULE_TYPES[entry.scheduler or "uniform"]
    discard = entry.discard_next_to_last_sigma
    sigmas = kind.function(steps + 1 if discard else steps, schedule, **options)
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas
