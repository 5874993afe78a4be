"""Training the tiny "ecif-demo" CLIP from scratch on a demo manifest (noisy captions included).

The demo needs a model that has really learned from the noisy pairs ECIF is meant to find, and it
must train on two CPU cores in a few minutes. Training is deterministic (seeded, fixed thread
count, data order derived from the seed and the epoch), cached by manifest and settings, and
resumable: a checkpoint of the full training state is written after every epoch.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from ecif.config import Loss
from ecif.data import LoadedManifest
from ecif.data.demo import DemoName, caption_words
from ecif.models.configs import DEMO_MODEL_NAMES, demo_config_file
from ecif.models.features import load_images
from ecif.models.open_clip_models import load_model, read_state_dict, save_checkpoint
from ecif.paths import asset_path, cache_dir, file_sha256, text_sha256
from ecif.progress import Reporter, as_reporter
from ecif.run import atomic_write_bytes, atomic_write_json

DEMO_STAGE = "demo model"
# Bump when the training procedure changes in a way that changes the weights, to retire old caches.
_TRAINING_VERSION = "3"
#: The demo model trained on the default demo data, shipped so that no first launch trains it
#: (about eight minutes on two cores); its record says what it was trained on and how well it does.
SHIPPED_MODEL = "models/ecif-demo.safetensors"
SHIPPED_RECORD = "models/ecif-demo.json"


class ShippedModelError(ValueError):
    """The shipped demo model's file does not match its recorded checksum (a broken checkout)."""


@dataclass(frozen=True)
class DemoTrainConfig:
    """Settings of demo training. Every field is part of the cache key.

    Training runs ``epochs`` epochs, or more on a small train split so that it takes at least
    ``min_steps`` optimisation steps: the class is learnt late (after colour, size and position),
    after one to two thousand steps.

    ``lr`` is the AdamW peak learning rate (linear warm-up over ``warmup_epochs``, then cosine
    decay to zero); ``max_shift`` is the random translation, in pixels, applied to training images
    (small enough that "top left" stays top left); ``hard_negative_group`` is the size of the
    hard-negative groups batches are made of (see :func:`hard_negative_order`; 0 or 1: plain random
    batches); ``num_threads`` is fixed so that results do not depend on the machine's core count.
    ``loss``: CLIP's softmax loss (``open_clip.ClipLoss``, the ``ecif-demo`` architecture) or SigLIP's
    sigmoid loss (``open_clip.SigLipLoss``, the ``ecif-demo-sigmoid`` architecture with a logit bias).
    """

    epochs: int = 80
    min_steps: int = 2600
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_epochs: float = 2.0
    max_shift: int = 4
    hard_negative_group: int = 4
    seed: int = 0
    num_threads: int = 2
    loss: Loss = "clip"


def demo_cache_key(manifest: LoadedManifest, config: DemoTrainConfig) -> str:
    """Cache key of a trained demo model: manifest content, settings, architecture, procedure."""
    settings = asdict(config)
    if config.loss == "clip":  # the settings as they were before the loss was one: the CLIP caches and the shipped model stay valid
        del settings["loss"]
    return text_sha256(
        manifest.sha256,
        json.dumps(settings, sort_keys=True),
        demo_config_file(config.loss).read_text(),
        _TRAINING_VERSION,
    )[:24]


def train_demo_model(
    manifest: LoadedManifest,
    config: DemoTrainConfig = DemoTrainConfig(),
    reporter: Reporter | None = None,
    use_shipped: bool = True,
) -> Path:
    """Train "ecif-demo" on the manifest's ``split == "train"`` rows; return the safetensors checkpoint.

    With ``use_shipped`` the model shipped in ``assets/`` is returned instead when it was trained on
    this very manifest with these settings (same :func:`demo_cache_key`): the default demo never
    trains. ``use_shipped=False`` (``ecif train-demo``) always trains.

    The checkpoint is cached at ``cache_dir()/models/ecif-demo-<key>.safetensors``: a second call
    with the same manifest and settings returns at once. After an interruption (``Cancelled``,
    ``KeyboardInterrupt``, a killed process) the next call resumes from the last finished epoch.
    Progress is reported as optimisation steps under the stage "demo model".
    """
    reporter = as_reporter(reporter)
    key = demo_cache_key(manifest, config)
    if use_shipped and (shipped := shipped_demo_checkpoint(key)) is not None:
        reporter.report(DEMO_STAGE, 1, 1)
        return shipped
    models_dir = cache_dir() / "models"
    model_name = DEMO_MODEL_NAMES[config.loss]
    final_path = models_dir / f"{model_name}-{key}.safetensors"
    if final_path.exists():
        return final_path
    resume_path = models_dir / f"{model_name}-{key}.resume.pt"

    train = manifest.frame[manifest.frame["split"] == "train"]

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        loaded = load_model(model_name, seed=config.seed)
        model = loaded.model
        images, failed = load_images(train["filepath"].astype(str).tolist(), loaded.preprocess)
        keep = torch.tensor([position not in failed for position in range(len(train))])
        images = images[keep]
        captions = train["caption"].astype(str).tolist()
        tokens = loaded.tokenizer(captions)[keep]
        labels = train["label"].astype(str).tolist() if "label" in train.columns else None
        if labels is not None:
            labels = [label for label, kept in zip(labels, keep.tolist()) if kept]
        templates = caption_templates([c for c, kept in zip(captions, keep.tolist()) if kept], labels)
        if len(images) < 2:
            raise ValueError(f"only {len(images)} training images could be read; the demo model needs at least 2")

        batch_size = min(config.batch_size, len(images))
        steps_per_epoch = len(images) // batch_size  # the last incomplete batch is dropped
        epochs = max(config.epochs, math.ceil(config.min_steps / steps_per_epoch))
        total_steps = steps_per_epoch * epochs
        # CLIP's β₂ = 0.98: the default 0.999 reacts too slowly to the contrastive loss's gradient spikes.
        # fused: one kernel over all parameters, 7x faster than the per-tensor loop on CPU, where the
        # 4.7M-entry token embedding otherwise makes the optimiser step a third of the training time.
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay, fused=True
        )
        warmup = max(1, round(config.warmup_epochs * steps_per_epoch))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, warmup, total_steps))
        loss_function = SigLipLoss() if config.loss == "siglip" else open_clip.ClipLoss()

        first_epoch = 0
        if resume_path.exists():
            state = torch.load(resume_path, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            first_epoch = int(state["epoch"])

        model.train()
        reporter.report(DEMO_STAGE, first_epoch * steps_per_epoch, total_steps)
        for epoch in range(first_epoch, epochs):
            # Order and augmentation depend only on (seed, epoch), so a resumed run equals an uninterrupted one.
            generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
            order = hard_negative_order(templates, labels, config.hard_negative_group, generator)
            for step in range(steps_per_epoch):
                batch = order[step * batch_size : (step + 1) * batch_size]
                pixels = _random_shift(images[batch], config.max_shift, generator)
                # (image features, text features, logit scale[, logit bias]): what each loss takes
                loss = loss_function(*model(pixels, tokens[batch]))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                with torch.no_grad():  # as in CLIP: a temperature above 100 destabilises training
                    model.logit_scale.clamp_(0, math.log(100))
                reporter.report(DEMO_STAGE, epoch * steps_per_epoch + step + 1, total_steps)
            _save_training_state(resume_path, model, optimizer, schedule, epoch + 1)

        model.eval()
        save_checkpoint(model, final_path)
        resume_path.unlink(missing_ok=True)
        return final_path
    finally:
        torch.set_num_threads(previous_threads)


def demo_architecture(checkpoint: str | Path) -> str:
    """The demo architecture a trained demo checkpoint fits: ``ecif-demo-sigmoid`` when it holds a
    ``logit_bias`` (trained with SigLIP's loss), else ``ecif-demo``."""
    return DEMO_MODEL_NAMES["siglip" if "logit_bias" in read_state_dict(checkpoint) else "clip"]


def shipped_demo_record() -> dict | None:
    """The shipped model's record (``assets/models/ecif-demo.json``), or None when none is shipped."""
    path = asset_path(SHIPPED_RECORD)
    return json.loads(path.read_text()) if path.exists() else None


def shipped_demo_checkpoint(key: str) -> Path | None:
    """The shipped demo model if it was trained with cache key ``key``, else None.

    Raises :class:`ShippedModelError` when its file is missing or its SHA-256 is not the recorded one.
    """
    record = shipped_demo_record()
    if record is None or record["cache_key"] != key:
        return None
    path = asset_path(SHIPPED_MODEL)
    found = file_sha256(path) if path.exists() else "no file"
    if found != record["sha256"]:
        raise ShippedModelError(
            f"the shipped demo model {path} is corrupted or missing (sha256 {found}, expected {record['sha256']}); "
            "restore it from the repository (git checkout -- assets/models) or retrain it with `ecif train-demo`"
        )
    return path


def write_shipped_demo_model(
    checkpoint: Path,
    manifest: LoadedManifest,
    demo_data: dict,
    config: DemoTrainConfig = DemoTrainConfig(),
    accuracy: dict | None = None,
) -> Path:
    """Store a trained demo checkpoint as the shipped model (``assets/models``) with its record.

    Only the token embeddings of the words the demo ``demo_data["name"]`` can use are kept (the
    other 49,000-odd rows never received a gradient; they read back as zeros), so every caption
    and prompt of the demo embeds exactly as with the trained model.
    """
    loaded = load_model(DEMO_MODEL_NAMES[config.loss], checkpoint=checkpoint)
    name: DemoName = demo_data["name"]
    tokens = loaded.tokenizer([" ".join(caption_words(name))]).unique()
    path = asset_path(SHIPPED_MODEL)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(loaded.model, path, kept_rows={"token_embedding.weight": tokens})
    record = {
        "cache_key": demo_cache_key(manifest, config),
        "sha256": file_sha256(path),
        "demo_data": demo_data,
        "train_config": asdict(config),
        "zero_shot_accuracy": accuracy or {},
        "kept_token_rows": int(len(tokens)),
        "torch": torch.__version__,
        "made_by": "ecif train-demo --write-asset",
    }
    atomic_write_json(asset_path(SHIPPED_RECORD), record)
    return path


def caption_templates(captions: list[str], labels: list[str] | None) -> list[str]:
    """Each caption with its own label's words blanked out: pairs that share a template differ in class.

    ``"a small red circle at the top left"`` with label ``circle`` → ``"a small red _ at the top left"``.
    Without labels (or when a caption does not name its label) every caption is its own template.
    """
    if labels is None:
        return list(captions)
    return [
        re.sub(rf"\b{re.escape(label)}\b", "_", caption, flags=re.IGNORECASE) if label else caption
        for caption, label in zip(captions, labels, strict=True)
    ]


def hard_negative_order(
    templates: list[str], labels: list[str] | None, group_size: int, generator: torch.Generator
) -> torch.Tensor:
    """A permutation of ``range(len(templates))`` whose consecutive runs of ``group_size`` share a template.

    Pairs whose captions match except for the class word land in the same batch, so the contrastive
    loss can only separate them by the class: with random batches a caption is usually identified by
    its easy attributes (colour, position) alone and the class is barely learnt.  Within a template
    the labels are interleaved, so a group holds as many different classes as it can; groups are
    shuffled, so a batch still mixes many templates.  ``group_size`` ≤ 1 gives a random permutation.
    """
    order = torch.randperm(len(templates), generator=generator)
    if group_size <= 1:
        return order
    buckets: dict[str, list[int]] = {}
    for index in order.tolist():
        buckets.setdefault(templates[index], []).append(index)
    groups = []
    for members in buckets.values():
        if labels is not None:
            seen: dict[str, int] = {}
            turn = []
            for index in members:
                turn.append(seen.get(labels[index], 0))
                seen[labels[index]] = turn[-1] + 1
            members = [index for _, index in sorted(zip(turn, members), key=lambda item: item[0])]
        groups += [members[i : i + group_size] for i in range(0, len(members), group_size)]
    shuffled = torch.randperm(len(groups), generator=generator).tolist()
    return torch.tensor([index for position in shuffled for index in groups[position]], dtype=torch.long)


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _random_shift(pixels: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image [B, 3, H, W] by up to ``max_shift`` pixels, filling with edge pixels."""
    if max_shift <= 0:
        return pixels
    size = pixels.shape[-1]
    padded = F.pad(pixels, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (len(pixels), 2), generator=generator)
    return torch.stack(
        [image[:, dy : dy + size, dx : dx + size] for image, (dy, dx) in zip(padded, offsets.tolist())]
    )


def _save_training_state(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    epochs_done: int,
) -> None:
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "epoch": epochs_done,
        },
        buffer,
    )
    atomic_write_bytes(path, buffer.getvalue())
