"""Batch helpers: per-image lists (Scene-Graph-Benchmark style) <-> packed batch tensors.

Objects of a batch are packed as ``boxes [K, 4]`` with ``box_batch [K]`` (the image of each box);
pairs are ``pairs [P, 2]`` int64 (subject, object) of global indices into the K boxes.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from .. import _checks


def _image_list(value, name: str, what: str) -> list:
    """``value`` as a list of per-image entries: a list or tuple (not a tensor, which would be one
    image's rows), with at least one image."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list (one entry per image) of {what}, got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{name} needs at least one image (an empty list has no device or dtype)")
    return list(value)


def _count(value, name: str) -> int:
    """A per-image box count: an int >= 0, or an integer tensor holding one."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point() and value.dtype != torch.bool:
        value = int(value)
    return _checks.int_at_least(value, name, 0, "the number of boxes of that image")


def pack_boxes(boxes_per_image: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """Concatenate per-image boxes.

    Args:
        boxes_per_image (list of Tensor[K_i, 4]): boxes (x1, y1, x2, y2) of each image (K_i may be 0).

    Returns:
        (boxes Tensor[K, 4], box_batch Tensor[K] int64), K = sum K_i, images in list order.
    """
    boxes_per_image = _image_list(boxes_per_image, "boxes_per_image", "Tensor[K_i, 4] boxes")
    for i, b in enumerate(boxes_per_image):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
            got = list(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"boxes_per_image[{i}] must be a Tensor[K_i, 4] of (x1, y1, x2, y2), got {got}")
    _checks.same_device([(f"boxes_per_image[{i}]", b) for i, b in enumerate(boxes_per_image)])
    device = boxes_per_image[0].device
    counts = torch.tensor([b.shape[0] for b in boxes_per_image], device=device)
    box_batch = torch.repeat_interleave(torch.arange(len(boxes_per_image), device=device), counts)
    return torch.cat(list(boxes_per_image), dim=0), box_batch


def pack_pairs(rel_pair_idxs: Sequence[Tensor], num_objs: Sequence[int]) -> Tensor:
    """Turn per-image local pair indices into global ones.

    Args:
        rel_pair_idxs (list of Tensor[P_i, 2] int64): (subject, object) indices local to image i.
        num_objs (list of int, or an int64 Tensor[images]): boxes per image, the K_i of :func:`pack_boxes`.

    Returns:
        Tensor[P, 2] int64: indices into the packed boxes (image i's offset is sum_{j<i} K_j).
    """
    rel_pair_idxs = _image_list(rel_pair_idxs, "rel_pair_idxs", "Tensor[P_i, 2] int64 pairs")
    if isinstance(num_objs, Tensor) and num_objs.dim() == 1:
        num_objs = list(num_objs.unbind(0))
    num_objs = _image_list(num_objs, "num_objs", "box counts K_i (ints), e.g. [len(b) for b in boxes_per_image]")
    if len(rel_pair_idxs) != len(num_objs):
        raise ValueError(f"rel_pair_idxs has {len(rel_pair_idxs)} images but num_objs has {len(num_objs)}")
    out: List[Tensor] = []
    offset = 0
    for i, (pairs, n) in enumerate(zip(rel_pair_idxs, num_objs)):
        n = _count(n, f"num_objs[{i}]")
        if not isinstance(pairs, Tensor) or pairs.dim() != 2 or pairs.shape[1] != 2:
            got = list(pairs.shape) if isinstance(pairs, Tensor) else type(pairs).__name__
            raise ValueError(f"rel_pair_idxs[{i}] must be a Tensor[P_i, 2] of (subject, object), got {got}")
        if pairs.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"rel_pair_idxs[{i}] must hold integer indices, got {pairs.dtype}")
        if pairs.numel() and (int(pairs.min()) < 0 or int(pairs.max()) >= n):
            raise IndexError(f"rel_pair_idxs[{i}] holds indices outside [0, {n}) (num_objs[{i}] = {n})")
        out.append(pairs.to(torch.int64) + offset)
        offset += n
    _checks.same_device([(f"rel_pair_idxs[{i}]", p) for i, p in enumerate(rel_pair_idxs)])
    return torch.cat(out, dim=0)


def all_pairs(box_batch: Tensor) -> Tensor:
    """Every ordered pair (i, j), i != j, of boxes in the same image (SGDet/SGCls candidate pairs).

    Args:
        box_batch (Tensor[K] int64): image index of each box.

    Returns:
        Tensor[P, 2] int64 in lexicographic (subject, object) order; P = sum_i K_i (K_i - 1).
    """
    if not isinstance(box_batch, Tensor) or box_batch.dim() != 1 or box_batch.dtype != torch.int64:
        got = f"{box_batch.dtype} tensor of shape {list(box_batch.shape)}" if isinstance(box_batch, Tensor) else type(box_batch).__name__
        raise ValueError(f"box_batch must be an int64 Tensor[K], got {got}")
    K = box_batch.shape[0]
    same = box_batch[:, None] == box_batch[None, :]
    same &= ~torch.eye(K, dtype=torch.bool, device=box_batch.device)
    return same.nonzero()
