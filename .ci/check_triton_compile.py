"""Compile every Triton kernel launch of the package for sm_90 (H100/H200) and sm_80 (A100) on a
machine without a GPU.

The interpreter (TRITON_INTERPRET=1, used by the tests) runs kernels as numpy and accepts things
the GPU compiler rejects (a plain Python float global inside a kernel, for one). This check
captures each ``kernel[grid](...)`` call that the launchers make at the benchmark sizes, in every
dtype, builds the signature the JIT would build, compiles it to cubin with Triton's bundled ptxas
and reports per launch: programs (the grid), registers, spill bytes, shared memory, CTAs per SM
(from registers, shared memory, warps) and waves (programs / (CTAs per SM x SMs); 132 SMs on
sm_90, 108 on sm_80). Exit status 1 on a compile error, on a register spill in an fp32/fp16/bf16
variant, or on a hot kernel (``HOT``) launching less than one wave at the ``paper`` or ``sgdet``
size. Listed as warnings: a hot kernel under two waves or one CTA per SM, and spills of the fp64
variants (float64 runs for gradcheck at small sizes, never as a speed path; ptxas caps some of
them at 128 registers). Uses Triton's AOT entry points (``ASTSource``,
``triton.compile`` with a ``GPUTarget``), checked with triton 3.6.

    TRITON_INTERPRET=0 python .ci/check_triton_compile.py                  # sm_90 and sm_80
    TRITON_INTERPRET=0 python .ci/check_triton_compile.py --arch 90        # one architecture
    TRITON_INTERPRET=0 python .ci/check_triton_compile.py --family pairs --dtype fp32
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import sgg_kernels.triton.cluster as launchers  # noqa: E402
import sgg_kernels.triton.pairs as pair_launchers  # noqa: E402
import sgg_kernels.triton.prototypes as proto_launchers  # noqa: E402
import sgg_kernels.triton._geometry as geometry  # noqa: E402  (register caps per target arch)

LAUNCHER_MODULES = (launchers, pair_launchers, proto_launchers)  # every module whose `_..._kernel` attributes get wrapped

ARCHS = (90, 80)  # H100/H200, A100: Hopper's wgmma/TMA paths and Ampere's mma paths differ
# Per SM: (SMs, 32-bit registers, shared memory bytes, max CTAs, max warps); H100 SXM / A100 SXM.
SM = {90: (132, 65536, 228 * 1024, 32, 64), 80: (108, 65536, 164 * 1024, 32, 64)}
# The kernels that carry an op's time at the benchmark sizes (the finish/reduction kernels are small).
HOT = {
    "_cosine_assign_kernel", "_superpixel_kernel", "_cluster_partial_kernel", "_cosine_assign_backward_kernel",
    "_cluster_aggregate_backward_kernel", "_cluster_dispatch_kernel", "_cluster_dispatch_backward_kernel",
    "_fusion_forward_kernel", "_fusion_dweight_kernel", "_fusion_drows_kernel", "_fusion_dunion_kernel",
    "_prototype_dot_kernel", "_prototype_grad_x_kernel", "_prototype_grad_p_kernel",
}
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
         torch.int64: "i64", torch.int32: "i32"}


class Recorder:
    """Stands in for ``@triton.jit`` kernels in the launcher module: compiles instead of running."""

    def __init__(self):
        self.seen, self.lines, self.errors, self.tag, self.arch = set(), [], [], "", ARCHS[0]
        self.size, self.warnings, self.families, self.dtypes = "", [], None, None

    def wrap(self, fn):
        recorder = self

        class Launch:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: recorder.compile(fn, args, dict(kwargs), grid)

        return Launch()

    def compile(self, fn, args, kwargs, grid):  # launch options: num_warps, num_stages, maxnreg
        opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
        programs = 1
        for g in grid:
            programs *= int(g)
        values = dict(zip(fn.arg_names, args), **kwargs)
        sig, const, attrs = {}, {}, {}
        for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
            v = values[name]
            if param.is_constexpr:
                sig[name], const[name] = "constexpr", v
            elif isinstance(v, torch.Tensor):
                sig[name] = "*" + DTYPE[v.dtype]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(v, bool):
                sig[name] = "i1"
            elif isinstance(v, int):
                if v == 1 and not param.do_not_specialize:  # the JIT specialises 1 to a constant
                    sig[name], const[name] = "constexpr", 1
                else:
                    sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
                    if v % 16 == 0:
                        attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                raise TypeError(f"{fn.__name__}: argument {name} of type {type(v).__name__}")
        key = (self.arch, self.size, programs, fn.__name__, tuple(sorted(sig.items())),
               tuple(sorted((k, str(v)) for k, v in const.items())), tuple(sorted(opts.items())))
        if key in self.seen:
            return
        self.seen.add(key)
        try:
            compiled = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", self.arch, 32),
                                      options=opts)
        except Exception as exc:  # noqa: BLE001  (report every failure, then exit 1)
            self.errors.append(f"sm_{self.arch} {self.tag} {fn.__name__}: {exc!r}"[:3000])
            print("COMPILE ERROR", self.errors[-1], flush=True)
            return
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run([PTXAS, f"-arch=sm_{self.arch}{'a' if self.arch == 90 else ''}", "-v", f.name, "-o", "/dev/null"], capture_output=True, text=True).stderr
        os.unlink(f.name)
        regs = max(map(int, re.findall(r"Used (\d+) registers", report)), default=0)
        spill = max(map(int, re.findall(r"(\d+) bytes spill stores", report)), default=0)
        warps = opts.get("num_warps", 4)
        ctas = ctas_per_sm(self.arch, regs, compiled.metadata.shared, warps)
        waves = programs / max(ctas * SM[self.arch][0], 1)
        flags = {k: str(v) for k, v in const.items() if k.isupper()}
        line = (f"sm_{self.arch} {self.size:5s} {self.tag:34s} {fn.__name__:36s} programs={programs:<7d} warps={warps:<2d} "
                f"regs={regs:<3d} ctas/sm={ctas:<2d} waves={waves:<7.2f} spill={spill:<3d} smem={compiled.metadata.shared:6d} {flags}")
        self.lines.append(line)
        print(line, flush=True)
        where = f"sm_{self.arch} {self.size} {self.tag} {fn.__name__} {flags}"
        if spill and flags.get("ACC") == "fp64":  # the gradcheck dtype, never a speed path: reported
            self.warnings.append(f"{where}: spills {spill} bytes per thread (fp64)")
        elif spill:
            self.errors.append(f"{where}: spills {spill} bytes per thread")
        hot = fn.__name__ in HOT and self.size in ("paper", "sgdet")
        if hot and waves < 1 and flags.get("ACC") == "fp64":  # fp64: the gradcheck dtype, reported
            self.warnings.append(f"{where}: {programs} programs at {ctas} CTAs/SM is {waves:.2f} waves (< 1, fp64)")
        elif hot and waves < 1:
            self.errors.append(f"{where}: {programs} programs at {ctas} CTAs/SM is {waves:.2f} waves (< 1)")
        elif hot and (waves < 2 or ctas < 2):
            self.warnings.append(f"{where}: {programs} programs, {ctas} CTAs/SM, {waves:.2f} waves")


def ctas_per_sm(arch, regs, smem, warps):
    """Resident CTAs per SM: registers are allocated per warp in units of 256, shared memory per
    CTA with 1 KB reserved by the driver."""
    _, regs_sm, smem_sm, max_ctas, max_warps = SM[arch]
    warp_regs = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (regs_sm // warp_regs) // warps
    by_smem = smem_sm // (smem + 1024) if smem else max_ctas
    return max(0, min(max_ctas, max_warps // warps, by_regs, by_smem))


def launch_all(rec, B, M, C, D, dtype, sigmoid):
    """Every launcher at one size, in one dtype (values are irrelevant: nothing runs)."""
    rec.tag = f"B{B} M{M} C{C} D{D} {DTYPE[dtype]}{' sigmoid' if sigmoid else ''}"
    f, c = torch.randn(B, M, D).to(dtype), torch.randn(B, C, D).to(dtype)
    alpha, beta = (torch.ones(1), torch.zeros(1)) if sigmoid else (None, None)
    assign, sim = torch.zeros(B, M, dtype=torch.int64), torch.rand(B, M).to(dtype)
    den = torch.ones(B, C, dtype=dtype)
    launchers.cosine_assign(f, c, alpha, beta)
    launchers.cosine_assign_backward(sim, f, c, assign, sim, alpha, beta)
    launchers.superpixel_cluster(f, c, f, c, alpha, beta)
    launchers.cluster_aggregate(f, assign, sim, c)
    launchers.cluster_aggregate_backward(c, f, assign, sim, c, den)
    launchers.cluster_dispatch(c, assign, sim, f)
    launchers.cluster_dispatch(c, assign, sim, None)
    launchers.cluster_dispatch_backward(f, c, assign, sim, True)


def launch_pairs(rec, K, P, D, C, Du, dtype, strided):
    """pairwise_edge_fusion forward and backward at one size, with and without union and bias, in
    both forms (product, and sum: the kernels' SUM flag)."""
    tag = f"K{K} P{P} D{D} C{C} Du{Du} {DTYPE[dtype]}{' strided' if strided else ''}"
    if strided:
        e = torch.zeros(K, 2 * D, dtype=dtype)
        subj, obj = e[:, :D], e[:, D:]
    else:
        subj, obj = torch.zeros(K, D, dtype=dtype), torch.zeros(K, D, dtype=dtype)
    pairs = torch.zeros(P, 2, dtype=torch.int64)
    union = torch.zeros(P, Du, dtype=dtype)
    weight, bias, grad = torch.zeros(C, D, dtype=dtype), torch.zeros(C, dtype=dtype), torch.zeros(P, C, dtype=dtype)
    for sum_mode in (False, True):
        rec.tag = tag + (" sum" if sum_mode else "")
        for u in (union, None):
            for b in (bias, None):
                pair_launchers.pairwise_edge_fusion(subj, obj, u, pairs, weight, b, sum_mode)
                pair_launchers.pairwise_edge_fusion_backward(grad, subj, obj, u, pairs, weight, b is not None, sum_mode)


def launch_prototypes(rec, N, Q, D, dtype, layout):
    """prototype_distance forward and backward at one size; x row-strided (a slice of a wider
    tensor), contiguous, or transposed (column stride != 1: another specialisation)."""
    rec.tag = f"N{N} Q{Q} D{D} {DTYPE[dtype]} {layout}"
    if layout == "strided":
        x = torch.zeros(N, 2 * D, dtype=dtype)[:, :D]
    elif layout == "transposed":
        x = torch.zeros(D, N, dtype=dtype).t()
    else:
        x = torch.zeros(N, D, dtype=dtype)
    protos, grad = torch.zeros(Q, D, dtype=dtype), torch.zeros(N, Q, dtype=dtype)
    proto_launchers.prototype_distance(x, protos)
    proto_launchers.prototype_distance_backward(grad, grad, x, protos, True, True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)), help="compute capabilities x10, comma-separated (default: 90,80)")
    ap.add_argument("--family", action="append", choices=("cluster", "pairs", "prototypes"), help="only these families")
    ap.add_argument("--dtype", action="append", choices=("fp32", "fp16", "bf16", "fp64"), help="only these dtypes")
    args = ap.parse_args()
    archs = [int(a) for a in args.arch.split(",") if a.strip()]
    rec = Recorder()
    rec.families, rec.dtypes = args.family, args.dtype
    for module in LAUNCHER_MODULES:
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                setattr(module, name, rec.wrap(getattr(module, name)))
    for arch in archs:
        rec.arch = arch
        geometry.ARCH = arch  # the launchers' register caps follow the target (sm_90 only)
        launch_every_size(rec)
    names = ", ".join(f"sm_{a}" for a in archs)
    for w in rec.warnings:
        print("WARNING:", w)
    for e in rec.errors:
        print("ERROR:", e)
    print(f"check_triton_compile: {len(rec.lines)} kernel variants compiled for {names}, {len(rec.warnings)} warnings (hot kernels under 2 waves or 1 CTA/SM, fp64 spills), "
          f"{len(rec.errors)} errors (compile errors, spills, hot kernels under one wave)")
    return 1 if rec.errors else 0


def launch_every_size(rec):
    """The benchmark sizes (paper, sgdet: DESIGN.md) and an odd one, of every family, in every dtype."""
    def want(family, dtype):
        return (rec.families is None or family in rec.families) and (rec.dtypes is None or DTYPE[dtype] in rec.dtypes)

    def at(size, launch, *args):
        rec.size = size
        launch(rec, *args)

    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        if want("cluster", dtype):
            at("paper", launch_all, 16, 6144, 49, 64, dtype, False)   # B=4 x 4 heads, 64x96 map
            at("paper", launch_all, 16, 6144, 49, 64, dtype, True)
            at("sgdet", launch_all, 32, 24576, 81, 64, dtype, False)  # 128x192 map, two center blocks
            at("odd", launch_all, 2, 130, 5, 257, dtype, True)        # several D blocks
        if want("pairs", dtype):
            at("paper", launch_pairs, 100, 2400, 4096, 51, 4096, dtype, True)    # E1 halves
            at("sgdet", launch_pairs, 320, 25280, 4096, 51, 4096, dtype, False)
            at("odd", launch_pairs, 7, 40, 257, 5, 100, dtype, True)             # Du < D, C < 16
        if want("prototypes", dtype):
            at("paper", launch_prototypes, 2400, 51, 4096, dtype, "contiguous")
            at("sgdet", launch_prototypes, 25280, 51, 4096, dtype, "strided")
            at("odd", launch_prototypes, 37, 5, 257, dtype, "transposed")        # Q < 16, D not a block multiple


if __name__ == "__main__":
    sys.exit(main())
