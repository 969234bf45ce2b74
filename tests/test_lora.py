"""LoRA: parity with diffusers' `load_lora_weights` (kohya and PEFT files), bit-exact restore,
A1111's alpha scaling, name forms, and files that do not fit."""

from __future__ import annotations

import hashlib
import json
import pathlib
import struct

import pytest
import torch
import torch.nn.functional as F
from oracles import kohya_lora, make_diffusers_folder, max_rel_error, reference_tokenizer
from safetensors.torch import save_file

from sdtorch.adapters.lora import a1111_lora_hash, apply_loras, load_lora, parse_lora_state
from sdtorch.errors import SdtorchError
from sdtorch.loading import load_model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD folder, diffusers' pipeline over it with a kohya LoRA loaded, and its outputs."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    root = tmp_path_factory.mktemp("lora")
    unet, vae, text = make_diffusers_folder(root / "model")
    lora_file = root / "style.safetensors"
    state = kohya_lora(unet, text)
    save_file(state, str(lora_file), metadata={"ss_output_name": "styleX"})
    tokenizer = reference_tokenizer(root / "model" / "tokenizer")
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        x=torch.randn(2, 4, 16, 16, generator=g),
        t=torch.tensor([500.0, 20.0]),
        context=torch.randn(2, 77, 32, generator=g),
        ids=torch.tensor(tokenizer(["a photo of a cat", "(red:1.2) house"], padding="max_length").input_ids),
    )

    def run(u, te):
        with torch.no_grad():
            return u(inputs["x"], inputs["t"], inputs["context"]).sample, te(inputs["ids"]).last_hidden_state

    base = run(unet, text)
    other = kohya_lora(unet, text, seed=5, conv=False)  # a second LoRA, for stacking
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.load_lora_weights(str(lora_file))
    return dict(
        root=root, pipe=pipe, file=lora_file, state=state, other=other, inputs=inputs, base=base, ref=run(unet, text)
    )


@pytest.fixture(scope="module")
def model(world):
    """Our model from the same folder, loaded once: every test takes its LoRAs off again."""
    return load_model(world["root"] / "model")


def ours_run(model, inputs):
    with torch.no_grad():
        return model.unet(inputs["x"], inputs["t"], inputs["context"]), model.text_encoder(inputs["ids"])


def test_kohya_lora_matches_diffusers(world, model):
    base = ours_run(model, world["inputs"])
    assert max_rel_error(base[0], world["base"][0]) < 1e-5 and max_rel_error(base[1], world["base"][1]) < 1e-5
    lora = load_lora(world["file"])
    assert lora.alias == "styleX" and lora.name == "style"
    assert len(lora.layers) == len(world["state"]) // 3
    with apply_loras(model, [(lora, 1.0)]) as handle:
        assert handle.warnings == []
        unet_out, text_out = ours_run(model, world["inputs"])
    ref_unet, ref_text = world["ref"]
    assert max_rel_error(ref_unet, world["base"][0]) > 0.05  # the LoRA changes things a lot...
    assert max_rel_error(ref_text, world["base"][1]) > 0.05
    assert max_rel_error(unet_out, ref_unet) < 1e-4  # ...and we change them as diffusers does
    assert max_rel_error(text_out, ref_text) < 1e-4
    assert all(torch.equal(a, b) for a, b in zip(ours_run(model, world["inputs"]), base))


def test_peft_file_matches_diffusers(world, model, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    pipe = world["pipe"]
    (adapter,) = pipe.unet.peft_config
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name=adapter),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, adapter_name=adapter),
        unet_lora_adapter_metadata=pipe.unet.peft_config[adapter].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config[adapter].to_dict(),
    )
    (path,) = tmp_path.glob("*.safetensors")
    lora = load_lora(path)
    assert any(layer.key.startswith("unet.") for layer in lora.layers)
    assert any(layer.key.startswith("text_encoder.") for layer in lora.layers)
    with apply_loras(model, [(lora, 1.0)]):
        unet_out, text_out = ours_run(model, world["inputs"])
    assert max_rel_error(unet_out, world["ref"][0]) < 1e-4
    assert max_rel_error(text_out, world["ref"][1]) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_restore_is_bit_exact(world, dtype):
    model = load_model(world["root"] / "model", dtype=dtype)
    nets = (model.unet, model.text_encoder)
    before = {n: (p.detach().clone(), p.data_ptr()) for net in nets for n, p in net.state_dict().items()}
    lora = load_lora(world["file"])
    other = load_lora(_write(world["root"] / "other.safetensors", world["other"]))
    handle = apply_loras(model, [(lora, 0.8), (other, -0.55, 1.3)])
    after = {**model.unet.state_dict(), **model.text_encoder.state_dict()}
    assert sum(not torch.equal(before[n][0], t) for n, t in after.items()) >= len(lora.layers)
    handle.restore()
    handle.restore()  # a second restore does nothing
    for net in (model.unet, model.text_encoder):
        for name, tensor in net.state_dict().items():
            assert torch.equal(tensor, before[name][0]) and tensor.dtype == dtype, name
            assert tensor.data_ptr() == before[name][1], name  # the same storage: no module was replaced


def _write(path: pathlib.Path, state: dict, metadata=None) -> pathlib.Path:
    save_file(state, str(path), metadata=metadata)
    return path


def test_a1111_alpha_and_multipliers(world, model, tmp_path):
    """A kohya file as A1111 users have them: rank 8, alpha 1 stored as an fp16 scalar (scale 1/8)."""
    q = model.unet.input_blocks[1][1].transformer_blocks[0].attn2.to_q
    conv = model.unet.input_blocks[1][0].in_layers[2]  # a 3x3 conv: diffusers' down_blocks.0.resnets.0.conv1
    fc1 = model.text_encoder.encoder.layers[1].mlp.fc1
    g = torch.Generator().manual_seed(3)
    r = 8
    key, res, te = (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q",
        "lora_unet_down_blocks_0_resnets_0_conv1",
        "lora_te_text_model_encoder_layers_1_mlp_fc1",
    )
    state = {
        f"{key}.lora_down.weight": torch.randn(r, 32, generator=g),
        f"{key}.lora_up.weight": torch.randn(32, r, generator=g),
        f"{key}.alpha": torch.tensor(1.0, dtype=torch.float16),
        f"{res}.lora_down.weight": torch.randn(r, 32, 3, 3, generator=g),
        f"{res}.lora_up.weight": torch.randn(32, r, 1, 1, generator=g),
        f"{res}.alpha": torch.tensor(1.0, dtype=torch.float16),
        f"{te}.lora_down.weight": torch.randn(r, 32, generator=g),
        f"{te}.lora_up.weight": torch.randn(64, r, generator=g),  # no alpha: scale 1
    }
    lora = load_lora(_write(tmp_path / "a1111.safetensors", state))
    w_q, w_conv, w_fc1 = q.weight.detach().clone(), conv.weight.detach().clone(), fc1.weight.detach().clone()
    with apply_loras(model, [(lora, 0.6, 1.5)]):  # <lora:a1111:0.6:1.5>: text encoder 0.6, UNet 1.5
        expected = 1.5 / r * state[f"{key}.lora_up.weight"] @ state[f"{key}.lora_down.weight"]
        assert torch.allclose(q.weight - w_q, expected, atol=1e-6)
        # the conv update acts as the LoRA's two convolutions would, one after the other
        x = torch.randn(1, 32, 8, 8, generator=g)
        down, up = state[f"{res}.lora_down.weight"], state[f"{res}.lora_up.weight"]
        two_convs = 1.5 / r * F.conv2d(F.conv2d(x, down, padding=1), up)
        assert torch.allclose(F.conv2d(x, conv.weight - w_conv, padding=1), two_convs, atol=1e-4)
        expected = 0.6 * state[f"{te}.lora_up.weight"] @ state[f"{te}.lora_down.weight"]
        assert torch.allclose(fc1.weight - w_fc1, expected, atol=1e-6)
    assert torch.equal(q.weight, w_q) and torch.equal(conv.weight, w_conv) and torch.equal(fc1.weight, w_fc1)


def test_unet_or_text_encoder_only(world, model):
    base = ours_run(model, world["inputs"])
    lora = load_lora(world["file"])
    with apply_loras(model, [(lora, 0.0, 1.0)]):
        unet_out, text_out = ours_run(model, world["inputs"])
        assert torch.equal(text_out, base[1]) and not torch.equal(unet_out, base[0])
    with apply_loras(model, [(lora, 1.0, 0.0)]):
        unet_out, text_out = ours_run(model, world["inputs"])
        assert torch.equal(unet_out, base[0]) and not torch.equal(text_out, base[1])


def test_compvis_names_and_locon_mid(world, model, tmp_path):
    """The same layers named the CompVis way (as LoRAs trained on sgm UNets are) and a LoCon Tucker core."""
    g = torch.Generator().manual_seed(4)
    down, up = torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    by_diffusers = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
    by_compvis = {k.replace("down_blocks_0_attentions_0", "input_blocks_1_1"): v for k, v in by_diffusers.items()}
    mid_down = torch.randn(2, 32, 1, 1, generator=g)
    mid = torch.randn(2, 2, 3, 3, generator=g)
    mid_up = torch.randn(32, 2, 1, 1, generator=g)
    op_key = "lora_unet_input_blocks_2_0_op"
    by_compvis |= {
        f"{op_key}.lora_down.weight": mid_down,
        f"{op_key}.lora_mid.weight": mid,
        f"{op_key}.lora_up.weight": mid_up,
    }
    k = model.unet.input_blocks[1][1].transformer_blocks[0].attn1.to_k
    op = model.unet.input_blocks[2][0].op  # stride-2 3x3 conv
    deltas = []
    for state in (by_diffusers, by_compvis):
        w_k, w_op = k.weight.detach().clone(), op.weight.detach().clone()
        with apply_loras(model, [(load_lora(_write(tmp_path / "l.safetensors", state)), 1.0)]):
            deltas.append(k.weight - w_k)
            if state is by_compvis:
                x = torch.randn(1, 32, 8, 8, generator=g)
                three = F.conv2d(F.conv2d(F.conv2d(x, mid_down), mid, stride=2, padding=1), mid_up)
                assert torch.allclose(F.conv2d(x, op.weight - w_op, stride=2, padding=1), three, atol=1e-4)
    assert torch.equal(deltas[0], deltas[1]) and deltas[0].abs().max() > 0.1


def test_hash_as_a1111(tmp_path):
    pair = {"lora_unet_a.lora_down.weight": torch.ones(2, 2), "lora_unet_a.lora_up.weight": torch.ones(2, 2)}
    path = _write(tmp_path / "x.safetensors", pair, {"ss_output_name": "x"})
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert a1111_lora_hash(path) == hashlib.sha256(data[8 + n :]).hexdigest()[:12]  # kohya's "addnet" hash
    assert load_lora(path).shorthash == a1111_lora_hash(path)
    assert a1111_lora_hash(path, {"sshs_model_hash": "abcdef0123456789"}) == "abcdef012345"
    torch.save({"lora_unet_a.lora_down.weight": torch.ones(2, 2)}, tmp_path / "x.pt")
    assert a1111_lora_hash(tmp_path / "x.pt") == hashlib.sha256((tmp_path / "x.pt").read_bytes()).hexdigest()[:12]


# --- files that do not fit --------------------------------------------------------------


def lora_error(tmp_path, state, match, model=None, metadata=None):
    path = _write(tmp_path / "bad.safetensors", state, metadata)
    with pytest.raises(SdtorchError, match=match) as err:
        lora = load_lora(path)
        if model is not None:
            apply_loras(model, [(lora, 1.0)])
    assert "\n" not in str(err.value)
    return str(err.value)


def test_keys_that_target_nothing(world, model, tmp_path):
    nowhere = "lora_unet_nowhere_block_0_attn"
    pair = {f"{nowhere}.lora_down.weight": torch.ones(2, 4), f"{nowhere}.lora_up.weight": torch.ones(4, 2)}
    message = lora_error(tmp_path, pair, "none of its 1 layers targets this model", model)
    assert "lora_unet_nowhere_block_0_attn" in message
    good = {k: v for k, v in world["state"].items() if "attn1_to_q" in k}
    lora = load_lora(_write(tmp_path / "partial.safetensors", {**good, **pair}))
    with apply_loras(model, [(lora, 1.0)]) as handle:
        (warning,) = handle.warnings
        assert "1 of its layers match nothing" in warning and "lora_unet_nowhere_block_0_attn" in warning


def test_other_adapter_kinds_are_named(tmp_path):
    loha = {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.ones(2, 2)}
    assert "LoHa" in lora_error(tmp_path, loha, "LoHa")
    lokr = {"lora_unet_x.lokr_w1": torch.ones(2, 2)}
    lora_error(tmp_path, lokr, "LoKr")
    dora = {
        "lora_unet_x.lora_down.weight": torch.ones(2, 2),
        "lora_unet_x.lora_up.weight": torch.ones(2, 2),
        "lora_unet_x.dora_scale": torch.ones(1, 2),
    }
    lora_error(tmp_path, dora, "DoRA")
    checkpoint = {"model.diffusion_model.input_blocks.0.0.weight": torch.ones(2, 2)}
    lora_error(tmp_path, checkpoint, "no known LoRA layout")
    lora_error(tmp_path, {"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, "no up weight")


def test_wrong_architecture(world, model, tmp_path):
    te1 = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    sdxl = {f"{te1}.lora_down.weight": torch.ones(2, 32), f"{te1}.lora_up.weight": torch.ones(32, 2)}
    lora_error(tmp_path, sdxl, "SDXL LoRA", model)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    wide = {f"{q}.lora_down.weight": torch.ones(2, 320), f"{q}.lora_up.weight": torch.ones(320, 2)}
    assert "(320, 320)" in lora_error(tmp_path, wide, "another model", model)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_hostile_and_corrupt_files(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"lora_unet_x.lora_down.weight": RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(SdtorchError, match="refused") as err:
        load_lora(tmp_path / "evil.pt")
    assert "evil.pt" in str(err.value) and "accepted" in str(err.value) and not marker.exists()
    (tmp_path / "cut.safetensors").write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(SdtorchError, match="cut.safetensors"):
        load_lora(tmp_path / "cut.safetensors")
    bad_meta = {"lora_adapter_metadata": "{not json"}
    state = {"unet.a.lora_A.weight": torch.ones(2, 2), "unet.a.lora_B.weight": torch.ones(2, 2)}
    lora_error(tmp_path, state, "not JSON", metadata=bad_meta)


def test_peft_alpha_from_metadata():
    state = {
        "unet.a.b.lora_A.weight": torch.ones(4, 3),
        "unet.a.b.lora_B.weight": torch.ones(5, 4),
        "unet.c.lora_A.weight": torch.ones(4, 3),
        "unet.c.lora_B.weight": torch.ones(5, 4),
    }
    meta = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 8, "unet.alpha_pattern": {"a.b": 2}})}
    layers, _ = parse_lora_state(state, metadata=meta)
    assert {layer.key: layer.scale for layer in layers} == {"unet.a.b": 0.5, "unet.c": 2.0}
    rs = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 8, "unet.use_rslora": True})}
    layers, _ = parse_lora_state(state, metadata=rs)
    assert [layer.scale for layer in layers] == [pytest.approx(8 / 2)] * 2  # alpha / sqrt(rank)
    layers, _ = parse_lora_state(state)
    assert [layer.scale for layer in layers] == [1.0, 1.0]  # no alpha anywhere: PEFT's default is alpha = rank
