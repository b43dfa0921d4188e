"""The test split's context, side by side on the same trained models: each model judged on test with the
training histories alone (``eval.test_context=train``: every figure before the nineteenth session, and the
default under the random protocol) and with each user's validation interactions known too (the history every
model reads and EASE's rows; the default under temporal and leave-one-out).

Under leave-one-out the test item is the interaction right after the validation one; without it the models
were asked to predict two steps ahead of what they were shown. One training run per line; both contexts
evaluate the same towers and ranker (and EASE's l2 is tuned on validation in each). Prints NDCG@10 of the
pipeline, the tower, popularity and EASE and the pipeline / tower and pipeline / EASE ratios in each
context, and writes JSON.

    .venv/bin/python benchmarks/eval_context_bench.py --set data.protocol=leave_one_out
    .venv/bin/python benchmarks/eval_context_bench.py --set data.protocol=temporal \\
        --set retrieval.distill_weight=0 --set ranking.affinity=none        # without EASE help
    .venv/bin/python benchmarks/eval_context_bench.py --synthetic 10000 100000 --synthetic-order 8  # 1M layout
    .venv/bin/python benchmarks/eval_context_bench.py --item-copies 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def headline(report: dict) -> dict:
    """NDCG@10 of each model and the ratios the project's aims are stated in."""
    ndcg = {"pipeline": report["pipeline"]["ndcg@10"], "two_tower": report["two_tower"]["ndcg@10"],
            **{name: values["ndcg@10"] for name, values in report["baselines"].items()}}
    paired = report.get("paired", {})
    return {"ndcg@10": ndcg,
            "pipeline / two_tower": paired.get("pipeline / two_tower"),
            "pipeline / ease": paired.get("pipeline / ease"),
            "two_tower / ease": paired.get("two_tower / ease")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", nargs=2, type=int, metavar=("ITEMS", "INTERACTIONS"))
    parser.add_argument("--synthetic-order", type=float, default=0.0, metavar="X",
                        help="how strongly each user's next item follows the last (trainer.data.synthetic)")
    parser.add_argument("--item-copies", type=int, metavar="N",
                        help="ml-100k with each item split into N copies (benchmarks/item_copies.py): rarer items")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "eval_context_bench.json"))
    args = parser.parse_args()

    import torch

    from trainer.config import load_config, replace
    from trainer.evaluation import evaluate
    from trainer.job import run
    from trainer.prepare import prepare
    from trainer.progress import Timings

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"run.output_dir={tmp}/run", "run.progress=false", "publish.gate=false", *args.overrides]
        name = "ml-100k"
        if args.synthetic:
            from trainer.data.synthetic import generate, write_movielens_like

            n_items, n_inter = args.synthetic
            generated = generate(max(1000, n_inter // 20), n_items, n_inter, seed=0, order=args.synthetic_order)
            # A MovieLens-1M folder with users and genres, as trainer_bench's --synthetic-format 1m.
            overrides.append(f"data.dataset={write_movielens_like(generated, Path(tmp) / 'synthetic', '1m')}")
            name = f"synthetic {n_items} items / {n_inter} interactions" + (
                f", order {args.synthetic_order:g}" if args.synthetic_order else "")
        if args.item_copies:
            from benchmarks.item_copies import write_item_copies
            from trainer.data import data_dir_from_env

            path = write_item_copies(data_dir_from_env() / "ml-100k", Path(tmp) / "item-copies", args.item_copies)
            name = f"ml-100k, each item split into {args.item_copies} copies"
            overrides.append(f"data.dataset={path}")
        cfg = load_config(None, overrides)
        if cfg.eval.test_context == "train":
            parser.error("the bench compares the test context train + validation with train alone")
        cfg = replace(cfg, eval={"test_context": "validation"})
        t0 = time.perf_counter()
        result = run(cfg)
        train_s = time.perf_counter() - t0
        old_cfg = replace(cfg, eval={"test_context": "train"})
        old_prep = prepare(old_cfg, result.prepared.dataset)
        old = evaluate(old_cfg, old_prep, result.run, torch.device("cpu"), Timings())
    out = {"dataset": name, "protocol": cfg.data.protocol, "overrides": args.overrides, "cpus": os.cpu_count(),
           "run_s": round(train_s, 1), "test_users": int(result.prepared.test.users.size),
           "user_tower": result.report.get("user_tower", {}).get("kept") if isinstance(
               result.report.get("user_tower"), dict) else result.report.get("user_tower"),
           "context": {"train": headline(old), "train + validation": headline(result.report)}}
    print(f"{name}, {cfg.data.protocol}, {out['test_users']} test users, run {train_s:.0f} s")
    print(f"  {'test context':<20} {'pipeline':>9} {'tower':>7} {'popular':>8} {'EASE':>7} {'pipe/tower':>11} "
          f"{'pipe/EASE':>10} {'tower/EASE':>11}")
    for context, figures in out["context"].items():
        n = figures["ndcg@10"]

        def ratio(key: str) -> str:
            value = figures[key]
            return f"{value['ratio']:.3f}" if value and value.get("ratio") is not None else "-"
        print(f"  {context:<20} {n['pipeline']:>9.4f} {n['two_tower']:>7.4f} {n['popularity']:>8.4f} "
              f"{n.get('ease', float('nan')):>7.4f} {ratio('pipeline / two_tower'):>11} "
              f"{ratio('pipeline / ease'):>10} {ratio('two_tower / ease'):>11}")
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
