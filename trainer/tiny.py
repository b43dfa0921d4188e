"""Tiny real versions: synthetic data -> features -> untrained (seeded) real models -> a published version.

For tools that need a servable version in seconds (the load harness, benchmarks) and for the test
suite (``tests/factories.py`` signs with the suite's key). The models are the real two-tower and DCN,
exported and published through the real artifact contract; their weights are untrained.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from recsys_contracts.signing import Signer
from trainer.config import load_config
from trainer.data.synthetic import generate
from trainer.features import build_tables, fit_feature_spec, fit_id_vocab
from trainer.item_metadata import DisplaySource
from trainer.models.dcn import DCNConfig, DCNRanker
from trainer.models.two_tower import build_two_tower
from trainer.prepare import interactions
from trainer.publish import TrainedRun, choose_index_params, publish_run
from trainer.ranking_training import load_transitions, transitions_used
from trainer.retrieval_training import tower_config
from trainer.splits import random_split


def tiny_dataset(seed: int = 0, n_users: int = 80, n_items: int = 150, n_interactions: int = 4000):
    return generate(n_users, n_items, n_interactions, seed=seed)


def tiny_run(seed: int = 0, history_length: int = 10, dataset=None, overrides: tuple[str, ...] = ()) -> TrainedRun:
    """Untrained (seeded) real models over a tiny synthetic dataset's features; ``overrides`` are
    ``--set``-style config settings applied after the tiny sizes (e.g. ``retrieval.user_tower=sequential``)."""
    dataset = dataset if dataset is not None else tiny_dataset(seed)
    split = random_split(dataset.interactions, seed=seed)
    vocab = fit_id_vocab(split.train)
    spec = fit_feature_spec(split.train, dataset.users, dataset.items, history_length=history_length)
    tables = build_tables(spec, vocab, split.train, dataset.users, dataset.items)
    cfg = load_config(None, ["retrieval.embedding_dim=16", "retrieval.user_tower_dims=32",
                             "retrieval.item_tower_dims=32", "ranking.deep_dims=32", *overrides])
    torch.manual_seed(seed)
    two_tower = build_two_tower(tower_config(cfg, spec, tables)).eval()
    tc = tower_config(cfg, spec, tables)
    rc, transitions = cfg.ranking, transitions_used(cfg)
    ranker = DCNRanker(DCNConfig(
        n_users=tc.n_users, n_items=tc.n_items, user_cat_cardinalities=tc.user_cat_cardinalities,
        n_user_num=tc.n_user_num, item_cat_cardinalities=tc.item_cat_cardinalities,
        n_item_num=tc.n_item_num, deep_dims=(32,), rating_min=spec.rating_min,
        rating_max=spec.rating_max, transition_k=rc.transitions if transitions else 0,
        transition_items=rc.transition_items if transitions else 0)).eval()
    if transitions:
        # The training log's successor lists, standardised over the training rows, with wide weights of 1 (an
        # untrained ranker's would be 0): the channels then move the order, as a fitted start's do.
        train = interactions(vocab, split.train)
        load_transitions(ranker, rc, (train.users, train.items, train.timestamps), vocab.n_items,
                         tables.history[train.users], train.items)
        with torch.no_grad():
            ranker.transition_wide.weight.fill_(1.0)
    return TrainedRun(spec=spec, tables=tables, two_tower=two_tower, ranker=ranker,
                      display=DisplaySource(dataset.items, split.train))


def publish_tiny_version(root: Path, seed: int = 0, run: TrainedRun | None = None,
                         make_current: bool = True, *, signer: Signer | None) -> int:
    """Publishes ``run`` (default: ``tiny_run(seed)``) signed by ``signer`` (None: unsigned); returns its number."""
    run = run if run is not None else tiny_run(seed)
    params = choose_index_params("flat", run.tables.vocab.n_items, 0)
    return publish_run(Path(root), run, index_params=params, data={"dataset": "synthetic", "seed": seed},
                       config={}, metrics={"ndcg@10": float(np.float32(0.1))}, retain=None,
                       signer=signer, seed=seed, make_current=make_current)
