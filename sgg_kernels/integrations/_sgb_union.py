"""Scene-Graph-Benchmark's union-box feature extractor, chunked over pairs with recomputation.

SGB's ``RelationFeatureExtractor`` (maskrcnn_benchmark/modeling/roi_heads/relation_head/
roi_relation_feature_extractors.py) turns every (subject, object) pair into one feature vector:

1. the union box of the pair, RoIAligned from every FPN level (``Pooler`` with ``cat_all_levels``,
   maskrcnn_benchmark's ROIAlign = torchvision's ``roi_align(aligned=False)``), the levels
   concatenated along channels and reduced back by ``reduce_channel`` (3x3 conv + ReLU);
2. a 2-channel "rectangle" picture of the pair: each box of the image rescaled to a
   ``rect_size x rect_size`` canvas (``rect_size = 4 * resolution - 1``, 27 at resolution 7), and
   the cells x in [floor(x1), ceil(x2)], y in [floor(y1), ceil(y2)] set to 1, one channel for the
   head (subject), one for the tail (object);
3. ``rect_conv`` on it: Conv 7x7/2 -> ReLU -> BN -> MaxPool 3/2 -> Conv 3x3 -> ReLU -> BN, which
   brings the canvas to ``resolution x resolution`` and ``in_channels`` channels;
4. the sum of 1 and 3 (or, with ``CAUSAL.SEPARATE_SPATIAL``, the two kept apart), flattened, then
   ``fc6`` -> ReLU -> ``fc7`` -> ReLU (``FPN2MLPFeatureExtractor.forward_without_pool``).

SGB materialises every stage for all P pairs at once: at SGDet scale (80 boxes per image, 6,320
pairs per image) the [P, 4·256, 7, 7] pooled levels, the [P, 128, 14, 14] rect activations and the
[P, 4096] hidden layers are what runs the GPU out of memory. :class:`UnionFeatureExtractor` runs
the same computation on chunks of ``chunk_size`` pairs under ``torch.utils.checkpoint``, so only
the [P, mlp_head_dim] output and one chunk's activations are alive at a time; the backward pass
recomputes each chunk. BatchNorm in training mode still normalises with the statistics of the
whole batch of pairs (as SGB's one ``rect_conv`` call does), from a statistics pre-pass.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import _checks
from .._backend import suspended_value_checks
from ..ops.pairs import _check_roi_values, _roi_boxes, union_roi_align
from . import _union_taps as _taps
from ._config import config_key

__all__ = ["UnionFeatureExtractor"]

# SGB's LevelMapper (poolers.py; Eq. 1 of the FPN paper): canonical box size 224 maps to level 4.
_CANONICAL_SCALE = 224.0
_CANONICAL_LEVEL = 4.0
_LEVEL_EPS = 1e-6


def _make_fc(dim_in: int, dim_out: int, use_gn: bool, gn_groups: int, gn_eps: float) -> nn.Module:
    """SGB's make_fc (make_layers.py): Linear with kaiming_uniform_(a=1) and zero bias, or with
    ``use_gn`` a bias-free Linear followed by GroupNorm (keys ``N.0.weight``, ``N.1.weight/bias``)."""
    fc = nn.Linear(dim_in, dim_out, bias=not use_gn)
    nn.init.kaiming_uniform_(fc.weight, a=1)
    if not use_gn:
        nn.init.constant_(fc.bias, 0)
        return fc
    return nn.Sequential(fc, nn.GroupNorm(gn_groups, dim_out, eps=gn_eps))


class _Pooler(nn.Module):
    """Holds SGB Pooler's only parameters: ``reduce_channel`` = make_conv3x3(in·L -> in, use_relu)
    (conv with kaiming_normal_(fan_out) and zero bias, then ReLU), present when ``cat_all_levels``."""

    def __init__(self, in_channels: int, num_levels: int, cat_all_levels: bool):
        super().__init__()
        if cat_all_levels:
            conv = nn.Conv2d(in_channels * num_levels, in_channels, kernel_size=3, stride=1, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(conv.bias, 0)
            self.reduce_channel = nn.Sequential(conv, nn.ReLU(inplace=True))


class _FPN2MLP(nn.Module):
    """Holds SGB FPN2MLPFeatureExtractor's parameters (``pooler``, ``fc6``, ``fc7``)."""

    def __init__(self, in_channels: int, resolution: int, num_levels: int, cat_all_levels: bool,
                 mlp_head_dim: int, use_gn: bool, gn_groups: int, gn_eps: float):
        super().__init__()
        self.pooler = _Pooler(in_channels, num_levels, cat_all_levels)
        input_size = in_channels * resolution ** 2
        self.fc6 = _make_fc(input_size, mlp_head_dim, use_gn, gn_groups, gn_eps)
        self.fc7 = _make_fc(mlp_head_dim, mlp_head_dim, use_gn, gn_groups, gn_eps)
        self.resize_channels = input_size
        self.out_channels = mlp_head_dim

    def forward_without_pool(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        return F.relu(self.fc7(F.relu(self.fc6(x))))


def _cfg(cfg, path: str):
    return config_key(cfg, path, "UnionFeatureExtractor.from_config")


def _gn_groups(dim: int, dim_per_gp: int, num_groups: int) -> int:
    """SGB's get_group_gn: groups of GroupNorm from DIM_PER_GP (if > 0) or NUM_GROUPS."""
    if dim_per_gp > 0:
        if dim % dim_per_gp:
            raise ValueError(f"GROUP_NORM.DIM_PER_GP = {dim_per_gp} does not divide MLP_HEAD_DIM = {dim}")
        return dim // dim_per_gp
    if dim % num_groups:
        raise ValueError(f"GROUP_NORM.NUM_GROUPS = {num_groups} does not divide MLP_HEAD_DIM = {dim}")
    return num_groups


def _chan_combine(means: List[Tensor], m2s: List[Tensor], counts: List[int]) -> Tuple[Tensor, Tensor, int]:
    """Per-channel mean and sum of squared deviations M2 of the union of chunks, from each chunk's
    mean and M2 (Chan et al.'s pairwise update, exact and as stable as Welford's):
    mean = sum_c n_c mean_c / N,  M2 = sum_c M2_c + sum_c n_c (mean_c - mean)^2."""
    n = torch.tensor(counts, dtype=means[0].dtype, device=means[0].device).unsqueeze(1)
    chunk_means = torch.stack(means)
    total = sum(counts)
    mean = (n * chunk_means).sum(0) / total
    m2 = torch.stack(m2s).sum(0) + (n * (chunk_means - mean) ** 2).sum(0)
    return mean, m2, total


class _WholeBatchStats(torch.autograd.Function):
    """Per-channel (mean, M2 = sum (z - mean)^2) over all chunks of z = fn(pairs[s:e], *params)
    [c, C, H, W] (a BatchNorm's input), as one Function of the params.

    Forward: each chunk's z without autograd (no graph), its var_mean, Chan's combination.
    Backward: each chunk's z recomputed with autograd and back-propagated with
    dz = dmean / N + 2 dM2 (z - mean), the derivatives of the mean and of M2 (the mean's own
    dependence on z drops out of M2's: sum (z - mean) = 0). Costs one recomputation of z per chunk,
    as a checkpoint of the chunk's statistics would, without a differentiable (z - mean)^2 pass."""

    @staticmethod
    def forward(ctx, fn, pairs: Tensor, chunks, suspend: bool, *params):
        with suspended_value_checks() if suspend else contextlib.nullcontext():
            means, m2s, counts = [], [], []
            for s, e in chunks:
                z = fn(pairs[s:e], *params)
                var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
                n = z.shape[0] * z.shape[2] * z.shape[3]
                means.append(mean)
                m2s.append(var * n)
                counts.append(n)
        mean, m2, total = _chan_combine(means, m2s, counts)
        ctx.fn, ctx.pairs, ctx.chunks, ctx.suspend, ctx.total = fn, pairs, chunks, suspend, total
        ctx.save_for_backward(mean, *params)
        return mean, m2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dmean, dm2):
        mean, *params = ctx.saved_tensors
        need = ctx.needs_input_grad[4:]
        leaves = [p.detach().requires_grad_() if (p is not None and n) else p for p, n in zip(params, need)]
        inputs = [t for t, n in zip(leaves, need) if t is not None and n]
        if inputs:
            dmean = torch.zeros_like(mean) if dmean is None else dmean
            dm2 = torch.zeros_like(mean) if dm2 is None else dm2
            a, c = (2 * dm2).view(1, -1, 1, 1), (dmean / ctx.total - 2 * dm2 * mean).view(1, -1, 1, 1)
            with suspended_value_checks() if ctx.suspend else contextlib.nullcontext():
                for s, e in ctx.chunks:
                    with torch.enable_grad():
                        z = ctx.fn(ctx.pairs[s:e], *leaves)
                    torch.autograd.backward(z, torch.addcmul(c, z.detach(), a), inputs=inputs)
        grads = [t.grad if (t is not None and n) else None for t, n in zip(leaves, need)]
        return (None, None, None, None, *grads)


class UnionFeatureExtractor(nn.Module):
    """SGB's ``RelationFeatureExtractor`` (union-box features of relation pairs), chunked over pairs.

    Same parameters and state_dict keys as SGB's module (``feature_extractor.pooler.reduce_channel.0.*``,
    ``feature_extractor.fc6.*``, ``feature_extractor.fc7.*``, ``rect_conv.{0,2,4,6}.*``, and
    ``spatial_fc.{0,2}.*`` with ``separate_spatial``), so the relation feature extractor of an SGB
    checkpoint loads with ``load_state_dict``::

        sd = torch.load(ckpt)["model"]
        prefix = "roi_heads.relation.union_feature_extractor."
        m.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})

    Args:
        in_channels (int): channels C of each FPN level (BACKBONE_OUT_CHANNELS, 256).
        resolution (int): pooled size R (ROI_BOX_HEAD.POOLER_RESOLUTION, 7); the rectangle canvas is
            ``rect_size = 4R - 1`` (27), as SGB's ``resolution * 4 - 1``.
        scales (sequence of float): spatial_scale of each level (POOLER_SCALES).
        sampling_ratio (int): RoIAlign samples per bin and axis (POOLER_SAMPLING_RATIO; 2 in SGB's
            relation configs, 0 = adaptive in defaults.py).
        mlp_head_dim (int): width D of fc6 / fc7 (MLP_HEAD_DIM, 4096 in SGB's configs).
        pooling_all_levels (bool): POOLING_ALL_LEVELS: pool every level and reduce the concatenation
            with ``reduce_channel`` (SGB's relation default); False: SGB's LevelMapper picks one level
            per union box, floor(4 + log2(sqrt(area) / 224 + 1e-6)) clamped to the levels,
            area = (x2 - x1 + 1)(y2 - y1 + 1), computed in float32 as SGB's BoxList does. With one
            level, that level is pooled and ``reduce_channel`` (if any) is not applied, as in SGB.
        separate_spatial (bool): CAUSAL.SEPARATE_SPATIAL: return (region, spatial) features, region
            from the pooled union alone and spatial = ``spatial_fc`` of the flattened rect features.
        use_gn (bool), gn_groups (int), gn_eps (float): ROI_BOX_HEAD.USE_GN: fc6 / fc7 are a bias-free
            Linear + GroupNorm(gn_groups, D, eps) (GROUP_NORM.*).
        chunk_size (int or None): pairs per chunk (default 256); None runs all pairs as one chunk
            without checkpointing (every activation kept for backward, as in SGB; for comparisons).
            A batch of at most ``chunk_size`` pairs is one chunk and runs that way too: with nothing
            to free before the backward, it skips the statistics pre-pass and the recomputation.
            At SGDet training scale (4,096 pairs, 256 channels, 4096-d fc6/fc7) the forward+backward
            peak measured on the CPU at chunk 256 is 717 MB (eager SGB: 3,153 MB), of which ~0.3 GB
            is the weight gradients.

    Memory and cost. SGB's default configuration (``pooling_all_levels`` with several levels, no
    ``separate_spatial``, Linear fc6 / fc7) runs as one autograd Function,
    :class:`._union_taps.UnionHead`: the pairs are grouped by image (at most ``4 * chunk_size`` per
    group); per group the union features go through reduce_channel, then per chunk of
    ``chunk_size`` pairs the rect branch, the sum and fc6; fc7 runs on all [P, D] rows. Between
    forward and backward it keeps fc6's activation and the output ([P, D] each) and per-channel BN
    statistics, nothing per pair and layer. The backward recomputes reduce_channel and the rect
    branch per chunk, not fc6 / fc7; it adds each chunk's fc6 weight gradient into one buffer
    (``addmm_``), so the weight gradients exist once. reduce_channel takes one of two exact routes
    per group, in the forward and in the backward separately, whichever a cost model calibrated on
    the CPU (``_union_taps.route_costs``) says is cheaper:

    - the 3x3 conv on the concatenated pooled levels of each chunk, as SGB (few pairs per image, and
      the backward on frozen features, where the pooled chunk also gives the weight gradient);
    - the conv folded into the levels: RoIAlign is linear and the same for every channel, so each
      tap's channel mixing commutes with it; the image's levels are projected once per tap
      (9 x 1x1 convs) and the union boxes pooled from those maps, shifted by the tap and summed
      (C++ CPU kernel ``_union_tap_pool``; elsewhere the union RoIAlign op). At SGB's widths this
      costs ~46 GFLOP per image plus 9 pooled passes instead of 231 MFLOP per pair, and pays off in
      the forward from ~250 pairs per image (SGDet trains on 1,024, tests on 6,320).

    Other configurations (one level, LevelMapper pooling, separate_spatial, GroupNorm fc) run each
    chunk under ``torch.utils.checkpoint`` (non-reentrant), keeping the output [P, D] and the chunk
    inputs, and recompute each chunk's forward once in the backward.

    In training mode the two BatchNorms need whole-batch statistics first, so the rect branch runs
    more often: conv1 (7x7/2, 2 -> C/2 channels, 27 x 27 -> 14 x 14) 3 times in the forward instead
    of once, conv2 (3x3, C/2 -> C at 7 x 7) twice instead of once, and as often again in the
    recomputation, each with its backward. At C = 256, R = 7 the rect branch is ~17 MMAC per pair
    (conv1 2.5, conv2 14.5), so the statistics passes add ~19 MMAC per pair against ~184 MMAC for the
    conv form of reduce_channel (116) + fc6 (51) + fc7 (17). In eval mode the running statistics are
    used and there is no statistics pass.

    BatchNorm (training mode): mean_1, var_1 of BN1's input over all chunks, then mean_2, var_2 of
    BN2's input given BN1's statistics, then the main chunked pass with those statistics as tensor
    inputs. Each statistics pass is one autograd Function (``_WholeBatchStats``): its forward keeps no
    graph (a var_mean per chunk, combined exactly); its backward recomputes each chunk once and
    back-propagates the mean's and M2's derivatives. Normalisation uses the biased variance, as
    ``nn.BatchNorm2d``; running_mean / running_var are updated once per forward with the unbiased
    variance and the BN's momentum (cumulative average if None), num_batches_tracked += 1. Gradients
    flow through the statistics, so forward and backward equal the unchunked computation up to
    rounding. Each BN follows its own ``training`` / ``track_running_stats`` flags as BatchNorm2d does.

    Rectangles: SGB rescales each image's BoxList to (rect_size, rect_size) in float32
    (x · fl32(rect_size / width), y · fl32(rect_size / height)) and marks x in
    [floor(x1), ceil(x2)], y in [floor(y1), ceil(y2)]: the same float32 arithmetic is used here
    whatever the features' dtype, so the masks are SGB's exactly.

    Not supported: MODEL.ATTRIBUTE_ON (SGB's attribute branch) and box feature extractors other than
    FPN2MLPFeatureExtractor (``from_config`` raises NotImplementedError for them).
    """

    def __init__(self, in_channels: int = 256, resolution: int = 7,
                 scales: Sequence[float] = (0.25, 0.125, 0.0625, 0.03125), sampling_ratio: int = 2,
                 mlp_head_dim: int = 4096, pooling_all_levels: bool = True, separate_spatial: bool = False,
                 use_gn: bool = False, gn_groups: int = 32, gn_eps: float = 1e-5,
                 chunk_size: Optional[int] = 256):
        super().__init__()
        in_channels = _checks.int_at_least(in_channels, "in_channels", 2, "channels of each FPN level")
        resolution = _checks.positive_int(resolution, "resolution", "POOLER_RESOLUTION, the pooled size")
        mlp_head_dim = _checks.int_at_least(mlp_head_dim, "mlp_head_dim", 2, "MLP_HEAD_DIM, the width of fc6 / fc7")
        if chunk_size is not None:
            chunk_size = _checks.positive_int(chunk_size, "chunk_size", "pairs per chunk; None for no chunking")
        if (not isinstance(scales, (list, tuple)) or not scales
                or not all(isinstance(s, numbers.Real) and not isinstance(s, bool) and s > 0 for s in scales)):
            raise ValueError("scales must be a non-empty list of positive spatial scales (POOLER_SCALES), "
                             f"got {scales!r}")
        if not isinstance(sampling_ratio, numbers.Integral) or isinstance(sampling_ratio, bool):
            raise ValueError("sampling_ratio must be an int (POOLER_SAMPLING_RATIO; <= 0: adaptive), "
                             f"got {sampling_ratio!r}")
        self.in_channels = in_channels
        self.resolution = resolution
        self.scales = tuple(float(s) for s in scales)
        self.sampling_ratio = int(sampling_ratio)
        self.pooling_all_levels = bool(pooling_all_levels)
        self.separate_spatial = bool(separate_spatial)
        self.chunk_size = chunk_size
        self.rect_size = resolution * 4 - 1  # SGB: self.rect_size = resolution * 4 - 1
        self.out_channels = mlp_head_dim
        self.feature_extractor = _FPN2MLP(in_channels, resolution, len(self.scales), self.pooling_all_levels,
                                          mlp_head_dim, use_gn, gn_groups, gn_eps)
        if self.separate_spatial:
            self.spatial_fc = nn.Sequential(
                _make_fc(self.feature_extractor.resize_channels, mlp_head_dim // 2, False, 0, 0.0),
                nn.ReLU(inplace=True),
                _make_fc(mlp_head_dim // 2, mlp_head_dim, False, 0, 0.0),
                nn.ReLU(inplace=True))
        half = in_channels // 2
        self.rect_conv = nn.Sequential(
            nn.Conv2d(2, half, kernel_size=7, stride=2, padding=3, bias=True),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(half, momentum=0.01),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            nn.Conv2d(half, in_channels, kernel_size=3, stride=1, padding=1, bias=True),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(in_channels, momentum=0.01),
        )
        # SGB's Pooler: level range from the first and last scale (LevelMapper's k_min, k_max)
        self._k_min = -math.log2(self.scales[0])
        self._k_max = -math.log2(self.scales[-1])

    @classmethod
    def from_config(cls, cfg, in_channels: int, chunk_size: Optional[int] = 256) -> "UnionFeatureExtractor":
        """Build from a Scene-Graph-Benchmark (yacs) config, read by attribute:

        - MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION, POOLER_SCALES, POOLER_SAMPLING_RATIO, MLP_HEAD_DIM, USE_GN,
          FEATURE_EXTRACTOR (must be "FPN2MLPFeatureExtractor")
        - MODEL.ROI_RELATION_HEAD.POOLING_ALL_LEVELS, MODEL.ROI_RELATION_HEAD.CAUSAL.SEPARATE_SPATIAL
        - MODEL.ATTRIBUTE_ON (must be False)
        - MODEL.GROUP_NORM.DIM_PER_GP, NUM_GROUPS, EPSILON (only when USE_GN)

        ``in_channels`` is what SGB passes to RelationFeatureExtractor (the backbone's out channels).
        """
        if _cfg(cfg, "MODEL.ATTRIBUTE_ON"):
            raise NotImplementedError("MODEL.ATTRIBUTE_ON = True (SGB's attribute branch of the union features) "
                                      "is not supported by UnionFeatureExtractor")
        extractor = _cfg(cfg, "MODEL.ROI_BOX_HEAD.FEATURE_EXTRACTOR")
        if extractor != "FPN2MLPFeatureExtractor":
            raise NotImplementedError(f"MODEL.ROI_BOX_HEAD.FEATURE_EXTRACTOR = {extractor!r}: UnionFeatureExtractor "
                                      "implements SGB's FPN2MLPFeatureExtractor only")
        head = "MODEL.ROI_BOX_HEAD."
        mlp_head_dim = int(_cfg(cfg, head + "MLP_HEAD_DIM"))
        use_gn = bool(_cfg(cfg, head + "USE_GN"))
        gn_groups, gn_eps = 32, 1e-5
        if use_gn:
            gn_groups = _gn_groups(mlp_head_dim, int(_cfg(cfg, "MODEL.GROUP_NORM.DIM_PER_GP")),
                                   int(_cfg(cfg, "MODEL.GROUP_NORM.NUM_GROUPS")))
            gn_eps = float(_cfg(cfg, "MODEL.GROUP_NORM.EPSILON"))
        return cls(in_channels=in_channels,
                   resolution=int(_cfg(cfg, head + "POOLER_RESOLUTION")),
                   scales=tuple(_cfg(cfg, head + "POOLER_SCALES")),
                   sampling_ratio=int(_cfg(cfg, head + "POOLER_SAMPLING_RATIO")),
                   mlp_head_dim=mlp_head_dim,
                   pooling_all_levels=bool(_cfg(cfg, "MODEL.ROI_RELATION_HEAD.POOLING_ALL_LEVELS")),
                   separate_spatial=bool(_cfg(cfg, "MODEL.ROI_RELATION_HEAD.CAUSAL.SEPARATE_SPATIAL")),
                   use_gn=use_gn, gn_groups=gn_groups, gn_eps=gn_eps, chunk_size=chunk_size)

    # -----------------------------------------------------------------------------------------
    # entry points
    # -----------------------------------------------------------------------------------------
    def forward(self, features: Sequence[Tensor], proposals: Sequence, rel_pair_idxs: Sequence[Tensor]
                ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """SGB's ``RelationFeatureExtractor.forward(x, proposals, rel_pair_idxs)``.

        Args:
            features (list of Tensor[B, C, H_l, W_l]): FPN levels, one per entry of ``scales``; extra
                levels at the end (SGB's backbone returns P2-P6 for 4 scales) are ignored, as in SGB.
            proposals (list of BoxList): B per-image boxes, mode "xyxy" (``.bbox [N_i, 4]``, ``.size`` (w, h)).
            rel_pair_idxs (list of Tensor[P_i, 2] int64): (head, tail) indices local to each image.

        Returns:
            Tensor[sum P_i, mlp_head_dim]: the images' pairs in order (SGB concatenates them); with
            ``separate_spatial`` the tuple (region, spatial), each [sum P_i, mlp_head_dim], as SGB.
        """
        if rel_pair_idxs is None:
            raise ValueError("rel_pair_idxs is required: one Tensor[P_i, 2] int64 of (head, tail) indices per image")
        from .sgb import boxlists_to_batch  # here, not at the top: sgb.py re-exports this module's class

        batch = boxlists_to_batch(proposals, rel_pair_idxs)
        return self.forward_packed(features, batch.boxes, batch.box_batch, batch.pairs, batch.image_sizes)

    def forward_packed(self, features: Sequence[Tensor], boxes: Tensor, box_batch: Tensor, pairs: Tensor,
                       image_sizes: Sequence[Tuple[int, int]]) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """The same on packed inputs (DESIGN.md conventions).

        Args:
            features (list of Tensor[B, C, H_l, W_l]): FPN levels, as in :meth:`forward`.
            boxes (Tensor[K, 4]): (x1, y1, x2, y2) in image pixels; box_batch (Tensor[K] int64): image of each box.
            pairs (Tensor[P, 2] int64): (head, tail) global indices, both boxes of one image.
            image_sizes (list of (width, height)): the B images' sizes (BoxList ``.size``): the
                rectangle canvas maps each image onto ``rect_size x rect_size``.

        Returns:
            Tensor[P, mlp_head_dim] (or (region, spatial) with ``separate_spatial``). P = 0 gives
            empty outputs and leaves the BN statistics untouched (SGB's Pooler asserts instead).
        """
        levels = self._check(features, boxes, box_batch, pairs, image_sizes)
        proved = _checks.module_value_checks()
        if proved:  # one fused reduction + one sync for every value the ops below would check
            finest = max(range(len(levels)), key=lambda i: self.scales[i])
            R = self.resolution
            _check_roi_values(levels[finest], _roi_boxes(boxes, levels[finest]), box_batch, pairs, R, R,
                              self.scales[finest], self.sampling_ratio, False)
        if not proved:
            return self._forward(levels, boxes, box_batch, pairs, image_sizes, False)
        with suspended_value_checks():
            return self._forward(levels, boxes, box_batch, pairs, image_sizes, True)

    # -----------------------------------------------------------------------------------------
    def _check(self, features, boxes, box_batch, pairs, image_sizes) -> List[Tensor]:
        if isinstance(features, Tensor):
            features = [features]
        if not isinstance(features, (list, tuple)) or len(features) < len(self.scales):
            got = f"{len(features)} levels" if isinstance(features, (list, tuple)) else type(features).__name__
            raise ValueError(f"features must be a list of at least {len(self.scales)} FPN levels "
                             f"Tensor[B, C, H_l, W_l] (one per scale {self.scales}), got {got}")
        # SGB's Pooler zips the levels with its scales: the FPN's extra top level (P6 of
        # LastLevelMaxPool, 5 levels for 4 scales) is ignored, as there
        levels = list(features)[:len(self.scales)]
        dtype = self.rect_conv[0].weight.dtype
        for i, level in enumerate(levels):
            _checks.tensor(level, f"features[{i}]", "B, C, H, W")
            _checks.size(level, f"features[{i}]", 0, levels[0].shape[0], "B, the batch of features[0]")
            _checks.size(level, f"features[{i}]", 1, self.in_channels, "in_channels of the module")
        _checks.module_dtype([(f"features[{i}]", lv) for i, lv in enumerate(levels)], "UnionFeatureExtractor", dtype)
        _checks.tensor(boxes, "boxes", "K, 4")
        _checks.size(boxes, "boxes", 1, 4, "(x1, y1, x2, y2)")
        _checks.tensor(box_batch, "box_batch", "K", kind="index")
        _checks.size(box_batch, "box_batch", 0, boxes.shape[0], "K, the number of boxes")
        _checks.tensor(pairs, "pairs", "P, 2", kind="index")
        _checks.size(pairs, "pairs", 1, 2, "(head, tail)")
        _checks.same_device([(f"features[{i}]", lv) for i, lv in enumerate(levels)]
                            + [("boxes", boxes), ("box_batch", box_batch), ("pairs", pairs)])
        B = levels[0].shape[0]
        if not isinstance(image_sizes, (list, tuple)) or len(image_sizes) != B:
            got = (f"{len(image_sizes)} entries" if isinstance(image_sizes, (list, tuple))
                   else type(image_sizes).__name__)
            raise ValueError(f"image_sizes must hold one (width, height) per image of features (B = {B}), got {got}")
        for i, s in enumerate(image_sizes):
            if (not isinstance(s, (list, tuple)) or len(s) != 2
                    or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0 for v in s)):
                raise ValueError(f"image_sizes[{i}] must be (width, height), two positive numbers, got {s!r}")
        return levels

    def _rect_bounds(self, boxes: Tensor, box_batch: Tensor, image_sizes) -> Tensor:
        """[K, 4] int64 (floor x1, floor y1, ceil x2, ceil y2) of each box on the rect canvas.

        SGB: ``proposal.resize((rect_size, rect_size))`` multiplies float32 boxes by the Python
        floats rect_size / width and rect_size / height (the op casts them to float32), then
        ``head_rect = (x >= x1.floor()) & (x <= x2.ceil()) & (y >= y1.floor()) & (y <= y2.ceil())``.
        """
        rs = float(self.rect_size)
        dev = boxes.device
        B = len(image_sizes)
        ratio = torch.tensor([[rs / float(w), rs / float(h)] for (w, h) in image_sizes], dtype=torch.float32,
                             device=dev)
        ratio = ratio[box_batch.clamp(0, max(B - 1, 0))]  # [K, 2]; clamp: invalid values (checks off) stay in bounds
        scaled = boxes.detach().to(torch.float32) * ratio.repeat(1, 2)  # (x1 rw, y1 rh, x2 rw, y2 rh)
        return torch.cat([scaled[:, :2].floor(), scaled[:, 2:].ceil()], dim=1).to(torch.int64)

    def _levels_of_pairs(self, boxes: Tensor, pairs: Tensor) -> Tensor:
        """SGB's LevelMapper on the union boxes (float32, as SGB's BoxList): [P] int64 level index."""
        b = boxes.detach().to(torch.float32)
        s, o = b[pairs[:, 0]], b[pairs[:, 1]]
        lo, hi = torch.minimum(s[:, :2], o[:, :2]), torch.maximum(s[:, 2:], o[:, 2:])
        area = (hi[:, 0] - lo[:, 0] + 1) * (hi[:, 1] - lo[:, 1] + 1)  # BoxList.area(), TO_REMOVE = 1
        lvl = torch.floor(_CANONICAL_LEVEL + torch.log2(torch.sqrt(area) / _CANONICAL_SCALE + _LEVEL_EPS))
        lvl = torch.clamp(lvl, min=self._k_min, max=self._k_max)
        return lvl.to(torch.int64) - int(round(self._k_min))

    def _masks(self, bounds: Tensor, pairs: Tensor, dtype) -> Tensor:
        """[c, 2, rect_size, rect_size]: head and tail rectangles of each pair (SGB's rect_input)."""
        r = torch.arange(self.rect_size, device=bounds.device)
        out = []
        for role in (0, 1):
            b = bounds[pairs[:, role]]  # [c, 4]
            in_x = (r >= b[:, 0:1]) & (r <= b[:, 2:3])  # [c, R]
            in_y = (r >= b[:, 1:2]) & (r <= b[:, 3:4])
            out.append(in_y[:, :, None] & in_x[:, None, :])
        return torch.stack(out, dim=1).to(dtype)

    def _rect_params(self) -> Tuple[Optional[Tensor], ...]:
        """(conv1 w, b, bn1 w, b, conv2 w, b, bn2 w, b) of rect_conv."""
        rc = self.rect_conv
        return (rc[0].weight, rc[0].bias, rc[2].weight, rc[2].bias, rc[4].weight, rc[4].bias, rc[6].weight, rc[6].bias)

    def _pool(self, levels: List[Tensor], boxes: Tensor, box_batch: Tensor, pairs: Tensor,
              pair_levels: Optional[Tensor]) -> Tensor:
        """[c, C, R, R]: the union boxes' features after SGB's Pooler (incl. reduce_channel)."""
        R = self.resolution
        if len(levels) == 1:  # SGB's Pooler: one level is pooled as it is (no reduce_channel)
            return union_roi_align(levels[0], boxes, box_batch, pairs, (R, R), self.scales[0], self.sampling_ratio,
                                   False)
        if self.pooling_all_levels:
            cat = union_roi_align(levels, boxes, box_batch, pairs, (R, R), list(self.scales), self.sampling_ratio,
                                  False)
            return self.feature_extractor.pooler.reduce_channel(cat)
        out = levels[0].new_zeros((pairs.shape[0], self.in_channels, R, R))
        for lvl, (level, scale) in enumerate(zip(levels, self.scales)):
            idx = (pair_levels == lvl).nonzero().squeeze(1)
            if idx.numel():
                out[idx] = union_roi_align(level, boxes, box_batch, pairs[idx], (R, R), scale, self.sampling_ratio,
                                           False)
        return out

    def _bn_stats(self, bn: nn.BatchNorm2d) -> Tuple[bool, bool]:
        """(use batch statistics, update running statistics), as nn.BatchNorm2d decides."""
        batch_stats = bn.training or bn.running_mean is None
        return batch_stats, bn.training and bn.track_running_stats

    @staticmethod
    def _update_running(bn: nn.BatchNorm2d, mean: Tensor, m2: Tensor, n: int) -> None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            f = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
            bn.running_var.mul_(1 - f).add_(m2.detach() / (n - 1), alpha=f)  # unbiased, as BatchNorm2d

    def _head(self, vis: Tensor, rect: Tensor):
        """fc6 -> fc7 of the pooled union features plus the rect features (SGB's sum), or with
        separate_spatial (region of the union features alone, spatial_fc of the rect features)."""
        if self.separate_spatial:
            return self.feature_extractor.forward_without_pool(vis), self.spatial_fc(rect.flatten(1))
        return self.feature_extractor.forward_without_pool(vis + rect)

    def _whole_batch_stats(self, bn: nn.BatchNorm2d, z_of_chunk, suspend: bool, pairs: Tensor, chunks,
                           hw: int, *params) -> Tuple[Tensor, Tensor]:
        """(mean, biased var) of ``bn``'s input z = ``z_of_chunk(chunk pairs, *params)`` [c, C, hw, hw]
        over the whole batch (:class:`_WholeBatchStats`: no graph in the forward, each chunk recomputed
        once in the backward); the running statistics updated once. Eval mode: the running statistics."""
        use, update = self._bn_stats(bn)
        if not use:
            return bn.running_mean, bn.running_var
        mean, m2 = _WholeBatchStats.apply(z_of_chunk, pairs, chunks, suspend, *params)
        n = sum(e - s for s, e in chunks) * hw * hw
        if update:
            self._update_running(bn, mean, m2, n)
        return mean, m2 / n

    def _run(self, fn, suspend: bool, *args):
        """``fn(*args)`` under checkpoint when gradients are on and chunking is on; inside
        suspended value checks when the module checked the values (also during recomputation)."""
        def body(*a):
            if suspend:
                with suspended_value_checks():
                    return fn(*a)
            return fn(*a)
        if self.chunk_size is None or not torch.is_grad_enabled():
            return body(*args)
        return checkpoint(body, *args, use_reentrant=False, preserve_rng_state=False)

    def _forward(self, levels, boxes, box_batch, pairs, image_sizes, suspend: bool):
        P = pairs.shape[0]
        dtype = levels[0].dtype
        D = self.out_channels
        if P == 0:
            empty = levels[0].new_zeros((0, D))
            return (empty, empty.clone()) if self.separate_spatial else empty
        bounds = self._rect_bounds(boxes, box_batch, image_sizes)
        safe_pairs = pairs.clamp(0, max(boxes.shape[0] - 1, 0))  # bounds gather stays in range with checks off
        pair_levels = None
        if len(levels) > 1 and not self.pooling_all_levels:
            pair_levels = self._levels_of_pairs(boxes, safe_pairs)
        step = P if self.chunk_size is None else self.chunk_size
        chunks = [(s, min(s + step, P)) for s in range(0, P, step)]
        if len(chunks) == 1:  # one chunk: nothing to free before the backward, so no recompute, no pre-pass
            with suspended_value_checks() if suspend else contextlib.nullcontext():
                rect = self.rect_conv(self._masks(bounds, safe_pairs, dtype))  # BatchNorm2d on the whole batch
                return self._head(self._pool(list(levels), boxes, box_batch, pairs, pair_levels), rect)
        bn1, bn2 = self.rect_conv[2], self.rect_conv[6]
        hw1 = (self.rect_size + 1) // 2  # conv 7x7 / 2, padding 3: 4R - 1 -> 2R
        hw2 = self.resolution

        # BN1 statistics over the whole batch of pairs (each chunk recomputed in backward), then BN2's given BN1's
        rect = self._rect_params()
        c1w, c1b, g1, b1, c2w, c2b = rect[:6]
        eps1 = bn1.eps
        stats1 = self._whole_batch_stats(bn1, lambda pr, w, b: _taps.rect_z1(self._masks(bounds, pr, dtype), w, b),
                                         suspend, safe_pairs, chunks, hw1, c1w, c1b)
        stats2 = self._whole_batch_stats(
            bn2, lambda pr, w1, bb1, g, b, m, v, w2, bb2: _taps.rect_z2(
                _taps.rect_z1(self._masks(bounds, pr, dtype), w1, bb1), g, b, m, v, eps1, w2, bb2),
            suspend, safe_pairs, chunks, hw2, c1w, c1b, g1, b1, *stats1, c2w, c2b)

        if self._folded_path(levels):
            return self._union_head(levels, boxes, box_batch, pairs, safe_pairs, bounds, stats1, stats2, suspend)

        def chunk(pr, pr_safe, lv, m1, v1, m2, v2, *lvls):
            r = _taps.rect_features(self._masks(bounds, pr_safe, dtype), rect, (m1, v1, m2, v2), (bn1.eps, bn2.eps))
            return self._head(self._pool(list(lvls), boxes, box_batch, pr, lv), r)

        outs = [self._run(chunk, suspend, pairs[s:e], safe_pairs[s:e],
                          None if pair_levels is None else pair_levels[s:e], *stats1, *stats2, *levels)
                for s, e in chunks]
        if self.separate_spatial:
            return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        return torch.cat(outs)

    def _folded_path(self, levels) -> bool:
        """SGB's default configuration (all levels pooled and reduced, region + rect summed, Linear
        fc6 / fc7) runs as one :class:`._union_taps.UnionHead` Function instead of per-chunk checkpoints."""
        fe = self.feature_extractor
        return (self.pooling_all_levels and len(levels) > 1 and not self.separate_spatial
                and isinstance(fe.fc6, nn.Linear) and isinstance(fe.fc7, nn.Linear))

    def _union_head(self, levels, boxes, box_batch, pairs, safe_pairs, bounds, stats1, stats2, suspend: bool):
        """The pairs grouped by image (at most 4 chunk_size pairs per group, in image order), then
        :class:`._union_taps.UnionHead` (one host sync: the pairs per image)."""
        B = levels[0].shape[0]
        img = box_batch[safe_pairs[:, 0]].clamp(0, B - 1)
        order = torch.argsort(img, stable=True)
        counts = torch.bincount(img, minlength=B).tolist()
        group = 4 * self.chunk_size
        groups, start = [], 0
        for b, n in enumerate(counts):
            for s in range(start, start + n, group):
                groups.append((b, order[s:min(s + group, start + n)]))
            start += n
        dtype = levels[0].dtype
        rc, fe = self.rect_conv, self.feature_extractor
        plan = _taps.Plan(boxes=boxes, box_batch=box_batch, pairs=pairs, safe_pairs=safe_pairs,
                          masks=lambda pr: self._masks(bounds, pr, dtype), groups=groups, chunk=self.chunk_size,
                          scales=self.scales, resolution=self.resolution, sampling_ratio=self.sampling_ratio,
                          eps=(rc[2].eps, rc[6].eps), suspend=suspend,
                          grad=torch.is_grad_enabled())
        conv = fe.pooler.reduce_channel[0]
        rect = self._rect_params()
        return _taps.UnionHead.apply(plan, conv.weight, conv.bias, fe.fc6.weight, fe.fc6.bias, fe.fc7.weight,
                                     fe.fc7.bias, *rect, *stats1, *stats2, *levels)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, resolution={self.resolution}, scales={self.scales}, "
                f"sampling_ratio={self.sampling_ratio}, rect_size={self.rect_size}, "
                f"pooling_all_levels={self.pooling_all_levels}, separate_spatial={self.separate_spatial}, "
                f"chunk_size={self.chunk_size}")
