"""The shapes model's architecture and the hyper-parameters of its three training stages.

Stable Diffusion's recipe (Rombach et al. 2022) in small: a CLIP text encoder trained
contrastively (Radford et al. 2021) and then frozen, a KL autoencoder, and a latent-diffusion UNet
conditioned on the frozen text encoder. Everything here is a frozen dataclass, so a run is
described by one value (stored beside the checkpoints, so that `--resume` can check it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from sdtorch.config import CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig

TEXT_WIDTH = 64

SHAPES_MODEL = ModelConfig(
    # The real CLIP vocabulary (49408 tokens) at a small width: the embedding is most of its weights.
    text=CLIPTextConfig(width=TEXT_WIDTH, layers=3, heads=4, mlp_width=4 * TEXT_WIDTH, activation="quick_gelu"),
    # 64x64 pixels -> 16x16x4 latents (downscale 4); the full-resolution stage is thin.
    vae=VAEConfig(base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, latent_channels=4, norm_groups=8),
    unet=UNetConfig(
        model_channels=64,
        channel_mult=(1, 2, 2),  # 16x16, 8x8, 4x4 latents
        num_res_blocks=1,
        attention_levels=(1, 2),
        num_heads=4,
        transformer_depth=1,
        context_dim=TEXT_WIDTH,
        norm_groups=16,
    ),
    image_size=64,
)


@dataclass(frozen=True)
class CLIPStage:
    """Contrastive pre-training of the text tower against a small image tower (Radford et al. 2021)."""

    steps: int = 1500
    batch: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 100
    embed_dim: int = 64  # the joint embedding space
    image_channels: tuple[int, ...] = (24, 48, 96, 96)  # the image tower's conv stages, 64 -> 4 px
    seed: int = 1_000_000


@dataclass(frozen=True)
class VAEStage:
    """Reconstruction (L1 + L2) plus a small KL term (Rombach et al. 2022, section 3)."""

    steps: int = 3500
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    kl_weight: float = 1e-5  # on the mean KL per latent element, against the mean per-pixel loss
    edge_gain: float = 8.0  # edges weigh 1 + edge_gain times flat colour in the reconstruction loss
    scale_samples: int = 1024  # images whose latents set the scale factor (1 / std)
    seed: int = 2_000_000


@dataclass(frozen=True)
class UNetStage:
    """Epsilon prediction on SD's scaled-linear schedule (Ho et al. 2020), caption dropout for
    classifier-free guidance (Ho & Salimans 2022), EMA weights."""

    steps: int = 9000
    batch: int = 64
    lr: float = 7e-4
    warmup: int = 200
    weight_decay: float = 0.0
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0  # Hang et al. 2023 loss weighting; 0 turns it off
    # Coarse training noise (unet_stage.training_noise; 0 turns each off). An A/B of the UNet stage
    # alone (same frozen text encoder and VAE, ~3,700 steps each, judged at guidance 6): white noise
    # gave object colour 0.87 and img2img new colour 0.64; pyramid 0.3 0.91 / 0.61; pyramid 0.5
    # 0.98 / 0.72; offset 0.1 0.84 / 0.49. A whole retrain at 0.65 then scored worse than the shipped
    # 0.5 run (txt2img all 0.925 against 0.975, held-out 0.89 against 0.96, img2img 0.80 against 0.81
    # over 600 pictures), so 0.5 stays.
    noise_offset: float = 0.0
    pyramid_noise_discount: float = 0.5
    bf16_autocast: bool = True  # bf16 matmuls and convolutions (turn off on CPUs without bf16 support)
    save_every: int = 250
    seed: int = 3_000_000


@dataclass(frozen=True)
class GuidanceChoice:
    """After training: the default guidance scale, the candidate with the most validation pictures
    fully right (prompts of `sdtorch.shapes.evaluate.VALIDATION_SEED`, never the evaluation's)."""

    candidates: tuple[float, ...] = (2.0, 3.0, 4.0, 5.0, 6.0, 7.5)
    pictures: int = 100  # per candidate


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig = SHAPES_MODEL
    clip: CLIPStage = field(default_factory=CLIPStage)
    vae: VAEStage = field(default_factory=VAEStage)
    unet: UNetStage = field(default_factory=UNetStage)
    guidance: GuidanceChoice = field(default_factory=GuidanceChoice)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def scaled(self, factor: float) -> Recipe:
        """The same recipe with every stage's step count (and warm-up) multiplied by `factor`."""

        def scale(stage):
            return dataclasses.replace(
                stage, steps=max(2, round(stage.steps * factor)), warmup=max(1, round(stage.warmup * factor))
            )

        return dataclasses.replace(self, clip=scale(self.clip), vae=scale(self.vae), unet=scale(self.unet))

    def override(self, assignments: list[str]) -> Recipe:
        """Apply 'path=value' strings ('unet.lr=1e-3', 'model.unet.model_channels=96'), values
        parsed as Python literals (lists become tuples)."""
        import ast

        def replace(obj, path, value):
            head, *rest = path
            if head not in {f.name for f in dataclasses.fields(obj)}:
                raise ValueError(f"{type(obj).__name__} has no setting {head!r}")
            new = replace(getattr(obj, head), rest, value) if rest else value
            return dataclasses.replace(obj, **{head: new})

        recipe = self
        for item in assignments:
            key, value = item.split("=", 1)
            value = ast.literal_eval(value)
            recipe = replace(recipe, key.split("."), tuple(value) if isinstance(value, list) else value)
        return recipe


RECIPE = Recipe()
