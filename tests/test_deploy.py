"""deploy/: the manifests validate offline against the Kubernetes and KServe schemas, say what the
issue asks of them (one GPU, /dev/shm, probes, concurrency 1, autoscaling on in-flight requests),
and their probe commands give the right answer in each state of a real Cog server."""

import json
import threading
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import requests

from devtools.cog_server import REPO_ROOT, CogServer, free_port
from tests.helpers.deploy import (
    FIXTURES,
    IMAGE_ROOT,
    K8S_VERSIONS,
    by_kind,
    documents,
    drain_command,
    model_container,
    pod_specs,
    probe,
    run_probe,
)
from tests.helpers.kserve_schema import inference_service_schema

SHM_BYTES = 6 * 2**30
PROBE_KINDS = ("startupProbe", "readinessProbe", "livenessProbe")
SERVER_START_S = 60


def parse_gib(quantity: str) -> int:
    assert quantity.endswith("Gi"), quantity
    return int(quantity[:-2]) * 2**30


# -- offline schema validation ---------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_match_the_kubernetes_schema(version):
    docs = documents("kubernetes.yaml")
    assert sorted(doc["kind"] for doc in docs) == ["Deployment", "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_schema_check_is_strict():
    deployment = by_kind("kubernetes.yaml")["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kserve_manifest_matches_the_inferenceservice_schema(version):
    (isvc,) = documents("kserve.yaml")
    jsonschema.validate(isvc, inference_service_schema(version))


@pytest.mark.parametrize(
    "path, value",
    [
        (("spec", "predictor", "containerConcurency"), 1),  # misspelt field
        (("spec", "predictor", "scaleMetric"), "gpu"),  # not in the enum
        (("spec", "predictor", "containers", 0, "resources", "limit"), {}),  # core/v1 Container is strict too
    ],
)
def test_kserve_schema_check_is_strict(path, value):
    (isvc,) = documents("kserve.yaml")
    target = isvc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(isvc, inference_service_schema(K8S_VERSIONS[-1]))


# -- what the manifests must say --------------------------------------------------------------------


@pytest.mark.parametrize("manifest", ["kubernetes", "kserve"])
def test_one_gpu_per_pod_and_a_6g_shm(manifest):
    spec = pod_specs()[manifest]
    container = model_container(spec)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (shm,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert parse_gib(shm["emptyDir"]["sizeLimit"]) == SHM_BYTES


@pytest.mark.parametrize("manifest", ["kubernetes", "kserve"])
def test_the_compile_cache_is_a_volume_of_the_model_container_alone(manifest):
    """SDXL_COMPILE_CACHE_DIR outlives a restart of the container, and no other container can write code there."""
    spec = pod_specs()[manifest]
    container = model_container(spec)
    (directory,) = [e["value"] for e in container["env"] if e["name"] == "SDXL_COMPILE_CACHE_DIR"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == directory]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume and volume["emptyDir"].get("medium") != "Memory"  # on disk, not counted as RAM
    others = [c for c in spec["containers"] if c is not container]
    assert not any(m["name"] == volume["name"] for c in others for m in c.get("volumeMounts", []))
    assert "SDXL_COMPILE" not in {e["name"] for e in container["env"]}  # off until measured (README)


@pytest.mark.parametrize("manifest", ["kubernetes", "kserve"])
def test_probes_run_the_probe_script_in_the_image(manifest):
    container = model_container(pod_specs()[manifest])
    for kind in PROBE_KINDS:
        command = container[kind]["exec"]["command"]
        assert command[:2] == ["python", IMAGE_ROOT + "deploy/probe.py"], (manifest, kind)
        # The script must answer within the probe's timeout: it gives up on the server before that.
        assert container[kind]["timeoutSeconds"] > probe.REQUEST_TIMEOUT_S
    assert container["livenessProbe"]["exec"]["command"][2] == "live"
    assert container["startupProbe"]["exec"]["command"][2] == "started"


def test_kubernetes_readiness_passes_only_on_ready_and_the_service_reaches_the_pods():
    kinds = by_kind("kubernetes.yaml")
    pod = kinds["Deployment"]["spec"]["template"]
    container = model_container(pod["spec"])
    assert container["readinessProbe"]["exec"]["command"][2] == "ready"
    assert probe.PASSING_STATUSES["ready"] == {"READY"}
    service = kinds["Service"]["spec"]
    assert service["selector"].items() <= pod["metadata"]["labels"].items()
    assert {p["containerPort"] for p in container["ports"]} == {5000}
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["python", IMAGE_ROOT + "deploy/probe.py", "drain"]


def test_kserve_admits_one_request_per_pod_and_scales_on_in_flight_requests():
    (isvc,) = documents("kserve.yaml")
    predictor = isvc["spec"]["predictor"]
    # Knative mode: its pod autoscaler counts in-flight requests (KServe's Standard mode scales on CPU).
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    assert predictor["containerConcurrency"] == 1
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("concurrency", 1)
    assert 1 <= predictor["minReplicas"] < predictor["maxReplicas"]
    # KServe's admission webhook rejects deploymentStrategy outside Standard mode.
    assert "deploymentStrategy" not in predictor
    container = model_container(predictor)
    assert container["name"] == "kserve-container"
    # Behind a queue that admits one request at a time, BUSY is ready: see deploy/kserve.yaml.
    assert container["readinessProbe"]["exec"]["command"][2] == "serving"


# -- the probe commands against a real Cog server ----------------------------------------------------


def manifest_probe_commands() -> dict[str, list[str]]:
    """Every probe command in deploy/ and the Dockerfile, by mode, as they run in the image."""
    commands = {}
    for spec in pod_specs().values():
        container = model_container(spec)
        for kind in PROBE_KINDS:
            command = container[kind]["exec"]["command"]
            commands[command[-1]] = command
    commands["serving (Dockerfile HEALTHCHECK)"] = dockerfile_healthcheck()
    return commands


def dockerfile_healthcheck() -> list[str]:
    text = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.startswith("HEALTHCHECK")]
    # Exec form (a JSON array): the probe must not depend on a shell in the image.
    return json.loads(line.split(" CMD ", 1)[1])


def assert_probes(port: int, passing: set[str]) -> dict[str, str]:
    outputs = {}
    for name, command in manifest_probe_commands().items():
        code, outputs[name] = run_probe(command, port)
        mode = command[-1]
        assert code == (0 if mode in passing else 1), f"{name} exited {code}: {outputs[name]}"
    return outputs


@pytest.fixture
def gates(tmp_path):
    return {"PROBE_SETUP_GATE": str(tmp_path / "setup-done"), "PROBE_PREDICT_GATE": str(tmp_path / "predict-done")}


def test_probes_through_starting_ready_busy_and_unhealthy(tmp_path, gates):
    with CogServer(f"{FIXTURES}:Gated", cwd=tmp_path, env=gates, generate_schema=False, ready_timeout=None) as server:
        server.wait_for_status("STARTING", SERVER_START_S)
        assert_probes(server.port, passing={"live"})

        Path(gates["PROBE_SETUP_GATE"]).touch()
        server.wait_for_status("READY", SERVER_START_S)
        assert_probes(server.port, passing={"ready", "serving", "started", "live"})

        response = requests.post(f"{server.url}/predictions", json={"input": {}}, headers={"Prefer": "respond-async"})
        assert response.status_code == 202
        server.wait_for_status("BUSY", SERVER_START_S)
        assert_probes(server.port, passing={"serving", "started", "live"})

        # preStop: drain waits for the running prediction before the kubelet's SIGTERM.
        drain = threading.Thread(target=run_probe, args=(drain_command(), server.port))
        drain.start()
        drain.join(timeout=probe.DRAIN_SETTLE_S + 2)
        assert drain.is_alive(), "drain returned while a prediction was running"
        Path(gates["PROBE_PREDICT_GATE"]).touch()
        drain.join(timeout=10)
        assert not drain.is_alive()
        server.wait_for_status("READY", SERVER_START_S)

        # A worker killed mid-prediction (OOM kill, segfault) is never respawned: only a restart helps.
        requests.post(f"{server.url}/predictions", json={"input": {"crash": True}}, timeout=30)
        server.wait_for_status("UNHEALTHY", SERVER_START_S)
        assert_probes(server.port, passing={"started"})


def test_probes_on_setup_failed_restart_and_say_why(tmp_path):
    with CogServer(f"{FIXTURES}:FailingSetup", cwd=tmp_path, generate_schema=False, ready_timeout=None) as server:
        server.wait_for_status("SETUP_FAILED", SERVER_START_S)
        outputs = assert_probes(server.port, passing={"started"})
    assert "SETUP_FAILED" in outputs["live"]
    assert "weights missing" in outputs["live"]


def test_probes_fail_when_nothing_answers():
    port = free_port()
    for command in manifest_probe_commands().values():
        code, output = run_probe(command, port)
        assert code == 1 and "no health answer" in output
