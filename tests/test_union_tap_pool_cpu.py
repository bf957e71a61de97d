"""CPU union_tap_pool (one 3x3-conv tap over the pairs' union-box RoIAlign summed over the levels,
channels-last maps) and its backward against the float64 reference (sgg_kernels.reference.pairs):
float64 and float32, odd shapes (C not a multiple of the vector width), 1-3 levels, every tap
(dy, dx), adaptive sampling, aligned, boxes past the map, an invalid pair; determinism over thread
counts; argument errors."""
import itertools

import pytest
import torch

import sgg_kernels  # noqa: F401  (loads the library)
from sgg_kernels.reference import pairs as ref

OPS = torch.ops.sgg_kernels
LEVELS = {1: [(11, 13)], 2: [(13, 17), (7, 9)], 3: [(15, 19), (8, 10), (5, 5)]}
SCALES = {1: [0.5], 2: [0.5, 0.25], 3: [0.5, 0.25, 0.125]}
TAPS = list(itertools.product((-1, 0, 1), repeat=2))


def _case(L, C, B, seed, invalid=False):
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(B, H, W, C, generator=g, dtype=torch.float64) for H, W in LEVELS[L]]
    img_h, img_w = LEVELS[L][0][0] / SCALES[L][0], LEVELS[L][0][1] / SCALES[L][0]
    K = 3 * B
    xy = torch.rand(K, 2, generator=g, dtype=torch.float64) * torch.tensor([img_w * 1.1, img_h * 1.1]) \
        - 0.05 * torch.tensor([img_w, img_h])
    wh = torch.rand(K, 2, generator=g, dtype=torch.float64) * torch.tensor([img_w / 2, img_h / 2]) + 0.5
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[0, 2] = boxes[0, 0] + img_w * 0.9  # past the map's right border
    box_batch = torch.arange(B).repeat_interleave(3)
    pairs = torch.tensor([(3 * b + i, 3 * b + j) for b in range(B) for i in range(3) for j in range(3) if i != j])
    pairs = pairs[torch.randperm(len(pairs), generator=g)]
    if invalid:
        pairs = torch.cat([pairs[:2], torch.tensor([[0, K]]), pairs[2:]])  # object index out of range
    return maps, boxes, box_batch, pairs


def _run(maps, boxes, box_batch, pairs, pooled, scales, sr, aligned, dy, dx, grad):
    out = OPS._union_tap_pool(maps, boxes, box_batch, pairs, pooled, scales, sr, aligned, dy, dx)
    d = OPS._union_tap_pool_backward(grad, boxes, box_batch, pairs, maps[0].shape[0], [m.shape[1] for m in maps],
                                     [m.shape[2] for m in maps], scales, sr, aligned, dy, dx)
    return out, d


def _ref(maps, boxes, box_batch, pairs, pooled, scales, sr, aligned, dy, dx, grad):
    valid = (pairs >= 0).all(1) & (pairs < boxes.shape[0]).all(1)
    out = torch.zeros(len(pairs), maps[0].shape[3], pooled, pooled, dtype=torch.float64)
    out[valid] = ref.union_tap_pool(maps, boxes, box_batch, pairs[valid], pooled, scales, sr, aligned, dy, dx)
    d = ref.union_tap_pool_backward(grad[valid], boxes, box_batch, pairs[valid], maps[0].shape[0],
                                    [m.shape[1] for m in maps], [m.shape[2] for m in maps], scales, sr, aligned,
                                    dy, dx)
    return out, d


def _err(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("L,C,B,pooled,sr,aligned", [
    (1, 5, 2, 7, 2, False), (2, 37, 3, 5, 0, True), (3, 37, 2, 7, 0, False), (2, 5, 3, 7, 2, True),
    (3, 16, 2, 5, 2, False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(L, C, B, pooled, sr, aligned, dtype):
    maps, boxes, box_batch, pairs = _case(L, C, B, seed=L * 100 + C, invalid=True)
    scales = SCALES[L]
    g = torch.Generator().manual_seed(7)
    grad = torch.randn(len(pairs), C, pooled, pooled, generator=g, dtype=torch.float64)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for dy, dx in TAPS:
        r_out, r_d = _ref(maps, boxes, box_batch, pairs, pooled, scales, sr, aligned, dy, dx, grad)
        out, d = _run([m.to(dtype) for m in maps], boxes.to(dtype), box_batch, pairs, pooled, scales, sr, aligned,
                      dy, dx, grad.to(dtype))
        assert out.dtype == dtype and out.shape == (len(pairs), C, pooled, pooled)
        assert _err(out, r_out) <= tol, (dy, dx)
        assert out[2].abs().max() == 0  # the invalid pair's row
        assert len(d) == L
        for l, (a, b) in enumerate(zip(d, r_d)):
            assert a.dtype == dtype and a.shape == b.shape and a.is_contiguous()
            assert _err(a, b) <= tol, (dy, dx, l)


def test_invalid_pair_adds_no_gradient():
    maps, boxes, box_batch, pairs = _case(2, 5, 2, seed=3)
    bad = torch.tensor([[0, 99], [-1, 0]])
    grad = torch.ones(2, 5, 7, 7, dtype=torch.float64)
    out, d = _run(maps, boxes, box_batch, bad, 7, SCALES[2], 2, False, 0, 0, grad)
    assert out.abs().max() == 0 and all(t.abs().max() == 0 for t in d)
    bad_batch = torch.full_like(box_batch, 5)  # box_batch out of range
    out, d = _run(maps, boxes, bad_batch, pairs[:2], 7, SCALES[2], 2, False, 0, 0, grad)
    assert out.abs().max() == 0 and all(t.abs().max() == 0 for t in d)


def test_backward_deterministic_over_threads():
    maps, boxes, box_batch, pairs = _case(3, 37, 3, seed=11)
    maps = [m.float() for m in maps]
    grad = torch.randn(len(pairs), 37, 7, 7, generator=torch.Generator().manual_seed(1))
    old = torch.get_num_threads()
    try:
        res = []
        for n in (1, max(2, old)):
            torch.set_num_threads(n)
            res.append(_run(maps, boxes.float(), box_batch, pairs, 7, SCALES[3], 2, False, 1, -1, grad))
    finally:
        torch.set_num_threads(old)
    (o1, d1), (o2, d2) = res
    assert torch.equal(o1, o2)
    assert all(torch.equal(a, b) for a, b in zip(d1, d2))


def test_errors():
    maps, boxes, box_batch, pairs = _case(2, 5, 2, seed=5)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        OPS._union_tap_pool([m.half() for m in maps], boxes.half(), box_batch, pairs, 7, SCALES[2], 2, False, 0, 0)
    nchw = [m.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1) for m in maps]  # [B, H, W, C], not contiguous
    nchw[1] = nchw[1].contiguous()
    with pytest.raises(RuntimeError, match="channels-last"):
        OPS._union_tap_pool(nchw, boxes, box_batch, pairs, 7, SCALES[2], 2, False, 0, 0)
    with pytest.raises(RuntimeError, match="one entry per level"):
        OPS._union_tap_pool(maps, boxes, box_batch, pairs, 7, [0.5], 2, False, 0, 0)
    with pytest.raises(RuntimeError, match="grad must be"):
        OPS._union_tap_pool_backward(torch.zeros(len(pairs), 5, 7, 6, dtype=torch.float64), boxes, box_batch, pairs,
                                     2, [13, 7], [17, 9], SCALES[2], 2, False, 0, 0)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        OPS._union_tap_pool_backward(torch.zeros(len(pairs), 5, 7, 7, dtype=torch.float16), boxes, box_batch, pairs,
                                     2, [13, 7], [17, 9], SCALES[2], 2, False, 0, 0)


def test_opcheck():
    """Schema, fake kernels (registered in sgg_kernels.integrations._union_taps) and dispatch of both ops."""
    from sgg_kernels.integrations import _union_taps  # noqa: F401  (registers the fake kernels)

    maps, boxes, box_batch, pairs = _case(2, 5, 2, 11)[:4]
    args = (maps, boxes, box_batch, pairs, 5, SCALES[2], 2, False, 1, -1)
    torch.library.opcheck(OPS._union_tap_pool.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    grad = torch.randn(pairs.shape[0], 5, 5, 5, dtype=torch.float64)
    bargs = (grad, boxes, box_batch, pairs, 2, [h for h, _ in LEVELS[2]], [w for _, w in LEVELS[2]], SCALES[2], 2,
             False, 1, -1)
    torch.library.opcheck(OPS._union_tap_pool_backward.default, bargs,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_backward_is_the_adjoint():
    """gradcheck of the forward op with the backward op as its derivative (float64): the C++
    backward is the exact adjoint of the C++ forward, for a shifted tap."""
    maps, boxes, box_batch, pairs = _case(2, 3, 2, 12)[:4]
    hw = LEVELS[2]

    class _Tap(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *ms):
            return OPS._union_tap_pool(list(ms), boxes, box_batch, pairs, 5, SCALES[2], 0, True, -1, 1)

        @staticmethod
        def backward(ctx, g):
            return tuple(OPS._union_tap_pool_backward(g.contiguous(), boxes, box_batch, pairs, 2, [h for h, _ in hw],
                                                      [w for _, w in hw], SCALES[2], 0, True, -1, 1))

    ms = [m.clone().requires_grad_() for m in maps]
    assert torch.autograd.gradcheck(_Tap.apply, ms)
