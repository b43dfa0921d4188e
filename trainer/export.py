"""Exports the user tower and the ranker as ``torch.export`` programs (``.pt2``) and loads them back.

The programs take keyword arguments named as in docs/ARCHITECTURE.md, "Model inputs", with a
dynamic batch dimension (1..max_batch rows) and every other dimension (Cu, Nu, H, Ci, Ni) fixed at
export time. Modules are exported in eval mode (no dropout).

Loading (and why it is safe) lives in ``recsys_contracts.programs``; ``load_program`` is re-exported.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.export import ExportedProgram

from recsys_contracts.programs import check_archive, load_program
from trainer.inputs import ITEM_KEYS, USER_KEYS

USER_TOWER_INPUTS = USER_KEYS
RANKER_INPUTS = USER_KEYS + ITEM_KEYS + ("retrieval_score",)
# Largest batches the programs accept: users per retrieval call and candidates per ranking call.
USER_TOWER_MAX_BATCH = 4096
RANKER_MAX_BATCH = 8192

def export_user_tower(tower: nn.Module, example: dict[str, Tensor], path: str | os.PathLike[str],
                      max_batch: int = USER_TOWER_MAX_BATCH) -> ExportedProgram:
    """Exports ``tower`` (user inputs -> (B, D)) to ``path`` (``.pt2``); returns the program."""
    return _export(tower, example, USER_TOWER_INPUTS, path, max_batch)


def export_ranker(ranker: nn.Module, example: dict[str, Tensor], path: str | os.PathLike[str],
                  max_batch: int = RANKER_MAX_BATCH) -> ExportedProgram:
    """Exports ``ranker`` (aligned user + item rows + retrieval_score -> (ctr_logit, rating)) to ``path``."""
    return _export(ranker, example, RANKER_INPUTS, path, max_batch)


def _check_example(example: dict[str, Tensor], names: Sequence[str], max_batch: int) -> None:
    if set(example) != set(names):
        raise ValueError(f"example keys must be {sorted(names)}, got {sorted(example)}")
    for name, tensor in example.items():
        if not isinstance(tensor, Tensor) or tensor.dim() < 1:
            raise ValueError(f"example[{name!r}] must be a tensor with a batch dimension, "
                             f"got {type(tensor).__name__} of shape {tuple(getattr(tensor, 'shape', ()))}")
    batch_sizes = {name: tensor.shape[0] for name, tensor in example.items()}
    if len(set(batch_sizes.values())) != 1:
        raise ValueError(f"example tensors must share their first (batch) dimension, got {batch_sizes}")
    batch = next(iter(batch_sizes.values()))
    # torch.export specialises dimensions of size 1, so a batch of 1 would freeze the batch size.
    if not 2 <= batch <= max_batch:
        raise ValueError(f"example batch size must be in [2, {max_batch}], got {batch}")


def _export(module: nn.Module, example: dict[str, Tensor], names: Sequence[str],
            path: str | os.PathLike[str], max_batch: int) -> ExportedProgram:
    if Path(path).suffix != ".pt2":
        raise ValueError(f"path must end in .pt2, got {os.fspath(path)!r}")
    _check_example(example, names, max_batch)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    was_training = module.training
    module.eval()
    try:
        program = torch.export.export(module, (), dict(example), dynamic_shapes={name: {0: batch} for name in names})
    finally:
        module.train(was_training)
    # Saved example inputs are the archive's only pickle; the program does not need them.
    program.example_inputs = None
    torch.export.save(program, path)
    return program


__all__ = ["export_user_tower", "export_ranker", "check_archive", "load_program",
           "USER_TOWER_INPUTS", "RANKER_INPUTS"]
