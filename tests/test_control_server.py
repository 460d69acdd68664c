"""ControlNet controls and the IP-Adapter image prompt through the real Cog server (coglet), on tiny weights with the
ControlNet-Union and the IP-Adapter baked but no depth estimator (devtools/synthetic_control.add_control): a control
and an image prompt come back as images that record them; an unknown type is refused by the schema (422); a depth map
to be made without the estimator, a broken control image and a server path each fail naming the input; and the
server keeps serving after every one."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from devtools.cog_server import CogServer
from devtools.synthetic_control import add_control
from sdxl_cog.control.models import BAKES_DEPTH_ESTIMATOR
from sdxl_cog.inputs.uploads import refusal
from tests.conftest import REPO_ROOT
from tests.helpers.server import READY_TIMEOUT_S, data_uri, decode_outputs, predict_when_free

# The smallest size and fewest steps a control request runs at: every failure below happens before any denoising.
CHEAP = {"prompt": "a glass house", "width": 128, "height": 128, "num_inference_steps": 2, "seed": 5}


def edge_photo() -> bytes:
    """A photo-like image whose canny edges are two rectangles."""
    pixels = np.full((128, 128, 3), 30, np.uint8)
    pixels[20:100, 20:100] = (220, 200, 40)
    pixels[50:70, 50:70] = (20, 60, 200)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


PHOTO = data_uri(edge_photo())


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    scratch = tmp_path_factory.mktemp("control-server")
    weights = Path(shutil.copytree(tiny_weights, scratch / "weights"))
    add_control(weights, controlnets=("union",), ip_adapter=True, depth_estimator=False)
    env = {"SDXL_WEIGHTS_DIR": str(weights), "SDXL_OUTPUT_DIR": str(scratch / "outputs")}
    with CogServer(cwd=REPO_ROOT, env=env, ready_timeout=READY_TIMEOUT_S, log_path=scratch / "server.log") as running:
        yield running


def generate(server, **inputs) -> dict:
    response = predict_when_free(server, **CHEAP, **inputs)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "succeeded", body.get("error")
    return body


def failure(server, **inputs) -> str:
    """The error of a prediction that must fail, after which the server must still generate."""
    response = predict_when_free(server, **CHEAP, **inputs)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "failed", body.get("output")
    generate(server)
    return body["error"]


def parameters(body: dict) -> str:
    (image,) = decode_outputs(body)
    return image.info["parameters"]


def test_a_control_and_an_image_prompt_come_back_as_images_that_record_them(server):
    controlled = generate(
        server, controlnet_1="canny", controlnet_1_image=PHOTO, controlnet_1_conditioning_scale=0.9, controlnet_1_end=0.5
    )
    assert [image.size for image in decode_outputs(controlled)] == [(128, 128)]
    assert controlled["metrics"]["control_preprocess_time"] >= 0
    assert (
        'ControlNet 0: "Module: canny, Model: union, Weight: 0.9, Resize Mode: Crop and Resize, Guidance Start: 0.0, '
        'Guidance End: 0.5, Union Control Type: canny, Control Mode: Balanced"' in parameters(controlled)
    )

    prompted = generate(server, ip_adapter_image=PHOTO, ip_adapter_scale=0.5)
    assert 'ControlNet 0: "Module: ip-adapter, Model: ip-adapter_sdxl, Weight: 0.5' in parameters(prompted)
    assert "control_preprocess_time" not in prompted["metrics"]
    plain = generate(server)
    assert "ControlNet" not in parameters(plain)
    pixels = [np.asarray(decode_outputs(body)[0]) for body in (controlled, prompted, plain)]
    assert not np.array_equal(pixels[0], pixels[2]) and not np.array_equal(pixels[1], pixels[2])


def test_an_unknown_control_type_is_refused_by_the_schema(server):
    response = predict_when_free(server, **CHEAP, controlnet_2="scribble", controlnet_2_image=PHOTO)
    assert response.status_code == 422
    (detail,) = response.json()["detail"]
    assert detail["loc"][-1] == "controlnet_2" and "scribble" in detail["msg"]
    generate(server)


def test_a_depth_map_to_make_without_the_estimator_fails_naming_the_flag_that_bakes_it(server):
    error = failure(server, controlnet_1="depth", controlnet_1_image=PHOTO)
    assert "controlnet_1_preprocess needs a depth estimator, and none is baked into this image" in error
    assert f"script/download-weights {BAKES_DEPTH_ESTIMATOR}" in error
    # The same control with a ready map runs on the union model.
    assert "Module: none, Model: union" in parameters(
        generate(server, controlnet_1="depth", controlnet_1_image=PHOTO, controlnet_1_preprocess=False)
    )


def test_a_broken_control_image_or_a_server_path_fails_naming_the_input(server):
    truncated = data_uri(edge_photo()[:200])
    error = failure(server, controlnet_3="canny", controlnet_3_image=truncated)
    assert "controlnet_3_image could not be decoded: it is truncated or corrupt" in error
    error = failure(server, ip_adapter_image=data_uri(b"not an image at all"))
    assert "ip_adapter_image is not an image file Pillow can read" in error
    # A plain string reaches the predictor as a server path: refused like image's, whether the file exists or not.
    for field, extra in (("controlnet_1_image", {"controlnet_1": "canny"}), ("ip_adapter_image", {})):
        for path in ("/etc/hostname", "/nonexistent.png"):
            assert failure(server, **extra, **{field: path}).endswith(f"InputError: {refusal(field)}")
