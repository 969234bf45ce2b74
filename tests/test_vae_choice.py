"""--vae: a standalone VAE in place of the model's own (A1111 single files, diffusers folders), checked name
for name, and recorded as A1111 records it."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch
from oracles import diffusers_vae_kwargs, max_rel_error, randomise_
from safetensors.torch import save_file

from sdtorch import cli
from sdtorch.config import TINY
from sdtorch.errors import CheckpointError
from sdtorch.loading.vae_file import load_vae, use_vae
from sdtorch.metadata import infotext, read_png_parameters
from sdtorch.model import StableDiffusion
from sdtorch.pipeline import Pipeline
from sdtorch.vae import AutoencoderKL


@pytest.fixture()
def model() -> StableDiffusion:
    model = StableDiffusion.random(TINY)
    for net in model.networks().values():
        randomise_(net, seed=21)
    return model


@pytest.fixture(scope="module")
def other_vae() -> AutoencoderKL:
    return randomise_(AutoencoderKL(TINY.vae), seed=77).eval()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a1111_vae_files_with_or_without_the_checkpoint_prefix(model, other_vae, tmp_path):
    plain = tmp_path / "vae-plain.safetensors"
    save_file({k: v.contiguous() for k, v in other_vae.state_dict().items()}, str(plain))
    # As an unpruned A1111 .ckpt: nested under state_dict, with the training loss beside the weights.
    nested = tmp_path / "vae-full.ckpt"
    state = {f"first_stage_model.{k}": v for k, v in other_vae.state_dict().items()}
    state["first_stage_model.loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": state}, nested)
    original = {k: v.clone() for k, v in model.vae.state_dict().items()}
    for path in (plain, nested):
        vae = load_vae(path, model)
        assert same_weights(vae, other_vae)
        assert all(torch.equal(v, original[k]) for k, v in model.vae.state_dict().items())  # not in place
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    before = model.decode_latents(z)
    use_vae(model, plain)
    assert same_weights(model.vae, other_vae)
    after = model.decode_latents(z)
    assert torch.equal(after, other_vae.decode(z / TINY.vae.scaling_factor).float())
    assert (after - before).abs().mean() > 1e-3


def test_a_diffusers_vae_folder_decodes_as_diffusers_does(model, tmp_path):
    from diffusers import AutoencoderKL as DiffusersVAE

    theirs = randomise_(DiffusersVAE(**diffusers_vae_kwargs(TINY.vae)), seed=31).eval()
    theirs.save_pretrained(tmp_path / "vae")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs.decode(z / TINY.vae.scaling_factor).sample
    for path in (tmp_path / "vae", tmp_path, tmp_path / "vae" / "diffusion_pytorch_model.safetensors"):
        use_vae(model, path)
        assert max_rel_error(model.decode_latents(z), expected) < 1e-4, path


def test_a_vae_that_does_not_fit_is_one_error_naming_the_file(model, tmp_path):
    wide = AutoencoderKL(dataclasses.replace(TINY.vae, base_channels=16, norm_groups=4))
    path = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match=r"wide.safetensors: .*wrongly shaped: encoder.conv_in.weight \[16,"):
        load_vae(path, model)
    partial = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in wide.state_dict().items() if k.startswith("decoder.")}, str(partial))
    with pytest.raises(CheckpointError, match=r"partial.safetensors: .*missing: first_stage_model.encoder"):
        load_vae(partial, model)
    unet_file = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.out.0.weight": torch.zeros(3)}, str(unet_file))
    with pytest.raises(CheckpointError, match="unexpected: model.diffusion_model.out.0.weight"):
        load_vae(unet_file, model)


def test_the_chosen_vae_is_recorded_as_a1111_records_it(tiny_checkpoint, other_vae, tmp_path):
    path = tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors"
    save_file({k: v.contiguous() for k, v in other_vae.state_dict().items()}, str(path))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    plain = Pipeline.load(tiny_checkpoint)
    chosen = Pipeline.load(tiny_checkpoint, vae=path)
    settings = dict(prompt="a circle", steps=2, seed=5, width=16, height=16, progress=False)
    a, b = plain.generate(**settings), chosen.generate(**settings)
    assert torch.equal(a.latents, b.latents)  # the same sampling; only the decode differs
    assert a.images[0].tobytes() != b.images[0].tobytes()
    text = infotext(b.per_image()[0], model_name=chosen.model_name, model_hash=chosen.model_hash)
    assert f", VAE hash: {sha}, VAE: vae-ft-mse-840000-ema-pruned.safetensors" in text
    assert "VAE" not in infotext(a.per_image()[0])
    # A record's VAE that is not used is not claimed again.
    stale = plain.generate(**settings, options={"VAE hash": sha, "VAE": path.name})
    assert "VAE" not in infotext(stale.per_image()[0])

    out = tmp_path / "out.png"
    assert cli.main(["generate", "a circle", "--model", str(tiny_checkpoint), "--vae", str(path), "--steps", "2",
                     "--seed", "5", "--width", "16", "--height", "16", "--quiet", "--out", str(out)]) == 0
    assert read_png_parameters(out).extra["VAE hash"] == sha
