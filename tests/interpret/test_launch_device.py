"""Every kernel launch goes through ``device_guard`` with its output's device (issue 10: a layer on
cuda:1 must not launch on the current device 0); on the interpreter that device is the CPU."""

import torch

import sparsec
import sparsec.runtime.launch as launch
from sparsec import config


def test_every_launch_enters_the_guard_of_its_output_device(monkeypatch):
    devices = []
    original = launch.device_guard
    monkeypatch.setattr(launch, "device_guard", lambda d: devices.append(d) or original(d))
    layer = sparsec.SparseLinear(16, 8, spec="2:4")
    with config.patch(backend="interpret"):
        layer(torch.randn(3, 16, requires_grad=True)).sum().backward()
    assert len(devices) == 3 and all(d == torch.device("cpu") for d in devices)  # forward and both gradients
