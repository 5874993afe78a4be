"""Factorised solvers on disk (safetensors), so that a new process reuses them instead of refactorising."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ecif.config import CurvatureConfig
from ecif.curvature.solvers.base import CurvatureSolver
from ecif.curvature.solvers.dense import DenseSolver
from ecif.curvature.solvers.kronecker import KroneckerSolver
from ecif.curvature.solvers.low_rank import LowRankSolver
from ecif.curvature.solvers.refined import RefinedSolver
from ecif.objective.contrastive import ContrastiveProblem
from ecif.run import atomic_write_with

#: The solvers worth storing, each with ``to_stored`` and ``from_stored``; a file names its solver's ``name``.
STORABLE = (DenseSolver, KroneckerSolver, LowRankSolver)


def save_solver(solver: CurvatureSolver, path: Path, fingerprint: str) -> bool:
    """Store a factorised solver so a new process reuses it (dense factor, EK-FAC factors or eigenpairs).

    A :class:`RefinedSolver` is stored as its approximation and marked refined; :func:`load_solver`
    rebuilds the conjugate gradient around it.  ``fingerprint`` identifies the problem and settings;
    :func:`load_solver` refuses a mismatch.  Returns False for solvers with nothing worth storing
    (plain conjugate gradient).
    """
    from safetensors.torch import save_file

    refined = isinstance(solver, RefinedSolver)
    stored = solver.approximate if refined else solver
    if not isinstance(stored, STORABLE):
        return False
    tensors, extra = stored.to_stored()
    metadata = {"solver": stored.name, "damping": repr(stored.damping), "fingerprint": fingerprint, "refined": str(int(refined)), **extra}
    atomic_write_with(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))
    return True


def load_solver(
    path: Path, fingerprint: str, problem: ContrastiveProblem | None = None, theta: Tensor | None = None, config: CurvatureConfig | None = None
) -> CurvatureSolver | None:
    """The solver stored by :func:`save_solver` (on ``theta``'s device), or None when absent or made for another problem.

    A refined solver needs ``problem``, ``theta`` and ``config`` for its conjugate gradient.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    if metadata.get("fingerprint") != fingerprint:
        return None
    stored = next(kind for kind in STORABLE if kind.name == metadata["solver"])
    # The factors go where the problem's θ is (the CPU without one): stored files are device-free.
    device = "cpu" if theta is None else str(theta.device)
    solver = stored.from_stored(load_file(str(path), device=device), metadata)
    if metadata.get("refined") == "1":
        if problem is None or theta is None or config is None:
            raise ValueError(f"{path} holds a refined solver: pass the problem, theta and config to rebuild its conjugate gradient")
        return RefinedSolver.around(solver, problem, theta, config)
    return solver
