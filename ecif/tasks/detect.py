"""Misalignment detection (docs/method.md §7): flag pairs, and measure every score against ground truth.

Each score column has a direction in which it is suspicious; :data:`SUSPICION` turns it into a
"higher = more suspicious" number so every column is compared the same way.  The default detector,
:data:`MISALIGNMENT`, combines the two columns that find wrong captions best (bench/detect_sweep.py):
neither wins everywhere, and their mean weighted by how sharply each singles pairs out is within 0.01
average precision of the best single column in every setting measured (docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from ecif.influence.columns import DETECTION_COLUMNS, MISALIGNMENT, SUSPICION

MISALIGNMENT_INPUTS = ("clip_score", "self_influence_first_order")


def standardised(values: np.ndarray) -> np.ndarray:
    """``(x − mean) / sd`` over the run's training pairs (zeros where every value is the same)."""
    values = np.asarray(values, dtype=float)
    spread = values.std()
    return (values - values.mean()) / spread if spread > 0 else np.zeros_like(values)


#: A view's weight is the fraction of pairs it places beyond this many standard deviations above its mean.
OUTLIER_Z = 2.0
#: The smallest weight, so a view with no outliers still breaks the other's ties.
_MIN_WEIGHT = 1e-3


def outlier_weight(z_scores: np.ndarray) -> float:
    """How sharply one standardised view singles pairs out: the fraction beyond :data:`OUTLIER_Z` (≥ ``_MIN_WEIGHT``).

    A view that separates a group of wrong captions puts that group in its upper tail (about the noise
    rate beyond 2σ); a view that does not is close to bell-shaped (about 2% beyond 2σ, fewer when it is
    light-tailed).  The weight reads only the view's own distribution, never labels.
    """
    return max(float((np.asarray(z_scores) > OUTLIER_Z).mean()), _MIN_WEIGHT)


def misalignment(clip_score: np.ndarray, self_influence_first_order: np.ndarray) -> np.ndarray:
    """The default detector ``[N]``: a weighted mean of ``z(−clip_score)`` and ``z(log self_influence_first_order)``,
    in standard deviations.

    Higher = more likely a wrong caption.  A poor image–caption match (low CLIP-score) and a pair the
    fine-tune cannot fit without bending the heads (high self-influence) are two views of the same
    fault; which view is sharper depends on the backbone and the kind of corruption (a backbone that
    has absorbed swapped attributes leaves self-influence almost blind to them).  Each view is weighted
    by :func:`outlier_weight`, the fraction of pairs it puts beyond 2σ, so the view that singles out a
    group counts for more.  Over the 30 settings of bench/detect_sweep.py this stays within 0.01 AP
    of the sharper single column everywhere, including runs made after it was chosen (an equal-weight
    sum missed in two settings, by up to 0.046 on a single run).
    Self-influence spans orders of magnitude, so it enters by its logarithm: standardised raw, its
    few largest values outweigh the CLIP-score where that is the sharper view.  Nothing is fitted to
    labels: the z-scores and weights use the run's own pairs.
    """
    views = misalignment_views(clip_score, self_influence_first_order)
    weights = np.array([outlier_weight(view) for view in views])
    return sum(weight * view for weight, view in zip(weights, views)) / weights.sum()


def misalignment_views(clip_score: np.ndarray, self_influence_first_order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The detector's two standardised views ``([N], [N])``: ``z(−clip_score)`` and ``z(log self_influence_first_order)``."""
    self_influence = np.asarray(self_influence_first_order, dtype=float)
    positive = self_influence[self_influence > 0]
    floor = positive.min() if positive.size else 1.0  # a self-influence is ≥ 0; a zero ranks with the smallest
    return standardised(-np.asarray(clip_score, float)), standardised(np.log(np.maximum(self_influence, floor)))


def with_misalignment(scores: pd.DataFrame) -> pd.DataFrame:
    """``scores`` with the :data:`MISALIGNMENT` column computed from its inputs; unchanged when an input is missing.

    It is recomputed even where the file already has one, so runs scored under an earlier definition
    (or before the column existed) rank by the current one; it costs O(N).
    """
    if not all(column in scores.columns for column in MISALIGNMENT_INPUTS):
        return scores
    out = scores.copy()
    out[MISALIGNMENT] = misalignment(*(out[column].to_numpy(dtype=float) for column in MISALIGNMENT_INPUTS))
    return out


def default_detector(scores: pd.DataFrame) -> str:
    """:data:`MISALIGNMENT` where it can be computed, else ``self_influence_first_order`` (streamed scores)."""
    computable = MISALIGNMENT in scores.columns or all(column in scores.columns for column in MISALIGNMENT_INPUTS)
    return MISALIGNMENT if computable else "self_influence_first_order"


def suspicion(scores: pd.DataFrame, column: str) -> np.ndarray:
    """``column`` oriented so that higher is more suspicious."""
    return SUSPICION[column] * scores[column].to_numpy(dtype=float)


def flag(
    scores: pd.DataFrame,
    method: str | None = None,
    top_k: int | None = None,
    threshold: float | None = None,
) -> pd.DataFrame:
    """Flagged pairs, most suspicious first.

    ``method``: a score column of :data:`DETECTION_COLUMNS`; default :func:`default_detector`
    (:data:`MISALIGNMENT`, the detector of wrong captions).  ``"influence"`` answers a different
    question: which pairs to remove to lower the trusted-set loss of this model.
    Give ``top_k`` or a ``threshold`` on the oriented score (for influence: flag when
    ``influence < -threshold``); with neither, every pair with harmful influence is flagged
    (``influence < 0``), or for the other columns the top 10%.
    """
    scores = with_misalignment(scores)
    method = method or default_detector(scores)
    if method not in SUSPICION:
        raise ValueError(f"unknown detector {method!r}; choose one of {', '.join(DETECTION_COLUMNS)}")
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
    scores = with_misalignment(scores)
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
