"""What the command line prints: the run summary, sample recommendations, the baseline tables."""

from __future__ import annotations

import numpy as np
import torch

from trainer.config import TrainConfig, replace
from trainer.evaluation import retrieve, context_rows_for_test
from trainer.full_ranking import baseline_reports, diversity_vectors, interaction_matrix
from trainer.prepare import load_dataset, prepare
from trainer.ranking_training import rerank, score_candidates
from trainer.report import markdown
from trainer.splits import PROTOCOLS


def _titles(dataset) -> dict[int, str]:
    if dataset.items is None or "title" not in dataset.items:
        return {}
    return dict(zip(dataset.items["item_id"].astype(int), dataset.items["title"].astype(str)))


def sample_recommendations(result, show_users: int, k: int = 5) -> str:
    prep, run = result.prepared, result.run
    users = prep.test.users[:show_users]
    if users.size == 0:
        return ""
    cands = retrieve(run.two_tower, prep.test_tables, users, prep.test, 500, prep.test_timestamps,
                     torch.device("cpu"))
    scores, ctr, rating = score_candidates(run.ranker, prep.test_tables, cands, prep.test_timestamps[users],
                                           run.score_mode, run.rating_weight, prep.spec.rating_max,
                                           torch.device("cpu"))
    ranked = rerank(cands, scores, k)
    titles = _titles(prep.dataset)
    lines = ["", "Sample recommendations (test users, seen items excluded):"]
    for row, user in enumerate(users):
        lines.append(f"  user {prep.vocab.user_ids[user]}:")
        for item in ranked[row]:
            if item <= 0:
                continue
            col = int(np.flatnonzero(cands.items[row] == item)[0])
            external = int(prep.vocab.item_ids[item])
            lines.append(f"    {titles.get(external, external)!s:<50.50} score {scores[row, col]:.3f}  "
                         f"rating {rating[row, col]:.2f}")
    return "\n".join(lines)


def summary(result, show_users: int = 3) -> str:
    text = markdown(result.report)
    if result.version is not None:
        text += f"\nPublished version {result.version}.\n"
    elif result.refused:
        text += f"\nNOT published: {result.refused}\n"
    return text + sample_recommendations(result, show_users)


def baselines_table(cfg: TrainConfig) -> str:
    """Dataset report and popularity / EASE on the test split, under every protocol."""
    dataset = load_dataset(cfg)
    lines = [dataset.report.summary(), ""]
    for protocol in PROTOCOLS:
        prep = prepare(replace(cfg, data={"protocol": protocol}), dataset)
        vectors = diversity_vectors(prep.tables, len(prep.spec.item_genres))
        reports = baseline_reports(interaction_matrix(prep.vocab, [prep.split.train]), prep.val, prep.test,
                                   cfg.eval.ks, cfg.eval.ease_grid, vectors, cfg.eval.ease_search,
                                   test_context=context_rows_for_test(prep))
        lines.append(f"Protocol {protocol} (seed {cfg.data.seed}), test split, {prep.test.users.size} users:")
        lines.append(f"  {'model':<12} {'recall@10':>10} {'ndcg@10':>10} {'precision@10':>13} "
                     f"{'map@10':>8} {'mrr@10':>8} {'hit@10':>8} {'recall@20':>10} {'ndcg@20':>9}")
        for name, values in reports.items():
            label = f"{name} (l2={values['l2']:g})" if "l2" in values else name
            lines.append(f"  {label:<12} {values['recall@10']:>10.4f} {values['ndcg@10']:>10.4f} "
                         f"{values['precision@10']:>13.4f} {values['map@10']:>8.4f} {values['mrr@10']:>8.4f} "
                         f"{values['hit@10']:>8.4f} {values['recall@20']:>10.4f} {values['ndcg@20']:>9.4f}")
        lines.append("")
    return "\n".join(lines)
