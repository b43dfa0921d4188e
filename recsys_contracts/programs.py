"""Model programs as ONNX files run by onnxruntime: the services' only model loader.

The trainer exports the user tower and the ranker with ``torch.onnx.export(..., dynamo=True)``
(``trainer/export.py``); the services load them here and never import torch to serve.

Why ONNX: an ONNX file is a protobuf message of tensors and operator names. Parsing it runs no code
from the file, unlike ``torch.export``'s loader (which evaluates shape expressions with sympy and
``exec``s recorded guards) or anything pickled. What an ONNX file can still reach outside itself is
refused by ``check_model`` before onnxruntime sees the bytes:

- external data (a tensor whose bytes live in another file, named by a path): refused everywhere a
  tensor can sit (initializers, sparse initializers, node attributes, subgraphs);
- operator domains other than the standard ``ai.onnx`` one (custom operators would need a native
  library registered with onnxruntime; contrib ops we do not need), and model-local functions;
- a graph whose inputs and outputs are not the contract's (``USER_TOWER`` / ``RANKER`` below, or
  ``RANKER_ROWS``, the ranker's layout before ``RANKER``, still served for versions published then).

The checked bytes are the bytes handed to onnxruntime (read once), so nothing can swap the file in
between. Inputs are checked in plain Python on every call (names, dtypes, fixed sizes, one shared
batch size, or for the ranker one per group and row_user inside the users) and a mismatch raises
``ValueError`` naming the input; onnxruntime's own errors on a bad input are less clear and cost more.

The ranker takes its inputs in two groups (``RANKER``): U user rows (``user_*``, ``history``,
``timestamp``) and N candidate rows (``row_user``, the index of each candidate's user among the U,
then ``item_*`` and ``retrieval_score``), and gives one CTR logit and rating per candidate row. A
request's user side (embeddings, history pooling, genre profile) is computed once, not once per
candidate. ``RANKER_ROWS`` is the earlier layout, every input one row per candidate; ``load_ranker``
tells the two apart by their inputs and ``aligned_rows`` turns grouped inputs into that layout.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

log = logging.getLogger(__name__)

# The ONNX standard operator set under its two spellings; nothing else may appear.
ALLOWED_DOMAINS = frozenset({"", "ai.onnx"})
# protobuf's own limit for one message; a bigger program needs external data, which is refused.
MAX_PROGRAM_BYTES = 2 * 1024**3 - 1
BATCH = "batch"   # the name of the one dynamic dimension every input and output shares
USERS, ROWS = "users", "rows"   # the grouped ranker's two: its user inputs', and its row inputs' and outputs'

_ONNX_DTYPES = {onnx.TensorProto.INT64: np.dtype(np.int64), onnx.TensorProto.FLOAT: np.dtype(np.float32)}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, dtype and dims (BATCH first, then fixed sizes)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str, ...]

    def shape_text(self) -> str:
        return "(" + ", ".join(str(d) for d in self.dims) + ("," if len(self.dims) == 1 else "") + ")"


@dataclass(frozen=True)
class Signature:
    """What a program of one kind must take and give: input names and dtypes, output names."""

    kind: str
    inputs: tuple[tuple[str, np.dtype], ...]
    outputs: tuple[str, ...]
    # Grouped programs: the inputs whose first dimension is ROWS (the others' is USERS, the outputs'
    # ROWS), and the row input holding each row's index into the users. Empty: one BATCH for all.
    row_inputs: tuple[str, ...] = ()
    row_index: str | None = None

    def first_dim(self, name: str, output: bool = False) -> str:
        """The name of ``name``'s first (dynamic) dimension."""
        if not self.row_inputs:
            return BATCH
        return ROWS if output or name in self.row_inputs else USERS


_I64, _F32 = np.dtype(np.int64), np.dtype(np.float32)
_USER_INPUTS = (("user_idx", _I64), ("user_cat", _I64), ("user_num", _F32), ("history", _I64),
                ("timestamp", _I64))
# docs/ARCHITECTURE.md, "Model inputs": the user tower maps user rows to (B, D) user vectors (unit
# vectors for the pooled and sequential towers, [h, 1] for the autoencoder); the ranker maps aligned user + item rows and the retrieval score to (B,) CTR logits
# and (B,) predicted ratings.
USER_TOWER = Signature("user tower", _USER_INPUTS, ("user_vector",))
_ITEM_INPUTS = (("item_idx", _I64), ("item_cat", _I64), ("item_num", _F32), ("retrieval_score", _F32))
_RANKER_OUTPUTS = ("ctr_logit_out", "rating_out")
# U user rows and N candidate rows, row_user (N,) in [0, U) naming each candidate's user.
RANKER = Signature("ranker", _USER_INPUTS + (("row_user", _I64),) + _ITEM_INPUTS, _RANKER_OUTPUTS,
                   row_inputs=("row_user",) + tuple(name for name, _ in _ITEM_INPUTS), row_index="row_user")
# The layout before RANKER (versions published until 2026-12-05): every input one row per candidate.
RANKER_ROWS = Signature("ranker (aligned rows)", _USER_INPUTS + _ITEM_INPUTS, _RANKER_OUTPUTS)


def _tensor_problem(tensor: onnx.TensorProto) -> str | None:
    if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data) > 0:
        return f"tensor {tensor.name[:64]!r} keeps its data in an external file"
    return None


def _attribute_tensors(attribute: onnx.AttributeProto):
    yield from ([attribute.t] if attribute.HasField("t") else [])
    yield from attribute.tensors
    if attribute.HasField("sparse_tensor"):
        yield attribute.sparse_tensor.values
        yield attribute.sparse_tensor.indices


def _graph_problem(graph: onnx.GraphProto) -> str | None:
    """The first thing in ``graph`` (or its subgraphs) that reaches outside the file, or None."""
    tensors = list(graph.initializer) + [t for s in graph.sparse_initializer for t in (s.values, s.indices)]
    for tensor in tensors:
        problem = _tensor_problem(tensor)
        if problem:
            return problem
    for node in graph.node:
        if node.domain not in ALLOWED_DOMAINS:
            return f"node {node.name[:64]!r} uses operator domain {node.domain[:64]!r} (only the standard one is allowed)"
        for attribute in node.attribute:
            for tensor in _attribute_tensors(attribute):
                problem = _tensor_problem(tensor)
                if problem:
                    return problem
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                problem = _graph_problem(subgraph)
                if problem:
                    return problem
    return None


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        raise ValueError(f"program value {value.name[:64]!r} must be a tensor, got {kind}")
    tensor_type = value.type.tensor_type
    if tensor_type.elem_type not in _ONNX_DTYPES:
        raise ValueError(f"program value {value.name[:64]!r} must be int64 or float32, "
                         f"got ONNX element type {tensor_type.elem_type}")
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                 for d in tensor_type.shape.dim)
    return TensorSpec(value.name, _ONNX_DTYPES[tensor_type.elem_type], dims)


def check_model(model: onnx.ModelProto, signature: Signature) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Raises ValueError unless ``model`` is self-contained, standard-ops-only and of ``signature``;
    returns its input and output specs."""
    for opset in model.opset_import:
        if opset.domain not in ALLOWED_DOMAINS:
            raise ValueError(f"{signature.kind} program imports operator domain {opset.domain[:64]!r} "
                             f"(only the standard one is allowed)")
    if len(model.functions) > 0:
        raise ValueError(f"{signature.kind} program must not define functions, got {len(model.functions)}")
    problem = _graph_problem(model.graph)
    if problem:
        raise ValueError(f"{signature.kind} program is refused: {problem}")
    initializers = {t.name for t in model.graph.initializer}
    inputs = tuple(_spec(v) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_spec(v) for v in model.graph.output)
    got_inputs = [(s.name, str(s.dtype)) for s in inputs]
    want_inputs = [(name, str(dtype)) for name, dtype in signature.inputs]
    if got_inputs != want_inputs:
        raise ValueError(f"{signature.kind} program inputs must be {want_inputs}, got {got_inputs}")
    if tuple(s.name for s in outputs) != signature.outputs or any(s.dtype != _F32 for s in outputs):
        raise ValueError(f"{signature.kind} program outputs must be float32 {list(signature.outputs)}, "
                         f"got {[(s.name, str(s.dtype)) for s in outputs]}")
    for spec, output in [(s, False) for s in inputs] + [(s, True) for s in outputs]:
        first = signature.first_dim(spec.name, output)
        if not spec.dims or spec.dims[0] != first or any(not isinstance(d, int) for d in spec.dims[1:]):
            raise ValueError(f"{signature.kind} program value {spec.name!r} must have shape "
                             f"({first}, fixed sizes...), got {spec.shape_text()}")
    return inputs, outputs


def _read_regular_file(path: Path) -> bytes:
    """The file's bytes, refusing symlinks, non-regular files and anything over MAX_PROGRAM_BYTES."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"program {path.name!r} must be a regular file")
        if info.st_size > MAX_PROGRAM_BYTES:
            raise ValueError(f"program {path.name!r} must be at most {MAX_PROGRAM_BYTES} bytes, got {info.st_size}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def providers(device: str = "cpu") -> list[str]:
    """onnxruntime execution providers for ``device``: CUDA first when asked for and present."""
    available = ort.get_available_providers()
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class Program:
    """A checked ONNX program: ``program(**inputs)`` -> tuple of float32 arrays, in output order.

    Inputs are numpy arrays; every input's first dimension is the same batch size B >= 1 (for the
    grouped ranker: U >= 1 for its user inputs, N >= 1 for its row inputs).
    onnxruntime releases the GIL while it runs, so a worker thread scoring does not stall the loop.
    """

    def __init__(self, model_bytes: bytes, signature: Signature, *, threads: int = 1,
                 device: str = "cpu", parsed: onnx.ModelProto | None = None) -> None:
        """``parsed``: ``model_bytes`` already parsed by the caller (checked here all the same)."""
        try:
            model = parsed if parsed is not None else onnx.load_model_from_string(model_bytes)
        except Exception as error:   # protobuf's DecodeError and friends: not an ONNX file
            raise ValueError(f"{signature.kind} program must be an ONNX model, got bytes that do not "
                             f"parse ({type(error).__name__})") from None
        self.signature = signature
        self.inputs, self.outputs = check_model(model, signature)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3       # errors only: onnxruntime's warnings are not ours to act on
        self.providers = providers(device)
        self.session = ort.InferenceSession(model_bytes, options, providers=self.providers)
        self._names = [spec.name for spec in self.outputs]

    def check(self, inputs: dict[str, object]) -> None:
        """Raises ValueError unless ``inputs`` match the program's signature exactly."""
        if len(inputs) != len(self.inputs) or any(spec.name not in inputs for spec in self.inputs):
            raise ValueError(f"{self.signature.kind} inputs must be {sorted(s.name for s in self.inputs)}, "
                             f"got {sorted(inputs)}")
        sizes: dict[str, int] = {}         # first dimension name -> its size in this call
        for spec in self.inputs:
            value = inputs[spec.name]
            if not isinstance(value, np.ndarray):
                raise ValueError(f"input {spec.name!r} must be a numpy array, got {type(value).__name__}")
            if value.dtype != spec.dtype:
                raise ValueError(f"input {spec.name!r} must have dtype {spec.dtype}, got {value.dtype}")
            if value.ndim != len(spec.dims) or value.shape[1:] != spec.dims[1:]:
                raise ValueError(f"input {spec.name!r} must have shape {spec.shape_text()}, got {value.shape}")
            first = spec.dims[0]
            if value.shape[0] < 1 or value.shape[0] != sizes.setdefault(first, value.shape[0]):
                raise ValueError(f"input {spec.name!r} {first} size must be >= 1 and equal across inputs "
                                 f"({sizes[first]}), got {value.shape[0]}")
        index = self.signature.row_index
        if index is not None:
            rows = inputs[index]
            if rows.min() < 0 or rows.max() >= sizes[USERS]:
                raise ValueError(f"input {index!r} must index the {sizes[USERS]} user rows, got values in "
                                 f"[{rows.min()}, {rows.max()}]")

    def __call__(self, **inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        self.check(inputs)
        return tuple(self.session.run(self._names, inputs))


def load_program(path: str | os.PathLike[str], signature: Signature, *, threads: int = 1,
                 device: str = "cpu") -> Program:
    """The program at ``path`` (checked: see the module docstring); ValueError names what is wrong."""
    return Program(_read_regular_file(Path(path)), signature, threads=threads, device=device)


def load_ranker(path: str | os.PathLike[str], *, threads: int = 1, device: str = "cpu") -> Program:
    """The ranker at ``path``: ``RANKER_ROWS`` when its graph takes exactly that layout's inputs (a
    version published before the grouped ranker), else ``RANKER`` (so any other file is refused with
    the current contract's message); checked as ``load_program`` checks."""
    data = _read_regular_file(Path(path))
    try:
        model = onnx.load_model_from_string(data)       # parsed once: Program checks this same model
        graph = model.graph
        names = [value.name for value in graph.input if value.name not in {t.name for t in graph.initializer}]
    except Exception:        # not ONNX: Program says so
        model, names = None, []
    signature = RANKER_ROWS if names == [name for name, _ in RANKER_ROWS.inputs] else RANKER
    return Program(data, signature, threads=threads, device=device, parsed=model)


def run_ranker_program(ranker: Program, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """(ctr_logit (N,), rating (N,)) of a ranker from grouped (``RANKER``) inputs, whichever layout the
    program was published in: a ``RANKER_ROWS`` one gets each user input gathered per candidate first."""
    if ranker.signature is RANKER_ROWS:
        inputs = aligned_rows(inputs)
    return ranker(**inputs)


def aligned_rows(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``RANKER`` inputs as ``RANKER_ROWS`` inputs: each user input gathered to one row per candidate."""
    rows = inputs[RANKER.row_index]
    users = {name for name, _ in _USER_INPUTS}
    return {name: (value[rows] if name in users else value) for name, value in inputs.items()
            if name != RANKER.row_index}
