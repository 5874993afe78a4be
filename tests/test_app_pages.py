"""Page wiring of the Streamlit app with streamlit.testing (AppTest) against a synthetic run.

AppTest does not drive fragments or the browser (keyboard shortcuts, the lasso); those are covered
by the job-manager tests and the browser test.  Here: every page renders, decisions reach SQLite,
filters change the count, the detail view opens from ``?uid=``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest
from app_fixtures import build_synthetic_run
from streamlit.testing.v1 import AppTest
from streamlit.util import calc_hash

from ecif.curation.review import open_store
from ecif.tasks.detect import with_misalignment

APP = str(Path(__file__).resolve().parents[1] / "app" / "main.py")
PAGES = ("load", "review", "mispredictions", "whatif", "plots", "export")


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ECIF_CACHE", str(tmp_path / "cache"))  # never touch the real demo run
    return build_synthetic_run(tmp_path / "run", n_train=40, n_val=12)


def app(run, page: str = "review", **params: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["run"] = str(run.directory)
    for key, value in params.items():
        at.query_params[key] = value
    if page != "review":
        # Pages are callables registered with st.navigation; AppTest.switch_page only knows files,
        # so select the page by the hash Streamlit gives a url_path.
        at._page_hash = calc_hash(page)
    return at.run()


def match_count(at: AppTest) -> int:
    text = next(m.value for m in at.sidebar.markdown if " pairs match" in m.value)
    return int(text.split("**")[1])


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders(run, page: str) -> None:
    at = app(run, page)
    assert not at.exception, at.exception
    assert at.header[0].value.lower().replace("-", "").startswith(page[:4].replace("-", ""))


def test_grid_shows_a_page_of_cards_most_likely_misaligned_first(run) -> None:
    at = app(run)
    opens = [b for b in at.button if b.key and b.key.startswith("grid_open_")]
    assert len(opens) == 24
    first = int(opens[0].key.rsplit("_", 1)[1])
    assert first == int(with_misalignment(run.scores()).sort_values("misalignment", ascending=False)["row"].iloc[0])
    assert "most likely misaligned first" in at.header[0].value
    at.selectbox(key="sort").set_value("influence").run()
    opens = [b for b in at.button if b.key and b.key.startswith("grid_open_")]
    assert int(opens[0].key.rsplit("_", 1)[1]) == int(run.scores().sort_values("influence")["row"].iloc[0])
    assert "most harmful first" in at.header[0].value
    assert match_count(at) == 40


def test_card_button_writes_decision(run) -> None:
    at = app(run)
    drop = next(b for b in at.button if b.key and b.key.startswith("grid_drop_"))
    row = int(drop.key.rsplit("_", 1)[1])
    drop.click().run()
    assert not at.exception
    state = open_store(run).current_state()
    assert state.set_index("row").loc[row, "status"] == "dropped"
    assert any(b.key == f"grid_res_{row}" for b in at.button)  # the card now offers restore
    at.button(key="undo").click().run()
    assert open_store(run).current_state().set_index("row").loc[row, "status"] == "pending"


def test_filters_change_the_count(run) -> None:
    at = app(run)
    at.text_input(key="q").input("circle").run()
    expected = int(run.scores()["caption"].str.contains("circle").sum())
    assert match_count(at) == expected
    at.segmented_control(key="corrupted").set_value("yes").run()
    scores = run.scores()
    assert match_count(at) == int((scores["caption"].str.contains("circle") & scores["corrupted"]).sum())
    at.button(key="clear_filters").click().run()
    assert match_count(at) == 40


def test_bulk_action_needs_confirmation(run) -> None:
    at = app(run)
    at.segmented_control(key="corrupted").set_value("yes").run()
    n = match_count(at)
    at.radio(key="bulk_action").set_value("drop").run()
    assert at.button(key="bulk_go").disabled
    at.checkbox(key="bulk_confirm").check().run()
    at.button(key="bulk_go").click().run()
    assert not at.exception
    log = open_store(run).log()
    assert len(log) == n and log["batch_id"].nunique() == 1 and set(log["action"]) == {"drop"}


def test_detail_view_from_uid(run) -> None:
    scores = with_misalignment(run.scores()).sort_values("misalignment", ascending=False)
    uid, second = scores["uid"].iloc[0], scores["uid"].iloc[1]
    at = app(run, uid=uid)
    assert not at.exception
    assert at.button(key="prev").disabled and not at.button(key="next").disabled
    at.button(key="accept").click().run()
    assert open_store(run).current_state()["uid"].tolist() == [uid]
    assert at.query_params["uid"] == second  # advanced to the next pair
    at.button(key="use_suggestion").click().run()
    state = open_store(run).current_state().set_index("uid")
    assert state.loc[second, "status"] == "relabelled"
    assert state.loc[second, "caption"] != scores["caption"].iloc[1]


def test_relabel_with_typed_caption(run) -> None:
    uid = run.scores()["uid"].iloc[5]
    at = app(run, uid=uid)
    at.toggle(key="advance").set_value(False).run()
    at.text_input(key="caption_5").input("a typed caption").run()
    at.button(key="relabel").click().run()
    assert open_store(run).current_state().set_index("uid").loc[uid, "caption"] == "a typed caption"


def test_export_page_writes_files(run, tmp_path: Path) -> None:
    at = app(run, "export")
    at.text_input(key="export_dir").input(str(tmp_path / "out")).run()
    at.button(key="export_go").click().run()
    assert not at.exception
    assert (tmp_path / "out" / "train.csv").exists() and (tmp_path / "out" / "train_uids.txt").exists()
    assert (tmp_path / "out" / "val.csv").exists() and (tmp_path / "out" / "test.csv").exists()


def test_launch_run_is_scored_in_the_background(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """First launch on the demo folder: scoring starts by itself, progress shows, results appear."""
    import threading

    from ecif.jobs.launch import run_dir_for
    from ecif.jobs.manager import read_status

    monkeypatch.setenv("ECIF_CACHE", str(tmp_path / "cache"))
    gate = threading.Event()

    def fake_pipeline(config, reporter) -> None:
        for _ in reporter.iterate(range(3), "features"):
            gate.wait(20)
        build_synthetic_run(config.run_dir, n_train=30, n_val=6)

    monkeypatch.setattr("ecif.tasks.pipeline.run_pipeline", fake_pipeline)
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    status = read_status(run_dir_for())
    assert status is not None and status["state"] == "running"
    assert "Scoring this run in the background" in at.info[0].value
    assert any(b.key == "cancel_job" for b in at.sidebar.button)
    gate.set()
    deadline = time.monotonic() + 20
    while read_status(run_dir_for())["state"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    at.run()
    assert not at.exception and match_count(at) == 30


def test_review_page_of_5000_pairs_renders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its speed is measured by bench/review_page.py, not asserted here.
    monkeypatch.setenv("ECIF_CACHE", str(tmp_path / "cache"))
    big = build_synthetic_run(tmp_path / "big", n_train=5000, n_val=50)
    at = app(big)
    assert not at.exception
    assert match_count(at) == 5000


def test_misprediction_trace_shows_culprits_with_decisions(run, monkeypatch: pytest.MonkeyPatch) -> None:
    import ecif

    calls = []

    def fake_trace(run_, uid, top_k=20, relative=True, rank_by="total"):
        calls.append((uid, top_k, relative, rank_by))
        scores = run_.scores().sort_values("influence")
        culprits, supporters = scores.head(3), scores.tail(2)
        # Item-level values that no run-level column has, so the cards must be showing the trace's.
        return pd.concat([culprits.assign(role="culprit"), supporters.assign(role="supporter")]).assign(
            influence_pos=[-0.7131, -0.5131, -0.3131, 0.2131, 0.4131], influence_neg=[0.0641, -0.1871, 0.0, 0.0, 0.0],
            score=[-1.2345, -0.5432, -0.1111, 0.2222, 0.9876])[
            ["row", "uid", "influence", "influence_pos", "influence_neg", "score", "role"]]

    monkeypatch.setattr(ecif, "trace", fake_trace)
    item = run.mispredictions().query("not correct")["uid"].iloc[0]
    at = app(run, "mispredictions", item=item)
    assert not at.exception and calls == [([item], 8, True, "total")]
    cards = " ".join(element.value for element in at.get("html"))
    # The trace's score and role bars, written by ecif.curation.units.si_format (true minus sign).
    assert "score −1.23" in cards and "−0.713" in cards and "+0.0641" in cards
    at.radio(key="mp_rank_by").set_value("positive role only (own caption)").run()
    assert not at.exception and calls[-1] == ([item], 8, True, "positive")
    assert any("through their own caption" in header.value for header in at.subheader)
    at.toggle(key="mp_relative").set_value(False).run()
    assert not at.exception and calls[-1] == ([item], 8, False, "positive")
    culprit_drops = [b for b in at.button if b.key and b.key.startswith("trace_culprit_drop_")]
    assert len(culprit_drops) == 3
    culprit_drops[0].click().run()
    row = int(culprit_drops[0].key.rsplit("_", 1)[1])
    assert open_store(run).current_state().set_index("row").loc[row, "status"] == "dropped"


def test_a_confusion_is_traced_together_and_kept_in_the_url(run, monkeypatch: pytest.MonkeyPatch) -> None:
    import ecif
    from ecif.tasks.trace import confusion_items, confusions

    calls = []

    def fake_trace(run_, uid, top_k=20, relative=True, rank_by="total"):
        calls.append(uid)
        scores = run_.scores().sort_values("influence")
        return pd.concat([scores.head(2).assign(role="culprit"), scores.tail(2).assign(role="supporter")]).assign(
            score=[-2.0, -1.0, 1.0, 2.0])[["row", "uid", "influence", "influence_pos", "influence_neg", "score", "role"]]

    monkeypatch.setattr(ecif, "trace", fake_trace)
    first = confusions(run).iloc[0]
    key, uids = f"{first.label}:{first.predicted}", confusion_items(run, first.label, first.predicted)
    at = app(run, "mispredictions", item=str(run.mispredictions()["uid"].iloc[-1]))
    at.selectbox(key="mp_confusion").set_value(key).run()
    assert not at.exception and calls[-1] == uids
    assert at.query_params["confusion"] == key and "item" not in at.query_params
    assert any(f"of class {first.label} predicted as {first.predicted}" in m.value for m in at.markdown)
    calls.clear()
    # A shared link opens the same trace; one with both parameters opens the confusion and forgets the item.
    reloaded = app(run, "mispredictions", confusion=key, item=str(run.mispredictions()["uid"].iloc[-1]))
    assert not reloaded.exception and calls == [uids] and "item" not in reloaded.query_params
    reloaded.selectbox(key="mp_confusion").set_value(None).run()
    assert not reloaded.exception and "confusion" not in reloaded.query_params
    assert calls == [uids]  # nothing traced once the confusion is cleared


def test_culprits_are_dropped_together_after_seeing_the_predicted_effect(run, monkeypatch: pytest.MonkeyPatch) -> None:
    import ecif

    scores = run.scores().sort_values("influence")
    culprit_rows = scores["row"].head(3).tolist()

    def fake_trace(run_, uid, top_k=20, relative=True, rank_by="total"):
        return pd.concat([scores.head(3).assign(role="culprit"), scores.tail(2).assign(role="supporter")]).assign(
            score=[-3.0, -2.0, -1.0, 1.0, 2.0])[["row", "uid", "influence", "influence_pos", "influence_neg", "score", "role"]]

    asked = []

    def fake_predict_items(run_, uids, drop_rows=(), relabel=None, refit=False):
        asked.append((uids, list(drop_rows), refit))
        return pd.DataFrame({"uid": uids, "label": ["square"], "predicted_before": ["circle"], "predicted_after": ["square"],
                             "correct_before": [False], "correct_after": [True],
                             "loss_before": [2.5], "loss_after": [0.25 if refit else 0.5]})

    monkeypatch.setattr(ecif, "trace", fake_trace)
    monkeypatch.setattr(ecif, "predict_items", fake_predict_items)
    item = run.mispredictions().query("not correct")["uid"].iloc[0]
    at = app(run, "mispredictions", item=item)
    at.button(key="mp_effect_closed").click().run()
    assert not at.exception and asked == [([item], culprit_rows, False)]
    assert any("Closed form" in m.value and "2.500 → 0.500" in m.value and "0 → 1" in m.value for m in at.markdown)
    at.button(key="mp_effect_refit").click().run()
    assert not at.exception and asked[-1] == ([item], culprit_rows, True)
    assert any("Re-fine-tuned" in m.value and "2.500 → 0.250" in m.value for m in at.markdown)
    assert at.button(key="mp_drop_go").disabled and open_store(run).current_state().empty  # not until confirmed
    at.checkbox(key="mp_drop_confirm").check().run()
    at.button(key="mp_drop_go").click().run()
    assert not at.exception
    assert (open_store(run).current_state().set_index("row").loc[culprit_rows, "status"] == "dropped").all()


def test_whatif_passes_decisions_to_the_engine(run, monkeypatch: pytest.MonkeyPatch) -> None:
    import ecif
    from ecif.curation.review import decide, review_table
    from ecif.tasks.edit import EditMetrics, EditResult

    seen = {}

    def fake_predict(run_, drop_rows, relabel):
        seen.update(drop=drop_rows, relabel=relabel)
        return EditResult(method="closed form", dropped=2, relabelled=1,
                          before=EditMetrics(1.0, 0.5, 0.6, 0.6), after=EditMetrics(0.9, 0.55, 0.7, 0.65),
                          seconds=0.1, parameter_change=0.01)

    monkeypatch.setattr(ecif, "predict_edit", fake_predict)
    store = open_store(run, "S")
    table = review_table(run.scores(), store.current_state())
    decide(store, table, "drop", [1, 4])
    decide(store, table, "relabel", [2], ["a new caption"])
    at = app(run, "whatif")
    at.button(key="whatif_go_predicted").click().run()
    assert not at.exception
    assert seen == {"drop": [1, 4], "relabel": {2: "a new caption"}}
    shown = at.dataframe[0].value
    assert shown.loc["trusted_loss", "before"] == 1.0
    assert shown.loc["trusted_loss", "predicted (no retraining)"] == 0.9


def test_load_page_checks_manifest_and_starts_scoring(run, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from ecif.jobs.manager import read_status

    image = run.manifest()["filepath"].iloc[0]
    manifest = tmp_path / "mine.csv"
    pd.DataFrame({"filepath": [image, "/nowhere/missing.png", image],
                  "caption": ["a shape", "lost", "another shape"]}).to_csv(manifest, index=False)
    started = []
    monkeypatch.setattr("ecif.tasks.pipeline.run_pipeline", lambda config, reporter: started.append(config))
    at = app(run, "load")
    at.text_input(key="load_manifest").input(str(manifest)).run()
    at.button(key="check_manifest").click().run()
    assert not at.exception
    bad = at.dataframe[0].value
    assert list(bad["reason"]) == ["missing file"]
    at.number_input(key="load_blocks").set_value(1).run()
    assert at.selectbox(key="load_device").options[:2] == ["auto", "cpu"]
    at.selectbox(key="load_device").set_value("cpu").run()
    at.selectbox(key="load_loss").set_value("siglip").run()
    at.text_input(key="load_tokenizer").input(str(tmp_path / "tokenizer")).run()
    at.button(key="start_scoring").click().run()
    target = Path(at.query_params["run"])
    assert target.parent == tmp_path / "cache" / "runs" and target.name.startswith("mine-")
    assert target.name.endswith("-blocks1")  # a run of another scope gets its own folder
    deadline = time.monotonic() + 10
    while (read_status(target) or {}).get("state") != "done":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert str(started[0].manifest) == str(manifest) and started[0].trusted_split == "val"
    assert started[0].device == "cpu" and started[0].finetune.loss == "siglip"
    assert started[0].tokenizer == tmp_path / "tokenizer"
    assert read_status(target)["settings"]["finetune"]["delta"] == "auto"  # recorded for resume
    assert read_status(target)["settings"]["finetune"]["blocks"] == 1


def test_dropped_bin_and_restore(run) -> None:
    at = app(run)
    drop = next(b for b in at.button if b.key and b.key.startswith("grid_drop_"))
    row = int(drop.key.rsplit("_", 1)[1])
    drop.click().run()
    at.button(key="open_bin").click().run()
    assert match_count(at) == 1 and at.multiselect(key="status").value == ["dropped"]
    at.button(key=f"grid_res_{row}").click().run()
    assert open_store(run).current_state().set_index("row").loc[row, "status"] == "pending"
    assert match_count(at) == 0


def _mark_unconverged(run) -> None:
    from ecif.run import FINETUNE_FILE, atomic_write_json

    atomic_write_json(run.path(FINETUNE_FILE), {
        "delta": 0.01, "gradient_norm": 1.0e-2, "smallest_hessian_eigenvalue": 0.02, "smallest_prenorm_norm": 0.3,
        "contrastive_loss": 0.4, "converged": False,
        "warnings": ["not converged: gradient norm 1.00e-02 (tolerance 1e-07)"]})


@pytest.mark.parametrize("page", ["review", "mispredictions", "whatif"])
def test_an_unconverged_fine_tune_is_named_before_any_score(run, page: str) -> None:
    _mark_unconverged(run)
    at = app(run, page)
    assert not at.exception, at.exception
    assert any("not a well-conditioned minimum" in box.value and "gradient norm 1.00e-02" in box.value for box in at.error)


def test_load_page_shows_the_chosen_delta_and_its_sweep(run) -> None:
    from ecif.run import FINETUNE_FILE, atomic_write_json

    atomic_write_json(run.path(FINETUNE_FILE), {
        "delta": 0.03, "gradient_norm": 8.3e-9, "smallest_hessian_eigenvalue": 0.0195,
        "smallest_hessian_eigenvalue_note": "0.0195 (Lanczos, converged to residual 2e-05)",
        "smallest_prenorm_norm": 4.2, "contrastive_loss": 0.69, "converged": True, "warnings": []})
    sweep = [{"delta": 0.1, "selection_loss": 0.768, "gradient_norm": 9e-9, "smallest_hessian_eigenvalue": 0.084, "converged": True},
             {"delta": 0.03, "selection_loss": 0.767, "gradient_norm": 8e-9, "smallest_hessian_eigenvalue": 0.0195, "converged": True},
             {"delta": 0.01, "selection_loss": 0.857, "gradient_norm": 1e-2, "smallest_hessian_eigenvalue": 0.023, "converged": False}]
    stages = run.info.get("stages", {})
    stages["fine-tune"] = {"delta": 0.03, "delta_selection": {"delta": 0.03, "selection_pairs": 6, "rule": "held-out", "sweep": sweep}}
    run.update_info(stages=stages)
    at = app(run, "load")
    assert not at.exception, at.exception
    text = " ".join(m.value for m in at.markdown)
    assert "Penalty δ = 0.03" in text and "chosen on 6 held-out trusted pairs" in text and "converged to residual" in text
    table = next(frame.value for frame in at.dataframe if "held-out loss" in frame.value.columns)
    assert table["verdict"].tolist() == ["eligible", "chosen", "not a well-conditioned minimum"]
