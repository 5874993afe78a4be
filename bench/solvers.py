"""How closely each curvature solver ranks influence like the dense Hessian, on scored demo runs.

    .venv/bin/python bench/solvers.py                 # the default and the pretrained-pool shapes runs (n=3000, 10% random captions)
    .venv/bin/python bench/solvers.py --run RUN_DIR   # any scored run whose heads fit the dense solver

For each run: every training pair's ``influence`` on the trusted loss with the run's dense Hessian
(the reference), then with the dense Gauss–Newton, the same two matrices made block-diagonal (the
image–text cross block zeroed, as any per-layer factorisation does), EK-FAC, plain conjugate gradient
and EK-FAC-preconditioned conjugate gradient (``--solver ekfac-cg``): Spearman and Pearson against
the dense Hessian and the dense Gauss–Newton, the largest difference relative to the largest
reference value, conjugate-gradient iterations and seconds (curvature build included).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_common_arguments,
    default_work_dir,
    log,
    machine_info,
    machine_markdown,
    markdown_table,
    pretraining_pool_checkpoint,
    publish,
    scored_demo_run,
    set_threads,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, action="append", default=[], help="a scored run folder (repeatable)")
    add_common_arguments(parser, seed=False)
    parser.add_argument("--name", default="solvers")
    return parser.parse_args(argv)


def compare(run_dir: Path) -> tuple[str, list[list]]:
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    from ecif.curvature.products import dense_curvature
    from ecif.curvature.solvers import CurvatureConfig, DenseSolver, build_solver
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
    set_threads(args.threads)
    machine = machine_info()
    runs = list(args.run)
    if not runs:
        work = args.work or default_work_dir()
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
