"""ECIF side by side with its peers on the same fine-tuned heads and the same training pairs.

    python -m bench.peers --toy 200                      # synthetic problem, seconds (no demo model)
    python -m bench.peers --run RUN_DIR [--run RUN2]     # existing scored ecif runs
    python -m bench.peers                                # builds/reuses shapes n=1500 10% random-caption
    python -m bench.peers --settings shapes:0.1:random-caption,digits:0.3:class-flip --n 1500

Methods (bench/peers/adapters.py): ECIF exact and first order, positive-only IF, ECIF
self-influence, TracIn (one checkpoint) and its self-influence, TRAK (traker, CPU), kronfluence
EK-FAC, CLIP-score and pair loss.  Measures: cost (wall time, peak memory) to score every pair;
detection (AUROC, AP, P@50) against the planted ``corrupted`` flags; leave-one-out fidelity
(``--loo K``); linear datamodeling score (``--lds M`` half-subsets); cleaning (``--clean``: top 10%
removed and re-fine-tuned vs nothing / random).  Prints markdown tables and the machine, and writes
``RESULTS/NAME.json`` and ``.md`` (default bench/results/peers.*).  Measures that were not asked for
say "not run" in the output.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import (
    add_common_arguments,
    argument_parser,
    demo_settings,
    log,
    machine_markdown,
    markdown_table,
    publish,
    recorded_settings,
    scored_demo_run,
    start,
    work_dir,
)
from bench.peers.adapters import METHODS


def parse_args(argv=None) -> argparse.Namespace:
    parser = argument_parser(__doc__, __spec__.name)
    parser.add_argument("--run", type=Path, action="append", default=[], help="a scored ecif run folder (repeatable)")
    parser.add_argument("--toy", type=int, default=None, help="use a synthetic heads problem with this many training pairs")
    parser.add_argument("--toy-flip", type=float, default=0.1, help="toy: fraction of flipped captions")
    parser.add_argument("--toy-batch-size", type=int, default=10)
    parser.add_argument("--settings", default=None, help="DATA:NOISE:CORRUPTION,... demo runs built with bench.common (as detect.py)")
    parser.add_argument("--n", type=int, default=1500, help="demo size for --settings / the default setting")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--loo", type=int, default=0, help="leave-one-out removals (0 = not run)")
    parser.add_argument("--deep", choices=["first", "all"], default="first",
                        help="run --loo/--lds/--clean on the first setting only (default) or on every setting")
    parser.add_argument("--lds", type=int, default=0, help="LDS random half-subsets (≥ 20 for the table; 0 = not run)")
    parser.add_argument("--clean", action="store_true", help="cleaning: remove top --clean-fraction by each method, re-fine-tune")
    parser.add_argument("--clean-fraction", type=float, default=0.1)
    parser.add_argument("--tolerance", type=float, default=1e-10, help="gradient tolerance of every retrain")
    parser.add_argument("--trak-proj-dim", type=int, default=None, help="TRAK JL dimension (default min(2048, N/2))")
    parser.add_argument("--kron-batch-size", type=int, default=64)
    parser.add_argument("--kron-damping", type=float, default=-1.0, help="kronfluence damping; -1 = the run's δ + 1e-4")
    add_common_arguments(parser, threads=1, name="peers")
    return parser.parse_args(argv)


def settings_of(args):
    from bench.peers import setting as settings

    if args.toy:
        yield lambda: settings.toy(args.toy, args.toy_batch_size, args.toy_flip, seed=args.seed)
    for run in args.run:
        yield lambda run=run: settings.from_run(run)
    specs = []
    if args.settings:
        specs = demo_settings(args.settings)
    elif not args.toy and not args.run:
        specs = [("shapes", 0.1, "random-caption")]
    for name, noise, corruption in specs:
        def build(name=name, noise=noise, corruption=corruption):
            run = scored_demo_run(work_dir(args), name, args.n, noise, corruption, args.seed)
            return settings.from_run(run.directory)
        yield build


def evaluate(args, setting, names, deep: bool = True) -> dict:
    from bench.peers import measure

    n = setting.problem.data.n_pairs
    log(f"{setting.name}: {n} training pairs, {setting.validation.n_pairs} trusted, {setting.theta.numel()} parameters")
    options = {"trak": {"proj_dim": args.trak_proj_dim, "seed": args.seed},
               "kronfluence": {"batch_size": args.kron_batch_size, "damping": args.kron_damping, "seed": args.seed}}
    results = measure.score_methods(setting, names, options, log=log)
    out = {"setting": setting.name, "training_pairs": n, "trusted_pairs": setting.validation.n_pairs,
           "parameters": int(setting.theta.numel()), "info": setting.info,
           "corrupted": int(setting.corrupted.sum()) if setting.corrupted is not None else None,
           "cost": {k: {kk: vv for kk, vv in v.items() if kk not in ("scores", "matrix")} for k, v in results.items()},
           "scores": {k: v["scores"] for k, v in results.items() if "scores" in v},
           "test_metric_name": setting.test_metric_name}
    out["detection"] = measure.detection(setting, results) if setting.corrupted is not None and setting.corrupted.any() else None
    out["loo"] = measure.leave_one_out(setting, results, args.loo, args.tolerance, args.seed, log) if args.loo and deep else None
    if args.lds and deep:
        mats = measure.matrices(setting, results)
        out["lds"] = measure.linear_datamodeling(setting, results, mats, args.lds, args.tolerance, seed=args.seed, log=log)
    else:
        out["lds"] = None
    out["cleaning"] = (
        measure.cleaning(setting, results, args.clean_fraction, args.tolerance, args.seed, log) if args.clean and deep else None
    )
    return out


def label(name: str) -> str:
    if name == "ecif_curvature":
        return "ECIF curvature (shared by the ECIF rows)"
    return METHODS[name].label if name in METHODS else name


def _ap_auroc(result: dict, method: str) -> str:
    row = next((r for r in result["detection"] if r["method"] == method), None)
    if row is None or row.get("average_precision") is None:
        return "–"
    return f"{row['average_precision']:.3f} ({row['auroc']:.3f})"


def render(args, machine, evaluated: list[dict], failures: list[str]) -> str:
    lines = ["# ECIF and its peers on the same model and data", "", machine_markdown(machine), "",
             "Every method scores every training pair of the same fine-tuned heads (θ̂) with the same trusted set; "
             "influence-type scores are oriented as Δφ (harmful = negative), see bench/peers/adapters.py.  "
             "Memory = extra resident memory at the method's peak (see bench/peers/measure.py).", ""]
    detected = [result for result in evaluated if result["detection"]]
    if len(detected) > 1:
        methods = [row["method"] for row in detected[0]["detection"]]
        lines += ["## Detection summary: average precision (AUROC) per setting", "",
                  markdown_table(["method"] + [result["setting"] for result in detected],
                                 [[label(method)] + [_ap_auroc(result, method) for result in detected] for method in methods]),
                  ""]
    for result in evaluated:
        settings_line = ", ".join(f"{k} {v}" for k, v in (result["info"].get("finetune") or {}).items()
                                  if k in ("delta", "batch_size"))
        lines += [f"## {result['setting']} ({result['training_pairs']} training pairs, {result['corrupted']} corrupted, "
                  f"{result['trusted_pairs']} trusted, {result['parameters']} parameters; {settings_line})", ""]
        cost = result["cost"]
        lines += ["### Cost to score every pair", "",
                  markdown_table(["method", "seconds", "peak memory (MiB)", "note"],
                                 [[label(k), v.get("seconds"), v.get("peak_mib"), v.get("error") or v.get("note", "")]
                                  for k, v in cost.items()]), ""]
        if result["detection"]:
            lines += ["### Detection (planted corruptions)", "",
                      markdown_table(["method", "AUROC", "AP", "P@50", "base rate"],
                                     [[label(r["method"]), r["auroc"], r["average_precision"], r["precision@50"], r["base_rate"]]
                                      for r in result["detection"]]), ""]
        else:
            lines += ["### Detection", "", "not run: no planted ground truth in this setting", ""]
        lines += ["### Leave-one-out fidelity (actual retraining)", ""]
        if result["loo"]:
            loo = result["loo"]
            lines += [f"{len(loo['rows'])} removals (half from the 10% most harmful by ECIF exact, half uniform); retrain "
                      f"gradient norm ≤ {loo['retrain_gradient_norm_max']:.1e}, median {loo['retrain_seconds_median']:.1f}s each.", "",
                      markdown_table(["method", "Pearson", "Spearman"],
                                     [[label(r["method"]), r["pearson"], r["spearman"]] for r in loo["table"]]), ""]
        else:
            lines += ["not run: pass --loo K (only the first setting unless --deep all)", ""]
        lines += ["### Linear datamodeling score", ""]
        if result["lds"]:
            lds = result["lds"]
            lines += [f"{lds['subsets']} random subsets keeping {lds['kept_fraction']:.0%} of the pairs, each re-fine-tuned "
                      f"(warm start from θ̂); targets = the {lds['targets']} trusted pairs' own losses; LDS = Spearman over "
                      "subsets of the additive prediction vs actual, mean (± sd) over targets; last column: the same for φ.", "",
                      markdown_table(["method", "LDS", "sd over targets", "Spearman on φ"],
                                     [[label(r["method"]), r["lds"], r["lds_std_over_targets"], r["phi_spearman"]]
                                      for r in lds["table"]]), ""]
        else:
            lines += ["not run: pass --lds M (M ≥ 20 random half-subsets, each one re-fine-tune; first setting unless --deep all)", ""]
        lines += ["### Cleaning (remove the most suspicious pairs, re-fine-tune)", ""]
        if result["cleaning"]:
            clean = result["cleaning"]
            lines += [f"Removed {clean['fraction']:.0%} of the training pairs; metric: {result['test_metric_name']}.", "",
                      markdown_table(["removed by", "pairs", "of them corrupted", "test metric", "trusted loss φ", "retrain s"],
                                     [[label(r["method"]), r["removed"], r["corrupted_removed"], r["test_metric"], r["phi"], r["seconds"]]
                                      for r in clean["table"]]), ""]
        else:
            lines += ["not run: pass --clean (first setting unless --deep all)", ""]
    if failures:
        lines += ["Failed settings: " + "; ".join(failures), ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    machine = start(args)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    started = time.perf_counter()
    evaluated, failures = [], []
    for position, build in enumerate(settings_of(args)):
        try:
            evaluated.append(evaluate(args, build(), names, deep=args.deep == "all" or position == 0))
        except Exception as error:
            log(f"setting FAILED: {type(error).__name__}: {error}")
            failures.append(f"{type(error).__name__}: {error}")
    markdown = render(args, machine, evaluated, failures)
    payload = {"settings": recorded_settings(args),
               "machine": machine, "results": evaluated, "failures": failures,
               "seconds": time.perf_counter() - started, "markdown": markdown}
    publish(args.name, payload, markdown, args.results)
    return payload


if __name__ == "__main__":
    main()
