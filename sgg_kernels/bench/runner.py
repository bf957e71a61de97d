"""Run the cases: build each (impl, pass) step, measure it, record a row (or the error it raised).

Impls:
- ``fused``:   the public op (``sk.<op>``) with the default backend for the device (or the one
  ``--backend`` forces), value checks on (the default: at most one small reduction and one host
  sync per op call);
- ``fused-nochecks``: the same under ``sk.set_checks(False)`` for the whole step (no host sync:
  what a CUDA-graph-captured training step runs). In the default impls on CUDA only (on a CPU a
  sync waits for nothing);
- ``eager``:   the reference, run as ordinary autograd code;
- ``compile``: ``torch.compile(reference, dynamic=False)`` (default mode), compiled during the
  warm-up, outside the timed region.

Passes:
- ``fwd``:     one forward call with the grad inputs requiring grad (a training forward: autograd
  records the graph and saves what the backward needs);
- ``fwd+bwd``: the forward plus ``torch.autograd.grad(outputs, grad_inputs, cotangents)``, i.e. the
  gradient of the loss ``sum_o <o, cot_o>`` with fixed random cotangents (fresh gradients each
  call, nothing accumulates).

Floors: every row carries its case's floor for its pass (``floor_bytes``, ``floor_flops``: see
:mod:`.floors`), computed from the inputs once per (case, size); on CUDA the CLI adds
``floor_ms`` and ``pct_of_floor`` from the peaks it measured in the same run
(:func:`.floors.apply_peaks`).
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from . import timing
from .registry import Case, Inputs, cotangents, differentiable

IMPLS = ("fused", "fused-nochecks", "eager", "compile")
FUSED = ("fused", "fused-nochecks")  # the impls that run the package's kernels
PASSES = ("fwd", "fwd+bwd")


@dataclass
class Result:
    """One row of the table and of the JSON file."""

    op: str
    size: str
    pass_: str
    impl: str
    median_ms: Optional[float] = None
    peak_mem_mb: Optional[float] = None
    speedup: Optional[float] = None  # eager median / this median, same op, size and pass
    backend: Optional[str] = None  # what `fused` ran on; "reference" for eager/compile
    dtype: str = "float32"
    first_call_s: Optional[float] = None  # the cold first call (compilation included for compile)
    error: Optional[str] = None
    floor_bytes: Optional[int] = None  # the case's floor for this pass (floors.Floor.bytes(pass_))
    floor_flops: Optional[int] = None
    floor_ms: Optional[float] = None  # CUDA only: max(bytes / copy bandwidth, FLOPs / GEMM rate), per phase
    pct_of_floor: Optional[float] = None  # CUDA only: 100 * floor_ms / median_ms
    floor: Optional[Any] = field(default=None, repr=False, compare=False)  # the floors.Floor itself (not in JSON)

    JSON_ORDER = ("op", "size", "pass", "impl", "median_ms", "peak_mem_mb", "speedup", "backend", "dtype",
                  "first_call_s", "error", "floor_bytes", "floor_flops", "floor_ms", "pct_of_floor")

    def to_json(self) -> Dict:
        row = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "floor"}
        row["pass"] = row.pop("pass_")
        for key, digits in (("median_ms", 5), ("peak_mem_mb", 3), ("speedup", 3), ("first_call_s", 3),
                            ("floor_ms", 5), ("pct_of_floor", 2)):
            if row[key] is not None:
                row[key] = round(row[key], digits)
        return {k: row[k] for k in self.JSON_ORDER}


def make_step(fn: Callable, inputs: Inputs, grad_inputs: Sequence[str], pass_: str, seed: int = 0) -> Callable[[], None]:
    """A zero-argument callable running ``fn(**inputs)`` (``fwd``) or forward+backward (``fwd+bwd``).

    Outputs and gradients are dropped when it returns, so a peak-memory probe around one call sees
    the whole forward(+backward) and nothing is left behind between calls.
    """
    if pass_ == "fwd":
        def step() -> None:
            fn(**inputs)
        return step
    if pass_ != "fwd+bwd":
        raise ValueError(f"unknown pass {pass_!r}; expected one of {', '.join(PASSES)}")
    leaves = [inputs[name] for name in grad_inputs]
    cots: List[torch.Tensor] = []

    def step() -> None:
        outputs = differentiable(fn(**inputs))
        if not outputs:
            raise RuntimeError("no output requires grad: nothing to differentiate")
        if not cots:
            cots.extend(cotangents(outputs, seed))
        torch.autograd.grad(outputs, leaves, cots)
    return step


def impl_callable(case: Case, impl: str, backend: Optional[str] = None) -> Callable:
    """The callable of ``impl`` for ``case`` (a fresh ``torch.compile`` for ``compile``).

    A forced ``backend`` for ``fused`` covers only this callable's forward; :func:`on_backend`
    wraps a whole step, backward included (what :func:`run` does)."""
    if impl == "fused":
        return case.fused if backend is None else on_backend(case.fused, backend)
    if impl == "fused-nochecks":
        return without_checks(case.fused if backend is None else on_backend(case.fused, backend))
    if impl == "eager":
        return case.reference
    if impl == "compile":
        torch._dynamo.reset()  # a clean cache: compilation happens (and is timed) in this warm-up
        return torch.compile(case.reference, dynamic=False)
    raise ValueError(f"unknown impl {impl!r}; expected one of {', '.join(IMPLS)}")


def on_backend(fn: Callable, backend: str) -> Callable:
    """``fn`` run with ``sk.use_backend(backend)`` held for the whole call. Around a step this
    covers the backward too: the backward ops run inside ``torch.autograd.grad`` and choose their
    backend then (``use_backend`` is process-wide, so autograd's threads see it)."""
    import sgg_kernels as sk

    def forced(*args, **kwargs):
        with sk.use_backend(backend):
            return fn(*args, **kwargs)
    return forced


def without_checks(fn: Callable) -> Callable:
    """``fn`` run with ``sk.set_checks(False)``, the previous setting restored after. Around a step
    this covers the backward too (the switch is process-wide)."""
    import sgg_kernels as sk
    from .._backend import checks_enabled

    def unchecked(*args, **kwargs):
        was = checks_enabled()
        sk.set_checks(False)
        try:
            return fn(*args, **kwargs)
        finally:
            sk.set_checks(was)
    return unchecked


def summarize(exc: BaseException, limit: int = 200) -> str:
    """``Type: first sentence of the message``, at most ``limit`` characters.

    The first line of a long message is cut at its first sentence ("Could not run 'op' with
    arguments from the 'CPU' backend." is all that matters of the dispatcher's page-long text).
    """
    text = str(exc).strip().splitlines()
    first = next((line.strip() for line in text if line.strip()), "")
    if len(first) > 100:
        end = first.find(". ", 40)
        if end > 0:
            first = first[: end + 1]
    msg = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def measure(step: Callable[[], None], device: torch.device, min_time: float, warmup_iters: int = 2,
            single_call: bool = False) -> Dict:
    """First (cold) call, warm-up, peak memory of one call, then the median time.

    ``single_call``: the peak-memory call (which also warms up), then ONE timed call, reported as
    the median: for full-scale rows whose single call takes seconds to minutes on a CPU (the
    default makes ~6 calls per row). No cold-call time is reported.
    """
    if single_call:
        peak = timing.peak_memory_mb(step, device)
        timing.synchronize(device)
        t0 = time.perf_counter()
        step()
        timing.synchronize(device)
        return {"median_ms": (time.perf_counter() - t0) * 1e3, "peak_mem_mb": peak, "first_call_s": None}
    t0 = time.perf_counter()
    step()
    timing.synchronize(device)
    first_call_s = time.perf_counter() - t0
    timing.warmup(step, device, warmup_iters)
    peak = timing.peak_memory_mb(step, device)
    ms = timing.median_ms(step, device, min_time)
    return {"median_ms": ms, "peak_mem_mb": peak, "first_call_s": first_call_s}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(
    cases: Sequence[Case],
    sizes: Sequence[str],
    impls: Sequence[str] = IMPLS,
    passes: Sequence[str] = PASSES,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    min_time: float = 0.3,
    backend: Optional[str] = None,
    progress=None,
    log: Callable[[str], None] = print,
    results: Optional[List[Result]] = None,
    floors: Optional[Dict[Tuple[str, str], Any]] = None,
    single_call: bool = False,
) -> List[Result]:
    """Measure every (case, size, impl, pass); errors become rows, they never stop the run.

    A size a case does not define is skipped (no rows): families need not share size names.

    ``progress`` (e.g. a tqdm bar) gets ``update(1)`` per (case, size, impl, pass) and
    ``set_postfix_str`` with what runs; ``log`` gets one line per error. Rows are appended to
    ``results`` (a new list if None) as they are measured, so a caller keeps them on Ctrl-C.
    Each row gets its case's floor for its pass (:mod:`.floors`, from the inputs, outside any timed
    region); ``floors``, if given, is filled with ``(op, size) -> Floor``. A floor that cannot be
    computed is logged and left None; it never stops the run. ``single_call``: see :func:`measure`.
    """
    if results is None:
        results = []
    dname = str(dtype).replace("torch.", "")
    for case in cases:
        for size in sizes:
            floor = None

            def row(impl, pass_, **kw):
                be = (case.backend(device.type) if backend is None else backend) if impl in FUSED else "reference"
                if floor is not None:
                    kw.update(floor=floor, floor_bytes=floor.bytes(pass_), floor_flops=floor.flops(pass_))
                return Result(op=case.name, size=size, pass_=pass_, impl=impl, backend=be, dtype=dname, **kw)

            if size not in case.sizes:  # e.g. a family without a `mid` size: nothing to report
                continue
            try:
                inputs = case.prepare(size, device, dtype, seed)
            except Exception as exc:  # broken inputs: every row of this (op, size) says so
                msg = "make_inputs: " + summarize(exc)
                log(f"{case.name} [{size}]: {msg}")
                for impl in impls:
                    for pass_ in passes:
                        results.append(row(impl, pass_, error=msg))
                        _tick(progress)
                continue
            try:
                floor = case.compute_floor(inputs)
                if floors is not None:
                    floors[(case.name, size)] = floor
            except Exception as exc:  # a missing or broken floor: the rows say nothing about it
                log(f"{case.name} [{size}]: floor: {summarize(exc)}")
            for impl in impls:
                try:
                    fn = impl_callable(case, impl, backend)
                except Exception as exc:
                    fn, fn_error = None, summarize(exc)
                for pass_ in passes:
                    if progress is not None:
                        progress.set_postfix_str(f"{case.name} {size} {pass_} {impl}", refresh=True)
                    if fn is None:
                        results.append(row(impl, pass_, error=fn_error))
                        _tick(progress)
                        continue
                    try:
                        step = make_step(fn, inputs, case.grad_inputs, pass_, seed)
                        if impl in FUSED and backend is not None:
                            step = on_backend(step, backend)  # the backward ops too
                        if impl == "fused-nochecks":
                            step = without_checks(step)  # the backward ops too
                        results.append(row(impl, pass_, **measure(step, device, min_time, single_call=single_call)))
                    except Exception as exc:
                        msg = summarize(exc)
                        log(f"{case.name} [{size}] {pass_} {impl}: {msg}")
                        results.append(row(impl, pass_, error=msg))
                    finally:
                        step = None
                        _free(device)
                        _tick(progress)
                fn = None
                if impl == "compile":
                    torch._dynamo.reset()
            inputs = None
            _free(device)
    add_speedups(results)
    return results


def count(cases: Sequence[Case], sizes: Sequence[str], impls: Sequence[str], passes: Sequence[str]) -> int:
    """How many rows :func:`run` produces (for a progress bar)."""
    return sum(s in c.sizes for c in cases for s in sizes) * len(impls) * len(passes)


def _tick(progress) -> None:
    if progress is not None:
        progress.update(1)


def add_speedups(results: Iterable[Result]) -> None:
    """speedup = eager median / this median, for rows of the same op, size and pass."""
    results = list(results)
    eager = {(r.op, r.size, r.pass_): r.median_ms for r in results if r.impl == "eager" and r.median_ms}
    for r in results:
        base = eager.get((r.op, r.size, r.pass_))
        r.speedup = base / r.median_ms if base and r.median_ms else None
