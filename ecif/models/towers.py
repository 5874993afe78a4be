"""Which open_clip towers ecif supports, where their projection heads are, and how their features are taken.

The heads scope of a tower is the last linear map of its image (or text) encoder, ``z = x @ W (+ r)``:

- ``x [.., d]``: the cached features, the input of that map, with a constant-1 column appended when
  the map has a bias (``d`` then counts it, and the bias is ``W``'s last row);
- ``r [.., e]``: a fixed offset added after the map, cached after ``x`` (only SigLIP's attention
  pooling head has one: its last linear layer sits inside a residual branch).

Supported towers (:data:`SUPPORTED`); everything else is refused by name (:class:`UnsupportedModelError`),
by :func:`refuse_unsupported_config` before any work, and by :func:`projection_heads` on the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import open_clip
import torch
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import TextTransformer, VisionTransformer
from torch import Tensor, nn

from ecif.models.open_clip_models import ModelLoadError

SUPPORTED = (
    "image towers: open_clip VisionTransformer (proj), timm towers with timm_proj 'linear' or 'mlp' (its last "
    "linear layer), unset (EVA02, MobileCLIP, PE-Core: the timm model's linear classifier) or 'none' with "
    "timm_pool 'map' (SigLIP: the attention-pooling head's last linear layer), "
    "ModifiedResNet (RN50...: attnpool.c_proj); text towers: open_clip TextTransformer (text_projection, with "
    "or without bias), Hugging Face text towers with hf_proj_type 'linear' or 'mlp'"
)
"""What the heads scope supports, as every refusal states it."""

Capture = Literal["detach", "linear", "resnet", "attention_pool"]
"""How a tower is made to output its head's features instead of its embedding:

- ``detach``: the projection is a bias-free ``[d, e]`` parameter that open_clip skips when it is None;
- ``linear``: the head is an ``nn.Linear`` run as a module: a forward hook returns its input instead;
- ``resnet``: ``ModifiedResNet``'s ``attnpool.c_proj``, which open_clip applies by its weights inside
  ``multi_head_attention_forward`` (so no hook sees its input): it is swapped for an exact identity
  map, and a hook on ``attnpool``, the tower's last module, appends the bias column;
- ``attention_pool``: timm's ``AttentionPoolLatent`` ending ``x = x + mlp(norm(x))``: hooks take the
  input of ``mlp.fc2`` and the residual ``x`` (the input of ``norm``) and the pool returns both.
"""


class UnsupportedModelError(ModelLoadError):
    """The model's architecture has projection heads that ecif cannot separate from its backbone yet."""


@dataclass(frozen=True)
class ProjectionHead:
    """One tower's part of the heads scope: ``owner.attribute`` (a ``[d, e]`` parameter or an ``nn.Linear``).

    ``tower`` is the image or text tower; ``pool`` the attention pool around the head (``attention_pool`` only).
    """

    tower: nn.Module
    owner: nn.Module
    attribute: str
    capture: Capture
    pool: nn.Module | None = None

    @property
    def layer(self) -> nn.Parameter | nn.Linear:
        return getattr(self.owner, self.attribute)

    @property
    def has_bias(self) -> bool:
        return isinstance(self.layer, nn.Linear) and self.layer.bias is not None

    @property
    def offset(self) -> bool:
        """Whether a fixed offset ``r`` (the residual around the head) follows ``x`` in the features."""
        return self.capture == "attention_pool"

    @property
    def input_dim(self) -> int:
        """``d``: the head's input width, plus one for the bias column."""
        layer = self.layer
        width = layer.in_features if isinstance(layer, nn.Linear) else layer.shape[0]
        return int(width) + int(self.has_bias)

    @property
    def embed_dim(self) -> int:
        layer = self.layer
        return int(layer.out_features if isinstance(layer, nn.Linear) else layer.shape[1])

    @property
    def feature_dim(self) -> int:
        """Columns of the cached features: ``d``, plus ``e`` for the offset."""
        return self.input_dim + self.embed_dim * int(self.offset)

    def matrix(self) -> Tensor:
        """``W [d, e]`` as the scope holds it (a bias is the last row), float64, a detached copy."""
        layer = self.layer
        if not isinstance(layer, nn.Linear):
            return layer.detach().cpu().double().clone()
        rows = [layer.weight.T] + ([layer.bias[None, :]] if layer.bias is not None else [])
        return torch.cat(rows).detach().cpu().double()

    def write(self, matrix: np.ndarray | Tensor) -> None:
        """Overwrite the head with ``W [d, e]`` (the inverse of :meth:`matrix`), in place."""
        value = torch.as_tensor(matrix)
        if tuple(value.shape) != (self.input_dim, self.embed_dim):
            raise ValueError(f"{self.attribute} must have shape {(self.input_dim, self.embed_dim)}, got {tuple(value.shape)}")
        layer = self.layer
        with torch.no_grad():
            if not isinstance(layer, nn.Linear):
                layer.copy_(value.to(dtype=layer.dtype, device=layer.device))
                return
            weight = value[: layer.in_features].T
            layer.weight.copy_(weight.to(dtype=layer.weight.dtype, device=layer.weight.device))
            if layer.bias is not None:
                layer.bias.copy_(value[layer.in_features].to(dtype=layer.bias.dtype, device=layer.bias.device))

    @contextmanager
    def features_only(self) -> Iterator[None]:
        """Make ``tower`` output the cached features ``[.., feature_dim]`` instead of its embedding.

        Exact: every change leaves the computation before the head as it is. Not thread-safe.
        """
        with ExitStack() as undo:
            if self.capture == "detach":
                undo.enter_context(_swapped(self.owner, self.attribute, None))
            elif self.capture == "linear":
                undo.enter_context(_hooked(self.layer.register_forward_hook(_input_with_bias_column(self.has_bias))))
            elif self.capture == "resnet":
                undo.enter_context(_swapped(self.owner, self.attribute, _identity_like(self.layer)))
                undo.enter_context(_hooked(self.owner.register_forward_hook(_output_with_bias_column)))
            else:
                undo.enter_context(_attention_pool_features(self.pool))
            yield


def projection_heads(model: nn.Module) -> tuple[ProjectionHead, ProjectionHead]:
    """The image and the text :class:`ProjectionHead` of an open_clip model; refuses the rest by name."""
    if not isinstance(model, (CLIP, CustomTextCLIP)):
        raise UnsupportedModelError(f"{type(model).__name__} models are not supported; supported {SUPPORTED}")
    return _image_head(model.visual), _text_head(model)


def projection_slots(model: nn.Module) -> tuple[tuple[nn.Module, str], tuple[nn.Module, str]]:
    """``(module, attribute)`` of the image and of the text projection parameter, for the blocks scope.

    The blocks scope (:mod:`ecif.models.blocks`) needs an open_clip ``VisionTransformer`` and
    ``TextTransformer`` whose projections are plain (bias-free) matrices; other towers are refused.
    """
    image, text = projection_heads(model)
    if not (isinstance(image.tower, VisionTransformer) and isinstance(text.tower, TextTransformer | CLIP)
            and image.capture == "detach" and text.capture == "detach"):
        raise UnsupportedModelError(
            f"the blocks scope is not supported for image tower {type(image.tower).__name__} and text tower "
            f"{type(text.tower).__name__}: it needs an open_clip VisionTransformer and TextTransformer whose "
            "projections are bias-free matrices (e.g. ViT-B-32, ViT-L-14, ecif-demo); use the heads scope (blocks=0)"
        )
    return (image.owner, image.attribute), (text.owner, text.attribute)


def refuse_unsupported_config(name: str, blocks: int = 0) -> None:
    """Refuse, from its open_clip config alone, an architecture whose heads the heads scope (or with
    ``blocks > 0``, the blocks scope) cannot take.

    Run before any work; :func:`projection_heads` and :func:`projection_slots` check the built model itself.
    """
    config = open_clip.get_model_config(name) or {}
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    problem = None
    if blocks and (vision.get("timm_model_name") or not isinstance(vision.get("layers", 12), int)
                   or text.get("hf_model_name") or text.get("proj_bias")):
        problem = ("the blocks scope needs an open_clip VisionTransformer and TextTransformer with bias-free "
                   "projections (use the heads scope, blocks=0)")
    elif "multimodal_cfg" in config:
        problem = "CoCa models (a captioning decoder) are not supported"
    elif vision.get("timm_model_name"):
        pool, proj = vision.get("timm_pool", "avg"), vision.get("timm_proj", "linear")
        if pool in ("abs_attn", "rot_attn"):
            problem = f"timm image towers with timm_pool {pool!r} (a projection inside the pooling) are not supported"
        elif proj == "none" and pool != "map":
            problem = f"timm image towers with timm_proj 'none' and timm_pool {pool!r} have no projection head"
    elif "none" in (vision.get("proj_type"), text.get("proj_type")):
        problem = "towers with proj_type 'none' have no projection head"
    elif text.get("hf_model_name") and text.get("hf_proj_type", "mlp") not in ("linear", "mlp"):  # open_clip's default: mlp
        problem = f"Hugging Face text towers with hf_proj_type {text.get('hf_proj_type')!r} have no projection head"
    if problem:
        raise UnsupportedModelError(f"{name}: {problem}; the heads scope supports {SUPPORTED}")


def _image_head(visual: nn.Module) -> ProjectionHead:
    if isinstance(visual, VisionTransformer) and isinstance(visual.proj, nn.Parameter):
        return ProjectionHead(visual, visual, "proj", "detach")
    if isinstance(visual, ModifiedResNet):
        return ProjectionHead(visual, visual.attnpool, "c_proj", "resnet")
    if isinstance(visual, TimmModel):
        head = dict(visual.head.named_children())
        if isinstance(head.get("proj"), nn.Linear):
            return ProjectionHead(visual, visual.head, "proj", "linear")
        if "mlp" in head and isinstance(getattr(head["mlp"], "fc2", None), nn.Linear):
            return ProjectionHead(visual, head["mlp"], "fc2", "linear")
        # timm_proj unset: the trunk's classifier, built with the embedding width, is the projection.
        classifier = visual.trunk.get_classifier() if hasattr(visual.trunk, "get_classifier") else None
        if not head and isinstance(classifier, nn.Linear):
            owner, attribute = _parent_of(visual.trunk, classifier)
            return ProjectionHead(visual, owner, attribute, "linear")
        pool = getattr(visual.trunk, "attn_pool", None)
        if not head and _is_residual_attention_pool(pool) and _passes_through(visual.trunk):
            return ProjectionHead(visual, pool.mlp, "fc2", "attention_pool", pool)
    raise UnsupportedModelError(f"image tower {_describe(visual)} is not supported; supported {SUPPORTED}")


def _text_head(model: nn.Module) -> ProjectionHead:
    text = model if isinstance(model, CLIP) else model.text
    if isinstance(text, CLIP | TextTransformer) and getattr(text, "cls_emb", None) is None:
        projection = text.text_projection
        if isinstance(projection, nn.Parameter):
            return ProjectionHead(text, text, "text_projection", "detach")
        if isinstance(projection, nn.Linear):
            return ProjectionHead(text, text, "text_projection", "linear")
    if type(text).__name__ == "HFTextEncoder" and not getattr(text, "output_tokens", False):
        if isinstance(text.proj, nn.Linear):
            return ProjectionHead(text, text, "proj", "linear")
        if isinstance(text.proj, nn.Sequential) and isinstance(text.proj[-1], nn.Linear):
            return ProjectionHead(text, text.proj, str(len(text.proj) - 1), "linear")
    raise UnsupportedModelError(f"text tower {_describe(text)} is not supported; supported {SUPPORTED}")


def _parent_of(root: nn.Module, module: nn.Module) -> tuple[nn.Module, str]:
    """``(parent, attribute)`` under which ``module`` sits in ``root``."""
    name = next(name for name, candidate in root.named_modules() if candidate is module)
    parent, _, attribute = name.rpartition(".")
    return root.get_submodule(parent), attribute


def _is_residual_attention_pool(pool: Any) -> bool:
    """timm's ``AttentionPoolLatent`` with its output MLP and a pooling that is linear in the latents."""
    return (
        type(pool).__name__ == "AttentionPoolLatent"
        and getattr(pool, "mlp", None) is not None
        and isinstance(getattr(pool.mlp, "fc2", None), nn.Linear)
        and pool.pool in ("token", "avg")
    )


def _passes_through(trunk: nn.Module) -> bool:
    """Whether nothing but dropout follows a timm trunk's pooling (no norm, no classifier)."""
    return all(isinstance(getattr(trunk, name, nn.Identity()), nn.Identity | nn.Dropout) for name in ("fc_norm", "head_drop", "head"))


def _describe(tower: nn.Module) -> str:
    if isinstance(tower, TimmModel):
        return f"TimmModel({type(tower.trunk).__name__}, head {list(dict(tower.head.named_children())) or 'none'})"
    return type(tower).__name__


def _with_bias_column(features: Tensor) -> Tensor:
    """``[.., d] → [.., d + 1]``: the constant-1 column that multiplies a bias folded into ``W``."""
    return torch.cat([features, torch.ones_like(features[..., :1])], dim=-1)


def _input_with_bias_column(has_bias: bool):
    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        return _with_bias_column(inputs[0]) if has_bias else inputs[0]

    return hook


def _output_with_bias_column(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
    return _with_bias_column(output)


def _identity_like(layer: nn.Linear) -> nn.Linear:
    """A square ``Linear`` on ``layer``'s input computing ``x`` exactly (identity weight, zero bias)."""
    weight = layer.weight
    identity = nn.Linear(layer.in_features, layer.in_features, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(layer.in_features, dtype=weight.dtype))
        identity.bias.zero_()
    return identity


@contextmanager
def _attention_pool_features(pool: nn.Module) -> Iterator[None]:
    """Make timm's ``AttentionPoolLatent`` ``pool`` return ``pool([x, 1, r])`` ``[B, d + e]``.

    ``x`` is the input of ``mlp.fc2`` and ``r`` the residual around the MLP (the input of ``norm``),
    per latent; the pool (first latent or mean) is linear, so it commutes with ``x @ W + r``.
    """
    taken: dict[str, Tensor] = {}

    def take(name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            taken[name] = inputs[0]

        return hook

    def pooled(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        features = torch.cat([_with_bias_column(taken["hidden"]), taken["residual"]], dim=-1)
        return features[:, 0] if pool.pool == "token" else features.mean(1)

    with ExitStack() as undo:
        undo.enter_context(_hooked(pool.mlp.fc2.register_forward_pre_hook(take("hidden"))))
        undo.enter_context(_hooked(pool.norm.register_forward_pre_hook(take("residual"))))
        undo.enter_context(_hooked(pool.register_forward_hook(pooled)))
        yield


@contextmanager
def _hooked(handle: torch.utils.hooks.RemovableHandle) -> Iterator[None]:
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _swapped(owner: nn.Module, attribute: str, replacement: Any) -> Iterator[None]:
    saved = getattr(owner, attribute)
    setattr(owner, attribute, replacement)
    try:
        yield
    finally:
        setattr(owner, attribute, saved)
