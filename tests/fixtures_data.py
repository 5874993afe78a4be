"""Small on-disk datasets for the data tests: real PNGs, known captions, and deliberately broken rows.

Plain helpers (no pytest magic) so any test module can import them; the shared demo dataset is a
pytest fixture that ``conftest.py`` may expose to every module with ``pytest_plugins``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from ecif.data import make_demo_data

TINY_COLOURS = [(220, 40, 40), (40, 180, 60), (40, 70, 220), (230, 210, 40), (150, 60, 200), (245, 140, 30)]
TINY_LABELS = ["red", "green", "blue", "yellow", "purple", "orange"]


def write_png(
    path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (16, 16)
) -> Path:
    """A solid-colour PNG of ``size`` (width, height) pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="PNG")
    return path


def write_tiny_images(folder: Path, subfolder: str = "images") -> pd.DataFrame:
    """Six solid-colour images under ``folder/subfolder``; returns their records.

    Columns: ``uid`` (the image stem), ``filename`` (relative to ``folder``), ``caption``, ``label``.
    """
    records = []
    for index, (colour, label) in enumerate(zip(TINY_COLOURS, TINY_LABELS, strict=True)):
        relative = f"{subfolder}/img{index}.png" if subfolder else f"img{index}.png"
        write_png(folder / relative, colour)
        records.append(
            {"uid": f"img{index}", "filename": relative, "caption": f"a {label} square", "label": label}
        )
    return pd.DataFrame(records)


@dataclass
class BadManifest:
    """A CSV manifest with exactly four bad rows among eight (rows counted from 1, header excluded)."""

    path: Path
    good_uids: list[str]
    bad: dict[int, tuple[str, str]]
    """row -> (uid, the reason's expected start)."""


def write_bad_manifest(folder: Path) -> BadManifest:
    """Rows 1-4 good; 5 missing file; 6 corrupt image; 7 empty caption; 8 duplicate of row 2's uid."""
    for index in range(5):
        write_png(folder / f"ok{index}.png", TINY_COLOURS[index])
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    rows = [
        ("a", "ok0.png", "a red square"),
        ("b", "ok1.png", "a green square"),
        ("c", "ok2.png", "a blue square"),
        ("d", "ok3.png", "a yellow square"),
        ("e", "gone.png", "a missing square"),
        ("f", "corrupt.png", "a broken square"),
        ("g", "ok4.png", ""),
        ("b", "ok4.png", "a second b"),
    ]
    path = folder / "manifest.csv"
    pd.DataFrame(rows, columns=["uid", "filepath", "caption"]).to_csv(path, index=False)
    bad = {
        5: ("e", "missing file"),
        6: ("f", "undecodable image"),
        7: ("g", "empty caption"),
        8: ("b", "duplicate uid (first seen at row 2)"),
    }
    return BadManifest(path, ["a", "b", "c", "d"], bad)


@pytest.fixture(scope="session")
def shapes_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Manifest path of the acceptance-criteria demo: shapes, n=3000, 10 % random captions, seed 0."""
    return make_demo_data(
        "shapes", tmp_path_factory.mktemp("shapes"), n=3000, noise=0.1, corruption="random-caption", seed=0
    )


#: Manifests unusable as a whole: (file name, content or None for a missing file, what the
#: ManifestError says). The library and the command line are both checked on every one.
FATAL_MANIFESTS = [
    ("missing.csv", None, "file not found"),
    ("empty.csv", b"", "empty file"),
    ("blank.csv", b"\n\n", "empty file"),
    ("header.csv", b"filepath,caption\n", "no data rows"),
    ("broken.parquet", b"not parquet at all", "cannot be read as parquet"),
    ("broken.jsonl", b'{"filepath": "a.png", "caption": \n', "cannot be read as jsonl"),
    ("nocaption.csv", b"filepath,words\na.png,hi\n", "no caption column"),
    ("noimage.csv", b"picture,caption\na.png,hi\n", "no image column"),
    ("pairs.xlsx", b"whatever", "unsupported manifest format"),
    ("allbad.csv", b"filepath,caption\nnowhere.png,hi\n", "none of the 1 rows is usable"),
]


#: The broken compressed manifests of :func:`write_broken_compressed_manifests`: file name ->
#: what the ManifestError must say about it (a regular expression).
BROKEN_COMPRESSED = {
    "truncated.csv.gz": r"gzip-compressed csv: the gzip data ends early; the file is truncated",
    "garbage.csv.gz": r"gzip-compressed csv: corrupt gzip data",
    "bad-deflate.csv.gz": r"gzip-compressed csv: corrupt gzip data",
    "truncated.jsonl.gz": r"gzip-compressed jsonl: the gzip data ends early",
    "latin1.csv.gz": r"gzip-compressed csv: not UTF-8 text",
    "truncated.csv.bz2": r"bzip2-compressed csv: the bzip2 data ends early",
    "garbage.csv.xz": r"xz-compressed csv: corrupt xz data",
    "truncated.csv.zip": r"zip-compressed csv: not a valid zip archive, truncated or corrupt",
    "garbage.csv.zip": r"zip-compressed csv: not a valid zip archive, truncated or corrupt",
    "no-member.csv.zip": r"the zip archive holds no file",
    "two-members.csv.zip": r"the zip archive holds 2 files \(a\.csv, b\.csv\)",
    "bad-member.csv.zip": r"zip-compressed csv: corrupt zip data",
}


def write_broken_compressed_manifests(folder: Path) -> dict[str, Path]:
    """Every file of ``BROKEN_COMPRESSED`` in ``folder``, made from a valid 400-row manifest."""
    import bz2
    import gzip
    import io
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    csv = ("filepath,caption\n" + "".join(f"img{i}.png,a photo number {i}\n" for i in range(400))).encode()
    jsonl = "".join(f'{{"filepath": "img{i}.png", "caption": "a photo number {i}"}}\n' for i in range(400)).encode()

    def zipped(members: dict[str, bytes]) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in members.items():
                archive.writestr(name, data)
        return buffer.getvalue()

    gz, whole_zip = gzip.compress(csv, mtime=0), zipped({"m.csv": csv})
    bad_deflate = bytearray(gz)
    bad_deflate[10] = 0xFF  # the first deflate block header: an invalid block type
    bad_member = bytearray(whole_zip)
    start = 30 + len("m.csv")  # the member's data, after its local header
    bad_member[start] = 0xFF
    contents = {
        "truncated.csv.gz": gz[: len(gz) // 2],
        "garbage.csv.gz": b"these bytes are no gzip stream at all\n" * 20,
        "bad-deflate.csv.gz": bytes(bad_deflate),
        "truncated.jsonl.gz": gzip.compress(jsonl, mtime=0)[:200],
        "latin1.csv.gz": gzip.compress("filepath,caption\nimg0.png,un café crème\n".encode("latin-1"), mtime=0),
        "truncated.csv.bz2": bz2.compress(csv)[:300],
        "garbage.csv.xz": b"\xfd7zXZ\x00" + b"not really xz" * 20,
        "truncated.csv.zip": whole_zip[: len(whole_zip) // 2],
        "garbage.csv.zip": b"PK\x03\x04" + b"no zip archive follows" * 20,
        "no-member.csv.zip": zipped({}),
        "two-members.csv.zip": zipped({"a.csv": csv, "b.csv": csv}),
        "bad-member.csv.zip": bytes(bad_member),
    }
    assert set(contents) == set(BROKEN_COMPRESSED)
    paths = {}
    for name, data in contents.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths
