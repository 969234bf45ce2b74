"""Stage 2: the VAE. Our AutoencoderKL at a tiny width, trained to reconstruct the shapes world's
pictures through a 4-channel latent, with a small KL term towards N(0, 1).

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", section 3: a
perceptual compression stage whose KL weight is kept small so that the latent keeps the detail.
SD added a perceptual (LPIPS) and an adversarial loss; flat-coloured shapes need neither, so the
reconstruction loss here is L1 + L2 on pixels. As SD did, the latent scale factor is computed from
data once the autoencoder is trained: 1 / std of the latents, so that the diffusion model sees
latents of about unit variance.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from sdtorch.train.common import (
    Clock,
    Log,
    ThreadTuner,
    load_state,
    lr_at,
    optimise,
    save_state,
    set_lr,
    training_batch,
)
from sdtorch.train.recipe import Recipe
from sdtorch.vae import AutoencoderKL


def edge_weights(images: torch.Tensor, gain: float) -> torch.Tensor:
    """(B, 1, H, W) per-pixel loss weights of mean 1 per image, `1 + gain` times higher on edges.

    A pixel's edge strength is how far it is from the mean of its 3x3 neighbourhood (largest over
    the channels), relative to the image's strongest edge: zero on flat colour. A plain mean loss is
    nearly all background, so a blurred outline (a star's tips rounded into a pentagon) costs little;
    SD's VAE gets sharp outlines from its perceptual and adversarial losses, this does it for flat shapes."""
    blurred = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    edge = (images - blurred).abs().amax(dim=1, keepdim=True)
    weights = 1 + gain * edge / edge.amax(dim=(2, 3), keepdim=True).clamp(min=1e-6)
    return weights / weights.mean(dim=(2, 3), keepdim=True)


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, kl_weight: float,
             edge_gain: float = 0.0) -> tuple[torch.Tensor, float, float]:
    """(loss, reconstruction L1, KL per latent element) for a batch in [-1, 1]; the per-pixel
    L1 + L2 is weighted towards edges by `edge_gain` (`edge_weights`)."""
    posterior = vae.encode(images)
    recon = vae.decode(posterior.sample())
    diff = recon - images
    l1 = diff.abs().mean()
    rec = ((diff.abs() + diff**2) * edge_weights(images, edge_gain)).mean()
    kl = 0.5 * (posterior.mean**2 + posterior.std**2 - 1.0 - posterior.logvar).mean()
    return rec + kl_weight * kl, l1.item(), kl.item()


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, recipe: Recipe, device="cpu") -> float:
    """1 / std of posterior samples over fresh pictures (SD: 0.18215 found the same way)."""
    hp = recipe.vae
    latents = []
    for i in range(0, hp.scale_samples, 128):
        images, _, _ = training_batch(hp.seed + 10**6, i, min(128, hp.scale_samples - i), device)
        latents.append(vae.encode(images).sample().float().cpu())
    return 1.0 / torch.cat(latents).std().item()


def train_vae(recipe: Recipe, work: Path, log: Log, device="cpu", resume: bool = True,
              time_budget: float | None = None) -> tuple[AutoencoderKL, float]:
    """Run stage 2 (or pick it up from `work`/vae.pt): the trained VAE and its latent scale factor
    (with `time_budget`, in seconds, the stage may end early: see `common.Clock`)."""
    hp = recipe.vae
    path = work / "vae.pt"
    torch.manual_seed(hp.seed)
    vae = AutoencoderKL(recipe.model.vae).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=hp.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step, scale, elapsed = 0, None, 0.0
    state = load_state(path) if resume else None
    if state is not None:
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, scale, elapsed = state["step"], state.get("scale"), state.get("elapsed", 0.0)
        log(f"vae: resumed at step {step}/{hp.steps}")
    vae.train()
    running = None
    tuner = ThreadTuner(torch.get_num_threads())
    clock = Clock(hp.steps, time_budget, elapsed)
    while scale is None and not clock.done(step):
        set_lr(optimizer, lr_at(clock.position(step), hp.steps, hp.warmup, hp.lr))
        images, _, _ = training_batch(hp.seed, step, hp.batch, device)
        loss, l1, kl = vae_loss(vae, images, hp.kl_weight, hp.edge_gain)
        optimise(optimizer, loss, vae)
        step += 1
        clock.tick()
        tuner.step_done()
        running = (l1, kl) if running is None else (0.95 * running[0] + 0.05 * l1, 0.95 * running[1] + 0.05 * kl)
        if step % 50 == 0 or step == hp.steps:
            log(f"vae: step {step}/{hp.steps} L1 {running[0]:.4f} (pixel levels {running[0] * 127.5:.2f}) "
                f"KL {running[1]:.3f} threads {tuner.current}, {clock.eta(step)}")
        if step % 250 == 0 and not clock.done(step):
            save_state(path, {"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                              "elapsed": clock.elapsed})
    tuner.restore()
    vae.eval().requires_grad_(False)
    if scale is None:
        if step < hp.steps:
            log(f"vae: time budget of {time_budget / 60:.1f} min spent at step {step}/{hp.steps}")
        scale = latent_scale(vae, recipe, device)
        log(f"vae: latent scale factor 1/std = {scale:.5f}")
        save_state(path, {"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                          "scale": scale, "elapsed": clock.elapsed})
    return vae, scale
