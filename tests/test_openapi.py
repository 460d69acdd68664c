"""The generated `.cog/openapi_schema.json`: its shape, and what the real coglet server does with it."""

import base64
import io
import json
import subprocess
import sys
import textwrap

import pytest
import requests
from PIL import Image

from sdxl_cog.schema import openapi
from sdxl_cog.testing.cog_server import DUMMY_PREDICTOR_REF, REPO_ROOT, CogServer


@pytest.fixture(scope="module")
def schema():
    return openapi.build_schema(*openapi.load_predictor(DUMMY_PREDICTOR_REF))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # A scratch working directory: the server reads (and we write) .cog/openapi_schema.json there.
    cwd = tmp_path_factory.mktemp("openapi-server")
    with CogServer(DUMMY_PREDICTOR_REF, cwd=cwd, log_path=cwd / "server.log") as server:
        yield server


def test_required_optional_and_defaults(schema):
    inputs = schema["components"]["schemas"]["Input"]
    assert inputs["required"] == ["width"]
    props = inputs["properties"]
    assert props["prompt"]["default"] == "a red square"
    assert props["seed"] == {
        "x-order": 2,
        "title": "Seed",
        "type": "integer",
        "default": None,
        "nullable": True,
        "description": "Random seed; leave blank to randomize",
    }
    assert props["image"]["format"] == "uri" and props["image"]["nullable"] is True
    assert props["apply_watermark"]["type"] == "boolean" and props["apply_watermark"]["default"] is True


def test_order_follows_the_signature(schema):
    props = schema["components"]["schemas"]["Input"]["properties"]
    orders = [props[name]["x-order"] for name in props]
    assert orders == list(range(len(props)))
    assert list(props)[:3] == ["width", "prompt", "seed"]


def test_bounds(schema):
    props = schema["components"]["schemas"]["Input"]["properties"]
    assert (props["width"]["minimum"], props["width"]["maximum"]) == (8, 64)
    assert (props["num_outputs"]["minimum"], props["num_outputs"]["maximum"]) == (1, 4)
    assert (props["guidance_scale"]["minimum"], props["guidance_scale"]["maximum"]) == (0, 20)
    assert props["guidance_scale"]["type"] == "number"


def test_choices_are_a_referenced_enum(schema):
    schemas = schema["components"]["schemas"]
    scheduler = schemas["Input"]["properties"]["scheduler"]
    assert scheduler["allOf"] == [{"$ref": "#/components/schemas/scheduler"}]
    assert scheduler["default"] == "K_EULER" and "type" not in scheduler
    assert schemas["scheduler"]["enum"] == ["K_EULER", "DDIM", "DPMSolverMultistep"]
    assert schemas["scheduler"]["type"] == "string"


def test_output_and_envelope(schema):
    schemas = schema["components"]["schemas"]
    assert schemas["Output"] == {"title": "Output", "type": "array", "items": {"type": "string", "format": "uri"}}
    assert schemas["PredictionRequest"]["properties"]["input"] == {"$ref": "#/components/schemas/Input"}
    assert schemas["PredictionResponse"]["properties"]["status"] == {"$ref": "#/components/schemas/Status"}
    assert schemas["WebhookEvent"]["enum"] == ["start", "output", "logs", "completed"]
    assert set(schema["paths"]) == {
        "/",
        "/health-check",
        "/predictions",
        "/predictions/{prediction_id}",
        "/predictions/{prediction_id}/cancel",
        "/shutdown",
    }


OTHER_TYPES = """
from cog import BasePredictor, Input, Path, Secret

class Predictor(BasePredictor):
    def setup(self) -> None:
        raise RuntimeError("setup must not run while generating the schema")

    def predict(
        self,
        tags: list[str] = Input(description="Tags"),
        files: list[Path] | None = Input(default=None),
        code: str = Input(default="ab", min_length=2, max_length=8, regex="^[a-z]+$"),
        steps: int = Input(default=20, choices=[10, 20, 30]),
        style: str = Input(default="a", accept="image/*", deprecated=True),
        token: Secret = Input(default=None),
        ratio: float = 1.5,
    ) -> Path:
        raise NotImplementedError
"""


def test_other_input_types_without_running_setup(tmp_path):
    module = tmp_path / "other_types_predictor.py"
    module.write_text(textwrap.dedent(OTHER_TYPES))
    schemas = openapi.build_schema(*openapi.load_predictor(f"{module}:Predictor"))["components"]["schemas"]
    props = schemas["Input"]["properties"]
    assert schemas["Input"]["required"] == ["tags"]
    assert props["tags"]["type"] == "array" and props["tags"]["items"] == {"type": "string"}
    assert props["files"]["items"]["format"] == "uri" and props["files"]["nullable"] is True
    assert (props["code"]["minLength"], props["code"]["maxLength"], props["code"]["pattern"]) == (2, 8, "^[a-z]+$")
    assert schemas["steps"] == {
        "title": "steps",
        "description": "An enumeration.",
        "enum": [10, 20, 30],
        "type": "integer",
    }
    assert props["style"]["x-cog-accept"] == "image/*" and props["style"]["deprecated"] is True
    assert props["token"]["format"] == "password" and props["token"]["nullable"] is True
    assert props["ratio"]["default"] == 1.5
    assert schemas["Output"] == {"title": "Output", "type": "string", "format": "uri"}


def test_cli_writes_the_schema(tmp_path, schema):
    out = tmp_path / ".cog" / "openapi_schema.json"
    command = [sys.executable, "-m", "sdxl_cog.schema", "--predictor", DUMMY_PREDICTOR_REF, "--out", str(out)]
    subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True)
    assert json.loads(out.read_text()) == schema


def test_server_serves_the_generated_schema(server):
    served = requests.get(f"{server.url}/openapi.json", timeout=5).json()
    assert served == json.loads((server.cwd / ".cog/openapi_schema.json").read_text())


@pytest.mark.parametrize(
    "input, field, message",
    [
        ({"width": "16"}, "width", "is not of type"),
        ({"width": 4}, "width", "less than the minimum of 8"),
        ({"width": 16, "guidance_scale": 20.5}, "guidance_scale", "greater than the maximum of 20"),
        ({"width": 16, "scheduler": "PNDM"}, "scheduler", "is not one of"),
        ({"width": 16, "apply_watermark": "yes"}, "apply_watermark", "is not of type"),
        ({"prompt": "no width"}, "width", "Field required"),
        # coglet's validator reads JSON Schema, where `nullable` means nothing: omit optional inputs.
        ({"width": 16, "seed": None}, "seed", "null is not of type"),
    ],
)
def test_server_rejects_invalid_input_naming_the_field(server, input, field, message):
    response = server.post_prediction(input)
    assert response.status_code == 422, response.text
    [detail] = response.json()["detail"]
    assert detail["loc"] == ["body", "input", field]
    assert message in detail["msg"]


def test_server_runs_a_valid_prediction(server):
    response = server.post_prediction({"width": 16, "seed": 300, "guidance_scale": 2.5, "scheduler": "DDIM"})
    prediction = response.json()
    assert prediction["status"] == "succeeded", prediction
    [uri] = prediction["output"]
    assert uri.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert image.size == (16, 16)
    assert image.getpixel((0, 0)) == (25, 300 % 256, 0)
    assert prediction["metrics"]["seeds"] == [300]
