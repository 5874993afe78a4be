"""Small synthetic contrastive problems for the maths tests (features with class structure and
flipped captions, LayerNorm'd like a ViT's pooled output), fine-tuned to a true minimiser."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ecif.influence.objective import ContrastiveData, HeadsProblem, HeadsScope, reference_batches
from ecif.influence.synthetic import toy_features
from ecif.models.heads import FinetuneConfig, finetune_heads


@dataclass
class Toy:
    problem: HeadsProblem
    theta: torch.Tensor
    validation: ContrastiveData
    flipped: torch.Tensor


def make_toy(n: int = 120, batch_size: int = 10, delta: float = 1.0, learn_logit_scale: bool = False, seed: int = 0) -> Toy:
    image, text, flipped = toy_features(n, seed)
    val_image, val_text, _ = toy_features(80, seed + 1, flip=0.0)
    scope = HeadsScope(12, 10, 6, math.log(10.0), learn_logit_scale)
    theta0 = 1.0 * torch.randn(scope.size, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    if learn_logit_scale:
        theta0[-1] = math.log(10.0)
    data = ContrastiveData(image, text, reference_batches(n, batch_size))
    problem = HeadsProblem(scope, data, theta0, delta)
    theta, report = finetune_heads(problem, config=FinetuneConfig(delta=delta, batch_size=batch_size))
    assert report.converged, report.warnings
    validation = ContrastiveData(val_image, val_text, reference_batches(80, batch_size))
    return Toy(problem, theta, validation, flipped)
