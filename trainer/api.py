"""The notebook API in the original design's shape: ``ModelConfig`` and ``ProductionTrainer``.

    config = ModelConfig(embedding_dim=64, user_tower_dims=[128, 64], item_tower_dims=[128, 64],
                         negative_sampling_strategy="mixed", ctr_weight=1.0, rating_weight=0.5,
                         learning_rate=1e-3)
    trainer = ProductionTrainer(config)
    trainer.fit(train_df, val_df)            # progress bars per epoch
    metrics = trainer.evaluate(test_df)      # the evaluation report's dict (report.json)
    recs = trainer.recommend(user_id="42", k=10)   # [(item_id, score), ...]
    version = trainer.publish(artifact_root)

A thin front over ``trainer.job``, the command line's code path: the caller's frames become a
``Dataset`` and a given ``Split`` (train, val, empty test); ``fit`` runs ``job.session``,
``trainer.prepare.prepare`` and ``trainer.training.train_models``; ``evaluate`` swaps in a test
target from ``test_df`` (train + val masked) and calls ``job.evaluate``; ``recommend`` ranks with
``trainer.evaluation.retrieve`` and the ranker; ``publish`` calls ``trainer.publish.apply_gate`` and
``publish_evaluated``, as ``job.run`` does. What lives here is only the frames' checks and the
calls' order.

Frames: columns ``user_id`` (str; ints are turned into str), ``item_id`` (integer), ``rating``
(numeric), ``timestamp`` (integer Unix seconds, or datetime64, naive taken as UTC), plus optional
feature columns ``user_<name>`` / ``item_<name>`` (one value per id; they become the side tables'
``<name>`` columns, so ``item_genres`` is the ``|``-separated genre string), or side tables passed
as ``users=`` / ``items=``. Other columns are ignored with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from recsys_contracts.signing import signer_for
from trainer import job
from trainer.config import (MultitaskConfig, RankingConfig, RetrievalConfig, RunConfig, TrainConfig,
                            replace)
from trainer.data.dataset import INTERACTION_COLUMNS, make_dataset, validate_interactions
from trainer.evaluation import retrieve
from trainer.full_ranking import EvalTarget, make_target
from trainer.negatives import STRATEGIES
from trainer.prepare import Prepared, prepare
from trainer.progress import Timings
from trainer.publish import TrainedRun, apply_gate, publish_evaluated
from trainer.ranking_training import rerank, score_candidates
from trainer.report import write_report
from trainer.splits import Split
from trainer.training import train_models

log = logging.getLogger(__name__)

GIVEN_PROTOCOL = "given"  # the caller chose the split


@dataclass(frozen=True)
class ModelConfig:
    """The model's hyper-parameters under the original design's names; ``to_train_config`` maps them.

    ``learning_rate``/``epochs``/``batch_size`` are the two-tower's (``retrieval.*``);
    ``ranking_*`` the DCN's; ``ctr_weight``/``rating_weight`` weigh the ranker's losses
    (L = ctr_weight * L_ctr + rating_weight * L_rating). Defaults are the command line's (read from
    ``trainer.config``, so they never drift apart).
    """

    embedding_dim: int = RetrievalConfig.embedding_dim
    user_tower_dims: Sequence[int] = RetrievalConfig.user_tower_dims
    item_tower_dims: Sequence[int] = RetrievalConfig.item_tower_dims
    negative_sampling_strategy: str = RetrievalConfig.negative_sampling_strategy
    ctr_weight: float = MultitaskConfig.ctr_weight
    rating_weight: float = MultitaskConfig.rating_weight
    learning_rate: float = RetrievalConfig.learning_rate
    epochs: int = RetrievalConfig.epochs
    batch_size: int = RetrievalConfig.batch_size          # users per two-tower step
    ranking_learning_rate: float = RankingConfig.learning_rate
    ranking_epochs: int = RankingConfig.epochs
    candidates: int = RankingConfig.candidates            # items retrieved per user before ranking
    seed: int = RunConfig.seed

    def __post_init__(self) -> None:
        # Lists as in the original design's examples; stored as tuples so the config stays hashable.
        for name in ("user_tower_dims", "item_tower_dims"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if self.negative_sampling_strategy not in STRATEGIES:
            raise ValueError(f"negative_sampling_strategy must be one of {STRATEGIES}, "
                             f"got {self.negative_sampling_strategy!r}")
        self.to_train_config()  # fails fast, naming the TrainConfig key, e.g. "retrieval.embedding_dim"

    def to_train_config(self, base: TrainConfig | None = None) -> TrainConfig:
        """``base`` (default: the command line's defaults) with these values, validated like a config file."""
        return replace(
            base if base is not None else TrainConfig(),
            retrieval={"embedding_dim": self.embedding_dim, "user_tower_dims": list(self.user_tower_dims),
                       "item_tower_dims": list(self.item_tower_dims),
                       "negative_sampling_strategy": self.negative_sampling_strategy,
                       "learning_rate": self.learning_rate, "epochs": self.epochs,
                       "batch_size": self.batch_size},
            ranking={"learning_rate": self.ranking_learning_rate, "epochs": self.ranking_epochs,
                     "candidates": self.candidates},
            multitask={"ctr_weight": self.ctr_weight, "rating_weight": self.rating_weight},
            run={"seed": self.seed})


@dataclass(frozen=True, eq=False)
class _Fitted:
    """What ``fit`` leaves behind for evaluate / recommend / publish."""

    prepared: Prepared
    run: TrainedRun
    histories: dict[str, Any]
    seen: EvalTarget       # masks train + val items: "exclude seen"
    nothing: EvalTarget    # masks nothing


class ProductionTrainer:
    """Fits, evaluates, recommends and publishes through the command line's job (``trainer.job``).

    ``base``: every setting ``ModelConfig`` does not name (evaluation cut-offs, device, progress
    bars, index kind, ...); ``config`` overrides its model fields. Without one, the command line's
    defaults except ``run.tower_workers`` = 1 (the user towers train in this process, one after another).
    """

    def __init__(self, config: ModelConfig, *, base: TrainConfig | None = None) -> None:
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
        if base is None:
            # The towers one after another in the caller's process: a worker process (spawned) would
            # import the caller's script again, and one without a main guard would run again in it.
            # A ``base`` with run.tower_workers 0 or more than 1 asks for them side by side.
            base = replace(TrainConfig(), run={"tower_workers": 1})
        self._cfg = config.to_train_config(base)
        self._timings = Timings()
        self._fitted: _Fitted | None = None
        self._report: dict[str, Any] | None = None

    @property
    def train_config(self) -> TrainConfig:
        """The full configuration the job runs with (it travels into the manifest)."""
        return self._cfg

    @property
    def histories(self) -> dict[str, Any]:
        """Per-epoch loss and validation NDCG@10 of each stage (``retrieval``, ``ranking``)."""
        return self._require_fitted("histories").histories

    def fit(self, train_df: pd.DataFrame, val_df: pd.DataFrame, *, users: pd.DataFrame | None = None,
            items: pd.DataFrame | None = None, dataset_name: str = "dataframes") -> ProductionTrainer:
        """Trains the two-tower and the DCN on ``train_df``, early-stopping on ``val_df``; returns self."""
        train, val = _interaction_frame(train_df, "train_df"), _interaction_frame(val_df, "val_df")
        users = _side_table(users, [(train_df, "train_df"), (val_df, "val_df")], "user_id", "users")
        items = _side_table(items, [(train_df, "train_df"), (val_df, "val_df")], "item_id", "items")
        dataset = make_dataset(dataset_name, pd.concat([train, val], ignore_index=True),
                               source=dataset_name, rows_read=len(train) + len(val), users=users, items=items)
        log.info("%s", dataset.report.summary())
        train, val = _with_known_ids(train, users, items), _with_known_ids(val, users, items)
        split = Split(train=train, val=val, test=train.iloc[:0], protocol=GIVEN_PROTOCOL, seed=0)
        cfg, self._timings = self._cfg, Timings()
        with job.session(cfg) as (ctx, device):
            with self._timings.stage("features"):
                prep = prepare(cfg, dataset, split=split)
            if prep.val.users.size == 0:
                raise ValueError("val_df must hold interactions of users and items that train_df has "
                                 f"(early stopping ranks them), got none of its {len(val_df)} rows")
            run, histories = train_models(cfg, prep, device, ctx, self._timings)
        self._fitted = _Fitted(prep, run, histories,
                               seen=make_target(prep.vocab, val, [train, val]),
                               nothing=make_target(prep.vocab, val, [train.iloc[:0]]))
        self._report = None
        return self

    def evaluate(self, test_df: pd.DataFrame) -> dict[str, Any]:
        """The evaluation report on ``test_df`` (full ranking, train + val items masked).

        Keys as in report.json: ``pipeline`` and ``two_tower`` (recall/precision/ndcg/map/mrr/hit@K,
        coverage@K, diversity@K), ``retrieval`` (recall@K of the candidates), ``ranking_heads``
        (ctr_auc, ctr_logloss, rating_rmse), ``baselines`` (popularity, EASE), ``recommended_popularity``
        and ``data``. Test rows of users or items unseen in ``fit`` cannot be ranked and are left out.
        """
        fitted = self._require_fitted("evaluate")
        test = _interaction_frame(test_df, "test_df")
        prep = fitted.prepared
        target = make_target(prep.vocab, test, [prep.split.train, prep.split.val])
        if target.users.size == 0:
            raise ValueError("test_df must hold interactions of users and items seen in fit, "
                             f"got none of its {len(test_df)} rows")
        prep = dataclasses.replace(prep, test=target, split=dataclasses.replace(prep.split, test=test))
        report = job.evaluate(self._cfg, prep, fitted.run, self._timings, protocol=GIVEN_PROTOCOL)
        self._report = report
        return report

    def recommend(self, user_id: str | int, k: int = 10, exclude_seen: bool = True) -> list[tuple[int, float]]:
        """The top ``k`` (item_id, score), best first.

        A known user: retrieve ``candidates`` items with the two-tower, rank them with the DCN
        (score = the served score, e.g. CTR probability), excluding the items of train and val
        unless ``exclude_seen`` is False. An unknown user: the most popular training items
        (score = log training count), as the retrieval service answers users it has no features for.
        """
        fitted = self._require_fitted("recommend")
        prep, run = fitted.prepared, fitted.run
        n_items = prep.vocab.n_items
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n_items:
            raise ValueError(f"k must be an integer in [1, {n_items}], got {k!r}")
        if isinstance(user_id, bool) or not isinstance(user_id, str | int | np.integer) or user_id == "":
            raise ValueError(f"user_id must be a non-empty str (or int), got {user_id!r}")
        user = int(prep.vocab.users_to_idx([str(user_id)])[0])
        if user == 0:
            popular = prep.tables.popular_items[:k]                                   # (k,) item indices
            scores = np.log(np.maximum(prep.tables.item_counts[popular], 1))
            return [(int(prep.vocab.item_ids[i]), float(s)) for i, s in zip(popular, scores)]
        users = np.array([user], dtype=np.int64)
        # The user as the test split sees them: train and (by default) validation interactions in the history.
        cands = retrieve(run.two_tower, prep.test_tables, users, fitted.seen if exclude_seen else fitted.nothing,
                         max(k, self._cfg.ranking.candidates), prep.test_timestamps, torch.device("cpu"))
        scores, _ctr, _rating = score_candidates(run.ranker, prep.test_tables, cands, prep.test_timestamps[users],
                                                 run.score_mode, run.rating_weight, prep.spec.rating_max,
                                                 torch.device("cpu"))                # each (1, N)
        score_of = dict(zip(cands.items[0].tolist(), scores[0].tolist()))
        return [(int(prep.vocab.item_ids[i]), score_of[i]) for i in rerank(cands, scores, k)[0].tolist() if i > 0]

    def publish(self, artifact_root: str | Path) -> int:
        """Publishes the fitted models as a new serving version; returns its number.

        Needs ``evaluate`` first: the manifest carries its metrics and the quality gate
        (``trainer.publish.quality_gate``, unless ``publish.gate`` is off) refuses a model no better than
        popularity or clearly worse than the served version, as the command line does.
        """
        fitted = self._require_fitted("publish")
        if self._report is None:
            raise RuntimeError("publish needs evaluate(test_df) first: the manifest carries its metrics "
                               "and the quality gate reads them")
        root = Path(artifact_root)
        cfg = replace(self._cfg, publish={"artifact_root": str(root)})
        signer = signer_for(cfg.publish.signing_key, cfg.publish.unsigned)
        report = dict(self._report)       # the gate's verdict and the timings go into a copy
        refused = apply_gate(cfg, report, root)
        if refused is not None:
            raise RuntimeError(f"not published: {refused}")
        report["timings"] = dict(self._timings.seconds)
        with tempfile.TemporaryDirectory() as report_dir:
            write_report(report, fitted.histories, Path(report_dir))
            return publish_evaluated(cfg, root, fitted.run, report, Path(report_dir), signer)

    def _require_fitted(self, what: str) -> _Fitted:
        if self._fitted is None:
            raise RuntimeError(f"{what} needs a fitted trainer: call fit(train_df, val_df) first")
        return self._fitted


def _is_int(dtype) -> bool:
    return pd.api.types.is_integer_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)


# Column -> (accepts the dtype, what is expected): checked before the values are.
_DTYPES = {
    "user_id": (lambda d: pd.api.types.is_string_dtype(d) or _is_int(d), "a str dtype (or integer ids)"),
    "item_id": (_is_int, "an integer dtype (int64 ids)"),
    "rating": (lambda d: pd.api.types.is_numeric_dtype(d) and not pd.api.types.is_bool_dtype(d),
               "a numeric dtype (float32 ratings)"),
    "timestamp": (lambda d: _is_int(d) or pd.api.types.is_datetime64_any_dtype(d),
                  "an integer dtype (Unix seconds) or a datetime64 dtype"),
}


def _interaction_frame(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """The contract's four columns of a caller's frame, checked; ValueError naming the column."""
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"{source} must be a pandas DataFrame, got {type(frame).__name__}")
    for column in INTERACTION_COLUMNS:
        if column not in frame.columns:
            raise ValueError(f"{source} is missing column {column!r}; expected {list(INTERACTION_COLUMNS)} "
                             f"plus optional user_*/item_* features, got {[str(c) for c in frame.columns]}")
    for column, (accepts, expected) in _DTYPES.items():
        if not accepts(frame[column].dtype):
            raise ValueError(f"{source} column {column!r} must have {expected}, got dtype {frame[column].dtype}")
    ignored = [str(c) for c in frame.columns
               if c not in INTERACTION_COLUMNS and not str(c).startswith(("user_", "item_"))]
    if ignored:
        log.warning("%s: ignoring columns %s (not user_*/item_* features)", source, ignored)
    timestamps = frame["timestamp"]
    if pd.api.types.is_datetime64_any_dtype(timestamps.dtype):
        timestamps = (pd.to_datetime(timestamps, utc=True) - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    columns = frame[list(INTERACTION_COLUMNS)].assign(timestamp=timestamps).reset_index(drop=True)
    checked = validate_interactions(columns, source)
    return checked.sort_values(["user_id", "timestamp", "item_id"], kind="stable").reset_index(drop=True)


def _side_table(given: pd.DataFrame | None, frames: list[tuple[pd.DataFrame, str]], key: str,
                what: str) -> pd.DataFrame | None:
    """The users or items table: ``given``, or built from the frames' ``<prefix>_*`` columns."""
    prefix = key.removesuffix("id")
    columns = sorted({str(c) for frame, _ in frames for c in frame.columns
                      if str(c).startswith(prefix) and c != key})
    if given is not None:
        if columns:
            raise ValueError(f"{what} features must come either as {prefix}* columns or as {what}=, "
                             f"got both ({what}= and columns {columns})")
        if not isinstance(given, pd.DataFrame) or key not in given.columns:
            raise ValueError(f"{what} must be a DataFrame with a {key!r} column, got "
                             f"{list(given.columns) if isinstance(given, pd.DataFrame) else type(given).__name__}")
        return _with_key_dtype(given.reset_index(drop=True), key, what)
    if not columns:
        return None
    rows = pd.concat([frame[[key, *[c for c in columns if c in frame.columns]]] for frame, _ in frames],
                     ignore_index=True)
    rows = _with_key_dtype(rows, key, what)
    conflicting = rows.groupby(key)[columns].nunique() > 1                    # (ids, columns)
    if conflicting.to_numpy().any():
        column = columns[int(np.flatnonzero(conflicting.to_numpy().any(axis=0))[0])]
        example = conflicting.index[conflicting[column].to_numpy()][0]
        raise ValueError(f"column {column!r} must hold one value per {key}, got several for {key} {example!r}")
    table = rows.groupby(key, sort=True)[columns].first().reset_index()     # first non-missing value
    return table.rename(columns={c: c.removeprefix(prefix) for c in columns})


def _with_key_dtype(table: pd.DataFrame, key: str, what: str) -> pd.DataFrame:
    """``table`` with its id column in the contract's dtype (user_id str, item_id int64)."""
    ids = table[key]
    if key == "user_id":
        if not _DTYPES["user_id"][0](ids.dtype):
            raise ValueError(f"{what} column 'user_id' must have {_DTYPES['user_id'][1]}, got dtype {ids.dtype}")
        return table.assign(user_id=ids.astype("str"))
    if not _is_int(ids.dtype):
        raise ValueError(f"{what} column 'item_id' must have {_DTYPES['item_id'][1]}, got dtype {ids.dtype}")
    return table.assign(item_id=ids.astype(np.int64))


def _with_known_ids(frame: pd.DataFrame, users: pd.DataFrame | None, items: pd.DataFrame | None) -> pd.DataFrame:
    """The rows whose ids the side tables have: ``make_dataset`` drops (and counts) the others."""
    keep = np.ones(len(frame), dtype=bool)
    if users is not None:
        keep &= frame["user_id"].isin(users["user_id"]).to_numpy()
    if items is not None:
        keep &= frame["item_id"].isin(items["item_id"]).to_numpy()
    return frame if keep.all() else frame[keep].reset_index(drop=True)


__all__ = ["ModelConfig", "ProductionTrainer"]
