"""A catalog of rarer items from MovieLens 100K: each item split at random into copies.

Every rating of item i goes to one of its ``copies`` copies, drawn at random (seeded), and each copy keeps
the item's side data (title with "[copy k]", date, genre flags). The users, their ratings and timestamps
stay as they are, so the log has the same size and density per user but ``copies`` times the items, each
with ~1/``copies`` of the item's ratings: the long tail of a real catalog, on data whose shape is known.
EASE keeps more of such a catalog than a rank-64 factorisation of its scores does (docs/RESULTS.md, "The
ranker's affinity rank by validation").

The copy is written at run time into a folder the caller owns (a temporary one in
``benchmarks/trainer_bench.py --item-copies N``): MovieLens's licence forbids redistributing the data or
derived copies, so none is ever kept in the project.

    .venv/bin/python benchmarks/trainer_bench.py --item-copies 5
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

SIDE_FILES = ("u.user", "u.genre", "u.occupation")
ITEM_ENCODING = "latin-1"          # u.item's encoding


def write_item_copies(source: Path, target: Path, copies: int, seed: int = 0) -> Path:
    """Writes into ``target`` (created) the MovieLens 100K folder ``source`` with each item split into
    ``copies`` copies: item i (1-based) becomes items (i - 1) * copies + 1 ... i * copies, and each rating
    goes to one of them at random. Returns ``target``."""
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies!r}")
    source, target = Path(source), Path(target)
    if not (source / "u.data").is_file() or not (source / "u.item").is_file():
        raise FileNotFoundError(f"{source} is not a MovieLens 100K folder (u.data and u.item expected)")
    target.mkdir(parents=True, exist_ok=True)
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    rng = np.random.default_rng(seed)
    rows = [line.split("\t") for line in (source / "u.data").read_text().splitlines() if line.strip()]
    drawn = rng.integers(0, copies, size=len(rows))
    with (target / "u.data").open("w") as out:
        for (user, item, rating, timestamp), k in zip(rows, drawn):
            out.write(f"{user}\t{(int(item) - 1) * copies + int(k) + 1}\t{rating}\t{timestamp}\n")
    lines = (source / "u.item").read_text(encoding=ITEM_ENCODING).splitlines()
    with (target / "u.item").open("w", encoding=ITEM_ENCODING) as out:
        for line in filter(str.strip, lines):
            fields = line.split("|")
            for k in range(copies):
                copy = [str((int(fields[0]) - 1) * copies + k + 1), f"{fields[1]} [copy {k + 1}]", *fields[2:]]
                out.write("|".join(copy) + "\n")
    return target


__all__ = ["write_item_copies"]
