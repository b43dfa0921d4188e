"""Small real versions for service tests: ``trainer.tiny``'s factory, signed with the suite's key."""

from __future__ import annotations

from pathlib import Path

from recsys_contracts.signing import Signer
from tests.signing_keys import SIGNER
from trainer.publish import TrainedRun
from trainer.tiny import publish_tiny_version as _publish_tiny_version
from trainer.tiny import tiny_dataset, tiny_run

__all__ = ["publish_tiny_version", "tiny_dataset", "tiny_run"]


def publish_tiny_version(root: Path, seed: int = 0, run: TrainedRun | None = None,
                         make_current: bool = True, signer: Signer | None = SIGNER) -> int:
    return _publish_tiny_version(root, seed, run, make_current, signer=signer)
