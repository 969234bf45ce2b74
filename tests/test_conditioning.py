"""Prompts as A1111 reads them, in generation: chunks, emphasis, prompt editing, AND, textual
inversion and LoRA, checked against transformers' CLIP on the same weights and against what the
UNet is actually given (through the attention seam)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles import transformers_clip_config
from safetensors.torch import save_file

from sdtorch.adapters.library import Adapters
from sdtorch.conditioning import PromptEncoder, encode
from sdtorch.errors import SdtorchError
from sdtorch.layers import attention, swapped_attention
from sdtorch.loading import load_model
from sdtorch.metadata import infotext, parse_parameters, request_from_infotext
from sdtorch.pipeline import Pipeline
from sdtorch.prompt_chunks import chunk_prompt
from sdtorch.request import GenerationRequest

SMALL = dict(seed=4, steps=4, width=32, height=32, cfg_scale=6.0)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint)


@pytest.fixture(scope="module")
def pipe(model, tiny_checkpoint):
    return Pipeline(model, tiny_checkpoint)


@pytest.fixture(scope="module")
def reference_clip(model):
    """transformers' CLIPTextModel holding our text encoder's weights."""
    from transformers import CLIPTextModel

    ref = CLIPTextModel(transformers_clip_config(model.config.text)).eval()
    prefix = "text_model." if any(k.startswith("text_model.") for k in ref.state_dict()) else ""  # transformers 4/5
    state = {prefix + k: v for k, v in model.text_encoder.state_dict().items()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    return ref


def reference_context(ref, prompt: str, emphasis: str = "original") -> torch.Tensor:
    """A1111's recipe written out on transformers' CLIP: each chunk alone, z * w, each chunk's mean
    restored ("original"), the chunks side by side."""
    outs = []
    for chunk in chunk_prompt(prompt):
        with torch.no_grad():
            z = ref(input_ids=torch.tensor([chunk.ids])).last_hidden_state  # (1, 77, width)
        w = torch.tensor(chunk.weights).reshape(1, -1, 1)
        scaled = z * w
        if emphasis == "original":
            scaled = scaled * (z.mean() / scaled.mean())
        outs.append(scaled)
    return torch.cat(outs, dim=1)


LONG = ", ".join(["a red circle"] * 30)  # 119 tokens: two chunks, cut at a comma


@pytest.mark.parametrize(
    "prompt, emphasis",
    [
        ("a red circle on a blue background", "original"),
        ("a (red:1.4) circle on a [[blue]] background", "original"),
        ("a (red:1.4) circle on a [[blue]] background", "no_norm"),
        (LONG, "original"),
        ("a red circle BREAK on a (blue:0.7) background", "original"),
    ],
)
def test_contexts_match_a1111s_recipe_on_transformers_clip(pipe, reference_clip, prompt, emphasis):
    ours = pipe.prompt_encoder.encode([prompt], emphasis=emphasis)[0][prompt]  # (contexts, pooled)
    expected = reference_context(reference_clip, prompt, emphasis)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() <= 1e-4


def test_long_prompts_keep_every_token_and_pad_the_negative(pipe):
    assert len(pipe.tokenizer.encode(LONG)) == 119 and len(chunk_prompt(LONG)) == 2
    cond, uncond = encode(pipe.prompt_encoder, LONG, "", steps=4)
    assert cond.tokens == uncond.tokens == 154  # two chunks of 77 for both
    empty = pipe.prompt_encoder.encode([""])[0][""]
    context = uncond.parts[0].at(1)
    torch.testing.assert_close(context[:, :77], empty, rtol=0, atol=0)
    torch.testing.assert_close(context[:, 77:], empty, rtol=0, atol=0)  # the padding chunk is an empty prompt


def contexts_seen(pipe, request) -> list[torch.Tensor]:
    """The text context the UNet's first cross-attention gets at each model call (conditional half)."""
    seen = []
    first = next(n for n, _ in pipe.model.unet.named_modules() if n.endswith("attn2"))

    def choose(name, layer):
        if name != first:
            return None

        def attend(q, k, v, heads):
            seen.append(k[-1:].clone())  # the last batch row: the conditional pass
            return attention(q, k, v, heads)

        return attend

    with swapped_attention(pipe.model.unet, choose):
        pipe.run(request)
    return seen


def test_prompt_editing_switches_the_context_at_the_step(pipe):
    edited = contexts_seen(pipe, GenerationRequest(prompt="[a red circle:a blue square:2]", sampler="euler", **SMALL))
    red = contexts_seen(pipe, GenerationRequest(prompt="a red circle", sampler="euler", **SMALL))
    blue = contexts_seen(pipe, GenerationRequest(prompt="a blue square", sampler="euler", **SMALL))
    assert len(edited) == 4
    assert [torch.equal(e, r) for e, r in zip(edited, red)] == [True, True, False, False]
    assert [torch.equal(e, b) for e, b in zip(edited, blue)] == [False, False, True, True]
    alternating = contexts_seen(pipe, GenerationRequest(prompt="a [red|blue] circle", sampler="euler", **SMALL))
    assert torch.equal(alternating[0], alternating[2]) and not torch.equal(alternating[0], alternating[1])


def test_and_combines_the_parts_with_their_weights(model):
    """A stand-in UNet whose output is its context's mean, so the combination can be read off."""

    class MeanUNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, context, y=None):
            return x * 0 + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)

    from sdtorch.conditioning import Conditioning, Part
    from sdtorch.guidance import guided_model

    def c(value):
        return torch.full((1, 77, 4), value)

    cond = Conditioning((Part(1.0, ((4, c(1.0)),)), Part(0.5, ((4, c(3.0)),))))
    uncond = Conditioning((Part(1.0, ((4, c(-1.0)),)),))
    out = guided_model(MeanUNet(), cond, uncond, scale=2.0, batch=2)(torch.zeros(2, 4, 2, 2), torch.tensor(1.0))
    # -1 + 2 * (1 * (1 - -1) + 0.5 * (3 - -1)) = 7
    torch.testing.assert_close(out, torch.full((2, 4, 2, 2), 7.0))


def test_and_in_a_generation(pipe):
    both = pipe.run(GenerationRequest(prompt="a red circle AND a blue square :0.8", **SMALL))
    single = pipe.run(GenerationRequest(prompt="a red circle", **SMALL))
    assert not torch.equal(both.latents, single.latents)


def random_embedding(path, width: int, vectors: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    save_file({"emb_params": torch.randn(vectors, width, generator=g)}, str(path))


def test_textual_inversion_vectors_enter_the_text_encoder(tmp_path, model, tiny_checkpoint):
    random_embedding(tmp_path / "shinystyle.safetensors", model.config.text.width, 3)
    pipe = Pipeline(model, tiny_checkpoint, Adapters.from_folders(embeddings_dir=tmp_path,
                                                                   width=model.config.text.width))
    context = pipe.prompt_encoder.encode(["a circle, shinystyle"])[0]["a circle, shinystyle"]
    # by hand: the tokens of "a circle," then the three vectors, then EOS padding
    encoder, tokenizer = model.text_encoder, pipe.tokenizer
    head = [tokenizer.bos_id, *tokenizer.encode("a circle,")]
    ids = torch.tensor([head + [0, 0, 0] + [tokenizer.eos_id] * (77 - len(head) - 3)])
    tokens = encoder.embeddings.token_embedding(ids)
    tokens[0, len(head) : len(head) + 3] = pipe.adapters.embeddings["shinystyle"].vectors
    with torch.no_grad():
        expected = encoder(tokens=tokens)
    torch.testing.assert_close(context, expected, rtol=0, atol=0)

    result = pipe.run(GenerationRequest(prompt="a circle", negative_prompt="shinystyle", **SMALL))
    text = infotext(result.per_image()[0])
    assert "TI hashes: \"shinystyle: " in text or "TI hashes: shinystyle: " in text


def kohya_lora(path, model, rank=4, seed=0):
    """A random kohya LoRA on the tiny UNet's and text encoder's attention projections."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    targets = {  # kohya's name (diffusers' module path) -> ours (CompVis)
        "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k":
            "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
        "mid_block_attentions_0_transformer_blocks_0_attn1_to_q": "middle_block.1.transformer_blocks.0.attn1.to_q",
    }
    for name, ours in targets.items():
        module = model.unet.get_submodule(ours)
        out_f, in_f = module.weight.shape
        state[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, in_f, generator=g)
        state[f"lora_unet_{name}.lora_up.weight"] = torch.randn(out_f, rank, generator=g)
        state[f"lora_unet_{name}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(path))


def test_lora_in_a_prompt_applies_for_that_generation_only(tmp_path, model, tiny_checkpoint):
    kohya_lora(tmp_path / "detail.safetensors", model)
    pipe = Pipeline(model, tiny_checkpoint, Adapters.from_folders(lora_dir=tmp_path))
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    plain = pipe.run(GenerationRequest(prompt="a red circle", **SMALL))
    with_lora = pipe.run(GenerationRequest(prompt="a red circle <lora:detail:0.7>", **SMALL))
    after = model.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # restored bit for bit
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(with_lora.images[0]))
    # the tag is not text for the encoder: without the LoRA's effect it is the plain prompt
    zero = pipe.run(GenerationRequest(prompt="a red circle <lora:detail:0>", **SMALL))
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(zero.images[0]))
    record = parse_parameters(infotext(with_lora.per_image()[0]))
    assert record.prompt == "a red circle <lora:detail:0.7>"  # the prompt as written, tag included
    assert record.extra["Lora hashes"].startswith("detail: ") and len(record.extra["Lora hashes"]) == 20
    again = pipe.run(request_from_infotext(infotext(with_lora.per_image()[0])))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(with_lora.images[0]))

    with pytest.raises(SdtorchError, match="no LoRA named 'missing' in .*found: detail"):
        pipe.run(GenerationRequest(prompt="x <lora:missing:1>", **SMALL))
    with pytest.raises(SdtorchError, match="no LoRA folder was given"):
        Pipeline(model, tiny_checkpoint).run(GenerationRequest(prompt="x <lora:detail:1>", **SMALL))


def test_emphasis_is_recorded_and_read_back():
    request = GenerationRequest(prompt="a (cat:1.3)", emphasis="no_norm", seed=1, width=64, height=64, cfg_scale=7.0)
    text = infotext(request)
    assert "Emphasis: No norm" in text and request_from_infotext(text) == request
    assert "Emphasis" not in infotext(request.replace(emphasis="original"))
    with pytest.raises(SdtorchError, match="unknown emphasis 'loud'; accepted: original, no_norm"):
        GenerationRequest(emphasis="loud").validate()


def test_prompt_encoder_is_the_pipelines(pipe):
    assert isinstance(pipe.prompt_encoder, PromptEncoder)
    assert pipe.prompt_encoder.text_encoder is pipe.model.text_encoder
