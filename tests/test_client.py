"""test_request.py, run as users run it, against the real Cog server with the dummy predictor."""

import importlib.util
import json
import subprocess
import sys

import pytest
import requests
from PIL import Image

from sdxl_cog.testing.cog_server import DUMMY_PREDICTOR_REF, REPO_ROOT, CogServer, free_port

CLIENT = REPO_ROOT / "test_request.py"


def load_client():
    spec = importlib.util.spec_from_file_location("test_request_client", CLIENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


client = load_client()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("client-server")
    with CogServer(DUMMY_PREDICTOR_REF, cwd=cwd, log_path=cwd / "server.log") as server:
        yield server


def run_client(*args: str, url: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(CLIENT), "--url", url, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_saves_outputs_and_prints_metrics(server, tmp_path):
    inputs = ["-i", "width=16", "-i", "seed=7", "-i", "num_outputs=2", "-i", "apply_watermark=false"]
    done = run_client(*inputs, "--output-dir", str(tmp_path), "--logs", url=server.url)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["output-0.png", "output-1.png"]
    assert Image.open(tmp_path / "output-1.png").size == (16, 16)
    assert f"saved {tmp_path / 'output-0.png'}" in done.stdout
    assert '"seeds": [\n    7,\n    8\n  ]' in done.stdout
    assert "painted 2 image(s) with K_EULER, watermark=False" in done.stdout


def test_file_inputs_arrive(server, tmp_path):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(photo)
    done = run_client("-i", "width=8", "-i", f"image=@{photo}", "--output-dir", str(tmp_path / "out"), url=server.url)
    assert done.returncode == 0, done.stderr
    assert f'"image_bytes": {photo.stat().st_size}' in done.stdout


def test_failed_prediction_exits_with_the_error(server, tmp_path):
    done = run_client("-i", "width=8", "-i", "prompt=fail", "--output-dir", str(tmp_path), url=server.url)
    assert done.returncode == 1
    assert "prediction failed" in done.stderr and "dummy predictor failure" in done.stderr
    assert not list(tmp_path.iterdir())


def test_invalid_input_exits_with_the_detail(server, tmp_path):
    done = run_client("-i", "width=4", "-i", "scheduler=PNDM", "--output-dir", str(tmp_path), url=server.url)
    assert done.returncode == 1
    assert "HTTP 422" in done.stderr
    assert "width: 4 is less than the minimum of 8" in done.stderr
    assert 'scheduler: "PNDM" is not one of' in done.stderr


def test_health(server):
    done = run_client("--health", url=server.url)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "READY"


def test_unreachable_server_is_a_clear_error():
    done = run_client("-i", "width=8", url=f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 1
    assert "cannot connect to a Cog server" in done.stderr


def test_values_follow_the_schema_types():
    types = {
        "steps": {"type": "integer"},
        "scale": {"type": "number"},
        "refine": {"type": "boolean"},
        "prompt": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
    }
    pairs = ["steps=30", "scale=7", "refine=False", "prompt=42", "tags=a", "tags=b", "extra=[1, 2]", "word=hi"]
    assert client.build_input(pairs, types) == {
        "steps": 30,
        "scale": 7.0,
        "refine": False,
        "prompt": "42",
        "tags": ["a", "b"],
        "extra": [1, 2],
        "word": "hi",
    }
    with pytest.raises(client.RequestError, match="steps='many' is not a valid integer"):
        client.build_input(["steps=many"], types)


def test_file_values_become_data_uris(tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff\xd8jpeg")
    assert client.coerce("image", f"@{photo}", {"type": "string"}) == "data:image/jpeg;base64,/9hqcGVn"
    with pytest.raises(client.RequestError, match="input file not found"):
        client.coerce("image", "@missing.png", None)


def test_busy_server_is_an_error():
    response = requests.Response()
    response.status_code = 409
    response._content = b"At capacity - all prediction slots busy"
    with pytest.raises(client.RequestError, match="server busy \\(HTTP 409\\): At capacity"):
        client.check_response(response)
