"""The whole scoring run, stage by stage, each stage cached in the run folder.

``run_pipeline`` is what ``ecif score``, ``ecif demo`` and the app's background job all call.
Stages (names as reported to the progress callback): data → demo model → features → fine-tune →
curvature → scores → mispredictions → index → thumbnails.  A stage that finished is recorded in
``run.json`` and skipped next time, so a cancelled or killed job resumes where it stopped; only
a scores table that lacks a column of this version is recomputed (seconds).

The work runs on ``RunConfig.device`` (resolved once, before any stage); each stage that computes
records the device it ran on, and ``run.json``'s ``device`` the latest call's.  The files written are
the same in format on every device, so a run resumes on another one.
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ecif.config import RunConfig
from ecif.curvature.solvers import refuse_ekfac_beyond_heads
from ecif.models.configs import DEMO_MODEL_NAMES
from ecif.paths import cache_dir, text_sha256
from ecif.progress import Reporter, as_reporter
from ecif.run import (
    BAD_ROWS_FILE,
    CLASSES_FILE,
    FEATURES_FILE,
    FINETUNE_FILE,
    HEADS_FILE,
    MANIFEST_FILE,
    MISPREDICTIONS_FILE,
    SCORES_FILE,
    Run,
    atomic_write_json,
    atomic_write_parquet,
)

if TYPE_CHECKING:
    import torch

    from ecif.tasks.engine import Engine


class RunSettingsMismatch(ValueError):
    """The run folder already holds a run made with other settings."""




def default_demo_run_dir() -> Path:
    return cache_dir() / "runs" / "demo"


def _stage(run: Run, name: str, reporter: Reporter, work: Callable[[], dict | None], device: str | None = None) -> None:
    """Run ``work`` unless ``run.json`` says the stage finished; record its summary (and the
    ``device`` it ran on, for a stage that computes on one) when it does."""
    stages = run.info.get("stages", {})
    if stages.get(name, {}).get("done"):
        reporter.report(name, 1, 1)
        return
    started = time.perf_counter()
    reporter.report(name, 0, 0)
    summary = work() or {}
    stages = run.info.get("stages", {})
    stages[name] = {"done": True, "seconds": round(time.perf_counter() - started, 3), **({"device": device} if device else {}), **summary}
    run.update_info(stages=stages)
    reporter.report(name, 1, 1)


# --- run folders of earlier versions --------------------------------------------------------------
# The only compatibility code for old run folders (besides ``CurvatureConfig.from_dict`` ignoring
# settings a later version retired): a cheap stage whose output lacks what this version writes is
# redone; nothing expensive (features, fine-tuning, curvature) is ever redone for an upgrade.


def _upgrade_earlier_run(run: Run, stop_after: str | None) -> None:
    if stop_after is None or STAGES.index(stop_after) >= STAGES.index("scores"):
        _forget_outdated_scores(run)
    _forget_outdated_mispredictions(run)


def _forget_outdated_scores(run: Run) -> None:
    """Mark the scores stage undone when its table lacks a score column this version computes.

    Scoring is seconds once the curvature is stored, so an upgraded library refills the table
    rather than serving a run without its newer columns; nothing else of the run is redone.
    """
    from ecif.influence.columns import INFLUENCE_COLUMNS

    scores = run.info.get("stages", {}).get("scores", {})
    if scores.get("done") and not set(INFLUENCE_COLUMNS) <= set(scores.get("columns", ())):
        _mark_undone(run, "scores")


def _forget_outdated_mispredictions(run: Run) -> None:
    """Mark the mispredictions stage undone when its table predates retrieval items (no ``kind`` column).

    Such a table left out every item without a label (empty for an unlabelled manifest); redoing it
    is one forward pass of the heads.
    """
    import pyarrow.parquet

    stage = run.info.get("stages", {}).get("mispredictions", {})
    if stage.get("done") and run.has(MISPREDICTIONS_FILE):
        if "kind" not in pyarrow.parquet.read_schema(run.path(MISPREDICTIONS_FILE)).names:
            _mark_undone(run, "mispredictions")


def _mark_undone(run: Run, name: str) -> None:
    stages = run.info.get("stages", {})
    stages[name] = {**stages.get(name, {}), "done": False}
    run.update_info(stages=stages)


def load_run_model(run: Run):
    """The run's open_clip model (demo checkpoint or the user's), as recorded in run.json."""
    from ecif.models.open_clip_models import load_model

    info = run.info
    settings = info["settings"]
    return load_model(info["model_name"], checkpoint=info.get("model_checkpoint"), pretrained=settings.get("pretrained"),
                      tokenizer=settings.get("tokenizer"))


def run_pipeline(config: RunConfig, reporter: Reporter | None = None, stop_after: str | None = None) -> Run:
    """Fill ``config.run_dir`` with a scored run (resuming finished stages) and return it.

    ``stop_after`` names a stage of :data:`STAGES` to stop after (e.g. "fine-tune").  Raises
    :class:`ecif.devices.DeviceUnavailable` before any work when ``config.device`` is not on this machine.
    """
    from ecif.devices import resolve_device

    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"unknown stage {stop_after!r}; stages are {', '.join(STAGES)}")
    device = resolve_device(config.device)
    blocks, solver = config.finetune.blocks, config.curvature.solver
    if blocks < 0:
        raise ValueError(f"blocks must be 0 (the heads) or a positive number of transformer blocks, got {blocks}")
    # Refused before the fine-tuning, not after it (build_solver would refuse it then).
    refuse_ekfac_beyond_heads(solver, "blocks" if blocks else "heads")
    if config.model != "demo":
        from ecif.models.open_clip_models import load_tokenizer, require_weights
        from ecif.models.towers import refuse_unsupported_config

        require_weights(config.model, config.checkpoint, config.pretrained)
        refuse_unsupported_config(config.model, blocks)
        load_tokenizer(config.model, config.tokenizer)  # refuses a tokenizer that is not available offline

    run = Run(config.run_dir)
    run.directory.mkdir(parents=True, exist_ok=True)
    # One pipeline per run folder at a time (the app, the command line and tests may all ask): a
    # second caller waits, then finds the stages done.
    with open(run.path(".pipeline.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _run_stages(config, run, as_reporter(reporter), stop_after, device)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass
class StageContext:
    """What every stage sees: the settings, the run folder, progress, and what an earlier stage of
    the same call already loaded (the manifest, the model, the features), so nothing is read twice."""

    config: RunConfig
    run: Run
    reporter: Reporter
    device: torch.device
    """Where the stages compute (``config.device`` resolved on this machine)."""
    _loaded: dict[str, Any] = field(default_factory=dict)

    def manifest(self):
        """The loaded input manifest (the demo data is generated into the run folder first)."""
        from ecif.data import load_manifest, make_demo_data

        if "manifest" not in self._loaded:
            path = self.config.manifest
            if path is None:
                demo, target = self.config.demo, self.run.directory / "data"
                path = target / "manifest.csv"
                if not path.exists():
                    make_demo_data(demo.name, target, n=demo.n, noise=demo.noise, corruption=demo.corruption, seed=demo.seed,
                                   reporter=self.reporter)
            self._loaded["manifest"] = load_manifest(Path(path), reporter=self.reporter)
        return self._loaded["manifest"]

    def model_location(self) -> tuple[str, Path | None]:
        """``(open_clip model name, checkpoint)``: the demo's trained checkpoint or the user's."""
        if self.config.model == "demo":
            return DEMO_MODEL_NAMES[self.config.finetune.demo_loss], Path(self.run.info["demo_checkpoint"])
        return self.config.model, self.config.checkpoint

    def model(self):
        """The run's open_clip model, loaded once per call."""
        from ecif.models.open_clip_models import load_model

        if "model" not in self._loaded:
            name, checkpoint = self.model_location()
            self._loaded["model"] = load_model(name, checkpoint=checkpoint, pretrained=self.config.pretrained, device=self.device,
                                               tokenizer=self.config.tokenizer)
        return self._loaded["model"]

    def engine(self) -> Engine:
        """The run's engine on this call's device; later calls of ``load_engine(run)`` in this
        process (scoring, trace-back) get the same one."""
        from ecif.tasks.engine import load_engine

        return load_engine(self.run, self.device)

    def keep_features(self, image: np.ndarray, text: np.ndarray) -> None:
        """The features the features stage just stored, so that later stages need not read them back."""
        self._loaded["features"] = (image, text)

    def features(self) -> tuple[np.ndarray, np.ndarray]:
        """``(image, text)`` features of every manifest row, as the features stage stored them."""
        if "features" not in self._loaded:
            with np.load(self.run.path(FEATURES_FILE)) as stored:
                self._loaded["features"] = (stored["image"], stored["text"])
        return self._loaded["features"]


def data_stage(context: StageContext) -> dict:
    """Manifest → ``manifest.parquet``, ``bad_rows.parquet``, ``classes.json``."""
    config, run = context.config, context.run
    loaded = context.manifest()
    frame = loaded.frame.reset_index(drop=True)
    # The bad-row report is written first, so that it is shown even when the run cannot go on.
    atomic_write_parquet(run.path(BAD_ROWS_FILE), loaded.bad_rows)
    if not (frame["split"] == "train").any():
        raise ValueError(f"{loaded.path}: no rows with split 'train'; nothing to score")
    if not (frame["split"] == config.trusted_split).any():
        raise ValueError(
            f"{loaded.path}: no rows with split {config.trusted_split!r} to use as the trusted set; "
            "add a split column or choose another --trusted-split"
        )
    atomic_write_parquet(run.path(MANIFEST_FILE), frame)
    if loaded.classes is not None:
        loaded.classes.save(run.path(CLASSES_FILE))
    run.update_info(manifest_path=str(loaded.path), manifest_sha256=loaded.sha256)
    return {"rows": int(len(frame)), "bad_rows": int(len(loaded.bad_rows))}


def demo_model_stage(context: StageContext) -> dict:
    """The demo model's checkpoint (trained once, cached across runs) → ``run.json``."""
    from ecif.models.demo import DemoTrainConfig, train_demo_model

    config = context.config
    if config.model != "demo":
        return {"skipped": True}
    # The model's seed follows the data's, so another demo seed is a wholly independent run.
    training = DemoTrainConfig(seed=config.demo.seed, loss=config.finetune.demo_loss)
    checkpoint = train_demo_model(context.manifest(), training, reporter=context.reporter)
    context.run.update_info(demo_checkpoint=str(checkpoint))
    return {"checkpoint": str(checkpoint)}


def features_stage(context: StageContext) -> dict:
    """Backbone features of every row → ``features.npz`` (and the class prompts' → ``prompts.npz``)."""
    from ecif.data import ZeroShotClasses
    from ecif.models.features import compute_features, drop_failed, encode_prompts
    from ecif.tasks.engine import PROMPTS_FILE

    config, run, reporter = context.config, context.run, context.reporter
    loaded = context.model()
    name, checkpoint = context.model_location()
    run.update_info(model_name=name, model_checkpoint=str(checkpoint) if checkpoint else None, model_hash=loaded.model_hash)
    manifest = run.manifest()
    features = compute_features(loaded, manifest, reporter=reporter, blocks=config.finetune.blocks)
    unreadable = len(features.failed)
    if unreadable:
        manifest, features, failed = drop_failed(manifest, features)
        atomic_write_parquet(run.path(BAD_ROWS_FILE), pd.concat([run.bad_rows(), failed], ignore_index=True))
        atomic_write_parquet(run.path(MANIFEST_FILE), manifest)
    np.savez(run.path(FEATURES_FILE), image=features.image, text=features.text)
    context.keep_features(features.image, features.text)
    if run.has(CLASSES_FILE):
        classes = ZeroShotClasses.load(run.path(CLASSES_FILE))
        prompts = encode_prompts(loaded, classes.names, classes.prompts, blocks=config.finetune.blocks)
        np.savez(run.path(PROMPTS_FILE), features=prompts.features, class_index=prompts.class_index, names=np.asarray(prompts.names))
    # Widths of the features (for the blocks scope: of the block inputs, without the pooling channel).
    image_dim, text_dim = (int(f.shape[-1]) - int(f.ndim == 3) for f in (features.image, features.text))
    return {"image_dim": image_dim, "text_dim": text_dim, "unreadable": unreadable}


def finetune_stage(context: StageContext) -> dict:
    """The influence scope fine-tuned to a minimiser (δ chosen on held-out trusted pairs when auto)
    → ``heads.safetensors``, ``finetune.json``."""
    from ecif.finetune import finetune_heads, select_delta, split_trusted_rows
    from ecif.models.scope import initial_scope
    from ecif.objective.contrastive import ContrastiveData, ContrastiveProblem
    from ecif.tasks.engine import save_heads, split_rows

    config, run, reporter = context.config, context.run, context.reporter
    finetune = config.finetune
    device = context.device
    scope, theta0 = initial_scope(context.model().model, finetune.blocks, finetune.learn_logit_scale, finetune.loss)
    theta0 = theta0.to(device)  # read from the model as float64 on the CPU
    image, text = context.features()
    manifest = run.manifest()
    rows = split_rows(manifest, "train")
    data = ContrastiveData.from_arrays(image[rows], text[rows], finetune.batch_size, finetune.batch_seed, device)
    summary = {}
    if finetune.auto_delta:
        selection_rows, measured_rows = split_trusted_rows(split_rows(manifest, config.trusted_split), finetune)
        if len(selection_rows) < 2 or len(measured_rows) < 2:
            raise ValueError(
                f"the trusted split {config.trusted_split!r} has too few pairs to hold some out for choosing δ; "
                "give a number with --delta (e.g. --delta 1)"
            )
        selection = ContrastiveData.from_arrays(image[selection_rows], text[selection_rows], finetune.batch_size, finetune.batch_seed, device)
        chosen = select_delta(scope, theta0, data, selection, finetune, reporter)
        theta, report = chosen.theta, chosen.report
        summary["delta_selection"] = chosen.summary()
    else:
        theta, report = finetune_heads(ContrastiveProblem(scope, data, theta0, finetune.delta), config=finetune, reporter=reporter)
    save_heads(run.path(HEADS_FILE), scope, theta, theta0, report.delta)
    atomic_write_json(run.path(FINETUNE_FILE), report.to_dict())
    for warning in report.warnings:
        reporter.report(f"fine-tune warning: {warning}", 1, 1)
    # The loss actually used: the settings may say "auto" (the model's own).
    return {"delta": report.delta, "loss": scope.loss, "gradient_norm": report.gradient_norm, "converged": report.converged, **summary}


def curvature_stage(context: StageContext) -> dict:
    """The curvature solver, built and stored in the run folder (``curvature.safetensors``)."""
    return context.engine().solver.describe()


def scores_stage(context: StageContext) -> dict:
    """Every training pair's scores → ``scores.parquet`` (and ``embeddings.npz``)."""
    from ecif.influence.columns import INFLUENCE_COLUMNS
    from ecif.influence.scores import gradient_of, renormalisation_step
    from ecif.tasks.scoring import score_training_pairs, write_embeddings

    run = context.run
    engine = context.engine()  # on this call's device, for the scoring below as well
    write_embeddings(run)
    scores = score_training_pairs(run, reporter=context.reporter)
    atomic_write_parquet(run.path(SCORES_FILE), scores)
    # What the scores leave out (docs/method.md §2): retraining on N−1 pairs renormalises 1/N to
    # 1/(N−1), a first-order change that shifts every single-pair prediction of the trusted loss
    # by this one constant (rankings unchanged).  One solve with the engine the scoring just used.
    shift = float(gradient_of(engine.trusted_loss(), engine.theta) @ renormalisation_step(engine.problem, engine.theta, engine.solver, 1))
    median = float(np.median(np.abs(scores["influence"].to_numpy(dtype=float)))) if len(scores) else 0.0
    return {
        "pairs": int(len(scores)),
        "columns": [c for c in INFLUENCE_COLUMNS if c in scores.columns],
        "renormalisation_shift": shift,
        "renormalisation_shift_relative_to_median": shift / median if median > 0 else None,
    }


def mispredictions_stage(context: StageContext) -> dict:
    """Zero-shot and retrieval answers on the test and trusted splits → ``mispredictions.parquet``."""
    from ecif.tasks.trace import predictions_table

    config = context.config
    context.engine()  # on this call's device
    table = predictions_table(context.run, splits=[config.test_split, config.trusted_split])
    atomic_write_parquet(context.run.path(MISPREDICTIONS_FILE), table)
    return {"items": int(len(table)), "wrong": int((~table["correct"]).sum()) if len(table) else 0}


def index_stage(context: StageContext) -> dict:
    """faiss indexes of the image and caption embeddings (``index/``)."""
    from ecif.index import build_run_index

    build_run_index(context.run, reporter=context.reporter)
    return {}


def thumbnails_stage(context: StageContext) -> dict:
    """Small copies of every image for the app (``thumbnails/``)."""
    from ecif.data import make_thumbnails

    return {"made": int(make_thumbnails(context.run, reporter=context.reporter) or 0)}


#: The pipeline, in order: (name reported to progress and recorded in run.json, the stage).
PIPELINE: tuple[tuple[str, Callable[[StageContext], dict]], ...] = (
    ("data", data_stage),
    ("demo model", demo_model_stage),
    ("features", features_stage),
    ("fine-tune", finetune_stage),
    ("curvature", curvature_stage),
    ("scores", scores_stage),
    ("mispredictions", mispredictions_stage),
    ("index", index_stage),
    ("thumbnails", thumbnails_stage),
)
STAGES = tuple(name for name, _ in PIPELINE)


#: The stages that compute on the run's device (and record which one in run.json).
DEVICE_STAGES = ("features", "fine-tune", "curvature", "scores", "mispredictions")


def _run_stages(config: RunConfig, run: Run, reporter: Reporter, stop_after: str | None, device: torch.device) -> Run:
    from ecif.devices import device_record

    settings = config.settings()
    previous = run.info.get("settings")
    if previous is not None and RunConfig.from_settings(run.directory, previous).settings() != settings:
        raise RunSettingsMismatch(
            f"{run.directory} holds a run made with other settings; choose a new --out folder "
            "or delete this one"
        )
    if previous is None:
        run.update_info(settings=settings, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), ecif_version="0.1.0")
    _upgrade_earlier_run(run, stop_after)
    run.update_info(device=device_record(config.device, device))
    context = StageContext(config, run, reporter, device)
    for name, stage in PIPELINE:
        _stage(run, name, reporter, lambda: stage(context), str(device) if name in DEVICE_STAGES else None)
        if name == stop_after:
            return run
    run.update_info(
        finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        settings_hash=text_sha256(json.dumps(settings, sort_keys=True, default=str))[:16],
    )
    return run
