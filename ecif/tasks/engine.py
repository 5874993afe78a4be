"""The in-memory state of a scored run: the fine-tuned heads, the problem and the curvature solver.

Trace-back and edits need the same objects the scoring stage built.  :func:`load_engine` rebuilds
them from the run folder (features, heads, settings) once per process and keeps them, so that a
second query in the app or the command line costs one solve and one forward pass, not a rebuild.
The maths tensors (θ, the problem's features, the solver's factors) live on the engine's ``device``;
the features read from disk stay NumPy arrays on the CPU and are moved there as the problem is built.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ecif.config import AUTO_DEVICE, CurvatureConfig, FinetuneConfig, RunConfig
from ecif.curvature.solvers import CurvatureSolver, build_solver, load_solver, save_solver
from ecif.devices import resolve_device
from ecif.finetune import split_trusted_rows
from ecif.objective.contrastive import ContrastiveData, ContrastiveProblem, Scope, scope_from_dict
from ecif.objective.measurements import ZeroShotPrompts, validation_loss
from ecif.paths import text_sha256
from ecif.run import FEATURES_FILE, HEADS_FILE, Run, atomic_write_with

PROMPTS_FILE = "prompts.npz"
CURVATURE_FILE = "curvature.safetensors"


def save_heads(path: Path, scope: Scope, theta: Tensor, theta0: Tensor, delta: float | None = None) -> None:
    """``θ̂`` and ``θ₀`` with the scope (kind and shape) and the penalty ``δ`` in the safetensors metadata."""
    metadata = {"scope": json.dumps(scope.to_dict(), sort_keys=True)}
    if delta is not None:
        metadata["delta"] = repr(float(delta))
    tensors = {"theta": theta.contiguous(), "theta0": theta0.contiguous()}
    atomic_write_with(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def load_heads(path: Path) -> tuple[Scope, Tensor, Tensor]:
    """``(scope, θ̂, θ₀)`` as :func:`save_heads` stored them."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    # Files written before the blocks scope existed carry the heads' shape as separate entries.
    settings = json.loads(metadata["scope"]) if "scope" in metadata else metadata
    return scope_from_dict(settings), tensors["theta"], tensors["theta0"]


def heads_delta(path: Path) -> float | None:
    """The penalty ``δ`` the heads in ``path`` were fine-tuned with (``None`` for files that predate it)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        value = (handle.metadata() or {}).get("delta")
    return float(value) if value is not None else None


def split_rows(manifest: pd.DataFrame, split: str) -> np.ndarray:
    """Manifest rows of one split, in row order."""
    return np.flatnonzero(manifest["split"].astype(str).to_numpy() == split)


@dataclass
class Engine:
    """A scored run's maths objects.  Rows of ``problem`` are ``train_rows`` of the manifest."""

    run: Run
    scope: Scope
    theta: Tensor
    theta0: Tensor
    manifest: pd.DataFrame
    image: np.ndarray
    text: np.ndarray
    train_rows: np.ndarray
    trusted_rows: np.ndarray
    prompts: ZeroShotPrompts | None
    finetune: FinetuneConfig
    curvature: CurvatureConfig
    delta: float
    """The penalty ``δ`` of ``R`` at ``θ̂`` (the chosen one when the settings say ``"auto"``)."""
    device: torch.device
    """Where ``theta``, the problem, the trusted data and the solver live."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    cache: dict = field(default_factory=dict, repr=False)
    """Results that depend only on this engine's θ̂ and data (trace-back's per-item influence, step norms)."""
    cache_lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    """Held while :attr:`cache` is read or filled: app sessions share the engine, and a second session
    asking for the same item waits for the first one's solve instead of repeating it."""

    @cached_property
    def problem(self) -> ContrastiveProblem:
        data = ContrastiveData.from_arrays(
            self.image[self.train_rows], self.text[self.train_rows], self.finetune.batch_size, self.finetune.batch_seed, self.device
        )
        return ContrastiveProblem(self.scope, data, self.theta0, self.delta)

    @cached_property
    def trusted_data(self) -> ContrastiveData:
        return ContrastiveData.from_arrays(
            self.image[self.trusted_rows],
            self.text[self.trusted_rows],
            self.finetune.batch_size,
            self.finetune.batch_seed,
            self.device,
        )

    def trusted_loss(self):
        return validation_loss(self.scope, self.trusted_data)

    @property
    def curvature_fingerprint(self) -> str:
        """Identifies the problem a stored solver was factorised for (heads file + settings)."""
        heads = self.run.path(HEADS_FILE)
        return text_sha256(str(heads.stat().st_mtime_ns), json.dumps(self.curvature.to_dict(), sort_keys=True))[:24]

    @property
    def solver(self) -> CurvatureSolver:
        """Loaded from ``RUN/curvature.safetensors`` when stored, else built (and stored) on first use."""
        with self._lock:
            if "_solver" not in self.__dict__:
                path = self.run.path(CURVATURE_FILE)
                solver = load_solver(path, self.curvature_fingerprint, self.problem, self.theta, self.curvature)
                if solver is None:
                    solver = build_solver(self.problem, self.theta, self.curvature)
                    save_solver(solver, path, self.curvature_fingerprint)
                self.__dict__["_solver"] = solver
            return self.__dict__["_solver"]

    @cached_property
    def row_of_uid(self) -> dict[str, int]:
        """Manifest uid (as text) → manifest row; built once, since every trace-back call looks items up."""
        return {uid: row for row, uid in enumerate(self.manifest["uid"].astype(str).to_numpy())}

    def problem_index(self, rows: list[int] | np.ndarray) -> np.ndarray:
        """Manifest rows → positions in the training problem (error for rows not in training)."""
        lookup = {int(row): position for position, row in enumerate(self.train_rows)}
        missing = [int(row) for row in rows if int(row) not in lookup]
        if missing:
            raise ValueError(f"rows {missing[:10]} are not training pairs of this run")
        return np.asarray([lookup[int(row)] for row in rows], dtype=np.int64)

    def image_tensor(self, rows: np.ndarray) -> Tensor:
        """Float64 image features of manifest ``rows`` on the engine's device."""
        return torch.as_tensor(self.image[rows], dtype=torch.float64, device=self.device)


def _run_delta(run: Run, heads_path: Path, finetune: FinetuneConfig) -> float:
    recorded = heads_delta(heads_path)
    if recorded is None:
        recorded = run.info.get("stages", {}).get("fine-tune", {}).get("delta")
    if recorded is None and finetune.auto_delta:
        raise ValueError(f"{run.directory}: the settings say delta='auto' but the heads do not record the δ chosen; re-run the fine-tuning")
    return float(finetune.delta if recorded is None else recorded)


_ENGINES: dict[tuple[str, float], Engine] = {}
_ENGINES_LOCK = threading.Lock()


def load_engine(run: Run | str | Path, device: str | torch.device | None = None) -> Engine:
    """The engine of a run whose fine-tuning stage has finished (cached per process).

    ``device``: a setting of :func:`ecif.devices.resolve_device` (``auto``, ``cpu``, ``cuda[:N]``).
    None keeps the engine this process already holds for the run, on whichever device it was built
    (so trace-back after ``run_pipeline(..., device="cpu")`` stays on the CPU), and otherwise means ``auto``.
    """
    run = run if isinstance(run, Run) else Run(run)
    heads_path = run.path(HEADS_FILE)
    if not heads_path.exists():
        raise FileNotFoundError(f"{run.directory} has no fine-tuned heads yet; run `ecif score` first")
    key = (str(run.directory), heads_path.stat().st_mtime)
    wanted = None if device is None else resolve_device(device)
    with _ENGINES_LOCK:
        cached = _ENGINES.get(key)
        if cached is not None and wanted in (None, cached.device):
            return cached
    device = wanted or resolve_device(AUTO_DEVICE)
    info = run.info
    scope, theta, theta0 = load_heads(heads_path)
    manifest = run.manifest()
    with np.load(run.path(FEATURES_FILE)) as features:
        image, text = features["image"].astype(np.float64), features["text"].astype(np.float64)
    prompts = None
    if run.has(PROMPTS_FILE):
        with np.load(run.path(PROMPTS_FILE), allow_pickle=False) as stored:
            prompts = ZeroShotPrompts.from_arrays(stored["features"], stored["class_index"], stored["names"].tolist(), device)
    config = RunConfig.from_settings(run.directory, info.get("settings", {}))
    engine = Engine(
        run=run,
        scope=scope,
        theta=theta.to(device),
        theta0=theta0.to(device),
        manifest=manifest,
        image=image,
        text=text,
        train_rows=split_rows(manifest, "train"),
        # With δ chosen on part of the trusted split, influence is measured on the other part only.
        trusted_rows=split_trusted_rows(split_rows(manifest, config.trusted_split), config.finetune)[1],
        prompts=prompts,
        finetune=config.finetune,
        curvature=config.curvature,
        delta=_run_delta(run, heads_path, config.finetune),
        device=device,
    )
    with _ENGINES_LOCK:
        _ENGINES.clear()  # one run at a time per process: the dense solver can be large
        _ENGINES[key] = engine
    return engine

