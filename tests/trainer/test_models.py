"""Models on random tensors: calendar features, both towers, the cross network and the DCN ranker."""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime, timezone

import pytest
import torch
from torch import nn

from trainer.losses import ranking_losses, sampled_softmax_loss
from trainer.models import (CrossNetV2, DCNConfig, DCNRanker, ItemTower, TowerConfig, TwoTower, UserTower,
                            build_two_tower, calendar_features)
from trainer.models.layers import CategoricalEmbedding, masked_mean, padded_mean
from trainer.models.two_tower import MIN_TEMPERATURE, make_item_embedding

N_USERS, N_ITEMS, HISTORY = 30, 40, 6
USER_CARDS, ITEM_CARDS = (3, 22), (5,)
N_USER_NUM, N_ITEM_NUM = 2, 4


def tower_config(**overrides) -> TowerConfig:
    values = dict(n_users=N_USERS, n_items=N_ITEMS, user_cat_cardinalities=USER_CARDS, n_user_num=N_USER_NUM,
                  item_cat_cardinalities=ITEM_CARDS, n_item_num=N_ITEM_NUM, embedding_dim=8,
                  user_hidden_dims=(16, 12), item_hidden_dims=(10,))
    return TowerConfig(**(values | overrides))


def dcn_config(**overrides) -> DCNConfig:
    values = dict(n_users=N_USERS, n_items=N_ITEMS, user_cat_cardinalities=USER_CARDS, n_user_num=N_USER_NUM,
                  item_cat_cardinalities=ITEM_CARDS, n_item_num=N_ITEM_NUM, embedding_dim=4, deep_dims=(16, 8))
    return DCNConfig(**(values | overrides))


def _categorical(rows: int, cardinalities: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    columns = [torch.randint(0, c, (rows,), generator=generator) for c in cardinalities]
    return torch.stack(columns, dim=1) if columns else torch.zeros(rows, 0, dtype=torch.int64)  # (rows, C)


def user_inputs(batch: int, seed: int = 0, user_cards=USER_CARDS, n_num=N_USER_NUM) -> dict[str, torch.Tensor]:
    """Random user-side inputs; about a third of the history slots are padding (0)."""
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(1, N_ITEMS + 1, (batch, HISTORY), generator=g)
    history = history.masked_fill(torch.rand(batch, HISTORY, generator=g) < 0.3, 0)
    return {"user_idx": torch.randint(0, N_USERS + 1, (batch,), generator=g),
            "user_cat": _categorical(batch, user_cards, g),
            "user_num": torch.randn(batch, n_num, generator=g),
            "history": history,
            "timestamp": torch.randint(0, 2_000_000_000, (batch,), generator=g)}


def item_inputs(rows: int, seed: int = 1, item_cards=ITEM_CARDS, n_num=N_ITEM_NUM) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"item_idx": torch.randint(1, N_ITEMS + 1, (rows,), generator=g),
            "item_cat": _categorical(rows, item_cards, g),
            "item_num": torch.randn(rows, n_num, generator=g)}


def ranker_inputs(rows: int, seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return user_inputs(rows, seed) | item_inputs(rows, seed + 1) | {"retrieval_score": torch.rand(rows, generator=g)}


USER_KEYS = ("user_idx", "user_cat", "user_num", "history", "timestamp")


def grouped_inputs(rows: int, users: int, seed: int = 2) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(grouped, aligned): ``users`` user rows and ``rows`` candidate rows, row r naming user r % users
    (the served ranker's layout), and the same rows aligned (each candidate beside its user's inputs)."""
    aligned = ranker_inputs(rows, seed)
    row_user = torch.arange(rows) % users
    grouped = {name: aligned[name][:users] for name in USER_KEYS} | {"row_user": row_user} | \
              {name: value for name, value in aligned.items() if name not in USER_KEYS}
    return grouped, {name: (grouped[name][row_user] if name in USER_KEYS else value) for name, value in aligned.items()}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("when", [
    datetime(1970, 1, 1, tzinfo=timezone.utc),  # Thursday 00:00
    datetime(1969, 12, 31, 23, 59, 59, tzinfo=timezone.utc),  # Wednesday, before the epoch
    datetime(1997, 9, 20, 13, 5, 10, tzinfo=timezone.utc),  # Saturday, MovieLens 100K era
    datetime(2024, 2, 29, 23, 0, 0, tzinfo=timezone.utc),  # Thursday, leap day
    datetime(2025, 6, 1, 7, 30, 0, tzinfo=timezone.utc),  # Sunday
    datetime(2031, 12, 29, 0, 0, 1, tzinfo=timezone.utc),  # Monday
])
def test_calendar_features_match_datetime(when):
    hour, weekday, weekend = calendar_features(torch.tensor([int(when.timestamp())]))
    assert (hour.item(), weekday.item(), weekend.item()) == (when.hour, when.weekday(), int(when.weekday() >= 5))


def test_calendar_features_export():
    class Calendar(nn.Module):
        def forward(self, timestamp):
            return calendar_features(timestamp)

    timestamp = torch.tensor([0, 874_724_710, 1_700_000_000, -1])
    program = torch.export.export(Calendar(), (timestamp,),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    for exported, eager in zip(program.module()(timestamp[:3]), calendar_features(timestamp[:3])):
        assert torch.equal(exported, eager)


def test_towers_return_unit_vectors_of_the_embedding_dim():
    model = build_two_tower(tower_config())
    user_emb = model.user_tower(**user_inputs(5))
    item_emb = model.item_tower(**item_inputs(9))
    assert user_emb.shape == (5, 8) and item_emb.shape == (9, 8)
    assert torch.allclose(user_emb.norm(dim=1), torch.ones(5)) and torch.allclose(item_emb.norm(dim=1), torch.ones(9))
    # score is the cosine similarity of the unit vectors
    assert torch.allclose(TwoTower.score(user_emb, item_emb), user_emb @ item_emb.T)
    assert TwoTower.score(user_emb, item_emb).shape == (5, 9)


def test_towers_without_categorical_or_numeric_features():
    config = tower_config(user_cat_cardinalities=(), n_user_num=0, item_cat_cardinalities=(), n_item_num=0)
    model = build_two_tower(config).eval()
    user_emb, item_emb = model(**user_inputs(3, user_cards=(), n_num=0), **item_inputs(4, item_cards=(), n_num=0))
    assert user_emb.shape == (3, 8) and item_emb.shape == (4, 8)


def test_history_pools_the_shared_item_table_and_ignores_padding():
    model = build_two_tower(tower_config()).eval()
    assert model.user_tower.item_embedding is model.item_tower.item_embedding
    inputs = user_inputs(2)
    inputs["history"] = torch.tensor([[0, 0, 0, 5, 7, 7], [0, 0, 0, 0, 9, 11]])
    before = model.user_tower(**inputs)
    # Only the order and the padding change: the masked mean is the same.
    reordered = inputs | {"history": torch.tensor([[7, 0, 5, 0, 7, 0], [11, 9, 0, 0, 0, 0]])}
    assert torch.allclose(model.user_tower(**reordered), before, atol=1e-6)
    with torch.no_grad():
        model.item_tower.item_embedding.weight[5] += 1.0  # e.g. item 5 was trained further
    after = model.user_tower(**inputs)
    assert not torch.allclose(after[0], before[0])  # user 0 has item 5 in its history
    assert torch.allclose(after[1], before[1])  # user 1 does not


def test_padding_row_of_the_item_table_stays_zero():
    model = build_two_tower(tower_config())
    assert torch.count_nonzero(model.item_tower.item_embedding.weight[0]) == 0


def test_two_tower_parameter_counts():
    config = tower_config()
    model = build_two_tower(config)
    d = config.embedding_dim
    table = (N_ITEMS + 1) * d
    categorical = sum(ITEM_CARDS) * d
    # item id + categorical + numeric -> 10 -> D
    item_mlp_in = d + len(ITEM_CARDS) * d + N_ITEM_NUM
    item_mlp = (item_mlp_in * 10 + 10) + (10 * d + d)
    assert n_params(model.item_tower) == table + categorical + item_mlp
    # user id + categorical + numeric + pooled history + (hour, weekday, weekend) -> 16 -> 12 -> D
    user_mlp_in = d + len(USER_CARDS) * d + N_USER_NUM + d + (2 * d + 1)
    user_params = ((N_USERS + 1) * d + sum(USER_CARDS) * d + (24 + 7) * d
                   + (user_mlp_in * 16 + 16) + (16 * 12 + 12) + (12 * d + d))
    assert n_params(model.user_tower) == table + user_params
    # the shared table is counted once, plus the log temperature
    assert n_params(model) == n_params(model.item_tower) + user_params + 1


def test_two_tower_temperature():
    model = build_two_tower(tower_config(), init_temperature=0.07)
    assert math.isclose(model.temperature.item(), 0.07, rel_tol=1e-6)
    assert any(p is model.log_temperature for p in model.parameters())
    fixed = build_two_tower(tower_config(), learn_temperature=False)
    assert not any(p is fixed.log_temperature for p in fixed.parameters())
    assert "log_temperature" in dict(fixed.named_buffers())
    with torch.no_grad():
        model.log_temperature.fill_(math.log(1e-4))
    assert model.temperature.item() == pytest.approx(MIN_TEMPERATURE)


@pytest.mark.parametrize("value", [0.0, 0.005, -1.0, float("nan"), float("inf"), True])
def test_two_tower_rejects_bad_init_temperature(value):
    config = tower_config()
    table = make_item_embedding(config)
    with pytest.raises(ValueError, match="init_temperature must be"):
        TwoTower(UserTower(config, table), ItemTower(config, table), init_temperature=value)


def test_two_tower_requires_one_shared_item_table():
    config = tower_config()
    with pytest.raises(ValueError, match="must share one item_embedding"):
        TwoTower(UserTower(config, make_item_embedding(config)), ItemTower(config, make_item_embedding(config)))


@pytest.mark.parametrize("table", [nn.Embedding(N_ITEMS, 8, padding_idx=0), nn.Embedding(N_ITEMS + 1, 4, padding_idx=0),
                                   nn.Embedding(N_ITEMS + 1, 8)])
def test_towers_reject_a_mismatched_item_table(table):
    with pytest.raises(ValueError, match="item_embedding must be an nn.Embedding of shape"):
        UserTower(tower_config(), table)
    with pytest.raises(ValueError, match="item_embedding must be an nn.Embedding of shape"):
        ItemTower(tower_config(), table)


SHARED_BAD_FIELDS = [
    ("n_users", -1, "n_users must be an int >= 0"),
    ("n_items", 2.0, "n_items must be an int >= 0"),
    ("n_items", True, "n_items must be an int >= 0"),
    ("user_cat_cardinalities", (3, 0), "user_cat_cardinalities must be a tuple of ints >= 1"),
    ("user_cat_cardinalities", [3], "user_cat_cardinalities must be a tuple of ints >= 1"),
    ("item_cat_cardinalities", (2.5,), "item_cat_cardinalities must be a tuple of ints >= 1"),
    ("n_user_num", -2, "n_user_num must be an int >= 0"),
    ("n_item_num", None, "n_item_num must be an int >= 0"),
    ("embedding_dim", 0, "embedding_dim must be an int >= 1"),
    ("dropout", 1.0, "dropout must be a float in"),
    ("dropout", -0.1, "dropout must be a float in"),
]


@pytest.mark.parametrize(("field", "value", "message"), SHARED_BAD_FIELDS + [
    ("user_hidden_dims", (), "user_hidden_dims must be a non-empty tuple of ints >= 1"),
    ("item_hidden_dims", (16, 0), "item_hidden_dims must be a non-empty tuple of ints >= 1"),
])
def test_tower_config_rejects(field, value, message):
    with pytest.raises(ValueError, match=message):
        tower_config(**{field: value})


@pytest.mark.parametrize(("field", "value", "message"), SHARED_BAD_FIELDS + [
    ("deep_dims", (), "deep_dims must be a non-empty tuple of ints >= 1"),
    ("n_cross_layers", 0, "n_cross_layers must be an int >= 1"),
    ("low_rank", 0, "low_rank must be an int >= 1"),
    ("structure", "wide", "structure must be one of"),
    ("rating_min", float("nan"), "rating_min must be a finite float"),
    ("rating_max", "5", "rating_max must be a finite float"),
    ("rating_max", 0.5, "rating_max must be >= rating_min"),
    ("affinity_rank", -1, "affinity_rank must be an int >= 0"),
])
def test_dcn_config_rejects(field, value, message):
    with pytest.raises(ValueError, match=message):
        dcn_config(**{field: value})


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        tower_config().embedding_dim = 4  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        dcn_config().structure = "parallel"  # type: ignore[misc]


def test_categorical_embedding_offsets_separate_the_columns():
    embedding = CategoricalEmbedding((2, 3), dim=1)
    with torch.no_grad():
        embedding.table.weight.copy_(torch.arange(5.0).unsqueeze(1))  # row r holds the value r
    # column 0 uses rows 0..1, column 1 rows 2..4: (1, 2) -> rows (1, 4)
    assert embedding(torch.tensor([[1, 2], [0, 0]])).tolist() == [[1.0, 4.0], [0.0, 2.0]]


def test_cross_layer_by_hand():
    cross = CrossNetV2(input_dim=2, n_layers=1)
    with torch.no_grad():
        cross.layers[0].weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        cross.layers[0].bias.copy_(torch.tensor([0.5, 0.0]))
    # x0 = (1, 2): W x0 + b = (1 + 0.5, 1 + 2) = (1.5, 3); x0 * that + x0 = (1.5 + 1, 6 + 2) = (2.5, 8)
    assert cross(torch.tensor([[1.0, 2.0]])).tolist() == [[2.5, 8.0]]


def test_low_rank_cross_equals_full_rank_with_w_equal_u_v_transposed():
    torch.manual_seed(0)
    full, low = CrossNetV2(6, n_layers=2), CrossNetV2(6, n_layers=2, low_rank=2)
    with torch.no_grad():
        for full_layer, low_layer in zip(full.layers, low.layers):
            v_t, u = low_layer  # (r, d) then (d, r) + bias
            full_layer.weight.copy_(u.weight @ v_t.weight)  # (d, r) @ (r, d) -> (d, d)
            full_layer.bias.copy_(u.bias)
    x0 = torch.randn(5, 6)
    assert torch.allclose(full(x0), low(x0), atol=1e-6)
    # per layer: d * d + d weights at full rank, 2 * d * r + d at rank r
    assert n_params(full) == 2 * (36 + 6) and n_params(low) == 2 * (2 * 6 * 2 + 6)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"input_dim": 0, "n_layers": 1}, "input_dim must be an int >= 1"),
    ({"input_dim": 4, "n_layers": 0}, "n_layers must be an int >= 1"),
    ({"input_dim": 4, "n_layers": 1, "low_rank": 0}, "low_rank must be an int >= 1"),
])
def test_cross_net_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CrossNetV2(**kwargs)


@pytest.mark.parametrize("structure", ["stacked", "parallel"])
@pytest.mark.parametrize("low_rank", [None, 3])
def test_ranker_outputs(structure, low_rank):
    ranker = DCNRanker(dcn_config(structure=structure, low_rank=low_rank, rating_min=0.5, rating_max=5.0)).eval()
    ctr_logit, rating = ranker(**ranker_inputs(11))
    assert ctr_logit.shape == (11,) and rating.shape == (11,)
    assert bool(((rating >= 0.5) & (rating <= 5.0)).all())
    with torch.no_grad():
        ranker.rating_head.bias.fill_(50.0)  # sigmoid(~50) = 1 -> the upper bound
    assert torch.allclose(ranker(**ranker_inputs(11))[1], torch.full((11,), 5.0))


def test_ranker_parameter_counts():
    config = dcn_config(structure="stacked")
    e = config.embedding_dim
    d0 = (e + len(USER_CARDS) * e + N_USER_NUM + e + (2 * e + 1)
          + e + len(ITEM_CARDS) * e + N_ITEM_NUM + 1)
    stacked = DCNRanker(config)
    parallel = DCNRanker(dcn_config(structure="parallel"))
    assert n_params(stacked.cross) == 3 * (d0 * d0 + d0)
    assert n_params(stacked.deep) == (d0 * 16 + 16) + (16 * 8 + 8)
    # both heads read deep_dims[-1] = 8 features when stacked, d0 + 8 when parallel
    assert n_params(parallel) - n_params(stacked) == 2 * d0
    embeddings = (N_USERS + 1 + N_ITEMS + 1 + sum(USER_CARDS) + sum(ITEM_CARDS) + 24 + 7) * e
    assert n_params(stacked) == embeddings + n_params(stacked.cross) + n_params(stacked.deep) + 2 * (8 + 1) + 2  # two heads, retrieval skip


def test_one_training_step_reduces_the_retrieval_loss():
    torch.manual_seed(0)
    model = build_two_tower(tower_config(dropout=0.0), init_temperature=0.1)
    users, items = user_inputs(16, seed=3), item_inputs(16, seed=4)
    items["item_idx"] = torch.randperm(N_ITEMS)[:16] + 1  # distinct positives: no accidental hits

    def loss() -> torch.Tensor:
        user_emb, pos_emb = model(**users, **items)
        return sampled_softmax_loss(user_emb, pos_emb, None, model.temperature, torch.zeros(16), None,
                                    items["item_idx"], None)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = loss()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        assert loss().item() < before.item()


def test_one_training_step_reduces_the_ranking_loss():
    torch.manual_seed(0)
    ranker = DCNRanker(dcn_config(dropout=0.0))
    inputs = ranker_inputs(32)
    labels = (torch.arange(32) % 2).float()
    rating = 1.0 + 4.0 * torch.rand(32)
    rated = labels.bool()

    def loss() -> torch.Tensor:
        ctr_logit, rating_pred = ranker(**inputs)
        l_ctr, l_rating = ranking_losses(ctr_logit, labels, rating_pred, rating, rated)
        return l_ctr + l_rating

    optimizer = torch.optim.Adam(ranker.parameters(), lr=1e-2)
    before = loss()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        assert loss().item() < before.item()


def _affinity_ranker(rank: int = 3, seed: int = 0) -> DCNRanker:
    """A ranker with random affinity factors, standardised on 50 random rows."""
    torch.manual_seed(seed)
    ranker = DCNRanker(dcn_config(affinity_rank=rank))
    g = torch.Generator().manual_seed(seed)
    ranker.set_affinity(torch.randn(N_USERS + 1, rank, generator=g), torch.randn(N_ITEMS + 1, rank, generator=g),
                        *_affinity_rows(seed))
    return ranker


def _affinity_rows(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 100)
    return torch.randint(0, N_USERS + 1, (50,), generator=g), torch.randint(1, N_ITEMS + 1, (50,), generator=g)


def test_ranker_without_affinity_has_no_affinity_state():
    ranker = DCNRanker(dcn_config())
    assert not any(name.startswith("affinity") for name in ranker.state_dict())
    with pytest.raises(RuntimeError, match="affinity_rank 0"):
        ranker.set_affinity(torch.zeros(N_USERS + 1, 1), torch.zeros(N_ITEMS + 1, 1), torch.zeros(2, dtype=torch.int64),
                            torch.zeros(2, dtype=torch.int64))


def test_ranker_affinity_is_the_standardised_factor_dot_product():
    ranker = _affinity_ranker()
    users, items = _affinity_rows(0)
    raw = (ranker.affinity_user[users] * ranker.affinity_item[items]).sum(dim=1)
    standardised = ranker.affinity(users, items).squeeze(1)
    assert torch.allclose(standardised, (raw - raw.mean()) / raw.std(), atol=1e-5)   # the rows it was fitted on
    assert abs(float(standardised.mean())) < 1e-5 and abs(float(standardised.std()) - 1.0) < 1e-5
    assert {"affinity_user", "affinity_item", "affinity_shift", "affinity_scale"} <= set(ranker.state_dict())


def test_ranker_affinity_enters_the_ctr_logit_through_its_wide_weight():
    ranker = _affinity_ranker().eval()
    inputs = ranker_inputs(13)
    with torch.no_grad():
        start, _ = ranker(**inputs)
        # Untrained: the wide affinity weight and the deep CTR head are zero, the logit is the retrieval score.
        assert torch.allclose(start, inputs["retrieval_score"] + ranker.ctr_head.bias, atol=1e-6)
        ranker.affinity_wide.weight.fill_(0.5)
        moved, _ = ranker(**inputs)
    expected = 0.5 * ranker.affinity(inputs["user_idx"], inputs["item_idx"]).squeeze(1)
    assert torch.allclose(moved - start, expected, atol=1e-5)


def test_ranker_affinity_channels_are_separate_standardised_dot_products_with_their_own_wide_weights():
    torch.manual_seed(0)
    ranker = DCNRanker(dcn_config(affinity_rank=3, affinity_channels=2)).eval()
    g = torch.Generator().manual_seed(0)
    user_factors, item_factors = torch.randn(N_USERS + 1, 6, generator=g), torch.randn(N_ITEMS + 1, 6, generator=g)
    ranker.set_affinity(user_factors, item_factors, *_affinity_rows(0))
    users, items = _affinity_rows(0)
    standardised = ranker.affinity(users, items)
    assert standardised.shape == (50, 2)
    for channel, block in enumerate((slice(0, 3), slice(3, 6))):
        raw = (user_factors[users, block] * item_factors[items, block]).sum(dim=1)
        assert torch.allclose(standardised[:, channel], (raw - raw.mean()) / raw.std(), atol=1e-5)
    assert ranker.cross.layers[0].in_features == DCNRanker(dcn_config(affinity_rank=3)).cross.layers[0].in_features + 1
    inputs = ranker_inputs(13)
    with torch.no_grad():
        start, _ = ranker(**inputs)
        ranker.affinity_wide.weight.copy_(torch.tensor([[0.5, -2.0]]))
        moved, _ = ranker(**inputs)
    affinity = ranker.affinity(inputs["user_idx"], inputs["item_idx"])
    assert torch.allclose(moved - start, 0.5 * affinity[:, 0] - 2.0 * affinity[:, 1], atol=1e-5)


def test_ranker_parameter_count_with_affinity():
    # One more x0 column (the cross net and the first deep layer grow) and the wide affinity weight.
    plain, with_affinity = DCNRanker(dcn_config()), DCNRanker(dcn_config(affinity_rank=5))
    d0 = plain.cross.layers[0].in_features
    assert with_affinity.cross.layers[0].in_features == d0 + 1
    assert n_params(with_affinity) - n_params(plain) == 3 * (2 * d0 + 2) + 16 + 1   # W and b per cross layer


def test_the_grouped_ranker_scores_as_the_aligned_rows_do():
    """``forward_grouped`` (U user rows, each candidate naming its user) equals ``forward`` on the same
    rows aligned, with genres and affinities on."""
    ranker = DCNRanker(dcn_config(n_genres=2, affinity_rank=3)).eval()
    ranker.set_item_genres(torch.rand(N_ITEMS + 1, 2).round())
    grouped, rows = grouped_inputs(7, 3)
    with torch.no_grad():
        want, got = ranker(**rows), ranker.forward_grouped(**grouped)
    for w, g in zip(want, got):
        assert g.shape == (7,) and torch.allclose(w, g, atol=1e-6)


def test_ranker_genre_cross_is_the_history_profile_times_the_candidates_flags():
    ranker = DCNRanker(dcn_config(n_genres=2)).eval()
    flags = torch.zeros(N_ITEMS + 1, 2)
    flags[1] = torch.tensor([1.0, 0.0])
    flags[2] = torch.tensor([1.0, 1.0])
    ranker.set_item_genres(flags)
    # History {1, 2} (one padding slot): profile = ([1, 0] + [1, 1]) / 2 = [1, 0.5]; a candidate with
    # flags [0, 1] crosses to [0, 0.5], summed 0.5.
    recent = torch.tensor([[0, 1, 2]])
    item_num = torch.zeros(1, N_ITEM_NUM)
    item_num[0, :2] = torch.tensor([0.0, 1.0])
    inputs = ranker_inputs(1)
    _, profile = ranker.user_side(inputs["user_idx"], inputs["user_cat"], inputs["user_num"], recent,
                                  inputs["timestamp"])
    assert torch.allclose(profile, torch.tensor([[1.0, 0.5]]))
    assert torch.allclose(ranker.genre_cross(profile, item_num), torch.tensor([[0.0, 0.5, 0.5]]))
    ctr, rating = ranker(**ranker_inputs(6))
    assert ctr.shape == rating.shape == (6,) and torch.isfinite(ctr).all()
    with pytest.raises(ValueError, match=f"n_genres must be <= n_item_num={N_ITEM_NUM}, got {N_ITEM_NUM + 1}"):
        dcn_config(n_genres=N_ITEM_NUM + 1)


def _with_transitions(ranker: DCNRanker) -> DCNRanker:
    """Item 1's successors 2 (weight 3) and 5 (weight 1); item 2's successor 1 (weight 2); the rest none."""
    ids = torch.zeros(N_ITEMS + 1, 3, dtype=torch.int32)
    weights = torch.zeros(N_ITEMS + 1, 3)
    ids[1, :2], weights[1, :2] = torch.tensor([2, 5], dtype=torch.int32), torch.tensor([3.0, 1.0])
    ids[2, 0], weights[2, 0] = 1, 2.0
    history = torch.tensor([[0, 2, 1], [0, 1, 3]])
    ranker.set_transitions(ids, weights, history, torch.tensor([2, 2]))
    return ranker


def test_ranker_transition_channels_read_the_latest_items_successor_lists():
    """Channel l is the candidate's weight in the l-th most recent history item's successor list (0 where it
    is absent or the slot is padding), standardised over the rows set_transitions was given; the channels
    join the wide logit, so a history that ends on another item scores the same candidate otherwise."""
    ranker = _with_transitions(DCNRanker(dcn_config(transition_k=3, transition_items=2)).eval())
    latest = ranker.latest(torch.tensor([[0, 2, 1], [3, 1, 2], [0, 0, 1]]))
    assert latest.tolist() == [[1, 2], [2, 1], [1, 0]]
    raw = ranker.raw_transitions(latest, torch.tensor([2, 2, 5]))
    assert raw.tolist() == [[3.0, 0.0], [0.0, 3.0], [1.0, 0.0]]
    # The two fitting rows, candidate 2 after a history ending (2, 1) -> (3, 0), after (1, 3) -> (0, 3).
    assert torch.allclose(ranker.transition_shift, torch.tensor([1.5, 1.5]))
    assert torch.allclose(ranker.transition_scale, torch.tensor([3.0, 3.0]) / math.sqrt(2))
    assert torch.allclose(ranker.transitions(latest[:1], torch.tensor([2])),
                          (torch.tensor([[3.0, 0.0]]) - ranker.transition_shift) / ranker.transition_scale)
    with torch.no_grad():
        ranker.transition_wide.weight.fill_(1.0)
    inputs = ranker_inputs(2)
    inputs["item_idx"] = torch.tensor([2, 2])
    inputs["history"] = torch.tensor([[0, 0, 0, 4, 3, 1], [0, 0, 0, 4, 1, 3]])   # latest item 1, then 3
    with torch.no_grad():
        inputs = inputs | {name: inputs[name][:1].expand(2, *inputs[name].shape[1:]) for name in
                           ("user_idx", "user_cat", "user_num", "timestamp", "item_cat", "item_num",
                            "retrieval_score")}
        ctr, _ = ranker(**inputs)
    assert ctr[0] - ctr[1] == pytest.approx(3.0 / float(ranker.transition_scale[0]) -
                                            3.0 / float(ranker.transition_scale[1]), abs=1e-4)
    # Given raw values (a fold's lists) replace the lists' weights: the lists' own give the same scores, and
    # swapping the two rows' values swaps their scores.
    raw = ranker.raw_transitions(ranker.latest(inputs["history"]), inputs["item_idx"])
    with torch.no_grad():
        assert torch.allclose(ranker(**inputs, transition_raw=raw)[0], ctr)
        swapped, _ = ranker(**inputs, transition_raw=raw.flip(0))
    assert torch.allclose(swapped, ctr.flip(0), atol=1e-5)


def test_the_grouped_ranker_with_transitions_scores_as_the_aligned_rows_do():
    ranker = _with_transitions(DCNRanker(dcn_config(transition_k=3, transition_items=2, n_genres=2)).eval())
    with torch.no_grad():
        ranker.transition_wide.weight.fill_(0.7)
    grouped, rows = grouped_inputs(9, 4)
    with torch.no_grad():
        want, got = ranker(**rows), ranker.forward_grouped(**grouped)
    for w, g in zip(want, got):
        assert torch.allclose(w, g, atol=1e-6)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"transition_k": 4}, "transition_k and transition_items must be both 0 or both >= 1, got 4 and 0"),
    ({"transition_items": 2}, "transition_k and transition_items must be both 0 or both >= 1, got 0 and 2"),
    ({"transition_k": 4, "transition_items": 21}, "transition_items must be <= recent_items=20, got 21"),
    ({"transition_k": -1, "transition_items": 1}, "transition_k must be an int >= 0, got -1"),
])
def test_ranker_transition_sizes_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        dcn_config(**overrides)
    with pytest.raises(ValueError, match=r"successor ids must have shape \(41, 3\) \(n_items \+ 1, transition_k\), "
                                         r"got \(41, 2\)"):
        DCNRanker(dcn_config(transition_k=3, transition_items=1)).set_transitions(
            torch.zeros(N_ITEMS + 1, 2), torch.zeros(N_ITEMS + 1, 3), torch.zeros(1, 1), torch.zeros(1))
    with pytest.raises(RuntimeError, match="set_transitions on a ranker built with transition_items 0"):
        DCNRanker(dcn_config()).set_transitions(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1),
                                                torch.zeros(1))


def test_padded_mean_is_the_masked_mean_bit_for_bit_gradients_included():
    torch.manual_seed(0)
    table = nn.Embedding(50, 8, padding_idx=0)
    ids = torch.randint(0, 50, (64, 30))
    ids[ids % 3 == 0] = 0                              # padding spread through the rows
    ids[5] = 0                                         # an all-padding row pools to zeros
    pooled = {}
    for name, pool in (("masked", lambda: masked_mean(table(ids), ids != 0)), ("padded", lambda: padded_mean(table, ids))):
        table.zero_grad()
        out = pool()
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        pooled[name] = (out.detach(), table.weight.grad.clone())
    assert torch.equal(pooled["masked"][0], pooled["padded"][0])
    assert torch.equal(pooled["masked"][1], pooled["padded"][1])
    assert torch.equal(pooled["padded"][0][5], torch.zeros(8))


def test_padded_mean_rejects_a_table_whose_row_0_is_not_padding():
    with pytest.raises(ValueError, match="padding_idx 0, got None"):
        padded_mean(nn.Embedding(5, 3), torch.zeros(2, 4, dtype=torch.int64))
