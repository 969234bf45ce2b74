"""The A1111 'parameters' text: exact layout, round trips, real-looking A1111/Forge infotexts, PNG
chunks, model hashes."""

import hashlib
import io

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from sdtorch.errors import SdtorchError
from sdtorch.metadata import (
    GenerationParams,
    format_parameters,
    model_hash,
    parse_parameters,
    read_png_parameters,
    sampler_from_a1111,
    write_png,
)
from sdtorch.samplers import SAMPLERS, SCHEDULE_TYPES, a1111_name


def params(**changes):
    base = dict(
        prompt="a photo of a cat", negative_prompt="blurry", steps=20, sampler="Euler a", cfg_scale=7.0,
        seed=123, width=512, height=512,
    )
    return GenerationParams(**(base | changes))


# ------------------------------------------------------------------------------------ formatting

def test_format_exact_layout():
    p = params(model_hash="abcd1234ef", model="name", denoising_strength=0.6)
    assert format_parameters(p) == (
        "a photo of a cat\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 123, Size: 512x512, Model hash: abcd1234ef, "
        "Model: name, Denoising strength: 0.6"
    )


def test_format_omits_absent_fields_and_empty_negative():
    p = params(negative_prompt="", cfg_scale=7.5, seed=-1, width=640, height=448)
    assert format_parameters(p) == (
        "a photo of a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: -1, Size: 640x448"
    )


def test_format_quotes_values_like_a1111():
    p = params(model="my, model: v2", extra={"Lora hashes": "a: b, c: d", "Clip skip": "2", "Note": '"hi"'})
    line = format_parameters(p).splitlines()[-1]
    assert 'Model: "my, model: v2"' in line
    assert line.endswith(', Lora hashes: "a: b, c: d", Clip skip: 2, Note: "\\"hi\\""')
    assert parse_parameters(format_parameters(p)) == p


def test_format_without_parameters_is_the_prompt():
    p = GenerationParams(prompt="just words", steps=None, sampler=None, cfg_scale=None, seed=None,
                         width=None, height=None)
    assert format_parameters(p) == "just words"
    assert parse_parameters("just words") == p


@pytest.mark.parametrize(
    "p",
    [
        params(),
        params(negative_prompt=""),
        params(prompt="line one,\nline two\n  indented three", negative_prompt="bad,\nworse"),
        params(prompt="", negative_prompt="only a negative"),
        params(prompt="ünïcödé 猫, 🐱", sampler="DPM++ 2M Karras", cfg_scale=6.5, seed=2**32 - 1),
        params(model_hash="6ce0161689", model="v1-5-pruned-emaonly", denoising_strength=0.75),
        params(denoising_strength=0.1 + 0.2),  # 0.30000000000000004 survives
        params(extra={"Clip skip": "2", "Hires upscale": "2", "Version": "v1.7.0",
                      "ADetailer prompt": "a face,\nsmiling", "Empty": "", "Spaced": " x "}),
        params(width=None, height=None, seed=None),
    ],
)
def test_round_trip(p):
    assert parse_parameters(format_parameters(p)) == p


def test_params_are_frozen_hashable_and_own_their_extra():
    extra = {"Clip skip": "2"}
    p = params(extra=extra)
    extra["Clip skip"] = "3"
    assert p.extra == {"Clip skip": "2"}
    hash(p)
    with pytest.raises(AttributeError):
        p.steps = 30


@pytest.mark.parametrize("key", ["Steps", "Model", "x", "bad:key", "a,b"])
def test_extra_keys_that_cannot_be_written_are_refused(key):
    with pytest.raises(SdtorchError, match="extra parameter key"):
        params(extra={key: "1"})


# ------------------------------------------------------------------ parsing A1111's own output

# Modelled on infotexts A1111 1.x and Forge write; one per layout that matters.
A1111_CLASSIC = (
    "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, "
    "by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
    "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly "
    "drawn face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
)

A1111_V17_LORA = (
    "masterpiece, best quality, 1girl, solo, (silver hair:1.2), long hair,\n"
    "looking at viewer, <lora:add_detail:0.6>, <lora:more_details:0.4>\n"
    "cherry blossoms, night sky\n"
    "Negative prompt: (worst quality, low quality:1.4), easynegative, lowres\n"
    "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 3885432463, Size: 512x768, "
    "Model hash: 7f96a1a9ca, Model: AnythingV5_v5PrtRE, Denoising strength: 0.45, Clip skip: 2, "
    "Hires upscale: 2, Hires steps: 15, Hires upscaler: R-ESRGAN 4x+ Anime6B, "
    'Lora hashes: "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef", '
    'TI hashes: "easynegative: c74b4e810b03", Version: v1.7.0'
)

A1111_V110_SCHEDULE = (
    "a photo of an astronaut riding a horse on mars, highly detailed\n"
    "Negative prompt: blurry\n"
    "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6, Seed: 1234567890, "
    "Size: 768x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, "
    "VAE: vae-ft-mse-840000-ema-pruned.safetensors, Version: v1.10.1"
)

A1111_IMG2IMG_NO_NEGATIVE = (
    "oil painting of a lighthouse at dusk\n"
    "Steps: 30, Sampler: Euler, CFG scale: 8.5, Seed: 42, Size: 640x448, Model hash: e1441589a6, "
    "Model: sd-v1-5, Denoising strength: 0.6, Mask blur: 4, Version: v1.6.0"
)

FORGE_AUTOMATIC_CRLF = (
    "portrait of an old sailor, weathered skin\r\n"
    "dramatic lighting\r\n"
    "Negative prompt: cartoon,\r\n"
    "3d render, (bad hands:1.3)\r\n"
    "Steps: 24, Sampler: DPM++ 2M, Schedule type: Automatic, CFG scale: 5, Seed: 7, Size: 832x1216, "
    'Model hash: 31e35c80fc, Model: sd_xl_base_1.0, ADetailer prompt: "a face,\\nsmiling", '
    "ADetailer model: face_yolov8n.pt, Version: f0.0.17v1.8.0rc-latest-276-g29be1da7\r\n"
)


def test_parse_classic_a1111():
    p = parse_parameters(A1111_CLASSIC)
    assert p.prompt.startswith("girl with an artist's beret") and p.prompt.endswith("detailed, intricate")
    assert p.negative_prompt.startswith("ugly, fat") and p.negative_prompt.endswith("messy drawing")
    assert (p.steps, p.sampler, p.cfg_scale, p.seed) == (20, "Euler a", 7.0, 965400086)
    assert (p.width, p.height, p.model_hash) == (512, 512, "45dee52b")
    assert p.model is None and p.denoising_strength is None
    assert p.extra == {}
    assert format_parameters(p) == A1111_CLASSIC  # A1111's text comes back byte for byte


def test_parse_multiline_prompt_lora_hashes_and_extras():
    p = parse_parameters(A1111_V17_LORA)
    assert p.prompt == (
        "masterpiece, best quality, 1girl, solo, (silver hair:1.2), long hair,\n"
        "looking at viewer, <lora:add_detail:0.6>, <lora:more_details:0.4>\n"
        "cherry blossoms, night sky"
    )
    assert p.negative_prompt == "(worst quality, low quality:1.4), easynegative, lowres"
    assert (p.steps, p.sampler, p.cfg_scale, p.seed, p.width, p.height) == (
        28, "DPM++ 2M Karras", 7.5, 3885432463, 512, 768)
    assert (p.model_hash, p.model, p.denoising_strength) == ("7f96a1a9ca", "AnythingV5_v5PrtRE", 0.45)
    assert p.extra == {
        "Clip skip": "2", "Hires upscale": "2", "Hires steps": "15", "Hires upscaler": "R-ESRGAN 4x+ Anime6B",
        "Lora hashes": "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef",
        "TI hashes": "easynegative: c74b4e810b03", "Version": "v1.7.0",
    }
    # Written back in A1111 1.9's form, the schedule apart from the sampler (issue 10); all else byte for byte.
    assert format_parameters(p) == A1111_V17_LORA.replace("DPM++ 2M Karras", "DPM++ 2M, Schedule type: Karras")
    assert sampler_from_a1111(p.sampler) == ("dpmpp_2m", "karras")


def test_parse_schedule_type_is_folded_into_the_sampler():
    p = parse_parameters(A1111_V110_SCHEDULE)
    assert p.sampler == "DPM++ 2M Karras"
    assert "Schedule type" not in p.extra
    assert p.extra == {"VAE hash": "735e4c3a44", "VAE": "vae-ft-mse-840000-ema-pruned.safetensors",
                       "Version": "v1.10.1"}
    assert (p.steps, p.cfg_scale, p.seed, p.width, p.height) == (25, 6.0, 1234567890, 768, 512)


def test_parse_img2img_without_negative_prompt():
    p = parse_parameters(A1111_IMG2IMG_NO_NEGATIVE)
    assert p.prompt == "oil painting of a lighthouse at dusk"
    assert p.negative_prompt == ""
    assert (p.sampler, p.cfg_scale, p.denoising_strength, p.width, p.height) == ("Euler", 8.5, 0.6, 640, 448)
    assert p.extra == {"Mask blur": "4", "Version": "v1.6.0"}
    assert format_parameters(p) == A1111_IMG2IMG_NO_NEGATIVE


def test_parse_forge_crlf_multiline_negative_and_automatic_schedule():
    p = parse_parameters(FORGE_AUTOMATIC_CRLF)
    assert p.prompt == "portrait of an old sailor, weathered skin\ndramatic lighting"
    assert p.negative_prompt == "cartoon,\n3d render, (bad hands:1.3)"
    assert p.sampler == "DPM++ 2M Karras"  # A1111's "Automatic" for DPM++ 2M is Karras
    assert p.extra["ADetailer prompt"] == "a face,\nsmiling"
    assert p.extra["Version"] == "f0.0.17v1.8.0rc-latest-276-g29be1da7"
    assert (p.width, p.height, p.model) == (832, 1216, "sd_xl_base_1.0")


@pytest.mark.parametrize(
    "sampler, schedule, folded",
    [
        ("Euler a", "Automatic", "Euler a"),
        ("Euler", "Uniform", "Euler"),
        ("Euler", "Karras", "Euler Karras"),
        ("DPM++ 2M Karras", "Karras", "DPM++ 2M Karras"),
        ("DPM++ 2M SDE", "Automatic", "DPM++ 2M SDE Exponential"),
        ("DPM++ 2M", "Align Your Steps", "DPM++ 2M Align Your Steps"),
    ],
)
def test_schedule_type_folding(sampler, schedule, folded):
    text = f"x\nSteps: 20, Sampler: {sampler}, Schedule type: {schedule}, CFG scale: 7"
    assert parse_parameters(text).sampler == folded


def test_parse_prompt_only_texts():
    p = parse_parameters("a cat\nwearing a hat\n")
    assert (p.prompt, p.negative_prompt) == ("a cat\nwearing a hat", "")
    assert p.steps is None and p.sampler is None and p.width is None
    # A last prompt line of weighted tokens is not a parameters line (A1111 would misread it).
    p = parse_parameters("a cat\n(cat:1.2), (dog:1.1), (hat:0.9)")
    assert p.prompt == "a cat\n(cat:1.2), (dog:1.1), (hat:0.9)" and p.steps is None
    p = parse_parameters("a cat\nNegative prompt: dog")
    assert (p.prompt, p.negative_prompt, p.steps) == ("a cat", "dog", None)
    assert parse_parameters("").prompt == ""


def test_parse_partial_parameters_line():
    p = parse_parameters("a cat\nSampler: Euler, Seed: 5, Clip skip: 2")
    assert (p.sampler, p.seed) == ("Euler", 5)
    assert p.steps is None and p.cfg_scale is None and p.width is None and p.height is None
    assert p.extra == {"Clip skip": "2"}


@pytest.mark.parametrize(
    "line, message",
    [
        ("Steps: many, Sampler: Euler, Seed: 1", "Steps is 'many', expected an integer"),
        ("Steps: 20, CFG scale: high, Seed: 1", "CFG scale is 'high', expected a number"),
        ("Steps: 20, Size: big, Seed: 1", "Size is 'big', expected WIDTHxHEIGHT"),
    ],
)
def test_parse_bad_numbers(line, message):
    with pytest.raises(SdtorchError, match=message):
        parse_parameters("x\n" + line)


# ---------------------------------------------------------------------------------- samplers

def test_sampler_table_round_trips():
    for ours, info in SAMPLERS.items():
        for schedule in info.schedules:
            assert sampler_from_a1111(a1111_name(ours, schedule)) == (ours, schedule)
    assert sampler_from_a1111("  dpm++ 2m   karras ") == ("dpmpp_2m", "karras")
    assert sampler_from_a1111("PLMS") == ("pndm", "uniform")
    assert sampler_from_a1111("Euler a") == ("euler_a", "uniform")
    assert set(SCHEDULE_TYPES) == {s for info in SAMPLERS.values() for s in info.schedules}


def test_unknown_sampler_lists_known_ones():
    with pytest.raises(SdtorchError, match=r"unknown sampler 'DPM fast'; known: DDIM, PLMS, .*DDPM"):
        sampler_from_a1111("DPM fast")
    with pytest.raises(SdtorchError, match="'Exponential' noise schedule"):
        sampler_from_a1111("DPM++ 2M SDE Exponential")
    with pytest.raises(SdtorchError, match="unknown sampler 'nope'"):
        a1111_name("nope")


# ------------------------------------------------------------------------------------- PNGs

def small_image(seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))


def test_png_round_trip_and_deterministic_bytes(tmp_path):
    p = params(prompt="ünïcödé 猫 prompt", model_hash="abcd1234ef", extra={"Clip skip": "2"})
    write_png(tmp_path / "a.png", small_image(), p)
    write_png(tmp_path / "b.png", small_image(), p)  # a different Image object, same pixels
    a, b = (tmp_path / "a.png").read_bytes(), (tmp_path / "b.png").read_bytes()
    assert a == b
    assert b"tIME" not in a
    assert read_png_parameters(tmp_path / "a.png") == p
    with Image.open(tmp_path / "a.png") as im:
        assert np.array_equal(np.asarray(im), np.asarray(small_image()))
        assert im.text["parameters"] == format_parameters(p)


def test_png_latin1_text_is_a_tEXt_chunk(tmp_path):
    write_png(tmp_path / "a.png", small_image(), params())
    data = (tmp_path / "a.png").read_bytes()
    assert b"tEXtparameters\x00a photo of a cat" in data


def test_reads_a1111_png_written_by_pil(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_V110_SCHEDULE)
    small_image().save(tmp_path / "a1111.png", pnginfo=info)
    assert read_png_parameters(tmp_path / "a1111.png").sampler == "DPM++ 2M Karras"


def test_read_png_errors(tmp_path):
    small_image().save(tmp_path / "plain.png")
    small_image().save(tmp_path / "photo.jpg")
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    good = io.BytesIO()
    write_png(good, small_image(), params())
    (tmp_path / "cut.png").write_bytes(good.getvalue()[:40])
    with pytest.raises(SdtorchError, match="no 'parameters' text chunk"):
        read_png_parameters(tmp_path / "plain.png")
    with pytest.raises(SdtorchError, match="is not a PNG file"):
        read_png_parameters(tmp_path / "photo.jpg")
    with pytest.raises(SdtorchError, match="is not a PNG file"):
        read_png_parameters(tmp_path / "junk.png")
    with pytest.raises(SdtorchError, match="corrupt or truncated PNG"):
        read_png_parameters(tmp_path / "cut.png")
    with pytest.raises(SdtorchError, match="does not exist"):
        read_png_parameters(tmp_path / "missing.png")
    with pytest.raises(SdtorchError, match="is a directory"):
        read_png_parameters(tmp_path)


def test_write_png_to_missing_folder(tmp_path):
    with pytest.raises(SdtorchError, match="cannot write PNG"):
        write_png(tmp_path / "no" / "such" / "dir.png", small_image(), params())


# ------------------------------------------------------------------------------- model hash

def test_model_hash_is_autov2(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 300_001, dtype=np.uint8).tobytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()[:10]
    assert model_hash(path) == expected
    assert model_hash(path, chunk_size=4096) == expected  # many chunks, a short last one
    assert len(expected) == 10


def test_model_hash_errors(tmp_path):
    with pytest.raises(SdtorchError, match="does not exist"):
        model_hash(tmp_path / "missing.ckpt")
    with pytest.raises(SdtorchError, match="is a directory"):
        model_hash(tmp_path)
