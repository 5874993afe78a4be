"""The whole app in a real browser: headless Chromium against ``streamlit run app/main.py``.

Each test copies the shared scored demo run (``scored_demo_run``: shapes, n=3000, real engine) to
its own folder first, so decisions never leak between tests, and starts its own server on a free
port.  Servers are stopped in fixture teardown, also when a test fails.  Screenshots go to
``<repo>/test-artifacts/`` (``review.png`` is the README's picture of the review grid).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import unquote

import pandas as pd
import pytest
from browser_helpers import (
    ACTION_MS,
    CHROMIUM,
    FIRST_RENDER_MS,
    AppServer,
    button,
    chromium,
    click,
    free_port,
    screenshot,
    wait_idle,
)
from fixtures_data import write_bad_manifest

from ecif.curation.review import open_store
from ecif.run import DECISIONS_FILE, SCORES_FILE, Run
from ecif.tasks.detect import with_misalignment

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (make chromium)"),
]

VIEWPORT = {"width": 1400, "height": 1000}
#: The first engine call of a server loads the run's curvature (``curvature.safetensors``, copied
#: with the run); a run without it rebuilds it, which took ~8 minutes on a busy 2-core box.
TRACE_MS = int(float(os.environ.get("ECIF_E2E_TRACE_S", "300")) * 1000)


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def run_copy(scored_demo_run: Path, tmp_path: Path) -> Path:
    """A private copy of the scored demo run, without anyone's decisions, exports, edited
    checkpoint or job state (other tests share the cached run)."""
    target = tmp_path / "run"
    shutil.copytree(scored_demo_run, target, ignore=shutil.ignore_patterns(
        "decisions.sqlite*", "exports", "edited", "job.json"))
    return target


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., AppServer]]:
    """``start(run_dir, port=None)`` starts an app server; every one is stopped at teardown and
    its log tail printed (pytest shows it when the test fails)."""
    started: list[AppServer] = []

    def start(run_dir: Path, port: int | None = None) -> AppServer:
        server = AppServer(Path(run_dir), port or free_port(), tmp_path / f"server-{len(started)}.log")
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
        print(f"---- {server.log_path.name} (port {server.port})\n{server.log_tail()}")


@pytest.fixture
def new_page(browser, request) -> Iterator[Callable[[], object]]:
    """Pages in fresh browser contexts (separate cookies = separate Streamlit sessions).  When the
    test fails, each page's last state is saved as ``test-artifacts/FAILED-<test>-<n>.png``."""
    contexts, pages = [], []
    failed_before = request.session.testsfailed

    def make():
        context = browser.new_context(viewport=VIEWPORT)
        context.set_default_timeout(ACTION_MS)
        contexts.append(context)
        pages.append(context.new_page())
        return pages[-1]

    yield make
    if request.session.testsfailed > failed_before:
        for number, page in enumerate(pages):
            try:
                screenshot(page, f"FAILED-{request.node.name}-{number}.png", full_page=False)
            except Exception as error:  # the page may be gone; the failure itself matters more
                print(f"no failure screenshot: {error}")
    for context in contexts:
        context.close()


# ------------------------------------------------------------------------------------- helpers
def ranked(run_dir: Path) -> pd.DataFrame:
    """The run's scores in the Review page's default order: most likely misaligned first."""
    scores = with_misalignment(pd.read_parquet(Path(run_dir) / SCORES_FILE))
    return scores.sort_values("misalignment", ascending=False, kind="stable").reset_index(drop=True)


def state_of(run_dir: Path) -> pd.DataFrame:
    """Current decisions from SQLite, indexed by uid."""
    return open_store(Run(run_dir)).current_state().set_index("uid")


def wait_until(condition: Callable[[], bool], timeout_s: float = ACTION_MS / 1000, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.1)


def assert_no_exception(page) -> None:
    """The app never showed a Python traceback."""
    shown = page.locator('[data-testid="stException"]')
    assert shown.count() == 0, shown.first.inner_text()


def open_review(page, server: AppServer, first_row: int) -> None:
    """Open the Review grid and wait until the scored cards are there."""
    page.goto(server.url + "/")
    button(page, f"grid_open_{first_row}").wait_for(timeout=FIRST_RENDER_MS)
    wait_idle(page)
    assert_no_exception(page)


def go_to_page(page, title: str) -> None:
    """Switch page with the sidebar navigation (keeps the browser session)."""
    page.locator('[data-testid="stSidebarNav"] a', has_text=title).click()
    page.get_by_role("heading", name=title).first.wait_for(timeout=FIRST_RENDER_MS)
    wait_idle(page)


def card(page, key: str):
    """The bordered card holding the button with ``key`` (caption, status, harm bar)."""
    return page.locator(f".st-key-{key}").locator(
        "xpath=ancestor::div[@data-testid='stVerticalBlock'][.//*[@data-testid='stHtml']][1]")


def sidebar_counts(page) -> str:
    return page.locator('[data-testid="stSidebar"]').get_by_text("pending", exact=False).first.inner_text()


def table_rows(frame, min_rows: int = 1) -> tuple[list[str], list[list[str]]]:
    """Header and rows of an ``st.dataframe`` from the grid's accessibility table (the visible
    cells are drawn on a canvas), once it has at least ``min_rows`` rows."""
    frame.locator("table[role=grid] tbody tr").nth(min_rows - 1).wait_for(state="attached")
    return frame.evaluate("""(element) => {
        const table = element.querySelector('table[role="grid"]');
        const headers = [...table.querySelectorAll('thead th')].map(c => c.textContent.trim());
        const rows = [...table.querySelectorAll('tbody tr')].map(
            r => [...r.querySelectorAll('td')].map(c => c.textContent.trim()));
        return [headers, rows];
    }""")


def select_first_row(page, frame) -> None:
    """Tick the selection checkbox of the first row of a selectable ``st.dataframe``."""
    frame.scroll_into_view_if_needed()
    box = frame.bounding_box()
    header = frame.locator("thead th").first.bounding_box()
    row_height = header["height"] if header else 35
    page.mouse.click(box["x"] + 16, box["y"] + row_height * 1.5)


# ------------------------------------------------------------------------------------- tests
def test_full_curation_flow(run_copy: Path, servers, new_page, tmp_path: Path) -> None:
    """Drop the most likely misaligned pair, relabel another with the suggestion, trace a misprediction to
    its culprits, export everything kept, and check every exported file from Python."""
    scores = ranked(run_copy)
    top = scores.iloc[0]
    first_page = scores.iloc[1:24]
    candidates = first_page[first_page["suggested_action"] == "relabel"]
    other = (candidates if len(candidates) else first_page).iloc[0]
    top_row, other_row = int(top["row"]), int(other["row"])

    server = servers(run_copy)
    page = new_page()
    open_review(page, server, top_row)
    assert page.get_by_text("Review · most likely misaligned first").is_visible()
    # The grid starts with the most likely misaligned pair.
    first_card = page.locator("[class*='st-key-grid_open_']").first
    assert f"st-key-grid_open_{top_row}" in first_card.get_attribute("class")
    screenshot(page, "01-review-initial.png")

    # 1. Drop the first pair from its card: the card then offers "restore" and SQLite says dropped.
    click(page, f"grid_drop_{top_row}")
    button(page, f"grid_res_{top_row}").wait_for()
    assert "dropped" in card(page, f"grid_res_{top_row}").inner_text()
    assert state_of(run_copy).loc[top["uid"], "status"] == "dropped"

    # 2. Open another pair and relabel it with the suggested caption.
    click(page, f"grid_open_{other_row}")
    page.wait_for_url(f"**uid={other['uid']}**")
    caption_box = page.locator(f".st-key-caption_{other_row} input")
    caption_box.wait_for(timeout=FIRST_RENDER_MS)  # first detail view builds the neighbour index
    wait_idle(page)
    suggestion = caption_box.input_value()
    assert suggestion and suggestion != other["caption"]
    assert page.get_by_text(f"Suggested caption: {suggestion}").is_visible()
    screenshot(page, "02-detail.png")
    click(page, "use_suggestion")
    wait_until(lambda: other["uid"] in state_of(run_copy).index, what="the relabel in SQLite")
    decided = state_of(run_copy).loc[other["uid"]]
    assert (decided["status"], decided["caption"]) == ("relabelled", suggestion)
    page.wait_for_url(lambda url: f"uid={other['uid']}" not in url)  # advanced to the next pair
    assert_no_exception(page)

    # Back to the grid: the README's screenshot (a dropped and a relabelled card on it).
    click(page, "back")
    button(page, f"grid_res_{top_row}").wait_for(timeout=FIRST_RENDER_MS)
    relabelled = card(page, f"grid_open_{other_row}")
    assert "relabelled" in relabelled.inner_text() and suggestion in relabelled.inner_text()
    counts = sidebar_counts(page)
    assert "relabelled 1" in counts and "dropped 1" in counts, counts
    page.mouse.move(0, 0)
    screenshot(page, "review.png")

    # 3. Mispredictions: pick the worst one and see the training pairs that caused it.
    go_to_page(page, "Mispredictions")
    frame = page.locator('[data-testid="stDataFrame"]').first
    frame.wait_for()
    headers, rows = table_rows(frame)
    picked_uid = rows[0][headers.index("uid")]
    select_first_row(page, frame)
    page.wait_for_url(f"**item={picked_uid}**")
    culprits = page.locator("[class*='st-key-trace_culprit_open_']")
    culprits.first.wait_for(timeout=TRACE_MS)
    wait_idle(page, TRACE_MS)
    assert_no_exception(page)
    assert page.get_by_role("heading", name="Culprits").is_visible()
    assert culprits.count() >= 1
    by_row = scores.set_index("row")
    for key_element in culprits.all()[:4]:
        key = next(c for c in key_element.get_attribute("class").split() if c.startswith("st-key-"))
        row = int(key.rsplit("_", 1)[1])
        shown = card(page, key.removeprefix("st-key-")).locator(".ecif-caption").inner_text()
        expected = suggestion if row == other_row else by_row.loc[row, "caption"]
        assert shown.strip().endswith(expected), (row, shown, expected)
    screenshot(page, "03-mispredictions.png")

    # 4. Export everything kept.
    go_to_page(page, "Export")
    out = tmp_path / "export"
    folder = page.locator(".st-key-export_dir input")
    folder.fill(str(out))
    folder.press("Enter")
    wait_idle(page)
    assert page.locator(".st-key-export_mode input[type=radio]").first.is_checked()  # "kept"
    click(page, "export_go")
    # Not get_by_text("Exported"): that also matches the page's "... for the exported pairs" at once.
    page.get_by_text(re.compile(r"^Exported \d+ pairs")).first.wait_for()
    assert_no_exception(page)
    screenshot(page, "04-export.png")

    splits = {split: pd.read_csv(out / f"{split}.csv", keep_default_na=False) for split in ("train", "val", "test")}
    csv = splits["train"]  # what open_clip trains on: the train split alone
    assert list(csv.columns[:2]) == ["filepath", "title"]
    assert top["uid"] not in set(csv["uid"])
    manifest = Run(run_copy).manifest()
    for split, part in splits.items():
        assert set(part["split"]) <= {split}
        assert len(part) == (manifest["split"] == split).sum() - (split == "train")  # the one dropped pair
    assert csv.set_index("uid").loc[other["uid"], "title"] == suggestion
    uids = (out / "train_uids.txt").read_text().splitlines()
    assert uids == sorted(uids) and set(uids) == set(csv["uid"]) and len(uids) == len(csv)
    log = pd.read_csv(out / "decisions.csv")
    run_info = json.loads((run_copy / "run.json").read_text())
    assert run_info["model_hash"]
    by_uid = log.set_index("uid")
    assert by_uid.loc[top["uid"], "action"] == "drop"
    assert by_uid.loc[other["uid"], "action"] == "relabel"
    assert by_uid.loc[other["uid"], "new_caption"] == suggestion
    for pair in (top, other):  # why: the scores at the moment of the decision, and the model
        assert by_uid.loc[pair["uid"], "model_hash"] == run_info["model_hash"]
        reason = json.loads(by_uid.loc[pair["uid"], "reason"])
        assert reason["influence"] == pytest.approx(float(pair["influence"]))
        assert reason["rank"] == int(pair["rank"])
        assert {"influence_pos", "influence_neg", "self_influence", "clip_score", "loss"} <= set(reason)
    exported_run = json.loads((out / "run.json").read_text())
    assert exported_run["run"]["model_hash"] == run_info["model_hash"]
    assert exported_run["export"]["mode"] == "kept"
    assert exported_run["export"]["counts"]["dropped"] == 1
    assert exported_run["export"]["counts"]["relabelled"] == 1


def test_decision_survives_sigkill(run_copy: Path, servers, new_page) -> None:
    """A decision made with a keyboard shortcut is in SQLite the moment the page confirms it: a
    SIGKILLed server loses nothing, and a restarted one shows it."""
    scores = ranked(run_copy)
    target, after = scores.iloc[0], scores.iloc[1]
    row = int(target["row"])
    port = free_port()
    server = servers(run_copy, port)
    cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
    assert b"streamlit" in cmdline and b"run" in cmdline  # the server itself, no wrapper

    page = new_page()
    open_review(page, server, row)
    click(page, f"grid_open_{row}")
    button(page, "drop").wait_for(timeout=FIRST_RENDER_MS)
    wait_idle(page)
    # Shortcuts need the page to have had a click; plain text is a neutral target.
    page.get_by_text("Suggested caption:").click()
    page.keyboard.press("d")
    page.wait_for_url(f"**uid={after['uid']}**")  # dropped, then advanced to the next pair
    assert state_of(run_copy).loc[target["uid"], "status"] == "dropped"

    server.kill(signal.SIGKILL)
    assert server.process.returncode == -signal.SIGKILL
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)
    assert state_of(run_copy).loc[target["uid"], "status"] == "dropped"

    restarted = servers(run_copy, port)
    page.goto(f"{restarted.url}/?uid={target['uid']}")
    button(page, "restore").wait_for(timeout=FIRST_RENDER_MS)  # dropped pairs offer "Restore"
    wait_idle(page)
    assert_no_exception(page)
    assert page.get_by_role("heading", name="dropped").first.is_visible()
    assert "dropped 1" in sidebar_counts(page)
    screenshot(page, "05-after-sigkill.png", full_page=False)


def test_two_sessions_see_each_others_decisions(run_copy: Path, servers, new_page) -> None:
    """Two browser sessions decide at the same time; after a refresh each sees both decisions."""
    scores = ranked(run_copy)
    dropped, accepted = scores.iloc[0], scores.iloc[1]
    server = servers(run_copy)
    first, second = new_page(), new_page()
    open_review(first, server, int(dropped["row"]))
    open_review(second, server, int(dropped["row"]))

    button(first, f"grid_drop_{int(dropped['row'])}").click()
    button(second, f"grid_acc_{int(accepted['row'])}").click()
    button(first, f"grid_res_{int(dropped['row'])}").wait_for()
    wait_until(lambda: len(state_of(run_copy)) == 2, what="both decisions in SQLite")

    for page in (first, second):
        page.reload()
        button(page, f"grid_res_{int(dropped['row'])}").wait_for(timeout=FIRST_RENDER_MS)
        wait_idle(page)
        assert_no_exception(page)
        assert "dropped" in card(page, f"grid_res_{int(dropped['row'])}").inner_text()
        assert "accepted" in card(page, f"grid_open_{int(accepted['row'])}").inner_text()
        counts = sidebar_counts(page)
        assert "accepted 1" in counts and "dropped 1" in counts, counts

    state = state_of(run_copy)
    assert state.loc[dropped["uid"], "status"] == "dropped"
    assert state.loc[accepted["uid"], "status"] == "accepted"
    log = open_store(Run(run_copy)).log()
    assert len(log) == 2 and log["session_id"].nunique() == 2
    with sqlite3.connect(run_copy / DECISIONS_FILE) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_broken_manifest_lists_bad_rows(run_copy: Path, servers, new_page, tmp_path: Path) -> None:
    """A manifest with broken rows: the Load page's check lists them before anything is scored,
    and a run made from it shows the rows it skipped; nothing crashes."""
    from ecif.config import RunConfig
    from ecif.tasks.pipeline import run_pipeline

    bad = write_bad_manifest(tmp_path / "bad")
    # The same broken rows, plus the train/val splits a run needs; the real data stage (no model)
    # turns it into a run folder with bad_rows.parquet.
    with_splits = pd.read_csv(bad.path, keep_default_na=False)
    with_splits["split"] = ["train", "train", "val", "val", "train", "train", "train", "train"]
    split_manifest = tmp_path / "bad" / "with_splits.csv"
    with_splits.to_csv(split_manifest, index=False)
    broken_run = tmp_path / "broken-run"
    run_pipeline(RunConfig(run_dir=broken_run, manifest=split_manifest), stop_after="data")

    server = servers(run_copy)
    page = new_page()
    page.goto(server.url + "/load")
    page.get_by_role("heading", name="Load").wait_for(timeout=FIRST_RENDER_MS)
    wait_idle(page)

    # 1. Check the manifest in the form: the bad rows, with their reasons, before any scoring.
    page.get_by_role("tab", name="Your model and data").click()
    manifest_box = page.locator(".st-key-load_manifest input")
    manifest_box.fill(str(bad.path))
    manifest_box.press("Enter")
    wait_idle(page)
    click(page, "check_manifest")
    page.get_by_text("4 rows will be skipped").wait_for()
    page.get_by_text("4 valid pairs").wait_for()
    frame = page.locator('[data-testid="stDataFrame"]:visible').first
    frame.wait_for()
    headers, rows = table_rows(frame, len(bad.bad))
    assert headers[:4] == ["row", "uid", "filepath", "reason"], headers
    listed = {int(r[0]): (r[1], r[3]) for r in rows}
    assert sorted(listed) == sorted(bad.bad)
    for number, (uid, reason) in bad.bad.items():
        assert listed[number][0] == uid and listed[number][1].startswith(reason), listed[number]
    assert_no_exception(page)
    assert not (Path(server.run_dir) / "job.json").exists()  # checking scores nothing
    screenshot(page, "06-load-bad-rows.png")

    # 2. Open the run made from it: its skipped rows are listed, the Review page says "not scored".
    page.get_by_role("tab", name="Open a run folder").click()
    folder = page.locator(".st-key-open_folder input")
    folder.fill(str(broken_run))
    folder.press("Enter")
    wait_idle(page)
    click(page, "open_run")
    page.wait_for_url("**run=**")
    page.get_by_text("4 manifest rows were skipped").wait_for(timeout=FIRST_RENDER_MS)
    wait_idle(page)
    headers, rows = table_rows(page.locator('[data-testid="stDataFrame"]:visible').first, len(bad.bad))
    assert sorted(int(r[headers.index("row")]) for r in rows) == sorted(bad.bad), (headers, rows)
    assert page.get_by_text("not scored yet").first.is_visible()
    assert_no_exception(page)
    screenshot(page, "07-run-bad-rows.png")
    go_to_page(page, "Review")
    assert str(broken_run) in unquote(page.url)  # the opened run stays open across pages
    page.get_by_text("This run has no scores yet").wait_for()
    assert_no_exception(page)
