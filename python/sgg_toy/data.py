"""Synthetic scenes for a toy PredCls task: coloured shapes, their masks and geometric relations.

Every scene is a light, noisy background with 3-6 coloured shapes (3 shapes x 4 colours = 12 object
classes) painted one after another, so later objects occlude earlier ones. A scene is a dict:

    image     Tensor[3, H, W]  float32 in [0, 1]
    boxes     Tensor[N, 4]     float32 (x1, y1, x2, y2) in image pixels: each shape's whole (amodal)
                               extent; integer-valued, pixel (row r, col c) is in the box iff
                               x1 <= c < x2 and y1 <= r < y2
    labels    Tensor[N]        int64 object class, index into OBJECT_CLASSES
    masks     Tensor[N, m, m]  float32 in {0, 1}: the object's *visible* pixels (after occlusion)
                               resampled into its own box frame, what Mask R-CNN outputs
    relations Tensor[R, 3]     int64 (subject, object, predicate), object indices local to the scene
    instance_map Tensor[H, W]  int64 index of the object seen at each pixel, -1 = background
    seed      int              the seed the scene was generated from (-1 if made from a Generator)

Relations. For each ordered pair (subject a, object b), a != b, the first rule of this list that
holds gives its *geometric* predicate (``geometric_predicates``); a pair that satisfies none has
none. With c = box centre, dx = c_b.x - c_a.x, dy = c_b.y - c_a.y (image y points down):

    1 "inside"        a's box lies within b's box (all four edges, inclusive)
    2 "overlapping"   IoU(a, b) >= cfg.overlap_iou
    3 "bigger than"   area(a) > cfg.bigger_ratio * area(b)
    4 "near"          the gap between the boxes, max(b.x1 - a.x2, a.x1 - b.x2, b.y1 - a.y2,
                      a.y1 - b.y2, 0), is <= cfg.near_gap pixels
    5 "above"         dy > cfg.margin and |dy| >= |dx|
    6 "below"         dy < -cfg.margin and |dy| >= |dx|
    7 "left of"       dx > cfg.margin and |dx| > |dy|
    8 "right of"      dx < -cfg.margin and |dx| > |dy|

Annotation (the long tail). Like Visual Genome, a scene annotates only some of the relations that
hold: each geometric relation is kept independently with probability ``cfg.keep_prob[predicate]``
(e.g. "left of" 0.8, "inside" 0.3), drawn in (subject, object) row-major order from the scene's
generator. Unkept pairs look like background to a learner, as unannotated VG pairs do. Every
annotated relation satisfies its rule, and each ordered pair has at most one predicate.

Class-dependent layout. Shape sets the size range (squares big, triangles small) and colour biases
the vertical position (yellow high, green low), so (subject class, object class) carries
information about the predicate and a frequency baseline is meaningful, yet geometry decides.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

SHAPES: Tuple[str, ...] = ("square", "circle", "triangle")
COLOURS: Tuple[str, ...] = ("red", "green", "blue", "yellow")
#: RGB of each colour in [0, 1].
PALETTE: Dict[str, Tuple[float, float, float]] = {
    "red": (0.85, 0.15, 0.15),
    "green": (0.15, 0.60, 0.20),
    "blue": (0.15, 0.30, 0.85),
    "yellow": (0.90, 0.75, 0.10),
}
#: Object class names; class = shape_index * len(COLOURS) + colour_index.
OBJECT_CLASSES: Tuple[str, ...] = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS)
#: Predicate names; index 0 is background (no relation), 1..8 in rule priority order.
PREDICATES: Tuple[str, ...] = (
    "__background__", "inside", "overlapping", "bigger than", "near", "above", "below", "left of", "right of",
)
BACKGROUND, INSIDE, OVERLAPPING, BIGGER, NEAR, ABOVE, BELOW, LEFT, RIGHT = range(len(PREDICATES))


def _default_keep_prob() -> Dict[str, float]:
    return {"inside": 0.3, "overlapping": 0.2, "bigger than": 0.12, "near": 0.3,
            "above": 0.5, "below": 0.08, "left of": 0.8, "right of": 0.15}


@dataclass
class SceneConfig:
    """How scenes are drawn. All sizes in image pixels.

    Attributes:
        height, width: image size (default 64 x 64).
        min_objects, max_objects: objects per scene, drawn uniformly from [min, max].
        shape_sizes: side length range (inclusive) of each shape's square box, per shape name.
        colour_y_prior: Beta(a, b) parameters of each colour's vertical position (0 = top).
        min_visible: fraction of an object's pixels that must stay visible after every later
            object is painted; placements that break it are redrawn (up to ``max_tries``).
        max_tries: placements tried per object before it is dropped (the scene then has fewer
            objects; never observed with the defaults).
        mask_size: m of the [N, m, m] box-frame masks.
        background: range of the background grey level; noise_std: per-pixel Gaussian noise;
            colour_jitter: per-object uniform shift of each RGB channel.
        overlap_iou, bigger_ratio, near_gap, margin: thresholds of the predicate rules.
        keep_prob: probability of annotating a geometric relation, per predicate name.
    """

    height: int = 64
    width: int = 64
    min_objects: int = 3
    max_objects: int = 6
    shape_sizes: Dict[str, Tuple[int, int]] = field(
        default_factory=lambda: {"square": (14, 28), "circle": (10, 22), "triangle": (8, 18)})
    colour_y_prior: Dict[str, Tuple[float, float]] = field(
        default_factory=lambda: {"red": (1.0, 1.0), "green": (4.0, 1.5), "blue": (1.0, 1.0), "yellow": (1.5, 4.0)})
    min_visible: float = 0.3
    max_tries: int = 200
    mask_size: int = 14
    background: Tuple[float, float] = (0.80, 0.95)
    noise_std: float = 0.03
    colour_jitter: float = 0.04
    overlap_iou: float = 0.1
    bigger_ratio: float = 2.0
    near_gap: float = 2.0
    margin: float = 2.0
    keep_prob: Dict[str, float] = field(default_factory=_default_keep_prob)

    @property
    def num_object_classes(self) -> int:
        return len(OBJECT_CLASSES)

    @property
    def num_predicates(self) -> int:
        """Predicate classes including background (column count of ``rel_scores``)."""
        return len(PREDICATES)


def _shape_mask(shape: str, x1: int, y1: int, s: int, H: int, W: int) -> np.ndarray:
    """Bool[H, W]: pixels whose centre (c + 0.5, r + 0.5) lies in the shape inscribed in box (x1, y1, s)."""
    r = np.arange(H)[:, None] + 0.5
    c = np.arange(W)[None, :] + 0.5
    inbox = (c >= x1) & (c < x1 + s) & (r >= y1) & (r < y1 + s)
    if shape == "square":
        return inbox
    cx, cy = x1 + s / 2.0, y1 + s / 2.0
    if shape == "circle":
        return inbox & ((c - cx) ** 2 + (r - cy) ** 2 <= (s / 2.0) ** 2)
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        return inbox & (np.abs(c - cx) <= (r - y1) / 2.0)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def geometric_predicates(boxes: Tensor, cfg: Optional[SceneConfig] = None) -> Tensor:
    """The rule-based predicate of every ordered pair (see the module docstring for the rules).

    Args:
        boxes (Tensor[N, 4]): (x1, y1, x2, y2).
        cfg (SceneConfig): thresholds; defaults to ``SceneConfig()``.

    Returns:
        Tensor[N, N] int64: entry [a, b] is the predicate of (subject a, object b), 0 if no rule
        holds; the diagonal is 0.
    """
    cfg = cfg or SceneConfig()
    b = boxes.to(torch.float64)
    N = b.shape[0]
    x1, y1, x2, y2 = b.unbind(1)
    area = (x2 - x1) * (y2 - y1)
    A = lambda t: t[:, None]  # subject  # noqa: E731
    B = lambda t: t[None, :]  # object  # noqa: E731
    inside = (A(x1) >= B(x1)) & (A(y1) >= B(y1)) & (A(x2) <= B(x2)) & (A(y2) <= B(y2))
    iw = (torch.minimum(A(x2), B(x2)) - torch.maximum(A(x1), B(x1))).clamp(min=0)
    ih = (torch.minimum(A(y2), B(y2)) - torch.maximum(A(y1), B(y1))).clamp(min=0)
    inter = iw * ih
    iou = inter / (A(area) + B(area) - inter).clamp(min=1e-12)
    bigger = A(area) > cfg.bigger_ratio * B(area)
    gap = torch.stack([B(x1) - A(x2), A(x1) - B(x2), B(y1) - A(y2), A(y1) - B(y2)]).amax(0).clamp(min=0)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    dx, dy = B(cx) - A(cx), B(cy) - A(cy)
    vertical = dy.abs() >= dx.abs()
    rules = [  # priority order: the first that holds wins
        (INSIDE, inside),
        (OVERLAPPING, iou >= cfg.overlap_iou),
        (BIGGER, bigger),
        (NEAR, gap <= cfg.near_gap),
        (ABOVE, vertical & (dy > cfg.margin)),
        (BELOW, vertical & (dy < -cfg.margin)),
        (LEFT, ~vertical & (dx > cfg.margin)),
        (RIGHT, ~vertical & (dx < -cfg.margin)),
    ]
    pred = torch.zeros(N, N, dtype=torch.int64)
    for p, holds in reversed(rules):  # lower-priority rules first, overwritten by higher ones
        pred[holds] = p
    pred.fill_diagonal_(0)
    return pred


def _box_frame_mask(visible: np.ndarray, x1: int, y1: int, s: int, m: int) -> Tensor:
    """Float{0,1}[m, m]: the visible pixels of box (x1, y1, s) resampled to m x m.

    Bilinear (antialiased when shrinking), thresholded at 0.5 as Mask R-CNN's mask targets; if
    that empties a mask of a visible object (a thin sliver), its most covered cell(s) are kept.
    """
    crop = torch.from_numpy(visible[y1:y1 + s, x1:x1 + s].astype(np.float32))[None, None]
    soft = F.interpolate(crop, size=(m, m), mode="bilinear", align_corners=False, antialias=s > m)[0, 0]
    mask = soft >= 0.5
    if not mask.any() and soft.max() > 0:
        mask = soft >= soft.max()
    return mask.to(torch.float32)


def make_scene(rng: Union[int, np.random.Generator], cfg: Optional[SceneConfig] = None) -> Dict[str, object]:
    """Draw one scene (see the module docstring for the returned dict and the relation rules).

    Args:
        rng (int or numpy.random.Generator): a seed (the scene is a pure function of it and cfg)
            or a generator, which is advanced.
        cfg (SceneConfig): defaults to ``SceneConfig()``.

    Returns:
        dict with ``image [3, H, W]``, ``boxes [N, 4]``, ``labels [N]``, ``masks [N, m, m]``,
        ``relations [R, 3]`` (local subject, object, predicate), ``instance_map [H, W]``, ``seed``.
    """
    cfg = cfg or SceneConfig()
    seed = int(rng) if isinstance(rng, (int, np.integer)) else -1
    gen = np.random.default_rng(seed) if seed >= 0 else rng
    if not isinstance(gen, np.random.Generator):
        raise TypeError(f"rng must be a non-negative int seed or a numpy Generator, got {rng!r}")
    H, W, m = cfg.height, cfg.width, cfg.mask_size

    # Place objects one by one; a placement is redrawn if it leaves any object (itself included)
    # with less than min_visible of its pixels visible.
    n = int(gen.integers(cfg.min_objects, cfg.max_objects + 1))
    instance_map = np.full((H, W), -1, dtype=np.int64)
    areas: List[int] = []
    placed: List[Tuple[int, int, int, int]] = []  # (label, x1, y1, s)
    for _ in range(n):
        label = int(gen.integers(len(OBJECT_CLASSES)))
        shape, colour = SHAPES[label // len(COLOURS)], COLOURS[label % len(COLOURS)]
        lo, hi = cfg.shape_sizes[shape]
        ya, yb = cfg.colour_y_prior[colour]
        k = len(placed)
        for _try in range(cfg.max_tries):
            s = int(gen.integers(lo, hi + 1))
            x1 = int(gen.integers(0, W - s + 1))
            y1 = int(round(gen.beta(ya, yb) * (H - s)))
            full = _shape_mask(shape, x1, y1, s, H, W)
            trial = instance_map.copy()
            trial[full] = k
            counts = np.bincount(trial[trial >= 0], minlength=k + 1)
            if all(counts[i] >= cfg.min_visible * a for i, a in enumerate(areas + [int(full.sum())])):
                instance_map = trial
                areas.append(int(full.sum()))
                placed.append((label, x1, y1, s))
                break

    N = len(placed)
    labels = torch.tensor([p[0] for p in placed], dtype=torch.int64)
    boxes = torch.tensor([[x1, y1, x1 + s, y1 + s] for _, x1, y1, s in placed], dtype=torch.float32).reshape(N, 4)

    # Render: background grey + noise, each object's visible pixels in its jittered colour + noise.
    image = np.full((H, W, 3), gen.uniform(*cfg.background), dtype=np.float64)
    for i, (label, *_rest) in enumerate(placed):
        rgb = np.asarray(PALETTE[COLOURS[label % len(COLOURS)]]) + gen.uniform(-cfg.colour_jitter, cfg.colour_jitter, 3)
        image[instance_map == i] = rgb
    image += gen.normal(0.0, cfg.noise_std, image.shape)
    image = torch.from_numpy(np.clip(image, 0.0, 1.0).astype(np.float32)).permute(2, 0, 1).contiguous()

    masks = torch.zeros(N, m, m)
    for i, (_, x1, y1, s) in enumerate(placed):
        masks[i] = _box_frame_mask(instance_map == i, x1, y1, s, m)

    # Geometric predicates, then the per-predicate annotation draw (one uniform per candidate pair).
    geo = geometric_predicates(boxes, cfg)
    keep = np.array([0.0] + [cfg.keep_prob[name] for name in PREDICATES[1:]])
    rels = []
    for a, b in ((a, b) for a in range(N) for b in range(N) if a != b and geo[a, b] > 0):
        p = int(geo[a, b])
        if gen.random() < keep[p]:
            rels.append((a, b, p))
    relations = torch.tensor(rels, dtype=torch.int64).reshape(-1, 3)

    return {"image": image, "boxes": boxes, "labels": labels, "masks": masks, "relations": relations,
            "instance_map": torch.from_numpy(instance_map), "seed": seed}


class SceneDataset(Dataset):
    """``num_scenes`` scenes; scene i is ``make_scene(seed + i, cfg)``, generated on access.

    Reproducible by construction; two datasets are disjoint when their seed ranges
    [seed, seed + num_scenes) do not overlap (e.g. train seed 0, val seed 10**6).
    """

    def __init__(self, num_scenes: int, seed: int = 0, cfg: Optional[SceneConfig] = None):
        if num_scenes < 0 or seed < 0:
            raise ValueError(f"num_scenes and seed must be >= 0, got {num_scenes}, {seed}")
        self.num_scenes, self.seed, self.cfg = int(num_scenes), int(seed), cfg or SceneConfig()

    def __len__(self) -> int:
        return self.num_scenes

    def __getitem__(self, i: int) -> Dict[str, object]:
        if not -self.num_scenes <= i < self.num_scenes:
            raise IndexError(f"scene {i} out of range for {self.num_scenes} scenes")
        return make_scene(self.seed + (i % self.num_scenes), self.cfg)


def collate(scenes: Sequence[Dict[str, object]]) -> Dict[str, object]:
    """Pack scenes into one batch in sgg_kernels' convention (DESIGN.md, "Data conventions").

    Args:
        scenes (list of dict): outputs of :func:`make_scene`, all of the same image and mask size.

    Returns:
        dict with
            images    Tensor[B, 3, H, W]
            boxes     Tensor[K, 4], K = sum N_i, images in list order
            box_batch Tensor[K] int64 image index of each box
            labels    Tensor[K] int64
            masks     Tensor[K, m, m]
            gt_rels   Tensor[R, 3] int64 (subject, object, predicate), subject/object GLOBAL indices
                      into the K boxes (scene i's local index + sum_{j<i} N_j)
            rel_batch Tensor[R] int64 image index of each relation
            num_objs  list of int, N_i per scene
        Candidate pairs for a relation head: ``sgg_kernels.all_pairs(batch["box_batch"])``.
    """
    if len(scenes) == 0:
        raise ValueError("collate needs at least one scene")
    num_objs = [int(s["labels"].shape[0]) for s in scenes]
    offsets = np.concatenate([[0], np.cumsum(num_objs)[:-1]]).tolist()
    gt_rels, rel_batch = [], []
    for i, (s, off) in enumerate(zip(scenes, offsets)):
        r = s["relations"].clone()
        r[:, :2] += off
        gt_rels.append(r)
        rel_batch.append(torch.full((r.shape[0],), i, dtype=torch.int64))
    return {
        "images": torch.stack([s["image"] for s in scenes]),
        "boxes": torch.cat([s["boxes"] for s in scenes]),
        "box_batch": torch.repeat_interleave(torch.arange(len(scenes)), torch.tensor(num_objs, dtype=torch.int64)),
        "labels": torch.cat([s["labels"] for s in scenes]),
        "masks": torch.cat([s["masks"] for s in scenes]),
        "gt_rels": torch.cat(gt_rels),
        "rel_batch": torch.cat(rel_batch),
        "num_objs": num_objs,
    }


def predicate_histogram(scenes, num_predicates: int = len(PREDICATES)) -> Tensor:
    """Tensor[num_predicates] int64: annotated relations per predicate over ``scenes`` (index 0 stays 0)."""
    hist = torch.zeros(num_predicates, dtype=torch.int64)
    for s in scenes:
        hist += torch.bincount(s["relations"][:, 2], minlength=num_predicates)
    return hist
