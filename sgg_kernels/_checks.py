"""Argument checks shared by every op: messages name the argument and what was expected.

Shape, dtype and device checks run in the Python wrappers before any op is dispatched (they are
free and trace cleanly under ``torch.compile``). Checks of index *values* cost a reduction and a
device sync; they run inside the registered ops, only while ``set_checks(True)`` (the default).

A module (``sgg_kernels.models``) checks the values of all its packed inputs once per forward, in one
fused reduction and one sync, then calls its ops inside ``_backend.suspended_value_checks()`` so that
they do not check again: :func:`module_value_checks` says whether it should, :func:`index_ranges`
does the fused part of the work.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch

from ._backend import value_checks_on

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(x: torch.Tensor) -> str:
    return f"{str(x.dtype).replace('torch.', '')} tensor of shape {list(x.shape)} on {x.device}"


def tensor(x, name: str, dims: str, *, kind: str = "float") -> torch.Tensor:
    """Check that ``x`` is a tensor with ``len(dims.split(','))`` dims of the given kind.

    ``kind`` is ``"float"`` (float16/bfloat16/float32/float64) or ``"index"`` (int64).
    ``dims`` is how the docstring writes the shape, e.g. ``"B, M, D"``.
    """
    names = [d.strip() for d in dims.split(",")]
    want = "a floating" if kind == "float" else "an int64"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be {want} tensor of shape [{dims}], got {type(x).__name__}")
    if x.dim() != len(names):
        raise ValueError(f"{name} must have shape [{dims}] ({len(names)} dims), got {_describe(x)}")
    if kind == "float" and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float16/bfloat16/float32/float64 tensor [{dims}], got {_describe(x)}")
    if kind == "index" and x.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor [{dims}], got {_describe(x)}")
    return x


def size(x: torch.Tensor, name: str, dim: int, expected: int, what: str) -> None:
    """Check ``x.shape[dim] == expected``; ``what`` says where ``expected`` comes from."""
    if x.shape[dim] != expected:
        raise ValueError(f"{name} has size {x.shape[dim]} in dim {dim} (shape {list(x.shape)}), expected {expected} ({what})")


def same_device(named: Sequence[tuple]) -> None:
    """All tensors in ``[(name, tensor or None), ...]`` on the first one's device."""
    first_name, first = named[0]
    for name, t in named[1:]:
        if t is not None and t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; move them to one device")


def same_float_dtype(named: Sequence[tuple]) -> None:
    """All floating tensors share a dtype, unless autocast is on (the op then casts them)."""
    first_name, first = named[0]
    if torch.is_autocast_enabled(first.device.type):
        return
    for name, t in named[1:]:
        if t is not None and t.dtype != first.dtype:
            raise TypeError(
                f"{name} is {t.dtype} but {first_name} is {first.dtype}: pass one dtype, "
                "or run under torch.autocast, which casts them to float32"
            )


def scalar_param(x: Optional[torch.Tensor], name: str) -> Optional[torch.Tensor]:
    """A learnable scalar (alpha, beta): ``None`` or a floating tensor with one element."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES or x.numel() != 1:
        got = _describe(x) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating tensor with one element (a learnable scalar), got {got}")
    return x


def int_at_least(value, name: str, minimum: int, what: str) -> int:
    """``value`` as an int, if it is an integer >= ``minimum`` (not a bool, not a float such as NaN);
    else a ValueError naming ``name`` and ``what`` it is. Symbolic ints (``torch.compile``) pass as they are."""
    if isinstance(value, torch.SymInt):
        return value
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {kind} ({what}), got {value!r}")
    return int(value)


def positive_int(value, name: str, what: str) -> int:
    """``value`` as an int, if it is an integer >= 1 (not a bool); else a ValueError naming ``name``."""
    return int_at_least(value, name, 1, what)


def odd_size(value, name: str, maximum: int, what: str) -> int:
    """``value`` as an int, if it is an odd integer in ``[1, maximum]``; else a ValueError naming ``name``."""
    if (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1 or value % 2 == 0
            or value > maximum):
        raise ValueError(f"{name} must be a positive odd int <= {maximum} ({what}), got {value!r}")
    return int(value)


def module_dtype(named: Sequence[tuple], owner: str, dtype: torch.dtype) -> None:
    """Floating inputs ``[(name, tensor or None), ...]`` of a module in its parameters' ``dtype``,
    unless autocast is on (the module's layers then cast them)."""
    for name, t in named:
        if t is None or not t.is_floating_point() or t.dtype == dtype:
            continue
        if torch.is_autocast_enabled(t.device.type):
            return
        want = str(dtype).replace("torch.", "")
        raise ValueError(
            f"{name} is {str(t.dtype).replace('torch.', '')} but the parameters of {owner} are {want}: pass {name} "
            f"as {want} ({name}.to(torch.{want})), convert the module (module.to({name}.dtype)), "
            "or run under torch.autocast"
        )


def index_bounds(index: torch.Tensor) -> torch.Tensor:
    """``[min, max]`` of ``index`` as an int64 tensor on its device (``[0, -1]`` when empty): one
    reduction and no sync, so that an op can fold it with its other value checks into one sync."""
    if index.numel() == 0:
        return torch.tensor([0, -1], dtype=torch.int64, device=index.device)
    return torch.stack(torch.aminmax(index)).to(torch.int64)


def check_bounds(lo: int, hi: int, name: str, upper: int, what: str) -> None:
    """The IndexError of :func:`index_range`, from the host values of :func:`index_bounds`."""
    if lo < 0 or hi >= upper:
        bad = lo if lo < 0 else hi
        raise IndexError(
            f"{name} holds {bad}, outside [0, {upper}) ({what}); "
            "sgg_kernels.set_checks(False) skips this check (out-of-range entries then contribute zeros)"
        )


def index_range(index: torch.Tensor, name: str, upper: int, what: str) -> None:
    """Value check: every entry of ``index`` in ``[0, upper)``. One reduction and one sync."""
    if index.numel() == 0:
        return
    lo, hi = index_bounds(index).tolist()
    check_bounds(lo, hi, name, upper, what)


def module_value_checks() -> bool:
    """Whether a module's forward runs its own fused value check now (and then calls its ops inside
    ``_backend.suspended_value_checks()``): value checks on (:func:`sgg_kernels.set_checks`), not
    already done by an enclosing module, and not while ``torch.compile`` traces the forward (Python
    reading device values would break the graph; inside a compiled graph the ops check themselves,
    as they run, and a module's check that is a registered op runs too)."""
    if torch.compiler.is_compiling():
        return False
    return value_checks_on()


def index_ranges(entries: Sequence[tuple]) -> None:
    """Value check of several index tensors at once: ``entries`` is ``[(name, index, upper, what),
    ...]``; one fused reduction and ONE sync for all of them (vs one each with :func:`index_range`),
    then the IndexError of :func:`index_range` for the first entry out of range, in order."""
    entries = [e for e in entries if e[1].numel() > 0]
    if not entries:
        return
    stats = torch.cat([index_bounds(index) for _, index, _, _ in entries]).tolist()  # the one sync
    for i, (name, _, upper, what) in enumerate(entries):
        check_bounds(stats[2 * i], stats[2 * i + 1], name, upper, what)
