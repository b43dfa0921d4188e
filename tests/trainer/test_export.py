"""Exported programs equal the eager modules, reload from disk, and the loader refuses pickled archives."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from tests.trainer.test_models import (HISTORY, _affinity_ranker, dcn_config, item_inputs, ranker_inputs, tower_config,
                                       user_inputs)
from recsys_contracts.programs import CheckedProgram
from trainer.export import (RANKER_INPUTS, USER_TOWER_INPUTS, check_archive, export_ranker, export_user_tower,
                            load_program)
from trainer.models import DCNRanker, build_two_tower

MAX_BATCH = 512


@pytest.fixture(scope="module")
def user_tower_export(tmp_path_factory):
    torch.manual_seed(0)
    tower = build_two_tower(tower_config()).user_tower
    path = tmp_path_factory.mktemp("export") / "user_tower.pt2"
    program = export_user_tower(tower, user_inputs(4), path, max_batch=MAX_BATCH)
    return tower.eval(), program, path


@pytest.fixture(scope="module", params=[("stacked", None, 0), ("parallel", 3, 0), ("stacked", None, 4)],
                ids=["stacked", "parallel-low-rank", "stacked-affinity"])
def ranker_export(request, tmp_path_factory):
    torch.manual_seed(1)
    structure, low_rank, affinity_rank = request.param
    if affinity_rank:
        ranker = _affinity_ranker(affinity_rank, seed=1)
        with torch.no_grad():
            ranker.affinity_wide.weight.fill_(0.7)
            ranker.ctr_head.weight.normal_()   # the deep head counts too (it starts at zero)
    else:
        ranker = DCNRanker(dcn_config(structure=structure, low_rank=low_rank))
    path = tmp_path_factory.mktemp("export") / "ranker.pt2"
    program = export_ranker(ranker, ranker_inputs(5), path, max_batch=MAX_BATCH)
    return ranker.eval(), program, path


@pytest.mark.parametrize("batch", [1, 7, 500])
def test_user_tower_program_equals_eager(user_tower_export, batch):
    tower, program, _ = user_tower_export
    inputs = user_inputs(batch, seed=batch)
    with torch.no_grad():
        assert torch.allclose(program.module()(**inputs), tower(**inputs), atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch", [1, 7, 500])
def test_ranker_program_equals_eager(ranker_export, batch):
    ranker, program, _ = ranker_export
    inputs = ranker_inputs(batch, seed=batch)
    with torch.no_grad():
        for exported, eager in zip(program.module()(**inputs), ranker(**inputs)):
            assert exported.shape == (batch,)
            assert torch.allclose(exported, eager, atol=1e-6, rtol=0)


def test_reloaded_programs_equal_eager(user_tower_export, ranker_export):
    tower, _, tower_path = user_tower_export
    ranker, _, ranker_path = ranker_export
    users, rows = user_inputs(7, seed=11), ranker_inputs(9, seed=12)
    loaded_tower, loaded_ranker = load_program(tower_path), load_program(ranker_path)
    with torch.no_grad():
        assert torch.allclose(loaded_tower(**users), tower(**users), atol=1e-6, rtol=0)
        for loaded, eager in zip(loaded_ranker(**rows), ranker(**rows)):
            assert torch.allclose(loaded, eager, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in loaded_tower.parameters())


def test_history_length_is_fixed_and_batch_is_bounded(user_tower_export):
    _, _, path = user_tower_export
    program = load_program(path)
    longer = user_inputs(3) | {"history": torch.ones(3, HISTORY + 1, dtype=torch.int64)}
    with pytest.raises(ValueError, match=rf"input 'history' must have shape \(N, {HISTORY}\), got \(3, {HISTORY + 1}\)"):
        program(**longer)
    with pytest.raises(ValueError, match=rf"input 'user_idx' dimension N must be in \[1, {MAX_BATCH}\], got {MAX_BATCH + 1}"):
        program(**user_inputs(MAX_BATCH + 1))


@pytest.mark.parametrize("change, message", [
    (lambda x: {k: v for k, v in x.items() if k != "history"}, r"program inputs must be \[.*'history'.*\], got"),
    (lambda x: x | {"extra": torch.ones(3)}, r"program inputs must be .*, got .*'extra'"),
    (lambda x: x | {"user_num": x["user_num"].double()}, r"input 'user_num' must have dtype torch.float32, got torch.float64"),
    (lambda x: x | {"user_idx": x["user_idx"].float()}, r"input 'user_idx' must have dtype torch.int64, got torch.float32"),
    (lambda x: x | {"user_cat": x["user_cat"][:, None]}, r"input 'user_cat' must have shape \(N, \d+\), got \(3, 1, \d+\)"),
    (lambda x: x | {"timestamp": x["timestamp"][:2]}, r"input 'timestamp' dimension N must equal that of 'user_idx' \(3\), got 2"),
    (lambda x: x | {"history": x["history"].tolist()}, r"input 'history' must be a tensor, got list"),
], ids=["missing", "extra", "dtype-float", "dtype-int", "rank", "batch-mismatch", "not-a-tensor"])
def test_loaded_program_checks_its_inputs_by_name(user_tower_export, change, message):
    """Our checks replace torch's per-call sympy guards (too slow to serve with); each names the input."""
    _, _, path = user_tower_export
    with pytest.raises(ValueError, match=message):
        load_program(path)(**change(user_inputs(3)))


def test_checked_program_equals_torch_checked_module_and_keeps_torch_checks_it_cannot_replace(user_tower_export):
    _, program, path = user_tower_export
    inputs = user_inputs(6, seed=3)
    with torch.no_grad():
        assert torch.equal(load_program(path)(**inputs), program.module()(**inputs))

    class Pair(torch.nn.Module):
        def forward(self, a, b):
            return a.sum() + b.sum()

    n = torch.export.Dim("n", min=1, max=64)
    derived = torch.export.export(Pair(), (), {"a": torch.ones(3), "b": torch.ones(6)},
                                  dynamic_shapes={"a": {0: n}, "b": {0: 2 * n}})
    checked = CheckedProgram(derived)
    assert checked.specs is None                 # b's size is an expression: torch's guards stay on
    assert float(checked(a=torch.ones(4), b=torch.ones(8))) == 12.0
    with pytest.raises((RuntimeError, AssertionError), match="b"):   # torch's guard (its wording)
        checked(a=torch.ones(4), b=torch.ones(7))


def test_export_restores_training_mode(tmp_path):
    tower = build_two_tower(tower_config()).user_tower.train()
    export_user_tower(tower, user_inputs(2), tmp_path / "tower.pt2")
    assert tower.training


def test_saved_archive_holds_no_pickle(user_tower_export):
    _, _, path = user_tower_export
    check_archive(path)
    with zipfile.ZipFile(path) as archive:
        sizes = {name.split("/", 1)[1]: archive.getinfo(name).file_size for name in archive.namelist()}
        config_name = next(n for n in archive.namelist() if n.endswith("model_weights_config.json"))
        weights = json.loads(archive.read(config_name))
    assert sizes["data/sample_inputs/model.pt"] == 0
    assert weights["config"] and not any(meta["use_pickle"] for meta in weights["config"].values())


def _rewrite(source: Path, target: Path, change) -> Path:
    """Copies the archive ``source`` to ``target``, passing every (name, bytes) through ``change``."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            for new_name, data in change(name, old.read(name)):
                new.writestr(new_name, data)
    return target


def _mark_first_weight_pickled(name, data):
    if name.endswith("model_weights_config.json"):
        config = json.loads(data)
        first = next(iter(config["config"]))
        config["config"][first]["use_pickle"] = True
        data = json.dumps(config).encode()
    yield name, data


def _add_member(extra):
    def change(name, data):
        yield name, data
        if name.endswith("archive_format"):
            yield name.split("/", 1)[0] + "/" + extra, b"\x7fELF"
    return change


def _non_empty_sample_inputs(name, data):
    yield name, (b"not empty" if name.endswith("sample_inputs/model.pt") else data)


def _second_root(name, data):
    yield name, data
    if name.endswith("archive_format"):
        yield "other/archive_format", data


@pytest.mark.parametrize(("change", "message"), [
    (_mark_first_weight_pickled, "model_weights_config.json must list raw tensors only"),
    (_add_member("data/aotinductor/model/model.so"), "got member '.*data/aotinductor/model/model.so'"),
    (_add_member("data/weights/model.pt"), "got member '.*data/weights/model.pt'"),
    (_non_empty_sample_inputs, "must not hold pickled example inputs"),
    (_second_root, "one root folder"),
], ids=["pickled-weight", "aoti-library", "legacy-weights", "pickled-inputs", "two-roots"])
def test_load_program_refuses_archives_that_would_run_pickles(user_tower_export, tmp_path, change, message):
    _, _, path = user_tower_export
    crafted = _rewrite(path, tmp_path / "crafted.pt2", change)
    with pytest.raises(ValueError, match=message):
        load_program(crafted)


def test_load_program_refuses_a_non_zip(tmp_path):
    path = tmp_path / "junk.pt2"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="path must be a .pt2 zip archive"):
        load_program(path)


@pytest.mark.parametrize(("example", "path", "message"), [
    (lambda: user_inputs(3), "tower.pt", "path must end in .pt2, got '.*tower.pt'"),
    (lambda: {k: v for k, v in user_inputs(3).items() if k != "history"}, "t.pt2", "example keys must be"),
    (lambda: user_inputs(3) | {"retrieval_score": torch.zeros(3)}, "t.pt2", "example keys must be"),
    (lambda: user_inputs(3) | {"timestamp": torch.zeros(4, dtype=torch.int64)}, "t.pt2",
     "example tensors must share their first"),
    (lambda: user_inputs(3) | {"timestamp": torch.tensor(0)}, "t.pt2",
     r"example\['timestamp'\] must be a tensor with a batch dimension"),
    (lambda: user_inputs(1), "t.pt2", r"example batch size must be in \[2, 512\], got 1"),
    (lambda: user_inputs(513), "t.pt2", r"example batch size must be in \[2, 512\], got 513"),
])
def test_export_rejects(tmp_path, example, path, message):
    tower = build_two_tower(tower_config()).user_tower
    with pytest.raises(ValueError, match=message):
        export_user_tower(tower, example(), tmp_path / path, max_batch=MAX_BATCH)


def test_input_names_follow_the_contract():
    assert USER_TOWER_INPUTS == ("user_idx", "user_cat", "user_num", "history", "timestamp")
    assert RANKER_INPUTS == USER_TOWER_INPUTS + ("item_idx", "item_cat", "item_num", "retrieval_score")
    assert set(ranker_inputs(2)) == set(RANKER_INPUTS) and set(item_inputs(2)) < set(RANKER_INPUTS)
