"""Nearest neighbours of pairs by image or by caption, over the run's fine-tuned embeddings.

The index holds the *training* pairs (the ones a curator can act on); any manifest row, training or
not, can be a query because queries use its vector from ``RUN/embeddings.npz``.

- Vectors are L2-normalised float32, so inner product = cosine similarity.
- :class:`IndexConfig` picks the index: up to ``exact_max_vectors`` (a million) per modality it is
  exact (``IndexFlatIP``); above it an ``IndexIVFFlat`` with about 4·√N lists, searched with
  ``nprobe`` lists, keeps memory and query time bounded and results are approximate.
- ``RUN/index/`` holds ``{image,text}.faiss`` (``faiss.write_index``), ``rows.npy`` and ``uids.npy``
  (faiss id -> manifest row and uid) and ``index.json`` (written last: the settings and a fingerprint
  of the embeddings it was built from).  :meth:`NeighbourIndex.load` checks all of it against the run
  and rebuilds (or raises :class:`StaleIndexError`) rather than return neighbours of another run.
- Dropped pairs are not removed from the run's index (restores must be instant and a flat or IVF
  rebuild at a million vectors is not): searches mask them with an ``IDSelector``.  The exporter
  writes a fresh index of exactly the exported pairs (:func:`write_index_folder`).
- "Least similar" searches with the negated query: the largest inner product with ``-q`` is the
  smallest with ``q``, exactly, for the flat index.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import pandas as pd

from ecif.progress import Reporter, as_reporter
from ecif.run import EMBEDDINGS_FILE, INDEX_DIR, INDEX_META_FILE, SCORES_FILE, Run, atomic_write_json, read_json

Modality = Literal["image", "text"]
MODALITIES: tuple[Modality, ...] = ("image", "text")
ROWS_FILE = "rows.npy"
UIDS_FILE = "uids.npy"
META_FILE = Path(INDEX_META_FILE).name  # the same file as the run folder names it


@dataclass(frozen=True)
class IndexConfig:
    """How the faiss index of one modality is built and searched.

    - ``exact_max_vectors``: up to this many vectors the index is exact (``IndexFlatIP``, 4·e bytes
      per vector, brute-force search); above it, ``IndexIVFFlat``.
    - ``lists_per_sqrt_n``: the IVF has ``lists_per_sqrt_n``·√N inverted lists (faiss's usual 4·√N)
    - ``min_points_per_list``: ... but at least this many vectors per list, the fewest faiss's k-means
      accepts without warning; it only bites on small N, e.g. when a test forces the IVF path.
    - ``training_points_per_list``: k-means is trained on at most this many sampled vectors per list.
    - ``nprobe``: lists visited per query (search time only: changing it needs no rebuild).
    - ``seed``: the k-means training sample.
    """

    exact_max_vectors: int = 1_000_000
    lists_per_sqrt_n: float = 4.0
    min_points_per_list: int = 39
    training_points_per_list: int = 64
    nprobe: int = 32
    seed: int = 0

    def ivf_lists(self, n: int) -> int:
        """Inverted lists for an index of ``n`` vectors; 0 means exact."""
        if n <= self.exact_max_vectors:
            return 0
        return max(1, min(int(self.lists_per_sqrt_n * math.sqrt(n)), n // self.min_points_per_list))

    def make(self, vectors: np.ndarray) -> faiss.Index:
        """An inner-product index holding ``vectors`` ([n, e] unit float32) with faiss ids 0..n-1."""
        n, dim = vectors.shape
        lists = self.ivf_lists(n)
        if lists == 0:
            index = faiss.IndexFlatIP(dim)
        else:
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
            sample = np.random.default_rng(self.seed).choice(
                n, min(n, self.training_points_per_list * lists), replace=False)
            index.train(vectors[np.sort(sample)])
            index.nprobe = self.nprobe
        index.add(vectors)
        return index


class StaleIndexError(RuntimeError):
    """The saved index does not match the run (or is missing or half-written); rebuild it."""


def _ivf_lists(index: faiss.Index) -> int:
    """What :meth:`IndexConfig.ivf_lists` asked for when ``index`` was built (0 for exact)."""
    return int(index.nlist) if isinstance(index, faiss.IndexIVF) else 0


def _normalised(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    faiss.normalize_L2(vectors)
    return vectors


class NeighbourIndex:
    """Image and caption indexes over the training pairs of one run, plus the query vectors."""

    def __init__(self, indexes: dict[str, faiss.Index], rows: np.ndarray, uids: np.ndarray,
                 embeddings: dict[str, np.ndarray]):
        self.indexes = indexes
        self.rows = rows.astype(np.int64)
        self.uids = uids
        self.embeddings = embeddings
        # manifest row -> faiss id, for masking and for excluding the query itself.
        self._position = pd.Series(np.arange(len(self.rows)), index=self.rows)

    @classmethod
    def load(cls, run: Run, config: IndexConfig | None = None,
             on_stale: Literal["rebuild", "raise"] = "rebuild") -> NeighbourIndex:
        """Open the index saved by :func:`build_run_index`, checked against the run.

        Stale means: missing or half-written, built from other embeddings (``embeddings.npz``
        rewritten since), a row→uid map that differs from the run's training pairs, or (when
        ``config`` is given) another exact/IVF layout than ``config`` asks for.  A stale index is
        rebuilt, or with ``on_stale="raise"`` reported as :class:`StaleIndexError` (for callers that
        would rather not wait for a rebuild at tens of millions of vectors).  ``config=None`` keeps
        the settings the index was built with; a given ``config``'s ``nprobe`` applies without a
        rebuild.
        """
        folder = run.path(INDEX_DIR)
        try:
            indexes, rows, uids = _read_run_index(run, config)
        except StaleIndexError:
            if on_stale == "raise":
                raise
            return build_run_index(run, config=config or saved_config(folder))
        return cls(indexes, rows, uids, load_embeddings(run))

    def vector(self, row: int, by: Modality) -> np.ndarray:
        """The unit embedding of manifest ``row`` in modality ``by``, shaped [1, e]."""
        return _normalised(self.embeddings[by][row : row + 1])

    def search(self, query: np.ndarray, k: int, by: Modality = "image", least: bool = False,
               exclude_rows: Iterable[int] = ()) -> pd.DataFrame:
        """The ``k`` training pairs most (or least) similar to the unit vector ``query`` in the
        ``by`` index, skipping ``exclude_rows``; columns ``row``, ``uid``, ``similarity``."""
        excluded = np.unique(self._position.reindex(list(exclude_rows)).dropna().to_numpy(dtype=np.int64))
        index = self.indexes[by]
        params = None
        if len(excluded):
            # Named locals: the SWIG wrappers do not keep selectors alive, and a selector collected
            # before the search returns is a use-after-free inside faiss.
            excluded_ids = faiss.IDSelectorBatch(excluded)
            selector = faiss.IDSelectorNot(excluded_ids)
            params = (faiss.SearchParametersIVF(sel=selector, nprobe=index.nprobe)
                      if isinstance(index, faiss.IndexIVF) else faiss.SearchParameters(sel=selector))
        query = _normalised(-query if least else query)
        k = max(0, min(k, len(self.rows) - len(excluded)))
        if k == 0:
            return pd.DataFrame({"row": [], "uid": [], "similarity": []})
        scores, ids = index.search(query, k, params=params)
        found = ids[0] >= 0
        ids, scores = ids[0][found], scores[0][found]
        return pd.DataFrame({"row": self.rows[ids], "uid": self.uids[ids],
                             "similarity": -scores if least else scores})

    def similar(self, row: int, k: int = 10, by: Modality = "image", least: bool = False,
                exclude_rows: Iterable[int] = ()) -> pd.DataFrame:
        """Neighbours of manifest ``row`` (itself excluded) by image or by caption.

        ``exclude_rows`` is where the caller passes the dropped pairs (``edit_spec(store.
        current_state())[0]``, or the app's ``Context.dropped_rows``), so the bin never shows up;
        they are masked in the search, so a drop or a restore needs no rebuild.
        """
        return self.search(self.vector(row, by), k, by=by, least=least,
                           exclude_rows=[row, *exclude_rows])


def load_embeddings(run: Run) -> dict[str, np.ndarray]:
    with np.load(run.path(EMBEDDINGS_FILE)) as data:
        return {m: data[m].astype(np.float32) for m in MODALITIES}


def training_rows(run: Run) -> tuple[np.ndarray, np.ndarray]:
    if run.has(SCORES_FILE):
        frame = pd.read_parquet(run.path(SCORES_FILE), columns=["row", "uid"])
    else:
        frame = run.manifest()[["uid", "split"]].reset_index(names="row")
        frame = frame[frame["split"] == "train"]
    return frame["row"].to_numpy(np.int64), frame["uid"].astype(str).to_numpy()


def _unique() -> str:
    return f"{os.getpid()}.{threading.get_ident()}"


def embeddings_source(run: Run) -> dict[str, Any]:
    """What a run's index is built from: size, mtime and inode of ``embeddings.npz``.

    Cheap at any size (hashing gigabytes of vectors on every app start is not), and safe: the
    pipeline replaces the file by a rename, which gives it a new inode even within one tick of the
    file-system clock; a copy of the run folder merely costs a rebuild.
    """
    stat = run.path(EMBEDDINGS_FILE).stat()
    return {"embeddings": {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}}


def write_index_folder(folder: Path, vectors: Mapping[Modality, np.ndarray], rows: np.ndarray,
                       uids: np.ndarray, config: IndexConfig, source: Mapping[str, Any],
                       reporter: Reporter | None = None) -> dict[Modality, faiss.Index]:
    """Build one index per modality over ``vectors[m]`` ([n, e], normalised here) and write
    ``{image,text}.faiss``, ``rows.npy`` ([n] int64: faiss id -> manifest row), ``uids.npy`` ([n]
    str) and, last, ``index.json`` (``source``, the settings, each index's layout) to ``folder``.

    Every file goes through a temporary name, unique per thread (the app may build while the
    pipeline's stage does), so a killed build leaves no truncated file; ``index.json`` is written
    last, so a build killed halfway is caught by the count and source checks of the reader.
    """
    reporter = as_reporter(reporter)
    reporter.report("index", 0, len(MODALITIES))
    folder.mkdir(parents=True, exist_ok=True)
    indexes: dict[Modality, faiss.Index] = {}
    for done, modality in enumerate(MODALITIES, start=1):
        indexes[modality] = config.make(_normalised(vectors[modality]))
        temporary = folder / f".{modality}.faiss.{_unique()}.tmp"
        faiss.write_index(indexes[modality], str(temporary))
        temporary.replace(folder / f"{modality}.faiss")
        reporter.report("index", done, len(MODALITIES))
    for name, array in ((ROWS_FILE, rows.astype(np.int64)), (UIDS_FILE, uids.astype(str))):
        temporary = folder / f".{name}.{_unique()}.tmp.npy"
        np.save(temporary, array)
        temporary.replace(folder / name)
    atomic_write_json(folder / META_FILE, {
        "count": int(len(rows)), "config": asdict(config), "source": dict(source),
        "layout": {m: {"dim": int(index.d), "ivf_lists": _ivf_lists(index)}
                   for m, index in indexes.items()},
    })
    return indexes


def saved_config(folder: Path) -> IndexConfig:
    """The settings the index in ``folder`` was built with (the defaults when there is none)."""
    meta = read_json(folder / META_FILE)
    return IndexConfig() if meta is None else IndexConfig(**meta["config"])


def _read_run_index(run: Run, config: IndexConfig | None
                    ) -> tuple[dict[Modality, faiss.Index], np.ndarray, np.ndarray]:
    """The run's saved indexes, row map and uid map; :class:`StaleIndexError` says why not.

    The cheap checks (source, row→uid map) come before reading the faiss files, which at a million
    vectors are gigabytes.
    """
    folder = run.path(INDEX_DIR)
    meta = read_json(folder / META_FILE)
    if meta is None:
        raise StaleIndexError(f"{folder} holds no {META_FILE}: no finished build")
    if meta["source"] != embeddings_source(run):
        raise StaleIndexError(f"{EMBEDDINGS_FILE} changed since the index in {folder} was built")
    try:
        rows, uids = np.load(folder / ROWS_FILE), np.load(folder / UIDS_FILE)
    except FileNotFoundError as missing:
        raise StaleIndexError(f"the row→uid map is missing: {missing.filename}") from missing
    expected_rows, expected_uids = training_rows(run)
    if not (np.array_equal(rows, expected_rows) and np.array_equal(uids, expected_uids)):
        raise StaleIndexError(f"the row→uid map in {folder} is not the run's training pairs "
                              f"({len(rows)} saved, {len(expected_rows)} in the run)")
    nprobe = (config or saved_config(folder)).nprobe
    indexes: dict[Modality, faiss.Index] = {}
    for modality in MODALITIES:
        path = folder / f"{modality}.faiss"
        if not path.exists():
            raise StaleIndexError(f"{path} is missing")
        index = faiss.read_index(str(path))
        if index.ntotal != len(rows):
            raise StaleIndexError(f"{path} holds {index.ntotal} vectors, the map {len(rows)}: "
                                  "an interrupted build")
        if config is not None and _ivf_lists(index) != config.ivf_lists(len(rows)):
            raise StaleIndexError(f"{path} has {_ivf_lists(index)} IVF lists (0 = exact); the "
                                  f"settings ask for {config.ivf_lists(len(rows))}")
        if isinstance(index, faiss.IndexIVF):
            index.nprobe = nprobe
        indexes[modality] = index
    return indexes, rows, uids


def build_run_index(run: Run, reporter: Reporter | None = None,
                    config: IndexConfig | None = None) -> NeighbourIndex:
    """Build and save ``RUN/index/`` over the training pairs (pipeline stage "index"; see
    :func:`write_index_folder` for the files) and return it."""
    config = config or IndexConfig()
    embeddings = load_embeddings(run)
    rows, uids = training_rows(run)
    indexes = write_index_folder(run.path(INDEX_DIR), {m: embeddings[m][rows] for m in MODALITIES},
                                 rows, uids, config, embeddings_source(run), reporter)
    return NeighbourIndex(indexes, rows, uids.astype(str), embeddings)


def suggest_caption(run: Run, row: int, k: int = 5, index: NeighbourIndex | None = None,
                    exclude_rows: Iterable[int] = (),
                    captions: pd.Series | None = None) -> tuple[str | None, pd.DataFrame]:
    """A proposed caption for ``row`` from its image-nearest training neighbours.

    Rule: take the ``k`` pairs whose *images* are closest to this pair's image (itself and
    ``exclude_rows`` left out), drop those whose caption equals this pair's caption, and propose the
    neighbour caption whose *text* embedding is most similar to this pair's image embedding, i.e. the
    caption the fine-tuned model would match best to this image among captions that similar images
    actually carry.  Returns ``(caption or None, evidence)`` where evidence has ``row``, ``uid``,
    ``caption``, ``image_similarity`` (neighbour image vs this image) and ``caption_match`` (neighbour
    caption vs this image), best suggestion first.

    ``captions`` (indexed by manifest row) supplies current captions; a relabelled neighbour's text
    embedding is of its old caption, so relabelled neighbours are skipped unless their caption is
    unchanged.
    """
    index = index or NeighbourIndex.load(run)
    scored = run.manifest()["caption"]
    current = scored if captions is None else captions.reindex(scored.index).fillna(scored)
    neighbours = index.similar(row, k=k, by="image", exclude_rows=exclude_rows)
    rows = neighbours["row"].to_numpy()
    evidence = neighbours.rename(columns={"similarity": "image_similarity"}).assign(
        caption=scored.iloc[rows].to_numpy(),
        caption_match=_normalised(index.embeddings["text"][rows]) @ index.vector(row, "image")[0],
    ).sort_values("caption_match", ascending=False, kind="stable").reset_index(drop=True)
    unchanged = current.iloc[evidence["row"]].to_numpy() == evidence["caption"].to_numpy()
    differs = evidence["caption"].str.strip().str.lower() != str(current.iloc[row]).strip().lower()
    usable = evidence[unchanged & differs.to_numpy()]
    return (None if usable.empty else str(usable["caption"].iloc[0])), evidence
