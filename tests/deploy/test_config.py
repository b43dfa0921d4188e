"""The services' env configuration: defaults, every rejected value, unknown names, TLS rules."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ranking_service import config as ranking_config
from retrieval_service import config as retrieval_config

MODULES = {"retrieval": retrieval_config, "ranking": ranking_config}
SHARED = ("RECSYS_ARTIFACT_ROOT", "RECSYS_REDIS_URL", "RECSYS_REDIS_NAMESPACE", "RECSYS_LOG_LEVEL",
          "RECSYS_PINNED_VERSION")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "artifacts"
    path.mkdir()
    return path


@pytest.fixture
def pem(tmp_path: Path):
    """Makes an (empty) file standing for a PEM file; config only checks that it exists."""

    def make(name: str) -> str:
        path = tmp_path / name
        path.write_text("-----BEGIN CERTIFICATE-----\n")
        return str(path)

    return make


def test_retrieval_defaults(root):
    config = retrieval_config.from_env({"RECSYS_ARTIFACT_ROOT": str(root)})
    assert config == retrieval_config.RetrievalConfig(artifact_root=root)
    assert (config.port, config.metrics_port, config.max_candidates, config.chunk_size) == (50051, 9101, 1000, 500)
    assert (config.poll_interval_s, config.device, config.microbatch_max_size) == (2.0, "auto", 32)
    assert (config.microbatch_max_wait_ms, config.redis_timeout_ms, config.grace_s) == (0.0, 50, 10.0)
    assert (config.max_in_flight, config.max_concurrency) == (64, 8)
    assert (config.redis_breaker_failures, config.redis_breaker_cooldown_ms) == (3, 1000)
    assert config.max_message_bytes == 4 * 1024 * 1024
    assert (config.redis_url, config.redis_namespace, config.log_level, config.pinned_version) == (
        None, "recsys", "INFO", None)
    assert config.tls is None
    # loopback unless told otherwise (the images and manifests set 0.0.0.0); signatures on
    assert (config.host, config.metrics_host, config.trusted_keys, config.allow_unsigned) == (
        "127.0.0.1", "127.0.0.1", Path("/etc/recsys/trusted-keys"), False)


def test_ranking_defaults(root):
    config = ranking_config.from_env({"RECSYS_ARTIFACT_ROOT": str(root)})
    assert config == ranking_config.RankingConfig(artifact_root=root)
    assert (config.port, config.metrics_port, config.retrieval_target) == (50052, 9102, "localhost:50051")
    assert (config.max_k, config.default_candidates, config.max_rank_items) == (100, 500, 1000)
    assert (config.fallback, config.max_in_flight, config.min_deadline_ms, config.default_deadline_ms) == (
        "popular", 128, 5, 200)
    assert config.max_concurrency == 8
    assert (config.retrieval_breaker_failures, config.retrieval_breaker_cooldown_ms) == (5, 1000)
    assert (config.diversity, config.score_mode, config.poll_interval_s) == (0.0, "ctr", 2.0)
    assert (config.redis_timeout_ms, config.grace_s, config.max_message_bytes) == (50, 10.0, 4 * 1024 * 1024)
    assert (config.microbatch_max_size, config.microbatch_max_wait_ms) == (16, 0.0)
    assert config.tls is None and config.retrieval_tls is None and config.redis_url is None
    assert (config.host, config.metrics_host, config.trusted_keys, config.allow_unsigned) == (
        "127.0.0.1", "127.0.0.1", Path("/etc/recsys/trusted-keys"), False)


def test_env_vars_list_every_name_exactly_once():
    for module in MODULES.values():
        assert len(set(module.ENV_VARS)) == len(module.ENV_VARS)
        assert set(SHARED) <= set(module.ENV_VARS)
        assert all(name.startswith((module.PREFIX, module.SHARED_PREFIX)) for name in module.ENV_VARS)


def test_every_value_is_parsed(root, pem):
    env = {
        "RECSYS_ARTIFACT_ROOT": str(root), "RECSYS_REDIS_URL": "redis://:s3cret@redis:6379/2",
        "RECSYS_REDIS_NAMESPACE": "prod-eu", "RECSYS_LOG_LEVEL": "debug", "RECSYS_PINNED_VERSION": "7",
        "RETRIEVAL_PORT": "6000", "RETRIEVAL_METRICS_PORT": "0", "RETRIEVAL_MAX_CANDIDATES": "2000",
        "RETRIEVAL_CHUNK_SIZE": "250", "RETRIEVAL_POLL_INTERVAL_S": "0.5", "RETRIEVAL_DEVICE": "cuda",
        "RETRIEVAL_MICROBATCH_MAX_SIZE": "8", "RETRIEVAL_MICROBATCH_MAX_WAIT_MS": "0",
        "RETRIEVAL_REDIS_TIMEOUT_MS": "20", "RETRIEVAL_REDIS_BREAKER_FAILURES": "5",
        "RETRIEVAL_MAX_IN_FLIGHT": "40", "RETRIEVAL_MAX_CONCURRENCY": "4", "RETRIEVAL_MAX_LOOP_LAG_MS": "12.5",
        "RETRIEVAL_MAX_QUEUE_MS": "30",
        "RETRIEVAL_REDIS_BREAKER_COOLDOWN_MS": "250", "RETRIEVAL_GRACE_S": "3.5",
        "RETRIEVAL_MAX_MESSAGE_BYTES": "1048576", "RETRIEVAL_DEFAULT_DEADLINE_MS": "5000", "RETRIEVAL_WORKERS": "3",
        "RETRIEVAL_TLS_CERT_FILE": pem("cert.pem"), "RETRIEVAL_TLS_KEY_FILE": pem("key.pem"),
        "RETRIEVAL_TLS_CLIENT_CA_FILE": pem("ca.pem"),
        "RANKING_PORT": "1",  # the other service's names are ignored
        "RETRIEVAL_HOST": "::", "RETRIEVAL_METRICS_HOST": "0.0.0.0", "RECSYS_TRUSTED_KEYS": "/keys/trusted",
        "RECSYS_ALLOW_UNSIGNED": "no",
    }
    config = retrieval_config.from_env(env)
    assert config == retrieval_config.RetrievalConfig(
        artifact_root=root, redis_url="redis://:s3cret@redis:6379/2", redis_namespace="prod-eu",
        log_level="DEBUG", pinned_version=7, port=6000, metrics_port=0, max_candidates=2000, chunk_size=250,
        poll_interval_s=0.5, device="cuda", microbatch_max_size=8, microbatch_max_wait_ms=0.0,
        redis_timeout_ms=20, redis_breaker_failures=5, max_in_flight=40, max_concurrency=4, max_loop_lag_ms=12.5,
        max_queue_ms=30.0,
        redis_breaker_cooldown_ms=250, grace_s=3.5, max_message_bytes=1048576, default_deadline_ms=5000, host="::",
        workers=3,
        metrics_host="0.0.0.0", trusted_keys=Path("/keys/trusted"), allow_unsigned=False,
        tls=retrieval_config.TlsConfig(Path(env["RETRIEVAL_TLS_CERT_FILE"]), Path(env["RETRIEVAL_TLS_KEY_FILE"]),
                                       Path(env["RETRIEVAL_TLS_CLIENT_CA_FILE"])))
    assert "s3cret" not in repr(config)


def test_every_ranking_value_is_parsed(root, pem):
    env = {
        "RECSYS_ARTIFACT_ROOT": str(root), "RECSYS_REDIS_URL": "unix:///run/redis.sock",
        "RANKING_PORT": "7000", "RANKING_METRICS_PORT": "7001", "RANKING_RETRIEVAL_TARGET": "dns:///retrieval:50051",
        "RANKING_MAX_K": "50", "RANKING_DEFAULT_CANDIDATES": "300", "RANKING_MAX_RANK_ITEMS": "400",
        "RANKING_FALLBACK": "unavailable", "RANKING_MAX_IN_FLIGHT": "8", "RANKING_MAX_CONCURRENCY": "2",
        "RANKING_MIN_DEADLINE_MS": "0", "RANKING_MAX_QUEUE_MS": "0",
        "RANKING_DEFAULT_DEADLINE_MS": "1000", "RANKING_DIVERSITY": "1", "RANKING_SCORE_MODE": "ctr_x_rating",
        "RANKING_POLL_INTERVAL_S": "10", "RANKING_REDIS_TIMEOUT_MS": "100", "RANKING_GRACE_S": "0",
        "RANKING_REDIS_BREAKER_FAILURES": "1", "RANKING_REDIS_BREAKER_COOLDOWN_MS": "5000",
        "RANKING_RETRIEVAL_BREAKER_FAILURES": "2", "RANKING_RETRIEVAL_BREAKER_COOLDOWN_MS": "300",
        "RANKING_MAX_MESSAGE_BYTES": "8388608", "RANKING_MICROBATCH_MAX_SIZE": "1",
        "RANKING_MICROBATCH_MAX_WAIT_MS": "0.25",
        "RANKING_TLS_CERT_FILE": pem("cert.pem"), "RANKING_TLS_KEY_FILE": pem("key.pem"),
        "RANKING_RETRIEVAL_TLS_CA_FILE": pem("ca.pem"), "RANKING_RETRIEVAL_TLS_CERT_FILE": pem("client.pem"),
        "RANKING_RETRIEVAL_TLS_KEY_FILE": pem("client-key.pem"),
        "RETRIEVAL_PORT": "1",  # the other service's names are ignored
    }
    config = ranking_config.from_env(env)
    expected_tls = ranking_config.TlsConfig(Path(env["RANKING_TLS_CERT_FILE"]), Path(env["RANKING_TLS_KEY_FILE"]))
    expected_client = ranking_config.RetrievalClientTls(
        Path(env["RANKING_RETRIEVAL_TLS_CA_FILE"]), Path(env["RANKING_RETRIEVAL_TLS_CERT_FILE"]),
        Path(env["RANKING_RETRIEVAL_TLS_KEY_FILE"]))
    assert config == ranking_config.RankingConfig(
        artifact_root=root, redis_url="unix:///run/redis.sock", port=7000, metrics_port=7001,
        retrieval_target="dns:///retrieval:50051", max_k=50, default_candidates=300, max_rank_items=400,
        fallback="unavailable", max_in_flight=8, max_concurrency=2, min_deadline_ms=0, default_deadline_ms=1000,
        max_queue_ms=0.0,
        diversity=1.0,
        score_mode="ctr_x_rating", poll_interval_s=10.0, redis_timeout_ms=100, grace_s=0.0,
        redis_breaker_failures=1, redis_breaker_cooldown_ms=5000, retrieval_breaker_failures=2,
        retrieval_breaker_cooldown_ms=300,
        max_message_bytes=8388608, microbatch_max_size=1, microbatch_max_wait_ms=0.25,
        tls=expected_tls, retrieval_tls=expected_client)


def test_empty_values_mean_unset(root):
    env = {"RECSYS_ARTIFACT_ROOT": str(root), "RECSYS_REDIS_URL": "", "RETRIEVAL_PORT": "",
           "RETRIEVAL_TLS_CERT_FILE": ""}
    assert retrieval_config.from_env(env) == retrieval_config.RetrievalConfig(artifact_root=root)


BAD_SHARED = [
    ("RECSYS_TRUSTED_KEYS", "keys\nmore", "a path to a PEM file or a folder of them"),
    ("RECSYS_ALLOW_UNSIGNED", "maybe", "1/true/yes or 0/false/no"),
    ("RECSYS_REDIS_URL", "http://redis:6379", "redis://, rediss:// or unix:// URL"),
    ("RECSYS_REDIS_URL", "redis://", "redis://, rediss:// or unix:// URL"),
    ("RECSYS_REDIS_URL", "redis://redis:port", "redis://, rediss:// or unix:// URL"),
    ("RECSYS_REDIS_URL", "unix://", "redis://, rediss:// or unix:// URL"),
    ("RECSYS_REDIS_NAMESPACE", "a{b}", "1..64 characters"),
    ("RECSYS_REDIS_NAMESPACE", "with space", "1..64 characters"),
    ("RECSYS_REDIS_NAMESPACE", "x" * 65, "1..64 characters"),
    ("RECSYS_LOG_LEVEL", "LOUD", "one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("RECSYS_PINNED_VERSION", "0", "an integer >= 1"),
    ("RECSYS_PINNED_VERSION", "v3", "an integer >= 1"),
]
BAD_RETRIEVAL = [
    ("RETRIEVAL_HOST", "0.0.0.0:50051/x", "an IP address or host name to listen on"),
    ("RETRIEVAL_METRICS_HOST", "with space", "an IP address or host name to listen on"),
    ("RETRIEVAL_PORT", "65536", "an integer in [0, 65535]"),
    ("RETRIEVAL_PORT", "-1", "an integer in [0, 65535]"),
    ("RETRIEVAL_PORT", "http", "an integer in [0, 65535]"),
    ("RETRIEVAL_METRICS_PORT", "70000", "an integer in [0, 65535]"),
    ("RETRIEVAL_MAX_CANDIDATES", "0", "an integer in [1, 100000]"),
    ("RETRIEVAL_CHUNK_SIZE", "1.5", "an integer in [1, 100000]"),
    ("RETRIEVAL_POLL_INTERVAL_S", "0", "a number in (0.0, 3600.0]"),
    ("RETRIEVAL_POLL_INTERVAL_S", "nan", "a number in (0.0, 3600.0]"),
    ("RETRIEVAL_POLL_INTERVAL_S", "soon", "a number in (0.0, 3600.0]"),
    ("RETRIEVAL_DEVICE", "gpu", "one of auto, cpu, cuda"),
    ("RETRIEVAL_MICROBATCH_MAX_SIZE", "0", "an integer in [1, 4096]"),
    ("RETRIEVAL_MICROBATCH_MAX_WAIT_MS", "-1", "a number in [0.0, 1000.0]"),
    ("RETRIEVAL_MICROBATCH_MAX_WAIT_MS", "inf", "a number in [0.0, 1000.0]"),
    ("RETRIEVAL_REDIS_TIMEOUT_MS", "0", "an integer in [1, 60000]"),
    ("RETRIEVAL_REDIS_BREAKER_FAILURES", "0", "an integer in [1, 1000]"),
    ("RETRIEVAL_MAX_IN_FLIGHT", "0", "an integer in [1, 100000]"),
    ("RETRIEVAL_MAX_CONCURRENCY", "many", "an integer in [1, 100000]"),
    ("RETRIEVAL_MAX_LOOP_LAG_MS", "-1", "a number in [0.0, 60000.0]"),
    ("RETRIEVAL_MAX_QUEUE_MS", "nan", "a number in [0.0, 60000.0]"),
    ("RETRIEVAL_REDIS_BREAKER_COOLDOWN_MS", "1.5", "an integer in [1, 3600000]"),
    ("RETRIEVAL_GRACE_S", "-0.5", "a number in [0.0, 300.0]"),
    ("RETRIEVAL_MAX_MESSAGE_BYTES", "100", "an integer in [1024, 2147483647]"),
    ("RETRIEVAL_DEFAULT_DEADLINE_MS", "0", "an integer in [1, 600000]"),
    ("RETRIEVAL_WORKERS", "0", "an integer in [1, 64]"),
    ("RETRIEVAL_WORKERS", "two", "an integer in [1, 64]"),
    ("RETRIEVAL_COMPUTE_NICE", "-1", "an integer in [0, 19]"),
    ("RETRIEVAL_COMPUTE_NICE", "20", "an integer in [0, 19]"),
    ("RETRIEVAL_GIL_SWITCH_MS", "0", "a number in [0.05, 100.0]"),
    ("RETRIEVAL_GIL_SWITCH_MS", "nan", "a number in [0.05, 100.0]"),
]
BAD_RANKING = [
    ("RANKING_HOST", "a b", "an IP address or host name to listen on"),
    ("RANKING_METRICS_HOST", "user@host", "an IP address or host name to listen on"),
    ("RANKING_PORT", "99999", "an integer in [0, 65535]"),
    ("RANKING_METRICS_PORT", "-2", "an integer in [0, 65535]"),
    ("RANKING_RETRIEVAL_TARGET", "retrieval 50051", "a gRPC target"),
    ("RANKING_MAX_K", "0", "an integer in [1, 10000]"),
    ("RANKING_DEFAULT_CANDIDATES", "many", "an integer in [1, 100000]"),
    ("RANKING_MAX_RANK_ITEMS", "0", "an integer in [1, 100000]"),
    ("RANKING_FALLBACK", "random", "one of popular, unavailable"),
    ("RANKING_MAX_IN_FLIGHT", "0", "an integer in [1, 100000]"),
    ("RANKING_MAX_CONCURRENCY", "0", "an integer in [1, 100000]"),
    ("RANKING_MAX_LOOP_LAG_MS", "soon", "a number in [0.0, 60000.0]"),
    ("RANKING_MAX_QUEUE_MS", "-5", "a number in [0.0, 60000.0]"),
    ("RANKING_COMPUTE_NICE", "low", "an integer in [0, 19]"),
    ("RANKING_GIL_SWITCH_MS", "101", "a number in [0.05, 100.0]"),
    ("RANKING_MIN_DEADLINE_MS", "-5", "an integer in [0, 60000]"),
    ("RANKING_DEFAULT_DEADLINE_MS", "0", "an integer in [1, 600000]"),
    ("RANKING_DIVERSITY", "1.01", "a number in [0.0, 1.0]"),
    ("RANKING_DIVERSITY", "-0.1", "a number in [0.0, 1.0]"),
    ("RANKING_SCORE_MODE", "rating", "one of ctr, ctr_x_rating"),
    ("RANKING_POLL_INTERVAL_S", "-1", "a number in (0.0, 3600.0]"),
    ("RANKING_REDIS_TIMEOUT_MS", "fast", "an integer in [1, 60000]"),
    ("RANKING_REDIS_BREAKER_FAILURES", "1001", "an integer in [1, 1000]"),
    ("RANKING_REDIS_BREAKER_COOLDOWN_MS", "0", "an integer in [1, 3600000]"),
    ("RANKING_RETRIEVAL_BREAKER_FAILURES", "0", "an integer in [1, 1000]"),
    ("RANKING_RETRIEVAL_BREAKER_COOLDOWN_MS", "-1", "an integer in [1, 3600000]"),
    ("RANKING_GRACE_S", "301", "a number in [0.0, 300.0]"),
    ("RANKING_MAX_MESSAGE_BYTES", "1023", "an integer in [1024, 2147483647]"),
    ("RANKING_MICROBATCH_MAX_SIZE", "5000", "an integer in [1, 4096]"),
    ("RANKING_MICROBATCH_MAX_WAIT_MS", "1001", "a number in [0.0, 1000.0]"),
    ("RANKING_WORKERS", "65", "an integer in [1, 64]"),
    ("RANKING_RETRIEVAL_CHANNELS", "0", "an integer in [1, 64]"),
    ("RANKING_RETRIEVAL_THROTTLE_K", "1", "0 (off) or a number > 1"),
    ("RANKING_RETRIEVAL_THROTTLE_K", "-1", "a number in [0.0, inf)"),
    ("RANKING_RETRIEVAL_TIMEOUT_MULTIPLIER", "0.5", "0 (off) or a number in [1, 1000]"),
    ("RANKING_RETRIEVAL_TIMEOUT_MULTIPLIER", "fast", "a number in [0.0, 1000.0]"),
    ("RANKING_RETRIEVAL_TIMEOUT_FLOOR_MS", "0", "an integer in [1, 60000]"),
]
CASES = ([("retrieval", *case) for case in BAD_SHARED + BAD_RETRIEVAL]
         + [("ranking", *case) for case in BAD_SHARED + BAD_RANKING])


@pytest.mark.parametrize(("service", "name", "value", "expected"), CASES,
                         ids=[f"{c[0]}-{c[1]}={c[2][:12]}" for c in CASES])
def test_bad_value_names_variable_value_and_expectation(root, service, name, value, expected):
    with pytest.raises(ValueError) as info:
        MODULES[service].from_env({"RECSYS_ARTIFACT_ROOT": str(root), name: value})
    message = str(info.value)
    assert message.startswith(f"{name} must be ")
    assert expected in message
    assert repr(value) in message


def test_every_variable_has_a_bad_value_case():
    for service, bad in (("retrieval", BAD_RETRIEVAL), ("ranking", BAD_RANKING)):
        tested = {name for name, _, _ in BAD_SHARED + bad}
        untested = set(MODULES[service].ENV_VARS) - tested - {"RECSYS_ARTIFACT_ROOT"}
        assert {name for name in untested if "TLS" not in name} == set()


@pytest.mark.parametrize("service", MODULES)
def test_redis_password_is_redacted_in_errors(root, service):
    with pytest.raises(ValueError, match="RECSYS_REDIS_URL") as info:
        MODULES[service].from_env({"RECSYS_ARTIFACT_ROOT": str(root), "RECSYS_REDIS_URL": "http://:hunter2@redis"})
    assert "hunter2" not in str(info.value)
    assert "http://:***@redis" in str(info.value)


@pytest.mark.parametrize("service", MODULES)
@pytest.mark.parametrize("value", [None, ""])
def test_missing_artifact_root(service, value):
    env = {} if value is None else {"RECSYS_ARTIFACT_ROOT": value}
    with pytest.raises(ValueError, match=r"^RECSYS_ARTIFACT_ROOT must be set \(required: artifact root\), got ''"):
        MODULES[service].from_env(env)


@pytest.mark.parametrize("service", MODULES)
def test_artifact_root_that_is_a_file(tmp_path, service):
    path = tmp_path / "CURRENT"
    path.write_text("1\n")
    with pytest.raises(ValueError, match=r"^RECSYS_ARTIFACT_ROOT must be a directory .*CURRENT'"):
        MODULES[service].from_env({"RECSYS_ARTIFACT_ROOT": str(path)})


def test_artifact_root_need_not_exist_yet(tmp_path):
    # The services wait (NOT_SERVING) for the trainer's first version; the folder may come with it.
    config = retrieval_config.from_env({"RECSYS_ARTIFACT_ROOT": str(tmp_path / "later")})
    assert config.artifact_root == tmp_path / "later"


@pytest.mark.parametrize(("service", "typo"), [("retrieval", "RETRIEVAL_PROT"), ("ranking", "RANKING_MAXK"),
                                               ("retrieval", "RECSYS_REDIS_ULR"), ("ranking", "RECSYS_LOGLEVEL")])
def test_unknown_name_fails_with_its_name(root, service, typo):
    with pytest.raises(ValueError, match=rf"^unknown environment variables \['{typo}'\]"):
        MODULES[service].from_env({"RECSYS_ARTIFACT_ROOT": str(root), typo: "1"})


@pytest.mark.parametrize("service", MODULES)
def test_other_programs_names_are_not_typos(root, service):
    env = {"RECSYS_ARTIFACT_ROOT": str(root), "RECSYS_DATA_DIR": "/data", "RECSYS_TEST_REDIS_URL": "redis://x"}
    assert MODULES[service].from_env(env).artifact_root == root


@pytest.mark.parametrize(("service", "prefix"), [("retrieval", "RETRIEVAL"), ("ranking", "RANKING")])
@pytest.mark.parametrize("present", ["CERT", "KEY"])
def test_tls_cert_and_key_must_come_together(root, pem, service, prefix, present):
    env = {"RECSYS_ARTIFACT_ROOT": str(root), f"{prefix}_TLS_{present}_FILE": pem("one.pem")}
    with pytest.raises(ValueError, match=rf"^{prefix}_TLS_CERT_FILE and {prefix}_TLS_KEY_FILE must be set together"):
        MODULES[service].from_env(env)


@pytest.mark.parametrize(("service", "prefix"), [("retrieval", "RETRIEVAL"), ("ranking", "RANKING")])
def test_client_ca_requires_server_tls(root, pem, service, prefix):
    env = {"RECSYS_ARTIFACT_ROOT": str(root), f"{prefix}_TLS_CLIENT_CA_FILE": pem("ca.pem")}
    with pytest.raises(ValueError, match=rf"^{prefix}_TLS_CLIENT_CA_FILE requires {prefix}_TLS_CERT_FILE"):
        MODULES[service].from_env(env)


@pytest.mark.parametrize("service", MODULES)
def test_tls_file_must_exist(root, tmp_path, service):
    name = "RETRIEVAL_TLS_CERT_FILE" if service == "retrieval" else "RANKING_RETRIEVAL_TLS_CA_FILE"
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(ValueError, match=rf"^{name} must name an existing PEM file, got '{missing}'"):
        MODULES[service].from_env({"RECSYS_ARTIFACT_ROOT": str(root), name: missing})


def test_server_tls_without_client_ca_is_plain_tls(root, pem):
    env = {"RECSYS_ARTIFACT_ROOT": str(root), "RANKING_TLS_CERT_FILE": pem("c.pem"),
           "RANKING_TLS_KEY_FILE": pem("k.pem")}
    tls = ranking_config.from_env(env).tls
    assert tls is not None and tls.client_ca_file is None


def test_retrieval_client_cert_requires_ca(root, pem):
    env = {"RECSYS_ARTIFACT_ROOT": str(root), "RANKING_RETRIEVAL_TLS_CERT_FILE": pem("c.pem"),
           "RANKING_RETRIEVAL_TLS_KEY_FILE": pem("k.pem")}
    with pytest.raises(ValueError, match=r"^RANKING_RETRIEVAL_TLS_CERT_FILE requires RANKING_RETRIEVAL_TLS_CA_FILE"):
        ranking_config.from_env(env)


def test_retrieval_client_cert_requires_key(root, pem):
    env = {"RECSYS_ARTIFACT_ROOT": str(root), "RANKING_RETRIEVAL_TLS_CA_FILE": pem("ca.pem"),
           "RANKING_RETRIEVAL_TLS_CERT_FILE": pem("c.pem")}
    with pytest.raises(ValueError, match=r"^RANKING_RETRIEVAL_TLS_CERT_FILE and RANKING_RETRIEVAL_TLS_KEY_FILE"):
        ranking_config.from_env(env)


def test_retrieval_ca_alone_is_server_authenticated_tls(root, pem):
    env = {"RECSYS_ARTIFACT_ROOT": str(root), "RANKING_RETRIEVAL_TLS_CA_FILE": pem("ca.pem")}
    client = ranking_config.from_env(env).retrieval_tls
    assert client == ranking_config.RetrievalClientTls(ca_file=Path(env["RANKING_RETRIEVAL_TLS_CA_FILE"]))


RELATIONS = [
    ("retrieval", {"RETRIEVAL_METRICS_PORT": "50051"},
     r"^RETRIEVAL_METRICS_PORT must differ from RETRIEVAL_PORT, got 50051"),
    ("retrieval", {"RETRIEVAL_CHUNK_SIZE": "2000"},
     r"^RETRIEVAL_CHUNK_SIZE must be <= RETRIEVAL_MAX_CANDIDATES \(1000\), got 2000"),
    ("ranking", {"RANKING_PORT": "9102"}, r"^RANKING_METRICS_PORT must differ from RANKING_PORT, got 9102"),
    ("ranking", {"RANKING_MAX_K": "600"}, r"^RANKING_MAX_K must be <= RANKING_DEFAULT_CANDIDATES \(500\).*got 600"),
    ("ranking", {"RANKING_DEFAULT_CANDIDATES": "1001"},
     r"^RANKING_DEFAULT_CANDIDATES must be <= RANKING_MAX_RANK_ITEMS \(1000\), got 1001"),
    ("ranking", {"RANKING_DEFAULT_DEADLINE_MS": "5"},
     r"^RANKING_DEFAULT_DEADLINE_MS must be > RANKING_MIN_DEADLINE_MS \(5\), got 5"),
    ("retrieval", {"RETRIEVAL_MAX_IN_FLIGHT": "4"},
     r"^RETRIEVAL_MAX_IN_FLIGHT must be >= RETRIEVAL_MAX_CONCURRENCY \(8\), got 4"),
    ("ranking", {"RANKING_MAX_CONCURRENCY": "200"},
     r"^RANKING_MAX_IN_FLIGHT must be >= RANKING_MAX_CONCURRENCY \(200\), got 128"),
]


@pytest.mark.parametrize(("service", "env", "message"), RELATIONS, ids=[next(iter(r[1])) for r in RELATIONS])
def test_inconsistent_values_fail(root, service, env, message):
    with pytest.raises(ValueError, match=message):
        MODULES[service].from_env({"RECSYS_ARTIFACT_ROOT": str(root), **env})


@pytest.mark.parametrize("service", MODULES)
def test_port_zero_disables_metrics_without_clash(root, service):
    prefix = MODULES[service].PREFIX
    config = MODULES[service].from_env({"RECSYS_ARTIFACT_ROOT": str(root), f"{prefix}PORT": "0",
                                        f"{prefix}METRICS_PORT": "0"})
    assert (config.port, config.metrics_port) == (0, 0)


@pytest.mark.parametrize("service", MODULES)
def test_config_is_frozen(root, service):
    config = MODULES[service].from_env({"RECSYS_ARTIFACT_ROOT": str(root)})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]


def test_the_adaptive_retrieval_timeout_is_on_by_default_and_takes_a_multiplier_and_floor(root):
    ranking = MODULES["ranking"]
    config = ranking.from_env({"RECSYS_ARTIFACT_ROOT": str(root)})
    assert (config.retrieval_timeout_multiplier, config.retrieval_timeout_floor_ms) == (2.0, 20)
    config = ranking.from_env({"RECSYS_ARTIFACT_ROOT": str(root), "RANKING_RETRIEVAL_TIMEOUT_MULTIPLIER": "3",
                               "RANKING_RETRIEVAL_TIMEOUT_FLOOR_MS": "35"})
    assert (config.retrieval_timeout_multiplier, config.retrieval_timeout_floor_ms) == (3.0, 35)
    config = ranking.from_env({"RECSYS_ARTIFACT_ROOT": str(root), "RANKING_RETRIEVAL_TIMEOUT_MULTIPLIER": "0"})
    assert config.retrieval_timeout_multiplier == 0.0                          # off


def test_the_retrieval_throttle_defaults_to_2_and_0_turns_it_off(root):
    assert MODULES["ranking"].from_env({"RECSYS_ARTIFACT_ROOT": str(root)}).retrieval_throttle_k == 2.0
    assert MODULES["ranking"].from_env({"RECSYS_ARTIFACT_ROOT": str(root),
                                        "RANKING_RETRIEVAL_THROTTLE_K": "0"}).retrieval_throttle_k == 0.0
    assert MODULES["ranking"].from_env({"RECSYS_ARTIFACT_ROOT": str(root),
                                        "RANKING_RETRIEVAL_THROTTLE_K": "1.3"}).retrieval_throttle_k == 1.3
