"""Loading exported model programs (``.pt2``) without running pickled code: the services' only loader.

The trainer writes programs with ``torch.export`` (``trainer/export.py``); the services load them here.
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

import io
import json
import os
import re
import zipfile

import torch
from torch import nn

# Every member of an archive written by ``_export`` (relative to the archive's single root folder).
_ALLOWED_MEMBERS = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/sample_inputs/model\.pt|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+")
_PAYLOAD_CONFIGS = {"data/weights/model_weights_config.json": re.compile(r"weight_\d+"),
                    "data/constants/model_constants_config.json": re.compile(r"tensor_\d+")}


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


class _WarmUpProgram(nn.Module):
    def forward(self, item_idx: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(item_idx, torch.ones(4, 2)).sum(dim=1)


def warm_up_loader() -> None:
    """Exports, saves and loads a two-op program in memory (our own module, nothing read from disk).

    The first ``torch.export.load`` of a process imports ~190k objects' worth of modules lazily;
    running it once at start-up, before any version is loaded, lets ``gc.freeze`` take them with the
    other import-time objects (see ``recsys_serving.runtime.tame_garbage_collector``).
    """
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(_WarmUpProgram(), (), {"item_idx": torch.tensor([0, 1])},
                                  dynamic_shapes={"item_idx": {0: batch}})
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    torch.export.load(buffer).module()(item_idx=torch.tensor([1, 2, 3]))
