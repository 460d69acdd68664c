"""One gateway configuration everywhere: script/serve and the gateway image read gateway/nginx.conf.template
and gateway.js; Kubernetes and KServe mount deploy/gateway-config.yaml, which must carry the same bytes;
compose builds the gateway image from gateway/. And the sidecar, configured as the manifests configure
it, serves through real nginx."""

import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import requests
import yaml

from devtools.cog_server import DUMMY_PREDICTOR_REF, REPO_ROOT, CogServer
from devtools.gateway import Gateway, nginx_available, nobody_readable_dir
from tests.helpers.deploy import K8S_VERSIONS, by_kind, documents, model_container, pod_specs

GATEWAY = REPO_ROOT / "gateway"
# The nginx configuration and the njs modules it imports.
CONFIG_FILES = ("nginx.conf.template", *sorted(p.name for p in GATEWAY.glob("*.js")))
MODEL_PORT = 5000


def config_map() -> dict:
    (doc,) = documents("gateway-config.yaml")
    return doc


def gateway_container(spec: dict) -> dict:
    (container,) = [c for c in spec["containers"] if c["name"] == "gateway"]
    return container


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def mounted_volume(spec: dict, container: dict, directory: str) -> dict:
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == directory]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    return volume


def test_the_config_map_carries_the_gateway_files_byte_for_byte():
    data = config_map()["data"]
    assert sorted(data) == sorted(CONFIG_FILES)
    for name in CONFIG_FILES:
        assert data[name] == (GATEWAY / name).read_text(), (
            "deploy/gateway-config.yaml is stale: run script/gateway-config"
        )


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_config_map_matches_the_kubernetes_schema(version):
    kubernetes_validate.validate(config_map(), version, strict=True)


@pytest.mark.parametrize("manifest", ["kubernetes", "kserve"])
def test_the_sidecar_mounts_that_config_and_its_keys_from_a_secret(manifest):
    spec = pod_specs()[manifest]
    gateway = gateway_container(spec)
    env = env_of(gateway)
    template = Path(env["SDXL_GATEWAY_TEMPLATE"])
    config = mounted_volume(spec, gateway, str(template.parent))
    assert config["configMap"]["name"] == config_map()["metadata"]["name"]
    assert template.name in config_map()["data"]
    keys = mounted_volume(spec, gateway, str(Path(env["SDXL_API_KEYS_FILE"]).parent))
    assert keys["secret"]["secretName"] == "sdxl-api-keys"
    assert "SDXL_API_KEYS" not in env and "SDXL_OPEN_ACCESS" not in env
    # nginx writes its pid and temp files under /tmp on an otherwise read-only root.
    assert gateway["securityContext"]["readOnlyRootFilesystem"] is True
    assert "emptyDir" in mounted_volume(spec, gateway, "/tmp")


@pytest.mark.parametrize("manifest", ["kubernetes", "kserve"])
def test_coglet_listens_on_loopback_and_only_the_gateway_is_exposed(manifest):
    spec = pod_specs()[manifest]
    model, gateway = model_container(spec), gateway_container(spec)
    # The image's own CMD (Dockerfile), under KServe wrapped by deploy/graceful.py, with the host bound to loopback.
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    (cmd,) = re.findall(r"^CMD (\[.*\])$", dockerfile, re.MULTILINE)
    wrapper = ["python", "/src/deploy/graceful.py"] if manifest == "kserve" else []
    assert model["args"] == [*wrapper, *json.loads(cmd), "--host", "127.0.0.1"]
    assert env_of(gateway)["SDXL_GATEWAY_UPSTREAM"] == f"127.0.0.1:{MODEL_PORT}"
    if manifest == "kserve":
        # Knative routes to the one container with a port.
        assert [c["name"] for c in spec["containers"] if c.get("ports")] == ["gateway"]


def test_the_service_targets_the_gateway():
    kinds = by_kind("kubernetes.yaml")
    spec = kinds["Deployment"]["spec"]["template"]["spec"]
    (port,) = kinds["Service"]["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in gateway_container(spec)["ports"]}
    assert port["targetPort"] not in {p["name"] for p in model_container(spec)["ports"]}


def test_compose_builds_the_gateway_from_this_directory_beside_the_unchanged_model_image():
    compose = yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())
    model, gateway = compose["services"]["model"], compose["services"]["gateway"]
    assert "build" not in model and "ports" not in model, "the model image is cog build's, reachable only inside"
    assert (REPO_ROOT / gateway["build"]).resolve() == GATEWAY
    assert gateway["environment"]["SDXL_GATEWAY_UPSTREAM"] == f"model:{MODEL_PORT}"
    # The model container reaches the gateway's events listener by service name; it is not published.
    events = gateway["environment"]["SDXL_GATEWAY_EVENTS_URL"]
    assert events == f"http://gateway:{gateway['environment']['SDXL_GATEWAY_EVENTS_LISTEN']}/events"
    assert all(not port.endswith(":8081") for port in gateway["ports"])
    (secret,) = gateway["secrets"]
    assert gateway["environment"]["SDXL_API_KEYS_FILE"] == f"/run/secrets/{secret}"
    dockerfile = (GATEWAY / "Dockerfile").read_text()
    copied = re.search(r"^COPY (nginx\.conf\.template .*) /usr/share/sdxl-gateway/$", dockerfile, re.MULTILINE)
    assert {"nginx.conf.template", "*.js"} <= set(copied.group(1).split())
    assert "RUN npm ci --ignore-scripts" in dockerfile


def test_swagger_ui_is_pinned_and_installed_from_the_lockfile():
    wanted = json.loads((GATEWAY / "package.json").read_text())["dependencies"]["swagger-ui-dist"]
    lock = json.loads((GATEWAY / "package-lock.json").read_text())
    assert re.fullmatch(r"\d+\.\d+\.\d+", wanted), "pin an exact version"
    assert lock["packages"]["node_modules/swagger-ui-dist"]["version"] == wanted
    # The pages load nothing from elsewhere: every script and stylesheet is served by the gateway.
    pages = "".join(p.read_text() for p in (GATEWAY / "public").rglob("*.html"))
    links = re.findall(r'(?:src|href)="([^"]*)"', pages)
    assert links and all(link.startswith("/") and not link.startswith("//") for link in links), links


@pytest.mark.gateway
@pytest.mark.skipif(not nginx_available(), reason="nginx (with libnginx-mod-http-js) and envsubst not installed")
def test_the_sidecar_as_configured_by_the_manifests_serves(tmp_path):
    """The ConfigMap's files and a Secret-style key file, mounted where kubernetes.yaml mounts them."""
    gateway = gateway_container(pod_specs()["kubernetes"])
    env = env_of(gateway)
    mounts = nobody_readable_dir("gateway-mounts-")
    config_dir, keys_dir = mounts / "config", mounts / "keys"
    for directory in (config_dir, keys_dir):
        directory.mkdir(mode=0o755)
    for name, text in config_map()["data"].items():
        (config_dir / name).write_text(text)
    (keys_dir / Path(env["SDXL_API_KEYS_FILE"]).name).write_text("sidecar-key\n")
    with CogServer(DUMMY_PREDICTOR_REF, cwd=tmp_path) as cog:
        sidecar_env = {
            "SDXL_GATEWAY_TEMPLATE": str(config_dir / Path(env["SDXL_GATEWAY_TEMPLATE"]).name),
            "SDXL_API_KEYS_FILE": str(keys_dir / Path(env["SDXL_API_KEYS_FILE"]).name),
            "SDXL_API_KEYS": "",
        }
        with Gateway(cog.port, env=sidecar_env) as running:
            body = {"input": {"width": 16}}
            assert requests.post(f"{running.url}/predictions", json=body, timeout=30).status_code == 401
            response = requests.post(
                f"{running.url}/predictions", json=body, headers={"Authorization": "Bearer sidecar-key"}, timeout=30
            )
            assert response.status_code == 200 and response.json()["status"] == "succeeded"
