"""README's inputs table as the schema says it should read: each input's default and what it allows, written the
way the table writes them (tests/test_readme.py compares the two)."""

from __future__ import annotations

import json


def default_cell(prop: dict) -> str:
    """The schema's default as JSON, or – where there is none (null: the engine decides, as the text says)."""
    default = prop.get("default")
    return "–" if default is None else f"`{json.dumps(default)}`"


def allowed_cell(prop: dict, schemas: dict) -> str:
    if "allOf" in prop:
        choices = schemas[prop["allOf"][0]["$ref"].rsplit("/", 1)[1]]["enum"]
        return "one of " + ", ".join(f"`{c}`" for c in choices)
    if prop.get("format") == "uri":
        return "a file: `data:` URI or http(s) URL"
    if prop["type"] == "boolean":
        return "`true`, `false`"
    if "minimum" in prop:
        return f"{prop['minimum']} to {prop['maximum']}"
    if "maxLength" in prop:
        return f"text, at most {prop['maxLength']} characters"
    return "text"


def expected_rows(schema: dict) -> list[tuple[str, str, str]]:
    """(name, default cell, allowed cell) per input, in the schema's order."""
    schemas = schema["components"]["schemas"]
    inputs = sorted(schemas["Input"]["properties"].items(), key=lambda item: item[1]["x-order"])
    return [(f"`{name}`", default_cell(prop), allowed_cell(prop, schemas)) for name, prop in inputs]
