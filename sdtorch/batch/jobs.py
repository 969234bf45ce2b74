"""Job files -> the list of images a batch makes, each one `GenerationRequest` of one image with its seed.

A job file is either

- text, one prompt a line, or a line of AUTOMATIC1111's "Prompts from file or textbox" options
  (`--prompt "a cat" --negative_prompt "blurry" --steps 20 --seed 5`), read with A1111's option names
  and types (its scripts/prompts_from_file.py): a line that starts with `--` is options, any other line
  is a prompt. Unlike A1111, which falls back to using a line it cannot read as the prompt, a bad option
  line is an error naming its line; or
- JSON Lines (a `.jsonl` / `.json` file, or one whose first line starts with `{`): one object of
  `GenerationRequest` fields a line (`{"prompt": "a cat", "steps": 20, "cfg_scale": 5}`).

Each line's settings lie on top of the command line's (the `generate` options given to `sdtorch batch`).
`--sweep cfg=3,5,7` makes every line once per value (several sweeps: every combination), and the seeds
expand each: a line's own seed (or --seed) and the next ones for its images (A1111's batch_size x
n_iter, times --per-prompt), or every seed of `--seeds 0-99` for a line that gives none. A batch never
draws a random seed: a rerun must ask for the same images (seed 0 where nothing gives one).
Every problem of every line is found before anything runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from sdtorch.errors import SdtorchError
from sdtorch.metadata import sampler_from_a1111, sampler_from_a1111_mode
from sdtorch.request import GenerationRequest

# Request fields a JSON line may give: all but the pictures (init image, mask), which a job file cannot carry.
REQUEST_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationRequest) if f.compare)
TUPLE_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationRequest) if "tuple" in str(f.type))

# A1111's prompts_from_file.py option -> (our field, type). n_iter and the seed-resize pair are handled apart.
A1111_OPTIONS = {
    "prompt": ("prompt", str), "negative_prompt": ("negative_prompt", str),
    "seed": ("seed", int), "subseed": ("variation_seed", int), "subseed_strength": ("variation_strength", float),
    "seed_resize_from_w": (None, int), "seed_resize_from_h": (None, int),
    "sampler_name": ("sampler", str), "batch_size": ("batch", int), "n_iter": (None, int),
    "steps": ("steps", int), "cfg_scale": ("cfg_scale", float), "width": ("width", int), "height": ("height", int),
}
# A1111's options about where its UI saves, which a batch (writing to --out) has no use for.
A1111_IGNORED = ("outpath_samples", "outpath_grids", "prompt_for_display", "do_not_save_samples", "do_not_save_grid")
# A1111's switches sdtorch does not have: accepted when false.
A1111_SWITCHES = ("restore_faces", "tiling", "enable_hr")
A1111_UNSUPPORTED = {
    "sd_model": "a job uses one model; give it with --model",
    "styles": "styles are not supported; write the style's text into the prompt",
    "sampler_index": "give the sampler by name, --sampler_name",
    "denoising_strength": "batch makes text-to-image only",
}


class JobFileError(SdtorchError):
    """Every bad line of a job file, one message each ("jobs.txt:3: ...")."""

    def __init__(self, problems: list[str]):
        super().__init__(problems[0] if len(problems) == 1 else f"{len(problems)} bad job lines")
        self.problems = problems


@dataclass(frozen=True)
class JobImage:
    """One image of a job: its request (batch 1, seed set), the line it came from and its stable key."""

    request: GenerationRequest
    line: int
    key: str  # a short hash of the canonical request and what else shapes the pixels (model, LoRA, dtype)
    name: str  # the PNG's file name, derived from the request: a rerun finds it

    @property
    def fields(self) -> dict:
        return request_to_fields(self.request)


def request_to_fields(request: GenerationRequest) -> dict:
    """The request as plain JSON values (its options a dict, seed resize a list): what a job line, the
    manifest and a Ray worker carry."""
    fields = {name: getattr(request, name) for name in REQUEST_FIELDS}
    fields["options"] = dict(fields["options"])
    for name in TUPLE_FIELDS:
        if fields.get(name) is not None:
            fields[name] = list(fields[name])
    return fields


def request_from_fields(fields: dict) -> GenerationRequest:
    return GenerationRequest(**_tuples(dict(fields)))


def _tuples(fields: dict) -> dict:
    for name in TUPLE_FIELDS:
        if isinstance(fields.get(name), list):
            fields[name] = tuple(fields[name])
    return fields


def parse_seeds(text: str) -> list[int]:
    """'0-99' or '1,5,10-12' -> the seeds, in order."""
    seeds = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None:
            raise ValueError(f"{text!r} is not a seed list; write e.g. 0-99 or 1,5,10-12")
        first, last = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if last < first:
            raise ValueError(f"seed range {part.strip()!r} runs backwards")
        seeds.extend(range(first, last + 1))
    return seeds


def parse_sweep(text: str, option_fields: dict[str, str]) -> tuple[str, list]:
    """'cfg=3,5,7' -> ('cfg_scale', [3.0, 5.0, 7.0]). The name is a `generate` option (cfg, steps, sampler,
    clip-skip, ...) or a request field; the values take that field's type."""
    name, sep, values = text.partition("=")
    key = name.strip().lstrip("-").replace("-", "_")
    field = option_fields.get(key, key)
    if not sep or not values.strip():
        raise ValueError(f"--sweep {text!r}: write NAME=VALUE,VALUE,..., e.g. cfg=3,5,7")
    if field in ("seed", "batch", "options", *TUPLE_FIELDS) or field not in REQUEST_FIELDS:
        raise ValueError(f"--sweep {name!r}: not a setting that can be swept (seeds: --seeds, images: --per-prompt)")
    kind = _field_type(field)
    try:
        return field, [kind(v.strip()) for v in values.split(",")]
    except ValueError:
        raise ValueError(f"--sweep {text!r}: {name} takes {_TYPE_WORDS[kind]}") from None


def _field_type(field: str):
    annotation = str(next(f.type for f in dataclasses.fields(GenerationRequest) if f.name == field))
    if annotation.startswith("bool"):
        return _switch
    return float if "float" in annotation else int if "int" in annotation else str


def _switch(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError(text)
    return text.lower() == "true"


_TYPE_WORDS = {int: "whole numbers", float: "numbers", str: "text", _switch: "true or false"}


def _convert(option: str, value: str, kind: type):
    try:
        return kind(value)
    except ValueError:
        raise SdtorchError(f"--{option}: {value!r} is not {'a whole number' if kind is int else 'a number'}") from None


def a1111_line(text: str, compat: str) -> tuple[dict, int]:
    """One line of A1111's "prompts from file" options -> (request fields, n_iter), as A1111's cmdargs reads
    it: shlex words; --prompt and --negative_prompt take every word up to the next `--`."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise SdtorchError(f"cannot split the line into options: {e}") from None
    fields: dict = {}
    n_iter, resize = 1, {}
    pos = 0
    while pos < len(words):
        word = words[pos]
        if not word.startswith("--"):
            raise SdtorchError(f'{word!r}: options must start with "--" (a prompt goes after --prompt)')
        if pos + 1 >= len(words):
            raise SdtorchError(f"missing value for {word}")
        tag = word[2:]
        if tag in ("prompt", "negative_prompt"):
            pos += 1
            value = words[pos]
            pos += 1
            while pos < len(words) and not words[pos].startswith("--"):
                value += " " + words[pos]
                pos += 1
            fields[tag] = value
            continue
        value = words[pos + 1]
        pos += 2
        if tag in A1111_IGNORED:
            continue
        if tag in A1111_SWITCHES:
            if value.lower() == "true":
                raise SdtorchError(f"--{tag} true is not supported")
            continue
        if tag in A1111_UNSUPPORTED:
            raise SdtorchError(f"--{tag}: {A1111_UNSUPPORTED[tag]}")
        if tag not in A1111_OPTIONS:
            raise SdtorchError(f"unknown option {word}; A1111's options: --{', --'.join(A1111_OPTIONS)}")
        field, kind = A1111_OPTIONS[tag]
        converted = _convert(tag, value, kind)
        if tag == "n_iter":
            n_iter = converted
        elif tag.startswith("seed_resize_from_"):
            resize[tag[-1]] = converted
        elif tag == "sampler_name":
            read = sampler_from_a1111_mode if compat == "a1111" else sampler_from_a1111
            fields["sampler"], schedule = read(value)
            fields["schedule"] = schedule
        elif tag in ("seed", "subseed") and converted == -1:
            continue  # A1111's "random": the job's own seed is used (a batch never draws one)
        else:
            fields[field] = converted
    if resize and resize.get("w", -1) > 0 and resize.get("h", -1) > 0:
        fields["seed_resize_from"] = (resize["w"], resize["h"])
    if not isinstance(n_iter, int) or n_iter < 1:
        raise SdtorchError(f"--n_iter must be at least 1, got {n_iter}")
    return fields, n_iter


def json_line(text: str) -> dict:
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as e:
        raise SdtorchError(f"not JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(fields, dict):
        raise SdtorchError("a JSON line must be an object of request fields, e.g. {\"prompt\": \"a cat\"}")
    unknown = [k for k in fields if k not in REQUEST_FIELDS]
    if unknown:
        raise SdtorchError(f"unknown field {unknown[0]!r}; request fields: {', '.join(REQUEST_FIELDS)}")
    for name, value in fields.items():  # 5 and 5.0 are one CFG scale: one key, one image
        if _field_type(name) is float and isinstance(value, int) and not isinstance(value, bool):
            fields[name] = float(value)
    _tuples(fields)
    if "options" in fields and not (isinstance(fields["options"], dict)
                                    and all(isinstance(v, str) for v in fields["options"].values())):
        raise SdtorchError("options must be an object of text values")
    return fields


@dataclass
class JobSpec:
    """How to expand a job file: the command line's request and the expansion options."""

    base: GenerationRequest  # the `generate` options given (prompt empty)
    seeds: list[int] | None = None  # --seeds: for every line that gives no seed
    per_prompt: int = 1
    sweeps: tuple[tuple[str, list], ...] = ()
    schedule_given: bool = False  # --schedule given: A1111 mode's default (automatic) is not applied
    identity: dict = dataclasses.field(default_factory=dict)  # model, LoRA, dtype: part of every key


def read_job(path: str | Path, spec: JobSpec) -> tuple[list[JobImage], int]:
    """The images of the job file, in order, and how many duplicates were dropped; a JobFileError
    listing every bad line otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SdtorchError(f"cannot read job file {str(path)!r}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise SdtorchError(f"job file {str(path)!r} is not UTF-8 text") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise SdtorchError(f"job file {str(path)!r} has no lines")
    is_json = path.suffix.lower() in (".jsonl", ".json") or lines[0][1].startswith("{")
    if spec.seeds is not None and spec.base.seed is not None:
        raise SdtorchError("give --seed or --seeds, not both")
    if spec.seeds is not None and spec.per_prompt != 1:
        raise SdtorchError("give --seeds or --per-prompt, not both (--seeds 0-9 makes ten images of each line)")
    images, problems, seen, duplicates = [], [], set(), 0
    for number, line in lines:
        try:
            line_images = _expand(line, is_json, spec)
        except SdtorchError as e:
            problems.append(f"{path.name}:{number}: {e}")
            continue
        for request in line_images:
            key = image_key(request, spec.identity)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            images.append(JobImage(request, number, key, image_name(request, key)))
    if problems:
        raise JobFileError(problems)
    return images, duplicates


def _expand(line: str, is_json: bool, spec: JobSpec) -> list[GenerationRequest]:
    base = spec.base
    if is_json:
        fields, n_iter = json_line(line), 1
    elif line.startswith("--"):
        fields, n_iter = a1111_line(line, base.compat)
    else:
        fields, n_iter = {"prompt": line}, 1
    if fields.get("compat") == "a1111" and "schedule" not in fields and not spec.schedule_given:
        fields["schedule"] = "automatic"  # as `generate --compat a1111`: the sampler's own schedule type
    try:
        request = base.replace(**fields)
    except TypeError as e:
        raise SdtorchError(str(e)) from None
    own_seed = "seed" in fields
    names = [name for name, _ in spec.sweeps]
    combos = itertools.product(*(values for _, values in spec.sweeps))
    out = []
    for combo in combos:
        swept = request.replace(**dict(zip(names, combo)))
        count = swept.batch * n_iter * spec.per_prompt
        own = swept.seed if swept.seed is not None else 0
        starts = [own] if own_seed or spec.seeds is None else spec.seeds
        for start in starts:
            many = swept.replace(seed=start, batch=count)
            if many.variation_strength and many.variation_seed is None:
                raise SdtorchError("a variation strength needs a variation seed (--subseed) in a batch: "
                                   "a random one could not be found again by a rerun")
            for one in many.per_image():
                one.validate()  # each image's own checks (the size limit is per image here)
                out.append(one)
    return out


def image_key(request: GenerationRequest, identity: dict) -> str:
    """16 hex digits of sha256 over the request's canonical fields and what else shapes the pixels."""
    canonical = json.dumps({"request": request_to_fields(request), **identity}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def image_name(request: GenerationRequest, key: str) -> str:
    """'a-red-circle-5-1f2e3d4c5b.png': the prompt's first words, the seed and the key."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.prompt.lower()).strip("-")[:40].rstrip("-") or "image"
    return f"{slug}-{request.seed}-{key[:10]}.png"
