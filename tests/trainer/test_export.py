"""Exported ONNX programs equal the eager modules, reload from disk through the services' loader, check
their inputs, and the loader refuses files that reach outside themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tests.trainer.test_models import (HISTORY, N_ITEMS, _affinity_ranker, dcn_config, grouped_inputs, item_inputs,
                                       ranker_inputs, tower_config, user_inputs)
from recsys_contracts.programs import RANKER, RANKER_ROWS, USER_TOWER, Program, aligned_rows, load_ranker
from trainer.export import (RANKER_INPUTS, RANKER_ROWS_INPUTS, USER_TOWER_INPUTS, ProgramParityError, check_parity,
                            export_ranker, export_ranker_rows, export_user_tower, load_program)
from trainer.models import DCNRanker, build_two_tower

MAX_BATCH = 512


def _numpy(inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: value.numpy() for name, value in inputs.items()}


@pytest.fixture(scope="module")
def user_tower_export(tmp_path_factory):
    torch.manual_seed(0)
    tower = build_two_tower(tower_config()).user_tower
    path = tmp_path_factory.mktemp("export") / "user_tower.onnx"
    export_user_tower(tower, user_inputs(4), path, max_batch=MAX_BATCH)
    return tower.eval(), path


def _transition_ranker(seed: int) -> DCNRanker:
    """A ranker whose transition channels read random successor lists (5 per item) of its 3 latest items,
    with wide weights and a deep head that count."""
    g = torch.Generator().manual_seed(seed)
    ranker = DCNRanker(dcn_config(transition_k=5, transition_items=3, n_genres=2))
    ranker.set_item_genres(torch.rand(N_ITEMS + 1, 2, generator=g).round())
    ids = torch.randint(0, N_ITEMS + 1, (N_ITEMS + 1, 5), generator=g, dtype=torch.int32)
    history = user_inputs(64, seed=seed)["history"]
    ranker.set_transitions(ids, torch.rand(N_ITEMS + 1, 5, generator=g), history,
                           torch.randint(1, N_ITEMS + 1, (64,), generator=g))
    with torch.no_grad():
        ranker.transition_wide.weight.normal_(generator=g)
        ranker.ctr_head.weight.normal_(generator=g)
    return ranker


@pytest.fixture(scope="module", params=[("stacked", None, 0), ("parallel", 3, 0), ("stacked", None, 4),
                                        ("stacked", None, "transitions")],
                ids=["stacked", "parallel-low-rank", "stacked-affinity", "stacked-transitions"])
def ranker_export(request, tmp_path_factory):
    torch.manual_seed(1)
    structure, low_rank, affinity_rank = request.param
    if affinity_rank == "transitions":
        ranker = _transition_ranker(seed=1)
    elif affinity_rank:
        ranker = _affinity_ranker(affinity_rank, seed=1)
        with torch.no_grad():
            ranker.affinity_wide.weight.fill_(0.7)
            ranker.ctr_head.weight.normal_()   # the deep head counts too (it starts at zero)
    else:
        ranker = DCNRanker(dcn_config(structure=structure, low_rank=low_rank))
    path = tmp_path_factory.mktemp("export") / "ranker.onnx"
    ranker.eval()
    export_ranker(ranker, grouped_inputs(8, 3)[0], path, max_batch=MAX_BATCH)
    assert not ranker.training                   # the export leaves the module in the mode it found
    return ranker, path


@pytest.mark.parametrize("batch", [1, 7, 500])
def test_user_tower_program_equals_eager(user_tower_export, batch):
    tower, path = user_tower_export
    inputs = user_inputs(batch, seed=batch)
    (served,) = load_program(path, USER_TOWER)(**_numpy(inputs))
    with torch.no_grad():
        np.testing.assert_allclose(served, tower(**inputs).numpy(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("batch", "users"), [(1, 1), (7, 1), (7, 3), (500, 1), (500, 4)])
def test_ranker_program_equals_eager(ranker_export, batch, users):
    """The grouped program (``users`` user rows, ``batch`` candidates) equals the eager module on the
    same candidates as aligned rows."""
    ranker, path = ranker_export
    grouped, aligned = grouped_inputs(batch, users, seed=batch)
    program = load_ranker(path)
    assert program.signature is RANKER
    served = program(**_numpy(grouped))
    with torch.no_grad():
        for got, eager in zip(served, ranker(**aligned), strict=True):
            assert got.shape == (batch,) and got.dtype == np.float32
            np.testing.assert_allclose(got, eager.numpy(), atol=1e-5, rtol=1e-4)


def test_a_ranker_in_the_earlier_aligned_rows_layout_loads_and_scores_the_same(ranker_export, tmp_path):
    """Versions published before the grouped ranker hold an aligned-rows program (RANKER_ROWS):
    ``load_ranker`` tells it apart, and ``aligned_rows`` of the grouped inputs scores as the grouped one."""
    ranker, grouped_path = ranker_export
    path = tmp_path / "rows.onnx"
    export_ranker_rows(ranker, ranker_inputs(5), path, max_batch=MAX_BATCH)
    rows, grouped = load_ranker(path), load_ranker(grouped_path)
    assert (rows.signature, grouped.signature) == (RANKER_ROWS, RANKER)
    inputs = _numpy(grouped_inputs(9, 2, seed=3)[0])
    for got, want in zip(rows(**aligned_rows(inputs)), grouped(**inputs), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="ranker program inputs must be"):
        load_program(path, RANKER)


def test_the_grouped_ranker_checks_its_two_groups(ranker_export):
    _, path = ranker_export
    program = load_ranker(path)
    inputs = _numpy(grouped_inputs(6, 2)[0])
    with pytest.raises(ValueError, match=r"input 'row_user' must index the 2 user rows, got values in \[0, 2\]"):
        program(**inputs | {"row_user": np.array([0, 1, 2, 0, 1, 0])})
    with pytest.raises(ValueError, match=r"input 'timestamp' users size must be >= 1 and equal across inputs \(2\), got 3"):
        program(**inputs | {"timestamp": np.zeros(3, dtype=np.int64)})
    with pytest.raises(ValueError, match=r"input 'item_num' rows size must be >= 1 and equal across inputs \(6\), got 5"):
        program(**inputs | {"item_num": inputs["item_num"][:5]})


def test_history_length_is_fixed(user_tower_export):
    _, path = user_tower_export
    program = load_program(path, USER_TOWER)
    longer = _numpy(user_inputs(3)) | {"history": np.ones((3, HISTORY + 1), dtype=np.int64)}
    with pytest.raises(ValueError, match=rf"input 'history' must have shape \(batch, {HISTORY}\), got \(3, {HISTORY + 1}\)"):
        program(**longer)


@pytest.mark.parametrize("change, message", [
    (lambda x: {k: v for k, v in x.items() if k != "history"}, r"user tower inputs must be \[.*'history'.*\], got"),
    (lambda x: x | {"extra": np.ones(3)}, r"user tower inputs must be .*, got .*'extra'"),
    (lambda x: x | {"user_num": x["user_num"].astype(np.float64)}, r"input 'user_num' must have dtype float32, got float64"),
    (lambda x: x | {"user_idx": x["user_idx"].astype(np.float32)}, r"input 'user_idx' must have dtype int64, got float32"),
    (lambda x: x | {"user_cat": x["user_cat"][:, None]}, r"input 'user_cat' must have shape \(batch, \d+\), got \(3, 1, \d+\)"),
    (lambda x: x | {"timestamp": x["timestamp"][:2]}, r"input 'timestamp' batch size must be >= 1 and equal across inputs \(3\), got 2"),
    (lambda x: x | {"history": x["history"].tolist()}, r"input 'history' must be a numpy array, got list"),
], ids=["missing", "extra", "dtype-float", "dtype-int", "rank", "batch-mismatch", "not-an-array"])
def test_loaded_program_checks_its_inputs_by_name(user_tower_export, change, message):
    _, path = user_tower_export
    with pytest.raises(ValueError, match=message):
        load_program(path, USER_TOWER)(**change(_numpy(user_inputs(3))))


def test_export_restores_training_mode(tmp_path):
    tower = build_two_tower(tower_config()).user_tower.train()
    export_user_tower(tower, user_inputs(2), tmp_path / "tower.onnx")
    assert tower.training


def test_saved_program_is_self_contained_standard_onnx(user_tower_export):
    _, path = user_tower_export
    model = onnx.load(path)
    assert {opset.domain for opset in model.opset_import} <= {"", "ai.onnx"}
    assert not model.functions
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in model.graph.initializer)
    assert [o.name for o in model.graph.output] == list(USER_TOWER.outputs)


def _crafted(path: Path, target: Path, change) -> Path:
    model = onnx.load(path)
    change(model)
    target.write_bytes(model.SerializeToString())
    return target


def _external_data(model):
    tensor = model.graph.initializer[0]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../../etc/passwd"


def _custom_domain(model):
    model.opset_import.add(domain="com.evil", version=1)
    model.graph.node[0].domain = "com.evil"


def _custom_domain_in_a_node_only(model):
    model.graph.node[-1].domain = "com.microsoft"


def _function(model):
    function = model.functions.add()
    function.name, function.domain = "f", "local"


def _attribute_tensor_external(model):
    node = onnx.helper.make_node("Constant", [], ["c_out"], value=onnx.numpy_helper.from_array(np.ones(2, np.float32)))
    node.attribute[0].t.data_location = onnx.TensorProto.EXTERNAL
    model.graph.node.insert(0, node)


def _renamed_input(model):
    model.graph.input[0].name = "user_index"


def _renamed_output(model):
    model.graph.output[0].name = "other"


@pytest.mark.parametrize(("change", "message"), [
    (_external_data, "keeps its data in an external file"),
    (_custom_domain, "imports operator domain 'com.evil'"),
    (_custom_domain_in_a_node_only, "uses operator domain 'com.microsoft'"),
    (_function, "must not define functions"),
    (_attribute_tensor_external, "keeps its data in an external file"),
    (_renamed_input, "user tower program inputs must be"),
    (_renamed_output, "user tower program outputs must be float32"),
], ids=["external-data", "custom-opset", "contrib-node", "function", "attribute-external", "input-name", "output-name"])
def test_load_program_refuses_files_that_reach_outside_or_break_the_contract(user_tower_export, tmp_path, change,
                                                                             message):
    _, path = user_tower_export
    with pytest.raises(ValueError, match=message):
        load_program(_crafted(path, tmp_path / "crafted.onnx", change), USER_TOWER)


def test_load_program_refuses_the_wrong_kind_and_non_onnx_bytes(user_tower_export, tmp_path):
    _, path = user_tower_export
    with pytest.raises(ValueError, match="ranker program inputs must be"):
        load_program(path, RANKER)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"PK\x03\x04 a zip, not a protobuf \xff\xfe")
    with pytest.raises(ValueError, match="ranker program must be an ONNX model"):
        load_program(junk, RANKER)
    link = tmp_path / "link.onnx"
    link.symlink_to(path)
    with pytest.raises(OSError):
        load_program(link, USER_TOWER)


def test_parity_check_refuses_a_program_that_computes_something_else(user_tower_export, tmp_path):
    tower, path = user_tower_export
    other = build_two_tower(tower_config()).user_tower.eval()        # different random weights
    with pytest.raises(ProgramParityError, match="user tower program output 'user_vector' differs from the eager"):
        check_parity(other, user_inputs(4), path, USER_TOWER)
    check_parity(tower, user_inputs(4), path, USER_TOWER)             # the module it came from passes
    assert isinstance(load_program(path, USER_TOWER), Program)


@pytest.mark.parametrize(("example", "path", "message"), [
    (lambda: user_inputs(3), "tower.pt2", "path must end in .onnx, got '.*tower.pt2'"),
    (lambda: {k: v for k, v in user_inputs(3).items() if k != "history"}, "t.onnx", "example keys must be"),
    (lambda: user_inputs(3) | {"retrieval_score": torch.zeros(3)}, "t.onnx", "example keys must be"),
    (lambda: user_inputs(3) | {"timestamp": torch.zeros(4, dtype=torch.int64)}, "t.onnx",
     "example tensors must share their first"),
    (lambda: user_inputs(3) | {"timestamp": torch.tensor(0)}, "t.onnx",
     r"example\['timestamp'\] must be a tensor with a batch dimension"),
    (lambda: user_inputs(1), "t.onnx", r"example batch size must be in \[2, 512\], got 1"),
    (lambda: user_inputs(513), "t.onnx", r"example batch size must be in \[2, 512\], got 513"),
])
def test_export_rejects(tmp_path, example, path, message):
    tower = build_two_tower(tower_config()).user_tower
    with pytest.raises(ValueError, match=message):
        export_user_tower(tower, example(), tmp_path / path, max_batch=MAX_BATCH)


def test_input_names_follow_the_contract():
    assert USER_TOWER_INPUTS == ("user_idx", "user_cat", "user_num", "history", "timestamp")
    assert RANKER_ROWS_INPUTS == USER_TOWER_INPUTS + ("item_idx", "item_cat", "item_num", "retrieval_score")
    assert RANKER_INPUTS == USER_TOWER_INPUTS + ("row_user", "item_idx", "item_cat", "item_num", "retrieval_score")
    assert set(ranker_inputs(2)) == set(RANKER_ROWS_INPUTS) and set(item_inputs(2)) < set(RANKER_INPUTS)
    assert set(grouped_inputs(3, 2)[0]) == set(RANKER_INPUTS)
    assert [name for name, _ in RANKER.inputs] == list(RANKER_INPUTS)
    assert [name for name, _ in RANKER_ROWS.inputs] == list(RANKER_ROWS_INPUTS)
