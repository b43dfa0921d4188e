"""Regenerates the gRPC stubs in ``recsys_contracts/v1`` from ``protos/``.

Run ``python -m recsys_contracts.codegen`` after editing a .proto. The generated files are
build output: nobody edits them, and ``tests/contracts/test_stubs_fresh.py`` fails when the
committed copies differ from what this command produces.

protoc names imports after the proto path (``from recsys.v1 import common_pb2``); the stubs
live inside this package, so those imports are rewritten to ``recsys_contracts.v1``.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_PACKAGE_DIR = Path("recsys") / "v1"
OUTPUT_DIR = Path(__file__).resolve().parent / "v1"
_IMPORT = re.compile(r"^from recsys\.v1 import ", re.MULTILINE)
_INIT = '"""Generated gRPC stubs for the recsys.v1 protos. Do not edit: run `python -m recsys_contracts.codegen`."""\n'


def generate() -> dict[str, str]:
    """Returns {file name: text} of every generated stub, without touching the package."""
    from grpc_tools import protoc  # build-time dependency only

    protos = sorted((PROTO_ROOT / PROTO_PACKAGE_DIR).glob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files under {PROTO_ROOT / PROTO_PACKAGE_DIR}")
    include = str(Path(protoc.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as out:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}",
                f"--pyi_out={out}", f"--grpc_python_out={out}"]
        args += [str(p.relative_to(PROTO_ROOT)) for p in protos]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        files = {"__init__.py": _INIT}
        for path in sorted((Path(out) / PROTO_PACKAGE_DIR).iterdir()):
            files[path.name] = _IMPORT.sub("from recsys_contracts.v1 import ", path.read_text())
    return files


def main() -> int:
    files = generate()
    OUTPUT_DIR.mkdir(exist_ok=True)
    for stale in OUTPUT_DIR.glob("*.py*"):
        if stale.name not in files:
            stale.unlink()
    for name, text in files.items():
        (OUTPUT_DIR / name).write_text(text)
    print(f"wrote {len(files)} files to {OUTPUT_DIR.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
