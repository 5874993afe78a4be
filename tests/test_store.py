"""DecisionStore: decisions, undo, bulk batches, restore, concurrency and durability."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import ecif.curation.store
from ecif.curation.review import decide, edit_spec, open_store, queue_counts, review_table
from ecif.curation.store import DecisionStore, Target
from app_fixtures import build_synthetic_run


STORE_FILE = Path(ecif.curation.store.__file__)


def target(i: int, caption: str = "a cat") -> Target:
    return Target(uid=f"u{i}", row=i, caption=caption, scores={"influence": -0.5 * i, "rank": i})


@pytest.fixture
def store(tmp_path: Path) -> DecisionStore:
    return DecisionStore(tmp_path / "d.sqlite", model_hash="m", settings_hash="s", session_id="A")


def test_decisions_fold_into_state(store: DecisionStore) -> None:
    store.decide("accept", target(0))
    store.decide("relabel", target(1), new_caption="a dog")
    store.decide("drop", target(2))
    state = store.current_state().set_index("uid")
    assert state.loc["u0", "status"] == "accepted"
    assert (state.loc["u1", "status"], state.loc["u1", "caption"]) == ("relabelled", "a dog")
    assert state.loc["u2", "status"] == "dropped"
    assert store.counts() == {"pending": 0, "accepted": 1, "relabelled": 1, "dropped": 1}
    record = store.log().iloc[1]
    assert record["old_caption"] == "a cat" and record["new_caption"] == "a dog"
    assert record["model_hash"] == "m" and record["settings_hash"] == "s" and record["session_id"] == "A"
    assert json.loads(record["reason"]) == {"influence": -0.5, "rank": 1}
    assert record["time"].endswith("+00:00")


def test_restore_returns_to_status_before_drop(store: DecisionStore) -> None:
    store.decide("relabel", target(0), new_caption="a dog")
    store.decide("drop", target(0, "a dog"))
    store.decide("restore", target(0, "a dog"))
    row = store.current_state().iloc[0]
    assert (row["status"], row["caption"]) == ("relabelled", "a dog")


def test_undo_is_per_session_and_reverts_whole_batch(store: DecisionStore) -> None:
    other = store.with_session("B")
    store.bulk("drop", [target(0), target(1), target(2)])
    relabel_id = store.decide("relabel", target(3), new_caption="x")
    other.decide("accept", target(5))
    assert store.undo() == [relabel_id]  # this session's last decision, not B's later accept
    reverted = store.undo()  # the three-pair batch, in one step
    assert len(reverted) == 3
    state = store.current_state().set_index("uid")["status"]
    assert set(state[["u0", "u1", "u2", "u3"]]) == {"pending"}
    assert state["u5"] == "accepted"
    assert store.undo() == []
    log = store.log()
    assert (log["action"] == "undo").sum() == 2 and log["undone"].sum() == 4


def test_bulk_shares_batch_id_and_validates(store: DecisionStore) -> None:
    ids = store.bulk("accept", [target(i) for i in range(5)])
    log = store.log().set_index("id").loc[ids]
    assert log["batch_id"].nunique() == 1 and log["batch_id"].notna().all()
    with pytest.raises(ValueError):
        store.bulk("relabel", [target(0)], new_captions=[" "])
    with pytest.raises(ValueError):
        store.decide("undo", target(0))


def test_concurrent_threads_lose_nothing(store: DecisionStore) -> None:
    def worker(k: int) -> None:
        mine = store.with_session(f"s{k}")
        for i in range(20):
            mine.decide("accept", target(100 * k + i))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.log()) == 80 and store.counts()["accepted"] == 80


def test_committed_decision_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "d.sqlite"
    # Load store.py by file: importing the ecif package would load torch, which is slow and beside
    # the point here (the store needs only the standard library and pandas).
    script = (
        "import os, signal, sys, importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('store', {str(STORE_FILE)!r})\n"
        "store = sys.modules['store'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(store)\n"
        "DecisionStore, Target = store.DecisionStore, store.Target\n"
        f"s = DecisionStore({str(path)!r})\n"
        "s.decide('drop', Target('u1', 1, 'a cat'))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env={**os.environ}, timeout=60)
    assert result.returncode == -signal.SIGKILL
    assert DecisionStore(path).current_state()["status"].tolist() == ["dropped"]


def test_review_table_and_edit_spec(tmp_path: Path) -> None:
    run = build_synthetic_run(tmp_path / "run")
    store = open_store(run, "S")
    table = review_table(run.scores(), store.current_state())
    decide(store, table, "drop", [0, 1])
    decide(store, table, "relabel", [2], ["a new caption"])
    table = review_table(run.scores(), store.current_state())
    assert table.loc[2, "caption"] == "a new caption" and table.loc[2, "scored_caption"] != "a new caption"
    counts = queue_counts(table)
    assert counts["dropped"] == 2 and counts["relabelled"] == 1 and counts["reviewed"] == 3
    assert edit_spec(store.current_state()) == ([0, 1], {2: "a new caption"})
    assert store.log()["model_hash"].iloc[0] == "synthetic-model-hash"
    assert json.loads(store.log()["reason"].iloc[0])["rank"] == int(table.loc[0, "rank"])


def test_actionable_rows(tmp_path: Path) -> None:
    from ecif.curation.review import actionable_rows

    run = build_synthetic_run(tmp_path / "run", n_train=6, n_val=2)
    store = open_store(run, "S")
    decide(store, review_table(run.scores(), store.current_state()), "drop", [0])
    decide(store, review_table(run.scores(), store.current_state()), "accept", [1])
    table = review_table(run.scores(), store.current_state())
    assert actionable_rows(table, "restore") == [0]
    assert actionable_rows(table, "accept") == [2, 3, 4, 5]
    assert actionable_rows(table, "drop") == [1, 2, 3, 4, 5]
