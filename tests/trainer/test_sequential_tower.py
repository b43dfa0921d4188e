"""The sequential user tower: causal reading of the history, same program contract as the pooled
tower (torch.export), and an ONNX export (torch.onnx dynamo) that onnxruntime runs like eager."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch

from tests.trainer.test_models import HISTORY, tower_config, user_inputs
from recsys_contracts.programs import USER_TOWER, load_program
from trainer.export import USER_TOWER_INPUTS, export_user_tower
from trainer.models import build_two_tower
from trainer.models.sequential import SequenceEncoder, SequentialUserTower


def _tower(seed: int = 0, **overrides) -> SequentialUserTower:
    torch.manual_seed(seed)
    tower = build_two_tower(tower_config(user_tower="sequential", sequence_length=6, **overrides)).user_tower
    assert isinstance(tower, SequentialUserTower)
    return tower.eval()


def test_output_is_unit_norm_and_an_empty_history_is_finite():
    tower = _tower()
    inputs = user_inputs(5)
    inputs["history"][0] = 0                               # a user with no history at all
    with torch.no_grad():
        out = tower(**inputs)
    assert out.shape == (5, 8)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-6)


def test_the_newest_item_state_sees_older_items_but_not_padding():
    torch.manual_seed(0)
    encoder = SequenceEncoder(dim=8, length=5, blocks=2, heads=2, dropout=0.0).eval()
    rows = torch.randn(1, 5, 8)
    mask = torch.tensor([[False, True, True, True, True]])
    with torch.no_grad():
        base = encoder(rows, mask)
        changed_pad = rows.clone()
        # Random changes (a constant added to a whole row would vanish in the layer norms anyway).
        changed_pad[0, 0] += 100.0 * torch.randn(8)        # the padding slot's row: must not matter
        changed_old = rows.clone()
        changed_old[0, 1] += torch.randn(8)                # the oldest real item: must matter
        assert torch.equal(encoder(changed_pad, mask), base)
        assert not torch.allclose(encoder(changed_old, mask), base)


def test_a_recorded_item_changes_the_embedding_and_order_matters():
    tower = _tower(1)
    inputs = user_inputs(1, seed=3)
    inputs["history"][0] = torch.tensor([0] * (HISTORY - 3) + [5, 9, 11])
    moved = {k: v.clone() for k, v in inputs.items()}
    moved["history"][0] = torch.tensor([0] * (HISTORY - 4) + [5, 9, 11, 2])   # one interaction recorded
    swapped = {k: v.clone() for k, v in inputs.items()}
    swapped["history"][0] = torch.tensor([0] * (HISTORY - 3) + [9, 5, 11])    # same set, other order
    with torch.no_grad():
        base = tower(**inputs)
        assert not torch.allclose(tower(**moved), base)
        assert not torch.allclose(tower(**swapped), base)


def test_bad_head_count_is_refused():
    with pytest.raises(ValueError, match="embedding_dim must be divisible by sequence_heads=3, got 8"):
        tower_config(user_tower="sequential", sequence_heads=3)
    with pytest.raises(ValueError, match="user_tower must be one of .*, got 'lstm'"):
        tower_config(user_tower="lstm")


@pytest.mark.parametrize("batch", [1, 7])
def test_the_exported_program_equals_eager(tmp_path, batch):
    """Through the trainer's own exporter (its parity check included) and the services' loader."""
    tower = _tower(2)
    export_user_tower(tower, user_inputs(4), tmp_path / "user_tower.onnx", max_batch=64)
    inputs = user_inputs(batch, seed=batch)
    (served,) = load_program(tmp_path / "user_tower.onnx", USER_TOWER)(**{k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        assert np.allclose(served, tower(**inputs).numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def onnx_session(tmp_path_factory):
    tower = _tower(3)
    path = tmp_path_factory.mktemp("onnx") / "user_tower.onnx"
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(tower, (), kwargs=user_inputs(4), f=str(path), dynamo=True,
                      dynamic_shapes={name: {0: batch} for name in USER_TOWER_INPUTS})
    return tower, onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_onnx_dynamo_export_runs_in_onnxruntime_like_eager(onnx_session, batch):
    tower, session = onnx_session
    inputs = user_inputs(batch, seed=10 + batch)
    inputs["history"][0] = 0                               # an empty history among them
    with torch.no_grad():
        expected = tower(**inputs).numpy()
    names = [i.name for i in session.get_inputs()]
    assert sorted(names) == sorted(USER_TOWER_INPUTS)
    (got,) = session.run(None, {name: inputs[name].numpy() for name in names})
    assert got.shape == (batch, 8)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
