"""faiss nearest neighbours over a run's embeddings, caption suggestions and the 2-D map."""

from ecif.index.neighbours import (IndexConfig, NeighbourIndex, StaleIndexError, build_run_index,
                                   suggest_caption)
from ecif.index.projection import embedding_map, pca_2d

__all__ = ["IndexConfig", "NeighbourIndex", "StaleIndexError", "build_run_index", "embedding_map",
           "pca_2d", "suggest_caption"]
