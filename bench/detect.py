"""Misalignment detection on the demo data with planted ground truth (docs/method.md §8).

For each setting (data set × noise rate × corruption kind) this script builds or reuses a scored demo
run — the demo CLIP is trained on the noisy manifest (cached per manifest), the heads are fine-tuned
and every training pair is scored — then ``ecif.detection_report`` measures AUROC, average precision
and precision@50/100 of every score against the planted ``corrupted`` flags: exact ECIF
(``influence``), first-order ECIF, positive-only influence, self-influence, CLIP-score and the pair's
own loss.  Each setting lives in its own run folder under ``--work`` and resumes where it stopped
(the demo model resumes per epoch); results are written after every finished setting.

    .venv/bin/python -m bench.detect             # shapes, 10% and 30%, all three corruptions, n=3000
    .venv/bin/python -m bench.detect --digits    # ... and the same on digits
    .venv/bin/python -m bench.detect --quick     # shapes 10% random-caption only, n=1500
    .venv/bin/python -m bench.detect --settings shapes:0.3:class-flip --n 1500
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import (
    add_batch_size_argument,
    add_common_arguments,
    announce,
    argument_parser,
    demo_settings,
    log,
    machine_markdown,
    markdown_table,
    pretraining_pool_checkpoint,
    recorded_settings,
    scored_demo_run,
    start,
    work_dir,
    write_results,
)

CORRUPTIONS = ("random-caption", "attribute-swap", "class-flip")
NOISES = (0.1, 0.3)
TARGET_AUROC = 0.97
#: the columns of the summary table: the default detector, ECIF's two (with and without a trusted set), the baseline.
SUMMARY_COLUMNS = ("misalignment", "influence", "self_influence_first_order", "clip_score")
LABELS = {
    "misalignment": "default detector (misalignment)",
    "influence": "ECIF (exact)",
    "influence_first_order": "ECIF (first order)",
    "influence_pos": "positive-only IF",
    "self_influence": "ECIF self-influence (exact)",
    "self_influence_first_order": "ECIF self-influence (first order)",
    "clip_score": "CLIP-score",
    "loss": "pair loss",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argument_parser(__doc__, __spec__.name)
    parser.add_argument("--quick", action="store_true", help="shapes 10%% random-caption only, n=1500")
    parser.add_argument("--n", type=int, default=None, help="demo size (all splits); default 3000, --quick 1500")
    parser.add_argument("--digits", action="store_true", help="also run every setting on the digits demo")
    parser.add_argument(
        "--settings", default=None, help="comma-separated DATA:NOISE:CORRUPTION (e.g. shapes:0.1:random-caption); overrides the grid"
    )
    add_batch_size_argument(parser)
    parser.add_argument(
        "--checkpoint", type=Path, default=None,
        help="score with this trained ecif-demo checkpoint instead of training one per manifest (own run folder)",
    )
    parser.add_argument(
        "--pretrained-pool", action="store_true",
        help="score with a demo CLIP trained on a separate clean demo set (the paper's protocol: pretrained model, "
        "noisy fine-tuning data) instead of one trained on each noisy manifest; results go to NAME-pretrained",
    )
    parser.add_argument(
        "--solver", default="dense",
        help="curvature solver (default dense, the reference; 'auto' is what the product runs); other than dense: own run folder",
    )
    add_common_arguments(parser, name="detect")
    args = parser.parse_args(argv)
    if args.n is None:
        args.n = 1500 if args.quick else 3000
    return args


def settings_of(args) -> list[tuple[str, float, str]]:
    if args.settings:
        out = demo_settings(args.settings)
        for _, _, corruption in out:
            if corruption not in CORRUPTIONS:
                raise SystemExit(f"unknown corruption {corruption!r}; choose one of {', '.join(CORRUPTIONS)}")
        return out
    if args.quick:
        return [("shapes", 0.1, "random-caption")]
    names = ["shapes", "digits"] if args.digits else ["shapes"]
    return [(name, noise, corruption) for name in names for noise in NOISES for corruption in CORRUPTIONS]


def evaluate_setting(
    work: Path, name: str, n: int, noise: float, corruption: str, seed: int, batch_size: int | None = None,
    checkpoint: Path | None = None, solver: str = "dense",
) -> dict:
    import ecif

    started = time.perf_counter()
    run = scored_demo_run(work, name, n, noise, corruption, seed, batch_size, checkpoint, solver=solver)
    scores = run.scores()
    report = ecif.detection_report(scores)
    stages = run.info.get("stages", {})
    finetune = run.info.get("stages", {}).get("fine-tune", {})
    return {
        "data": name,
        "n": n,
        "noise": noise,
        "corruption": corruption,
        "run_dir": str(run.directory),
        "training_pairs": int(len(scores)),
        "corrupted": int(scores["corrupted"].astype(bool).sum()),
        "report": report.to_dict(orient="records"),
        "stage_seconds": {stage: value.get("seconds") for stage, value in stages.items()},
        "finetune_gradient_norm": finetune.get("gradient_norm"),
        "run_settings": {
            "reference_batch_size": run.info["settings"]["finetune"]["batch_size"],
            "delta": run.info["settings"]["finetune"]["delta"],
            "damping": run.info["settings"]["curvature"]["damping"],
            "solver": run.info["settings"]["curvature"]["solver"],
            "model": Path(run.info.get("model_checkpoint") or run.info.get("demo_checkpoint") or "?").name,
        },
        "finetune_converged": finetune.get("converged"),
        "seconds_this_process": time.perf_counter() - started,
    }


def render(args, machine, results: list[dict], pending: list[tuple[str, float, str]]) -> str:
    lines = [
        "# Misalignment detection on the demo data (planted corruptions)",
        "",
        machine_markdown(machine),
        "",
        f"Each setting: demo data (n={args.n} over train/val/test, seed {args.seed}), "
        + (
            f"the demo CLIP trained on a separate clean demo set (seed {args.seed + 1000}; a stand-in for a pretrained model), "
            if args.pretrained_pool
            else "the demo CLIP trained on the noisy manifest, "
        )
        + "heads fine-tuned (settings per setting below), every training pair scored with φ = trusted (val) contrastive loss.  "
        "Suspicion direction: harmful (negative) influence, high self-influence (no trusted set; the pair's own "
        "Pos + Neg, Neg exact or first order), low CLIP-score, high pair loss.  "
        "`base rate` = fraction corrupted = AP of a random ranking.",
        "",
    ]
    summary = []
    for result in results:
        title = f"{result['data']}, {result['noise']:.0%} {result['corruption']}"
        rows = result["report"]
        lines += [
            f"## {title} ({result['training_pairs']} training pairs, {result['corrupted']} corrupted; "
            + ", ".join(f"{k} {v}" for k, v in result.get("run_settings", {}).items())
            + ")",
            "",
            markdown_table(
                ["score", "AUROC", "AP", "P@50", "P@100", "base rate"],
                [
                    [LABELS.get(r["score"], r["score"]), r["auroc"], r["average_precision"], r["precision@50"], r["precision@100"], r["base_rate"]]
                    for r in rows
                ],
            ),
            "",
            "Stage seconds: "
            + ", ".join(f"{stage} {seconds:.0f}" for stage, seconds in result["stage_seconds"].items() if seconds is not None)
            + f"; fine-tune gradient norm {result['finetune_gradient_norm']:.1e}.",
            "",
        ]
        by_score = {r["score"]: r for r in rows}
        if all(column in by_score for column in SUMMARY_COLUMNS):
            summary.append(
                [title, *[by_score[c][m] for c in SUMMARY_COLUMNS for m in ("auroc", "average_precision")],
                 LABELS.get(best := max(rows, key=lambda r: r["average_precision"])["score"], best)]
            )
    if summary:
        lines += [
            "## Summary (ECIF influence and ECIF self-influence vs CLIP-score)",
            "",
            markdown_table(
                ["setting", *[f"{LABELS[c]} {m}" for c in SUMMARY_COLUMNS for m in ("AUROC", "AP")], "best AP"], summary
            ),
            "",
        ]
    target = next(
        (r for r in results if r["data"] == "shapes" and abs(r["noise"] - 0.1) < 1e-9 and r["corruption"] == "random-caption"), None
    )
    if target is not None:
        by_score = {r["score"]: r for r in target["report"]}
        clip_ap = by_score["clip_score"]["average_precision"]
        verdicts = []
        for column in SUMMARY_COLUMNS[:-1]:
            if column not in by_score:
                continue
            auroc, ap = by_score[column]["auroc"], by_score[column]["average_precision"]
            verdicts.append(
                f"{LABELS[column]}: AUROC {auroc:.4f} → {'MET' if auroc >= TARGET_AUROC else 'MISSED'}, "
                f"AP {ap:.4f} vs CLIP-score {clip_ap:.4f} → {'MET' if ap >= clip_ap else 'MISSED'}"
            )
        lines += [f"**Targets** (shapes 10% random-caption; AUROC ≥ {TARGET_AUROC}, AP ≥ CLIP-score's): " + "; ".join(verdicts) + ".", ""]
    if pending:
        lines += ["Not yet run (interrupted or failed): " + ", ".join(f"{d} {x:.0%} {c}" for d, x, c in pending), ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    machine = start(args)
    work = work_dir(args)
    settings = settings_of(args)
    if args.pretrained_pool:
        args.name = f"{args.name}-pretrained"
    log(f"detect: {len(settings)} setting(s), n={args.n}, work folder {work}")
    results, failures = [], []
    started = time.perf_counter()
    for position, (name, noise, corruption) in enumerate(settings, start=1):
        log(f"setting {position}/{len(settings)}: {name} {noise:.0%} {corruption}")
        try:
            checkpoint = pretraining_pool_checkpoint(work, name, args.n, args.seed) if args.pretrained_pool else args.checkpoint
            results.append(evaluate_setting(work, name, args.n, noise, corruption, args.seed, args.batch_size, checkpoint, args.solver))
        except Exception as error:  # keep going: one broken setting must not lose the others
            log(f"setting {name} {noise:.0%} {corruption} FAILED: {type(error).__name__}: {error}")
            failures.append({"data": name, "noise": noise, "corruption": corruption, "error": f"{type(error).__name__}: {error}"})
        done = {(r["data"], r["noise"], r["corruption"]) for r in results}
        pending = [s for s in settings if s not in done]
        markdown = render(args, machine, results, pending)
        payload = {
            "settings": recorded_settings(args),
            "machine": machine,
            "results": results,
            "failures": failures,
            "seconds": time.perf_counter() - started,
            "markdown": markdown,
        }
        write_results(args.name, payload, markdown, args.results)
    announce(args.name, markdown, args.results)
    return payload


if __name__ == "__main__":
    main()
