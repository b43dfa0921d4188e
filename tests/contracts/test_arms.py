"""The arms file and the sticky canary split (recsys_contracts.arms)."""

from __future__ import annotations

import pytest

from recsys_contracts.arms import ARMS_FILE, Arms, in_canary, read_arms, user_bucket, write_arms


@pytest.mark.parametrize("percent", [1.0, 5.0, 10.0, 25.0, 50.0, 90.0])
def test_the_canary_share_is_within_two_points_of_its_setting_over_10000_users(percent):
    users = [f"user-{i}" for i in range(10_000)]
    share = 100 * sum(in_canary(user, percent) for user in users) / len(users)
    assert abs(share - percent) <= 2.0, share


def test_the_split_is_sticky_and_nested():
    users = [str(i) for i in range(2000)]
    first = [in_canary(user, 10.0) for user in users]
    assert first == [in_canary(user, 10.0) for user in users]           # the same users every time
    # raising the share only adds users: nobody in the 10 % canary leaves it at 20 %
    assert all(in_canary(user, 20.0) for user, canary in zip(users, first) if canary)
    assert not any(in_canary(user, 0.0) for user in users) and all(in_canary(user, 100.0) for user in users)


def test_the_bucket_is_a_fixed_function_of_the_id():
    # sha256("1") starts 6b86b273ff34fce1: 0x6b86b273ff34fce1 / 2^64 * 100 = 42.0025...
    assert user_bucket("1") == pytest.approx(0x6B86B273FF34FCE1 / 2**64 * 100)


def test_arms_round_trip_and_clear(tmp_path):
    assert read_arms(tmp_path) is None
    write_arms(tmp_path, Arms(candidate=3, canary_percent=5))
    assert read_arms(tmp_path) == Arms(3, 5.0, 0.0)
    (tmp_path / ARMS_FILE).write_text('{"candidate": 3, "canary_percent": 0, "shadow_percent": 10}')
    assert read_arms(tmp_path) == Arms(3, 0.0, 10.0)
    write_arms(tmp_path, None)
    assert read_arms(tmp_path) is None and not (tmp_path / ARMS_FILE).exists()


@pytest.mark.parametrize("text, message", [
    ("not json", "must be a JSON object"), ('{"candidate": 2}', "must hold candidate, canary_percent and optionally"),
    ('{"candidate": 2, "canary_percent": 5, "x": 1}', "must hold candidate, canary_percent and optionally"),
    ('{"candidate": 2, "canary_percent": 5, "shadow_percent": -1}', r"shadow_percent must be a number in \[0, 100\]"),
    ('{"candidate": 0, "canary_percent": 5}', "candidate must be a version number >= 1, got 0"),
    ('{"candidate": 2, "canary_percent": 101}', r"canary_percent must be a number in \[0, 100\], got 101")])
def test_a_bad_arms_file_names_the_problem(tmp_path, text, message):
    (tmp_path / ARMS_FILE).write_text(text)
    with pytest.raises(ValueError, match=message):
        read_arms(tmp_path)
