"""One generation's settings, under our names, with their defaults and their checks in one place.

Every entry point builds a `GenerationRequest` (the CLI from its options, the Python API from
keywords, `--from-png` from an A1111 record through `sdtorch.metadata`, the server from JSON) and
the pipeline runs it. `validate()` is the one check of what a user can get wrong; it runs before
any model is loaded, and again with the model for what depends on it (clip skip, the model's
prediction). `resolved(model)` fills what was left to the model (seed, size, guidance) so that the
result says exactly what was made.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from PIL import Image

from sdtorch.conditioning import EMPHASIS
from sdtorch.errors import SdtorchError
from sdtorch.samplers.noise import rng_source
from sdtorch.samplers.registry import check_compat, resolve_schedule, sampler_entry

MAX_SEED = 2**63 - 1
LATENT_STRIDE = 8  # pixels per latent pixel: sizes are multiples of this
# Beyond this many pixels in one image the activations alone outgrow any machine we run on; the
# check keeps a typo (width=51200) from reaching the model (`sdtorch.memory` plans what is below it).
MAX_PIXELS_PER_CALL = 64 * 1024 * 1024
DECODERS = ("vae", "taesd")  # what decodes the final latents (sdtorch.taesd for the tiny one)


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """What to generate. None means "the model's own" (guidance, size) or "draw one" (seed).

    Image i of a batch uses seed + i (AUTOMATIC1111's convention). With `init_image`, image-to-image:
    the picture is encoded, noised to `strength`, and only the last int(steps * strength) steps run.
    `options` carries settings that have no field yet, as text, so that they travel (and are
    recorded) without each entry point knowing them.
    """

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float | None = None
    sampler: str = "euler_a"
    schedule: str = "uniform"  # a schedule type (`sdtorch samplers`); "automatic": the sampler's default
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    batch: int = 1
    init_image: Image.Image | None = field(default=None, compare=False, repr=False)
    strength: float = 0.75
    # Inpainting (sdtorch.inpaint, with init_image): repaint where `mask` is white, as A1111 does
    mask: Image.Image | None = field(default=None, compare=False, repr=False)
    mask_blur: int = 4  # Gaussian blur radius of the mask, pixels
    invert_mask: bool = False
    masked_content: str = "original"  # what the masked area starts from: fill, original, latent_noise, latent_nothing
    inpaint_area: str = "whole"  # "whole" picture, or "masked": only the masked region, at full size, pasted back
    inpaint_padding: int = 32  # pixels around the masked region, with inpaint_area "masked"
    outpaint: tuple[int, int, int, int] | None = None  # (left, right, top, bottom) pixels to extend init_image by
    # Hires fix (sdtorch.hires, text-to-image): upscale by hires_scale, then image-to-image at the large size
    hires_scale: float | None = None
    hires_steps: int = 0  # 0: as many as `steps`
    hires_strength: float = 0.7  # A1111's "Denoising strength" of the second pass
    hires_upscaler: str = "latent"  # latent, latent-bicubic, lanczos, nearest
    # ... or to a size instead of a scale (A1111's "Resize width/height to", hr_resize_x/y): one side alone keeps
    # the aspect ratio; both: upscaled to cover that size, then cropped to it (A1111's latent truncation)
    hires_width: int | None = None
    hires_height: int | None = None
    decoder: str = "vae"  # the final decode: "vae" (the model's, or --vae's) or "taesd" (the tiny autoencoder)
    eta: float = 0.0  # DDIM's eta (Song et al. 2020): 0 deterministic
    # A fast mode: guidance for this fraction of the steps only, the conditional pass alone after it (one UNet
    # batch instead of two; diffusers' "CFG cut-off" callback). None: every step guided
    cfg_cutoff: float | None = None
    # A fast mode: DeepCache (sdtorch.deepcache), the whole UNet every deep_cache-th step, its deep features
    # reused between. None: off
    deep_cache: int | None = None
    clip_skip: int = 1
    emphasis: str = "original"  # A1111's: "original" (weights, then the mean restored) or "no_norm"
    # Where the noise comes from and whose sampling path runs (sdtorch.samplers.noise, samplers.run):
    rng: str = "cpu"  # "cpu": torch's CPU generator (diffusers, ComfyUI); "gpu"/"nv": CUDA's numbers (A1111's default)
    compat: str = "diffusers"  # "diffusers": equal to diffusers' pipelines; "a1111": equal to AUTOMATIC1111
    # A1111 mode only: its eta noise seed delta, variation seed and strength, "Seed resize from" (width, height)
    ensd: int = 0
    variation_seed: int | None = None
    variation_strength: float = 0.0
    seed_resize_from: tuple[int, int] | None = None
    options: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def replace(self, **changes) -> GenerationRequest:
        return dataclasses.replace(self, **changes)

    @property
    def img2img(self) -> bool:
        return self.init_image is not None

    @property
    def hires(self) -> bool:
        """Whether the hires fix runs: a scale, or a width or height to upscale to."""
        return self.hires_scale is not None or self.hires_width is not None or self.hires_height is not None

    @property
    def seeds(self) -> list[int]:
        if self.seed is None:
            raise ValueError("the request has no seed yet; use resolved() or with_seed()")
        if self.variation_strength:  # A1111: with a variation, every image has the seed, the variation seed + i
            return [self.seed] * self.batch
        return [self.seed + i for i in range(self.batch)]

    def with_seed(self) -> GenerationRequest:
        """The request with its seed drawn (once), if it had none: A1111's seed -1; the variation seed too,
        when a variation strength asks for one."""
        request = self if self.seed is not None else self.replace(seed=random.randrange(2**32))
        if request.variation_strength and request.variation_seed is None:
            request = request.replace(variation_seed=random.randrange(2**32))
        return request

    def validate(self, model=None) -> None:
        """Raise SdtorchError, one line naming what is accepted, for anything a user can fix.

        Sizes and guidance left None are not checked (the model's own are used). With `model` (a
        `StableDiffusion`), also what depends on it.
        """
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise SdtorchError(f"{name.replace('_', ' ')} must be text, got {type(getattr(self, name)).__name__}")
        for name, value in (("width", self.width), ("height", self.height)):
            if value is not None and (not _is_int(value) or value < LATENT_STRIDE or value % LATENT_STRIDE):
                raise SdtorchError(f"{name} {value} is not accepted; use a multiple of 8 (e.g. 512)")
        if not _is_int(self.steps) or self.steps < 1:
            raise SdtorchError(f"steps must be a whole number of at least 1, got {self.steps}")
        if self.cfg_scale is not None and (not _is_number(self.cfg_scale) or self.cfg_scale < 0):
            raise SdtorchError(f"CFG scale must be a number of 0 or more, got {self.cfg_scale}")
        entry = sampler_entry(self.sampler)  # raises for an unknown sampler
        rng_source(self.rng)
        check_compat(self.compat)
        resolve_schedule(entry, self.schedule, self.compat)  # raises for a schedule the sampler does not take
        self._validate_noise_options()
        self._validate_inpaint()
        if not _is_number(self.eta) or (self.eta != 0.0 and "eta" not in entry.options):
            raise SdtorchError(f"eta applies to the ddim sampler only, not {self.sampler!r}")
        if not 0 <= self.eta <= 1:
            raise SdtorchError(f"eta must be between 0 and 1, got {self.eta}")
        if self.cfg_cutoff is not None and (not _is_number(self.cfg_cutoff) or not 0 < self.cfg_cutoff <= 1):
            raise SdtorchError(f"CFG cut-off must be a fraction of the steps above 0 and at most 1 (e.g. 0.5), "
                               f"got {self.cfg_cutoff}")
        if self.deep_cache is not None and (not _is_int(self.deep_cache) or self.deep_cache < 2):
            raise SdtorchError(f"DeepCache's interval must be a whole number of steps of at least 2 (e.g. 3), "
                               f"got {self.deep_cache}")
        for name, on in (("CFG cut-off", self.cfg_cutoff is not None), ("DeepCache", self.deep_cache is not None)):
            if on and (self.compat == "a1111" or self.mask is not None or self.outpaint):
                raise SdtorchError(f"{name} runs in text-to-image and image-to-image of the default mode only "
                                   "(not with --compat a1111, a mask or outpainting)")
        if not _is_int(self.batch) or self.batch < 1:
            raise SdtorchError(f"batch must be at least 1, got {self.batch}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED - self.batch):
            raise SdtorchError(f"seed must be between 0 and {MAX_SEED - self.batch}, got {self.seed}")
        if self.emphasis not in EMPHASIS:
            raise SdtorchError(f"unknown emphasis {self.emphasis!r}; accepted: {', '.join(EMPHASIS)}")
        if not _is_int(self.clip_skip) or self.clip_skip < 1:
            raise SdtorchError(f"clip skip must be a whole number of at least 1, got {self.clip_skip}")
        if self.img2img:
            if min(self.init_image.size) < LATENT_STRIDE:
                raise SdtorchError(
                    f"the image is {self.init_image.width}x{self.init_image.height} pixels; "
                    "image-to-image needs at least 8x8"
                )
            if not _is_number(self.strength) or not 0 < self.strength <= 1:
                raise SdtorchError(f"strength must be in (0, 1], got {self.strength}")
            if int(self.steps * self.strength) == 0 and self.compat != "a1111":  # A1111 runs one more
                raise SdtorchError(
                    f"strength {self.strength} with {self.steps} steps runs no step; raise strength or steps"
                )
        pixels = (self.width or 0) * (self.height or 0)  # a batch runs in chunks that fit (sdtorch.memory)
        if pixels > MAX_PIXELS_PER_CALL:
            raise SdtorchError(
                f"{self.width}x{self.height} pixels is too large for one image; "
                f"keep width x height under {MAX_PIXELS_PER_CALL // 2**20} megapixels"
            )
        if model is not None:
            layers = model.config.text.layers
            if self.clip_skip > layers:
                raise SdtorchError(f"clip skip must be between 1 and {layers} for this model, got {self.clip_skip}")
            if self.steps > model.schedule.num_train_timesteps:
                raise SdtorchError(
                    f"steps must be between 1 and {model.schedule.num_train_timesteps}, got {self.steps}"
                )

    def resolved(self, model) -> GenerationRequest:
        """Validated against `model`, with nothing left to it: seed drawn, guidance, size and schedule
        filled in (the init image's size rounded down to a multiple of 8, as diffusers does)."""
        self.validate(model)
        width, height = self.width, self.height
        if self.init_image is not None:
            width = width or self.init_image.width - self.init_image.width % LATENT_STRIDE
            height = height or self.init_image.height - self.init_image.height % LATENT_STRIDE
        resolved = self.with_seed().replace(
            cfg_scale=model.config.default_cfg_scale if self.cfg_scale is None else float(self.cfg_scale),
            width=width or model.config.image_size,
            height=height or model.config.image_size,
            schedule=resolve_schedule(sampler_entry(self.sampler), self.schedule, self.compat),
        )
        resolved.validate(model)  # the filled-in size, against the size limit
        return resolved

    def per_image(self) -> list[GenerationRequest]:
        """One request per image of the batch, each with its own seed (and variation seed, as A1111 numbers
        them): what regenerates it alone."""
        variation = [None] * self.batch if self.variation_seed is None else [
            self.variation_seed + i for i in range(self.batch)]
        return [self.replace(seed=s, batch=1, variation_seed=v) for s, v in zip(self.seeds, variation)]

    def _validate_inpaint(self) -> None:
        from sdtorch.hires import UPSCALERS, hires_target
        from sdtorch.inpaint import INPAINT_AREAS, MASKED_CONTENT

        if self.decoder not in DECODERS:
            raise SdtorchError(f"unknown decoder {self.decoder!r}; accepted: {', '.join(DECODERS)}")
        if self.hires:
            if self.init_image is not None or self.mask is not None:
                raise SdtorchError("hires fix applies to text-to-image only; leave out the init image")
            resize = self.hires_width is not None or self.hires_height is not None
            if resize and self.hires_scale is not None:
                raise SdtorchError("give the hires fix a scale or a width/height to upscale to, not both")
            if self.hires_scale is not None and (not _is_number(self.hires_scale) or not 1 < self.hires_scale <= 8):
                raise SdtorchError(f"hires scale must be a number above 1, at most 8, got {self.hires_scale}")
            for name in ("hires_width", "hires_height"):
                value = getattr(self, name)
                if value is not None and (not _is_int(value) or value < LATENT_STRIDE or value % LATENT_STRIDE):
                    raise SdtorchError(f"{name.replace('_', ' ')} {value} is not accepted; use a multiple of 8")
            if not _is_int(self.hires_steps) or self.hires_steps < 0:
                raise SdtorchError(f"hires steps must be a whole number, 0 (as many as steps) or more, "
                                   f"got {self.hires_steps}")
            if not _is_number(self.hires_strength) or not 0 < self.hires_strength <= 1:
                raise SdtorchError(f"hires strength must be in (0, 1], got {self.hires_strength}")
            if int((self.hires_steps or self.steps) * self.hires_strength) == 0:
                raise SdtorchError("the hires pass runs no step; raise --hires-strength or --hires-steps")
            if self.hires_upscaler not in UPSCALERS:
                raise SdtorchError(f"unknown hires upscaler {self.hires_upscaler!r}; accepted: {', '.join(UPSCALERS)}")
            if self.compat != "diffusers":
                raise SdtorchError("hires fix runs in diffusers mode only; leave out --compat a1111")
            if _is_int(self.width) and _is_int(self.height) and _is_int(self.batch):  # the large size's checks
                (up_x, up_y), (out_x, out_y) = hires_target(self)
                if min(up_x, up_y, out_x, out_y) < LATENT_STRIDE:
                    raise SdtorchError(f"the hires fix of {self.width}x{self.height} to {out_x}x{out_y} pixels is "
                                       "too small; each side must be at least 8")
                if up_x * up_y > MAX_PIXELS_PER_CALL:
                    raise SdtorchError(f"the hires fix's {up_x}x{up_y} pixels is too large for one image; "
                                       f"keep width x height under {MAX_PIXELS_PER_CALL // 2**20} megapixels")
        if self.outpaint is not None:
            sides = tuple(self.outpaint)
            if len(sides) != 4 or not all(_is_int(v) and v >= 0 and v % LATENT_STRIDE == 0 for v in sides) \
                    or not any(sides):
                raise SdtorchError(f"outpaint takes left,right,top,bottom pixels, multiples of 8, got {sides}")
            if self.init_image is None:
                raise SdtorchError("outpainting needs the picture to extend: give an init image")
            if self.mask is not None:
                raise SdtorchError("outpainting makes its own mask; leave out the mask")
            if self.compat != "diffusers":
                raise SdtorchError("outpainting runs in diffusers mode only; leave out --compat a1111")
        if self.mask is None:
            return
        if not isinstance(self.mask, Image.Image):
            raise SdtorchError(f"the mask must be an image, got {type(self.mask).__name__}")
        if self.init_image is None:
            raise SdtorchError("a mask needs the picture to inpaint: give an init image too")
        if self.compat != "diffusers":
            raise SdtorchError("inpainting runs in diffusers mode only; leave out --compat a1111")
        if self.masked_content not in MASKED_CONTENT:
            raise SdtorchError(f"unknown masked content {self.masked_content!r}; accepted: {', '.join(MASKED_CONTENT)}")
        if self.inpaint_area not in INPAINT_AREAS:
            raise SdtorchError(f"unknown inpaint area {self.inpaint_area!r}; accepted: {', '.join(INPAINT_AREAS)}")
        for name in ("mask_blur", "inpaint_padding"):
            value = getattr(self, name)
            if not _is_int(value) or not 0 <= value <= 256:
                raise SdtorchError(f"{name.replace('_', ' ')} must be a whole number of pixels, 0 to 256, got {value}")
        if not isinstance(self.invert_mask, bool):
            raise SdtorchError(f"invert mask must be true or false, got {self.invert_mask!r}")

    def _validate_noise_options(self) -> None:
        a1111_only = [name for name, value, default in (
            ("ensd", self.ensd, 0), ("variation strength", self.variation_strength, 0.0),
            ("seed resize from", self.seed_resize_from, None)) if value != default]
        if a1111_only and self.compat != "a1111":
            raise SdtorchError(f"{', '.join(a1111_only)} apply in A1111 mode only; add --compat a1111")
        if not _is_int(self.ensd) or not 0 <= self.ensd <= MAX_SEED:
            raise SdtorchError(f"ENSD (eta noise seed delta) must be a whole number of 0 or more, got {self.ensd}")
        if not _is_number(self.variation_strength) or not 0 <= self.variation_strength <= 1:
            raise SdtorchError(f"variation strength must be between 0 and 1, got {self.variation_strength}")
        if self.variation_seed is not None and (not _is_int(self.variation_seed)
                                                or not 0 <= self.variation_seed <= MAX_SEED - self.batch):
            raise SdtorchError(
                f"variation seed must be between 0 and {MAX_SEED - self.batch}, got {self.variation_seed}")
        if self.seed_resize_from is not None:
            size = tuple(self.seed_resize_from)
            if len(size) != 2 or not all(_is_int(v) and v >= LATENT_STRIDE for v in size):
                raise SdtorchError(f"seed resize from must be (width, height) of at least 8 each, got {size}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
