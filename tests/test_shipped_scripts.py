"""Whatever ships in the image runs where it ships: the image leaves tests/ out (.dockerignore), so no shipped
script may need it. Each script's --help runs from a copy of the tree without tests/."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sdxl_cog.testing.cog_server import REPO_ROOT

SCRIPTS = sorted(p.name for p in (REPO_ROOT / "script").iterdir() if p.is_file())


@pytest.fixture(scope="module")
def shipped_tree(tmp_path_factory) -> Path:
    assert "tests" in (REPO_ROOT / ".dockerignore").read_text().split(), "the image is expected to leave tests/ out"
    tree = tmp_path_factory.mktemp("shipped") / "src"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in filter(None, listed.split("\0")):
        if name.split("/")[0] != "tests" and (REPO_ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, tree / name)
    return tree


@pytest.fixture(scope="module")
def help_outputs(shipped_tree) -> dict[str, tuple[int, str]]:
    """Each script's --help from the shipped tree: exit status and output. They run side by side, each in its
    own interpreter: make-test-weights alone spends seconds importing torch, and the others finish meanwhile."""
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    env.pop("PYTHONPATH", None)
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


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_shipped_script_runs_without_tests(help_outputs, script):
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
