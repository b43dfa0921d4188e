"""The trainer's main job, top to bottom: data -> features -> two-tower -> DCN -> evaluation -> publish.

``prepare`` loads and splits the log and fits the features on the training split only;
``train`` fits both models; ``evaluate`` measures retrieval alone, the full pipeline (retrieve N ->
rank -> top K), the ranking heads and the reference baselines on the test split; ``run`` adds the
report, the quality gate and publishing. Every stage is timed.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from recsys_contracts import artifacts, feature_store
from recsys_contracts.rerank import mmr_order
from recsys_contracts.signing import signer_for
from trainer import metrics
from trainer.baselines import rank_topk
from trainer.config import TrainConfig
from trainer.data import Dataset, data_dir_from_env, ensure_movielens, load_interactions, load_movielens
from trainer.distributed import Distributed, init_distributed, resolve_device, shutdown_distributed
from trainer.evaluation import (EvalTarget, baseline_reports, diversity_vectors, interaction_matrix,
                                list_report, make_target, sample_users, users_per_batch)
from trainer.features import (FeatureTables, IdVocab, build_tables, fit_feature_spec, fit_id_vocab,
                              temporal_features)
from trainer.checkpoint import Checkpointer
from trainer.publish import (TrainedRun, all_item_embeddings, choose_index_params,
                             publish_run)
from trainer.report import write_report
from trainer.item_metadata import DisplaySource
from trainer.models.dcn import DCNConfig
from trainer.ranking_training import Candidates, Rows, click_rows, fit_ranker, fold_rows, rerank, score_candidates
from trainer.joint_training import fit_joint
from trainer.retrieval_training import Interactions, UserItems, fit_retrieval, item_embeddings, user_embeddings
from trainer.splits import Split, split_by_name

log = logging.getLogger(__name__)


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        log.info("stage %s started", name)
        yield
        elapsed = time.perf_counter() - start
        self.seconds[name] = round(self.seconds.get(name, 0.0) + elapsed, 3)
        log.info("stage %s done in %.1f s", name, elapsed)


@dataclass(frozen=True, eq=False)
class Prepared:
    dataset: Dataset
    split: Split
    vocab: IdVocab
    spec: Any
    tables: FeatureTables
    train: Interactions
    val: EvalTarget            # val items, train masked
    test: EvalTarget           # test items, train + val masked
    eval_timestamps: np.ndarray  # (n+1,) each user's last training timestamp: the context at evaluation


def load_dataset(cfg: TrainConfig) -> Dataset:
    """The configured log: a path (MovieLens folder or generic CSV/Parquet) or a name under the data dir."""
    name = cfg.data.dataset
    path = Path(name)
    if not path.exists():
        data_dir = Path(cfg.data.data_dir) if cfg.data.data_dir else data_dir_from_env()
        path = data_dir / name
        if not path.exists():
            path = ensure_movielens(name, data_dir)
    if path.is_dir():
        return load_movielens(path)
    return load_interactions(path, columns=cfg.data.column_map or None)


def _interactions(vocab: IdVocab, frame: pd.DataFrame) -> Interactions:
    return Interactions(vocab.users_to_idx(frame["user_id"].to_numpy()),
                        vocab.items_to_idx(frame["item_id"].to_numpy()),
                        frame["timestamp"].to_numpy().astype(np.int64),
                        frame["rating"].to_numpy().astype(np.float32))


def prepare(cfg: TrainConfig, dataset: Dataset, split: Split | None = None) -> Prepared:
    """Splits (unless a split is given), fits the features on train, builds the evaluation targets."""
    split = split if split is not None else split_by_name(cfg.data.protocol, dataset.interactions,
                                                          seed=cfg.data.seed)
    vocab = fit_id_vocab(split.train)
    spec = fit_feature_spec(split.train, dataset.users, dataset.items,
                            history_length=cfg.features.history_length)
    tables = build_tables(spec, vocab, split.train, dataset.users, dataset.items)
    train = _interactions(vocab, split.train)
    eval_ts = np.zeros(vocab.n_users + 1, dtype=np.int64)
    np.maximum.at(eval_ts, train.users, train.timestamps)
    return Prepared(dataset, split, vocab, spec, tables, train,
                    sample_users(make_target(vocab, split.val, [split.train]), cfg.eval.max_users, cfg.run.seed),
                    sample_users(make_target(vocab, split.test, [split.train, split.val]), cfg.eval.max_users,
                                 cfg.run.seed + 1), eval_ts)


@torch.no_grad()
def retrieve(two_tower, tables: FeatureTables, users: np.ndarray, exclude: EvalTarget, n: int,
             timestamps: np.ndarray, device: torch.device, batch_size: int | None = None) -> Candidates:
    """Top-n candidates per user by exact search (what the flat index serves), masked items removed."""
    items = item_embeddings(two_tower, tables, device)                 # (m+1, D)
    temperature = float(two_tower.temperature.detach())
    n = min(n, tables.vocab.n_items)
    batch_size = batch_size or users_per_batch(tables.vocab.n_items)
    all_items, all_scores = [], []
    for start in range(0, users.size, batch_size):
        batch = users[start:start + batch_size]
        sims = (user_embeddings(two_tower, tables, batch, timestamps[batch], device) @ items.T).cpu().numpy()
        sims[:, 0] = -np.inf
        top = rank_topk(sims, exclude.exclude_rows(batch), n)            # (B, n), -1 padded
        scores = np.take_along_axis(sims, np.maximum(top, 0), axis=1) / temperature
        all_items.append(np.where(top > 0, top, 0))
        all_scores.append(np.where(top > 0, scores, -np.inf).astype(np.float32))
    return Candidates(users, np.concatenate(all_items), np.concatenate(all_scores))


def _held_out(vocab: IdVocab, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rows = _interactions(vocab, frame)
    keep = (rows.users > 0) & (rows.items > 0)
    return rows.users[keep], rows.items[keep], rows.timestamps[keep], rows.ratings[keep]


def _halves(vocab: IdVocab, frame: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Splits validation interactions per user into a fitting half and a stopping half."""
    rng = np.random.default_rng(seed)
    coin = rng.random(len(frame)) < 0.5
    return frame[coin], frame[~coin]


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
    # the published version carries titles, genres and recent history for display (the gateway's page)
    return replace(run, display=DisplaySource(prep.dataset.items, prep.split.train)), histories


def _train_models(cfg: TrainConfig, prep: Prepared, device: torch.device, ctx: Distributed,
                  timings: Timings) -> tuple[TrainedRun, dict[str, Any]]:
    checkpointer = Checkpointer(cfg.run.checkpoint_dir) if cfg.run.checkpoint_dir else None
    if cfg.multitask.mode == "joint":
        return _train_jointly(cfg, prep, device, ctx, timings)
    with timings.stage("retrieval_training"):
        two_tower, retrieval_history = fit_retrieval(cfg, prep.spec, prep.tables, prep.train, prep.val,
                                                     prep.eval_timestamps, device, ctx, checkpointer)
    histories = {"retrieval": retrieval_history.epochs}
    with timings.stage("ranking_training"):
        fit_frame, stop_frame = _halves(prep.vocab, prep.split.val, cfg.run.seed)
        stop_target = sample_users(make_target(prep.vocab, stop_frame, [prep.split.train, fit_frame]),
                                   cfg.eval.max_users, cfg.run.seed + 2)
        fit_pos = _held_out(prep.vocab, fit_frame)
        if cfg.eval.max_users:
            fit_pos = tuple(a[np.isin(fit_pos[0], prep.val.users)] for a in fit_pos)
        wanted = np.union1d(np.unique(fit_pos[0]), stop_target.users)
        candidates = retrieve(two_tower, prep.tables, wanted, prep.val, cfg.ranking.candidates,
                              prep.eval_timestamps, device)
        rng = np.random.default_rng(cfg.run.seed)
        fit_rows = click_rows(fit_pos, candidates, cfg.ranking.negatives_per_positive, rng,
                              cfg.ranking.negative_pool)
        folds = None
        if cfg.ranking.folds:
            folds = fold_rows(two_tower, prep.tables, UserItems.from_interactions(prep.train, prep.vocab.n_users),
                              prep.eval_timestamps, cfg.ranking, DCNConfig.recent_items, rng, device)
            log.info("ranker examples: %d from the validation fitting half, %d from %d training-log folds",
                     fit_rows.users.size, folds.users.size, cfg.ranking.folds)
        stop_candidates = retrieve(two_tower, prep.tables, stop_target.users, stop_target,
                                   cfg.ranking.candidates, prep.eval_timestamps, device)
        ranker, ranking_history = fit_ranker(cfg, prep.spec, prep.tables, fit_rows, _rating_rows(prep),
                                             stop_candidates, stop_target, prep.eval_timestamps, device, ctx,
                                             rating_scores=_retrieval_scorer(two_tower, prep, device),
                                             folds=folds)
    histories["ranking"] = ranking_history.epochs
    run = TrainedRun(spec=prep.spec, tables=prep.tables, two_tower=two_tower.cpu().eval(),
                     ranker=ranker.cpu().eval(), score_mode=cfg.ranking.score_mode,
                     rating_weight=cfg.multitask.rating_weight if cfg.ranking.score_mode == "ctr_x_rating" else 0.0)
    return run, histories


def _train_jointly(cfg: TrainConfig, prep: Prepared, device: torch.device, ctx: Distributed,
                   timings: Timings) -> tuple[TrainedRun, dict[str, Any]]:
    """Both models on one loss (trainer/joint_training.py); stopped on the pipeline's validation NDCG@10."""
    def candidates(two_tower, users: np.ndarray, exclude: EvalTarget, n: int) -> Candidates:
        return retrieve(two_tower, prep.tables, users, exclude, n, prep.eval_timestamps, device)

    with timings.stage("joint_training"):
        two_tower, ranker, history = fit_joint(cfg, prep.spec, prep.tables, prep.train, prep.val,
                                               prep.eval_timestamps, device, ctx, candidates)
    run = TrainedRun(spec=prep.spec, tables=prep.tables, two_tower=two_tower.cpu().eval(),
                     ranker=ranker.cpu().eval(), score_mode=cfg.ranking.score_mode,
                     rating_weight=cfg.multitask.rating_weight if cfg.ranking.score_mode == "ctr_x_rating" else 0.0)
    return run, {"joint": history.epochs}


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


def evaluate(cfg: TrainConfig, prep: Prepared, run: TrainedRun, device: torch.device,
             timings: Timings) -> dict[str, Any]:
    """The evaluation report's numbers on the test split (protocol from the config)."""
    ks, vectors = cfg.eval.ks, diversity_vectors(prep.tables, len(prep.spec.item_genres))
    report: dict[str, Any] = {}
    with timings.stage("evaluation"):
        n = max(cfg.ranking.candidates, max(cfg.eval.retrieval_ks))
        cands = retrieve(run.two_tower, prep.tables, prep.test.users, prep.test, n, prep.eval_timestamps, device)
        truth = prep.test.truth_rows()
        report["retrieval"] = {f"recall@{k}": metrics.recall_at_k(cands.items[:, :k], truth, k)
                               for k in cfg.eval.retrieval_ks if k <= cands.items.shape[1]}
        report["two_tower"] = list_report(np.where(cands.items > 0, cands.items, -1)[:, :max(ks)],
                                          prep.test, ks, vectors)
        top_n = Candidates(cands.users, cands.items[:, :cfg.ranking.candidates],
                           cands.scores[:, :cfg.ranking.candidates])
        scores, ctr, rating = score_candidates(run.ranker, prep.tables, top_n, prep.eval_timestamps[top_n.users],
                                               run.score_mode, run.rating_weight, prep.spec.rating_max, device)
        ranked = rerank(top_n, scores, max(ks))
        report["pipeline"] = list_report(ranked, prep.test, ks, vectors)
        report["ranking_heads"] = _head_metrics(cfg, prep, run, top_n, device)
        report["diversity_tradeoff"] = _diversity_tradeoff(cfg, prep, run, top_n, scores, vectors)
    with timings.stage("baselines"):
        report["baselines"] = baseline_reports(interaction_matrix(prep.vocab, [prep.split.train]), prep.val,
                                               prep.test, ks, cfg.eval.ease_grid, vectors)
    report["recommended_popularity"] = _popularity_profile(ranked, prep.tables)
    return report


def _head_metrics(cfg, prep: Prepared, run: TrainedRun, cands: Candidates, device) -> dict[str, float]:
    """CTR AUC / log loss on test positives vs retrieved-not-taken negatives; rating RMSE on test ratings."""
    rows = click_rows(_held_out(prep.vocab, prep.split.test), cands, cfg.ranking.negatives_per_positive,
                      np.random.default_rng(cfg.run.seed + 7), cfg.ranking.negative_pool)
    from trainer.ranking_training import ranker_inputs
    with torch.no_grad():
        ctr_logit, rating = run.ranker(**ranker_inputs(prep.tables, rows, device))
    probs = torch.sigmoid(ctr_logit).cpu().numpy()
    rated = rows.clicks == 1
    return {"ctr_auc": metrics.auc(rows.clicks, probs), "ctr_logloss": metrics.log_loss(rows.clicks, probs),
            "rating_rmse": metrics.rmse(rows.ratings[rated], rating.cpu().numpy()[rated])}


def _diversity_tradeoff(cfg: TrainConfig, prep: Prepared, run: TrainedRun, cands: Candidates,
                        scores: np.ndarray, vectors: np.ndarray, pool: int = 50) -> dict[str, dict[str, float]]:
    """NDCG@10 and intra-list diversity@10 after the service's MMR re-rank at each strength."""
    embeddings = all_item_embeddings(run.two_tower, prep.tables)
    top = rerank(cands, scores, pool)                                          # (U, pool) best first
    row_scores = np.take_along_axis(scores, np.argsort(-np.where(cands.items > 0, scores, -np.inf), axis=1,
                                                       kind="stable")[:, :pool], axis=1)
    out = {}
    for strength in cfg.eval.diversity_strengths:
        lists = np.full((top.shape[0], 10), -1, dtype=np.int64)
        for u in range(top.shape[0]):
            valid = top[u] > 0
            order = mmr_order(row_scores[u][valid], embeddings[top[u][valid]], 10, float(strength))
            lists[u, :order.size] = top[u][valid][order]
        out[f"{strength:g}"] = {"ndcg@10": metrics.ndcg_at_k(lists, prep.test.truth_rows(), 10),
                                "diversity@10": metrics.intra_list_diversity(lists, vectors)}
    return out


def _popularity_profile(ranked: np.ndarray, tables: FeatureTables) -> dict[str, list[float]]:
    """Share of recommendations and of the catalog in each popularity decile (0 = most popular)."""
    order = tables.popular_items
    decile = np.zeros(tables.vocab.n_items + 1, dtype=np.int64)
    decile[order] = np.arange(order.size) * 10 // max(order.size, 1)
    recs = ranked[ranked > 0]
    rec_share = np.bincount(decile[recs], minlength=10) / max(recs.size, 1)
    catalog_share = np.bincount(decile[order], minlength=10) / max(order.size, 1)
    return {"recommended": rec_share.round(4).tolist(), "catalog": catalog_share.round(4).tolist()}


def quality_gate(cfg: TrainConfig, report: dict[str, Any], root: Path | None) -> str | None:
    """Why this run must not be published, or None. Worse than popularity, or than the version
    being served (same dataset and protocol) by more than ``publish.gate_margin``, is refused."""
    ndcg = report["pipeline"]["ndcg@10"]
    served = artifacts.current_version(root) if root is not None and (root / artifacts.CURRENT_FILE).exists() \
        else None
    if served is not None:
        manifest = artifacts.read_manifest(root, served)
        same_data = manifest.data.get("dataset") == report["data"]["dataset"] and \
            manifest.data.get("protocol") == report["data"]["protocol"]
        served_ndcg = (manifest.metrics.get("pipeline") or {}).get("ndcg@10")
        if same_data and served_ndcg is not None and ndcg < served_ndcg * (1 - cfg.publish.gate_margin):
            return (f"pipeline NDCG@10 {ndcg:.4f} is more than {cfg.publish.gate_margin:.0%} below the served "
                    f"version {served}'s {served_ndcg:.4f}")
    popularity = report["baselines"]["popularity"]["ndcg@10"]
    if not ndcg > popularity:
        return f"pipeline NDCG@10 {ndcg:.4f} is not above popularity's {popularity:.4f}"
    return None


@dataclass
class RunResult:
    report: dict[str, Any]
    run: TrainedRun
    prepared: Prepared
    version: int | None
    refused: str | None


def run(cfg: TrainConfig, dataset: Dataset | None = None) -> RunResult:
    """The whole job: train, evaluate, report, gate, publish (when an artifact root is configured)."""
    timings = Timings()
    ctx = init_distributed(torch.device("cuda") if cfg.run.device == "cuda" else torch.device("cpu"))
    device = resolve_device(cfg.run.device, ctx.local_rank)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    signer = signer_for(cfg.publish.signing_key, cfg.publish.unsigned) if cfg.publish.artifact_root else None
    try:
        with timings.stage("load"):
            dataset = dataset if dataset is not None else load_dataset(cfg)
        with timings.stage("features"):
            prep = prepare(cfg, dataset)
        trained, histories = train_models(cfg, prep, device, ctx, timings)
        report = evaluate(cfg, prep, trained, torch.device("cpu"), timings)
        report["data"] = {"dataset": dataset.name, "protocol": cfg.data.protocol, "seed": cfg.data.seed,
                          "n_users": prep.vocab.n_users, "n_items": prep.vocab.n_items,
                          "train": len(prep.split.train), "val": len(prep.split.val),
                          "test": len(prep.split.test), "test_users": int(prep.test.users.size),
                          "time_range": [int(dataset.interactions["timestamp"].min()),
                                         int(dataset.interactions["timestamp"].max())]}
        version, refused = None, None
        root = Path(cfg.publish.artifact_root) if cfg.publish.artifact_root else None
        if ctx.is_main:
            refused = quality_gate(cfg, report, root) if cfg.publish.gate else None
            report["gate"] = f"refused: {refused}" if refused else ("passed" if cfg.publish.gate else "off")
            report["timings"] = dict(timings.seconds)
            out = Path(cfg.run.output_dir)
            write_report(report, histories, out)
            if root is not None and refused is None:
                # One go-live order (recsys_contracts.bundle.go_live): files, bundle check, the
                # features in Redis marked complete, and only then CURRENT.
                client = feature_store.redis_client(cfg.publish.redis_url, socket_timeout_s=5.0,
                                                    connect_timeout_s=2.0) if cfg.publish.redis_url else None
                with timings.stage("export_index_publish_go_live"):
                    version = publish_run(root, trained, index_params=choose_index_params(
                        cfg.publish.index, prep.vocab.n_items, cfg.publish.index_exact_below),
                        data=report["data"], config=cfg.to_dict(),
                        metrics={k: report[k] for k in ("pipeline", "two_tower", "retrieval",
                                                        "ranking_heads", "baselines")},
                        retain=cfg.publish.retain, signer=signer, report_dir=out, seed=cfg.run.seed,
                        redis_client=client, keys=feature_store.KeyFormat(cfg.publish.redis_namespace))
            report["timings"] = dict(timings.seconds)
            write_report(report, histories, out)
        ctx.barrier()
        return RunResult(report, trained, prep, version, refused)
    finally:
        shutdown_distributed(ctx)
