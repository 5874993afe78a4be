"""Misprediction trace-back (docs/method.md §7): which training pairs pushed the model to a wrong answer.

For a test item the test function is the loss of its right answer (the cross-entropy; with the
sigmoid loss, SigLIP's terms of the item against every answer: ``answer_losses``).  An item with a true
class is asked for it among the class prompts (zero-shot classification); an item without one (a
manifest without labels, as web data usually is) is asked for its own caption among the distinct
captions of its split (image-to-caption retrieval, the question CLIP answers).  A training pair's influence on it is the predicted change of that
loss if the pair is removed: **culprits** have negative influence (removing them would fix the
item), **supporters** positive (they hold up the right answer).  The default ranking is the
relative score ``Δφ_n / ‖Δθ_n‖_H`` (RelatIF) so that a few high-leverage pairs do not top every query.

A pair acts in two roles (docs/method.md §1): through its own image–caption link (positive) and as a
negative inside the softmax of the other pairs of its batch.  A correct pair can be a real culprit
through the negative role alone: for instance, a genuine red circle whose caption is word for word
that of a mislabelled red square in its batch pushes that caption away from circle images, towards
the square.  Removing it would lower the item's loss, but its caption is right, so there is nothing
to fix in it.  ``main_role`` says which role dominates, and ``rank_by="positive"`` ranks by the positive-role
part alone: the pairs whose own caption drives the item to its answer, the ones a curator can fix.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ecif.influence.scores import PairInfluence, euclidean_step_norms, gradient_of, influence_on, relative_influence
from ecif.objective.measurements import (
    TestFunction,
    ZeroShotPrompts,
    answer_log_probabilities,
    answer_losses,
    class_embeddings,
    logits_against,
    zero_shot_loss,
)
from ecif.run import MISPREDICTIONS_FILE, Run
from ecif.tasks.engine import Engine, load_engine, split_rows
from ecif.tasks.scoring import influence_table

RankBy = Literal["total", "positive"]
StepNorm = Literal["hessian", "euclidean"]


ZERO_SHOT, RETRIEVAL = "zero-shot", "retrieval"


@dataclass(frozen=True)
class Items:
    """Test items and the question each is asked; the loss traced is that of the right answer.

    ``candidates[i]`` is ``None`` when item ``i`` is asked for its class among the class prompts
    (zero-shot), or the name of its split when it is asked for its own caption among that split's
    distinct captions (retrieval: the item has no label).  ``answers[i]`` indexes the right answer
    among the item's candidates.
    """

    rows: tuple[int, ...]
    answers: tuple[int, ...]
    candidates: tuple[str | None, ...]

    def groups(self) -> Iterator[tuple[str | None, np.ndarray]]:
        """``(candidates, positions)`` for each distinct question set, positions into ``rows``."""
        for candidates in dict.fromkeys(self.candidates):
            yield candidates, np.asarray([i for i, asked in enumerate(self.candidates) if asked == candidates], dtype=np.int64)


def caption_candidates(engine: Engine, split: str) -> tuple[ZeroShotPrompts, dict[int, int]]:
    """The distinct captions of ``split`` as the answers of a retrieval item, and each row's answer.

    Returns the captions as prompts (one per answer, named by its first caption) and manifest row →
    answer index.  Captions the text tower encodes identically (the same words; case, spacing and
    truncation are the tokenizer's business) are one answer: on templated data many images share a
    caption, and a model that picks an identical caption of another image is right.  Cached on the
    engine.  With the blocks scope the retrieval loss runs the text blocks over every answer, so
    its cost grows with the number of distinct captions in the split.
    """
    key = ("captions", split)
    with engine.cache_lock:
        if key not in engine.cache:
            rows = split_rows(engine.manifest, split)
            features = np.ascontiguousarray(engine.text[rows]).reshape(len(rows), -1)
            _, first, answer = np.unique(features.view(np.dtype((np.void, features.dtype.itemsize * features.shape[1]))).ravel(),
                                         return_index=True, return_inverse=True)
            if len(first) < 2:
                raise ValueError(f"split {split!r} has {len(first)} distinct caption(s); retrieval needs at least 2")
            # Answers in the order their first caption appears, so that names read like the split.
            order = np.argsort(first)
            position = np.empty_like(order)
            position[order] = np.arange(len(order))
            names = engine.manifest["caption"].iloc[rows[first[order]]].astype(str).tolist()
            prompts = ZeroShotPrompts.from_arrays(engine.text[rows[first[order]]], np.arange(len(order)), names, engine.device)
            engine.cache[key] = (prompts, dict(zip(rows.tolist(), position[answer.ravel()].tolist())))
        return engine.cache[key]


def candidate_prompts(engine: Engine, candidates: str | None) -> ZeroShotPrompts:
    """The class prompts (``None``) or the captions of split ``candidates``."""
    if candidates is None:
        if engine.prompts is None:
            raise ValueError(f"{engine.run.directory} has no zero-shot classes (the manifest has no labels)")
        return engine.prompts
    return caption_candidates(engine, candidates)[0]


def _questions(engine: Engine, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For manifest ``rows``: right-answer index, candidates (``None`` or a split) and why an item cannot be asked ("" if it can).

    An item with a label is asked for its class, and cannot be if the label is not a zero-shot
    class; an item without one is asked for its caption among its split's.
    """
    labels = engine.manifest["label"].iloc[rows] if "label" in engine.manifest.columns else pd.Series([None] * len(rows))
    unlabelled = labels.isna().to_numpy() | (engine.prompts is None)
    answers = np.full(len(rows), -1, dtype=np.int64)
    problems = np.full(len(rows), "", dtype=object)
    if not unlabelled.all():
        class_of = {name: position for position, name in enumerate(engine.prompts.names)}
        answers[~unlabelled] = [class_of.get(str(label), -1) for label in labels[~unlabelled]]
        problems[~unlabelled & (answers < 0)] = "its label is not one of the zero-shot classes"
    splits = engine.manifest["split"].iloc[rows].astype(str).to_numpy()
    candidates = np.where(unlabelled, splits, None).astype(object)
    for split in np.unique(splits[unlabelled]):
        asked = unlabelled & (splits == split)
        try:
            answer_of_row = caption_candidates(engine, split)[1]
        except ValueError as error:
            problems[asked] = str(error)
            continue
        answers[asked] = [answer_of_row[int(row)] for row in rows[asked]]
    return answers, candidates, problems


def item_targets(engine: Engine, uids: list[str]) -> Items:
    """What each item is asked (see :class:`Items`): its class when it has a label, else its caption.

    Items are sorted by manifest row, each once.  Raises ``KeyError`` for an unknown uid and
    ``ValueError`` for an item that cannot be asked (a label that is not a zero-shot class, or a
    split with fewer than two distinct captions).
    """
    if not uids:
        raise ValueError("trace needs at least one item uid")
    positions = engine.row_of_uid
    missing = [str(uid) for uid in uids if str(uid) not in positions]
    if missing:
        raise KeyError(f"no item with uid {', '.join(map(repr, missing[:5]))} in {engine.run.directory}")
    rows = np.asarray(sorted({positions[str(uid)] for uid in uids}), dtype=np.int64)
    answers, candidates, problems = _questions(engine, rows)
    if (problems != "").any():
        bad = [f"{engine.manifest['uid'].iloc[row]!r} ({problem})" for row, problem in zip(rows, problems) if problem][:5]
        raise ValueError(f"item {', '.join(bad)} cannot be traced")
    return Items(tuple(rows.tolist()), tuple(answers.tolist()), tuple(candidates.tolist()))


def items_loss(engine: Engine, items: Items) -> TestFunction:
    """``φ(θ)`` = the items' mean loss of their right answers (:func:`answer_losses`, nats)."""
    parts = [
        (len(positions) / len(items.rows),
         zero_shot_loss(engine.scope, engine.image_tensor(np.asarray(items.rows)[positions]),
                        torch.as_tensor(np.asarray(items.answers)[positions], device=engine.device), candidate_prompts(engine, candidates)))
        for candidates, positions in items.groups()
    ]

    def function(theta: Tensor) -> Tensor:
        return sum(weight * loss(theta) for weight, loss in parts)

    return function


#: Images scored against the candidates at once: bounds the ``[chunk, candidates]`` logits of a
#: retrieval table, where the candidates are every distinct caption of a split.
ANSWER_CHUNK = 1024


def answers_among(
    engine: Engine, theta: Tensor, rows: np.ndarray, classes: np.ndarray, prompts: ZeroShotPrompts | None = None
) -> dict[str, np.ndarray]:
    """Answers under heads ``theta`` for manifest ``rows`` among ``prompts`` (class prompts for zero-shot, or
    captions for retrieval), whose right answers are ``classes`` (indices into ``prompts``).

    ``prompts`` defaults to the run's class prompts.  Arrays ``[k]``: ``label`` and ``predicted``
    (answer names: classes, or captions for retrieval), ``prob_true``, ``prob_predicted`` (softmax, or
    each answer's own sigmoid with the sigmoid loss), ``loss`` (:func:`answer_losses`, nats) and
    ``correct``.  Memory ``O(chunk · candidates)``, whatever ``k``.
    """
    prompts = engine.prompts if prompts is None else prompts
    rows, classes = np.asarray(rows), np.asarray(classes, dtype=np.int64)
    predicted = np.zeros(len(rows), dtype=np.int64)
    log_true, log_predicted, losses = np.zeros(len(rows)), np.zeros(len(rows)), np.zeros(len(rows))
    with torch.no_grad():
        answers = class_embeddings(engine.scope, theta, prompts)
        for start in range(0, len(rows), ANSWER_CHUNK):
            chunk = slice(start, start + ANSWER_CHUNK)
            logits = logits_against(engine.scope, theta, engine.image_tensor(rows[chunk]), answers)
            log_p = answer_log_probabilities(engine.scope, logits)
            best = log_p.argmax(dim=1)
            truth = torch.as_tensor(classes[chunk], device=log_p.device)
            predicted[chunk] = best.cpu().numpy()
            log_true[chunk] = log_p.gather(1, truth[:, None])[:, 0].cpu().numpy()
            losses[chunk] = answer_losses(engine.scope, logits, truth).cpu().numpy()
            log_predicted[chunk] = log_p.gather(1, best[:, None])[:, 0].cpu().numpy()
    names = np.asarray(prompts.names, dtype=object)
    return {
        "label": names[classes],
        "predicted": names[predicted],
        "prob_true": np.exp(log_true),
        "prob_predicted": np.exp(log_predicted),
        "loss": losses,
        "correct": predicted == classes,
    }


def item_answers(engine: Engine, theta: Tensor, items: Items) -> dict[str, np.ndarray]:
    """:func:`answers_among` for mixed items, in ``items.rows`` order, plus ``kind`` (zero-shot / retrieval)."""
    answers: dict[str, np.ndarray] = {}
    rows, classes = np.asarray(items.rows), np.asarray(items.answers)
    for candidates, positions in items.groups():
        part = answers_among(engine, theta, rows[positions], classes[positions], candidate_prompts(engine, candidates))
        part["kind"] = np.full(len(positions), ZERO_SHOT if candidates is None else RETRIEVAL, dtype=object)
        for name, values in part.items():
            answers.setdefault(name, np.empty(len(rows), dtype=values.dtype))[positions] = values
    return answers


PREDICTION_COLUMNS = ["row", "uid", "filepath", "caption", "split", "kind", "label", "predicted", "prob_true", "prob_predicted", "loss", "correct"]


def predictions_table(run: Run | str, splits: list[str]) -> pd.DataFrame:
    """The fine-tuned model's answer for every item of ``splits`` that can be asked, wrong first.

    An item with a label is classified against the class prompts (``kind`` zero-shot, ``label``
    its class; left out if the label is not a zero-shot class); an item without one retrieves a
    caption among its split's distinct captions (``kind`` retrieval, ``label`` its own caption;
    left out if the split has fewer than two).  Columns: ``row``, ``uid``, ``filepath``,
    ``caption``, ``split``, ``kind``, ``label``, ``predicted``, ``prob_true``,
    ``prob_predicted``, ``loss`` (nats), ``correct``.
    """
    engine = load_engine(run)
    rows = np.unique(np.concatenate([split_rows(engine.manifest, split) for split in dict.fromkeys(splits)]))
    answers, candidates, problems = _questions(engine, rows)
    askable = problems == ""
    if not askable.any():
        return pd.DataFrame({column: pd.Series(dtype=bool if column == "correct" else object) for column in PREDICTION_COLUMNS})
    items = Items(tuple(rows[askable].tolist()), tuple(answers[askable].tolist()), tuple(candidates[askable].tolist()))
    chosen = engine.manifest.iloc[rows[askable]]
    details = {name: chosen[name].to_numpy() for name in ("uid", "filepath", "caption", "split")}
    table = pd.DataFrame({"row": items.rows, **details, **item_answers(engine, engine.theta, items)})[PREDICTION_COLUMNS]
    return table.sort_values(["correct", "loss"], ascending=[True, False]).reset_index(drop=True)


def trace(
    run: Run | str,
    uid: str | Sequence[str],
    top_k: int = 20,
    relative: bool = True,
    norm: StepNorm = "hessian",
    rank_by: RankBy = "total",
) -> pd.DataFrame:
    """Culprits and supporters of one test item's loss, or of several items' mean loss.

    The item's loss is the cross-entropy of its right answer: its class among the class prompts, or,
    for an item without a class, its own caption among its split's captions (see :class:`Items`).

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

    ``uid`` may be a list: the test function is then the items' mean loss (one solve), and
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
    table = influence_table(engine, _item_influence(engine, item_targets(engine, item_uids(uid))))
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


def confusion_items(run: Run | str, label: str, predicted: str, wrong: pd.DataFrame | None = None) -> list[str]:
    """Uids of the mispredicted items of true class ``label`` that the model calls ``predicted`` (worst first).

    ``wrong``: the :func:`mispredictions` table when the caller has it already.
    """
    table = _zero_shot_mistakes(run, wrong)
    chosen = table[(table["label"].astype(str) == str(label)) & (table["predicted"].astype(str) == str(predicted))]
    if chosen.empty:
        present = ", ".join(f"{row.label}:{row.predicted}" for row in confusions(run, table).head(20).itertuples()) or "none"
        raise ValueError(f"no mispredicted item of class {label!r} is predicted as {predicted!r} (confusions: {present})")
    return chosen.sort_values("loss", ascending=False)["uid"].astype(str).tolist()


def confusions(run: Run | str, wrong: pd.DataFrame | None = None) -> pd.DataFrame:
    """Zero-shot mispredictions per (true ``label``, ``predicted``) class pair, column ``mistakes``, most frequent first.

    ``wrong``: the :func:`mispredictions` table when the caller has it already.  Retrieval mistakes
    are left out: a caption-to-caption confusion rarely repeats.
    """
    table = _zero_shot_mistakes(run, wrong)
    counts = table.groupby(["label", "predicted"], as_index=False).size().rename(columns={"size": "mistakes"})
    return counts.sort_values(["mistakes", "label", "predicted"], ascending=[False, True, True], ignore_index=True)


def _zero_shot_mistakes(run: Run | str, wrong: pd.DataFrame | None) -> pd.DataFrame:
    table = mispredictions(run) if wrong is None else wrong
    table = table[~table["correct"].astype(bool)]
    # Tables written before retrieval items existed have no kind column: every item was zero-shot.
    return table[table["kind"] == ZERO_SHOT] if "kind" in table.columns else table


#: Items whose influence tables an engine keeps: switching a trace's ranking or norm, or coming back
#: to an item, costs no new solve (one solve per test function; a few seconds, more for the blocks scope).
ITEM_CACHE_SIZE = 64


def _item_influence(engine: Engine, items: Items) -> PairInfluence:
    """Every training pair's influence on the items' mean loss (:func:`items_loss`), cached on the engine."""
    key = ("item", items)
    with engine.cache_lock:
        cache = engine.cache
        if key not in cache:
            function = items_loss(engine, items)
            cache[key] = influence_on(engine.problem, engine.theta, engine.solver, gradient_of(function, engine.theta))
            kept = [name for name in cache if name[0] == "item"]
            for stale in kept[: max(0, len(kept) - ITEM_CACHE_SIZE)]:
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
    """The test/trusted items the model gets wrong (zero-shot class or retrieved caption), worst first.

    From the run's cached table; a run stopped before the pipeline's mispredictions stage gets it
    computed here (one forward pass of the heads).
    """
    run = run if isinstance(run, Run) else Run(run)
    if run.has(MISPREDICTIONS_FILE):
        table = run.mispredictions()
    else:
        settings = run.info.get("settings", {})
        table = predictions_table(run, splits=[settings.get("test_split", "test"), settings.get("trusted_split", "val")])
    return table[~table["correct"].astype(bool)].reset_index(drop=True)
