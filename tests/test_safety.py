"""Safety rules that hold for the whole code base, checked on its source: no pickle from files without
`weights_only=True`, no shell strings, servers bound to localhost."""

import ast

from conftest import REPO

SOURCES = sorted([*(REPO / "disco_dist").rglob("*.py"), *(REPO / "launchers").glob("*.py")])


def calls(name_test):
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and name_test(ast.unparse(node.func)):
                found.append((path.relative_to(REPO), node.lineno, node))
    return found


def keyword(node, name):
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_every_torch_load_refuses_pickled_code():
    loads = calls(lambda f: f in ("torch.load", "load") or f.endswith("pickle.load") or f.endswith("pickle.loads"))
    assert loads, "the checkpoint code loads RNG states and the queue with torch.load"
    for path, line, node in loads:
        value = keyword(node, "weights_only")
        assert isinstance(value, ast.Constant) and value.value is True, (
            f"{path}:{line} loads a pickle without weights_only=True"
        )


def test_no_shell_strings():
    for path, line, node in calls(lambda f: f.startswith("subprocess.") or f in ("os.system", "os.popen")):
        assert not ast.unparse(node.func).startswith(("os.system", "os.popen")), f"{path}:{line}"
        shell = keyword(node, "shell")
        assert shell is None or (isinstance(shell, ast.Constant) and shell.value is False), (
            f"{path}:{line} uses shell=True"
        )
        assert node.args and not isinstance(node.args[0], (ast.Constant, ast.JoinedStr)), (
            f"{path}:{line}: pass an argument list, not a command string"
        )


def test_tensorboard_command_binds_to_localhost():
    text = "\n".join(p.read_text() for p in SOURCES) + (REPO / "README.md").read_text()
    commands = [line for line in text.splitlines() if "tensorboard --logdir" in line]
    assert commands and all("--bind_all" not in c and "--host 127.0.0.1" in c for c in commands), commands
