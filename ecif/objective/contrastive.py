"""The contrastive objective of docs/method.md §1 and the per-pair removal terms of §2, as pure functions.

Notation (shapes in brackets, N pairs, d/d' backbone widths, e embedding width):

- ``image [N, d]``, ``text [N, d']``: cached backbone features (pre-projection), float64.
- ``theta [P]``: the influence scope, a flat vector; :class:`HeadsScope` splits it into
  ``W_image [d, e]``, ``W_text [d', e]`` and the log logit scale ``ℓ``.  The wider
  :class:`ecif.objective.blocks.BlocksScope` also holds the last transformer block(s); its features
  are those blocks' token inputs.  Every function here sees a scope only through
  ``project_image``/``project_text``/``log_scale``, so it works for both.
- ``u = normalize(image @ W_image)``, ``v = normalize(text @ W_text)``, ``s_ij = exp(ℓ) u_i·v_j``
  (plus the logit bias ``b`` for the sigmoid loss).
- The scope's ``loss`` (:data:`ecif.config.LOSSES`) says which terms a reference batch ``m`` has:
  ``"clip"`` (softmax): ``a_i = −s_ii + logsumexp_j s_ij`` (image→text) and
  ``b_i = −s_ii + logsumexp_j s_ji`` (text→image) per pair;
  ``"siglip"`` (sigmoid): ``−log σ(y_ij s_ij)`` per pair of pairs ``(i, j)``, ``y_ii = 1``, ``y_ij = −1``.
- ``R(θ) = (1/N) Σ (every term of every batch) + (δ/2)‖θ − θ₀‖²``.

Removing pair ``n`` changes ``R`` by ``−(1/N)(Pos_n + Neg_n)``.  Softmax: ``Pos_n = a_n + b_n`` and,
exactly, ``Neg_n = −Σ_{k∈m, k≠n} [log(1 − P_kn) + log(1 − Q_kn)]`` (``P`` row softmax, ``Q`` column
softmax), or to first order ``Σ_{k≠n} (P_kn + Q_kn)``.  Sigmoid: ``Pos_n`` is its diagonal term and
``Neg_n`` its off-diagonal row and column terms; no normaliser couples the terms, so that is exact and
the first-order form is the same (docs/method.md §2).  Everything here is differentiable with ``torch.func``
(``jvp``, ``vjp``, ``vmap``), which is how the influence maths gets gradients and curvature.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar, Union

import numpy as np
import torch
from torch import Tensor

from ecif.config import Loss
from ecif.objective.logits import learnt_logit_count, logit_parameters, logit_tail, without_default_settings

if TYPE_CHECKING:
    from ecif.objective.blocks import BlocksScope


@dataclass(frozen=True)
class HeadsScope:
    """The default influence scope: both linear projection heads, optionally the logit scale (and bias).

    ``theta`` is laid out as ``[W_image.ravel(), W_text.ravel(), (ℓ, (b))]`` with ``W`` oriented so that
    ``z = h @ W`` (open_clip's ``visual.proj`` and ``text_projection``; a head with a bias has it as
    ``W``'s last row, and its features end with a constant-1 column counted in ``image_dim``).
    ``image_offset``/``text_offset``: the features are ``[h, r]``, ``h [.., dim]`` followed by a fixed
    offset ``r [.., e]``, and ``z = h @ W + r`` (a head inside a residual branch, e.g. SigLIP's).
    ``loss`` and ``logit_bias``: see :func:`ecif.objective.logits.logit_parameters` (the bias belongs to
    the sigmoid loss only).
    """

    image_dim: int
    text_dim: int
    embed_dim: int
    log_logit_scale: float = math.log(100.0)
    learn_logit_scale: bool = False
    image_offset: bool = False
    text_offset: bool = False
    loss: Loss = "clip"
    logit_bias: float = 0.0

    @property
    def size(self) -> int:
        """Number of trainable parameters ``P``."""
        return (self.image_dim + self.text_dim) * self.embed_dim + learnt_logit_count(self)

    def split(self, theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``theta [P]`` → ``(W_image [d, e], W_text [d', e], ℓ scalar)``."""
        n_image = self.image_dim * self.embed_dim
        n_text = self.text_dim * self.embed_dim
        w_image = theta[:n_image].reshape(self.image_dim, self.embed_dim)
        w_text = theta[n_image : n_image + n_text].reshape(self.text_dim, self.embed_dim)
        return w_image, w_text, logit_parameters(self, theta)[0]

    def join(
        self, w_image: Tensor, w_text: Tensor, log_scale: float | Tensor | None = None, logit_bias: float | Tensor | None = None
    ) -> Tensor:
        """Inverse of :meth:`split` (``log_scale`` and ``logit_bias`` are ignored unless learnt)."""
        return torch.cat([w_image.reshape(-1), w_text.reshape(-1), *logit_tail(self, w_image, log_scale, logit_bias)])

    def with_logit_scale(self, log_scale: float) -> HeadsScope:
        return replace(self, log_logit_scale=float(log_scale))

    kind: ClassVar[str] = "heads"

    def project_image(self, theta: Tensor, image: Tensor) -> Tensor:
        """Unnormalised image embeddings ``h @ W_image (+ r)`` ``[..., e]``."""
        return _project(image, self.split(theta)[0], self.image_offset)

    def project_text(self, theta: Tensor, text: Tensor) -> Tensor:
        """Unnormalised text embeddings ``h @ W_text (+ r)`` ``[..., e]``."""
        return _project(text, self.split(theta)[1], self.text_offset)

    def image_inputs(self, image: Tensor) -> Tensor:
        """The columns ``h [..., image_dim]`` of image features that multiply ``W_image``."""
        return image[..., : self.image_dim] if self.image_offset else image

    def text_inputs(self, text: Tensor) -> Tensor:
        """The columns ``h [..., text_dim]`` of text features that multiply ``W_text``."""
        return text[..., : self.text_dim] if self.text_offset else text

    def log_scale(self, theta: Tensor) -> Tensor:
        return self.split(theta)[2]

    def bias(self, theta: Tensor) -> Tensor | None:
        """The logit bias ``b`` (None for the softmax loss, which has none)."""
        return logit_parameters(self, theta)[1]

    def to_dict(self) -> dict:
        """The scope's settings; the offsets and the loss only when not the defaults, so a scope without
        them reads as before."""
        return without_default_settings({"kind": self.kind, **asdict(self)})

    @classmethod
    def from_dict(cls, settings: dict) -> HeadsScope:
        """Inverse of :meth:`to_dict` (records from before the offsets or the loss: no offsets, softmax)."""
        return cls(
            int(settings["image_dim"]),
            int(settings["text_dim"]),
            int(settings["embed_dim"]),
            float(settings["log_logit_scale"]),
            bool(int(settings["learn_logit_scale"])),
            bool(int(settings.get("image_offset", 0))),
            bool(int(settings.get("text_offset", 0))),
            settings.get("loss", "clip"),
            float(settings.get("logit_bias", 0.0)),
        )


def _project(features: Tensor, weight: Tensor, offset: bool) -> Tensor:
    """``h @ W`` ``[..., e]``, plus the offset ``r`` that follows ``h`` in ``features`` when ``offset``."""
    if not offset:
        return features @ weight
    return features[..., : weight.shape[0]] @ weight + features[..., weight.shape[0] :]


def scope_from_dict(settings: dict) -> Scope:
    """A scope from its :meth:`to_dict` (records without ``kind`` are heads scopes)."""
    from ecif.objective.blocks import BlocksScope

    return BlocksScope.from_dict(settings) if settings.get("kind") == "blocks" else HeadsScope.from_dict(settings)


Scope = Union[HeadsScope, "BlocksScope"]
"""An influence scope: ``project_image``, ``project_text``, ``log_scale``, ``bias``, ``loss``, ``size``, ``to_dict``."""


def reference_batches(n_pairs: int, batch_size: int, seed: int = 0) -> list[Tensor]:
    """A fixed, deterministic partition of ``range(n_pairs)`` into batches of about ``batch_size``.

    Sizes differ by at most one (``array_split`` of a seeded permutation), so no batch is a tiny
    remainder whose softmax would behave unlike the others.  ``batch_size >= n_pairs`` gives one batch.
    """
    if n_pairs <= 0:
        return []
    order = np.random.default_rng(seed).permutation(n_pairs)
    n_batches = max(1, math.ceil(n_pairs / max(1, batch_size)))
    return [torch.as_tensor(np.sort(part), dtype=torch.long) for part in np.array_split(order, n_batches)]


TOKEN_CHUNK_PAIRS = 512


@dataclass
class ContrastiveData:
    """Cached backbone features of a set of pairs, with their fixed reference batching.

    ``normaliser`` is the ``N`` of ``(1/N) Σ``; it stays the original ``N`` when pairs are removed
    for an influence estimate (the scores leave out the ``1/N → 1/(N−1)`` renormalisation: a
    first-order term, but one constant shift of every single-pair score) and is
    set to the remaining count when the reduced problem is actually retrained.

    Batches are evaluated together as a padded ``[M, B]`` index (padding masked out), a chunk of
    batches at a time: a few large tensor operations instead of a Python loop per batch, which keeps
    ``torch.func`` transforms fast, with memory bounded by ``chunk_pairs · B``.
    """

    image: Tensor
    text: Tensor
    batches: list[Tensor]
    normaliser: float = field(default=0.0)
    chunk_pairs: int = 16384

    def __post_init__(self) -> None:
        if self.image.shape[0] != self.text.shape[0]:
            raise ValueError(f"image has {self.image.shape[0]} rows but text has {self.text.shape[0]}")
        if not self.normaliser:
            self.normaliser = float(self.image.shape[0])
        # The index tensors live with the features, so no batch is copied between devices in a loop.
        device = self.image.device
        self.batches = [batch.to(device) for batch in self.batches]
        order = torch.cat(self.batches) if self.batches else torch.zeros(0, dtype=torch.long, device=device)
        if order.numel() != self.image.shape[0] or (
            order.numel() and not torch.equal(torch.sort(order).values, torch.arange(self.image.shape[0], device=device))
        ):
            raise ValueError("reference batches must partition the rows exactly once")
        width = max((len(b) for b in self.batches), default=0)
        self.batch_index = torch.zeros(len(self.batches), width, dtype=torch.long, device=device)
        self.batch_mask = torch.zeros(len(self.batches), width, dtype=torch.bool, device=device)
        for position, batch in enumerate(self.batches):
            self.batch_index[position, : len(batch)] = batch
            self.batch_mask[position, : len(batch)] = True
        # Where each row sits in the flattened [M, B] layout, to return per-pair values in row order.
        flat_rows = self.batch_index[self.batch_mask]
        flat_positions = torch.nonzero(self.batch_mask.reshape(-1)).squeeze(1)
        self.position_of_row = torch.empty(self.image.shape[0], dtype=torch.long, device=device)
        self.position_of_row[flat_rows] = flat_positions

    @property
    def n_pairs(self) -> int:
        return int(self.image.shape[0])

    @classmethod
    def from_arrays(
        cls,
        image: np.ndarray | Tensor,
        text: np.ndarray | Tensor,
        batch_size: int,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> ContrastiveData:
        """Float64 data on ``device`` (default: where ``image`` is, the CPU for arrays) with the
        reference batching of ``batch_size`` drawn with ``seed``.

        Rows that are token sequences (the blocks scope's ``[N, T, w + 1]``) are evaluated
        :data:`TOKEN_CHUNK_PAIRS` pairs at a time: each carries a transformer block's activations.
        """
        image_t = torch.as_tensor(image if isinstance(image, Tensor) else np.asarray(image), dtype=torch.float64, device=device)
        text_t = torch.as_tensor(text if isinstance(text, Tensor) else np.asarray(text), dtype=torch.float64, device=image_t.device)
        chunk_pairs = TOKEN_CHUNK_PAIRS if image_t.ndim == 3 else cls.chunk_pairs
        return cls(image_t, text_t, reference_batches(image_t.shape[0], batch_size, seed), chunk_pairs=chunk_pairs)

    def chunks(self) -> list[slice]:
        """Slices of whole batches, each covering about ``chunk_pairs`` pairs."""
        per_chunk = max(1, self.chunk_pairs // max(1, self.batch_index.shape[1]))
        return [slice(start, start + per_chunk) for start in range(0, len(self.batches), per_chunk)]

    def to_row_order(self, per_position: Tensor) -> Tensor:
        """Per-pair values laid out ``[M, B]`` (padding included) → ``[N]`` in row order."""
        return per_position.reshape(-1)[self.position_of_row]

    def edited(
        self,
        drop_rows: list[int] | np.ndarray | Tensor = (),
        new_text: dict[int, Tensor] | None = None,
        renormalise: bool = False,
    ) -> tuple[ContrastiveData, Tensor]:
        """The same data with ``drop_rows`` removed from their batches and some captions replaced.

        ``new_text`` maps a row to its new caption's backbone features ``[d']`` (a relabel is a
        removal of the old pair plus the addition of the new one in the same batch slot).  Returns
        the edited data and ``kept [N']``, the original row of each remaining row.
        """
        device = self.image.device
        drop = torch.as_tensor(np.asarray(list(drop_rows), dtype=np.int64), device=device)
        keep_mask = torch.ones(self.n_pairs, dtype=torch.bool, device=device)
        keep_mask[drop] = False
        kept = torch.nonzero(keep_mask).squeeze(1)
        new_position = torch.full((self.n_pairs,), -1, dtype=torch.long, device=device)
        new_position[kept] = torch.arange(kept.numel(), device=device)
        text = self.text
        if new_text:
            text = text.clone()
            for row, features in new_text.items():
                text[row] = torch.as_tensor(features, dtype=text.dtype, device=device)
        batches = [new_position[b[keep_mask[b]]] for b in self.batches]
        batches = [b for b in batches if b.numel()]
        normaliser = float(kept.numel()) if renormalise else self.normaliser
        edited = ContrastiveData(self.image[kept], text[kept], batches, normaliser, self.chunk_pairs)
        return edited, kept


def embed(scope: Scope, theta: Tensor, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unit embeddings ``u [n, e]``, ``v [n, e]`` and the logit scale ``exp(ℓ)``."""
    u = torch.nn.functional.normalize(scope.project_image(theta, image), dim=-1)
    v = torch.nn.functional.normalize(scope.project_text(theta, text), dim=-1)
    return u, v, scope.log_scale(theta).exp()


def logits_from_projections(z_image: Tensor, z_text: Tensor, log_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """``S [..., B, B]`` with ``S[i, j] = exp(ℓ) u_i·v_j (+ b)`` from the projections before normalisation."""
    u = torch.nn.functional.normalize(z_image, dim=-1)
    v = torch.nn.functional.normalize(z_text, dim=-1)
    logits = log_scale.exp() * (u @ v.transpose(-1, -2))
    return logits if bias is None else logits + bias


def batch_logits(scope: Scope, theta: Tensor, image: Tensor, text: Tensor) -> Tensor:
    """``S [..., B, B]`` with ``S[i, j] = exp(ℓ) u_i·v_j (+ b)`` for one batch or a stack of batches."""
    z_image, z_text = scope.project_image(theta, image), scope.project_text(theta, text)
    return logits_from_projections(z_image, z_text, scope.log_scale(theta), scope.bias(theta))


_MASKED_LOGIT = -1e4  # exp(-1e4) is exactly 0 in float64: padding drops out of every softmax


def _log_one_minus_exp(log_p: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x ≤ 0``, stable at both ends (Mächler's log1mexp)."""
    log_p = log_p.clamp(max=-1e-30)
    return torch.where(log_p > -math.log(2.0), torch.log(-torch.expm1(log_p)), torch.log1p(-torch.exp(log_p)))


def mask_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Logits of padded batches with every entry that touches padding set to ``_MASKED_LOGIT``."""
    valid = mask[..., :, None] & mask[..., None, :]
    return torch.where(valid, logits, torch.full_like(logits, _MASKED_LOGIT))


def positive_terms(logits: Tensor) -> Tensor:
    """``a_i + b_i = −2 s_ii + logsumexp_j s_ij + logsumexp_j s_ji`` per pair ``[..., B]``."""
    diagonal = torch.diagonal(logits, dim1=-2, dim2=-1)
    return -2.0 * diagonal + torch.logsumexp(logits, dim=-1) + torch.logsumexp(logits, dim=-2)


def sigmoid_terms(logits: Tensor, mask: Tensor) -> Tensor:
    """SigLIP's ``−log σ(y_ij S_ij)`` per entry ``[..., B, B]`` (``y_ii = 1``, ``y_ij = −1``; 0 where
    ``mask [..., B]`` marks padding in row or column): open_clip's ``SigLipLoss`` before its sum."""
    size = logits.shape[-1]
    labels = 2.0 * torch.eye(size, dtype=logits.dtype, device=logits.device) - 1.0
    valid = mask[..., :, None] & mask[..., None, :]
    terms = -torch.nn.functional.logsigmoid(labels * logits)
    return torch.where(valid, terms, torch.zeros_like(terms))


def batch_pair_terms(logits: Tensor, mask: Tensor | None = None, loss: Loss = "clip") -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair ``(Pos, Neg_exact, Neg_first_order)`` ``[..., B]`` from logits ``S [..., B, B]``.

    ``mask [..., B]`` marks real pairs in padded batches; padded entries come out as 0.  For the
    sigmoid loss, ``Pos_n`` is the diagonal term and ``Neg_n`` the sum of row ``n`` and column ``n``
    off the diagonal: exactly what removing ``n`` removes, so both negative forms are that sum.
    """
    size = logits.shape[-1]
    if mask is None:
        mask = torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    if loss == "siglip":
        terms = sigmoid_terms(logits, mask)
        own = torch.diagonal(terms, dim1=-2, dim2=-1)
        negative = terms.sum(dim=-1) + terms.sum(dim=-2) - 2.0 * own
        return own, negative, negative
    logits = mask_logits(logits, mask)
    log_rows = torch.log_softmax(logits, dim=-1)  # log P[k, n]: image k over captions n
    log_cols = torch.log_softmax(logits, dim=-2).transpose(-1, -2)  # log Q[k, n]: caption k over images n
    others = (mask[..., :, None] & mask[..., None, :]) & ~torch.eye(size, dtype=torch.bool, device=logits.device)
    exact = -(_log_one_minus_exp(log_rows) + _log_one_minus_exp(log_cols))
    negative_exact = torch.where(others, exact, torch.zeros_like(exact)).sum(dim=-2)
    first = log_rows.exp() + log_cols.exp()
    negative_first = torch.where(others, first, torch.zeros_like(first)).sum(dim=-2)
    zero = torch.zeros(logits.shape[:-1], dtype=logits.dtype, device=logits.device)
    return (
        torch.where(mask, positive_terms(logits), zero),
        torch.where(mask, negative_exact, zero),
        torch.where(mask, negative_first, zero),
    )


def chunk_logits(scope: Scope, theta: Tensor, data: ContrastiveData, chunk: slice) -> tuple[Tensor, Tensor]:
    """Unmasked logits ``[m, B, B]`` of a chunk of batches and its padding mask ``[m, B]``."""
    index, mask = data.batch_index[chunk], data.batch_mask[chunk]
    return batch_logits(scope, theta, data.image[index], data.text[index]), mask


def pair_terms(scope: Scope, theta: Tensor, data: ContrastiveData) -> dict[str, Tensor]:
    """``{"pos", "neg", "neg_first_order"}``, each ``[N]`` in row order (unnormalised, no ``1/N``)."""
    parts = [batch_pair_terms(*chunk_logits(scope, theta, data, chunk), scope.loss) for chunk in data.chunks()]
    names = ("pos", "neg", "neg_first_order")
    return {name: data.to_row_order(torch.cat([p[i] for p in parts])) for i, name in enumerate(names)}


def batch_loss_sum(logits: Tensor, mask: Tensor, loss: Loss) -> Tensor:
    """Sum of every term of a stack of padded batches (scalar): ``Σ_i (a_i + b_i)`` for the softmax
    loss, ``Σ_ij −log σ(y_ij S_ij)`` for the sigmoid loss; ``logits [..., B, B]`` unmasked, ``mask [..., B]``."""
    if loss == "siglip":
        return sigmoid_terms(logits, mask).sum()
    per_pair = positive_terms(mask_logits(logits, mask))
    return torch.where(mask, per_pair, torch.zeros_like(per_pair)).sum()


def contrastive_sum(scope: Scope, theta: Tensor, data: ContrastiveData) -> Tensor:
    """Every term of every batch summed (scalar): ``Σ_i (a_i + b_i)`` (softmax) or ``Σ_m Σ_{i,j∈m}
    −log σ(y_ij s_ij)`` (sigmoid)."""
    total = theta.new_zeros(())
    for chunk in data.chunks():
        total = total + batch_loss_sum(*chunk_logits(scope, theta, data, chunk), scope.loss)
    return total


def contrastive_loss(scope: Scope, theta: Tensor, data: ContrastiveData) -> Tensor:
    """Mean contrastive loss ``(1/N) Σ terms`` in nats: softmax, ``(1/N) Σ (a_i + b_i)`` (image→text plus
    text→image, twice open_clip's ``ClipLoss``); sigmoid, open_clip's ``SigLipLoss`` averaged over batches."""
    return contrastive_sum(scope, theta, data) / data.normaliser


def objective(scope: Scope, theta: Tensor, data: ContrastiveData, theta0: Tensor, delta: float) -> Tensor:
    """``R(θ) = (1/N) Σ terms + (δ/2)‖θ − θ₀‖²`` (docs/method.md §1)."""
    return contrastive_loss(scope, theta, data) + 0.5 * delta * torch.sum((theta - theta0) ** 2)


def pair_losses(scope: Scope, theta: Tensor, data: ContrastiveData) -> Tensor:
    """Each pair's own loss ``Pos_i`` ``[N]`` (``a_i + b_i``, or its sigmoid diagonal term; the cheap 'loss' baseline)."""
    return pair_terms(scope, theta, data)["pos"]


def clip_scores(scope: Scope, theta: Tensor, image: Tensor, text: Tensor) -> Tensor:
    """Cosine ``u_i·v_i`` of each pair under the heads ``[N]`` (the 'CLIP-score' baseline)."""
    u, v, _ = embed(scope, theta, image, text)
    return (u * v).sum(dim=-1)


def prenormalisation_norms(scope: Scope, theta: Tensor, image: Tensor, text: Tensor) -> Tensor:
    """Smallest ``‖h W‖`` per pair over both modalities ``[N]``: where ``normalize`` becomes singular."""
    return torch.minimum(scope.project_image(theta, image).norm(dim=-1), scope.project_text(theta, text).norm(dim=-1))


@dataclass
class ContrastiveProblem:
    """Everything that defines ``R(θ)``: scope, training data with its batching, ``θ₀`` and ``δ``."""

    scope: Scope
    data: ContrastiveData
    theta0: Tensor
    delta: float

    def objective(self, theta: Tensor) -> Tensor:
        return objective(self.scope, theta, self.data, self.theta0, self.delta)

    def with_data(self, data: ContrastiveData) -> ContrastiveProblem:
        return ContrastiveProblem(self.scope, data, self.theta0, self.delta)
