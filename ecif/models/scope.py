"""The influence scope of an open_clip model: its parameters ``θ₀`` read out, and ``θ`` written back."""

from __future__ import annotations

import torch
from torch import Tensor

from ecif.models.blocks import blocks_scope, set_blocks
from ecif.models.features import get_heads, set_heads
from ecif.objective.contrastive import HeadsScope, Scope


def initial_scope(model: torch.nn.Module, blocks: int = 0, learn_logit_scale: bool = False) -> tuple[Scope, Tensor]:
    """The influence scope of an open_clip ``model`` and its starting point ``θ₀ [P]`` (float64).

    ``blocks = 0``: the projection heads (:class:`HeadsScope`); ``k > 0``: the heads plus the last
    ``k`` transformer blocks of each tower and their final norms (:class:`ecif.objective.blocks.BlocksScope`).
    """
    if blocks:
        return blocks_scope(model, blocks, learn_logit_scale)
    heads = get_heads(model)
    scope = HeadsScope(heads.image.shape[0], heads.text.shape[0], heads.image.shape[1], heads.log_logit_scale, learn_logit_scale)
    return scope, scope.join(torch.as_tensor(heads.image), torch.as_tensor(heads.text), heads.log_logit_scale)


def write_scope(model: torch.nn.Module, scope: Scope, theta: Tensor) -> None:
    """Write ``theta [P]`` of ``scope`` into ``model`` in place (the inverse of :func:`initial_scope`)."""
    if isinstance(scope, HeadsScope):
        w_image, w_text, log_scale = scope.split(theta)
        set_heads(model, w_image.numpy(), w_text.numpy(), float(log_scale))
    else:
        set_blocks(model, scope, theta)
