"""Generate the OpenAPI schema that `cog build` bakes into the image as `.cog/openapi_schema.json`.

coglet validates request inputs only when that file exists in its working directory, so every
launch path that bypasses `cog build` (script/serve, the tests) must write it first:

    python -m sdxl_cog.schema [--predictor predict.py:Predictor] [--out .cog/openapi_schema.json]

The predictor is introspected with Cog's own inspector (the module is imported, setup() is not
run) and the document follows the shape of Cog's generator (pkg/schema/openapi_spec.go): inputs
as `components.schemas.Input` with `x-order`, choices as a separate enum schema named after the
input and referenced through `allOf`, optionals as `nullable` with a null default.
"""

import argparse
import importlib.util
import inspect
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from cog import _adt as adt
from cog import _inspector
from cog.input import FieldInfo

DEFAULT_PREDICTOR = "predict.py:Predictor"
DEFAULT_OUT = Path(".cog/openapi_schema.json")
OPENAPI_VERSION = "3.0.2"
WEBHOOK_EVENTS = ["start", "output", "logs", "completed"]
STATUSES = ["starting", "processing", "succeeded", "canceled", "failed"]

_OPTIONAL = (adt.Repetition.OPTIONAL, adt.Repetition.OPTIONAL_REPEATED)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _title(name: str) -> str:
    return name.replace("_", " ").title()


def _number(value: float) -> int | float:
    """The inspector turns every ge/le into a float; write 1.0 as 1, as Cog's Go generator does."""
    return int(value) if float(value).is_integer() else value


def load_predictor(ref: str) -> tuple[adt.PredictorInfo, Any]:
    """Import `path/to/file.py:Class` the way coglet does (setup() is not run) and inspect it."""
    path, _, class_name = ref.partition(":")
    module_name = Path(path).stem
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load a predictor module from {path!r} (predictor ref {ref!r})")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    class_name = class_name or ("Runner" if hasattr(module, "Runner") else "Predictor")
    with warnings.catch_warnings():
        # BasePredictor/predict() still work; their deprecation warnings are noise here.
        warnings.simplefilter("ignore", DeprecationWarning)
        info = _inspector.create_predictor(module_name, class_name)
    return info, getattr(module, class_name)


def _accepts(predictor: Any) -> dict[str, str]:
    """`Input(accept=...)` per input name: the inspector drops it, Cog writes it as x-cog-accept."""
    methods = [predictor]
    if inspect.isclass(predictor):
        methods = [getattr(predictor, name) for name in ("run", "predict") if hasattr(predictor, name)]
    return {
        name: param.default.accept
        for method in methods
        for name, param in inspect.signature(method).parameters.items()
        if isinstance(param.default, FieldInfo) and param.default.accept
    }


def _input_property(field: adt.InputField, accept: str | None) -> tuple[dict, dict | None]:
    """One property of the Input schema, plus the enum schema its choices need (if any)."""
    prop: dict[str, Any] = {"x-order": field.order}
    enum = None
    if field.choices:
        enum = {
            "title": field.name,
            "description": "An enumeration.",
            "enum": list(field.choices),
            "type": field.type.primitive.json_type()["type"],
        }
        prop["allOf"] = [_ref(field.name)]
    else:
        prop["title"] = _title(field.name)
        prop.update(field.type.json_type())

    # `seed: int = Input(default=None)` is required in Cog: a None default only makes an input
    # optional when its type is `X | None`. A Secret with a None default is Cog's one exception.
    nullable = field.type.repetition in _OPTIONAL or (
        field.type.primitive is adt.PrimitiveType.SECRET and field.default is None
    )
    if nullable:
        prop["default"] = None
        prop["nullable"] = True
    elif field.default is not None:
        prop["default"] = field.type.json_encode(field.default)

    constraints = {
        "description": field.description,
        "minimum": None if field.ge is None else _number(field.ge),
        "maximum": None if field.le is None else _number(field.le),
        "minLength": field.min_length,
        "maxLength": field.max_length,
        "pattern": field.regex,
        "deprecated": field.deprecated or None,
        "x-cog-accept": accept,
    }
    prop.update({key: value for key, value in constraints.items() if value is not None})
    return prop, enum


def input_schemas(info: adt.PredictorInfo, predictor: Any = None) -> dict[str, dict]:
    """`Input` and one enum schema per input with choices, keyed by component name."""
    accepts = _accepts(predictor) if predictor is not None else {}
    properties, required, enums = {}, [], {}
    for field in sorted(info.inputs.values(), key=lambda f: f.order):
        properties[field.name], enum = _input_property(field, accepts.get(field.name))
        if enum is not None:
            enums[field.name] = enum
        if "default" not in properties[field.name]:
            required.append(field.name)
    schema: dict[str, Any] = {"title": "Input", "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return {"Input": schema, **enums}


def _api_schemas() -> dict[str, dict]:
    """The request/response envelope coglet speaks, independent of the predictor."""
    date_time = {"type": "string", "format": "date-time"}
    return {
        "PredictionRequest": {
            "title": "PredictionRequest",
            "type": "object",
            "properties": {
                "id": {"title": "Id", "type": "string"},
                "input": _ref("Input"),
                "webhook": {"title": "Webhook", "type": "string", "format": "uri"},
                "webhook_events_filter": {
                    "type": "array",
                    "items": _ref("WebhookEvent"),
                    "default": WEBHOOK_EVENTS,
                },
                "context": {"title": "Context", "type": "object"},
            },
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
                "status": _ref("Status"),
                "error": {"title": "Error", "type": "string"},
                "logs": {"title": "Logs", "type": "string", "default": ""},
                "metrics": {"title": "Metrics", "type": "object"},
            },
        },
        "Status": _enum("Status", STATUSES),
        "WebhookEvent": _enum("WebhookEvent", WEBHOOK_EVENTS),
        "HTTPValidationError": {
            "title": "HTTPValidationError",
            "type": "object",
            "properties": {"detail": {"title": "Detail", "type": "array", "items": _ref("ValidationError")}},
        },
        "ValidationError": {
            "title": "ValidationError",
            "type": "object",
            "required": ["loc", "msg", "type"],
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


def _enum(name: str, values: list[str]) -> dict:
    return {"title": name, "description": "An enumeration.", "enum": values, "type": "string"}


def _json_response(schema: dict, description: str = "Successful Response") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _operation(summary: str, operation_id: str, response: dict, **extra: Any) -> dict:
    responses = {"200": _json_response(response)}
    if extra.get("requestBody") or extra.get("parameters"):
        responses["422"] = _json_response(_ref("HTTPValidationError"), "Validation Error")
    return {"summary": summary, "operationId": operation_id, **extra, "responses": responses}


def _paths() -> dict[str, dict]:
    prediction_id = {
        "name": "prediction_id",
        "in": "path",
        "required": True,
        "schema": {"title": "Prediction ID", "type": "string"},
    }
    prefer = {"name": "prefer", "in": "header", "required": False, "schema": {"type": "string"}}
    request_body = {"content": {"application/json": {"schema": _ref("PredictionRequest")}}}
    response = _ref("PredictionResponse")
    return {
        "/": {"get": _operation("Root", "root__get", {})},
        "/health-check": {"get": _operation("Healthcheck", "healthcheck_health_check_get", {})},
        "/predictions": {
            "post": _operation(
                "Predict",
                "predict_predictions_post",
                response,
                description="Run a single prediction on the model",
                parameters=[prefer],
                requestBody=request_body,
            )
        },
        "/predictions/{prediction_id}": {
            "put": _operation(
                "Predict Idempotent",
                "predict_idempotent_predictions__prediction_id__put",
                response,
                description="Run a single prediction on the model (idempotent creation).",
                parameters=[prediction_id, prefer],
                requestBody={**request_body, "required": True},
            )
        },
        "/predictions/{prediction_id}/cancel": {
            "post": _operation(
                "Cancel",
                "cancel_predictions__prediction_id__cancel_post",
                {},
                parameters=[prediction_id],
            )
        },
        "/shutdown": {"post": _operation("Start Shutdown", "start_shutdown_shutdown_post", {})},
    }


def build_schema(info: adt.PredictorInfo, predictor: Any = None) -> dict:
    """The complete OpenAPI document for a predictor."""
    schemas = input_schemas(info, predictor)
    fixed = {"Output": info.output.json_type(), **_api_schemas()}
    if clash := sorted(schemas.keys() & fixed.keys()):
        # Cog names each choices enum after its input, so an input called e.g. "Status" would
        # silently replace the envelope's schema of the same name.
        raise ValueError(f"input names clash with Cog's schema names: {', '.join(clash)}")
    schemas.update(fixed)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": _paths(),
        "components": {"schemas": schemas},
    }


def write_schema(ref: str = DEFAULT_PREDICTOR, out: Path = DEFAULT_OUT) -> Path:
    """Inspect the predictor behind `ref` and write its schema to `out`; returns `out`."""
    schema = build_schema(*load_predictor(ref))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(schema, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictor", default=DEFAULT_PREDICTOR, help="path.py:Class")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the schema")
    args = parser.parse_args(argv)
    out = write_schema(args.predictor, args.out)
    print(f"wrote the OpenAPI schema of {args.predictor} to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
