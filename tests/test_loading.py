"""Loading checkpoints as people have them, compared with diffusers/transformers loading the same files."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from oracles import (
    SD15_YAML,
    make_diffusers_folder,
    max_rel_error,
    random_sd15_state,
    randomise_,
    transformers_clip_config,
)
from safetensors.torch import load_file, save_file

from sdtorch.config import SD15, TINY, CLIPTextConfig, ModelConfig
from sdtorch.errors import CheckpointError
from sdtorch.loading import load_model, save_checkpoint
from sdtorch.model import StableDiffusion

# ---------------------------------------------------------------- the full SD 1.5 layout


def test_sd15_single_file_matches_diffusers_single_file_loader(sd15_file, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    ours = load_model(sd15_file)
    assert ours.config.unet == SD15.unet and ours.config.vae == SD15.vae and ours.config.text == SD15.text
    assert ours.dtype == torch.float32

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    context = torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        ref_unet = UNet2DConditionModel.from_single_file(str(sd15_file), original_config=str(SD15_YAML))
        expected = ref_unet(x, torch.tensor(500.0), encoder_hidden_states=context).sample
        del ref_unet
        assert max_rel_error(ours.unet(x, torch.tensor(500.0), context), expected) <= 1e-4

        ref_vae = AutoencoderKL.from_single_file(str(sd15_file), original_config=str(SD15_YAML))
        assert ref_vae.config.scaling_factor == ours.config.vae.scaling_factor
        latents = torch.randn(1, 4, 8, 8, generator=g)
        images = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
        assert max_rel_error(ours.vae.decode(latents), ref_vae.decode(latents).sample) <= 1e-4
        assert max_rel_error(ours.vae.encode(images).mean, ref_vae.encode(images).latent_dist.mean) <= 1e-4
        del ref_vae

        transformers_clip_config(SD15.text).save_pretrained(tmp_path / "clip")  # offline: no hub config
        ref_clip = create_diffusers_clip_model_from_ldm(
            CLIPTextModel, load_file(str(sd15_file)), config=str(tmp_path / "clip"), local_files_only=True
        )
        ids = torch.randint(0, 49406, (2, 77), generator=g)
        ids[:, 0] = 49406
        expected = ref_clip(input_ids=ids).last_hidden_state
        assert (ours.text_encoder(ids) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sd15_loads_in_half_precision(sd15_file, dtype):
    model = load_model(sd15_file, dtype=dtype)
    stored = load_file(str(sd15_file))
    for net_name, prefix in (("unet", "model.diffusion_model."), ("vae", "first_stage_model.")):
        for name, param in list(getattr(model, net_name).state_dict().items())[:50]:
            assert param.dtype == dtype
            assert torch.equal(param, stored[prefix + name].reshape(param.shape).to(dtype))


def test_sd15_loading_peak_memory_under_one_and_a_half_model_sizes(sd15_file):
    """Loading must not hold two copies of the weights (measured in a fresh process)."""
    script = Path(__file__).resolve().parents[1] / "bench" / "load_memory.py"
    out = subprocess.run([sys.executable, str(script), str(sd15_file)], capture_output=True, text=True, check=True)
    figures = json.loads(out.stdout)
    assert figures["model_bytes"] > 2_000_000_000  # the whole fp16 model: 1.07 billion parameters
    assert figures["ratio"] < 1.5, figures


def test_importing_sdtorch_does_not_import_the_oracles():
    script = (
        "import sys, pkgutil, importlib, sdtorch\n"
        "for m in pkgutil.walk_packages(sdtorch.__path__, 'sdtorch.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in ('diffusers', 'transformers')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- tiny diffusers folders


def assert_same_outputs(model: StableDiffusion, unet, vae, text):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, TINY.unet.context_dim, generator=g)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        assert max_rel_error(model.unet(x, 10.0, context), unet(x, 10.0, encoder_hidden_states=context).sample) <= 1e-4
        assert max_rel_error(model.vae.decode(latents), vae.decode(latents).sample) <= 1e-4
        assert (model.text_encoder(ids) - text(input_ids=ids).last_hidden_state).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "safetensors, legacy", [(True, False), (False, False), (True, True)], ids=["safetensors", "bin", "text_model"]
)
def test_diffusers_folder_matches_reference(tmp_path, safetensors, legacy):
    refs = make_diffusers_folder(tmp_path, safetensors=safetensors, legacy_text_names=legacy)
    model = load_model(tmp_path)
    assert model.config.unet == TINY.unet and model.config.vae == TINY.vae and model.config.text == TINY.text
    assert_same_outputs(model, *refs)


def test_diffusers_folder_missing_weights_is_a_clear_error(tmp_path):
    make_diffusers_folder(tmp_path)
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"vae: no weights found"):
        load_model(tmp_path)


# ---------------------------------------------------------------- tiny single files


@pytest.fixture(scope="module")
def tiny_model() -> StableDiffusion:
    model = StableDiffusion.random(TINY, seed=3)
    for net in model.networks().values():
        randomise_(net, seed=4)
    return model


def same_weights(a: StableDiffusion, b: StableDiffusion) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# SD 1.x conventions that shapes cannot show (8 UNet heads, 64-wide CLIP heads, 32 norm groups),
# so that detection alone, without sdtorch's metadata, must find this exact config.
TINY_SD_CONVENTIONS = ModelConfig(
    text=CLIPTextConfig(width=64, layers=2, heads=1, mlp_width=128),
    unet=dataclasses.replace(TINY.unet, num_heads=8, norm_groups=32, context_dim=64),
    vae=dataclasses.replace(TINY.vae, norm_groups=32),
)


def test_single_file_round_trip_with_metadata(tmp_path, tiny_model):
    save_checkpoint(tiny_model, tmp_path / "tiny.safetensors")
    loaded = load_model(tmp_path / "tiny.safetensors")
    assert loaded.config == TINY
    assert same_weights(loaded, tiny_model)


def test_detection_from_shapes_alone_safetensors_and_ckpt(tmp_path):
    model = StableDiffusion.random(TINY_SD_CONVENTIONS, seed=6)
    save_file(model.state_dict(), str(tmp_path / "plain.safetensors"))  # no metadata
    # A Lightning-style .ckpt, with the schedule buffers and EMA scalars real files carry.
    state = {**model.state_dict(), "betas": torch.ones(1000), "model_ema.decay": torch.tensor(0.9999)}
    torch.save({"state_dict": state, "global_step": 470000}, tmp_path / "plain.ckpt")
    for name in ("plain.safetensors", "plain.ckpt"):
        loaded = load_model(tmp_path / name)
        assert loaded.config == TINY_SD_CONVENTIONS
        assert same_weights(loaded, model)


def test_sd15_layout_ckpt_loads(tmp_path, sd15_manifest):
    """An fp16 .ckpt of the full layout (as most old SD 1.x files are) loads through torch's
    weights-only unpickler, with the same weights a .safetensors of it gives."""
    state = random_sd15_state(sd15_manifest, torch.float16, seed=5)
    torch.save({"state_dict": state, "global_step": 840000}, tmp_path / "sd15.ckpt")
    model = load_model(tmp_path / "sd15.ckpt", dtype=torch.float16)
    for name, param in model.unet.state_dict().items():
        assert torch.equal(param, state["model.diffusion_model." + name])


def test_hostile_pickle_is_refused_and_never_runs(tmp_path, tiny_model):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "hostile.ckpt"
    with open(path, "wb") as f:  # what torch.save would write, with an object that runs a command
        torch.save({"state_dict": {**tiny_model.state_dict(), "x": Exploit()}}, f)
    with pytest.raises(CheckpointError, match=r"hostile\.ckpt: refused.*(system|posix)"):
        load_model(path)
    assert not marker.exists()

    raw = tmp_path / "plain-pickle.ckpt"
    raw.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError):
        load_model(raw)
    assert not marker.exists()


def test_truncated_and_foreign_files_give_clear_errors(tmp_path, tiny_model):
    good = tmp_path / "tiny.safetensors"
    save_checkpoint(tiny_model, good)
    data = good.read_bytes()
    cases = {
        "cut.safetensors": (data[: len(data) // 2], "truncated"),
        "header.safetensors": (data[:5], "not a safetensors file"),
        "image.safetensors": (b"\x89PNG\r\n\x1a\n" + b"\0" * 100, "not a safetensors file"),
        "cut.ckpt": (b"PK\x03\x04" + b"\0" * 64, "not a readable PyTorch checkpoint"),
        "notes.txt": (b"hello", "unknown checkpoint type"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=message) as info:
            load_model(tmp_path / name)
        assert name in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "absent.safetensors")


def test_mismatched_tensors_name_the_first_offenders(tmp_path, tiny_model):
    state = tiny_model.state_dict()
    metadata = {"sdtorch.config": json.dumps(TINY.to_dict())}
    bad = dict(state)
    bad.pop("model.diffusion_model.out.2.bias")
    bad["model.diffusion_model.out.2.weight"] = torch.zeros(3, 32, 3, 3)
    bad["first_stage_model.decoder.extra.weight"] = torch.zeros(2)
    save_file(bad, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "bad.safetensors")
    message = str(info.value)
    assert "bad.safetensors" in message
    assert "1 missing: model.diffusion_model.out.2.bias" in message
    assert "1 unexpected: first_stage_model.decoder.extra.weight" in message
    assert "model.diffusion_model.out.2.weight [3, 32, 3, 3] (expected [4, 32, 3, 3])" in message


@pytest.mark.parametrize(
    "names, family",
    [
        (["conditioner.embedders.0.model.ln_final.weight"], "the SDXL refiner"),  # SDXL base: tests/test_sdxl.py
        (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], "Stable Diffusion 3"),
        (["control_model.input_blocks.0.0.weight"], "ControlNet"),  # SD 2.x is loaded now: tests/test_sd2.py
        (["down_blocks.0.resnets.0.conv1.weight"], "diffusers-format UNet"),
        (["some.other.weight"], "not a Stable Diffusion checkpoint"),
    ],
)
def test_unsupported_architectures_are_named(tmp_path, names, family):
    save_file({n: torch.zeros(2) for n in names}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match=family):
        load_model(tmp_path / "other.safetensors")


def test_bad_file_fails_before_reading_any_weight(tmp_path, tiny_model, monkeypatch):
    """Every name and shape is checked first: a misfit fails fast and leaves no half-loaded model."""
    from sdtorch.loading import build

    state = tiny_model.state_dict()
    state["model.diffusion_model.out.2.weight"] = torch.zeros(3, 32, 3, 3)
    save_file(state, str(tmp_path / "bad.safetensors"), metadata={"sdtorch.config": json.dumps(TINY.to_dict())})
    reads = []
    monkeypatch.setattr(build, "_read_weights", lambda *args: reads.append(args))
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "bad.safetensors")
    assert reads == []
