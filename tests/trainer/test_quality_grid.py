"""benchmarks/quality_grid.py: the settings of a cell and the table a grid prints (no training here;
the grid's runs are the trainer's own, tested in test_pipeline)."""

from __future__ import annotations

from benchmarks.quality_grid import EASE_OFF, cell_overrides, seed_table, synthetic_recipe, table


def test_a_cell_names_its_protocol_and_tower_and_switches_both_ease_helps_off():
    assert cell_overrides("temporal", "sequential", True) == ["data.protocol=temporal",
                                                              "retrieval.user_tower=sequential"]
    off = cell_overrides("random", "pooled", False)
    assert set(EASE_OFF) <= set(off)
    assert "retrieval.distill_weight=0" in off and "ranking.affinity=none" in off


def test_the_table_gives_each_model_against_ease_and_the_pipeline_against_its_tower():
    cell = {"dataset": "ml-100k", "protocol": "leave_one_out", "tower": "pooled", "ease_help": False,
            "ndcg@10": {"pipeline": 0.33, "two_tower": 0.30, "ease": 0.32, "popularity": 0.1},
            "wall_s": 61.4, "peak_rss_mb": 870.4}
    failed = {"dataset": "synthetic", "protocol": "random", "tower": "sequential", "ease_help": True,
              "error": "exit 1, see x.log"}
    rows = table([cell, failed]).splitlines()
    assert rows[2] == ("| ml-100k, leave-one-out | pooled | off | 0.1000 | 0.3200 | 0.3000 (0.938) "
                       "| 0.3300 (1.100, 1.031) | -; - | 61 s / 0.85 GB |")
    assert rows[3].startswith("| synthetic, random | sequential | on | exit 1, see x.log |")


def test_a_validated_cell_names_the_tower_its_run_kept():
    cell = {"dataset": "ml-100k", "protocol": "temporal", "tower": "validated", "ease_help": True,
            "user_tower": {"setting": "validated", "kept": "sequential",
                           "validation_ndcg@10": {"pooled": 0.137, "sequential": 0.196}},
            "ndcg@10": {"pipeline": 0.137, "two_tower": 0.133, "ease": 0.111, "popularity": 0.074},
            "wall_s": 157.0, "peak_rss_mb": 860.0}
    assert table([cell]).splitlines()[2].startswith("| ml-100k, temporal | validated (sequential) | on | 0.0740 |")
    assert cell_overrides("temporal", "validated", True) == ["data.protocol=temporal", "retrieval.user_tower=validated"]


def test_the_synthetic_logs_recipe_names_a_planted_order_only_where_there_is_one():
    assert synthetic_recipe() == ("trainer.data.synthetic.generate(5000, 10000, 100000, seed=0), "
                                  "MovieLens-1M layout")
    assert synthetic_recipe(8.0) == ("trainer.data.synthetic.generate(5000, 10000, 100000, seed=0, order=8), "
                                     "MovieLens-1M layout")


def test_the_table_gives_the_pipelines_ratios_with_their_intervals_over_the_test_users():
    cell = {"dataset": "synthetic", "protocol": "random", "tower": "pooled", "ease_help": True,
            "ndcg@10": {"pipeline": 0.146, "two_tower": 0.140, "ease": 0.135, "popularity": 0.115},
            "paired": {"pipeline / two_tower": {"ratio": 1.043, "ratio_95": [1.0112, 1.0768], "t": 2.6},
                       "pipeline / ease": {"ratio": 1.081, "ratio_95": [1.0301, 1.1333], "t": 3.1}},
            "wall_s": 150.0, "peak_rss_mb": 1700.0}
    assert "| 1.011-1.077; 1.030-1.133 |" in table([cell]).splitlines()[2]


def _seed_run(seed: int, pipeline: float, tower: float, protocol: str = "random") -> dict:
    return {"dataset": "ml-100k", "protocol": protocol, "tower": "validated", "ease_help": True, "seed": seed,
            "ndcg@10": {"pipeline": pipeline, "two_tower": tower, "ease": 0.32, "popularity": 0.1},
            "wall_s": 100.0, "peak_rss_mb": 900.0}


def test_runs_of_several_seeds_are_named_by_seed_and_their_ratios_spread_over_the_seeds():
    runs = [_seed_run(0, 0.33, 0.30), _seed_run(1, 0.336, 0.32), _seed_run(2, 0.342, 0.31),
            _seed_run(0, 0.10, 0.10, protocol="temporal")]          # a cell run with one seed: no spread row
    assert table(runs[:1]).splitlines()[2].startswith("| ml-100k, random, seed 0 | validated | on |")
    rows = seed_table(runs).splitlines()
    assert rows[0] == "| data, protocol | tower | EASE help | seeds | pipeline / EASE | pipeline / tower | tower / EASE |"
    assert len(rows) == 3
    # pipeline / EASE: 1.03125, 1.05, 1.06875; pipeline / tower: 1.1, 1.05, 1.1032; tower / EASE: 0.9375, 1.0, 0.96875
    assert rows[2] == ("| ml-100k, random | validated | on | 0, 1, 2 | 1.050 (1.031-1.069) | 1.084 (1.050-1.103) "
                       "| 0.969 (0.938-1.000) |")
    failed = {**_seed_run(3, 0, 0), "error": "exit 1, see x.log"}
    del failed["ndcg@10"]
    assert "| 0, 1, 2 (1 failed) | 1.050 (1.031-1.069) |" in seed_table([*runs, failed])
    assert seed_table(runs[:1]) == ""                               # nothing to spread: no table
