"""Curvature products and every solver against the dense reference."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from ecif.curvature.products import dense_curvature, gauss_newton_product, hessian_product
from ecif.curvature.solvers import CurvatureConfig, CurvatureNotPositiveDefinite, build_solver
from ecif.influence.scores import influence_on, self_influence, gradient_of
from ecif.influence.test_functions import validation_loss
from maths_fixtures import make_toy


@pytest.fixture(scope="module")
def toy():
    return make_toy(n=100, batch_size=20)


def test_hessian_product_matches_autograd_hessian(toy):
    exact = torch.func.hessian(toy.problem.objective)(toy.theta)
    assert torch.allclose(dense_curvature(toy.problem, toy.theta, "hessian"), exact, atol=1e-9)
    learnt = make_toy(n=60, batch_size=20, learn_logit_scale=True)
    exact_learnt = torch.func.hessian(learnt.problem.objective)(learnt.theta)
    assert torch.allclose(dense_curvature(learnt.problem, learnt.theta, "hessian"), exact_learnt, atol=1e-9)
    vector = torch.randn(toy.theta.numel(), dtype=torch.float64)
    assert torch.allclose(hessian_product(toy.problem, toy.theta)(vector), exact @ vector, atol=1e-9)


def test_gauss_newton_is_positive_semidefinite_and_matches_its_definition(toy):
    problem, theta = toy.problem, toy.theta
    ggn = dense_curvature(problem, theta, "ggn")
    assert float(torch.linalg.eigvalsh(ggn)[0]) >= problem.delta - 1e-8
    # definition: Jᵀ ∇²_S L J from explicit Jacobians of one batch's logits
    from ecif.influence.objective import batch_logits

    total = problem.delta * torch.eye(theta.numel(), dtype=torch.float64)
    for batch in problem.data.batches:
        image, text = problem.data.image[batch], problem.data.text[batch]
        jacobian = torch.func.jacrev(lambda p: batch_logits(problem.scope, p, image, text).reshape(-1))(theta)

        def loss_of_logits(flat):
            logits = flat.reshape(len(batch), len(batch))
            return torch.logsumexp(logits, 1).sum() + torch.logsumexp(logits, 0).sum() - 2 * torch.diagonal(logits).sum()

        logits = batch_logits(problem.scope, theta, image, text).reshape(-1)
        total += jacobian.T @ torch.func.hessian(loss_of_logits)(logits) @ jacobian / problem.data.normaliser
    assert torch.allclose(ggn, total, atol=1e-9)
    vector = torch.randn(theta.numel(), dtype=torch.float64)
    assert torch.allclose(gauss_newton_product(problem, theta)(vector), total @ vector, atol=1e-9)


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_conjugate_gradient_matches_dense(toy, kind):
    dense = build_solver(toy.problem, toy.theta, CurvatureConfig(solver="dense", kind=kind))
    cg = build_solver(toy.problem, toy.theta, CurvatureConfig(solver="cg", kind=kind))
    vectors = torch.randn(4, toy.theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(cg.solve(vectors), dense.solve(vectors), rtol=1e-6, atol=1e-8)
    assert torch.allclose(cg.inverse_quadratic(vectors), dense.inverse_quadratic(vectors), rtol=1e-6)


def test_dense_inverse_quadratic_is_the_quadratic_form(toy):
    dense = build_solver(toy.problem, toy.theta, CurvatureConfig(solver="dense"))
    vectors = torch.randn(3, toy.theta.numel(), dtype=torch.float64)
    assert torch.allclose(dense.inverse_quadratic(vectors), (vectors * dense.solve(vectors)).sum(1), rtol=1e-10)


def test_kronecker_solver_ranks_influence_like_the_dense_gauss_newton(toy):
    problem, theta = toy.problem, toy.theta
    gradient = gradient_of(validation_loss(problem.scope, toy.validation), theta)
    reference = influence_on(problem, theta, build_solver(problem, theta, CurvatureConfig(solver="dense", kind="ggn")), gradient)
    kronecker = influence_on(problem, theta, build_solver(problem, theta, CurvatureConfig(solver="ekfac")), gradient)
    assert spearmanr(reference.influence, kronecker.influence)[0] >= 0.9
    ekfac_self = self_influence(problem, theta, build_solver(problem, theta, CurvatureConfig(solver="ekfac")))
    dense_self = self_influence(problem, theta, build_solver(problem, theta, CurvatureConfig(solver="dense", kind="ggn")))
    assert spearmanr(ekfac_self, dense_self)[0] >= 0.9


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_ekfac_preconditioned_cg_solves_exactly_and_keeps_the_ekfac_quadratic_form(toy, kind):
    problem, theta = toy.problem, toy.theta
    dense = build_solver(problem, theta, CurvatureConfig(solver="dense", kind=kind))
    refined = build_solver(problem, theta, CurvatureConfig(solver="ekfac-cg", kind=kind))
    ekfac = build_solver(problem, theta, CurvatureConfig(solver="ekfac"))
    vectors = torch.randn(4, theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(refined.solve(vectors), dense.solve(vectors), rtol=1e-6, atol=1e-8)
    assert torch.allclose(refined.inverse_quadratic(vectors), ekfac.inverse_quadratic(vectors), rtol=1e-12)
    gradient = gradient_of(validation_loss(problem.scope, toy.validation), theta)
    exact = influence_on(problem, theta, dense, gradient).influence
    assert spearmanr(influence_on(problem, theta, refined, gradient).influence, exact)[0] > 0.9999
    assert refined.describe()["solver"] == "ekfac-cg"


def test_per_pair_solves_are_exact_except_for_a_refined_solver_which_keeps_its_approximation(toy):
    from ecif.influence.scores import euclidean_step_norms

    problem, theta = toy.problem, toy.theta
    vectors = torch.randn(3, theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for name in ("dense", "cg", "ekfac"):
        solver = build_solver(problem, theta, CurvatureConfig(solver=name))
        assert torch.equal(solver.solve_per_pair(vectors), solver.solve(vectors))
    refined = build_solver(problem, theta, CurvatureConfig(solver="ekfac-cg"))
    assert torch.equal(refined.solve_per_pair(vectors), refined.approximate.solve(vectors))
    np.testing.assert_array_equal(euclidean_step_norms(problem, theta, refined), euclidean_step_norms(problem, theta, refined.approximate))


def test_kronecker_solver_supports_a_learnt_logit_scale():
    toy = make_toy(n=60, batch_size=20, learn_logit_scale=True)
    solver = build_solver(toy.problem, toy.theta, CurvatureConfig(solver="ekfac"))
    vectors = torch.randn(2, toy.theta.numel(), dtype=torch.float64)
    assert torch.allclose(solver.inverse_quadratic(vectors), (vectors * solver.solve(vectors)).sum(1), rtol=1e-10)


def test_indefinite_curvature_is_refused_clearly(toy):
    problem, theta = toy.problem, toy.theta
    far_from_minimum = theta + 3.0 * torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weak = type(problem)(problem.scope, problem.data, problem.theta0, 1e-6)
    with pytest.raises(CurvatureNotPositiveDefinite, match="not positive definite"):
        build_solver(weak, far_from_minimum, CurvatureConfig(solver="dense", damping=0.0))


@pytest.mark.parametrize("name", ["dense", "ekfac", "ekfac-cg", "lowrank-cg"])
def test_stored_solver_gives_the_same_answers(toy, tmp_path, name):
    from ecif.curvature.solvers import load_solver, save_solver

    config = CurvatureConfig(solver=name)
    solver = build_solver(toy.problem, toy.theta, config)
    assert save_solver(solver, tmp_path / "curvature.safetensors", "fingerprint-1")
    assert load_solver(tmp_path / "curvature.safetensors", "another problem") is None
    if name.endswith("-cg"):  # the conjugate gradient around the stored approximation is rebuilt
        with pytest.raises(ValueError, match="refined solver"):
            load_solver(tmp_path / "curvature.safetensors", "fingerprint-1")
    loaded = load_solver(tmp_path / "curvature.safetensors", "fingerprint-1", toy.problem, toy.theta, config)
    assert loaded.name == solver.name
    vectors = torch.randn(3, toy.theta.numel(), dtype=torch.float64)
    assert torch.allclose(loaded.solve(vectors), solver.solve(vectors), rtol=1e-10)
    assert torch.allclose(loaded.inverse_quadratic(vectors), solver.inverse_quadratic(vectors), rtol=1e-10)


def test_factored_embedding_curvature_equals_the_explicit_blocks():
    """EK-FAC's per-pair blocks without forming them: same sum and same eigenbasis diagonals."""
    from ecif.curvature.solvers import _EmbeddingCurvature

    generator = torch.Generator().manual_seed(0)
    size, width = 9, 6
    u = torch.nn.functional.normalize(torch.randn(size, width, dtype=torch.float64, generator=generator), dim=1)
    v = torch.nn.functional.normalize(torch.randn(size, width, dtype=torch.float64, generator=generator), dim=1)
    norms = torch.rand(size, dtype=torch.float64, generator=generator) + 0.5
    scale = torch.tensor(10.0, dtype=torch.float64)
    logits = scale * u @ v.T
    rows, cols = torch.softmax(logits, 1), torch.softmax(logits, 0)
    # explicit M_kk = c² J_k (Σ_j w_kj v_j v_jᵀ − m_k m_kᵀ) J_k, J_k = (I − u_k u_kᵀ)/‖z_k‖
    weights = rows + cols * (1 - cols)
    mean = rows @ v
    output = scale**2 * (torch.einsum("kj,je,jf->kef", weights, v, v) - mean[:, :, None] * mean[:, None, :])
    jacobian = (torch.eye(width, dtype=torch.float64) - u[:, :, None] * u[:, None, :]) / norms[:, None, None]
    blocks = jacobian @ output @ jacobian
    factored = _EmbeddingCurvature.of(u, v, norms, scale, rows, cols)
    assert torch.allclose(factored.total(), blocks.sum(0), atol=1e-11)
    basis = torch.linalg.eigh(blocks.sum(0))[1]
    assert torch.allclose(factored.diagonals(basis), torch.einsum("ei,kef,fi->ki", basis, blocks, basis), atol=1e-11)
