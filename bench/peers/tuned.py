"""Every peer at its tuned best beside ECIF: leave-one-out and LDS at the auto δ and at δ = 1, over seeds.

    python -m bench.peers.tuned                                  # shapes and digits, seeds 0,1,2, auto δ and δ = 1
    python -m bench.peers.tuned --datasets shapes --seeds 0 --quick
    python -m bench.peers.tuned --from-json A.json,B.json        # one report from earlier outputs

Protocol (docs/benchmarks.md, "Peers at their tuned best"), per data set, seed and δ:

- the same scored demo run, polished minimiser ``θ̂`` and dense reference as ``bench.fidelity``
  (its cached retrains are reused: the reported leave-one-out removals are its 50 uniform ones and
  the LDS its 20 random half-subsets, with φ = the trusted contrastive loss);
- every peer's settings are chosen on **other** removals: 25 further uniform single-pair removals of
  the same seed (``tune`` rows, disjoint from the reported ones), by leave-one-out Spearman there;
- grids: TRAK (traker) over its model output (traker's stock CLIP margin, or the margin matched to
  the objective: logit scale and the fixed reference batches as negatives) × ``lambda_reg`` (0 and
  0.1 … 10⁴ × δ·N; δ·N is the objective's own penalty in traker's normalisation) at a 1024-dim
  projection, then the projection dimension (64, 256, 4096, none: all P parameters) at the best of
  those, then 1 or 5 checkpoints (fine-tunes with 5 different reference batchings, warm-started
  from θ̂, as TRAK's paper ensembles independently trained models); kronfluence EK-FAC over its
  damping (its own heuristic; 0.001 … 10 × δ); TracIn over its checkpoints (θ̂ alone; θ̂ and the
  half-way point; 5 along the fine-tune from θ₀: after 1/16, 1/8, 1/4, 1/2 of the L-BFGS iterations it takes to come within 1% of its end
  and θ̂, uniform weights since L-BFGS has no learning rate);
- the untuned defaults (traker's, and kronfluence with damping δ) are rows too.

Reported: Pearson and Spearman over the 50 reported removals (mean over seeds, 95% interval from
resampling the removals within each seed), the LDS (Spearman over the 20 half-subsets of the additive
prediction against the actual Δφ, same intervals).  Each (data set, seed, δ) resumes from its cache.
The tuned peers' per-pair scores are kept for ``bench.cleaning`` (``PEER_SCORES`` in the run's cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from bench import common, fidelity

TUNE_REMOVALS = 25
TRAK_OUTPUTS = ("traker-clip", "objective")
TRAK_LAMBDA_FACTORS = (0.0, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)
TRAK_DIMENSION = 1024
TRAK_OTHER_DIMENSIONS = (64, 256, 4096, None)
ENSEMBLE_SIZE = 5
KRON_DAMPING_FACTORS = (None, 0.001, 0.01, 0.1, 1.0, 10.0)
TRACIN_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)
PEER_SCORES = "peer-scores.npz"
#: the rows of the report: ECIF's own predictors, then each peer family at its tuned best and as shipped.
FAMILIES = (
    ("influence", "ECIF exact (ours)"),
    ("influence_first_order", "ECIF first order (ours)"),
    ("influence_pos_only", "positive-only IF"),
    ("influence_identity", "ECIF with H := δ·I (no curvature)"),
    ("trak", "TRAK, tuned"),
    ("trak_default", "TRAK, traker defaults"),
    ("kronfluence", "kronfluence EK-FAC, tuned"),
    ("kronfluence_default", "kronfluence EK-FAC, damping δ"),
    ("tracin", "TracIn, tuned checkpoints"),
    ("tracin_one", "TracIn, θ̂ only"),
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.argument_parser(__doc__, __spec__.name)
    parser.add_argument("--datasets", default="shapes,digits")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--deltas", default="auto,1", help="comma-separated: auto (the run's chosen δ) and/or numbers")
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--quick", action="store_true", help="a small grid and 10 tuning removals (a smoke run)")
    parser.add_argument("--tolerance", type=float, default=1e-10)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--from-json", default=None, metavar="FILE[,FILE...]", help="measure nothing: one report from earlier outputs")
    common.add_common_arguments(parser, seed=False, threads=1, name="peers-tuned")
    return parser.parse_args(argv)


# --- the peers' candidate settings ------------------------------------------------------------------


def batching_checkpoints(current, count: int, cache: common.RetrainCache, key: str):
    """``count`` fine-tunes of the same problem with different reference batchings (seed 0 = θ̂'s own),
    each warm-started from θ̂: ``[(θ_k, data_k)]``."""
    import torch

    from ecif.finetune import finetune_heads
    from ecif.objective.contrastive import ContrastiveData, reference_batches

    data = current.problem.data
    width = max(len(b) for b in data.batches)
    out = [(current.theta, data)]
    for seed in range(1, count):
        batched = ContrastiveData(data.image, data.text, reference_batches(data.n_pairs, width, seed), data.normaliser, data.chunk_pairs)
        problem = current.problem.with_data(batched)
        path = cache.directory / f"{key}-batching{seed}.pt"
        if not path.exists():
            config = dataclasses.replace(fidelity_config(current), gradient_tolerance=1e-8)
            theta, report = finetune_heads(problem, current.theta, config)
            torch.save(theta, path)
            common.log(f"{key}: batching {seed} fine-tuned ({report.gradient_norm:.1e})")
        out.append((torch.load(path, weights_only=True), batched))
    return out


def fidelity_config(current):
    from ecif.config import FinetuneConfig

    return FinetuneConfig(delta=current.delta, newton_steps=0, max_lbfgs_iterations=3000)


def trajectory_checkpoints(current, cache: common.RetrainCache, key: str):
    """Points along a fine-tune from θ₀ (L-BFGS one iteration at a time, as the library's fine-tune but
    recorded): after 1/16, 1/8, 1/4 and 1/2 of the iterations it takes to come within 1% of its end, then θ̂."""
    import torch

    path = cache.directory / f"{key}-trajectory-v3.pt"
    if not path.exists():
        theta = current.problem.theta0.detach().clone().requires_grad_(True)
        optimiser = torch.optim.LBFGS([theta], lr=1.0, max_iter=1, history_size=50, tolerance_grad=1e-9,
                                      tolerance_change=1e-15, line_search_fn="strong_wolfe")

        def closure():
            optimiser.zero_grad()
            value = current.problem.objective(theta)
            value.backward()
            return value

        path_points = [theta.detach().clone()]
        for _ in range(3000):
            optimiser.step(closure)
            path_points.append(theta.detach().clone())
            if float(theta.grad.norm()) < 1e-7 or float((path_points[-1] - path_points[-2]).norm()) < 1e-12:
                break
        # The path's length in iterations: until it is within 1% of the way from θ₀ to where it ends
        # (L-BFGS creeps for a long time near the minimum; the checkpoints should span the descent).
        end, length = path_points[-1], float((path_points[-1] - path_points[0]).norm())
        total = next(t for t, point in enumerate(path_points) if float((point - end).norm()) <= 0.01 * length) or 1
        picks = sorted({max(1, int(round(total * fraction))) for fraction in TRACIN_FRACTIONS})
        torch.save(torch.stack([path_points[i] for i in picks]), path)
        common.log(f"{key}: fine-tune path within 1% of its end after {total} L-BFGS iterations; checkpoints after {picks}")
    return [*torch.load(path, weights_only=True), current.theta]


def tracin_scores(current, phi, checkpoints) -> np.ndarray:
    """TracIn ``(1/K) Σ_k (1/N) ∇Pos_n(θ_k)·∇φ(θ_k)`` (uniform weights: L-BFGS has no learning rate)."""
    import torch

    from bench.peers.adapters import pair_gradients

    total = np.zeros(current.problem.data.n_pairs)
    for theta in checkpoints:
        gradients = pair_gradients(current.problem.scope, theta, current.problem.data, ("pos",))["pos"]
        total += (gradients @ torch.func.grad(phi)(theta) / current.problem.data.normaliser).numpy()
    return total / len(checkpoints)


@dataclasses.dataclass(frozen=True)
class TrakSetting:
    """One TRAK candidate: output function, ridge as a multiple of δ·N, projection (None: all P), checkpoints."""

    output: str
    ridge_factor: float
    dimension: int | None
    checkpoints: int = 1

    @property
    def name(self) -> str:
        ensemble = "1 checkpoint" if self.checkpoints == 1 else f"{self.checkpoints} checkpoints (batchings)"
        return f"{self.output}, λ = {self.ridge_factor:g}·δN, dim {self.dimension or 'all P'}, {ensemble}"

    def scores(self, current, validation, checkpoints=None) -> np.ndarray:
        """Per-pair predicted Δφ ``[N]`` (the mean over the validation targets)."""
        from bench.peers.trak_adapter import trak_matrix

        ridge = self.ridge_factor * current.delta * current.problem.data.n_pairs
        return trak_matrix(current.problem, current.theta, validation, output=self.output, lambda_reg=ridge,
                           proj_dim=self.dimension or 10**9, checkpoints=checkpoints).mean(axis=0)


def candidates(current, phi, validation, cache, key: str, quick: bool, log, tune_rows,
               tune_actual) -> tuple[dict[str, dict[str, np.ndarray]], TrakSetting]:
    """Every peer family's candidate settings → per-pair predicted Δφ ``[N]`` (harmful < 0), and the TRAK
    setting that ranks best on the tuning removals.  TRAK's grid is searched in two stages (output ×
    ridge, then the projection at the best of those)."""
    from bench.peers.kronfluence_adapter import kronfluence_matrix
    from bench.peers.trak_adapter import trak_matrix

    problem, theta = current.problem, current.theta
    out: dict[str, dict[str, np.ndarray]] = {"trak": {}, "kronfluence": {}, "tracin": {}}
    started = time.perf_counter()
    lambda_factors = (0.0, 1.0) if quick else TRAK_LAMBDA_FACTORS
    tried: dict[str, TrakSetting] = {}

    def add(setting: TrakSetting) -> None:
        tried[setting.name] = setting
        out["trak"][setting.name] = setting.scores(current, validation)

    def best_trak() -> TrakSetting:
        return tried[max(out["trak"], key=lambda name: np.nan_to_num(spearman(out["trak"][name][tune_rows], tune_actual), nan=-2.0))]

    for output in TRAK_OUTPUTS:
        for factor in lambda_factors:
            add(TrakSetting(output, factor, TRAK_DIMENSION))
    stage_one = best_trak()
    for dimension in () if quick else TRAK_OTHER_DIMENSIONS:
        add(dataclasses.replace(stage_one, dimension=dimension))
    best = best_trak()
    out["trak_default"] = {"traker defaults (stock margin, λ = 0, dim min(2048, N/2))": trak_matrix(problem, theta, validation).mean(axis=0)}
    log(f"{key}: TRAK grid in {time.perf_counter() - started:.0f}s")
    for factor in (None, 1.0) if quick else KRON_DAMPING_FACTORS:
        damping = None if factor is None else factor * current.delta
        name = "damping: kronfluence's heuristic" if factor is None else f"damping {factor:g}·δ"
        out["kronfluence"][name] = kronfluence_matrix(problem, theta, validation, damping=damping).mean(axis=0)
    out["kronfluence_default"] = {"damping δ + 1e-4": kronfluence_matrix(problem, theta, validation).mean(axis=0)}
    log(f"{key}: kronfluence grid done ({time.perf_counter() - started:.0f}s)")
    path = trajectory_checkpoints(current, cache, key)
    out["tracin"]["θ̂ only"] = tracin_scores(current, phi, path[-1:])
    out["tracin"]["θ̂ and the half-way point"] = tracin_scores(current, phi, path[-2:])
    out["tracin"][f"{len(path)} along the fine-tune"] = tracin_scores(current, phi, path)
    out["tracin_one"] = {"θ̂ only": out["tracin"]["θ̂ only"]}
    log(f"{key}: TracIn done ({time.perf_counter() - started:.0f}s)")
    return out, best


# --- one seed at one δ --------------------------------------------------------------------------------


def spearman(predicted, actual) -> float:
    return common.correlations(predicted, actual)[1]


def measure(args, dataset: str, seed: int, delta_text: str) -> dict:
    from ecif.tasks.engine import load_engine

    work = common.work_dir(args)
    run = common.scored_demo_run(work, dataset, args.n, seed=seed, checkpoint=fidelity.backbone(work, dataset, seed, args.n))
    engine = load_engine(run)
    delta = float(engine.delta) if delta_text == "auto" else float(delta_text)
    cache = common.RetrainCache(Path(run.directory) / "bench-fidelity-uniform")
    key = f"{dataset}-s{seed}-d{delta:g}"
    phi = engine.trusted_loss()
    n = engine.problem.data.n_pairs
    common.log(f"{key}: θ̂ and the dense reference")
    current = fidelity.regime(engine, delta_text, delta, engine.theta, args.tolerance, cache, key)
    ecif_predictions = fidelity.single_pair_predictions(current, phi)

    reported = np.sort(np.random.default_rng(seed).choice(n, 50, replace=False))
    loo = fidelity.leave_one_out(current, phi, ecif_predictions, reported, cache, key, args.tolerance)
    lds = fidelity.linear_datamodeling(current, phi, ecif_predictions, 20, 0.5, seed, cache, key, args.tolerance)
    lds_rng = np.random.default_rng(10_000 + seed)
    lds_removed = [np.sort(lds_rng.choice(n, int(round(0.5 * n)), replace=False)) for _ in range(20)]

    pool = np.setdiff1d(np.arange(n), reported)
    tune_rows = np.sort(np.random.default_rng(50_000 + seed).choice(pool, 10 if args.quick else TUNE_REMOVALS, replace=False))
    base = float(phi(current.theta))
    tune_actual = np.array([fidelity.cached_removal(current, phi, base, [row], cache, f"{key}-tune-{row}", args.tolerance, row=int(row))["actual"]
                            for row in tune_rows])
    common.log(f"{key}: {len(tune_rows)} tuning removals ready")

    scores_path = cache.directory / f"{key}-{PEER_SCORES}"
    grid, best_trak = candidates(current, phi, engine.trusted_data, cache, key, args.quick, common.log, tune_rows, tune_actual)
    # The tuned TRAK setting again, ensembled over fine-tunes with different reference batchings.
    ensemble = dataclasses.replace(best_trak, checkpoints=2 if args.quick else ENSEMBLE_SIZE)
    grid["trak"][ensemble.name] = ensemble.scores(current, engine.trusted_data,
                                                  batching_checkpoints(current, ensemble.checkpoints, cache, key))
    tuning = {family: {name: spearman(values[tune_rows], tune_actual) for name, values in settings.items()} for family, settings in grid.items()}
    chosen = {family: max(scores, key=lambda name: (np.nan_to_num(scores[name], nan=-2.0))) for family, scores in tuning.items()}

    predictions = {**{name: ecif_predictions[name] for name, _ in FAMILIES if name in ecif_predictions},
                   **{family: grid[family][chosen[family]] for family in grid}}
    np.savez(scores_path, **{family: values for family, values in predictions.items()})
    actual_loo = np.array([record["actual"] for record in loo])
    actual_lds = np.array([record["actual"] for record in lds])
    return {
        "dataset": dataset, "seed": seed, "delta": delta, "delta_label": delta_text, "run": str(run.directory),
        "training_pairs": n, "trusted_pairs": engine.trusted_data.n_pairs, "polish": current.polish,
        "reported_rows": reported.tolist(), "tune_rows": tune_rows.tolist(),
        "loo_actual": actual_loo.tolist(), "lds_actual": actual_lds.tolist(), "tune_actual": tune_actual.tolist(),
        "tuning_spearman": tuning, "chosen": chosen,
        "loo_predicted": {family: values[reported].tolist() for family, values in predictions.items()},
        "lds_predicted": {family: [float(values[removed].sum()) for removed in lds_removed] for family, values in predictions.items()},
    }


# --- the report -----------------------------------------------------------------------------------------


def summarise(results: list[dict], draws: int) -> list[dict]:
    rows = []
    for (dataset, delta_label), group in _groups(results).items():
        for family, label in FAMILIES:
            if not all(family in r["loo_predicted"] for r in group):
                continue
            loo = fidelity.bootstrap_mean_correlation([(r["loo_predicted"][family], r["loo_actual"]) for r in group], draws)
            lds = fidelity.bootstrap_mean_correlation([(r["lds_predicted"][family], r["lds_actual"]) for r in group], draws)
            rows.append({"dataset": dataset, "delta": delta_label, "family": family, "label": label,
                         "deltas": [r["delta"] for r in group], "seeds": [r["seed"] for r in group],
                         "loo": loo, "lds": lds, "chosen": [r["chosen"].get(family) for r in group]})
    return rows


def _groups(results: list[dict]) -> dict:
    out: dict = {}
    for r in results:
        out.setdefault((r["dataset"], r["delta_label"]), []).append(r)
    return out


def report(results: list[dict], rows: list[dict], machine: dict, seconds: float | None) -> str:
    lines = ["# ECIF and its peers, every peer at its tuned best", "", common.machine_markdown(machine), "",
             "Leave-one-out: 50 uniform single-pair removals per seed; LDS: 20 random half-subsets per seed; φ = the trusted "
             "contrastive loss; every removal actually re-fine-tuned to a gradient norm ≤ 1e-10.  Mean over seeds with a 95% "
             "interval (resampling the removals within each seed).  Each peer's settings were chosen per seed on "
             f"{TUNE_REMOVALS} *other* uniform removals (leave-one-out Spearman); the chosen settings are listed below.  "
             "The protocol is in bench/peers/tuned.py.", ""]
    for (dataset, delta_label), group in _groups(results).items():
        deltas = ", ".join(f"{r['delta']:g}" for r in group)
        lines += [f"## {dataset}, δ = {delta_label} ({deltas} for seeds {', '.join(str(r['seed']) for r in group)})", "",
                  "| method | LOO Pearson | LOO Spearman | LDS (Spearman over subsets) |", "|---|---|---|---|"]
        for row in (r for r in rows if r["dataset"] == dataset and r["delta"] == delta_label):
            lines.append(f"| {row['label']} | {fidelity.interval(row['loo'], 'pearson')} | {fidelity.interval(row['loo'], 'spearman')} | "
                         f"{fidelity.interval(row['lds'], 'spearman')} |")
        lines += ["", "Chosen on the tuning removals (per seed):", ""]
        for family in ("trak", "kronfluence", "tracin"):
            picks = "; ".join(f"seed {r['seed']}: {r['chosen'][family]} (tuning Spearman {r['tuning_spearman'][family][r['chosen'][family]]:.3f})"
                              for r in group)
            lines.append(f"- {family}: {picks}")
        lines.append("")
    if seconds is not None:
        lines += [f"Measured in {seconds / 60:.0f} min (reusing bench.fidelity's cached retrains)."]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.from_json:
        results, machine = common.load_result_files(args.from_json)
        rows = summarise(results, args.bootstrap)
        markdown = report(results, rows, machine, None)
        common.publish(args.name, {"machine": machine, "results": results, "summary": rows, "markdown": markdown}, markdown, args.results)
        return
    machine = common.start(args)
    started = time.perf_counter()
    results = []
    for dataset in args.datasets.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            for delta_text in args.deltas.split(","):
                results.append(measure(args, dataset, seed, delta_text))
                rows = summarise(results, args.bootstrap)
                markdown = report(results, rows, machine, time.perf_counter() - started)
                common.write_results(args.name, {"settings": common.recorded_settings(args), "machine": machine, "results": results,
                                                 "summary": rows, "markdown": markdown}, markdown, args.results)
    common.announce(args.name, markdown, args.results)


if __name__ == "__main__":
    main()
