"""Selected removals: leave-one-out and leave-set-out fidelity of ECIF against ACTUAL retraining (docs/method.md §8).

The uniform-removal benchmark (several seeds, two penalties, LDS) is ``bench/fidelity.py``; this one
draws half of its removals from the pairs ECIF calls most harmful.  On the shapes demo (heads scope,
float64, dense reference solver) this script

1. builds or reuses a scored demo run (``--n`` pairs, 10% random-caption noise);
2. leave-one-out: removes single training pairs, retrains the heads from ``θ̂`` to a tight gradient
   norm with ``finetune_heads`` (L-BFGS + Newton-CG polish) and compares the actual change of the
   trusted (validation) contrastive loss ``Δφ`` with the predictions ``influence`` (exact ECIF),
   ``influence_first_order`` and ``influence_pos`` (classical): Pearson and Spearman;
3. leave-set-out: removes the 5% most harmful pairs (by predicted influence), retrains, and compares
   the group and additive closed-form estimates (with/without the ``1/N → 1/(N−k)`` renormalisation
   term; ``φ(θ̂+Δθ)`` and linear ``∇φᵀΔθ``) and the Newton edit (1 and 3 steps) with the actual change;
4. damping sweep: LOO correlation of exact ECIF for λ ∈ {0, 1e-4, 1e-3, 1e-2, 1e-1};
5. δ sweep: the fine-tuning report (gradient norm, smallest Hessian eigenvalue, smallest
   pre-normalisation norm) for δ ∈ {0.1, 1} (a fresh fine-tune from θ₀ for each δ);
6. timings: one retrain vs scoring every pair.

Retraining results are cached in the run folder (``bench-fidelity/``), so an interrupted run resumes.

    .venv/bin/python -m bench.fidelity_selected            # n=3000, 50 removals
    .venv/bin/python -m bench.fidelity_selected --quick    # n=1500, 15 removals
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

from bench.common import (
    RetrainCache,
    add_batch_size_argument,
    add_common_arguments,
    announce,
    argument_parser,
    correlations,
    log,
    machine_markdown,
    markdown_table,
    recorded_settings,
    scored_demo_run,
    slope_through,
    start,
    work_dir,
    write_results,
)

PREDICTORS = (
    ("influence", "exact ECIF"),
    ("influence_first_order", "first-order ECIF"),
    ("influence_pos", "positive-only (classical IF)"),
)
LOO_TARGET_PEARSON = 0.95
SET_TARGET_RELATIVE_ERROR = 0.20


def parse_args(argv=None) -> argparse.Namespace:
    parser = argument_parser(__doc__, __spec__.name)
    parser.add_argument("--quick", action="store_true", help="n=1500 and 15 removals (defaults otherwise: n=3000, 50)")
    parser.add_argument("--n", type=int, default=None, help="demo size (all splits)")
    parser.add_argument("--loo", type=int, default=None, help="number of single-pair removals")
    parser.add_argument("--harmful-share", type=float, default=0.5, help="share of removals drawn from the 10%% most harmful")
    parser.add_argument("--set-fraction", type=float, default=0.05, help="leave-set-out: remove this fraction, most harmful first")
    parser.add_argument("--tolerance", type=float, default=1e-10, help="gradient-norm tolerance of every retrain")
    parser.add_argument("--dampings", default="0,1e-4,1e-3,1e-2,1e-1")
    parser.add_argument("--deltas", default="0.1,1", help="δ values for the fine-tuning report ('' to skip)")
    parser.add_argument("--delta-max-iterations", type=int, default=1500, help="L-BFGS cap for the δ-sweep fine-tunes")
    parser.add_argument(
        "--solver",
        choices=("run", "cg"),
        default="run",
        help="'run': the run's own solver (dense reference here); 'cg': matrix-free CG to relative residual 1e-12 "
        "on the exact Hessian (same numbers, no dense matrix to assemble)",
    )
    add_batch_size_argument(parser)
    add_common_arguments(parser, name="fidelity-selected")
    args = parser.parse_args(argv)
    if args.n is None:
        args.n = 1500 if args.quick else 3000
    if args.loo is None:
        args.loo = 15 if args.quick else 50
    return args


# --- retraining -----------------------------------------------------------------------------------


def retrain(engine, rows, config, theta_path: Path | None = None):
    """Actually re-fine-tune the heads without ``rows`` (warm start from ``θ̂``); return ``(θ, report, seconds)``."""
    from ecif.influence.scores import reduced_problem
    from ecif.finetune import finetune_heads

    started = time.perf_counter()
    theta, report = finetune_heads(reduced_problem(engine.problem, list(map(int, rows))), engine.theta, config)
    seconds = time.perf_counter() - started
    if theta_path is not None:
        import torch

        torch.save(theta, theta_path)
    return theta, report, seconds


# --- the measurements ------------------------------------------------------------------------------


def leave_one_out(engine, influence, phi, config, cache: RetrainCache, args, tag: str) -> dict:
    import numpy as np

    n_pairs = engine.problem.data.n_pairs
    rng = np.random.default_rng(args.seed)
    order = np.argsort(influence.influence, kind="stable")
    top = order[: max(1, math.ceil(0.10 * n_pairs))]
    n_harmful = min(len(top), int(round(args.harmful_share * args.loo)))
    harmful = rng.choice(top, n_harmful, replace=False)
    rest = rng.choice(np.setdiff1d(np.arange(n_pairs), harmful), args.loo - n_harmful, replace=False)
    chosen = [(int(row), "top-10% harmful") for row in harmful] + [(int(row), "uniform") for row in rest]
    base = float(phi(engine.theta))
    records = []
    for position, (row, stratum) in enumerate(chosen, start=1):
        key = f"loo-{tag}-row{row}"
        record = cache.get(key)
        if record is None:
            theta, report, seconds = retrain(engine, [row], config)
            record = {
                "row": row,
                "actual": float(phi(theta)) - base,
                "gradient_norm": report.gradient_norm,
                "smallest_hessian_eigenvalue": report.smallest_hessian_eigenvalue,
                "converged": report.converged,
                "lbfgs_iterations": report.lbfgs_iterations,
                "newton_steps": report.newton_steps,
                "seconds": seconds,
                "parameter_change": float((theta - engine.theta).norm()),
            }
            cache.put(key, record)
        record = {**record, "stratum": stratum}
        for column, _ in PREDICTORS:
            record[column] = float(getattr(influence, column)[row])
        records.append(record)
        log(
            f"LOO {position}/{len(chosen)} row {row} ({stratum}): actual {record['actual']:+.3e}  "
            f"exact {record['influence']:+.3e}  |grad| {record['gradient_norm']:.1e}  {record['seconds']:.0f}s"
        )
    return {"base_phi": base, "records": records}


def loo_statistics(records: list[dict], renorm_shift: float) -> list[dict]:
    import numpy as np

    actual_all = np.array([r["actual"] for r in records])
    rows = []
    for subset_name, keep in (
        ("all", [True] * len(records)),
        ("uniform only", [r["stratum"] == "uniform" for r in records]),
        ("top-10% harmful only", [r["stratum"] != "uniform" for r in records]),
    ):
        keep = np.array(keep, dtype=bool)
        if keep.sum() < 3:
            continue
        actual = actual_all[keep]
        for column, label in PREDICTORS:
            predicted = np.array([r[column] for r in records])[keep]
            pearson, spearman = correlations(predicted, actual)
            shifted = predicted + renorm_shift
            rows.append(
                {
                    "subset": subset_name,
                    "removals": int(keep.sum()),
                    "predictor": label,
                    "column": column,
                    "pearson": pearson,
                    "spearman": spearman,
                    "slope": slope_through(predicted, actual),
                    "median_relative_error": float(
                        np.median(np.abs(shifted - actual) / np.maximum(np.abs(actual), 1e-300))
                    ),
                }
            )
    return rows


def leave_set_out(engine, influence, phi, solver, config, cache: RetrainCache, args, tag: str) -> dict:
    import numpy as np
    import torch

    from ecif.influence.scores import newton_edit, predicted_step

    problem, theta = engine.problem, engine.theta
    n_remove = max(1, int(round(args.set_fraction * problem.data.n_pairs)))
    rows = np.argsort(influence.influence, kind="stable")[:n_remove]
    base = float(phi(theta))
    theta_path = cache.directory / f"set-{tag}-k{n_remove}.pt"
    record = cache.get(f"set-{tag}-k{n_remove}")
    if record is None or not theta_path.exists():
        retrained, report, seconds = retrain(engine, rows, config, theta_path)
        record = {
            "removed": int(n_remove),
            "actual": float(phi(retrained)) - base,
            "gradient_norm": report.gradient_norm,
            "smallest_hessian_eigenvalue": report.smallest_hessian_eigenvalue,
            "converged": report.converged,
            "seconds": seconds,
        }
        cache.put(f"set-{tag}-k{n_remove}", record)
    retrained = torch.load(theta_path, weights_only=True)
    actual = record["actual"]
    actual_step = retrained - theta
    gradient = torch.func.grad(phi)(theta)
    predictions = []

    def add(method: str, new_theta=None, linear_step=None, seconds: float = 0.0):
        if new_theta is not None:
            predicted = float(phi(new_theta)) - base
            distance = float((new_theta - retrained).norm())
        else:
            predicted = float(gradient @ linear_step)
            distance = float((theta + linear_step - retrained).norm())
        predictions.append(
            {
                "method": method,
                "predicted": predicted,
                "actual": actual,
                "relative_error": abs(predicted - actual) / max(abs(actual), 1e-300),
                "parameter_error": distance / max(float(actual_step.norm()), 1e-300),
                "seconds": seconds,
            }
        )

    for estimate in ("group", "additive"):
        for renormalise in (True, False):
            started = time.perf_counter()
            step = predicted_step(problem, theta, solver, rows, estimate=estimate, renormalise=renormalise)
            seconds = time.perf_counter() - started
            label = f"{estimate}, {'with' if renormalise else 'without'} renormalisation"
            add(f"{label}: φ(θ̂+Δθ)", new_theta=theta + step, seconds=seconds)
            add(f"{label}: linear ∇φᵀΔθ", linear_step=step, seconds=seconds)
    for steps in (1, 3):
        started = time.perf_counter()
        edited = newton_edit(problem, theta, solver, rows, steps=steps)
        add(f"Newton edit, {steps} step{'s' if steps > 1 else ''}: φ(θ)", new_theta=edited, seconds=time.perf_counter() - started)
    record["sum_of_single_influences"] = float(influence.influence[rows].sum())
    record["corrupted_among_removed"] = None
    return {"rows": rows.tolist(), "retrain": record, "predictions": predictions}


def _damped_solver(engine, raw, damping: float, kind: str):
    """The reference solver for ``H + λI``: dense from the undamped matrix, else matrix-free CG."""
    from ecif.curvature.solvers import ConjugateGradientSolver, DenseSolver

    if raw is not None:
        return DenseSolver(raw, damping, kind)
    return ConjugateGradientSolver(engine.problem, engine.theta, damping, kind, tolerance=1e-12, max_iterations=5000)


def damping_sweep(engine, phi, loo: dict, set_rows, set_actual: float, dampings: list[float]) -> list[dict]:
    """Rebuild the dense solver for each λ from the undamped matrix and redo the LOO correlations."""
    import numpy as np

    from ecif.curvature.solvers import CurvatureNotPositiveDefinite
    from ecif.influence.scores import gradient_of, influence_on, predicted_step

    solver = engine.solver
    kind = getattr(solver, "kind", "hessian")
    raw = None
    if getattr(solver, "name", "") == "dense":
        raw = solver.matrix
        raw.diagonal().sub_(solver.damping)  # in place: H (undamped); the engine's solver is dropped below
        engine.__dict__.pop("_solver", None)
    del solver
    records = loo["records"]
    actual = np.array([r["actual"] for r in records])
    rows = [r["row"] for r in records]
    gradient = gradient_of(phi, engine.theta)
    base = float(phi(engine.theta))
    out = []
    for damping in dampings:
        log(f"damping sweep: λ={damping:g}")
        started = time.perf_counter()
        try:
            candidate = _damped_solver(engine, raw, damping, kind)
        except CurvatureNotPositiveDefinite as error:
            out.append({"damping": damping, "error": str(error)})
            continue
        build = time.perf_counter() - started
        influence = influence_on(engine.problem, engine.theta, candidate, gradient)
        entry = {"damping": damping, "smallest_eigenvalue": getattr(candidate, "smallest_eigenvalue", None), "build_seconds": build}
        for column, _ in PREDICTORS:
            entry[f"{column}_pearson"], entry[f"{column}_spearman"] = correlations(getattr(influence, column)[rows], actual)
        step = predicted_step(engine.problem, engine.theta, candidate, set_rows, estimate="group", renormalise=True)
        predicted = float(phi(engine.theta + step)) - base
        entry["set_group_relative_error"] = abs(predicted - set_actual) / max(abs(set_actual), 1e-300)
        out.append(entry)
        del candidate
    return out


def delta_sweep(engine, run, deltas: list[float], max_iterations: int, cache: RetrainCache) -> list[dict]:
    from ecif.objective.contrastive import ContrastiveProblem
    from ecif.finetune import finetune_heads
    from ecif.run import FINETUNE_FILE, read_json

    out = []
    for delta in deltas:
        key = f"delta-{delta:g}-it{max_iterations}"
        record = cache.get(key)
        if record is None and math.isclose(delta, engine.finetune.delta):
            record = {**read_json(run.path(FINETUNE_FILE)), "source": "the run's own fine-tune"}
        if record is None:
            log(f"δ sweep: fine-tuning from θ₀ with δ={delta:g} (L-BFGS cap {max_iterations})")
            config = dataclasses.replace(engine.finetune, delta=delta, max_lbfgs_iterations=max_iterations)
            problem = ContrastiveProblem(engine.scope, engine.problem.data, engine.theta0, delta)
            _, report = finetune_heads(problem, config=config)
            record = {**report.to_dict(), "source": f"fresh fine-tune from θ₀ (L-BFGS cap {max_iterations})"}
            cache.put(key, record)
        out.append({"delta": delta, **record})
    return out


# --- main -----------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    machine = start(args)
    import numpy as np

    from ecif.influence.scores import gradient_of, influence_on, renormalisation_step
    from ecif.tasks.engine import load_engine

    work = work_dir(args)
    started = time.perf_counter()
    log(f"fidelity: shapes n={args.n}, {args.loo} removals, work folder {work}")
    run = scored_demo_run(work, "shapes", args.n, 0.1, "random-caption", args.seed, args.batch_size)
    engine = load_engine(run)
    problem, theta = engine.problem, engine.theta
    phi = engine.trusted_loss()
    t0 = time.perf_counter()
    if args.solver == "cg":
        from ecif.curvature.solvers import ConjugateGradientSolver

        engine.__dict__["_solver"] = ConjugateGradientSolver(
            problem, theta, engine.curvature.damping, engine.curvature.kind, tolerance=1e-12, max_iterations=5000
        )
    solver = engine.solver
    solver_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    influence = influence_on(problem, theta, solver, gradient_of(phi, theta))
    score_seconds = time.perf_counter() - t0
    log(f"solver ready ({solver_seconds:.0f}s here), influence of all {problem.data.n_pairs} pairs in {score_seconds:.1f}s")

    config = dataclasses.replace(engine.finetune, gradient_tolerance=args.tolerance)
    tag = f"tol{args.tolerance:g}"
    cache = RetrainCache(run.directory / "bench-fidelity")

    # Leave-one-out.
    loo = leave_one_out(engine, influence, phi, config, cache, args, tag)
    renorm_shift = float(gradient_of(phi, theta) @ renormalisation_step(problem, theta, solver, 1))
    loo_rows = loo_statistics(loo["records"], renorm_shift)
    records = loo["records"]
    gradient_norms = np.array([r["gradient_norm"] for r in records])
    retrain_seconds = np.array([r["seconds"] for r in records])
    actual = np.array([r["actual"] for r in records])
    phi_gradient_norm = float(gradient_of(phi, theta).norm())
    smallest_eigenvalue = float(getattr(solver, "smallest_eigenvalue", float("nan")))
    if not math.isfinite(smallest_eigenvalue):  # CG: take the fine-tuning report's (undamped) value
        from ecif.run import FINETUNE_FILE, read_json

        reported = (read_json(run.path(FINETUNE_FILE), {}) or {}).get("smallest_hessian_eigenvalue")
        smallest_eigenvalue = float(reported) + engine.curvature.damping if reported is not None else float("nan")
    noise_floor = phi_gradient_norm * float(gradient_norms.max()) / max(smallest_eigenvalue, 1e-300)

    # Leave-set-out.
    log("leave-set-out: retraining without the most harmful pairs")
    set_out = leave_set_out(engine, influence, phi, solver, config, cache, args, tag)
    set_rows = np.asarray(set_out["rows"])
    train_frame = engine.manifest.iloc[engine.train_rows].reset_index(drop=True)
    if "corrupted" in train_frame.columns:
        set_out["retrain"]["corrupted_among_removed"] = int(train_frame["corrupted"].astype(bool).to_numpy()[set_rows].sum())

    # Damping sweep (drops the engine's solver so that one dense matrix at a time is in memory).
    dampings = [float(x) for x in args.dampings.split(",") if x.strip()]
    default_damping = engine.curvature.damping
    smallest_eigenvalue_default = smallest_eigenvalue
    del solver
    deltas = [float(x) for x in args.deltas.split(",") if x.strip()]
    state = {"damping_rows": [], "delta_rows": []}

    def render_and_write() -> dict:
        return report(args, machine, run, engine, problem, theta, records, loo, loo_rows, renorm_shift, gradient_norms,
                      actual, noise_floor, set_out, state["damping_rows"], state["delta_rows"], default_damping,
                      smallest_eigenvalue_default, score_seconds, solver_seconds, retrain_seconds, started)

    payload = render_and_write()
    if dampings:
        state["damping_rows"] = damping_sweep(engine, phi, loo, set_rows, set_out["retrain"]["actual"], dampings)
        payload = render_and_write()
    if deltas:
        state["delta_rows"] = delta_sweep(engine, run, deltas, args.delta_max_iterations, cache)
        payload = render_and_write()
    announce(args.name, payload["markdown"], args.results)
    return payload


def report(args, machine, run, engine, problem, theta, records, loo, loo_rows, renorm_shift, gradient_norms, actual,
           noise_floor, set_out, damping_rows, delta_rows, default_damping, smallest_eigenvalue, score_seconds,
           solver_seconds, retrain_seconds, started) -> dict:
    """The markdown tables and the JSON payload (written every time a part finishes)."""
    import numpy as np

    # ---- tables ----
    stages = run.info.get("stages", {})
    exact_all = next(r for r in loo_rows if r["subset"] == "all" and r["column"] == "influence")
    group = next(p for p in set_out["predictions"] if p["method"].startswith("group, with renormalisation: φ"))
    n_harmful = sum(r["stratum"] != "uniform" for r in records)
    lines = [
        f"# ECIF fidelity against actual retraining (shapes demo, n={args.n}, {problem.data.n_pairs} training pairs)",
        "",
        machine_markdown(machine),
        "",
        f"Setting: heads scope ({theta.numel()} parameters, float64), δ={engine.finetune.delta:g}, reference batches of "
        f"{engine.finetune.batch_size}, "
        + ("the run's dense Hessian solver" if args.solver == "run" else "matrix-free CG on the exact Hessian (relative residual 1e-12)")
        + f" with damping λ={default_damping:g}; "
        "φ = trusted (val) contrastive loss.  Every retrain: `finetune_heads(reduced_problem(problem, rows), θ̂)` "
        f"with gradient tolerance {args.tolerance:g} (L-BFGS, then Newton-CG polish).",
        "",
        "## Leave-one-out",
        "",
        f"Sampling protocol: {len(records)} single-pair removals (seed {args.seed}): {n_harmful} drawn uniformly without "
        f"replacement from the 10% most harmful pairs by predicted exact influence, {len(records) - n_harmful} uniformly "
        "from all remaining training pairs.  Actual Δφ = φ(θ̂₋ₙ) − φ(θ̂).",
        "",
        markdown_table(
            ["subset", "removals", "predictor", "Pearson", "Spearman", "slope (actual on predicted)", "median rel. error (+renorm shift)"],
            [[r["subset"], r["removals"], r["predictor"], r["pearson"], r["spearman"], r["slope"], r["median_relative_error"]] for r in loo_rows],
        ),
        "",
        f"Retrain precision: gradient norm after retraining median {np.median(gradient_norms):.1e}, max {gradient_norms.max():.1e} "
        f"({sum(r['converged'] for r in records)}/{len(records)} report converged); |actual Δφ| median {np.median(np.abs(actual)):.2e}, "
        f"min {np.abs(actual).min():.2e}.  Error bound from the retrain tolerance ‖∇φ‖·max‖∇R‖/λ_min = {noise_floor:.1e}.  "
        f"The 1/N→1/(N−1) renormalisation shifts every single-pair prediction by the same {renorm_shift:+.2e} "
        "(added only for the relative-error column; correlations are shift-invariant).",
        "",
        f"**Target** LOO Pearson ≥ {LOO_TARGET_PEARSON} for exact ECIF over ≥ 50 removals: "
        f"Pearson {exact_all['pearson']:.4f} over {exact_all['removals']} removals → "
        f"{'MET' if exact_all['pearson'] >= LOO_TARGET_PEARSON and exact_all['removals'] >= 50 else ('correlation met, but fewer than 50 removals (--quick)' if exact_all['pearson'] >= LOO_TARGET_PEARSON else 'MISSED')}.",
        "",
        "## Leave-set-out",
        "",
        f"Removed the {set_out['retrain']['removed']} most harmful pairs by predicted exact influence "
        f"({args.set_fraction:.0%}; {set_out['retrain']['corrupted_among_removed']} of them planted corruptions); retrained to gradient norm "
        f"{set_out['retrain']['gradient_norm']:.1e} in {set_out['retrain']['seconds']:.0f}s.  Actual Δφ = {set_out['retrain']['actual']:+.5f}; "
        f"sum of their single-pair influences {set_out['retrain']['sum_of_single_influences']:+.5f}.",
        "",
        markdown_table(
            ["prediction", "predicted Δφ", "actual Δφ", "relative error", "‖θ_pred − θ_retrained‖ / ‖θ_retrained − θ̂‖", "seconds"],
            [[p["method"], p["predicted"], p["actual"], p["relative_error"], p["parameter_error"], p["seconds"]] for p in set_out["predictions"]],
            digits=4,
        ),
        "",
        f"**Target** predicted change within {SET_TARGET_RELATIVE_ERROR:.0%} of actual (group estimate, with renormalisation, "
        f"φ(θ̂+Δθ)): relative error {group['relative_error']:.3f} → {'MET' if group['relative_error'] <= SET_TARGET_RELATIVE_ERROR else 'MISSED'}.",
        "",
    ]
    if damping_rows:
        lines += [
            f"## Damping sweep ({'dense solver rebuilt from the undamped Hessian' if args.solver == 'run' else 'CG on H + λI, relative residual 1e-12'} per λ; same retrains)",
            "",
            markdown_table(
                ["λ", "smallest eigenvalue of H+λI", "exact Pearson", "exact Spearman", "first-order Pearson", "pos-only Pearson", "set (group) rel. error"],
                [
                    [r["damping"], r.get("smallest_eigenvalue"), r.get("influence_pearson"), r.get("influence_spearman"),
                     r.get("influence_first_order_pearson"), r.get("influence_pos_pearson"), r.get("set_group_relative_error")]
                    if "error" not in r
                    else [r["damping"], r["error"], None, None, None, None, None]
                    for r in damping_rows
                ],
                digits=5,
            ),
            "",
        ]
    if delta_rows:
        lines += [
            "## δ sweep (fine-tuning report, fresh fine-tune from θ₀ per δ)",
            "",
            markdown_table(
                ["δ", "gradient norm", "smallest Hessian eigenvalue", "smallest pre-norm norm", "converged", "L-BFGS it.", "Newton steps", "seconds", "source"],
                [
                    [r["delta"], r["gradient_norm"], r["smallest_hessian_eigenvalue"], r["smallest_prenorm_norm"], r["converged"],
                     r["lbfgs_iterations"], r["newton_steps"], r["seconds"], r["source"]]
                    for r in delta_rows
                ],
            ),
            "",
        ]
    lines += [
        "## Timing",
        "",
        markdown_table(
            ["what", "seconds"],
            [
                ["fine-tune θ̂ from θ₀ (pipeline stage)", stages.get("fine-tune", {}).get("seconds")],
                ["dense curvature + Cholesky (pipeline stage)", stages.get("curvature", {}).get("seconds")],
                ["scores stage (influence, self-influence, baselines, all pairs)", stages.get("scores", {}).get("seconds")],
                [f"influence of all {problem.data.n_pairs} pairs (solve + one forward-mode pass, this process)", score_seconds],
                ["one leave-one-out retrain, median (incl. its convergence report)", float(np.median(retrain_seconds))],
                ["one leave-one-out retrain, max", float(retrain_seconds.max())],
                ["retraining every pair once (median × N, extrapolated)", float(np.median(retrain_seconds) * problem.data.n_pairs)],
            ],
        ),
        "",
        f"Ratio: one retrain = {np.median(retrain_seconds) / max(score_seconds, 1e-9):.0f}× the time to score all "
        f"{problem.data.n_pairs} pairs once the solver is built.  Total wall time of this script: {time.perf_counter() - started:.0f}s.",
    ]
    markdown = "\n".join(lines)
    payload = {
        "settings": recorded_settings(args),
        "machine": machine,
        "run_dir": str(run.directory),
        "parameters": int(theta.numel()),
        "training_pairs": int(problem.data.n_pairs),
        "loo": {"records": records, "statistics": loo_rows, "renorm_shift": renorm_shift, "noise_floor": noise_floor},
        "leave_set_out": set_out,
        "damping_sweep": damping_rows,
        "delta_sweep": delta_rows,
        "timing": {
            "stages": stages,
            "influence_all_pairs_seconds": score_seconds,
            "solver_seconds_this_process": solver_seconds,
            "retrain_seconds": retrain_seconds.tolist(),
        },
        "targets": {
            "loo_pearson_exact": exact_all["pearson"],
            "loo_removals": exact_all["removals"],
            "loo_met": bool(exact_all["pearson"] >= LOO_TARGET_PEARSON and exact_all["removals"] >= 50),
            "set_relative_error_group": group["relative_error"],
            "set_met": bool(group["relative_error"] <= SET_TARGET_RELATIVE_ERROR),
        },
        "markdown": markdown,
    }
    write_results(args.name, payload, markdown, args.results)
    log(f"results written ({args.name}.json/.md)")
    return payload


if __name__ == "__main__":
    main()
