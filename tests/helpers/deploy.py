"""deploy/ as the tests read it: its manifests parsed, the model's container in a pod spec, deploy/probe.py
loaded as a module, and an image's probe command run here against a local server."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import yaml

from devtools.cog_server import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "probe_predictors.py"
# The oldest Kubernetes still commonly run and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30", "1.37")
IMAGE_ROOT = "/src/"  # where the image holds the repository (WORKDIR of the Dockerfile and of `cog build`)


def load_probe_module():
    spec = importlib.util.spec_from_file_location("deploy_probe", DEPLOY / "probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


probe = load_probe_module()


def documents(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]


def by_kind(name: str) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in documents(name)}


def pod_specs() -> dict[str, dict]:
    """The pod spec of each manifest: the Deployment's template, the InferenceService's predictor."""
    return {
        "kubernetes": by_kind("kubernetes.yaml")["Deployment"]["spec"]["template"]["spec"],
        "kserve": by_kind("kserve.yaml")["InferenceService"]["spec"]["predictor"],
    }


def model_container(spec: dict) -> dict:
    """The model's container; the gateway runs beside it (tests/test_gateway_deploy.py)."""
    (container,) = [c for c in spec["containers"] if c["name"] != "gateway"]
    return container


def drain_command() -> list[str]:
    deployment = by_kind("kubernetes.yaml")["Deployment"]
    container = model_container(deployment["spec"]["template"]["spec"])
    return container["lifecycle"]["preStop"]["exec"]["command"]


def run_probe(command: list[str], port: int) -> tuple[int, str]:
    """Run an image's probe command here: its python is ours, its /src/ is this checkout."""
    assert command[0] == "python" and command[1].startswith(IMAGE_ROOT)
    local = [sys.executable, str(REPO_ROOT / command[1].removeprefix(IMAGE_ROOT)), *command[2:]]
    done = subprocess.run(local, env={**os.environ, "PORT": str(port)}, capture_output=True, text=True, timeout=30)
    return done.returncode, done.stdout + done.stderr
