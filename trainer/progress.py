"""Progress bars (tqdm) that can be switched off for logs, tests and non-main ranks."""

from __future__ import annotations

import sys
from typing import Iterable

from tqdm.auto import tqdm


def progress_bar(iterable: Iterable, description: str, enabled: bool = True, **kwargs) -> tqdm:
    return tqdm(iterable, desc=description, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, leave=True, **kwargs)
