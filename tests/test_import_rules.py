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


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_it_may(package):
    violations = []
    for path in sorted((ROOT / package).rglob("*.py")):
        forbidden = (_imported_top_level(path) & PROJECT_PACKAGES) - ALLOWED[package]
        if forbidden:
            violations.append(f"{path.relative_to(ROOT)} imports {sorted(forbidden)}")
    assert not violations, violations


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
