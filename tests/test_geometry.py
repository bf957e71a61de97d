"""The launch-geometry model of the Triton launchers (sgg_kernels/triton/_geometry.py): the chunk
count of every split reduction, a function of the shapes and constants only."""
import itertools

import pytest

from sgg_kernels.triton._geometry import SMS, cdiv, split_work


def _brute(units, work, ctas, min_per, split_cost=1.0):
    """Every chunking (per_split from min_per to work), by the same model, for comparison."""
    slots = ctas * SMS
    out = []
    for per in range(max(1, min(min_per, work)), work + 1):
        n = cdiv(work, per)
        out.append((cdiv(units * n, slots) * (per + split_cost), units * n, n, per))
    return out


@pytest.mark.parametrize("units,work,ctas,min_per", [
    (16, 192, 2, 4), (32, 768, 2, 4), (128, 75, 2, 2), (38, 128, 2, 8), (395, 128, 2, 8),
    (1, 1, 1, 1), (1, 10, 2, 1), (3, 7, 5, 2), (64, 790, 2, 2), (75, 128, 3, 8), (2, 9, 2, 3),
])
def test_split_work_is_the_models_best_chunking(units, work, ctas, min_per):
    n, per = split_work(units, work, ctas, min_per)
    assert n == cdiv(work, per) and per >= min(min_per, work) and (n - 1) * per < work <= n * per
    cands = _brute(units, work, ctas, min_per)
    slots = ctas * SMS
    full = [c for c in cands if c[1] >= slots] or cands  # a full first wave when the shapes allow
    best = min(c[0] for c in full)
    mine = cdiv(units * n, slots) * (per + 1.0)
    assert mine == best, (n, per, mine, best)
    if any(c[1] >= slots for c in cands):
        assert units * n >= slots  # never a partial first wave when a full one is possible


def test_split_work_examples():
    """The docstring's cases: whole rounds instead of a fixed program target."""
    assert split_work(32, 768, 2, 4, split_cost=4) == (16, 48)  # 512 programs: 2 rounds of 48 tiles
    assert split_work(16, 192, 2, 4, split_cost=4) == (32, 6)  # 512 programs, 12 tiles a slot
    assert split_work(38, 128, 2, 8) == (13, 10)  # 494 programs: 2 rounds of 10 (+1) blocks
    assert split_work(128, 75, 2, 2) == (4, 19)  # 512 programs, not 256 (0.97 waves)


def test_split_work_caps_and_degenerate_sizes():
    assert split_work(0, 0, 0) == (1, 1)  # empty extents still give a valid grid of one split
    assert split_work(1, 100, 1, 1, max_splits=3)[0] <= 3
    assert split_work(1, 5, 1, 10) == (1, 5)  # min_per above work: one split
    for units, work in itertools.product((1, 7, 300), (1, 33, 1000)):
        n, per = split_work(units, work, 2, 4)
        assert n == cdiv(work, per) and per >= min(4, work)
