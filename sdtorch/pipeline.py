"""The one generation path: a `GenerationRequest` in, images out.

prompts -> `Conditioning` (conditioning.py), seed -> noise, the sampler loop over a `Denoiser`
(diffusion.py) that wraps the guided UNet (guidance.py), VAE decode -> images. Text-to-image and
image-to-image differ only in where the sampler starts (`start_latents`: pure noise, or the
VAE-encoded init image noised to `strength`).

Random numbers are drawn as diffusers draws them on the CPU, one generator per image seeded with
seed + i (AUTOMATIC1111's convention), so image i of a batch can be regenerated alone and matches
diffusers' pipelines given the same per-image generators.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path

import torch
from PIL import Image

from sdtorch import memory
from sdtorch.adapters.library import Adapters, PromptAdapters
from sdtorch.adapters.lora import apply_loras
from sdtorch.conditioning import DualPromptEncoder, PromptEncoder, embeddings_in, encode
from sdtorch.deepcache import FeatureCache
from sdtorch.diffusion import Denoiser
from sdtorch.errors import SdtorchError
from sdtorch.guidance import GuidanceCutoff, guided_model, passes_in_turn
from sdtorch.hires import hires_pass
from sdtorch.images import prepare_init_image, to_pil
from sdtorch.inpaint import inpaint, is_inpainting_model
from sdtorch.loading import load_model
from sdtorch.loading.hashing import model_hash
from sdtorch.memory import MemoryPlan, memory_limit
from sdtorch.model import StableDiffusion
from sdtorch.request import GenerationRequest
from sdtorch.runtime import Runtime, freed_memory_reused, return_freed_memory
from sdtorch.samplers import (
    A1111Noise,
    GeneratorNoise,
    StepCallback,
    a1111_options,
    create_generator,
    sample,
    sample_a1111,
)
from sdtorch.samplers.philox import PhiloxGenerator
from sdtorch.samplers.run import img2img_start
from sdtorch.samplers.schedule_types import compvis_schedule
from sdtorch.stored_weights import release_scratch
from sdtorch.tiling import check_tiling, vae_tiling
from sdtorch.tiling import encode as tiled_encode
from sdtorch.tokenizer import get_tokenizer

# The small model sdtorch trains itself and ships, used when no model is given.
EMBEDDED_MODEL = "data/default/sdtorch-shapes.safetensors"


@dataclass
class GenerationResult:
    images: list[Image.Image]
    request: GenerationRequest  # resolved: seed, size, guidance and schedule as used
    latents: torch.Tensor  # (B, C, H/8, W/8) final latents, in the UNet's scale
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)  # one line each: what was read on but not as asked

    @property
    def seeds(self) -> list[int]:
        return self.request.seeds

    def per_image(self) -> list[GenerationRequest]:
        """The request that regenerates each image alone (its own seed, batch 1)."""
        return self.request.per_image()


def a1111_images(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB images as A1111 makes them: clamp((x + 1) / 2, 0, 1) * 255, truncated
    to 8 bits (numpy's astype(uint8)), where diffusers rounds."""
    x = ((images.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)
    if torch.isnan(x).any():
        raise SdtorchError("the decoded image contains NaN values (often a float16 VAE overflowing); decode in float32")
    pixels = (255.0 * x.permute(0, 2, 3, 1).numpy()).astype("uint8")
    return [Image.fromarray(p) for p in pixels]


def _chunk(request: GenerationRequest, start: int, n: int) -> GenerationRequest:
    """Images start .. start + n - 1 of a resolved request's batch, as a request of their own (image i has seed
    + i, or with an A1111 variation the seed and variation seed + i, as `GenerationRequest.seeds` numbers them)."""
    seed = request.seed if request.variation_strength else request.seed + start
    variation = None if request.variation_seed is None else request.variation_seed + start
    return request.replace(seed=seed, batch=n, variation_seed=variation)


def _chain(first: StepCallback, then: StepCallback | None) -> StepCallback:
    """A step callback that calls `first`, then `then` (if any)."""

    def both(event) -> None:
        first(event)
        if then is not None:
            then(event)

    return both


def default_model_path() -> Path:
    """The embedded shapes model shipped in the package (`python -m sdtorch.train` makes it), or a
    clear error where an install has lost it."""
    path = Path(str(resources.files("sdtorch") / EMBEDDED_MODEL))
    if not path.is_file():
        raise SdtorchError(
            f"no --model given, and the embedded default model ({path}) is missing from this install; "
            "reinstall sdtorch, or pass --model PATH to an SD 1.x checkpoint (.safetensors, .ckpt) or diffusers folder"
        )
    return path


def prompt_encoder_of(model: StableDiffusion, tokenizer, adapters: Adapters) -> PromptEncoder | DualPromptEncoder:
    """SD 1.x/2.x: one tower, its last layer (or the clip-skip one) through the final norm; SDXL: both
    towers' penultimate layers, each tokenized with its own padding."""
    if model.text_encoder_2 is None:
        return PromptEncoder(model.text_encoder, tokenizer, adapters.embeddings)
    second = {name: e.for_second_tower() for name, e in adapters.embeddings.items()}  # their clip_g vectors
    return DualPromptEncoder(PromptEncoder(model.text_encoder, tokenizer, adapters.embeddings, layer="penultimate"),
                             PromptEncoder(model.text_encoder_2, get_tokenizer(model.family.pad_id_2), second,
                                           layer="penultimate"))


class Pipeline:
    """A loaded model, ready to generate many times: `Pipeline.load(path).generate("a cat")`."""

    def __init__(
        self, model: StableDiffusion, model_path: str | os.PathLike | None = None, adapters: Adapters | None = None,
        *, vae_tiling: str = "auto", release_after_use: bool = False, memory_limit: int | None = None,
    ):
        """`vae_tiling`: "auto" (tile the VAE's decode and encode where the whole pass would not fit), "on"
        or "off" (`sdtorch.tiling`). `release_after_use`: free the text encoders once the prompts are
        encoded and the UNet once sampling is done, in the last (or only) chunk of a run, for a one-shot
        generation (the CLI's `generate`); the pipeline cannot run again after. `memory_limit`: plan as if
        at most this many bytes were available (`sdtorch.memory`; None: what the machine says)."""
        self.model = model
        self.vae_tiling = check_tiling(vae_tiling)
        self.release_after_use = release_after_use
        self.memory_limit = memory_limit
        self.released: set[str] = set()  # the networks released_after_use has freed
        self.passes_in_turn = False  # guidance's passes as separate UNet calls (sdtorch.guidance; low memory)
        self.model_path = Path(model_path) if model_path else (Path(model.source) if model.source else None)
        self.tokenizer = get_tokenizer(model.family.pad_id)
        self.adapters = adapters or Adapters()
        self.prompt_encoder = prompt_encoder_of(model, self.tokenizer, self.adapters)
        self.vae_record: dict[str, str] = {}  # "VAE hash", "VAE" of a chosen VAE (use_vae), as A1111 records it
        self.taesd = None  # the tiny autoencoder (use_taesd): previews, and the final decode of decoder="taesd"

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: str = "auto", dtype: str | None = None, *,
        lora_dir: str | os.PathLike | None = None, embeddings_dir: str | os.PathLike | None = None,
        vae: str | os.PathLike | None = None, taesd: str | os.PathLike | None = None,
        **runtime_options,
    ) -> Pipeline:
        """A model from a file or folder, with the LoRAs of `lora_dir` usable as `<lora:name:w>` in
        prompts and the textual-inversion embeddings of `embeddings_dir` by their names; `vae` and `taesd`
        as `use_vae` and `use_taesd` take them. `runtime_options` are `Runtime.choose`'s (weights,
        compile, vae_channels_last, unet_channels_last, keep_freed: `sdtorch.runtime`)."""
        runtime = Runtime.choose(device, dtype, **runtime_options)
        runtime.prepare()
        model = runtime.apply(load_model(path, dtype=runtime.dtype, device=runtime.device, weights=runtime.weights))
        widths = tuple(net.config.width for net in model.text_encoders)  # SDXL's embeddings have two sets
        pipe = cls(model, path, Adapters.from_folders(lora_dir, embeddings_dir, widths))
        pipe.passes_in_turn = runtime.low_memory
        if taesd is not None:
            pipe.use_taesd(taesd)
        return pipe.use_vae(vae) if vae is not None else pipe

    def use_vae(self, path: str | os.PathLike) -> Pipeline:
        """Decode (and encode) with the standalone VAE at `path` (a VAE file or diffusers `vae/` folder)
        instead of the model's own; recorded as A1111 records it ("VAE hash", "VAE")."""
        from sdtorch.loading.vae_file import use_vae, vae_record

        layouts = self.model.vae.encoder.memory_format, self.model.vae.decoder.memory_format  # the runtime's
        use_vae(self.model, path)
        self.model.vae.encoder.memory_format, self.model.vae.decoder.memory_format = layouts
        self.vae_record = vae_record(path)
        return self

    def use_taesd(self, path: str | os.PathLike) -> Pipeline:
        """Keep TAESD (a folder with taesd_decoder.* and/or taesd_encoder.*, or one of the files) beside the
        model, for requests with decoder="taesd" and for `TAESDPreview(pipe.taesd)`."""
        from sdtorch.taesd import TAESD

        taesd = TAESD.load(path, device=self.model.device, dtype=self.model.dtype)
        if taesd.config.latent_channels != self.model.latent_format.channels:
            raise SdtorchError(f"TAESD {path} decodes {taesd.config.latent_channels}-channel latents; this model's "
                               f"have {self.model.latent_format.channels}")
        self.taesd = taesd
        return self

    def _adapter_record(self, request: GenerationRequest, wanted: PromptAdapters) -> dict[str, str]:
        """What A1111 records of the adapters a generation used: "Lora hashes", "TI hashes", "Emphasis"."""
        record = {}
        if wanted.loras:
            record["Lora hashes"] = wanted.hashes
        used = embeddings_in(self.prompt_encoder, [wanted.prompt, request.negative_prompt])
        if used:
            record["TI hashes"] = ", ".join(f"{e.name}: {e.shorthash}" for e in used)
        return record

    @property
    def model_name(self) -> str | None:
        return self.model_path.stem if self.model_path else None

    @cached_property
    def model_hash(self) -> str | None:
        """A1111's "Model hash" (sha256 of the file, 10 hex digits), computed once per loaded model;
        None for a folder."""
        if self.model_path is None or not self.model_path.is_file():
            return None
        return model_hash(self.model_path)

    def decode(self, latents: torch.Tensor, request: GenerationRequest | None = None) -> torch.Tensor:
        """UNet-scale latents -> images (B, 3, H, W) in about [-1, 1], float32: by the model's VAE, or by TAESD's
        decoder where `request.decoder` is "taesd"."""
        if request is not None and request.decoder == "taesd":
            self._check_decoder(request)
            return self.taesd.decode(latents)
        with vae_tiling(self.vae_tiling), memory_limit(self.memory_limit), \
                passes_in_turn(self.passes_in_turn):
            return self.model.decode_latents(latents)

    def _check_decoder(self, request: GenerationRequest) -> None:
        if request.decoder == "taesd" and (self.taesd is None or self.taesd.decoder is None):
            raise SdtorchError('decoder "taesd" needs TAESD\'s decoder weights: --taesd PATH, '
                               "Pipeline.load(..., taesd=PATH) or pipe.use_taesd(PATH)")

    @torch.no_grad()
    def run(self, request: GenerationRequest, callback: StepCallback | None = None) -> GenerationResult:
        """Generate what `request` asks for; `callback` receives a `StepEvent` after every step. A batch that
        does not fit in memory at once runs in chunks (`run_chunks`), its images those of one run."""
        started = time.perf_counter()
        request = request.resolved(self.model)
        parts = list(self.run_chunks(request, callback, hold_results=True))
        if len(parts) == 1:
            return parts[0]
        whole = parts[0].request.replace(seed=request.seed, batch=request.batch, variation_seed=request.variation_seed)
        return GenerationResult([image for part in parts for image in part.images], whole,
                                torch.cat([part.latents for part in parts]), time.perf_counter() - started,
                                list(dict.fromkeys(w for part in parts for w in part.warnings)))

    def plan(self, request: GenerationRequest, hold_results: bool = True) -> MemoryPlan:
        """How the resolved `request` fits in the memory there is (`sdtorch.memory.plan`): images per chunk, the
        VAE decode's way; one SdtorchError line where not even one image fits."""
        with memory_limit(self.memory_limit):
            return memory.plan(self.model, request, tiling=self.vae_tiling, hold_results=hold_results)

    @torch.no_grad()
    def run_chunks(self, request: GenerationRequest, callback: StepCallback | None = None, *,
                   hold_results: bool = False) -> Iterator[GenerationResult]:
        """`run` a chunk of images at a time, as many as the memory allows (`plan`, checked before any work),
        yielding each chunk's result as it is made: image i of the batch has seed + i however the batch is cut,
        so the images are those of one run. A caller that writes each chunk and lets it go (the CLI) holds one
        chunk's pictures at a time; `hold_results` says the caller keeps them all (`run`), which the plan counts."""
        request = request.resolved(self.model)
        self._check_decoder(request)  # before sampling, not after
        if self.released:
            raise SdtorchError(f"this pipeline has released its {' and '.join(sorted(self.released))} after a one-shot "
                               "generation (release_after_use); load the model again to generate more")
        per_chunk = self.plan(request, hold_results).per_chunk
        for start in range(0, request.batch, per_chunk):
            n = min(per_chunk, request.batch - start)
            yield self._run_chunk(_chunk(request, start, n), callback,
                                  release=self.release_after_use and start + n == request.batch)

    def _run_chunk(self, request: GenerationRequest, callback: StepCallback | None, release: bool) -> GenerationResult:
        started = time.perf_counter()
        model = self.model
        generators = [create_generator(request.rng, s) for s in request.seeds]  # "cpu": torch's, as diffusers

        wanted = self.adapters.for_prompt(request.prompt)  # <lora:...> tags out of the prompt
        options = {k: v for k, v in request.options.items() if k not in ("VAE hash", "VAE")}  # the VAE used, below
        request = request.replace(options={**options, **self._adapter_record(request, wanted), **self.vae_record})
        # On the CPU the steps reuse the memory they free (the VAE's passes excepted): `runtime.freed_memory_reused`.
        reuse = freed_memory_reused() if model.device.type == "cpu" else nullcontext()
        with apply_loras(model, wanted.loras) as applied, vae_tiling(self.vae_tiling), \
                memory_limit(self.memory_limit), passes_in_turn(self.passes_in_turn), reuse:
            result = self._sample(request, wanted.prompt, generators, callback, started, release)
        result.warnings += applied.warnings  # LoRA layers that matched nothing in this model
        return result

    def _release(self, *names: str) -> None:
        """Free networks that will not run again (`release_after_use`): their weights go to the meta device, so
        that a later use fails loudly rather than computing on nothing."""
        for name in names:
            if getattr(self.model, name, None) is not None:
                getattr(self.model, name).to("meta")
                self.released.add(name)
        release_scratch()  # sized to the largest layer run so far; the next network makes its own
        return_freed_memory()

    def _sample(self, request, prompt, generators, callback, started, release=False) -> GenerationResult:
        model = self.model
        guided = request.cfg_scale > 1  # as diffusers: no unconditional pass at <= 1
        cond, uncond = encode(self.prompt_encoder, prompt, request.negative_prompt if guided else None,
                              request.steps, request.clip_skip, request.emphasis,
                              zero_empty_negative=model.config.zero_empty_negative and request.compat != "a1111")
        if release:  # the prompts are encoded for good: the text encoders' memory is the UNet's now
            self._release("text_encoder", "text_encoder_2")

        if request.mask is not None or request.outpaint is not None or is_inpainting_model(model):  # sdtorch.inpaint
            return inpaint(self, request, cond, uncond, generators, callback, started)
        if request.compat == "a1111":
            latents = self._sample_a1111(request, cond, uncond, callback)
            if release:
                self._release("unet")
            images = a1111_images(self.decode(latents, request))
            return GenerationResult(images, request, latents, time.perf_counter() - started)
        init_latents, noise = self.start_latents(request, generators)
        cutoff = feature_cache = None  # the fast modes, each fed the sampler's steps
        if request.cfg_cutoff is not None and uncond is not None:  # guidance for the first steps only
            run = request.steps - (img2img_start(request.steps, request.strength) if request.img2img else 0)
            cutoff = GuidanceCutoff(request.cfg_cutoff, run)
            callback = _chain(cutoff.step_done, callback)
        if request.deep_cache is not None:  # deep UNet features reused between whole steps
            feature_cache = FeatureCache(request.deep_cache)
            callback = _chain(feature_cache.step_done, callback)
        denoiser = Denoiser(guided_model(model.unet, cond, uncond, request.cfg_scale, request.batch,
                                         model.latent_format.downscale, cutoff, feature_cache),
                            model.schedule, model.config.prediction_type)
        latents = sample(
            request.sampler,
            denoiser,
            noise,
            request.steps,
            schedule=request.schedule,
            noise_source=GeneratorNoise(noise, generators),
            init_latents=init_latents,
            strength=request.strength if request.img2img else 1.0,
            eta=request.eta,
            callback=callback,
        )
        if request.hires:  # sdtorch.hires: upscale, then image-to-image at the large size
            latents = hires_pass(self, request, latents, cond, uncond, generators, callback)
        if release:  # sampling is done: the UNet's memory is the VAE decode's now
            self._release("unet")
        images = to_pil(self.decode(latents, request))
        return GenerationResult(images, request, latents, time.perf_counter() - started)

    def _sample_a1111(self, request, cond, uncond, callback) -> torch.Tensor:
        """A1111's path (samplers.run.sample_a1111): its noise (A1111Noise: per-image generators, variation
        seed, seed resize, ENSD), the model's schedule as CompVis holds it, its img2img rule and options."""
        model = self.model
        init_latents, noise, noise_source = self.a1111_start_latents(request)
        denoiser = Denoiser(guided_model(model.unet, cond, uncond, request.cfg_scale, request.batch,
                                         model.latent_format.downscale),
                            compvis_schedule(model.config), model.config.prediction_type)
        options, _ = a1111_options(request.sampler, request.schedule, dict(request.options))
        if request.eta:  # DDIM's eta (A1111's "Eta DDIM")
            options["eta"] = request.eta
        return sample_a1111(
            request.sampler, denoiser, noise, request.steps, schedule=request.schedule, noise_source=noise_source,
            seeds=request.seeds, init_latents=init_latents, strength=request.strength if request.img2img else 1.0,
            options=options, callback=callback,
        )

    def a1111_start_latents(self, request: GenerationRequest) -> tuple[torch.Tensor | None, torch.Tensor, A1111Noise]:
        """A1111's start: the init image's latents (img2img: the VAE posterior's mean for every image, where
        A1111 samples it from its unseeded global generator), the first draw of its per-image generators
        (B, C, H/8, W/8), and the noise source that continues them."""
        model = self.model
        init_latents = None
        if request.img2img:
            pixels = prepare_init_image(request.init_image, request.width, request.height)  # (1, 3, H, W)
            mean = tiled_encode(model.vae, pixels.to(model.device, model.dtype)).mean.float()
            init_latents = model.latent_format.from_vae(mean).repeat(request.batch, 1, 1, 1)
        f = model.latent_format.downscale
        variation = None if request.variation_seed is None else [request.variation_seed + i
                                                                 for i in range(request.batch)]
        source = A1111Noise((model.latent_format.channels, request.height // f, request.width // f), request.seeds,
                            request.rng, subseeds=variation, subseed_strength=request.variation_strength,
                            seed_resize_from=request.seed_resize_from or (0, 0), ensd=request.ensd,
                            device=model.device)
        return init_latents, source.first(), source

    def start_latents(
        self, request: GenerationRequest, generators: list[torch.Generator]
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Where sampling starts: the init image's latents (img2img, else None) and the unit noise,
        (B, C, H/8, W/8) each. Each generator draws its image's VAE sample before its noise, as
        diffusers does."""
        model = self.model
        init_latents = None
        if request.img2img:
            pixels = prepare_init_image(request.init_image, request.width, request.height)  # (1, 3, H, W)
            if any(isinstance(g, PhiloxGenerator) for g in generators):  # --rng gpu: CUDA's numbers
                posterior = tiled_encode(model.vae, pixels.to(model.device, model.dtype))
                latents = torch.cat([posterior.mean.float() + posterior.std.float() * g.randn(posterior.mean.shape)
                                     .to(posterior.mean.device) for g in generators])
                init_latents = model.latent_format.from_vae(latents).to(model.device)
            else:
                init_latents = model.encode_images(pixels, generators)
        f = model.latent_format.downscale
        shape = (1, model.latent_format.channels, request.height // f, request.width // f)
        noise = torch.cat([GeneratorNoise(torch.empty(shape), g)() for g in generators])
        return init_latents, noise.to(model.device)

    def generate(
        self,
        request: GenerationRequest | str | None = None,
        /,
        *,
        callback: StepCallback | None = None,
        progress: bool = True,
        **settings,
    ) -> GenerationResult:
        """The Python API's convenience: `generate("a cat", steps=20, seed=7)` builds the request from
        keywords (`GenerationRequest`'s fields; a request given first is updated by them), shows a
        progress bar on stderr unless `progress=False`, and runs it."""
        if isinstance(request, GenerationRequest):
            request = request.replace(**settings)
        elif isinstance(request, str):
            request = GenerationRequest(prompt=request, **settings)
        else:
            request = GenerationRequest(**settings)
        if not progress:
            return self.run(request, callback)
        from sdtorch.progress import StepProgress

        with StepProgress(request) as bar:
            return self.run(request, bar.chain(callback))
