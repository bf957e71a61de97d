"""The ``relation_head`` benchmark case (sgg_kernels/bench/cases/relation_head.py): registered, its two
impls (the package's UnionFeatureExtractor + MotifsPairHead vs SGB's formulation written out) agree
at the small size in forward and in every gradient, its floor, and the runner on it. Only the
``small`` size (and a test-mode copy of it) is ever built here."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from sgg_kernels.bench import registry, runner
from sgg_kernels.bench.cases import relation_head as rh


def _case():
    return registry.all_cases()["relation_head"]


def test_registered_with_the_sgdet_sizes():
    case = _case()
    assert case.family == "pairs" and case.floor is not None
    assert list(case.sizes) == ["small", "mid", "paper", "sgdet", "sgdet_test"]
    s, t = rh.SIZES["sgdet"], rh.SIZES["sgdet_test"]
    # 4 images x 80 boxes on a 592 x 800 image, 256-channel FPN at strides 4..32, fc6 12,544 -> 4,096
    for size in (s, t):
        assert (size.B, size.per_image, size.C, size.H, size.W, size.mlp) == (4, 80, 256, 592, 800, 4096)
    assert s.num_pairs() == 4 * 1024 and s.train  # training: 1,024 sampled pairs per image, fwd+bwd
    assert t.num_pairs() == 4 * 80 * 79 == 25280 and not t.train  # test: every ordered pair, no grad
    assert rh.SCALES == (0.25, 0.125, 0.0625, 0.03125) and rh.SAMPLING == 2 and rh.OUT == 7
    assert "P=25280" in case.describe("sgdet_test") and "12544->4096" in case.describe("sgdet")


def _run(case, impl, size="small", dtype=torch.float64, seed=0):
    x = case.prepare(size, "cpu", dtype, seed)
    fn = case.fused if impl == "fused" else case.reference
    (out,) = fn(**x)
    return x, out


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_fused_and_eager_agree_forward_and_gradients(dtype, tol):
    case = _case()
    xf, of = _run(case, "fused", dtype=dtype)
    xe, oe = _run(case, "eager", dtype=dtype)
    assert of.shape == (40, 7) and oe.shape == (40, 7)
    scale = oe.abs().max().item()
    torch.testing.assert_close(of, oe, rtol=0, atol=tol * scale)
    (cot,) = registry.cotangents([oe], seed=0)
    gf = torch.autograd.grad([of], [xf[n] for n in case.grad_inputs], [cot])
    ge = torch.autograd.grad([oe], [xe[n] for n in case.grad_inputs], [cot])
    for name, a, b in zip(case.grad_inputs, gf, ge):
        assert torch.isfinite(b).all() and b.abs().max() > 0, f"{name}: no gradient in the eager impl"
        torch.testing.assert_close(a, b, rtol=0, atol=tol * max(b.abs().max().item(), 1e-30), msg=name)


def test_both_impls_read_the_same_weight_tensors():
    """Changing one shared parameter input changes both impls alike (no private copy of the weights)."""
    case = _case()
    x = case.prepare("small", "cpu", torch.float64, 0)
    base_f, base_e = case.fused(**x)[0], case.reference(**x)[0]
    with torch.no_grad():
        x["pair.rel_compress.bias"] += 1.0
        x["union.feature_extractor.fc7.bias"] += 0.5
    f, e = case.fused(**x)[0], case.reference(**x)[0]
    assert not torch.allclose(f, base_f)
    torch.testing.assert_close(f, e, rtol=0, atol=1e-9)


def test_test_mode_agrees_and_records_no_graph(monkeypatch):
    """The sgdet_test semantics (eval-mode modules, BatchNorm on running statistics, no_grad) at small."""
    monkeypatch.setitem(rh.SIZES, "small_test", dataclasses.replace(rh.SIZES["small"], train=False))
    case = _case()
    x = case.prepare("small_test", "cpu", torch.float64, 1)
    assert not x["union_module"].training and not x["pair_module"].training
    g = torch.Generator().manual_seed(5)
    for i in (2, 6):  # non-trivial running statistics, read by both impls
        bn = x["union_module"].rect_conv[i]
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g, dtype=torch.float64) + 0.5)
    (f,), (e,) = case.fused(**x), case.reference(**x)
    assert not f.requires_grad and not e.requires_grad
    torch.testing.assert_close(f, e, rtol=0, atol=1e-9)
    step = runner.make_step(case.fused, x, case.grad_inputs, "fwd+bwd")
    with pytest.raises(RuntimeError, match="no output requires grad"):  # what the fwd+bwd row of sgdet_test says
        step()


def test_eager_rect_masks_are_sgb_rectangles():
    """SGB's rasterisation written per cell: x in [floor(x1 r_w), ceil(x2 r_w)], same for y."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0], [3.3, 7.9, 40.0, 30.1], [50.0, 1.0, 63.5, 47.2]])
    box_batch = torch.tensor([0, 0, 1])
    pairs = torch.tensor([[0, 1], [1, 0], [2, 2]])
    sizes = [(64, 48), (70, 50)]
    m = rh._rect_masks(boxes, box_batch, pairs, sizes, 27, torch.float64)
    assert m.shape == (3, 2, 27, 27)
    for p, (s, o) in enumerate(pairs.tolist()):
        for role, k in enumerate((s, o)):
            w, h = sizes[int(box_batch[k])]
            rw, rh_ = torch.tensor(27 / w, dtype=torch.float32), torch.tensor(27 / h, dtype=torch.float32)
            x1, y1, x2, y2 = boxes[k].tolist()
            lo_x, hi_x = int(torch.floor(torch.tensor(x1) * rw)), int(torch.ceil(torch.tensor(x2) * rw))
            lo_y, hi_y = int(torch.floor(torch.tensor(y1) * rh_)), int(torch.ceil(torch.tensor(y2) * rh_))
            want = torch.zeros(27, 27, dtype=torch.float64)
            want[max(lo_y, 0): hi_y + 1, max(lo_x, 0): hi_x + 1] = 1
            assert torch.equal(m[p, role], want), (p, role)


@pytest.mark.parametrize("n,k,stride,pad", [(7, 3, 1, 1), (27, 7, 2, 3), (5, 3, 2, 0), (1, 3, 1, 1)])
def test_conv_taps_match_a_convolution_of_ones(n, k, stride, pad):
    ones = F.conv2d(torch.ones(1, 1, n, n, dtype=torch.float64), torch.ones(1, 1, k, k, dtype=torch.float64),
                    stride=stride, padding=pad)
    assert rh._conv_taps_1d(n, k, stride, pad) ** 2 == int(ones.sum())


def test_floor_present_and_dominated_by_the_dense_layers():
    case = _case()
    x = case.prepare("small", "cpu")
    f = case.compute_floor(x)
    for v in (f.bytes_fwd, f.flops_fwd, f.bytes_bwd, f.flops_bwd):
        assert isinstance(v, int) and v > 0
    P, K, C, D, hid, Qd, R = 40, 10, 8, 32, 16, 32, 7
    t3 = 2 + 3 * 5 + 2  # valid taps of a 3 x 3 / pad 1 conv along a 7-wide axis
    reduce = 2 * P * t3 ** 2 * (4 * C) * C
    fc6, fc7 = 2 * P * C * 49 * D, 2 * P * D * D
    dense = reduce + fc6 + fc7 + 2 * P * Qd * R + 2 * 2 * K * hid * Qd
    assert dense < f.flops_fwd < 2 * dense  # the rest: roi_align taps, rect convs, biases, elementwise
    # backward: weight gradients everywhere, input gradients except the layers fed by frozen inputs
    assert f.flops_fwd < f.flops_bwd < 2 * f.flops_fwd
    params = sum(p.numel() for p in x["union_module"].parameters()) + sum(p.numel() for p in x["pair_module"].parameters())
    maps = sum(x[n].numel() for n in rh.LEVELS)
    assert f.bytes_fwd > 4 * (params + maps) and f.bytes_bwd > 2 * 4 * params


def test_runner_measures_both_impls_with_peak_memory():
    case = _case()
    rows = runner.run([case], ["small"], impls=["fused", "eager"], passes=["fwd", "fwd+bwd"], min_time=0.01,
                      log=lambda _: None)
    assert len(rows) == 4 and all(r.error is None for r in rows), [r.error for r in rows]
    for r in rows:
        assert r.median_ms > 0 and r.peak_mem_mb is not None and r.peak_mem_mb > 0
        assert r.floor_bytes > 0 and r.floor_flops > 0
    assert {r.backend for r in rows if r.impl == "fused"} == {case.backend("cpu")}
