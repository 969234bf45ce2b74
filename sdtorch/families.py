"""Model families as rows of one table: what identifies a checkpoint of the family, where its
networks live in an original single file, and the defaults that come with it.

SD 1.x, SD 2.x and SDXL (base) run. Families that are
recognised but not run are listed in `UNSUPPORTED`, so that their files get an error naming them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdtorch.errors import SdtorchError


@dataclass(frozen=True)
class LatentFormat:
    """How a family's VAE latents relate to the latents the UNet works on: unet = (vae - shift) * scale."""

    scale: float
    shift: float = 0.0
    channels: int = 4
    downscale: int = 8  # pixels per latent pixel, each way

    def from_vae(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.shift) * self.scale if self.shift else latents * self.scale

    def to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scale + self.shift if self.shift else latents / self.scale


@dataclass(frozen=True)
class ModelFamily:
    name: str  # ours, as configs record it
    label: str  # as errors and reports name it
    markers: tuple[str, ...]  # tensor names only this family's single files have
    prefixes: dict[str, str]  # network -> the prefix an original single file stores it under
    tolerated: tuple[str, ...]  # tensor-name prefixes in its files that are not weights we run
    text_encoders: tuple[str, ...]  # the text towers it conditions on
    prediction_type: str
    latent_format: LatentFormat
    image_size: int  # the side it was trained at: the default width and height
    cfg_scale: float  # the guidance it works best at
    pad_id: int = 49407  # what fills a prompt's 77 ids after EOS: EOS for OpenAI CLIP, 0 ('!') for OpenCLIP
    pad_id_2: int = 0  # the same for a second text tower (SDXL's OpenCLIP bigG)


SD1 = ModelFamily(
    name="sd1",
    label="Stable Diffusion 1.x",
    markers=("cond_stage_model.transformer.",),
    prefixes={
        "text_encoder": "cond_stage_model.transformer.text_model.",
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
    },
    tolerated=("cond_stage_model.transformer.text_model.embeddings.position_ids", "first_stage_model.loss."),
    text_encoders=("clip_l",),
    prediction_type="epsilon",
    latent_format=LatentFormat(scale=0.18215),  # v1-inference.yaml `scale_factor`
    image_size=512,
    cfg_scale=7.5,
)

SD2 = ModelFamily(
    name="sd2",
    label="Stable Diffusion 2.x",
    markers=("cond_stage_model.model.",),
    # The OpenCLIP tower is translated to our CLIP names on load (`sdtorch.loading.openclip`).
    prefixes=SD1.prefixes,
    tolerated=SD1.tolerated,
    text_encoders=("openclip_h",),
    prediction_type="v_prediction",  # 768-v; the 512 base models predict epsilon (told apart on load)
    latent_format=SD1.latent_format,
    image_size=768,
    cfg_scale=7.5,
    pad_id=0,
)

SDXL = ModelFamily(
    name="sdxl",
    label="Stable Diffusion XL",
    markers=("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
    # The OpenCLIP bigG tower is translated to our CLIP names on load, under text_encoder_2's prefix.
    prefixes={
        "text_encoder": "conditioner.embedders.0.transformer.text_model.",
        "text_encoder_2": "conditioner.embedders.1.transformer.text_model.",
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
    },
    tolerated=("conditioner.embedders.0.transformer.text_model.embeddings.position_ids", "first_stage_model.loss."),
    text_encoders=("clip_l", "openclip_g"),
    prediction_type="epsilon",
    latent_format=LatentFormat(scale=0.13025),  # sd_xl_base.yaml `scale_factor`
    image_size=1024,
    cfg_scale=5.0,  # diffusers' StableDiffusionXLPipeline default
)

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (SD1, SD2, SDXL)}

# Families we recognise but do not run, by a tensor name only they have (checked after SDXL's markers).
UNSUPPORTED: list[tuple[str, str]] = [
    ("conditioner.embedders.0.model.", "the SDXL refiner"),
    ("model.diffusion_model.joint_blocks.", "Stable Diffusion 3"),
    ("model.diffusion_model.double_blocks.", "Flux"),
    ("double_blocks.0.img_attn.qkv.weight", "Flux"),
    ("clf.1.weight", "Stable Cascade (stage C)"),
    ("clip_mapper.weight", "Stable Cascade (stage B)"),
    ("model.diffusion_model.label_emb.", "a class-conditioned UNet (unCLIP or SD x4 upscaler)"),
    ("control_model.", "a ControlNet"),
    ("down_blocks.0.resnets.0.conv1.weight", "a diffusers-format UNet file (point at the whole diffusers folder)"),
    ("lora_unet_", "a LoRA (not a full model)"),
]


def family_of(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise SdtorchError(f"unknown model family {name!r}; sdtorch runs: {', '.join(FAMILIES)}")
    return FAMILIES[name]
