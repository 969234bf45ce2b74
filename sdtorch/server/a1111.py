"""AUTOMATIC1111's /sdapi/v1 JSON <-> `GenerationRequest`, and its response shapes.

Requests are pydantic models with A1111's fields and defaults (those of its processing classes and
API models, v1.9/1.10): every field optional and nullable, unknown fields ignored, numbers coerced
as pydantic does (20.0 and "20" are 20; 20.5 is a 422). The hires fix (`enable_hr`, `hr_scale` or
`hr_resize_x`/`hr_resize_y`, `hr_upscaler`, `hr_second_pass_steps`, `denoising_strength`) and inpainting
(`mask` and its fields) map onto the request. Fields sdtorch cannot honour yet (face restoration, scripts,
subseeds, a second-pass sampler or prompt, ...) are accepted and listed under "sdtorch.ignored" in
`info`, so a client is never silently misled about what it got.

Sampler names follow A1111's `get_sampler_and_scheduler`: `sampler_name` (or the legacy
`sampler_index`) is a display name ("DPM++ 2M"), an alias ("k_dpmpp_2m") or ours ("dpmpp_2m"), and
a trailing schedule label ("DPM++ 2M Karras") wins over `scheduler`, which takes a name or a label.
Where A1111 silently falls back to its first sampler for an unknown name, we answer 400 and list
the valid ones.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

import sdtorch
from sdtorch.errors import SdtorchError
from sdtorch.metadata import parse_parameters
from sdtorch.request import GenerationRequest
from sdtorch.samplers import SAMPLERS
from sdtorch.samplers.registry import ALL_SAMPLERS, COMPAT_MODES, SamplerEntry, resolve_schedule
from sdtorch.samplers.schedule_types import A1111_SAMPLERS
from sdtorch.samplers.schedule_types import SCHEDULE_TYPES as A1111_SCHEDULE_TYPES

from .imagedata import image_from_base64, resize_for

VERSION = f"sdtorch {sdtorch.__version__}"
DEFAULT_SAMPLER = "Euler"  # A1111's API default (sampler_index)
MAX_IMAGES = 100  # batch_size x n_iter of one request


class ApiError(Exception):
    """An HTTP error in A1111's envelope: {"error", "detail", "body", "errors"}."""

    def __init__(self, status: int, detail: str, *, headers: dict | None = None, error: str = "HTTPException"):
        super().__init__(detail)
        self.status, self.detail, self.headers, self.error = status, detail, headers or {}, error


# ----------------------------------------------------------------------------------------------
# Requests


class _Common(BaseModel):
    """StableDiffusionProcessing's fields, as A1111's API model makes them."""

    model_config = ConfigDict(extra="ignore")

    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int | None = -1
    subseed: int | None = -1
    subseed_strength: float | None = 0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int | None = 1
    n_iter: int | None = 1
    steps: int | None = 50
    cfg_scale: float | None = 7.0
    width: int | None = 512
    height: int | None = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool | None = False
    do_not_save_grid: bool | None = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool | None = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool | None = False
    comments: dict[str, Any] | None = None
    force_task_id: str | None = None
    sampler_index: str | None = DEFAULT_SAMPLER
    script_name: str | None = None
    script_args: list[Any] | None = []
    send_images: bool | None = True
    save_images: bool | None = False
    alwayson_scripts: dict[str, Any] | None = {}
    infotext: str | None = None
    clip_skip: int | None = None  # SD.Next's field; A1111 takes it from override_settings

    @field_validator("seed", "subseed", mode="before")
    @classmethod
    def _empty_seed(cls, value):
        return -1 if value == "" else value


class Txt2ImgRequest(_Common):
    denoising_strength: float | None = 0.75
    enable_hr: bool | None = False
    firstphase_width: int | None = 0
    firstphase_height: int | None = 0
    hr_scale: float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = 0
    hr_resize_x: int | None = 0
    hr_resize_y: int | None = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""
    firstpass_image: str | None = None


class Img2ImgRequest(_Common):
    init_images: list[str] | None = None
    resize_mode: int | None = 0
    denoising_strength: float | None = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int | None = 4
    mask_blur_y: int | None = 4
    mask_blur: int | None = None
    mask_round: bool | None = True
    inpainting_fill: int | None = 0
    inpaint_full_res: bool | None = True
    inpaint_full_res_padding: int | None = 0
    inpainting_mask_invert: int | None = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool | None = False


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str | None = None


# ----------------------------------------------------------------------------------------------
# Sampler names


def mode_samplers(compat: str) -> dict[str, SamplerEntry]:
    """The samplers a mode runs: the default mode's, or every one with an A1111-mode form."""
    return SAMPLERS if compat == "diffusers" else {n: e for n, e in ALL_SAMPLERS.items() if "a1111" in e.modes}


def _sampler_table(compat: str) -> dict[str, str]:
    table = {}
    for ours, entry in mode_samplers(compat).items():
        a1111 = A1111_SAMPLERS.get(entry.display_name)
        for name in (ours, entry.display_name, *(a1111.aliases if a1111 else ())):
            table[name.lower()] = ours
    return table


_SAMPLER_NAMES = {compat: _sampler_table(compat) for compat in COMPAT_MODES}
_OUR_SCHEDULES = ("automatic", "uniform", "karras")


def _mode_schedules(compat: str) -> tuple[str, ...]:
    return _OUR_SCHEDULES if compat == "diffusers" else tuple(A1111_SCHEDULE_TYPES)


def mode_schedules(entry: SamplerEntry, compat: str) -> tuple[str, ...]:
    """The schedule types a sampler takes in a mode, "automatic" left out."""
    if compat == "diffusers":
        return entry.schedules
    return ("uniform",) if entry.space == "vp" else tuple(n for n in A1111_SCHEDULE_TYPES if n != "automatic")


def _schedule_name(text: str) -> str | None:
    key = text.strip().lower()
    for s in A1111_SCHEDULE_TYPES.values():
        if key in (s.name, s.label.lower(), *(a.lower() for a in s.aliases)):
            return s.name
    return None


def _split_schedule(low: str, schedule: str | None, names: dict[str, str]) -> tuple[str, str | None]:
    """'dpm++ 2m karras' -> ('dpm++ 2m', 'karras'): a trailing schedule type (label, name or alias)."""
    for s in A1111_SCHEDULE_TYPES.values():
        for option in (s.label, s.name, *s.aliases):
            head = low[: -len(option) - 1]
            if low.endswith(" " + option.lower()) and head in names:
                return head, s.name
    return low, schedule


def resolve_sampler(sampler_name: str | None, scheduler: str | None = None,
                    compat: str = "diffusers") -> tuple[str, str]:
    """A1111's sampler (and scheduler) names -> (our sampler, our schedule type) in the server's mode, or a 400
    naming what is valid there."""
    name = " ".join((sampler_name or DEFAULT_SAMPLER).split())
    names, schedules = _SAMPLER_NAMES[compat], _mode_schedules(compat)
    schedule = None
    if scheduler is not None and scheduler.strip():
        schedule = _schedule_name(scheduler)
        if schedule not in schedules:
            raise ApiError(400, f"Scheduler not found: {scheduler!r}; valid schedulers: "
                                f"{', '.join(A1111_SCHEDULE_TYPES[s].label for s in schedules)}")
    low = name.lower()
    if low not in names:  # a legacy combined name: "DPM++ 2M Karras"
        low, schedule = _split_schedule(low, schedule, names)
    samplers = mode_samplers(compat)
    if low not in names:
        valid = ", ".join(entry.display_name for entry in samplers.values())
        raise ApiError(400, f"Sampler not found: {name!r}; valid samplers: {valid} "
                            "(a name may end in a schedule type: Karras, Uniform)")
    ours = names[low]
    schedule = schedule or "automatic"
    if compat == "a1111":
        try:
            resolve_schedule(samplers[ours], schedule, compat)
        except SdtorchError as e:
            raise ApiError(400, str(e)) from None
        return ours, schedule
    accepted = ("automatic", *samplers[ours].schedules)
    if schedule not in accepted:
        labels = ", ".join(A1111_SCHEDULE_TYPES[s].label for s in accepted)
        raise ApiError(400, f"sampler {samplers[ours].display_name!r} does not run with the "
                            f"{A1111_SCHEDULE_TYPES[schedule].label!r} schedule here; it takes: {labels} "
                            "(a server started with --compat a1111 lays out every A1111 schedule type)")
    return ours, schedule


# ----------------------------------------------------------------------------------------------
# Request -> GenerationRequest


@dataclass
class Submission:
    request: GenerationRequest  # seed drawn, batch = batch_size
    iterations: int  # n_iter
    model: str | None  # override_settings' sd_model_checkpoint
    keep_model: bool  # the override stays the default afterwards
    ignored: list[str]


def _value(value, default):
    return default if value is None else value


@dataclass
class ServerSettings:
    """What a request that does not say takes from the server (A1111's settings, /sdapi/v1/options): the mode
    (`serve --compat`), clip skip (CLIP_stop_at_last_layers), the noise source (randn_source: A1111's GPU by
    default in A1111 mode, the CPU's as diffusers draws it otherwise) and the eta noise seed delta."""

    compat: str = "diffusers"
    clip_skip: int = 1
    randn_source: str | None = None  # None: the mode's default
    ensd: int = 0

    @property
    def rng(self) -> str:
        return (self.randn_source or ("GPU" if self.compat == "a1111" else "CPU")).lower()


# override_settings keys a request may give (the rest are listed as ignored)
OVERRIDES = ("sd_model_checkpoint", "CLIP_stop_at_last_layers", "eta_ddim", "sd_vae_decode_method", "randn_source",
             "eta_noise_seed_delta", "eta_ancestral")
# A1111-mode sampler settings: the request field -> A1111's infotext key, which the request's options carry
_KDIFFUSION_FIELDS = {"s_churn": "Sigma churn", "s_tmin": "Sigma tmin", "s_tmax": "Sigma tmax",
                      "s_noise": "Sigma noise"}


def _ignored(body: _Common, sampler: str, compat: str) -> list[str]:
    ignored = []
    hires = bool(getattr(body, "enable_hr", False))
    a1111 = compat == "a1111"
    takes = ALL_SAMPLERS[sampler].a1111_options if a1111 else ()
    checks = {
        "hr_sampler_name": hires and body.hr_sampler_name not in (None, "", "Use same sampler", body.sampler_name),
        "hr_scheduler": hires and body.hr_scheduler not in (None, "", "Use same scheduler", body.scheduler),
        "hr_prompt": hires and body.hr_prompt not in (None, "", body.prompt),
        "hr_negative_prompt": hires and body.hr_negative_prompt not in (None, "", body.negative_prompt),
        "hr_checkpoint_name": hires and bool(body.hr_checkpoint_name),
        "firstphase_width": hires and bool(body.firstphase_width),
        "firstphase_height": hires and bool(body.firstphase_height),
        "restore_faces": bool(body.restore_faces),
        "tiling": bool(body.tiling), "subseed_strength": not a1111 and bool(body.subseed_strength),
        "seed_resize_from_w": not a1111 and _value(body.seed_resize_from_w, -1) > 0,
        "seed_resize_from_h": not a1111 and _value(body.seed_resize_from_h, -1) > 0,
        "styles": bool(body.styles), "script_name": bool(body.script_name),
        "alwayson_scripts": bool(body.alwayson_scripts), "refiner_checkpoint": bool(body.refiner_checkpoint),
        "s_churn": "s_churn" not in takes and bool(body.s_churn),
        "s_noise": "s_noise" not in takes and body.s_noise not in (None, 1.0),
        "s_tmin": "s_tmin" not in takes and bool(body.s_tmin), "s_tmax": "s_tmax" not in takes and bool(body.s_tmax),
        "s_min_uncond": bool(body.s_min_uncond),
        "eta": "eta" not in ALL_SAMPLERS[sampler].options and "eta" not in takes and body.eta not in (None, 0.0, 1.0),
        "firstpass_image": bool(getattr(body, "firstpass_image", None)),
        "save_images": bool(body.save_images), "infotext": bool(body.infotext),
    }
    ignored += [name for name, used in checks.items() if used]
    for key in (body.override_settings or {}):
        a1111_only = key == "eta_noise_seed_delta" and not a1111 or key == "eta_ancestral" and "eta" not in takes
        if key not in OVERRIDES or a1111_only:
            ignored.append(f"override_settings.{key}")
    return ignored


def _noise_fields(body: _Common, sampler: str, overrides: dict, settings: ServerSettings) -> dict:
    """The noise source, and in A1111 mode A1111's noise settings and k-diffusion options, as request fields."""
    rng = overrides.get("randn_source", settings.rng)
    if not isinstance(rng, str) or rng.lower() not in ("gpu", "cpu", "nv"):
        raise ApiError(422, f"randn_source must be GPU, CPU or NV, got {rng!r}", error="ValidationError")
    fields = {"rng": rng.lower(), "compat": settings.compat}
    if settings.compat != "a1111":
        return fields
    ensd = overrides.get("eta_noise_seed_delta", settings.ensd)
    if isinstance(ensd, bool) or not isinstance(ensd, int) or ensd < 0:
        raise ApiError(422, f"eta_noise_seed_delta must be a whole number of 0 or more, got {ensd!r}",
                       error="ValidationError")
    fields["ensd"] = ensd
    if body.subseed_strength:
        subseed = _value(body.subseed, -1)
        fields |= {"variation_strength": body.subseed_strength, "variation_seed": None if subseed == -1 else subseed}
    w, h = _value(body.seed_resize_from_w, -1), _value(body.seed_resize_from_h, -1)
    if w > 0 and h > 0:
        fields["seed_resize_from"] = (w, h)
    takes, options = ALL_SAMPLERS[sampler].a1111_options, {}
    if "eta" in takes:  # the ancestral samplers' eta (A1111's eta_ancestral, 1 by default)
        eta = _value(body.eta, overrides.get("eta_ancestral", 1.0))
        if eta != 1.0:
            options["Eta"] = str(eta)
    for name, key in _KDIFFUSION_FIELDS.items():
        value = getattr(body, name)
        if name in takes and value is not None and value != {"s_noise": 1.0}.get(name, 0.0):
            options[key] = str(value)  # A1111: s_tmax 0 means infinity, its default
    return fields | ({"options": options} if options else {})


def to_submission(body: _Common, *, settings: ServerSettings, max_pixels: int) -> Submission:
    """The generation an A1111 request asks for; ApiError 400/404/422 for what cannot be done."""
    sampler, schedule = resolve_sampler(body.sampler_name or body.sampler_index, body.scheduler, settings.compat)
    overrides = body.override_settings or {}
    model = overrides.get("sd_model_checkpoint")
    if model is not None and not isinstance(model, str):
        raise ApiError(422, "override_settings.sd_model_checkpoint must be a model title")
    clip = _value(body.clip_skip, overrides.get("CLIP_stop_at_last_layers", settings.clip_skip))
    seed = _value(body.seed, -1)
    eta = 0.0
    if "eta" in ALL_SAMPLERS[sampler].options:
        eta = _value(body.eta, overrides.get("eta_ddim", 0.0))
    fields = dict(
        prompt=_value(body.prompt, ""), negative_prompt=_value(body.negative_prompt, ""),
        steps=_value(body.steps, 50), cfg_scale=_value(body.cfg_scale, 7.0), sampler=sampler, schedule=schedule,
        seed=None if seed == -1 else seed, width=_value(body.width, 512), height=_value(body.height, 512),
        batch=_value(body.batch_size, 1), eta=eta, clip_skip=clip,
        decoder=_decoder(overrides.get("sd_vae_decode_method", "Full")),
    ) | _noise_fields(body, sampler, overrides, settings)
    iterations = _value(body.n_iter, 1)
    if not isinstance(iterations, int) or iterations < 1 or fields["batch"] * iterations > MAX_IMAGES:
        raise ApiError(422, f"batch_size x n_iter must be between 1 and {MAX_IMAGES}, "
                            f"got {fields['batch']} x {iterations}", error="ValidationError")
    if isinstance(body, Img2ImgRequest):
        if not body.init_images:
            raise ApiError(404, "Init image not found")
        try:
            image = image_from_base64(body.init_images[0], "init_images[0]", max_pixels=max_pixels)
            mode = _value(body.resize_mode, 0)
            if isinstance(fields["width"], int) and isinstance(fields["height"], int) and \
                    fields["width"] > 0 and fields["height"] > 0:
                image = resize_for(image, fields["width"], fields["height"], mode)
        except SdtorchError as e:
            raise ApiError(400, str(e)) from None
        fields |= {"init_image": image, "strength": _value(body.denoising_strength, 0.75)}
        if body.mask:
            fields |= _inpaint_fields(body, image.size, max_pixels)
    elif isinstance(body, Txt2ImgRequest) and body.enable_hr:
        fields |= _hires_fields(body)
    try:
        request = GenerationRequest(**fields)
        request.validate()
    except SdtorchError as e:
        raise ApiError(422, str(e), error="ValidationError") from None
    keep = not _value(body.override_settings_restore_afterwards, True)
    return Submission(request.with_seed(), iterations, model, keep, _ignored(body, sampler, settings.compat))


def _decoder(method) -> str:
    """A1111's sd_vae_decode_method ("Full", "TAESD") -> the request's decoder."""
    if not isinstance(method, str) or method.lower() not in ("full", "taesd"):
        raise ApiError(422, f"override_settings.sd_vae_decode_method must be 'Full' or 'TAESD', got {method!r}",
                       error="ValidationError")
    return "vae" if method.lower() == "full" else "taesd"


# A1111's hires upscaler names (`hr_upscaler`; its latent_upscale_modes and pixel upscalers) -> ours. A null is
# A1111's default, its "Latent"; its pixel upscaler "None" upscales nothing and then resizes with Lanczos.
HIRES_UPSCALERS = {"latent": "latent", "latent (bicubic)": "latent-bicubic", "lanczos": "lanczos",
                   "nearest": "nearest", "none": "lanczos"}


def _hires_fields(body: Txt2ImgRequest) -> dict:
    """A1111's hires fix fields -> the request's: a scale, or hr_resize_x / hr_resize_y (0: that side follows the
    aspect ratio; A1111 then ignores hr_scale), the upscaler, the second pass's steps and denoising strength."""
    name = body.hr_upscaler or "Latent"
    if name.lower() not in HIRES_UPSCALERS:
        raise ApiError(400, f"hr_upscaler {name!r} is not available; valid: Latent, Latent (bicubic), Lanczos, "
                            "Nearest, None")
    fields = {"hires_upscaler": HIRES_UPSCALERS[name.lower()], "hires_steps": _value(body.hr_second_pass_steps, 0),
              "hires_strength": _value(body.denoising_strength, 0.75)}
    resize_x, resize_y = _value(body.hr_resize_x, 0), _value(body.hr_resize_y, 0)
    if resize_x or resize_y:
        return fields | {"hires_width": resize_x or None, "hires_height": resize_y or None}
    return fields | {"hires_scale": _value(body.hr_scale, 2.0)}


# A1111's `inpainting_fill` numbers -> our masked-content names.
INPAINTING_FILL = ("fill", "original", "latent_noise", "latent_nothing")


def _inpaint_fields(body: Img2ImgRequest, size: tuple[int, int], max_pixels: int) -> dict:
    """A1111's inpainting fields -> the request's: the mask (resized to the picture, white repaints),
    its blur, inversion, masked content and inpaint area ("only masked" with its padding)."""
    try:
        mask = image_from_base64(body.mask, "mask", max_pixels=max_pixels)
    except SdtorchError as e:
        raise ApiError(400, str(e)) from None
    if mask.size != size:
        mask = mask.resize(size)
    fill = _value(body.inpainting_fill, 0)
    if fill not in range(len(INPAINTING_FILL)):
        raise ApiError(422, f"inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent "
                            f"nothing), got {fill}", error="ValidationError")
    blur = body.mask_blur if body.mask_blur is not None else _value(body.mask_blur_x, 4)
    return {
        "mask": mask, "mask_blur": blur, "invert_mask": bool(_value(body.inpainting_mask_invert, 0)),
        "masked_content": INPAINTING_FILL[fill],
        "inpaint_area": "masked" if _value(body.inpaint_full_res, True) else "whole",
        "inpaint_padding": _value(body.inpaint_full_res_padding, 0),
    }


# ----------------------------------------------------------------------------------------------
# Responses


def echo(body: _Common) -> dict:
    """A1111's `parameters`: the request with its defaults filled in (images left out unless asked)."""
    params = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        params["init_images"], params["mask"] = None, None
    return params


def info(job, body: _Common, ignored: list[str]) -> str:
    """A1111's `info`: Processed.js(), a JSON string."""
    outputs = job.outputs
    first = outputs[0].request if outputs else job.request
    entry = job.model_entry
    model_name = entry.model_name if entry else None
    sampler = ALL_SAMPLERS[first.sampler].display_name
    varied = first.compat == "a1111" and bool(first.variation_strength)  # A1111's subseeds are ours then
    subseed = first.variation_seed if varied else _value(body.subseed, -1)
    subseeds = [o.request.variation_seed for o in outputs] if varied else [subseed] * len(outputs)
    schedule = A1111_SCHEDULE_TYPES[first.schedule].label if first.schedule in A1111_SCHEDULE_TYPES else None
    data = {
        "prompt": first.prompt, "all_prompts": [o.request.prompt for o in outputs],
        "negative_prompt": first.negative_prompt, "all_negative_prompts": [o.request.negative_prompt for o in outputs],
        "seed": first.seed, "all_seeds": [o.request.seed for o in outputs],
        "subseed": subseed, "all_subseeds": subseeds,
        "subseed_strength": first.variation_strength if varied else _value(body.subseed_strength, 0),
        "width": first.width, "height": first.height,
        "sampler_name": sampler, "scheduler": schedule, "cfg_scale": first.cfg_scale, "steps": first.steps,
        "batch_size": job.request.batch, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": model_name,
        "sd_model_hash": entry.short_hash if entry else None, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": _value(body.seed_resize_from_w, -1),
        "seed_resize_from_h": _value(body.seed_resize_from_h, -1),
        "denoising_strength": first.strength if first.img2img else (first.hires_strength if first.hires else None),
        "extra_generation_params": {"Schedule type": schedule} if schedule else {},
        "index_of_first_image": 0, "infotexts": [o.infotext for o in outputs], "styles": body.styles or [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)),
        "clip_skip": first.clip_skip, "is_using_inpainting_conditioning": False, "version": VERSION,
        "sdtorch": {"state": job.state, "partial": [o.partial for o in outputs], "ignored": ignored,
                    "seconds": round((job.finished or time.time()) - (job.started or job.created), 3)},
    }
    return json.dumps(data, default=lambda o: None)


def png_info(text: dict[str, str]) -> dict:
    """POST /png-info: the 'parameters' text, the other text items, and A1111's parsed dict (strings)."""
    parameters = text.get("parameters", "")
    items = {k: v for k, v in text.items() if k != "parameters"}
    parsed: dict[str, str] = {}
    if parameters:
        try:
            p = parse_parameters(parameters)
        except SdtorchError:
            p = None
        if p is not None:
            parsed = {"Prompt": p.prompt, "Negative prompt": p.negative_prompt}
            for key, value in (("Steps", p.steps), ("Sampler", p.sampler), ("CFG scale", p.cfg_scale),
                               ("Seed", p.seed), ("Size-1", p.width), ("Size-2", p.height),
                               ("Model hash", p.model_hash), ("Model", p.model),
                               ("Denoising strength", p.denoising_strength)):
                if value is not None:
                    parsed[key] = str(value)
            parsed |= p.extra
    return {"info": parameters, "items": items, "parameters": parsed}


# ----------------------------------------------------------------------------------------------
# Listings


def samplers(compat: str = "diffusers") -> list[dict]:
    """/sdapi/v1/samplers: the samplers the server's mode runs, with A1111's aliases and options."""
    out = []
    for ours, entry in mode_samplers(compat).items():
        a1111 = A1111_SAMPLERS.get(entry.display_name)
        options = {}
        if a1111 is not None and a1111.scheduler and (compat == "a1111" or a1111.scheduler in entry.schedules):
            options["scheduler"] = a1111.scheduler
        if compat == "a1111" and a1111 is not None and a1111.discard_next_to_last_sigma:
            options["discard_next_to_last_sigma"] = "True"
        if entry.stochastic:
            options["uses_ensd"] = "True"
        aliases = [*(a1111.aliases if a1111 else ()), ours]
        out.append({"name": entry.display_name, "aliases": aliases, "options": options})
    return out


def schedulers(compat: str = "diffusers") -> list[dict]:
    """/sdapi/v1/schedulers: the schedule types the server's mode lays out."""
    out = []
    for name in _mode_schedules(compat):
        s = A1111_SCHEDULE_TYPES[name]
        out.append({"name": s.name, "label": s.label, "aliases": list(s.aliases) or None,
                    "default_rho": 7.0 if name == "karras" else (1.0 if name == "polyexponential" else -1.0),
                    "need_inner_model": s.needs_model_table})
    return out


def upscalers() -> list[dict]:
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4.0}
            for name in ("None", "Lanczos", "Nearest")]


LATENT_UPSCALE_MODES = [{"name": n} for n in ("Latent", "Latent (bicubic)")]  # those the hires fix takes


def memory() -> dict:
    import torch

    ram: dict[str, Any]
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        ram = {"free": total - used, "used": used, "total": total}
    except (OSError, ValueError, AttributeError) as e:
        ram = {"error": str(e)}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()
        cuda = {"system": {"free": free, "used": total - free, "total": total},
                "active": {"current": stats.get("active_bytes.all.current", 0),
                           "peak": stats.get("active_bytes.all.peak", 0)},
                "allocated": {"current": stats.get("allocated_bytes.all.current", 0),
                              "peak": stats.get("allocated_bytes.all.peak", 0)},
                "reserved": {"current": stats.get("reserved_bytes.all.current", 0),
                             "peak": stats.get("reserved_bytes.all.peak", 0)},
                "inactive": {"current": stats.get("inactive_split_bytes.all.current", 0),
                             "peak": stats.get("inactive_split_bytes.all.peak", 0)},
                "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)}}
    else:
        cuda = {"error": "no CUDA device"}
    return {"ram": ram, "cuda": cuda}


def loras(adapters) -> list[dict]:
    """GET /loras as A1111's Lora extension answers it: name, alias, path, metadata (never loading one)."""
    return [{"name": name, "alias": name, "path": f"{name}", "metadata": {}} for name in adapters.lora_names()]


def embeddings(adapters) -> dict:
    """GET /embeddings as A1111 answers it: the loaded ones with their shape; the skipped ones by name."""
    loaded = {
        name: {"step": e.step, "sd_checkpoint": e.sd_checkpoint, "sd_checkpoint_name": e.sd_checkpoint_name,
               "shape": e.width, "vectors": len(e.vectors)}
        for name, e in adapters.embeddings.items()
    }
    return {"loaded": loaded, "skipped": {}}
