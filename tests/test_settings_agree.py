"""Settings two programs must agree on, checked over every deployment the repository ships.

``RANKING_DEFAULT_CANDIDATES`` is what ranking asks retrieval for when a Recommend says 0, and
retrieval refuses more than ``RETRIEVAL_MAX_CANDIDATES`` (INVALID_ARGUMENT): each service's config
can only check its own side, so this test checks the pair in docker-compose.yml and in every
Kubernetes variant (base and overlays), a setting left unset counting as the code's default.
Likewise ranking runs up to ``RANKING_MAX_CONCURRENCY`` Recommends at once, each with one Retrieve
in flight: a ``RETRIEVAL_MAX_IN_FLIGHT`` below that refuses ranking's own admitted work.

The overload settings (admission, default deadline, Redis budget and breakers) and the worker
processes per service are spelled out in every deployment, with the same values in
docker-compose.yml and each Kubernetes variant.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ranking_service import config as ranking_config
from retrieval_service import config as retrieval_config
from tests.deploy.test_k8s import K8S, OVERLAYS, container_env, pod_templates, render

REPO_ROOT = Path(__file__).resolve().parents[1]


def disagreements(ranking_env: dict[str, str], retrieval_env: dict[str, str]) -> list[str]:
    """What the pair of environments gets wrong, each naming both settings and their values."""
    ranking = ranking_config.from_env({**ranking_env, "RECSYS_ARTIFACT_ROOT": str(REPO_ROOT)})
    retrieval = retrieval_config.from_env({**retrieval_env, "RECSYS_ARTIFACT_ROOT": str(REPO_ROOT)})
    found = []
    if ranking.default_candidates > retrieval.max_candidates:
        found.append(f"RANKING_DEFAULT_CANDIDATES ({ranking.default_candidates}) exceeds RETRIEVAL_MAX_CANDIDATES "
                     f"({retrieval.max_candidates}): a default Recommend would be refused by retrieval")
    if ranking.max_concurrency > retrieval.max_in_flight:
        found.append(f"RANKING_MAX_CONCURRENCY ({ranking.max_concurrency}) exceeds RETRIEVAL_MAX_IN_FLIGHT "
                     f"({retrieval.max_in_flight}): retrieval would refuse Recommends ranking admitted")
    return found


def _settings(env: dict) -> dict[str, str]:
    """The env without paths this machine lacks (the artifact root and key files are the images')."""
    return {k: str(v) for k, v in env.items()
            if k.startswith(("RANKING_", "RETRIEVAL_")) and not k.endswith(("_FILE",))}


def compose_envs() -> tuple[dict[str, str], dict[str, str]]:
    services = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    return _settings(services["ranking"]["environment"]), _settings(services["retrieval"]["environment"])


def k8s_envs(variant: str) -> tuple[dict[str, str], dict[str, str]]:
    docs = render(K8S / variant)
    envs = {}
    for workload, pod in pod_templates(docs):
        if workload in ("recsys-ranking", "recsys-retrieval"):
            (container,) = pod["spec"]["containers"]
            envs[workload] = _settings(container_env(docs, container))
    return envs["recsys-ranking"], envs["recsys-retrieval"]


OVERLOAD_VARS = {
    "ranking": ("RANKING_MAX_CONCURRENCY", "RANKING_MAX_IN_FLIGHT", "RANKING_DEFAULT_DEADLINE_MS",
                "RANKING_MIN_DEADLINE_MS", "RANKING_REDIS_TIMEOUT_MS", "RANKING_REDIS_BREAKER_FAILURES",
                "RANKING_REDIS_BREAKER_COOLDOWN_MS", "RANKING_RETRIEVAL_BREAKER_FAILURES",
                "RANKING_RETRIEVAL_BREAKER_COOLDOWN_MS", "RANKING_WORKERS", "RANKING_RETRIEVAL_CHANNELS",
                "RANKING_COMPUTE_NICE", "RANKING_GIL_SWITCH_MS", "RANKING_RETRIEVAL_TIMEOUT_MULTIPLIER",
                "RANKING_RETRIEVAL_TIMEOUT_FLOOR_MS"),
    "retrieval": ("RETRIEVAL_MAX_CONCURRENCY", "RETRIEVAL_MAX_IN_FLIGHT", "RETRIEVAL_DEFAULT_DEADLINE_MS",
                  "RETRIEVAL_REDIS_TIMEOUT_MS", "RETRIEVAL_REDIS_BREAKER_FAILURES",
                  "RETRIEVAL_REDIS_BREAKER_COOLDOWN_MS", "RETRIEVAL_WORKERS", "RETRIEVAL_COMPUTE_NICE",
                  "RETRIEVAL_GIL_SWITCH_MS"),
}


def overload_settings(ranking_env: dict[str, str], retrieval_env: dict[str, str]) -> dict[str, str | None]:
    return {name: env.get(name) for env, names in ((ranking_env, OVERLOAD_VARS["ranking"]),
                                                   (retrieval_env, OVERLOAD_VARS["retrieval"])) for name in names}


@pytest.mark.parametrize("variant", OVERLAYS)
def test_every_deployment_spells_out_the_same_overload_settings(variant):
    compose, k8s = overload_settings(*compose_envs()), overload_settings(*k8s_envs(variant))
    assert [name for name, value in compose.items() if value is None] == []
    assert k8s == compose


def test_compose_ranking_never_asks_for_more_candidates_than_retrieval_serves():
    assert disagreements(*compose_envs()) == []


@pytest.mark.parametrize("variant", OVERLAYS)
def test_k8s_ranking_never_asks_for_more_candidates_than_retrieval_serves(variant):
    assert disagreements(*k8s_envs(variant)) == []


def test_the_check_names_both_settings_and_values():
    assert disagreements({"RANKING_DEFAULT_CANDIDATES": "800"}, {"RETRIEVAL_MAX_CANDIDATES": "600"}) == [
        "RANKING_DEFAULT_CANDIDATES (800) exceeds RETRIEVAL_MAX_CANDIDATES (600): a default Recommend would be "
        "refused by retrieval"]
    assert disagreements({"RANKING_DEFAULT_CANDIDATES": "600"}, {"RETRIEVAL_MAX_CANDIDATES": "600"}) == []
    assert disagreements({"RANKING_MAX_CONCURRENCY": "16"},
                         {"RETRIEVAL_MAX_IN_FLIGHT": "12", "RETRIEVAL_MAX_CONCURRENCY": "4"}) == [
        "RANKING_MAX_CONCURRENCY (16) exceeds RETRIEVAL_MAX_IN_FLIGHT (12): retrieval would refuse Recommends "
        "ranking admitted"]


def test_ranking_refuses_default_candidates_above_its_max_rank_items_at_startup():
    with pytest.raises(ValueError, match=r"^RANKING_DEFAULT_CANDIDATES must be <= RANKING_MAX_RANK_ITEMS \(400\), "
                                         r"got 500"):
        ranking_config.from_env({"RECSYS_ARTIFACT_ROOT": str(REPO_ROOT), "RANKING_MAX_RANK_ITEMS": "400"})
