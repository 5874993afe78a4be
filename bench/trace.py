"""Trace-back against a planted systematic corruption (docs/method.md §8, "Trace-back").

A share (``--noise``, default all) of one group of training pairs gets one consistent wrong class
word (shapes: red squares captioned as red circles; digits: white ones captioned as zeros; with
``--corruption systematic-class`` the class in every colour: all squares, all ones).  The demo CLIP is
trained on that manifest and every pair scored; then, for every test item of the group that the
model gets wrong, ``ecif.trace`` ranks the training pairs by their effect on that item's zero-shot
loss, and we count how many of its top-k culprits are planted pairs (precision@k), with the
relative score (RelatIF, the default) and the plain influence, ranking by both roles (the default)
and by the positive role alone (``rank_by="positive"``).  It also counts how many of the non-planted
culprits act mainly as negatives (``main_role``), and how many of those are genuine pairs of the
wrong class whose caption is that of a planted pair in their reference batch.  The base rate is the share of planted pairs in
the whole training set (what a random ranking would get).

    .venv/bin/python -m bench.trace                # shapes, n=3000, every red square captioned as a circle
    .venv/bin/python -m bench.trace --noise 0.5    # half of them
    .venv/bin/python -m bench.trace --pretrained-pool --corruption systematic-class   # every square, clean backbone

With a third of the group mislabelled the demo CLIP still gets every test item of the group right
(the majority wins) and with half it makes one mistake, so the default mislabels the whole group.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import (
    RetrainCache,
    add_common_arguments,
    argument_parser,
    correlations,
    log,
    machine_markdown,
    markdown_table,
    pretraining_pool_checkpoint,
    publish,
    recorded_settings,
    scored_demo_run,
    start,
    work_dir,
)
from bench.fidelity_selected import retrain

TARGET_PRECISION = 0.8


def parse_args(argv=None) -> argparse.Namespace:
    parser = argument_parser(__doc__, __spec__.name)
    parser.add_argument("--name", default="shapes", choices=["shapes", "digits"])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--noise", type=float, default=1.0, help="share of the group's training pairs mislabelled")
    parser.add_argument("--corruption", default="systematic", choices=["systematic", "systematic-class"],
                        help="one colour of the class (default) or the class in every colour")
    parser.add_argument("--delta", type=float, default=None, help="fine-tuning penalty towards the starting heads (default: the library's)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--verify", type=int, default=4,
                        help="mistakes whose culprits are checked by actual re-fine-tuning (0: none)")
    parser.add_argument("--tolerance", type=float, default=1e-10, help="gradient-norm tolerance of every re-fine-tune")
    add_common_arguments(parser)
    parser.add_argument("--result-name", default=None,
                        help="default: trace, + -pretrained with --pretrained-pool, + -class with systematic-class")
    parser.add_argument(
        "--pretrained-pool", action="store_true",
        help="fine-tune from a demo CLIP trained on a separate clean demo set (the paper's protocol: pretrained model, "
        "noisy fine-tuning data), so the planted pairs act only through the fine-tuning that ECIF models",
    )
    return parser.parse_args(argv)


def of_colour(frame, colour: str):
    """Rows of ``colour``; every row for ``"every"`` (systematic-class: the group spans every colour)."""
    return (frame["colour"] == colour) | (colour == "every")


def backbone_similarity(run, manifest, label: str, colour: str, wrong: str) -> list[list]:
    """Cosine of the mean unit backbone image feature of the group's test items with that of other groups.

    Shows where the backbone put the group: next to the wrong class of the same colour (it absorbed
    the planted corruption while it was trained) or next to its own class (a clean backbone).
    ``colour="every"`` (systematic-class): the group is the class in every colour.
    """
    import numpy as np

    with np.load(run.path("features.npz")) as features:
        image = features["image"] / np.linalg.norm(features["image"], axis=1, keepdims=True)

    def mean_direction(mask) -> np.ndarray:
        centre = image[np.asarray(mask)].mean(axis=0)
        return centre / np.linalg.norm(centre)

    same_colour = of_colour(manifest, colour)
    reference = mean_direction(same_colour & (manifest["label"] == label) & (manifest["split"] == "test"))
    groups = [
        (f"planted training pairs ({colour} {label})", same_colour & (manifest["label"] == label) & (manifest["split"] == "train")),
        (f"{colour} {wrong} (the planted wrong class{'' if colour == 'every' else ', same colour'})",
         same_colour & (manifest["label"] == wrong)),
        (f"{label} of other colours", ~same_colour & (manifest["label"] == label)),
        (f"{wrong} of other colours", ~same_colour & (manifest["label"] == wrong)),
    ]
    return [[name, int(mask.sum()), float(reference @ mean_direction(mask))] for name, mask in groups if mask.any()]


def planted_caption_in_batch(run, manifest) -> dict[int, bool]:
    """Manifest row → whether a planted pair with the very same caption sits in its reference batch."""
    from ecif.tasks.engine import load_engine

    engine = load_engine(run)
    captions = manifest["caption"].to_numpy()
    planted = manifest["corrupted"].astype(bool).to_numpy()
    answer = {}
    for batch in engine.problem.data.batches:
        rows = engine.train_rows[batch.numpy()]
        planted_captions = {captions[r] for r in rows if planted[r]}
        answer.update({int(r): (not planted[r]) and captions[r] in planted_captions for r in rows})
    return answer


RANKINGS = (("relative", True, "total"), ("plain", False, "total"), ("positive role, plain", False, "positive"))


def verify_culprits(run, mistakes, args, cache_dir: Path | None = None) -> dict:
    """Actually re-fine-tune without each top culprit of a few mistakes, and without each top-k set at once.

    For every culprit the actual change of the item's zero-shot loss is set against ECIF's prediction
    (single removals, ``influence``), split into planted and genuine pairs; every ranking's top-k is
    then removed together (the group estimate against the actual change, and whether the item is
    then right), for single items and for all the mistakes traced together as one confusion.
    Retrained heads are kept in ``cache_dir`` (default: the run folder's ``bench-trace``), so a rerun resumes.
    """
    import dataclasses

    import torch

    import ecif
    from ecif.influence.scores import gradient_of, predicted_step
    from ecif.paths import text_sha256
    from ecif.tasks.engine import load_engine
    from ecif.tasks.trace import item_answers, item_targets, items_loss

    engine = load_engine(run)
    # Retrains start next to θ̂ and only their gradient norm matters here: a short eigenvalue check.
    config = dataclasses.replace(engine.finetune, gradient_tolerance=args.tolerance, curvature_check_products=20)
    cache = RetrainCache(cache_dir or run.directory / "bench-trace")

    def refit(rows) -> torch.Tensor:
        positions = sorted(int(p) for p in engine.problem_index(rows))
        named = "-".join(map(str, positions)) if len(positions) <= 3 else "set" + text_sha256(",".join(map(str, positions)))[:16]
        key = f"without-{named}-tol{args.tolerance:g}"
        theta_path = cache.path(key).with_suffix(".pt")
        if cache.get(key) is None or not theta_path.exists():
            theta, report, seconds = retrain(engine, positions, config, theta_path)
            cache.put(key, {"positions": positions, "gradient_norm": report.gradient_norm, "seconds": seconds})
        return torch.load(theta_path, weights_only=True)

    def loss_of(items) -> tuple:
        """The items' questions (ecif.tasks.trace.Items) and their mean loss."""
        targets = item_targets(engine, items["uid"].tolist())
        return targets, items_loss(engine, targets)

    def remove_each_top_k(items, tables: dict) -> list[dict]:
        """Each ranking's top-k culprits removed at once: predicted and actual change of the items' mean loss."""
        targets, loss = loss_of(items)
        base, gradient = float(loss(engine.theta)), gradient_of(loss, engine.theta)
        answers = []
        for name, table in tables.items():
            culprits = table[table["role"] == "culprit"]
            theta = refit(culprits["row"].to_numpy())
            step = predicted_step(engine.problem, engine.theta, engine.solver, engine.problem_index(culprits["row"]))
            right = int(item_answers(engine, theta, targets)["correct"].sum())
            answers.append({"items": len(items), "ranking": name, "planted": float(culprits["corrupted"].astype(bool).mean()),
                            "predicted": float(gradient @ step), "actual": float(loss(theta)) - base, "right_after": right})
        return answers

    def trace_tables(uids) -> dict:
        return {name: ecif.trace(run, uids, top_k=args.top_k, relative=relative, rank_by=rank_by)
                for name, relative, rank_by in RANKINGS}

    singles, groups = [], []
    for item in mistakes.head(args.verify).itertuples():
        _, loss = loss_of(mistakes[mistakes["uid"] == item.uid])
        base = float(loss(engine.theta))
        tables = trace_tables(item.uid)
        culprits = pd.concat([t[t["role"] == "culprit"] for t in tables.values()]).drop_duplicates("row")
        for culprit in culprits.itertuples():
            started = time.perf_counter()
            actual = float(loss(refit([culprit.row]))) - base
            singles.append({"uid": item.uid, "row": int(culprit.row), "planted": bool(culprit.corrupted),
                            "main_role": culprit.main_role, "predicted": float(culprit.influence), "actual": actual})
            log(f"{item.uid}: without row {culprit.row} ({'planted' if culprit.corrupted else 'genuine'}, "
                f"{culprit.main_role}): predicted {culprit.influence:+.3e}, actual {actual:+.3e} ({time.perf_counter() - started:.0f}s)")
        groups += [{"uid": item.uid, **answer} for answer in remove_each_top_k(mistakes[mistakes["uid"] == item.uid], tables)]
    confusion = remove_each_top_k(mistakes, trace_tables(mistakes["uid"].tolist())) if len(mistakes) > 1 else []
    frame = pd.DataFrame(singles)
    summary = []
    for subset, part in (("every culprit", frame), ("planted culprits", frame[frame["planted"]]),
                         ("genuine culprits", frame[~frame["planted"]]),
                         ("genuine culprits acting mainly as negatives", frame[~frame["planted"] & (frame["main_role"] == "negative")])):
        if len(part) == 0:
            summary.append([subset, 0, None, None, None, None, None])
            continue
        pearson, spearman = correlations(part["predicted"], part["actual"]) if len(part) > 2 else (None, None)
        summary.append([subset, len(part), float(part["predicted"].mean()), float(part["actual"].mean()),
                        float((part["actual"] < 0).mean()), pearson, spearman])
    group_rows = [[f"one item at a time: {name}", float(g["planted"].mean()), float(g["predicted"].mean()),
                   float(g["actual"].mean()), f"{int(g['right_after'].sum())} of {len(g)}"]
                  for name, g in pd.DataFrame(groups).groupby("ranking", sort=False)]
    group_rows += [[f"the {answer['items']} mistakes together: {answer['ranking']}", answer["planted"], answer["predicted"],
                    answer["actual"], f"{answer['right_after']} of {answer['items']}"] for answer in confusion]
    return {"singles": singles, "groups": groups, "confusion": confusion, "summary": summary, "group_rows": group_rows}


def verification_markdown(verified: dict | None, args, mistakes: str) -> list[str]:
    """The two tables of :func:`verify_culprits`; ``mistakes`` says what the verified items are ("mistakes (as circle)")."""
    if not verified:
        return []
    items = len({record["uid"] for record in verified["groups"]})
    return [
        f"## Are the culprits real?  Actual re-fine-tuning for {items} {mistakes}",
        "",
        f"Each top-{args.top_k} culprit of these items under the three rankings (relative and plain with both roles, "
        f"plain positive role) was removed alone and the heads re-fine-tuned from θ̂ to a gradient norm of "
        f"{args.tolerance:g}; the change of the item's loss (nats; negative = removing the pair fixes "
        "the item a little) against ECIF's prediction:",
        "",
        markdown_table(["culprits", "n", "mean predicted", "mean actual", "share whose removal actually lowers the loss",
                        "Pearson", "Spearman"], verified["summary"]),
        "",
        f"Each ranking's top {args.top_k} culprits removed together and the heads re-fine-tuned: first for each verified "
        "item alone (means over the items), then for every mistake traced together as one confusion (`ecif.trace` "
        "with their uids: the test function is their mean loss).  Predicted: the group estimate.",
        "",
        markdown_table(["traced", "planted share", "predicted change of the loss", "actual change",
                        "items right after the removal"], verified["group_rows"]),
        "",
    ]


def main(argv=None) -> dict:
    args = parse_args(argv)
    machine = start(args)
    import ecif
    from ecif.data.demo import systematic_group
    from ecif.tasks.trace import predictions_table

    started = time.perf_counter()
    work = work_dir(args)
    checkpoint = pretraining_pool_checkpoint(work, args.name, args.n, args.seed) if args.pretrained_pool else None
    run = scored_demo_run(work, args.name, args.n, round(args.noise, 4), args.corruption, args.seed, checkpoint=checkpoint,
                          delta=args.delta)
    result_name = args.result_name or "trace" + ("-pretrained" if args.pretrained_pool else "") + (
        "-class" if args.corruption == "systematic-class" else "")
    label, colour, wrong = systematic_group(args.name)
    if args.corruption == "systematic-class":
        colour = "every"
    manifest = run.manifest()
    train = manifest[manifest["split"] == "train"]
    planted = train["corrupted"].astype(bool)
    base_rate = float(planted.mean())

    similarity = backbone_similarity(run, manifest, label, colour, wrong)
    table = predictions_table(run, splits=["test"])
    table = table.merge(manifest[["uid", "colour"]], on="uid")
    group = table[(table["label"] == label) & of_colour(table, colour)]
    mistakes = group[~group["correct"]]
    log(f"{len(group)} test items of the group ({colour} {label}); {len(mistakes)} wrong, "
        f"{int((mistakes['predicted'] == wrong).sum())} of them as {wrong}")

    shares_a_planted_caption = planted_caption_in_batch(run, manifest)
    per_item = []
    for item in group.itertuples():
        row = {"uid": item.uid, "predicted": item.predicted, "correct": bool(item.correct), "prob_true": float(item.prob_true)}
        for rank_by in ("total", "positive"):
            for relative in (True, False):
                traced = ecif.trace(run, item.uid, top_k=args.top_k, relative=relative, rank_by=rank_by)
                culprits = traced[traced["role"] == "culprit"]
                planted_culprits = culprits["corrupted"].astype(bool)
                name = ("relative" if relative else "plain") + ("" if rank_by == "total" else "_positive")
                row[name] = float(planted_culprits.mean())
                if name == "plain":
                    others = culprits[~planted_culprits]
                    as_negatives = others[others["main_role"] == "negative"]
                    row["others"] = len(others)
                    row["others_as_negatives"] = len(as_negatives)
                    of_wrong_class = as_negatives["label"] == wrong
                    row["as_negatives_of_wrong_class"] = int(of_wrong_class.sum())
                    row["as_negatives_sharing_a_planted_caption"] = int(
                        (of_wrong_class & as_negatives["row"].map(shares_a_planted_caption)).sum())
        per_item.append(row)

    rows = []
    for subset, items in (
        (f"predicted {wrong}", [r for r in per_item if r["predicted"] == wrong]),
        ("every mistake of the group", [r for r in per_item if not r["correct"]]),
        ("every test item of the group (right or wrong)", per_item),
    ):
        def mean(key: str):
            return float(np.mean([r[key] for r in items])) if items else None

        def pooled(part: str, whole: str):
            total = sum(r[whole] for r in items)
            return sum(r[part] for r in items) / total if total else None

        rows.append([subset, len(items), mean("relative"), mean("plain"), mean("relative_positive"), mean("plain_positive"),
                     pooled("others_as_negatives", "others"), pooled("as_negatives_of_wrong_class", "others_as_negatives"),
                     pooled("as_negatives_sharing_a_planted_caption", "others_as_negatives"), base_rate])

    # Every mistake of the group traced together: their mean loss is one test function (one confusion).
    as_wrong = mistakes[mistakes["predicted"] == wrong]
    if len(as_wrong) > 1:
        joint = {}
        for rank_by in ("total", "positive"):
            for relative in (True, False):
                traced = ecif.trace(run, as_wrong["uid"].tolist(), top_k=args.top_k, relative=relative, rank_by=rank_by)
                name = ("relative" if relative else "plain") + ("" if rank_by == "total" else "_positive")
                joint[name] = float(traced.loc[traced["role"] == "culprit", "corrupted"].astype(bool).mean())
        rows.append([f"the mistakes as {wrong} traced together (one confusion)", len(as_wrong), joint["relative"], joint["plain"],
                     joint["relative_positive"], joint["plain_positive"], None, None, None, base_rate])

    verified = None
    if args.verify > 0 and len(as_wrong):
        log(f"verifying the culprits of {min(args.verify, len(as_wrong))} mistakes (as {wrong}) by actual re-fine-tuning")
        verified = verify_culprits(run, as_wrong, args)

    def verdict(row: list) -> str:
        if row[2] is None:
            return "no mistakes to trace"
        parts = [f"{name} {value:.3f} → {'MET' if value >= TARGET_PRECISION else 'MISSED'}"
                 for name, value in (("both roles, relative (the default)", row[2]), ("both roles, plain", row[3]),
                                     ("positive role, relative", row[4]), ("positive role, plain", row[5]))]
        return "; ".join(parts)

    markdown = "\n".join([
        "# Trace-back against a planted systematic corruption",
        "",
        machine_markdown(machine),
        "",
        f"{args.name}, n={args.n}: {int(planted.sum())} of the {int(((train['label'] == label) & of_colour(train, colour)).sum())} "
        f"training pairs that show a {'' if colour == 'every' else colour + ' '}{label} are captioned as a {wrong} ({int(planted.sum())} planted pairs among "
        f"{len(train)} training pairs).  Test items of that group: {len(group)}, wrong: {len(mistakes)}.  For each mistake, "
        f"the share of planted pairs among its top-{args.top_k} culprits (`ecif.trace`), averaged over the mistakes:",
        "",
        markdown_table(["mistakes", "items", f"precision@{args.top_k} (relative)", f"precision@{args.top_k} (plain)",
                        "positive role (relative)", "positive role (plain)", "non-planted plain culprits acting as negatives",
                        f"of those: a {wrong}", f"of those: a {wrong} with the caption of a planted pair of its batch",
                        "base rate"], rows),
        "",
        "Precision columns: mean over the items.  Both roles: ranked by the pair's whole effect (ECIF, `ecif.trace` "
        "default).  Positive role: ranked by its effect through its own image–caption link alone "
        "(`rank_by=\"positive\"`).  The next three columns pool the plain top culprits of all the items: among those "
        "that are not planted, the share whose effect on the item comes mainly through the negative role "
        f"(`main_role`); among these, the share that are genuine {wrong} pairs, and the share that are genuine {wrong} "
        "pairs whose caption is word for word the caption of a planted pair in the same reference batch.",
        "",
        f"Where the backbone puts the group: cosine between the mean unit backbone image feature of the group's "
        f"{len(group)} test items and that of",
        "",
        markdown_table(["items", "n", "cosine"], similarity),
        "",
        f"**Target** precision@{args.top_k} ≥ {TARGET_PRECISION} (mistakes as {wrong}, one at a time): " + verdict(rows[0]),
        "",
        *([f"Traced together as one confusion: {verdict(rows[-1])}", ""] if len(rows) > 3 else []),
        *verification_markdown(verified, args, f"mistakes (as {wrong})"),
        f"Run: {run.directory}; {time.perf_counter() - started:.0f} s.",
    ])
    payload = {"settings": recorded_settings(args, as_text=True), "machine": machine, "items": per_item, "verified": verified,
               "table": rows, "base_rate": base_rate, "backbone_similarity": similarity, "markdown": markdown}
    publish(result_name, payload, markdown, args.results)
    return payload


if __name__ == "__main__":
    main()
