"""A1111's 75-token chunks (modules/sd_hijack_clip.py tokenize_line), checked with concrete token
counts and, token by token, against a second implementation written from A1111's description."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from sdtorch.errors import SdtorchError
from sdtorch.prompt_chunks import (
    EmbeddingLookup,
    chunk_pieces,
    chunk_prompt,
    empty_chunk,
    pad_to_same_count,
)
from sdtorch.prompts import parse_prompt_attention
from sdtorch.tokenizer import get_tokenizer

BOS, EOS, COMMA = 49406, 49407, 267
TOK = get_tokenizer()
WORDS = ["one", "two", "three", "four", "five", "six", "cat", "dog"]  # one token each
ID = {w: TOK.encode(w)[0] for w in WORDS}


def content(chunk) -> list[int]:
    """The prompt ids of a chunk: between BOS and the first EOS."""
    assert chunk.ids[0] == BOS and len(chunk.ids) == 77 and len(chunk.weights) == 77
    ids = list(chunk.ids[1:])
    return ids[: ids.index(EOS)]


def test_encode_has_no_bos_or_eos():
    assert TOK.encode("cat, dog") == [ID["cat"], COMMA, ID["dog"]]


def test_empty_prompt_is_one_padded_chunk():
    (chunk,) = chunk_prompt("")
    assert chunk.ids == (BOS,) + (EOS,) * 76
    assert chunk.weights == (1.0,) * 77 and chunk.embeddings == ()
    assert chunk == empty_chunk()


def test_short_prompt_with_weights():
    (chunk,) = chunk_prompt("(cat:1.5) [dog]")
    assert content(chunk) == [ID["cat"], ID["dog"]]
    assert chunk.weights[:4] == (1.0, 1.5, 1 / 1.1, 1.0)
    assert set(chunk.weights[3:]) == {1.0}


def test_long_prompt_without_commas_cuts_at_75():
    prompt = " ".join(["cat"] * 100)
    first, second = chunk_prompt(prompt)
    assert content(first) == [ID["cat"]] * 75 and first.ids[76] == EOS  # BOS + 75 + EOS, no padding
    assert content(second) == [ID["cat"]] * 25 and second.ids[26:] == (EOS,) * 51


def test_exactly_75_tokens_is_one_chunk():
    assert len(chunk_prompt(" ".join(["cat"] * 75))) == 1
    assert len(chunk_prompt(" ".join(["cat"] * 76))) == 2


def test_comma_backtrack_moves_the_words_after_the_last_comma():
    # 11 groups of "one two three four five six," = 7 tokens each: the first chunk fills at 75
    # with the last comma at index 69; the 76th token is not a comma, so the 5 tokens after that
    # comma move to the second chunk and the first is padded from 70.
    group = "one two three four five six,"
    first, second = chunk_prompt(" ".join([group] * 12))
    group_ids = [ID[w] for w in WORDS[:6]] + [COMMA]
    assert content(first) == group_ids * 10  # 70 tokens
    assert content(second) == group_ids * 2  # the 11th group, whole, then the 12th
    assert first.ids[71:] == (EOS,) * 6


def test_eighty_comma_separated_words():
    # "cat, cat, ..." 80 times: 159 tokens. Chunk 1 fills at a word (index 74); the 76th token is a
    # comma, so no backtrack: chunk 2 starts with it. Chunk 2 fills at a comma, and the word after
    # it finds that comma within 20 tokens: a backtrack that moves nothing. Chunk 3 has the last 9.
    first, second, third = chunk_prompt(", ".join(["cat"] * 80))
    assert content(first) == [ID["cat"], COMMA] * 37 + [ID["cat"]]
    assert content(second) == [COMMA, ID["cat"]] * 37 + [COMMA]
    assert content(third) == [ID["cat"], COMMA] * 4 + [ID["cat"]]


def test_backtrack_too_far_back_cuts_in_the_middle():
    prompt = "cat, " + " ".join(["dog"] * 90)  # the only comma is 74 tokens before the end
    first, second = chunk_prompt(prompt)
    assert len(content(first)) == 75 and len(content(second)) == 17
    assert len(chunk_prompt(" ".join(["dog"] * 60) + ", " + " ".join(["cat"] * 30), comma_backtrack=0)[0].ids) == 77


def test_break_pads_the_chunk():
    first, second = chunk_prompt("a cat BREAK a dog")
    assert content(first) == TOK.encode("a cat") and content(second) == TOK.encode("a dog")
    assert len(chunk_prompt("a cat BREAK")) == 1
    assert [content(c) for c in chunk_prompt("BREAK a cat")] == [[], TOK.encode("a cat")]  # as A1111
    assert len(chunk_prompt("a (cat BREAK dog)")) == 1  # in brackets BREAK is a word (weight -1.1)


def test_sd2_padding_after_the_first_eos():
    (chunk,) = chunk_prompt("a cat", pad_id=0)
    assert chunk.ids[:4] == (BOS, *TOK.encode("a cat"), EOS) and chunk.ids[4:] == (0,) * 73
    full = chunk_prompt(" ".join(["cat"] * 75), pad_id=0)[0]
    assert full.ids[-1] == EOS  # no room for padding


def fake_embedding(n: int, name: str = "easynegative"):
    return SimpleNamespace(name=name, vectors=[[0.0]] * n)


def test_embedding_fills_its_rows():
    neg = fake_embedding(8)
    lookup = EmbeddingLookup({"EasyNegative": neg})
    (chunk,) = chunk_prompt("(EasyNegative:1.2), bad hands", find_embedding=lookup)
    assert chunk.ids[1:9] == (0,) * 8 and chunk.ids[9] == COMMA
    assert chunk.weights[1:9] == (1.2,) * 8 and chunk.weights[9] == 1.0
    (slot,) = chunk.embeddings
    assert (slot.start, slot.n_vectors, slot.embedding) == (1, 8, neg)


def test_longest_embedding_name_wins():
    short, long = fake_embedding(2, "bad"), fake_embedding(3, "bad hands")
    (chunk,) = chunk_prompt("bad hands bad", find_embedding=EmbeddingLookup({"bad": short, "bad hands": long}))
    assert [(s.start, s.embedding) for s in chunk.embeddings] == [(1, long), (4, short)]
    assert content(chunk) == [0] * 5


def test_embedding_never_straddles_chunks():
    emb = fake_embedding(8)
    first, second = chunk_prompt(
        " ".join(["cat"] * 70) + " easynegative", find_embedding=EmbeddingLookup({"easynegative": emb})
    )
    assert content(first) == [ID["cat"]] * 70 and first.embeddings == ()
    assert second.ids[1:9] == (0,) * 8 and [(s.start, s.n_vectors) for s in second.embeddings] == [(1, 8)]


def test_backtracked_embedding_moves_with_its_rows():
    # 66 words, a comma, the embedding (8 rows: the chunk is full at 75), then a word: the backtrack
    # moves the embedding's rows to the next chunk, and its record with them.
    emb = fake_embedding(8)
    prompt = " ".join(["cat"] * 66) + ", easynegative dog"
    first, second = chunk_prompt(prompt, find_embedding=EmbeddingLookup({"easynegative": emb}))
    assert content(first) == [ID["cat"]] * 66 + [COMMA] and first.embeddings == ()
    assert second.ids[1:10] == (0,) * 8 + (ID["dog"],)
    assert [(s.start, s.embedding) for s in second.embeddings] == [(1, emb)]


def test_too_many_vectors():
    with pytest.raises(SdtorchError, match="at most 75"):
        chunk_prompt("huge", find_embedding=EmbeddingLookup({"huge": fake_embedding(76, "huge")}))


def test_pad_prompt_and_negative_to_the_same_count():
    prompt, negative = chunk_prompt(" ".join(["cat"] * 100)), chunk_prompt("blurry")
    p, n = pad_to_same_count(prompt, negative)
    assert len(p) == len(n) == 2 and p == prompt and n[0] == negative[0] and n[1] == empty_chunk()
    n2, p2 = pad_to_same_count(negative, prompt)
    assert n2 == n and p2 == p


def reference_chunks(prompt: str, backtrack: int = 20) -> list[tuple[list[int], list[float]]]:
    """A1111's chunking as its description reads, kept separate from sdtorch's code: a flat run of
    (id, weight), a chunk closes at 75 (back at the last comma when it is within `backtrack`
    tokens and the token that overflows is not itself a comma) or at BREAK."""
    flat: list = []
    for text, weight in parse_prompt_attention(prompt):
        if text == "BREAK" and weight == -1:
            flat.append("BREAK")
        else:
            flat += [(i, weight) for i in TOK.encode(text)]
    chunks, current, comma_at = [], [], None
    for item in flat:
        if item == "BREAK":
            chunks.append(current)
            current, comma_at = [], None
            continue
        if len(current) == 75:
            if item[0] != COMMA and comma_at is not None and 75 - comma_at <= backtrack:
                chunks.append(current[: comma_at + 1])
                current = current[comma_at + 1 :]
            else:
                chunks.append(current)
                current = []
            comma_at = None
        if item[0] == COMMA:
            comma_at = len(current)
        current.append(item)
    if current or not chunks:
        chunks.append(current)
    out = []
    for c in chunks:
        ids = [BOS] + [i for i, _ in c] + [EOS] * (76 - len(c))
        out.append((ids, [1.0] + [w for _, w in c] + [1.0] * (76 - len(c))))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_chunks_token_by_token_against_the_description(seed):
    rng = random.Random(seed)
    vocabulary = ["cat", "dog", "a very long castle", ",", ",", "(red:1.3)", "[blue]", "BREAK", "((sky))", "x1"]
    for _ in range(50):
        prompt = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(0, 90)))
        ours = [(list(c.ids), list(c.weights)) for c in chunk_prompt(prompt)]
        assert ours == reference_chunks(prompt), prompt


def test_emphasis_none_reads_brackets_as_text():
    (plain,) = chunk_prompt("(cat:1.5)", weights=False)
    assert content(plain) == TOK.encode("(cat:1.5)") and set(plain.weights) == {1.0}
    assert [plain] == chunk_pieces([("(cat:1.5)", 1.0)])
