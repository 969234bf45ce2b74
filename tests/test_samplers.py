"""Samplers against the diffusers schedulers of the same methods, built from SD 1.5's scheduler config.

Both sides run a full loop with the same deterministic toy eps-model, the same starting noise and,
for stochastic samplers, generators with the same seed; final latents must agree within 1e-4.
"""

import inspect
import json

import diffusers
import pytest
import torch
from oracles import SCHEDULER_CONFIG

from sdtorch.diffusion import Denoiser, NoiseSchedule
from sdtorch.errors import SdtorchError
from sdtorch.progress import StepProgress
from sdtorch.request import GenerationRequest
from sdtorch.samplers import SAMPLERS, GeneratorNoise, a1111_name, sample

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
CONFIG = json.loads(SCHEDULER_CONFIG.read_text())

REFERENCE = {  # name -> (diffusers class, extra options)
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}
TOL = 1e-4
SHAPE = (2, 4, 8, 8)


def field(shape=SHAPE) -> torch.Tensor:
    """A fixed smooth field the toy model adds, so eps is not a function of x alone."""
    g = torch.linspace(-1, 1, shape[-1])
    return (
        0.05
        * torch.sin(3 * g)[None, None, None, :]
        * torch.cos(2 * g)[None, None, :, None]
        * torch.arange(1, shape[1] + 1).view(1, -1, 1, 1)
    )


FIELD = field()


def _abar(t: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in for SD's alpha-bar at (fractional) t: exp(-integral of the scaled-linear betas)."""
    r0, r1 = 0.00085**0.5, 0.012**0.5
    k = (r1 - r0) / 999
    return torch.exp(-((r0 + k * t) ** 3 - r0**3) / (3 * k))


def toy_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A stand-in UNet, nonlinear in x and t: roughly the ideal eps for unit-variance data, perturbed."""
    t = torch.as_tensor(t, dtype=torch.float64)
    c = (1 - _abar(t)).sqrt()
    wobble = 0.3 * torch.tanh(x) * torch.cos(t / 300) + 0.2 * torch.sin(t / 23) * torch.tanh(2 * x)
    return (c * (x + wobble) + FIELD * (1 + torch.sin(t / 37))).float()


def reference_scheduler(name: str, karras: bool):
    cls_name, opts = REFERENCE[name]
    if karras:
        opts = {**opts, "use_karras_sigmas": True}
    return getattr(diffusers, cls_name).from_config(CONFIG, **opts)


def reference_sample(
    name, noise, steps, *, karras=False, eta=0.0, seed=None, init_latents=None, strength=1.0
):
    """The loop of diffusers' StableDiffusion(Img2Img)Pipeline with the toy model and no guidance."""
    scheduler = reference_scheduler(name, karras)
    scheduler.set_timesteps(steps)
    generator = generators(seed)
    timesteps = scheduler.timesteps
    if init_latents is None:
        latents = noise * scheduler.init_noise_sigma
    else:  # StableDiffusionImg2ImgPipeline.get_timesteps and prepare_latents
        init_timestep = min(int(steps * strength), steps)
        t_start = max(steps - init_timestep, 0)
        timesteps = scheduler.timesteps[t_start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        latents = scheduler.add_noise(init_latents, noise, timesteps[:1])
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    for t in timesteps:
        eps = toy_eps(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(eps, t, latents, **kwargs).prev_sample
    return latents


def generators(seed):
    """A seeded generator, or one per batch item for a list of seeds."""
    if seed is None:
        return None
    if isinstance(seed, list):
        return [torch.Generator().manual_seed(s) for s in seed]
    return torch.Generator().manual_seed(seed)


SD_SCHEDULE = NoiseSchedule.from_betas(CONFIG["beta_start"], CONFIG["beta_end"], CONFIG["num_train_timesteps"])


def run(name, noise, steps, *, seed=None, callback=None, **kw):
    """Our sampler over the toy model, its per-step noise from the seeded generator(s)."""
    return sample(
        name, Denoiser(toy_eps, SD_SCHEDULE), noise, steps, noise_source=GeneratorNoise(noise, generators(seed)),
        callback=callback, **kw,
    )


def ours(
    name, noise, steps, *, karras=False, eta=0.0, seed=None, init_latents=None, strength=1.0, callback=None
):
    """`run` with the step events unpacked as (step, total, sigma, x, denoised) for the checks below."""
    unpack = None if callback is None else (lambda e: callback(e.step, e.total, e.sigma, e.x, e.denoised))
    return run(
        name, noise, steps, schedule="karras" if karras else "uniform", eta=eta, seed=seed,
        init_latents=init_latents, strength=strength, callback=unpack,
    )


def noise_for(seed=0, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def max_diff(name, steps, **kw) -> float:
    noise = noise_for(steps)
    if SAMPLERS[name].stochastic or kw.get("eta"):
        kw.setdefault("seed", 7)
    return (ours(name, noise, steps, **kw) - reference_sample(name, noise, steps, **kw)).abs().max().item()


def karras_cases():
    return [
        (n, k) for n, info in SAMPLERS.items() for k in ([False, True] if info.supports_karras else [False])
    ]


@pytest.mark.parametrize("name,karras", karras_cases())
def test_txt2img_matches_diffusers(name, karras):
    diff = max_diff(name, 10, karras=karras)
    print(f"{name} karras={karras} steps=10 max|diff|={diff:.2e}")
    assert diff <= TOL


ODD_CASES = [(n, False, 7) for n in SAMPLERS] + [
    ("euler", True, 7),
    ("dpm2", True, 7),
    ("dpmpp_2m", True, 7),
    ("unipc", True, 7),
    ("dpmpp_2m", True, 25),
    ("dpmpp_2m_sde", False, 25),
    ("unipc", False, 25),
    ("lms", True, 25),
    ("pndm", False, 3),
    ("heun", False, 2),
    ("dpm2", False, 2),
    ("unipc", False, 1),
    ("euler", True, 1),
]


@pytest.mark.parametrize("name,karras,steps", ODD_CASES)
def test_other_step_counts_match_diffusers(name, karras, steps):
    diff = max_diff(name, steps, karras=karras)
    print(f"{name} karras={karras} steps={steps} max|diff|={diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m_sde", "ddpm", "ddim"])
def test_generator_per_batch_item_matches_diffusers(name):
    diff = max_diff(name, 6, seed=[11, 12], eta=0.5 if name == "ddim" else 0.0)
    print(f"{name} one generator per batch item max|diff|={diff:.2e}")
    assert diff <= TOL


def test_ddim_eta_matches_diffusers():
    diff = max_diff("ddim", 10, eta=0.7)
    print(f"ddim eta=0.7 max|diff|={diff:.2e}")
    assert diff <= TOL


IMG2IMG_CASES = [(n, 10, 0.6) for n in SAMPLERS] + [
    ("pndm", 4, 0.75),  # the slice starts on PLMS's repeated timestep
    ("dpmpp_2m", 25, 0.3),
    ("lms", 25, 0.5),
    ("heun", 7, 1.0),
    ("euler", 10, 1.0),
]


@pytest.mark.parametrize("name,steps,strength", IMG2IMG_CASES)
def test_img2img_matches_diffusers(name, steps, strength):
    init = 0.8 * noise_for(100 + steps)
    diff = max_diff(name, steps, init_latents=init, strength=strength)
    print(f"{name} img2img steps={steps} strength={strength} max|diff|={diff:.2e}")
    assert diff <= TOL


def reference_trajectory(name, noise, steps):
    """The latents after each diffusers step, in the scale the VAE decodes, and the sigma they are at."""
    scheduler = reference_scheduler(name, False)
    scheduler.set_timesteps(steps)
    latents, out = noise * scheduler.init_noise_sigma, []
    sigmas = getattr(scheduler, "sigmas", None)
    for i, t in enumerate(scheduler.timesteps):
        latents = scheduler.step(toy_eps(scheduler.scale_model_input(latents, t), t), t, latents).prev_sample
        out.append(latents if name in ("dpmpp_2m", "unipc") else latents / (sigmas[i + 1] ** 2 + 1) ** 0.5)
    return out, [float(s) for s in sigmas[1:]]


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_callback_reports_vae_scale_latents(name):
    calls, noise = [], noise_for(9)
    ours(name, noise, 8, callback=lambda *a: calls.append(a))
    want, sigmas = reference_trajectory(name, noise, 8)
    assert len(calls) == 8
    for (_step, _total, sigma, x, _denoised), x_ref, sigma_ref in zip(calls, want, sigmas):
        assert (x - x_ref).abs().max().item() <= TOL
        assert sigma == pytest.approx(sigma_ref, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_once_per_step(name):
    calls = []
    steps, noise = 6, noise_for(6)
    out = ours(name, noise, steps, seed=1, callback=lambda *args: calls.append(args))
    assert [c[0] for c in calls] == list(range(steps))
    assert all(c[1] == steps for c in calls)
    *_, sigma, x, denoised = calls[-1]
    assert torch.equal(x, out) and sigma == pytest.approx(0.0, abs=0.03)
    assert all(isinstance(c[2], float) and c[4].shape == noise.shape for c in calls)
    sigmas = [c[2] for c in calls]
    assert sigmas == sorted(sigmas, reverse=True)
    # the last denoised estimate is close to where the sampler lands
    assert (denoised - out).abs().max().item() < 0.5


def test_callback_img2img_counts_steps_run():
    calls = []
    ours(
        "euler",
        noise_for(0),
        10,
        init_latents=noise_for(1),
        strength=0.6,
        callback=lambda *a: calls.append(a),
    )
    assert [(c[0], c[1]) for c in calls] == [(i, 6) for i in range(6)]


def test_progress_bar_runs(capsys):
    with StepProgress(GenerationRequest(sampler="heun")) as bar:
        out = run("heun", noise_for(), 2, callback=bar.chain(None))
    assert out.shape == SHAPE
    assert "Heun" in capsys.readouterr().err and bar.bar.n == 2  # the bar is drawn by the caller


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(SdtorchError, match="dpmpp_2m_sde") as err:
        run("k_euler", noise_for(), 5)
    assert all(name in str(err.value) for name in SAMPLERS)


def test_karras_on_ddim_is_refused():
    with pytest.raises(SdtorchError, match="euler") as err:
        run("ddim", noise_for(), 5, schedule="karras")
    assert all(n in str(err.value) for n, info in SAMPLERS.items() if info.supports_karras)
    with pytest.raises(SdtorchError):
        a1111_name("euler_a", "karras")


def test_bad_arguments_are_refused():
    with pytest.raises(SdtorchError, match="eta"):
        run("euler", noise_for(), 5, eta=0.5)
    with pytest.raises(SdtorchError, match="strength"):
        run("euler", noise_for(), 5, init_latents=noise_for(), strength=0.1)
    with pytest.raises(SdtorchError, match="strength"):
        run("euler", noise_for(), 5, init_latents=noise_for(), strength=1.5)
    with pytest.raises(SdtorchError, match="steps"):
        run("euler", noise_for(), 0)
    with pytest.raises(SdtorchError, match="unknown schedule type 'kerras'; accepted: uniform, karras"):
        run("euler", noise_for(), 5, schedule="kerras")


def test_a1111_names():
    assert a1111_name("dpmpp_2m", "karras") == "DPM++ 2M Karras"
    assert a1111_name("euler_a") == "Euler a"
    assert a1111_name("dpmpp_2m_sde", "karras") == "DPM++ 2M SDE Karras"
    assert a1111_name("pndm") == "PLMS"
    assert a1111_name("dpmpp_2m", "automatic") == "DPM++ 2M Karras"  # A1111's default for it
    assert a1111_name("euler", "automatic") == "Euler"
    assert [i.display_name for i in SAMPLERS.values()] == [
        "DDIM",
        "PLMS",
        "LMS",
        "Euler",
        "Euler a",
        "Heun",
        "DPM2",
        "DPM++ 2M",
        "DPM++ 2M SDE",
        "UniPC",
        "DDPM",
    ]


def test_stochastic_samplers_follow_the_generator():
    noise = noise_for(8)
    for name in ("euler_a", "dpmpp_2m_sde", "ddpm"):
        a, b, c = (ours(name, noise, 5, seed=s) for s in (1, 1, 2))
        assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 20])
def test_timestep_spacing_of_a_scheduler_config_matches_diffusers(spacing, steps):
    """A model whose scheduler config names its `timestep_spacing` (SDXL's: 'leading') gets diffusers'
    timesteps and sigmas for it, in every scheduler family the sigma samplers match."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        LMSDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    from sdtorch.samplers.schedules import sigma_grid, spaced_timesteps

    config = json.loads(SCHEDULER_CONFIG.read_text()) | {"timestep_spacing": spacing}
    schedule = NoiseSchedule.from_betas(spacing=spacing)
    for kind, solver in ((EulerDiscreteScheduler, False), (EulerAncestralDiscreteScheduler, False),
                         (LMSDiscreteScheduler, False), (DPMSolverMultistepScheduler, True),
                         (UniPCMultistepScheduler, True)):
        ref = kind.from_config(config)
        ref.set_timesteps(steps)
        ours = spaced_timesteps(spacing, steps, 1000, solver=solver)
        assert torch.equal(ours.double(), torch.as_tensor(ref.timesteps).double()), kind.__name__
        if not solver:
            grid = sigma_grid(schedule, ours)
            assert torch.allclose(grid.sigmas.double(), torch.as_tensor(ref.sigmas).double(), rtol=1e-6), kind.__name__
