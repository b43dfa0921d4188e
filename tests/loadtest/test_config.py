"""The run settings' validation and the loopback-only target rule."""

import dataclasses

import pytest

from loadtest.__main__ import main, parser, service_env, workers_env
from loadtest.config import LoadConfig, check_target, is_loopback, target_host, validate


@pytest.mark.parametrize(("target", "host"), [
    ("127.0.0.1:50052", "127.0.0.1"), ("localhost:1", "localhost"), ("[::1]:50052", "::1"),
    ("dns:///localhost:50052", "localhost"), ("ipv4:127.0.0.2:5", "127.0.0.2"), ("ipv6:[::1]:5", "::1"),
    ("example.com:443", "example.com"),
])
def test_target_host(target, host):
    assert target_host(target) == host


@pytest.mark.parametrize("target", ["127.0.0.1", "host:port", "[::1:50052", ":50052"])
def test_target_host_rejects_malformed_targets(target):
    with pytest.raises(ValueError, match="target must be"):
        target_host(target)


@pytest.mark.parametrize(("host", "loopback"), [
    ("localhost", True), ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True),
    ("10.0.0.1", False), ("0.0.0.0", False), ("example.com", False), ("localhost.example.com", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_remote_targets_need_allow_remote():
    check_target("127.0.0.1:50052", allow_remote=False)
    check_target("unix:/tmp/ranking.sock", allow_remote=False)
    with pytest.raises(ValueError, match="loopback"):
        check_target("10.1.2.3:50052", allow_remote=False)
    check_target("10.1.2.3:50052", allow_remote=True)


def test_the_run_command_refuses_a_remote_target(capsys):
    assert main(["run", "--target", "192.168.1.10:50052", "--users-from", "5"]) == 2
    assert "--allow-remote" in capsys.readouterr().err


def test_the_run_command_reports_an_unreachable_target(capsys):
    # Nothing listens on port 1; the harness gives up after its connect timeout with status 1.
    assert main(["run", "--target", "127.0.0.1:1", "--users-from", "5", "--duration", "1",
                 "--connect-timeout", "0.5"]) == 1
    assert "did not accept a connection" in capsys.readouterr().err


@pytest.mark.parametrize(("field", "value"), [
    ("rpc", "delete"), ("mode", "burst"), ("rate", 0.0), ("rate", float("inf")), ("duration_s", -1.0),
    ("deadline_ms", 0.0), ("p99_target_ms", float("nan")), ("ramp_step", 0.0), ("step_duration_s", 0.0),
    ("warmup_s", -1.0), ("connect_timeout_s", 0.0), ("concurrency", 0), ("max_requests", 0), ("k", 0),
    ("num_candidates", 0), ("rank_items", 0), ("skew", -0.1), ("unknown_share", 1.5), ("max_error_share", -0.1),
])
def test_validate_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} must"):
        validate(dataclasses.replace(LoadConfig(), **{field: value}))


def test_validate_accepts_the_defaults():
    assert validate(LoadConfig()) == LoadConfig()


def test_service_env_parses_name_value_pairs():
    assert service_env(["RANKING_DEFAULT_CANDIDATES=100", "RECSYS_LOG_LEVEL=INFO", "RETRIEVAL_CHUNK_SIZE=a=b"]) == {
        "RANKING_DEFAULT_CANDIDATES": "100", "RECSYS_LOG_LEVEL": "INFO", "RETRIEVAL_CHUNK_SIZE": "a=b"}


@pytest.mark.parametrize("pair", ["RANKING_MAX_K", "PATH=/bin", "=1"])
def test_service_env_rejects_other_names_and_missing_values(pair):
    with pytest.raises(ValueError, match="service_env must be NAME=VALUE"):
        service_env([pair])


def test_workers_flags_become_the_services_settings_and_bad_ones_exit_2(capsys):
    args = parser().parse_args(["scenario", "steady", "--ranking-workers", "2", "--retrieval-workers", "3"])
    assert workers_env(args) == {"RANKING_WORKERS": "2", "RETRIEVAL_WORKERS": "3"}
    assert workers_env(parser().parse_args(["scenario", "steady"])) == {}
    assert main(["scenario", "steady", "--synthetic", "--retrieval-workers", "65"]) == 2
    assert "--retrieval-workers must be an integer in [1, 64], got 65" in capsys.readouterr().err


def test_channels_must_be_a_count():
    assert validate(LoadConfig(channels=8)).channels == 8
    with pytest.raises(ValueError, match=r"^channels must be an integer >= 1, got 0$"):
        validate(LoadConfig(channels=0))
