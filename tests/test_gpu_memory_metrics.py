"""Peak GPU memory in every prediction's metrics: absent on CPU, computed from the device's figures on a GPU
(here a stand-in that answers as torch.cuda would)."""

from __future__ import annotations

import pytest
import torch

from sdxl_cog.device.memory import GIB, PeakMemoryMeter
from tests.conftest import run

KEYS = {"gpu_peak_memory_bytes", "gpu_memory_fraction"}


def test_absent_on_cpu(service):
    assert service.settings.device == "cpu"
    assert not KEYS & set(run(service, num_inference_steps=1).metrics)


class FakeGpu:
    """What torch.cuda's peak statistics would answer: each prediction reaches a different peak."""

    def __init__(self, peaks):
        self.peaks = list(peaks)
        self.resets = 0
        self.peak = 0

    def reset(self):
        self.resets += 1
        self.peak = self.peaks.pop(0)

    def read(self):
        return self.peak


@pytest.fixture
def fake_gpu(service, monkeypatch):
    gpu = FakeGpu([int(9.5 * GIB), 3 * GIB])
    monkeypatch.setattr(service, "gpu_memory", PeakMemoryMeter(80 * GIB, gpu.reset, gpu.read))
    return gpu


def test_each_prediction_reports_its_own_peak_and_fraction_of_the_card(service, fake_gpu):
    first = run(service, num_inference_steps=1).metrics
    assert first["gpu_peak_memory_bytes"] == int(9.5 * GIB)
    assert first["gpu_memory_fraction"] == round(9.5 / 80, 4)
    second = run(service, num_inference_steps=1).metrics
    assert second["gpu_peak_memory_bytes"] == 3 * GIB and second["gpu_memory_fraction"] == 0.0375
    assert fake_gpu.resets == 2  # the peak is measured from each prediction's start


def test_the_cuda_meter_reads_torch_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"total_memory": 100})())
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(("reset", str(d))))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: calls.append(("peak", str(d))) or 25)
    meter = PeakMemoryMeter.for_device("cuda:0")
    meter.start()
    assert meter.metrics() == {"gpu_peak_memory_bytes": 25, "gpu_memory_fraction": 0.25}
    assert calls == [("reset", "cuda:0"), ("peak", "cuda:0")]
