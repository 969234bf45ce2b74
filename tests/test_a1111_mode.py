"""A1111 mode (`compat="a1111"`) against an independent reimplementation of AUTOMATIC1111's sampling path.

The reference is built here from other people's code on the same random weights: diffusers' UNet and VAE and
transformers' CLIP text encoder (written by `make_diffusers_folder`, which our pipeline loads), k-diffusion
0.0.16's own `CompVisDenoiser` over a model holding the schedule as CompVis computes it (fp64 betas, fp32
alphas_cumprod, numpy), A1111's CFGDenoiser (cond and uncond in one batch, guidance on the denoised output),
k-diffusion's sigma grids and sampler functions, and A1111's random numbers (rng.py: a generator per image seeded
seed + i, its first draw the start `x * sigmas[0]`, reseeded with seed + ENSD, k-diffusion's `torch.randn_like`
answered by each image's next draw as A1111's TorchHijack does; Brownian-tree noise seeded with the image
seeds), img2img as sd_samplers_kdiffusion.sample_img2img (t_enc = int(min(strength, 0.999) * steps), the
schedule's tail) and the 8-bit conversion by truncation. Pictures must agree within 2 levels per pixel.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from oracles import load_kdiffusion, make_diffusers_folder, reference_tokenizer
from PIL import Image

from sdtorch.config import TINY
from sdtorch.loading import load_model
from sdtorch.pipeline import Pipeline
from sdtorch.samplers.philox import PhiloxGenerator

pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning", "ignore::FutureWarning")
PROMPT, NEGATIVE = "a large red circle on the left on a blue background", "blurry"
SIZE, STEPS, CFG = 32, 8, 6.0
F = 2 ** (len(TINY.vae.channel_mult) - 1)  # pixels per latent pixel of the tiny VAE
SCALE = 0.18215  # v1-inference.yaml scale_factor


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-a1111")
    unet, vae, text = make_diffusers_folder(folder)
    components = dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text.eval(),
                      tokenizer=reference_tokenizer(folder / "tokenizer"))
    return Pipeline(load_model(folder)), components


# --- the reference: A1111's path from k-diffusion, diffusers and transformers ------------------------------


class CompVisModel(torch.nn.Module):
    """What k-diffusion's CompVisDenoiser wraps in A1111: LatentDiffusion's `alphas_cumprod` buffer (computed by
    CompVis in fp64, stored fp32) and `apply_model(x, t, cond)`, here diffusers' UNet."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32))

    def apply_model(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=cond).sample


class ImageGenerators:
    """A1111's ImageRNG with CPU or NV generators: first() the start noise, then each call the next draws."""

    def __init__(self, seeds, shape, rng="cpu", ensd=0):
        self.seeds, self.shape, self.rng, self.ensd = seeds, shape, rng, ensd
        self.generators = [self._generator(s) for s in seeds]

    def _generator(self, seed):
        return torch.Generator().manual_seed(seed) if self.rng == "cpu" else PhiloxGenerator(seed)

    def _draw(self, g):
        return torch.randn(self.shape, generator=g) if self.rng == "cpu" else g.randn(self.shape)

    def first(self):
        x = torch.stack([self._draw(g) for g in self.generators])
        if self.ensd:
            self.generators = [self._generator(s + self.ensd) for s in self.seeds]
        return x

    def next(self):
        return torch.stack([self._draw(g) for g in self.generators])


class _TorchHijack:
    """A1111's TorchHijack: k-diffusion's `torch`, with randn_like answered by the image generators."""

    def __init__(self, rng):
        self.rng = rng

    def randn_like(self, x):
        return self.rng.next()

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def hijacked(kd, rng):
    saved = kd.sampling.torch
    kd.sampling.torch = _TorchHijack(rng)
    try:
        yield
    finally:
        kd.sampling.torch = saved


def reference_contexts(components, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' CLIP on PROMPT and NEGATIVE, padded to 77 as A1111 pads them, repeated for the batch."""
    tok, text = components["tokenizer"], components["text_encoder"]

    def encode(prompt):
        ids = tok([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return text(ids)[0].repeat(batch, 1, 1)

    return encode(PROMPT), encode(NEGATIVE)


def reference_images(vae, latents) -> list[Image.Image]:
    """diffusers' VAE decode, then A1111's 8-bit conversion (truncation)."""
    images = ((vae.decode(latents / SCALE).sample + 1.0) / 2.0).clamp(0, 1)
    pixels = (255.0 * images.permute(0, 2, 3, 1).numpy()).astype(np.uint8)
    return [Image.fromarray(p) for p in pixels]


@torch.no_grad()
def a1111_reference(components, function, *, seeds, schedule="uniform", discard=False, brownian=False,
                    rng="cpu", ensd=0, init_image=None, strength=None, extra=None):
    kd = load_kdiffusion()
    unet, vae = components["unet"], components["vae"]
    batch = len(seeds)
    cond, uncond = reference_contexts(components, batch)
    denoiser = kd.external.CompVisDenoiser(CompVisModel(unet), quantize=False)

    def cfg_model(x, sigma, **_):  # A1111's CFGDenoiser
        out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
        d_cond, d_uncond = out.chunk(2)
        return d_uncond + (d_cond - d_uncond) * CFG

    n = STEPS + 1 if discard else STEPS  # KDiffusionSampler.get_sigmas
    lo, hi = denoiser.sigmas[0].item(), denoiser.sigmas[-1].item()
    sigmas = {"uniform": lambda: denoiser.get_sigmas(n),
              "karras": lambda: kd.sampling.get_sigmas_karras(n=n, sigma_min=lo, sigma_max=hi),
              "exponential": lambda: kd.sampling.get_sigmas_exponential(n=n, sigma_min=lo, sigma_max=hi)}[schedule]()
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    generators = ImageGenerators(seeds, (4, SIZE // F, SIZE // F), rng, ensd)
    noise = generators.first()
    if init_image is None:
        sched, x = sigmas, noise * sigmas[0]
    else:
        pixels = torch.from_numpy(np.asarray(init_image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
        init = (vae.encode(pixels).latent_dist.mean * SCALE).repeat(batch, 1, 1, 1)
        t_enc = int(min(strength, 0.999) * STEPS)
        sched = sigmas[STEPS - t_enc - 1:]
        x = init + noise * sched[0]
    kwargs = dict(extra or {})
    if brownian:
        positive = sigmas[sigmas > 0]
        kwargs["noise_sampler"] = kd.sampling.BrownianTreeNoiseSampler(x, positive.min(), sigmas.max(), seed=seeds)
    with hijacked(kd, generators):
        latents = getattr(kd.sampling, function)(cfg_model, x, sched, disable=True, **kwargs)
    return latents, reference_images(vae, latents)


def ours(pipe, sampler, seeds, **kw):
    kw = dict(steps=STEPS) | kw
    return pipe.generate(PROMPT, negative_prompt=NEGATIVE, sampler=sampler, seed=seeds[0], batch=len(seeds),
                         cfg_scale=CFG, width=SIZE, height=SIZE, compat="a1111", progress=False, **kw)


def level_difference(a: list[Image.Image], b: list[Image.Image]) -> int:
    return max(int(np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max()) for x, y in zip(a, b))


def mid_tones(images: list[Image.Image]) -> float:
    """The share of pixel values strictly inside (0, 255): a comparison of saturated pictures proves nothing."""
    values = np.concatenate([np.asarray(im).ravel() for im in images])
    return float(((values > 0) & (values < 255)).mean())


def init_picture() -> Image.Image:
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


# sampler, k-diffusion function, our request extras, reference extras
TXT2IMG = [
    ("euler_a", "sample_euler_ancestral", dict(schedule="automatic", ensd=31337), dict(ensd=31337)),
    ("euler_a", "sample_euler_ancestral", dict(schedule="automatic", rng="nv"), dict(rng="nv")),
    ("dpmpp_2m", "sample_dpmpp_2m", dict(schedule="automatic"), dict(schedule="karras")),
    ("dpm2", "sample_dpm_2", dict(schedule="automatic"), dict(schedule="karras", discard=True)),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", dict(schedule="automatic"), dict(schedule="exponential", brownian=True)),
    ("dpmpp_2s_a", "sample_dpmpp_2s_ancestral", dict(schedule="uniform"), dict()),
]


@pytest.mark.parametrize("sampler, function, mine, theirs", TXT2IMG, ids=lambda v: v if isinstance(v, str) else "")
def test_txt2img_equals_a1111s_path(both, sampler, function, mine, theirs):
    pipe, components = both
    seeds = [11, 12]
    result = ours(pipe, sampler, seeds, **mine)
    ref_latents, ref_images = a1111_reference(components, function, seeds=seeds, **theirs)
    levels, latent_diff = level_difference(result.images, ref_images), (result.latents - ref_latents).abs().max()
    print(f"{sampler} {mine}: max level difference {levels}, max |latent diff| {latent_diff:.1e}, "
          f"mid-tones {mid_tones(ref_images):.0%}")
    assert mid_tones(ref_images) > 0.2
    assert levels <= 2


def test_img2img_equals_a1111s_path(both):
    pipe, components = both
    cases = (("euler_a", "sample_euler_ancestral", 0.6), ("dpmpp_2m", "sample_dpmpp_2m", 0.3))
    for sampler, function, strength in cases:
        schedule = "uniform" if sampler == "euler_a" else "karras"
        result = ours(pipe, sampler, [5], schedule=schedule, init_image=init_picture(), strength=strength)
        ref_latents, ref_images = a1111_reference(components, function, seeds=[5], schedule=schedule,
                                                  init_image=init_picture(), strength=strength)
        levels = level_difference(result.images, ref_images)
        print(f"img2img {sampler} strength {strength}: max level difference {levels}, "
              f"max |latent diff| {(result.latents - ref_latents).abs().max():.1e}, "
              f"mid-tones {mid_tones(ref_images):.0%}")
        assert mid_tones(ref_images) > 0.2
        assert levels <= 2


def test_the_comparison_can_fail(both):
    """The pictures depend on what is compared: another seed changes them by far more than 2 levels, and so does
    diffusers' img2img rule (int(steps * strength) steps, from a lower sigma) against A1111's (one step more)."""
    pipe, _ = both
    a, b = ours(pipe, "euler_a", [11]), ours(pipe, "euler_a", [99])
    assert level_difference(a.images, b.images) > 50
    kw = dict(negative_prompt=NEGATIVE, sampler="euler_a", seed=5, steps=STEPS, cfg_scale=CFG, width=SIZE,
              height=SIZE, init_image=init_picture(), strength=0.6, progress=False)
    default, a1111 = pipe.generate(PROMPT, **kw), pipe.generate(PROMPT, compat="a1111", **kw)
    levels = level_difference(default.images, a1111.images)
    print(f"img2img Euler a, strength 0.6: the default mode vs A1111 mode differ by {levels} levels")
    assert levels > 2


def test_an_a1111_mode_png_regenerates_byte_for_byte(tiny_checkpoint, tmp_path, capsys):
    from sdtorch import cli

    first, again = tmp_path / "first.png", tmp_path / "again.png"
    assert cli.main(["generate", "a red circle", "--model", str(tiny_checkpoint), "--compat", "a1111", "--sampler",
                     "dpmpp_sde", "--rng", "gpu", "--ensd", "31337", "--variation-seed", "9", "--variation-strength",
                     "0.3", "--seed-resize-from", "24x40", "--steps", "3", "--seed", "4", "--width", "32", "--height",
                     "32", "--out", str(first), "--quiet"]) == 0
    text = Image.open(first).info["parameters"]
    for said in ("Sampler: DPM++ SDE, Schedule type: Karras", "Variation seed: 9", "Variation seed strength: 0.3",
                 "Seed resize from: 24x40", "ENSD: 31337", "sdtorch mode: a1111"):
        assert said in text
    assert "RNG:" not in text  # GPU is A1111's default, which it does not write
    capsys.readouterr()
    assert cli.main(["generate", "--from-png", str(first), "--model", str(tiny_checkpoint), "--out", str(again),
                     "--quiet"]) == 0
    assert capsys.readouterr().err == ""  # nothing it cannot honour
    assert again.read_bytes() == first.read_bytes()


# --- DDIM and PLMS: A1111's own timestep samplers ------------------------------------------------------------


def a1111_grid(steps):
    """CompVisSampler.get_timesteps, as A1111 writes it: every 1000 // steps-th timestep from 1, clipped."""
    return [min(t + 1, 999) for t in range(0, 1000, 1000 // steps)]


@torch.no_grad()
def a1111_timestep_reference(components, sampler, *, seeds, steps=STEPS, eta=0.0, ensd=0, init_image=None,
                             strength=None):
    """A1111's DDIM / PLMS (sd_samplers_timesteps_impl) rebuilt on diffusers' DDIMScheduler / PNDMScheduler
    (skip_prk_steps: the same pseudo-improved-Euler warm start) stepping over A1111's grid, down to its lowest
    timestep and not beyond, with the CompVis alphas_cumprod, guidance on eps, and A1111's generators."""
    from diffusers import DDIMScheduler, PNDMScheduler

    unet, vae = components["unet"], components["vae"]
    batch = len(seeds)
    cond, uncond = reference_contexts(components, batch)
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                  set_alpha_to_one=False)
    scheduler = (DDIMScheduler(clip_sample=False, **common) if sampler == "ddim"
                 else PNDMScheduler(skip_prk_steps=True, **common))
    scheduler.set_timesteps(steps)
    scheduler.alphas_cumprod = CompVisModel(unet).alphas_cumprod  # the checkpoint's buffer, as A1111 reads it
    grid = a1111_grid(steps)
    generators = ImageGenerators(seeds, (4, SIZE // F, SIZE // F), "cpu", ensd)
    x = generators.first()
    top = len(grid) - 1
    if init_image is not None:
        pixels = torch.from_numpy(np.asarray(init_image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
        init = (vae.encode(pixels).latent_dist.mean * SCALE).repeat(batch, 1, 1, 1)
        t_enc = int(min(strength, 0.999) * steps)
        x = scheduler.add_noise(init, x, torch.tensor([grid[t_enc]]))
        top = t_enc - 1
    walk = grid[1 : top + 1][::-1]
    if sampler == "pndm":
        walk = walk[:2] + walk[1:] if len(walk) > 1 else walk + [walk[0] - 1000 // steps]
    scheduler.timesteps = torch.tensor(walk)

    def guided_eps(x, t):
        out = unet(torch.cat([x, x]), torch.tensor(float(t)), encoder_hidden_states=torch.cat([cond, uncond])).sample
        e_cond, e_uncond = out.chunk(2)
        return e_uncond + (e_cond - e_uncond) * CFG

    for t in scheduler.timesteps:
        eps = guided_eps(x, t)
        if sampler == "ddim":
            x = scheduler.step(eps, t, x, eta=eta, variance_noise=generators.next()).prev_sample
        else:
            x = scheduler.step(eps, t, x).prev_sample
    return x, reference_images(vae, x)


@pytest.mark.parametrize("sampler, steps, extra", [
    ("ddim", STEPS, {}), ("ddim", 7, {}), ("ddim", STEPS, dict(eta=0.5, ensd=31337)), ("pndm", STEPS, {}),
    ("pndm", 7, {}),
], ids=["ddim", "ddim-7-steps", "ddim-eta", "plms", "plms-7-steps"])
def test_ddim_and_plms_equal_a1111s_timestep_samplers(both, sampler, steps, extra):
    pipe, components = both
    seeds = [11, 12]
    result = ours(pipe, sampler, seeds, **{**extra, "steps": steps})
    ref_latents, ref_images = a1111_timestep_reference(components, sampler, seeds=seeds, steps=steps, **extra)
    levels, latent_diff = level_difference(result.images, ref_images), (result.latents - ref_latents).abs().max()
    print(f"{sampler} {steps} steps {extra}: max level difference {levels}, max |latent diff| {latent_diff:.1e}, "
          f"mid-tones {mid_tones(ref_images):.0%}")
    assert mid_tones(ref_images) > 0.2
    assert levels <= 2
    assert latent_diff < 1e-3


@pytest.mark.parametrize("sampler, strength", [("ddim", 0.6), ("pndm", 0.5)])
def test_ddim_and_plms_img2img_equal_a1111s(both, sampler, strength):
    pipe, components = both
    result = ours(pipe, sampler, [5], init_image=init_picture(), strength=strength)
    ref_latents, ref_images = a1111_timestep_reference(components, sampler, seeds=[5], init_image=init_picture(),
                                                       strength=strength)
    levels = level_difference(result.images, ref_images)
    print(f"img2img {sampler} strength {strength}: max level difference {levels}, "
          f"max |latent diff| {(result.latents - ref_latents).abs().max():.1e}")
    assert mid_tones(ref_images) > 0.2
    assert levels <= 2


@pytest.mark.parametrize("sampler", ["ddim", "pndm"])
def test_a1111s_timestep_samplers_are_not_diffusers(both, sampler):
    """The latent check above can fail: diffusers' DDIM / PLMS on the same noise (one step more, from timestep 1
    to abar_0, and diffusers' fp32 betas) lands elsewhere, if close in pixels."""
    pipe, _ = both
    kw = dict(negative_prompt=NEGATIVE, sampler=sampler, seed=11, steps=STEPS, cfg_scale=CFG, width=SIZE,
              height=SIZE, rng="cpu", progress=False)
    default, a1111 = pipe.generate(PROMPT, **kw), pipe.generate(PROMPT, compat="a1111", **kw)
    latents = (default.latents - a1111.latents).abs().max()
    print(f"{sampler}: the default mode vs A1111 mode: {level_difference(default.images, a1111.images)} levels, "
          f"latents {latents:.1e} apart")
    assert latents > 1e-2


def test_timestep_samplers_take_no_schedule_type_in_a1111_mode(both):
    from sdtorch.errors import SdtorchError

    pipe, _ = both
    with pytest.raises(SdtorchError, match="own timestep grid"):
        ours(pipe, "ddim", [1], schedule="karras")


# --- LCM: A1111's own denoiser -------------------------------------------------------------------------------


@torch.no_grad()
def a1111_lcm_reference(components, *, seeds, steps=STEPS):
    """A1111's LCM sampler (sd_samplers_lcm.py) rebuilt on k-diffusion's DiscreteEpsDDPMDenoiser: the model's
    alphas_cumprod at timesteps 19, 39, ..., 999, the UNet at the nearest of them, the consistency boundary
    condition (sigma_data 0.5, timestep x 10), guidance on its output, the grid of its own get_sigmas, and
    A1111's sample_lcm loop with the image generators' noise."""
    kd = load_kdiffusion()
    unet, vae = components["unet"], components["vae"]
    batch = len(seeds)
    cond, uncond = reference_contexts(components, batch)
    inner = CompVisModel(unet)

    class LCMDenoiser(kd.external.DiscreteEpsDDPMDenoiser):
        def __init__(self):
            super().__init__(inner, inner.alphas_cumprod[19::20].clone(), quantize=None)

        def sigma_to_t(self, sigma, quantize=None):
            return (sigma.log() - self.log_sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape) * 20 + 19

        def t_to_sigma(self, t):
            return super().t_to_sigma(torch.clamp(((t - 19) / 20).float(), min=0, max=len(self.sigmas) - 1))

        def get_eps(self, *args, **kwargs):
            return self.inner_model.apply_model(*args, **kwargs)

        def forward(self, x, sigma, **kwargs):
            c_out, c_in = [kd.sampling.utils.append_dims(v, x.ndim) for v in self.get_scalings(sigma)]
            eps = self.get_eps(x * c_in, self.sigma_to_t(sigma), **kwargs)
            scaled = kd.sampling.utils.append_dims(self.sigma_to_t(sigma), x.ndim) * 10.0
            c_skip, c_out2 = 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25) ** 0.5
            return c_out2 * (x + eps * c_out) + c_skip * x

    denoiser = LCMDenoiser()

    def cfg_model(x, sigma):
        out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
        d_cond, d_uncond = out.chunk(2)
        return d_uncond + (d_cond - d_uncond) * CFG

    start, end = denoiser.sigma_to_t(denoiser.sigma_max), denoiser.sigma_to_t(denoiser.sigma_min)
    sigmas = kd.sampling.append_zero(denoiser.t_to_sigma(torch.linspace(start, end, steps)))
    generators = ImageGenerators(seeds, (4, SIZE // F, SIZE // F))
    x = generators.first() * sigmas[0]
    s_in = x.new_ones([batch])
    for i in range(len(sigmas) - 1):  # A1111's sample_lcm
        x = cfg_model(x, sigmas[i] * s_in)
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * generators.next()
    return x, reference_images(vae, x)


def test_lcm_equals_a1111s_lcm_sampler(both):
    pipe, components = both
    seeds = [21, 22]
    result = ours(pipe, "lcm", seeds, rng="cpu")
    ref_latents, ref_images = a1111_lcm_reference(components, seeds=seeds)
    levels, latent_diff = level_difference(result.images, ref_images), (result.latents - ref_latents).abs().max()
    plain = ours(pipe, "euler_a", seeds, rng="cpu")
    print(f"LCM: max level difference {levels}, max |latent diff| {latent_diff:.1e}, mid-tones "
          f"{mid_tones(ref_images):.0%}; Euler a on the same noise is {level_difference(plain.images, ref_images)} "
          "levels away")
    assert mid_tones(ref_images) > 0.2
    assert levels <= 2 and latent_diff < 1e-3
