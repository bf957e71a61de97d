"""The fused Gaussian pair-mask op (segmentation-grounded SGG, Eq. 6): every backend against the
float64 reference, forward and both gradients.

Per-pair and per-object kernels, own and union frames, float32/float64/float16/bfloat16; odd
shapes (m = 1, d = 1, d > m, C = 1, R = 1, R > m), self-pairs, an object in many pairs, degenerate
boxes, empty inputs (P = 0, K = 0, C = 0), out-of-range pairs with checks off, determinism,
gradcheck through ``gaussian_kernels`` to the Gaussian parameters, opcheck, autocast, bad inputs.
The reference itself is checked against independent oracles in test_masks_reference.py.
"""
import pytest
import torch

import sgg_kernels as sk
from sgg_kernels.ops import masks as ops
from sgg_kernels.reference import masks as ref

from helpers import HAS_CUDA, assert_close, backend_params, gradcheck_params, require, run_with_grads, to_ref

TABLES = ops.KERNELS["pair_mask_conv"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _boxes(K, gen, degenerate=False):
    """Boxes in a 100 x 80 image, float64; optionally a zero-width, a zero-height and an inverted one."""
    xy = torch.rand(K, 2, generator=gen, dtype=torch.float64) * torch.tensor([100.0, 80.0])
    wh = torch.rand(K, 2, generator=gen, dtype=torch.float64) * 40 + 1
    b = torch.cat([xy, xy + wh], 1)
    if degenerate and K >= 3:
        b[0, 2] = b[0, 0]
        b[1, 3] = b[1, 1]
        b[2, 2] = b[2, 0] - 3.0
    return b


def _pairs(K, P, gen, self_pairs=True):
    """P random pairs over K objects; object 0 in many of them, a few self-pairs."""
    if K == 0 or P == 0:
        return torch.zeros(0, 2, dtype=torch.int64)
    pairs = torch.randint(0, K, (P, 2), generator=gen)
    pairs[: P // 3, 0] = 0
    if self_pairs:
        pairs[-1, 1] = pairs[-1, 0]
    return pairs


def _case(seed, K=6, P=9, C=3, m=7, d=5, per="pair", dtype=torch.float32, device="cpu", union=False, R=9,
          degenerate=False):
    """(masks, pairs, params, boxes, out_size, d) with masks in [0, 1] and Gaussian parameters."""
    g = _gen(seed)
    masks = torch.rand(K, C, m, m, generator=g, dtype=torch.float64)
    pairs = _pairs(K, P, g)
    n = (pairs.shape[0], 2) if per == "pair" else (K,)
    params = torch.randn(*n, 3, generator=g, dtype=torch.float64) * 0.7
    boxes = _boxes(K, g, degenerate).to(device) if union else None
    masks, params = masks.to(device, dtype), params.to(device, dtype)
    return masks.requires_grad_(), pairs.to(device), params.requires_grad_(), boxes, (R if union else None), d


def _fn(pairs, boxes, out_size, d):
    def fn(masks, params):
        return sk.pair_mask_conv(masks, pairs, sk.gaussian_kernels(params, d), boxes, out_size)
    return fn


def _check_against_reference(backend, masks, pairs, params, boxes, out_size, d, dtype, scale=1.0):
    fn = _fn(pairs, boxes, out_size, d)
    (out,), grads = run_with_grads(backend, fn, (masks, params))
    (want,), want_grads = run_with_grads("reference", _fn(pairs.cpu(), None if boxes is None else boxes.cpu(), out_size, d),
                                         (to_ref(masks), to_ref(params)), round_to=dtype)
    assert out.dtype == dtype and out.is_contiguous()
    assert_close(out, want, dtype, "out", scale)
    for name, g, w in zip(("d masks", "d params"), grads, want_grads):
        assert_close(g, w, dtype, name, scale)


# ---------------------------------------------------------------------------------------------
# The reference's explicit backward formulas against autograd through its forward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per", ["pair", "object"])
@pytest.mark.parametrize("union", [False, True])
def test_reference_backward_formulas_match_autograd(per, union):
    masks, pairs, params, boxes, R, d = _case(1, per=per, dtype=torch.float64, union=union, degenerate=True)
    pairs = torch.cat([pairs, torch.tensor([[-1, 2], [1, 6]])])  # invalid pairs contribute nothing
    kernels = ref.gaussian_kernels(params.detach(), d)
    if per == "pair":
        kernels = torch.cat([kernels, torch.rand(2, 2, d, d, dtype=torch.float64)])
    kernels.requires_grad_()
    out = ref.pair_mask_conv(masks, pairs, kernels, boxes, R)
    assert (out[-2:] == 0).all()
    G = torch.randn_like(out)
    want = torch.autograd.grad(out, (masks, kernels), G)
    got = ref.pair_mask_conv_backward(G, masks.detach(), pairs, kernels.detach(), boxes, R or 0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    only = ref.pair_mask_conv_backward(G, masks.detach(), pairs, kernels.detach(), boxes, R or 0, True, False)
    assert only[1].shape == (0,) and torch.equal(only[0], got[0])


# ---------------------------------------------------------------------------------------------
# Parity per backend
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", backend_params([TABLES[0], TABLES[1]]))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("per", ["pair", "object"])
@pytest.mark.parametrize("union", [False, True], ids=["own", "union"])
def test_parity(backend, device, dtype, per, union):
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    require(TABLES, backend, device)
    case = _case(2, per=per, dtype=dtype, device=device, union=union, degenerate=True)
    _check_against_reference(backend, *case, dtype)


SHAPES = [  # K, P, C, m, d, R
    (1, 1, 1, 1, 1, 1),      # one object paired with itself, 1 x 1 masks, 1 x 1 kernels
    (3, 5, 2, 1, 3, 2),      # d > m
    (4, 7, 1, 5, 9, 13),     # d > m, R > m
    (5, 11, 4, 12, 7, 7),    # even m
    (9, 40, 3, 28, 7, 28),   # the paper's 28 x 28 masks and 7 x 7 kernels, many pairs per object
]


@pytest.mark.parametrize("backend,device", backend_params([TABLES[0], TABLES[1]]))
@pytest.mark.parametrize("K,P,C,m,d,R", SHAPES, ids=[f"K{s[0]}-P{s[1]}-C{s[2]}-m{s[3]}-d{s[4]}-R{s[5]}" for s in SHAPES])
@pytest.mark.parametrize("union", [False, True], ids=["own", "union"])
def test_odd_shapes(backend, device, K, P, C, m, d, R, union):
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    require(TABLES, backend, device)
    for per in ("pair", "object"):
        case = _case(3, K=K, P=P, C=C, m=m, d=d, R=R, per=per, dtype=torch.float64, device=device, union=union)
        _check_against_reference(backend, *case, torch.float64)


# Pair layouts that stress the per-object paths (each object's smoothing shared by all its pairs and
# roles; its gradient summed over them before one transposed convolution): one object paired with
# itself over and over, the same pair repeated in both orders, objects in no pair at all.
PAIR_LAYOUTS = {
    "K1-self-repeated": (1, [[0, 0], [0, 0], [0, 0]]),
    "repeated-pairs": (4, [[0, 1], [1, 0], [0, 1], [2, 2], [0, 1], [3, 0], [1, 0]]),
    "unused-objects": (7, [[1, 3], [3, 1], [1, 1], [5, 3]]),  # objects 0, 2, 4, 6 in no pair
}


@pytest.mark.parametrize("backend,device", backend_params([TABLES[0], TABLES[1]]))
@pytest.mark.parametrize("layout", list(PAIR_LAYOUTS))
@pytest.mark.parametrize("d", [1, 3, 5, 7, 9])
@pytest.mark.parametrize("per", ["object", "pair"])
def test_pair_layouts_and_kernel_sizes(backend, device, layout, d, per):
    """Forward and both gradients against the float64 reference, own and union frames, for every
    kernel size with a specialised or generic CUDA path (1, 3, 5, 7, 9) and m = 13 / 17 (partial
    vector blocks and row tails in the CPU kernels, partial strips in the CUDA ones). C = 10 spans two
    of the CPU backward's 8-channel blocks. Objects in no pair get exactly zero gradients."""
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    require(TABLES, backend, device)
    K, pair_list = PAIR_LAYOUTS[layout]
    pairs = torch.tensor(pair_list, dtype=torch.int64, device=device)
    g = _gen(20 + d)
    for m, union in ((13, False), (17, True)):
        masks = torch.rand(K, 10, m, m, generator=g, dtype=torch.float64).to(device).requires_grad_()
        n = (pairs.shape[0], 2) if per == "pair" else (K,)
        params = (torch.randn(*n, 3, generator=g, dtype=torch.float64) * 0.7).to(device).requires_grad_()
        boxes = _boxes(K, g).to(device) if union else None
        R = 11 if union else None
        _check_against_reference(backend, masks, pairs, params, boxes, R, d, torch.float64)
        unused = sorted(set(range(K)) - set(sum(pair_list, [])))
        if unused:
            with sk.use_backend(backend):
                out = sk.pair_mask_conv(masks, pairs, sk.gaussian_kernels(params, d), boxes, R)
                dm, dp = torch.autograd.grad(out.square().sum(), (masks, params))
            assert not dm[unused].any() and dm.abs().sum() > 0
            if per == "object":
                assert not dp[unused].any()


@pytest.mark.parametrize("backend,device", backend_params([TABLES[0], TABLES[1]]))
@pytest.mark.parametrize("union", [False, True], ids=["own", "union"])
def test_gradcheck_per_object_layouts(backend, device, union):
    """gradcheck (float64) of per-object kernels with repeated pairs, a self-pair and an object in
    no pair, d = 5 (the per-object gradient is summed over pairs before its transposed convolution)."""
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    require(TABLES, backend, device)
    g = _gen(30)
    K, d = 4, 5
    pairs = torch.tensor([[0, 1], [1, 0], [0, 1], [2, 2]], device=device)  # object 3 in no pair
    masks = torch.rand(K, 2, 6, 6, generator=g, dtype=torch.float64).to(device).requires_grad_()
    params = (torch.randn(K, 3, generator=g, dtype=torch.float64) * 0.7).to(device).requires_grad_()
    boxes = _boxes(K, g).to(device) if union else None
    R = 5 if union else None
    with sk.use_backend(backend):
        assert torch.autograd.gradcheck(_fn(pairs, boxes, R, d), (masks, params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend,device", backend_params([TABLES[0], TABLES[1]]))
@pytest.mark.parametrize("K,P,C", [(0, 0, 3), (4, 0, 3), (4, 5, 0)])
def test_empty(backend, device, K, P, C):
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    require(TABLES, backend, device)
    for union in (False, True):
        for per in ("pair", "object"):
            masks, pairs, params, boxes, R, d = _case(4, K=K, P=P, C=C, per=per, device=device, union=union)
            with sk.use_backend(backend):
                out = sk.pair_mask_conv(masks, pairs, sk.gaussian_kernels(params, d), boxes, R)
                assert out.shape == (P, C) + ((R, R) if union else (7, 7))
                dm, dp = torch.autograd.grad(out.sum(), (masks, params), allow_unused=True)
            assert dm is not None and dm.shape == masks.shape and not dm.any()
            assert dp is None or not dp.any()


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference-cpu")]
                         + backend_params([TABLES[0], TABLES[1]]))
def test_out_of_range_pairs_with_checks_off(backend, device):
    """Checks off: an invalid pair's output is 0 and it adds nothing to any gradient (no crash)."""
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    if backend != "reference":
        require(TABLES, backend, device)
    for union in (False, True):
        for per in ("pair", "object"):
            masks, pairs, params, boxes, R, d = _case(5, K=5, P=6, per=per, dtype=torch.float64, device=device, union=union)
            bad = torch.tensor([[-1, 2], [1, 5], [7, -3]], device=device)
            all_pairs = torch.cat([pairs, bad])
            extra = torch.rand(3, 2, d, d, dtype=torch.float64, device=device)

            def kernels(with_extra):
                k = sk.gaussian_kernels(params, d)
                return torch.cat([k, extra]) if per == "pair" and with_extra else k

            sk.set_checks(False)
            try:
                with sk.use_backend(backend):
                    out = sk.pair_mask_conv(masks, all_pairs, kernels(True), boxes, R)
                    grads = torch.autograd.grad(out.sum(), (masks, params))
            finally:
                sk.set_checks(True)
            with sk.use_backend(backend):
                want = sk.pair_mask_conv(masks, pairs, kernels(False), boxes, R)
                want_grads = torch.autograd.grad(want.sum(), (masks, params))
            assert (out[-3:] == 0).all()
            torch.testing.assert_close(out[:-3], want, rtol=0, atol=1e-12)
            for g, w in zip(grads, want_grads):
                torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend,device", backend_params([TABLES[0], TABLES[1]]))
def test_deterministic(backend, device):
    """Same inputs, same bits: every call, and on the CPU with any number of threads.

    The kernels are the leaf here: the op's gradients are what must not depend on the thread count
    (torch's own backward of ``gaussian_kernels``, plain PyTorch, may round differently with more
    threads)."""
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    require(TABLES, backend, device)
    threads = torch.get_num_threads()
    for union in (False, True):
        for per in ("pair", "object"):
            masks, pairs, params, boxes, R, d = _case(6, K=7, P=30, C=5, m=14, per=per, device=device, union=union)
            kernels = sk.gaussian_kernels(params, d).detach().requires_grad_()

            def fn(masks, kernels):
                return sk.pair_mask_conv(masks, pairs, kernels, boxes, R)

            runs = []
            for n in ((1, max(threads, 2)) if device == "cpu" else (threads, threads)):
                torch.set_num_threads(n)
                try:
                    runs.append(run_with_grads(backend, fn, (masks, kernels)))
                finally:
                    torch.set_num_threads(threads)
            (a,), ga = runs[0]
            (b,), gb = runs[1]
            assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))


# ---------------------------------------------------------------------------------------------
# gradcheck (float64, through gaussian_kernels to the Gaussian parameters) and opcheck
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device,name", gradcheck_params(
    ops.KERNELS, ["pair_mask_conv_pair_own", "pair_mask_conv_pair_union", "pair_mask_conv_object_own",
                  "pair_mask_conv_object_union"]))
def test_gradcheck(backend, device, name):
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    if backend != "reference":
        require(TABLES, backend, device)
    per, frame = name.split("_")[-2:]
    masks, pairs, params, boxes, R, d = _case(7, K=4, P=5, C=2, m=5, d=3, R=6, per=per, dtype=torch.float64,
                                              device=device, union=frame == "union")
    with sk.use_backend(backend):
        assert torch.autograd.gradcheck(_fn(pairs, boxes, R, d), (masks, params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference-cpu")]
                         + backend_params([TABLES[0], TABLES[1]]))
def test_opcheck(backend, device):
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    if backend != "reference":
        require(TABLES, backend, device)
    for union in (False, True):
        for per in ("pair", "object"):
            masks, pairs, params, boxes, R, d = _case(8, per=per, device=device, union=union)
            kernels = sk.gaussian_kernels(params, d).detach().requires_grad_()
            with sk.use_backend(backend):
                torch.library.opcheck(torch.ops.sgg_kernels.pair_mask_conv.default,
                                      (masks, pairs, kernels, boxes, R or 0))
                G = torch.randn(pairs.shape[0], masks.shape[1], *((R, R) if union else masks.shape[-2:]), device=device)
                torch.library.opcheck(torch.ops.sgg_kernels.pair_mask_conv_backward.default,
                                      (G, masks.detach(), pairs, kernels.detach(), boxes, R or 0, True, per == "pair"))


def test_autocast_mixed_dtypes():
    """Under autocast, half masks and float32 kernels meet in float32 (the op's autocast rule)."""
    masks, pairs, params, _, _, d = _case(9)
    kernels = sk.gaussian_kernels(params, d)
    want = sk.pair_mask_conv(masks, pairs, kernels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sk.pair_mask_conv(masks.to(torch.bfloat16), pairs, kernels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_bad_inputs():
    masks, pairs, params, _, _, d = _case(10, K=4, P=5)
    kernels = sk.gaussian_kernels(params, d).detach()
    boxes = _boxes(4, _gen(0))
    cases = [
        (lambda: sk.pair_mask_conv(masks[0], pairs, kernels), ValueError, "masks"),
        (lambda: sk.pair_mask_conv(masks[..., :-1], pairs, kernels), ValueError, "square"),
        (lambda: sk.pair_mask_conv(masks.long(), pairs, kernels), TypeError, "masks"),
        (lambda: sk.pair_mask_conv(masks, pairs.float(), kernels), TypeError, "pairs"),
        (lambda: sk.pair_mask_conv(masks, pairs[:, :1], kernels), ValueError, "pairs"),
        (lambda: sk.pair_mask_conv(masks, pairs, kernels[..., :4, :4]), ValueError, "odd"),  # even delta
        (lambda: sk.pair_mask_conv(masks, pairs, kernels[..., :3]), ValueError, "square"),
        (lambda: sk.pair_mask_conv(masks, pairs, kernels[:3]), ValueError, "kernels"),  # wrong leading size
        (lambda: sk.pair_mask_conv(masks, pairs, kernels[:, :1]), ValueError, "roles"),
        (lambda: sk.pair_mask_conv(masks, pairs, kernels[:, 0][:3]), ValueError, "K, the number of masks"),
        (lambda: sk.pair_mask_conv(masks, pairs, kernels[0, 0]), ValueError, "kernels"),
        (lambda: sk.pair_mask_conv(masks, pairs, kernels.double()), TypeError, "kernels"),
        (lambda: sk.pair_mask_conv(masks, torch.tensor([[0, 4]]), kernels[:1]), IndexError, "pairs"),
        (lambda: sk.pair_mask_conv(masks, torch.tensor([[-1, 0]]), kernels[:1]), IndexError, "pairs"),
        (lambda: sk.pair_mask_conv(masks, pairs, kernels, boxes), ValueError, "together"),
        (lambda: sk.pair_mask_conv(masks, pairs, kernels, None, 7), ValueError, "together"),
        (lambda: sk.pair_mask_conv(masks, pairs, kernels, boxes, 0), ValueError, "out_size"),
        (lambda: sk.pair_mask_conv(masks, pairs, kernels, boxes[:3], 7), ValueError, "boxes"),
        (lambda: sk.pair_mask_conv(masks, pairs, kernels, boxes[:, :3], 7), ValueError, "boxes"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
