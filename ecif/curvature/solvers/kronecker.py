"""EK-FAC (eigenvalue-corrected K-FAC) of the Gauss–Newton matrix of each projection head, and its statistics."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ecif.curvature.solvers.base import CurvatureSolver
from ecif.objective.contrastive import ContrastiveData, ContrastiveProblem, HeadsScope, embed
from ecif.objective.logits import learnt_logit_count
from ecif.progress import Reporter, as_reporter


@dataclass
class _EmbeddingCurvature:
    """Per-pair Gauss–Newton blocks ``M_kk [e, e]`` of one modality's pre-normalisation embeddings.

    For image ``k``: ``M_kk = c² J_k (Σ_j w_kj v_j v_jᵀ − m_k m_kᵀ) J_k`` with ``J_k = (I − u_k u_kᵀ)/‖z_k‖``
    the Jacobian of ``normalize`` and, for the softmax loss, ``w_kj = p_kj + q_kj(1 − q_kj)`` from its
    row softmax ``p_k`` and its entries ``q_k`` in every column softmax, ``m_k = Σ_j p_kj v_j``; for the
    sigmoid loss, whose curvature in the logits is diagonal, ``w_kj = σ(s_kj) σ(−s_kj)`` and ``m_k = 0``.
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
        """Softmax loss: ``own_rows`` the anchors' row softmax, ``cross_cols`` their entries in the others' softmax."""
        weights = own_rows + cross_cols * (1.0 - cross_cols)  # [B, B]
        return cls.weighted(anchors, others, pre_norms, scale, weights, own_rows @ others)

    @classmethod
    def weighted(
        cls, anchors: Tensor, others: Tensor, pre_norms: Tensor, scale: Tensor, weights: Tensor, mean: Tensor
    ) -> _EmbeddingCurvature:
        """From the weights ``w [B, B]`` and the means ``m [B, e]`` (zero for the sigmoid loss) directly."""
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
    u, v, scale = embed(scope, theta, image, text)
    logits = scale * (u @ v.T)
    image_norms, text_norms = scope.project_image(theta, image).norm(dim=1), scope.project_text(theta, text).norm(dim=1)
    if scope.loss == "siglip":
        probabilities = torch.sigmoid(logits + scope.bias(theta))
        weights, no_mean = probabilities * (1.0 - probabilities), torch.zeros_like(u)
        curvatures = (
            _EmbeddingCurvature.weighted(u, v, image_norms, scale, weights, no_mean),
            _EmbeddingCurvature.weighted(v, u, text_norms, scale, weights.T, no_mean),
        )
    else:
        rows = torch.softmax(logits, dim=1)
        cols = torch.softmax(logits, dim=0)
        curvatures = (
            _EmbeddingCurvature.of(u, v, image_norms, scale, rows, cols),
            _EmbeddingCurvature.of(v, u, text_norms, scale, cols.T, rows.T),
        )
    per_modality = {"image": (scope.image_inputs(image), curvatures[0]), "text": (scope.text_inputs(text), curvatures[1])}
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
    its exact second derivative as a separate 1×1 block; a learnt scale and bias (sigmoid loss) are
    refused.

    The statistics are sums over pairs (:func:`kronecker_statistics`), so they can be computed chunk
    by chunk or on several workers and added (:meth:`from_statistics`; see ``ecif.influence.streaming``).
    """

    name = "ekfac"

    def __init__(self, problem: ContrastiveProblem, theta: Tensor, damping: float, reporter: Reporter | None = None):
        reporter = as_reporter(reporter)
        scope, data = problem.scope, problem.data
        if learnt_logit_count(scope) > 1:
            raise ValueError(
                "the EK-FAC solvers do not cover a learnt logit scale and bias (siglip with --learn-logit-scale); "
                "use --solver dense or cg"
            )
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

    def to_stored(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """The tensors and metadata :func:`save_solver` stores: per head its eigenbases and eigenvalues."""
        tensors = {}
        for name, (basis_a, basis_g) in self.bases.items():
            tensors[f"{name}.basis_a"] = basis_a.contiguous()
            tensors[f"{name}.basis_g"] = basis_g.contiguous()
            tensors[f"{name}.eigenvalues"] = self.eigenvalues[name].contiguous()
        return tensors, {
            "delta": repr(self.delta),
            "scale_curvature": repr(self.scale_curvature),
            "smallest_eigenvalue": repr(self.smallest_eigenvalue),
            "scope": json.dumps(asdict(self.scope)),
        }

    @classmethod
    def from_stored(cls, tensors: dict[str, Tensor], metadata: dict[str, str]) -> KroneckerSolver:
        """A solver from its stored eigenbases and eigenvalues (see :func:`save_solver`)."""
        bases = {name: (tensors[f"{name}.basis_a"], tensors[f"{name}.basis_g"]) for name in ("image", "text")}
        scale = metadata["scale_curvature"]
        solver = cls.__new__(cls)
        # The stored eigenvalues are already divided by N: a normaliser of 1 keeps them as they are.
        solver._set(
            HeadsScope(**json.loads(metadata["scope"])), bases, tensors, 1.0, float(metadata["delta"]),
            float(metadata["damping"]), None if scale == "None" else float(scale),
        )
        return solver

    def _split(self, vectors: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Rows of ``vectors [..., P]`` as head blocks ``[k, d, e]`` and ``[k, d', e]``, and the learnt
        logit scale ``[k, 1]`` (None when it is fixed)."""
        image, text, log_scale = torch.func.vmap(self.scope.split)(vectors.reshape(-1, self.scope.size))
        return image, text, log_scale[:, None] if self.scope.learn_logit_scale else None

    def _whitened(self, vectors: Tensor) -> list[Tensor]:
        """Coordinates of each block in its eigenbasis divided by the square root of its eigenvalue."""
        image, text, scale = self._split(vectors)
        parts = []
        for name, block in (("image", image), ("text", text)):
            basis_a, basis_g = self.bases[name]
            rotated = basis_a.T @ block @ basis_g
            parts.append(rotated / torch.sqrt(self.eigenvalues[name] + self.delta + self.damping))
        if scale is not None:
            parts.append(scale / math.sqrt(self.scale_curvature))
        return parts

    def solve(self, vectors: Tensor) -> Tensor:
        image, text, scale = self._split(vectors)
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
