"""The scoring stage (docs/method.md §7): every training pair's influence on the trusted set, with baselines.

Sign convention: ``influence`` is the predicted change of the trusted-set contrastive loss if the
pair is removed.  Negative = removing it lowers the loss = **harmful**; positive = **valuable**.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ecif.influence.columns import DIRECTIONAL_COLUMNS
from ecif.influence.scores import PairInfluence, gradient_of, influence_on, self_influence
from ecif.objective.contrastive import clip_scores, embed, pair_losses
from ecif.progress import Reporter, as_reporter
from ecif.run import EMBEDDINGS_FILE, Run, atomic_write_with
from ecif.tasks.detect import with_misalignment
from ecif.tasks.engine import Engine, load_engine

CARRIED_COLUMNS = ("uid", "filepath", "caption", "split", "label")
EMBEDDING_CHUNK_ROWS = 4096


def influence_table(engine: Engine, influence: PairInfluence) -> pd.DataFrame:
    """The influence columns for the training rows, in training order."""
    return pd.DataFrame({"row": engine.train_rows, **{name: getattr(influence, name) for name in DIRECTIONAL_COLUMNS}})


def suggested_actions(scores: pd.DataFrame, harmful_fraction: float = 0.05) -> pd.Series:
    """A proposal per pair from its scores (the curator decides).

    The most harmful ``harmful_fraction`` are flagged.  A flagged pair whose caption matches its
    image poorly (CLIP-score below the median) most likely carries a wrong caption: "relabel" (the
    app offers a caption from its nearest neighbours).  A flagged pair that matches well hurts
    through its role (a near-duplicate acting as a false negative, say): "drop".  Others: "keep".
    """
    n_flag = max(1, int(round(harmful_fraction * len(scores))))
    flagged = scores["rank"] <= n_flag
    weak_match = scores["clip_score"] < scores["clip_score"].median()
    actions = np.where(flagged & weak_match, "relabel", np.where(flagged, "drop", "keep"))
    return pd.Series(actions, index=scores.index, name="suggested_action")


def score_training_pairs(
    run: Run | str,
    test_function: Callable[[Tensor], Tensor] | None = None,
    reporter: Reporter | None = None,
) -> pd.DataFrame:
    """The scores table (one row per training pair, most harmful first by ``rank``).

    ``test_function`` is any differentiable ``θ → scalar``; the default is the trusted split's
    contrastive loss.  Columns: ``row`` (manifest row), carried manifest columns and extras,
    ``influence`` (+ ``_pos``/``_neg`` parts, ``_first_order``, ``_pos_only``), ``self_influence``
    (and ``self_influence_first_order``), ``clip_score``, ``loss``, ``misalignment`` (the detector of wrong
    captions), ``rank`` (1 = most harmful) and ``suggested_action``.
    """
    reporter = as_reporter(reporter)
    engine = load_engine(run)
    problem, theta = engine.problem, engine.theta
    function = test_function or engine.trusted_loss()
    reporter.report("scores", 0, 4)
    influence = influence_on(problem, theta, engine.solver, gradient_of(function, theta))
    table = influence_table(engine, influence)
    reporter.report("scores", 1, 4)
    table["self_influence"] = self_influence(problem, theta, engine.solver, reporter)
    reporter.report("scores", 2, 4)
    table["self_influence_first_order"] = self_influence(problem, theta, engine.solver, reporter, "first_order")
    reporter.report("scores", 3, 4)
    with torch.no_grad():
        table["clip_score"] = clip_scores(engine.scope, theta, problem.data.image, problem.data.text).cpu().numpy()
        table["loss"] = pair_losses(engine.scope, theta, problem.data).cpu().numpy()
    table = with_misalignment(table)
    table["rank"] = table["influence"].rank(method="first").astype(int)
    table["suggested_action"] = suggested_actions(table)
    manifest = engine.manifest
    carried = [c for c in manifest.columns if c not in table.columns and c != "source_row"]
    table = pd.concat([table, manifest.loc[table["row"], carried].reset_index(drop=True)], axis=1)
    ordered = ["row", *[c for c in CARRIED_COLUMNS if c in table.columns]]
    ordered += [c for c in table.columns if c not in ordered]
    reporter.report("scores", 4, 4)
    return table[ordered].sort_values("rank").reset_index(drop=True)


def write_embeddings(run: Run | str) -> None:
    """Fine-tuned unit embeddings of every manifest row (for nearest neighbours and the 2-D map)."""
    engine = load_engine(run)
    image, text = [], []
    # In chunks: for the blocks scope each row is a whole token sequence through a transformer block.
    with torch.no_grad():
        for start in range(0, len(engine.image), EMBEDDING_CHUNK_ROWS):
            rows = slice(start, start + EMBEDDING_CHUNK_ROWS)
            u, v, _ = embed(
                engine.scope,
                engine.theta,
                engine.image_tensor(rows),
                torch.as_tensor(engine.text[rows], dtype=torch.float64, device=engine.device),
            )
            image.append(u.cpu().numpy().astype(np.float32))
            text.append(v.cpu().numpy().astype(np.float32))
    path = engine.run.path(EMBEDDINGS_FILE)
    atomic_write_with(path, lambda temporary: np.savez(temporary, image=np.concatenate(image), text=np.concatenate(text)))
