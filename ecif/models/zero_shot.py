"""Zero-shot classification with class prompts, computed from backbone features and the heads.

Working from pre-projection features means the same code scores the loaded model and any edited
or fine-tuned heads (pass ``heads``), without running the backbone again.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ecif.data import ZeroShotClasses
from ecif.models.features import Features, Heads, PromptFeatures, compute_features, encode_prompts, get_heads
from ecif.models.open_clip_models import LoadedModel


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def class_embeddings(prompts: PromptFeatures, W_text: np.ndarray) -> np.ndarray:
    """Unit class embeddings, float64 [C, e]: the mean of each class's normalised prompt embeddings,
    renormalised (prompt ensembling, as in CLIP)."""
    prompt_embeddings = _unit_rows(prompts.features.astype(np.float64) @ W_text)
    sums = np.zeros((len(prompts.names), W_text.shape[1]))
    np.add.at(sums, prompts.class_index, prompt_embeddings)
    return _unit_rows(sums)


def zero_shot_probabilities(image_features: np.ndarray, prompts: PromptFeatures, heads: Heads) -> np.ndarray:
    """Class probabilities, float64 [N, C], of images given by pre-projection features [N, d_img]."""
    images = _unit_rows(image_features.astype(np.float64) @ heads.image)
    logits = np.exp(heads.log_logit_scale) * images @ class_embeddings(prompts, heads.text).T
    logits -= logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def zero_shot(
    loaded: LoadedModel,
    frame: pd.DataFrame,
    classes: ZeroShotClasses,
    features: Features | None = None,
    heads: Heads | None = None,
) -> pd.DataFrame:
    """Per-row zero-shot predictions for ``frame`` (same index).

    ``features`` must be the rows' pre-projection features (computed, and cached, when omitted);
    ``heads`` default to the model's own. Columns: ``uid``, ``label`` (true class or None),
    ``predicted``, ``prob_true`` and ``loss`` (cross-entropy in nats; both NaN when the label is not
    one of the classes), ``prob_predicted``, ``correct`` (bool), and one probability column
    ``p[<class>]`` per class.
    """
    if features is None:
        features = compute_features(loaded, frame)
    if len(features) != len(frame):
        raise ValueError(f"features have {len(features)} rows but the frame has {len(frame)}")
    heads = heads if heads is not None else get_heads(loaded.model)
    prompts = encode_prompts(loaded, classes.names, classes.prompts)
    probabilities = zero_shot_probabilities(features.image, prompts, heads)

    names = np.asarray(classes.names, dtype=object)
    position_of = {name: position for position, name in enumerate(classes.names)}
    labels = frame["label"] if "label" in frame else pd.Series([None] * len(frame), index=frame.index)
    true_position = np.array([position_of.get(label, -1) for label in labels])
    known = true_position >= 0
    prob_true = np.full(len(frame), np.nan)
    prob_true[known] = probabilities[np.flatnonzero(known), true_position[known]]
    predicted = probabilities.argmax(axis=1)

    result = pd.DataFrame(
        {
            "uid": frame["uid"].to_numpy(),
            "label": labels.to_numpy(),
            "predicted": names[predicted],
            "prob_true": prob_true,
            "prob_predicted": probabilities[np.arange(len(frame)), predicted],
            "loss": -np.log(np.maximum(prob_true, 1e-300)),
            "correct": known & (predicted == true_position),
        },
        index=frame.index,
    )
    for position, name in enumerate(classes.names):
        result[f"p[{name}]"] = probabilities[:, position]
    return result


def zero_shot_accuracy(
    loaded: LoadedModel,
    frame: pd.DataFrame,
    classes: ZeroShotClasses,
    features: Features | None = None,
    heads: Heads | None = None,
) -> float:
    """Fraction of the rows whose label is one of the classes that zero-shot classifies correctly."""
    predictions = zero_shot(loaded, frame, classes, features=features, heads=heads)
    labelled = predictions["prob_true"].notna()
    if not labelled.any():
        raise ValueError("no row has a label among the zero-shot classes")
    return float(predictions.loc[labelled, "correct"].mean())
