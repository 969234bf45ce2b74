"""The request seam: one GenerationRequest, its checks, its A1111 record in both directions, and
the conditioning and attention seams the coming features plug into."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdtorch.errors import SdtorchError
from sdtorch.layers import attention, swapped_attention
from sdtorch.loading import load_model
from sdtorch.metadata import infotext, params_of, parse_parameters, request_from_infotext
from sdtorch.pipeline import Pipeline
from sdtorch.request import GenerationRequest
from sdtorch.samplers import SAMPLERS, SCHEDULE_TYPES


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return Pipeline(load_model(tiny_checkpoint), tiny_checkpoint)


def resolved(**fields) -> GenerationRequest:
    base = dict(prompt="a red circle", negative_prompt="blurry", seed=12, width=64, height=48, cfg_scale=6.5)
    return GenerationRequest(**(base | fields))


ROUND_TRIPS = [
    resolved(sampler=name, schedule=schedule)
    for name, entry in SAMPLERS.items()
    for schedule in entry.schedules
] + [
    resolved(prompt="", negative_prompt=""),
    resolved(prompt="line one,\nline: two", negative_prompt="a, b"),
    resolved(sampler="ddim", eta=0.35),
    resolved(clip_skip=2, steps=33, cfg_scale=1.0),
    resolved(init_image=Image.new("RGB", (64, 48)), strength=0.45),
    resolved(options={"Version": "v1.10.1", "Lora hashes": "a: 1234, b: 5678"}),
]


@pytest.mark.parametrize("request_", ROUND_TRIPS, ids=lambda r: f"{r.sampler}-{r.schedule}")
def test_request_infotext_request_is_identity(request_):
    again = request_from_infotext(infotext(request_))
    expected = request_ if not request_.img2img else request_.replace(init_image=None)  # pixels are not text
    assert again == expected


@pytest.mark.parametrize(
    "line, sampler, schedule",
    [
        ("Sampler: DPM++ 2M Karras", "dpmpp_2m", "karras"),  # A1111 before 1.9
        ("Sampler: DPM++ 2M, Schedule type: Karras", "dpmpp_2m", "karras"),  # 1.9+
        ("Sampler: DPM++ 2M, Schedule type: Automatic", "dpmpp_2m", "karras"),  # its A1111 default
        ("Sampler: DPM++ 2M, Schedule type: Uniform", "dpmpp_2m", "uniform"),
        ("Sampler: DPM++ 2M", "dpmpp_2m", "uniform"),  # a bare old name meant uniform
        ("Sampler: Euler a, Schedule type: Automatic", "euler_a", "uniform"),
        ("Sampler: Euler Karras", "euler", "karras"),
        ("Sampler: UniPC, Schedule type: Karras", "unipc", "karras"),
        ("Sampler: PLMS", "pndm", "uniform"),
    ],
)
def test_old_and_new_a1111_sampler_spellings(line, sampler, schedule):
    request = request_from_infotext(f"a cat\nSteps: 20, {line}, CFG scale: 7, Seed: 1, Size: 512x512")
    assert (request.sampler, request.schedule) == (sampler, schedule)


def test_the_new_form_is_written_and_only_where_it_says_something():
    assert "Sampler: DPM++ 2M, Schedule type: Karras," in infotext(resolved(sampler="dpmpp_2m", schedule="karras"))
    # A1111 would read a missing schedule type for DPM++ 2M as Karras: uniform must be said.
    assert "Sampler: DPM++ 2M, Schedule type: Uniform," in infotext(resolved(sampler="dpmpp_2m"))
    assert "Sampler: Euler a, CFG scale" in infotext(resolved(sampler="euler_a"))
    assert set(SCHEDULE_TYPES) == {"uniform", "karras"}


def test_a_record_needs_a_resolved_single_image_request():
    with pytest.raises(ValueError, match="resolved"):
        params_of(GenerationRequest(prompt="x"))
    params = params_of(resolved(batch=1))
    assert (params.seed, params.width, params.height, params.cfg_scale) == (12, 64, 48, 6.5)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(width=100), "width 100 is not accepted; use a multiple of 8"),
        (dict(steps=0), "steps must be a whole number of at least 1"),
        (dict(steps=2.5), "steps must be"),
        (dict(cfg_scale=-1), "CFG scale must be"),
        (dict(sampler="euler_b"), "unknown sampler 'euler_b'; valid samplers: ddim, pndm"),
        (dict(sampler="euler_a", schedule="karras"), "does not take the 'karras' schedule"),
        (dict(schedule="kerras"), "unknown schedule type 'kerras'; accepted: uniform, karras, automatic"),
        (dict(sampler="euler", eta=0.5), "eta applies to the ddim sampler only"),
        (dict(sampler="ddim", eta=1.5), "eta must be between 0 and 1"),
        (dict(batch=0), "batch must be at least 1"),
        (dict(seed=-1), "seed must be between 0 and"),
        (dict(seed=True), "seed must be"),
        (dict(clip_skip=0), "clip skip"),
        (dict(prompt=None), "prompt must be text"),
        (dict(width=16384, height=8192), "too large for one image"),
        (dict(init_image=Image.new("RGB", (4, 4))), "needs at least 8x8"),
        (dict(init_image=Image.new("RGB", (32, 32)), strength=0.0), "strength must be in (0, 1]"),
        (dict(init_image=Image.new("RGB", (32, 32)), strength=0.05, steps=10), "runs no step"),
    ],
)
def test_bad_requests_are_one_line_errors(fields, message):
    with pytest.raises(SdtorchError) as info:
        GenerationRequest(**fields).validate()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_model_dependent_checks(pipe):
    with pytest.raises(SdtorchError, match="clip skip must be between 1 and 2 for this model"):
        GenerationRequest(clip_skip=3).validate(pipe.model)
    with pytest.raises(SdtorchError, match="steps must be between 1 and 1000"):
        GenerationRequest(steps=1001).validate(pipe.model)


def test_resolved_fills_what_was_left_to_the_model(pipe):
    config = pipe.model.config
    request = GenerationRequest(prompt="x", sampler="dpmpp_2m", schedule="automatic").resolved(pipe.model)
    assert request.seed is not None and 0 <= request.seed < 2**32
    assert (request.width, request.height, request.cfg_scale) == (config.image_size, config.image_size, 7.5)
    assert request.schedule == "karras"  # A1111's default for DPM++ 2M
    img2img = GenerationRequest(init_image=Image.new("RGB", (45, 30))).resolved(pipe.model)
    assert (img2img.width, img2img.height) == (40, 24)


def test_an_empty_prompt_generates_and_is_recorded(pipe):
    result = pipe.run(GenerationRequest(prompt="", seed=5, steps=3, width=32, height=32))
    assert result.images[0].size == (32, 32)
    text = infotext(result.per_image()[0], model_name=pipe.model_name)
    assert text.startswith("Steps: 3, Sampler: Euler a") and parse_parameters(text).prompt == ""
    # Unconditional is not "no prompt": guidance between the empty prompt and a negative one still applies.
    other = pipe.run(GenerationRequest(prompt="", negative_prompt="a blue square", seed=5, steps=3, width=32,
                                       height=32))
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(other.images[0]))


def test_the_python_api_takes_a_request_or_keywords(pipe):
    request = GenerationRequest(prompt="a red circle", seed=3, steps=3, width=32, height=32)
    a = pipe.generate(request, progress=False)
    b = pipe.generate("a red circle", seed=3, steps=3, width=32, height=32, progress=False)
    c = pipe.generate(request.replace(seed=4), seed=3, progress=False)  # keywords update a request
    assert a.request == b.request == c.request
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(c.images[0]))


def test_each_distinct_prompt_is_encoded_once(pipe):
    rows = []
    hook = pipe.model.text_encoder.register_forward_hook(lambda m, args, kwargs, out: rows.append(len(out)),
                                                         with_kwargs=True)
    try:
        pipe.run(GenerationRequest(prompt="a cat", negative_prompt="a dog", batch=3, seed=1, steps=2, width=32,
                                   height=32))
        pipe.run(GenerationRequest(prompt="same", negative_prompt="same", batch=2, seed=1, steps=2, width=32,
                                   height=32))
    finally:
        hook.remove()
    assert rows == [2, 1]  # one text-encoder call per generation, one row per distinct prompt


def test_text_encoder_takes_token_vectors_as_well_as_ids(pipe):
    encoder = pipe.model.text_encoder
    ids = pipe.tokenizer(["a red circle on a blue background"])
    vectors = encoder.embeddings.token_embedding(ids)
    torch.testing.assert_close(encoder(tokens=vectors, clip_skip=2), encoder(ids, clip_skip=2), rtol=0, atol=0)


def test_attention_can_be_swapped_for_a_scope_and_is_restored(pipe):
    """The seam the explain report records through: every cross-attention call of the UNet is seen, the
    image is unchanged by a recorder that computes the same attention, and the layers are restored."""
    unet = pipe.model.unet
    seen: list[tuple[str, tuple]] = []

    def recorder(name, layer):
        if not name.endswith("attn2"):
            return None

        def attend(q, k, v, heads):
            seen.append((name, tuple(k.shape)))
            return attention(q, k, v, heads)

        return attend

    request = GenerationRequest(prompt="a red circle", seed=2, steps=2, width=32, height=32)
    plain = pipe.run(request)
    with swapped_attention(unet, recorder):
        recorded = pipe.run(request)
    assert torch.equal(plain.latents, recorded.latents)
    cross_layers = [n for n, m in unet.named_modules() if n.endswith("attn2")]
    assert len(seen) == 2 * len(cross_layers) and {n for n, _ in seen} == set(cross_layers)
    assert all(shape[1] == 77 for _, shape in seen)  # keys come from the 77-token context
    assert all(m.attention_fn is attention for m in unet.modules() if hasattr(m, "attention_fn"))

    with swapped_attention(unet, lambda name, layer: (lambda q, k, v, heads: torch.zeros_like(q))), \
            pytest.raises(RuntimeError, match="boom"):
        raise RuntimeError("boom")
    assert all(m.attention_fn is attention for m in unet.modules() if hasattr(m, "attention_fn"))
    with swapped_attention(unet, lambda name, layer: (lambda q, k, v, heads: torch.zeros_like(q))):
        silenced = pipe.run(request)
    assert not torch.equal(plain.latents, silenced.latents)
