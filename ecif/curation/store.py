"""The curator's decisions about a run, kept in SQLite (``RUN/decisions.sqlite``).

Why SQLite in WAL mode with one short-lived connection per operation: Streamlit runs every browser
session in its own thread and a second ``ecif app`` may run in another process; WAL lets readers
work while one writer commits, and a fresh connection per call means no connection is ever shared
between threads.  Every decision is committed before the call returns, so a killed server
(SIGKILL included) loses nothing that the curator saw confirmed.

The table is an append-only log.  The current state of a pair is obtained by replaying its
decisions in order, skipping the ones an ``undo`` has reverted:

- ``accept``  -> status ``accepted`` (caption unchanged)
- ``relabel`` -> status ``relabelled``, caption = ``new_caption``
- ``drop``    -> status ``dropped`` (soft delete: the pair goes to the dropped bin)
- ``restore`` -> takes a pair out of the bin, back to the status it had before the drop
- ``undo``    -> reverts the most recent not-yet-undone decision *of the same session* (or, when the
  store has no session id, of anyone).  When that decision was part of a bulk action the whole batch
  is reverted, because the curator confirmed the batch as one action.  Undo records are kept in the
  log too (``target_id`` names the first reverted decision), so the history stays complete.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pandas as pd

Action = Literal["accept", "drop", "relabel", "restore", "undo"]
ACTIONS: tuple[str, ...] = ("accept", "drop", "relabel", "restore", "undo")
STATUSES: tuple[str, ...] = ("pending", "accepted", "relabelled", "dropped")
_STATUS_OF_ACTION = {"accept": "accepted", "relabel": "relabelled", "drop": "dropped"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    time          TEXT    NOT NULL,
    uid           TEXT,
    row           INTEGER,
    action        TEXT    NOT NULL,
    old_caption   TEXT,
    new_caption   TEXT,
    reason        TEXT,
    model_hash    TEXT,
    settings_hash TEXT,
    session_id    TEXT,
    batch_id      TEXT,
    target_id     INTEGER,
    undone        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS decisions_uid ON decisions(uid);
CREATE INDEX IF NOT EXISTS decisions_session ON decisions(session_id, undone);
"""

LOG_COLUMNS = [
    "id", "time", "uid", "row", "action", "old_caption", "new_caption", "reason", "model_hash",
    "settings_hash", "session_id", "batch_id", "target_id", "undone",
]
STATE_COLUMNS = ["uid", "row", "status", "caption", "scored_caption", "last_action", "last_time",
                 "decision_id"]


@dataclass(frozen=True)
class Target:
    """One pair a decision is about: its uid, manifest row, caption before the decision and the
    scores that motivated it (stored as JSON in ``reason``)."""

    uid: str
    row: int
    caption: str
    scores: Mapping[str, Any] | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _json(value: Mapping[str, Any] | None) -> str | None:
    if value is None:
        return None
    # Scores come from pandas rows: numpy scalars and NaN must survive as plain JSON.
    return json.dumps({k: (None if v != v else v) if isinstance(v, float) else v
                       for k, v in value.items()}, default=_jsonable, sort_keys=True)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


class DecisionStore:
    """Append-only decision log over SQLite; safe to share between threads and processes.

    ``model_hash`` and ``settings_hash`` are written on every record so each decision stays tied to
    the model state that motivated it; ``session_id`` scopes :meth:`undo`.
    """

    def __init__(self, path: str | Path, *, model_hash: str = "", settings_hash: str = "",
                 session_id: str | None = None, timeout_s: float = 30.0):
        self.path = Path(path)
        self.model_hash = model_hash
        self.settings_hash = settings_hash
        self.session_id = session_id
        self._timeout_s = timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as connection:
            connection.executescript(_SCHEMA)

    def with_session(self, session_id: str | None) -> DecisionStore:
        """The same store seen by another session (cheap; shares nothing mutable)."""
        return DecisionStore(self.path, model_hash=self.model_hash, settings_hash=self.settings_hash,
                             session_id=session_id, timeout_s=self._timeout_s)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        connection = sqlite3.connect(self.path, timeout=self._timeout_s, isolation_level=None)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            # FULL: the commit is on disk before we return, so a SIGKILL right after loses nothing.
            connection.execute("PRAGMA synchronous=FULL")
            yield connection
        finally:
            connection.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as connection:
            # IMMEDIATE takes the write lock up front, so the state read inside (old captions,
            # undo targets) cannot change before our insert.
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    # ------------------------------------------------------------------ writing
    def decide(self, action: Action, target: Target, new_caption: str | None = None) -> int:
        """Record one decision and return its id (committed on return)."""
        return self.bulk(action, [target], new_captions=None if new_caption is None else [new_caption],
                         batch=False)[0]

    def bulk(self, action: Action, targets: Sequence[Target],
             new_captions: Sequence[str] | None = None, *, batch: bool = True) -> list[int]:
        """Record the same action for many pairs in one transaction with a shared batch id.

        ``new_captions`` (one per target) is required for ``relabel``.  Returns the new ids.
        """
        if action not in ACTIONS or action == "undo":
            raise ValueError(f"unknown decision {action!r}; use one of accept, drop, relabel, restore "
                             "(undo has its own method)")
        if action == "relabel":
            if new_captions is None or len(new_captions) != len(targets):
                raise ValueError("relabel needs one new caption per pair")
            if any(not str(c).strip() for c in new_captions):
                raise ValueError("a new caption cannot be empty")
        batch_id = uuid.uuid4().hex if batch and len(targets) > 1 else None
        time = _now()
        ids: list[int] = []
        with self._transaction() as connection:
            for i, target in enumerate(targets):
                new_caption = new_captions[i].strip() if action == "relabel" else None
                cursor = connection.execute(
                    "INSERT INTO decisions (time, uid, row, action, old_caption, new_caption, reason,"
                    " model_hash, settings_hash, session_id, batch_id)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (time, target.uid, int(target.row), action, target.caption, new_caption,
                     _json(target.scores), self.model_hash, self.settings_hash, self.session_id,
                     batch_id),
                )
                ids.append(int(cursor.lastrowid))
        return ids

    def undo(self) -> list[int]:
        """Revert the most recent decision (or bulk batch) of this session; see the module doc.

        Returns the ids of the reverted decisions (empty when there is nothing to undo).
        """
        scope, params = ("session_id = ?", (self.session_id,)) if self.session_id else ("1 = 1", ())
        with self._transaction() as connection:
            last = connection.execute(
                f"SELECT id, batch_id FROM decisions WHERE {scope} AND action != 'undo' AND undone = 0"
                " ORDER BY id DESC LIMIT 1", params).fetchone()
            if last is None:
                return []
            last_id, batch_id = last
            if batch_id is None:
                reverted = [last_id]
            else:
                reverted = [r[0] for r in connection.execute(
                    "SELECT id FROM decisions WHERE batch_id = ? AND undone = 0 ORDER BY id", (batch_id,))]
            marks = ",".join("?" * len(reverted))
            connection.execute(f"UPDATE decisions SET undone = 1 WHERE id IN ({marks})", reverted)
            connection.execute(
                "INSERT INTO decisions (time, action, model_hash, settings_hash, session_id, batch_id,"
                " target_id, reason) VALUES (?, 'undo', ?, ?, ?, ?, ?, ?)",
                (_now(), self.model_hash, self.settings_hash, self.session_id, batch_id, reverted[0],
                 json.dumps({"reverted": reverted})),
            )
        return reverted

    # ------------------------------------------------------------------ reading
    def log(self) -> pd.DataFrame:
        """Every record, oldest first (undo records and undone decisions included)."""
        with self._connect() as connection:
            frame = pd.read_sql_query("SELECT * FROM decisions ORDER BY id", connection)
        return frame.reindex(columns=LOG_COLUMNS)

    def current_state(self) -> pd.DataFrame:
        """One row per decided uid: latest ``status`` and current ``caption`` (see module doc).

        Pairs never decided (or whose decisions were all undone) are ``pending``; they appear here
        only if they had a decision once, with status ``pending``.
        """
        with self._connect() as connection:
            rows = connection.execute(
                "SELECT id, time, uid, row, action, old_caption, new_caption FROM decisions"
                " WHERE action != 'undo' ORDER BY id").fetchall()
            undone = {r[0] for r in connection.execute("SELECT id FROM decisions WHERE undone = 1")}
        return _replay(rows, undone)

    def counts(self) -> dict[str, int]:
        """Number of decided pairs per status (``pending`` counts only pairs whose decisions were
        undone or restored; callers add the never-decided pairs they know about)."""
        status = self.current_state()["status"].value_counts()
        return {s: int(status.get(s, 0)) for s in STATUSES}


def _replay(rows: Iterable[tuple], undone: set[int]) -> pd.DataFrame:
    """Fold the effective decisions of each uid into its current status and caption."""
    state: dict[str, dict[str, Any]] = {}
    for decision_id, time, uid, row, action, old_caption, new_caption in rows:
        entry = state.setdefault(uid, {
            "uid": uid, "row": row, "status": "pending", "caption": old_caption,
            "scored_caption": old_caption, "before_drop": "pending",
            "last_action": None, "last_time": None, "decision_id": None,
        })
        if decision_id in undone:
            continue
        if action == "relabel":
            entry["caption"] = new_caption
        if action == "drop":
            if entry["status"] != "dropped":
                entry["before_drop"] = entry["status"]
            entry["status"] = "dropped"
        elif action == "restore":
            if entry["status"] == "dropped":
                entry["status"] = entry["before_drop"]
        else:
            entry["status"] = _STATUS_OF_ACTION[action]
        entry.update(last_action=action, last_time=time, decision_id=decision_id)
    frame = pd.DataFrame(list(state.values()), columns=[*STATE_COLUMNS, "before_drop"])
    frame = frame.drop(columns="before_drop")
    frame["row"] = frame["row"].astype("int64")
    return frame.sort_values("row", kind="stable").reset_index(drop=True)
