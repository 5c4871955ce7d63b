"""The code's shape, checked: small modules and functions, imports that only go down, no method string branches."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(
    [*(ROOT / "rlad_ds").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "launchers").glob("*.py")]
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module an import statement in the file names (module-level or inside functions), resolved to ours."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    ours = {module_name(p) for p in SOURCES}
    return {name for name in found if name in ours}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_are_small(path):
    lines = path.read_text().count("\n")
    assert lines <= 400, f"{path.name} has {lines} lines"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= 50, f"{path.name}:{node.lineno} {node.name} has {length} lines"


def test_imports_only_go_down():
    graph = {module_name(p): imports(p) - {module_name(p)} for p in SOURCES}
    entry_points = {"rlad_ds.cli"} | {m for m in graph if m.startswith("launchers")}
    for module, targets in graph.items():
        if not module.startswith("launchers"):
            assert not targets & entry_points, f"{module} imports an entry point: {targets & entry_points}"
    # No cycle, however long: a depth-first search never meets a module still on its own path.
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if target in graph and not target.startswith(module + "."):  # a package may import its submodules
                assert state.get(target) != "open", f"import cycle: {' -> '.join(path + [target])}"
                if target not in state:
                    visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_sys_path_manipulation_anywhere():
    for path in [*SOURCES, *(ROOT / "tests").rglob("*.py")]:
        assert "sys.path.insert" not in path.read_text() or path.name == "test_structure.py", path


def test_only_the_methods_module_asks_which_method_runs():
    """`--method` is turned into a method object once; nothing else compares the method name with a string."""
    for path in (ROOT / "rlad_ds").rglob("*.py"):
        if path.name in ("methods.py", "config.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                named = any(isinstance(s, ast.Attribute) and s.attr == "method" for s in sides)
                literal = any(isinstance(s, ast.Constant) and isinstance(s.value, str) for s in sides)
                assert not (named and literal), f"{path.name}:{node.lineno} branches on the method name"


def test_at_most_three_package_modules_over_330_lines():
    long = sorted(p.name for p in (ROOT / "rlad_ds").rglob("*.py") if p.read_text().count("\n") > 330)
    assert len(long) <= 3, long


DOCUMENTS = [
    ROOT / "README.md",
    *(ROOT / "docs").glob("*.md"),
    *(ROOT / "rlad_ds").rglob("*.py"),
    *(ROOT / "benchmarks").glob("*.py"),
]
# What the project's documents may not cite: files outside the repository, the issue tracker, the project's history
# (that is CHANGELOG.md's).
NOT_CITED = re.compile(r"\.\./shared|\bMETHOD\.md|CPU-NOTES|DESIGN\.md|\b[Ii]ssue \d+|previous version|earlier session")


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documents_cite_only_the_repository_and_tell_no_history(path):
    text = path.read_text()
    assert not NOT_CITED.search(text), NOT_CITED.search(text).group(0)
    # Every docs/ file and every relative markdown link they name exists.
    named = re.findall(r"\bdocs/[\w./-]+\.(?:md|png|json)", text)
    if path.suffix == ".md":
        named += [str((path.parent / link).relative_to(ROOT)) for link in re.findall(r"\]\(([^)#:]+)\)", text)]
    missing = [name for name in named if not (ROOT / name).exists()]
    assert not missing, missing
