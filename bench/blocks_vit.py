"""The blocks scope on a standard architecture: ViT-B-32's last block of each tower, end to end on CPU.

ViT-B-32 with seeded random weights saved as a local checkpoint (the machine is offline, so the
numbers say nothing about CLIP itself), ``--pairs`` shapes pairs, ``ecif.run_pipeline`` with
``blocks=1`` (10.9M parameters in scope), ``δ = 10`` (a random ViT needs it, see
tests/test_open_clip_real.py) and the ``lowrank-cg`` solver at rank ``--rank``; then trace-back of
one test item.  Prints the seconds of every stage, the fine-tuning report and the trace.

    .venv/bin/python -m bench.blocks_vit              # 36 pairs, rank 16: about 12 minutes on 2 cores
"""

from __future__ import annotations

import json
import time

from bench import common


def main(argv=None) -> dict:
    parser = common.argument_parser(__doc__, __spec__.name)
    parser.add_argument("--pairs", type=int, default=36)
    parser.add_argument("--rank", type=int, default=16, help="eigenpairs of the low-rank solver (the library default is 64)")
    common.add_common_arguments(parser)
    args = parser.parse_args(argv)
    machine = common.start(args)

    import open_clip
    import torch

    import ecif
    from ecif.data import make_demo_data
    from ecif.models import save_checkpoint

    folder = common.work_dir(args) / f"blocks-vit-b-32-pairs{args.pairs}-seed{args.seed}"
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "vit-b-32.safetensors"
    if not checkpoint.exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            save_checkpoint(open_clip.create_model("ViT-B-32"), checkpoint)
    manifest = folder / "data" / "manifest.csv"
    if not manifest.exists():
        make_demo_data("shapes", folder / "data", n=args.pairs, noise=0.1, seed=args.seed)
    config = ecif.RunConfig(
        run_dir=folder / f"run-rank{args.rank}",
        manifest=manifest,
        model="ViT-B-32",
        checkpoint=checkpoint,
        finetune=ecif.FinetuneConfig(delta=10.0, blocks=1),
        curvature=ecif.CurvatureConfig(low_rank=args.rank),
    )
    run = ecif.run_pipeline(config, reporter=common.StageLogger(prefix="vit-b-32 blocks=1: ").reporter())
    items = run.mispredictions()
    item = items[items["split"] == "test"].iloc[0]
    started = time.perf_counter()
    table = ecif.trace(run, uid=item["uid"], top_k=3)
    trace_seconds = time.perf_counter() - started
    stages = {name: stage.get("seconds") for name, stage in run.info["stages"].items()}
    report = json.loads(run.path("finetune.json").read_text())
    curvature = run.info["stages"]["curvature"]
    results = {"stages": stages, "trace_seconds": trace_seconds, "finetune": report, "curvature": curvature, "pairs": args.pairs}
    lines = [
        "# The blocks scope on ViT-B-32 (random weights), CPU",
        "",
        f"{args.pairs} shapes pairs ({int((run.manifest()['split'] == 'train').sum())} training), `blocks=1`: "
        f"{curvature['parameters']:,} parameters; δ = 10; `lowrank-cg` at rank {args.rank}. "
        "Command: `.venv/bin/python -m bench.blocks_vit`.",
        "",
        common.markdown_table(["stage", "seconds"], [[name, seconds] for name, seconds in stages.items()] + [["trace-back of one item", trace_seconds]]),
        "",
        f"Fine-tuning: converged {report['converged']}, gradient norm {report['gradient_norm']:.1e}, smallest Hessian "
        f"eigenvalue {report['smallest_hessian_eigenvalue']:.3g} (δ = 10), {report['lbfgs_iterations']} L-BFGS iterations.",
        "",
        common.markdown_table(["role", "row", "score", "influence", "main_role"], table[["role", "row", "score", "influence", "main_role"]].values.tolist()),
        "",
        common.machine_markdown(machine),
    ]
    common.publish("blocks-vit", {"machine": machine, **results}, "\n".join(lines), args.results)
    return results


if __name__ == "__main__":
    main()
