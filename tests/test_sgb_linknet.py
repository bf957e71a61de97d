"""LinkNetPredictor (sgg_kernels/integrations/_sgb_linknet.py): Scene-Graph-Benchmark's predictor
interface around LinkNetHead.

Checked against (1) LinkNetHead called by hand on a batch packed by hand in the test and (2) an
oracle written independently here (per-image loops, Eq. 10 with GT labels in PredCls, G0
materialised), forward and gradients in float64; per-image splits; the three modes; add_losses;
bad inputs.
"""
from types import SimpleNamespace as NS

import pytest
import torch
import torch.nn.functional as F

import sgg_kernels as sk
from sgg_kernels.integrations._sgb_linknet import LinkNetPredictor
from sgg_kernels.models import LinkNetHead
from test_linknet import _rem_loop  # the per-image Eq. 1-3 oracle

import helpers

C_OBJ, C_REL, ROI, UNION = 7, 5, 10, 16
F64 = torch.float64


def BoxList(bbox, image_size, mode="xyxy"):
    """helpers.BoxList keeping the boxes' dtype (float64 here)."""
    return helpers.BoxList(bbox, image_size, mode, dtype=None)


def _config(mode="sgcls", pooling=UNION, mlp=UNION, bias=True, vision=True, **linknet):
    gt_box, gt_label = {"predcls": (True, True), "sgcls": (True, False), "sgdet": (False, False)}[mode]
    rh = NS(NUM_CLASSES=C_REL, USE_GT_BOX=gt_box, USE_GT_OBJECT_LABEL=gt_label, PREDICT_USE_VISION=vision,
            PREDICT_USE_BIAS=bias, EMBED_DIM=8, CONTEXT_HIDDEN_DIM=12, CONTEXT_POOLING_DIM=pooling,
            LINKNET=NS(**{"GEO_DIM": 6, "REDUCTION": 2, **linknet}))
    return NS(MODEL=NS(ATTRIBUTE_ON=False, ROI_BOX_HEAD=NS(NUM_CLASSES=C_OBJ, MLP_HEAD_DIM=mlp),
                       ROI_RELATION_HEAD=rh, RESNETS=NS(BACKBONE_OUT_CHANNELS=4)))


def _predictor(cfg, seed=0, statistics=None):
    torch.manual_seed(seed)
    m = LinkNetPredictor(cfg, ROI, statistics=statistics).to(F64)
    if m.use_bias:  # SGB fills it from dataset statistics: random here, so that the test sees it
        with torch.no_grad():
            m.freq_bias.obj_baseline.weight.normal_()
    return m


NUM_OBJS = (3, 1, 4, 2)  # image 1: a single box, no pairs


def _data(seed=0, mlp=UNION, labels_bg=True, grad=True):
    g = torch.Generator().manual_seed(seed)
    proposals, rel = [], []
    for i, n in enumerate(NUM_OBJS):
        xy = torch.rand(n, 2, generator=g, dtype=F64) * 60
        wh = torch.rand(n, 2, generator=g, dtype=F64) * 30 + 2
        b = BoxList(torch.cat([xy, xy + wh], 1), (100, 90))
        labels = torch.randint(0 if labels_bg else 1, C_OBJ, (n,), generator=g)
        b.add_field("labels", labels)
        b.add_field("predict_logits", torch.randn(n, C_OBJ, generator=g, dtype=F64))
        proposals.append(b)
        pairs = torch.tensor([(s, o) for s in range(n) for o in range(n) if s != o], dtype=torch.int64).reshape(-1, 2)
        if i == 2:
            pairs = pairs[[0, 5, 7, 11, 2]]  # a sampled subset, not in order
        rel.append(pairs)
    K, P = sum(NUM_OBJS), sum(r.shape[0] for r in rel)
    roi = torch.randn(K, ROI, generator=g, dtype=F64).requires_grad_(grad)
    union = torch.randn(P, mlp, generator=g, dtype=F64).requires_grad_(grad)
    return proposals, rel, roi, union


def _pack(proposals, rel):
    """The packed batch, by hand."""
    boxes = torch.cat([p.bbox for p in proposals])
    box_batch = torch.cat([torch.full((len(p),), i, dtype=torch.int64) for i, p in enumerate(proposals)])
    offsets = [0]
    for p in proposals[:-1]:
        offsets.append(offsets[-1] + len(p))
    pairs = torch.cat([r + o for r, o in zip(rel, offsets)])
    return boxes, box_batch, pairs


def _onehot(labels):
    out = torch.full((labels.shape[0], C_OBJ), -1000.0, dtype=F64)
    out[torch.arange(labels.shape[0]), labels] = 1000.0
    return out


def _by_hand(m, proposals, rel, roi, union, features=None):
    """LinkNetHead called by hand on the packed batch (the predictor's documented composition)."""
    boxes, box_batch, pairs = _pack(proposals, rel)
    B = len(proposals)
    labels = torch.cat([p.get_field("labels") for p in proposals])
    predcls = m.mode == "predcls"
    logits_in = _onehot(labels) if m.use_gt_label else torch.cat([p.get_field("predict_logits") for p in proposals])
    if m.gce_source == "roi_mean":
        context = torch.stack([roi[box_batch == b].mean(0) if (box_batch == b).any() else roi.new_zeros(ROI)
                               for b in range(B)])
    elif m.gce_source == "feature_map":
        context = torch.stack([f.mean(dim=(2, 3)) for f in features]).mean(0)
    else:
        context = roi.new_zeros(B, 0)
    ml = None
    if m.gce is not None:
        ml = context @ m.gce.classifier.weight.T + m.gce.classifier.bias
    u = union @ m.up_dim.weight.T + m.up_dim.bias if m.union_single_not_match else union
    O4, rel_logits = m.head(roi, logits_in, context, boxes, box_batch, pairs, u,
                            obj_labels=labels if predcls else None)
    obj = _onehot(labels) if predcls else O4
    if m.use_bias:
        preds = labels if predcls else O4.argmax(1)
        rel_logits = rel_logits + m.freq_bias.obj_baseline.weight[preds[pairs[:, 0]] * C_OBJ + preds[pairs[:, 1]]]
    num_rels = [r.shape[0] for r in rel]
    return list(obj.split(list(NUM_OBJS))), list(rel_logits.split(num_rels)), ml, labels, box_batch


# ---------------------------------------------------------------------------------------------
# An independent oracle of the head: per-image loops, G0 materialised, Eq. 10 from given labels
# ---------------------------------------------------------------------------------------------
_rem = _rem_loop  # Eq. 1-3 image by image (tests/test_linknet.py)


def _head_oracle(h, roi, logits, context, boxes, box_batch, pairs, union, labels=None):
    O0 = torch.cat([roi, torch.softmax(logits, 1) @ h.K0.weight.T, context[box_batch]], dim=1)
    O3 = _rem(h.rem2, _rem(h.rem1, O0, box_batch), box_batch, full=False)  # Eq. 1-5
    O4 = O3 @ h.rem2.fc1.weight.T + h.rem2.fc1.bias  # Eq. 6
    pred = O4.argmax(1) if labels is None else labels
    E0 = torch.cat([F.one_hot(pred, h.num_obj_classes).to(O4.dtype) @ h.K1.weight, O3], dim=1)  # Eq. 10-11
    E1 = _rem(h.rem3, E0, box_batch)
    Du = h.union_dim
    G0 = E1[pairs[:, 0], :Du] * E1[pairs[:, 1], Du:] * union  # Eq. 12
    c = (boxes[:, :2] + boxes[:, 2:]) / 2
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp_min(1e-6)
    s, o = pairs[:, 0], pairs[:, 1]
    geo = torch.cat([(c[o] - c[s]) / wh[s], torch.log(wh[o] / wh[s])], dim=1)  # Eq. 17
    geo = F.batch_norm(geo, None, None, h.geo.norm.weight, h.geo.norm.bias, training=True, eps=h.geo.norm.eps)
    G1 = torch.cat([G0, F.relu(geo @ h.geo.fc.weight.T + h.geo.fc.bias)], dim=1)  # Eq. 13
    return O4, G1 @ h.fc4.weight.T + h.fc4.bias  # Eq. 14


def _oracle(m, proposals, rel, roi, union):
    """The whole predictor (roi_mean context) from the oracle head, labels for Eq. 10 in PredCls."""
    boxes, box_batch, pairs = _pack(proposals, rel)
    labels = torch.cat([p.get_field("labels") for p in proposals])
    predcls = m.mode == "predcls"
    logits_in = _onehot(labels) if m.use_gt_label else torch.cat([p.get_field("predict_logits") for p in proposals])
    context = torch.stack([roi[box_batch == b].mean(0) for b in range(len(proposals))])
    O4, rl = _head_oracle(m.head, roi, logits_in, context, boxes, box_batch, pairs, union,
                          labels if predcls else None)
    preds = labels if predcls else O4.argmax(1)
    rl = rl + m.freq_bias.obj_baseline.weight[preds[pairs[:, 0]] * C_OBJ + preds[pairs[:, 1]]]
    return (_onehot(labels) if predcls else O4), rl


def _cat(outs):
    obj, rel = outs[0], outs[1]
    return torch.cat(list(obj)), torch.cat(list(rel))


def _grads(outs, leaves, seed=3):
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=F64)).sum() for o in outs if o.requires_grad)
    return torch.autograd.grad(loss, leaves, allow_unused=True)


# ---------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["predcls", "sgcls", "sgdet"])
def test_matches_head_by_hand_forward_and_gradients(mode):
    m = _predictor(_config(mode), seed=1)
    proposals, rel, roi, union = _data(seed=2)
    obj, rels, losses = m(proposals, rel, None, None, roi, union)
    obj_h, rels_h, _, _, _ = _by_hand(m, proposals, rel, roi, union)
    assert isinstance(obj, list) and isinstance(rels, list) and len(obj) == len(rels) == len(NUM_OBJS)
    for a, b in zip(obj + rels, obj_h + rels_h):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert set(losses) == {"loss_gce"}
    leaves = [roi, union] + list(m.parameters())
    g = _grads([*_cat((obj, rels)), losses["loss_gce"]], leaves)
    ml = _by_hand(m, proposals, rel, roi, union)
    labels, box_batch = ml[3], ml[4]
    present = torch.zeros(len(NUM_OBJS), C_OBJ, dtype=F64)
    present[box_batch, labels] = 1
    present[:, 0] = 0
    loss_h = F.binary_cross_entropy_with_logits(ml[2], present, reduction="sum") / len(NUM_OBJS)  # Eq. 9
    g_h = _grads([*_cat(ml[:2]), loss_h], leaves)
    names = ["roi_features", "union_features"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, g, g_h):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
    torch.testing.assert_close(losses["loss_gce"], loss_h, rtol=0, atol=1e-12)
    # what reaches what: in PredCls the head's object classifier (Eq. 6) is unused, as in SGB
    grads = dict(zip(names, g))
    assert grads["roi_features"].abs().max() > 0 and grads["union_features"].abs().max() > 0
    assert (grads["head.rem2.fc1.weight"] is None) == (mode == "predcls")


@pytest.mark.parametrize("mode", ["predcls", "sgcls"])
def test_matches_independent_oracle(mode):
    """The same numbers from the test's own formulation of LinkNet (Eq. 1-17) plus SGB's parts."""
    m = _predictor(_config(mode), seed=4)
    proposals, rel, roi, union = _data(seed=5)
    obj, rels = _cat(m(proposals, rel, None, None, roi, union))
    obj_o, rels_o = _oracle(m, proposals, rel, roi, union)
    torch.testing.assert_close(obj, obj_o, rtol=0, atol=1e-8)
    torch.testing.assert_close(rels, rels_o, rtol=0, atol=1e-8)
    leaves = [roi, union] + [p for n, p in m.named_parameters() if not n.startswith("gce.")]
    for a, b in zip(_grads([obj, rels], leaves), _grads([obj_o, rels_o], leaves)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-8)


def test_per_image_split():
    m = _predictor(_config("sgcls"), seed=6).eval()
    proposals, rel, roi, union = _data(seed=7)
    obj, rels, losses = m(proposals, rel, None, None, roi, union)
    assert [o.shape for o in obj] == [(n, C_OBJ) for n in NUM_OBJS]
    assert [r.shape for r in rels] == [(r_.shape[0], C_REL) for r_ in rel]
    assert rels[1].shape == (0, C_REL)  # the single-box image has no pairs
    assert losses == {}
    # image 2 alone gives image 2's rows: the batch never mixes images (eval: no batch-norm statistics)
    one = m([proposals[2]], [rel[2]], None, None, roi[4:8], union[6:11])
    torch.testing.assert_close(one[0][0], obj[2], rtol=0, atol=1e-12)
    torch.testing.assert_close(one[1][0], rels[2], rtol=0, atol=1e-12)


def test_modes_from_config():
    assert _predictor(_config("predcls")).mode == "predcls"
    assert _predictor(_config("sgcls")).mode == "sgcls"
    assert _predictor(_config("sgdet")).mode == "sgdet"


def test_predcls_returns_sgb_onehot_and_ignores_predict_logits():
    m = _predictor(_config("predcls"), seed=8)
    proposals, rel, roi, union = _data(seed=9)
    obj, rels, _ = m(proposals, rel, None, None, roi, union)
    labels = torch.cat([p.get_field("labels") for p in proposals])
    torch.testing.assert_close(torch.cat(obj), _onehot(labels), rtol=0, atol=0)
    for p in proposals:
        p.extra_fields.pop("predict_logits")
    _, rels2, _ = m(proposals, rel, None, None, roi, union)
    for a, b in zip(rels, rels2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sgcls_uses_predict_logits_detached():
    m = _predictor(_config("sgcls"), seed=10)
    proposals, rel, roi, union = _data(seed=11)
    logits = [p.get_field("predict_logits").requires_grad_(True) for p in proposals]
    obj, rels, losses = m(proposals, rel, None, None, roi, union)
    loss = torch.cat(obj).sum() + torch.cat(rels).sum()
    loss.backward()
    assert all(l.grad is None for l in logits)  # SGB detaches the detector's logits
    proposals[0].extra_fields["predict_logits"] = proposals[0].get_field("predict_logits").detach() + 5.0
    obj2, _, _ = m(proposals, rel, None, None, roi, union)
    assert not torch.equal(obj2[0], obj[0])


def test_sgdet_eval_needs_no_labels():
    m = _predictor(_config("sgdet"), seed=12).eval()
    proposals, rel, roi, union = _data(seed=13, grad=False)
    for p in proposals:
        p.extra_fields.pop("labels")
    obj, rels, losses = m(proposals, rel, None, None, roi, union)
    assert losses == {} and len(obj) == len(NUM_OBJS)
    m.train()
    with pytest.raises(ValueError, match="'labels'"):  # the gce loss needs them in training
        m(proposals, rel, None, None, roi, union)


# ---------------------------------------------------------------------------------------------
# Global context sources, add_losses, up_dim, frequency bias
# ---------------------------------------------------------------------------------------------
def test_gce_feature_map_source():
    m = _predictor(_config("sgcls", GCE_SOURCE="feature_map"), seed=14)
    assert m.context_dim == 4 and m.head.context_dim == 4
    proposals, rel, roi, union = _data(seed=15)
    g = torch.Generator().manual_seed(16)
    features = [torch.randn(len(NUM_OBJS), 4, h, w, generator=g, dtype=F64) for h, w in ((12, 10), (6, 5), (3, 3))]
    obj, rels, losses = m(proposals, rel, None, None, roi, union, features=features)
    obj_h, rels_h, ml, labels, bb = _by_hand(m, proposals, rel, roi, union, features=features)
    for a, b in zip(obj + rels, obj_h + rels_h):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert set(losses) == {"loss_gce"}
    with pytest.raises(ValueError, match="features="):
        m(proposals, rel, None, None, roi, union)
    with pytest.raises(ValueError, match="features\\[1\\]"):
        m(proposals, rel, None, None, roi, union, features=[features[0], features[1][:2]])


def test_gce_none_and_gce_loss_off():
    m = _predictor(_config("sgcls", GCE_SOURCE="none"), seed=17)
    assert m.gce is None and m.head.context_dim == 0
    proposals, rel, roi, union = _data(seed=18)
    obj, rels, losses = m(proposals, rel, None, None, roi, union)
    assert losses == {}
    obj_h, rels_h, _, _, _ = _by_hand(m, proposals, rel, roi, union)
    for a, b in zip(obj + rels, obj_h + rels_h):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    m2 = _predictor(_config("sgcls", GCE_LOSS=False), seed=17)
    assert m2(proposals, rel, None, None, roi, union)[2] == {}


def test_up_dim_when_widths_differ():
    m = _predictor(_config("sgcls", pooling=UNION, mlp=9), seed=19)
    assert m.union_single_not_match and m.up_dim.in_features == 9 and m.up_dim.out_features == UNION
    proposals, rel, roi, union = _data(seed=20, mlp=9)
    obj, rels, _ = m(proposals, rel, None, None, roi, union)
    _, rels_h, _, _, _ = _by_hand(m, proposals, rel, roi, union)
    for a, b in zip(rels, rels_h):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_frequency_bias_off_and_from_statistics():
    m = _predictor(_config("sgcls", bias=False), seed=21)
    assert not hasattr(m, "freq_bias") and not any(k.startswith("freq_bias") for k in m.state_dict())
    proposals, rel, roi, union = _data(seed=22)
    _, rels, _ = m(proposals, rel, None, None, roi, union)
    _, rels_h, _, _, _ = _by_hand(m, proposals, rel, roi, union)
    for a, b in zip(rels, rels_h):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    pred_dist = torch.randn(C_OBJ, C_OBJ, C_REL)
    m2 = LinkNetPredictor(_config("sgcls"), ROI, statistics={"pred_dist": pred_dist})
    assert "freq_bias.obj_baseline.weight" in m2.state_dict()  # SGB's key
    torch.testing.assert_close(m2.freq_bias.obj_baseline.weight.detach(), pred_dist.reshape(-1, C_REL))
    with pytest.raises(ValueError, match="pred_dist"):
        LinkNetPredictor(_config("sgcls"), ROI, statistics={"pred_dist": torch.zeros(3, 3, 3)})


def test_float32_default_dtype_runs():
    torch.manual_seed(0)
    m = LinkNetPredictor(_config("sgdet"), ROI)
    proposals, rel, roi, union = _data(seed=23, grad=False)
    for p in proposals:
        p.bbox = p.bbox.float()
        p.extra_fields["predict_logits"] = p.get_field("predict_logits").float()
    obj, rels, losses = m(proposals, rel, None, None, roi.float(), union.float())
    assert obj[0].dtype == torch.float32 and rels[0].dtype == torch.float32
    assert torch.isfinite(torch.cat(rels)).all() and torch.isfinite(losses["loss_gce"])


# ---------------------------------------------------------------------------------------------
# LinkNetHead's obj_labels (Eq. 10 from given labels), which PredCls uses
# ---------------------------------------------------------------------------------------------
def test_head_obj_labels_override_and_checks():
    torch.manual_seed(24)
    h = LinkNetHead(ROI, C_OBJ, C_REL, embed_dim=8, context_dim=3, hidden=12, union_dim=UNION, geo_dim=6).to(F64)
    g = torch.Generator().manual_seed(25)
    box_batch = torch.tensor([0, 0, 1, 1, 1])
    pairs = sk.all_pairs(box_batch)
    xy = torch.rand(5, 2, generator=g, dtype=F64) * 20
    x = dict(roi_feats=torch.randn(5, ROI, generator=g, dtype=F64), obj_logits=torch.randn(5, C_OBJ, generator=g, dtype=F64),
             context=torch.randn(2, 3, generator=g, dtype=F64), boxes=torch.cat([xy, xy + 5], 1), box_batch=box_batch,
             pairs=pairs, union_feats=torch.randn(pairs.shape[0], UNION, generator=g, dtype=F64))
    labels = torch.tensor([6, 0, 3, 3, 1])
    O4, rl = h(**x, obj_labels=labels)
    O4_o, rl_o = _head_oracle(h, x["roi_feats"], x["obj_logits"], x["context"], x["boxes"], box_batch, pairs,
                              x["union_feats"], labels)
    torch.testing.assert_close(O4, O4_o, rtol=0, atol=1e-8)
    torch.testing.assert_close(rl, rl_o, rtol=0, atol=1e-8)
    _, rl_argmax = h(**x)
    assert not torch.allclose(rl, rl_argmax)  # the labels matter
    with pytest.raises(IndexError, match="obj_labels"):
        h(**x, obj_labels=torch.tensor([0, 1, 2, 7, 0]))
    with pytest.raises(ValueError, match="obj_labels"):
        h(**x, obj_labels=torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="obj_labels"):
        h(**x, obj_labels=labels.float())
    sk.set_checks(False)  # unchecked, an invalid label reads nothing out of bounds (a zero K1 row)
    _, rl_bad = h(**x, obj_labels=torch.tensor([0, 1, 2, 7, 0]))
    assert torch.isfinite(rl_bad).all()


# ---------------------------------------------------------------------------------------------
# Bad inputs and bad configs
# ---------------------------------------------------------------------------------------------
def test_bad_inputs():
    m = _predictor(_config("sgcls"))
    proposals, rel, roi, union = _data(seed=26, grad=False)
    with pytest.raises(ValueError, match="rel_pair_idxs has 3 images but proposals has 4"):
        m(proposals, rel[:3], None, None, roi, union)
    bad = list(rel)
    bad[2] = rel[2].clone()
    bad[2][0, 1] = 4  # image 2 has 4 boxes
    with pytest.raises(IndexError, match="rel_pair_idxs\\[2\\]"):
        m(proposals, bad, None, None, roi, union)
    xywh = BoxList(proposals[0].bbox, (100, 90), mode="xywh")
    xywh.extra_fields = dict(proposals[0].extra_fields)
    with pytest.raises(ValueError, match="convert\\(\"xyxy\"\\)"):
        m([xywh] + proposals[1:], rel, None, None, roi, union)
    with pytest.raises(ValueError, match="roi_features has 9 rows but the proposals hold 10 boxes"):
        m(proposals, rel, None, None, roi[:9], union)
    with pytest.raises(ValueError, match="roi_features"):
        m(proposals, rel, None, None, roi[:, :5], union)
    with pytest.raises(ValueError, match="union_features has 3 rows"):
        m(proposals, rel, None, None, roi, union[:3])
    with pytest.raises(ValueError, match="union_features"):
        m(proposals, rel, None, None, roi, union[:, :4])
    with pytest.raises(ValueError, match="PREDICT_USE_VISION"):
        m(proposals, rel, None, None, roi, None)
    with pytest.raises(ValueError, match="rel_pair_idxs is None"):
        m(proposals, None, None, None, roi, union)
    with pytest.raises(TypeError, match="proposals\\[1\\]"):
        m([proposals[0], "not a BoxList"] + proposals[2:], rel, None, None, roi, union)
    missing = [BoxList(p.bbox, p.size) for p in proposals]
    for p, q in zip(missing, proposals):
        p.add_field("labels", q.get_field("labels"))
    with pytest.raises(ValueError, match="'predict_logits'"):
        m(missing, rel, None, None, roi, union)
    labels = proposals[3].get_field("labels").clone()
    proposals[3].extra_fields["labels"] = torch.tensor([0, C_OBJ])
    with pytest.raises(IndexError, match="labels"):
        m(proposals, rel, None, None, roi, union)
    proposals[3].extra_fields["labels"] = labels
    proposals[0].extra_fields["predict_logits"] = torch.zeros(3, C_OBJ + 1, dtype=F64)
    with pytest.raises(ValueError, match="predict_logits"):
        m(proposals, rel, None, None, roi, union)


def test_bad_configs():
    with pytest.raises(ValueError, match="PREDICT_USE_VISION"):
        LinkNetPredictor(_config(vision=False), ROI)
    with pytest.raises(ValueError, match="GCE_SOURCE"):
        LinkNetPredictor(_config(GCE_SOURCE="rpn"), ROI)
    cfg = _config()
    del cfg.MODEL.ROI_BOX_HEAD.NUM_CLASSES
    with pytest.raises(ValueError, match="MODEL.ROI_BOX_HEAD.NUM_CLASSES"):
        LinkNetPredictor(cfg, ROI)
    cfg = _config()
    cfg.MODEL.ATTRIBUTE_ON = True
    with pytest.raises(NotImplementedError, match="ATTRIBUTE_ON"):
        LinkNetPredictor(cfg, ROI)
    with pytest.raises(ValueError, match="in_channels"):
        LinkNetPredictor(_config(), 0)
    # LinkNet's own keys may be absent: the paper's defaults
    cfg = _config()
    del cfg.MODEL.ROI_RELATION_HEAD.LINKNET
    m = LinkNetPredictor(cfg, ROI)
    assert m.gce_source == "roi_mean" and m.head.geo_dim == 128 and m.head.rem1.r == 2


def test_reexported_from_sgb():
    from sgg_kernels.integrations import sgb

    assert sgb.LinkNetPredictor is LinkNetPredictor
