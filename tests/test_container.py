"""The image end to end, on a machine with no Docker engine and no Cog CLI.

1. `make image` builds the Dockerfile with buildah on a debootstrap Debian base (script/build-base-rootfs),
   with tiny synthetic weights and the local CPU torch wheel.
2. The image runs as its config says (entrypoint, command, workdir): READY, a prediction gives a PNG,
   an out-of-range input gets 422, and its HEALTHCHECK command passes inside the container.
3. `make push` sends it to a docker-registry on 127.0.0.1; skopeo copies it back and the digests match.
4. A change to predict.py, rebuilt and pushed, changes only the layers after the weights layer.

Skipped where buildah (or root, debootstrap, skopeo, docker-registry) is missing; .ci/run installs them.
The debootstrap rootfs and a wheelhouse are cached in $SDXL_CI_CACHE (default ~/.cache/sdxl-cog-ci);
image storage, containers and the registry live in a temporary directory removed at the end.
The last test prints build time and layer sizes.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
import requests
import yaml
from PIL import Image

from devtools.cog_server import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SDXL_CI_CACHE") or Path.home() / ".cache" / "sdxl-cog-ci")
BASE_ROOTFS = CACHE / "debian-bookworm-rootfs.tar"
WHEELHOUSE = CACHE / "wheels"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BASE_IMAGE = "localhost/debian-base:latest"
IMAGE = "sdxl"  # buildah stores it as localhost/sdxl
REGISTRY_REPO = IMAGE  # make push keeps the name: $(REGISTRY)/$(IMAGE):$(TAG)
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The Debian 12 base has Python 3.11, as has the local CPU torch wheel (cp311).
IMAGE_PYTHON = (3, 11)

READY_TIMEOUT_S = 300
PREDICT_TIMEOUT_S = 300
# Tiny weights on CPU: a 128x128 image in two steps takes about a second.
PREDICTION = {"prompt": "a lighthouse at dusk", "width": 128, "height": 128, "num_inference_steps": 2, "seed": 7}
CODE_LAYERS_MAX_BYTES = 5 * 2**20

REQUIRED_TOOLS = ("buildah", "skopeo", "docker-registry", "make")
missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
if not BASE_ROOTFS.exists() and shutil.which("debootstrap") is None:
    missing.append("debootstrap")
pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (.ci/run installs them)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="buildah with chroot isolation needs root here"),
    pytest.mark.skipif(sys.version_info[:2] != IMAGE_PYTHON, reason="the wheelhouse is built for Python 3.11"),
]


def run(*command: str | Path, **kwargs) -> str:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, command))} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return done.stdout


# -- caches -----------------------------------------------------------------------------------------


def base_rootfs() -> Path:
    if not BASE_ROOTFS.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        run(REPO_ROOT / "script" / "build-base-rootfs", BASE_ROOTFS)
    return BASE_ROOTFS


def wheelhouse(torch_version: str) -> Path:
    """Every wheel the image installs, so the build's pip reads local files (its HTTP cache does not
    survive the proxy here). Refilled when requirements.txt or the torch version changes."""
    requirements = [
        line for line in (REPO_ROOT / "requirements.txt").read_text().splitlines() if not line.startswith("torch==")
    ]
    key = hashlib.sha256(("\n".join(requirements) + torch_version).encode()).hexdigest()
    stamp = WHEELHOUSE / ".requirements.sha256"
    if stamp.exists() and stamp.read_text() == key:
        return WHEELHOUSE
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as listed:
        listed.write("\n".join(requirements) + "\n")
        listed.flush()
        pip = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", WHEELHOUSE]
        run(*pip, f"torch=={torch_version}", "-r", listed.name)
    stamp.write_text(key)
    return WHEELHOUSE


# -- buildah in a private store ---------------------------------------------------------------------


def overlay_works(scratch: Path) -> bool:
    """Kernel overlayfs makes buildah several times faster than vfs, which copies every layer: on the
    2-core CI machine this test takes about 7 minutes with overlay and 23 with vfs."""
    dirs = [scratch / name for name in ("lower", "upper", "work", "merged")]
    for d in dirs:
        d.mkdir(parents=True)
    options = f"lowerdir={dirs[0]},upperdir={dirs[1]},workdir={dirs[2]}"
    mounted = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(dirs[3])], capture_output=True)
    if mounted.returncode == 0:
        subprocess.run(["umount", str(dirs[3])], check=True)
    shutil.rmtree(scratch)
    return mounted.returncode == 0


@dataclass
class Store:
    root: Path
    driver: str = field(init=False)

    def __post_init__(self):
        self.driver = os.environ.get("SDXL_CI_STORAGE_DRIVER") or (
            "overlay" if overlay_works(self.root / "probe") else "vfs"
        )

    @property
    def buildah(self) -> list[str]:
        return [
            "buildah",
            "--root",
            str(self.root / "storage"),
            "--runroot",
            str(self.root / "run"),
            "--storage-driver",
            self.driver,
        ]

    def __call__(self, *args: str | Path) -> str:
        return run(*self.buildah, *args)

    def import_rootfs(self, tarball: Path, name: str) -> None:
        container = self("from", "scratch").strip()
        self("add", container, tarball, "/")
        self("config", "--env", f"PATH={BASE_PATH}", "--cmd", "/bin/bash", container)
        self("commit", "--quiet", "--format", "docker", container, name)
        self("rm", container)

    def remove(self) -> None:
        subprocess.run([*self.buildah, "rm", "--all"], capture_output=True)
        subprocess.run([*self.buildah, "rmi", "--all", "--force"], capture_output=True)
        # Whatever containers/storage left mounted under the store, deepest first.
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(str(self.root))), reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Build:
    tag: str
    seconds: float
    image_id: str
    config: dict
    size: str  # as buildah reports it, uncompressed


class Workspace:
    """The build context (this checkout plus tiny weights), the store and the make invocation."""

    def __init__(self, root: Path, store: Store):
        self.root = root
        self.store = store
        self.context = root / "context"
        self.torch_version = metadata.version("torch")

    def make_context(self) -> None:
        # The working tree as git sees it: tracked files and new ones that are not ignored.
        listed = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO_ROOT)
        for name in filter(None, listed.split("\0")):
            source = REPO_ROOT / name
            if source.is_file():
                (self.context / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, self.context / name)
        run(sys.executable, REPO_ROOT / "script" / "make-test-weights", "--size", "tiny", self.context / "weights")

    def make(self, target: str, tag: str, **variables: str) -> None:
        build_flags = [
            "--isolation chroot",
            f"--build-arg BASE_IMAGE={BASE_IMAGE}",
            "--build-arg TORCH_INDEX_URL=",
            f"--build-arg TORCH_VERSION={self.torch_version}",
            "--build-arg FIND_LINKS=/wheels",
            f"-v {wheelhouse(self.torch_version)}:/wheels:ro",
        ]
        settings = {
            "BUILDER": "buildah",
            "BUILDAH": " ".join(self.store.buildah),
            "IMAGE": IMAGE,
            "TAG": tag,
            "REVISION": tag,
            "BUILD_FLAGS": " ".join(build_flags),
            "CA_BUNDLE": str(CA_BUNDLE) if CA_BUNDLE.exists() else "",
            # The host-side steps of `make image` (the run.cog.* labels) run with this interpreter.
            "PYTHON": sys.executable,
            **variables,
        }
        run("make", "-C", self.context, target, *(f"{k}={v}" for k, v in settings.items()))

    def build(self, tag: str) -> Build:
        start = time.monotonic()
        self.make("image", tag)
        seconds = time.monotonic() - start
        reference = f"{IMAGE}:{tag}"
        inspected = json.loads(self.store("inspect", "--type", "image", reference))
        size = self.store("images", "--format", "{{.Size}}", reference).strip()
        return Build(tag, seconds, inspected["FromImageID"], inspected["Docker"], size)


@pytest.fixture(scope="module")
def workspace():
    root = Path(tempfile.mkdtemp(prefix="sdxl-container-test-"))
    store = Store(root / "buildah")
    try:
        space = Workspace(root, store)
        space.make_context()
        store.import_rootfs(base_rootfs(), BASE_IMAGE)
        yield space
    finally:
        store.remove()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def first_build(workspace) -> Build:
    return workspace.build("v1")


# -- the image runs ---------------------------------------------------------------------------------


def session_processes(session_id: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session_id:  # field 6 of stat, after pid and (comm): state ppid pgrp session
            pids.append(int(stat.parent.name))
    return pids


def stop_session(process: subprocess.Popen) -> None:
    """buildah run does not take the container's processes down with it: signal its whole session."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        for pid in session_processes(process.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(
            Path(f"/proc/{pid}/stat").exists() and " Z " not in Path(f"/proc/{pid}/stat").read_text()
            for pid in session_processes(process.pid)
        ):
            time.sleep(0.2)
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def server(workspace, first_build):
    """The first image, started the way its config says, on a free port of the host network."""
    config = first_build.config["config"]
    store = workspace.store
    container = store("from", f"{IMAGE}:{first_build.tag}").strip()
    port = free_port()
    log = open(workspace.root / "server.log", "wb")
    command = [
        *store.buildah,
        "run",
        "--isolation",
        "chroot",
        "--env",
        f"PORT={port}",
        container,
        "--",
        *config["Entrypoint"],
        *config["Cmd"],
    ]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_ready(url, process, workspace.root / "server.log")
        yield url, container, port
    finally:
        stop_session(process)
        log.close()
        store("rm", container)


def wait_for_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    status = "no answer"
    while time.monotonic() < deadline and process.poll() is None:
        try:
            status = requests.get(f"{url}/health-check", timeout=5).json()["status"]
        except requests.RequestException:
            pass
        if status == "READY":
            return
        if status == "SETUP_FAILED":
            break
        time.sleep(1)
    raise AssertionError(f"image not READY (last status {status}):\n{log.read_text(errors='replace')[-4000:]}")


def test_image_config_matches_what_cog_build_makes(first_build):
    config = first_build.config["config"]
    assert config["WorkingDir"] == "/src"
    assert config["Entrypoint"] == ["/usr/bin/tini", "--"]
    assert config["Cmd"] == ["python", "-m", "cog.server.http"]
    assert "5000/tcp" in config["ExposedPorts"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PATH"].split(":")[0] == "/opt/venv/bin"
    assert env["COG_PREDICT_TYPE_STUB"] == "predict.py:Predictor"
    assert config["Healthcheck"]["Test"] == ["CMD", "python", "/src/deploy/probe.py", "serving"]
    assert config["Labels"]["org.opencontainers.image.revision"] == first_build.tag
    assert config["Labels"]["org.opencontainers.image.title"]


def test_the_image_carries_the_labels_cog_build_adds(first_build, server):
    """`cog predict IMAGE` needs run.cog.config; registries read the API from run.cog.openapi_schema."""
    url, container, port = server
    labels = first_build.config["config"]["Labels"]
    assert json.loads(labels["run.cog.config"]) == yaml.safe_load((REPO_ROOT / "cog.yaml").read_text())
    assert labels["run.cog.version"] == metadata.version("cog")
    assert json.loads(labels["run.cog.openapi_schema"]) == requests.get(f"{url}/openapi.json", timeout=10).json()
    assert labels["run.cog.has_init"] == "true"


def test_the_image_serves_predictions_and_validates_inputs(workspace, first_build, server):
    url, container, port = server
    response = requests.post(f"{url}/predictions", json={"input": PREDICTION}, timeout=PREDICT_TIMEOUT_S)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "succeeded", body
    (output,) = body["output"]
    header, data = output.split(",", 1)
    assert header.startswith("data:image/png")
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    assert image.size == (PREDICTION["width"], PREDICTION["height"])

    # Bounds come from the schema baked at build time: without it coglet would pass 0 steps through.
    response = requests.post(f"{url}/predictions", json={"input": {**PREDICTION, "num_inference_steps": 0}}, timeout=30)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][-1] == "num_inference_steps"

    # The image's own HEALTHCHECK command, run inside the container.
    healthcheck = first_build.config["config"]["Healthcheck"]["Test"][1:]
    output = workspace.store("run", "--isolation", "chroot", "--env", f"PORT={port}", container, "--", *healthcheck)
    assert "READY" in output


def test_each_script_the_image_ships_runs_there(workspace, server):
    """What ships runs where it ships: the image has requirements.txt's packages and no development tools."""
    url, container, port = server

    def inside(*command: str) -> str:
        return workspace.store("run", "--isolation", "chroot", container, "--", *command)

    # __pycache__ is the build's own: the schema step imports predict.py there, as `cog build` does.
    shipped = set(inside("ls", "/src").split()) - {"__pycache__"}
    assert sorted(shipped) == ["cog.yaml", "deploy", "predict.py", "requirements.txt", "script", "sdxl_cog", "weights"]
    scripts = inside("ls", "/src/script").split()
    assert scripts == ["download-weights"]
    for script in scripts:
        assert "usage" in inside(f"/src/script/{script}", "--help").lower()


# -- registry: push, pull back, code-only change ----------------------------------------------------


@pytest.fixture(scope="module")
def registry(workspace):
    port = free_port()
    root = workspace.root / "registry"
    root.mkdir()
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\nlog: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: {root / 'data'}}}}}\n"
        f"http: {{addr: '127.0.0.1:{port}'}}\n"
    )
    process = subprocess.Popen(
        ["docker-registry", "serve", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/v2/", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@dataclass
class Pushed:
    digest: str
    manifest: dict
    config: dict
    seconds: float


def push(workspace: Workspace, registry: str, tag: str) -> Pushed:
    digest_file = workspace.root / f"digest-{tag}"
    start = time.monotonic()
    workspace.make("push", tag, REGISTRY=registry, PUSH_FLAGS=f"--tls-verify=false --digestfile {digest_file}")
    seconds = time.monotonic() - start
    reference = f"docker://{registry}/{REGISTRY_REPO}:{tag}"
    manifest = json.loads(run("skopeo", "inspect", "--tls-verify=false", "--raw", reference))
    config = json.loads(run("skopeo", "inspect", "--tls-verify=false", "--config", reference))
    return Pushed(digest_file.read_text().strip(), manifest, config, seconds)


@pytest.fixture(scope="module")
def pushed_v1(workspace, first_build, registry) -> Pushed:
    return push(workspace, registry, first_build.tag)


@pytest.fixture(scope="module")
def code_change(workspace, first_build, pushed_v1, registry) -> tuple[Build, Pushed]:
    """predict.py edited (a comment is enough to change the code layer), rebuilt and pushed as v2."""
    predict = workspace.context / "predict.py"
    predict.write_text(predict.read_text() + "\n# a code-only change (tests/test_container.py)\n")
    build = workspace.build("v2")
    return build, push(workspace, registry, "v2")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def test_pushed_image_pulls_back_with_the_same_digest(workspace, registry, first_build, pushed_v1):
    pulled = workspace.root / "pulled"
    run(
        "skopeo",
        "copy",
        "--src-tls-verify=false",
        f"docker://{registry}/{REGISTRY_REPO}:{first_build.tag}",
        f"dir:{pulled}",
    )
    assert sha256_file(pulled / "manifest.json") == pushed_v1.digest
    assert json.loads((pulled / "manifest.json").read_text()) == pushed_v1.manifest
    for layer in pushed_v1.manifest["layers"]:
        assert sha256_file(pulled / layer["digest"].removeprefix("sha256:")) == layer["digest"]
    # The registry holds the image that was built: same layers, same config (and so the same image ID).
    assert pushed_v1.config["rootfs"]["diff_ids"] == first_build.config["rootfs"]["diff_ids"]
    assert pushed_v1.manifest["config"]["digest"] == "sha256:" + first_build.image_id


def layer_history(config: dict) -> list[str]:
    """The instruction that made each layer, in layer order."""
    return [entry.get("created_by", "") for entry in config["history"] if not entry.get("empty_layer")]


def weights_layer_index(config: dict) -> int:
    (index,) = [i for i, created_by in enumerate(layer_history(config)) if "/src/weights/" in created_by]
    return index


def test_a_code_change_repushes_only_the_small_code_layers(pushed_v1, code_change):
    build_v2, pushed_v2 = code_change
    before, after = pushed_v1.manifest["layers"], pushed_v2.manifest["layers"]
    weights = weights_layer_index(pushed_v1.config)
    assert weights == weights_layer_index(pushed_v2.config)
    # Base, system packages, Python packages and weights: the very same blobs.
    assert [layer["digest"] for layer in before[: weights + 1]] == [layer["digest"] for layer in after[: weights + 1]]
    new = [layer for layer in after if layer["digest"] not in {old["digest"] for old in before}]
    assert new, "the code change produced no new layer"
    assert all(after.index(layer) > weights for layer in new)
    assert sum(layer["size"] for layer in new) < CODE_LAYERS_MAX_BYTES


def test_report_build_time_and_sizes(capsys, workspace, first_build, pushed_v1, code_change):
    build_v2, pushed_v2 = code_change
    layers = pushed_v1.manifest["layers"]
    weights = weights_layer_index(pushed_v1.config)
    old = {layer["digest"] for layer in layers}
    new = [layer for layer in pushed_v2.manifest["layers"] if layer["digest"] not in old]
    report = {
        "storage_driver": workspace.store.driver,
        "build_seconds_cold": round(first_build.seconds, 1),
        "build_seconds_after_code_change": round(build_v2.seconds, 1),
        "push_seconds_first": round(pushed_v1.seconds, 1),
        "push_seconds_after_code_change": round(pushed_v2.seconds, 1),
        "image_size_uncompressed": first_build.size,
        "image_bytes_compressed_without_weights": sum(layer["size"] for i, layer in enumerate(layers) if i != weights),
        "weights_layer_bytes_compressed": layers[weights]["size"],
        "code_change_repushed_bytes_compressed": sum(layer["size"] for layer in new),
        "code_change_repushed_layers": len(new),
        "layers_compressed_bytes": [
            {"size": layer["size"], "created_by": created_by[:80]}
            for layer, created_by in zip(layers, layer_history(pushed_v1.config))
        ],
    }
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "last-report.json").write_text(json.dumps(report, indent=1) + "\n")
    with capsys.disabled():
        print("\ncontainer test report (also in", CACHE / "last-report.json", ")")
        for key, value in report.items():
            if key != "layers_compressed_bytes":
                print(f"  {key}: {value}")
