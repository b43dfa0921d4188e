"""Index backends behind ``recsys_contracts.ann.Index``: ``search(queries (B, D), k) -> (scores, ids)``.

Every backend returns float32 scores and int64 item indices best first, ``-1`` where fewer than k
items exist, and is held against the exact twin (``recsys_contracts.ann.ExactIndex``) in tests.

- FAISS on CPU (``recsys_contracts.ann.FaissIndex``): flat, IVF or HNSW as the version's manifest says.
- FAISS on GPU (``FaissGpuIndex``): when the installed faiss has GPU support and sees a GPU. IVF and
  flat indexes are cloned to the GPU as they are; HNSW has no GPU implementation, so its stored
  vectors are searched exactly on the GPU (exact is fast there and recall only goes up).
- Exact torch (``TorchExactIndex``): matmul + top-k on any torch device, for CUDA machines whose
  faiss lacks GPU support; on CPU it is the testable twin of that path. The only use of torch in
  serving, so torch is imported when this backend is built, and a CPU image need not carry it.

``open_backend`` picks one for a device.
"""

from __future__ import annotations

import importlib.util

import faiss
import numpy as np

from recsys_contracts.ann import FaissIndex, Index

# FAISS GPU indexes answer at most this many neighbours per query; larger k goes to the CPU index.
GPU_MAX_K = 2048


def _check_queries(queries: np.ndarray, dim: int, k: int) -> np.ndarray:
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must have shape (B, {dim}), got {queries.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    return queries


def _pad(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pads (B, t) results to (B, k) with -inf / -1 when the index holds t < k items."""
    batch, taken = ids.shape
    if taken == k:
        return scores, ids
    out_scores = np.full((batch, k), -np.inf, dtype=np.float32)
    out_ids = np.full((batch, k), -1, dtype=np.int64)
    out_scores[:, :taken], out_ids[:, :taken] = scores, ids
    return out_scores, out_ids


class TorchExactIndex:
    """Exact inner-product search with torch: (B, D) @ (D, n) then top-k, on ``device``."""

    def __init__(self, embeddings: np.ndarray, ids: np.ndarray, device: str = "cpu") -> None:
        import torch   # only this backend needs it (see the module docstring)

        self._torch = torch
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        if embeddings.ndim != 2 or ids.shape != (embeddings.shape[0],):
            raise ValueError(f"embeddings must be (n, D) and ids (n,), got {embeddings.shape} and {ids.shape}")
        self.device = torch.device(device)
        self.embeddings = torch.as_tensor(embeddings, device=self.device)   # (n, D)
        self.ids = ids                                                         # (n,) on the host
        self.size, self.dim = embeddings.shape

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _check_queries(queries, self.dim, k)
        take = min(int(k), self.size)
        if take == 0:
            return _pad(np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64), k)
        torch = self._torch
        with torch.inference_mode():
            scores = torch.as_tensor(queries, device=self.device) @ self.embeddings.T   # (B, n)
            top_scores, top = torch.topk(scores, take, dim=1)                            # (B, take), sorted
        positions = top.cpu().numpy()
        return _pad(top_scores.cpu().numpy().astype(np.float32, copy=False), self.ids[positions], k)


class FaissGpuIndex:
    """A version's FAISS index searched on GPU ``device_id``; ids are translated back on the host."""

    def __init__(self, index: FaissIndex, device_id: int = 0) -> None:
        outer = index.index
        if isinstance(outer, faiss.IndexIDMap):
            inner = faiss.downcast_index(outer.index)
            self.ids = faiss.vector_to_array(outer.id_map).astype(np.int64)   # (n,) position -> item index
        else:
            inner, self.ids = outer, None
        if isinstance(inner, faiss.IndexHNSW):
            inner = faiss.downcast_index(inner.storage)   # the flat vectors under the graph
        self.resources = faiss.StandardGpuResources()
        self.index = faiss.index_cpu_to_gpu(self.resources, device_id, inner)
        if isinstance(inner, faiss.IndexIVF):
            self.index.nprobe = index.params.nprobe
        self.cpu, self.dim, self.size = index, index.dim, index.size

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _check_queries(queries, self.dim, k)
        if k > GPU_MAX_K:
            return self.cpu.search(queries, k)
        scores, positions = self.index.search(queries, min(int(k), self.size))
        positions = positions.astype(np.int64, copy=False)
        ids = positions if self.ids is None else np.where(positions >= 0, self.ids[np.maximum(positions, 0)], -1)
        return _pad(scores.astype(np.float32, copy=False), ids, k)


def gpu_available() -> bool:
    """True when faiss was built with GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def cuda_available() -> bool:
    """True when FAISS sees a GPU, or an installed torch does (for the exact torch backend)."""
    if gpu_available():
        return True
    if importlib.util.find_spec("torch") is None:
        return False
    import torch
    return torch.cuda.is_available()


def resolve_device(device: str) -> str:
    """``auto`` -> "cuda" when a GPU is usable, else "cpu"; ``cuda`` without a GPU is an error."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be one of auto, cpu, cuda, got {device!r}")
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise ValueError(f"device must be 'cpu' or 'auto' on a machine without CUDA, got {device!r}")
    return device


def open_backend(index: FaissIndex, embeddings: np.ndarray, ids: np.ndarray,
                 device: str) -> tuple[str, Index]:
    """The backend for ``device``: FAISS CPU on cpu; on cuda FAISS GPU when possible, else exact torch.

    ``embeddings`` (n, D) with item indices ``ids`` (n,) are the rows the FAISS index holds.
    """
    if not device.startswith("cuda"):
        return "faiss-cpu", index
    if gpu_available():
        return "faiss-gpu", FaissGpuIndex(index, int(device.partition(":")[2] or 0))
    return "torch", TorchExactIndex(embeddings, ids, device)
