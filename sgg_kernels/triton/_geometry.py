"""Launch geometry shared by the Triton launchers: how to split a reduction into chunks so the grid
fills whole waves of an H100/H200.

Several kernels reduce over a long axis (points of an image, pairs, rows of x, columns of D) and
split it into chunks whose partials are summed afterwards in a fixed order (deterministic, no
atomics). The chunk count sets the grid, and the grid meets the GPU in waves of ``slots`` =
CTAs-per-SM x 132 programs: a grid of 1.06 waves runs the full second round for 6% of the work.
:func:`split_work` picks the chunking by a model of that quantisation, not by a program target:
``units`` independent rows (images, output tiles) each of ``work`` steps (tiles), split into n
chunks of ``per = cdiv(work, n)`` steps; the time is ``rounds x per`` with ``rounds =
ceil(units n / slots)`` (every program of a round takes as long as the longest, ``per`` steps).

The choice depends on the shapes and on constants only (132 SMs, the CTAs per SM that the sm_90
compile report gives each kernel: the launchers' tables), never on the device present, so the
summation order, and with it every result bit, is the same on every GPU and in the interpreter.
"""
from __future__ import annotations

import functools
from typing import Tuple

SMS = 132  # an H100/H200's SMs (an A100 has 108: the same grids run there, with other tails)
# The architecture register caps are chosen for (compute capability x 10). None: the tensors'
# device decides. .ci/check_triton_compile.py sets it to the target it compiles for (no GPU there).
ARCH = None


@functools.lru_cache(maxsize=4096)
def split_work(units: int, work: int, ctas_per_sm: int, min_per_split: int = 1,
               max_splits: int = 0, split_cost: float = 1.0) -> Tuple[int, int]:
    """``(n_splits, per_split)``: split each of ``units`` rows of ``work`` steps into
    ``n_splits = cdiv(work, per_split)`` chunks (the last may be shorter), for a grid of
    ``units x n_splits`` programs at ``ctas_per_sm`` resident CTAs per SM.

    Minimises the modelled time ``rounds x (per_split + split_cost)`` (``rounds = ceil(units
    n_splits / slots)``, ``slots = ctas_per_sm x SMS``; ``split_cost``, in steps, is a program's
    fixed cost: writing its partial, its prologue) over ``per_split >= min_per_split`` (a chunk's
    partial must stay small next to the steps it reads) and ``n_splits <= max_splits`` (0: no
    cap), among the grids of at least one full wave when the shapes allow one (an idle slot of a
    partial first wave never gets work). Ties go to a grid of two waves or more, then to fewer
    splits (fewer partials to write and sum). Examples, 2 CTAs/SM (264 slots): 32 images x 768
    point tiles -> 16 chunks of 48 (512 programs, 2 rounds; a fixed target of 528 programs gave
    17 chunks of 46: 544 programs, 3 rounds, 1.4x the modelled time); 38 pair tiles x 128 D blocks
    (at least 8 a split) -> 13 splits of 10 (494 programs: 1.87 waves, 2 rounds of 11; two full
    waves would need 14-16 splits and 3 rounds of 9-10, 1.2x slower in the model).
    """
    units, work = max(int(units), 1), max(int(work), 1)
    slots = max(int(ctas_per_sm), 1) * SMS
    min_per = max(1, min(int(min_per_split), work))
    cap = cdiv(work, min_per)
    if max_splits:
        cap = min(cap, max(1, int(max_splits)))
    # beyond ~8 rounds' worth of programs a finer split cannot shorten a round any more
    cap = min(cap, cdiv(8 * slots, units) + 1)
    cands = []
    for n in range(1, cap + 1):
        per = cdiv(work, n)
        if per < min_per:
            break
        n_real = cdiv(work, per)
        programs = units * n_real
        cost = cdiv(programs, slots) * (per + split_cost)
        cands.append(((cost, programs < 2 * slots, n_real), programs, (n_real, per)))
    full = [c for c in cands if c[1] >= slots]
    return min(full or cands)[2]


def register_cap(cap: int, device) -> dict:
    """``{"maxnreg": cap}`` on Hopper (sm_90) devices, else ``{}``: a launch option that lets two
    8-warp CTAs share an SM (65,536 registers / 256 threads = 256 a thread, 128 for two). The caps
    are verified spill-free by the sm_90 compile check only at the configurations that pass them;
    on sm_80 the same caps spilled (its mma.sync tf32x3 path holds more), so there the kernels run
    uncapped. Never changes a result: register allocation only. The interpreter ignores it."""
    if not cap:
        return {}
    arch = ARCH if ARCH is not None else _device_arch(device)
    return {"maxnreg": int(cap)} if arch is not None and arch >= 90 else {}


def _device_arch(device):
    import torch

    if getattr(device, "type", None) != "cuda":
        return None
    return _capability(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> int:
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def waves(programs: int, ctas_per_sm: int) -> float:
    """Waves of a grid of ``programs`` on 132 SMs at ``ctas_per_sm`` resident CTAs per SM."""
    return programs / (max(ctas_per_sm, 1) * SMS)


__all__ = ["SMS", "split_work", "register_cap", "cdiv", "waves"]
