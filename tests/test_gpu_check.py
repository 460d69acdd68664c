"""`make gpu-check`'s script (bench/gpu_check.py) on this CPU with tiny weights, so that the GPU command cannot rot
where no GPU is: every mode with compilation off and on, low-VRAM mode and a model switch, end to end, with its
checks (no black image, every warmed compiled row on compiled graphs). Its compile cache is the one the session's
compiled service filled (tests/conftest.py), so its compiled service is a second start: it must compile nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from devtools.cog_server import REPO_ROOT
from tests.conftest import TEST_SIDE

MODES = (
    "base",
    "expert_ensemble",
    "base_image_refiner",
    "img2img",
    "inpaint",
    "refiner_only",
    "four_outputs",
    "model_switch",
    "lora",  # last: uncompiled, its disabled adapter stays on the UNet (bench/gpu_check.py)
)
LOW_VRAM_MODES = ("base", "expert_ensemble", "model_switch")
# The compile tier's tolerance (tests/test_compile.py).
MAX_PIXEL_DIFF = 2
RUN_TIMEOUT_S = 600


# Its compiled service compiles nothing, but the session's compiled service it reuses does (pytest.ini).
@pytest.mark.compile
def test_the_gpu_check_runs_every_mode_compiled_and_not_on_the_cpu(compiled_service, tmp_path):
    report = tmp_path / "gpu-check.json"
    side = str(TEST_SIDE)
    command = [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--size", "tiny", "--side", side]
    command += ["--steps", "2", "--mode-steps", "2", "--repeat", "1", "--warm-runs", "0"]
    command += [
        "--compile-sizes",
        f"{side}x{side}",
        "--compile-cache",
        str(compiled_service.settings.compile_cache_dir),
    ]
    done = subprocess.run(
        [*command, "--report", str(report)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads(report.read_text())
    rows = {(row["variant"], row["mode"]): row for row in result["rows"]}
    expected = [("diffusers", "base")] + [(variant, mode) for variant in ("uncompiled", "compiled") for mode in MODES]
    assert list(rows) == expected + [("low-VRAM compiled", mode) for mode in LOW_VRAM_MODES]
    assert result["failures"] == []
    assert all(row["error"] is None and row["seconds"] > 0 for row in rows.values())

    # What ran compiled: every warmed size; a LoRA and an unwarmed batch (4 outputs) ran uncompiled, as designed.
    ran = {key: row["graphs"] for key, row in rows.items() if key[0] == "compiled"}
    assert ran.pop(("compiled", "lora")) == "uncompiled (LoRA)"
    assert ran.pop(("compiled", "four_outputs")) == "uncompiled (not warmed)"
    assert set(ran.values()) == {"compiled"}
    for key, row in rows.items():
        if key[0] != "uncompiled":
            assert row["max_pixel_diff_vs_uncompiled"] <= MAX_PIXEL_DIFF, key
    assert all(rows[(variant, "model_switch")]["model_load_seconds"] for variant in ("uncompiled", "compiled"))

    # A second start: every graph came from the cache, none was compiled again.
    cache = result["setup"]["compiled"]["compile_cache"]
    assert cache["fxgraph_cache_hit"] > 0 and cache.get("fxgraph_cache_miss", 0) == 0, cache
    assert result["flops_per_image"]["base"] > 0


# requirements.txt's pins the GPU machine already has (script/gpu-wheels says why): torch, accelerate and
# safetensors at those versions, numpy, OpenCV, requests, urllib3 and huggingface_hub at versions the code runs on.
ON_THE_GPU_MACHINE = {
    "torch",
    "accelerate",
    "safetensors",
    "numpy",
    "opencv-python",
    "requests",
    "urllib3",
    "huggingface-hub",
}


def test_the_wheel_script_fetches_every_other_pin_for_python_3_12_without_dependencies():
    done = subprocess.run(
        [sys.executable, "script/gpu-wheels", "--dry-run", "WHEELS"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    command = done.stdout.split()
    assert command[command.index("--python-version") + 1] == "3.12"
    assert {"--no-deps", "--only-binary=:all:", "manylinux_2_28_x86_64"} <= set(command)
    fetched = dict(spec.split("==") for spec in command if "==" in spec)
    pins = dict(
        line.split("#")[0].strip().lower().replace("_", "-").split("==")
        for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
        if "==" in line.split("#")[0]
    )
    # A runtime requirement added to requirements.txt must be fetched or be named as the machine's.
    assert {name: version for name, version in pins.items() if name not in ON_THE_GPU_MACHINE} == {
        name: fetched[name] for name in pins if name not in ON_THE_GPU_MACHINE
    }
    assert fetched["coglet"] == pins["cog"]  # cog's server is released with it, version for version
