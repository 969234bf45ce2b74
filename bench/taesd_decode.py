"""How fast TAESD decodes against the full SD 1.x VAE decoder, on this machine.

    python bench/taesd_decode.py [--size 512] [--repeats 3] [--dtype fp32] [--threads 2]

Decodes one (1, 4, size/8, size/8) latent with our AutoencoderKL decoder in the SD 1.x configuration
(post_quant_conv + decoder: what `StableDiffusion.decode_latents` runs; random weights, which cost the same
as real ones) and with our TAESD decoder (the real published weights from ../shared/data/real/taesd when
they are there, else random ones of the same architecture), in the same process and on the same input.
Each is warmed up once, then timed `--repeats` times; the table gives the median and the best, and the
ratio of the medians. Run it on a quiet machine: other jobs on the cores inflate both times unevenly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TAESD_DIR = ROOT.parent / "shared" / "data" / "real" / "taesd"


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up: allocator, kernels, caches
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def main(argv: list[str] | None = None) -> dict:
    from sdtorch.config import SD15
    from sdtorch.taesd import TAESD, TAESDDecoder
    from sdtorch.vae import AutoencoderKL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (default 3)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU (default 2)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)

    vae = AutoencoderKL(SD15.vae).eval().requires_grad_(False).to(args.device, dtype)
    if (TAESD_DIR / "taesd_decoder.safetensors").is_file():
        taesd, weights = TAESD.load(decoder=TAESD_DIR / "taesd_decoder.safetensors", device=args.device,
                                    dtype=dtype), "published SD 1.x weights"
    else:
        taesd = TAESD(None, TAESDDecoder()).eval().requires_grad_(False).to(args.device, dtype)
        weights = "random weights"
    latents = torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
    z = latents.to(args.device, dtype)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.no_grad():
        full = timed(lambda: (vae.decode(z / SD15.vae.scaling_factor), sync()), args.repeats)
        tiny = timed(lambda: (taesd.decoder(z), sync()), args.repeats)
    results = {
        "size": args.size, "dtype": args.dtype, "device": args.device, "threads": torch.get_num_threads(),
        "taesd_weights": weights, "vae_s": full, "taesd_s": tiny,
        "ratio": statistics.median(full) / statistics.median(tiny),
        "vae_params": sum(p.numel() for p in [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]),
        "taesd_params": sum(p.numel() for p in taesd.decoder.parameters()),
    }
    print(f"decode of one {args.size}x{args.size} image, {args.dtype} on {args.device}, "
          f"{results['threads']} threads (TAESD: {weights}); median and best of {args.repeats}:")
    for name, samples, params in (("full VAE decoder", full, results["vae_params"]),
                                  ("TAESD decoder", tiny, results["taesd_params"])):
        print(f"  {name:17s} {statistics.median(samples):8.3f} s  (best {min(samples):.3f} s, "
              f"{params / 1e6:.1f} M parameters)")
    print(f"  TAESD is {results['ratio']:.1f}x faster")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
