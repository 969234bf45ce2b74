"""TAESD: our tiny autoencoder against diffusers' AutoencoderTiny on the real published weights, and
encode + decode of real photographs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from oracles import max_rel_error

from sdtorch.errors import CheckpointError
from sdtorch.images import load_image, prepare_init_image
from sdtorch.taesd import TAESD, TAESDDecoder, TAESDEncoder, TAESDPreview

REAL = Path(__file__).parents[2] / "shared" / "data" / "real"
TAESD_DIR = REAL / "taesd"
PHOTOS = REAL / "photos"

pytestmark = pytest.mark.skipif(not (TAESD_DIR / "taesd_decoder.safetensors").is_file(),
                                reason="the real TAESD weights are not available")


@pytest.fixture(scope="module")
def taesd() -> TAESD:
    return TAESD.load(TAESD_DIR)


def photo(name: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    image = load_image(PHOTOS / name)
    if size is not None:  # a centre crop: no resampling blur in the measurement
        left, top = (image.width - size[0]) // 2, (image.height - size[1]) // 2
        image = image.crop((left, top, left + size[0], top + size[1]))
    return prepare_init_image(image)  # (1, 3, H, W) in [-1, 1], sides rounded down to multiples of 8


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1], on the 8-bit values a PNG would hold."""
    a8 = ((a.clamp(-1, 1) + 1) * 127.5).round()
    b8 = ((b.clamp(-1, 1) + 1) * 127.5).round()
    mse = (a8 - b8).pow(2).mean().item()
    return 10 * np.log10(255.0**2 / mse)


def test_real_weights_load_strictly_into_our_architecture(taesd):
    assert isinstance(taesd.encoder, TAESDEncoder) and isinstance(taesd.decoder, TAESDDecoder)
    assert sum(p.numel() for p in taesd.encoder.parameters()) == 1_222_532
    assert sum(p.numel() for p in taesd.decoder.parameters()) == 1_222_531
    # A half given where the other belongs is refused, naming the file and the first offending names.
    with pytest.raises(CheckpointError, match="taesd_decoder.safetensors: not a TAESD encoder: .*missing"):
        TAESD.load(encoder=TAESD_DIR / "taesd_decoder.safetensors")


def test_one_file_finds_its_sibling_and_a_decoder_alone_previews(tmp_path, taesd):
    both = TAESD.load(TAESD_DIR / "taesd_decoder.safetensors")
    assert both.encoder is not None and both.decoder is not None
    shutil.copy(TAESD_DIR / "taesd_decoder.safetensors", tmp_path / "taesd_decoder.safetensors")
    alone = TAESD.load(tmp_path)
    assert alone.encoder is None
    with pytest.raises(Exception, match="no encoder weights"):
        alone.encode(torch.zeros(1, 3, 8, 8))
    z = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    images = TAESDPreview(alone)(z)
    assert len(images) == 2 and images[0].size == (96, 64)
    expected = ((taesd.decode(z[:1]).clamp(-1, 1) * 0.5 + 0.5) * 255).round()
    got = np.asarray(images[0]).astype(int)  # batched convolutions may round a value the other way
    assert np.abs(got - expected[0].permute(1, 2, 0).numpy()).max() <= 1


def test_equal_to_diffusers_autoencoder_tiny_on_the_same_weights(taesd):
    from diffusers import AutoencoderTiny
    from safetensors.torch import load_file

    reference = AutoencoderTiny()  # its defaults are TAESD for SD 1.x
    state = {f"encoder.layers.{k}": v for k, v in load_file(TAESD_DIR / "taesd_encoder.safetensors").items()}
    for k, v in load_file(TAESD_DIR / "taesd_decoder.safetensors").items():
        index, rest = k.split(".", 1)  # diffusers' decoder has no layer for the clamp: one index less
        state[f"decoder.layers.{int(index) - 1}.{rest}"] = v
    reference.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    reference.eval()

    pixels = photo("chelsea.png", (128, 96))
    with torch.no_grad():
        ref_latents = reference.encode(pixels).latents  # AutoencoderTiny speaks [-1, 1], scaling factor 1
        ref_images = reference.decode(ref_latents).sample
    latents = taesd.encode(pixels)
    assert latents.shape == (1, 4, 12, 16)
    assert max_rel_error(latents, ref_latents) <= 1e-4
    assert max_rel_error(taesd.decode(ref_latents), ref_images) <= 1e-4


@pytest.mark.parametrize("name, size", [("astronaut.png", None), ("coffee.png", (256, 256))])
def test_encode_decode_of_real_photographs(taesd, name, size):
    pixels = photo(name, size)
    latents = taesd.encode(pixels)
    assert latents.shape[2:] == (pixels.shape[2] // 8, pixels.shape[3] // 8)
    # The UNet's latent scale: SD latents of photographs have a standard deviation of about 1.
    assert 0.5 < latents.std().item() < 1.6
    decoded = taesd.decode(latents)
    value = psnr(decoded, pixels)
    print(f"TAESD encode+decode PSNR {name}: {value:.2f} dB")
    # The reference reaches about 30 dB on a picture SD made; photographs keep finer detail than TAESD
    # keeps: astronaut (512x512) 25.35 dB, coffee (a 256x256 crop) 25.90 dB.
    assert value > 24.0
    # Against the trivial reconstruction that every tiny random net gets near: the image's mean colour.
    flat = pixels.mean(dim=(2, 3), keepdim=True).expand_as(pixels)
    assert value > psnr(flat, pixels) + 10


def test_generate_save_steps_with_the_taesd_preview(tiny_checkpoint, tmp_path, capsys):
    from PIL import Image

    from sdtorch import cli

    common = ["generate", "a red circle", "--model", str(tiny_checkpoint), "--steps", "2", "--seed", "1",
              "--width", "32", "--height", "32", "--quiet"]
    assert cli.main([*common, "--preview", "taesd", "--out", str(tmp_path / "a.png")]) == 2
    assert "--preview taesd needs --taesd PATH" in capsys.readouterr().err
    assert cli.main([*common, "--preview", "taesd", "--taesd", str(TAESD_DIR), "--save-steps", str(tmp_path / "s"),
                     "--out", str(tmp_path / "b.png")]) == 0
    strip = Image.open(tmp_path / "s" / "strip.png")
    assert strip.size == (2 * 32 + 2, 3 * 32 + 2 * 2)  # latents, prediction and the TAESD preview below them


def test_decoder_taesd_decodes_the_final_latents_and_is_recorded_as_a1111(tiny_checkpoint, taesd, tmp_path, capsys):
    from PIL import Image

    from sdtorch import cli
    from sdtorch.errors import SdtorchError
    from sdtorch.images import to_pil
    from sdtorch.metadata import infotext, parse_parameters, read_png_parameters, request_fields
    from sdtorch.pipeline import Pipeline

    settings = dict(steps=2, seed=4, width=32, height=24, progress=False)
    plain = Pipeline.load(tiny_checkpoint)
    with pytest.raises(SdtorchError, match='decoder "taesd" needs TAESD'):  # before sampling, one line
        plain.generate("a red circle", decoder="taesd", **settings)
    pipe = Pipeline.load(tiny_checkpoint, taesd=TAESD_DIR)
    fast = pipe.generate("a red circle", decoder="taesd", **settings)
    full = pipe.generate("a red circle", **settings)
    assert torch.equal(fast.latents, full.latents)  # the same sampling; only the decode differs
    assert np.array_equal(np.asarray(fast.images[0]), np.asarray(to_pil(taesd.decode(fast.latents))[0]))
    assert not np.array_equal(np.asarray(fast.images[0]), np.asarray(full.images[0]))
    text = infotext(fast.per_image()[0])
    assert "VAE Decoder: TAESD" in text and "VAE Decoder" not in infotext(full.per_image()[0])
    assert request_fields(parse_parameters(text))["decoder"] == "taesd"

    # The command line: --decoder taesd with --taesd; --from-png of its record needs --taesd or --decoder vae.
    common = ["--model", str(tiny_checkpoint), "--steps", "2", "--seed", "4", "--width", "32", "--height", "24",
              "--quiet"]
    out = tmp_path / "fast.png"
    assert cli.main(["generate", "a red circle", *common, "--decoder", "taesd", "--out", str(out)]) == 2
    assert "--decoder taesd needs --taesd PATH" in capsys.readouterr().err and not out.exists()
    assert cli.main(["generate", "a red circle", *common, "--decoder", "taesd", "--taesd", str(TAESD_DIR),
                     "--out", str(out)]) == 0
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(fast.images[0]))
    assert read_png_parameters(out).extra["VAE Decoder"] == "TAESD"
    assert cli.main(["generate", "--from-png", str(out), *common, "--out", str(tmp_path / "again.png")]) == 2
    assert "was decoded by TAESD" in capsys.readouterr().err
    assert cli.main(["generate", "--from-png", str(out), *common, "--decoder", "vae",
                     "--out", str(tmp_path / "full.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "full.png").convert("RGB")), np.asarray(full.images[0]))


def test_server_previews_through_taesd_and_decodes_with_it_when_asked(tiny_checkpoint):
    import base64
    import io
    import json

    import requests
    from PIL import Image

    from sdtorch.server.background import BackgroundServer

    body = {"prompt": "a red circle", "steps": 3, "seed": 2, "width": 32, "height": 32}
    with BackgroundServer(model=tiny_checkpoint, taesd=TAESD_DIR) as server:
        assert requests.get(server.url + "/sdapi/v1/options").json()["show_progress_type"] == "TAESD"
        job = requests.post(server.url + "/api/jobs", json=body).json()
        kinds = set()
        with requests.get(server.url + job["events"], stream=True, timeout=120) as stream:
            for line in stream.iter_lines(decode_unicode=True):
                if line.startswith("data: ") and '"preview_kind"' in line:
                    kinds.add(json.loads(line[6:])["preview_kind"])
                if line.startswith("event: done"):
                    break
        assert kinds == {"taesd"}
        fast = requests.post(server.url + "/sdapi/v1/txt2img",
                             json=body | {"override_settings": {"sd_vae_decode_method": "TAESD"}}).json()
        info = json.loads(fast["info"])
        assert "VAE Decoder: TAESD" in info["infotexts"][0] and info["sdtorch"]["ignored"] == []
        full = requests.post(server.url + "/sdapi/v1/txt2img", json=body).json()
        images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(r["images"][0])))) for r in (fast, full)]
        assert not np.array_equal(*images)
    with BackgroundServer(model=tiny_checkpoint) as server:  # no --taesd: said in one line, a 400
        r = requests.post(server.url + "/sdapi/v1/txt2img",
                          json=body | {"override_settings": {"sd_vae_decode_method": "TAESD"}})
        assert r.status_code == 400 and "taesd" in r.json()["detail"].lower()
