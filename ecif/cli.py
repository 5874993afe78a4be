"""The ``ecif`` command line: a thin layer over the library (every command calls one library function).

Commands that report something accept ``--json``.  Long commands show progress bars, stop cleanly on
Ctrl-C, and resume from their cache when run again with the same arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pandas as pd

from ecif.data.demo import Corruption
from ecif.data.manifest import STREAM_ROWS_PER_CHUNK
from ecif.progress import Reporter

EXIT_USAGE = 2


class _Bars:
    """One tqdm bar per stage, for ``Reporter.callback`` (stderr, so ``--json`` stays clean)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.stage = None
        self.bar = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        from tqdm.auto import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total or None, desc=stage, leave=False, file=sys.stderr)
        if self.bar is not None:
            if total and self.bar.total != total:
                self.bar.total = total
            self.bar.n = done
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _reporter(args: argparse.Namespace) -> Reporter:
    return Reporter(callback=_Bars(quiet=getattr(args, "json", False)))


def _jsonable(value: Any) -> Any:
    if isinstance(value, pd.DataFrame):
        return [_jsonable(record) for record in value.to_dict(orient="records")]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(_jsonable(payload), indent=2))
    else:
        print(text)


def _table(frame: pd.DataFrame, columns: list[str] | None = None, limit: int = 20) -> str:
    if columns:
        frame = frame[[c for c in columns if c in frame.columns]]
    with pd.option_context("display.width", 200, "display.max_colwidth", 60, "display.float_format", "{:.4g}".format):
        return frame.head(limit).to_string(index=False)


# --- commands -----------------------------------------------------------------------------------------


def cmd_demo_data(args: argparse.Namespace) -> int:
    from ecif.data import load_manifest, make_demo_data

    path = make_demo_data(args.name, Path(args.out), n=args.n, noise=args.noise, corruption=args.corruption, seed=args.seed, reporter=_reporter(args))
    frame = load_manifest(path, check_images=False).frame
    train = frame[frame["split"] == "train"]
    payload = {
        "manifest": str(path),
        "rows": len(frame),
        "splits": frame["split"].value_counts().to_dict(),
        "train_corrupted": int(train["corrupted"].astype(bool).sum()),
        "train_rows": len(train),
    }
    _emit(args, payload, f"wrote {path}\n{len(frame)} rows; {payload['train_corrupted']} of {len(train)} train rows corrupted ({args.corruption})")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from ecif.data import bad_rows_report, load_manifest

    loaded = load_manifest(args.manifest, reporter=_reporter(args))
    payload = {
        "manifest": str(loaded.path),
        "valid_rows": len(loaded.frame),
        "bad_rows": loaded.bad_rows,
        "columns": list(loaded.frame.columns),
        "classes": loaded.classes.names if loaded.classes else None,
    }
    _emit(args, payload, f"{loaded.path}: {len(loaded.frame)} valid rows, {len(loaded.bad_rows)} skipped\n" + bad_rows_report(loaded))
    return 0


def _default_demo_manifest(args: argparse.Namespace) -> Path:
    from ecif.data import make_demo_data
    from ecif.paths import cache_dir
    from ecif.tasks.pipeline import DemoDataConfig

    demo = DemoDataConfig()
    folder = cache_dir() / "demo-data" / f"{demo.name}-{demo.n}-{demo.noise}-{demo.corruption}-{demo.seed}"
    manifest = folder / "manifest.csv"
    if not manifest.exists():
        make_demo_data(demo.name, folder, n=demo.n, noise=demo.noise, corruption=demo.corruption, seed=demo.seed, reporter=_reporter(args))
    return manifest


def cmd_train_demo(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ecif.data import load_manifest
    from ecif.models import load_model, train_demo_model, zero_shot_accuracy
    from ecif.models.demo import shipped_demo_record, write_shipped_demo_model
    from ecif.tasks.pipeline import DemoDataConfig

    if args.write_asset and args.manifest:
        raise SystemExit("--write-asset stores the model of the default demo; leave out --manifest")
    manifest = load_manifest(args.manifest or _default_demo_manifest(args), reporter=_reporter(args))
    if manifest.classes is None:
        raise SystemExit("the manifest has no labels, so zero-shot accuracy cannot be measured")
    # Always trained (or taken from the training cache), never the shipped copy: this is how the
    # shipped model is made and checked.
    checkpoint = train_demo_model(manifest, reporter=_reporter(args), use_shipped=False)
    loaded = load_model("ecif-demo", checkpoint=checkpoint)
    frame = manifest.frame
    test = frame[frame["split"] == args.split].reset_index(drop=True)
    accuracy = zero_shot_accuracy(loaded, test, manifest.classes)
    chance = 1.0 / len(manifest.classes.names)
    payload = {"checkpoint": str(checkpoint), "split": args.split, "zero_shot_accuracy": accuracy, "chance": chance, "items": len(test)}
    text = f"demo model: {checkpoint}\nzero-shot accuracy on {len(test)} {args.split} items: {accuracy:.1%} (chance {chance:.0%})"
    record = shipped_demo_record()
    shipped = (record or {}).get("zero_shot_accuracy", {}).get(args.split)
    if shipped is not None and not args.manifest:
        payload["shipped_zero_shot_accuracy"] = shipped
        text += f"\nthe shipped model: {shipped:.1%}"
    if args.write_asset:
        payload["asset"] = str(write_shipped_demo_model(checkpoint, manifest, asdict(DemoDataConfig()), accuracy={args.split: accuracy}))
        text += f"\nwrote the shipped model {payload['asset']}"
    _emit(args, payload, text)
    return 0


def _run_config(args: argparse.Namespace):
    from ecif.curvature.solvers import CurvatureConfig
    from ecif.models.heads import FinetuneConfig
    from ecif.tasks.pipeline import DemoDataConfig, RunConfig

    return RunConfig(
        run_dir=Path(args.out),
        manifest=Path(args.manifest) if args.manifest else None,
        model=args.model,
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        pretrained=args.pretrained,
        trusted_split=args.trusted_split,
        test_split=args.test_split,
        demo=DemoDataConfig(),
        finetune=FinetuneConfig(delta=args.delta, batch_size=args.batch_size, learn_logit_scale=args.learn_logit_scale, blocks=args.blocks),
        curvature=CurvatureConfig(solver=args.solver, kind=args.curvature, damping=args.damping),
    )


def _run_until(args: argparse.Namespace, stop_after: str | None):
    from ecif.tasks.pipeline import run_pipeline

    return run_pipeline(_run_config(args), reporter=_reporter(args), stop_after=stop_after)


def cmd_features(args: argparse.Namespace) -> int:
    run = _run_until(args, "features")
    stage = run.info["stages"]["features"]
    _emit(args, {"run": str(run.directory), **stage}, f"features cached for {run.directory}: image {stage['image_dim']}-d, text {stage['text_dim']}-d")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    run = _run_until(args, "fine-tune")
    report = run.finetune_report()
    selection = report["delta_selection"]
    text = "\n".join(
        [
            f"fine-tuned heads in {run.directory}",
            f"  penalty δ                {report['delta']:g}" + (" (chosen on held-out trusted pairs)" if selection else ""),
            *(_delta_sweep_lines(selection) if selection else []),
            f"  gradient norm            {report['gradient_norm']:.2e}",
            f"  smallest Hessian eigval  {report.get('smallest_hessian_eigenvalue_note') or format(report['smallest_hessian_eigenvalue'], '.4g')}",
            f"  smallest pre-norm norm   {report['smallest_prenorm_norm']:.4g}",
            f"  trusted-free train loss  {report['contrastive_loss']:.4f}",
            *[f"  WARNING: {w}" for w in report["warnings"]],
        ]
    )
    _emit(args, report, text)
    return 0 if report["converged"] else 1


def _delta_sweep_lines(selection: dict) -> list[str]:
    from ecif.models.heads import sweep_verdict

    lines = [f"    {'δ':>6}  {'held-out loss':>13}  {'gradient norm':>13}  {'min eigenvalue':>14}  verdict"]
    for point in selection["sweep"]:
        verdict = sweep_verdict(point, selection["delta"])
        if "skipped" in point:
            lines.append(f"    {point['delta']:>6g}  {'':>13}  {'':>13}  {'':>14}  {verdict}")
            continue
        lines.append(
            f"    {point['delta']:>6g}  {point['selection_loss']:>13.4f}  {point['gradient_norm']:>13.2e}  "
            f"{point['smallest_hessian_eigenvalue']:>14.4g}  {verdict}"
        )
    if selection.get("note"):
        lines.append(f"    note: {selection['note']}")
    return lines


def cmd_score(args: argparse.Namespace) -> int:
    run = _run_until(args, None)
    _name_unconverged(run)
    scores = run.scores()
    payload = {"run": str(run.directory), "pairs": len(scores), "most_harmful": scores.head(args.top)}
    text = f"scored {len(scores)} pairs → {run.directory / 'scores.parquet'}\nmost harmful:\n" + _table(
        scores,
        ["rank", "uid", "caption", "influence", "influence_pos", "influence_neg", "self_influence_first_order", "clip_score"],
        args.top,
    )
    _emit(args, payload, text)
    return 0


def _executor(args: argparse.Namespace):
    from ecif.influence.streaming import LocalExecutor, RayExecutor

    return LocalExecutor() if args.ray is None else RayExecutor(None if args.ray == "local" else args.ray)


def cmd_extract_features(args: argparse.Namespace) -> int:
    from ecif.tasks.extract import LEFT_OUT_GLOB, extract_feature_store, read_left_out

    store = extract_feature_store(
        args.manifest, args.out, args.model, args.checkpoint, args.pretrained, splits=args.split,
        rows_per_chunk=args.rows_per_chunk, batch_size=args.batch_size, executor=_executor(args), reporter=_reporter(args),
    )
    left_out = read_left_out(store.directory)
    payload = {"store": store.directory, "pairs": store.n_pairs, "shards": store.n_shards, "image_dim": store.image_dim,
               "text_dim": store.text_dim, "left_out_rows": len(left_out), "left_out": left_out.head(args.top)}
    text = f"wrote {store.n_pairs} pairs in {store.n_shards} shards → {store.directory} (image {store.image_dim}-d, text {store.text_dim}-d)"
    if len(left_out):
        text += (f"\n{len(left_out)} rows left out, not in the store (all listed in {store.directory / LEFT_OUT_GLOB}):\n"
                 + _table(left_out, ["row", "uid", "reason", "filepath", "shard"], args.top))
    _emit(args, payload, text)
    return 0


def cmd_score_features(args: argparse.Namespace) -> int:
    from ecif.influence.streaming import FeatureStore, StreamingConfig, read_scores, score_store
    from ecif.tasks.engine import load_heads
    from ecif.tasks.extract import read_row_map

    scope, theta, theta0 = load_heads(Path(args.heads))
    config = StreamingConfig(
        batch_size=args.batch_size, delta=args.delta, damping=args.damping, self_influence=args.self_influence,
        gradient_tolerance=args.gradient_tolerance, allow_unconverged=args.allow_unconverged,
    )
    trusted = FeatureStore.open(args.trusted).in_memory(args.batch_size)
    store = FeatureStore.open(args.features)
    reporter = _reporter(args)
    # Heads that are not a minimiser of the scored R raise NotAMinimiser (a ValueError: one line from main).
    result = score_store(store, trusted, scope, theta, args.out, config, _executor(args), reporter, theta0=theta0)
    reporter.callback.close()  # a progress bar left open would share the warning's line
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    influence = read_scores(args.out)["influence"]
    harmful = np.argsort(influence)[: args.top]
    check = result.stationarity
    gradient_norm, relative = (math.nan if check[key] is None else check[key] for key in ("gradient_norm", "relative_gradient_norm"))
    payload = {"out": str(result.out_dir), "pairs": result.n_pairs, "solver": result.solver, "seconds": result.seconds,
               "stationarity": check, "warnings": result.warnings,
               "most_harmful_rows": harmful.tolist(), "most_harmful_influence": influence[harmful].tolist()}
    row_map = read_row_map(store, columns=["uid"])
    if row_map is None:
        what, names = "rows", [str(row) for row in harmful]
    else:  # an extracted store names its pairs
        what, names = "pairs", row_map["uid"].to_numpy()[harmful].tolist()
        payload["most_harmful_uids"] = names
    lines = [f"scored {result.n_pairs} pairs → {result.out_dir}/scores-*.npz (negative influence = harmful)",
             f"heads {'are' if check['passed'] else 'are NOT'} a minimiser of the scored objective: gradient norm "
             f"{gradient_norm:.2e} (tolerance {check['tolerance']:.0e}, relative {relative:.2e})",
             f"most harmful {what}: " + ", ".join(f"{name} ({influence[row]:.3g})" for name, row in zip(names, harmful))]
    _emit(args, payload, "\n".join(lines))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ecif.tasks.detect import detection_report
    from ecif.tasks.pipeline import default_demo_run_dir
    from ecif.tasks.trace import mispredictions, trace

    args.out = args.out or str(default_demo_run_dir())
    args.manifest, args.model, args.checkpoint, args.pretrained = None, "demo", None, None
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


def _open_run(path: str):
    from ecif.run import Run

    run = Run(path)
    if not run.is_scored:
        raise SystemExit(f"{run.directory} is not a scored run (no scores.parquet); run `ecif score --out {path}` first")
    _name_unconverged(run)
    return run


def _name_unconverged(run) -> None:
    """Say on stderr, before any score, that the run's heads are not a well-conditioned minimiser."""
    warning = run.unconverged_warning()
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr)


def cmd_detect(args: argparse.Namespace) -> int:
    from ecif.tasks.detect import detection_report, flag

    scores = _open_run(args.run).scores()
    flagged = flag(scores, method=args.method, top_k=args.top_k)
    payload: dict[str, Any] = {"flagged": flagged}
    text = f"{len(flagged)} pairs flagged by {args.method}:\n" + _table(flagged, list(dict.fromkeys(["rank", "uid", "caption", "influence", args.method, "suspicion"])))
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
        from ecif.tasks.clean import predict_items

        culprits = table.loc[table["role"] == "culprit", "row"].tolist()
        effect = predict_items(run, items, drop_rows=culprits, refit=args.if_dropped == "refit")
        traced["if_dropped"] = {"method": args.if_dropped, "rows": culprits, "items": effect}
        right = [int(effect[f"correct_{moment}"].sum()) for moment in ("before", "after")]
        text += (f"\n\nif these {_count(len(culprits), 'culprit')} were dropped ({'re-fine-tuned' if args.if_dropped == 'refit' else 'closed form'}): "
                 f"mean loss {effect['loss_before'].mean():.4f} -> {effect['loss_after'].mean():.4f} nats, "
                 f"right {right[0]} -> {right[1]} of {len(effect)}")
    _emit(args, {**traced, "pairs": table}, text)
    return 0


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'s' * (number != 1)}"


def cmd_mispredictions(args: argparse.Namespace) -> int:
    from ecif.tasks.trace import mispredictions

    table = mispredictions(_open_run(args.run))
    _emit(args, table, f"{len(table)} mispredictions\n" + _table(table, ["uid", "split", "kind", "label", "predicted", "prob_true", "loss"], 50))
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from ecif.tasks.clean import apply_edit, predict_edit, verify_by_refit

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
    payload = result if isinstance(result, dict) else vars(result)
    counts = payload.get("counts", {})
    files = "\n".join(f"  {kind:<14} {path}" for kind, path in payload.get("files", {}).items())
    summary = ", ".join(f"{name} {value}" for name, value in counts.items())
    splits = ", ".join(f"{name} {value}" for name, value in payload.get("splits", {}).items())
    text = f"exported to {args.out} ({summary}; per split file: {splits})\n{files}"
    if "train_csv" in payload.get("files", {}):
        text += (f"\ntrain with open_clip on the train split only: python -m open_clip_train.main "
                 f"--train-data {payload['files']['train_csv']} {OPEN_CLIP_CSV_OPTIONS}")
    _emit(args, payload, text)
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    from ecif.jobs.launch import launch_app

    return launch_app(run_dir=args.run, manifest=args.manifest, port=args.port, host=args.host) or 0


# --- parser -------------------------------------------------------------------------------------------


def _add_model_options(parser: argparse.ArgumentParser, demo: str) -> None:
    parser.add_argument("--model", default="demo", help=f"{demo} or any open_clip model name")
    parser.add_argument("--checkpoint", help="local checkpoint file (safetensors or torch weights) for --model")
    parser.add_argument("--pretrained", help="open_clip pretrained tag (only if already in the local cache; offline)")


def _delta_argument(value: str) -> float | str:
    from ecif.models.heads import parse_delta

    try:
        return parse_delta(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_run_options(parser: argparse.ArgumentParser, out_required: bool = True) -> None:
    parser.add_argument("--manifest", help="CSV/TSV/JSONL/parquet manifest or image folder (default: built-in demo data)")
    _add_model_options(parser, "'demo' (trains the small ecif-demo model)")
    parser.add_argument("--out", required=out_required, help="run folder")
    parser.add_argument("--trusted-split", default="val", help="split used as the trusted set (default: val)")
    parser.add_argument("--test-split", default="test", help="split scanned for mispredictions (default: test)")
    parser.add_argument(
        "--delta",
        type=_delta_argument,
        default="auto",
        help="penalty δ towards the starting heads: 'auto' (default: chosen on held-out trusted pairs from "
        "3, 1, 0.3, 0.1, 0.03, 0.01) or a number",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="reference batch size (default 64)")
    parser.add_argument("--learn-logit-scale", action="store_true", help="include the logit scale in the influence scope")
    parser.add_argument(
        "--blocks",
        type=int,
        default=0,
        help="widen the influence scope to the last N transformer blocks of each tower as well as the heads "
        "(default 0: heads only; slower, for up to a few thousand pairs)",
    )
    parser.add_argument("--solver", default="auto", choices=["auto", "dense", "cg", "ekfac", "ekfac-cg", "lowrank-cg"], help="curvature solver")
    parser.add_argument("--curvature", default="hessian", choices=["hessian", "ggn"], help="Hessian or Gauss-Newton")
    parser.add_argument("--damping", type=float, default=1e-4, help="damping added to the curvature (default 1e-4)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _add_ray_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help=f"{what}: a local Ray instance, or the cluster at ADDRESS (pip install 'ecif[ray]')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecif", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("demo-data", help="generate a demo data set (offline, deterministic)")
    p.add_argument("name", choices=["shapes", "digits"])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--corruption", default="random-caption", choices=list(get_args(Corruption)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_demo_data)

    p = commands.add_parser("validate", help="check a manifest and list every bad row")
    p.add_argument("manifest")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_validate)

    p = commands.add_parser("train-demo", help="train the small demo model from scratch (cached) and report its zero-shot accuracy")
    p.add_argument("--manifest", help="demo manifest (default: shapes, n=3000, 10%% random-caption noise)")
    p.add_argument("--split", default="test")
    p.add_argument("--write-asset", action="store_true", help="store the trained model as the shipped one (assets/models)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_train_demo)

    for name, handler, text in (
        ("features", cmd_features, "compute and cache backbone features"),
        ("finetune", cmd_finetune, "fine-tune the influence scope (the heads; with --blocks also the last blocks) to a minimiser and report convergence"),
        ("score", cmd_score, "score every training pair (the whole run)"),
    ):
        p = commands.add_parser(name, help=text)
        _add_run_options(p)
        if name == "score":
            p.add_argument("--top", type=int, default=10)
        p.set_defaults(handler=handler)

    p = commands.add_parser("extract-features", help="backbone features of a (large) manifest into a feature store, chunk by chunk (resumable; --ray for many machines)")
    p.add_argument("--manifest", required=True, help="manifest file, folder or glob of parquet/tar shards")
    _add_model_options(p, "'demo' (the ecif-demo model: its --checkpoint, else trained on the manifest)")
    p.add_argument("--out", required=True, help="feature store folder (resumable)")
    p.add_argument("--split", action="append", help="keep only this split (train / val / test); repeat for several (default: all)")
    p.add_argument("--rows-per-chunk", type=int, default=STREAM_ROWS_PER_CHUNK, help=f"manifest rows per chunk and store shard at most (default {STREAM_ROWS_PER_CHUNK})")
    p.add_argument("--batch-size", type=int, default=64, help="images encoded at a time (default 64)")
    _add_ray_option(p, "encode chunks as Ray tasks (images, tars and checkpoint must be at the same paths on every node)")
    p.add_argument("--top", type=int, default=20, help="left-out rows shown (default 20)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_extract_features)

    p = commands.add_parser("score-features", help="score many pairs from feature shards on disk (bounded memory; --ray for many machines)")
    p.add_argument("features", help="feature store folder (ecif extract-features, or ecif.influence.streaming.write_feature_store)")
    p.add_argument("--trusted", required=True, help="feature store of the trusted set (held in memory)")
    p.add_argument("--heads", required=True, help="heads.safetensors with the fine-tuned θ̂ (e.g. from a run folder)")
    p.add_argument("--out", required=True, help="folder for scores-*.npz (resumable)")
    p.add_argument("--batch-size", type=int, default=64, help="reference batch size within each shard (default 64)")
    p.add_argument("--delta", type=float, default=1.0, help="the δ the heads were fine-tuned with (default 1.0)")
    p.add_argument("--damping", type=float, default=1e-4)
    p.add_argument("--self-influence", action="store_true", help="also both self-influence columns, exact and first order (a [batch, parameters] Jacobian per batch and form: much slower)")
    p.add_argument("--gradient-tolerance", type=float, default=1e-4,
                   help="largest gradient norm of the scored objective at the heads accepted as a minimiser (default 1e-4)")
    p.add_argument("--allow-unconverged", action="store_true",
                   help="score heads that are not a minimiser of the scored objective anyway, with a warning "
                   "(by default they are refused: ECIF assumes a minimiser)")
    _add_ray_option(p, "score shards as Ray tasks")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_score_features)

    p = commands.add_parser("demo", help="the whole path on the built-in demo data, end to end")
    _add_run_options(p, out_required=False)
    p.set_defaults(handler=cmd_demo)

    p = commands.add_parser("detect", help="flag misaligned pairs (and measure against ground truth)")
    p.add_argument("--run", required=True)
    p.add_argument("--method", default="influence", choices=["influence", "self_influence", "self_influence_first_order"])
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
    return parser


def main(argv: list[str] | None = None) -> int:
    from ecif.data import ManifestError
    from ecif.progress import Cancelled

    args = build_parser().parse_args(argv)

    def fail(error: BaseException, message: str, code: int = 1, prefix: str = "error: ") -> int:
        """One line on stderr; with ``--json`` also ``{"error", "kind", "file"}`` on stdout for scripts."""
        message = " ".join(message.split())
        tqdm = sys.modules.get("tqdm")
        for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
            bar.close()  # a progress bar left open would share the error's line
        if getattr(args, "json", False):
            file = getattr(error, "path", None) or getattr(error, "filename", None)
            if file is None and isinstance(error, ManifestError):
                file = getattr(args, "manifest", None)
            payload = {"error": message, "kind": type(error).__name__, "file": None if file is None else str(file)}
            print(json.dumps(payload))
        print(f"{prefix}{message}", file=sys.stderr)
        return code

    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt as error:
        return fail(error, "interrupted; run the same command again to resume from the cache", 130, "\n")
    except Cancelled as error:
        return fail(error, str(error), 130, "cancelled: ")
    except (ManifestError, FileNotFoundError, KeyError, ValueError) as error:
        return fail(error, str(error))
    except SystemExit as error:  # a command's own refusal, e.g. "not a scored run"
        if isinstance(error.code, str):
            return fail(error, error.code)
        raise
    except Exception as error:  # a clear one-line error for known library failures
        from ecif.models.open_clip_models import ModelLoadError

        if isinstance(error, ModelLoadError):
            return fail(error, str(error))
        raise


if __name__ == "__main__":
    sys.exit(main())
