"""Trace-back of wrong caption retrievals on data without classes, checked by actual re-fine-tuning.

Web data has captions and no classes, so there a test item is asked for its own caption among its
split's distinct captions (``ecif.tasks.trace.Items``).  This takes the app's demo (shapes, n=3000,
10% random captions), removes its ``label`` column and ``classes.json``, scores it with the demo CLIP
trained on it, and for the first ``--verify`` wrong retrievals of the test split re-fine-tunes the
heads without each of their top-k culprits (three rankings, as bench/trace.py), then without each
ranking's top-k at once.  Reported: predicted against actual change of the item's loss, and how many
culprits are planted random-caption pairs (base rate 0.10).

    .venv/bin/python -m bench.trace_retrieval
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from bench import trace as bench_trace
from bench.common import add_common_arguments, argument_parser, log, machine_markdown, markdown_table, publish, recorded_settings, scored_demo_run, start, work_dir


def parse_args(argv=None) -> argparse.Namespace:
    parser = argument_parser(__doc__, __spec__.name)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--verify", type=int, default=3, help="wrong retrievals whose culprits are checked by re-fine-tuning")
    parser.add_argument("--tolerance", type=float, default=1e-10, help="gradient-norm tolerance of every re-fine-tune")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def unlabelled_run(labelled, work: Path):
    """The labelled demo run's data without its classes, scored with the same trained demo CLIP."""
    from ecif.data.manifest import write_manifest_subset
    from ecif.config import RunConfig
    from ecif.tasks.pipeline import run_pipeline

    root = work / f"{labelled.directory.name}-unlabelled"
    manifest = root / "manifest.csv"
    if not manifest.exists():
        whole = {split: 10**9 for split in ("train", "val", "test")}
        written = write_manifest_subset(labelled.info["manifest_path"], root, whole)
        pd.read_csv(written).drop(columns=["label"]).to_csv(written, index=False)
        (root / "classes.json").unlink(missing_ok=True)
    config = RunConfig(run_dir=root / "run", manifest=manifest, model="ecif-demo", checkpoint=Path(labelled.info["demo_checkpoint"]))
    return run_pipeline(config)


def main(argv=None) -> dict:
    args = parse_args(argv)
    machine = start(args)
    import ecif

    started = time.perf_counter()
    work = work_dir(args)
    labelled = scored_demo_run(work, "shapes", args.n, round(args.noise, 4), "random-caption", args.seed)
    run = unlabelled_run(labelled, work)
    table = pd.read_parquet(run.path("mispredictions.parquet"))
    test = table[table["split"] == "test"]
    wrong = test[~test["correct"]].merge(run.manifest()[["uid", "corrupted"]], on="uid")
    log(f"{len(wrong)} of {len(test)} test items retrieve another caption; verifying {min(args.verify, len(wrong))}")
    mistakes = wrong.head(args.verify)
    verified = bench_trace.verify_culprits(run, mistakes, args)
    precision = []
    for item in wrong.itertuples():
        row = [item.uid]
        for _, relative, rank_by in (("relative", True, "total"), ("plain", False, "total"), ("positive", False, "positive")):
            traced = ecif.trace(run, item.uid, top_k=args.top_k, relative=relative, rank_by=rank_by)
            row.append(float(traced.loc[traced["role"] == "culprit", "corrupted"].astype(bool).mean()))
        precision.append(row)
    shares = pd.DataFrame(precision, columns=["uid", "relative", "plain", "positive"])
    train = run.manifest()[run.manifest()["split"] == "train"]
    base_rate = float(train["corrupted"].astype(bool).mean())
    markdown = "\n".join([
        "# Trace-back of wrong caption retrievals (data without classes)",
        "",
        machine_markdown(machine),
        "",
        f"shapes, n={args.n}, {args.noise:.0%} random captions (the app's demo), `label` column and classes.json removed: "
        f"each test item is asked for its own caption among the test split's {test['label'].nunique()} distinct captions. "
        f"{len(wrong)} of {len(test)} test items retrieve another caption.",
        "",
        f"Share of random-caption (planted) pairs among each wrong item's top-{args.top_k} culprits, mean over the "
        f"{len(wrong)} items (base rate {base_rate:.2f}):",
        "",
        markdown_table(["ranking", "planted share"], [["both roles, relative (default)", float(shares["relative"].mean())],
                                                      ["both roles, plain", float(shares["plain"].mean())],
                                                      ["positive role, plain", float(shares["positive"].mean())]]),
        "",
        *bench_trace.verification_markdown(verified, args, "wrong retrievals"),
        f"Run: {run.directory}; {time.perf_counter() - started:.0f} s.",
    ])
    payload = {"settings": recorded_settings(args, as_text=True), "machine": machine, "verified": verified,
               "precision": precision, "base_rate": base_rate, "markdown": markdown}
    publish("trace-retrieval", payload, markdown, args.results)
    return payload


if __name__ == "__main__":
    main()
