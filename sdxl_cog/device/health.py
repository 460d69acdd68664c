"""Whether this worker's GPU still works, for the predictor's healthcheck().

coglet calls healthcheck() on each GET /health-check once setup has succeeded (also while a prediction
runs) and answers UNHEALTHY, with the reason in `user_healthcheck_error`, when it raises, returns False or
takes over 5 s. It keeps serving predictions all the same: taking the replica out of traffic and restarting
it is the probes' job (deploy/probe.py).

Two signs of a broken GPU:
- A sticky CUDA error met by a prediction. After an illegal memory access, a failed device-side assert, an
  uncorrectable ECC error and the like the process's CUDA context is poisoned: every later CUDA call fails
  the same way and only a new process recovers. Out of memory is not one of them (memory.py recovers).
- A device check: a tiny kernel on a stream of its own, waited for at most DEVICE_CHECK_TIMEOUT_S, which
  fails on a poisoned context and times out on a hung GPU. There is none on the CPU.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

import torch

# The errors after which, in the words of the CUDA Runtime API's cudaError_t documentation, "any further
# CUDA work will return the same error. To continue using CUDA, the process must be terminated and
# relaunched", by their cudaGetErrorString text, with what each means. The uncorrectable ECC and NVLink
# errors are hardware faults with the same outcome: the contexts that met them are lost, and the GPU needs
# a reset (NVIDIA's GPU memory error management) before its remapped memory is used.
STICKY_CUDA_ERRORS = {
    "an illegal memory access was encountered": "a kernel touched memory it does not own (cudaErrorIllegalAddress)",
    "device-side assert triggered": "a kernel's assertion failed, e.g. an index out of range (cudaErrorAssert)",
    "unspecified launch failure": "a kernel crashed (cudaErrorLaunchFailure)",
    "the launch timed out and was terminated": "a kernel ran past the watchdog (cudaErrorLaunchTimeout)",
    "an illegal instruction was encountered": "cudaErrorIllegalInstruction",
    "misaligned address": "cudaErrorMisalignedAddress",
    "operation not supported on global/shared address space": "cudaErrorInvalidAddressSpace",
    "invalid program counter": "cudaErrorInvalidPc",
    "hardware stack error": "cudaErrorHardwareStackError",
    "uncorrectable ECC error encountered": "the GPU's memory lost data (cudaErrorECCUncorrectable)",
    "uncorrectable NVLink error detected during the execution": "cudaErrorNvlinkUncorrectable",
}
# How PyTorch words a CUDA error (c10/cuda/CUDAException.cpp, C10_CUDA_CHECK; the driver API's check says
# "CUDA driver error: "), raised as torch.AcceleratorError, a RuntimeError; and how Triton words one met by
# the kernels SDXL_COMPILE compiles (triton-lang/triton, third_party/nvidia/backend/driver.c, gpuAssert:
# the prefix, then cuGetErrorString's text), raised as a RuntimeError. Only the start of a message is
# read: an error that merely quotes these words (a request's text, a file name) is not one.
CUDA_ERROR_PREFIXES = ("CUDA error: ", "CUDA driver error: ", "Triton Error [CUDA]: ")
# How far along an exception's causes to look for a CUDA error that another exception wraps.
MAX_CAUSES = 8
# Below coglet's 5 s healthcheck timeout and deploy/probe.py's 4 s request timeout, so that a hung GPU gets
# its own message in /health-check and the probes read it. A tiny kernel takes microseconds, also beside a
# running prediction (its stream does not wait for the prediction's), so the margin is wide.
DEVICE_CHECK_TIMEOUT_S = 2.0


class DeviceUnhealthy(RuntimeError):
    """The GPU cannot serve predictions; the message says why. Only a new process recovers."""


def sticky_cuda_error(error: BaseException) -> str | None:
    """The sticky CUDA error behind `error` (or one of its causes), with what it means; None if there is none."""
    for _ in range(MAX_CAUSES):
        first_line = str(error).partition("\n")[0]
        if isinstance(error, RuntimeError) and (meaning := _sticky_meaning(first_line)) is not None:
            return f'"{first_line}": {meaning}'
        error = error.__cause__ or error.__context__
        if error is None:
            break
    return None


def cuda_error(error: BaseException) -> bool:
    """Whether `error` itself is one CUDA raised, sticky or not (out of memory included): a fault of the
    GPU, never of a request's input."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and str(error).startswith(CUDA_ERROR_PREFIXES)
    )


def _sticky_meaning(first_line: str) -> str | None:
    prefix = next((p for p in CUDA_ERROR_PREFIXES if first_line.startswith(p)), None)
    if prefix is None:
        return None
    text = first_line.removeprefix(prefix)
    return next((meaning for sticky, meaning in STICKY_CUDA_ERRORS.items() if text.startswith(sticky)), None)


class DeviceHealth:
    """The state healthcheck() reports: broken once a prediction met a sticky CUDA error, and whenever the
    device check fails or does not finish in time."""

    def __init__(self, device_check: Callable[[], None] | None, timeout_s: float = DEVICE_CHECK_TIMEOUT_S):
        self._device_check = device_check
        self._timeout_s = timeout_s
        self._sticky: str | None = None
        self._lock = threading.Lock()
        self._running: _CheckRun | None = None

    @classmethod
    def for_device(cls, device: str) -> DeviceHealth:
        make_check = DEVICE_CHECKS.get(torch.device(device).type)
        return cls(make_check(device) if make_check else None)

    def record(self, error: BaseException) -> None:
        """Remember `error` if it is a sticky CUDA error: a prediction that failed calls this."""
        if self._sticky is None:
            self._sticky = sticky_cuda_error(error)

    def check(self) -> None:
        """Return if the GPU works; raise DeviceUnhealthy saying why otherwise."""
        if self._sticky is not None:
            raise DeviceUnhealthy(f"a prediction failed with {self._sticky}; the GPU's context is lost until restart")
        if self._device_check is not None:
            self._run_device_check()

    def _run_device_check(self) -> None:
        # One run at a time: while a check hangs, later health checks wait on it rather than pile up threads.
        with self._lock:
            if self._running is None:
                self._running = _CheckRun(self._device_check)
            run = self._running
        if not run.done.wait(self._timeout_s):
            waited = time.monotonic() - run.started
            raise DeviceUnhealthy(f"the device check has not finished after {waited:.1f} s: the GPU is hung")
        with self._lock:
            if self._running is run:
                self._running = None
        if run.error is not None:
            reason = str(run.error).partition("\n")[0]
            raise DeviceUnhealthy(f"the device check failed: {reason}") from run.error


class _CheckRun:
    """One run of a device check on a daemon thread: a hung GPU never returns, and must not keep the worker
    from exiting."""

    def __init__(self, check: Callable[[], None]):
        self.started = time.monotonic()
        self.done = threading.Event()
        self.error: BaseException | None = None
        threading.Thread(target=self._run, args=(check,), name="device-check", daemon=True).start()

    def _run(self, check: Callable[[], None]) -> None:
        try:
            check()
        except Exception as error:  # whatever the device raises, it is the answer
            self.error = error
        finally:
            self.done.set()


def cuda_device_check(device: str) -> Callable[[], None]:
    """A check that has the GPU add 1 to a new number each time and reads the sum back. Its memory is
    allocated here, at setup, so that a GPU full of a prediction's tensors does not fail it: only a broken
    device does."""
    number = torch.zeros(1, dtype=torch.int64, device=device)
    # A pooled stream, created non-blocking (c10/cuda/CUDAStream.cpp): its kernels do not queue behind the
    # ones a prediction runs on the default stream.
    stream = torch.cuda.Stream(device)
    runs = itertools.count(1)

    def check() -> None:
        n = next(runs)
        with torch.cuda.stream(stream):
            number.fill_(n)
            number.add_(1)
            stream.synchronize()  # waits with the GIL released: a hung GPU stalls this thread only
            total = int(number.item())
        if total != n + 1:
            raise DeviceUnhealthy(f"the GPU computed {n} + 1 = {total}")

    return check


# Device checks by torch device type; other types (the CPU) have none.
DEVICE_CHECKS: dict[str, Callable[[str], Callable[[], None]]] = {"cuda": cuda_device_check}
