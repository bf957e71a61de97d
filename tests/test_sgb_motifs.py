"""MotifsPairHead (sgg_kernels/integrations/_sgb_motifs.py): Scene-Graph-Benchmark MotifPredictor's
post-decoding step on the fused sum-form pairwise_edge_fusion.

The oracle is SGB's step written out plainly here (post_emb, view into head/tail, per-image
gathers and concatenation, post_cat, x union or x up_dim(union), rel_compress, frequency bias) on
the same weights, in float64: forward and the gradients of every parameter, of edge_ctx and of
the union features, on every backend of the fusion; use_vision / use_bias off; the up_dim path;
SGB's parameter names, shapes and initialisation; a state_dict round trip from SGB's key names;
from_config; torch.compile(fullgraph=True); no [P, pooling_dim] tensor; bad inputs.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import sgg_kernels as sk
from sgg_kernels.integrations._sgb_motifs import MotifsPairHead
from sgg_kernels.ops import pairs as pair_ops

from helpers import assert_close, require

H, POOL, NUM_OBJ, NUM_REL = 5, 7, 4, 6
NUM_OBJS = [3, 1, 4, 2]  # image 1 has one object (no pairs but a self-pair)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _head(seed=0, union_dim=None, use_vision=True, use_bias=True, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    head = MotifsPairHead(hidden_dim=kw.pop("hidden_dim", H), pooling_dim=kw.pop("pooling_dim", POOL),
                          num_obj_classes=NUM_OBJ, num_rel_classes=NUM_REL, union_dim=union_dim,
                          use_vision=use_vision, use_bias=use_bias, **kw).to(dtype)
    with torch.no_grad():  # SGB's zero biases would hide bias bugs: make every parameter nonzero
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=_gen(seed + 1), dtype=dtype) * 0.3)
    return head


def _inputs(seed=0, union_dim=POOL, num_objs=NUM_OBJS, dtype=torch.float64):
    """edge_ctx [K, H], obj_preds [K], per-image local rel_pair_idxs (every ordered pair, a self-pair
    in image 1, shuffled), union features [P, union_dim] in the packed order."""
    gen = _gen(seed)
    K = sum(num_objs)
    edge_ctx = torch.randn(K, H, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    obj_preds = torch.randint(0, NUM_OBJ, (K,), generator=gen)
    rel_pair_idxs = []
    for n in num_objs:
        local = torch.tensor([(i, j) for i in range(n) for j in range(n) if i != j or n == 1], dtype=torch.int64)
        local = local.reshape(-1, 2)
        rel_pair_idxs.append(local[torch.randperm(local.shape[0], generator=gen)])
    P = sum(r.shape[0] for r in rel_pair_idxs)
    union = torch.randn(P, union_dim, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    return edge_ctx, obj_preds, rel_pair_idxs, union


def _sgb_post_decode(params, edge_ctx, obj_preds, rel_pair_idxs, num_objs, union_features, use_vision, use_bias,
                     up_dim):
    """MotifPredictor.forward after its context layer (roi_relation_predictors.py), written out."""
    h = edge_ctx.shape[1]
    edge_rep = F.linear(edge_ctx, params["post_emb.weight"], params["post_emb.bias"])
    edge_rep = edge_rep.view(edge_rep.size(0), 2, h)
    head_reps = edge_rep[:, 0].contiguous().split(num_objs, dim=0)
    tail_reps = edge_rep[:, 1].contiguous().split(num_objs, dim=0)
    preds = obj_preds.split(num_objs, dim=0)
    prod_reps, pair_preds = [], []
    for pair_idx, head_rep, tail_rep, pred in zip(rel_pair_idxs, head_reps, tail_reps, preds):
        prod_reps.append(torch.cat((head_rep[pair_idx[:, 0]], tail_rep[pair_idx[:, 1]]), dim=-1))
        pair_preds.append(torch.stack((pred[pair_idx[:, 0]], pred[pair_idx[:, 1]]), dim=1))
    prod_rep = F.linear(torch.cat(prod_reps, 0), params["post_cat.weight"], params["post_cat.bias"])
    pair_pred = torch.cat(pair_preds, 0)
    if use_vision:
        if up_dim:
            prod_rep = prod_rep * F.linear(union_features, params["up_dim.weight"], params["up_dim.bias"])
        else:
            prod_rep = prod_rep * union_features
    rel_dists = F.linear(prod_rep, params["rel_compress.weight"], params["rel_compress.bias"])
    if use_bias:
        rel_dists = rel_dists + params["freq_bias.obj_baseline.weight"][pair_pred[:, 0] * NUM_OBJ + pair_pred[:, 1]]
    return rel_dists.split([r.shape[0] for r in rel_pair_idxs], dim=0)


def _close(a, b, what):
    assert a.shape == b.shape, what
    assert_close(a, b, torch.float64, what)


CONFIGS = [  # (use_vision, use_bias, union_dim)
    pytest.param(True, True, None, id="vision-bias"),
    pytest.param(True, True, 3, id="vision-bias-up_dim"),
    pytest.param(True, False, 11, id="vision-up_dim-no-bias"),
    pytest.param(False, True, None, id="no-vision"),
    pytest.param(False, False, 3, id="no-vision-no-bias-up_dim-unused"),
]
BACKENDS = ["reference", "cpu", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_vision,use_bias,union_dim", CONFIGS)
def test_matches_sgb_post_decode(backend, use_vision, use_bias, union_dim):
    if backend != "reference":
        require(pair_ops.KERNELS["pairwise_edge_fusion"], backend, "cpu")
    head = _head(seed=1, union_dim=union_dim, use_vision=use_vision, use_bias=use_bias)
    up = union_dim is not None and union_dim != POOL
    assert hasattr(head, "up_dim") == up
    edge_ctx, obj_preds, rel_pair_idxs, union = _inputs(seed=2, union_dim=union_dim or POOL)
    gen = _gen(3)

    params = {k: v.detach().clone().requires_grad_() for k, v in head.named_parameters()}
    leaves_o = [edge_ctx.detach().clone().requires_grad_(), union.detach().clone().requires_grad_()]
    want = _sgb_post_decode(params, leaves_o[0], obj_preds, rel_pair_idxs, NUM_OBJS, leaves_o[1], use_vision, use_bias, up)
    cots = [torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in want]
    used = [k for k in params if use_vision or not k.startswith("up_dim.")]  # up_dim is idle without vision
    wanted = [params[k] for k in used] + (leaves_o if use_vision else leaves_o[:1])
    grads_o = torch.autograd.grad(want, wanted, cots)

    with sk.use_backend(backend):
        got = head.forward_lists(edge_ctx, obj_preds, rel_pair_idxs, NUM_OBJS, union)
        # the packed interface gives the same logits
        packed = head(edge_ctx, obj_preds, sk.pack_pairs(rel_pair_idxs, NUM_OBJS), union)
        mine = [dict(head.named_parameters())[k] for k in used] + ([edge_ctx, union] if use_vision else [edge_ctx])
        grads = torch.autograd.grad(got, mine, cots)
    assert len(got) == len(want) == len(NUM_OBJS)
    for i, (g, w) in enumerate(zip(got, want)):
        _close(g, w, f"image {i} rel_dists")
    _close(packed, torch.cat(want), "packed rel_dists")
    names = used + (["edge_ctx", "union_features"] if use_vision else ["edge_ctx"])
    assert len(grads) == len(grads_o) == len(names)
    for name, g, w in zip(names, grads, grads_o):
        _close(g, w, f"d {name}")
    if not use_vision:  # SGB ignores the union features then: so does the head (and it accepts None)
        with sk.use_backend(backend):
            _close(head(edge_ctx, obj_preds, sk.pack_pairs(rel_pair_idxs, NUM_OBJS), None), torch.cat(want), "no union")


def test_float32_and_empty_images():
    """float32 (the training dtype) against the float64 oracle; an image without pairs gets a
    [0, num_rel] entry; a batch without pairs gives [0, num_rel] logits and zero gradients."""
    head = _head(seed=4, dtype=torch.float32)
    edge_ctx, obj_preds, rel_pair_idxs, union = _inputs(seed=5, dtype=torch.float32)
    rel_pair_idxs[2] = rel_pair_idxs[2][:0]
    union = union.detach()[: sum(r.shape[0] for r in rel_pair_idxs)].requires_grad_()
    got = head.forward_lists(edge_ctx, obj_preds, rel_pair_idxs, NUM_OBJS, union)
    params = {k: v.detach().double() for k, v in head.named_parameters()}
    want = _sgb_post_decode(params, edge_ctx.detach().double(), obj_preds, rel_pair_idxs, NUM_OBJS,
                            union.detach().double(), True, True, False)
    assert got[2].shape == (0, NUM_REL)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        if w.numel():
            assert_close(g, w, torch.float32, "float32 rel_dists")
    none = head(edge_ctx, obj_preds, torch.zeros(0, 2, dtype=torch.int64), union[:0])
    assert none.shape == (0, NUM_REL)
    none.sum().backward()
    assert torch.equal(edge_ctx.grad, torch.zeros_like(edge_ctx))


# ---------------------------------------------------------------------------------------------
# Parameters: SGB's names, shapes, initialisation; loading SGB state_dicts; from_config
# ---------------------------------------------------------------------------------------------
def _expected_shapes(h, pool, union_dim, use_bias):
    shapes = {
        "post_emb.weight": (2 * h, h), "post_emb.bias": (2 * h,),
        "post_cat.weight": (pool, 2 * h), "post_cat.bias": (pool,),
        "rel_compress.weight": (NUM_REL, pool), "rel_compress.bias": (NUM_REL,),
    }
    if union_dim != pool:
        shapes.update({"up_dim.weight": (pool, union_dim), "up_dim.bias": (pool,)})
    if use_bias:
        shapes["freq_bias.obj_baseline.weight"] = (NUM_OBJ * NUM_OBJ, NUM_REL)
    return shapes


@pytest.mark.parametrize("union_dim,use_bias", [(None, True), (3, True), (3, False)])
def test_state_dict_keys_are_sgbs(union_dim, use_bias):
    head = _head(union_dim=union_dim, use_bias=use_bias)
    want = _expected_shapes(H, POOL, union_dim or POOL, use_bias)
    got = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert got == want


def test_initialisation_is_sgbs():
    """layer_init(post_emb, 10 / sqrt(h), normal=True); xavier_normal (gain 1) for post_cat,
    rel_compress, up_dim; zero biases; freq bias = pred_dist (zeros without it)."""
    h, pool, union_dim = 256, 384, 200
    torch.manual_seed(0)
    pred_dist = torch.randn(NUM_OBJ, NUM_OBJ, NUM_REL)
    head = MotifsPairHead(hidden_dim=h, pooling_dim=pool, num_obj_classes=NUM_OBJ, num_rel_classes=NUM_REL,
                          union_dim=union_dim, pred_dist=pred_dist)
    for name in ("post_emb", "post_cat", "rel_compress", "up_dim"):
        assert torch.equal(getattr(head, name).bias, torch.zeros_like(getattr(head, name).bias)), name

    def std_ok(w, want, what):
        assert abs(w.std().item() / want - 1) < 0.05 and abs(w.mean().item()) < 0.05 * want, what

    std_ok(head.post_emb.weight, 10.0 / h ** 0.5, "post_emb")
    std_ok(head.post_cat.weight, (2.0 / (2 * h + pool)) ** 0.5, "post_cat")
    std_ok(head.up_dim.weight, (2.0 / (union_dim + pool)) ** 0.5, "up_dim")
    rc = head.rel_compress.weight  # only 6 x 384 entries: a looser bound
    assert abs(rc.std().item() / (2.0 / (pool + NUM_REL)) ** 0.5 - 1) < 0.15
    assert torch.equal(head.freq_bias.obj_baseline.weight, pred_dist.reshape(-1, NUM_REL))
    zero = MotifsPairHead(hidden_dim=4, pooling_dim=4, num_obj_classes=NUM_OBJ, num_rel_classes=NUM_REL)
    assert torch.equal(zero.freq_bias.obj_baseline.weight, torch.zeros(NUM_OBJ ** 2, NUM_REL))
    with pytest.raises(ValueError, match="pred_dist"):
        MotifsPairHead(hidden_dim=4, pooling_dim=4, num_obj_classes=NUM_OBJ, num_rel_classes=NUM_REL,
                       pred_dist=torch.zeros(NUM_OBJ, NUM_REL))


def test_load_sgb_state_dict_round_trip():
    """A dict with SGB MotifPredictor's key names (context_layer.* included, under a detector's
    prefix) loads into the head, both through load_sgb_state_dict and through load_state_dict of
    the matching subset; the outputs are then SGB's on those weights."""
    gen = _gen(6)
    union_dim = 3
    shapes = _expected_shapes(H, POOL, union_dim, True)
    sgb = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    sgb.update({"context_layer.obj_embed1.weight": torch.randn(NUM_OBJ, 8, generator=gen, dtype=torch.float64),
                "context_layer.decoder_rnn.input_linearity.weight": torch.randn(4, 4, dtype=torch.float64)})
    prefix = "roi_heads.relation.predictor."
    checkpoint = {prefix + k: v for k, v in sgb.items()}
    checkpoint["roi_heads.box.feature_extractor.fc6.weight"] = torch.zeros(2, 2)

    head = _head(seed=7, union_dim=union_dim)
    unused = head.load_sgb_state_dict(checkpoint, prefix=prefix)
    assert sorted(unused) == sorted(prefix + k for k in sgb if k.startswith("context_layer."))
    for k, v in head.state_dict().items():
        assert torch.equal(v, sgb[k]), k

    head2 = _head(seed=8, union_dim=union_dim)
    head2.load_state_dict({k: v for k, v in sgb.items() if k in head2.state_dict()})
    edge_ctx, obj_preds, rel_pair_idxs, union = _inputs(seed=9, union_dim=union_dim)
    want = _sgb_post_decode(sgb, edge_ctx, obj_preds, rel_pair_idxs, NUM_OBJS, union, True, True, True)
    for h in (head, head2):
        for g, w in zip(h.forward_lists(edge_ctx, obj_preds, rel_pair_idxs, NUM_OBJS, union), want):
            _close(g, w, "after loading")

    missing = {k: v for k, v in checkpoint.items() if not k.endswith("up_dim.weight")}
    with pytest.raises(RuntimeError, match="up_dim.weight"):
        _head(union_dim=union_dim).load_sgb_state_dict(missing, prefix=prefix)


def _cfg(**over):
    rel = dict(CONTEXT_HIDDEN_DIM=H, CONTEXT_POOLING_DIM=POOL, NUM_CLASSES=NUM_REL, PREDICT_USE_VISION=True,
               PREDICT_USE_BIAS=True)
    box = dict(NUM_CLASSES=NUM_OBJ, MLP_HEAD_DIM=3)
    rel.update({k: v for k, v in over.items() if k in rel and k != "NUM_CLASSES"})
    box.update({k: v for k, v in over.items() if k in ("MLP_HEAD_DIM",)})
    return SimpleNamespace(MODEL=SimpleNamespace(ROI_RELATION_HEAD=SimpleNamespace(**rel),
                                                 ROI_BOX_HEAD=SimpleNamespace(**box)))


def test_from_config():
    head = MotifsPairHead.from_config(_cfg())
    assert (head.hidden_dim, head.pooling_dim, head.union_dim, head.num_obj_classes, head.num_rel_classes) == \
        (H, POOL, 3, NUM_OBJ, NUM_REL)
    assert head.use_vision and head.use_bias and hasattr(head, "up_dim")
    same = MotifsPairHead.from_config(_cfg(MLP_HEAD_DIM=POOL, PREDICT_USE_BIAS=False))
    assert not hasattr(same, "up_dim") and not hasattr(same, "freq_bias") and not same.use_bias
    pred_dist = torch.rand(NUM_OBJ, NUM_OBJ, NUM_REL)
    stats = MotifsPairHead.from_config(_cfg(), statistics={"pred_dist": pred_dist})
    assert torch.equal(stats.freq_bias.obj_baseline.weight, pred_dist.reshape(-1, NUM_REL))
    broken = _cfg()
    del broken.MODEL.ROI_RELATION_HEAD.CONTEXT_POOLING_DIM
    with pytest.raises(ValueError, match="CONTEXT_POOLING_DIM"):
        MotifsPairHead.from_config(broken)
    with pytest.raises(ValueError, match="pred_dist"):
        MotifsPairHead.from_config(_cfg(), statistics={"fg_matrix": pred_dist})


# ---------------------------------------------------------------------------------------------
# torch.compile, memory, bad inputs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("union_dim", [None, 3], ids=["same-width", "up_dim"])
def test_compile_fullgraph_matches_eager(union_dim):
    """torch.compile(fullgraph=True) traces the head (the fused op included), forward and backward;
    aot_eager, as tests/test_linknet.py (inductor's C++ codegen is slow on 2 cores)."""
    head = _head(seed=10, union_dim=union_dim, dtype=torch.float32)
    edge_ctx, obj_preds, rel_pair_idxs, union = _inputs(seed=11, union_dim=union_dim or POOL, dtype=torch.float32)
    pairs = sk.pack_pairs(rel_pair_idxs, NUM_OBJS)

    def run(fn):
        for t in [edge_ctx, union] + list(head.parameters()):
            t.grad = None
        out = fn(edge_ctx, obj_preds, pairs, union)
        (out * torch.randn(out.shape, generator=_gen(12))).sum().backward()
        return [out.detach(), edge_ctx.grad, union.grad] + [p.grad for p in head.parameters()]

    eager = run(head)
    torch._dynamo.reset()
    compiled = run(torch.compile(head, fullgraph=True, backend="aot_eager"))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


class _Sizes(TorchDispatchMode):
    """Records the element count of every new tensor an op produces (the ops the autograd engine and
    the module call: the fused op's outputs are seen, its kernels' internal tiles are not)."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            # new memory only: views of an input (detach, split, ...) are not counted
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.numels.append((t.numel(), str(func), tuple(t.shape)))
        return out


def test_no_pair_by_pooling_dim_tensor():
    """With union_dim == pooling_dim the head forms no [P, pooling_dim] tensor, forward or backward,
    but the gradient of union_features itself (an output of the fused op's backward); SGB's
    written-out step forms several."""
    pool, num_objs = 64, [12, 9]
    head = _head(seed=13, pooling_dim=pool, dtype=torch.float32)
    edge_ctx, obj_preds, rel_pair_idxs, union = _inputs(seed=14, union_dim=pool, num_objs=num_objs, dtype=torch.float32)
    P = union.shape[0]
    pairs = sk.pack_pairs(rel_pair_idxs, num_objs)
    with _Sizes() as mode:
        out = head(edge_ctx, obj_preds, pairs, union)
        out.sum().backward()
    big = [r for r in mode.numels if r[0] >= P * pool]
    assert [r[1:] for r in big] == [("sgg_kernels.pairwise_edge_fusion_backward.default", (P, pool))], big
    params = {k: v.detach().requires_grad_() for k, v in head.named_parameters()}
    with _Sizes() as mode:
        want = _sgb_post_decode(params, edge_ctx, obj_preds, rel_pair_idxs, num_objs, union, True, True, False)
        torch.cat(want).sum().backward()
    assert len([r for r in mode.numels if r[0] >= P * pool]) >= 3  # the oracle does form them: the check can fail


def test_bad_inputs():
    head = _head(seed=15, union_dim=3)
    edge_ctx, obj_preds, rel_pair_idxs, union = _inputs(seed=16, union_dim=3)
    pairs = sk.pack_pairs(rel_pair_idxs, NUM_OBJS)
    K = edge_ctx.shape[0]
    bad_obj = obj_preds.clone()
    bad_obj[1] = NUM_OBJ
    far = pairs.clone()
    far[2, 1] = K
    cases = [
        (lambda: head(edge_ctx, obj_preds, far, union), IndexError, "pairs"),
        (lambda: head(edge_ctx, bad_obj, pairs, union), IndexError, "obj_preds"),
        (lambda: head(edge_ctx, obj_preds[:-1], pairs, union), ValueError, "obj_preds"),
        (lambda: head(edge_ctx, obj_preds.int(), pairs, union), TypeError, "obj_preds"),
        (lambda: head(edge_ctx, None, pairs, union), ValueError, "obj_preds"),
        (lambda: head(edge_ctx[:, :-1], obj_preds, pairs, union), ValueError, "edge_ctx"),
        (lambda: head(edge_ctx[0], obj_preds, pairs, union), ValueError, "edge_ctx"),
        (lambda: head(edge_ctx, obj_preds, pairs.float(), union), TypeError, "pairs"),
        (lambda: head(edge_ctx, obj_preds, pairs[:, :1], union), ValueError, "pairs"),
        (lambda: head(edge_ctx, obj_preds, pairs, None), ValueError, "union_features"),
        (lambda: head(edge_ctx, obj_preds, pairs, union[:, :2]), ValueError, "union_features"),
        (lambda: head(edge_ctx, obj_preds, pairs, union[:-1]), ValueError, "union_features"),
        (lambda: head(edge_ctx.float(), obj_preds, pairs, union), ValueError, "edge_ctx"),
        (lambda: head.forward_lists(edge_ctx, obj_preds, rel_pair_idxs, NUM_OBJS[:-1], union), ValueError, "num_objs"),
        (lambda: head.forward_lists(edge_ctx, obj_preds, rel_pair_idxs[:-1], NUM_OBJS[:-1], union), ValueError,
         "edge_ctx"),
        (lambda: head.forward_lists(edge_ctx, obj_preds, [r + 1 for r in rel_pair_idxs], NUM_OBJS, union), IndexError,
         "rel_pair_idxs"),
        (lambda: head.forward_lists(edge_ctx, obj_preds, rel_pair_idxs[0], NUM_OBJS, union), ValueError,
         "rel_pair_idxs"),
        (lambda: MotifsPairHead(hidden_dim=0, pooling_dim=4, num_obj_classes=2, num_rel_classes=2), ValueError,
         "hidden_dim"),
        (lambda: MotifsPairHead(hidden_dim=4, pooling_dim=4, num_obj_classes=2, num_rel_classes=2, use_bias=1),
         ValueError, "use_bias"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
