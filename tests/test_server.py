"""`sdtorch serve`, driven as its clients drive it: a real uvicorn server on 127.0.0.1, the real
`webuiapi` client (AUTOMATIC1111's Python client), and raw HTTP replays of what Open WebUI and
SillyTavern send. The images are the embedded model's, judged by `sdtorch.shapes`, and the API's
image must be the CLI's, pixel for pixel."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch  # noqa: E402
import webuiapi  # noqa: E402  (the dev extras have it: a missing client is a failure, not a skip)
from oracles import randomise_
from PIL import Image, PngImagePlugin

from sdtorch.config import TINY  # noqa: E402
from sdtorch.loading import save_checkpoint  # noqa: E402
from sdtorch.metadata import parse_parameters, request_fields  # noqa: E402
from sdtorch.model import StableDiffusion  # noqa: E402
from sdtorch.server.background import BackgroundServer  # noqa: E402
from sdtorch.shapes.judge import judge  # noqa: E402
from sdtorch.shapes.world import Scene, render  # noqa: E402

PROMPT = "a red circle on a blue background"
ENVELOPE = {"error", "detail", "body", "errors"}
MAX_BODY = 2 * 1024 * 1024
AUTH = ("alice", "pa:ss:word")  # a password may contain ':'


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(queue_size=16, max_body_bytes=MAX_BODY) as s:
        yield s


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    (folder / "sub").mkdir()
    for seed, path in ((1, folder / "tiny-a.safetensors"), (2, folder / "sub" / "tiny-b.safetensors")):
        model = StableDiffusion.random(TINY)
        for net in model.networks().values():
            randomise_(net, seed=seed)
        save_checkpoint(model, path)
    (folder / "notes.txt").write_text("not a model")
    return folder


@pytest.fixture(scope="module")
def models_server(models_dir):
    with BackgroundServer(models_dir=models_dir, auth=[AUTH], cors_origins=["http://allowed.test"]) as s:
        yield s


def client(server, **kw) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host=server.host, port=server.port, **kw)


def png_parameters(image: Image.Image) -> str:
    return image.info["parameters"]


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdtorch.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def expect_envelope(response: requests.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == ENVELOPE, body
    assert "Traceback" not in response.text and 'File "' not in response.text
    for word in words:
        assert word.lower() in json.dumps(body).lower(), (word, body)
    return body


# ---------------------------------------------------------------------------------------------- generation


def test_idle_progress_is_exactly_zero(server):
    progress = requests.get(server.url + "/sdapi/v1/progress").json()
    assert progress["progress"] == 0 and type(progress["progress"]) is int  # JSON 0: `=== 0.0` holds in JS
    assert progress["state"]["job_count"] == 0 and progress["state"]["job"] == ""
    assert progress["current_image"] is None
    client(server).util_wait_for_ready(check_interval=0.1)  # returns at once when idle (else it would loop)


def test_txt2img_is_the_cli_image_pixel_for_pixel(server, tmp_path):
    api = client(server)
    settings = dict(prompt=PROMPT, negative_prompt="green", seed=42, steps=8, cfg_scale=4, width=64, height=64)
    result = api.txt2img(sampler_name="DPM++ 2M Karras", **settings)
    out = tmp_path / "cli.png"
    run = run_cli("generate", PROMPT, "--negative", "green", "--seed", 42, "--steps", 8, "--cfg", 4,
                  "--sampler", "dpmpp_2m", "--karras", "--width", 64, "--height", 64, "--out", out, "--quiet")
    assert run.returncode == 0, run.stderr
    cli = Image.open(out)
    assert np.array_equal(np.asarray(result.image), np.asarray(cli.convert("RGB")))
    assert png_parameters(result.image) == cli.info["parameters"]
    assert result.info["infotexts"] == [cli.info["parameters"]]

    # The infotext reads back to the request that was run.
    fields = request_fields(parse_parameters(result.info["infotexts"][0]))
    assert {k: fields[k] for k in ("prompt", "negative_prompt", "steps", "cfg_scale", "sampler", "schedule", "seed",
                                   "width", "height")} == {
        "prompt": PROMPT, "negative_prompt": "green", "steps": 8, "cfg_scale": 4.0, "sampler": "dpmpp_2m",
        "schedule": "karras", "seed": 42, "width": 64, "height": 64}
    info = result.info
    assert (info["seed"], info["all_seeds"]) == (42, [42])
    assert (info["sampler_name"], info["scheduler"]) == ("DPM++ 2M", "Karras")
    assert info["sd_model_name"] == "sdtorch-shapes" and len(info["sd_model_hash"]) == 10
    assert result.parameters["steps"] == 8 and result.parameters["sampler_name"] == "DPM++ 2M Karras"
    verdict = judge(np.asarray(result.image))
    assert (verdict.shape, verdict.colour, verdict.background) == ("circle", "red", "blue"), verdict

    # The 1.9+ spelling (sampler and scheduler apart, scheduler by label or name) is the same request.
    again = api.txt2img(sampler_name="DPM++ 2M", scheduler="Karras", **settings)
    assert np.array_equal(np.asarray(again.image), np.asarray(result.image))
    # A1111's "Automatic" for DPM++ 2M is Karras, too.
    auto = api.txt2img(sampler_name="DPM++ 2M", scheduler="automatic", **settings)
    assert np.array_equal(np.asarray(auto.image), np.asarray(result.image))


def test_batches_and_iterations_continue_the_seed(server):
    api = client(server)
    result = api.txt2img(prompt="a yellow star", seed=100, steps=2, batch_size=2, n_iter=2, width=64, height=64,
                         sampler_name="Euler")
    assert len(result.images) == 4 and result.info["all_seeds"] == [100, 101, 102, 103]
    assert [parse_parameters(t).seed for t in result.info["infotexts"]] == [100, 101, 102, 103]
    alone = api.txt2img(prompt="a yellow star", seed=103, steps=2, width=64, height=64, sampler_name="Euler")
    assert np.abs(np.asarray(alone.image, dtype=int) - np.asarray(result.images[3], dtype=int)).max() <= 1
    # Seed -1 draws one; the result says which.
    drawn = api.txt2img(prompt="a yellow star", seed=-1, steps=1, width=64, height=64)
    assert drawn.info["seed"] >= 0 and f"Seed: {drawn.info['seed']}," in drawn.info["infotexts"][0]


def test_every_field_is_nullable_and_defaults_are_a1111s(server):
    from sdtorch.server.a1111 import Txt2ImgRequest

    body = {name: None for name in Txt2ImgRequest.model_fields} | {"prompt": PROMPT, "width": 64, "height": 64,
                                                                   "seed": 3, "an_unknown_field": {"x": 1}}
    r = requests.post(server.url + "/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    # A1111's API defaults: 50 steps, CFG 7, sampler_index "Euler" on its default schedule.
    assert (info["steps"], info["cfg_scale"], info["sampler_name"], info["scheduler"]) == (50, 7.0, "Euler", "Uniform")
    assert r.json()["parameters"]["steps"] is None and "an_unknown_field" not in r.json()["parameters"]
    assert info["sdtorch"]["ignored"] == []
    hires = requests.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64,
                                                                    "height": 64, "enable_hr": True, "hr_scale": 1.5,
                                                                    "hr_sampler_name": "DPM++ 2M"})
    assert hires.status_code == 200, hires.text
    info = json.loads(hires.json()["info"])
    assert "Hires upscale: 1.5" in info["infotexts"][0] and info["denoising_strength"] == 0.75
    assert info["sdtorch"]["ignored"] == ["hr_sampler_name"]  # a second-pass sampler: said, not hidden


def test_txt2img_hires_fix_is_the_cli_image(server, tmp_path):
    """A1111's enable_hr with hr_resize_x/hr_resize_y equals `sdtorch generate --hires-width/--hires-height`."""
    result = client(server).txt2img(prompt=PROMPT, seed=4, steps=4, cfg_scale=4, width=64, height=64,
                                    sampler_name="Euler", scheduler="Uniform", enable_hr=True, hr_resize_x=96,
                                    hr_resize_y=80,
                                    hr_upscaler=webuiapi.HiResUpscaler.Latent, denoising_strength=0.5)
    assert result.image.size == (96, 80)
    text = png_parameters(result.image)
    assert "Hires resize: 96x80" in text and "Denoising strength: 0.5" in text and "Size: 64x64" in text
    done = run_cli("generate", PROMPT, "--seed", 4, "--steps", 4, "--cfg", 4, "--sampler", "euler", "--width", 64,
                   "--height", 64, "--hires-width", 96, "--hires-height", 80, "--hires-strength", 0.5, "--quiet",
                   "--out", tmp_path / "cli.png")
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "cli.png").convert("RGB")), np.asarray(result.image))
    bad = requests.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64,
                                                                  "enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"})
    expect_envelope(bad, 400, "hr_upscaler", "Latent (bicubic)")


def test_img2img_is_the_cli_image(server, tmp_path):
    scene = Scene(shape="square", colour="green", size="large", position="center", background="white")
    init = Image.fromarray(render(scene, 64))
    init.save(tmp_path / "init.png")
    result = client(server).img2img(images=[init], prompt="a large red square on a white background", seed=3,
                                    steps=10, cfg_scale=4, denoising_strength=0.6, width=64, height=64,
                                    sampler_name="Euler a")
    out = tmp_path / "cli.png"
    run = run_cli("generate", "a large red square on a white background", "--init-image", tmp_path / "init.png",
                  "--strength", 0.6, "--seed", 3, "--steps", 10, "--cfg", 4, "--sampler", "euler_a", "--out", out,
                  "--quiet")
    assert run.returncode == 0, run.stderr
    cli = Image.open(out)
    assert np.array_equal(np.asarray(result.image), np.asarray(cli.convert("RGB")))
    assert png_parameters(result.image) == cli.info["parameters"]
    assert "Denoising strength: 0.6" in result.info["infotexts"][0] and result.info["denoising_strength"] == 0.6
    assert result.parameters["init_images"] is None  # include_init_images is off, as in A1111
    assert judge(np.asarray(result.image)).position == "center"
    # A1111's resize modes: a 96x64 picture cropped (1) or filled (2) to the requested 64x64.
    wide = Image.fromarray(render(scene, 96)).resize((96, 64))
    for mode in (1, 2):
        fitted = client(server).img2img(images=[wide], prompt="x", steps=2, denoising_strength=0.5, width=64,
                                        height=64, resize_mode=mode, seed=1)
        assert fitted.image.size == (64, 64)


def test_progress_shows_a_preview_and_interrupt_and_skip_stop_the_job(server):
    api = client(server)
    outcome = {}

    def generate():
        outcome["result"] = api.txt2img(prompt=PROMPT, seed=7, steps=400, n_iter=2, width=64, height=64)

    thread = threading.Thread(target=generate)
    thread.start()

    def wait_for(check, what):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            progress = api.get_progress()
            if check(progress):
                return progress
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    busy = wait_for(lambda p: p["state"]["sampling_step"] >= 2 and p["current_image"], "the first steps")
    assert busy["state"]["job_count"] == 2 and busy["state"]["job"] == "scripts_txt2img"
    assert 0.01 < busy["progress"] < 0.5 and busy["eta_relative"] > 0
    preview = Image.open(io.BytesIO(base64.b64decode(busy["current_image"])))
    assert preview.format == "PNG" and preview.size == (64, 64)
    api.skip()  # the first batch stops where it is; the second goes on
    wait_for(lambda p: p["state"]["job_no"] == 1 and p["state"]["sampling_step"] >= 2, "the second batch")
    started = time.monotonic()
    assert api.interrupt() == {}
    thread.join(120)
    assert not thread.is_alive() and time.monotonic() - started < 60
    result = outcome["result"]
    assert len(result.images) == 2 and result.info["all_seeds"] == [7, 8]
    assert result.info["sdtorch"]["state"] == "interrupted" and result.info["sdtorch"]["partial"] == [True, True]
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def test_listings_have_a1111s_shapes(server):
    api = client(server)
    samplers = {s["name"]: s for s in api.get_samplers()}
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "LMS", "Heun", "UniPC"} <= set(samplers)
    assert "k_euler_a" in samplers["Euler a"]["aliases"] and samplers["DPM++ 2M"]["options"]["scheduler"] == "karras"
    assert {s["name"] for s in api.get_schedulers()} == {"automatic", "uniform", "karras"}
    assert [u["name"] for u in api.get_upscalers()][0] == "None"
    assert {"name": "Latent"} in api.get_latent_upscale_modes()
    for listing in (api.get_sd_vae(), api.get_loras(), api.get_prompt_styles(), api.get_face_restorers(),
                    api.get_hypernetworks(), api.get_realesrgan_models()):
        assert listing == []
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert api.get_memory()["ram"]["used"] > 0
    assert api.get_cmd_flags()["api"] is True
    models = api.get_sd_models()
    assert [m["model_name"] for m in models] == ["sdtorch-shapes"]
    assert models[0]["title"] == f"sdtorch-shapes.safetensors [{models[0]['hash']}]"
    assert not os.path.isabs(models[0]["filename"]) and models[0]["sha256"].startswith(models[0]["hash"])
    assert api.util_get_current_model() == models[0]["title"]
    assert "forge_preset" not in api.get_options()  # SillyTavern would take us for Forge


def test_png_info_reads_back_what_txt2img_wrote(server):
    api = client(server)
    result = api.txt2img(prompt="a blue triangle", seed=9, steps=2, width=64, height=64)
    assert api.png_info(result.image).info == result.info["infotexts"][0]  # webuiapi sends a data URL
    raw = requests.post(server.url + "/sdapi/v1/png-info",
                        json={"image": base64.b64encode(_png_bytes(result.image)).decode()}).json()
    assert raw["info"] == result.info["infotexts"][0]
    assert raw["parameters"]["Seed"] == "9" and raw["parameters"]["Prompt"] == "a blue triangle"
    assert raw["parameters"]["Size-1"] == "64"
    plain = requests.post(server.url + "/sdapi/v1/png-info",
                          json={"image": base64.b64encode(_png_bytes(Image.new("RGB", (8, 8)))).decode()})
    assert plain.status_code == 200 and plain.json()["info"] == "" and plain.json()["parameters"] == {}


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    for key, value in image.info.items():
        if isinstance(value, str):
            info.add_text(key, value)
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- models, options


def test_models_folder_switching_through_options(models_server):
    api = client(models_server, username=AUTH[0], password=AUTH[1])
    models = {m["model_name"]: m for m in api.get_sd_models()}
    assert set(models) == {"sdtorch-shapes", "tiny-a", "sub_tiny-b"}
    assert models["sub_tiny-b"]["filename"] == "sub/tiny-b.safetensors"
    assert all(not os.path.isabs(m["filename"]) for m in models.values())

    api.util_set_model("sub/tiny-b.safetensors")  # webuiapi's fuzzy match on the titles, then POST options
    assert api.util_get_current_model() == models["sub_tiny-b"]["title"]
    b = api.txt2img(prompt="x", seed=5, steps=2, width=32, height=32)
    assert b.info["sd_model_name"] == "sub_tiny-b" and b.image.size == (32, 32)
    assert f"Model hash: {models['sub_tiny-b']['hash']}" in b.info["infotexts"][0]

    # Open WebUI posts back the whole dict it got, with the model changed.
    options = api.get_options()
    options["sd_model_checkpoint"] = models["tiny-a"]["title"]
    assert api.set_options(options) is None
    assert api.get_options()["sd_model_checkpoint"] == models["tiny-a"]["title"]
    a = api.txt2img(prompt="x", seed=5, steps=2, width=32, height=32)
    assert a.info["sd_model_name"] == "tiny-a"
    assert not np.array_equal(np.asarray(a.image), np.asarray(b.image))

    # A per-request override runs that model once, then the default is back.
    once = api.txt2img(prompt="x", seed=5, steps=2, width=32, height=32,
                       override_settings={"sd_model_checkpoint": "tiny-b"})
    assert np.array_equal(np.asarray(once.image), np.asarray(b.image))
    assert api.get_options()["sd_model_checkpoint"] == models["tiny-a"]["title"]

    session = requests.Session()
    session.auth = AUTH
    for name in ("nope.safetensors", "/etc/passwd", "../tiny-a.safetensors", str(models_server.jobs.registry.
                                                                                models_dir / "tiny-a.safetensors")):
        r = session.post(models_server.url + "/sdapi/v1/options", json={"sd_model_checkpoint": name})
        expect_envelope(r, 400, "not found")
    assert api.get_options()["sd_model_checkpoint"] == models["tiny-a"]["title"]
    r = session.post(models_server.url + "/sdapi/v1/options", json={"CLIP_stop_at_last_layers": "two"})
    expect_envelope(r, 422, "CLIP_stop_at_last_layers")
    assert session.post(models_server.url + "/sdapi/v1/refresh-checkpoints").json() is None


def test_auth_when_on_and_ignored_when_off(models_server, server):
    url = models_server.url + "/sdapi/v1/options"
    partial = "Basic " + base64.b64encode(b"alice:pa").decode()  # the password cut at its first ':'
    for headers in ({}, {"Authorization": "Basic "}, {"Authorization": partial}, {"Authorization": "Bearer token"},
                    {"Authorization": "Basic !!!"}):
        r = requests.get(url, headers=headers)
        expect_envelope(r, 401, "Incorrect username or password")
        assert r.headers["WWW-Authenticate"].startswith("Basic")
    assert requests.get(url, auth=AUTH).status_code == 200
    assert requests.get(models_server.url + "/", auth=("alice", "wrong")).status_code == 401
    assert requests.get(models_server.url + "/", auth=AUTH).status_code == 200
    # Off: SillyTavern's empty Basic, Open WebUI's empty header and a stray password are all ignored.
    for headers in ({"Authorization": "Basic "}, {"authorization": ""},
                    {"Authorization": "Basic " + base64.b64encode(b":").decode()}, {"Authorization": "Basic x:y"}):
        assert requests.get(server.url + "/sdapi/v1/options", headers=headers).status_code == 200


def test_cors_only_for_configured_origins(models_server, server):
    preflight = {"Origin": "http://allowed.test", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type,authorization"}
    r = requests.options(models_server.url + "/sdapi/v1/txt2img", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://allowed.test"
    r = requests.options(models_server.url + "/sdapi/v1/txt2img", headers=preflight | {"Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in r.headers
    r = requests.get(server.url + "/sdapi/v1/options", headers={"Origin": "http://allowed.test"})
    assert "access-control-allow-origin" not in r.headers  # off unless configured


# ---------------------------------------------------------------------------------------------- real clients' sequences


def test_sillytavern_sequence(server):
    s = requests.Session()
    s.headers["Authorization"] = "Basic "  # base64 of an empty auth setting
    base = server.url + "/sdapi/v1"
    assert s.get(base + "/options").ok  # ping
    upscalers, latent = s.get(base + "/upscalers").json(), s.get(base + "/latent-upscale-modes").json()
    assert [u["name"] for u in upscalers] and [m["name"] for m in latent]
    assert s.get(base + "/sd-vae").json() == []
    samplers = [x["name"] for x in s.get(base + "/samplers").json()]
    schedulers = [x["name"] for x in s.get(base + "/schedulers").json()]
    title = s.get(base + "/sd-models").json()[0]["title"]
    assert s.get(base + "/options").json()["sd_model_checkpoint"] == title
    assert s.post(base + "/options", json={"sd_model_checkpoint": title}).ok
    progress = s.get(base + "/progress").json()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0
    body = {"url": "http://localhost:7860", "auth": "", "prompt": PROMPT, "negative_prompt": "",
            "sampler_name": samplers[samplers.index("DPM++ 2M")], "scheduler": schedulers[schedulers.index("karras")],
            "steps": 3, "cfg_scale": 4, "width": 64, "height": 64, "restore_faces": False, "enable_hr": False,
            "hr_upscaler": "Latent", "hr_scale": 2.0, "denoising_strength": 0.7, "hr_second_pass_steps": 0,
            "seed": 11, "override_settings": {"CLIP_stop_at_last_layers": 1},
            "override_settings_restore_afterwards": True, "clip_skip": 1, "save_images": True, "send_images": True,
            "do_not_save_grid": False, "do_not_save_samples": False, "hr_additional_modules": []}
    r = s.post(base + "/txt2img", json=body)
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert image.size == (64, 64) and "Sampler: DPM++ 2M, Schedule type: Karras" in image.info["parameters"]
    assert s.post(base + "/interrupt").json() == {}


def test_open_webui_sequence(server):
    s = requests.Session()
    base = server.url + "/sdapi/v1"
    headers = {"authorization": ""}
    assert s.get(base + "/options", headers=headers).ok
    models = [{"id": m["title"], "name": m["model_name"]} for m in s.get(base + "/sd-models", headers=headers).json()]
    options = s.get(base + "/options", headers=headers).json()
    assert options["sd_model_checkpoint"] == models[0]["id"]
    options["sd_model_checkpoint"] = models[0]["id"]
    assert s.post(base + "/options", json=options, headers=headers).ok  # the whole dict back
    r = s.post(base + "/txt2img", headers=headers,
               json={"prompt": PROMPT, "batch_size": 2, "width": 64, "height": 64, "steps": 2, "cfg_scale": 4,
                     "sampler_name": "Euler a"})
    assert r.status_code == 200, r.text
    images = r.json()["images"]
    assert len(images) == 2 and all("," not in i for i in images)  # raw base64, no data: prefix
    assert json.loads(r.json()["info"])["all_seeds"][1] == json.loads(r.json()["info"])["seed"] + 1


# ---------------------------------------------------------------------------------------------- bad input


def _small_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _huge_png_header() -> str:
    """A 100000 x 100000 PNG header (a decompression bomb) with hardly any data."""
    buffer = io.BytesIO()
    Image.new("L", (16, 16)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = (100000).to_bytes(4, "big") + (100000).to_bytes(4, "big")  # IHDR's width and height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # and its checksum
    return base64.b64encode(bytes(data)).decode()


BAD_INPUTS = [
    ("txt2img", b"{not json", 422, "not valid JSON"),
    ("txt2img", [1, 2], 422, "body"),
    ("txt2img", {"steps": "many"}, 422, "steps"),
    ("txt2img", {"steps": 2.5}, 422, "steps"),
    ("txt2img", {"prompt": 7}, 422, "prompt"),
    ("txt2img", {"width": -64, "height": 64, "steps": 1}, 422, "width"),
    ("txt2img", {"width": 63, "height": 64, "steps": 1}, 422, "multiple of 8"),
    ("txt2img", {"width": 100000, "height": 100000, "steps": 1}, 422, "too large"),
    ("txt2img", {"width": 4096, "height": 4096, "steps": 1}, 422, "this server's limit"),
    ("txt2img", {"steps": 0}, 422, "steps"),
    ("txt2img", {"steps": 5000, "width": 64, "height": 64}, 422, "steps"),
    ("txt2img", {"batch_size": 0, "width": 64, "height": 64}, 422, "batch"),
    ("txt2img", {"n_iter": 1000, "width": 64, "height": 64}, 422, "n_iter"),
    ("txt2img", {"sampler_name": "Nope", "width": 64, "height": 64}, 400, "Euler a"),
    ("txt2img", {"sampler_name": "DPM++ SDE Karras", "width": 64, "height": 64}, 400, "valid samplers"),
    ("txt2img", {"scheduler": "Nope", "width": 64, "height": 64}, 400, "Karras"),
    ("txt2img", {"sampler_name": "DDIM", "scheduler": "karras", "width": 64, "height": 64}, 400, "DDIM"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "other.ckpt"}, "width": 64, "height": 64}, 400,
     "not found"),
    ("img2img", {"prompt": "x", "width": 64, "height": 64}, 404, "Init image not found"),
    ("img2img", {"init_images": ["%%% not base64 %%%"], "width": 64, "height": 64}, 400, "base64"),
    ("img2img", {"init_images": [base64.b64encode(b"just some text, not a picture").decode()]}, 400, "not an image"),
    ("img2img", {"init_images": ["http://127.0.0.1:1/cat.png"]}, 400, "never fetched"),
    ("img2img", {"init_images": [_huge_png_header()], "width": 64, "height": 64}, 400, "limit"),
    ("img2img", {"init_images": [None]}, 422, "init_images"),
    ("img2img", {"init_images": [_small_png()], "mask": "AAAA"}, 400, "mask"),
    ("img2img", {"init_images": [_small_png()], "mask": _small_png(), "inpainting_fill": 7}, 422, "inpainting_fill"),
    ("png-info", {"image": "@@@"}, 400, "base64"),
    ("options", {"sd_model_checkpoint": 12}, 400, "title"),
]


@pytest.mark.parametrize(("route", "body", "status", "word"), BAD_INPUTS,
                         ids=[f"{r}-{i}" for i, (r, *_rest) in enumerate(BAD_INPUTS)])
def test_bad_input_is_a_clear_4xx_in_the_envelope(server, route, body, status, word):
    url = f"{server.url}/sdapi/v1/{route}"
    if isinstance(body, bytes):
        r = requests.post(url, data=body, headers={"Content-Type": "application/json"})
    else:
        r = requests.post(url, json=body)
    expect_envelope(r, status, word)


def test_the_server_keeps_serving_after_bad_input_and_oversized_bodies(server):
    big = {"prompt": "x" * (MAX_BODY + 10)}
    expect_envelope(requests.post(server.url + "/sdapi/v1/txt2img", json=big), 413, "limit")

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b" " * 65536
        yield b"{}"

    expect_envelope(requests.post(server.url + "/sdapi/v1/txt2img", data=chunks(),
                                  headers={"Content-Type": "application/json"}), 413, "limit")
    expect_envelope(requests.get(server.url + "/no/such/route"), 404, "Not Found")
    ok = requests.post(server.url + "/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 1, "width": 64,
                                                                 "height": 64})
    assert ok.status_code == 200 and len(ok.json()["images"]) == 1


def test_a_client_that_disconnects_does_not_take_the_server_down(server):
    import socket

    body = json.dumps({"prompt": PROMPT, "steps": 20, "width": 64, "height": 64}).encode()
    for payload in (  # half a request; a whole one, gone before its answer
        b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 999\r\n\r\n{",
        b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode() + b"\r\n\r\n" + body,
    ):
        with socket.create_connection((server.host, server.port)) as sock:
            sock.sendall(payload)
    time.sleep(0.2)
    assert requests.get(server.url + "/sdapi/v1/options", timeout=10).status_code == 200
    ok = requests.post(server.url + "/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 1, "width": 64,
                                                                 "height": 64}, timeout=120)
    assert ok.status_code == 200


# ---------------------------------------------------------------------------------------------- our job API


def _events(response):
    """Parse a text/event-stream: yields (event, data) pairs."""
    kind, data = None, []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and kind:
            yield kind, json.loads("\n".join(data))
            kind, data = None, []


def test_jobs_api_streams_every_step_and_tracks_jobs_apart(server):
    job = requests.post(server.url + "/api/jobs", json={"prompt": PROMPT, "steps": 8, "seed": 5, "width": 64,
                                                        "height": 64, "full_preview_every": 3}).json()
    steps, kinds, done = [], set(), None
    with requests.get(server.url + job["events"], stream=True, timeout=120) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for kind, event in _events(stream):
            if kind == "step":
                steps.append(event["step"])
                kinds.add(event["preview_kind"])
                frame = Image.open(io.BytesIO(base64.b64decode(event["preview"].split(",", 1)[1])))
                assert frame.size == (64, 64)
            elif kind == "done":
                done = event
                break
    assert done["state"] == "done" and done["seeds"] == [5] and len(done["images"]) == 1
    assert steps == sorted(steps) and len(steps) >= 3 and steps[-1] == 8
    assert kinds == {"cheap", "full"}  # full decodes at steps 3 and 6
    # The same settings through A1111's API give the same picture (cfg and sampler: the model's and ours).
    same = client(server).txt2img(prompt=PROMPT, steps=8, seed=5, width=64, height=64, cfg_scale=4,
                                  sampler_name="Euler a", scheduler="Uniform")
    ours = Image.open(io.BytesIO(base64.b64decode(done["images"][0].split(",", 1)[1])))
    assert np.array_equal(np.asarray(ours.convert("RGB")), np.asarray(same.image))
    status = requests.get(server.url + job["status"]).json()
    assert status["state"] == "done" and status["parameters"][0]["seed"] == 5
    png = requests.get(server.url + status["image_urls"][0])
    assert png.headers["content-type"] == "image/png" and png.content == base64.b64decode(done["images"][0][22:])

    # Two jobs tracked apart: one runs, the other waits, each cancelled by its own id.
    long = requests.post(server.url + "/api/jobs", json={"prompt": "a", "steps": 800, "width": 64, "height": 64})
    queued = requests.post(server.url + "/api/jobs", json={"prompt": "b", "steps": 2, "width": 64, "height": 64})
    long, queued = long.json(), queued.json()
    assert queued["position"] == 0
    assert requests.get(server.url + queued["status"]).json()["state"] == "queued"
    assert requests.delete(server.url + queued["status"]).json()["state"] == "cancelled"
    deadline = time.monotonic() + 60
    while requests.get(server.url + long["status"]).json()["step"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    requests.delete(server.url + long["status"])
    while requests.get(server.url + long["status"]).json()["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    final = requests.get(server.url + long["status"]).json()
    assert final["state"] == "interrupted" and final["images"] == 1 and final["step"] < 800
    expect_envelope(requests.get(server.url + "/api/jobs/nope"), 404, "no job")
    expect_envelope(requests.post(server.url + "/api/jobs", json={"prompt": "x", "sampler": "nope"}), 422, "sampler")


def test_page_is_served_with_no_outside_resources(server):
    page = requests.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for hook in ('id="prompt"', 'id="negative"', 'id="steps"', 'id="seed"', 'id="generate"', 'id="interrupt"',
                 'id="preview"', 'id="progress"'):
        assert hook in page.text
    for name in ("app.js", "style.css"):
        r = requests.get(f"{server.url}/static/{name}")
        assert r.status_code == 200 and "http://" not in r.text and "https://" not in r.text
    assert "http" not in page.text.replace('"http', "")  # no absolute URL in the page
    assert requests.get(server.url + "/static/..%2Fapp.py").status_code == 404
    assert requests.head(server.url + "/").status_code == 200


# ---------------------------------------------------------------------------------------------- load


def test_load_every_request_answered_once_and_memory_flat(server):
    """50 concurrent clients, 200 requests, a queue of 16: each answered 200 (with its own seed) or 503."""
    url = server.url + "/sdapi/v1/txt2img"
    answers: dict[int, tuple[int, int | None]] = {}
    lock = threading.Lock()
    rss = []

    def used() -> int:
        return requests.get(server.url + "/sdapi/v1/memory").json()["ram"]["used"]

    def one(i: int) -> None:
        r = requests.post(url, json={"prompt": "a green square", "seed": 1000 + i, "steps": 1, "width": 64,
                                     "height": 64, "sampler_name": "Euler"}, timeout=300)
        seed = json.loads(r.json()["info"])["seed"] if r.status_code == 200 else None
        if r.status_code == 503:
            assert int(r.headers["Retry-After"]) >= 1 and set(r.json()) == ENVELOPE
        with lock:
            assert i not in answers
            answers[i] = (r.status_code, seed)
            if len(answers) == 50:
                rss.append(used())

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=50) as pool:
        list(pool.map(one, range(200)))
    seconds = time.monotonic() - started
    rss.append(used())
    codes = [code for code, _ in answers.values()]
    assert len(answers) == 200 and set(codes) <= {200, 503}, set(codes)
    ok = {i: seed for i, (code, seed) in answers.items() if code == 200}
    assert all(seed == 1000 + i for i, seed in ok.items())  # each 200 carries its own seed
    assert len(ok) >= 16 and codes.count(503) >= 1  # the queue of 16 filled up, and was worked through
    growth = (rss[-1] - rss[0]) / 2**20
    print(f"\nload: {len(ok)} x 200, {codes.count(503)} x 503 in {seconds:.1f} s; "
          f"RSS {rss[0] / 2**20:.0f} MiB after 50 answers, {rss[-1] / 2**20:.0f} MiB after 200 ({growth:+.1f} MiB)")
    assert growth < 64, rss
    assert requests.get(server.url + "/sdapi/v1/progress").json()["state"]["job_count"] == 0


# ---------------------------------------------------------------------------------------------- the command


def _listening_addresses(port: int) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if int(hex_port, 16) == port and state == "0A":  # LISTEN
                found.add(address)
    return found


def test_sdtorch_serve_binds_loopback_with_auth_and_models(models_dir, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sdtorch.cli", "serve", "--port", str(port), "--models",
                             str(models_dir), "--api-auth", "bob:se:cret", "--queue-size", "2", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                r = requests.get(f"http://127.0.0.1:{port}/sdapi/v1/sd-models", auth=("bob", "se:cret"), timeout=5)
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
                time.sleep(0.2)
        assert r.status_code == 200 and len(r.json()) == 3
        assert requests.get(f"http://127.0.0.1:{port}/sdapi/v1/sd-models").status_code == 401
        if Path("/proc/net/tcp").exists():
            assert _listening_addresses(port) == {"0100007F"}  # 127.0.0.1 only
        flags = requests.get(f"http://127.0.0.1:{port}/sdapi/v1/cmd-flags", auth=("bob", "se:cret")).json()
        assert "se:cret" not in json.dumps(flags) and str(models_dir) not in json.dumps(flags)
    finally:
        proc.terminate()
        proc.wait(30)


def test_serve_mistakes_are_one_line(tmp_path):
    run = run_cli("serve", "--model", tmp_path / "missing.safetensors")
    assert run.returncode == 2 and run.stderr.startswith("sdtorch: error: --model") and "Traceback" not in run.stderr
    run = run_cli("serve", "--api-auth", "nopassword")
    assert run.returncode == 2 and "USER:PASS" in run.stderr
    # Without the server extra, the rest of sdtorch works and serve says what to install.
    code = ("import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None; "
            "from sdtorch import cli; sys.exit(cli.main(['serve']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "pip install 'sdtorch[server]'" in run.stderr, run.stderr


def test_loras_and_embeddings_are_listed_and_used(tmp_path):
    """`<lora:NAME:W>` in an API prompt uses --loras; /loras and /embeddings list what is there."""
    from oracles import kohya_lora
    from safetensors.torch import save_file

    from sdtorch.loading import load_model
    from sdtorch.pipeline import default_model_path

    model = load_model(default_model_path())
    (tmp_path / "loras").mkdir()
    (tmp_path / "embeddings").mkdir()
    save_file(kohya_lora(model.unet, model.text_encoder, conv=False), str(tmp_path / "loras" / "style.safetensors"))
    width = model.config.text.width
    save_file({"emb_params": torch.randn(2, width, generator=torch.Generator().manual_seed(0))},
              str(tmp_path / "embeddings" / "shiny.safetensors"))
    with BackgroundServer(lora_dir=tmp_path / "loras", embeddings_dir=tmp_path / "embeddings") as s:
        api = client(s)
        plain = api.txt2img(prompt="a red circle", seed=3, steps=4, width=64, height=64, sampler_name="Euler a")
        styled = api.txt2img(prompt="a red circle <lora:style:0.8>", seed=3, steps=4, width=64, height=64,
                             sampler_name="Euler a")
        assert np.asarray(plain.image).tolist() != np.asarray(styled.image).tolist()
        assert "Lora hashes: \"style: " in styled.info["infotexts"][0]
        assert [lora["name"] for lora in requests.get(f"{s.url}/sdapi/v1/loras", timeout=10).json()] == ["style"]
        loaded = requests.get(f"{s.url}/sdapi/v1/embeddings", timeout=10).json()["loaded"]
        assert loaded["shiny"]["vectors"] == 2 and loaded["shiny"]["shape"] == width
        missing = requests.post(f"{s.url}/sdapi/v1/txt2img", json={"prompt": "x <lora:nope:1>", "steps": 2},
                                timeout=60)
        expect_envelope(missing, 400, "no LoRA named 'nope'")


def test_inpainting_through_the_api_is_the_cli_image(server, tmp_path):
    """webuiapi's img2img with a mask (A1111's inpainting fields) equals `sdtorch generate --mask`."""
    scene = Scene(shape="circle", colour="red", size="large", position="center", background="blue")
    init = Image.fromarray(render(scene, 64))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    result = client(server).img2img(images=[init], mask_image=mask, prompt="a large green circle on a blue background",
                                    seed=5, steps=8, cfg_scale=4, denoising_strength=0.8, width=64, height=64,
                                    sampler_name="Euler a", mask_blur=2, inpainting_fill=1, inpaint_full_res=False)
    out = tmp_path / "cli.png"
    run = run_cli("generate", "a large green circle on a blue background", "--init-image", tmp_path / "init.png",
                  "--mask", tmp_path / "mask.png", "--mask-blur", 2, "--masked-content", "original",
                  "--inpaint-area", "whole", "--strength", 0.8, "--seed", 5, "--steps", 8, "--cfg", 4,
                  "--sampler", "euler_a", "--out", out, "--quiet")
    assert run.returncode == 0, run.stderr
    assert np.array_equal(np.asarray(result.image), np.asarray(Image.open(out).convert("RGB")))
    outside = np.asarray(mask) == 0
    outside[10:54, 10:54] = False  # beyond the blurred edge
    assert np.array_equal(np.asarray(result.image)[outside], np.asarray(init)[outside])  # untouched outside


@pytest.fixture(scope="module")
def a1111_server():
    with BackgroundServer(compat="a1111") as s:
        yield s


def test_a1111_mode_server_gives_the_cli_a1111_image(a1111_server, tmp_path):
    """`serve --compat a1111`: A1111's samplers, its GPU noise by default, subseeds and ENSD from the request, the
    CLI's --compat a1111 image pixel for pixel (which tests/test_a1111_mode.py checks against A1111's path)."""
    api = client(a1111_server)
    names = {s["name"] for s in api.get_samplers()}
    assert {"DPM2 a", "DPM++ 2S a", "DPM++ 3M SDE", "DDIM", "PLMS", "Euler a"} <= names and "UniPC" not in names
    assert {"Exponential", "SGM Uniform", "Align Your Steps"} <= {s["label"] for s in api.get_schedulers()}
    options = api.get_options()
    assert (options["sdtorch_compat"], options["randn_source"]) == ("a1111", "GPU")

    settings = dict(prompt=PROMPT, negative_prompt="green", seed=42, steps=6, cfg_scale=4, width=64, height=64)
    result = api.txt2img(sampler_name="DPM++ SDE", scheduler="Karras", subseed=7, subseed_strength=0.3,
                         override_settings={"eta_noise_seed_delta": 31337}, **settings)
    out = tmp_path / "cli.png"
    run = run_cli("generate", PROMPT, "--negative", "green", "--seed", 42, "--steps", 6, "--cfg", 4, "--width", 64,
                  "--height", 64, "--sampler", "dpmpp_sde", "--compat", "a1111", "--rng", "gpu", "--ensd", 31337,
                  "--variation-seed", 7, "--variation-strength", 0.3, "--out", out, "--quiet")
    assert run.returncode == 0, run.stderr
    cli = Image.open(out)
    assert np.array_equal(np.asarray(result.image), np.asarray(cli.convert("RGB")))
    assert png_parameters(result.image) == cli.info["parameters"]
    assert (result.info["subseed"], result.info["subseed_strength"]) == (7, 0.3)
    assert result.info["sdtorch"]["ignored"] == []

    # A sampler setting A1111 passes to k-diffusion is applied, not ignored; one the sampler lacks is listed.
    churn = api.txt2img(sampler_name="Euler", s_churn=1.0, **settings)
    assert "Sigma churn: 1.0" in churn.info["infotexts"][0] and churn.info["sdtorch"]["ignored"] == []
    plms = api.txt2img(sampler_name="PLMS", s_churn=1.0, **settings)
    assert plms.info["sdtorch"]["ignored"] == ["s_churn"]

    # The noise source is a server setting, as in A1111; a request's override wins.
    api.set_options({"randn_source": "CPU"})
    try:
        cpu = api.txt2img(sampler_name="Euler a", **settings)
        out_cpu = tmp_path / "cpu.png"
        run = run_cli("generate", PROMPT, "--negative", "green", "--seed", 42, "--steps", 6, "--cfg", 4, "--width",
                      64, "--height", 64, "--sampler", "euler_a", "--compat", "a1111", "--rng", "cpu", "--out",
                      out_cpu, "--quiet")
        assert run.returncode == 0, run.stderr
        assert np.array_equal(np.asarray(cpu.image), np.asarray(Image.open(out_cpu).convert("RGB")))
        gpu = api.txt2img(sampler_name="Euler a", override_settings={"randn_source": "GPU"}, **settings)
        assert not np.array_equal(np.asarray(gpu.image), np.asarray(cpu.image))
    finally:
        api.set_options({"randn_source": "GPU"})


def test_a1111_mode_server_runs_the_page_jobs_in_a1111_mode(a1111_server):
    """The page's own API (/api/jobs) follows the server's mode too: the same picture as /sdapi/v1/txt2img."""
    config = requests.get(a1111_server.url + "/api/config", timeout=30).json()
    assert config["compat"] == "a1111" and "dpm2_a" in {s["name"] for s in config["samplers"]}
    assert "exponential" in config["schedules"]
    job = requests.post(a1111_server.url + "/api/jobs", json={"prompt": PROMPT, "steps": 6, "seed": 5, "width": 64,
                                                              "height": 64, "cfg_scale": 4, "sampler": "dpm2_a"},
                        timeout=30).json()
    with requests.get(a1111_server.url + job["events"], stream=True, timeout=120) as stream:
        done = next(event for kind, event in _events(stream) if kind == "done")
    ours = Image.open(io.BytesIO(base64.b64decode(done["images"][0].split(",", 1)[1])))
    assert "sdtorch mode: a1111" in ours.info["parameters"]
    same = client(a1111_server).txt2img(prompt=PROMPT, steps=6, seed=5, width=64, height=64, cfg_scale=4,
                                        sampler_name="DPM2 a", scheduler="Uniform")  # the jobs API default
    assert np.array_equal(np.asarray(ours.convert("RGB")), np.asarray(same.image))


@pytest.mark.parametrize("route, body, status, word", [
    ("/sdapi/v1/options", {"randn_source": "cuda"}, 422, "GPU, CPU or NV"),
    ("/sdapi/v1/options", {"sdtorch_compat": "comfy"}, 422, "diffusers, a1111"),
    ("/sdapi/v1/txt2img", {"sampler_name": "UniPC"}, 400, "valid samplers"),
    ("/sdapi/v1/txt2img", {"sampler_name": "DDIM", "scheduler": "Karras"}, 400, "own timestep grid"),
    ("/sdapi/v1/txt2img", {"override_settings": {"eta_noise_seed_delta": -1}}, 422, "eta_noise_seed_delta"),
])
def test_a1111_mode_mistakes_are_clear_4xx(a1111_server, route, body, status, word):
    expect_envelope(requests.post(a1111_server.url + route, json=body, timeout=30), status, word)
    assert requests.get(a1111_server.url + "/sdapi/v1/options", timeout=30).status_code == 200
