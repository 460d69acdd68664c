"""ControlNet controls and the IP-Adapter image prompt through the real Cog server (coglet), and through the gateway
(real nginx) in front of it, on tiny weights with the ControlNet-Union and the IP-Adapter baked but no depth
estimator (devtools/synthetic_control.add_control): a control and an image prompt come back as images that record
them; an unknown type is refused by the schema (422); a depth map to be made without the estimator, a broken control
image and a server path each fail naming the input; the server keeps serving after every one; the gateway passes a
keyed control request and refuses URLs and paths for the new file inputs as it does for image and mask."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from devtools.cog_server import CogServer
from devtools.gateway import Gateway, nginx_available
from devtools.synthetic_control import add_control
from sdxl_cog.control.models import BAKES_DEPTH_ESTIMATOR
from sdxl_cog.inputs.uploads import refusal
from sdxl_cog.schema.openapi import build_schema
from tests.conftest import REPO_ROOT
from tests.helpers.server import PREDICT_TIMEOUT_S, READY_TIMEOUT_S, data_uri, decode_outputs, predict_when_free

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
KEY = "control-key-0123456789"
BEARER = {"Authorization": f"Bearer {KEY}"}
# High enough that no test here meets the gateway's rate limit.
UNLIMITED = {"SDXL_GATEWAY_RATE_PER_MINUTE": "60000", "SDXL_GATEWAY_BURST": "10000"}
NO_NGINX = "nginx (with libnginx-mod-http-js) and envsubst not installed"


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
        server,
        controlnet_1="canny",
        controlnet_1_image=PHOTO,
        controlnet_1_conditioning_scale=0.9,
        controlnet_1_end=0.5,
    )
    assert [image.size for image in decode_outputs(controlled)] == [(128, 128)]
    assert controlled["metrics"]["control_preprocess_time"] >= 0
    assert (
        'ControlNet 0: "Module: canny, Model: union, Weight: 0.9, Resize Mode: Crop and Resize, Guidance Start: 0.0, '
        'Guidance End: 0.5, Union Control Type: canny, Control Mode: Balanced"' in parameters(controlled)
    )

    prompted = generate(server, ip_adapter_image=PHOTO, ip_adapter_scale=0.5)
    assert 'ControlNet 0: "Module: ip-adapter_clip_g, Model: ip-adapter_sdxl, Weight: 0.5' in parameters(prompted)
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


def test_test_request_py_sends_the_control_inputs(server, tmp_path):
    photo = tmp_path / "edges.png"
    photo.write_bytes(edge_photo())
    inputs = [*(f"{name}={value}" for name, value in CHEAP.items()), "controlnet_1=lineart"]
    inputs += [f"controlnet_1_image=@{photo}", "controlnet_1_preprocess=false", "controlnet_1_conditioning_scale=1.5"]
    inputs += [f"ip_adapter_image=@{photo}", "ip_adapter_scale=0.25"]
    command = [sys.executable, str(REPO_ROOT / "test_request.py"), "--url", server.url, "--output-dir", str(tmp_path)]
    done = subprocess.run(
        [*command, *(f"--input={pair}" for pair in inputs)], capture_output=True, text=True, timeout=PREDICT_TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr
    recorded = Image.open(tmp_path / "output-0.png").info["parameters"]
    assert (
        'ControlNet 0: "Module: none, Model: union, Weight: 1.5' in recorded
        and "Union Control Type: lineart" in recorded
    )
    assert 'ControlNet 1: "Module: ip-adapter_clip_g, Model: ip-adapter_sdxl, Weight: 0.25' in recorded


# -- through the gateway ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(server):
    with Gateway(server.port, env={"SDXL_API_KEYS": KEY, **UNLIMITED}) as running:
        yield running


def through(gateway, headers=BEARER, **inputs) -> requests.Response:
    return requests.post(
        f"{gateway.url}/predictions", json={"input": {**CHEAP, **inputs}}, headers=headers, timeout=PREDICT_TIMEOUT_S
    )


@pytest.mark.gateway
@pytest.mark.skipif(not nginx_available(), reason=NO_NGINX)
def test_a_keyed_control_request_through_the_gateway_succeeds(gateway):
    assert through(gateway, headers={}, controlnet_1="canny", controlnet_1_image=PHOTO).status_code == 401
    response = through(gateway, controlnet_1="canny", controlnet_1_image=PHOTO, ip_adapter_image=PHOTO)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "succeeded", body.get("error")
    recorded = parameters(body)
    assert 'ControlNet 0: "Module: canny, Model: union' in recorded
    assert 'ControlNet 1: "Module: ip-adapter_clip_g, Model: ip-adapter_sdxl' in recorded


def file_inputs() -> list[str]:
    """The inputs predict.py's schema marks as files: the ones the gateway reads from the served schema."""
    properties = build_schema()["components"]["schemas"]["Input"]["properties"]
    return [name for name, schema in properties.items() if schema.get("format") == "uri"]


@pytest.mark.gateway
@pytest.mark.skipif(not nginx_available(), reason=NO_NGINX)
def test_the_gateway_refuses_urls_and_server_paths_for_the_control_images_as_for_image(gateway, server):
    names = file_inputs()
    assert {"controlnet_1_image", "controlnet_2_image", "controlnet_3_image", "ip_adapter_image"} < set(names)
    marker = "gateway-refused-9f3c"
    refusals = {}
    for name in names:
        for kind, value in (("url", f"https://example.com/{marker}.png"), ("path", f"/tmp/{marker}.png")):
            response = through(gateway, **{name: value})
            assert response.status_code == 400, (name, kind, response.text)
            refusals[name, kind] = response.json()["error"].replace(f'"{name}"', '"NAME"')
    for kind in ("url", "path"):
        assert len({refusals[name, kind] for name in names}) == 1, refusals  # the same words as for image
    assert "is a URL, and this server does not download URLs" in refusals["image", "url"]
    assert "must be a data: URI" in refusals["image", "path"]
    assert marker not in server.log_tail(10**7), "a refused input reached coglet"
    assert through(gateway, controlnet_2="tile", controlnet_2_image=PHOTO).json()["status"] == "succeeded"


def test_a_model_the_server_lacks_is_refused_before_the_image_is_read_and_scale_zero_needs_none(server):
    # predict.py hands build_request the baked models: the missing estimator is named, not the undecodable image.
    error = failure(server, controlnet_1="depth", controlnet_1_image=data_uri(b"not an image at all"))
    assert "controlnet_1_preprocess needs a depth estimator" in error and "controlnet_1_image" not in error
    # At scale 0 the same control runs nothing, so it needs no estimator and its image is never read.
    body = generate(
        server,
        controlnet_1="depth",
        controlnet_1_image=data_uri(b"not an image at all"),
        controlnet_1_conditioning_scale=0,
    )
    assert "ControlNet" not in parameters(body)
