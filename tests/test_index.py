"""NeighbourIndex, caption suggestions, the 2-D map and the detection curves."""

from __future__ import annotations


import numpy as np
import pytest

from ecif.index.neighbours import NeighbourIndex, build_run_index, suggest_caption
from ecif.index.projection import embedding_map
from ecif.run import INDEX_DIR
from app_fixtures import build_synthetic_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return build_synthetic_run(tmp_path_factory.mktemp("run") / "run", n_train=60, n_val=10)


def test_build_and_reload(run) -> None:
    built = build_run_index(run)
    for name in ("image.faiss", "text.faiss", "rows.npy", "uids.npy"):
        assert (run.path(INDEX_DIR) / name).exists()
    loaded = NeighbourIndex.load(run)
    assert loaded.similar(3, 5).equals(built.similar(3, 5))
    assert list(loaded.rows) == list(range(60))  # training rows only


def test_similar_matches_brute_force(run) -> None:
    index = NeighbourIndex.load(run)
    vectors = index.embeddings["text"][:60]
    cosines = vectors @ vectors[7]
    cosines[7] = -np.inf
    found = index.similar(7, 4, by="text")
    assert list(found["row"]) == list(np.argsort(-cosines)[:4])
    np.testing.assert_allclose(found["similarity"], np.sort(cosines)[::-1][:4], rtol=1e-5)
    cosines[7] = np.inf
    least = index.similar(7, 3, by="text", least=True)
    assert list(least["row"]) == list(np.argsort(cosines)[:3])


def test_dropped_rows_are_masked(run) -> None:
    index = NeighbourIndex.load(run)
    first = index.similar(0, 3)
    masked = index.similar(0, 3, exclude_rows=first["row"].tolist())
    assert not set(first["row"]) & set(masked["row"]) and len(masked) == 3
    assert len(index.similar(0, 100, exclude_rows=range(10))) == 60 - 10


def test_validation_row_can_query(run) -> None:
    found = NeighbourIndex.load(run).similar(65, 3)
    assert len(found) == 3 and found["row"].max() < 60


def test_suggest_caption_recovers_clean_caption(run) -> None:
    scores = run.scores()
    corrupted = scores[scores["corrupted"]]
    # The fixture's embeddings encode the shape, not the colour: the suggestion must name the shape.
    right = sum(suggest_caption(run, int(r), k=8)[0].split()[-1] == label
                for r, label in zip(corrupted["row"], corrupted["label"]))
    assert right >= 0.8 * len(corrupted)
    caption, evidence = suggest_caption(run, int(corrupted["row"].iloc[0]), k=8)
    assert caption != corrupted["caption"].iloc[0]
    assert list(evidence.columns) == ["row", "uid", "image_similarity", "caption", "caption_match"]


def test_embedding_map_is_cached(run) -> None:
    first = embedding_map(run, "image")
    assert list(first.columns) == ["row", "x", "y"] and len(first) == 60
    assert (run.path(INDEX_DIR) / "map_image.parquet").exists()
    assert embedding_map(run, "image").equals(first)

