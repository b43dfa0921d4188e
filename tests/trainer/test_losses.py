"""Losses on hand-computed cases, and the negative samplers that feed the retrieval loss."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.losses import distillation_loss, multitask_loss, ranking_losses, sampled_softmax_loss
from trainer.negatives import (STRATEGIES, MixedSampler, ModelHardSampler, PopularitySampler, UniformSampler,
                               make_sampler)


def one_dim_case(pos_scores, neg_scores):
    """D = 1 and every user vector 1, so each candidate's score is its own embedding value."""
    batch = len(pos_scores)
    user_emb = torch.ones(batch, 1)
    pos_emb = torch.tensor(pos_scores).unsqueeze(1)  # (B, 1)
    neg_emb = torch.tensor(neg_scores).unsqueeze(2)  # (B, S, 1)
    return user_emb, pos_emb, neg_emb


def test_two_by_two_equals_the_hand_computed_softmax():
    user_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos_emb = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    loss = sampled_softmax_loss(user_emb, pos_emb, None, 0.5, torch.zeros(2), None, torch.tensor([1, 2]), None)
    # logits = [[1, 0.6], [0, 0.8]] / 0.5 = [[2, 1.2], [0, 1.6]]
    # row 0: -log(e^2 / (e^2 + e^1.2)) = log(1 + e^-0.8) = 0.371101
    # row 1: -log(e^1.6 / (e^0 + e^1.6)) = log(1 + e^-1.6) = 0.183901; mean 0.277501
    expected = (math.log1p(math.exp(-0.8)) + math.log1p(math.exp(-1.6))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.277501, abs=1e-6)


def test_accidental_hits_are_masked():
    a0, a1, a2 = 0.5, 0.2, -0.3  # positives' scores; rows 0 and 1 share item 5, row 2 has item 7
    negs = [[0.9, 0.1], [0.4, -0.2], [1.5, 0.0]]
    neg_idx = torch.tensor([[5, 9], [7, 8], [7, 3]])
    user_emb, pos_emb, neg_emb = one_dim_case([a0, a1, a2], negs)
    loss = sampled_softmax_loss(user_emb, pos_emb, neg_emb, 1.0, torch.zeros(3), torch.zeros(3, 2),
                                torch.tensor([5, 5, 7]), neg_idx)
    e = math.exp
    # row 0: column 1 (item 5 again) and negative 5 (score 0.9) are masked; keeps a0, a2 and item 9's 0.1
    row0 = math.log(e(a0) + e(a2) + e(0.1)) - a0
    # row 1: column 0 (item 5) is masked; negative 7 is another row's positive, not a hit: kept
    row1 = math.log(e(a1) + e(a2) + e(0.4) + e(-0.2)) - a1
    # row 2: negative 7 is masked; both item-5 columns are true negatives
    row2 = math.log(e(a0) + e(a1) + e(a2) + e(0.0)) - a2
    assert loss.item() == pytest.approx((row0 + row1 + row2) / 3, abs=1e-6)


def test_logq_lowers_the_contribution_of_popular_negatives():
    # one row: positive score 1 with q = 0.1, two negatives scoring 0: popular (q = 0.5) and rare (q = 0.01).
    # Subtracting log q multiplies each exp(logit) by 1 / q: e / 0.1 = 27.18282, 1 / 0.5 = 2, 1 / 0.01 = 100.
    user_emb, pos_emb, neg_emb = one_dim_case([1.0], [[0.0, 0.0]])
    neg_log_q = torch.log(torch.tensor([[0.5, 0.01]]))

    def loss_for(log_q):
        return sampled_softmax_loss(user_emb, pos_emb, neg_emb, 1.0, torch.log(torch.tensor([0.1])), log_q,
                                    torch.tensor([1]), torch.tensor([[2, 3]]))

    loss = loss_for(neg_log_q)
    # -log(27.18282 / (27.18282 + 2 + 100)) = log(129.18282) - log(27.18282) = 4.861228 - 3.302585 = 1.558644
    assert loss.item() == pytest.approx(math.log(10 * math.e + 2 + 100) - math.log(10 * math.e), abs=1e-5)
    assert loss.item() == pytest.approx(1.558644, abs=1e-5)
    # Same scores: the popular negative's softmax share is 2 / 129.18, the rare one's 100 / 129.18.
    neg_emb.requires_grad_(True)
    loss_for(neg_log_q).backward()
    popular_grad, rare_grad = neg_emb.grad[0, :, 0].tolist()
    assert popular_grad == pytest.approx(2 / (10 * math.e + 102), abs=1e-5)
    assert rare_grad == pytest.approx(100 / (10 * math.e + 102), abs=1e-5)
    # both negatives popular -> a smaller loss than both rare
    assert loss_for(torch.log(torch.tensor([[0.5, 0.5]]))) < loss_for(torch.log(torch.tensor([[0.01, 0.01]])))


def test_seen_mask_removes_negatives_but_never_the_positive():
    user_emb, pos_emb, neg_emb = one_dim_case([0.5, 0.2], [[0.9, 0.1], [0.4, -0.2]])
    args = (user_emb, pos_emb, neg_emb, 1.0, torch.zeros(2), torch.zeros(2, 2), torch.tensor([5, 6]),
            torch.tensor([[9, 8], [9, 4]]))
    calls = []

    def everything_seen(candidates):
        calls.append(candidates.clone())
        return torch.ones_like(candidates, dtype=torch.bool)

    # every negative masked: only the positive remains, -log(1) = 0
    assert sampled_softmax_loss(*args, user_seen_mask_fn=everything_seen).item() == 0.0
    assert calls[0].tolist() == [[5, 6, 9, 8], [5, 6, 9, 4]]  # in-batch columns first, then the negatives

    def nine_seen(candidates):
        return candidates == 9

    e = math.exp
    row0 = math.log(e(0.5) + e(0.2) + e(0.1)) - 0.5
    row1 = math.log(e(0.5) + e(0.2) + e(-0.2)) - 0.2
    assert sampled_softmax_loss(*args, user_seen_mask_fn=nine_seen).item() == pytest.approx((row0 + row1) / 2, abs=1e-6)


def test_learned_temperature_gets_a_gradient():
    log_t = torch.tensor(math.log(0.5), requires_grad=True)
    user_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos_emb = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    loss = sampled_softmax_loss(user_emb, pos_emb, None, log_t.exp(), torch.zeros(2), None, torch.tensor([1, 2]), None)
    loss.backward()
    assert log_t.grad is not None and log_t.grad.item() != 0.0


def _valid_args():
    return dict(user_emb=torch.zeros(2, 3), pos_emb=torch.zeros(2, 3), neg_emb=torch.zeros(2, 4, 3), temperature=0.1,
                pos_log_q=torch.zeros(2), neg_log_q=torch.zeros(2, 4), pos_idx=torch.tensor([1, 2]),
                neg_idx=torch.ones(2, 4, dtype=torch.int64))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("user_emb", torch.zeros(2), r"user_emb must have shape \(B, D\)"),
    ("pos_emb", torch.zeros(2, 4), r"pos_emb must have shape \(2, 3\)"),
    ("pos_log_q", torch.zeros(3), r"pos_log_q must have shape \(2,\)"),
    ("pos_idx", torch.zeros(2, 1), r"pos_idx must have shape \(2,\)"),
    ("neg_emb", None, "must be all given or all None"),
    ("neg_emb", torch.zeros(2, 4, 5), r"neg_emb must have shape \(2, S, 3\)"),
    ("neg_emb", torch.zeros(2, 4), r"shared neg_emb must have shape \(S, 3\)"),
    ("neg_log_q", torch.zeros(2, 3), r"neg_log_q must have shape \(2, 4\)"),
    ("neg_idx", torch.zeros(2, 5), r"neg_idx must have shape \(2, 4\)"),
    ("temperature", 0.0, "temperature must be > 0, got 0.0"),
    ("temperature", torch.tensor(-1.0), "temperature must be > 0, got -1.0"),
])
def test_sampled_softmax_rejects(field, value, message):
    with pytest.raises(ValueError, match=message):
        sampled_softmax_loss(**(_valid_args() | {field: value}))


def test_sampled_softmax_rejects_a_seen_mask_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"user_seen_mask_fn\(candidates\) must have shape \(2, 6\)"):
        sampled_softmax_loss(**_valid_args(), user_seen_mask_fn=lambda c: torch.zeros(2, 2, dtype=torch.bool))


def test_distillation_loss_by_hand_ignores_items_outside_the_teachers_support():
    # Row 0: the teacher's logits give items 1 and 2 probabilities 3:1; item 0 (logit -inf, e.g. a
    # training item) takes no part in the student's softmax, however high its logit. Row 1: no
    # finite teacher logit, adds 0.
    inf = math.inf
    logits = torch.tensor([[9.0, 1.0, 0.0], [0.5, -0.5, 2.0]], requires_grad=True)
    teacher = torch.tensor([[-inf, math.log(3.0) + 0.7, 0.7], [-inf, -inf, -inf]])
    loss = distillation_loss(logits, teacher)
    log_z = math.log(math.exp(1.0) + math.exp(0.0))
    expected = -(0.75 * (1.0 - log_z) + 0.25 * (0.0 - log_z)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    q1 = math.exp(1.0) / (math.exp(1.0) + 1.0)
    # d/dlogit = (q - p) / rows on the teacher's support, 0 elsewhere.
    assert torch.allclose(grad, torch.tensor([[0.0, (q1 - 0.75) / 2, (1 - q1 - 0.25) / 2], [0.0, 0.0, 0.0]]),
                          atol=1e-6)


def test_distillation_loss_is_smallest_when_the_student_matches_the_teacher():
    teacher = torch.tensor([[-math.inf, 2.0, 1.5, 1.0]])
    p = torch.softmax(teacher[:, 1:], dim=1)
    matched = distillation_loss(torch.tensor([[5.0, 2.0, 1.5, 1.0]]), teacher)
    assert matched.item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-5)   # the teacher's entropy
    assert distillation_loss(torch.tensor([[5.0, 1.0, 1.5, 2.0]]), teacher).item() > matched.item() + 0.05


def test_distillation_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"same \(U, M\) shape, got \(2, 3\) and \(2, 4\)"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_ranking_losses_by_hand():
    l_ctr, l_rating = ranking_losses(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]), torch.tensor([3.0, 4.0]),
                                     torch.tensor([5.0, 0.0]), torch.tensor([True, False]))
    # BCE: (log(1 + e^0) + log(1 + e^2)) / 2 = (0.693147 + 2.126928) / 2 = 1.410038
    assert l_ctr.item() == pytest.approx(1.410038, abs=1e-6)
    # MSE over the rated row only: (3 - 5)^2 = 4
    assert l_rating.item() == pytest.approx(4.0)


def test_ranking_losses_without_rated_rows_give_zero_and_still_backpropagate():
    rating_pred = torch.tensor([3.0, 4.0], requires_grad=True)
    l_ctr, l_rating = ranking_losses(torch.zeros(2, requires_grad=True), torch.ones(2), rating_pred,
                                     torch.zeros(2), torch.zeros(2, dtype=torch.bool))
    assert l_rating.item() == 0.0
    (l_ctr + l_rating).backward()
    assert rating_pred.grad.tolist() == [0.0, 0.0]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("ctr_logit", torch.zeros(2, 1), r"ctr_logit must have shape \(N,\)"),
    ("labels", torch.zeros(3), r"labels must have shape \(2,\)"),
    ("rating_pred", torch.zeros(1), r"rating_pred must have shape \(2,\)"),
    ("rating", torch.zeros(2, 2), r"rating must have shape \(2,\)"),
    ("rating_mask", torch.ones(3, dtype=torch.bool), r"rating_mask must have shape \(2,\)"),
    ("rating_mask", torch.ones(2), "rating_mask must be a bool tensor"),
])
def test_ranking_losses_reject(field, value, message):
    args = dict(ctr_logit=torch.zeros(2), labels=torch.zeros(2), rating_pred=torch.zeros(2), rating=torch.zeros(2),
                rating_mask=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=message):
        ranking_losses(**(args | {field: value}))


def test_multitask_loss_weights_the_terms():
    # 1 + 0.5 * 2 + 0.25 * 4 = 3
    total = multitask_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0), alpha=0.5, beta=0.25)
    assert total.item() == pytest.approx(3.0)


@pytest.mark.parametrize(("alpha", "beta", "message"), [(-0.1, 1.0, "alpha must be >= 0"),
                                                        (1.0, float("nan"), "beta must be >= 0")])
def test_multitask_loss_rejects_negative_weights(alpha, beta, message):
    with pytest.raises(ValueError, match=message):
        multitask_loss(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0), alpha=alpha, beta=beta)


# ---- negative samplers ----

USERS = torch.arange(1, 9)  # a batch of 8 users


def fixed_top_items(user_idx: torch.Tensor) -> torch.Tensor:
    """Every user's top-3 list is (u, u + 1, u + 1) mod 10 + 1: item u + 1 appears twice."""
    base = user_idx.unsqueeze(1) + torch.tensor([0, 1, 1])  # (B, 3)
    return base % 10 + 1


@pytest.mark.parametrize("sampler", [
    UniformSampler(10, seed=1),
    PopularitySampler(torch.tensor([1000, 5, 0, 1, 50, 2, 0, 0, 9, 3, 1]), seed=1),
    ModelHardSampler(fixed_top_items, n_items=10, top_k=3, seed=1),
    MixedSampler([(UniformSampler(10, seed=2), 0.5), (ModelHardSampler(fixed_top_items, 10, 3, seed=3), 0.5)]),
], ids=["uniform", "popularity", "model", "mixed"])
def test_samplers_draw_items_one_to_n(sampler):
    draws = sampler.sample(USERS, 64)
    assert draws.shape == (8, 64) and draws.dtype == torch.int64
    assert int(draws.min()) >= 1 and int(draws.max()) <= 10
    log_q = sampler.log_q(draws, USERS)
    assert log_q.shape == (8, 64) and bool(torch.isfinite(log_q).all())


def test_samplers_repeat_with_the_same_seed():
    counts = torch.arange(11.0)
    assert torch.equal(UniformSampler(10, seed=7).sample(USERS, 5), UniformSampler(10, seed=7).sample(USERS, 5))
    assert torch.equal(PopularitySampler(counts, seed=7).sample(USERS, 5),
                       PopularitySampler(counts, seed=7).sample(USERS, 5))


def test_uniform_log_q():
    assert torch.allclose(UniformSampler(4).log_q(torch.tensor([[1, 4]])), torch.full((1, 2), math.log(0.25)))


def test_popularity_probabilities_by_hand():
    # counts (entry 0 ignored) 3, 0, 8 -> (count + 1) ** 0.5 = 2, 1, 3 -> q = 2/6, 1/6, 3/6
    sampler = PopularitySampler(torch.tensor([99, 3, 0, 8]), alpha=0.5)
    assert torch.allclose(sampler.log_q(torch.tensor([[1, 2, 3]])).exp(), torch.tensor([[2 / 6, 1 / 6, 3 / 6]]))
    draws = sampler.sample(torch.arange(100), 60)  # 6000 seeded draws
    shares = torch.bincount(draws.flatten(), minlength=4).float() / draws.numel()
    assert shares[0] == 0.0
    assert torch.allclose(shares[1:], torch.tensor([2 / 6, 1 / 6, 3 / 6]), atol=0.03)


def test_model_hard_sampler_draws_from_the_users_lists():
    sampler = ModelHardSampler(fixed_top_items, n_items=10, top_k=3, seed=0)
    draws = sampler.sample(USERS, 20)
    lists = fixed_top_items(USERS)
    assert bool((draws.unsqueeze(2) == lists.unsqueeze(1)).any(dim=2).all())
    # user 1's list is (2, 3, 3): q(2) = 1/3, q(3) = 2/3, anything else 0
    log_q = sampler.log_q(torch.tensor([[2, 3, 7]]), torch.tensor([1]))
    assert torch.allclose(log_q[0, :2].exp(), torch.tensor([1 / 3, 2 / 3]))
    assert log_q[0, 2].item() == -math.inf


def test_mixed_sampler_counts_and_log_q():
    mixed = MixedSampler([(UniformSampler(4), 0.5), (UniformSampler(4), 0.25),
                          (PopularitySampler(torch.tensor([0, 3, 0, 8, 0]), alpha=0.5), 0.25)])
    # 7 draws: exact 3.5, 1.75, 1.75 -> floors 3, 1, 1; the two largest remainders (0.75) get one more
    assert mixed.counts(7) == [3, 2, 2]
    assert mixed.sample(USERS, 7).shape == (8, 7)
    # popularity weights (count + 1) ** 0.5 = 2, 1, 3, 1 -> q = 2/7, 1/7, 3/7, 1/7
    # q(item 1) = 0.5 * 1/4 + 0.25 * 1/4 + 0.25 * 2/7 = 0.1875 + 0.0714286 = 0.2589286
    assert mixed.log_q(torch.tensor([[1]])).exp().item() == pytest.approx(0.75 / 4 + 0.25 * 2 / 7, abs=1e-6)


def test_model_hard_log_q_needs_the_users():
    with pytest.raises(ValueError, match="user_idx must be given to ModelHardSampler.log_q"):
        ModelHardSampler(fixed_top_items, 10, 3).log_q(torch.tensor([[1]]))


@pytest.mark.parametrize(("top_items", "message"), [
    (lambda users: torch.ones(len(users), 2, dtype=torch.int64), r"top_items\(user_idx\) must have shape \(8, 3\)"),
    (lambda users: torch.zeros(len(users), 3, dtype=torch.int64),
     r"must hold item indices in \[1, 10\], got range \[0, 0\]"),
    (lambda users: torch.full((len(users), 3), 11), r"must hold item indices in \[1, 10\], got range \[11, 11\]"),
])
def test_model_hard_sampler_rejects_bad_lists(top_items, message):
    with pytest.raises(ValueError, match=message):
        ModelHardSampler(top_items, n_items=10, top_k=3).sample(USERS, 4)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: UniformSampler(0), "n_items must be an int >= 1, got 0"),
    (lambda: ModelHardSampler(fixed_top_items, 10, top_k=0), "top_k must be an int >= 1, got 0"),
    (lambda: PopularitySampler(torch.tensor([5])), r"item_counts must have shape \(n_items \+ 1,\)"),
    (lambda: PopularitySampler(torch.ones(2, 3)), r"item_counts must have shape \(n_items \+ 1,\)"),
    (lambda: PopularitySampler(torch.tensor([0.0, -1.0, 2.0])), "item_counts must be finite and >= 0, got min -1.0"),
    (lambda: PopularitySampler(torch.tensor([0.0, float("nan")])), "item_counts must be finite and >= 0"),
    (lambda: PopularitySampler(torch.ones(3), alpha=-0.5), "alpha must be a finite float >= 0, got -0.5"),
    (lambda: MixedSampler([]), "components must be"),
    (lambda: MixedSampler([(UniformSampler(3), 0.5), (UniformSampler(3), 0.4)]), r"fractions \[0.5, 0.4\]"),
    (lambda: MixedSampler([(UniformSampler(3), 1.5), (UniformSampler(3), -0.5)]), "components must be"),
])
def test_sampler_constructors_reject(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(("users", "n_neg", "message"), [
    (torch.ones(2, 2, dtype=torch.int64), 3, r"user_idx must have shape \(B,\)"),
    (USERS, 0, "n_neg must be an int >= 1, got 0"),
    (USERS, 2.0, "n_neg must be an int >= 1, got 2.0"),
])
def test_sample_rejects_bad_requests(users, n_neg, message):
    for sampler in (UniformSampler(5), PopularitySampler(torch.ones(6)), ModelHardSampler(fixed_top_items, 10, 3),
                    MixedSampler([(UniformSampler(5), 1.0)])):
        with pytest.raises(ValueError, match=message):
            sampler.sample(users, n_neg)


def test_make_sampler_strategies():
    counts = torch.arange(11.0)
    assert isinstance(make_sampler("random", 10), UniformSampler)
    assert isinstance(make_sampler("hard", 10, item_counts=counts), PopularitySampler)
    mixed = make_sampler("mixed", 10, item_counts=counts, hard_fraction=0.25)
    assert isinstance(mixed, MixedSampler)
    assert [(type(s).__name__, f) for s, f in mixed.components] == [
        ("UniformSampler", 0.75), ("PopularitySampler", 0.25)]
    with_model = make_sampler("mixed", 10, item_counts=counts, hard_fraction=0.5, top_items=fixed_top_items, top_k=3)
    assert [(type(s).__name__, f) for s, f in with_model.components] == [
        ("UniformSampler", 0.5), ("PopularitySampler", 0.25), ("ModelHardSampler", 0.25)]
    assert with_model.sample(USERS, 8).shape == (8, 8)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(strategy="popular"), r"strategy must be one of \('random', 'hard', 'mixed'\), got 'popular'"),
    (dict(strategy="hard"), "item_counts must be given for strategy 'hard'"),
    (dict(strategy="mixed", item_counts=torch.ones(5)), "item_counts must have n_items \\+ 1 = 11 entries, got 5"),
    (dict(strategy="mixed", item_counts=torch.ones(11), hard_fraction=1.0),
     r"hard_fraction must be a float in \(0, 1\)"),
])
def test_make_sampler_rejects(kwargs, message):
    assert STRATEGIES == ("random", "hard", "mixed")
    with pytest.raises(ValueError, match=message):
        make_sampler(n_items=10, **kwargs)


def test_shared_negatives_equal_the_same_negatives_given_per_row():
    torch.manual_seed(3)
    user, pos = torch.randn(4, 8), torch.randn(4, 8)
    neg = torch.randn(5, 8)
    pos_idx, neg_idx = torch.tensor([1, 2, 3, 4]), torch.tensor([2, 6, 7, 8, 9])
    pos_q, neg_q = torch.full((4,), -2.0), torch.full((5,), -3.0)
    shared = sampled_softmax_loss(user, pos, neg, 0.1, pos_q, neg_q, pos_idx, neg_idx)
    per_row = sampled_softmax_loss(user, pos, neg.expand(4, 5, 8), 0.1, pos_q, neg_q.expand(4, 5),
                                   pos_idx, neg_idx.expand(4, 5))
    assert torch.allclose(shared, per_row, atol=1e-6)


def test_shared_negatives_with_wrong_width_are_refused():
    with pytest.raises(ValueError, match="shared neg_emb"):
        sampled_softmax_loss(torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 5), 0.1, torch.zeros(2),
                             torch.zeros(3), torch.tensor([1, 2]), torch.tensor([3, 4, 5]))


def test_row_weights_give_the_weighted_mean_of_the_rows_losses():
    """``row_weight`` (the sequential tower's ``retrieval.next_item_decay``): ones give the plain mean, a zero
    weight drops its row, and any weights give sum(w * loss_r) / sum(w) of the per-row losses."""
    from trainer.losses import full_softmax_loss, grouped_sampled_softmax_loss

    torch.manual_seed(0)
    user_emb, item_emb = torch.randn(2, 4), torch.randn(6, 4)
    row_user, pos_idx = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 3])
    seen = torch.zeros(2, 6, dtype=torch.bool)
    neg_idx = torch.tensor([4, 5])

    def grouped(weight=None, rows=slice(None)):
        return grouped_sampled_softmax_loss(user_emb, row_user[rows], item_emb[pos_idx[rows]], item_emb[neg_idx], 0.5,
                                            torch.zeros(pos_idx[rows].numel()), torch.zeros(2), pos_idx[rows],
                                            neg_idx, row_weight=weight)

    def full(weight=None, rows=slice(None)):
        return full_softmax_loss(user_emb, row_user[rows], item_emb, 0.5, pos_idx[rows], seen, row_weight=weight)
    for loss in (grouped, full):
        assert torch.allclose(loss(torch.ones(3)), loss())
        per_row = torch.stack([loss(torch.eye(3)[r]) for r in range(3)])
        weights = torch.tensor([1.0, 0.5, 0.25])
        assert torch.allclose(loss(weights), (per_row * weights).sum() / weights.sum())
    with pytest.raises(ValueError, match="row_weight"):
        full(torch.ones(2))
