"""Smoke test of the benchmark scripts' measurement code on a toy problem (no demo model).

The real benchmarks (bench/fidelity.py, bench/fidelity_selected.py, bench/detect.py) train the
demo CLIP and take minutes to hours; here their measurement functions run end to end on toy
problems (60 to 100 pairs) with real retraining and real scores, so a broken import, a renamed
engine function, a table that no longer renders, or a measurement that no longer measures what it
says is caught by the suite.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the bench package (`python -m bench.NAME`) is at the repository root
    sys.path.insert(0, str(REPO))


@contextlib.contextmanager
def _one_thread():
    """Torch on one thread: on this toy (84 parameters) a multi-threaded run on a busy machine was
    measured 7× slower (24 s against 3.6 s for one retrain)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    with _one_thread():
        yield


def _toy(n: int = 60, batch_size: int = 10, delta: float = 3.0):
    """A tiny contrastive problem with class structure and 10% flipped captions, at its minimiser
    (built here, independent of the maths tests' fixtures); also returns the flipped flags.

    δ = 3 and 6-wide heads (84 parameters): with δ = 1 and 4-wide heads, removing one of the most
    harmful pairs moved φ by about half the predicted amount and all three predictors had LOO
    Pearson 0.83 over 12 removals, so the toy could not tell them apart.
    """
    import math

    from ecif.objective.contrastive import ContrastiveData, ContrastiveProblem, HeadsScope, reference_batches
    from ecif.config import FinetuneConfig
    from ecif.finetune import finetune_heads

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
        return norm(image, (8,)), norm(text, (6,)), flipped.numpy()

    image, text, flipped = features(n, 0, 0.1)
    val_image, val_text, _ = features(40, 1, 0.0)
    scope = HeadsScope(8, 6, 6, math.log(10.0))
    theta0 = 1.0 * torch.randn(scope.size, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    config = FinetuneConfig(delta=delta, batch_size=batch_size, gradient_tolerance=1e-9)
    problem = ContrastiveProblem(scope, ContrastiveData(image, text, reference_batches(n, batch_size)), theta0, delta)
    theta, report = finetune_heads(problem, config=config)
    assert report.converged, report.warnings
    validation = ContrastiveData(val_image, val_text, reference_batches(40, batch_size))
    return problem, theta, validation, config, flipped


@pytest.fixture(scope="module")
def toy_engine():
    from ecif.config import CurvatureConfig
    from ecif.curvature.solvers import build_solver
    from ecif.influence.scores import gradient_of, influence_on
    from ecif.objective.measurements import validation_loss

    with _one_thread():
        problem, theta, validation, config, flipped = _toy()
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
    return engine, phi, influence, flipped


@pytest.mark.slow  # retrains the toy for leave-one-out and leave-set-out (9 retrains, about 10 s)
def test_fidelity_measurements_on_the_toy_match_retraining(toy_engine, tmp_path, one_thread):
    from bench import fidelity_selected
    from bench.common import RetrainCache

    from ecif.influence.scores import gradient_of, renormalisation_step

    engine, phi, influence, _ = toy_engine
    args = fidelity_selected.parse_args(["--loo", "8", "--n", "60", "--set-fraction", "0.05"])
    cache = RetrainCache(tmp_path)
    loo = fidelity_selected.leave_one_out(engine, influence, phi, engine.finetune, cache, args, "smoke")
    records = loo["records"]
    assert [r["stratum"] for r in records].count("top-10% harmful") == 4 and len(records) == 8
    assert all(r["gradient_norm"] < 1e-6 for r in records)
    # the same renormalisation shift fidelity_selected.main passes (one constant for every single pair)
    renorm_shift = float(gradient_of(phi, engine.theta) @ renormalisation_step(engine.problem, engine.theta, engine.solver, 1))
    # measured −0.0266 against a median |Δφ| of 0.0219: a first-order term, the size of a score itself
    assert abs(renorm_shift) > 0.1 * np.median(np.abs(influence.influence))
    statistics = fidelity_selected.loo_statistics(records, renorm_shift)
    assert {r["subset"] for r in statistics} == {"all", "uniform only", "top-10% harmful only"}
    for row in statistics:
        assert -1.0 <= row["pearson"] <= 1.0 and -1.0 <= row["spearman"] <= 1.0, row
        assert np.isfinite(row["slope"]) and row["median_relative_error"] >= 0.0, row
    overall = {r["column"]: r for r in statistics if r["subset"] == "all"}
    # measured over these 8 removals: Pearson exact 0.9992, first order 0.985, positive-only 0.936
    assert overall["influence"]["pearson"] >= 0.97, overall
    assert overall["influence"]["pearson"] > overall["influence_pos"]["pearson"] + 0.03, overall
    # A second call reads the cached retrains instead of retraining.
    again = fidelity_selected.leave_one_out(engine, influence, phi, engine.finetune, cache, args, "smoke")
    assert [r["actual"] for r in again["records"]] == [r["actual"] for r in records]

    set_out = fidelity_selected.leave_set_out(engine, influence, phi, engine.solver, engine.finetune, cache, args, "smoke")
    predictions = {p["method"]: p for p in set_out["predictions"]}
    assert len(set_out["rows"]) == 3 and set_out["retrain"]["actual"] < 0  # removing the 3 most harmful lowers φ
    assert all(np.isfinite(p["relative_error"]) for p in predictions.values())
    # measured relative errors: group with renormalisation 0.035, without 0.364 (the 1/N → 1/(N−k)
    # term is first order, not negligible); Newton edit 1 step 0.015, 3 steps 0.0003
    group = predictions["group, with renormalisation: φ(θ̂+Δθ)"]["relative_error"]
    assert group <= 0.2
    assert predictions["group, without renormalisation: φ(θ̂+Δθ)"]["relative_error"] > 2 * group
    assert predictions["Newton edit, 3 steps: φ(θ)"]["relative_error"] <= predictions["Newton edit, 1 step: φ(θ)"]["relative_error"]

    # damping_sweep undamps the dense matrix of the solver it is given in place: give it its own
    from ecif.curvature.solvers import build_solver

    own = SimpleNamespace(**{**vars(engine), "solver": build_solver(engine.problem, engine.theta, engine.curvature)})
    rows = fidelity_selected.damping_sweep(own, phi, loo, np.asarray(set_out["rows"]), set_out["retrain"]["actual"], [1e-2])
    assert [r["damping"] for r in rows] == [1e-2]
    # λ = 1e-2 against the solver's 1e-4, on the same retrains: measured Pearson 0.99919 against 0.99920
    assert abs(rows[0]["influence_pearson"] - overall["influence"]["pearson"]) < 0.01, rows


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")  # a 3-point resample can be one point repeated
def test_uniform_fidelity_measurements_on_the_weak_penalty_toy(tmp_path, one_thread):
    """bench/fidelity.py end to end on the weak-penalty toy (δ = 0.03, 100 pairs, 64 parameters, where
    the data's curvature dominates δ·I): polished θ̂ and dense solver, single-pair predictions, uniform
    leave-one-out with its chord-Newton retrain (cached), the LDS, the bootstrap, and the report
    rebuilt from the JSON output with ``--from-json`` (about 10 s)."""
    import json

    from bench import fidelity
    from bench.common import RetrainCache, correlations, machine_info, publish
    from maths_fixtures import make_weak_penalty_toy

    from ecif.config import CurvatureConfig
    from ecif.objective.contrastive import contrastive_loss
    from ecif.config import FinetuneConfig

    tolerance = 1e-10
    toy = make_weak_penalty_toy()
    assert toy.report.converged, toy.report.warnings
    problem, delta = toy.problem, toy.problem.delta
    engine = SimpleNamespace(  # what fidelity.regime reads of a loaded engine
        scope=problem.scope, problem=problem, theta0=problem.theta0,
        finetune=FinetuneConfig(delta=delta, batch_size=20), curvature=CurvatureConfig(solver="dense", damping=1e-4),
    )
    cache = RetrainCache(tmp_path / "retrained")
    current = fidelity.regime(engine, "auto δ", delta, toy.theta, tolerance, cache, "smoke")
    assert isinstance(current, fidelity.Regime) and current.solver.name == "dense"
    assert current.polish["gradient_norm"] <= tolerance and current.polish["smallest_eigenvalue_dense"] > 0, current.polish

    def phi(theta):
        return contrastive_loss(problem.scope, theta, toy.validation)

    predictions = fidelity.single_pair_predictions(current, phi)
    assert set(predictions) == {column for column, _ in fidelity.LOO_PREDICTORS}
    assert all(len(values) == problem.data.n_pairs and np.isfinite(values).all() for values in predictions.values())

    rows = np.sort(np.random.default_rng(0).choice(problem.data.n_pairs, 3, replace=False))
    records = fidelity.leave_one_out(current, phi, predictions, rows, cache, "smoke", tolerance)
    assert [r["row"] for r in records] == rows.tolist()
    assert all(r["gradient_norm"] <= tolerance for r in records), [r["gradient_norm"] for r in records]
    actual = [r["actual"] for r in records]
    exact, _ = correlations([r["influence"] for r in records], actual)
    identity, _ = correlations([r["influence_identity"] for r in records], actual)
    # measured: exact ECIF 0.979, with H := δ·I 0.720 (and 25 to 110 times too large)
    assert exact > 0.9 and exact > identity + 0.1, (exact, identity)
    # A second call reads the cached retrains: the very same records.
    assert fidelity.leave_one_out(current, phi, predictions, rows, cache, "smoke", tolerance) == records

    # 5% subsets: half subsets collapse this toy's heads onto the origin at δ = 0.03 (no minimiser to retrain to)
    lds = fidelity.linear_datamodeling(current, phi, predictions, 3, 0.05, 0, cache, "smoke", tolerance)
    assert [r["subset"] for r in lds] == [0, 1, 2]
    assert all(r["gradient_norm"] <= tolerance for r in lds), [r["gradient_norm"] for r in lds]
    lds_pearson, _ = correlations([r["influence"] for r in lds], [r["actual"] for r in lds])
    assert lds_pearson > 0.9, lds_pearson  # measured 0.9998

    groups = [(np.array([r["influence"] for r in part]), np.array([r["actual"] for r in part])) for part in (records, lds)]
    entry = fidelity.bootstrap_mean_correlation(groups, 200)
    assert entry["per_seed_pearson"] == pytest.approx([exact, lds_pearson])
    assert entry["pearson"] == pytest.approx((exact + lds_pearson) / 2)
    for name in ("pearson", "spearman"):  # resampled correlations can differ from the point one in the last bit
        assert -1 <= entry[f"{name}_low"] <= entry[name] + 1e-12 and entry[name] <= entry[f"{name}_high"] + 1e-12 <= 1 + 2e-12, entry

    # The report, from a result shaped as measure_seed's, then rebuilt from its JSON output (--from-json).
    regime_entry = {"delta": delta, "polish": current.polish, "loo": records, "lds": lds}
    result = {"dataset": "toy", "seed": 0, "auto_delta": delta, "smallest_delta": delta,
              "regimes": {"auto δ": regime_entry, "smallest convergent δ": regime_entry}}
    args = fidelity.parse_args(["--seeds", "0", "--loo", "3", "--lds", "3", "--lds-fraction", "0.05", "--n", "100", "--bootstrap", "50"])
    summary = fidelity.summarise([result], args.bootstrap)
    assert summary[("toy", "auto δ", "loo", "exact ECIF")]["pearson"] == pytest.approx(exact)
    assert summary[("toy", "auto δ", "lds", "exact ECIF")]["pearson"] == pytest.approx(lds_pearson)
    markdown = fidelity.report(args, [result], summary, 60.0)
    assert "## Linear datamodeling score" in markdown and "Total time 1 min." in markdown
    publish("smoke", {"settings": vars(args) | {"work": None, "results": None}, "machine": machine_info(), "seconds": 60.0, "results": [result]},
            markdown, tmp_path)
    fidelity.main(["--from-json", f"{tmp_path / 'smoke.json'},{tmp_path / 'smoke.json'}", "--results", str(tmp_path),
                   "--name", "combined", "--bootstrap", "50", "--threads", "1", "--loo", "99"])
    combined = json.loads((tmp_path / "combined.json").read_text())
    assert len(combined["results"]) == 2 and combined["seconds"] == 120.0
    assert combined["settings"]["loo"] == 3  # the first file's settings, not the command line's
    assert "3 removals per seed" in (tmp_path / "combined.md").read_text()


def test_detect_report_and_table_from_real_scores(toy_engine, one_thread):
    """bench/detect.py's table from ecif.detection_report on the toy's real scores and planted flips."""
    import pandas as pd

    from bench import detect

    import ecif
    from ecif.objective.contrastive import clip_scores, pair_losses
    from ecif.influence.scores import self_influence

    args = detect.parse_args(["--quick"])
    assert detect.settings_of(args) == [("shapes", 0.1, "random-caption")]
    assert len(detect.settings_of(detect.parse_args([]))) == 6
    engine, _, influence, flipped = toy_engine
    problem, theta = engine.problem, engine.theta
    with torch.no_grad():
        clip, loss = clip_scores(problem.scope, theta, problem.data.image, problem.data.text), pair_losses(problem.scope, theta, problem.data)
    scores = pd.DataFrame(
        {
            "influence": influence.influence,
            "influence_first_order": influence.influence_first_order,
            "influence_pos": influence.influence_pos,
            "self_influence": self_influence(problem, theta, engine.solver),
            "self_influence_first_order": self_influence(problem, theta, engine.solver, negative="first_order"),
            "clip_score": clip.numpy(),
            "loss": loss.numpy(),
            "corrupted": flipped,
        }
    )
    report = ecif.detection_report(scores)
    by_score = {r["score"]: r for r in report.to_dict(orient="records")}
    assert set(by_score) == set(detect.LABELS)
    for row in by_score.values():
        assert 0.0 <= row["auroc"] <= 1.0 and 0.0 <= row["average_precision"] <= 1.0, row
        assert row["base_rate"] == pytest.approx(flipped.mean())
    # the 6 planted flips are found above chance, and better than by CLIP-score (measured AUROC: influence
    # 0.799, first order 0.750, positive-only 0.722, self-influence 0.608 / 0.623 (first order),
    # CLIP-score 0.546, pair loss 0.568)
    assert by_score["influence"]["auroc"] > 0.7, by_score["influence"]
    assert by_score["influence"]["auroc"] > by_score["clip_score"]["auroc"] + 0.1, by_score

    result = {
        "data": "shapes", "noise": 0.1, "corruption": "random-caption", "training_pairs": len(scores),
        "corrupted": int(flipped.sum()), "report": report.to_dict(orient="records"),
        "stage_seconds": {"fine-tune": 1.0}, "finetune_gradient_norm": 1e-9,
    }
    machine = {"cpu": "x", "cores": 2, "ram_gib": 1, "python": "3", "torch": "2", "torch_threads": 1,
               "load_average_at_start": [0, 0, 0], "date_utc": "now"}
    markdown = detect.render(args, machine, [result], [])
    from bench.common import fmt

    auroc = by_score["influence"]["auroc"]
    assert f"| ECIF (exact) | {fmt(auroc)} | {fmt(by_score['influence']['average_precision'])} |" in markdown
    assert f"ECIF (exact): AUROC {auroc:.4f} → {'MET' if auroc >= detect.TARGET_AUROC else 'MISSED'}" in markdown


@pytest.mark.slow
def test_trace_bench_checks_culprits_by_retraining(scored_demo_run, tmp_path):
    """bench/trace.py's retraining check on the shared demo run's most frequent confusion (about 20 s)."""
    from bench import trace as bench_trace
    from ecif.run import Run
    from ecif.tasks.trace import confusions, predictions_table

    run = Run(scored_demo_run)
    first = confusions(run).iloc[0]
    table = predictions_table(run, ["test"])
    mistakes = table[~table["correct"] & (table["label"] == first["label"]) & (table["predicted"] == first["predicted"])].head(2)
    args = SimpleNamespace(verify=1, top_k=2, tolerance=1e-8)
    verified = bench_trace.verify_culprits(run, mistakes, args, cache_dir=tmp_path)
    every = {row[0]: row for row in verified["summary"]}["every culprit"]
    assert 2 <= every[1] <= 6
    # Every culprit's removal actually lowers the item's loss, and ECIF gets the size right to within a
    # factor of two on average.  Culprits are the pairs with the largest self-influence, where at the
    # auto δ (0.03 on the demo) the single-pair response is visibly non-linear (bench/results/fidelity.md,
    # "Where exact ECIF's error is"): measured Pearson 0.890 over 5 culprits here (0.95+ at δ = 1).
    assert every[4] == 1.0, verified["singles"]
    assert 0.5 < every[3] / every[2] < 2.0, (every[2], every[3])
    assert every[5] > 0.75, f"predicted against actual change of the item's loss: Pearson {every[5]:.3f}"
    assert len(verified["group_rows"]) == (6 if len(mistakes) > 1 else 3)
    for row in verified["group_rows"]:
        assert np.sign(row[2]) == np.sign(row[3]) == -1  # removing culprits is predicted to, and does, lower the loss
    assert "Are the culprits real?" in "\n".join(bench_trace.verification_markdown(verified, args, f"mistakes (as {first['predicted']})"))
    again = bench_trace.verify_culprits(run, mistakes, args, cache_dir=tmp_path)  # resumed from the stored heads
    assert again["summary"] == verified["summary"]


@pytest.mark.slow
def test_detect_disagreements_retrains_where_ecif_and_the_planted_labels_disagree(scored_demo_run, tmp_path, monkeypatch):
    """bench/detect_disagreements.py on the shared demo run (10% random captions), two pairs per side (about 20 s)."""
    from bench import detect_disagreements
    from bench.common import RetrainCache

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


def test_cleaning_and_tuned_peer_reports_from_synthetic_results():
    """bench.cleaning's paired intervals and bench.peers.tuned's summary, on made-up results: a method
    that gets every test item right beats random by exactly its accuracy gap, with an interval around it."""
    import numpy as np

    from bench import cleaning
    from bench.peers import tuned

    rng = np.random.default_rng(0)
    machine = {"cpu": "x", "cores": 2, "ram_gib": 1, "python": "3", "torch": "2", "torch_threads": 1,
               "load_average_at_start": [0, 0, 0], "date_utc": "now"}
    results = []
    for seed in range(3):
        random_correct = rng.random(200) < 0.8
        removals = [{"method": name, "fraction": 0.1, "removed": 10, "corrupted_removed": 5, "phi": 0.5,
                     "correct": (np.ones(200, bool) if name == "influence" else random_correct).tolist(),
                     "loss": rng.random(200).tolist()} for name, _, _ in cleaning.METHODS]
        results.append({"dataset": "shapes", "seed": seed, "delta": 0.03, "training_pairs": 100, "test_items": 200,
                        "before": {"phi": 0.6, "correct": random_correct.tolist(), "loss": rng.random(200).tolist()},
                        "removals": removals})
    point, low, high = cleaning.paired_interval(results, "influence", 0.1, "correct", 200, "random")
    expected = np.mean([1 - np.mean(r["before"]["correct"]) for r in results])
    assert point == pytest.approx(expected) and low < point < high
    markdown, rows = cleaning.report(results, 50, machine)
    assert "## 10% removed" in markdown and len(rows) == len(cleaning.METHODS)

    actual = rng.normal(size=30)
    peer_results = [{"dataset": "shapes", "seed": seed, "delta": 0.03, "delta_label": "auto", "loo_actual": actual.tolist(),
                     "lds_actual": actual[:20].tolist(), "chosen": {f: "x" for f in ("trak", "kronfluence", "tracin")},
                     "tuning_spearman": {f: {"x": 0.5} for f in ("trak", "kronfluence", "tracin")},
                     "loo_predicted": {family: (actual + rng.normal(scale=0.1 if family == "influence" else 3.0, size=30)).tolist()
                                       for family, _ in tuned.FAMILIES},
                     "lds_predicted": {family: actual[:20].tolist() for family, _ in tuned.FAMILIES}} for seed in range(3)]
    summary = tuned.summarise(peer_results, 100)
    by_family = {row["family"]: row for row in summary}
    assert by_family["influence"]["loo"]["spearman"] > 0.9 > by_family["trak"]["loo"]["spearman"]
    assert "TRAK, tuned" in tuned.report(peer_results, summary, machine, None)


def test_detect_sweep_reads_runs_and_compares_the_default_with_every_single_column(tmp_path):
    """bench.detect_sweep on two made-up runs of one setting: it reads the scores back, recomputes the
    default detector, and finds it within the tolerance of a clean CLIP-score where self-influence is blind
    (the case an equal-weight sum misses)."""
    import json

    import pandas as pd

    from bench import detect_sweep

    rng = np.random.default_rng(0)
    runs = []
    for seed in (0, 1):
        corrupted = np.arange(400) < 40
        scores = pd.DataFrame({
            "corrupted": corrupted,
            "clip_score": np.where(corrupted, rng.normal(0.0, 0.05, 400), rng.normal(0.3, 0.05, 400)),
            "self_influence_first_order": rng.lognormal(0.0, 1.0, 400),  # blind to the corruption
            "influence": rng.normal(0, 1, 400),
        })
        run_dir = tmp_path / f"run{seed}"
        run_dir.mkdir()
        scores.to_parquet(run_dir / "scores.parquet")
        path = tmp_path / f"detect-shapes-absorbed-seed{seed}-as.json"
        path.write_text(json.dumps({"results": [{"run_dir": str(run_dir), "noise": 0.1, "corruption": "attribute-swap"}]}))
        runs.append(str(path))
    records = detect_sweep.collect(runs)
    assert [r["seed"] for r in records] == [0, 1] and records[0]["backbone"] == "absorbed"
    rows = detect_sweep.summarise(records, draws=20)
    (row,) = rows
    assert row["best_single"] == "clip_score" and row["ap"]["clip_score"] > 0.99
    assert row["gap"] >= -detect_sweep.TOLERANCE > row["equal_weight_gap"]
    assert "met** in 1 of 1" in detect_sweep.report(rows, None)
