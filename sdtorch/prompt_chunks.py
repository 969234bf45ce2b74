"""Weighted prompt pieces -> 77-token chunks, as AUTOMATIC1111 cuts long prompts.

A1111 (`modules/sd_hijack_clip.py`, `tokenize_line`; re-implemented from its behaviour) tokenizes
each weighted piece alone and fills chunks of 75 tokens, each then written as BOS + 75 + EOS = 77
ids with one weight per id (1.0 for BOS, EOS and padding), and encoded alone by the text encoder:

- a chunk that is full while the prompt goes on closes at its last comma, if that comma is among
  its last `comma_backtrack` (20) tokens: the tokens after the comma open the next chunk;
- `BREAK` closes the current chunk (padded), even an empty one;
- a textual-inversion embedding never straddles two chunks: if its vectors do not fit, the chunk
  closes first. Its positions hold a placeholder id (0, as A1111) and are listed in the chunk's
  `embeddings`, for the text encoder to take those input embeddings from the embedding instead;
- an empty prompt is one chunk: BOS, then EOS to the end.

One departure: when a comma backtrack moves an embedding to the next chunk, A1111 leaves its
record behind in the old chunk (its vectors then land in the old chunk's padding, and the new
chunk reads placeholder tokens). Here the record moves with the embedding's positions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sdtorch.errors import SdtorchError
from sdtorch.prompts import BREAK, parse_prompt_attention
from sdtorch.tokenizer import CLIPTokenizer, get_tokenizer

CHUNK_TOKENS = 75  # prompt tokens per chunk; + BOS + EOS = 77
COMMA_BACKTRACK = 20  # A1111's `comma_padding_backtrack` default
PLACEHOLDER_ID = 0  # the id A1111 writes where embedding vectors go


class EmbeddingMatch(NamedTuple):
    """An embedding found in the token ids: its object, how many ids its name took, how many vectors it has."""

    embedding: Any
    n_tokens: int
    n_vectors: int


# ids, position -> the embedding whose name starts there, or None (A1111's find_embedding_at_position).
FindEmbedding = Callable[[Sequence[int], int], "EmbeddingMatch | None"]


@dataclass(frozen=True)
class EmbeddingSlot:
    """Rows `start` .. `start + n_vectors - 1` of a 77-long chunk (0 is BOS) take `embedding`'s vectors."""

    start: int
    n_vectors: int
    embedding: Any


@dataclass(frozen=True)
class PromptChunk:
    """One encoder input: 77 ids, their 77 weights, and the rows filled by embeddings."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    embeddings: tuple[EmbeddingSlot, ...] = ()


class EmbeddingLookup:
    """Find textual-inversion embeddings by name in token ids, as A1111's `EmbeddingDatabase` does:
    each name is tokenized; at a position, the longest name whose ids start there wins (the first
    registered among equal lengths). An embedding is any object whose `vectors` has one row per
    vector (`sdtorch.adapters.textual_inversion.Embedding`)."""

    def __init__(self, embeddings: Mapping[str, Any], tokenizer: CLIPTokenizer | None = None):
        tokenizer = tokenizer or get_tokenizer()
        self._by_first: dict[int, list[tuple[list[int], Any]]] = {}
        for name, embedding in embeddings.items():
            ids = tokenizer.encode(name)
            if not ids:
                continue  # a name that tokenizes to nothing can never be written in a prompt
            candidates = self._by_first.setdefault(ids[0], [])
            candidates.append((ids, embedding))
            candidates.sort(key=lambda c: len(c[0]), reverse=True)  # stable: earlier first among equals

    def __call__(self, ids: Sequence[int], position: int) -> EmbeddingMatch | None:
        for name_ids, embedding in self._by_first.get(ids[position], ()):
            if list(ids[position : position + len(name_ids)]) == name_ids:
                return EmbeddingMatch(embedding, len(name_ids), len(embedding.vectors))
        return None


@dataclass
class _Building:
    """The chunk being filled: prompt tokens only (no BOS/EOS yet)."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    slots: list[EmbeddingSlot] = field(default_factory=list)  # start counted without BOS


def chunk_pieces(
    pieces: Sequence[tuple[str, float]],
    tokenizer: CLIPTokenizer | None = None,
    *,
    find_embedding: FindEmbedding | None = None,
    comma_backtrack: int = COMMA_BACKTRACK,
    pad_id: int | None = None,
) -> list[PromptChunk]:
    """Weighted pieces (from `parse_prompt_attention`) -> chunks, as A1111's `tokenize_line`.

    `pad_id` fills the rows after the first EOS (default: the tokenizer's, EOS for SD 1.x; SD 2.x
    pads with 0, as A1111 then rewrites every row after the first EOS). `comma_backtrack` 0 turns
    comma backtracking off.
    """
    tokenizer = tokenizer or get_tokenizer()
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    pad = tokenizer.pad_id if pad_id is None else pad_id
    comma = tokenizer.encode(",")[0]
    chunks: list[PromptChunk] = []
    chunk = _Building()
    last_comma = -1

    def close() -> None:
        nonlocal chunk, last_comma
        chunks.append(_finish(chunk, bos, eos, pad))
        chunk, last_comma = _Building(), -1

    for text, weight in pieces:
        if (text, weight) == BREAK:
            close()
            continue
        ids = tokenizer.encode(text)
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == comma:
                last_comma = len(chunk.ids)
            elif (
                comma_backtrack
                and len(chunk.ids) == CHUNK_TOKENS
                and last_comma != -1
                and len(chunk.ids) - last_comma <= comma_backtrack
            ):
                chunk, moved = _split_after(chunk, last_comma + 1)
                close()
                chunk = moved
            if len(chunk.ids) == CHUNK_TOKENS:
                close()

            match = find_embedding(ids, position) if find_embedding else None
            if match is None:
                chunk.ids.append(token)
                chunk.weights.append(weight)
                position += 1
                continue
            if match.n_vectors > CHUNK_TOKENS:
                raise SdtorchError(
                    f"embedding {getattr(match.embedding, 'name', '?')!r} has {match.n_vectors} vectors; "
                    f"at most {CHUNK_TOKENS} fit in one chunk"
                )
            if len(chunk.ids) + match.n_vectors > CHUNK_TOKENS:
                close()
            chunk.slots.append(EmbeddingSlot(len(chunk.ids), match.n_vectors, match.embedding))
            chunk.ids += [PLACEHOLDER_ID] * match.n_vectors
            chunk.weights += [weight] * match.n_vectors
            position += match.n_tokens

    if chunk.ids or not chunks:
        close()
    return chunks


def chunk_prompt(
    prompt: str,
    tokenizer: CLIPTokenizer | None = None,
    *,
    find_embedding: FindEmbedding | None = None,
    comma_backtrack: int = COMMA_BACKTRACK,
    pad_id: int | None = None,
    weights: bool = True,
) -> list[PromptChunk]:
    """A prompt's text -> chunks: A1111's weights and BREAK parsed first (`weights=False` reads the
    text as it is, A1111's emphasis "None")."""
    pieces = parse_prompt_attention(prompt) if weights else [(prompt, 1.0)]
    return chunk_pieces(
        pieces, tokenizer, find_embedding=find_embedding, comma_backtrack=comma_backtrack, pad_id=pad_id
    )


def empty_chunk(tokenizer: CLIPTokenizer | None = None, pad_id: int | None = None) -> PromptChunk:
    """The chunk of an empty prompt: BOS then EOS (and padding) to 77."""
    tokenizer = tokenizer or get_tokenizer()
    pad = tokenizer.pad_id if pad_id is None else pad_id
    return _finish(_Building(), tokenizer.bos_id, tokenizer.eos_id, pad)


def pad_to_same_count(
    prompt: list[PromptChunk], negative: list[PromptChunk], empty: PromptChunk | None = None
) -> tuple[list[PromptChunk], list[PromptChunk]]:
    """Append empty chunks to the shorter list so both have as many chunks (A1111's "Pad
    prompt/negative prompt" option, infotext "Pad conds: True"; with it off, A1111's default, the
    two contexts keep their own lengths and the UNet runs them in separate passes)."""
    empty = empty or empty_chunk()
    count = max(len(prompt), len(negative))
    return prompt + [empty] * (count - len(prompt)), negative + [empty] * (count - len(negative))


def _split_after(chunk: _Building, cut: int) -> tuple[_Building, _Building]:
    """The chunk cut at `cut`: its head, and the tail (with the embeddings that start in it)."""
    head = _Building(chunk.ids[:cut], chunk.weights[:cut], [s for s in chunk.slots if s.start < cut])
    moved = [EmbeddingSlot(s.start - cut, s.n_vectors, s.embedding) for s in chunk.slots if s.start >= cut]
    return head, _Building(chunk.ids[cut:], chunk.weights[cut:], moved)


def _finish(chunk: _Building, bos: int, eos: int, pad: int) -> PromptChunk:
    """BOS + tokens + EOS padding to 75 + EOS; rows after the first EOS become `pad`."""
    n = len(chunk.ids)
    fill = max(CHUNK_TOKENS - n, 0)
    ids = [bos, *chunk.ids, *[eos] * fill, eos]  # (77,)
    weights = (1.0, *chunk.weights, *[1.0] * fill, 1.0)
    if pad != eos:
        first_eos = ids.index(eos, 1)
        ids[first_eos + 1 :] = [pad] * (len(ids) - first_eos - 1)
    slots = tuple(EmbeddingSlot(s.start + 1, s.n_vectors, s.embedding) for s in chunk.slots)
    return PromptChunk(tuple(ids), weights, slots)
