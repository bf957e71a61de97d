"""Scene-Graph-Benchmark.pytorch (SGB) drop-ins: BoxList adapters and relation-head modules.

SGB's relation heads receive per-image lists: ``proposals`` (one ``BoxList`` per image: ``.bbox``
``[N_i, 4]``, ``.size`` = (width, height), ``.mode``, fields such as ``"labels"``) and
``rel_pair_idxs`` (one ``[P_i, 2]`` int64 tensor of (subject, object) indices local to image i).
sgg_kernels' ops take the packed form of DESIGN.md (``boxes [K, 4]``, ``box_batch [K]``, global
``pairs [P, 2]``). The adapters below convert between the two::

    from sgg_kernels.integrations.sgb import boxlists_to_batch, split_pairs
    batch = boxlists_to_batch(proposals, rel_pair_idxs)
    union = sk.union_roi_align(features, batch.boxes, batch.box_batch, batch.pairs, 7, scales, 2)
    per_image = split_pairs(union, batch.num_rels)  # SGB's union.split(num_rels, dim=0)

Nothing here imports ``maskrcnn_benchmark``: a BoxList is recognised by its attributes (duck typing).
"""
from __future__ import annotations

import numbers
from typing import List, NamedTuple, Optional, Sequence, Tuple

from torch import Tensor

from ..ops.batch import pack_boxes, pack_pairs

__all__ = ["SGBBatch", "boxlists_to_batch", "split_objects", "split_pairs", "UnionFeatureExtractor", "MotifsPairHead",
           "LinkNetPredictor"]


class SGBBatch(NamedTuple):
    """A batch of SGB proposals (and pairs) in sgg_kernels' packed form.

    Fields:
        boxes (Tensor[K, 4]): every image's ``.bbox`` (x1, y1, x2, y2) in image pixels, images in order.
        box_batch (Tensor[K] int64): image of each box.
        pairs (Tensor[P, 2] int64 or None): (subject, object) global indices into ``boxes``;
            None when no ``rel_pair_idxs`` were given.
        num_objs (list of int): boxes per image (SGB's ``[len(p) for p in proposals]``).
        num_rels (list of int): pairs per image (``[len(r) for r in rel_pair_idxs]``); empty list
            when no pairs were given.
        image_sizes (list of (int, int)): each BoxList's ``.size``, (width, height).
    """

    boxes: Tensor
    box_batch: Tensor
    pairs: Optional[Tensor]
    num_objs: List[int]
    num_rels: List[int]
    image_sizes: List[Tuple[int, int]]


def _is_boxlist(b) -> bool:
    return (hasattr(b, "bbox") and isinstance(b.bbox, Tensor) and hasattr(b, "size") and hasattr(b, "mode")
            and hasattr(b, "__len__"))


def _image_size(b, i: int) -> Tuple[int, int]:
    size = b.size
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(v, numbers.Integral) or (isinstance(v, numbers.Real) and float(v).is_integer())
                       for v in size)):
        raise ValueError(f"proposals[{i}].size must be the image size (width, height) as two ints, got {size!r}")
    return int(size[0]), int(size[1])


def _check_proposals(proposals) -> List:
    if isinstance(proposals, Tensor) or not isinstance(proposals, (list, tuple)):
        raise TypeError(f"proposals must be a list of BoxList (one per image), got {type(proposals).__name__}")
    if len(proposals) == 0:
        raise ValueError("proposals needs at least one image (an empty list has no device or dtype)")
    for i, b in enumerate(proposals):
        if not _is_boxlist(b):
            raise TypeError(f"proposals[{i}] must be a BoxList (an object with .bbox Tensor[N, 4], .size (w, h) "
                            f"and .mode), got {type(b).__name__}")
        if b.mode != "xyxy":
            raise ValueError(f"proposals[{i}] is a BoxList in mode {b.mode!r}; sgg_kernels reads (x1, y1, x2, y2) "
                             "boxes: call boxlist.convert(\"xyxy\") first")
        if b.bbox.dim() != 2 or b.bbox.shape[1] != 4:
            raise ValueError(f"proposals[{i}].bbox must be a Tensor[N, 4], got shape {list(b.bbox.shape)}")
        if len(b) != b.bbox.shape[0]:
            raise ValueError(f"proposals[{i}] has len {len(b)} but its .bbox has {b.bbox.shape[0]} rows")
    return list(proposals)


def boxlists_to_batch(proposals: Sequence, rel_pair_idxs: Optional[Sequence[Tensor]] = None) -> SGBBatch:
    """Pack SGB's per-image proposals (and relation pairs) into sgg_kernels' batch form.

    Args:
        proposals (list of BoxList): one per image, mode ``"xyxy"`` (N_i may be 0).
        rel_pair_idxs (list of Tensor[P_i, 2] int64, optional): (subject, object) indices local to
            image i, in [0, N_i) (P_i may be 0).

    Returns:
        :class:`SGBBatch` (boxes [K, 4], box_batch [K], pairs [P, 2] or None, num_objs, num_rels,
        image_sizes), K = sum N_i, P = sum P_i, images in list order.

    Raises:
        TypeError for an entry that is not a BoxList; ValueError for a BoxList in mode ``"xywh"``
        (convert it with ``boxlist.convert("xyxy")``), for ``rel_pair_idxs`` with another number of
        images than ``proposals``, or pairs on another device; IndexError for pair indices outside
        [0, N_i) (from :func:`sgg_kernels.pack_pairs`).
    """
    proposals = _check_proposals(proposals)
    image_sizes = [_image_size(b, i) for i, b in enumerate(proposals)]
    boxes, box_batch = pack_boxes([b.bbox for b in proposals])
    num_objs = [int(b.bbox.shape[0]) for b in proposals]
    if rel_pair_idxs is None:
        return SGBBatch(boxes, box_batch, None, num_objs, [], image_sizes)
    if isinstance(rel_pair_idxs, Tensor) or not isinstance(rel_pair_idxs, (list, tuple)):
        raise TypeError("rel_pair_idxs must be a list (one Tensor[P_i, 2] int64 per image), "
                        f"got {type(rel_pair_idxs).__name__}")
    if len(rel_pair_idxs) != len(proposals):
        raise ValueError(f"rel_pair_idxs has {len(rel_pair_idxs)} images but proposals has {len(proposals)}; "
                         "pass one Tensor[P_i, 2] per image (P_i may be 0)")
    pairs = pack_pairs(list(rel_pair_idxs), num_objs)
    if pairs.device != boxes.device:
        raise ValueError(f"rel_pair_idxs are on {pairs.device} but proposals' boxes are on {boxes.device}; "
                         "move them to one device")
    num_rels = [int(r.shape[0]) for r in rel_pair_idxs]
    return SGBBatch(boxes, box_batch, pairs, num_objs, num_rels, image_sizes)


def _split(x: Tensor, counts: Sequence[int], xname: str, cname: str, what: str) -> List[Tensor]:
    if not isinstance(x, Tensor) or x.dim() == 0:
        got = "a 0-dim tensor" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{xname} must be a tensor whose dim 0 runs over {what}, got {got}")
    if isinstance(counts, Tensor):
        counts = counts.tolist()
    if not isinstance(counts, (list, tuple)) or not all(
            isinstance(c, numbers.Integral) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise ValueError(f"{cname} must be a list of ints >= 0 ({what} per image), got {counts!r}")
    if sum(counts) != x.shape[0]:
        raise ValueError(f"{xname} has {x.shape[0]} rows but {cname} sums to {sum(counts)} ({list(counts)}); "
                         f"pass the {cname} of the batch that produced {xname}")
    return list(x.split([int(c) for c in counts], dim=0))


def split_objects(x: Tensor, num_objs: Sequence[int]) -> List[Tensor]:
    """Per-image pieces of a per-object tensor: SGB's ``x.split(num_objs, dim=0)``.

    Args:
        x (Tensor[K, ...]): one row per box of the packed batch.
        num_objs (list of int): boxes per image (:attr:`SGBBatch.num_objs`); must sum to K.

    Returns:
        list of Tensor[N_i, ...] (views of ``x``).
    """
    return _split(x, num_objs, "x", "num_objs", "objects")


def split_pairs(x: Tensor, num_rels: Sequence[int]) -> List[Tensor]:
    """Per-image pieces of a per-pair tensor: SGB's ``x.split(num_rels, dim=0)``.

    Args:
        x (Tensor[P, ...]): one row per pair of the packed batch.
        num_rels (list of int): pairs per image (:attr:`SGBBatch.num_rels`); must sum to P.

    Returns:
        list of Tensor[P_i, ...] (views of ``x``).
    """
    return _split(x, num_rels, "x", "num_rels", "pairs")


# The modules, defined in private files and imported after the adapters they use.
from ._sgb_union import UnionFeatureExtractor  # noqa: E402
from ._sgb_motifs import MotifsPairHead  # noqa: E402
from ._sgb_linknet import LinkNetPredictor  # noqa: E402
