"""SIL block and network (MM'23, Sec. 3, Eq. 1-9): shapes, gradients, ablation switches, loop oracles,
fused vs reference backend, torch.compile, bad input, the ``sil_block`` benchmark case.

The oracles are written here, independently of the module: Eq. 1-3 with brute-force KNN, a dense
M x C cosine matrix and a loop over clusters; Eq. 4-6 with a loop over images and boxes and plain
Python geometry; Eq. 9 with a gather per head. They use the module's own weights (H', H^a, the
encoder, H'') as plain functions.

Geometry of the hand-made boxes (map 12 x 12, spatial_scale 1/4, so the image is 48 x 48): the 9
centres sit at x, y in {2, 6, 10} (feature-map pixels); centre 4 = (6, 6).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import sgg_kernels as sk
from sgg_kernels import _backend
from sgg_kernels.models.sil import SILBlock, SILNetwork, reference_features

B, D, H, W = 2, 32, 12, 12
SCALE = 0.25
CFG = dict(num_centers=9, heads=2, mlp_hidden=64, encoder_head_dim=8)
WEIGHTINGS = ("distance", "inverse_distance", "uniform", "attention")

# Boxes in image pixels (feature-map pixels x 4). Comments: feature-map box -> centres inside.
BOXES = torch.tensor([
    [0, 0, 28, 28],    # img 0: (0,0)-(7,7)   -> (2,2) (6,2) (2,6) (6,6)
    [20, 20, 44, 44],  # img 0: (5,5)-(11,11) -> (6,6) (10,6) (6,10) (10,10); (6,6) also in box 0
    [12, 12, 20, 20],  # img 1: (3,3)-(5,5)   -> no centre
    [16, 16, 32, 32],  # img 1: (4,4)-(8,8)   -> (6,6) only, exactly at the box centre (d = 0)
    [4, 4, 44, 36],    # img 1: (1,1)-(11,9)  -> 6 centres, (6,6) also in box 3
    [0, 32, 8, 40],    # img 1: (0,8)-(2,10)  -> (2,10), on the box's right edge (closed box)
], dtype=torch.float64)
BOX_BATCH = torch.tensor([0, 0, 1, 1, 1, 1])
IN_BOX = [[0, 1, 3, 4], [4, 5, 7, 8], [], [4], [0, 1, 2, 3, 4, 5], [6]]  # centre indices, row-major


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _block(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return SILBlock(D, **{**CFG, **kw}).to(dtype)


def _map(seed=0, dtype=torch.float64, grad=False, batch=B, height=H, width=W):
    x = torch.randn(batch, D, height, width, generator=_gen(seed), dtype=torch.float64)
    return x.to(dtype).requires_grad_(grad)


def _boxes(dtype=torch.float64):
    return BOXES.to(dtype), BOX_BATCH.clone()


def _cot(shape, seed=99, dtype=torch.float64):
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------------------------------------
# Test-side oracles
# ---------------------------------------------------------------------------------------------
def _centres(per_dim, height=H, width=W):
    return [((i + 0.5) * width / per_dim, (j + 0.5) * height / per_dim) for j in range(per_dim) for i in range(per_dim)]


def _cluster_oracle(block, fmap):
    """Eq. 1-3 (+ H') head by head: brute-force KNN, dense cosine, argmax, loop over clusters."""
    b_, d_, h_, w_ = fmap.shape
    hd, C, M = d_ // block.heads, block.num_centers, h_ * w_
    k = math.ceil(M / C) if block.knn is None else block.knn
    ys, xs = torch.meshgrid(torch.arange(h_, dtype=torch.float64) + 0.5, torch.arange(w_, dtype=torch.float64) + 0.5,
                            indexing="ij")
    pts = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)
    ctr = torch.tensor(_centres(block.per_dim, h_, w_), dtype=torch.float64)
    d2 = ((ctr[:, None] - pts[None]) ** 2).sum(-1)                         # [C, M]
    knn = torch.sort(d2, dim=1, stable=True).indices[:, :k]                 # ties to the lower point index
    pooled = torch.zeros(b_, C, d_, dtype=fmap.dtype)
    assigns, sims, heads_pts = [], [], []
    for b in range(b_):
        for h in range(block.heads):
            F_ = fmap[b, h * hd:(h + 1) * hd].reshape(hd, M).T             # [M, hd]
            Fc = F_[knn].mean(1)                                            # Eq. 1
            cos = F.normalize(F_, dim=1) @ F.normalize(Fc, dim=1).T          # [M, C]
            if block.similarity == "sigmoid":
                cos = torch.sigmoid(block.beta + block.alpha * cos)
            sim, assign = cos.max(1)                                        # Eq. 2 (first maximum)
            for j in range(C):                                              # Eq. 3, before H'
                m = assign == j
                pooled[b, j, h * hd:(h + 1) * hd] = (Fc[j] + (sim[m, None] * F_[m]).sum(0)) / (1 + sim[m].sum())
            assigns.append(assign)
            sims.append(sim)
            heads_pts.append(F_)
    return block.h_prime(pooled), torch.stack(assigns), torch.stack(sims), torch.stack(heads_pts)


def _intra_oracle(block, F_sc, boxes, box_batch, g, scale, height=H, width=W):
    """Eq. 4-6, image by image and box by box."""
    centres = _centres(block.per_dim, height, width)
    F_in = F_sc.clone()
    F_a = []
    for b in range(F_sc.shape[0]):
        for k in range(boxes.shape[0]):
            if int(box_batch[k]) != b:
                continue
            x1, y1, x2, y2 = (float(v) * scale for v in boxes[k])
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            members = [j for j, (x, y) in enumerate(centres) if x1 <= x <= x2 and y1 <= y <= y2]
            dist = {j: math.hypot(centres[j][0] - cx, centres[j][1] - cy) for j in members}
            n = len(members)
            if block.intra_weighting == "uniform" or (block.intra_weighting == "distance" and sum(dist.values()) == 0):
                w = {j: 1 / n for j in members}
            elif block.intra_weighting == "distance":                       # Eq. 5 as printed
                w = {j: dist[j] / sum(dist.values()) for j in members}
            elif block.intra_weighting == "inverse_distance":
                inv = {j: 1 / (dist[j] + 1) for j in members}
                w = {j: inv[j] / sum(inv.values()) for j in members}
            else:                                                           # attention
                logits = [F_sc[b, j] @ g[k] / math.sqrt(F_sc.shape[2]) for j in members]
                w = dict(zip(members, torch.softmax(torch.stack(logits), 0))) if members else {}
            num = g[k] + sum((F_sc[b, j] * w[j] for j in members), torch.zeros_like(g[k]))
            den = 1 + (sum(dist.values()) if block.literal_eq4 else sum(w[j] for j in members))
            fa = block.h_a(num / den)                                       # Eq. 4
            for j in members:                                               # Eq. 6, one box at a time
                F_in[b, j] = F_in[b, j] + fa * w[j]
            F_a.append((k, fa))
    F_a = torch.stack([fa for _, fa in sorted(F_a, key=lambda t: t[0])]) if F_a else F_sc.new_zeros(0, F_sc.shape[2])
    return F_in, F_a


def _dispatch_oracle(block, F_cr, assign, sim, heads_pts, height=H, width=W):
    """Eq. 9 per image and head: F_i + sim_i H''(F^CR)[assign_i] (the head's channels)."""
    out_c = block.h_second(F_cr)
    b_, C, d_ = F_cr.shape
    hd = d_ // block.heads
    out = torch.zeros(b_, d_, height * width, dtype=F_cr.dtype)
    for b in range(b_):
        for h in range(block.heads):
            i = b * block.heads + h
            out[b, h * hd:(h + 1) * hd] = (heads_pts[i] + sim[i, :, None] * out_c[b][assign[i], h * hd:(h + 1) * hd]).T
    return out.reshape(b_, d_, height, width)


# ---------------------------------------------------------------------------------------------
# Shapes and the whole forward against the oracles
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, dict(similarity="sigmoid", intra_weighting="attention", literal_eq4=True)],
                         ids=["default", "sigmoid-attention-literal"])
def test_forward_matches_loop_oracle(kw):
    block = _block(1, **kw).eval()
    fmap = _map(1)
    boxes, box_batch = _boxes()
    with torch.no_grad():
        out = block(fmap, boxes, box_batch, SCALE)
        F_sc, assign, sim, pts = _cluster_oracle(block, fmap)
        g = reference_features(fmap, boxes, box_batch, SCALE)
        F_in, _ = _intra_oracle(block, F_sc, boxes, box_batch, g, SCALE)
        expected = _dispatch_oracle(block, block.encoder(F_in), assign, sim, pts)
        # the steps one by one
        c_sc, c_assign, c_sim, c_pts = block.cluster(fmap)
    assert out.shape == (B, D, H, W) and out.dtype == torch.float64 and out.is_contiguous()
    torch.testing.assert_close(c_sc, F_sc, rtol=1e-10, atol=1e-10)
    assert torch.equal(c_assign, assign)
    torch.testing.assert_close(c_sim, sim, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c_pts, pts, rtol=0, atol=0)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert (assign.unsqueeze(-1) == torch.arange(9)).any(1).sum() > 9  # several clusters per head in use


def test_reference_features_default():
    """g_k = the mean of sk.roi_align(feature_map, boxes, box_batch, 7, scale, 2, aligned=True)."""
    fmap = _map(2)
    boxes, box_batch = _boxes()
    g = reference_features(fmap, boxes, box_batch, SCALE)
    expected = sk.roi_align(fmap, boxes, box_batch, 7, SCALE, 2, True).mean((2, 3))
    assert g.shape == (6, D)
    torch.testing.assert_close(g, expected, rtol=0, atol=0)
    block = _block(2).eval()
    with torch.no_grad():
        torch.testing.assert_close(block(fmap, boxes, box_batch, SCALE), block(fmap, boxes, box_batch, SCALE, g))
        assert not torch.allclose(block(fmap, boxes, box_batch, SCALE), block(fmap, boxes, box_batch, SCALE, g + 1))


# ---------------------------------------------------------------------------------------------
# Intra-entity interaction (Eq. 4-6): the vectorised module against the loop oracle
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("literal", [False, True], ids=["mean-eq4", "literal-eq4"])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_intra_matches_loop_oracle(weighting, literal):
    block = _block(3, intra_weighting=weighting, literal_eq4=literal)
    gen = _gen(3)
    F_sc = torch.randn(B, 9, D, generator=gen, dtype=torch.float64).requires_grad_(True)
    g = torch.randn(6, D, generator=gen, dtype=torch.float64).requires_grad_(True)
    boxes, box_batch = _boxes()
    inside, w, _ = block.intra_weights(F_sc, boxes, box_batch, g, SCALE, (H, W))
    assert [torch.nonzero(r).flatten().tolist() for r in inside] == IN_BOX  # the hand-made geometry holds
    F_in, F_a = block.intra(F_sc, boxes, box_batch, g, SCALE, (H, W))
    exp_in, exp_a = _intra_oracle(block, F_sc, boxes, box_batch, g, SCALE)
    torch.testing.assert_close(F_in, exp_in, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(F_a, exp_a, rtol=1e-12, atol=1e-12)
    # the box with no centre: F^a = H^a(g), and it changes no centre
    torch.testing.assert_close(F_a[2], block.h_a(g[2]), rtol=1e-12, atol=1e-12)
    # a centre in no box keeps F^SC; centre 4 of image 0 (in boxes 0 and 1) gets both contributions
    torch.testing.assert_close(F_in[0, 2], F_sc[0, 2], rtol=0, atol=0)
    both = F_sc[0, 4] + w[0, 4] * F_a[0] + w[1, 4] * F_a[1]
    torch.testing.assert_close(F_in[0, 4], both, rtol=1e-12, atol=1e-12)
    # gradients too
    cot = _cot(F_in.shape, 4)
    grads = torch.autograd.grad((F_in * cot).sum(), [F_sc, g] + list(block.h_a.parameters()))
    exp_grads = torch.autograd.grad((exp_in * cot).sum(), [F_sc, g] + list(block.h_a.parameters()))
    for a, e in zip(grads, exp_grads):
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-11)


def test_intra_weights_per_mode():
    """Eq. 5 by mode: rows sum to 1 (0 for the empty box); uniform = 1/C_k (the ablation);
    distance ∝ d (Eq. 5 as printed); inverse_distance: far centres get lower weight (the text)."""
    gen = _gen(5)
    F_sc = torch.randn(B, 9, D, generator=gen, dtype=torch.float64)
    g = torch.randn(6, D, generator=gen, dtype=torch.float64)
    boxes, box_batch = _boxes()
    weights = {}
    for mode in WEIGHTINGS:
        inside, w, dist = _block(5, intra_weighting=mode).intra_weights(F_sc, boxes, box_batch, g, SCALE, (H, W))
        weights[mode] = w
        assert (w[~inside] == 0).all()
        torch.testing.assert_close(w.sum(1), torch.tensor([1.0, 1, 0, 1, 1, 1], dtype=torch.float64))
    counts = inside.sum(1, keepdim=True).double()
    torch.testing.assert_close(weights["uniform"], inside / counts.clamp_min(1))
    row = 4  # six centres at different distances from the box centre (6, 5)
    sel = inside[row]
    d, wd, wi = dist[row][sel], weights["distance"][row][sel], weights["inverse_distance"][row][sel]
    torch.testing.assert_close(wd, d / d.sum())
    order = torch.argsort(d)
    assert (wi[order].diff() <= 0).all() and wi[order][0] > wi[order][-1]   # far -> low
    assert (wd[order].diff() >= 0).all() and wd[order][0] < wd[order][-1]   # Eq. 5 printed: far -> high
    torch.testing.assert_close(weights["distance"][3, 4], torch.tensor(1.0, dtype=torch.float64))  # d = 0: uniform


# ---------------------------------------------------------------------------------------------
# Ablation switches (Table 4)
# ---------------------------------------------------------------------------------------------
def _spy(monkeypatch, block, name):
    seen = []
    original = getattr(block, name)

    def spy(*args, **kwargs):
        seen.append(args)
        return original(*args, **kwargs)
    monkeypatch.setattr(block, name, spy)
    return seen


def test_no_intra_gives_f_in_equal_f_sc(monkeypatch):
    block = _block(6, use_intra=False).eval()
    assert block.h_a is None and not any(n.startswith("h_a") for n, _ in block.named_parameters())
    fmap = _map(6)
    boxes, box_batch = _boxes()
    seen = _spy(monkeypatch, block, "cross")
    with torch.no_grad():
        out = block(fmap, boxes, box_batch, SCALE)
        F_sc = block.cluster(fmap)[0]
    torch.testing.assert_close(seen[0][0], F_sc, rtol=0, atol=0)     # F^IN = F^SC
    # the boxes no longer matter; with IEI they do
    with torch.no_grad():
        moved = block(fmap, boxes[[1, 0, 4, 3, 2, 5]] * 0.9, box_batch, SCALE)
        full = _block(6).eval()
        full_a = full(fmap, boxes, box_batch, SCALE)
        full_b = full(fmap, boxes[[1, 0, 4, 3, 2, 5]] * 0.9, box_batch, SCALE)
    torch.testing.assert_close(out, moved, rtol=0, atol=0)
    assert not torch.allclose(full_a, full_b)


def test_no_cross_gives_f_cr_equal_f_in(monkeypatch):
    block = _block(7, use_cross=False).eval()
    assert block.encoder is None and not any(n.startswith("encoder") for n, _ in block.named_parameters())
    fmap = _map(7)
    boxes, box_batch = _boxes()
    seen = _spy(monkeypatch, block, "dispatch")
    with torch.no_grad():
        out = block(fmap, boxes, box_batch, SCALE)
        F_sc, assign, sim, pts = block.cluster(fmap)
        F_in, _ = block.intra(F_sc, boxes, box_batch, reference_features(fmap, boxes, box_batch, SCALE), SCALE, (H, W))
    torch.testing.assert_close(seen[0][0], F_in, rtol=0, atol=0)     # F^CR = F^IN
    torch.testing.assert_close(out, _dispatch_oracle(block, F_in, assign, sim, pts), rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # with CEI the same weights give another output
        full = _block(7).eval()
        full.load_state_dict(block.state_dict(), strict=False)
        assert not torch.allclose(full(fmap, boxes, box_batch, SCALE), out)


def test_uniform_weighting_changes_the_output():
    fmap = _map(8)
    boxes, box_batch = _boxes()
    weighted, uniform = _block(8).eval(), _block(8, intra_weighting="uniform").eval()
    uniform.load_state_dict(weighted.state_dict())
    with torch.no_grad():
        a, b = weighted(fmap, boxes, box_batch, SCALE), uniform(fmap, boxes, box_batch, SCALE)
    assert not torch.allclose(a, b)
    # ... only through the intra-entity weights: with no boxes they agree
    with torch.no_grad():
        torch.testing.assert_close(weighted(fmap, boxes[:0], box_batch[:0], SCALE),
                                   uniform(fmap, boxes[:0], box_batch[:0], SCALE), rtol=0, atol=0)


def test_zero_boxes_equals_no_intra():
    block = _block(9).eval()
    no_intra = _block(9, use_intra=False).eval()
    missing, unexpected = no_intra.load_state_dict(block.state_dict(), strict=False)
    assert not missing and sorted(unexpected) == ["h_a.bias", "h_a.weight"]
    fmap = _map(9, grad=True)
    boxes, box_batch = _boxes()
    out = block(fmap, boxes[:0], box_batch[:0], SCALE)
    assert out.shape == (B, D, H, W)
    torch.testing.assert_close(out, no_intra(fmap, boxes, box_batch, SCALE), rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    assert torch.isfinite(fmap.grad).all() and fmap.grad.abs().sum() > 0
    # a box with no centre changes nothing either (it contributes to no centre)
    with torch.no_grad():
        torch.testing.assert_close(block(fmap, boxes[2:3], box_batch[2:3], SCALE), out, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Gradients, modes, determinism
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    {},
    dict(similarity="sigmoid", intra_weighting="attention"),
    dict(intra_weighting="distance", literal_eq4=True),
    dict(use_cross=False, intra_weighting="uniform"),
    dict(use_intra=False, knn=5),
], ids=["default", "sigmoid-attention", "distance-literal", "no-cross", "no-intra"])
def test_gradients_reach_every_parameter(kw):
    block = _block(10, dtype=torch.float32, **kw)
    fmap = _map(10, torch.float32, grad=True)
    boxes, box_batch = _boxes(torch.float32)
    out = block(fmap, boxes, box_batch, SCALE)
    assert out.shape == (B, D, H, W) and out.dtype == torch.float32
    (out * _cot(out.shape, dtype=torch.float32)).sum().backward()
    params = dict(block.named_parameters())
    assert ("alpha" in params) == (kw.get("similarity") == "sigmoid")
    for name, p in params.items():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{name}: gradient zero everywhere"
    assert fmap.grad.abs().sum() > 0


def test_eval_is_deterministic_train_drops_out():
    block = _block(11, dtype=torch.float32, dropout=0.5)
    fmap = _map(11, torch.float32)
    boxes, box_batch = _boxes(torch.float32)
    with torch.no_grad():
        block.eval()
        a, b = block(fmap, boxes, box_batch, SCALE), block(fmap, boxes, box_batch, SCALE)
        block.train()
        c, d = block(fmap, boxes, box_batch, SCALE), block(fmap, boxes, box_batch, SCALE)
    assert torch.equal(a, b)
    assert not torch.allclose(c, d)   # the encoder's dropout is on in training


def test_knn_index_is_cached_per_geometry():
    block = _block(12).eval()
    boxes, box_batch = _boxes()
    with torch.no_grad():
        block(_map(12), boxes, box_batch, SCALE)
        block(_map(13), boxes, box_batch, SCALE)
        assert len(block._knn_cache) == 1
        block(_map(14, height=8, width=10), boxes, box_batch, SCALE)
    assert len(block._knn_cache) == 2
    cached = block._knn_cache[(8, 10, math.ceil(80 / 9), "cpu")]
    expected = sk.knn_index(sk.grid_points(8, 10), sk.grid_centers(8, 10, 3), math.ceil(80 / 9))
    assert torch.equal(cached, expected)
    assert "_knn_cache" not in str(block.state_dict().keys())


@pytest.mark.parametrize("kw", [{}, dict(similarity="sigmoid", intra_weighting="attention")],
                         ids=["default", "sigmoid-attention"])
def test_fused_matches_reference_backend(kw):
    """The block on the compiled ops vs the same block with every op (forward and backward) on the
    pure-PyTorch reference, float64: output and every gradient."""
    block = _block(14, **kw).eval()  # no dropout: both runs compute the same function
    boxes, box_batch = _boxes()

    def run(backend):
        fmap = _map(14, grad=True)
        block.zero_grad(set_to_none=True)
        with sk.use_backend(backend):
            out = block(fmap, boxes, box_batch, SCALE)
            (out * _cot(out.shape)).sum().backward()
        return [out.detach(), fmap.grad] + [p.grad for p in block.parameters()]

    fused, reference = run(None), run("reference")
    assert len(fused) == 2 + len(list(block.parameters()))
    for a, e in zip(fused, reference):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [
    "aot_eager",  # fullgraph tracing through the custom ops, forward and backward, in a few seconds
    pytest.param("inductor", marks=pytest.mark.slow),  # C++ codegen: ~10-30 s on 2 cores, cold cache
])
def test_block_compile_fullgraph_matches_eager(backend):
    block = _block(15, dtype=torch.float32, similarity="sigmoid", dropout=0.0)  # train mode, no randomness
    fmap = _map(15, torch.float32, grad=True)
    boxes, box_batch = _boxes(torch.float32)

    def run(fn):
        fmap.grad = None
        block.zero_grad(set_to_none=True)
        out = fn(fmap, boxes, box_batch, SCALE)
        (out * _cot(out.shape, dtype=torch.float32)).sum().backward()
        return [out.detach(), fmap.grad] + [p.grad for p in block.parameters()]

    torch._dynamo.reset()
    compiled_block = torch.compile(block, fullgraph=True, backend=backend)
    compiled = run(compiled_block)
    assert not block._knn_cache  # inside the graph the knn index comes from the op, not the cache
    eager = run(block)
    tol = 1e-5 if backend == "aot_eager" else 2e-4
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)
    bad = box_batch.clone()
    bad[0] = 7  # same shapes (no recompilation): the value check runs inside the compiled graph
    with pytest.raises(ValueError, match="box_batch"):
        compiled_block(fmap, boxes, bad, SCALE)


# ---------------------------------------------------------------------------------------------
# SILNetwork (Sec. 3.5)
# ---------------------------------------------------------------------------------------------
def test_network_stacks_blocks_sharing_reference_features():
    torch.manual_seed(16)
    net = SILNetwork(D, 2, **CFG, similarity="sigmoid").double().eval()
    assert len(net.blocks) == 2
    fmap = _map(16, grad=True)
    boxes, box_batch = _boxes()
    out = net(fmap, boxes, box_batch, SCALE)
    assert out.shape == (B, D, H, W)
    with torch.no_grad():  # g_k from the input (backbone) map, shared by both blocks
        g = reference_features(fmap, boxes, box_batch, SCALE)
        chained = net.blocks[1](net.blocks[0](fmap, boxes, box_batch, SCALE, g), boxes, box_batch, SCALE, g)
        torch.testing.assert_close(out, chained, rtol=1e-12, atol=1e-12)
        # (no_grad in eval: the encoder's fused fast path, equal up to rounding)
        torch.testing.assert_close(net(fmap, boxes, box_batch, SCALE, g), out, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(net(fmap, boxes[:0], box_batch[:0], SCALE), out)
    (out * _cot(out.shape)).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert net(fmap, boxes[:0], box_batch[:0], SCALE).shape == (B, D, H, W)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(num_centers=10), "num_centers"),
    (dict(heads=3), "heads"),
    (dict(encoder_head_dim=12), "encoder_head_dim"),
    (dict(similarity="dot"), "similarity"),
    (dict(intra_weighting="distances"), "intra_weighting"),
    (dict(knn=0), "knn"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        SILBlock(D, **{**CFG, **kw})


def test_bad_network_depth():
    with pytest.raises(ValueError, match="depth"):
        SILNetwork(D, 0, **CFG)


def test_bad_inputs():
    block = _block(17)
    fmap = _map(17)
    boxes, box_batch = _boxes()
    g = torch.zeros(6, D, dtype=torch.float64)
    cases = [
        ((fmap[0], boxes, box_batch, SCALE), ValueError, "feature_map"),
        ((fmap[:, :16], boxes, box_batch, SCALE), ValueError, "feature_map"),
        ((fmap, boxes[:, :3], box_batch, SCALE), ValueError, "boxes"),
        ((fmap, boxes[0], box_batch, SCALE), ValueError, "boxes"),
        ((fmap, boxes, box_batch[:5], SCALE), ValueError, "box_batch"),
        ((fmap, boxes, box_batch[None], SCALE), ValueError, "box_batch"),
        ((fmap, boxes, box_batch.double(), SCALE), TypeError, "box_batch"),
        ((fmap, boxes, box_batch, SCALE, g[:5]), ValueError, "ref_feats"),
        ((fmap, boxes, box_batch, SCALE, g[:, :8]), ValueError, "ref_feats"),
        ((fmap, boxes, box_batch, SCALE, g[0]), ValueError, "ref_feats"),
        ((fmap, boxes, torch.tensor([0, 0, 1, 1, 1, 2]), SCALE), ValueError, "box_batch"),
        ((fmap, boxes, torch.tensor([0, 0, 1, -1, 1, 1]), SCALE), ValueError, "box_batch"),
        ((fmap, boxes, box_batch, 0.0), ValueError, "spatial_scale"),
        ((fmap, boxes, box_batch, -0.25), ValueError, "spatial_scale"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            block(*args)
    with pytest.raises(ValueError, match="knn"):
        _block(17, knn=50)(_map(17, height=6, width=8), boxes, box_batch, SCALE)


def test_box_of_no_image_with_checks_off_touches_nothing():
    block = _block(18).eval()
    fmap = _map(18)
    boxes, box_batch = _boxes()
    bad = box_batch.clone()
    bad[1] = 5
    sk.set_checks(False)
    with torch.no_grad():
        out = block(fmap, boxes, bad, SCALE)
        keep = [0, 2, 3, 4, 5]
        expected = block(fmap, boxes[keep], box_batch[keep], SCALE)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The sil_block benchmark case
# ---------------------------------------------------------------------------------------------
def test_bench_case_reference_runs_on_reference_backend(monkeypatch):
    """``sil_block``: fused and reference give the same output and feature-map gradient, and the
    reference impl's backward ops run on the reference backend too (not only its forward)."""
    from sgg_kernels.bench import registry

    case = registry.get_cases(["sil_block"])[0]
    assert case.family == "cluster" and set(case.sizes) == {"small", "mid", "paper", "sgdet"}
    inputs = case.prepare("small", "cpu")
    assert not inputs["block"].training
    chosen = []
    select = _backend.Kernels.select
    monkeypatch.setattr(_backend.Kernels, "select", lambda self, dt: chosen.append(select(self, dt)) or chosen[-1])

    def run(fn):
        chosen.clear()
        (out,) = fn(**inputs)
        (grad,) = torch.autograd.grad(out, inputs["feature_map"], _cot(out.shape, dtype=out.dtype))
        return out, grad, set(chosen)

    out_f, grad_f, used_f = run(case.fused)
    out_r, grad_r, used_r = run(case.reference)
    assert used_f == {"cpu"} and used_r == {"reference"}
    assert len(chosen) >= 8  # forward and backward ops
    torch.testing.assert_close(out_f, out_r, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_f, grad_r, rtol=1e-4, atol=1e-4)


def test_check_op_opcheck():
    """The box_batch value check is an op (so it runs inside compiled graphs): opcheck it."""
    for box_batch in (BOX_BATCH, BOX_BATCH[:0]):
        torch.library.opcheck(torch.ops.sgg_kernels.sil_checked_batch, (box_batch, 2))
