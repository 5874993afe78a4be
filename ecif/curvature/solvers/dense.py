"""The dense solver: the assembled curvature and its Cholesky factor, the reference for the others."""

from __future__ import annotations

import torch
from torch import Tensor

from ecif.config import CurvatureKind
from ecif.curvature.solvers.base import CurvatureNotPositiveDefinite, CurvatureSolver


class DenseSolver(CurvatureSolver):
    """Explicit ``(C + λI)`` with a Cholesky factor (the reference solver)."""

    name = "dense"
    _matrix: Tensor | None = None

    def __init__(self, matrix: Tensor, damping: float, kind: CurvatureKind = "hessian"):
        size = matrix.shape[0]
        self.kind = kind
        self.damping = damping
        self.matrix = matrix + damping * torch.eye(size, dtype=matrix.dtype, device=matrix.device)
        factor, info = torch.linalg.cholesky_ex(self.matrix)
        if int(info) != 0:
            smallest = float(torch.linalg.eigvalsh(self.matrix)[0]) if size <= 4096 else float("nan")
            raise CurvatureNotPositiveDefinite(
                f"the damped {kind} is not positive definite (smallest eigenvalue {smallest:.3g}); "
                "fine-tune to convergence, raise the damping, or use the Gauss-Newton curvature"
            )
        self.factor = factor
        self.smallest_eigenvalue = self._smallest_eigenvalue()

    def to_stored(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """The tensors and metadata :func:`save_solver` stores: the Cholesky factor."""
        return {"factor": self.factor.contiguous()}, {"kind": self.kind, "smallest_eigenvalue": repr(self.smallest_eigenvalue)}

    @classmethod
    def from_stored(cls, tensors: dict[str, Tensor], metadata: dict[str, str]) -> DenseSolver:
        """A solver from a stored Cholesky factor (see :func:`save_solver`)."""
        solver = cls.__new__(cls)
        solver.kind, solver.damping, solver.factor = metadata["kind"], float(metadata["damping"]), tensors["factor"]
        solver.smallest_eigenvalue = float(metadata["smallest_eigenvalue"])
        return solver

    @property
    def matrix(self) -> Tensor:
        """``C + λI`` (rebuilt from the factor when the solver was loaded from disk)."""
        if self._matrix is None:
            self._matrix = self.factor @ self.factor.T
        return self._matrix

    @matrix.setter
    def matrix(self, value: Tensor) -> None:
        self._matrix = value

    def _smallest_eigenvalue(self, iterations: int = 50) -> float:
        """Exact for small matrices; else a Rayleigh quotient after inverse iteration with the
        Cholesky factor (cheap; an upper bound, close when the smallest eigenvalue is isolated)."""
        if self.matrix.shape[0] <= 4096:
            return float(torch.linalg.eigvalsh(self.matrix)[0])
        # Drawn on the CPU: the same start, hence the same estimate, on every device.
        vector = torch.randn(self.matrix.shape[0], dtype=self.matrix.dtype, generator=torch.Generator().manual_seed(0)).to(self.matrix.device)
        for _ in range(iterations):
            vector = self.solve(vector)
            vector = vector / vector.norm()
        return float(vector @ self.matrix @ vector)

    def solve(self, vectors: Tensor) -> Tensor:
        columns = vectors.reshape(-1, vectors.shape[-1]).T
        return torch.cholesky_solve(columns, self.factor).T.reshape(vectors.shape)

    def inverse_quadratic(self, vectors: Tensor) -> Tensor:
        whitened = torch.linalg.solve_triangular(self.factor, vectors.T, upper=False)
        return (whitened**2).sum(dim=0)

    def describe(self) -> dict:
        return {
            "solver": self.name,
            "kind": self.kind,
            "damping": self.damping,
            "parameters": int(self.factor.shape[0]),
            "smallest_eigenvalue": self.smallest_eigenvalue,
        }
