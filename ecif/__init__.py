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
    "BlocksScope": "ecif.influence.blocks",
    "Cancelled": "ecif.progress",
    "ContrastiveData": "ecif.influence.objective",
    "CurvatureConfig": "ecif.curvature.solvers",
    "DemoDataConfig": "ecif.tasks.pipeline",
    "EditResult": "ecif.tasks.clean",
    "FeatureStore": "ecif.influence.streaming",
    "FinetuneConfig": "ecif.models.heads",
    "FinetuneReport": "ecif.models.heads",
    "HeadsProblem": "ecif.influence.objective",
    "HeadsScope": "ecif.influence.objective",
    "Reporter": "ecif.progress",
    "Run": "ecif.run",
    "RunConfig": "ecif.tasks.pipeline",
    "StreamingConfig": "ecif.influence.streaming",
    "apply_edit": "ecif.tasks.clean",
    "build_solver": "ecif.curvature.solvers",
    "confusion_items": "ecif.tasks.trace",
    "confusions": "ecif.tasks.trace",
    "detection_report": "ecif.tasks.detect",
    "extract_feature_store": "ecif.tasks.extract",
    "finetune_heads": "ecif.models.heads",
    "flag": "ecif.tasks.detect",
    "influence_on": "ecif.influence.scores",
    "initial_scope": "ecif.models.heads",
    "iter_manifest_chunks": "ecif.data.manifest",
    "load_manifest": "ecif.data.manifest",
    "mispredictions": "ecif.tasks.trace",
    "predict_edit": "ecif.tasks.clean",
    "predict_items": "ecif.tasks.clean",
    "read_left_out": "ecif.tasks.extract",
    "read_row_map": "ecif.tasks.extract",
    "read_scores": "ecif.influence.streaming",
    "reference_batches": "ecif.influence.objective",
    "run_pipeline": "ecif.tasks.pipeline",
    "score_store": "ecif.influence.streaming",
    "score_training_pairs": "ecif.tasks.evaluate",
    "refined_removal_effect": "ecif.influence.scores",
    "select_delta": "ecif.models.heads",
    "self_influence": "ecif.influence.scores",
    "trace": "ecif.tasks.trace",
    "verify_by_refit": "ecif.tasks.clean",
    "write_feature_store": "ecif.influence.streaming",
    "write_manifest_subset": "ecif.data.manifest",
}

if TYPE_CHECKING:  # pragma: no cover
    from ecif.curvature.solvers import CurvatureConfig, build_solver
    from ecif.data.manifest import iter_manifest_chunks, load_manifest, write_manifest_subset
    from ecif.influence.blocks import BlocksScope
    from ecif.influence.objective import ContrastiveData, HeadsProblem, HeadsScope, reference_batches
    from ecif.influence.scores import influence_on, refined_removal_effect, self_influence
    from ecif.influence.streaming import FeatureStore, StreamingConfig, read_scores, score_store, write_feature_store
    from ecif.models.heads import FinetuneConfig, FinetuneReport, finetune_heads, initial_scope, select_delta
    from ecif.progress import Cancelled, Reporter
    from ecif.run import Run
    from ecif.tasks.clean import EditResult, apply_edit, predict_edit, predict_items, verify_by_refit
    from ecif.tasks.detect import detection_report, flag
    from ecif.tasks.extract import extract_feature_store, read_left_out, read_row_map
    from ecif.tasks.evaluate import score_training_pairs
    from ecif.tasks.pipeline import DemoDataConfig, RunConfig, run_pipeline
    from ecif.tasks.trace import confusion_items, confusions, mispredictions, trace


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ecif' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [  # noqa: F822 (resolved lazily by __getattr__)
    "BlocksScope",
    "Cancelled",
    "ContrastiveData",
    "CurvatureConfig",
    "DemoDataConfig",
    "EditResult",
    "FeatureStore",
    "FinetuneConfig",
    "FinetuneReport",
    "HeadsProblem",
    "HeadsScope",
    "Reporter",
    "Run",
    "RunConfig",
    "StreamingConfig",
    "apply_edit",
    "build_solver",
    "confusion_items",
    "confusions",
    "detection_report",
    "extract_feature_store",
    "finetune_heads",
    "flag",
    "influence_on",
    "initial_scope",
    "iter_manifest_chunks",
    "load_manifest",
    "mispredictions",
    "predict_edit",
    "predict_items",
    "read_left_out",
    "read_row_map",
    "read_scores",
    "reference_batches",
    "run_pipeline",
    "score_store",
    "score_training_pairs",
    "refined_removal_effect",
    "select_delta",
    "self_influence",
    "trace",
    "verify_by_refit",
    "write_feature_store",
    "write_manifest_subset",
]
