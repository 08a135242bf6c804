"""The package structure of issue 17: one `ctdx` namespace, imports that point one way.

`ctdx.db` is the foundation (it imports nothing of ctdx above it); `ctdx.scp`, `ctdx.worker`
and `ctdx.model_train` use it; `ctdx.cli` gathers every package's commands and nothing
imports it. Read from the source with `ast` (function-level imports count too), so a lazy
import cannot hide an arrow that points the wrong way.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"ctdx.db": "db", "ctdx.scp": "scp", "ctdx.worker": "worker",
           "ctdx.model_train": "model_train", "ctdx": "ctdx"}


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for package, folder in FOLDERS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if package == "ctdx" and parts and parts[0] in {"db", "scp", "worker", "model_train"}:
                continue
            mods[".".join([package, *parts])] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in mods.items():
        deps: set[str] = set()
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = module.split(".") if is_package else module.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join([*parts, base] if base else parts)
                # `from pkg import sub` depends on pkg.sub, `from pkg import name` on pkg
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base
                         for alias in node.names]
            else:
                continue
            for name in names:
                target = _resolve(name, mods)
                if target is not None and target != module:
                    deps.add(target)
        graph[module] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_among_ctdx_modules() -> None:
    assert _cycles(_graph()) == []


def test_the_graph_sees_imports_inside_functions() -> None:
    """The check would catch a lazy import: ctdx.cli imports the worker's CLI in a function."""
    assert "ctdx.worker.cli" in _graph()["ctdx.cli"]


@pytest.mark.parametrize("package", ["ctdx.db", "ctdx.scp", "ctdx.worker", "ctdx.model_train"])
def test_nothing_imports_the_command_line_root(package: str) -> None:
    graph = _graph()
    users = sorted(m for m, deps in graph.items() if "ctdx.cli" in deps and m.startswith(package))
    assert users == []


def test_db_imports_nothing_of_ctdx_above_it() -> None:
    upward = {
        module: sorted(d for d in deps if not d.startswith("ctdx.db"))
        for module, deps in _graph().items()
        if module.startswith("ctdx.db")
    }
    assert {m: d for m, d in upward.items() if d} == {}


def test_arrows_point_one_way_between_packages() -> None:
    allowed = {
        "ctdx.db": {"ctdx.db"},
        "ctdx.model_train": {"ctdx.model_train", "ctdx.db"},
        "ctdx.scp": {"ctdx.scp", "ctdx.db"},
        "ctdx.worker": {"ctdx.worker", "ctdx.db", "ctdx.model_train", "ctdx.scp"},
    }
    wrong = []
    for module, deps in _graph().items():
        package = ".".join(module.split(".")[:2])
        for dep in deps:
            if package in allowed and ".".join(dep.split(".")[:2]) not in allowed[package]:
                wrong.append(f"{module} -> {dep}")
    assert wrong == []


def test_pyproject_installs_every_package_folder_under_ctdx() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    expected = {"ctdx"}
    for package, folder in FOLDERS.items():
        if package == "ctdx":
            continue
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            expected.add(".".join([package, *rel]))
    assert set(config["packages"]) == expected
    assert config["package-dir"] == FOLDERS | {"ctdx": "ctdx"}


def test_study_decisions_of_db_are_the_methods_recognition_classes() -> None:
    from ctdx.db.models import STUDY_DECISIONS
    from ctdx.model_train.method.classes import RECOGNITION_CLASSES

    assert STUDY_DECISIONS == RECOGNITION_CLASSES


def test_installed_names_are_under_ctdx_only(tmp_path: Path) -> None:
    """Outside the repository, the old top-level names are gone and the namespace imports."""
    def run(code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)

    for old in ("db", "worker", "scp", "model_train"):
        result = run(f"import {old}")
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, old
    ok = run("import ctdx.scp, ctdx.worker, ctdx.db, ctdx.model_train, ctdx.cli; print('ok')")
    assert ok.returncode == 0 and ok.stdout.strip() == "ok", ok.stderr
