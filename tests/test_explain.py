"""`sdtorch explain`: the report's numbers against independent computations, its image against
`sdtorch generate`'s, its page in headless Chromium.

One explained run of the embedded model (few steps) is shared by the tests; while it runs, forward
hooks on every cross-attention module compute the DAAM maps again from the modules' own inputs with
an explicit per-head softmax, for the attention test."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdtorch.cli import main
from sdtorch.explain.report import write_report
from sdtorch.explain.run import record_generation
from sdtorch.pipeline import Pipeline, default_model_path
from sdtorch.request import GenerationRequest
from sdtorch.tokenizer import get_tokenizer

PROMPT = "a red circle on a bluish background"  # "bluish" is two tokens: its map is their mean
STEPS, SEED = 4, 3
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


class HookedMaps:
    """DAAM by forward hooks: for each cross-attention module call, q = to_q(x), k = to_k(context) of the
    conditional rows (the second half of a guided batch), softmax(q_h k_h^T / sqrt(d)) for every head h
    one by one, the mean over heads, upsampled bicubically to the latent size, clamped at 0."""

    def __init__(self, unet, latent: int):
        self.latent, self.sums, self.calls, self.step_sum, self.step_calls, self.per_step = latent, None, 0, None, 0, []
        self.handles = [m.register_forward_hook(self.hook) for name, m in unet.named_modules()
                        if name.endswith("attn2")]
        assert len(self.handles) > 0

    def hook(self, module, inputs, output):
        x, context = inputs
        half = x.shape[0] // 2
        x, context = x[half:].float(), context[half:].float()
        q, k = module.to_q(x)[0], module.to_k(context)[0]  # (T, C), (K, C): batch of one image
        heads = module.heads
        d = q.shape[1] // heads
        probs = []
        for h in range(heads):
            scores = q[:, h * d:(h + 1) * d] @ k[:, h * d:(h + 1) * d].T / math.sqrt(d)  # (T, K)
            e = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
            probs.append(e / e.sum(dim=1, keepdim=True))
        mean = torch.stack(probs).mean(0)  # (T, K)
        side = math.isqrt(mean.shape[0])
        maps = mean.T.reshape(1, -1, side, side)
        if side != self.latent:
            maps = F.interpolate(maps, size=(self.latent, self.latent), mode="bicubic", align_corners=False)
        maps = maps.clamp(min=0)[0]
        self.step_sum = maps if self.step_sum is None else self.step_sum + maps
        self.step_calls += 1

    def step(self, event):
        self.sums = self.step_sum if self.sums is None else self.sums + self.step_sum
        self.calls += self.step_calls
        self.per_step.append(self.step_sum / self.step_calls)
        self.step_sum, self.step_calls = None, 0

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(default_model_path())


@pytest.fixture(scope="module")
def explained(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("explain")
    latent = pipe.model.config.image_size // pipe.model.latent_format.downscale
    hooks = HookedMaps(pipe.model.unet, latent)
    try:  # what `explain` does, with the recording kept for the tests
        rec = record_generation(pipe, GenerationRequest(prompt=PROMPT, steps=STEPS, seed=SEED), out,
                                words=["red", "bluish"], callback=hooks.step)
    finally:
        hooks.close()
    written = write_report(rec, out)
    report = json.loads((out / "report.json").read_text())
    return out, written, report, hooks, rec


def test_attention_maps_equal_hooked_softmax(explained):
    out, _, report, hooks, _ = explained
    expected = (hooks.sums / hooks.calls).numpy()  # (K, h, w)
    tensors = np.load(out / "tensors.npz")
    np.testing.assert_allclose(tensors["attention"], expected, rtol=1e-4, atol=1e-6)
    assert hooks.calls == STEPS * len(report["attention_layers"])

    ids = get_tokenizer()(PROMPT)[0].tolist()
    words = {w["name"]: w for w in report["words"]}
    assert [w["word"] for w in report["words"]] == PROMPT.split()
    for word in PROMPT.split():
        pieces = get_tokenizer().encode(word)
        start = next(i for i in range(1, 77) if ids[i:i + len(pieces)] == pieces)
        positions = list(range(start, start + len(pieces)))
        if word in ("red", "bluish", "circle"):
            assert words[word]["positions"] == positions
            saved = np.load(out / "attention" / f"{word}.npy")
            assert saved.dtype == np.float32 and saved.shape == expected.shape[1:]
            np.testing.assert_allclose(saved, expected[positions].mean(0), rtol=1e-4, atol=1e-6)
            assert (out / "attention" / f"{word}.png").is_file()
    assert len(words["bluish"]["positions"]) == 2
    assert (out / "attention" / "a-2.npy").is_file()  # the second "a" has its own map


def test_step_maps_follow_the_steps(explained):
    _, _, _, hooks, rec = explained
    assert list(rec.step_word_maps) == ["red", "bluish"]
    assert len(hooks.per_step) == STEPS
    for word in ("red", "bluish"):
        positions = list(next(w.positions for w in rec.words if w.name == word))
        assert len(rec.step_word_maps[word]) == STEPS
        for got, want in zip(rec.step_word_maps[word], hooks.per_step):
            np.testing.assert_allclose(got, want[positions].mean(0).numpy(), rtol=1e-4, atol=1e-6)
    # the steps' maps differ (the map is not one picture repeated), and their mean is the run's map
    maps = np.stack(rec.step_word_maps["red"])
    assert np.abs(maps[0] - maps[-1]).max() > 1e-4
    np.testing.assert_allclose(maps.mean(0), rec.word_maps["red"], rtol=1e-4, atol=1e-6)


def test_forward_noising_follows_the_schedule_formula(pipe, explained):
    out, _, report, _, _ = explained
    config = pipe.model.config
    assert config.beta_schedule == "scaled_linear"
    betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps,
                        dtype=np.float64) ** 2
    abar = np.cumprod(1 - betas)
    t = np.load(out / "tensors.npz")
    x0, noise = t["x0"].astype(np.float64), t["training_noise"].astype(np.float64)
    assert np.std(noise) > 0.5 and np.abs(x0).max() > 0.1
    for i, step in enumerate(t["training_t"]):
        a = abar[step]
        assert report["training"][i]["alpha_cumprod"] == pytest.approx(a, rel=1e-5)
        np.testing.assert_allclose(t["training_noised"][i], math.sqrt(a) * x0[0] + math.sqrt(1 - a) * noise[0],
                                   rtol=1e-4, atol=1e-5)
    assert all(math.isfinite(e["mse"]) for e in report["training"])


def test_token_table_matches_the_tokenizer(explained):
    _, _, report, _, _ = explained
    tok = get_tokenizer()
    ids = tok(PROMPT)[0].tolist()
    rows = report["tokens"]
    assert [r["id"] for r in rows] == ids
    n = len(tok.encode(PROMPT))
    kinds = ["BOS"] + ["prompt"] * n + ["EOS"] + ["padding"] * (77 - n - 2)
    assert [r["kind"] for r in rows] == kinds
    assert [r["text"] for r in rows[1:n + 1]] == [tok.decode([i]) for i in ids[1:n + 1]]
    assert "".join(r["text"] for r in rows[1:n + 1]).replace(" ", "") == PROMPT.replace(" ", "")


def test_report_json_records_the_run(pipe, explained):
    _, _, report, _, _ = explained
    assert report["settings"]["prompt"] == PROMPT and report["settings"]["seed"] == SEED
    assert len(report["sigmas"]) == STEPS and report["sigmas"] == sorted(report["sigmas"], reverse=True)
    assert len(report["distances"]) == STEPS and report["distances"][-1] == 0.0
    assert report["outline_step"] is not None and report["distances"][report["outline_step"]] <= 0.1
    assert all(report["timings"][k] >= 0 for k in ("text_encoder_s", "unet_sampling_s", "vae_decode_s"))
    assert report["model"]["unet"]["parameters"] == sum(p.numel() for p in pipe.model.unet.parameters())


def test_image_equals_generate(explained, tmp_path):
    out, written, _, _, _ = explained
    generated = tmp_path / "generated.png"
    assert main(["generate", PROMPT, "--steps", str(STEPS), "--seed", str(SEED), "--out", str(generated),
                 "--quiet"]) == 0
    assert written["image"].read_bytes() == generated.read_bytes()
    steps = sorted(p.name for p in (out / "steps").iterdir())
    assert steps[:2] == ["000-latents.png", "000-predicted.png"] and "steps.gif" in steps and "strip.png" in steps


def test_cli_explain_escapes_the_prompt(tmp_path):
    # the embedded model, out of the box (it is also cheaper to run than the tiny random checkpoint)
    prompt = 'a red <script>alert("x")</script> circle & <img src=x onerror=alert(1)>'
    out = tmp_path / "report"
    assert main(["explain", prompt, "--steps", "3", "--seed", "1", "--out", str(out), "--quiet",
                 "--decode-every", "2"]) == 0
    html = (out / "report.html").read_text()
    assert "<script" not in html.lower() and "<img src=x" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["prompt"] == prompt
    # --decode-every 2: the full VAE at steps 0 and 2 (the last) only
    # the last step's decode equals the final image to within rounding (they decode in different batches)
    assert report["distances"][1] is None and report["distances"][0] is not None and report["distances"][2] < 1e-3
    assert sorted(p.name for p in (out / "steps").glob("*-predicted.png")) == ["000-predicted.png", "002-predicted.png"]
    assert main(["explain", "x", "--out", str(out), "--decode-every", "0"]) == 2


@pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="Debian's chromium is not installed")
def test_report_renders_offline_in_chromium(explained):
    from playwright.sync_api import sync_playwright

    from sdtorch.explain.report import SECTIONS

    out, _, report, _, _ = explained
    requests = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.goto((out / "report.html").as_uri())
            page.wait_for_load_state("load")
            for section in SECTIONS:
                box = page.locator(f"section#{section}").bounding_box()
                assert box is not None and box["height"] > 50, section
                figures = page.locator(f"section#{section} img, section#{section} svg").count()
                assert figures > 0 or section == "components", section  # components: a table of numbers
                assert page.locator(f"section#{section} h2").inner_text() == SECTIONS[section]
            assert page.locator("section#components table tbody tr").count() == 3
            broken = page.evaluate("[...document.images].filter(i => !i.complete || i.naturalWidth === 0).length")
            assert broken == 0
            assert page.evaluate("document.images.length") > 3 * STEPS
            rows = page.locator("table.tokens tbody tr").count()
            assert rows == len([t for t in report["tokens"] if t["kind"] != "padding"]) + 1
            shot = os.environ.get("SDTORCH_EXPLAIN_SCREENSHOT")
            if shot:
                page.screenshot(path=shot, full_page=False)
        finally:
            browser.close()
    others = [u for u in requests if not u.startswith("data:") and u != (out / "report.html").as_uri()]
    assert others == []
