"""LinkNet (Woo et al., NeurIPS'18) as a Scene-Graph-Benchmark.pytorch relation predictor.

:class:`LinkNetPredictor` has the interface of SGB's ``roi_relation_predictors.py`` predictors
(``MotifPredictor``, ``IMPPredictor``, ...): built as ``LinkNetPredictor(cfg, in_channels)``, called
as ``forward(proposals, rel_pair_idxs, rel_labels, rel_binarys, roi_features, union_features,
logger=None)`` and returning ``(obj_dists, rel_dists, add_losses)`` with per-image lists. Inside,
the batch is packed once (:func:`sgg_kernels.integrations.sgb.boxlists_to_batch`) and one
:class:`sgg_kernels.models.LinkNetHead` runs on all images together (its N x N attention is masked
per image, so images never see each other).

To plug it into SGB, register it next to SGB's predictors (nothing here imports maskrcnn_benchmark)::

    from maskrcnn_benchmark.modeling import registry
    from sgg_kernels.integrations.sgb import LinkNetPredictor
    registry.ROI_RELATION_PREDICTOR.register("LinkNetPredictor", LinkNetPredictor)
    # cfg.MODEL.ROI_RELATION_HEAD.PREDICTOR = "LinkNetPredictor"
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _checks
from ..models.linknet import GlobalContextEncoding, LinkNetHead
from ._config import MISSING, config_key
from ._sgb_motifs import _FrequencyBias  # SGB's FrequencyBias, shared with MotifsPairHead

__all__ = ["LinkNetPredictor"]

GCE_SOURCES = ("roi_mean", "feature_map", "none")
def _cfg(config, path: str, default=MISSING):
    return config_key(config, path, "LinkNetPredictor", default)


def _to_onehot(labels: Tensor, num_classes: int, dtype: torch.dtype, fill: float = 1000.0) -> Tensor:
    """SGB's ``utils_motifs.to_onehot``: logits -fill everywhere and +fill at each row's label, so
    their softmax is the one-hot vector (exactly, in float32 and float64)."""
    out = torch.full((labels.shape[0], num_classes), -fill, dtype=dtype, device=labels.device)
    return out.scatter_(1, labels.unsqueeze(1), fill)


class LinkNetPredictor(nn.Module):
    """LinkNet's relation predictor (Sec. 3.3-3.5, Eq. 1-17) behind SGB's predictor interface.

    Config keys read by attribute (any object with SGB's key names: a yacs CfgNode, nested
    SimpleNamespaces, ...). In brackets, the value used when a key is absent: SGB's default or the
    value of SGB's relation configs (configs/e2e_relation_X_101_32_8_FPN_1x.yaml):

    - ``MODEL.ROI_BOX_HEAD.NUM_CLASSES`` (required): C_obj, background included (151 for VG);
    - ``MODEL.ROI_RELATION_HEAD.NUM_CLASSES`` (required): C_rel, "no relation" included (51);
    - ``MODEL.ROI_RELATION_HEAD.USE_GT_BOX`` [True], ``USE_GT_OBJECT_LABEL`` [False]: the mode, as
      SGB derives it (``predcls`` = both, ``sgcls`` = GT boxes only, ``sgdet`` = neither);
    - ``MODEL.ROI_RELATION_HEAD.PREDICT_USE_VISION`` [True]: must be True (Eq. 12 multiplies by the
      union features F: LinkNet has no form without them);
    - ``MODEL.ROI_RELATION_HEAD.PREDICT_USE_BIAS`` [True]: add SGB's frequency bias (not in the paper);
    - ``MODEL.ROI_RELATION_HEAD.EMBED_DIM`` [200]: width of K0 l and K1 O4' (the paper's 200);
    - ``MODEL.ROI_RELATION_HEAD.CONTEXT_HIDDEN_DIM`` [512]: width of O2, O3 (the paper uses 256);
    - ``MODEL.ROI_RELATION_HEAD.CONTEXT_POOLING_DIM`` [4096]: union_dim, the width of F; E1 is twice
      that (the paper's 4096 / 8192);
    - ``MODEL.ROI_BOX_HEAD.MLP_HEAD_DIM`` [``in_channels``]: width of SGB's union features; when it
      differs from CONTEXT_POOLING_DIM they go through ``up_dim = Linear(MLP_HEAD_DIM,
      CONTEXT_POOLING_DIM)`` first, as in SGB's predictors;
    - ``MODEL.ATTRIBUTE_ON`` [False]: must be False (LinkNet predicts no attributes);
    - ``MODEL.RESNETS.BACKBONE_OUT_CHANNELS`` [256]: channels of the FPN maps, only for
      ``GCE_SOURCE = "feature_map"``;
    - LinkNet's own keys, none of them in SGB, under ``MODEL.ROI_RELATION_HEAD.LINKNET`` (with yacs,
      add the node before merging a config file: ``cfg.MODEL.ROI_RELATION_HEAD.LINKNET = CN()``
      and its keys): ``GCE_SOURCE`` ["roi_mean"], ``GCE_LOSS`` [True], ``GEO_DIM`` [128, the
      paper's], ``REDUCTION`` [2, the paper's r].

    **Global context (Sec. 3.3.2): the decision.** The paper's c is the average-pooled feature map
    of the RPN (512 channels), and the gce loss (Eq. 9) trains a multi-label classifier on it. SGB's
    predictor interface passes no feature map: ``ROIRelationHead`` calls the predictor with the
    pooled ``roi_features`` and ``union_features`` only. ``GCE_SOURCE`` chooses:

    - ``"roi_mean"`` (default: works in SGB unchanged): c_b = the mean of ``roi_features`` over the
      boxes of image b (``in_channels`` wide; zeros for an image without boxes). Deviation: it
      averages the image's box features after the box head's fc7, not the whole map before it, so
      it sees only what the proposals cover (in SGDet, up to 80 boxes that cover most of the image);
      gradients reach ``roi_features`` through it.
    - ``"feature_map"``: the paper's c from the FPN maps, which the caller passes as an extra
      keyword ``forward(..., features=features)`` (SGB's ``ROIRelationHead.forward`` has them: a
      one-line change there). c = the mean over the FPN levels of each level's global average
      pool (``BACKBONE_OUT_CHANNELS`` wide); the levels are weighted equally (each is the whole
      image); the paper has one map.
    - ``"none"``: no context (c has width 0) and no gce loss: the paper's ablation without GCE.

    The multi-label targets of Eq. 9 come from the proposals' ``"labels"`` field (the predictor gets
    no targets): M[b, c] = 1 iff some proposal of image b is labelled c >= 1 (background is never
    "present"). With GT boxes (PredCls, SGCls) these are exactly the image's GT classes; in SGDet
    training they are the GT classes matched by some proposal (SGB's sampler labels every proposal).
    The loss, binary cross-entropy summed over classes and averaged over images
    (:meth:`GlobalContextEncoding.loss`), is ``add_losses["loss_gce"]``, in training only and only
    when ``GCE_LOSS`` is True and the source is not ``"none"``.

    **Modes.** Input class distribution l (Sec. 3.3.1): with ``USE_GT_OBJECT_LABEL``, SGB's one-hot
    logits of the GT ``"labels"`` (``to_onehot``, +-1000, so softmax(l) is exactly one-hot);
    otherwise the detector's ``"predict_logits"``, detached (as SGB's Motifs context does). PredCls
    returns the one-hot GT logits as ``obj_dists`` (SGB's convention) and uses the GT labels for
    Eq. 10's O4' and for the frequency bias; SGCls / SGDet return O4 (Eq. 6) and use argmax O4 (over
    all classes, background included, as Eq. 10 writes it). Deviations from SGB's Motifs: no
    per-class NMS of the object predictions at SGDet test time, and no teacher forcing with GT
    labels in training (LinkNet has no decoder).

    Not used: ``rel_labels``, ``rel_binarys`` and ``logger`` (as in SGB's MotifPredictor). The
    object and relation cross-entropies (Eq. 8, 16) are SGB's loss evaluator's (``loss_refine_obj``
    and ``loss_rel`` from the returned dists), so ``add_losses`` holds only the gce loss.

    Args:
        config: SGB's cfg (or any object with those attributes).
        in_channels (int): width of ``roi_features`` (f_RoI; SGB passes its box feature extractor's
            out_channels, MLP_HEAD_DIM).
        statistics (dict, optional): SGB's ``get_dataset_statistics(cfg)``; its ``"pred_dist"``
            ``[C_obj, C_obj, C_rel]`` initialises the frequency bias (as SGB's FrequencyBias does).
            Without it the bias starts at zero (load it from a checkpoint, or let it train).

    Submodules: ``head`` (:class:`LinkNetHead`), ``gce`` (:class:`GlobalContextEncoding` or None),
    ``up_dim`` (when the union widths differ), ``freq_bias.obj_baseline`` (with PREDICT_USE_BIAS).
    """

    def __init__(self, config, in_channels: int, statistics: Optional[dict] = None):
        super().__init__()
        in_channels = _checks.positive_int(in_channels, "in_channels", "the width of roi_features")
        if bool(_cfg(config, "MODEL.ATTRIBUTE_ON", False)):
            raise NotImplementedError("LinkNetPredictor predicts no attributes: set MODEL.ATTRIBUTE_ON = False")
        rh = "MODEL.ROI_RELATION_HEAD"
        self.num_obj_cls = _checks.positive_int(_cfg(config, "MODEL.ROI_BOX_HEAD.NUM_CLASSES"),
                                                "MODEL.ROI_BOX_HEAD.NUM_CLASSES", "object classes")
        self.num_rel_cls = _checks.positive_int(_cfg(config, f"{rh}.NUM_CLASSES"), f"{rh}.NUM_CLASSES",
                                                "relation classes")
        use_gt_box = bool(_cfg(config, f"{rh}.USE_GT_BOX", True))
        self.use_gt_label = bool(_cfg(config, f"{rh}.USE_GT_OBJECT_LABEL", False))
        # SGB (model_motifs.LSTMContext): the mode follows USE_GT_BOX first
        self.mode = ("predcls" if self.use_gt_label else "sgcls") if use_gt_box else "sgdet"
        if not bool(_cfg(config, f"{rh}.PREDICT_USE_VISION", True)):
            raise ValueError(f"LinkNetPredictor needs union features (Eq. 12: G0 = E1_s * E1_o * F): set "
                             f"{rh}.PREDICT_USE_VISION = True")
        self.use_bias = bool(_cfg(config, f"{rh}.PREDICT_USE_BIAS", True))
        embed_dim = _checks.positive_int(_cfg(config, f"{rh}.EMBED_DIM", 200), f"{rh}.EMBED_DIM", "label embedding")
        hidden = _checks.positive_int(_cfg(config, f"{rh}.CONTEXT_HIDDEN_DIM", 512), f"{rh}.CONTEXT_HIDDEN_DIM",
                                      "width of O2, O3")
        self.pooling_dim = _checks.positive_int(_cfg(config, f"{rh}.CONTEXT_POOLING_DIM", 4096),
                                                f"{rh}.CONTEXT_POOLING_DIM", "width of the union features F")
        self.mlp_head_dim = _checks.positive_int(_cfg(config, "MODEL.ROI_BOX_HEAD.MLP_HEAD_DIM", in_channels),
                                                 "MODEL.ROI_BOX_HEAD.MLP_HEAD_DIM", "width of SGB's union features")
        ln = f"{rh}.LINKNET"
        self.gce_source = _cfg(config, f"{ln}.GCE_SOURCE", "roi_mean")
        if self.gce_source not in GCE_SOURCES:
            raise ValueError(f"{ln}.GCE_SOURCE must be one of {', '.join(map(repr, GCE_SOURCES))}, "
                             f"got {self.gce_source!r}")
        self.gce_loss = bool(_cfg(config, f"{ln}.GCE_LOSS", True))
        geo_dim = _checks.positive_int(_cfg(config, f"{ln}.GEO_DIM", 128), f"{ln}.GEO_DIM", "width of K2 b_o|s")
        r = _checks.positive_int(_cfg(config, f"{ln}.REDUCTION", 2), f"{ln}.REDUCTION", "r of Eq. 1-3")

        if self.gce_source == "roi_mean":
            context_dim = in_channels
        elif self.gce_source == "feature_map":
            context_dim = _checks.positive_int(_cfg(config, "MODEL.RESNETS.BACKBONE_OUT_CHANNELS", 256),
                                               "MODEL.RESNETS.BACKBONE_OUT_CHANNELS", "channels of the FPN maps")
        else:
            context_dim = 0
        self.in_channels, self.context_dim = in_channels, context_dim
        self.gce = GlobalContextEncoding(context_dim, self.num_obj_cls) if context_dim else None
        self.head = LinkNetHead(in_channels, self.num_obj_cls, self.num_rel_cls, embed_dim=embed_dim,
                                context_dim=context_dim, hidden=hidden, union_dim=self.pooling_dim,
                                geo_dim=geo_dim, r=r)
        self.union_single_not_match = self.pooling_dim != self.mlp_head_dim  # SGB's name for it
        if self.union_single_not_match:
            self.up_dim = nn.Linear(self.mlp_head_dim, self.pooling_dim)
            nn.init.xavier_normal_(self.up_dim.weight, gain=1.0)  # SGB's layer_init(xavier=True)
            nn.init.zeros_(self.up_dim.bias)
        if self.use_bias:
            pred_dist = None if statistics is None else statistics.get("pred_dist")
            self.freq_bias = _FrequencyBias(self.num_obj_cls, self.num_rel_cls, pred_dist)

    # -----------------------------------------------------------------------------------------
    def _field(self, proposals: Sequence, name: str, why: str, width: Optional[int] = None) -> Tensor:
        """The field ``name`` of every proposal, concatenated: one row per box (of ``width`` columns if given)."""
        out = []
        for i, p in enumerate(proposals):
            has = p.has_field(name) if hasattr(p, "has_field") else name in getattr(p, "extra_fields", {})
            if not has:
                raise ValueError(f"proposals[{i}] has no field {name!r}, which LinkNetPredictor needs {why} "
                                 f"(mode {self.mode}); SGB's relation sampler / box head adds it")
            value = p.get_field(name)
            want = (len(p),) if width is None else (len(p), width)
            if not isinstance(value, Tensor) or tuple(value.shape) != want:
                got = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"proposals[{i}].get_field({name!r}) must be a Tensor{list(want)} (one "
                                 f"{'label' if width is None else f'row of {width} logits'} per box), got {got}")
            out.append(value)
        return torch.cat(out, dim=0)

    def _labels(self, proposals: Sequence, device, why: str) -> Tensor:
        labels = self._field(proposals, "labels", why).to(device=device, dtype=torch.int64)
        _checks.index_range(labels, "proposals' 'labels'", self.num_obj_cls, "MODEL.ROI_BOX_HEAD.NUM_CLASSES")
        return labels

    def _context(self, roi_features: Tensor, box_batch: Tensor, B: int, features) -> Tensor:
        """c [B, context_dim] of each image (see the class docstring, Global context)."""
        if self.gce_source == "none":
            return roi_features.new_zeros(B, 0)
        if self.gce_source == "roi_mean":
            sums = roi_features.new_zeros(B, roi_features.shape[1]).index_add(0, box_batch, roi_features)
            counts = torch.bincount(box_batch, minlength=B).clamp_min(1).to(roi_features.dtype)
            return sums / counts.unsqueeze(1)
        if features is None:
            raise ValueError("GCE_SOURCE 'feature_map' needs the FPN maps: call forward(..., features=features) with "
                             "the list of [B, C, H_l, W_l] maps ROIRelationHead.forward receives")
        levels = [features] if isinstance(features, Tensor) else list(features)
        if not levels:
            raise ValueError("features must be a non-empty list of [B, C, H_l, W_l] maps")
        pooled = []
        for i, level in enumerate(levels):
            name = f"features[{i}]"
            _checks.tensor(level, name, "B, C, H, W")
            _checks.size(level, name, 0, B, "B, the number of images in proposals")
            _checks.size(level, name, 1, self.context_dim, "MODEL.RESNETS.BACKBONE_OUT_CHANNELS")
            pooled.append(level.mean(dim=(2, 3)))  # Sec. 3.3.2: global average pooling
        return torch.stack(pooled, 0).mean(0).to(roi_features.dtype)

    def forward(self, proposals: Sequence, rel_pair_idxs: Sequence[Tensor], rel_labels, rel_binarys,
                roi_features: Tensor, union_features: Tensor, logger=None,
                features: Optional[Sequence[Tensor]] = None) -> Tuple[List[Tensor], List[Tensor], Dict[str, Tensor]]:
        """
        Args:
            proposals (list of BoxList): one per image, mode ``"xyxy"``, with ``"labels"`` (PredCls,
                and in training for the gce loss) and ``"predict_logits"`` [N_i, C_obj] (SGCls / SGDet).
            rel_pair_idxs (list of Tensor[P_i, 2] int64): (subject, object) indices local to image i.
            rel_labels, rel_binarys: unused (SGB passes them; may be None).
            roi_features (Tensor[K, in_channels]): f_RoI of every box, images in order (K = sum N_i).
            union_features (Tensor[P, MLP_HEAD_DIM]): SGB's union-box features of every pair (P = sum P_i).
            logger: unused.
            features (list of Tensor[B, C, H_l, W_l], optional): the FPN maps, for
                ``GCE_SOURCE = "feature_map"`` only.

        Returns:
            (obj_dists: list of Tensor[N_i, C_obj] object logits,
             rel_dists: list of Tensor[P_i, C_rel] relation logits,
             add_losses: dict, ``{"loss_gce": scalar}`` in training with the gce loss on, else ``{}``).

        Raises:
            TypeError / ValueError from :func:`~sgg_kernels.integrations.sgb.boxlists_to_batch` for a
            proposal that is not a BoxList, a BoxList in mode ``"xywh"`` (call
            ``boxlist.convert("xyxy")``) or ``rel_pair_idxs`` with another number of images than
            ``proposals``; IndexError for pair indices outside [0, N_i) or labels outside
            [0, C_obj); ValueError for ``roi_features`` / ``union_features`` whose rows or widths
            do not match the proposals / pairs, a missing ``union_features`` or proposal field.
            All before any kernel runs.
        """
        from .sgb import boxlists_to_batch, split_objects, split_pairs  # here, not at the top: sgb.py re-exports us

        if rel_pair_idxs is None:
            raise ValueError("rel_pair_idxs is None: pass one Tensor[P_i, 2] int64 of (subject, object) indices per "
                             "image (SGB's relation sampler or prepare_test_pairs makes them)")
        batch = boxlists_to_batch(proposals, rel_pair_idxs)
        B, K, P = len(batch.num_objs), batch.boxes.shape[0], batch.pairs.shape[0]
        _checks.tensor(roi_features, "roi_features", "K, in_channels")
        if roi_features.shape[0] != K:
            raise ValueError(f"roi_features has {roi_features.shape[0]} rows but the proposals hold {K} boxes "
                             f"({batch.num_objs} per image): pass one row per proposal, images in order")
        _checks.size(roi_features, "roi_features", 1, self.in_channels, "in_channels of this LinkNetPredictor")
        if union_features is None:
            raise ValueError("union_features is None: LinkNet needs them (Eq. 12); SGB computes them when "
                             "MODEL.ROI_RELATION_HEAD.PREDICT_USE_VISION = True")
        _checks.tensor(union_features, "union_features", "P, MLP_HEAD_DIM")
        if union_features.shape[0] != P:
            raise ValueError(f"union_features has {union_features.shape[0]} rows but rel_pair_idxs hold {P} pairs "
                             f"({batch.num_rels} per image): pass one row per pair, images in order")
        _checks.size(union_features, "union_features", 1, self.mlp_head_dim, "MODEL.ROI_BOX_HEAD.MLP_HEAD_DIM")
        _checks.same_device([("roi_features", roi_features), ("proposals' boxes", batch.boxes),
                             ("union_features", union_features)])
        device, dtype = roi_features.device, roi_features.dtype

        need_labels = self.use_gt_label or (self.training and self.gce is not None and self.gce_loss)
        labels = self._labels(proposals, device, "for PredCls or the gce loss") if need_labels else None
        if self.use_gt_label:  # SGB: the GT labels as one-hot logits
            obj_logits = _to_onehot(labels, self.num_obj_cls, dtype)
        else:  # SGB (Motifs): the detector's logits, detached
            obj_logits = self._field(proposals, "predict_logits", "as the label distribution l", self.num_obj_cls)
            obj_logits = obj_logits.detach().to(device=device, dtype=dtype)

        context = self._context(roi_features, batch.box_batch, B, features)  # Sec. 3.3.2
        add_losses: Dict[str, Tensor] = {}
        if self.gce is not None:
            context, multilabel_logits = self.gce(context[:, :, None, None])  # 1 x 1 "map": c unchanged
            if self.training and self.gce_loss:
                present = torch.zeros(B, self.num_obj_cls, dtype=dtype, device=device)
                present[batch.box_batch, labels] = 1.0
                present[:, 0] = 0.0  # background is never a class present in the image
                add_losses["loss_gce"] = GlobalContextEncoding.loss(multilabel_logits, present)  # Eq. 9

        union = self.up_dim(union_features) if self.union_single_not_match else union_features
        predcls = self.mode == "predcls"
        O4, rel_dists = self.head(roi_features, obj_logits, context, batch.boxes, batch.box_batch, batch.pairs,
                                  union, obj_labels=labels if predcls else None)
        obj_dists = obj_logits if predcls else O4
        if self.use_bias:  # SGB's frequency bias, indexed by the labels Eq. 10 used
            preds = labels if predcls else O4.argmax(dim=1)
            pair_labels = torch.stack([preds[batch.pairs[:, 0]], preds[batch.pairs[:, 1]]], dim=1)
            rel_dists = rel_dists + self.freq_bias.index_with_labels(pair_labels[:, 0], pair_labels[:, 1]).to(rel_dists.dtype)
        return split_objects(obj_dists, batch.num_objs), split_pairs(rel_dists, batch.num_rels), add_losses
