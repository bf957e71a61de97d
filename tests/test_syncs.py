"""Host syncs: at most one per op call with value checks on, none with ``sk.set_checks(False)``.

A host sync is Python reading a device value: ``.item()``, ``.tolist()``, ``bool``/``int``/``float``
of a tensor, ``nonzero``, ``unique``, boolean-mask indexing. On the CPU nothing waits, but the same
Python runs for CUDA tensors, so counting those calls here counts the syncs a GPU run would make
(the compiled kernels themselves never read device values back on the host). No sync with checks
off is what lets a training step be captured in a CUDA graph; the GPU test of the capture itself
is at the end (it skips visibly without a GPU).
"""
import contextlib

import pytest
import torch

import sgg_kernels as sk
from sgg_kernels.models import LinkNetHead, SILBlock

from helpers import HAS_CUDA

_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "unique")


@contextlib.contextmanager
def count_syncs():
    """Count the device-value reads of the block (a list: its length is the count, entries name them)."""
    seen = []
    saved = {name: getattr(torch.Tensor, name) for name in _METHODS}
    saved_getitem = torch.Tensor.__getitem__
    saved_fns = {name: getattr(torch, name) for name in ("nonzero", "unique")}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            seen.append(name)
            return fn(*args, **kwargs)
        return counted

    def getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            seen.append("boolean-mask indexing")
        return saved_getitem(self, index)

    try:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, wrap(name, fn))
        for name, fn in saved_fns.items():
            setattr(torch, name, wrap(f"torch.{name}", fn))
        torch.Tensor.__getitem__ = getitem
        yield seen
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        for name, fn in saved_fns.items():
            setattr(torch, name, fn)
        torch.Tensor.__getitem__ = saved_getitem


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _scene(K=(5, 3), D=16, size=64, seed=0):
    """Two images with K boxes each, all ordered pairs, an FPN of 3 levels, per-object features."""
    g = _gen(seed)
    n = sum(K)
    xy = torch.rand(n, 2, generator=g) * size * 0.6
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * size * 0.3 + 2], 1)
    box_batch = torch.repeat_interleave(torch.arange(len(K)), torch.tensor(K))
    pairs = sk.all_pairs(box_batch)
    fpn = [torch.randn(len(K), D, size // s, size // s, generator=g) for s in (4, 8, 16)]
    return boxes, box_batch, pairs, fpn


def _op_calls():
    boxes, box_batch, pairs, fpn = _scene()
    K, P, D = boxes.shape[0], pairs.shape[0], 16
    g = _gen(1)
    feats = torch.randn(2, 40, D, generator=g)
    centers = torch.randn(2, 6, D, generator=g)
    assign, sim = sk.cosine_assign(feats, centers)
    masks = torch.rand(K, 1, 12, 12, generator=g)
    return {
        "union_boxes": lambda: sk.union_boxes(boxes, pairs),
        "pair_geometry": lambda: sk.pair_geometry(boxes, pairs),
        "roi_align": lambda: sk.roi_align(fpn[0], boxes, box_batch, 3, 0.25),
        "union_roi_align (3 FPN levels)": lambda: sk.union_roi_align(fpn, boxes, box_batch, pairs, 3, [0.25, 0.125, 0.0625]),
        "pairwise_edge_fusion": lambda: sk.pairwise_edge_fusion(
            torch.randn(K, D, generator=g), torch.randn(K, D, generator=g), torch.randn(P, D, generator=g), pairs,
            torch.randn(7, D, generator=g), torch.randn(7, generator=g)),
        "pair_mask_conv": lambda: sk.pair_mask_conv(masks, pairs, sk.gaussian_kernels(torch.randn(K, 3, generator=g) * 0.1, 5)),
        "cluster_aggregate": lambda: sk.cluster_aggregate(feats, assign, sim, centers),
        "cluster_dispatch": lambda: sk.cluster_dispatch(centers, assign, sim, feats),
        "gather_mean": lambda: sk.gather_mean(feats, torch.randint(0, 40, (2, 6, 4), generator=g)),
        "superpixel_cluster": lambda: sk.superpixel_cluster(feats, centers),
        "prototype_distance": lambda: sk.prototype_distance(feats[0], centers[0]),
    }


OPS = list(_op_calls())


@pytest.mark.parametrize("op", OPS)
def test_one_sync_per_op_with_checks_on_and_none_off(op):
    call = _op_calls()[op]
    call()  # warm up (first calls may import and cache)
    with count_syncs() as seen:
        call()
    assert len(seen) <= 1, f"{op} synchronises the host {len(seen)} times with checks on: {seen}"
    sk.set_checks(False)
    with count_syncs() as seen:
        call()
    assert not seen, f"{op} synchronises the host with checks off: {seen}"


def _linknet_step(device="cpu"):
    torch.manual_seed(0)
    head = LinkNetHead(roi_dim=24, num_obj_classes=7, num_rel_classes=5, embed_dim=8, context_dim=10, hidden=12,
                       union_dim=16, geo_dim=6).to(device)
    boxes, box_batch, pairs, _ = _scene()
    K, P = boxes.shape[0], pairs.shape[0]
    g = _gen(2)
    args = [torch.randn(K, 24, generator=g), torch.randn(K, 7, generator=g), torch.randn(2, 10, generator=g),
            boxes, box_batch, pairs, torch.randn(P, 16, generator=g)]
    args = [a.to(device) for a in args]
    args[0].requires_grad_()

    def step():
        out = head(*args)
        outs = out.values() if isinstance(out, dict) else (out if isinstance(out, tuple) else (out,))
        sum(v.float().sum() for v in outs if v.is_floating_point() and v.requires_grad).backward()
    return step, list(head.parameters()) + [args[0]]


def _sil_step(device="cpu"):
    torch.manual_seed(0)
    block = SILBlock(32, num_centers=9, heads=2, mlp_hidden=64, encoder_head_dim=8, similarity="sigmoid").to(device)
    boxes, box_batch, _, _ = _scene(size=48)
    boxes, box_batch = boxes.to(device), box_batch.to(device)
    fmap = torch.randn(2, 32, 12, 16, generator=_gen(3)).to(device).requires_grad_()

    def step():
        out = block(fmap, boxes, box_batch, 0.25)
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.sum() for o in outs if o.is_floating_point() and o.requires_grad).backward()
    return step, list(block.parameters()) + [fmap]


STEPS = [pytest.param(_linknet_step, id="LinkNetHead"), pytest.param(_sil_step, id="SILBlock")]


@pytest.mark.parametrize("make_step", STEPS)
def test_training_step_without_syncs_when_checks_off(make_step):
    step, _ = make_step()
    step()
    with count_syncs() as seen:
        step()
    assert seen, "the counter saw no sync with checks on: it would not catch one with checks off either"
    sk.set_checks(False)
    with count_syncs() as seen:
        step()
    assert not seen, f"a training step synchronises the host with checks off: {seen}"


def _module_forwards():
    """A forward of every module whose ops check index values: (name, call)."""
    from sgg_kernels.models import RDE, GaussianPairMasks, SILNetwork

    linknet, _ = _linknet_step()
    sil, _ = _sil_step()
    torch.manual_seed(0)
    g = _gen(4)
    net = SILNetwork(32, depth=2, num_centers=9, heads=2, mlp_hidden=64, encoder_head_dim=8)
    boxes, box_batch, pairs, _ = _scene(size=48)
    fmap = torch.randn(2, 32, 12, 16, generator=g)
    rde = RDE(16, 5, 7, num_blocks=1, classifier=torch.nn.Linear(16, 5))
    feats, labels = torch.randn(9, 16, generator=g), torch.randint(0, 5, (9,), generator=g)
    subj, obj = torch.randint(0, 7, (9,), generator=g), torch.randint(0, 7, (9,), generator=g)
    shuffle = torch.randperm(9, generator=g)
    masks_mod = GaussianPairMasks(3, kernel_size=5, per="object")
    K = boxes.shape[0]
    masks, scores = torch.rand(K, 3, 6, 6, generator=g), torch.randn(K, 4, generator=g)
    return {
        "LinkNetHead": linknet,
        "SILBlock": sil,
        "SILNetwork": lambda: net(fmap, boxes, box_batch, 0.25),
        "RDE": lambda: rde(feats, labels, subj, obj, shuffle),
        "GaussianPairMasks (union frame)": lambda: masks_mod(masks, scores, pairs, boxes=boxes, out_size=9),
    }


@pytest.mark.parametrize("module", list(_module_forwards()))
def test_module_checks_its_inputs_once_per_forward(module):
    """With checks on, a module's forward (and backward, where there is one) syncs the host once:
    its own fused value check of every packed input, the ops inside skip theirs."""
    call = _module_forwards()[module]
    call()
    with count_syncs() as seen:
        call()
    assert len(seen) == 1, f"{module} synchronises the host {len(seen)} times per forward with checks on: {seen}"


def _zero(leaves):
    for t in leaves:
        if t.grad is not None:
            t.grad.zero_()


@pytest.mark.cuda
@pytest.mark.parametrize("make_step", STEPS)
def test_cuda_graph_capture_with_checks_off(make_step):
    """Forward + backward captured in one CUDA graph and replayed: the gradients equal an eager step's."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU (CUDA graph capture)")
    sk.set_checks(False)
    step, leaves = make_step("cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up: compile the Triton kernels, allocate .grad
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    _zero(leaves)
    with torch.cuda.graph(graph):
        step()
    _zero(leaves)
    graph.replay()
    torch.cuda.synchronize()
    replayed = [t.grad.clone() for t in leaves if t.grad is not None]
    _zero(leaves)
    step()
    eager = [t.grad.clone() for t in leaves if t.grad is not None]
    assert len(replayed) == len(eager) > 0
    for i, (r, e) in enumerate(zip(replayed, eager)):
        torch.testing.assert_close(r, e, rtol=1e-5, atol=1e-6, msg=f"gradient {i} after graph replay")
