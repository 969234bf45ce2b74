"""What the UNet is conditioned on, made from a request's prompts: the conditioning seam.

A prompt means here what it means in AUTOMATIC1111 (`sdtorch.prompts` parses the text,
`sdtorch.prompt_chunks` cuts it into 77-token chunks):

- `AND` splits the prompt into parts, each with its weight (composable diffusion, Liu et al. 2022);
- prompt editing `[from:to:when]` and alternation `[a|b]` give each part a schedule of texts over
  the steps;
- each text is chunked (75 tokens + BOS + EOS, comma backtracking, `BREAK`), every chunk encoded
  alone and the outputs concatenated along the tokens, (1, 77k, width); textual-inversion
  embeddings enter as token vectors;
- emphasis `(word:1.2)` scales each token's output vector by its weight and then, with A1111's
  default "Original" emphasis, restores the chunk's mean ("No norm": scale only).

Every distinct text of a generation (all parts, all schedule steps, prompt and negative prompt) is
encoded in one text-encoder call, and all contexts are padded with empty chunks to the same length,
so that the conditional and unconditional passes share one UNet batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from sdtorch.layers import timestep_embedding
from sdtorch.prompt_chunks import EmbeddingLookup, PromptChunk, chunk_prompt, empty_chunk
from sdtorch.prompts import prompt_schedule, split_and
from sdtorch.tokenizer import CLIPTokenizer

EMPHASIS = {"original": "Original", "no_norm": "No norm"}  # ours -> A1111's label (infotext "Emphasis")


def _scheduled(schedule: tuple[tuple[int, Tensor], ...], step: int) -> Tensor:
    for last, value in schedule:
        if step <= last:
            return value
    return schedule[-1][1]  # past the planned steps (e.g. a second-order sampler's extra calls)


@dataclass(frozen=True)
class Part:
    """One AND-part of a prompt: its weight, and its contexts over the steps as [(last_step, context)],
    context (1, T, width), steps 1-based and counted as A1111 counts them (model calls); for SDXL also
    the pooled text embedding (1, P) of each of those texts, on the same steps."""

    weight: float
    schedule: tuple[tuple[int, Tensor], ...]
    pooled: tuple[tuple[int, Tensor], ...] | None = None

    def at(self, step: int) -> Tensor:
        return _scheduled(self.schedule, step)

    def pooled_at(self, step: int) -> Tensor | None:
        return None if self.pooled is None else _scheduled(self.pooled, step)


@dataclass(frozen=True)
class Conditioning:
    """What one prompt conditions the UNet on, step by step: its parts (one unless the prompt has AND)."""

    parts: tuple[Part, ...]

    def at(self, step: int) -> list[tuple[float, Tensor]]:
        return [(part.weight, part.at(step)) for part in self.parts]

    def pooled_at(self, step: int) -> list[Tensor] | None:
        """Each part's pooled embedding (1, P), where the family conditions on one (SDXL), else None."""
        if self.parts[0].pooled is None:
            return None
        return [part.pooled_at(step) for part in self.parts]

    @property
    def tokens(self) -> int:
        return self.parts[0].schedule[0][1].shape[1]


Contexts = dict[str, Tensor]  # each distinct text -> its context (1, 77k, width)


@dataclass(frozen=True)
class PromptEncoder:
    """Encodes prompts for one text encoder: A1111's syntax, chunks, emphasis and embeddings.

    `layer` is how the family uses the tower: "final" (SD 1.x/2.x: the last layer, or the one clip skip
    names, through the final norm) or "penultimate" (SDXL: the next-to-last layer without the final
    norm, and the pooled embedding where the tower has a projection; clip skip does not apply, as in
    A1111's default for SDXL)."""

    text_encoder: torch.nn.Module
    tokenizer: CLIPTokenizer
    embeddings: Mapping = None  # name -> sdtorch.adapters.textual_inversion.Embedding
    layer: str = "final"

    def chunks(self, text: str) -> list[PromptChunk]:
        lookup = EmbeddingLookup(self.embeddings, self.tokenizer) if self.embeddings else None
        return chunk_prompt(text, self.tokenizer, find_embedding=lookup)

    @torch.no_grad()
    def encode(
        self, texts: list[str], clip_skip: int = 1, emphasis: str = "original"
    ) -> tuple[Contexts, dict[str, Tensor] | None]:
        """Each distinct text -> its context (1, 77k, width), all padded to the same k, in one call; and,
        where the tower gives one, each text's pooled embedding (1, P), from its first chunk as in A1111."""
        distinct = list(dict.fromkeys(texts))
        chunked = [self.chunks(t) for t in distinct]
        count = max(len(c) for c in chunked)
        empty = empty_chunk(self.tokenizer)
        chunked = [c + [empty] * (count - len(c)) for c in chunked]
        flat = [chunk for chunks in chunked for chunk in chunks]
        z, pooled = self._encode_chunks(flat, clip_skip, emphasis)  # (texts * count, 77, width), (texts * count, P)
        width = z.shape[-1]
        z = z.reshape(len(distinct), count * z.shape[1], width)  # (texts, 77 * count, width)
        contexts = {text: z[i : i + 1] for i, text in enumerate(distinct)}
        if pooled is None:
            return contexts, None
        return contexts, {text: pooled[i * count : i * count + 1] for i, text in enumerate(distinct)}

    def _encode_chunks(self, chunks: list[PromptChunk], clip_skip: int, emphasis: str) -> tuple[Tensor, Tensor | None]:
        encoder = self.text_encoder
        device = next(encoder.parameters()).device
        ids = torch.tensor([c.ids for c in chunks], dtype=torch.long, device=device)  # (N, 77)
        tokens = encoder.embeddings.token_embedding(ids)  # (N, 77, width)
        for i, chunk in enumerate(chunks):
            for slot in chunk.embeddings:
                vectors = slot.embedding.vectors[: slot.n_vectors].to(tokens.device, tokens.dtype)
                tokens[i, slot.start : slot.start + len(vectors)] = vectors
        if self.layer == "penultimate":
            z, pooled = encoder.penultimate(ids, tokens=tokens)  # (N, 77, width), (N, P) or None
        else:
            z, pooled = encoder(tokens=tokens, clip_skip=clip_skip), None  # (N, 77, width)
        weights = torch.tensor([c.weights for c in chunks], dtype=torch.float32)  # (N, 77)
        if bool((weights == 1).all()):
            return z, pooled  # nothing emphasised: the context exactly as plain CLIP gives it
        return emphasise(z, weights.to(z.device), emphasis), pooled


@dataclass(frozen=True)
class DualPromptEncoder:
    """SDXL's two towers over the same prompts (sgm's GeneralConditioner, A1111's SDXL conditioner):
    each encodes with its own padding, the contexts are concatenated along the width (768 + 1280 = 2048),
    and the pooled embedding is the second tower's. Chunking is the first's (both tokenize alike)."""

    first: PromptEncoder
    second: PromptEncoder

    @property
    def tokenizer(self) -> CLIPTokenizer:
        return self.first.tokenizer

    @property
    def embeddings(self) -> Mapping:
        return self.first.embeddings

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.first.text_encoder

    def chunks(self, text: str) -> list[PromptChunk]:
        return self.first.chunks(text)

    @torch.no_grad()
    def encode(
        self, texts: list[str], clip_skip: int = 1, emphasis: str = "original"
    ) -> tuple[Contexts, dict[str, Tensor] | None]:
        first, _ = self.first.encode(texts, clip_skip, emphasis)
        second, pooled = self.second.encode(texts, clip_skip, emphasis)
        return {text: torch.cat([first[text], second[text].to(first[text].dtype)], dim=-1) for text in first}, pooled


def added_vector(pooled: Tensor, height: int, width: int, crop: tuple[int, int] = (0, 0), dim: int = 256) -> Tensor:
    """SDXL's vector `y` for the UNet's `label_emb`: the pooled text embedding (N, P) followed by the
    sinusoidal embeddings (`dim` wide each) of the original size (h, w), the crop's top-left corner and
    the target size (h, w), as sgm's ConcatTimestepEmbedderND and diffusers' `add_time_ids`. sdtorch
    conditions on original = target = the size generated, crop (0, 0): diffusers' and A1111's defaults."""
    numbers = torch.tensor([height, width, *crop, height, width], dtype=torch.float32, device=pooled.device)
    sizes = timestep_embedding(numbers, dim).reshape(1, -1)  # (1, 6 * dim)
    return torch.cat([pooled.float(), sizes.expand(pooled.shape[0], -1)], dim=1)


def emphasise(z: Tensor, weights: Tensor, emphasis: str = "original") -> Tensor:
    """A1111's emphasis (`sd_emphasis.py`): scale each token's vector by its weight; "original" then
    rescales each chunk so that its mean is what it was. z (N, 77, width), weights (N, 77)."""
    scaled = z * weights.unsqueeze(-1).to(z.dtype)
    if emphasis == "no_norm":
        return scaled
    before = z.float().mean(dim=(1, 2), keepdim=True)  # (N, 1, 1): one mean per chunk
    after = scaled.float().mean(dim=(1, 2), keepdim=True)
    return (scaled.float() * (before / after)).to(z.dtype)


def encode(
    encoder: PromptEncoder | DualPromptEncoder, prompt: str, negative_prompt: str | None, steps: int,
    clip_skip: int = 1, emphasis: str = "original", zero_empty_negative: bool = False,
) -> tuple[Conditioning, Conditioning | None]:
    """The conditioning of a prompt and (unless None: no guidance) of its negative prompt, over `steps`
    steps. The negative prompt has a schedule too but no AND parts, as in A1111. With
    `zero_empty_negative` (diffusers' SDXL `force_zeros_for_empty_prompt`), an empty negative prompt
    conditions on zeros (context and pooled) instead of on the encoded empty prompt."""
    parts = [(weight, prompt_schedule(text, steps)) for text, weight in split_and(prompt)]
    negative = prompt_schedule(negative_prompt, steps) if negative_prompt is not None else None
    texts = [text for _, schedule in parts for _, text in schedule]
    texts += [text for _, text in negative or ()]
    contexts, pooled = encoder.encode(texts, clip_skip, emphasis)

    def part(weight: float, schedule: list[tuple[int, str]], zeros: bool = False) -> Part:
        def value(table, text):
            return torch.zeros_like(table[text]) if zeros and text == "" else table[text]

        return Part(weight, tuple((last, value(contexts, text)) for last, text in schedule),
                    None if pooled is None else tuple((last, value(pooled, text)) for last, text in schedule))

    cond = Conditioning(tuple(part(w, s) for w, s in parts))
    uncond = Conditioning((part(1.0, negative, zero_empty_negative),)) if negative is not None else None
    return cond, uncond


def embeddings_in(encoder: PromptEncoder, texts: list[str]) -> list:
    """The textual-inversion embeddings these texts use, in order of first use."""
    if not encoder.embeddings:
        return []
    used = {}
    for text in texts:
        for chunk in encoder.chunks(text):
            for slot in chunk.embeddings:
                used.setdefault(slot.embedding.name, slot.embedding)
    return list(used.values())
