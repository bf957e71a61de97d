"""LinkNet modules (NeurIPS'18, Sec. 3): shapes, per-image attention, parity with test-side oracles.

The oracles here are written independently of the modules: the relational embedding image by image
with a plain (unmasked) softmax, Eq. 17 from box coordinates, and Eq. 12-14 with G0 materialised
(gather, multiply, concatenate the geometry embedding, one Linear).
"""
import pytest
import torch
import torch.nn.functional as F

import sgg_kernels as sk
from sgg_kernels.models import (
    GeometricLayoutEncoding,
    GlobalContextEncoding,
    LinkNetHead,
    RelationalEmbedding,
    linknet_losses,
)

# Small dims: roi_dim, C_obj, C_rel, embed_dim, context_dim, hidden, union_dim, geo_dim
DIMS = dict(roi_dim=24, num_obj_classes=7, num_rel_classes=5, embed_dim=8, context_dim=10, hidden=12, union_dim=16,
            geo_dim=6)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _boxes(n, gen, dtype=torch.float32):
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 50
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 40 + 2
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


def _head(seed=0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    return LinkNetHead(**{**DIMS, **overrides}).to(dtype)


def _inputs(box_batch, B=None, seed=0, dtype=torch.float32, grad=False, pairs=None):
    """Head inputs for packed boxes with image indices ``box_batch`` (all ordered pairs by default)."""
    gen = _gen(seed)
    box_batch = torch.as_tensor(box_batch, dtype=torch.int64)
    K = box_batch.shape[0]
    B = int(box_batch.max()) + 1 if B is None else B
    pairs = sk.all_pairs(box_batch) if pairs is None else pairs
    P = pairs.shape[0]

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(grad)

    return dict(roi_feats=rnd(K, DIMS["roi_dim"]), obj_logits=rnd(K, DIMS["num_obj_classes"]),
                context=rnd(B, DIMS["context_dim"]), boxes=_boxes(K, gen, dtype), box_batch=box_batch, pairs=pairs,
                union_feats=rnd(P, DIMS["union_dim"]))


# ---------------------------------------------------------------------------------------------
# Test-side oracles
# ---------------------------------------------------------------------------------------------
def _rem_loop(rem, x, box_batch, full=True):
    """Eq. 1-3 image by image: an unmasked row softmax over each image's own boxes."""
    out = torch.empty(x.shape[0], rem.out_dim if full else rem.in_dim, dtype=x.dtype)
    for b in box_batch.unique().tolist():
        idx = (box_batch == b).nonzero().squeeze(1)
        X = x[idx]
        R = torch.softmax((X @ rem.W.weight.T) @ (X @ rem.U.weight.T).T, dim=1)  # Eq. 1
        O1 = X + (R @ (X @ rem.H.weight.T)) @ rem.fc0.weight.T + rem.fc0.bias  # Eq. 2
        out[idx] = O1 @ rem.fc1.weight.T + rem.fc1.bias if full else O1  # Eq. 3
    return out


def _geometry(boxes, pairs):
    """Eq. 17 with box centres, sizes clamped to >= 1e-6."""
    c = (boxes[:, :2] + boxes[:, 2:]) / 2
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp_min(1e-6)
    s, o = pairs[:, 0], pairs[:, 1]
    return torch.cat([(c[o] - c[s]) / wh[s], torch.log(wh[o] / wh[s])], dim=1)


def _head_oracle(m, roi_feats, obj_logits, context, boxes, box_batch, pairs, union_feats):
    """LinkNetHead (train-mode batch norm) with per-image loops and G0 materialised."""
    O0 = torch.cat([roi_feats, torch.softmax(obj_logits, 1) @ m.K0.weight.T, context[box_batch]], dim=1)
    O2 = _rem_loop(m.rem1, O0, box_batch)  # Eq. 1-3
    O3 = _rem_loop(m.rem2, O2, box_batch, full=False)  # Eq. 4-5
    O4 = O3 @ m.rem2.fc1.weight.T + m.rem2.fc1.bias  # Eq. 6
    one_hot = F.one_hot(O4.argmax(1), m.num_obj_classes).to(O4.dtype)  # Eq. 10
    E0 = torch.cat([one_hot @ m.K1.weight, O3], dim=1)  # Eq. 11
    E1 = _rem_loop(m.rem3, E0, box_batch)
    Du = m.union_dim
    G0 = E1[pairs[:, 0], :Du] * E1[pairs[:, 1], Du:] * union_feats  # Eq. 12
    b = F.batch_norm(_geometry(boxes, pairs), None, None, m.geo.norm.weight, m.geo.norm.bias, training=True,
                     eps=m.geo.norm.eps)
    G1 = torch.cat([G0, F.relu(b @ m.geo.fc.weight.T + m.geo.fc.bias)], dim=1)  # Eq. 13
    return O4, G1 @ m.fc4.weight.T + m.fc4.bias  # Eq. 14


# ---------------------------------------------------------------------------------------------
# RelationalEmbedding
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K", [0, 1, 9])
def test_relational_embedding_shapes(K):
    rem = RelationalEmbedding(10, 3, r=2)
    x = torch.randn(K, 10)
    bb = torch.arange(K) % 2
    assert rem(x, bb).shape == (K, 3)
    assert rem.embed(x, bb).shape == (K, 10)
    assert rem.relation(x, bb).shape == (K, K)
    assert rem.W.weight.shape == (5, 10) and rem.W.bias is None and rem.fc0.weight.shape == (10, 5)
    if K:
        torch.testing.assert_close(rem(x, bb), rem.fc1(rem.embed(x, bb)), rtol=0, atol=0)


def test_relational_embedding_matches_per_image_loop():
    """Interleaved (unsorted) images, one of them with a single box; float64, 1e-6."""
    torch.manual_seed(0)
    rem = RelationalEmbedding(14, 6, r=2).double()
    bb = torch.tensor([0, 2, 1, 0, 2, 0, 2, 3, 2])  # image 1 and 3: one box each
    x = torch.randn(9, 14, dtype=torch.float64)
    torch.testing.assert_close(rem(x, bb), _rem_loop(rem, x, bb), rtol=0, atol=1e-6)
    torch.testing.assert_close(rem.embed(x, bb), _rem_loop(rem, x, bb, full=False), rtol=0, atol=1e-6)
    R = rem.relation(x, bb)
    assert (R[bb[:, None] != bb[None, :]] == 0).all()
    torch.testing.assert_close(R.sum(1), torch.ones(9, dtype=torch.float64))


def test_relational_embedding_never_crosses_images():
    torch.manual_seed(1)
    rem = RelationalEmbedding(12, 4, r=3)
    bb = torch.tensor([0, 1, 0, 1, 1, 0])
    x = torch.randn(6, 12)
    out = rem(x, bb)
    img0, img1 = bb == 0, bb == 1
    x_other = x.clone()
    x_other[img1] += torch.randn(int(img1.sum()), 12) * 5
    out_other = rem(x_other, bb)
    assert torch.equal(out_other[img0], out[img0]), "image 1's boxes changed image 0's outputs"
    assert not torch.equal(out_other[img1], out[img1])
    x_same = x.clone()
    x_same[2] += 1.0  # a box of image 0 changes every output of image 0 (through Eq. 1-2)
    out_same = rem(x_same, bb)
    assert (out_same[img0] - out[img0]).abs().amax(dim=1).gt(0).all()
    assert torch.equal(out_same[img1], out[img1])


def test_relational_embedding_bad_inputs():
    rem = RelationalEmbedding(8, 3)
    with pytest.raises(ValueError, match="x"):
        rem(torch.randn(4, 9), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="box_batch"):
        rem(torch.randn(4, 8), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="box_batch"):
        rem(torch.randn(4, 8), torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="in_dim // r"):
        RelationalEmbedding(3, 2, r=4)


# ---------------------------------------------------------------------------------------------
# GlobalContextEncoding
# ---------------------------------------------------------------------------------------------
def test_global_context_encoding_shapes():
    gce = GlobalContextEncoding(10, 7)
    fmap = torch.randn(3, 10, 5, 6)
    c, logits = gce(fmap)
    assert c.shape == (3, 10) and logits.shape == (3, 7)
    torch.testing.assert_close(c, fmap.mean(dim=(2, 3)))
    torch.testing.assert_close(logits, gce.classifier(c))
    with pytest.raises(ValueError, match="feature_map"):
        gce(torch.randn(3, 9, 5, 6))


def test_global_context_loss_literal_vs_default():
    gen = _gen(2)
    logits = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    M = (torch.rand(4, 7, generator=gen) < 0.4).double()
    M[0, 0], M[1, 0] = 1.0, 0.0
    literal = GlobalContextEncoding.loss(logits, M, literal=True)
    default = GlobalContextEncoding.loss(logits, M)
    p = torch.sigmoid(logits)
    # Eq. 9 as printed: -sum_c M_c log M^_c, mean over images
    torch.testing.assert_close(literal, -(M * p.log()).sum() / 4)
    # default: the per-class binary cross-entropy = the printed term + the absent-class term
    torch.testing.assert_close(default, literal - ((1 - M) * (1 - p).log()).sum() / 4)
    torch.testing.assert_close(default, F.binary_cross_entropy_with_logits(logits, M, reduction="sum") / 4)
    # they agree when every class is present ...
    ones = torch.ones_like(M)
    torch.testing.assert_close(GlobalContextEncoding.loss(logits, ones, literal=True),
                               GlobalContextEncoding.loss(logits, ones))
    # ... and the literal loss is minimised by predicting every class (the default is not)
    everything = torch.full_like(logits, 30.0)
    assert GlobalContextEncoding.loss(everything, M, literal=True) < 1e-10
    assert GlobalContextEncoding.loss(everything, M) > 20
    # finite for extreme logits (computed via log-sigmoid)
    assert torch.isfinite(GlobalContextEncoding.loss(torch.full_like(logits, -200.0), M, literal=True))
    torch.testing.assert_close(GlobalContextEncoding.loss(logits, M.bool()), default)  # multi-hot of any dtype
    with pytest.raises(ValueError, match="multilabel_targets"):
        GlobalContextEncoding.loss(logits, M[:, :3])


# ---------------------------------------------------------------------------------------------
# GeometricLayoutEncoding
# ---------------------------------------------------------------------------------------------
def test_geometric_layout_encoding_shapes_and_oracle():
    torch.manual_seed(3)
    geo = GeometricLayoutEncoding(9).double()
    boxes = _boxes(5, _gen(3), torch.float64)
    pairs = sk.all_pairs(torch.zeros(5, dtype=torch.int64))
    out = geo(boxes, pairs)
    assert out.shape == (20, 9)
    b = F.batch_norm(_geometry(boxes, pairs), None, None, geo.norm.weight, geo.norm.bias, training=True)
    torch.testing.assert_close(out, F.relu(b @ geo.fc.weight.T + geo.fc.bias), rtol=0, atol=1e-10)


@pytest.mark.parametrize("P", [0, 1])
@pytest.mark.parametrize("training", [True, False])
def test_geometric_layout_encoding_tiny_batches(P, training):
    """P <= 1 in training uses the running statistics and leaves them unchanged."""
    geo = GeometricLayoutEncoding(5).train(training)
    boxes = _boxes(3, _gen(4))
    pairs = torch.tensor([[0, 1]])[:P]
    running = (geo.norm.running_mean.clone(), geo.norm.running_var.clone())
    out = geo(boxes, pairs)
    assert out.shape == (P, 5) and torch.isfinite(out).all()
    assert torch.equal(geo.norm.running_mean, running[0]) and torch.equal(geo.norm.running_var, running[1])
    if P:
        geo.eval()
        torch.testing.assert_close(out, geo(boxes, pairs), rtol=0, atol=0)


def test_geometric_layout_encoding_degenerate_boxes_finite():
    geo = GeometricLayoutEncoding(4)
    boxes = torch.tensor([[5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 10.0, 0.0], [3.0, 1.0, 3.0, 9.0],
                          [0.0, 0.0, 1e4, 1e4]], requires_grad=True)
    pairs = sk.all_pairs(torch.zeros(5, dtype=torch.int64))
    out = geo(boxes, pairs)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(boxes.grad).all()


# ---------------------------------------------------------------------------------------------
# LinkNetHead
# ---------------------------------------------------------------------------------------------
def test_head_shapes_and_single_box_image():
    m = _head()
    box_batch = [0, 0, 0, 1, 2, 2]  # image 1 has a single box, hence no pairs
    x = _inputs(box_batch)
    assert not (x["pairs"] == 3).any()
    obj, rel = m(**x)
    assert obj.shape == (6, 7) and rel.shape == (8, 5)
    assert torch.isfinite(obj).all() and torch.isfinite(rel).all()


@pytest.mark.parametrize("training", [True, False])
def test_head_empty(training):
    """K = 0 (no boxes), and boxes but P = 0 (every image has a single box)."""
    m = _head().train(training)
    x = _inputs(torch.zeros(0, dtype=torch.int64), B=2)
    obj, rel = m(**x)
    assert obj.shape == (0, 7) and rel.shape == (0, 5)
    x = _inputs([0, 1], grad=True)
    obj, rel = m(**x)
    assert obj.shape == (2, 7) and rel.shape == (0, 5)
    (obj.sum() + rel.sum()).backward()
    assert torch.isfinite(x["roi_feats"].grad).all()


def test_head_matches_eager_oracle_float64():
    m = _head(seed=5, dtype=torch.float64)
    x = _inputs([0, 1, 0, 0, 1, 2, 1, 0], dtype=torch.float64, seed=5)
    obj, rel = m(**x)
    obj_ref, rel_ref = _head_oracle(m, **x)
    torch.testing.assert_close(obj, obj_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(rel, rel_ref, rtol=0, atol=1e-5)


def test_head_gradients_reach_every_parameter():
    """Every parameter gets a finite gradient that is non-zero somewhere.

    (rem2.fc1 = fc3 of Eq. 6 is reached through the object loss only: the argmax of Eq. 10 passes
    no gradient; K1 gets gradient only on the rows of predicted classes.)
    """
    m = _head(seed=6)
    x = _inputs([0, 0, 1, 1, 1, 0], seed=6, grad=True)
    obj, rel = m(**x)
    gen = _gen(7)
    loss = (obj * torch.randn(obj.shape, generator=gen)).sum() + (rel * torch.randn(rel.shape, generator=gen)).sum()
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        assert p.grad.abs().max() > 0, f"{name}: gradient is zero everywhere"
    for name in ("roi_feats", "obj_logits", "context", "union_feats"):
        g = x[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0, name


def test_head_gradients_match_eager_oracle_float64():
    m = _head(seed=8, dtype=torch.float64)
    x = _inputs([0, 1, 1, 0, 1, 0], dtype=torch.float64, seed=8, grad=True)
    leaves = [x["roi_feats"], x["context"], x["union_feats"]] + list(m.parameters())

    def grads(outs):  # the same random cotangents for both runs
        gen = _gen(9)
        loss = sum((o * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum() for o in outs)
        return torch.autograd.grad(loss, leaves)

    for g, g_ref in zip(grads(m(**x)), grads(_head_oracle(m, **x))):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-6)


def test_head_attention_never_crosses_images():
    m = _head(seed=10)
    box_batch = torch.tensor([0, 1, 0, 1, 0, 1, 1])
    x = _inputs(box_batch, seed=10)
    obj, rel = m(**x)
    img0, img1 = box_batch == 0, box_batch == 1
    pair_img0 = img0[x["pairs"][:, 0]]

    other = dict(x)  # change every per-box input of image 1 except its boxes (batch-norm statistics)
    other["roi_feats"] = x["roi_feats"].clone()
    other["roi_feats"][img1] += 3.0
    other["obj_logits"] = x["obj_logits"].clone()
    other["obj_logits"][img1] = -other["obj_logits"][img1]
    other["context"] = x["context"].clone()
    other["context"][1] += 1.0
    other["union_feats"] = x["union_feats"].clone()
    other["union_feats"][~pair_img0] *= 2.0
    obj2, rel2 = m(**other)
    assert torch.equal(obj2[img0], obj[img0]), "image 1 changed image 0's obj_logits"
    assert torch.equal(rel2[pair_img0], rel[pair_img0]), "image 1 changed image 0's rel_logits"
    assert not torch.equal(obj2[img1], obj[img1])

    same = dict(x)
    same["roi_feats"] = x["roi_feats"].clone()
    same["roi_feats"][0] += 3.0  # a box of image 0 changes the other boxes of image 0
    obj3, _ = m(**same)
    assert (obj3[img0] - obj[img0]).abs().amax(dim=1).gt(0).all()
    assert torch.equal(obj3[img1], obj[img1])


def test_head_bad_inputs():
    m = _head()
    x = _inputs([0, 0, 0, 1, 1])
    with pytest.raises(ValueError, match="image"):
        m(**{**x, "pairs": torch.tensor([[0, 1], [2, 3]]), "union_feats": torch.randn(2, 16)})
    with pytest.raises(ValueError, match="union_feats"):
        m(**{**x, "union_feats": torch.randn(x["pairs"].shape[0], 15)})
    with pytest.raises(ValueError, match="union_feats"):
        m(**{**x, "union_feats": torch.randn(x["pairs"].shape[0] + 1, 16)})
    with pytest.raises(IndexError, match="pairs"):
        m(**{**x, "pairs": torch.tensor([[0, 5]]), "union_feats": torch.randn(1, 16)})
    with pytest.raises(ValueError, match="roi_feats"):
        m(**{**x, "roi_feats": torch.randn(5, 23)})
    with pytest.raises(ValueError, match="obj_logits"):
        m(**{**x, "obj_logits": torch.randn(4, 7)})
    with pytest.raises(ValueError, match="obj_logits"):
        m(**{**x, "obj_logits": torch.randn(5, 6)})
    with pytest.raises(ValueError, match="context"):
        m(**{**x, "context": torch.randn(2, 11)})
    with pytest.raises(ValueError, match="boxes"):
        m(**{**x, "boxes": torch.rand(4, 4)})
    with pytest.raises(ValueError, match="box_batch"):
        m(**{**x, "box_batch": torch.tensor([0, 0, 0, 1])})
    with pytest.raises(IndexError, match="box_batch"):
        m(**{**x, "context": torch.randn(1, 10)})  # box_batch holds 1, but B = 1
    # Value checks off: nothing raises or reads out of bounds; invalid pair indices contribute
    # zeros (the ops' contract) and an out-of-range box_batch value a zero context.
    sk.set_checks(False)
    obj, rel = m(**{**x, "pairs": torch.tensor([[0, 1], [2, 3], [0, 9]]), "union_feats": torch.randn(3, 16)})
    assert torch.isfinite(obj).all() and torch.isfinite(rel).all()
    bad = torch.tensor([0, 0, 0, 1, 7])
    obj_bad, _ = m(**{**x, "box_batch": bad, "pairs": x["pairs"][:2], "union_feats": x["union_feats"][:2]})
    # the same as box 4 alone in a third image whose context is zero
    zero_ctx = torch.cat([x["context"], torch.zeros(1, DIMS["context_dim"])])
    obj_zero, _ = m(**{**x, "context": zero_ctx, "box_batch": torch.tensor([0, 0, 0, 1, 2]),
                       "pairs": x["pairs"][:2], "union_feats": x["union_feats"][:2]})
    torch.testing.assert_close(obj_bad, obj_zero, rtol=0, atol=0)


def test_head_check_op_opcheck():
    """The head's value checks are an op (so they run inside compiled graphs): opcheck it."""
    bb = torch.tensor([0, 0, 1, 1, 1])
    for pairs in (sk.all_pairs(bb), sk.all_pairs(bb)[:0]):
        torch.library.opcheck(torch.ops.sgg_kernels.linknet_checked_batch, (bb, pairs, 2))


@pytest.mark.parametrize("backend", [
    "aot_eager",  # checks fullgraph tracing through the custom ops, in ~2 s
    pytest.param("inductor", marks=pytest.mark.slow),  # ~15-25 s of C++ codegen on 2 cores, cold cache
])
def test_head_compile_fullgraph_matches_eager(backend):
    """torch.compile(fullgraph=True) traces the head, custom ops included, forward and backward;
    the index-value checks still run inside the compiled graph."""
    m = _head(seed=11)
    x = _inputs([0, 0, 1, 1, 1], seed=11, grad=True)

    def run(fn):
        for t in (x["roi_feats"], x["union_feats"]):
            t.grad = None
        m.zero_grad(set_to_none=True)
        obj, rel = fn(**x)
        gen = _gen(12)
        loss = (obj * torch.randn(obj.shape, generator=gen)).sum() + (rel * torch.randn(rel.shape, generator=gen)).sum()
        loss.backward()
        grads = [x["roi_feats"].grad, x["union_feats"].grad] + [p.grad for p in m.parameters()]
        return [obj.detach(), rel.detach()] + grads

    eager = run(m)
    torch._dynamo.reset()
    compiled_m = torch.compile(m, fullgraph=True, backend=backend)
    compiled = run(compiled_m)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    cross = x["pairs"].clone()
    cross[0] = torch.tensor([0, 2])  # same shapes (no recompilation), boxes of images 0 and 1
    with pytest.raises(ValueError, match="image"):
        compiled_m(**{**x, "pairs": cross})


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------
def test_linknet_losses():
    gen = _gen(13)
    obj, rel = torch.randn(6, 7, generator=gen), torch.randn(9, 5, generator=gen)
    obj_y, rel_y = torch.randint(0, 7, (6,), generator=gen), torch.randint(0, 5, (9,), generator=gen)
    losses = linknet_losses(obj, obj_y, rel, rel_y)
    assert set(losses) == {"loss_obj_cls", "loss_rel_cls"}
    torch.testing.assert_close(losses["loss_obj_cls"], F.cross_entropy(obj, obj_y))  # Eq. 8
    torch.testing.assert_close(losses["loss_rel_cls"], F.cross_entropy(rel, rel_y))  # Eq. 16
    ml, mt = torch.randn(2, 7, generator=gen), (torch.rand(2, 7, generator=gen) < 0.5).float()
    losses = linknet_losses(obj, obj_y, rel, rel_y, ml, mt)
    torch.testing.assert_close(losses["loss_gce"], GlobalContextEncoding.loss(ml, mt))  # Eq. 9
    empty = linknet_losses(obj[:0], obj_y[:0], rel[:0], rel_y[:0])
    assert all(v.item() == 0 for v in empty.values())
    with pytest.raises(ValueError, match="together"):
        linknet_losses(obj, obj_y, rel, rel_y, multilabel_logits=ml)
    with pytest.raises(ValueError, match="rel_labels"):
        linknet_losses(obj, obj_y, rel, rel_y[:4])
