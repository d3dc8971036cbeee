"""Imports run downhill: a package imports only itself and the packages below it."""

import ast

from tests.conftest import ROOT

LAYERS = ["configs", "data", "sharding", "eval", "train", "tune", "launch"]


def _imported_packages(path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(LAYERS)


def uphill_imports(root=ROOT) -> list[str]:
    bad = []
    for level, package in enumerate(LAYERS):
        for path in sorted((root / package).rglob("*.py")):
            for other in _imported_packages(path):
                if LAYERS.index(other) > level:
                    bad.append(f"{path.relative_to(root)} imports {other}")
    return bad


def test_no_package_imports_a_package_above_it():
    assert uphill_imports() == []


def test_the_check_sees_an_uphill_import_even_inside_a_function(tmp_path):
    for package in LAYERS:
        (tmp_path / package).mkdir()
    (tmp_path / "sharding" / "bad.py").write_text("def f():\n    from train.loop import train\n")
    (tmp_path / "train" / "fine.py").write_text("import eval.search\nfrom sharding import format\n")
    assert uphill_imports(tmp_path) == ["sharding/bad.py imports train"]
