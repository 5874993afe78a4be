"""Curvature-vector products of ``R`` (ECIF_METHOD §5): exact Hessian and Gauss–Newton.

Both are matrix-free: ``product(problem, theta)`` returns a function ``v [P] → C v [P]`` that also
works under ``torch.func.vmap`` (many vectors at once), which is how the dense matrix is assembled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp

from ecif.influence.objective import HeadsProblem, chunk_logits, mask_logits

CurvatureKind = Literal["hessian", "ggn"]
Product = Callable[[Tensor], Tensor]


def hessian_product(problem: HeadsProblem, theta: Tensor) -> Product:
    """``v ↦ ∇²R(θ) v`` by forward-over-reverse differentiation (exact, possibly indefinite)."""
    gradient = grad(problem.objective)

    def product(vector: Tensor) -> Tensor:
        return jvp(gradient, (theta,), (vector,))[1]

    return product


def _logit_hessian_product(logits: Tensor, tangent: Tensor) -> Tensor:
    """Hessian of ``Σ_i (lse_row_i + lse_col_i)`` with respect to masked logits ``S``, applied to ``dS``.

    Each row (and column) softmax cross-entropy has Hessian ``diag(p) − p pᵀ``; ``−2 S_ii`` is linear.
    Padded entries have probability exactly 0, so they contribute nothing.
    """
    rows = torch.softmax(logits, dim=-1)
    cols = torch.softmax(logits, dim=-2)
    row_part = rows * tangent - rows * (rows * tangent).sum(dim=-1, keepdim=True)
    col_part = cols * tangent - cols * (cols * tangent).sum(dim=-2, keepdim=True)
    return row_part + col_part


def gauss_newton_product(problem: HeadsProblem, theta: Tensor) -> Product:
    """``v ↦ (Jᵀ ∇²_S L J + δI) v`` with ``J = ∂S/∂θ`` per batch: positive semi-definite (+δ)."""
    scope, data = problem.scope, problem.data

    def product(vector: Tensor) -> Tensor:
        total = problem.delta * vector
        for chunk in data.chunks():

            def logits_of(parameters: Tensor, chunk: slice = chunk) -> Tensor:
                logits, mask = chunk_logits(scope, parameters, data, chunk)
                return mask_logits(logits, mask)

            logits, tangent = jvp(logits_of, (theta,), (vector,))
            _, pullback = vjp(logits_of, theta)
            total = total + pullback(_logit_hessian_product(logits, tangent))[0] / data.normaliser
        return total

    return product


def curvature_product(problem: HeadsProblem, theta: Tensor, kind: CurvatureKind = "hessian") -> Product:
    if kind == "hessian":
        return hessian_product(problem, theta)
    if kind == "ggn":
        return gauss_newton_product(problem, theta)
    raise ValueError(f"unknown curvature kind {kind!r}; expected 'hessian' or 'ggn'")


def dense_curvature(
    problem: HeadsProblem, theta: Tensor, kind: CurvatureKind = "hessian", chunk_size: int = 256
) -> Tensor:
    """The full ``[P, P]`` curvature matrix, assembled ``chunk_size`` columns at a time (symmetrised)."""
    product = torch.func.vmap(curvature_product(problem, theta, kind))
    size = theta.numel()
    matrix = torch.empty(size, size, dtype=theta.dtype)
    for start in range(0, size, chunk_size):
        stop = min(size, start + chunk_size)
        basis = torch.zeros(stop - start, size, dtype=theta.dtype)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        matrix[start:stop] = product(basis)
    return 0.5 * (matrix + matrix.T)


def smallest_eigenvalue(
    product: Product, size: int, dtype: torch.dtype = torch.float64, max_products: int = 800
) -> float:
    """Smallest (algebraic) eigenvalue of a symmetric operator by Lanczos (``scipy eigsh``).

    The cost is bounded by ``max_products`` operator products: the low end of a penalised
    contrastive Hessian is clustered near ``δ``, where Lanczos converges slowly, and a report needs
    the sign and rough size, not ten digits.  Without convergence the smallest Ritz value is returned.
    """
    import numpy as np
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    def matvec(vector: np.ndarray) -> np.ndarray:
        return product(torch.as_tensor(vector.ravel(), dtype=dtype)).detach().numpy()

    if size <= 64:
        dense = np.stack([matvec(column) for column in np.eye(size)], axis=1)
        return float(np.linalg.eigvalsh(0.5 * (dense + dense.T))[0])
    operator = LinearOperator((size, size), matvec=matvec, dtype=np.float64)
    subspace = min(size - 1, 40)
    start = np.random.default_rng(0).standard_normal(size)
    try:
        values = eigsh(
            operator, k=1, which="SA", tol=1e-3, ncv=subspace, maxiter=max(1, max_products // subspace),
            v0=start, return_eigenvectors=False,
        )
    except ArpackNoConvergence as partial:
        values = partial.eigenvalues
        if not len(values):
            return float("nan")
    return float(np.min(values))
