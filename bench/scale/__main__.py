"""Pairs per second and peak memory of streamed ECIF scoring against N, one process vs Ray.

    python -m bench.scale            # N = 10k, 100k, 1M; one process and Ray with 2 workers
    python -m bench.scale --quick    # N = 2k, 10k, 20k (a minute or two)

Synthetic ViT-B/32-sized cached features (image 768-d, text 512-d, float32 ``.npy`` shards of
``--shard-rows`` pairs, written shard by shard under ``--work``; reused by later calls), heads to a
512-d embedding (655 360 parameters, given, not fine-tuned), EK-FAC curvature by streamed
statistics, φ = contrastive loss of 2 000 trusted pairs, then ``influence`` (+ ``_pos``/``_neg``)
per pair.  Every (N, mode) runs in a fresh process (bench/scale/measure.py) so that its peak
resident memory is its own.  Writes ``RESULTS/scale.json``, ``.md`` and ``scale.png`` (time and
memory against N).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.common import REPO, add_common_arguments, argument_parser, log, machine_info, machine_markdown, markdown_table, publish, results_folder, work_dir
from bench.scale.measure import IMAGE_DIM, TEXT_DIM


def parse_args(argv=None) -> argparse.Namespace:
    parser = argument_parser(__doc__, __spec__.name)
    parser.add_argument("--quick", action="store_true", help="N = 2k, 10k, 20k")
    parser.add_argument("--sizes", default=None, help="comma-separated N (multiples of --shard-rows)")
    parser.add_argument("--modes", default="local,ray", help="local, ray or both")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (CPUs of the local Ray instance)")
    parser.add_argument("--shard-rows", type=int, default=5000, help="pairs per shard = per chunk of work")
    add_common_arguments(parser, seed=False, threads=None, name="scale")
    return parser.parse_args(argv)


def synthetic_store(directory: Path, n_shards: int, shard_rows: int):
    """The feature store, written shard by shard (generation never holds more than one shard)."""
    import numpy as np

    from ecif.influence.streaming import FeatureStore, write_feature_store
    from ecif.influence.synthetic import toy_features

    try:
        store = FeatureStore.open(directory)
        if store.n_shards >= n_shards and set(store.shard_rows) == {shard_rows}:
            return store
    except FileNotFoundError:
        pass
    log(f"writing {n_shards} shards of {shard_rows} synthetic pairs to {directory}")

    def shards():
        for shard in range(n_shards):
            image, text, _ = toy_features(shard_rows, seed=shard, image_dim=IMAGE_DIM, text_dim=TEXT_DIM)
            yield image.numpy().astype(np.float32), text.numpy().astype(np.float32)

    return write_feature_store(directory, shards())


def measure(store_dir: Path, shards: int, mode: str, workers: int, out: Path) -> dict:
    command = [sys.executable, "-m", "bench.scale.measure", "--store", str(store_dir), "--shards", str(shards),
               "--mode", mode, "--workers", str(workers), "--out", str(out)]
    return in_fresh_process(command)


def in_fresh_process(command: list[str], **environment: str) -> dict:
    """Run one measurement (``python -m bench.scale...``) in a fresh process from the repository root, on one
    OpenMP thread (plus ``environment``), and return the JSON line it printed last."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **environment}
    done = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path, work: str = "scoring") -> None:
    """Time and peak memory against N, log-log, one line per mode (PIL: matplotlib is not a dependency)."""
    from bench.scale.plot import line_panels

    modes = sorted({row["mode"] for row in rows})
    time_lines, memory_lines = {}, {}
    for mode in modes:
        mine = [row for row in rows if row["mode"] == mode]
        time_lines[mode] = [(row["n_pairs"], row["seconds"]["total"]) for row in mine]
        memory_lines[mode] = [(row["n_pairs"], peak_mib(row)) for row in mine]
    line_panels(path, [(f"{work} time (s)", time_lines), ("peak memory per process (MiB)", memory_lines)], x_label="pairs N")


def peak_mib(row: dict) -> float:
    """Largest resident memory of any one process of the run (driver or worker)."""
    return max([row["driver_peak_mib"], *row["worker_peaks_mib"]])


def main(argv=None) -> None:
    args = parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([2000, 10000, 20000] if args.quick else [10_000, 100_000, 1_000_000])
    shard_rows = min(args.shard_rows, min(sizes)) if args.quick else args.shard_rows
    if any(n % shard_rows for n in sizes):
        raise SystemExit(f"every N must be a multiple of --shard-rows {shard_rows}")
    work = work_dir(args)
    store_dir = work / f"scale-vitb32-{shard_rows}"
    store = synthetic_store(store_dir, max(sizes) // shard_rows, shard_rows)
    info = machine_info()
    rows = []
    for n in sizes:
        for mode in args.modes.split(","):
            log(f"N = {n}, {mode}")
            row = measure(store.directory, n // shard_rows, mode, args.workers, work / f"scale-scores-{mode}")
            log(f"  {row['seconds']['total']:.1f} s, {row['pairs_per_second']:.0f} pairs/s, peak {peak_mib(row):.0f} MiB")
            rows.append(row)

    smallest = {row["mode"]: row for row in rows if row["n_pairs"] == min(sizes)}
    table_rows = []
    for row in rows:
        base = smallest[row["mode"]]
        linear = row["n_pairs"] / base["n_pairs"]
        table_rows.append([
            row["n_pairs"], row["mode"] if row["mode"] == "local" else f"ray ×{row['workers']}",
            row["seconds"]["curvature"], row["seconds"]["scores"], row["seconds"]["total"], row["pairs_per_second"],
            (row["seconds"]["total"] / base["seconds"]["total"]) / linear,
            row["driver_peak_mib"], max(row["worker_peaks_mib"], default=None), peak_mib(row) / peak_mib(base),
        ])
    headers = ["N", "mode", "EK-FAC s", "scores s", "total s", "pairs/s", "time ÷ linear",
               "driver peak MiB", "worker peak MiB", "peak ÷ smallest N"]
    png = results_folder(args.results) / f"{args.name}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, png)
    markdown = "\n\n".join([
        f"## Streamed scoring at ViT-B/32 head size ({rows[0]['parameters']} parameters, shards of {shard_rows} pairs)",
        machine_markdown(info),
        "Synthetic cached features (768-d image, 512-d text, float32 on disk), given heads (not a minimiser: "
        "cost only), reference batches of 64, EK-FAC (two streamed passes), φ = trusted loss of 2 000 pairs, "
        "then influence / _pos / _neg of every pair (no self-influence). One torch thread per process. "
        "'time ÷ linear' = (time / time at the smallest N) ÷ (N / smallest N): 1 is linear. "
        "Peak = resident memory (ru_maxrss of the driver; VmHWM of each Ray worker).",
        markdown_table(headers, table_rows),
        f"![time and memory against N]({png.name})",
    ])
    publish(args.name, {"machine": info, "shard_rows": shard_rows, "rows": rows}, markdown, args.results)


if __name__ == "__main__":
    main()
