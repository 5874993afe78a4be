"""A run folder, stage by stage: ``features``, ``finetune``, ``score`` (all take the run options)."""

from __future__ import annotations

import argparse

from ecif.cli.options import _add_run_options, _run_until
from ecif.cli.output import _emit, _name_unconverged, _table


def add_commands(commands: argparse._SubParsersAction) -> None:
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
    from ecif.finetune import sweep_verdict

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
