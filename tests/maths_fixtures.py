"""Small synthetic contrastive problems for the maths tests (features with class structure and
flipped captions, LayerNorm'd like a ViT's pooled output), fine-tuned to a true minimiser."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ecif.influence.objective import ContrastiveData, HeadsProblem, HeadsScope, reference_batches
from ecif.influence.synthetic import toy_features
from ecif.models.heads import FinetuneConfig, finetune_heads
from ecif.models.open_clip_models import LoadedModel


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


#: A CLIP small enough that the dense Hessian of its last block in both towers (~1.3k parameters)
#: is quick to form, with the structure of a real one: class token, causal text, GELU blocks.
TINY_CLIP = {
    "embed_dim": 4,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 8, "head_width": 4, "layers": 2, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 8, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}
TOY_WORDS = ("red circle", "blue square", "green triangle", "yellow star", "purple heart")


def tiny_clip(seed: int = 0, **overrides) -> LoadedModel:
    """A randomly initialised :data:`TINY_CLIP` (``overrides`` update its config) as a ``LoadedModel``."""
    import open_clip
    from open_clip.model import CLIP

    config = {key: dict(value) if isinstance(value, dict) else value for key, value in TINY_CLIP.items()}
    for key, value in overrides.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(**config).eval()
    context = config["text_cfg"]["context_length"]
    return LoadedModel(
        model=model,
        preprocess=lambda image: image,
        tokenizer=lambda texts: open_clip.tokenize(texts, context_length=context),
        name="tiny-clip",
        checkpoint=None,
        pretrained=None,
        model_hash=f"tiny-{seed}",
    )


def toy_pixels_and_captions(n: int, seed: int, flip: float = 0.1) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Images ``[n, 3, 16, 16]`` with a class colour pattern plus noise, their captions, and which are flipped."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(len(TOY_WORDS), 3, 16, 16, generator=torch.Generator().manual_seed(99))
    label = torch.randint(0, len(TOY_WORDS), (n,), generator=generator)
    flipped = torch.rand(n, generator=generator) < flip
    caption_label = torch.where(flipped, (label + 1 + torch.randint(0, len(TOY_WORDS) - 1, (n,), generator=generator)) % len(TOY_WORDS), label)
    pixels = patterns[label] + 0.5 * torch.randn(n, 3, 16, 16, generator=generator)
    return pixels, [f"a {TOY_WORDS[int(k)]}" for k in caption_label], flipped


def make_block_toy(n: int = 48, batch_size: int = 8, blocks: int = 1, delta: float = 10.0) -> Toy:
    """:func:`make_toy` for the blocks scope: the last ``blocks`` blocks of :func:`tiny_clip`, fine-tuned.

    ``δ = 10``: with δ ≤ 3 the 8-wide random towers collapse some projected features onto the origin
    (measured: L-BFGS ends at gradient norm ~1e3 with an indefinite Hessian), as a random ViT-B-32
    does with heads only (tests/test_open_clip_real.py).
    """
    from ecif.models.blocks import blocks_scope, encode_caption_blocks, encode_image_blocks

    loaded = tiny_clip()
    scope, theta0 = blocks_scope(loaded.model, blocks)
    scope = scope.with_logit_scale(math.log(10.0))

    def features(count: int, seed: int, flip: float) -> tuple[ContrastiveData, torch.Tensor]:
        pixels, captions, flipped = toy_pixels_and_captions(count, seed, flip)
        image = encode_image_blocks(loaded, pixels, blocks)
        text = encode_caption_blocks(loaded, captions, blocks)
        return ContrastiveData.from_arrays(image, text, batch_size), flipped

    data, flipped = features(n, 0, 0.15)
    validation, _ = features(32, 1, 0.0)
    problem = HeadsProblem(scope, data, theta0, delta)
    theta, report = finetune_heads(problem, config=FinetuneConfig(delta=delta, batch_size=batch_size))
    assert report.converged, report.warnings
    return Toy(problem, theta, validation, flipped)
