"""Textual-inversion embeddings: the real files people share, the formats diffusers and A1111
write, and files that are corrupt or hostile."""

from __future__ import annotations

import base64
import hashlib
import json
import pathlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file, save_file

from sdtorch.adapters.textual_inversion import load_embedding, load_embeddings
from sdtorch.errors import SdtorchError

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "embeddings"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"real embeddings not found at {REAL} (CI has them)")


def sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


# --- the real files ------------------------------------------------------------------------


@needs_real
def test_easynegative_safetensors():
    e = load_embedding(REAL / "EasyNegative.safetensors")
    assert e.name == "EasyNegative" and e.vectors.shape == (8, 768) and e.vectors.dtype == torch.float32
    assert torch.equal(e.vectors, load_file(str(REAL / "EasyNegative.safetensors"))["emb_params"])
    assert e.shorthash == sha12(REAL / "EasyNegative.safetensors") and e.step is None


@needs_real
def test_a1111_pt():
    e = load_embedding(REAL / "bad_prompt_version2.pt")
    raw = torch.load(REAL / "bad_prompt_version2.pt", map_location="cpu", weights_only=True)  # saved on CUDA
    assert e.name == "bad_prompt_version2" and e.vectors.shape == (8, 768)
    assert torch.equal(e.vectors, raw["string_to_param"]["*"].float())
    assert (e.step, e.sd_checkpoint, e.sd_checkpoint_name) == (12000, "74906b9a", "Novel50WD50")


@needs_real
def test_embedding_in_png_text_chunk():
    e = load_embedding(REAL / "test_embedding.png")
    chunk = json.loads(base64.b64decode(Image.open(REAL / "test_embedding.png").text["sd-ti-embedding"]))
    expected = torch.tensor(chunk["string_to_param"]["*"]["TORCHTENSOR"], dtype=torch.float64).float()
    assert e.name == "rick"  # the name stored in the picture, as A1111 reads it
    assert e.vectors.shape == (8, 768) and torch.equal(e.vectors, expected) and e.step == 60


@needs_real
def test_embedding_in_png_pixels_when_the_text_is_gone(tmp_path):
    # Sites often drop text chunks; A1111 also packs the embedding into the picture's side columns.
    bare = tmp_path / "renamed.png"
    Image.open(REAL / "test_embedding.png").save(bare)  # PIL writes no text chunk unless asked
    assert "sd-ti-embedding" not in Image.open(bare).text
    e = load_embedding(bare)
    assert e.name == "rick" and torch.equal(e.vectors, load_embedding(REAL / "test_embedding.png").vectors)


@needs_real
def test_folder_of_real_files_with_junk(tmp_path):
    for f in REAL.iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "notes.txt").write_text("not an embedding")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "broken.pt").write_bytes(b"\x80\x04garbage")
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "EasyNegative.preview.png")
    Image.new("RGB", (8, 8), (10, 200, 10)).save(tmp_path / "some picture.png")  # a preview: no embedding
    sub = tmp_path / "sd2"
    sub.mkdir()
    save_file({"emb_params": torch.randn(2, 1024)}, str(sub / "wide.safetensors"))
    found, warnings = load_embeddings(tmp_path, width=768)
    assert sorted(found) == ["EasyNegative", "bad_prompt_version2", "rick"]
    assert len(warnings) == 3 and all(w.startswith("skipped: ") and "\n" not in w for w in warnings)
    assert any("broken.pt" in w for w in warnings) and any("notes.txt" in w for w in warnings)
    assert any("wide.safetensors" in w and "1024" in w for w in warnings)
    found, _ = load_embeddings(tmp_path)  # no width: the 1024-wide one is kept
    assert found["wide"].vectors.shape == (2, 1024)


# --- formats written here as diffusers and A1111 write them -------------------------------


def test_diffusers_bin_and_safetensors(tmp_path):
    vector = torch.randn(768, dtype=torch.float16)
    torch.save({"<cat-toy>": vector}, tmp_path / "learned_embeds.bin")
    save_file({"<cat-toy>": vector}, str(tmp_path / "cat-toy.safetensors"))
    for path in (tmp_path / "learned_embeds.bin", tmp_path / "cat-toy.safetensors"):
        e = load_embedding(path)
        assert e.name == path.stem and e.vectors.shape == (1, 768) and torch.equal(e.vectors[0], vector.float())


def test_a1111_pt_as_it_saves(tmp_path):
    vec = torch.randn(3, 768)
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vec)}, "name": "x", "step": 7}
    torch.save(data, tmp_path / "my style.pt")
    e = load_embedding(tmp_path / "my style.pt")
    assert e.name == "my style" and torch.equal(e.vectors, vec) and e.step == 7 and not e.vectors.requires_grad


def test_sdxl_embedding_loads_both_sets_and_only_for_sdxl(tmp_path):
    clip_l, clip_g = torch.randn(2, 768), torch.randn(2, 1280)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / "xl.safetensors"))
    e = load_embedding(tmp_path / "xl.safetensors")
    assert torch.equal(e.vectors, clip_l) and torch.equal(e.vectors_2, clip_g) and e.widths == (768, 1280)
    assert torch.equal(e.for_second_tower().vectors, clip_g)
    assert "xl" in load_embeddings(tmp_path, width=(768, 1280))[0]
    found, warnings = load_embeddings(tmp_path, width=768)  # an SD 1.x model passes it over, saying why
    assert not found and "768 + 1280 wide" in warnings[0]
    save_file({"clip_l": clip_l, "clip_g": clip_g[:1]}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(SdtorchError, match="2 clip_l and 1 clip_g"):
        load_embedding(tmp_path / "bad.safetensors")


# --- corrupt and hostile files ------------------------------------------------------------


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (pathlib.Path.touch, (self.marker,))


def test_hostile_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"string_to_param": {"*": RunsCode(marker)}}, tmp_path / "evil.pt")
    with pytest.raises(SdtorchError, match="refused") as err:
        load_embedding(tmp_path / "evil.pt")
    assert "evil.pt" in str(err.value) and "\n" not in str(err.value) and "accepted" in str(err.value)
    assert not marker.exists()
    found, warnings = load_embeddings(tmp_path)
    assert found == {} and len(warnings) == 1 and not marker.exists()


def one_line_error(path: Path, match: str):
    with pytest.raises(SdtorchError, match=match) as err:
        load_embedding(path)
    assert path.name in str(err.value) and "\n" not in str(err.value)


def test_corrupt_files(tmp_path):
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(300))
    one_line_error(tmp_path / "random.pt", "refused|not a readable")  # the checkpoint reader's verdict
    save_file({"emb_params": torch.randn(8, 768)}, str(tmp_path / "cut.safetensors"))
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    one_line_error(tmp_path / "cut.safetensors", "truncated")
    (tmp_path / "fake.png").write_bytes(b"not a picture at all")
    one_line_error(tmp_path / "fake.png", "not a readable picture")
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(b"{broken json").decode())
    Image.new("RGB", (4, 4)).save(tmp_path / "badjson.png", pnginfo=info)
    one_line_error(tmp_path / "badjson.png", "not JSON")
    Image.new("RGB", (4, 4), (9, 9, 9)).save(tmp_path / "plain.png")
    one_line_error(tmp_path / "plain.png", "without an A1111 embedding")


def test_files_that_are_not_embeddings(tmp_path):
    torch.save({"string_to_param": {"a": torch.randn(1, 8), "b": torch.randn(1, 8)}}, tmp_path / "two.pt")
    one_line_error(tmp_path / "two.pt", "2 terms")
    save_file({"a": torch.randn(1, 8), "b": torch.randn(1, 8)}, str(tmp_path / "two.safetensors"))
    one_line_error(tmp_path / "two.safetensors", "not an embedding")
    save_file({"emb_params": torch.zeros(2, 8, dtype=torch.int32)}, str(tmp_path / "ints.safetensors"))
    one_line_error(tmp_path / "ints.safetensors", "float")
    torch.save([torch.randn(2, 8)], tmp_path / "list.pt")
    one_line_error(tmp_path / "list.pt", "holds a list")
    (tmp_path / "style.txt").write_text("x")
    one_line_error(tmp_path / "style.txt", "not an embedding file type")
    with pytest.raises(SdtorchError, match="no such"):
        load_embedding(tmp_path / "missing.pt")
