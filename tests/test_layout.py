"""The layout a newcomer relies on: small files with one job each in wings whose imports flow one way (the order
the README states), a library that never reaches into launchers/, the repository root defined once, a README table
of where things live that matches the tree, and docs that name only tests that exist and speak of the product."""

import ast
import re

from conftest import REPO

LIBRARY = sorted((REPO / "disco_dist").rglob("*.py"))
LAUNCHERS = sorted((REPO / "launchers").glob("*.py"))
WHERE_THINGS_LIVE = (REPO / "README.md").read_text().split("## Where things live", 1)[1].split("\n## ", 1)[0]
WINGS = sorted(p.name for p in (REPO / "disco_dist").iterdir() if (p / "__init__.py").is_file())


def module_name(path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path) -> set:
    """The disco_dist modules `path` imports, at the top or inside a function alike."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found |= {f"{module}.{a.name}" if is_module(f"{module}.{a.name}") else module for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.startswith("disco_dist.")}


def wing_order() -> list:
    """The wings, lowest first, as the README's "Where things live" states them (`a` -> `b` -> ...)."""
    line = next(line for line in WHERE_THINGS_LIVE.splitlines() if line.count("->") >= len(WINGS) - 1)
    return re.findall(r"\b(" + "|".join(WINGS) + r")\b", line)


def test_the_readme_states_an_order_of_all_the_wings():
    assert sorted(wing_order()) == WINGS


def test_every_library_module_lives_in_a_wing():
    assert [p.name for p in (REPO / "disco_dist").glob("*.py")] == ["__init__.py"]


def test_wings_import_only_themselves_and_the_wings_below_them_and_the_import_graph_has_no_circle():
    order = wing_order()
    graph = {module_name(p): imported_modules(p) - {module_name(p)} for p in LIBRARY if p.parent.name != "disco_dist"}
    for module, imports in graph.items():
        wing = module.split(".")[1]
        for imported in imports:
            target = imported.split(".")[1]
            assert order.index(target) <= order.index(wing), f"{module} imports {imported}: {target} is above {wing}"
    done, visiting = set(), []

    def visit(module):
        assert module not in visiting, "import circle: " + " -> ".join(visiting[visiting.index(module) :] + [module])
        if module in done:
            return
        visiting.append(module)
        for imported in graph.get(module, ()):
            visit(imported)
        visiting.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_no_library_file_is_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in LIBRARY if (n := len(p.read_text().splitlines())) > 400}
    assert not long


def test_the_training_loop_defines_no_class_but_the_state():
    tree = ast.parse((REPO / "disco_dist" / "train" / "loop.py").read_text())
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


def test_the_readme_table_of_where_things_live_names_every_wing_and_module_and_only_paths_that_exist():
    rows = {line.split("`")[1]: line for line in WHERE_THINGS_LIVE.splitlines() if line.startswith("| `")}
    for wing in WINGS:
        row = rows[f"disco_dist/{wing}/"]
        for module in sorted((REPO / "disco_dist" / wing).glob("*.py")):
            assert module.name == "__init__.py" or f"`{module.name}`" in row, f"disco_dist/{wing}/{module.name}"
    for name in re.findall(r"`([^`]+)`", WHERE_THINGS_LIVE):
        if "/" in name and not name.startswith(("python", "make", "launchers/<")) and " " not in name:
            assert (REPO / name).exists(), name


PRODUCT = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SPOKEN = [
    *PRODUCT,
    *(
        p
        for d in ("recipes", "launchers", "disco_dist", "slurm", "scripts", "ds_configs", "tests")
        for p in sorted((REPO / d).rglob("*"))
        if p.is_file() and p.suffix in (".py", ".json", ".sh", ".sbatch", ".md")
    ),
]


def test_the_product_never_speaks_of_sessions_or_work_item_numbers():
    """A number is described by what ran, on what hardware, at which commit and date; pytest's scope="session" is
    pytest's word, not ours."""
    pattern = re.compile(r"\bsessions?\b|\bissue ?#?[0-9]+", re.IGNORECASE)
    found = [
        f"{p.relative_to(REPO)}:{n}: {line.strip()}"
        for p in SPOKEN
        if p != REPO / "tests" / "test_layout.py"
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line.replace('scope="session"', ""))
    ]
    assert not found, "\n".join(found)


def test_every_test_the_docs_name_exists():
    defined = {m for p in (REPO / "tests").rglob("*.py") for m in re.findall(r"def (test_\w+)", p.read_text())}
    files = {p.name for p in (REPO / "tests").rglob("test_*.py")}
    for doc in PRODUCT:
        for name in re.findall(r"\b(test_\w+)(\.py)?", doc.read_text()):
            assert (name[0] + ".py" in files) if name[1] else name[0] in defined, f"{doc.name} names {name[0]}{name[1]}"
