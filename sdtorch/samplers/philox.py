"""Philox-4x32-10 counter-based random numbers with a Box-Muller transform: the standard normals CUDA's
`torch.randn` gives for a seed, computed on any device (AUTOMATIC1111's "NV" noise source, its
modules/rng_philox.py; the default "GPU" source on an NVIDIA card gives the same numbers).

Philox (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3") is a bijection of a 128-bit
counter under a 64-bit key: 10 rounds of two 32x32->64-bit multiplications, the key bumped by the Weyl
constants between rounds. Element i of draw number k (counted per generator) uses the counter
(k, 0, i, 0) and the key (low 32 bits of the seed, high 32 bits); its first two output words become one
normal by Box-Muller's sine branch, in float64, rounded to float32 (Box & Muller 1958).
"""

from __future__ import annotations

import math

import numpy as np
import torch

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)  # the round multipliers
_W0, _W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)  # the key increments (golden ratio, sqrt 3 - 1)
_U_SCALE = 2.0**-32  # exact in float32
_V_SCALE = float(np.float32(2.0**-32 * 2 * math.pi))  # float32-rounded, as CUDA's constant is
_MASK = np.uint64(0xFFFFFFFF)


def philox4x32(counter: np.ndarray, key: np.ndarray, rounds: int = 10) -> np.ndarray:
    """Philox-4x32 over columns: counter (4, n) uint32, key (2, n) uint32 -> (4, n) uint32 (inputs untouched)."""
    c0, c1, c2, c3 = (counter[i].copy() for i in range(4))
    k0, k1 = key[0].copy(), key[1].copy()
    for r in range(rounds):
        v1 = c0.astype(np.uint64) * _M0
        v2 = c2.astype(np.uint64) * _M1
        c0, c1, c2, c3 = (
            (v2 >> np.uint64(32)).astype(np.uint32) ^ c1 ^ k0,
            (v2 & _MASK).astype(np.uint32),
            (v1 >> np.uint64(32)).astype(np.uint32) ^ c3 ^ k1,
            (v1 & _MASK).astype(np.uint32),
        )
        if r < rounds - 1:
            k0, k1 = k0 + _W0, k1 + _W1  # wraps modulo 2^32
    return np.stack([c0, c1, c2, c3])


def box_muller(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Two uint32 words -> one standard normal: sqrt(-2 ln u) sin(2 pi v), u and v mid-bin in (0, 1); float32."""
    u = x * _U_SCALE + _U_SCALE / 2
    v = y * _V_SCALE + _V_SCALE / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


class PhiloxGenerator:
    """A seeded source of standard normals equal to CUDA's `torch.randn` for that seed: each `randn` call is
    one draw (its counter's first word), as `torch.Generator('cuda').manual_seed(seed)` followed by
    `torch.randn(shape, generator=g, device='cuda')` calls."""

    device = torch.device("cpu")

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.offset = 0  # draws made so far

    def randn(self, shape) -> torch.Tensor:
        """The next draw: standard normals of `shape`, float32 on the CPU."""
        n = math.prod(shape)
        if n >= 2**32:
            raise ValueError(f"a draw of {n} numbers is more than one Philox stream holds (2^32)")
        counter = np.zeros((4, n), dtype=np.uint32)
        counter[0] = np.uint32(self.offset % 2**32)
        counter[2] = np.arange(n, dtype=np.uint32)
        seed = self.seed % 2**64
        key = np.empty((2, n), dtype=np.uint32)
        key[0], key[1] = seed & 0xFFFFFFFF, seed >> 32
        self.offset += 1
        out = philox4x32(counter, key)
        return torch.from_numpy(box_muller(out[0], out[1]).reshape(tuple(shape)))
