"""Hot reload: watch the artifact pointer, load the new version beside the old, swap one reference.

``VersionHolder`` keeps the serving state as ONE immutable object (the loader's return value,
holding version, models, index and tables together). A request reads ``holder.current`` once and
uses that object to the end, so in-flight requests finish on the version they started with while
the next request sees the new one.

The holder keeps the PREVIOUS version loaded beside the current one (two versions in memory), so
that while the two services swap at slightly different moments each can still answer from the
version the other one serves (``held``; the ranking service asks retrieval for its own version and
ranks with whichever of its two matches the candidates), and a rollback to it swaps back at once.
When the artifact root's arms file (``recsys_contracts.arms``) names a candidate version, it is
loaded (and checked) beside them too, for the canary share of users; promoting it swaps it in at once.

Versions still in use are kept too (``used`` / ``retained``): when versions go live faster than the
services load them, each service skips some, and "current + previous" on one side and on the
other can have no version in common. So a version the peer service still answers from (ranking
notes the version retrieval answered from) or still asks for (retrieval notes the version it
answered ranking from) is not dropped when it falls out of current/previous: it stays, at most
``MAX_RETAINED`` of them, until no request has used it for ``RETAIN_S`` seconds.

A candidate version's signature is checked against the holder's ``Trust`` before any other file
is read, then its checksums against the manifest; then it is handed to the service's ``load``
function, which must build and warm the state and raise if anything is wrong (shapes, a smoke
request, NaN). A refused version is logged once at WARNING with its reason, counted in
``recsys_version_refused_total{reason}`` and never retried; an incomplete one (no manifest yet) is
retried on the next poll. A broken ``CURRENT`` (garbage, naming a missing or symlinked version) is
logged once per distinct problem and counted with reason ``pointer``. The old version keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generic, TypeVar

from prometheus_client import Counter

from recsys_contracts import artifacts
from recsys_contracts.arms import Arms, read_arms
from recsys_contracts.signing import Trust

T = TypeVar("T")
log = logging.getLogger(__name__)

REFUSAL_REASONS = ("signature", "files", "load", "pointer")
RETAIN_S = 30.0        # a version out of current/previous stays loaded this long after its last use
MAX_RETAINED = 2       # and at most this many of them (the most recently used), to bound memory
VERSION_REFUSED = Counter("recsys_version_refused_total",
                          "Versions (or CURRENT pointers) refused: signature = unsigned or not signed by a "
                          "trusted key; files = manifest or checksums wrong; load = the bundle failed to "
                          "load or its self-check; pointer = CURRENT unreadable or naming no usable version",
                          ["reason"])


def load_verified(root: Path, version: int, trust: Trust, load: Callable[[Path, int], T]) -> T:
    """Version ``version`` of ``root`` built by ``load(version_dir, version)`` once its signature and
    then every checksum check out (``artifacts.verify``); blocking."""
    artifacts.verify(root, version, trust)
    return load(artifacts.version_dir(root, version), version)


def refusal_reason(error: Exception) -> str:
    """The ``reason`` label for a refused version."""
    if isinstance(error, artifacts.UntrustedVersionError):
        return "signature"
    if isinstance(error, artifacts.ArtifactError):
        return "files"
    return "load"


# While a version loads in a worker thread (mostly Python: deserialising programs, building tables),
# the interpreter hands the GIL between threads every LOADING_SWITCH_INTERVAL_S instead of the
# default 5 ms, so the event loop, which needs the GIL for every callback, is not starved meanwhile.
LOADING_SWITCH_INTERVAL_S = 0.0001
_loading_lock = threading.Lock()
_loading = {"count": 0, "saved": 0.0}


@contextlib.contextmanager
def gil_shared_with_the_loop():
    """Shortens the GIL switch interval for the duration (nested and concurrent uses count)."""
    with _loading_lock:
        if _loading["count"] == 0:
            _loading["saved"] = sys.getswitchinterval()
            sys.setswitchinterval(min(LOADING_SWITCH_INTERVAL_S, _loading["saved"]))
        _loading["count"] += 1
    try:
        yield
    finally:
        with _loading_lock:
            _loading["count"] -= 1
            if _loading["count"] == 0:
                sys.setswitchinterval(_loading["saved"])


@dataclass
class ReloadStats:
    loaded: int = 0
    refused: int = 0
    last_error: str = ""
    refused_versions: set[int] = field(default_factory=set)


class VersionHolder(Generic[T]):
    """Holds the serving state of the current artifact version and replaces it when CURRENT moves.

    ``load(version_dir, version) -> T`` builds the state (blocking; it runs in a worker thread).
    ``on_swap(state, version)`` / ``on_refuse(version, error)`` let the service update metrics and
    health; a service passes them when it builds its holder (``follow`` adopts a holder built
    elsewhere without them, e.g. by a test that preloads versions).
    ``current`` / ``version`` serve new requests; ``previous`` / ``previous_version`` is the one
    swapped out last (None before the second swap).
    """

    def __init__(self, root: Path, load: Callable[[Path, int], T], *, trust: Trust, pinned: int | None = None,
                 poll_interval_s: float = 2.0,
                 on_swap: Callable[[T, int], None] | None = None,
                 on_refuse: Callable[[int, Exception], None] | None = None) -> None:
        if not isinstance(trust, Trust):
            raise TypeError(f"trust must be a recsys_contracts.signing.Trust, got {type(trust).__name__}")
        self.root, self.load, self.pinned, self.trust = Path(root), load, pinned, trust
        self.poll_interval_s = poll_interval_s
        self.on_swap, self.on_refuse = on_swap, on_refuse
        self.current: T | None = None
        self.version: int | None = None
        self.previous: T | None = None
        self.previous_version: int | None = None
        self.candidate: T | None = None          # the arms file's candidate, when not current or previous
        self.candidate_version: int | None = None
        self.retained: dict[int, T] = {}        # versions out of current/previous still in use
        self._last_used: dict[int, float] = {}  # version -> time.monotonic() of its last ``used``
        self.arms: Arms | None = None            # the arms as last read (recsys_contracts.arms)
        self._arms_problem = ""                  # the last arms-file problem logged, so each is logged once
        self.stats = ReloadStats()
        self._task: asyncio.Task | None = None
        self._pointer_problem = ""      # the last CURRENT problem logged, so each is logged once

    def follow(self, on_swap: Callable[[T, int], None], on_refuse: Callable[[int, Exception], None]) -> None:
        """Gives a holder built without callbacks its service's; one that has callbacks refuses (ValueError)."""
        if self.on_swap is not None or self.on_refuse is not None:
            raise ValueError("this holder already has its callbacks (on_swap/on_refuse given when it was built)")
        self.on_swap, self.on_refuse = on_swap, on_refuse

    @property
    def ready(self) -> bool:
        return self.current is not None

    def held(self, version: int) -> T | None:
        """The state of ``version`` when it is the current, the previous, the candidate or a retained
        one, else None."""
        if version == self.version:
            return self.current
        if version == self.previous_version:
            return self.previous
        if version == self.candidate_version:
            return self.candidate
        return self.retained.get(version)

    @property
    def held_versions(self) -> list[int]:
        """The versions this holder can answer from: current, previous, candidate, then retained (newest first)."""
        return [v for v in (self.version, self.previous_version, self.candidate_version) if v is not None] + \
            sorted(self.retained, reverse=True)

    def used(self, version: int) -> None:
        """Notes that a request used ``version`` (answered from it, or the peer service did): it is kept
        loaded for ``RETAIN_S`` seconds after its last use even when newer versions go live."""
        self._last_used[version] = time.monotonic()

    def _retain(self, state: T | None, version: int | None) -> None:
        """Keeps a version leaving current/previous when it was ever used; ``_prune`` then keeps it only
        while its last use is within ``RETAIN_S`` (and it is not current or previous again)."""
        if state is not None and version in self._last_used:
            self.retained[version] = state
        self._prune()

    def _prune(self) -> None:
        """Drops retained versions unused for ``RETAIN_S`` (or beyond the ``MAX_RETAINED`` most recently
        used) and forgets uses of versions no longer held."""
        now = time.monotonic()
        keep = sorted((v for v in self.retained if v not in (self.version, self.previous_version)
                       and now - self._last_used.get(v, -math.inf) <= RETAIN_S),
                      key=lambda v: self._last_used[v], reverse=True)[:MAX_RETAINED]
        dropped = sorted(set(self.retained) - set(keep))
        self.retained = {v: self.retained[v] for v in sorted(keep)}
        if dropped:
            log.info("released retained versions %s (unused for %g s)", dropped, RETAIN_S)
        held = set(self.held_versions)
        self._last_used = {v: t for v, t in self._last_used.items() if v in held}

    def _target(self) -> int | None:
        """The version that should be serving now, or None while the volume has none."""
        try:
            target = artifacts.resolve(self.root, self.pinned)
        except (artifacts.ArtifactError, FileNotFoundError, ValueError) as error:
            problem = str(error)[:300]
            empty = isinstance(error, FileNotFoundError) or "no published version" in problem
            if empty:
                log.debug("no version to serve yet: %s", problem)
            elif problem != self._pointer_problem:
                VERSION_REFUSED.labels("pointer").inc()
                log.warning("cannot follow CURRENT, still serving %s: %s", self.version, problem,
                            extra={"code": "pointer"})
            self._pointer_problem = problem
            return None
        self._pointer_problem = ""
        return target

    def _load_sync(self, version: int) -> T:
        return load_verified(self.root, version, self.trust, self.load)

    async def refresh(self) -> bool:
        """Loads and swaps in the target version if it changed, then follows the arms file (a
        candidate version is loaded beside the current one); True when a swap happened."""
        swapped = await self._follow_current()
        await self._follow_arms()
        self._prune()
        return swapped

    async def _follow_current(self) -> bool:
        target = self._target()
        if target is None or target == self.version or target in self.stats.refused_versions:
            return False
        if target in (self.previous_version, self.candidate_version) or target in self.retained:
            self._swap(self.held(target), target)                   # rollback or promotion: no load
            return True
        state = await self._load(target, "serving")
        if state is None:
            return False
        self._swap(state, target)
        return True

    async def _follow_arms(self) -> None:
        """Keeps the arms file's candidate loaded (None when no arm is set or it is already held)."""
        try:
            arms = read_arms(self.root)
        except (ValueError, OSError) as error:
            if str(error) != self._arms_problem:
                VERSION_REFUSED.labels("pointer").inc()
                log.warning("cannot read the arms file, keeping the arms as they were: %s", str(error)[:300],
                            extra={"code": "pointer"})
            self._arms_problem = str(error)
            return
        self._arms_problem = ""
        wanted = None if arms is None or arms.candidate in (self.version, self.previous_version) else arms.candidate
        if wanted is not None and wanted != self.candidate_version and wanted not in self.stats.refused_versions:
            state = await self._load(wanted, "candidate")
            if state is None:
                return
            self.candidate, self.candidate_version = state, wanted
        elif wanted is None:
            self.candidate, self.candidate_version = None, None
        self.arms = arms

    async def _load(self, target: int, role: str) -> T | None:
        """The loaded state of ``target``, or None when it is incomplete (retried) or refused (not again)."""
        started = time.perf_counter()
        try:
            with gil_shared_with_the_loop():
                state = await asyncio.to_thread(self._load_sync, target)
        except artifacts.IncompleteVersionError as error:
            log.info("version %d is not complete yet, will retry: %s", target, error)
            return None
        except Exception as error:  # a broken version must never take the service down
            self.stats.refused += 1
            self.stats.last_error = f"version {target}: {error}"
            self.stats.refused_versions.add(target)
            reason = refusal_reason(error)
            VERSION_REFUSED.labels(reason).inc()
            log.warning("refused version %d (%s), still serving %s: %s", target, reason, self.version,
                        str(error)[:500], extra={"version": target, "code": reason})
            if self.on_refuse is not None:
                self.on_refuse(target, error)
            return None
        log.info("loaded version %d as %s in %.2f s", target, role, time.perf_counter() - started)
        return state

    def _swap(self, state: T, version: int) -> None:
        # Runs on the event loop between two awaits, so no request sees one reference moved without the other.
        if version == self.candidate_version:                 # promoted: no longer a separate candidate
            self.candidate, self.candidate_version = None, None
        self.retained.pop(version, None)
        leaving, leaving_version = self.previous, self.previous_version
        self.previous, self.previous_version = self.current, self.version
        self.current, self.version = state, version        # the one-reference swap
        self._retain(leaving, leaving_version)
        self.stats.loaded += 1
        if self.on_swap is not None:
            self.on_swap(state, version)

    async def _watch(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # keep watching whatever happens
                log.exception("version refresh failed")
            await asyncio.sleep(self.poll_interval_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="version-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
