"""What healthcheck() reports (sdxl_cog/device/health.py): sticky CUDA errors told from the rest by torch's wording,
remembered from a failed prediction for good; the device check bounded in time and never run twice at once.
Through the real Cog server: tests/test_health_server.py."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

from sdxl_cog.device.health import STICKY_CUDA_ERRORS, DeviceHealth, DeviceUnhealthy, cuda_error, sticky_cuda_error
from sdxl_cog.errors import InputError
from tests.conftest import DEFAULT_OPTIONS, REPO_ROOT, make_request

ILLEGAL_ADDRESS = "CUDA error: an illegal memory access was encountered"
# torch's text after the error's first line (c10/cuda: the help line and the asynchronous-error hint).
TORCH_SUFFIX = (
    "\nSearch for `cudaErrorIllegalAddress' in https://docs.nvidia.com/cuda/cuda-runtime-api/group__CUDART__TYPES.html"
    "\nCUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be"
    " incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1"
)
HANG_TIMEOUT_S = 0.2  # the bound on the device check in these tests (production: DEVICE_CHECK_TIMEOUT_S)


@pytest.mark.parametrize("text", STICKY_CUDA_ERRORS)
@pytest.mark.parametrize(
    "make",
    [
        lambda text: torch.AcceleratorError(f"CUDA error: {text}{TORCH_SUFFIX}"),
        lambda text: RuntimeError(f"CUDA error: {text}{TORCH_SUFFIX}"),  # older torch, and extensions' TORCH_CHECK
        lambda text: torch.AcceleratorError(f"CUDA driver error: {text}"),
        # A kernel compiled under SDXL_COMPILE (Triton's launcher: a RuntimeError with cuGetErrorString's text).
        lambda text: RuntimeError(f"Triton Error [CUDA]: {text}"),
    ],
    ids=["AcceleratorError", "RuntimeError", "driver-API", "Triton"],
)
def test_each_sticky_cuda_error_is_recognised_in_torch_s_wording(text, make):
    error = make(text)
    first_line = str(error).partition("\n")[0]
    assert sticky_cuda_error(error) == f'"{first_line}": {STICKY_CUDA_ERRORS[text]}'


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB"),
        torch.AcceleratorError("CUDA error: out of memory" + TORCH_SUFFIX),  # cudaMalloc outside the allocator
        torch.AcceleratorError("CUDA error: invalid configuration argument" + TORCH_SUFFIX),  # one launch's shape
        torch.AcceleratorError("CUDA error: too many resources requested for launch"),
        # Words a request controls, quoted in an error: only torch's own wording counts.
        InputError(f"lora_weights {ILLEGAL_ADDRESS}.safetensors: no such file"),
        RuntimeError(f"Could not read 'https://x.example/{ILLEGAL_ADDRESS}.safetensors'"),
        ValueError(ILLEGAL_ADDRESS),
    ],
    ids=["oom", "cudaMalloc-oom", "bad-launch", "launch-resources", "input-error", "quoted", "not-runtime"],
)
def test_out_of_memory_and_other_errors_are_not_sticky(error):
    assert sticky_cuda_error(error) is None
    health = DeviceHealth(device_check=None)
    health.record(error)
    health.check()


@pytest.mark.parametrize(
    "error,is_cuda",
    [
        (torch.AcceleratorError(ILLEGAL_ADDRESS + TORCH_SUFFIX), True),
        (torch.AcceleratorError("CUDA error: invalid configuration argument"), True),  # not sticky, still the GPU's
        (RuntimeError("Triton Error [CUDA]: unspecified launch failure"), True),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB."), True),
        (RuntimeError("Error(s) in loading state_dict for UNet2DConditionModel: size mismatch"), False),
        (RuntimeError(f"Could not read 'https://x.example/{ILLEGAL_ADDRESS}.safetensors'"), False),
        (ValueError(ILLEGAL_ADDRESS), False),
    ],
    ids=["sticky", "not-sticky", "triton", "oom", "bad-file", "quoted", "not-runtime"],
)
def test_cuda_error_tells_the_gpu_s_faults_from_the_rest(error, is_cuda):
    assert cuda_error(error) is is_cuda


def test_a_sticky_error_wrapped_in_another_is_found_through_its_causes():
    try:
        try:
            raise torch.AcceleratorError(ILLEGAL_ADDRESS + TORCH_SUFFIX)
        except RuntimeError as cuda_error:
            raise RuntimeError("the encoder thread failed") from cuda_error
    except RuntimeError as wrapped:
        meaning = STICKY_CUDA_ERRORS["an illegal memory access was encountered"]
        assert sticky_cuda_error(wrapped) == f'"{ILLEGAL_ADDRESS}": {meaning}'


def test_a_sticky_error_makes_the_health_check_fail_for_good_naming_the_first():
    health = DeviceHealth(device_check=None)
    health.check()
    health.record(torch.AcceleratorError("CUDA error: device-side assert triggered"))
    health.record(torch.AcceleratorError(ILLEGAL_ADDRESS))
    for _ in range(2):
        with pytest.raises(DeviceUnhealthy, match=r'failed with "CUDA error: device-side assert triggered": .*restart'):
            health.check()


def test_a_failing_device_check_fails_the_health_check_while_it_fails():
    failing = [True]

    def device_check():
        if failing[0]:
            raise torch.AcceleratorError(ILLEGAL_ADDRESS + TORCH_SUFFIX)

    health = DeviceHealth(device_check)
    with pytest.raises(DeviceUnhealthy, match=f"^the device check failed: {ILLEGAL_ADDRESS}$"):
        health.check()
    failing[0] = False
    health.check()


def test_a_hung_device_check_fails_the_health_check_in_bounded_time_without_piling_up():
    release, calls = threading.Event(), []

    def device_check():
        calls.append(1)
        release.wait(30)

    health = DeviceHealth(device_check, timeout_s=HANG_TIMEOUT_S)
    for _ in range(3):  # had one waited the check out, it would have passed instead
        with pytest.raises(DeviceUnhealthy, match="the device check has not finished after .* s: the GPU is hung"):
            health.check()
    assert len(calls) == 1  # later health checks waited on the hung run instead of starting another
    release.set()
    health.check()  # the hung run's result, now in
    health.check()  # and a new run
    assert len(calls) == 2


def test_the_cpu_has_no_device_check():
    DeviceHealth.for_device("cpu").check()


def test_a_prediction_s_sticky_cuda_error_reaches_the_health_check_unchanged(service, monkeypatch):
    monkeypatch.setattr(service, "health", DeviceHealth(device_check=None))
    unet = service.checkpoints.default.model.components["unet"]
    fault = torch.AcceleratorError(ILLEGAL_ADDRESS + TORCH_SUFFIX)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def poisoned(*args, **kwargs):
        raise fault

    monkeypatch.setattr(unet, "forward", out_of_memory)
    with pytest.raises(InputError, match="Out of GPU memory"):
        service.predict(make_request(), DEFAULT_OPTIONS, None, 0.6)
    service.health.check()

    monkeypatch.setattr(unet, "forward", poisoned)
    with pytest.raises(torch.AcceleratorError) as raised:
        service.predict(make_request(), DEFAULT_OPTIONS, None, 0.6)
    assert raised.value is fault  # the request fails with the GPU's own error
    with pytest.raises(DeviceUnhealthy, match="illegal memory access"):
        service.health.check()


# On a GPU: a real device-side assert poisons the context, and both signs see it. In a child process, since
# the context stays poisoned for the rest of the process.
POISON_THE_GPU = """
import torch
from sdxl_cog.device.health import DeviceHealth, DeviceUnhealthy, cuda_device_check, sticky_cuda_error
health = DeviceHealth(cuda_device_check("cuda"))
health.check()
try:
    torch.zeros(4, device="cuda")[torch.tensor([10], device="cuda")].sum().item()  # out of range: a failed assert
except RuntimeError as error:
    print("sticky:", sticky_cuda_error(error))
try:
    health.check()
except DeviceUnhealthy as unhealthy:
    print("device check:", unhealthy)
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_real_device_side_assert_is_sticky_and_fails_the_device_check():
    done = subprocess.run(
        [sys.executable, "-c", POISON_THE_GPU], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert 'sticky: "CUDA error: device-side assert triggered"' in done.stdout, done.stdout + done.stderr
    assert "device check: the device check failed: CUDA error: device-side assert triggered" in done.stdout
