"""A small synthetic contrastive data set with a known answer, for tests, benchmarks and examples.

Features have class structure (a class centre plus noise, LayerNorm'd like a ViT's pooled output);
a ``flip`` fraction of captions describe another class, which is the planted ground truth.
"""

from __future__ import annotations

import torch
from torch import Tensor


def toy_features(
    n: int, seed: int, image_dim: int = 12, text_dim: int = 10, classes: int = 5, flip: float = 0.1
) -> tuple[Tensor, Tensor, Tensor]:
    """``(image [n, image_dim], text [n, text_dim], flipped [n] bool)`` in float64.

    Class centres are the same for every ``seed`` (so train, validation and test sets drawn with
    different seeds share them); ``seed`` draws the labels, the flips and the noise.
    """
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, image_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(99))
    label = torch.randint(0, classes, (n,), generator=generator)
    caption_label = label.clone()
    flipped = torch.rand(n, generator=generator) < flip
    caption_label[flipped] = (label[flipped] + 1 + torch.randint(0, classes - 1, (int(flipped.sum()),), generator=generator)) % classes
    image = centres[label] + 0.7 * torch.randn(n, image_dim, dtype=torch.float64, generator=generator)
    text = centres[caption_label][:, :text_dim] + 0.7 * torch.randn(n, text_dim, dtype=torch.float64, generator=generator)
    layer_norm = torch.nn.functional.layer_norm
    return layer_norm(image, (image_dim,)), layer_norm(text, (text_dim,)), flipped
