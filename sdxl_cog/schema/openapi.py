"""The OpenAPI document that `cog build` bakes into the image as `.cog/openapi_schema.json`.

coglet validates request inputs only when that file exists in its working directory, so every launch
path (`cog build`, the Dockerfile, script/serve, the tests) needs it. They all make it the way the Cog
CLI does: predict.py is read statically (static_reader.py, Cog's rules; it is never imported) and the
document takes the shape of Cog's generator (replicate/cog pkg/schema/openapi_spec.go):

    python -m sdxl_cog.schema [--predictor predict.py:Predictor] [--out .cog/openapi_schema.json]

A predict.py that `cog build` could not read, or would read with part of its API lost, fails here too.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import sys
from pathlib import Path
from typing import Any

from sdxl_cog.schema.static_reader import NO_DEFAULT, StaticInput, StaticPredictor, StaticSchemaError, read_predictor

DEFAULT_PREDICTOR = "predict.py:Predictor"
DEFAULT_OUT = Path(".cog/openapi_schema.json")
OPENAPI_VERSION = "3.0.2"
STATUSES = ["starting", "processing", "succeeded", "canceled", "failed"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _title(name: str) -> str:
    """Cog's TitleCase: split on underscores, capitalise the first letter of each part."""
    return " ".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _input_property(field: StaticInput) -> tuple[dict, dict | None]:
    """One property of the Input schema, plus the enum schema its choices need (if any)."""
    prop: dict[str, Any] = {"x-order": field.order}
    enum = None
    if field.choices:
        enum = {
            "title": field.name,
            "description": "An enumeration.",
            "enum": list(field.choices),
            "type": field.type.json_schema().get("type", "string"),
        }
        prop["allOf"] = [_ref(field.name)]
    else:
        prop["title"] = _title(field.name)
        prop.update(field.type.json_schema())
    # A None default makes an input optional only when its type is `X | None` (`seed: int = Input(default=None)`
    # is required in Cog); a Secret with a None default is Cog's one exception.
    nullable = field.type.nullable or (field.type.primitive == "Secret" and field.default is None)
    if field.default is not NO_DEFAULT and (field.default is not None or nullable):
        prop["default"] = field.default
    if nullable:
        prop["nullable"] = True
    constraints = {
        "description": field.description,
        "minimum": field.ge,
        "maximum": field.le,
        "minLength": field.min_length,
        "maxLength": field.max_length,
        "pattern": field.regex,
        "deprecated": field.deprecated or None,
        "x-cog-accept": field.accept,
    }
    prop.update({key: value for key, value in constraints.items() if value is not None})
    return prop, enum


def input_schemas(predictor: StaticPredictor) -> dict[str, dict]:
    """`Input`, then one enum schema per input with choices, keyed by component name."""
    properties, required, enums = {}, [], {}
    for field in predictor.inputs:
        properties[field.name], enum = _input_property(field)
        if enum is not None:
            enums[field.name] = enum
        if "default" not in properties[field.name]:
            required.append(field.name)
    schema: dict[str, Any] = {"title": "Input", "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return {"Input": schema, **enums}


def _envelope_schemas() -> dict[str, dict]:
    """The request/response envelope, as Cog's generator writes it."""
    date_time = {"type": "string", "format": "date-time"}
    return {
        "PredictionRequest": {
            "title": "PredictionRequest",
            "type": "object",
            "properties": {"id": {"title": "Id", "type": "string"}, "input": _ref("Input")},
        },
        "PredictionResponse": {
            "title": "PredictionResponse",
            "type": "object",
            "properties": {
                "input": _ref("Input"),
                "output": _ref("Output"),
                "id": {"title": "Id", "type": "string"},
                "version": {"title": "Version", "type": "string"},
                "created_at": {"title": "Created At", **date_time},
                "started_at": {"title": "Started At", **date_time},
                "completed_at": {"title": "Completed At", **date_time},
                "status": {"title": "Status", "type": "string"},
                "error": {"title": "Error", "type": "string"},
                "logs": {"title": "Logs", "type": "string"},
                "metrics": {"title": "Metrics", "type": "object"},
            },
        },
        "Status": {"title": "Status", "description": "An enumeration.", "enum": STATUSES, "type": "string"},
        "HTTPValidationError": {
            "title": "HTTPValidationError",
            "type": "object",
            "properties": {"detail": {"title": "Detail", "type": "array", "items": _ref("ValidationError")}},
        },
        "ValidationError": {
            "title": "ValidationError",
            "required": ["loc", "msg", "type"],
            "type": "object",
            "properties": {
                "loc": {
                    "title": "Location",
                    "type": "array",
                    "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                },
                "msg": {"title": "Message", "type": "string"},
                "type": {"title": "Error Type", "type": "string"},
            },
        },
    }


def _json_response(schema: dict, description: str = "Successful Response") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


VALIDATION_ERROR = _json_response(_ref("HTTPValidationError"), "Validation Error")


def _paths() -> dict[str, dict]:
    def plain_get(summary: str, operation_id: str) -> dict:
        return {"get": {"summary": summary, "operationId": operation_id, "responses": {"200": _json_response({})}}}

    return {
        "/": plain_get("Root", "root__get"),
        "/health-check": plain_get("Healthcheck", "healthcheck_health_check_get"),
        "/predictions": {
            "post": {
                "summary": "Predict",
                "description": "Run a single prediction on the model",
                "operationId": "predict_predictions_post",
                "requestBody": {"content": {"application/json": {"schema": _ref("PredictionRequest")}}},
                "responses": {"200": _json_response(_ref("PredictionResponse")), "422": VALIDATION_ERROR},
            }
        },
        "/predictions/{prediction_id}/cancel": {
            "post": {
                "summary": "Cancel",
                "operationId": "cancel_predictions__prediction_id__cancel_post",
                "parameters": [
                    {
                        "required": True,
                        "schema": {"title": "Prediction Id", "type": "string"},
                        "name": "prediction_id",
                        "in": "path",
                    }
                ],
                "responses": {"200": _json_response({}), "422": VALIDATION_ERROR},
            }
        },
    }


def cog_version(project: Path) -> str:
    """The Cog SDK the image runs: the `cog==` pin of the project's requirements.txt (cog.yaml's sdk_version
    equals it), else the installed one. Read from the file, so that generating the schema needs no Cog."""
    requirements = project / "requirements.txt"
    if requirements.is_file():
        if match := re.search(r"^cog==(\S+)$", requirements.read_text(), re.MULTILINE):
            return match.group(1)
    return importlib.metadata.version("cog")


def build_schema(predictor_ref: str = DEFAULT_PREDICTOR) -> dict:
    """The complete OpenAPI document for `path/to/predict.py:Class`, read statically."""
    path, _, class_name = predictor_ref.partition(":")
    predictor = read_predictor(path, class_name or "Predictor")
    schemas = input_schemas(predictor)
    envelope = {"Output": predictor.output, **_envelope_schemas()}
    if clash := sorted(schemas.keys() & envelope.keys()):
        # Cog names each choices enum after its input, so an input called e.g. "Status" would
        # silently replace the envelope's schema of the same name.
        raise StaticSchemaError(f"input names clash with Cog's schema names: {', '.join(clash)}")
    return {
        "openapi": OPENAPI_VERSION,
        # Cog writes its CLI's version here; ours is the SDK version the image runs.
        "info": {"title": "Cog", "version": cog_version(Path(path).resolve().parent)},
        "paths": _paths(),
        "components": {
            "schemas": {"Input": schemas.pop("Input"), "Output": envelope.pop("Output"), **schemas, **envelope}
        },
    }


def write_schema(ref: str = DEFAULT_PREDICTOR, out: Path = DEFAULT_OUT) -> Path:
    """Read the predictor behind `ref` and write its schema to `out`; returns `out`."""
    schema = build_schema(ref)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(schema, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sdxl_cog.schema", description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictor", default=DEFAULT_PREDICTOR, help="path.py:Class (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write it (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        out = write_schema(args.predictor, args.out)
    except StaticSchemaError as e:
        # The words `cog build` uses when its parser stops.
        sys.exit(f"ERROR: image build failed: {e}")
    print(f"wrote the OpenAPI schema of {args.predictor} to {out}", file=sys.stderr)
