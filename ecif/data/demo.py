"""Built-in demo datasets with known harmful pairs: synthetic shapes and upscaled handwritten digits.

Everything is generated offline and deterministically: the same arguments give byte-identical
images and manifest.  A fraction of the *training* pairs gets a corrupted caption (the ground truth
that detection is scored against); validation and test pairs are always clean, so they can serve as
the trusted set and the evaluation set.

Layout written under ``out``::

    manifest.csv   uid, filepath (relative to out), caption, split, label, corrupted,
                   original_caption, then one column per attribute (shape, colour, ...)
    images/        <uid>.png, 64x64 RGB
    classes.json   {"names": [...], "prompts": {class: [prompts in the caption style]}}
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from ecif.data._parallel import threaded_map
from ecif.data.classes import CLASSES_FILE_NAME, ZeroShotClasses
from ecif.progress import Reporter, as_reporter
from ecif.run import atomic_write_bytes

DemoName = Literal["shapes", "digits"]
Corruption = Literal["random-caption", "attribute-swap", "class-flip", "systematic", "systematic-class"]

MANIFEST_FILE_NAME = "manifest.csv"
IMAGES_DIR = "images"
IMAGE_SIZE = 64
"""Side of every demo image in pixels."""
SPLIT_FRACTIONS: tuple[tuple[str, float], ...] = (("val", 0.15), ("test", 0.15))
"""Per-class share of each held-out split; the rest (70 %) is ``train``."""
MAX_PROMPTS_PER_CLASS = 64

Attributes = dict[str, str]
Renderer = Callable[[int, np.random.Generator], Image.Image]


@dataclass(frozen=True)
class _Spec:
    """How a demo dataset's captions describe its images."""

    class_attribute: str
    """The attribute whose value is the class label."""
    attributes: Mapping[str, tuple[str, ...]]
    """Every attribute's possible values (the class attribute included)."""
    templates: tuple[str, ...]
    """Caption phrasings; each names every attribute, so any attribute can be changed in place."""
    swappable: tuple[str, ...]
    """Attributes an ``attribute-swap`` corruption may change (never the class)."""

    def caption(self, template: int, values: Attributes) -> str:
        return self.templates[template].format(**values)

    def classes(self) -> ZeroShotClasses:
        """Prompts in the caption style: every template x every combination of the other attributes."""
        others = [name for name in self.attributes if name != self.class_attribute]
        names = list(self.attributes[self.class_attribute])
        prompts: dict[str, list[str]] = {}
        for name in names:
            candidates = [
                self.caption(template, {self.class_attribute: name, **dict(zip(others, combo, strict=True))})
                for template in range(len(self.templates))
                for combo in itertools.product(*(self.attributes[other] for other in others))
            ]
            if len(candidates) > MAX_PROMPTS_PER_CLASS:
                # A fixed random subset keeps the attribute mix balanced (a stride would alias with
                # the product's cycles) and zero-shot evaluation cheap.
                keep = np.random.default_rng(0).choice(len(candidates), MAX_PROMPTS_PER_CLASS, replace=False)
                candidates = [candidates[index] for index in sorted(keep)]
            prompts[name] = candidates
        return ZeroShotClasses(names, prompts)


# ----------------------------------------------------------------------------------------- shapes

_SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 185, 60),
    "blue": (50, 95, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "orange": (245, 140, 30),
}
_SHAPE_RADII = {"small": 10.0, "large": 17.0}
"""Circumscribed radius in pixels; small shapes stay ~20 px wide so their outline is still readable."""
_SHAPE_CENTRES = {
    "top left": (19.0, 19.0),
    "top right": (45.0, 19.0),
    "bottom left": (19.0, 45.0),
    "bottom right": (45.0, 45.0),
    "center": (32.0, 32.0),
}
_SUPERSAMPLE = 2  # draw at 2x and box-downsample: anti-aliased edges at a quarter of 4x's cost

SHAPES = _Spec(
    class_attribute="shape",
    attributes={
        "shape": ("circle", "square", "triangle", "star"),
        "size": tuple(_SHAPE_RADII),
        "colour": tuple(_SHAPE_COLOURS),
        "position": tuple(_SHAPE_CENTRES),
    },
    templates=(
        "a {size} {colour} {shape} at the {position}",
        "a picture of a {size} {colour} {shape} at the {position}",
        "there is a {size} {colour} {shape} at the {position}",
    ),
    swappable=("colour", "size", "position"),
)


def _polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a square, an upward triangle or a five-pointed star, rotated by ``angle`` radians."""
    if shape == "square":
        # 0.85 x the circumradius gives a square of about the circle's area, so size means the same.
        corners, radii = 4, [radius * 0.85 * math.sqrt(2)]
        start = math.pi / 4
    elif shape == "triangle":
        corners, radii = 3, [radius * 1.2]
        start = -math.pi / 2
    else:  # star: alternate outer and inner vertices
        corners, radii = 10, [radius * 1.2, radius * 0.5]
        start = -math.pi / 2
    return [
        (
            cx + radii[k % len(radii)] * math.cos(start + angle + 2 * math.pi * k / corners),
            cy + radii[k % len(radii)] * math.sin(start + angle + 2 * math.pi * k / corners),
        )
        for k in range(corners)
    ]


def _render_shape(values: Attributes, rng: np.random.Generator) -> Image.Image:
    side = IMAGE_SIZE * _SUPERSAMPLE
    background = np.clip(rng.integers(20, 70) + rng.integers(-12, 13, 3), 0, 255)
    image = Image.new("RGB", (side, side), tuple(int(v) for v in background))
    fill = tuple(
        int(v) for v in np.clip(np.array(_SHAPE_COLOURS[values["colour"]]) + rng.integers(-20, 21, 3), 0, 255)
    )
    centre = np.array(_SHAPE_CENTRES[values["position"]]) + rng.uniform(-2.5, 2.5, 2)
    cx, cy = (float(v) * _SUPERSAMPLE for v in centre)
    radius = _SHAPE_RADII[values["size"]] * rng.uniform(0.9, 1.1) * _SUPERSAMPLE
    draw = ImageDraw.Draw(image)
    if values["shape"] == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        draw.polygon(_polygon(values["shape"], cx, cy, radius, math.radians(rng.uniform(-15, 15))), fill=fill)
    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return _add_noise(np.asarray(image), rng, amplitude=10)


def _sample_shapes(n: int, rng: np.random.Generator) -> tuple[list[Attributes], Renderer]:
    shapes = SHAPES.attributes["shape"]
    # Classes balanced exactly (n % 4 == 0 gives equal counts); the other attributes uniform.
    shape_index = rng.permutation(np.arange(n) % len(shapes))
    rows = [
        {
            "shape": shapes[shape_index[i]],
            "size": str(rng.choice(SHAPES.attributes["size"])),
            "colour": str(rng.choice(SHAPES.attributes["colour"])),
            "position": str(rng.choice(SHAPES.attributes["position"])),
        }
        for i in range(n)
    ]
    return rows, lambda i, image_rng: _render_shape(rows[i], image_rng)


# ----------------------------------------------------------------------------------------- digits

_DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGIT_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 235),
    "red": (230, 50, 50),
    "green": (50, 200, 70),
    "blue": (70, 110, 245),
    "yellow": (240, 220, 50),
}
_DIGIT_SIDE = 48  # the 8x8 digit is upscaled to 48 px and placed with a random shift in the 64 px frame

DIGITS = _Spec(
    class_attribute="digit",
    attributes={"digit": _DIGIT_NAMES, "colour": tuple(_DIGIT_COLOURS)},
    templates=(
        "a handwritten digit {digit} in {colour}",
        "a {colour} handwritten digit {digit}",
        "the number {digit} written in {colour}",
    ),
    swappable=("colour",),
)


def _render_digit(pixels: np.ndarray, colour: str, rng: np.random.Generator) -> Image.Image:
    """``pixels``: one 8x8 scikit-learn digit, ink intensity 0..16."""
    small = Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8))
    ink = (
        np.asarray(small.resize((_DIGIT_SIDE, _DIGIT_SIDE), Image.Resampling.BICUBIC), dtype=np.float64) / 255
    )
    frame = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float64)
    # The shift is the augmentation that makes reused digits (n > 1797) distinct images.
    top, left = (IMAGE_SIZE - _DIGIT_SIDE) // 2 + rng.integers(-4, 5, 2)
    frame[top : top + _DIGIT_SIDE, left : left + _DIGIT_SIDE] = ink
    tint = np.clip(np.array(_DIGIT_COLOURS[colour]) + rng.integers(-20, 21, 3), 0, 255)
    background = rng.integers(0, 30)
    return _add_noise(background + frame[..., None] * (tint - background), rng, amplitude=8)


def _sample_digits(n: int, rng: np.random.Generator) -> tuple[list[Attributes], Renderer]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    # Whole shuffled passes over the 1797 digits: every digit is used before any is reused.
    passes = math.ceil(n / len(digits.images))
    source = np.concatenate([rng.permutation(len(digits.images)) for _ in range(passes)])[:n]
    rows = [
        {"digit": _DIGIT_NAMES[digits.target[s]], "colour": str(rng.choice(DIGITS.attributes["colour"]))}
        for s in source
    ]
    return rows, lambda i, image_rng: _render_digit(digits.images[source[i]], rows[i]["colour"], image_rng)


# ---------------------------------------------------------------------------------------- shared


def _add_noise(pixels: np.ndarray, rng: np.random.Generator, amplitude: int) -> Image.Image:
    """Uniform pixel noise in ``[-amplitude, amplitude]`` (0..255 units), so no two demo images are
    identical.  Integer noise: Gaussian sampling was a third of the time spent per image."""
    noise = rng.integers(-amplitude, amplitude + 1, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.int16)
    noisy = np.round(np.asarray(pixels, dtype=np.float32)).astype(np.int16) + noise
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


_DATASETS: dict[
    str, tuple[_Spec, Callable[[int, np.random.Generator], tuple[list[Attributes], Renderer]]]
] = {
    "shapes": (SHAPES, _sample_shapes),
    "digits": (DIGITS, _sample_digits),
}


def _splits(labels: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """Per-class shuffled 70/15/15 split, so every class is in every split (given 4+ members)."""
    split = np.full(len(labels), "train", dtype=object)
    label_array = np.asarray(labels, dtype=object)
    for label in sorted(set(labels)):
        members = rng.permutation(np.flatnonzero(label_array == label))
        start = 0
        for name, fraction in SPLIT_FRACTIONS:
            count = round(fraction * len(members))
            split[members[start : start + count]] = name
            start += count
    return split


def _systematic_group(spec: _Spec) -> tuple[str, str, str]:
    """``(class, colour, wrong class)`` of the systematic corruption: the second class in the first colour
    is captioned as the first class (shapes: red squares called circles; digits: white ones called zeros)."""
    classes = spec.attributes[spec.class_attribute]
    return classes[1], spec.attributes["colour"][0], classes[0]


def systematic_group(name: DemoName) -> tuple[str, str, str]:
    """``(class, colour, wrong class)`` of the ``systematic`` corruption of the demo data set ``name``
    (``systematic-class`` uses the class and the wrong class, in every colour)."""
    return _systematic_group(_DATASETS[name][0])


def caption_words(name: DemoName) -> list[str]:
    """Every word the captions and class prompts of the demo data set ``name`` can contain, sorted.

    The shipped demo model stores only the token embeddings of these words (``ecif.models.demo``).
    """
    spec = _DATASETS[name][0]
    texts = [*spec.templates, *(value for values in spec.attributes.values() for value in values)]
    return sorted({word for text in texts for word in text.replace("{", " {").split() if not word.startswith("{")})


def _corrupt_caption(
    spec: _Spec,
    kind: str,
    row: int,
    values: list[Attributes],
    templates: np.ndarray,
    captions: list[str],
    train_rows: np.ndarray,
    rng: np.random.Generator,
) -> str:
    """The corrupted caption of ``row``; always a different text from its original caption."""
    if kind == "random-caption":
        while True:  # terminates: the caller checked that the train captions are not all identical
            other = int(rng.choice(train_rows))
            if captions[other] != captions[row]:
                return captions[other]
    if kind in ("systematic", "systematic-class"):
        return spec.caption(int(templates[row]), {**values[row], spec.class_attribute: _systematic_group(spec)[2]})
    attribute = spec.class_attribute if kind == "class-flip" else str(rng.choice(spec.swappable))
    choices = [value for value in spec.attributes[attribute] if value != values[row][attribute]]
    return spec.caption(int(templates[row]), {**values[row], attribute: str(rng.choice(choices))})


def make_demo_data(
    name: DemoName,
    out: Path | str,
    n: int = 3000,
    noise: float = 0.1,
    corruption: Corruption = "random-caption",
    seed: int = 0,
    reporter: Reporter | None = None,
) -> Path:
    """Write the demo dataset ``name`` with ``n`` image-caption pairs under ``out``; return the manifest path.

    Splits are 70/15/15 per class.  Exactly ``round(noise * n_train)`` training pairs get a corrupted
    caption (``corrupted=True``, the clean one kept in ``original_caption``), except ``systematic``:

    - ``random-caption``: the caption of another training pair (always a different text);
    - ``attribute-swap``: one non-class attribute changed (shapes: colour, size or position;
      digits: the ink colour), so the class word stays right;
    - ``class-flip``: the class word changed, every other word kept;
    - ``systematic``: ``round(noise * k)`` of the ``k`` training pairs of one group get one wrong class
      word (shapes: red squares captioned as red circles; digits: white ones as zeros), the kind of
      consistent error that makes test mistakes, for trace-back;
    - ``systematic-class``: the same wrong class word for ``round(noise * k)`` of the ``k`` training
      pairs of that class in every colour (shapes: squares captioned as circles; digits: ones as
      zeros), a corruption the projection heads alone can learn from a clean backbone.

    Same arguments -> byte-identical files.  Progress is reported under the stage ``"demo data"``.
    """
    if name not in _DATASETS:
        raise ValueError(f"unknown demo dataset {name!r}; choose one of {sorted(_DATASETS)}")
    if corruption not in get_args(Corruption):
        raise ValueError(f"unknown corruption {corruption!r}; choose one of {list(get_args(Corruption))}")
    if n < 2:
        raise ValueError(f"n must be at least 2, got {n}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise is a fraction of the training pairs, in [0, 1]; got {noise}")
    reporter = as_reporter(reporter)
    spec, sample = _DATASETS[name]
    rng = np.random.default_rng(seed)

    values, render = sample(n, rng)
    templates = rng.integers(len(spec.templates), size=n)
    original = [spec.caption(int(templates[i]), values[i]) for i in range(n)]
    labels = [row[spec.class_attribute] for row in values]
    split = _splits(labels, rng)

    train_rows = np.flatnonzero(split == "train")
    if corruption == "random-caption" and len({original[i] for i in train_rows}) < 2:
        raise ValueError("random-caption needs at least two different training captions; increase n")
    candidates = train_rows
    if corruption in ("systematic", "systematic-class"):
        label, colour, _ = _systematic_group(spec)
        every_colour = corruption == "systematic-class"
        candidates = np.asarray([i for i in train_rows if values[i][spec.class_attribute] == label
                                 and (every_colour or values[i]["colour"] == colour)])
    corrupted_rows = np.sort(rng.choice(candidates, round(noise * len(candidates)), replace=False))
    captions = list(original)
    for row in corrupted_rows:
        captions[row] = _corrupt_caption(
            spec, corruption, int(row), values, templates, original, train_rows, rng
        )
    corrupted = np.zeros(n, dtype=bool)
    corrupted[corrupted_rows] = True

    out = Path(out)
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    uids = [f"{name}-{i:0{max(5, len(str(n - 1)))}d}" for i in range(n)]
    filepaths = [f"{IMAGES_DIR}/{uid}.png" for uid in uids]

    def write_image(i: int) -> None:
        # Each image has its own generator, so images can be drawn in any order (in parallel) and
        # still come out identical.  Fast compression: the pixel noise is incompressible anyway.
        render(i, np.random.default_rng((seed, i))).save(out / filepaths[i], format="PNG", compress_level=1)

    threaded_map(write_image, range(n), reporter, "demo data")

    frame = pd.DataFrame(
        {
            "uid": uids,
            "filepath": filepaths,
            "caption": captions,
            "split": split,
            "label": labels,
            "corrupted": corrupted,
            "original_caption": original,
            **{attribute: [row[attribute] for row in values] for attribute in spec.attributes},
        }
    )
    spec.classes().save(out / CLASSES_FILE_NAME)
    # The manifest is written last: its presence means the images and classes are complete.
    manifest = out / MANIFEST_FILE_NAME
    atomic_write_bytes(manifest, frame.to_csv(index=False, lineterminator="\n").encode("utf-8"))
    return manifest
