"""Export the curated dataset in formats that train straight away, one file per split.

Two modes, because an export that ignores what the curator is looking at is the most repeated
complaint about labelling tools:

- ``view_rows=None`` -> *everything kept*: every manifest row (all splits) minus dropped pairs.
- ``view_rows=[...]`` -> *exactly this view*: those rows only, in the given order, minus dropped pairs
  (a dropped pair never leaves the bin through an export; restore it first).

Each split goes to its own files, so that training on ``train.*`` never sees a validation or test
image: for every chosen format, ``OUT/train.{fmt}``, ``OUT/val.{fmt}`` and ``OUT/test.{fmt}`` (all
three always, a split without pairs as a file with no rows), and ``OUT/{train,val,test}_uids.txt``
(the split's uids, sorted).  Every table has the same columns: ``filepath``, ``title``, ``uid``, then
the run's manifest columns (``row``, ``caption``, ``split``, ...), ``scored_caption`` and ``status``.
Relabels are applied (``caption``/``title`` hold the current caption, ``scored_caption`` the one the
scores were computed for).  File paths are absolute, so the files train with open_clip from any
working directory, wherever the export folder is.  The CSV is comma-separated, which open_clip must
be told (its default separator is a tab; ``train.tsv`` is read without it)::

    python -m open_clip_train.main --train-data OUT/train.csv --val-data OUT/val.csv \
        --csv-separator , --csv-img-key filepath --csv-caption-key title

When the run has embeddings, ``OUT/index/`` holds a faiss index rebuilt for the exported pairs of
every split, in the run's layout (``{image,text}.faiss``, ``rows.npy``, ``uids.npy``,
``index.json``): faiss ids follow the split files one after another -- ``train.*`` line by line,
then ``val.*``, then ``test.*`` -- and ``rows.npy`` / ``uids.npy`` hold each id's ``row`` and
``uid``, so dropped pairs are gone from it rather than masked.  The run's own index is left as it
is, because the curator may still restore a dropped pair there.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from ecif.curation.review import open_store, run_settings_hash
from ecif.index.neighbours import (MODALITIES, IndexConfig, embeddings_source, load_embeddings,
                                   write_index_folder)
from ecif.paths import file_sha256
from ecif.run import EMBEDDINGS_FILE, INDEX_DIR, Run, atomic_write_bytes, atomic_write_json
from ecif.tasks.edit import EDITED_CHECKPOINT, EDITED_DIR

FORMATS = ("csv", "tsv", "jsonl", "parquet")
SPLITS = ("train", "val", "test")
"""The split files of an export, in order (the canonical splits of :mod:`ecif.data.manifest`)."""
OPEN_CLIP_CSV_OPTIONS = "--csv-separator , --csv-img-key filepath --csv-caption-key title"
"""How open_clip_train reads the exported ``*.csv`` files."""


@dataclass
class ExportResult:
    """Where the export went and what it holds.

    ``files``: ``{split}_{format}`` (e.g. ``train_csv``), ``{split}_uids``, ``decisions``, ``run``,
    and when written ``index``, ``checkpoint``, ``edit``.  ``splits``: exported pairs per split.
    """

    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    mode: str = "kept"
    splits: dict[str, int] = field(default_factory=dict)


def edited_model_files(run: Run) -> dict[str, Path]:
    """The edited checkpoint written by ``ecif.apply_edit`` (``checkpoint``) and its ``edit.json``
    (``edit``: what was dropped/relabelled, measured metrics), those that exist."""
    folder = run.path(EDITED_DIR)
    files = {"checkpoint": folder / EDITED_CHECKPOINT, "edit": folder / "edit.json"}
    return {name: path for name, path in files.items() if path.exists()}


def curated_manifest(run: Run, view_rows: Sequence[int] | None = None) -> tuple[pd.DataFrame, dict[str, int]]:
    """The cleaned manifest (see module doc) and counts of what was kept, dropped and relabelled."""
    manifest = run.manifest()
    manifest.insert(0, "row", range(len(manifest)))
    state = open_store(run).current_state().set_index("row")
    manifest["scored_caption"] = manifest["caption"]
    manifest["status"] = "pending"
    decided = manifest["row"].isin(state.index)
    manifest.loc[decided, "status"] = state.loc[manifest.loc[decided, "row"], "status"].to_numpy()
    manifest.loc[decided, "caption"] = state.loc[manifest.loc[decided, "row"], "caption"].to_numpy()
    selected = manifest if view_rows is None else manifest.set_index("row", drop=False).loc[list(view_rows)]
    kept = selected[selected["status"] != "dropped"].reset_index(drop=True)
    counts = {
        "selected": int(len(selected)), "kept": int(len(kept)),
        "dropped": int((selected["status"] == "dropped").sum()),
        "relabelled": int((kept["caption"] != kept["scored_caption"]).sum()),
    }
    return kept, counts


def export_run(run: Run, out_dir: str | Path, view_rows: Sequence[int] | None = None,
               formats: Sequence[str] = ("csv", "jsonl", "parquet"),
               index: IndexConfig = IndexConfig()) -> ExportResult:
    """Write the curated manifest split by split (``train.{fmt}``, ``val.{fmt}``, ``test.{fmt}``),
    ``{split}_uids.txt``, ``decisions.csv``, ``run.json``, (when one exists) the edited checkpoint
    and (when the run has embeddings) the rebuilt faiss index, built with ``index``, to ``out_dir``;
    see the module doc for the two modes, the layout and the index."""
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown export format(s) {sorted(unknown)}; choose from {FORMATS}")
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    kept, counts = curated_manifest(run, view_rows)
    unknown_splits = set(kept["split"]) - set(SPLITS)
    if unknown_splits:  # the loader only writes canonical splits; never mix an odd one into train
        raise ValueError(f"{run.directory}: rows of unknown split(s) {sorted(unknown_splits)}; expected {SPLITS}")
    # Split by split (a stable sort keeps the manifest's or the view's order within each split):
    # the index's faiss ids then run through train.*, val.* and test.* in turn.
    kept = kept.sort_values("split", key=lambda split: split.map(SPLITS.index), kind="stable")
    kept = kept.reset_index(drop=True)
    # open_clip's CSV reader wants an image-path column and a caption column; "title" is its default.
    table = kept.assign(title=kept["caption"])
    table = table[["filepath", "title", "uid", *[c for c in table.columns if c not in ("filepath", "title", "uid")]]]
    result = ExportResult(out_dir=out, counts=counts, mode="kept" if view_rows is None else "view")
    writers = {
        "csv": lambda frame, p: frame.to_csv(p, index=False),
        "tsv": lambda frame, p: frame.to_csv(p, index=False, sep="\t"),
        "jsonl": lambda frame, p: frame.to_json(p, orient="records", lines=True, force_ascii=False),
        "parquet": lambda frame, p: frame.to_parquet(p, index=False),
    }
    for split in SPLITS:
        part = table[table["split"] == split]
        result.splits[split] = int(len(part))
        for fmt in formats:
            result.files[f"{split}_{fmt}"] = out / f"{split}.{fmt}"
            writers[fmt](part, result.files[f"{split}_{fmt}"])
        result.files[f"{split}_uids"] = out / f"{split}_uids.txt"
        atomic_write_bytes(result.files[f"{split}_uids"], "".join(f"{u}\n" for u in sorted(part["uid"])).encode())
    result.files["decisions"] = out / "decisions.csv"
    open_store(run).log().to_csv(result.files["decisions"], index=False)
    if run.has(EMBEDDINGS_FILE):
        result.files["index"] = out / INDEX_DIR
        embeddings, rows = load_embeddings(run), kept["row"].to_numpy()
        write_index_folder(result.files["index"], {m: embeddings[m][rows] for m in MODALITIES}, rows,
                           kept["uid"].astype(str).to_numpy(), index,
                           source={"run_dir": str(run.directory), "export": result.mode,
                                   "splits": result.splits, **embeddings_source(run)})
    for name, source in edited_model_files(run).items():
        result.files[name] = out / f"edited_{source.name}"
        shutil.copy2(source, result.files[name])
    result.files["run"] = out / "run.json"
    atomic_write_json(result.files["run"], {
        "run": run.info, "run_dir": str(run.directory),
        "export": {
            "time": datetime.now(UTC).isoformat(timespec="seconds"), "mode": result.mode,
            "view_rows": None if view_rows is None else [int(r) for r in view_rows],
            "formats": list(formats), "counts": counts, "splits": result.splits,
            "settings_hash": run_settings_hash(run),
            "open_clip": OPEN_CLIP_CSV_OPTIONS,
            "train_data": "train.csv" if "csv" in formats else None,
        },
        # The index folder is derived from hashed inputs; hashing gigabytes of vectors adds nothing.
        "sha256": {name: file_sha256(path) for name, path in result.files.items()
                   if name != "run" and path.is_file()},
    })
    return result
