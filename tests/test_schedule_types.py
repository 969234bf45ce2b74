"""A1111's schedule types (sdtorch.samplers.schedule_types) against A1111's definitions, within 1e-6.

Uniform, Karras, Exponential and Polyexponential are checked against k-diffusion 0.0.16 itself (its
`get_sigmas_*` and the DiscreteEpsDDPMDenoiser that A1111's CompVisDenoiser is, built from the same
alphas_cumprod; loaded as in test_kdiffusion_samplers). The others are A1111's own code, with no installable
oracle: they are checked against transcriptions of A1111 v1.10's modules/sd_schedulers.py (marked below),
run on k-diffusion's denoiser as A1111 runs them, and against numbers computed independently (scipy's Beta
quantiles, the Align Your Steps table, arctan spacing, endpoints).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from test_kdiffusion_samplers import load_kdiffusion

from sdtorch.diffusion import NoiseSchedule
from sdtorch.errors import SdtorchError
from sdtorch.samplers import schedule_types as st

TOL = 1e-6
SCHEDULES = {
    "sd": NoiseSchedule.from_betas(),  # SD 1.x / 2.x: scaled-linear 0.00085..0.012 over 1000 steps
    "linear": NoiseSchedule.from_betas(0.0001, 0.02, 1000, "linear"),
}
STEPS = [1, 2, 7, 10, 11, 20, 30, 50]


def denoiser(kd, schedule: NoiseSchedule):
    """k-diffusion's discrete eps denoiser on the schedule's alphas_cumprod: what A1111's CompVisDenoiser is."""
    return kd.external.DiscreteEpsDDPMDenoiser(None, schedule.alphas_cumprod, quantize=False)


def model_range(schedule):
    """A1111's (sigma_min, sigma_max): model_wrap.sigmas[0].item(), model_wrap.sigmas[-1].item()."""
    return schedule.sigmas[0].item(), schedule.sigmas[-1].item()


# --- TRANSCRIPTIONS of A1111 v1.10 modules/sd_schedulers.py (shared.opts / shared.sd_model made arguments) --


def a1111_sgm_uniform(n, sigma_min, sigma_max, inner_model, device="cpu"):
    start = inner_model.sigma_to_t(torch.tensor(sigma_max))
    end = inner_model.sigma_to_t(torch.tensor(sigma_min))
    sigs = [inner_model.t_to_sigma(ts) for ts in torch.linspace(start, end, n + 1)[:-1]]
    sigs += [0.0]
    return torch.FloatTensor(sigs).to(device)


def a1111_get_align_your_steps_sigmas(n, sigma_min, sigma_max, device="cpu", is_sdxl=False):
    def loglinear_interp(t_steps, num_steps):
        xs = np.linspace(0, 1, len(t_steps))
        ys = np.log(t_steps[::-1])
        new_xs = np.linspace(0, 1, num_steps)
        new_ys = np.interp(new_xs, xs, ys)
        interped_ys = np.exp(new_ys)[::-1].copy()
        return interped_ys

    if is_sdxl:
        sigmas = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]
    else:
        sigmas = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
    if n != len(sigmas):
        sigmas = np.append(loglinear_interp(sigmas, n), [0.0])
    else:
        sigmas.append(0.0)
    return torch.FloatTensor(sigmas).to(device)


def a1111_kl_optimal(n, sigma_min, sigma_max, device="cpu"):
    alpha_min = torch.arctan(torch.tensor(sigma_min, device=device))
    alpha_max = torch.arctan(torch.tensor(sigma_max, device=device))
    step_indices = torch.arange(n + 1, device=device)
    sigmas = torch.tan(step_indices / n * alpha_min + (1.0 - step_indices / n) * alpha_max)
    return sigmas


def a1111_simple_scheduler(n, sigma_min, sigma_max, inner_model, device="cpu"):
    sigs = []
    ss = len(inner_model.sigmas) / n
    for x in range(n):
        sigs += [float(inner_model.sigmas[-(1 + int(x * ss))])]
    sigs += [0.0]
    return torch.FloatTensor(sigs).to(device)


def a1111_normal_scheduler(n, sigma_min, sigma_max, inner_model, device="cpu", sgm=False, floor=False):
    start = inner_model.sigma_to_t(torch.tensor(sigma_max))
    end = inner_model.sigma_to_t(torch.tensor(sigma_min))
    if sgm:  # noqa: SIM108 (kept as A1111 writes it)
        timesteps = torch.linspace(start, end, n + 1)[:-1]
    else:
        timesteps = torch.linspace(start, end, n)
    sigs = []
    for x in range(len(timesteps)):
        ts = timesteps[x]
        sigs.append(inner_model.t_to_sigma(ts))
    sigs += [0.0]
    return torch.FloatTensor(sigs).to(device)


def a1111_ddim_scheduler(n, sigma_min, sigma_max, inner_model, device="cpu"):
    sigs = []
    ss = max(len(inner_model.sigmas) // n, 1)
    x = 1
    while x < len(inner_model.sigmas):
        sigs += [float(inner_model.sigmas[x])]
        x += ss
    sigs = sigs[::-1]
    sigs += [0.0]
    return torch.FloatTensor(sigs).to(device)


def a1111_beta_scheduler(n, sigma_min, sigma_max, inner_model, device="cpu", alpha=0.6, beta=0.6):
    # alpha, beta: shared.opts.beta_dist_alpha / beta_dist_beta, whose defaults are 0.6 and 0.6
    timesteps = 1 - np.linspace(0, 1, n)
    timesteps = [stats.beta.ppf(x, alpha, beta) for x in timesteps]
    sigmas = [sigma_min + (x * (sigma_max - sigma_min)) for x in timesteps]
    sigmas += [0.0]
    return torch.FloatTensor(sigmas).to(device)


# A1111 v1.10's `schedulers` list: (name, label, aliases); and samplers_k_diffusion + samplers_lcm options.
A1111_SCHEDULERS = [
    ("automatic", "Automatic", None), ("uniform", "Uniform", None), ("karras", "Karras", None),
    ("exponential", "Exponential", None), ("polyexponential", "Polyexponential", None),
    ("sgm_uniform", "SGM Uniform", ["SGMUniform"]), ("kl_optimal", "KL Optimal", None),
    ("align_your_steps", "Align Your Steps", None), ("simple", "Simple", None), ("normal", "Normal", None),
    ("ddim", "DDIM", None), ("beta", "Beta", None),
]
A1111_SAMPLERS = [
    ('DPM++ 2M', 'sample_dpmpp_2m', ['k_dpmpp_2m'], {'scheduler': 'karras'}),
    ('DPM++ SDE', 'sample_dpmpp_sde', ['k_dpmpp_sde'], {'scheduler': 'karras', "second_order": True,
                                                        "brownian_noise": True}),
    ('DPM++ 2M SDE', 'sample_dpmpp_2m_sde', ['k_dpmpp_2m_sde'], {'scheduler': 'exponential', "brownian_noise": True}),
    ('DPM++ 2M SDE Heun', 'sample_dpmpp_2m_sde', ['k_dpmpp_2m_sde_heun'], {'scheduler': 'exponential',
                                                                           "brownian_noise": True,
                                                                           "solver_type": "heun"}),
    ('DPM++ 2S a', 'sample_dpmpp_2s_ancestral', ['k_dpmpp_2s_a'], {'scheduler': 'karras', "uses_ensd": True,
                                                                   "second_order": True}),
    ('DPM++ 3M SDE', 'sample_dpmpp_3m_sde', ['k_dpmpp_3m_sde'], {'scheduler': 'exponential',
                                                                 'discard_next_to_last_sigma': True,
                                                                 "brownian_noise": True}),
    ('Euler a', 'sample_euler_ancestral', ['k_euler_a', 'k_euler_ancestral'], {"uses_ensd": True}),
    ('Euler', 'sample_euler', ['k_euler'], {}),
    ('LMS', 'sample_lms', ['k_lms'], {}),
    ('Heun', 'sample_heun', ['k_heun'], {"second_order": True}),
    ('DPM2', 'sample_dpm_2', ['k_dpm_2'], {'scheduler': 'karras', 'discard_next_to_last_sigma': True,
                                           "second_order": True}),
    ('DPM2 a', 'sample_dpm_2_ancestral', ['k_dpm_2_a'], {'scheduler': 'karras', 'discard_next_to_last_sigma': True,
                                                         "uses_ensd": True, "second_order": True}),
    ('DPM fast', 'sample_dpm_fast', ['k_dpm_fast'], {"uses_ensd": True}),
    ('DPM adaptive', 'sample_dpm_adaptive', ['k_dpm_ad'], {"uses_ensd": True}),
    ('Restart', 'restart_sampler', ['restart'], {'scheduler': 'karras', "second_order": True}),
    ('LCM', 'sample_lcm', ['k_lcm'], {}),
]


# --- against k-diffusion ----------------------------------------------------------------------------------


def assert_grid(got: torch.Tensor, expected: torch.Tensor, what: str):
    assert got.dtype == torch.float32 and got.shape == expected.shape, f"{what}: {got.shape} vs {expected.shape}"
    diff = (got - expected.float()).abs().max().item()
    assert diff <= TOL, f"{what}: max |ours - A1111| = {diff:.2e}"


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
def test_kdiffusion_grids(schedule_name, steps):
    kd = load_kdiffusion()
    schedule = SCHEDULES[schedule_name]
    lo, hi = model_range(schedule)
    cases = {
        "uniform": (st.uniform(steps, schedule), denoiser(kd, schedule).get_sigmas(steps)),
        "karras": (st.karras(steps, schedule), kd.sampling.get_sigmas_karras(steps, lo, hi)),
        "karras rho 5": (st.karras(steps, schedule, rho=5.0), kd.sampling.get_sigmas_karras(steps, lo, hi, rho=5.0)),
        "karras 0.1..10": (st.karras(steps, schedule, sigma_min=0.1, sigma_max=10.0),
                           kd.sampling.get_sigmas_karras(steps, 0.1, 10.0)),
        "exponential": (st.exponential(steps, schedule), kd.sampling.get_sigmas_exponential(steps, lo, hi)),
        "polyexponential": (st.polyexponential(steps, schedule), kd.sampling.get_sigmas_polyexponential(steps, lo, hi)),
        "polyexponential rho 2": (st.polyexponential(steps, schedule, rho=2.0),
                                  kd.sampling.get_sigmas_polyexponential(steps, lo, hi, rho=2.0)),
    }
    for what, (got, expected) in cases.items():
        assert_grid(got, expected, f"{what}, {steps} steps, {schedule_name}")


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
def test_a1111_grids(schedule_name, steps):
    kd = load_kdiffusion()
    schedule = SCHEDULES[schedule_name]
    inner = denoiser(kd, schedule)
    lo, hi = model_range(schedule)
    cases = {
        "sgm_uniform": (st.sgm_uniform, a1111_sgm_uniform(steps, lo, hi, inner)),
        "kl_optimal": (st.kl_optimal, a1111_kl_optimal(steps, lo, hi)),
        "align_your_steps": (st.align_your_steps, a1111_get_align_your_steps_sigmas(steps, lo, hi)),
        "simple": (st.simple, a1111_simple_scheduler(steps, lo, hi, inner)),
        "normal": (st.normal, a1111_normal_scheduler(steps, lo, hi, inner)),
        "ddim": (st.ddim, a1111_ddim_scheduler(steps, lo, hi, inner)),
        "beta": (st.beta, a1111_beta_scheduler(steps, lo, hi, inner)),
    }
    for what, (fn, expected) in cases.items():
        assert_grid(fn(steps, schedule), expected, f"{what}, {steps} steps, {schedule_name}")
    assert_grid(st.align_your_steps(steps, schedule, table=st.AYS_SDXL),
                a1111_get_align_your_steps_sigmas(steps, lo, hi, is_sdxl=True), f"AYS SDXL, {steps} steps")
    assert_grid(st.beta(steps, schedule, alpha=2.0, beta=0.5),
                a1111_beta_scheduler(steps, lo, hi, inner, alpha=2.0, beta=0.5), f"beta(2, 0.5), {steps} steps")


def test_discrete_sigmas_equal_kdiffusion_maps():
    """Our fp32 sigma <-> t maps are k-diffusion's DiscreteSchedule's, at and between the table's entries."""
    kd = load_kdiffusion()
    schedule = SCHEDULES["sd"]
    ours, ref = st.DiscreteSigmas(schedule), denoiser(kd, schedule)
    assert torch.equal(ours.sigmas, ref.sigmas)
    sigmas = torch.cat([torch.logspace(-2, 1.3, 97), ref.sigmas[::37]])
    torch.testing.assert_close(ours.sigma_to_t(sigmas), ref.sigma_to_t(sigmas), rtol=0, atol=1e-4)
    t = torch.linspace(0, 999, 301)
    torch.testing.assert_close(ours.t_to_sigma(t), ref.t_to_sigma(t), rtol=0, atol=TOL)


# --- against independent numbers --------------------------------------------------------------------------


@pytest.mark.parametrize(("a", "b"), [(0.6, 0.6), (0.5, 0.7), (2.0, 5.0), (1.0, 1.0), (3.5, 0.8)])
def test_beta_quantiles_equal_scipy(a, b):
    qs = [0.0, 1e-9, 1e-4, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1 - 1e-6, 1.0]
    for q in qs:
        assert st.beta_ppf(q, a, b) == pytest.approx(stats.beta.ppf(q, a, b), abs=1e-12, rel=1e-10)
    xs = np.linspace(0.001, 0.999, 23)
    for x in xs:
        assert st.beta_cdf(float(x), a, b) == pytest.approx(stats.beta.cdf(x, a, b), abs=1e-13)


def test_beta_grid_from_scipy():
    schedule = SCHEDULES["sd"]
    lo, hi = model_range(schedule)
    steps = 15
    qs = 1 - np.arange(steps) / (steps - 1)
    expected = [lo + stats.beta.ppf(q, 0.6, 0.6) * (hi - lo) for q in qs] + [0.0]
    assert_grid(st.beta(steps, schedule), torch.tensor(expected), "beta from scipy")


def test_grids_have_their_defining_properties():
    schedule = SCHEDULES["sd"]
    lo, hi = model_range(schedule)
    u = st.uniform(20, schedule)
    assert len(u) == 21 and u[-1] == 0 and abs(u[0] - hi) < 2e-6 and abs(u[-2] - lo) < 1e-7
    assert torch.all(u[:-1] > u[1:])  # descending
    k = st.karras(20, schedule)
    ramp = k[:-1] ** (1 / 7)
    torch.testing.assert_close(ramp.diff(), torch.full((19,), (lo ** (1 / 7) - hi ** (1 / 7)) / 19), rtol=1e-4,
                               atol=0)
    e = st.exponential(20, schedule)
    torch.testing.assert_close(e[:-1].log().diff(), torch.full((19,), math.log(lo / hi) / 19), rtol=1e-4, atol=0)
    kl = st.kl_optimal(20, schedule)  # A1111's KL Optimal ends at sigma_min, with no 0 appended
    assert len(kl) == 21 and abs(kl[-1] - lo) < 1e-7
    torch.testing.assert_close(kl.atan().diff(), torch.full((20,), (math.atan(lo) - math.atan(hi)) / 20),
                               rtol=1e-4, atol=0)
    assert torch.equal(st.align_your_steps(11, schedule), torch.tensor([*st.AYS_SD15, 0.0]))
    ays = st.align_your_steps(21, schedule)  # every other value is NVIDIA's, log-linear between
    torch.testing.assert_close(ays[:-1:2], torch.tensor(st.AYS_SD15), rtol=1e-6, atol=0)
    assert len(st.ddim(20, schedule)) == 21 and len(st.ddim(30, schedule)) == 32  # as A1111 lays DDIM out
    torch.testing.assert_close(st.ddim(20, schedule)[:-1], schedule.sigmas[1::50].flip(0), rtol=0, atol=0)
    sgm, normal = st.sgm_uniform(20, schedule), st.normal(21, schedule)
    assert len(sgm) == 21 and torch.equal(sgm[:-1], normal[:-2])  # SGM: the Normal grid of steps+1, last dropped
    assert len(st.simple(20, schedule)) == 21 and st.simple(20, schedule)[0] == schedule.sigmas[-1]


# --- the tables -------------------------------------------------------------------------------------------


def test_schedule_types_are_a1111s():
    assert [(s.name, s.label, list(s.aliases) or None) for s in st.SCHEDULE_TYPES.values()] == A1111_SCHEDULERS
    for s in st.SCHEDULE_TYPES.values():
        assert st.schedule_type(s.name) is s and st.schedule_type(s.label) is s
        assert (s.function is None) == (s.name == "automatic")
    assert st.schedule_type("SGMUniform").name == "sgm_uniform" and st.schedule_type("kl optimal").name == "kl_optimal"
    with pytest.raises(SdtorchError, match=r"unknown schedule type 'cosine'; accepted: automatic, uniform, karras"):
        st.schedule_type("cosine")


def test_a1111_sampler_options_are_a1111s():
    assert list(st.A1111_SAMPLERS) == [label for label, *_ in A1111_SAMPLERS]
    for label, function, aliases, options in A1111_SAMPLERS:
        ours = st.A1111_SAMPLERS[label]
        assert (ours.function, list(ours.aliases)) == (function, aliases)
        for key in ("scheduler", "discard_next_to_last_sigma", "second_order", "uses_ensd", "brownian_noise",
                    "solver_type"):
            assert getattr(ours, key) == options.get(key, None if key in ("scheduler", "solver_type") else False)


def a1111_get_sigmas(kd, sampler_options, schedule, steps, scheduler_name):
    """TRANSCRIPTION of A1111 v1.10 KDiffusionSampler.get_sigmas for default settings (no overrides of
    sigma_min / sigma_max / rho, no always-discard option), with our transcribed schedulers."""
    discard_next_to_last_sigma = sampler_options.get('discard_next_to_last_sigma', False)
    steps += 1 if discard_next_to_last_sigma else 0
    if scheduler_name == 'Automatic':
        scheduler_name = sampler_options.get('scheduler', None)
    inner = denoiser(kd, schedule)
    functions = {'karras': kd.sampling.get_sigmas_karras, 'Karras': kd.sampling.get_sigmas_karras,
                 'exponential': kd.sampling.get_sigmas_exponential, 'Beta': a1111_beta_scheduler,
                 'SGM Uniform': a1111_sgm_uniform}
    sigma_min, sigma_max = model_range(schedule)
    if scheduler_name is None:
        sigmas = inner.get_sigmas(steps)
    else:
        kwargs = {'sigma_min': sigma_min, 'sigma_max': sigma_max}
        if scheduler_name in ('Beta', 'SGM Uniform'):
            kwargs['inner_model'] = inner
        sigmas = functions[scheduler_name](n=steps, **kwargs, device='cpu')
    if discard_next_to_last_sigma:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


@pytest.mark.parametrize(("sampler", "schedule_label"), [
    ("Euler", "Automatic"), ("DPM++ 2M", "Automatic"), ("DPM2 a", "Automatic"), ("DPM++ 3M SDE", "Automatic"),
    ("DPM++ 2M SDE Heun", "Automatic"), ("DPM2", "Beta"), ("Euler a", "Karras"), ("DPM++ 3M SDE", "SGM Uniform"),
])
def test_a1111_sigmas_follow_a1111s_get_sigmas(sampler, schedule_label):
    kd = load_kdiffusion()
    schedule = SCHEDULES["sd"]
    options = {label: opts for label, _, _, opts in A1111_SAMPLERS}[sampler]
    expected = a1111_get_sigmas(kd, options, schedule, 20, schedule_label)
    got = st.a1111_sigmas(sampler, 20, schedule, schedule_label)
    assert len(got) == 21
    assert_grid(got, expected, f"{sampler} / {schedule_label}")
    with pytest.raises(SdtorchError, match="unknown A1111 sampler 'Euler b'; accepted: DPM\\+\\+ 2M, "):
        st.a1111_sigmas("Euler b", 20, schedule)
