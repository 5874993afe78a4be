"""Misprediction trace-back (ECIF_METHOD §7): which training pairs pushed the model to a wrong answer.

For a test item (an image with a true class, scored zero-shot against class prompts) the test
function is its cross-entropy.  A training pair's influence on it is the predicted change of that
loss if the pair is removed: **culprits** have negative influence (removing them would fix the
item), **supporters** positive (they hold up the right answer).  The default ranking is the
relative score ``Δφ_n / ‖Δθ_n‖_H`` (RelatIF) so that a few high-leverage pairs do not top every query.

A pair acts in two roles (ECIF_METHOD §1): through its own image–caption link (positive) and as a
negative inside the softmax of the other pairs of its batch.  A correct pair can be a real culprit
through the negative role alone: for instance, a genuine red circle whose caption is word for word
that of a mislabelled red square in its batch pushes that caption away from circle images, towards
the square.  Removing it would lower the item's loss, but its caption is right, so there is nothing
to fix in it.  ``main_role`` says which role dominates, and ``rank_by="positive"`` ranks by the positive-role
part alone: the pairs whose own caption drives the item to its answer, the ones a curator can fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ecif.influence.scores import PairInfluence, euclidean_step_norms, gradient_of, influence_on, relative_influence
from ecif.influence.test_functions import zero_shot_logits, zero_shot_loss
from ecif.run import MISPREDICTIONS_FILE, Run
from ecif.tasks.engine import Engine, load_engine, split_rows
from ecif.tasks.evaluate import influence_table


RankBy = Literal["total", "positive"]
StepNorm = Literal["hessian", "euclidean"]


def _class_index(engine: Engine, labels: pd.Series) -> np.ndarray:
    if engine.prompts is None:
        raise ValueError(f"{engine.run.directory} has no zero-shot classes (the manifest has no labels)")
    lookup = {name: position for position, name in enumerate(engine.prompts.names)}
    return np.asarray([lookup.get(str(label), -1) if not pd.isna(label) else -1 for label in labels])


def zero_shot_table(run: Run | str, splits: list[str]) -> pd.DataFrame:
    """Zero-shot predictions of every labelled item of ``splits`` under the fine-tuned heads.

    Columns: ``row``, ``uid``, ``filepath``, ``caption``, ``split``, ``label`` (true class),
    ``predicted``, ``prob_true``, ``prob_predicted``, ``loss`` (nats), ``correct``.  Wrong first.
    """
    engine = load_engine(run)
    columns = ["row", "uid", "filepath", "caption", "split", "label", "predicted", "prob_true", "prob_predicted", "loss", "correct"]
    if engine.prompts is None:
        return pd.DataFrame(columns=columns)
    rows = np.concatenate([split_rows(engine.manifest, split) for split in dict.fromkeys(splits)])
    items = engine.manifest.iloc[rows]
    classes = _class_index(engine, items["label"])
    rows, items, classes = rows[classes >= 0], items[classes >= 0], classes[classes >= 0]
    details = {name: items[name].to_numpy() for name in ("uid", "filepath", "caption", "split")}
    table = pd.DataFrame({"row": rows, **details, **zero_shot_answers(engine, engine.theta, rows, classes)})
    return table.sort_values(["correct", "loss"], ascending=[True, False]).reset_index(drop=True)


def zero_shot_answers(engine: Engine, theta: Tensor, rows: np.ndarray, classes: np.ndarray) -> dict[str, np.ndarray]:
    """Zero-shot answers under heads ``theta`` for manifest ``rows`` whose true class indices are ``classes``.

    Arrays ``[k]``: ``label`` and ``predicted`` (class names), ``prob_true``, ``prob_predicted``,
    ``loss`` (cross-entropy in nats) and ``correct``.
    """
    with torch.no_grad():
        logits = zero_shot_logits(engine.scope, theta, engine.image_tensor(np.asarray(rows)), engine.prompts)
        probabilities = torch.softmax(logits, dim=1).numpy()
    classes, predicted = np.asarray(classes), probabilities.argmax(axis=1)
    names, positions = np.asarray(engine.prompts.names, dtype=object), np.arange(len(classes))
    return {
        "label": names[classes],
        "predicted": names[predicted],
        "prob_true": probabilities[positions, classes],
        "prob_predicted": probabilities[positions, predicted],
        "loss": -np.log(np.maximum(probabilities[positions, classes], 1e-300)),
        "correct": predicted == classes,
    }


def trace(
    run: Run | str,
    uid: str | Sequence[str],
    top_k: int = 20,
    relative: bool = True,
    norm: StepNorm = "hessian",
    rank_by: RankBy = "total",
) -> pd.DataFrame:
    """Culprits and supporters of one labelled item's zero-shot loss, or of several items' mean loss.

    Returns ``2·top_k`` training rows: the ``top_k`` culprits (most negative ``score`` first) then the
    ``top_k`` supporters (most positive first), with ``role`` (culprit / supporter), ``score`` (the
    value ranked by), ``influence`` (predicted change of the item's loss in nats if the pair is
    removed), ``influence_pos``/``influence_neg`` (its positive- and negative-role parts),
    ``relative_influence``, ``main_role`` (``"positive"`` or ``"negative"``: the role with the larger
    share of the pair's effect on this item) and the pair's manifest columns.

    The score is ``relative_influence`` by default, ``influence`` with ``relative=False``.  With
    ``rank_by="positive"`` it is the positive-role part ``influence_pos`` (divided by the same step
    norm when relative) instead of the total, leaving out pairs that act on the item only as
    negatives; a culprit is then negative in ``influence_pos``, not necessarily in ``influence``.

    ``uid`` may be a list: the test function is then the items' mean zero-shot loss (one solve), and
    the culprits are the pairs behind what the items share, such as a confusion (see
    :func:`confusion_items`), rather than behind one item's quirks.  bench/trace measured the planted
    share of a confusion's top-10 positive-role culprits at 1.0 where single items averaged 0.70
    (every red square captioned "circle"; demo backbone).  A uid listed twice counts once.
    """
    for name, value, allowed in (("rank_by", rank_by, get_args(RankBy)), ("norm", norm, get_args(StepNorm))):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    engine = load_engine(run)
    rows, labels = labelled_rows(engine, item_uids(uid))
    table = influence_table(engine, _item_influence(engine, rows, labels))
    step_norms = _step_norms(engine, norm)
    table["relative_influence"] = relative_influence(table["influence"].to_numpy(), step_norms)
    table["main_role"] = np.where(table["influence_pos"].abs() >= table["influence_neg"].abs(), "positive", "negative")
    part = table["influence" if rank_by == "total" else "influence_pos"].to_numpy()
    table["score"] = relative_influence(part, step_norms) if relative else part
    culprits = table.nsmallest(top_k, "score").assign(role="culprit")
    supporters = table.nlargest(top_k, "score").assign(role="supporter")
    result = pd.concat([culprits, supporters], ignore_index=True)
    manifest_columns = [c for c in engine.manifest.columns if c not in result.columns and c != "source_row"]
    details = engine.manifest.loc[result["row"], manifest_columns].reset_index(drop=True)
    return pd.concat([result, details], axis=1)


def item_uids(uid: str | int | Sequence[str | int]) -> list[str]:
    """One uid or several, as a list of strings (a uid may be a number in the manifest)."""
    return [str(uid)] if isinstance(uid, (str, int, np.integer)) else [str(value) for value in uid]


def parse_confusion(text: str) -> tuple[str, str]:
    """``"TRUE:PREDICTED"`` → ``(true class, predicted class)``; the last colon splits, so a class name may hold one."""
    label, separator, predicted = str(text).rpartition(":")
    if not separator or not label or not predicted:
        raise ValueError(f"a confusion is written TRUE:PREDICTED (two class names), got {text!r}")
    return label, predicted


def labelled_rows(engine: Engine, uids: list[str]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Manifest rows and zero-shot class indices of labelled items (sorted by row, each once).

    Raises ``KeyError`` for an unknown uid and ``ValueError`` for an item without a zero-shot class.
    """
    if not uids:
        raise ValueError("trace needs at least one item uid")
    positions = engine.row_of_uid
    missing = [str(uid) for uid in uids if str(uid) not in positions]
    if missing:
        raise KeyError(f"no item with uid {', '.join(map(repr, missing[:5]))} in {engine.run.directory}")
    rows = sorted({positions[str(uid)] for uid in uids})
    labels = _class_index(engine, engine.manifest.iloc[rows]["label"])
    unlabelled = [str(engine.manifest["uid"].iloc[row]) for row, label in zip(rows, labels) if label < 0]
    if unlabelled:
        raise ValueError(f"item {', '.join(map(repr, unlabelled[:5]))} has no label among the zero-shot classes; trace needs a true class")
    return tuple(rows), tuple(int(label) for label in labels)


def confusion_items(run: Run | str, label: str, predicted: str) -> list[str]:
    """Uids of the mispredicted items of true class ``label`` that the model calls ``predicted`` (worst first)."""
    table = mispredictions(run)
    chosen = table[(table["label"].astype(str) == str(label)) & (table["predicted"].astype(str) == str(predicted))]
    if chosen.empty:
        present = ", ".join(f"{row.label}:{row.predicted}" for row in confusions(run).head(20).itertuples()) or "none"
        raise ValueError(f"no mispredicted item of class {label!r} is predicted as {predicted!r} (confusions: {present})")
    return chosen.sort_values("loss", ascending=False)["uid"].astype(str).tolist()


def confusions(run: Run | str) -> pd.DataFrame:
    """Mispredictions per (true ``label``, ``predicted``) class pair, column ``mistakes``, most frequent first."""
    table = mispredictions(run)
    counts = table.groupby(["label", "predicted"], as_index=False).size().rename(columns={"size": "mistakes"})
    return counts.sort_values(["mistakes", "label", "predicted"], ascending=[False, True, True], ignore_index=True)


#: Items whose influence tables an engine keeps: switching a trace's ranking or norm, or coming back
#: to an item, costs no new solve (one solve per test function; a few seconds, more for the blocks scope).
ITEM_CACHE_SIZE = 64


def _item_influence(engine: Engine, rows: tuple[int, ...], labels: tuple[int, ...]) -> PairInfluence:
    """Every training pair's influence on the items' mean zero-shot loss, cached on the engine."""
    key = ("item", rows, labels)
    with engine.cache_lock:
        cache = engine.cache
        if key not in cache:
            function = zero_shot_loss(engine.scope, engine.image_tensor(np.asarray(rows)), torch.tensor(labels), engine.prompts)
            cache[key] = influence_on(engine.problem, engine.theta, engine.solver, gradient_of(function, engine.theta))
            items = [name for name in cache if name[0] == "item"]
            for stale in items[: max(0, len(items) - ITEM_CACHE_SIZE)]:
                del cache[stale]
        return cache[key]


def _step_norms(engine: Engine, norm: StepNorm) -> np.ndarray:
    """``‖Δθ_n‖`` per training pair in the chosen norm (the same for every item: cached on the engine)."""
    key = ("step norms", norm)
    with engine.cache_lock:
        if key not in engine.cache:
            if norm == "hessian":
                engine.cache[key] = np.sqrt(np.maximum(_self_influence(engine) / engine.problem.data.normaliser, 0.0))
            else:
                engine.cache[key] = euclidean_step_norms(engine.problem, engine.theta, engine.solver)
        return engine.cache[key]


def _self_influence(engine: Engine) -> np.ndarray:
    """Self-influence per training pair, from the scores table when scoring has finished."""
    run = engine.run
    if run.is_scored:
        scores = run.scores().set_index("row")
        return scores.loc[engine.train_rows, "self_influence"].to_numpy()
    from ecif.influence.scores import self_influence

    return self_influence(engine.problem, engine.theta, engine.solver)


def mispredictions(run: Run | str) -> pd.DataFrame:
    """The labelled test/trusted items the model gets wrong, worst first.

    From the run's cached table; a run stopped before the pipeline's mispredictions stage gets it
    computed here (one forward pass of the heads).
    """
    run = run if isinstance(run, Run) else Run(run)
    if run.has(MISPREDICTIONS_FILE):
        table = run.mispredictions()
    else:
        settings = run.info.get("settings", {})
        table = zero_shot_table(run, splits=[settings.get("test_split", "test"), settings.get("trusted_split", "val")])
    return table[~table["correct"]].reset_index(drop=True)
