"""docker-compose.yml, parsed: start order, volumes, hardening, env names and ports against the config."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from gateway import config as gateway_config
from ranking_service import config as ranking_config
from retrieval_service import config as retrieval_config
from tests.deploy import REPO_ROOT, foreign_names
from tests.deploy.test_dockerfiles import healthcheck_code

COMPOSE = REPO_ROOT / "docker-compose.yml"
APP_SERVICES = ("trainer", "retrieval", "ranking", "gateway")
ARTIFACT_READERS = ("trainer", "retrieval", "ranking")     # the gateway reads no artifact
CONFIGS = {"retrieval_service": retrieval_config, "ranking_service": ranking_config, "gateway": gateway_config}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


def program(service: dict) -> str:
    """The module the service's image runs (python -m <module>), read from its Dockerfile."""
    dockerfile = (REPO_ROOT / service["build"]["dockerfile"]).read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.MULTILINE).group(1))
    assert entrypoint[:2] == ["python", "-m"]
    return entrypoint[2]


def defaults(service: dict):
    return CONFIGS[program(service)].from_env({"RECSYS_ARTIFACT_ROOT": "/artifacts"})


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)", duration)
    assert match, duration
    return int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[match.group(2)]


def test_services(services):
    assert set(services) == {"redis", *APP_SERVICES}
    assert services["redis"]["image"].startswith("redis:7")
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_every_depends_on_target_exists_and_can_satisfy_its_condition(services):
    for name, service in services.items():
        for target, rule in service.get("depends_on", {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy"
            if rule["condition"] == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{target} must run once"


def test_start_order(services):
    for name in ("retrieval", "ranking"):
        depends = services[name]["depends_on"]
        assert depends["redis"] == {"condition": "service_healthy"}
        assert depends["trainer"] == {"condition": "service_completed_successfully"}
    assert services["ranking"]["depends_on"]["retrieval"] == {"condition": "service_healthy"}
    assert services["trainer"]["depends_on"]["redis"] == {"condition": "service_healthy"}


def test_named_volumes_are_declared(compose, services):
    declared = set(compose["volumes"])
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith(("/", ".", "$")):
                assert source in declared, f"{name} mounts undeclared volume {source}"


_VOLUME = re.compile(r"(?P<source>\$\{[^}]*\}|[^:]+):(?P<target>[^:]+)(?::(?P<mode>ro|rw))?")


def mounts(service: dict) -> dict[str, tuple[str, str]]:
    """container path -> (source, mode) of the service's short-syntax volumes."""
    result = {}
    for volume in service.get("volumes", []):
        match = _VOLUME.fullmatch(volume)
        assert match, volume
        result[match["target"]] = (match["source"], match["mode"] or "rw")
    return result


def test_artifacts_volume_is_written_by_the_trainer_and_read_only_elsewhere(services):
    assert "volumes" not in services["gateway"]
    for name in ARTIFACT_READERS:
        root = services[name]["environment"]["RECSYS_ARTIFACT_ROOT"]
        source, mode = mounts(services[name])[root]
        assert source == "artifacts"
        assert mode == ("rw" if name == "trainer" else "ro"), name


def test_trainer_reads_the_data_set_read_only_from_a_relative_path(services):
    trainer = services["trainer"]
    source, mode = mounts(trainer)[trainer["environment"]["RECSYS_DATA_DIR"]]
    assert mode == "ro"
    assert source == "${RECSYS_DATA_HOST_DIR:-../shared/data}", "no absolute machine path in the repo"


def test_hardening(services):
    for name in APP_SERVICES:
        service = services[name]
        assert service["read_only"] is True, name
        assert "/tmp" in service["tmpfs"], name
        assert service["user"] == "10001:10001", name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name


def test_env_names_are_read_by_the_program(services):
    for name in APP_SERVICES:
        service = services[name]
        assert foreign_names(program(service), set(service["environment"])) == set(), name


@pytest.mark.parametrize("name", ["retrieval", "ranking"])
def test_env_is_a_valid_config(services, name):
    env = {key: str(value) for key, value in services[name]["environment"].items()}
    config = CONFIGS[program(services[name])].from_env(env)
    assert config.redis_url is not None
    redis_host = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", config.redis_url)
    assert redis_host and redis_host.group(1) in services and redis_host.group(2) == "6379"


def test_ports_match_the_config_defaults(services):
    retrieval, ranking = defaults(services["retrieval"]), defaults(services["ranking"])
    assert {int(p) for p in services["retrieval"]["expose"]} == {retrieval.port, retrieval.metrics_port}
    assert services["retrieval"]["environment"]["RETRIEVAL_PORT"] == str(retrieval.port)
    assert services["ranking"]["environment"]["RANKING_PORT"] == str(ranking.port)
    assert services["ranking"]["ports"] == [f"127.0.0.1:{ranking.port}:{ranking.port}"]
    assert {int(p) for p in services["ranking"]["expose"]} == {ranking.metrics_port}
    assert services["ranking"]["environment"]["RANKING_RETRIEVAL_TARGET"] == f"retrieval:{retrieval.port}"
    assert "ports" not in services["retrieval"], "only ranking and the gateway (the front doors) are published"


def test_gateway_calls_ranking_and_is_published(services):
    ranking, gateway = defaults(services["ranking"]), defaults(services["gateway"])
    config = gateway_config.from_env({k: str(v) for k, v in services["gateway"]["environment"].items()})
    assert config.ranking_target == f"ranking:{ranking.port}" and config.port == gateway.port
    assert services["gateway"]["ports"] == [f"127.0.0.1:{gateway.port}:{gateway.port}"]
    assert services["gateway"]["depends_on"] == {"ranking": {"condition": "service_healthy"}}


@pytest.mark.parametrize("name", ["retrieval", "ranking", "gateway"])
def test_health_check_is_the_images_own(services, name):
    service = services[name]
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    assert test[3] == healthcheck_code(Path(service["build"]["dockerfile"]).name)
    # model loading takes a while (the gateway's /readyz waits for ranking's)
    assert seconds(service["healthcheck"]["start_period"]) >= 60


@pytest.mark.parametrize("name", ["retrieval", "ranking", "gateway"])
def test_stop_grace_exceeds_the_drain_time(services, name):
    assert seconds(services[name]["stop_grace_period"]) > defaults(services[name]).grace_s


def test_images_are_built_from_this_repository(services):
    for name in APP_SERVICES:
        build = services[name]["build"]
        assert build["context"] == "."
        assert (REPO_ROOT / build["dockerfile"]).is_file()
        # only the trainer's image carries torch (the services run ONNX programs, the gateway none)
        expected = {"TORCH_INDEX_URL": "${TORCH_INDEX_URL:-}"} if name == "trainer" else None
        assert build.get("args") == expected, name
