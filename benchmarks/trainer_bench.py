"""Trainer speed: the whole job (load -> features -> both models -> evaluation -> export -> index ->
publish) on MovieLens 100K, and optionally on synthetic data at scale; prints the time per stage,
the peak RSS and the index build time, writes bench_results/trainer_bench.json. The wall time and
peak RSS are the trainer process's (synthetic data is generated beforehand, outside them); the peak
RSS is that of its largest process, and ``peak_tree_pss_mb`` the sampled peak of the whole process tree
(the trainer and the workers that train user towers beside it), shared pages counted once.

    .venv/bin/python benchmarks/trainer_bench.py                       # ml-100k
    .venv/bin/python benchmarks/trainer_bench.py --synthetic 1000000 10000000 --set retrieval.epochs=1
    .venv/bin/python benchmarks/trainer_bench.py --synthetic 10000 100000 --synthetic-format 1m \
        --set data.protocol=leave_one_out                              # a MovieLens-1M-layout log, side tables too
    .venv/bin/python benchmarks/trainer_bench.py --item-copies 5       # ml-100k, each item split into 5 copies

The JSON holds NDCG@10 on the test split of the pipeline, the tower, popularity and EASE.
``--baselines`` times ``python -m trainer baselines`` instead (popularity and the EASE l2 grid under
every protocol), the stage that dominated on ~10k-item catalogs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtest.stack import descendant_pids  # noqa: E402


def tree_pss(pid: int) -> int:
    """Bytes of proportional set size of ``pid``'s process tree: the trainer and the workers that train
    towers beside it (``trainer/tower_processes.py``), shared pages counted once."""
    total = 0
    for member in [pid, *descendant_pids(pid)]:
        try:
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def run_trainer(args: list[str], env: dict[str, str], stdout=None) -> tuple[float, int, int]:
    """(wall seconds, peak RSS of the largest process, peak PSS of the whole process tree sampled every
    0.2 s; 0 where /proc has no smaps_rollup)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *args], env=env, cwd=ROOT, stdout=stdout, text=True)
    peak_tree = 0
    while True:
        try:
            proc.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            peak_tree = max(peak_tree, tree_pss(proc.pid))
    if proc.returncode not in (0, 3):
        raise SystemExit(f"trainer failed with exit code {proc.returncode}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss   # Linux: KiB
    return time.perf_counter() - start, peak_kib * 1024, peak_tree


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", nargs=2, type=int, metavar=("ITEMS", "INTERACTIONS"))
    parser.add_argument("--synthetic-format", choices=("parquet", "1m", "latest"), default="parquet",
                        help="how the synthetic log is written: interactions only (parquet) or a MovieLens "
                             "folder with its side tables (users, genres)")
    parser.add_argument("--synthetic-order", type=float, default=0.0, metavar="X",
                        help="plant a time order in the synthetic users' histories (trainer.data.synthetic."
                             "generate's order; 0, the default, leaves them in none)")
    parser.add_argument("--item-copies", type=int, metavar="N",
                        help="MovieLens 100K with each item split at random into N copies (a catalog of rarer "
                             "items, written to a temporary folder: benchmarks/item_copies.py)")
    parser.add_argument("--baselines", action="store_true", help="time `python -m trainer baselines` instead")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "trainer_bench.json"))
    args = parser.parse_args()
    if args.synthetic and args.item_copies:
        parser.error("--synthetic and --item-copies each choose the log: give one of them")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"publish.artifact_root={tmp}/artifacts", f"run.output_dir={tmp}/run", "run.progress=false",
                     "publish.gate=false", *args.overrides]
        given = [o.split("=", 1)[1] for o in args.overrides if o.startswith("data.dataset=")]
        name, generate_s = (given[-1] if given else "ml-100k"), None
        if args.synthetic:
            from trainer.data.synthetic import generate, write_movielens_like

            n_items, n_inter = args.synthetic
            t0 = time.perf_counter()
            dataset = generate(max(1000, n_inter // 20), n_items, n_inter, seed=0, order=args.synthetic_order)
            if args.synthetic_format == "parquet":
                path = Path(tmp) / "synthetic.parquet"
                dataset.interactions.to_parquet(path)
            else:
                path = write_movielens_like(dataset, Path(tmp) / "synthetic", args.synthetic_format)
            name = f"synthetic {n_items} items / {n_inter} interactions" + (
                f", order {args.synthetic_order:g}" if args.synthetic_order else "")
            generate_s = round(time.perf_counter() - t0, 2)
            print(f"generated {name} in {generate_s:.1f} s")
            overrides.append(f"data.dataset={path}")
        if args.item_copies:
            from benchmarks.item_copies import write_item_copies
            from trainer.data import data_dir_from_env

            path = write_item_copies(data_dir_from_env() / "ml-100k", Path(tmp) / "item-copies", args.item_copies)
            name = f"ml-100k, each item split into {args.item_copies} copies"
            overrides.append(f"data.dataset={path}")
        if args.baselines:
            baseline_overrides = [o for o in overrides if o.startswith(("data.", "eval.", "run.threads"))]
            seconds, peak, peak_tree = run_trainer(["baselines", *sum((["--set", o] for o in baseline_overrides), [])],
                                                   env, stdout=subprocess.DEVNULL)
            result = {"command": "baselines", "dataset": name, "wall_s": round(seconds, 2),
                      "peak_rss_mb": round(peak / 2**20, 1), "peak_tree_pss_mb": round(peak_tree / 2**20, 1),
                      "overrides": args.overrides, "cpus": os.cpu_count()}
            return _write(result, Path(args.out))
        seconds, peak, peak_tree = run_trainer(sum((["--set", o] for o in overrides), []), env)
        report = json.loads((Path(tmp) / "run" / "report.json").read_text())
        manifest_dirs = sorted((Path(tmp) / "artifacts" / "versions").iterdir())
        manifest = json.loads((manifest_dirs[-1] / "manifest.json").read_text()) if manifest_dirs else {}
    result = {"dataset": name, "wall_s": round(seconds, 2), "peak_rss_mb": round(peak / 2**20, 1),
              "peak_tree_pss_mb": round(peak_tree / 2**20, 1),
              "stages_s": report["timings"], "index": manifest.get("extra", {}).get("index"),
              "index_seconds": manifest.get("extra", {}).get("index_seconds"),
              "protocol": report["data"]["protocol"], "n_items": report["data"]["n_items"],
              "ndcg@10": {"pipeline": report["pipeline"]["ndcg@10"], "two_tower": report["two_tower"]["ndcg@10"],
                          **({"pipeline_start": report["pipeline_start"]["ndcg@10"]}
                             if report.get("pipeline_start") else {}),
                          **{name: values["ndcg@10"] for name, values in report["baselines"].items()}},
              "paired": report.get("paired"),
              "validation": validation_figures(report.get("histories", {})),
              "user_tower": report.get("user_tower"),
              "ranker": report.get("ranker"),
              "overrides": args.overrides, "cpus": os.cpu_count(), "generate_s": generate_s,
              "device": report.get("device", {"name": "cpu"})}
    return _write(result, Path(args.out))


def validation_figures(histories: dict) -> dict:
    """Validation NDCG@10 from the run's training histories (what defaults are chosen by, never test):
    the tower's best epoch on the validation split, and the pipeline on the ranker's stopping half of
    validation at its start (epoch -1: retrieval's order, or the affinity's fit) and at its kept epoch."""
    out = {}
    retrieval = [r["val_ndcg@10"] for r in histories.get("retrieval", [])]
    if retrieval:
        out["two_tower"] = round(max(retrieval), 4)
        out["two_tower_epochs"] = len(retrieval)
        out["two_tower_by_epoch"] = [round(value, 4) for value in retrieval]
    ranking = histories.get("ranking", [])
    if ranking:
        out["pipeline_start"] = round(ranking[0]["val_ndcg@10"], 4)
        out["pipeline"] = round(max(r["val_ndcg@10"] for r in ranking), 4)
        out["pipeline_by_epoch"] = [round(r["val_ndcg@10"], 4) for r in ranking]
    return out


def _write(result: dict, out: Path) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
