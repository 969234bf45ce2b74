"""The one generation path: prompt -> context, seed -> noise, sampler loop with classifier-free
guidance, VAE decode -> images. Text-to-image and image-to-image differ only in where the
sampler starts (pure noise, or the VAE-encoded init image noised to `strength`).

Random numbers are drawn as diffusers draws them on the CPU, one generator per image seeded
with seed + i (AUTOMATIC1111's convention), so image i of a batch can be regenerated alone and
matches diffusers' pipelines given the same per-image generators.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path

import torch
from PIL import Image

from sdtorch.errors import SdtorchError
from sdtorch.images import prepare_init_image, to_pil
from sdtorch.loading import load_model
from sdtorch.metadata import GenerationParams, model_hash
from sdtorch.model import StableDiffusion
from sdtorch.samplers import a1111_name, sample
from sdtorch.tokenizer import get_tokenizer

DEFAULT_SAMPLER = "euler_a"
MAX_SEED = 2**63 - 1
# The small model sdtorch trains itself and ships, used when no model is given.
EMBEDDED_MODEL = "data/default/sdtorch-shapes.safetensors"

StepCallback = Callable[[int, int, float, torch.Tensor, torch.Tensor], None]


@dataclass
class GenerationResult:
    images: list[Image.Image]
    params: list[GenerationParams]  # one per image, with its own seed
    latents: torch.Tensor  # (B, 4, H/8, W/8) final latents, unscaled by the VAE factor
    seconds: float = 0.0
    seeds: list[int] = field(default_factory=list)


def pick_device(device: str = "auto") -> torch.device:
    """'auto' takes CUDA, then Apple's MPS, then the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise SdtorchError(f"unknown device {device!r}; accepted: auto, cpu, cuda, cuda:N, mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SdtorchError("device 'cuda' asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise SdtorchError("device 'mps' asked for, but this PyTorch has no MPS support here; use --device cpu")
    return torch.device(device)


def default_dtype(device: torch.device) -> str:
    """Half precision where GPUs are made for it; fp32 on the CPU, where fp16 is slow."""
    return "fp32" if device.type == "cpu" else "fp16"


def default_model_path() -> Path:
    """The embedded shapes model shipped in the package (`python -m sdtorch.train` makes it), or a
    clear error where an install has lost it."""
    path = Path(str(resources.files("sdtorch") / EMBEDDED_MODEL))
    if not path.is_file():
        raise SdtorchError(
            f"no --model given, and the embedded default model ({path}) is missing from this install; "
            "reinstall sdtorch, or pass --model PATH to an SD 1.x checkpoint (.safetensors, .ckpt) or diffusers folder"
        )
    return path


class Pipeline:
    """A loaded model, ready to generate many times: `Pipeline.load(path).generate("a cat")`."""

    def __init__(self, model: StableDiffusion, model_path: str | os.PathLike | None = None):
        if model.config.prediction_type != "epsilon":
            raise SdtorchError(
                f"this model predicts {model.config.prediction_type!r}; sdtorch runs epsilon-prediction (SD 1.x) models"
            )
        self.model = model
        self.model_path = Path(model_path) if model_path else (Path(model.source) if model.source else None)
        self.tokenizer = get_tokenizer()

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto", dtype: str | None = None) -> Pipeline:
        target = pick_device(device)
        model = load_model(path, dtype=dtype or default_dtype(target), device=target)
        return cls(model, path)

    @property
    def model_name(self) -> str | None:
        return self.model_path.stem if self.model_path else None

    @cached_property
    def model_hash(self) -> str | None:
        """A1111's "Model hash" (sha256 of the file, 10 hex digits); None for a folder."""
        if self.model_path is None or not self.model_path.is_file():
            return None
        return model_hash(self.model_path)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], clip_skip: int = 1) -> torch.Tensor:
        """Prompts -> text context (B, 77, width) in the model's dtype."""
        ids = self.tokenizer(prompts).to(self.model.device)
        return self.model.text_encoder(ids, clip_skip=clip_skip)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final-scale latents -> images (B, 3, H, W) in about [-1, 1], float32."""
        vae = self.model.vae
        return vae.decode((latents / vae.config.scaling_factor).to(self.model.device, self.model.dtype)).float()

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        steps: int = 20,
        cfg_scale: float | None = None,
        sampler: str = DEFAULT_SAMPLER,
        karras: bool = False,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        batch: int = 1,
        init_image: Image.Image | None = None,
        strength: float = 0.75,
        eta: float = 0.0,
        clip_skip: int = 1,
        callback: StepCallback | None = None,
        progress: bool = True,
    ) -> GenerationResult:
        """Generate `batch` images; image i uses seed + i. With `init_image`, image-to-image:
        the init image is resized to width x height, encoded, noised to `strength`, and only the
        last int(steps * strength) steps run. A size left None is the model's own (text-to-image)
        or the init image's, rounded down to a multiple of 8 (image-to-image, as diffusers does).
        `cfg_scale` None is the model's own default (7.5 for SD checkpoints)."""
        started = time.perf_counter()
        seed = random.randrange(2**32) if seed is None else seed
        cfg_scale = self.model.config.default_cfg_scale if cfg_scale is None else cfg_scale
        check_settings(
            steps=steps, cfg_scale=cfg_scale, sampler=sampler, karras=karras, seed=seed, batch=batch,
            strength=strength, img2img=init_image is not None, width=width, height=height,
        )
        model, device = self.model, self.model.device
        init_pixels = None
        if init_image is not None:
            init_pixels = prepare_init_image(init_image, width, height)  # (1, 3, H, W)
            height, width = init_pixels.shape[-2:]
        width, height = width or model.config.image_size, height or model.config.image_size
        f = model.config.vae.downscale
        shape = (1, model.config.unet.in_channels, height // f, width // f)
        seeds = [seed + i for i in range(batch)]
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]

        context = self.encode_prompt([prompt] * batch, clip_skip)
        uncond = self.encode_prompt([negative_prompt] * batch, clip_skip) if cfg_scale > 1 else None

        init_latents = None
        if init_pixels is not None:
            posterior = model.vae.encode(init_pixels.to(device, model.dtype))
            # One VAE sample per image from its own generator, before its noise, as diffusers does.
            init_latents = torch.cat([posterior.sample(g).float().cpu() for g in generators])
            init_latents = (init_latents * model.config.vae.scaling_factor).to(device)
        noise = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]).to(device)

        eps_model = guided_eps_model(model, context, uncond, cfg_scale)
        latents = sample(
            sampler,
            eps_model,
            noise,
            steps,
            karras=karras,
            eta=eta,
            generator=generators,
            init_latents=init_latents,
            strength=strength if init_image is not None else 1.0,
            callback=callback,
            progress=progress,
        )
        images = to_pil(self.decode(latents))
        params = [
            GenerationParams(
                prompt=prompt,
                negative_prompt=negative_prompt,
                steps=steps,
                sampler=a1111_name(sampler, karras),
                cfg_scale=cfg_scale,
                seed=s,
                width=width,
                height=height,
                model_hash=self.model_hash,
                model=self.model_name,
                denoising_strength=strength if init_image is not None else None,
                extra={"Clip skip": str(clip_skip)} if clip_skip != 1 else {},
            )
            for s in seeds
        ]
        return GenerationResult(images, params, latents, time.perf_counter() - started, seeds)


def check_settings(
    *, steps, cfg_scale, sampler, karras, seed, batch, strength, img2img, width=None, height=None
) -> None:
    """Reject what the user can fix, one line each, before any work is done (sizes and CFG scale
    left None are not checked: the model's own are used)."""
    for name, value in (("width", width), ("height", height)):
        if value is not None and (not isinstance(value, int) or value < 8 or value % 8):
            raise SdtorchError(f"{name} {value} is not accepted; use a multiple of 8 (e.g. 512)")
    if not isinstance(steps, int) or steps < 1:
        raise SdtorchError(f"steps must be a whole number of at least 1, got {steps}")
    if cfg_scale is not None and cfg_scale < 0:
        raise SdtorchError(f"CFG scale must be 0 or more, got {cfg_scale}")
    a1111_name(sampler, karras)  # raises for an unknown sampler, or Karras where it does not apply
    if not isinstance(batch, int) or batch < 1:
        raise SdtorchError(f"batch must be at least 1, got {batch}")
    if seed is not None and not 0 <= seed <= MAX_SEED - batch:
        raise SdtorchError(f"seed must be between 0 and {MAX_SEED - batch}, got {seed}")
    if img2img and not 0 < strength <= 1:
        raise SdtorchError(f"strength must be in (0, 1], got {strength}")


def guided_eps_model(model: StableDiffusion, context: torch.Tensor, uncond: torch.Tensor | None, scale: float):
    """The UNet's noise prediction with classifier-free guidance (Ho & Salimans 2022):
    eps = eps(uncond) + scale * (eps(cond) - eps(uncond)), both halves in one batched UNet call.
    Without `uncond` (scale <= 1, as diffusers decides) the conditional prediction alone."""
    unet, dtype = model.unet, model.dtype
    both = None if uncond is None else torch.cat([uncond, context])

    def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if both is None:
            return unet(x.to(dtype), t, context).float()
        eps_uncond, eps_cond = unet(torch.cat([x, x]).to(dtype), t, both).float().chunk(2)
        return eps_uncond + scale * (eps_cond - eps_uncond)

    return eps_model
