"""Choosing the checkpoint per request through the real Cog server, with four tiny models baked (one turbo)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from devtools.cog_server import CogServer
from devtools.synthetic import TURBO_PROFILE, add_model
from tests.conftest import REPO_ROOT
from tests.helpers.server import READY_TIMEOUT_S, decode_outputs
from tests.helpers.server import predict_when_free as predict


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    scratch = tmp_path_factory.mktemp("models-server")
    weights = Path(shutil.copytree(tiny_weights, scratch / "weights"))
    add_model(weights, "anime", seed=1)
    add_model(weights, "photo", seed=2)
    add_model(weights, "turbo", seed=3, profile=TURBO_PROFILE)
    env = {"SDXL_WEIGHTS_DIR": str(weights), "SDXL_OUTPUT_DIR": str(scratch / "outputs")}
    with CogServer(cwd=REPO_ROOT, env=env, ready_timeout=READY_TIMEOUT_S, log_path=scratch / "server.log") as running:
        yield running


def _generate(server, **inputs):
    body = predict(server, prompt="a castle", width=256, height=256, num_inference_steps=2, seed=3, **inputs).json()
    assert body["status"] == "succeeded", body.get("error")
    return body


def test_the_model_input_picks_the_checkpoint_and_leaving_it_out_picks_the_first(server):
    default = _generate(server)
    first = _generate(server, model="sdxl-base")
    anime = _generate(server, model="anime")
    assert default["metrics"]["model"] == "sdxl-base" and anime["metrics"]["model"] == "anime"
    assert decode_outputs(default)[0].tobytes() == decode_outputs(first)[0].tobytes()
    assert decode_outputs(anime)[0].tobytes() != decode_outputs(first)[0].tobytes()
    # Everything fits (no GPU budget on CPU): no request paid for a load.
    assert not any("model_load_time" in b["metrics"] for b in (default, first, anime))


def test_an_unknown_model_fails_listing_the_baked_ones_and_the_server_keeps_serving(server):
    body = predict(server, prompt="x", model="sdxl-turbo", num_inference_steps=1).json()
    assert body["status"] == "failed"
    assert "model='sdxl-turbo' is not in this image; it has: sdxl-base, anime, photo, turbo." in body["error"]
    assert _generate(server, model="photo")["metrics"]["model"] == "photo"


def test_the_turbo_profile_fills_left_out_inputs_and_the_response_says_so(server):
    body = predict(server, prompt="a castle", model="turbo", seed=3).json()
    assert body["status"] == "succeeded", body.get("error")
    assert [img.size for img in decode_outputs(body)] == [(512, 512)]
    defaults = {"num_inference_steps": 1, "guidance_scale": 0.0, "width": 512, "height": 512}
    assert body["metrics"]["model_defaults"] == defaults
    assert body["metrics"]["base_steps"] == 1 and "base: step 1/1 (t=999)" in body["logs"]
    # guidance_scale 0 passes the schema's bounds; an explicit value is the user's, not a default.
    body = predict(server, prompt="a castle", model="turbo", guidance_scale=0, num_inference_steps=2, seed=3).json()
    assert body["status"] == "succeeded", body.get("error")
    assert body["metrics"]["model_defaults"] == {"width": 512, "height": 512}
