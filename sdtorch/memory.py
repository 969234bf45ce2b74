"""How much memory a generation needs and how much there is, known before any work starts.

Estimates come from the model's config, the compute dtype, the batch and the size, as bytes beyond the
loaded weights (which are resident by the time a request runs, and so already out of what is
available):

- the UNet step: the skip tensors the UNet keeps for its decoder half, plus the working set of its
  widest level (where the level attends, 9C for the transformer and its GEGLU feed-forward's 8C + 4C
  over at most one chunk of tokens, `sdtorch.unet.FeedForward`; a res-block's concatenated input where
  it does not), per batch row (classifier-free guidance doubles the rows; each row is counted with a
  whole chunk, so a batch of many rows is overestimated), plus oneDNN's reordered copy of the largest
  convolution weight. PyTorch's CPU SDPA takes its flash kernel for the UNet's head sizes and never
  holds the (HW)^2 score matrix (measured: a (2, 8, 16384, 40) attention allocates its output plus 4 MiB;
  the full scores would be 16 GiB); an attention that falls back to the math kernel does hold it, so
  `attention_holds_scores` checks what the network's attention layers really run and the estimate adds
  the scores where they do.
- the VAE: the whole pass (about three activations of the widest level at once), the exact tiled pass
  (`sdtorch.tiling`: two or three stored activations) or independent tiles (one tile's whole pass).
  The VAE's single-head attention is checked the same way: on the CPU with NCHW activations its
  (B, HW, C) inputs are strided in C and it takes the math kernel, (HW/64)^2 scores held, 34 GB at
  2048x2048 (measured); with the channels-last layout the VAE now runs on the CPU, the flash kernel.
- what a chunk of images leaves behind: latents, the decoded floats, the pictures.

Calibrated against peak RSS (VmHWM) of fresh processes, fp32, 1 thread, before the feed-forward ran in
chunks: the SD 1.5 UNet (batch rows x latent side 2x16 .. 2x64, 1x96) measured 159-445 MiB beyond its
weights, estimated 1.06-1.6x that; the tiny UNet 0.97-1.5x; SD 1.5's VAE at 512x512 decode 870 MiB whole
/ 650 MiB exact, encode 775 / 334 MiB, estimated within 1.05-1.25x; a chunked batch of the embedded model
427 and 771 MiB, estimated 434 and 870. tests/test_memory.py holds the estimates to the tensors really
alive (1.0-1.8x).

Available memory is /proc/meminfo's MemAvailable, or the cgroup's limit less its usage when that is
lower (a container), or the GPU's free memory; None where it cannot be read (then nothing is refused).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sdtorch.errors import SdtorchError
from sdtorch.unet import FEED_FORWARD_ROWS

USABLE = 0.85  # of what is available: the rest for the allocator's slack and whatever else the machine runs
UNET_FIXED = 32 * 2**20  # thread pools, oneDNN's primitive cache, the text encoder's activations
VAE_FIXED = 16 * 2**20
WHOLE_SLACK = 1.25  # peak RSS / live tensors of the whole VAE pass (oneDNN scratch; measured 1.05-1.13)
EXACT_SLACK = 1.1
SAMPLER_TENSORS = 12  # latent-sized tensors a sampler and the guidance keep per image (x, denoised, history, noise)

_LIMIT: ContextVar[int | None] = ContextVar("sdtorch_memory_limit", default=None)


def gb(n: int | float | None) -> str:
    return "an unknown amount" if n is None else f"{n / 1e9:.1f} GB"


@contextmanager
def memory_limit(limit: int | None) -> Iterator[None]:
    """For the scope, plan as if at most `limit` bytes were available (None: what the machine says)."""
    token = _LIMIT.set(limit)
    try:
        yield
    finally:
        _LIMIT.reset(token)


# --- what there is -----------------------------------------------------------------------------------


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """The tightest memory limit over this process's cgroup and its parents, less the usage there (page
    cache that can be dropped counts as free, as MemAvailable counts it); None without a limit."""
    root = Path("/sys/fs/cgroup")
    found = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            folder = root / path.lstrip("/")
            while True:
                limit = _read_int(folder / "memory.max")
                usage = _read_int(folder / "memory.current")
                if limit is not None and usage is not None:
                    found.append(limit - usage + _stat(folder / "memory.stat", "inactive_file"))
                if folder == root or root not in folder.parents:
                    break
                folder = folder.parent
        elif "memory" in controllers.split(","):  # cgroup v1
            for folder in (root / "memory" / path.lstrip("/"), root / "memory"):
                limit = _read_int(folder / "memory.limit_in_bytes")
                usage = _read_int(folder / "memory.usage_in_bytes")
                if limit is not None and usage is not None and limit < 2**60:
                    found.append(limit - usage + _stat(folder / "memory.stat", "total_inactive_file"))
    return max(0, min(found)) if found else None


def available_bytes(device: torch.device | str | None = None) -> int | None:
    """Memory free for work now on `device` (the host for the CPU), within the scope's `memory_limit`."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        found = [torch.cuda.mem_get_info(device)[0]]
    elif device.type == "cpu":
        found = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    else:
        found = []
    if _LIMIT.get() is not None:
        found.append(_LIMIT.get())
    return min(found) if found else None


# --- what attention really allocates -------------------------------------------------------------------

_HOLDS_SCORES: dict[tuple, bool] = {}


def attention_holds_scores(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether `layer(x)` (an attention layer, on a tiny input laid out as the network lays it out) runs
    a softmax of its own, that is PyTorch's math kernel with the (T, T) scores in memory, rather than a
    fused flash or memory-efficient kernel. Cached per layer type, shape and layout."""
    from torch.utils._python_dispatch import TorchDispatchMode

    key = (type(layer), tuple(x.shape), x.stride(), x.dtype, x.device.type)
    if key not in _HOLDS_SCORES:
        names: set[str] = set()

        class Ops(TorchDispatchMode):
            @classmethod
            def _should_skip_dynamo(cls) -> bool:
                # Otherwise torch wraps the hook below in dynamo's `disable`, whose first call imports
                # torch._dynamo (and sympy): 70 MB and 0.9 s of every generation's process for a check
                # that never compiles. The opt-out is the one this hook's own docstring shows.
                return False

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                names.add(func.__name__)
                return func(*args, **(kwargs or {}))

        with torch.no_grad(), Ops():
            layer(x)
        _HOLDS_SCORES[key] = any("softmax" in name for name in names)
    return _HOLDS_SCORES[key]


def _param(net: nn.Module) -> torch.Tensor:
    return next(net.parameters())


def _unet_scores(unet) -> tuple[int, int] | None:
    """(heads, level) of the UNet's first attending level if its attention holds the scores, else None."""
    cfg = unet.config
    for module in unet.modules():
        if hasattr(module, "attention_fn") and hasattr(module, "to_q"):
            dim = module.to_q.in_features
            x = torch.zeros(1, 4, dim, dtype=_dtype(unet), device=_param(unet).device)
            if not attention_holds_scores(module, x):
                return None
            return module.heads, min(cfg.attention_levels)
    return None


def _vae_scores(vae, op: str) -> bool:
    """Whether the VAE's mid attention holds its scores when `op` runs (in the layout its encoder or decoder
    converts to: `tiling.layout_of`; the exact tiled pass keeps it)."""
    from sdtorch.tiling import layout_of

    network = vae.decoder if op == "decode" else vae.encoder
    block = network.mid.attn_1
    device = _param(vae).device
    x = torch.zeros(1, block.q.in_channels, 2, 2, dtype=_dtype(vae), device=device)
    return attention_holds_scores(block, x.contiguous(memory_format=layout_of(network, device)))


def _dtype(net: nn.Module) -> torch.dtype:
    from sdtorch.stored_weights import compute_dtype

    return compute_dtype(net)


def activation_itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


# --- the UNet --------------------------------------------------------------------------------------------


def unet_bytes_per_row(cfg, height: int, width: int, itemsize: int, scores: tuple[int, int] | None = None) -> int:
    """One batch row of one UNet evaluation on (height, width) latents, beyond the weights."""
    chans = [cfg.model_channels * m for m in cfg.channel_mult]
    px = height * width
    skips = chans[0]  # conv_in's output, then every res-block's and downsample's (UNet.skip_channels)
    for level, ch in enumerate(chans):
        skips += cfg.num_res_blocks * ch / 4**level
        if level != len(chans) - 1:
            skips += ch / 4 ** (level + 1)
    work = 0.0  # per latent pixel of this row, the widest level's working set
    for level, ch in enumerate(chans):
        tokens = px / 4**level
        if level in cfg.attention_levels:  # the transformer, and its GEGLU (8C + 4C) over at most one chunk
            work = max(work, 9 * ch * tokens + 12 * ch * min(tokens, FEED_FORWARD_ROWS))
        else:
            work = max(work, 8 * ch * tokens)
    total = (skips * px + work) * itemsize
    if scores is not None:  # (heads, T, T) scores and their softmax
        heads, level = scores
        tokens = px / 4**level
        total += 2 * heads * tokens**2 * itemsize
    return math.ceil(total)


def unet_fixed_bytes(unet: nn.Module) -> int:
    """oneDNN reorders a convolution's weight to its blocked layout per call: a copy of the largest."""
    largest = max((m.weight.numel() for m in unet.modules() if isinstance(m, nn.Conv2d)), default=0)
    return UNET_FIXED + math.ceil(1.25 * largest * activation_itemsize(_dtype(unet)))


# --- the VAE ----------------------------------------------------------------------------------------------


def vae_bytes(cfg, op: str, kind: str, height: int, width: int, itemsize: int, scores: bool) -> int:
    """One image's VAE `op` ("decode" or "encode") at height x width pixels, run `kind` ("whole", "exact";
    "tiles": one tile's whole pass plus the blended output)."""
    chans = [cfg.base_channels * m for m in cfg.channel_mult]
    f = cfg.downscale
    if kind == "tiles":
        from sdtorch.tiling import TILE

        side = TILE * f
        tile = vae_bytes(cfg, op, "whole", min(height, side), min(width, side), itemsize, scores)
        blended = 32 * height * width if op == "decode" else 16 * cfg.latent_channels * height * width // f**2
        return tile + blended
    px = [height * width / 4**level for level in range(len(chans))]
    floats = widest = 0.0
    for level, ch in enumerate(chans):
        last = level + 1 == len(chans)
        if op == "decode":  # level i starts from level i+1's upsampled output (the mid block's at the last)
            before = ch if last else chans[level + 1]
        else:  # and the encoder's from level i-1's (conv_in's at the first)
            before = chans[level - 1] if level else cfg.base_channels
        widest = max(widest, max(before, ch) * px[level])
        if kind == "whole":  # a res-block's norm -> silu -> conv moment, with its input alive
            floats = max(floats, (3 if op == "decode" else 5) * max(before, ch) * px[level])
        else:  # exact: a res-block's input, hidden activation and (channels changing) output, stored whole
            floats = max(floats, (before + ch + (ch if before != ch else 0)) * px[level])
        if not last:  # an upsample into the level (decode) or a downsample out of it (encode): input + output
            floats = max(floats, 1.25 * before * px[level] if op == "decode" else 1.25 * ch * px[level])
    floats += (cfg.in_channels + cfg.out_channels) * px[0]  # the image in or out
    total = floats * itemsize * (WHOLE_SLACK if kind == "whole" else EXACT_SLACK) + VAE_FIXED
    if kind == "exact":  # a band normalised, convolved and summed: a band at most the widest activation
        from sdtorch.tiling import BAND_BYTES

        total += 3 * min(BAND_BYTES, widest * itemsize)
    if scores:  # the mid block's single-head attention over every latent pixel: scores and softmax
        total += 2 * px[-1] ** 2 * itemsize
    return math.ceil(total)


@dataclass(frozen=True)
class VAEWay:
    """How a VAE pass runs: "whole", "exact" (tiled, `sdtorch.tiling`) or "tiles"; images per call."""

    kind: str
    per_call: int
    need: int  # bytes of one image, this way
    exact_bytes: int  # ... done exactly tiled
    available: int | None


def vae_way(vae, op: str, height: int, width: int, dtype: torch.dtype, mode: str = "auto",
            available: int | None = None) -> VAEWay:
    """The way to run `op` on images of height x width under tiling `mode` with the memory there is:
    "auto" whole if one image fits, else exact, else tiles; "on" exact unless it does not fit; "off" whole.
    As many images per call as fit (all where the memory is unknown)."""
    if available is None:
        available = available_bytes(_param(vae).device)
    usable = None if available is None else available * USABLE
    size = activation_itemsize(dtype)

    def need(kind: str) -> int:
        return vae_bytes(vae.config, op, kind, height, width, size, _vae_scores(vae, op))

    exact = need("exact")
    if mode == "off" or mode == "auto" and (usable is None or need("whole") <= usable):
        kind = "whole"
    elif usable is None or exact <= usable:
        kind = "exact"
    else:
        kind = "tiles"
    bytes_ = exact if kind == "exact" else need(kind)
    per_call = 1 if kind == "tiles" else 2**31 if usable is None else max(1, int(usable // bytes_))
    return VAEWay(kind, per_call, bytes_, exact, available)


# --- a request ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    """How a request's images are made within the memory there is: `per_chunk` images per sampling run."""

    images: int
    per_chunk: int
    need_one: int  # bytes beyond the loaded model for a batch of one (the worst phase)
    available: int | None
    decode: str  # the VAE decode's way ("whole", "exact", "tiles"; "taesd")

    @property
    def chunks(self) -> int:
        return -(-self.images // self.per_chunk)


def _phases(model, request, tiling: str, available: int | None, scale: float = 1.0):
    """(fixed, per image) bytes of the sampling phase and of the decode phase, the bytes each finished image
    leaves behind, and the decode's way, for `request` with its sizes scaled by `scale`."""
    from sdtorch.hires import hires_target

    def snap(v: int) -> int:
        return max(8, int(v * scale) // 8 * 8) if scale != 1.0 else v

    width, height = snap(request.width), snap(request.height)
    sizes = [(width, height)]
    final = (width, height)
    if request.hires:
        (up_x, up_y), final = hires_target(request)
        up_x, up_y, final = snap(up_x), snap(up_y), (snap(final[0]), snap(final[1]))
        sizes.append((up_x, up_y))
    f = model.latent_format.downscale
    channels = model.latent_format.channels
    dtype = model.dtype
    size = activation_itemsize(dtype)
    scores = _unet_scores(model.unet)
    passes = (2 if request.cfg_scale > 1 else 1) + request.prompt.count(" AND ")  # A1111's composable parts
    unet_row = max(unet_bytes_per_row(model.unet.config, h // f, w // f, size, scores) for w, h in sizes)
    latent = max(channels * (h // f) * (w // f) * 4 for w, h in sizes)
    sample = (unet_fixed_bytes(model.unet), passes * unet_row + SAMPLER_TENSORS * latent)
    fw, fh = final
    pixels = fw * fh
    if request.decoder == "taesd":
        decode_one, way = 5 * 64 * pixels * 4, "taesd"
    else:
        chosen = vae_way(model.vae, "decode", fh, fw, dtype, tiling, available)
        decode_one, way = chosen.need, chosen.kind
    if request.img2img:  # the init image, encoded through sdtorch.tiling
        decode_one = max(decode_one, vae_way(model.vae, "encode", fh, fw, dtype, tiling, available).need)
    if request.hires and request.hires_upscaler not in ("latent", "latent-bicubic"):  # sdtorch.hires encodes whole
        up_x, up_y = sizes[-1]
        decode_one = max(decode_one, vae_bytes(model.vae.config, "encode", "whole", up_y, up_x, size,
                                               _vae_scores(model.vae, "encode")))
    decode = (decode_one, 3 * pixels * 10 + SAMPLER_TENSORS * latent)  # decoded floats, uint8, PIL, their copies
    leaves = 3 * pixels + channels * (fh // f) * (fw // f) * 4  # a picture and its latents
    return sample, decode, leaves, way


BATCH_COUPLED = ("dpm_adaptive",)  # samplers whose steps depend on the whole batch (an error norm over it)


def plan(model, request, *, tiling: str = "auto", hold_results: bool = True,
         available: int | None = None) -> MemoryPlan:
    """How many images of the resolved `request` to sample at once; one SdtorchError line, before any work,
    where not even one fits (what it needs, what there is, what to change), or where the pictures a call
    returns would not fit together (`hold_results`; a caller that writes each chunk as it comes does not
    hold them)."""
    if available is None:
        available = available_bytes(model.device)
    (s_fixed, s_each), (d_fixed, d_each), leaves, way = _phases(model, request, tiling, available)
    held = request.batch * leaves if hold_results else 0
    need_one = max(s_fixed + s_each, d_fixed + d_each)
    if available is None:
        return MemoryPlan(request.batch, request.batch, need_one, None, way)
    usable = available * USABLE
    if need_one + (held if hold_results else leaves) > usable:
        raise SdtorchError(_too_large(model, request, tiling, available, need_one, s_fixed + s_each, held))
    room = usable - held
    per_chunk = min(request.batch, int((room - s_fixed) // s_each), int((room - d_fixed) // d_each))
    per_chunk = max(1, per_chunk)
    from sdtorch.samplers.registry import sampler_entry

    if per_chunk < request.batch and sampler_entry(request.sampler).name in BATCH_COUPLED:
        raise SdtorchError(f"the {request.sampler} sampler steps a batch as one (one step size for all its images), "
                           f"so it cannot run in chunks, and {request.batch} images at once need about "
                           f"{gb(s_fixed + request.batch * s_each)} with {gb(available)} available; "
                           f"ask for at most {per_chunk} images, or another sampler")
    return MemoryPlan(request.batch, per_chunk, need_one, available, way)



def _too_large(model, request, tiling, available, need_one, sampling, held) -> str:
    usable = available * USABLE
    if need_one <= usable:  # one image fits; the pictures of the whole call do not
        (_, _), (_, _), leaves, _ = _phases(model, request, tiling, available)
        most = max(1, int((usable - need_one) // leaves))
        return (f"the {request.batch} pictures of one call (with their latents) need about {gb(held)} held in memory "
                f"and {gb(available)} is available; ask for at most {most} images per call (the CLI writes each "
                "chunk of a batch as it goes)")
    what = "the UNet's activations" if sampling >= need_one else "the VAE decode"
    size = f"{request.width}x{request.height}"
    if request.hires:
        from sdtorch.hires import hires_target

        size = "{}x{} (hires fix)".format(*hires_target(request)[0])
    lo, hi = 0.0, 1.0  # the largest scale of the sizes at which one image fits, for the advice
    for _ in range(16):
        mid = (lo + hi) / 2
        (sf, se), (df, de), _, _ = _phases(model, request, tiling, available, mid)
        lo, hi = (mid, hi) if max(sf + se, df + de) <= usable else (lo, mid)
    fits = max(8, int(request.width * lo) // 8 * 8), max(8, int(request.height * lo) // 8 * 8)
    advice = f"use a smaller size (about {fits[0]}x{fits[1]} fits here)"
    if what == "the VAE decode" and tiling == "off":
        advice = "leave --vae-tiling at auto to decode in tiles, or " + advice
    return (f"a {size} image needs about {gb(need_one)} of memory beyond the loaded model ({what}) and "
            f"{gb(available)} is available; {advice}")
