"""Neighbour index at size: exact vs IVF, persistence checked against the run, masking, export.

Real faiss, small synthetic data; the IVF path is forced with a low ``exact_max_vectors``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest
from app_fixtures import build_synthetic_run

from ecif.curation.export import export_run
from ecif.curation.review import decide, edit_spec, open_store, review_table
from ecif.index.neighbours import META_FILE, UIDS_FILE, IndexConfig, NeighbourIndex, StaleIndexError, build_run_index
from ecif.run import EMBEDDINGS_FILE, INDEX_DIR, SCORES_FILE, Run, atomic_write_parquet, atomic_write_with

FORCED_IVF = IndexConfig(exact_max_vectors=500)


def unit_vectors(n: int, dim: int, clusters: int | None, seed: int = 0) -> np.ndarray:
    """[n, dim] float32 unit vectors: uniform on the sphere (``clusters=None``, IVF's worst case:
    no structure for the coarse quantiser to find) or around ``clusters`` random directions, the way
    image and caption embeddings gather by content."""
    rng = np.random.default_rng(seed)
    if clusters is None:
        vectors = rng.normal(size=(n, dim))
    else:
        centres = rng.normal(size=(clusters, dim))
        vectors = centres[rng.integers(0, clusters, n)] + 0.5 * rng.normal(size=(n, dim))
    vectors = vectors.astype(np.float32)
    faiss.normalize_L2(vectors)
    return vectors


def recall_at_10(index: faiss.Index, vectors: np.ndarray, queries: int = 500) -> float:
    """Mean share of the exact 10 nearest neighbours of the first ``queries`` vectors that
    ``index`` finds."""
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(vectors[:queries], 10)
    _, found = index.search(vectors[:queries], 10)
    return float(np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)]))


def rewrite_embeddings(run: Run, seed: int) -> dict[str, np.ndarray]:
    """New embeddings of the same shape, replaced by a rename as the pipeline does."""
    with np.load(run.path(EMBEDDINGS_FILE)) as data:
        n, dim = data["image"].shape
    new = {m: unit_vectors(n, dim, clusters=None, seed=seed + i) for i, m in enumerate(("image", "text"))}
    atomic_write_with(run.path(EMBEDDINGS_FILE), lambda temporary: np.savez(temporary, **new))
    return new


@pytest.fixture
def small_run(tmp_path: Path) -> Run:
    return build_synthetic_run(tmp_path / "run", n_train=60, n_val=10)


@pytest.fixture(scope="module")
def ivf_run(tmp_path_factory) -> Run:
    """2,000 training pairs indexed with IVF (the threshold forced down to 500)."""
    run = build_synthetic_run(tmp_path_factory.mktemp("ivf") / "run", n_train=2000, n_val=20, dim=32)
    build_run_index(run, config=FORCED_IVF)
    return run


# ----------------------------------------------------------------------------- exact or IVF
def test_config_is_exact_up_to_the_threshold() -> None:
    config = IndexConfig()
    assert config.ivf_lists(1_000_000) == 0
    assert config.ivf_lists(1_000_001) == 4000  # 4·√N
    assert config.ivf_lists(25_000_000) == 20_000
    # Small forced-IVF indexes keep at least 39 training vectors per list (faiss's k-means minimum).
    assert IndexConfig(exact_max_vectors=1000).ivf_lists(5000) == 5000 // 39
    assert isinstance(config.make(unit_vectors(100, 8, None)), faiss.IndexFlatIP)
    assert isinstance(IndexConfig(exact_max_vectors=10).make(unit_vectors(1000, 8, None)),
                      faiss.IndexIVFFlat)


def test_ivf_recall_on_uniform_vectors() -> None:
    """5,000 uniform random unit vectors in 64-d, the hardest case for IVF: 128 lists, half probed."""
    vectors = unit_vectors(5000, 64, clusters=None)
    index = IndexConfig(exact_max_vectors=1000, nprobe=64).make(vectors)
    assert isinstance(index, faiss.IndexIVFFlat) and index.nlist == 128
    assert recall_at_10(index, vectors) >= 0.9  # measured 0.93
    index.nprobe = index.nlist  # every list probed: IVF is exact
    assert recall_at_10(index, vectors) == 1.0


def test_ivf_recall_on_clustered_vectors_with_default_nprobe() -> None:
    """Embedding-like data (50 clusters) with the default nprobe=32 of 128 lists."""
    vectors = unit_vectors(5000, 64, clusters=50)
    index = IndexConfig(exact_max_vectors=1000).make(vectors)
    assert index.nprobe == 32
    assert recall_at_10(index, vectors) >= 0.98  # measured 1.0


# ----------------------------------------------------------------------------- persistence
def test_ivf_index_is_saved_and_reloaded(ivf_run: Run) -> None:
    folder = ivf_run.path(INDEX_DIR)
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["count"] == 2000 and meta["config"]["exact_max_vectors"] == 500
    assert meta["layout"]["image"] == {"dim": 32, "ivf_lists": 2000 // 39}
    loaded = NeighbourIndex.load(ivf_run, on_stale="raise")
    assert all(isinstance(i, faiss.IndexIVFFlat) and i.nprobe == 32 for i in loaded.indexes.values())
    found = loaded.similar(5, 10, by="text")
    assert len(found) == 10 and 5 not in set(found["row"])
    exact = loaded.embeddings["text"][:2000] @ loaded.vector(5, "text")[0]
    exact[5] = -np.inf
    assert len(set(found["row"]) & set(np.argsort(-exact)[:10])) >= 9


def test_nprobe_changes_without_a_rebuild(ivf_run: Run) -> None:
    meta = ivf_run.path(INDEX_DIR) / META_FILE
    built = meta.stat().st_mtime_ns
    loaded = NeighbourIndex.load(ivf_run, config=dataclasses.replace(FORCED_IVF, nprobe=7))
    assert {i.nprobe for i in loaded.indexes.values()} == {7}
    assert meta.stat().st_mtime_ns == built


def test_new_embeddings_make_the_index_stale(small_run: Run) -> None:
    build_run_index(small_run)
    new = rewrite_embeddings(small_run, seed=5)
    with pytest.raises(StaleIndexError, match="embeddings.npz changed"):
        NeighbourIndex.load(small_run, on_stale="raise")
    rebuilt = NeighbourIndex.load(small_run)
    cosines = new["image"][:60] @ new["image"][3]
    cosines[3] = -np.inf
    assert list(rebuilt.similar(3, 5)["row"]) == list(np.argsort(-cosines)[:5])
    NeighbourIndex.load(small_run, on_stale="raise")  # fresh again


def test_row_uid_map_must_match_the_run(small_run: Run) -> None:
    build_run_index(small_run)
    uids_file = small_run.path(INDEX_DIR) / UIDS_FILE
    uids = np.load(uids_file)
    np.save(uids_file, uids[[1, 0, *range(2, len(uids))]])
    with pytest.raises(StaleIndexError, match="row→uid map"):
        NeighbourIndex.load(small_run, on_stale="raise")
    assert list(NeighbourIndex.load(small_run).uids) == list(uids)
    # The run re-scored on fewer training pairs: the saved map no longer covers it.
    atomic_write_parquet(small_run.path(SCORES_FILE), small_run.scores().iloc[:50])
    with pytest.raises(StaleIndexError, match="60 saved, 50 in the run"):
        NeighbourIndex.load(small_run, on_stale="raise")
    assert len(NeighbourIndex.load(small_run).rows) == 50


def test_interrupted_or_missing_builds_are_caught(small_run: Run) -> None:
    with pytest.raises(StaleIndexError, match="no finished build"):
        NeighbourIndex.load(small_run, on_stale="raise")
    build_run_index(small_run)
    text = faiss.IndexFlatIP(16)
    text.add(unit_vectors(59, 16, None))  # as if a concurrent build of another run got halfway
    faiss.write_index(text, str(small_run.path(INDEX_DIR) / "text.faiss"))
    with pytest.raises(StaleIndexError, match="interrupted"):
        NeighbourIndex.load(small_run, on_stale="raise")
    assert NeighbourIndex.load(small_run).indexes["text"].ntotal == 60


def test_other_layout_settings_rebuild(small_run: Run) -> None:
    build_run_index(small_run)
    forced = IndexConfig(exact_max_vectors=50)
    with pytest.raises(StaleIndexError, match="settings ask for 1"):
        NeighbourIndex.load(small_run, config=forced, on_stale="raise")
    assert isinstance(NeighbourIndex.load(small_run, config=forced).indexes["image"], faiss.IndexIVFFlat)
    # Without settings the loader keeps what the index was built with.
    assert isinstance(NeighbourIndex.load(small_run, on_stale="raise").indexes["image"],
                      faiss.IndexIVFFlat)


# ----------------------------------------------------------------------------- dropped pairs
def drop_rows(run: Run, rows: list[int]) -> list[int]:
    """Drop ``rows`` through the curation store; return the dropped rows as the store sees them."""
    store = open_store(run, "S")
    decide(store, review_table(run.scores(), store.current_state()), "drop", rows)
    dropped, _ = edit_spec(store.current_state())
    return dropped


@pytest.mark.parametrize("config", [IndexConfig(), dataclasses.replace(FORCED_IVF, nprobe=8)],
                         ids=["exact", "ivf"])
def test_dropped_pairs_are_masked_without_a_rebuild(tmp_path: Path, config: IndexConfig) -> None:
    run = build_synthetic_run(tmp_path / "run", n_train=1000, n_val=10)
    index = build_run_index(run, config=config)
    built = run.path(INDEX_DIR) / META_FILE
    stamp = built.stat().st_mtime_ns
    nearest = index.similar(0, 10, by="image")
    dropped = drop_rows(run, nearest["row"].tolist())
    assert sorted(dropped) == sorted(nearest["row"])
    masked = NeighbourIndex.load(run, config=config, on_stale="raise").similar(
        0, 10, by="image", exclude_rows=dropped)
    assert len(masked) == 10 and not set(masked["row"]) & set(dropped)
    assert built.stat().st_mtime_ns == stamp
    # Exactly the next ten for the flat index; IVF (8 of 25 lists probed) may miss one of them.
    cosines = index.embeddings["image"][:1000] @ index.vector(0, "image")[0]
    cosines[[0, *dropped]] = -np.inf
    overlap = len(set(masked["row"]) & set(np.argsort(-cosines)[:10]))
    assert overlap == 10 if config.ivf_lists(1000) == 0 else overlap >= 9


# ----------------------------------------------------------------------------- export
@pytest.mark.parametrize("config", [IndexConfig(), FORCED_IVF], ids=["exact", "ivf"])
def test_export_rebuilds_the_index_for_the_cleaned_manifest(tmp_path: Path, config: IndexConfig) -> None:
    run = build_synthetic_run(tmp_path / "run", n_train=1000, n_val=100)
    build_run_index(run)
    dropped = drop_rows(run, list(range(0, 1000, 7)))
    result = export_run(run, tmp_path / "out", formats=("csv",), index=config)
    folder = result.files["index"]
    assert folder == result.out_dir / INDEX_DIR
    # The split files one after another (train.csv, then val.csv; test.csv has no rows here).
    manifest = pd.concat([pd.read_csv(result.files[f"{split}_csv"]) for split in ("train", "val", "test")],
                         ignore_index=True)
    assert len(manifest) == 1100 - len(dropped)
    # faiss id i is line i of the split files read in turn; nothing dropped is left in the index.
    assert list(np.load(folder / "rows.npy")) == list(manifest["row"])
    assert list(np.load(folder / UIDS_FILE)) == list(manifest["uid"])
    embeddings = np.load(run.path(EMBEDDINGS_FILE))
    for modality in ("image", "text"):
        index = faiss.read_index(str(folder / f"{modality}.faiss"))
        assert index.ntotal == len(manifest)
        assert isinstance(index, faiss.IndexIVFFlat) == (config.ivf_lists(len(manifest)) > 0)
        _, ids = index.search(np.ascontiguousarray(embeddings[modality][dropped]), 1)
        assert not set(manifest["row"].to_numpy()[ids[:, 0]]) & set(dropped)
    # The run's own index still holds the dropped pairs, ready for a restore.
    assert NeighbourIndex.load(run, on_stale="raise").indexes["image"].ntotal == 1000
    info = json.loads(result.files["run"].read_text())
    assert "index" not in info["sha256"] and "train_csv" in info["sha256"]
