"""Paired comparisons of two models on the same test users (trainer.full_ranking.paired_ratio) and the
report's ``paired`` section and line."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.evaluation import paired_report
from trainer.full_ranking import paired_ratio
from trainer.report import _paired


def _scores(n: int, seed: int) -> np.ndarray:
    """Per-user NDCG-like scores: most users 0, a few hits in (0, 1]."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(n) < 0.3, rng.random(n), 0.0)


def test_a_model_against_itself_is_one_with_no_spread():
    scores = _scores(500, 0)
    out = paired_ratio(scores, scores)
    assert out["ratio"] == 1.0 and out["difference"] == 0.0 and out["t"] == 0.0
    assert out["ratio_95"] == [1.0, 1.0] and out["users"] == 500


def test_a_clear_gain_has_an_interval_above_one_and_noise_an_interval_around_one():
    reference = _scores(2000, 1)
    better = reference * 1.2                           # 20 % more on every user who scores
    gain = paired_ratio(better, reference)
    assert gain["ratio"] == pytest.approx(1.2)
    assert gain["ratio_95"][0] > 1.15 and gain["ratio_95"][1] < 1.25 and gain["t"] > 5
    other = _scores(2000, 2)                           # an unrelated model of the same quality
    noise = paired_ratio(other, reference)
    assert noise["ratio_95"][0] < 1.0 < noise["ratio_95"][1] and abs(noise["t"]) < 3
    assert noise["ratio_95"][0] <= noise["ratio"] <= noise["ratio_95"][1]


def test_the_interval_narrows_with_more_users_and_the_bootstrap_is_seeded():
    wide = paired_ratio(_scores(200, 3), _scores(200, 4))
    narrow = paired_ratio(_scores(20000, 3), _scores(20000, 4))
    assert np.diff(narrow["ratio_95"])[0] < np.diff(wide["ratio_95"])[0] / 4
    assert paired_ratio(_scores(200, 3), _scores(200, 4), seed=5) == paired_ratio(_scores(200, 3), _scores(200, 4),
                                                                                  seed=5)


def test_figures_without_a_value_are_none_not_infinite():
    nothing = np.zeros(10)
    hits = np.full(10, 0.5)
    out = paired_ratio(hits, nothing)
    assert out["ratio"] is None and out["t"] is None      # no reference to divide by, no spread to judge by
    assert "ratio_95" not in out                          # every draw's reference scores nothing
    assert _paired(out) == "- (t -)"
    single = paired_ratio(np.array([0.5]), np.array([0.25]))
    assert single["ratio"] == 2.0 and "ratio_95" not in single


def test_scores_of_different_users_are_refused():
    with pytest.raises(ValueError, match=r"one length, got \(3,\) and \(4,\)"):
        paired_ratio(np.zeros(3), np.zeros(4))


def test_the_report_section_pairs_the_models_present_and_its_line_reads_them():
    truth = [np.array([1]), np.array([2]), np.array([3]), np.array([4])]
    lists = {"pipeline": np.array([[1, 9], [2, 9], [9, 3], [9, 8]]),     # hits at 1, 1, 2, none
             "two_tower": np.array([[9, 1], [2, 9], [9, 8], [9, 8]]),    # hits at 2, 1, none, none
             "ease": np.array([[1, 9], [9, 8], [9, 8], [4, 9]])}          # hits at 1, none, none, 1
    section = paired_report(lists, truth, seed=0)
    assert list(section) == ["pipeline / ease", "pipeline / two_tower", "two_tower / ease"]
    ndcg_2 = 1 / np.log2(3)
    assert section["pipeline / ease"]["ratio"] == pytest.approx((2 + ndcg_2) / 2)
    assert section["two_tower / ease"]["ratio"] == pytest.approx((ndcg_2 + 1) / 2)
    assert "ratio_95" in section["pipeline / two_tower"]
    without_ease = paired_report({k: v for k, v in lists.items() if k != "ease"}, truth, seed=0)
    assert list(without_ease) == ["pipeline / two_tower"]       # EASE is not run on the largest catalogs
    # Where a trained epoch replaced the ranker's start, the kept ranker is paired with that start too.
    with_start = paired_report({**lists, "pipeline_start": lists["two_tower"]}, truth, seed=0)
    assert list(with_start)[-1] == "pipeline / pipeline_start"
    assert with_start["pipeline / pipeline_start"]["ratio"] == section["pipeline / two_tower"]["ratio"]
    assert _paired({"ratio": 1.0312, "ratio_95": [0.99, 1.0721], "t": 1.5234}) == "1.031 (0.990-1.072, t 1.52)"
