"""SigLIP's sigmoid loss (``loss="siglip"``): the objective, the removal terms, the curvature and
ECIF against actual re-fine-tuning, on small synthetic problems in float64."""

import math

import numpy as np
import pytest
import torch
from maths_fixtures import tiny_clip, toy_features
from open_clip.loss import SigLipLoss
from test_ray_scoring import in_memory_problem, synthetic_store, trusted_set

from ecif.config import CurvatureConfig, FinetuneConfig, StreamingConfig
from ecif.curvature.products import curvature_product, dense_curvature
from ecif.curvature.solvers import KroneckerSolver, build_solver
from ecif.finetune import finetune_heads
from ecif.influence.scores import gradient_of, influence_along, influence_on, reduced_problem, self_influence
from ecif.influence.streaming import read_scores, score_store
from ecif.models.scope import initial_scope, write_scope
from ecif.objective.contrastive import (
    ContrastiveData,
    ContrastiveProblem,
    HeadsScope,
    batch_logits,
    contrastive_sum,
    pair_terms,
    reference_batches,
    scope_from_dict,
)
from ecif.objective.measurements import answer_log_probabilities, answer_losses, validation_loss

BIAS = -2.0


def siglip_scope(learn_logit_scale: bool = False) -> HeadsScope:
    return HeadsScope(12, 10, 6, math.log(8.0), learn_logit_scale, loss="siglip", logit_bias=BIAS)


@pytest.fixture(scope="module")
def setup():
    image, text, _ = toy_features(47, seed=3)  # 47 = uneven batches, so padding is exercised
    scope = siglip_scope()
    theta = 0.5 * torch.randn(scope.size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return scope, theta, ContrastiveData(image, text, reference_batches(47, 10))


def test_sum_is_open_clips_siglip_loss_times_the_batch_size(setup):
    scope, theta, data = setup
    w_image, w_text, log_scale = scope.split(theta)
    expected = 0.0
    for batch in data.batches:
        image = data.image[batch] @ w_image
        text = data.text[batch] @ w_text
        # open_clip normalises by the batch size: (1/B) Σ_ij −log σ(y_ij s_ij)
        loss = SigLipLoss()(torch.nn.functional.normalize(image, dim=1), torch.nn.functional.normalize(text, dim=1),
                            log_scale.exp(), torch.tensor(BIAS, dtype=torch.float64))
        expected += float(loss) * len(batch)
    assert float(contrastive_sum(scope, theta, data)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("row", [0, 13, 46])
def test_removal_terms_are_the_exact_change_of_the_sum_and_first_order_is_exact(setup, row):
    scope, theta, data = setup
    terms = pair_terms(scope, theta, data)
    reduced, _ = data.edited(drop_rows=[row])
    actual = float(contrastive_sum(scope, theta, data) - contrastive_sum(scope, theta, reduced))
    assert float(terms["pos"][row] + terms["neg"][row]) == pytest.approx(actual, rel=1e-12, abs=1e-12)
    assert torch.equal(terms["neg"], terms["neg_first_order"])
    assert float(terms["neg"][row]) > 0.1 * abs(actual)  # the negative role is a real part of it


def test_positive_and_negative_roles_are_the_diagonal_and_the_off_diagonal_row_and_column(setup):
    scope, theta, data = setup
    batch = data.batches[1]
    logits = batch_logits(scope, theta, data.image[batch], data.text[batch])
    terms = -torch.nn.functional.logsigmoid((2.0 * torch.eye(len(batch), dtype=torch.float64) - 1.0) * logits)
    got = pair_terms(scope, theta, data)
    position = 3
    row = int(batch[position])
    off = terms.clone().fill_diagonal_(0.0)
    assert float(got["pos"][row]) == pytest.approx(float(terms[position, position]), rel=1e-12)
    assert float(got["neg"][row]) == pytest.approx(float(off[position].sum() + off[:, position].sum()), rel=1e-12)


def test_scope_records_its_loss_and_bias_and_old_records_read_as_softmax():
    scope = siglip_scope(learn_logit_scale=True)
    assert scope_from_dict(scope.to_dict()) == scope
    softmax = HeadsScope(12, 10, 6, math.log(8.0))
    assert "loss" not in softmax.to_dict() and "logit_bias" not in softmax.to_dict()  # records as before
    old = {"kind": "heads", "image_dim": 12, "text_dim": 10, "embed_dim": 6, "log_logit_scale": 2.0, "learn_logit_scale": False}
    assert scope_from_dict(old).loss == "clip"


def test_learnt_scale_and_bias_end_theta_and_move_the_loss():
    scope = siglip_scope(learn_logit_scale=True)
    w_image = torch.zeros(12, 6, dtype=torch.float64)
    w_text = torch.ones(10, 6, dtype=torch.float64)
    theta = scope.join(w_image, w_text, 1.5, -3.0)
    assert scope.size == theta.numel() == 12 * 6 + 10 * 6 + 2
    assert float(scope.log_scale(theta)) == 1.5 and float(scope.bias(theta)) == -3.0
    fixed = siglip_scope()
    assert fixed.size == 12 * 6 + 10 * 6 and float(fixed.bias(theta[:-2])) == BIAS


@pytest.mark.parametrize("learn", [False, True])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_dense_curvature_matches_its_products(setup, learn, kind):
    _, theta, data = setup
    scope = siglip_scope(learn)
    if learn:
        theta = torch.cat([theta, theta.new_tensor([math.log(8.0), BIAS])])
    problem = ContrastiveProblem(scope, data, theta.clone(), 0.3)
    dense = dense_curvature(problem, theta, kind)
    by_products = torch.func.vmap(curvature_product(problem, theta, kind))(torch.eye(theta.numel(), dtype=theta.dtype))
    assert torch.allclose(dense, by_products, rtol=1e-9, atol=1e-11)
    if kind == "hessian":
        assert torch.allclose(dense, torch.func.hessian(problem.objective)(theta), rtol=1e-9, atol=1e-11)


@pytest.fixture(scope="module")
def fitted():
    """A siglip problem fine-tuned to its minimiser, its trusted loss and the dense solver."""
    image, text, _ = toy_features(120, seed=0)
    val_image, val_text, _ = toy_features(80, seed=1, flip=0.0)
    scope = siglip_scope()
    theta0 = torch.randn(scope.size, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    problem = ContrastiveProblem(scope, ContrastiveData(image, text, reference_batches(120, 10)), theta0, 1.0)
    theta, report = finetune_heads(problem, config=FinetuneConfig(delta=1.0, batch_size=10, gradient_tolerance=1e-11))
    assert report.converged, report.warnings
    phi = validation_loss(scope, ContrastiveData(val_image, val_text, reference_batches(80, 10)))
    return problem, theta, phi, build_solver(problem, theta, CurvatureConfig(solver="dense"))


def test_ecif_predicts_refitting_for_siglip(fitted):
    problem, theta, phi, solver = fitted
    influence = influence_along(problem, theta, solver.solve(torch.func.grad(phi)(theta)))
    assert np.array_equal(influence.influence, influence.influence_first_order)
    rows = [3, 17, 40, 58, 77, 91, 104, 119]
    actual = []
    for row in rows:
        refit, report = finetune_heads(reduced_problem(problem, [row]), theta,
                                       FinetuneConfig(delta=problem.delta, gradient_tolerance=1e-11))
        assert report.converged
        actual.append(float(phi(refit) - phi(theta)))
    # single-pair scores leave out the 1/N → 1/(N−1) renormalisation: one shift common to all pairs
    shift = float(torch.func.grad(phi)(theta) @ solver.solve(problem.delta / problem.data.normaliser * (theta - problem.theta0)))
    predicted = influence.influence[rows] + shift
    assert np.corrcoef(predicted, actual)[0, 1] > 0.99
    assert np.allclose(predicted, actual, rtol=0.1, atol=0.05 * np.abs(actual).max())
    positive_only = influence.influence_pos[rows] + shift
    assert np.abs(predicted - actual).max() < np.abs(positive_only - actual).max()


@pytest.mark.parametrize("name", ["ekfac-cg", "cg"])
def test_exact_solvers_agree_with_dense_for_siglip(fitted, name):
    problem, theta, phi, dense = fitted
    gradient = torch.func.grad(phi)(theta)
    other = build_solver(problem, theta, CurvatureConfig(solver=name))
    assert torch.allclose(other.solve(gradient), dense.solve(gradient), rtol=1e-7, atol=1e-10)


def test_ekfac_of_siglip_is_a_fair_approximation(fitted):
    problem, theta, phi, _ = fitted
    ggn = build_solver(problem, theta, CurvatureConfig(solver="dense", kind="ggn"))
    ekfac = build_solver(problem, theta, CurvatureConfig(solver="ekfac"))
    gradient = torch.func.grad(phi)(theta)
    exact = influence_along(problem, theta, ggn.solve(gradient)).influence
    approximate = influence_along(problem, theta, ekfac.solve(gradient)).influence
    penalty_only = influence_along(problem, theta, gradient / problem.delta).influence
    assert np.corrcoef(exact, approximate)[0, 1] > np.corrcoef(exact, penalty_only)[0, 1]


def test_ekfac_refuses_a_learnt_scale_and_bias_and_auto_avoids_it():
    image, text, _ = toy_features(40, seed=0)
    scope = siglip_scope(learn_logit_scale=True)
    theta = torch.randn(scope.size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # a strong penalty keeps the Hessian positive definite at θ₀
    problem = ContrastiveProblem(scope, ContrastiveData(image, text, reference_batches(40, 10)), theta, 100.0)
    with pytest.raises(ValueError, match="learnt logit scale and bias"):
        build_solver(problem, theta, CurvatureConfig(solver="ekfac"))
    assert build_solver(problem, theta, CurvatureConfig(solver="auto")).describe()["solver"] == "dense"


def test_self_influence_forms_coincide_and_are_the_quadratic_form(fitted):
    problem, theta, _, solver = fitted
    exact = self_influence(problem, theta, solver)
    assert np.allclose(exact, self_influence(problem, theta, solver, negative="first_order"), rtol=1e-12)
    row = 7
    gradient = torch.func.grad(lambda t: pair_terms(problem.scope, t, problem.data)["pos"][row]
                               + pair_terms(problem.scope, t, problem.data)["neg"][row])(theta)
    expected = float(gradient @ solver.solve(gradient)) / problem.data.normaliser
    assert exact[row] == pytest.approx(expected, rel=1e-8)


def test_a_test_items_sigmoid_loss_is_its_terms_against_every_answer():
    scope = siglip_scope()
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 1.0, 4.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    expected = [-math.log(sigmoid(2.0)) - math.log(sigmoid(1.0)) - math.log(sigmoid(-0.5)),
                -math.log(sigmoid(3.0)) - math.log(sigmoid(1.0)) - math.log(sigmoid(-4.0))]
    assert answer_losses(scope, logits, labels).tolist() == pytest.approx(expected, rel=1e-12)
    assert answer_log_probabilities(scope, logits)[0, 0] == pytest.approx(math.log(sigmoid(2.0)), rel=1e-12)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize("learn", [False, True])
def test_a_model_with_a_logit_bias_gets_the_sigmoid_loss_and_its_bias_is_written_back(learn):
    model = tiny_clip(init_logit_bias=-10.0).model.double()
    scope, theta0 = initial_scope(model, learn_logit_scale=learn)
    assert scope.loss == "siglip" and scope.logit_bias == -10.0
    assert float(scope.bias(theta0)) == -10.0 and theta0.numel() == scope.size
    assert initial_scope(tiny_clip().model.double(), learn_logit_scale=learn)[0].loss == "clip"
    with pytest.raises(ValueError, match="logit_bias"):
        initial_scope(tiny_clip().model.double(), loss="siglip")
    if learn:
        moved = theta0.clone()
        moved[-1] = -7.0
        write_scope(model, scope, moved)
        assert float(model.logit_bias.detach()) == -7.0


def test_streamed_scores_equal_the_in_memory_path_for_siglip(tmp_path):
    store = synthetic_store(tmp_path / "features", [60, 60, 40])
    scope = HeadsScope(12, 10, 6, math.log(10.0), loss="siglip", logit_bias=BIAS)
    theta0 = torch.randn(scope.size, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    config = StreamingConfig(batch_size=20)
    problem = in_memory_problem(store, scope, theta0, config)
    theta, report = finetune_heads(problem, config=FinetuneConfig(delta=config.delta, batch_size=config.batch_size))
    assert report.converged
    trusted = trusted_set()
    result = score_store(store, trusted, scope, theta, tmp_path / "scores", config, theta0=theta0)
    assert result.stationarity["passed"]
    reference = influence_on(problem, theta, KroneckerSolver(problem, theta, config.damping),
                             gradient_of(validation_loss(scope, trusted), theta))
    again = score_store(store, trusted, scope, theta, tmp_path / "scores", config, theta0=theta0)  # the stored solver
    assert again.shards_scored == 0
    streamed = read_scores(tmp_path / "scores")
    for name in ("influence", "influence_pos", "influence_neg", "influence_first_order"):
        assert np.allclose(streamed[name], getattr(reference, name), rtol=1e-9, atol=1e-14), name


@pytest.fixture(scope="module")
def siglip_run(tmp_path_factory):
    """``ecif score`` on 160 demo pairs with a (randomly initialised) open_clip model that has a logit
    bias: the loss is not asked for, so the model's own (siglip) is taken."""
    from ecif.config import RunConfig
    from ecif.data import make_demo_data
    from ecif.models.configs import DEMO_MODEL_NAMES
    from ecif.models.open_clip_models import load_model, save_checkpoint
    from ecif.tasks.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("siglip-run")
    manifest = make_demo_data("shapes", root / "data", n=240, seed=0)
    name = DEMO_MODEL_NAMES["siglip"]
    checkpoint = save_checkpoint(load_model(name, seed=0).model, root / "model.safetensors")
    config = RunConfig(run_dir=root / "run", manifest=manifest, model=name, checkpoint=checkpoint,
                       finetune=FinetuneConfig(delta=1.0))
    return run_pipeline(config)


@pytest.mark.slow  # a whole pipeline run (7 min on two busy cores)
def test_a_siglip_run_scores_traces_and_edits(siglip_run):
    import ecif
    from ecif.models.open_clip_models import load_model
    from ecif.tasks.engine import load_engine

    engine = load_engine(siglip_run)
    assert engine.scope.loss == "siglip" and engine.scope.logit_bias == -10.0
    assert siglip_run.info["stages"]["fine-tune"]["loss"] == "siglip" and siglip_run.info["stages"]["fine-tune"]["converged"]
    scores = siglip_run.scores()
    np.testing.assert_array_equal(scores["influence_first_order"], scores["influence"])
    np.testing.assert_array_equal(scores["self_influence_first_order"], scores["self_influence"])
    item = siglip_run.mispredictions().iloc[0]
    table = ecif.trace(siglip_run, uid=item["uid"], top_k=3)
    assert len(table) == 6 and np.isfinite(table["score"]).all()
    harmful = scores.nsmallest(4, "influence")["row"].tolist()
    predicted = ecif.predict_edit(siglip_run, drop_rows=harmful)
    assert predicted.after.trusted_loss < predicted.before.trusted_loss  # dropping the most harmful helps, as predicted
    edited = ecif.apply_edit(siglip_run, drop_rows=harmful)
    reloaded = load_model(siglip_run.info["model_name"], checkpoint=edited.checkpoint).model
    assert float(reloaded.logit_bias.detach()) == -10.0  # a fixed bias is written back as it was
