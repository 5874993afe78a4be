"""Many pairs in bounded memory, on one machine or many (``--ray``): ``extract-features``, ``score-features``."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from ecif.cli.options import _add_device_option, _add_model_options
from ecif.cli.output import _emit, _reporter, _table
from ecif.config import StreamingConfig
from ecif.data.manifest import STREAM_ROWS_PER_CHUNK


def add_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("extract-features", help="backbone features of a (large) manifest into a feature store, chunk by chunk (resumable; --ray for many machines)")
    p.add_argument("--manifest", required=True, help="manifest file, folder or glob of parquet/tar shards")
    _add_model_options(p, "'demo' (the ecif-demo model: its --checkpoint, else trained on the manifest)")
    p.add_argument("--out", required=True, help="feature store folder (resumable)")
    p.add_argument("--split", action="append", help="keep only this split (train / val / test); repeat for several (default: all)")
    p.add_argument("--rows-per-chunk", type=int, default=STREAM_ROWS_PER_CHUNK, help=f"manifest rows per chunk and store shard at most (default {STREAM_ROWS_PER_CHUNK})")
    p.add_argument("--batch-size", type=int, default=64, help="images encoded at a time (default 64)")
    _add_ray_option(p, "encode chunks as Ray tasks (images, tars and checkpoint must be at the same paths on every node)")
    _add_device_option(p)
    p.add_argument("--top", type=int, default=20, help="left-out rows shown (default 20)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_extract_features)

    streaming = StreamingConfig()
    p = commands.add_parser("score-features", help="score many pairs from feature shards on disk (bounded memory; --ray for many machines)")
    p.add_argument("features", help="feature store folder (ecif extract-features, or ecif.influence.streaming.write_feature_store)")
    p.add_argument("--trusted", required=True, help="feature store of the trusted set (held in memory)")
    p.add_argument("--heads", required=True, help="heads.safetensors with the fine-tuned θ̂ (e.g. from a run folder)")
    p.add_argument("--out", required=True, help="folder for scores-*.npz (resumable)")
    p.add_argument("--batch-size", type=int, default=streaming.batch_size,
                   help=f"reference batch size within each shard (default {streaming.batch_size})")
    p.add_argument("--delta", type=float, default=streaming.delta, help=f"the δ the heads were fine-tuned with (default {streaming.delta:g})")
    p.add_argument("--damping", type=float, default=streaming.damping)
    p.add_argument("--self-influence", action="store_true", help="also both self-influence columns, exact and first order (a [batch, parameters] Jacobian per batch and form: much slower)")
    p.add_argument("--gradient-tolerance", type=float, default=streaming.gradient_tolerance,
                   help="largest gradient norm of the scored objective at the heads accepted as a minimiser "
                   f"(default {streaming.gradient_tolerance:g})")
    p.add_argument("--allow-unconverged", action="store_true",
                   help="score heads that are not a minimiser of the scored objective anyway, with a warning "
                   "(by default they are refused: ECIF assumes a minimiser)")
    _add_ray_option(p, "score shards as Ray tasks")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_score_features)


def _add_ray_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help=f"{what}: a local Ray instance, or the cluster at ADDRESS (pip install 'ecif[ray]')")


def _executor(args: argparse.Namespace):
    from ecif.influence.streaming import LocalExecutor, RayExecutor

    return LocalExecutor() if args.ray is None else RayExecutor(None if args.ray == "local" else args.ray)


def cmd_extract_features(args: argparse.Namespace) -> int:
    from ecif.tasks.extract import LEFT_OUT_GLOB, extract_feature_store, read_left_out

    store = extract_feature_store(
        args.manifest, args.out, args.model, args.checkpoint, args.pretrained, splits=args.split,
        rows_per_chunk=args.rows_per_chunk, batch_size=args.batch_size, executor=_executor(args), reporter=_reporter(args),
        device=args.device, tokenizer=args.tokenizer,
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
    from ecif.influence.streaming import FeatureStore, read_scores, score_store
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
             (f"heads {'are' if check['passed'] else 'are NOT'} a minimiser of the scored objective: gradient norm "
              f"{gradient_norm:.2e} (tolerance {check['tolerance']:.0e}, relative {relative:.2e})"),
             f"most harmful {what}: " + ", ".join(f"{name} ({influence[row]:.3g})" for name, row in zip(names, harmful))]
    _emit(args, payload, "\n".join(lines))
    return 0
