"""The last transformer block(s) of an open_clip model as an influence scope (:mod:`ecif.objective.blocks`).

Three things come from the model: the scope's shape and ``θ₀`` (the blocks', final norms' and
projections' weights), the features (each row's input to the first block in scope, every token, with
its pooling weight as an extra channel) and, after an edit, the weights written back for export.
Supported: open_clip ``CLIP``/``CustomTextCLIP`` whose towers are a ``VisionTransformer`` (class-token
or average pooling, no attentional pooler) and a ``TextTransformer`` (no CoCa class token) built from
plain ``ResidualAttentionBlock``s without layer scale: ViT-B-32, ViT-L-14, ecif-demo and their kin.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from open_clip.model import CLIP
from open_clip.transformer import QuickGELU, ResidualAttentionBlock, text_global_pool

from ecif.models.open_clip_models import LoadedModel
from ecif.models.towers import UnsupportedModelError, projection_slots
from ecif.objective.blocks import BlocksScope, TowerShape


@dataclass
class _Tower:
    blocks: list[ResidualAttentionBlock]
    norm: torch.nn.Module
    projection: torch.nn.Parameter
    shape: TowerShape


def _tower_blocks(transformer: torch.nn.Module, count: int, where: str) -> list[ResidualAttentionBlock]:
    blocks = list(transformer.resblocks)
    if not 1 <= count <= len(blocks):
        raise ValueError(f"{where} has {len(blocks)} transformer blocks; cannot take the last {count}")
    chosen = blocks[-count:]
    for block in chosen:
        if type(block) is not ResidualAttentionBlock or not isinstance(block.ls_1, torch.nn.Identity) or hasattr(block, "ln_1_kv"):
            raise UnsupportedModelError(
                f"{where}: block type {type(block).__name__} (layer scale, cross attention or a custom block) "
                "is not supported in the blocks scope; use the heads scope (blocks=0)"
            )
        gelu = block.mlp.gelu
        if not (isinstance(gelu, QuickGELU) or (isinstance(gelu, torch.nn.GELU) and gelu.approximate == "none")):
            raise UnsupportedModelError(f"{where}: activation {gelu!r} is not supported in the blocks scope")
    return chosen


def _shape(blocks: list[ResidualAttentionBlock], norm: torch.nn.Module, **flags) -> TowerShape:
    first = blocks[0]
    return TowerShape(
        width=int(first.ln_1.normalized_shape[0]),
        heads=int(first.attn.num_heads),
        mlp_width=int(first.mlp.c_fc.out_features),
        blocks=len(blocks),
        activation="quick_gelu" if isinstance(first.mlp.gelu, QuickGELU) else "gelu",
        norm_eps=float(norm.eps),
        **flags,
    )


def _image_tower(model: torch.nn.Module, count: int) -> _Tower:
    (visual, _), _ = projection_slots(model)
    if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
        raise UnsupportedModelError(f"image tower pooling {visual.pool_type!r} with an attentional pooler is not supported in the blocks scope")
    blocks = _tower_blocks(visual.transformer, count, "image tower")
    shape = _shape(blocks, visual.ln_post, one_hot_pool=visual.pool_type == "tok", norm_after_pool=bool(visual.final_ln_after_pool))
    return _Tower(blocks, visual.ln_post, visual.proj, shape)


def _text_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor | None, str, int | None]:
    """``(transformer, ln_final, attn_mask, pool_type, eos id)`` of the text tower."""
    if isinstance(model, CLIP):
        return model.transformer, model.ln_final, model.attn_mask, model.text_pool_type, getattr(model, "text_eos_id", None)
    text = model.text
    if getattr(text, "cls_emb", None) is not None:
        raise UnsupportedModelError("text towers with an appended class token (CoCa) are not supported in the blocks scope")
    if getattr(text, "use_pad_mask", False):
        raise UnsupportedModelError("text towers that mask padding tokens are not supported in the blocks scope")
    return text.transformer, text.ln_final, text.attn_mask, text.pool_type, getattr(text, "eos_id", None)


def _text_tower(model: torch.nn.Module, count: int) -> _Tower:
    _, (owner, attribute) = projection_slots(model)
    transformer, ln_final, attn_mask, pool_type, _ = _text_parts(model)
    if pool_type not in ("first", "last", "argmax", "eos"):
        raise UnsupportedModelError(f"text pooling {pool_type!r} is not supported in the blocks scope")
    blocks = _tower_blocks(transformer, count, "text tower")
    shape = _shape(blocks, ln_final, causal=attn_mask is not None, one_hot_pool=True)
    return _Tower(blocks, ln_final, getattr(owner, attribute), shape)


def _tower_parameters(tower: _Tower) -> dict[str, torch.Tensor]:
    parameters = {}
    for index, block in enumerate(tower.blocks):
        for name, value in block.state_dict().items():
            parameters[f"blocks.{index}.{name}"] = value
    parameters["norm.weight"], parameters["norm.bias"] = tower.norm.weight, tower.norm.bias
    parameters["proj"] = tower.projection
    return {name: value.detach().cpu().double() for name, value in parameters.items()}


def blocks_scope(model: torch.nn.Module, blocks: int = 1, learn_logit_scale: bool = False) -> tuple[BlocksScope, torch.Tensor]:
    """The scope of the last ``blocks`` blocks of both towers, and ``θ₀ [P]`` (float64) read from ``model``."""
    image, text = _image_tower(model, blocks), _text_tower(model, blocks)
    log_scale = float(model.logit_scale.detach().cpu().reshape(-1)[0])
    scope = BlocksScope(image.shape, text.shape, int(image.projection.shape[1]), log_scale, learn_logit_scale)
    return scope, scope.join(_tower_parameters(image), _tower_parameters(text), log_scale)


def set_blocks(model: torch.nn.Module, scope: BlocksScope, theta: torch.Tensor) -> None:
    """Write ``theta [P]`` back into the model's blocks, final norms, projections and logit scale, in place."""
    with torch.no_grad():
        for name, tower in (("image", _image_tower(model, scope.image.blocks)), ("text", _text_tower(model, scope.text.blocks))):
            values = scope.tower_parameters(theta, name)
            targets = {f"blocks.{i}.{key}": value for i, block in enumerate(tower.blocks) for key, value in block.state_dict(keep_vars=True).items()}
            targets.update({"norm.weight": tower.norm.weight, "norm.bias": tower.norm.bias, "proj": tower.projection})
            for key, target in targets.items():
                target.copy_(values[key].to(dtype=target.dtype, device=target.device))
        model.logit_scale.fill_(float(scope.log_scale(theta)))


@contextmanager
def _captured_input(block: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """The input ``x [n, T, w]`` of every call of ``block`` while the context is open."""
    seen: list[torch.Tensor] = []
    handle = block.register_forward_pre_hook(lambda _module, args: seen.append(args[0].detach()))
    try:
        yield seen
    finally:
        handle.remove()


def _with_pool_channel(tokens: torch.Tensor, pool: torch.Tensor) -> np.ndarray:
    return torch.cat([tokens.float(), pool.float()[..., None]], dim=-1).cpu().numpy()


def encode_image_blocks(loaded: LoadedModel, images: torch.Tensor, blocks: int) -> np.ndarray:
    """Block inputs with the pooling channel, float32 ``[n, T, w + 1]``, of preprocessed images."""
    tower = _image_tower(loaded.model, blocks)
    with torch.inference_mode(), _captured_input(tower.blocks[0]) as seen:
        loaded.model.encode_image(images.to(loaded.device))
    tokens = seen.pop()
    pool = torch.zeros(tokens.shape[:2], device=tokens.device)
    if tower.shape.one_hot_pool:
        pool[:, 0] = 1.0
    else:
        pool[:, 1:] = 1.0 / (tokens.shape[1] - 1)
    return _with_pool_channel(tokens, pool)


def encode_caption_blocks(loaded: LoadedModel, captions: Sequence[str], blocks: int, batch_size: int = 256) -> np.ndarray:
    """Block inputs with the pooling channel, float32 ``[k, T, w' + 1]``, of ``captions``."""
    tower = _text_tower(loaded.model, blocks)
    _, _, _, pool_type, eos_id = _text_parts(loaded.model)
    chunks = []
    with torch.inference_mode(), _captured_input(tower.blocks[0]) as seen:
        for start in range(0, len(captions), batch_size):
            tokens = loaded.tokenizer(list(captions[start : start + batch_size])).to(loaded.device)
            loaded.model.encode_text(tokens)
            x = seen.pop()
            # Which position the tower pools, found by pooling the positions themselves.
            positions = torch.arange(x.shape[1], device=x.device, dtype=torch.float32)[None, :, None].expand(x.shape[0], -1, 1)
            pooled = text_global_pool(positions, tokens, pool_type, eos_token_id=eos_id).reshape(-1).long()
            chunks.append(_with_pool_channel(x, torch.nn.functional.one_hot(pooled, x.shape[1])))
    if not chunks:
        width = tower.shape.width + 1
        context = int(getattr(loaded.model, "context_length", 0) or 0)
        return np.zeros((0, context, width), dtype=np.float32)
    return np.concatenate(chunks)
