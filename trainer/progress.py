"""Progress and timing of a run: tqdm bars that can be switched off (logs, tests, non-main ranks) and
``Timings``, each stage's seconds (logged, and the report's ``timings`` section)."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def progress_bar(iterable: Iterable, description: str, enabled: bool = True, **kwargs) -> tqdm:
    return tqdm(iterable, desc=description, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, leave=True, **kwargs)


@dataclass
class Timings:
    """Seconds per named stage; a stage entered twice adds up."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        log.info("stage %s started", name)
        yield
        elapsed = time.perf_counter() - start
        self.seconds[name] = round(self.seconds.get(name, 0.0) + elapsed, 3)
        log.info("stage %s done in %.1f s", name, elapsed)
