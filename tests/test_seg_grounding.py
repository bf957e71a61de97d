"""Segmentation-grounded SGG modules (ICCV'21, Sec. 2.3-2.6): shapes, hand-made cases, eager oracles.

The oracles are written here, independently of the modules and of the fused op: the Gaussian pair
masks gather each pair's masks, convolve them pair by pair with grouped ``F.conv2d`` (kernels from
``sgg_kernels.reference.masks.gaussian_kernels`` applied to the head's output computed from its
weights), resample them into the union box with ``F.grid_sample`` when asked, multiply, sigmoid.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import sgg_kernels as sk
from sgg_kernels.models.seg_grounding import (
    EdgeGrounding,
    GaussianPairMasks,
    MaskRefinement,
    MaskTransfer,
    ObjectGrounding,
)
from sgg_kernels.reference import masks as ref


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _boxes(n, gen, dtype=torch.float64):
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 40
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 30 + 3
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


def _pairs(K, gen, P=None):
    """All ordered pairs of K objects (a shuffled subset of P of them when given)."""
    idx = torch.arange(K)
    pairs = torch.cartesian_prod(idx, idx)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    if P is not None:
        pairs = pairs[torch.randperm(pairs.shape[0], generator=gen)[:P]]
    return pairs


def _pair_inputs(K=5, C=3, m=6, P=None, seed=0, dtype=torch.float64, grad=False):
    gen = _gen(seed)
    masks = torch.rand(K, C, m, m, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(grad)
    label_scores = torch.softmax(torch.randn(K, C + 1, generator=gen, dtype=torch.float64) * 2, 1)
    label_scores = label_scores.to(dtype).requires_grad_(grad)
    return masks, label_scores, _pairs(K, gen, P), _boxes(K, gen, dtype)


def _randomise(module, seed, scale=0.5):
    """Non-trivial parameters (the modules start with zeros in places)."""
    gen = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)
    return module


# ---------------------------------------------------------------------------------------------
# Test-side oracle of GaussianPairMasks
# ---------------------------------------------------------------------------------------------
def _smooth_pairwise(x, kernels):
    """Each pair's [C, m, m] masks cross-correlated with its own kernel: one grouped conv2d per pair."""
    C = x.shape[1]
    d = kernels.shape[-1]
    return torch.cat([F.conv2d(x[p:p + 1], kernels[p].expand(C, 1, d, d), padding=d // 2, groups=C)
                      for p in range(x.shape[0])]) if x.shape[0] else x.clone()


def _to_union(x, own, union, R):
    """Bilinear resampling of [P, C, m, m] masks in the frames of ``own`` boxes into ``union`` boxes,
    border-clamped, zero outside the own box (the op's documented sampling), via grid_sample."""
    steps = (torch.arange(R, dtype=x.dtype) + 0.5) / R
    X = union[:, 0, None] + steps * (union[:, 2] - union[:, 0])[:, None]  # [P, R] image x
    Y = union[:, 1, None] + steps * (union[:, 3] - union[:, 1])[:, None]
    gx = 2 * (X - own[:, 0, None]) / (own[:, 2] - own[:, 0])[:, None] - 1  # grid_sample's [-1, 1]
    gy = 2 * (Y - own[:, 1, None]) / (own[:, 3] - own[:, 1])[:, None] - 1
    grid = torch.stack([gx[:, None, :].expand(-1, R, -1), gy[:, :, None].expand(-1, -1, R)], dim=-1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside_x = (X >= own[:, 0, None]) & (X <= own[:, 2, None])
    inside_y = (Y >= own[:, 1, None]) & (Y <= own[:, 3, None])
    return out * (inside_y[:, :, None] & inside_x[:, None, :])[:, None].to(x.dtype)


def _pair_masks_oracle(module, masks, label_scores, pairs, boxes=None, out_size=None):
    W, b = module.variance_net.weight, module.variance_net.bias
    d = module.kernel_size
    s, o = pairs[:, 0], pairs[:, 1]
    if module.per == "pair":
        params = (torch.cat([label_scores[s], label_scores[o]], dim=1) @ W.T + b).reshape(-1, 2, 3)
        ks, ko = ref.gaussian_kernels(params[:, 0], d), ref.gaussian_kernels(params[:, 1], d)
    else:
        k = ref.gaussian_kernels(label_scores @ W.T + b, d)
        ks, ko = k[s], k[o]
    ss, so = _smooth_pairwise(masks[s], ks), _smooth_pairwise(masks[o], ko)  # K (*) m, Eq. 6
    if boxes is not None:
        union = torch.cat([torch.minimum(boxes[s, :2], boxes[o, :2]), torch.maximum(boxes[s, 2:], boxes[o, 2:])], 1)
        ss, so = _to_union(ss, boxes[s], union, out_size), _to_union(so, boxes[o], union, out_size)
    return torch.sigmoid(ss * so)  # product (Eq. 6), then the sigmoid


# ---------------------------------------------------------------------------------------------
# MaskTransfer (Eq. 3-4)
# ---------------------------------------------------------------------------------------------
# Source embeddings = identity, so the dot products of Eq. 3 are the target rows themselves.
_SRC = torch.eye(3, dtype=torch.float64)
_TGT = torch.tensor([[0.0, 0.0, -10.0], [math.log(6), math.log(3), 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)


@pytest.mark.parametrize("threshold, expected", [
    # row 0: softmax (1/2, 1/2, 2e-5) -> the tiny entry is cut; row 1: (0.6, 0.3, 0.1) all kept;
    # row 2: uniform (1/3 each) all kept
    (0.05, [[0.5, 0.5, 0.0], [0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3]]),
    # row 1: 0.1 cut, (0.6, 0.3) renormalised by 0.9; row 2: every entry is the row's largest, kept
    (0.2, [[0.5, 0.5, 0.0], [2 / 3, 1 / 3, 0.0], [1 / 3, 1 / 3, 1 / 3]]),
    # row 0: both halves under 0.55 but they are the row's largest: kept
    (0.55, [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]]),
    (0.0, None),  # no cut: the plain row-softmax
])
def test_mask_transfer_similarity_threshold_and_renormalisation(threshold, expected):
    S = MaskTransfer.similarity_from_embeddings(_TGT, _SRC, threshold)
    if expected is None:
        expected = torch.softmax(_TGT, dim=1)
    torch.testing.assert_close(S, torch.as_tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(S.sum(1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    m = MaskTransfer(target_embeddings=_TGT, source_embeddings=_SRC, threshold=threshold)
    torch.testing.assert_close(m.similarity, S, rtol=0, atol=0)


@pytest.mark.parametrize("shared", [{1: 2, 0: 0}, torch.tensor([0, 2, -1])])
def test_mask_transfer_shared_classes_copied_exactly(shared):
    m = MaskTransfer(target_embeddings=_TGT, source_embeddings=_SRC, shared=shared)
    S = m.similarity
    assert torch.equal(S[0], torch.tensor([1.0, 0, 0], dtype=torch.float64))
    assert torch.equal(S[1], torch.tensor([0.0, 0, 1], dtype=torch.float64))
    torch.testing.assert_close(S[2], torch.full((3,), 1 / 3, dtype=torch.float64))  # not shared: mixed
    logits = torch.randn(4, 3, 5, 5, generator=_gen(1), dtype=torch.float64)
    labels = torch.tensor([1, 0, 2, 1])
    own = m(logits, labels)
    every = m(logits)
    assert own.shape == (4, 5, 5) and every.shape == (4, 3, 5, 5)
    # shared classes: exactly the source class's mask, in both forms
    assert torch.equal(own[0], torch.sigmoid(logits[0, 2])) and torch.equal(own[1], torch.sigmoid(logits[1, 0]))
    probs = torch.sigmoid(logits)  # (one sigmoid call: a strided slice may take another vector path)
    assert torch.equal(every[:, 1], probs[:, 2]) and torch.equal(every[:, 0], probs[:, 0])


def test_mask_transfer_forward_oracle_and_buffer():
    gen = _gen(2)
    S = torch.rand(6, 4, generator=gen, dtype=torch.float64)
    S = S / S.sum(1, keepdim=True)
    m = MaskTransfer(S)
    assert m.num_target_classes == 6 and m.num_source_classes == 4
    assert [n for n, _ in m.named_buffers()] == ["similarity"] and not list(m.parameters())
    assert "similarity" in m.state_dict()
    torch.testing.assert_close(m.similarity, S, rtol=0, atol=0)  # a given S is used as is
    logits = torch.randn(5, 4, 7, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([5, 0, 3, 3, 1])
    every = m(logits)
    expected = (S[None, :, :, None, None] * torch.sigmoid(logits)[:, None]).sum(2)  # Eq. 4, every class
    torch.testing.assert_close(every, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(m(logits, labels), every[torch.arange(5), labels], rtol=0, atol=1e-12)
    assert every.min() >= 0 and every.max() <= 1
    every.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() > 0
    # K = 0, and the buffer follows .to()
    assert m(logits[:0]).shape == (0, 6, 7, 7) and m(logits[:0], labels[:0]).shape == (0, 7, 7)
    m32 = MaskTransfer(S).float()
    assert m32.similarity.dtype == torch.float32
    assert m32(logits.detach().float()).dtype == torch.float32


def test_mask_transfer_bad_inputs():
    with pytest.raises(ValueError, match="not both"):
        MaskTransfer(torch.rand(3, 3), target_embeddings=_TGT, source_embeddings=_SRC)
    with pytest.raises(ValueError, match="not neither"):
        MaskTransfer()
    with pytest.raises(ValueError, match="source_embeddings"):
        MaskTransfer(target_embeddings=_TGT)
    with pytest.raises(ValueError, match="source_embeddings"):
        MaskTransfer(target_embeddings=_TGT, source_embeddings=torch.eye(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="threshold"):
        MaskTransfer(target_embeddings=_TGT, source_embeddings=_SRC, threshold=1.0)
    with pytest.raises(ValueError, match="similarity"):
        MaskTransfer(torch.rand(3))
    with pytest.raises(ValueError, match="shared"):
        MaskTransfer(torch.rand(3, 2), shared={0: 2})  # source class out of range
    with pytest.raises(ValueError, match="shared"):
        MaskTransfer(torch.rand(3, 2), shared={3: 0})  # target class out of range
    with pytest.raises(ValueError, match="shared"):
        MaskTransfer(torch.rand(3, 2), shared=torch.tensor([0, -1]))  # not d_g entries
    with pytest.raises(TypeError, match="shared"):
        MaskTransfer(torch.rand(3, 2), shared=[0, 1, -1])
    m = MaskTransfer(torch.rand(3, 2))
    with pytest.raises(ValueError, match="mask_logits"):
        m(torch.randn(4, 3, 5, 5))  # d_m = 3, expected 2
    with pytest.raises(ValueError, match="mask_logits"):
        m(torch.randn(4, 2, 5))
    with pytest.raises(ValueError, match="labels"):
        m(torch.randn(4, 2, 5, 5), torch.tensor([0, 1]))
    with pytest.raises(IndexError, match="labels"):
        m(torch.randn(4, 2, 5, 5), torch.tensor([0, 1, 2, 3]))


# ---------------------------------------------------------------------------------------------
# GaussianPairMasks (Eq. 6)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per", ["pair", "object"])
@pytest.mark.parametrize("frame", ["own", "union"])
@pytest.mark.parametrize("K, P", [(5, None), (4, 0), (0, 0), (1, 0)])
def test_pair_masks_shapes_and_range(per, frame, K, P):
    module = GaussianPairMasks(3, kernel_size=5, per=per)
    masks, scores, pairs, boxes = _pair_inputs(K=K, P=P, dtype=torch.float32)
    kw = dict(boxes=boxes, out_size=9) if frame == "union" else {}
    out = module(masks, scores, pairs, **kw)
    side = 9 if frame == "union" else 6
    assert out.shape == (pairs.shape[0], 3, side, side) and out.dtype == torch.float32
    # masks in [0, 1] and kernels summing to 1: the product is in [0, 1], its sigmoid in [1/2, sigmoid(1)]
    assert ((out >= 0.5) & (out <= torch.sigmoid(torch.tensor(1.0)) + 1e-6)).all()
    raw = GaussianPairMasks(3, kernel_size=5, per=per, sigmoid=False)(masks, scores, pairs, **kw)
    assert ((raw >= 0) & (raw <= 1 + 1e-6)).all()
    torch.testing.assert_close(torch.sigmoid(raw), out)


def test_pair_masks_initial_kernels_are_unit_gaussians():
    """Zero weight, bias (0, 0, 0): every kernel is the isotropic sigma = 1 Gaussian, whatever the scores."""
    masks, scores, pairs, _ = _pair_inputs(K=4, C=2)
    u = torch.arange(7, dtype=torch.float64) - 3
    g = torch.exp(-(u[:, None] ** 2 + u[None, :] ** 2) / 2)
    g = g / g.sum()
    for per, shape in (("pair", (pairs.shape[0], 2, 7, 7)), ("object", (4, 7, 7))):
        module = GaussianPairMasks(2, per=per).double()
        assert torch.equal(module.variance_net.weight, torch.zeros_like(module.variance_net.weight))
        k = module.kernels(scores, pairs)
        assert k.shape == shape
        torch.testing.assert_close(k, g.expand(shape), rtol=0, atol=1e-12)
    module = GaussianPairMasks(2, per="object", init_sigma=2.0).double()
    module.reset_parameters()  # the float64 bias of init_sigma = 2 (log 4 is not exact in float32)
    k = module.kernels(scores, pairs)
    g2 = torch.exp(-(u[:, None] ** 2 + u[None, :] ** 2) / 8)
    torch.testing.assert_close(k[0], g2 / g2.sum(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("per", ["pair", "object"])
@pytest.mark.parametrize("frame", ["own", "union"])
def test_pair_masks_match_eager_oracle_float64(per, frame):
    """Forward and the gradients w.r.t. masks, label_scores and the head's parameters."""
    module = _randomise(GaussianPairMasks(3, kernel_size=5, per=per).double(), seed=3)
    masks, scores, pairs, boxes = _pair_inputs(K=5, C=3, m=6, seed=4, grad=True)
    pairs = torch.cat([pairs, torch.tensor([[2, 2]])])  # an object paired with itself too
    kw = dict(boxes=boxes, out_size=8) if frame == "union" else {}
    out = module(masks, scores, pairs, **kw)
    expected = _pair_masks_oracle(module, masks, scores, pairs, **kw)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)

    leaves = [masks, scores] + list(module.parameters())
    cot = torch.randn(out.shape, generator=_gen(5), dtype=torch.float64)
    grads = torch.autograd.grad((out * cot).sum(), leaves)
    grads_ref = torch.autograd.grad((expected * cot).sum(), leaves)
    for name, g, g_ref in zip(["masks", "label_scores", "weight", "bias"], grads, grads_ref):
        assert g.abs().max() > 0, name
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10, msg=name)


def test_pair_masks_single_channel_and_zero_init_gradients():
    """C = 1 (each object's own-class mask) is accepted; from the zero init every parameter and the
    masks get gradients (label_scores too once the weight is non-zero)."""
    module = GaussianPairMasks(4, kernel_size=3).double()
    masks, scores, pairs, _ = _pair_inputs(K=4, C=4, m=5, seed=6, grad=True)
    own = masks[:, :1].detach().requires_grad_(True)
    out = module(own, scores, pairs)
    assert out.shape == (pairs.shape[0], 1, 5, 5)
    (out * torch.randn(out.shape, generator=_gen(7), dtype=torch.float64)).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    assert own.grad.abs().max() > 0


def test_pair_masks_bad_inputs():
    with pytest.raises(ValueError, match="kernel_size"):
        GaussianPairMasks(3, kernel_size=6)
    with pytest.raises(ValueError, match="kernel_size"):
        GaussianPairMasks(3, kernel_size=0)
    with pytest.raises(ValueError, match="per"):
        GaussianPairMasks(3, per="image")
    with pytest.raises(ValueError, match="num_classes"):
        GaussianPairMasks(0)
    with pytest.raises(ValueError, match="init_sigma"):
        GaussianPairMasks(3, init_sigma=0.0)
    module = GaussianPairMasks(3, kernel_size=5)
    masks, scores, pairs, boxes = _pair_inputs(K=4, C=3, dtype=torch.float32)
    with pytest.raises(ValueError, match="label_scores"):
        module(masks, scores[:, :3], pairs)  # num_classes columns, background missing
    with pytest.raises(ValueError, match="label_scores"):
        module(masks, scores[:3], pairs)
    with pytest.raises(ValueError, match="masks"):
        module(masks[:, :2], scores, pairs)  # C = 2: neither num_classes nor 1
    with pytest.raises(ValueError, match="masks"):
        module(masks[..., :5], scores, pairs)  # not square
    with pytest.raises(ValueError, match="masks"):
        module(masks[0], scores, pairs)
    with pytest.raises(ValueError, match="pairs"):
        module(masks, scores, torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="pairs"):
        module(masks, scores, pairs.int())
    with pytest.raises(ValueError, match="out_size"):
        module(masks, scores, pairs, boxes=boxes)
    with pytest.raises(ValueError, match="boxes"):
        module(masks, scores, pairs, boxes=boxes[:3], out_size=7)
    with pytest.raises(IndexError, match="pairs"):
        module(masks, scores, torch.tensor([[0, 4]]))
    # value checks off: nothing reads out of bounds; an invalid pair gets product 0 (sigmoid 1/2)
    sk.set_checks(False)
    bad = torch.tensor([[0, 1], [0, 4], [-1, 2]])
    out = module(masks, scores, bad)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1:], torch.full_like(out[1:], 0.5))
    torch.testing.assert_close(out[:1], module(masks, scores, bad[:1]))


@pytest.mark.parametrize("backend", [
    "aot_eager",  # traces the registered pair_mask_conv op (forward and backward) with fullgraph
    pytest.param("inductor", marks=pytest.mark.slow),  # C++ codegen: tens of seconds on 2 cores
])
@pytest.mark.parametrize("frame", ["own", "union"])
def test_pair_masks_compile_fullgraph_matches_eager(backend, frame):
    module = _randomise(GaussianPairMasks(3, kernel_size=5), seed=8, scale=0.3)
    masks, scores, pairs, boxes = _pair_inputs(K=4, C=3, m=6, seed=9, dtype=torch.float32, grad=True)
    kw = dict(boxes=boxes, out_size=7) if frame == "union" else {}
    cot = torch.randn(pairs.shape[0], 3, 7 if kw else 6, 7 if kw else 6, generator=_gen(10))

    def run(fn):
        masks.grad = scores.grad = None
        module.zero_grad(set_to_none=True)
        out = fn(masks, scores, pairs, **kw)
        (out * cot).sum().backward()
        return [out.detach(), masks.grad, scores.grad] + [p.grad for p in module.parameters()]

    eager = run(module)
    torch._dynamo.reset()
    compiled_module = torch.compile(module, fullgraph=True, backend=backend)
    compiled = run(compiled_module)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(IndexError, match="pairs"):  # the value check runs inside the compiled graph
        compiled_module(masks, scores, torch.full_like(pairs, 9), **kw)


# ---------------------------------------------------------------------------------------------
# ObjectGrounding (Eq. 5) and EdgeGrounding (Eq. 7)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [ObjectGrounding, EdgeGrounding])
@pytest.mark.parametrize("K", [0, 3])
def test_grounding_shapes_oracle_and_gradients(cls, K):
    torch.manual_seed(11)
    module = cls(6, 4).double()
    assert module.conv.weight.shape == (6, 10, 3, 3)
    gen = _gen(12)
    feats = torch.randn(K, 6, 7, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    masks = torch.rand(K, 4, 7, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    out = module(feats, masks)
    assert out.shape == (K, 6, 7, 7)
    expected = F.conv2d(torch.cat([feats, masks], 1), module.conv.weight, module.conv.bias, padding=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)  # Eq. 5 / Eq. 7
    if K:
        (out * torch.randn(out.shape, generator=gen, dtype=torch.float64)).sum().backward()
        for name, t in [("feats", feats), ("masks", masks)] + list(module.named_parameters()):
            assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().max() > 0, name
    wide = cls(6, 1, out_channels=9, kernel_size=5)
    assert wide(feats.detach().float(), masks.detach()[:, :1].float()).shape == (K, 9, 7, 7)


@pytest.mark.parametrize("cls, feats_name, masks_name", [(ObjectGrounding, "roi_feats", "masks"),
                                                         (EdgeGrounding, "union_feats", "pair_masks")])
def test_grounding_bad_inputs(cls, feats_name, masks_name):
    module = cls(6, 4)
    feats, masks = torch.randn(3, 6, 7, 7), torch.rand(3, 4, 7, 7)
    with pytest.raises(ValueError, match=feats_name):
        module(torch.randn(3, 5, 7, 7), masks)
    with pytest.raises(ValueError, match=masks_name):
        module(feats, torch.rand(3, 3, 7, 7))
    with pytest.raises(ValueError, match=masks_name):
        module(feats, torch.rand(2, 4, 7, 7))
    with pytest.raises(ValueError, match=masks_name):
        module(feats, torch.rand(3, 4, 14, 14))  # another grid: resample first
    with pytest.raises(ValueError, match=feats_name):
        module(torch.randn(3, 6 * 49), masks)
    with pytest.raises(ValueError, match="kernel_size"):
        cls(6, 4, kernel_size=2)
    with pytest.raises(ValueError, match="mask_channels"):
        cls(6, 0)


# ---------------------------------------------------------------------------------------------
# MaskRefinement (Eq. 8-10)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("context_rank", [2, 4])
def test_mask_refinement_starts_as_identity(context_rank):
    module = MaskRefinement(5, 3, hidden=8).double()
    gen = _gen(13)
    masks = torch.rand(4, 3, 6, 6, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    context = torch.randn((4, 5) + ((6, 6) if context_rank == 4 else ()), generator=gen, dtype=torch.float64)
    torch.testing.assert_close(module(masks, context), masks, rtol=0, atol=1e-12)  # Eq. 9, f_M' = 0
    logits = torch.randn(4, 3, 6, 6, generator=gen, dtype=torch.float64)
    assert torch.equal(module(logits, context, logits=True), logits)  # Eq. 8 on logits
    assert module(masks[:0], context[:0]).shape == (0, 3, 6, 6)
    # extreme masks stay finite and in [0, 1] (clamped before the logit)
    hard = torch.zeros(4, 3, 6, 6, dtype=torch.float64)
    hard[:, :, 2:4] = 1
    out = module(hard, context)
    assert torch.isfinite(out).all() and (out - hard).abs().max() < 1e-5


def test_mask_refinement_gradients_reach_every_parameter():
    module = MaskRefinement(5, 3, hidden=8, num_convs=2).double()
    gen = _gen(14)
    masks = torch.rand(4, 3, 6, 6, generator=gen, dtype=torch.float64)
    context = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = (torch.rand(4, 6, 6, generator=gen) > 0.5).double()
    labels = torch.tensor([0, 2, 1, 2])
    MaskRefinement.loss(module(masks, context), targets, labels).backward()
    # at initialisation only the zero-initialised predictor is reached (the others sit behind its zeros)
    for name, p in module.named_parameters():
        assert p.grad is not None, name
        assert (p.grad.abs().max() > 0) == name.startswith("predictor"), name
    _randomise(module, seed=15, scale=0.3)
    module.zero_grad()
    context.grad = None
    refined = module(masks, context)
    assert (refined - masks).abs().max() > 1e-3  # a non-zero residual changes the masks ...
    assert refined.min() >= 0 and refined.max() <= 1  # ... and keeps them in [0, 1]
    MaskRefinement.loss(refined, targets, labels).backward()
    for name, p in module.named_parameters():
        assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    assert context.grad.abs().max() > 0


def test_mask_refinement_loss_is_pixelwise_bce():
    probs = torch.tensor([[[[0.9, 0.2], [0.6, 0.1]], [[0.3, 0.7], [0.5, 0.5]]],
                          [[[0.1, 0.1], [0.1, 0.1]], [[0.8, 0.4], [0.2, 0.95]]]], dtype=torch.float64)
    targets = torch.tensor([[[1, 0], [1, 0]], [[1, 1], [0, 1]]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    picked = torch.stack([probs[0, 0], probs[1, 1]])
    expected = F.binary_cross_entropy(picked, targets)  # mean over the K m m pixels
    hand = -(targets * picked.log() + (1 - targets) * (1 - picked).log()).mean()
    torch.testing.assert_close(expected, hand)
    torch.testing.assert_close(MaskRefinement.loss(probs, targets, labels), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(MaskRefinement.loss(probs, targets.bool(), labels), expected, rtol=0, atol=1e-12)
    logits = torch.log(probs) - torch.log1p(-probs)
    torch.testing.assert_close(MaskRefinement.loss(logits, targets, labels, logits=True), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(MaskRefinement.loss(probs[:, :1], targets), F.binary_cross_entropy(probs[:, 0], targets))
    assert MaskRefinement.loss(probs[:0], targets[:0], labels[:0]).item() == 0
    with pytest.raises(ValueError, match="labels"):
        MaskRefinement.loss(probs, targets)  # C = 2 needs labels
    with pytest.raises(ValueError, match="targets"):
        MaskRefinement.loss(probs, targets[:, :1], labels)
    with pytest.raises(IndexError, match="labels"):
        MaskRefinement.loss(probs, targets, torch.tensor([0, 2]))


def test_mask_refinement_bad_inputs():
    module = MaskRefinement(5, 3, hidden=8)
    masks = torch.rand(4, 3, 6, 6)
    with pytest.raises(ValueError, match="masks"):
        module(torch.rand(4, 2, 6, 6), torch.randn(4, 5))
    with pytest.raises(ValueError, match="context"):
        module(masks, torch.randn(4, 6))
    with pytest.raises(ValueError, match="context"):
        module(masks, torch.randn(3, 5))
    with pytest.raises(ValueError, match="context"):
        module(masks, torch.randn(4, 5, 7, 7))
    with pytest.raises(ValueError, match="context"):
        module(masks, torch.randn(4, 5, 6))
    with pytest.raises(ValueError, match="num_convs"):
        MaskRefinement(5, 3, num_convs=-1)
    assert MaskRefinement(5, 3, num_convs=0)(masks, torch.randn(4, 5)).shape == (4, 3, 6, 6)


# ---------------------------------------------------------------------------------------------
# The pieces together (Sec. 2.3-2.6)
# ---------------------------------------------------------------------------------------------
def test_pipeline_end_to_end():
    """Eq. 4 -> Eq. 9 -> Eq. 5, and Eq. 6 in the union frame -> Eq. 7; gradients reach every module."""
    torch.manual_seed(16)
    d_g, d_m, m, D, R = 5, 3, 6, 4, 7
    gen = _gen(16)
    transfer = MaskTransfer(target_embeddings=torch.randn(d_g, 8, generator=gen),
                            source_embeddings=torch.randn(d_m, 8, generator=gen), shared={0: 1})
    refine = _randomise(MaskRefinement(D, d_g, hidden=8), seed=17, scale=0.2)
    ground_obj, ground_edge = ObjectGrounding(D, d_g), EdgeGrounding(D, d_g)
    pair_masks = _randomise(GaussianPairMasks(d_g, kernel_size=3), seed=18, scale=0.2)
    K = 4
    mask_logits = torch.randn(K, d_m, m, m, generator=gen, requires_grad=True)
    roi_feats = torch.randn(K, D, m, m, generator=gen, requires_grad=True)
    context = torch.randn(K, D, generator=gen)
    scores = torch.softmax(torch.randn(K, d_g + 1, generator=gen), 1)
    boxes = _boxes(K, gen, torch.float32)
    pairs = _pairs(K, gen)
    union_feats = torch.randn(pairs.shape[0], D, R, R, generator=gen)

    masks = refine(transfer(mask_logits), context)  # Eq. 4, Eq. 9
    z_hat = ground_obj(roi_feats, masks)  # Eq. 5
    z_pair = ground_edge(union_feats, pair_masks(masks, scores, pairs, boxes, out_size=R))  # Eq. 6-7
    assert z_hat.shape == (K, D, m, m) and z_pair.shape == (pairs.shape[0], D, R, R)
    (z_hat.square().mean() + z_pair.square().mean()).backward()
    for mod in (refine, ground_obj, ground_edge, pair_masks):
        for name, p in mod.named_parameters():
            assert p.grad is not None and p.grad.abs().max() > 0, f"{type(mod).__name__}.{name}"
    assert mask_logits.grad.abs().max() > 0 and roi_feats.grad.abs().max() > 0
