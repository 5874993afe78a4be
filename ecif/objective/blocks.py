"""The wider influence scope: the last transformer block(s) of each tower, their final norm and the heads.

The default scope (docs/method.md §6) is the pair of projection heads on cached backbone features.  This scope
also lets the last ``k`` residual attention blocks of each tower move, so a pair's influence can act
through what the towers compute, not only through how their outputs are projected.  Its features are
the cached *inputs* of the first block in scope, every token of them:

- ``image [..., T, w + 1]``, ``text [..., T', w' + 1]``: the block input ``x [T, w]`` of each row with
  one extra channel, the row's **pooling weight** per token.  It is one-hot at the class token (image
  towers with ``pool_type='tok'``) or at the end-of-text token (text towers), or uniform over the patch
  tokens (``pool_type='avg'``); pooling is then ``Σ_t weight_t · token_t`` for every row at once,
  although each caption ends at another position.
- ``theta [P]``: for the image tower then the text tower, block by block, open_clip's own parameter
  names and shapes (``ln_1``, ``attn.in_proj_weight [3w, w]``, ``attn.out_proj``, ``ln_2``,
  ``mlp.c_fc [h, w]``, ``mlp.c_proj [w, h]``), then the tower's final norm (``ln_post`` /
  ``ln_final``) and its projection ``[w, e]``; last the log logit scale when it is learnt.

Everything is written with plain tensor operations (attention included) so that ``torch.func``'s
forward-mode products work; CPU ``scaled_dot_product_attention`` has no forward-mode rule.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import ClassVar, Literal

import torch
from torch import Tensor
from torch.nn import functional

from ecif.config import Loss
from ecif.objective.logits import learnt_logit_count, logit_parameters, logit_tail, without_default_settings

Activation = Literal["gelu", "quick_gelu"]

_BLOCK_PARAMETERS = (
    "ln_1.weight",
    "ln_1.bias",
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
)


@dataclass(frozen=True)
class TowerShape:
    """One tower's blocks in scope.

    ``causal``: each token attends only to itself and earlier ones (open_clip text towers).
    ``one_hot_pool``: the pooling weight picks one token per row (class or end-of-text token); the
    last block then needs its output at that token only, which is cheaper than every token.
    ``norm_after_pool``: open_clip's ``final_ln_after_pool`` (pool, then the final norm).
    """

    width: int
    heads: int
    mlp_width: int
    blocks: int = 1
    causal: bool = False
    one_hot_pool: bool = True
    norm_after_pool: bool = False
    activation: Activation = "gelu"
    norm_eps: float = 1e-5

    def parameter_shapes(self, embed_dim: int) -> list[tuple[str, tuple[int, ...]]]:
        """``(name, shape)`` of every parameter in scope, in the order of ``theta``."""
        w, h = self.width, self.mlp_width
        block_shapes = dict(
            zip(_BLOCK_PARAMETERS, [(w,), (w,), (3 * w, w), (3 * w,), (w, w), (w,), (w,), (w,), (h, w), (h,), (w, h), (w,)])
        )
        shapes = [(f"blocks.{index}.{name}", block_shapes[name]) for index in range(self.blocks) for name in _BLOCK_PARAMETERS]
        return shapes + [("norm.weight", (w,)), ("norm.bias", (w,)), ("proj", (w, embed_dim))]


@dataclass(frozen=True)
class BlocksScope:
    """Influence scope: the last ``blocks`` transformer blocks of both towers, final norms and heads."""

    image: TowerShape
    text: TowerShape
    embed_dim: int
    log_logit_scale: float = math.log(100.0)
    learn_logit_scale: bool = False
    loss: Loss = "clip"
    logit_bias: float = 0.0

    kind: ClassVar[str] = "blocks"

    @property
    def size(self) -> int:
        """Number of trainable parameters ``P`` (the learnt logit parameters last, :func:`logit_parameters`)."""
        return self._tower_size(self.image) + self._tower_size(self.text) + learnt_logit_count(self)

    def _tower_size(self, tower: TowerShape) -> int:
        return sum(math.prod(shape) for _, shape in tower.parameter_shapes(self.embed_dim))

    def tower_parameters(self, theta: Tensor, tower: Literal["image", "text"]) -> dict[str, Tensor]:
        """Views of ``theta [P]`` as one tower's named parameters (open_clip shapes)."""
        offset = 0 if tower == "image" else self._tower_size(self.image)
        shape_of = self.image if tower == "image" else self.text
        parameters = {}
        for name, shape in shape_of.parameter_shapes(self.embed_dim):
            count = math.prod(shape)
            parameters[name] = theta[offset : offset + count].reshape(shape)
            offset += count
        return parameters

    def join(
        self, image: dict[str, Tensor], text: dict[str, Tensor], log_scale: float | None = None, logit_bias: float | None = None
    ) -> Tensor:
        """Inverse of :meth:`tower_parameters` for both towers (the scale and bias only when learnt)."""
        parts = [image[name].reshape(-1) for name, _ in self.image.parameter_shapes(self.embed_dim)]
        parts += [text[name].reshape(-1) for name, _ in self.text.parameter_shapes(self.embed_dim)]
        return torch.cat(parts + logit_tail(self, parts[0], log_scale, logit_bias))

    def project_image(self, theta: Tensor, image: Tensor) -> Tensor:
        """Unnormalised image embeddings ``[..., e]`` of block inputs ``[..., T, w + 1]``."""
        return tower_forward(self.image, self.tower_parameters(theta, "image"), image)

    def project_text(self, theta: Tensor, text: Tensor) -> Tensor:
        """Unnormalised text embeddings ``[..., e]`` of block inputs ``[..., T', w' + 1]``."""
        return tower_forward(self.text, self.tower_parameters(theta, "text"), text)

    def log_scale(self, theta: Tensor) -> Tensor:
        return logit_parameters(self, theta)[0]

    def bias(self, theta: Tensor) -> Tensor | None:
        """The logit bias ``b`` (None for the softmax loss, which has none)."""
        return logit_parameters(self, theta)[1]

    def with_logit_scale(self, log_scale: float) -> BlocksScope:
        return replace(self, log_logit_scale=float(log_scale))

    def to_dict(self) -> dict:
        return without_default_settings({"kind": self.kind, **asdict(self)})

    @classmethod
    def from_dict(cls, settings: dict) -> BlocksScope:
        return cls(
            image=TowerShape(**settings["image"]),
            text=TowerShape(**settings["text"]),
            embed_dim=int(settings["embed_dim"]),
            log_logit_scale=float(settings["log_logit_scale"]),
            learn_logit_scale=bool(settings["learn_logit_scale"]),
            loss=settings.get("loss", "clip"),
            logit_bias=float(settings.get("logit_bias", 0.0)),
        )


def _activation(name: Activation, x: Tensor) -> Tensor:
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    return functional.gelu(x)


def _attention(keys_from: Tensor, queries_from: Tensor, parameters: dict[str, Tensor], prefix: str, heads: int, allowed: Tensor | None) -> Tensor:
    """Multi-head attention of ``queries_from [n, q, w]`` over ``keys_from [n, T, w]`` (``nn.MultiheadAttention``'s maths).

    ``allowed [n or 1, q, T]`` (bool) marks the keys each query may see; None: all.
    """
    n, length, width = keys_from.shape
    head_width = width // heads
    query_weight, key_weight, value_weight = parameters[f"{prefix}attn.in_proj_weight"].chunk(3)
    query_bias, key_bias, value_bias = parameters[f"{prefix}attn.in_proj_bias"].chunk(3)

    def split_heads(x: Tensor) -> Tensor:
        return x.reshape(n, x.shape[1], heads, head_width).transpose(1, 2)

    query = split_heads(functional.linear(queries_from, query_weight, query_bias))
    key = split_heads(functional.linear(keys_from, key_weight, key_bias))
    value = split_heads(functional.linear(keys_from, value_weight, value_bias))
    scores = (query @ key.transpose(-1, -2)) / math.sqrt(head_width)
    if allowed is not None:
        scores = torch.where(allowed[:, None], scores, torch.full_like(scores, -math.inf))
    mixed = (torch.softmax(scores, dim=-1) @ value).transpose(1, 2).reshape(n, queries_from.shape[1], width)
    return functional.linear(mixed, parameters[f"{prefix}attn.out_proj.weight"], parameters[f"{prefix}attn.out_proj.bias"])


def tower_forward(shape: TowerShape, parameters: dict[str, Tensor], features: Tensor) -> Tensor:
    """Blocks, final norm, pooling and projection: ``[..., T, w + 1]`` → ``[..., e]``."""
    leading = features.shape[:-2]
    length, width = features.shape[-2], shape.width
    tokens = features.reshape(-1, length, width + 1)
    x, pool = tokens[..., :width], tokens[..., width]

    def norm(y: Tensor, name: str) -> Tensor:
        return functional.layer_norm(y, (width,), parameters[f"{name}.weight"], parameters[f"{name}.bias"], shape.norm_eps)

    causal = torch.ones(length, length, dtype=torch.bool, device=features.device).tril()[None] if shape.causal else None
    for index in range(shape.blocks):
        prefix = f"blocks.{index}."
        last = index == shape.blocks - 1
        if last and shape.one_hot_pool:
            # Only the pooled token's output is used: it attends to every (allowed) token, but its own
            # query, residual and MLP are those of that one token.
            queries = torch.einsum("nt,ntw->nw", pool, x)[:, None]
            allowed = None
            if shape.causal:
                # Keys up to and including the pooled position: the reversed cumulative sum of a one-hot row.
                allowed = (pool.flip(-1).cumsum(-1).flip(-1) > 0.5)[:, None]
            y = queries + _attention(norm(x, f"{prefix}ln_1"), norm(queries, f"{prefix}ln_1"), parameters, prefix, shape.heads, allowed)
            y = y + _mlp(shape, parameters, prefix, norm(y, f"{prefix}ln_2"))
            pooled = y[:, 0]
            pooled = norm(pooled, "norm")
            return (pooled @ parameters["proj"]).reshape(*leading, -1)
        normed = norm(x, f"{prefix}ln_1")
        x = x + _attention(normed, normed, parameters, prefix, shape.heads, causal)
        x = x + _mlp(shape, parameters, prefix, norm(x, f"{prefix}ln_2"))
    if shape.norm_after_pool:
        pooled = norm(torch.einsum("nt,ntw->nw", pool, x), "norm")
    else:
        pooled = torch.einsum("nt,ntw->nw", pool, norm(x, "norm"))
    return (pooled @ parameters["proj"]).reshape(*leading, -1)


def _mlp(shape: TowerShape, parameters: dict[str, Tensor], prefix: str, x: Tensor) -> Tensor:
    hidden = functional.linear(x, parameters[f"{prefix}mlp.c_fc.weight"], parameters[f"{prefix}mlp.c_fc.bias"])
    return functional.linear(_activation(shape.activation, hidden), parameters[f"{prefix}mlp.c_proj.weight"], parameters[f"{prefix}mlp.c_proj.bias"])
