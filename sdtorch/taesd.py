"""TAESD, the tiny autoencoder for Stable Diffusion latents (Ollin Boer Bohan, 2023, MIT).

A plain convolutional encoder and decoder distilled from SD's VAE: no attention, no normalisation,
about 1.2M parameters each. The encoder maps images straight to the UNet's latent scale (SD 1.x's
0.18215 is learnt in), the decoder maps those latents back, so a preview or a fast final decode is
one cheap forward pass. The encoder and the decoder ship as separate files of weights, each the
state dict of an `nn.Sequential`; our modules keep those indices as their names, so the published
files load strictly, name for name.

    Block(c_in, c_out):  relu(conv3(relu(conv3(relu(conv3(x))))) + skip(x))   skip: 1x1 conv or identity
    encoder:  conv3(3->C), Block, then 3 x [conv3 stride 2 (no bias), Block x 3], conv3(C->latent)
    decoder:  3 * tanh(z / 3), conv3(latent->C), relu, 3 x [Block x 3, upsample x2 (nearest),
              conv3 (no bias)], Block, conv3(C->3)

The published networks take images in [0, 1] and give them back in [0, 1]; `encode` / `decode`
here speak the pipeline's [-1, 1], as the full VAE does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from sdtorch.errors import CheckpointError, SdtorchError
from sdtorch.images import to_pil
from sdtorch.loading.reader import open_tensors

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")


@dataclass(frozen=True)
class TAESDConfig:
    latent_channels: int = 4  # SD 1.x / 2.x
    channels: int = 64
    levels: int = 3  # each halves (encoder) or doubles (decoder) the size: downscale 2**levels
    blocks: int = 3  # Blocks per level

    @property
    def downscale(self) -> int:
        return 2**self.levels


def _conv(c_in: int, c_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, **kwargs)


class Block(nn.Module):
    """Three 3x3 convolutions with ReLUs between them, a residual (1x1 where the width changes), ReLU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(c_in, c_out), nn.ReLU(), _conv(c_out, c_out), nn.ReLU(), _conv(c_out, c_out))
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class SoftClamp(nn.Module):
    """3 * tanh(z / 3): keeps latents in (-3, 3), where the decoder was trained."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class TAESDEncoder(nn.Sequential):
    """Images (B, 3, H, W) in [0, 1] -> latents (B, latent, H/8, W/8) in the UNet's scale."""

    def __init__(self, config: TAESDConfig = TAESDConfig()):
        c = config.channels
        layers: list[nn.Module] = [_conv(3, c), Block(c, c)]
        for _ in range(config.levels):
            layers.append(_conv(c, c, stride=2, bias=False))  # (B, C, H/2, W/2)
            layers += [Block(c, c) for _ in range(config.blocks)]
        layers.append(_conv(c, config.latent_channels))
        super().__init__(*layers)


class TAESDDecoder(nn.Sequential):
    """Latents (B, latent, h, w) in the UNet's scale -> images (B, 3, 8h, 8w) in about [0, 1]."""

    def __init__(self, config: TAESDConfig = TAESDConfig()):
        c = config.channels
        layers: list[nn.Module] = [SoftClamp(), _conv(config.latent_channels, c), nn.ReLU()]
        for _ in range(config.levels):
            layers += [Block(c, c) for _ in range(config.blocks)]
            layers += [nn.Upsample(scale_factor=2), _conv(c, c, bias=False)]  # (B, C, 2h, 2w)
        layers += [Block(c, c), _conv(c, 3)]
        super().__init__(*layers)


class TAESD(nn.Module):
    """The tiny autoencoder; either half may be absent (a preview needs the decoder only)."""

    def __init__(self, encoder: TAESDEncoder | None, decoder: TAESDDecoder | None,
                 config: TAESDConfig = TAESDConfig()):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.decoder = decoder

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, encoder: str | os.PathLike | None = None,
             decoder: str | os.PathLike | None = None, device="cpu", dtype: torch.dtype = torch.float32) -> TAESD:
        """From a folder holding `taesd_encoder.*` / `taesd_decoder.*` (either or both), or from one file
        (a `...decoder...` file finds its `...encoder...` sibling, and the other way round), or from the two
        files named. Every name and shape is checked; a file that does not fit raises CheckpointError."""
        if path is not None:
            found_encoder, found_decoder = find_weights(Path(path))
            encoder, decoder = encoder or found_encoder, decoder or found_decoder
        if encoder is None and decoder is None:
            raise SdtorchError(f"no TAESD weights found at {path} (expected taesd_encoder.safetensors and/or "
                               "taesd_decoder.safetensors, or .pth)")
        config = TAESDConfig()
        enc = _load_strict(TAESDEncoder(config), Path(encoder), dtype, device) if encoder else None
        dec = _load_strict(TAESDDecoder(config), Path(decoder), dtype, device) if decoder else None
        return cls(enc, dec, config).eval().requires_grad_(False)

    def _param(self, part: nn.Module | None, what: str) -> Tensor:
        if part is None:
            raise SdtorchError(f"this TAESD has no {what} weights; give the taesd_{what} file too")
        return next(part.parameters())

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> UNet-scale latents (B, latent, H/8, W/8), float32."""
        p = self._param(self.encoder, "encoder")
        return self.encoder((pixels.to(p.device, p.dtype) + 1) / 2).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """UNet-scale latents (B, latent, h, w) -> images (B, 3, 8h, 8w) in about [-1, 1], float32."""
        p = self._param(self.decoder, "decoder")
        return (self.decoder(latents.to(p.device, p.dtype)) * 2 - 1).float()


class TAESDPreview:
    """Step previews through TAESD's decoder: UNet-scale latents (B, C, h, w) -> B RGB images at full size.
    The same call as `LatentPreview`, so the CLI (and the server) can take either."""

    def __init__(self, taesd: TAESD):
        if taesd.decoder is None:
            raise SdtorchError("a TAESD preview needs the decoder weights (taesd_decoder.safetensors)")
        self.taesd = taesd

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu") -> TAESDPreview:
        return cls(TAESD.load(path, device=device))

    def __call__(self, latents: Tensor) -> list[Image.Image]:
        return to_pil(self.taesd.decode(latents.detach().float()))


def find_weights(path: Path) -> tuple[Path | None, Path | None]:
    """(encoder file, decoder file) for a folder or one of the two files."""
    if path.is_dir():
        def pick(part: str) -> Path | None:
            for stem in (f"taesd_{part}", part):
                for suffix in WEIGHT_SUFFIXES:
                    if (path / f"{stem}{suffix}").is_file():
                        return path / f"{stem}{suffix}"
            return None

        return pick("encoder"), pick("decoder")
    if not path.is_file():
        raise SdtorchError(f"TAESD weights {str(path)!r}: no such file or folder")
    name = path.name
    if "decoder" in name:
        sibling = path.with_name(name.replace("decoder", "encoder"))
        return (sibling if sibling.is_file() else None), path
    if "encoder" in name:
        sibling = path.with_name(name.replace("encoder", "decoder"))
        return path, (sibling if sibling.is_file() else None)
    raise SdtorchError(f"{path}: cannot tell whether this is TAESD's encoder or decoder; "
                       "name it taesd_encoder.* / taesd_decoder.*, or give its folder")


def _load_strict(net: nn.Module, path: Path, dtype: torch.dtype, device) -> nn.Module:
    """Load `path` into `net` after checking every name and shape; a file holding both halves (names
    under `encoder.` / `decoder.`, as some tools store it) gives the half `net` is."""
    file = open_tensors(path)
    tensors = dict(file.tensors)
    part = "encoder." if isinstance(net, TAESDEncoder) else "decoder."
    if any(k.startswith(part) for k in tensors):
        tensors = {k[len(part):]: v for k, v in tensors.items() if k.startswith(part)}
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    misshapen = [f"{k} {list(tensors[k].shape)} (expected {list(s)})" for k, s in expected.items()
                 if k in tensors and tuple(tensors[k].shape) != s]
    problems = [f"{len(items)} {what}: {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
                for what, items in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", misshapen))
                if items]
    if problems:
        raise CheckpointError(f"{path}: not a TAESD {part[:-1]}: " + "; ".join(problems))
    state = {k: tensors[k].read().to(device=device, dtype=dtype) for k in expected}
    net.load_state_dict(state, strict=True)
    return net.to(device=device, dtype=dtype)
