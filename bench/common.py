"""The set-up shared by the benchmarks (``python -m bench.NAME``): their common arguments, torch's
threads, the work and results folders, machine description, scored demo runs, progress,
correlations, the on-disk cache of retrains, markdown tables and result files.

Every benchmark writes ``bench/results/NAME.json`` (machine, settings, raw numbers, tables) and
``bench/results/NAME.md`` (the same tables as markdown), and prints the markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO = BENCH_DIR.parent


def argument_parser(doc: str, module: str) -> argparse.ArgumentParser:
    """A benchmark's command line: ``python -m MODULE`` in its usage (``module``: the ``__spec__.name`` of its
    module), the first paragraph of its docstring ``doc`` as its description."""
    return argparse.ArgumentParser(prog=f"python -m {module.removesuffix('.__main__')}", description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common_arguments(parser, seed: bool = True, threads: int | None = 2, name: str | None = None) -> None:
    """``--seed``, ``--threads`` (default ``threads``; None: no such argument), ``--work``, ``--results``
    and, given its default, ``--name`` (the result file stem), the same in every benchmark."""
    if seed:
        parser.add_argument("--seed", type=int, default=0)
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads, help=f"torch intra-op threads (default {threads})")
    parser.add_argument("--work", type=Path, default=None, help="folder of the (resumable) runs; default $ECIF_CACHE/bench")
    parser.add_argument("--results", type=Path, default=None, help="where NAME.json/.md go; default bench/results")
    if name is not None:
        parser.add_argument("--name", default=name, help="result file stem")


def add_batch_size_argument(parser) -> None:
    """``--batch-size``: the fine-tuning's reference batch size, for the scripts that build demo runs with it."""
    parser.add_argument(
        "--batch-size", type=int, default=None,
        help="reference batch size of the fine-tuning (own run folder, suffix -bN); default: the library default, "
        "or whatever an existing run folder was made with",
    )


def demo_settings(text: str) -> list[tuple[str, float, str]]:
    """``DATA:NOISE:CORRUPTION,...`` (e.g. ``shapes:0.1:random-caption``) as ``(data, noise, corruption)`` triples."""
    out = []
    for item in text.split(","):
        name, noise, corruption = item.strip().split(":")
        out.append((name, float(noise), corruption))
    return out


def set_threads(threads: int) -> None:
    """Fix torch's intra-op threads (the benchmarks are meant to be comparable across runs)."""
    import torch

    torch.set_num_threads(max(1, int(threads)))


def start(args) -> dict[str, Any]:
    """What a benchmark's ``main`` does first: torch's threads set to ``--threads``, then this machine
    described (:func:`machine_info`, which records that thread count)."""
    set_threads(args.threads)
    return machine_info()


def default_work_dir() -> Path:
    """Where benchmark runs live (resumable): ``$ECIF_CACHE/bench`` or ``~/.cache/ecif/bench``."""
    from ecif.paths import cache_dir

    return cache_dir() / "bench"


def work_dir(args) -> Path:
    """The folder of a benchmark's runs: ``--work``, else :func:`default_work_dir`."""
    return Path(args.work or default_work_dir())


def results_folder(results: Path | None = None) -> Path:
    """Where result files go: ``--results``, else bench/results."""
    return Path(results or RESULTS_DIR)


def recorded_settings(args, as_text: bool = False) -> dict[str, Any]:
    """The command line as NAME.json records it: paths as text (with ``as_text``, every value)."""
    return {key: str(value) if as_text or isinstance(value, Path) else value for key, value in vars(args).items()}


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, python / torch versions and torch threads of this machine."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = float("nan")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = int(line.split()[1]) / 1024**2
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram_gib, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in load],
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def machine_markdown(info: dict[str, Any]) -> str:
    return (
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, "
        f"python {info['python']}, torch {info['torch']} ({info['torch_threads']} threads); "
        f"load average at start {info['load_average_at_start']}; {info['date_utc']}."
    )


class StageLogger:
    """A progress callback that prints each new stage (and coarse progress) with elapsed time."""

    def __init__(self, prefix: str = "", every_seconds: float = 30.0):
        self.prefix = prefix
        self.every = every_seconds
        self.started = time.perf_counter()
        self.stage = None
        self.last_print = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if stage != self.stage or now - self.last_print >= self.every:
            amount = f" {done}/{total}" if total else ""
            log(f"{self.prefix}{stage}{amount}", elapsed=now - self.started)
            self.stage = stage
            self.last_print = now

    def reporter(self):
        from ecif.progress import Reporter

        return Reporter(callback=self)


def log(message: str, elapsed: float | None = None) -> None:
    stamp = time.strftime("%H:%M:%S")
    extra = f" (+{elapsed:.0f}s)" if elapsed is not None else ""
    print(f"[{stamp}]{extra} {message}", flush=True)


def demo_run_dir(
    work: Path, name: str, n: int, noise: float, corruption: str, seed: int = 0, batch_size: int | None = None
) -> Path:
    """One folder per demo setting, shared by the scripts (fidelity and detect reuse each other's runs).

    ``batch_size`` (the reference batch size of the fine-tuning, when asked for explicitly) adds a
    ``-bN`` suffix; without it the folder keeps whatever settings it was first made with.
    """
    suffix = f"-b{batch_size}" if batch_size else ""
    return Path(work) / f"{name}-n{n}-noise{noise:g}-{corruption}-seed{seed}{suffix}"


def scored_demo_run(
    work: Path,
    name: str = "shapes",
    n: int = 3000,
    noise: float = 0.1,
    corruption: str = "random-caption",
    seed: int = 0,
    batch_size: int | None = None,
    checkpoint: Path | None = None,
    delta: float | None = None,
    solver: str = "dense",
    loss: str | None = None,
):
    """A demo run scored up to the ``scores`` stage (resumes whatever already finished).

    ``checkpoint``: score with this already-trained ``ecif-demo`` checkpoint instead of training the
    demo CLIP on the manifest (e.g. to compare fine-tuning settings on the very same backbone).
    ``delta``: the fine-tuning penalty towards the starting heads, when asked for explicitly (adds a
    ``-dX`` suffix to the folder). ``solver``: the curvature solver; anything but the dense reference
    adds a ``-sNAME`` suffix. ``loss``: the contrastive loss (``ecif.config.LOSSES``) the demo CLIP is
    trained with and the run scores with, when asked for explicitly (adds a ``-LOSS`` suffix).

    A folder that already holds a run keeps the settings it was made with (recorded in run.json),
    even if the library's defaults changed since; the scripts print and record those settings.
    """
    import ecif
    from ecif.config import RunConfig
    from ecif.run import Run
    from ecif.tasks.pipeline import run_pipeline

    run_dir = demo_run_dir(work, name, n, noise, corruption, seed, batch_size)
    if checkpoint is not None:
        from ecif.paths import file_sha256

        run_dir = run_dir.with_name(f"{run_dir.name}-ckpt{file_sha256(checkpoint)[:8]}")
    if delta is not None:
        run_dir = run_dir.with_name(f"{run_dir.name}-d{delta:g}")
    if solver != "dense":
        run_dir = run_dir.with_name(f"{run_dir.name}-s{solver}")
    if loss is not None:
        run_dir = run_dir.with_name(f"{run_dir.name}-{loss}")
    stored = Run(run_dir).info.get("settings") if (run_dir / "run.json").exists() else None
    if stored:
        config = RunConfig.from_settings(run_dir, stored)
    else:
        # The benchmarks measure against the dense reference (fidelity_selected's damping sweep rebuilds
        # it, the peers reuse its stored factor); the library's `auto` takes EK-FAC-preconditioned CG.
        config = ecif.RunConfig(
            run_dir=run_dir, demo=ecif.DemoDataConfig(name=name, n=n, noise=noise, corruption=corruption, seed=seed),
            curvature=ecif.CurvatureConfig(solver=solver),
        )
        if batch_size:
            config.finetune = dataclasses.replace(config.finetune, batch_size=batch_size)
        if delta is not None:
            config.finetune = dataclasses.replace(config.finetune, delta=delta)
        if loss is not None:
            config.finetune = dataclasses.replace(config.finetune, loss=loss)
        if checkpoint is not None:
            from ecif.models.demo import demo_architecture

            config.model, config.checkpoint = demo_architecture(checkpoint), Path(checkpoint).resolve()
    logger = StageLogger(prefix=f"{run_dir.name}: ")
    return run_pipeline(config, reporter=logger.reporter(), stop_after="scores")


def pretraining_pool_checkpoint(work: Path, name: str = "shapes", n: int = 3000, seed: int = 0) -> Path:
    """The demo CLIP trained on a separate, clean demo set (seed ``seed + 1000``), cached.

    A stand-in for a pretrained model that never saw the data being curated: the paper's protocol
    (a pretrained CLIP, then a noisy fine-tuning set), as opposed to the default demo model, which is
    trained on the noisy manifest itself and so has partly absorbed its corruptions.
    """
    from ecif.data import load_manifest, make_demo_data
    from ecif.models import train_demo_model

    folder = Path(work) / f"pool-{name}-n{n}-seed{seed + 1000}"
    if not (folder / "manifest.csv").exists():
        make_demo_data(name, folder, n=n, noise=0.0, seed=seed + 1000)
    logger = StageLogger(prefix="pretraining pool: ")
    return train_demo_model(load_manifest(folder / "manifest.csv"), reporter=logger.reporter())


def correlations(predicted, actual) -> tuple[float, float]:
    """``(Pearson, Spearman)`` of predicted against actual changes (NaN with fewer than 3 points or no spread)."""
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    predicted, actual = np.asarray(predicted, float), np.asarray(actual, float)
    if len(actual) < 3 or np.ptp(predicted) == 0 or np.ptp(actual) == 0:
        return float("nan"), float("nan")
    return float(pearsonr(predicted, actual)[0]), float(spearmanr(predicted, actual)[0])


def slope_through(predicted, actual) -> float:
    """Least-squares slope of actual on predicted (1 = right scale)."""
    import numpy as np

    predicted, actual = np.asarray(predicted, float), np.asarray(actual, float)
    centred = predicted - predicted.mean()
    return float((centred * (actual - actual.mean())).sum() / max((centred**2).sum(), 1e-300))


class RetrainCache:
    """Retrained ``θ`` summaries on disk, keyed by the removed rows and the tolerance (resumable)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self.path(key)
        return json.loads(path.read_text()) if path.exists() else None

    def put(self, key: str, value: dict) -> None:
        path = self.path(key)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(value))
        temporary.replace(path)


def fmt(value: Any, digits: int = 3) -> str:
    """Compact number formatting for tables (scientific for very small / large magnitudes)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value == 0:
            return "0"
        if abs(value) < 1e-3 or abs(value) >= 1e5:
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(cell, digits) for cell in row) + " |")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def load_result_files(paths: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """``(results, machine)`` of earlier JSON outputs (comma-separated ``paths``): their ``results``
    lists concatenated, the first file's machine (for the scripts' ``--from-json``)."""
    results, machine = [], None
    for path in paths.split(","):
        payload = json.loads(Path(path).read_text())
        results += payload["results"]
        machine = machine or payload["machine"]
    return results, machine


def write_results(name: str, payload: dict[str, Any], markdown: str, results_dir: Path | None = None) -> tuple[Path, Path]:
    """Write ``NAME.json`` and ``NAME.md`` atomically into ``results_dir`` (default bench/results)."""
    directory = results_folder(results_dir)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / f"{name}.json", directory / f"{name}.md"
    for path, text in ((json_path, json.dumps(_jsonable(payload), indent=2)), (md_path, markdown.rstrip() + "\n")):
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(text)
        temporary.replace(path)
    return json_path, md_path


def publish(name: str, payload: dict[str, Any], markdown: str, results_dir: Path | None = None) -> None:
    """Write the results (:func:`write_results`) and print the tables with where they went."""
    write_results(name, payload, markdown, results_dir)
    announce(name, markdown, results_dir)


def announce(name: str, markdown: str, results_dir: Path | None = None) -> None:
    """Print the tables and where :func:`write_results` wrote them."""
    print()
    print(markdown)
    print(f"\nwrote {results_dir or 'bench/results'}/{name}.json and .md")
