"""Watching the image emerge: the latents of every step, decoded, as "The Illustrated Stable
Diffusion" (Alammar 2022) shows them.

Two ways to see latents:
- `LatentPreview`: a linear map from the 4 latent channels to RGB, fitted by least squares to
  what the model's own VAE decodes; it costs one small matrix product per step.
- `StepRecorder` + `save_steps`: every step's noisy latents and predicted clean latents decoded
  by the full VAE, written as PNGs, one strip image and an animated GIF.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from sdtorch.errors import SdtorchError
from sdtorch.images import to_pil
from sdtorch.samplers import StepEvent
from sdtorch.stored_weights import compute_dtype
from sdtorch.vae import AutoencoderKL


class LatentPreview:
    """rgb = W @ latent + b per latent pixel, fitted to the VAE's decodes of a few images."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, downscale: int):
        self.weight = weight  # (3, C)
        self.bias = bias  # (3,)
        self.downscale = downscale

    @classmethod
    @torch.no_grad()
    def fit(cls, vae: AutoencoderKL, images: int = 4, size: int = 64, seed: int = 0) -> LatentPreview:
        """Encode smooth random colour fields, decode their latents, and solve for the linear map
        from (scaled) latents to the decoded colours averaged over each latent pixel."""
        g = torch.Generator().manual_seed(seed)
        f = vae.config.downscale
        coarse = torch.rand(images, 3, 4, 4, generator=g) * 2 - 1
        pixels = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)
        param = next(vae.parameters())
        latents = vae.encode(pixels.to(param.device, compute_dtype(vae))).mean
        decoded = vae.decode(latents).float().cpu()
        target = F.avg_pool2d(decoded, f)  # (N, 3, h, w): the colour each latent pixel decodes to
        z = latents.float().cpu() * vae.config.scaling_factor  # the UNet's scale (shift 0 in SD 1.x)
        a = torch.cat([z, torch.ones_like(z[:, :1])], dim=1).permute(0, 2, 3, 1).reshape(-1, z.shape[1] + 1)
        b = target.permute(0, 2, 3, 1).reshape(-1, 3)
        solution = torch.linalg.lstsq(a.double(), b.double()).solution.float()  # (C+1, 3)
        return cls(solution[:-1].T.contiguous(), solution[-1].contiguous(), f)

    def __call__(self, latents: torch.Tensor) -> list[Image.Image]:
        """Scaled latents (B, C, h, w) -> B RGB images upsampled to the decoded size."""
        z = latents.detach().float().cpu()
        rgb = torch.einsum("oc,bchw->bohw", self.weight, z) + self.bias[None, :, None, None]
        rgb = F.interpolate(rgb, scale_factor=self.downscale, mode="nearest")
        return to_pil(rgb)


@dataclass
class StepRecorder:
    """A sampler callback that keeps each step's latents (on the CPU) for `save_steps`."""

    steps: list[tuple[int, float, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def __call__(self, event: StepEvent) -> None:
        x, denoised = event.x.detach().float().cpu(), event.denoised.detach().float().cpu()
        self.steps.append((event.step, event.sigma, x, denoised))


def save_steps(
    directory: str | Path, recorder: StepRecorder, decode, preview: LatentPreview | None = None
) -> list[Path]:
    """Write, for every recorded step and every image of the batch, the decoded noisy latents
    (`NNN-latents.png`) and the decoded prediction of the final image (`NNN-predicted.png`),
    plus `strip.png` (one column per step: latents above, prediction below, fast preview under
    them when given) and `steps.gif` (latents beside prediction, one frame per step).

    `decode(latents) -> images in [-1, 1]` is the pipeline's full VAE decode."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SdtorchError(f"cannot create the steps folder {str(directory)!r}: {e.strerror}") from None
    if not recorder.steps:
        return []
    batch = recorder.steps[0][2].shape[0]
    written = []
    for b in range(batch):
        folder = directory if batch == 1 else directory / f"image-{b}"
        folder.mkdir(exist_ok=True)
        rows: dict[str, list[Image.Image]] = {"latents": [], "predicted": [], "preview": []}
        for step, _sigma, x, denoised in recorder.steps:
            for kind, latents in (("latents", x), ("predicted", denoised)):
                image = to_pil(decode(latents[b : b + 1]))[0]
                image.save(folder / f"{step:03d}-{kind}.png")
                written.append(folder / f"{step:03d}-{kind}.png")
                rows[kind].append(image)
            if preview is not None:
                rows["preview"].append(preview(x[b : b + 1])[0].resize(rows["latents"][-1].size))
        strip = _grid([row for row in rows.values() if row])
        strip.save(folder / "strip.png")
        frames = [_grid([[a], [p]], horizontal=True) for a, p in zip(rows["latents"], rows["predicted"])]
        # Hold the last frame so the finished image can be seen before the loop restarts.
        durations = [120] * (len(frames) - 1) + [1500]
        frames[0].save(folder / "steps.gif", save_all=True, append_images=frames[1:], duration=durations, loop=0)
        written += [folder / "strip.png", folder / "steps.gif"]
    return written


def _grid(rows: list[list[Image.Image]], horizontal: bool = False, gap: int = 2) -> Image.Image:
    """Lay equal-size images out in rows (or, with `horizontal`, the rows side by side)."""
    if horizontal:
        rows = [[row[0] for row in rows]]
    w, h = rows[0][0].size
    columns = max(len(r) for r in rows)
    canvas = Image.new("RGB", (columns * (w + gap) - gap, len(rows) * (h + gap) - gap), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            canvas.paste(image, (c * (w + gap), r * (h + gap)))
    return canvas
