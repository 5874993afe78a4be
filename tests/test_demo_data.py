"""The built-in demo datasets: exact corruption counts, clean held-out splits, determinism, and each
corruption kind changing exactly what it claims to change."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
from fixtures_data import shapes_demo  # noqa: F401 - pytest fixture
from PIL import Image

from ecif.data import load_manifest, make_demo_data
from ecif.data.demo import DIGITS, SHAPES
from ecif.progress import Reporter


def _read(manifest: Path) -> pd.DataFrame:
    return pd.read_csv(manifest, keep_default_na=False)


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_shapes_acceptance(shapes_demo: Path) -> None:  # noqa: F811 - the fixture
    frame = _read(shapes_demo)
    assert len(frame) == 3000
    assert frame["uid"].is_unique
    assert set(frame.columns) >= {
        "uid",
        "filepath",
        "caption",
        "split",
        "label",
        "corrupted",
        "original_caption",
        "shape",
        "size",
        "colour",
        "position",
    }

    counts = frame["split"].value_counts()
    assert (
        abs(counts["train"] - 2100) <= 4 and abs(counts["val"] - 450) <= 4 and abs(counts["test"] - 450) <= 4
    )
    # Every class is present in every split (stratified).
    assert (frame.groupby(["split", "label"]).size() > 0).sum() == 12

    train = frame[frame["split"] == "train"]
    assert train["corrupted"].sum() == round(0.1 * len(train))
    assert not frame.loc[frame["split"] != "train", "corrupted"].any()
    clean = frame[~frame["corrupted"]]
    assert (clean["caption"] == clean["original_caption"]).all()
    dirty = frame[frame["corrupted"]]
    assert (dirty["caption"] != dirty["original_caption"]).all()
    # Captions name the image's attributes; the label is the shape.
    assert (frame["label"] == frame["shape"]).all()
    for row in clean.head(50).itertuples():
        assert f"{row.size} {row.colour} {row.shape} at the {row.position}" in row.caption


def test_shapes_images_and_classes(shapes_demo: Path) -> None:  # noqa: F811 - the fixture
    loaded = load_manifest(shapes_demo)  # opens and verifies every image
    assert loaded.bad_rows.empty and len(loaded.frame) == 3000
    with Image.open(loaded.frame["filepath"][0]) as image:
        assert image.size == (64, 64) and image.mode == "RGB"

    classes = json.loads((shapes_demo.parent / "classes.json").read_text())
    assert classes["names"] == ["circle", "square", "triangle", "star"]
    for name in classes["names"]:
        prompts = classes["prompts"][name]
        assert 10 <= len(prompts) <= 64 and len(set(prompts)) == len(prompts)
        assert all(name in prompt and " at the " in prompt for prompt in prompts)
    assert loaded.classes is not None and loaded.classes.names == classes["names"]


def test_same_seed_gives_identical_files(shapes_demo: Path, tmp_path: Path) -> None:  # noqa: F811
    again = make_demo_data(
        "shapes", tmp_path / "again", n=3000, noise=0.1, corruption="random-caption", seed=0
    )
    assert _tree_digest(again.parent) == _tree_digest(shapes_demo.parent)


def test_other_seed_differs(tmp_path: Path) -> None:
    first = _read(make_demo_data("shapes", tmp_path / "s1", n=200, seed=1))
    second = _read(make_demo_data("shapes", tmp_path / "s2", n=200, seed=2))
    assert not first["caption"].equals(second["caption"])


@pytest.fixture(scope="module", params=["random-caption", "attribute-swap", "class-flip"])
def corrupted_shapes(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, pd.DataFrame]:
    manifest = make_demo_data(
        "shapes", tmp_path_factory.mktemp("kind"), n=400, noise=0.2, corruption=request.param
    )
    frame = _read(manifest)
    train = frame[frame["split"] == "train"]
    assert train["corrupted"].sum() == round(0.2 * len(train))
    return request.param, frame


def _words(caption: str, spec_attributes: dict[str, tuple[str, ...]], attribute: str) -> set[str]:
    """The values of ``attribute`` that ``caption`` mentions (multi-word values like 'top left' count)."""
    return {value for value in spec_attributes[attribute] if f" {value} " in f" {caption} "}


def test_corruption_changes_what_it_says(corrupted_shapes: tuple[str, pd.DataFrame]) -> None:
    kind, frame = corrupted_shapes
    dirty = frame[frame["corrupted"]]
    train_captions = set(frame.loc[frame["split"] == "train", "original_caption"])
    for row in dirty.itertuples():
        assert row.caption != row.original_caption
        if kind == "random-caption":
            assert row.caption in train_captions
            continue
        changed = [
            a for a in SHAPES.attributes if _words(row.caption, SHAPES.attributes, a) != {getattr(row, a)}
        ]
        if kind == "attribute-swap":
            assert len(changed) == 1 and changed[0] in ("colour", "size", "position")
            assert _words(row.caption, SHAPES.attributes, "shape") == {row.shape}
        else:
            assert changed == ["shape"]
            # Every other word is kept: putting the true shape back gives the original caption.
            (named,) = _words(row.caption, SHAPES.attributes, "shape")
            assert f" {row.caption} ".replace(f" {named} ", f" {row.shape} ").strip() == row.original_caption


def test_digits_reuse_beyond_1797_and_flip_digit_word(tmp_path: Path) -> None:
    stages: list[str] = []
    manifest = make_demo_data(
        "digits",
        tmp_path / "digits",
        n=1900,
        noise=0.1,
        corruption="class-flip",
        reporter=Reporter(callback=lambda stage, done, total: stages.append(stage)),
    )
    assert set(stages) == {"demo data"}
    frame = _read(manifest)
    assert len(frame) == 1900 and set(frame["label"]) == set(DIGITS.attributes["digit"])
    train = frame[frame["split"] == "train"]
    assert train["corrupted"].sum() == round(0.1 * len(train))
    for row in frame[frame["corrupted"]].itertuples():
        assert _words(row.caption, DIGITS.attributes, "digit") != {row.label}
        assert _words(row.caption, DIGITS.attributes, "colour") == {row.colour}
    # Reused digits (rows past 1797) are shifted and noised: still 1900 distinct images.
    digests = {hashlib.sha256((manifest.parent / p).read_bytes()).hexdigest() for p in frame["filepath"]}
    assert len(digests) == 1900
    with Image.open(manifest.parent / frame["filepath"][0]) as image:
        assert image.size == (64, 64) and image.mode == "RGB"
    classes = json.loads((manifest.parent / "classes.json").read_text())
    assert classes["names"] == list(DIGITS.attributes["digit"])
    assert all("three" in prompt for prompt in classes["prompts"]["three"])


def test_digits_attribute_swap_changes_colour_only(tmp_path: Path) -> None:
    frame = _read(make_demo_data("digits", tmp_path / "d", n=300, noise=0.2, corruption="attribute-swap"))
    dirty = frame[frame["corrupted"]]
    assert len(dirty) > 0
    for row in dirty.itertuples():
        assert _words(row.caption, DIGITS.attributes, "digit") == {row.label}
        assert _words(row.caption, DIGITS.attributes, "colour") - {row.colour}


@pytest.mark.parametrize(
    "arguments",
    [
        {"name": "faces"},
        {"name": "shapes", "corruption": "swap"},
        {"name": "shapes", "noise": 1.5},
        {"name": "shapes", "n": 1},
    ],
)
def test_bad_arguments(arguments: dict[str, object], tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_demo_data(out=tmp_path, **arguments)  # type: ignore[arg-type]


def test_systematic_corruption_mislabels_one_group_consistently(tmp_path: Path) -> None:
    frame = _read(make_demo_data("shapes", tmp_path, n=600, noise=0.5, corruption="systematic"))
    train = frame[frame["split"] == "train"]
    group = train[(train["shape"] == "square") & (train["colour"] == "red")]
    dirty = frame[frame["corrupted"]]
    assert len(dirty) == round(0.5 * len(group)) > 0
    assert set(dirty.index) <= set(group.index)
    for row in dirty.itertuples():
        assert row.caption == row.original_caption.replace("square", "circle")


def test_systematic_class_corruption_mislabels_the_class_in_every_colour(tmp_path: Path) -> None:
    frame = _read(make_demo_data("shapes", tmp_path, n=600, noise=0.5, corruption="systematic-class"))
    train = frame[frame["split"] == "train"]
    squares = train[train["shape"] == "square"]
    dirty = frame[frame["corrupted"]]
    assert len(dirty) == round(0.5 * len(squares)) > 0
    assert set(dirty.index) <= set(squares.index) and dirty["colour"].nunique() > 1
    for row in dirty.itertuples():
        assert row.caption == row.original_caption.replace("square", "circle")
