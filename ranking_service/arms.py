"""Which arm answers a Recommend: the live version, or the arms file's candidate for the user's canary share.

The split is ``recsys_contracts.arms.in_canary`` (a hash of the user id: sticky per user, the same in
every process); the candidate answers only while this service holds it (``VersionHolder.held``).
"""

from __future__ import annotations

from recsys_contracts.arms import in_canary
from recsys_contracts.v1 import ranking_pb2
from recsys_serving.reload import VersionHolder
from ranking_service.state import ServingState


def route(holder: VersionHolder[ServingState], user_id: str, live: ServingState) -> tuple[ServingState, int]:
    """(the state to answer with, its ``ranking_pb2.Arm``) for this user."""
    arms = holder.arms
    if arms is not None and arms.candidate != live.version and in_canary(user_id, arms.canary_percent):
        candidate = holder.held(arms.candidate)
        if candidate is not None:
            return candidate, ranking_pb2.ARM_CANARY
    return live, ranking_pb2.ARM_LIVE
