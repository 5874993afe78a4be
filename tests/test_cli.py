"""The command line: every reporting command's --json output, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from ecif.cli import main
from fixtures_data import write_bad_manifest


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
    from ecif.tasks.detect import SUSPICION, flag
    from ecif.tasks.evaluate import INFLUENCE_COLUMNS
    from ecif.tasks.trace import trace

    def choices(command: str, option: str) -> list[str]:
        subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        action = next(a for a in subparsers.choices[command]._actions if option in a.option_strings)
        return list(action.choices)

    assert choices("score", "--solver") == list(typing.get_args(SolverName))
    assert choices("detect", "--method") == list(typing.get_args(typing.get_type_hints(flag)["method"]))
    assert choices("trace", "--rank-by") == list(typing.get_args(typing.get_type_hints(trace)["rank_by"]))
    assert set(INFLUENCE_COLUMNS) <= set(SUSPICION)
