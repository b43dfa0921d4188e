"""Population loading and Zipf-skewed user sampling."""

import numpy as np
import pytest

from loadtest.users import (DEFAULT_ITEM_COUNT, UNKNOWN_PREFIX, UserSampler, load_population, ratings_file,
                            zipf_probabilities)


def test_zipf_probabilities_by_hand():
    # skew 1 over 3 ranks: weights 1, 1/2, 1/3 sum to 11/6 -> 6/11, 3/11, 2/11.
    np.testing.assert_allclose(zipf_probabilities(3, 1.0), [6 / 11, 3 / 11, 2 / 11])
    # skew 2 over 2 ranks: 1, 1/4 -> 4/5, 1/5.
    np.testing.assert_allclose(zipf_probabilities(2, 2.0), [0.8, 0.2])
    # skew 0 is uniform.
    np.testing.assert_allclose(zipf_probabilities(4, 0.0), [0.25] * 4)


@pytest.mark.parametrize(("n", "skew", "field"), [(0, 1.0, "n"), (3, -0.5, "skew"), (3, float("nan"), "skew")])
def test_zipf_probabilities_reject_bad_arguments(n, skew, field):
    with pytest.raises(ValueError, match=field):
        zipf_probabilities(n, skew)


def test_rank_of_maps_uniform_draws_through_the_cdf():
    # cdf for skew 1 over 3 ranks: 6/11 = 0.545, 9/11 = 0.818, 1.
    sampler = UserSampler(("a", "b", "c"), skew=1.0, unknown_share=0.0, seed=0)
    np.testing.assert_array_equal(sampler.rank_of(np.array([0.0, 0.5, 0.6, 0.81, 0.85, 0.999])),
                                  [0, 0, 1, 1, 2, 2])


def test_sample_follows_the_skew_and_the_unknown_share():
    sampler = UserSampler(("a", "b", "c"), skew=1.0, unknown_share=0.1, seed=1)
    users = sampler.sample(20_000)
    unknown = [u for u in users if u.startswith(UNKNOWN_PREFIX)]
    # 10 % unknown; the known 90 % split 6:3:2. Binomial sd at n=20000 is < 0.4 %, so 2 % is > 5 sd.
    assert abs(len(unknown) / len(users) - 0.1) < 0.02
    assert len(set(unknown)) == len(unknown)   # each unknown user is new
    known = [u for u in users if not u.startswith(UNKNOWN_PREFIX)]
    shares = [known.count(name) / len(known) for name in "abc"]
    np.testing.assert_allclose(shares, [6 / 11, 3 / 11, 2 / 11], atol=0.02)


def test_sample_is_reproducible_for_a_seed():
    draw = lambda: UserSampler(tuple("abcdef"), 1.0, 0.2, seed=7).sample(50)  # noqa: E731
    assert draw() == draw()


def test_sampler_rejects_a_bad_unknown_share():
    with pytest.raises(ValueError, match="unknown_share"):
        UserSampler(("a",), 1.0, 1.5, seed=0)


def test_population_from_a_count():
    population = load_population("3")
    assert population.user_ids == ("1", "2", "3")
    np.testing.assert_array_equal(population.item_ids, np.arange(1, DEFAULT_ITEM_COUNT + 1))


def test_population_from_a_ratings_file_ranks_users_by_activity(tmp_path):
    # user 10 rated 3 items, user 2 two, users 7 and 3 one each (ties in numeric order: 3 before 7).
    rows = ["10\t1\t5\t0", "10\t2\t4\t0", "10\t5\t3\t0", "2\t1\t5\t0", "2\t9\t1\t0", "7\t2\t2\t0", "3\t5\t2\t0"]
    (tmp_path / "ml-100k").mkdir()
    (tmp_path / "ml-100k" / "u.data").write_text("\n".join(rows) + "\n")
    population = load_population(str(tmp_path))
    assert population.user_ids == ("10", "2", "3", "7")
    np.testing.assert_array_equal(population.item_ids, [1, 2, 5, 9])
    assert ratings_file(tmp_path / "ml-100k") == tmp_path / "ml-100k" / "u.data"


def test_population_of_movielens_100k(ml100k_dir):
    population = load_population(str(ml100k_dir.parent))
    assert len(population.user_ids) == 943 and len(population.item_ids) == 1682
    assert population.user_ids[0] == "405"    # the most active rater in 100K (737 ratings)


@pytest.mark.parametrize("users_from", ["0", "no-such-directory"])
def test_population_rejects_a_bad_source(users_from):
    with pytest.raises(ValueError, match="users_from"):
        load_population(users_from)
