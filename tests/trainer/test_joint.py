"""Joint multi-task training (multitask.mode=joint): one loss over both models, end to end on small data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from recsys_contracts import artifacts
from tests.signing_keys import TRUST
from trainer import job
from trainer.joint_training import RatingLookup
from trainer.retrieval_training import Interactions
from tests.trainer.test_pipeline import small_config
from trainer.data.synthetic import generate


@pytest.fixture(scope="module")
def dataset():
    return generate(120, 200, 5000, seed=3)


def test_rating_lookup_finds_training_pairs_and_nan_elsewhere():
    train = Interactions(users=np.array([3, 1, 3, 2]), items=np.array([5, 5, 7, 1]),
                         timestamps=np.zeros(4, np.int64), ratings=np.array([4.0, 2.0, 5.0, 1.0], np.float32))
    lookup = RatingLookup.from_interactions(train, n_items=9)
    got = lookup(np.array([3, 3, 1, 2, 2, 0]), np.array([7, 5, 5, 1, 5, 0]))
    np.testing.assert_array_equal(got[:4], [5.0, 4.0, 2.0, 1.0])
    assert np.isnan(got[4:]).all()


def test_joint_mode_trains_both_models_publishes_and_reports_one_history(tmp_path, dataset):
    root = tmp_path / "artifacts"
    cfg = small_config(tmp_path, "multitask.mode=joint", f"publish.artifact_root={root}", "publish.gate=false")
    result = job.run(cfg, dataset)
    assert result.version == 1
    artifacts.verify(root, 1, TRUST)
    histories = json.loads((tmp_path / "run" / "report.json").read_text())["histories"]
    assert set(histories) == {"joint"}
    epochs = histories["joint"]
    assert [e["epoch"] for e in epochs] == list(range(len(epochs))) and epochs
    assert all(np.isfinite([e["loss_retrieval"], e["loss_ctr"], e["loss_rating"]]).all() for e in epochs)
    assert epochs[-1]["loss_rating"] < epochs[0]["loss_rating"]                 # the rating head learns
    assert "joint_training" in result.report["timings"]
    assert result.report["two_tower"]["ndcg@10"] > 0.1                            # planted preferences found
    assert result.report["pipeline"]["ndcg@10"] > 0.1


def _tower_weights(tmp_path, dataset, *extra):
    cfg = small_config(tmp_path, "multitask.mode=joint", "retrieval.epochs=1", *extra)
    run = job.run(cfg, dataset).run
    return {k: v.clone() for k, v in run.two_tower.state_dict().items()}, run.ranker


def test_the_ranking_losses_reach_the_towers_only_when_weighted(tmp_path, dataset):
    """Same seed: with alpha = beta = 0 the towers learn from L_retrieval alone (and the DCN gets no
    gradient); with them on, the CTR and rating losses change the embeddings through the live
    retrieval score -- what training jointly means."""
    off, ranker_off = _tower_weights(tmp_path / "off", dataset, "multitask.rating_weight=0", "multitask.ctr_weight=0")
    again, _ = _tower_weights(tmp_path / "again", dataset, "multitask.rating_weight=0", "multitask.ctr_weight=0")
    on, _ = _tower_weights(tmp_path / "on", dataset)
    for name in off:
        assert torch.equal(off[name], again[name]), name                          # deterministic
    assert any(not torch.allclose(off[name], on[name]) for name in off)
    assert ranker_off.ctr_head.weight.abs().sum().item() == pytest.approx(0.0)    # zero-init head got no gradient


def test_joint_mode_trains_the_pooled_tower_when_the_tower_is_validated(tmp_path, dataset):
    """retrieval.user_tower=validated (the default) under temporal: the joint loss trains one tower, the
    pooled one, and the report has no tower choice to show."""
    from trainer.models.two_tower import UserTower
    cfg = small_config(tmp_path, "multitask.mode=joint", "data.protocol=temporal", "retrieval.epochs=1")
    assert cfg.retrieval.user_tower == "validated"
    result = job.run(cfg, dataset)
    assert type(result.run.two_tower.user_tower) is UserTower
    assert "user_tower" not in result.report
