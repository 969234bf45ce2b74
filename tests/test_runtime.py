"""Runtime options: the default dtype per CPU, weights kept as stored (bit-identical to a wide load,
with LoRA, `.to()` and a swapped VAE), the int8 low-memory mode, the VAE decoder's layout,
compilation, and the load path."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from oracles import kohya_lora, make_diffusers_folder, randomise_
from safetensors.torch import save_file

from sdtorch import runtime, stored_weights
from sdtorch.adapters.lora import apply_loras, load_lora
from sdtorch.config import TINY
from sdtorch.errors import SdtorchError
from sdtorch.loading import load_model, save_checkpoint
from sdtorch.loading.reader import open_tensors
from sdtorch.model import StableDiffusion
from sdtorch.runtime import Runtime, default_dtype


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory):
    """A tiny random SD 1.x file stored in fp16, and a kohya LoRA for it."""
    root = tmp_path_factory.mktemp("stored")
    unet, _, text = make_diffusers_folder(root / "folder")
    model = load_model(root / "folder", dtype=torch.float16)
    save_checkpoint(model, root / "tiny16.safetensors")
    save_file(kohya_lora(unet, text), str(root / "lora.safetensors"))
    return root / "tiny16.safetensors", root / "lora.safetensors"


def _inputs(cfg, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        ids=torch.randint(0, cfg.text.vocab_size, (2, 77), generator=g),
        x=torch.randn(2, cfg.unet.in_channels, size, size, generator=g),
        t=torch.tensor([500.0, 20.0]),
        z=torch.randn(1, cfg.vae.latent_channels, size, size, generator=g),
    )


@torch.no_grad()
def _outputs(model, inputs):
    context = model.text_encoder(inputs["ids"])
    return context, model.unet(inputs["x"].to(model.dtype), inputs["t"], context), model.vae.decode(
        inputs["z"].to(model.dtype))


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for net in model.networks().values() for p in net.parameters())


# 1. The default dtype for the CPU it runs on.

def test_default_dtype_follows_the_cpu(monkeypatch):
    monkeypatch.delenv("SDTORCH_CPU_DTYPE", raising=False)  # conftest pins fp32 for the other tests
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert default_dtype(torch.device("cpu")) == "bf16"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert default_dtype(torch.device("cpu")) == "fp32"
    assert default_dtype(torch.device("cuda")) == "fp16"
    assert Runtime.choose("cpu").dtype == "fp32"
    assert Runtime.choose("cpu", "fp16").dtype == "fp16"  # --dtype overrides


def test_the_cpu_dtype_can_be_pinned(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setenv("SDTORCH_CPU_DTYPE", "fp32")
    assert Runtime.choose("cpu").dtype == "fp32"
    assert Runtime.choose("cpu", "bf16").dtype == "bf16"  # --dtype still overrides
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setenv("SDTORCH_CPU_DTYPE", "bf16")
    assert default_dtype(torch.device("cpu")) == "bf16"
    assert default_dtype(torch.device("cuda")) == "fp16"  # a GPU's default is not the CPU's
    monkeypatch.setenv("SDTORCH_CPU_DTYPE", "float64")
    with pytest.raises(SdtorchError, match="SDTORCH_CPU_DTYPE='float64' is not a CPU dtype: use fp32 or bf16"):
        default_dtype(torch.device("cpu"))


def test_emulated_bf16_warns_once_in_one_line(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert Runtime.choose("cpu", "bf16").dtype == "bf16"
    assert len(caught) == 1 and "\n" not in str(caught[0].message) and "slower" in str(caught[0].message)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Runtime.choose("cpu", "bf16")


def test_native_bf16_probe_agrees_with_torch():
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        assert runtime.cpu_has_native_bf16()


# 2. Weights kept as stored, computed in fp32.

def test_stored_weights_are_bit_identical_to_a_wide_load(tiny16):
    path, _ = tiny16
    wide, kept = load_model(path), load_model(path, weights="stored")
    assert kept.dtype == wide.dtype == torch.float32
    assert isinstance(kept.unet.time_embed[0], stored_weights.StoredLinear)
    assert kept.unet.time_embed[0].weight.dtype == torch.float16
    assert kept.text_encoder.embeddings.token_embedding.weight.dtype == torch.float16
    assert all(p.dtype == torch.float32 for n, p in kept.unet.named_parameters() if "norm" in n)
    assert _weight_bytes(kept) < 0.6 * _weight_bytes(wide)
    inputs = _inputs(TINY)
    for a, b in zip(_outputs(wide, inputs), _outputs(kept, inputs), strict=True):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    # the state dict keeps its names (hashing, saving, LoRA targets see the same model)
    assert list(kept.state_dict()) == list(wide.state_dict())


def test_stored_weights_only_where_exact(tiny16):
    path, _ = tiny16
    half = load_model(path, dtype=torch.float16, weights="stored")  # nothing to widen: plain fp16
    assert not stored_weights.keeps_stored(half.unet) and half.dtype == torch.float16
    bf16 = load_model(path, dtype=torch.bfloat16, weights="stored")  # fp16 -> bf16 is not exact: converted
    assert all(p.dtype == torch.bfloat16 for p in bf16.unet.parameters())


def test_stored_weights_follow_to(tiny16):
    path, _ = tiny16
    wide, kept = load_model(path), load_model(path, weights="stored")
    inputs = _inputs(TINY)
    expected = _outputs(wide, inputs)
    kept.to(device="cpu")  # a move keeps them stored
    assert stored_weights.keeps_stored(kept.unet)
    kept.to(dtype=torch.float16)  # a conversion converts everything, as for any model
    assert kept.dtype == torch.float16 and all(p.dtype == torch.float16 for p in kept.unet.parameters())
    kept.to(dtype=torch.float32)
    assert not stored_weights.keeps_stored(kept.unet)
    for a, b in zip(expected, _outputs(kept, inputs), strict=True):
        assert torch.equal(a, b)


def test_lora_on_stored_weights_matches_a_wide_load_and_restores(tiny16):
    path, lora_path = tiny16
    wide, kept = load_model(path), load_model(path, weights="stored")
    lora = load_lora(lora_path)
    inputs = _inputs(TINY)
    before = {n: (p.clone(), p.data_ptr(), p.dtype) for n, p in kept.unet.state_dict().items()}
    base = _outputs(kept, inputs)
    with apply_loras(wide, [(lora, 0.8)]), apply_loras(kept, [(lora, 0.8)]):
        merged_wide, merged_kept = _outputs(wide, inputs), _outputs(kept, inputs)
        assert not torch.equal(merged_kept[1], base[1])
    for a, b in zip(merged_wide, merged_kept, strict=True):
        assert torch.equal(a, b)
    for name, tensor in kept.unet.state_dict().items():  # restored bit-exactly, in place, still 16-bit
        value, pointer, dtype = before[name]
        assert torch.equal(tensor, value) and tensor.data_ptr() == pointer and tensor.dtype == dtype, name
    for a, b in zip(base, _outputs(kept, inputs), strict=True):
        assert torch.equal(a, b)


def test_a_swapped_vae_is_held_as_the_model_holds_its_own(tiny16, tmp_path):
    from sdtorch.loading.vae_file import use_vae

    path, _ = tiny16
    kept = load_model(path, weights="stored")
    vae_file = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in load_model(path, dtype=torch.float16).vae.state_dict().items()},
              str(vae_file))
    use_vae(kept, vae_file)
    assert stored_weights.keeps_stored(kept.vae) and stored_weights.compute_dtype(kept.vae) == torch.float32


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_sd15_unet_stored_is_bit_identical_and_half_the_memory(sd15_file):
    """SD 1.5's own layer shapes (and so its kernels) at a small latent size: kept as stored, then
    the same model widened in place (exact), give the same numbers."""
    model = load_model(sd15_file, weights="stored")
    unet_bytes = sum(p.numel() * p.element_size() for p in model.unet.parameters())
    assert unet_bytes < 0.51 * 4 * sum(p.numel() for p in model.unet.parameters())
    g = torch.Generator().manual_seed(0)
    x, t, context = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)
    with torch.no_grad():
        kept = model.unet(x, t, context)
        model.unet.to(dtype=torch.float32)
        assert model.unet.time_embed[0].weight.dtype == torch.float32
        wide = model.unet(x, t, context)
    assert torch.equal(kept, wide)


def test_stored_load_peak_memory_in_a_fresh_process(sd15_file):
    """Kept as stored, an fp16 SD 1.5 file's weights are mapped from it, resident only once used: loading
    for fp32 compute takes a fraction of the fp32 footprint. int8 weights are made at load, so resident:
    0.86 GB of UNet instead of 3.44 in fp32, the other networks mapped."""
    child = (
        "import json, sys; from sdtorch.loading import load_model; "
        "m = load_model(sys.argv[1], weights=sys.argv[2]); "
        "peak = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024; "
        "print(json.dumps(peak))"
    )
    peaks = {}
    for weights in ("stored", "compute", "int8"):
        out = subprocess.run([sys.executable, "-c", child, str(sd15_file), weights], capture_output=True, text=True,
                             check=True)
        peaks[weights] = json.loads(out.stdout)
    assert peaks["stored"] < 0.2 * peaks["compute"], peaks
    assert peaks["int8"] < 0.3 * peaks["compute"], peaks  # its conversions' temporaries handed back too


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_mapped_weights_become_resident_when_used_and_go_when_released(sd15_file):
    """The text encoder's mapped weights count once it runs, and no longer once it is released."""
    child = (
        "import json, sys, torch; from sdtorch.loading import load_model\n"
        "rss = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) * 1024\n"
        "m = load_model(sys.argv[1], weights='stored'); loaded = rss()\n"
        "with torch.no_grad(): m.text_encoder(torch.zeros(1, 77, dtype=torch.long))\n"
        "used = rss(); m.text_encoder.to('meta'); print(json.dumps([loaded, used, rss()]))"
    )
    out = subprocess.run([sys.executable, "-c", child, str(sd15_file)], capture_output=True, text=True, check=True)
    loaded, used, released = json.loads(out.stdout)
    touched = (123e6 - 49408 * 768) * 2  # the fp16 text tower but its token table (one row looked up)
    assert used - loaded > 0.8 * touched, (loaded, used)
    assert used - released > 0.8 * touched, (used, released)


def test_default_weights_are_stored_on_the_cpu():
    assert Runtime.choose("cpu").weights == "stored"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an AVX2 machine warns that bf16 is emulated
        assert Runtime.choose("cpu", "bf16").weights == "compute"  # nothing narrower than bf16 to keep
    assert runtime.default_weights(torch.device("cuda"), "fp16") == "compute"


def test_stored_layers_share_one_buffer_but_not_under_autograd():
    """Two stored layers of one shape widen into the same scratch buffer; when autograd keeps the
    weight for a backward pass, each gets its own, so the gradient is the wide model's."""
    torch.manual_seed(0)
    wide = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16))
    wide.half().float()  # fp16-exact values
    kept = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16))
    kept.load_state_dict(wide.state_dict())
    kept.half()
    stored_weights.keep_stored(kept, torch.float32)
    kept.requires_grad_(False)
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(kept(x), wide(x))
    first, second = kept[0]._widened_weight(x), kept[2]._widened_weight(x)
    assert first.data_ptr() == second.data_ptr()  # the same buffer, rewritten per layer
    x_wide, x_kept = x.clone().requires_grad_(), x.clone().requires_grad_()
    wide.requires_grad_(False)
    wide(x_wide).square().sum().backward()
    kept(x_kept).square().sum().backward()
    assert torch.equal(x_kept.grad, x_wide.grad)


@pytest.mark.parametrize("int8", [False, True])
def test_a_layer_over_the_scratch_size_runs_in_output_slices_with_the_same_result(int8, monkeypatch):
    """A layer wider than SCRATCH_ELEMENTS widens one slice of its output channels at a time (the buffer
    never holds more than that), and joins the slices into the whole layer's output."""
    torch.manual_seed(0)
    conv, fc = torch.nn.Conv2d(8, 12, 3, padding=1), torch.nn.Linear(24, 40)
    stack = torch.nn.ModuleList([conv, fc]).half()
    stored_weights.keep_stored(stack, torch.float32)
    if int8:
        for layer in stack:
            q, scale = stored_weights.quantize_int8(layer.weight.float())
            layer.weight = torch.nn.Parameter(q, requires_grad=False)
            layer.register_buffer("weight_scale", scale, persistent=False)
    images, tokens = torch.randn(2, 8, 6, 6), torch.randn(2, 5, 24)
    with torch.no_grad():
        whole = conv(images), fc(tokens)
        stored_weights.release_scratch()
        # 360 elements: the conv's 12 output channels (72 each) in slices of 5, 5, 2; the linear's 40 rows
        # (24 each) in slices of 15, 15, 10
        monkeypatch.setattr(stored_weights, "SCRATCH_ELEMENTS", 360)
        sliced = conv(images), fc(tokens)
        (buffer,) = stored_weights._SCRATCH.buffers.values()
        assert buffer.numel() == 360
        dense = [stored_weights.dense_weight(layer).float() for layer in stack]
        by_hand = (torch.nn.functional.conv2d(images, dense[0], conv.bias.float(), padding=1),
                   torch.nn.functional.linear(tokens, dense[1], fc.bias.float()))
    for got, expected, reference in zip(sliced, whole, by_hand):
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
        assert torch.allclose(got, reference, rtol=1e-5, atol=1e-5)


# 2b. int8 weights: the low-memory mode.

def test_quantize_int8_per_output_channel():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 4, 3, 3, generator=g) * torch.logspace(-3, 1, 8).view(-1, 1, 1, 1)
    w[5] = 0
    q, scale = stored_weights.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (8, 1, 1, 1) and int(q.abs().max()) == 127
    assert scale[5].item() == 1.0 and not q[5].any()
    err = (q.float() * scale - w).abs()
    assert torch.all(err <= scale / 2 * (1 + 1e-5))  # round to nearest within every channel's own step
    q2, scale2 = stored_weights.quantize_int8(w.clone(), overwrite=True)
    assert torch.equal(q, q2) and torch.equal(scale, scale2)


def test_int8_weights_quantise_the_unet_only(tiny16):
    path, _ = tiny16
    wide, small = load_model(path), load_model(path, weights="int8")
    layer = small.unet.time_embed[0]
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    assert stored_weights.keeps_stored(small.text_encoder) and stored_weights.keeps_stored(small.vae)
    assert not any(t.dtype == torch.int8 for net in (small.text_encoder, small.vae) for t in net.state_dict().values())
    int8_bytes = sum(p.numel() for p in small.unet.parameters() if p.dtype == torch.int8)
    assert int8_bytes > 0.9 * sum(p.numel() for p in small.unet.parameters())
    # The state dict holds the numbers it computes with, never bare int8 values.
    state = small.unet.state_dict()
    assert state["time_embed.0.weight"].dtype == torch.float32
    assert torch.equal(state["time_embed.0.weight"], layer.weight.float() * layer.weight_scale)
    inputs = _inputs(TINY)
    (c_wide, u_wide, v_wide), (c_small, u_small, v_small) = _outputs(wide, inputs), _outputs(small, inputs)
    assert torch.equal(c_small, c_wide) and torch.equal(v_small, v_wide)  # text encoder and VAE exact
    relative = float((u_small - u_wide).norm() / u_wide.norm())
    assert 0 < relative < 0.03, relative  # the UNet within int8's rounding, and really quantised


def test_lora_on_int8_weights_merges_into_the_dequantised_weight_and_restores(tiny16):
    path, lora_path = tiny16
    wide, small = load_model(path), load_model(path, weights="int8")
    lora = load_lora(lora_path)
    modules = dict(small.unet.named_modules())
    before = {n: (p.clone(), p.data_ptr()) for n, p in small.unet.named_parameters()}
    dense = {n: stored_weights.dense_weight(m) for n, m in modules.items()
             if isinstance(m, stored_weights.StoredWeights)}
    wide_before = {n: p.clone() for n, p in wide.unet.named_parameters()}
    with apply_loras(wide, [(lora, 0.8)]), apply_loras(small, [(lora, 0.8)]):
        changed = 0
        for name, p in wide.unet.named_parameters():
            module = name.rsplit(".", 1)[0]
            if name.endswith(".weight") and module in dense and not torch.equal(p, wide_before[name]):
                delta = p - wide_before[name]
                merged = modules[module].weight
                assert merged.dtype == torch.float32
                torch.testing.assert_close(merged, dense[module] + delta, rtol=0, atol=1e-5)
                changed += 1
        assert changed > 0
    for name, p in small.unet.named_parameters():  # restored: the very int8 tensors, unchanged
        value, pointer = before[name]
        assert p.dtype == value.dtype and torch.equal(p, value) and p.data_ptr() == pointer, name


def test_low_memory_runtime():
    assert Runtime.choose("cpu", low_memory=True).weights == "int8"
    assert Runtime.choose("cpu", low_memory=True, weights="stored").weights == "stored"
    with pytest.raises(SdtorchError, match="choose one"):
        Runtime.choose("cpu", low_memory=True, keep_freed=True)


def test_cli_low_memory_in_a_fresh_process(tiny16, tmp_path):
    """`--low-memory` sets a whole-process allocator option, so it runs in its own process; the image is
    the plain one within int8's drift (the tiny random model's pixels, levels)."""
    import numpy as np
    from PIL import Image

    path, _ = tiny16
    args = [sys.executable, "-m", "sdtorch", "generate", "a cat", "--model", str(path), "--seed", "3", "--steps", "4",
            "--width", "32", "--height", "32", "--quiet", "--device", "cpu"]
    subprocess.run([*args, "--out", str(tmp_path / "plain.png")], check=True, capture_output=True)
    out = subprocess.run([*args, "--out", str(tmp_path / "low.png"), "--low-memory"], check=True, capture_output=True,
                         text=True)
    assert "wrote" in out.stdout + out.stderr
    plain, low = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("plain", "low"))
    drift = np.abs(plain - low)
    print("int8 drift on the tiny model: mean", drift.mean(), "max", drift.max())
    assert plain.shape == low.shape and 0 < drift.mean() < 8


# 3. The same maths, faster layouts and kernels.

@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_vae_channels_last_matches_nchw(part):
    model = StableDiffusion.random(TINY)
    randomise_(model.vae, seed=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, TINY.vae.latent_channels, 16, 16, generator=g) if part == "decoder" else \
        torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    net = getattr(model.vae, part)
    with torch.no_grad():
        net.memory_format = torch.contiguous_format
        nchw = net(x)
        net.memory_format = None  # the default: channels-last on the CPU
        default = net(x)
        net.memory_format = torch.channels_last
        cl = net(x)
    assert torch.equal(default, cl) and default.is_contiguous()
    assert (cl - nchw).abs().max().item() < 1e-4


def test_runtime_apply_sets_the_layout_and_keeps_it_over_a_vae_swap(tiny16):
    from sdtorch.pipeline import Pipeline

    path, _ = tiny16
    pipe = Pipeline.load(path, device="cpu", vae_channels_last=False)
    vae = pipe.model.vae
    assert vae.encoder.memory_format == vae.decoder.memory_format == torch.contiguous_format
    pipe.use_vae(path)
    assert pipe.model.vae is not vae
    assert pipe.model.vae.encoder.memory_format == pipe.model.vae.decoder.memory_format == torch.contiguous_format


def test_unet_channels_last_is_the_same_model(tiny16):
    path, lora_path = tiny16
    plain, cl = load_model(path), Runtime.choose("cpu", unet_channels_last=True).apply(load_model(path))
    assert cl.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    inputs = _inputs(TINY)
    with apply_loras(plain, [(load_lora(lora_path), 0.5)]), apply_loras(cl, [(load_lora(lora_path), 0.5)]):
        a, b = _outputs(plain, inputs)[1], _outputs(cl, inputs)[1]
    assert (a - b).abs().max().item() < 1e-4


def test_compile_is_the_same_model(tiny16):
    pytest.importorskip("torch._inductor")
    path, _ = tiny16
    model = load_model(path)
    inputs = _inputs(TINY, size=8)
    with torch.no_grad():
        context = model.text_encoder(inputs["ids"])
        eager = model.unet(inputs["x"], inputs["t"], context)
        before = runtime.compile_seconds()
        Runtime.choose("cpu", compile=True).apply(model)
        compiled = model.unet(inputs["x"], inputs["t"], context)
        spent = runtime.compile_seconds() - before
        again = model.unet(inputs["x"], inputs["t"], context)
    assert spent > 0 and runtime.compile_seconds() - before == spent  # only the first call of a shape counts
    assert (compiled - eager).abs().max().item() < 1e-4 and torch.equal(compiled, again)
    assert list(model.unet.state_dict()) == list(load_model(path).unet.state_dict())


# 6. The load path.

def test_read_as_converts_exactly(tiny16):
    path, _ = tiny16
    file = open_tensors(path)
    for entry in list(file.tensors.values())[:40]:
        if entry.dtype.is_floating_point:
            assert torch.equal(entry.read_as(torch.float32), entry.read().to(torch.float32))
            assert entry.read_as(entry.dtype).dtype == entry.dtype


def test_loading_and_generating_do_not_import_the_compiler(tiny16):
    """Initialising networks on the meta device, and later the memory plan's look at which attention kernel
    runs (a dispatch mode), each used to import torch._dynamo: about a second and 70 MB of every process."""
    path, _ = tiny16
    child = ("import sys; from sdtorch.loading import load_model; load_model(sys.argv[1]); "
             "print('torch._dynamo' in sys.modules); "
             "from sdtorch.pipeline import Pipeline; "
             "Pipeline.load(sys.argv[1]).generate('a red circle', steps=2, width=64, height=64, progress=False); "
             "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_cli_stored_weights_give_the_same_png(tmp_path):
    """The embedded model is an fp16 file: kept as stored (and with freed memory kept), the command
    writes the very same bytes."""
    from sdtorch import cli

    plain, kept = tmp_path / "plain.png", tmp_path / "kept.png"
    args = ["generate", "a red circle on a blue background", "--seed", "3", "--device", "cpu", "--quiet"]
    assert cli.main([*args, "--out", str(plain)]) == 0
    assert cli.main([*args, "--out", str(kept), "--weights", "stored", "--keep-freed-memory"]) == 0
    assert plain.read_bytes() == kept.read_bytes()


def test_guidance_passes_in_turn_equal_the_batched_call(tiny_checkpoint):
    """The low-memory mode runs CFG's unconditional and conditional passes as two UNet calls of one row
    each: the same image (float rounding apart) from half the activations at a time."""
    import numpy as np

    from sdtorch.pipeline import Pipeline

    pipe = Pipeline.load(tiny_checkpoint, device="cpu")
    rows = []
    hook = pipe.model.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    settings = dict(seed=5, steps=4, sampler="euler", width=32, height=32, progress=False)
    batched = pipe.generate("a red circle", **settings)
    assert set(rows) == {2}
    rows.clear()
    pipe.passes_in_turn = True
    in_turn = pipe.generate("a red circle", **settings)
    hook.remove()
    assert set(rows) == {1} and len(rows) == 2 * 4
    torch.testing.assert_close(in_turn.latents, batched.latents, rtol=0, atol=1e-4)
    a, b = (np.asarray(r.images[0], dtype=np.int16) for r in (batched, in_turn))
    assert np.abs(a - b).max() <= 1
