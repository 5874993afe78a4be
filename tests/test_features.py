"""Backbone features, the heads, zero-shot, and the demo model: exactness, caching, resuming, accuracy."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from open_clip.coca_model import CoCa

import ecif.models.features as features_module
from ecif.data import LoadedManifest, ZeroShotClasses, load_manifest, make_demo_data
from ecif.models import (
    DemoTrainConfig,
    LoadedModel,
    UnsupportedModelError,
    compute_features,
    encode_captions,
    encode_prompts,
    get_heads,
    load_images,
    load_model,
    set_heads,
    train_demo_model,
    zero_shot,
    zero_shot_accuracy,
)
from ecif.paths import cache_dir
from ecif.progress import Cancelled, Reporter


@pytest.fixture(scope="module", autouse=True)
def module_cache(tmp_path_factory: pytest.TempPathFactory):
    """One cache for the module: the demo model trained once is shared by the tests that need it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ECIF_CACHE", str(tmp_path_factory.mktemp("ecif-cache")))
        yield


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> LoadedManifest:
    """The shapes demo, 10% random captions among the training pairs."""
    folder = tmp_path_factory.mktemp("shapes")
    return load_manifest(make_demo_data("shapes", folder, n=1000, noise=0.1))


@pytest.fixture(scope="module")
def small_frame(shapes: LoadedManifest) -> pd.DataFrame:
    return shapes.frame.iloc[:40].reset_index(drop=True)


@pytest.fixture(scope="module")
def random_demo() -> LoadedModel:
    return load_model("ecif-demo", seed=3)


def _unit(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def test_features_and_heads_reproduce_the_model_embeddings(random_demo: LoadedModel, small_frame) -> None:
    features = compute_features(random_demo, small_frame)
    heads = get_heads(random_demo.model)
    assert features.image.shape == (40, 96) and features.text.shape == (40, 96)
    assert features.image.dtype == np.float32 and heads.image.dtype == np.float64
    assert heads.image.shape == (96, 32) and heads.text.shape == (96, 32)
    assert heads.log_logit_scale == pytest.approx(np.log(1 / 0.07))

    pixels, failed = load_images(small_frame["filepath"].tolist(), random_demo.preprocess)
    tokens = random_demo.tokenizer(small_frame["caption"].tolist())
    with torch.inference_mode():
        image = random_demo.model.encode_image(pixels, normalize=True).double().numpy()
        text = random_demo.model.encode_text(tokens, normalize=True).double().numpy()
    assert not failed
    np.testing.assert_allclose(_unit(features.image @ heads.image), image, atol=1e-5)
    np.testing.assert_allclose(_unit(features.text @ heads.text), text, atol=1e-5)
    np.testing.assert_allclose(encode_captions(random_demo, small_frame["caption"].tolist()), features.text, atol=1e-5)
    # The projections were only detached while encoding: the model still projects.
    assert random_demo.model.visual.proj is not None and random_demo.model.text_projection is not None


def test_set_heads_writes_what_get_heads_reads(small_frame) -> None:
    loaded = load_model("ecif-demo", seed=4)
    heads = get_heads(loaded.model)
    rng = np.random.default_rng(0)
    new_image, new_text = rng.normal(size=heads.image.shape), rng.normal(size=heads.text.shape)
    set_heads(loaded.model, new_image, new_text, 2.5)
    written = get_heads(loaded.model)
    np.testing.assert_allclose(written.image, new_image, rtol=1e-6)
    np.testing.assert_allclose(written.text, new_text, rtol=1e-6)
    assert written.log_logit_scale == pytest.approx(2.5)

    pixels, _ = load_images(small_frame["filepath"].tolist()[:4], loaded.preprocess)
    features = features_module.encode_images(loaded, pixels)
    with torch.inference_mode():
        image = loaded.model.encode_image(pixels, normalize=True).double().numpy()
    np.testing.assert_allclose(_unit(features @ new_image), image, atol=1e-5)
    with pytest.raises(ValueError, match=r"proj must have shape \(96, 32\)"):
        set_heads(loaded.model, new_image[:, :10], new_text, 2.5)


def test_unsupported_architecture_is_named() -> None:
    tower = {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1}
    coca = CoCa(embed_dim=16, multimodal_cfg=tower, text_cfg=tower, vision_cfg={"layers": 1, "width": 16, "head_width": 8, "patch_size": 8, "image_size": 32})
    with pytest.raises(UnsupportedModelError, match=r"CoCa models are not supported; supported image towers: open_clip VisionTransformer"):
        get_heads(coca)


def _count_encoded_images(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the batch sizes sent through the image encoder from now on."""
    calls: list[int] = []
    original = features_module.encode_images

    def counting(loaded, images, blocks=0):
        calls.append(len(images))
        return original(loaded, images, blocks)

    monkeypatch.setattr(features_module, "encode_images", counting)
    return calls


def test_feature_cache_is_reused(random_demo: LoadedModel, small_frame, monkeypatch) -> None:
    first = compute_features(random_demo, small_frame)
    calls = _count_encoded_images(monkeypatch)
    second = compute_features(random_demo, small_frame)
    assert calls == []
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.text, second.text)
    # Another model, or another caption, is another cache entry.
    other = compute_features(load_model("ecif-demo", seed=5), small_frame)
    assert not np.allclose(other.image, first.image)
    edited = small_frame.assign(caption=small_frame["caption"].where(small_frame.index != 0, "a new caption"))
    assert features_module.features_cache_dir(random_demo, edited) != features_module.features_cache_dir(
        random_demo, small_frame
    )


def test_cancelled_feature_run_resumes_after_last_shard(random_demo: LoadedModel, small_frame, monkeypatch) -> None:
    monkeypatch.setattr(features_module, "SHARD_ROWS", 16)  # 40 rows -> shards of 16, 16, 8
    frame = small_frame.iloc[::-1].reset_index(drop=True)  # rows not computed by other tests yet
    cancel = threading.Event()
    progress: list[tuple[str, int, int]] = []

    def stop_after_first_shard(stage: str, done: int, total: int) -> None:
        progress.append((stage, done, total))
        if done >= 16:
            cancel.set()

    with pytest.raises(Cancelled):
        compute_features(random_demo, frame, Reporter(stop_after_first_shard, cancel), batch_size=8)
    directory = features_module.features_cache_dir(random_demo, frame)
    assert sorted(path.name for path in directory.iterdir()) == ["shard_00000.npz"]
    assert progress[0] == ("features", 0, 40) and progress[-1] == ("features", 16, 40)

    calls = _count_encoded_images(monkeypatch)
    resumed = compute_features(random_demo, frame, batch_size=8)
    assert sum(calls) == 24  # only the two unfinished shards
    reference = compute_features(random_demo, small_frame)  # same rows, reversed, other cache entry
    np.testing.assert_allclose(resumed.image, reference.image[::-1], atol=1e-5)
    np.testing.assert_allclose(resumed.text, reference.text[::-1], atol=1e-5)


def test_broken_image_is_reported_not_fatal(random_demo: LoadedModel, small_frame, tmp_path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    frame = small_frame.iloc[:3].copy()
    frame.loc[1, "filepath"] = str(broken)
    with pytest.warns(UserWarning, match=r"1 image\(s\) could not be read.*broken\.png"):
        features = compute_features(random_demo, frame, batch_size=1)  # a batch with no readable image
    assert list(features.failed) == [1]
    assert not features.image[1].any() and features.image[[0, 2]].any()
    assert features.text[1].any()


def test_zero_shot_table(random_demo: LoadedModel, small_frame) -> None:
    classes = ZeroShotClasses(["circle", "square"], {"circle": ["a circle", "a round thing"], "square": ["a square"]})
    prompts = encode_prompts(random_demo, classes.names, classes.prompts)
    assert prompts.features.shape == (3, 96) and prompts.class_index.tolist() == [0, 0, 1]
    frame = small_frame.iloc[:6].assign(label=["circle", "square", "star", None, "circle", "square"])
    table = zero_shot(random_demo, frame, classes)
    assert list(table.columns) == [
        "uid", "label", "predicted", "prob_true", "prob_predicted", "loss", "correct", "p[circle]", "p[square]",
    ]
    np.testing.assert_allclose(table[["p[circle]", "p[square]"]].sum(axis=1), 1.0)
    assert table["prob_true"].isna().tolist() == [False, False, True, True, False, False]
    assert not table.loc[table["prob_true"].isna(), "correct"].any()
    known = table.dropna(subset=["prob_true"])
    np.testing.assert_allclose(known["loss"], -np.log(known["prob_true"]))
    assert zero_shot_accuracy(random_demo, frame, classes) == pytest.approx(known["correct"].mean())


FAST_DEMO = DemoTrainConfig(epochs=8, min_steps=0, hard_negative_group=1, num_threads=1)
"""80 steps on 700 pairs in random batches: enough to learn colour (shape takes far longer, and the
default hard-negative batches, which hold captions of one colour together, learn colour later). One
thread: on a busy machine two OpenMP threads spin-wait for each other and run several times slower."""


def _colour_classes(shapes: LoadedManifest) -> ZeroShotClasses:
    """Zero-shot classes over the caption's colour word, with the demo's own prompts regrouped."""
    prompts = [prompt for class_prompts in shapes.classes.prompts.values() for prompt in class_prompts]
    colours = sorted(shapes.frame["colour"].unique())
    return ZeroShotClasses(colours, {colour: [p for p in prompts if f" {colour} " in p] for colour in colours})


@pytest.mark.slow
def test_demo_model_trains_resumes_and_is_cached(shapes: LoadedManifest) -> None:
    cancel = threading.Event()

    def cancel_in_third_epoch(stage: str, done: int, total: int) -> None:
        if done > 2 * total // FAST_DEMO.epochs:
            cancel.set()

    with pytest.raises(Cancelled):
        train_demo_model(shapes, FAST_DEMO, Reporter(cancel_in_third_epoch, cancel))
    resume_files = list((cache_dir() / "models").glob("*.resume.pt"))
    assert len(resume_files) == 1
    assert torch.load(resume_files[0], weights_only=True)["epoch"] == 2

    path = train_demo_model(shapes, FAST_DEMO)
    assert not resume_files[0].exists()
    started = time.perf_counter()
    assert train_demo_model(shapes, FAST_DEMO) == path
    assert time.perf_counter() - started < 1.0

    loaded = load_model("ecif-demo", checkpoint=path)
    test = shapes.frame[shapes.frame["split"] == "test"].assign(label=lambda frame: frame["colour"])
    accuracy = zero_shot_accuracy(loaded, test, _colour_classes(shapes))
    assert accuracy >= 0.7, f"zero-shot colour accuracy {accuracy:.2f} on the clean test split (chance 0.17)"


def test_resumed_training_equals_uninterrupted(shapes: LoadedManifest, tmp_path: Path, monkeypatch) -> None:
    tiny = LoadedManifest(
        frame=shapes.frame.iloc[:80].assign(split="train"),
        bad_rows=shapes.bad_rows,
        path=shapes.path,
        sha256="tiny-" + shapes.sha256,
        classes=shapes.classes,
    )
    config = DemoTrainConfig(epochs=3, min_steps=0, batch_size=16, num_threads=1)
    monkeypatch.setenv("ECIF_CACHE", str(tmp_path / "uninterrupted"))
    uninterrupted = train_demo_model(tiny, config).read_bytes()

    monkeypatch.setenv("ECIF_CACHE", str(tmp_path / "interrupted"))
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        train_demo_model(tiny, config, Reporter(lambda stage, done, total: done > 6 and cancel.set(), cancel))
    assert train_demo_model(tiny, config).read_bytes() == uninterrupted


def test_hard_negative_batches_group_captions_that_differ_only_in_class() -> None:
    from ecif.models.demo import caption_templates, hard_negative_order

    captions, labels = [], []
    for colour in ("red", "blue", "green"):
        for shape in ("circle", "square", "triangle", "star"):
            for copy in range(2):
                captions.append(f"a {colour} {shape} at the top")
                labels.append(shape)
    templates = caption_templates(captions, labels)
    assert templates[0] == "a red _ at the top"
    assert caption_templates(["a star"], None) == ["a star"]
    order = hard_negative_order(templates, labels, 4, torch.Generator().manual_seed(0)).tolist()
    assert sorted(order) == list(range(len(captions)))
    groups = [order[start : start + 4] for start in range(0, len(order), 4)]
    for group in groups:
        assert len({templates[index] for index in group}) == 1, [captions[index] for index in group]
        assert len({labels[index] for index in group}) == 4, "labels interleaved: one of each class per group"
    plain = hard_negative_order(templates, labels, 1, torch.Generator().manual_seed(0)).tolist()
    assert sorted(plain) == list(range(len(captions))) and plain != order
