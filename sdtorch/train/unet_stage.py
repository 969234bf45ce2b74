"""Stage 3: the UNet. Latent diffusion (Rombach et al. 2022) on the frozen VAE's scaled latents,
conditioned on the frozen CLIP text encoder's per-token states.

- DDPM (Ho et al. 2020): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with t uniform over SD's
  1000-step scaled-linear schedule (`NoiseSchedule.from_betas()`, the table a model with SD's
  schedule config samples on), and the UNet trained to predict eps. The squared error is weighted by
  min(SNR, gamma) / SNR (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting"),
  which lets a short run spend less effort on nearly clean latents.
- Classifier-free guidance (Ho & Salimans 2022): a fraction of captions is replaced by the empty
  prompt, so the same network also learns the unconditional prediction that guidance subtracts.
- The weights shipped are an exponential moving average of the trained ones.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from sdtorch.clip import CLIPTextModel
from sdtorch.diffusion import NoiseSchedule
from sdtorch.train.common import (
    EMA,
    Clock,
    Log,
    ThreadTuner,
    load_state,
    lr_at,
    optimise,
    save_state,
    set_lr,
    tokenize,
    training_batch,
)
from sdtorch.train.recipe import Recipe
from sdtorch.unet import UNet
from sdtorch.vae import AutoencoderKL


def training_noise(shape: tuple[int, ...], generator: torch.Generator, offset: float = 0.0,
                   pyramid_discount: float = 0.0) -> torch.Tensor:
    """Gaussian noise for the forward process, optionally with coarse components that white noise
    at 16x16 barely has, so that the UNet learns to redraw flat colours rather than keep them:
    - `offset`: a per-image, per-channel constant (Guttenberg 2023, "Diffusion with offset noise");
    - `pyramid_discount`: noise at 1/2, 1/4, ... of the size, upsampled, weighted discount**level
      (Whitaker 2023, "multi-resolution noise"), then rescaled to unit standard deviation."""
    b, c, h, w = shape
    noise = torch.randn(shape, generator=generator)
    if pyramid_discount > 0:
        level, size = 1, min(h, w) // 2
        while size >= 1:
            coarse = torch.randn((b, c, size, size), generator=generator)
            noise = noise + F.interpolate(coarse, size=(h, w), mode="bilinear") * pyramid_discount**level
            level, size = level + 1, size // 2
        noise = noise / noise.std()
    if offset > 0:
        noise = noise + offset * torch.randn((b, c, 1, 1), generator=generator)
    return noise


ALPHAS_CUMPROD = NoiseSchedule.from_betas().alphas_cumprod  # (1000,) SD's schedule, which the recipe's config keeps


def diffusion_loss(unet: UNet, latents: torch.Tensor, context: torch.Tensor, generator: torch.Generator,
                   min_snr_gamma: float = 0.0, noise_offset: float = 0.0,
                   pyramid_discount: float = 0.0) -> torch.Tensor:
    """The (min-SNR weighted) epsilon-prediction loss at random timesteps for clean scaled latents."""
    b = latents.shape[0]
    t = torch.randint(0, len(ALPHAS_CUMPROD), (b,), generator=generator)
    noise = training_noise(latents.shape, generator, noise_offset, pyramid_discount).to(latents.device)
    abar = ALPHAS_CUMPROD[t].to(latents.device)[:, None, None, None]
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    pred = unet(noisy, t.to(latents.device), context)
    per_sample = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if min_snr_gamma > 0:
        snr = (abar / (1 - abar)).flatten()
        per_sample = per_sample * snr.clamp(max=min_snr_gamma) / snr
    return per_sample.mean()


@torch.no_grad()
def conditioning(text_encoder: CLIPTextModel, captions: list[str], dropout: float, generator: torch.Generator,
                 device) -> torch.Tensor:
    """Context for a batch of captions, each replaced by the empty prompt with chance `dropout`."""
    keep = torch.rand(len(captions), generator=generator) >= dropout
    captions = [c if k else "" for c, k in zip(captions, keep.tolist())]
    return text_encoder(tokenize(captions, device))  # (B, 77, width)


def train_unet(recipe: Recipe, text_encoder: CLIPTextModel, vae: AutoencoderKL, scale: float, work: Path, log: Log,
               device="cpu", resume: bool = True, time_budget: float | None = None) -> UNet:
    """Run stage 3 (or pick it up from `work`/unet.pt) and return the UNet holding the EMA weights.

    With `time_budget` (seconds of this stage's wall clock, summed over resumed runs) the stage
    also ends when the budget is spent, and the learning-rate schedule follows whichever of the
    step count and the clock is further along, so the rate has decayed when either runs out."""
    hp = recipe.unet
    path = work / "unet.pt"
    torch.manual_seed(hp.seed)
    unet = UNet(recipe.model.unet).to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=hp.lr, betas=(0.9, 0.99), weight_decay=hp.weight_decay)
    ema = EMA(unet, hp.ema_decay)
    step, elapsed = 0, 0.0
    state = load_state(path) if resume else None
    if state is not None:
        unet.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        ema.shadow = {k: v.to(device) for k, v in ema.shadow.items()}
        step, elapsed = state["step"], state.get("elapsed", 0.0)
        log(f"unet: resumed at step {step}/{hp.steps}")
    text_encoder.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    unet.train()
    running = None
    tuner = ThreadTuner(torch.get_num_threads())
    clock = Clock(hp.steps, time_budget, elapsed)
    while not clock.done(step):
        set_lr(optimizer, lr_at(clock.position(step), hp.steps, hp.warmup, hp.lr))
        generator = torch.Generator().manual_seed(hp.seed + step)  # timesteps, noise, dropout of this step
        images, captions, _ = training_batch(hp.seed, step, hp.batch, device)
        with torch.no_grad():
            latents = vae.encode(images).sample(generator).to(device) * scale  # (B, 4, 16, 16)
        context = conditioning(text_encoder, captions, hp.caption_dropout, generator, device)
        # Mixed precision, weights and optimizer state in fp32. On 2 cores with AVX-512 BF16 a step
        # took 0.66 s against 0.70 s in fp32: a small gain at this width, larger on wider UNets.
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=hp.bf16_autocast):
            loss = diffusion_loss(unet, latents, context, generator, hp.min_snr_gamma, hp.noise_offset,
                                  hp.pyramid_noise_discount)
        optimise(optimizer, loss, unet)
        ema.update(unet)
        step += 1
        clock.tick()
        tuner.step_done()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == hp.steps:
            log(f"unet: step {step}/{hp.steps} loss {running:.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                f"({clock.elapsed / step:.2f} s/step, threads {tuner.current}), {clock.eta(step)}")
        if step % hp.save_every == 0 or clock.done(step):
            save_state(path, {"model": unet.state_dict(), "optimizer": optimizer.state_dict(),
                              "ema": ema.state_dict(), "step": step, "elapsed": clock.elapsed})
    tuner.restore()
    if step < hp.steps:
        log(f"unet: time budget of {time_budget / 60:.1f} min spent at step {step}/{hp.steps}")
    ema.copy_to(unet)
    return unet.eval().requires_grad_(False)
