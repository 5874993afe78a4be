"""ecif: find the image–caption pairs that hurt a CLIP-style model, with ECIF contrastive influence.

Sign convention (everywhere: tables, the app, exports): ``influence`` is the predicted change of a
test loss if a pair is removed from training.  **Negative = harmful** (removing it helps),
positive = valuable.  ``influence_pos`` and ``influence_neg`` split it into the pair's positive role
(its own image and caption) and its negative role (inside every other pair's softmax).

Typical use::

    import ecif
    run = ecif.run_pipeline(ecif.RunConfig(run_dir="runs/demo"))          # built-in demo
    scores = run.scores()                                                  # one row per pair
    ecif.detection_report(scores)                                          # AUROC / AP / P@k
    culprits = ecif.trace(run, uid=ecif.mispredictions(run).uid[0])        # why is this wrong?
    ecif.predict_edit(run, drop_rows=scores.row[:50])                       # what if we drop them?
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Names resolve on first use so that ``import ecif`` (the app, the command line) does not pay for
# torch and open_clip before it needs them.
_EXPORTS = {
    "BlocksScope": "ecif.objective.blocks",
    "Cancelled": "ecif.progress",
    "ContrastiveData": "ecif.objective.contrastive",
    "CurvatureConfig": "ecif.config",
    "DemoDataConfig": "ecif.config",
    "EditResult": "ecif.tasks.edit",
    "FeatureStore": "ecif.influence.streaming",
    "FinetuneConfig": "ecif.config",
    "FinetuneReport": "ecif.finetune",
    "ContrastiveProblem": "ecif.objective.contrastive",
    "HeadsScope": "ecif.objective.contrastive",
    "Reporter": "ecif.progress",
    "Run": "ecif.run",
    "RunConfig": "ecif.config",
    "StreamingConfig": "ecif.config",
    "apply_edit": "ecif.tasks.edit",
    "build_solver": "ecif.curvature.solvers",
    "confusion_items": "ecif.tasks.trace",
    "confusions": "ecif.tasks.trace",
    "detection_report": "ecif.tasks.detect",
    "extract_feature_store": "ecif.tasks.extract",
    "finetune_heads": "ecif.finetune",
    "flag": "ecif.tasks.detect",
    "influence_on": "ecif.influence.scores",
    "initial_scope": "ecif.models.scope",
    "iter_manifest_chunks": "ecif.data.manifest",
    "load_manifest": "ecif.data.manifest",
    "mispredictions": "ecif.tasks.trace",
    "predict_edit": "ecif.tasks.edit",
    "predict_items": "ecif.tasks.edit",
    "read_left_out": "ecif.tasks.extract",
    "read_row_map": "ecif.tasks.extract",
    "read_scores": "ecif.influence.streaming",
    "reference_batches": "ecif.objective.contrastive",
    "run_pipeline": "ecif.tasks.pipeline",
    "score_store": "ecif.influence.streaming",
    "score_training_pairs": "ecif.tasks.scoring",
    "refined_removal_effect": "ecif.influence.scores",
    "select_delta": "ecif.finetune",
    "self_influence": "ecif.influence.scores",
    "trace": "ecif.tasks.trace",
    "verify_by_refit": "ecif.tasks.edit",
    "write_feature_store": "ecif.influence.streaming",
    "write_manifest_subset": "ecif.data.manifest",
}

if TYPE_CHECKING:  # pragma: no cover
    from ecif.config import CurvatureConfig, DemoDataConfig, FinetuneConfig, RunConfig
    from ecif.curvature.solvers import build_solver
    from ecif.data.manifest import iter_manifest_chunks, load_manifest, write_manifest_subset
    from ecif.finetune import FinetuneReport, finetune_heads, select_delta
    from ecif.influence.scores import influence_on, refined_removal_effect, self_influence
    from ecif.influence.streaming import FeatureStore, read_scores, score_store, write_feature_store
    from ecif.models.scope import initial_scope
    from ecif.objective.blocks import BlocksScope
    from ecif.objective.contrastive import ContrastiveData, ContrastiveProblem, HeadsScope, reference_batches
    from ecif.progress import Cancelled, Reporter
    from ecif.run import Run
    from ecif.tasks.edit import EditResult, apply_edit, predict_edit, predict_items, verify_by_refit
    from ecif.tasks.detect import detection_report, flag
    from ecif.tasks.scoring import score_training_pairs
    from ecif.tasks.extract import extract_feature_store, read_left_out, read_row_map
    from ecif.tasks.pipeline import run_pipeline
    from ecif.tasks.trace import confusion_items, confusions, mispredictions, trace


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ecif' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = sorted(_EXPORTS)  # resolved lazily by __getattr__
