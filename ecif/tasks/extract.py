"""Backbone features of a whole manifest, chunk by chunk, into a feature store for streamed scoring.

:func:`extract_feature_store` reads the manifest with :func:`ecif.data.iter_manifest_chunks` (one
chunk in memory at a time), encodes each chunk with :func:`ecif.models.iter_chunk_features` (and its
per-chunk cache) and writes a :class:`ecif.influence.streaming.FeatureStore` that ``ecif
score-features`` scores.  Besides the store's ``image-00000.npy``/``text-00000.npy`` shards and
``store.json``, the folder holds::

    rows-00000.parquet       the pairs of shard 0, in store order: uid, filepath, caption, split,
                             label, source_row (+ shard for a sharded source); joins scores to uids
    left-out-00000.parquet   rows of manifest chunk 0 that are not in the store, and why (row, uid,
                             filepath, reason [+ shard]); written only for chunks that have any.
                             The manifest's bad rows are listed whatever the chosen splits (a bad
                             row may have no valid split); rows of other splits are not
    extract.json             what was extracted with what, and how far it got

Shard ``k`` holds the ``k``-th chunk that has pairs; a chunk left without any (every row bad, or
none of the chosen splits) makes no shard.

Images are decoded once, where they are encoded: the manifest is read with ``check_images=False``
(files and tar members are still checked to exist), and a row whose image cannot be decoded is left
out with the decoder's error, never stored as data.

Resume: a chunk's files are written (each atomically), then ``extract.json`` records the chunk; a
rerun with the same manifest, model and settings checks that the finished chunks' rows (image
paths, sizes and modification times, captions) are unchanged and encodes only the others.
``store.json`` is written last, so a store that opens is complete.

Ray: with a :class:`~ecif.influence.streaming.RayExecutor` each chunk is one Ray task.  The chunk's
paths and captions travel to the worker, which loads the model once per worker process and reads
the images itself, so the image files (tars included) and the checkpoint must be readable at the
same paths on every node.  Results come back in chunk order and the driver writes them, so the
store is the one a single process writes (byte for byte in the tests; features computed with
another CPU or thread count may differ in the last bits).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import pandas as pd

from ecif.config import AUTO_DEVICE
from ecif.data.manifest import (
    BAD_ROWS_COLUMNS,
    CANONICAL_COLUMNS,
    SHARD_COLUMN,
    SPLIT_ALIASES,
    STREAM_ROWS_PER_CHUNK,
    iter_manifest_chunks,
    load_manifest,
)
from ecif.devices import resolve_device
from ecif.influence.streaming import STORE_FILE, Executor, FeatureStore, FeatureStoreWriter, LocalExecutor
from ecif.models.features import FEATURES_STAGE, Features, drop_failed, iter_chunk_features, row_signatures
from ecif.models.open_clip_models import LoadedModel, load_model, load_tokenizer, require_weights, weights_hash
from ecif.models.towers import refuse_unsupported_config
from ecif.paths import text_sha256
from ecif.progress import Reporter, as_reporter
from ecif.run import atomic_write_json, atomic_write_parquet, read_json

EXTRACT_FILE = "extract.json"
ROWS_FILE = "rows-{:05d}.parquet"
LEFT_OUT_FILE = "left-out-{:05d}.parquet"
LEFT_OUT_GLOB = "left-out-*.parquet"
_LAYOUT_VERSION = "1"  # part of the resume fingerprint: bump when the files written here change


@dataclass(frozen=True)
class ModelSource:
    """The weights to encode with, as :func:`ecif.models.load_model` arguments (what Ray tasks receive).

    ``device`` is resolved by the process that encodes (:func:`ecif.devices.resolve_device`), so
    ``auto`` takes each Ray worker's own GPU; it is not part of the store's fingerprint.
    """

    name: str
    checkpoint: str | None = None
    pretrained: str | None = None
    device: str = AUTO_DEVICE
    tokenizer: str | None = None


def model_source(
    model: str,
    checkpoint: str | os.PathLike[str] | None,
    pretrained: str | None,
    manifest: str | os.PathLike[str],
    reporter: Reporter | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
) -> ModelSource:
    """``model`` "demo" is the ecif-demo architecture: with ``checkpoint`` its weights, else the demo
    model trained (and cached) on the manifest's train split, as ``ecif score`` trains it.  Any other
    name is an open_clip architecture with its ``checkpoint`` or ``pretrained`` tag (and ``tokenizer``
    folder, see :func:`ecif.models.open_clip_models.load_tokenizer`)."""
    if model != "demo":
        require_weights(model, checkpoint, pretrained)
        refuse_unsupported_config(model)
        load_tokenizer(model, tokenizer)  # refuses a tokenizer that is not available offline
        return ModelSource(model, _absolute(checkpoint), pretrained, tokenizer=_absolute(tokenizer))
    if pretrained is not None:
        raise ValueError("the demo model has no pretrained tags; pass its --checkpoint, or nothing to train it")
    from ecif.models.demo import demo_architecture, train_demo_model

    if checkpoint is None:
        # The demo model needs the whole train split in memory anyway, so the manifest is loaded whole.
        checkpoint = train_demo_model(load_manifest(manifest, reporter=reporter), reporter=reporter)
    return ModelSource(demo_architecture(checkpoint), _absolute(checkpoint))


def _absolute(path: str | os.PathLike[str] | None) -> str | None:
    """A path as every process reads it alike (a Ray worker does not share the driver's working folder)."""
    return None if path is None else str(Path(path).expanduser().resolve())


@lru_cache(maxsize=1)
def _loaded(source: ModelSource) -> LoadedModel:
    """One model per process: a Ray worker loads it for its first chunk and reuses it for the next ones."""
    return load_model(source.name, checkpoint=source.checkpoint, pretrained=source.pretrained, device=resolve_device(source.device),
                      tokenizer=source.tokenizer)


def encode_chunk(frame: pd.DataFrame, source: ModelSource, batch_size: int) -> Features | None:
    """Features of one chunk's rows (``filepath``, ``caption``), None for an empty chunk; what each
    Ray task runs.  Goes through the per-chunk feature cache of the process's ``cache_dir()``."""
    if frame.empty:
        return None
    ((_, features),) = iter_chunk_features(_loaded(source), [frame], batch_size=batch_size)
    return features


@dataclass
class _Chunk:
    """One manifest chunk on its way to the store: its rows of the chosen splits, its bad rows, its key."""

    index: int
    frame: pd.DataFrame
    bad_rows: pd.DataFrame
    key: str


def extract_feature_store(
    manifest: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    model: str = "demo",
    checkpoint: str | os.PathLike[str] | None = None,
    pretrained: str | None = None,
    *,
    splits: Sequence[str] | None = None,
    rows_per_chunk: int = STREAM_ROWS_PER_CHUNK,
    batch_size: int = 64,
    executor: Executor | None = None,
    reporter: Reporter | None = None,
    device: str = AUTO_DEVICE,
    tokenizer: str | os.PathLike[str] | None = None,
) -> FeatureStore:
    """Encode every usable pair of ``manifest`` (of ``splits``; default all) into a feature store at ``out_dir``.

    Shard ``k`` of the store: ``image`` float32 ``[n_k, d_img]`` and ``text`` float32 ``[n_k, d_txt]``,
    the model's pre-projection backbone features (as :func:`ecif.models.compute_features` gives,
    unnormalised), with ``rows-0000k.parquet`` naming its pairs; rows left out (bad rows of the
    manifest, undecodable images) are listed with the reason in ``left-out-*.parquet``
    (:func:`read_left_out`).  ``model``/``checkpoint``/``pretrained``/``tokenizer``: see :func:`model_source`.
    At most ``rows_per_chunk`` manifest rows are read at a time; images are encoded ``batch_size``
    at a time.  ``executor``: where chunks are encoded (default this process; a ``RayExecutor``
    makes each chunk a Ray task).  ``device``: where each process encodes (``auto``, ``cpu``,
    ``cuda[:N]``); encoding here refuses one this machine lacks before any work.  Progress: pairs done under the stage "features" after each chunk
    (also where a cancellation stops the job, with that chunk kept).

    Resumes what an interrupted call with the same arguments left in ``out_dir``; raises ValueError
    for a folder holding another extraction or a finished chunk whose rows changed since.
    """
    reporter = as_reporter(reporter)
    executor = executor or LocalExecutor()
    if isinstance(executor, LocalExecutor):
        resolve_device(device)  # a Ray worker resolves it on its own machine
    wanted = _canonical_splits(splits)
    source = replace(model_source(model, checkpoint, pretrained, manifest, reporter, tokenizer), device=device)
    out_dir = Path(out_dir)
    settings = {
        "manifest": str(Path(manifest).expanduser().resolve()),
        "model": source.name,
        "checkpoint": source.checkpoint,
        "pretrained": source.pretrained,
        "model_hash": weights_hash(source.name, source.checkpoint, source.pretrained, tokenizer=source.tokenizer),
        "splits": wanted,
        "rows_per_chunk": rows_per_chunk,
    }
    fingerprint = text_sha256(_LAYOUT_VERSION, *(f"{name}={value}" for name, value in sorted(settings.items())))
    progress = read_json(out_dir / EXTRACT_FILE)
    if progress is None:
        if (out_dir / STORE_FILE).exists():
            raise ValueError(f"{out_dir} holds a feature store that was not extracted from a manifest; choose another folder")
        progress = {"fingerprint": fingerprint, **settings, "chunk_keys": [], "shard_rows": [], "dims": None, "left_out": 0}
    elif progress["fingerprint"] != fingerprint:
        raise ValueError(
            f"{out_dir} holds features of another manifest, model or settings ({progress['manifest']}, "
            f"{progress['model']}); choose another folder or delete this one"
        )
    progress["complete"] = False
    writer = FeatureStoreWriter(out_dir, progress["shard_rows"], progress["dims"])
    done_keys: list[str] = list(progress["chunk_keys"])

    def unfinished() -> Iterator[_Chunk]:
        chunks = 0
        for chunk in iter_manifest_chunks(manifest, rows_per_chunk, check_images=False, reporter=reporter):
            chunks += 1
            frame = chunk.frame
            if wanted is not None:
                frame = frame[frame["split"].isin(wanted)].reset_index(drop=True)
            key = text_sha256(*row_signatures(frame))[:32]
            if chunk.index >= len(done_keys):
                yield _Chunk(chunk.index, frame, chunk.bad_rows, key)
            elif key != done_keys[chunk.index]:
                rows = [*chunk.frame["source_row"], *chunk.bad_rows["row"]]
                raise ValueError(
                    f"{out_dir}: chunk {chunk.index} of {manifest} (rows {min(rows)}-{max(rows)}) changed since "
                    "it was extracted (images or captions); extract into another folder or delete this one"
                )
        if chunks < len(done_keys):
            raise ValueError(
                f"{out_dir} holds {len(done_keys)} chunks of {manifest}, which now has {chunks}; "
                "extract into another folder or delete this one"
            )

    # Two views of one stream: the executor pulls chunks as it starts work (at most its window
    # ahead), the loop below takes each chunk back with its features, in the same order.
    to_encode, to_write = itertools.tee(unfinished())
    results = executor.map(encode_chunk, (chunk.frame[["filepath", "caption"]] for chunk in to_encode), source, batch_size)
    reporter.report(FEATURES_STAGE, sum(writer.shard_rows), 0)
    try:
        for chunk, features in zip(to_write, results, strict=True):
            _write_chunk(out_dir, writer, chunk, features, progress)
            reporter.report(FEATURES_STAGE, sum(writer.shard_rows), 0)
    finally:
        _loaded.cache_clear()  # the driver's model (local executor) is not kept once the store is written
    if not writer.shard_rows:
        chosen = f" of split {', '.join(wanted)}" if wanted else ""
        raise ValueError(f"{manifest}: no usable pairs{chosen} to extract (left-out rows: {out_dir / LEFT_OUT_GLOB})")
    store = writer.finish()
    atomic_write_json(out_dir / EXTRACT_FILE, {**progress, "complete": True})
    return store


def _write_chunk(out_dir: Path, writer: FeatureStoreWriter, chunk: _Chunk, features: Features | None, progress: dict) -> None:
    """Store one chunk's pairs as the next shard and its left-out rows, then record it as finished."""
    frame, left_out = chunk.frame, chunk.bad_rows
    if features is not None and features.failed:
        frame, features, failed = drop_failed(frame, features)
        left_out = pd.concat([part for part in (left_out, failed) if len(part)]).sort_values("row", ignore_index=True)
    if len(frame):
        shard = writer.add(features.image, features.text)
        columns = [*CANONICAL_COLUMNS, *([SHARD_COLUMN] if SHARD_COLUMN in frame.columns else [])]
        atomic_write_parquet(out_dir / ROWS_FILE.format(shard), frame[columns])
    left_out_file = out_dir / LEFT_OUT_FILE.format(chunk.index)
    if len(left_out):
        atomic_write_parquet(left_out_file, left_out)
    else:  # a file left by an interrupted earlier attempt at this chunk would be stale
        left_out_file.unlink(missing_ok=True)
    progress["chunk_keys"].append(chunk.key)
    progress["shard_rows"] = writer.shard_rows
    progress["dims"] = writer.dims
    progress["left_out"] += len(left_out)
    atomic_write_json(out_dir / EXTRACT_FILE, progress)


def _canonical_splits(splits: Sequence[str] | None) -> list[str] | None:
    if splits is None:
        return None
    canonical = []
    for split in splits:
        name = SPLIT_ALIASES.get(split.strip().lower())
        if name is None:
            raise ValueError(f"unknown split {split!r} (expected train, val or test)")
        canonical.append(name)
    return sorted(set(canonical))


def read_row_map(store: FeatureStore | str | os.PathLike[str], columns: Sequence[str] | None = None) -> pd.DataFrame | None:
    """The pairs of an extracted store in store order (the order of :func:`ecif.read_scores`), or
    None for a store without a row map (one written by ``write_feature_store``).  ``columns``: read
    only these (e.g. ``["uid"]``)."""
    store = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
    files = [store.directory / ROWS_FILE.format(shard) for shard in range(store.n_shards)]
    if not files[0].exists():
        return None
    return pd.concat([pd.read_parquet(file, columns=columns) for file in files], ignore_index=True)


def read_left_out(directory: str | os.PathLike[str]) -> pd.DataFrame:
    """Every row an extraction left out, in manifest order: ``row``, ``uid``, ``filepath``, ``reason``
    (+ ``shard``); empty when none was."""
    files = sorted(Path(directory).glob(LEFT_OUT_GLOB))
    if not files:
        return pd.DataFrame({column: pd.Series(dtype="int64" if column == "row" else object) for column in BAD_ROWS_COLUMNS})
    return pd.concat([pd.read_parquet(file) for file in files], ignore_index=True)
