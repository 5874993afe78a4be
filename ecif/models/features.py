"""Backbone features (before the projection heads) and reading/writing the heads themselves.

The default influence scope is the pair of projection heads, so everything ECIF does runs on
features taken *before* them: ``h_img`` (e.g. the ViT's pooled, layer-normed output) and ``h_txt``
(the text transformer's pooled output). With ``W_image = visual.proj`` and ``W_text = text_projection``
the model's embeddings are exactly ``normalize(h_img @ W_image)`` and ``normalize(h_txt @ W_text)``.
Other towers (:mod:`ecif.models.towers`) have a bias, folded into ``W`` with a constant-1 feature
column, or a fixed offset (a residual) cached after the features: see :class:`Heads`.

With ``blocks = k > 0`` (the wider influence scope of :mod:`ecif.objective.blocks`) the features
are instead each row's input to the last ``k`` transformer blocks, every token, with a pooling-weight
channel: ``[T, w + 1]`` per row (see :mod:`ecif.models.blocks`).

Features are cached on disk in shards, keyed by the model weights and the rows' content, so a
second run is instant and an interrupted one resumes after the last finished shard.
:func:`compute_features` takes a whole frame; :func:`iter_chunk_features` takes a stream of chunks
(e.g. from :func:`ecif.data.iter_manifest_chunks`) and keeps one shard per chunk, so a manifest
larger than memory is processed with one chunk in memory at a time.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ecif.data.images import image_signature, open_image
from ecif.data.manifest import SHARD_COLUMN
from ecif.models.open_clip_models import LoadedModel, Preprocess
from ecif.models.towers import projection_heads
from ecif.objective.contrastive import HeadsScope
from ecif.paths import cache_dir, text_sha256
from ecif.progress import Reporter, as_reporter
from ecif.run import atomic_write_bytes

FEATURES_STAGE = "features"
# Rows per cache shard: an interrupted run loses at most this much work.
SHARD_ROWS = 512
CHUNKS_DIR = "chunks"
"""Folder (under the model's feature cache) of :func:`iter_chunk_features`'s one-file-per-chunk shards."""


@dataclass
class Features:
    """Pre-projection backbone features of a manifest's rows, in row order.

    ``image``: float32 [N, d_img]; ``text``: float32 [N, d_txt] (of each row's caption); with
    ``blocks > 0``, block inputs ``[N, T, w + 1]`` and ``[N, T', w' + 1]`` instead.
    ``failed``: row position -> reason, for images that could not be read when the features were
    computed; their ``image`` row is all zeros and must not be used.
    """

    image: np.ndarray
    text: np.ndarray
    failed: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image)


class Heads(NamedTuple):
    """The projection heads, float64, oriented so that embedding = normalize(h @ W (+ r, see below)).

    ``image``: [d_img, e]; ``text``: [d_txt, e] (a bias is the last row, and ``d`` counts the
    constant-1 feature column it multiplies); ``log_logit_scale``: log of the softmax temperature
    multiplier (similarities are ``exp(log_logit_scale) * cosine``). ``image_offset``/``text_offset``:
    the features carry a fixed offset ``r [e]`` after their ``d`` columns, and embedding =
    normalize(h @ W + r) (SigLIP's image head, see :mod:`ecif.models.towers`).
    """

    image: np.ndarray
    text: np.ndarray
    log_logit_scale: float
    image_offset: bool = False
    text_offset: bool = False

    def scope(self, learn_logit_scale: bool = False) -> HeadsScope:
        """The :class:`HeadsScope` of these heads (their ``θ`` is ``scope.join(image, text, ℓ)``)."""
        return HeadsScope(
            self.image.shape[0], self.text.shape[0], self.image.shape[1], self.log_logit_scale, learn_logit_scale,
            image_offset=self.image_offset, text_offset=self.text_offset,
        )


@dataclass
class PromptFeatures:
    """Pre-projection text features of every zero-shot prompt.

    ``features``: float32 [K, d_txt] for all prompts of all classes; ``class_index``: int64 [K],
    the position in ``names`` of each prompt's class.
    """

    features: np.ndarray
    class_index: np.ndarray
    names: list[str]


def get_heads(model: torch.nn.Module) -> Heads:
    """The model's image and text projections and log logit scale, as float64 numpy copies."""
    image, text = projection_heads(model)
    return Heads(
        image=image.matrix().numpy(),
        text=text.matrix().numpy(),
        log_logit_scale=float(model.logit_scale.detach().cpu().reshape(-1)[0]),
        image_offset=image.offset,
        text_offset=text.offset,
    )


def set_heads(
    model: torch.nn.Module,
    W_image: np.ndarray | torch.Tensor,
    W_text: np.ndarray | torch.Tensor,
    log_logit_scale: float,
) -> None:
    """Overwrite the model's projections ([d_img, e], [d_txt, e], as :func:`get_heads` reads them)
    and log logit scale in place."""
    for head, value in zip(projection_heads(model), (W_image, W_text)):
        head.write(value)
    with torch.no_grad():
        model.logit_scale.fill_(float(log_logit_scale))


def load_images(paths: Sequence[str], preprocess: Preprocess) -> tuple[torch.Tensor, dict[int, str]]:
    """Read and preprocess images: float32 [n, 3, H, W], plus position -> reason for unreadable ones.

    An unreadable image becomes an all-zero tensor instead of stopping the job; the manifest loader
    has already validated every file, so this only happens if a file changed since.
    """
    tensors: list[torch.Tensor | None] = []
    failed: dict[int, str] = {}
    for position, path in enumerate(paths):
        try:
            with open_image(path) as image:
                tensors.append(preprocess(image.convert("RGB")))
        # PIL raises OSError, ValueError, SyntaxError or DecompressionBombError depending on how the
        # file is broken; any of them means "skip this one image".
        except Exception as error:
            failed[position] = f"{type(error).__name__}: {error}"
            tensors.append(None)
    if failed:
        # Shaped like a preprocessed image even when every image of the batch is broken.
        blank = torch.zeros_like(preprocess(Image.new("RGB", (32, 32))))
        tensors = [tensor if tensor is not None else blank for tensor in tensors]
    return torch.stack(tensors), failed


def encode_images(loaded: LoadedModel, images: torch.Tensor, blocks: int = 0) -> np.ndarray:
    """Pre-projection image features, float32 [n, d_img], of preprocessed images [n, 3, H, W].

    ``blocks > 0``: the inputs of the last ``blocks`` transformer blocks instead, ``[n, T, w + 1]``.
    """
    if blocks:
        from ecif.models.blocks import encode_image_blocks

        return encode_image_blocks(loaded, images, blocks)
    with torch.inference_mode(), _backbone_only(loaded.model):
        return loaded.model.encode_image(images.to(loaded.device)).float().cpu().numpy()


def encode_captions(loaded: LoadedModel, captions: Sequence[str], batch_size: int = 256, blocks: int = 0) -> np.ndarray:
    """Pre-projection text features, float32 [k, d_txt], of ``captions`` (any text, e.g. prompts).

    ``blocks > 0``: the inputs of the last ``blocks`` transformer blocks instead, ``[k, T, w' + 1]``.
    """
    if blocks:
        from ecif.models.blocks import encode_caption_blocks

        return encode_caption_blocks(loaded, captions, blocks, batch_size)
    chunks = []
    with torch.inference_mode(), _backbone_only(loaded.model):
        for start in range(0, len(captions), batch_size):
            tokens = loaded.tokenizer(list(captions[start : start + batch_size])).to(loaded.device)
            chunks.append(loaded.model.encode_text(tokens).float().cpu().numpy())
    if not chunks:
        return np.zeros((0, _text_width(loaded.model)), dtype=np.float32)
    return np.concatenate(chunks)


def encode_prompts(
    loaded: LoadedModel, names: Sequence[str], prompts: Mapping[str, Sequence[str]], blocks: int = 0
) -> PromptFeatures:
    """Pre-projection features of every prompt of every class (``ZeroShotClasses.names/.prompts``)."""
    texts, class_index = [], []
    for position, name in enumerate(names):
        class_prompts = list(prompts.get(name) or [name])  # a class without prompts is described by its name
        texts.extend(class_prompts)
        class_index.extend([position] * len(class_prompts))
    return PromptFeatures(
        features=encode_captions(loaded, texts, blocks=blocks),
        class_index=np.asarray(class_index, dtype=np.int64),
        names=list(names),
    )


def compute_features(
    loaded: LoadedModel,
    frame: pd.DataFrame,
    reporter: Reporter | None = None,
    batch_size: int = 64,
    blocks: int = 0,
) -> Features:
    """Pre-projection features of every row of ``frame`` (columns ``filepath``, ``caption``).

    ``blocks > 0``: the inputs of the last ``blocks`` transformer blocks instead (cached apart).

    Cached under ``cache_dir()/features/<model_hash>/<content hash>/`` in shards of
    :data:`SHARD_ROWS` rows; finished shards are reused, so a cancelled or killed run resumes
    where it stopped. Progress is reported as rows done under the stage "features".
    """
    reporter = as_reporter(reporter)
    directory = features_cache_dir(loaded, frame, blocks)
    paths = frame["filepath"].astype(str).tolist()
    captions = frame["caption"].astype(str).tolist()
    total = len(frame)
    image_parts, text_parts, failed = [], [], {}
    reporter.report(FEATURES_STAGE, 0, total)
    for shard_start in range(0, total, SHARD_ROWS):
        shard_stop = min(shard_start + SHARD_ROWS, total)
        shard_file = directory / f"shard_{shard_start // SHARD_ROWS:05d}.npz"
        if not shard_file.exists():
            _write_shard(loaded, paths, captions, shard_start, shard_stop, batch_size, shard_file, reporter, blocks=blocks)
        shard = _read_shard(shard_file)
        image_parts.append(shard.image)
        text_parts.append(shard.text)
        failed.update({row + shard_start: reason for row, reason in shard.failed.items()})
        reporter.report(FEATURES_STAGE, shard_stop, total)
    if failed:
        listed = "; ".join(f"{paths[row]} ({reason})" for row, reason in list(failed.items())[:5])
        warnings.warn(f"{len(failed)} image(s) could not be read and have no features: {listed}", stacklevel=2)
    return Features(image=_concatenate(image_parts), text=_concatenate(text_parts), failed=failed)


def iter_chunk_features(
    loaded: LoadedModel,
    chunks: Iterable[pd.DataFrame],
    reporter: Reporter | None = None,
    batch_size: int = 64,
) -> Iterator[tuple[pd.DataFrame, Features]]:
    """``(chunk, its features)`` for each chunk (columns ``filepath``, ``caption``) of a stream.

    Each chunk's features are one cache file, ``cache_dir()/features/<model_hash>/chunks/<chunk
    content hash>.npz`` (:func:`chunk_features_file`), written before it is yielded; a rerun after
    an interruption reads the finished chunks back and computes only the rest.  Empty chunks are
    skipped.  Unreadable images are listed in each chunk's ``Features.failed`` (positions within the
    chunk).  Progress: rows done so far under the stage "features" (total 0: unknown).
    """
    reporter = as_reporter(reporter)
    done = 0
    for frame in chunks:
        if frame.empty:
            continue
        shard_file = chunk_features_file(loaded, frame)
        if not shard_file.exists():
            paths = frame["filepath"].astype(str).tolist()
            captions = frame["caption"].astype(str).tolist()
            _write_shard(loaded, paths, captions, 0, len(frame), batch_size, shard_file, reporter, done, 0)
        done += len(frame)
        reporter.report(FEATURES_STAGE, done, 0)
        yield frame, _read_shard(shard_file)


def drop_failed(frame: pd.DataFrame, features: Features) -> tuple[pd.DataFrame, Features, pd.DataFrame]:
    """Take the rows whose image could not be read out of ``frame`` (canonical manifest columns) and
    its ``features``: ``(other rows, their features, the failed rows as bad rows)``.

    The bad rows have the manifest's bad-row columns (``row``, ``uid``, ``filepath``, ``reason``,
    and ``shard`` when the frame has one), so they can join the loader's report.
    """
    failed = sorted(features.failed)
    keep = np.setdiff1d(np.arange(len(frame)), failed)
    bad = pd.DataFrame(
        {
            "row": frame["source_row"].to_numpy()[failed],
            "uid": frame["uid"].to_numpy()[failed],
            "filepath": frame["filepath"].to_numpy()[failed],
            "reason": [f"undecodable image: {features.failed[row]}" for row in failed],
        }
    )
    if SHARD_COLUMN in frame.columns:
        bad[SHARD_COLUMN] = frame[SHARD_COLUMN].to_numpy()[failed]
    kept = Features(image=features.image[keep], text=features.text[keep])
    return frame.iloc[keep].reset_index(drop=True), kept, bad


def features_cache_dir(loaded: LoadedModel, frame: pd.DataFrame, blocks: int = 0) -> Path:
    """Where :func:`compute_features` keeps the shards for this model and these rows.

    The key covers each image's path, size and modification time, each caption, and the
    preprocessing, so editing any of them recomputes instead of serving stale features.
    """
    key = text_sha256(repr(loaded.preprocess), str(SHARD_ROWS), *row_signatures(frame))
    return cache_dir() / "features" / loaded.model_hash / (key[:32] if not blocks else f"{key[:32]}-blocks{blocks}")


def chunk_features_file(loaded: LoadedModel, frame: pd.DataFrame) -> Path:
    """The cache file of one chunk's features for :func:`iter_chunk_features` (key as in
    :func:`features_cache_dir`, without the shard size: a chunk is one shard)."""
    key = text_sha256(repr(loaded.preprocess), CHUNKS_DIR, *row_signatures(frame))
    return cache_dir() / "features" / loaded.model_hash / CHUNKS_DIR / f"{key[:32]}.npz"


def row_signatures(frame: pd.DataFrame) -> Iterator[str]:
    """Per row: image path, size and modification time of the file holding it, and the caption.

    What the feature caches are keyed by: a cheap stand-in for the rows' content.
    """
    for path, caption in zip(frame["filepath"].astype(str), frame["caption"].astype(str)):
        yield f"{path}\x1e{image_signature(path)}\x1e{caption}"


def _write_shard(
    loaded: LoadedModel,
    paths: list[str],
    captions: list[str],
    start: int,
    stop: int,
    batch_size: int,
    shard_file: Path,
    reporter: Reporter,
    done_before: int = 0,
    total: int | None = None,
    blocks: int = 0,
) -> None:
    """Compute rows ``start:stop`` batch by batch and store them as one npz file.

    Progress counts ``done_before + row`` out of ``total`` (default: ``len(paths)``).
    """
    total = len(paths) if total is None else total
    images, failed = [], {}
    for batch_start in range(start, stop, batch_size):
        # Progress of the previous batch; the shard's last batch is reported by the caller once the
        # shard is on disk, so a cancellation there does not throw the finished shard away.
        if batch_start > start:
            reporter.report(FEATURES_STAGE, done_before + batch_start, total)
        batch_stop = min(batch_start + batch_size, stop)
        pixels, batch_failed = load_images(paths[batch_start:batch_stop], loaded.preprocess)
        images.append(encode_images(loaded, pixels, blocks))
        failed.update({batch_start - start + k: reason for k, reason in batch_failed.items()})
    image = np.concatenate(images)
    image[list(failed)] = 0.0  # their zero pixels were encoded too; such a row must not look like data
    buffer = io.BytesIO()
    np.savez(
        buffer,
        image=image,
        text=encode_captions(loaded, captions[start:stop], blocks=blocks),
        failed_rows=np.asarray(list(failed), dtype=np.int64),
        failed_reasons=np.asarray(list(failed.values()), dtype=str),
    )
    atomic_write_bytes(shard_file, buffer.getvalue())


def _read_shard(shard_file: Path) -> Features:
    """One cache shard written by :func:`_write_shard` (``failed`` positions within the shard)."""
    with np.load(shard_file) as shard:
        failed = dict(zip(shard["failed_rows"].tolist(), shard["failed_reasons"].tolist(), strict=True))
        return Features(image=shard["image"], text=shard["text"], failed=failed)


def _concatenate(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros((0, 0), np.float32)


@contextmanager
def _backbone_only(model: torch.nn.Module) -> Iterator[None]:
    """Temporarily make both encoders return their head's features instead of embeddings.

    E.g. open_clip applies a ViT's projection only when it is not None, so detaching it is exact;
    each tower family has its own exact way (:meth:`ecif.models.towers.ProjectionHead.features_only`).
    Not thread-safe: do not use the model elsewhere meanwhile.
    """
    image, text = projection_heads(model)
    with image.features_only(), text.features_only():
        yield


def _text_width(model: torch.nn.Module) -> int:
    return projection_heads(model)[1].feature_dim
