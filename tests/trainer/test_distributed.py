"""The trainer under torchrun: 2 CPU processes (gloo) end with identical weights, separate and joint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = Path(__file__).with_name("_ddp_child.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mode", ["separate", "joint"])
def test_two_ddp_ranks_end_with_identical_weights(tmp_path, mode):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(CHILD), str(tmp_path), mode], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert ranks[0][0] == ranks[1][0] == "2"          # both saw a world of two processes
    assert ranks[0][1:] == ranks[1][1:]               # identical two-tower and ranker weights
    assert ranks[0][1] != ranks[0][2]


@pytest.mark.parametrize("strategy", ["random", "hard", "mixed"])
def test_every_negative_sampling_strategy_trains(strategy, tmp_path):
    from trainer import job
    from trainer.config import load_config
    from trainer.data.synthetic import generate

    cfg = load_config(None, ["retrieval.epochs=1", "retrieval.embedding_dim=8", "retrieval.user_tower_dims=16",
                             "retrieval.item_tower_dims=16", "retrieval.num_negatives=16", "ranking.epochs=1",
                             "ranking.deep_dims=16", "ranking.candidates=20", "features.history_length=10",
                             "run.progress=false", f"retrieval.negative_sampling_strategy={strategy}",
                             f"run.output_dir={tmp_path}", "eval.retrieval_ks=10,20", "eval.ease_grid=10"])
    result = job.run(cfg, generate(60, 80, 1500, seed=5))
    assert 0.0 < result.report["two_tower"]["ndcg@10"] <= 1.0
