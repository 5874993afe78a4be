"""The score columns of a run's tables, each defined once: name, sign, unit, meaning, and which path writes it.

Both scoring paths read this schema: the in-memory pipeline (``scores.parquet``) writes every column;
streamed scoring (``ecif score-features``, one shard at a time) writes those marked ``streamed``
and says why it cannot write the others.  Detection, the app's sort menu, the command line's
choices and the README's column table all derive from :data:`SCORE_COLUMNS`.

Sign convention: an influence is the predicted change of the trusted-set loss if the pair is
removed, in the loss's own units (nats per trusted pair).  **Negative = harmful** (removing the pair
lowers the loss), positive = valuable.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScoreColumn:
    """One score column.

    ``suspicious_sign``: the sign that turns the column into "higher = more suspicious" (−1 for an
    influence, where harmful is negative; +1 for a self-influence or a loss).  ``detector``: compared
    against planted misaligned pairs by :func:`ecif.tasks.detect.detection_report`.  ``streamed``:
    written by streamed scoring too; ``not_streamed_because`` says why not when it is not.
    """

    name: str
    suspicious_sign: float
    unit: str
    meaning: str
    detector: bool = True
    streamed: bool = True
    not_streamed_because: str = ""


_NO_PAIR_EMBEDDINGS = ("streamed scoring keeps no per-pair embeddings or losses; the feature store's "
                       "pre-projection features give them with one more pass (not done yet)")

#: The default detector of misaligned pairs (`ecif detect`, the Review page's first order); bench/detect_sweep.py measures it.
MISALIGNMENT = "misalignment"

SCORE_COLUMNS: tuple[ScoreColumn, ...] = (
    ScoreColumn(MISALIGNMENT, 1.0, "standard deviations",
                "**the detector of wrong captions** (the default order): how far the pair's CLIP-score lies below the "
                "run's mean and how far the logarithm of its first-order self-influence lies above its mean, in "
                "standard deviations, averaged with more weight on whichever singles out more pairs; high = likely misaligned",
                streamed=False, not_streamed_because="it needs `clip_score`, which streamed scoring does not write; "
                "`self_influence_first_order` is the detector there"),
    ScoreColumn("influence", -1.0, "nats",
                "ECIF (exact removal): predicted change of the trusted (validation) contrastive loss if the pair is removed; "
                "negative = harmful"),
    ScoreColumn("influence_pos", -1.0, "nats",
                "the part due to the pair's positive role (its own image→text and text→image terms): the classical "
                "influence function, which sees only this role"),
    ScoreColumn("influence_neg", -1.0, "nats",
                "the part due to its negative role (it leaves every other pair's softmax denominator); "
                "`influence_pos + influence_neg = influence`", detector=False),
    ScoreColumn("influence_first_order", -1.0, "nats",
                "ECIF with the paper's first-order negative term `Σ P_kn + Q_kn` (less accurate for hard negatives)"),
    ScoreColumn("influence_neg_first_order", -1.0, "nats", "the first-order negative term alone", detector=False),
    ScoreColumn("self_influence", 1.0, "nats²",
                "`∇gᵀ H⁻¹ ∇g / N` of the pair's own terms: high = the model cannot fit it (a mislabel signal that needs "
                "no trusted set)"),
    ScoreColumn("self_influence_first_order", 1.0, "nats²",
                "the same with the first-order negative term: the better self-influence for finding wrong captions"),
    ScoreColumn("clip_score", -1.0, "cosine",
                "cosine of image and caption under the fine-tuned heads (low = poor match)",
                streamed=False, not_streamed_because=_NO_PAIR_EMBEDDINGS),
    ScoreColumn("loss", 1.0, "nats", "the pair's own contrastive loss (high = poor match)",
                streamed=False, not_streamed_because=_NO_PAIR_EMBEDDINGS),
)
#: Columns of ``scores.parquet`` derived from the scores (in-memory path only): name → meaning.
DERIVED_COLUMNS = {
    "rank": "1 = most harmful (by `influence`)",
    "suggested_action": "`drop` / `relabel` / `keep`, proposed from the scores (the curator decides)",
}

#: column → sign that makes "higher = more suspicious".
SUSPICION: dict[str, float] = {column.name: column.suspicious_sign for column in SCORE_COLUMNS}
DETECTION_COLUMNS = tuple(column.name for column in SCORE_COLUMNS if column.detector)
INFLUENCE_COLUMNS = tuple(column.name for column in SCORE_COLUMNS if column.name.startswith(("influence", "self_influence")))
#: what :class:`ecif.influence.scores.PairInfluence` holds: one influence per pair along ``H⁻¹∇φ``.
DIRECTIONAL_COLUMNS = tuple(name for name in INFLUENCE_COLUMNS if name.startswith("influence"))
SELF_INFLUENCE_COLUMNS = {"self_influence": "exact", "self_influence_first_order": "first_order"}


def markdown_table() -> str:
    """The README's column table, generated from this schema (a test keeps the README in step)."""
    lines = ["| column | meaning | unit |", "|---|---|---|"]
    lines += [f"| `{column.name}` | {column.meaning} | {column.unit} |" for column in SCORE_COLUMNS]
    lines += [f"| `{name}` | {meaning} | |" for name, meaning in DERIVED_COLUMNS.items()]
    return "\n".join(lines)
