"""A loaded Stable Diffusion model: the three networks, their config, their family and schedule."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from sdtorch.clip import CLIPTextModel
from sdtorch.config import ModelConfig
from sdtorch.diffusion import NoiseSchedule
from sdtorch.families import LatentFormat, ModelFamily, family_of
from sdtorch.stored_weights import compute_dtype
from sdtorch.unet import UNet
from sdtorch.vae import AutoencoderKL

# Our module for each network and the part of ModelConfig that configures it; the prefix it is
# stored under in a single file is the family's (`ModelFamily.prefixes`).
NETWORKS = {
    "text_encoder": (CLIPTextModel, "text"),
    "text_encoder_2": (CLIPTextModel, "text_2"),  # SDXL only
    "unet": (UNet, "unet"),
    "vae": (AutoencoderKL, "vae"),
}


def networks_of(config: ModelConfig) -> dict[str, tuple[type, str]]:
    """The networks a model of this config has (a second text tower only where the config has one)."""
    return {name: spec for name, spec in NETWORKS.items() if getattr(config, spec[1]) is not None}


@dataclass(eq=False)
class StableDiffusion:
    config: ModelConfig
    text_encoder: CLIPTextModel
    unet: UNet
    vae: AutoencoderKL
    source: str = ""
    text_encoder_2: CLIPTextModel | None = None  # SDXL's OpenCLIP bigG

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0) -> StableDiffusion:
        """Freshly initialised networks (tests, training from scratch)."""
        torch.manual_seed(seed)
        nets = {name: kind(getattr(config, part)).eval() for name, (kind, part) in networks_of(config).items()}
        return cls(config=config, **nets)

    def networks(self) -> dict[str, torch.nn.Module]:
        return {name: getattr(self, name) for name in networks_of(self.config)}

    @property
    def text_encoders(self) -> list[CLIPTextModel]:
        return [net for net in (self.text_encoder, self.text_encoder_2) if net is not None]

    @property
    def family(self) -> ModelFamily:
        return family_of(self.config.family)

    @cached_property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.of(self.config)

    @property
    def latent_format(self) -> LatentFormat:
        vae = self.config.vae
        return LatentFormat(vae.scaling_factor, vae.shift_factor, vae.latent_channels, vae.downscale)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the networks compute in (weights kept as stored may be narrower)."""
        return compute_dtype(self.unet)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device=None, dtype=None) -> StableDiffusion:
        for net in self.networks().values():
            net.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Images (1, 3, H, W) in [-1, 1] -> one latent sample (fp32, on the model's device) per
        generator, each drawn on the CPU from its own generator as diffusers does: (B, C, H/f, W/f)."""
        from sdtorch.tiling import encode  # tiled where the whole pass would not fit (sdtorch.tiling)

        posterior = encode(self.vae, pixels.to(self.device, self.dtype))
        latents = torch.cat([posterior.sample(g).float().cpu() for g in generators])
        return self.latent_format.from_vae(latents).to(self.device)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """UNet-scale latents -> images (B, 3, H, W) in about [-1, 1], float32: a few images per call, each whole
        or tiled as the memory there is and the scope's `tiling.vae_tiling` decide."""
        from sdtorch.tiling import decode

        device = next(self.vae.parameters()).device  # the VAE's own: the UNet may be released by now
        return decode(self.vae, self.latent_format.to_vae(latents).to(device, compute_dtype(self.vae))).float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All weights under the original single-file checkpoint names."""
        prefixes = self.family.prefixes
        return {
            prefixes[name] + key: value
            for name in networks_of(self.config)
            for key, value in getattr(self, name).state_dict().items()
        }
