"""Every index backend against the exact twin on synthetic clustered data (recall@100 >= 0.95)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys_contracts.ann import ExactIndex, IndexParams, build_index, recall_against_exact
from retrieval_service.backends import (FaissGpuIndex, TorchExactIndex, gpu_available, open_backend,
                                        resolve_device)

N_ITEMS, DIM, N_CLUSTERS = 6000, 32, 40


@pytest.fixture(scope="module")
def clustered():
    """(items (n, D), ids (n,), queries (200, D)): unit vectors around 40 centres, like trained embeddings."""
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(N_CLUSTERS, DIM))
    items = centres[rng.integers(N_CLUSTERS, size=N_ITEMS)] + 0.35 * rng.normal(size=(N_ITEMS, DIM))
    queries = centres[rng.integers(N_CLUSTERS, size=200)] + 0.35 * rng.normal(size=(200, DIM))
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return unit(items), np.arange(1, N_ITEMS + 1, dtype=np.int64), unit(queries)


@pytest.mark.parametrize("params", [IndexParams(kind="flat"), IndexParams(kind="ivf", nlist=64, nprobe=16),
                                    IndexParams(kind="hnsw", hnsw_m=16, ef_construction=80, ef_search=128)],
                         ids=["flat", "ivf", "hnsw"])
def test_faiss_cpu_recall_at_100(clustered, params):
    items, ids, queries = clustered
    index = build_index(items, ids, params)
    name, backend = open_backend(index, items, ids, "cpu")
    assert name == "faiss-cpu" and backend is index
    assert recall_against_exact(backend, ExactIndex(items, ids), queries, k=100) >= 0.95


def test_torch_exact_matches_the_exact_twin(clustered):
    items, ids, queries = clustered
    backend, exact = TorchExactIndex(items, ids), ExactIndex(items, ids)
    assert recall_against_exact(backend, exact, queries, k=100) >= 0.95
    scores, found = backend.search(queries[:3], 100)
    exact_scores, _ = exact.search(queries[:3], 100)
    assert found.dtype == np.int64 and np.allclose(scores, exact_scores, atol=1e-5)


def test_torch_exact_pads_when_k_exceeds_the_catalog():
    items = np.eye(3, dtype=np.float32)
    scores, found = TorchExactIndex(items, np.array([5, 6, 7])).search(np.array([[0, 1, 0]], np.float32), 5)
    assert found[0, 0] == 6 and set(found[0, 1:3].tolist()) == {5, 7}   # 5 and 7 tie at score 0
    assert found[0, 3:].tolist() == [-1, -1] and np.isneginf(scores[0, 3:]).all()


@pytest.mark.parametrize("embeddings, ids, message", [
    (np.zeros((3,), np.float32), np.arange(3), "embeddings must be \\(n, D\\) and ids \\(n,\\)"),
    (np.zeros((3, 2), np.float32), np.arange(4), "embeddings must be \\(n, D\\) and ids \\(n,\\)"),
])
def test_torch_exact_rejects_bad_tables(embeddings, ids, message):
    with pytest.raises(ValueError, match=message):
        TorchExactIndex(embeddings, ids)


@pytest.mark.parametrize("queries, k, message", [
    (np.zeros((1, 3), np.float32), 5, "queries must have shape \\(B, 2\\), got \\(1, 3\\)"),
    (np.zeros((1, 2), np.float32), 0, "k must be an int >= 1, got 0"),
    (np.zeros((1, 2), np.float32), True, "k must be an int >= 1, got True"),
])
def test_torch_exact_rejects_bad_queries(queries, k, message):
    with pytest.raises(ValueError, match=message):
        TorchExactIndex(np.ones((4, 2), np.float32), np.arange(4)).search(queries, k)


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda, got 'tpu'"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_resolve_device_refuses_cuda_without_a_gpu():
    with pytest.raises(ValueError, match="device must be 'cpu' or 'auto' on a machine without CUDA, got 'cuda'"):
        resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_backends_recall(clustered):
    items, ids, queries = clustered
    exact = ExactIndex(items, ids)
    assert recall_against_exact(TorchExactIndex(items, ids, "cuda"), exact, queries, k=100) >= 0.95
    index = build_index(items, ids, IndexParams(kind="ivf", nlist=64, nprobe=16))
    name, backend = open_backend(index, items, ids, "cuda")
    assert name == ("faiss-gpu" if gpu_available() else "torch")
    assert recall_against_exact(backend, exact, queries, k=100) >= 0.95


@pytest.mark.skipif(not gpu_available(), reason="needs faiss with GPU support and a GPU")
@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_faiss_gpu_recall(clustered, kind):
    items, ids, queries = clustered
    index = build_index(items, ids, IndexParams(kind=kind, nlist=64, nprobe=16, hnsw_m=16, ef_construction=80))
    assert recall_against_exact(FaissGpuIndex(index), ExactIndex(items, ids), queries, k=100) >= 0.95
