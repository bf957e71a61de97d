"""Test setup: the suite tests what was built; Triton kernels run on the CPU under the interpreter
when no GPU is present.

Both switches are environment variables set here, before sgg_kernels is imported by any test module,
so that the subprocesses the tests start (tests/helpers.py: run_python) inherit them:

- SGG_KERNELS_REQUIRE_EXTENSION=1: importing sgg_kernels without its compiled extension is an
  ImportError, not a warning and a silent fall back to the reference backend. The one test of the
  fallback asks for it by name (test_machinery.py, SGG_KERNELS_REQUIRE_EXTENSION=0).
- TRITON_INTERPRET=1 (no GPU): must be set before any Triton kernel module is imported.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
os.environ["SGG_KERNELS_REQUIRE_EXTENSION"] = "1"
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sgg_kernels as sk  # noqa: E402  (after TRITON_INTERPRET)
from sgg_kernels import _backend  # noqa: E402


@pytest.fixture(autouse=True)
def _clean_switches(monkeypatch):
    """Every test starts with automatic backend choice, index checks on and the default dot precision."""
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.delenv(_backend.PRECISION_ENV, raising=False)
    sk.set_checks(True)
    _backend._PRECISION["fp32"] = None
    yield
    sk.set_checks(True)
    _backend._PRECISION["fp32"] = None


def pytest_report_header(config):
    return [
        f"sgg_kernels: extension {'loaded' if _backend._C is not None else 'MISSING: ' + str(_backend.C_ERROR)}, "
        f"CUDA kernels {'built' if _backend.c_has_cuda() else 'not built'}, "
        f"GPU {'present' if HAS_CUDA else 'absent (CUDA tests skip; Triton runs under TRITON_INTERPRET=1)'}"
    ]
