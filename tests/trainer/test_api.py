"""Tests of trainer.api (ModelConfig, ProductionTrainer) and trainer.legacy_pickle.

The happy path fits once per module on MovieLens 100K with tiny epochs and small towers (the
command line's code path, just shorter); the error tests use a three-row log and stop before training.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import trainer
from recsys_contracts import artifacts
from tests.signing_keys import SIGNER, TRUST
from trainer.api import ModelConfig, ProductionTrainer
from trainer.config import TrainConfig, replace
from trainer.data import load_movielens
from trainer.legacy_pickle import load_parquet_folder, load_processed_data, main, save_parquet_folder
from trainer.splits import random_split

REPO_ROOT = Path(__file__).resolve().parents[2]
# Small and short: ~12 s of training on one thread (one retrieval epoch = one pass over the training
# interactions), where the command line's defaults train for minutes.
FAST_MODEL = ModelConfig(embedding_dim=32, user_tower_dims=[64], item_tower_dims=[64],
                         negative_sampling_strategy="mixed", ctr_weight=1.0, rating_weight=0.5,
                         learning_rate=5e-3, epochs=1, batch_size=64, ranking_learning_rate=3e-3,
                         ranking_epochs=2, candidates=50)
# One torch thread: on a shared 2-core machine more threads spin against each other (10x slower).
FAST_BASE = replace(TrainConfig(), features={"history_length": 20},
                    retrieval={"num_negatives": 64, "positives_per_user": 8},
                    ranking={"embedding_dim": 8, "cross_layers": 1, "deep_dims": [32],
                             "negatives_per_positive": 2, "batch_size": 4096},
                    eval={"ease_grid": [500.0], "retrieval_ks": [10, 50]}, run={"threads": 1})


def with_features(frame: pd.DataFrame, dataset) -> pd.DataFrame:
    """The notebook shape: interactions with their user_* and item_* feature columns alongside."""
    users = dataset.users.add_prefix("user_").rename(columns={"user_user_id": "user_id"})
    items = dataset.items.add_prefix("item_").rename(columns={"item_item_id": "item_id"})
    return frame.merge(users, on="user_id", how="left").merge(items, on="item_id", how="left")


@dataclass(frozen=True)
class Fitted:
    trainer: ProductionTrainer
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    metrics: dict
    progress: str                    # what fit wrote to stderr
    publish_before_evaluate: str     # the error publish raised between fit and evaluate


@pytest.fixture(scope="module")
def fitted(ml100k_dir) -> Fitted:
    dataset = load_movielens(ml100k_dir)
    split = random_split(dataset.interactions, seed=2020)
    train, val = with_features(split.train, dataset), with_features(split.val, dataset)
    fit = ProductionTrainer(FAST_MODEL, base=FAST_BASE)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        fit.fit(train, val)
    with pytest.raises(RuntimeError) as before:
        fit.publish("unused")
    return Fitted(fit, train, val, split.test, fit.evaluate(split.test), stderr.getvalue(), str(before.value))


def tiny_log(users=("a", "a", "b")) -> pd.DataFrame:
    return pd.DataFrame({"user_id": pd.Series(users, dtype="str"),
                         "item_id": np.arange(1, len(users) + 1, dtype=np.int64),
                         "rating": np.full(len(users), 4.0, dtype=np.float32),
                         "timestamp": np.arange(len(users), dtype=np.int64) * 60})


# --- ModelConfig ---------------------------------------------------------------------------------

def test_model_config_maps_the_original_names_onto_the_train_config():
    cfg = ModelConfig(embedding_dim=48, user_tower_dims=[96, 48], item_tower_dims=[80, 48],
                      negative_sampling_strategy="hard", ctr_weight=0.7, rating_weight=0.3,
                      learning_rate=1e-3, epochs=5, batch_size=64, ranking_learning_rate=4e-4,
                      ranking_epochs=4, candidates=200, seed=9)
    train_cfg = cfg.to_train_config()
    assert (train_cfg.retrieval.embedding_dim, train_cfg.retrieval.user_tower_dims,
            train_cfg.retrieval.item_tower_dims) == (48, (96, 48), (80, 48))
    assert train_cfg.retrieval.negative_sampling_strategy == "hard"
    assert (train_cfg.retrieval.learning_rate, train_cfg.retrieval.epochs, train_cfg.retrieval.batch_size) == \
        (1e-3, 5, 64)
    assert (train_cfg.ranking.learning_rate, train_cfg.ranking.epochs, train_cfg.ranking.candidates) == (4e-4, 4, 200)
    assert (train_cfg.multitask.ctr_weight, train_cfg.multitask.rating_weight) == (0.7, 0.3)
    assert train_cfg.run.seed == 9
    assert cfg.user_tower_dims == (96, 48) and hash(cfg) == hash(ModelConfig(**cfg.__dict__))


def test_model_config_defaults_are_the_command_lines_and_a_base_keeps_other_settings():
    defaults = TrainConfig()
    assert ModelConfig().to_train_config() == defaults
    base = replace(defaults, eval={"ks": [5, 10]}, run={"device": "auto"})
    merged = ModelConfig(epochs=2).to_train_config(base)
    assert (merged.eval.ks, merged.run.device, merged.retrieval.epochs) == ((5, 10), "auto", 2)
    # Without a base the towers train in the caller's process (no worker to import its script again);
    # a base decides for itself.
    assert ProductionTrainer(ModelConfig()).train_config == replace(defaults, run={"tower_workers": 1})
    assert ProductionTrainer(ModelConfig(), base=defaults).train_config.run.tower_workers == 0


def test_unknown_negative_sampling_strategy_names_it_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"negative_sampling_strategy must be one of "
                                         r"\('random', 'hard', 'mixed'\), got 'popular'"):
        ModelConfig(negative_sampling_strategy="popular")


def test_bad_model_config_values_fail_at_construction_with_their_config_key():
    with pytest.raises(ValueError, match=r"retrieval.embedding_dim must be > 0, got 0"):
        ModelConfig(embedding_dim=0)


def test_trainer_needs_a_model_config():
    with pytest.raises(ValueError, match="config must be a ModelConfig, got dict"):
        ProductionTrainer({"embedding_dim": 64})


def test_the_api_is_importable_from_the_trainer_package():
    assert trainer.ModelConfig is ModelConfig and trainer.ProductionTrainer is ProductionTrainer
    with pytest.raises(AttributeError, match="no attribute 'Trainer'"):
        trainer.Trainer  # noqa: B018


# --- fit, evaluate, recommend, publish on MovieLens 100K ------------------------------------------

@pytest.mark.slow
def test_fit_shows_progress_and_runs_the_configured_epochs(fitted):
    assert "retrieval" in fitted.progress and "ranking" in fitted.progress
    histories = fitted.trainer.histories
    assert [r["epoch"] for r in histories["retrieval"]] == [0]
    assert [r["epoch"] for r in histories["ranking"]] == [-1, 0, 1]  # -1: the untrained ranker (retrieval order)
    assert fitted.trainer.train_config.retrieval.embedding_dim == 32


@pytest.mark.slow
def test_evaluate_returns_the_report_metrics(fitted):
    metrics = fitted.metrics
    for section in ("pipeline", "two_tower"):
        for name in ("recall", "precision", "ndcg", "map", "mrr"):
            for k in (10, 20):
                assert 0.0 <= metrics[section][f"{name}@{k}"] <= 1.0, (section, name, k)
        assert 0.0 < metrics[section]["coverage@20"] <= 1.0
        assert 0.0 < metrics[section]["diversity@20"] <= 1.0
    assert set(metrics["ranking_heads"]) == {"ctr_auc", "ctr_logloss", "rating_rmse"}
    assert all(np.isfinite(v) for v in metrics["ranking_heads"].values())
    assert set(metrics["baselines"]) == {"popularity", "ease"}
    assert set(metrics["retrieval"]) == {"recall@10", "recall@50"}
    # Even one epoch learns something: the full pipeline beats popularity (the publish gate's bar).
    assert metrics["pipeline"]["ndcg@10"] > metrics["baselines"]["popularity"]["ndcg@10"]
    data = metrics["data"]
    assert (data["protocol"], data["train"], data["val"]) == ("given", len(fitted.train), len(fitted.val))
    assert data["test_users"] == fitted.test["user_id"].nunique()  # every ML-100K user has train items


@pytest.mark.slow
def test_evaluate_accepts_int_user_ids_and_datetime_timestamps(fitted):
    test = fitted.test.assign(user_id=fitted.test["user_id"].astype(np.int64),
                              timestamp=pd.to_datetime(fitted.test["timestamp"], unit="s"))
    assert fitted.trainer.evaluate(test)["pipeline"] == fitted.metrics["pipeline"]


@pytest.mark.slow
def test_evaluate_needs_test_rows_of_known_users_and_items(fitted):
    with pytest.raises(ValueError, match=r"test_df must hold interactions of users and items seen in fit, "
                                         r"got none of its 3 rows"):
        fitted.trainer.evaluate(tiny_log(users=("nobody-1", "nobody-2", "nobody-3")))


def _seen(fitted: Fitted, user: str) -> set[int]:
    frames = (fitted.train, fitted.val)
    return {int(i) for frame in frames for i in frame.loc[frame["user_id"] == user, "item_id"]}


@pytest.mark.slow
def test_recommend_for_a_known_user_excludes_seen_items(fitted):
    recs = fitted.trainer.recommend(user_id="42", k=10)
    assert len(recs) == 10 and len({item for item, _ in recs}) == 10
    assert all(isinstance(item, int) and isinstance(score, float) for item, score in recs)
    scores = [score for _, score in recs]
    assert scores == sorted(scores, reverse=True)
    assert not {item for item, _ in recs} & _seen(fitted, "42")
    assert fitted.trainer.recommend(user_id=42, k=10) == recs


@pytest.mark.slow
def test_recommend_can_include_seen_items(fitted):
    heaviest = fitted.train["user_id"].value_counts().index[0]
    recs = fitted.trainer.recommend(user_id=heaviest, k=50, exclude_seen=False)
    assert len(recs) == 50
    # A user who rated hundreds of films: the model ranks some of them among its top 50.
    assert {item for item, _ in recs} & _seen(fitted, heaviest)


@pytest.mark.slow
def test_recommend_for_an_unknown_user_gives_popular_items(fitted):
    recs = fitted.trainer.recommend(user_id="never-seen", k=5)
    counts = fitted.train.groupby("item_id").size()
    # Most training interactions first, ties by item id (the vocabulary is sorted).
    expected = counts.sort_index().sort_values(ascending=False, kind="stable").head(5)
    assert [item for item, _ in recs] == expected.index.tolist()
    assert [score for _, score in recs] == pytest.approx(np.log(expected.to_numpy()).tolist())


@pytest.mark.slow
@pytest.mark.parametrize("k", [0, -1, 1.5, True, 10**6])
def test_recommend_rejects_bad_k(fitted, k):
    with pytest.raises(ValueError, match=rf"k must be an integer in \[1, \d+\], got {k!r}"):
        fitted.trainer.recommend(user_id="42", k=k)


@pytest.mark.slow
@pytest.mark.parametrize("user_id", ["", None, 4.2, True])
def test_recommend_rejects_bad_user_ids(fitted, user_id):
    with pytest.raises(ValueError, match=rf"user_id must be a non-empty str \(or int\), got {user_id!r}"):
        fitted.trainer.recommend(user_id=user_id)


@pytest.mark.slow
def test_publish_hands_a_complete_version_to_the_services(fitted, tmp_path):
    version = fitted.trainer.publish(tmp_path)
    assert version == 1 and artifacts.current_version(tmp_path) == 1
    manifest = artifacts.verify(tmp_path, 1, TRUST)  # every file present with its checksum
    assert manifest.config["retrieval"]["embedding_dim"] == 32
    assert manifest.metrics["pipeline"]["ndcg@10"] == pytest.approx(fitted.metrics["pipeline"]["ndcg@10"])
    assert {"user_tower.onnx", "ranker.onnx", "index.faiss", "report.json", "report.md", "item_metadata.parquet",
            "recent_interactions.parquet"} <= set(manifest.files)
    # The user_*/item_* columns became the side tables' features.
    spec = json.loads((artifacts.version_dir(tmp_path, 1) / "feature_spec.json").read_text())
    assert {c["name"] for c in spec["user_categorical"]} >= {"gender", "occupation"}
    assert "Comedy" in spec["item_genres"]


@pytest.mark.slow
def test_publish_is_refused_below_the_served_version(fitted, tmp_path):
    served = artifacts.publish(tmp_path, lambda folder: (folder / "note.txt").write_text("served\n"),
                               signer=SIGNER, data={"dataset": "dataframes", "protocol": "given"}, config={},
                               metrics={"pipeline": {"ndcg@10": 0.99}})
    with pytest.raises(RuntimeError, match=r"not published: pipeline NDCG@10 .* more than 5% below the served "
                                           r"version 1's 0.9900"):
        fitted.trainer.publish(tmp_path)
    assert artifacts.list_versions(tmp_path) == [served]


@pytest.mark.slow
def test_publish_needs_evaluate_first(fitted):
    assert "publish needs evaluate(test_df) first" in fitted.publish_before_evaluate


@pytest.mark.parametrize("call", [lambda t: t.evaluate(tiny_log()), lambda t: t.recommend("a"),
                                  lambda t: t.publish("root"), lambda t: t.histories])
def test_methods_before_fit_say_to_call_fit(call):
    with pytest.raises(RuntimeError, match=r"needs a fitted trainer: call fit\(train_df, val_df\) first"):
        call(ProductionTrainer(FAST_MODEL))


# --- bad input (each fails before any training) ---------------------------------------------------

def _fit(train: pd.DataFrame, val: pd.DataFrame | None = None, **kwargs) -> None:
    ProductionTrainer(FAST_MODEL, base=FAST_BASE).fit(train, tiny_log() if val is None else val, **kwargs)


def test_frames_must_be_dataframes():
    with pytest.raises(ValueError, match="train_df must be a pandas DataFrame, got list"):
        _fit([("a", 1, 4.0, 0)])


@pytest.mark.parametrize("column", ["user_id", "item_id", "rating", "timestamp"])
def test_a_missing_column_is_named(column):
    with pytest.raises(ValueError, match=rf"val_df is missing column '{column}'; expected \['user_id', "
                                         rf"'item_id', 'rating', 'timestamp'\]"):
        _fit(tiny_log(), tiny_log().drop(columns=column))


@pytest.mark.parametrize("column, values, expected", [
    ("user_id", [1.0, 1.0, 2.0], r"a str dtype \(or integer ids\)"),
    ("item_id", ["1", "2", "3"], r"an integer dtype \(int64 ids\)"),
    ("rating", ["4", "4", "4"], r"a numeric dtype \(float32 ratings\)"),
    ("rating", [True, False, True], r"a numeric dtype \(float32 ratings\)"),
    ("timestamp", [0.5, 1.0, 2.0], r"an integer dtype \(Unix seconds\) or a datetime64 dtype"),
])
def test_a_wrong_dtype_names_the_column_and_the_expected_type(column, values, expected):
    with pytest.raises(ValueError, match=rf"train_df column '{column}' must have {expected}, got dtype"):
        _fit(tiny_log().assign(**{column: values}))


def test_bad_values_are_reported_with_their_row():
    with pytest.raises(ValueError, match=r"train_df, row 2, column 'rating': rating is missing"):
        _fit(tiny_log().assign(rating=[4.0, np.nan, 3.0]))


def test_feature_columns_must_hold_one_value_per_id():
    with pytest.raises(ValueError, match=r"column 'user_age' must hold one value per user_id, "
                                         r"got several for user_id 'a'"):
        _fit(tiny_log().assign(user_age=[20, 30, 40]))


def test_features_come_as_columns_or_as_a_table_not_both():
    users = pd.DataFrame({"user_id": ["a", "b"], "age": [20, 30]})
    with pytest.raises(ValueError, match=r"users features must come either as user_\* columns or as users=, "
                                         r"got both \(users= and columns \['user_age'\]\)"):
        _fit(tiny_log().assign(user_age=[20, 20, 30]), users=users)


def test_side_tables_need_their_id_column_with_the_right_dtype():
    with pytest.raises(ValueError, match=r"users must be a DataFrame with a 'user_id' column, got \['age'\]"):
        _fit(tiny_log(), users=pd.DataFrame({"age": [20]}))
    with pytest.raises(ValueError, match=r"users column 'user_id' must have a str dtype \(or integer ids\), "
                                         r"got dtype float64"):
        _fit(tiny_log(), users=pd.DataFrame({"user_id": [1.0], "age": [20]}))
    with pytest.raises(ValueError, match=r"items column 'item_id' must have an integer dtype \(int64 ids\), "
                                         r"got dtype str"):
        _fit(tiny_log(), items=pd.DataFrame({"item_id": pd.Series(["1"], dtype="str"), "year": [1999.0]}))


def test_validation_needs_users_and_items_that_train_has():
    with pytest.raises(ValueError, match=r"val_df must hold interactions of users and items that train_df has "
                                         r"\(early stopping ranks them\), got none of its 3 rows"):
        _fit(tiny_log(), tiny_log(users=("x", "y", "z")))


# --- legacy pickle ---------------------------------------------------------------------------------

@pytest.fixture
def legacy(tmp_path) -> tuple[Path, dict[str, pd.DataFrame]]:
    frames = {"train": tiny_log().assign(user_gender=["F", "F", "M"]), "val": tiny_log(users=("a",)),
              "test": tiny_log(users=("b", "b"))}
    path = tmp_path / "processed_data.pkl"
    path.write_bytes(pickle.dumps(frames))
    return path, frames


def _assert_same(loaded: dict[str, pd.DataFrame], frames: dict[str, pd.DataFrame]) -> None:
    assert sorted(loaded) == sorted(frames)
    for name, frame in frames.items():
        pd.testing.assert_frame_equal(loaded[name], frame)


def test_a_pickle_is_refused_without_the_trust_flag(legacy):
    path, _ = legacy
    with pytest.raises(ValueError, match=r"trust_pickle must be True .* got False: unpickling runs code .*"
                                         r"`python -m trainer.legacy_pickle .* --trust-pickle`"):
        load_processed_data(path)


def test_a_trusted_pickle_is_read_with_a_warning(legacy, caplog):
    path, frames = legacy
    with caplog.at_level(logging.WARNING, logger="trainer.legacy_pickle"):
        _assert_same(load_processed_data(path, trust_pickle=True), frames)
    assert "runs code from the file" in caplog.text


@pytest.mark.parametrize("content, message", [
    ([1, 2], "must hold a non-empty dict of name -> DataFrame, got list"),
    ({}, "must hold a non-empty dict of name -> DataFrame, got dict"),
    ({"../train": pd.DataFrame()}, r"frame names must match .* got '../train'"),
    ({"train": {"a": 1}}, r"\['train'\] must be a pandas DataFrame, got dict"),
])
def test_a_pickle_that_is_not_a_dict_of_frames_is_rejected(tmp_path, content, message):
    path = tmp_path / "odd.pkl"
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(ValueError, match=message):
        load_processed_data(path, trust_pickle=True)


def test_parquet_folder_round_trip(legacy, tmp_path):
    _, frames = legacy
    paths = save_parquet_folder(frames, tmp_path / "out")
    assert sorted(p.name for p in paths) == ["test.parquet", "train.parquet", "val.parquet"]
    _assert_same(load_parquet_folder(tmp_path / "out"), frames)


def test_parquet_folder_errors(legacy, tmp_path):
    _, frames = legacy
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="folder must be absent or an empty folder"):
        save_parquet_folder(frames, tmp_path / "full")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_parquet_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"folder must hold at least one .parquet file, found none"):
        load_parquet_folder(tmp_path / "empty")


@pytest.mark.slow
def test_the_one_line_converter_round_trips(legacy, tmp_path):
    path, frames = legacy
    out = tmp_path / "converted"
    done = subprocess.run([sys.executable, "-m", "trainer.legacy_pickle", str(path), str(out), "--trust-pickle"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "runs code from the file" in done.stderr
    _assert_same(load_parquet_folder(out), frames)


def test_the_converter_refuses_without_the_flag(legacy, tmp_path, capsys):
    path, _ = legacy
    assert main([str(path), str(tmp_path / "converted")]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert not (tmp_path / "converted").exists()
