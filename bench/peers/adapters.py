"""Adapters: every method scores every training pair of the same heads problem at the same ``θ̂``.

Common signature: ``score(problem, theta, validation, **options) -> np.ndarray [N]`` in the row
order of ``problem.data``; ``validation`` is the trusted set (:class:`ContrastiveData`, its own
reference batching) and ``φ(θ) = validation_loss(scope, validation)(θ)`` = its mean contrastive loss
``(1/T) Σ_j (a_j + b_j)`` over the ``T`` validation pairs.  Influence-type methods also have a
``matrix(problem, theta, validation) -> [T, N]``: the estimate for each *target* ``φ_j`` = the
validation pair ``j``'s own terms ``a_j + b_j`` in its validation batch (``φ = mean_j φ_j``), which
the linear datamodeling score (LDS) needs.  For the linear methods ``score == matrix.mean(0)``.

Definitions (``g_n^pos = ∇Pos_n(θ̂)``, ``Pos_n = a_n + b_n`` within the pair's reference batch,
including the paths through the other pairs' embeddings in its softmax denominators; ``∇φ`` the
trusted-loss gradient; ``H`` the damped curvature of ``R`` from ECIF's solver):

=====================  ================================================  =========================
method                 value for pair ``n``                              sign / suspicious side
=====================  ================================================  =========================
``ecif_exact``         ``(1/N) ∇(Pos_n+Neg_n)ᵀ H⁻¹ ∇φ`` (ecif)           Δφ; harmful = negative
``ecif_first_order``   same with the first-order ``Neg_n`` (ecif)        Δφ; harmful = negative
``pos_only``           ``(1/N) ∇Pos_nᵀ H⁻¹ ∇φ`` (ecif ``influence_pos``)  Δφ; harmful = negative
``ecif_self``          ``(1/N) ∇g_nᵀ H⁻¹ ∇g_n``, ``g = Pos+Neg`` (ecif)   ≥ 0; high = suspicious
``ecif_self_first``    same with the first-order ``Neg_n`` (ecif)        ≥ 0; high = suspicious
``tracin``             ``(1/N) ∇Pos_nᵀ ∇φ`` (one checkpoint θ̂, H = I)     Δφ with H=I; harmful = neg.
``tracin_self``        ``‖∇Pos_n‖²``                                      ≥ 0; high = suspicious
``trak``               mean over val pairs of TRAK's score (traker)      + = supports; harmful = neg.
``kronfluence``        ``(1/N) mean_j ∇φ_jᵀ (F_EKFAC + δ)⁻¹ ∇Pos_n``      Δφ; harmful = negative
``clip_score``         cosine ``u_n·v_n`` (ecif ``clip_scores``)          low = suspicious
``pair_loss``          ``Pos_n = a_n + b_n`` (ecif ``pair_losses``)       high = suspicious
=====================  ================================================  =========================

Why TracIn's sign is Δφ's: TracIn (Pruthi et al. 2020) is ``η ∇ℓ(z_n)·∇ℓ(z')``; positive =
proponent (a step on ``z_n`` lowers the target loss), so removing it raises ``φ``: valuable, like a
positive Δφ.  With one checkpoint and ``η = 1/N`` it is ECIF's positive part with ``H`` replaced by ``I``.
TRAK's and kronfluence's signs are derived in their modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.func import jacrev

from ecif.objective.contrastive import ContrastiveData, ContrastiveProblem, HeadsScope, batch_logits, batch_pair_terms

Part = Literal["pos", "neg", "neg_first_order"]
PARTS: tuple[Part, ...] = ("pos", "neg", "neg_first_order")


# --- gradients ---------------------------------------------------------------------------------------


def pair_gradients(scope: HeadsScope, theta: Tensor, data: ContrastiveData, parts: tuple[Part, ...] = PARTS) -> dict[str, Tensor]:
    """Per-pair gradients ``[N, P]`` of ``Pos_n`` / ``Neg_n`` (exact) / ``Neg_n`` (first order), row order.

    One reverse-mode Jacobian per reference batch (only the batch's features enter a pair's terms),
    so memory is ``O(B·P)`` per step and ``O(N·P)`` for the result (≈ 50 MB per part at N = 1 000,
    P = 6 144, float64).
    """
    out = {part: torch.zeros(data.n_pairs, theta.numel(), dtype=theta.dtype) for part in parts}
    index = {"pos": 0, "neg": 1, "neg_first_order": 2}
    for batch in data.batches:
        image, text = data.image[batch], data.text[batch]

        def terms(parameters: Tensor, image: Tensor = image, text: Tensor = text) -> tuple[Tensor, ...]:
            every = batch_pair_terms(batch_logits(scope, parameters, image, text), loss=scope.loss)
            return tuple(every[index[part]] for part in parts)

        jacobians = jacrev(terms)(theta)
        for part, jacobian in zip(parts, jacobians):
            out[part][batch] = jacobian
    return out


def target_gradients(scope: HeadsScope, theta: Tensor, validation: ContrastiveData) -> Tensor:
    """``∇φ_j [T, P]``: gradient of each validation pair's own terms ``a_j + b_j`` in its val batch.

    ``mean_j ∇φ_j = ∇φ`` exactly (``φ`` = the trusted-set mean contrastive loss).
    """
    return pair_gradients(scope, theta, validation, ("pos",))["pos"]


def phi_gradient(scope: HeadsScope, theta: Tensor, validation: ContrastiveData) -> Tensor:
    """``∇φ [P]`` of the trusted-set contrastive loss (via ecif's own test function)."""
    from ecif.influence.scores import gradient_of
    from ecif.objective.measurements import validation_loss

    return gradient_of(validation_loss(scope, validation), theta)


# --- ECIF (ours), through ecif's own functions ------------------------------------------------------------


def default_solver(problem: ContrastiveProblem, theta: Tensor, damping: float = 1e-4, kind: str = "hessian"):
    """ECIF's dense reference solver ``(H + λI)`` (the run's stored solver is used by the runner instead)."""
    from ecif.config import CurvatureConfig
    from ecif.curvature.solvers import build_solver

    return build_solver(problem, theta, CurvatureConfig(solver="dense", kind=kind, damping=damping))


def _influence(problem: ContrastiveProblem, theta: Tensor, validation: ContrastiveData, solver=None, damping: float = 1e-4):
    from ecif.influence.scores import influence_on

    solver = solver if solver is not None else default_solver(problem, theta, damping)
    return influence_on(problem, theta, solver, phi_gradient(problem.scope, theta, validation))


def ecif_exact(problem, theta, validation, solver=None, damping: float = 1e-4) -> np.ndarray:
    """ECIF with the exact negative term (ecif ``influence_on(...).influence``): Δφ, harmful < 0."""
    return _influence(problem, theta, validation, solver, damping).influence


def ecif_first_order(problem, theta, validation, solver=None, damping: float = 1e-4) -> np.ndarray:
    """ECIF with the paper's first-order negative term (``influence_first_order``): Δφ, harmful < 0."""
    return _influence(problem, theta, validation, solver, damping).influence_first_order


def pos_only(problem, theta, validation, solver=None, damping: float = 1e-4) -> np.ndarray:
    """Classical (positive-only) influence ``(1/N) ∇Pos_nᵀ H⁻¹ ∇φ`` (ecif ``influence_pos``): Δφ, harmful < 0."""
    return _influence(problem, theta, validation, solver, damping).influence_pos


def ekfac_solver(problem: ContrastiveProblem, theta: Tensor, damping: float = 1e-4):
    """ECIF's Kronecker-factored curvature (EK-FAC of the two heads), built from scratch."""
    from ecif.curvature.solvers import KroneckerSolver

    return KroneckerSolver(problem, theta, damping)


def ecif_ekfac(problem, theta, validation, damping: float = 1e-4) -> np.ndarray:
    """ECIF exact with the EK-FAC curvature instead of the dense one; its build is part of the timed work."""
    return ecif_exact(problem, theta, validation, ekfac_solver(problem, theta, damping), damping)


def ecif_self(
    problem, theta, validation=None, solver=None, damping: float = 1e-4, negative: str = "exact"
) -> np.ndarray:
    """ECIF self-influence ``(1/N) ∇g_nᵀ H⁻¹ ∇g_n`` (ecif ``self_influence``; no trusted set): high = suspicious."""
    from ecif.influence.scores import self_influence

    solver = solver if solver is not None else default_solver(problem, theta, damping)
    return self_influence(problem, theta, solver, negative=negative)


def ecif_self_first_order(problem, theta, validation=None, solver=None, damping: float = 1e-4) -> np.ndarray:
    """ECIF self-influence with the first-order ``Neg_n`` (ecif ``self_influence_first_order``)."""
    return ecif_self(problem, theta, validation, solver, damping, negative="first_order")


def _ecif_matrix(problem, theta, validation, solver=None, damping: float = 1e-4, form: str = "exact") -> np.ndarray:
    """``[T, N]``: ``(1/N) ∇(...)_nᵀ H⁻¹ ∇φ_j`` per target ``j`` (one solve per target, then a matmul)."""
    solver = solver if solver is not None else default_solver(problem, theta, damping)
    directions = solver.solve(target_gradients(problem.scope, theta, validation))  # [T, P]
    parts = {"exact": ("pos", "neg"), "first_order": ("pos", "neg_first_order"), "pos": ("pos",)}[form]
    gradients = pair_gradients(problem.scope, theta, problem.data, parts)
    total = sum(gradients[p] for p in parts)
    return (directions @ total.T / problem.data.normaliser).numpy()


# --- TracIn (single checkpoint) ------------------------------------------------------------------------


def tracin(problem, theta, validation) -> np.ndarray:
    """TracIn at the one checkpoint ``θ̂``: ``(1/N) ∇Pos_n(θ̂)·∇φ(θ̂)``; Δφ with ``H = I``, harmful < 0.

    ``Pos_n`` is the pair's own loss ``a_n + b_n`` inside its reference batch (its full gradient,
    including the paths through the other pairs' embeddings in its softmax denominators).
    """
    gradients = pair_gradients(problem.scope, theta, problem.data, ("pos",))["pos"]
    return (gradients @ phi_gradient(problem.scope, theta, validation) / problem.data.normaliser).numpy()


def tracin_matrix(problem, theta, validation) -> np.ndarray:
    """``[T, N]`` TracIn against each validation pair's own loss."""
    gradients = pair_gradients(problem.scope, theta, problem.data, ("pos",))["pos"]
    return (target_gradients(problem.scope, theta, validation) @ gradients.T / problem.data.normaliser).numpy()


def tracin_self(problem, theta, validation=None) -> np.ndarray:
    """TracIn self-influence ``‖∇Pos_n(θ̂)‖²`` (one checkpoint, no learning rate): high = suspicious."""
    gradients = pair_gradients(problem.scope, theta, problem.data, ("pos",))["pos"]
    return (gradients**2).sum(dim=1).numpy()


# --- cheap baselines (ecif's own functions) ------------------------------------------------------------


def clip_score(problem, theta, validation=None) -> np.ndarray:
    """CLIP-score: cosine of each pair's image and caption under the heads (ecif ``clip_scores``); low = suspicious."""
    from ecif.objective.contrastive import clip_scores

    with torch.no_grad():
        return clip_scores(problem.scope, theta, problem.data.image, problem.data.text).numpy()


def pair_loss(problem, theta, validation=None) -> np.ndarray:
    """The pair's own contrastive loss ``a_n + b_n`` in its batch (ecif ``pair_losses``); high = suspicious."""
    from ecif.objective.contrastive import pair_losses

    with torch.no_grad():
        return pair_losses(problem.scope, theta, problem.data).numpy()


# --- peers through their own libraries (lazy imports) ------------------------------------------------------


def trak(problem, theta, validation, **options) -> np.ndarray:
    """TRAK via ``traker`` (see :mod:`bench.peers.trak_adapter`); mean over validation targets."""
    from bench.peers.trak_adapter import trak_matrix

    return trak_matrix(problem, theta, validation, **options).mean(axis=0)


def trak_matrix(problem, theta, validation, **options) -> np.ndarray:
    from bench.peers.trak_adapter import trak_matrix as compute

    return compute(problem, theta, validation, **options)


def kronfluence_ekfac(problem, theta, validation, **options) -> np.ndarray:
    """kronfluence EK-FAC (see :mod:`bench.peers.kronfluence_adapter`); mean over validation targets."""
    from bench.peers.kronfluence_adapter import kronfluence_matrix

    return kronfluence_matrix(problem, theta, validation, **options).mean(axis=0)


def kronfluence_matrix(problem, theta, validation, **options) -> np.ndarray:
    from bench.peers.kronfluence_adapter import kronfluence_matrix as compute

    return compute(problem, theta, validation, **options)


# --- registry ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One scoring method.  ``suspicious`` = +1 if high values are suspicious, −1 if low ones are
    (all Δφ-type methods: −1, harmful = negative).  ``uses_solver``: takes ECIF's ``solver``."""

    name: str
    label: str
    score: Callable[..., np.ndarray]
    suspicious: float
    kind: Literal["influence", "diagnostic"]
    matrix: Callable[..., np.ndarray] | None = None
    uses_solver: bool = False
    requires: tuple[str, ...] = field(default=())

    def available(self) -> tuple[bool, str]:
        """Whether the libraries it needs import (reason when not)."""
        import importlib

        for module in self.requires:
            try:
                importlib.import_module(module)
            except Exception as error:  # ImportError or a broken install
                return False, f"{module} does not import: {type(error).__name__}: {error}"
        return True, ""

    def suspicion(self, values: np.ndarray) -> np.ndarray:
        """Higher = more suspicious (for detection metrics and "remove top k%")."""
        return self.suspicious * np.asarray(values, dtype=float)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ecif_exact", "ECIF exact (ours)", ecif_exact, -1.0, "influence",
               lambda p, t, v, solver=None, **o: _ecif_matrix(p, t, v, solver, form="exact"), uses_solver=True),
        Method("ecif_first_order", "ECIF first order (ours)", ecif_first_order, -1.0, "influence",
               lambda p, t, v, solver=None, **o: _ecif_matrix(p, t, v, solver, form="first_order"), uses_solver=True),
        Method("pos_only", "positive-only IF", pos_only, -1.0, "influence",
               lambda p, t, v, solver=None, **o: _ecif_matrix(p, t, v, solver, form="pos"), uses_solver=True),
        Method("ecif_ekfac", "ECIF exact, EK-FAC curvature (ours)", ecif_ekfac, -1.0, "influence",
               lambda p, t, v, **o: _ecif_matrix(p, t, v, ekfac_solver(p, t), form="exact")),
        Method("ecif_self", "ECIF self-influence (ours)", ecif_self, 1.0, "diagnostic", uses_solver=True),
        Method("ecif_self_first", "ECIF self-influence, first order (ours)", ecif_self_first_order, 1.0, "diagnostic",
               uses_solver=True),
        Method("tracin", "TracIn (1 ckpt)", tracin, -1.0, "influence", lambda p, t, v, **o: tracin_matrix(p, t, v)),
        Method("tracin_self", "TracIn self-influence", tracin_self, 1.0, "diagnostic"),
        Method("trak", "TRAK (traker)", trak, -1.0, "influence", trak_matrix, requires=("trak",)),
        Method("kronfluence", "kronfluence EK-FAC", kronfluence_ekfac, -1.0, "influence", kronfluence_matrix,
               requires=("kronfluence",)),
        Method("clip_score", "CLIP-score", clip_score, -1.0, "diagnostic"),
        Method("pair_loss", "pair loss", pair_loss, 1.0, "diagnostic"),
    )
}


def method_names() -> list[str]:
    return list(METHODS)
