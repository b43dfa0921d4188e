"""benchmarks/synthetic_oracle.py: the generator's own score and the known-items fit, judged by the trainer's
protocol on a small generated log (real split, real EASE, no training)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.synthetic_oracle import _truth, fit_users, protocol_report
from trainer.config import load_config, replace
from trainer.data.synthetic import generate, planted_world
from trainer.prepare import prepare

SIZE = (400, 500, 12_000)     # users, items, interactions


@pytest.fixture(scope="module")
def small():
    cfg = load_config(None, ["run.progress=false"])
    world = planted_world(SIZE[0], SIZE[1], seed=3)
    prep = prepare(replace(cfg, data={"protocol": "random"}), generate(*SIZE, seed=3))
    return cfg, world, prep


def test_the_truth_is_read_in_the_trainers_indices(small):
    _, world, prep = small
    users, items, log_popularity = _truth(world, prep)
    user = int(prep.vocab.users_to_idx(np.array(["7"]))[0])
    item = int(prep.vocab.items_to_idx(np.array([11]))[0])
    np.testing.assert_array_equal(users[user], world.user_vectors[6])
    np.testing.assert_array_equal(items[item - 1], world.item_vectors[10])
    assert log_popularity[item - 1] == pytest.approx(np.log(world.item_popularity[10]))
    assert not users[0].any()                 # the unknown user's row


def test_the_known_items_fit_finds_each_users_direction(small):
    _, world, prep = small
    users, items, log_popularity = _truth(world, prep)
    fitted = fit_users(prep, items, log_popularity, prior=3.0)
    unit = fitted[1:] / np.linalg.norm(fitted[1:], axis=1, keepdims=True)
    own = np.median(np.einsum("ud,ud->u", unit, users[1:]))
    other = np.median(np.einsum("ud,ud->u", unit, np.roll(users[1:], 1, axis=0)))  # someone else's taste
    assert own > 0.5 and own > other + 0.25, (own, other)
    assert not fitted[0].any()


def test_the_oracle_ranks_above_popularity_and_ease_and_the_fit_lies_between(small):
    cfg, world, prep = small
    reports = protocol_report(world, prep, (10,), cfg.eval.ease_grid, cfg.eval.ease_search)
    ndcg = {name: values["ndcg@10"] for name, values in reports.items()}
    assert ndcg["oracle"] > ndcg["ease"] > ndcg["popularity"], ndcg
    assert ndcg["oracle"] >= ndcg["known_items"] > ndcg["popularity"], ndcg
    assert reports["known_items"]["prior"] in (1.0, 3.0, 10.0)
    assert set(reports["known_items"]["validation_ndcg@10"]) == {"1.0", "3.0", "10.0"}
