"""Time to score every pair once features are cached: fine-tune, curvature and scores, per stage.

A demo run of ``--n`` pairs is prepared up to its cached features (not timed: demo data, the model,
backbone features).  The run folder is then copied ``--repeats`` times and each copy is taken from
features to scores by the ordinary pipeline (``ecif score`` does the same), so every repeat starts
from cached features and nothing else.  The model is the demo CLIP trained on a separate clean demo
set (``bench/common.pretraining_pool_checkpoint``; the weights do not change the cost), unless
``--checkpoint`` names another ecif-demo checkpoint.

    .venv/bin/python -m bench.scoring_time                  # n=5000 (3,500 training pairs), dense and EK-FAC
    .venv/bin/python -m bench.scoring_time --n 3000 --solvers dense
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

from bench.common import (
    StageLogger,
    add_common_arguments,
    argument_parser,
    log,
    machine_markdown,
    markdown_table,
    pretraining_pool_checkpoint,
    publish,
    start,
    work_dir,
)

TIMED_STAGES = ("fine-tune", "curvature", "scores")
TARGET_SECONDS = 60.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argument_parser(__doc__, __spec__.name)
    parser.add_argument("--n", type=int, default=5000, help="demo size over all splits (70%% train)")
    parser.add_argument("--solvers", default="dense,ekfac", help="comma-separated curvature solvers to time")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--checkpoint", type=Path, default=None)
    add_common_arguments(parser, name="scoring_time")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    machine = start(args)
    import ecif
    from ecif.run import Run
    from ecif.tasks.pipeline import run_pipeline

    work = work_dir(args)
    checkpoint = Path(args.checkpoint or pretraining_pool_checkpoint(work, "shapes", 3000, args.seed)).resolve()
    base = work / f"scoring-time-shapes-n{args.n}-seed{args.seed}"
    config = ecif.RunConfig(
        run_dir=base, model="ecif-demo", checkpoint=checkpoint, demo=ecif.DemoDataConfig(name="shapes", n=args.n, seed=args.seed)
    )
    log(f"preparing {base.name} up to cached features (not timed)")
    run_pipeline(config, reporter=StageLogger(prefix="prepare: ").reporter(), stop_after="features")

    rows, measurements = [], []
    for solver in args.solvers.split(","):
        for repeat in range(args.repeats):
            copy = work / f"{base.name}-timing"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(base, copy)
            timed = dataclasses.replace(config, run_dir=copy, curvature=dataclasses.replace(config.curvature, solver=solver))
            info = json.loads((copy / "run.json").read_text())
            info["settings"] = timed.settings()
            (copy / "run.json").write_text(json.dumps(info))
            started = time.perf_counter()
            run_pipeline(timed, reporter=StageLogger(prefix=f"{solver}: ").reporter(), stop_after="scores")
            wall = time.perf_counter() - started
            stages = Run(copy).info["stages"]
            seconds = {stage: stages[stage]["seconds"] for stage in TIMED_STAGES}
            pairs = int((Run(copy).manifest()["split"] == "train").sum())
            measurements.append({"solver": solver, "repeat": repeat, "wall_seconds": wall, "stage_seconds": seconds, "pairs": pairs})
            rows.append([solver, repeat + 1, pairs, *[seconds[s] for s in TIMED_STAGES], wall, pairs / wall])
            log(f"{solver} repeat {repeat + 1}: {wall:.1f} s")
            shutil.rmtree(copy, ignore_errors=True)

    slowest_by_solver = {}
    for measurement in measurements:
        solver = measurement["solver"]
        slowest_by_solver[solver] = max(slowest_by_solver.get(solver, 0.0), measurement["wall_seconds"])
    verdicts = "; ".join(
        f"{solver} {seconds:.1f} s → {'met' if seconds < TARGET_SECONDS else 'MISSED'}" for solver, seconds in slowest_by_solver.items()
    )
    markdown = "\n".join(
        [
            "# Time to score every pair once features are cached",
            "",
            machine_markdown(machine),
            "",
            f"shapes demo, n={args.n} (train split scored; trusted split = val), model {checkpoint.name}.  Each row: a copy of "
            "the run with cached features taken through fine-tune → curvature → scores by the pipeline "
            "(scores = every pair's influence, its parts, first-order, positive-only, self-influence, CLIP-score and loss).",
            "",
            markdown_table(
                ["solver", "repeat", "training pairs", "fine-tune s", "curvature s", "scores s", "total s", "pairs / s"], rows, digits=1
            ),
            "",
            f"**Target** (every pair scored in under {TARGET_SECONDS:.0f} s once features are cached; slowest repeat per "
            f"solver): {verdicts}.",
        ]
    )
    payload = {"machine": machine, "n": args.n, "checkpoint": str(checkpoint), "measurements": measurements}
    publish(args.name, payload, markdown, args.results)
    return payload


if __name__ == "__main__":
    main()
