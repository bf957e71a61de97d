"""Pair feature ops (LinkNet Eq. 12-14, 17; union-box RoIAlign): every backend against the float64
reference, and the reference against independent oracles.

Forward and every gradient in float32/float16/bfloat16/float64; odd shapes (K = 1, D = 1,
D = 257, Du < D, self-pairs), strided subject/object halves, empty inputs (P = 0, K = 0), an image
with one box, degenerate and out-of-map boxes, out-of-range indices with checks off, gradcheck,
opcheck, determinism, torchvision parity on a GPU. Every pairwise_edge_fusion test runs both forms
(``mode="product"``, LinkNet's g = subj * obj * u, and ``mode="sum"``, SGB's g = (subj + obj) * u),
against the reference and against :func:`_fusion_oracle` (g materialised, then a matmul).
"""
import math

import pytest
import torch

import sgg_kernels as sk
from sgg_kernels.ops import pairs as ops
from sgg_kernels.reference import pairs as ref

from helpers import HAS_CUDA, assert_close, backend_params, gradcheck_params, require, run_with_grads, to_ref

K = ops.KERNELS
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MODES = ["product", "sum"]


def _fusion_oracle(subj, obj, union, pairs, weight, bias, mode):
    """pairwise_edge_fusion written out independently of the package: gather both rows, combine them
    (product or sum), multiply the first Du dims by union, matmul with weight^T, add bias."""
    a, b = subj[pairs[:, 0]], obj[pairs[:, 1]]
    g = a * b if mode == "product" else a + b
    if union is not None:
        Du = union.shape[1]
        g = torch.cat([g[:, :Du] * union, g[:, Du:]], dim=1)
    out = g @ weight.t()
    return out if bias is None else out + bias


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _boxes(n, img_w, img_h, gen, dtype=torch.float32, device="cpu", grad=False, degenerate=False):
    """Random boxes in an img_w x img_h image, some reaching past its border; optionally a zero-width,
    a zero-height and an inverted box."""
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * torch.tensor([img_w * 1.1, img_h * 1.1]) - 0.05 * torch.tensor([img_w, img_h])
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * torch.tensor([img_w / 2, img_h / 2]) + 0.5
    b = torch.cat([xy, xy + wh], dim=1)
    if degenerate and n >= 3:
        b[0, 2] = b[0, 0]          # zero width
        b[1, 3] = b[1, 1]          # zero height
        b[2, 2] = b[2, 0] - 3.0    # inverted
    return b.to(dtype).to(device).requires_grad_(grad)


def _batch(counts, device="cpu"):
    return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(device)


def _rand(shape, dtype, device, gen, grad=True, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device).requires_grad_(grad)


def _pairs_of(box_batch, gen, self_pairs=True):
    """All ordered pairs within each image (+ a few self-pairs), shuffled."""
    pairs = sk.all_pairs(box_batch.cpu())
    if self_pairs and box_batch.numel():
        idx = torch.arange(min(3, box_batch.numel()))
        pairs = torch.cat([pairs, torch.stack([idx, idx], 1)])
    return pairs[torch.randperm(pairs.shape[0], generator=gen)].to(box_batch.device)


def _scaled_tol(dtype):
    """bf16/f16 products of three values and long sums: allow a few ulps more than elementwise ops."""
    return 3.0 if dtype in (torch.float16, torch.bfloat16) else 1.0


# ---------------------------------------------------------------------------------------------
# The reference against independent oracles: a literal per-sample RoIAlign loop (torchvision's
# algorithm) and autograd through the reference forward for every explicit backward formula.
# ---------------------------------------------------------------------------------------------
def _roi_align_loop(f, rois, batch, ph, pw, scale, sampling_ratio, aligned):
    """torchvision's RoIAlign, written as its loops over bins and samples (float64, slow)."""
    B, D, H, W = f.shape
    out = torch.zeros(len(rois), D, ph, pw, dtype=torch.float64)
    f = f.double()

    def bilinear(b, y, x):
        if y < -1.0 or y > H or x < -1.0 or x > W:
            return torch.zeros(D, dtype=torch.float64)
        y, x = max(y, 0.0), max(x, 0.0)
        y0, x0 = int(y), int(x)
        if y0 >= H - 1:
            y1 = y0 = H - 1
            y = float(y0)
        else:
            y1 = y0 + 1
        if x0 >= W - 1:
            x1 = x0 = W - 1
            x = float(x0)
        else:
            x1 = x0 + 1
        ly, lx = y - y0, x - x0
        return ((1 - ly) * (1 - lx) * f[b, :, y0, x0] + (1 - ly) * lx * f[b, :, y0, x1]
                + ly * (1 - lx) * f[b, :, y1, x0] + ly * lx * f[b, :, y1, x1])

    off = 0.5 if aligned else 0.0
    for r, (box, b) in enumerate(zip(rois.tolist(), batch.tolist())):
        sx, sy, ex, ey = (c * scale - off for c in box)
        rw, rh = ex - sx, ey - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / ph, rw / pw
        nh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / ph)
        nw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / pw)
        count = max(nh * nw, 1)
        for p in range(ph):
            for q in range(pw):
                acc = torch.zeros(D, dtype=torch.float64)
                for iy in range(nh):
                    y = sy + p * bh + (iy + 0.5) * bh / nh
                    for ix in range(nw):
                        acc += bilinear(b, y, sx + q * bw + (ix + 0.5) * bw / nw)
                out[r, :, p, q] = acc / count
    return out


@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_reference_roi_align_matches_torchvision_loops(sampling_ratio, aligned):
    gen = _gen(1)
    f = torch.randn(2, 3, 9, 13, generator=gen, dtype=torch.float64)
    boxes = _boxes(7, 13 * 4, 9 * 4, gen, torch.float64, degenerate=True)
    box_batch = torch.randint(0, 2, (7,), generator=gen)
    for scale, ph, pw in ((0.25, 3, 4), (0.5, 2, 2), (1 / 3, 1, 5)):
        got = ref.roi_align(f, boxes, box_batch, None, ph, pw, scale, sampling_ratio, aligned)
        want = _roi_align_loop(f, boxes, box_batch, ph, pw, scale, sampling_ratio, aligned)
        assert (got - want).abs().max() < 1e-12


def _autograd_oracles():
    gen = _gen(2)
    boxes = _boxes(6, 40, 30, gen, torch.float64, degenerate=True)
    box_batch = torch.tensor([0, 0, 0, 1, 1, 1])
    pairs = _pairs_of(box_batch, gen)
    f = torch.randn(2, 3, 8, 11, generator=gen, dtype=torch.float64)
    E = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    union = torch.randn(pairs.shape[0], 3, generator=gen, dtype=torch.float64)
    W = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    return boxes, box_batch, pairs, f, E, union, W


def _close64(a, b, what=""):
    assert (a - b).abs().max() <= 1e-12 * max(1.0, b.abs().max().item()), what


def test_reference_backward_formulas_match_autograd():
    boxes, box_batch, pairs, f, E, union, W = _autograd_oracles()
    for fwd, bwd in ((ref.union_boxes, ref.union_boxes_backward), (ref.pair_geometry, ref.pair_geometry_backward)):
        b = boxes.clone().requires_grad_()
        out = fwd(b, pairs)
        G = torch.randn_like(out)
        (want,) = torch.autograd.grad(out, b, G)
        _close64(bwd(G, boxes, pairs), want, fwd.__name__)
    for p in (None, pairs):
        fr = f.clone().requires_grad_()
        out = ref.roi_align(fr, boxes, box_batch, p, 3, 2, 0.3, 0, False)
        G = torch.randn_like(out)
        (want,) = torch.autograd.grad(out, fr, G)
        _close64(ref.roi_align_backward(G, boxes, box_batch, p, 2, 8, 11, 0.3, 0, False), want)
    for u, sum_mode in ((None, False), (union, False), (None, True), (union, True)):
        leaves = [E.clone().requires_grad_(), W.clone().requires_grad_(), torch.randn(4, dtype=torch.float64, requires_grad=True)]
        if u is not None:
            leaves.append(u.clone().requires_grad_())
        Ev, Wv, bv = leaves[:3]
        out = ref.pairwise_edge_fusion(Ev[:, :5], Ev[:, 5:], leaves[3] if u is not None else None, pairs, Wv, bv, sum_mode)
        # the reference's forward against the oracle written in this file
        _close64(out, _fusion_oracle(Ev[:, :5], Ev[:, 5:], leaves[3] if u is not None else None, pairs, Wv, bv,
                                     "sum" if sum_mode else "product"))
        G = torch.randn_like(out)
        want = torch.autograd.grad(out, leaves, G)
        ds, do, du, dw, db = ref.pairwise_edge_fusion_backward(G, E[:, :5], E[:, 5:], u, pairs, W, True, sum_mode)
        _close64(torch.cat([ds, do], 1), want[0])
        _close64(dw, want[1])
        _close64(db, want[2])
        if u is not None:
            _close64(du, want[3])


def test_union_boxes_ties_go_to_the_subject():
    """(autograd's torch.minimum would split a tie in halves; the op gives it to the subject)"""
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 1.0, 4.0, 3.0]], dtype=torch.float64)
    for backend in ("reference",) + (("cpu",) if K["union_boxes"][1].why_not("cpu", "cpu") is None else ()):
        b = boxes.clone().requires_grad_()
        with sk.use_backend(backend):
            sk.union_boxes(b, torch.tensor([[1, 0]])).backward(torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64))
        # x1 and x2 tie: to the subject (box 1); y1 = 0 and y2 = 4 come from box 0
        assert b.grad.tolist() == [[0.0, 2.0, 0.0, 4.0], [1.0, 0.0, 3.0, 0.0]], backend


def test_pair_geometry_is_eq17_with_centres():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 10.0, 25.0, 30.0]], dtype=torch.float64)
    got = sk.pair_geometry(boxes, torch.tensor([[0, 1]]))
    # subject centre (5, 10), size 10 x 20; object centre (15, 20), size 20 x 20
    want = torch.tensor([[(15 - 5) / 10, (20 - 10) / 20, math.log(20 / 10), math.log(20 / 20)]], dtype=torch.float64)
    assert torch.allclose(got, want)
    assert torch.equal(sk.union_boxes(boxes, torch.tensor([[1, 0]])), torch.tensor([[0.0, 0.0, 25.0, 30.0]], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Parity of every backend with the float64 reference
# ---------------------------------------------------------------------------------------------
def _check_parity(backend, fn, args, dtype, scale=1.0, what=""):
    outs, grads = run_with_grads(backend, fn, args, round_to=dtype)
    outs_r, grads_r = run_with_grads("reference", fn, [to_ref(a) for a in args], round_to=dtype)
    assert len(outs) == len(outs_r)
    for i, (a, b) in enumerate(zip(outs, outs_r)):
        assert a.dtype == (args[0].dtype if isinstance(args[0], torch.Tensor) else a.dtype)
        assert_close(a, b, dtype, f"{what} output {i}", scale)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    assert len(grads) == len(grads_r) == len(leaves)
    for i, (a, b) in enumerate(zip(grads, grads_r)):
        assert a is not None and b is not None, f"{what}: gradient {i} missing"
        assert_close(a, b, dtype, f"{what} gradient {i}", scale)


@pytest.mark.parametrize("backend,device", backend_params(K["pair_geometry"]))
@pytest.mark.parametrize("dtype", DTYPES)
def test_union_boxes_and_pair_geometry(backend, device, dtype):
    require(K["pair_geometry"], backend, device)
    require(K["union_boxes"], backend, device)
    gen = _gen(3)
    box_batch = _batch([4, 1, 6], device)  # image 1 has a single box (no pairs but self-pairs)
    # float16 cannot hold the ~1e7 offsets a 1e-6-wide subject gives (they overflow to inf)
    boxes = _boxes(11, 60, 40, gen, dtype, device, grad=True, degenerate=dtype != torch.float16)
    pairs = _pairs_of(box_batch, gen)
    _check_parity(backend, sk.union_boxes, (boxes, pairs), dtype, what="union_boxes")
    # pair_geometry divides by sizes: compare where the sizes are representable in this dtype
    _check_parity(backend, sk.pair_geometry, (boxes, pairs), dtype, scale=_scaled_tol(dtype), what="pair_geometry")
    with sk.use_backend(backend):
        geo = sk.pair_geometry(boxes, pairs)
    assert torch.isfinite(geo).all(), "degenerate boxes must give finite geometry"


ROI_CASES = [  # (B, D, H, W, counts per image, output_size, spatial_scale, sampling_ratio, aligned)
    pytest.param(2, 3, 9, 13, [4, 3], (3, 4), 0.25, 0, False, id="adaptive"),
    pytest.param(1, 1, 5, 7, [1], 2, 0.5, -1, True, id="one-box-D1-aligned"),
    pytest.param(3, 5, 16, 11, [3, 0, 5], (7, 7), 1 / 16 * 4, 2, False, id="empty-image-sr2"),
    pytest.param(2, 257, 6, 6, [2, 2], (2, 3), 1.0, 1, True, id="D257-sr1"),
]


@pytest.mark.parametrize("backend,device", backend_params(K["roi_align"]))
@pytest.mark.parametrize("B,D,H,W,counts,output_size,scale,sr,aligned", ROI_CASES)
def test_roi_align(backend, device, B, D, H, W, counts, output_size, scale, sr, aligned):
    require(K["roi_align"], backend, device)
    gen = _gen(4)
    f = _rand((B, D, H, W), torch.float32, device, gen)
    box_batch = _batch(counts, device)
    boxes = _boxes(box_batch.numel(), W / scale, H / scale, gen, torch.float32, device, degenerate=True)
    fn = lambda f, b, bb: sk.roi_align(f, b, bb, output_size, scale, sr, aligned)  # noqa: E731
    _check_parity(backend, fn, (f, boxes, box_batch), torch.float32, what="roi_align")


@pytest.mark.parametrize("backend,device", backend_params(K["union_roi_align"]))
@pytest.mark.parametrize("dtype", DTYPES)
def test_union_roi_align_dtypes_and_levels(backend, device, dtype):
    require(K["union_roi_align"], backend, device)
    gen = _gen(5)
    box_batch = _batch([5, 1, 3], device)
    boxes = _boxes(9, 64, 48, gen, torch.float32, device, degenerate=True)
    pairs = _pairs_of(box_batch, gen)
    levels = [_rand((3, 4, 12, 16), dtype, device, gen), _rand((3, 6, 6, 8), dtype, device, gen)]
    fn = lambda a, b, bb, p: sk.union_roi_align(a, b, bb, p, (3, 2), 0.25, 0, False)  # noqa: E731
    _check_parity(backend, fn, (levels[0], boxes, box_batch, pairs), dtype, scale=_scaled_tol(dtype), what="union_roi_align")
    # FPN levels: outputs concatenated along channels, each level pooled with its own scale
    with sk.use_backend(backend):
        both = sk.union_roi_align(levels, boxes, box_batch, pairs, 3, [0.25, 0.125], 2, True)
    with sk.use_backend("reference"):
        parts = [sk.union_roi_align(lv, boxes, box_batch, pairs, 3, s, 2, True) for lv, s in zip(levels, (0.25, 0.125))]
    assert both.shape == (pairs.shape[0], 10, 3, 3)
    assert_close(both, torch.cat(parts, 1), dtype, "levels", _scaled_tol(dtype))
    # the union RoI equals roi_align of the explicit union boxes, in the subject's image
    with sk.use_backend(backend):
        explicit = sk.roi_align(levels[0], sk.union_boxes(boxes, pairs), box_batch[pairs[:, 0]], (3, 2), 0.25, 0, False)
        fused = fn(levels[0], boxes, box_batch, pairs)
    assert_close(fused, explicit, dtype, "union vs explicit", _scaled_tol(dtype))


FUSION_CASES = [  # (K, D, Du (None: no union), C, bias, strided halves)
    pytest.param(7, 33, 33, 5, True, True, id="K7-D33-Du=D-strided"),
    pytest.param(1, 1, None, 1, False, False, id="K1-D1-no-union"),
    pytest.param(9, 257, 100, 51, True, True, id="D257-Du100-C51"),
    pytest.param(12, 64, 0, 17, False, False, id="Du0"),
]


def _fusion_args(Kb, D, Du, C, bias, strided, dtype, device, gen, counts=None):
    box_batch = _batch(counts or [Kb // 2, Kb - Kb // 2], device)
    pairs = _pairs_of(box_batch, gen)
    P = pairs.shape[0]
    if strided:  # LinkNet's E1 [K, 2D]: subject half and object half as strided views
        E = _rand((Kb, 2 * D), dtype, device, gen)
        subj, obj = E[:, :D], E[:, D:]
    else:
        subj, obj = _rand((Kb, D), dtype, device, gen), _rand((Kb, D), dtype, device, gen)
    union = None if Du is None else _rand((P, Du), dtype, device, gen)
    weight = _rand((C, D), dtype, device, gen, scale=D ** -0.5)
    b = _rand((C,), dtype, device, gen) if bias else None
    return E if strided else None, subj, obj, union, pairs, weight, b


def _check_oracle(backend, fn, oracle, args, dtype, scale=1.0, what=""):
    """``fn(*args)`` on ``backend`` against ``oracle`` (plain autograd through the materialised
    formula) on float64 copies of the same values: the output and every gradient."""
    outs, grads = run_with_grads(backend, fn, args, round_to=dtype)
    outs_o, grads_o = run_with_grads("reference", oracle, [to_ref(a) for a in args], round_to=dtype)
    for i, (a, b) in enumerate(zip(outs, outs_o)):
        assert_close(a, b, dtype, f"{what} output {i} vs oracle", scale)
    assert len(grads) == len(grads_o)
    for i, (a, b) in enumerate(zip(grads, grads_o)):
        assert a is not None and b is not None, f"{what}: gradient {i} missing"
        assert_close(a, b, dtype, f"{what} gradient {i} vs oracle", scale)


def _fusion_fns(pairs, mode, D_=None):
    """(op, oracle) taking (E, u, w, b) when the halves ``E[:, :D_]``, ``E[:, D_:]`` are strided
    views, else (subj, obj, u, w, b)."""
    if D_ is not None:
        return (lambda E, u, w, b: sk.pairwise_edge_fusion(E[:, :D_], E[:, D_:], u, pairs, w, b, mode=mode),
                lambda E, u, w, b: _fusion_oracle(E[:, :D_], E[:, D_:], u, pairs.cpu(), w, b, mode))
    return (lambda s, o, u, w, b: sk.pairwise_edge_fusion(s, o, u, pairs, w, b, mode=mode),
            lambda s, o, u, w, b: _fusion_oracle(s, o, u, pairs.cpu(), w, b, mode))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend,device", backend_params(K["pairwise_edge_fusion"]))
@pytest.mark.parametrize("Kb,D,Du,C,bias,strided", FUSION_CASES)
def test_pairwise_edge_fusion_shapes(backend, device, Kb, D, Du, C, bias, strided, mode):
    require(K["pairwise_edge_fusion"], backend, device)
    E, subj, obj, union, pairs, weight, b = _fusion_args(Kb, D, Du, C, bias, strided, torch.float32, device, _gen(6))
    if strided:
        fn, oracle = _fusion_fns(pairs, mode, subj.shape[1])
        args = (E, union, weight, b)
    else:
        fn, oracle = _fusion_fns(pairs, mode)
        args = (subj, obj, union, weight, b)
    _check_parity(backend, fn, args, torch.float32, what=f"pairwise_edge_fusion {mode}")
    _check_oracle(backend, fn, oracle, args, torch.float32, what=f"pairwise_edge_fusion {mode}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend,device", backend_params(K["pairwise_edge_fusion"]))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_pairwise_edge_fusion_dtypes(backend, device, dtype, mode):
    require(K["pairwise_edge_fusion"], backend, device)
    _, subj, obj, union, pairs, weight, b = _fusion_args(10, 48, 40, 19, True, False, dtype, device, _gen(7))
    fn, oracle = _fusion_fns(pairs, mode)
    _check_parity(backend, fn, (subj, obj, union, weight, b), dtype, scale=_scaled_tol(dtype), what=f"{dtype} {mode}")
    _check_oracle(backend, fn, oracle, (subj, obj, union, weight, b), dtype, scale=_scaled_tol(dtype),
                  what=f"{dtype} {mode}")


@pytest.mark.parametrize("Du", [None, 0, 5, 12], ids=["no-union", "Du0", "Du<D", "Du=D"])
@pytest.mark.parametrize("mode", MODES)
def test_pairwise_edge_fusion_reference_is_the_oracle(mode, Du):
    """The float64 reference (the other tests' oracle) against the materialised formula, forward and
    every gradient, for both forms."""
    gen = _gen(19)
    _, subj, obj, union, pairs, weight, b = _fusion_args(9, 12, Du, 7, True, False, torch.float64, "cpu", gen)
    fn, oracle = _fusion_fns(pairs, mode)
    args = (subj, obj, union, weight, b)
    outs, grads = run_with_grads("reference", fn, args)
    outs_o, grads_o = run_with_grads("reference", oracle, args)
    assert len(grads) == len(grads_o) == (5 if union is not None else 4)
    for a, w in zip(list(outs) + list(grads), list(outs_o) + list(grads_o)):
        assert a.shape == w.shape, mode
        if a.numel():  # d union of Du = 0 is [P, 0]
            _close64(a, w, mode)


# ---------------------------------------------------------------------------------------------
# Empty inputs, out-of-range indices with checks off, determinism
# ---------------------------------------------------------------------------------------------
ALL_BACKENDS = sorted({p.values for name in K for p in backend_params(K[name])}, key=str)


@pytest.mark.parametrize("backend,device", [pytest.param(b, d, id=f"{b}-{d}", marks=[pytest.mark.cuda] if d == "cuda" else [])
                                            for b, d in ALL_BACKENDS])
@pytest.mark.parametrize("Kb", [0, 3])
def test_empty_pairs(backend, device, Kb):
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    gen = _gen(8)
    boxes = _boxes(Kb, 30, 20, gen, torch.float32, device, grad=True)
    box_batch = torch.zeros(Kb, dtype=torch.int64, device=device)
    pairs = torch.zeros(0, 2, dtype=torch.int64, device=device)
    f = _rand((1, 4, 5, 6), torch.float32, device, gen)
    subj, obj = _rand((Kb, 8), torch.float32, device, gen), _rand((Kb, 8), torch.float32, device, gen)
    union, weight, bias = _rand((0, 8), torch.float32, device, gen), _rand((3, 8), torch.float32, device, gen), _rand((3,), torch.float32, device, gen)
    ran = 0
    for name, call in (
        ("union_boxes", lambda: sk.union_boxes(boxes, pairs)),
        ("pair_geometry", lambda: sk.pair_geometry(boxes, pairs)),
        ("roi_align", lambda: sk.roi_align(f, boxes, box_batch, 2, 0.25)),
        ("union_roi_align", lambda: sk.union_roi_align(f, boxes, box_batch, pairs, 2, 0.25)),
        ("pairwise_edge_fusion", lambda: sk.pairwise_edge_fusion(subj, obj, union, pairs, weight, bias)),
        ("pairwise_edge_fusion", lambda: sk.pairwise_edge_fusion(subj, obj, union, pairs, weight, bias, mode="sum")),
        ("pairwise_edge_fusion", lambda: sk.pairwise_edge_fusion(subj, obj, None, pairs, weight, None, mode="sum")),
    ):
        if any(k.why_not(backend, device) for k in K[name]) or getattr(K[name][0], backend) is None:
            continue
        require(K[name], backend, device)
        with sk.use_backend(backend):
            out = call()
            out.sum().backward()
        ran += 1
        assert out.numel() == 0 or name == "roi_align"
    if not ran:
        pytest.skip(f"no pairs op has a {backend} kernel on {device} here")
    if bias.grad is not None:
        assert torch.equal(bias.grad, torch.zeros(3, device=device))


@pytest.mark.parametrize("backend,device", [pytest.param(b, d, id=f"{b}-{d}", marks=[pytest.mark.cuda] if d == "cuda" else [])
                                            for b, d in ALL_BACKENDS] + [pytest.param("reference", "cpu", id="reference-cpu")])
def test_out_of_range_with_checks_off(backend, device):
    """Invalid pair / image indices read nothing: their outputs are 0 (fusion: the bias) and they add
    nothing to any gradient, exactly as if the pair (RoI) were absent."""
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    gen = _gen(9)
    box_batch = _batch([3, 4], device)
    boxes = _boxes(7, 40, 40, gen, torch.float32, device, grad=True)
    pairs = _pairs_of(box_batch, gen)
    bad = pairs.clone()
    bad[0, 0], bad[1, 1], bad[2] = -1, 7, torch.tensor([10**9, -(2**40)])
    invalid = torch.zeros(bad.shape[0], dtype=torch.bool, device=device)
    invalid[:3] = True
    f = _rand((2, 3, 10, 10), torch.float32, device, gen)
    _, subj, obj, union, _, weight, _ = _fusion_args(7, 12, 12, 4, False, False, torch.float32, device, gen, counts=[3, 4])
    union = _rand((bad.shape[0], 12), torch.float32, device, gen)  # no bias: an invalid pair's logits are then 0
    bad_batch = box_batch.clone()
    bad_batch[1] = 5
    calls = {
        "pairwise_edge_fusion_sum": (lambda s, o, u, w: sk.pairwise_edge_fusion(s, o, u, bad, w, mode="sum"),
                                     lambda s, o, u, w: sk.pairwise_edge_fusion(s, o, u, pairs, w, mode="sum"),
                                     (subj, obj, union, weight)),
        "union_boxes": (lambda b: sk.union_boxes(b, bad), lambda b: sk.union_boxes(b, pairs), (boxes,)),
        "pair_geometry": (lambda b: sk.pair_geometry(b, bad), lambda b: sk.pair_geometry(b, pairs), (boxes,)),
        "union_roi_align": (lambda x: sk.union_roi_align(x, boxes, box_batch, bad, 2, 0.25),
                            lambda x: sk.union_roi_align(x, boxes, box_batch, pairs, 2, 0.25), (f,)),
        "roi_align": (lambda x: sk.roi_align(x, boxes, bad_batch, 2, 0.25),
                      lambda x: sk.roi_align(x, boxes, box_batch, 2, 0.25), (f,)),
        "pairwise_edge_fusion": (lambda s, o, u, w: sk.pairwise_edge_fusion(s, o, u, bad, w),
                                 lambda s, o, u, w: sk.pairwise_edge_fusion(s, o, u, pairs, w), (subj, obj, union, weight)),
    }
    ran = 0
    for name, (bad_fn, good_fn, args) in calls.items():
        kind, name = name, name.replace("_sum", "")  # the sum form uses the fusion's kernel tables
        if backend != "reference" and (getattr(K[name][0], backend) is None or any(k.why_not(backend, device) for k in K[name])):
            continue
        if backend != "reference":
            require(K[name], backend, device)
        with pytest.raises(IndexError):
            bad_fn(*args)
        sk.set_checks(False)
        try:
            (out,), grads = run_with_grads(backend, bad_fn, args)
            # the oracle: the good call with the invalid rows' cotangent zeroed = the rows dropped
            mask = (torch.arange(out.shape[0], device=device) == 1) if name == "roi_align" else invalid
            with sk.use_backend("reference"):
                good = good_fn(*[to_ref(a) for a in args])
                want_out = torch.where(mask.cpu().reshape(-1, *[1] * (good.dim() - 1)), 0, good)
            assert_close(out, want_out, torch.float32, f"{name} output")
            gen_c = torch.Generator().manual_seed(0)
            cot = torch.randn(out.shape, generator=gen_c, dtype=torch.float64)
            cot = torch.where(mask.cpu().reshape(-1, *[1] * (cot.dim() - 1)), 0, cot)
            ref_args = [to_ref(a) for a in args]
            with sk.use_backend("reference"):
                good = good_fn(*ref_args)
                want = torch.autograd.grad(good, [a for a in ref_args if a.requires_grad], cot, allow_unused=True)
            for i, (g, w) in enumerate(zip(grads, want)):
                if name == "pairwise_edge_fusion" and i == 2:  # d union rows of invalid pairs are zero
                    assert torch.equal(g[invalid], torch.zeros_like(g[invalid]))
                    g, w = g[~invalid], w[~invalid.cpu()]
                assert_close(g, w, torch.float32, f"{kind} gradient {i}")
        finally:
            sk.set_checks(True)
        ran += 1
    assert ran, "no op ran"


def test_pairs_across_images_are_rejected():
    box_batch = _batch([2, 2])
    boxes = _boxes(4, 20, 20, _gen(10))
    f = torch.randn(2, 3, 5, 5)
    with pytest.raises(ValueError, match="images 0 and 1"):
        sk.union_roi_align(f, boxes, box_batch, torch.tensor([[0, 1], [1, 2]]), 2, 0.25)


@pytest.mark.parametrize("backend,device", [pytest.param(b, d, id=f"{b}-{d}", marks=[pytest.mark.cuda] if d == "cuda" else [])
                                            for b, d in ALL_BACKENDS])
def test_deterministic(backend, device):
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    gen = _gen(11)
    box_batch = _batch([6, 5], device)
    boxes = _boxes(11, 64, 64, gen, torch.float32, device, grad=True)
    pairs = _pairs_of(box_batch, gen)
    f = _rand((2, 8, 16, 16), torch.float32, device, gen)
    _, subj, obj, union, _, weight, bias = _fusion_args(11, 40, 40, 7, True, False, torch.float32, device, gen, counts=[6, 5])
    union = _rand((pairs.shape[0], 40), torch.float32, device, gen)
    runs = []
    for _ in range(2):
        outs = []
        with sk.use_backend(backend):
            for name, call, leaves in (
                ("pair_geometry", lambda: sk.pair_geometry(boxes, pairs), (boxes,)),
                ("union_roi_align", lambda: sk.union_roi_align(f, boxes, box_batch, pairs, 3, 0.25), (f,)),
                ("pairwise_edge_fusion", lambda: sk.pairwise_edge_fusion(subj, obj, union, pairs, weight, bias),
                 (subj, obj, union, weight, bias)),
                ("pairwise_edge_fusion", lambda: sk.pairwise_edge_fusion(subj, obj, union, pairs, weight, bias, mode="sum"),
                 (subj, obj, union, weight, bias)),
            ):
                if getattr(K[name][0], backend) is None:
                    continue
                if device == "cuda" and backend == "cuda" and name != "pairwise_edge_fusion":
                    continue  # CUDA C++ RoIAlign/geometry backward use float atomics, like torchvision
                require(K[name], backend, device)
                y = call()
                outs += [y, *torch.autograd.grad(y, leaves, torch.ones_like(y) * 0.37)]
        runs.append(outs)
    if not runs[0]:
        pytest.skip("nothing deterministic to check on this backend")
    for a, b in zip(*runs):
        assert torch.equal(a, b), "two identical runs gave different bits"


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument, before any kernel runs
# ---------------------------------------------------------------------------------------------
def test_bad_inputs():
    boxes, box_batch = _boxes(4, 20, 20, _gen(12)), _batch([2, 2])
    pairs = torch.tensor([[0, 1], [3, 2]])
    f = torch.randn(2, 3, 5, 5)
    subj, obj, w = torch.randn(4, 8), torch.randn(4, 8), torch.randn(3, 8)
    cases = [
        (lambda: sk.union_boxes(boxes[:, :3], pairs), ValueError, "boxes"),
        (lambda: sk.pair_geometry(boxes, pairs.float()), TypeError, "pairs"),
        (lambda: sk.pair_geometry(boxes, pairs[:, :1]), ValueError, "pairs"),
        (lambda: sk.pair_geometry(boxes, torch.tensor([[0, 4]])), IndexError, "pairs"),
        (lambda: sk.roi_align(f[0], boxes, box_batch, 2), ValueError, "features"),
        (lambda: sk.roi_align(f, boxes, box_batch[:3], 2), ValueError, "box_batch"),
        (lambda: sk.roi_align(f, boxes, box_batch + 1, 2), IndexError, "box_batch"),
        (lambda: sk.roi_align(f, boxes, box_batch, 0), ValueError, "output_size"),
        (lambda: sk.roi_align(f, boxes, box_batch, (2, 2, 2)), ValueError, "output_size"),
        (lambda: sk.roi_align(f, boxes, box_batch, 2, spatial_scale=-1.0), ValueError, "spatial_scale"),
        (lambda: sk.roi_align(f, boxes, box_batch, 2, sampling_ratio=1.5), ValueError, "sampling_ratio"),
        (lambda: sk.union_roi_align([f, f[:1]], boxes, box_batch, pairs, 2, [0.5, 0.25]), ValueError, r"features\[1\]"),
        (lambda: sk.union_roi_align([f, f], boxes, box_batch, pairs, 2, [0.5]), ValueError, "spatial_scale"),
        (lambda: sk.union_roi_align([], boxes, box_batch, pairs, 2), ValueError, "features"),
        (lambda: sk.union_roi_align(f, boxes, box_batch, torch.tensor([[0, 9]]), 2), IndexError, "pairs"),
        (lambda: sk.pairwise_edge_fusion(subj, obj, None, pairs, w, mode="concat"), ValueError, "mode.*'product', 'sum'"),
        (lambda: sk.pairwise_edge_fusion(subj, obj, None, pairs, w, mode=None), ValueError, "mode"),
    ]
    for mode in MODES:  # every fusion check, in both forms
        cases += [
            (lambda m=mode: sk.pairwise_edge_fusion(subj, obj[:, :7], None, pairs, w, mode=m), ValueError, "obj"),
            (lambda m=mode: sk.pairwise_edge_fusion(subj, obj, None, pairs, w[:, :7], mode=m), ValueError, "weight"),
            (lambda m=mode: sk.pairwise_edge_fusion(subj, obj, torch.randn(2, 9), pairs, w, mode=m), ValueError, "union"),
            (lambda m=mode: sk.pairwise_edge_fusion(subj, obj, torch.randn(3, 8), pairs, w, mode=m), ValueError, "union"),
            (lambda m=mode: sk.pairwise_edge_fusion(subj, obj, None, pairs, w, torch.randn(4), mode=m), ValueError, "bias"),
            (lambda m=mode: sk.pairwise_edge_fusion(subj, obj.double(), None, pairs, w, mode=m), TypeError, "obj"),
            (lambda m=mode: sk.pairwise_edge_fusion(subj, obj, None, torch.tensor([[0, 4]]), w, mode=m), IndexError, "pairs"),
            (lambda m=mode: sk.pairwise_edge_fusion(subj, obj, None, pairs.int(), w, mode=m), TypeError, "pairs"),
        ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_autocast_mixed_dtypes():
    gen = _gen(13)
    _, subj, obj, union, pairs, weight, bias = _fusion_args(6, 16, 16, 3, True, False, torch.float32, "cpu", gen)
    f = _rand((2, 3, 8, 8), torch.bfloat16, "cpu", gen)
    boxes, box_batch = _boxes(6, 32, 32, gen), _batch([3, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sk.pairwise_edge_fusion(subj.bfloat16(), obj, union, pairs, weight, bias)
        out_sum = sk.pairwise_edge_fusion(subj.bfloat16(), obj, union, pairs, weight, bias, mode="sum")
        r = sk.union_roi_align(f, boxes, box_batch, pairs, 2, 0.25)
    assert out.dtype == torch.float32 and out_sum.dtype == torch.float32 and r.dtype == torch.float32
    # autocast ran the float32 kernel on the bf16-rounded subj: the sum form's value, not just its dtype
    want = _fusion_oracle(subj.bfloat16().double(), obj.double(), union.double(), pairs, weight.double(), bias.double(), "sum")
    assert_close(out_sum, want, torch.float32, "autocast sum")


# ---------------------------------------------------------------------------------------------
# gradcheck (float64) and opcheck
# ---------------------------------------------------------------------------------------------
def _gradcheck_cases(device):
    gen = _gen(14)
    box_batch = _batch([3, 2], device)
    boxes = _boxes(5, 24, 24, gen, torch.float64, device, grad=True)
    pairs = _pairs_of(box_batch, gen)
    f = _rand((2, 2, 6, 6), torch.float64, device, gen)
    E = _rand((5, 12), torch.float64, device, gen)
    union = _rand((pairs.shape[0], 4), torch.float64, device, gen)
    w, b = _rand((3, 6), torch.float64, device, gen), _rand((3,), torch.float64, device, gen)
    return {
        "union_boxes": (lambda x: sk.union_boxes(x, pairs), (boxes,)),
        "pair_geometry": (lambda x: sk.pair_geometry(x, pairs), (boxes,)),
        "roi_align": (lambda x: sk.roi_align(x, boxes.detach(), box_batch, (2, 3), 0.25, 0, False), (f,)),
        "union_roi_align": (lambda x: sk.union_roi_align(x, boxes.detach(), box_batch, pairs, 2, 0.25, 2, True), (f,)),
        "pairwise_edge_fusion": (lambda e, u, w, b: sk.pairwise_edge_fusion(e[:, :6], e[:, 6:], u, pairs, w, b), (E, union, w, b)),
        "pairwise_edge_fusion_sum": (lambda e, u, w, b: sk.pairwise_edge_fusion(e[:, :6], e[:, 6:], u, pairs, w, b, mode="sum"),
                                     (E, union, w, b)),
        "pairwise_edge_fusion_sum_no_union": (lambda e, w: sk.pairwise_edge_fusion(e[:, :6], e[:, 6:], None, pairs, w, mode="sum"),
                                              (E, w)),
    }


@pytest.mark.parametrize("backend,device,name", gradcheck_params(
    K, list(K) + ["pairwise_edge_fusion_sum", "pairwise_edge_fusion_sum_no_union"]))
def test_gradcheck(backend, device, name):
    if backend != "reference":
        require(K[max((op for op in K if name.startswith(op)), key=len)], backend, device)
    fn, inputs = _gradcheck_cases(device)[name]
    with sk.use_backend(backend):
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def _opcheck_samples(device):
    gen = _gen(15)
    box_batch = _batch([3, 2], device)
    boxes = _boxes(5, 24, 24, gen, torch.float32, device, grad=True)
    pairs = _pairs_of(box_batch, gen)
    P = pairs.shape[0]
    f = _rand((2, 3, 6, 6), torch.float32, device, gen)
    E = _rand((5, 12), torch.float32, device, gen)
    union = _rand((P, 4), torch.float32, device, gen)
    w, b = _rand((3, 6), torch.float32, device, gen), _rand((3,), torch.float32, device, gen)
    g = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    o = torch.ops.sgg_kernels
    return [
        (o.union_boxes.default, (boxes, pairs)),
        (o.union_boxes_backward.default, (g(P, 4), boxes.detach(), pairs)),
        (o.pair_geometry.default, (boxes, pairs)),
        (o.pair_geometry_backward.default, (g(P, 4), boxes.detach(), pairs)),
        (o.roi_align.default, (f, boxes.detach(), box_batch, 2, 3, 0.25, 0, False)),
        (o.union_roi_align.default, (f, boxes.detach(), box_batch, pairs, 3, 2, 0.5, 2, True)),
        (o.roi_align_backward.default, (g(P, 3, 2, 2), boxes.detach(), box_batch, pairs, 2, 6, 6, 0.25, -1, False)),
        (o.roi_align_backward.default, (g(5, 3, 2, 2), boxes.detach(), box_batch, None, 2, 6, 6, 0.25, -1, False)),
        (o.pairwise_edge_fusion.default, (E[:, :6], E[:, 6:], union, pairs, w, b)),
        (o.pairwise_edge_fusion.default, (E[:, :6], E[:, 6:], None, pairs, w, None)),
        (o.pairwise_edge_fusion_backward.default, (g(P, 3), E[:, :6].detach(), E[:, 6:].detach(), union.detach(), pairs, w.detach(), True)),
        (o.pairwise_edge_fusion_backward.default, (g(P, 3), E[:, :6].detach(), E[:, 6:].detach(), None, pairs, w.detach(), False)),
        # the sum form (the trailing sum_mode flag)
        (o.pairwise_edge_fusion.default, (E[:, :6], E[:, 6:], union, pairs, w, b, True)),
        (o.pairwise_edge_fusion.default, (E[:, :6], E[:, 6:], None, pairs, w, None, True)),
        (o.pairwise_edge_fusion_backward.default, (g(P, 3), E[:, :6].detach(), E[:, 6:].detach(), union.detach(), pairs, w.detach(), True, True)),
        (o.pairwise_edge_fusion_backward.default, (g(P, 3), E[:, :6].detach(), E[:, 6:].detach(), None, pairs, w.detach(), False, True)),
    ]


@pytest.mark.parametrize("backend,device", [pytest.param(None, "cpu", id="default-cpu"),
                                            pytest.param("reference", "cpu", id="reference-cpu"),
                                            pytest.param("triton", "cpu", id="triton-cpu"),
                                            pytest.param(None, "cuda", id="default-cuda", marks=pytest.mark.cuda),
                                            pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.cuda)])
def test_opcheck(backend, device):
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    if backend == "triton":
        require(K["pairwise_edge_fusion"], "triton", device)
    for op, args in _opcheck_samples(device):
        # only pairwise_edge_fusion has a Triton kernel; the others keep their default under "triton"
        with sk.use_backend(backend if backend != "triton" or "fusion" in op.name() else None):
            torch.library.opcheck(op, args)


def test_fusion_sum_floor_by_hand():
    """bench/floors.py's floor of the sum form, written out: bytes and forward FLOPs as the product's;
    backward: dg = G W and dW = G^T g (2 x 2 P C D), d bias P C, g recomputed P (D + Du), dg * u once
    (P Du) scattered into d subj and d obj (P D adds each), d union = dg * (subj + obj) (P Du)."""
    from sgg_kernels.bench import floors

    K_, P, D, Du, C, e = 3, 6, 8, 5, 4, 4
    prod = floors.fusion_floor(K_, P, D, Du, C, e, 2 * K_ * D * e, True)
    summ = floors.fusion_floor(K_, P, D, Du, C, e, 2 * K_ * D * e, True, mode="sum")
    assert (summ.bytes_fwd, summ.flops_fwd, summ.bytes_bwd) == (prod.bytes_fwd, prod.flops_fwd, prod.bytes_bwd)
    assert summ.flops_bwd == 2 * (2 * 6 * 4 * 8) + 6 * 4 + 6 * 13 + 6 * 5 + 2 * 6 * 8 + 6 * 5 == 1026
    assert prod.flops_bwd == 2 * (2 * 6 * 4 * 8) + 6 * 4 + 3 * 6 * 13 + 2 * 6 * 8 + 6 * 5 == 1152


# ---------------------------------------------------------------------------------------------
# torchvision parity (the oracle DESIGN.md names; torchvision has no CPU build on the CI machine)
# ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
def test_roi_align_matches_torchvision(aligned, sampling_ratio):
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    tv_ops = pytest.importorskip("torchvision.ops", reason="torchvision is not installed")
    gen = _gen(16)
    f = torch.randn(3, 16, 40, 56, generator=gen).cuda().requires_grad_()
    box_batch = _batch([20, 1, 30], "cuda")
    boxes = _boxes(51, 56 * 16, 40 * 16, gen, torch.float32, "cuda", degenerate=True)
    rois = torch.cat([box_batch[:, None].float(), boxes], 1)
    got = sk.roi_align(f, boxes, box_batch, (7, 5), 1 / 16, sampling_ratio, aligned)
    want = tv_ops.roi_align(f, rois, (7, 5), 1 / 16, sampling_ratio, aligned)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    G = torch.randn_like(got)
    (g_got,) = torch.autograd.grad(got, f, G)
    (g_want,) = torch.autograd.grad(want, f, G)
    assert torch.allclose(g_got, g_want, atol=1e-4, rtol=1e-5)
    pairs = _pairs_of(box_batch, gen)
    u = sk.union_roi_align(f, boxes, box_batch, pairs, 7, 1 / 16, sampling_ratio, aligned)
    urois = torch.cat([box_batch[pairs[:, 0]][:, None].float(), sk.union_boxes(boxes, pairs)], 1)
    assert torch.allclose(u, tv_ops.roi_align(f, urois, 7, 1 / 16, sampling_ratio, aligned), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Triton: multi-block paths of the fusion (several P tiles, D and C blocks, d-weight chunks, CSR
# lists longer than one step) that the default blocks reach only at GPU sizes.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend,device", [p for p in backend_params(K["pairwise_edge_fusion"]) if p.values[0] == "triton"])
def test_triton_fusion_multiblock_paths(backend, device, mode, monkeypatch):
    require(K["pairwise_edge_fusion"], backend, device)
    from sgg_kernels.triton import pairs as tp

    for name, value in (("_BLOCK_P", 16), ("_BLOCK_P_ROWS", 16), ("_MAX_BLOCK_C", 16), ("_MAX_BLOCK_D", 16),
                        ("_MIN_TILES_PER_CHUNK", 2)):
        monkeypatch.setattr(tp, name, value)
    E, _, _, union, pairs, weight, b = _fusion_args(24, 40, 35, 37, True, True, torch.float32, device, _gen(17), counts=[20, 4])
    assert pairs.shape[0] > 3 * 16 and (pairs[:, 0] == 0).sum() > 16  # several P tiles; a CSR list of > 1 step
    n_chunks, per_chunk = tp._chunking(pairs.shape[0], 16, 3, native=False)
    assert n_chunks > 1 and per_chunk > 1  # several chunks of several tiles
    fn, oracle = _fusion_fns(pairs, mode, 40)
    _check_parity(backend, fn, (E, union, weight, b), torch.float32, what=f"multiblock {mode}")
    _check_oracle(backend, fn, oracle, (E, union, weight, b), torch.float32, what=f"multiblock {mode}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend,device", [p for p in backend_params(K["pairwise_edge_fusion"]) if p.values[0] == "triton"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_triton_fusion_forward_split_over_d(backend, device, bias, mode, monkeypatch):
    """The forward's split of the D reduction (few pair tiles: paper's 38 on 132 SMs), with a short
    last split, summed over splits with the bias added once."""
    require(K["pairwise_edge_fusion"], backend, device)
    from sgg_kernels.triton import pairs as tp

    for name, value in (("_MAX_BLOCK_D", 16), ("_MIN_D_PER_SPLIT", 16)):
        monkeypatch.setattr(tp, name, value)
    _, subj, obj, union, pairs, weight, b = _fusion_args(8, 100, 60, 21, bias, False, torch.float32, device, _gen(18))
    tiles = -(-pairs.shape[0] // tp._BLOCK_P)
    n_splits, per_split = tp._split_d(tiles, 100, 16, tp._CTAS_FORWARD["fp32"])
    assert n_splits > 2 and 100 % per_split != 0, (n_splits, per_split)  # several splits, the last one short
    fn, oracle = _fusion_fns(pairs, mode)
    args = (subj, obj, union, weight, b)  # b is None without bias
    _check_parity(backend, fn, args, torch.float32, what=f"split over D {mode}")
    _check_oracle(backend, fn, oracle, args, torch.float32, what=f"split over D {mode}")
