"""Benchmark case of a whole SGDet relation head step (Scene-Graph-Benchmark's Motifs head; family ``pairs``).

``relation_head``: SGB's union branch (``RelationFeatureExtractor``: the union box of every pair
RoIAligned from all 4 FPN levels, concatenated, ``reduce_channel`` 3x3 conv + ReLU; the 2-channel
rectangle masks through ``rect_conv``; their sum; fc6 12,544 -> 4,096 + ReLU; fc7 + ReLU) followed by
the Motifs pair step (``post_emb`` of the edge context into head / tail reps, ``post_cat`` of
(head[s], tail[o]), times the union features, ``rel_compress``, plus the frequency bias of the pair's
predicted labels). The object context (Motifs' LSTMs) is not part of it: ``edge_ctx [K, hidden]`` and
``obj_preds [K]`` are inputs.

Impls (the same weights: every parameter is one input tensor that both read):

- ``fused``: :class:`sgg_kernels.integrations._sgb_union.UnionFeatureExtractor` (whole-batch
  BatchNorm statistics, then the ``UnionHead`` Function: pairs grouped by image, reduce_channel
  folded into the FPN levels where it is cheaper, chunks of 256, only fc6's activation and the
  output kept for the backward) then
  :class:`sgg_kernels.integrations._sgb_motifs.MotifsPairHead` (``pairwise_edge_fusion`` in its
  "sum" form: post_cat as two per-object projections, no ``[P, 2 hidden]`` / ``[P, 4096]`` pair
  tensors), both run with :func:`torch.func.functional_call` on the case's parameter tensors;
- ``eager``: SGB's formulation written out plainly here: explicit union boxes, per-level
  ``sk.roi_align`` on them, ``torch.cat``, the reduce conv, the rectangle masks built as SGB builds
  them, the rect convs with batch-statistics BatchNorm (training) or the running statistics (test),
  fc6 / fc7 on all pairs at once, the materialised ``cat(head[s], tail[o])``, post_cat, ``*`` union,
  rel_compress, + frequency bias.

Sizes (float32 unless ``--dtype``; FPN strides 4, 8, 16, 32, RoIAlign 7 x 7, sampling_ratio 2,
aligned False, as SGB's relation configs):

==========  ======  ================  =====  ===========  ========  =======================
name        images  boxes per image   C      pairs        hidden    mode
==========  ======  ================  =====  ===========  ========  =======================
small       2       5                 8      40 (all)     16        train (tests; tiny widths)
mid         2       16                256    64 (32/img)  512       train (CPU default)
paper       4       25                256    2,400 (all)  512       train (SGCls / PredCls)
sgdet       4       80                256    4,096        512       train: 1,024 sampled per image
sgdet_test  4       80                256    25,280 (all) 512       test: forward only, no grad
==========  ======  ================  =====  ===========  ========  =======================

All but ``small`` use SGB's full widths: a 592 x 800 image (levels 148 x 200 ... 19 x 25),
256 FPN channels, MLP_HEAD_DIM = CONTEXT_POOLING_DIM = 4096, CONTEXT_HIDDEN_DIM = 512, 151 object
and 51 relation classes. ``small`` keeps the structure with widths C = 8, 32-wide fc6 / fc7 and
pooling, 11 / 7 classes, on a 64 x 96 image.

Training sizes: modules in training mode (BatchNorm on batch statistics); the timed backward is the
gradient of every parameter and of ``edge_ctx`` (the detector is frozen: the feature maps need no
gradient), i.e. what an SGB training step of the relation head computes. ``sgdet_test``: modules in
eval mode under ``torch.no_grad()``, as SGB's test loop; its outputs carry no gradient, so only
``--passes fwd`` is meaningful there (the ``fwd+bwd`` row is an error row saying so).

At full width the floor is about 0.2 GFLOP per pair forward (fc6 0.10, fc7 0.03, rect convs 0.02,
reduce_channel folded into the levels 0.04-0.06 instead of the conv's 0.19;
``python -m sgg_kernels.bench.floors --ops relation_head --size sgdet,sgdet_test``): ``sgdet`` 0.92
TFLOP forward, 2.5 TFLOP forward + backward; ``sgdet_test`` 4.7 TFLOP forward. On a 2-core CPU the
default run takes ``small`` / ``mid``; the full sizes take minutes there (``--single-call``, the
committed ``cpu-Intel-Xeon-relation-head-*.json``) and are meant for a GPU::

    python -m sgg_kernels.bench --device cuda --ops relation_head --size sgdet --no-compile
    python -m sgg_kernels.bench --device cuda --ops relation_head --size sgdet_test --passes fwd --no-compile
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

import sgg_kernels as sk
from sgg_kernels.ops.pairs import KERNELS
from sgg_kernels.reference import pairs as ref

from .. import floors as fl
from ..registry import Case, Inputs
from .pairs import _boxes

STRIDES = (4, 8, 16, 32)
SCALES = tuple(1.0 / s for s in STRIDES)
OUT = 7
SAMPLING = 2
CHUNK = 256  # the module's default; 512 / 128 measured 1,134 / 847 MB at sgdet fwd+bwd (256: 943)
LEVELS = ("p2", "p3", "p4", "p5")

# The parameters both impls read, by their names in the two modules (SGB's names).
UNION_PARAMS = (
    "feature_extractor.pooler.reduce_channel.0.weight", "feature_extractor.pooler.reduce_channel.0.bias",
    "feature_extractor.fc6.weight", "feature_extractor.fc6.bias",
    "feature_extractor.fc7.weight", "feature_extractor.fc7.bias",
    "rect_conv.0.weight", "rect_conv.0.bias", "rect_conv.2.weight", "rect_conv.2.bias",
    "rect_conv.4.weight", "rect_conv.4.bias", "rect_conv.6.weight", "rect_conv.6.bias",
)
PAIR_PARAMS = (
    "post_emb.weight", "post_emb.bias", "post_cat.weight", "post_cat.bias",
    "rel_compress.weight", "rel_compress.bias", "freq_bias.obj_baseline.weight",
)
U, Q = "union.", "pair."  # input-name prefixes of the two modules' parameters
GRAD_INPUTS = ("edge_ctx",) + tuple(U + n for n in UNION_PARAMS) + tuple(Q + n for n in PAIR_PARAMS)


@dataclass(frozen=True)
class HeadSize:
    B: int             # images
    per_image: int     # boxes per image
    pairs_per_image: int  # 0: all ordered pairs; else a random sample of that many per image
    C: int             # FPN channels
    H: int             # image height, width (pixels)
    W: int
    mlp: int           # MLP_HEAD_DIM = CONTEXT_POOLING_DIM
    hidden: int        # CONTEXT_HIDDEN_DIM
    num_obj: int
    num_rel: int
    train: bool

    def num_pairs(self) -> int:
        n = self.per_image * (self.per_image - 1)
        return self.B * (n if not self.pairs_per_image else min(n, self.pairs_per_image))

    def __str__(self) -> str:
        levels = " ".join(f"{-(-self.H // s)}x{-(-self.W // s)}" for s in STRIDES)
        return (f"B={self.B} boxes={self.B * self.per_image} P={self.num_pairs()} FPN C={self.C} [{levels}] "
                f"fc6 {self.C * OUT * OUT}->{self.mlp} hidden={self.hidden} classes {self.num_obj}/{self.num_rel} "
                f"{'train fwd+bwd' if self.train else 'test, no grad'}")


_FULL = dict(C=256, H=592, W=800, mlp=4096, hidden=512, num_obj=151, num_rel=51)
SIZES: Dict[str, HeadSize] = {
    "small": HeadSize(B=2, per_image=5, pairs_per_image=0, C=8, H=64, W=96, mlp=32, hidden=16, num_obj=11,
                      num_rel=7, train=True),
    "mid": HeadSize(B=2, per_image=16, pairs_per_image=32, train=True, **_FULL),
    "paper": HeadSize(B=4, per_image=25, pairs_per_image=0, train=True, **_FULL),
    "sgdet": HeadSize(B=4, per_image=80, pairs_per_image=1024, train=True, **_FULL),
    "sgdet_test": HeadSize(B=4, per_image=80, pairs_per_image=0, train=False, **_FULL),
}


# ---------------------------------------------------------------------------------------------
# Modules and inputs
# ---------------------------------------------------------------------------------------------
def _pair_module(s: HeadSize):
    """MotifsPairHead (the fusion helper's module); its parameters are SGB's MotifPredictor's."""
    from sgg_kernels.integrations._sgb_motifs import MotifsPairHead

    return MotifsPairHead(s.hidden, s.mlp, s.num_obj, s.num_rel, union_dim=s.mlp, use_vision=True, use_bias=True)


def _union_module(s: HeadSize):
    from sgg_kernels.integrations._sgb_union import UnionFeatureExtractor

    return UnionFeatureExtractor(in_channels=s.C, resolution=OUT, scales=SCALES, sampling_ratio=SAMPLING,
                                 mlp_head_dim=s.mlp, pooling_all_levels=True, separate_spatial=False,
                                 chunk_size=CHUNK)


def _params_of(module, names, what: str) -> Dict[str, torch.Tensor]:
    got = dict(module.named_parameters())
    if set(got) != set(names):
        raise RuntimeError(f"{what} has parameters {sorted(got)}; the relation_head case expects {sorted(names)}")
    return got


def _inputs(size: str, device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
    s = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    levels = [torch.randn(s.B, s.C, -(-s.H // st), -(-s.W // st), generator=g) for st in STRIDES]
    boxes = _boxes(s.B * s.per_image, float(s.W), float(s.H), g)
    box_batch = torch.arange(s.B).repeat_interleave(s.per_image)
    pairs: List[torch.Tensor] = []
    for b in range(s.B):  # every ordered pair of the image, or a random sample of them (SGB's sampler order)
        n = s.per_image
        local = torch.tensor([(i, j) for i in range(n) for j in range(n) if i != j], dtype=torch.int64)
        if s.pairs_per_image and s.pairs_per_image < local.shape[0]:
            local = local[torch.randperm(local.shape[0], generator=g)[: s.pairs_per_image]]
        pairs.append(local + b * n)
    edge_ctx = torch.randn(s.B * s.per_image, s.hidden, generator=g)
    obj_preds = torch.randint(1, s.num_obj, (s.B * s.per_image,), generator=g)
    with torch.random.fork_rng(devices=[]):  # weights from `seed`, global RNG untouched
        torch.manual_seed(seed)
        union_mod = _union_module(s)
        pair_mod = _pair_module(s)
        with torch.no_grad():  # SGB fills the bias from dataset statistics (log-frequencies): random here
            pair_mod.freq_bias.obj_baseline.weight.normal_()
    union_mod = union_mod.to(device=device, dtype=dtype).train(s.train)
    pair_mod = pair_mod.to(device=device, dtype=dtype).train(s.train)
    inputs: Inputs = {name: level.to(device, dtype) for name, level in zip(LEVELS, levels)}
    inputs.update(
        boxes=boxes.to(device), box_batch=box_batch.to(device), pairs=torch.cat(pairs).to(device),
        image_sizes=[(s.W, s.H)] * s.B, edge_ctx=edge_ctx.to(device, dtype), obj_preds=obj_preds.to(device),
        union_module=union_mod, pair_module=pair_mod, train=s.train,
    )
    for name, p in _params_of(union_mod, UNION_PARAMS, "UnionFeatureExtractor").items():
        inputs[U + name] = p.detach()
    for name, p in _params_of(pair_mod, PAIR_PARAMS, "MotifsPairHead").items():
        inputs[Q + name] = p.detach()
    return inputs


def _describe(size: str) -> str:
    return str(SIZES[size])


def _grad_mode(train: bool):
    return contextlib.nullcontext() if train else torch.no_grad()


# ---------------------------------------------------------------------------------------------
# fused: the package's modules on the case's parameter tensors
# ---------------------------------------------------------------------------------------------
class _Packed(torch.nn.Module):
    """``forward`` = the wrapped module's ``forward_packed`` (what functional_call can call)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, *args):
        return self.m.forward_packed(*args)


def _fused(p2, p3, p4, p5, boxes, box_batch, pairs, image_sizes, edge_ctx, obj_preds, union_module, pair_module,
           train, **params):
    from torch.func import functional_call

    with _grad_mode(train):
        union = functional_call(_Packed(union_module), {"m." + n: params[U + n] for n in UNION_PARAMS},
                                ([p2, p3, p4, p5], boxes, box_batch, pairs, image_sizes))
        rel = functional_call(pair_module, {n: params[Q + n] for n in PAIR_PARAMS}, (edge_ctx, obj_preds, pairs, union))
    return (rel,)


# ---------------------------------------------------------------------------------------------
# eager: SGB's formulation, written out plainly
# ---------------------------------------------------------------------------------------------
def _rect_masks(boxes, box_batch, pairs, image_sizes, rect_size: int, dtype) -> torch.Tensor:
    """SGB's rect_input [P, 2, rect, rect]: each box resized to the rect_size x rect_size canvas (float32
    box * float32(rect / width or height), as BoxList.resize), cells x in [floor x1, ceil x2] and
    y in [floor y1, ceil y2] set to 1; channel 0 the head (subject), 1 the tail (object)."""
    ratio = torch.tensor([[rect_size / w, rect_size / h] for w, h in image_sizes], dtype=torch.float32,
                         device=boxes.device)[box_batch]
    scaled = boxes.to(torch.float32) * ratio.repeat(1, 2)
    lo, hi = scaled[:, :2].floor().long(), scaled[:, 2:].ceil().long()
    x = torch.arange(rect_size, device=boxes.device).view(1, 1, -1).expand(pairs.shape[0], rect_size, rect_size)
    y = torch.arange(rect_size, device=boxes.device).view(1, -1, 1).expand(pairs.shape[0], rect_size, rect_size)
    rects = []
    for idx in (pairs[:, 0], pairs[:, 1]):
        l, h = lo[idx], hi[idx]
        rects.append(((x >= l[:, 0].view(-1, 1, 1)) & (x <= h[:, 0].view(-1, 1, 1))
                      & (y >= l[:, 1].view(-1, 1, 1)) & (y <= h[:, 1].view(-1, 1, 1))).to(dtype))
    return torch.stack(rects, dim=1)


def _eager_union(levels, boxes, box_batch, pairs, image_sizes, union_module, w) -> torch.Tensor:
    """SGB RelationFeatureExtractor.forward (pooling_all_levels, no separate_spatial), plainly."""
    s, o = boxes[pairs[:, 0]], boxes[pairs[:, 1]]
    union_boxes = torch.cat([torch.minimum(s[:, :2], o[:, :2]), torch.maximum(s[:, 2:], o[:, 2:])], dim=1)  # boxlist_union
    image = box_batch[pairs[:, 0]]
    pooled = torch.cat([sk.roi_align(level, union_boxes, image, OUT, scale, SAMPLING, aligned=False)
                        for level, scale in zip(levels, SCALES)], dim=1)  # Pooler, cat_all_levels
    vis = F.relu(F.conv2d(pooled, w["feature_extractor.pooler.reduce_channel.0.weight"],
                          w["feature_extractor.pooler.reduce_channel.0.bias"], padding=1))  # reduce_channel
    masks = _rect_masks(boxes, box_batch, pairs, image_sizes, union_module.rect_size, levels[0].dtype)
    bn1, bn2 = union_module.rect_conv[2], union_module.rect_conv[6]
    train = union_module.training
    r = F.relu(F.conv2d(masks, w["rect_conv.0.weight"], w["rect_conv.0.bias"], stride=2, padding=3))
    r = F.batch_norm(r, None if train else bn1.running_mean, None if train else bn1.running_var,
                     w["rect_conv.2.weight"], w["rect_conv.2.bias"], training=train, eps=bn1.eps)
    r = F.max_pool2d(r, kernel_size=3, stride=2, padding=1)
    r = F.relu(F.conv2d(r, w["rect_conv.4.weight"], w["rect_conv.4.bias"], padding=1))
    r = F.batch_norm(r, None if train else bn2.running_mean, None if train else bn2.running_var,
                     w["rect_conv.6.weight"], w["rect_conv.6.bias"], training=train, eps=bn2.eps)
    x = (vis + r).flatten(1)  # union_vis_features + rect_features
    x = F.relu(F.linear(x, w["feature_extractor.fc6.weight"], w["feature_extractor.fc6.bias"]))
    return F.relu(F.linear(x, w["feature_extractor.fc7.weight"], w["feature_extractor.fc7.bias"]))


def _eager_pairs(edge_ctx, obj_preds, pairs, union, w) -> torch.Tensor:
    """SGB MotifPredictor.forward after the context layer (use_vision, use_bias, widths matching)."""
    hidden = edge_ctx.shape[1]
    edge_rep = F.linear(edge_ctx, w["post_emb.weight"], w["post_emb.bias"]).view(-1, 2, hidden)
    head_rep, tail_rep = edge_rep[:, 0], edge_rep[:, 1]
    prod_rep = torch.cat([head_rep[pairs[:, 0]], tail_rep[pairs[:, 1]]], dim=-1)  # [P, 2 hidden]
    prod_rep = F.linear(prod_rep, w["post_cat.weight"], w["post_cat.bias"]) * union  # [P, pooling]
    rel = F.linear(prod_rep, w["rel_compress.weight"], w["rel_compress.bias"])
    num_obj = int(round(w["freq_bias.obj_baseline.weight"].shape[0] ** 0.5))
    return rel + w["freq_bias.obj_baseline.weight"][obj_preds[pairs[:, 0]] * num_obj + obj_preds[pairs[:, 1]]]


def _eager(p2, p3, p4, p5, boxes, box_batch, pairs, image_sizes, edge_ctx, obj_preds, union_module, pair_module,
           train, **params):
    with _grad_mode(train):
        union = _eager_union([p2, p3, p4, p5], boxes, box_batch, pairs, image_sizes, union_module,
                             {n: params[U + n] for n in UNION_PARAMS})
        rel = _eager_pairs(edge_ctx, obj_preds, pairs, union, {n: params[Q + n] for n in PAIR_PARAMS})
    return (rel,)


# ---------------------------------------------------------------------------------------------
# Floor
# ---------------------------------------------------------------------------------------------
def _conv_taps_1d(n: int, k: int, stride: int, pad: int) -> int:
    """Taps of a 1-D zero-padded strided correlation (input n, kernel k) that land inside the input."""
    out = (n + 2 * pad - k) // stride + 1
    return sum(sum(0 <= i * stride - pad + t < n for t in range(k)) for i in range(out))


def _floor(x) -> fl.Floor:
    """The relation head's floor: every layer's essential FLOPs, the inputs / parameters read once and
    the output written once.

    Forward: the union boxes (4 per pair); RoIAlign of the P union boxes on each level (8 FLOPs per
    sample and channel, samples from the boxes: ``floors._sample_taps``); reduce_channel, rect conv 1
    (7x7/2 on the 27 x 27 masks) and rect conv 2 as 2 x (valid taps) x C_in x C_out per pair (taps in
    the zero padding not counted) plus the bias; the sum (P C R^2); fc6, fc7 (2 rows in out + bias);
    post_emb on the K boxes; post_cat as two per-object projections (the minimal form, 2 K hidden Q
    each + bias), then per pair (a + b), * union, rel_compress (2 P Q R_rel + bias), + freq bias.
    reduce_channel per image is the cheaper of the conv (2 x valid taps x L C x C per pair) and the
    conv folded into the levels (RoIAlign is linear and channel-independent, so each tap's channel
    mixing commutes with it: 9 projections of the image's maps, 18 C^2 sum_l H_l W_l, then 8 more
    pooled passes over the levels; ``integrations._union_taps``); at sgdet the latter, about 5x fewer.
    BatchNorm, ReLU, max-pool and the rectangle masks (compares) are not counted.
    Backward (training: gradients of every parameter and of edge_ctx; the feature maps and masks need
    none): every layer's weight gradient (its forward FLOPs) and, except reduce_channel and rect conv 1
    (inputs without gradient), its input gradient (its forward FLOPs again); bias gradients (one add
    per output element); the pair step as :func:`floors.fusion_floor`'s sum form (g recomputed, dg,
    d union, the scatters into the two projections, dW, d bias) and the frequency bias's scatter.
    Bytes: fwd reads the 4 maps, boxes, box_batch, pairs, edge_ctx, obj_preds and every parameter, and
    writes the [P, R_rel] logits; bwd reads the logits' gradient, edge_ctx, boxes, pairs, obj_preds and
    the parameters, and writes every parameter's gradient and edge_ctx's (activations are the head's
    intermediates: not counted, as in ``sil_block``)."""
    levels = [x[n] for n in LEVELS]
    boxes, bb, pairs, edge_ctx, preds = x["boxes"], x["box_batch"], x["pairs"], x["edge_ctx"], x["obj_preds"]
    P, K, hidden = pairs.shape[0], boxes.shape[0], edge_ctx.shape[1]
    C = levels[0].shape[1]
    rect = x["union_module"].rect_size
    W6 = x[U + "feature_extractor.fc6.weight"]
    D = W6.shape[0]
    Qd = x[Q + "post_cat.weight"].shape[0]
    R_rel = x[Q + "rel_compress.weight"].shape[0]
    e = levels[0].element_size()

    ub = ref.union_boxes(boxes.detach().to("cpu", torch.float64), pairs.to("cpu"))
    roi = sum(8 * C * fl._sample_taps(ub, OUT, s, SAMPLING, False) for s in SCALES)
    t3 = _conv_taps_1d(OUT, 3, 1, 1) ** 2
    # reduce_channel per image: the conv on the pooled union features, or folded into the levels
    # (nine 1x1 projections of the image's maps, then nine pooled passes), whichever is cheaper
    image = bb[pairs[:, 0]].to("cpu")
    pixels = sum(lv.shape[2] * lv.shape[3] for lv in levels)
    reduce = 0
    for b in range(levels[0].shape[0]):
        mine = image == b
        n = int(mine.sum())
        if n:
            roi_b = sum(8 * C * fl._sample_taps(ub[mine], OUT, s, SAMPLING, False) for s in SCALES)
            reduce += min(2 * n * t3 * (len(levels) * C) * C, 18 * C * C * pixels + 8 * roi_b)
    reduce += P * C * OUT * OUT  # bias
    t7 = _conv_taps_1d(rect, 7, 2, 3) ** 2
    h1 = x[U + "rect_conv.0.weight"].shape[0]
    n1 = (rect + 2 * 3 - 7) // 2 + 1  # conv 1 output side (14 at rect 27)
    conv1 = 2 * P * t7 * 2 * h1 + P * h1 * n1 * n1
    conv2 = 2 * P * t3 * h1 * C + P * C * OUT * OUT
    fc6 = 2 * P * (C * OUT * OUT) * D + P * D
    fc7 = 2 * P * D * D + P * D
    post_emb = 2 * K * hidden * 2 * hidden + K * 2 * hidden
    post_cat = 2 * (2 * K * hidden * Qd) + K * Qd
    pair_fwd = 2 * P * Qd + 2 * P * Qd * R_rel + P * R_rel + P * R_rel  # (a + b) * u, rel_compress + bias, + freq
    fwd = 4 * P + roi + reduce + conv1 + conv2 + P * C * OUT * OUT + fc6 + fc7 + post_emb + post_cat + pair_fwd

    bwd = (reduce + conv1  # weight (and bias) gradients only
           + 2 * conv2 + 2 * fc6 + 2 * fc7 + 2 * post_emb  # weight and input gradients
           + 2 * (2 * (2 * K * hidden * Qd)) + K * Qd  # post_cat: dW and d(head, tail) of both halves, d bias
           + 4 * P * Qd * R_rel + P * R_rel  # rel_compress: dg = G W, dW = G^T g; d bias
           + 2 * P * Qd + P * Qd + P * Qd + 2 * P * Qd  # g recomputed, d union, dg * u, scatters into da, db
           + P * R_rel)  # frequency bias: scatter-add of G into its rows
    params = sum(fl.nbytes(x[U + n]) for n in UNION_PARAMS) + sum(fl.nbytes(x[Q + n]) for n in PAIR_PARAMS)
    io = fl.nbytes(boxes, bb, pairs, preds)
    out = P * R_rel * e
    fwd_bytes = fl.nbytes(*levels) + io + fl.nbytes(edge_ctx) + params + out
    bwd_bytes = out + fl.nbytes(edge_ctx) + io + params + params + fl.nbytes(edge_ctx)
    return fl.Floor(int(fwd_bytes), int(fwd), int(bwd_bytes), int(bwd))


CASES = [
    Case(
        name="relation_head", family="pairs", sizes=SIZES, make_inputs=_inputs, fused=_fused, reference=_eager,
        grad_inputs=GRAD_INPUTS, kernels=KERNELS["union_roi_align"] + KERNELS["pairwise_edge_fusion"],
        describe=_describe, floor=_floor,
    ),
]
