"""Both services refuse exactly the same versions: one table of broken bundles, each refused by the
retrieval AND the ranking service's real loader with the same reason.

Every bad version is a copy of a good one with one part broken, published and signed with the test
key, so its signature and checksums pass (``artifacts.verify``) and only the bundle's self-check
(``recsys_contracts.bundle.verify_bundle``) can refuse it.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from ranking_service.state import load_state as load_ranking
from recsys_contracts import artifacts
from recsys_contracts.ann import IndexParams, build_index, write_index
from retrieval_service.backends import open_backend
from retrieval_service.state import load_state as load_retrieval
from tests.factories import publish_tiny_version
from tests.ranking.test_untrusted_versions import publish_copy
from tests.signing_keys import TRUST

pytestmark = pytest.mark.slow


def _truncate(name: str):
    def change(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:len(data) // 2])
    return change


def _embeddings(change_array):
    def change(folder: Path) -> None:
        embeddings = np.load(folder / "item_embeddings.npy")
        np.save(folder / "item_embeddings.npy", change_array(embeddings), allow_pickle=False)
    return change


def _with_nan(embeddings: np.ndarray) -> np.ndarray:
    embeddings = embeddings.copy()
    embeddings[3, 0] = np.nan
    return embeddings


def _index_of_dimension_8(folder: Path) -> None:
    """Item embeddings and index of dimension 8, consistent with each other; the user tower gives 16."""
    embeddings = np.random.default_rng(0).normal(size=(151, 8)).astype(np.float32)
    np.save(folder / "item_embeddings.npy", embeddings, allow_pickle=False)
    write_index(build_index(embeddings[1:], np.arange(1, 151), IndexParams(kind="flat")), folder / "index.faiss")


def _index_over_99_items(folder: Path) -> None:
    embeddings = np.load(folder / "item_embeddings.npy")
    write_index(build_index(embeddings[1:100], np.arange(1, 100), IndexParams(kind="flat")), folder / "index.faiss")


def _pickle_as_index(folder: Path) -> None:
    (folder / "index.faiss").write_bytes(pickle.dumps({"not": "an index"}))


def _serving(**fields):
    def change(folder: Path) -> None:
        serving = json.loads((folder / "serving.json").read_text())
        (folder / "serving.json").write_text(json.dumps({**serving, **fields}))
    return change


def _short_table(folder: Path) -> None:
    np.save(folder / "item_num.npy", np.load(folder / "item_num.npy")[:-1], allow_pickle=False)


BAD_VERSIONS = {
    "truncated ranker.onnx": (_truncate("ranker.onnx"), "ranker program must be an ONNX model"),
    "truncated user_tower.onnx": (_truncate("user_tower.onnx"), "user tower program must be an ONNX model"),
    "item embeddings of dimension 17": (_embeddings(lambda e: np.pad(e, ((0, 0), (0, 1)))),
                                        "item_embeddings.npy dimension must equal the index dimension 16, got 17"),
    "NaN in item embeddings": (_embeddings(_with_nan), "item_embeddings.npy must be finite"),
    "a pickle as index.faiss": (_pickle_as_index, "index.faiss must be a FAISS index"),
    "user tower output 16 against index 8": (_index_of_dimension_8,
                                             r"user_tower.onnx must output \(B, 8\) like the index, got \(2, 16\)"),
    "index over part of the catalog": (_index_over_99_items, r"index.faiss must hold 150 items \(item_ids.npy\)"),
    "temperature 0": (_serving(temperature=0.0), "serving.json temperature must be a finite number > 0"),
    "unknown score mode": (_serving(score_mode="clicks"), "score_mode must be one of"),
    "rating range upside down": (_serving(rating_min=5.0, rating_max=1.0),
                                 "serving.json rating_min must be finite and at most rating_max 1.0, got 5.0"),
    "ranker history longer than the history": (_serving(ranker_history_length=11),
                                                r"ranker_history_length must be an integer in \[1, 10\]"),
    "item table one row short": (_short_table, r"item_num.npy must have shape \(151, "),
    "no ranker": (lambda folder: (folder / "ranker.onnx").unlink(), r"lacks bundle files \['ranker.onnx'\]"),
}

LOADERS = {
    "retrieval": lambda directory, version: load_retrieval(directory, version, "cpu", open_backend=open_backend),
    "ranking": lambda directory, version: load_ranking(directory, version),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bundle-artifacts")
    publish_tiny_version(root, 0)
    return root


@pytest.fixture(scope="module")
def bad_versions(root) -> dict[str, int]:
    """Each broken copy, published and signed with the trusted key (not made current)."""
    return {name: publish_copy(root, 1, change, signed=True) for name, (change, _) in BAD_VERSIONS.items()}


@pytest.mark.parametrize("service", LOADERS)
@pytest.mark.parametrize("case", BAD_VERSIONS)
def test_both_services_refuse_the_same_broken_bundles(root, bad_versions, case, service):
    version = bad_versions[case]
    artifacts.verify(root, version, TRUST)         # signature and checksums pass: only the bundle is bad
    with pytest.raises(ValueError, match=BAD_VERSIONS[case][1]):
        LOADERS[service](artifacts.version_dir(root, version), version)


@pytest.mark.parametrize("service", LOADERS)
def test_both_services_load_the_good_version(root, service):
    assert LOADERS[service](artifacts.version_dir(root, 1), 1).version == 1
