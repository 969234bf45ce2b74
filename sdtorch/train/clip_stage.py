"""Stage 1: CLIP. Our text encoder (the real tokenizer and vocabulary, a tiny width) trained
contrastively against a small image tower on (picture, caption) pairs of the shapes world.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision":
each tower maps its input to a unit vector; the B x B matrix of cosine similarities, scaled by a
learned temperature, is trained with a symmetric cross-entropy that makes each picture pick its own
caption and each caption its own picture. The text feature is the final-norm state at the EOS token
(the first EOS: the tokenizer pads with EOS too) through a linear projection, as in CLIP. After this
stage only the text transformer is kept (frozen); its per-token states condition the UNet.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sdtorch.clip import CLIPTextModel
from sdtorch.tokenizer import get_tokenizer
from sdtorch.train.common import (
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


class ImageTower(nn.Module):
    """A small CNN: stride-2 conv stages 64 -> 4 px, then the whole 4x4 map (not a global pool,
    which would throw away where the object is) projected to the joint embedding."""

    def __init__(self, channels: tuple[int, ...], embed_dim: int, image_size: int = 64):
        super().__init__()
        layers, in_ch = [], 3
        for ch in channels:
            layers += [nn.Conv2d(in_ch, ch, 3, stride=2, padding=1), nn.GroupNorm(8, ch), nn.SiLU(),
                       nn.Conv2d(ch, ch, 3, padding=1), nn.GroupNorm(8, ch), nn.SiLU()]
            in_ch = ch
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** len(channels)
        self.proj = nn.Linear(in_ch * side * side, embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(images).flatten(1))  # (B, embed_dim)


class CLIPTrainer(nn.Module):
    """The two towers, the text projection and the temperature."""

    def __init__(self, recipe: Recipe):
        super().__init__()
        hp, text_cfg = recipe.clip, recipe.model.text
        self.text = CLIPTextModel(text_cfg)
        self.text_projection = nn.Linear(text_cfg.width, hp.embed_dim, bias=False)
        self.image = ImageTower(hp.image_channels, hp.embed_dim, recipe.model.image_size)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        states = self.text(ids)  # (B, T, width)
        eos = (ids == get_tokenizer().eos_id).int().argmax(dim=1)  # the first EOS
        return self.text_projection(states[torch.arange(len(ids)), eos])  # (B, embed_dim)

    def loss(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The symmetric InfoNCE loss and the batch's picture->caption retrieval accuracy."""
        img = F.normalize(self.image(images), dim=-1)
        txt = F.normalize(self.encode_text(ids), dim=-1)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * img @ txt.t()  # (B, B)
        target = torch.arange(len(images), device=images.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        return loss, (logits.argmax(1) == target).float().mean().item()


def train_clip(recipe: Recipe, work: Path, log: Log, device="cpu", resume: bool = True,
               time_budget: float | None = None) -> CLIPTextModel:
    """Run stage 1 (or pick it up from `work`/clip.pt) and return the trained, frozen text encoder
    (with `time_budget`, in seconds, the stage may end early: see `common.Clock`)."""
    hp = recipe.clip
    path = work / "clip.pt"
    torch.manual_seed(hp.seed)
    trainer = CLIPTrainer(recipe).to(device)
    decay = [p for n, p in trainer.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in trainer.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hp.lr, betas=(0.9, 0.98),
    )
    step, elapsed = 0, 0.0
    state = load_state(path) if resume else None
    if state is not None:
        trainer.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state.get("elapsed", 0.0)
        log(f"clip: resumed at step {step}/{hp.steps}")
    trainer.train()
    running, acc_running = None, None
    tuner = ThreadTuner(torch.get_num_threads())
    clock = Clock(hp.steps, time_budget, elapsed)
    while not clock.done(step):
        set_lr(optimizer, lr_at(clock.position(step), hp.steps, hp.warmup, hp.lr))
        images, captions, _ = training_batch(hp.seed, step, hp.batch, device)
        loss, acc = trainer.loss(images, tokenize(captions, device))
        optimise(optimizer, loss, trainer)
        step += 1
        clock.tick()
        tuner.step_done()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        acc_running = acc if acc_running is None else 0.95 * acc_running + 0.05 * acc
        if step % 50 == 0 or step == hp.steps:
            log(f"clip: step {step}/{hp.steps} loss {running:.4f} retrieval@1 {acc_running:.3f} "
                f"threads {tuner.current} temperature {1 / trainer.logit_scale.exp().item():.4f}, {clock.eta(step)}")
        if step % 250 == 0 or clock.done(step):
            save_state(path, {"model": trainer.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                              "elapsed": clock.elapsed})
    tuner.restore()
    if step < hp.steps:
        log(f"clip: time budget of {time_budget / 60:.1f} min spent at step {step}/{hp.steps}")
    return trainer.text.eval().requires_grad_(False)
