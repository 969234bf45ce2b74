"""Hyper-parameters of the three networks, as frozen dataclasses, with SD 1.x and tiny presets.

Each network is built from its config alone. The loaders fill these from a checkpoint's tensor
shapes (`sdtorch.loading.detect`) or from a diffusers folder's config.json files, so a user never
says "this is SD 1.5".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sdtorch.families import SD1


@dataclass(frozen=True)
class CLIPTextConfig:
    """The CLIP text transformer (ViT-L/14's text tower for SD 1.x)."""

    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    activation: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # SDXL's OpenCLIP bigG: the `text_projection` giving the pooled embedding


@dataclass(frozen=True)
class UNetConfig:
    """The latent-diffusion UNet (CompVis `openaimodel.UNetModel` with spatial transformers)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Which levels (0 = full latent resolution) carry a spatial transformer after each res-block.
    attention_levels: tuple[int, ...] = (0, 1, 2)
    num_heads: int = 8  # SD 1.x fixes the head count; head width = channels / heads
    head_dim: int | None = None  # SD 2.x fixes the head width instead (64): heads = channels / head_dim
    transformer_depth: int | tuple[int, ...] = 1  # blocks per transformer: one count, or one per level (SDXL)
    context_dim: int = 768
    use_linear_proj: bool = False  # SD 1.x projects in/out of the transformer with 1x1 convs
    norm_groups: int = 32
    adm_in_channels: int | None = None  # SDXL's `label_emb` input: pooled text + size/crop embeddings

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def depth_at(self, level: int | None) -> int:
        """Transformer blocks at a level (None: the middle block, which has the deepest level's count)."""
        if isinstance(self.transformer_depth, int):
            return self.transformer_depth
        return self.transformer_depth[-1 if level is None else level]

    def heads_at(self, channels: int) -> int:
        """Attention heads of a transformer over `channels` channels."""
        return channels // self.head_dim if self.head_dim else self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    """The KL autoencoder (CompVis `AutoencoderKL`) and the latent scale it was trained with."""

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = 4
    norm_groups: int = 32
    scaling_factor: float = SD1.latent_format.scale  # the latent scale it was trained with
    shift_factor: float = SD1.latent_format.shift

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a Stable Diffusion model: its family, the three networks, the
    training schedule (`sdtorch.diffusion.NoiseSchedule.of`) and what the UNet predicts."""

    family: str = SD1.name
    text: CLIPTextConfig = CLIPTextConfig()
    text_2: CLIPTextConfig | None = None  # SDXL's second text tower (OpenCLIP bigG)
    unet: UNetConfig = UNetConfig()
    vae: VAEConfig = VAEConfig()
    prediction_type: str = SD1.prediction_type  # "epsilon" or "v_prediction"
    image_size: int = SD1.image_size  # the side the model was trained at: the default width and height
    default_cfg_scale: float = SD1.cfg_scale  # the guidance the model works best at: used when none is given
    beta_start: float = 0.00085  # v1-inference.yaml linear_start
    beta_end: float = 0.012  # v1-inference.yaml linear_end
    beta_schedule: str = "scaled_linear"
    num_train_timesteps: int = 1000
    timestep_spacing: str | None = None  # the scheduler config's (SDXL: "leading"); None: each sampler's own
    # diffusers' SDXL `force_zeros_for_empty_prompt`: an empty negative prompt conditions on zeros, not on "".
    zero_empty_negative: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        def build(kind, values):
            fields = {f.name for f in dataclasses.fields(kind)}
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields}
            return kind(**values)

        top = {k: v for k, v in data.items() if k not in ("text", "text_2", "unet", "vae")}
        return build(
            cls,
            {
                **top,
                "text": build(CLIPTextConfig, data.get("text", {})),
                "text_2": build(CLIPTextConfig, data["text_2"]) if data.get("text_2") else None,
                "unet": build(UNetConfig, data.get("unet", {})),
                "vae": build(VAEConfig, data.get("vae", {})),
            },
        )


SD15 = ModelConfig()

# Small enough for tests on two CPU cores, yet with every kind of block the full model has.
TINY = ModelConfig(
    text=CLIPTextConfig(width=32, layers=2, heads=4, mlp_width=64),
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(0, 1),
        num_heads=2,
        context_dim=32,
        norm_groups=8,
    ),
    vae=VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8),
    image_size=32,
)
