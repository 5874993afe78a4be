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

from ecif.influence.objective import HeadsProblem, chunk_logits, mask_logits, positive_terms
from ecif.progress import Reporter, as_reporter

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
    problem: HeadsProblem,
    theta: Tensor,
    kind: CurvatureKind = "hessian",
    chunk_size: int = 1024,
    reporter: Reporter | None = None,
) -> Tensor:
    """The full ``[P, P]`` curvature matrix of ``R`` at ``θ`` (symmetric, ``δI`` included).

    Assembled one reference batch at a time in embedding space, which is far cheaper than ``P``
    curvature-vector products through the heads: a batch's loss depends on ``θ`` only through the
    pre-normalisation projections ``z = h W`` ``[B, e]`` of both modalities (and ``ℓ``), so its
    curvature is ``Gᵀ C_z G`` with ``C_z`` the ``[2Be(+1)]²`` curvature in ``z`` (``chunk_size``
    products at a time) and ``G = ∂z/∂θ = h ⊗ I``, applied as two feature contractions.
    """
    reporter = as_reporter(reporter)
    scope, data = problem.scope, problem.data
    w_image, w_text, log_scale = scope.split(theta)
    embed_dim = scope.embed_dim
    n_image = scope.image_dim * embed_dim
    size = theta.numel()
    matrix = torch.zeros(size, size, dtype=theta.dtype)
    for position, rows in enumerate(data.batches):
        image, text = data.image[rows], data.text[rows]
        batch = len(rows)
        flat = torch.cat([(image @ w_image).reshape(-1), (text @ w_text).reshape(-1), log_scale.reshape(1)])

        def batch_logits_of(values: Tensor, batch: int = batch) -> Tensor:
            z_image = values[: batch * embed_dim].reshape(batch, embed_dim)
            z_text = values[batch * embed_dim : 2 * batch * embed_dim].reshape(batch, embed_dim)
            return _logits_from_projections(z_image, z_text, values[-1])

        def batch_loss(values: Tensor) -> Tensor:
            return positive_terms(batch_logits_of(values)).sum()

        if kind == "hessian":
            gradient = grad(batch_loss)

            def product(vector: Tensor) -> Tensor:
                return jvp(gradient, (flat,), (vector,))[1]

        elif kind == "ggn":
            logits, pullback = vjp(batch_logits_of, flat)

            def product(vector: Tensor) -> Tensor:
                tangent = jvp(batch_logits_of, (flat,), (vector,))[1]
                return pullback(_logit_hessian_product(logits, tangent))[0]

        else:
            raise ValueError(f"unknown curvature kind {kind!r}; expected 'hessian' or 'ggn'")
        basis = torch.eye(flat.numel(), dtype=theta.dtype)
        curvature_z = torch.func.vmap(product, chunk_size=chunk_size)(basis)
        curvature_z = 0.5 * (curvature_z + curvature_z.T)
        _add_projected(matrix, curvature_z, image, text, batch, embed_dim, n_image, scope.learn_logit_scale)
        reporter.report("curvature (dense)", position + 1, len(data.batches))
    matrix /= data.normaliser
    matrix += problem.delta * torch.eye(size, dtype=theta.dtype)
    return 0.5 * (matrix + matrix.T)


def _logits_from_projections(z_image: Tensor, z_text: Tensor, log_scale: Tensor) -> Tensor:
    u = torch.nn.functional.normalize(z_image, dim=-1)
    v = torch.nn.functional.normalize(z_text, dim=-1)
    return log_scale.exp() * (u @ v.T)


def _add_projected(
    matrix: Tensor,
    curvature_z: Tensor,
    image: Tensor,
    text: Tensor,
    batch: int,
    embed_dim: int,
    n_image: int,
    learn_logit_scale: bool,
) -> None:
    """``matrix += Gᵀ C_z G`` for ``z_image = image @ W_image``, ``z_text = text @ W_text`` (row-major ``W``)."""
    width = batch * embed_dim
    features = (image, text)
    offsets = (slice(0, n_image), slice(n_image, n_image + text.shape[1] * embed_dim))
    for a in range(2):
        # [B, e, 2Be(+1)] → contract the left batch index with the features: [d, e, 2Be(+1)]
        left = torch.einsum("ik,iaq->kaq", features[a], curvature_z[a * width : (a + 1) * width].reshape(batch, embed_dim, -1))
        left = left.reshape(-1, curvature_z.shape[1])
        for b in range(2):
            right = left[:, b * width : (b + 1) * width].reshape(-1, batch, embed_dim)
            block = torch.einsum("pjb,jl->plb", right, features[b]).reshape(right.shape[0], -1)
            matrix[offsets[a], offsets[b]] += block
        if learn_logit_scale:
            matrix[offsets[a], -1] += left[:, -1]
            matrix[-1, offsets[a]] += left[:, -1]
    if learn_logit_scale:
        matrix[-1, -1] += curvature_z[-1, -1]


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
