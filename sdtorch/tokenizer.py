"""CLIP's byte-level BPE tokenizer, which turns SD 1.x prompts into the (B, 77) ids its text encoder reads.

The algorithm follows OpenAI CLIP's `clip/simple_tokenizer.py` (Radford et al. 2021, MIT licence),
written afresh here:

1. clean the text: `ftfy.fix_text`, collapse whitespace, lower-case;
2. split it into pieces with CLIP's regex (letter runs, single digits, runs of other symbols,
   English contractions); whitespace only separates pieces and is dropped;
3. map each piece's UTF-8 bytes to printable characters (`bytes_to_unicode`), mark the last one
   with `</w>`, and apply the 48,894 ranked merges of `bpe_simple_vocab_16e6.txt.gz`, lowest rank
   first, until none applies;
4. look the resulting symbols up in the 49,408-entry vocabulary (256 bytes, the same with `</w>`,
   one token per merge, then `<|startoftext|>` 49406 and `<|endoftext|>` 49407).

Where transformers departs from OpenAI's file we follow transformers, because SD 1.x was trained
(CompVis `FrozenCLIPEmbedder`) and is run (A1111, diffusers) through its `CLIPTokenizer`:

- transformers 4's tokenizer (the default here, `fix_text=True`) skips OpenAI's double
  `html.unescape`; ftfy still unescapes entities unless the text contains '<'. It also finds
  `<|startoftext|>` / `<|endoftext|>` verbatim in the raw text before cleaning, so 'a:<|endoftext|>'
  ends in EOS where OpenAI's regex would read ':<|' as one symbol run.
- transformers 5's tokenizer (`fix_text=False`; what diffusers runs under transformers >= 5)
  uses NFC instead of ftfy and lower-cases character by character. It agrees with the default on
  ordinary prompts; they part on curly quotes (`I’m`), ligatures, full-width forms, mojibake, a
  word-final 'Σ', and HTML entities (`&amp;`).
"""

from __future__ import annotations

import functools
import gzip
import unicodedata
from collections.abc import Iterable
from importlib import resources

import ftfy
import regex
import torch

from sdtorch.errors import SdtorchError

VOCAB_RESOURCE = "data/clip/bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # CLIP uses the first 48,894 merges, so the vocabulary is 49,408 tokens
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# The pre-tokenizer: a special token, a contraction, a run of letters, ONE digit (numbers are spelt
# digit by digit), or a run of anything else that is not whitespace. OpenAI and transformers 4
# match case-insensitively (so "'ſ" is a contraction); transformers 5 does not.
_PIECES = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"""
_CLIP_PIECES = regex.compile(_PIECES, regex.IGNORECASE)
_NFC_PIECES = regex.compile(_PIECES)
_WHITESPACE = regex.compile(r"\s+")
_SPECIAL_SPLIT = regex.compile(f"({regex.escape(BOS)}|{regex.escape(EOS)})")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable character, so BPE symbols never contain spaces or controls.

    The 188 printable Latin-1 bytes stand for themselves; the other 68 take U+0100, U+0101, ... in
    byte order. The table is CLIP's (and GPT-2's); its order (printable bytes first) is the order
    of the first 256 vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    table = {b: chr(b) for b in [*printable, *range(ord("®"), ord("ÿ") + 1)]}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def ftfy_clean(text: str) -> str:
    """transformers 4's clean-up (OpenAI's without html.unescape): ftfy, one space per run, lower-case."""
    return _WHITESPACE.sub(" ", ftfy.fix_text(text)).strip().lower()


def nfc_clean(text: str) -> str:
    """transformers 5's normaliser: NFC, whitespace runs to one space, lower-case char by char."""
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
    # str.lower() turns a word-final capital sigma into 'ς'; the Rust normaliser maps each
    # character alone, so 'Σ' always becomes 'σ'. Only that rule depends on context.
    return "".join(c.lower() for c in text) if "Σ" in text else text.lower()


class CLIPTokenizer:
    """CLIP BPE over the real vocabulary; `tok(prompts)` gives the (B, 77) LongTensor SD 1.x reads.

    `pad_id` fills the tail after EOS: 49407 (EOS) as SD 1.x's openai/clip-vit-large-patch14
    tokenizer does; SD 2.x's OpenCLIP tokenizer pads with 0 ('!').
    """

    bos_id: int = 49406
    eos_id: int = 49407
    context_length: int = 77

    def __init__(self, pad_id: int = 49407, fix_text: bool = True) -> None:
        byte_chars = list(bytes_to_unicode().values())
        merges = _read_merges()
        vocab = [*byte_chars, *(c + "</w>" for c in byte_chars), *("".join(m) for m in merges), BOS, EOS]
        self._token_to_id = {token: i for i, token in enumerate(vocab)}
        self._id_to_token = vocab
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._byte_char = [bytes_to_unicode()[b] for b in range(256)]
        self._char_byte = {c: b for b, c in bytes_to_unicode().items()}
        self._cache: dict[str, list[int]] = {}
        self.pad_id = pad_id
        self.fix_text = fix_text
        assert len(vocab) == self.eos_id + 1 and self._token_to_id[BOS] == self.bos_id

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS and without truncation."""
        ids: list[int] = []
        for i, part in enumerate(_SPECIAL_SPLIT.split(text)):  # special tokens sit at odd indices
            if i % 2:
                ids.append(self._token_to_id[part])
            elif self.fix_text:
                ids += self._encode_pieces(_CLIP_PIECES.findall(ftfy_clean(part)), specials=True)
            else:
                ids += self._encode_pieces(_NFC_PIECES.findall(nfc_clean(part)), specials=False)
        return ids

    def __call__(self, texts: str | list[str], length: int = 77) -> torch.Tensor:
        """Ids (B, length) as BOS + up to length-2 tokens + EOS + padding; long prompts are cut."""
        if length < 2:
            raise SdtorchError(f"token length must be at least 2 (BOS and EOS), got {length}")
        texts = [texts] if isinstance(texts, str) else texts
        rows = []
        for text in texts:
            row = [self.bos_id, *self.encode(text)[: length - 2], self.eos_id]
            rows.append(row + [self.pad_id] * (length - len(row)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of `ids`: a leading BOS is skipped and decoding stops at the first EOS (so a padded
        row decodes to its prompt); each `</w>` becomes a space."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        data = bytearray()
        for token in map(self._id_to_token.__getitem__, ids):
            word_end = token.endswith("</w>")
            data += bytes(self._char_byte[c] for c in token.removesuffix("</w>")) + b" " * word_end
        return data.decode("utf-8", errors="replace").strip()

    def _encode_pieces(self, pieces: list[str], specials: bool) -> list[int]:
        ids: list[int] = []
        for piece in pieces:
            if piece not in (BOS, EOS):
                ids += self._bpe_ids(piece)
            elif specials:  # e.g. '<|ENDOFTEXT|>', lower-cased by the clean-up
                ids.append(self._token_to_id[piece])
            else:  # transformers 5's byte-level step re-splits it: '<|', 'endoftext', '|>'
                ids += [*self._bpe_ids("<|"), *self._bpe_ids(piece[2:-2]), *self._bpe_ids("|>")]
        return ids

    def _bpe_ids(self, piece: str) -> list[int]:
        """Ids of one pre-tokenized piece, memoised: prompts repeat the same words endlessly."""
        ids = self._cache.get(piece)
        if ids is None:
            word = "".join(self._byte_char[b] for b in piece.encode("utf-8"))
            ids = [self._token_to_id[s] for s in self._bpe(word)]
            if len(self._cache) >= 100_000:  # bound the memory of a long-running server
                self._cache.clear()
            self._cache[piece] = ids
        return ids

    def _bpe(self, word: str) -> list[str]:
        """Merge the lowest-ranked adjacent pair, every occurrence left to right, until none is ranked."""
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: self._ranks.get(p, N_MERGES))
            if pair not in self._ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols


def _read_merges() -> list[tuple[str, str]]:
    """The ranked merges shipped with the package; line 0 of the file is a version header."""
    data = (resources.files("sdtorch") / VOCAB_RESOURCE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]  # type: ignore[misc]


@functools.lru_cache(maxsize=4)
def get_tokenizer(pad_id: int = 49407) -> CLIPTokenizer:
    """The CLIP tokenizer (OpenAI clean-up), loaded once per process for each padding: EOS (SD 1.x's
    OpenAI CLIP) or 0 (SD 2.x's OpenCLIP)."""
    return CLIPTokenizer(pad_id=pad_id)
