"""cog.yaml is what the Cog CLI accepts (its own config schema) and builds the SDK the suite tested."""

import json
import re
from importlib import metadata
from pathlib import Path

import jsonschema
import yaml

from devtools.cog_server import REPO_ROOT
from sdxl_cog.schema.openapi import cog_version

# Cog's JSON Schema for cog.yaml (replicate/cog pkg/config/data/config_schema_v1.0.json, August 2026).
COG_CONFIG_SCHEMA = Path(__file__).parent / "fixtures" / "cog_config_schema_v1.0.json"


def cog_yaml() -> dict:
    return yaml.safe_load((REPO_ROOT / "cog.yaml").read_text())


def test_cog_yaml_is_valid_for_the_cog_cli():
    jsonschema.validate(cog_yaml(), json.loads(COG_CONFIG_SCHEMA.read_text()))


def test_the_cli_installs_the_sdk_the_suite_runs():
    """Without build.sdk_version the CLI drops cog from requirements.txt and installs the latest SDK."""
    assert cog_yaml()["build"]["sdk_version"] == cog_version(REPO_ROOT) == metadata.version("cog")


def test_python_version_and_predictor_exist():
    config = cog_yaml()
    path, _, class_name = config["predict"].partition(":")
    assert re.search(rf"^class {class_name}\(", (REPO_ROOT / path).read_text(), re.MULTILINE)
    assert config["build"]["python_requirements"] == "requirements.txt"
    assert "python:" + config["build"]["python_version"] in (REPO_ROOT / "Dockerfile").read_text()
