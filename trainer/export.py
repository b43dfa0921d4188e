"""Exports the user tower and the ranker as ONNX programs and proves them equal to the eager modules.

The programs take keyword arguments named as in docs/ARCHITECTURE.md, "Model inputs", with one
dynamic batch dimension (the ranker: two, its U user rows and its N candidate rows, each candidate
naming its user in ``row_user``) and every other dimension (Cu, Nu, H, Ci, Ni) fixed at export time;
their outputs are named by the contract (``recsys_contracts.programs.USER_TOWER`` / ``RANKER``).
Modules are exported in eval mode (no dropout) with ``torch.onnx.export(..., dynamo=True)``.

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

from recsys_contracts.programs import RANKER, RANKER_ROWS, USER_TOWER, USERS, Signature, load_program
from trainer.inputs import ITEM_KEYS, USER_KEYS

USER_TOWER_INPUTS = USER_KEYS
RANKER_INPUTS = USER_KEYS + ("row_user",) + ITEM_KEYS + ("retrieval_score",)
RANKER_ROWS_INPUTS = USER_KEYS + ITEM_KEYS + ("retrieval_score",)
# Largest batch the exporter is asked to support (torch.export's range for the batch dimension).
USER_TOWER_MAX_BATCH = 4096
RANKER_MAX_BATCH = 8192
# float32 programs: onnxruntime fuses and reorders some sums, so tiny differences are expected.
PARITY_ATOL = 1e-5
PARITY_RTOL = 1e-4
PARITY_BATCHES = (1, 3, 17)
# The grouped ranker's parity checks: (user rows, candidate rows).
PARITY_GROUPS = ((1, 1), (1, 17), (3, 17))


class ProgramParityError(ValueError):
    """An exported program does not compute what the eager module computes: never publish it."""


def export_user_tower(tower: nn.Module, example: dict[str, Tensor], path: str | os.PathLike[str],
                      max_batch: int = USER_TOWER_MAX_BATCH) -> None:
    """Exports ``tower`` (user inputs -> (B, D)) to ``path`` (``.onnx``) and checks parity."""
    _export(tower, example, USER_TOWER_INPUTS, USER_TOWER, path, max_batch)


def export_ranker(ranker: nn.Module, example: dict[str, Tensor], path: str | os.PathLike[str],
                  max_batch: int = RANKER_MAX_BATCH) -> None:
    """Exports ``ranker`` (a ``DCNRanker``: its ``forward_grouped``, U user rows and N candidate rows
    -> (ctr_logit (N,), rating (N,))) to ``path``; ``example`` holds the grouped inputs (U, N >= 2)."""
    _export(_Grouped(ranker), example, RANKER_INPUTS, RANKER, path, max_batch)


def export_ranker_rows(ranker: nn.Module, example: dict[str, Tensor], path: str | os.PathLike[str],
                       max_batch: int = RANKER_MAX_BATCH) -> None:
    """Exports ``ranker`` in the layout before the grouped one (``RANKER_ROWS``: aligned rows, the user's
    inputs repeated per candidate), as versions published until 2026-12-05 hold it; for the tests
    that the services still serve such versions and for the benchmark of the two layouts."""
    _export(ranker, example, RANKER_ROWS_INPUTS, RANKER_ROWS, path, max_batch)


class _Grouped(nn.Module):
    """A ranker's ``forward_grouped`` as its forward (what torch.onnx.export traces)."""

    def __init__(self, ranker: nn.Module) -> None:
        super().__init__()
        self.ranker = ranker
        self.train(ranker.training)     # so the export leaves the ranker in the mode it found it in

    def forward(self, user_idx: Tensor, user_cat: Tensor, user_num: Tensor, history: Tensor, timestamp: Tensor,
                row_user: Tensor, item_idx: Tensor, item_cat: Tensor, item_num: Tensor,
                retrieval_score: Tensor) -> tuple[Tensor, Tensor]:
        return self.ranker.forward_grouped(user_idx, user_cat, user_num, history, timestamp, row_user,
                                           item_idx, item_cat, item_num, retrieval_score)


def _check_example(example: dict[str, Tensor], signature: Signature, names: Sequence[str], max_batch: int) -> None:
    if set(example) != set(names):
        raise ValueError(f"example keys must be {sorted(names)}, got {sorted(example)}")
    for name, tensor in example.items():
        if not isinstance(tensor, Tensor) or tensor.dim() < 1:
            raise ValueError(f"example[{name!r}] must be a tensor with a batch dimension, "
                             f"got {type(tensor).__name__} of shape {tuple(getattr(tensor, 'shape', ()))}")
    groups: dict[str, dict[str, int]] = {}           # first dimension -> {input: its size}
    for name, tensor in example.items():
        groups.setdefault(signature.first_dim(name), {})[name] = tensor.shape[0]
    for first, batch_sizes in groups.items():
        if len(set(batch_sizes.values())) != 1:
            raise ValueError(f"example tensors must share their first ({first}) dimension, got {batch_sizes}")
        batch = next(iter(batch_sizes.values()))
        # torch.export specialises dimensions of size 1, so a batch of 1 would freeze the batch size.
        if not 2 <= batch <= max_batch:
            raise ValueError(f"example {first} size must be in [2, {max_batch}], got {batch}")
    if signature.row_index is not None:
        rows, users = example[signature.row_index], next(iter(groups[USERS].values()))
        if rows.min() < 0 or rows.max() >= users:
            raise ValueError(f"example[{signature.row_index!r}] must index the {users} user rows, "
                             f"got values in [{int(rows.min())}, {int(rows.max())}]")


def _export(module: nn.Module, example: dict[str, Tensor], names: Sequence[str], signature: Signature,
            path: str | os.PathLike[str], max_batch: int) -> None:
    if Path(path).suffix != ".onnx":
        raise ValueError(f"path must end in .onnx, got {os.fspath(path)!r}")
    _check_example(example, signature, names, max_batch)
    example = {name: example[name] for name in names}              # the contract's input order
    dims = {first: torch.export.Dim(first, min=1, max=max_batch) for first in {signature.first_dim(n) for n in names}}
    was_training = module.training
    module.eval()
    try:
        with warnings.catch_warnings(), _quiet_exporter():
            warnings.simplefilter("ignore")    # the exporter's deprecation chatter, not ours to fix
            program = torch.onnx.export(module, (), kwargs=example, dynamo=True, verbose=False,
                                        dynamic_shapes={name: {0: dims[signature.first_dim(name)]}
                                                        for name in names},
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
                 signature: Signature, batches: Sequence[int] = PARITY_BATCHES,
                 groups: Sequence[tuple[int, int]] = PARITY_GROUPS) -> None:
    """Loads ``path`` as the services do and raises ProgramParityError unless its outputs equal the
    eager module's at every batch size in ``batches`` (rows cycled from ``example``); for a grouped
    program at every (user rows, candidate rows) in ``groups``, each candidate row naming user row
    ``row % users``."""
    program = load_program(path, signature)
    for label, inputs in _parity_inputs(example, signature, batches, groups):
        eager = module(**inputs)
        eager = eager if isinstance(eager, tuple) else (eager,)
        served = program(**{name: tensor.cpu().numpy() for name, tensor in inputs.items()})
        for name, want, got in zip(signature.outputs, eager, served):
            want = want.cpu().numpy()
            if want.shape != got.shape or not np.allclose(got, want, atol=PARITY_ATOL, rtol=PARITY_RTOL):
                diff = float(np.abs(got - want).max()) if want.shape == got.shape else float("nan")
                raise ProgramParityError(
                    f"{signature.kind} program output {name!r} differs from the eager module at {label}: "
                    f"shape {got.shape} vs {want.shape}, largest difference {diff:.3g} "
                    f"(allowed {PARITY_ATOL} + {PARITY_RTOL} x |eager|)")


def _parity_inputs(example: dict[str, Tensor], signature: Signature, batches: Sequence[int],
                   groups: Sequence[tuple[int, int]]):
    """(label, inputs) pairs: rows cycled from ``example``, per batch size or per (users, rows)."""
    if signature.row_index is None:
        n = next(iter(example.values())).shape[0]
        for size in batches:
            rows = torch.arange(size) % n
            yield f"batch {size}", {name: tensor[rows] for name, tensor in example.items()}
        return
    n_users = example["user_idx"].shape[0]
    n_rows = example[signature.row_index].shape[0]
    for users, size in groups:
        picked_users, picked_rows = torch.arange(users) % n_users, torch.arange(size) % n_rows
        inputs = {name: tensor[picked_rows if signature.first_dim(name) != USERS else picked_users]
                  for name, tensor in example.items()}
        inputs[signature.row_index] = torch.arange(size) % users
        yield f"{users} user rows and {size} candidate rows", inputs


__all__ = ["export_user_tower", "export_ranker", "export_ranker_rows", "check_parity", "load_program",
           "ProgramParityError", "USER_TOWER_INPUTS", "RANKER_INPUTS", "RANKER_ROWS_INPUTS"]
