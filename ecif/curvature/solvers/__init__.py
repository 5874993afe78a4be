"""Inverse-curvature solvers behind one interface (docs/method.md §5).

Every solver answers ``(C + λI)⁻¹ v`` for the curvature ``C`` of ``R`` at ``θ̂`` (exact Hessian or
Gauss–Newton, both including the ``δ`` penalty) and damping ``λ``:

- :class:`DenseSolver`: the assembled matrix and its Cholesky factor; the reference for the others
  (a few thousand to ~16k parameters).
- :class:`ConjugateGradientSolver`: matrix-free, one curvature-vector product per iteration.
- :class:`KroneckerSolver`: eigenvalue-corrected K-FAC (EK-FAC) of the Gauss–Newton matrix of each
  projection head; memory ``O(d² + e² + d·e)``, so it scales to ViT-B/32 heads (0.66M parameters).
- :class:`LowRankSolver`: the top eigenpairs of the curvature (Lanczos), every other direction at
  the penalty's curvature ``δ``; for scopes EK-FAC does not cover (the transformer blocks).
- :class:`RefinedSolver` (``"ekfac-cg"``, ``"lowrank-cg"``): exact solves by conjugate gradient
  preconditioned with the EK-FAC or the low-rank solver, whose quadratic forms it keeps.

``solve`` accepts ``[P]`` or ``[k, P]``; ``inverse_quadratic`` returns ``vᵀ(C + λI)⁻¹v`` per row;
``solve_per_pair`` solves one right-hand side per training pair (``solve``, except that a refined
solver answers with its approximation).  The solvers subclass the :class:`CurvatureSolver` protocol
explicitly to inherit that default.

One module a solver (``dense``, ``conjugate_gradient``, ``kronecker``, ``low_rank``, ``refined``),
the interface in ``base``, the names and how each is built in ``registry`` (:func:`build_solver`),
files on disk in ``storage``.
"""

from importlib import import_module
from typing import Any

from ecif.curvature.solvers.registry import (
    SOLVER_NAMES,
    SOLVERS,
    SolverName,
    build_solver,
    refuse_ekfac_beyond_heads,
)

# The rest resolves on first use: the registry's names (the command line's ``--solver`` choices)
# come without importing torch.
_EXPORTS = {
    "CurvatureNotPositiveDefinite": "ecif.curvature.solvers.base",
    "CurvatureSolver": "ecif.curvature.solvers.base",
    "ConjugateGradientSolver": "ecif.curvature.solvers.conjugate_gradient",
    "DenseSolver": "ecif.curvature.solvers.dense",
    "FactorStatistics": "ecif.curvature.solvers.kronecker",
    "KroneckerSolver": "ecif.curvature.solvers.kronecker",
    "kronecker_bases": "ecif.curvature.solvers.kronecker",
    "kronecker_statistics": "ecif.curvature.solvers.kronecker",
    "sum_statistics": "ecif.curvature.solvers.kronecker",
    "LowRankSolver": "ecif.curvature.solvers.low_rank",
    "RefinedSolver": "ecif.curvature.solvers.refined",
    "load_solver": "ecif.curvature.solvers.storage",
    "save_solver": "ecif.curvature.solvers.storage",
    "lanczos_smallest_eigenvalue_estimate": "ecif.curvature.products",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SOLVERS", "SOLVER_NAMES", "SolverName", "build_solver", "refuse_ekfac_beyond_heads", *_EXPORTS]  # noqa: PLE0604 (the keys of _EXPORTS: strings)
