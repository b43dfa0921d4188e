"""Tests of the deployment files (Dockerfiles, docker-compose.yml, deploy/k8s) and the services' config.

No Docker engine or cluster is needed: the files are parsed and checked against the code they run.
Shared here: which environment names each program reads, keyed by its ``python -m`` module.
"""

from __future__ import annotations

from pathlib import Path

from gateway.config import ENV_VARS as GATEWAY_ENV_VARS
from ranking_service.config import ENV_VARS as RANKING_ENV_VARS
from retrieval_service.config import ENV_VARS as RETRIEVAL_ENV_VARS

REPO_ROOT = Path(__file__).resolve().parents[2]

# The trainer CLI's environment contract (it takes everything else from its config file):
# where to publish, where the data lives, and the Redis it fills.
TRAINER_ENV_VARS = ("RECSYS_ARTIFACT_ROOT", "RECSYS_DATA_DIR", "RECSYS_REDIS_URL", "RECSYS_REDIS_NAMESPACE",
                    "RECSYS_LOG_LEVEL", "RECSYS_SIGNING_KEY")

PROGRAM_ENV_VARS: dict[str, tuple[str, ...]] = {
    "retrieval_service": RETRIEVAL_ENV_VARS,
    "ranking_service": RANKING_ENV_VARS,
    "trainer": TRAINER_ENV_VARS,
    "gateway": GATEWAY_ENV_VARS,
}
# Prefixes owned by the project: every such name a deployment sets must be one its program reads.
PROJECT_PREFIXES = ("RECSYS_", "RETRIEVAL_", "RANKING_", "GATEWAY_")


def foreign_names(program: str, names: set[str]) -> set[str]:
    """The project-prefixed names in ``names`` that ``program`` does not read."""
    return {name for name in names if name.startswith(PROJECT_PREFIXES)} - set(PROGRAM_ENV_VARS[program])
