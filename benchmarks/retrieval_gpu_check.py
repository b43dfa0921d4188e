"""GPU check of the retrieval backends: recall@100 against exact search and speed, for a GPU machine.

    python benchmarks/retrieval_gpu_check.py [--items 200000] [--out bench_results/retrieval_gpu_check.json]
    python benchmarks/retrieval_gpu_check.py --device cpu     # dry run of the same code paths on CPU

Runs every GPU path the machine has: the exact torch backend on CUDA (matmul + top-k), and FAISS
GPU (flat, IVF, HNSW-as-flat) when faiss has GPU support; then loads a small published version on
the device through the service's own loader (user tower program moved to the device + the backend
``open_backend`` picks) and times one tower forward + search. Recall is measured against FAISS
flat search on the CPU. Prints a summary and writes JSON; exits 1 if a path misses recall 0.95.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

DIM, K, RECALL_TARGET = 64, 100, 0.95


def clustered(n: int, seed: int) -> np.ndarray:
    """(n, 64) float32 unit vectors around 2000 shared centres (item-embedding-like)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((2000, DIM), dtype=np.float32)
    x = centres[rng.integers(2000, size=n)] + 0.45 * rng.standard_normal((n, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def timed(index, queries: np.ndarray, repeats: int) -> dict[str, float]:
    """Median milliseconds of one query alone and of a batch of 64, after a warm-up call."""
    index.search(queries[:64], K)
    single, batch = [], []
    for i in range(repeats):
        started = time.perf_counter()
        index.search(queries[i:i + 1], K)
        single.append(time.perf_counter() - started)
        started = time.perf_counter()
        index.search(queries[:64], K)
        batch.append(time.perf_counter() - started)
    return {"single_query_ms": 1000 * float(np.median(single)), "batch64_ms": 1000 * float(np.median(batch))}


def backend_rows(device: str, n_items: int, repeats: int) -> list[dict]:
    from recsys_contracts.ann import IndexParams, build_index, recall_against_exact
    from retrieval_service.backends import FaissGpuIndex, TorchExactIndex, gpu_available

    items, queries = clustered(n_items, 1), clustered(max(200, repeats), 2)
    ids = np.arange(1, n_items + 1, dtype=np.int64)
    exact = build_index(items, ids, IndexParams(kind="flat"))   # CPU flat: the reference answers
    rows = [{"backend": "faiss-cpu flat (reference)", **timed(exact, queries, repeats), "recall@100": 1.0}]
    torch_index = TorchExactIndex(items, ids, device)
    rows.append({"backend": f"torch exact on {device}", **timed(torch_index, queries, repeats),
                 "recall@100": recall_against_exact(torch_index, exact, queries[:200], K)})
    if device == "cuda" and gpu_available():
        for params in (IndexParams(kind="flat"), IndexParams(kind="ivf", nlist=1024, nprobe=32),
                       IndexParams(kind="hnsw", hnsw_m=16, ef_construction=40)):
            cpu = build_index(items, ids, params)
            gpu = FaissGpuIndex(cpu)
            rows.append({"backend": f"faiss-gpu {params.kind}", **timed(gpu, queries, repeats),
                         "recall@100": recall_against_exact(gpu, exact, queries[:200], K)})
    else:
        rows.append({"backend": "faiss-gpu", "skipped": "faiss without GPU support or no GPU"})
    return rows


def service_row(device: str) -> dict:
    """A tiny published version loaded by the service's loader on ``device``; one forward + search timed."""
    from retrieval_service.backends import open_backend
    from retrieval_service.batching import run_batch
    from retrieval_service.state import load_state, table_row
    from trainer.tiny import publish_tiny_version

    with tempfile.TemporaryDirectory() as tmp:
        version = publish_tiny_version(Path(tmp), 0, signer=None)   # loaded directly below, not through a holder
        state = load_state(Path(tmp) / "versions" / str(version), version, device,
                           open_backend=open_backend)
        rows = [table_row(state.tables, 1 + i % state.tables.n_users, 1_700_000_000) for i in range(32)]
        run_batch(state, rows, 100)
        result = run_batch(state, rows, 100)
        return {"backend": state.backend, "device": str(state.device), "batch": 32,
                "tower_ms": 1000 * result.tower_s, "search_ms": 1000 * result.search_s,
                "valid_ids": bool(((result.ids >= 1) & (result.ids <= state.tables.n_items)).all())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench_results" / "retrieval_gpu_check.json"))
    args = parser.parse_args(argv)

    import faiss
    import torch

    from retrieval_service.backends import gpu_available

    report = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "faiss": faiss.__version__,
              "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
              "faiss_gpu_support": gpu_available(), "items": args.items, "dim": DIM}
    if args.device == "cuda" and not torch.cuda.is_available():
        report["skipped"] = "torch sees no CUDA device"
    else:
        report["gpu_name"] = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu dry run"
        report["backends"] = backend_rows(args.device, args.items, args.repeats)
        report["service"] = service_row(args.device)
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    misses = [row["backend"] for row in report.get("backends", []) if row.get("recall@100", 1.0) < RECALL_TARGET]
    if misses:
        print(f"recall@100 below {RECALL_TARGET}: {misses}", file=sys.stderr)
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
