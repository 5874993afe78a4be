"""export_run: both modes, every format, provenance files, and an open_clip-loadable CSV."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from ecif.curation.export import export_run
from ecif.curation.review import decide, open_store, review_table
from app_fixtures import build_synthetic_run


@pytest.fixture
def curated(tmp_path: Path):
    run = build_synthetic_run(tmp_path / "run", n_train=20, n_val=5)
    store = open_store(run, "S")
    table = review_table(run.scores(), store.current_state())
    decide(store, table, "drop", [0, 1])
    decide(store, table, "relabel", [2], ["a purple hexagon"])
    decide(store, table, "accept", [3])
    return run


def test_everything_kept(curated, tmp_path: Path) -> None:
    result = export_run(curated, tmp_path / "out", formats=("csv", "tsv", "jsonl", "parquet"))
    csv = pd.read_csv(result.files["csv"])
    assert list(csv.columns[:3]) == ["filepath", "title", "uid"]
    assert len(csv) == 25 - 2 and not csv["uid"].isin(["pair-00000", "pair-00001"]).any()
    assert csv.set_index("uid").loc["pair-00002", "title"] == "a purple hexagon"
    assert csv["filepath"].map(lambda p: Path(p).is_absolute() and Path(p).exists()).all()
    assert set(csv["split"]) == {"train", "val"}
    for fmt in ("tsv", "jsonl", "parquet"):
        assert result.files[fmt].exists()
    assert len(pd.read_json(result.files["jsonl"], lines=True)) == 23
    uids = result.files["uids"].read_text().split()
    assert uids == sorted(csv["uid"])
    decisions = pd.read_csv(result.files["decisions"])
    assert list(decisions["action"]) == ["drop", "drop", "relabel", "accept"]
    info = json.loads(result.files["run"].read_text())
    assert info["run"]["model_hash"] == "synthetic-model-hash"
    assert info["export"]["counts"] == {"selected": 25, "kept": 23, "dropped": 2, "relabelled": 1}
    assert set(info["sha256"]) >= {"csv", "uids", "decisions"}


def test_exactly_this_view(curated, tmp_path: Path) -> None:
    result = export_run(curated, tmp_path / "view", view_rows=[5, 1, 2], formats=("csv",))
    csv = pd.read_csv(result.files["csv"])
    assert list(csv["uid"]) == ["pair-00005", "pair-00002"]  # order kept, dropped pair 1 left out
    assert result.mode == "view" and result.counts["dropped"] == 1


def test_edited_checkpoint_is_copied(curated, tmp_path: Path) -> None:
    (curated.path("edited")).mkdir()
    (curated.path("edited") / "model.safetensors").write_bytes(b"weights")
    (curated.path("edited") / "edit.json").write_text("{}")
    result = export_run(curated, tmp_path / "out", formats=("parquet",))
    assert result.files["checkpoint"].read_bytes() == b"weights"
    assert result.files["edit"].name == "edited_edit.json"
    assert "checkpoint" in json.loads(result.files["run"].read_text())["sha256"]


def test_csv_loads_like_open_clip(curated, tmp_path: Path, monkeypatch) -> None:
    """What open_clip_train.data.CsvDataset does with --csv-separator , --csv-img-key filepath
    --csv-caption-key title, from an unrelated working directory."""
    result = export_run(curated, tmp_path / "out", formats=("csv",))
    monkeypatch.chdir(tmp_path)
    frame = pd.read_csv(result.files["csv"], sep=",")
    images, captions = frame["filepath"].tolist(), frame["title"].tolist()
    assert len(captions) == 23 and all(isinstance(c, str) and c for c in captions)
    with Image.open(str(images[0])) as image:
        assert image.size == (24, 24)


def test_unknown_format(curated, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown export format"):
        export_run(curated, tmp_path / "out", formats=("xml",))
