"""Every solver by the name a config, the command line and the app give it, and how it is built.

:data:`SOLVERS` is the one list of names; :data:`SOLVER_NAMES` adds ``"auto"`` (the command line's
``--solver`` choices, the app's menu).  Each solver module is imported only when a solver is built,
so that reading the names does not import torch (every command of the command line would pay for it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ecif.config import CurvatureConfig
from ecif.progress import Reporter, as_reporter

if TYPE_CHECKING:
    from torch import Tensor

    from ecif.curvature.solvers.base import CurvatureSolver
    from ecif.curvature.solvers.kronecker import KroneckerSolver
    from ecif.curvature.solvers.refined import RefinedSolver
    from ecif.objective.contrastive import ContrastiveProblem


@dataclass(frozen=True)
class SolverEntry:
    """How one solver is built; ``heads_only``: EK-FAC, which factorises linear heads only."""

    build: Callable[[ContrastiveProblem, Tensor, CurvatureConfig, Reporter], CurvatureSolver]
    heads_only: bool = False


def _dense(problem: ContrastiveProblem, theta: Tensor, config: CurvatureConfig, reporter: Reporter) -> CurvatureSolver:
    from ecif.curvature.products import dense_curvature
    from ecif.curvature.solvers.dense import DenseSolver

    return DenseSolver(dense_curvature(problem, theta, config.kind, reporter), config.damping, config.kind)


def _conjugate_gradient(problem: ContrastiveProblem, theta: Tensor, config: CurvatureConfig, reporter: Reporter) -> CurvatureSolver:
    from ecif.curvature.solvers.conjugate_gradient import ConjugateGradientSolver

    return ConjugateGradientSolver.from_config(problem, theta, config)


def _kronecker(problem: ContrastiveProblem, theta: Tensor, config: CurvatureConfig, reporter: Reporter) -> KroneckerSolver:
    from ecif.curvature.solvers.kronecker import KroneckerSolver

    return KroneckerSolver(problem, theta, config.damping, reporter)


def _kronecker_refined(problem: ContrastiveProblem, theta: Tensor, config: CurvatureConfig, reporter: Reporter) -> RefinedSolver:
    from ecif.curvature.solvers.refined import RefinedSolver

    return RefinedSolver.around(_kronecker(problem, theta, config, reporter), problem, theta, config)


def _low_rank_refined(problem: ContrastiveProblem, theta: Tensor, config: CurvatureConfig, reporter: Reporter) -> RefinedSolver:
    from ecif.curvature.solvers.low_rank import LowRankSolver
    from ecif.curvature.solvers.refined import RefinedSolver

    reporter.report("curvature (Lanczos)", 0, 1)
    low_rank = LowRankSolver.of(problem, theta, config.low_rank, config.damping, config.kind)
    reporter.report("curvature (Lanczos)", 1, 1)
    return RefinedSolver.around(low_rank, problem, theta, config)


SOLVERS: dict[str, SolverEntry] = {
    "dense": SolverEntry(_dense),
    "cg": SolverEntry(_conjugate_gradient),
    "ekfac": SolverEntry(_kronecker, heads_only=True),
    "ekfac-cg": SolverEntry(_kronecker_refined, heads_only=True),
    "lowrank-cg": SolverEntry(_low_rank_refined),
}

#: What ``CurvatureConfig.solver`` accepts: ``"auto"`` (see :func:`build_solver`), then every solver.
SOLVER_NAMES: tuple[str, ...] = ("auto", *SOLVERS)

#: :data:`SOLVER_NAMES` as a type (``typing.get_args`` gives them back).
SolverName = Literal[SOLVER_NAMES]  # type: ignore[valid-type]


def refuse_ekfac_beyond_heads(solver: str, scope_kind: str) -> None:
    """EK-FAC factorises linear heads only: a ``ValueError`` naming the solvers that cover ``scope_kind``."""
    entry = SOLVERS.get(solver)
    if entry is not None and entry.heads_only and scope_kind != "heads":
        covering = ["auto", *(name for name, other in SOLVERS.items() if not other.heads_only)]
        raise ValueError(
            f"solver {solver!r}: EK-FAC covers the projection heads only; "
            f"for the {scope_kind} scope use {', '.join(covering[:-1])} or {covering[-1]}"
        )


def build_solver(
    problem: ContrastiveProblem, theta: Tensor, config: CurvatureConfig | None = None, reporter: Reporter | None = None
) -> CurvatureSolver:
    """The solver that ``config`` asks for.

    ``auto``: ``ekfac-cg`` for the heads scope: the same ``influence`` as the dense reference (to
    1e-11 on the demo) and EK-FAC self-influence (Spearman 0.9996 against the dense one there), at
    a tenth of the time (``bench/first_contact.py``). For the blocks scope (EK-FAC factorises linear
    heads only), and for heads with a learnt logit scale and bias (sigmoid loss), which the EK-FAC
    does not cover: dense up to ``dense_max_params``, ``lowrank-cg`` above.
    """
    config = config or CurvatureConfig()
    name = config.solver
    if name == "auto":
        from ecif.objective.logits import learnt_logit_count

        factorable = problem.scope.kind == "heads" and learnt_logit_count(problem.scope) <= 1
        name = "ekfac-cg" if factorable else ("dense" if theta.numel() <= config.dense_max_params else "lowrank-cg")
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; expected one of {', '.join(SOLVER_NAMES)}")
    refuse_ekfac_beyond_heads(name, problem.scope.kind)
    return SOLVERS[name].build(problem, theta, config, as_reporter(reporter))
