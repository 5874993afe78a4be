"""Trace-back against a planted systematic corruption (ECIF_METHOD §8, "Trace-back").

A share (``--noise``, default all) of one group of training pairs gets one consistent wrong class
word (shapes: red squares captioned as red circles; digits: white ones captioned as zeros).  The demo CLIP is
trained on that manifest and every pair scored; then, for every test item of the group that the
model gets wrong, ``ecif.trace`` ranks the training pairs by their effect on that item's zero-shot
loss, and we count how many of its top-k culprits are planted pairs (precision@k), with the
relative score (RelatIF, the default) and the plain influence.  The base rate is the share of
planted pairs in the whole training set (what a random ranking would get).

    .venv/bin/python bench/trace.py                # shapes, n=3000, every red square captioned as a circle
    .venv/bin/python bench/trace.py --noise 0.5    # half of them

With a third of the group mislabelled the demo CLIP still gets every test item of the group right
(the majority wins) and with half it makes one mistake, so the default mislabels the whole group.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    default_work_dir,
    log,
    machine_info,
    machine_markdown,
    markdown_table,
    pretraining_pool_checkpoint,
    scored_demo_run,
    set_threads,
    publish,
)

TARGET_PRECISION = 0.8


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="shapes", choices=["shapes", "digits"])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--noise", type=float, default=1.0, help="share of the group's training pairs mislabelled")
    parser.add_argument("--delta", type=float, default=None, help="fine-tuning penalty towards the starting heads (default: the library's)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--result-name", default=None, help="default: trace, or trace-pretrained with --pretrained-pool")
    parser.add_argument(
        "--pretrained-pool", action="store_true",
        help="fine-tune from a demo CLIP trained on a separate clean demo set (the paper's protocol: pretrained model, "
        "noisy fine-tuning data), so the planted pairs act only through the fine-tuning that ECIF models",
    )
    return parser.parse_args(argv)


def backbone_similarity(run, manifest, label: str, colour: str, wrong: str) -> list[list]:
    """Cosine of the mean unit backbone image feature of the group's test items with that of other groups.

    Shows where the backbone put the group: next to the wrong class of the same colour (it absorbed
    the planted corruption while it was trained) or next to its own class (a clean backbone).
    """
    import numpy as np

    with np.load(run.path("features.npz")) as features:
        image = features["image"] / np.linalg.norm(features["image"], axis=1, keepdims=True)

    def mean_direction(mask) -> np.ndarray:
        centre = image[np.asarray(mask)].mean(axis=0)
        return centre / np.linalg.norm(centre)

    same_colour = manifest["colour"] == colour
    reference = mean_direction(same_colour & (manifest["label"] == label) & (manifest["split"] == "test"))
    groups = [
        (f"planted training pairs ({colour} {label})", same_colour & (manifest["label"] == label) & (manifest["split"] == "train")),
        (f"{colour} {wrong} (the planted wrong class, same colour)", same_colour & (manifest["label"] == wrong)),
        (f"{label} of other colours", ~same_colour & (manifest["label"] == label)),
        (f"{wrong} of other colours", ~same_colour & (manifest["label"] == wrong)),
    ]
    return [[name, int(mask.sum()), float(reference @ mean_direction(mask))] for name, mask in groups]


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    import ecif
    from ecif.data.demo import systematic_group
    from ecif.tasks.trace import zero_shot_table

    machine = machine_info()
    started = time.perf_counter()
    work = args.work or default_work_dir()
    checkpoint = pretraining_pool_checkpoint(work, args.name, args.n, args.seed) if args.pretrained_pool else None
    run = scored_demo_run(work, args.name, args.n, round(args.noise, 4), "systematic", args.seed, checkpoint=checkpoint,
                          delta=args.delta)
    result_name = args.result_name or ("trace-pretrained" if args.pretrained_pool else "trace")
    label, colour, wrong = systematic_group(args.name)
    manifest = run.manifest()
    train = manifest[manifest["split"] == "train"]
    planted = train["corrupted"].astype(bool)
    base_rate = float(planted.mean())

    similarity = backbone_similarity(run, manifest, label, colour, wrong)
    table = zero_shot_table(run, splits=["test"])
    table = table.merge(manifest[["uid", "colour"]], on="uid")
    group = table[(table["label"] == label) & (table["colour"] == colour)]
    mistakes = group[~group["correct"]]
    log(f"{len(group)} test items of the group ({colour} {label}); {len(mistakes)} wrong, "
        f"{int((mistakes['predicted'] == wrong).sum())} of them as {wrong}")

    per_item = []
    for item in group.itertuples():
        row = {"uid": item.uid, "predicted": item.predicted, "correct": bool(item.correct), "prob_true": float(item.prob_true)}
        for relative in (True, False):
            traced = ecif.trace(run, item.uid, top_k=args.top_k, relative=relative)
            culprits = traced[traced["role"] == "culprit"]
            row["relative" if relative else "plain"] = float(culprits["corrupted"].astype(bool).mean())
        per_item.append(row)

    rows = []
    for subset, items in (
        (f"predicted {wrong}", [r for r in per_item if r["predicted"] == wrong]),
        ("every mistake of the group", [r for r in per_item if not r["correct"]]),
        ("every test item of the group (right or wrong)", per_item),
    ):
        rows.append([
            subset,
            len(items),
            np.mean([r["relative"] for r in items]) if items else None,
            np.mean([r["plain"] for r in items]) if items else None,
            base_rate,
        ])
    headline = rows[0][2]
    markdown = "\n".join([
        "# Trace-back against a planted systematic corruption",
        "",
        machine_markdown(machine),
        "",
        f"{args.name}, n={args.n}: {int(planted.sum())} of the {int(((train['label'] == label) & (train['colour'] == colour)).sum())} "
        f"training pairs that show a {colour} {label} are captioned as a {wrong} ({int(planted.sum())} planted pairs among "
        f"{len(train)} training pairs).  Test items of that group: {len(group)}, wrong: {len(mistakes)}.  For each mistake, "
        f"the share of planted pairs among its top-{args.top_k} culprits (`ecif.trace`), averaged over the mistakes:",
        "",
        markdown_table(["mistakes", "items", f"precision@{args.top_k} (relative)", f"precision@{args.top_k} (plain)",
                        "base rate"], rows),
        "",
        f"Where the backbone puts the group: cosine between the mean unit backbone image feature of the group's "
        f"{len(group)} test items and that of",
        "",
        markdown_table(["items", "n", "cosine"], similarity),
        "",
        f"**Target** precision@{args.top_k} ≥ {TARGET_PRECISION}: "
        + ("no mistakes to trace" if headline is None else f"{headline:.3f} → {'MET' if headline >= TARGET_PRECISION else 'MISSED'}"),
        "",
        f"Run: {run.directory}; {time.perf_counter() - started:.0f} s.",
    ])
    payload = {"settings": {k: str(v) for k, v in vars(args).items()}, "machine": machine, "items": per_item,
               "table": rows, "base_rate": base_rate, "backbone_similarity": similarity, "markdown": markdown}
    publish(result_name, payload, markdown, args.results)
    return payload


if __name__ == "__main__":
    main()
