"""The data stage of a run: the configured log loaded, split, features fitted on train, targets built.

``load_dataset`` resolves ``data.dataset`` (a path, or a name under the data dir, downloaded when
missing); ``prepare`` splits it (or takes a given split, as the notebook API does), fits the id
vocabulary and the feature spec on the training split only, and builds the validation and test
targets and the test's context: under the temporal and leave-one-out protocols each user's validation
interactions, which come before the test ones, join the history the models read when judged on test
(and EASE's rows), as a served user's recorded interactions do (``eval.test_context``: "auto";
"validation" or "train" force one). ``Prepared`` is what every later stage reads. Nothing here trains or evaluates a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from trainer.config import TrainConfig
from trainer.data import (DataError, Dataset, data_dir_from_env, ensure_movielens, is_movielens_folder,
                          load_interactions, load_movielens, logs_in)
from trainer.features import FeatureTables, IdVocab, build_tables, fit_feature_spec, fit_id_vocab, with_known
from trainer.full_ranking import EvalTarget, make_target, sample_users
from trainer.retrieval_training import Interactions
from trainer.splits import Split, split_by_name


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
    eval_timestamps: np.ndarray  # (n+1,) each user's last training timestamp: the context at validation
    # What the models know of each user when judged on test (``eval.test_context``): the splits' frames
    # (train, and by default validation), the tables with those histories and each user's last timestamp in them.
    test_known: tuple[pd.DataFrame, ...]
    test_tables: FeatureTables
    test_timestamps: np.ndarray  # (n+1,)

    @property
    def test_context(self) -> str:
        """The interactions every model knows of the test users, in words: "train" or "train + validation"."""
        return "train + validation" if len(self.test_known) > 1 else "train"


# Every run is judged (and its ranker stopped) by NDCG@10, so a catalog needs at least 10 items.
HEADLINE_K = 10
# Fewer validation or test users than this: the log is too small to stop training on or to evaluate
# (the ranker splits the validation users' items in two halves).
MIN_EVAL_USERS = 2
SEPARATOR_NAMES = {"auto": "auto", "comma": ",", "tab": "\t", "semicolon": ";", "pipe": "|", "space": " "}


def load_dataset(cfg: TrainConfig) -> Dataset:
    """The configured log: a path (MovieLens folder or generic CSV/Parquet) or a name under the data dir."""
    name = cfg.data.dataset
    path = Path(name)
    if not path.exists():
        data_dir = Path(cfg.data.data_dir) if cfg.data.data_dir else data_dir_from_env()
        path = data_dir / name
        if not path.exists():
            path = ensure_movielens(name, data_dir)
    notes = []
    if path.is_dir():
        if is_movielens_folder(path):
            return load_movielens(path)
        found = logs_in(path)
        ratings = [p for p in found if p.name == "ratings.csv"]
        if len(found) == 1:
            notes.append(f"the folder {path} holds one log file, {found[0].name}: read as a generic log")
        elif ratings:
            # A ratings.csv that is not MovieLens' (goodbooks' user_id,book_id,rating beside books.csv): the
            # folder's log by its name, its side files unread.
            others = [p.name for p in found if p != ratings[0]]
            notes.append(f"the folder {path} is not a MovieLens folder (its ratings.csv names no userId and "
                         f"movieId columns): ratings.csv read as a generic log, {others[:10]} not read")
            found = ratings
        else:
            raise DataError(f"{path}: not a MovieLens folder (no u.data / ratings.dat / ratings.csv) and not a folder "
                            f"with one log file: it holds {[p.name for p in found][:10]}; pass the log itself "
                            "with --dataset FILE")
        path = found[0]
    return load_interactions(path, columns=cfg.data.column_map or None, sep=SEPARATOR_NAMES[cfg.data.sep],
                             bad_rows=cfg.data.bad_rows, notes=notes)


def interactions(vocab: IdVocab, frame: pd.DataFrame) -> Interactions:
    """A frame's rows as index arrays (unknown ids become index 0)."""
    return Interactions(vocab.users_to_idx(frame["user_id"].to_numpy()),
                        vocab.items_to_idx(frame["item_id"].to_numpy()),
                        frame["timestamp"].to_numpy().astype(np.int64),
                        frame["rating"].to_numpy().astype(np.float32))


def held_out(vocab: IdVocab, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, timestamps, ratings) of a held-out frame's rows whose user and item are known."""
    rows = interactions(vocab, frame)
    keep = (rows.users > 0) & (rows.items > 0)
    return rows.users[keep], rows.items[keep], rows.timestamps[keep], rows.ratings[keep]


def resolved_test_context(cfg: TrainConfig) -> str:
    """``eval.test_context`` resolved: "auto" is "validation" under the protocols whose validation interactions
    precede the test ones (temporal, leave-one-out), "train" under random, where they may follow them."""
    if cfg.eval.test_context != "auto":
        return cfg.eval.test_context
    return "train" if cfg.data.protocol == "random" else "validation"


def prepare(cfg: TrainConfig, dataset: Dataset, split: Split | None = None) -> Prepared:
    """Splits (unless a split is given), fits the features on train, builds the evaluation targets.
    DataError for a log too small to train and judge on, when the split is the run's own (the notebook
    API gives its own split, may leave test empty and checks its validation frame itself)."""
    own_split = split is None
    split = split if split is not None else split_by_name(cfg.data.protocol, dataset.interactions,
                                                          seed=cfg.data.seed)
    vocab = fit_id_vocab(split.train)
    need = max(HEADLINE_K, *cfg.eval.ks)
    if own_split and vocab.n_items < need:
        raise DataError(f"{dataset.name}: the {cfg.data.protocol} split's training part holds {vocab.n_items} "
                        f"item(s); every model is judged on its top {need} (NDCG@{HEADLINE_K}, eval.ks "
                        f"{list(cfg.eval.ks)}), so the catalog needs at least {need} items")
    spec = fit_feature_spec(split.train, dataset.users, dataset.items,
                            history_length=cfg.features.history_length)
    tables = build_tables(spec, vocab, split.train, dataset.users, dataset.items)
    train = interactions(vocab, split.train)
    eval_ts = np.zeros(vocab.n_users + 1, dtype=np.int64)
    np.maximum.at(eval_ts, train.users, train.timestamps)
    val = sample_users(make_target(vocab, split.val, [split.train]), cfg.eval.max_users, cfg.run.seed)
    test = sample_users(make_target(vocab, split.test, [split.train, split.val]), cfg.eval.max_users, cfg.run.seed + 1)
    for name, target in (("validation", val), ("test", test)) if own_split else ():
        if target.users.size < MIN_EVAL_USERS:
            raise DataError(f"{dataset.name}: the {cfg.data.protocol} split leaves {target.users.size} user(s) with a "
                            f"{name} item the training split knows, from {len(dataset.interactions):,} interactions of "
                            f"{dataset.interactions['user_id'].nunique():,} users; at least {MIN_EVAL_USERS} are needed "
                            "to train and evaluate (users need several interactions each)")
    test_known, test_tables, test_ts = (split.train,), tables, eval_ts
    if resolved_test_context(cfg) == "validation" and len(split.val):
        test_known = (split.train, split.val)
        test_tables = with_known(tables, pd.concat(test_known, ignore_index=True))
        known = held_out(vocab, split.val)
        test_ts = eval_ts.copy()
        np.maximum.at(test_ts, known[0], known[2])
    return Prepared(dataset, split, vocab, spec, tables, train, val, test, eval_ts, test_known, test_tables, test_ts)
