"""Whatever ships in the image runs where it ships: the image holds the tree that .dockerignore leaves (what
`cog build` copies; the Dockerfile copies a part of it), with requirements.txt installed and none of the
development dependencies. Each shipped script's --help runs from such a tree, with every module that only a
development dependency brings made unimportable. (tests/test_container.py runs them in the built image too.)"""

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from devtools.cog_server import REPO_ROOT


def dockerignore_patterns() -> list[tuple[bool, str]]:
    """(excluded, pattern) per line of .dockerignore: `!` marks an exception."""
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [(not p.startswith("!"), p.lstrip("!").strip("/")) for p in patterns]


def ignored(path: str, patterns: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last pattern that matches the path, or a folder above it, decides."""
    parents = [str(Path(*Path(path).parts[: i + 1])) for i in range(len(Path(path).parts))]
    verdict = False
    for excluded, pattern in patterns:
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "")) for p in parents):
            verdict = excluded
    return verdict


def shipped_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    patterns = dockerignore_patterns()
    return [n for n in filter(None, listed.split("\0")) if (REPO_ROOT / n).is_file() and not ignored(n, patterns)]


SCRIPTS = sorted(Path(n).name for n in shipped_files() if n.startswith("script/"))


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(requirements: Path) -> set[str]:
    """The distributions a requirements file installs, with everything they require (installed here)."""
    lines = requirements.read_text().splitlines()
    todo = [Requirement(line).name for line in lines if line.strip() and not line.startswith("#")]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if _key(name) in seen:
            continue
        seen.add(_key(name))
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [r.name for r in map(Requirement, requires) if not r.marker or r.marker.evaluate({"extra": ""})]
    return seen


def development_only_entries() -> set[str]:
    """The names in site-packages that only requirements-dev.txt's distributions put there (their modules and
    metadata): the image has none of them."""
    only = _closure(REPO_ROOT / "requirements-dev.txt") - _closure(REPO_ROOT / "requirements.txt")
    entries = set()
    for dist in metadata.distributions():
        if _key(dist.metadata["Name"]) in only:
            entries |= {Path(f).parts[0] for f in dist.files or [] if not Path(f).parts[0].startswith("..")}
    return entries


def runtime_site(directory: Path) -> Path:
    """`directory` made a site where only the runtime's distributions are installed: a link to each entry of this
    interpreter's site-packages but the development-only ones, and a sitecustomize that puts it in place of
    site-packages (so an absent module is absent to find_spec too, as in the image)."""
    site_packages = Path(next(p for p in sys.path if p.endswith("site-packages")))
    links = directory / "site-packages"
    links.mkdir()
    skip = development_only_entries()
    for entry in site_packages.iterdir():
        if entry.name not in skip:
            (links / entry.name).symlink_to(entry)
    (directory / "sitecustomize.py").write_text(
        f"import sys\nsys.path[:] = [p for p in sys.path if p != {str(site_packages)!r}] + [{str(links)!r}]\n"
    )
    return directory


@pytest.fixture(scope="module")
def shipped_tree(tmp_path_factory) -> Path:
    tree = tmp_path_factory.mktemp("shipped") / "src"
    for name in shipped_files():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, tree / name)
    return tree


@pytest.fixture(scope="module")
def help_outputs(shipped_tree, tmp_path_factory) -> dict[str, tuple[int, str]]:
    """Each script's --help from the shipped tree: exit status and output."""
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    env["PYTHONPATH"] = str(runtime_site(tmp_path_factory.mktemp("site")))
    running = {
        script: subprocess.Popen(
            [shipped_tree / "script" / script, "--help"],
            cwd=shipped_tree,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for script in SCRIPTS
    }
    outputs = {}
    try:
        for script, process in running.items():
            output, _ = process.communicate(timeout=120)
            outputs[script] = (process.returncode, output)
    finally:
        for process in running.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return outputs


def test_the_image_leaves_out_tests_and_development_tools():
    shipped = shipped_files()
    assert "predict.py" in shipped and "sdxl_cog/service.py" in shipped and "script/download-weights" in shipped
    assert not [n for n in shipped if n.split("/")[0] in ("tests", "devtools", "bench")]


def test_the_dockerfile_copies_only_what_ships():
    shipped = set(shipped_files())
    copied = re.findall(r"^COPY (?!--)(.+) /src/", (REPO_ROOT / "Dockerfile").read_text(), re.M)
    sources = [s for line in copied for s in line.split() if s != "weights/"]
    for source in sources:
        assert source in shipped or any(n.startswith(source) for n in shipped), source


def test_the_runtime_site_has_the_runtime_and_no_development_dependency(tmp_path, shipped_tree):
    env = {**os.environ, "PYTHONPATH": str(runtime_site(tmp_path))}
    probe = "import importlib.util as u, sys; print([m for m in sys.argv[1:] if u.find_spec(m)])"
    names = ["torch", "diffusers", "transformers", "cog", "cv2", "piexif", "schemathesis", "selenium", "pytest"]
    found = subprocess.run([sys.executable, "-c", probe, *names], env=env, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == str(["torch", "diffusers", "transformers", "cog", "cv2", "piexif"])
    # From the shipped tree, as the image runs it: the repository's devtools/ and tests/ are not there to import.
    done = subprocess.run(
        [sys.executable, "-c", "import predict"], cwd=shipped_tree, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_shipped_script_runs_with_the_runtime_dependencies_alone(help_outputs, script):
    returncode, output = help_outputs[script]
    assert returncode == 0, output
    assert "usage" in output.lower(), output
    assert "No module named" not in output


def sparse_file(path: Path, size: int = 11 * 1024 * 1024) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


def test_cog_build_check_names_what_separate_weights_would_break(tmp_path):
    """Cog's --separate-weights walk (weightslegacy.FindWeights, read from its source) ignores .dockerignore."""
    sparse_file(tmp_path / "weights/base/unet/diffusion_pytorch_model.fp16.safetensors")
    sparse_file(tmp_path / ".venv/lib/python3.12/site-packages/torch/lib/libtorch_cpu.so")
    sparse_file(tmp_path / "sdxl_cog/bundled.bin")  # beside code: Cog leaves it in the code layer
    (tmp_path / "sdxl_cog/module.py").write_text("")
    sparse_file(tmp_path / "outputs/big.png")  # images are never weights
    check = [REPO_ROOT / "script" / "cog-build-check", str(tmp_path)]
    done = subprocess.run(check, capture_output=True, text=True)
    assert done.returncode == 1
    assert ".venv/lib/python3.12/site-packages/torch/lib/" in done.stderr
    assert "weights/" not in done.stderr.split("\n", 1)[1].split("Move")[0]
    assert "sdxl_cog" not in done.stderr and "outputs" not in done.stderr
    shutil.rmtree(tmp_path / ".venv")
    done = subprocess.run(check, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
