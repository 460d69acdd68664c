"""The README's layout table names every module of the package under its folder, and nothing that is gone."""

import re

from sdxl_cog.testing.cog_server import REPO_ROOT

PACKAGE = REPO_ROOT / "sdxl_cog"


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
