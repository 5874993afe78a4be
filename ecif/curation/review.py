"""The review queue: scores joined with decisions, filtered, sorted and acted on.

Everything the Review page shows or does goes through here, so the app stays a thin layer and the
same rules apply to the command line, the exports and the tests.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ecif.curation.store import STATUSES, Action, DecisionStore, Target
from ecif.paths import text_sha256
from ecif.run import DECISIONS_FILE, Run
from ecif.influence.columns import SUSPICION

def score_columns(table: pd.DataFrame) -> list[str]:
    """The score columns of ``scores.parquet`` present in ``table``, in a stable order (the keys of
    the engine's :data:`~ecif.tasks.detect.SUSPICION`, which says which end is suspicious)."""
    return [c for c in SUSPICION if c in table.columns]


def run_settings_hash(run: Run) -> str:
    """Hash of the run's settings as recorded in ``run.json`` (tied to every decision)."""
    info = run.info
    if info.get("settings_hash"):
        return str(info["settings_hash"])
    # Same recipe as the pipeline uses when it finishes, so the hash does not change at the end.
    return text_sha256(json.dumps(info.get("settings", {}), sort_keys=True, default=str))[:16]


def open_store(run: Run, session_id: str | None = None) -> DecisionStore:
    """The run's decision store, stamping decisions with its model and settings hashes."""
    return DecisionStore(run.path(DECISIONS_FILE), model_hash=str(run.info.get("model_hash", "")),
                         settings_hash=run_settings_hash(run), session_id=session_id)


def review_table(scores: pd.DataFrame, state: pd.DataFrame) -> pd.DataFrame:
    """Scores with each pair's ``status`` and current ``caption`` (relabels applied).

    ``scored_caption`` keeps the caption the scores were computed for.  Row order and index follow
    ``scores``; the index is the manifest ``row``.
    """
    table = scores.copy()
    table["scored_caption"] = table["caption"]
    table["status"] = "pending"
    if len(state):
        decided = state.set_index("row")
        hit = table["row"].isin(decided.index)
        rows = table.loc[hit, "row"]
        table.loc[hit, "status"] = decided.loc[rows, "status"].to_numpy()
        table.loc[hit, "caption"] = decided.loc[rows, "caption"].to_numpy()
    table.index = table["row"].to_numpy()
    return table


@dataclass
class Filters:
    """What the Review grid shows; every field is optional and ``Filters()`` shows everything.

    ``rows`` is an explicit selection (e.g. a lasso on the embedding map); when set it wins over the
    other filters, as curators expect from their tools.
    """

    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    statuses: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    text: str = ""
    corrupted: bool | None = None
    rows: list[int] | None = None

    def is_empty(self) -> bool:
        return self == Filters()


def apply_filters(table: pd.DataFrame, filters: Filters) -> pd.DataFrame:
    """The rows of ``table`` matching ``filters`` (order kept)."""
    if filters.rows is not None:
        return table[table["row"].isin(filters.rows)]
    keep = np.ones(len(table), dtype=bool)
    for column, (low, high) in filters.ranges.items():
        values = table[column].to_numpy(dtype=float)
        keep &= (values >= low) & (values <= high)
    if filters.statuses:
        keep &= table["status"].isin(filters.statuses).to_numpy()
    if filters.splits and "split" in table.columns:
        keep &= table["split"].isin(filters.splits).to_numpy()
    if filters.text:
        keep &= table["caption"].str.contains(filters.text, case=False, regex=False).to_numpy()
    if filters.corrupted is not None and "corrupted" in table.columns:
        keep &= (table["corrupted"].fillna(False).astype(bool) == filters.corrupted).to_numpy()
    return table[keep]


def sort_table(table: pd.DataFrame, by: str = "influence", descending: bool | None = None) -> pd.DataFrame:
    """Sort by any column; by default the suspicious end of a score comes first (most harmful)."""
    if descending is None:
        descending = SUSPICION.get(by, -1.0) > 0
    return table.sort_values(by, ascending=not descending, kind="stable", na_position="last")


def queue_counts(table: pd.DataFrame) -> dict[str, Any]:
    """Counts per status over the whole run plus the reviewed fraction of the ranked list."""
    counts = table["status"].value_counts()
    result: dict[str, Any] = {s: int(counts.get(s, 0)) for s in STATUSES}
    total = len(table)
    result["total"] = total
    result["reviewed"] = total - result["pending"]
    result["reviewed_fraction"] = result["reviewed"] / total if total else 0.0
    return result


# The statuses an action changes: a bulk action skips pairs it would leave as they are, so the
# log records only real changes and the confirmed count is the count that changes.
_CHANGES = {"accept": ("pending", "relabelled"), "drop": ("pending", "accepted", "relabelled"),
            "restore": ("dropped",)}


def actionable_rows(table: pd.DataFrame, action: str) -> list[int]:
    """The rows of ``table`` whose status ``action`` (accept, drop or restore) would change."""
    return table.index[table["status"].isin(_CHANGES[action])].tolist()


def targets(table: pd.DataFrame, rows: Sequence[int]) -> list[Target]:
    """Decision targets for ``rows`` carrying their current caption and scores (the 'why')."""
    columns = [*score_columns(table), *(c for c in ("rank", "suggested_action") if c in table.columns)]
    picked = table.loc[list(rows)]
    return [Target(uid=str(r.uid), row=int(r.row), caption=str(r.caption),
                   scores={c: getattr(r, c) for c in columns})
            for r in picked.itertuples(index=False)]


def decide(store: DecisionStore, table: pd.DataFrame, action: Action, rows: Sequence[int],
           new_captions: Sequence[str] | None = None) -> list[int]:
    """Record ``action`` for ``rows`` (one batch when more than one); returns decision ids."""
    picked = targets(table, rows)
    if len(picked) == 1:
        return [store.decide(action, picked[0], None if new_captions is None else new_captions[0])]
    return store.bulk(action, picked, new_captions)


def edit_spec(state: pd.DataFrame) -> tuple[list[int], dict[int, str]]:
    """The decisions as an edit: rows to drop and ``{row: new caption}`` for relabelled pairs that
    are not dropped (the shape ``ecif.predict_edit`` / ``ecif.apply_edit`` take)."""
    if not len(state):
        return [], {}
    drop = sorted(int(r) for r in state.loc[state["status"] == "dropped", "row"])
    changed = state[(state["status"] != "dropped") & (state["caption"] != state["scored_caption"])]
    return drop, {int(r): str(c) for r, c in zip(changed["row"], changed["caption"])}


def score_summary(row: Mapping[str, Any]) -> dict[str, float]:
    """The scores of one pair as plain floats, in display order."""
    return {c: float(row[c]) for c in SUSPICION if c in row and row[c] == row[c]}


def adjacent_row(table: pd.DataFrame, view: pd.DataFrame, row: int, by: str, reverse: bool,
                 step: int) -> int | None:
    """The pair before (``step=-1``) or after (``+1``) ``row`` among the rows of ``view``, in the
    order of :func:`sort_table` (reversed when ``reverse``).

    ``row`` itself may have left the view (accepted while the filter shows pending pairs): it is
    placed by the full table's order, so "next" still means the next one down the list.
    """
    order = sort_table(table, by)
    rows = order.index.to_numpy()[::-1] if reverse else order.index.to_numpy()
    position = int(np.flatnonzero(rows == row)[0])
    candidates = np.flatnonzero(np.isin(rows, view.index.to_numpy()))
    if step > 0:
        later = candidates[candidates > position]
        return int(rows[later[0]]) if len(later) else None
    earlier = candidates[candidates < position]
    return int(rows[earlier[-1]]) if len(earlier) else None
