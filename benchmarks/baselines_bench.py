"""Baselines stage speed: popularity plus the EASE l2 grid (tuned on validation NDCG@10) and the tuned
EASE scored on the test split, old code against new, side by side in one run, on MovieLens 100K and a
synthetic ~10k-item log; prints and writes bench_results/baselines_bench.json.

    .venv/bin/python benchmarks/baselines_bench.py                      # ml-100k + synthetic 10k / 100k
    .venv/bin/python benchmarks/baselines_bench.py --protocol temporal --repeats 3
    .venv/bin/python benchmarks/baselines_bench.py --old-ref 6af3393    # the code to compare against
    .venv/bin/python benchmarks/baselines_bench.py --threads 1          # torch intra-op threads (run.threads)

The old implementation is ``trainer/baselines.py`` at ``--old-ref`` (a git revision; default: the
commit before the one-factorisation grid), loaded from git at run time. Each (dataset, code) pair runs
in its own child process, alternating old and new, so every peak RSS is that code's own: the stage's
wall time and the child's peak RSS (which includes the prepared split, ``rss_before_mb``) are printed.
Datasets are split once by ``trainer.prepare.prepare`` (seed 0), outside the timings. ml-100k is read
from the data directory (``RECSYS_DATA_DIR``) and left out when it is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# trainer/baselines.py before the grid read every l2 from one factorisation of the shifted Gram matrix.
DEFAULT_OLD_REF = "6af3393"


def _load_module(path: Path):
    spec = importlib.util.spec_from_file_location("baselines_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                                 # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024    # Linux: KiB


def child(code_path: Path, prepared: Path, threads: int) -> dict:
    """The baselines stage with the implementation in ``code_path``: returns times, metrics, peak RSS."""
    import numpy as np
    import torch

    if threads > 0:
        torch.set_num_threads(threads)

    from trainer.metrics import ndcg_at_k

    impl = _load_module(code_path)
    data = pickle.loads(prepared.read_bytes())
    m, val, test, grid = data["matrix"], data["val"], data["test"], data["grid"]
    train = impl.SparseMatrix(m.indptr, m.indices, m.values, m.shape)
    rss_before = _rss_mb()

    def test_ndcg(score_fn) -> float:
        ranked = []
        for start in range(0, test.users.size, impl.SCORE_BATCH):
            users = test.users[start:start + impl.SCORE_BATCH]
            scores = np.asarray(score_fn(users), dtype=np.float32)
            scores[:, 0] = -np.inf                                     # item 0 is padding, as in the trainer
            ranked.append(impl.rank_topk(scores, test.exclude_rows(users), 10))
        truth_indptr, truth_items = test.truth
        return ndcg_at_k(np.concatenate(ranked), [truth_items[truth_indptr[u]:truth_indptr[u + 1]]
                                                  for u in test.users], 10)

    t0 = time.perf_counter()
    popularity = test_ndcg(impl.Popularity().fit(train).scores)
    t1 = time.perf_counter()
    search = {"search": data["search"]} if hasattr(impl, "climb_order") else {}    # older code: the whole grid
    best, table = impl.tune_ease_solution(train, val.truth, val.exclude, grid, **search)
    t2 = time.perf_counter()
    ease = test_ndcg(impl.EASE.from_solution(best).scores)
    t3 = time.perf_counter()
    return {"wall_s": round(t3 - t0, 2), "popularity_s": round(t1 - t0, 2), "grid_s": round(t2 - t1, 2),
            "ease_test_s": round(t3 - t2, 2), "rss_before_mb": round(rss_before, 1), "peak_rss_mb": round(_rss_mb(), 1),
            "l2": best.l2, "val_ndcg@10": {str(k): v for k, v in table.items()},
            "test_ndcg@10": {"popularity": popularity, "ease": ease}, "threads": torch.get_num_threads(),
            "search": search.get("search", "grid")}


def prepare(name: str, protocol: str, tmp: Path) -> Path | None:
    """Splits the dataset as the trainer does and pickles what the stage needs; None if it is missing."""
    from trainer import prepare as stages
    from trainer.config import load_config
    from trainer.full_ranking import interaction_matrix

    overrides = ["run.progress=false", f"data.protocol={protocol}"]
    if name.startswith("synthetic"):
        from trainer.data.synthetic import generate

        n_items, n_inter = (int(v) for v in name.split(":")[1:])
        path = tmp / "synthetic.parquet"
        generate(max(1000, n_inter // 20), n_items, n_inter, seed=0).interactions.to_parquet(path)
        overrides.append(f"data.dataset={path}")
    else:
        from trainer.data import data_dir_from_env

        if not (data_dir_from_env() / name).exists():                 # never downloads: left out instead
            print(f"{name}: left out (not in the data directory {data_dir_from_env()})")
            return None
        overrides.append(f"data.dataset={data_dir_from_env() / name}")
    cfg = load_config(None, overrides)
    dataset = stages.load_dataset(cfg)
    prep = stages.prepare(cfg, dataset)
    out = tmp / f"{name.replace(':', '_')}.pkl"
    out.write_bytes(pickle.dumps({"matrix": interaction_matrix(prep.vocab, [prep.split.train]), "val": prep.val,
                                  "test": prep.test, "grid": tuple(cfg.eval.ease_grid),
                                  "search": cfg.eval.ease_search}))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["ml-100k", "synthetic:10000:100000"],
                        help="ml-100k (from the data directory) and/or synthetic:ITEMS:INTERACTIONS")
    parser.add_argument("--protocol", default="random")
    parser.add_argument("--old-ref", default=DEFAULT_OLD_REF, help="git revision of the old trainer/baselines.py")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0: torch's default")
    parser.add_argument("--repeats", type=int, default=1, help="old/new child runs per dataset, alternating")
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "baselines_bench.json"))
    parser.add_argument("--child", nargs=2, metavar=("CODE", "PREPARED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]), args.threads)))
        return 0
    results = {"protocol": args.protocol, "old_ref": args.old_ref, "cpus": os.cpu_count(), "threads": args.threads,
               "load_average_at_start": os.getloadavg(), "datasets": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        old_code = tmp / "old_baselines.py"
        old_code.write_text(subprocess.run(["git", "show", f"{args.old_ref}:trainer/baselines.py"], cwd=ROOT,
                                           check=True, capture_output=True, text=True).stdout)
        codes = {"old": old_code, "new": ROOT / "trainer" / "baselines.py"}
        for name in args.datasets:
            prepared = prepare(name, args.protocol, tmp)
            if prepared is None:
                continue
            runs: dict[str, list[dict]] = {"old": [], "new": []}
            for _ in range(args.repeats):
                for label, code in codes.items():
                    proc = subprocess.run([sys.executable, __file__, "--child", str(code), str(prepared),
                                           "--threads", str(args.threads)],
                                          cwd=ROOT, capture_output=True, text=True,
                                          env={**os.environ, "PYTHONPATH": str(ROOT)})
                    if proc.returncode != 0:
                        raise SystemExit(f"{name} {label} failed:\n{proc.stderr}")
                    run = json.loads(proc.stdout.strip().splitlines()[-1])
                    runs[label].append(run)
                    print(f"{name:<24} {label}: {run['wall_s']:7.2f} s (grid {run['grid_s']:.2f} s), peak RSS "
                          f"{run['peak_rss_mb']:.0f} MB (before {run['rss_before_mb']:.0f}), l2 {run['l2']:g}, "
                          f"test NDCG@10 EASE {run['test_ndcg@10']['ease']:.4f}", flush=True)
            best = {label: min(r["wall_s"] for r in rs) for label, rs in runs.items()}
            results["datasets"][name] = {"runs": runs, "best_wall_s": best,
                                         "speedup": round(best["old"] / best["new"], 2)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({name: {k: v for k, v in d.items() if k != "runs"} for name, d in results["datasets"].items()},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
