"""The blocks scope (last transformer block of each tower + heads) against the heads scope, same data.

On a slice of the shapes demo (``--train`` training pairs, 10% random-caption noise, the demo CLIP
trained on the full noisy manifest) this script scores the slice twice, ``blocks=0`` (heads, 6k
parameters) and ``blocks=1`` (156k parameters), and reports for each scope:

1. leave-one-out fidelity: ``--loo`` single-pair removals drawn uniformly, each actually
   re-fine-tuned from ``θ̂`` (L-BFGS + one Newton-CG step), against the predictions of exact ECIF,
   first-order ECIF, positive-only influence and exact ECIF with ``H := δ·I`` (Pearson, Spearman);
2. detection of the planted pairs (AUROC, average precision) for ``influence``,
   ``self_influence_first_order`` and ``clip_score``;
3. cost of each pipeline stage (fine-tune, curvature, scores) in seconds;
4. blocks scope only: the low-rank self-influence of the ``lowrank-cg`` solver against exact
   conjugate-gradient solves on ``--exact-pairs`` pairs (Spearman, Pearson, median ratio).

Retrains are cached in the run folders, so an interrupted run resumes.

    .venv/bin/python -m bench.blocks                 # 300 training pairs, 20 removals
    .venv/bin/python -m bench.blocks --quick         # 150 training pairs, 8 removals
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench import common
from bench.common import correlations, slope_through
from bench.fidelity_selected import PREDICTORS

DETECTION = ("influence", "self_influence_first_order", "clip_score")
IDENTITY = (("influence_identity", "exact ECIF with H := δ·I"),)


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.argument_parser(__doc__, __spec__.name)
    parser.add_argument("--quick", action="store_true", help="150 training pairs and 8 removals")
    parser.add_argument("--train", type=int, default=None, help="training pairs in the slice (default 300)")
    parser.add_argument("--loo", type=int, default=None, help="single-pair removals per scope (default 20)")
    parser.add_argument("--exact-pairs", type=int, default=24, help="pairs whose self-influence is solved exactly (0: skip)")
    parser.add_argument("--delta", default="auto", help="the fine-tuning penalty: auto (the library's default) or a number")
    common.add_common_arguments(parser)
    args = parser.parse_args(argv)
    args.train = args.train or (150 if args.quick else 300)
    args.loo = args.loo or (8 if args.quick else 20)
    return args


def slice_manifest(demo_run: Path, folder: Path, train: int) -> Path:
    """The first ``train`` training pairs of the demo with a third as many validation and test items."""
    from ecif.data.manifest import write_manifest_subset
    from ecif.run import Run

    counts = {"train": train, "val": max(48, train // 3), "test": max(48, train // 3)}
    return write_manifest_subset(Run(demo_run).info["manifest_path"], folder, counts)


def scope_run(manifest: Path, checkpoint: Path, folder: Path, blocks: int, delta: str):
    import ecif
    from ecif.config import RunConfig
    from ecif.tasks.pipeline import run_pipeline

    finetune = ecif.FinetuneConfig(blocks=blocks, delta=delta)
    config = RunConfig(run_dir=folder, manifest=manifest, model="ecif-demo", checkpoint=checkpoint, finetune=finetune)
    logger = common.StageLogger(prefix=f"{folder.name}: ")
    return run_pipeline(config, reporter=logger.reporter(), stop_after="scores")


def leave_one_out(run, args) -> dict:
    """Actual re-fine-tuning without single pairs against the three predictions."""
    import numpy as np

    from ecif.influence.scores import gradient_of, influence_along, influence_on, reduced_problem
    from ecif.config import FinetuneConfig
    from ecif.finetune import finetune_heads
    from ecif.tasks.engine import load_engine

    engine = load_engine(run)
    phi = engine.trusted_loss()
    gradient = gradient_of(phi, engine.theta)
    influence = influence_on(engine.problem, engine.theta, engine.solver, gradient)
    # What the curvature contributes: the same exact removal terms with H replaced by δ·I.
    identity = influence_along(engine.problem, engine.theta, gradient / engine.delta)
    n_pairs = engine.problem.data.n_pairs
    # Removals drawn uniformly, not chosen by any predictor.
    uniform = np.sort(np.random.default_rng(args.seed).choice(n_pairs, args.loo, replace=False))
    cache = run.path("bench-blocks")
    cache.mkdir(exist_ok=True)
    # A retrain for ground truth needs the minimiser, not the fine-tuning report's curvature check.
    config = FinetuneConfig(delta=engine.delta, newton_steps=1, curvature_check_products=2)
    base = float(phi(engine.theta))
    records = []
    for position, row in enumerate(map(int, uniform), start=1):
        path = cache / f"loo-row{row}.json"
        if path.exists():
            record = json.loads(path.read_text())
        else:
            started = time.perf_counter()
            theta, report = finetune_heads(reduced_problem(engine.problem, [row]), engine.theta, config)
            record = {"row": row, "actual": float(phi(theta)) - base, "gradient_norm": report.gradient_norm, "seconds": time.perf_counter() - started}
            path.write_text(json.dumps(record))
        for column, _ in PREDICTORS:
            record[column] = float(getattr(influence, column)[row])
        record["influence_identity"] = float(identity.influence[row])
        records.append(record)
        common.log(f"{run.directory.name} LOO {position}/{args.loo}: row {row} actual {record['actual']:+.3e} exact {record['influence']:+.3e} |grad| {record['gradient_norm']:.1e}")
    actual = [r["actual"] for r in records]
    summary = {}
    for column, _ in PREDICTORS + IDENTITY:
        predicted = [r[column] for r in records]
        summary[column] = {**dict(zip(("pearson", "spearman"), correlations(predicted, actual))), "slope": slope_through(predicted, actual)}
    return {
        "records": records,
        "correlations": summary,
        "max_gradient_norm": max(r["gradient_norm"] for r in records),
        "retrain_seconds": float(np.median([r["seconds"] for r in records])),
    }


def low_rank_against_exact(run, pairs: int, seed: int) -> dict:
    """Self-influence (both forms) of the run's low-rank solver against exact CG solves on ``pairs`` pairs."""
    import numpy as np
    import torch
    from scipy.stats import pearsonr, spearmanr

    from ecif.curvature.solvers import ConjugateGradientSolver
    from ecif.influence.scores import per_pair_gradients
    from ecif.tasks.engine import load_engine

    cached = run.path("bench-blocks") / f"low-rank-pairs{pairs}-seed{seed}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    engine = load_engine(run)
    problem, theta = engine.problem, engine.theta
    chosen = np.sort(np.random.default_rng(seed).choice(problem.data.n_pairs, pairs, replace=False))
    exact_solver = ConjugateGradientSolver(problem, theta, engine.curvature.damping, engine.curvature.kind, 1e-8, 500)
    result = {}
    for negative in ("exact", "first_order"):
        gradients = torch.zeros(problem.data.n_pairs, theta.numel(), dtype=theta.dtype)
        for rows, batch in per_pair_gradients(problem, theta, negative):
            gradients[rows] = batch
        picked = gradients[torch.as_tensor(chosen)]
        started = time.perf_counter()
        exact = exact_solver.inverse_quadratic(picked).numpy()
        exact_seconds = time.perf_counter() - started
        started = time.perf_counter()
        approximate = engine.solver.inverse_quadratic(picked).numpy()
        approximate_seconds = time.perf_counter() - started
        result[negative] = {
            "spearman": float(spearmanr(exact, approximate)[0]),
            "pearson": float(pearsonr(exact, approximate)[0]),
            "median_ratio": float(np.median(approximate / exact)),
            "exact_seconds": exact_seconds,
            "low_rank_seconds": approximate_seconds,
        }
        common.log(f"low rank vs exact ({negative}): {result[negative]}")
    summary = {"pairs": pairs, "forms": result, "solver": engine.solver.describe()}
    cached.write_text(json.dumps(summary))
    return summary


def render(args, machine, results: dict) -> str:
    lines = [
        "# The blocks scope against the heads scope",
        "",
        f"Shapes demo slice: {args.train} training pairs (10% random captions), the demo CLIP trained on the full noisy "
        f"manifest; `blocks=0` (heads) and `blocks=1` (last block of each tower, final norms, heads). "
        "Command: `.venv/bin/python -m bench.blocks" + (" --quick" if args.quick else "")
        + ("" if args.delta == "auto" else f" --delta {args.delta}") + "`. "
        + ("δ chosen on held-out trusted pairs per scope (the library's default)." if args.delta == "auto" else f"δ fixed at {args.delta}."),
        "",
        "## Leave-one-out fidelity (actual re-fine-tuning)",
        "",
    ]
    rows = []
    for name, result in results["scopes"].items():
        loo = result["loo"]
        for column, label in PREDICTORS + IDENTITY:
            values = loo["correlations"][column]
            rows.append([name, result["parameters"], result["delta"], label, values["pearson"], values["spearman"], values["slope"], len(loo["records"]), loo["max_gradient_norm"]])
    headers = ["scope", "parameters", "δ", "prediction", "Pearson", "Spearman", "slope (actual on predicted)", "removals", "largest retrain gradient norm"]
    lines.append(common.markdown_table(headers, rows))
    sweeps = [[name, point["delta"], point.get("selection_loss"), point.get("converged"), point.get("parameter_change")]
              for name, result in results["scopes"].items() if result.get("delta_selection")
              for point in result["delta_selection"]["sweep"]]
    if sweeps:
        lines += ["", "The δ sweep of each scope (held-out trusted loss; the lowest converged one is chosen):", "",
                  common.markdown_table(["scope", "δ", "held-out loss", "converged", "‖θ̂−θ₀‖"], sweeps)]
    lines += ["", "## Detection of the planted pairs", ""]
    rows = []
    for name, result in results["scopes"].items():
        for entry in result["detection"]:
            rows.append([name, entry["score"], entry["auroc"], entry["average_precision"], entry["base_rate"]])
    lines.append(common.markdown_table(["scope", "score", "AUROC", "average precision", "base rate"], rows))
    lines += ["", "## Cost (seconds)", ""]
    rows = [
        [name, result["stages"]["fine-tune"], result["stages"]["curvature"], result["stages"]["scores"], result["loo"]["retrain_seconds"], result["solver"]]
        for name, result in results["scopes"].items()
    ]
    lines.append(common.markdown_table(["scope", "fine-tune", "curvature", "scores (all columns)", "one retrain (median)", "solver"], rows))
    exact = results.get("low_rank")
    if exact:
        lines += ["", f"## Low-rank self-influence against exact solves ({exact['pairs']} pairs, blocks scope)", ""]
        rows = [[form, values["spearman"], values["pearson"], values["median_ratio"], values["exact_seconds"], values["low_rank_seconds"]] for form, values in exact["forms"].items()]
        lines.append(common.markdown_table(["Neg form", "Spearman", "Pearson", "median low-rank ÷ exact", "exact CG s", "low-rank s"], rows))
    lines += ["", common.machine_markdown(machine)]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    machine = common.start(args)
    work = common.work_dir(args)
    from ecif.tasks.detect import detection_report

    demo = common.scored_demo_run(work)
    checkpoint = Path(demo.info["demo_checkpoint"])
    folder = work / f"blocks-slice-train{args.train}"
    manifest = slice_manifest(demo.directory, folder / "data", args.train)
    results = {"scopes": {}, "settings": vars(args) | {"work": str(work), "results": str(args.results)}}
    for name, blocks in (("heads", 0), ("blocks=1", 1)):
        suffix = "" if args.delta == "auto" else f"-d{float(args.delta):g}"
        run = scope_run(manifest, checkpoint, folder / f"run-blocks{blocks}{suffix}", blocks, args.delta)
        stages = {stage: run.info["stages"][stage]["seconds"] for stage in ("fine-tune", "curvature", "scores")}
        detection = detection_report(run.scores(), columns=DETECTION).to_dict("records")
        from ecif.tasks.engine import load_engine

        engine = load_engine(run)
        results["scopes"][name] = {
            "parameters": engine.scope.size,
            "delta": engine.delta,
            "delta_selection": run.info["stages"]["fine-tune"].get("delta_selection"),
            "solver": run.info["stages"]["curvature"]["solver"],
            "stages": stages,
            "detection": detection,
            "loo": leave_one_out(run, args),
        }
        if blocks and args.exact_pairs:
            results["low_rank"] = low_rank_against_exact(run, args.exact_pairs, args.seed)
    name = "blocks" if args.delta == "auto" else f"blocks-d{float(args.delta):g}"
    common.publish(name, {"machine": machine, **results}, render(args, machine, results), args.results)
    return results


if __name__ == "__main__":
    main()
