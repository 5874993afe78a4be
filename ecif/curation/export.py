"""Export the curated dataset in formats that train straight away.

Two modes, because an export that ignores what the curator is looking at is the most repeated
complaint about labelling tools:

- ``view_rows=None`` -> *everything kept*: every manifest row (all splits) minus dropped pairs.
- ``view_rows=[...]`` -> *exactly this view*: those rows only, in the given order, minus dropped pairs
  (a dropped pair never leaves the bin through an export; restore it first).

In both, relabels are applied (``caption``/``title`` hold the current caption, ``scored_caption`` the
one the scores were computed for).  File paths are absolute, so the CSV trains with open_clip from
any working directory::

    python -m open_clip_train.main --train-data OUT/manifest.csv --csv-separator , \
        --csv-img-key filepath --csv-caption-key title

When the run has embeddings, ``OUT/index/`` holds a faiss index rebuilt for the exported pairs only,
in the run's layout (``{image,text}.faiss``, ``rows.npy``, ``uids.npy``, ``index.json``): faiss id
``i`` is line ``i`` of ``OUT/manifest.*`` (``rows.npy`` holds its ``row`` column, ``uids.npy`` its
``uid``), so dropped pairs are gone from it rather than masked.  The run's own index is left as it
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
from ecif.tasks.clean import EDITED_CHECKPOINT, EDITED_DIR

FORMATS = ("csv", "tsv", "jsonl", "parquet")


@dataclass
class ExportResult:
    """Where the export went and what it holds."""

    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    mode: str = "kept"


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
    """Write the curated manifest, ``uids.txt``, ``decisions.csv``, ``run.json``, (when one
    exists) the edited checkpoint and (when the run has embeddings) the rebuilt faiss index, built
    with ``index``, to ``out_dir``; see the module doc for the two modes and the index."""
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown export format(s) {sorted(unknown)}; choose from {FORMATS}")
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    kept, counts = curated_manifest(run, view_rows)
    # open_clip's CSV reader wants an image-path column and a caption column; "title" is its default.
    training = kept.assign(title=kept["caption"])
    ordered = ["filepath", "title", "uid", *[c for c in training.columns
                                              if c not in ("filepath", "title", "uid")]]
    training = training[ordered]
    result = ExportResult(out_dir=out, counts=counts, mode="kept" if view_rows is None else "view")
    writers = {
        "csv": lambda p: training.to_csv(p, index=False),
        "tsv": lambda p: training.to_csv(p, index=False, sep="\t"),
        "jsonl": lambda p: training.to_json(p, orient="records", lines=True, force_ascii=False),
        "parquet": lambda p: training.to_parquet(p, index=False),
    }
    for fmt in formats:
        path = out / f"manifest.{fmt}"
        writers[fmt](path)
        result.files[fmt] = path
    result.files["uids"] = out / "uids.txt"
    atomic_write_bytes(result.files["uids"], "".join(f"{u}\n" for u in sorted(kept["uid"])).encode())
    result.files["decisions"] = out / "decisions.csv"
    open_store(run).log().to_csv(result.files["decisions"], index=False)
    if run.has(EMBEDDINGS_FILE):
        result.files["index"] = out / INDEX_DIR
        embeddings, rows = load_embeddings(run), kept["row"].to_numpy()
        write_index_folder(result.files["index"], {m: embeddings[m][rows] for m in MODALITIES}, rows,
                           kept["uid"].astype(str).to_numpy(), index,
                           source={"run_dir": str(run.directory), "export": result.mode,
                                   **embeddings_source(run)})
    for name, source in edited_model_files(run).items():
        result.files[name] = out / f"edited_{source.name}"
        shutil.copy2(source, result.files[name])
    result.files["run"] = out / "run.json"
    atomic_write_json(result.files["run"], {
        "run": run.info, "run_dir": str(run.directory),
        "export": {
            "time": datetime.now(UTC).isoformat(timespec="seconds"), "mode": result.mode,
            "view_rows": None if view_rows is None else [int(r) for r in view_rows],
            "formats": list(formats), "counts": counts,
            "settings_hash": run_settings_hash(run),
            "open_clip": "--csv-separator , --csv-img-key filepath --csv-caption-key title",
        },
        # The index folder is derived from hashed inputs; hashing gigabytes of vectors adds nothing.
        "sha256": {name: file_sha256(path) for name, path in result.files.items()
                   if name != "run" and path.is_file()},
    })
    return result
