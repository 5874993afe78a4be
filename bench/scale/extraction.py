"""Pairs per second and peak memory of streamed feature extraction against N, one process vs Ray.

    python -m bench.scale.extraction                       # N = 10k, 100k; one process and Ray with 2 workers
    python -m bench.scale.extraction --sizes 2000,10000    # a couple of minutes

Shapes demo images (64 px PNG files, written once under ``--work``: about 12 KB and 2 ms each), the
manifest as parquet shards of ``--chunk-rows`` rows (so it is read shard by shard, as a large
manifest is), encoded by :func:`ecif.extract_feature_store` with the ``ecif-demo`` architecture
(seed-0 random weights saved as a checkpoint: the cost does not depend on the weights).  Every
(N, mode) runs in a fresh process with an empty feature cache, so that its time is a cold
extraction and its peak resident memory its own.  Writes ``RESULTS/scale-extraction.json`` and
``.md``.  The scoring side of the same pipeline is ``python -m bench.scale``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

from bench.common import add_common_arguments, argument_parser, log, machine_info, machine_markdown, markdown_table, publish, results_folder, work_dir
from bench.scale.__main__ import in_fresh_process, peak_mib, plot
from bench.scale.measure import worker_peaks_mib


def parse_args(argv=None) -> argparse.Namespace:
    parser = argument_parser(__doc__, __spec__.name)
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated N (multiples of --chunk-rows)")
    parser.add_argument("--modes", default="local,ray", help="local, ray or both")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (CPUs of the local Ray instance)")
    parser.add_argument("--chunk-rows", type=int, default=5000, help="manifest rows per parquet shard = per chunk of work")
    add_common_arguments(parser, seed=False, threads=None, name="scale-extraction")
    parser.add_argument("--measure", nargs=3, metavar=("MANIFEST", "CHECKPOINT", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def sharded_manifest(work: Path, n: int, chunk_rows: int) -> Path:
    """``n`` demo pairs as parquet shards of ``chunk_rows`` rows (made once, reused)."""
    import pandas as pd

    from ecif.data import make_demo_data

    folder = work / f"extraction-shapes-n{n}"
    shards = folder / "shards"
    if not (shards / "done").exists():
        log(f"writing {n} demo images to {folder}")
        manifest = make_demo_data("shapes", folder, n=n, noise=0.1)
        frame = pd.read_csv(manifest)
        frame["filepath"] = [str((manifest.parent / path).resolve()) for path in frame["filepath"]]
        shards.mkdir(exist_ok=True)
        for index, start in enumerate(range(0, n, chunk_rows)):
            frame.iloc[start : start + chunk_rows].to_parquet(shards / f"part-{index:05d}.parquet", index=False)
        (shards / "done").write_text("")
    return shards


def demo_checkpoint(work: Path) -> Path:
    from ecif.models import load_model, save_checkpoint

    path = work / "extraction-ecif-demo-seed0.safetensors"
    if not path.exists():
        save_checkpoint(load_model("ecif-demo").model, path)
    return path


def measure_here(manifest: Path, checkpoint: Path, mode: str, workers: int, out: Path) -> None:
    """One cold extraction in this process; prints one JSON line."""
    import torch

    import ecif
    from ecif.influence.streaming import LocalExecutor, RayExecutor

    torch.set_num_threads(1)  # one thread per worker, and the single process gets the same one core
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    executor = LocalExecutor() if mode == "local" else RayExecutor(num_cpus=workers)
    startup = time.perf_counter() - started
    started = time.perf_counter()
    store = ecif.extract_feature_store(manifest, out, "ecif-demo", checkpoint, rows_per_chunk=10**9, executor=executor)
    total = time.perf_counter() - started
    workers_peaks = []
    if mode == "ray":
        import ray

        workers_peaks = worker_peaks_mib()
        ray.shutdown()
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({
        "n_pairs": store.n_pairs,
        "shards": store.n_shards,
        "mode": mode,
        "workers": workers if mode == "ray" else 1,
        "seconds": {"total": total, "ray_start": startup},
        "pairs_per_second": store.n_pairs / total,
        "driver_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peaks_mib": workers_peaks,
    }))


def measure(manifest: Path, checkpoint: Path, mode: str, workers: int, work: Path) -> dict:
    cache = work / f"extraction-cache-{mode}"  # empty per run: a cold extraction, not a cache read
    shutil.rmtree(cache, ignore_errors=True)
    command = [sys.executable, "-m", "bench.scale.extraction", "--measure", str(manifest), str(checkpoint), mode,
               "--workers", str(workers), "--out", str(work / f"extraction-store-{mode}")]
    try:
        return in_fresh_process(command, ECIF_CACHE=str(cache))
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.measure:
        manifest, checkpoint, mode = args.measure
        measure_here(Path(manifest), Path(checkpoint), mode, args.workers, args.out)
        return
    sizes = [int(size) for size in args.sizes.split(",")]
    if any(n % args.chunk_rows for n in sizes):
        raise SystemExit(f"every N must be a multiple of --chunk-rows {args.chunk_rows}")
    work = work_dir(args)
    checkpoint = demo_checkpoint(work)
    info = machine_info()
    rows = []
    for n in sizes:
        manifest = sharded_manifest(work, n, args.chunk_rows)
        for mode in args.modes.split(","):
            log(f"N = {n}, {mode}")
            row = measure(manifest, checkpoint, mode, args.workers, work)
            log(f"  {row['seconds']['total']:.1f} s, {row['pairs_per_second']:.0f} pairs/s, peak {peak_mib(row):.0f} MiB")
            rows.append(row)

    smallest = {row["mode"]: row for row in rows if row["n_pairs"] == min(r["n_pairs"] for r in rows)}
    local = {row["n_pairs"]: row for row in rows if row["mode"] == "local"}
    table_rows = []
    for row in rows:
        base = smallest[row["mode"]]
        linear = row["n_pairs"] / base["n_pairs"]
        same_n_local = local.get(row["n_pairs"])
        table_rows.append([
            row["n_pairs"], row["mode"] if row["mode"] == "local" else f"ray ×{row['workers']}",
            row["seconds"]["total"], row["pairs_per_second"],
            (row["seconds"]["total"] / base["seconds"]["total"]) / linear,
            same_n_local["seconds"]["total"] / row["seconds"]["total"] if same_n_local else None,
            row["driver_peak_mib"], max(row["worker_peaks_mib"], default=None), peak_mib(row) / peak_mib(base),
        ])
    headers = ["N", "mode", "total s", "pairs/s", "time ÷ linear", "speed-up vs local", "driver peak MiB",
               "worker peak MiB", "peak ÷ smallest N"]
    png = results_folder(args.results) / f"{args.name}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, png, "extraction")
    markdown = "\n\n".join([
        f"## Streamed feature extraction (ecif-demo backbone, parquet shards of {args.chunk_rows} rows)",
        machine_markdown(info),
        "Shapes demo images (64 px PNG files on local disk), read and decoded on the process that encodes them "
        "(the Ray workers under Ray), pre-projection image and caption features written as a feature store with its "
        "row map. Cold: an empty feature cache per run. One torch thread per process. 'time ÷ linear' = (time / time "
        "at the smallest N) ÷ (N / smallest N): 1 is linear. Peak = resident memory (ru_maxrss of the driver; VmHWM "
        "of each Ray worker); Ray's start-up is not in 'total s'.",
        markdown_table(headers, table_rows),
        f"![time and memory against N]({png.name})",
    ])
    publish(args.name, {"machine": info, "chunk_rows": args.chunk_rows, "rows": rows}, markdown, args.results)


if __name__ == "__main__":
    main()
