"""The coloured-shapes world and its judge: the judge agrees with the generator's labels on fresh
images (clean, and blurred with noise), captions read back to what they say, the held-out pairs
stay out, and the same seed gives the same data."""

from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdtorch.shapes import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    batch,
    caption,
    dataset,
    parse_caption,
    random_scene,
    render,
)
from sdtorch.shapes.judge import judge

JUDGE_SEED = 918_273  # used by no other test, nor by anything that tunes the judge
N_IMAGES = 1000


def blur_and_noise(image: np.ndarray, rng: np.random.Generator, sigma=0.8, noise=6.0) -> np.ndarray:
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float64)
    return np.clip(np.rint(blurred + rng.normal(0, noise, blurred.shape)), 0, 255).astype(np.uint8)


def agreement(degrade=None) -> dict[str, float]:
    """Fraction of N_IMAGES fresh images (all 32 colour-shape pairs) on which the judge names
    each attribute as the generator drew it."""
    rng = np.random.default_rng(JUDGE_SEED + 1)
    right = Counter()
    for image, _, scene in dataset(JUDGE_SEED, N_IMAGES, exclude_pairs=()):
        verdict = judge(image if degrade is None else degrade(image, rng))
        right.update(a for a in ATTRIBUTES if getattr(verdict, a) == getattr(scene, a))
    return {a: right[a] / N_IMAGES for a in ATTRIBUTES}


# --------------------------------------------------------------------------- the judge

def test_judge_agrees_with_generator_on_clean_images():
    accuracy = agreement()
    print("judge agreement, clean 64x64:", accuracy)
    for attribute, value in accuracy.items():
        assert value >= 0.98, (attribute, accuracy)


def test_judge_agrees_on_blurred_noisy_images():
    accuracy = agreement(blur_and_noise)  # Gaussian blur sigma 0.8 px, noise std 6 levels
    print("judge agreement, blur 0.8 + noise 6:", accuracy)
    for attribute, value in accuracy.items():
        assert value >= 0.95, (attribute, accuracy)


def test_judge_reads_every_nominal_scene():
    """Every shape, colour, size and position drawn without jitter (backgrounds in turn)."""
    backgrounds = list(BACKGROUNDS)
    wrong = []
    i = 0
    for shape in SHAPES:
        for colour in COLOURS:
            for size in SIZES:
                for position in POSITIONS:
                    others = [b for b in backgrounds if b != colour]
                    scene = Scene(shape, colour, size, position, others[i % len(others)])
                    i += 1
                    verdict = judge(render(scene))
                    if any(getattr(verdict, a) != getattr(scene, a) for a in ATTRIBUTES):
                        wrong.append((scene, verdict))
    assert not wrong, wrong[:5]


def test_judge_without_object_and_on_noise():
    plain = np.zeros((64, 64, 3), np.uint8) + np.array(BACKGROUNDS["blue"], np.uint8)
    assert judge(plain) == judge(plain)
    verdict = judge(plain)
    assert verdict.background == "blue"
    assert (verdict.colour, verdict.shape, verdict.size, verdict.position) == (None,) * 4
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    judge(noise)  # any verdict, but no crash
    # A shifted, noisy background and a larger image are still read.
    rng = np.random.default_rng(5)
    scene = Scene("star", "white", "large", "top right", "gray")
    image = render(scene, 128, rng).astype(np.float64) + [12, -10, 8] + rng.normal(0, 8, (128, 128, 3))
    verdict = judge(np.clip(image, 0, 255).astype(np.uint8))
    assert (verdict.background, verdict.colour, verdict.shape, verdict.size, verdict.position) == (
        "gray", "white", "star", "large", "top right")


# --------------------------------------------------------------------------- captions

EXAMPLES = {
    "a large red circle on the left on a blue background":
        {"size": "large", "colour": "red", "shape": "circle", "position": "left", "background": "blue"},
    "a small yellow star in the top right corner, gray background":
        {"size": "small", "colour": "yellow", "shape": "star", "position": "top right", "background": "gray"},
    "green square, center, white background":
        {"colour": "green", "shape": "square", "position": "center", "background": "white"},
    "a purple triangle at the bottom": {"colour": "purple", "shape": "triangle", "position": "bottom"},
    "an orange circle": {"colour": "orange", "shape": "circle"},
    "A big grey background with a tiny black star in the lower-left": {
        "background": "gray", "size": "small", "colour": "black", "shape": "star", "position": "bottom left"},
    "a picture of a white square in the middle": {"colour": "white", "shape": "square", "position": "center"},
    "upper right, blue triangle": {"position": "top right", "colour": "blue", "shape": "triangle"},
}


@pytest.mark.parametrize("text", list(EXAMPLES))
def test_parse_examples(text):
    assert parse_caption(text) == EXAMPLES[text]


def test_caption_round_trip():
    rng = np.random.default_rng(31)
    styles = set()
    for _ in range(1000):
        scene = random_scene(rng, exclude_pairs=())
        omit = {a for a in ATTRIBUTES if rng.random() < 0.3}
        text = caption(scene, rng, omit=omit)
        assert parse_caption(text) == {a: getattr(scene, a) for a in ATTRIBUTES if a not in omit}, text
        styles.add(text.split()[0])
    assert len(styles) >= 5  # the captions vary
    for _ in range(1000):  # random omission: what is said is right
        scene = random_scene(rng)
        text = caption(scene, rng)
        parsed = parse_caption(text)
        assert parsed == {a: getattr(scene, a) for a in parsed}, text


def test_caption_vocabulary():
    rng = np.random.default_rng(2)
    scenes = [random_scene(rng, exclude_pairs=()) for _ in range(3000)]
    words = " ".join(caption(s, rng, omit=()) for s in scenes).split()
    for word in ("big", "tiny", "grey", "middle", "upper", "lower", "picture", "against", "corner"):
        assert word in words, word
    assert caption(Scene("circle", "orange", "small", "left", "gray"), rng,
                   omit=("size", "position", "background")) in ("an orange circle", "orange circle",
                                                               "a picture of an orange circle",
                                                               "an image of an orange circle",
                                                               "a drawing of an orange circle",
                                                               "there is an orange circle")


# --------------------------------------------------------------------------- sampling

def test_held_out_pairs_never_sampled_by_default():
    assert len(HELD_OUT_PAIRS) == 4
    assert len({c for c, _ in HELD_OUT_PAIRS}) == 4 and len({s for _, s in HELD_OUT_PAIRS}) == 4
    rng = np.random.default_rng(8)
    pairs = Counter((s.colour, s.shape) for s in (random_scene(rng) for _ in range(5000)))
    assert not set(pairs) & set(HELD_OUT_PAIRS)
    assert len(pairs) == 32 - 4
    scenes = [scene for _, _, scene in dataset(8, 500)]
    assert not {(s.colour, s.shape) for s in scenes} & set(HELD_OUT_PAIRS)
    held = {(s.colour, s.shape) for s in (random_scene(rng, only_pairs=HELD_OUT_PAIRS) for _ in range(200))}
    assert held == set(HELD_OUT_PAIRS)


def test_random_scene_attributes():
    rng = np.random.default_rng(9)
    scenes = [random_scene(rng) for _ in range(3000)]
    assert all(s.background != s.colour for s in scenes)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {s.position for s in scenes} == set(POSITIONS) and {s.size for s in scenes} == set(SIZES)
    fixed = [random_scene(rng, shape="star", size="small", background="red") for _ in range(50)]
    assert all(s.shape == "star" and s.size == "small" and s.background == "red" for s in fixed)
    assert all((s.colour, "star") not in HELD_OUT_PAIRS for s in fixed)
    with pytest.raises(ValueError):
        random_scene(rng, colour="red", shape="star")  # a held-out pair
    assert random_scene(rng, colour="red", shape="star", exclude_pairs=()).shape == "star"
    with pytest.raises(ValueError):
        Scene("circle", "red", "small", "left", "red")


# --------------------------------------------------------------------------- determinism

def test_same_seed_same_data():
    images, captions, scenes = batch(77, 64)
    again, captions_again, scenes_again = batch(77, 64)
    assert images.shape == (64, 64, 64, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again) and captions == captions_again and scenes == scenes_again
    other, other_captions, _ = batch(78, 64)
    assert not np.array_equal(images, other) and captions != other_captions
    scene = scenes[0]
    assert np.array_equal(render(scene), render(scene))  # no rng: the nominal drawing
    # Jitter: the same scene drawn twice with one stream differs, but only a little.
    rng = np.random.default_rng(0)
    a, b = render(scene, rng=rng), render(scene, rng=rng)
    assert not np.array_equal(a, b)
