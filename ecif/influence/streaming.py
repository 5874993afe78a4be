"""ECIF scores of very many pairs from features on disk, in bounded memory, locally or with Ray.

The heads ``θ̂`` are **given**: this module scores, it does not fine-tune.  ECIF's scores mean
something only at a minimiser of ``R`` (ECIF_METHOD §1), so ``θ̂`` should come from
:func:`ecif.models.heads.finetune_heads` (or a run's ``heads.safetensors``); benchmarks that pass
other heads measure cost, not fidelity.

Layout and maths:

- A :class:`FeatureStore` is a folder of float32 ``.npy`` shards (``image-00000.npy [n_k, d]``,
  ``text-00000.npy [n_k, d']``) plus ``store.json``; each shard is opened with
  ``np.load(mmap_mode="r")``, copied and unmapped, so a process holds one shard at a time.
- The fixed reference batching (§1) is a seeded partition *within each shard* into batches of about
  ``batch_size`` (:func:`ecif.influence.objective.reference_batches` with seed ``seed + shard``):
  every chunk of work is whole batches, so the per-shard :class:`ContrastiveData` (with the global
  ``N`` as its normaliser) gives exactly the terms of the full objective that live in that shard.
- Curvature: EK-FAC (:class:`ecif.curvature.solvers.KroneckerSolver`), whose statistics are sums over
  pairs: each shard's are computed independently (:func:`shard_statistics`), summed in shard order
  on the driver (:func:`ecif.curvature.solvers.sum_statistics`), then the eigenbases; a second pass
  does the same for the corrected eigenvalues.  Memory ``O(d² + e² + d·e)`` for the statistics.
- ``s = H⁻¹∇φ`` once, with ``φ`` the contrastive loss of a small trusted set held in memory; then per
  shard ``influence = (1/N)∇(Pos_n + Neg_n)ᵀ s`` by :func:`ecif.influence.scores.influence_along`
  (one forward-mode pass), with its positive and negative parts, and optionally self-influence.

Sign convention (as everywhere): ``influence`` is the predicted change of ``φ`` if the pair is
removed; **negative = harmful**, positive = valuable.

Every shard's scores go to ``OUT/scores-00000.npz`` as soon as they exist, so an interrupted call
resumes; the solver is stored as ``OUT/curvature.safetensors``.  Work is mapped over shards by an
:class:`Executor`: :class:`LocalExecutor` (this process) or :class:`RayExecutor` (Ray tasks, local or
on a cluster; ``pip install 'ecif[ray]'``).  Both call the same functions and reduce in the same
order, so they give the same scores up to floating-point round-off of different thread counts.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ecif.curvature.solvers import (
    FactorStatistics,
    KroneckerSolver,
    kronecker_bases,
    kronecker_statistics,
    load_solver,
    save_solver,
    sum_statistics,
)
from ecif.influence.objective import ContrastiveData, HeadsProblem, HeadsScope, reference_batches
from ecif.influence.scores import gradient_of, influence_along, self_influence
from ecif.influence.test_functions import validation_loss
from ecif.progress import Reporter, as_reporter
from ecif.run import atomic_write_bytes, atomic_write_json, read_json

STORE_FILE = "store.json"
SCORES_INFO_FILE = "scores.json"
SOLVER_FILE = "curvature.safetensors"
SCORE_COLUMNS = ("influence", "influence_pos", "influence_neg", "influence_first_order", "influence_neg_first_order")
#: the self-influence columns written when asked for, and the form of ``Neg_n`` each uses.
SELF_INFLUENCE_COLUMNS = {"self_influence": "exact", "self_influence_first_order": "first_order"}


# --- features on disk -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureStore:
    """Backbone features of ``N`` pairs as float32 ``.npy`` shards (rows in shard order)."""

    directory: Path
    shard_rows: tuple[int, ...]
    image_dim: int
    text_dim: int

    @classmethod
    def open(cls, directory: str | Path) -> FeatureStore:
        directory = Path(directory)
        info = read_json(directory / STORE_FILE)
        if info is None:
            raise FileNotFoundError(
                f"{directory} is not a feature store (no {STORE_FILE}; an interrupted extract-features "
                "writes it when run again to the end)"
            )
        return cls(directory, tuple(info["shard_rows"]), int(info["image_dim"]), int(info["text_dim"]))

    @property
    def n_pairs(self) -> int:
        return int(sum(self.shard_rows))

    @property
    def n_shards(self) -> int:
        return len(self.shard_rows)

    def head(self, n_shards: int) -> FeatureStore:
        """The store made of the first ``n_shards`` shards only (a smaller problem, same files)."""
        return FeatureStore(self.directory, self.shard_rows[:n_shards], self.image_dim, self.text_dim)

    def read(self, shard: int) -> tuple[Tensor, Tensor]:
        """``(image [n_k, d], text [n_k, d'])`` of one shard in float64.

        Memory-mapped, copied, and the map dropped at once: touched pages of a map count towards a
        process's resident memory, so keeping maps open would grow it with ``N``.
        """
        parts = []
        for modality in ("image", "text"):
            mapped = np.load(self.directory / f"{modality}-{shard:05d}.npy", mmap_mode="r")
            parts.append(torch.from_numpy(np.array(mapped, dtype=np.float64)))
            del mapped
        return parts[0], parts[1]

    def in_memory(self, batch_size: int, seed: int = 0) -> ContrastiveData:
        """Every shard at once with one seeded reference batching (for a small trusted set)."""
        parts = [self.read(shard) for shard in range(self.n_shards)]
        image, text = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return ContrastiveData(image, text, reference_batches(self.n_pairs, batch_size, seed))

    def fingerprint(self) -> str:
        """Identifies the features (names, shapes and sizes of the shard files, not their bytes)."""
        parts = [str(self.directory.resolve()), repr(self.shard_rows), str(self.image_dim), str(self.text_dim)]
        for shard in range(self.n_shards):
            for modality in ("image", "text"):
                stat = (self.directory / f"{modality}-{shard:05d}.npy").stat()
                parts.append(f"{stat.st_size}:{stat.st_mtime_ns}")
        return hashlib.sha256("\x1e".join(parts).encode()).hexdigest()


class FeatureStoreWriter:
    """Writes a :class:`FeatureStore` one shard at a time, ``store.json`` last (a store that opens is whole).

    Each shard's files are written atomically.  ``shard_rows`` and ``dims`` (image and text width)
    describe shards already in ``directory``: a resumed write appends after them.
    """

    def __init__(self, directory: str | Path, shard_rows: Sequence[int] = (), dims: Sequence[int] | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_rows = [int(rows) for rows in shard_rows]
        self.dims = (int(dims[0]), int(dims[1])) if dims else None

    def add(self, image: np.ndarray, text: np.ndarray) -> int:
        """Write ``(image [n_k, d], text [n_k, d'])`` as float32 shard ``k`` and return ``k``."""
        index = len(self.shard_rows)
        if image.shape[0] != text.shape[0]:
            raise ValueError(f"shard {index}: {image.shape[0]} images but {text.shape[0]} captions")
        shape = (int(image.shape[1]), int(text.shape[1]))
        if self.dims is not None and shape != self.dims:
            raise ValueError(f"shard {index} has widths {shape}, the first had {self.dims}")
        self.dims = shape
        for modality, values in (("image", image), ("text", text)):
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(values, dtype=np.float32))
            atomic_write_bytes(self.directory / f"{modality}-{index:05d}.npy", buffer.getvalue())
        self.shard_rows.append(int(image.shape[0]))
        return index

    def finish(self) -> FeatureStore:
        """Write ``store.json`` and return the store; ValueError if no shard was written."""
        if self.dims is None or not self.shard_rows:
            raise ValueError("no shards to write")
        image_dim, text_dim = self.dims
        atomic_write_json(self.directory / STORE_FILE, {"shard_rows": self.shard_rows, "image_dim": image_dim, "text_dim": text_dim})
        return FeatureStore(self.directory, tuple(self.shard_rows), image_dim, text_dim)


def write_feature_store(directory: str | Path, shards: Iterable[tuple[np.ndarray, np.ndarray]]) -> FeatureStore:
    """Write ``(image [n_k, d], text [n_k, d'])`` shards one at a time as float32 and return the store.

    ``shards`` may be a generator, so the features never need to be in memory all at once.
    """
    writer = FeatureStoreWriter(directory)
    for image, text in shards:
        writer.add(image, text)
    return writer.finish()


# --- per-shard work (pure functions of their arguments; what Ray tasks run) -------------------------------


@dataclass
class StreamingConfig:
    """Settings of streamed scoring.

    ``batch_size``/``seed``: the reference batching within each shard.  ``delta`` (δ of ``R``) and
    ``damping`` (λ) enter the EK-FAC exactly.  ``self_influence``: also ``∇g_nᵀH⁻¹∇g_n`` per pair,
    in both forms of :data:`SELF_INFLUENCE_COLUMNS` (a Jacobian ``[B, P]`` per batch and form, ``B``
    backward passes: far costlier than ``influence``, which is one forward-mode pass).
    """

    batch_size: int = 64
    seed: int = 0
    delta: float = 1.0
    damping: float = 1e-4
    self_influence: bool = False


def shard_data(store: FeatureStore, shard: int, config: StreamingConfig) -> ContrastiveData:
    """One shard's pairs with their reference batches; the normaliser is the whole store's ``N``."""
    image, text = store.read(shard)
    batches = reference_batches(image.shape[0], config.batch_size, config.seed + shard)
    return ContrastiveData(image, text, batches, normaliser=float(store.n_pairs))


def shard_statistics(
    shard: int,
    store: FeatureStore,
    scope: HeadsScope,
    theta: Tensor,
    config: StreamingConfig,
    bases: dict[str, tuple[Tensor, Tensor]] | None = None,
) -> FactorStatistics:
    """EK-FAC statistics (sums over the shard's pairs) of one shard; see :func:`kronecker_statistics`."""
    return kronecker_statistics(scope, theta, shard_data(store, shard, config), bases)


def score_shard(
    shard: int,
    store: FeatureStore,
    scope: HeadsScope,
    theta: Tensor,
    direction: Tensor,
    config: StreamingConfig,
    solver: KroneckerSolver | None = None,
) -> dict[str, np.ndarray]:
    """``{column: [n_k]}`` for one shard: :data:`SCORE_COLUMNS` along ``direction = H⁻¹∇φ [P]``,
    plus :data:`SELF_INFLUENCE_COLUMNS` when ``solver`` is given (units of ``φ``; negative influence = harmful)."""
    # θ₀ only enters the value and gradient of R, which scoring at a given θ̂ never evaluates.
    problem = HeadsProblem(scope, shard_data(store, shard, config), theta, config.delta)
    influence = influence_along(problem, theta, direction)
    columns = {name: getattr(influence, name) for name in SCORE_COLUMNS}
    if solver is not None:
        for column, negative in SELF_INFLUENCE_COLUMNS.items():
            columns[column] = self_influence(problem, theta, solver, negative=negative)
    return columns


# --- executors ------------------------------------------------------------------------------------------


class Executor(Protocol):
    def map(self, function: Callable[..., Any], items: Iterable[Any], *shared: Any) -> Iterator[Any]:
        """``function(item, *shared)`` for every item, yielded in the order of ``items``.

        ``items`` may be a lazy iterator (e.g. chunks read from disk): it is pulled only as work is
        started, so at most the executor's window of items is in memory.
        """
        ...


class LocalExecutor:
    """Runs every item in this process, one after the other."""

    def map(self, function: Callable[..., Any], items: Iterable[Any], *shared: Any) -> Iterator[Any]:
        for item in items:
            yield function(item, *shared)


def connect_ray(address: str | None = None, num_cpus: int | None = None, **init_options: Any) -> None:
    """Start a local Ray instance (``address=None``) or join a cluster, unless Ray is already up.

    The ``ecif`` package of this process is shipped to the workers (``runtime_env.py_modules``), so
    the cluster runs exactly this version.  The feature store must be readable at the same path on
    every node (a shared file system); results come back to the driver, which writes them.
    """
    ray = _import_ray()
    if ray.is_initialized():
        return
    import ecif

    runtime_env = {"py_modules": [str(Path(ecif.__file__).resolve().parent)]}
    ray.init(address=address, num_cpus=num_cpus, runtime_env=runtime_env, **init_options)


def _import_ray():
    try:
        import ray
    except ImportError as error:
        raise ImportError("the Ray path needs Ray, an optional extra: pip install 'ecif[ray]'") from error
    return ray


class RayExecutor:
    """Runs every item as a Ray task (one CPU each), at most ``window`` in flight.

    Results are collected in item order, so reductions add in the same order as
    :class:`LocalExecutor`; the window bounds what finished tasks can pile up in the object store.
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None, window: int | None = None):
        connect_ray(address, num_cpus)
        ray = _import_ray()
        self.window = window or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))

    def map(self, function: Callable[..., Any], items: Iterable[Any], *shared: Any) -> Iterator[Any]:
        ray = _import_ray()
        task = ray.remote(num_cpus=1)(function)
        shared_refs = [ray.put(value) for value in shared]  # sent once, not once per task
        remaining = iter(items)
        in_flight = deque(task.remote(item, *shared_refs) for item in islice(remaining, self.window))
        while in_flight:
            result = ray.get(in_flight.popleft())
            for item in islice(remaining, 1):
                in_flight.append(task.remote(item, *shared_refs))
            yield result


# --- the whole streamed scoring -----------------------------------------------------------------------


@dataclass
class StreamingResult:
    """Where the scores went and what it took (seconds per stage; 0 for stages resumed from disk)."""

    out_dir: Path
    n_pairs: int
    solver: dict
    seconds: dict[str, float]
    shards_scored: int


def streaming_kronecker_solver(
    store: FeatureStore,
    scope: HeadsScope,
    theta: Tensor,
    config: StreamingConfig,
    executor: Executor,
    reporter: Reporter | None = None,
) -> KroneckerSolver:
    """EK-FAC of the whole store from per-shard statistics summed in shard order (two passes)."""
    reporter = as_reporter(reporter)
    shards = range(store.n_shards)
    first = executor.map(shard_statistics, shards, store, scope, theta, config)
    bases = kronecker_bases(sum_statistics(reporter.iterate(first, "curvature (EK-FAC factors)", store.n_shards)))
    second = executor.map(shard_statistics, shards, store, scope, theta, config, bases)
    eigenvalues = sum_statistics(reporter.iterate(second, "curvature (EK-FAC eigenvalues)", store.n_shards))
    return KroneckerSolver.from_statistics(scope, bases, eigenvalues, store.n_pairs, config.delta, config.damping)


def _fingerprint(store: FeatureStore, trusted: ContrastiveData, scope: HeadsScope, theta: Tensor, config: StreamingConfig) -> str:
    digest = hashlib.sha256()
    digest.update(store.fingerprint().encode())
    # The columns are part of what a folder holds: one scored by a version with other columns is refused.
    columns = [*SCORE_COLUMNS, *(SELF_INFLUENCE_COLUMNS if config.self_influence else ())]
    digest.update(json.dumps([asdict(scope), asdict(config), columns], sort_keys=True).encode())
    for tensor in (theta, trusted.image, trusted.text, *trusted.batches):
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def score_store(
    store: FeatureStore,
    trusted: ContrastiveData,
    scope: HeadsScope,
    theta: Tensor,
    out_dir: str | Path,
    config: StreamingConfig | None = None,
    executor: Executor | None = None,
    reporter: Reporter | None = None,
) -> StreamingResult:
    """Score every pair of ``store`` against the trusted set's contrastive loss, shard by shard.

    ``theta [P]`` are the given (fine-tuned) heads; ``trusted`` is held in memory (its own batching).
    Writes ``OUT/scores-00000.npz ...`` (:data:`SCORE_COLUMNS`, and :data:`SELF_INFLUENCE_COLUMNS` if asked) and
    resumes from whatever a previous call with the same inputs left; refuses a folder scored with
    other inputs.  Read the result with :func:`read_scores`.
    """
    config = config or StreamingConfig()
    executor = executor or LocalExecutor()
    reporter = as_reporter(reporter)
    if not isinstance(scope, HeadsScope):
        raise ValueError("streamed scoring covers the projection heads only; score the blocks scope with `ecif score --blocks`")
    if scope.learn_logit_scale:
        raise ValueError("streamed scoring covers the two projection heads; fix the logit scale")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(store, trusted, scope, theta, config)
    info = read_json(out_dir / SCORES_INFO_FILE, {})
    if info.get("fingerprint", fingerprint) != fingerprint:
        raise ValueError(f"{out_dir} holds scores of other features, heads or settings; choose another folder")
    atomic_write_json(out_dir / SCORES_INFO_FILE, {"fingerprint": fingerprint, "complete": False})
    seconds = {"curvature": 0.0, "solve": 0.0, "scores": 0.0}

    started = time.perf_counter()
    solver = load_solver(out_dir / SOLVER_FILE, fingerprint)
    if solver is None:
        solver = streaming_kronecker_solver(store, scope, theta, config, executor, reporter)
        save_solver(solver, out_dir / SOLVER_FILE, fingerprint)
        seconds["curvature"] = time.perf_counter() - started

    started = time.perf_counter()
    direction = solver.solve(gradient_of(validation_loss(scope, trusted), theta))
    seconds["solve"] = time.perf_counter() - started

    started = time.perf_counter()
    todo = [shard for shard in range(store.n_shards) if not _scores_path(out_dir, shard).exists()]
    extra = solver if config.self_influence else None
    results = executor.map(score_shard, todo, store, scope, theta, direction, config, extra)
    for shard, columns in zip(todo, reporter.iterate(results, "scores", len(todo))):
        buffer = io.BytesIO()
        np.savez(buffer, **columns)
        atomic_write_bytes(_scores_path(out_dir, shard), buffer.getvalue())
    seconds["scores"] = time.perf_counter() - started if todo else 0.0

    atomic_write_json(
        out_dir / SCORES_INFO_FILE,
        {"fingerprint": fingerprint, "complete": True, "n_pairs": store.n_pairs, "shards": store.n_shards,
         "settings": asdict(config), "solver": solver.describe(), "store": str(store.directory)},
    )
    return StreamingResult(out_dir, store.n_pairs, solver.describe(), seconds, len(todo))


def _scores_path(out_dir: Path, shard: int) -> Path:
    return out_dir / f"scores-{shard:05d}.npz"


def read_scores(out_dir: str | Path) -> dict[str, np.ndarray]:
    """Every column of a finished :func:`score_store` as ``[N]`` arrays in store row order."""
    out_dir = Path(out_dir)
    info = read_json(out_dir / SCORES_INFO_FILE, {})
    if not info.get("complete"):
        raise FileNotFoundError(f"{out_dir} holds no finished scores; run score_store again to resume")
    parts: dict[str, list[np.ndarray]] = {}
    for shard in range(int(info["shards"])):
        with np.load(_scores_path(out_dir, shard)) as columns:
            for name in columns.files:
                parts.setdefault(name, []).append(columns[name])
    return {name: np.concatenate(values) for name, values in parts.items()}
