"""The user tower's history options: a separate input id table, attention pooling, and the lr decay."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.trainer.test_export import MAX_BATCH
from tests.trainer.test_models import tower_config, user_inputs
from trainer.config import build_config
from recsys_contracts.programs import USER_TOWER
from trainer.export import export_user_tower, load_program
from trainer.models import build_two_tower
from trainer.models.two_tower import AttentionPooling


def test_separate_history_table_is_its_own_and_moves_only_the_user_tower():
    model = build_two_tower(tower_config(history_table="separate")).eval()
    tower = model.user_tower
    assert tower.history_embedding is not model.item_tower.item_embedding
    assert tower.item_embedding is model.item_tower.item_embedding
    assert torch.count_nonzero(tower.history_embedding.weight[0]) == 0
    inputs = user_inputs(2)
    inputs["history"] = torch.tensor([[0, 0, 0, 5, 7, 7], [0, 0, 0, 0, 9, 11]])
    before = tower(**inputs)
    with torch.no_grad():
        model.item_tower.item_embedding.weight[5] += 1.0   # the output table does not feed the history
    assert torch.allclose(tower(**inputs), before)
    with torch.no_grad():
        tower.history_embedding.weight[5] += 1.0
    after = tower(**inputs)
    assert not torch.allclose(after[0], before[0]) and torch.allclose(after[1], before[1])


def test_attention_pooling_ignores_padding_and_pools_an_empty_history_to_zero():
    torch.manual_seed(0)
    pool = AttentionPooling(4)
    with torch.no_grad():
        pool.recency.normal_()
    rows = torch.randn(3, 5, 4)
    mask = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    pooled = pool(rows, mask)
    assert torch.equal(pooled[1], torch.zeros(4))
    changed = rows.clone()
    changed[0, 0] += 100.0                                   # a padded slot's content does not matter
    assert torch.allclose(pool(changed, mask)[0], pooled[0])
    weights = torch.softmax(pool.score(rows[2]).squeeze(-1) + pool.recency[:5].flip(0), dim=0)
    assert torch.allclose(pooled[2], weights @ rows[2], atol=1e-6)   # a convex combination of the rows
    with pytest.raises(ValueError, match="history length must be"):
        pool(torch.zeros(1, pool.recency.shape[0] + 1, 4), torch.ones(1, pool.recency.shape[0] + 1, dtype=torch.bool))


def test_user_tower_with_both_options_exports_and_equals_eager(tmp_path):
    torch.manual_seed(0)
    tower = build_two_tower(tower_config(history_table="separate", history_pooling="attention")).user_tower
    export_user_tower(tower, user_inputs(4), tmp_path / "user_tower.onnx", max_batch=MAX_BATCH)
    program = load_program(tmp_path / "user_tower.onnx", USER_TOWER)
    tower.eval()
    for batch in (1, 7):
        inputs = user_inputs(batch, seed=batch)
        inputs["history"][0] = 0                               # an empty history stays finite
        eager = tower(**inputs)
        assert torch.isfinite(eager).all()
        (served,) = program(**{name: value.numpy() for name, value in inputs.items()})
        assert np.allclose(served, eager.detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    ({"history_table": "both"}, "history_table must be one of"),
    ({"history_pooling": "max"}, "history_pooling must be one of"),
])
def test_tower_config_rejects_unknown_history_options(overrides, message):
    with pytest.raises(ValueError, match=message):
        tower_config(**overrides)


def test_config_knows_the_retrieval_history_options():
    cfg = build_config({"retrieval": {"history_table": "separate", "history_pooling": "attention", "lr_decay": 0.9}})
    assert (cfg.retrieval.history_table, cfg.retrieval.history_pooling, cfg.retrieval.lr_decay) == \
        ("separate", "attention", 0.9)
    with pytest.raises(ValueError, match="retrieval.history_pooling must be one of"):
        build_config({"retrieval": {"history_pooling": "sum"}})
    with pytest.raises(ValueError, match="retrieval.lr_decay must be > 0"):
        build_config({"retrieval": {"lr_decay": 0.0}})


def test_update_average_moves_each_weight_toward_the_model():
    from trainer.retrieval_training import update_average
    torch.manual_seed(0)
    model = build_two_tower(tower_config(), learn_temperature=False)
    averaged = build_two_tower(tower_config(), learn_temperature=False)
    with torch.no_grad():
        averaged.log_temperature.fill_(0.0)
    expected = [0.9 * a + 0.1 * p for a, p in zip(averaged.parameters(), model.parameters())]
    update_average(averaged, model, 0.9)
    assert all(torch.allclose(a, e) for a, e in zip(averaged.parameters(), expected))
    assert torch.equal(averaged.log_temperature, model.log_temperature)   # buffers are copied


def test_corrected_decay_makes_the_average_forget_the_initial_weights():
    from trainer.retrieval_training import corrected_decay
    assert corrected_decay(0.99, 1) == pytest.approx(0.0)           # step 1 copies the weights
    average, weights = torch.tensor(123.0), [1.0, 2.0, 4.0]          # 123: the initial value, forgotten
    for step, w in enumerate(weights, start=1):
        average = torch.lerp(average, torch.tensor(w), 1.0 - corrected_decay(0.5, step))
    expected = (0.25 * 1.0 + 0.5 * 2.0 + 1.0 * 4.0) / 1.75           # weights decay ** age, normalised
    assert average.item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="retrieval.weight_average must be in"):
        build_config({"retrieval": {"weight_average": 1.0}})
