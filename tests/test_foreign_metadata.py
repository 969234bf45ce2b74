"""Other tools' image metadata (sdtorch.foreign_metadata) on real files, and what --from-png does with them.

The files and the values a parser should read from them are d3x-at/sd-parsers' test resources
(../shared/data/real/pngs/): each `.py` there is read here as data, with `ast` (sd_parsers is not imported),
and compared with what we read. Files without an expectation file are checked against values seen in their
own chunks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from PIL import Image

from sdtorch import cli
from sdtorch.foreign_metadata import (
    decode_user_comment,
    model_hash_note,
    read_image_record,
    read_stealth_text,
    regeneration_fields,
)
from sdtorch.metadata import parse_parameters, request_fields

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "pngs"  # ../shared beside the checkout
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"the real metadata files are not at {REAL}")


# --- the expectation files, as data ----------------------------------------------------------------------


def _value(node, env: dict | None = None):
    """An expression of an expectation file as plain data: calls become {"call": name, "args", **kwargs}; a name
    bound earlier in the file (PROMPTS = [...]) is its value."""
    env = env or {}
    if isinstance(node, ast.Call):
        name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
        return {"call": name, "args": [_value(a, env) for a in node.args],
                **{k.arg: _value(k.value, env) for k in node.keywords}}
    if isinstance(node, ast.Attribute):
        return f"{_value(node.value, env)}.{node.attr}"
    if isinstance(node, ast.Name):
        return env.get(node.id, node.id)
    if isinstance(node, ast.List | ast.Tuple):
        return [_value(e, env) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_value(k, env): _value(v, env) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def expectation(py: Path) -> dict:
    env = {}
    for statement in ast.parse(py.read_text()).body:
        if isinstance(statement, ast.Assign):
            env[statement.targets[0].id] = _value(statement.value, env)
    if "PARAM" in env:
        return env["PARAM"]
    raise AssertionError(f"{py} has no PARAM")


def calls(value, name: str) -> list[dict]:
    """Every call of `name` inside an expectation value, in order."""
    found = []
    if isinstance(value, dict):
        if value.get("call") == name:
            found.append(value)
        for v in value.values():
            found += calls(v, name)
    elif isinstance(value, list):
        for v in value:
            found += calls(v, name)
    return found


def prompt_text(prompt: dict) -> str:
    return prompt.get("value", prompt["args"][0] if prompt["args"] else None)


def metadata_of(param: dict) -> dict:
    """The tool-specific metadata dict of an expectation (the plain dict beside the samplers)."""
    for v in param["args"][1:]:
        for item in v if isinstance(v, list) else [v]:
            if isinstance(item, dict) and "call" not in item:
                return item
    return {}


EXPECTED = sorted(REAL.glob("*.py")) if REAL.is_dir() else []


@pytest.mark.parametrize("py", EXPECTED, ids=lambda p: p.stem)
def test_real_files_parse_as_expected(py):
    param = expectation(py)
    image = REAL / param["args"][0]
    record = read_image_record(image)
    samplers = calls(param, "Sampler")
    meta = metadata_of(param)
    assert samplers, py
    if record.regenerates:  # A1111: the parameters text
        (want,) = samplers
        p = parse_parameters(record.text)
        parameters = want["parameters"]
        assert p.sampler == want["name"] and f"Schedule type: {parameters['scheduler']}" in record.text
        assert (str(p.steps), str(p.seed), f"{p.cfg_scale:g}") == (parameters["steps"], parameters["seed"],
                                                                   parameters["cfg_scale"])
        model = calls(want, "Model")[0]
        assert (p.model, p.model_hash) == (model["name"], model["hash"])
        assert [p.prompt] == [prompt_text(x) for x in want["prompts"]]
        assert [p.negative_prompt] == [prompt_text(x) for x in want["negative_prompts"]]
        assert f"{p.width}x{p.height}" == meta["Size"]
        assert {k: v for k, v in p.extra.items() if k in meta} == {k: v for k, v in meta.items() if k != "Size"}
        return
    by_seed = {ours.seed: ours for ours in record.passes}
    for want in samplers:
        parameters = want["parameters"]
        ours = by_seed[parameters["seed"]]
        assert ours.sampler == want["name"]
        for key, attribute in (("steps", "steps"), ("cfg_scale", "cfg_scale"), ("scheduler", "scheduler"),
                               ("denoise", "denoise")):
            if key in parameters:
                assert getattr(ours, attribute) == parameters[key], (key, ours)
        models = calls(want, "Model")
        if models:
            assert ours.model == models[0]["name"]
            if models[0].get("hash"):
                assert ours.model_hash == models[0]["hash"]
        assert sorted(ours.prompts) == sorted(prompt_text(x) for x in want["prompts"])
        assert sorted(ours.negative_prompts) == sorted(prompt_text(x) for x in want["negative_prompts"])
    if "width" in meta:
        assert (record.passes[0].width, record.passes[0].height) == (meta["width"], meta["height"])
    if "EmptyLatentImage" in meta:
        latent = meta["EmptyLatentImage"][0]
        assert (record.passes[0].width, record.passes[0].height) == (latent["width"], latent["height"])
    tool = {"img2img": "comfyui", "night": "comfyui", "invokeai": "invokeai"}
    assert record.tool == next(v for k, v in tool.items() if py.stem.startswith(k))


def test_a1111_png_text_and_jpeg_exif_are_the_same_record():
    png = read_image_record(REAL / "automatic1111_cropped.png")
    jpg = read_image_record(REAL / "automatic1111_cropped.jpg")
    assert (png.tool, png.where, jpg.tool, jpg.where) == ("a1111", "parameters text chunk", "a1111", "EXIF UserComment")
    assert png.text == jpg.text
    fields = request_fields(parse_parameters(jpg.text))
    assert {k: fields[k] for k in ("prompt", "negative_prompt", "steps", "sampler", "cfg_scale", "seed", "width",
                                   "height", "compat", "rng")} == {
        "prompt": "photo of a duck", "negative_prompt": "monochrome", "steps": 15, "sampler": "unipc",
        "cfg_scale": 5.0, "seed": 235284042, "width": 512, "height": 400, "compat": "a1111", "rng": "gpu"}


def test_user_comment_and_stealth_decoders():
    text = "a cat\nSteps: 2, Sampler: Euler, Seed: 1"
    assert decode_user_comment(b"UNICODE\x00" + text.encode("utf-16-be")) == text
    assert decode_user_comment(b"UNICODE\x00" + text.encode("utf-16-le")) == text
    assert decode_user_comment(b"ASCII\x00\x00\x00" + text.encode()) == text
    with Image.open(REAL / "automatic1111_stealth.png") as im:
        assert read_stealth_text(im).startswith("a circle\nNegative prompt: a square\nSteps: 20, Sampler: Euler,")
        assert read_stealth_text(im.convert("RGB")) is None  # the alpha bits were the message
    assert read_stealth_text(Image.new("RGBA", (16, 16))) is None


@pytest.mark.parametrize("name, tool, seed, steps, sampler", [
    ("fooocus1_cropped.png", "fooocus", 6952411511246973023, 30, "dpmpp_2m_sde_gpu"),
    ("novelai1_cropped.png", "novelai", 2253955223, 50, "k_euler_ancestral"),
    ("unclip_2pass_cropped.png", "comfyui", 1106257833005336, 26, "uni_pc_bh2"),
    ("noisy_latents_3_subjects_cropped.png", "comfyui", 1084614416978598, 9, "sample_dpmpp_sde"),
])
def test_other_tools_are_named_with_what_they_used(name, tool, seed, steps, sampler):
    record = read_image_record(REAL / name)
    assert record.tool == tool and not record.regenerates
    first = record.passes[0]
    assert (first.seed, first.steps, first.sampler) == (seed, steps, sampler)
    line = record.describe(name)
    assert "\n" not in line and f"seed {seed}" in line and sampler in line


# --- from a record to a request ---------------------------------------------------------------------------


def test_what_is_not_honoured_is_said_one_line_each():
    text = ("a cat\nNegative prompt: dog\nSteps: 20, Sampler: DPM++ 2M SDE, Schedule type: Karras, CFG scale: 7, "
            "Seed: 1, Size: 512x512, Model hash: 6ce0161689, Model: v1-5, VAE hash: 235745af8d, VAE: vae-ft-mse.pt, "
            "Denoising strength: 0.7, Clip skip: 2, ENSD: 31337, Hires upscale: 2, Hires steps: 10, "
            "Hires upscaler: Latent, Sigma churn: 1, Eta: 0.5, Face restoration: CodeFormer, Version: v1.10.0")
    fields, notes = regeneration_fields(text)
    assert (fields["sampler"], fields["schedule"], fields["compat"], fields["rng"]) == (
        "dpmpp_2m_sde", "karras", "a1111", "gpu")
    assert (fields["ensd"], fields["clip_skip"], fields["options"]["Eta"]) == (31337, 2, "0.5")
    assert "strength" not in fields  # with hires fix, Denoising strength is the second pass's
    assert len(notes) == 4 and all("\n" not in n for n in notes)
    hires, churn, vae, face = (next(n for n in notes if word in n) for word in
                               ("hires fix", "Sigma churn", "VAE", "Face restoration"))
    assert "Hires upscale: 2" in hires and "Denoising strength: 0.7" in hires
    assert "not applied" in churn and "vae-ft-mse.pt" in vae and "CodeFormer" in face


def test_unknown_and_unreproduced_samplers_are_said():
    fields, notes = regeneration_fields("x\nSteps: 20, Sampler: Magic Sampler, CFG scale: 7, Seed: 1, Size: 64x64")
    assert "sampler" not in fields and len(notes) == 1 and "'Magic Sampler' is unknown" in notes[0]
    fields, notes = regeneration_fields("x\nSteps: 20, Sampler: UniPC, CFG scale: 7, Seed: 1, Size: 64x64")
    assert (fields["sampler"], fields["compat"]) == ("unipc", "diffusers") and "own timestep sampler" in notes[0]
    # DDIM and PLMS are A1111's own timestep samplers, reproduced (tests/test_a1111_mode.py); a schedule type,
    # which A1111 does not apply to them, is said and left out
    fields, notes = regeneration_fields("x\nSteps: 20, Sampler: DDIM, Schedule type: Karras, Eta DDIM: 0.3, "
                                        "CFG scale: 7, Seed: 1, Size: 64x64")
    assert (fields["sampler"], fields["compat"], fields["eta"], fields["schedule"]) == ("ddim", "a1111", 0.3,
                                                                                       "automatic")
    assert len(notes) == 1 and "does not apply to DDIM" in notes[0]
    fields, notes = regeneration_fields("x\nSteps: 20, Sampler: DPM fast, CFG scale: 7, Seed: 1, Size: 64x64, RNG: NV")
    assert (fields["sampler"], fields["compat"], fields["rng"], notes) == ("dpm_fast", "a1111", "nv", [])


def test_model_hash_note():
    assert model_hash_note("6ce0161689", "v1-5", "6ce0161689", "v1-5") is None
    assert model_hash_note("6ce01616", "v1-5", "6ce0161689", "v1-5") is None  # legacy 8-digit prefix
    note = model_hash_note("15012c538f", "realisticVision", "0123456789", "tiny-model")
    assert "realisticVision [15012c538f]" in note and "tiny-model [0123456789]" in note


def test_from_png_of_an_a1111_image_regenerates_in_a1111_mode_and_says_why_it_differs(tiny_checkpoint, tmp_path,
                                                                                          capsys):
    out = tmp_path / "again.png"
    code = cli.main(["generate", "--from-png", str(REAL / "automatic1111_stealth.png"), "--model", str(tiny_checkpoint),
                     "--steps", "2", "--width", "32", "--height", "32", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "model hash differs" in lines[0] and "realisticVisionV51_v51VAE [15012c538f]" in lines[0]
    params = parse_parameters(Image.open(out).info["parameters"])
    assert params.extra["sdtorch mode"] == "a1111" and "RNG" not in params.extra  # GPU, A1111's default
    assert (params.prompt, params.negative_prompt, params.seed, params.extra["Clip skip"]) == (
        "a circle", "a square", 2015833630, "2")


def test_from_png_of_a_comfyui_image_is_one_line(tiny_checkpoint, tmp_path, capsys):
    code = cli.main(["generate", "--from-png", str(REAL / "img2img_cropped.png"), "--model", str(tiny_checkpoint),
                     "--out", str(tmp_path / "x.png"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "ComfyUI" in err and "seed 280823642470253" in err and "20 steps" in err and "CFG 8" in err
    assert not (tmp_path / "x.png").exists()
