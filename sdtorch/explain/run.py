"""One real generation, recorded for "The Illustrated Stable Diffusion": `record_generation`.

The generation is `Pipeline.run` itself; everything else listens (step events, the attention seam)
or runs beside it afterwards (the guidance probe, the training example, the VAE round trip), so the
image is exactly what `sdtorch generate` makes with the same settings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdtorch.adapters.lora import apply_loras
from sdtorch.conditioning import added_vector, encode
from sdtorch.explain.record import AttentionRecorder, WordTokens, word_map, word_tokens
from sdtorch.images import prepare_init_image, to_pil
from sdtorch.layers import swapped_attention
from sdtorch.pipeline import GenerationResult, Pipeline
from sdtorch.preview import LatentPreview, StepRecorder, save_steps
from sdtorch.request import GenerationRequest
from sdtorch.samplers import StepEvent

OUTLINE_DISTANCE = 0.1  # RMS distance (pixels in [0, 1]) of a step's predicted image to the final one
TRAINING_FRACTIONS = (0.05, 0.25, 0.5, 0.75, 0.95)  # training timesteps shown, as fractions of T
TRAINING_SEED_OFFSET = 1  # the training example's noise: torch generator seeded with seed + this


def guidance_steps(total: int) -> list[int]:
    """The steps whose predictions the guidance figure shows (1-based inputs come from step k - 1)."""
    return sorted({k for k in (1, total // 4, total // 2, (3 * total) // 4, total - 1) if 1 <= k < total})


@dataclass
class GuidanceProbe:
    step: int
    sigma: float
    t: float
    x: torch.Tensor  # (1, C, h, w) the UNet's input (VP) of that step
    uncond: torch.Tensor  # raw UNet outputs (eps or v) for image 0
    cond: torch.Tensor
    guided: torch.Tensor


@dataclass
class TrainingExample:
    t: int
    alpha_cumprod: float
    noised: torch.Tensor  # (1, C, h, w) sqrt(abar) x0 + sqrt(1 - abar) noise
    predicted: torch.Tensor  # the UNet's output at (noised, t, the prompt's context)
    mse: float


@dataclass
class Recording:
    """What `record_generation` measured; `sdtorch.explain.report` draws it."""

    request: GenerationRequest  # resolved
    result: GenerationResult
    model_name: str | None
    model_hash: str | None
    components: dict
    timings: dict
    tokens: list[dict]  # per position of every chunk: chunk, position, id, text, kind
    context: torch.Tensor  # (77k, width) the text encoder's output for the prompt
    sigmas: list[float]
    steps: StepRecorder
    previews: list[Image.Image]  # linear preview of x at every step
    decoded: dict[int, tuple[Image.Image, Image.Image]]  # step -> (latents, predicted), full VAE
    distances: list[float | None]
    outline_step: int | None
    decode_every: int
    guidance: list[GuidanceProbe]
    words: list[WordTokens]
    maps: torch.Tensor  # (K, h, w) image 0, over heads, layers and steps
    word_maps: dict[str, np.ndarray]  # name -> (h, w) float32
    step_word_maps: dict[str, list[np.ndarray]]  # chosen word -> (h, w) per step
    attention_layers: list[str]
    x0: torch.Tensor  # (1, C, h, w) the final image encoded (posterior mean, UNet scale)
    training_noise: torch.Tensor
    training: list[TrainingExample]
    roundtrip: Image.Image
    roundtrip_error: dict
    steps_dir: Path
    extra: dict = field(default_factory=dict)


SPECIAL_TEXT = {"BOS": "<|startoftext|>", "EOS": "<|endoftext|>", "padding": "<|endoftext|>",
                "embedding": "(embedding)"}


def token_table(pipe: Pipeline, chunks) -> list[dict]:
    tok = pipe.tokenizer
    rows = []
    for c, chunk in enumerate(chunks):
        embedded = {slot.start + i for slot in chunk.embeddings for i in range(slot.n_vectors)}
        ended = False
        for j, i in enumerate(chunk.ids):
            if j == 0 and i == tok.bos_id:
                kind = "BOS"
            elif j in embedded:
                kind = "embedding"
            elif i == tok.eos_id and not ended:
                kind, ended = "EOS", True
            elif ended:
                kind = "padding"
            else:
                kind = "prompt"
            text = SPECIAL_TEXT.get(kind) or tok.decode([i])
            rows.append({"chunk": c, "position": j, "id": int(i), "text": text, "kind": kind,
                         "weight": float(chunk.weights[j])})
    return rows


def rms(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a, dtype=np.float64) / 255.0
    y = np.asarray(b.resize(a.size), dtype=np.float64) / 255.0
    return float(np.sqrt(((x - y) ** 2).mean()))


def parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def probes(model, request, cond, uncond, inputs: list[tuple[int, float, torch.Tensor]]) -> list[GuidanceProbe]:
    """For each (step, sigma, that step's UNet input x (VP)): the UNet's unconditional and conditional
    outputs, computed directly (all in one batched call), and their guided combination as
    `sdtorch.guidance` makes it (one AND-part)."""
    if not inputs:
        return []
    ts = [float(model.schedule.sigma_to_t(torch.tensor(sigma))) for _, sigma, _ in inputs]
    x = torch.cat([x for _, _, x in inputs] * 2)  # (2n, C, h, w): all unconditional rows, then conditional
    contexts = torch.cat([uncond.at(k + 1)[0][1] for k, _, _ in inputs] + [cond.at(k + 1)[0][1] for k, _, _ in inputs])
    raw = model.unet(x.to(model.dtype), torch.tensor(ts * 2), contexts, _added(model, x, [
        c.pooled_at(k + 1) for c in (uncond, cond) for k, _, _ in inputs])).float()
    out = []
    for i, ((step, sigma, xi), t) in enumerate(zip(inputs, ts)):
        e_u, e_c = raw[i : i + 1], raw[len(inputs) + i : len(inputs) + i + 1]
        guided = e_u + request.cfg_scale * (e_c - e_u) if request.cfg_scale > 1 else e_c
        out.append(GuidanceProbe(step, sigma, t, xi.float().cpu(), e_u.cpu(), e_c.cpu(), guided.cpu()))
    return out


def _added(model, x: torch.Tensor, pooled: list) -> torch.Tensor | None:
    """SDXL's added vector for UNet rows x (n, C, h, w) with the given pooled embeddings ([(1, P)] or [None] per
    row, as `Conditioning.pooled_at` gives them), as `sdtorch.guidance` builds it; None for other families."""
    if pooled[0] is None:
        return None
    f = model.latent_format.downscale
    return added_vector(torch.cat([p[0] for p in pooled]), x.shape[-2] * f, x.shape[-1] * f).to(model.dtype)


def training_examples(model, image: Image.Image, context: torch.Tensor, seed: int, pooled=None):
    """The article's training example: `image` encoded (posterior mean), noised to a few training
    timesteps with one seeded noise, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, and the UNet's
    prediction at each with its MSE against the target (eps, or v for a v-prediction model)."""
    pixels = prepare_init_image(image).to(model.device, model.dtype)  # (1, 3, H, W) in [-1, 1]
    x0 = model.latent_format.from_vae(model.vae.encode(pixels).mean.float())  # (1, C, h, w)
    generator = torch.Generator().manual_seed(seed + TRAINING_SEED_OFFSET)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    n_train = model.schedule.num_train_timesteps
    ts = [min(n_train - 1, int(round(fraction * n_train))) for fraction in TRAINING_FRACTIONS]
    abars = [float(model.schedule.alphas_cumprod[t]) for t in ts]
    noised = torch.cat([a**0.5 * x0 + (1 - a) ** 0.5 * noise for a in abars])  # (n, C, h, w)
    predicted = model.unet(noised.to(model.dtype), torch.tensor([float(t) for t in ts]),
                           context.repeat(len(ts), 1, 1), _added(model, noised, [pooled] * len(ts))).float()
    examples = []
    for i, (t, a) in enumerate(zip(ts, abars)):
        target = noise if model.config.prediction_type == "epsilon" else a**0.5 * noise - (1 - a) ** 0.5 * x0
        mse = float(((predicted[i : i + 1] - target) ** 2).mean())
        examples.append(TrainingExample(t, a, noised[i : i + 1].cpu(), predicted[i : i + 1].cpu(), mse))
    return x0, noise, examples


class BatchedDecode:
    """`save_steps`'s decode, served from a few batched VAE calls made up front (one call per image is
    several times slower on a CPU); anything not prepared is decoded on the spot."""

    def __init__(self, decode, latents: list[torch.Tensor], pixels: int):
        self.decode = decode
        flat = torch.cat(latents)
        size = max(1, 2**20 // pixels)  # rows per call: all of them for small images, a few at 512x512
        self.pairs = [(flat[i : i + 1], img) for j in range(0, len(flat), size)
                      for i, img in zip(range(j, j + size), self.decode(flat[j : j + size]).cpu().split(1))]

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        for key, image in self.pairs:
            if key.shape == latents.shape and torch.equal(key, latents.to(key.device, key.dtype)):
                return image
        return self.decode(latents)


@torch.no_grad()
def record_generation(
    pipe: Pipeline, request: GenerationRequest, out: str | Path, *, decode_every: int = 1,
    words: list[str] | None = None, callback=None,
) -> Recording:
    """Run `request` once on `pipe` while recording; write `out/steps/` (as --save-steps does) and
    return what the report needs. `words`: the words whose maps are followed over the steps (default:
    all of the prompt's)."""
    out = Path(out)
    model = pipe.model
    request = request.with_seed()
    resolved = request.resolved(model)
    guided = resolved.cfg_scale > 1
    f = model.latent_format.downscale
    latent_size = (resolved.height // f, resolved.width // f)
    wanted = pipe.adapters.for_prompt(resolved.prompt)  # <lora:...> tags out, as the pipeline does
    prompt = wanted.prompt

    with apply_loras(model, wanted.loras):  # what runs beside the generation sees the same networks
        started = time.perf_counter()
        cond, uncond = encode(pipe.prompt_encoder, prompt, resolved.negative_prompt, resolved.steps,
                              resolved.clip_skip, resolved.emphasis,
                              zero_empty_negative=model.config.zero_empty_negative and resolved.compat != "a1111")
        text_seconds = time.perf_counter() - started
    chunks = pipe.prompt_encoder.chunks(prompt)
    found = word_tokens(pipe.tokenizer, chunks, prompt)
    chosen = [w for w in found if not words or w.word.lower() in {x.lower() for x in words}
              or w.name in words]
    keep = sorted({p for w in chosen for p in w.positions})
    index = {p: i for i, p in enumerate(keep)}

    attention_recorder = AttentionRecorder(latent_size, resolved.batch, guided, keep)
    steps = StepRecorder()
    sigmas: list[float] = []
    probe_inputs: list[tuple[int, float, torch.Tensor]] = []  # (step, sigma, that step's UNet input x)
    probe_at = {k - 1 for k in guidance_steps(resolved.steps)}
    clock = {"overhead": 0.0, "last_in": None, "last_out": None}

    def listen(event: StepEvent) -> None:
        clock["last_in"] = time.perf_counter()
        attention_recorder(event)
        steps(event)
        sigmas.append(event.sigma)
        if event.step in probe_at and event.step + 1 < event.total:
            probe_inputs.append((event.step + 1, event.sigma, event.x[:1].clone()))
        if callback is not None:
            callback(event)
        clock["last_out"] = time.perf_counter()
        clock["overhead"] += clock["last_out"] - clock["last_in"]

    run_started = time.perf_counter()
    with swapped_attention(model.unet, attention_recorder.choose):
        result = pipe.run(request, listen)
    run_ended = time.perf_counter()
    timings = {
        "text_encoder_s": text_seconds,
        # run start .. the last step event, less the time spent in our callbacks and the prompt's encoding
        "unet_sampling_s": max(0.0, (clock["last_out"] or run_started) - run_started - clock["overhead"]
                               - text_seconds),
        "vae_decode_s": run_ended - (clock["last_out"] or run_started),
        "recording_in_callbacks_s": clock["overhead"],
        "run_s": run_ended - run_started,
    }

    # Steps: the full VAE every `decode_every` steps (and the last), as --save-steps writes them.
    total = len(steps.steps)
    kept = [s for s in steps.steps if s[0] % decode_every == 0 or s[0] == total - 1]
    t0 = time.perf_counter()
    steps_dir = out / "steps"
    rows = [t[b : b + 1] for _, _, x, d in kept for t in (x, d) for b in range(x.shape[0])]
    save_steps(steps_dir, StepRecorder(kept), BatchedDecode(pipe.decode, rows, resolved.width * resolved.height), None)
    folder = steps_dir if resolved.batch == 1 else steps_dir / "image-0"
    decoded = {s[0]: (Image.open(folder / f"{s[0]:03d}-latents.png").convert("RGB"),
                      Image.open(folder / f"{s[0]:03d}-predicted.png").convert("RGB")) for s in kept}
    timings["steps_decode_s"] = time.perf_counter() - t0
    preview = LatentPreview.fit(model.vae)
    previews = [preview(x[:1])[0] for _, _, x, _ in steps.steps]
    final = result.images[0]
    distances = [rms(decoded[i][1], final) if i in decoded else None for i in range(total)]
    outline = next((i for i, d in enumerate(distances) if d is not None and d <= OUTLINE_DISTANCE), None)

    # Attention: image 0's maps over the run, per word, and the chosen words per step.
    maps = attention_recorder.mean()[0]  # (K, h, w)
    word_maps = {w.name: word_map(maps, w.positions).numpy().astype(np.float32) for w in found}
    step_word_maps = {w.name: [word_map(s[0], tuple(index[p] for p in w.positions)).numpy().astype(np.float32)
                               for s in attention_recorder.steps] for w in chosen}

    with apply_loras(model, wanted.loras):
        guidance = probes(model, resolved, cond, uncond, probe_inputs)
        x0, noise, training = training_examples(model, final, cond.at(1)[0][1], resolved.seed,
                                                 cond.pooled_at(1))
    roundtrip = to_pil(pipe.decode(x0))[0]
    a, b = np.asarray(final, dtype=np.float64), np.asarray(roundtrip, dtype=np.float64)
    mse = float(((a - b) ** 2).mean())
    roundtrip_error = {"mse_255": mse, "psnr_db": float(10 * np.log10(255.0**2 / mse)) if mse > 0 else float("inf"),
                       "mean_abs_255": float(np.abs(a - b).mean())}

    text_encoder, unet, vae = model.text_encoder, model.unet, model.vae
    components = {
        "text_encoder": {"parameters": parameters(text_encoder), "layers": model.config.text.layers,
                         "width": model.config.text.width, "output": list(cond.at(1)[0][1].shape)},
        "unet": {"parameters": parameters(unet), "latent": [resolved.batch * (2 if guided else 1),
                                                             model.latent_format.channels, *latent_size],
                 "cross_attention_layers": len(attention_recorder.layers)},
        "vae": {"parameters": parameters(vae), "latent": [model.latent_format.channels, *latent_size],
                "image": [3, resolved.height, resolved.width], "downscale": f,
                "scaling_factor": model.latent_format.scale},
        "dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device),
        "prediction": model.config.prediction_type, "family": model.config.family,
    }
    return Recording(
        request=result.request, result=result, model_name=pipe.model_name, model_hash=pipe.model_hash,
        components=components, timings=timings, tokens=token_table(pipe, chunks),
        context=cond.at(1)[0][1][0].float().cpu(), sigmas=sigmas, steps=steps, previews=previews,
        decoded=decoded, distances=distances, outline_step=outline, decode_every=decode_every, guidance=guidance,
        words=found, maps=maps, word_maps=word_maps, step_word_maps=step_word_maps,
        attention_layers=attention_recorder.layers, x0=x0.cpu(), training_noise=noise.cpu(), training=training,
        roundtrip=roundtrip, roundtrip_error=roundtrip_error, steps_dir=steps_dir,
    )
