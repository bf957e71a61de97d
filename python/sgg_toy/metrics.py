"""Scene-graph metrics for PredCls, as Scene-Graph-Benchmark.pytorch (SGB) computes them, and the FREQ baseline.

Graph-constrained recall, R@K (SGB ``SGRecall``, from Neural-MOTIFS). Per image:

  1. Each candidate pair (s, o) contributes ONE triplet (s, o, p*), p* = 1 + argmax(rel_scores[1:])
     (background column 0 excluded; ties to the lower predicate), scored
     rel_scores[p*] * obj_score[s] * obj_score[o]. In PredCls the object scores are 1 (SGB sets
     them to ones), so the score is the predicate score.
  2. Triplets are ranked by score, descending; ties keep the input order (a stable sort; SGB uses
     ``torch.sort``, whose tie order is unspecified).
  3. A GT triplet (s, o, p) is matched at K if one of the top-K triplets equals it. In PredCls the
     predicted boxes and labels ARE the GT ones, so equality of (subject index, object index,
     predicate) is the match. (SGB matches by (subject class, predicate, object class) plus IoU >= 0.5
     of both boxes; with GT boxes that is index equality except when two GT objects of the same
     class overlap with IoU >= 0.5, where SGB would also credit the swapped object.)
  4. recall_i@K = matched GT / number of GT triplets of image i.

R@K is the mean of recall_i@K over the images with at least one GT relation (SGB skips images
without GT relations).

Mean recall, mR@K (SGB ``SGMeanRecall``, from VCTree/KERN). For each image i and each predicate c
present in its GT: recall_{i,c}@K = matched GT triplets of class c / GT triplets of class c. The
per-class recall is the mean of recall_{i,c}@K over the images whose GT contains c (an average of
per-image ratios, not pooled counts). mR@K = sum over c = 1..C-1 of the per-class recall, divided by
C - 1; a predicate absent from every evaluated image counts as recall 0, exactly as in SGB
(``skip_absent_classes=True`` divides by the number of present classes instead).

One difference from SGB, on purpose: SGB also skips an image whose prediction has no candidate
pair at all (which inflates recall); here such an image counts with recall 0. With all-pairs
candidates (PredCls) an image with a GT relation always has candidates, so results agree.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor


def _np(x, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # pragma: no cover - message only
        raise TypeError(f"{name} must be a Tensor or array, got {type(x).__name__}") from e


def rank_triplets(pairs, rel_scores, obj_scores=None) -> Tuple[np.ndarray, np.ndarray]:
    """Graph-constrained triplets of one image, best first.

    Args:
        pairs (Tensor[P, 2] int): candidate (subject, object) indices local to the image.
        rel_scores (Tensor[P, C]): predicate scores, column 0 = background (ignored for the choice).
        obj_scores (Tensor[N] | None): object scores; None = all ones (PredCls).

    Returns:
        (triplets ndarray[P, 3] int64 (subject, object, predicate), scores ndarray[P] float64),
        sorted by score descending, ties in input order.
    """
    pairs = _np(pairs, "pairs").astype(np.int64).reshape(-1, 2)
    rel_scores = _np(rel_scores, "rel_scores").astype(np.float64)
    if rel_scores.ndim != 2 or rel_scores.shape[0] != pairs.shape[0] or rel_scores.shape[1] < 2:
        raise ValueError(f"rel_scores must be [P, C] with P = {pairs.shape[0]} pairs and C >= 2 "
                         f"(background + predicates), got {list(rel_scores.shape)}")
    pred = 1 + rel_scores[:, 1:].argmax(1)
    score = rel_scores[np.arange(len(pred)), pred]
    if obj_scores is not None:
        obj = _np(obj_scores, "obj_scores").astype(np.float64)
        score = score * obj[pairs[:, 0]] * obj[pairs[:, 1]]
    order = np.argsort(-score, kind="stable")
    return np.column_stack([pairs, pred])[order], score[order]


def evaluate(
    predictions: Sequence[tuple],
    ground_truth: Sequence,
    num_predicates: int,
    ks: Iterable[int] = (20, 50, 100),
    skip_absent_classes: bool = False,
    per_class: bool = False,
) -> Dict[str, object]:
    """R@K and mR@K over a set of images (definitions in the module docstring).

    Args:
        predictions (list): per image, ``(pairs [P, 2], rel_scores [P, C])`` or
            ``(pairs, rel_scores, obj_scores [N])``; pair indices local to the image.
        ground_truth (list): per image, ``gt_rels [R, 3]`` (subject, object, predicate), local
            indices, predicate in [1, C).
        num_predicates (int): C, predicate classes including background.
        ks (iterable of int): the K values.
        skip_absent_classes (bool): average mR only over predicates present in the GT (SGB: False).
        per_class (bool): also return ``"R@K_per_class"``: list of C - 1 per-predicate recalls
            (predicates 1..C-1; NaN for a predicate absent from the GT).

    Returns:
        dict: ``"R@K"`` and ``"mR@K"`` (float, NaN if no image has a GT relation) for each K, and
        ``"num_images"`` (images evaluated, i.e. with GT relations).
    """
    ks = [int(k) for k in ks]
    if len(predictions) != len(ground_truth):
        raise ValueError(f"predictions has {len(predictions)} images but ground_truth has {len(ground_truth)}")
    if num_predicates < 2:
        raise ValueError(f"num_predicates must count background plus >= 1 predicate, got {num_predicates}")
    C = int(num_predicates)
    recalls = {k: [] for k in ks}
    class_recalls = {k: [[] for _ in range(C)] for k in ks}
    for i, (pred, gt) in enumerate(zip(predictions, ground_truth)):
        gt = _np(gt, f"ground_truth[{i}]").astype(np.int64).reshape(-1, 3)
        if gt.shape[0] == 0:
            continue  # SGB: images without GT relations are skipped
        if gt[:, 2].min() < 1 or gt[:, 2].max() >= C:
            raise ValueError(f"ground_truth[{i}] has predicates outside [1, {C})")
        if len(pred) not in (2, 3):
            raise ValueError(f"predictions[{i}] must be (pairs, rel_scores) or (pairs, rel_scores, obj_scores)")
        rel_scores = _np(pred[1], f"predictions[{i}] rel_scores")
        if rel_scores.ndim != 2 or rel_scores.shape[1] != C:
            raise ValueError(f"predictions[{i}] rel_scores must be [P, {C}], got {list(rel_scores.shape)}")
        triplets, _ = rank_triplets(pred[0], rel_scores, pred[2] if len(pred) == 3 else None)
        # rank of the best-ranked prediction equal to each GT triplet (inf if none)
        first_rank = {}
        for r, t in enumerate(map(tuple, triplets.tolist())):
            first_rank.setdefault(t, r)
        gt_rank = np.array([first_rank.get(t, np.inf) for t in map(tuple, gt.tolist())])
        gt_pred = gt[:, 2]
        count = np.bincount(gt_pred, minlength=C)
        for k in ks:
            hit = gt_rank < k
            recalls[k].append(hit.mean())
            hit_c = np.bincount(gt_pred[hit], minlength=C)
            for c in np.nonzero(count)[0]:
                class_recalls[k][c].append(hit_c[c] / count[c])

    out: Dict[str, object] = {}
    for k in ks:
        out[f"R@{k}"] = float(np.mean(recalls[k])) if recalls[k] else float("nan")
        per = [float(np.mean(v)) if v else float("nan") for v in class_recalls[k][1:]]
        present = [r for r in per if not np.isnan(r)]
        if not recalls[k]:
            out[f"mR@{k}"] = float("nan")
        elif skip_absent_classes:
            out[f"mR@{k}"] = float(np.mean(present))
        else:
            out[f"mR@{k}"] = float(sum(present) / (C - 1))
        if per_class:
            out[f"R@{k}_per_class"] = per
    out["num_images"] = len(recalls[ks[0]]) if ks else 0
    return out


def split_by_image(rows: Tensor, box_batch: Tensor, *values: Tensor, num_images: Optional[int] = None) -> List[tuple]:
    """Turn packed global (subject, object, ...) rows into per-image local ones for :func:`evaluate`.

    Args:
        rows (Tensor[P, 2 or 3] int64): pairs or gt_rels whose first two columns are global indices
            into packed boxes (DESIGN.md: both of the same image).
        box_batch (Tensor[K] int64): image of each box, non-decreasing (packed order).
        *values (Tensor[P, ...]): per-row tensors to split alike (e.g. rel_scores).
        num_images (int | None): B; default ``box_batch.max() + 1``.

    Returns:
        list of B tuples ``(local_rows, *values_b)``; local_rows keeps any extra columns.
    """
    box_batch = box_batch.to(torch.int64)
    if box_batch.numel() > 1 and bool((box_batch[1:] < box_batch[:-1]).any()):
        raise ValueError("box_batch must be non-decreasing (boxes packed image by image)")
    B = int(num_images) if num_images is not None else (int(box_batch.max()) + 1 if box_batch.numel() else 0)
    counts = torch.bincount(box_batch, minlength=B)
    offsets = torch.cumsum(counts, 0) - counts
    row_img = box_batch[rows[:, 0]] if rows.shape[0] else rows.new_zeros(0)
    out = []
    for b in range(B):
        sel = row_img == b
        local = rows[sel].clone()
        local[:, :2] -= offsets[b]
        out.append((local, *(v[sel] for v in values)))
    return out


class FrequencyBaseline:
    """SGB's FREQ baseline: the predicate distribution given (subject class, object class).

    ``counts[l_s, l_o, p]`` counts, over the training scenes, annotated relations with predicate p
    between a subject of class l_s and an object of class l_o; ``counts[l_s, l_o, 0]`` counts the
    ordered pairs of distinct objects with no annotated relation (every pair is a candidate in
    PredCls; SGB's statistics count background only among overlapping boxes). Scores are the
    smoothed frequencies (counts + smoothing) / sum over the C columns (add-one by default), so an
    unseen class pair gets a uniform distribution. Used for ranking, the predicted predicate is the
    argmax over columns 1..C-1: background never wins, as in SGB's evaluation.

    Attributes:
        counts (Tensor[O, O, C] float64): raw counts.
        smoothing (float): added to every count.
    """

    def __init__(self, counts: Tensor, smoothing: float = 1.0):
        if counts.dim() != 3 or counts.shape[0] != counts.shape[1]:
            raise ValueError(f"counts must be [O, O, C], got {list(counts.shape)}")
        self.counts = counts.to(torch.float64)
        self.smoothing = float(smoothing)
        smoothed = self.counts + self.smoothing
        self.probs = (smoothed / smoothed.sum(-1, keepdim=True)).to(torch.float32)  # [O, O, C]

    @classmethod
    def fit(cls, scenes: Iterable[dict], num_object_classes: int, num_predicates: int,
            smoothing: float = 1.0) -> "FrequencyBaseline":
        """Count over ``scenes`` (dicts with ``labels [N]`` and local ``relations [R, 3]``)."""
        O, C = int(num_object_classes), int(num_predicates)
        counts = torch.zeros(O * O * C, dtype=torch.float64)
        for s in scenes:
            labels, rels = s["labels"].to(torch.int64), s["relations"].to(torch.int64).reshape(-1, 3)
            N = labels.shape[0]
            ls, lo = labels[rels[:, 0]], labels[rels[:, 1]]
            counts.index_add_(0, (ls * O + lo) * C + rels[:, 2], torch.ones(rels.shape[0], dtype=torch.float64))
            unannotated = ~torch.eye(N, dtype=torch.bool)
            unannotated[rels[:, 0], rels[:, 1]] = False
            a, b = unannotated.nonzero().unbind(1)
            counts.index_add_(0, (labels[a] * O + labels[b]) * C, torch.ones(a.shape[0], dtype=torch.float64))
        return cls(counts.view(O, O, C), smoothing)

    def rel_scores(self, labels: Tensor, pairs: Tensor) -> Tensor:
        """Tensor[P, C] float32: smoothed predicate frequencies of each pair's class pair.

        Args:
            labels (Tensor[N] int64): object classes (local or packed).
            pairs (Tensor[P, 2] int64): (subject, object) indices into ``labels``.
        """
        labels = labels.to(torch.int64).cpu()
        pairs = pairs.to(torch.int64).cpu()
        return self.probs[labels[pairs[:, 0]], labels[pairs[:, 1]]]

    def predict(self, labels: Tensor, pairs: Tensor) -> Tensor:
        """Tensor[P] int64: the most frequent foreground predicate (ties to the lower index)."""
        return 1 + self.rel_scores(labels, pairs)[:, 1:].argmax(1)


def frequency_baseline(scenes: Iterable[dict], num_object_classes: int, num_predicates: int,
                       smoothing: float = 1.0) -> FrequencyBaseline:
    """Fit :class:`FrequencyBaseline` on training scenes (see its docstring)."""
    return FrequencyBaseline.fit(scenes, num_object_classes, num_predicates, smoothing)
