"""Turns a trained run into a live version on the artifact volume, and into Redis; the quality gate.

``quality_gate`` / ``apply_gate`` decide whether an evaluated run may be published (better than
popularity, not clearly worse than the served version); ``publish_evaluated`` publishes it the way
a ``TrainConfig`` says (index kind, retention, Redis, the report's metrics in the manifest): the
command line (``trainer.job``) and the notebook API (``trainer.api``) both go through these two.
``write_version_files`` lays out every file the services read, under the names
``recsys_contracts.bundle`` owns (docs/ARCHITECTURE.md, "Files of a trainer version");
``publish_run`` hands them to ``recsys_contracts.artifacts.publish`` (staging, fsync, rename) and,
unless told to stage only, to ``recsys_contracts.bundle.go_live`` (verify the whole bundle, write its
features to Redis and mark them complete, then flip CURRENT).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys_contracts import artifacts, bundle, feature_store
from recsys_contracts.ann import ExactIndex, IndexParams, build_index, recall_against_exact, write_index
from recsys_contracts.feature_spec import FeatureSpec
from recsys_contracts.signing import Signer
from trainer.config import TrainConfig
from trainer.export import export_ranker, export_user_tower
from trainer.models.autoencoder import AutoencoderUserTower
from trainer.features import FeatureTables
from trainer.inputs import item_inputs, user_inputs
from trainer.item_metadata import DisplaySource, write_item_metadata

# Report sections that travel into the manifest.
MANIFEST_METRICS = ("pipeline", "two_tower", "retrieval", "ranking_heads", "baselines")


@dataclass(frozen=True, eq=False)
class TrainedRun:
    """What a training run hands to publishing: both models in the same embedding space, and their data."""

    spec: FeatureSpec
    tables: FeatureTables
    two_tower: torch.nn.Module          # TwoTower (eval mode)
    ranker: torch.nn.Module             # DCNRanker (eval mode)
    score_mode: str = "ctr"             # how the served score combines the heads
    rating_weight: float = 0.0          # ctr_x_rating: score = ctr * (rating / rating_max) ** weight
    display: DisplaySource | None = None  # titles, genres, recent interactions (None: empty metadata)
    tower_choice: dict | None = None      # retrieval.user_tower's choice (trainer.training._fit_towers)
    ranker_choice: dict | None = None     # the ranker's choices (start or epoch kept, its EASE affinity rank)
    ranker_start: torch.nn.Module | None = None  # the ranker's start where a trained epoch replaced it (not published)


def choose_index_params(kind: str, n_items: int, exact_below: int) -> IndexParams:
    if kind == "auto":
        kind = "flat" if n_items < exact_below else "hnsw"
    return IndexParams(kind=kind)


@torch.no_grad()
def all_item_embeddings(two_tower, tables: FeatureTables, batch_size: int = 8192) -> np.ndarray:
    """(m+1, D) float32 item embeddings; row 0 (padding) is zero."""
    rows = []
    for start in range(0, tables.vocab.n_items + 1, batch_size):
        idx = np.arange(start, min(start + batch_size, tables.vocab.n_items + 1))
        rows.append(two_tower.item_tower(**item_inputs(tables, idx)).cpu().numpy())
    embeddings = np.concatenate(rows).astype(np.float32)
    embeddings[0] = 0.0
    return embeddings


def _export_examples(tables: FeatureTables, ranker_history: int) -> tuple[dict, dict]:
    """Example inputs; the ranker's history is only its ``ranker_history`` most recent items (the
    service sends no more per user row). The ranker's are grouped: the user rows, then twice as many
    candidate rows, row r naming user row r % U."""
    # Up to 8 real rows (row 0, the unknown user / item, first): the export traces them and the
    # parity check replays them at several batch sizes.
    users = np.arange(min(8, tables.vocab.n_users + 1), dtype=np.int64)
    rows = np.arange(2 * users.size, dtype=np.int64)
    items = rows % (tables.vocab.n_items + 1)
    user = user_inputs(tables, users, np.full(users.size, 10**9, dtype=np.int64))
    ranker = {**user, "history": user["history"][:, -ranker_history:],
              "row_user": torch.as_tensor(rows % users.size), **item_inputs(tables, items),
              "retrieval_score": torch.linspace(-1.0, 1.0, rows.size)}
    return user, ranker


def index_recall(index, exact: ExactIndex, queries: np.ndarray, k: int = 100,
                 cells: int = 20_000_000) -> float:
    """``recall_against_exact`` over the queries in chunks: exact search scores every item for each
    query at once, so a chunk holds about ``cells`` query x item scores (1000 queries over a
    1M-item catalog would need ~16 GB in one go). Chunk means weighted by size: the same mean."""
    per_chunk = max(1, cells // max(exact.size, 1))
    total = 0.0
    for start in range(0, len(queries), per_chunk):
        chunk = queries[start:start + per_chunk]
        total += recall_against_exact(index, exact, chunk, k=k) * len(chunk)
    return total / len(queries) if len(queries) else 1.0


def write_version_files(directory: Path, run: TrainedRun, index_params: IndexParams,
                        report_dir: Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Writes every file of a version into ``directory``; returns the manifest's ``extra`` section."""
    directory = Path(directory)
    run.tables.save(directory)
    (directory / bundle.FEATURE_SPEC_FILE).write_text(run.spec.to_json())
    write_item_metadata(directory, run.tables.vocab, run.display)
    ranker_history = min(run.ranker.recent_items, run.spec.history_length)
    user_example, ranker_example = _export_examples(run.tables, ranker_history)
    user_tower = run.two_tower.user_tower.eval()
    if isinstance(user_tower, AutoencoderUserTower):
        user_tower = user_tower.for_serving()
    export_user_tower(user_tower, user_example, directory / bundle.USER_TOWER_FILE)
    export_ranker(run.ranker.eval(), ranker_example, directory / bundle.RANKER_FILE)
    embeddings = all_item_embeddings(run.two_tower.eval(), run.tables)
    np.save(directory / bundle.ITEM_EMBEDDINGS_FILE, embeddings, allow_pickle=False)
    ids = np.arange(1, run.tables.vocab.n_items + 1, dtype=np.int64)
    started = time.perf_counter()
    index = build_index(embeddings[1:], ids, index_params, seed=seed)
    build_s = time.perf_counter() - started
    write_index(index, directory / bundle.INDEX_FILE)
    # Recall of the index against exact search on item-embedding queries (a sample of the catalog).
    started = time.perf_counter()
    sample = np.random.default_rng(seed).choice(ids.size, size=min(1000, ids.size), replace=False)
    recall = index_recall(index, ExactIndex(embeddings[1:], ids), embeddings[1:][sample], k=100)
    recall_s = time.perf_counter() - started
    serving = bundle.write_serving(directory, bundle.ServingConfig(
        temperature=float(run.two_tower.temperature.detach()), rating_min=run.spec.rating_min,
        rating_max=run.spec.rating_max, ranker_history_length=ranker_history, score_mode=run.score_mode,
        rating_weight=run.rating_weight), run.spec.history_length)
    if report_dir is not None:
        for path in sorted(Path(report_dir).glob("report.*")) + sorted(Path(report_dir).glob("*.png")):
            shutil.copy2(path, directory / path.name)
    return {"index": {**dataclasses.asdict(index_params), "recall@100": recall,
                      "n_items": int(ids.size)},
            # Measured here, kept apart from "index" (whose other fields are the IndexParams).
            "index_seconds": {"build": round(build_s, 3), "recall": round(recall_s, 3)},
            "serving": serving, "embedding_dim": int(embeddings.shape[1])}


def _finite(value: Any) -> Any:
    """JSON has no NaN: non-finite metrics become null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def publish_run(root: Path, run: TrainedRun, *, index_params: IndexParams, data: dict, config: dict,
                metrics: dict, retain: int | None, signer: Signer | None, report_dir: Path | None = None,
                seed: int = 0, make_current: bool = True, redis_client=None,
                keys: feature_store.KeyFormat | None = None) -> int:
    """Publishes the run as a new version signed by ``signer`` (None: unsigned); returns its number.

    Nothing is visible until it is complete. With ``make_current`` it then goes live in the one
    order (``bundle.go_live``): the whole bundle verified, its features in Redis (with
    ``redis_client``) and marked complete, then CURRENT. Without, it stays staged beside CURRENT."""
    extra: dict[str, Any] = {}

    def write(staging: Path) -> None:
        extra.update(write_version_files(staging, run, index_params, report_dir, seed))

    version = artifacts.publish(Path(root), write, data=_finite(data), config=_finite(config),
                                metrics=_finite(metrics), extra=extra, make_current=False,
                                retain=retain, signer=signer)
    if make_current:
        bundle.go_live(root, version, trust=None, redis_client=redis_client, keys=keys)
    return version


def materialize_features(client, keys: feature_store.KeyFormat, version: int,
                         tables: FeatureTables, batch_size: int = 1000) -> int:
    """Writes the version's user rows, histories, seen items and item rows to Redis, then marks it complete."""
    return feature_store.write_tables(client, keys, version, tables, user_ids=tables.vocab.user_ids,
                                      item_ids=tables.vocab.item_ids, batch_size=batch_size)


def quality_gate(cfg: TrainConfig, report: dict[str, Any], root: Path | None) -> str | None:
    """Why this run must not be published, or None. Worse than popularity, or than the version
    being served (same dataset, protocol and test context: a version whose manifest names none was judged on
    train alone) by more than ``publish.gate_margin``, is refused."""
    ndcg = report["pipeline"]["ndcg@10"]
    served = artifacts.current_version(root) if root is not None and (root / artifacts.CURRENT_FILE).exists() \
        else None
    if served is not None:
        manifest = artifacts.read_manifest(root, served)
        same_data = manifest.data.get("dataset") == report["data"]["dataset"] and \
            manifest.data.get("protocol") == report["data"]["protocol"] and \
            manifest.data.get("test_context", "train") == report["data"].get("test_context", "train")
        served_ndcg = (manifest.metrics.get("pipeline") or {}).get("ndcg@10")
        if same_data and served_ndcg is not None and ndcg < served_ndcg * (1 - cfg.publish.gate_margin):
            return (f"pipeline NDCG@10 {ndcg:.4f} is more than {cfg.publish.gate_margin:.0%} below the served "
                    f"version {served}'s {served_ndcg:.4f}")
    popularity = report["baselines"]["popularity"]["ndcg@10"]
    if not ndcg > popularity:
        return f"pipeline NDCG@10 {ndcg:.4f} is not above popularity's {popularity:.4f}"
    return None


def apply_gate(cfg: TrainConfig, report: dict[str, Any], root: Path | None) -> str | None:
    """``quality_gate`` unless ``publish.gate`` is off; the verdict goes into ``report["gate"]``."""
    refused = quality_gate(cfg, report, root) if cfg.publish.gate else None
    report["gate"] = f"refused: {refused}" if refused else ("passed" if cfg.publish.gate else "off")
    return refused


def publish_evaluated(cfg: TrainConfig, root: Path, run: TrainedRun, report: dict[str, Any],
                      report_dir: Path, signer: Signer | None) -> int:
    """Publishes an evaluated run (its report files from ``report_dir``) as ``cfg.publish`` says; live
    in the one go-live order (files, bundle check, features in Redis marked complete, then CURRENT)."""
    client = feature_store.redis_client(cfg.publish.redis_url, socket_timeout_s=5.0,
                                        connect_timeout_s=2.0) if cfg.publish.redis_url else None
    return publish_run(root, run, index_params=choose_index_params(
        cfg.publish.index, run.tables.vocab.n_items, cfg.publish.index_exact_below),
        data=report["data"], config=cfg.to_dict(), metrics={k: report[k] for k in MANIFEST_METRICS},
        retain=cfg.publish.retain, signer=signer, report_dir=report_dir, seed=cfg.run.seed,
        redis_client=client, keys=feature_store.KeyFormat(cfg.publish.redis_namespace))
