"""Feature extraction into a feature store: the same features as the in-memory path, bad rows left
out and listed, resume after a cancel, Ray equal to one process byte for byte, and the command line
from a manifest to scores.  The model is the randomly initialised demo architecture (no training)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_features import _count_encoded_images
from test_streaming import own_cache  # noqa: F401 (autouse: every test starts with an empty cache)

from ecif.cli import main
from ecif.data import load_manifest, make_demo_data
from ecif.influence.streaming import FeatureStore, LocalExecutor
from ecif.models import compute_features, get_heads, load_model, save_checkpoint
from ecif.objective.contrastive import HeadsScope
from ecif.progress import Cancelled, Reporter
from ecif.tasks.engine import save_heads
from ecif.tasks.extract import extract_feature_store, read_left_out, read_row_map

MODEL = "ecif-demo"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seed-0 random ecif-demo model saved as a file (a model without weights is refused)."""
    return save_checkpoint(load_model(MODEL).model, tmp_path_factory.mktemp("model") / "demo.safetensors")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shapes demo (90 pairs, 66 train) as three parquet shards of 30 rows (a glob), with one
    undecodable image in shard 1 and one missing image in shard 2, both on train rows."""
    folder = tmp_path_factory.mktemp("extract")
    demo = make_demo_data("shapes", folder / "demo", n=90, noise=0.1)
    table = pd.read_csv(demo)
    table["filepath"] = [str(demo.parent / path) for path in table["filepath"]]
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    first_train = {part: table.index[(table.index // 30 == part) & (table["split"] == "train")][0] for part in (1, 2)}
    table.loc[first_train[1], "filepath"] = str(folder / "corrupt.png")
    table.loc[first_train[2], "filepath"] = str(folder / "gone.png")
    for part in range(3):
        table.iloc[30 * part : 30 * (part + 1)].to_parquet(folder / f"part-{part:05d}.parquet")
    return folder / "part-*.parquet"


def _files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_store_holds_the_in_memory_features_and_lists_left_out_rows(
    shards: Path, checkpoint: Path, tmp_path: Path
) -> None:
    store = extract_feature_store(shards, tmp_path / "train", MODEL, checkpoint, splits=["train"], rows_per_chunk=16, batch_size=8)

    assert store.n_shards == 6 and store.n_pairs == 64  # 3 shards of 30 rows -> chunks of 16 + 14
    assert FeatureStore.open(tmp_path / "train") == store
    rows = read_row_map(store)
    manifest = load_manifest(shards, check_images=False).frame
    train = manifest[(manifest["split"] == "train") & ~manifest["filepath"].str.endswith("corrupt.png")]
    assert rows["uid"].tolist() == train["uid"].tolist()
    assert list(rows.columns) == ["uid", "filepath", "caption", "split", "label", "source_row", "shard"]

    left_out = read_left_out(store.directory).set_index("uid")
    assert len(left_out) == 2 and set(left_out["shard"]) == {"part-00001.parquet", "part-00002.parquet"}
    assert left_out["reason"].str.startswith("undecodable image: ").sum() == 1
    assert (left_out["reason"] == "missing file").sum() == 1
    assert json.loads((store.directory / "extract.json").read_text())["left_out"] == 2

    expected = compute_features(load_model(MODEL, checkpoint), rows)
    image = np.concatenate([store.read(shard)[0].numpy() for shard in range(store.n_shards)])
    text = np.concatenate([store.read(shard)[1].numpy() for shard in range(store.n_shards)])
    np.testing.assert_allclose(image, expected.image, atol=1e-5)
    np.testing.assert_allclose(text, expected.text, atol=1e-5)
    assert not expected.failed


def test_cancelled_extraction_resumes_after_the_last_shard(
    shards: Path, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_encoded_images(monkeypatch)
    extract_feature_store(shards, tmp_path / "whole", MODEL, checkpoint, splits=["train"], rows_per_chunk=16)
    encoded_in_one_go = sum(calls)

    # A fresh cache: what the resumed run skips, it skips because the store has it.
    monkeypatch.setenv("ECIF_CACHE", str(tmp_path / "other-cache"))
    cancel = threading.Event()

    def cancel_after_first_shard(stage: str, done: int, total: int) -> None:
        if stage == "features" and done > 0:
            cancel.set()

    with pytest.raises(Cancelled):
        extract_feature_store(shards, tmp_path / "resumed", MODEL, checkpoint, splits=["train"], rows_per_chunk=16,
                              reporter=Reporter(cancel_after_first_shard, cancel))
    with pytest.raises(FileNotFoundError, match="not a feature store"):
        FeatureStore.open(tmp_path / "resumed")
    first_shard = int(np.load(tmp_path / "resumed" / "image-00000.npy").shape[0])

    monkeypatch.setenv("ECIF_CACHE", str(tmp_path / "third-cache"))
    calls.clear()
    extract_feature_store(shards, tmp_path / "resumed", MODEL, checkpoint, splits=["train"], rows_per_chunk=16)
    assert sum(calls) == encoded_in_one_go - first_shard
    assert _files(tmp_path / "resumed") == _files(tmp_path / "whole")

    with pytest.raises(ValueError, match="another manifest, model or settings"):
        extract_feature_store(shards, tmp_path / "resumed", MODEL, checkpoint, splits=["val"], rows_per_chunk=16)
    first = shards.parent / "part-00000.parquet"
    table = pd.read_parquet(first)
    edited = table.assign(caption=table["caption"].where(table.index != table.index[table["split"] == "train"][0], "edited"))
    edited.to_parquet(first)
    try:
        with pytest.raises(ValueError, match=r"chunk 0 of .* \(rows 1-16\) changed since it was extracted"):
            extract_feature_store(shards, tmp_path / "resumed", MODEL, checkpoint, splits=["train"], rows_per_chunk=16)
    finally:
        table.to_parquet(first)


@pytest.mark.slow  # starts a local Ray instance
def test_ray_extraction_writes_the_same_store_as_one_process(
    shards: Path, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ray = pytest.importorskip("ray")
    from ecif.influence.streaming import RayExecutor, connect_ray

    local = extract_feature_store(shards, tmp_path / "local", MODEL, checkpoint, rows_per_chunk=16, executor=LocalExecutor())
    # Workers inherit the environment at start-up: their cache is empty, so they really encode.
    monkeypatch.setenv("ECIF_CACHE", str(tmp_path / "worker-cache"))
    connect_ray(num_cpus=2, include_dashboard=False)
    try:
        remote = extract_feature_store(shards, tmp_path / "ray", MODEL, checkpoint, rows_per_chunk=16, executor=RayExecutor())
    finally:
        ray.shutdown()
    assert len(list((tmp_path / "worker-cache").rglob("*.npz"))) == remote.n_shards == 6
    assert remote.n_pairs == local.n_pairs == 88
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")


def test_extract_then_score_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = make_demo_data("shapes", tmp_path / "demo", n=80)
    loaded = load_model(MODEL, seed=3)
    checkpoint = save_checkpoint(loaded.model, tmp_path / "demo.safetensors")
    stores = {}
    for split in ("train", "val"):
        assert main(["extract-features", "--manifest", str(manifest), "--model", "demo", "--checkpoint", str(checkpoint),
                     "--out", str(tmp_path / split), "--split", split, "--rows-per-chunk", "32", "--json"]) == 0
        stores[split] = json.loads(capsys.readouterr().out)
    assert stores["train"]["shards"] == 3 and stores["train"]["left_out_rows"] == 0
    assert stores["train"]["pairs"] + stores["val"]["pairs"] < 80 and stores["val"]["image_dim"] == 96

    heads = get_heads(loaded.model)
    scope = HeadsScope(heads.image.shape[0], heads.text.shape[0], heads.image.shape[1], heads.log_logit_scale)
    theta = scope.join(torch.as_tensor(heads.image), torch.as_tensor(heads.text), heads.log_logit_scale)
    save_heads(tmp_path / "heads.safetensors", scope, theta, theta.clone())
    assert main(["score-features", str(tmp_path / "train"), "--trusted", str(tmp_path / "val"), "--heads",
                 str(tmp_path / "heads.safetensors"), "--out", str(tmp_path / "scores"), "--batch-size", "16", "--top", "3",
                 "--allow-unconverged"]) == 0  # the model's own heads, not fine-tuned on this objective
    output = capsys.readouterr().out
    assert f"scored {stores['train']['pairs']} pairs" in output
    assert "most harmful pairs: shapes-" in output  # uids from the store's row map, not row numbers

    assert main(["extract-features", "--manifest", str(manifest), "--model", "demo", "--checkpoint", str(checkpoint),
                 "--out", str(tmp_path / "train"), "--split", "test"]) == 1
    assert "another manifest, model or settings" in capsys.readouterr().err
