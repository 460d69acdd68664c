"""README and docs/ say what the code does: the inputs table is the schema `cog build` makes of predict.py, row
for row (name, default, what is allowed), and every relative link leads to a file and a heading that exist."""

from __future__ import annotations

import re

from devtools.cog_server import REPO_ROOT
from sdxl_cog.schema.openapi import build_schema
from tests.helpers.readme_inputs import expected_rows

README = REPO_ROOT / "README.md"
PAGES = [README, *sorted((REPO_ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    section = markdown.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows]


# README writes the three controlnet_N groups once, with N standing for 1, 2 and 3.
SLOTS = (1, 2, 3)


def expand_slots(rows: list[list[str]]) -> list[list[str]]:
    """Each run of consecutive rows whose input is named with `_N` stands for that run once per slot, in order."""
    expanded, run = [], []
    for row in [*rows, None]:
        if row is not None and "_N" in row[0]:
            run.append(row)
            continue
        expanded += [[cell.replace("_N", f"_{n}") for cell in r] for n in SLOTS for r in run]
        run = []
        if row is not None:
            expanded.append(row)
    return expanded


def test_the_inputs_table_is_the_schema():
    rows = expand_slots(table_rows(README.read_text(), "Inputs"))
    assert [tuple(row[:3]) for row in rows] == expected_rows(build_schema())
    assert all(len(row) == 4 and row[3] for row in rows), "every input says what it does"


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_leads_somewhere():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            path, _, fragment = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target}")
            elif fragment:
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
                if fragment not in {anchor(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


def test_readme_stays_short_and_links_every_docs_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in text, page.name
