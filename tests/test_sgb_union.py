"""UnionFeatureExtractor (sgg_kernels.integrations.sgb) against Scene-Graph-Benchmark's
RelationFeatureExtractor written out plainly (float64 on the CPU): forward, gradients w.r.t. every
parameter and the feature maps, BN running statistics; chunk sizes 1, 3, P, > P; train and eval;
separate_spatial on and off; one-level pooling; state_dict keys; bad inputs; saved memory."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch

from helpers import BoxList  # the BoxList stand-in

import sgg_kernels as sk
from sgg_kernels.integrations import _union_taps
from sgg_kernels.integrations.sgb import UnionFeatureExtractor

C, D, R = 8, 32, 7  # in_channels, mlp_head_dim, pooler resolution
SCALES = (0.25, 0.125, 0.0625, 0.03125)
RATIO = 2


def _scene(seed=0):
    """2 images of different sizes; boxes from ~10 px to the whole image (all four FPN levels under
    the LevelMapper); fractional coordinates, so floor / ceil of the rect canvas matter."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(520, 480), (400, 300)]
    raw = [
        [[3.3, 4.7, 15.2, 17.9], [10.5, 20.25, 200.75, 180.1], [0.0, 0.0, 519.0, 479.0], [250.6, 100.4, 330.2, 400.9],
         [60.1, 300.3, 75.8, 310.6]],
        [[1.2, 2.2, 399.0, 299.0], [100.5, 50.5, 140.5, 90.5], [20.9, 30.1, 22.3, 31.7], [300.0, 10.0, 390.7, 250.3]],
    ]
    proposals = [BoxList(torch.tensor(b) + 0.01 * torch.rand(len(b), 4, generator=g), s) for b, s in zip(raw, sizes)]
    rel = [torch.tensor([[0, 1], [1, 0], [2, 3], [4, 2], [3, 4], [1, 3]]),
           torch.tensor([[0, 1], [2, 3], [3, 1], [1, 2]])]
    H, W = max(s[1] for s in sizes), max(s[0] for s in sizes)
    features = [torch.randn(2, C, math.ceil(H * s), math.ceil(W * s), generator=g, dtype=torch.float64) for s in SCALES]
    return features, proposals, rel


def _module(seed=1, **kw):
    torch.manual_seed(seed)
    kw.setdefault("scales", SCALES)
    m = UnionFeatureExtractor(in_channels=C, resolution=R, sampling_ratio=RATIO, mlp_head_dim=D, **kw).double()
    with torch.no_grad():  # non-trivial BN affine parameters and running statistics
        for bn in (m.rect_conv[2], m.rect_conv[6]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return m


# ---------------------------------------------------------------------------------------------
# SGB's RelationFeatureExtractor.forward, written out (roi_relation_feature_extractors.py,
# poolers.py, bounding_box.py), on a copy of the module's layers
# ---------------------------------------------------------------------------------------------
def _sgb_resize_to_rect(bbox, image_size, rect_size):
    """BoxList.resize((rect_size, rect_size)): float32 boxes times the Python-float ratios."""
    ratios = tuple(float(s) / float(s0) for s, s0 in zip((rect_size, rect_size), image_size))
    if ratios[0] == ratios[1]:
        return bbox * ratios[0]
    x1, y1, x2, y2 = bbox.split(1, dim=-1)
    return torch.cat((x1 * ratios[0], y1 * ratios[1], x2 * ratios[0], y2 * ratios[1]), dim=-1)


def _sgb_level_mapper(union, scales):
    """LevelMapper(k_min, k_max) on float32 union boxes: Eq. 1 of the FPN paper."""
    k_min = -torch.log2(torch.tensor(scales[0], dtype=torch.float32)).item()
    k_max = -torch.log2(torch.tensor(scales[-1], dtype=torch.float32)).item()
    area = (union[:, 2] - union[:, 0] + 1) * (union[:, 3] - union[:, 1] + 1)
    s = torch.sqrt(area)
    lvl = torch.floor(4 + torch.log2(s / 224 + 1e-6))
    lvl = torch.clamp(lvl, min=k_min, max=k_max)
    return lvl.to(torch.int64) - k_min


def sgb_relation_features(ref, x, proposals, rel_pair_idxs, separate_spatial, pooling_all_levels=True):
    rect_size = ref.resolution * 4 - 1
    dtype = x[0].dtype
    union_boxes, rect_inputs = [], []
    for proposal, rel in zip(proposals, rel_pair_idxs):
        head, tail = proposal.bbox[rel[:, 0]], proposal.bbox[rel[:, 1]]
        union_boxes.append(torch.cat((torch.min(head[:, :2], tail[:, :2]), torch.max(head[:, 2:], tail[:, 2:])), dim=1))
        n = len(rel)
        xr = torch.arange(rect_size).view(1, 1, -1).expand(n, rect_size, rect_size)
        yr = torch.arange(rect_size).view(1, -1, 1).expand(n, rect_size, rect_size)

        def rect(b):
            b = _sgb_resize_to_rect(b, proposal.size, rect_size)
            return ((xr >= b[:, 0].floor().view(-1, 1, 1).long()) & (xr <= b[:, 2].ceil().view(-1, 1, 1).long())
                    & (yr >= b[:, 1].floor().view(-1, 1, 1).long())
                    & (yr <= b[:, 3].ceil().view(-1, 1, 1).long())).to(dtype)

        rect_inputs.append(torch.stack((rect(head), rect(tail)), dim=1))
    rect_features = ref.rect_conv(torch.cat(rect_inputs, dim=0))  # nn.Sequential: real BatchNorm2d on all pairs

    rois = torch.cat(union_boxes)
    roi_batch = torch.cat([torch.full((len(u),), i, dtype=torch.int64) for i, u in enumerate(union_boxes)])
    pooled = [sk.roi_align(level, rois, roi_batch, R, spatial_scale=s, sampling_ratio=ref.sampling_ratio, aligned=False)
              for level, s in zip(x, ref.scales)]
    if len(x) == 1:
        vis = pooled[0]
    elif pooling_all_levels:
        vis = ref.feature_extractor.pooler.reduce_channel(torch.cat(pooled, dim=1))
    else:
        levels = _sgb_level_mapper(rois, ref.scales)
        vis = torch.zeros_like(pooled[0])
        for lvl in range(len(x)):
            idx = torch.nonzero(levels == lvl).squeeze(1)
            vis[idx] = pooled[lvl][idx]

    def mlp(t):  # FPN2MLPFeatureExtractor.forward_without_pool
        t = t.view(t.size(0), -1)
        return torch.relu(ref.feature_extractor.fc7(torch.relu(ref.feature_extractor.fc6(t))))

    if separate_spatial:
        return mlp(vis), ref.spatial_fc(rect_features.view(rect_features.size(0), -1))
    return mlp(vis + rect_features)


def _loss(out, weights):
    outs = out if isinstance(out, tuple) else (out,)
    return sum((o * w).sum() for o, w in zip(outs, weights))


def _compare(m, train, separate_spatial, chunk_size, pooling_all_levels=True, scene_seed=0, levels=None,
             features_grad=True, setup=None):
    features, proposals, rel = _scene(scene_seed)
    if levels is not None:
        features = features[:levels]
    ref = copy.deepcopy(m)
    m.chunk_size = chunk_size
    m.train(train)
    ref.train(train)
    if setup is not None:  # applied to both modules after train(): per-layer modes and frozen parameters
        setup(m)
        setup(ref)
    f1 = [f.clone().requires_grad_(features_grad) for f in features]
    f2 = [f.clone().requires_grad_(features_grad) for f in features]
    out = m(f1, proposals, rel)
    expect = sgb_relation_features(ref, f2, proposals, rel, separate_spatial, pooling_all_levels)
    outs = out if isinstance(out, tuple) else (out,)
    expects = expect if isinstance(expect, tuple) else (expect,)
    assert len(outs) == len(expects)
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(e.shape, generator=g, dtype=e.dtype) for e in expects]
    for o, e in zip(outs, expects):
        assert o.shape == (10, D)
        torch.testing.assert_close(o, e, rtol=1e-9, atol=1e-10)
    _loss(out, weights).backward()
    _loss(expect, weights).backward()
    ref_params = dict(ref.named_parameters())
    n_checked = 0
    for name, p in m.named_parameters():
        q = ref_params[name]
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10, msg=lambda s: f"{name}: {s}")
        n_checked += 1
    assert n_checked >= 8
    for a, b in zip(f1, f2):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10)
    ref_buffers = dict(ref.named_buffers())
    for name, b in m.named_buffers():
        torch.testing.assert_close(b, ref_buffers[name], rtol=1e-9, atol=1e-12, msg=lambda s: f"{name}: {s}")
    return m, ref


@pytest.fixture(params=["conv", "taps", "taps-generic", "taps-fwd-conv-bwd"])
def reduce_route(request, monkeypatch):
    """The routes of reduce_channel in the UnionHead Function: the conv on the pooled union
    features, or the tap maps (the conv folded into the FPN levels) pooled by the C++ kernels or by
    the union RoIAlign op (what other devices use); each forced for every image, in the forward and
    the backward, or the taps in the forward and the conv in the backward (what SGDet training, 1,024
    pairs per image, picks)."""
    def forced(*args, backward=False, level_grad=False):
        if request.param == "taps-fwd-conv-bwd":
            return not backward
        return request.param != "conv"

    monkeypatch.setattr(_union_taps, "use_taps", forced)
    if request.param == "taps-generic":
        monkeypatch.setattr(_union_taps, "cpp_tap_pool", lambda t: False)
    return request.param


@pytest.mark.parametrize("chunk_size", [1, 3, 10, 64, None])  # P = 10
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("separate_spatial", [False, True])
def test_matches_sgb_relation_feature_extractor(chunk_size, train, separate_spatial, reduce_route):
    m = _module(separate_spatial=separate_spatial)
    before = [b.clone() for b in m.buffers()]
    m, _ = _compare(m, train, separate_spatial, chunk_size)
    after = list(m.buffers())
    if train:  # running statistics moved, once (num_batches_tracked 0 -> 1)
        assert int(m.rect_conv[2].num_batches_tracked) == 1 and int(m.rect_conv[6].num_batches_tracked) == 1
        assert not torch.equal(before[0], after[0])
    else:
        assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("chunk_size", [3, None])
def test_single_level_mapping_matches_sgb(chunk_size):
    # pooling_all_levels=False: SGB's LevelMapper picks each union box's level; the scene's union
    # boxes fall on all four levels
    features, proposals, rel = _scene()
    rois = torch.cat([torch.cat((torch.min(p.bbox[r[:, 0], :2], p.bbox[r[:, 1], :2]),
                                 torch.max(p.bbox[r[:, 0], 2:], p.bbox[r[:, 1], 2:])), 1)
                      for p, r in zip(proposals, rel)])
    assert set(_sgb_level_mapper(rois, SCALES).tolist()) == {0.0, 1.0, 2.0, 3.0}
    m = _module(pooling_all_levels=False)
    assert not hasattr(m.feature_extractor.pooler, "reduce_channel")
    _compare(m, True, False, chunk_size, pooling_all_levels=False)


def test_one_level_pools_without_reduce_channel():
    m = _module(scales=(0.25,))
    assert hasattr(m.feature_extractor.pooler, "reduce_channel")  # SGB creates it, and never applies it
    _compare(m, True, False, 4, levels=1)


def test_momentum_none_and_repeated_steps():
    m = _module()
    m.rect_conv[2].momentum = None  # cumulative moving average, as BatchNorm2d
    m, ref = _compare(m, True, False, 3)
    features, proposals, rel = _scene(seed=3)  # a second training step on other features
    with torch.no_grad():
        m(features, proposals, rel)
        sgb_relation_features(ref, features, proposals, rel, False)
    assert int(m.rect_conv[2].num_batches_tracked) == 2
    ref_buffers = dict(ref.named_buffers())
    for name, b in m.named_buffers():
        torch.testing.assert_close(b, ref_buffers[name], rtol=1e-9, atol=1e-12, msg=lambda s: f"{name}: {s}")


def _bn1_eval_frozen_conv1(m):
    m.rect_conv[2].eval()  # BN1 on its running statistics, BN2 on the batch's
    m.rect_conv[0].weight.requires_grad_(False)
    m.rect_conv[6].weight.requires_grad_(False)


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_statistics_passes_with_mixed_bn_modes_and_frozen_layers(chunk_size, reduce_route):
    # the statistics Functions return gradients for the parameters that need them only, and BN2's
    # statistics depend on BN1's running buffers (no gradient) when BN1 is in eval mode
    _compare(_module(), True, False, chunk_size, setup=_bn1_eval_frozen_conv1)
    _compare(_module(), True, False, chunk_size,
             setup=lambda m: m.rect_conv[0].bias.requires_grad_(False))


@pytest.mark.parametrize("train", [True, False])
def test_float32_matches_float64(train, reduce_route):
    """float32 on the CPU takes kernels the float64 tests do not (oneDNN convs, among them the 1x1
    projections of the tap maps, _union_taps._project): output and gradients against the float64
    module on the same weights and inputs."""
    features, proposals, rel = _scene(2)
    m64 = _module().train(train)
    m64.chunk_size = 3  # P = 10: the chunked paths (one chunk runs the plain layers)
    m32 = copy.deepcopy(m64).float()
    f64 = [f.clone().requires_grad_() for f in features]
    f32 = [f.float().requires_grad_() for f in features]
    o64, o32 = m64(f64, proposals, rel), m32(f32, proposals, rel)
    torch.testing.assert_close(o32, o64.float(), rtol=1e-4, atol=1e-4)
    w = torch.randn(o64.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (o64 * w).sum().backward()
    (o32 * w.float()).sum().backward()
    p32 = dict(m32.named_parameters())
    for name, p in m64.named_parameters():
        if p.grad is None:
            assert p32[name].grad is None or not p32[name].grad.any(), name
            continue
        scale = p.grad.abs().max().item()  # float32 sums over pairs and pixels: relative to the largest entry
        torch.testing.assert_close(p32[name].grad, p.grad.float(), rtol=1e-3, atol=1e-4 * scale,
                                   msg=lambda m: f"{name}: {m}")
    for a, b in zip(f32, f64):
        torch.testing.assert_close(a.grad, b.grad.float(), rtol=1e-3, atol=1e-4 * b.grad.abs().max().item())


def test_group_norm_fc_matches():
    m = _module(use_gn=True, gn_groups=4)
    keys = [k for k in m.state_dict() if k.startswith("feature_extractor.fc")]
    assert keys == ["feature_extractor.fc6.0.weight", "feature_extractor.fc6.1.weight", "feature_extractor.fc6.1.bias",
                    "feature_extractor.fc7.0.weight", "feature_extractor.fc7.1.weight", "feature_extractor.fc7.1.bias"]
    _compare(m, True, False, 3)


def test_rect_masks_floor_ceil_by_hand():
    # image 54 x 27 -> canvas 27 x 27: x scaled by 0.5, y by 1; box (3, 2.5, 20.2, 5) -> x in
    # [floor(1.5), ceil(10.1)] = [1, 11], y in [floor(2.5), ceil(5)] = [2, 5]
    m = _module()
    boxes = torch.tensor([[3.0, 2.5, 20.2, 5.0], [0.0, 0.0, 53.0, 26.0]])
    bounds = m._rect_bounds(boxes, torch.tensor([0, 0]), [(54, 27)])
    assert bounds.tolist() == [[1, 2, 11, 5], [0, 0, 27, 26]]
    masks = m._masks(bounds, torch.tensor([[0, 1]]), torch.float64)
    expect = torch.zeros(27, 27, dtype=torch.float64)
    expect[2:6, 1:12] = 1
    assert torch.equal(masks[0, 0], expect) and masks[0, 1].sum() == 27 * 27
    # float32 arithmetic, as SGB's BoxList: 44.444443 * fl32(27 / 400) rounds to 3.0 in float32
    # (floor 3), while float64 arithmetic gives 2.99999989 (floor 2)
    x1 = torch.tensor(44.44444274902344, dtype=torch.float32)
    assert int((x1.double() * (27 / 400)).floor()) == 2
    box = BoxList(torch.stack([x1, torch.tensor(10.0), torch.tensor(100.0), torch.tensor(20.0)]).view(1, 4), (400, 300))
    sgb_scaled = _sgb_resize_to_rect(box.bbox, box.size, 27)
    bounds = m._rect_bounds(box.bbox.double(), torch.tensor([0]), [box.size])
    assert bounds[0, 0] == 3 == int(sgb_scaled[0, 0].floor())


SGB_KEYS = [
    "feature_extractor.pooler.reduce_channel.0.weight", "feature_extractor.pooler.reduce_channel.0.bias",
    "feature_extractor.fc6.weight", "feature_extractor.fc6.bias",
    "feature_extractor.fc7.weight", "feature_extractor.fc7.bias",
    "rect_conv.0.weight", "rect_conv.0.bias",
    "rect_conv.2.weight", "rect_conv.2.bias", "rect_conv.2.running_mean", "rect_conv.2.running_var",
    "rect_conv.2.num_batches_tracked",
    "rect_conv.4.weight", "rect_conv.4.bias",
    "rect_conv.6.weight", "rect_conv.6.bias", "rect_conv.6.running_mean", "rect_conv.6.running_var",
    "rect_conv.6.num_batches_tracked",
]
SPATIAL_KEYS = ["spatial_fc.0.weight", "spatial_fc.0.bias", "spatial_fc.2.weight", "spatial_fc.2.bias"]


def test_state_dict_keys_and_shapes_equal_sgb():
    m = UnionFeatureExtractor()  # SGB's X-101 FPN relation config: C = 256, R = 7, 4 levels, D = 4096
    sd = m.state_dict()
    assert sorted(sd) == sorted(SGB_KEYS)
    shapes = {"feature_extractor.pooler.reduce_channel.0.weight": (256, 1024, 3, 3),
              "feature_extractor.fc6.weight": (4096, 256 * 49), "feature_extractor.fc7.weight": (4096, 4096),
              "rect_conv.0.weight": (128, 2, 7, 7), "rect_conv.2.running_var": (128,),
              "rect_conv.4.weight": (256, 128, 3, 3), "rect_conv.6.weight": (256,)}
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    assert m.rect_size == 27 and m.rect_conv[2].momentum == 0.01
    sep = UnionFeatureExtractor(in_channels=C, mlp_head_dim=D, separate_spatial=True)
    assert sorted(sep.state_dict()) == sorted(SGB_KEYS + SPATIAL_KEYS)
    assert tuple(sep.state_dict()["spatial_fc.0.weight"].shape) == (D // 2, C * 49)
    # an SGB-named state dict (other values) loads strictly and round-trips
    small = _module()
    other = {k: torch.randn_like(v) if v.is_floating_point() else v + 3 for k, v in small.state_dict().items()}
    small.load_state_dict(other)
    assert all(torch.equal(small.state_dict()[k], other[k]) for k in SGB_KEYS)


def test_from_config_reads_sgb_keys():
    cfg = SimpleNamespace(MODEL=SimpleNamespace(
        ATTRIBUTE_ON=False,
        ROI_BOX_HEAD=SimpleNamespace(POOLER_RESOLUTION=5, POOLER_SCALES=(0.25, 0.125), POOLER_SAMPLING_RATIO=0,
                                     MLP_HEAD_DIM=16, USE_GN=True, FEATURE_EXTRACTOR="FPN2MLPFeatureExtractor"),
        ROI_RELATION_HEAD=SimpleNamespace(POOLING_ALL_LEVELS=False, CAUSAL=SimpleNamespace(SEPARATE_SPATIAL=True)),
        GROUP_NORM=SimpleNamespace(DIM_PER_GP=-1, NUM_GROUPS=4, EPSILON=1e-3)))
    m = UnionFeatureExtractor.from_config(cfg, 6, chunk_size=7)
    assert (m.in_channels, m.resolution, m.scales, m.sampling_ratio, m.out_channels) == (6, 5, (0.25, 0.125), 0, 16)
    assert (m.pooling_all_levels, m.separate_spatial, m.rect_size, m.chunk_size) == (False, True, 19, 7)
    gn = m.feature_extractor.fc6[1]
    assert gn.num_groups == 4 and gn.eps == 1e-3
    cfg.MODEL.ATTRIBUTE_ON = True
    with pytest.raises(NotImplementedError, match="ATTRIBUTE_ON"):
        UnionFeatureExtractor.from_config(cfg, 6)
    cfg.MODEL.ATTRIBUTE_ON = False
    cfg.MODEL.ROI_BOX_HEAD.FEATURE_EXTRACTOR = "ResNet50Conv5ROIFeatureExtractor"
    with pytest.raises(NotImplementedError, match="FPN2MLPFeatureExtractor only"):
        UnionFeatureExtractor.from_config(cfg, 6)
    with pytest.raises(ValueError, match="cfg has no MODEL.ATTRIBUTE_ON"):
        UnionFeatureExtractor.from_config(SimpleNamespace(MODEL=SimpleNamespace()), 6)


def test_extra_fpn_level_is_ignored_as_sgb():
    # SGB's FPN returns P2-P6 (LastLevelMaxPool) for 4 pooler scales; its Pooler zips them, dropping P6
    features, proposals, rel = _scene()
    m = _module().eval()
    p6 = torch.nn.functional.max_pool2d(features[-1], 1, 2, 0)
    out = m(features, proposals, rel)
    torch.testing.assert_close(m(features + [p6], proposals, rel), out, rtol=0, atol=0)
    with torch.no_grad():  # inference: chunks without checkpointing, same values
        torch.testing.assert_close(m(features, proposals, rel), out, rtol=0, atol=0)


def test_no_pairs_gives_empty_and_keeps_statistics():
    features, proposals, _ = _scene()
    m = _module(separate_spatial=True)
    buffers = [b.clone() for b in m.buffers()]
    region, spatial = m(features, proposals, [torch.zeros(0, 2, dtype=torch.int64)] * 2)
    assert region.shape == (0, D) and spatial.shape == (0, D)
    assert all(torch.equal(a, b) for a, b in zip(buffers, m.buffers()))
    # an image without pairs next to one with pairs: only the latter's rows
    out = _module()(features, proposals, [torch.zeros(0, 2, dtype=torch.int64), torch.tensor([[0, 1], [1, 0]])])
    assert out.shape == (2, D)


@pytest.mark.parametrize("chunk_size", [1, 4, None])
@pytest.mark.parametrize("train", [True, False])
def test_frozen_features(chunk_size, train, reduce_route):
    """SGB trains the relation head on a frozen detector: FPN features without gradients, so the
    backward computes the weight gradients only (each route without its features' gradient)."""
    _compare(_module(), train, False, chunk_size, features_grad=False)


@pytest.mark.parametrize("train", [True, False])
def test_pairs_of_images_interleaved(train, reduce_route):
    """forward_packed with the two images' pairs interleaved: UnionHead groups them by image and
    writes each row back in place, so output and gradients are the sorted call's, permuted."""
    from sgg_kernels.integrations.sgb import boxlists_to_batch

    features, proposals, rel = _scene()
    batch = boxlists_to_batch(proposals, rel)
    perm = torch.tensor([6, 0, 7, 1, 2, 8, 9, 3, 4, 5])  # image 1's pairs (6-9) among image 0's
    grads, outs = [], []
    for pairs in (batch.pairs, batch.pairs[perm]):
        m = _module().train(train)
        m.chunk_size = 2
        f = [x.clone().requires_grad_() for x in features]
        out = m.forward_packed(f, batch.boxes, batch.box_batch, pairs, batch.image_sizes)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
        (out * (w if not outs else w[perm])).sum().backward()
        outs.append(out)
        grads.append([p.grad for p in m.parameters()] + [x.grad for x in f])
    torch.testing.assert_close(outs[1], outs[0][perm], rtol=1e-10, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("train", [True, False])
def test_no_grad_forward_equals(train, reduce_route):
    """Under torch.no_grad (SGB's test loop) UnionHead finishes each chunk's rows at once and keeps
    nothing: the same output as with gradients on."""
    features, proposals, rel = _scene()
    m = _module().train(train)
    m.chunk_size = 3
    state = copy.deepcopy(m.state_dict())
    with_grad = m(features, proposals, rel)
    m.load_state_dict(state)  # the same running statistics before the second call
    with torch.no_grad():
        out = m(features, proposals, rel)
    assert not out.requires_grad and with_grad.requires_grad
    torch.testing.assert_close(out, with_grad.detach(), rtol=1e-12, atol=1e-13)


def test_tap_route_cost_model():
    """_union_taps.use_taps: at SGB's widths (C = 256, 4 levels of a 592 x 800 input, R = 7) the tap
    maps pay off in the forward from several hundred pairs per image (SGDet testing takes 6,320),
    in the backward only when the features need gradients too; tiny widths never use them."""
    px = 148 * 200 + 74 * 100 + 37 * 50 + 19 * 25
    assert not _union_taps.use_taps(64, 256, 4, 7, px)
    assert not _union_taps.use_taps(128, 256, 4, 7, px)
    assert _union_taps.use_taps(512, 256, 4, 7, px)  # SGDet training samples 1,024 per image
    assert _union_taps.use_taps(2048, 256, 4, 7, px)
    assert _union_taps.use_taps(6320, 256, 4, 7, px)
    assert not _union_taps.use_taps(6320, 256, 4, 7, px, backward=True)
    assert _union_taps.use_taps(6320, 256, 4, 7, px, backward=True, level_grad=True)
    assert not _union_taps.use_taps(10_000, 8, 4, 7, px)
    conv, taps = _union_taps.route_costs(1024, 256, 4, 7, px)
    conv_b, taps_b = _union_taps.route_costs(1024, 256, 4, 7, px, backward=True)
    assert conv_b > conv and taps_b > taps  # the backward includes the recomputed forward


def test_bad_inputs():
    features, proposals, rel = _scene()
    m = _module()
    with pytest.raises(ValueError, match="rel_pair_idxs has 1 images but proposals has 2"):
        m(features, proposals, rel[:1])
    with pytest.raises(IndexError, match=r"rel_pair_idxs\[1\] holds indices outside \[0, 4\)"):
        m(features, proposals, [rel[0], torch.tensor([[0, 4]])])
    xywh = [proposals[0], proposals[1].convert("xywh")]
    with pytest.raises(ValueError, match=r"proposals\[1\] is a BoxList in mode 'xywh'.*convert\(\"xyxy\"\)"):
        m(features, xywh, rel)
    with pytest.raises(ValueError, match="rel_pair_idxs is required"):
        m(features, proposals, None)
    with pytest.raises(ValueError, match="features must be a list of at least 4 FPN levels"):
        m(features[:3], proposals, rel)
    with pytest.raises(ValueError, match=r"features\[2\] has size 5 in dim 1.*in_channels"):
        m(features[:2] + [features[2][:, :5]] + features[3:], proposals, rel)
    with pytest.raises(ValueError, match=r"features\[0\] is float32 but the parameters of UnionFeatureExtractor"):
        m([f.float() for f in features], proposals, rel)
    with pytest.raises(ValueError, match=r"features\[1\] has size 1 in dim 0"):
        m([features[0], features[1][:1], features[2], features[3]], proposals, rel)
    boxes = torch.cat([p.bbox for p in proposals])
    box_batch = torch.tensor([0] * 5 + [1] * 4)
    sizes = [p.size for p in proposals]
    with pytest.raises(ValueError, match=r"image_sizes must hold one \(width, height\) per image"):
        m.forward_packed(features, boxes, box_batch, torch.tensor([[0, 1]]), sizes[:1])
    with pytest.raises(ValueError, match=r"image_sizes\[1\] must be \(width, height\)"):
        m.forward_packed(features, boxes, box_batch, torch.tensor([[0, 1]]), [sizes[0], (0, 3)])
    with pytest.raises(ValueError, match=r"pairs\[1\] = \(4, 5\) joins boxes of images 0 and 1"):
        m.forward_packed(features, boxes, box_batch, torch.tensor([[0, 1], [4, 5]]), sizes)
    with pytest.raises(IndexError, match="pairs holds 9, outside"):
        m.forward_packed(features, boxes, box_batch, torch.tensor([[0, 9]]), sizes)
    with pytest.raises(IndexError, match="box_batch holds 2, outside"):
        m.forward_packed(features, boxes, torch.tensor([0] * 5 + [2] * 4), torch.tensor([[0, 1]]), sizes)
    with pytest.raises(TypeError, match="pairs must be an int64 tensor"):
        m.forward_packed(features, boxes, box_batch, torch.tensor([[0.0, 1.0]]), sizes)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        UnionFeatureExtractor(chunk_size=0)
    with pytest.raises(ValueError, match="scales must be a non-empty list"):
        UnionFeatureExtractor(scales=())


def test_chunked_backward_keeps_less_saved_memory():
    """Memory saved for backward, counted with saved_tensors_hooks as distinct storages other than
    the feature maps (which the caller keeps alive anyway): the checkpoint keeps its chunk inputs
    (references to the features, the chunk's pairs) and drops everything computed inside a chunk;
    so with chunks only pair indices and per-channel statistics remain, unchunked every activation
    of every pair."""
    features, proposals, rel = _scene()

    def saved_bytes(chunk_size):
        m = _module()
        m.chunk_size = chunk_size
        f = [x.clone().requires_grad_() for x in features]
        inputs = {x.untyped_storage().data_ptr() for x in list(f) + list(m.parameters())}
        storages = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in inputs:
                storages[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = m(f, proposals, rel)
        out.sum().backward()
        assert all(x.grad is not None for x in f)
        return sum(storages.values()), out.numel() * out.element_size()

    chunked, out_bytes = saved_bytes(3)
    unchunked, _ = saved_bytes(None)
    # the output and fc6's activation ([P, D] each: UnionHead keeps them so that the backward
    # recomputes neither fc6 nor fc7), per-channel statistics; nothing else per pair and layer
    assert chunked < 2 * out_bytes + 16 * C * 8
    assert unchunked > 20 * out_bytes  # the plain path keeps rect, pooled and hidden activations


@pytest.mark.parametrize("train", [True, False])
def test_union_head_gradcheck(train, reduce_route):
    """Gradient check (float64) of the UnionHead Function through the module, w.r.t. reduce_channel's
    weight, BN2's weight and the coarsest FPN level, in several chunks of two images."""
    g = torch.Generator().manual_seed(5)
    m = UnionFeatureExtractor(in_channels=2, resolution=3, scales=(0.5, 0.25), sampling_ratio=2, mlp_head_dim=4,
                              chunk_size=2).double().train(train)
    levels = [torch.randn(2, 2, 12, 14, generator=g, dtype=torch.float64),
              torch.randn(2, 2, 6, 7, generator=g, dtype=torch.float64)]
    boxes = torch.tensor([[1.0, 2.0, 15.0, 20.0], [4.5, 0.5, 27.0, 11.0], [0.0, 3.0, 9.0, 23.5],
                          [2.0, 2.0, 20.0, 18.0], [6.0, 1.0, 26.0, 22.0]], dtype=torch.float64)
    box_batch = torch.tensor([0, 0, 0, 1, 1])
    pairs = torch.tensor([[0, 1], [1, 2], [2, 0], [3, 4], [1, 0], [4, 3]])
    names = ("feature_extractor.pooler.reduce_channel.0.weight", "rect_conv.6.weight")
    params = {n: p.detach() for n, p in m.named_parameters()}

    w = torch.randn(pairs.shape[0], 4, generator=g, dtype=torch.float64)

    def f(w_r, g2, coarse):  # a scalar: UnionHead's backward runs once per graph (once_differentiable)
        return (_call(m, params, names, w_r, g2, levels[0], coarse, boxes, box_batch, pairs) * w).sum()

    inputs = [params[names[0]].clone().requires_grad_(), params[names[1]].clone().requires_grad_(),
              levels[1].clone().requires_grad_()]
    # torch.autograd.gradcheck runs the backward of one graph twice (its reentrancy check), which
    # UnionHead refuses; the same test by hand: central differences along random directions
    grads = torch.autograd.grad(f(*inputs), inputs)
    h = 1e-6
    with torch.no_grad():
        for trial in range(3):
            dirs = [torch.randn(x.shape, generator=g, dtype=x.dtype) for x in inputs]
            plus = f(*[x + h * d for x, d in zip(inputs, dirs)])
            minus = f(*[x - h * d for x, d in zip(inputs, dirs)])
            numeric = (plus - minus) / (2 * h)
            analytic = sum((gr * d).sum() for gr, d in zip(grads, dirs))
            torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)


def _call(m, params, names, w_r, g2, fine, coarse, boxes, box_batch, pairs):
    from torch.func import functional_call

    from sgg_kernels.bench.cases.relation_head import _Packed  # forward = the module's forward_packed

    sd = {"m." + n: p for n, p in {**params, names[0]: w_r, names[1]: g2}.items()}
    return functional_call(_Packed(m), sd, ([fine, coarse], boxes, box_batch, pairs, [(28, 24), (28, 24)]))
