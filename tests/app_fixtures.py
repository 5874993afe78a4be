"""A small synthetic run folder that follows the documented layout and schemas exactly.

Used by the curation, index, export, job and app tests so they run in seconds without a model: real
PNG images, ``manifest.parquet``, ``scores.parquet``, ``mispredictions.parquet``, ``embeddings.npz``,
``bad_rows.parquet``, ``classes.json`` and ``run.json``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ecif.run import (BAD_ROWS_FILE, CLASSES_FILE, EMBEDDINGS_FILE, MANIFEST_FILE,
                      MISPREDICTIONS_FILE, SCORES_FILE, Run, atomic_write_json,
                      atomic_write_parquet)

CLASSES = ["circle", "square", "triangle"]
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220)}


def _draw(path: Path, shape: str, colour: tuple[int, int, int], size: int) -> None:
    image = Image.new("RGB", (size, size), (245, 245, 245))
    pixels = image.load()
    centre = size / 2
    for y in range(size):
        for x in range(size):
            dx, dy = x - centre, y - centre
            inside = {"circle": dx * dx + dy * dy < (size / 3) ** 2,
                      "square": abs(dx) < size / 3 and abs(dy) < size / 3,
                      "triangle": y > size / 5 and abs(dx) < (y - size / 5) / 2}[shape]
            if inside:
                pixels[x, y] = colour
    image.save(path)


def build_synthetic_run(directory: str | Path, n_train: int = 40, n_val: int = 12, dim: int = 16,
                        seed: int = 0, image_size: int = 24, corrupt_fraction: float = 0.2) -> Run:
    """Write a scored run folder at ``directory`` and return it.

    Images are drawn once per (shape, colour) and shared by file path, so 5,000 pairs stay cheap.
    About ``corrupt_fraction`` of the training captions name the wrong shape (``corrupted`` True,
    ``original_caption`` holds the right one) and get harmful (negative) influence.
    """
    rng = np.random.default_rng(seed)
    run = Run(directory)
    run.directory.mkdir(parents=True, exist_ok=True)
    images = run.directory / "images"
    images.mkdir(exist_ok=True)
    n = n_train + n_val
    shapes = rng.choice(CLASSES, size=n)
    colours = rng.choice(list(COLOURS), size=n)
    corrupted = np.zeros(n, dtype=bool)
    corrupted[:n_train] = rng.random(n_train) < corrupt_fraction
    records = []
    for row in range(n):
        shape, colour = str(shapes[row]), str(colours[row])
        path = images / f"{colour}_{shape}.png"
        if not path.exists():
            _draw(path, shape, COLOURS[colour], image_size)
        clean = f"a {colour} {shape}"
        wrong = CLASSES[(CLASSES.index(shape) + 1) % len(CLASSES)]
        records.append({
            "uid": f"pair-{row:05d}", "filepath": str(path.resolve()),
            "caption": f"a {colour} {wrong}" if corrupted[row] else clean,
            "split": "train" if row < n_train else "val", "label": shape, "source_row": row + 1,
            "corrupted": bool(corrupted[row]), "original_caption": clean, "colour": colour,
        })
    manifest = pd.DataFrame.from_records(records)
    atomic_write_parquet(run.path(MANIFEST_FILE), manifest)
    atomic_write_parquet(run.path(BAD_ROWS_FILE), pd.DataFrame(
        [{"row": n + 1, "uid": "missing-1", "filepath": "/nowhere/x.png", "reason": "missing file"}]))
    atomic_write_json(run.path(CLASSES_FILE), {
        "names": CLASSES, "prompts": {c: [f"a photo of a {c}", f"a {c}"] for c in CLASSES}})

    # Embeddings: one direction per shape plus noise; a corrupted pair's text points at the wrong shape.
    centres = rng.normal(size=(len(CLASSES), dim))
    shape_index = np.array([CLASSES.index(s) for s in shapes])
    text_index = np.where(corrupted, (shape_index + 1) % len(CLASSES), shape_index)
    image = centres[shape_index] + 0.3 * rng.normal(size=(n, dim))
    text = centres[text_index] + 0.3 * rng.normal(size=(n, dim))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    np.savez(run.path(EMBEDDINGS_FILE), image=image.astype(np.float32), text=text.astype(np.float32))

    train = manifest.iloc[:n_train]
    pos = np.where(train["corrupted"], -rng.uniform(0.5, 1.0, n_train), rng.normal(0.05, 0.1, n_train))
    neg = np.where(train["corrupted"], -rng.uniform(0.1, 0.5, n_train), rng.normal(0.0, 0.05, n_train))
    clip = (image[:n_train] * text[:n_train]).sum(axis=1)
    scores = pd.DataFrame({
        "row": np.arange(n_train), "uid": train["uid"], "filepath": train["filepath"],
        "caption": train["caption"], "label": train["label"], "corrupted": train["corrupted"],
        "original_caption": train["original_caption"],
        "influence": pos + neg, "influence_pos": pos, "influence_neg": neg,
        "influence_first_order": pos + 0.8 * neg,
        "self_influence": np.abs(pos) + rng.uniform(0, 0.1, n_train),
        "self_influence_first_order": np.abs(pos) + rng.uniform(0, 0.1, n_train),
        "clip_score": clip, "loss": 2.0 - clip,
    })
    scores["rank"] = scores["influence"].rank(method="first").astype(int)
    scores["suggested_action"] = np.where(scores["influence"] < -0.8, "drop",
                                          np.where(scores["influence"] < -0.4, "relabel", "keep"))
    atomic_write_parquet(run.path(SCORES_FILE), scores)

    val = manifest.iloc[n_train:]
    predicted = [CLASSES[(CLASSES.index(s) + (i % 3 == 0)) % 3] for i, s in enumerate(val["label"])]
    prob_true = rng.uniform(0.1, 0.9, n_val)
    atomic_write_parquet(run.path(MISPREDICTIONS_FILE), pd.DataFrame({
        "row": np.arange(n_train, n), "uid": val["uid"].to_numpy(), "filepath": val["filepath"].to_numpy(),
        "caption": val["caption"].to_numpy(), "split": "val", "label": val["label"].to_numpy(),
        "predicted": predicted, "prob_true": prob_true, "prob_predicted": 1 - prob_true / 2,
        "loss": -np.log(prob_true), "correct": [p == t for p, t in zip(predicted, val["label"])],
    }))
    run.update_info(model_hash="synthetic-model-hash", manifest_sha256="synthetic-manifest",
                    settings={"model": "synthetic", "trusted_split": "val",
                              "curvature": {"damping": 0.01}},
                    stages={s: {"done": True} for s in ("data", "features", "fine-tune", "curvature",
                                                       "scores", "mispredictions")})
    return run
