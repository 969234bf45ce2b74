"""Loading user images (conversions checked pixel by pixel, bad files refused with one clear line)
and the image <-> tensor steps, compared number for number with diffusers' VaeImageProcessor."""

import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from sdtorch.errors import SdtorchError
from sdtorch.images import load_image, prepare_init_image, to_pil, to_rgb


def pixels(image):
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def noise_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# --------------------------------------------------------------------------- conversions

def test_rgb_png_loads_unchanged(tmp_path):
    image = noise_image(13, 7)
    image.save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    assert np.array_equal(pixels(loaded), pixels(image))


def test_rgba_composited_on_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 255, 128], [10, 200, 30, 64]]], dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    got = pixels(load_image(tmp_path / "a.png"))[0]
    alpha = rgba[0, :, 3:] / 255
    expected = rgba[0, :, :3] * alpha + 255 * (1 - alpha)
    assert np.abs(got - expected).max() <= 1
    assert got[0].tolist() == [255, 0, 0] and got[1].tolist() == [255, 255, 255]


def test_la_composited_on_white(tmp_path):
    la = np.array([[[100, 255], [100, 0], [0, 128]]], dtype=np.uint8)
    Image.fromarray(la, mode="LA").save(tmp_path / "a.png")
    got = pixels(load_image(tmp_path / "a.png"))[0]
    assert got[0].tolist() == [100, 100, 100] and got[1].tolist() == [255, 255, 255]
    assert np.abs(got[2] - 127).max() <= 1


@pytest.mark.parametrize("suffix", ["png", "gif"])
def test_palette_with_transparency(tmp_path, suffix):
    image = Image.new("P", (3, 1))
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.putpixel((2, 0), 2)
    image.save(tmp_path / f"a.{suffix}", transparency=0)
    got = pixels(load_image(tmp_path / f"a.{suffix}"))[0]
    assert got.tolist() == [[255, 255, 255], [255, 0, 0], [0, 255, 0]]  # index 0 was transparent


def test_palette_without_transparency(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 255, 10, 20, 30] + [0] * (256 * 3 - 6))
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "a.png")
    assert pixels(load_image(tmp_path / "a.png"))[0].tolist() == [[0, 0, 255], [10, 20, 30]]


def test_transparent_colour_key_in_rgb_and_grey(tmp_path):
    rgb = Image.fromarray(np.array([[[1, 2, 3], [9, 9, 9]]], dtype=np.uint8))
    rgb.save(tmp_path / "rgb.png", transparency=(9, 9, 9))
    assert pixels(load_image(tmp_path / "rgb.png"))[0].tolist() == [[1, 2, 3], [255, 255, 255]]
    grey = Image.fromarray(np.array([[10, 200]], dtype=np.uint8))
    grey.save(tmp_path / "grey.png", transparency=200)
    assert pixels(load_image(tmp_path / "grey.png"))[0].tolist() == [[10, 10, 10], [255, 255, 255]]


def test_greyscale_and_bilevel(tmp_path):
    Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8)).save(tmp_path / "l.png")
    assert pixels(load_image(tmp_path / "l.png"))[0].tolist() == [[0] * 3, [77] * 3, [255] * 3]
    Image.fromarray(np.array([[False, True]])).save(tmp_path / "1.png")
    assert pixels(load_image(tmp_path / "1.png"))[0].tolist() == [[0] * 3, [255] * 3]


def test_16bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 10, 32896, 65535, 300]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "a.png")  # Pillow opens 16-bit grey PNG as I;16
    got = pixels(load_image(tmp_path / "a.png"))[0, :, 0]
    assert got.tolist() == [0, 10, 128, 255, 1]  # Pillow's own convert would give 0, 255, 255, 255, 255


def test_32bit_int_and_float_greyscale(tmp_path):
    ints = Image.fromarray(np.array([[-5, 0, 65535, 100000]], dtype=np.int32))
    assert ints.mode == "I"
    assert pixels(to_rgb(ints))[0, :, 0].tolist() == [0, 0, 255, 255]
    floats = np.array([[-1.0, 0.0, 0.25, 0.5, 1.0, 2.0]], dtype=np.float32)
    Image.fromarray(floats).save(tmp_path / "f.tif")
    assert pixels(load_image(tmp_path / "f.tif"))[0, :, 0].tolist() == [0, 0, 64, 128, 255, 255]


def test_cmyk(tmp_path):
    cmyk = np.array([[[0, 255, 255, 0], [0, 0, 0, 255], [0, 0, 0, 0], [255, 0, 255, 0]]], dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "a.tif")
    got = pixels(load_image(tmp_path / "a.tif"))[0]
    assert got.tolist() == [[255, 0, 0], [0, 0, 0], [255, 255, 255], [0, 255, 0]]


def test_exif_orientation_applied(tmp_path):
    stored = np.zeros((2, 3, 3), dtype=np.uint8)  # 3 wide, 2 high
    stored[0, 0] = (255, 0, 0)  # top-left red
    stored[1, 2] = (0, 0, 255)  # bottom-right blue
    image = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "a.png", exif=exif)
    got = pixels(load_image(tmp_path / "a.png"))
    assert got.shape == (3, 2, 3)
    assert got[0, 1].tolist() == [255, 0, 0]  # top-left went to top-right
    assert got[2, 0].tolist() == [0, 0, 255]  # bottom-right went to bottom-left
    assert np.array_equal(got, np.rot90(stored, k=-1))


def test_jpeg_and_webp_load(tmp_path):
    image = Image.new("RGB", (16, 16), (200, 100, 50))
    image.save(tmp_path / "a.jpg", quality=95)
    image.save(tmp_path / "a.webp", lossless=True)
    assert np.abs(pixels(load_image(tmp_path / "a.jpg")) - [200, 100, 50]).max() <= 3
    assert np.array_equal(pixels(load_image(tmp_path / "a.webp")), pixels(image))


# ------------------------------------------------------------------------------ bad files

def png_claiming_size(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("size", [(10000, 10000), (20000, 20000)])  # Pillow warns / refuses itself
def test_huge_image_refused_before_decoding(tmp_path, size):
    (tmp_path / "huge.png").write_bytes(png_claiming_size(*size))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning leaks out
        with pytest.raises(SdtorchError, match=r"huge.png.* pixels.*; scale it down first"):
            load_image(tmp_path / "huge.png")


def test_pixel_limit_is_a_parameter(tmp_path):
    noise_image(20, 10).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png", max_pixels=200).size == (20, 10)
    with pytest.raises(SdtorchError, match=r"is 20x10 = 200 pixels; the limit is 199 pixels"):
        load_image(tmp_path / "a.png", max_pixels=199)


def test_bad_files_give_one_line_errors(tmp_path):
    good = tmp_path / "good.png"
    noise_image(64, 64).save(good)
    data = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    (tmp_path / "notes.txt").write_text("just some text")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "vector.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    cases = {
        "missing.png": "does not exist",
        "truncated.png": "corrupt or truncated",
        "garbage.png": "not an image in an accepted format|corrupt",
        "notes.txt": r"not an image in an accepted format \(PNG, JPEG",
        "empty.jpg": "not an image in an accepted format",
        "vector.eps": "not an image in an accepted format",  # never handed to Ghostscript
    }
    for name, message in cases.items():
        with pytest.raises(SdtorchError, match=message) as info:
            load_image(tmp_path / name)
        assert name in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SdtorchError, match="is a directory"):
        load_image(tmp_path)


# ---------------------------------------------------------------------- tensors vs diffusers

diffusers_image_processor = pytest.importorskip("diffusers.image_processor")


@pytest.fixture(scope="module")
def processor():
    return diffusers_image_processor.VaeImageProcessor()


@pytest.mark.parametrize("size", [(64, 48), (45, 35), (17, 8)])
def test_prepare_init_image_matches_diffusers(processor, size):
    image = noise_image(*size, seed=size[0])
    ours = prepare_init_image(image)
    theirs = processor.preprocess(image)
    assert ours.dtype == torch.float32 and ours.shape == (1, 3, size[1] // 8 * 8, size[0] // 8 * 8)
    assert ours.is_contiguous()
    assert torch.equal(ours, theirs)
    assert ours.min() >= -1 and ours.max() <= 1


@pytest.mark.parametrize("width, height", [(32, 24), (40, None), (None, 16)])
def test_prepare_init_image_resized_matches_diffusers(processor, width, height):
    image = noise_image(37, 29, seed=3)
    ours = prepare_init_image(image, width=width, height=height)
    theirs = processor.preprocess(image, height=height, width=width)
    assert ours.shape == theirs.shape
    assert torch.equal(ours, theirs)


def test_prepare_init_image_converts_to_rgb(processor):
    rgba = Image.fromarray(np.full((16, 16, 4), (0, 0, 0, 0), dtype=np.uint8))
    assert torch.equal(prepare_init_image(rgba), torch.ones(1, 3, 16, 16))  # transparent -> white


def test_prepare_init_image_errors():
    with pytest.raises(SdtorchError, match="at least 8x8"):
        prepare_init_image(noise_image(7, 100))
    with pytest.raises(SdtorchError, match="width 500 is not accepted; use a multiple of 8"):
        prepare_init_image(noise_image(64, 64), width=500)
    with pytest.raises(SdtorchError, match="height 0 is not accepted"):
        prepare_init_image(noise_image(64, 64), height=0)


def test_to_pil_matches_diffusers(processor):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 8, 12) * 0.8
    # values that land exactly on .5 after * 255 (round half to even) and beyond [-1, 1]
    images[0, 0, 0, :6] = torch.tensor([-1.5, -1.0, 1.0, 1.5, 2 * (0.5 / 255) - 1, 2 * (2.5 / 255) - 1])
    ours = to_pil(images)
    theirs = processor.postprocess(images, output_type="pil")
    assert len(ours) == 2
    for a, b in zip(ours, theirs):
        assert a.mode == "RGB" and a.size == (12, 8)
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(ours[0])[0, :4, 0].tolist() == [0, 0, 255, 255]


def test_to_pil_round_trips_prepare_init_image():
    image = noise_image(24, 16)
    assert np.array_equal(np.asarray(to_pil(prepare_init_image(image))[0]), np.asarray(image))


def test_to_pil_errors():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        to_pil(torch.zeros(3, 8, 8))
    bad = torch.zeros(1, 3, 8, 8)
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(SdtorchError, match="NaN"):
        to_pil(bad)
