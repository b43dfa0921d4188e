"""The synthetic log's ceiling: the generator's own score beside popularity and EASE on the same test split.

The ~10k-item synthetic log (``trainer.data.synthetic.generate``) draws each interaction by popularity and
a planted user . item affinity: item i is proposed with its Zipf popularity p_i and wins among 32 proposals
with weight exp(u . v_i / TEMPERATURE), so a user's next item is drawn close to p_i exp(u . v_i / T). That
score, ``log p_i + u . v_i / T`` with the planted vectors, is what no model trained on the log can know
better: the *oracle*. A second reference knows the items exactly (p_i and v_i) but not the users: each
user's u is the MAP estimate of that choice model from the user's training items alone, under a Gaussian
prior whose strength is chosen on the validation split ("known items"): the room a model leaves by
learning the items, apart from what ~20 interactions a user can say about the user. Both are ranked over
the catalog and judged exactly as the trainer judges its models (``trainer.full_ranking``: the protocol's
split, seen items masked, NDCG@10 on the test users), beside popularity and EASE computed in the same run,
so a trained model's figure from the quality grid (whose EASE on the same log and split is the same number)
can be read against the room left above it.

The oracle knows nothing of the planted time order (``--order X``): on such a log it is the best any
order-blind model can do, and a sequential model may pass it.

    .venv/bin/python benchmarks/synthetic_oracle.py                          # the quality grid's log
    .venv/bin/python benchmarks/synthetic_oracle.py --order 8 --grid docs/img/quality_grid_ordered.json

Writes bench_results/synthetic_oracle.json; with ``--grid`` (a quality_grid JSON of the same log) the
table also gives each grid cell's pipeline and tower as a share of the oracle.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer.config import load_config, replace  # noqa: E402
from trainer.data.synthetic import TEMPERATURE, PlantedWorld, generate, planted_world, write_movielens_like  # noqa: E402
from trainer.full_ranking import (EvalTarget, baseline_reports, diversity_vectors, interaction_matrix,  # noqa: E402
                                  list_report, rank_users)
from trainer.prepare import Prepared, load_dataset, prepare  # noqa: E402

PROTOCOLS = ("random", "temporal", "leave_one_out")
GRID_LOG = (5000, 10000, 100000)      # benchmarks/quality_grid.py's synthetic log: users, items, interactions
PRIORS = (1.0, 3.0, 10.0)             # "known items": the Gaussian prior's strength, chosen on validation
FIT_STEPS = 150                       # gradient steps of each user's MAP fit
FIT_RATE = 0.05


def _truth(world: PlantedWorld, prep: Prepared) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The planted truth in the trainer's indices: user vectors (n+1, D; row 0 zeros), item vectors (m, D)
    and log popularity (m,) of item indices 1..m."""
    user_rows = np.asarray(prep.vocab.user_ids[1:], dtype=np.int64) - 1     # user_id "k" is world row k - 1
    item_rows = np.asarray(prep.vocab.item_ids[1:], dtype=np.int64) - 1     # item_id k is world row k - 1
    users = np.zeros((prep.vocab.n_users + 1, world.user_vectors.shape[1]), dtype=np.float32)
    users[1:] = world.user_vectors[user_rows]
    return users, world.item_vectors[item_rows], np.log(world.item_popularity[item_rows]).astype(np.float32)


def choice_scores(user_vectors: np.ndarray, item_vectors: np.ndarray, log_popularity: np.ndarray):
    """A score function (user idx (B,) -> (B, m+1)) of the choice model's log-odds over the trainer's item
    indices: log p_i + u . v_i / TEMPERATURE; the padding index 0 scores -inf."""

    def score(users: np.ndarray) -> np.ndarray:
        scores = np.full((users.size, log_popularity.size + 1), -np.inf, dtype=np.float32)
        scores[:, 1:] = log_popularity + user_vectors[users] @ item_vectors.T / TEMPERATURE
        return scores

    return score


def fit_users(prep: Prepared, item_vectors: np.ndarray, log_popularity: np.ndarray, prior: float,
              batch: int = 1024) -> np.ndarray:
    """Each user's MAP vector (n+1, D) under the known items: maximises sum over the user's training items
    of log softmax(log p + u . V / T) minus ``prior`` |u|^2, by FIT_STEPS steps of gradient ascent (the step
    scaled by the user's count, so light and heavy users converge alike)."""
    n_users, dim = prep.vocab.n_users + 1, item_vectors.shape[1]
    # Sum of each user's training item vectors (an item seen twice counts once, as in the binary matrix).
    pairs = np.unique(prep.train.users.astype(np.int64) * (log_popularity.size + 1) + prep.train.items)
    pair_users, pair_items = pairs // (log_popularity.size + 1), pairs % (log_popularity.size + 1)
    counts = np.bincount(pair_users, minlength=n_users).astype(np.float32)
    seen = np.zeros((n_users, dim), dtype=np.float32)
    np.add.at(seen, pair_users, item_vectors[pair_items - 1])
    fitted = np.zeros((n_users, dim), dtype=np.float32)
    for start in range(1, n_users, batch):
        rows = slice(start, min(start + batch, n_users))
        u, n, s = fitted[rows], counts[rows, None], seen[rows]
        for _ in range(FIT_STEPS):
            logits = log_popularity + u @ item_vectors.T / TEMPERATURE        # (B, m)
            logits -= logits.max(axis=1, keepdims=True)
            np.exp(logits, out=logits)
            logits /= logits.sum(axis=1, keepdims=True)
            gradient = (s - n * (logits @ item_vectors)) / TEMPERATURE - 2.0 * prior * u
            u += FIT_RATE * TEMPERATURE * gradient / np.maximum(n, 1.0)
    return fitted


def protocol_report(world: PlantedWorld, prep: Prepared, ks: tuple[int, ...], grid: tuple[float, ...],
                    search: str) -> dict[str, dict[str, float]]:
    """Popularity, EASE (l2 tuned on validation), the oracle and the known-items fit (its prior tuned on
    validation) on the test split of one protocol."""
    vectors = diversity_vectors(prep.tables, len(prep.spec.item_genres))
    reports = baseline_reports(interaction_matrix(prep.vocab, [prep.split.train]), prep.val, prep.test, ks, grid,
                               vectors, search)
    users, items, log_popularity = _truth(world, prep)

    def judged(score, target: EvalTarget) -> dict[str, float]:
        return list_report(rank_users(score, target, max(ks)), target, ks, vectors)

    reports["oracle"] = judged(choice_scores(users, items, log_popularity), prep.test)
    fits = {prior: fit_users(prep, items, log_popularity, prior) for prior in PRIORS}
    validation = {prior: judged(choice_scores(fit, items, log_popularity), prep.val)["ndcg@10"]
                  for prior, fit in fits.items()}
    prior = max(PRIORS, key=lambda p: (validation[p], -p))
    reports["known_items"] = judged(choice_scores(fits[prior], items, log_popularity), prep.test)
    reports["known_items"]["prior"] = prior
    reports["known_items"]["validation_ndcg@10"] = {str(p): round(v, 4) for p, v in validation.items()}
    return reports


def grid_cells(path: Path | None) -> dict[str, list[dict]]:
    """The synthetic cells of a quality_grid JSON, by protocol."""
    if path is None:
        return {}
    cells: dict[str, list[dict]] = {}
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell"].startswith("synthetic-"):
            cells.setdefault(cell["protocol"], []).append(cell)
    return cells


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", nargs=3, type=int, default=GRID_LOG, metavar=("USERS", "ITEMS", "INTERACTIONS"),
                        help="the generated log's size (default: the quality grid's, %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="generate's seed (the grid's: 0)")
    parser.add_argument("--order", type=float, default=0.0, metavar="X", help="generate's planted time order")
    parser.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    parser.add_argument("--grid", type=Path, help="a quality_grid JSON of the same log: its cells as a share of "
                                                  "the oracle")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "synthetic_oracle.json")
    args = parser.parse_args()
    n_users, n_items, n_interactions = args.log
    cfg = load_config(None, ["run.progress=false"])
    world = planted_world(n_users, n_items, seed=args.seed)
    cells = grid_cells(args.grid)
    result: dict = {"log": {"users": n_users, "items": n_items, "interactions": n_interactions, "seed": args.seed,
                            "order": args.order, "layout": "1m"},
                    "temperature": TEMPERATURE, "protocols": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        # Written and read back as the grid does, so the split (and EASE's figure) is the grid's own.
        path = write_movielens_like(generate(n_users, n_items, n_interactions, seed=args.seed, order=args.order),
                                    Path(tmp) / "synthetic", "1m")
        cfg = replace(cfg, data={"dataset": str(path)})
        dataset = load_dataset(cfg)
        for protocol in args.protocols:
            prep = prepare(replace(cfg, data={"protocol": protocol}), dataset)
            reports = protocol_report(world, prep, cfg.eval.ks, cfg.eval.ease_grid, cfg.eval.ease_search)
            figures = {name: round(values["ndcg@10"], 4) for name, values in reports.items()}
            entry: dict = {"test_users": int(prep.test.users.size), "ndcg@10": figures,
                           "ease_l2": reports.get("ease", {}).get("l2"),
                           "known_items_prior": reports["known_items"]["prior"],
                           "known_items_validation": reports["known_items"]["validation_ndcg@10"]}
            line = (f"{protocol:<14} oracle {figures['oracle']:.4f}  known items {figures['known_items']:.4f} "
                    f"({figures['known_items'] / figures['oracle']:.3f}; prior {reports['known_items']['prior']:g})  "
                    f"EASE {figures.get('ease', float('nan')):.4f} "
                    f"({figures.get('ease', float('nan')) / figures['oracle']:.3f})  "
                    f"popularity {figures['popularity']:.4f} ({figures['popularity'] / figures['oracle']:.3f})")
            entry["grid"] = []
            for cell in cells.get(protocol, []):
                ndcg = cell["ndcg@10"]
                same = abs(ndcg.get("ease", -1) - reports.get("ease", {}).get("ndcg@10", -2)) < 1e-9
                entry["grid"].append({"cell": cell["cell"], "same_split_ease": same,
                                      "pipeline": round(ndcg["pipeline"], 4), "two_tower": round(ndcg["two_tower"], 4),
                                      "pipeline_of_oracle": round(ndcg["pipeline"] / figures["oracle"], 3),
                                      "tower_of_oracle": round(ndcg["two_tower"] / figures["oracle"], 3),
                                      "pipeline_of_known_items": round(ndcg["pipeline"] / figures["known_items"], 3)})
            result["protocols"][protocol] = entry
            print(line)
            for row in entry["grid"]:
                print(f"    {row['cell']:<42} pipeline {row['pipeline']:.4f} ({row['pipeline_of_oracle']:.3f}; "
                      f"{row['pipeline_of_known_items']:.3f} of known items) "
                      f"tower {row['two_tower']:.4f} ({row['tower_of_oracle']:.3f})"
                      + ("" if row["same_split_ease"] else "  [EASE differs: not the same log or split]"))
    result["wall_s"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
