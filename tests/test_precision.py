"""The float32 dot precision of the Triton kernels (``sk.set_precision``) and the fp16/bf16
native-dot paths.

On the CPU (interpreter) every dot is IEEE whatever the switch says, so only the switch itself is
tested here; the per-precision parity tests and the native half-precision ones need a GPU and skip
visibly without one.
"""
import pytest
import torch

import sgg_kernels as sk
from sgg_kernels import _backend

import test_cluster as tc
import test_pairs as tp
from helpers import HAS_CUDA

INTERPRETER_NOTE = ("the fp16/bf16 native tensor-core dots and the tf32/tf32x3 dots run only on a GPU: "
                    "under TRITON_INTERPRET=1 every dot is IEEE (the interpreter computes in numpy, and "
                    "its bf16 dots are wrong, so half inputs take the fp32 path there)")


def test_default_is_tf32x3_and_switch_validates(monkeypatch):
    monkeypatch.delenv(_backend.PRECISION_ENV, raising=False)
    assert sk.get_precision() == "tf32x3"
    for name in sk.PRECISIONS:
        sk.set_precision(name)
        assert sk.get_precision() == name
    with pytest.raises(ValueError, match="unknown precision 'fp32'.*tf32x3, ieee, tf32"):
        sk.set_precision("fp32")


def test_context_manager_nests_and_restores():
    sk.set_precision("tf32")
    with sk.precision("ieee"):
        assert sk.get_precision() == "ieee"
        with sk.precision("tf32x3"):
            assert sk.get_precision() == "tf32x3"
        assert sk.get_precision() == "ieee"
    assert sk.get_precision() == "tf32"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv(_backend.PRECISION_ENV, "ieee")
    assert sk.get_precision() == "ieee"
    sk.set_precision("tf32")  # an explicit call wins over the environment
    assert sk.get_precision() == "tf32"
    _backend._PRECISION["fp32"] = None
    monkeypatch.setenv(_backend.PRECISION_ENV, "bogus")
    with pytest.raises(ValueError, match="SGG_KERNELS_PRECISION='bogus'"):
        sk.get_precision()


def test_dot_precision_rules(monkeypatch):
    sk.set_precision("tf32")
    assert _backend.dot_precision(torch.float64) == "ieee"  # float64 dots are always IEEE
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.dot_precision(torch.float32) == "ieee"  # the interpreter computes in numpy
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _backend.dot_precision(torch.float32) == "tf32"


def _need_gpu():
    if not HAS_CUDA:
        pytest.skip(f"needs a CUDA GPU: {INTERPRETER_NOTE}")


# float32 parity per precision, on the GPU: ieee and tf32x3 at float32's tolerance; tf32 (10 mantissa
# bits) at 300x that. cosine_assign's check is tie-robust (the oracle is taken at the kernel's assignment).
PRECISION_SCALE = {"ieee": 1.0, "tf32x3": 1.0, "tf32": 300.0}


@pytest.mark.cuda
@pytest.mark.parametrize("precision", list(PRECISION_SCALE))
def test_fp32_parity_per_precision(precision):
    _need_gpu()
    scale = PRECISION_SCALE[precision]
    f32 = torch.float32
    with sk.precision(precision):
        if precision != "tf32":  # plain TF32 flips near-tied argmaxes beyond what the oracle tolerates
            tc._check_cosine_assign("triton", "cuda", 3, 130, 49, 64, f32, True, strided=False)
            tc._check_superpixel("triton", "cuda", 3, 130, 49, 64, f32, True, True)
        args = tc._aggregate_args(3, 130, 49, 64, f32, "cuda", False)
        outs, grads = tc.run_with_grads("triton", sk.cluster_aggregate, args, round_to=f32)
        outs_r, grads_r = tc.run_with_grads("reference", sk.cluster_aggregate, [tc.to_ref(a) for a in args], round_to=f32)
        assert len(grads) == len(grads_r) > 0
        for a, b in zip(list(outs) + list(grads), list(outs_r) + list(grads_r)):
            tc.assert_close(a, b, f32, f"cluster_aggregate at {precision}", scale)
        _, subj, obj, union, pairs, weight, b = tp._fusion_args(10, 48, 40, 19, True, False, f32, "cuda", tp._gen(7))
        fn = lambda s, o, u, w, b: sk.pairwise_edge_fusion(s, o, u, pairs, w, b)  # noqa: E731
        tp._check_parity("triton", fn, (subj, obj, union, weight, b), f32, scale=scale, what=f"fusion at {precision}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("op", ["cosine_assign", "superpixel_cluster", "cluster_aggregate", "cluster_dispatch",
                                "pairwise_edge_fusion"])
def test_native_half_dots(op, dtype):
    """The fp16/bf16 tensor-core paths (DOT_NATIVE / W_NATIVE) against the float64 reference."""
    _need_gpu()
    if op == "cosine_assign":
        tc._check_cosine_assign("triton", "cuda", *tc.DTYPE_SHAPE, dtype, False, strided=False)
    elif op == "superpixel_cluster":
        tc._check_superpixel("triton", "cuda", *tc.DTYPE_SHAPE, dtype, True, True)
    elif op == "cluster_aggregate":
        tc._check_parity("triton", sk.cluster_aggregate, tc._aggregate_args(*tc.DTYPE_SHAPE, dtype, "cuda", False), dtype)
    elif op == "cluster_dispatch":
        tc._check_parity("triton", sk.cluster_dispatch, tc._dispatch_args(*tc.DTYPE_SHAPE, dtype, "cuda", False, True), dtype)
    else:
        _, subj, obj, union, pairs, weight, b = tp._fusion_args(10, 48, 40, 19, True, False, dtype, "cuda", tp._gen(7))
        fn = lambda s, o, u, w, b: sk.pairwise_edge_fusion(s, o, u, pairs, w, b)  # noqa: E731
        tp._check_parity("triton", fn, (subj, obj, union, weight, b), dtype, scale=tp._scaled_tol(dtype), what=str(dtype))
