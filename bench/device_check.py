"""The demo path on the CPU and on the GPU, side by side: time per stage, and whether the scores agree.

A shapes demo of ``--n`` pairs (data generated once, not timed; the model is the demo CLIP shipped in
``assets/``, so nothing is trained) is taken through features → fine-tune → curvature → scores →
mispredictions by the ordinary pipeline, once per device in a fresh copy of the run folder, then one
trace-back (the first misprediction's culprits).  Devices: ``cpu``, and ``cuda:0`` when torch sees a
GPU; without one the table has the CPU column only and says so.  Agreement: the largest absolute
difference of every score column and of the features between the devices, and the Spearman
correlation of ``influence``.

    .venv/bin/python -m bench.device_check              # n=400
    .venv/bin/python -m bench.device_check --n 200      # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    StageLogger,
    add_common_arguments,
    argument_parser,
    log,
    machine_markdown,
    markdown_table,
    publish,
    start,
    work_dir,
)
from ecif.config import AUTO_DELTA, parse_delta

#: The pipeline stages timed (the device-free ones before them are prepared once), then the trace-back.
TIMED_STAGES = ("features", "fine-tune", "curvature", "scores", "mispredictions")
TRACE = "trace-back"
COMPARED_COLUMNS = ("influence", "influence_pos", "influence_neg", "self_influence", "self_influence_first_order", "clip_score", "loss")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argument_parser(__doc__, __spec__.name)
    parser.add_argument("--n", type=int, default=400, help="demo size over all splits (70%% train; default 400)")
    parser.add_argument("--delta", type=parse_delta, default=AUTO_DELTA,
                        help="the fine-tuning penalty δ: auto (default, as the demo: a sweep of six fine-tunes) or a number (one)")
    add_common_arguments(parser, name="device_check")
    return parser.parse_args(argv)


def devices_here() -> tuple[list[str], str | None]:
    """The devices to compare (``cpu``, then the first GPU if any), and why there is no GPU column (None if there is one)."""
    import torch

    if torch.cuda.is_available():
        return ["cpu", "cuda:0"], None
    return ["cpu"], f"no GPU here: torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}) sees no CUDA device"


def _warm_up(device: str) -> None:
    """Start CUDA before the clock does (its context takes seconds to create, once per process)."""
    import torch

    if device.startswith("cuda"):
        torch.zeros(1, device=device)
        torch.cuda.synchronize(device)


def timed_run(config, device: str) -> dict[str, Any]:
    """``config``'s run (a fresh copy of the prepared folder) on ``device``: seconds per stage and of a trace-back."""
    from ecif.run import Run
    from ecif.tasks.pipeline import run_pipeline
    from ecif.tasks.trace import mispredictions, trace

    _warm_up(device)
    run = run_pipeline(dataclasses.replace(config, device=device), StageLogger(prefix=f"{device}: ").reporter(), "mispredictions")
    stages = Run(run.directory).info["stages"]
    seconds = {stage: float(stages[stage]["seconds"]) for stage in TIMED_STAGES}
    wrong = mispredictions(run)
    uid = str(wrong["uid"].iloc[0]) if len(wrong) else str(run.manifest()["uid"].iloc[0])
    started = time.perf_counter()
    trace(run, uid, top_k=5)  # the engine the scores stage built, on this device
    seconds[TRACE] = time.perf_counter() - started
    return {"device": device, "run": str(run.directory), "seconds": seconds, "traced": uid,
            "delta": stages["fine-tune"]["delta"], "used": run.info["device"]}


def agreement(first: Path, second: Path) -> dict[str, float]:
    """Largest absolute differences of the score columns and the features of two runs, and the Spearman of ``influence``."""
    from scipy.stats import spearmanr

    from ecif.run import FEATURES_FILE, Run

    scores = [Run(path).scores().set_index("row").sort_index() for path in (first, second)]
    result = {f"max_abs_{column}": float(np.max(np.abs(scores[0][column].to_numpy() - scores[1][column].to_numpy())))
              for column in COMPARED_COLUMNS}
    result["spearman_influence"] = float(spearmanr(scores[0]["influence"], scores[1]["influence"])[0])
    features = [np.load(Path(path) / FEATURES_FILE) for path in (first, second)]
    result["max_abs_features"] = max(float(np.max(np.abs(features[0][key] - features[1][key]))) for key in ("image", "text"))
    return result


def report(machine: dict, args: argparse.Namespace, runs: list[dict], missing_gpu: str | None, agreed: dict | None) -> str:
    """The markdown: machine, one column of seconds per device (and their ratio), the agreement."""
    devices = [run["device"] for run in runs]
    headers = ["stage", *(f"{device} s" for device in devices)]
    if len(runs) == 2:
        headers.append(f"{devices[0]} / {devices[1]}")
    rows = []
    for stage in (*TIMED_STAGES, TRACE, "total"):
        values = [sum(run["seconds"].values()) if stage == "total" else run["seconds"][stage] for run in runs]
        rows.append([stage, *values, *([values[0] / max(values[1], 1e-9)] if len(values) == 2 else [])])
    lines = [
        "# The demo path per device",
        "",
        machine_markdown(machine),
        "",
        f"shapes demo, n={args.n}, the shipped demo CLIP; δ ({args.delta}): "
        + ", ".join(f"{run['device']} {run['delta']:g}" for run in runs)
        + ".  Devices used: " + ", ".join(f"{run['used']['used']} ({run['used']['name']})" for run in runs) + ".",
        "",
        markdown_table(headers, rows, digits=2),
    ]
    if missing_gpu:
        lines += ["", f"**{missing_gpu}**: the CPU column only."]
    if agreed:
        lines += ["", "Agreement of the two runs (scores aligned by manifest row):", "",
                  markdown_table(["measure", "value"], [[key, value] for key, value in agreed.items()], digits=6)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    machine = start(args)
    import ecif
    from ecif.models.demo import SHIPPED_MODEL
    from ecif.paths import asset_path
    from ecif.tasks.pipeline import run_pipeline

    devices, missing_gpu = devices_here()
    if missing_gpu:
        log(missing_gpu + "; timing the CPU only")
    work = work_dir(args)
    base = work / f"device-check-shapes-n{args.n}-seed{args.seed}-d{args.delta}"
    config = ecif.RunConfig(run_dir=base, model="ecif-demo", checkpoint=asset_path(SHIPPED_MODEL),
                            demo=ecif.DemoDataConfig(name="shapes", n=args.n, seed=args.seed),
                            finetune=ecif.FinetuneConfig(delta=args.delta), device="cpu")
    log(f"preparing {base.name}: demo data (not timed)")
    run_pipeline(config, StageLogger(prefix="prepare: ").reporter(), "demo model")
    runs = []
    for position, device in enumerate(devices):
        copy = work / f"{base.name}-{position}-{device.replace(':', '')}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(base, copy)
        runs.append(timed_run(dataclasses.replace(config, run_dir=copy), device))
        log(f"{device}: {sum(runs[-1]['seconds'].values()):.1f} s")
    agreed = agreement(Path(runs[0]["run"]), Path(runs[1]["run"])) if len(runs) == 2 else None
    payload = {"machine": machine, "settings": {"n": args.n, "seed": args.seed, "delta": args.delta}, "devices": devices,
               "no_gpu": missing_gpu, "runs": runs, "agreement": agreed}
    publish(args.name, payload, report(machine, args, runs, missing_gpu, agreed), args.results)
    return payload


if __name__ == "__main__":
    main()
