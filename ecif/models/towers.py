"""Which open_clip towers ecif supports, and where their projection heads are."""

from __future__ import annotations

import torch
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import TextTransformer, VisionTransformer

from ecif.models.open_clip_models import ModelLoadError


class UnsupportedModelError(ModelLoadError):
    """The model's architecture has projection heads that ecif cannot separate from its backbone yet."""


def projection_slots(model: torch.nn.Module) -> tuple[tuple[torch.nn.Module, str], tuple[torch.nn.Module, str]]:
    """``(module, attribute)`` of the image and of the text projection parameter.

    Supported: open_clip ``CLIP``/``CustomTextCLIP`` with a ``VisionTransformer`` image tower and a
    ``TextTransformer`` text tower whose projections are plain (bias-free) matrices.
    """
    visual = getattr(model, "visual", None)
    if isinstance(model, CLIP):
        text_owner: torch.nn.Module | None = model
    elif isinstance(model, CustomTextCLIP) and isinstance(model.text, TextTransformer):
        text_owner = model.text
    else:
        text_owner = None
    image_ok = isinstance(visual, VisionTransformer) and isinstance(visual.proj, torch.nn.Parameter)
    text_ok = text_owner is not None and isinstance(text_owner.text_projection, torch.nn.Parameter)
    if not (image_ok and text_ok):
        text_tower = type(getattr(model, "text", None) or getattr(model, "transformer", None)).__name__
        raise UnsupportedModelError(
            f"{type(model).__name__} with image tower {type(visual).__name__} and text tower {text_tower} "
            "is not supported yet: ecif needs an open_clip VisionTransformer and TextTransformer whose "
            "projections are bias-free matrices (e.g. ViT-B-32, ViT-L-14, ecif-demo; not ResNet, timm "
            "or Hugging Face towers)"
        )
    return (visual, "proj"), (text_owner, "text_projection")
