"""The training stages of the embedded model, in miniature: each loss falls over a few steps on a
fixed batch, and one tiny end-to-end run writes a checkpoint the normal loader reads."""

from __future__ import annotations

import dataclasses
import json

import torch
import torch.nn.functional as F

from sdtorch.config import CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig
from sdtorch.loading import load_model
from sdtorch.pipeline import Pipeline
from sdtorch.train.__main__ import MODEL_FILE, train
from sdtorch.train.clip_stage import CLIPTrainer
from sdtorch.train.common import Clock, lr_at, tokenize, training_batch
from sdtorch.train.recipe import RECIPE, Recipe
from sdtorch.train.unet_stage import diffusion_loss, training_noise
from sdtorch.train.vae_stage import edge_weights, vae_loss
from sdtorch.unet import UNet
from sdtorch.vae import AutoencoderKL

SMALL = ModelConfig(
    text=CLIPTextConfig(width=32, layers=1, heads=2, mlp_width=64),
    vae=VAEConfig(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4),
    unet=UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
                    context_dim=32, norm_groups=4),
    image_size=64,
)


def small_recipe(steps: int = 3) -> Recipe:
    r = dataclasses.replace(RECIPE, model=SMALL)
    r = r.override([f"clip.image_channels={(8, 8, 8, 8)}", "clip.embed_dim=16", "clip.batch=8", "vae.batch=4",
                    "unet.batch=4", "vae.scale_samples=16", "unet.save_every=2", "guidance.candidates=[1.0, 3.0]",
                    "guidance.pictures=2"])
    return r.override([f"{s}.steps={steps}" for s in ("clip", "vae", "unet")] +
                      [f"{s}.warmup=1" for s in ("clip", "vae", "unet")])


def falls(losses: list[float]) -> bool:
    return sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_clip_loss_falls():
    torch.manual_seed(0)
    trainer = CLIPTrainer(small_recipe())
    images, captions, _ = training_batch(5, 0, 16)
    ids = tokenize(captions)
    opt = torch.optim.AdamW(trainer.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss, _ = trainer.loss(images, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert falls(losses), losses


def test_vae_loss_falls():
    torch.manual_seed(0)
    vae = AutoencoderKL(SMALL.vae)
    images, _, _ = training_batch(6, 0, 4)
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss, _, _ = vae_loss(vae, images, 1e-5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert falls(losses), losses


def test_edge_weights_favour_outlines():
    images, _, _ = training_batch(7, 0, 4)
    weights = edge_weights(images, gain=8.0)
    assert weights.shape == (4, 1, 64, 64)
    assert torch.allclose(weights.mean(dim=(2, 3)), torch.ones(4, 1))
    # The strongest outline pixel weighs 1 + gain times the flat background.
    assert torch.allclose(weights.amax(dim=(2, 3)), 9 * weights.amin(dim=(2, 3)))
    assert torch.equal(edge_weights(torch.zeros(1, 3, 8, 8), 8.0), torch.ones(1, 1, 8, 8))


def test_unet_loss_falls():
    torch.manual_seed(0)
    unet = UNet(SMALL.unet)
    latents = torch.randn(4, 4, 16, 16)
    context = torch.randn(4, 77, 32)
    opt = torch.optim.AdamW(unet.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = diffusion_loss(unet, latents, context, torch.Generator().manual_seed(0), min_snr_gamma=5.0,
                              pyramid_discount=RECIPE.unet.pyramid_noise_discount)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert falls(losses), losses


def test_training_noise_adds_coarse_components():
    shape = (256, 4, 16, 16)
    white = training_noise(shape, torch.Generator().manual_seed(0))
    pyramid = training_noise(shape, torch.Generator().manual_seed(0), pyramid_discount=0.5)
    offset = training_noise(shape, torch.Generator().manual_seed(0), offset=0.1)
    assert torch.equal(white, training_noise(shape, torch.Generator().manual_seed(0)))
    assert abs(white.std() - 1) < 0.01 and abs(pyramid.std() - 1) < 0.01
    # 4x4 latent patches, the size of an object: their means vary more (white 0.25, pyramid 0.36).
    assert F.avg_pool2d(pyramid, 4).std() > 1.3 * F.avg_pool2d(white, 4).std()
    # The offset moves whole channels (per-image channel means: white 0.06, with offset 0.11).
    assert offset.mean(dim=(2, 3)).std() > 1.5 * white.mean(dim=(2, 3)).std()


def test_schedule_and_clock():
    assert lr_at(0, 100, 10, 1.0) == 0.1 and abs(lr_at(10, 100, 10, 1.0) - 1.0) < 1e-9
    assert abs(lr_at(100, 100, 10, 1.0) - 0.1) < 1e-9
    clock = Clock(100, budget=10.0, elapsed=5.0)
    assert clock.position(20) == 50 and not clock.done(20)
    clock.elapsed = 10.0
    assert clock.done(20)
    assert Clock(100).position(20) == 20
    paced = Clock(100, elapsed=30.0)  # 20 steps took 30 s: 80 more take 120 s
    assert paced.remaining(20) == 120.0 and paced.eta(20) == "2:00 left"
    assert Clock(100, budget=50.0, elapsed=30.0).remaining(20) == 20.0  # the budget ends first


def test_recipe_override_and_scale():
    r = RECIPE.override(["unet.lr=1e-3", "model.unet.model_channels=96", "clip.image_channels=[8, 8]"])
    assert r.unet.lr == 1e-3 and r.model.unet.model_channels == 96 and r.clip.image_channels == (8, 8)
    assert RECIPE.scaled(0.5).unet.steps == RECIPE.unet.steps // 2
    assert RECIPE.model.image_size == 64 and RECIPE.model.unet.context_dim == RECIPE.model.text.width


def test_tiny_run_writes_loadable_checkpoint_and_resumes(tmp_path):
    recipe = small_recipe(steps=3)
    path = train(recipe, tmp_path, quiet=True)
    assert path.name == MODEL_FILE
    model = load_model(path)
    assert model.config.image_size == 64 and model.config.text.width == 32
    assert model.config.vae.scaling_factor != RECIPE.model.vae.scaling_factor  # computed from data
    image = Pipeline(model, path).generate("a red circle", steps=2, seed=0, width=64, height=64,
                                           progress=False).images[0]
    assert image.size == (64, 64)
    log = (tmp_path / "train.log").read_text()
    assert "unet: step 3/3" in log
    assert "guidance 3.0: " in log and model.config.default_cfg_scale in (1.0, 3.0)
    # Resuming a finished run trains nothing more and writes the same weights.
    before = load_model(path).state_dict()
    train(recipe, tmp_path, resume=True, quiet=True)
    after = load_model(path).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((tmp_path / "recipe.json").read_text())["unet"]["steps"] == 3
