"""A 2-D map of the run's embeddings for the Plots page (PCA, cached beside the faiss index)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ecif.index.neighbours import MODALITIES, Modality, load_embeddings, training_rows
from ecif.run import EMBEDDINGS_FILE, INDEX_DIR, Run, atomic_write_parquet


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """Project ``vectors`` [n, d] onto their first two principal components ([n, 2])."""
    centred = vectors - vectors.mean(axis=0, keepdims=True)
    # Thin SVD: the right singular vectors are the principal axes; cheap for d of a few hundred.
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    return centred @ axes[:2].T


def embedding_map(run: Run, by: Modality = "image") -> pd.DataFrame:
    """Training pairs' coordinates on the 2-D PCA map of their ``by`` embeddings: ``row``, ``x``,
    ``y``.  Cached as ``RUN/index/map_<by>.parquet`` (invalidated when the embeddings change)."""
    if by not in MODALITIES:
        raise ValueError(f"by must be one of {MODALITIES}")
    cache = run.path(INDEX_DIR) / f"map_{by}.parquet"
    source = run.path(EMBEDDINGS_FILE)
    if cache.exists() and cache.stat().st_mtime >= source.stat().st_mtime:
        return pd.read_parquet(cache)
    rows, _ = training_rows(run)
    xy = pca_2d(load_embeddings(run)[by][rows].astype(np.float64))
    frame = pd.DataFrame({"row": rows, "x": xy[:, 0], "y": xy[:, 1]})
    atomic_write_parquet(cache, frame)
    return frame
