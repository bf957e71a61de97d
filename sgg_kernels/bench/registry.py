"""Benchmark cases: what one op's benchmark needs, and the list of them.

A :class:`Case` describes one public op: its named sizes, how to build its inputs, the fused
callable (the public ``sk.<op>``), the eager reference callable, which inputs require grad, and
which outputs carry a gradient. The CLI (``python -m sgg_kernels.bench``) and the pytest-benchmark
suite (``benchmarks/``) both read cases from here, so inputs are built in one place.

Adding an op family = adding one module ``sgg_kernels/bench/cases/<family>.py`` that defines
``CASES`` (a list of :class:`Case`); :func:`all_cases` finds it, nothing else changes.

The loss used for the backward pass is ``sum_o <o, cot_o>`` over the differentiable outputs ``o``,
with fixed random cotangents ``cot_o`` (see :func:`cotangents`): the backward computes
``torch.autograd.grad(outputs, grad_inputs, cotangents)``, the gradient of exactly that loss, without
timing the reduction kernels.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

Inputs = Dict[str, Any]  # keyword arguments of both callables (tensors and plain values)


@dataclass(frozen=True)
class Case:
    """One op to benchmark.

    Attributes:
        name: the public op's name (``sk.<name>``), also the ``--ops`` name.
        family: DESIGN.md's family (``cluster``, ``pairs``, ``masks``, ``prototypes``).
        sizes: size name -> parameters (anything ``make_inputs`` understands); names like
            ``small``, ``mid``, ``paper``, ``sgdet``.
        make_inputs: ``(size_name, device, dtype, seed) -> Inputs``, deterministic in ``seed``
            (tensors drawn on the CPU, then moved), none requiring grad; the harness turns on
            ``requires_grad`` for ``grad_inputs``. Derived inputs (e.g. assignments) are computed
            here with the reference, outside any timed region.
        fused: ``(**inputs) -> tuple of outputs``: the public op, default backend for the device.
        reference: ``(**inputs) -> tuple of outputs``: the eager PyTorch reference, differentiable
            by autograd, returning the same outputs in the same order as ``fused``. It is also what
            ``torch.compile`` compiles for the ``compile`` impl.
        grad_inputs: names of the inputs that require grad (what the backward differentiates).
        kernels: the op's backend tables (``sgg_kernels._backend.Kernels``, forward first), to
            report which backend ``fused`` ran; empty if unknown.
        describe: ``size_name -> str``, a short shape summary for the table footer.
        floor: ``inputs -> sgg_kernels.bench.floors.Floor``, the bytes that must move and the FLOPs
            that must happen, forward and backward, for these inputs; ``None`` (the default): the
            function registered under the case's name in ``sgg_kernels.bench.floors.FLOORS``.
            Every case must have one (a test checks it); see :meth:`compute_floor`.
    """

    name: str
    family: str
    sizes: Mapping[str, Any]
    make_inputs: Callable[[str, torch.device, torch.dtype, int], Inputs]
    fused: Callable[..., Tuple]
    reference: Callable[..., Tuple]
    grad_inputs: Tuple[str, ...]
    kernels: Tuple = ()
    describe: Optional[Callable[[str], str]] = None
    floor: Optional[Callable[[Inputs], Any]] = None

    def prepare(self, size: str, device, dtype: torch.dtype = torch.float32, seed: int = 0) -> Inputs:
        """Inputs for ``size`` with ``requires_grad`` set on :attr:`grad_inputs` (fresh leaves)."""
        if size not in self.sizes:
            raise KeyError(f"{self.name} has no size {size!r}; it has {', '.join(self.sizes)}")
        inputs = dict(self.make_inputs(size, torch.device(device), dtype, seed))
        for name in self.grad_inputs:
            inputs[name] = inputs[name].detach().requires_grad_(True)
        return inputs

    def compute_floor(self, inputs: Inputs):
        """The :class:`~sgg_kernels.bench.floors.Floor` of this case for ``inputs`` (from
        :meth:`prepare`): :attr:`floor` if given, else ``floors.FLOORS[self.name]``; a ``KeyError``
        if neither exists."""
        from . import floors

        return floors.floor_of(self, inputs)

    def backend(self, device_type: str) -> str:
        """The backend(s) ``fused`` runs on ``device_type`` now: ``"cpu"``, ``"triton/reference"``, ..."""
        if not self.kernels:
            return "?"
        names: List[str] = []
        for table in self.kernels:
            try:
                name = table.select(device_type)
            except Exception:  # a forced backend this op cannot run here
                name = "unavailable"
            if name not in names:
                names.append(name)
        return "/".join(names)


def differentiable(outputs: Sequence) -> List[torch.Tensor]:
    """The outputs that carry a gradient (floating tensors attached to the autograd graph)."""
    return [o for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad]


def cotangents(outputs: Sequence[torch.Tensor], seed: int) -> List[torch.Tensor]:
    """Fixed random cotangents for ``outputs``: standard normal, drawn on the CPU from ``seed``.

    Depends only on the outputs' shapes, dtypes and ``seed``, so every impl of a case gets the
    same ones. Never all-ones: a sum-loss would hide errors that cancel across elements.
    """
    out = []
    for i, o in enumerate(outputs):
        g = torch.Generator().manual_seed(seed * 1000 + 17 + i)
        out.append(torch.randn(o.shape, generator=g, dtype=torch.float32).to(device=o.device, dtype=o.dtype))
    return out


# ---------------------------------------------------------------------------------------------
# Discovery: every module of sgg_kernels.bench.cases that defines CASES.
# ---------------------------------------------------------------------------------------------
_CASES: Optional[Dict[str, Case]] = None


def all_cases() -> Dict[str, Case]:
    """Every case, by op name, families in module-name order, cases in their module's order."""
    global _CASES
    if _CASES is None:
        from . import cases as package

        found: Dict[str, Case] = {}
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            for case in getattr(module, "CASES", ()):
                if case.name in found:
                    raise RuntimeError(f"two benchmark cases are named {case.name!r}")
                found[case.name] = case
        _CASES = found
    return _CASES


def get_cases(names: Optional[Sequence[str]] = None, family: Optional[str] = None) -> List[Case]:
    """Cases by name (``None``: all) and/or family; unknown names raise a ``KeyError`` listing them."""
    cases = all_cases()
    if names is None:
        chosen = list(cases.values())
    else:
        unknown = [n for n in names if n not in cases]
        if unknown:
            raise KeyError(f"unknown op(s) {', '.join(unknown)}; known: {', '.join(cases)}")
        chosen = [cases[n] for n in names]
    if family is not None:
        chosen = [c for c in chosen if c.family == family]
    return chosen
