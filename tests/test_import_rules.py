"""Import rules between the packages (docs/ARCHITECTURE.md) and the no-pickle rule for loaders."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = {"recsys_contracts", "recsys_serving", "trainer", "retrieval_service", "ranking_service", "gateway"}
ALLOWED = {
    "recsys_contracts": {"recsys_contracts"},
    "recsys_serving": {"recsys_serving", "recsys_contracts"},
    "trainer": {"trainer", "recsys_contracts"},
    "retrieval_service": {"retrieval_service", "recsys_serving", "recsys_contracts"},
    "ranking_service": {"ranking_service", "recsys_serving", "recsys_contracts"},
    "gateway": {"gateway", "recsys_serving", "recsys_contracts"},
}


def _imported_top_level(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


# One named module more: the shadow worker runs the candidate's retrieval in its own idle-priority
# process with the retrieval service's domain code (ranking_service/shadow_retrieval.py's docstring).
ALLOWED_IN_MODULE = {"ranking_service/shadow_retrieval.py": {"retrieval_service"}}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_it_may(package):
    violations = []
    for path in sorted((ROOT / package).rglob("*.py")):
        allowed = ALLOWED[package] | ALLOWED_IN_MODULE.get(path.relative_to(ROOT).as_posix(), set())
        forbidden = (_imported_top_level(path) & PROJECT_PACKAGES) - allowed
        if forbidden:
            violations.append(f"{path.relative_to(ROOT)} imports {sorted(forbidden)}")
    assert not violations, violations


def test_every_top_level_folder_has_a_rule():
    """Every folder of Python code is either a package with import rules above or a tool folder below."""
    folders = {path.parent.relative_to(ROOT).parts[0] for path in ROOT.glob("*/**/*.py")
               if not path.relative_to(ROOT).parts[0].startswith(".")}
    assert folders - {"tests"} == set(ALLOWED) | set(TOOLS), sorted(folders)


# Tools: they may use every package, but never the test suite (its fixtures, keys and private names).
TOOLS = ("loadtest", "benchmarks", "scripts")


@pytest.mark.parametrize("folder", TOOLS + tuple(sorted(ALLOWED)))
def test_nothing_outside_the_test_suite_imports_it(folder):
    offenders = [str(path.relative_to(ROOT)) for path in sorted((ROOT / folder).rglob("*.py"))
                 if "tests" in _imported_top_level(path)]
    assert not offenders, offenders


@pytest.mark.parametrize("package", ["recsys_contracts", "recsys_serving", "retrieval_service", "ranking_service",
                                     "gateway"])
def test_serving_code_imports_no_torch(package):
    """Models serve as ONNX programs: torch appears only in the exact-search GPU backend, imported when built."""
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text())
        top_level = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import)
                     for alias in node.names}
        top_level |= {node.module.split(".")[0] for node in tree.body
                      if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
        if "torch" in top_level:
            offenders.append(str(path.relative_to(ROOT)))
        if "torch" in _imported_top_level(path) and path.relative_to(ROOT).as_posix() != "retrieval_service/backends.py":
            offenders.append(f"{path.relative_to(ROOT)} (even inside a function)")
    assert not offenders, offenders


@pytest.mark.parametrize("package", ["recsys_contracts", "recsys_serving", "retrieval_service", "ranking_service"])
def test_loading_code_never_unpickles(package):
    # Loading an artifact must never run code from it: no pickle, no torch.load, no allow_pickle=True.
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        if "pickle" in _imported_top_level(path):
            offenders.append(f"{path.relative_to(ROOT)}: imports pickle")
        if "allow_pickle=True" in text:
            offenders.append(f"{path.relative_to(ROOT)}: allow_pickle=True")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "load" and \
                    isinstance(node.value, ast.Name) and node.value.id == "torch":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: torch.load")
    assert not offenders, offenders


@pytest.mark.parametrize("module", ["ranking_service/pipeline.py", "ranking_service/selection.py",
                                    "ranking_service/refill.py", "retrieval_service/generator.py",
                                    "recsys_serving/wire.py", "recsys_serving/features.py",
                                    "recsys_serving/batching.py"])
def test_domain_code_is_grpc_free(module):
    """gRPC status codes are the servicers' (and ``recsys_serving.rpc``'s) business: the domain raises
    its own exceptions, the servicer maps them."""
    assert "grpc" not in _imported_top_level(ROOT / module)
