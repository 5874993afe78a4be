"""Conjugate gradient: matrix-free solves, one curvature-vector product per iteration."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ecif.config import CurvatureConfig, CurvatureKind
from ecif.curvature.products import curvature_product
from ecif.curvature.solvers.base import CurvatureNotPositiveDefinite, CurvatureSolver
from ecif.objective.contrastive import ContrastiveProblem


class ConjugateGradientSolver(CurvatureSolver):
    """Matrix-free conjugate gradient with curvature-vector products, many right-hand sides at once.

    ``preconditioner``: a solver whose ``solve`` approximates ``(H + λI)⁻¹`` (e.g. the EK-FAC); the
    iteration may need fewer curvature products (44 against 53 on a demo run), and the answer is
    still the exact one.  Warns when ``max_iterations`` ends the iteration before ``tolerance``.
    """

    name = "cg"

    def __init__(
        self,
        problem: ContrastiveProblem,
        theta: Tensor,
        damping: float,
        kind: CurvatureKind = "hessian",
        tolerance: float = 1e-10,
        max_iterations: int = 1000,
        preconditioner: CurvatureSolver | None = None,
    ):
        base = curvature_product(problem, theta, kind)
        self.product = torch.func.vmap(lambda vector: base(vector) + damping * vector)
        self.size = theta.numel()
        self.kind, self.damping = kind, damping
        self.tolerance, self.max_iterations = tolerance, max_iterations
        self.preconditioner = preconditioner
        self.last_iterations = 0

    @classmethod
    def from_config(
        cls, problem: ContrastiveProblem, theta: Tensor, config: CurvatureConfig, preconditioner: CurvatureSolver | None = None
    ) -> ConjugateGradientSolver:
        """The conjugate gradient that ``config`` describes (damping, curvature kind, tolerance, iterations)."""
        return cls(problem, theta, config.damping, config.kind, config.cg_tolerance, config.cg_max_iterations, preconditioner)

    def _precondition(self, residual: Tensor) -> Tensor:
        return residual if self.preconditioner is None else self.preconditioner.solve(residual)

    def solve(self, vectors: Tensor) -> Tensor:
        rhs = vectors.reshape(-1, self.size)
        solution = torch.zeros_like(rhs)
        residual = rhs.clone()
        preconditioned = self._precondition(residual)
        direction = preconditioned.clone()
        residual_dot = (residual * preconditioned).sum(dim=1)
        target = self.tolerance**2 * torch.clamp((rhs * rhs).sum(dim=1), min=1e-300)
        for iteration in range(1, self.max_iterations + 1):
            active = (residual * residual).sum(dim=1) > target
            if not bool(active.any()):
                break
            curved = self.product(direction)
            curvature = (direction * curved).sum(dim=1)
            if bool((curvature[active] <= 0).any()):
                raise CurvatureNotPositiveDefinite(
                    f"conjugate gradient met negative curvature ({self.kind}, damping {self.damping}); "
                    "raise the damping or use the Gauss-Newton curvature"
                )
            step = torch.where(active, residual_dot / torch.where(active, curvature, 1.0), 0.0)
            solution = solution + step[:, None] * direction
            residual = residual - step[:, None] * curved
            preconditioned = self._precondition(residual)
            new_dot = (residual * preconditioned).sum(dim=1)
            ratio = torch.where(active, new_dot / torch.clamp(residual_dot, min=1e-300), 0.0)
            direction = preconditioned + ratio[:, None] * direction
            residual_dot = new_dot
            self.last_iterations = iteration
        reached = ((residual * residual).sum(dim=1) / torch.clamp((rhs * rhs).sum(dim=1), min=1e-300)).sqrt()
        if bool((reached > self.tolerance).any()):
            warnings.warn(
                f"conjugate gradient stopped after {self.max_iterations} iterations at a relative residual of "
                f"{float(reached.max()):.1e} (tolerance {self.tolerance:.0e}); raise cg_max_iterations",
                stacklevel=2,
            )
        return solution.reshape(vectors.shape)

    def inverse_quadratic(self, vectors: Tensor) -> Tensor:
        return (vectors * self.solve(vectors)).sum(dim=-1)

    def describe(self) -> dict:
        return {
            "solver": self.name,
            "kind": self.kind,
            "damping": self.damping,
            "parameters": self.size,
            "tolerance": self.tolerance,
            "last_iterations": self.last_iterations,
        }
