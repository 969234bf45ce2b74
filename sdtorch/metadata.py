"""The AUTOMATIC1111 'parameters' text: write it, parse it, and store it in a PNG.

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
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .errors import SdtorchError
from .samplers import SAMPLERS

# ---------------------------------------------------------------------------------------------
# Sampler names: A1111's display names are those of `sdtorch.samplers.SAMPLERS`.

KARRAS_SUFFIX = " Karras"

# A1111 >= 1.9 writes the noise schedule apart from the sampler ("Sampler: DPM++ 2M, Schedule type:
# Karras"); older versions wrote it into the name ("DPM++ 2M Karras"). These are its schedule labels.
A1111_SCHEDULE_TYPES = (
    "Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
    "Align Your Steps", "Simple", "Normal", "DDIM", "Beta",
)
# What "Schedule type: Automatic" means per sampler: each sampler's default `scheduler` option in
# A1111's sd_samplers_kdiffusion.py (1.9+); samplers not listed default to the uniform schedule.
A1111_AUTOMATIC_SCHEDULE = {
    "DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM++ 2S a": "Karras", "DPM2": "Karras",
    "DPM2 a": "Karras", "Restart": "Karras", "DPM++ 2M SDE": "Exponential",
    "DPM++ 2M SDE Heun": "Exponential", "DPM++ 3M SDE": "Exponential",
}

_FROM_A1111 = {info.display_name.lower(): ours for ours, info in SAMPLERS.items()}


def sampler_from_a1111(display: str) -> tuple[str, bool]:
    """A1111 display name ("DPM++ 2M Karras") -> (our sampler name, karras flag): ("dpmpp_2m", True).

    Case and surrounding spaces are ignored. An unknown name raises SdtorchError listing the known ones.
    """
    name = " ".join(display.split())
    karras = name.lower().endswith(KARRAS_SUFFIX.lower())
    base = name[: -len(KARRAS_SUFFIX)] if karras else name
    ours = _FROM_A1111.get(base.lower())
    if ours is not None:
        return ours, karras
    known = ", ".join(info.display_name for info in SAMPLERS.values())
    for schedule in A1111_SCHEDULE_TYPES:
        head = base[: -len(schedule) - 1]
        if base.lower().endswith(" " + schedule.lower()) and head.lower() in _FROM_A1111:
            raise SdtorchError(
                f"sampler {display!r} uses the {schedule!r} noise schedule; only the default and Karras "
                f"schedules are supported (e.g. {head!r} or {head + KARRAS_SUFFIX!r})"
            )
    raise SdtorchError(f"unknown sampler {display!r}; known: {known} (each may end in 'Karras')")


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

    ``sampler`` is A1111's display name ("DPM++ 2M Karras", "Euler a"); `sampler_from_a1111` turns
    it into ours. Fields other than ``prompt`` may be None: `parse_parameters` gives None for what a
    text does not say (a bare prompt has no steps), and `format_parameters` leaves None fields out.
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

    Known keys come in A1111's order (Steps, Sampler, CFG scale, Seed, Size, Model hash, Model,
    Denoising strength), then ``p.extra`` in its order. None fields are left out.
    """
    pairs: list[tuple[str, str]] = []
    if p.steps is not None:
        pairs.append(("Steps", str(int(p.steps))))
    if p.sampler is not None:
        pairs.append(("Sampler", p.sampler))
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
# PNG files and model hashes.

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_png(path: str | os.PathLike, image: Image.Image, params: GenerationParams | str) -> None:
    """Save `image` as PNG with the A1111 ``parameters`` text chunk (tEXt, or iTXt when the text is
    not Latin-1, as A1111 does through PngInfo.add_text).

    The bytes depend only on the pixels (and any ICC profile or transparency the image carries) and
    the text: no time stamp is written, so the same image and parameters give the same file.
    """
    text = params if isinstance(params, str) else format_parameters(params)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    try:
        image.save(path, format="PNG", pnginfo=info)
    except OSError as e:
        raise SdtorchError(f"cannot write PNG {os.fspath(path)!r}: {e.strerror or e}") from None


def read_png_parameters(path: str | os.PathLike) -> GenerationParams:
    """Read and parse the ``parameters`` text chunk of a PNG written by us, A1111 or Forge."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise SdtorchError(f"cannot read parameters: {str(path)!r} {what}; give a PNG file")
    try:
        with open(path, "rb") as f:
            if f.read(len(_PNG_SIGNATURE)) != _PNG_SIGNATURE:
                raise SdtorchError(
                    f"{str(path)!r} is not a PNG file; parameters are read from PNG text chunks"
                )
            with Image.open(f, formats=["PNG"]) as im:
                text = im.info.get("parameters")
                if text is None:
                    text = im.text.get("parameters")  # chunks after the image data: decodes the image
    except Image.DecompressionBombError:
        raise SdtorchError(f"{str(path)!r} is too large for Pillow to open (over 178 megapixels)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        reason = "it cannot be decoded" if isinstance(e, UnidentifiedImageError) else str(e)
        raise SdtorchError(f"{str(path)!r} is a corrupt or truncated PNG file ({reason})") from None
    if not isinstance(text, str):
        raise SdtorchError(
            f"{str(path)!r} has no 'parameters' text chunk (it was not saved by A1111, Forge or sdtorch)"
        )
    return parse_parameters(text)


def model_hash(path: str | os.PathLike, *, chunk_size: int = 1 << 20) -> str:
    """A1111's "Model hash" (AutoV2, v1.x+): the first 10 hex digits of the SHA-256 of the whole file.

    Read in `chunk_size` pieces so multi-GB checkpoints never sit in memory.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise SdtorchError(f"cannot hash model: {str(path)!r} {what}; give a checkpoint file")
    digest = hashlib.sha256()
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    try:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                digest.update(view[:n])
    except OSError as e:
        raise SdtorchError(f"cannot read model {str(path)!r}: {e.strerror or e}") from None
    return digest.hexdigest()[:10]
