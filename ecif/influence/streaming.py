"""ECIF scores of very many pairs from features on disk, in bounded memory, locally or with Ray.

The heads ``θ̂`` are **given**: this module scores, it does not fine-tune.  ECIF's scores mean
something only at a minimiser of ``R`` (docs/method.md §1), so ``θ̂`` should come from
:func:`ecif.finetune.finetune_heads` on this store's objective, per-shard batching included (a
run's ``heads.safetensors`` minimises its run's own batching: the same only for a one-shard store of
the run's rows).  This is checked (below); benchmarks that pass other heads measure cost, not
fidelity, and say so with ``allow_unconverged``.

Layout and maths:

- A :class:`FeatureStore` is a folder of float32 ``.npy`` shards (``image-00000.npy [n_k, d]``,
  ``text-00000.npy [n_k, d']``) plus ``store.json``; each shard is opened with
  ``np.load(mmap_mode="r")``, copied and unmapped, so a process holds one shard at a time.
- The fixed reference batching (§1) is a seeded partition *within each shard* into batches of about
  ``batch_size`` (:func:`ecif.objective.contrastive.reference_batches` with seed ``seed + shard``):
  every chunk of work is whole batches, so the per-shard :class:`ContrastiveData` (with the global
  ``N`` as its normaliser) gives exactly the terms of the full objective that live in that shard.
  The loss is the scope's (softmax or SigLIP's sigmoid, with its fixed bias); ``Σ(a+b)`` below
  stands for the sum of every term of the shard's batches (:func:`ecif.objective.contrastive.contrastive_sum`).
- Curvature: EK-FAC (:class:`ecif.curvature.solvers.KroneckerSolver`), whose statistics are sums over
  pairs: each shard's are computed independently (:func:`shard_statistics`), summed in shard order
  on the driver (:func:`ecif.curvature.solvers.sum_statistics`), then the eigenbases; a second pass
  does the same for the corrected eigenvalues.  Memory ``O(d² + e² + d·e)`` for the statistics.
- The premise is checked on the way: the first statistics pass also sums each shard's gradient of
  ``Σ(a_i + b_i)``, so ``∇R(θ̂) = (1/N)Σ_shards ∇Σ(a+b) + δ(θ̂ − θ₀)`` costs no extra pass over the
  store (:func:`check_stationarity`).  Heads whose ``‖∇R(θ̂)‖`` exceeds
  :attr:`StreamingConfig.gradient_tolerance` are refused (:class:`NotAMinimiser`) unless
  :attr:`StreamingConfig.allow_unconverged`; either way the measurement goes into ``scores.json``.
  ``θ₀`` (the penalty centre, stored in ``heads.safetensors`` next to ``θ̂``) is needed for this and
  for nothing else: the curvature of the penalty is ``δI`` wherever it is centred.
- ``s = H⁻¹∇φ`` once, with ``φ`` the contrastive loss of a small trusted set held in memory; then per
  shard ``influence = (1/N)∇(Pos_n + Neg_n)ᵀ s`` by :func:`ecif.influence.scores.influence_along`
  (one forward-mode pass), with its positive and negative parts, and optionally self-influence.

Sign convention (as everywhere): ``influence`` is the predicted change of ``φ`` if the pair is
removed; **negative = harmful**, positive = valuable.

Every shard's scores go to ``OUT/scores-00000.npz`` as soon as they exist, so an interrupted call
resumes; the solver is stored as ``OUT/curvature.safetensors`` and the contrastive gradient at ``θ̂``
as ``OUT/gradient.npz`` (a resumed call checks the premise again without a pass).  Work is mapped over shards by an
:class:`Executor`: :class:`LocalExecutor` (this process) or :class:`RayExecutor` (Ray tasks, local or
on a cluster; ``pip install 'ecif[ray]'``).  Both call the same functions and reduce in the same
order, so they give the same scores up to floating-point round-off of different thread counts.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ecif.config import StreamingConfig
from ecif.curvature.solvers import (
    FactorStatistics,
    KroneckerSolver,
    kronecker_bases,
    kronecker_statistics,
    load_solver,
    save_solver,
    sum_statistics,
)
from ecif.influence.columns import DIRECTIONAL_COLUMNS, SCORE_COLUMNS, SELF_INFLUENCE_COLUMNS
from ecif.influence.scores import gradient_of, influence_along, self_influence
from ecif.objective.contrastive import ContrastiveData, ContrastiveProblem, HeadsScope, contrastive_sum, reference_batches
from ecif.objective.measurements import validation_loss
from ecif.progress import Reporter, as_reporter
from ecif.run import atomic_write_bytes, atomic_write_json, read_json

STORE_FILE = "store.json"
SCORES_INFO_FILE = "scores.json"
SOLVER_FILE = "curvature.safetensors"
#: ``(1/N)∇Σ(a+b)`` at ``θ̂`` and ``(1/N)Σ(a+b)``, kept so that a resumed call checks the premise again
#: (with its own ``θ₀`` and tolerance) without another pass over the store.
GRADIENT_FILE = "gradient.npz"
#: keys under which the first statistics pass carries each shard's contrastive sum and its gradient.
GRADIENT_KEY = "objective.contrastive_sum_gradient"
LOSS_KEY = "objective.contrastive_sum"


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


#: settings that decide whether to score, not what the scores are (left out of the fingerprint).
_CHECK_SETTINGS = ("gradient_tolerance", "allow_unconverged")


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
    with_gradient: bool = False,
) -> FactorStatistics:
    """EK-FAC statistics (sums over the shard's pairs) of one shard; see :func:`kronecker_statistics`.

    ``with_gradient``: also the shard's ``Σ(a+b)`` (:data:`LOSS_KEY`) and its gradient at ``theta``
    (:data:`GRADIENT_KEY`, ``[P]``), unnormalised sums like the statistics, so the same reduction
    adds them up (the premise check, :func:`check_stationarity`).
    """
    data = shard_data(store, shard, config)
    statistics = kronecker_statistics(scope, theta, data, bases)
    if with_gradient:
        statistics.update(_contrastive_sums(scope, theta, data))
    return statistics


def shard_gradient(shard: int, store: FeatureStore, scope: HeadsScope, theta: Tensor, config: StreamingConfig) -> FactorStatistics:
    """Only the :data:`LOSS_KEY` and :data:`GRADIENT_KEY` of :func:`shard_statistics` (no curvature)."""
    return _contrastive_sums(scope, theta, shard_data(store, shard, config))


def _contrastive_sums(scope: HeadsScope, theta: Tensor, data: ContrastiveData) -> FactorStatistics:
    gradient, value = torch.func.grad_and_value(lambda t: contrastive_sum(scope, t, data))(theta)
    return {GRADIENT_KEY: gradient.detach(), LOSS_KEY: value.detach()}


def score_shard(
    shard: int,
    store: FeatureStore,
    scope: HeadsScope,
    theta: Tensor,
    direction: Tensor,
    config: StreamingConfig,
    solver: KroneckerSolver | None = None,
) -> dict[str, np.ndarray]:
    """``{column: [n_k]}`` for one shard: :data:`DIRECTIONAL_COLUMNS` along ``direction = H⁻¹∇φ [P]``,
    plus :data:`SELF_INFLUENCE_COLUMNS` when ``solver`` is given (units of ``φ``; negative influence = harmful)."""
    # θ₀ only enters the value and gradient of R, which scoring never evaluates (the premise check
    # adds δ(θ̂ − θ₀) to the summed contrastive gradient on the driver: check_stationarity).
    problem = ContrastiveProblem(scope, shard_data(store, shard, config), theta, config.delta)
    influence = influence_along(problem, theta, direction)
    columns = {name: getattr(influence, name) for name in DIRECTIONAL_COLUMNS}
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
    package = Path(__file__).resolve().parents[1]  # the ecif package folder
    runtime_env = {"py_modules": [str(package)]}
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
    """Where the scores went and what it took (seconds per stage; 0 for stages resumed from disk).

    ``stationarity``: :meth:`StationarityCheck.to_dict` of the heads (is ``θ̂`` a minimiser of the
    scored ``R``?); ``warnings``: what the caller should print (non-empty only when scoring went
    ahead with ``allow_unconverged``).
    """

    out_dir: Path
    n_pairs: int
    solver: dict
    seconds: dict[str, float]
    shards_scored: int
    stationarity: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class NotAMinimiser(ValueError):
    """The given heads are not a minimiser of the objective being scored (``‖∇R(θ̂)‖`` above the
    tolerance), or no ``θ₀`` was given to check that they are; ``check`` holds the measurement."""

    def __init__(self, check: StationarityCheck):
        super().__init__(check.message())
        self.check = check


@dataclass
class StationarityCheck:
    """Whether ``θ̂`` is a minimiser of ``R(θ) = (1/N)Σ(a_i+b_i) + (δ/2)‖θ − θ₀‖²`` over the store.

    ``gradient_norm = ‖∇R(θ̂)‖``; ``contrastive_gradient_norm = ‖(1/N)∇Σ(a+b)‖`` and
    ``penalty_gradient_norm = δ‖θ̂ − θ₀‖`` (equal at a minimiser, where the two cancel);
    ``relative_gradient_norm`` is the first over the second (``1`` when ``θ̂ = θ₀``, ``inf`` when
    the contrastive gradient vanishes but ``∇R`` does not).  Without ``θ₀`` only the contrastive
    parts are known (``theta0_given`` false, the norms of ``∇R`` NaN) and the check fails: every
    ``θ̂`` is the minimiser of ``R`` for ``θ₀ = θ̂ + (1/δ)(1/N)∇Σ(a+b)``, so without the actual
    ``θ₀`` there is nothing to check.
    """

    gradient_norm: float
    relative_gradient_norm: float
    contrastive_gradient_norm: float
    penalty_gradient_norm: float
    contrastive_loss: float
    tolerance: float
    n_pairs: int
    delta: float
    batch_size: int
    theta0_given: bool
    passed: bool

    def to_dict(self) -> dict:
        """The fields, with NaN and infinite values as None (so that ``scores.json`` is standard JSON)."""
        return {key: None if isinstance(value, float) and not math.isfinite(value) else value
                for key, value in asdict(self).items()}

    def message(self, allowed: bool = False) -> str:
        """One line: why the heads are refused, or (``allowed``) the warning when they are scored anyway."""
        objective = f"N = {self.n_pairs}, δ = {self.delta:g}, reference batches of {self.batch_size} within each shard"
        if not self.theta0_given:
            problem = ("cannot check that the heads are a minimiser of the objective being scored: no θ₀ (the "
                       "starting heads of the δ penalty, stored in heads.safetensors) was given (contrastive gradient "
                       f"norm {self.contrastive_gradient_norm:.2e}; {objective})")
            fix = "pass theta0"
        else:
            problem = (f"the heads are not a minimiser of the objective being scored: gradient norm ‖∇R(θ̂)‖ = "
                       f"{self.gradient_norm:.2e} > tolerance {self.tolerance:.0e} (relative to the contrastive "
                       f"gradient {self.relative_gradient_norm:.2e}; {objective})")
            fix = ("fine-tune the heads to convergence on exactly this objective (these pairs, δ and per-shard "
                   "reference batches: ecif.finetune.finetune_heads; `ecif finetune` converges on its run's own "
                   "batching, the same only for a one-shard store of the run's rows)")
        if allowed:
            return f"{problem}; scored anyway (allow_unconverged): influence estimates assume a minimiser and may be unreliable; {fix}"
        return f"{problem}; {fix} or pass --allow-unconverged (StreamingConfig.allow_unconverged) to score anyway"


def check_stationarity(
    contrastive_gradient: Tensor,
    contrastive_loss: float,
    theta: Tensor,
    theta0: Tensor | None,
    n_pairs: int,
    config: StreamingConfig,
) -> StationarityCheck:
    """:class:`StationarityCheck` from ``(1/N)∇Σ(a+b) [P]`` at ``theta`` (θ̂) over the whole store."""
    contrastive_norm = float(contrastive_gradient.norm())
    if theta0 is None:
        gradient_norm = relative = penalty_norm = float("nan")
    else:
        if theta0.shape != theta.shape:
            raise ValueError(f"θ₀ has shape {tuple(theta0.shape)} but θ̂ has {tuple(theta.shape)}")
        penalty = config.delta * (theta - theta0.to(theta.dtype))
        gradient_norm = float((contrastive_gradient + penalty).norm())
        penalty_norm = float(penalty.norm())
        relative = gradient_norm / contrastive_norm if contrastive_norm > 0 else (0.0 if gradient_norm == 0 else float("inf"))
    return StationarityCheck(
        gradient_norm=gradient_norm,
        relative_gradient_norm=relative,
        contrastive_gradient_norm=contrastive_norm,
        penalty_gradient_norm=penalty_norm,
        contrastive_loss=float(contrastive_loss),
        tolerance=float(config.gradient_tolerance),
        n_pairs=int(n_pairs),
        delta=float(config.delta),
        batch_size=int(config.batch_size),
        theta0_given=theta0 is not None,
        passed=theta0 is not None and gradient_norm <= config.gradient_tolerance,
    )


def _split_gradient(total: FactorStatistics, n_pairs: int) -> tuple[FactorStatistics, Tensor, float]:
    """``(curvature statistics, (1/N)∇Σ(a+b), (1/N)Σ(a+b))`` of summed first-pass statistics."""
    total = dict(total)
    gradient = total.pop(GRADIENT_KEY) / n_pairs
    loss = float(total.pop(LOSS_KEY)) / n_pairs
    return total, gradient, loss


def streaming_first_pass(
    store: FeatureStore,
    scope: HeadsScope,
    theta: Tensor,
    config: StreamingConfig,
    executor: Executor,
    reporter: Reporter | None = None,
) -> tuple[FactorStatistics, Tensor, float]:
    """The first EK-FAC pass, which also sums the objective's gradient: ``(statistics, (1/N)∇Σ(a+b) [P],
    (1/N)Σ(a+b))``, every sum in shard order."""
    reporter = as_reporter(reporter)
    parts = executor.map(shard_statistics, range(store.n_shards), store, scope, theta, config, None, True)
    total = sum_statistics(reporter.iterate(parts, "curvature (EK-FAC factors, gradient)", store.n_shards))
    return _split_gradient(total, store.n_pairs)


def streaming_gradient(
    store: FeatureStore,
    scope: HeadsScope,
    theta: Tensor,
    config: StreamingConfig,
    executor: Executor,
    reporter: Reporter | None = None,
) -> tuple[Tensor, float]:
    """``((1/N)∇Σ(a+b) [P], (1/N)Σ(a+b))`` alone, for a folder whose solver is stored but not its gradient."""
    reporter = as_reporter(reporter)
    parts = executor.map(shard_gradient, range(store.n_shards), store, scope, theta, config)
    _, gradient, loss = _split_gradient(sum_statistics(reporter.iterate(parts, "gradient", store.n_shards)), store.n_pairs)
    return gradient, loss


def streaming_kronecker_solver(
    store: FeatureStore,
    scope: HeadsScope,
    theta: Tensor,
    config: StreamingConfig,
    executor: Executor,
    reporter: Reporter | None = None,
    first_pass: FactorStatistics | None = None,
) -> KroneckerSolver:
    """EK-FAC of the whole store from per-shard statistics summed in shard order (two passes).

    ``first_pass``: the summed first-pass statistics when already at hand (:func:`streaming_first_pass`).
    """
    reporter = as_reporter(reporter)
    shards = range(store.n_shards)
    if first_pass is None:
        first = executor.map(shard_statistics, shards, store, scope, theta, config)
        first_pass = sum_statistics(reporter.iterate(first, "curvature (EK-FAC factors)", store.n_shards))
    bases = kronecker_bases(first_pass)
    second = executor.map(shard_statistics, shards, store, scope, theta, config, bases)
    eigenvalues = sum_statistics(reporter.iterate(second, "curvature (EK-FAC eigenvalues)", store.n_shards))
    return KroneckerSolver.from_statistics(scope, bases, eigenvalues, store.n_pairs, config.delta, config.damping)


def _fingerprint(store: FeatureStore, trusted: ContrastiveData, scope: HeadsScope, theta: Tensor, config: StreamingConfig) -> str:
    digest = hashlib.sha256()
    digest.update(store.fingerprint().encode())
    # The columns are part of what a folder holds: one scored by a version with other columns is refused.
    columns = [*DIRECTIONAL_COLUMNS, *(SELF_INFLUENCE_COLUMNS if config.self_influence else ())]
    settings = {key: value for key, value in asdict(config).items() if key not in _CHECK_SETTINGS}
    # The scope's fields less "kind": asdict of a scope without offsets, as before there were any.
    scope_settings = {key: value for key, value in scope.to_dict().items() if key != "kind"}
    digest.update(json.dumps([scope_settings, settings, columns], sort_keys=True).encode())
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
    theta0: Tensor | None = None,
) -> StreamingResult:
    """Score every pair of ``store`` against the trusted set's contrastive loss, shard by shard.

    ``theta [P]`` are the given (fine-tuned) heads and ``theta0 [P]`` the ``θ₀`` they were fine-tuned
    towards (both in ``heads.safetensors``); ``trusted`` is held in memory (its own batching).
    The first curvature pass also measures ``‖∇R(θ̂)‖`` (:func:`check_stationarity`); heads that are
    not a minimiser, or no ``theta0`` to check them with, raise :class:`NotAMinimiser` after that
    pass unless ``config.allow_unconverged``.  Writes ``OUT/scores-00000.npz ...``
    (:data:`DIRECTIONAL_COLUMNS`, and :data:`SELF_INFLUENCE_COLUMNS` if asked) and ``scores.json`` (with the
    check under ``stationarity`` and any ``warnings``), resumes from whatever a previous call with
    the same inputs left, and refuses a folder scored with other inputs.  Read the result with
    :func:`read_scores`.
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
    stored = _read_gradient(out_dir, fingerprint)
    first_pass = None
    if solver is None:
        first_pass, gradient, loss = streaming_first_pass(store, scope, theta, config, executor, reporter)
        _write_gradient(out_dir, fingerprint, gradient, loss)
    elif stored is None:  # a folder from before the check: its gradient alone, one cheap pass
        gradient, loss = streaming_gradient(store, scope, theta, config, executor, reporter)
        _write_gradient(out_dir, fingerprint, gradient, loss)
    else:
        gradient, loss = stored
    check = check_stationarity(gradient, loss, theta, theta0, store.n_pairs, config)
    warnings = [] if check.passed else [check.message(allowed=True)]
    atomic_write_json(out_dir / SCORES_INFO_FILE, {"fingerprint": fingerprint, "complete": False, "stationarity": check.to_dict()})
    if not check.passed and not config.allow_unconverged:
        raise NotAMinimiser(check)
    if solver is None:
        solver = streaming_kronecker_solver(store, scope, theta, config, executor, reporter, first_pass)
        save_solver(solver, out_dir / SOLVER_FILE, fingerprint)
    seconds["curvature"] = time.perf_counter() - started if first_pass is not None or stored is None else 0.0

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
         "settings": asdict(config), "solver": solver.describe(), "store": str(store.directory),
         "stationarity": check.to_dict(), "warnings": warnings, "not_written": columns_not_written(config)},
    )
    return StreamingResult(out_dir, store.n_pairs, solver.describe(), seconds, len(todo), check.to_dict(), warnings)


def columns_not_written(config: StreamingConfig) -> dict[str, str]:
    """The score columns of the in-memory path that streamed scoring leaves out, each with the reason."""
    reasons = {column.name: column.not_streamed_because for column in SCORE_COLUMNS if not column.streamed}
    if not config.self_influence:
        reasons.update(dict.fromkeys(SELF_INFLUENCE_COLUMNS, "not asked for (--self-influence)"))
    return reasons


def _scores_path(out_dir: Path, shard: int) -> Path:
    return out_dir / f"scores-{shard:05d}.npz"


def _write_gradient(out_dir: Path, fingerprint: str, gradient: Tensor, loss: float) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, fingerprint=np.array(fingerprint), gradient=gradient.numpy(), loss=np.array(loss))
    atomic_write_bytes(out_dir / GRADIENT_FILE, buffer.getvalue())


def _read_gradient(out_dir: Path, fingerprint: str) -> tuple[Tensor, float] | None:
    """The stored ``((1/N)∇Σ(a+b), (1/N)Σ(a+b))`` of these inputs, or None."""
    try:
        with np.load(out_dir / GRADIENT_FILE, allow_pickle=False) as stored:
            if str(stored["fingerprint"]) != fingerprint:
                return None
            return torch.from_numpy(stored["gradient"].copy()), float(stored["loss"])
    except (OSError, KeyError, ValueError):
        return None


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
