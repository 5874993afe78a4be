"""One measurement in a fresh process (so its peak memory is its own):

    python -m bench.scale.measure --store DIR --shards K --mode local|ray --out DIR [--workers 2]

Prints one JSON line: seconds per stage, pairs per second, and peak resident memory (MiB) of this
process and, under Ray, of each Ray worker process (``VmHWM`` of every ``ray::`` descendant).
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import time
from pathlib import Path

import torch

from bench.common import argument_parser
from ecif.config import StreamingConfig
from ecif.influence.streaming import FeatureStore, LocalExecutor, RayExecutor, score_store
from ecif.influence.synthetic import toy_features
from ecif.objective.contrastive import ContrastiveData, HeadsScope, reference_batches

IMAGE_DIM, TEXT_DIM, EMBED_DIM = 768, 512, 512  # ViT-B/32: visual width, text width, embedding
TRUSTED_PAIRS = 2000


def vit_b32_heads() -> tuple[HeadsScope, torch.Tensor]:
    """Heads at open_clip's initial scale (``width^-1/2 · randn``), logit scale 100.

    Not a minimiser: the benchmark measures cost; scoring takes ``θ̂`` as given.
    """
    scope = HeadsScope(IMAGE_DIM, TEXT_DIM, EMBED_DIM, math.log(100.0))
    generator = torch.Generator().manual_seed(0)
    w_image = torch.randn(IMAGE_DIM, EMBED_DIM, dtype=torch.float64, generator=generator) / math.sqrt(IMAGE_DIM)
    w_text = torch.randn(TEXT_DIM, EMBED_DIM, dtype=torch.float64, generator=generator) / math.sqrt(TEXT_DIM)
    return scope, scope.join(w_image, w_text)


def trusted_set() -> ContrastiveData:
    image, text, _ = toy_features(TRUSTED_PAIRS, seed=10**6, image_dim=IMAGE_DIM, text_dim=TEXT_DIM, flip=0.0)
    return ContrastiveData(image, text, reference_batches(TRUSTED_PAIRS, 64))


def worker_peaks_mib() -> list[float]:
    """Peak RSS of every Ray worker started under this process (read before Ray shuts down)."""
    import psutil

    peaks = []
    for child in psutil.Process().children(recursive=True):
        try:
            if not " ".join(child.cmdline()).startswith("ray::"):
                continue
            for line in Path(f"/proc/{child.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]) / 1024)
        except (psutil.Error, OSError):
            continue
    return peaks


def main(argv=None) -> None:
    parser = argument_parser(__doc__, __spec__.name)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--shards", type=int, required=True, help="score the first K shards")
    parser.add_argument("--mode", choices=["local", "ray"], required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # one thread per worker, and the single process gets the same one core
    store = FeatureStore.open(args.store).head(args.shards)
    scope, theta = vit_b32_heads()
    trusted = trusted_set()
    shutil.rmtree(args.out, ignore_errors=True)
    started = time.perf_counter()
    executor = LocalExecutor() if args.mode == "local" else RayExecutor(num_cpus=args.workers)
    startup = time.perf_counter() - started
    started = time.perf_counter()
    # Random ViT-B-32 heads: this measures time and memory, so the minimiser check is waived.
    config = StreamingConfig(batch_size=args.batch_size, allow_unconverged=True)
    result = score_store(store, trusted, scope, theta, args.out, config, executor)
    total = time.perf_counter() - started
    workers = []
    if args.mode == "ray":
        import ray

        workers = worker_peaks_mib()
        ray.shutdown()
    shutil.rmtree(args.out, ignore_errors=True)
    print(json.dumps({
        "n_pairs": store.n_pairs,
        "shards": store.n_shards,
        "mode": args.mode,
        "workers": args.workers if args.mode == "ray" else 1,
        "seconds": {**result.seconds, "total": total, "ray_start": startup},
        "pairs_per_second": store.n_pairs / total,
        "driver_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peaks_mib": workers,
        "parameters": scope.size,
        "solver": result.solver,
    }))


if __name__ == "__main__":
    main()
