"""The generated `.cog/openapi_schema.json`: read from predict.py's source by Cog's static rules, equal to what
predict.py declares at run time, in step with the engine, and what the real coglet server does with it."""

import base64
import importlib.util
import inspect
import io
import json
import re
import subprocess
import sys
import textwrap
import types
import typing
from pathlib import Path

import cog
import pytest
import requests
from cog.input import FieldInfo
from PIL import Image

from devtools.cog_server import DUMMY_PREDICTOR_REF, REPO_ROOT, CogServer, CogServerError
from sdxl_cog import config
from sdxl_cog.generation.schedulers import SCHEDULERS
from sdxl_cog.inputs.control import NO_CONTROL
from sdxl_cog.inputs.request import REFINE_MODES
from sdxl_cog.outputs.formats import OUTPUT_FORMATS
from sdxl_cog.schema import openapi
from sdxl_cog.schema.static_reader import StaticSchemaError
from sdxl_cog.weights.control_types import CONTROL_TYPES
from sdxl_cog.weights.profiles import SDXL_SIDE

PREDICTORS = {"predict.py": f"{REPO_ROOT / 'predict.py'}:Predictor", "dummy": DUMMY_PREDICTOR_REF}
# JSON Schema of each type an input may have, from the runtime annotation.
RUNTIME_TYPES = {
    str: {"type": "string"},
    int: {"type": "integer"},
    float: {"type": "number"},
    bool: {"type": "boolean"},
    cog.Path: {"type": "string", "format": "uri"},
}


def import_predictor(ref: str):
    path, _, class_name = ref.partition(":")
    spec = importlib.util.spec_from_file_location(f"predictor_under_test_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, class_name)


def declared_inputs(ref: str) -> dict[str, dict]:
    """What predict() declares at run time (Python's own view of the signature), in the schema's terms."""
    predictor = import_predictor(ref)
    declared = {}
    for order, param in enumerate(list(inspect.signature(predictor.predict).parameters.values())[1:]):
        annotation, nullable = param.annotation, False
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            nullable, [annotation] = len(members) < len(typing.get_args(annotation)), members
        field = param.default if isinstance(param.default, FieldInfo) else FieldInfo(default=param.default)
        default = field.default
        has_default = default is not inspect.Parameter.empty and (default is not None or nullable)
        declared[param.name] = {
            "x-order": order,
            "type": RUNTIME_TYPES[annotation],
            "default": default if has_default else "<none>",
            "required": not has_default,
            "nullable": nullable,
            "description": field.description,
            "minimum": field.ge,
            "maximum": field.le,
            "maxLength": field.max_length,
            "enum": field.choices,
        }
    return declared


def generated_inputs(schema: dict) -> dict[str, dict]:
    """The same facts, read back from the generated document."""
    schemas = schema["components"]["schemas"]
    generated = {}
    for name, prop in schema["components"]["schemas"]["Input"]["properties"].items():
        enum = schemas[prop["allOf"][0]["$ref"].rsplit("/", 1)[1]] if "allOf" in prop else None
        type_schema = {"type": enum["type"]} if enum else {k: prop[k] for k in ("type", "format") if k in prop}
        generated[name] = {
            "x-order": prop["x-order"],
            "type": type_schema,
            "default": prop.get("default", "<none>"),
            "required": name in schemas["Input"].get("required", []),
            "nullable": prop.get("nullable", False),
            "description": prop.get("description"),
            "minimum": prop.get("minimum"),
            "maximum": prop.get("maximum"),
            "maxLength": prop.get("maxLength"),
            "enum": enum["enum"] if enum else None,
        }
    return generated


@pytest.fixture(scope="module", params=list(PREDICTORS))
def predictor_ref(request):
    return PREDICTORS[request.param]


def test_generated_schema_equals_the_runtime_declaration_field_by_field(predictor_ref):
    declared = declared_inputs(predictor_ref)
    generated = generated_inputs(openapi.build_schema(predictor_ref))
    assert list(generated) == list(declared)
    for name in declared:
        for key, value in declared[name].items():
            assert generated[name][key] == value, f"{name}.{key}: schema {generated[name][key]!r}, predict.py {value!r}"


def test_predict_py_declares_every_bound_and_default():
    """The inputs Cog's parser once lost: nothing required but nothing, every number bounded."""
    inputs = openapi.build_schema(PREDICTORS["predict.py"])["components"]["schemas"]["Input"]
    assert "required" not in inputs
    for name, prop in inputs["properties"].items():
        if prop.get("type") in ("integer", "number"):
            assert "minimum" in prop and "maximum" in prop, name
        assert prop.get("description"), name


def test_engine_constants_match_predict_py():
    """One source of truth: the engine's copies of predict.py's values cannot drift from it."""
    schema = openapi.build_schema(PREDICTORS["predict.py"])["components"]["schemas"]
    props = schema["Input"]["properties"]
    for side in ("width", "height"):
        assert (props[side]["minimum"], props[side]["maximum"]) == (config.MIN_SIDE, config.MAX_SIDE)
        assert f"Default {SDXL_SIDE} " in props[side]["description"]
        assert f"multiple of {config.SIDE_MULTIPLE}." in props[side]["description"]
    assert props["seed"]["maximum"] == config.MAX_SEED
    assert props["num_outputs"]["maximum"] == config.MAX_OUTPUTS
    for prompt in ("prompt", "negative_prompt"):
        assert props[prompt]["maxLength"] == config.MAX_PROMPT_CHARS
        assert f"Up to {config.MAX_PROMPT_TOKENS} tokens" in props[prompt]["description"]
    assert props["high_noise_frac"]["default"] == config.DEFAULT_HIGH_NOISE_FRAC
    assert props["output_quality"]["default"] == config.DEFAULT_OUTPUT_QUALITY
    assert schema["scheduler"]["enum"] == list(SCHEDULERS)
    assert schema["refine"]["enum"] == REFINE_MODES
    assert schema["output_format"]["enum"] == OUTPUT_FORMATS
    for slot in (1, 2, 3):
        assert schema[f"controlnet_{slot}"]["enum"] == [NO_CONTROL, *CONTROL_TYPES]
        assert props[f"controlnet_{slot}"]["default"] == NO_CONTROL


def test_required_optional_and_defaults():
    schema = openapi.build_schema(DUMMY_PREDICTOR_REF)
    inputs = schema["components"]["schemas"]["Input"]
    assert inputs["required"] == ["width"]
    assert inputs["properties"]["seed"] == {
        "x-order": 2,
        "title": "Seed",
        "type": "integer",
        "default": None,
        "nullable": True,
        "description": "Random seed; leave blank to randomize",
    }


def test_envelope_is_cogs():
    schema = openapi.build_schema(DUMMY_PREDICTOR_REF)
    schemas = schema["components"]["schemas"]
    assert schemas["Output"] == {"title": "Output", "type": "array", "items": {"type": "string", "format": "uri"}}
    assert schemas["PredictionRequest"]["properties"]["input"] == {"$ref": "#/components/schemas/Input"}
    assert set(schema["paths"]) == {"/", "/health-check", "/predictions", "/predictions/{prediction_id}/cancel"}
    assert schema["info"]["version"] == cog.__version__


RULES = """
from typing import Optional
from cog import BasePredictor, Input as In, Path, Secret

SIZES = {"small": 512, "large": 1024}
EXTRA = ["huge"]
DESCRIPTION = "Tags to add"
FIVE = 5

class Predictor(BasePredictor):
    def setup(self) -> None:
        raise RuntimeError("setup must not run while generating the schema")

    def predict(
        self,
        tags: list[str] = In(description=DESCRIPTION),
        files: Optional[list[Path]] = In(default=None),
        code: str = In(default="ab", min_length=2, max_length=8, regex="^[a-z]+$"),
        size: str = In(default="small", choices=list(SIZES.keys()) + EXTRA),
        steps: int = In(default=FIVE, choices=[5, 10], ge=-1, le=1e3),
        style: Path = In(accept="image/*", deprecated=True),
        token: Secret = In(default=None),
        ratio: float = 1.5,
        raw: str = r"a\\b",
    ) -> Path:
        raise NotImplementedError
"""


def test_cogs_static_rules(tmp_path):
    (tmp_path / "predict.py").write_text(textwrap.dedent(RULES))
    schemas = openapi.build_schema(f"{tmp_path / 'predict.py'}:Predictor")["components"]["schemas"]
    props = schemas["Input"]["properties"]
    assert schemas["Input"]["required"] == ["tags", "style"]
    assert props["tags"]["items"] == {"type": "string"} and props["tags"]["description"] == "Tags to add"
    assert props["files"]["items"]["format"] == "uri" and props["files"]["nullable"] is True
    assert (props["code"]["minLength"], props["code"]["maxLength"], props["code"]["pattern"]) == (2, 8, "^[a-z]+$")
    assert schemas["size"]["enum"] == ["small", "large", "huge"]
    assert schemas["steps"] == {"title": "steps", "description": "An enumeration.", "enum": [5, 10], "type": "integer"}
    assert (props["steps"]["default"], props["steps"]["minimum"], props["steps"]["maximum"]) == (5, -1, 1000)
    assert props["style"]["x-cog-accept"] == "image/*" and props["style"]["deprecated"] is True
    assert props["token"]["format"] == "password" and props["token"]["nullable"] is True
    assert props["ratio"]["default"] == 1.5
    assert props["raw"]["default"] == "a\\b"
    assert schemas["Output"] == {"title": "Output", "type": "string", "format": "uri"}


UNREADABLE = """
from cog import BasePredictor, Input
import choices_elsewhere as c

NAME = "fixed"

class Predictor(BasePredictor):
    def predict(self, value: {annotation} = Input({argument})) -> str:
        return ""
"""


@pytest.mark.parametrize(
    "annotation, argument, message",
    [
        # What Cog's own parser stops on, in its words.
        ("str", "choices=sorted(c.NAMES)", "parameter 'value': choices expression cannot be statically resolved"),
        ("str", "choices=c.NAMES", "parameter 'value': choices expression cannot be statically resolved"),
        ("str", "default_factory=list", "default_factory is not supported in static schema generation"),
        # What Cog would silently lose: refused here, naming the argument.
        ("str", "default=c.DEFAULT", "default=`c.DEFAULT` cannot be statically resolved"),
        ("int", "default=1, le=c.MAX", "le=`c.MAX` cannot be statically resolved"),
        ("int", "default=1, ge=NAME", "ge=`NAME` cannot be statically resolved"),
        ("int", "default=1, le=2**32 - 1", "le=`2**32 - 1` cannot be statically resolved"),
        ("str", 'description=f"{NAME}"', "Cog drops f-strings"),
        ("str", 'description="two" " parts"', "verbatim"),
        ("str", 'description="tab\\there"', "verbatim"),
        ("str", '"positional"', "keyword arguments only"),
        ("str", "default=1, maximum=3", "Input() has no argument 'maximum'"),
    ],
)
def test_unreadable_inputs_fail_generation(tmp_path, annotation, argument, message):
    (tmp_path / "predict.py").write_text(UNREADABLE.format(annotation=annotation, argument=argument))
    with pytest.raises(StaticSchemaError, match=re.escape(message)):
        openapi.build_schema(f"{tmp_path / 'predict.py'}:Predictor")


def test_an_unreadable_predictor_stops_every_launch_path(tmp_path):
    """script/serve, the Dockerfile and the test harness all run `python -m sdxl_cog.schema`."""
    (tmp_path / "predict.py").write_text(UNREADABLE.format(annotation="str", argument="choices=c.NAMES"))
    command = [sys.executable, "-m", "sdxl_cog.schema", "--predictor", "predict.py:Predictor"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode != 0
    assert "image build failed: parameter 'value': choices expression cannot be statically resolved" in done.stderr
    assert not (tmp_path / ".cog").exists()
    with pytest.raises(CogServerError, match="choices expression cannot be statically resolved"):
        CogServer("predict.py:Predictor", cwd=tmp_path).start()


def test_the_schema_is_read_without_importing_the_predictor(tmp_path):
    (tmp_path / "predict.py").write_text("import module_that_does_not_exist\n" + textwrap.dedent(RULES))
    assert openapi.build_schema(f"{tmp_path / 'predict.py'}:Predictor")["components"]["schemas"]["Input"]


def test_cli_writes_the_schema(tmp_path):
    out = tmp_path / ".cog" / "openapi_schema.json"
    command = [sys.executable, "-m", "sdxl_cog.schema", "--predictor", DUMMY_PREDICTOR_REF, "--out", str(out)]
    subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True)
    assert json.loads(out.read_text()) == openapi.build_schema(DUMMY_PREDICTOR_REF)


# --- What the real coglet server does with it ------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # A scratch working directory: the server reads (and the harness writes) .cog/openapi_schema.json there.
    cwd = tmp_path_factory.mktemp("openapi-server")
    with CogServer(DUMMY_PREDICTOR_REF, cwd=cwd, log_path=cwd / "server.log") as server:
        yield server


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
