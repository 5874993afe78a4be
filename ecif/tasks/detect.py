"""Misalignment detection (docs/method.md §7): flag pairs, and measure every score against ground truth.

Each score column has a direction in which it is suspicious; :data:`SUSPICION` turns it into a
"higher = more suspicious" number so every column is compared the same way.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from ecif.influence.columns import DETECTION_COLUMNS, SUSPICION


def suspicion(scores: pd.DataFrame, column: str) -> np.ndarray:
    """``column`` oriented so that higher is more suspicious."""
    return SUSPICION[column] * scores[column].to_numpy(dtype=float)


def flag(
    scores: pd.DataFrame,
    method: Literal["influence", "self_influence", "self_influence_first_order"] = "influence",
    top_k: int | None = None,
    threshold: float | None = None,
) -> pd.DataFrame:
    """Flagged pairs, most suspicious first.

    ``method="influence"`` uses harm on the trusted set; the self-influences need no trusted set
    (``"self_influence_first_order"`` is the better detector of wrong captions in bench/detect).
    Give ``top_k`` or a ``threshold`` on the oriented score (for influence: flag when
    ``influence < -threshold``); with neither, every pair with harmful influence is flagged
    (``influence < 0``), or for self-influence the top 10%.
    """
    if method not in scores.columns:
        raise ValueError(
            f"the scores have no {method!r} column (scored by an older ecif version); "
            "rerun the scoring (`ecif score` with the same --out) to add it"
        )
    oriented = suspicion(scores, method)
    order = np.argsort(-oriented, kind="stable")
    if top_k is not None:
        chosen = order[:top_k]
    elif threshold is not None:
        chosen = order[oriented[order] > threshold]
    elif method == "influence":
        chosen = order[oriented[order] > 0]
    else:
        chosen = order[: max(1, int(round(0.1 * len(scores))))]
    flagged = scores.iloc[chosen].copy()
    flagged["suspicion"] = oriented[chosen]
    return flagged.reset_index(drop=True)


def detection_report(
    scores: pd.DataFrame, truth: str = "corrupted", columns: tuple[str, ...] = DETECTION_COLUMNS, ks: tuple[int, ...] = (50, 100)
) -> pd.DataFrame:
    """AUROC, average precision and precision@k of every score column against ground truth.

    One row per column present in ``scores``; ``base_rate`` is the fraction of truly misaligned
    pairs (what a random ranking's average precision would be).
    """
    if truth not in scores.columns:
        raise ValueError(f"no ground-truth column {truth!r} in the scores (only planted demo data has one)")
    labels = scores[truth].astype(bool).to_numpy()
    if labels.all() or not labels.any():
        raise ValueError(f"ground truth {truth!r} has a single class; detection metrics are undefined")
    rows = []
    for column in columns:
        if column not in scores.columns:
            continue
        oriented = suspicion(scores, column)
        order = np.argsort(-oriented, kind="stable")
        row = {
            "score": column,
            "auroc": roc_auc_score(labels, oriented),
            "average_precision": average_precision_score(labels, oriented),
        }
        for k in ks:
            row[f"precision@{k}"] = float(labels[order[:k]].mean())
        row["base_rate"] = float(labels.mean())
        rows.append(row)
    return pd.DataFrame(rows)


def precision_recall(scores: pd.DataFrame, column: str, truth: str = "corrupted") -> pd.DataFrame:
    """Precision/recall curve of one score column (for the app's plots)."""
    precision, recall, _ = precision_recall_curve(scores[truth].astype(bool).to_numpy(), suspicion(scores, column))
    return pd.DataFrame({"recall": recall, "precision": precision, "score": column})
