"""LinkNet (Woo et al., "LinkNet: Relational Embedding for Scene Graph", NeurIPS'18, Sec. 3).

Thin ``nn.Module``s over the fused ops of the ``pairs`` family:

- :class:`RelationalEmbedding` - the relational embedding module, Eq. 1-3 (and 4-6), with
  attention restricted to boxes of one image;
- :class:`GlobalContextEncoding` - Sec. 3.3.2: average-pooled context ``c`` and the multi-label
  auxiliary task (Eq. 9);
- :class:`GeometricLayoutEncoding` - Sec. 3.4.2: K2 applied to b_o|s (Eq. 17);
- :class:`LinkNetHead` - the object and relationship classifiers, Eq. 1-14, with Eq. 12-14 done by
  :func:`sgg_kernels.pairwise_edge_fusion` (the ``[P, 4096]`` fused features G0 never exist);
- :func:`linknet_losses` - Eq. 8, 16 (and 9).

Objects of a batch are packed (DESIGN.md): ``K`` boxes over ``B`` images, ``box_batch [K]`` the
image of each box, ``pairs [P, 2]`` int64 (subject, object) global indices, both of one image.
The paper writes everything for one image (N boxes, N(N-1) pairs); here every N x N operation is a
K x K one masked to same-image entries, so a batch never mixes images.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _checks
from .._backend import suspended_value_checks, value_checks_on
from ..ops.pairs import _check_pair_values, pair_geometry, pairwise_edge_fusion

__all__ = [
    "RelationalEmbedding",
    "GlobalContextEncoding",
    "GeometricLayoutEncoding",
    "LinkNetHead",
    "linknet_losses",
]


def _check_box_batch(box_batch: Tensor, K: int, what: str) -> None:
    _checks.tensor(box_batch, "box_batch", "K", kind="index")
    _checks.size(box_batch, "box_batch", 0, K, what)


# ---------------------------------------------------------------------------------------------
# Index-value checks of the head as a registered op: they read device data (one reduction and a
# sync), so inside a traced graph they must run as an opaque op, not as Python on tensor values.
# The op returns a copy of box_batch that the head then uses, so no compiler can drop it as dead
# code; with ``sgg_kernels.set_checks(False)`` it is just that copy (K int64 values). It covers every
# value check of the ops the head calls (pairwise_edge_fusion, pair_geometry: pairs in [0, K)), so
# in eager mode the head calls them with their own checks suspended: one sync per forward.
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("sgg_kernels::linknet_checked_batch", mutates_args=())
def _checked_batch(box_batch: Tensor, pairs: Tensor, B: int) -> Tensor:
    if value_checks_on():  # box_batch in [0, B), pairs in [0, K), same image: one reduction, one sync
        _check_pair_values(pairs, box_batch.shape[0], box_batch, B, "B, the rows of context")
    return box_batch.clone()


@_checked_batch.register_fake
def _(box_batch, pairs, B):
    return torch.empty_like(box_batch)


# ---------------------------------------------------------------------------------------------
# Relational embedding (Sec. 3.3.1, Eq. 1-3; the same module again for Eq. 4-6 and E0 -> E1)
# ---------------------------------------------------------------------------------------------
class RelationalEmbedding(nn.Module):
    """The relational embedding module of LinkNet, Eq. 1-3, for packed boxes of several images.

    For the boxes of one image, stacked as X [N, in_dim]::

        R  = softmax_row((X W)(X U)^T)        [N, N]       Eq. 1 (Eq. 4)
        O1 = X + fc0(R (X H))                 [N, in_dim]  Eq. 2 (Eq. 5)
        O2 = fc1(O1)                          [N, out_dim] Eq. 3 (Eq. 6)

    With a batch packed as ``x [K, in_dim]``, the logits are computed K x K and entries joining
    boxes of different images are set to -inf before the row softmax, so a box attends to the boxes
    of its own image only (itself included, as in the paper) and the result equals running Eq. 1-3
    image by image. Each row keeps at least its diagonal, so no row is all -inf.

    The logits are *not* scaled (no 1/sqrt(d) as in Transformers): Eq. 1 has none, and we follow
    the paper. With wide inputs (in_dim = 4808 in the paper) the softmax can be very peaked at
    initialisation; that is the paper's model.

    Parameters: W, U, H are ``Linear(in_dim, in_dim // r, bias=False)`` - Eq. 1-2 print plain
    matrix products, and a bias in U would only add a per-row constant that the row softmax
    cancels anyway. fc0 = ``Linear(in_dim // r, in_dim)`` and fc1 = ``Linear(in_dim, out_dim)`` are
    fully-connected layers with bias.

    Args:
        in_dim (int): width of the input features (4808 for O0 in the paper, 256 for O2).
        out_dim (int): width of the output (256 for O2, C_obj for O4, 8192 for E1).
        r (int): reduction of W, U, H (the paper's best: 2); ``in_dim // r`` must be >= 1.
    """

    def __init__(self, in_dim: int, out_dim: int, r: int = 2):
        super().__init__()
        if r < 1 or in_dim // r < 1:
            raise ValueError(f"RelationalEmbedding needs r >= 1 and in_dim // r >= 1, got in_dim={in_dim}, r={r}")
        inner = in_dim // r
        self.in_dim, self.out_dim, self.r = in_dim, out_dim, r
        self.W = nn.Linear(in_dim, inner, bias=False)
        self.U = nn.Linear(in_dim, inner, bias=False)
        self.H = nn.Linear(in_dim, inner, bias=False)
        self.fc0 = nn.Linear(inner, in_dim)
        self.fc1 = nn.Linear(in_dim, out_dim)

    def _check(self, x: Tensor, box_batch: Tensor) -> None:
        _checks.tensor(x, "x", "K, in_dim")
        _checks.size(x, "x", 1, self.in_dim, "in_dim of this RelationalEmbedding")
        _check_box_batch(box_batch, x.shape[0], "K, the rows of x")
        _checks.same_device([("x", x), ("box_batch", box_batch)])
        _checks.module_dtype([("x", x)], "this RelationalEmbedding", self.fc1.weight.dtype)

    def relation(self, x: Tensor, box_batch: Tensor) -> Tensor:
        """Eq. 1: R [K, K], the row-softmax of (x W)(x U)^T over boxes of the same image.

        Entries joining boxes of different images are exactly 0. (Block-diagonal once boxes are
        sorted by image, which :func:`sgg_kernels.pack_boxes` does; not required here.)
        """
        self._check(x, box_batch)
        return self._relation(x, box_batch)

    def _relation(self, x: Tensor, box_batch: Tensor) -> Tensor:
        logits = self.W(x) @ self.U(x).transpose(0, 1)  # Eq. 1, [K, K], unscaled as in the paper
        same_image = box_batch[:, None] == box_batch[None, :]
        return torch.softmax(logits.masked_fill(~same_image, float("-inf")), dim=-1)

    def embed(self, x: Tensor, box_batch: Tensor) -> Tensor:
        """Eq. 2 (Eq. 5): the residual O1 = x + fc0(R (x H)).

        Args:
            x (Tensor[K, in_dim]): packed object features of all images.
            box_batch (Tensor[K] int64): image of each row of ``x`` (any values; only equality
                matters).

        Returns:
            Tensor[K, in_dim].
        """
        self._check(x, box_batch)
        R = self._relation(x, box_batch)  # Eq. 1
        return x + self.fc0(R @ self.H(x))  # Eq. 2

    def forward(self, x: Tensor, box_batch: Tensor) -> Tensor:
        """Eq. 3 (Eq. 6): fc1(O1).

        Args:
            x (Tensor[K, in_dim]), box_batch (Tensor[K] int64): as :meth:`embed`.

        Returns:
            Tensor[K, out_dim]. K = 0 gives an empty ``[0, out_dim]``.
        """
        return self.fc1(self.embed(x, box_batch))  # Eq. 3


# ---------------------------------------------------------------------------------------------
# Global context encoding (Sec. 3.3.2, Eq. 9)
# ---------------------------------------------------------------------------------------------
def _gce_loss(multilabel_logits: Tensor, targets: Tensor, literal: bool = False) -> Tensor:
    _checks.tensor(multilabel_logits, "multilabel_logits", "B, C_obj")
    if not isinstance(targets, Tensor) or targets.shape != multilabel_logits.shape:
        got = list(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"multilabel_targets must have shape {list(multilabel_logits.shape)} (the shape of "
                         f"multilabel_logits), got {got}")
    B = multilabel_logits.shape[0]
    targets = targets.to(multilabel_logits.dtype)
    if literal:  # Eq. 9 as printed: -sum_c M_c log(M^_c), M^ = sigmoid(logits)
        per_class = -targets * F.logsigmoid(multilabel_logits)
    else:  # Eq. 9 read as the per-class binary cross-entropy
        per_class = F.binary_cross_entropy_with_logits(multilabel_logits, targets, reduction="none")
    return per_class.sum() / max(B, 1)  # sum over classes (Eq. 9), mean over images


class GlobalContextEncoding(nn.Module):
    """Sec. 3.3.2: the image-level context c and the multi-label classifier on it.

    c = global average pool of the (RPN) feature map; multi-label logits = Linear(C, C_obj)(c),
    M^ = sigmoid(logits).

    Args:
        in_channels (int): channels C of the feature map (512 in the paper); also the width of c.
        num_obj_classes (int): C_obj.
    """

    def __init__(self, in_channels: int, num_obj_classes: int):
        super().__init__()
        self.in_channels, self.num_obj_classes = in_channels, num_obj_classes
        self.classifier = nn.Linear(in_channels, num_obj_classes)

    def forward(self, feature_map: Tensor) -> Tuple[Tensor, Tensor]:
        """
        Args:
            feature_map (Tensor[B, C, H, W]).

        Returns:
            (c Tensor[B, C], multilabel_logits Tensor[B, num_obj_classes]).
        """
        _checks.tensor(feature_map, "feature_map", "B, C, H, W")
        _checks.size(feature_map, "feature_map", 1, self.in_channels, "in_channels")
        _checks.module_dtype([("feature_map", feature_map)], "this GlobalContextEncoding", self.classifier.weight.dtype)
        c = feature_map.mean(dim=(2, 3))  # average pooling (Sec. 3.3.2)
        return c, self.classifier(c)

    @staticmethod
    def loss(multilabel_logits: Tensor, targets: Tensor, literal: bool = False) -> Tensor:
        """Eq. 9, the gce loss, summed over classes and averaged over the B images.

        Eq. 9 prints only L = -sum_c M_c log(M^_c), the positive half of a cross-entropy: on its
        own it is minimised by predicting every class present (M^ -> 1 everywhere), so it cannot
        train a multi-label classifier. We read it as the usual multi-label loss, the per-class
        binary cross-entropy -sum_c [M_c log M^_c + (1 - M_c) log(1 - M^_c)] with M^ =
        sigmoid(logits) (the default). ``literal=True`` computes the printed one-sided sum.
        Both are computed from the logits (log-sigmoid), so they stay finite.

        Args:
            multilabel_logits (Tensor[B, num_obj_classes]): from :meth:`forward`.
            targets (Tensor[B, num_obj_classes]): M in [0, 1] (1 = class present in the image); any
                dtype (bool multi-hot too), cast to the dtype of the logits.
            literal (bool): the printed one-sided sum instead of the binary cross-entropy.

        Returns:
            scalar Tensor (0 for B = 0).
        """
        return _gce_loss(multilabel_logits, targets, literal)


# ---------------------------------------------------------------------------------------------
# Geometric layout encoding (Sec. 3.4.2, Eq. 17 and K2 of Eq. 13)
# ---------------------------------------------------------------------------------------------
class GeometricLayoutEncoding(nn.Module):
    """K2(b_o|s) of Eq. 13: Eq. 17's relative layout -> BatchNorm1d(4) -> Linear(4, out_dim) -> ReLU.

    b_o|s comes from :func:`sgg_kernels.pair_geometry` (box centres; widths and heights clamped to
    >= 1e-6, so degenerate boxes stay finite). The batch norm puts the 4 layout numbers (offsets
    and log-ratios of very different ranges) on one scale.

    Batches of P <= 1 pairs in training mode: BatchNorm1d cannot estimate batch statistics from
    one row (it raises) and from zero rows it would write NaN into its running statistics. Such a
    batch is normalised with the running statistics instead, which are left unchanged (as in eval
    mode); the affine parameters still get gradients.

    Args:
        out_dim (int): width of the embedding (128 in the paper).
    """

    def __init__(self, out_dim: int = 128):
        super().__init__()
        self.out_dim = out_dim
        self.norm = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, out_dim)

    def forward(self, boxes: Tensor, pairs: Tensor) -> Tensor:
        """
        Args:
            boxes (Tensor[K, 4]): (x1, y1, x2, y2).
            pairs (Tensor[P, 2] int64): (subject, object) indices into ``boxes``.

        Returns:
            Tensor[P, out_dim] in the dtype of this module's parameters.
        """
        b = pair_geometry(boxes, pairs).to(self.norm.weight.dtype)  # Eq. 17, [P, 4]
        if self.training and b.shape[0] <= 1:
            b = F.batch_norm(b, self.norm.running_mean, self.norm.running_var, self.norm.weight, self.norm.bias,
                             training=False, momentum=0.0, eps=self.norm.eps)
        else:
            b = self.norm(b)
        return F.relu(self.fc(b))


# ---------------------------------------------------------------------------------------------
# The head
# ---------------------------------------------------------------------------------------------
class LinkNetHead(nn.Module):
    """LinkNet's object and relationship classifiers (Sec. 3.3-3.4, Eq. 1-14).

    Object classification (Sec. 3.3)::

        O0 = (f_RoI, K0 l, c)                   [K, roi_dim + embed_dim + context_dim]
        O2 = rem1(O0)                           [K, hidden]       Eq. 1-3
        O3 = rem2.embed(O2)                     [K, hidden]       Eq. 4-5
        O4 = rem2.fc1(O3)                       [K, C_obj]        Eq. 6 (the returned obj_logits)

    with l = softmax(obj_logits), the detector's label *distribution*, K0 = Linear(C_obj,
    embed_dim, bias=False), and c the context of each box's image.

    Relationship classification (Sec. 3.4)::

        O4' = one_hot(argmax O4)                                  Eq. 10
        E0 = (K1 O4', O3)                       [K, embed_dim + hidden]   Eq. 11
        E1 = rem3(E0)                           [K, 2 union_dim]  ("similar embedding operations")
        G0 = E1[s, :Du] * E1[o, Du:] * F        [P, union_dim]    Eq. 12
        G1 = (G0, K2 b_o|s)                     [P, union_dim + geo_dim]  Eq. 13
        G2 = fc4(G1)                            [P, C_rel]        Eq. 14 (the returned rel_logits)

    K1 is an ``nn.Embedding`` (K1 times a one-hot = a row lookup). fc4 is one
    ``Linear(union_dim + geo_dim, C_rel)``; since G1 is a concatenation, fc4(G1) =
    W[:, :Du] G0 + W[:, Du:] K2(b) + bias: the first term (with the bias) is
    :func:`sgg_kernels.pairwise_edge_fusion`, which never materialises G0, and the second a small
    matmul. The argmax of Eq. 10 passes no gradient to O4; K1 is trained through E1.

    All N x N attention is per image (see :class:`RelationalEmbedding`): boxes of different images
    of a batch never see each other.

    Args:
        roi_dim (int): width of f_RoI (4096 in the paper).
        num_obj_classes (int): C_obj (incl. background if the detector has it).
        num_rel_classes (int): C_rel (incl. background "no relation").
        embed_dim (int): width of K0 l and K1 O4' (200).
        context_dim (int): width of c (512).
        hidden (int): width of O2, O3 (256).
        union_dim (int): width of the union features F (4096); E1 has 2 * union_dim.
        geo_dim (int): width of K2 b_o|s (128).
        r (int): reduction of the relational embeddings (2).
    """

    def __init__(self, roi_dim: int, num_obj_classes: int, num_rel_classes: int, embed_dim: int = 200,
                 context_dim: int = 512, hidden: int = 256, union_dim: int = 4096, geo_dim: int = 128, r: int = 2):
        super().__init__()
        self.roi_dim, self.num_obj_classes, self.num_rel_classes = roi_dim, num_obj_classes, num_rel_classes
        self.embed_dim, self.context_dim, self.hidden = embed_dim, context_dim, hidden
        self.union_dim, self.geo_dim = union_dim, geo_dim
        self.K0 = nn.Linear(num_obj_classes, embed_dim, bias=False)
        self.rem1 = RelationalEmbedding(roi_dim + embed_dim + context_dim, hidden, r)  # Eq. 1-3
        self.rem2 = RelationalEmbedding(hidden, num_obj_classes, r)  # Eq. 4-6
        self.K1 = nn.Embedding(num_obj_classes, embed_dim)  # Eq. 11
        self.rem3 = RelationalEmbedding(embed_dim + hidden, 2 * union_dim, r)  # E0 -> E1
        self.geo = GeometricLayoutEncoding(geo_dim)  # K2 of Eq. 13
        self.fc4 = nn.Linear(union_dim + geo_dim, num_rel_classes)  # Eq. 14

    def _check(self, roi_feats, obj_logits, context, boxes, box_batch, pairs, union_feats) -> None:
        _checks.tensor(roi_feats, "roi_feats", "K, roi_dim")
        K = roi_feats.shape[0]
        _checks.size(roi_feats, "roi_feats", 1, self.roi_dim, "roi_dim")
        _checks.tensor(obj_logits, "obj_logits", "K, num_obj_classes")
        _checks.size(obj_logits, "obj_logits", 0, K, "K, the rows of roi_feats")
        _checks.size(obj_logits, "obj_logits", 1, self.num_obj_classes, "num_obj_classes")
        _checks.tensor(context, "context", "B, context_dim")
        _checks.size(context, "context", 1, self.context_dim, "context_dim")
        _checks.tensor(boxes, "boxes", "K, 4")
        _checks.size(boxes, "boxes", 0, K, "K, the rows of roi_feats")
        _checks.size(boxes, "boxes", 1, 4, "(x1, y1, x2, y2)")
        _check_box_batch(box_batch, K, "K, the rows of roi_feats")
        _checks.tensor(pairs, "pairs", "P, 2", kind="index")
        _checks.size(pairs, "pairs", 1, 2, "(subject, object)")
        _checks.tensor(union_feats, "union_feats", "P, union_dim")
        _checks.size(union_feats, "union_feats", 0, pairs.shape[0], "P, the rows of pairs")
        _checks.size(union_feats, "union_feats", 1, self.union_dim, "union_dim")
        _checks.same_device([("roi_feats", roi_feats), ("obj_logits", obj_logits), ("context", context),
                             ("boxes", boxes), ("box_batch", box_batch), ("pairs", pairs),
                             ("union_feats", union_feats)])
        # boxes may be any float dtype (Eq. 17 is computed in float32/float64, then cast)
        _checks.module_dtype([("roi_feats", roi_feats), ("obj_logits", obj_logits), ("context", context),
                              ("union_feats", union_feats)], "this LinkNetHead", self.fc4.weight.dtype)

    def forward(self, roi_feats: Tensor, obj_logits: Tensor, context: Tensor, boxes: Tensor, box_batch: Tensor,
                pairs: Tensor, union_feats: Tensor, *, obj_labels: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """
        Args:
            roi_feats (Tensor[K, roi_dim]): f_RoI of every box of the batch.
            obj_logits (Tensor[K, num_obj_classes]): the detector's class logits (l = their softmax).
            context (Tensor[B, context_dim]): c of each image (:class:`GlobalContextEncoding`).
            boxes (Tensor[K, 4]): (x1, y1, x2, y2) in image pixels (for Eq. 17).
            box_batch (Tensor[K] int64): image of each box, in [0, B).
            pairs (Tensor[P, 2] int64): (subject, object) indices into the K boxes, both of one image.
            union_feats (Tensor[P, union_dim]): F, the union-box features of each pair.
            obj_labels (Tensor[K] int64 in [0, num_obj_classes), optional): known object labels
                (PredCls): Eq. 10's O4' becomes one_hot(obj_labels) instead of one_hot(argmax O4).
                The returned O4 is computed all the same.

        Returns:
            (obj_logits Tensor[K, num_obj_classes] = O4 of Eq. 6,
             rel_logits Tensor[P, num_rel_classes] = G2 of Eq. 14).

        Raises:
            ValueError naming the argument for wrong shapes or widths, for a float input whose dtype
            is not the head's parameter dtype (outside autocast), or for a pair joining two images;
            IndexError (as every op of the package) for pair indices outside [0, K) or box_batch
            values outside [0, B). Value checks follow :func:`sgg_kernels.set_checks`
            and also run under ``torch.compile`` (they are an op of their own). They cost one fused
            reduction and one host sync per forward, before anything else runs: the ops inside
            then skip theirs (in eager mode; a compiled graph's ops check themselves again).
        """
        self._check(roi_feats, obj_logits, context, boxes, box_batch, pairs, union_feats)
        proved = _checks.module_value_checks()  # eager, checks on: the op below checks everything once
        if obj_labels is not None:
            _checks.tensor(obj_labels, "obj_labels", "K", kind="index")
            _checks.size(obj_labels, "obj_labels", 0, roi_feats.shape[0], "K, the rows of roi_feats")
            _checks.same_device([("roi_feats", roi_feats), ("obj_labels", obj_labels)])
            if proved:  # K1 is an embedding lookup: a label outside [0, C_obj) would read out of bounds
                _checks.index_range(obj_labels, "obj_labels", self.num_obj_classes, "num_obj_classes")
        box_batch = _checked_batch(box_batch, pairs, context.shape[0])
        if not proved:
            return self._forward(roi_feats, obj_logits, context, boxes, box_batch, pairs, union_feats, obj_labels)
        with suspended_value_checks():
            return self._forward(roi_feats, obj_logits, context, boxes, box_batch, pairs, union_feats, obj_labels)

    def _forward(self, roi_feats: Tensor, obj_logits: Tensor, context: Tensor, boxes: Tensor, box_batch: Tensor,
                 pairs: Tensor, union_feats: Tensor, obj_labels: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """:meth:`forward` on arguments already checked (their values included, while checks are on)."""
        # Sec. 3.3.1: O0 = (f_RoI, K0 l, c)
        label_embed = self.K0(torch.softmax(obj_logits, dim=-1))
        # c of each box's image. With set_checks(False), a box_batch value outside [0, B) gets a
        # zero context instead of an out-of-bounds read (DESIGN.md: invalid indices contribute 0).
        B = context.shape[0]
        in_range = ((box_batch >= 0) & (box_batch < B)).unsqueeze(1)
        box_context = context[box_batch.clamp(0, max(B - 1, 0))] * in_range
        O0 = torch.cat([roi_feats, label_embed, box_context], dim=1)
        O2 = self.rem1(O0, box_batch)  # Eq. 1-3
        O3 = self.rem2.embed(O2, box_batch)  # Eq. 4-5
        O4 = self.rem2.fc1(O3)  # Eq. 6

        # Sec. 3.4.1
        # Eq. 10 (row-wise argmax; K1 O4' is a row lookup), or the given labels (PredCls)
        if obj_labels is None:
            label_embed1 = self.K1(O4.argmax(dim=1))
        else:  # with set_checks(False), a label outside [0, C_obj) gets a zero row, never an out-of-bounds read
            C = self.num_obj_classes
            valid = ((obj_labels >= 0) & (obj_labels < C)).unsqueeze(1)
            label_embed1 = self.K1(obj_labels.clamp(0, C - 1)) * valid
        E0 = torch.cat([label_embed1, O3], dim=1)  # Eq. 11
        E1 = self.rem3(E0, box_batch)  # [K, 2 union_dim]: subject half, object half

        Du = self.union_dim
        # Eq. 12-14 without G0: the fused op takes fc4's G0 columns and its bias...
        rel_logits = pairwise_edge_fusion(E1[:, :Du], E1[:, Du:], union_feats, pairs, self.fc4.weight[:, :Du],
                                          self.fc4.bias)
        # ... and Eq. 13's K2(b_o|s) columns are a separate small matmul.
        rel_logits = rel_logits + F.linear(self.geo(boxes, pairs), self.fc4.weight[:, Du:])
        return O4, rel_logits


# ---------------------------------------------------------------------------------------------
# Losses (Eq. 8, 9, 16)
# ---------------------------------------------------------------------------------------------
def _cross_entropy(logits: Tensor, labels: Tensor, name: str) -> Tensor:
    _checks.tensor(logits, f"{name}_logits", "N, C")
    _checks.tensor(labels, f"{name}_labels", "N", kind="index")
    _checks.size(labels, f"{name}_labels", 0, logits.shape[0], f"N, the rows of {name}_logits")
    # Mean over rows; 0 (not NaN) when there are none.
    return F.cross_entropy(logits, labels, reduction="sum") / max(logits.shape[0], 1)


def linknet_losses(obj_logits: Tensor, obj_labels: Tensor, rel_logits: Tensor, rel_labels: Tensor,
                   multilabel_logits: Optional[Tensor] = None,
                   multilabel_targets: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """LinkNet's losses (Sec. 3.5), each a mean over its rows.

    Eq. 8 and 16 write -sum V log V^ with V^ = O4 (resp. G2): the cross-entropy of the softmax of
    the logits, which is what ``F.cross_entropy`` computes. Eq. 9 is :meth:`GlobalContextEncoding.loss`
    (binary cross-entropy reading).

    Args:
        obj_logits (Tensor[K, C_obj]), obj_labels (Tensor[K] int64): Eq. 8.
        rel_logits (Tensor[P, C_rel]), rel_labels (Tensor[P] int64, 0 = background): Eq. 16.
        multilabel_logits (Tensor[B, C_obj]), multilabel_targets (Tensor[B, C_obj] in [0, 1]):
            Eq. 9, both or neither.

    Returns:
        dict with ``"loss_obj_cls"`` (Eq. 8), ``"loss_rel_cls"`` (Eq. 16) and, when given,
        ``"loss_gce"`` (Eq. 9). Empty inputs give 0.
    """
    losses = {
        "loss_obj_cls": _cross_entropy(obj_logits, obj_labels, "obj"),  # Eq. 8
        "loss_rel_cls": _cross_entropy(rel_logits, rel_labels, "rel"),  # Eq. 16
    }
    if (multilabel_logits is None) != (multilabel_targets is None):
        raise ValueError("pass multilabel_logits and multilabel_targets together (Eq. 9), or neither")
    if multilabel_logits is not None:
        losses["loss_gce"] = _gce_loss(multilabel_logits, multilabel_targets)  # Eq. 9
    return losses
