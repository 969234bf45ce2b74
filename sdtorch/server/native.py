"""sdtorch's own job API, beside A1111's: JSON under our field names (those of `GenerationRequest`),
None meaning "the model's own" as it does there."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from sdtorch.request import GenerationRequest

from .imagedata import image_from_base64


class JobRequest(BaseModel):
    """POST /api/jobs. Unknown fields are ignored; null means the default."""

    model_config = ConfigDict(extra="ignore")

    prompt: str | None = ""
    negative_prompt: str | None = ""
    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str | None = None
    schedule: str | None = None
    seed: int | None = None  # None or -1: random
    width: int | None = None
    height: int | None = None
    batch: int | None = None
    iterations: int | None = Field(default=1, ge=1, le=100)
    init_image: str | None = None  # base64 or a data URL
    strength: float | None = None
    eta: float | None = None
    clip_skip: int | None = None
    compat: str | None = None  # None: the server's mode (serve --compat)
    rng: str | None = None  # None: the server's noise source (A1111's randn_source)
    model: str | None = None  # a title (or any alias) from /sdapi/v1/sd-models; None: the current one
    full_preview_every: int | None = Field(default=0, ge=0)  # full VAE decode of the prediction every N steps


def to_request(body: JobRequest, *, clip_skip: int = 1, compat: str = "diffusers", rng: str = "cpu",
               max_pixels: int) -> GenerationRequest:
    """The request a job asks for, with the server's settings (clip skip, mode, noise source) where it gives none."""
    fields = {name: getattr(body, name) for name in ("steps", "cfg_scale", "sampler", "schedule", "width", "height",
                                                     "batch", "strength", "eta", "clip_skip", "compat", "rng")
              if getattr(body, name) is not None}
    fields = {"clip_skip": clip_skip, "compat": compat, "rng": rng} | fields
    seed = body.seed if body.seed is not None and body.seed != -1 else None
    init = image_from_base64(body.init_image, "init_image", max_pixels=max_pixels) if body.init_image else None
    return GenerationRequest(prompt=body.prompt or "", negative_prompt=body.negative_prompt or "", seed=seed,
                             init_image=init, **fields)


def request_json(request: GenerationRequest) -> dict:
    """A resolved request under our names (no image), for the page to show and send back."""
    out = {name: getattr(request, name) for name in ("prompt", "negative_prompt", "steps", "cfg_scale", "sampler",
                                                     "schedule", "seed", "width", "height", "batch", "clip_skip",
                                                     "compat", "rng")}
    if request.img2img:
        out["strength"] = request.strength
    if request.eta:
        out["eta"] = request.eta
    return out
