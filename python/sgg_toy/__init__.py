"""sgg_toy: a synthetic PredCls task (coloured shapes, geometric predicates) and SGG metrics.

    from sgg_toy import SceneDataset, collate, evaluate, frequency_baseline, PREDICATES
    train = SceneDataset(2000, seed=0); val = SceneDataset(500, seed=10**6)
    batch = collate([train[i] for i in range(8)])   # packed: boxes [K, 4], box_batch [K], gt_rels [R, 3] global

Pure PyTorch/numpy; every scene is a function of its seed. ``data`` draws the scenes, ``metrics``
computes R@K / mR@K as Scene-Graph-Benchmark.pytorch does and the frequency baseline.
"""
from .data import (
    OBJECT_CLASSES,
    PREDICATES,
    SceneConfig,
    SceneDataset,
    collate,
    geometric_predicates,
    make_scene,
    predicate_histogram,
)
from .metrics import FrequencyBaseline, evaluate, frequency_baseline, rank_triplets, split_by_image

__all__ = [
    "OBJECT_CLASSES", "PREDICATES", "SceneConfig", "SceneDataset", "collate", "geometric_predicates",
    "make_scene", "predicate_histogram",
    "FrequencyBaseline", "evaluate", "frequency_baseline", "rank_triplets", "split_by_image",
]
