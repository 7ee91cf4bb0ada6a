"""Rules of the test suite itself, read from the source of tests/ (AST): every subprocess has a timeout, so a stuck
entry point fails its test instead of hanging the suite; test files share code through helpers.py and conftest.py's
fixtures, never by importing each other."""

from __future__ import annotations

import ast

from helpers import ROOT

TESTS = ROOT / "tests"
# subprocess functions that wait for the child. Popen does not wait: a test may start one (to signal it) only in a
# function that also waits for it with a timeout (``.communicate(timeout=...)`` or ``.wait(timeout=...)``).
WAITING = ("run", "call", "check_call", "check_output")


def subprocess_calls_without_timeout(source: str) -> list[int]:
    """Line numbers of ``subprocess.run(...)`` (or call, check_call, check_output, Popen) calls, also under a
    ``from subprocess import ...`` name, without a ``timeout=`` keyword."""
    tree = ast.parse(source)
    waited_with_timeout = _popen_waits(tree)
    aliases = {a.asname or a.name: a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and node.module == "subprocess" for a in node.names}
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "subprocess":
            name = func.attr
        elif isinstance(func, ast.Name) and func.id in aliases:
            name = aliases[func.id]
        else:
            continue
        if name == "Popen":
            if not waited_with_timeout.get(node, False):
                lines.append(node.lineno)
        elif name in WAITING and not any(k.arg == "timeout" for k in node.keywords):
            lines.append(node.lineno)
    return lines


def _popen_waits(tree: ast.AST) -> dict[ast.Call, bool]:
    """Each call inside a function -> whether that function also calls ``.communicate`` / ``.wait`` with ``timeout=``."""
    found: dict[ast.Call, bool] = {}
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            calls = [n for n in ast.walk(func) if isinstance(n, ast.Call)]
            waits = any(isinstance(c.func, ast.Attribute) and c.func.attr in ("communicate", "wait")
                        and any(k.arg == "timeout" for k in c.keywords) for c in calls)
            for call in calls:
                found[call] = found.get(call, False) or waits
    return found


def imports_of_test_modules(source: str) -> list[str]:
    """Modules named ``test_*`` or ``conftest`` that ``source`` imports."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return [n for n in names if n.split(".")[0].startswith("test_") or n.split(".")[0] == "conftest"]


def test_the_rules_catch_what_they_guard_against():
    bad = ("import subprocess\nfrom subprocess import check_output as co\nsubprocess.run(['x'])\nco(['x'])\n"
           "subprocess.Popen(['x'])\nsubprocess.run(['x'], timeout=5)\n"
           "from test_train_entry import ROOT\nimport conftest\nfrom helpers import ROOT\n"
           "def waits():\n    p = subprocess.Popen(['x'])\n    p.communicate(timeout=5)\n"
           "def forgets():\n    p = subprocess.Popen(['x'])\n    p.communicate()\n")
    assert subprocess_calls_without_timeout(bad) == [3, 4, 5, 14]
    assert imports_of_test_modules(bad) == ["test_train_entry", "conftest"]


def test_every_subprocess_has_a_timeout_and_no_test_file_imports_another():
    problems = []
    for path in sorted(TESTS.glob("*.py")):
        source = path.read_text()
        problems += [f"{path.name}:{line}: subprocess call without timeout=" for line in subprocess_calls_without_timeout(source)]
        if path.name.startswith("test_"):
            problems += [f"{path.name}: imports {name}; shared code goes in tests/helpers.py"
                         for name in imports_of_test_modules(source)]
    assert not problems, "\n".join(problems)
