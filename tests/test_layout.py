"""The README's layout table names every module of the package under its folder, and nothing that is gone;
and no file under tests/ imports from a test module (shared helpers live in tests/conftest.py, tests/helpers/
or sdxl_cog/testing/)."""

import ast
import re

from sdxl_cog.testing.cog_server import REPO_ROOT

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
import sdxl_cog.testing.synthetic
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
