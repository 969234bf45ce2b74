"""A loaded Stable Diffusion model: the three networks, their config and where they came from."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdtorch.clip import CLIPTextModel
from sdtorch.config import ModelConfig
from sdtorch.unet import UNet
from sdtorch.vae import AutoencoderKL

# Our module for each network, and the prefix an original single-file checkpoint stores it under.
NETWORKS = {
    "text_encoder": (CLIPTextModel, "text", "cond_stage_model.transformer.text_model."),
    "unet": (UNet, "unet", "model.diffusion_model."),
    "vae": (AutoencoderKL, "vae", "first_stage_model."),
}


@dataclass
class StableDiffusion:
    config: ModelConfig
    text_encoder: CLIPTextModel
    unet: UNet
    vae: AutoencoderKL
    source: str = ""

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0) -> StableDiffusion:
        """Freshly initialised networks (tests, training from scratch)."""
        torch.manual_seed(seed)
        nets = {name: kind(getattr(config, part)).eval() for name, (kind, part, _) in NETWORKS.items()}
        return cls(config=config, **nets)

    def networks(self) -> dict[str, torch.nn.Module]:
        return {name: getattr(self, name) for name in NETWORKS}

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device=None, dtype=None) -> StableDiffusion:
        for net in self.networks().values():
            net.to(device=device, dtype=dtype)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All weights under the original single-file checkpoint names."""
        return {
            prefix + key: value
            for name, (_, _, prefix) in NETWORKS.items()
            for key, value in getattr(self, name).state_dict().items()
        }
