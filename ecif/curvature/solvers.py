"""Inverse-curvature solvers behind one interface (ECIF_METHOD §5).

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
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import Tensor

from ecif.curvature.products import (
    CurvatureKind,
    EigenvalueEstimate,
    curvature_product,
    dense_curvature,
    linear_operator,
    smallest_eigenvalue_estimate,
)
from ecif.influence.objective import ContrastiveData, HeadsProblem, HeadsScope, embed
from ecif.progress import Reporter, as_reporter

SolverName = Literal["auto", "dense", "cg", "ekfac", "ekfac-cg", "lowrank-cg"]


@dataclass
class CurvatureConfig:
    """How to invert the curvature.

    ``damping`` (λ) is added on top of ``δ``; at a well-conditioned minimum the Hessian is already
    positive definite and a small λ only guards round-off (bench/fidelity_selected.py measures the effect).
    ``solver="auto"`` takes ``"ekfac-cg"`` for the heads scope (exact influence at any size, in a
    second on the demo where the dense reference takes 30 s to assemble; ``"dense"`` on request) and,
    for the blocks scope, the dense reference up to ``dense_max_params`` parameters and
    ``"lowrank-cg"`` (``low_rank`` eigenpairs) above.
    ``"ekfac-cg"`` solves exactly (to ``cg_tolerance``) by conjugate gradient preconditioned with the
    EK-FAC: influence on a test function as the dense solver gives it, at tens of passes of
    curvature products over the data per test function (see :class:`RefinedSolver`).
    """

    solver: SolverName = "auto"
    kind: CurvatureKind = "hessian"
    damping: float = 1e-4
    dense_max_params: int = 16384
    cg_tolerance: float = 1e-10
    cg_max_iterations: int = 1000
    low_rank: int = 64

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, settings: Mapping[str, object]) -> CurvatureConfig:
        """The config recorded in a run.json; settings that later versions retired are ignored."""
        known = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in settings.items() if key in known})


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


class DenseSolver(CurvatureSolver):
    """Explicit ``(C + λI)`` with a Cholesky factor (the reference solver)."""

    name = "dense"
    _matrix: Tensor | None = None

    def __init__(self, matrix: Tensor, damping: float, kind: CurvatureKind = "hessian"):
        size = matrix.shape[0]
        self.kind = kind
        self.damping = damping
        self.matrix = matrix + damping * torch.eye(size, dtype=matrix.dtype)
        factor, info = torch.linalg.cholesky_ex(self.matrix)
        if int(info) != 0:
            smallest = float(torch.linalg.eigvalsh(self.matrix)[0]) if size <= 4096 else float("nan")
            raise CurvatureNotPositiveDefinite(
                f"the damped {kind} is not positive definite (smallest eigenvalue {smallest:.3g}); "
                "fine-tune to convergence, raise the damping, or use the Gauss-Newton curvature"
            )
        self.factor = factor
        self.smallest_eigenvalue = self._smallest_eigenvalue()

    @classmethod
    def from_factor(cls, factor: Tensor, damping: float, kind: CurvatureKind, smallest_eigenvalue: float) -> DenseSolver:
        """A solver from a stored Cholesky factor (see :func:`save_solver`)."""
        solver = cls.__new__(cls)
        solver.kind, solver.damping, solver.factor = kind, damping, factor
        solver.smallest_eigenvalue = smallest_eigenvalue
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
        vector = torch.randn(self.matrix.shape[0], dtype=self.matrix.dtype, generator=torch.Generator().manual_seed(0))
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


class ConjugateGradientSolver(CurvatureSolver):
    """Matrix-free conjugate gradient with curvature-vector products, many right-hand sides at once.

    ``preconditioner``: a solver whose ``solve`` approximates ``(H + λI)⁻¹`` (e.g. the EK-FAC); the
    iteration may need fewer curvature products (44 against 53 on a demo run), and the answer is
    still the exact one.  Warns when ``max_iterations`` ends the iteration before ``tolerance``.
    """

    name = "cg"

    def __init__(
        self,
        problem: HeadsProblem,
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


@dataclass
class _EmbeddingCurvature:
    """Per-pair Gauss–Newton blocks ``M_kk [e, e]`` of one modality's pre-normalisation embeddings.

    For image ``k``: ``M_kk = c² J_k (Σ_j w_kj v_j v_jᵀ − m_k m_kᵀ) J_k`` with ``w_kj = p_kj +
    q_kj(1 − q_kj)`` from its row softmax ``p_k`` and its entries ``q_k`` in every column softmax,
    ``m_k = Σ_j p_kj v_j``, and ``J_k = (I − u_k u_kᵀ)/‖z_k‖`` the Jacobian of ``normalize``.
    Cross-pair blocks are what K-FAC drops.  The blocks are never formed: since
    ``J_k v_j = (v_j − a_kj u_k)/‖z_k‖`` with ``a_kj = u_k·v_j``, their sum and their diagonals in
    an eigenbasis reduce to ``[B, B] × [B, e]`` and ``[e, B] × [B, e]`` products, ``O(B²e + Be²)``
    per batch instead of ``O(Be³)`` (which would make ViT-B/32 heads, ``e = 512``, unaffordable).
    """

    anchors: Tensor  # u [B, e]
    others: Tensor  # v [B, e]
    omega: Tensor  # w_kj / ‖z_k‖² [B, B]
    cosines: Tensor  # a_kj = u_k·v_j [B, B]
    mean_directions: Tensor  # y_k = J_k m_k [B, e]
    scale: Tensor

    @classmethod
    def of(cls, anchors: Tensor, others: Tensor, pre_norms: Tensor, scale: Tensor, own_rows: Tensor, cross_cols: Tensor) -> _EmbeddingCurvature:
        weights = own_rows + cross_cols * (1.0 - cross_cols)  # [B, B]
        mean = own_rows @ others  # m_k [B, e]
        along = (anchors * mean).sum(dim=1, keepdim=True)
        return cls(
            anchors=anchors,
            others=others,
            omega=weights / pre_norms[:, None] ** 2,
            cosines=anchors @ others.T,
            mean_directions=(mean - along * anchors) / pre_norms[:, None],
            scale=scale,
        )

    def total(self) -> Tensor:
        """``Σ_k M_kk [e, e]``."""
        u, v, y = self.anchors, self.others, self.mean_directions
        cross = u.T @ ((self.omega * self.cosines) @ v)  # Σ_kj ω_kj a_kj u_k v_jᵀ
        own = (self.omega * self.cosines**2).sum(dim=1)
        blocks = (v.T * self.omega.sum(dim=0)) @ v - cross - cross.T + (u.T * own) @ u - y.T @ y
        return self.scale**2 * blocks

    def diagonals(self, basis: Tensor) -> Tensor:
        """``diag(Qᵀ M_kk Q)`` per pair ``[B, e]`` for an orthonormal ``basis`` ``Q [e, e]``."""
        u, v, y = self.anchors @ basis, self.others @ basis, self.mean_directions @ basis
        weighted = self.omega * self.cosines
        own = (self.omega * self.cosines**2).sum(dim=1, keepdim=True)
        blocks = self.omega @ v**2 - 2.0 * u * (weighted @ v) + own * u**2 - y**2
        return self.scale**2 * blocks


FactorStatistics = dict[str, Tensor]
"""Sums over pairs (not yet divided by ``N``) keyed ``"{image,text}.{a,g,eigenvalues}"``: add those of
disjoint sets of batches (chunks, workers) with :func:`sum_statistics` and get those of their union."""


def kronecker_statistics(
    scope: HeadsScope,
    theta: Tensor,
    data: ContrastiveData,
    bases: dict[str, tuple[Tensor, Tensor]] | None = None,
    reporter: Reporter | None = None,
) -> FactorStatistics:
    """EK-FAC statistics of the batches of ``data``, summed over its pairs (a pure function).

    Without ``bases`` (first pass): ``{name}.a = Σ h hᵀ [d, d]`` and ``{name}.g = Σ_k M_kk [e, e]``
    per head.  With ``bases`` (second pass, ``Q_A, Q_G`` per head from the summed first pass):
    ``{name}.eigenvalues = Σ_k (Q_Aᵀh_k)² ⊗ diag(Q_Gᵀ M_kk Q_G) [d, e]``.
    """
    reporter = as_reporter(reporter)
    stage = "curvature (EK-FAC factors)" if bases is None else "curvature (EK-FAC eigenvalues)"
    with torch.no_grad():
        return sum_statistics(
            _batch_statistics(scope, theta, data.image[batch], data.text[batch], bases)
            for batch in reporter.iterate(data.batches, stage)
        )


def _batch_statistics(
    scope: HeadsScope, theta: Tensor, image: Tensor, text: Tensor, bases: dict[str, tuple[Tensor, Tensor]] | None
) -> FactorStatistics:
    """The :func:`kronecker_statistics` of one reference batch."""
    w_image, w_text, _ = scope.split(theta)
    u, v, scale = embed(scope, theta, image, text)
    logits = scale * (u @ v.T)
    rows = torch.softmax(logits, dim=1)
    cols = torch.softmax(logits, dim=0)
    per_modality = {
        "image": (image, _EmbeddingCurvature.of(u, v, (image @ w_image).norm(dim=1), scale, rows, cols)),
        "text": (text, _EmbeddingCurvature.of(v, u, (text @ w_text).norm(dim=1), scale, cols.T, rows.T)),
    }
    statistics: FactorStatistics = {}
    for name, (features, curvature) in per_modality.items():
        if bases is None:
            statistics[f"{name}.a"] = features.T @ features
            statistics[f"{name}.g"] = curvature.total()
        else:
            basis_a, basis_g = bases[name]
            statistics[f"{name}.eigenvalues"] = ((features @ basis_a) ** 2).T @ curvature.diagonals(basis_g)
    return statistics


def sum_statistics(parts: Iterable[FactorStatistics]) -> FactorStatistics:
    """Key-wise sum of the statistics of disjoint sets of batches, in the order given (so a fixed
    order gives bitwise the same sum however the parts were computed)."""
    total: FactorStatistics = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total[key] + value if key in total else value.clone()
    return total


def kronecker_bases(statistics: FactorStatistics) -> dict[str, tuple[Tensor, Tensor]]:
    """Eigenbases ``(Q_A, Q_G)`` per head of the first-pass statistics (scaling does not change them)."""
    return {
        name: (torch.linalg.eigh(statistics[f"{name}.a"])[1], torch.linalg.eigh(statistics[f"{name}.g"])[1])
        for name in ("image", "text")
    }


class KroneckerSolver(CurvatureSolver):
    """EK-FAC for the two projection heads: per head ``A ⊗ G`` eigenbases with corrected eigenvalues.

    ``A = E[h hᵀ]`` (backbone features), ``G = E[M_kk]`` (per-pair Gauss–Newton of the embedding);
    the eigenvalues in the Kronecker eigenbasis are refitted to ``E[(Q_Aᵀh)² ⊗ diag(Q_Gᵀ M_kk Q_G)]``
    (George et al., 2018).  The ``δ`` penalty and ``λ`` are added exactly.  A learnt logit scale gets
    its exact second derivative as a separate 1×1 block.

    The statistics are sums over pairs (:func:`kronecker_statistics`), so they can be computed chunk
    by chunk or on several workers and added (:meth:`from_statistics`; see ``ecif.influence.streaming``).
    """

    name = "ekfac"

    def __init__(self, problem: HeadsProblem, theta: Tensor, damping: float, reporter: Reporter | None = None):
        reporter = as_reporter(reporter)
        scope, data = problem.scope, problem.data
        bases = kronecker_bases(kronecker_statistics(scope, theta, data, reporter=reporter))
        eigenvalues = kronecker_statistics(scope, theta, data, bases, reporter)
        scale_curvature = None
        if scope.learn_logit_scale:
            index = scope.size - 1
            scale_curvature = float(
                torch.func.hessian(lambda value: problem.objective(torch.cat([theta[:index], value.reshape(1)])))(
                    theta[index]
                )
            ) + damping
        self._set(scope, bases, eigenvalues, data.normaliser, problem.delta, damping, scale_curvature)

    @classmethod
    def from_statistics(
        cls,
        scope: HeadsScope,
        bases: dict[str, tuple[Tensor, Tensor]],
        eigenvalue_sums: FactorStatistics,
        normaliser: float,
        delta: float,
        damping: float,
    ) -> KroneckerSolver:
        """The solver from second-pass statistics summed over every batch of ``normaliser`` pairs."""
        if scope.learn_logit_scale:
            raise ValueError("from_statistics covers the two heads only; a learnt logit scale needs the full problem")
        solver = cls.__new__(cls)
        solver._set(scope, bases, eigenvalue_sums, normaliser, delta, damping, None)
        return solver

    def _set(
        self,
        scope: HeadsScope,
        bases: dict[str, tuple[Tensor, Tensor]],
        eigenvalue_sums: FactorStatistics,
        normaliser: float,
        delta: float,
        damping: float,
        scale_curvature: float | None,
    ) -> None:
        self.scope, self.damping, self.delta = scope, damping, delta
        self.bases = bases
        self.eigenvalues = {name: eigenvalue_sums[f"{name}.eigenvalues"] / normaliser for name in bases}
        self.scale_curvature = scale_curvature
        self.smallest_eigenvalue = min(float(v.min()) for v in self.eigenvalues.values()) + delta + damping

    def _split(self, vectors: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        scope = self.scope
        n_image = scope.image_dim * scope.embed_dim
        n_text = scope.text_dim * scope.embed_dim
        image = vectors[:, :n_image].reshape(-1, scope.image_dim, scope.embed_dim)
        text = vectors[:, n_image : n_image + n_text].reshape(-1, scope.text_dim, scope.embed_dim)
        scale = vectors[:, n_image + n_text :] if scope.learn_logit_scale else None
        return image, text, scale

    def _whitened(self, vectors: Tensor) -> list[Tensor]:
        """Coordinates of each block in its eigenbasis divided by the square root of its eigenvalue."""
        image, text, scale = self._split(vectors.reshape(-1, self.scope.size))
        parts = []
        for name, block in (("image", image), ("text", text)):
            basis_a, basis_g = self.bases[name]
            rotated = basis_a.T @ block @ basis_g
            parts.append(rotated / torch.sqrt(self.eigenvalues[name] + self.delta + self.damping))
        if scale is not None:
            parts.append(scale / math.sqrt(self.scale_curvature))
        return parts

    def solve(self, vectors: Tensor) -> Tensor:
        image, text, scale = self._split(vectors.reshape(-1, self.scope.size))
        solved = []
        for name, block in (("image", image), ("text", text)):
            basis_a, basis_g = self.bases[name]
            rotated = basis_a.T @ block @ basis_g / (self.eigenvalues[name] + self.delta + self.damping)
            solved.append((basis_a @ rotated @ basis_g.T).reshape(block.shape[0], -1))
        if scale is not None:
            solved.append(scale / self.scale_curvature)
        return torch.cat(solved, dim=1).reshape(vectors.shape)

    def inverse_quadratic(self, vectors: Tensor) -> Tensor:
        return sum((part**2).reshape(part.shape[0], -1).sum(dim=1) for part in self._whitened(vectors))

    def describe(self) -> dict:
        return {
            "solver": self.name,
            "kind": "ggn (EK-FAC)",
            "damping": self.damping,
            "parameters": self.scope.size,
            "smallest_eigenvalue": self.smallest_eigenvalue,
        }


class LowRankSolver(CurvatureSolver):
    """``(C + λI)⁻¹`` from the top ``k`` eigenpairs of ``C``, the other directions at the penalty's ``δ``.

    ``C`` is ``δI`` plus the data's curvature.  For the Gauss–Newton curvature the data part is
    positive semi-definite, so every eigenvalue is at least ``δ`` and the floor overstates the
    inverse of an unresolved direction by at most ``λ_k/δ``.  The exact Hessian's data part can be
    indefinite even at a minimum, so some unresolved eigenvalues may lie below ``δ`` and their
    inverse is understated; measured against exact solves, self-influence still ranks with Spearman
    0.997–0.999 on 300 demo pairs (bench/blocks.py) and 0.98 on a toy whose smallest eigenvalue is
    a third of ``δ`` (tests/test_blocks.py).  Forming it costs a few hundred curvature products
    (Lanczos, ``which="LA"``); afterwards every solve and quadratic form is two matrix products,
    which is what self-influence (one quadratic form per pair) needs when a solve per pair by
    conjugate gradient is out of reach.  Memory: ``P × k`` float64 (5.6 GB for ViT-B-32's last
    blocks at ``k = 64``), about twice that while Lanczos runs.
    """

    name = "lowrank"

    def __init__(self, eigenvalues: Tensor, eigenvectors: Tensor, floor: float, damping: float, kind: CurvatureKind = "hessian"):
        self.eigenvalues, self.eigenvectors = eigenvalues, eigenvectors
        self.floor, self.damping, self.kind = float(floor), float(damping), kind

    @classmethod
    def of(
        cls, problem: HeadsProblem, theta: Tensor, rank: int, damping: float, kind: CurvatureKind = "hessian"
    ) -> LowRankSolver:
        """Lanczos on the curvature of ``problem`` at ``theta`` (``rank`` eigenpairs, at most ``P − 2``)."""
        from scipy.sparse.linalg import eigsh

        size = theta.numel()
        rank = max(1, min(rank, size - 2))
        operator = linear_operator(curvature_product(problem, theta, kind), size, theta.dtype)
        start = torch.randn(size, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).numpy()
        values, vectors = eigsh(operator, k=rank, which="LA", tol=1e-4, v0=start)
        return cls(torch.as_tensor(values, dtype=theta.dtype), torch.as_tensor(vectors, dtype=theta.dtype), problem.delta, damping, kind)

    def _parts(self, vectors: Tensor) -> tuple[Tensor, Tensor]:
        rows = vectors.reshape(-1, self.eigenvectors.shape[0])
        return rows, rows @ self.eigenvectors

    def solve(self, vectors: Tensor) -> Tensor:
        rows, coordinates = self._parts(vectors)
        inside = (coordinates / (self.eigenvalues + self.damping)) @ self.eigenvectors.T
        outside = (rows - coordinates @ self.eigenvectors.T) / (self.floor + self.damping)
        return (inside + outside).reshape(vectors.shape)

    def inverse_quadratic(self, vectors: Tensor) -> Tensor:
        rows, coordinates = self._parts(vectors)
        inside = (coordinates**2 / (self.eigenvalues + self.damping)).sum(dim=1)
        outside = ((rows * rows).sum(dim=1) - (coordinates**2).sum(dim=1)).clamp(min=0.0) / (self.floor + self.damping)
        return (inside + outside).reshape(vectors.shape[:-1])

    def describe(self) -> dict:
        return {
            "solver": self.name,
            "kind": self.kind,
            "damping": self.damping,
            "parameters": int(self.eigenvectors.shape[0]),
            "rank": int(self.eigenvectors.shape[1]),
            "largest_eigenvalue": float(self.eigenvalues.max()),
            "smallest_resolved_eigenvalue": float(self.eigenvalues.min()),
            "floor": self.floor,
        }


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


def conjugate_gradient(
    problem: HeadsProblem, theta: Tensor, config: CurvatureConfig, preconditioner: CurvatureSolver | None = None
) -> ConjugateGradientSolver:
    """The conjugate gradient that ``config`` describes (damping, curvature kind, tolerance, iterations)."""
    return ConjugateGradientSolver(
        problem, theta, config.damping, config.kind, config.cg_tolerance, config.cg_max_iterations, preconditioner
    )


def refuse_ekfac_beyond_heads(solver: str, scope_kind: str) -> None:
    """EK-FAC factorises linear heads only: a ``ValueError`` naming the solvers that cover ``scope_kind``."""
    if solver.startswith("ekfac") and scope_kind != "heads":
        raise ValueError(f"solver {solver!r}: EK-FAC covers the projection heads only; for the {scope_kind} scope use auto, lowrank-cg, cg or dense")


def build_solver(
    problem: HeadsProblem, theta: Tensor, config: CurvatureConfig | None = None, reporter: Reporter | None = None
) -> CurvatureSolver:
    """The solver that ``config`` asks for.

    ``auto``: ``ekfac-cg`` for the heads scope: the same ``influence`` as the dense reference (to
    1e-11 on the demo) and EK-FAC self-influence (Spearman 0.9996 against the dense one there), at
    a tenth of the time (``bench/first_contact.py``). For the blocks scope (EK-FAC factorises linear
    heads only): dense up to ``dense_max_params``, ``lowrank-cg`` above.
    """
    config = config or CurvatureConfig()
    reporter = as_reporter(reporter)
    name = config.solver
    heads = isinstance(problem.scope, HeadsScope)
    if name == "auto":
        name = "ekfac-cg" if heads else ("dense" if theta.numel() <= config.dense_max_params else "lowrank-cg")
    refuse_ekfac_beyond_heads(name, problem.scope.kind)

    if name == "dense":
        matrix = dense_curvature(problem, theta, config.kind, reporter)
        return DenseSolver(matrix, config.damping, config.kind)
    if name == "cg":
        return conjugate_gradient(problem, theta, config)
    if name == "ekfac":
        return KroneckerSolver(problem, theta, config.damping, reporter)
    if name == "ekfac-cg":
        kronecker = KroneckerSolver(problem, theta, config.damping, reporter)
        return RefinedSolver(kronecker, conjugate_gradient(problem, theta, config, kronecker))
    if name == "lowrank-cg":
        reporter.report("curvature (Lanczos)", 0, 1)
        low_rank = LowRankSolver.of(problem, theta, config.low_rank, config.damping, config.kind)
        reporter.report("curvature (Lanczos)", 1, 1)
        return RefinedSolver(low_rank, conjugate_gradient(problem, theta, config, low_rank))
    raise ValueError(f"unknown solver {name!r}; expected one of auto, dense, cg, ekfac, ekfac-cg, lowrank-cg")


def lanczos_smallest_eigenvalue_estimate(
    problem: HeadsProblem, theta: Tensor, kind: CurvatureKind = "hessian", max_products: int = 800
) -> EigenvalueEstimate:
    """Smallest eigenvalue of the undamped curvature with its Lanczos residual and whether it converged
    (an upper bound when ``max_products`` ran out; see :func:`ecif.curvature.products.smallest_eigenvalue_estimate`)."""
    return smallest_eigenvalue_estimate(curvature_product(problem, theta, kind), theta.numel(), theta.dtype, max_products)


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
    if isinstance(stored, DenseSolver):
        tensors = {"factor": stored.factor.contiguous()}
        extra = {"kind": stored.kind, "smallest_eigenvalue": repr(stored.smallest_eigenvalue)}
    elif isinstance(stored, KroneckerSolver):
        tensors = {}
        for name, (basis_a, basis_g) in stored.bases.items():
            tensors[f"{name}.basis_a"] = basis_a.contiguous()
            tensors[f"{name}.basis_g"] = basis_g.contiguous()
            tensors[f"{name}.eigenvalues"] = stored.eigenvalues[name].contiguous()
        extra = {
            "delta": repr(stored.delta),
            "scale_curvature": repr(stored.scale_curvature),
            "smallest_eigenvalue": repr(stored.smallest_eigenvalue),
            "scope": json.dumps(asdict(stored.scope)),
        }
    elif isinstance(stored, LowRankSolver):
        tensors = {"eigenvalues": stored.eigenvalues.contiguous(), "eigenvectors": stored.eigenvectors.contiguous()}
        extra = {"kind": stored.kind, "floor": repr(stored.floor)}
    else:
        return False
    metadata = {"solver": stored.name, "damping": repr(stored.damping), "fingerprint": fingerprint, "refined": str(int(refined)), **extra}
    temporary = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    temporary.replace(path)
    return True


def load_solver(
    path: Path, fingerprint: str, problem: HeadsProblem | None = None, theta: Tensor | None = None, config: CurvatureConfig | None = None
) -> CurvatureSolver | None:
    """The solver stored by :func:`save_solver`, or None when absent or made for another problem.

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
    tensors = load_file(str(path))
    damping = float(metadata["damping"])
    if metadata["solver"] == DenseSolver.name:
        solver = DenseSolver.from_factor(tensors["factor"], damping, metadata["kind"], float(metadata["smallest_eigenvalue"]))
    elif metadata["solver"] == LowRankSolver.name:
        solver = LowRankSolver(tensors["eigenvalues"], tensors["eigenvectors"], float(metadata["floor"]), damping, metadata["kind"])
    else:
        bases = {n: (tensors[f"{n}.basis_a"], tensors[f"{n}.basis_g"]) for n in ("image", "text")}
        scale = metadata["scale_curvature"]
        solver = KroneckerSolver.__new__(KroneckerSolver)
        # The stored eigenvalues are already divided by N: a normaliser of 1 keeps them as they are.
        solver._set(
            HeadsScope(**json.loads(metadata["scope"])), bases, tensors, 1.0, float(metadata["delta"]), damping,
            None if scale == "None" else float(scale),
        )
    if metadata.get("refined") == "1":
        if problem is None or theta is None or config is None:
            raise ValueError(f"{path} holds a refined solver: pass the problem, theta and config to rebuild its conjugate gradient")
        return RefinedSolver(solver, conjugate_gradient(problem, theta, config, solver))
    return solver
