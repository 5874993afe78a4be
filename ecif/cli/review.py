"""Reading a scored run: ``demo`` (the whole path on the demo data), ``detect``, ``trace``,
``mispredictions``, ``edit``, ``export`` and the curation ``app``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pandas as pd

from ecif.cli.options import _add_run_options, _run_until
from ecif.cli.output import _emit, _name_unconverged, _table
from ecif.influence.columns import DETECTION_COLUMNS, MISALIGNMENT


def add_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("demo", help="the whole path on the built-in demo data, end to end")
    _add_run_options(p, out_required=False)
    p.set_defaults(handler=cmd_demo)

    p = commands.add_parser("detect", help="flag misaligned pairs (and measure against ground truth)")
    p.add_argument("--run", required=True)
    p.add_argument("--method", default=None, choices=DETECTION_COLUMNS,
                   help=f"the score to rank by (default {MISALIGNMENT}, the detector of wrong captions; self_influence_first_order "
                   "for streamed scores; influence ranks what to remove to lower the trusted-set loss instead)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_detect)

    p = commands.add_parser("trace", help="culprits and supporters of one test item's loss (zero-shot class, or its caption among its split's without a class; or several items' mean loss)")
    p.add_argument("--run", required=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--item", action="append", metavar="UID",
                       help="uid of a test item; repeat it to trace several items' mean loss")
    which.add_argument("--confusion", metavar="TRUE:PREDICTED",
                       help="every mispredicted item of class TRUE that the model calls PREDICTED, traced together "
                       "(e.g. --confusion square:circle)")
    p.add_argument("--if-dropped", choices=["closed", "refit"], default=None,
                   help="also answer what dropping the culprits would do to the traced items: in closed form, "
                   "or by actually re-fine-tuning")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--plain", action="store_true", help="rank by plain influence instead of the relative score")
    p.add_argument("--rank-by", default="total", choices=["total", "positive"],
                   help="rank by the total effect (both roles, default) or by the positive role alone: the pairs "
                   "whose own caption drives the item to its answer, leaving out correct pairs that act only as negatives")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_trace)

    p = commands.add_parser("mispredictions", help="test items the model gets wrong")
    p.add_argument("--run", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_mispredictions)

    p = commands.add_parser("edit", help="predict, apply (and verify) dropping the most harmful pairs")
    p.add_argument("--run", required=True)
    p.add_argument("--drop-top", type=int, default=50)
    p.add_argument("--drop-file", help="file with one uid per line to drop")
    p.add_argument("--verify", action="store_true", help="also re-fine-tune for the ground truth")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_edit)

    p = commands.add_parser("export", help="export the cleaned manifest one file per split (train.csv, val.csv, test.csv, ...), "
                            "uid lists, decisions and run.json")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--formats", default="csv,jsonl,parquet",
                   help="comma-separated, of csv, tsv, jsonl, parquet; each written as train.FMT, val.FMT and test.FMT "
                   "(default: csv,jsonl,parquet)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_export)

    p = commands.add_parser("app", help="open the curation app (built-in demo by default)")
    p.add_argument("--run", help="run folder (default: the demo run)")
    p.add_argument("--manifest", help="score this manifest with the demo model in the background")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default localhost only)")
    p.set_defaults(handler=cmd_app)


def _open_run(path: str):
    from ecif.run import Run

    run = Run(path)
    if not run.is_scored:
        raise SystemExit(f"{run.directory} is not a scored run (no scores.parquet); run `ecif score --out {path}` first")
    _name_unconverged(run)
    return run


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'s' * (number != 1)}"


def cmd_demo(args: argparse.Namespace) -> int:
    from ecif.config import AUTO_LOSS
    from ecif.tasks.detect import detection_report
    from ecif.tasks.pipeline import default_demo_run_dir
    from ecif.tasks.trace import mispredictions, trace

    if not args.out:  # a demo with another loss (`--loss siglip`) is another run: its own folder
        default = default_demo_run_dir()
        args.out = str(default if args.loss == AUTO_LOSS else default.with_name(f"{default.name}-{args.loss}"))
    args.manifest, args.model, args.checkpoint, args.pretrained, args.tokenizer = None, "demo", None, None, None
    run = _run_until(args, None)
    _name_unconverged(run)
    scores = run.scores()
    report = detection_report(scores)
    wrong = mispredictions(run)
    lines = [f"demo run: {run.directory}", "", "detection of planted misaligned pairs:", _table(report)]
    payload: dict[str, Any] = {"run": str(run.directory), "detection": report, "mispredictions": len(wrong)}
    if len(wrong):
        item = wrong.iloc[0]
        culprits = trace(run, item["uid"], top_k=5)
        payload["trace"] = {"uid": item["uid"], "culprits": culprits}
        lines += ["", f"{len(wrong)} mispredictions; culprits of {item['uid']} ({item['label']} predicted as {item['predicted']}):"]
        lines.append(_table(culprits[culprits.role == "culprit"], ["uid", "caption", "relative_influence", "influence", "corrupted"]))
    lines += ["", "open the app: ecif app"]
    _emit(args, payload, "\n".join(lines))
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from ecif.tasks.detect import default_detector, detection_report, flag, with_misalignment

    scores = with_misalignment(_open_run(args.run).scores())
    method = args.method or default_detector(scores)
    flagged = flag(scores, method=method, top_k=args.top_k)
    payload: dict[str, Any] = {"flagged": flagged, "method": method}
    text = f"{len(flagged)} pairs flagged by {method}:\n" + _table(flagged, list(dict.fromkeys(["rank", "uid", "caption", "influence", method, "suspicion"])))
    if "corrupted" in scores.columns:
        report = detection_report(scores)
        payload["metrics"] = report
        text += "\n\nagainst the planted ground truth:\n" + _table(report)
    _emit(args, payload, text)
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from ecif.tasks.trace import confusion_items, parse_confusion, trace

    run = _open_run(args.run)
    if args.confusion:
        label, predicted = parse_confusion(args.confusion)
        items = confusion_items(run, label, predicted)
        heading = f"{_count(len(items), 'item')} of class {label!r} predicted as {predicted!r}, traced together (their mean loss)\n"
    else:
        items = list(dict.fromkeys(args.item))
        heading = "" if len(items) == 1 else f"{len(items)} items traced together (their mean loss)\n"
    table = trace(run, items, top_k=args.top_k, relative=not args.plain, rank_by=args.rank_by)
    columns = ["role", "uid", "caption", "score", "influence", "influence_pos", "influence_neg", "main_role", "corrupted"]
    traced = {"item": items[0]} if args.item and len(items) == 1 else {"items": items}
    text = heading + _table(table, columns, 2 * args.top_k)
    if args.if_dropped:
        from ecif.tasks.edit import predict_items

        culprits = table.loc[table["role"] == "culprit", "row"].tolist()
        effect = predict_items(run, items, drop_rows=culprits, refit=args.if_dropped == "refit")
        traced["if_dropped"] = {"method": args.if_dropped, "rows": culprits, "items": effect}
        right = [int(effect[f"correct_{moment}"].sum()) for moment in ("before", "after")]
        text += (f"\n\nif these {_count(len(culprits), 'culprit')} were dropped ({'re-fine-tuned' if args.if_dropped == 'refit' else 'closed form'}): "
                 f"mean loss {effect['loss_before'].mean():.4f} -> {effect['loss_after'].mean():.4f} nats, "
                 f"right {right[0]} -> {right[1]} of {len(effect)}")
    _emit(args, {**traced, "pairs": table}, text)
    return 0


def cmd_mispredictions(args: argparse.Namespace) -> int:
    from ecif.tasks.trace import mispredictions

    table = mispredictions(_open_run(args.run))
    _emit(args, table, f"{len(table)} mispredictions\n" + _table(table, ["uid", "split", "kind", "label", "predicted", "prob_true", "loss"], 50))
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from ecif.tasks.edit import apply_edit, predict_edit, verify_by_refit

    run = _open_run(args.run)
    scores = run.scores()
    if args.drop_file:
        uids = {line.strip() for line in Path(args.drop_file).read_text().splitlines() if line.strip()}
        rows = scores.loc[scores["uid"].astype(str).isin(uids), "row"].tolist()
    else:
        rows = scores.nsmallest(args.drop_top, "rank")["row"].tolist()
    results = [predict_edit(run, rows), apply_edit(run, rows)]
    if args.verify:
        results.append(verify_by_refit(run, rows))
    frame = pd.DataFrame(
        [
            {
                "method": r.method,
                "trusted_loss": r.after.trusted_loss,
                "trusted_zero_shot": r.after.trusted_zero_shot_accuracy,
                "test_zero_shot": r.after.test_zero_shot_accuracy,
                "seconds": r.seconds,
            }
            for r in results
        ]
    )
    before = results[0].before
    text = (
        f"dropping {len(rows)} pairs; before: trusted loss {before.trusted_loss:.4f}, "
        f"test zero-shot {before.test_zero_shot_accuracy:.1%}\n" + _table(frame) + f"\nedited checkpoint: {results[1].checkpoint}"
    )
    _emit(args, [r.to_dict() for r in results], text)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ecif.curation.export import OPEN_CLIP_CSV_OPTIONS, export_run

    run = _open_run(args.run)
    result = export_run(run, Path(args.out), formats=tuple(args.formats.split(",")))
    payload = vars(result)
    counts = result.counts
    files = "\n".join(f"  {kind:<14} {path}" for kind, path in result.files.items())
    summary = ", ".join(f"{name} {value}" for name, value in counts.items())
    splits = ", ".join(f"{name} {value}" for name, value in result.splits.items())
    text = f"exported to {args.out} ({summary}; per split file: {splits})\n{files}"
    if "train_csv" in result.files:
        text += (f"\ntrain with open_clip on the train split only: python -m open_clip_train.main "
                 f"--train-data {result.files['train_csv']} {OPEN_CLIP_CSV_OPTIONS}")
    _emit(args, payload, text)
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    from ecif.jobs.launch import launch_app

    return launch_app(run_dir=args.run, manifest=args.manifest, port=args.port, host=args.host) or 0
