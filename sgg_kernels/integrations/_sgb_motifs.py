"""The post-decoding step of Scene-Graph-Benchmark's ``MotifPredictor`` on the fused sum-form op.

SGB's ``MotifPredictor.forward`` (maskrcnn_benchmark/modeling/roi_heads/relation_head/
roi_relation_predictors.py), after its context decoder, computes per pair p = (s, o)::

    edge_rep = post_emb(edge_ctx)                     # [K, 2h]; head = edge_rep[:, :h], tail = edge_rep[:, h:]
    prod_rep = post_cat(cat(head[s], tail[o]))        # [P, pooling_dim]
    prod_rep = prod_rep * up_dim(union)  or  * union  # PREDICT_USE_VISION (up_dim when the widths differ)
    rel_dists = rel_compress(prod_rep)                # [P, num_rel]
              + freq_bias.obj_baseline[label_s * num_obj + label_o]   # PREDICT_USE_BIAS

A linear map of a concatenation is a sum of two per-object projections:
post_cat(cat(head[s], tail[o])) = head[s] W_h^T + tail[o] W_t^T + b_cat, with W_h, W_t the head
and tail column blocks of post_cat's weight. :class:`MotifsPairHead` therefore projects each
*object* once, a = head W_h^T + b_cat and b = tail W_t^T (``[K, pooling_dim]``: K objects, not P
pairs), and hands a, b, the union features and rel_compress to
``sgg_kernels.pairwise_edge_fusion(..., mode="sum")``, which computes
((a[s] + b[o]) * u) W_rc^T + b_rc without materialising the ``[P, pooling_dim]`` products, forward
and backward. At SGDet scale (P = 25,280 pairs of 320 boxes, h = 512, pooling_dim = 4096,
float32) SGB forms the [P, 2h] concatenation (99 MiB), the post_cat output and its product with the
union features (395 MiB each), and keeps them for backward; here only a and b ([K, 4096]: 5 MiB
each) and the [P, num_rel] logits are formed.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _checks
from .._backend import suspended_value_checks
from ..ops.batch import pack_pairs
from ..ops.pairs import pairwise_edge_fusion
from ._config import config_key

__all__ = ["MotifsPairHead"]

def _cfg(config, path: str):
    return config_key(config, path, "MotifsPairHead.from_config")


def _xavier(layer: nn.Linear) -> None:
    """SGB's ``layer_init(layer, xavier=True)`` (utils_relation.py): xavier-normal weight (gain 1), zero bias."""
    nn.init.xavier_normal_(layer.weight, gain=1.0)
    nn.init.constant_(layer.bias, 0.0)


class _FrequencyBias(nn.Module):
    """SGB's ``FrequencyBias`` (model_motifs.py), the part a predictor's forward uses:
    ``obj_baseline = Embedding(num_obj^2, num_rel)``, row ``s_label * num_obj + o_label`` holds the
    bias of that ordered label pair (SGB fills it with ``statistics['pred_dist']``, the training
    set's log predicate frequencies; here given as ``pred_dist`` or zeros). Key:
    ``freq_bias.obj_baseline.weight``."""

    def __init__(self, num_obj_classes: int, num_rel_classes: int, pred_dist: Optional[Tensor] = None):
        super().__init__()
        self.num_objs = num_obj_classes
        self.obj_baseline = nn.Embedding(num_obj_classes * num_obj_classes, num_rel_classes)
        with torch.no_grad():
            if pred_dist is None:
                self.obj_baseline.weight.zero_()
            else:
                want = (num_obj_classes, num_obj_classes, num_rel_classes)
                if not isinstance(pred_dist, Tensor) or tuple(pred_dist.shape) != want:
                    got = list(pred_dist.shape) if isinstance(pred_dist, Tensor) else type(pred_dist).__name__
                    raise ValueError(f"pred_dist must be a Tensor{list(want)} (num_obj, num_obj, num_rel: SGB's "
                                     f"get_dataset_statistics(cfg)['pred_dist']), got {got}")
                self.obj_baseline.weight.copy_(pred_dist.reshape(-1, num_rel_classes))

    def index_with_labels(self, pair_labels_s: Tensor, pair_labels_o: Tensor) -> Tensor:
        """Subject and object labels ``[P]`` int64 -> ``[P, num_rel]``."""
        return self.obj_baseline(pair_labels_s * self.num_objs + pair_labels_o)


class MotifsPairHead(nn.Module):
    """SGB ``MotifPredictor``'s post-decoding (post_emb -> post_cat -> x union -> rel_compress +
    frequency bias) with the pairwise step fused (module docstring): relation logits of P pairs
    from K objects' context features.

    Args:
        hidden_dim (int): h, the width of ``edge_ctx`` (SGB ``CONTEXT_HIDDEN_DIM``, 512).
        pooling_dim (int): width of the pair representation (``CONTEXT_POOLING_DIM``, 4096).
        num_obj_classes (int): object classes with background (``ROI_BOX_HEAD.NUM_CLASSES``, 151 for VG).
        num_rel_classes (int): predicate classes with "no relation" (``ROI_RELATION_HEAD.NUM_CLASSES``, 51).
        union_dim (int or None): width of the union features (``ROI_BOX_HEAD.MLP_HEAD_DIM``); None
            means ``pooling_dim``. When it differs from ``pooling_dim``, ``up_dim = Linear(union_dim,
            pooling_dim)`` maps them first, as in SGB (created whatever ``use_vision``, as SGB does).
        use_vision (bool): multiply by the union features (``PREDICT_USE_VISION``).
        use_bias (bool): add the frequency bias (``PREDICT_USE_BIAS``).
        pred_dist (Tensor[num_obj, num_obj, num_rel] or None): initial frequency bias (SGB's
            ``get_dataset_statistics(cfg)['pred_dist']``); None: zeros (load SGB's trained table
            with :meth:`load_sgb_state_dict`).

    Parameters, with SGB's names, shapes and initialisation (``layer_init`` of utils_relation.py),
    so a ``MotifPredictor`` state_dict loads into it (:meth:`load_sgb_state_dict`):

    - ``post_emb.weight [2h, h]``, ``post_emb.bias [2h]``: normal(0, 10 / sqrt(h)), zero bias;
    - ``post_cat.weight [pooling_dim, 2h]``, ``post_cat.bias [pooling_dim]``: xavier normal, zero;
    - ``rel_compress.weight [num_rel, pooling_dim]``, ``rel_compress.bias [num_rel]``: xavier normal, zero;
    - ``up_dim.weight [pooling_dim, union_dim]``, ``up_dim.bias [pooling_dim]`` (only when union_dim !=
      pooling_dim): xavier normal, zero;
    - ``freq_bias.obj_baseline.weight [num_obj^2, num_rel]`` (only with use_bias): ``pred_dist`` or zeros.

    A MotifPredictor's other keys (``context_layer.*``: the LSTM context, object embeddings) belong
    to its context encoder, which this head does not replace.

    Memory: with ``union_dim == pooling_dim`` (SGB's relation configs: 4096 and 4096) no
    ``[P, pooling_dim]`` tensor is formed, forward or backward: a and b are ``[K, pooling_dim]``.
    With ``up_dim``, ``u = up_dim(union_features)`` is one ``[P, pooling_dim]`` tensor (its product
    with a[s] + b[o] is bilinear in u and the pair's rows, so it does not fold into per-object
    projections); the products and the concatenation are still never formed.
    """

    def __init__(self, hidden_dim: int, pooling_dim: int, num_obj_classes: int, num_rel_classes: int,
                 union_dim: Optional[int] = None, use_vision: bool = True, use_bias: bool = True,
                 pred_dist: Optional[Tensor] = None):
        super().__init__()
        what = "MotifsPairHead"
        self.hidden_dim = _checks.positive_int(hidden_dim, "hidden_dim", f"{what}: the width of edge_ctx")
        self.pooling_dim = _checks.positive_int(pooling_dim, "pooling_dim", f"{what}: the pair representation width")
        self.num_obj_classes = _checks.positive_int(num_obj_classes, "num_obj_classes", "object classes, background included")
        self.num_rel_classes = _checks.positive_int(num_rel_classes, "num_rel_classes",
                                                    "predicate classes, 'no relation' included")
        self.union_dim = self.pooling_dim if union_dim is None else _checks.positive_int(
            union_dim, "union_dim", "the width of union_features (SGB's MLP_HEAD_DIM)")
        for name, flag in (("use_vision", use_vision), ("use_bias", use_bias)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        self.use_vision, self.use_bias = use_vision, use_bias
        h = self.hidden_dim
        self.post_emb = nn.Linear(h, 2 * h)
        self.post_cat = nn.Linear(2 * h, self.pooling_dim)
        self.rel_compress = nn.Linear(self.pooling_dim, self.num_rel_classes, bias=True)
        # SGB: layer_init(post_emb, 10.0 * (1.0 / hidden_dim) ** 0.5, normal=True), xavier for the others
        nn.init.normal_(self.post_emb.weight, mean=0.0, std=10.0 * (1.0 / h) ** 0.5)
        nn.init.constant_(self.post_emb.bias, 0.0)
        _xavier(self.post_cat)
        _xavier(self.rel_compress)
        self.union_single_not_match = self.union_dim != self.pooling_dim  # SGB's attribute name
        if self.union_single_not_match:
            self.up_dim = nn.Linear(self.union_dim, self.pooling_dim)
            _xavier(self.up_dim)
        if use_bias:
            self.freq_bias = _FrequencyBias(self.num_obj_classes, self.num_rel_classes, pred_dist)

    @classmethod
    def from_config(cls, cfg, statistics: Optional[Dict[str, Tensor]] = None) -> "MotifsPairHead":
        """Build from an SGB config (read by attribute: a yacs CfgNode or any object tree):

        - ``MODEL.ROI_RELATION_HEAD.CONTEXT_HIDDEN_DIM`` -> hidden_dim;
        - ``MODEL.ROI_RELATION_HEAD.CONTEXT_POOLING_DIM`` -> pooling_dim;
        - ``MODEL.ROI_BOX_HEAD.NUM_CLASSES`` -> num_obj_classes;
        - ``MODEL.ROI_RELATION_HEAD.NUM_CLASSES`` -> num_rel_classes;
        - ``MODEL.ROI_BOX_HEAD.MLP_HEAD_DIM`` -> union_dim;
        - ``MODEL.ROI_RELATION_HEAD.PREDICT_USE_VISION`` -> use_vision;
        - ``MODEL.ROI_RELATION_HEAD.PREDICT_USE_BIAS`` -> use_bias.

        Every key is required (ValueError naming a missing one). ``statistics``: SGB's
        ``get_dataset_statistics(cfg)``; its ``'pred_dist'`` initialises the frequency bias.
        """
        pred_dist = None
        if statistics is not None:
            if "pred_dist" not in statistics:
                raise ValueError("statistics must hold 'pred_dist' (SGB's get_dataset_statistics(cfg)), "
                                 f"got keys {sorted(statistics)}")
            pred_dist = statistics["pred_dist"]
        rel = "MODEL.ROI_RELATION_HEAD."
        return cls(
            hidden_dim=_cfg(cfg, rel + "CONTEXT_HIDDEN_DIM"),
            pooling_dim=_cfg(cfg, rel + "CONTEXT_POOLING_DIM"),
            num_obj_classes=_cfg(cfg, "MODEL.ROI_BOX_HEAD.NUM_CLASSES"),
            num_rel_classes=_cfg(cfg, rel + "NUM_CLASSES"),
            union_dim=_cfg(cfg, "MODEL.ROI_BOX_HEAD.MLP_HEAD_DIM"),
            use_vision=bool(_cfg(cfg, rel + "PREDICT_USE_VISION")),
            use_bias=bool(_cfg(cfg, rel + "PREDICT_USE_BIAS")),
            pred_dist=pred_dist,
        )

    def load_sgb_state_dict(self, state_dict: Dict[str, Tensor], prefix: str = "") -> List[str]:
        """Load this head's parameters from an SGB ``MotifPredictor`` state_dict.

        ``prefix``: where the predictor sits in the dict (``"roi_heads.relation.predictor."`` in a
        whole SGB detector's checkpoint; ``""`` for ``predictor.state_dict()``). Every key of
        :meth:`state_dict` must be there under ``prefix`` (a missing or misshapen one raises, as
        ``load_state_dict(strict=True)``); the others are left alone. Returns the keys under
        ``prefix`` that were not used (``context_layer.*``, ...).
        """
        mine = set(self.state_dict())
        picked, unused = {}, []
        for key, value in state_dict.items():
            if not key.startswith(prefix):
                continue
            local = key[len(prefix):]
            if local in mine:
                picked[local] = value
            else:
                unused.append(key)
        self.load_state_dict(picked, strict=True)
        return unused

    def _check(self, edge_ctx: Tensor, obj_preds: Optional[Tensor], pairs: Tensor,
               union_features: Optional[Tensor]) -> None:
        _checks.tensor(edge_ctx, "edge_ctx", "K, hidden_dim")
        K = edge_ctx.shape[0]
        _checks.size(edge_ctx, "edge_ctx", 1, self.hidden_dim, "hidden_dim of MotifsPairHead")
        _checks.tensor(pairs, "pairs", "P, 2", kind="index")
        _checks.size(pairs, "pairs", 1, 2, "(subject, object)")
        named = [("edge_ctx", edge_ctx), ("pairs", pairs)]
        if self.use_bias:
            if obj_preds is None:
                raise ValueError("obj_preds (Tensor[K] int64, the predicted label of each object) is needed with "
                                 "use_bias=True (the frequency bias is indexed by the pair's labels)")
            _checks.tensor(obj_preds, "obj_preds", "K", kind="index")
            _checks.size(obj_preds, "obj_preds", 0, K, "K, the rows of edge_ctx")
            named.append(("obj_preds", obj_preds))
        if self.use_vision:
            if union_features is None:
                raise ValueError(f"union_features (Tensor[P, {self.union_dim}]) is needed with use_vision=True; "
                                 "pass use_vision=False for SGB's PREDICT_USE_VISION = False")
            _checks.tensor(union_features, "union_features", "P, union_dim")
            _checks.size(union_features, "union_features", 0, pairs.shape[0], "P, the number of pairs")
            _checks.size(union_features, "union_features", 1, self.union_dim, "union_dim of MotifsPairHead")
            named.append(("union_features", union_features))
        _checks.same_device(named + [("the parameters of MotifsPairHead", self.rel_compress.weight)])
        _checks.module_dtype([("edge_ctx", edge_ctx), ("union_features", union_features if self.use_vision else None)],
                             "MotifsPairHead", self.rel_compress.weight.dtype)

    def forward(self, edge_ctx: Tensor, obj_preds: Optional[Tensor], pairs: Tensor,
                union_features: Optional[Tensor] = None) -> Tensor:
        """Relation logits of packed pairs.

        Args:
            edge_ctx (Tensor[K, hidden_dim]): the context decoder's edge features of the K objects of
                the batch, packed over images (SGB's ``edge_ctx``).
            obj_preds (Tensor[K] int64 or None): predicted object labels in [0, num_obj_classes)
                (SGB's ``obj_preds``); may be None when ``use_bias`` is False.
            pairs (Tensor[P, 2] int64): (subject, object) global indices into the K objects.
            union_features (Tensor[P, union_dim] or None): union-box features of the pairs; needed
                when ``use_vision`` (ignored otherwise, as SGB does).

        Returns:
            Tensor[P, num_rel_classes]: SGB's ``rel_dists`` (before its per-image split).

        Raises:
            ValueError / TypeError for wrong shapes, dtypes or devices; IndexError for ``pairs`` outside
            [0, K) or ``obj_preds`` outside [0, num_obj_classes) (one fused check and one sync, while
            value checks are on: :func:`sgg_kernels.set_checks`).
        """
        self._check(edge_ctx, obj_preds, pairs, union_features)
        if _checks.module_value_checks():
            entries = [("pairs", pairs, edge_ctx.shape[0], "K, the rows of edge_ctx")]
            if self.use_bias:
                entries.append(("obj_preds", obj_preds, self.num_obj_classes, "num_obj_classes"))
            _checks.index_ranges(entries)
            with suspended_value_checks():
                return self._forward(edge_ctx, obj_preds, pairs, union_features)
        return self._forward(edge_ctx, obj_preds, pairs, union_features)

    def _forward(self, edge_ctx: Tensor, obj_preds: Optional[Tensor], pairs: Tensor,
                 union_features: Optional[Tensor]) -> Tensor:
        h = self.hidden_dim
        edge_rep = self.post_emb(edge_ctx)  # [K, 2h]: head = [:, :h], tail = [:, h:] (SGB's view(K, 2, h))
        w_cat = self.post_cat.weight  # [pooling_dim, 2h] = [W_h | W_t]
        # post_cat(cat(head[s], tail[o])) = (head W_h^T + b_cat)[s] + (tail W_t^T)[o]: per object, [K, pooling_dim]
        a = F.linear(edge_rep[:, :h], w_cat[:, :h], self.post_cat.bias)
        b = F.linear(edge_rep[:, h:], w_cat[:, h:])
        u = None
        if self.use_vision:
            u = self.up_dim(union_features) if self.union_single_not_match else union_features
        rel_dists = pairwise_edge_fusion(a, b, u, pairs, self.rel_compress.weight, self.rel_compress.bias, mode="sum")
        if self.use_bias:
            rel_dists = rel_dists + self.freq_bias.index_with_labels(obj_preds[pairs[:, 0]], obj_preds[pairs[:, 1]])
        return rel_dists

    def forward_lists(self, edge_ctx: Tensor, obj_preds: Optional[Tensor], rel_pair_idxs: Sequence[Tensor],
                      num_objs: Sequence[int], union_features: Optional[Tensor] = None) -> List[Tensor]:
        """SGB's per-image interface: ``rel_pair_idxs`` (list of Tensor[P_i, 2] int64, indices local to
        image i) and ``num_objs`` (list of int, K_i; sum = K) instead of packed pairs;
        ``union_features`` ``[sum P_i, union_dim]`` in the same order (SGB's concatenation).
        Returns the list of per-image ``[P_i, num_rel_classes]`` logits (SGB's
        ``rel_dists.split(num_rels)``)."""
        pairs = pack_pairs(rel_pair_idxs, num_objs)  # checks each image's indices against its K_i
        total = sum(int(n) for n in num_objs)
        if isinstance(edge_ctx, Tensor) and edge_ctx.dim() >= 1 and edge_ctx.shape[0] != total:
            raise ValueError(f"edge_ctx has {edge_ctx.shape[0]} rows but num_objs sums to {total}: edge_ctx must "
                             "hold every image's objects, packed in image order")
        out = self.forward(edge_ctx, obj_preds, pairs, union_features)
        return list(out.split([int(p.shape[0]) for p in rel_pair_idxs], dim=0))

    def extra_repr(self) -> str:
        return (f"hidden_dim={self.hidden_dim}, pooling_dim={self.pooling_dim}, union_dim={self.union_dim}, "
                f"num_obj_classes={self.num_obj_classes}, num_rel_classes={self.num_rel_classes}, "
                f"use_vision={self.use_vision}, use_bias={self.use_bias}")
