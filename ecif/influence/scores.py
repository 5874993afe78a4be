"""Per-pair ECIF influence (docs/method.md §2–3) and the set estimates and edits of §4.

Sign convention everywhere: ``influence = Δφ`` if the pair is removed.  Negative means removing the
pair lowers the test loss, so the pair is **harmful**; positive means it is **valuable**.

Efficiency: with ``s = H⁻¹∇φ`` solved once, ``Δφ_n = (1/N) ∇(Pos_n + Neg_n)ᵀ s`` for every ``n`` is
the directional derivative of the per-pair removal terms along ``s``: a single forward-mode pass
over the data (``torch.func.jvp``), batch by batch, with memory bounded by the reference batch size.
Per-pair gradients (for self-influence and step norms) are formed one batch at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.func import jacrev, jvp, vjp

from ecif.curvature.solvers import CurvatureSolver
from ecif.objective.contrastive import (
    ContrastiveProblem,
    batch_logits,
    batch_pair_terms,
    contrastive_sum,
    pair_terms,
)
from ecif.progress import Reporter, as_reporter

NegativeForm = Literal["exact", "first_order"]


@dataclass
class PairInfluence:
    """Predicted ``Δφ`` per training pair ``[N]`` and its parts (same units as ``φ``)."""

    influence: np.ndarray
    influence_pos: np.ndarray
    influence_neg: np.ndarray
    influence_first_order: np.ndarray
    influence_neg_first_order: np.ndarray


def influence_along(problem: ContrastiveProblem, theta: Tensor, direction: Tensor) -> PairInfluence:
    """``(1/N) ∇(Pos_n + Neg_n)ᵀ direction`` for every pair, given ``direction = H⁻¹∇φ [P]``."""
    scope, data = problem.scope, problem.data
    with torch.no_grad():
        _, tangents = jvp(lambda parameters: pair_terms(scope, parameters, data), (theta,), (direction,))
    n = data.normaliser
    pos = (tangents["pos"] / n).cpu().numpy()
    neg = (tangents["neg"] / n).cpu().numpy()
    neg_first = (tangents["neg_first_order"] / n).cpu().numpy()
    return PairInfluence(
        influence=pos + neg,
        influence_pos=pos,
        influence_neg=neg,
        influence_first_order=pos + neg_first,
        influence_neg_first_order=neg_first,
    )


def influence_on(problem: ContrastiveProblem, theta: Tensor, solver: CurvatureSolver, test_gradient: Tensor) -> PairInfluence:
    """Every pair's predicted change of the test function whose gradient at ``θ̂`` is ``test_gradient``."""
    return influence_along(problem, theta, solver.solve(test_gradient))


def gradient_of(function, theta: Tensor) -> Tensor:
    """``∇φ(θ)`` of a test function ``θ [P] → scalar``."""
    return torch.func.grad(function)(theta)


def per_pair_gradients(
    problem: ContrastiveProblem, theta: Tensor, negative: NegativeForm = "exact"
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(rows [B], gradients [B, P])`` of ``Pos_n + Neg_n`` one reference batch at a time.

    Only the batch's own features enter each Jacobian, so the cost is ``O(N·B)`` products and the
    memory ``O(B·P)``, never ``O(N·P)``.
    """
    scope, data = problem.scope, problem.data
    index = 1 if negative == "exact" else 2
    for batch in data.batches:
        image, text = data.image[batch], data.text[batch]

        def removal_terms(parameters: Tensor, image: Tensor = image, text: Tensor = text) -> Tensor:
            terms = batch_pair_terms(batch_logits(scope, parameters, image, text), loss=scope.loss)
            return terms[0] + terms[index]

        yield batch, jacrev(removal_terms)(theta)


def self_influence(
    problem: ContrastiveProblem,
    theta: Tensor,
    solver: CurvatureSolver,
    reporter: Reporter | None = None,
    negative: NegativeForm = "exact",
) -> np.ndarray:
    """``(1/N) ∇g_nᵀ H⁻¹ ∇g_n`` per pair ``[N]`` (``g = Pos + Neg``; ≥ 0; high = suspicious).

    It is the predicted rise of the pair's own removal terms if it were left out: a mislabel signal
    that needs no trusted set.  With ``negative="exact"``, ``sqrt(self_influence / N)`` is also
    ``‖Δθ_n‖`` in the ``H`` metric.  ``negative="first_order"`` takes ``Neg_n`` in its first-order
    form ``Σ p``: bench/detect measured it the better mislabel detector in every setting (the exact
    ``−Σ log(1−p)`` gradient adds a term that is large for confidently separated negatives, which
    says little about whether the pair's own caption is wrong).
    """
    reporter = as_reporter(reporter)
    values = torch.zeros(problem.data.n_pairs, dtype=theta.dtype, device=theta.device)
    batches = per_pair_gradients(problem, theta, negative)
    stage = "self-influence" if negative == "exact" else "self-influence (first order)"
    for rows, gradients in reporter.iterate(batches, stage, total=len(problem.data.batches)):
        values[rows] = solver.inverse_quadratic(gradients) / problem.data.normaliser
    return values.cpu().numpy()


def euclidean_step_norms(problem: ContrastiveProblem, theta: Tensor, solver: CurvatureSolver) -> np.ndarray:
    """``‖Δθ_n‖₂ = (1/N)‖H⁻¹∇g_n‖`` per pair ``[N]`` (the Euclidean option of the relative score).

    The solves go through ``solver.solve_per_pair``: a refined solver answers them with its
    approximation, as it does self-influence (see :class:`ecif.curvature.solvers.RefinedSolver`).
    """
    values = torch.zeros(problem.data.n_pairs, dtype=theta.dtype, device=theta.device)
    for rows, gradients in per_pair_gradients(problem, theta):
        values[rows] = solver.solve_per_pair(gradients).norm(dim=1) / problem.data.normaliser
    return values.cpu().numpy()


def relative_influence(influence: np.ndarray, step_norms: np.ndarray) -> np.ndarray:
    """RelatIF: ``Δφ_n / ‖Δθ_n‖`` so that a few high-leverage pairs do not top every query."""
    return influence / np.maximum(step_norms, 1e-300)


# --- sets of pairs and edits (docs/method.md §4) ---------------------------------------------------------


def additive_set_gradient(problem: ContrastiveProblem, theta: Tensor, rows: list[int] | np.ndarray) -> Tensor:
    """``(1/N) Σ_{n∈D*} ∇(Pos_n + Neg_n)``, so that ``Σ Δθ_n = H⁻¹ ·`` this (the additive estimate)."""
    scope, data = problem.scope, problem.data
    cotangent = torch.zeros(data.n_pairs, dtype=theta.dtype, device=theta.device)
    cotangent[torch.as_tensor(np.asarray(rows, dtype=np.int64), device=theta.device)] = 1.0 / data.normaliser
    _, pullback = vjp(lambda parameters: pair_terms(scope, parameters, data)["pos"], theta)
    positive = pullback(cotangent)[0]
    _, pullback = vjp(lambda parameters: pair_terms(scope, parameters, data)["neg"], theta)
    return positive + pullback(cotangent)[0]


def edit_gradient(
    problem: ContrastiveProblem, theta: Tensor, drop_rows=(), new_text: dict[int, Tensor] | None = None
) -> Tensor:
    """``−∇ΔR(θ)`` for an edit (removals, relabels), with ``ΔR = (Σ_edited − Σ_original)/N``.

    For pure removals ``ΔR`` is the group estimate of docs/method.md §4: the exact change of the
    objective, also for pairs sharing a batch (a row's negative term becomes
    ``log(1 − Σ_{n∈D*} P_kn)``); a relabel is the removal of the old pair plus the addition of the
    new caption in the same batch slot.  The parameter response ``Δθ ≈ H⁻¹ ·`` this is first order.
    """
    edited, _ = problem.data.edited(drop_rows, new_text)
    scope = problem.scope

    def change(parameters: Tensor) -> Tensor:
        return (contrastive_sum(scope, parameters, edited) - contrastive_sum(scope, parameters, problem.data)) / (
            problem.data.normaliser
        )

    return -torch.func.grad(change)(theta)


def renormalisation_step(problem: ContrastiveProblem, theta: Tensor, solver: CurvatureSolver, n_removed: int) -> Tensor:
    """First-order ``Δθ`` of the ``1/N → 1/(N−k)`` renormalisation after removing ``k`` pairs.

    Retraining on ``N − k`` pairs is the same as keeping ``1/N`` and shrinking the penalty to
    ``δ(N−k)/N``; its implicit-function effect is ``(δk/N) H⁻¹(θ̂ − θ₀)``, the same for every set of
    that size.  It is first order, like the scores themselves (docs/method.md §2 calls it second order;
    it is not), but it shifts every single-pair score by one constant (about 2% of the median score
    on the demo), so single-pair scores leave it out and rankings are unchanged; the scores stage
    records the shift in ``run.json``.  Set predictions add it: it grows with ``k``.
    """
    return solver.solve(problem.theta0.new_tensor(problem.delta * n_removed / problem.data.normaliser) * (theta - problem.theta0))


def predicted_step(
    problem: ContrastiveProblem,
    theta: Tensor,
    solver: CurvatureSolver,
    drop_rows=(),
    new_text: dict[int, Tensor] | None = None,
    estimate: Literal["group", "additive"] = "group",
    renormalise: bool = True,
) -> Tensor:
    """Predicted parameter change ``Δθ [P]`` of an edit, without retraining.

    ``renormalise`` adds :func:`renormalisation_step` so the prediction targets what retraining on
    the remaining pairs actually does (set estimates); single-pair scores leave it out.
    """
    drop_rows = list(drop_rows)
    if estimate == "additive":
        if new_text:
            raise ValueError("the additive estimate covers removals only; use estimate='group' for relabels")
        step = solver.solve(additive_set_gradient(problem, theta, drop_rows))
    else:
        step = solver.solve(edit_gradient(problem, theta, drop_rows, new_text))
    if renormalise and drop_rows:
        step = step + renormalisation_step(problem, theta, solver, len(drop_rows))
    return step


def newton_edit(
    problem: ContrastiveProblem,
    theta: Tensor,
    solver: CurvatureSolver,
    drop_rows=(),
    new_text: dict[int, Tensor] | None = None,
    steps: int = 1,
) -> Tensor:
    """``θ_clean`` by Newton steps on the reduced objective (renormalised, as retraining would be).

    ``θ ← θ − H⁻¹∇R_{−D*}(θ)`` with ``H`` the curvature at ``θ̂`` reused for every step.  One step
    from ``θ̂`` is the closed-form edit; more steps move towards the retrained minimiser.
    """
    edited, _ = problem.data.edited(drop_rows, new_text, renormalise=True)
    reduced = problem.with_data(edited)
    current = theta.clone()
    for _ in range(steps):
        current = current - solver.solve(torch.func.grad(reduced.objective)(current))
    return current


def refined_removal_effect(problem: ContrastiveProblem, theta: Tensor, solver: CurvatureSolver, phi, rows, steps: int = 2) -> np.ndarray:
    """``φ(θ_{−n}) − φ(θ̂)`` for removing each pair of ``rows`` alone, by ``steps`` Newton steps on the
    reduced objective (:func:`newton_edit`) instead of the linear prediction ``[len(rows)]``.

    The single-pair score is a first-order expansion in the removal; at a weak penalty the response
    of the pairs with the largest self-influence (memorised, mostly mislabelled pairs) is visibly
    non-linear (measured on the demo at δ = 0.03: the actual change up to 14× the linear one), and
    two steps bring it back (LOO Pearson 0.977 → 0.995, bench/results/fidelity.md).  Each pair costs
    ``steps`` gradients of the whole objective and solves, so this is for a chosen few pairs, not all.
    """
    base = float(phi(theta))
    return np.array([float(phi(newton_edit(problem, theta, solver, [int(row)], steps=steps))) - base for row in rows])


def reduced_problem(problem: ContrastiveProblem, drop_rows=(), new_text: dict[int, Tensor] | None = None) -> ContrastiveProblem:
    """The problem that actual retraining solves after an edit (remaining pairs, renormalised)."""
    edited, _ = problem.data.edited(drop_rows, new_text, renormalise=True)
    return problem.with_data(edited)
