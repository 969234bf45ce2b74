"""Noise sources: the Philox-4x32-10 generator against Random123's known answers, A1111's test vector and (on an
NVIDIA GPU) CUDA's own torch.randn; A1111's ImageRNG semantics (per-image seeds, ENSD, variation seed, seed
resize) against what A1111's rng.py does with torch generators."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdtorch.errors import SdtorchError
from sdtorch.samplers.noise import A1111Noise, GeneratorNoise, create_generator, rng_source, slerp
from sdtorch.samplers.philox import PhiloxGenerator, philox4x32

# Random123 1.14, examples/kat_vectors: "philox4x32 10 <counter x4> <key x2> <expected x4>".
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
# A1111's modules/rng_philox.py docstring: Generator(0).randn((3, 4)), equal to torch.randn(3, 4) on CUDA, seed 0.
A1111_VECTOR = [
    [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
    [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
    [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
]
SHAPE = (4, 8, 12)


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_philox_known_answers(counter, key, expected):
    out = philox4x32(np.array(counter, dtype=np.uint32).reshape(4, 1), np.array(key, dtype=np.uint32).reshape(2, 1))
    assert tuple(int(v) for v in out[:, 0]) == expected


def test_philox_normals_equal_a1111s_test_vector():
    got = PhiloxGenerator(0).randn((3, 4))
    assert got.dtype == torch.float32 and got.shape == (3, 4)
    diff = (got.double() - torch.tensor(A1111_VECTOR, dtype=torch.float64)).abs().max().item()
    print(f"Philox seed 0 vs A1111's vector: max|diff| = {diff:.1e}")
    assert diff < 5e-7  # the vector is printed to 8 significant digits; one float32 ulp at 2.6 is 2.4e-7


def test_philox_draws_advance_and_seed_uses_both_words():
    g = PhiloxGenerator(0)
    first, second = g.randn((3, 4)), g.randn((3, 4))
    assert (first - second).abs().max() > 0.1  # the second draw is new numbers (counter word 0 is 1)
    again = PhiloxGenerator(0)
    assert torch.equal(again.randn((3, 4)), first) and torch.equal(again.randn((3, 4)), second)
    # the element index is the counter's third word: a longer draw extends a shorter one
    assert torch.equal(PhiloxGenerator(7).randn((20,))[:12], PhiloxGenerator(7).randn((3, 4)).flatten())
    assert not torch.equal(PhiloxGenerator(2**32 + 7).randn((12,)), PhiloxGenerator(7).randn((12,)))
    big = PhiloxGenerator(3).randn((4, 64, 64))
    assert abs(big.mean().item()) < 0.03 and abs(big.std().item() - 1) < 0.03


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device here: CUDA's torch.randn cannot be compared (the A1111 vector stands in)")
def test_philox_equals_torch_randn_on_cuda():
    for seed, shape in ((0, (3, 4)), (1234, (4, 64, 64)), (2**40 + 5, (4, 96, 64))):
        g = torch.Generator("cuda").manual_seed(seed)
        ours = PhiloxGenerator(seed)
        for draw in range(3):  # the offset advances by one per call, as CUDA's does
            theirs = torch.randn(shape, generator=g, device="cuda").cpu()
            mine = ours.randn(shape)
            print(f"seed {seed} {shape} draw {draw}: max|diff| {(mine - theirs).abs().max().item():.1e}")
            assert torch.allclose(mine, theirs, atol=1e-5, rtol=0), (seed, shape, draw)


def test_rng_names():
    assert [rng_source(n) for n in ("CPU", "gpu", " NV ")] == ["cpu", "gpu", "nv"]
    with pytest.raises(SdtorchError, match="unknown RNG 'tpu'; accepted: cpu, gpu, nv"):
        rng_source("tpu")
    assert isinstance(create_generator("cpu", 1), torch.Generator)
    assert isinstance(create_generator("nv", 1), PhiloxGenerator)


def test_default_mode_noise_from_a_philox_generator():
    like = torch.zeros(2, *SHAPE)
    noise = GeneratorNoise(like, [PhiloxGenerator(5), PhiloxGenerator(6)])()
    assert torch.equal(noise, torch.stack([PhiloxGenerator(5).randn(SHAPE), PhiloxGenerator(6).randn(SHAPE)]))


# --- A1111's ImageRNG ------------------------------------------------------------------------------------


def cpu_draws(seed: int, n: int, shape=SHAPE) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("rng", ["cpu", "gpu"])
def test_per_image_generators_and_ensd(rng):
    def draws(seed, n):
        if rng == "cpu":
            return cpu_draws(seed, n)
        g = PhiloxGenerator(seed)
        return [g.randn(SHAPE) for _ in range(n)]

    plain = A1111Noise(SHAPE, [10, 11], rng)
    got = [plain.first(), plain(), plain()]
    for i, seed in enumerate((10, 11)):
        assert all(torch.equal(got[k][i], draws(seed, 3)[k]) for k in range(3))
    ensd = A1111Noise(SHAPE, [10, 11], rng, ensd=31337)
    got = [ensd.first(), ensd(), ensd()]
    for i, seed in enumerate((10, 11)):
        assert torch.equal(got[0][i], draws(seed, 1)[0])  # the start is the seed's
        after = draws(seed + 31337, 2)  # then the generator is reseeded with seed + ENSD
        assert torch.equal(got[1][i], after[0]) and torch.equal(got[2][i], after[1])


def test_variation_seed_mixes_by_a1111s_slerp():
    base, sub = cpu_draws(10, 1)[0], cpu_draws(99, 1)[0]
    none = A1111Noise(SHAPE, [10], subseeds=[99], subseed_strength=0.0).first()[0]
    assert torch.equal(none, base)
    full = A1111Noise(SHAPE, [10], subseeds=[99], subseed_strength=1.0).first()[0]
    assert torch.allclose(full, sub, atol=1e-5)
    half = A1111Noise(SHAPE, [10], subseeds=[99], subseed_strength=0.5).first()[0]
    # spherical: the halfway noise keeps about unit variance, where a straight average would shrink it by ~0.7
    assert abs(half.std().item() - 1) < 0.15 and not torch.allclose(half, (base + sub) / 2, atol=1e-3)
    # A1111's quirk: nearly parallel noise falls back to low * val + high * (1 - val), weights reversed
    low = base
    high = base + 1e-3 * sub
    assert torch.allclose(slerp(0.2, low, high), 0.2 * low + 0.8 * high)
    assert not torch.allclose(slerp(0.2, low, high), 0.8 * low + 0.2 * high, atol=1e-5)


def test_seed_resize_from_pastes_the_old_sizes_noise_in_the_middle():
    shape = (4, 12, 16)  # (C, H/8, W/8) for 128x96
    same = A1111Noise(shape, [3], seed_resize_from=(128, 96)).first()[0]
    assert torch.equal(same, cpu_draws(3, 1, shape)[0])
    small = A1111Noise(shape, [3], seed_resize_from=(64, 64)).first()[0]  # old noise (4, 8, 8)
    old = cpu_draws(3, 1, (4, 8, 8))[0]
    assert torch.equal(small[:, 2:10, 4:12], old)  # centred: dy = (12 - 8) // 2, dx = (16 - 8) // 2
    outside = cpu_draws(3, 1, shape)[0]
    assert torch.equal(small[:, :2], outside[:, :2]) and torch.equal(small[:, :, :4], outside[:, :, :4])
    big = A1111Noise((4, 8, 8), [3], seed_resize_from=(128, 96)).first()[0]  # old noise larger: cropped
    assert torch.equal(big, cpu_draws(3, 1, (4, 12, 16))[0][:, 2:10, 4:12])
