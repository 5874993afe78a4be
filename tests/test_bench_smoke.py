"""Smoke test of the benchmark scripts' measurement code on the maths toy (no demo model, < 60 s).

The real benchmarks (bench/fidelity.py, bench/detect.py) train the demo CLIP and take minutes to
hours; here every measurement function runs end to end on a 60-pair toy problem, so a broken
import, a renamed engine function or a table that no longer renders is caught by the suite.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))


def _toy(n: int = 60, batch_size: int = 10):
    """A tiny contrastive problem with class structure and 10% flipped captions, at its minimiser
    (built here, independent of the maths tests' fixtures)."""
    import math

    import torch

    from ecif.influence.objective import ContrastiveData, HeadsProblem, HeadsScope, reference_batches
    from ecif.models.heads import FinetuneConfig, finetune_heads

    def features(count, seed, flip):
        generator = torch.Generator().manual_seed(seed)
        centres = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(99))
        label = torch.randint(0, 4, (count,), generator=generator)
        caption = label.clone()
        flipped = torch.rand(count, generator=generator) < flip
        caption[flipped] = (label[flipped] + 1) % 4
        image = centres[label] + 0.7 * torch.randn(count, 8, dtype=torch.float64, generator=generator)
        text = centres[caption][:, :6] + 0.7 * torch.randn(count, 6, dtype=torch.float64, generator=generator)
        norm = torch.nn.functional.layer_norm
        return norm(image, (8,)), norm(text, (6,))

    image, text = features(n, 0, 0.1)
    val_image, val_text = features(40, 1, 0.0)
    scope = HeadsScope(8, 6, 4, math.log(10.0))
    theta0 = 1.0 * torch.randn(scope.size, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    config = FinetuneConfig(delta=1.0, batch_size=batch_size, gradient_tolerance=1e-9)
    problem = HeadsProblem(scope, ContrastiveData(image, text, reference_batches(n, batch_size)), theta0, 1.0)
    theta, report = finetune_heads(problem, config=config)
    assert report.converged, report.warnings
    validation = ContrastiveData(val_image, val_text, reference_batches(40, batch_size))
    return problem, theta, validation, config


@pytest.fixture(scope="module")
def toy_engine():
    from ecif.curvature.solvers import CurvatureConfig, build_solver
    from ecif.influence.scores import gradient_of, influence_on
    from ecif.influence.test_functions import validation_loss

    problem, theta, validation, config = _toy()
    curvature = CurvatureConfig(solver="dense")
    engine = SimpleNamespace(
        problem=problem,
        theta=theta,
        theta0=problem.theta0,
        scope=problem.scope,
        finetune=config,
        curvature=curvature,
        solver=build_solver(problem, theta, curvature),
    )
    phi = validation_loss(problem.scope, validation)
    influence = influence_on(problem, theta, engine.solver, gradient_of(phi, theta))
    return engine, phi, influence


@pytest.mark.slow  # retrains the toy for leave-one-out and leave-set-out
def test_fidelity_measurements_run_on_the_toy(toy_engine, tmp_path):
    import fidelity

    engine, phi, influence = toy_engine
    args = fidelity.parse_args(["--loo", "2", "--n", "60", "--set-fraction", "0.05"])
    cache = fidelity.RetrainCache(tmp_path)
    loo = fidelity.leave_one_out(engine, influence, phi, engine.finetune, cache, args, "smoke")
    assert len(loo["records"]) == 2
    assert {r["stratum"] for r in loo["records"]} == {"top-10% harmful", "uniform"}
    assert all(r["gradient_norm"] < 1e-6 for r in loo["records"])
    fake = [
        {"actual": a, "influence": a * 1.01, "influence_first_order": a, "influence_pos_only": a * 0.8, "stratum": stratum}
        for a, stratum in ((-3e-4, "uniform"), (1e-4, "uniform"), (2e-4, "uniform"), (-1e-3, "top"), (-5e-4, "top"), (-2e-3, "top"))
    ]
    statistics = fidelity.loo_statistics(loo["records"] + fake, 0.0)
    assert {r["column"] for r in statistics} >= {"influence", "influence_pos_only"}
    # A second call reads the cached retrains instead of retraining.
    again = fidelity.leave_one_out(engine, influence, phi, engine.finetune, cache, args, "smoke")
    assert [r["actual"] for r in again["records"]] == [r["actual"] for r in loo["records"]]

    set_out = fidelity.leave_set_out(engine, influence, phi, engine.solver, engine.finetune, cache, args, "smoke")
    methods = [p["method"] for p in set_out["predictions"]]
    assert any(m.startswith("group, with renormalisation: φ") for m in methods)
    assert any(m.startswith("Newton edit, 3 steps") for m in methods)
    assert all(np.isfinite(p["relative_error"]) for p in set_out["predictions"])

    rows = fidelity.damping_sweep(engine, phi, loo, np.asarray(set_out["rows"]), set_out["retrain"]["actual"], [1e-2])
    assert [r["damping"] for r in rows] == [1e-2]
    assert all("influence_pearson" in r for r in rows)


def test_detect_renders_a_table():
    import detect

    args = detect.parse_args(["--quick"])
    assert detect.settings_of(args) == [("shapes", 0.1, "random-caption")]
    assert len(detect.settings_of(detect.parse_args([]))) == 6
    report = [
        {"score": s, "auroc": 0.9, "average_precision": 0.5, "precision@50": 0.6, "precision@100": 0.4, "base_rate": 0.1}
        for s in ("influence", "clip_score")
    ]
    result = {
        "data": "shapes", "noise": 0.1, "corruption": "random-caption", "training_pairs": 100, "corrupted": 10,
        "report": report, "stage_seconds": {"fine-tune": 1.0}, "finetune_gradient_norm": 1e-9,
    }
    markdown = detect.render(args, {"cpu": "x", "cores": 2, "ram_gib": 1, "python": "3", "torch": "2", "torch_threads": 1,
                                   "load_average_at_start": [0, 0, 0], "date_utc": "now"}, [result], [])
    assert "| ECIF (exact) | 0.900 |" in markdown
    assert "MISSED" in markdown  # AUROC 0.9 < 0.97


@pytest.mark.slow
def test_trace_bench_checks_culprits_by_retraining(scored_demo_run, tmp_path):
    """bench/trace.py's retraining check on the shared demo run's most frequent confusion (about 20 s)."""
    import importlib.util

    from ecif.run import Run
    from ecif.tasks.trace import confusions, predictions_table

    spec = importlib.util.spec_from_file_location("bench_trace", BENCH / "trace.py")  # not the standard library's trace
    bench_trace = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_trace)
    run = Run(scored_demo_run)
    first = confusions(run).iloc[0]
    table = predictions_table(run, ["test"])
    mistakes = table[~table["correct"] & (table["label"] == first["label"]) & (table["predicted"] == first["predicted"])].head(2)
    args = SimpleNamespace(verify=1, top_k=2, tolerance=1e-8)
    verified = bench_trace.verify_culprits(run, mistakes, args, cache_dir=tmp_path)
    every = {row[0]: row for row in verified["summary"]}["every culprit"]
    assert 2 <= every[1] <= 6
    assert every[5] > 0.95, f"predicted against actual change of the item's loss: Pearson {every[5]:.3f}"
    assert len(verified["group_rows"]) == (6 if len(mistakes) > 1 else 3)
    for row in verified["group_rows"]:
        assert np.sign(row[2]) == np.sign(row[3]) == -1  # removing culprits is predicted to, and does, lower the loss
    assert "Are the culprits real?" in "\n".join(bench_trace.verification_markdown(verified, args, f"mistakes (as {first['predicted']})"))
    again = bench_trace.verify_culprits(run, mistakes, args, cache_dir=tmp_path)  # resumed from the stored heads
    assert again["summary"] == verified["summary"]


@pytest.mark.slow
def test_detect_disagreements_retrains_where_ecif_and_the_planted_labels_disagree(scored_demo_run, tmp_path, monkeypatch):
    """bench/detect_disagreements.py on the shared demo run (10% random captions), two pairs per side (about 20 s)."""
    import detect_disagreements
    from fidelity import RetrainCache

    from ecif.run import Run

    monkeypatch.setattr(detect_disagreements, "scored_demo_run", lambda *args, **kwargs: Run(scored_demo_run))
    monkeypatch.setattr(detect_disagreements, "RetrainCache", lambda directory: RetrainCache(tmp_path / "retrained"))
    result = detect_disagreements.main(["--k", "2", "--results", str(tmp_path)])
    assert (tmp_path / "detect-disagreements.md").exists()
    planted, genuine = result["table"]
    assert planted[1] == genuine[1] == 2
    # The planted pairs ECIF calls valuable really are, and the genuine ones it calls harmful really are.
    assert planted[4] == genuine[4] == "2 of 2", result["records"]
    assert planted[3] > 0 > genuine[3]
