"""A time-bounded await that never loses a cancellation.

Python 3.11's ``asyncio.wait_for`` runs its awaitable as a task of its own and, when the caller is
cancelled in the same loop step in which that task finishes, returns the result and drops the
cancellation (3.12 rebuilt ``wait_for`` on ``asyncio.timeout``). A background loop that waits with
it (the Redis refiller, a batch worker) then cannot be stopped, and its owner's ``close`` waits
forever: a CI run hung that way. ``within`` awaits in the caller's own task under
``asyncio.timeout``, so a cancellation always arrives; the project uses it instead of ``wait_for``
(``tests/test_import_rules.py`` keeps it that way).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], timeout_s: float | None) -> T:
    """``await awaitable``, raising ``TimeoutError`` after ``timeout_s`` seconds (None: no limit)."""
    async with asyncio.timeout(timeout_s):
        return await awaitable
