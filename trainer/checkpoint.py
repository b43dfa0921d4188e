"""Resumable training checkpoints (the trainer's own scratch files, never a published artifact).

One file per stage, ``<dir>/<stage>.pt``, holding plain state dicts and numbers, written to a
temporary name and renamed so a crash never leaves a torn checkpoint. Loaded with
``weights_only=True``: tensors and containers only, no arbitrary objects.
"""

from __future__ import annotations

import os
from pathlib import Path

import math
from dataclasses import dataclass, field

import torch


@dataclass
class FitHistory:
    """Per-epoch records of one training stage and its best epoch so far."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = -math.inf
    # The ranker's: the weights of its start (parameters by name) where a trained epoch replaced it, so that
    # the evaluation can score the start beside it; None where the start was kept. Not checkpointed.
    start_parameters: dict | None = None


class Checkpointer:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, stage: str) -> Path:
        return self.directory / f"{stage}.pt"

    def save(self, stage: str, next_epoch: int, model, optimizer, history, best_state) -> None:
        payload = {"next_epoch": next_epoch, "model": model.state_dict(),
                   "optimizer": optimizer.state_dict(), "epochs": history.epochs,
                   "best_epoch": history.best_epoch, "best_score": history.best_score,
                   "best_state": best_state}
        tmp = self.path(stage).with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self.path(stage))

    def restore(self, stage: str, model, optimizer):
        """(next_epoch, FitHistory, best_state) from the stage's checkpoint, or None if there is none."""
        path = self.path(stage)
        if not path.exists():
            return None
        payload = torch.load(path, weights_only=True)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        history = FitHistory(epochs=list(payload["epochs"]), best_epoch=int(payload["best_epoch"]),
                             best_score=float(payload["best_score"]))
        return int(payload["next_epoch"]), history, payload["best_state"]
