"""Shared test helpers: float64 references, the tolerance table, and a CPU peak-memory probe."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from sparsec import config

# One table of tolerances per dtype, for results compared with a float64 reference.
# Half types compute in float32 on the CPU path: the error is the final rounding (2^-8, 2^-11).
TOLERANCES = {
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float64: dict(atol=1e-12, rtol=1e-12),
}

# Every structure, each on a shape that is not a multiple of any tile or block it could use.
SPECS_AND_SHAPES = [
    ("90%", 37, 53),
    ("unstructured(0.5)", 19, 31),
    ("2:4", 37, 52),
    ("1:8", 21, 40),
    ("block(4x8, 50%)", 36, 48),
    ("block(3x5, 75%)", 21, 35),
    ("fanin(k=5)", 37, 53),
    ("fanin(80%)", 23, 41),
]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Close within the dtype's tolerances; on failure report how many elements and where."""
    tol = TOLERANCES[dtype]
    actual, expected = actual.double(), expected.double()
    bad = ~torch.isclose(actual, expected, **tol)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements differ beyond {tol}; first at {idx}; "
            f"max abs error {(actual - expected).abs().max().item():.3e}"
        )


def peak_allocated_bytes(fn) -> int:
    """Peak of live CPU tensor bytes allocated while ``fn`` runs (from the profiler's memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


# Generated kernels accumulate in fp32 and round once on store: error relative to the output's scale.
KERNEL_RTOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_kernel_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    rtol = KERNEL_RTOL[dtype]
    scale = expected.abs().max().item() if expected.numel() else 0.0
    actual, expected = actual.double(), expected.double()
    bad = ~torch.isclose(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30))
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements beyond rtol {rtol} of scale {scale:.3g} "
            f"(NaN = never written); first at {idx}; got {actual[bad][:3].tolist()} want {expected[bad][:3].tolist()}"
        )


def assert_interpret_matches_cpu(layer, x: torch.Tensor) -> None:
    """Forward and every gradient of ``layer`` on the interpret backend (generated kernels) equal the cpu
    backend's, within the fp32 kernel tolerance."""
    results = {}
    for backend in ("cpu", "interpret"):
        layer.zero_grad()
        x.grad = None
        with config.patch(backend=backend):
            y = layer(x)
            y.square().sum().backward()
        results[backend] = (y.detach(), x.grad.clone(), layer.values.grad.clone(), layer.bias.grad.clone())
    for what, a, b in zip(("y", "dx", "dvalues", "dbias"), results["interpret"], results["cpu"], strict=True):
        assert_kernel_close(a, b, torch.float32, what)


def largest_allocation_bytes(fn) -> int:
    """Bytes of the largest single CPU tensor allocation while ``fn`` runs (the profiler's memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    return max(sizes, default=0)
