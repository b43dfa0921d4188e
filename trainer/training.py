"""The training stage of a run: both models fitted on a ``Prepared`` run, by ``multitask.mode``.

``train_models`` runs the separate mode (the two-tower, then the DCN on its candidate lists: fitted
on one half of the validation interactions, early-stopped on the other, plus training-log folds)
or the joint mode (``trainer.joint_training``), under deterministic CPU kernels, and returns a
``TrainedRun`` with the display data the published version carries. The loops themselves are
``trainer.retrieval_training``, ``trainer.ranking_training`` and ``trainer.joint_training``.
Nothing here evaluates on the test split, gates or publishes.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch

from trainer.autoencoder_training import fit_autoencoder
from trainer.checkpoint import Checkpointer
from trainer.config import TrainConfig, replace as replace_config
from trainer.data import DataError
from trainer.distributed import Distributed
from trainer.evaluation import retrieve
from trainer.features import IdVocab, temporal_features, with_known_rows
from trainer.full_ranking import EvalTarget, make_target, sample_users
from trainer.item_metadata import DisplaySource
from trainer.joint_training import fit_joint
from trainer.models.dcn import DCNConfig
from trainer.prepare import Prepared, held_out
from trainer.progress import Timings
from trainer.publish import TrainedRun
from trainer.ranking_training import (Candidates, Rows, affinity_channels, affinity_rank, click_rows, fit_ranker,
                                      fold_rows)
from trainer.tower_affinity import TowerChannels, tower_channels
from trainer.retrieval_training import (UserItems, autoencoder_fits, fit_retrieval, item_embeddings, user_embeddings,
                                       user_towers)
from trainer.splits import DEFAULT_RATIOS
from trainer.tower_processes import fit_side_by_side, tower_workers

log = logging.getLogger(__name__)


@contextmanager
def deterministic_kernels(device: torch.device):
    """Deterministic torch kernels while training on CPU (the previous setting is restored after).

    With several intra-op threads some accumulating backward kernels add in a varying order, so
    two seeded runs drifted apart in the last bits; the deterministic ones give the 1-thread result.
    """
    if device.type != "cpu":
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def train_models(cfg: TrainConfig, prep: Prepared, device: torch.device, ctx: Distributed,
                 timings: Timings) -> tuple[TrainedRun, dict[str, Any]]:
    with deterministic_kernels(device):
        run, histories = _train_models(cfg, prep, device, ctx, timings)
    # The models learnt from train; a published version serves users knowing every interaction of the log (their
    # histories, the seen items it leaves out, the recent history it displays), not the 80 % of it they trained on.
    tables, known = with_known_rows(prep.tables, prep.dataset.interactions)
    return replace(run, tables=tables, display=DisplaySource(prep.dataset.items, known)), histories


def _trained_run(cfg: TrainConfig, prep: Prepared, two_tower, ranker) -> TrainedRun:
    return TrainedRun(spec=prep.spec, tables=prep.tables, two_tower=two_tower.cpu().eval(),
                      ranker=ranker.cpu().eval(), score_mode=cfg.ranking.score_mode,
                      rating_weight=cfg.multitask.rating_weight if cfg.ranking.score_mode == "ctr_x_rating" else 0.0)


def _train_models(cfg: TrainConfig, prep: Prepared, device: torch.device, ctx: Distributed,
                  timings: Timings) -> tuple[TrainedRun, dict[str, Any]]:
    checkpointer = Checkpointer(cfg.run.checkpoint_dir) if cfg.run.checkpoint_dir else None
    if cfg.multitask.mode == "joint":
        if cfg.retrieval.user_tower == "autoencoder":
            raise ValueError("retrieval.user_tower=autoencoder trains on its own loss (the separate mode); "
                             "multitask.mode=joint trains the pooled or sequential tower with the DCN")
        return _train_jointly(cfg, prep, device, ctx, timings)
    with timings.stage("retrieval_training"):
        two_tower, retrieval_history, tower_choice, others, not_kept = _fit_towers(cfg, prep, device, ctx, checkpointer)
    histories = {"retrieval": retrieval_history.epochs, **others}
    with timings.stage("ranking_training"):
        fit_frame, stop_frame = _halves(prep.vocab, prep.split.val, cfg.run.seed)
        stop_target = sample_users(make_target(prep.vocab, stop_frame, [prep.split.train, fit_frame]),
                                   cfg.eval.max_users, cfg.run.seed + 2)
        fit_pos = held_out(prep.vocab, fit_frame)
        if stop_target.users.size == 0 or fit_pos[0].size == 0:
            raise DataError(f"{prep.dataset.name}: its {len(prep.split.val)} validation interaction(s) leave "
                            f"{fit_pos[0].size} to fit the ranker on and {stop_target.users.size} user(s) to stop "
                            "it on; a larger log is needed")
        if cfg.eval.max_users:
            fit_pos = tuple(a[np.isin(fit_pos[0], prep.val.users)] for a in fit_pos)
        wanted = np.union1d(np.unique(fit_pos[0]), stop_target.users)
        candidates = retrieve(two_tower, prep.tables, wanted, prep.val, cfg.ranking.candidates,
                              prep.eval_timestamps, device)
        rng = np.random.default_rng(cfg.run.seed)
        fit_rows = click_rows(fit_pos, candidates, cfg.ranking.negatives_per_positive, rng,
                              cfg.ranking.negative_pool)
        stop_candidates = retrieve(two_tower, prep.tables, stop_target.users, stop_target,
                                   cfg.ranking.candidates, prep.eval_timestamps, device)
        rank, ease_factors, rank_choice = affinity_rank(cfg, prep.tables, _rating_rows(prep),
                                                        towers=len(not_kept) if _towers_wanted(cfg) else 0)
        cfg = replace_config(cfg, ranking={"affinity_rank": rank})
        channels = _tower_channels(cfg, prep, not_kept, device)
        if channels is not None:
            tower_choice = {**tower_choice, "ranker_channels": list(channels.names)}
        kept = None
        # One ranker per fold order tried (one unless ranking.fold_order is "validated"), each from the
        # same random state; the first of the best stopping-half NDCG@10 is kept.
        for recent_share in _fold_recent_shares(cfg):
            order_rng = copy.deepcopy(rng)
            folds = None
            if cfg.ranking.folds:
                folds = fold_rows(two_tower, prep.tables, UserItems.from_interactions(prep.train, prep.vocab.n_users),
                                  prep.eval_timestamps, cfg.ranking, DCNConfig.recent_items, order_rng, device,
                                  recent_share=recent_share, channels=channels)
                log.info("ranker examples: %d from the validation fitting half, %d from %d training-log folds "
                         "(%s)", fit_rows.users.size, 0 if folds is None else folds.rows.users.size, cfg.ranking.folds,
                         "random" if recent_share is False else "recent")
            ranker, ranking_history = fit_ranker(cfg, prep.spec, prep.tables, fit_rows, _rating_rows(prep),
                                                 stop_candidates, stop_target, prep.eval_timestamps, device, ctx,
                                                 rating_scores=_retrieval_scorer(two_tower, prep, device),
                                                 folds=folds, channels=channels, ease_factors=ease_factors)
            if kept is not None:
                log.info("fold order by validation: stopping-half NDCG@10 %.4f random, %.4f recent; kept %s",
                         kept[1].best_score, ranking_history.best_score,
                         "recent" if ranking_history.best_score > kept[1].best_score else "random")
            if kept is None or ranking_history.best_score > kept[1].best_score:
                kept = (ranker, ranking_history)
        ranker, ranking_history = kept
    histories["ranking"] = ranking_history.epochs
    ranker_choice = {"kept": "start" if ranking_history.best_epoch < 0 else f"epoch {ranking_history.best_epoch}"}
    if ranking_history.epochs and ranking_history.epochs[0].get("starts"):
        ranker_choice["start"] = ranking_history.epochs[0]["starts"]
    if ranking_history.epochs and ranking_history.epochs[0].get("transitions"):
        ranker_choice["transitions"] = ranking_history.epochs[0]["transitions"]
    if rank_choice is not None:
        ranker_choice["affinity_rank"] = rank_choice
    return (replace(_trained_run(cfg, prep, two_tower, ranker), tower_choice=tower_choice, ranker_choice=ranker_choice,
                    ranker_start=_ranker_start(ranker, ranking_history.start_parameters)), histories)


def _ranker_start(ranker, start_parameters: dict | None):
    """The kept ranker with its start's parameters (eval mode, on the CPU), for the report to score beside it;
    None where the start is the kept ranker."""
    if start_parameters is None:
        return None
    start = copy.deepcopy(ranker).cpu().eval()
    with torch.no_grad():
        for name, value in start.named_parameters():
            value.copy_(start_parameters[name])
    return start


def _fit_towers(cfg: TrainConfig, prep: Prepared, device: torch.device, ctx: Distributed,
                checkpointer: Checkpointer | None):
    """The two-tower of each of ``user_towers(cfg)``, each trained as that setting alone trains it; the one
    with the highest validation NDCG@10 is kept (the first on a tie). Returns it, its history, the choice
    (setting, kept tower, each tower's best validation NDCG@10), the other towers' histories by
    "retrieval_<tower>" and the other towers as (name, model)."""
    names = user_towers(cfg, prep.vocab.n_items)
    if names == ("autoencoder",) and not autoencoder_fits(cfg, prep.vocab.n_items):
        raise ValueError(f"retrieval.user_tower=autoencoder: the catalog has {prep.vocab.n_items:,} items, over "
                         f"retrieval.autoencoder_below={cfg.retrieval.autoencoder_below:,} (its softmax spans the "
                         "catalog); raise that bound or choose the pooled or validated tower")
    calls = []
    for name in names:
        tower_cfg = cfg if name == names[0] else replace_config(cfg, retrieval={"user_tower": name})
        stage = "retrieval" if name == names[0] else f"retrieval_{name}"
        fit = (partial(fit_autoencoder, tower_cfg) if name == "autoencoder"
               else partial(fit_retrieval, tower_cfg, prep.spec))
        calls.append((fit, (prep.tables, prep.train, prep.val, prep.eval_timestamps, device, ctx, checkpointer),
                      {"stage": stage}))
    workers = tower_workers(cfg, names, prep.vocab.n_users, prep.vocab.n_items, device, ctx)
    if workers > 1:
        log.info("user towers %s trained side by side in %d processes", ", ".join(names), workers)
    fits = [(name, *fitted) for name, fitted in zip(names, fit_side_by_side(calls, workers))]
    kept = max(range(len(fits)), key=lambda i: (fits[i][2].best_score, -i))
    name, model, history = fits[kept]
    scores = {n: round(float(h.best_score), 6) for n, _, h in fits}
    if len(fits) > 1:
        log.info("user tower by validation: NDCG@10 %s; kept %s",
                 ", ".join(f"{n} {score:.4f}" for n, score in scores.items()), name)
    choice = {"setting": cfg.retrieval.user_tower, "kept": name, "validation_ndcg@10": scores}
    others = {f"retrieval_{n}": h.epochs for i, (n, _, h) in enumerate(fits) if i != kept}
    return model, history, choice, others, [(n, m) for i, (n, m, _) in enumerate(fits) if i != kept]


def _towers_wanted(cfg: TrainConfig) -> bool:
    """Whether ``ranking.tower_affinity`` asks for the tower channels under this run's protocol."""
    return cfg.ranking.tower_affinity == "on" or (cfg.ranking.tower_affinity == "auto" and cfg.data.protocol == "random")


def _tower_channels(cfg: TrainConfig, prep: Prepared, towers: list[tuple[str, Any]],
                    device: torch.device) -> TowerChannels | None:
    """The towers not kept as the ranker's affinity channels (``ranking.tower_affinity``: "on", or "auto" under
    the random protocol), where there are some and their tables fit (``affinity_channels``; a warning where
    they do not; EASE's channels are warned about once, where the ranker is shaped)."""
    if not (_towers_wanted(cfg) and towers):
        return None
    if not affinity_channels(cfg, prep.tables, len(towers), warn=False)[1]:
        log.warning("the towers not kept (%s) left out as ranker channels: their factor tables would not fit",
                    ", ".join(name for name, _ in towers))
        return None
    return tower_channels(towers, prep.tables, prep.eval_timestamps, cfg.ranking.affinity_rank, device)


def _fold_recent_share(cfg: TrainConfig) -> float | None | bool:
    """``fold_rows``' ``recent_share`` for ``ranking.fold_order``: False (random folds), None (the most
    recent item, as leave-one-out tests) or the temporal protocol's share of each user's items."""
    order = cfg.ranking.fold_order
    if order in ("auto", "validated"):
        order = "random" if cfg.data.protocol == "random" else "recent"
    if order == "random":
        return False
    return DEFAULT_RATIOS[2] if cfg.data.protocol == "temporal" else None


def _fold_recent_shares(cfg: TrainConfig) -> list[float | None | bool]:
    """The fold orders a run trains a ranker with, as ``fold_rows``' ``recent_share``: the configured
    one; for "validated" under temporal or leave-one-out, random folds and then recent ones."""
    if cfg.ranking.fold_order == "validated" and cfg.data.protocol != "random" and cfg.ranking.folds:
        return [False, _fold_recent_share(cfg)]
    return [_fold_recent_share(cfg)]


def _halves(vocab: IdVocab, frame: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Splits validation interactions per user into a fitting half and a stopping half."""
    rng = np.random.default_rng(seed)
    coin = rng.random(len(frame)) < 0.5
    return frame[coin], frame[~coin]


def _train_jointly(cfg: TrainConfig, prep: Prepared, device: torch.device, ctx: Distributed,
                   timings: Timings) -> tuple[TrainedRun, dict[str, Any]]:
    """Both models on one loss (trainer/joint_training.py); stopped on the pipeline's validation NDCG@10."""
    def candidates(two_tower, users: np.ndarray, exclude: EvalTarget, n: int) -> Candidates:
        return retrieve(two_tower, prep.tables, users, exclude, n, prep.eval_timestamps, device)

    with timings.stage("joint_training"):
        two_tower, ranker, history = fit_joint(cfg, prep.spec, prep.tables, prep.train, prep.val,
                                               prep.eval_timestamps, device, ctx, candidates)
    return _trained_run(cfg, prep, two_tower, ranker), {"joint": history.epochs}


def _rating_rows(prep: Prepared) -> Rows:
    """Training interactions with their ratings, for the rating head (retrieval scores filled later)."""
    train = prep.train
    return Rows(train.users, train.items, train.timestamps, np.full(train.users.size, np.nan, np.float32),
                np.ones(train.users.size, np.float32), train.ratings)


def _retrieval_scorer(two_tower, prep: Prepared, device: torch.device, batch_size: int = 1024):
    """index (K,) -> retrieval scores (K,) of those training interactions (cosine / temperature).

    The user tower sees the user's features and history and the timestamp only through its hour
    and weekday, so it runs once per distinct (user, hour, weekday) and once per distinct item.
    """
    train = prep.train
    temperature = float(two_tower.temperature.detach())

    @torch.no_grad()
    def scores(index: np.ndarray) -> np.ndarray:
        if index.size == 0:
            return np.zeros(0, dtype=np.float32)
        users, items, timestamps = train.users[index], train.items[index], train.timestamps[index]
        hour, weekday, _ = temporal_features(timestamps)
        key = (users * 24 + hour) * 7 + weekday
        _, first, user_row = np.unique(key, return_index=True, return_inverse=True)
        distinct_items, item_row = np.unique(items, return_inverse=True)
        user_emb = torch.cat([user_embeddings(two_tower, prep.tables, users[first[s:s + batch_size]],
                                              timestamps[first[s:s + batch_size]], device)
                              for s in range(0, first.size, batch_size)])
        item_emb = item_embeddings(two_tower, prep.tables, device, items=distinct_items)
        out = np.empty(index.size, dtype=np.float32)
        for s in range(0, index.size, 65536):
            u = torch.as_tensor(user_row[s:s + 65536], device=device)
            i = torch.as_tensor(item_row[s:s + 65536], device=device)
            out[s:s + 65536] = ((user_emb[u] * item_emb[i]).sum(1) / temperature).cpu().numpy()
        return out

    return scores
