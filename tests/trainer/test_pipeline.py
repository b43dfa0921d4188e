"""The trainer's whole job on small synthetic data: train, evaluate, report, gate, publish, Redis."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import redis
import torch

from ranking_service.state import load_state as load_ranking
from recsys_contracts import artifacts, feature_store, item_metadata
from retrieval_service.backends import open_backend
from retrieval_service.state import load_state as load_retrieval
from tests.signing_keys import SIGNER, TRUST
from recsys_contracts.programs import USER_TOWER, load_program
from trainer import job
from trainer.config import TrainConfig, load_config, replace
from trainer.data.synthetic import generate
from trainer.features import FeatureTables
from trainer.inputs import user_inputs
from trainer.losses import NonFiniteLossError
from trainer.models.sequential import SequentialUserTower

SMALL = ["retrieval.epochs=3", "retrieval.embedding_dim=16", "retrieval.user_tower_dims=32",
         "retrieval.item_tower_dims=32", "retrieval.num_negatives=32", "ranking.epochs=2",
         "ranking.deep_dims=32", "ranking.candidates=50", "features.history_length=20",
         "eval.retrieval_ks=10,20,50", "eval.ease_grid=10,100", "run.progress=false", "run.threads=1",
         "retrieval.autoencoder_hidden=32"]


@pytest.fixture(scope="module")
def dataset():
    return generate(120, 200, 5000, seed=3)


def small_config(tmp_path, *extra):
    return load_config(None, SMALL + [f"run.output_dir={tmp_path / 'run'}", *extra])


def test_run_publishes_a_verified_version_with_report_and_redis_features(tmp_path, dataset, redis_url,
                                                                           redis_namespace):
    root = tmp_path / "artifacts"
    cfg = small_config(tmp_path, f"publish.artifact_root={root}", f"publish.redis_url={redis_url}",
                       f"publish.redis_namespace={redis_namespace}", "publish.gate=false")
    result = job.run(cfg, dataset)
    assert result.refused is None and result.version == 1
    manifest = artifacts.verify(root, 1, TRUST)
    for name in ("user_tower.onnx", "ranker.onnx", "index.faiss", "report.json", "report.md",
                 "training_curves.png", "recall_at_k.png", "popularity.png"):
        assert name in manifest.files
    assert manifest.metrics["pipeline"]["ndcg@10"] == pytest.approx(result.report["pipeline"]["ndcg@10"])
    # The report is written again after publishing (plots left as they are) with the publish stage's time.
    written = json.loads((tmp_path / "run" / "report.json").read_text())
    assert "export_index_publish_go_live" in written["timings"]
    assert (tmp_path / "run" / "training_curves.png").stat().st_size > 0
    assert manifest.extra["index"]["recall@100"] == 1.0          # flat index below the size threshold
    assert set(manifest.extra["index_seconds"]) == {"build", "recall"}
    assert set(result.report["retrieval"]) == {"recall@10", "recall@20", "recall@50"}
    assert {"popularity", "ease"} <= set(result.report["baselines"])
    # Every ratio of the report's aims comes with its noise: paired over the same test users.
    paired = result.report["paired"]
    assert {"pipeline / ease", "pipeline / two_tower", "two_tower / ease"} <= set(paired)
    assert ("pipeline / pipeline_start" in paired) == ("pipeline_start" in result.report)
    assert paired["pipeline / ease"]["ratio"] == pytest.approx(
        result.report["pipeline"]["ndcg@10"] / result.report["baselines"]["ease"]["ndcg@10"])
    assert paired["two_tower / ease"]["users"] == result.report["data"]["test_users"]
    low, high = paired["pipeline / two_tower"]["ratio_95"]
    assert low <= paired["pipeline / two_tower"]["ratio"] <= high
    assert "Paired over the" in (tmp_path / "run" / "report.md").read_text()
    client = redis.Redis.from_url(redis_url)
    pipe = client.pipeline(transaction=False)
    feature_store.queue_is_complete(pipe, feature_store.KeyFormat(redis_namespace), 1)
    assert feature_store.parse_is_complete(pipe.execute()[0])
    # The published user tower is the trained one: same embeddings as the eager module.
    tower = load_program(artifacts.version_dir(root, 1) / "user_tower.onnx", USER_TOWER)
    users = np.arange(1, 6)
    inputs = user_inputs(result.run.tables, users, np.full(5, 10**9))
    with torch.no_grad():
        eager = result.run.two_tower.user_tower(**inputs).numpy()
    assert np.allclose(tower(**{k: v.numpy() for k, v in inputs.items()})[0], eager, atol=1e-5)
    # The models learnt from train, but the version serves users knowing the whole log: each user's latest
    # interactions (validation and test ones) end the history, the seen items hold them, the page shows them.
    published = FeatureTables.load(artifacts.version_dir(root, 1))
    prep, log = result.prepared, dataset.interactions
    users, items = prep.vocab.users_to_idx(log["user_id"].to_numpy()), prep.vocab.items_to_idx(log["item_id"].to_numpy())
    held = prep.vocab.users_to_idx(prep.split.test["user_id"].to_numpy())
    checked = 0
    for user in np.unique(held[held > 0])[:20]:
        mine = (users == user) & (items > 0)
        order = np.lexsort((items[mine], log["timestamp"].to_numpy()[mine]))
        latest = items[mine][order][-prep.spec.history_length:]
        row = published.history[user]
        np.testing.assert_array_equal(row[row > 0], latest)
        seen = published.seen_items[published.seen_indptr[user]:published.seen_indptr[user + 1]]
        assert set(np.unique(items[mine]).tolist()) == set(seen.tolist())
        checked += not np.array_equal(row, prep.tables.history[user])   # the training history ended earlier
    assert checked >= 15
    for name in ("user_cat", "user_num", "item_cat", "item_num", "item_counts", "popular_items"):
        np.testing.assert_array_equal(getattr(published, name), getattr(prep.tables, name))
    recent = pd.read_parquet(artifacts.version_dir(root, 1) / "recent_interactions.parquet")
    assert set(zip(recent["user_id"], recent["item_id"])) & set(zip(prep.split.test["user_id"], prep.split.test["item_id"]))


def test_an_implicit_log_with_sku_ids_and_no_timestamps_trains_and_publishes(tmp_path, dataset, caplog):
    """The commonest generic log (user, item pairs only; items named by SKU) runs the whole job: it
    used to stop at the ranker, whose rating range was empty with every rating 1.0. The served item
    titles are the original SKUs, and the rating head predicts the one rating there is."""
    frame = dataset.interactions.sort_values("timestamp", kind="stable")
    path = tmp_path / "pairs.csv"
    pd.DataFrame({"customer": frame["user_id"], "sku": "SKU-" + frame["item_id"].astype(str)}).to_csv(path, index=False)
    root = tmp_path / "artifacts"
    cfg = small_config(tmp_path, f"data.dataset={path}", "data.column_map=user_id:customer,item_id:sku",
                       f"publish.artifact_root={root}", "publish.gate=false")
    with caplog.at_level("INFO", logger="trainer.job"):
        result = job.run(cfg)
    assert result.refused is None and result.version == 1
    # The load report is logged before training starts, so its assumptions are seen at once.
    logged = [r.getMessage() for r in caplog.records if r.name == "trainer.job"]
    assert logged and logged[0].startswith(f"Dataset report: {path}") and "implicit feedback" in logged[0]
    artifacts.verify(root, 1, TRUST)
    assert result.report["pipeline"]["ndcg@10"] > result.report["baselines"]["popularity"]["ndcg@10"] * 0.8
    vocab = result.run.tables.vocab
    metadata = item_metadata.load(artifacts.version_dir(root, 1), vocab.item_ids)
    titles = metadata.describe(np.arange(1, vocab.n_items + 1))
    assert all(title.startswith("SKU-") for title, _genres in titles)
    assert sorted(title for title, _ in titles) == [title for title, _ in titles]     # codes in sorted order
    ranker = result.run.ranker
    assert ranker.rating_min == 1.0 and ranker.rating_range == 0.0
    # What the loader assumed reaches the report (it was only in the notebook API's log before).
    load = result.report["data"]["load"]
    assert (load["rows_read"], load["rows_kept"], load["dropped"]) == (len(frame), len(frame), {})
    assert any("implicit feedback" in w for w in load["warnings"])
    assert any("the file's order is the time order" in w for w in load["warnings"])
    written = (tmp_path / "run" / "report.md").read_text()
    assert f"Loaded {path}: {len(frame):,} rows read, {len(frame):,} kept." in written
    assert "Load warnings:\n- " in written and "implicit feedback" in written
    # Both services load the version (serving.json's rating range is one point).
    directory = artifacts.version_dir(root, 1)
    retrieval_state = load_retrieval(directory, 1, "cpu", open_backend=open_backend)
    ranking_state = load_ranking(directory, 1)
    assert retrieval_state.version == ranking_state.version == 1


def test_the_ranker_replaces_its_start_only_by_a_gain_of_keep_min_t_standard_errors(tmp_path, dataset):
    """ranking.keep_min_t decides what is kept, never how training runs: the same epochs with the same
    stopping-half scores either way; a threshold no epoch reaches serves the start, here retrieval's
    own order (EASE help off, no tower channels), so the pipeline scores exactly as the tower."""
    def run(threshold):
        out = tmp_path / f"t{threshold}"
        result = job.run(small_config(tmp_path, "retrieval.distill_weight=0", "ranking.affinity=none",
                                      "ranking.tower_affinity=off",
                                      "ranking.epochs=4", f"ranking.keep_min_t={threshold}",
                                      f"run.output_dir={out}"), dataset)
        return result.report, json.loads((out / "report.json").read_text())["histories"]["ranking"]

    any_gain, any_gain_history = run(0)
    never, never_history = run(1e9)
    assert [e["val_ndcg@10"] for e in never_history] == [e["val_ndcg@10"] for e in any_gain_history]
    assert len(never_history) >= 2 and all(not np.isnan(e["t_vs_start"]) for e in never_history[1:])
    assert never["pipeline"]["ndcg@10"] == pytest.approx(never["two_tower"]["ndcg@10"], abs=1e-12)
    assert never["ranker"]["kept"] == "start" and "pipeline_start" not in never
    start, trained = never_history[0]["val_ndcg@10"], [e["val_ndcg@10"] for e in never_history[1:]]
    best = int(np.argmax(trained))
    assert max(trained) > start      # this log: with 0, an epoch above the start is served instead of the start
    assert any_gain["ranker"]["kept"] == f"epoch {best}"
    assert any_gain["pipeline"]["ndcg@10"] != never["pipeline"]["ndcg@10"]
    # The report scores the replaced start beside it: on the same candidates, the very start the other run served.
    assert any_gain["pipeline_start"] == never["pipeline"]
    # ... and pairs the kept epoch with it over the test users: what the epochs did on test, with its noise.
    epochs = any_gain["paired"]["pipeline / pipeline_start"]
    assert epochs["ratio"] == pytest.approx(any_gain["pipeline"]["ndcg@10"] / never["pipeline"]["ndcg@10"])
    assert "pipeline / pipeline_start" not in never["paired"]
    text = (tmp_path / "t0" / "report.md").read_text()
    assert f"| pipeline, the ranker's start (before its epochs) | {never['pipeline']['recall@10']:.4f} |" in text
    assert f"Ranker kept: epoch {best} (its start scored beside it in the table)" in text
    assert "Ranker kept: its fitted start" in (tmp_path / "t1000000000.0" / "report.md").read_text()


def test_ranker_patience_restarts_only_on_a_gain_of_min_improvement(tmp_path, dataset):
    """ranking.min_improvement decides when training stops, never what an epoch computes: the epochs both
    runs trained score the same; a gain no epoch reaches stops training after ranking.patience epochs."""
    def run(fraction):
        out = tmp_path / f"m{fraction}"
        job.run(small_config(tmp_path, "ranking.epochs=5", "ranking.patience=1", f"ranking.min_improvement={fraction}",
                             f"run.output_dir={out}"), dataset)
        return [e["val_ndcg@10"] for e in json.loads((out / "report.json").read_text())["histories"]["ranking"]]

    unreachable, any_gain = run(1e9), run(0)
    assert len(unreachable) == 2                      # the start and one epoch: patience 1 without a restart
    assert any_gain[:2] == unreachable
    with pytest.raises(ValueError, match="ranking.min_improvement"):
        load_config(None, ["ranking.min_improvement=-0.1"])


def test_models_learn_the_planted_preferences(tmp_path, dataset):
    result = job.run(small_config(tmp_path, "retrieval.epochs=6"), dataset)
    report = result.report
    # A random ranking of 200 items hits about |test| / 200 ~ 2% of slots: NDCG@10 ~ 0.02.
    assert report["two_tower"]["ndcg@10"] > 0.1
    assert report["pipeline"]["ndcg@10"] > 0.1
    assert 0.5 < report["ranking_heads"]["ctr_auc"] <= 1.0
    # MMR at strength 0 is the relevance order: the pipeline's own NDCG; stronger MMR diversifies.
    tradeoff = report["diversity_tradeoff"]
    assert set(tradeoff) == {"0", "0.1", "0.3", "0.5"}
    assert tradeoff["0"]["ndcg@10"] == pytest.approx(report["pipeline"]["ndcg@10"])
    assert tradeoff["0.5"]["diversity@10"] >= tradeoff["0"]["diversity@10"] - 0.02
    assert json.loads((tmp_path / "run" / "report.json").read_text())["gate"] in ("passed", f"refused: {result.refused}")


def test_gate_refuses_a_run_far_below_the_served_version(tmp_path, dataset):
    root = tmp_path / "artifacts"
    served = artifacts.publish(root, lambda d: (d / "x").write_text("x"),
                               signer=SIGNER, data={"dataset": dataset.name, "protocol": "random"}, config={},
                               metrics={"pipeline": {"ndcg@10": 0.99}})
    result = job.run(small_config(tmp_path, f"publish.artifact_root={root}"), dataset)
    assert result.version is None
    assert "below the served version 1" in result.refused
    assert artifacts.list_versions(root) == [served]


def test_the_gate_compares_only_figures_judged_in_the_same_test_context(tmp_path):
    """A version published before the test context existed (its manifest names none) was judged on train alone:
    a leave-one-out run judged knowing the validation interactions too is not held to its figure, one judged on
    train alone is."""
    from trainer.publish import quality_gate

    root = tmp_path / "artifacts"
    artifacts.publish(root, lambda d: (d / "x").write_text("x"), signer=SIGNER,
                      data={"dataset": "ml-100k", "protocol": "leave_one_out"}, config={},
                      metrics={"pipeline": {"ndcg@10": 0.99}})
    cfg = load_config(None, [])

    def report(context: str) -> dict:
        return {"pipeline": {"ndcg@10": 0.1}, "baselines": {"popularity": {"ndcg@10": 0.05}},
                "data": {"dataset": "ml-100k", "protocol": "leave_one_out", "test_context": context}}
    assert quality_gate(cfg, report("train + validation"), root) is None
    assert "below the served version 1" in quality_gate(cfg, report("train"), root)


def test_diverging_training_stops_with_a_clear_error_and_publishes_nothing(tmp_path, dataset):
    root = tmp_path / "artifacts"
    cfg = small_config(tmp_path, f"publish.artifact_root={root}", "retrieval.learning_rate=1e30",
                       "retrieval.temperature=0.01", "retrieval.learn_temperature=false")
    with pytest.raises(NonFiniteLossError, match="retrieval loss became"):
        job.run(cfg, dataset)
    assert not root.exists() or artifacts.list_versions(root) == []


@pytest.mark.parametrize("loop, overrides", [
    ("retrieval", ("retrieval.learning_rate=1e30", "retrieval.temperature=0.01", "retrieval.learn_temperature=false")),
    ("ranking", ("ranking.learning_rate=1e30",)),
    ("joint", ("multitask.mode=joint", "retrieval.learning_rate=1e30", "retrieval.temperature=0.01",
               "retrieval.learn_temperature=false")),
])
def test_every_training_loop_stops_a_diverging_loss_with_the_same_error(tmp_path, dataset, loop, overrides):
    # One exception for all three loops; still a FloatingPointError (what the ranking loop raised
    # before) and a RuntimeError (what NonFiniteLossError was before), so old catchers still catch it.
    with pytest.raises(NonFiniteLossError, match=f"^{loop} loss became") as raised:
        job.run(small_config(tmp_path, *overrides), dataset)
    assert isinstance(raised.value, FloatingPointError) and isinstance(raised.value, RuntimeError)


def test_cli_reports_a_config_error_by_name(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainer", "--set", "retrieval.epoch=3"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "retrieval.epoch" in proc.stderr


def test_retrieval_recall_counts_users_with_fewer_unseen_items_than_candidates(tmp_path, dataset):
    # 200 items: retrieving 200 leaves padding for every user with training or validation items
    # masked; the padding must not count as a repeated item (it made recall_at_k raise).
    result = job.run(small_config(tmp_path, "eval.retrieval_ks=10,50,200,500"), dataset)
    recall = result.report["retrieval"]
    assert list(recall) == ["recall@10", "recall@50", "recall@200"]
    assert 0 < recall["recall@10"] <= recall["recall@50"] <= recall["recall@200"] == 1.0


def test_max_users_bounds_evaluation_for_large_catalogs(tmp_path, dataset):
    result = job.run(small_config(tmp_path, "eval.max_users=30"), dataset)
    assert result.report["data"]["test_users"] == 30
    assert result.prepared.val.users.size == 30


def test_retrieval_only_mode_serves_the_retrieval_order(tmp_path, dataset):
    result = job.run(small_config(tmp_path, "multitask.mode=retrieval_only"), dataset)
    report = result.report
    assert [e["epoch"] for e in json.loads((tmp_path / "run" / "report.json").read_text())
            ["histories"]["ranking"]] == [-1]
    assert report["pipeline"]["ndcg@10"] == pytest.approx(report["two_tower"]["ndcg@10"], abs=1e-9)


def test_an_unknown_multitask_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="multitask.mode must be one of"):
        load_config(None, ["multitask.mode=alternating"])


def test_listwise_ranker_loss_trains_on_whole_candidate_lists(tmp_path, dataset):
    """ranking.loss=listwise: a real run trains the DCN (the loss falls over its epochs) and the
    pipeline still learns the planted preferences; the CTR AUC is that of a trained ranker."""
    result = job.run(small_config(tmp_path, "retrieval.epochs=6", "ranking.loss=listwise", "ranking.patience=3",
                                  "ranking.epochs=3"), dataset)
    report = result.report
    ranking = json.loads((tmp_path / "run" / "report.json").read_text())["histories"]["ranking"]
    losses = [e["loss"] for e in ranking if e["epoch"] >= 0]
    assert len(losses) >= 2 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert report["pipeline"]["ndcg@10"] > 0.1
    assert 0.5 < report["ranking_heads"]["ctr_auc"] <= 1.0


def test_an_unknown_ranker_loss_is_refused_by_name():
    with pytest.raises(ValueError, match=r"ranking.loss must be one of \('pointwise', 'listwise'\), got 'pairwise'"):
        load_config(None, ["ranking.loss=pairwise"])


def test_validated_user_tower_keeps_the_tower_with_the_best_validation_score(tmp_path, dataset, caplog):
    """retrieval.user_tower=validated under temporal: the pooled, the autoencoder and the sequential tower,
    each exactly as its own setting trains it, and the run keeps, ranks with and reports the one with the
    highest validation NDCG@10, the others' curves beside it. Under random: the pooled tower and the
    autoencoder (no sequential tower); over retrieval.autoencoder_below items, no autoencoder."""
    towers = ("pooled", "autoencoder", "sequential")

    def run(tower, protocol="temporal", *extra):
        out = tmp_path / f"{tower}-{protocol}{len(extra)}"
        result = job.run(small_config(tmp_path, f"data.protocol={protocol}", f"retrieval.user_tower={tower}",
                                      f"run.output_dir={out}", *extra), dataset)
        return result, json.loads((out / "report.json").read_text())

    alone = {tower: run(tower)[1] for tower in towers}
    curves = {tower: report["histories"]["retrieval"] for tower, report in alone.items()}
    assert len({json.dumps(curve) for curve in curves.values()}) == 3    # three different towers to choose from
    best = {tower: max(e["val_ndcg@10"] for e in curve) for tower, curve in curves.items()}
    kept = max(towers, key=lambda tower: (best[tower], -towers.index(tower)))
    with caplog.at_level("INFO", logger="trainer.training"):
        result, validated = run("validated")
    assert caplog.text.count("user tower by validation") == 1
    assert "ranker_channels" not in validated["user_tower"]     # ranking.tower_affinity=auto: random protocol only
    assert validated["histories"]["retrieval"] == curves[kept]
    for other in set(towers) - {kept}:
        assert validated["histories"][f"retrieval_{other}"] == curves[other]
    assert validated["user_tower"]["setting"] == "validated" and validated["user_tower"]["kept"] == kept
    assert validated["user_tower"]["validation_ndcg@10"] == pytest.approx(best, abs=1e-6)
    assert isinstance(result.run.two_tower.user_tower, SequentialUserTower) == (kept == "sequential")
    # The kept tower is the one evaluated, and the ranker is trained on its candidates.
    assert validated["two_tower"]["ndcg@10"] == pytest.approx(alone[kept]["two_tower"]["ndcg@10"])
    assert validated["histories"]["ranking"] == alone[kept]["histories"]["ranking"]
    assert f"User tower (validated): {kept}" in (tmp_path / "validated-temporal0" / "report.md").read_text()
    # The default (ranking.tower_affinity): the tower not kept is the ranker's channel beside EASE's two.
    result, random = run("validated", "random")
    assert set(random["user_tower"]["validation_ndcg@10"]) == {"pooled", "autoencoder"}
    assert random["user_tower"]["ranker_channels"] == [({"pooled", "autoencoder"} - {random["user_tower"]["kept"]}).pop()]
    # EASE's factors at the rank that keeps enough of its top 10 (ranking.affinity_fidelity), then the tower channel.
    choice = random["ranker"]["affinity_rank"]
    rank = choice["rank"]
    assert list(choice["ease_top10_kept"])[-1] == str(rank) and choice["ease_top10_kept"]["64"] > 0
    assert result.run.ranker.affinity_rank == rank
    assert result.run.ranker.affinity_channels == 3 and result.run.ranker.affinity_user[:, 2 * rank:].abs().sum() > 0
    markdown = (tmp_path / "validated-random0" / "report.md").read_text()
    assert f"the ranker's tower channels: {random['user_tower']['ranker_channels'][0]}" in markdown
    assert (f"Ranker affinity rank: {rank}; share of EASE's top 10 its factors keep, by rank: " +
            ", ".join(f"{r} {v:.3f}" for r, v in choice["ease_top10_kept"].items())) in markdown
    # The three starts on the stopping half: the best kept, each fitted one's t against retrieval's order.
    start = random["ranker"]["start"]
    halves = start["stopping_half"]
    assert set(halves) == {"logistic fit", "listwise fit", "retrieval order"}
    assert halves[start["kept"]]["ndcg@10"] == max(v["ndcg@10"] for v in halves.values())
    assert halves["retrieval order"]["t_vs_retrieval_order"] == 0.0
    assert random["histories"]["ranking"][0]["starts"] == start
    assert random["histories"]["ranking"][0]["val_ndcg@10"] == pytest.approx(halves[start["kept"]]["ndcg@10"],
                                                                             abs=5e-5)
    t = halves["logistic fit"]["t_vs_retrieval_order"]
    assert (f"Ranker start: the {start['kept']}; stopping-half NDCG@10 logistic fit "
            f"{halves['logistic fit']['ndcg@10']:.4f} (t {t:.2f} against retrieval's order)") in markdown
    _, forced = run("validated", "temporal", "ranking.tower_affinity=on")
    assert set(forced["user_tower"]["ranker_channels"]) == set(towers) - {kept}
    _, over = run("validated", "random", "retrieval.autoencoder_below=10")
    assert over["user_tower"]["kept"] == "pooled" and list(over["user_tower"]["validation_ndcg@10"]) == ["pooled"]
    assert "ranker_channels" not in over["user_tower"]
    assert not [name for name in over["histories"] if name.startswith("retrieval_")]


def test_validated_towers_trained_side_by_side_are_those_trained_one_after_another(tmp_path, dataset, caplog):
    """Two intra-op threads under temporal: the pooled tower here and the autoencoder and the sequential
    tower in a worker process, one thread each (trainer/tower_processes.py); the same curves, choice and
    kept tower as one thread training them one after another here. run.tower_workers=1 keeps them here,
    and so does auto (0) under the random protocol on a log this small (pooled and autoencoder only)."""
    def run(tag, *extra):
        out = tmp_path / tag
        with caplog.at_level("INFO", logger="trainer.training"):
            caplog.clear()
            result = job.run(small_config(tmp_path, "data.protocol=temporal", "retrieval.user_tower=validated",
                                          f"run.output_dir={out}", *extra), dataset)
            side_by_side = "trained side by side in 2 processes" in caplog.text
        return result, json.loads((out / "report.json").read_text()), side_by_side

    _, alone, side = run("one-thread")
    assert not side
    result, paired, side = run("two-threads", "run.threads=2")
    assert side
    assert paired["user_tower"] == alone["user_tower"] and len(paired["user_tower"]["validation_ndcg@10"]) == 3
    for name in ("retrieval", "retrieval_pooled", "retrieval_autoencoder", "retrieval_sequential"):
        assert paired["histories"].get(name) == alone["histories"].get(name), name
    assert paired["two_tower"]["ndcg@10"] == alone["two_tower"]["ndcg@10"]
    assert torch.get_num_threads() == 2                # the run's threads are back once the towers are trained
    _, kept_here, side = run("one-worker", "run.threads=2", "run.tower_workers=1")
    assert not side and kept_here["user_tower"]["kept"] == alone["user_tower"]["kept"]
    _, auto, side = run("auto-random", "run.threads=2", "data.protocol=random")
    assert not side and set(auto["user_tower"]["validation_ndcg@10"]) == {"pooled", "autoencoder"}
    _, asked, side = run("asked-random", "run.threads=2", "data.protocol=random", "run.tower_workers=2")
    assert side and asked["user_tower"]["validation_ndcg@10"].keys() == auto["user_tower"]["validation_ndcg@10"].keys()


@pytest.mark.parametrize("towers, n_users, n_items, tower_workers, threads, expected", [
    (("pooled", "autoencoder"), 943, 1_682, 0, 2, 1),          # ml-100k: 1.6M cells, one after another
    (("pooled", "autoencoder"), 4_936, 8_517, 0, 2, 2),        # the ~10k-item log: 42M cells, side by side
    (("pooled", "autoencoder", "sequential"), 4_936, 8_517, 0, 2, 2),
    (("pooled", "autoencoder", "sequential"), 4_936, 8_517, 0, 4, 3),   # never more than the towers
    (("pooled", "autoencoder"), 200_000, 100, 0, 2, 1),       # an epoch samples 20,000 users: 2M cells
    (("pooled", "sequential"), 943, 1_682, 0, 2, 2),          # no autoencoder: side by side as before
    (("pooled", "autoencoder", "sequential"), 943, 1_682, 0, 2, 2),     # the sequential tower: at any size
    (("pooled", "autoencoder"), 943, 1_682, 2, 2, 2),          # asked for: as asked
    (("pooled", "autoencoder"), 4_936, 8_517, 1, 2, 1),
    (("pooled", "autoencoder"), 4_936, 8_517, 0, 1, 1),        # one thread: one after another
    (("pooled",), 4_936, 8_517, 2, 2, 1),                      # nothing to pair
])
def test_tower_workers_auto_pairs_pooled_and_autoencoder_only_where_the_autoencoders_epoch_is_large(
        towers, n_users, n_items, tower_workers, threads, expected):
    from trainer.distributed import Distributed
    from trainer.tower_processes import SIDE_BY_SIDE_MIN_CELLS, tower_workers as workers_for

    assert SIDE_BY_SIDE_MIN_CELLS == 10_000_000
    cfg = replace(TrainConfig(), run={"tower_workers": tower_workers, "threads": threads})
    assert workers_for(cfg, towers, n_users, n_items, torch.device("cpu"), Distributed()) == expected
    assert workers_for(cfg, towers, n_users, n_items, torch.device("cpu"), Distributed(world_size=2)) == 1


def test_a_tower_that_fails_in_a_worker_fails_the_run_with_its_error():
    from trainer.tower_processes import fit_side_by_side

    with pytest.raises(ValueError, match="invalid literal for int"):
        fit_side_by_side([(divmod, (7, 2), {}), (int, ("not a number",), {})], workers=2)
    assert fit_side_by_side([(divmod, (7, 2), {}), (divmod, (9, 4), {})], workers=1) == [(3, 1), (2, 1)]


def test_validated_fold_order_keeps_the_ranker_with_the_better_stopping_half_score(tmp_path, dataset, caplog):
    """ranking.fold_order=validated under temporal: the ranker trained with random folds and the one
    trained with recent folds, each exactly as its own fold order trains it, and the run keeps the
    one with the higher stopping-half NDCG@10 (random on a tie). Under random: one ranker."""
    def ranking_history(order, protocol="temporal"):
        out = tmp_path / f"{order}-{protocol}"
        job.run(small_config(tmp_path, f"data.protocol={protocol}", f"ranking.fold_order={order}",
                             f"run.output_dir={out}"), dataset)
        return json.loads((out / "report.json").read_text())["histories"]["ranking"]

    by_random, by_recent = ranking_history("random"), ranking_history("recent")
    assert by_random != by_recent                          # two different rankers to choose from
    with caplog.at_level("INFO", logger="trainer.training"):
        validated = ranking_history("validated")
    best = {name: max([h[0]["val_ndcg@10"]] + [e["val_ndcg@10"] for e in h[1:] if e["t_vs_start"] >= 1.0])
            for name, h in (("random", by_random), ("recent", by_recent))}     # what each would keep
    expected = by_recent if best["recent"] > best["random"] else by_random
    assert validated == expected
    assert caplog.text.count("fold order by validation") == 1
    caplog.clear()
    with caplog.at_level("INFO", logger="trainer.training"):
        ranking_history("validated", "random")
    assert "fold order by validation" not in caplog.text


def test_transition_channels_are_checked_on_the_stopping_half_under_temporal(tmp_path, dataset):
    """ranking.transition_mode auto under temporal: the report records the check (the wide logit fitted with
    the channels against retrieval's order on the stopping half) and the ranker has the channels exactly
    when it kept them; a threshold no gain can pass leaves them out and the ranker is built without them;
    "on" keeps them unchecked; under random there are none."""
    def run(*settings):
        out = tmp_path / "-".join(s.replace("=", "_") for s in settings)
        result = job.run(small_config(tmp_path, *settings, f"run.output_dir={out}"), dataset)
        return result.report.get("ranker", {}).get("transitions"), result.run.ranker

    check, ranker = run("data.protocol=temporal")
    assert set(check) == {"kept", "t_vs_retrieval_order", "stopping_half"}
    assert set(check["stopping_half"]) == {"retrieval order", "with transitions, logistic fit",
                                           "with transitions, listwise fit"}
    assert check["kept"] == (check["t_vs_retrieval_order"] >= 1.0)
    assert (ranker.transition_items == 4) == check["kept"]
    strict, ranker = run("data.protocol=temporal", "ranking.keep_min_t=1000")
    assert strict["kept"] is False and ranker.transition_items == 0
    assert strict["stopping_half"] == check["stopping_half"]
    forced, ranker = run("data.protocol=temporal", "ranking.transition_mode=on")
    assert forced is None and ranker.transition_items == 4 and bool(ranker.successor_weights.any())
    none, ranker = run("data.protocol=random")
    assert none is None and ranker.transition_items == 0
