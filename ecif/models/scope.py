"""The influence scope of an open_clip model: its parameters ``θ₀`` read out, and ``θ`` written back."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from ecif.config import AUTO_LOSS, Loss
from ecif.models.blocks import blocks_scope, set_blocks
from ecif.models.features import get_heads, set_heads
from ecif.objective.contrastive import HeadsScope, Scope
from ecif.objective.logits import learnt_logit_count, logit_tail


def model_loss(model: torch.nn.Module) -> Loss:
    """The contrastive loss an open_clip model was trained with: ``"siglip"`` when it has a
    ``logit_bias`` (open_clip builds one from ``init_logit_bias``, for SigLIP), else ``"clip"``."""
    return "siglip" if getattr(model, "logit_bias", None) is not None else "clip"


def resolve_loss(model: torch.nn.Module, loss: str = AUTO_LOSS) -> Loss:
    """``FinetuneConfig.loss`` for ``model``: ``"auto"`` is :func:`model_loss`; the sigmoid loss needs the model's bias."""
    if loss == AUTO_LOSS:
        return model_loss(model)
    if loss == "siglip" and model_loss(model) != "siglip":
        raise ValueError("loss 'siglip' needs a model with a logit_bias (an open_clip model built with init_logit_bias); this one has none")
    return loss  # type: ignore[return-value]


def initial_scope(
    model: torch.nn.Module, blocks: int = 0, learn_logit_scale: bool = False, loss: str = AUTO_LOSS
) -> tuple[Scope, Tensor]:
    """The influence scope of an open_clip ``model`` and its starting point ``θ₀ [P]`` (float64).

    ``loss`` (:func:`resolve_loss`): with the sigmoid loss the scope carries the model's logit bias,
    learnt with the scale when ``learn_logit_scale``.

    ``blocks = 0``: the projection heads (:class:`HeadsScope`; each tower family's head is described in
    :mod:`ecif.models.towers`: a bias is ``W``'s last row, SigLIP's image head has a fixed offset); ``k > 0``: the heads plus the last
    ``k`` transformer blocks of each tower and their final norms (:class:`ecif.objective.blocks.BlocksScope`).
    """
    if blocks:
        scope, theta0 = blocks_scope(model, blocks, learn_logit_scale)
    else:
        heads = get_heads(model)
        scope = heads.scope(learn_logit_scale)
        theta0 = scope.join(torch.as_tensor(heads.image), torch.as_tensor(heads.text), heads.log_logit_scale)
    if resolve_loss(model, loss) == "clip":
        return scope, theta0
    with_bias = replace(scope, loss="siglip", logit_bias=float(model.logit_bias.detach().cpu().reshape(-1)[0]))
    untied = theta0[: theta0.numel() - learnt_logit_count(scope)]
    return with_bias, torch.cat([untied, *logit_tail(with_bias, theta0, scope.log_logit_scale, None)])


def write_scope(model: torch.nn.Module, scope: Scope, theta: Tensor) -> None:
    """Write ``theta [P]`` of ``scope`` into ``model`` in place (the inverse of :func:`initial_scope`)."""
    if isinstance(scope, HeadsScope):
        w_image, w_text, log_scale = scope.split(theta)
        set_heads(model, w_image, w_text, float(log_scale))  # set_heads moves them to the model's device
    else:
        set_blocks(model, scope, theta)
    if scope.loss == "siglip":
        with torch.no_grad():
            model.logit_bias.fill_(float(scope.bias(theta)))
