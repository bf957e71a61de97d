"""Shared test helpers: backend/device parametrisation, float64 reference runs, comparisons."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch

import sgg_kernels as sk
from sgg_kernels import _backend

HAS_CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[1]  # the checkout: scripts under python/, benchmarks/
PACKAGE_PARENT = str(Path(sk.__file__).resolve().parents[1])  # where this process imported sgg_kernels from


def run_python(args: Sequence[str], env: Optional[Dict[str, str]] = None, cwd=None, timeout: float = 600):
    """``python *args`` in a subprocess that imports the same sgg_kernels as this test process.

    Its PYTHONPATH starts with the folder this process imported sgg_kernels from, and it runs in an
    empty temporary folder unless ``cwd`` is given, so neither the checkout's sources (which lack _C
    after a non-editable install) nor the working directory can shadow the package under test. It
    inherits SGG_KERNELS_REQUIRE_EXTENSION=1 from conftest.py: a missing _C fails it. Triton runs
    compiled (TRITON_INTERPRET=0) unless ``env`` says otherwise. Paths in ``args`` under the
    checkout should be absolute (``ROOT / "python/x.py"``).
    """
    merged = {**os.environ, "TRITON_INTERPRET": "0", **(env or {})}
    merged["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, merged.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="sgg-subprocess-") as scratch:
        return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                              cwd=str(cwd or scratch), env=merged, timeout=timeout)

# Norm-relative tolerance |a - b| / |b| per dtype of the kernel's inputs (the oracle is float64).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def backend_params(kernel_tables: Sequence, compiled_only: bool = True) -> List:
    """pytest params (backend, device) for every compiled backend an op has, CPU and CUDA.

    Combinations that cannot run *here* (no GPU, no interpreter) are still generated and skip
    at run time with the reason, so a missing GPU shows up as skips, never as passes.
    """
    params = []
    for backend in ("cpu", "triton", "cuda"):
        if not all(getattr(k, backend) is not None for k in kernel_tables):
            continue  # the op has no such kernel (structural, see DESIGN.md's table)
        for device in ("cpu", "cuda"):
            if backend == "cpu" and device == "cuda" or backend == "cuda" and device == "cpu":
                continue
            marks = [pytest.mark.cuda] if device == "cuda" else []
            params.append(pytest.param(backend, device, marks=marks, id=f"{backend}-{device}"))
    return params


def gradcheck_params(tables: dict, names: Sequence[str]) -> List:
    """pytest params (backend, device, name) for gradcheck: the reference, then every compiled
    backend of each op. ``names`` may carry a suffix after the op name (``cosine_assign_plain``):
    the table is looked up by the longest op name it starts with."""
    params = []
    for name in names:
        op = max((op for op in tables if name.startswith(op)), key=len)
        params.append(pytest.param("reference", "cpu", name, id=f"reference-cpu-{name}"))
        for p in backend_params(tables[op]):
            backend, device = p.values
            params.append(pytest.param(backend, device, name, marks=p.marks, id=f"{p.id}-{name}"))
    return params


def require(kernel_tables: Sequence, backend: str, device: str) -> None:
    """Skip (visibly) if ``backend`` cannot run on ``device`` here; fail if the build is broken."""
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    for k in kernel_tables:
        why = k.why_not(backend, device)
        if why is not None:
            if backend == "cpu" and _backend._C is None:
                pytest.fail(f"the compiled extension did not load: {_backend.C_ERROR}")
            pytest.skip(why)


def to_ref(x):
    """A float64 CPU leaf copy of a float tensor (same rounded values); other values unchanged."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().to("cpu", torch.float64).requires_grad_(x.requires_grad)
    if isinstance(x, torch.Tensor):
        return x.to("cpu")
    return x


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, f"shape {list(a.shape)} != {list(e.shape)}"
    assert torch.isfinite(a).all() == torch.isfinite(e).all(), "non-finite values differ"
    # Relative to the reference's norm, but never to less than an rms of 1 per element: values that
    # vanish mathematically (e.g. d cos / d feats when D = 1) are compared in absolute terms.
    denom = max(e.norm().item(), math.sqrt(max(e.numel(), 1)))
    return (a - e).norm().item() / denom


def assert_close(actual, expected, dtype, what: str, scale: float = 1.0) -> None:
    err = rel_err(actual, expected)
    tol = TOL[dtype] * scale
    assert err <= tol and not math.isnan(err), f"{what}: relative error {err:.3g} > {tol:.1g} ({dtype})"


def run_with_grads(backend: str, fn: Callable, args: Sequence, seed: int = 0, round_to: torch.dtype = None):
    """Run ``fn(*args)`` on ``backend``; return (outputs, grads of every float leaf arg).

    Float outputs are contracted with fixed random cotangents (drawn in float64, rounded to the
    output dtype, identical for every backend) so every output and every gradient is checked.
    ``round_to``: round the cotangents through this dtype first (the kernel run's dtype), so a
    float64 reference run sees the very values the kernel saw.
    """
    with sk.use_backend(backend):
        outs = fn(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        float_outs = [o for o in outs if o.is_floating_point() and o.requires_grad]
        gen = torch.Generator().manual_seed(seed)
        cots = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(round_to or o.dtype).to(o.dtype).to(o.device)
                for o in float_outs]
        grads = torch.autograd.grad(float_outs, leaves, cots, allow_unused=True) if leaves and float_outs else ()
    return outs, grads


class BoxList:
    """A stand-in for maskrcnn_benchmark's BoxList, the part sgg_kernels.integrations.sgb reads
    (bbox, size, mode, fields, len, convert). ``bbox`` becomes float32 as in SGB's constructor;
    ``dtype=None`` keeps the given tensor's dtype (float64 gradient tests)."""

    def __init__(self, bbox, image_size, mode="xyxy", dtype=torch.float32):
        bbox = torch.as_tensor(bbox, dtype=dtype) if dtype is not None else torch.as_tensor(bbox)
        self.bbox = bbox.reshape(-1, 4)
        self.size = image_size  # (width, height)
        self.mode = mode
        self.extra_fields = {}

    def add_field(self, name, value):
        self.extra_fields[name] = value

    def get_field(self, name):
        return self.extra_fields[name]

    def has_field(self, name):
        return name in self.extra_fields

    def fields(self):
        return list(self.extra_fields)

    def __len__(self):
        return self.bbox.shape[0]

    def convert(self, mode):
        if mode == self.mode:
            return self
        x1, y1, a, b = self.bbox.unbind(1)
        if mode == "xywh":  # SGB's TO_REMOVE = 1 convention
            out = torch.stack((x1, y1, a - x1 + 1, b - y1 + 1), 1)
        else:
            out = torch.stack((x1, y1, x1 + (a - 1).clamp(min=0), y1 + (b - 1).clamp(min=0)), 1)
        new = BoxList(out, self.size, mode, dtype=None)
        new.extra_fields = dict(self.extra_fields)
        return new
