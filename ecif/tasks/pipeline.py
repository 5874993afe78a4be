"""The whole scoring run, stage by stage, each stage cached in the run folder.

``run_pipeline`` is what ``ecif score``, ``ecif demo`` and the app's background job all call.
Stages (names as reported to the progress callback): data → demo model → features → fine-tune →
curvature → scores → mispredictions → index → thumbnails.  A stage that finished is recorded in
``run.json`` and skipped next time, so a cancelled or killed job resumes where it stopped; only
a scores table that lacks a column of this version is recomputed (seconds).
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ecif.curvature.solvers import CurvatureConfig, refuse_ekfac_beyond_heads
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
from ecif.models.heads import FinetuneConfig

DEMO_MODEL_NAME = "ecif-demo"


@dataclass
class DemoDataConfig:
    """The built-in demo data set generated when no manifest is given."""

    name: str = "shapes"
    n: int = 3000
    noise: float = 0.1
    corruption: str = "random-caption"
    seed: int = 0


@dataclass
class RunConfig:
    """Everything that defines a scoring run.

    ``manifest=None`` generates the built-in demo data inside the run folder.  ``model="demo"``
    trains the small ``ecif-demo`` open_clip model on the manifest's train split (cached); any
    other open_clip model name needs a local ``checkpoint`` (or an already-cached ``pretrained`` tag).
    ``trusted_split`` is the clean validation set the influence is measured on; ``test_split`` is
    scanned for mispredictions.
    """

    run_dir: Path
    manifest: Path | None = None
    model: str = "demo"
    checkpoint: Path | None = None
    pretrained: str | None = None
    trusted_split: str = "val"
    test_split: str = "test"
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)

    def settings(self) -> dict[str, Any]:
        """The settings that determine the results (recorded in run.json, compared on resume)."""
        return {
            "manifest": str(self.manifest) if self.manifest else None,
            "model": self.model,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "pretrained": self.pretrained,
            "trusted_split": self.trusted_split,
            "test_split": self.test_split,
            "demo": asdict(self.demo) if self.manifest is None else None,
            "finetune": self.finetune.to_dict(),
            "curvature": self.curvature.to_dict(),
        }

    @classmethod
    def from_settings(cls, run_dir: Path, settings: dict[str, Any]) -> RunConfig:
        return cls(
            run_dir=Path(run_dir),
            manifest=Path(settings["manifest"]) if settings.get("manifest") else None,
            model=settings.get("model", "demo"),
            checkpoint=Path(settings["checkpoint"]) if settings.get("checkpoint") else None,
            pretrained=settings.get("pretrained"),
            trusted_split=settings.get("trusted_split", "val"),
            test_split=settings.get("test_split", "test"),
            demo=DemoDataConfig(**(settings.get("demo") or {})),
            finetune=FinetuneConfig(**settings.get("finetune", {})),
            curvature=CurvatureConfig.from_dict(settings.get("curvature", {})),
        )


class RunSettingsMismatch(ValueError):
    """The run folder already holds a run made with other settings."""


STAGES = ("data", "demo model", "features", "fine-tune", "curvature", "scores", "mispredictions", "index", "thumbnails")


def default_demo_run_dir() -> Path:
    return cache_dir() / "runs" / "demo"


def _stage(run: Run, name: str, reporter: Reporter, work: Callable[[], dict | None]) -> None:
    """Run ``work`` unless ``run.json`` says the stage finished; record its summary when it does."""
    stages = run.info.get("stages", {})
    if stages.get(name, {}).get("done"):
        reporter.report(name, 1, 1)
        return
    started = time.perf_counter()
    reporter.report(name, 0, 0)
    summary = work() or {}
    stages = run.info.get("stages", {})
    stages[name] = {"done": True, "seconds": round(time.perf_counter() - started, 3), **summary}
    run.update_info(stages=stages)
    reporter.report(name, 1, 1)


def _forget_outdated_scores(run: Run) -> None:
    """Mark the scores stage undone when its table lacks a score column this version computes.

    Scoring is seconds once the curvature is stored, so an upgraded library refills the table
    rather than serving a run without its newer columns; nothing else of the run is redone.
    """
    from ecif.tasks.evaluate import INFLUENCE_COLUMNS

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


def _model_location(config: RunConfig, run: Run) -> tuple[str, Path | None]:
    if config.model == "demo":
        return DEMO_MODEL_NAME, Path(run.info["demo_checkpoint"])
    return config.model, config.checkpoint


def load_run_model(run: Run):
    """The run's open_clip model (demo checkpoint or the user's), as recorded in run.json."""
    from ecif.models.open_clip_models import load_model

    info = run.info
    return load_model(info["model_name"], checkpoint=info.get("model_checkpoint"), pretrained=info["settings"].get("pretrained"))


def run_pipeline(config: RunConfig, reporter: Reporter | None = None, stop_after: str | None = None) -> Run:
    """Fill ``config.run_dir`` with a scored run (resuming finished stages) and return it.

    ``stop_after`` names a stage of :data:`STAGES` to stop after (e.g. "fine-tune").
    """
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"unknown stage {stop_after!r}; stages are {', '.join(STAGES)}")
    blocks, solver = config.finetune.blocks, config.curvature.solver
    if blocks < 0:
        raise ValueError(f"blocks must be 0 (the heads) or a positive number of transformer blocks, got {blocks}")
    # Refused before the fine-tuning, not after it (build_solver would refuse it then).
    refuse_ekfac_beyond_heads(solver, "blocks" if blocks else "heads")
    if config.model != "demo":
        from ecif.models.open_clip_models import require_weights

        require_weights(config.model, config.checkpoint, config.pretrained)

    run = Run(config.run_dir)
    run.directory.mkdir(parents=True, exist_ok=True)
    # One pipeline per run folder at a time (the app, the command line and tests may all ask): a
    # second caller waits, then finds the stages done.
    with open(run.path(".pipeline.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _run_stages(config, run, as_reporter(reporter), stop_after)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run_stages(config: RunConfig, run: Run, reporter: Reporter, stop_after: str | None) -> Run:
    from ecif.data import load_manifest, make_demo_data, make_thumbnails
    from ecif.models.demo import DemoTrainConfig, train_demo_model
    from ecif.models.features import compute_features, drop_failed, encode_prompts
    from ecif.models.open_clip_models import load_model

    settings = config.settings()
    previous = run.info.get("settings")
    if previous is not None and RunConfig.from_settings(run.directory, previous).settings() != settings:
        raise RunSettingsMismatch(
            f"{run.directory} holds a run made with other settings; choose a new --out folder "
            "or delete this one"
        )
    if previous is None:
        run.update_info(settings=settings, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), ecif_version="0.1.0")
    if stop_after is None or STAGES.index(stop_after) >= STAGES.index("scores"):
        _forget_outdated_scores(run)
    _forget_outdated_mispredictions(run)
    loaded_manifest = {}

    def manifest_path() -> Path:
        if config.manifest is not None:
            return Path(config.manifest)
        demo = config.demo
        target = run.directory / "data"
        manifest = target / "manifest.csv"
        if not manifest.exists():
            make_demo_data(demo.name, target, n=demo.n, noise=demo.noise, corruption=demo.corruption, seed=demo.seed, reporter=reporter)
        return manifest

    def get_manifest():
        if "value" not in loaded_manifest:
            loaded_manifest["value"] = load_manifest(manifest_path(), reporter=reporter)
        return loaded_manifest["value"]

    def data_stage() -> dict:
        loaded = get_manifest()
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

    def demo_model_stage() -> dict:
        if config.model != "demo":
            return {"skipped": True}
        # The model's seed follows the data's, so another demo seed is a wholly independent run.
        training = DemoTrainConfig(seed=config.demo.seed)
        checkpoint = train_demo_model(get_manifest(), training, reporter=reporter)
        run.update_info(demo_checkpoint=str(checkpoint))
        return {"checkpoint": str(checkpoint)}

    def features_stage() -> dict:
        name, checkpoint = _model_location(config, run)
        loaded = load_model(name, checkpoint=checkpoint, pretrained=config.pretrained)
        run.update_info(model_name=name, model_checkpoint=str(checkpoint) if checkpoint else None, model_hash=loaded.model_hash)
        manifest = run.manifest()
        features = compute_features(loaded, manifest, reporter=reporter, blocks=config.finetune.blocks)
        unreadable = len(features.failed)
        if unreadable:
            manifest, features, failed = drop_failed(manifest, features)
            atomic_write_parquet(run.path(BAD_ROWS_FILE), pd.concat([run.bad_rows(), failed], ignore_index=True))
            atomic_write_parquet(run.path(MANIFEST_FILE), manifest)
        np.savez(run.path(FEATURES_FILE), image=features.image, text=features.text)
        if run.has(CLASSES_FILE):
            from ecif.data import ZeroShotClasses
            from ecif.tasks.engine import PROMPTS_FILE

            classes = ZeroShotClasses.load(run.path(CLASSES_FILE))
            prompts = encode_prompts(loaded, classes.names, classes.prompts, blocks=config.finetune.blocks)
            np.savez(run.path(PROMPTS_FILE), features=prompts.features, class_index=prompts.class_index, names=np.asarray(prompts.names))
        # Widths of the features (for the blocks scope: of the block inputs, without the pooling channel).
        image_dim, text_dim = (int(f.shape[-1]) - int(f.ndim == 3) for f in (features.image, features.text))
        return {"image_dim": image_dim, "text_dim": text_dim, "unreadable": unreadable}

    def finetune_stage() -> dict:
        from ecif.influence.objective import ContrastiveData, HeadsProblem
        from ecif.models.heads import finetune_heads, initial_scope, select_delta, split_trusted_rows
        from ecif.tasks.engine import save_heads, split_rows

        name, checkpoint = _model_location(config, run)
        model = load_model(name, checkpoint=checkpoint, pretrained=config.pretrained).model
        scope, theta0 = initial_scope(model, config.finetune.blocks, config.finetune.learn_logit_scale)
        with np.load(run.path(FEATURES_FILE)) as stored:
            image, text = stored["image"], stored["text"]
        manifest = run.manifest()
        rows = split_rows(manifest, "train")
        finetune = config.finetune
        data = ContrastiveData.from_arrays(image[rows], text[rows], finetune.batch_size, finetune.batch_seed)
        summary = {}
        if finetune.auto_delta:
            selection_rows, measured_rows = split_trusted_rows(split_rows(manifest, config.trusted_split), finetune)
            if len(selection_rows) < 2 or len(measured_rows) < 2:
                raise ValueError(
                    f"the trusted split {config.trusted_split!r} has too few pairs to hold some out for choosing δ; "
                    "give a number with --delta (e.g. --delta 1)"
                )
            selection = ContrastiveData.from_arrays(image[selection_rows], text[selection_rows], finetune.batch_size, finetune.batch_seed)
            chosen = select_delta(scope, theta0, data, selection, finetune, reporter)
            theta, report = chosen.theta, chosen.report
            summary["delta_selection"] = chosen.summary()
        else:
            theta, report = finetune_heads(HeadsProblem(scope, data, theta0, finetune.delta), config=finetune, reporter=reporter)
        save_heads(run.path(HEADS_FILE), scope, theta, theta0, report.delta)
        atomic_write_json(run.path(FINETUNE_FILE), report.to_dict())
        for warning in report.warnings:
            reporter.report(f"fine-tune warning: {warning}", 1, 1)
        return {"delta": report.delta, "gradient_norm": report.gradient_norm, "converged": report.converged, **summary}

    def curvature_stage() -> dict:
        from ecif.tasks.engine import load_engine

        engine = load_engine(run)
        return engine.solver.describe()

    def scores_stage() -> dict:
        from ecif.tasks.evaluate import INFLUENCE_COLUMNS, score_training_pairs, write_embeddings

        write_embeddings(run)
        scores = score_training_pairs(run, reporter=reporter)
        atomic_write_parquet(run.path(SCORES_FILE), scores)
        # What the scores leave out (ECIF_METHOD §2): retraining on N−1 pairs renormalises 1/N to
        # 1/(N−1), a first-order change that shifts every single-pair prediction of the trusted loss
        # by this one constant (rankings unchanged).  One solve with the engine the scoring just used.
        from ecif.influence.scores import gradient_of, renormalisation_step
        from ecif.tasks.engine import load_engine

        engine = load_engine(run)
        shift = float(
            gradient_of(engine.trusted_loss(), engine.theta) @ renormalisation_step(engine.problem, engine.theta, engine.solver, 1)
        )
        median = float(np.median(np.abs(scores["influence"].to_numpy(dtype=float)))) if len(scores) else 0.0
        return {
            "pairs": int(len(scores)),
            "columns": [c for c in INFLUENCE_COLUMNS if c in scores.columns],
            "renormalisation_shift": shift,
            "renormalisation_shift_relative_to_median": shift / median if median > 0 else None,
        }

    def mispredictions_stage() -> dict:
        from ecif.tasks.trace import predictions_table

        table = predictions_table(run, splits=[config.test_split, config.trusted_split])
        atomic_write_parquet(run.path(MISPREDICTIONS_FILE), table)
        return {"items": int(len(table)), "wrong": int((~table["correct"]).sum()) if len(table) else 0}

    def index_stage() -> dict:
        try:
            from ecif.index import build_run_index
        except ImportError:
            return {"skipped": "no index module"}
        build_run_index(run, reporter=reporter)
        return {}

    def thumbnails_stage() -> dict:
        return {"made": int(make_thumbnails(run, reporter=reporter) or 0)}

    for name, work in zip(
        STAGES,
        (data_stage, demo_model_stage, features_stage, finetune_stage, curvature_stage, scores_stage, mispredictions_stage, index_stage, thumbnails_stage),
    ):
        _stage(run, name, reporter, work)
        if name == stop_after:
            return run
    run.update_info(
        finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        settings_hash=text_sha256(json.dumps(settings, sort_keys=True, default=str))[:16],
    )
    return run
