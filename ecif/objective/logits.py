"""The logit parameters every influence scope shares: the log logit scale ``ℓ`` and, for the sigmoid
loss, the logit bias ``b`` (docs/method.md §1), fixed or learnt at the end of ``theta``.

Both scopes (:class:`ecif.objective.contrastive.HeadsScope`, :class:`ecif.objective.blocks.BlocksScope`)
hold them the same way, so this module holds the one implementation they both use.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ecif.config import Loss


class LogitSettings(Protocol):
    """What a scope says about its logits."""

    loss: Loss
    log_logit_scale: float
    learn_logit_scale: bool
    logit_bias: float


def learnt_logit_count(scope: LogitSettings) -> int:
    """How many logit parameters ``theta`` ends with: none when fixed; with ``learn_logit_scale``, ``ℓ``
    and, for the sigmoid loss, the bias ``b`` too (learnt together, as SigLIP trains them)."""
    return (1 + int(scope.loss == "siglip")) if scope.learn_logit_scale else 0


def logit_parameters(scope: LogitSettings, theta: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(ℓ, b)``: the log logit scale and the logit bias of ``theta [P]``, from its last entries when
    learnt (:func:`learnt_logit_count`), else the scope's fixed ``log_logit_scale``/``logit_bias``.
    ``b`` is None for the softmax loss: a constant added to every logit leaves each softmax unchanged."""
    count = learnt_logit_count(scope)
    tail = theta[theta.shape[-1] - count :]
    log_scale = tail[0] if count else theta.new_tensor(scope.log_logit_scale)
    if scope.loss != "siglip":
        return log_scale, None
    return log_scale, tail[1] if count else theta.new_tensor(scope.logit_bias)


def logit_tail(
    scope: LogitSettings, like: Tensor, log_scale: float | Tensor | None, logit_bias: float | Tensor | None
) -> list[Tensor]:
    """The learnt logit parameters as ``theta`` ends with them (``[]`` when fixed; ``[ℓ]`` or ``[ℓ, b]``),
    each ``[1]`` with ``like``'s dtype and device; None takes the scope's value."""
    values = (scope.log_logit_scale if log_scale is None else log_scale, scope.logit_bias if logit_bias is None else logit_bias)
    return [torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(1) for value in values[: learnt_logit_count(scope)]]


def without_default_settings(settings: dict) -> dict:
    """A scope's ``to_dict`` less the settings that records from before them lack: the offsets when
    unset, the loss and logit bias when softmax (records without them are softmax with no bias)."""
    for name in ("image_offset", "text_offset"):
        if name in settings and not settings[name]:
            del settings[name]
    if settings["loss"] == "clip":
        del settings["loss"], settings["logit_bias"]
    return settings
