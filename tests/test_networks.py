"""Our CLIP text encoder, UNet and VAE against transformers/diffusers with the same weights."""

from __future__ import annotations

import pytest
import torch
from oracles import (
    diffusers_unet_kwargs,
    diffusers_vae_kwargs,
    max_rel_error,
    randomise_,
    transformers_clip_config,
)

from sdtorch.clip import CLIPTextModel
from sdtorch.config import SD15, TINY
from sdtorch.linear import onednn_linear_available
from sdtorch.loading.diffusers_format import to_diffusers_name, unet_module_names, vae_module_names
from sdtorch.unet import UNet
from sdtorch.vae import AutoencoderKL

CONFIGS = {"tiny": TINY, "sd15": SD15}


def load_from_reference(ours: torch.nn.Module, ref_state: dict, table=None) -> torch.nn.Module:
    state = {}
    for name, param in ours.state_dict().items():
        theirs = to_diffusers_name(name, table) if table else name
        state[name] = ref_state.pop(theirs).reshape(param.shape)
    assert not ref_state, f"reference tensors left unmapped: {sorted(ref_state)[:5]}"
    ours.load_state_dict(state, strict=True)
    return ours.eval()


@pytest.mark.parametrize("size", ["tiny", "sd15"])
def test_clip_text_encoder_matches_transformers(size):
    from transformers import CLIPTextModel as RefCLIP

    cfg = CONFIGS[size].text
    ref = randomise_(RefCLIP(transformers_clip_config(cfg)), seed=1)
    ref_state = {k.removeprefix("text_model."): v.clone() for k, v in ref.state_dict().items()}
    ref_state = {k: v for k, v in ref_state.items() if not k.endswith("position_ids")}
    ours = load_from_reference(CLIPTextModel(cfg), ref_state)

    ids = torch.randint(0, cfg.vocab_size, (2, cfg.max_positions), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, 20:] = 49406, 49407  # BOS, then EOS padding as SD 1.x tokenizes
    with torch.no_grad():
        out = ref(input_ids=ids, output_hidden_states=True)
        context = ours(ids)
        states = ours.hidden_states(ids)
        skip2 = ours(ids, clip_skip=2)
    assert context.shape == (2, 77, cfg.width)
    assert (context - out.last_hidden_state).abs().max().item() <= 1e-4
    assert len(states) == len(out.hidden_states)
    for mine, theirs in zip(states, out.hidden_states):
        assert (mine - theirs).abs().max().item() <= 1e-4
    # A1111's "Clip skip 2": the penultimate layer through the final norm.
    final_norm = getattr(ref, "text_model", ref).final_layer_norm  # transformers 5 drops `text_model`
    expected_skip2 = final_norm(out.hidden_states[-2])
    assert (skip2 - expected_skip2).abs().max().item() <= 1e-4


@pytest.mark.parametrize("size", ["tiny", "sd15"])
def test_unet_matches_diffusers(size):
    from diffusers import UNet2DConditionModel

    cfg = CONFIGS[size].unet
    ref = randomise_(UNet2DConditionModel(**diffusers_unet_kwargs(cfg)), seed=2)
    ours = load_from_reference(UNet(cfg), dict(ref.state_dict()), unet_module_names(cfg))

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, 16, 16, generator=g)
    context = torch.randn(2, 77, cfg.context_dim, generator=g)
    t = torch.tensor([999.0, 1.0])
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context).sample
        got = ours(x, t, context)
        # A fractional scalar timestep, as Karras schedules give.
        expected_frac = ref(x, torch.tensor(421.37), encoder_hidden_states=context).sample
        got_frac = ours(x, torch.tensor(421.37), context)
    assert got.shape == expected.shape
    assert max_rel_error(got, expected) <= 1e-4
    assert max_rel_error(got_frac, expected_frac) <= 1e-4


@pytest.mark.parametrize("size", ["tiny", "sd15"])
def test_vae_matches_diffusers(size):
    from diffusers import AutoencoderKL as RefVAE

    cfg = CONFIGS[size].vae
    ref = randomise_(RefVAE(**diffusers_vae_kwargs(cfg)), seed=3)
    ours = load_from_reference(AutoencoderKL(cfg), dict(ref.state_dict()), vae_module_names(cfg))

    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    latents = torch.randn(1, cfg.latent_channels, 64 // cfg.downscale, 64 // cfg.downscale, generator=g)
    with torch.no_grad():
        ref_post = ref.encode(images).latent_dist
        our_post = ours.encode(images)
        ref_sample = ref_post.sample(generator=torch.Generator().manual_seed(7))
        our_sample = our_post.sample(generator=torch.Generator().manual_seed(7))
        ref_decoded = ref.decode(latents).sample
        our_decoded = ours.decode(latents)
    assert max_rel_error(our_post.mean, ref_post.mean) <= 1e-4
    assert max_rel_error(our_post.std, ref_post.std) <= 1e-4
    assert max_rel_error(our_sample, ref_sample) <= 1e-4
    assert our_decoded.shape == (1, 3, 64, 64)
    assert max_rel_error(our_decoded, ref_decoded) <= 1e-4


def tiny_unets(seed: int, rows: int, height: int, width: int):
    """diffusers' tiny UNet with random weights, ours with the same weights, and inputs (x, context) for them."""
    from diffusers import UNet2DConditionModel

    cfg = TINY.unet
    ref = randomise_(UNet2DConditionModel(**diffusers_unet_kwargs(cfg)), seed=seed)
    ours = load_from_reference(UNet(cfg), dict(ref.state_dict()), unet_module_names(cfg))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, height, width, generator=g)
    return ref, ours, x, torch.randn(rows, 77, cfg.context_dim, generator=g)


def test_unet_odd_latent_size_matches_diffusers():
    """Latents whose sides are not a multiple of 2**levels (e.g. a 520-pixel side) upsample to
    the skip's size, as diffusers does, instead of failing."""
    ref, ours, x, context = tiny_unets(5, 1, 9, 7)
    with torch.no_grad():
        expected = ref(x, 300, encoder_hidden_states=context).sample
        got = ours(x, 300, context)
    assert got.shape == (1, 4, 9, 7)
    assert max_rel_error(got, expected) <= 1e-4


def test_unet_with_its_feed_forward_in_chunks_matches_diffusers():
    """Long token sequences (here 2 x 40 x 40 = 3200 tokens at the first level) run the feed-forward in chunks
    of FEED_FORWARD_ROWS tokens, the last one partial; the output stays diffusers'."""
    from sdtorch import unet as unet_module

    ref, ours, x, context = tiny_unets(6, 2, 40, 40)
    chunks = []
    first_ff = ours.input_blocks[1][1].transformer_blocks[0].ff
    first_ff.net[0].register_forward_hook(lambda module, args, out: chunks.append(args[0].shape[0]))
    with torch.no_grad():
        expected = ref(x, 500, encoder_hidden_states=context).sample
        got = ours(x, 500, context)
    assert chunks == [unet_module.FEED_FORWARD_ROWS, 3200 - unet_module.FEED_FORWARD_ROWS]
    assert max_rel_error(got, expected) <= 1e-4


def test_the_chunked_feed_forward_gives_the_same_numbers_and_gradients():
    from sdtorch.unet import FEED_FORWARD_ROWS, FeedForward

    ff = randomise_(FeedForward(16), seed=7)
    x = torch.randn(3, FEED_FORWARD_ROWS, 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
    with torch.no_grad():
        whole = ff.net(x)  # the layers themselves, every token at once
        chunked = ff(x)
    assert torch.equal(chunked, whole)
    trained = ff(x)  # with autograd: not chunked, and GEGLU keeps its factors
    trained.square().sum().backward()
    assert torch.equal(trained.detach(), whole)
    assert x.grad is not None and ff.net[0].proj.weight.grad is not None


def counting_folded_upsamplers(monkeypatch) -> list[tuple[int, ...]]:
    """The input shapes of each `Upsample` call that ran as one transposed convolution, from now on."""
    from sdtorch import layers

    calls, fold = [], layers.nearest_upsample_kernel

    def counted(weight):
        calls.append(tuple(weight.shape))
        return fold(weight)

    monkeypatch.setattr(layers, "nearest_upsample_kernel", counted)
    return calls


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_an_upsampler_run_as_one_transposed_convolution_equals_nearest_then_convolution(layout, monkeypatch):
    import torch.nn.functional as F

    from sdtorch.layers import TRANSPOSED_UPSAMPLE_MIN_PIXELS, Upsample
    from sdtorch.stored_weights import keep_stored

    up = randomise_(Upsample(8), seed=4).eval().to(memory_format=layout)
    side = int(TRANSPOSED_UPSAMPLE_MIN_PIXELS ** 0.5)
    x = torch.randn(2, 8, side, side + 3, generator=torch.Generator().manual_seed(4)).to(memory_format=layout)
    calls = counting_folded_upsamplers(monkeypatch)
    with torch.no_grad():
        expected = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        folded = up(x)
        assert folded.shape == (2, 8, 2 * side, 2 * (side + 3))
        assert max_rel_error(folded, expected) <= 1e-5
        assert max_rel_error(up(x, size=(2 * side, 2 * side + 6)), expected) <= 1e-5
        # An odd skip size (not 2x) and a small input keep the two steps, which give exactly that.
        odd = up.conv(F.interpolate(x, size=(2 * side - 1, 2 * side + 5), mode="nearest"))
        assert torch.equal(up(x, size=(2 * side - 1, 2 * side + 5)), odd)
        small = x[:, :, :4, :4]
        assert torch.equal(up(small), up.conv(F.interpolate(small, scale_factor=2.0, mode="nearest")))
        assert len(calls) == 2  # the first two calls only
        # Weights kept in fp16 and widened per call fold the widened weight.
        half = keep_stored(randomise_(Upsample(8), seed=4).eval().half(), torch.float32)
        assert half.conv.weight.dtype == torch.float16
        expected_half = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), half.conv.weight.float(),
                                 half.conv.bias.float(), padding=1)
        assert max_rel_error(half(x), expected_half) <= 1e-5
        assert calls[-1] == (8, 8, 3, 3) and len(calls) == 3


def test_vae_decoder_with_folded_upsamplers_matches_diffusers(monkeypatch):
    """32x32 latents reach the tiny decoder's upsampler at 32x32, which runs as a transposed convolution."""
    from diffusers import AutoencoderKL as RefVAE

    cfg = TINY.vae
    ref = randomise_(RefVAE(**diffusers_vae_kwargs(cfg)), seed=8)
    ours = load_from_reference(AutoencoderKL(cfg), dict(ref.state_dict()), vae_module_names(cfg))
    latents = torch.randn(1, cfg.latent_channels, 32, 32, generator=torch.Generator().manual_seed(8))
    calls = counting_folded_upsamplers(monkeypatch)
    with torch.no_grad():
        expected = ref.decode(latents).sample
        got = ours.decode(latents)
    assert len(calls) == 1
    assert max_rel_error(got, expected) <= 1e-4


@pytest.mark.parametrize("batch", [1, 2])
def test_every_convolution_of_the_cpu_vae_runs_channels_last(batch):
    """Past the mid-block's attention too: a batch of 1 once came back from it with strides that the
    convolutions read as NCHW, and the rest of the decoder ran in that layout, 1.3x slower."""
    vae = randomise_(AutoencoderKL(TINY.vae), seed=4)
    outputs = []
    for module in [*vae.decoder.modules(), *vae.encoder.modules()]:  # not the 1x1 quant convs, NCHW by design
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, args, out: outputs.append(out))
    latents = torch.randn(batch, TINY.vae.latent_channels, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        images = vae.decode(latents)
        vae.encode(images)
    # Strides alone can't tell: a size-1 batch makes a tensor `is_contiguous` in both layouts, so each
    # convolution's output, laid out as its kernel chose, is compared with a fresh channels-last one.
    assert len(outputs) > 20
    for out in outputs:
        assert out.stride() == torch.empty_like(out, memory_format=torch.channels_last).stride()


def test_unet_with_a_folded_upsampler_matches_diffusers(monkeypatch):
    """64x64 latents reach the tiny UNet's upsampler at 32x32."""
    ref, ours, x, context = tiny_unets(9, 1, 64, 64)
    calls = counting_folded_upsamplers(monkeypatch)
    with torch.no_grad():
        expected = ref(x, 700, encoder_hidden_states=context).sample
        got = ours(x, 700, context)
    assert len(calls) == 1
    assert max_rel_error(got, expected) <= 1e-4


@pytest.mark.skipif(not onednn_linear_available(), reason="no oneDNN linear in this PyTorch or CPU")
def test_unet_and_text_encoder_with_onednn_linears_match_the_references(monkeypatch):
    """On AMD CPUs the linears run through oneDNN (`sdtorch.linear`); asked for here on any CPU that has it."""
    from test_linear import counting_onednn_linears
    from transformers import CLIPTextModel as RefCLIP

    from sdtorch.linear import linear_kernel

    ref, ours, x, context = tiny_unets(10, 2, 16, 16)
    cfg = TINY.text
    ref_text = randomise_(RefCLIP(transformers_clip_config(cfg)), seed=10)
    text_state = {k.removeprefix("text_model."): v.clone() for k, v in ref_text.state_dict().items()}
    ours_text = load_from_reference(CLIPTextModel(cfg), {k: v for k, v in text_state.items()
                                                         if not k.endswith("position_ids")})
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.max_positions), generator=torch.Generator().manual_seed(10))
    calls = counting_onednn_linears(monkeypatch)
    with torch.no_grad():
        expected, expected_text = ref(x, 400, encoder_hidden_states=context).sample, ref_text(input_ids=ids)
        with linear_kernel("onednn"):
            got, got_text = ours(x, 400, context), ours_text(ids)
    assert len(calls) == sum(isinstance(m, torch.nn.Linear) for m in (*ours.modules(), *ours_text.modules()))
    assert max_rel_error(got, expected) <= 1e-4
    assert (got_text - expected_text.last_hidden_state).abs().max().item() <= 1e-4
