"""The objective and the per-pair removal terms agree with brute force."""

import math

import pytest
import torch
from maths_fixtures import toy_features

from ecif.influence.scores import additive_set_gradient, edit_gradient, predicted_step
from ecif.objective.contrastive import (
    ContrastiveData,
    ContrastiveProblem,
    HeadsScope,
    batch_logits,
    contrastive_sum,
    pair_terms,
    reference_batches,
)


@pytest.fixture(scope="module")
def setup():
    image, text, _ = toy_features(47, seed=3)  # 47 = uneven batches, so padding is exercised
    scope = HeadsScope(12, 10, 6, math.log(8.0))
    theta = 0.5 * torch.randn(scope.size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return scope, theta, ContrastiveData(image, text, reference_batches(47, 10))


def test_reference_batches_partition_evenly():
    batches = reference_batches(47, 10)
    sizes = sorted(len(b) for b in batches)
    assert sizes[-1] - sizes[0] <= 1 and sum(sizes) == 47
    assert sorted(torch.cat(batches).tolist()) == list(range(47))
    assert all(torch.equal(a, b) for a, b in zip(batches, reference_batches(47, 10)))


def test_contrastive_sum_matches_a_plain_loop(setup):
    scope, theta, data = setup
    w_image, w_text, log_scale = scope.split(theta)
    expected = 0.0
    for batch in data.batches:
        u = torch.nn.functional.normalize(data.image[batch] @ w_image, dim=1)
        v = torch.nn.functional.normalize(data.text[batch] @ w_text, dim=1)
        logits = log_scale.exp() * u @ v.T
        target = torch.arange(len(batch))
        expected += float(
            torch.nn.functional.cross_entropy(logits, target, reduction="sum")
            + torch.nn.functional.cross_entropy(logits.T, target, reduction="sum")
        )
    assert float(contrastive_sum(scope, theta, data)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("row", [0, 13, 46])
def test_exact_removal_term_is_the_exact_change_of_the_sum(setup, row):
    scope, theta, data = setup
    terms = pair_terms(scope, theta, data)
    reduced, _ = data.edited([row])
    actual = float(contrastive_sum(scope, theta, data) - contrastive_sum(scope, theta, reduced))
    assert float(terms["pos"][row] + terms["neg"][row]) == pytest.approx(actual, rel=1e-10)
    # the negative role is a real part of it: without it the change is off by a lot
    assert abs(float(terms["neg"][row])) > 0.05 * abs(actual)


def test_group_removal_in_one_batch_is_not_additive_but_edit_is_exact(setup):
    """Pairs sharing a batch: the group edit's objective change is exact (its parameter step is first order)."""
    scope, theta, data = setup
    batch = data.batches[0][:3].tolist()
    terms = pair_terms(scope, theta, data)
    reduced, _ = data.edited(batch)
    actual = float(contrastive_sum(scope, theta, data) - contrastive_sum(scope, theta, reduced))
    additive = float(sum(terms["pos"][r] + terms["neg"][r] for r in batch))
    assert abs(additive - actual) > 1e-3  # shared denominators: sums of logs are not the log of sums (measured 3.3)

    # The group (exact-removal) change of docs/method.md §4, written out independently of the library:
    # the removed pairs' own terms, plus each remaining row/column losing log(1 − Σ_{n∈D*} P_kn).
    members = data.batches[0]
    slots = [members.tolist().index(r) for r in batch]
    others = [k for k in range(len(members)) if k not in slots]

    def group_removal(parameters: torch.Tensor) -> torch.Tensor:
        logits = batch_logits(scope, parameters, data.image[members], data.text[members])
        rows, columns = torch.softmax(logits, dim=-1), torch.softmax(logits, dim=-2).T
        own = sum(pair_terms(scope, parameters, data)["pos"][r] for r in batch)
        lost = sum(torch.log1p(-rows[k, slots].sum()) + torch.log1p(-columns[k, slots].sum()) for k in others)
        return own - lost

    assert float(group_removal(theta)) == pytest.approx(actual, rel=1e-10)  # exact, where additive is not

    # The library's group edit is the gradient of exactly that change (−∇ΔR with ΔR = −change/N),
    # and its predicted step (first order in the parameters) is one solve with it; the additive
    # gradient is not the same vector.
    problem = ContrastiveProblem(scope, data, torch.zeros_like(theta), 1.0)
    group_gradient = torch.func.grad(group_removal)(theta) / data.normaliser
    edit = edit_gradient(problem, theta, batch)
    torch.testing.assert_close(edit, group_gradient, rtol=1e-10, atol=1e-12 * float(group_gradient.abs().max()))
    additive_gradient = additive_set_gradient(problem, theta, batch)
    assert float((additive_gradient - edit).norm()) > 0.1 * float(edit.norm())  # measured 0.44
    spd = torch.randn(theta.numel(), theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    spd = spd @ spd.T + torch.eye(theta.numel(), dtype=torch.float64)

    class _Solve:
        def solve(self, vector: torch.Tensor) -> torch.Tensor:
            return torch.linalg.solve(spd, vector)

    step = predicted_step(problem, theta, _Solve(), batch, estimate="group", renormalise=False)
    torch.testing.assert_close(step, torch.linalg.solve(spd, group_gradient), rtol=1e-8, atol=1e-12)


def test_first_order_negative_is_the_derivative_of_down_weighting(setup):
    scope, theta, data = setup
    row = 5
    batch = next(b for b in data.batches if row in b.tolist())
    position = batch.tolist().index(row)
    w_image, w_text, log_scale = scope.split(theta)
    u = torch.nn.functional.normalize(data.image[batch] @ w_image, dim=1)
    v = torch.nn.functional.normalize(data.text[batch] @ w_text, dim=1)
    logits = log_scale.exp() * u @ v.T

    def others_loss(zeta: torch.Tensor) -> torch.Tensor:
        weights = torch.ones(len(batch), dtype=torch.float64)
        weights = weights - zeta * torch.nn.functional.one_hot(torch.tensor(position), len(batch)).double()
        total = 0.0
        for k in range(len(batch)):
            if k == position:
                continue
            total = total - logits[k, k] + torch.log((weights * logits[k].exp()).sum())
            total = total - logits[k, k] + torch.log((weights * logits[:, k].exp()).sum())
        return total

    derivative = torch.func.grad(others_loss)(torch.tensor(0.0, dtype=torch.float64))
    assert float(pair_terms(scope, theta, data)["neg_first_order"][row]) == pytest.approx(-float(derivative), rel=1e-10)


def test_relabel_edit_replaces_the_caption_in_its_slot(setup):
    scope, theta, data = setup
    new_caption = data.text[3] * 0 + data.text[20]
    edited, kept = data.edited([], {7: new_caption})
    assert len(kept) == data.n_pairs and torch.equal(edited.text[7], data.text[20])
    assert [len(b) for b in edited.batches] == [len(b) for b in data.batches]
