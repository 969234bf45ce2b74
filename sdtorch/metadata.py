"""The AUTOMATIC1111 'parameters' text (infotext): write it, parse it, and convert it to and from a
`GenerationRequest`; store it in a PNG (the bytes are `sdtorch.png`'s).

A1111 (and Forge, and the sites that read their files) put the generation settings in a PNG text
chunk named ``parameters``, laid out as::

    a prompt, that may span
    several lines
    Negative prompt: a negative prompt, that may also span lines
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 123, Size: 512x512, Model hash: 6ce0161689, ...

The last line is a list of ``key: value`` pairs; a value holding a comma, colon or newline is
written as a JSON string (A1111's ``infotext_utils.quote``). The layout and the pair pattern below
follow A1111's ``processing.create_infotext`` and ``infotext_utils.parse_generation_parameters``.

Known fields become attributes of `GenerationParams`; every other key (Clip skip, Hires upscale,
Version, Lora hashes, ...) is kept, as text and in order, in ``extra`` so that a file read and
written again loses nothing that matters.

`infotext(request)` and `request_from_infotext(text)` convert in both directions, sampler and schedule
names included: A1111 >= 1.9 writes ``Sampler: DPM++ 2M, Schedule type: Karras``, older versions
``Sampler: DPM++ 2M Karras``; both are read, the new form is written.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from PIL import Image

from .conditioning import EMPHASIS
from .errors import SdtorchError
from .loading.hashing import model_hash
from .png import read_png_text
from .png import write_png as write_png_text
from .request import GenerationRequest
from .samplers import (
    A1111_AUTOMATIC_SCHEDULE,
    ALL_SAMPLERS,
    ALL_SCHEDULE_TYPES,
    RNG_SOURCES,
    SAMPLERS,
    SCHEDULE_TYPES,
    a1111_name,
    a1111_sampler,
    rng_source,
)

# ---------------------------------------------------------------------------------------------
# Sampler names: A1111's display names are those of `sdtorch.samplers.SAMPLERS`.

# A1111 >= 1.9 writes the noise schedule apart from the sampler ("Sampler: DPM++ 2M, Schedule type:
# Karras"); older versions wrote it into the name ("DPM++ 2M Karras"). These are its schedule labels.
A1111_SCHEDULE_TYPES = (
    "Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
    "Align Your Steps", "Simple", "Normal", "DDIM", "Beta",
)

_FROM_A1111 = {entry.display_name.lower(): ours for ours, entry in SAMPLERS.items()}  # the default mode's
_ALL_FROM_A1111 = {entry.display_name.lower(): ours for ours, entry in ALL_SAMPLERS.items()}
_SCHEDULE_FROM_LABEL = {label.lower(): ours for ours, label in SCHEDULE_TYPES.items()}


def sampler_from_a1111(display: str) -> tuple[str, str]:
    """A1111's pre-1.9 sampler name ("DPM++ 2M Karras") -> (our sampler, our schedule type):
    ("dpmpp_2m", "karras"); a bare name is the uniform schedule, as those versions meant it.

    Case and surrounding spaces are ignored. An unknown name, or a schedule the sampler does not take
    here, raises SdtorchError listing what is accepted.
    """
    name = " ".join(display.split())
    low = name.lower()
    if low in _FROM_A1111:
        return _FROM_A1111[low], "uniform"
    for label in A1111_SCHEDULE_TYPES:
        head = name[: -len(label) - 1]
        if not (low.endswith(" " + label.lower()) and head.lower() in _FROM_A1111):
            continue
        ours = _FROM_A1111[head.lower()]
        schedule = _SCHEDULE_FROM_LABEL.get(label.lower())
        if schedule in SAMPLERS[ours].schedules:
            return ours, schedule
        accepted = [SCHEDULE_TYPES[s] for s in SAMPLERS[ours].schedules]
        raise SdtorchError(
            f"sampler {display!r} uses the {label!r} noise schedule; {head!r} runs here with the "
            f"{' or '.join(accepted)} schedule (e.g. {head!r} or {head + ' ' + accepted[-1]!r})"
        )
    known = ", ".join(entry.display_name for entry in SAMPLERS.values())
    raise SdtorchError(f"unknown sampler {display!r}; known: {known} (each may end in 'Karras')")


def _split_schedule(sampler: str) -> tuple[str, str | None]:
    """A pre-1.9 name -> (A1111's sampler, its "Schedule type" label for the 1.9+ form, or None where
    A1111 reading no schedule type, "Automatic", means the same)."""
    for label in A1111_SCHEDULE_TYPES[1:]:
        if sampler.lower().endswith(" " + label.lower()) and sampler[: -len(label) - 1].lower() in _ALL_FROM_A1111:
            return sampler[: -len(label) - 1], label
    if sampler.lower() in _ALL_FROM_A1111 and A1111_AUTOMATIC_SCHEDULE.get(sampler, "Uniform") != "Uniform":
        return sampler, "Uniform"  # A1111's default for it is not uniform: say so
    return sampler, None


# ---------------------------------------------------------------------------------------------
# The parameters text.

# One `key: value` pair of the last line, value either a JSON string or anything up to a comma
# (A1111's re_param).
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_KEY = re.compile(r"\w[\w \-/]+")
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE = "Negative prompt:"

# Keys that are attributes of GenerationParams, so cannot be keys of its `extra`.
_KNOWN_KEYS = ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash", "Model", "Denoising strength")


@dataclass(frozen=True, kw_only=True)
class GenerationParams:
    """The settings of one generated image, as A1111 records them.

    ``sampler`` is A1111's pre-1.9 display name, schedule folded in ("DPM++ 2M Karras", "Euler a"):
    one string that says both; `sampler_from_a1111` turns it into ours. Fields other than ``prompt``
    may be None: `parse_parameters` gives None for what a text does not say (a bare prompt has no
    steps), and `format_parameters` leaves None fields out.
    ``extra`` keeps the keys we have no field for, in order, values unquoted.
    """

    prompt: str
    negative_prompt: str = ""
    steps: int | None
    sampler: str | None
    cfg_scale: float | None
    seed: int | None
    width: int | None
    height: int | None
    model_hash: str | None = None
    model: str | None = None
    denoising_strength: float | None = None  # img2img only
    extra: dict[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self):
        if (self.width is None) != (self.height is None):
            raise ValueError(f"width and height go together; got width={self.width}, height={self.height}")
        object.__setattr__(self, "extra", dict(self.extra))  # our own copy: the dataclass is frozen
        for key, value in self.extra.items():
            if not _KEY.fullmatch(key) or key in _KNOWN_KEYS:
                raise SdtorchError(
                    f"extra parameter key {key!r} cannot be written; keys are letters, digits, spaces, "
                    f"'-', '/' and '_', at least 2 long, and not one of {', '.join(_KNOWN_KEYS)}"
                )
            if not isinstance(value, str):
                raise TypeError(f"extra parameter {key!r} must be a str, got {type(value).__name__}")


def _quote(value: str) -> str:
    """A1111's quote: JSON-quote a value with a comma, colon or newline. We also quote one that starts
    with a quote or has spaces at either end, which A1111's parser would otherwise change."""
    if any(c in value for c in ",:\n") or value.startswith('"') or value != value.strip():
        return json.dumps(value, ensure_ascii=False)
    return value


def _unquote(value: str) -> str:
    """A1111's unquote: a value in double quotes is a JSON string (one that fails to decode stays as
    is). Unlike A1111 we also strip the blanks around an unquoted value."""
    value = value.strip()
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        return decoded if isinstance(decoded, str) else value
    return value


def _number(value: float) -> str:
    """7.0 -> "7", 7.5 -> "7.5", 0.1 -> "0.1" (shortest text that reads back the same float)."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def format_parameters(p: GenerationParams) -> str:
    """The A1111 'parameters' text for `p`: prompt, ``Negative prompt:`` line if any, key-value line.

    Known keys come in A1111's order (Steps, Sampler, Schedule type, CFG scale, Seed, Size, Model hash,
    Model, Denoising strength), then ``p.extra`` in its order. None fields are left out. The sampler is
    written in A1111 1.9's form: "DPM++ 2M Karras" as ``Sampler: DPM++ 2M, Schedule type: Karras``.
    """
    pairs: list[tuple[str, str]] = []
    if p.steps is not None:
        pairs.append(("Steps", str(int(p.steps))))
    if p.sampler is not None:
        sampler, schedule_type = _split_schedule(p.sampler)
        pairs.append(("Sampler", sampler))
        if schedule_type is not None:
            pairs.append(("Schedule type", schedule_type))
    if p.cfg_scale is not None:
        pairs.append(("CFG scale", _number(p.cfg_scale)))
    if p.seed is not None:
        pairs.append(("Seed", str(int(p.seed))))
    if p.width is not None:
        pairs.append(("Size", f"{int(p.width)}x{int(p.height)}"))
    if p.model_hash is not None:
        pairs.append(("Model hash", p.model_hash))
    if p.model is not None:
        pairs.append(("Model", p.model))
    if p.denoising_strength is not None:
        pairs.append(("Denoising strength", _number(p.denoising_strength)))
    pairs.extend(p.extra.items())

    negative = f"\n{_NEGATIVE} {p.negative_prompt}" if p.negative_prompt else ""
    line = ", ".join(f"{key}: {_quote(value)}" for key, value in pairs)
    return f"{p.prompt}{negative}\n{line}".strip()


def _is_parameters_line(line: str) -> bool:
    """A1111 takes the last line for the key-value line when it holds at least 3 pairs. We also ask
    that it start with a pair, so that a last prompt line like "(cat:1.2), (dog:1.1), (hat:0.9)"
    stays prompt (every line A1111 writes starts with "Steps: ")."""
    return _PAIR.match(line) is not None and len(_PAIR.findall(line)) >= 3


def _convert(key: str, value: str, kind):
    try:
        return kind(value)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise SdtorchError(f"parameters text: {key} is {value!r}, expected {expected}") from None


def parse_parameters(text: str) -> GenerationParams:
    """Parse an A1111 'parameters' text (ours or A1111's own) into `GenerationParams`.

    - The last line is the key-value line if it holds at least 3 ``key: value`` pairs (see
      `_is_parameters_line`); otherwise the whole text is prompt and negative prompt, and every
      other field is None. Fields the key-value line lacks are None too; nothing is required.
    - Lines before ``Negative prompt:`` are the prompt; that line and the ones after it are the
      negative prompt. Both keep their inner line breaks; leading and trailing blanks are stripped.
    - ``Schedule type`` (A1111 1.9+, Forge) is folded into the sampler the old way: "DPM++ 2M" +
      "Karras" -> "DPM++ 2M Karras"; "Uniform" adds nothing; "Automatic" becomes the sampler's
      A1111 default (Karras for DPM++ 2M); any other schedule is appended ("DPM++ 2M SDE
      Exponential"), which `sampler_from_a1111` then refuses with a clear message.
    - Other keys go to ``extra`` (unquoted). A known key whose value is not a number (e.g.
      "Steps: many") raises SdtorchError.
    """
    *lines, last = text.replace("\r\n", "\n").replace("\r", "\n").strip().split("\n")
    if not _is_parameters_line(last):
        lines.append(last)
        last = ""

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in lines:
        if not negative_lines and line.lstrip().startswith(_NEGATIVE):
            negative_lines.append(line.lstrip()[len(_NEGATIVE):])
        elif negative_lines:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)

    values: dict[str, str] = {}
    for key, value in _PAIR.findall(last):
        values[key] = _unquote(value)  # a repeated key: the last one wins, as in A1111

    steps = _convert("Steps", values.pop("Steps"), int) if "Steps" in values else None
    seed = _convert("Seed", values.pop("Seed"), int) if "Seed" in values else None
    cfg = _convert("CFG scale", values.pop("CFG scale"), float) if "CFG scale" in values else None
    strength = values.pop("Denoising strength", None)
    strength = _convert("Denoising strength", strength, float) if strength is not None else None
    width = height = None
    if "Size" in values:
        size = values.pop("Size")
        m = _SIZE.match(size.strip())
        if m is None:
            raise SdtorchError(f"parameters text: Size is {size!r}, expected WIDTHxHEIGHT such as 512x768")
        width, height = int(m.group(1)), int(m.group(2))

    sampler = values.pop("Sampler", None)
    if sampler is not None and "Schedule type" in values:  # without a sampler it stays in extra
        sampler = _fold_schedule(sampler, values.pop("Schedule type"))
    mhash, model = values.pop("Model hash", None), values.pop("Model", None)
    return GenerationParams(
        prompt="\n".join(prompt_lines).strip(),
        negative_prompt="\n".join(negative_lines).strip(),
        steps=steps,
        sampler=sampler,
        cfg_scale=cfg,
        seed=seed,
        width=width,
        height=height,
        model_hash=mhash,
        model=model,
        denoising_strength=strength,
        extra=values,
    )


def _fold_schedule(sampler: str, schedule: str) -> str:
    """A1111 1.9+ "Sampler: X, Schedule type: Y" -> the pre-1.9 single name "X Y" (see parse_parameters)."""
    if schedule.lower() == "automatic":
        schedule = A1111_AUTOMATIC_SCHEDULE.get(sampler, "Uniform")
    if schedule.lower() == "uniform" or sampler.lower().endswith(" " + schedule.lower()):
        return sampler
    return f"{sampler} {schedule}"




# ---------------------------------------------------------------------------------------------
# Requests <-> records.

# the last two are ours (fast modes)
_NUMERIC_OPTIONS = {"Clip skip": "clip_skip", "Eta DDIM": "eta", "CFG cutoff": "cfg_cutoff", "DeepCache": "deep_cache"}
_EMPHASIS_FROM_LABEL = {label: ours for ours, label in EMPHASIS.items()}
# Our record of the sampling path: "diffusers" or "a1111". Its presence also says sdtorch wrote the record; a
# record without it is A1111's (or Forge's), which --from-png regenerates in A1111 mode.
MODE_KEY = "sdtorch mode"
_NOISE_KEYS = ("RNG", "ENSD", "Variation seed", "Variation seed strength", "Seed resize from", MODE_KEY)


def written_by_sdtorch(params: GenerationParams) -> bool:
    return MODE_KEY in params.extra


def sampler_from_a1111_mode(display: str) -> tuple[str, str]:
    """An A1111 sampler name, schedule type folded in or not ("DPM++ 2M Karras", "DPM fast", "k_euler_a",
    "DPM++ 2M SDE Exponential") -> (our sampler, our schedule type) as A1111 mode runs it: every A1111 sampler
    and schedule type. An unknown sampler raises SdtorchError listing A1111's names."""
    name = " ".join(display.split())
    labels = sorted(ALL_SCHEDULE_TYPES.values(), key=lambda t: -len(t.label))  # "SGM Uniform" before "Uniform"
    for kind in labels:
        for label in (kind.label, *kind.aliases):
            head = name[: -len(label) - 1]
            if name.lower().endswith(" " + label.lower()) and head.lower() in _ALL_FROM_A1111:
                return _ALL_FROM_A1111[head.lower()], kind.name
    return a1111_sampler(name).name, "uniform"  # a bare pre-1.9 name meant the uniform schedule


def params_of(
    request: GenerationRequest, *, model_name: str | None = None, model_hash: str | None = None
) -> GenerationParams:
    """The A1111 record of one image: `request` resolved, its batch of one (see `per_image`)."""
    if request.seed is None or request.width is None or request.cfg_scale is None or request.batch != 1:
        raise ValueError("give a resolved request for one image (GenerationResult.per_image())")
    extra = dict(request.options)
    if request.clip_skip != 1:
        extra["Clip skip"] = str(request.clip_skip)
    if request.eta != 0.0:
        extra["Eta DDIM"] = _number(request.eta)
    if request.cfg_cutoff is not None:
        extra["CFG cutoff"] = _number(request.cfg_cutoff)
    if request.deep_cache is not None:
        extra["DeepCache"] = str(request.deep_cache)
    if request.emphasis != "original":  # A1111 writes the emphasis when it is not its default
        extra["Emphasis"] = EMPHASIS[request.emphasis]
    if request.variation_strength:
        extra["Variation seed"] = str(request.variation_seed)
        extra["Variation seed strength"] = _number(request.variation_strength)
    if request.seed_resize_from is not None:
        extra["Seed resize from"] = "{}x{}".format(*request.seed_resize_from)
    if request.ensd:
        extra["ENSD"] = str(request.ensd)
    if request.rng != "gpu":  # A1111 writes the RNG when it is not its default, GPU
        extra["RNG"] = RNG_SOURCES[request.rng]
    extra.update(_inpaint_hires_record(request))
    extra[MODE_KEY] = request.compat
    return GenerationParams(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        steps=request.steps,
        sampler=a1111_name(request.sampler, request.schedule, request.compat),
        cfg_scale=request.cfg_scale,
        seed=request.seed,
        width=request.width,
        height=request.height,
        model_hash=model_hash,
        model=model_name,
        denoising_strength=request.strength if request.img2img else
        (request.hires_strength if request.hires else None),
        extra=extra,
    )


# A1111's labels of the inpainting and hires settings (our values -> its text)
_MASKED_CONTENT_LABELS = {"fill": "fill", "original": "original", "latent_noise": "latent noise",
                          "latent_nothing": "latent nothing"}
_HIRES_UPSCALER_LABELS = {"latent": "Latent", "latent-bicubic": "Latent (bicubic)", "lanczos": "Lanczos",
                          "nearest": "Nearest"}


def _inpaint_hires_record(request: GenerationRequest) -> dict[str, str]:
    """What A1111 records of inpainting ("Mask blur", "Inpaint area", "Masked area padding"; we add "Masked
    content" and "Mask mode" as its UI names them, and "Outpaint"), of the hires fix ("Hires upscale", or "Hires
    resize" WxH with 0 for a side left to the aspect ratio; "Hires steps", "Hires upscaler"; its strength is the
    record's "Denoising strength") and of the decoder ("VAE Decoder: TAESD", as A1111 writes a TAESD decode)."""
    record = {}
    if request.mask is not None or request.outpaint is not None:
        if request.mask_blur:
            record["Mask blur"] = str(request.mask_blur)
        if request.outpaint is not None:
            record["Outpaint"] = ",".join(str(v) for v in request.outpaint)
        if request.inpaint_area == "masked":
            record["Inpaint area"] = "Only masked"
            record["Masked area padding"] = str(request.inpaint_padding)
        record["Masked content"] = _MASKED_CONTENT_LABELS[request.masked_content]
        if request.invert_mask:
            record["Mask mode"] = "Inpaint not masked"
    if request.hires:
        if request.hires_scale is not None:
            record["Hires upscale"] = _number(request.hires_scale)
        else:
            record["Hires resize"] = f"{request.hires_width or 0}x{request.hires_height or 0}"
        if request.hires_steps:
            record["Hires steps"] = str(request.hires_steps)
        record["Hires upscaler"] = _HIRES_UPSCALER_LABELS[request.hires_upscaler]
    if request.decoder == "taesd":
        record["VAE Decoder"] = "TAESD"
    return record


def _inpaint_hires_fields(extra: dict[str, str], fields: dict) -> None:
    """Read `_inpaint_hires_record`'s keys of a record sdtorch wrote in diffusers mode into request fields (popped
    from `extra`); an A1111 record's stay options, said by foreign_metadata as not applied."""
    content = {label: ours for ours, label in _MASKED_CONTENT_LABELS.items()}
    upscaler = {label: ours for ours, label in _HIRES_UPSCALER_LABELS.items()}
    resize = re.fullmatch(r"(\d+)x(\d+)", extra.get("Hires resize", "").strip())
    if ("Hires upscale" in extra or resize) and extra.get("Hires upscaler", "Latent") in upscaler:
        if resize:  # A1111 writes the resize instead of the scale; 0: the side follows the aspect ratio
            extra.pop("Hires resize")
            extra.pop("Hires upscale", None)
            fields["hires_width"], fields["hires_height"] = (int(v) or None for v in resize.groups())
        else:
            fields["hires_scale"] = _convert("Hires upscale", extra.pop("Hires upscale"), float)
        fields["hires_upscaler"] = upscaler[extra.pop("Hires upscaler", "Latent")]
        if "Hires steps" in extra:
            fields["hires_steps"] = _convert("Hires steps", extra.pop("Hires steps"), int)
        if "strength" in fields:
            fields["hires_strength"] = fields.pop("strength")
    for key, name, kind in (("Mask blur", "mask_blur", int), ("Masked area padding", "inpaint_padding", int)):
        if key in extra:
            fields[name] = _convert(key, extra.pop(key), kind)
    if extra.get("Inpaint area") == "Only masked":
        extra.pop("Inpaint area")
        fields["inpaint_area"] = "masked"
    if extra.get("Masked content") in content:
        fields["masked_content"] = content[extra.pop("Masked content")]
    if extra.get("Mask mode") == "Inpaint not masked":
        extra.pop("Mask mode")
        fields["invert_mask"] = True
    if "Outpaint" in extra:
        try:
            fields["outpaint"] = tuple(int(v) for v in extra.pop("Outpaint").split(","))
        except ValueError:
            raise SdtorchError("parameters text: Outpaint must be left,right,top,bottom pixels") from None


def infotext(request: GenerationRequest, *, model_name: str | None = None, model_hash: str | None = None) -> str:
    """The A1111 'parameters' text of one image made by `request`."""
    return format_parameters(params_of(request, model_name=model_name, model_hash=model_hash))


def request_fields(params: GenerationParams) -> dict:
    """The `GenerationRequest` fields a record states (nothing for what it leaves out), so that a
    caller can let its own settings win: `GenerationRequest(**(request_fields(p) | mine))`. Keys of the
    record that are no request field stay in `options`, except the model's (hash, name).

    A record sdtorch wrote says its mode (`MODE_KEY`); any other is A1111's, and reads as A1111 mode: every
    A1111 sampler and schedule type, and its RNG (GPU where the record names none, as A1111 means it)."""
    fields: dict = {"prompt": params.prompt, "negative_prompt": params.negative_prompt}
    extra = params.extra
    fields["compat"] = extra.get(MODE_KEY, "a1111")
    fields["rng"] = rng_source(extra.get("RNG", "GPU"))
    if params.sampler is not None:
        read = sampler_from_a1111 if fields["compat"] == "diffusers" else sampler_from_a1111_mode
        fields["sampler"], fields["schedule"] = read(params.sampler)
    if "ENSD" in extra:
        fields["ensd"] = _convert("ENSD", extra["ENSD"], int)
    if "Variation seed strength" in extra:
        fields["variation_strength"] = _convert("Variation seed strength", extra["Variation seed strength"], float)
    if "Variation seed" in extra:
        fields["variation_seed"] = _convert("Variation seed", extra["Variation seed"], int)
    if "Seed resize from" in extra:
        m = re.fullmatch(r"(-?\d+)x(-?\d+)", extra["Seed resize from"].strip())
        if m is None:
            raise SdtorchError(f"parameters text: Seed resize from is {extra['Seed resize from']!r}, expected WxH")
        if int(m.group(1)) > 0 and int(m.group(2)) > 0:
            fields["seed_resize_from"] = (int(m.group(1)), int(m.group(2)))
    for ours, value in (("steps", params.steps), ("cfg_scale", params.cfg_scale), ("seed", params.seed),
                        ("width", params.width), ("height", params.height),
                        ("strength", params.denoising_strength)):
        if value is not None:
            fields[ours] = value
    options = {}
    extra = dict(params.extra)
    if fields["compat"] == "diffusers":
        _inpaint_hires_fields(extra, fields)
    for key, value in extra.items():
        if key in _NOISE_KEYS:
            continue
        if key in _NUMERIC_OPTIONS:
            kind = int if _NUMERIC_OPTIONS[key] in ("clip_skip", "deep_cache") else float
            fields[_NUMERIC_OPTIONS[key]] = _convert(key, value, kind)
        elif key == "Emphasis" and value in _EMPHASIS_FROM_LABEL:
            fields["emphasis"] = _EMPHASIS_FROM_LABEL[value]
        elif key == "VAE Decoder" and value.lower() == "taesd":  # A1111's sd_vae_decode_method, when not Full
            fields["decoder"] = "taesd"
        else:
            options[key] = value
    if options:
        fields["options"] = options
    return fields


def request_from_infotext(text: str) -> GenerationRequest:
    """The request an A1111 'parameters' text describes (ours or A1111's); what it does not state takes
    the request's defaults. An image-to-image record gives the strength but not the picture."""
    return GenerationRequest(**request_fields(parse_parameters(text)))


# ---------------------------------------------------------------------------------------------
# PNG files.


def write_png(path: str | os.PathLike, image: Image.Image, params: GenerationParams | str) -> None:
    """Save `image` as PNG with the A1111 ``parameters`` text chunk; the same image and parameters give
    the same bytes (see `sdtorch.png`)."""
    write_png_text(path, image, {"parameters": params if isinstance(params, str) else format_parameters(params)})


def read_png_parameters(path: str | os.PathLike) -> GenerationParams:
    """Read and parse the ``parameters`` text chunk of a PNG written by us, A1111 or Forge."""
    text = read_png_text(path, "parameters")
    if text is None:
        raise SdtorchError(
            f"{str(os.fspath(path))!r} has no 'parameters' text chunk (it was not saved by A1111, Forge or sdtorch)"
        )
    return parse_parameters(text)


__all__ = [
    "GenerationParams", "format_parameters", "infotext", "model_hash", "params_of", "parse_parameters",
    "read_png_parameters", "request_fields", "request_from_infotext", "sampler_from_a1111", "write_png",
]
