"""Fine-tuning the influence scope (both projection heads, or more) on cached features to a true minimiser.

ECIF is a statement about the minimiser ``θ̂`` of ``R`` (docs/method.md §1), so this step is part of the
method: L-BFGS on the full, deterministic objective, then Newton–CG polish until the gradient norm is
below tolerance, and a report of the three numbers that say whether influence can be trusted: the
final gradient norm, the smallest Hessian eigenvalue and the smallest pre-normalisation norm.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from ecif.config import FinetuneConfig
from ecif.curvature.solvers import (
    ConjugateGradientSolver,
    CurvatureNotPositiveDefinite,
    CurvatureSolver,
    lanczos_smallest_eigenvalue_estimate,
)
from ecif.objective.contrastive import (
    ContrastiveData,
    ContrastiveProblem,
    HeadsScope,
    Scope,
    contrastive_loss,
    prenormalisation_norms,
)
from ecif.progress import Reporter, as_reporter


@dataclass
class FinetuneReport:
    """How close the fine-tuned heads are to a well-conditioned minimum."""

    objective: float
    contrastive_loss: float
    gradient_norm: float
    smallest_hessian_eigenvalue: float
    smallest_prenorm_norm: float
    lbfgs_iterations: int
    newton_steps: int
    seconds: float
    converged: bool
    warnings: list[str] = field(default_factory=list)
    delta: float = float("nan")
    smallest_hessian_eigenvalue_note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _gradient_norm(problem: ContrastiveProblem, theta: Tensor) -> float:
    return float(torch.func.grad(problem.objective)(theta).norm())


def finetune_heads(
    problem: ContrastiveProblem,
    theta_start: Tensor | None = None,
    config: FinetuneConfig | None = None,
    reporter: Reporter | None = None,
    preconditioner: CurvatureSolver | None = None,
) -> tuple[Tensor, FinetuneReport]:
    """Minimise ``R`` from ``theta_start`` (default ``θ₀``); return ``θ̂ [P]`` and its report.

    L-BFGS (``max_lbfgs_iterations``; 0 skips it) then inexact Newton–CG to ``gradient_tolerance``
    (after L-BFGS, only from a gradient norm under ``newton_start_gradient``).
    ``preconditioner``: a solver for a nearby problem's curvature (e.g. the full problem's when
    refitting after a few removals), which brings each Newton step down to a few curvature products;
    it changes the speed, never the minimiser.  Never raises for poor convergence: the report's
    ``converged`` flag and ``warnings`` say loudly what is wrong, so a long job still produces
    something to inspect.
    """
    config = config or FinetuneConfig()
    reporter = as_reporter(reporter)
    started = time.perf_counter()
    theta = (problem.theta0 if theta_start is None else theta_start).detach().clone().requires_grad_(True)
    iterations = 0
    newton_steps_allowed = config.newton_steps
    if config.max_lbfgs_iterations > 0:
        theta, iterations = _lbfgs(problem, theta, config, reporter)
        # L-BFGS that stopped far from a minimum (its budget ran out) leaves a point where Newton's
        # linear solves cost thousands of products and its steps are unreliable: report, don't polish.
        if _gradient_norm(problem, theta.detach()) > config.newton_start_gradient:
            newton_steps_allowed = 0
    theta = theta.detach()

    newton_steps = 0
    for _ in range(newton_steps_allowed):
        gradient = torch.func.grad(problem.objective)(theta)
        gradient_norm = float(gradient.norm())
        if gradient_norm < config.gradient_tolerance:
            break
        # Inexact Newton: the step only has to bring the gradient under the tolerance, so its linear
        # solve stops at a relative residual of 0.1·tolerance/‖g‖ (at most 1e-2), not at machine precision
        # (which costs thousands of curvature products when δ is small).
        relative = max(1e-12, min(1e-2, 0.1 * config.gradient_tolerance / gradient_norm))
        solver = ConjugateGradientSolver(
            problem, theta, damping=0.0, tolerance=relative, max_iterations=2000, preconditioner=preconditioner
        )
        try:
            step = solver.solve(gradient)
        except CurvatureNotPositiveDefinite:
            break  # not near a minimum: the report below says so
        candidate = theta - step
        if float(problem.objective(candidate)) > float(problem.objective(theta)) + 1e-12:
            break
        theta = candidate
        newton_steps += 1

    report = convergence_report(problem, theta, config)
    report.lbfgs_iterations = int(iterations)
    report.newton_steps = newton_steps
    report.seconds = time.perf_counter() - started
    return theta, report


def _lbfgs(problem: ContrastiveProblem, theta: Tensor, config: FinetuneConfig, reporter: Reporter) -> tuple[Tensor, int]:
    """L-BFGS in rounds of 50 iterations until the gradient norm is within 100× the tolerance."""
    optimiser = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=50,
        history_size=50,
        tolerance_grad=config.gradient_tolerance,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimiser.zero_grad()
        value = problem.objective(theta)
        value.backward()
        return value

    rounds = max(1, config.max_lbfgs_iterations // 50)
    iterations = 0
    for round_index in range(rounds):
        optimiser.step(closure)
        iterations = optimiser.state[optimiser._params[0]].get("n_iter", 0)
        gradient_norm = float(theta.grad.norm()) if theta.grad is not None else float("inf")
        reporter.report("fine-tune", round_index + 1, rounds)
        if gradient_norm < config.gradient_tolerance * 100:
            break
    return theta.detach(), int(iterations)


def convergence_report(problem: ContrastiveProblem, theta: Tensor, config: FinetuneConfig | None = None) -> FinetuneReport:
    """Gradient norm, smallest Hessian eigenvalue (Lanczos) and smallest pre-normalisation norm at ``θ``."""
    config = config or FinetuneConfig()
    gradient_norm = _gradient_norm(problem, theta)
    estimate = lanczos_smallest_eigenvalue_estimate(problem, theta, max_products=config.check_products(isinstance(problem.scope, HeadsScope)))
    smallest_eigenvalue = estimate.value
    smallest_norm = float(prenormalisation_norms(problem.scope, theta, problem.data.image, problem.data.text).min())
    warnings = []
    if gradient_norm > config.gradient_tolerance:
        warnings.append(
            f"not converged: gradient norm {gradient_norm:.2e} (tolerance {config.gradient_tolerance:.0e}); "
            "influence estimates assume a minimiser and will be unreliable"
        )
    if not math.isfinite(smallest_eigenvalue):
        warnings.append(
            f"the smallest Hessian eigenvalue is not finite ({estimate.describe()}): the curvature itself is "
            "not finite at these heads (features at the origin or overflow); raise delta"
        )
    elif smallest_eigenvalue <= 0:
        warnings.append(
            f"Hessian not positive definite (smallest eigenvalue {estimate.describe()}): not a minimum; "
            "raise delta (the penalty towards the starting heads) or use the Gauss-Newton curvature"
        )
    if smallest_norm < config.min_prenorm_warning:
        warnings.append(
            f"some projected features are near the origin (smallest norm {smallest_norm:.2e}), where "
            "normalisation is singular; raise delta"
        )
    return FinetuneReport(
        objective=float(problem.objective(theta)),
        contrastive_loss=float(contrastive_loss(problem.scope, theta, problem.data)),
        gradient_norm=gradient_norm,
        smallest_hessian_eigenvalue=smallest_eigenvalue,
        smallest_prenorm_norm=smallest_norm,
        lbfgs_iterations=0,
        newton_steps=0,
        seconds=0.0,
        converged=not warnings,
        warnings=warnings,
        delta=float(problem.delta),
        smallest_hessian_eigenvalue_note=estimate.describe(),
    )



@dataclass
class DeltaSelection:
    """The outcome of :func:`select_delta`: the chosen ``δ``, its minimiser and report, and the whole sweep."""

    delta: float
    theta: Tensor
    report: FinetuneReport
    sweep: list[dict]
    selection_pairs: int

    @property
    def at_strongest(self) -> bool:
        """The strongest penalty of the grid won: the held-out loss may fall further beyond it."""
        tried = [point for point in self.sweep if "skipped" not in point]
        return bool(tried) and self.delta == max(point["delta"] for point in tried) and len(tried) > 1

    def summary(self) -> dict:
        """What run.json records: the chosen δ, how it was chosen and every grid point tried."""
        summary = {
            "delta": self.delta,
            "rule": "lowest held-out trusted contrastive loss among the δ whose fine-tune converged to a well-conditioned minimiser",
            "selection_pairs": self.selection_pairs,
            "sweep": self.sweep,
        }
        if self.at_strongest:
            summary["note"] = (
                "the strongest penalty of the grid had the lowest held-out loss (typical of a small training set); "
                "a stronger one might be better still: add it to delta_grid"
            )
        return summary


def select_delta(
    scope: Scope,
    theta0: Tensor,
    data: ContrastiveData,
    selection: ContrastiveData,
    config: FinetuneConfig | None = None,
    reporter: Reporter | None = None,
) -> DeltaSelection:
    """Fine-tune at every ``δ`` of ``config.delta_grid`` and keep the best held-out one.

    ``data``: the training pairs; ``selection``: trusted pairs that influence will NOT be measured on.
    The grid is walked from the strongest penalty down, each fine-tune warm-started from the previous
    minimiser (continuation: a weaker penalty moves the heads further, and starting near the answer
    saves most of the L-BFGS iterations).  A δ whose fine-tune fails the conditioning checks (gradient
    norm, positive-definite Hessian, features away from the origin) is not eligible, and the walk stops
    there: a weaker penalty is only worse conditioned.  When no δ is eligible, the strongest one is
    returned with its report's warnings, so the run still says loudly what is wrong.
    """
    config = config or FinetuneConfig()
    reporter = as_reporter(reporter)
    sweep: list[dict] = []
    candidates: list[tuple[float, float, Tensor, FinetuneReport]] = []
    start = theta0
    grid = config.delta_grid
    # Each grid point gets a short smallest-eigenvalue check (Newton-CG also stops at any negative
    # curvature it meets; the full check is spent on the chosen δ only, below) and at most
    # sweep_lbfgs_iterations: a penalty so weak that the heads travel far (measured on the demo:
    # δ = 0.01 needs 2,900 iterations and 80 s, where δ = 0.03 needs 50) is where features start to
    # collapse, and it is not worth a long wait to find it out.
    quick = replace(
        config,
        curvature_check_products=config.sweep_check_products,
        max_lbfgs_iterations=min(config.max_lbfgs_iterations, config.sweep_lbfgs_iterations),
    )
    for position, delta in enumerate(grid):
        reporter.report(f"fine-tune (δ = {delta:g}, {position + 1} of {len(grid)})", position, len(grid))
        theta, report = finetune_heads(ContrastiveProblem(scope, data, theta0, delta), start, replace(quick, delta=delta))
        held_out = float(contrastive_loss(scope, theta, selection))
        sweep.append(
            {
                "delta": delta,
                "selection_loss": held_out,
                "train_loss": report.contrastive_loss,
                "gradient_norm": report.gradient_norm,
                "smallest_hessian_eigenvalue": report.smallest_hessian_eigenvalue,
                "smallest_prenorm_norm": report.smallest_prenorm_norm,
                "parameter_change": float((theta - theta0).norm()),
                "converged": report.converged,
                "seconds": round(report.seconds, 3),
                "warnings": report.warnings,
            }
        )
        if not report.converged:
            if report.gradient_norm > config.gradient_tolerance:
                sweep[-1]["warnings"].append(f"the sweep allows {quick.max_lbfgs_iterations} L-BFGS iterations per δ")
            break
        candidates.append((held_out, delta, theta, report))
        start = theta
    for delta in grid[len(sweep) :]:
        sweep.append({"delta": delta, "skipped": "a stronger penalty already failed to converge"})
    reporter.report("fine-tune (δ chosen)", len(grid), len(grid))
    for held_out, delta, theta, report in sorted(candidates, key=lambda candidate: candidate[0]):
        full = convergence_report(ContrastiveProblem(scope, data, theta0, delta), theta, replace(config, delta=delta))
        full.lbfgs_iterations, full.newton_steps, full.seconds = report.lbfgs_iterations, report.newton_steps, report.seconds
        point = next(point for point in sweep if point["delta"] == delta)
        point["smallest_hessian_eigenvalue"] = full.smallest_hessian_eigenvalue
        if full.converged:
            report = full
            break
        point["converged"], point["warnings"] = False, full.warnings
    else:
        delta = grid[0]
        theta, report = finetune_heads(ContrastiveProblem(scope, data, theta0, delta), theta0, replace(config, delta=delta))
        report.warnings.append(f"no penalty of the grid {list(grid)} reached a well-conditioned minimiser; kept the strongest")
    return DeltaSelection(delta, theta, report, sweep, selection.n_pairs)


def sweep_verdict(point: dict, chosen: float) -> str:
    """What became of one grid point of a δ sweep (a ``delta_selection["sweep"]`` entry), in words."""
    if "skipped" in point:
        return f"not tried: {point['skipped']}"
    if point["delta"] == chosen:
        return "chosen"
    return "eligible" if point["converged"] else "not a well-conditioned minimum"


def split_trusted_rows(rows: np.ndarray, config: FinetuneConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(selection, measurement)`` rows of the trusted split (both sorted).

    With ``delta="auto"``, ``selection_fraction`` of the trusted rows (a seeded draw) choose δ and the
    rest are where influence is measured; with a fixed δ every trusted row is for measurement.
    """
    rows = np.asarray(rows)
    if not config.auto_delta:
        return rows[:0], rows
    order = np.random.default_rng(config.selection_seed).permutation(len(rows))
    n_selection = min(len(rows) - 1, max(1, int(round(config.selection_fraction * len(rows)))))
    return np.sort(rows[order[:n_selection]]), np.sort(rows[order[n_selection:]])
