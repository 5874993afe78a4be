"""Manifest loading: every format gives the same canonical frame, every bad row is reported at once,
extra columns survive, and problems with the file as a whole are ManifestErrors naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from fixtures_data import (BROKEN_COMPRESSED, FATAL_MANIFESTS, write_bad_manifest, write_broken_compressed_manifests,
                           write_png, write_tiny_images)

from ecif.data import LoadedManifest, ManifestError, bad_rows_report, load_manifest, write_manifest_subset
from ecif.data.manifest import iter_manifest_chunks
from ecif.data.classes import DEFAULT_TEMPLATES
from ecif.progress import Reporter

CANONICAL = ["uid", "filepath", "caption", "split", "label", "source_row"]


def test_bad_rows_reported_together_and_the_rest_kept(tmp_path: Path) -> None:
    expected = write_bad_manifest(tmp_path)
    loaded = load_manifest(expected.path)

    assert loaded.frame["uid"].tolist() == expected.good_uids
    assert loaded.frame["source_row"].tolist() == [1, 2, 3, 4]
    bad = loaded.bad_rows
    assert list(bad.columns) == ["row", "uid", "filepath", "reason"]
    assert bad["row"].tolist() == sorted(expected.bad)
    for row, uid, filepath, reason in bad.itertuples(index=False):
        expected_uid, expected_reason = expected.bad[row]
        assert uid == expected_uid
        assert reason.startswith(expected_reason), (row, reason)
        assert Path(filepath).is_absolute()

    report = bad_rows_report(loaded)
    assert "4 of 8 rows left out" in report and "duplicate uid (first seen at row 2)" in report


def test_canonical_frame_shape(tmp_path: Path) -> None:
    records = write_tiny_images(tmp_path)
    records.assign(score=[0.5, 1, 2, 3, 4, 5.5], keep=[True, False] * 3).to_csv(
        tmp_path / "m.csv", index=False
    )
    loaded = load_manifest(tmp_path / "m.csv")

    frame = loaded.frame
    assert list(frame.columns) == [*CANONICAL, "score", "keep"]
    assert isinstance(frame.index, pd.RangeIndex)
    assert frame["filepath"].tolist() == [str(tmp_path / name) for name in records["filename"]]
    assert (frame["split"] == "train").all()
    assert frame["score"].tolist() == [0.5, 1, 2, 3, 4, 5.5] and frame["keep"].dtype == bool
    assert loaded.path == tmp_path / "m.csv" and len(loaded.sha256) == 64
    # No classes.json: classes come from the labels, with the generic photo templates.
    assert loaded.classes is not None and loaded.classes.names == sorted(records["label"])
    assert loaded.classes.prompts["red"] == [template.format(label="red") for template in DEFAULT_TEMPLATES]


def _write_formats(folder: Path) -> dict[str, Path]:
    """The same six pairs (with an extra ``note`` column where the format allows) in every format."""
    records = write_tiny_images(folder)
    records["note"] = [f"note {i}" for i in range(len(records))]
    table = records.rename(columns={"filename": "filepath"})
    paths = {
        "csv": folder / "pairs.csv",
        "tsv": folder / "pairs.tsv",
        "jsonl": folder / "pairs.jsonl",
        "parquet": folder / "pairs.parquet",
    }
    table.to_csv(paths["csv"], index=False)
    # open_clip's layout: tab-separated, image in `filepath`, caption in `title`.
    table.rename(columns={"caption": "title"}).to_csv(paths["tsv"], sep="\t", index=False)
    table.to_json(paths["jsonl"], orient="records", lines=True)
    table.to_parquet(paths["parquet"], index=False)

    captions_folder = folder / "with_captions"
    write_tiny_images(captions_folder)
    records.to_csv(captions_folder / "captions.csv", index=False)  # `filename` column, relative names
    paths["captions folder"] = captions_folder

    sidecar_folder = folder / "sidecars"
    write_tiny_images(sidecar_folder, subfolder="")
    for record in records.itertuples():
        (sidecar_folder / f"{record.uid}.txt").write_text(record.caption + "\n")
    paths["sidecar folder"] = sidecar_folder
    return paths


def test_every_format_loads_to_the_same_frame(tmp_path: Path) -> None:
    paths = _write_formats(tmp_path)
    frames = {kind: load_manifest(path).frame for kind, path in paths.items()}
    reference = frames["csv"]
    assert reference["uid"].tolist() == [f"img{i}" for i in range(6)]
    for kind, frame in frames.items():
        base = paths[kind] if paths[kind].is_dir() else paths[kind].parent
        assert frame["uid"].tolist() == reference["uid"].tolist(), kind
        assert frame["caption"].tolist() == reference["caption"].tolist(), kind
        assert frame["split"].tolist() == reference["split"].tolist(), kind
        assert [Path(p).relative_to(base).name for p in frame["filepath"]] == [
            f"img{i}.png" for i in range(6)
        ], kind
        if kind != "sidecar folder":  # sidecars carry captions only
            assert frame["label"].tolist() == reference["label"].tolist(), kind
            assert frame["note"].tolist() == reference["note"].tolist(), kind
            pd.testing.assert_frame_equal(frame.drop(columns="filepath"), reference.drop(columns="filepath"))
    assert frames["sidecar folder"]["label"].isna().all()
    assert load_manifest(paths["sidecar folder"]).classes is None


def test_folder_hash_follows_its_content(tmp_path: Path) -> None:
    folder = _write_formats(tmp_path)["sidecar folder"]
    before = load_manifest(folder).sha256
    assert load_manifest(folder).sha256 == before
    (folder / "img0.txt").write_text("a different caption")
    assert load_manifest(folder).sha256 != before


def test_sidecar_missing_caption_is_a_bad_row(tmp_path: Path) -> None:
    write_tiny_images(tmp_path, subfolder="")
    for index in range(5):
        (tmp_path / f"img{index}.txt").write_text(f"caption {index}")
    loaded = load_manifest(tmp_path)
    assert len(loaded.frame) == 5
    assert loaded.bad_rows[["uid", "reason"]].values.tolist() == [["img5", "empty caption"]]


def test_directory_with_manifest_and_classes(tmp_path: Path) -> None:
    records = write_tiny_images(tmp_path)
    records.to_csv(tmp_path / "manifest.csv", index=False)
    (tmp_path / "classes.json").write_text(
        json.dumps({"names": ["red", "blue"], "prompts": {"red": ["a red thing"]}})
    )
    loaded = load_manifest(tmp_path)
    assert loaded.path == tmp_path / "manifest.csv"
    assert loaded.classes is not None and loaded.classes.names == ["red", "blue"]
    assert loaded.classes.prompts["red"] == ["a red thing"]
    assert loaded.classes.prompts["blue"]  # a class without prompts gets the generic ones


def test_aliases_generated_uids_splits_and_paths(tmp_path: Path) -> None:
    write_png(tmp_path / "data" / "a.png")
    absolute = write_png(tmp_path / "elsewhere" / "b.png")
    rows = pd.DataFrame(
        {
            "Image": ["a.png", str(absolute), "a.png", "a.png"],
            "Text": ["one", "two", "three", "four"],
            "class": ["7", "8", "7", "8"],
            "split": ["validation", "TEST", None, "holdout"],
        }
    )
    rows.to_csv(tmp_path / "data" / "m.csv", index=False)
    loaded = load_manifest(tmp_path / "data" / "m.csv")
    frame = loaded.frame
    assert frame["uid"].tolist() == ["row1", "row2", "row3"]
    assert frame["filepath"].tolist() == [
        str(tmp_path / "data" / "a.png"),
        str(absolute),
        str(tmp_path / "data" / "a.png"),
    ]
    assert frame["split"].tolist() == ["val", "test", "train"]
    assert frame["label"].tolist() == ["7", "8", "7"]
    assert loaded.bad_rows["reason"].tolist() == ["unknown split 'holdout' (expected train, val or test)"]


def test_text_ids_stay_text(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("id,file,caption,label\n007,a.png,hello,3\n")
    frame = load_manifest(tmp_path / "m.csv").frame
    assert frame["uid"].tolist() == ["007"] and frame["label"].tolist() == ["3"]
    (tmp_path / "m.jsonl").write_text('{"key": 7, "path": "a.png", "title": "hi", "label": 3}\n')
    frame = load_manifest(tmp_path / "m.jsonl").frame
    assert frame["uid"].tolist() == ["7"] and frame["label"].tolist() == ["3"]


def test_check_images_off_skips_decoding_only(tmp_path: Path) -> None:
    expected = write_bad_manifest(tmp_path)
    loaded = load_manifest(expected.path, check_images=False)
    assert loaded.bad_rows["row"].tolist() == [5, 7, 8]  # the corrupt image (row 6) is not opened


def test_progress_is_reported(tmp_path: Path) -> None:
    expected = write_bad_manifest(tmp_path)
    updates: list[tuple[str, int, int]] = []
    load_manifest(expected.path, reporter=Reporter(callback=lambda *update: updates.append(update)))
    assert updates[-1] == ("checking images", 8, 8)


@pytest.mark.parametrize(("name", "content", "message"), FATAL_MANIFESTS)
def test_fatal_errors_name_the_file(tmp_path: Path, name: str, content: bytes | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ManifestError, match=message) as caught:
        load_manifest(path)
    assert name in str(caught.value)


def test_empty_folder_and_bad_classes_are_fatal(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no manifest, captions file or images"):
        load_manifest(tmp_path)
    write_tiny_images(tmp_path).to_csv(tmp_path / "manifest.csv", index=False)
    (tmp_path / "classes.json").write_text('{"names": []}')
    with pytest.raises(ManifestError, match=r"classes\.json"):
        load_manifest(tmp_path)


def test_loaded_manifest_roundtrips_through_the_run_parquet(tmp_path: Path) -> None:
    write_tiny_images(tmp_path).to_csv(tmp_path / "m.csv", index=False)
    loaded: LoadedManifest = load_manifest(tmp_path / "m.csv")
    loaded.frame.to_parquet(tmp_path / "run.parquet", index=False)
    back = pd.read_parquet(tmp_path / "run.parquet")
    assert (
        back[CANONICAL].astype(object).values.tolist()
        == loaded.frame[CANONICAL].astype(object).values.tolist()
    )


def test_manifest_subset_takes_the_first_rows_of_each_split_with_absolute_paths(tmp_path: Path) -> None:
    source = tmp_path / "source"
    records = write_tiny_images(source).assign(split=["train", "val", "train", "test", "train", "validation"])
    records.to_csv(source / "manifest.csv", index=False)
    (source / "classes.json").write_text(json.dumps({"names": ["red", "blue"]}))

    written = write_manifest_subset(source / "manifest.csv", tmp_path / "subset", {"train": 2, "val": 2, "test": 5})
    assert written == tmp_path / "subset" / "manifest.csv"
    subset = pd.read_csv(written)
    assert list(subset.columns) == list(records.columns)
    assert subset["uid"].tolist() == ["img0", "img2", "img1", "img5", "img3"]  # "validation" is a val row
    assert subset["filename"].tolist() == [str(source / name) for name in records["filename"].iloc[[0, 2, 1, 5, 3]]]
    assert (tmp_path / "subset" / "classes.json").read_text() == (source / "classes.json").read_text()
    assert load_manifest(written).classes.names == ["red", "blue"]

    with pytest.raises(ValueError, match=r"manifest\.csv: no rows of split 'dev'"):
        write_manifest_subset(source / "manifest.csv", tmp_path / "other", {"train": 1, "dev": 1})
    with pytest.raises(ValueError, match=r"manifest\.csv: the count for split 'test' must be at least 1, got 0"):
        write_manifest_subset(source / "manifest.csv", tmp_path / "other", {"test": 0})
    assert not (tmp_path / "other").exists()  # refused before writing anything
    with pytest.raises(ValueError, match="would overwrite its own manifest"):
        write_manifest_subset(source / "manifest.csv", source, {"train": 1})
    assert len(pd.read_csv(source / "manifest.csv")) == len(records)

    # Without uids, the subset's rows keep the names the loader gives them in the full manifest.
    records.drop(columns="uid").to_csv(source / "no-uids.csv", index=False)
    renamed = write_manifest_subset(source / "no-uids.csv", tmp_path / "no-uids", {"val": 2})
    full = load_manifest(source / "no-uids.csv").frame.set_index("uid")["filepath"]
    part = load_manifest(renamed).frame.set_index("uid")["filepath"]
    assert part.index.tolist() == ["row2", "row6"] and (full.loc[part.index] == part).all()


@pytest.mark.parametrize("name", sorted(BROKEN_COMPRESSED))
def test_broken_compressed_manifest_is_a_manifest_error_naming_the_file(tmp_path: Path, name: str) -> None:
    """Truncated or garbage .gz/.bz2/.xz/.zip, a zip without a member or with two: a ManifestError
    (never EOFError, BadZipFile, zlib.error, ...) of one line that names the file and the problem,
    from every reader: whole, streamed and subset."""
    path = write_broken_compressed_manifests(tmp_path)[name]
    for read in (load_manifest, lambda p: list(iter_manifest_chunks(p)),
                 lambda p: write_manifest_subset(p, tmp_path / "subset", {"train": 1})):
        with pytest.raises(ManifestError, match=BROKEN_COMPRESSED[name]) as caught:
            read(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: ") and "\n" not in message
        assert caught.value.path == str(path)


def test_manifest_error_keeps_its_file_across_processes(tmp_path: Path) -> None:
    import pickle

    error = ManifestError(f"{tmp_path}/m.csv: empty file", path=tmp_path / "m.csv")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) and copy.path == str(tmp_path / "m.csv")
