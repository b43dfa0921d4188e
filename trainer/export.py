"""Exports the user tower and the ranker as ONNX programs and proves them equal to the eager modules.

The programs take keyword arguments named as in docs/ARCHITECTURE.md, "Model inputs", with one
dynamic batch dimension and every other dimension (Cu, Nu, H, Ci, Ni) fixed at export time; their
outputs are named by the contract (``recsys_contracts.programs.USER_TOWER`` / ``RANKER``). Modules are
exported in eval mode (no dropout) with ``torch.onnx.export(..., dynamo=True)``.

An exported program is loaded back through the services' own loader and run by onnxruntime at several
batch sizes; unless every output equals the eager module's within ``PARITY_ATOL`` / ``PARITY_RTOL``,
``ProgramParityError`` is raised and nothing is published (the exception aborts the staging folder).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from recsys_contracts.programs import RANKER, USER_TOWER, Signature, load_program
from trainer.inputs import ITEM_KEYS, USER_KEYS

USER_TOWER_INPUTS = USER_KEYS
RANKER_INPUTS = USER_KEYS + ITEM_KEYS + ("retrieval_score",)
# Largest batch the exporter is asked to support (torch.export's range for the batch dimension).
USER_TOWER_MAX_BATCH = 4096
RANKER_MAX_BATCH = 8192
# float32 programs: onnxruntime fuses and reorders some sums, so tiny differences are expected.
PARITY_ATOL = 1e-5
PARITY_RTOL = 1e-4
PARITY_BATCHES = (1, 3, 17)


class ProgramParityError(ValueError):
    """An exported program does not compute what the eager module computes: never publish it."""


def export_user_tower(tower: nn.Module, example: dict[str, Tensor], path: str | os.PathLike[str],
                      max_batch: int = USER_TOWER_MAX_BATCH) -> None:
    """Exports ``tower`` (user inputs -> (B, D)) to ``path`` (``.onnx``) and checks parity."""
    _export(tower, example, USER_TOWER_INPUTS, USER_TOWER, path, max_batch)


def export_ranker(ranker: nn.Module, example: dict[str, Tensor], path: str | os.PathLike[str],
                  max_batch: int = RANKER_MAX_BATCH) -> None:
    """Exports ``ranker`` (aligned user + item rows + retrieval_score -> (ctr_logit, rating)) to ``path``."""
    _export(ranker, example, RANKER_INPUTS, RANKER, path, max_batch)


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


def _export(module: nn.Module, example: dict[str, Tensor], names: Sequence[str], signature: Signature,
            path: str | os.PathLike[str], max_batch: int) -> None:
    if Path(path).suffix != ".onnx":
        raise ValueError(f"path must end in .onnx, got {os.fspath(path)!r}")
    _check_example(example, names, max_batch)
    example = {name: example[name] for name in names}              # the contract's input order
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    was_training = module.training
    module.eval()
    try:
        with warnings.catch_warnings(), _quiet_exporter():
            warnings.simplefilter("ignore")    # the exporter's deprecation chatter, not ours to fix
            program = torch.onnx.export(module, (), kwargs=example, dynamo=True, verbose=False,
                                        dynamic_shapes={name: {0: batch} for name in names},
                                        output_names=list(signature.outputs))
        program.save(os.fspath(path))
        check_parity(module, example, path, signature)
    finally:
        module.train(was_training)


class _quiet_exporter:
    """Lowers the exporter's loggers to ERROR for the duration (it logs each step at INFO/WARNING)."""

    _names = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")

    def __enter__(self):
        self._saved = {name: logging.getLogger(name).level for name in self._names}
        for name in self._names:
            logging.getLogger(name).setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for name, level in self._saved.items():
            logging.getLogger(name).setLevel(level)


@torch.no_grad()
def check_parity(module: nn.Module, example: dict[str, Tensor], path: str | os.PathLike[str],
                 signature: Signature, batches: Sequence[int] = PARITY_BATCHES) -> None:
    """Loads ``path`` as the services do and raises ProgramParityError unless its outputs equal the
    eager module's at every batch size in ``batches`` (rows cycled from ``example``)."""
    program = load_program(path, signature)
    n = next(iter(example.values())).shape[0]
    for size in batches:
        rows = torch.arange(size) % n
        inputs = {name: tensor[rows] for name, tensor in example.items()}
        eager = module(**inputs)
        eager = eager if isinstance(eager, tuple) else (eager,)
        served = program(**{name: tensor.cpu().numpy() for name, tensor in inputs.items()})
        for name, want, got in zip(signature.outputs, eager, served):
            want = want.cpu().numpy()
            if want.shape != got.shape or not np.allclose(got, want, atol=PARITY_ATOL, rtol=PARITY_RTOL):
                diff = float(np.abs(got - want).max()) if want.shape == got.shape else float("nan")
                raise ProgramParityError(
                    f"{signature.kind} program output {name!r} differs from the eager module at batch "
                    f"{size}: shape {got.shape} vs {want.shape}, largest difference {diff:.3g} "
                    f"(allowed {PARITY_ATOL} + {PARITY_RTOL} x |eager|)")


__all__ = ["export_user_tower", "export_ranker", "check_parity", "load_program", "ProgramParityError",
           "USER_TOWER_INPUTS", "RANKER_INPUTS"]
