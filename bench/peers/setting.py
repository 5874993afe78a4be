"""What every method is given: one fine-tuned heads problem, its trusted set, ground truth, a test metric.

Two sources: a scored ecif run folder (:func:`from_run`, through ``ecif.tasks.engine.load_engine``)
or a small synthetic problem (:func:`toy`, features with class structure and flipped captions, like
``tests/maths_fixtures.py``; seconds on one core, for trying the runner without a demo model).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ecif.objective.contrastive import ContrastiveData, ContrastiveProblem, HeadsScope, reference_batches
from ecif.influence.synthetic import toy_features
from ecif.config import FinetuneConfig


@dataclass
class PeerSetting:
    name: str
    problem: ContrastiveProblem
    theta: Tensor
    validation: ContrastiveData
    corrupted: np.ndarray | None  # [N] bool, planted ground truth (None: unknown)
    finetune: FinetuneConfig
    test_metric: Callable[[Tensor], float]  # accuracy of heads θ on held-out test data
    test_metric_name: str
    solver_factory: Callable[[], object]
    info: dict = field(default_factory=dict)
    _solver: object | None = None

    @property
    def solver(self):
        if self._solver is None:
            self._solver = self.solver_factory()
        return self._solver

    def phi(self, theta: Tensor) -> float:
        from ecif.objective.contrastive import contrastive_loss

        with torch.no_grad():
            return float(contrastive_loss(self.problem.scope, theta, self.validation))


def zero_shot_test_items(engine, test_rows: np.ndarray) -> tuple[Tensor, Tensor]:
    """``(image features [k, d], class index [k])`` of the test rows whose label is one of the run's
    zero-shot classes (the others are left out)."""
    lookup = {name: position for position, name in enumerate(engine.prompts.names)}
    labels = np.asarray([lookup.get(str(v), -1) for v in engine.manifest.iloc[test_rows]["label"]])
    keep = labels >= 0
    return engine.image_tensor(test_rows[keep]), torch.as_tensor(labels[keep])


def from_run(run_dir: str | Path) -> PeerSetting:
    """A scored (or at least fine-tuned) ecif run: its problem, ``θ̂``, trusted split and stored solver."""
    from ecif.objective.measurements import retrieval_accuracy, zero_shot_accuracy
    from ecif.tasks.engine import load_engine, split_rows

    engine = load_engine(run_dir)
    train = engine.manifest.iloc[engine.train_rows]
    corrupted = train["corrupted"].astype(bool).to_numpy() if "corrupted" in train.columns else None
    settings = engine.run.info.get("settings", {})
    test_rows = split_rows(engine.manifest, settings.get("test_split", "test"))
    if engine.prompts is not None and len(test_rows) and "label" in engine.manifest.columns:
        image, target = zero_shot_test_items(engine, test_rows)

        def metric(theta: Tensor) -> float:
            return zero_shot_accuracy(engine.scope, theta, image, target, engine.prompts)

        metric_name = f"zero-shot test accuracy ({len(target)} test images)"
    else:
        test = ContrastiveData.from_arrays(engine.image[test_rows], engine.text[test_rows], engine.finetune.batch_size)

        def metric(theta: Tensor) -> float:
            return retrieval_accuracy(engine.scope, theta, test)

        metric_name = "in-batch retrieval accuracy on the test split"
    return PeerSetting(
        name=Path(engine.run.directory).name,
        problem=engine.problem,
        theta=engine.theta,
        validation=engine.trusted_data,
        corrupted=corrupted,
        finetune=engine.finetune,
        test_metric=metric,
        test_metric_name=metric_name,
        solver_factory=lambda: engine.solver,
        info={"run_dir": str(engine.run.directory), "curvature": engine.curvature.to_dict(),
              "curvature_source": "the run's stored factor (memory-mapped: its page-in cost lands on the first ECIF row); "
              f"building it was the pipeline's curvature stage: {engine.run.info.get('stages', {}).get('curvature', {}).get('seconds')} s",
              "finetune": engine.finetune.to_dict()},
    )


def toy(n: int = 200, batch_size: int = 10, flip: float = 0.1, delta: float = 1.0, seed: int = 0,
        image_dim: int = 12, text_dim: int = 10, embed_dim: int = 6, classes: int = 5) -> PeerSetting:
    """A synthetic heads problem fine-tuned to its minimiser (``flip`` of the captions point at another class)."""
    from ecif.objective.measurements import retrieval_accuracy
    from ecif.finetune import finetune_heads

    from bench.peers.adapters import default_solver

    image, text, flipped = toy_features(n, seed, image_dim, text_dim, classes, flip)
    val_image, val_text, _ = toy_features(max(40, n // 3), seed + 1, image_dim, text_dim, classes, 0.0)
    test_image, test_text, _ = toy_features(max(40, n // 3), seed + 2, image_dim, text_dim, classes, 0.0)
    scope = HeadsScope(image_dim, text_dim, embed_dim, math.log(10.0), False)
    theta0 = torch.randn(scope.size, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    data = ContrastiveData(image, text, reference_batches(n, batch_size))
    problem = ContrastiveProblem(scope, data, theta0, delta)
    config = FinetuneConfig(delta=delta, batch_size=batch_size)
    theta, report = finetune_heads(problem, config=config)
    validation = ContrastiveData(val_image, val_text, reference_batches(val_image.shape[0], batch_size))
    test = ContrastiveData(test_image, test_text, reference_batches(test_image.shape[0], batch_size))
    return PeerSetting(
        name=f"toy-n{n}-flip{flip:g}-b{batch_size}-seed{seed}",
        problem=problem,
        theta=theta,
        validation=validation,
        corrupted=flipped.numpy(),
        finetune=config,
        test_metric=lambda t: retrieval_accuracy(scope, t, test),
        test_metric_name=f"in-batch retrieval accuracy on {test.n_pairs} clean test pairs",
        solver_factory=lambda: default_solver(problem, theta),
        info={"finetune": dataclasses.asdict(config), "finetune_report": report.to_dict(),
              "curvature": {"solver": "dense", "kind": "hessian", "damping": 1e-4},
              "curvature_source": "dense Hessian + Cholesky built here"},
    )
