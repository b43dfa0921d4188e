"""Model program call time, before and after serving moved to ONNX: the same weights run as

- ``torch.export``: the exported program's module (what the old ``.pt2`` loader rebuilt),
- ``torchscript``: a TorchScript trace of that module (the old loader's fast path on the CPU),
- ``onnxruntime``: the ONNX program through ``recsys_contracts.programs`` (what serves now),

for the user tower and the ranker at 1 and 500 rows, one intra-op thread each (the services' setting).
The ranker's three run the aligned-rows layout (every input one row per candidate: ``RANKER_ROWS``,
as served until 2026-12-05); a fourth column, ``onnxruntime_grouped``, runs the grouped program that
serves now (``RANKER``: ONE user row and the candidate rows naming it), same weights, same candidates.
The models have the default trainer config over a catalog of MovieLens 100K's size (943 users, 1,682
items, synthetic log): call time does not depend on what the weights learned. Prints a table and
writes bench_results/program_bench.json. Medians of ``--repeats`` calls after a warm-up, all in one run.

    .venv/bin/python benchmarks/program_bench.py [--transitions]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recsys_contracts.programs import RANKER, RANKER_ROWS, USER_TOWER, load_program  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.data.synthetic import generate  # noqa: E402
from trainer.export import export_ranker, export_ranker_rows, export_user_tower  # noqa: E402
from trainer.features import build_tables, fit_feature_spec, fit_id_vocab  # noqa: E402
from trainer.inputs import item_inputs, user_inputs  # noqa: E402
from trainer.models.dcn import DCNRanker  # noqa: E402
from trainer.models.two_tower import build_two_tower  # noqa: E402
from trainer.ranking_training import dcn_config  # noqa: E402
from trainer.retrieval_training import tower_config  # noqa: E402
from trainer.splits import random_split  # noqa: E402


def models(tower_channels: int = 0, affinity_rank: int | None = None, transitions: bool = False):
    dataset = generate(943, 1682, 100_000, seed=0)
    split = random_split(dataset.interactions, seed=0)
    vocab = fit_id_vocab(split.train)
    cfg = load_config(None, ([] if affinity_rank is None else [f"ranking.affinity_rank={affinity_rank}"])
                      + (["ranking.transition_mode=on"] if transitions else []))
    spec = fit_feature_spec(split.train, dataset.users, dataset.items, history_length=cfg.features.history_length)
    tables = build_tables(spec, vocab, split.train, dataset.users, dataset.items)
    torch.manual_seed(0)
    tower = build_two_tower(tower_config(cfg, spec, tables)).user_tower.eval()
    ranker = DCNRanker(dcn_config(cfg, spec, tables, towers=tower_channels)).eval()
    return spec, tables, tower, ranker


def inputs(tables, rows: int, ranker_history: int | None) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(rows)
    users = rng.integers(1, tables.vocab.n_users + 1, rows)
    out = user_inputs(tables, users, np.full(rows, 1_700_000_000))
    if ranker_history is None:
        return out
    items = rng.integers(1, tables.vocab.n_items + 1, rows)
    return {**out, "history": out["history"][:, -ranker_history:], **item_inputs(tables, items),
            "retrieval_score": torch.as_tensor(rng.normal(size=rows).astype(np.float32))}


def median_ms(call, repeats: int, sync=lambda: None) -> float:
    """Median milliseconds of ``call`` over ``repeats`` after a warm-up; ``sync`` waits for
    asynchronous work (a CUDA stream) before each clock read."""
    for _ in range(max(3, repeats // 10)):
        call()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def measure(name: str, module, example: dict, signature, path: Path, repeats: int) -> list[dict]:
    batch = torch.export.Dim("batch", min=1, max=8192)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(module, (), dict(example), dynamic_shapes={k: {0: batch} for k in example}).module()
        exported.validate_inputs = False      # as the old loader ran it (its own checks replaced torch's guards)
        for parameter in exported.parameters():
            parameter.requires_grad_(False)
        names = list(example)
        positional = torch.jit.trace(lambda *xs: exported(**dict(zip(names, xs))), tuple(example.values()),
                                     check_trace=False)
    (export_user_tower if signature is USER_TOWER else export_ranker_rows)(module, example, path)
    program = load_program(path, signature)
    grouped = None
    if signature is RANKER_ROWS:
        grouped_path = path.with_name("grouped.onnx")
        export_ranker(module, _grouped(example, len(example["user_idx"])), grouped_path)
        grouped = load_program(grouped_path, RANKER)
    rows_out = []
    for rows in (1, 500):
        # one user's request: the user row repeated per candidate (aligned), or given once (grouped)
        x = {k: v[torch.arange(rows) % next(iter(example.values())).shape[0]] for k, v in example.items()}
        if signature is RANKER_ROWS:
            x = {k: (v[:1].expand(rows, *v.shape[1:]).contiguous() if k in USER_KEYS else v) for k, v in x.items()}
        xs, xn = tuple(x.values()), {k: v.numpy() for k, v in x.items()}
        with torch.inference_mode():
            timings = {"torch.export": median_ms(lambda: exported(**x), repeats),
                       "torchscript": median_ms(lambda: positional(*xs), repeats),
                       "onnxruntime": median_ms(lambda: program(**xn), repeats)}
            if grouped is not None:
                xg = {k: v.numpy() for k, v in _grouped(x, 1).items()}
                timings["onnxruntime_grouped"] = median_ms(lambda: grouped(**xg), repeats)
        rows_out.append({"program": name, "rows": rows, **{k: round(v, 4) for k, v in timings.items()},
                         "speedup_vs_torchscript": round(timings["torchscript"] / timings["onnxruntime"], 2),
                         "speedup_vs_export": round(timings["torch.export"] / timings["onnxruntime"], 2)})
        if grouped is not None:
            rows_out[-1]["speedup_grouped_vs_rows"] = round(timings["onnxruntime"] / timings["onnxruntime_grouped"], 2)
    return rows_out


USER_KEYS = ("user_idx", "user_cat", "user_num", "history", "timestamp")


def _grouped(aligned: dict[str, torch.Tensor], users: int) -> dict[str, torch.Tensor]:
    """Aligned rows as grouped inputs: the first ``users`` rows' user inputs, row r naming user r % users."""
    rows = aligned["item_idx"].shape[0]
    return ({k: aligned[k][:users] for k in USER_KEYS} | {"row_user": torch.arange(rows) % users}
            | {k: v for k, v in aligned.items() if k not in USER_KEYS})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "program_bench.json"))
    parser.add_argument("--tower-channels", type=int, default=0,
                        help="the ranker's tower affinity channels beside EASE's two (ranking.tower_affinity: 1 under "
                             "the random protocol, 2 under the ordered ones)")
    parser.add_argument("--transitions", action="store_true",
                        help="also time a ranker with transition channels (ranking.transitions successors per item, "
                             "the 4 latest history items; on by default under the ordered protocols where "
                             "validation keeps them), same weights otherwise, in the same run")
    parser.add_argument("--affinity-rank", type=int, default=None,
                        help="the width of each affinity channel's factors (ranking.affinity_rank, 64, or the larger "
                             "rank the trainer keeps where 64 holds too little of EASE's top 10)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec, tables, tower, ranker = models(args.tower_channels, args.affinity_rank)
    history = min(ranker.recent_items, spec.history_length)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure("user tower", tower, inputs(tables, 64, None), USER_TOWER, Path(tmp) / "t.onnx", args.repeats)
        rows += measure("ranker", ranker, inputs(tables, 64, history), RANKER_ROWS, Path(tmp) / "r.onnx", args.repeats)
        if args.transitions:
            with_transitions = models(args.tower_channels, args.affinity_rank, transitions=True)[3]
            rows += measure("ranker+tr", with_transitions, inputs(tables, 64, history), RANKER_ROWS,
                            Path(tmp) / "rt.onnx", args.repeats)
    print(f"{'program':<11} {'rows':>5} {'torch.export ms':>16} {'torchscript ms':>15} {'onnxruntime ms':>15} "
          f"{'x vs trace':>10} {'x vs export':>11} {'grouped ms':>11} {'x grouped':>10}")
    for r in rows:
        grouped = (f" {r['onnxruntime_grouped']:>11.4f} {r['speedup_grouped_vs_rows']:>10.2f}"
                   if "onnxruntime_grouped" in r else "")
        print(f"{r['program']:<11} {r['rows']:>5} {r['torch.export']:>16.4f} {r['torchscript']:>15.4f} "
              f"{r['onnxruntime']:>15.4f} {r['speedup_vs_torchscript']:>10.2f} {r['speedup_vs_export']:>11.2f}{grouped}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": 1, "repeats": args.repeats, "tower_channels": args.tower_channels,
                               "affinity_channels": ranker.affinity_channels,
                               "affinity_rank": ranker.affinity_rank, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
