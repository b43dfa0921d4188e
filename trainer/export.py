"""Exports the user tower and the ranker as ``torch.export`` programs (``.pt2``) and loads them back.

The programs take keyword arguments named as in docs/ARCHITECTURE.md, "Model inputs", with a
dynamic batch dimension (1..max_batch rows) and every other dimension (Cu, Nu, H, Ci, Ni) fixed at
export time. Modules are exported in eval mode (no dropout).

What torch 2.13's ``torch.export.save`` / ``load`` do (read from its source):

- ``save`` writes a zip: the graph and its signature as JSON (``models/model.json``), plain
  tensors as raw bytes plus a JSON layout (``data/weights``, ``data/constants``), and the example
  inputs with ``torch.save`` (a pickle). We drop the example inputs before saving, so nothing in our
  archives is pickled.
- ``load`` is not safe for untrusted files, as its own docstring warns: payloads the archive marks
  as pickled (tensor subclasses, custom and opaque objects) go through ``torch.load(weights_only=False)``
  or ``pickle.loads``; the example inputs, legacy-format weights and the older zip layout go through
  ``torch.load`` with a fallback to ``weights_only=False``; AOTInductor shared libraries found in the
  archive are loaded. ``load_program`` refuses all of these first (``check_archive``: only the
  members ``_export`` writes, raw tensors only, empty example inputs), so it unpickles nothing.
- Rebuilding the program still runs code derived from the archive's JSON: shape expressions go
  through ``sympy.sympify`` (which evaluates) and ``.module()`` ``exec``s the recorded input guards.
  Only load programs whose checksums match the version's manifest, from a volume only the publisher
  can write.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.export import ExportedProgram

from trainer.inputs import ITEM_KEYS, USER_KEYS

USER_TOWER_INPUTS = USER_KEYS
RANKER_INPUTS = USER_KEYS + ITEM_KEYS + ("retrieval_score",)
# Largest batches the programs accept: users per retrieval call and candidates per ranking call.
USER_TOWER_MAX_BATCH = 4096
RANKER_MAX_BATCH = 8192

# Every member of an archive written by ``_export`` (relative to the archive's single root folder).
_ALLOWED_MEMBERS = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/sample_inputs/model\.pt|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+")
_PAYLOAD_CONFIGS = {"data/weights/model_weights_config.json": re.compile(r"weight_\d+"),
                    "data/constants/model_constants_config.json": re.compile(r"tensor_\d+")}


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


def check_archive(path: str | os.PathLike[str]) -> None:
    """Raises ValueError unless ``path`` holds only what ``_export`` writes, with no pickled payload."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: info for info in archive.infolist()}
            roots = {name.split("/", 1)[0] for name in members}
            if len(roots) != 1:
                raise ValueError(f"path must be a .pt2 archive with one root folder, got roots {sorted(roots)}")
            root = roots.pop() + "/"
            for name in members:
                if not _ALLOWED_MEMBERS.fullmatch(name.removeprefix(root)):
                    raise ValueError(f"path must hold only a plain exported program, got member {name!r}")
            if members.get(root + "data/sample_inputs/model.pt", zipfile.ZipInfo()).file_size != 0:
                raise ValueError("path must not hold pickled example inputs, "
                                 "got a non-empty data/sample_inputs/model.pt")
            for config_name, payload_name in _PAYLOAD_CONFIGS.items():
                if root + config_name in members:
                    _check_payload_config(config_name, json.loads(archive.read(root + config_name)), payload_name)
    except zipfile.BadZipFile as error:
        raise ValueError(f"path must be a .pt2 zip archive, got {os.fspath(path)!r} ({error})") from error


def _check_payload_config(config_name: str, config: dict, payload_name: re.Pattern[str]) -> None:
    for fqn, meta in config.get("config", {}).items():
        if meta.get("use_pickle") is not False or not payload_name.fullmatch(str(meta.get("path_name"))):
            raise ValueError(f"{config_name} must list raw tensors only, got {fqn!r}: {meta!r}")


def load_program(path: str | os.PathLike[str]) -> nn.Module:
    """The program saved at ``path`` as a callable module (keyword arguments), parameters frozen.

    Deserialises the exported graph (JSON) and its tensors (raw bytes) after ``check_archive``, so no
    pickle is run; see the module docstring for the code the rebuild still derives from the file.
    """
    check_archive(path)
    module = torch.export.load(path).module()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module
