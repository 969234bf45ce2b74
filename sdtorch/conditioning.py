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

from sdtorch.prompt_chunks import EmbeddingLookup, PromptChunk, chunk_prompt, empty_chunk
from sdtorch.prompts import prompt_schedule, split_and
from sdtorch.tokenizer import CLIPTokenizer

EMPHASIS = {"original": "Original", "no_norm": "No norm"}  # ours -> A1111's label (infotext "Emphasis")


@dataclass(frozen=True)
class Part:
    """One AND-part of a prompt: its weight, and its contexts over the steps as [(last_step, context)],
    context (1, T, width), steps 1-based and counted as A1111 counts them (model calls)."""

    weight: float
    schedule: tuple[tuple[int, Tensor], ...]

    def at(self, step: int) -> Tensor:
        for last, context in self.schedule:
            if step <= last:
                return context
        return self.schedule[-1][1]  # past the planned steps (e.g. a second-order sampler's extra calls)


@dataclass(frozen=True)
class Conditioning:
    """What one prompt conditions the UNet on, step by step: its parts (one unless the prompt has AND);
    `pooled` (1, width) where a family conditions on a pooled text embedding too (SDXL; None here)."""

    parts: tuple[Part, ...]
    pooled: Tensor | None = None

    def at(self, step: int) -> list[tuple[float, Tensor]]:
        return [(part.weight, part.at(step)) for part in self.parts]

    @property
    def tokens(self) -> int:
        return self.parts[0].schedule[0][1].shape[1]


@dataclass(frozen=True)
class PromptEncoder:
    """Encodes prompts for one text encoder: A1111's syntax, chunks, emphasis and embeddings."""

    text_encoder: torch.nn.Module
    tokenizer: CLIPTokenizer
    embeddings: Mapping = None  # name -> sdtorch.adapters.textual_inversion.Embedding

    def chunks(self, text: str) -> list[PromptChunk]:
        lookup = EmbeddingLookup(self.embeddings, self.tokenizer) if self.embeddings else None
        return chunk_prompt(text, self.tokenizer, find_embedding=lookup)

    @torch.no_grad()
    def encode(self, texts: list[str], clip_skip: int = 1, emphasis: str = "original") -> dict[str, Tensor]:
        """Each distinct text -> its context (1, 77k, width), all padded to the same k, in one call."""
        distinct = list(dict.fromkeys(texts))
        chunked = [self.chunks(t) for t in distinct]
        count = max(len(c) for c in chunked)
        empty = empty_chunk(self.tokenizer)
        chunked = [c + [empty] * (count - len(c)) for c in chunked]
        flat = [chunk for chunks in chunked for chunk in chunks]
        z = self._encode_chunks(flat, clip_skip, emphasis)  # (texts * count, 77, width)
        width = z.shape[-1]
        z = z.reshape(len(distinct), count * z.shape[1], width)  # (texts, 77 * count, width)
        return {text: z[i : i + 1] for i, text in enumerate(distinct)}

    def _encode_chunks(self, chunks: list[PromptChunk], clip_skip: int, emphasis: str) -> Tensor:
        encoder = self.text_encoder
        device = next(encoder.parameters()).device
        ids = torch.tensor([c.ids for c in chunks], dtype=torch.long, device=device)  # (N, 77)
        tokens = encoder.embeddings.token_embedding(ids)  # (N, 77, width)
        for i, chunk in enumerate(chunks):
            for slot in chunk.embeddings:
                vectors = slot.embedding.vectors[: slot.n_vectors].to(tokens.device, tokens.dtype)
                tokens[i, slot.start : slot.start + len(vectors)] = vectors
        z = encoder(tokens=tokens, clip_skip=clip_skip)  # (N, 77, width)
        weights = torch.tensor([c.weights for c in chunks], dtype=torch.float32)  # (N, 77)
        if bool((weights == 1).all()):
            return z  # nothing emphasised: the context exactly as plain CLIP gives it
        return emphasise(z, weights.to(z.device), emphasis)


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
    encoder: PromptEncoder, prompt: str, negative_prompt: str | None, steps: int, clip_skip: int = 1,
    emphasis: str = "original",
) -> tuple[Conditioning, Conditioning | None]:
    """The conditioning of a prompt and (unless None: no guidance) of its negative prompt, over `steps`
    steps. The negative prompt has a schedule too but no AND parts, as in A1111."""
    parts = [(weight, prompt_schedule(text, steps)) for text, weight in split_and(prompt)]
    negative = prompt_schedule(negative_prompt, steps) if negative_prompt is not None else None
    texts = [text for _, schedule in parts for _, text in schedule]
    texts += [text for _, text in negative or ()]
    contexts = encoder.encode(texts, clip_skip, emphasis)

    def part(weight: float, schedule: list[tuple[int, str]]) -> Part:
        return Part(weight, tuple((last, contexts[text]) for last, text in schedule))

    cond = Conditioning(tuple(part(w, s) for w, s in parts))
    uncond = Conditioning((part(1.0, negative),)) if negative is not None else None
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
