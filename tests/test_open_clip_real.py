"""A real open_clip architecture (ViT-B-32) from a local checkpoint, scored and traced end to end.

The weights are a seeded random initialisation saved by the test (the machine is offline), so the
numbers say nothing about CLIP itself; what is proven is the path a user's own checkpoint takes:
the model's own preprocessing (224 px) and tokenizer, backbone features, fine-tuning the
0.66M-parameter projection heads, scores by ``solver="auto"`` (EK-FAC-preconditioned conjugate
gradient) checked against the plain conjugate-gradient solve and against EK-FAC alone, and trace-back of a test item; and that the
blocks scope (last transformer block of each tower) computes the model's own embeddings.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from scipy.stats import spearmanr

import ecif
from ecif.curvature.solvers import build_solver
from ecif.data import make_demo_data
from ecif.influence.scores import gradient_of, influence_on
from ecif.models import save_checkpoint
from ecif.run import Run
from ecif.tasks.engine import load_engine
from ecif.influence.columns import INFLUENCE_COLUMNS
from ecif.tasks.pipeline import load_run_model

#: A ViT-B-32 checkpoint saved, its features computed at 224 px and its heads fine-tuned: about a
#: minute and a half on two cores, so these run with the slow checks.
pytestmark = pytest.mark.slow


MODEL = "ViT-B-32"
PAIRS = 36


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """A finished run of ViT-B-32 (random init, saved as safetensors) on 36 shapes pairs."""
    root = tmp_path_factory.mktemp("open-clip-real")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ECIF_CACHE", str(root / "cache"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = open_clip.create_model(MODEL)  # no pretrained tag: nothing is downloaded
        checkpoint = save_checkpoint(model, root / "vit-b-32.safetensors")
        manifest = make_demo_data("shapes", root / "data", n=PAIRS, noise=0.1)
        config = ecif.RunConfig(
            run_dir=root / "run",
            manifest=manifest,
            model=MODEL,
            checkpoint=checkpoint,
            # A random ViT maps every image to nearly the same feature (cosine > 0.8), so with the
            # default δ = 1 the heads drift towards the degenerate collapse FinetuneConfig warns about
            # and L-BFGS needs minutes; δ = 10 converges in ~10 iterations to a Hessian with smallest
            # eigenvalue ≈ δ.  Pretrained weights have spread features and need no such change.
            finetune=ecif.FinetuneConfig(delta=10.0),
        )
        yield ecif.run_pipeline(config)


def test_features_come_from_the_models_own_preprocessing_and_heads(vit_run: Run) -> None:
    info = vit_run.info
    loaded = load_run_model(vit_run)
    assert loaded.preprocess.transforms[0].size == 224  # ViT-B-32's own transform, not the demo's 64 px
    assert loaded.tokenizer(["a red circle"]).shape == (1, 77)
    assert info["model_name"] == MODEL
    assert Path(info["model_checkpoint"]).name == "vit-b-32.safetensors"
    features = info["stages"]["features"]
    # ViT-B-32: 768-wide vision transformer, 512-wide text transformer, 512-d embedding.
    assert (features["image_dim"], features["text_dim"], features["unreadable"]) == (768, 512, 0)
    engine = load_engine(vit_run)
    assert engine.scope.size == 768 * 512 + 512 * 512
    assert vit_run.info["stages"]["fine-tune"]["converged"]


def test_scores_have_every_column_and_the_sign_convention(vit_run: Run) -> None:
    scores = vit_run.scores()
    assert len(scores) == int((vit_run.manifest()["split"] == "train").sum())
    for column in (*INFLUENCE_COLUMNS, "clip_score", "loss", "rank", "suggested_action"):
        assert column in scores, column
    assert np.isfinite(scores[list(INFLUENCE_COLUMNS)].to_numpy()).all()
    np.testing.assert_allclose(scores.influence_pos + scores.influence_neg, scores.influence, rtol=1e-9, atol=1e-12)
    assert vit_run.info["stages"]["curvature"]["solver"] == "ekfac-cg"


def test_scores_equal_the_exact_conjugate_gradient_solve_and_ekfac_alone_comes_close(vit_run: Run) -> None:
    """The run's scores (EK-FAC-preconditioned CG) against plain CG on the exact Hessian, and
    EK-FAC alone (Kronecker-factored Gauss-Newton) against both, same θ̂ and test gradient."""
    engine = load_engine(vit_run)
    gradient = gradient_of(engine.trusted_loss(), engine.theta)
    exact_solver = build_solver(engine.problem, engine.theta, ecif.CurvatureConfig(solver="cg"))
    exact = influence_on(engine.problem, engine.theta, exact_solver, gradient)
    scores = vit_run.scores().sort_values("row")
    assert np.array_equal(scores["row"].to_numpy(), engine.train_rows)
    # Two solves to a residual of 1e-10: equal up to that tolerance, in units of the largest score.
    np.testing.assert_allclose(scores["influence"], exact.influence, rtol=0, atol=1e-6 * np.abs(exact.influence).max())
    kronecker = build_solver(engine.problem, engine.theta, ecif.CurvatureConfig(solver="ekfac"))
    rho = spearmanr(influence_on(engine.problem, engine.theta, kronecker, gradient).influence, exact.influence)[0]
    # Measured: Spearman 0.997 (Pearson 0.9998); δ = 10 dominates the curvature of a random
    # checkpoint, so the Kronecker factorisation and Gauss-Newton-for-Hessian lose little here.
    assert rho >= 0.98, rho


def test_trace_back_of_a_test_item_returns_culprits(vit_run: Run) -> None:
    items = vit_run.mispredictions()
    item = items[items["split"] == "test"].iloc[0]
    table = ecif.trace(vit_run, uid=item["uid"], top_k=3)
    culprits = table[table["role"] == "culprit"]
    assert len(culprits) == 3
    assert np.isfinite(table["influence"]).all()
    assert set(table["row"]) <= set(load_engine(vit_run).train_rows)
    assert (culprits["relative_influence"].diff().dropna() >= 0).all()  # most negative first


def test_the_blocks_scope_reproduces_vit_b_32s_own_embeddings(vit_run: Run) -> None:
    """The last block of each ViT-B-32 tower (10.9M parameters) as the blocks scope computes it."""
    from ecif.models.blocks import blocks_scope, encode_caption_blocks, encode_image_blocks
    from ecif.models.features import load_images

    loaded = load_run_model(vit_run)
    scope, theta0 = blocks_scope(loaded.model, 1)
    assert scope.size == theta0.numel() == 10_898_176
    manifest = vit_run.manifest().head(2)
    pixels, failed = load_images(manifest["filepath"].tolist(), loaded.preprocess)
    assert not failed
    captions = manifest["caption"].tolist()
    image = torch.as_tensor(encode_image_blocks(loaded, pixels, 1), dtype=torch.float64)
    text = torch.as_tensor(encode_caption_blocks(loaded, captions, 1), dtype=torch.float64)
    assert image.shape == (2, 50, 769) and text.shape == (2, 77, 513)
    with torch.no_grad():
        expected_image = loaded.model.encode_image(pixels).double()
        expected_text = loaded.model.encode_text(loaded.tokenizer(captions)).double()
        torch.testing.assert_close(scope.project_image(theta0, image), expected_image, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scope.project_text(theta0, text), expected_text, rtol=1e-5, atol=1e-5)
