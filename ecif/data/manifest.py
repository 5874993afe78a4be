"""Load an image-caption manifest into ecif's canonical frame, and report every unusable row at once.

Accepted inputs (format chosen by the file extension):

- CSV (``.csv``), TSV (``.tsv``, ``.tab``; open_clip's ``filepath``/``title`` layout), JSON Lines
  (``.jsonl``, ``.ndjson``, ``.json``) and parquet (``.parquet``, ``.pq``); ``.gz``/``.bz2``/``.xz``/
  ``.zst``/``.zip`` compression of the text formats is understood.
- A directory: its ``manifest.*`` if it has one (the demo data layout); else its ``captions.*``
  table (image names in a ``filename``-style column, relative to the directory); else its shards
  (``*.tar`` webdataset shards as img2dataset writes them, or ``*.parquet`` shards; see
  :mod:`ecif.data.sources`); else the images in it (recursively) with img2dataset-style sidecar
  captions ``NAME.txt`` beside each ``NAME.jpg``.
- A glob of shards, e.g. ``data/part-*.parquet`` or ``laion/*.tar``.

Images inside tar shards are named ``<tar path>::<member>`` (:mod:`ecif.data.images`).  Manifests
larger than memory are read with :func:`iter_manifest_chunks`, which validates them chunk by chunk;
:func:`load_manifest` returns the whole frame.

Columns are recognised by name, case-insensitively (first alias present wins; see ``ALIASES``).
Relative image paths resolve against the manifest's (or the shard's) folder.  Rows that cannot be
used are listed in ``bad_rows`` with a reason and left out; only problems with a file as a whole
raise :class:`ManifestError` (one line naming the file: also a damaged compressed file -- truncated,
corrupt, not UTF-8, or a zip that does not hold exactly one file).
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow

from ecif.data._parallel import threaded_map
from ecif.data.classes import CLASSES_FILE_NAME, ClassesError, ZeroShotClasses
from ecif.data.images import IMAGE_EXTENSIONS, image_problem, resolve_image_path
from ecif.data.sources import ManifestError, RawChunk, find_shards, parquet_batches
from ecif.paths import file_sha256, text_sha256
from ecif.progress import Reporter, as_reporter

CANONICAL_COLUMNS = ("uid", "filepath", "caption", "split", "label", "source_row")
ALIASES: dict[str, tuple[str, ...]] = {
    "filepath": ("filepath", "image", "image_path", "path", "file", "filename", "file_name"),
    "caption": ("caption", "title", "text"),
    "uid": ("uid", "id", "key"),
    "label": ("label", "class"),
    "split": ("split",),
}
"""Input column names (lower-case) accepted for each canonical column, in order of preference."""
_ALIAS_NAMES = frozenset(alias for aliases in ALIASES.values() for alias in aliases)
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
_COMPRESSIONS = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd", ".zip": "zip"}
"""Compression suffixes understood on text manifests, and their names in error messages."""
_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
MANIFEST_STEMS = ("manifest", "captions")
"""Table names looked for inside a directory, in this order (see the module docstring)."""
BAD_ROWS_COLUMNS = ("row", "uid", "filepath", "reason")
SHARD_COLUMN = "shard"
"""Added to the frame and to ``bad_rows`` of a sharded source: the shard file each row came from."""
STREAM_ROWS_PER_CHUNK = 10_000
"""Default chunk size of :func:`iter_manifest_chunks` (and of :func:`load_manifest` over shards)."""


@dataclass
class LoadedManifest:
    """A validated manifest.

    ``frame`` (RangeIndex): ``uid`` (unique str), ``filepath`` (absolute str), ``caption`` (non-empty
    str), ``split`` ("train" / "val" / "test"), ``label`` (str or None), ``source_row`` (1-based data
    row in the input, as error messages count; replaces an input column of that name), then the
    input's other columns unchanged.  Rows of a sharded source count across its shards in name
    order, and both frames gain a ``shard`` column (the shard's path relative to ``path``).
    ``bad_rows``: ``row``, ``uid``, ``filepath``, ``reason`` for every row left out.
    ``sha256``: of the manifest file's bytes (an image folder: of its listing and captions; shards:
    see :meth:`ecif.data.sources.ShardedSource.sha256`).
    """

    frame: pd.DataFrame
    bad_rows: pd.DataFrame
    path: Path
    sha256: str
    classes: ZeroShotClasses | None


@dataclass
class ManifestChunk:
    """Consecutive rows of a manifest, validated: ``frame`` and ``bad_rows`` as in
    :class:`LoadedManifest` (row numbers count from the start of the whole source); ``index`` is the
    chunk's 0-based position in the stream."""

    frame: pd.DataFrame
    bad_rows: pd.DataFrame
    index: int


# ------------------------------------------------------------------------------------ reading


def _table_format(path: Path) -> str | None:
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes.pop()
    return _FORMATS.get(suffixes[-1]) if suffixes else None


def _compression(path: Path) -> str | None:
    """The name of the file's compression (by its extension), or None."""
    return _COMPRESSIONS.get(path.suffix.lower())


def _decompression_errors() -> tuple[type[BaseException], ...]:
    """What a damaged compressed file raises while it is read (beyond OSError and ValueError)."""
    errors: list[type[BaseException]] = [EOFError, zipfile.BadZipFile, zlib.error, lzma.LZMAError]
    try:
        import zstandard  # optional: pandas reads .zst with it

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def _read_problem(error: BaseException, compression: str | None) -> str:
    """What is wrong with a file that failed to read, in one line."""
    if isinstance(error, EOFError):
        problem = f"the {compression or 'compressed'} data ends early; the file is truncated ({error})"
    elif isinstance(error, zipfile.BadZipFile):
        problem = f"not a valid zip archive, truncated or corrupt ({error})"
    elif isinstance(error, (zlib.error, lzma.LZMAError)) or (compression and type(error) in (OSError, gzip.BadGzipFile)):
        # (bz2 says plain OSError; a missing or unreadable file is not corrupt data)
        problem = f"corrupt {compression or 'compressed'} data ({error})"
    elif isinstance(error, UnicodeDecodeError):
        problem = f"not UTF-8 text ({error.reason} at byte {error.start})"
    else:
        problem = str(error) or type(error).__name__
    return " ".join(problem.split())  # pandas' parser messages may span lines


def _check_zip(path: Path, described: str) -> None:
    """ManifestError unless ``path`` is a readable zip archive holding exactly one file."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = [info.filename for info in archive.infolist() if not info.is_dir()]
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ManifestError(
            f"{path}: cannot be read as {described}: {_read_problem(error, 'zip')}", path=path
        ) from error
    if not members:
        raise ManifestError(f"{path}: the zip archive holds no file (a zipped manifest holds exactly one)", path=path)
    if len(members) > 1:
        shown = ", ".join(members[:5]) + (" ..." if len(members) > 5 else "")
        raise ManifestError(
            f"{path}: the zip archive holds {len(members)} files ({shown}); a zipped manifest holds exactly one",
            path=path,
        )


def _canonical_source(columns: Sequence[str], canonical: str) -> str | None:
    """The input column that provides ``canonical``, or None."""
    by_lower = {str(column).strip().lower(): column for column in columns}
    return next((by_lower[alias] for alias in ALIASES[canonical] if alias in by_lower), None)


def _read_table(path: Path) -> pd.DataFrame:
    """The raw rows of a manifest file; ManifestError if it cannot be read."""
    kind = _table_format(path)
    if kind is None:
        known = ", ".join(sorted(_FORMATS))
        raise ManifestError(
            f"{path}: unsupported manifest format (expected one of {known}, or a folder)", path=path
        )
    if path.stat().st_size == 0:
        raise ManifestError(f"{path}: empty file", path=path)
    compression = _compression(path)
    described = f"{compression}-compressed {kind}" if compression else kind
    if compression == "zip":
        _check_zip(path, described)
    try:
        if kind in ("csv", "tsv"):
            separator = "\t" if kind == "tsv" else ","
            # Identifier, path and text columns are read as text: "007" must stay "007", not 7.
            header = pd.read_csv(path, sep=separator, nrows=0).columns
            text_columns = {column: str for column in header if str(column).strip().lower() in _ALIAS_NAMES}
            frame = pd.read_csv(path, sep=separator, dtype=text_columns)
        elif kind == "jsonl":
            # dtype=False keeps JSON's own types (a string uid stays a string).
            try:
                frame = pd.read_json(path, lines=True, dtype=False)
            except ValueError:
                if path.suffix.lower() != ".json":
                    raise
                frame = pd.read_json(path, orient="records", dtype=False)  # a plain JSON array
        else:
            frame = pd.read_parquet(path)
    except pd.errors.EmptyDataError as error:
        raise ManifestError(f"{path}: empty file", path=path) from error
    except (ValueError, OSError, pyarrow.ArrowException, *_decompression_errors()) as error:
        # ValueError covers pandas' ParserError and UnicodeDecodeError; OSError gzip.BadGzipFile.
        raise ManifestError(
            f"{path}: cannot be read as {described}: {_read_problem(error, compression)}", path=path
        ) from error
    if frame.empty:
        raise ManifestError(f"{path}: no data rows", path=path)
    return frame


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() and not path.name.startswith(".")
    )


def _read_sidecar_folder(folder: Path) -> tuple[pd.DataFrame, str]:
    """Images under ``folder`` with captions from ``NAME.txt`` beside them; also a content hash.

    uid = the image path relative to the folder without extension (img2dataset's key, unique).
    """
    images = _image_files(folder)
    if not images:
        raise ManifestError(f"{folder}: no manifest, captions file or images found in this folder", path=folder)
    records = []
    for image in images:
        sidecar = image.with_suffix(".txt")
        caption = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else None
        relative = image.relative_to(folder).as_posix()
        records.append({"uid": relative.rsplit(".", 1)[0], "filepath": relative, "caption": caption})
    # Size stands in for content: hashing every image would make loading as slow as decoding them.
    digest = text_sha256(
        *(
            f"{r['filepath']}\t{p.stat().st_size}\t{r['caption']}"
            for r, p in zip(records, images, strict=True)
        )
    )
    return pd.DataFrame.from_records(records), digest


def _read_source(path: Path) -> tuple[pd.DataFrame, Path, str]:
    """Raw rows, the file they came from (or the folder), and the content hash."""
    if not path.exists():
        raise ManifestError(f"{path}: file not found", path=path)
    if not path.is_dir():
        return _read_table(path), path, file_sha256(path)
    for stem in MANIFEST_STEMS:
        tables = sorted(p for p in path.glob(f"{stem}.*") if p.is_file() and _table_format(p) is not None)
        if tables:
            table = tables[0]
            if stem == "manifest":
                return _read_table(table), table, file_sha256(table)
            # A captions table: the folder's listing is part of its identity (images may change).
            listing = (f"{p.relative_to(path).as_posix()}\t{p.stat().st_size}" for p in _image_files(path))
            return _read_table(table), path, text_sha256(file_sha256(table), *listing)
    frame, digest = _read_sidecar_folder(path)
    return frame, path, digest


# --------------------------------------------------------------------------------- validation


def _text_values(column: pd.Series) -> list[str | None]:
    """Column values as text; None where missing.  Integral floats print without ``.0`` (``7``)."""
    values: list[str | None] = []
    for value in column.tolist():
        if value is None or (not isinstance(value, (list, dict)) and pd.isna(value)):
            values.append(None)
        elif isinstance(value, float) and value.is_integer():
            values.append(str(int(value)))
        else:
            values.append(str(value))
    return values


def _resolve(base: Path, filepath: str | None) -> str | None:
    if filepath is None or not filepath.strip():
        return None
    if "://" in filepath:  # a URL: ecif reads local files only
        return filepath
    return resolve_image_path(base, filepath.strip())


def _classes_for(frame: pd.DataFrame, directory: Path) -> ZeroShotClasses | None:
    """``classes.json`` beside the manifest, else classes from the labels, else None."""
    classes_file = directory / CLASSES_FILE_NAME
    if classes_file.is_file():
        try:
            return ZeroShotClasses.load(classes_file)
        except ClassesError as error:
            raise ManifestError(str(error), path=classes_file) from error
    labels = [label for label in frame["label"] if label is not None]
    return ZeroShotClasses.from_labels(labels) if labels else None


def _row_problems(
    image_problems: list[str | None],
    rows: list[int],
    uids: list[str | None],
    captions: list[str | None],
    splits: list[str | None],
    first_row: dict[str, int],
) -> tuple[list[list[str]], list[str]]:
    """Every reason each row is unusable (empty when usable), and its canonical split.

    A uid belongs to its first occurrence in the source; later rows with it are the duplicates.
    ``first_row`` (uid -> row number) carries the uids seen in earlier chunks and is updated.
    A missing split means "train", like a manifest without a split column.
    """
    problems: list[list[str]] = [[problem] if problem else [] for problem in image_problems]
    canonical_splits: list[str] = []
    for index, (row, uid, caption, split) in enumerate(zip(rows, uids, captions, splits, strict=True)):
        if caption is None or not caption.strip():
            problems[index].append("empty caption")
        if uid is None or not uid.strip():
            problems[index].append("empty uid")
        elif uid in first_row:
            problems[index].append(f"duplicate uid (first seen at row {first_row[uid]})")
        else:
            first_row[uid] = row
        canonical = SPLIT_ALIASES.get((split or "train").strip().lower())
        if canonical is None:
            problems[index].append(f"unknown split {split!r} (expected train, val or test)")
        canonical_splits.append(canonical or "")
    return problems, canonical_splits


class _Validator:
    """Canonicalises and validates the consecutive raw chunks of one source.

    Spans chunks: the row count (row numbers continue across chunks and shards) and the first row
    of every uid (duplicates are found across chunks; this map is the only state that grows with
    the source, one entry per usable uid).
    """

    _EXAMPLES = 5  # bad rows quoted when no row at all is usable

    def __init__(self, source: Path, check_images: bool, reporter: Reporter) -> None:
        self.source = source
        self.check_images = check_images
        self.reporter = reporter
        self.rows_read = 0
        self.usable = 0
        self.first_row: dict[str, int] = {}
        self.examples: list[str] = []

    def validate(self, raw: RawChunk) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The chunk's canonical frame and its bad rows (see :class:`LoadedManifest`)."""
        named = self.source if raw.shard is None else self.source / raw.shard
        sources = {canonical: _canonical_source(list(raw.frame.columns), canonical) for canonical in ALIASES}
        for required, what in (("filepath", "image"), ("caption", "caption")):
            if sources[required] is None:
                raise ManifestError(
                    f"{named}: no {what} column (accepted names: {', '.join(ALIASES[required])}; "
                    f"found: {', '.join(map(str, raw.frame.columns))})",
                    path=named,
                )

        n = len(raw.frame)
        rows = list(range(self.rows_read + 1, self.rows_read + n + 1))
        self.rows_read += n
        absent: list[str | None] = [None] * n
        column = {
            canonical: _text_values(raw.frame[name]) if name is not None else absent
            for canonical, name in sources.items()
        }
        uids = column["uid"] if sources["uid"] is not None else [f"row{row}" for row in rows]
        filepaths = [_resolve(raw.base, filepath) for filepath in column["filepath"]]
        known = raw.problems or absent
        image_problems = threaded_map(
            lambda item: item[1] or image_problem(item[0], self.check_images),
            list(zip(filepaths, known, strict=True)),
            self.reporter,
            "checking images",
        )

        problems, splits = _row_problems(
            image_problems, rows, uids, column["caption"], column["split"], self.first_row
        )
        good = [index for index, found in enumerate(problems) if not found]
        bad = [index for index, found in enumerate(problems) if found]
        self.usable += len(good)
        self.examples.extend(
            f"row {rows[i]}: {'; '.join(problems[i])}" for i in bad[: self._EXAMPLES + 1 - len(self.examples)]
        )
        bad_rows = pd.DataFrame(
            {
                "row": pd.Series([rows[i] for i in bad], dtype="int64"),
                "uid": pd.Series([uids[i] for i in bad], dtype=object),
                "filepath": pd.Series([filepaths[i] for i in bad], dtype=object),
                "reason": pd.Series(["; ".join(problems[i]) for i in bad], dtype=object),
            }
        )
        used = {name for name in sources.values() if name is not None} | set(CANONICAL_COLUMNS)
        frame = pd.DataFrame(
            {
                "uid": [uids[i] for i in good],
                "filepath": [filepaths[i] for i in good],
                "caption": [column["caption"][i] for i in good],
                "split": [splits[i] for i in good],
                # object dtype keeps None (not NaN) for unlabelled rows, as documented.
                "label": pd.Series([column["label"][i] for i in good], dtype=object),
                "source_row": pd.Series([rows[i] for i in good], dtype="int64"),
            }
        )
        if raw.shard is not None:
            used.add(SHARD_COLUMN)
            frame[SHARD_COLUMN] = raw.shard
            bad_rows[SHARD_COLUMN] = pd.Series([raw.shard] * len(bad), dtype=object)
        extras = raw.frame.iloc[good][[name for name in raw.frame.columns if name not in used]]
        return pd.concat([frame, extras.reset_index(drop=True)], axis=1), bad_rows

    def finish(self) -> None:
        """Raise :class:`ManifestError` if the source had no rows, or none of them was usable."""
        if self.rows_read == 0:
            raise ManifestError(f"{self.source}: no data rows", path=self.source)
        if self.usable == 0:
            shown = "; ".join(self.examples[: self._EXAMPLES])
            more = " ..." if len(self.examples) > self._EXAMPLES else ""
            raise ManifestError(
                f"{self.source}: none of the {self.rows_read} rows is usable ({shown}{more})", path=self.source
            )


def _whole_source(path: Path) -> tuple[Path, str, list[RawChunk]]:
    """An ordinary (not sharded) manifest read whole: its file or folder, hash, and rows as one chunk."""
    raw, source, digest = _read_source(path)
    return source, digest, [RawChunk(raw, source if source.is_dir() else source.parent)]


def iter_manifest_chunks(
    path: str | os.PathLike[str],
    rows_per_chunk: int = STREAM_ROWS_PER_CHUNK,
    *,
    check_images: bool = True,
    reporter: Reporter | None = None,
) -> Iterator[ManifestChunk]:
    """Read, canonicalise and validate a manifest chunk by chunk, never holding it whole.

    Each chunk holds at most ``rows_per_chunk`` input rows (usable plus bad; a chunk never spans
    shards).  Parquet (one file or shards) and tar shards are streamed from disk; other formats
    are read whole first and then cut into chunks.  Bad rows are reported and left out as in
    :func:`load_manifest`; a chunk may have no usable row.  Raises :class:`ManifestError` when a
    file as a whole is unusable -- when reaching it, so earlier chunks have been yielded -- and at
    the end if no row at all was usable.
    """
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be positive, got {rows_per_chunk}")
    sharded = find_shards(path, MANIFEST_STEMS)
    raw_chunks: Iterable[RawChunk]
    if sharded is not None:
        source, raw_chunks = sharded.root, sharded.chunks(rows_per_chunk)
    else:
        resolved = Path(path).expanduser().resolve()
        if resolved.is_file() and _table_format(resolved) == "parquet":
            source = resolved
            raw_chunks = (RawChunk(frame, resolved.parent) for frame in parquet_batches(resolved, rows_per_chunk))
        else:
            source, _, (whole,) = _whole_source(resolved)
            raw_chunks = (
                RawChunk(whole.frame.iloc[start : start + rows_per_chunk].reset_index(drop=True), whole.base)
                for start in range(0, len(whole.frame), rows_per_chunk)
            )
    validator = _Validator(source, check_images, as_reporter(reporter))
    for index, raw in enumerate(raw_chunks):
        frame, bad_rows = validator.validate(raw)
        yield ManifestChunk(frame, bad_rows, index)
    validator.finish()


def load_manifest(
    path: str | os.PathLike[str],
    *,
    check_images: bool = True,
    reporter: Reporter | None = None,
) -> LoadedManifest:
    """Read, canonicalise and validate a manifest (see the module docstring for formats).

    Every bad row is reported (missing or undecodable image, empty caption, duplicate uid -- the
    later occurrence, unknown split, and for tar shards a sample without image or a failed
    download) and left out; the rest load.  ``check_images=False`` skips decoding (files are still
    checked to exist).  Image checks run in threads, reported under the stage ``"checking images"``.
    Raises :class:`ManifestError` naming the file when the manifest as a whole is unusable,
    including when no row is valid.
    """
    sharded = find_shards(path, MANIFEST_STEMS)
    if sharded is None:
        source, digest, raw_chunks = _whole_source(Path(path).expanduser().resolve())
    else:
        source, digest, raw_chunks = sharded.root, sharded.sha256(), sharded.chunks(STREAM_ROWS_PER_CHUNK)
    validator = _Validator(source, check_images, as_reporter(reporter))
    parts = [validator.validate(raw) for raw in raw_chunks]
    validator.finish()
    frame = _concat([frame for frame, _ in parts])
    base = source if source.is_dir() else source.parent
    return LoadedManifest(frame, _concat([bad for _, bad in parts]), source, digest, _classes_for(frame, base))


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The frames one after another; empty ones are skipped (pandas warns on them) unless all are."""
    filled = [frame for frame in frames if len(frame)] or frames[:1]
    return pd.concat(filled, ignore_index=True) if len(filled) > 1 else filled[0]


def write_manifest_subset(
    manifest_path: str | os.PathLike[str], out_folder: str | os.PathLike[str], counts: Mapping[str, int]
) -> Path:
    """Write the first ``count`` rows of each split of a manifest to ``out_folder/manifest.csv``.

    ``counts`` maps canonical split names (``"train"``, ``"val"``, ``"test"``) to row counts; rows
    keep their input columns and order within a split, the splits follow the order of ``counts``,
    and a split with fewer rows gives all it has.  Image paths are made absolute (the subset may live
    anywhere) and ``classes.json`` beside the manifest, if there is one, is copied beside the subset.
    ``manifest_path``: an ordinary manifest file or folder (not shards); rows are not validated (see
    :func:`load_manifest`), and a row without a split counts as ``"train"``, as there.

    A manifest without a uid column gets one in the subset, naming each row as the loader names it
    in the full manifest (``row{n}``), so uids keep meaning the same images.

    Returns the path of the written manifest.  Raises :class:`ManifestError` (a ``ValueError``)
    naming the file and the split when a split of ``counts`` has no rows in the manifest or its
    count is below 1, when ``out_folder`` is the manifest's own folder, or when the manifest cannot be read.
    """
    raw, source, _ = _read_source(Path(manifest_path).expanduser().resolve())
    base = source if source.is_dir() else source.parent
    split_column = _canonical_source(list(raw.columns), "split")
    raw_splits = _text_values(raw[split_column]) if split_column is not None else [None] * len(raw)
    splits = pd.Series([SPLIT_ALIASES.get((split or "train").strip().lower()) for split in raw_splits], index=raw.index)
    parts = []
    for split, count in counts.items():
        if count < 1:
            raise ManifestError(
                f"{source}: the count for split {split!r} must be at least 1, got {count}", path=source
            )
        if not (splits == split).any():
            present = ", ".join(sorted(set(splits.dropna()))) or "none"
            raise ManifestError(f"{source}: no rows of split {split!r} (splits present: {present})", path=source)
        parts.append(raw[splits == split].head(count))
    subset = pd.concat(parts)
    if _canonical_source(list(raw.columns), "uid") is None:
        # The loader names uid-less rows by their position; keep the full manifest's names.
        subset.insert(0, "uid", [f"row{position + 1}" for position in raw.index.get_indexer(subset.index)])
    filepath_column = _canonical_source(list(raw.columns), "filepath")
    if filepath_column is not None:
        subset[filepath_column] = [_resolve(base, path) for path in _text_values(subset[filepath_column])]
    folder = Path(out_folder)
    written = folder / "manifest.csv"
    if written.resolve() == source.resolve() or folder.resolve() == base.resolve():
        raise ManifestError(
            f"{source}: the subset would overwrite its own manifest; choose another folder than {folder}", path=source
        )
    folder.mkdir(parents=True, exist_ok=True)
    subset.to_csv(written, index=False, lineterminator="\n")
    if (base / CLASSES_FILE_NAME).is_file():
        shutil.copy(base / CLASSES_FILE_NAME, folder / CLASSES_FILE_NAME)
    return written


def bad_rows_report(loaded: LoadedManifest) -> str:
    """A plain-text table of the rows that were left out and why (for the command line and logs)."""
    total = len(loaded.frame) + len(loaded.bad_rows)
    if loaded.bad_rows.empty:
        return f"{loaded.path}: all {total} rows usable"
    shown = ["row", "uid", "reason", "filepath"] + ([SHARD_COLUMN] if SHARD_COLUMN in loaded.bad_rows else [])
    table = loaded.bad_rows[shown].to_string(index=False)
    return f"{loaded.path}: {len(loaded.bad_rows)} of {total} rows left out\n{table}"
