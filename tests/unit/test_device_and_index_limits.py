"""Launches run on their tensors' device, and index buffers refuse to wrap past int32 (issue 10)."""

import contextlib

import pytest
import torch

from sparsec import ShapeError
from sparsec.formats.base import int32_index
from sparsec.runtime.launch import device_guard


def test_a_launch_on_cuda_1_makes_cuda_1_current():
    guard = device_guard(torch.device("cuda", 1))  # built without entering it: no CUDA needed here
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)


def test_int32_index_buffers_refuse_to_wrap():
    small = torch.tensor([0, 5, 2**31 - 1])
    assert int32_index(small, "row offsets").dtype == torch.int32
    assert int(int32_index(small, "row offsets")[-1]) == 2**31 - 1
    with pytest.raises(ShapeError, match=r"row offsets reach 2147483648, past int32 \(2\^31 - 1\): split the layer"):
        int32_index(torch.tensor([0, 2**31]), "row offsets")
