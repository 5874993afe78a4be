"""Refined solvers (``"ekfac-cg"``, ``"lowrank-cg"``): exact solves by preconditioned conjugate gradient."""

from __future__ import annotations

from torch import Tensor

from ecif.config import CurvatureConfig
from ecif.curvature.solvers.base import CurvatureSolver
from ecif.curvature.solvers.conjugate_gradient import ConjugateGradientSolver
from ecif.curvature.solvers.kronecker import KroneckerSolver
from ecif.curvature.solvers.low_rank import LowRankSolver
from ecif.objective.contrastive import ContrastiveProblem


class RefinedSolver(CurvatureSolver):
    """Exact solves by conjugate gradient preconditioned with an approximation whose quadratic forms it keeps.

    ``solve`` (influence on a test function, trace-back) agrees with the dense solver to the CG
    tolerance, at one pass of curvature products over the data per iteration (with the EK-FAC: 44
    iterations on the pretrained-pool demo run, against 53 for plain CG, where the EK-FAC alone ranks
    influence with Spearman 0.87 against the dense Hessian and 0.92 against the dense Gauss-Newton;
    it drops the image-text cross block and the non-Kronecker part of each head's block).
    ``inverse_quadratic`` (self-influence) and ``solve_per_pair`` (Euclidean step norms), one per
    pair, stay the approximation's: exact answers would cost a CG solve per pair, i.e. passes over
    the data quadratic in ``N``.
    """

    def __init__(self, approximate: KroneckerSolver | LowRankSolver, refined: ConjugateGradientSolver):
        self.approximate, self.refined = approximate, refined
        self.damping = approximate.damping
        self.name = f"{approximate.name}-cg"

    @classmethod
    def around(
        cls, approximate: KroneckerSolver | LowRankSolver, problem: ContrastiveProblem, theta: Tensor, config: CurvatureConfig
    ) -> RefinedSolver:
        """``approximate`` refined by the conjugate gradient that ``config`` describes, preconditioned with it."""
        return cls(approximate, ConjugateGradientSolver.from_config(problem, theta, config, approximate))

    def solve(self, vectors: Tensor) -> Tensor:
        return self.refined.solve(vectors)

    def inverse_quadratic(self, vectors: Tensor) -> Tensor:
        return self.approximate.inverse_quadratic(vectors)

    def solve_per_pair(self, vectors: Tensor) -> Tensor:
        return self.approximate.solve(vectors)

    def describe(self) -> dict:
        approximate = {f"{self.approximate.name}_{key}": value for key, value in self.approximate.describe().items() if key not in ("solver", "kind", "damping", "parameters")}
        quadratic = "ggn (EK-FAC)" if isinstance(self.approximate, KroneckerSolver) else f"{self.approximate.kind} (rank {approximate['lowrank_rank']})"
        return {
            "parameters": self.refined.size,
            "damping": self.damping,
            **approximate,
            "solver": self.name,
            "kind": f"{self.refined.kind} (solves: {self.approximate.name.upper()}-preconditioned CG); {quadratic} for self-influence",
            "tolerance": self.refined.tolerance,
            "last_iterations": self.refined.last_iterations,
        }
