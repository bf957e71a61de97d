"""Every Triton op on a GPU at the benchmark's sizes against the float64 reference on the same GPU.

For each op with a Triton kernel (cosine_assign, superpixel_cluster, cluster_aggregate,
cluster_dispatch, pairwise_edge_fusion, prototype_distance), at the ``small`` and ``paper`` sizes of
its ``sgg-bench`` case (``sgg_kernels/bench/cases``: the same inputs the benchmark times, so this
also compiles the very kernels ``sgg-bench --size paper`` runs), in three modes:

- ``fp32-ieee``:   float32 inputs, ``sk.set_precision("ieee")`` (plain fp32 FMA dots);
- ``fp32-tf32x3``: float32 inputs, ``sk.set_precision("tf32x3")`` (the default: 3 TF32 products);
- ``bf16``:        bfloat16 inputs (native tensor-core dots, fp32 accumulation).

The forward outputs and the gradients of every input that requires grad (fixed random cotangents,
``sgg_kernels.bench.registry.cotangents``) are compared with the bench case's eager reference run
in float64 on the same GPU, on float64 copies of the very (rounded) inputs and cotangents the kernel
saw, by the norm-relative error of ``helpers.rel_err``. Each test prints one line with its errors
(``-s`` shows them) and, where ``SGG_GPU_PARITY_LOG`` names a file, appends it there (pytest-xdist
workers too: ``benchmarks/gpu_check.sh`` collects them in ``$OUT/parity.txt``). ``cosine_assign`` and
``superpixel_cluster`` take an argmax, which may legitimately flip on near-ties: their assignment
is checked to be a maximum of the float64 similarity (up to ``ARGMAX_SLACK``), and their values and
gradients are compared with the float64 oracle evaluated at the kernel's own assignment.

Marked ``cuda``; without a GPU every test skips with the reason "needs a CUDA GPU". The Triton path
needs no compiled extension, so ``benchmarks/gpu_check.sh`` runs this module while the CUDA
extension builds, with ``--noconftest`` (tests/conftest.py would require the extension).

Checking the test itself on a machine without a GPU: ``SGG_GPU_PARITY_DEVICE=cpu python -m pytest
tests/test_gpu_parity.py -k "small and fp32-ieee"`` runs the fp32-ieee params on the CPU under the
Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU; the interpreter's dots
are IEEE, and its bf16 dots are wrong, so the other modes still skip there).
"""
from __future__ import annotations

import os

import pytest
import torch

import sgg_kernels as sk
from sgg_kernels.bench import registry
from sgg_kernels.reference import cluster as ref_cluster

from helpers import rel_err

OPS = ["cosine_assign", "superpixel_cluster", "cluster_aggregate", "cluster_dispatch", "pairwise_edge_fusion",
       "prototype_distance"]
SIZES = ["small", "paper"]
MODES = {  # name: (input dtype, float32 dot precision or None)
    "fp32-ieee": (torch.float32, "ieee"),
    "fp32-tf32x3": (torch.float32, "tf32x3"),
    "bf16": (torch.bfloat16, None),
}
ARGMAX_OPS = ("cosine_assign", "superpixel_cluster")

# Norm-relative tolerance per mode (||out - ref|| / max(||ref||, sqrt(n)), the oracle in float64).
# fp32-ieee: float32 arithmetic; at both sizes the interpreter's IEEE dots (numpy) land near 1e-7
# (5e-8 at paper for cosine_assign and cluster_aggregate), so tests/helpers.TOL's 2e-5 leaves ~100x
# for the GPU's other summation orders. tf32x3 drops the lo x lo TF32 term (~2^-22 relative per
# product, 2.5x that of fp32 rounding; prototype_distance's GEMM form cancels up to ~12x at these
# inputs): 5e-5, still well under plain TF32's ~1e-3. bf16: every output and gradient is rounded to
# bf16 (2^-8 relative) and some intermediates (sim, the fusion's g) are too: 3e-2, as in
# tests/helpers.TOL. The argmax ops' bf16 gradients go through bf16 sims and normalised rows (4x, as
# tests/test_cluster.py allows them). No GPU has run these yet: the printed errors are the data.
TOL = {"fp32-ieee": 2e-5, "fp32-tf32x3": 5e-5, "bf16": 3e-2}
GRAD_SCALE = {("bf16", "cosine_assign"): 4.0, ("bf16", "superpixel_cluster"): 4.0}
# The kernel's argmax choice may trail the float64 maximum by this much (near-ties: the cosine is
# computed from the inputs in fp32, |error| ~ 1e-6), and must equal it for most points.
ARGMAX_SLACK = 2e-5
ARGMAX_EXACT = 0.99

DEVICE = os.environ.get("SGG_GPU_PARITY_DEVICE", "cuda")  # "cpu": check this test under the interpreter


def _params():
    params = []
    for size in SIZES:  # small first: same kernels, cheap, and it warms Triton's cache for paper
        for mode in MODES:
            for op in OPS:
                params.append(pytest.param(size, mode, op, id=f"{size}-{mode}-{op}"))
    return params


def _need_device(mode):
    if DEVICE == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            pytest.skip("needs a CUDA GPU without TRITON_INTERPRET=1 (the compiled Triton kernels)")
        return torch.device("cuda", torch.cuda.current_device())
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("SGG_GPU_PARITY_DEVICE=cpu needs TRITON_INTERPRET=1 (set by tests/conftest.py without a GPU)")
    if mode != "fp32-ieee":
        pytest.skip("needs a CUDA GPU (the interpreter's dots are IEEE, and its bf16 dots are wrong)")
    return torch.device("cpu")


def _leaves(inputs, names, dtype=None):
    """Fresh leaves: ``names`` require grad; ``dtype``: float tensors cast to it (same values)."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            if key in names:
                value.requires_grad_(True)
        out[key] = value
    return out


def _outputs_and_grads(fn, inputs, names, cotangents=None, seed=0):
    """``fn(**inputs)``; the gradients of ``names`` for ``sum <o, cot_o>`` over the float outputs."""
    outs = fn(**inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    diff = [o for o in outs if o.is_floating_point() and o.requires_grad]
    if cotangents is None:
        cotangents = registry.cotangents(diff, seed)
    assert len(diff) == len(cotangents) > 0, "no differentiable output"
    leaves = [inputs[n] for n in names]
    grads = torch.autograd.grad(diff, leaves, [c.to(o.dtype) for o, c in zip(diff, cotangents)], allow_unused=True)
    return outs, list(grads), cotangents


def _check_argmax(assign, feats, centers):
    """The kernel's assignment is (up to ARGMAX_SLACK) a maximum of the float64 similarity."""
    full = ref_cluster._similarity(feats, centers, None, None)  # float64 [B, M, C], on the device
    assert assign.dtype == torch.int64 and bool(((assign >= 0) & (assign < centers.shape[1])).all())
    chosen = torch.gather(full, 2, assign[..., None]).squeeze(-1)
    best = full.max(dim=-1).values
    gap = (best - chosen).max().item()
    exact = (chosen == best).double().mean().item()
    assert gap <= ARGMAX_SLACK, f"assign is not an argmax: worst gap {gap:.3g} > {ARGMAX_SLACK:g}"
    assert exact >= ARGMAX_EXACT, f"only {exact:.2%} of points chose the exact float64 maximum"
    return gap, exact


def _oracle(op, assign):
    """The float64 reference of an argmax op, evaluated at the kernel's assignment ``assign``."""
    import test_cluster as tc  # tests/test_cluster.py's oracle of Eq. 2 at a given assignment

    if op == "cosine_assign":
        return lambda feats, centers: (assign, tc._sim_at(feats, centers, assign, None, None))

    def superpixel(feats, centers):  # Eq. 2 at the kernel's assignment, then Eq. 3 (values = feats)
        sim = tc._sim_at(feats, centers, assign, None, None)
        return ref_cluster.cluster_aggregate(feats, assign, sim, centers)[0], assign, sim
    return superpixel


@pytest.mark.cuda
@pytest.mark.parametrize("size,mode,op", _params())
def test_triton_parity(size, mode, op):
    device = _need_device(mode)
    dtype, precision = MODES[mode]
    case = registry.all_cases()[op]
    assert case.kernels and all(k.triton is not None for k in case.kernels), f"{op} has no Triton kernel"
    names = case.grad_inputs
    raw = case.make_inputs(size, device, dtype, 0)  # the benchmark's inputs, rounded to dtype

    # The Triton kernels.
    inputs = _leaves(raw, names)
    with sk.use_backend("triton"), sk.precision(precision or sk.get_precision()):
        outs, grads, cots = _outputs_and_grads(case.fused, inputs, names)
    if device.type == "cuda":
        torch.cuda.synchronize(device)

    # The float64 reference on the same device, from the same rounded inputs and cotangents.
    ref_inputs = _leaves(raw, names, torch.float64)
    errors = []
    if op in ARGMAX_OPS:
        assign = outs[0] if op == "cosine_assign" else outs[1]
        gap, exact = _check_argmax(assign, ref_inputs["feats"].detach(), ref_inputs["centers"].detach())
        errors.append(f"argmax gap {gap:.1e} exact {exact:.2%}")
        reference = _oracle(op, assign)
    else:
        reference = case.reference
    with sk.use_backend("reference"):
        outs_r, grads_r, _ = _outputs_and_grads(reference, ref_inputs, names, [c.double() for c in cots])

    tol = TOL[mode]
    grad_tol = tol * GRAD_SCALE.get((mode, op), 1.0)
    failures = []
    assert len(outs) == len(outs_r)
    for i, (o, o_r) in enumerate(zip(outs, outs_r)):
        if not o_r.is_floating_point():
            assert torch.equal(o.cpu(), o_r.cpu()), f"integer output {i} differs"
            continue
        assert o.dtype == dtype, f"output {i} is {o.dtype}, expected {dtype}"
        err = rel_err(o, o_r)
        errors.append(f"out{i} {err:.1e}")
        if not err <= tol:
            failures.append(f"output {i}: {err:.3g} > {tol:.1g}")
    for name, g, g_r in zip(names, grads, grads_r):
        assert g is not None and g_r is not None, f"gradient of {name} missing"
        err = rel_err(g, g_r)
        errors.append(f"d{name} {err:.1e}")
        if not err <= grad_tol:
            failures.append(f"d {name}: {err:.3g} > {grad_tol:.1g}")
    line = f"parity {size} {mode} {op}: " + ", ".join(errors) + f" (tol {tol:.0e}, grads {grad_tol:.0e})"
    print(line)
    if os.environ.get("SGG_GPU_PARITY_LOG"):
        with open(os.environ["SGG_GPU_PARITY_LOG"], "a") as f:  # one short line: appends stay whole
            f.write(line + ("" if not failures else "  FAILED") + "\n")
    assert not failures, f"{line}; FAILED: " + "; ".join(failures)
