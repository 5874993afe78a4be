"""ECIF against actual retraining where the curvature matters: uniform removals, two penalties, seeds.

For each data set (shapes, digits) and seed, on a demo run scored with the library's defaults
(δ chosen on held-out trusted pairs, dense reference solver), this script

1. takes two penalties: the **auto δ** the run chose, and the **smallest δ of the grid whose
   fine-tune converged** (weaker penalty: the heads move further from θ₀ and the curvature is far
   from δ·I); θ̂ is polished to a gradient norm of ``--tolerance`` at each and the dense Hessian
   rebuilt there;
2. **leave-one-out on uniform removals**: ``--loo`` training pairs drawn uniformly (not chosen by any
   predictor), each actually re-fine-tuned from θ̂ to ``--tolerance`` (Newton–CG, preconditioned by
   the full problem's Hessian: the preconditioner changes the speed, not the minimiser), against the
   predictions of exact ECIF, first-order ECIF, positive-only (classical) influence and exact ECIF
   with the curvature replaced by ``δ·I`` (what the curvature contributes); plus two diagnostics of
   where exact ECIF's remaining error comes from: ``φ(θ̂ + Δθ_n)`` (the test function's own
   curvature) and a second Newton step on the reduced objective (the response's non-linearity);
3. at the auto δ, **leave-set-out** (the 1%, 5%, 10% most harmful by exact ECIF, retrained) and the
   **linear datamodeling score** (LDS: ``--lds`` random half-subsets removed and retrained; Spearman
   between the summed single-pair predictions and the actual changes across subsets).

Every correlation is reported per seed and as the mean over seeds with a 95% bootstrap interval
(removals / subsets resampled within each seed).  Retrains are cached (resumable).  The older
benchmark on selected removals (half from the 10% most harmful; damping and δ sweeps) is
``bench/fidelity_selected.py``.

    .venv/bin/python -m bench.fidelity                    # shapes and digits, seeds 0 1 2, 50 removals, 20 subsets
    .venv/bin/python -m bench.fidelity --quick            # shapes, seed 0, 12 removals, 6 subsets
    .venv/bin/python -m bench.fidelity --datasets digits --name fidelity-digits   # one data set (e.g. in parallel)
    .venv/bin/python -m bench.fidelity --loss siglip --datasets shapes --seeds 0 --lds 0 --sets "" --weak-loo 0
                                                          # the SigLIP demo (sigmoid loss) → fidelity-siglip.md/.json
    .venv/bin/python -m bench.fidelity --from-json bench/results/fidelity-shapes.json,bench/results/fidelity-digits.json
                                                          # one table from earlier runs' JSON, nothing measured
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

from bench import common
from bench.common import RetrainCache, correlations
from ecif.config import LOSSES

LOO_PREDICTORS = (
    ("influence", "exact ECIF"),
    ("influence_first_order", "first-order ECIF"),
    ("influence_pos_only", "positive-only (classical IF)"),
    ("influence_identity", "exact ECIF with H := δ·I"),
)
DIAGNOSTICS = (
    ("nonlinear_test", "exact Δθ, φ(θ̂+Δθ) instead of ∇φᵀΔθ"),
    ("newton_two_steps", "two Newton steps on the reduced objective"),
)
TARGET_PEARSON, TARGET_SPEARMAN = 0.98, 0.97


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.argument_parser(__doc__, __spec__.name)
    parser.add_argument("--quick", action="store_true", help="shapes, seed 0, 12 removals, 6 subsets")
    parser.add_argument("--datasets", default=None, help="comma-separated (default shapes,digits)")
    parser.add_argument("--seeds", default=None, help="comma-separated data/model seeds (default 0,1,2)")
    parser.add_argument("--n", type=int, default=3000, help="demo size (all splits)")
    parser.add_argument("--loo", type=int, default=None, help="uniform single-pair removals per seed and δ (default 50)")
    parser.add_argument("--weak-loo", type=int, default=None,
                        help="of those, how many at the smallest convergent δ (default all; its retrains are the slowest)")
    parser.add_argument("--lds", type=int, default=None, help="random half-subsets for the LDS (default 20; 0: none)")
    parser.add_argument("--loss", default=None, choices=list(LOSSES),
                        help="the demo CLIP's training loss and the objective's (default: the library's, CLIP's softmax); "
                        "its own run folders, and results named fidelity-LOSS unless --name is given")
    parser.add_argument("--lds-fraction", type=float, default=0.5)
    parser.add_argument("--sets", default="0.01,0.05,0.1", help="leave-set-out fractions (most harmful first)")
    parser.add_argument("--tolerance", type=float, default=1e-10, help="gradient-norm tolerance of θ̂ and every retrain")
    parser.add_argument("--bootstrap", type=int, default=2000)
    common.add_common_arguments(parser, seed=False, name="fidelity")
    parser.add_argument(
        "--from-json", default=None, metavar="FILE[,FILE...]",
        help="measure nothing: concatenate the results of earlier JSON outputs of this script (e.g. separate shapes "
        "and digits runs) and write one report from them; the settings in the report are the first file's",
    )
    args = parser.parse_args(argv)
    args.datasets = (args.datasets or ("shapes" if args.quick else "shapes,digits")).split(",")
    args.seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    args.loo = args.loo or (12 if args.quick else 50)
    args.lds = args.lds if args.lds is not None else (6 if args.quick else 20)
    if args.loss and args.name == "fidelity":
        args.name = f"fidelity-{args.loss}"
    return args


# --- set-up -----------------------------------------------------------------------------------------


def backbone(work: Path, dataset: str, seed: int, n: int, loss: str | None = None) -> Path | None:
    """The demo CLIP scored for this seed: shapes seeds use their own model (the app demo's for seed 0);
    digits seeds 1 and 2 reuse the seed-0 digits model on their own data draw (one training run instead
    of three; the data, its noise and the batching still change with the seed)."""
    if dataset == "shapes" or seed == 0:
        return None
    from ecif.run import Run

    run = common.scored_demo_run(work, dataset, n, seed=0, loss=loss)
    return Path(Run(run.directory).info["demo_checkpoint"])


@dataclasses.dataclass
class Regime:
    """One penalty: the problem at δ, its polished minimiser, the dense reference solver there."""

    label: str
    delta: float
    problem: object
    theta: object
    solver: object
    polish: dict


def regime(engine, label: str, delta: float, start, tolerance: float, cache: RetrainCache, key: str) -> Regime:
    """The problem at ``delta``, its minimiser polished to ``tolerance`` from ``start``, and the dense solver there.

    L-BFGS first; then Newton–CG preconditioned by the dense Hessian at the L-BFGS point (at weak δ
    plain conjugate gradient needs thousands of products per Newton step).  When the curvature is not
    positive definite the regime has no solver and ``polish["converged"]`` is False.
    """
    import torch

    from ecif.config import CurvatureConfig
    from ecif.curvature.solvers import CurvatureNotPositiveDefinite, build_solver
    from ecif.finetune import finetune_heads
    from ecif.objective.contrastive import ContrastiveProblem

    problem = ContrastiveProblem(engine.scope, engine.problem.data, engine.theta0, delta)
    dense = CurvatureConfig(solver="dense", damping=engine.curvature.damping)
    path = cache.directory / f"{key}-theta.pt"
    record = cache.get(f"{key}-theta")
    if record is None or not path.exists():
        started = time.perf_counter()
        config = dataclasses.replace(engine.finetune, delta=delta, gradient_tolerance=tolerance, newton_steps=0)
        theta, report = finetune_heads(problem, start, config)
        if not report.converged and report.gradient_norm <= config.newton_start_gradient:
            try:
                preconditioner = build_solver(problem, theta, dense)
                theta, report = finetune_heads(problem, theta, dataclasses.replace(config, max_lbfgs_iterations=0, newton_steps=12),
                                               preconditioner=preconditioner)
            except CurvatureNotPositiveDefinite as error:
                report.warnings.append(str(error))
        torch.save(theta, path)
        record = {key_: getattr(report, key_) for key_ in ("gradient_norm", "smallest_hessian_eigenvalue", "smallest_prenorm_norm", "converged", "warnings")}
        record["seconds"] = time.perf_counter() - started
        record["parameter_change"] = float((theta - engine.theta0).norm())
        cache.put(f"{key}-theta", record)
    theta = torch.load(path, weights_only=True)
    started = time.perf_counter()
    try:
        solver = build_solver(problem, theta, dense)
        smallest = solver.smallest_eigenvalue
    except CurvatureNotPositiveDefinite:
        solver, smallest = None, float("nan")
        record = {**record, "converged": False}
    record = {**record, "dense_seconds": time.perf_counter() - started, "smallest_eigenvalue_dense": smallest}
    return Regime(label, delta, problem, theta, solver, record)


def retrain(current: Regime, rows, tolerance: float):
    """Actually re-fine-tune without ``rows`` from θ̂ to ``‖∇R‖ ≤ tolerance``; return ``(θ, report, seconds)``.

    First chord Newton (θ ← θ − H(θ̂)⁻¹∇R₋(θ), reusing the full problem's dense factor: one gradient and
    one triangular solve per step, a few times faster than Newton–CG for the small moves of single
    removals); when that has not converged in 40 steps (large removals), L-BFGS and Newton–CG
    preconditioned by the same factor.  Only the final gradient norm decides: the minimiser does not
    depend on the route.
    """
    import torch

    from ecif.config import FinetuneConfig
    from ecif.finetune import finetune_heads
    from ecif.influence.scores import reduced_problem

    started = time.perf_counter()
    reduced = reduced_problem(current.problem, list(map(int, rows)))
    gradient_of = torch.func.grad(reduced.objective)
    theta = current.theta.clone()
    norm = float("inf")
    for _ in range(40):
        gradient = gradient_of(theta)
        norm = float(gradient.norm())
        if norm <= tolerance or not math.isfinite(norm):
            break
        theta = theta - current.solver.solve(gradient)
    config = FinetuneConfig(
        delta=current.delta, gradient_tolerance=tolerance, max_lbfgs_iterations=0, newton_steps=30, curvature_check_products=2
    )
    if not norm <= tolerance:
        theta, report = finetune_heads(reduced, current.theta, config, preconditioner=current.solver)
        if not report.converged:  # far from θ̂: L-BFGS first, then the same Newton polish
            theta, report = finetune_heads(reduced, theta, dataclasses.replace(config, max_lbfgs_iterations=3000), preconditioner=current.solver)
    else:
        # The retrained heads are a few 1e-3 from θ̂, where the dense Hessian is positive definite;
        # two products suffice for the report's (upper-bound) eigenvalue.
        from ecif.finetune import convergence_report

        report = convergence_report(reduced, theta, config)
    return theta, report, time.perf_counter() - started


# --- predictions ----------------------------------------------------------------------------------------


def single_pair_predictions(current: Regime, phi) -> dict:
    """Every pair's predicted Δφ by each predictor ``[N]``."""
    import torch

    from ecif.influence.scores import influence_along

    gradient = torch.func.grad(phi)(current.theta)
    influence = influence_along(current.problem, current.theta, current.solver.solve(gradient))
    identity = influence_along(current.problem, current.theta, gradient / current.delta)
    return {
        "influence": influence.influence,
        "influence_first_order": influence.influence_first_order,
        "influence_pos_only": influence.influence_pos,
        "influence_identity": identity.influence,
    }


def diagnostics(current: Regime, phi, row: int) -> dict:
    """Exact ECIF's Δθ evaluated non-linearly (one Newton step on the reduced objective, what
    ``ecif edit`` does), and a second step (``ecif.influence.scores.refined_removal_effect``): where
    the remaining error of the linear prediction is."""
    from ecif.influence.scores import refined_removal_effect

    one, two = (float(refined_removal_effect(current.problem, current.theta, current.solver, phi, [row], steps)[0]) for steps in (1, 2))
    return {"nonlinear_test": one, "newton_two_steps": two}


# --- statistics -----------------------------------------------------------------------------------------


def bootstrap_mean_correlation(groups: list[tuple], draws: int, seed: int = 0) -> dict:
    """Mean over seeds of (Pearson, Spearman), with 95% intervals from resampling within each seed.

    ``groups``: one ``(predicted, actual)`` pair of arrays per seed.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    point = np.array([correlations(p, a) for p, a in groups])
    samples = []
    for _ in range(draws):
        values = []
        for predicted, actual in groups:
            pick = rng.integers(0, len(actual), len(actual))
            values.append(correlations(np.asarray(predicted)[pick], np.asarray(actual)[pick]))
        samples.append(np.nanmean(values, axis=0))
    samples = np.array(samples)
    low, high = np.nanpercentile(samples, [2.5, 97.5], axis=0)
    return {
        "pearson": float(np.nanmean(point[:, 0])), "pearson_low": float(low[0]), "pearson_high": float(high[0]),
        "spearman": float(np.nanmean(point[:, 1])), "spearman_low": float(low[1]), "spearman_high": float(high[1]),
        "per_seed_pearson": point[:, 0].tolist(), "per_seed_spearman": point[:, 1].tolist(),
    }


def interval(entry: dict, name: str) -> str:
    return f"{entry[name]:.3f} [{entry[name + '_low']:.3f}, {entry[name + '_high']:.3f}]"


# --- the measurements -----------------------------------------------------------------------------------


def leave_one_out(current: Regime, phi, predictions: dict, rows, cache: RetrainCache, key: str, tolerance: float) -> list[dict]:
    base = float(phi(current.theta))
    records = []
    for position, row in enumerate(rows, start=1):
        record = cache.get(f"{key}-loo-{row}")
        if record is None:
            theta, report, seconds = retrain(current, [row], tolerance)
            record = {
                "row": int(row), "actual": float(phi(theta)) - base, "gradient_norm": report.gradient_norm,
                "converged": report.converged, "newton_steps": report.newton_steps, "seconds": seconds,
                "parameter_change": float((theta - current.theta).norm()),
                **diagnostics(current, phi, int(row)),
            }
            cache.put(f"{key}-loo-{row}", record)
        record = {**record, **{column: float(predictions[column][row]) for column, _ in LOO_PREDICTORS}}
        records.append(record)
        if position % 10 == 0 or position == len(rows):
            common.log(f"{key}: LOO {position}/{len(rows)} (last retrain {record['seconds']:.1f}s, |grad| {record['gradient_norm']:.1e})")
    return records


def leave_set_out(current: Regime, phi, predictions: dict, fractions, cache: RetrainCache, key: str, tolerance: float) -> list[dict]:
    import numpy as np
    import torch

    from ecif.influence.scores import predicted_step

    base = float(phi(current.theta))
    gradient_dot = None
    out = []
    for fraction in fractions:
        count = max(1, int(round(fraction * current.problem.data.n_pairs)))
        rows = np.argsort(predictions["influence"], kind="stable")[:count]
        record = cached_removal(current, phi, base, rows, cache, f"{key}-set-{count}", tolerance, removed=count)
        if gradient_dot is None:
            gradient_dot = torch.func.grad(phi)(current.theta)
        group = predicted_step(current.problem, current.theta, current.solver, rows, estimate="group", renormalise=True)
        additive = predicted_step(current.problem, current.theta, current.solver, rows, estimate="additive", renormalise=True)
        entry = {"fraction": fraction, **record,
                 "group_nonlinear": float(phi(current.theta + group)) - base,
                 "group_linear": float(gradient_dot @ group),
                 "additive_linear": float(gradient_dot @ additive)}
        for name in ("group_nonlinear", "group_linear", "additive_linear"):
            entry[f"{name}_relative_error"] = abs(entry[name] - entry["actual"]) / max(abs(entry["actual"]), 1e-300)
        out.append(entry)
        common.log(f"{key}: set {count} removed: actual {entry['actual']:+.4e}, group {entry['group_nonlinear']:+.4e}")
    return out


def cached_removal(current: Regime, phi, base: float, rows, cache: RetrainCache, key: str, tolerance: float, **labels) -> dict:
    """The actual change of φ when ``rows`` are removed and the heads retrained (from ``cache`` when there)."""
    record = cache.get(key)
    if record is None:
        theta, report, seconds = retrain(current, rows, tolerance)
        record = {**labels, "actual": float(phi(theta)) - base, "gradient_norm": report.gradient_norm,
                  "converged": report.converged, "seconds": seconds}
        cache.put(key, record)
    return record


def linear_datamodeling(current: Regime, phi, predictions: dict, subsets: int, fraction: float, seed: int,
                        cache: RetrainCache, key: str, tolerance: float) -> list[dict]:
    import numpy as np

    n = current.problem.data.n_pairs
    rng = np.random.default_rng(10_000 + seed)
    base = float(phi(current.theta))
    out = []
    for index in range(subsets):
        removed = np.sort(rng.choice(n, int(round(fraction * n)), replace=False))
        record = cached_removal(current, phi, base, removed, cache, f"{key}-lds-{index}", tolerance, subset=index)
        out.append({**record, **{column: float(predictions[column][removed].sum()) for column, _ in LOO_PREDICTORS}})
        common.log(f"{key}: LDS subset {index + 1}/{subsets} ({record['seconds']:.0f}s)")
    return out


def measure_seed(args, dataset: str, seed: int) -> dict:
    import numpy as np

    from ecif.tasks.engine import load_engine

    work = common.work_dir(args)
    run = common.scored_demo_run(work, dataset, args.n, seed=seed, checkpoint=backbone(work, dataset, seed, args.n, args.loss),
                                 loss=args.loss)
    engine = load_engine(run)
    selection = run.info["stages"]["fine-tune"].get("delta_selection") or {}
    sweep = selection.get("sweep", [])
    auto_delta = float(engine.delta)
    cache = RetrainCache(Path(run.directory) / "bench-fidelity-uniform")
    phi = engine.trusted_loss()
    out = {"dataset": dataset, "seed": seed, "run": str(run.directory), "auto_delta": auto_delta,
           "sweep": sweep, "training_pairs": engine.problem.data.n_pairs, "trusted_pairs": engine.trusted_data.n_pairs, "regimes": {}}
    rows = np.sort(np.random.default_rng(seed).choice(engine.problem.data.n_pairs, args.loo, replace=False))

    key = f"{dataset}-s{seed}-d{auto_delta:g}"
    common.log(f"{key}: polishing θ̂ and building the dense Hessian")
    current = regime(engine, "auto δ", auto_delta, engine.theta, args.tolerance, cache, key)
    out["regimes"]["auto δ"] = measure_regime(args, current, phi, rows, seed, cache, key, with_sets=True)

    if args.weak_loo == 0:  # the weak-penalty regime not measured for this seed
        out["smallest_delta"] = None
        return out
    # The smallest convergent δ: the sweep stops early for speed (sweep_lbfgs_iterations), so walk the
    # grid below the auto δ again with the full fine-tuning budget and keep the last δ that converges.
    smallest = current
    for delta in (d for d in engine.finetune.delta_grid if d < auto_delta):
        key = f"{dataset}-s{seed}-d{delta:g}"
        common.log(f"{key}: fine-tuning with the full budget, polishing θ̂ and building the dense Hessian")
        candidate = regime(engine, "smallest convergent δ", delta, smallest.theta, args.tolerance, cache, key)
        out.setdefault("weaker_deltas_tried", []).append({"delta": delta, **candidate.polish})
        if not (candidate.polish["converged"] and candidate.polish["smallest_eigenvalue_dense"] > 0):
            break
        smallest = candidate
    out["smallest_delta"] = smallest.delta
    if smallest is current:
        out["regimes"]["smallest convergent δ"] = out["regimes"]["auto δ"]
    else:
        key = f"{dataset}-s{seed}-d{smallest.delta:g}"
        # The demo's pairs are drawn independently row by row, so the first rows of a uniform draw are
        # a uniform draw too (and the ones an interrupted full run already retrained).
        weak_rows = rows if args.weak_loo is None else rows[: args.weak_loo]
        out["regimes"]["smallest convergent δ"] = measure_regime(args, smallest, phi, weak_rows, seed, cache, key, with_sets=False)
    return out


def measure_regime(args, current: Regime, phi, rows, seed: int, cache: RetrainCache, key: str, with_sets: bool) -> dict:
    predictions = single_pair_predictions(current, phi)
    entry = {"delta": current.delta, "polish": current.polish, "loo": leave_one_out(current, phi, predictions, rows, cache, key, args.tolerance)}
    if with_sets:
        fractions = [float(x) for x in args.sets.split(",") if x]
        entry["sets"] = leave_set_out(current, phi, predictions, fractions, cache, key, args.tolerance)
        entry["lds"] = linear_datamodeling(current, phi, predictions, args.lds, args.lds_fraction, seed, cache, key, args.tolerance)
    return entry


def summarise(results: list[dict], draws: int) -> dict:
    import numpy as np

    summary = {}
    for dataset in sorted({r["dataset"] for r in results}):
        mine = [r for r in results if r["dataset"] == dataset]
        for label in ("auto δ", "smallest convergent δ"):
            having = [r for r in mine if label in r["regimes"]]
            for column, name in LOO_PREDICTORS + DIAGNOSTICS:
                if not having:
                    continue
                groups = [(np.array([x[column] for x in r["regimes"][label]["loo"]]), np.array([x["actual"] for x in r["regimes"][label]["loo"]]))
                          for r in having]
                summary[(dataset, label, "loo", name)] = {**bootstrap_mean_correlation(groups, draws), "seeds": [r["seed"] for r in having]}
            for column, name in LOO_PREDICTORS:
                lds = [r["regimes"]["auto δ"].get("lds") for r in mine]
                if label == "auto δ" and all(lds):
                    groups = [(np.array([x[column] for x in entry]), np.array([x["actual"] for x in entry])) for entry in lds]
                    summary[(dataset, label, "lds", name)] = bootstrap_mean_correlation(groups, draws)
    return summary


def weak_polish(result: dict, key: str):
    """A polish number of the smallest-convergent-δ regime, or "not measured"."""
    regime_ = result["regimes"].get("smallest convergent δ")
    return regime_["polish"][key] if regime_ else "not measured"


def report(args, results: list[dict], summary: dict, seconds: float | None, machine: dict | None = None) -> str:
    """The markdown report; ``seconds``: the total time (None when unknown), ``machine``: default this one."""
    import numpy as np

    machine = machine or common.machine_info()
    lines = [
        "# ECIF fidelity on uniform removals, at the auto δ and the smallest convergent δ",
        "",
        common.machine_markdown(machine),
        "",
        f"Setting: the demo runs of the library's defaults (n = {args.n} per data set, 10% random-caption noise, heads scope, "
        f"float64, {'the ' + args.loss + ' loss (demo CLIP trained with it)' if getattr(args, 'loss', None) else 'the softmax (CLIP) loss'}), seeds {', '.join(map(str, args.seeds))}; φ = trusted contrastive loss on the trusted pairs not used to choose δ. "
        f"θ̂ polished to a gradient norm ≤ {args.tolerance:g} at each δ and the dense Hessian (damping 1e-4) rebuilt there. "
        f"{args.loo} removals per seed drawn uniformly from all training pairs (at the smallest convergent δ the first "
        f"{', '.join(str(len(r['regimes']['smallest convergent δ']['loo'])) if 'smallest convergent δ' in r['regimes'] else 'none' for r in results)} "
        "of them per seed, lowest rows first; "
        "its retrains are the slowest); each actually re-fine-tuned from θ̂ to "
        f"‖∇R‖ ≤ {args.tolerance:g}. Mean over seeds [95% bootstrap interval, removals resampled within each seed]."
        + (f" Total time {seconds / 60:.0f} min." if seconds is not None else ""),
        "",
        "## Penalties per seed",
        "",
        common.markdown_table(
            ["data", "seed", "auto δ", "smallest convergent δ", "‖θ̂−θ₀‖ at auto δ", "‖θ̂−θ₀‖ at smallest δ", "λ_min(H) at auto δ", "λ_min(H) at smallest δ"],
            [[r["dataset"], r["seed"], r["auto_delta"], r["smallest_delta"],
              r["regimes"]["auto δ"]["polish"]["parameter_change"], weak_polish(r, "parameter_change"),
              r["regimes"]["auto δ"]["polish"]["smallest_eigenvalue_dense"], weak_polish(r, "smallest_eigenvalue_dense")]
             for r in results],
        ),
        "",
        "The auto δ is the library's choice (lowest held-out trusted loss among the well-conditioned fine-tunes of the sweep, "
        "which allows 500 L-BFGS iterations per δ); the smallest convergent δ is found here by fine-tuning every weaker δ of the "
        "grid with the full budget (3,000 L-BFGS iterations, then Newton) until one fails the conditioning checks:",
        "",
        common.markdown_table(
            ["data", "seed", "δ", "converged", "gradient norm", "λ_min(H) (dense)", "smallest pre-norm norm", "‖θ̂−θ₀‖", "fine-tune s"],
            [[r["dataset"], r["seed"], t["delta"], t["converged"], f"{t['gradient_norm']:.1e}", t["smallest_eigenvalue_dense"],
              t["smallest_prenorm_norm"], t["parameter_change"], t["seconds"]] for r in results for t in r.get("weaker_deltas_tried", [])],
        ),
        "",
        "## Leave-one-out, uniform removals",
        "",
    ]
    table = []
    for (dataset, label, kind, name), entry in summary.items():
        if kind == "loo":
            table.append([dataset, label, name, interval(entry, "pearson"), interval(entry, "spearman"),
                          " / ".join(f"{p:.3f}" for p in entry["per_seed_pearson"]),
                          " ".join(map(str, entry.get("seeds", [])))])
    lines += [common.markdown_table(["data", "penalty", "predictor", "Pearson", "Spearman", "Pearson per seed", "seeds"], table), ""]
    lines += ["The last two rows of each block are diagnostics, not predictors of the product: how much of exact ECIF's "
              "error is the test function's curvature (φ evaluated at θ̂+Δθ) and how much the response's non-linearity "
              "(a second Newton step on the reduced objective).", ""]
    lds_rows = [[dataset, name, interval(entry, "spearman"), interval(entry, "pearson")]
                for (dataset, label, kind, name), entry in summary.items() if kind == "lds"]
    if lds_rows:
        lines += [f"## Linear datamodeling score at the auto δ ({args.lds} random subsets of {args.lds_fraction:.0%} removed per seed)", "",
                  common.markdown_table(["data", "predictor (sum over the removed pairs)", "LDS (Spearman)", "Pearson"], lds_rows), ""]
    set_rows = []
    for r in results:
        for entry in r["regimes"]["auto δ"].get("sets", []):
            set_rows.append([r["dataset"], r["seed"], f"{entry['fraction']:.0%} ({entry['removed']})", entry["actual"], entry["group_nonlinear"],
                             entry["group_nonlinear_relative_error"], entry["group_linear_relative_error"], entry["additive_linear_relative_error"]])
    if set_rows:
        lines += ["## Leave-set-out at the auto δ (most harmful by exact ECIF)", "",
                  common.markdown_table(["data", "seed", "removed", "actual Δφ", "group φ(θ̂+Δθ)", "rel. error", "group linear rel. error", "additive linear rel. error"], set_rows),
                  ""]
    lines += error_location(results)
    targets = []
    for (dataset, label, kind, name), entry in summary.items():
        if kind == "loo" and name == "exact ECIF":
            met = entry["pearson"] >= TARGET_PEARSON and entry["spearman"] >= TARGET_SPEARMAN
            targets.append(f"- {dataset}, {label}: Pearson {entry['pearson']:.3f}, Spearman {entry['spearman']:.3f} → {'MET' if met else 'NOT MET'} "
                           f"(target ≥ {TARGET_PEARSON} / ≥ {TARGET_SPEARMAN})")
    lines += ["## Targets", "", *targets, ""]
    retrain_seconds = [x["seconds"] for r in results for e in r["regimes"].values() for x in e["loo"]]
    gradients = [x["gradient_norm"] for r in results for e in r["regimes"].values() for x in e["loo"]]
    lines += [f"Retrains: {len(retrain_seconds)} single removals, median {np.median(retrain_seconds):.1f} s, gradient norm after retraining "
              f"median {np.median(gradients):.1e}, max {np.max(gradients):.1e}."]
    return "\n".join(lines)


def error_location(results: list[dict]) -> list[str]:
    """Where exact ECIF's LOO error sits at the auto δ: the actual change over the predicted one, by the
    removed pair's self-influence (from the run's scores, dense solver) and by whether it was planted."""
    import numpy as np
    import pandas as pd

    from ecif.run import Run

    frames = []
    for r in results:
        path = Path(r.get("run", ""))
        if not r.get("run") or not (path / "scores.parquet").exists():
            continue
        scores = Run(path).scores().sort_values("row").reset_index(drop=True)  # problem index = position among training rows
        for x in r["regimes"]["auto δ"]["loo"]:
            pair = scores.iloc[x["row"]]
            frames.append({"data": r["dataset"], "seed": r["seed"], "ratio": x["actual"] / x["influence"] if x["influence"] else np.nan,
                           "self_influence": float(pair["self_influence"]), "planted": bool(pair.get("corrupted", False)),
                           "actual": x["actual"], "predicted": x["influence"]})
    if not frames:
        return []
    table = pd.DataFrame(frames)
    rows = []
    for dataset, mine in table.groupby("data"):
        cut = mine["self_influence"].quantile(0.8)
        for name, part in (("self-influence in the lowest 80%", mine[mine.self_influence <= cut]),
                           ("self-influence in the top 20%", mine[mine.self_influence > cut]),
                           ("planted (corrupted) pairs", mine[mine.planted]), ("clean pairs", mine[~mine.planted])):
            if len(part) < 3:
                continue
            pearson, spearman = correlations(part["predicted"], part["actual"])
            rows.append([dataset, name, len(part), f"{part['ratio'].median():.2f}", f"{(part['ratio'] - 1).abs().median():.2f}", pearson, spearman])
    return ["## Where exact ECIF's error is (auto δ, all seeds pooled)", "",
            common.markdown_table(["data", "removed pairs", "count", "median actual/predicted", "median relative error",
                                   "Pearson", "Spearman"], rows), ""]


#: The settings the report prints, taken from the first file with ``--from-json``.
REPORTED_SETTINGS = ("n", "loo", "lds", "lds_fraction", "tolerance", "seeds")


def load_results(args) -> tuple[list[dict], float | None, dict]:
    """``--from-json``: the concatenated ``results`` of earlier outputs of this script, their summed
    total time (None when a file does not record it) and the first file's machine; the reported
    settings (:data:`REPORTED_SETTINGS`) are copied from the first file onto ``args``, except the
    seeds, which are all the files' seeds."""
    payloads = []
    for name in (part.strip() for part in args.from_json.split(",")):
        if name:
            payloads.append(json.loads(Path(name).read_text()))
            common.log(f"read {len(payloads[-1]['results'])} results from {name}")
    if not payloads:
        raise SystemExit("--from-json: no file given")
    first = payloads[0]["settings"]
    for key in REPORTED_SETTINGS:
        if key in first:
            setattr(args, key, first[key])
        if key == "seeds":  # files of separate seeds (or data sets) report all of them
            args.seeds = sorted({seed for payload in payloads for seed in payload["settings"].get("seeds", [])})
        elif any(payload["settings"].get(key) != first.get(key) for payload in payloads[1:]):
            common.log(f"warning: the files differ in {key!r}; the report prints the first file's ({first.get(key)!r})")
    args.datasets = list(dict.fromkeys(r["dataset"] for payload in payloads for r in payload["results"]))
    seconds = [payload.get("seconds") for payload in payloads]
    total = sum(seconds) if all(s is not None for s in seconds) else None
    return [r for payload in payloads for r in payload["results"]], total, payloads[0]["machine"]


def main(argv=None) -> None:
    args = parse_args(argv)
    machine = common.start(args)
    started = time.perf_counter()
    if args.from_json:
        results, seconds, machine = load_results(args)
    else:
        results = [measure_seed(args, dataset, seed) for dataset in args.datasets for seed in args.seeds]
        seconds = time.perf_counter() - started
    summary = summarise(results, args.bootstrap)
    markdown = report(args, results, summary, seconds, machine)
    payload = {"settings": vars(args) | {"work": str(args.work), "results": str(args.results)}, "machine": machine,
               "seconds": seconds, "results": results,
               "summary": [{"data": k[0], "penalty": k[1], "kind": k[2], "predictor": k[3], **v} for k, v in summary.items()]}
    common.publish(args.name, payload, markdown, args.results)


if __name__ == "__main__":
    main()
