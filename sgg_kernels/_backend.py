"""Backend selection, the compiled extension, and the global switches.

Every op has a *reference* implementation (pure PyTorch) and some compiled ones:

- ``"cpu"``:    C++ kernels in ``sgg_kernels._C`` for CPU tensors;
- ``"cuda"``:   CUDA C++ kernels in ``sgg_kernels._C`` for CUDA tensors;
- ``"triton"``: Triton kernels for CUDA tensors (and for CPU tensors under ``TRITON_INTERPRET=1``,
  which is how the tests check them without a GPU).

By default an op runs the fastest backend it has for the device of its inputs. ``use_backend(name)``
(a context manager) or the environment variable ``SGG_KERNELS_BACKEND`` force one; forcing a backend
an op does not have on that device raises an error that lists what it has. The choice is made when
the op runs (inside the registered op), so it works the same in eager mode and under
``torch.compile``.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, Optional

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
ENV_VAR = "SGG_KERNELS_BACKEND"

# ---------------------------------------------------------------------------------------------
# The compiled extension. A missing or broken build never breaks `import sgg_kernels`.
# ---------------------------------------------------------------------------------------------
REQUIRE_ENV = "SGG_KERNELS_REQUIRE_EXTENSION"  # "1": a missing or broken _C is an ImportError (the tests set it)

_C = None
C_ERROR: Optional[str] = None
try:
    _C = importlib.import_module("sgg_kernels._C")  # registers torch.ops.sgg_kernels._* kernels
except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
    C_ERROR = f"{type(exc).__name__}: {exc}"
    _where = os.path.dirname(os.path.abspath(__file__))
    if os.environ.get(REQUIRE_ENV) == "1":
        raise ImportError(
            f"sgg_kernels: the compiled extension sgg_kernels._C could not be loaded from {_where} ({C_ERROR}), "
            f"and {REQUIRE_ENV}=1 asks for it. Build it in place with `pip install --no-build-isolation -e .` "
            "(or `make build`); after a non-editable install, run Python from outside the source checkout so "
            "that the installed package, not the checkout's sources, is imported."
        ) from exc
    warnings.warn(
        "sgg_kernels: the compiled extension sgg_kernels._C could not be loaded "
        f"from {_where} ({C_ERROR}); the pure-PyTorch reference backend will run instead. "
        "Rebuild with `pip install --no-build-isolation .`, and see `python -m sgg_kernels.info`.",
        RuntimeWarning,
        stacklevel=2,
    )


def c_has_cuda() -> bool:
    """Whether the compiled extension was built with its CUDA kernels."""
    return _C is not None and bool(torch.ops.sgg_kernels._built_with_cuda())


TRITON_ERROR: Optional[str] = None
try:
    import triton  # noqa: F401
except Exception as exc:
    triton = None
    TRITON_ERROR = f"{type(exc).__name__}: {exc}"


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------
# Switches: forced backend and index-value checks.
# ---------------------------------------------------------------------------------------------
# Process-wide, not thread-local: autograd runs CUDA backward passes on its own device threads,
# and a backward called inside a `use_backend` block must see the same choice as the forward.
_FORCED = {"backend": None}
_CHECKS = {"on": True}


def _forced() -> Optional[str]:
    name = _FORCED["backend"]
    if name is None:
        name = os.environ.get(ENV_VAR) or None
    return name


def _validate_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force every op called inside the block to run on backend ``name``.

    ``name`` is one of ``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``, or ``None`` to restore
    automatic selection (and ignore ``SGG_KERNELS_BACKEND``). Nests. Process-wide (so the
    autograd engine's threads see it too): do not flip it from several threads at once.
    Example::

        with sk.use_backend("reference"):
            out = sk.cluster_aggregate(values, assign, sim, value_centers)
    """
    if name is not None:
        _validate_name(name)
    previous = _FORCED["backend"]
    _FORCED["backend"] = name if name is not None else ""
    try:
        yield
    finally:
        _FORCED["backend"] = previous


def set_checks(enabled: bool) -> None:
    """Turn the checks of index *values* (ranges, same image) on or off. On by default.

    Shape, dtype and device checks always run (they cost nothing). With value checks off, kernels
    still never read or write out of bounds: an out-of-range index contributes zeros.
    """
    _CHECKS["on"] = bool(enabled)


def checks_enabled() -> bool:
    """The switch of :func:`set_checks` (process-wide; :func:`value_checks_on` is what an op reads)."""
    return _CHECKS["on"]


# A module whose forward has checked all of its packed inputs in one fused reduction (one sync)
# calls its ops inside `suspended_value_checks()`, so that they do not check (and sync) again. Per
# thread: the suspension covers the ops the module's forward calls on its own thread (the ops' value
# checks run in their forward bodies, never in a backward on autograd's threads), not other threads'
# ops. Shape, dtype and device checks are plain Python in the ops' wrappers and always run.
_SUSPENDED = threading.local()


def value_checks_on() -> bool:
    """Whether an op runs its value checks now: :func:`set_checks` is on and no enclosing module has
    suspended them on this thread (:func:`suspended_value_checks`, after checking its inputs)."""
    return _CHECKS["on"] and not getattr(_SUSPENDED, "depth", 0)


@contextlib.contextmanager
def suspended_value_checks() -> Iterator[None]:
    """Skip the ops' value checks (index ranges, same image, finite boxes: a reduction and a host
    sync each) inside the block, on this thread; shape, dtype and device checks still run.

    For modules only, and only after they have checked, in one fused reduction, every value the ops
    called inside the block would check (see ``_checks.module_value_checks``). Nests; restored on
    exceptions. Not for use inside ``torch.compile``'d code (the modules take the ops' own checks
    there: a traced graph runs its ops after the forward that traced them has returned).
    """
    depth = getattr(_SUSPENDED, "depth", 0)
    _SUSPENDED.depth = depth + 1
    try:
        yield
    finally:
        _SUSPENDED.depth = depth


# ---------------------------------------------------------------------------------------------
# Precision of the Triton kernels' float32 matrix products.
# ---------------------------------------------------------------------------------------------
PRECISIONS = ("tf32x3", "ieee", "tf32")
PRECISION_ENV = "SGG_KERNELS_PRECISION"
_PRECISION = {"fp32": None}


def set_precision(precision: str) -> None:
    """Choose how the Triton kernels compute float32 matrix products (``tl.dot``) on a GPU.

    - ``"tf32x3"`` (the default): tensor cores, three TF32 products per product (each operand split
      into a TF32 high part and a TF32 remainder, the lo x lo term dropped), ~1e-6 relative error:
      close to fp32, at a third of the tensor-core rate (still several times the FMA rate).
    - ``"ieee"``: exact fp32 FMA, no tensor cores: the slowest, bit-for-bit the fp32 math.
    - ``"tf32"``: one TF32 product (10 mantissa bits, ~1e-3 relative error): the fastest; can flip
      near-tied argmax assignments in ``cosine_assign``.

    float64 dots are always IEEE, fp16/bf16 inputs always take native tensor-core dots with fp32
    accumulation, and under ``TRITON_INTERPRET=1`` every dot is IEEE (the interpreter computes in
    numpy). The C++ and CUDA C++ kernels do not use it. The environment variable
    ``SGG_KERNELS_PRECISION`` sets the initial value. Process-wide, like :func:`set_checks`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    _PRECISION["fp32"] = precision


def get_precision() -> str:
    """The float32 dot precision of the Triton kernels (see :func:`set_precision`)."""
    p = _PRECISION["fp32"]
    if p is None:
        p = os.environ.get(PRECISION_ENV) or "tf32x3"
        if p not in PRECISIONS:
            raise ValueError(f"{PRECISION_ENV}={p!r}; expected one of {', '.join(PRECISIONS)}")
    return p


@contextlib.contextmanager
def precision(name: str) -> Iterator[None]:
    """:func:`set_precision` for the duration of a ``with`` block (nests)::

        with sk.precision("ieee"):
            out = sk.pairwise_edge_fusion(...)
    """
    previous = _PRECISION["fp32"]
    set_precision(name)
    try:
        yield
    finally:
        _PRECISION["fp32"] = previous


def dot_precision(acc_dtype: torch.dtype) -> str:
    """The ``input_precision`` a Triton launcher passes for a dot accumulating in ``acc_dtype``."""
    if acc_dtype == torch.float64 or triton_interpret():
        return "ieee"
    return get_precision()


# ---------------------------------------------------------------------------------------------
# Per-op backend tables.
# ---------------------------------------------------------------------------------------------
@dataclass
class Kernels:
    """The implementations of one function (a forward or a backward) by backend.

    ``reference`` is a Python callable. ``cpu``/``cuda`` name an op of the compiled extension
    (``torch.ops.sgg_kernels.<name>``), ``triton`` names a function in ``sgg_kernels.triton.<family>``.
    All take the same arguments in the same order as the reference.
    """

    family: str
    reference: Callable
    cpu: Optional[str] = None
    cuda: Optional[str] = None
    triton: Optional[str] = None
    _cache: Dict[str, Callable] = field(default_factory=dict, repr=False)

    # -- availability ------------------------------------------------------------------------
    def why_not(self, backend: str, device_type: str) -> Optional[str]:
        """``None`` if ``backend`` can run on ``device_type``, else a sentence saying why not."""
        if backend == "reference":
            return None
        if backend == "cpu":
            if self.cpu is None:
                return "no C++ CPU kernel for this op"
            if device_type != "cpu":
                return f"the C++ CPU kernels take CPU tensors, not {device_type}"
            if _C is None:
                return f"the compiled extension is not loaded ({C_ERROR})"
            return None
        if backend == "cuda":
            if self.cuda is None:
                return "no CUDA C++ kernel for this op"
            if device_type != "cuda":
                return f"the CUDA C++ kernels take CUDA tensors, not {device_type}"
            if _C is None:
                return f"the compiled extension is not loaded ({C_ERROR})"
            if not c_has_cuda():
                return "the extension was built without CUDA (CPU torch, or nvcc not found)"
            return None
        if backend == "triton":
            if self.triton is None:
                return "no Triton kernel for this op"
            if triton is None:
                return f"triton is not importable ({TRITON_ERROR})"
            if device_type == "cpu" and not triton_interpret():
                return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
            if device_type not in ("cpu", "cuda"):
                return f"Triton kernels take CUDA tensors, not {device_type}"
            return None
        return f"unknown backend {backend!r}"

    def default(self, device_type: str) -> str:
        order = ("cuda", "triton", "reference") if device_type == "cuda" else ("cpu", "reference")
        for name in order:
            if self.why_not(name, device_type) is None:
                return name
        return "reference"

    def select(self, device_type: str) -> str:
        forced = _forced()
        if not forced:
            return self.default(device_type)
        _validate_name(forced)
        reason = self.why_not(forced, device_type)
        if reason is not None:
            have = [b for b in BACKENDS if self.why_not(b, device_type) is None]
            raise RuntimeError(
                f"backend {forced!r} was forced (use_backend / {ENV_VAR}) but cannot run "
                f"{self.reference.__name__} on {device_type}: {reason}; available here: {', '.join(have)}"
            )
        return forced

    def resolve(self, backend: str) -> Callable:
        fn = self._cache.get(backend)
        if fn is not None:
            return fn
        if backend == "reference":
            fn = self.reference
        elif backend in ("cpu", "cuda"):
            fn = getattr(torch.ops.sgg_kernels, getattr(self, backend))
        else:
            module = importlib.import_module(f"sgg_kernels.triton.{self.family}")
            fn = getattr(module, self.triton)
        self._cache[backend] = fn
        return fn

    def __call__(self, device: torch.device, *args):
        backend = self.select(device.type)
        fn = self.resolve(backend)
        if backend == "triton" and device.type == "cuda":
            # A Triton launch runs on the current device, not on its tensors' one (the CUDA C++
            # kernels take a device guard themselves): tensors on cuda:1 with cuda:0 current would
            # otherwise run on the wrong GPU.
            with torch.cuda.device(device):
                return fn(*args)
        return fn(*args)
