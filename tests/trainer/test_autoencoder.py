"""The autoencoder tower (Mult-DAE served as a two-tower model): what its halves compute, that it learns,
that its exported program serves what eager computes, and how the trainer chooses and refuses it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from recsys_contracts import artifacts
from recsys_contracts.programs import USER_TOWER, load_program
from retrieval_service.backends import open_backend
from retrieval_service.state import load_state as load_retrieval
from tests.trainer.test_models import HISTORY, N_ITEMS, item_inputs, user_inputs
from tests.trainer.test_pipeline import small_config
from trainer import job
from trainer.autoencoder_training import multinomial_loss, target_rows
from trainer.config import load_config
from trainer.data.synthetic import generate
from trainer.export import export_user_tower
from trainer.inputs import item_inputs as item_table_inputs, user_inputs as table_inputs
from trainer.models.autoencoder import AutoencoderTwoTower
from trainer.distributed import Distributed
from trainer.prepare import prepare
from trainer.retrieval_training import Interactions, UserItems, user_towers

HIDDEN = 12


def _model(seed: int = 0, dropout: float = 0.5) -> AutoencoderTwoTower:
    torch.manual_seed(seed)
    model = AutoencoderTwoTower(N_ITEMS, HIDDEN, dropout)
    with torch.no_grad():                        # away from the zero start, so every input matters
        model.user_tower.bias.normal_()
        model.item_tower.bias.normal_()
    return model.eval()


def test_the_inner_product_is_the_decoders_logit_of_the_normalised_history():
    model = _model()
    inputs = user_inputs(4)
    inputs["history"][0] = 0                                             # an empty history
    with torch.no_grad():
        users = model.user_tower(**inputs)
        items = model.item_tower(**item_inputs(9))
    assert users.shape == (4, HIDDEN + 1) and items.shape == (9, HIDDEN + 1)
    assert torch.equal(users[:, -1], torch.ones(4))
    table, weight = model.user_tower.history_embedding.weight, model.item_tower.weight
    idx = item_inputs(9)["item_idx"]
    for row in range(4):
        history = inputs["history"][row]
        present = history[history != 0]
        encoded = table[present].sum(dim=0) / max(present.numel(), 1) ** 0.5
        hidden = torch.tanh(encoded + model.user_tower.bias)
        expected = weight[idx] @ hidden + model.item_tower.bias[idx]
        assert torch.allclose(items @ users[row], expected, atol=1e-5)
    assert torch.allclose(users[0, :-1], torch.tanh(model.user_tower.bias), atol=1e-6)   # no history: the bias


def test_the_training_call_gives_every_items_logit():
    """Without item inputs the model returns the logits of the whole catalog: the same numbers as the
    user vectors against every item vector (what the index searches)."""
    model = _model(2)
    inputs = user_inputs(5, seed=6)
    every = torch.arange(N_ITEMS + 1)
    with torch.no_grad():
        users, logits = model(**inputs)
        _, items = model(**inputs, item_idx=every, item_cat=torch.zeros(N_ITEMS + 1, 1, dtype=torch.long),
                         item_num=torch.zeros(N_ITEMS + 1, 0))
    assert logits.shape == (5, N_ITEMS + 1)
    assert torch.allclose(logits, users @ items.T, atol=1e-5)


def test_history_dropout_applies_in_training_only_and_padding_is_ignored():
    model = _model(1)
    inputs = user_inputs(6, seed=2)
    with torch.no_grad():
        served = model.user_tower(**inputs)
        assert torch.equal(model.user_tower(**inputs), served)           # deterministic when serving
        padded = {k: v.clone() for k, v in inputs.items()}
        padded["history"] = torch.cat([torch.zeros(6, 3, dtype=torch.long), padded["history"]], dim=1)
        assert torch.allclose(model.user_tower(**padded), served, atol=1e-6)   # more padding, same vector
        model.train()
        torch.manual_seed(5)
        assert not torch.allclose(model.user_tower(**inputs), served)   # training hides part of the history


def test_multinomial_loss_is_the_negative_log_likelihood_of_the_users_items():
    logits = torch.tensor([[9.0, 0.0, 1.0, 2.0], [9.0, 3.0, 0.0, 0.0]])
    target = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]])   # column 0 is padding: ignored
    expected = -(torch.log_softmax(logits[0, 1:], 0)[[0, 2]].sum() + torch.log_softmax(logits[1, 1:], 0)[1]) / 2
    assert torch.allclose(multinomial_loss(logits, target), expected)


def test_target_rows_are_each_users_training_items():
    train = Interactions(users=np.array([1, 1, 2, 1, 3]), items=np.array([4, 2, 2, 4, 1]),
                         timestamps=np.arange(5), ratings=np.ones(5, dtype=np.float32))
    rows = target_rows(UserItems.from_interactions(train, n_users=3), np.array([3, 1, 2]), 5, torch.device("cpu"))
    expected = torch.zeros(3, 6)
    expected[0, 1] = expected[1, 2] = expected[1, 4] = expected[2, 2] = 1.0     # repeats count once
    assert torch.equal(rows, expected)


def test_the_serving_copy_gathers_the_same_vectors():
    model = _model(4)
    inputs = user_inputs(9, seed=4)
    inputs["history"][1] = 0
    served = model.user_tower.for_serving()
    assert served.gather and not model.user_tower.gather and not served.training
    with torch.no_grad():
        assert torch.allclose(served(**inputs), model.user_tower(**inputs), atol=1e-6)


@pytest.mark.parametrize("batch", [1, 7])
def test_the_exported_program_equals_eager(tmp_path, batch):
    """Through the trainer's own exporter (its parity check included) and the services' loader."""
    model = _model(3)
    export_user_tower(model.user_tower.for_serving(), user_inputs(4), tmp_path / "user_tower.onnx", max_batch=64)
    inputs = user_inputs(batch, seed=batch)
    inputs["history"][0, : HISTORY // 2] = 0
    (served,) = load_program(tmp_path / "user_tower.onnx", USER_TOWER)(**{k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        np.testing.assert_allclose(served, model.user_tower(**inputs).numpy(), atol=1e-5, rtol=0)


def test_bad_autoencoder_settings_are_refused_by_name():
    with pytest.raises(ValueError, match=r"retrieval.autoencoder_dropout must be in \[0, 1\), got 1.0"):
        load_config(None, ["retrieval.autoencoder_dropout=1"])
    with pytest.raises(ValueError, match="retrieval.autoencoder_hidden must be > 0, got 0"):
        load_config(None, ["retrieval.autoencoder_hidden=0"])
    with pytest.raises(ValueError, match=r"retrieval.user_tower must be one of .*'autoencoder'.*, got 'vae'"):
        load_config(None, ["retrieval.user_tower=vae"])


@pytest.fixture(scope="module")
def dataset():
    return generate(150, 120, 6000, seed=4)


def test_the_autoencoder_learns_and_is_served_as_the_runs_tower(tmp_path, dataset):
    """Trained by the whole job: its validation NDCG@10 rises well above its first epoch's, the run ranks
    with it (the report names it), the published user-tower program reproduces its user vectors, and
    the retrieval service's index (inner product over [w_i, b_i]) finds the decoder's top items."""
    out = tmp_path / "run"
    root = tmp_path / "artifacts"
    cfg = small_config(tmp_path, "retrieval.user_tower=autoencoder", "retrieval.autoencoder_hidden=32",
                       "retrieval.epochs=25", f"run.output_dir={out}", f"publish.artifact_root={root}",
                       "publish.gate=false")
    result = job.run(cfg, dataset)
    report = json.loads((out / "report.json").read_text())
    curve = [epoch["val_ndcg@10"] for epoch in report["histories"]["retrieval"]]
    assert max(curve) > 1.5 * curve[0]
    assert report["user_tower"] == {"setting": "autoencoder", "kept": "autoencoder",
                                    "validation_ndcg@10": pytest.approx({"autoencoder": max(curve)}, abs=1e-6)}
    assert isinstance(result.run.two_tower, AutoencoderTwoTower)
    (path,) = root.glob("versions/*/user_tower.onnx")
    program = load_program(path, USER_TOWER)
    tables = result.run.tables
    users = np.arange(1, 9)
    inputs = table_inputs(tables, users, np.zeros(users.size, dtype=np.int64))
    (served,) = program(**{k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        eager = result.run.two_tower.user_tower(**inputs)
        np.testing.assert_allclose(served, eager.numpy(), atol=1e-5, rtol=0)
        logits = eager @ result.run.two_tower.item_tower(**item_table_inputs(tables, np.arange(121))).T
    logits[:, 0] = -np.inf                                                   # the padding item is never indexed
    state = load_retrieval(artifacts.version_dir(root, 1), 1, "cpu", open_backend=open_backend)
    assert state.dim == 32 + 1 and state.temperature == 1.0
    _scores, ids = state.index.search(served, 10)
    assert np.array_equal(ids, torch.topk(logits, 10).indices.numpy())


def test_a_catalog_over_the_bound_is_refused_or_left_to_the_other_towers(tmp_path, dataset):
    cfg = small_config(tmp_path, "retrieval.user_tower=autoencoder", "retrieval.autoencoder_below=50")
    with pytest.raises(ValueError, match=r"retrieval.user_tower=autoencoder: the catalog has \d+ items, over "
                                         r"retrieval.autoencoder_below=50"):
        job.run(cfg, dataset)
    validated = load_config(None, ["retrieval.autoencoder_below=50"])
    assert "autoencoder" not in user_towers(validated, 120)
    assert "autoencoder" in user_towers(validated, 50)


def test_the_joint_mode_refuses_the_autoencoder(tmp_path, dataset):
    cfg = small_config(tmp_path, "retrieval.user_tower=autoencoder", "multitask.mode=joint")
    with pytest.raises(ValueError, match="retrieval.user_tower=autoencoder trains on its own loss"):
        job.run(cfg, dataset)


def test_an_epoch_trains_on_at_most_autoencoder_users_per_epoch(tmp_path, dataset, monkeypatch):
    """The users a step learns from add up to the cap each epoch (a fresh draw), not to the log's users."""
    import trainer.autoencoder_training as training_module

    cfg = small_config(tmp_path, "retrieval.epochs=2", "retrieval.patience=5", "retrieval.autoencoder_batch_size=10",
                       "retrieval.autoencoder_users_per_epoch=25")
    prep = prepare(cfg, dataset)
    assert np.unique(prep.train.users).size > 100
    rows, loss = [], training_module.multinomial_loss
    monkeypatch.setattr(training_module, "multinomial_loss", lambda logits, target: rows.append(len(logits)) or
                        loss(logits, target))
    _, history = training_module.fit_autoencoder(cfg, prep.tables, prep.train, prep.val, prep.eval_timestamps,
                                                 torch.device("cpu"), Distributed())
    assert len(history.epochs) == 2
    assert rows == [10, 10, 5, 10, 10, 5]                          # 25 users an epoch, 10 a step
