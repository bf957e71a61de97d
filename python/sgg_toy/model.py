"""ToySGG: a small PredCls model for the toy scenes that uses all four families of sgg_kernels.

    from sgg_toy import SceneDataset, collate
    from sgg_toy.model import ToySGG
    model = ToySGG()
    batch = collate([SceneDataset(8)[i] for i in range(8)])
    out = model(batch["images"], batch["boxes"], batch["box_batch"], batch["labels"], batch["masks"],
                gt_rels=batch["gt_rels"])          # training: out["loss"], out["losses"]
    out["rel_logits"]                               # [P, 9] over out["pairs"] = sk.all_pairs(box_batch)

Every normalisation is per image (GroupNorm, per-image attention in SIL and LinkNet) and every loss
is a mean over the images of a per-image mean, so a batch split across processes (DDP averages the
gradients) gives the gradient of the whole batch. The one exception is the BatchNorm1d inside
LinkNet's geometric layout encoding: in training mode it normalises with the statistics of the
pairs it sees (per process under DDP).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sgg_kernels as sk
from sgg_kernels.models import EdgeGrounding, GaussianPairMasks, GlobalContextEncoding, LinkNetHead, RDE, SILNetwork

from .data import OBJECT_CLASSES, PREDICATES

__all__ = ["ToySGG", "pair_labels"]


def pair_labels(pairs: Tensor, gt_rels: Tensor, num_boxes: int) -> Tensor:
    """Tensor[P] int64: the annotated predicate of each candidate pair, 0 (background) if none.

    Args:
        pairs (Tensor[P, 2] int64), gt_rels (Tensor[R, 3] int64): global (subject, object[, predicate]).
        num_boxes (int): K.
    """
    table = torch.zeros(num_boxes * num_boxes, dtype=torch.int64, device=pairs.device)
    table[gt_rels[:, 0] * num_boxes + gt_rels[:, 1]] = gt_rels[:, 2]
    return table[pairs[:, 0] * num_boxes + pairs[:, 1]]


def _per_image_mean(values: Tensor, image: Tensor, num_images: int, weights: Optional[Tensor] = None) -> Tensor:
    """mean over the images b that have rows of (sum_{i in b} w_i v_i / sum_{i in b} w_i)."""
    w = torch.ones_like(values) if weights is None else weights.to(values.dtype)
    num = values.new_zeros(num_images).index_add(0, image, w * values)
    den = values.new_zeros(num_images).index_add(0, image, w)
    has = den > 0
    return (num[has] / den[has]).sum() / max(int(has.sum()), 1)


class _SharedEdgeClassifier:
    """RDE's relation classifier: the G0 columns of the head's own fc4 (Eq. 14) with its bias.

    A plain callable, not a Module, so fc4 is not registered a second time under ``rde``.
    """

    def __init__(self, head: LinkNetHead):
        self._head = [head]  # a list keeps nn.Module.__setattr__ from adopting it

    def __call__(self, g0: Tensor) -> Tensor:
        head = self._head[0]
        return F.linear(g0, head.fc4.weight[:, :head.union_dim], head.fc4.bias)


class ToySGG(nn.Module):
    """A PredCls model: conv backbone -> SIL -> RoIAlign / union RoIAlign + Gaussian pair masks -> LinkNet -> RDE.

    Data flow and shapes (B images of 64 x 64, K objects packed, P = sum_i N_i (N_i - 1) ordered pairs,
    D = ``dim``, m = 14 mask side, R = ``pool`` = 7)::

        images [B, 3, 64, 64]
          -> backbone: 3 x (Conv3x3 - GroupNorm - ReLU), strides 2, 2, 1 -> fmap [B, D, 16, 16]
          -> SILNetwork(D, depth=1, 16 centres)(fmap, boxes, box_batch, 1/4)    [B, D, 16, 16]
        context, multilabel = GlobalContextEncoding(D, 12)(fmap)                  [B, D], [B, 12]
        pairs = sk.all_pairs(box_batch)                                           [P, 2]
        roi   = sk.roi_align(fmap, boxes, box_batch, R, 1/4, 2, aligned=True)     [K, D, R, R]
              -> flatten -> Linear -> ReLU                                        [K, roi_dim]
        union = sk.union_roi_align(fmap, boxes, box_batch, pairs, R, 1/4, 2, True) [P, D, R, R]
        m_pair = GaussianPairMasks(12)(masks[:, None], onehot(labels), pairs,
                                       boxes, out_size=R)                         [P, 1, R, R]  Eq. 6
        union = EdgeGrounding(D, 1)(union, m_pair) -> ReLU -> flatten
                -> Linear -> ReLU                                                 [P, union_dim]  Eq. 7
        obj_logits, rel_logits = LinkNetHead(...)(roi, det_logits = GT one-hot
                                    as logits, context, boxes, box_batch, pairs, union)  [K, 12], [P, 9]
        training: G0 = E1[s, :Du] * E1[o, Du:] * union                            [P, union_dim]
                  RDE(union_dim, 9, 12)(G0, rel_labels, ...) per image            (losses only)

    **PredCls and LinkNetHead.** The head has no argument for ground-truth labels: it takes the
    detector's logits and uses softmax(logits) in O0 (Eq. 1), and its *own* object prediction
    argmax(O4) in Eq. 10. We feed the GT labels as logits (0 on the GT class, -1e4 elsewhere, so
    softmax is exactly one-hot) and train O4 with LinkNet's object loss (Eq. 8); O4 sees the GT
    one-hot in its input and learns to copy it within the first steps, after which Eq. 10 gets the
    GT class too. Nothing else in the head changes.

    **Pair masks.** Each object's own visible mask as one channel (C = 1): with one-hot class
    channels the per-channel product of Eq. 6 would be non-zero only for pairs of the same class.
    The variance head gets the GT label as a one-hot score vector (background column 0 empty).

    **RDE.** The relation representation is LinkNet's G0 (Eq. 12), which the fused head never
    materialises; during training a forward hook keeps E1 and G0 is formed for the P pairs (small
    here). RDE's classifier is the head's own fc4 restricted to the G0 columns (shared weights).
    FDVAE's sigma branches attend over all rows they are given, so RDE runs image by image (each
    image's pairs are its "batch"), with the deterministic shuffle j(k) = (k + 1) mod n_i: that
    keeps the loss a mean of per-image terms, which a split batch reproduces exactly.

    **Losses** (``gt_rels`` given): ``rel`` = per-image weighted cross-entropy over all candidate
    pairs, background pairs weighted by ``bg_weight`` (instead of SGB's fg/bg sampling: same effect
    in expectation, deterministic); ``obj`` (Eq. 8) and ``gce`` (Eq. 9) per image; ``rde`` = RDE's
    total (Eq. 6 without L_pred) times ``rde_weight``. Each is a mean over images of a per-image
    mean; ``loss`` is their sum.

    Args:
        dim (int): D, channels of the feature map (64).
        roi_dim, union_dim (int): widths of the object and union features (128).
        hidden (int): LinkNet's O2/O3 width (64). embed_dim, geo_dim (int): 32.
        pool (int): R, the RoIAlign output size (7).
        sil_centers (int): superpixel centres (16 = 4 x 4 on the 16 x 16 map).
        rde_blocks (int): FDVAE blocks per branch (1).
        bg_weight (float): weight of background pairs in the relation loss (0.5).
        rde_weight (float): weight of the RDE losses (0.5).
    """

    def __init__(self, dim: int = 64, roi_dim: int = 128, union_dim: int = 128, hidden: int = 64,
                 embed_dim: int = 32, geo_dim: int = 32, pool: int = 7, sil_centers: int = 16, rde_blocks: int = 1,
                 bg_weight: float = 0.5, rde_weight: float = 0.5,
                 num_obj_classes: int = len(OBJECT_CLASSES), num_rel_classes: int = len(PREDICATES)):
        super().__init__()
        self.dim, self.pool, self.scale = dim, pool, 1.0 / 4
        self.num_obj_classes, self.num_rel_classes = num_obj_classes, num_rel_classes
        self.bg_weight, self.rde_weight = float(bg_weight), float(rde_weight)
        half = dim // 2

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(inplace=True)]

        self.backbone = nn.Sequential(*block(3, half, 2), *block(half, dim, 2), *block(dim, dim, 1))
        self.sil = SILNetwork(dim, depth=1, num_centers=sil_centers, heads=2, mlp_hidden=2 * dim, encoder_layers=1,
                              encoder_head_dim=min(32, dim), dropout=0.0, encoder_ffn=2 * dim)
        self.context = GlobalContextEncoding(dim, num_obj_classes)
        self.roi_fc = nn.Sequential(nn.Flatten(), nn.Linear(dim * pool * pool, roi_dim), nn.ReLU(inplace=True))
        self.pair_masks = GaussianPairMasks(num_obj_classes, kernel_size=5, per="pair")
        self.edge_grounding = EdgeGrounding(dim, 1)
        self.union_fc = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(dim * pool * pool, union_dim), nn.ReLU())
        self.head = LinkNetHead(roi_dim, num_obj_classes, num_rel_classes, embed_dim=embed_dim, context_dim=dim,
                                hidden=hidden, union_dim=union_dim, geo_dim=geo_dim)
        self.rde = RDE(union_dim, num_rel_classes, num_obj_classes, num_blocks=rde_blocks, info_hidden=hidden,
                       classifier=_SharedEdgeClassifier(self.head))
        self._e1: Optional[Tensor] = None
        self.head.rem3.register_forward_hook(self._keep_e1)

    def _keep_e1(self, module, inputs, output) -> None:
        self._e1 = output if self.training else None

    def relation_features(self, union: Tensor, pairs: Tensor) -> Tensor:
        """G0 of Eq. 12, ``[P, union_dim]``, from the E1 kept by the last training forward."""
        Du = self.head.union_dim
        return self._e1[pairs[:, 0], :Du] * self._e1[pairs[:, 1], Du:] * union

    def forward(self, images: Tensor, boxes: Tensor, box_batch: Tensor, labels: Tensor, masks: Tensor,
                gt_rels: Optional[Tensor] = None) -> Dict[str, object]:
        """
        Args:
            images (Tensor[B, 3, H, W]); boxes (Tensor[K, 4]) in image pixels; box_batch (Tensor[K]
            int64), non-decreasing; labels (Tensor[K] int64) GT classes (PredCls); masks (Tensor[K, m,
            m]) each object's visible mask in its box frame; gt_rels (Tensor[R, 3] int64 or None):
            global (subject, object, predicate); given, the losses are computed.

        Returns:
            dict with ``pairs [P, 2]``, ``rel_logits [P, C_rel]``, ``obj_logits [K, C_obj]`` and,
            with ``gt_rels``, ``losses`` (dict of scalars) and ``loss``.
        """
        B, K = images.shape[0], boxes.shape[0]
        fmap = self.backbone(images)                                          # [B, D, H/4, W/4]
        fmap = self.sil(fmap, boxes, box_batch, self.scale)                   # SIL, Eq. 1-9
        context, multilabel = self.context(fmap)                             # [B, D], [B, C_obj]
        pairs = sk.all_pairs(box_batch)                                       # [P, 2]
        roi = self.roi_fc(sk.roi_align(fmap, boxes, box_batch, self.pool, self.scale, 2, True))
        union = sk.union_roi_align(fmap, boxes, box_batch, pairs, self.pool, self.scale, 2, True)
        one_hot = F.one_hot(labels, self.num_obj_classes).to(fmap.dtype)    # PredCls: GT labels
        scores = torch.cat([one_hot.new_zeros(K, 1), one_hot], dim=1)       # [K, C_obj + 1], bg column 0
        m_pair = self.pair_masks(masks[:, None].to(fmap.dtype), scores, pairs, boxes, out_size=self.pool)  # Eq. 6
        union = self.union_fc(self.edge_grounding(union, m_pair))             # Eq. 7 -> [P, union_dim]
        det_logits = (one_hot - 1.0) * 1e4                                    # softmax = the GT one-hot
        obj_logits, rel_logits = self.head(roi, det_logits, context, boxes, box_batch, pairs, union)
        out: Dict[str, object] = {"pairs": pairs, "rel_logits": rel_logits, "obj_logits": obj_logits}
        if gt_rels is None:
            return out

        rel_labels = pair_labels(pairs, gt_rels, K)
        pair_image = box_batch[pairs[:, 0]]
        w = torch.where(rel_labels > 0, 1.0, self.bg_weight).to(rel_logits.dtype)
        losses = {
            "rel": _per_image_mean(F.cross_entropy(rel_logits, rel_labels, reduction="none"), pair_image, B, w),
            "obj": _per_image_mean(F.cross_entropy(obj_logits, labels, reduction="none"), box_batch, B),  # Eq. 8
        }
        present = torch.zeros(B, self.num_obj_classes, dtype=fmap.dtype, device=fmap.device)
        present[box_batch, labels] = 1
        losses["gce"] = GlobalContextEncoding.loss(multilabel, present)                                 # Eq. 9
        if self.rde_weight > 0:
            g0 = self.relation_features(union, pairs)
            total, n = g0.new_zeros(()), 0
            for b in range(B):  # per image (see the class docstring); pairs are sorted by image
                sel = (pair_image == b).nonzero().squeeze(1)
                if sel.numel() == 0:
                    continue
                n_b = sel.numel()
                shuffle = (torch.arange(n_b, device=sel.device) + 1) % n_b
                r = self.rde(g0[sel], rel_labels[sel], labels[pairs[sel, 0]], labels[pairs[sel, 1]], shuffle=shuffle)
                total, n = total + r["total"], n + 1
            losses["rde"] = self.rde_weight * total / max(n, 1)
        self._e1 = None
        out["losses"] = losses
        out["loss"] = sum(losses.values())
        return out
