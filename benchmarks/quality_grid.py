"""Quality grid (issue 17's table): datasets x protocols x user towers x EASE help on/off, one
``benchmarks/trainer_bench.py`` run per cell at the current commit, so every figure of the table comes
from one code version and each row carries its own baselines (popularity, EASE) from the same run.

    .venv/bin/python benchmarks/quality_grid.py                       # ml-100k + a ~10k-item synthetic log
    .venv/bin/python benchmarks/quality_grid.py --datasets ml-100k --protocols random --jobs 1
    .venv/bin/python benchmarks/quality_grid.py --datasets synthetic --synthetic-order 8   # a log with an order
    .venv/bin/python benchmarks/quality_grid.py --datasets ml-100k --protocols random --towers validated --seeds 0,1,2,3

Writes bench_results/quality_grid.json (every cell's trainer_bench result) and quality_grid.md (the
table); prints each cell in grid order as the runs finish. ``--jobs 2`` runs two cells at once, each trainer on one
thread (``run.threads=1``): on a 2-core machine the wall times are then those of two jobs sharing it,
comparable within the grid. "EASE help off" = ``retrieval.distill_weight=0`` and ``ranking.affinity=none``.
NDCG@10 on the test split; validation figures (what defaults are chosen by) are in the JSON.

``--seeds``: each cell once per ``run.seed`` (the models' initialisation and sampling; the split's seed,
``data.seed``, stays, so popularity and EASE are the same in every run of a cell). The table then has a row per
run and a second table the spread of each cell's ratios over its seeds (mean, lowest, highest): how far a
ratio moves with the models' own randomness, beside the paired intervals, which give the test users' noise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = ("random", "temporal", "leave_one_out")
TOWERS = ("pooled", "sequential")    # the default grid; "validated" (the trainer's default) may be asked for too
TOWER_CHOICES = (*TOWERS, "autoencoder", "validated")
EASE_OFF = ("retrieval.distill_weight=0", "ranking.affinity=none")
SYNTHETIC = "synthetic"          # the --datasets name of the generated ~10k-item MovieLens-1M-layout log


def synthetic_recipe(order: float = 0.0) -> str:
    """What the results record for the generated log instead of its temporary folder."""
    extra = f", order={order:g}" if order else ""
    return f"trainer.data.synthetic.generate(5000, 10000, 100000, seed=0{extra}), MovieLens-1M layout"


def cell_overrides(protocol: str, tower: str, ease_help: bool) -> list[str]:
    return [f"data.protocol={protocol}", f"retrieval.user_tower={tower}", *(() if ease_help else EASE_OFF)]


def run_cell(dataset: str, dataset_path: str | None, protocol: str, tower: str, ease_help: bool,
             out_dir: Path, threads: int, synthetic_order: float = 0.0, seed: int | None = None) -> dict:
    """One trainer_bench run (``seed``: its ``run.seed``, None = the trainer's default); returns its JSON result
    with the cell's coordinates added."""
    name = f"{dataset}-{protocol}-{tower}-{'ease' if ease_help else 'noease'}" + ("" if seed is None else f"-seed{seed}")
    out = out_dir / f"{name}.json"
    overrides = [f"run.threads={threads}", "publish.unsigned=true", *cell_overrides(protocol, tower, ease_help),
                 *(() if seed is None else (f"run.seed={seed}",))]
    if dataset_path:
        overrides.append(f"data.dataset={dataset_path}")
    argv = [sys.executable, str(ROOT / "benchmarks" / "trainer_bench.py"), "--out", str(out),
            *itertools.chain.from_iterable(("--set", o) for o in overrides)]
    log = out_dir / f"{name}.log"
    with open(log, "w") as handle:
        proc = subprocess.run(argv, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        return {"cell": name, "dataset": dataset, "protocol": protocol, "tower": tower, "ease_help": ease_help,
                "seed": seed, "error": f"exit {proc.returncode}, see {log.name}"}
    result = json.loads(out.read_text())
    # trainer_bench's "dataset" is the path it was given; the grid's name for it comes last and wins,
    # and a generated log is recorded by its recipe, not by the temporary folder it lived in.
    recorded = synthetic_recipe(synthetic_order) if dataset == SYNTHETIC else dataset_path
    return {**{k: v for k, v in result.items() if k != "overrides"}, "dataset_path": recorded,
            "cell": name, "dataset": dataset, "protocol": protocol, "tower": tower, "ease_help": ease_help,
            "seed": seed, "overrides": [f"data.dataset={recorded}" if o.startswith("data.dataset=") else o for o in overrides]}


def table(cells: list[dict]) -> str:
    """A markdown table, one row per cell: baselines, tower, pipeline (x tower, x EASE), the 95 % intervals of
    the pipeline's two ratios over the test users (the run's ``paired`` section), wall, peak RSS."""
    lines = ["| data, protocol | tower | EASE help | popularity | EASE | tower (x EASE) | pipeline (x tower, x EASE) "
             "| 95 % intervals (x tower; x EASE) | wall / peak RSS |", "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        kept = (c.get("user_tower") or {}).get("kept")
        tower_cell = f"{c['tower']} ({kept})" if c["tower"] == "validated" and kept else c["tower"]
        seed = "" if c.get("seed") is None else f", seed {c['seed']}"
        head = _head(f"{c['dataset']}, {c['protocol'].replace('_', '-')}{seed}", tower_cell, c["ease_help"])
        if "error" in c:
            lines.append(f"{head} {c['error']} | | | | | |")
            continue
        ndcg = c["ndcg@10"]
        ease, tower, pipe = ndcg.get("ease", float("nan")), ndcg["two_tower"], ndcg["pipeline"]
        lines.append(f"{head} {ndcg.get('popularity', float('nan')):.4f} | {ease:.4f} | {tower:.4f} ({tower / ease:.3f}) "
                     f"| {pipe:.4f} ({pipe / tower:.3f}, {pipe / ease:.3f}) "
                     f"| {_interval(c, 'pipeline / two_tower')}; {_interval(c, 'pipeline / ease')} "
                     f"| {c['wall_s']:.0f} s / {c['peak_rss_mb'] / 1024:.2f} GB |")
    return "\n".join(lines) + "\n"


# The ratios the seed table spreads: (label, numerator, denominator) of the runs' NDCG@10.
SEED_RATIOS = (("pipeline / EASE", "pipeline", "ease"), ("pipeline / tower", "pipeline", "two_tower"),
               ("tower / EASE", "two_tower", "ease"))


def seed_table(cells: list[dict]) -> str:
    """A markdown table, one row per cell run with more than one seed: the seeds, then each ratio of
    ``SEED_RATIOS`` as "mean (lowest-highest)" over the seeds' runs (failed runs left out, and counted)."""
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["dataset"], c["protocol"], c["tower"], c["ease_help"]), []).append(c)
    lines = ["| data, protocol | tower | EASE help | seeds | " + " | ".join(label for label, _, _ in SEED_RATIOS)
             + " |", "|---|---|---|---|" + "---|" * len(SEED_RATIOS)]
    for (dataset, protocol, tower, ease_help), runs in groups.items():
        if len(runs) < 2:
            continue
        done = [c for c in runs if "error" not in c]
        failed = len(runs) - len(done)
        seeds = ", ".join(str(c["seed"]) for c in done) + (f" ({failed} failed)" if failed else "")
        spreads = []
        for _, num, den in SEED_RATIOS:
            values = [c["ndcg@10"][num] / c["ndcg@10"][den] for c in done
                      if c["ndcg@10"].get(num) is not None and c["ndcg@10"].get(den)]
            spreads.append(f"{sum(values) / len(values):.3f} ({min(values):.3f}-{max(values):.3f})" if values else "-")
        where = f"{dataset}, {protocol.replace('_', '-')}"
        lines.append(f"{_head(where, tower, ease_help)} {seeds} | " + " | ".join(spreads) + " |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def _head(data_protocol: str, tower: str, ease_help: bool) -> str:
    """The first three columns both tables share: "| data, protocol | tower | on |"."""
    return f"| {data_protocol} | {tower} | {'on' if ease_help else 'off'} |"


def _interval(cell: dict, pair: str) -> str:
    """"0.990-1.072": a cell's 95 % interval of one paired ratio; "-" where its run has none."""
    interval = ((cell.get("paired") or {}).get(pair) or {}).get("ratio_95")
    return f"{interval[0]:.3f}-{interval[1]:.3f}" if interval else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=f"ml-100k,{SYNTHETIC}",
                        help=f"comma-separated: data.dataset values, or {SYNTHETIC!r} (10k items, 100k ratings)")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--towers", default=",".join(TOWERS), help=f"comma-separated, among {list(TOWER_CHOICES)}")
    parser.add_argument("--ease-help", default="on,off", help="on, off or on,off")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once (each trainer on --threads)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--synthetic-order", type=float, default=0.0, metavar="X",
                        help="trainer_bench.py's --synthetic-order for the synthetic cells (0: no order)")
    parser.add_argument("--seeds", default="", metavar="S,S,...",
                        help="run.seed values: each cell once per seed, and a table of each ratio's spread over "
                             "them (default: one run at the trainer's own seed)")
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "quality_grid.json"))
    args = parser.parse_args()
    try:
        seeds: list[int | None] = [int(v) for v in args.seeds.split(",")] if args.seeds else [None]
    except ValueError:
        parser.error(f"--seeds: comma-separated integers, got {args.seeds!r}")
    if len(set(seeds)) != len(seeds):
        parser.error(f"--seeds: each seed once, got {args.seeds!r}")
    protocols, towers = args.protocols.split(","), args.towers.split(",")
    for value, allowed, flag in ((protocols, PROTOCOLS, "--protocols"), (towers, TOWER_CHOICES, "--towers")):
        if bad := [v for v in value if v not in allowed]:
            parser.error(f"{flag}: {bad} not among {list(allowed)}")
    ease_options = {"on": True, "off": False}
    if bad := [v for v in args.ease_help.split(",") if v not in ease_options]:
        parser.error(f"--ease-help: {bad} not among ['on', 'off']")
    ease = [ease_options[v] for v in args.ease_help.split(",")]
    out = Path(args.out)
    cells_dir = out.parent / (out.stem + "_cells")
    cells_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        paths: dict[str, str | None] = {}
        for dataset in args.datasets.split(","):
            if dataset == SYNTHETIC:
                sys.path.insert(0, str(ROOT))
                from trainer.data.synthetic import generate, write_movielens_like

                paths[dataset] = str(write_movielens_like(
                    generate(5000, 10000, 100000, seed=0, order=args.synthetic_order), Path(tmp) / "synthetic", "1m"))
            else:
                paths[dataset] = None if dataset == "ml-100k" else dataset
        grid = list(itertools.product(paths, protocols, towers, ease, seeds))
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [pool.submit(run_cell, d, paths[d], p, t, e, cells_dir, args.threads, args.synthetic_order, s)
                       for d, p, t, e, s in grid]
            cells = []
            for future in futures:
                cells.append(future.result())
                print(table(cells[-1:]).splitlines()[-1], flush=True)
    document = {"commit": _commit(), "cpus": os.cpu_count(), "jobs": args.jobs, "threads": args.threads,
                "total_wall_s": round(time.perf_counter() - started, 1), "cells": cells}
    out.write_text(json.dumps(document, indent=1) + "\n")
    text = table(cells) + (f"\nOver the seeds:\n\n{spread}" if (spread := seed_table(cells)) else "")
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0 if all("error" not in c for c in cells) else 1


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
