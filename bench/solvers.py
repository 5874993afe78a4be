"""How closely each curvature solver ranks influence like the dense Hessian, on scored demo runs.

    .venv/bin/python -m bench.solvers                 # the default and the pretrained-pool shapes runs (n=3000, 10% random captions)
    .venv/bin/python -m bench.solvers --run RUN_DIR   # any scored run whose heads fit the dense solver

For each run: every training pair's ``influence`` on the trusted loss with the run's dense Hessian
(the reference), then with the dense Gauss–Newton, the same two matrices made block-diagonal (the
image–text cross block zeroed, as any per-layer factorisation does), EK-FAC, plain conjugate gradient
and EK-FAC-preconditioned conjugate gradient (``--solver ekfac-cg``): Spearman and Pearson against
the dense Hessian and the dense Gauss–Newton, the largest difference relative to the largest
reference value, conjugate-gradient iterations and seconds (curvature build included).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import (
    add_common_arguments,
    argument_parser,
    log,
    machine_markdown,
    markdown_table,
    pretraining_pool_checkpoint,
    publish,
    scored_demo_run,
    start,
    work_dir,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argument_parser(__doc__, __spec__.name)
    parser.add_argument("--run", type=Path, action="append", default=[], help="a scored run folder (repeatable)")
    add_common_arguments(parser, seed=False, name="solvers")
    return parser.parse_args(argv)


def compare(run_dir: Path) -> tuple[str, list[list]]:
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    from ecif.curvature.products import dense_curvature
    from ecif.config import CurvatureConfig
    from ecif.curvature.solvers import DenseSolver, build_solver
    from ecif.influence.scores import gradient_of, influence_on
    from ecif.tasks.engine import load_engine

    engine = load_engine(run_dir)
    problem, theta, damping = engine.problem, engine.theta, engine.curvature.damping
    gradient = gradient_of(engine.trusted_loss(), theta)
    image_block = problem.scope.image_dim * problem.scope.embed_dim
    results = {}
    for kind in ("hessian", "ggn"):
        started = time.perf_counter()
        matrix = dense_curvature(problem, theta, kind)
        results[f"dense {kind}"] = (influence_on(problem, theta, DenseSolver(matrix, damping, kind), gradient).influence,
                                    None, time.perf_counter() - started)
        block_diagonal = matrix.clone()
        block_diagonal[:image_block, image_block:] = 0
        block_diagonal[image_block:, :image_block] = 0
        results[f"dense {kind}, block-diagonal"] = (
            influence_on(problem, theta, DenseSolver(block_diagonal, damping, kind), gradient).influence, None, None)
    for name in ("ekfac", "cg", "ekfac-cg"):
        started = time.perf_counter()
        solver = build_solver(problem, theta, CurvatureConfig(solver=name, damping=damping))
        values = influence_on(problem, theta, solver, gradient).influence
        iterations = getattr(getattr(solver, "refined", solver), "last_iterations", None)
        results[name] = (values, iterations, time.perf_counter() - started)
    hessian, ggn = results["dense hessian"][0], results["dense ggn"][0]
    rows = []
    for name, (values, iterations, seconds) in results.items():
        rows.append([name, spearmanr(values, hessian)[0], pearsonr(values, hessian)[0], spearmanr(values, ggn)[0],
                     float(np.abs(values - hessian).max() / np.abs(hessian).max()), iterations, seconds])
    return f"{Path(run_dir).name} ({problem.data.n_pairs} training pairs, {theta.numel()} parameters, damping {damping})", rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    machine = start(args)
    runs = list(args.run)
    if not runs:
        work = work_dir(args)
        runs = [scored_demo_run(work).directory,
                scored_demo_run(work, checkpoint=pretraining_pool_checkpoint(work)).directory]
    sections, payload = [], {"machine": machine, "runs": {}}
    for run_dir in runs:
        log(f"solvers on {run_dir}")
        title, rows = compare(Path(run_dir))
        payload["runs"][title] = rows
        sections += [f"## {title}", "", markdown_table(
            ["solver", "Spearman vs dense Hessian", "Pearson vs dense Hessian", "Spearman vs dense GGN",
             "max |Δ| / max |reference|", "CG iterations", "seconds"], rows, digits=4), ""]
    markdown = "\n".join(["# Influence rankings of every curvature solver against the dense one", "",
                          machine_markdown(machine), "", __doc__.split("\n\n")[2].replace("\n", " "), "", *sections])
    payload["markdown"] = markdown
    publish(args.name, payload, markdown, args.results)
    return payload


if __name__ == "__main__":
    main()
