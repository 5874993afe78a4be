"""The command line: every reporting command's --json output, and clear errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pandas as pd
import pytest
from fixtures_data import BROKEN_COMPRESSED, FATAL_MANIFESTS, write_bad_manifest, write_broken_compressed_manifests

from ecif.cli import main


def _json(capsys, argv) -> object:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_help_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "ecif.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("demo-data", "validate", "train-demo", "features", "finetune", "score", "extract-features",
                    "score-features", "demo", "detect", "trace", "mispredictions", "edit", "export", "app"):
        assert command in result.stdout


def test_demo_data_marks_exactly_the_noise_rate(tmp_path, capsys):
    payload = _json(capsys, ["demo-data", "shapes", "--out", str(tmp_path / "d"), "--n", "400", "--noise", "0.1", "--json"])
    assert payload["train_corrupted"] == round(0.1 * payload["train_rows"])


def test_validate_reports_the_four_bad_rows(tmp_path, capsys):
    bad = write_bad_manifest(tmp_path)
    payload = _json(capsys, ["validate", str(bad.path), "--json"])
    assert payload["valid_rows"] == 4
    reported = {row["row"]: (row["uid"], row["reason"]) for row in payload["bad_rows"]}
    assert set(reported) == set(bad.bad)
    for row, (uid, reason) in bad.bad.items():
        assert reported[row][0] == uid and reported[row][1].startswith(reason)


def test_unreadable_manifest_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert main(["validate", str(empty)]) == 1
    assert "empty.csv" in capsys.readouterr().err


def test_offline_pretrained_tag_is_a_clear_error(tmp_path, capsys):
    from ecif.data import make_demo_data

    manifest = make_demo_data("shapes", tmp_path / "d", n=120)
    code = main(["features", "--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k", "--out", str(tmp_path / "r"),
                 "--manifest", str(manifest)])
    assert code == 1
    error = capsys.readouterr().err
    assert "offline" in error and "--checkpoint" in error


@pytest.mark.parametrize("command", ["score", "extract-features"])
def test_a_model_without_weights_is_refused_before_any_work(tmp_path, capsys, command):
    """Naming an architecture and forgetting --checkpoint must not score with random weights."""
    manifest = tmp_path / "absent.csv"  # never read: the refusal comes first
    code = main([command, "--model", "ViT-B-32", "--out", str(tmp_path / "r"), "--manifest", str(manifest)])
    assert code == 1
    error = capsys.readouterr().err
    assert "'ViT-B-32' needs its weights" in error and "--checkpoint" in error
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_reporting_commands_on_the_demo_run(scored_demo_run, capsys):
    run = str(scored_demo_run)
    detect = _json(capsys, ["detect", "--run", run, "--top-k", "25", "--json"])
    assert len(detect["flagged"]) == 25
    assert {m["score"] for m in detect["metrics"]} >= {"influence", "clip_score", "loss", "self_influence"}
    wrong = _json(capsys, ["mispredictions", "--run", run, "--json"])
    table = pd.read_parquet(scored_demo_run / "mispredictions.parquet")
    uid = wrong[0]["uid"] if wrong else table["uid"].iloc[0]
    traced = _json(capsys, ["trace", "--run", run, "--item", uid, "--top-k", "5", "--json"])
    assert traced["item"] == uid and len(traced["pairs"]) == 10
    own = _json(capsys, ["trace", "--run", run, "--item", uid, "--top-k", "5", "--rank-by", "positive", "--plain", "--json"])
    culprits = [pair for pair in own["pairs"] if pair["role"] == "culprit"]
    assert [pair["score"] for pair in culprits] == [pair["influence_pos"] for pair in culprits]
    assert {pair["main_role"] for pair in own["pairs"]} <= {"positive", "negative"}
    assert main(["trace", "--run", run, "--item", "nope"]) == 1
    if wrong:
        confusion = f"{wrong[0]['label']}:{wrong[0]['predicted']}"
        joint = _json(capsys, ["trace", "--run", run, "--confusion", confusion, "--top-k", "5", "--json"])
        assert isinstance(joint["items"], list) and wrong[0]["uid"] in joint["items"] and len(joint["pairs"]) == 10
        same = [w["uid"] for w in wrong if (w["label"], w["predicted"]) == (wrong[0]["label"], wrong[0]["predicted"])]
        assert sorted(joint["items"]) == sorted(same)
        fixed = _json(capsys, ["trace", "--run", run, "--confusion", confusion, "--rank-by", "positive", "--plain",
                               "--top-k", "20", "--if-dropped", "closed", "--json"])
        effect = pd.DataFrame(fixed["if_dropped"]["items"])
        assert len(fixed["if_dropped"]["rows"]) == 20 and sorted(effect["uid"]) == sorted(fixed["items"])
        assert effect["loss_after"].mean() < effect["loss_before"].mean()  # dropping positive-role culprits helps
        twice = _json(capsys, ["trace", "--run", run, "--item", uid, "--item", uid, "--top-k", "5", "--json"])
        assert twice["item"] == uid  # a uid given twice is traced once
    assert main(["trace", "--run", run, "--confusion", "square"]) == 1


def test_choices_written_out_in_the_parser_match_the_library():
    """The parser spells solver and detection-method names by hand (importing the maths at start-up
    would slow every command); this keeps those lists in step with the library's."""
    import argparse
    import typing

    from ecif.cli import build_parser
    from ecif.curvature.solvers import SolverName
    from ecif.influence.columns import DETECTION_COLUMNS, INFLUENCE_COLUMNS
    from ecif.tasks.detect import SUSPICION
    from ecif.tasks.trace import trace

    def choices(command: str, option: str) -> list[str]:
        subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        action = next(a for a in subparsers.choices[command]._actions if option in a.option_strings)
        return list(action.choices)

    assert choices("score", "--solver") == list(typing.get_args(SolverName))
    assert choices("detect", "--method") == list(DETECTION_COLUMNS)
    assert choices("trace", "--rank-by") == list(typing.get_args(typing.get_type_hints(trace)["rank_by"]))
    assert set(INFLUENCE_COLUMNS) <= set(SUSPICION)


# ---------------------------------------------------------------- broken manifests: clear errors


def _one_line_error(capsys, argv: list[str], path) -> str:
    """Runs ``argv``: exit code 1, nothing on stdout, one ``error: ...`` line naming ``path`` on stderr
    (after progress bars, which a terminal shows on that same line and clears with ``\\r``)."""
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    line = captured.err.rsplit("\r", 1)[-1]
    assert line.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert str(path) in line and "Traceback" not in captured.err
    return line


def _json_error(capsys, argv: list[str], path) -> dict:
    """Runs ``argv`` with --json: exit code 1 and the error as one JSON object on stdout."""
    assert main([*argv, "--json"]) == 1
    payload = json.loads(capsys.readouterr().out)
    assert set(payload) == {"error", "kind", "file"}
    assert payload["kind"] == "ManifestError" and payload["file"] == str(path) and str(path) in payload["error"]
    return payload


@pytest.mark.parametrize("name", sorted(BROKEN_COMPRESSED))
def test_validate_broken_compressed_manifest_is_one_clear_line(tmp_path, capsys, name):
    path = write_broken_compressed_manifests(tmp_path)[name]
    assert re.search(BROKEN_COMPRESSED[name], _one_line_error(capsys, ["validate", str(path)], path))
    assert re.search(BROKEN_COMPRESSED[name], _json_error(capsys, ["validate", str(path)], path)["error"])


@pytest.mark.parametrize("name", ["truncated.csv.gz", "truncated.csv.zip"])
def test_score_on_a_broken_compressed_manifest_is_one_clear_line(tmp_path, capsys, name):
    """The pipeline shares the loader: the same error, before any model work."""
    path = write_broken_compressed_manifests(tmp_path)[name]
    argv = ["score", "--manifest", str(path), "--out", str(tmp_path / "run")]
    assert re.search(BROKEN_COMPRESSED[name], _one_line_error(capsys, argv, path))
    _json_error(capsys, argv, path)


@pytest.mark.parametrize(("name", "content", "message"), FATAL_MANIFESTS)
def test_validate_json_reports_every_manifest_error(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    assert message in _json_error(capsys, ["validate", str(path)], path)["error"]
    assert message in _one_line_error(capsys, ["validate", str(path)], path)


def test_other_json_commands_report_errors_as_json(tmp_path, capsys):
    """A command's own refusal (here: a folder that is not a scored run) is JSON too with --json."""
    assert main(["detect", "--run", str(tmp_path), "--json"]) == 1
    payload = json.loads(capsys.readouterr().out)
    assert "not a scored run" in payload["error"] and payload["kind"] == "SystemExit"


def test_broken_manifest_from_the_shell_has_no_traceback(tmp_path):
    path = write_broken_compressed_manifests(tmp_path)["truncated.csv.gz"]
    result = subprocess.run([sys.executable, "-m", "ecif.cli", "validate", str(path)], capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and str(path) in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "ecif.cli", "validate", str(path), "--json"], capture_output=True, text=True)
    assert result.returncode == 1 and json.loads(result.stdout)["file"] == str(path)


def test_an_unconverged_run_is_named_before_its_scores(scored_demo_run, tmp_path, capsys):
    import json
    import shutil

    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("run.json", "scores.parquet", "manifest.parquet"):
        shutil.copy(scored_demo_run / name, copy / name)
    report = json.loads((scored_demo_run / "finetune.json").read_text())
    report.update(converged=False, warnings=["not converged: gradient norm 1.00e-02 (tolerance 1e-07)"])
    (copy / "finetune.json").write_text(json.dumps(report))
    assert main(["detect", "--run", str(copy), "--top-k", "3"]) == 0
    captured = capsys.readouterr()
    assert "not a well-conditioned minimum" in captured.err and "gradient norm 1.00e-02" in captured.err
    assert main(["detect", "--run", str(scored_demo_run), "--top-k", "3"]) == 0
    assert "WARNING" not in capsys.readouterr().err  # the demo run's heads converged


def test_finetune_lines_name_the_chosen_delta(scored_demo_run):
    from ecif.cli import _delta_sweep_lines
    from ecif.config import DELTA_GRID
    from ecif.run import Run

    report = Run(scored_demo_run).finetune_report()
    lines = _delta_sweep_lines(report["delta_selection"])
    assert len(lines) == 1 + len(DELTA_GRID)
    chosen = [line for line in lines if line.endswith("chosen")]
    assert len(chosen) == 1 and f"{report['delta']:g}" in chosen[0]
