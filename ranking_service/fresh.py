"""Fresh interactions kept in process, for a service run WITHOUT Redis (``RECSYS_REDIS_URL`` unset).

Bounded on both axes: the last ``max_per_user`` interactions of each user (as Redis keeps with
LTRIM) and at most ``max_users`` users, the least recently written user evicted first. What lives
here is lost on restart and is invisible to the retrieval service (another process), which is why
the ranking service itself drops a user's fresh items from the candidates it receives.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

from recsys_contracts.feature_store import DEFAULT_MAX_FRESH, FreshInteraction


class InProcessFreshStore:
    def __init__(self, max_users: int = 100_000, max_per_user: int = DEFAULT_MAX_FRESH) -> None:
        if max_users < 1:
            raise ValueError(f"max_users must be >= 1, got {max_users!r}")
        if max_per_user < 1:
            raise ValueError(f"max_per_user must be >= 1, got {max_per_user!r}")
        self.max_users, self.max_per_user = max_users, max_per_user
        self._by_user: collections.OrderedDict[str, collections.deque[FreshInteraction]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._by_user)

    def record(self, interactions: Iterable[tuple[str, FreshInteraction]]) -> int:
        """Appends (user_id, interaction) pairs in order; returns how many were stored."""
        stored = 0
        for user_id, interaction in interactions:
            queue = self._by_user.pop(user_id, None)
            if queue is None:
                queue = collections.deque(maxlen=self.max_per_user)
            queue.append(interaction)
            self._by_user[user_id] = queue          # most recently written last
            stored += 1
            while len(self._by_user) > self.max_users:
                self._by_user.popitem(last=False)
        return stored

    def get(self, user_id: str) -> list[FreshInteraction]:
        """The user's fresh interactions, oldest first (empty when none)."""
        return list(self._by_user.get(user_id, ()))
