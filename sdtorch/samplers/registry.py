"""The sampler table: one entry per sampler, the schedule types, and the names A1111 gives them.

Adding a sampler is adding an entry: its function (every one takes `model, x, grid, *, noise,
callback, **options`), the space it works in, how its grid is laid out (as the diffusers scheduler of
the same method lays it out from SD's config), the schedule types it takes and the request options
that apply to it. `sdtorch.samplers.run` reads nothing else.

Two modes run the table. The default, "diffusers", equals diffusers' pipelines: it needs a diffusers-equal
grid (`timesteps`), so only the samplers with one (`SAMPLERS`) run in it, on the schedule types
`SCHEDULE_TYPES` (uniform: each method's own evenly spaced grid; karras). "a1111" equals AUTOMATIC1111:
k-diffusion's discrete grids and functions (`a1111_run`), every schedule type of
`schedule_types.SCHEDULE_TYPES` and A1111's per-sampler options (`schedule_types.A1111_SAMPLERS`, looked up
by display name). `ALL_SAMPLERS` is the whole table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from sdtorch.errors import SdtorchError

from . import kdiffusion_samplers as ks
from . import schedules, sigma_samplers, timestep_samplers
from .schedule_types import A1111_CHURN_SAMPLERS, A1111_SAMPLERS, A1111Sampler
from .schedule_types import SCHEDULE_TYPES as ALL_SCHEDULE_TYPES

COMPAT_MODES = ("diffusers", "a1111")
AUTOMATIC = "automatic"
# The schedule types the diffusers-equal mode lays out, under our names with A1111's labels ("Schedule type:
# Karras"): a view of the one table, schedule_types.SCHEDULE_TYPES. "automatic" is not a grid but A1111's
# per-sampler default.
DIFFUSERS_SCHEDULES = ("uniform", "karras")
SCHEDULE_TYPES: dict[str, str] = {name: ALL_SCHEDULE_TYPES[name].label for name in DIFFUSERS_SCHEDULES}
# What A1111's "Schedule type: Automatic" means for each of its samplers, by display name (the `scheduler`
# option of its sd_samplers_kdiffusion.py, 1.9+), derived from A1111_SAMPLERS; samplers not listed: uniform.
A1111_AUTOMATIC_SCHEDULE = {
    label: ALL_SCHEDULE_TYPES[s.scheduler].label for label, s in A1111_SAMPLERS.items() if s.scheduler
}
# k-diffusion functions that read only the grid's range and length (DPM fast, DPM adaptive)
_RANGE_ONLY = ("sample_dpm_fast", "sample_dpm_adaptive")


@dataclass(frozen=True)
class SamplerEntry:
    """What a user-facing sampler is, how it runs, and what it accepts."""

    name: str  # ours, as the CLI and the request spell it
    display_name: str  # A1111's ("DPM++ 2M"), without the schedule type
    run: Callable[..., Tensor]
    space: str  # "ve": sigma grid and a denoiser D(x, sigma); "vp": integer timesteps and eps(x, t)
    # (steps, train timesteps) -> the method's timestep spacing as diffusers lays it out; None: no diffusers form
    timesteps: Callable[[int, int], Tensor] | None
    schedules: tuple[str, ...] = ("uniform",)
    options: tuple[str, ...] = ()  # request fields beyond the common ones that apply (e.g. "eta")
    stochastic: bool = False  # draws fresh noise every step; ddim only when eta > 0
    # Grid details of the diffusers scheduler it matches:
    round_karras_timesteps: bool = False  # Karras sigmas get integer timesteps
    solver: bool = False  # DPM-Solver style: Karras spans the whole training range, x starts as unit VP noise
    lms_order_from_grid_start: bool = False  # img2img: LMS counts its order from the full grid's start
    repeat_second_timestep: bool = False  # PLMS's warm start evaluates t_1 twice
    final_alpha_one: bool = False  # the VP chain ends at abar = 1 (DDPM) rather than at abar_0
    # A1111 mode: the k-diffusion-equal loop it runs there (None: A1111 runs it otherwise, or not at all)
    a1111_run: Callable[..., Tensor] | None = None
    note: str = ""  # what a user should know (`sdtorch samplers` prints it)
    a1111_caveat: str = ""  # how it falls short of A1111's image, said when a PNG asks for it

    @property
    def supports_karras(self) -> bool:
        return "karras" in self.schedules

    @property
    def a1111_default_schedule(self) -> str:
        """What A1111's "Schedule type: Automatic" means for it, as our name ("karras")."""
        a1111 = self.a1111
        return a1111.scheduler if a1111 is not None and a1111.scheduler else "uniform"

    @property
    def a1111(self) -> A1111Sampler | None:
        """A1111's options for it (default schedule, discarded sigma, Brownian noise, ...), None if A1111 lacks it."""
        return A1111_SAMPLERS.get(self.display_name)

    @property
    def diffusers_equal(self) -> bool:
        """Whether it runs in the default mode (it has a diffusers-equal grid)."""
        return self.timesteps is not None

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(m for m, ok in zip(COMPAT_MODES, (self.diffusers_equal, self.a1111_run is not None)) if ok)

    @property
    def range_only(self) -> bool:
        """It reads only the grid's range and length (DPM fast, DPM adaptive)."""
        return self.a1111 is not None and self.a1111.function in _RANGE_ONLY

    @property
    def a1111_options(self) -> tuple[str, ...]:
        """The k-diffusion options A1111 passes it: eta (its ancestral eta, 1 by default) where the function takes
        it, and the churn settings for Euler, Heun and DPM2."""
        if self.a1111_run is None:
            return ()
        import inspect

        params = inspect.signature(self.a1111_run).parameters
        return tuple(p for p in ("eta", "s_churn", "s_tmin", "s_tmax", "s_noise") if p in params
                     and (p == "eta" or self.a1111.function in A1111_CHURN_SAMPLERS))


def _ve(name, display, run, timesteps, **kw) -> SamplerEntry:
    return SamplerEntry(name, display, run, "ve", timesteps, schedules=("uniform", "karras"), **kw)


def _a1111(name, display, run, **kw) -> SamplerEntry:
    """A sampler that runs only in A1111 mode (k-diffusion has it; diffusers has no scheduler equal to it)."""
    return SamplerEntry(name, display, run, "ve", None, schedules=(), a1111_run=run, **kw)


_LINSPACE, _SOLVER, _LEADING = schedules.linspace_timesteps, schedules.solver_timesteps, schedules.leading_timesteps
_ENTRIES = [
    # A1111 runs DDIM and PLMS on its own timestep grid (run.a1111_timesteps), no schedule type applying
    SamplerEntry("ddim", "DDIM", timestep_samplers.sample_ddim, "vp", _LEADING, options=("eta",),
                 a1111_run=timestep_samplers.sample_ddim),
    SamplerEntry("pndm", "PLMS", timestep_samplers.sample_plms, "vp", _LEADING, repeat_second_timestep=True,
                 a1111_run=timestep_samplers.sample_plms),
    _ve("lms", "LMS", sigma_samplers.sample_lms, _LINSPACE, lms_order_from_grid_start=True,
        a1111_run=sigma_samplers.sample_lms),
    _ve("euler", "Euler", sigma_samplers.sample_euler, _LINSPACE, a1111_run=ks.sample_euler),
    SamplerEntry("euler_a", "Euler a", sigma_samplers.sample_euler_ancestral, "ve", _LINSPACE, stochastic=True,
                 a1111_run=ks.sample_euler_ancestral),
    _ve("heun", "Heun", sigma_samplers.sample_heun, _LINSPACE, a1111_run=ks.sample_heun),
    _ve("dpm2", "DPM2", sigma_samplers.sample_dpm_2, _LINSPACE, round_karras_timesteps=True,
        a1111_run=ks.sample_dpm_2),
    _ve("dpmpp_2m", "DPM++ 2M", sigma_samplers.sample_dpmpp_2m, _SOLVER, round_karras_timesteps=True, solver=True,
        a1111_run=sigma_samplers.sample_dpmpp_2m),
    # A1111 defaults DPM++ 2M SDE to the exponential schedule: --compat a1111 lays it out.
    _ve("dpmpp_2m_sde", "DPM++ 2M SDE", sigma_samplers.sample_dpmpp_2m_sde, _SOLVER, stochastic=True,
        round_karras_timesteps=True, solver=True, a1111_run=ks.sample_dpmpp_2m_sde),
    _ve("unipc", "UniPC", sigma_samplers.sample_unipc, _SOLVER, round_karras_timesteps=True, solver=True,
        note="A1111 mode: A1111 runs UniPC on its own timestep sampler, not reproduced"),
    SamplerEntry("ddpm", "DDPM", timestep_samplers.sample_ddpm, "vp", _LEADING, stochastic=True,
                 final_alpha_one=True),
    # A1111's k-diffusion samplers that diffusers has no equal of: A1111 mode only.
    _a1111("dpm2_a", "DPM2 a", ks.sample_dpm_2_ancestral, stochastic=True),
    _a1111("dpmpp_2s_a", "DPM++ 2S a", ks.sample_dpmpp_2s_ancestral, stochastic=True),
    _a1111("dpmpp_sde", "DPM++ SDE", ks.sample_dpmpp_sde, stochastic=True),
    _a1111("dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun", ks.sample_dpmpp_2m_sde, stochastic=True),
    _a1111("dpmpp_3m_sde", "DPM++ 3M SDE", ks.sample_dpmpp_3m_sde, stochastic=True),
    _a1111("dpm_fast", "DPM fast", ks.sample_dpm_fast, stochastic=True),
    _a1111("dpm_adaptive", "DPM adaptive", ks.sample_dpm_adaptive, stochastic=True,
           note="as many steps as its error control takes"),
    _a1111("lcm", "LCM", ks.sample_lcm, stochastic=True,
           note="on A1111's LCM denoiser: 50 timesteps, the consistency boundary condition (for LCM models)"),
    _a1111("restart", "Restart", ks.sample_restart, stochastic=True,
           note="A1111 draws its restart noise from the global RNG: not reproducible there either",
           a1111_caveat="A1111 draws its restart noise from its unseeded global RNG: not reproducible there either"),
]
ALL_SAMPLERS: dict[str, SamplerEntry] = {entry.name: entry for entry in _ENTRIES}
# The samplers of the default (diffusers-equal) mode: a view of the table.
SAMPLERS: dict[str, SamplerEntry] = {name: e for name, e in ALL_SAMPLERS.items() if e.diffusers_equal}


def sampler_entry(name: str) -> SamplerEntry:
    """The sampler's entry, or an SdtorchError naming what is accepted."""
    if name not in ALL_SAMPLERS:
        raise SdtorchError(f"unknown sampler {name!r}; valid samplers: {', '.join(ALL_SAMPLERS)}")
    return ALL_SAMPLERS[name]


def check_compat(compat: str) -> str:
    if compat not in COMPAT_MODES:
        raise SdtorchError(f"unknown compatibility mode {compat!r}; accepted: {', '.join(COMPAT_MODES)}")
    return compat


def check_mode(entry: SamplerEntry, compat: str) -> None:
    """An SdtorchError, one line, if the sampler has no form in this mode."""
    if check_compat(compat) in entry.modes:
        return
    if compat == "diffusers":
        raise SdtorchError(
            f"sampler {entry.name!r} ({entry.display_name}) has no diffusers-equal form; run it with --compat a1111 "
            f"(default-mode samplers: {', '.join(SAMPLERS)})"
        )
    takers = ", ".join(n for n, e in ALL_SAMPLERS.items() if e.a1111_run is not None)
    why = f" ({entry.note.removeprefix('A1111 mode: ')})" if entry.note else ""
    raise SdtorchError(f"sampler {entry.name!r} has no A1111-mode form{why}; A1111-mode samplers: {takers}")


def resolve_schedule(entry: SamplerEntry, schedule: str, compat: str = "diffusers") -> str:
    """The schedule type a request's `schedule` means for this sampler in this mode ("automatic": A1111's
    default for it, where the mode has that schedule, else uniform), or an SdtorchError naming what is accepted.

    The default mode lays out uniform and karras (diffusers' grids) for the samplers that take them; A1111 mode
    every schedule type of A1111 for every sampler, as A1111 does."""
    check_mode(entry, compat)
    if compat == "a1111":
        if schedule == AUTOMATIC:
            return entry.a1111_default_schedule
        if entry.space == "vp" and schedule != "uniform":
            raise SdtorchError(f"A1111 runs {entry.display_name} on its own timestep grid: no schedule type applies "
                               f"(got {schedule!r}); accepted: automatic, uniform")
        if schedule not in ALL_SCHEDULE_TYPES:
            raise SdtorchError(f"unknown schedule type {schedule!r}; accepted: {', '.join(ALL_SCHEDULE_TYPES)}")
        return schedule
    if schedule == AUTOMATIC:
        return entry.a1111_default_schedule if entry.a1111_default_schedule in entry.schedules else "uniform"
    if schedule not in SCHEDULE_TYPES:
        more = [n for n in ALL_SCHEDULE_TYPES if n not in SCHEDULE_TYPES and n != AUTOMATIC]
        hint = (f"; with --compat a1111 also: {', '.join(more)}" if schedule not in ALL_SCHEDULE_TYPES else
                f"; {schedule!r} is laid out only with --compat a1111")
        raise SdtorchError(
            f"unknown schedule type {schedule!r}; accepted: {', '.join([*SCHEDULE_TYPES, AUTOMATIC])}{hint}"
        )
    if schedule not in entry.schedules:
        takers = ", ".join(n for n, e in SAMPLERS.items() if schedule in e.schedules)
        raise SdtorchError(
            f"sampler {entry.name!r} does not take the {schedule!r} schedule "
            f"(it takes: {', '.join(entry.schedules)}); samplers that do: {takers}"
        )
    return schedule


def a1111_name(name: str, schedule: str = "uniform", compat: str = "diffusers") -> str:
    """The sampler as A1111 before 1.9 named it, schedule folded in: 'DPM++ 2M Karras', 'Euler a'."""
    entry = sampler_entry(name)
    schedule = resolve_schedule(entry, schedule, compat)
    return entry.display_name if schedule == "uniform" else f"{entry.display_name} {ALL_SCHEDULE_TYPES[schedule].label}"


def a1111_sampler(label: str) -> SamplerEntry:
    """The entry A1111's display name (1.9+, no schedule type: 'DPM++ 2M', 'Euler a') or one of its aliases
    ('k_dpmpp_2m') names, case-insensitively; an SdtorchError listing A1111's names otherwise."""
    key = " ".join(str(label).split()).lower()
    for entry in ALL_SAMPLERS.values():
        a1111 = entry.a1111
        if key == entry.display_name.lower() or (a1111 is not None and key in a1111.aliases):
            return entry
    raise SdtorchError(f"unknown sampler {label!r}; A1111's samplers here: "
                       f"{', '.join(e.display_name for e in ALL_SAMPLERS.values())}")
