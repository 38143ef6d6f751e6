"""The layering of docs/ARCHITECTURE.md, read from the code itself with `ast`: imports go only downward.

    mlvision (core)  <  training, merging  <  benchmarks  <  study  <  dashboard, demo

Each package may import only the packages listed for it in ALLOWED; no module may take part in
an import cycle; the two entry shims that keep the README's old commands working hand over to
their target and contain nothing else; only the files the README runs by path touch sys.path;
no code points to design notes outside the repository.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mlvision.paths import REPO_ROOT

# package -> the project packages it may import (besides itself)
ALLOWED = {
    "mlvision": set(),
    "training": {"mlvision"},
    "merging": {"mlvision"},
    "benchmarks": {"mlvision", "training", "merging"},
    "study": {"mlvision", "training", "merging", "benchmarks"},
    "dashboard": {"mlvision", "benchmarks"},
    "demo": {"mlvision", "merging", "benchmarks"},
}
PACKAGES = set(ALLOWED)
# Files kept at the paths the README has always run, which only hand over to a higher layer.
ENTRY_SHIMS = {"training/run_all.py": "study.run_all", "training/bench.py": "benchmarks.cli"}
# Files the README runs by path (`python X.py`, `streamlit run X.py`): the only ones that may edit sys.path.
RUN_BY_PATH = {"training/run_all.py", "merging/merge.py", "merging/plan.py", "demo/app.py", "dashboard/app.py"}


def project_files() -> dict[str, Path]:
    """module name -> file, for every module of the project's packages."""
    files = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


FILES = project_files()


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_modules(module: str, path: Path) -> set[str]:
    """Project modules `module` imports anywhere in its file (functions included; TYPE_CHECKING blocks not)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(n) for block in ast.walk(tree) if _type_checking_only(block) for n in ast.walk(block)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            names = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in FILES else origin for a in node.names]
        else:
            continue
        found |= {name for name in names if name.split(".")[0] in PACKAGES}
    return found


GRAPH = {module: imported_modules(module, path) for module, path in FILES.items()}


def relative(module: str) -> str:
    return FILES[module].relative_to(REPO_ROOT).as_posix()


def test_the_graph_is_read_from_real_imports():
    """Guard against a parser that finds nothing: known edges of each layer are seen."""
    assert "mlvision.store" in GRAPH["mlvision.config"]
    assert "merging.methods" in GRAPH["merging.merged_model"]
    assert "merging.methods.linear" in GRAPH["merging.methods"]  # `from . import linear`
    assert "training.pipeline" in GRAPH["study.run_all"]
    assert set(ALLOWED) == {m.split(".")[0] for m in FILES}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_only_go_down(package):
    upward = []
    for module, imports in GRAPH.items():
        if module.split(".")[0] != package or relative(module) in ENTRY_SHIMS:
            continue
        upward += [
            f"{relative(module)} imports {name}"
            for name in sorted(imports)
            if name.split(".")[0] not in ALLOWED[package] | {package}
        ]
    assert not upward, f"{package} may import only {sorted(ALLOWED[package])}: " + "; ".join(upward)


def test_no_import_cycles():
    """Depth-first search over the module graph; any back edge is a cycle."""
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH.get(module, ())):
            if target not in GRAPH:
                continue
            if state.get(target) == "open":
                cycles.append(" -> ".join(trail[trail.index(target) :] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(cycles)


@pytest.mark.parametrize("shim, target", sorted(ENTRY_SHIMS.items()))
def test_entry_shims_only_hand_over(shim, target):
    tree = ast.parse((REPO_ROOT / shim).read_text(encoding="utf-8"))
    defined = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
    assert not defined, f"{shim} must only hand over to {target}"
    module = ".".join(Path(shim).with_suffix("").parts)
    assert GRAPH[module] == {target}


def test_only_scripts_run_by_path_edit_sys_path():
    editing = {relative(module) for module, path in FILES.items() if "sys.path" in path.read_text(encoding="utf-8")}
    assert editing <= RUN_BY_PATH, f"sys.path edited in {sorted(editing - RUN_BY_PATH)}: install the package instead"


def test_code_points_only_inside_the_repository():
    outside = ("DESIGN.md", "OFFLINE_ASSETS.md", "../shared")
    found = [
        f"{relative(module)}: {word}"
        for module, path in FILES.items()
        for word in outside
        if word in path.read_text(encoding="utf-8")
    ]
    assert not found, "comments must point to docs/ARCHITECTURE.md, not outside the repo: " + "; ".join(found)
    assert (REPO_ROOT / "docs" / "ARCHITECTURE.md").is_file()
