"""Generation settings other tools hide in their images, read without their code: which tool made a file,
and what it says about seed, steps, sampler, guidance, size, prompts and model.

- AUTOMATIC1111 / Forge (and sdtorch): the 'parameters' text (`sdtorch.metadata`) in a PNG tEXt/iTXt chunk, in
  a JPEG's or WebP's EXIF UserComment (UTF-16 after an 8-byte "UNICODE\\0" header, as piexif writes it), or
  hidden in the alpha channel's (or RGB's) lowest bits by the stealth-pnginfo extension: a 'stealth_pnginfo'
  (plain) or 'stealth_pngcomp' (gzip) signature, a 32-bit bit count, then the text, read column by column.
- ComfyUI: the 'prompt' chunk, the API graph (node id -> class_type and inputs); every KSampler /
  KSamplerAdvanced node is one sampling pass, its prompts and checkpoint found by following its links.
- InvokeAI: 'invokeai_metadata' (3.x JSON), 'sd-metadata' (2.x JSON), 'Dream' (1.x command line).
- Fooocus: 'parameters' JSON with 'metadata_scheme'; NovelAI: Software 'NovelAI', 'Comment' JSON.

`read_image_record(path)` gives a `ForeignRecord`: the tool, the A1111 text where there is one, and a flat
summary of the passes otherwise. Only A1111's and sdtorch's records regenerate (`--from-png`); the others are
named, with what they used, in one line (`ForeignRecord.describe`).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .errors import SdtorchError

TOOLS = {
    "a1111": "AUTOMATIC1111", "sdtorch": "sdtorch", "comfyui": "ComfyUI", "invokeai": "InvokeAI",
    "fooocus": "Fooocus", "novelai": "NovelAI",
}
_STEALTH_SIGNATURES = {"stealth_pnginfo": False, "stealth_pngcomp": True}  # alpha channel -> compressed
_STEALTH_RGB_SIGNATURES = {"stealth_rgbinfo": False, "stealth_rgbcomp": True}
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286


@dataclass(frozen=True)
class SamplingPass:
    """One sampling pass of a foreign record, in the tool's own words (sampler 'dpmpp_2m', scheduler 'normal')."""

    sampler: str | None = None
    seed: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    scheduler: str | None = None
    denoise: float | None = None
    model: str | None = None
    model_hash: str | None = None
    prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    width: int | None = None
    height: int | None = None

    def describe(self) -> str:
        parts = [f"seed {self.seed}" if self.seed is not None else "", f"{self.steps} steps" if self.steps else "",
                 " ".join(p for p in (self.sampler, self.scheduler) if p),
                 f"CFG {self.cfg_scale:g}" if self.cfg_scale is not None else "",
                 f"denoise {self.denoise:g}" if self.denoise not in (None, 1.0) else "",
                 f"{self.width}x{self.height}" if self.width else "", f"model {self.model}" if self.model else ""]
        return ", ".join(p for p in parts if p)


@dataclass(frozen=True)
class ForeignRecord:
    tool: str | None  # a key of TOOLS, None: no generation metadata found
    where: str = ""  # which chunk / field held it
    text: str | None = None  # the A1111 'parameters' text (a1111, sdtorch)
    passes: tuple[SamplingPass, ...] = ()  # the other tools' settings
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def regenerates(self) -> bool:
        return self.tool in ("a1111", "sdtorch")

    def describe(self, path: str = "") -> str:
        """One line: the tool and what each pass used."""
        name = f"{path} " if path else ""
        if self.tool is None:
            return f"{name}holds no generation settings sdtorch can read (no A1111, ComfyUI, InvokeAI, Fooocus or " \
                   "NovelAI metadata)"
        passes = "; ".join(f"pass {i + 1}: {p.describe()}" for i, p in enumerate(self.passes)) or "no sampler found"
        return f"{name}was made by {TOOLS[self.tool]} ({self.where}: {passes})"


# --- A1111: text, EXIF, stealth --------------------------------------------------------------------------


def decode_user_comment(data: bytes) -> str | None:
    """An EXIF UserComment: an 8-byte character-code header ('UNICODE\\0', 'ASCII\\0\\0\\0', zeros), then the text
    (UTF-16 for UNICODE, big- or little-endian as the bytes show)."""
    if not isinstance(data, bytes | bytearray):
        return str(data) if data else None
    head, body = bytes(data[:8]), bytes(data[8:])
    if head.startswith(b"UNICODE"):
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            return body.decode("utf-16")
        big = body[:1] == b"\x00" or (len(body) > 1 and body[1:2] != b"\x00")
        return body.decode("utf-16-be" if big else "utf-16-le", errors="replace")
    return body.decode("utf-8", errors="replace").rstrip("\x00") or None


def _bits_to_bytes(bits: np.ndarray) -> bytes:
    return np.packbits(bits.astype(np.uint8)).tobytes()


def read_stealth_text(image: Image.Image) -> str | None:
    """The text the stealth-pnginfo extension hides in the lowest bit of each pixel's alpha (or of R, G, B in
    turn), pixels read column by column (x outer, y inner); None when no signature is there."""
    if image.mode not in ("RGBA", "RGB"):
        return None
    pixels = np.asarray(image)  # (H, W, C)
    columns = pixels.transpose(1, 0, 2)  # (W, H, C): x outer, y inner
    streams = []
    if image.mode == "RGBA":
        streams.append((columns[..., 3].reshape(-1) & 1, _STEALTH_SIGNATURES))
    streams.append((columns[..., :3].reshape(-1) & 1, _STEALTH_RGB_SIGNATURES))
    for bits, signatures in streams:
        n_sig = len("stealth_pnginfo") * 8
        if bits.size < n_sig + 32:
            continue
        signature = _bits_to_bytes(bits[:n_sig]).decode("utf-8", errors="ignore")
        if signature not in signatures:
            continue
        length = int("".join(map(str, bits[n_sig:n_sig + 32].tolist())), 2)
        data = _bits_to_bytes(bits[n_sig + 32:n_sig + 32 + length])
        return (gzip.decompress(data) if signatures[signature] else data).decode("utf-8", errors="replace")
    return None


# --- ComfyUI ----------------------------------------------------------------------------------------------

_COMFY_SAMPLERS = ("KSampler", "KSamplerAdvanced")


def _upstream(graph: dict, link, want) -> list[dict]:
    """Nodes satisfying `want` reached by following a link ([node id, slot]) and its nodes' inputs upstream."""
    found, seen, stack = [], set(), [link]
    while stack:
        item = stack.pop(0)
        if not (isinstance(item, list) and len(item) == 2 and str(item[0]) in graph) or str(item[0]) in seen:
            continue
        seen.add(str(item[0]))
        node = graph[str(item[0])]
        if want(node):
            found.append(node)
            continue
        stack.extend(v for v in node.get("inputs", {}).values() if isinstance(v, list))
    return found


def comfyui_passes(graph: dict) -> tuple[SamplingPass, ...]:
    """One `SamplingPass` per KSampler node of a ComfyUI API graph, in node-id order."""

    def texts(link) -> tuple[str, ...]:
        nodes = _upstream(graph, link, lambda n: isinstance(n.get("inputs", {}).get("text"), str))
        return tuple(n["inputs"]["text"].strip() for n in nodes)

    passes = []
    for node_id in sorted(graph, key=lambda k: (len(k), k)):
        node = graph[node_id]
        if node.get("class_type") not in _COMFY_SAMPLERS:
            continue
        inputs = node.get("inputs", {})
        models = _upstream(graph, inputs.get("model"), lambda n: "ckpt_name" in n.get("inputs", {}))
        sizes = _upstream(graph, inputs.get("latent_image"), lambda n: "width" in n.get("inputs", {}))
        seed = inputs.get("seed", inputs.get("noise_seed"))
        passes.append(SamplingPass(
            sampler=inputs.get("sampler_name"), seed=seed if isinstance(seed, int) else None,
            steps=inputs.get("steps"), cfg_scale=inputs.get("cfg"), scheduler=inputs.get("scheduler"),
            denoise=inputs.get("denoise"), model=models[0]["inputs"]["ckpt_name"] if models else None,
            prompts=texts(inputs.get("positive")), negative_prompts=texts(inputs.get("negative")),
            width=sizes[0]["inputs"]["width"] if sizes else None,
            height=sizes[0]["inputs"]["height"] if sizes else None,
        ))
    return tuple(passes)


# --- InvokeAI, Fooocus, NovelAI ---------------------------------------------------------------------------


def _split_invoke_prompt(prompt: str) -> tuple[str, str]:
    """InvokeAI writes the negative prompt in square brackets inside the prompt."""
    negatives = re.findall(r"\[([^\[\]]*)\]", prompt)
    return re.sub(r"\s*\[[^\[\]]*\]", "", prompt).strip(), ", ".join(n.strip() for n in negatives)


def invokeai_dream_pass(dream: str) -> SamplingPass:
    """InvokeAI 1.x's 'Dream' chunk: '"prompt [negative]" -s steps -S seed -W w -H h -C cfg -A sampler ...'."""
    words = shlex.split(dream)
    prompt, options = words[0], {}
    i = 1
    while i < len(words):
        if words[i].startswith("-") and i + 1 < len(words):
            options[words[i]] = words[i + 1]
            i += 2
        else:
            i += 1
    positive, negative = _split_invoke_prompt(prompt)

    def num(key, kind):
        return kind(options[key]) if key in options else None

    return SamplingPass(sampler=options.get("-A"), seed=num("-S", int), steps=num("-s", int),
                        cfg_scale=num("-C", float),
                        width=num("-W", int), height=num("-H", int), prompts=(positive,),
                        negative_prompts=(negative,) if negative else ())


def invokeai_pass(info: dict, key: str) -> SamplingPass:
    if key == "invokeai_metadata":  # 3.x
        model = info.get("model") or {}
        return SamplingPass(
            sampler=info.get("scheduler"), seed=info.get("seed"), steps=info.get("steps"),
            cfg_scale=info.get("cfg_scale"),
            model=model.get("model_name") if isinstance(model, dict) else model, width=info.get("width"),
            height=info.get("height"), prompts=(info.get("positive_prompt", ""),),
            negative_prompts=(info.get("negative_prompt"),) if info.get("negative_prompt") else ())
    image = info.get("image", {})  # sd-metadata, 2.x
    prompt = image.get("prompt", "")
    prompt = prompt[0]["prompt"] if isinstance(prompt, list) and prompt else str(prompt)
    positive, negative = _split_invoke_prompt(prompt)
    return SamplingPass(sampler=image.get("sampler"), seed=image.get("seed"), steps=image.get("steps"),
                        cfg_scale=image.get("cfg_scale"), model=info.get("model_weights"),
                        model_hash=info.get("model_hash"), width=image.get("width"), height=image.get("height"),
                        prompts=(positive,), negative_prompts=(negative,) if negative else ())


def fooocus_pass(info: dict) -> SamplingPass:
    size = re.findall(r"\d+", str(info.get("resolution", "")))
    return SamplingPass(sampler=info.get("sampler"), seed=int(info["seed"]) if "seed" in info else None,
                        steps=info.get("steps"), cfg_scale=info.get("guidance_scale"), scheduler=info.get("scheduler"),
                        model=info.get("base_model"), model_hash=info.get("base_model_hash"),
                        width=int(size[0]) if size else None, height=int(size[1]) if len(size) > 1 else None,
                        prompts=(info.get("prompt", ""),),
                        negative_prompts=(info["negative_prompt"],) if info.get("negative_prompt") else ())


def novelai_pass(description: str, comment: dict) -> SamplingPass:
    return SamplingPass(sampler=comment.get("sampler"), seed=comment.get("seed"), steps=comment.get("steps"),
                        cfg_scale=comment.get("scale"), denoise=comment.get("strength"), prompts=(description,),
                        negative_prompts=(comment["uc"],) if comment.get("uc") else ())


# --- the one entry point ---------------------------------------------------------------------------------


def _json(text) -> dict | None:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def record_of(image: Image.Image) -> ForeignRecord:
    """What an opened image says about how it was made."""
    from .metadata import MODE_KEY

    info = {k: v for k, v in image.info.items() if isinstance(k, str)}

    def a1111(text: str, where: str) -> ForeignRecord:
        return ForeignRecord("sdtorch" if f"{MODE_KEY}:" in text else "a1111", where, text=text, raw=info)

    parameters = info.get("parameters")
    if isinstance(parameters, str):
        fooocus = _json(parameters)
        if fooocus is not None and ("metadata_scheme" in fooocus or info.get("fooocus_scheme")):
            return ForeignRecord("fooocus", "parameters JSON", passes=(fooocus_pass(fooocus),), raw=fooocus)
        return a1111(parameters, "parameters text chunk")
    graph = _json(info.get("prompt"))
    if graph is not None and any(isinstance(n, dict) and "class_type" in n for n in graph.values()):
        return ForeignRecord("comfyui", "ComfyUI prompt graph", passes=comfyui_passes(graph), raw=graph)
    for key in ("invokeai_metadata", "sd-metadata"):
        data = _json(info.get(key))
        if data is not None:
            return ForeignRecord("invokeai", key, passes=(invokeai_pass(data, key),), raw=data)
    if isinstance(info.get("Dream"), str):
        return ForeignRecord("invokeai", "Dream", passes=(invokeai_dream_pass(info["Dream"]),), raw=info)
    if info.get("Software") == "NovelAI":
        comment = _json(info.get("Comment")) or {}
        return ForeignRecord("novelai", "Comment JSON", passes=(novelai_pass(info.get("Description", ""), comment),),
                             raw=comment)
    exif = image.getexif()
    comment = exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT) if exif else None
    if comment is not None:
        text = decode_user_comment(comment)
        if text:
            return a1111(text, "EXIF UserComment")
    text = read_stealth_text(image)
    if text:
        return a1111(text, "stealth alpha-channel text")
    return ForeignRecord(None, raw=info)


def read_image_record(path: str | os.PathLike) -> ForeignRecord:
    """What the image file at `path` says about how it was made (PNG, JPEG, WebP)."""
    try:
        with Image.open(path) as image:
            image.load()
            return record_of(image)
    except FileNotFoundError:
        raise SdtorchError(f"{os.fspath(path)!r} does not exist") from None
    except OSError as e:
        raise SdtorchError(f"{os.fspath(path)!r} is not an image sdtorch can read ({e})") from None


# --- from an A1111 record to a request, saying what is not honoured -------------------------------------

# Keys that say something without asking for anything to be done (or that are applied elsewhere).
_INFORMATIONAL = ("Version", "User", "Lora hashes", "TI hashes", "Init image hash", "Model", "Model hash",
                  "Hashes", "Emphasis")
_HIRES = re.compile(r"^(Hires|Denoising strength$)")


def regeneration_fields(text: str) -> tuple[dict, list[str]]:
    """The `GenerationRequest` fields an A1111 or sdtorch record asks for, and one line for each thing in it that
    sdtorch will not honour: an unknown sampler (the default is used), a sampler A1111 runs on code sdtorch
    does not reproduce (the diffusers-equal one runs instead), hires fix, a VAE or any other setting not applied.
    A model hash is checked by the caller, which knows the model (`model_hash_note`)."""
    from .conditioning import EMPHASIS
    from .metadata import MODE_KEY, parse_parameters, request_fields
    from .samplers import a1111_options, resolve_schedule, sampler_entry

    params = parse_parameters(text)
    notes: list[str] = []
    sampler = params.sampler
    try:
        fields = request_fields(params)
    except SdtorchError as e:
        if sampler is None or "sampler" not in str(e):
            raise
        fields = request_fields(params.__class__(**{**params.__dict__, "sampler": None}))
        notes.append(f"sampler {sampler!r} is unknown here: not applied, the default sampler runs instead")
    options = dict(fields.pop("options", {}))
    if "Emphasis" in options:
        labels = {label.lower(): ours for ours, label in EMPHASIS.items()}
        if options["Emphasis"].lower() in labels:
            fields["emphasis"] = labels[options["Emphasis"].lower()]
        else:
            notes.append(f"Emphasis: {options['Emphasis']} is not applied "
                         f"(sdtorch has: {', '.join(EMPHASIS.values())})")
    compat = fields.get("compat")
    if "sampler" in fields:
        entry = sampler_entry(fields["sampler"])
        if compat not in entry.modes:  # A1111's DDIM, PLMS, UniPC are its own timestep samplers
            notes.append(f"sampler {entry.display_name}: A1111 runs it on its own timestep sampler, which sdtorch "
                         f"does not reproduce; running diffusers' {entry.display_name} instead (the image will differ)")
            fields["compat"] = compat = "diffusers"
            try:
                fields["schedule"] = resolve_schedule(entry, fields.get("schedule", "uniform"), compat)
            except SdtorchError:
                notes.append(f"schedule type {fields['schedule']} is not applied to {entry.display_name} here; uniform")
                fields["schedule"] = "uniform"
            for key in ("ensd", "variation_seed", "variation_strength", "seed_resize_from"):
                if fields.pop(key, None) not in (None, 0, 0.0):
                    notes.append(f"{key.replace('_', ' ')} is not applied outside A1111 mode")
        elif compat == "a1111":
            if entry.space == "vp" and fields.get("schedule", "automatic") not in ("automatic", "uniform"):
                notes.append(f"schedule type {fields['schedule']} does not apply to {entry.display_name} "
                             "(A1111 runs it on its own timestep grid, as here): not applied")
                fields["schedule"] = "automatic"
            schedule = resolve_schedule(entry, fields.get("schedule", "automatic"), compat)
            _, unused = a1111_options(entry.name, schedule, options)
            for key in unused:
                notes.append(f"{key}: {options.pop(key)} does not apply to {entry.display_name}: not applied")
            if entry.a1111_caveat:
                notes.append(f"sampler {entry.display_name}: {entry.a1111_caveat}")
    hires = [key for key in options if key.startswith("Hires")]
    if hires:
        strength = fields.pop("strength", None)  # with hires fix, A1111's Denoising strength is the second pass's
        said = [f"{k}: {options[k]}" for k in hires] + ([f"Denoising strength: {strength:g}"] if strength else [])
        notes.append("hires fix (" + ", ".join(said) + ") is not applied: A1111's hires pass is not reproduced "
                     "(sdtorch's own runs in diffusers mode only); only the first pass is generated")
    vae = [f"{k}: {options[k]}" for k in ("VAE", "VAE hash") if k in options]
    if vae:
        notes.append(f"{', '.join(vae)}: that VAE is not loaded from the record; give it with --vae PATH "
                     "(otherwise the checkpoint's own VAE decodes)")
    from .samplers.run import A1111_OPTION_KEYS

    applied = set(_INFORMATIONAL) | set(A1111_OPTION_KEYS) | {MODE_KEY}
    for key, value in options.items():
        if key not in applied and not key.startswith("Hires") and key not in ("VAE", "VAE hash"):
            notes.append(f"{key}: {value} is not applied (sdtorch has no such setting)")
    if options:
        fields["options"] = options
    return fields, notes


def model_hash_note(params_hash: str | None, params_model: str | None, hash_: str | None,
                    name: str | None) -> str | None:
    """One line when the record's model hash is not the model given (A1111's 10-digit 'AutoV2' hash, or the
    legacy 8-digit one compared by prefix), else None."""
    if not params_hash:
        return None
    if hash_ is None:
        return (f"the record was made with model {params_model or '?'} [{params_hash}]; the model given "
                f"({name or 'a folder'}) has no file hash to compare")
    if hash_.lower().startswith(params_hash.lower()) or params_hash.lower().startswith(hash_.lower()):
        return None
    return (f"model hash differs: the record was made with {params_model or '?'} [{params_hash}], the model given is "
            f"{name or '?'} [{hash_}]; the image will differ")
