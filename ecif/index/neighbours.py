"""Nearest neighbours of pairs by image or by caption, over the run's fine-tuned embeddings.

The index holds the *training* pairs (the ones a curator can act on); any manifest row, training or
not, can be a query because queries use its vector from ``RUN/embeddings.npz``.

- Vectors are L2-normalised float32, so inner product = cosine similarity.
- Up to ``IVF_THRESHOLD`` vectors (about a million) the index is exact (``IndexFlatIP``).  Above it an
  ``IndexIVFFlat`` with ~4·√N lists and ``nprobe`` 32 keeps memory and query time bounded; results
  are then approximate.
- faiss ids are positions 0..n-1; ``RUN/index/rows.npy`` maps them to manifest rows and
  ``uids.npy`` to uids.  Dropped pairs are not removed from the index (HNSW and friends cannot remove
  entries, and restores must be instant): they are masked at query time with an ``IDSelector``.
- "Least similar" searches with the negated query: the largest inner product with ``-q`` is the
  smallest with ``q``, exactly, for the flat index.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import Literal

import faiss
import numpy as np
import pandas as pd

from ecif.progress import Reporter, as_reporter
from ecif.run import EMBEDDINGS_FILE, INDEX_DIR, SCORES_FILE, Run

Modality = Literal["image", "text"]
MODALITIES: tuple[Modality, ...] = ("image", "text")
IVF_THRESHOLD = 1_000_000
ROWS_FILE = "rows.npy"
UIDS_FILE = "uids.npy"


def _normalised(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    faiss.normalize_L2(vectors)
    return vectors


def _make_index(vectors: np.ndarray) -> faiss.Index:
    n, dim = vectors.shape
    if n <= IVF_THRESHOLD:
        index = faiss.IndexFlatIP(dim)
    else:
        lists = int(4 * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors[np.random.default_rng(0).choice(n, min(n, 64 * lists), replace=False)])
        index.nprobe = 32
    index.add(vectors)
    return index


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
    def load(cls, run: Run) -> NeighbourIndex:
        """Open the index saved by :func:`build_run_index` (building it first if missing)."""
        folder = run.path(INDEX_DIR)
        if not all((folder / f).exists() for f in ("image.faiss", "text.faiss", ROWS_FILE, UIDS_FILE)):
            return build_run_index(run)
        indexes = {m: faiss.read_index(str(folder / f"{m}.faiss")) for m in MODALITIES}
        for index in indexes.values():
            if isinstance(index, faiss.IndexIVF):
                index.nprobe = 32
        return cls(indexes, np.load(folder / ROWS_FILE), np.load(folder / UIDS_FILE),
                   load_embeddings(run))

    def vector(self, row: int, by: Modality) -> np.ndarray:
        """The unit embedding of manifest ``row`` in modality ``by``, shaped [1, e]."""
        return _normalised(self.embeddings[by][row : row + 1])

    def search(self, query: np.ndarray, k: int, by: Modality = "image", least: bool = False,
               exclude_rows: Iterable[int] = ()) -> pd.DataFrame:
        """The ``k`` training pairs most (or least) similar to the unit vector ``query`` in the
        ``by`` index, skipping ``exclude_rows``; columns ``row``, ``uid``, ``similarity``."""
        excluded = np.unique(self._position.reindex(list(exclude_rows)).dropna().to_numpy(dtype=np.int64))
        params = None
        if len(excluded):
            params = faiss.SearchParameters(sel=faiss.IDSelectorNot(faiss.IDSelectorBatch(excluded)))
            if isinstance(self.indexes[by], faiss.IndexIVF):
                params = faiss.SearchParametersIVF(sel=params.sel, nprobe=self.indexes[by].nprobe)
        query = _normalised(-query if least else query)
        k = max(0, min(k, len(self.rows) - len(excluded)))
        if k == 0:
            return pd.DataFrame({"row": [], "uid": [], "similarity": []})
        scores, ids = self.indexes[by].search(query, k, params=params)
        found = ids[0] >= 0
        ids, scores = ids[0][found], scores[0][found]
        return pd.DataFrame({"row": self.rows[ids], "uid": self.uids[ids],
                             "similarity": -scores if least else scores})

    def similar(self, row: int, k: int = 10, by: Modality = "image", least: bool = False,
                exclude_rows: Iterable[int] = ()) -> pd.DataFrame:
        """Neighbours of manifest ``row`` (itself excluded) by image or by caption.

        ``exclude_rows`` is where the caller passes the dropped pairs, so the bin never shows up.
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


def build_run_index(run: Run, reporter: Reporter | None = None) -> NeighbourIndex:
    """Build and save ``RUN/index/{image,text}.faiss`` + the row and uid maps (pipeline stage
    "index"); returns the loaded index."""
    reporter = as_reporter(reporter)
    reporter.report("index", 0, len(MODALITIES))
    embeddings = load_embeddings(run)
    rows, uids = training_rows(run)
    folder = run.path(INDEX_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    indexes = {}
    for done, modality in enumerate(MODALITIES, start=1):
        indexes[modality] = _make_index(_normalised(embeddings[modality][rows]))
        # Write through a temporary name so a killed job never leaves a truncated index behind;
        # unique per thread because the app may build the index while the pipeline's stage does.
        temporary = folder / f".{modality}.faiss.{_unique()}.tmp"
        faiss.write_index(indexes[modality], str(temporary))
        temporary.replace(folder / f"{modality}.faiss")
        reporter.report("index", done, len(MODALITIES))
    for name, array in ((ROWS_FILE, rows), (UIDS_FILE, uids.astype(str))):
        temporary = folder / f".{name}.{_unique()}.tmp.npy"
        np.save(temporary, array)
        temporary.replace(folder / name)
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
