"""Zero-shot classification with class prompts, computed from backbone features and the heads.

Working from pre-projection features means the same code scores the loaded model and any edited
or fine-tuned heads (pass ``heads``), without running the backbone again.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ecif.data import ZeroShotClasses
from ecif.models.features import Features, Heads, PromptFeatures, compute_features, encode_prompts, get_heads
from ecif.models.open_clip_models import LoadedModel
from ecif.objective.measurements import ZeroShotPrompts, zero_shot_logits


def zero_shot_probabilities(image_features: np.ndarray, prompts: PromptFeatures, heads: Heads) -> np.ndarray:
    """Class probabilities, float64 [N, C], of images given by pre-projection features [N, d_img].

    The logits are the influence engine's own (:func:`ecif.objective.measurements.zero_shot_logits`),
    so the demo's accuracy, the mispredictions and trace-back all use one definition.
    """
    scope = heads.scope()
    theta = scope.join(torch.as_tensor(heads.image), torch.as_tensor(heads.text))
    classes = ZeroShotPrompts.from_arrays(prompts.features, prompts.class_index, prompts.names)
    image = torch.as_tensor(np.asarray(image_features), dtype=torch.float64)
    with torch.no_grad():
        return torch.softmax(zero_shot_logits(scope, theta, image, classes), dim=1).numpy()


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
