"""export_run: both modes, every format split by split, provenance files, and a training file that
open_clip's own loader reads as exactly the kept training pairs."""

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
    csv = pd.read_csv(result.files["train_csv"])
    assert result.files["train_csv"] == result.out_dir / "train.csv"
    assert list(csv.columns[:3]) == ["filepath", "title", "uid"]
    assert len(csv) == 20 - 2 and not csv["uid"].isin(["pair-00000", "pair-00001"]).any()
    assert csv.set_index("uid").loc["pair-00002", "title"] == "a purple hexagon"
    assert csv["filepath"].map(lambda p: Path(p).is_absolute() and Path(p).exists()).all()
    assert set(csv["split"]) == {"train"}
    val = pd.read_csv(result.files["val_csv"])
    assert len(val) == 5 and set(val["split"]) == {"val"}
    assert len(pd.read_csv(result.files["test_csv"])) == 0  # no test split in this run: a file without rows
    assert result.splits == {"train": 18, "val": 5, "test": 0}
    for split in ("train", "val", "test"):
        for fmt in ("tsv", "jsonl", "parquet"):
            assert result.files[f"{split}_{fmt}"] == result.out_dir / f"{split}.{fmt}"
            assert result.files[f"{split}_{fmt}"].exists()
    assert len(pd.read_json(result.files["train_jsonl"], lines=True)) == 18
    uids = result.files["train_uids"].read_text().split()
    assert uids == sorted(csv["uid"])
    assert result.files["val_uids"].read_text().split() == sorted(val["uid"])
    decisions = pd.read_csv(result.files["decisions"])
    assert list(decisions["action"]) == ["drop", "drop", "relabel", "accept"]
    info = json.loads(result.files["run"].read_text())
    assert info["run"]["model_hash"] == "synthetic-model-hash"
    assert info["export"]["counts"] == {"selected": 25, "kept": 23, "dropped": 2, "relabelled": 1}
    assert info["export"]["splits"] == {"train": 18, "val": 5, "test": 0}
    assert set(info["sha256"]) >= {"train_csv", "val_csv", "train_uids", "decisions"}


def test_exactly_this_view(curated, tmp_path: Path) -> None:
    result = export_run(curated, tmp_path / "view", view_rows=[5, 1, 2], formats=("csv",))
    csv = pd.read_csv(result.files["train_csv"])
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
    frame = pd.read_csv(result.files["train_csv"], sep=",")
    images, captions = frame["filepath"].tolist(), frame["title"].tolist()
    assert len(captions) == 18 and all(isinstance(c, str) and c for c in captions)
    with Image.open(str(images[0])) as image:
        assert image.size == (24, 24)


def test_unknown_format(curated, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown export format"):
        export_run(curated, tmp_path / "out", formats=("xml",))


# ------------------------------------------------------------- the training file, read by open_clip


def _open_clip_csv_dataset():
    """open_clip_train's own ``CsvDataset`` class (what ``open_clip_train.main`` builds for a .csv).

    Its module imports ``webdataset`` and ``braceexpand`` (the dev extra installs them, as
    ``open_clip_train.main`` needs them to run at all).
    """
    import inspect

    from open_clip_train.data import CsvDataset

    assert list(inspect.signature(CsvDataset).parameters) == [
        "input_filename", "transforms", "img_key", "caption_key", "sep", "tokenizer"]
    return CsvDataset


def test_training_export_is_the_kept_train_split_only_as_open_clip_reads_it(tmp_path: Path, monkeypatch) -> None:
    """A curator drops one training pair and relabels another; open_clip's CsvDataset, with the
    options the README gives, reads exactly the other training pairs (the relabel applied) from
    train.csv, and none of the validation or test pairs, which have their own files."""
    import open_clip
    from torchvision import transforms

    from ecif.cli import main
    from ecif.curation.export import OPEN_CLIP_CSV_OPTIONS
    from ecif.run import MANIFEST_FILE, atomic_write_parquet

    run = build_synthetic_run(tmp_path / "run", n_train=12, n_val=8)
    manifest = run.manifest()
    manifest.loc[16:, "split"] = "test"  # rows 0-11 train, 12-15 val, 16-19 test
    atomic_write_parquet(run.path(MANIFEST_FILE), manifest)
    store = open_store(run, "S")
    table = review_table(run.scores(), store.current_state())
    decide(store, table, "drop", [3])
    decide(store, table, "relabel", [5], ["a purple hexagon"])

    result = export_run(run, tmp_path / "export", formats=("csv", "tsv", "jsonl", "parquet"))
    assert OPEN_CLIP_CSV_OPTIONS == "--csv-separator , --csv-img-key filepath --csv-caption-key title"
    train = manifest[(manifest["split"] == "train") & (manifest["uid"] != "pair-00003")]
    expected = {
        "train": train.assign(caption=train["caption"].where(train["uid"] != "pair-00005", "a purple hexagon")),
        "val": manifest[manifest["split"] == "val"],
        "test": manifest[manifest["split"] == "test"],
    }
    CsvDataset = _open_clip_csv_dataset()
    transform = transforms.Compose([transforms.Resize((8, 8)), transforms.ToTensor()])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # paths resolve wherever training starts (they are absolute)
    for split, pairs in expected.items():
        path = result.out_dir / f"{split}.csv"
        assert result.files[f"{split}_csv"] == path and result.splits[split] == len(pairs)
        dataset = CsvDataset(str(path), transform, img_key="filepath", caption_key="title", sep=",",
                             tokenizer=open_clip.tokenize)
        assert len(dataset) == len(pairs)
        assert dataset.images == pairs["filepath"].tolist()
        assert dataset.captions == pairs["caption"].tolist()
        assert pd.read_csv(path, sep=",")["uid"].tolist() == pairs["uid"].tolist()
        for index in range(len(dataset)):
            image, tokens = dataset[index]
            assert tuple(image.shape) == (3, 8, 8) and tuple(tokens.shape) == (77,)
        # open_clip's default separator is a tab: the TSV needs no --csv-separator.
        tsv = CsvDataset(str(result.out_dir / f"{split}.tsv"), transform, img_key="filepath", caption_key="title")
        assert tsv.images == dataset.images and tsv.captions == dataset.captions
        # The other formats hold the same pairs per split, in the same order.
        for other in (pd.read_json(result.files[f"{split}_jsonl"], lines=True, dtype=False),
                      pd.read_parquet(result.files[f"{split}_parquet"])):
            assert other["uid"].tolist() == pairs["uid"].tolist()
            assert other["title"].tolist() == pairs["caption"].tolist()
        assert result.files[f"{split}_uids"].read_text().split() == sorted(pairs["uid"])
    train_uids = set(pd.read_csv(result.out_dir / "train.csv")["uid"])
    assert "pair-00003" not in train_uids and not train_uids & set(manifest.loc[12:, "uid"])
    assert "a purple hexagon" in CsvDataset(str(result.out_dir / "train.csv"), transform, "filepath", "title",
                                            sep=",").captions
    # The rebuilt index: faiss ids run through train, val and test in turn.
    import numpy as np

    assert np.load(result.files["index"] / "uids.npy").tolist() == [
        uid for split in ("train", "val", "test") for uid in expected[split]["uid"]]

    # The command line writes the same layout and says how to train on the train split alone.
    assert main(["export", "--run", str(run.directory), "--out", str(tmp_path / "cli"), "--formats", "csv"]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").glob("*.csv")) == [
        "decisions.csv", "test.csv", "train.csv", "val.csv"]
