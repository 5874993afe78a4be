"""What every solver answers (:class:`CurvatureSolver`) and the error of a curvature it cannot invert."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class CurvatureSolver(Protocol):
    name: str

    def solve(self, vectors: Tensor) -> Tensor:
        """``(C + λI)⁻¹ v`` for ``v [P]`` or each row of ``v [k, P]``."""
        ...

    def inverse_quadratic(self, vectors: Tensor) -> Tensor:
        """``vᵀ (C + λI)⁻¹ v`` for each row of ``vectors [k, P]`` → ``[k]``."""
        ...

    def solve_per_pair(self, vectors: Tensor) -> Tensor:
        """``(C + λI)⁻¹ v`` for many right-hand sides at once, one per training pair: ``[k, P]`` → ``[k, P]``.

        The solvers here inherit this default, :meth:`solve`; a :class:`RefinedSolver` answers with
        its approximation instead, as it does :meth:`inverse_quadratic`: exact conjugate-gradient
        solves, one per pair, would cost passes over the data quadratic in ``N``.
        """
        return self.solve(vectors)

    def describe(self) -> dict:
        """Facts worth recording in run.json (solver, sizes, smallest eigenvalue when known)."""
        ...


class CurvatureNotPositiveDefinite(RuntimeError):
    """The damped curvature has a non-positive eigenvalue; the influence estimate would be meaningless."""
