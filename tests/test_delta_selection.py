"""δ = "auto": the penalty is chosen on held-out trusted pairs among the well-conditioned fine-tunes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ecif.config import AUTO_DELTA, FinetuneConfig, parse_delta
from ecif.finetune import select_delta, split_trusted_rows
from ecif.influence.synthetic import toy_features
from ecif.objective.contrastive import ContrastiveData, HeadsScope, contrastive_loss, reference_batches


@pytest.fixture(scope="module")
def selection():
    # The narrow, clean toy of maths_fixtures.make_weak_penalty_toy, which converges down to δ = 0.03.
    image, text, _ = toy_features(100, 0, 8, 8, flip=0.0)
    held_image, held_text, _ = toy_features(60, 1, 8, 8, flip=0.0)
    scope = HeadsScope(8, 8, 4, math.log(10.0))
    theta0 = torch.randn(scope.size, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    data = ContrastiveData(image, text, reference_batches(100, 20))
    held_out = ContrastiveData(held_image, held_text, reference_batches(60, 20))
    config = FinetuneConfig(delta_grid=(3.0, 0.3, 0.03, 0.003))
    return scope, theta0, data, held_out, config, select_delta(scope, theta0, data, held_out, config)


def test_the_chosen_delta_has_the_lowest_held_out_loss_among_converged_fine_tunes(selection):
    scope, _, _, held_out, _, chosen = selection
    tried = [point for point in chosen.sweep if "skipped" not in point]
    eligible = [point for point in tried if point["converged"]]
    assert len(eligible) >= 2  # a real choice was made
    best = min(eligible, key=lambda point: point["selection_loss"])
    assert chosen.delta == best["delta"]
    assert chosen.report.converged and chosen.report.delta == chosen.delta
    assert float(contrastive_loss(scope, chosen.theta, held_out)) == pytest.approx(best["selection_loss"], rel=1e-9)
    # The sweep walks from the strongest penalty down; each weaker penalty moves the heads further.
    deltas = [point["delta"] for point in chosen.sweep]
    assert deltas == sorted(deltas, reverse=True)
    changes = [point["parameter_change"] for point in tried]
    assert changes == sorted(changes)


def test_the_walk_stops_at_the_first_penalty_that_fails_to_converge(selection):
    scope, theta0, data, held_out, config, _ = selection
    strict = FinetuneConfig(delta_grid=(3.0, 0.3, 0.03), max_lbfgs_iterations=50, newton_steps=0, gradient_tolerance=1e-14)
    chosen = select_delta(scope, theta0, data, held_out, strict)
    assert not chosen.sweep[0]["converged"]  # 1e-14 is out of reach for L-BFGS alone
    assert all("skipped" in point for point in chosen.sweep[1:])
    assert chosen.delta == 3.0 and not chosen.report.converged
    assert any("no penalty of the grid" in warning for warning in chosen.report.warnings)


def test_summary_is_json_and_names_the_rule(selection):
    *_, chosen = selection
    summary = json.loads(json.dumps(chosen.summary()))
    assert summary["delta"] == chosen.delta and summary["selection_pairs"] == 60
    assert "held-out" in summary["rule"] and len(summary["sweep"]) == 4


def test_trusted_rows_are_split_only_for_auto():
    rows = np.arange(100, 200)
    selection, measured = split_trusted_rows(rows, FinetuneConfig())
    assert len(selection) == 50 and len(measured) == 50
    assert not set(selection) & set(measured) and set(selection) | set(measured) == set(rows)
    again = split_trusted_rows(rows, FinetuneConfig())
    assert np.array_equal(again[0], selection)  # deterministic: the engine re-derives the same split
    none, everything = split_trusted_rows(rows, FinetuneConfig(delta=1.0))
    assert len(none) == 0 and np.array_equal(everything, rows)


@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan", "inf", ""])
def test_bad_delta_is_refused(value):
    with pytest.raises(ValueError, match="delta must be 'auto' or a positive number"):
        parse_delta(value)


def test_delta_forms():
    assert parse_delta("AUTO") == AUTO_DELTA and parse_delta("0.3") == 0.3 and parse_delta(2) == 2.0
    config = FinetuneConfig(delta="0.1", delta_grid=[1, 3])
    assert config.delta == 0.1 and config.delta_grid == (3.0, 1.0) and not config.auto_delta


def test_settings_round_trip_through_run_json(tmp_path: Path):
    from ecif.config import RunConfig

    config = RunConfig(run_dir=tmp_path)
    stored = json.loads(json.dumps(config.settings()))
    assert RunConfig.from_settings(tmp_path, stored).settings() == config.settings()


def test_cli_refuses_a_bad_delta(capsys):
    from ecif.cli import main

    with pytest.raises(SystemExit):
        main(["finetune", "--out", "x", "--delta", "zero"])
    assert "delta must be 'auto' or a positive number" in capsys.readouterr().err


def test_a_choice_at_the_strongest_penalty_says_so():
    from ecif.finetune import DeltaSelection

    sweep = [{"delta": 3.0, "selection_loss": 0.70, "converged": True}, {"delta": 1.0, "selection_loss": 0.72, "converged": True},
             {"delta": 0.3, "skipped": "a stronger penalty already failed to converge"}]
    chosen = DeltaSelection(3.0, torch.zeros(1), None, sweep, 10)
    assert chosen.at_strongest and "stronger one might be better" in chosen.summary()["note"]
    inside = DeltaSelection(1.0, torch.zeros(1), None, sweep, 10)
    assert not inside.at_strongest and "note" not in inside.summary()
