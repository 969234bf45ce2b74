"""Memory before work (sdtorch.memory): estimates against the tensors really alive, one line for what cannot
fit, batches in chunks that give the images of one run, and networks released after their last use."""

from __future__ import annotations

import math
import platform
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sdtorch import cli, memory, tiling
from sdtorch.config import SD15, TINY
from sdtorch.errors import SdtorchError
from sdtorch.pipeline import Pipeline
from sdtorch.request import GenerationRequest
from sdtorch.unet import UNet
from sdtorch.vae import AutoencoderKL

PROMPT = "a red circle on a blue background"


class LiveTensors(TorchDispatchMode):
    """The peak of the bytes held by tensors the ops under it create (their storages, freed when collected)."""

    def __init__(self, existing=()):
        super().__init__()
        self.live = self.peak = 0
        self.seen = {t.untyped_storage().data_ptr() for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if key not in self.seen and size:
                    self.seen.add(key)
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, size)
        return out

    def _free(self, key, size):
        self.live -= size
        self.seen.discard(key)


def empty_network(kind, cfg):
    """A network of `cfg` with small random weights, built without initialising it (fast even for SD 1.5)."""
    with torch.device("meta"):
        net = kind(cfg)
    net = net.to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.01)
    return net


def live_peak(net, run) -> int:
    tracker = LiveTensors([*net.parameters(), *net.buffers()])
    with torch.no_grad(), tracker:
        run()
    return tracker.peak


@pytest.mark.parametrize("cfg, latent, rows", [(TINY, 32, 2), (TINY, 64, 1), (SD15, 16, 2)],
                         ids=["tiny-32", "tiny-64", "sd15-16"])
def test_unet_estimate_covers_the_live_tensors_with_little_to_spare(cfg, latent, rows):
    unet = empty_network(UNet, cfg.unet)
    x, ctx = torch.randn(rows, 4, latent, latent), torch.randn(rows, 77, cfg.unet.context_dim)
    peak = live_peak(unet, lambda: unet(x, torch.full((rows,), 500.0), ctx))
    estimate = rows * memory.unet_bytes_per_row(cfg.unet, latent, latent, 4, memory._unet_scores(unet))
    assert peak <= estimate <= 1.5 * peak, (peak, estimate)


@pytest.mark.parametrize("op, kind", [("decode", "whole"), ("decode", "exact"), ("encode", "whole"),
                                      ("encode", "exact")])
def test_vae_estimate_covers_the_live_tensors_with_little_to_spare(op, kind):
    vae = empty_network(AutoencoderKL, SD15.vae)
    side = 128
    z, images = torch.randn(1, 4, side // 8, side // 8), torch.rand(1, 3, side, side)
    run = {("decode", "whole"): lambda: vae.decode(z), ("decode", "exact"): lambda: tiling.decode_exact(vae, z),
           ("encode", "whole"): lambda: vae.encode(images),
           ("encode", "exact"): lambda: tiling.encode_exact(vae, images)}
    peak = live_peak(vae, run[op, kind])
    estimate = memory.vae_bytes(SD15.vae, op, kind, side, side, 4, memory._vae_scores(vae, op))
    assert peak <= estimate - memory.VAE_FIXED <= 1.8 * peak, (peak, estimate)


def test_available_memory_is_read_and_a_limit_caps_it():
    free = memory.available_bytes()
    assert free is None or free > 0
    with memory.memory_limit(12345):
        assert memory.available_bytes() == 12345 if free is None else min(free, 12345)


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return Pipeline.load(tiny_checkpoint, device="cpu")


def limit_for(pipe, request, per_chunk: int, hold_results: bool = True) -> int:
    """The smallest memory limit at which the plan samples `per_chunk` images at once."""
    request = request.resolved(pipe.model)
    lo, hi = 1, 2**40
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            fits = memory.plan(pipe.model, request, available=mid, hold_results=hold_results).per_chunk >= per_chunk
        except SdtorchError:
            fits = False
        lo, hi = (lo, mid) if fits else (mid + 1, hi)
    return lo


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(image) for image in result.images]


@pytest.mark.parametrize("settings", [
    dict(sampler="euler_a"),
    dict(sampler="dpmpp_2m_sde", compat="a1111", variation_seed=77, variation_strength=0.3),
    dict(sampler="euler", init_image="picture", strength=0.6),
], ids=["diffusers", "a1111-variation", "img2img"])
def test_a_batch_larger_than_memory_runs_in_chunks_with_the_images_of_one_run(pipe, settings):
    from PIL import Image

    if settings.get("init_image") == "picture":
        settings = settings | {"init_image": Image.new("RGB", (32, 32), (200, 40, 90))}
    request = GenerationRequest(prompt=PROMPT, steps=3, seed=11, batch=5, **settings)
    whole = pipe.run(request)
    pipe.memory_limit = limit_for(pipe, request, 2)
    try:
        assert pipe.plan(request.resolved(pipe.model)).per_chunk == 2
        chunked = pipe.run(request)
    finally:
        pipe.memory_limit = None
    assert chunked.seeds == whole.seeds and [r.seed for r in chunked.per_image()] == [r.seed for r in whole.per_image()]
    assert [r.variation_seed for r in chunked.per_image()] == [r.variation_seed for r in whole.per_image()]
    # The same numbers but for the float rounding of kernels that block a batch of 4 rows differently from one
    # of 10: a level now and then where a value sits on a rounding edge, never more.
    differences = [np.abs(a.astype(np.int16) - b) for a, b in zip(pixels(chunked), pixels(whole))]
    assert max(d.max() for d in differences) <= 1 and np.mean([(d > 0).mean() for d in differences]) < 1e-3
    torch.testing.assert_close(chunked.latents, whole.latents, rtol=0, atol=1e-4)


def test_what_cannot_fit_even_once_is_one_line_before_any_work(tiny_checkpoint, capsys):
    code = cli.main(["generate", "x", "--model", str(tiny_checkpoint), "--width", "8192", "--height", "8192",
                     "--steps", "1", "--out", "/tmp/never.png"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("sdtorch: error: a 8192x8192 image needs about ")
    assert "GB of memory beyond the loaded model (the UNet's activations) and " in err
    assert "GB is available; use a smaller size (about " in err and "x" in err.split("about ")[-1]


def test_the_advice_fits(pipe):
    request = GenerationRequest(prompt=PROMPT, steps=1, seed=1, width=512, height=384).resolved(pipe.model)
    need = memory.plan(pipe.model, request, available=2**40).need_one
    with pytest.raises(SdtorchError, match=r"use a smaller size \(about (\d+)x(\d+) fits here\)") as caught:
        memory.plan(pipe.model, request, available=need // 2)
    width, height = map(int, caught.value.args[0].rsplit("about ", 1)[1].split(" ")[0].split("x"))
    assert width < 512 and height < 384 and abs(width / height - 512 / 384) < 0.2
    smaller = request.replace(width=width, height=height)
    assert memory.plan(pipe.model, smaller, available=need // 2).per_chunk == 1


def test_the_pictures_one_call_returns_are_counted(pipe):
    request = GenerationRequest(prompt=PROMPT, steps=1, seed=1, batch=100_000).resolved(pipe.model)
    limit = limit_for(pipe, request.replace(batch=1), 1)
    with pytest.raises(SdtorchError, match=r"the 100000 pictures of one call .* ask for at most \d+ images per call"):
        memory.plan(pipe.model, request, available=limit * 2)
    assert memory.plan(pipe.model, request, available=limit * 2, hold_results=False).per_chunk >= 1


def test_a_sampler_that_steps_the_batch_as_one_is_not_chunked(pipe):
    request = GenerationRequest(prompt=PROMPT, steps=2, seed=1, batch=6, sampler="dpm_adaptive", compat="a1111")
    pipe.memory_limit = limit_for(pipe, request.replace(sampler="euler_a"), 2)
    try:
        with pytest.raises(SdtorchError, match="dpm_adaptive sampler steps a batch as one .* at most 2 images"):
            pipe.run(request)
    finally:
        pipe.memory_limit = None


def test_cli_writes_a_chunked_batch_as_it_goes_with_the_same_files(pipe, tiny_checkpoint, tmp_path, capsys):
    request = GenerationRequest(prompt=PROMPT, steps=2, seed=5, batch=3)
    limit = limit_for(pipe, request, 2, hold_results=False)
    args = ["generate", PROMPT, "--model", str(tiny_checkpoint), "--steps", "2", "--seed", "5", "--batch", "3",
            "--quiet"]
    assert cli.main([*args, "--out", str(tmp_path / "one.png")]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "two.png"), "--memory-limit", str(limit)]) == 0
    err = capsys.readouterr().err
    assert "sdtorch: note: 3 images in 2 chunks of up to 2 (what fits in memory)" in err
    for suffix in ("", "-1", "-2"):
        assert (tmp_path / f"one{suffix}.png").read_bytes() == (tmp_path / f"two{suffix}.png").read_bytes()


def test_released_networks_free_their_weights_after_the_last_use_and_keep_the_image(tiny_checkpoint):
    kept = Pipeline.load(tiny_checkpoint, device="cpu")
    for settings in (dict(batch=3), dict(compat="a1111"), dict(hires_scale=1.5, hires_steps=2)):
        request = GenerationRequest(prompt=PROMPT, steps=2, seed=3, **settings)
        once = Pipeline.load(tiny_checkpoint, device="cpu")
        once.release_after_use = True
        if settings.get("batch"):  # in chunks: released only in the last
            once.memory_limit = limit_for(kept, request, 1)
        result = once.run(request)
        for a, b in zip(pixels(result), pixels(kept.run(request))):
            assert np.abs(a.astype(np.int16) - b).max() <= 1  # chunks apart (batch rounding), the same image
        assert once.released == {"text_encoder", "unet"}
        assert all(p.is_meta for net in (once.model.text_encoder, once.model.unet) for p in net.parameters())
        assert not any(p.is_meta for p in once.model.vae.parameters())
        with pytest.raises(SdtorchError, match="released its text_encoder and unet .* load the model again"):
            once.run(request)
    assert not kept.released


def test_cpu_sampling_steps_reuse_freed_memory_and_vae_passes_do_not(pipe, monkeypatch):
    """`runtime.freed_memory_reused` around the steps, switched back off for the VAE decode inside them."""
    from sdtorch import runtime

    calls = []
    fakes = {"mallopt": lambda param, value: calls.append((param, value.value)) or 1,
             "malloc_trim": lambda pad: calls.append("trim") or 1}
    monkeypatch.setattr(runtime, "_glibc", fakes.get)
    monkeypatch.setattr(runtime, "_KEPT_FREED", False)
    monkeypatch.setattr(runtime, "_PINNED", False)
    steps = []
    pipe.run(GenerationRequest(prompt=PROMPT, steps=3, seed=1), callback=steps.append)
    assert [event.step for event in steps] == [0, 1, 2]
    mmap, trim = runtime.M_MMAP_THRESHOLD, runtime.M_TRIM_THRESHOLD
    reuse = [(mmap, runtime.KEEP_MMAP_THRESHOLD), (trim, runtime.KEEP_TRIM_THRESHOLD)]
    give_back = [(mmap, runtime.STEADY_MMAP_THRESHOLD), (trim, runtime.STEADY_TRIM_THRESHOLD), "trim"]
    assert calls == reuse + give_back + reuse + give_back  # steps, the decode, back, the end
    assert runtime._REUSING is False
    calls.clear()
    monkeypatch.setattr(runtime, "_PINNED", True)  # the low-memory allocator, asked for: left as it is
    pipe.run(GenerationRequest(prompt=PROMPT, steps=2, seed=1))
    assert calls == []


GLIBC_REUSE_CHECK = """
import resource, torch
from sdtorch.runtime import freed_memory_reused

def step():  # a network call's pattern: blocks of 8-64 MB, some alive while others come and go
    kept = []
    for mb in (40, 8, 64, 16, 40, 8):
        block = torch.empty(mb * 2**18).fill_(1.0)
        if mb in (40, 16):
            kept.append(block)

def page_faults_of_four_more_steps():
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

outside = page_faults_of_four_more_steps()
with freed_memory_reused():
    print(outside, page_faults_of_four_more_steps())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the reuse scope drives glibc's malloc")
def test_inside_the_reuse_scope_freed_blocks_come_back_without_page_faults():
    """In a fresh process, steps that allocate the same large blocks again fault their pages in anew each time
    (176 MB a step: up to 45,000 pages), and next to none inside the scope (measured: 150-170 k against 4-16 k)."""
    out = subprocess.run([sys.executable, "-c", GLIBC_REUSE_CHECK], capture_output=True, text=True, check=True)
    outside, inside = (int(n) for n in out.stdout.split())
    assert outside >= 100_000
    assert inside * 5 < outside


def test_limits_parse_as_sizes():
    assert [cli._byte_size(s) for s in ("6G", "512M", "1.5GiB", "100", "2gb")] == \
        [6 * 2**30, 512 * 2**20, int(1.5 * 2**30), 100, 2 * 2**30]
    with pytest.raises(Exception, match="not a size"):
        cli._byte_size("lots")
    assert math.isfinite(memory.USABLE)
