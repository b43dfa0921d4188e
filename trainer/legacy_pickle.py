"""The original design's ``processed_data.pkl`` and its safe replacement, a folder of Parquet files.

The original design saved its prepared DataFrames (``{"train": ..., "val": ..., "test": ...}``)
as one pickle. Unpickling runs whatever code the file names, so ``load_processed_data`` reads one
only with ``trust_pickle=True`` (for a file you made yourself) and logs a warning; otherwise it
refuses and points to the converter. The safe equivalent is a folder holding one
``<name>.parquet`` per frame (``save_parquet_folder`` / ``load_parquet_folder``). Converting is
one line, run once on a trusted file:

    python -m trainer.legacy_pickle processed_data.pkl processed_data/ --trust-pickle
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

# Frame names become file names: no separators, no dots, nothing that leaves the folder.
_NAME = re.compile(r"[A-Za-z0-9_-]+")
PARQUET_SUFFIX = ".parquet"


def load_processed_data(path: str | Path, *, trust_pickle: bool = False) -> dict[str, pd.DataFrame]:
    """The frames of a legacy pickle (a dict of name -> DataFrame); refused unless ``trust_pickle``."""
    path = Path(path)
    if trust_pickle is not True:
        raise ValueError(
            f"trust_pickle must be True to read {path}, got {trust_pickle!r}: unpickling runs code the file "
            "names, so read only a pickle you made yourself. Convert it once with "
            f"`python -m trainer.legacy_pickle {path} OUT_DIR --trust-pickle` and then use "
            "load_parquet_folder(OUT_DIR), which runs no code from the data")
    log.warning("unpickling %s: this runs code from the file; do it only for a file you trust", path)
    return _checked_frames(pd.read_pickle(path), str(path))


def save_parquet_folder(frames: Mapping[str, pd.DataFrame], folder: str | Path) -> list[Path]:
    """Writes ``<folder>/<name>.parquet`` per frame into an absent or empty folder; returns the paths."""
    frames = _checked_frames(frames, "frames")
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"folder must be absent or an empty folder (nothing is overwritten), got {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, frame in frames.items():
        paths.append(folder / f"{name}{PARQUET_SUFFIX}")
        frame.to_parquet(paths[-1])
    return paths


def load_parquet_folder(folder: str | Path) -> dict[str, pd.DataFrame]:
    """The frames ``save_parquet_folder`` wrote: ``{name: DataFrame}`` in name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    paths = sorted(folder.glob(f"*{PARQUET_SUFFIX}"))
    if not paths:
        raise ValueError(f"folder must hold at least one {PARQUET_SUFFIX} file, found none in {folder}")
    return {path.stem: pd.read_parquet(path) for path in paths}


def _checked_frames(frames: object, source: str) -> dict[str, pd.DataFrame]:
    if not isinstance(frames, Mapping) or not frames:
        raise ValueError(f"{source} must hold a non-empty dict of name -> DataFrame, got {type(frames).__name__}")
    for name, frame in frames.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"{source}: frame names must match {_NAME.pattern} (they become file names), "
                             f"got {name!r}")
        if not isinstance(frame, pd.DataFrame):
            raise ValueError(f"{source}[{name!r}] must be a pandas DataFrame, got {type(frame).__name__}")
    return dict(frames)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.legacy_pickle",
                                     description="Convert a legacy processed_data.pkl into a folder of Parquet files.")
    parser.add_argument("pickle", help="the legacy pickle (a dict of DataFrames)")
    parser.add_argument("out_dir", help="the folder to create (absent or empty)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="confirm you trust the file: unpickling runs code from it")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        paths = save_parquet_folder(load_processed_data(args.pickle, trust_pickle=args.trust_pickle), args.out_dir)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
