"""Options that several commands share (the model, a run's settings), and the run they describe."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import get_args

from ecif.cli.output import _reporter


def _add_model_options(parser: argparse.ArgumentParser, demo: str) -> None:
    parser.add_argument("--model", default="demo", help=f"{demo} or any open_clip model name")
    parser.add_argument("--checkpoint", help="local checkpoint file (safetensors or torch weights) for --model")
    parser.add_argument("--pretrained", help="open_clip pretrained tag (only if already in the local cache; offline)")
    parser.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="local tokenizer folder, for a --model whose tokenizer comes from the Hugging Face hub (e.g. SigLIP); "
        "default: the local Hugging Face cache (offline)",
    )


def _delta_argument(value: str) -> float | str:
    from ecif.config import parse_delta

    try:
        return parse_delta(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _device_argument(value: str) -> str:
    from ecif.config import parse_device

    try:
        return parse_device(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_device_option(parser: argparse.ArgumentParser) -> None:
    from ecif.config import AUTO_DEVICE, DEVICE_FORMS

    parser.add_argument(
        "--device",
        type=_device_argument,
        default=AUTO_DEVICE,
        metavar="|".join(DEVICE_FORMS).replace("cuda|cuda:N", "cuda[:N]"),
        help=f"where the work runs (default {AUTO_DEVICE}: the first GPU when torch sees one, else the CPU); "
        "every device writes the same files (the influence maths is float64 on all)",
    )


def _add_run_options(parser: argparse.ArgumentParser, out_required: bool = True) -> None:
    from ecif.config import AUTO_LOSS, LOSSES, CurvatureConfig, CurvatureKind, FinetuneConfig, RunConfig
    from ecif.curvature.solvers import SOLVER_NAMES

    run, finetune, curvature = RunConfig(run_dir=Path(".")), FinetuneConfig(), CurvatureConfig()
    grid = ", ".join(f"{delta:g}" for delta in finetune.delta_grid)
    parser.add_argument("--manifest", help="CSV/TSV/JSONL/parquet manifest or image folder (default: built-in demo data)")
    _add_model_options(parser, "'demo' (trains the small ecif-demo model)")
    parser.add_argument("--out", required=out_required, help="run folder")
    parser.add_argument("--trusted-split", default=run.trusted_split, help=f"split used as the trusted set (default: {run.trusted_split})")
    parser.add_argument("--test-split", default=run.test_split, help=f"split scanned for mispredictions (default: {run.test_split})")
    parser.add_argument(
        "--delta",
        type=_delta_argument,
        default=finetune.delta,
        help=f"penalty δ towards the starting heads: 'auto' (default: chosen on held-out trusted pairs from {grid}) or a number",
    )
    parser.add_argument("--batch-size", type=int, default=finetune.batch_size, help=f"reference batch size (default {finetune.batch_size})")
    parser.add_argument("--learn-logit-scale", action="store_true", help="include the logit scale (and a SigLIP model's bias) in the influence scope")
    parser.add_argument(
        "--loss",
        default=finetune.loss,
        choices=[AUTO_LOSS, *LOSSES],
        help=f"contrastive loss of the objective (default {AUTO_LOSS}: the model's own, siglip for a model with a logit bias); "
        "with the demo model also the loss it is trained with",
    )
    parser.add_argument(
        "--blocks",
        type=int,
        default=finetune.blocks,
        help="widen the influence scope to the last N transformer blocks of each tower as well as the heads "
        f"(default {finetune.blocks}: heads only; slower, for up to a few thousand pairs)",
    )
    parser.add_argument("--solver", default=curvature.solver, choices=list(SOLVER_NAMES), help="curvature solver")
    parser.add_argument("--curvature", default=curvature.kind, choices=list(get_args(CurvatureKind)), help="Hessian or Gauss-Newton")
    parser.add_argument("--damping", type=float, default=curvature.damping, help=f"damping added to the curvature (default {curvature.damping:g})")
    _add_device_option(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _run_config(args: argparse.Namespace):
    """The ``RunConfig`` that the options of ``_add_run_options`` describe."""
    from ecif.config import CurvatureConfig, DemoDataConfig, FinetuneConfig, RunConfig

    return RunConfig(
        run_dir=Path(args.out),
        manifest=Path(args.manifest) if args.manifest else None,
        model=args.model,
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        pretrained=args.pretrained,
        tokenizer=Path(args.tokenizer) if args.tokenizer else None,
        trusted_split=args.trusted_split,
        test_split=args.test_split,
        demo=DemoDataConfig(),
        finetune=FinetuneConfig(
            delta=args.delta, batch_size=args.batch_size, learn_logit_scale=args.learn_logit_scale, blocks=args.blocks, loss=args.loss
        ),
        curvature=CurvatureConfig(solver=args.solver, kind=args.curvature, damping=args.damping),
        device=args.device,
    )


def _run_until(args: argparse.Namespace, stop_after: str | None):
    """The run the options describe, with its stages done up to ``stop_after`` (None: every stage)."""
    from ecif.tasks.pipeline import run_pipeline

    return run_pipeline(_run_config(args), reporter=_reporter(args), stop_after=stop_after)
