"""Test functions ``φ(θ)`` whose change under removal ECIF predicts (docs/method.md §3).

A test function is any differentiable ``θ [P] → scalar``.  The built-ins are the trusted-set
contrastive loss and the zero-shot cross-entropy of images against class prompts (prompt
ensembling: a class embedding is the renormalised mean of its prompts' unit embeddings).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ecif.objective.contrastive import ContrastiveData, Scope, contrastive_loss, embed

TestFunction = Callable[[Tensor], Tensor]


@dataclass
class ZeroShotPrompts:
    """Backbone features of every class prompt: ``features [K, d']``, ``class_index [K]``, ``names [C]``."""

    features: Tensor
    class_index: Tensor
    names: list[str]

    @classmethod
    def from_arrays(
        cls, features: np.ndarray, class_index: np.ndarray, names: list[str], device: torch.device | str = "cpu"
    ) -> ZeroShotPrompts:
        """Float64 prompt features and their class index on ``device`` (where the images they meet are)."""
        return cls(
            torch.as_tensor(np.asarray(features), dtype=torch.float64, device=device),
            torch.as_tensor(np.asarray(class_index), dtype=torch.long, device=device),
            list(names),
        )


def class_embeddings(scope: Scope, theta: Tensor, prompts: ZeroShotPrompts) -> Tensor:
    """Unit class embeddings ``[C, e]`` (mean of unit prompt embeddings, renormalised).

    Memory ``O(K·e)``: a retrieval question has one "class" per distinct caption of a split, so
    ``C`` can be as large as ``K`` (no ``[C, K]`` membership matrix).
    """
    prompt_embeddings = torch.nn.functional.normalize(scope.project_text(theta, prompts.features), dim=-1)
    n_classes = len(prompts.names)
    if len(prompts.class_index) == n_classes and bool((prompts.class_index == torch.arange(n_classes, device=prompts.class_index.device)).all()):
        return prompt_embeddings  # one prompt per class: already unit vectors in class order
    sums = torch.zeros(n_classes, prompt_embeddings.shape[-1], dtype=prompt_embeddings.dtype, device=prompt_embeddings.device)
    sums = sums.index_add(0, prompts.class_index, prompt_embeddings)
    counts = torch.bincount(prompts.class_index, minlength=n_classes).clamp(min=1).to(sums.dtype)
    return torch.nn.functional.normalize(sums / counts[:, None], dim=-1)


def logits_against(scope: Scope, theta: Tensor, image: Tensor, classes: Tensor) -> Tensor:
    """``[k, C]`` logits ``exp(ℓ) u·w_c (+ b)`` of images ``image [k, d]`` against unit class embeddings ``classes [C, e]``."""
    u = torch.nn.functional.normalize(scope.project_image(theta, image), dim=-1)
    logits = scope.log_scale(theta).exp() * (u @ classes.T)
    bias = scope.bias(theta)
    return logits if bias is None else logits + bias


def zero_shot_logits(scope: Scope, theta: Tensor, image: Tensor, prompts: ZeroShotPrompts) -> Tensor:
    """``[k, C]`` logits ``exp(ℓ) u·w_c (+ b)`` of images ``image [k, d]`` against the classes."""
    return logits_against(scope, theta, image, class_embeddings(scope, theta, prompts))


def answer_log_probabilities(scope: Scope, logits: Tensor) -> Tensor:
    """``[k, C]`` log-probability of each answer: the softmax over the answers (softmax loss), or each
    answer's own sigmoid ``log σ(s)`` (sigmoid loss, which scores every answer on its own)."""
    return torch.nn.functional.logsigmoid(logits) if scope.loss == "siglip" else torch.log_softmax(logits, dim=-1)


def answer_losses(scope: Scope, logits: Tensor, labels: Tensor) -> Tensor:
    """``[k]`` loss of each item's right answer ``labels [k]`` among the answers ``logits [k, C]`` (nats),
    in the run's loss: the cross-entropy (softmax), or ``Σ_c −log σ(y_c s_c)`` with ``y`` = +1 for the
    right answer and −1 for the others (sigmoid: the terms of a training image against its batch)."""
    if scope.loss != "siglip":
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    signs = 2.0 * torch.nn.functional.one_hot(labels, logits.shape[-1]).to(logits.dtype) - 1.0
    return -torch.nn.functional.logsigmoid(signs * logits).sum(dim=-1)


def zero_shot_loss(scope: Scope, image: Tensor, labels: Tensor, prompts: ZeroShotPrompts) -> TestFunction:
    """``φ(θ)`` = mean zero-shot loss (:func:`answer_losses`) of ``image [k, d]`` with true classes ``labels [k]`` (nats)."""

    def function(theta: Tensor) -> Tensor:
        return answer_losses(scope, zero_shot_logits(scope, theta, image, prompts), labels).mean()

    return function


def validation_loss(scope: Scope, data: ContrastiveData) -> TestFunction:
    """``φ(θ)`` = mean contrastive loss of a trusted set with its own reference batching (nats)."""

    def function(theta: Tensor) -> Tensor:
        return contrastive_loss(scope, theta, data)

    return function


def retrieval_accuracy(scope: Scope, theta: Tensor, data: ContrastiveData) -> float:
    """Fraction of images whose own caption is the best match inside their reference batch."""
    correct = 0
    with torch.no_grad():
        for batch in data.batches:
            u, v, _ = embed(scope, theta, data.image[batch], data.text[batch])
            correct += int((torch.argmax(u @ v.T, dim=1) == torch.arange(len(batch), device=u.device)).sum())
    return correct / max(1, data.n_pairs)


def zero_shot_accuracy(scope: Scope, theta: Tensor, image: Tensor, labels: Tensor, prompts: ZeroShotPrompts) -> float:
    with torch.no_grad():
        predicted = zero_shot_logits(scope, theta, image, prompts).argmax(dim=1)
    return float((predicted == labels).double().mean()) if labels.numel() else float("nan")
