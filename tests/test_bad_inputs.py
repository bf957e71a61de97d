"""Malformed calls found by fuzzing: each gets a clear error naming the argument before any kernel
runs, or, where the result is well defined, every backend accepts it with the same result.

1. RoIAlign's cap on the sample grid (MAX_SAMPLES_PER_BIN_DIM per bin and axis): absurd boxes under
   adaptive sampling and huge ``sampling_ratio`` are rejected while value checks are on, and with
   checks off every backend clamps the grid the same way (bounded, no out-of-bounds access).
2. Argument errors that name the argument: grid helpers, pack helpers, the Gaussian kernel size,
   empty maps and mixed dtypes in the SIL and LinkNet modules.
3. Edge cases where the reference used to raise on inputs the C++ kernels accept: pair_mask_conv
   with P = 0 or C = 0, non-finite boxes in the union-box paths, gather_mean with M = 0.
"""
import math

import pytest
import torch

import sgg_kernels as sk
from sgg_kernels import _checks
from sgg_kernels.models import GlobalContextEncoding, LinkNetHead, RelationalEmbedding, SILBlock, SILNetwork
from sgg_kernels.ops import cluster as cluster_ops
from sgg_kernels.ops import masks as mask_ops
from sgg_kernels.ops import pairs as pair_ops
from sgg_kernels.reference import masks as ref_masks
from sgg_kernels.reference import pairs as ref_pairs

from helpers import HAS_CUDA, backend_params, require

CAP = pair_ops.MAX_SAMPLES_PER_BIN_DIM
ROI_TABLES = pair_ops.KERNELS["roi_align"]
MASK_TABLES = mask_ops.KERNELS["pair_mask_conv"]
GATHER_TABLES = cluster_ops.KERNELS["gather_mean"]
UNION_TABLES = pair_ops.KERNELS["union_boxes"]
GEOMETRY_TABLES = pair_ops.KERNELS["pair_geometry"]
REF = [pytest.param("reference", "cpu", id="reference-cpu")]


def _backends(tables):
    """The reference and every compiled backend of an op (those that cannot run here skip)."""
    return REF + backend_params(tables)


def _require(tables, backend, device):
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    if backend != "reference":
        require(tables, backend, device)


def _no_kernel(*args, **kwargs):
    raise AssertionError("a kernel ran although the arguments are invalid")


def _roi_case(device="cpu", dtype=torch.float32):
    """A [2, 3, 12, 16] map, 4 boxes over 2 images and 3 pairs; float64 values rounded to dtype."""
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(2, 3, 12, 16, generator=gen, dtype=torch.float64).to(device, dtype)
    boxes = torch.tensor([[1.0, 2.0, 9.0, 8.0], [0.5, 0.5, 6.0, 11.0], [3.0, 1.0, 15.0, 7.5], [2.0, 2.0, 4.0, 5.0]],
                         dtype=torch.float64, device=device)
    box_batch = torch.tensor([0, 0, 1, 1], device=device)
    pairs = torch.tensor([[0, 1], [1, 0], [2, 3]], device=device)
    return f, boxes, box_batch, pairs


def _pool(op, f, boxes, box_batch, pairs, out, scale=1.0, ratio=-1, aligned=False):
    if op == "roi_align":
        return sk.roi_align(f, boxes, box_batch, out, scale, ratio, aligned)
    return sk.union_roi_align(f, boxes, box_batch, pairs, out, scale, ratio, aligned)


def _same(a, b, what):
    """Equal up to float rounding, NaN where the other is NaN."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    assert a.shape == b.shape, f"{what}: shape {list(a.shape)} != {list(b.shape)}"
    assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{what}: NaN positions differ"
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True, msg=what)


# ---------------------------------------------------------------------------------------------
# 1. RoIAlign: the cap on the sample grid
# ---------------------------------------------------------------------------------------------
def test_cap_is_one_constant():
    assert CAP == ref_pairs.MAX_SAMPLES_PER_BIN_DIM == 512
    assert "512" in sk.roi_align.__doc__ and "512" in sk.union_roi_align.__doc__


@pytest.mark.parametrize("op", ["roi_align", "union_roi_align"])
@pytest.mark.parametrize("ratio", [CAP + 1, 2 ** 40])
@pytest.mark.parametrize("checks", [True, False], ids=["checks-on", "checks-off"])
def test_sampling_ratio_above_cap(monkeypatch, op, ratio, checks):
    """An argument check: always on, before any kernel."""
    sk.set_checks(checks)
    monkeypatch.setattr(pair_ops, "_ROI", _no_kernel)
    f, boxes, box_batch, pairs = _roi_case()
    with pytest.raises(ValueError, match=f"sampling_ratio must be an int <= {CAP}"):
        _pool(op, f, boxes.float(), box_batch, pairs, 2, ratio=ratio)


@pytest.mark.parametrize("op", ["roi_align", "union_roi_align"])
def test_sampling_ratio_at_cap_runs(op):
    f, boxes, box_batch, pairs = _roi_case()
    out = _pool(op, f, boxes.float(), box_batch, pairs, 1, ratio=CAP)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("op", ["roi_align", "union_roi_align"])
@pytest.mark.parametrize("ratio", [-1, 0])
@pytest.mark.parametrize("aligned", [False, True])
def test_absurd_boxes_rejected_under_adaptive_sampling(monkeypatch, op, ratio, aligned):
    monkeypatch.setattr(pair_ops, "_ROI", _no_kernel)
    f, boxes, box_batch, pairs = _roi_case()
    with pytest.raises(ValueError, match=r"boxes: .* adaptive sampling .* above the cap of 512 per axis "
                                         r"\(MAX_SAMPLES_PER_BIN_DIM: a RoI may span at most 512 x output_size"):
        _pool(op, f, (boxes * 1e12).float(), box_batch, pairs, 7, 1 / 16, ratio, aligned)


@pytest.mark.parametrize("op", ["roi_align", "union_roi_align"])
def test_absurd_boxes_run_with_a_fixed_sampling_ratio(op):
    """The limit is on the adaptive grid: a fixed grid is bounded whatever the boxes."""
    f, boxes, box_batch, pairs = _roi_case()
    out = _pool(op, f, (boxes * 1e12).float(), box_batch, pairs, 7, 1 / 16, 2)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("op", ["roi_align", "union_roi_align"])
def test_adaptive_grid_limit_is_exact(op):
    """Output 1, scale 1: a RoI CAP pixels wide takes CAP samples per bin (allowed), CAP + 1 is over."""
    f = torch.randn(1, 2, 4, 4)
    box_batch = torch.zeros(2, dtype=torch.int64)
    pairs = torch.tensor([[0, 1]])
    ok = torch.tensor([[0.0, 0.0, CAP, 2.0], [0.0, 0.0, 1.0, 1.0]])
    _pool(op, f, ok, box_batch, pairs, 1)
    over = ok.clone()
    over[0, 2] = CAP + 1
    with pytest.raises(ValueError, match=r"boxes.* 2 x 513 samples per bin"):
        _pool(op, f, over, box_batch, pairs, 1)


@pytest.mark.parametrize("op", ["roi_align", "union_roi_align"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("ratio", [-1, 2])
def test_non_finite_boxes_rejected_with_checks_on(monkeypatch, op, value, ratio):
    monkeypatch.setattr(pair_ops, "_ROI", _no_kernel)
    f, boxes, box_batch, pairs = _roi_case()
    boxes = boxes.float()
    boxes[1, 2] = value
    with pytest.raises(ValueError, match="boxes must be finite"):
        _pool(op, f, boxes, box_batch, pairs, 3, ratio=ratio)


def test_value_checks_keep_their_order_and_messages():
    """One fused check, the same errors as before: box_batch, then pairs, then same image, then boxes."""
    f, boxes, box_batch, pairs = _roi_case()
    bad_boxes = (boxes * 1e12).float()
    with pytest.raises(IndexError, match=r"box_batch holds 5, outside \[0, 2\)"):
        sk.union_roi_align(f, bad_boxes, torch.tensor([0, 0, 1, 5]), torch.tensor([[0, 9]]), 2)
    with pytest.raises(IndexError, match=r"pairs holds 9, outside \[0, 4\)"):
        sk.union_roi_align(f, bad_boxes, box_batch, torch.tensor([[0, 9]]), 2)
    with pytest.raises(ValueError, match=r"pairs\[1\] = \(1, 2\) joins boxes of images 0 and 1"):
        sk.union_roi_align(f, bad_boxes, box_batch, torch.tensor([[0, 1], [1, 2]]), 2)
    with pytest.raises(ValueError, match=r"the union box of pairs\[0\] = \(0, 1\)"):
        sk.union_roi_align(f, bad_boxes, box_batch, pairs, 2)


@pytest.mark.parametrize("backend,device", _backends(ROI_TABLES))
@pytest.mark.parametrize("op", ["roi_align", "union_roi_align"])
def test_checks_off_clamps_the_grid(backend, device, op):
    """Checks off: adaptive sampling of a RoI spanning more than CAP pixels per bin takes CAP samples
    per bin and axis on every backend: the same as sampling_ratio = CAP, in bounded time."""
    _require(ROI_TABLES, backend, device)
    sk.set_checks(False)
    f, boxes, box_batch, pairs = _roi_case(device, torch.float64)
    big = boxes.clone()
    # 600 x 700 pixels: more than CAP samples per bin along both axes at output 1
    big[:, 2:] = big[:, :2] + torch.tensor([600.0, 700.0], dtype=torch.float64, device=device)
    f.requires_grad_(True)
    with sk.use_backend(backend):
        adaptive = _pool(op, f, big, box_batch, pairs, 1)
        (g_adaptive,) = torch.autograd.grad(adaptive.sum(), f)
        fixed = _pool(op, f, big, box_batch, pairs, 1, ratio=CAP)
        (g_fixed,) = torch.autograd.grad(fixed.sum(), f)
    _same(adaptive, fixed, "forward")
    _same(g_adaptive, g_fixed, "d features")
    with sk.use_backend("reference"):
        want = _pool(op, f.detach().cpu(), big.cpu(), box_batch.cpu(), pairs.cpu(), 1, ratio=CAP)
    _same(adaptive, want, "forward vs the reference")


@pytest.mark.parametrize("backend,device", _backends(ROI_TABLES))
@pytest.mark.parametrize("op", ["roi_align", "union_roi_align"])
def test_checks_off_absurd_boxes_are_bounded(backend, device, op):
    """Checks off: coordinates x 1e12 under adaptive sampling finish (the grid is clamped), with the
    reference's result, forward and backward."""
    _require(ROI_TABLES, backend, device)
    sk.set_checks(False)
    f, boxes, box_batch, pairs = _roi_case(device)
    f.requires_grad_(True)
    absurd = (boxes * 1e12).float()
    outs = {}
    for b in (backend, "reference"):
        with sk.use_backend(b):
            out = _pool(op, f, absurd, box_batch, pairs, 7, 1 / 16)
            (g,) = torch.autograd.grad(out.sum(), f)
        outs[b] = (out, g)
    _same(outs[backend][0], outs["reference"][0], "forward")
    _same(outs[backend][1], outs["reference"][1], "d features")


@pytest.mark.parametrize("backend,device", _backends(ROI_TABLES))
@pytest.mark.parametrize("op", ["roi_align", "union_roi_align"])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [-1, 2])
def test_checks_off_non_finite_boxes_pool_zeros(backend, device, op, aligned, ratio):
    """Checks off: a non-finite RoI pools zeros and adds no gradient, on every backend."""
    _require(ROI_TABLES, backend, device)
    sk.set_checks(False)
    f, boxes, box_batch, pairs = _roi_case(device)
    f.requires_grad_(True)
    boxes = boxes.float()
    boxes[0, 0], boxes[1, 3], boxes[3, 0] = float("nan"), float("inf"), -float("inf")
    with sk.use_backend(backend):
        out = _pool(op, f, boxes, box_batch, pairs, 3, 0.5, ratio, aligned)
        (g,) = torch.autograd.grad(out.sum(), f)
    with sk.use_backend("reference"):
        want = _pool(op, f.detach().cpu(), boxes.cpu(), box_batch.cpu(), pairs.cpu(), 3, 0.5, ratio, aligned)
    _same(out, want, "forward")
    bad_rois = [0, 1, 3] if op == "roi_align" else [0, 1, 2]  # every pair holds a non-finite box
    assert not out[bad_rois].any() and torch.isfinite(g).all()
    if op == "union_roi_align":
        assert not g.any()


# ---------------------------------------------------------------------------------------------
# 2. Argument errors that name the argument
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call,match", [
    (lambda: sk.grid_centers(4, 6, 0), r"per_dim must be a positive int"),
    (lambda: sk.grid_centers(4, 6, -1), r"per_dim must be a positive int"),
    (lambda: sk.grid_centers(4, 6, 2.5), r"per_dim must be a positive int"),
    (lambda: sk.grid_centers(0, 6, 2), r"H must be a positive int"),
    (lambda: sk.grid_centers(4, float("nan"), 2), r"W must be a positive int"),
    (lambda: sk.grid_points(float("nan"), 4), r"H must be an int >= 0"),
    (lambda: sk.grid_points(4, -2), r"W must be an int >= 0"),
    (lambda: sk.grid_points(True, 4), r"H must be an int >= 0"),
], ids=["per_dim=0", "per_dim=-1", "per_dim=2.5", "centers-H=0", "centers-W=nan", "points-H=nan", "points-W=-2",
        "points-H=True"])
def test_grid_helpers_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_grid_helpers_still_work():
    assert sk.grid_points(0, 3).shape == (0, 2)
    assert sk.grid_centers(4, 6, 1).tolist() == [[3.0, 2.0]]


@pytest.mark.parametrize("call,exc,match", [
    (lambda: sk.pack_pairs([torch.tensor([[0, 1]])], None), ValueError, r"num_objs must be a list"),
    (lambda: sk.pack_pairs([torch.tensor([[0, 1]])], 2), ValueError, r"num_objs must be a list"),
    (lambda: sk.pack_pairs([torch.tensor([[0, 1]])], [2.5]), ValueError, r"num_objs\[0\] must be an int >= 0"),
    (lambda: sk.pack_pairs([torch.tensor([[0, 1]])], [-1]), ValueError, r"num_objs\[0\] must be an int >= 0"),
    (lambda: sk.pack_pairs(3, [2]), ValueError, r"rel_pair_idxs must be a list"),
    (lambda: sk.pack_pairs(torch.tensor([[0, 1]]), [2]), ValueError, r"rel_pair_idxs must be a list"),
    (lambda: sk.pack_pairs([], []), ValueError, r"rel_pair_idxs needs at least one image"),
    (lambda: sk.pack_boxes(3), ValueError, r"boxes_per_image must be a list"),
    (lambda: sk.pack_boxes(torch.zeros(2, 4)), ValueError, r"boxes_per_image must be a list"),
    (lambda: sk.pack_boxes([]), ValueError, r"boxes_per_image needs at least one image"),
], ids=["num_objs=None", "num_objs=int", "num_objs-float", "num_objs-negative", "rel_pair_idxs=int",
        "rel_pair_idxs=tensor", "no-images", "boxes=int", "boxes=tensor", "boxes=[]"])
def test_pack_helpers_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_pack_pairs_accepts_a_tensor_of_counts():
    pairs = sk.pack_pairs([torch.tensor([[0, 1]]), torch.tensor([[1, 0]])], torch.tensor([2, 3]))
    assert pairs.tolist() == [[0, 1], [3, 2]]


@pytest.mark.parametrize("size", [2 ** 20 + 1, ref_masks.MAX_KERNEL_SIZE + 2, 4, 0, -3, 7.0, True])
def test_gaussian_kernel_size_is_checked(size):
    """Odd, positive and at most MAX_KERNEL_SIZE (2 ** 20 + 1 used to attempt a 52 TB allocation)."""
    params = torch.zeros(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"size must be a positive odd int <= 255"):
        sk.gaussian_kernels(params, size)
    with pytest.raises(ValueError, match=r"size must be a positive odd int <= 255"):
        ref_masks.gaussian_kernels(params, size)


def test_gaussian_kernel_size_at_the_cap():
    k = sk.gaussian_kernels(torch.zeros(3), ref_masks.MAX_KERNEL_SIZE)
    assert k.shape == (255, 255) and math.isclose(float(k.sum()), 1.0, rel_tol=1e-5)


def _sil(**kw):
    return SILBlock(8, num_centers=4, heads=2, mlp_hidden=16, encoder_layers=1, encoder_head_dim=4, dropout=0.0,
                    **kw).eval()


def _sil_inputs(dtype=torch.float32, H=5, W=6):
    fmap = torch.randn(2, 8, H, W, dtype=dtype)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [2.0, 2.0, 10.0, 12.0]])
    return fmap, boxes, torch.tensor([0, 1]), 0.5


@pytest.mark.parametrize("H,W", [(0, 6), (5, 0)])
def test_sil_block_rejects_an_empty_map(H, W):
    fmap, boxes, box_batch, scale = _sil_inputs(H=H, W=W)
    block = _sil()
    with pytest.raises(ValueError, match=r"feature_map is empty .* needs H >= 1 and W >= 1"):
        block(fmap, boxes, box_batch, scale)
    with pytest.raises(ValueError, match=r"feature_map is empty"):
        block.cluster(fmap)
    with pytest.raises(ValueError, match=r"feature_map is empty"):
        SILNetwork(8, 1, num_centers=4, heads=2, mlp_hidden=16, encoder_layers=1, encoder_head_dim=4)(
            fmap, boxes, box_batch, scale)


def test_sil_block_rejects_mixed_dtypes():
    fmap, boxes, box_batch, scale = _sil_inputs(torch.float64)
    block = _sil()
    with pytest.raises(ValueError, match=r"feature_map is float64 but the parameters of this SILBlock are float32"):
        block(fmap, boxes, box_batch, scale)
    with pytest.raises(ValueError, match=r"feature_map is float64 but the parameters of this SILBlock are float32"):
        block.cluster(fmap)
    fmap32 = fmap.float()
    with pytest.raises(ValueError, match=r"ref_feats is float64 but the parameters of this SILBlock are float32"):
        block(fmap32, boxes, box_batch, scale, ref_feats=torch.zeros(2, 8, dtype=torch.float64))
    net = SILNetwork(8, 1, num_centers=4, heads=2, mlp_hidden=16, encoder_layers=1, encoder_head_dim=4).double()
    with pytest.raises(ValueError, match=r"feature_map is float32 but the parameters of this SILNetwork are float64"):
        net(fmap32, boxes, box_batch, scale)
    assert block(fmap32, boxes.double(), box_batch, scale).dtype == torch.float32  # boxes: any float dtype


def test_module_dtype_check_is_off_under_autocast():
    x = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x is float64 but the parameters of m are float32"):
        _checks.module_dtype([("x", x)], "m", torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _checks.module_dtype([("x", x)], "m", torch.float32)


def _linknet_inputs(dtype=torch.float32):
    K, P, B = 4, 3, 2
    gen = torch.Generator().manual_seed(1)
    return dict(
        roi_feats=torch.randn(K, 6, generator=gen).to(dtype),
        obj_logits=torch.randn(K, 5, generator=gen).to(dtype),
        context=torch.randn(B, 4, generator=gen).to(dtype),
        boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 5.0, 6.0], [2.0, 0.0, 7.0, 3.0], [0.0, 2.0, 3.0, 9.0]]),
        box_batch=torch.tensor([0, 0, 1, 1]),
        pairs=torch.tensor([[0, 1], [1, 0], [2, 3]]),
        union_feats=torch.randn(P, 8, generator=gen).to(dtype),
    )


@pytest.mark.parametrize("name", ["roi_feats", "obj_logits", "context", "union_feats"])
def test_linknet_head_rejects_mixed_dtypes(name):
    head = LinkNetHead(6, 5, 3, embed_dim=4, context_dim=4, hidden=8, union_dim=8, geo_dim=4).eval()
    args = _linknet_inputs()
    head(**args)  # float32 throughout: fine
    args[name] = args[name].double()
    with pytest.raises(ValueError, match=fr"{name} is float64 but the parameters of this LinkNetHead are float32"):
        head(**args)
    args = _linknet_inputs(torch.float64)
    args["boxes"] = args["boxes"].half()  # boxes may be any float dtype
    head.double()(**args)


def test_linknet_modules_reject_mixed_dtypes():
    rem = RelationalEmbedding(6, 3)
    with pytest.raises(ValueError, match=r"x is float64 but the parameters of this RelationalEmbedding are float32"):
        rem(torch.zeros(2, 6, dtype=torch.float64), torch.tensor([0, 0]))
    gce = GlobalContextEncoding(3, 5)
    with pytest.raises(ValueError, match=r"feature_map is float64 but the parameters of this GlobalContextEncoding"):
        gce(torch.zeros(1, 3, 4, 4, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# 3. The backends agree on edge cases
# ---------------------------------------------------------------------------------------------
def _mask_case(K=4, P=5, C=3, m=6, d=3, per="pair", union=False, device="cpu"):
    gen = torch.Generator().manual_seed(2)
    masks = torch.rand(K, C, m, m, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    pairs = torch.randint(0, max(K, 1), (P, 2), generator=gen).to(device)
    n = (P, 2) if per == "pair" else (K,)
    params = (torch.randn(*n, 3, generator=gen, dtype=torch.float64) * 0.5).to(device).requires_grad_(True)
    boxes = None
    if union:
        xy = torch.rand(K, 2, generator=gen, dtype=torch.float64) * 30
        boxes = torch.cat([xy, xy + torch.rand(K, 2, generator=gen, dtype=torch.float64) * 20 + 1], 1).to(device)
    return masks, pairs, params, boxes, (5 if union else None), d


def _mask_run(backend, masks, pairs, params, boxes, out_size, d):
    with sk.use_backend(backend):
        out = sk.pair_mask_conv(masks, pairs, sk.gaussian_kernels(params, d), boxes, out_size)
        cot = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
        dm, dp = torch.autograd.grad(out, (masks, params), cot, allow_unused=True)
    return out, (torch.zeros_like(masks) if dm is None else dm), (torch.zeros_like(params) if dp is None else dp)


@pytest.mark.parametrize("backend,device", _backends(MASK_TABLES))
@pytest.mark.parametrize("K,P,C", [(4, 0, 3), (0, 0, 3), (4, 5, 0), (4, 0, 0)], ids=["P0", "K0-P0", "C0", "P0-C0"])
@pytest.mark.parametrize("per", ["pair", "object"])
@pytest.mark.parametrize("union", [False, True], ids=["own", "union"])
def test_pair_mask_conv_empty_inputs_agree(backend, device, K, P, C, per, union):
    """P = 0 pairs or C = 0 classes: an empty output of the right shape and zero gradients on every
    backend (the reference's grouped conv2d used to raise "non-positive groups")."""
    _require(MASK_TABLES, backend, device)
    case = _mask_case(K, P, C, per=per, union=union, device=device)
    out, dm, dp = _mask_run(backend, *case)
    side = 5 if union else 6
    assert out.shape == (P, C, side, side)
    assert dm.shape == case[0].shape and not dm.any()
    assert dp.shape == case[2].shape and not dp.any()


@pytest.mark.parametrize("backend,device", backend_params(MASK_TABLES))
@pytest.mark.parametrize("coord", [0, 1, 2, 3])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("per", ["pair", "object"])
def test_pair_mask_conv_non_finite_boxes_agree(backend, device, coord, value, per):
    """Union frame with a non-finite box. Checks on: a ValueError naming boxes before any kernel.
    Checks off: the kernels and the reference give the same finite output and gradients (a NaN sample
    position reads nothing); the reference used to raise an index error."""
    _require(MASK_TABLES, backend, device)
    masks, pairs, params, boxes, R, d = _mask_case(per=per, union=True, device=device)
    boxes = boxes.clone()
    boxes[int(pairs[0, 1]), coord] = value
    for b in (backend, "reference"):
        with sk.use_backend(b), pytest.raises(ValueError, match=r"boxes must be finite: boxes\[\d\] = "):
            sk.pair_mask_conv(masks, pairs, sk.gaussian_kernels(params, d), boxes, R)
    sk.set_checks(False)
    got = _mask_run(backend, masks, pairs, params, boxes, R, d)
    want = _mask_run("reference", masks, pairs, params, boxes, R, d)
    for name, g, w in zip(("out", "d masks", "d params"), got, want):
        assert torch.isfinite(g).all(), name
        _same(g, w, name)


def test_pair_mask_conv_rejects_non_finite_boxes_before_any_kernel(monkeypatch):
    monkeypatch.setattr(mask_ops, "_CONV", _no_kernel)
    masks, pairs, params, boxes, R, d = _mask_case(union=True)
    boxes = boxes.clone()
    boxes[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"boxes must be finite: boxes\[2\]"):
        sk.pair_mask_conv(masks, pairs, sk.gaussian_kernels(params, d), boxes, R)
    with pytest.raises(IndexError, match=r"pairs holds 9"):  # pairs first, as before
        sk.pair_mask_conv(masks, torch.tensor([[0, 9]] * 5), sk.gaussian_kernels(params, d), boxes, R)


@pytest.mark.parametrize("backend,device", _backends(UNION_TABLES))
def test_union_boxes_and_geometry_non_finite_boxes_agree(backend, device):
    _require(UNION_TABLES + GEOMETRY_TABLES, backend, device)
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [1.0, float("nan"), 5.0, 5.0], [2.0, 2.0, float("inf"), 7.0],
                          [-float("inf"), 1.0, 3.0, 3.0]], dtype=torch.float64, device=device)
    pairs = torch.tensor([[0, 1], [1, 0], [0, 2], [2, 3], [3, 0]], device=device)
    for fn in (sk.union_boxes, sk.pair_geometry):
        res = {}
        for b in (backend, "reference"):
            x = boxes.clone().requires_grad_(True)
            with sk.use_backend(b):
                out = fn(x, pairs)
                (g,) = torch.autograd.grad(out, x, torch.ones_like(out))
            res[b] = (out, g)
        _same(res[backend][0], res["reference"][0], f"{fn.__name__} forward")
        _same(res[backend][1], res["reference"][1], f"{fn.__name__} backward")


@pytest.mark.parametrize("backend,device", _backends(GATHER_TABLES))
def test_gather_mean_without_points(backend, device):
    """M = 0: with checks on every backend raises the same IndexError naming knn_index; with checks
    off every backend gives zero means and an empty gradient."""
    _require(GATHER_TABLES, backend, device)
    feats = torch.randn(2, 0, 4, dtype=torch.float64, device=device, requires_grad=True)
    index = torch.zeros(2, 3, 2, dtype=torch.int64, device=device)
    with sk.use_backend(backend):
        with pytest.raises(IndexError, match=r"knn_index holds 0, outside \[0, 0\) \(M, the number of points"):
            sk.gather_mean(feats, index)
        sk.set_checks(False)
        out = sk.gather_mean(feats, index)
        (g,) = torch.autograd.grad(out.sum(), feats)
        assert sk.gather_mean(feats, index[:, :0]).shape == (2, 0, 4)  # no centers either
    assert out.shape == (2, 3, 4) and not out.any()
    assert g.shape == (2, 0, 4)
