"""The gateway's env configuration: defaults, every name parsed, every rejected value, TLS rules."""

from __future__ import annotations

import pytest

from gateway import config as gateway_config
from gateway.config import GatewayConfig, RankingTls, from_env


@pytest.fixture
def pem(tmp_path):
    def make(name: str) -> str:
        path = tmp_path / name
        path.write_text("-----BEGIN CERTIFICATE-----\n")
        return str(path)

    return make


def test_defaults_and_foreign_names_are_ignored():
    config = from_env({"RECSYS_ARTIFACT_ROOT": "/artifacts", "RANKING_PORT": "1", "RETRIEVAL_PORT": "2"})
    assert config == GatewayConfig()
    assert (config.port, config.ranking_target, config.default_timeout_ms, config.max_body_bytes) == (
        8080, "localhost:50052", 1000, 1024 * 1024)
    assert config.ranking_tls is None


def test_every_name_is_parsed(pem):
    env = {"RECSYS_LOG_LEVEL": "debug", "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": "9000",
           "GATEWAY_RANKING_TARGET": "dns:///ranking:50052", "GATEWAY_DEFAULT_TIMEOUT_MS": "250",
           "GATEWAY_MAX_TIMEOUT_MS": "5000", "GATEWAY_MAX_BODY_BYTES": "2048", "GATEWAY_MAX_K": "50",
           "GATEWAY_MAX_CANDIDATES": "500", "GATEWAY_RETRY_AFTER_S": "2", "GATEWAY_GRACE_S": "3.5",
           "GATEWAY_THROTTLE_K": "1.5", "GATEWAY_RANKING_TLS_CA_FILE": pem("ca.pem"), "GATEWAY_RANKING_TLS_CERT_FILE": pem("cert.pem"),
           "GATEWAY_RANKING_TLS_KEY_FILE": pem("key.pem")}
    assert set(env) == set(gateway_config.ENV_VARS)
    config = from_env(env)
    assert config == GatewayConfig(
        host="127.0.0.1", port=9000, ranking_target="dns:///ranking:50052", log_level="DEBUG",
        default_timeout_ms=250, max_timeout_ms=5000, max_body_bytes=2048, max_k=50, max_candidates=500,
        retry_after_s=2, grace_s=3.5, throttle_k=1.5, ranking_tls=RankingTls(ca_file=config.ranking_tls.ca_file,
                                                             cert_file=config.ranking_tls.cert_file,
                                                             key_file=config.ranking_tls.key_file))
    assert config.ranking_tls.key_file.name == "key.pem"


@pytest.mark.parametrize("name, value", [
    ("GATEWAY_PORT", "http"), ("GATEWAY_PORT", "70000"), ("GATEWAY_RANKING_TARGET", "ranking 50052"),
    ("GATEWAY_HOST", "a b"), ("GATEWAY_DEFAULT_TIMEOUT_MS", "0"), ("GATEWAY_MAX_BODY_BYTES", "10"),
    ("GATEWAY_MAX_K", "-1"), ("GATEWAY_RETRY_AFTER_S", "soon"), ("GATEWAY_GRACE_S", "nan"),
    ("RECSYS_LOG_LEVEL", "LOUD"), ("GATEWAY_RANKING_TLS_CA_FILE", "/nonexistent/ca.pem"),
    ("GATEWAY_THROTTLE_K", "1"), ("GATEWAY_THROTTLE_K", "0.5"), ("GATEWAY_THROTTLE_K", "-2"),
    ("GATEWAY_THROTTLE_K", "inf"),
])
def test_bad_values_name_the_variable(name, value):
    with pytest.raises(ValueError, match=name):
        from_env({name: value})


def test_the_throttle_is_on_by_default_and_0_turns_it_off():
    assert from_env({}).throttle_k == 2.0
    assert from_env({"GATEWAY_THROTTLE_K": "0"}).throttle_k == 0.0
    with pytest.raises(ValueError, match=r"GATEWAY_THROTTLE_K must be 0 \(off\) or a number > 1, got '1'"):
        from_env({"GATEWAY_THROTTLE_K": "1"})


def test_unknown_gateway_names_are_typos():
    with pytest.raises(ValueError, match="GATEWAY_PROT"):
        from_env({"GATEWAY_PROT": "8080"})


def test_relations():
    with pytest.raises(ValueError, match="GATEWAY_DEFAULT_TIMEOUT_MS must be <= GATEWAY_MAX_TIMEOUT_MS"):
        from_env({"GATEWAY_DEFAULT_TIMEOUT_MS": "2000", "GATEWAY_MAX_TIMEOUT_MS": "1000"})
    with pytest.raises(ValueError, match="GATEWAY_MAX_K must be <= GATEWAY_MAX_CANDIDATES"):
        from_env({"GATEWAY_MAX_K": "200", "GATEWAY_MAX_CANDIDATES": "100"})


def test_tls_rules(pem):
    with pytest.raises(ValueError, match="must be set together"):
        from_env({"GATEWAY_RANKING_TLS_CA_FILE": pem("ca.pem"), "GATEWAY_RANKING_TLS_CERT_FILE": pem("c.pem")})
    with pytest.raises(ValueError, match="requires GATEWAY_RANKING_TLS_CA_FILE"):
        from_env({"GATEWAY_RANKING_TLS_CERT_FILE": pem("c.pem"), "GATEWAY_RANKING_TLS_KEY_FILE": pem("k.pem")})
    assert from_env({"GATEWAY_RANKING_TLS_CA_FILE": pem("ca.pem")}).ranking_tls.cert_file is None


def test_main_exits_2_naming_the_variable(monkeypatch, capsys):
    from gateway.__main__ import main

    monkeypatch.setenv("GATEWAY_PORT", "eighty")
    assert main() == 2
    assert "GATEWAY_PORT" in capsys.readouterr().err
