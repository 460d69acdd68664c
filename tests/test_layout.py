"""The README's layout table names every module of the package under its folder, and nothing that is gone; the
package's imports go one way (no cycle between its modules or its folders, weights/ on its own, nothing of the
development tools); and no file under tests/ imports from a test module (shared helpers live in tests/conftest.py,
tests/helpers/ or devtools/)."""

import ast
import re
from pathlib import Path

from devtools.cog_server import REPO_ROOT

PACKAGE = REPO_ROOT / "sdxl_cog"
TESTS = REPO_ROOT / "tests"


def layout_rows() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    table = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    return [line for line in table.splitlines() if line.startswith("| `")]


def named_modules() -> set[str]:
    """`sdxl_cog/x.py` and `sdxl_cog/sub/` rows, with the bare `y.py` names listed after them in the same cell."""
    named = set()
    for row in layout_rows():
        folder = None
        for cell in row.split("|")[1:3]:
            for name in re.findall(r"`([^`]+)`", cell):
                if name.startswith("sdxl_cog/"):
                    path = name.rstrip("/")
                    folder = path if name.endswith("/") else path.rsplit("/", 1)[0]
                    named.add(path)
                elif folder and name.endswith(".py"):
                    named.add(f"{folder}/{name}")
    return named


def test_every_module_is_in_the_readme_layout():
    modules = {
        p.relative_to(REPO_ROOT).as_posix()
        for p in PACKAGE.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py") and "__pycache__" not in p.parts
    }
    missing = sorted(m for m in modules if m not in named_modules())
    assert not missing, f"README's Layout table does not name: {missing}"


def test_the_readme_layout_names_nothing_that_is_gone():
    gone = sorted(n for n in named_modules() if not (REPO_ROOT / n).exists())
    assert not gone, f"README's Layout table names paths that do not exist: {gone}"


def is_test_module(dotted: str) -> bool:
    """`test_x`, `tests.test_x` or anything below them: what pytest collects as a test module."""
    parts = dotted.split(".")
    if parts[0] == "tests":
        parts = parts[1:]
    return bool(parts) and parts[0].startswith("test_")


def imported_modules(tree: ast.Module) -> list[tuple[int, str]]:
    """Every module an import statement names, anywhere in the file (inside functions too), with its line;
    `from tests import test_x` names tests.test_x, and a relative import `from .test_x import y` names
    test_x (tests/ is no package, so both are test modules)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}".lstrip(".")) for alias in node.names if module == "tests"]
            found += [(node.lineno, alias.name) for alias in node.names if node.level and not module]
    return found


def test_no_file_under_tests_imports_a_test_module():
    offenders = [
        f"{path.relative_to(REPO_ROOT)}:{line}: {module}"
        for path in sorted(TESTS.rglob("*.py"))
        for line, module in imported_modules(ast.parse(path.read_text(), str(path)))
        if is_test_module(module)
    ]
    assert not offenders, f"import shared helpers from tests/conftest.py or tests/helpers/, not from: {offenders}"


def test_the_import_check_sees_every_form_of_importing_a_test_module():
    source = """
import test_generation
import tests.test_lora as lora
from test_deploy import by_kind
from tests.test_server import decode_outputs
from tests import test_placement
from .test_models import run
def late():
    from tests.test_reliability_server import Webhooks
from tests.conftest import run
from tests.helpers.server import data_uri
from tests import conftest
import devtools.synthetic
"""
    flagged = [module for _, module in imported_modules(ast.parse(source)) if is_test_module(module)]
    assert flagged == [
        "test_generation",
        "tests.test_lora",
        "test_deploy",
        "tests.test_server",
        "tests.test_placement",
        "test_models",
        "tests.test_reliability_server",
    ]


# --- The package's imports go one way ----------------------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(path: Path) -> set[str]:
    """The sdxl_cog and devtools modules a file imports, relative imports resolved, imports under TYPE_CHECKING
    and inside functions included: a cycle through them is a cycle all the same."""
    here = module_name(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[: len(here) - node.level + 1] + [node.module or ""]) if node.level else node.module
            names = [base.strip(".")] + [f"{base.strip('.')}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name.split(".")[0] in ("sdxl_cog", "devtools")}
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules (and development tools) it imports; `from sdxl_cog.x import name` imports
    sdxl_cog.x unless sdxl_cog.x.name is a module itself."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    graph = {}
    for module, path in paths.items():
        targets = set()
        for name in package_imports(path):
            while name.startswith("sdxl_cog.") and name not in paths:
                name = name.rsplit(".", 1)[0]
            targets.add(name)
        graph[module] = targets - {module}
    return graph


def folder_of(module: str) -> str:
    """sdxl_cog.checkpoints.cache -> sdxl_cog.checkpoints; top-level modules (sdxl_cog.config) stand alone."""
    parts = module.split(".")
    return ".".join(parts[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in list(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_between_modules():
    assert cycles(import_graph()) == []


def test_no_import_cycle_between_folders():
    """A folder that imports another is below it: nothing the second imports may lead back (sdxl_cog.service, at the
    top, imports every folder; config and errors, at the bottom, import none)."""
    folders: dict[str, set[str]] = {}
    for module, imported in import_graph().items():
        folders.setdefault(folder_of(module), set()).update(
            folder_of(m) for m in imported if folder_of(m) != folder_of(module)
        )
    assert cycles(folders) == []


def test_weights_import_nothing_of_the_serving_package():
    """script/download-weights runs at build time with the weights folder alone in mind."""
    outside = {
        module: sorted(m for m in imported if not m.startswith("sdxl_cog.weights"))
        for module, imported in import_graph().items()
        if module.startswith("sdxl_cog.weights")
    }
    assert {module: found for module, found in outside.items() if found} == {}


def test_the_package_imports_no_development_tool():
    """The image ships sdxl_cog/ without devtools/ (.dockerignore): nothing that serves may need it."""
    assert {m: sorted(i) for m, i in import_graph().items() if any(x.startswith("devtools") for x in i)} == {}


def test_the_cycle_check_finds_a_cycle_through_a_type_only_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    module = tmp_path / "sdxl_cog" / "x.py"
    module.parent.mkdir()
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .generate import Run\n")
    here = REPO_ROOT
    try:
        globals()["REPO_ROOT"] = tmp_path
        assert package_imports(module) == {"sdxl_cog.generate", "sdxl_cog.generate.Run"}
    finally:
        globals()["REPO_ROOT"] = here
