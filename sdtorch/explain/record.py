"""Recording one real generation: step events and cross-attention maps, without changing the result.

- `AttentionRecorder` goes through the attention seam (`sdtorch.layers.swapped_attention`): every
  cross-attention layer (`...attn2`) still computes its output with the default
  `sdtorch.layers.attention` (so the image is bit-for-bit what `generate` makes), and in addition
  the explicit softmax(q k^T / sqrt(d)) of the conditional rows of the batch. That is DAAM (Tang et
  al. 2022, arXiv 2210.04885): each layer's map is averaged over its heads, upsampled (bicubic) to
  the latent size and clamped at 0; the maps are summed over layers and steps and divided by the
  number of layer calls. Memory is bounded: one running sum (B, keys, h, w) for the whole run, one
  for the current step, and per step only the maps of the chosen tokens.
- `word_tokens` ties each word of a prompt to the token positions that the prompt's chunks give it
  (a word split into several tokens is the mean of its tokens).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from sdtorch.layers import attention
from sdtorch.samplers import StepEvent

CHUNK = 77  # ids per encoder chunk (BOS + 75 + EOS)


def layer_size(tokens: int, height: int, width: int) -> tuple[int, int]:
    """(h, w) of a UNet level with `tokens` spatial positions, for latents (height, width): each
    downsample halves a side, rounding up (stride-2 convolution with padding 1)."""
    h, w = height, width
    while h * w > tokens:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != tokens:
        raise ValueError(f"{tokens} positions are no level of {height}x{width} latents")
    return h, w


def layer_maps(q: Tensor, k: Tensor, heads: int, size: tuple[int, int]) -> Tensor:
    """DAAM's map of one cross-attention call: softmax(q k^T / sqrt(d)) averaged over heads, as
    (B, keys, h, w) upsampled bicubically to `size` and clamped at 0. q (B, T, C), k (B, K, C)."""
    b, t, c = q.shape
    d = c // heads
    qh = q.float().reshape(b, t, heads, d).transpose(1, 2)  # (B, heads, T, d)
    kh = k.float().reshape(b, k.shape[1], heads, d).transpose(1, 2)  # (B, heads, K, d)
    probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1).mean(1)  # (B, T, K)
    h, w = layer_size(t, *size)
    maps = probs.transpose(1, 2).reshape(b, k.shape[1], h, w)  # (B, K, h, w)
    if (h, w) != tuple(size):
        maps = F.interpolate(maps, size=size, mode="bicubic", align_corners=False)
    return maps.clamp(min=0)


@dataclass
class AttentionRecorder:
    """Records DAAM maps of the conditional rows while a generation runs (see the module docstring).

    `batch` images; `guided`: the batch holds the unconditional rows first (sdtorch.guidance), so
    the conditional ones (the first AND-part) are rows batch .. 2 * batch - 1. `keep`: key indices
    whose per-step maps are kept for `steps` (the chosen words' tokens)."""

    latent_size: tuple[int, int]
    batch: int
    guided: bool
    keep: list[int] = field(default_factory=list)
    enabled: bool = True
    total: Tensor | None = None  # (B, K, h, w) running sum over every call
    calls: int = 0
    step_sum: Tensor | None = None
    step_calls: int = 0
    steps: list[Tensor] = field(default_factory=list)  # per step: (B, len(keep), h, w) mean of that step
    layers: list[str] = field(default_factory=list)

    def choose(self, name: str, layer) -> object | None:
        """For `swapped_attention`: a recording function for the cross-attention layers only."""
        if not name.endswith("attn2"):
            return None
        self.layers.append(name)
        return self._attend

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
        out = attention(q, k, v, heads)  # the layer's output exactly as without recording
        if self.enabled:
            start = self.batch if self.guided else 0
            maps = layer_maps(q[start : start + self.batch], k[start : start + self.batch], heads, self.latent_size)
            self.step_sum = maps if self.step_sum is None else self.step_sum + maps
            self.step_calls += 1
        return out

    def __call__(self, event: StepEvent) -> None:
        """Close a step: add its sum to the run's, keep its mean maps of the chosen tokens."""
        if self.step_sum is None:
            return
        self.total = self.step_sum if self.total is None else self.total + self.step_sum
        self.calls += self.step_calls
        self.steps.append((self.step_sum[:, self.keep] / self.step_calls).cpu())
        self.step_sum, self.step_calls = None, 0

    def mean(self) -> Tensor:
        """(B, K, h, w): the maps averaged over heads, layers and steps."""
        if self.total is None:
            raise ValueError("no cross-attention call was recorded")
        return (self.total / self.calls).cpu()


@dataclass(frozen=True)
class WordTokens:
    word: str  # as written in the prompt
    name: str  # file-name safe, unique in the prompt ("a", "a-2", ...)
    positions: tuple[int, ...]  # key indices (77 * chunk + position in the chunk)


_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?", re.UNICODE)


def word_tokens(tokenizer, chunks, text: str) -> list[WordTokens]:
    """Each word of `text` (as the tokenizer sees it, A1111 syntax and <lora:...> tags removed by
    the caller) with the key indices of its tokens, found in order in the chunks' ids."""
    flat = [(c * CHUNK + j, i) for c, chunk in enumerate(chunks) for j, i in enumerate(chunk.ids)]
    cursor, out, seen = 0, [], {}
    for match in _WORD.finditer(text):
        word = match.group(0)
        ids = tokenizer.encode(word)
        if not ids:
            continue
        for start in range(cursor, len(flat) - len(ids) + 1):
            if [i for _, i in flat[start : start + len(ids)]] == ids:
                break
        else:
            continue  # not in the ids as a unit (e.g. merged with a neighbour): no map of its own
        cursor = start + len(ids)
        base = re.sub(r"[^a-z0-9]+", "-", word.lower()).strip("-") or "word"
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}-{seen[base]}"
        out.append(WordTokens(word, name, tuple(p for p, _ in flat[start : cursor])))
    return out


def word_map(maps: Tensor, positions: tuple[int, ...]) -> Tensor:
    """(..., K, h, w) token maps -> (..., h, w): the mean over a word's tokens."""
    return maps[..., list(positions), :, :].mean(-3)
