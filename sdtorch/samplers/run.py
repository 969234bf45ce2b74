"""Run one sampler of the table over a denoiser: lay out its grid, start it, report every step.

`sample(name, denoiser, noise, steps, ...)` runs the sampler the way the diffusers scheduler of the
same method runs inside StableDiffusion(Img2Img)Pipeline with its default options: the same
timesteps, sigmas, model inputs and noise draws, to within float rounding. img2img follows the
reference too, odd corners included: LMS keeps counting its order from the grid's start, and PLMS's
warm start meets a slice of its grid that does not repeat t_1 (see `sample_lms`, `sample_plms`).

`sample_a1111(...)` runs it as AUTOMATIC1111 does instead: k-diffusion's grids and functions, A1111's
img2img rule and per-sampler options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sdtorch.diffusion import Denoiser, NoiseSchedule
from sdtorch.errors import SdtorchError

from .kdiffusion_samplers import BrownianTreeNoise, _restart_segments
from .noise import NoiseSource
from .registry import SamplerEntry, resolve_schedule, sampler_entry
from .schedule_types import DiscreteSigmas, a1111_sigmas
from .schedules import leading_timesteps, sigma_grid, spaced_timesteps


@dataclass(frozen=True)
class StepEvent:
    """One finished sampler step: `x` the new latents at VE noise level `sigma` and `denoised` the clean
    estimate that step used, both in the scale the VAE decodes (VP)."""

    step: int  # 0-based, counting the steps that run (img2img runs fewer)
    total: int
    sigma: float
    x: Tensor
    denoised: Tensor


StepCallback = Callable[[StepEvent], None]


def img2img_start(steps: int, strength: float) -> int:
    """Index of the first step img2img runs, as diffusers' StableDiffusionImg2ImgPipeline.get_timesteps."""
    if not 0.0 < strength <= 1.0:
        raise SdtorchError(f"strength must be in (0, 1], got {strength}")
    init_timestep = min(int(steps * strength), steps)
    if init_timestep == 0:
        raise SdtorchError(f"strength {strength} with {steps} steps runs no step; raise strength or steps")
    return max(steps - init_timestep, 0)


def sample(
    name: str,
    denoiser: Denoiser,
    noise: Tensor,
    steps: int,
    *,
    schedule: str = "uniform",
    noise_source: NoiseSource,
    init_latents: Tensor | None = None,
    strength: float = 1.0,
    eta: float = 0.0,
    callback: StepCallback | None = None,
) -> Tensor:
    """Run sampler `name` for `steps` steps from `noise` (or img2img from `init_latents` at `strength`).

    `noise` is the starting noise (unit variance), `noise_source` gives the per-step noise of the
    stochastic samplers. `callback` receives a `StepEvent` after each step. Returns the final latents
    in the scale the VAE decodes.
    """
    entry = sampler_entry(name)
    schedule = resolve_schedule(entry, schedule)
    if eta != 0.0 and "eta" not in entry.options:
        raise SdtorchError(f"eta applies to the ddim sampler only, not {name!r}")
    n_train = denoiser.schedule.num_train_timesteps
    if not 1 <= steps <= n_train:
        raise SdtorchError(f"steps must be between 1 and {n_train}, got {steps}")
    if init_latents is not None and init_latents.shape != noise.shape:
        raise SdtorchError(f"init latents {tuple(init_latents.shape)} and noise {tuple(noise.shape)} differ in shape")
    start = 0 if init_latents is None else img2img_start(steps, strength)
    total = steps - start
    ve = entry.space == "ve"

    def report(i: int, sigma: Tensor, x: Tensor, denoised: Tensor) -> None:
        if callback is not None:
            x_vp = x / (sigma**2 + 1) ** 0.5 if ve else x
            callback(StepEvent(i, total, float(sigma), x_vp, denoised))

    if ve:
        return _sample_sigmas(entry, denoiser, noise, steps, start, schedule, init_latents, noise_source, report)
    return _sample_timesteps(entry, denoiser, noise, steps, start, eta, init_latents, noise_source, report)


def _sample_sigmas(entry: SamplerEntry, denoiser, noise, steps, start, schedule, init_latents, noise_source, report):
    """Build the method's sigma grid and starting x (VE), then run its loop from sigmas[start]."""
    spacing, n_train = denoiser.schedule.spacing, denoiser.schedule.num_train_timesteps
    grid = sigma_grid(
        denoiser.schedule,
        entry.timesteps(steps, n_train) if spacing is None else spaced_timesteps(spacing, steps, n_train,
                                                                                 solver=entry.solver),
        karras=schedule == "karras",
        round_karras_timesteps=entry.round_karras_timesteps,
        karras_over_training_range=entry.solver,
    )
    sigmas = grid.sigmas
    if init_latents is not None:
        x = init_latents + noise * sigmas[start]
    elif entry.solver or spacing == "leading":
        # unit-variance VP noise, not noise * sigma_max: DPM-Solver's start, and that of diffusers' Euler-type
        # schedulers (their `init_noise_sigma`) under 'leading' spacing
        x = noise * (sigmas[0] ** 2 + 1) ** 0.5
    else:
        x = noise * sigmas[0]

    def model(x: Tensor, sigma: Tensor) -> Tensor:
        return denoiser.denoise(x, sigma, grid.timestep(sigma).to(x.device))

    if entry.lms_order_from_grid_start:
        return entry.run(model, x, sigmas, noise=noise_source, callback=report, start=start)
    return entry.run(model, x, sigmas[start:], noise=noise_source, callback=report)


def _sample_timesteps(entry: SamplerEntry, denoiser, noise, steps, start, eta, init_latents, noise_source, report):
    """Build the method's timestep list and starting x (VP), then run its loop from the start-th step."""
    n_train = denoiser.schedule.num_train_timesteps
    alphas_cumprod = denoiser.schedule.alphas_cumprod
    if denoiser.schedule.spacing not in (None, "leading"):
        raise SdtorchError(f"{entry.name} runs on 'leading' timesteps only, and this model's scheduler config asks "
                           f"for {denoiser.schedule.spacing!r}; use a sigma sampler (euler, dpmpp_2m, ...)")
    timesteps = leading_timesteps(steps, n_train)
    if entry.repeat_second_timestep:  # PLMS's warm start evaluates t1 twice: t0, t1, t1, t2, ...
        timesteps = torch.cat([timesteps[:2], timesteps[1:]])
    timesteps = timesteps[start:]
    if init_latents is None:
        x = noise
    else:
        a = alphas_cumprod[timesteps[0]]
        x = a**0.5 * init_latents + (1 - a) ** 0.5 * noise
    # DDIM and PNDM end on abar_0 (SD's set_alpha_to_one=False), DDPM on abar = 1
    final_alpha = torch.tensor(1.0) if entry.final_alpha_one else alphas_cumprod[0]
    options = {}
    if "eta" in entry.options:
        options["eta"] = eta
    if entry.repeat_second_timestep:
        options["stride"] = n_train // steps
    return entry.run(denoiser, x, timesteps, noise=noise_source, callback=report, final_alpha=final_alpha, **options)


# --- A1111 mode -------------------------------------------------------------------------------------------


def a1111_img2img_start(steps: int, strength: float) -> int:
    """Index into the grid where A1111's img2img starts: t_enc = int(min(strength, 0.999) * steps) steps run
    from sigmas[steps - t_enc - 1] (sd_samplers_common.setup_img2img_steps, KDiffusionSampler.sample_img2img),
    one more than diffusers' int(steps * strength)."""
    if not 0.0 < strength <= 1.0:
        raise SdtorchError(f"strength must be in (0, 1], got {strength}")
    return steps - int(min(strength, 0.999) * steps) - 1


def sample_a1111(
    name: str,
    denoiser: Denoiser,
    noise: Tensor,
    steps: int,
    *,
    schedule: str = "automatic",
    noise_source: NoiseSource,
    seeds: list[int] | None = None,
    init_latents: Tensor | None = None,
    strength: float = 1.0,
    options: dict | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Run sampler `name` as AUTOMATIC1111's KDiffusionSampler runs its k-diffusion function (v1.10).

    `denoiser.schedule` is the model's discrete schedule as A1111 holds it (`schedule_types.compvis_schedule`);
    the grid is `a1111_sigmas` (the sampler's default schedule type for "automatic", the next-to-last sigma
    dropped where A1111 drops it), the UNet gets k-diffusion's fractional timesteps (log-sigma interpolation,
    fp32), txt2img starts from `noise * sigmas[0]`, img2img from `init + noise * sigmas[start]` with
    `a1111_img2img_start`. `noise_source` gives the ancestral noise (A1111's per-image generators,
    `A1111Noise`); the Brownian samplers draw from a Brownian tree per image seeded with `seeds`, over the
    whole grid's range, as A1111 builds it. `options`: eta (A1111's ancestral eta, default 1), s_churn,
    s_tmin, s_tmax, s_noise (its defaults 0, 0, inf, 1) where the function takes them, and rho / sigma_min /
    sigma_max for the schedule types that take them.
    """
    entry = sampler_entry(name)
    schedule = resolve_schedule(entry, schedule, "a1111")
    a1111, options = entry.a1111, dict(options or {})
    if init_latents is not None and init_latents.shape != noise.shape:
        raise SdtorchError(f"init latents {tuple(init_latents.shape)} and noise {tuple(noise.shape)} differ in shape")
    n_train = denoiser.schedule.num_train_timesteps
    if not 1 <= steps <= n_train:
        raise SdtorchError(f"steps must be between 1 and {n_train}, got {steps}")
    if entry.space == "vp":
        return _sample_a1111_timesteps(entry, denoiser, noise, steps, noise_source, init_latents, strength, options,
                                       callback)
    grid_options = {k: float(options.pop(k)) for k in ("rho", "sigma_min", "sigma_max") if k in options}
    # A1111's LCM runs on its own denoiser: a 50-entry table of the model's schedule (lcm_table)
    table_schedule = lcm_table(denoiser.schedule) if entry.name == "lcm" else denoiser.schedule
    sigmas = a1111_sigmas(a1111.label, steps, table_schedule, schedule, **grid_options).to(noise.device)
    if init_latents is None:
        run_sigmas, x = sigmas, noise * sigmas[0]
        if entry.range_only:  # A1111 passes the model's sigma range and n = steps (only those are read)
            lo, hi = denoiser.schedule.sigma_min, denoiser.schedule.sigma_max
            run_sigmas = torch.tensor([hi, *[lo] * max(steps - 1, 1), 0.0], device=noise.device)
    else:
        run_sigmas = sigmas[a1111_img2img_start(steps, strength):]
        x = init_latents + noise * run_sigmas[0]
    kwargs = {}
    for option in entry.a1111_options:
        default = {"eta": 1.0, "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}[option]
        kwargs[option] = float(options.pop(option, default))
    if options:
        raise SdtorchError(f"option(s) {', '.join(options)} do not apply to {name!r} in A1111 mode; "
                           f"it takes: {', '.join(entry.a1111_options) or 'none'}")
    if a1111.solver_type:
        kwargs["solver_type"] = a1111.solver_type
    if a1111.brownian_noise:
        if seeds is None or len(seeds) != noise.shape[0]:
            raise SdtorchError(f"{name!r} draws Brownian-tree noise seeded per image: give one seed per image")
        noise_source = BrownianTreeNoise.over(noise, sigmas, list(seeds))

    table = DiscreteSigmas(table_schedule)
    total = len(run_sigmas) - 1
    if entry.name == "restart":
        total = len(_restart_segments(run_sigmas, None))

    def model(x: Tensor, sigma: Tensor) -> Tensor:
        if entry.name == "lcm":
            return _lcm_denoise(denoiser, table, x, sigma)
        return denoiser.denoise(x, sigma, table.sigma_to_t(sigma.cpu()).to(x.device))

    def report(i: int, sigma: Tensor, x: Tensor, denoised: Tensor) -> None:
        if callback is not None:
            x_vp = x / (sigma**2 + 1) ** 0.5
            callback(StepEvent(i, max(total, i + 1), float(sigma), x_vp, denoised))

    return entry.a1111_run(model, x, run_sigmas, noise=noise_source, callback=report, **kwargs)


LCM_ORIGINAL_STEPS = 50  # the timesteps LCM was distilled on ("LCM Original Timesteps" in A1111)


def lcm_table(schedule: NoiseSchedule) -> NoiseSchedule:
    """The schedule A1111's LCMCompVisDenoiser holds (sd_samplers_lcm.py): the model's alphas_cumprod at the 50
    timesteps LCM was distilled on, 19, 39, ..., 999; table entry k is timestep 20k + 19."""
    skip = schedule.num_train_timesteps // LCM_ORIGINAL_STEPS
    return NoiseSchedule(schedule.alphas_cumprod[skip - 1 :: skip].clone())


def _lcm_denoise(denoiser: Denoiser, table: DiscreteSigmas, x: Tensor, sigma: Tensor) -> Tensor:
    """A1111's LCM denoiser: the UNet at the nearest of LCM's timesteps (no interpolation), then the consistency
    model's boundary condition (Luo et al. 2023, eq. 9; sigma_data 0.5, timestep scaled by 10) between that
    denoised estimate and x."""
    skip = denoiser.schedule.num_train_timesteps // LCM_ORIGINAL_STEPS
    nearest = (torch.as_tensor(sigma, dtype=torch.float32).cpu().log() - table.log_sigmas).abs().argmin()
    t = nearest * skip + (skip - 1)  # a 0-d timestep, as the samplers' sigma is
    denoised = denoiser.denoise(x, sigma, t.to(x.device))
    scaled = float(t) * 10.0
    c_skip = 0.25 / (scaled**2 + 0.25)
    c_out = scaled / (scaled**2 + 0.25) ** 0.5
    return c_out * denoised + c_skip * x


def a1111_timesteps(steps: int) -> Tensor:
    """A1111's timestep grid for DDIM and PLMS, ascending (CompVisSampler.get_timesteps): every
    1000 // steps-th timestep from 1, clipped to 999, so more than `steps` of them when 1000 % steps != 0."""
    return (torch.arange(0, 1000, 1000 // steps) + 1).clamp(0, 999)


def _sample_a1111_timesteps(entry: SamplerEntry, denoiser, noise, steps, noise_source, init_latents, strength,
                            options, callback):
    """DDIM and PLMS as A1111 1.6+ runs them on its own timestep samplers (sd_samplers_timesteps_impl.py), which
    are ours on A1111's grid: it walks the grid down from its top but stops at its lowest timestep (1) rather
    than stepping on to abar_0, so a 20-step DDIM evaluates the UNet 19 times. txt2img starts from the unit
    noise itself; img2img noises the init to timestep t_enc (`int(min(strength, 0.999) * steps)`) of the grid
    and then denoises from the one below it, as A1111 does. `eta` (DDIM; A1111's "Eta DDIM", 0 by default)
    draws its noise from `noise_source`, as A1111 draws it from the image's generators."""
    eta = float(options.pop("eta", 0.0))
    if eta and entry.name != "ddim" or options:
        raise SdtorchError(f"option(s) {', '.join(options) or 'eta'} do not apply to {entry.name!r} in A1111 mode; "
                           f"it takes: {'eta' if entry.name == 'ddim' else 'none'}")
    grid = a1111_timesteps(steps).to(noise.device)
    alphas_cumprod = denoiser.schedule.alphas_cumprod.to(noise.device)
    if init_latents is None:
        top, x = len(grid) - 1, noise
    else:
        if not 0.0 < strength <= 1.0:
            raise SdtorchError(f"strength must be in (0, 1], got {strength}")
        top = int(min(strength, 0.999) * steps)  # A1111's t_enc; xi is noised to grid[top], denoised from grid[top - 1]
        a = alphas_cumprod[grid[top]]
        x, top = init_latents * a**0.5 + noise * (1 - a) ** 0.5, top - 1
    timesteps = grid[1 : top + 1].flip(0)  # stops above grid[0], whose abar the last step lands on
    if len(timesteps) == 0:
        raise SdtorchError(f"strength {strength} with {steps} steps runs no {entry.display_name} step in A1111 mode; "
                           "raise strength or steps")
    kwargs = {"eta": eta} if entry.name == "ddim" else {"stride": 1000 // steps}
    if entry.repeat_second_timestep and len(timesteps) > 1:  # the warm start's second evaluation, at grid[top - 1]
        timesteps = torch.cat([timesteps[:2], timesteps[1:]])
    elif entry.repeat_second_timestep:
        timesteps = torch.cat([timesteps, timesteps - 1000 // steps])
    total = len(timesteps) - (1 if entry.repeat_second_timestep else 0)

    def report(i: int, sigma: Tensor, x: Tensor, denoised: Tensor) -> None:
        if callback is not None:
            callback(StepEvent(i, total, float(sigma), x, denoised))

    return entry.run(denoiser, x, timesteps, noise=noise_source, callback=report, final_alpha=alphas_cumprod[grid[0]],
                     **kwargs)


# A1111's infotext keys for the sampler settings it records when they differ from its defaults -> our options
A1111_OPTION_KEYS = {
    "Eta": "eta", "Sigma churn": "s_churn", "Sigma tmin": "s_tmin", "Sigma tmax": "s_tmax", "Sigma noise": "s_noise",
    "Schedule rho": "rho", "Schedule min sigma": "sigma_min", "Schedule max sigma": "sigma_max",
}


def a1111_options(name: str, schedule: str, record: dict) -> tuple[dict, list[str]]:
    """The `sample_a1111` options a record's keys ("Eta: 0.5", "Sigma churn: 1", "Schedule rho: 5", ...) set
    for sampler `name` on `schedule` (ours, resolved), and the keys among them that do not apply to it."""
    import inspect

    from .schedule_types import SCHEDULE_TYPES

    entry = sampler_entry(name)
    function = SCHEDULE_TYPES[schedule].function
    takes = set(entry.a1111_options) | (set(inspect.signature(function).parameters) if function else set())
    options, unused = {}, []
    for key, ours in A1111_OPTION_KEYS.items():
        if key in record:
            if ours in takes:
                options[ours] = float(record[key])
            else:
                unused.append(key)
    return options, unused
