"""Loading a version's serving state: the parts must belong together, and a smoke query must be sane."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from recsys_contracts.ann import IndexParams, build_index, write_index
from retrieval_service.backends import open_backend
from retrieval_service.state import load_state


def test_a_good_version_loads_warm_and_consistent(published):
    root, version = published
    state = load_state(root / "versions" / str(version), version, "cpu", open_backend=open_backend)
    assert (state.version, state.backend, state.dim, state.index.size) == (version, "faiss-cpu", 16, 150)
    assert state.build_recall == 1.0 and state.index_params == IndexParams(kind="flat")
    assert state.items.indices(np.array([state.tables.item_ids[5]])).tolist() == [5]
    assert state.popular_scores.shape == state.tables.popular_items.shape
    assert (np.diff(state.popular_scores) <= 1e-6).all(), "popular items come most popular first"


@pytest.fixture
def copy(published, tmp_path) -> Path:
    """A copy of the published version under a fresh root, for tampering; returns its folder."""
    root, version = published
    target = tmp_path / "versions" / str(version)
    shutil.copytree(root / "versions" / str(version), target)
    return target


def _replace_index(folder: Path, embeddings: np.ndarray, ids: np.ndarray) -> None:
    np.save(folder / "item_embeddings.npy", embeddings, allow_pickle=False)
    write_index(build_index(embeddings[1:], ids, IndexParams(kind="flat")), folder / "index.faiss")


def _refused(folder: Path, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_state(folder, int(folder.name), "cpu")


def test_refuses_item_embeddings_of_another_dimension(copy):
    embeddings = np.load(copy / "item_embeddings.npy")
    np.save(copy / "item_embeddings.npy", np.pad(embeddings, ((0, 0), (0, 1))), allow_pickle=False)
    _refused(copy, "item_embeddings.npy dimension must equal the index dimension 16, got 17")


def test_refuses_a_user_tower_of_another_dimension_than_the_index(copy):
    rng = np.random.default_rng(0)
    _replace_index(copy, rng.normal(size=(151, 8)).astype(np.float32), np.arange(1, 151))
    _refused(copy, "user_tower.onnx must output \\(B, 8\\) like the index, got \\(2, 16\\)")


def test_refuses_an_index_of_another_catalog_size(copy):
    embeddings = np.load(copy / "item_embeddings.npy")
    write_index(build_index(embeddings[1:100], np.arange(1, 100), IndexParams()), copy / "index.faiss")
    _refused(copy, "index.faiss must hold 150 items \\(item_ids.npy\\), got 99")


def test_refuses_an_index_with_ids_outside_the_catalog(copy):
    embeddings = np.load(copy / "item_embeddings.npy")
    write_index(build_index(embeddings[1:], np.arange(1001, 1151), IndexParams()), copy / "index.faiss")
    _refused(copy, "index.faiss smoke query must give finite scores and item indices in \\[1, 150\\]")


def test_refuses_non_finite_item_embeddings(copy):
    embeddings = np.load(copy / "item_embeddings.npy")
    embeddings[3, 0] = np.nan
    np.save(copy / "item_embeddings.npy", embeddings, allow_pickle=False)
    _refused(copy, "item_embeddings.npy must be finite, got NaN or infinity")


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_refuses_a_bad_temperature(copy, temperature):
    serving = json.loads((copy / "serving.json").read_text())
    (copy / "serving.json").write_text(json.dumps({**serving, "temperature": temperature}))
    _refused(copy, f"serving.json temperature must be a finite number > 0, got {temperature!r}")
