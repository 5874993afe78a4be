"""Cleaning that shows: drop the top 1%, 2%, 5%, 10% by each method, re-fine-tune, measure; and the brittleness check.

    python -m bench.cleaning                         # shapes, seeds 0,1,2, the auto δ (after bench.peers.tuned)
    python -m bench.cleaning --datasets shapes,digits --fractions 0.01,0.05

Per data set and seed, at the run's auto δ, on the same polished θ̂ and dense reference as
``bench.fidelity``: the pairs each method ranks most suspicious are removed and the heads actually
re-fine-tuned (warm start, gradient norm ≤ 1e-7, the library's own tolerance).  Methods: exact
and first-order ECIF (most harmful first), ECIF first-order self-influence (highest first),
CLIP-score (lowest first), each peer at the setting ``bench.peers.tuned`` chose for that seed (most harmful first; that script must
have run first), and a uniform random draw.  Brittleness (Koh & Liang's check, as in the ECIF paper):
the most *valuable* pairs by exact ECIF (most positive Δφ) removed instead.

Measured on the re-fine-tuned heads: the trusted loss φ (what the influence methods target), the
zero-shot accuracy and cross-entropy on the held-out test split.  Reported: means over seeds and the
difference from random removal, with 95% intervals from resampling the test items (paired: the same
resample for the method and for random) within each seed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench import common, fidelity
from bench.peers.tuned import PEER_SCORES

FRACTIONS = (0.01, 0.02, 0.05, 0.1)
#: (name, label, column in the peers' score file or the run's scores, +1 = high first, −1 = low first)
METHODS = (
    ("influence", "ECIF exact (ours)", -1),
    ("influence_first_order", "ECIF first order (ours)", -1),
    ("self_influence_first_order", "ECIF self-influence, first order (ours)", +1),
    ("clip_score", "CLIP-score", -1),
    ("trak", "TRAK, tuned", -1),
    ("kronfluence", "kronfluence, tuned", -1),
    ("tracin", "TracIn, tuned", -1),
    ("random", "random", 0),
    ("valuable", "most valuable by ECIF exact (brittleness)", +1),
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.argument_parser(__doc__, __spec__.name)
    parser.add_argument("--datasets", default="shapes")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fractions", default=",".join(f"{f:g}" for f in FRACTIONS))
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--tolerance", type=float, default=1e-7,
                        help="gradient norm of every re-fine-tune (default 1e-7, the library's fine-tuning tolerance)")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--from-json", default=None, metavar="FILE[,FILE...]", help="measure nothing: one report from earlier outputs")
    common.add_common_arguments(parser, seed=False, threads=1, name="cleaning")
    return parser.parse_args(argv)


def rankings(current, key: str, cache_dir: Path, seed: int) -> dict[str, np.ndarray]:
    """Each method's removal order (most suspicious first) over the training pairs."""
    import torch

    from ecif.influence.scores import self_influence
    from ecif.objective.contrastive import clip_scores

    peers = np.load(cache_dir / f"{key}-{PEER_SCORES}")
    with torch.no_grad():
        clip = clip_scores(current.problem.scope, current.theta, current.problem.data.image, current.problem.data.text).numpy()
    values = {
        "influence": peers["influence"], "influence_first_order": peers["influence_first_order"],
        "self_influence_first_order": self_influence(current.problem, current.theta, current.solver, negative="first_order"),
        "clip_score": clip, "trak": peers["trak"], "kronfluence": peers["kronfluence"], "tracin": peers["tracin"],
        "valuable": peers["influence"],
    }
    out = {}
    for name, _, direction in METHODS:
        if name == "random":
            out[name] = np.random.default_rng(90_000 + seed).permutation(current.problem.data.n_pairs)
        else:
            out[name] = np.argsort(-direction * np.asarray(values[name], float), kind="stable")
    return out


def test_items(engine):
    """The test split's image features and class indices (for zero-shot accuracy and cross-entropy)."""
    from bench.peers.setting import zero_shot_test_items
    from ecif.tasks.engine import split_rows

    return zero_shot_test_items(engine, split_rows(engine.manifest, engine.run.info.get("settings", {}).get("test_split", "test")))


def per_item(engine, theta, image, labels) -> tuple[np.ndarray, np.ndarray]:
    """``(correct [k] bool, cross-entropy [k] nats)`` of zero-shot classification of the test images."""
    import torch

    from ecif.objective.measurements import zero_shot_logits

    with torch.no_grad():
        logits = zero_shot_logits(engine.scope, theta, image, engine.prompts)
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    return (logits.argmax(1) == labels).numpy(), loss.numpy()


def measure(args, dataset: str, seed: int) -> dict:
    from ecif.tasks.engine import load_engine

    work = common.work_dir(args)
    run = common.scored_demo_run(work, dataset, args.n, seed=seed, checkpoint=fidelity.backbone(work, dataset, seed, args.n))
    engine = load_engine(run)
    delta = float(engine.delta)
    cache = common.RetrainCache(Path(run.directory) / "bench-fidelity-uniform")
    key = f"{dataset}-s{seed}-d{delta:g}"
    phi = engine.trusted_loss()
    current = fidelity.regime(engine, "auto", delta, engine.theta, args.tolerance, cache, key)
    corrupted = engine.manifest.iloc[engine.train_rows]["corrupted"].astype(bool).to_numpy()
    order = rankings(current, key, cache.directory, seed)
    image, labels = test_items(engine)
    correct, loss = per_item(engine, current.theta, image, labels)
    out = {"dataset": dataset, "seed": seed, "delta": delta, "training_pairs": int(len(corrupted)), "test_items": int(len(labels)),
           "before": {"phi": float(phi(current.theta)), "correct": correct.tolist(), "loss": loss.tolist()}, "removals": []}
    n = current.problem.data.n_pairs
    for fraction in (float(f) for f in args.fractions.split(",")):
        count = max(1, int(round(fraction * n)))
        for name, _, _ in METHODS:
            drop = np.sort(order[name][:count])
            record_key = f"{key}-clean-{name}-{count}"
            record = cache.get(record_key)
            if record is None:
                theta, report, seconds = fidelity.retrain(current, drop, args.tolerance)
                correct, loss = per_item(engine, theta, image, labels)
                record = {"method": name, "fraction": fraction, "removed": count, "corrupted_removed": int(corrupted[drop].sum()),
                          "phi": float(phi(theta)), "correct": correct.tolist(), "loss": loss.tolist(),
                          "gradient_norm": report.gradient_norm, "seconds": seconds}
                cache.put(record_key, record)
            out["removals"].append(record)
        common.log(f"{key}: {fraction:.0%} removed by every method")
    return out


def paired_interval(results: list[dict], method: str, fraction: float, field: str, draws: int, against: str | None) -> tuple[float, float, float]:
    """Mean over seeds of a per-test-item metric (minus ``against``'s), with a 95% interval from
    resampling the test items within each seed (the same resample for both)."""
    rng = np.random.default_rng(0)
    pairs = []
    for r in results:
        mine = next(x for x in r["removals"] if x["method"] == method and abs(x["fraction"] - fraction) < 1e-12)
        other = next(x for x in r["removals"] if x["method"] == against and abs(x["fraction"] - fraction) < 1e-12) if against else None
        a = np.asarray(mine[field], float)
        pairs.append((a, np.asarray(other[field], float) if other else np.zeros_like(a)))
    point = float(np.mean([(a - b).mean() for a, b in pairs]))
    samples = []
    for _ in range(draws):
        values = []
        for a, b in pairs:
            pick = rng.integers(0, len(a), len(a))
            values.append((a[pick] - b[pick]).mean())
        samples.append(np.mean(values))
    low, high = np.percentile(samples, [2.5, 97.5])
    return point, float(low), float(high)


def report(results: list[dict], draws: int, machine: dict) -> tuple[str, list[dict]]:
    fractions = sorted({x["fraction"] for r in results for x in r["removals"]})
    seeds = ", ".join(str(r["seed"]) for r in results)
    first = results[0]
    deltas = ", ".join(f"{r['delta']:g}" for r in results)
    lines = ["# Cleaning: remove the top pairs by each method, re-fine-tune, measure", "", common.machine_markdown(machine), "",
             f"{first['dataset']}, seeds {seeds} (auto δ: {deltas}); "
             f"{first['training_pairs']} training pairs and {first['test_items']} test images per seed.  Each cell: mean over seeds "
             "[95% interval, resampling the test items within each seed]; the gain columns are paired differences from random "
             "removal of the same number of pairs (positive = better than random).  Accuracy in percentage points; one test "
             f"image is {100 / first['test_items']:.2f} points.  φ = trusted loss (no interval: it is the set the influence methods "
             "target, not a held-out one).", ""]
    before_acc = float(np.mean([np.mean(r["before"]["correct"]) for r in results])) * 100
    before_loss = float(np.mean([np.mean(r["before"]["loss"]) for r in results]))
    lines += [f"Before any removal: test accuracy {before_acc:.2f}%, test cross-entropy {before_loss:.4f}.", ""]
    rows = []
    for fraction in fractions:
        lines += [f"## {fraction:.0%} removed", "",
                  "| removed by | corrupted among removed | test accuracy % | gain over random (points) | test cross-entropy | "
                  "gain over random (nats) | φ |", "|---|---|---|---|---|---|---|"]
        for name, label, _ in METHODS:
            entries = [next(x for x in r["removals"] if x["method"] == name and abs(x["fraction"] - fraction) < 1e-12) for r in results]
            acc = paired_interval(results, name, fraction, "correct", draws, None)
            gain = paired_interval(results, name, fraction, "correct", draws, "random")
            ce = paired_interval(results, name, fraction, "loss", draws, None)
            ce_gain = paired_interval(results, name, fraction, "loss", draws, "random")
            corrupted = np.mean([e["corrupted_removed"] / e["removed"] for e in entries])
            phi = np.mean([e["phi"] for e in entries])
            row = {"fraction": fraction, "method": name, "accuracy": acc, "accuracy_gain": gain, "cross_entropy": ce,
                   "cross_entropy_gain": (-ce_gain[0], -ce_gain[2], -ce_gain[1]), "corrupted_fraction": float(corrupted), "phi": float(phi)}
            rows.append(row)
            gain_text = "–" if name == "random" else f"{100 * gain[0]:+.2f} [{100 * gain[1]:+.2f}, {100 * gain[2]:+.2f}]"
            ce_text = "–" if name == "random" else f"{-ce_gain[0]:+.4f} [{-ce_gain[2]:+.4f}, {-ce_gain[1]:+.4f}]"
            lines.append(f"| {label} | {corrupted:.0%} | {100 * acc[0]:.2f} [{100 * acc[1]:.2f}, {100 * acc[2]:.2f}] | {gain_text} | "
                         f"{ce[0]:.4f} [{ce[1]:.4f}, {ce[2]:.4f}] | {ce_text} | {phi:.4f} |")
        lines.append("")
    return "\n".join(lines), rows


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.from_json:
        results, machine = common.load_result_files(args.from_json)
    else:
        machine = common.start(args)
        started = time.perf_counter()
        results = []
        for dataset in args.datasets.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                results.append(measure(args, dataset, seed))
                markdown, rows = report([r for r in results if r["dataset"] == dataset], args.bootstrap, machine)
                common.write_results(args.name, {"settings": common.recorded_settings(args), "machine": machine, "results": results,
                                                 "seconds": time.perf_counter() - started, "markdown": markdown}, markdown, args.results)
    parts, summary = [], []
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        markdown, rows = report([r for r in results if r["dataset"] == dataset], args.bootstrap, machine)
        parts.append(markdown)
        summary += [{"dataset": dataset, **row} for row in rows]
    markdown = "\n\n".join(parts)
    common.publish(args.name, {"machine": machine, "results": results, "summary": summary, "markdown": markdown}, markdown, args.results)


if __name__ == "__main__":
    main()
