"""Sharded and streamed manifests: parquet shards, img2dataset tar shards, chunked feature extraction;
and streamed scoring's premise check (the heads must minimise the objective that is scored).

Everything is real files in ``tmp_path``: parquet written by pandas, tars by ``tarfile``, images by
PIL.  The feature tests use the randomly initialised demo architecture (no training); the premise
tests use the toy feature stores of ``test_ray_scoring`` with heads fine-tuned on them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures_data import TINY_COLOURS, write_png
from PIL import Image
from test_features import _count_encoded_images
from test_ray_scoring import in_memory_problem, small_heads, synthetic_store, trusted_set

import ecif.models.features as features_module
from ecif.config import FinetuneConfig, StreamingConfig
from ecif.data import ManifestError, iter_manifest_chunks, load_manifest, make_thumbnails, open_image
from ecif.data.images import member_reference
from ecif.finetune import finetune_heads
from ecif.influence.streaming import NotAMinimiser, read_scores, score_store, write_feature_store
from ecif.models import LoadedModel, compute_features, iter_chunk_features, load_model
from ecif.progress import Reporter
from ecif.run import MANIFEST_FILE, Run, atomic_write_parquet


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("ECIF_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def random_demo() -> LoadedModel:
    return load_model("ecif-demo", seed=3)


# ------------------------------------------------------------------------------------ helpers


def _write_parquet_shards(folder: Path, shards: int, rows: int) -> list[pd.DataFrame]:
    """``part-0000{i}.parquet`` shards of ``rows`` rows with real PNGs under ``folder/images``."""
    tables = []
    for shard in range(shards):
        records = []
        for row in range(rows):
            name = f"images/s{shard}_{row}.png"
            write_png(folder / name, TINY_COLOURS[(shard + row) % len(TINY_COLOURS)])
            caption = f"pair {shard}.{row}"
            records.append({"uid": f"s{shard}_{row}", "image": name, "caption": caption, "extra": row})
        table = pd.DataFrame(records)
        table.to_parquet(folder / f"part-{shard:05d}.parquet")
        tables.append(table)
    return tables


def _jpeg(colour: tuple[int, int, int], size: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _write_img2dataset_shard(folder: Path, shard: int, good: int, extra: dict[str, bytes] | None = None) -> None:
    """``NNNNN.tar`` with ``good`` jpg+txt+json samples (+ ``extra`` members) and its sidecar parquet.

    The sidecar also lists one sample that failed to download (not in the tar), as img2dataset does.
    """
    members: dict[str, bytes] = {}
    sidecar = []
    for index in range(good):
        key = f"{shard:05d}{index:04d}"
        members[f"{key}.jpg"] = _jpeg(TINY_COLOURS[index % len(TINY_COLOURS)])
        members[f"{key}.txt"] = f"photo {key}".encode()
        members[f"{key}.json"] = b"{}"
        url = f"http://x/{key}"
        sidecar.append({"key": key, "caption": f"photo {key}", "url": url, "status": "success", "error_message": None})
    members.update(extra or {})
    failed_key = f"{shard:05d}9999"
    sidecar.append(
        {
            "key": failed_key,
            "caption": "never fetched",
            "url": f"http://x/{failed_key}",
            "status": "failed_to_download",
            "error_message": "HTTP 404",
        }
    )
    table = pd.DataFrame(sidecar)
    _write_tar(folder / f"{shard:05d}.tar", members)
    table.to_parquet(folder / f"{shard:05d}.parquet")


# ------------------------------------------------------------------------------ parquet shards


def test_parquet_shards_stream_in_bounded_chunks_like_load_manifest(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    tables = _write_parquet_shards(folder, shards=3, rows=5)
    # Shard 1 row 3: empty caption; shard 2 row 1: a uid already used in shard 0.
    tables[1].loc[2, "caption"] = " "
    tables[1].to_parquet(folder / "part-00001.parquet")
    tables[2].loc[0, "uid"] = "s0_4"
    tables[2].to_parquet(folder / "part-00002.parquet")

    chunks = list(iter_manifest_chunks(folder, rows_per_chunk=2))
    assert [len(chunk.frame) + len(chunk.bad_rows) for chunk in chunks] == [2, 2, 1] * 3  # never spans shards
    assert [chunk.index for chunk in chunks] == list(range(9))
    streamed = pd.concat([chunk.frame for chunk in chunks], ignore_index=True)

    loaded = load_manifest(folder)
    pd.testing.assert_frame_equal(streamed, loaded.frame)
    assert loaded.path == folder.resolve() and len(loaded.frame) == 13
    assert loaded.frame["source_row"].tolist() == [1, 2, 3, 4, 5, 6, 7, 9, 10, 12, 13, 14, 15]
    assert loaded.frame["shard"].iloc[[0, 5, -1]].tolist() == [f"part-0000{i}.parquet" for i in range(3)]
    assert loaded.frame["filepath"][0] == str((folder / "images/s0_0.png").resolve())
    assert loaded.frame["extra"].tolist()[:5] == [0, 1, 2, 3, 4]
    bad = loaded.bad_rows.set_index("row")
    assert bad.loc[8, "shard"] == "part-00001.parquet" and bad.loc[8, "reason"] == "empty caption"
    assert bad.loc[11, "shard"] == "part-00002.parquet"
    assert bad.loc[11, "reason"] == "duplicate uid (first seen at row 5)"  # found across shards
    assert pd.concat([chunk.bad_rows for chunk in chunks]).reset_index(drop=True).equals(loaded.bad_rows)


def test_glob_picks_only_matching_shards_and_hash_follows_content(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    _write_parquet_shards(folder, shards=2, rows=3)
    pd.DataFrame({"note": ["not a shard"]}).to_parquet(folder / "notes.parquet")
    loaded = load_manifest(folder / "part-*.parquet", check_images=False)
    assert len(loaded.frame) == 6 and set(loaded.frame["shard"]) == {"part-00000.parquet", "part-00001.parquet"}
    with pytest.raises(ManifestError, match=r"notes\.parquet: no image column"):
        load_manifest(folder)  # the folder holds every parquet file, the stray one included

    pd.DataFrame({"image": ["images/s0_0.png"], "caption": ["changed"], "uid": ["new"]}).to_parquet(
        folder / "part-00002.parquet"
    )
    assert load_manifest(folder / "part-*.parquet").sha256 != loaded.sha256
    with pytest.raises(ManifestError, match="no files match"):
        load_manifest(folder / "nothing-*.parquet")


def test_single_parquet_file_streams_to_the_same_frame(tmp_path: Path) -> None:
    (tables,) = _write_parquet_shards(tmp_path, shards=1, rows=7)
    path = tmp_path / "manifest.parquet"
    tables.set_index(pd.RangeIndex(100, 107)).to_parquet(path)  # a non-default index must not leak in
    chunks = list(iter_manifest_chunks(path, rows_per_chunk=3))
    assert [len(chunk.frame) for chunk in chunks] == [3, 3, 1]
    pd.testing.assert_frame_equal(pd.concat([c.frame for c in chunks], ignore_index=True), load_manifest(path).frame)


def test_reading_is_lazy_and_a_broken_shard_is_named_when_reached(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    _write_parquet_shards(folder, shards=2, rows=4)
    (folder / "part-00002.parquet").write_bytes(b"PAR1 not really parquet")
    stream = iter_manifest_chunks(folder, rows_per_chunk=4, check_images=False)
    assert len(next(stream).frame) == 4 and len(next(stream).frame) == 4
    with pytest.raises(ManifestError, match=r"part-00002\.parquet: cannot be read as parquet"):
        next(stream)


def test_empty_or_unusable_stream_raises_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "manifest.parquet"
    pd.DataFrame({"image": ["gone.png", "gone2.png"], "caption": ["a", "b"]}).to_parquet(path)
    stream = iter_manifest_chunks(path, rows_per_chunk=1)
    assert [len(chunk.bad_rows) for chunk in (next(stream), next(stream))] == [1, 1]
    with pytest.raises(ManifestError, match="none of the 2 rows is usable"):
        next(stream)


# ---------------------------------------------------------------------- img2dataset tar shards


def test_img2dataset_tar_shards_load_with_broken_members_reported(tmp_path: Path) -> None:
    folder = tmp_path / "laion"
    folder.mkdir()
    _write_img2dataset_shard(
        folder,
        0,
        good=3,
        extra={"000000100.jpg": _jpeg((1, 2, 3)), "000000101.jpg": b"\xff\xd8 not a jpeg", "000000101.txt": b"broken"},
    )
    _write_img2dataset_shard(folder, 1, good=2)

    loaded = load_manifest(folder)
    tar = (folder / "00000.tar").resolve()
    assert loaded.frame["uid"].tolist() == ["000000000", "000000001", "000000002", "000010000", "000010001"]
    assert loaded.frame["filepath"][1] == member_reference(tar, "000000001.jpg") == f"{tar}::000000001.jpg"
    assert loaded.frame["caption"][1] == "photo 000000001"
    assert loaded.frame["url"][1] == "http://x/000000001"  # the sidecar's descriptive columns are carried
    assert loaded.frame["shard"].tolist() == ["00000.tar"] * 3 + ["00001.tar"] * 2

    bad = loaded.bad_rows.set_index("uid")
    assert bad.loc["000000100", "reason"] == "empty caption"  # image without .txt
    assert bad.loc["000000100", "filepath"] == f"{tar}::000000100.jpg"
    assert bad.loc["000000101", "reason"].startswith("undecodable image")
    assert bad.loc["000009999", "reason"] == "not downloaded by img2dataset (failed_to_download: HTTP 404)"
    assert bad.loc["000019999", "shard"] == "00001.tar"
    assert set(bad["shard"]) == {"00000.tar", "00001.tar"} and len(bad) == 4

    # Every image reader opens the member in place.
    with open_image(loaded.frame["filepath"][1]) as image:
        assert np.abs(np.asarray(image.convert("RGB"), dtype=int)[12, 12] - TINY_COLOURS[1]).max() < 8
    run = Run(tmp_path / "run")
    atomic_write_parquet(run.path(MANIFEST_FILE), loaded.frame)
    assert make_thumbnails(run, size=32) == 5
    with Image.open(run.path("thumbs") / "1.jpg") as thumb:
        assert thumb.size == (32, 32)
        assert np.abs(np.asarray(thumb, dtype=int)[16, 16] - TINY_COLOURS[1]).max() < 12  # not the placeholder


def test_tar_glob_and_a_sample_missing_from_a_cut_short_tar(tmp_path: Path) -> None:
    _write_img2dataset_shard(tmp_path, 0, good=2)
    _write_img2dataset_shard(tmp_path, 1, good=2)
    # Rewrite shard 1 without its second sample, as if the download had been cut short.
    _write_tar(tmp_path / "00001.tar", {"000010000.jpg": _jpeg((9, 9, 9)), "000010000.txt": b"photo"})
    chunks = list(iter_manifest_chunks(tmp_path / "0000[1].tar", rows_per_chunk=2))
    reasons = pd.concat([chunk.bad_rows for chunk in chunks]).set_index("uid")["reason"]
    assert reasons["000010001"] == "listed as downloaded in the sidecar but not in the tar"
    assert [len(chunk.frame) for chunk in chunks] == [1, 0]


# ------------------------------------------------------------------- chunked feature extraction


def test_chunk_features_resume_after_a_crash_and_match_the_whole_frame(
    random_demo: LoadedModel, tmp_path: Path, own_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "laion"
    folder.mkdir()
    _write_img2dataset_shard(folder, 0, good=9)
    _write_img2dataset_shard(folder, 1, good=5)

    def frames():
        return (chunk.frame for chunk in iter_manifest_chunks(folder, rows_per_chunk=4))

    def crash_after_first_chunk(stage: str, done: int, total: int) -> None:
        if stage == "features" and done >= 4:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        for _ in iter_chunk_features(random_demo, frames(), Reporter(crash_after_first_chunk), batch_size=3):
            pass
    chunk_dir = own_cache / "features" / random_demo.model_hash / "chunks"
    assert len(list(chunk_dir.glob("*.npz"))) == 1  # the finished chunk survived the crash

    calls = _count_encoded_images(monkeypatch)
    resumed = list(iter_chunk_features(random_demo, frames(), batch_size=3))
    assert [len(frame) for frame, _ in resumed] == [4, 4, 1, 4, 1]  # chunk sizes follow the shards
    assert sum(calls) == 14 - 4  # only the chunks not finished before the crash
    assert len(list(chunk_dir.glob("*.npz"))) == 5

    # Deleting one finished shard recomputes just that chunk; the results are bit-identical.
    (lost_frame, lost_features), *_ = resumed[3:]
    features_module.chunk_features_file(random_demo, lost_frame).unlink()
    calls.clear()
    again = list(iter_chunk_features(random_demo, frames(), batch_size=3))
    assert sum(calls) == len(lost_frame)
    for (_, first), (_, second) in zip(resumed, again, strict=True):
        np.testing.assert_array_equal(first.image, second.image)
        np.testing.assert_array_equal(first.text, second.text)

    # The same numbers as one compute_features call over the whole manifest.
    whole = compute_features(random_demo, load_manifest(folder).frame)
    np.testing.assert_allclose(np.concatenate([f.image for _, f in again]), whole.image, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([f.text for _, f in again]), whole.text, atol=1e-5)
    assert not any(f.failed for _, f in again) and whole.image.shape == (14, 96)


# --------------------------------------------------------- streamed scoring checks its premise


@pytest.fixture(scope="module")
def converged_store(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A 3-shard toy store (160 pairs, P = 132) and heads fine-tuned on exactly its streamed objective."""
    store = synthetic_store(tmp_path_factory.mktemp("premise") / "features", [60, 60, 40])
    scope, theta0 = small_heads()
    config = StreamingConfig(batch_size=20)
    problem = in_memory_problem(store, scope, theta0, config)  # the streamed per-shard batching
    theta, report = finetune_heads(problem, config=FinetuneConfig(delta=config.delta, batch_size=config.batch_size))
    assert report.converged
    return SimpleNamespace(store=store, scope=scope, theta=theta, theta0=theta0, config=config, problem=problem)


def _perturbed(theta: torch.Tensor) -> torch.Tensor:
    """Heads moved 1e-3 per coordinate away from the minimiser."""
    return theta + 1e-3 * torch.randn(theta.shape, dtype=theta.dtype, generator=torch.Generator().manual_seed(7))


def _stages(reporter_stages: list[str]) -> Reporter:
    return Reporter(lambda stage, done, total: reporter_stages.append(stage))


def test_converged_heads_pass_the_premise_check_and_it_is_recorded(converged_store: SimpleNamespace, tmp_path: Path) -> None:
    c = converged_store
    result = score_store(c.store, trusted_set(), c.scope, c.theta, tmp_path / "scores", c.config, theta0=c.theta0)
    check = result.stationarity
    print(f"converged heads: ‖∇R(θ̂)‖ = {check['gradient_norm']:.2e}, relative {check['relative_gradient_norm']:.2e}")
    assert check["passed"] and check["theta0_given"] and not result.warnings and result.shards_scored == 3
    # within the fine-tune's gradient tolerance (1e-7), far under the check's 1e-4
    assert check["gradient_norm"] <= 1e-7 and check["relative_gradient_norm"] <= 1e-6
    # a real contrastive gradient, balanced by the penalty's δ(θ̂ − θ₀)
    assert check["contrastive_gradient_norm"] > 0.1
    assert check["penalty_gradient_norm"] == pytest.approx(check["contrastive_gradient_norm"], rel=1e-5)
    assert check["tolerance"] == 1e-4 and check["n_pairs"] == 160
    info = json.loads((tmp_path / "scores" / "scores.json").read_text())
    assert info["complete"] and info["stationarity"] == check and info["warnings"] == []


def test_heads_away_from_the_minimiser_are_refused_after_the_first_pass(converged_store: SimpleNamespace, tmp_path: Path) -> None:
    c = converged_store
    theta = _perturbed(c.theta)
    in_memory = float(torch.func.grad(c.problem.objective)(theta).norm())  # ∇R of the whole store at once
    stages: list[str] = []
    with pytest.raises(NotAMinimiser) as refused:
        score_store(c.store, trusted_set(), c.scope, theta, tmp_path / "scores", c.config, reporter=_stages(stages), theta0=c.theta0)
    check, message = refused.value.check, str(refused.value)
    print(f"perturbed heads: ‖∇R(θ̂)‖ = {check.gradient_norm:.2e} (in memory {in_memory:.2e}), relative {check.relative_gradient_norm:.2e}")
    assert check.gradient_norm == pytest.approx(in_memory, rel=1e-9) and check.gradient_norm > 100 * check.tolerance
    assert message.startswith("the heads are not a minimiser of the objective being scored: gradient norm ")
    assert f"{check.gradient_norm:.2e}" in message and "ecif finetune" in message and "--allow-unconverged" in message
    assert "\n" not in message
    # refused after the first pass, before the eigenvalue pass and any score; the measurement is kept
    assert set(stages) == {"curvature (EK-FAC factors, gradient)"}
    out = tmp_path / "scores"
    assert not list(out.glob("scores-*.npz")) and not (out / "curvature.safetensors").exists()
    info = json.loads((out / "scores.json").read_text())
    assert not info["complete"] and info["stationarity"] == check.to_dict()

    # without θ₀ there is nothing to check against (every θ̂ minimises R for some θ₀): refused too
    with pytest.raises(NotAMinimiser, match="no θ₀"):
        score_store(c.store, trusted_set(), c.scope, c.theta, tmp_path / "no-theta0", c.config)


def test_allow_unconverged_scores_with_the_warning_recorded(converged_store: SimpleNamespace, tmp_path: Path) -> None:
    c = converged_store
    theta, out = _perturbed(c.theta), tmp_path / "scores"
    allowed = dataclasses.replace(c.config, allow_unconverged=True)
    result = score_store(c.store, trusted_set(), c.scope, theta, out, allowed, theta0=c.theta0)
    assert result.shards_scored == 3 and read_scores(out)["influence"].shape == (160,)
    assert not result.stationarity["passed"] and result.stationarity["gradient_norm"] > 1e-2
    (warning,) = result.warnings
    assert "allow_unconverged" in warning and "not a minimiser" in warning and "\n" not in warning
    info = json.loads((out / "scores.json").read_text())
    assert info["complete"] and info["warnings"] == result.warnings and info["stationarity"] == result.stationarity

    # The flag is not part of the folder's fingerprint: the same folder without it is refused again,
    # from the stored gradient (no pass over the store), and with it resumes with nothing to do.
    stages: list[str] = []
    with pytest.raises(NotAMinimiser):
        score_store(c.store, trusted_set(), c.scope, theta, out, c.config, reporter=_stages(stages), theta0=c.theta0)
    assert stages == []
    again = score_store(c.store, trusted_set(), c.scope, theta, out, allowed, theta0=c.theta0)
    assert again.shards_scored == 0 and again.seconds["curvature"] == 0.0 and again.warnings == result.warnings


def test_score_features_refuses_unconverged_heads_in_one_line(
    converged_store: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ecif.cli import main
    from ecif.tasks.engine import save_heads

    c = converged_store
    trusted = trusted_set()
    write_feature_store(tmp_path / "trusted", [(trusted.image.numpy(), trusted.text.numpy())])
    save_heads(tmp_path / "converged.safetensors", c.scope, c.theta, c.theta0)
    save_heads(tmp_path / "perturbed.safetensors", c.scope, _perturbed(c.theta), c.theta0)

    def arguments(heads: str, out: str, *extra: str) -> list[str]:
        return ["score-features", str(c.store.directory), "--trusted", str(tmp_path / "trusted"), "--heads",
                str(tmp_path / f"{heads}.safetensors"), "--out", str(tmp_path / out), "--batch-size", "20", *extra]

    assert main(arguments("perturbed", "refused")) == 1
    captured = capsys.readouterr()
    line = captured.err.rsplit("\r", 1)[-1]  # after the progress bars, which \r clears
    assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    assert line.startswith("error: the heads are not a minimiser of the objective being scored: gradient norm ")
    assert "--allow-unconverged" in line and "ecif finetune" in line
    assert main([*arguments("perturbed", "refused"), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["kind"] == "NotAMinimiser"

    assert main([*arguments("perturbed", "allowed", "--allow-unconverged"), "--json"]) == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert not payload["stationarity"]["passed"] and payload["stationarity"]["gradient_norm"] > 1e-2
    (warning,) = payload["warnings"]
    assert captured.err.rsplit("\r", 1)[-1] == f"warning: {warning}\n"

    assert main(arguments("converged", "converged")) == 0
    captured = capsys.readouterr()
    assert "scored 160 pairs" in captured.out and "heads are a minimiser of the scored objective" in captured.out
    assert "warning" not in captured.err
