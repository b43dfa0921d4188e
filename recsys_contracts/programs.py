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
import logging
import os
import re
import zipfile
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

log = logging.getLogger(__name__)

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
    Inputs are checked against the program's recorded signature by ``CheckedProgram``.
    """
    check_archive(path)
    module = CheckedProgram(torch.export.load(path))
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


@dataclass(frozen=True)
class InputSpec:
    """One keyword input of a program: dtype and dims (an int = fixed size, a str = a named dynamic dim)."""

    name: str
    dtype: torch.dtype
    dims: tuple[int | str, ...]

    def shape_text(self) -> str:
        return "(" + ", ".join(str(d) for d in self.dims) + ("," if len(self.dims) == 1 else "") + ")"


class CheckedProgram(nn.Module):
    """An exported program whose inputs are checked in plain Python before the graph runs.

    ``ExportedProgram.module()`` checks every call's inputs against the recorded shape guards by
    evaluating them with sympy: ~0.3-1 ms per call, more than the whole user tower for one user and
    a third of the ranker's time for a request's 500 rows. The same contract, read once at load time
    from the program's signature (every input's dtype and fixed sizes; each dynamic dimension's
    range, equal wherever the program uses the same dimension), is checked here in microseconds,
    and a mismatch raises ``ValueError`` naming the input, what it got and what was expected. A
    program whose dynamic sizes are expressions rather than plain dimensions keeps torch's checks.

    While its parameters are on the CPU, a checked program runs as a TorchScript trace of the same
    graph (``_trace``): the exported module dispatches each of its ~40-80 aten ops from Python,
    ~1 ms a call whatever the batch (a quarter of the ranker's pass over 500 rows); the trace runs
    the same ops from C++, without holding the GIL. It is used only for a straight-line graph of
    aten ops whose results are tensors (no shape arithmetic a trace would freeze), and only after it
    gave outputs identical to the exported module's at two batch sizes. ``torch.jit`` is deprecated
    (a DeprecationWarning at each load) but present in the pinned torch; if a later torch drops it,
    ``_trace`` gives None and the exported module serves as before.
    """

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        super().__init__()
        self.program = program.module()
        names = program.graph_signature.user_inputs
        placeholders = {node.name: node for node in program.graph.find_nodes(op="placeholder")}
        self.ranges: dict[str, tuple[int, int | None]] = {}
        specs, plain, symbols = [], True, {}
        for name in names:
            value = placeholders[name].meta.get("val")
            if not isinstance(value, torch.Tensor):
                plain = False
                break
            dims: list[int | str] = []
            for size in value.shape:
                if isinstance(size, int):
                    dims.append(size)
                    continue
                expr = size.node.expr
                if not getattr(expr, "is_Symbol", False) or expr not in program.range_constraints:
                    plain = False
                    break
                if expr not in symbols:   # readable names for messages: N, then N1, N2...
                    symbols[expr] = "N" if not symbols else f"N{len(symbols)}"
                    bounds = program.range_constraints[expr]
                    low, high = bounds.lower, bounds.upper         # sympy integers, or infinities
                    self.ranges[symbols[expr]] = (int(low) if low.is_Integer else 0,
                                                  int(high) if high.is_Integer else None)
                dims.append(symbols[expr])
            specs.append(InputSpec(name, value.dtype, tuple(dims)))
        self.specs: tuple[InputSpec, ...] | None = tuple(specs) if plain else None
        self.program.validate_inputs = self.specs is None   # torch's own checks only when ours cannot apply
        self._retrace()

    def forward(self, **inputs: torch.Tensor):
        if self.specs is None:
            return self.program(**inputs)
        self.check(inputs)
        traced = self.__dict__["_traced"]
        if traced is None:
            return self.program(**inputs)
        return traced(*(inputs[spec.name] for spec in self.specs))

    def _apply(self, fn, recurse=True):
        """``.to(device)`` and the like: the trace is redone for the new placement (none off the CPU)."""
        super()._apply(fn, recurse)
        self._retrace()
        return self

    def _retrace(self) -> None:
        # A plain attribute, outside the module tree: parameters() lists the program's own only.
        self.__dict__["_traced"] = None if self.specs is None else _trace(self.program, self.specs, self.ranges)

    def check(self, inputs: dict[str, object]) -> None:
        """Raises ValueError unless ``inputs`` match the program's signature exactly."""
        specs = self.specs or ()
        if len(inputs) != len(specs) or any(spec.name not in inputs for spec in specs):
            raise ValueError(f"program inputs must be {sorted(s.name for s in specs)}, got {sorted(inputs)}")
        sizes: dict[str, tuple[int, str]] = {}
        for spec in specs:
            value = inputs[spec.name]
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"input {spec.name!r} must be a tensor, got {type(value).__name__}")
            if value.dtype != spec.dtype:
                raise ValueError(f"input {spec.name!r} must have dtype {spec.dtype}, got {value.dtype}")
            shape = tuple(value.shape)
            if len(shape) != len(spec.dims) or any(isinstance(d, int) and d != n for d, n in zip(spec.dims, shape)):
                raise ValueError(f"input {spec.name!r} must have shape {spec.shape_text()}, got {shape}")
            for dim, size in zip(spec.dims, shape):
                if isinstance(dim, int):
                    continue
                low, high = self.ranges[dim]
                if size < low or (high is not None and size > high):
                    raise ValueError(f"input {spec.name!r} dimension {dim} must be in [{low}, "
                                     f"{'inf' if high is None else high}], got {size}")
                seen = sizes.setdefault(dim, (size, spec.name))
                if seen[0] != size:
                    raise ValueError(f"input {spec.name!r} dimension {dim} must equal that of {seen[1]!r} "
                                     f"({seen[0]}), got {size}")


class _Positional(nn.Module):
    """The exported module called with its inputs in signature order (how ``torch.jit.trace`` calls)."""

    def __init__(self, program: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.program, self.names = program, names

    def forward(self, *inputs: torch.Tensor):
        return self.program(**dict(zip(self.names, inputs)))


def _traceable(graph: torch.fx.Graph) -> bool:
    """True when every call is an aten op giving tensors (or nothing): no shape arithmetic, no
    control flow (higher-order ops), no Python guard (a submodule call), nothing a trace would
    record as a constant."""
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            return False
        values = node.meta.get("val")
        values = values if isinstance(values, (list, tuple)) else [values]
        if not all(value is None or isinstance(value, torch.Tensor) for value in values):
            return False
    return True


def _example(specs: tuple[InputSpec, ...], ranges: dict[str, tuple[int, int | None]],
             extra: int) -> tuple[torch.Tensor, ...]:
    """Zero inputs (row 0 of every table exists), each dynamic dimension ``extra`` + 2 above its minimum."""
    def size(dim: int | str) -> int:
        if isinstance(dim, int):
            return dim
        low, high = ranges[dim]
        return low + 2 + extra if high is None else min(low + 2 + extra, high)
    return tuple(torch.zeros(tuple(size(d) for d in spec.dims), dtype=spec.dtype) for spec in specs)


def _trace(program: nn.Module, specs: tuple[InputSpec, ...], ranges: dict[str, tuple[int, int | None]]):
    """A TorchScript trace of ``program`` whose outputs equalled the program's at two batch sizes, or
    None (parameters off the CPU, a graph a trace cannot represent, any difference or error)."""
    if any(t.device.type != "cpu" for t in [*program.parameters(), *program.buffers()]) or \
            not _traceable(program.graph):
        return None
    wrapper = _Positional(program, tuple(spec.name for spec in specs))
    try:
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, _example(specs, ranges, 0), check_trace=False)
            for extra in (0, 1):
                inputs = _example(specs, ranges, extra)
                expected, got = tree_leaves(wrapper(*inputs)), tree_leaves(traced(*inputs))
                if len(expected) != len(got) or not all(
                        isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                        and a.shape == b.shape and torch.equal(a, b) for a, b in zip(expected, got)):
                    log.warning("program runs untraced (slower): its trace's outputs differ from the "
                                "exported module's at %d extra rows", extra)
                    return None
    except Exception as error:  # whatever the tracer cannot take: the exported module serves, as before
        log.warning("program runs untraced (slower): tracing failed: %s: %s", type(error).__name__, error)
        return None
    return traced


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
    CheckedProgram(torch.export.load(buffer))(item_idx=torch.tensor([1, 2, 3]))   # the tracer's imports too
