"""The toy PredCls scenes (python/sgg_toy/data.py) and the SGG metrics (python/sgg_toy/metrics.py)."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import sgg_kernels as sk  # noqa: E402
from sgg_toy import (  # noqa: E402
    OBJECT_CLASSES,
    PREDICATES,
    FrequencyBaseline,
    SceneConfig,
    SceneDataset,
    collate,
    evaluate,
    frequency_baseline,
    geometric_predicates,
    make_scene,
    predicate_histogram,
    split_by_image,
)
from sgg_toy.data import COLOURS, PALETTE, SHAPES  # noqa: E402

TENSOR_KEYS = ("image", "boxes", "labels", "masks", "relations", "instance_map")


@pytest.fixture(scope="module")
def scenes():
    return [make_scene(i) for i in range(300)]


def _same_scene(a, b):
    return all(torch.equal(a[k], b[k]) for k in TENSOR_KEYS)


def _rule(a, b, cfg):
    """The predicate name of (subject box a, object box b) by the documented rules, written afresh."""
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    if ax1 >= bx1 and ay1 >= by1 and ax2 <= bx2 and ay2 <= by2:
        return "inside"
    area_a, area_b = (ax2 - ax1) * (ay2 - ay1), (bx2 - bx1) * (by2 - by1)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    if inter / (area_a + area_b - inter) >= cfg.overlap_iou:
        return "overlapping"
    if area_a > cfg.bigger_ratio * area_b:
        return "bigger than"
    if max(bx1 - ax2, ax1 - bx2, by1 - ay2, ay1 - by2, 0.0) <= cfg.near_gap:
        return "near"
    dx = (bx1 + bx2) / 2 - (ax1 + ax2) / 2
    dy = (by1 + by2) / 2 - (ay1 + ay2) / 2  # image y points down: dy > 0 means a is higher
    if abs(dy) >= abs(dx):
        return "above" if dy > cfg.margin else "below" if dy < -cfg.margin else None
    return "left of" if dx > cfg.margin else "right of" if dx < -cfg.margin else None


# ----------------------------------------------------------------------------------------- data


def test_scene_is_a_function_of_its_seed():
    a, b = make_scene(7), make_scene(7)
    assert _same_scene(a, b) and a["seed"] == 7
    # a Generator seeded alike draws the same scene; it is advanced, so the next draw differs
    gen = np.random.default_rng(7)
    c, d = make_scene(gen), make_scene(gen)
    assert _same_scene(a, c) and c["seed"] == -1
    assert not torch.equal(c["image"], d["image"])


def test_dataset_scene_i_is_seed_plus_i_and_disjoint_seeds_differ():
    ds = SceneDataset(5, seed=3)
    assert len(ds) == 5 and _same_scene(ds[2], make_scene(5)) and _same_scene(ds[-1], make_scene(7))
    with pytest.raises(IndexError):
        ds[5]
    train, val = SceneDataset(20, seed=0), SceneDataset(20, seed=1000)
    train_scenes = [train[i] for i in range(len(train))]
    for v in (val[i] for i in range(len(val))):
        assert not any(torch.equal(v["image"], t["image"]) for t in train_scenes)
        assert not any(torch.equal(v["boxes"], t["boxes"]) and torch.equal(v["labels"], t["labels"]) for t in train_scenes)


@pytest.mark.parametrize("m", [14, 28])
def test_shapes_dtypes_and_ranges(m):
    cfg = SceneConfig(mask_size=m)
    for seed in range(40):
        s = make_scene(seed, cfg)
        N = s["labels"].shape[0]
        assert cfg.min_objects <= N <= cfg.max_objects
        assert s["image"].shape == (3, 64, 64) and s["image"].dtype == torch.float32
        assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0
        assert s["boxes"].shape == (N, 4) and s["boxes"].dtype == torch.float32
        b = s["boxes"]
        assert torch.equal(b, b.round()) and (b[:, :2] >= 0).all() and (b[:, 2] <= 64).all() and (b[:, 3] <= 64).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert s["labels"].dtype == torch.int64 and ((s["labels"] >= 0) & (s["labels"] < len(OBJECT_CLASSES))).all()
        assert s["masks"].shape == (N, m, m) and s["masks"].dtype == torch.float32
        assert set(s["masks"].unique().tolist()) <= {0.0, 1.0}
        assert (s["masks"].flatten(1).sum(1) > 0).all(), "every object is visible, so every mask is non-empty"
        r = s["relations"]
        assert r.dtype == torch.int64 and r.shape[1] == 3
        assert ((r[:, :2] >= 0) & (r[:, :2] < N)).all() and (r[:, 0] != r[:, 1]).all()
        assert ((r[:, 2] >= 1) & (r[:, 2] < len(PREDICATES))).all()
        assert len({(a, o) for a, o, _ in r.tolist()}) == r.shape[0], "at most one predicate per ordered pair"
        assert s["instance_map"].shape == (64, 64) and s["instance_map"].max() == N - 1


def test_every_object_keeps_its_minimum_visible_fraction(scenes):
    cfg = SceneConfig()
    for s in scenes:
        for i, (x1, y1, x2, y2) in enumerate(s["boxes"].long().tolist()):
            visible = int((s["instance_map"] == i).sum())
            # the shape's own area is at most its box area, at least half of it (triangle)
            assert visible >= cfg.min_visible * (x2 - x1) * (y2 - y1) / 2
            assert (s["instance_map"][:y1, :] != i).all() and (s["instance_map"][y2:, :] != i).all()
            assert (s["instance_map"][:, :x1] != i).all() and (s["instance_map"][:, x2:] != i).all()


def test_masks_are_the_visible_pixels_in_the_box_frame(scenes):
    # Resample each m x m mask back onto its box's pixels and compare with the visible pixels.
    # The round trip through m x m blurs thin parts (apexes of small triangles), hence per-object
    # IoU >= 0.6 but >= 0.95 on average; a flipped or shifted frame would fail both by far.
    ious = []
    for s in scenes[:100]:
        for i, (x1, y1, x2, y2) in enumerate(s["boxes"].long().tolist()):
            visible = s["instance_map"][y1:y2, x1:x2] == i
            back = F.interpolate(s["masks"][i][None, None], size=visible.shape, mode="bilinear", align_corners=False)[0, 0] >= 0.5
            ious.append(float((back & visible).sum() / (back | visible).sum()))
            assert ious[-1] >= 0.6, (s["seed"], i, ious[-1])
    assert sum(ious) / len(ious) >= 0.95


def test_pixels_have_their_objects_colour_and_later_objects_occlude_earlier(scenes):
    for s in scenes[:100]:
        img, inst, labels = s["image"], s["instance_map"], s["labels"].tolist()
        for i, label in enumerate(labels):
            mean = img[:, inst == i].mean(1)
            assert torch.allclose(mean, torch.tensor(PALETTE[COLOURS[label % len(COLOURS)]]), atol=0.06)
        bg = img[:, inst == -1]
        assert bg.mean() > 0.75 and (bg.mean(1) - bg.mean()).abs().max() < 0.02, "light grey background"
        # painter's order: a square fills its box, so only LATER objects can show inside it
        for j, (label, (x1, y1, x2, y2)) in enumerate(zip(labels, s["boxes"].long().tolist())):
            if SHAPES[label // len(COLOURS)] == "square":
                assert (inst[y1:y2, x1:x2] >= j).all()


def test_every_relation_satisfies_its_geometric_rule(scenes):
    cfg = SceneConfig()
    n_checked = 0
    for s in scenes:
        boxes = s["boxes"].tolist()
        for a, o, p in s["relations"].tolist():
            assert PREDICATES[p] == _rule(boxes[a], boxes[o], cfg), (s["seed"], a, o, PREDICATES[p])
            n_checked += 1
        # the vectorised rules agree with the scalar ones on every ordered pair, annotated or not
        geo = geometric_predicates(s["boxes"], cfg)
        for a in range(len(boxes)):
            for o in range(len(boxes)):
                want = None if a == o else _rule(boxes[a], boxes[o], cfg)
                assert geo[a, o] == (0 if want is None else PREDICATES.index(want))
    assert n_checked > 1000


def test_annotation_keeps_each_predicate_at_its_keep_probability_long_tailed(scenes):
    cfg = SceneConfig()
    geo_count = torch.zeros(len(PREDICATES))
    for s in scenes:
        g = geometric_predicates(s["boxes"], cfg)
        geo_count += torch.bincount(g.flatten(), minlength=len(PREDICATES))
    kept = predicate_histogram(scenes).double()
    for p in range(1, len(PREDICATES)):
        q, n = cfg.keep_prob[PREDICATES[p]], float(geo_count[p])
        assert n >= 20, PREDICATES[p]
        # 4 binomial standard deviations
        assert abs(kept[p] / n - q) <= 4 * math.sqrt(q * (1 - q) / n) + 1e-9, (PREDICATES[p], float(kept[p] / n), q)
    assert kept[0] == 0
    assert kept[1:].max() > 10 * kept[1:].min(), f"not long-tailed: {kept.tolist()}"


def test_collate_packs_with_global_indices():
    scenes = [make_scene(s) for s in (11, 12, 13, 14)]
    batch = collate(scenes)
    num_objs = [s["labels"].shape[0] for s in scenes]
    K, R = sum(num_objs), sum(s["relations"].shape[0] for s in scenes)
    assert batch["images"].shape == (4, 3, 64, 64) and batch["num_objs"] == num_objs
    assert batch["boxes"].shape == (K, 4) and batch["labels"].shape == (K,) and batch["masks"].shape == (K, 14, 14)
    assert batch["gt_rels"].shape == (R, 3) and batch["rel_batch"].shape == (R,)
    boxes, box_batch = sk.pack_boxes([s["boxes"] for s in scenes])
    assert torch.equal(batch["boxes"], boxes) and torch.equal(batch["box_batch"], box_batch)
    assert torch.equal(batch["gt_rels"][:, :2], sk.pack_pairs([s["relations"][:, :2] for s in scenes], num_objs))
    s_img, o_img = batch["box_batch"][batch["gt_rels"][:, 0]], batch["box_batch"][batch["gt_rels"][:, 1]]
    assert torch.equal(s_img, batch["rel_batch"]) and torch.equal(o_img, batch["rel_batch"])
    # each global relation names the same boxes, labels and masks as its local one
    for g, b in zip(batch["gt_rels"].tolist(), batch["rel_batch"].tolist()):
        off = sum(num_objs[:b])
        local = [g[0] - off, g[1] - off, g[2]]
        assert local in scenes[b]["relations"].tolist()
        for gi, li in ((g[0], local[0]), (g[1], local[1])):
            assert torch.equal(batch["boxes"][gi], scenes[b]["boxes"][li])
            assert torch.equal(batch["masks"][gi], scenes[b]["masks"][li])
            assert batch["labels"][gi] == scenes[b]["labels"][li]
    cand = {tuple(p) for p in sk.all_pairs(batch["box_batch"]).tolist()}
    assert {tuple(p) for p in batch["gt_rels"][:, :2].tolist()} <= cand
    # and back to local indices for the metrics
    for (local_rels,), s in zip(split_by_image(batch["gt_rels"], batch["box_batch"]), scenes):
        assert torch.equal(local_rels, s["relations"])


# -------------------------------------------------------------------------------------- metrics

C4 = 4  # background + predicates 1, 2, 3


def _scores(rows, C=C4):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, C)


def test_perfect_predictions_give_recall_one(scenes):
    preds, gts = [], []
    for s in scenes[:50]:
        n = s["labels"].shape[0]
        pairs = sk.all_pairs(torch.zeros(n, dtype=torch.int64))
        rel = torch.zeros(pairs.shape[0], len(PREDICATES))
        rel[:, 0] = 1.0
        for a, o, p in s["relations"].tolist():
            i = int(((pairs[:, 0] == a) & (pairs[:, 1] == o)).nonzero())
            rel[i] = 0.0
            rel[i, p] = 1.0
        preds.append((pairs, rel))
        gts.append(s["relations"])
    # K = max GT count per image, so all GT fit in the top K
    k = max(g.shape[0] for g in gts)
    out = evaluate(preds, gts, len(PREDICATES), ks=(k,))
    assert out[f"R@{k}"] == 1.0 and out[f"mR@{k}"] == 1.0
    assert out["num_images"] == sum(g.shape[0] > 0 for g in gts)


def test_recall_counts_a_triplet_ranked_third_from_k_3_on():
    pairs = torch.tensor([[0, 1], [1, 0], [0, 2], [2, 1]])
    # (0, 1, 2) is the GT; its pair is FIRST in the input but its best score (0.5) is the 3rd highest
    rel = _scores([[0.1, 0.2, 0.5, 0.2],
                   [0.0, 0.9, 0.05, 0.05],
                   [0.0, 0.1, 0.1, 0.8],
                   [0.6, 0.3, 0.05, 0.05]])
    out = evaluate([(pairs, rel)], [torch.tensor([[0, 1, 2]])], C4, ks=(1, 2, 3))
    assert (out["R@1"], out["R@2"], out["R@3"]) == (0.0, 0.0, 1.0)
    # a wrong predicate on the right pair never counts
    out = evaluate([(pairs, rel)], [torch.tensor([[0, 1, 3]])], C4, ks=(1, 2, 3, 4))
    assert out["R@4"] == 0.0


def test_graph_constraint_keeps_only_the_best_predicate_of_a_pair():
    pairs = torch.tensor([[0, 1], [1, 0]])
    # pair (0, 1): predicate 1 (0.6) beats predicate 2 (0.5); background (column 0) is never chosen,
    # so pair (1, 0) predicts 3 even though its background score is the largest
    rel = _scores([[0.0, 0.6, 0.5, 0.0],
                   [0.9, 0.02, 0.01, 0.07]])
    gt_second_best = torch.tensor([[0, 1, 2]])
    assert evaluate([(pairs, rel)], [gt_second_best], C4, ks=(1, 2, 100))["R@100"] == 0.0
    gt_both = torch.tensor([[0, 1, 1], [0, 1, 2]])  # a GT pair with two predicates: at most half
    out = evaluate([(pairs, rel)], [gt_both], C4, ks=(1, 100))
    assert out["R@1"] == 0.5 and out["R@100"] == 0.5
    gt_bg = torch.tensor([[1, 0, 3]])
    assert evaluate([(pairs, rel)], [gt_bg], C4, ks=(1, 2))["R@2"] == 1.0
    # ranked by the product with the object scores: object 1 scored low sinks both pairs equally,
    # object 2's pair rises above them
    pairs3 = torch.tensor([[0, 1], [0, 2]])
    rel3 = _scores([[0.0, 0.9, 0.1, 0.0], [0.0, 0.1, 0.6, 0.3]])
    gt3 = torch.tensor([[0, 2, 2]])
    assert evaluate([(pairs3, rel3)], [gt3], C4, ks=(1,))["R@1"] == 0.0
    assert evaluate([(pairs3, rel3, torch.tensor([1.0, 0.5, 1.0]))], [gt3], C4, ks=(1,))["R@1"] == 1.0


def _pairs_scoring(triplets, n):
    """Candidate pairs of n objects, each scoring its listed predicate (score given), else background."""
    pairs = sk.all_pairs(torch.zeros(n, dtype=torch.int64))
    rel = torch.zeros(pairs.shape[0], C4)
    rel[:, 0] = 1.0
    for a, o, p, score in triplets:
        i = int(((pairs[:, 0] == a) & (pairs[:, 1] == o)).nonzero())
        rel[i] = 0.0
        rel[i, p] = score
    return pairs, rel


def test_mean_recall_averages_per_image_class_recalls():
    # image A: GT (0,1,1) (1,2,1) (2,0,1) (0,2,2) (2,1,2); predicted: all three 1's, and (0,2) as 1 (wrong)
    #          recall_A = 3/5; class 1: 3/3 = 1; class 2: 0/2 = 0
    # image B: GT (0,1,2) predicted right.    recall_B = 1; class 2: 1/1 = 1
    # R@100 = (3/5 + 1) / 2 = 0.8
    # per class: class 1 = mean(1) = 1; class 2 = mean(0, 1) = 0.5 (pooled counts would give 1/3);
    #            class 3 never occurs in the GT: recall 0, still counted (SGB)
    # mR@100 = (1 + 0.5 + 0) / 3 = 0.5; skipping absent classes: (1 + 0.5) / 2 = 0.75
    gt_a = torch.tensor([[0, 1, 1], [1, 2, 1], [2, 0, 1], [0, 2, 2], [2, 1, 2]])
    pred_a = _pairs_scoring([(0, 1, 1, 0.9), (1, 2, 1, 0.8), (2, 0, 1, 0.7), (0, 2, 1, 0.6), (2, 1, 3, 0.5)], 3)
    gt_b = torch.tensor([[0, 1, 2]])
    pred_b = _pairs_scoring([(0, 1, 2, 0.4)], 2)
    out = evaluate([pred_a, pred_b], [gt_a, gt_b], C4, ks=(100,), per_class=True)
    assert out["R@100"] == pytest.approx(0.8)
    assert out["mR@100"] == pytest.approx(0.5)
    assert out["R@100_per_class"][:2] == [pytest.approx(1.0), pytest.approx(0.5)] and math.isnan(out["R@100_per_class"][2])
    assert evaluate([pred_a, pred_b], [gt_a, gt_b], C4, ks=(100,), skip_absent_classes=True)["mR@100"] == pytest.approx(0.75)
    # at K = 1 image A recalls only (0,1,1): R@1 = (1/5 + 1) / 2 = 0.6;
    # class 1 = 1/3, class 2 = mean(0/2, 1/1) = 0.5: mR@1 = (1/3 + 0.5 + 0) / 3 = 5/18
    out1 = evaluate([pred_a, pred_b], [gt_a, gt_b], C4, ks=(1,))
    assert out1["R@1"] == pytest.approx(0.6) and out1["mR@1"] == pytest.approx(5 / 18)


def test_images_without_gt_relations_are_skipped():
    pairs = torch.tensor([[0, 1], [1, 0]])
    rel = _scores([[0.0, 0.7, 0.2, 0.1], [0.0, 0.1, 0.2, 0.7]])
    with_gt = [(pairs, rel)], [torch.tensor([[0, 1, 1], [1, 0, 2]])]
    base = evaluate(*with_gt, C4, ks=(1, 2))
    assert base["R@2"] == 0.5 and base["num_images"] == 1
    empty_gt = torch.zeros(0, 3, dtype=torch.int64)
    more = evaluate(with_gt[0] * 3, [empty_gt, with_gt[1][0], empty_gt], C4, ks=(1, 2))
    assert more == base
    nothing = evaluate([(pairs, rel)], [empty_gt], C4, ks=(1,))
    assert math.isnan(nothing["R@1"]) and math.isnan(nothing["mR@1"]) and nothing["num_images"] == 0
    # an image WITH GT but no candidate pairs recalls nothing (SGB would skip it; see metrics.py)
    no_cand = (torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, C4))
    out = evaluate([(pairs, rel), no_cand], [with_gt[1][0], torch.tensor([[0, 1, 1]])], C4, ks=(2,))
    assert out["R@2"] == pytest.approx(0.25) and out["num_images"] == 2


def test_evaluate_rejects_bad_input():
    pairs, rel = torch.tensor([[0, 1]]), _scores([[0.0, 1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="rel_scores must be"):
        evaluate([(pairs, rel)], [torch.tensor([[0, 1, 1]])], 5)
    with pytest.raises(ValueError, match="predictions has 1 images but ground_truth has 2"):
        evaluate([(pairs, rel)], [torch.tensor([[0, 1, 1]])] * 2, C4)
    with pytest.raises(ValueError, match="predicates outside"):
        evaluate([(pairs, rel)], [torch.tensor([[0, 1, 0]])], C4)


def test_packed_predictions_split_to_the_same_metrics(scenes):
    batch = collate(scenes[:6])
    pairs = sk.all_pairs(batch["box_batch"])
    rel = torch.rand(pairs.shape[0], len(PREDICATES), generator=torch.Generator().manual_seed(0))
    per_image = split_by_image(pairs, batch["box_batch"], rel)
    offsets = np.cumsum([0] + batch["num_objs"])
    for b, (local, r) in enumerate(per_image):
        sel = batch["box_batch"][pairs[:, 0]] == b
        assert torch.equal(local + int(offsets[b]), pairs[sel]) and torch.equal(r, rel[sel])
        assert local.min() >= 0 and local.max() < batch["num_objs"][b]
    gts = [s["relations"] for s in scenes[:6]]
    assert evaluate(per_image, gts, len(PREDICATES), ks=(5, 10))["num_images"] == sum(g.shape[0] > 0 for g in gts)


def test_frequency_baseline_predicts_the_majority_predicate_per_class_pair():
    O = 3
    train = [
        # labels [0, 1, 2]: (0->1) pred 2, (1->0) pred 3, (0->2) pred 1; 3 other ordered pairs unannotated
        {"labels": torch.tensor([0, 1, 2]), "relations": torch.tensor([[0, 1, 2], [1, 0, 3], [0, 2, 1]])},
        # labels [0, 1]: (0->1) pred 2 again; (1->0) unannotated
        {"labels": torch.tensor([0, 1]), "relations": torch.tensor([[0, 1, 2]])},
        # labels [1, 0, 0]: (1->0) pred 1 once (object 1 is class 0), (2->0) class pair (0, 1): pred 3
        {"labels": torch.tensor([1, 0, 0]), "relations": torch.tensor([[0, 1, 1], [2, 0, 3]])},
    ]
    freq = frequency_baseline(train, O, C4)
    # class pair (0, 1): predicates 2 (scene 0), 2 (scene 1), 3 (scene 2); background: scene 2's
    #   unannotated (1->0) -> counts [bg 1, 0, 2, 1]: majority 2
    # class pair (1, 0): 3 (scene 0), 1 (scene 2); background: scene 1's (1->0) and scene 2's (0->2)
    #   -> counts [bg 2, 1, 0, 1]: background is the most frequent but excluded; 1 and 3 tie and the
    #   lower index wins -> 1
    # class pair (0, 2): 1 once -> 1; (2, 0): background once; (2, 2) never seen: uniform -> 1
    assert freq.counts[0, 1].tolist() == [1, 0, 2, 1]
    assert freq.counts[1, 0].tolist() == [2, 1, 0, 1]
    assert freq.counts[0, 2].tolist() == [0, 1, 0, 0] and freq.counts[2, 0].tolist() == [1, 0, 0, 0]
    assert freq.counts[0, 0].tolist() == [2, 0, 0, 0] and freq.counts[2, 2].sum() == 0
    labels = torch.tensor([0, 1, 2, 2])
    pairs = torch.tensor([[0, 1], [1, 0], [2, 3], [0, 2]])
    assert freq.predict(labels, pairs).tolist() == [2, 1, 1, 1]
    # add-one smoothing: (0, 1) -> (counts + 1) / (4 + 4) = [2, 1, 3, 2] / 8
    scores = freq.rel_scores(labels, pairs)
    assert scores.shape == (4, C4)
    assert torch.allclose(scores[0], torch.tensor([2.0, 1, 3, 2]) / 8)
    assert torch.allclose(scores[2], torch.full((C4,), 0.25))
    assert torch.allclose(scores.sum(1), torch.ones(4))
    # no smoothing: the raw frequencies
    assert torch.allclose(FrequencyBaseline(freq.counts, smoothing=0.0).rel_scores(labels, pairs[:1]),
                          torch.tensor([[1.0, 0, 2, 1]]) / 4)


def test_frequency_baseline_on_toy_data_beats_chance(scenes):
    freq = frequency_baseline(scenes[:200], len(OBJECT_CLASSES), len(PREDICATES))
    preds, chance, gts = [], [], []
    g = torch.Generator().manual_seed(0)
    for s in scenes[200:]:
        pairs = sk.all_pairs(torch.zeros(s["labels"].shape[0], dtype=torch.int64))
        preds.append((pairs, freq.rel_scores(s["labels"], pairs)))
        chance.append((pairs, torch.rand(pairs.shape[0], len(PREDICATES), generator=g)))
        gts.append(s["relations"])
    f = evaluate(preds, gts, len(PREDICATES), ks=(10,))
    c = evaluate(chance, gts, len(PREDICATES), ks=(10,))
    assert f["R@10"] > c["R@10"] + 0.1, (f, c)
