"""A1111's samplers (sdtorch.samplers.kdiffusion_samplers) against k-diffusion 0.0.16, the version A1111 pins.

Both sides run a whole loop with the same toy VE denoiser, the same starting latents and the same noise: one
seeded generator replayed on each side (k-diffusion's `torch.randn_like` draws, for Euler/Heun churn, Restart
and LCM, are routed to it as A1111 routes them to its generators), or for the Brownian samplers k-diffusion's
own BrownianTreeNoiseSampler against ours, seeded per batch item as A1111 seeds them. Final latents must agree
within 1e-4 on a Karras and a uniform grid, batch of 2.

The oracle is the real k-diffusion package, installed without its dependencies (its metadata pulls torchvision,
wandb, clip and a CUDA build of torch, none of which sampling.py needs):

    pip install --no-deps k-diffusion==0.0.16     # torchsde (ours too) and torchdiffeq come with the dev extras

`load_kdiffusion` imports its sampling.py and external.py from the installed files under a private package
name, so the package `__init__` (which imports all of the above) never runs; utils.py's one unused import,
torchvision's transforms.functional, is given a stub module while it loads. Restart and LCM are A1111's own
code, not in k-diffusion: their oracles are transcriptions of A1111's functions below, marked as such.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from oracles import load_kdiffusion

from sdtorch.diffusion import NoiseSchedule
from sdtorch.samplers import kdiffusion_samplers as ks
from sdtorch.samplers.schedule_types import karras, uniform

# torchsde warns when k-diffusion's BrownianTreeNoiseSampler queries an end an fp32 rounding past its tree's
pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")
TOL = 1e-4
SHAPE = (2, 4, 8, 8)
SCHEDULE = NoiseSchedule.from_betas()


# --- the toy model and the noise ------------------------------------------------------------------------


def _field(shape=SHAPE) -> torch.Tensor:
    g = torch.linspace(-1, 1, shape[-1])
    return 0.05 * torch.sin(3 * g) * torch.cos(2 * g)[:, None] * torch.arange(1, shape[1] + 1).view(-1, 1, 1)


FIELD = _field()


def toy_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A stand-in UNet, nonlinear in x and t: roughly the ideal eps for unit-variance data, perturbed (fp64)."""
    c = (1 - torch.exp(-(t + 1) / 250)).sqrt()
    wobble = 0.3 * torch.tanh(x) * torch.cos(t / 300) + 0.2 * torch.sin(t / 23) * torch.tanh(2 * x)
    return c * (x + wobble) + FIELD.double() * (1 + torch.sin(t / 37))


def toy_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """D(x, s) = x - s * eps(x / sqrt(s^2 + 1), t(s)) in fp64, returned in fp32; sigma 0-dim (ours) or one per
    batch item (k-diffusion's), the same numbers either way."""
    s = (sigma.reshape(-1, *[1] * (x.ndim - 1)) if sigma.ndim else sigma).double()
    x = x.double()
    return (x - s * toy_eps(x / (s**2 + 1) ** 0.5, SCHEDULE.sigma_to_t(s))).float()


class SeqNoise:
    """Standard normal draws from one seeded generator, in call order (an A1111 image's generator)."""

    def __init__(self, seed: int, shape=SHAPE):
        self.generator = torch.Generator().manual_seed(seed)
        self.shape = shape
        self.calls = 0

    def __call__(self, sigma=None, sigma_next=None) -> torch.Tensor:
        self.calls += 1
        return torch.randn(self.shape, generator=self.generator)


class _TorchDrawingFrom:
    """`torch` for k-diffusion's sampling module with randn_like drawn from a noise source (A1111's TorchHijack)."""

    def __init__(self, noise):
        self._noise = noise

    def randn_like(self, x):
        return self._noise()

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def randn_like_from(kd, noise):
    saved = kd.sampling.torch
    kd.sampling.torch = _TorchDrawingFrom(noise)
    try:
        yield
    finally:
        kd.sampling.torch = saved


# --- A1111's samplers that are not in k-diffusion, transcribed ----------------------------------------


def a1111_restart_sampler(kd, model, x, sigmas, s_noise=1.0, restart_list=None):
    """TRANSCRIPTION of A1111 v1.10 modules/sd_samplers_extra.py restart_sampler (callback/tqdm dropped), using
    k-diffusion's get_sigmas_karras and to_d and its (routed) torch.randn_like, as A1111 does."""
    s_in = x.new_ones([x.shape[0]])
    to_d, get_sigmas_karras = kd.sampling.to_d, kd.sampling.get_sigmas_karras

    def heun_step(x, old_sigma, new_sigma, second_order=True):
        denoised = model(x, old_sigma * s_in)
        d = to_d(x, old_sigma, denoised)
        dt = new_sigma - old_sigma
        if new_sigma == 0 or not second_order:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, new_sigma * s_in)
            d_2 = to_d(x_2, new_sigma, denoised_2)
            d_prime = (d + d_2) / 2
            x = x + d_prime * dt
        return x

    steps = sigmas.shape[0] - 1
    if restart_list is None:
        if steps >= 20:
            restart_steps = 9
            restart_times = 1
            if steps >= 36:
                restart_steps = steps // 4
                restart_times = 2
            sigmas = get_sigmas_karras(steps - restart_steps * restart_times, sigmas[-2].item(), sigmas[0].item(),
                                       device=sigmas.device)
            restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
        else:
            restart_list = {}
    restart_list = {int(torch.argmin(abs(sigmas - key), dim=0)): value for key, value in restart_list.items()}
    step_list = []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restart_list:
            restart_steps, restart_times, restart_max = restart_list[i + 1]
            min_idx = i + 1
            max_idx = int(torch.argmin(abs(sigmas - restart_max), dim=0))
            if max_idx < min_idx:
                sigma_restart = get_sigmas_karras(restart_steps, sigmas[min_idx].item(), sigmas[max_idx].item(),
                                                  device=sigmas.device)[:-1]
                while restart_times > 0:
                    restart_times -= 1
                    step_list.extend(zip(sigma_restart[:-1], sigma_restart[1:]))
    last_sigma = None
    for old_sigma, new_sigma in step_list:
        if last_sigma is None:
            last_sigma = old_sigma
        elif last_sigma < old_sigma:
            x = x + kd.sampling.torch.randn_like(x) * s_noise * (old_sigma**2 - last_sigma**2) ** 0.5
        x = heun_step(x, old_sigma, new_sigma)
        last_sigma = new_sigma
    return x, len(step_list)


def a1111_sample_lcm(kd, model, x, sigmas, noise_sampler):
    """TRANSCRIPTION of A1111 v1.10 modules/sd_samplers_lcm.py sample_lcm (callback/tqdm dropped)."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        x = denoised
        if sigmas[i + 1] > 0:
            x += sigmas[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


# --- the cases --------------------------------------------------------------------------------------------

CHURN = {"s_churn": 1.0, "s_tmin": 0.05, "s_tmax": 10.0, "s_noise": 1.003}
# (our function, options, how k-diffusion draws its noise: "randn" routed torch.randn_like, "sampler" a
#  noise_sampler argument, "brownian" a BrownianTreeNoiseSampler vs ours, "range" for DPM fast/adaptive)
CASES = {
    "euler": ("sample_euler", {}, "randn"),
    "euler_churn": ("sample_euler", CHURN, "randn"),
    "heun": ("sample_heun", {}, "randn"),
    "heun_churn": ("sample_heun", CHURN, "randn"),
    "dpm_2_churn": ("sample_dpm_2", CHURN, "randn"),
    "euler_ancestral": ("sample_euler_ancestral", {}, "sampler"),
    "euler_ancestral_eta": ("sample_euler_ancestral", {"eta": 0.7, "s_noise": 0.9}, "sampler"),
    "dpm_2_ancestral": ("sample_dpm_2_ancestral", {}, "sampler"),
    "dpm_2_ancestral_eta": ("sample_dpm_2_ancestral", {"eta": 0.5}, "sampler"),
    "dpmpp_2s_ancestral": ("sample_dpmpp_2s_ancestral", {}, "sampler"),
    "dpmpp_2s_ancestral_eta": ("sample_dpmpp_2s_ancestral", {"eta": 0.4, "s_noise": 1.1}, "sampler"),
    "dpmpp_sde": ("sample_dpmpp_sde", {}, "brownian"),
    "dpmpp_sde_options": ("sample_dpmpp_sde", {"eta": 0.6, "r": 0.4}, "sampler"),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", {}, "brownian"),
    "dpmpp_2m_sde_heun": ("sample_dpmpp_2m_sde", {"solver_type": "heun"}, "brownian"),
    "dpmpp_2m_sde_eta": ("sample_dpmpp_2m_sde", {"eta": 0.5, "s_noise": 0.95}, "sampler"),
    "dpmpp_2m_sde_ode": ("sample_dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}, "sampler"),
    "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", {}, "brownian"),
    "dpmpp_3m_sde_eta": ("sample_dpmpp_3m_sde", {"eta": 0.5}, "sampler"),
    "dpm_fast": ("sample_dpm_fast", {}, "range"),
    "dpm_fast_eta": ("sample_dpm_fast", {"eta": 1.0}, "range"),  # A1111 passes eta (default 1) to DPM fast
    "dpm_adaptive": ("sample_dpm_adaptive", {}, "range"),
    "dpm_adaptive_eta": ("sample_dpm_adaptive", {"eta": 1.0}, "range"),
    "dpm_adaptive_order2": ("sample_dpm_adaptive", {"order": 2, "rtol": 0.02}, "range"),
}
STEPS = 12


def grid(kind: str, steps: int = STEPS) -> torch.Tensor:
    return karras(steps, SCHEDULE) if kind == "karras" else uniform(steps, SCHEDULE)


def start(sigmas: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * sigmas[0]


def run_ours(name, x, sigmas, noise, **options):
    events = []
    out = getattr(ks, name)(toy_denoiser, x, sigmas, noise=noise, callback=lambda *e: events.append(e), **options)
    return out, events


def run_reference(kd, name, x, sigmas, noise, kind, **options):
    fn = getattr(kd.sampling, name)
    if kind == "randn":
        with randn_like_from(kd, noise):
            return fn(toy_denoiser, x, sigmas, disable=True, **options)
    if kind == "range":
        positive = sigmas[sigmas > 0]
        args = (positive[-1].item(), sigmas[0].item()) + ((len(sigmas) - 1,) if name == "sample_dpm_fast" else ())
        return fn(toy_denoiser, x, *args, disable=True, noise_sampler=noise, **options)
    return fn(toy_denoiser, x, sigmas, disable=True, noise_sampler=noise, **options)


@pytest.mark.parametrize("grid_kind", ["karras", "uniform"])
@pytest.mark.parametrize("case", list(CASES))
def test_sampler_equals_kdiffusion(case, grid_kind):
    kd = load_kdiffusion()
    name, options, kind = CASES[case]
    sigmas = grid(grid_kind)
    x = start(sigmas)
    if kind == "brownian":
        seeds = [1234, 98765]  # A1111: the images' own seeds
        ref_noise = kd.sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seeds)
        our_noise = ks.BrownianTreeNoise.over(x, sigmas, seeds)
    else:
        ref_noise, our_noise = SeqNoise(7), SeqNoise(7)
    expected = run_reference(kd, name, x, sigmas, ref_noise, kind, **options)
    got, events = run_ours(name, x, sigmas, our_noise, **options)
    diff = (got - expected).abs().max().item()
    assert diff < TOL, f"{case} on a {grid_kind} grid: max |ours - k-diffusion {kd.version}| = {diff:.2e}"
    assert torch.isfinite(got).all() and got.shape == x.shape
    if kind != "brownian":  # the same number of draws, so the generators end where A1111's do
        assert our_noise.calls == ref_noise.calls
    assert events and torch.equal(events[-1][2], got)  # the last callback carries the result
    if kind != "range":
        assert len(events) == len(sigmas) - 1
        assert [e[0] for e in events] == list(range(len(sigmas) - 1))
        assert torch.equal(torch.stack([e[1] for e in events]), sigmas[1:])


def test_samplers_differ_from_each_other():
    """The comparisons above can fail: different samplers (and seeds) give clearly different latents."""
    sigmas = grid("karras")
    x = start(sigmas)
    a = run_ours("sample_dpmpp_2s_ancestral", x, sigmas, SeqNoise(7))[0]
    b = run_ours("sample_dpmpp_2s_ancestral", x, sigmas, SeqNoise(8))[0]
    c = run_ours("sample_euler", x, sigmas, SeqNoise(7))[0]
    d = run_ours("sample_dpmpp_2m_sde", x, sigmas, SeqNoise(7), solver_type="heun")[0]
    e = run_ours("sample_dpmpp_2m_sde", x, sigmas, SeqNoise(7))[0]
    assert (a - b).abs().max() > 1e-2 and (a - c).abs().max() > 1e-2 and (d - e).abs().max() > 1e-4


@pytest.mark.parametrize("grid_kind", ["karras", "uniform"])
@pytest.mark.parametrize("steps", [12, 24, 40])  # < 20: plain Heun; >= 20: one restart; >= 36: two
def test_restart_equals_a1111(grid_kind, steps):
    kd = load_kdiffusion()
    sigmas = grid(grid_kind, steps)
    x = start(sigmas)
    ref_noise, our_noise = SeqNoise(3), SeqNoise(3)
    with randn_like_from(kd, ref_noise):
        expected, n_steps = a1111_restart_sampler(kd, toy_denoiser, x, sigmas, s_noise=1.01)
    got, events = run_ours("sample_restart", x, sigmas, our_noise, s_noise=1.01)
    diff = (got - expected).abs().max().item()
    assert diff < TOL, f"restart, {steps} {grid_kind} steps: max |ours - A1111| = {diff:.2e}"
    assert len(events) == n_steps and our_noise.calls == ref_noise.calls == (0 if steps < 20 else 1 if steps < 36
                                                                               else 2)


def test_restart_with_a_restart_list():
    kd = load_kdiffusion()
    sigmas = grid("karras", 15)
    x = start(sigmas)
    restart_list = {0.5: [4, 2, 3.0]}
    ref_noise, our_noise = SeqNoise(5), SeqNoise(5)
    with randn_like_from(kd, ref_noise):
        expected, _ = a1111_restart_sampler(kd, toy_denoiser, x, sigmas, restart_list=restart_list)
    got, _ = run_ours("sample_restart", x, sigmas, our_noise, restart_list=restart_list)
    assert (got - expected).abs().max().item() < TOL and our_noise.calls == ref_noise.calls == 2


@pytest.mark.parametrize("grid_kind", ["karras", "uniform"])
def test_lcm_equals_a1111(grid_kind):
    kd = load_kdiffusion()
    sigmas = grid(grid_kind, 6)
    x = start(sigmas)
    expected = a1111_sample_lcm(kd, toy_denoiser, x, sigmas, SeqNoise(9))
    got, events = run_ours("sample_lcm", x, sigmas, SeqNoise(9))
    assert (got - expected).abs().max().item() < TOL and len(events) == 6


# --- Brownian-tree noise ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [42, [42, 7]])
def test_brownian_tree_noise_equals_kdiffusion(seed):
    """The same increments as k-diffusion's BrownianTreeNoiseSampler, for one seed or one per batch item,
    queried down a grid and back up."""
    kd = load_kdiffusion()
    sigmas = grid("karras")
    x = start(sigmas)
    ref = kd.sampling.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seed=seed)
    ours = ks.BrownianTreeNoise(x, sigmas[-2], sigmas[0], seed)
    queries = list(zip(sigmas[:-2], sigmas[1:-1])) + [(sigmas[3], sigmas[1]), (sigmas[5], sigmas[2])]
    for a, b in queries:
        expected, got = ref(a, b), ours(a, b)
        assert got.shape == x.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_brownian_noise_per_item_does_not_depend_on_the_batch():
    sigmas = grid("karras")
    x = start(sigmas)
    batch = ks.BrownianTreeNoise.over(x, sigmas, [5, 6])(sigmas[2], sigmas[3])
    alone = ks.BrownianTreeNoise.over(x[1:], sigmas, [6])(sigmas[2], sigmas[3])
    torch.testing.assert_close(batch[1:], alone, rtol=0, atol=1e-6)
    assert (batch[0] - batch[1]).abs().max() > 0.1
    with pytest.raises(ValueError, match="3 seeds for a batch of 2"):
        ks.BrownianTreeNoise(x, sigmas[-2], sigmas[0], [1, 2, 3])
