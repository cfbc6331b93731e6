"""The layout a newcomer relies on: small files with one job each, a library that never reaches into
launchers/, the repository root defined once, and a README table of where things live that matches the tree."""

import ast
import re

from conftest import REPO

LIBRARY = sorted((REPO / "disco_dist").rglob("*.py"))
LAUNCHERS = sorted((REPO / "launchers").glob("*.py"))


def test_no_library_file_is_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in LIBRARY if (n := len(p.read_text().splitlines())) > 400}
    assert not long


def test_train_py_defines_no_class_but_the_state():
    tree = ast.parse((REPO / "disco_dist" / "train.py").read_text())
    assert [node.name for node in tree.body if isinstance(node, ast.ClassDef)] == ["TrainState"]


def test_the_library_never_imports_or_builds_a_path_under_launchers():
    """A message naming a launcher for the user to run is fine; a path component "launchers" or an import is not."""
    for path in LIBRARY:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert node.value.strip("/") != "launchers", f"{path}:{node.lineno}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.startswith("launchers") for n in names), f"{path}:{node.lineno}"


def test_the_repository_root_is_defined_once():
    defined = [p.name for p in LIBRARY if "Path(__file__)" in p.read_text()]
    assert defined == ["files.py"]


def test_launchers_are_thin_and_insert_nothing_into_sys_path():
    for path in LAUNCHERS:
        assert "sys.path" not in path.read_text(), path


def test_the_readme_table_of_where_things_live_matches_the_tree():
    readme = (REPO / "README.md").read_text()
    table = readme.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([^`]+)`", table))
    for module in LIBRARY:
        if module.parent.name == "disco_dist" and module.name != "__init__.py":
            assert f"disco_dist/{module.name}" in table or f"`{module.name}`" in table, module.name
    for name in named:
        if "/" in name and not name.startswith(("python", "make", "launchers/<")):
            assert (REPO / name).exists() or (REPO / "disco_dist" / name).exists(), name
