"""The benchmark's floors (sgg_kernels/bench/floors.py): hand-computed values for small shapes, every
case has one, the CPU report states them and never a % of floor, and the % arithmetic of CUDA runs."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from sgg_kernels.bench import floors, registry, report, runner

F32 = 4
I64 = 8


def _case(name):
    return registry.all_cases()[name]


# ---------------------------------------------------------------------------------------------
# Hand-computed floors (every number below is written out from the op's math, not from floors.py)
# ---------------------------------------------------------------------------------------------
def test_pairwise_edge_fusion_floor_by_hand():
    K, D, C = 3, 8, 5
    pairs = torch.tensor([[0, 1], [0, 2], [1, 0], [1, 2], [2, 0], [2, 1]])
    P = 6
    x = {"E1": torch.zeros(K, 2 * D), "union": torch.zeros(P, D), "pairs": pairs, "weight": torch.zeros(C, D),
         "bias": torch.zeros(C)}
    fl = floors.FLOORS["pairwise_edge_fusion"](x)
    # fwd reads E1 [3, 16], union [6, 8], pairs [6, 2] int64, weight [5, 8], bias [5]; writes [6, 5]
    assert fl.bytes_fwd == 3 * 16 * F32 + 6 * 8 * F32 + 6 * 2 * I64 + 5 * 8 * F32 + 5 * F32 + 6 * 5 * F32 == 780
    # g = subj * obj * union: 2 multiplies per (p, d) = 6 * 16; g W^T: 2 * P * C * D = 480; + bias: 30
    assert fl.flops_fwd == 6 * 16 + 2 * 6 * 5 * 8 + 6 * 5 == 606
    # bwd reads G [6, 5], E1, union, pairs, weight; writes dE1, dunion, dW, dbias
    assert fl.bytes_bwd == (30 + 48 + 48 + 40) * F32 + 12 * I64 + (48 + 48 + 40 + 5) * F32 == 1324
    # dg = G W and dW = G^T g: 2 x 480; d bias 30; g recomputed 96; d subj, d obj: 96 multiplies + 48
    # scatter-adds each; d union: 48
    assert fl.flops_bwd == 2 * 480 + 30 + 96 + 2 * (96 + 48) + 48 == 1422
    # half precision: float bytes halve, the int64 pairs do not
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in x.items()}
    assert floors.FLOORS["pairwise_edge_fusion"](half).bytes_fwd == (780 - 96) // 2 + 96


def test_cosine_assign_and_superpixel_floor_by_hand():
    B, M, C, D = 2, 6, 3, 4
    x = {"feats": torch.zeros(B, M, D), "centers": torch.zeros(B, C, D)}
    fl = floors.FLOORS["cosine_assign"](x)
    # reads feats (48 floats) and centers (24); writes assign [2, 6] int64 and sim [2, 6]
    assert fl.bytes_fwd == (48 + 24) * F32 + 12 * (I64 + F32) == 432
    # dots 2 B M C D = 288, squared norms 2 B (M + C) D = 144, one scale per (point, center) = 36
    assert fl.flops_fwd == 288 + 144 + 36
    # bwd: per point |f|^2 (2D), grad f (3D), scatter (2D); per center |c|^2 and grad c (4D)
    assert fl.flops_bwd == 7 * B * M * D + 4 * B * C * D == 432
    # bwd bytes: grad sim, feats, centers, assign, sim read; grad feats, grad centers written
    assert fl.bytes_bwd == 12 * F32 + 72 * F32 + 12 * (I64 + F32) + 72 * F32 == 768

    sp = floors.FLOORS["superpixel_cluster"](x)
    # Eq. 2's FLOPs plus Eq. 3's: 2 B M D (weighted sums) + B M (den) + 2 B C D (+ centers, / den)
    assert sp.flops_fwd == 468 + 2 * 48 + 12 + 2 * 24
    # feats and centers read once although used twice; out [2, 3, 4], den [2, 3], assign, sim written
    assert sp.bytes_fwd == 72 * F32 + 24 * F32 + 6 * F32 + 12 * (I64 + F32) == 552
    # bwd: Eq. 3's backward (4 B M D + B C D) + Eq. 2's (432) + the path sums (B M D + B C D + B M)
    assert sp.flops_bwd == (4 * 48 + 24) + 432 + (48 + 24 + 12)


def test_cluster_dispatch_floor_by_hand():
    x = {"center_out": torch.zeros(1, 2, 3), "assign": torch.zeros(1, 4, dtype=torch.int64), "sim": torch.zeros(1, 4),
         "residual": torch.zeros(1, 4, 3)}
    fl = floors.FLOORS["cluster_dispatch"](x)
    assert fl.bytes_fwd == 6 * F32 + 4 * (I64 + F32) + 12 * F32 + 12 * F32 == 168
    assert fl.flops_fwd == 2 * 4 * 3  # one multiply-add per point and channel
    assert fl.flops_bwd == 4 * 4 * 3  # grad sim (dot) and grad center_out (scatter), 2 each


def test_prototype_distance_floor_by_hand():
    N, Q, D = 5, 3, 4
    fl = floors.FLOORS["prototype_distance"]({"x": torch.zeros(N, D), "protos": torch.zeros(Q, D)})
    assert fl.bytes_fwd == (5 + 3) * 4 * F32 + 2 * 15 * F32 == 248
    # the x.p GEMM 2 N Q D = 120, the squared norms 2 (N + Q) D = 64, a 7-FLOP epilogue per (n, q)
    assert fl.flops_fwd == 120 + 64 + 7 * 15 == 289
    # bwd reads grad cos, grad dist, cos, dist [5, 3] and x, protos; writes grad x, grad protos
    assert fl.bytes_bwd == 4 * 15 * F32 + 2 * 32 * F32 == 496
    # K P and K^T x: 4 N Q D; r x and c P: 4 (N + Q) D; K, W and the sums: 8 per (n, q)
    assert fl.flops_bwd == 240 + 128 + 120 == 488
    # the dominant term is the GEMM: 2 N Q D at the paper's size
    big = floors.prototype_floor(2400, 51, 4096, 4)
    assert 2 * 2400 * 51 * 4096 <= big.flops_fwd < 1.03 * 2 * 2400 * 51 * 4096


@pytest.mark.parametrize("m, d", [(3, 3), (28, 7), (5, 7), (1, 3)])
def test_valid_taps_match_a_convolution_of_ones(m, d):
    """T = the multiply-adds of a zero-padded d x d cross-correlation of an m x m plane that land
    inside it: F.conv2d of ones by ones, summed."""
    ones = F.conv2d(torch.ones(1, 1, m, m, dtype=torch.float64), torch.ones(1, 1, d, d, dtype=torch.float64),
                    padding=d // 2)
    assert floors.valid_taps_1d(m, d) ** 2 == int(ones.sum())
    if (m, d) == (3, 3):
        assert floors.valid_taps_1d(3, 3) == 2 + 3 + 2


def test_pair_mask_conv_floor_by_hand(monkeypatch):
    K, P, C, m, d = 2, 2, 1, 3, 3
    from sgg_kernels.bench.cases import masks as cases

    monkeypatch.setattr(cases, "KERNEL_SIZE", d)
    x = {"masks": torch.zeros(K, C, m, m), "pairs": torch.tensor([[0, 1], [1, 0]]), "params": torch.zeros(P, 2, 3),
         "boxes": torch.zeros(K, 4)}
    fl = floors.FLOORS["pair_mask_conv"](x)
    T = 7 * 7  # valid taps of a 3 x 3 kernel on a 3 x 3 plane
    # reads masks [2, 1, 3, 3], pairs [2, 2] int64, params [2, 2, 3]; writes out [2, 1, 3, 3]; boxes unused
    assert fl.bytes_fwd == 18 * F32 + 4 * I64 + 12 * F32 + 18 * F32 == 224
    # 2 roles x 2 P C T (smoothing) + P C m^2 (product) + 15 FLOPs per kernel cell (2 P d^2 cells)
    assert fl.flops_fwd == 2 * 2 * 2 * 1 * T + 2 * 9 + 15 * 2 * 2 * 9 == 950
    # bwd: recompute 4 P C T + G.O, G.S 2 P C m^2 + conv_transpose 4 P C T + d kernels 4 P C T
    # + scatter into d masks 2 P C m^2 + the kernels' backward (2 x 15 per cell)
    assert fl.flops_bwd == 12 * 2 * T + 4 * 2 * 9 + 2 * 15 * 2 * 2 * 9 == 2328
    # bwd reads grad out, masks, pairs, params; writes d masks, d params
    assert fl.bytes_bwd == 18 * F32 + 18 * F32 + 4 * I64 + 12 * F32 + 18 * F32 + 12 * F32 == 344

    union = floors.FLOORS["pair_mask_conv_union"](x)
    X = 4 * (3 * 3 + 3 * 3)  # separable resampling into the R = 3 union frame, <= 2 taps per output and axis
    assert union.bytes_fwd == 224 + 2 * 4 * F32  # + boxes
    assert union.flops_fwd == 2 * 2 * (2 * T + X) + 2 * 9 + 15 * 2 * 2 * 9
    assert union.flops_bwd - fl.flops_bwd == 2 * 2 * X + 2 * 2 * X  # recompute + A^T, both roles


def test_roi_align_floor_by_hand():
    """One RoI of 14 x 21 map pixels at spatial scale 1/16 (the case's), 7 x 7 bins, adaptive sampling:
    ceil(14 / 7) = 2 x ceil(21 / 7) = 3 samples per bin, each a 4-tap bilinear read."""
    from sgg_kernels.bench.cases import pairs as cases

    assert (cases.OUT, cases.SCALE, cases.SAMPLING) == (7, 1 / 16, 0)
    D = 2
    x = {"features": torch.zeros(1, D, 8, 8), "boxes": torch.tensor([[0.0, 0.0, 16 * 14.0, 16 * 21.0]]),
         "box_batch": torch.zeros(1, dtype=torch.int64), "pairs": torch.zeros(0, 2, dtype=torch.int64)}
    fl = floors.FLOORS["roi_align"](x)
    assert fl.flops_fwd == 8 * D * 49 * (2 * 3) == 4704  # 4 multiply-adds per sample and channel
    assert fl.flops_bwd == fl.flops_fwd
    # features [1, 2, 8, 8] read, boxes and box_batch read, out [1, 2, 7, 7] written
    assert fl.bytes_fwd == 128 * F32 + 4 * F32 + I64 + 98 * F32 == 928
    assert fl.bytes_bwd == 98 * F32 + 4 * F32 + I64 + 128 * F32  # grad out read, grad features written

    # union_roi_align: the union of a 1 x 1-pixel box (forced to extent 1: 1 sample per bin) and itself
    x2 = dict(x, boxes=torch.tensor([[0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 8.0, 8.0]]),
              box_batch=torch.zeros(2, dtype=torch.int64), pairs=torch.tensor([[0, 1], [1, 0]]))
    fu = floors.FLOORS["union_roi_align"](x2)
    assert fu.flops_fwd == 8 * D * 49 * 1 * 2 + 4 * 2  # 2 RoIs x 49 bins x 1 sample, + the union boxes
    assert fu.bytes_fwd == 128 * F32 + 8 * F32 + 2 * I64 + 4 * I64 + 2 * 98 * F32  # + pairs


def test_box_floors_by_hand():
    x = {"boxes": torch.zeros(4, 4), "pairs": torch.zeros(3, 2, dtype=torch.int64)}
    ub, pg = floors.FLOORS["union_boxes"](x), floors.FLOORS["pair_geometry"](x)
    assert ub.bytes_fwd == pg.bytes_fwd == 16 * F32 + 6 * I64 + 12 * F32
    assert ub.flops_fwd == 4 * 3 and pg.flops_fwd == 24 * 3


def test_floor_sums_and_times():
    fl = floors.Floor(bytes_fwd=100, flops_fwd=1000, bytes_bwd=300, flops_bwd=10)
    assert fl.bytes("fwd") == 100 and fl.bytes("fwd+bwd") == 400
    assert fl.flops("fwd") == 1000 and fl.flops("fwd+bwd") == 1010
    # fwd: compute-bound (1000 / 10 > 100 / 1); bwd: memory-bound (300 / 1 > 10 / 10); phases added
    assert fl.time_s("fwd", bandwidth=1.0, flop_rate=10.0) == 100.0
    assert fl.time_s("fwd+bwd", bandwidth=1.0, flop_rate=10.0) == 100.0 + 300.0


# ---------------------------------------------------------------------------------------------
# Every case has a floor
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(registry.all_cases()))
def test_every_case_has_a_floor(name):
    case = _case(name)
    assert case.floor is not None or name in floors.FLOORS, f"{name} has no floor"
    fl = case.compute_floor(case.prepare("small", "cpu"))
    assert isinstance(fl, floors.Floor)
    for value in (fl.bytes_fwd, fl.flops_fwd, fl.bytes_bwd, fl.flops_bwd):
        assert isinstance(value, int) and value > 0, (name, fl)
    assert name in floors.UNITS  # the printer's datasheet estimate knows its compute unit


def test_a_case_without_a_floor_is_an_error():
    case = registry.Case(name="no_such_op", family="x", sizes={"small": None}, make_inputs=lambda *a: {},
                         fused=lambda: (), reference=lambda: (), grad_inputs=())
    with pytest.raises(KeyError, match="no floor for benchmark case 'no_such_op'"):
        case.compute_floor({})
    own = registry.Case(name="no_such_op", family="x", sizes={"small": None}, make_inputs=lambda *a: {},
                        fused=lambda: (), reference=lambda: (), grad_inputs=(), floor=lambda x: floors.Floor(1, 2, 3, 4))
    assert own.compute_floor({}) == floors.Floor(1, 2, 3, 4)


def test_floor_scales_with_the_paper_size():
    """paper's fusion floor: the GEMM 2 P C D dominates the FLOPs and union [P, D] the bytes."""
    case = _case("pairwise_edge_fusion")
    x = case.make_inputs("paper", torch.device("cpu"), torch.float32, 0)
    fl = case.compute_floor(x)
    P, D, C = 2400, 4096, 51
    assert x["pairs"].shape[0] == P
    assert 2 * P * C * D < fl.flops_fwd < 1.05 * 2 * P * C * D
    assert P * D * F32 < fl.bytes_fwd < 1.2 * P * D * F32


# ---------------------------------------------------------------------------------------------
# The report: floors on the CPU, no % of floor; the % arithmetic with given peaks
# ---------------------------------------------------------------------------------------------
def _cpu_rows(floors_out=None):
    cases = [_case("cluster_dispatch"), _case("prototype_distance")]
    return runner.run(cases, ["small"], impls=["fused", "eager"], passes=["fwd", "fwd+bwd"], min_time=0.01,
                      log=lambda _: None, floors=floors_out)


def test_cpu_report_has_floors_and_no_percent(tmp_path):
    got = {}
    rows = _cpu_rows(got)
    assert rows and all(r.error is None for r in rows)
    assert set(got) == {("cluster_dispatch", "small"), ("prototype_distance", "small")}
    for r in rows:
        fl = got[(r.op, r.size)]
        assert r.floor_bytes == fl.bytes(r.pass_) and r.floor_flops == fl.flops(r.pass_)
    floors.apply_peaks(rows, floors.measure_peaks(torch.device("cpu")))  # None on the CPU: nothing changes
    assert all(r.floor_ms is None and r.pct_of_floor is None for r in rows)

    text = report.table(rows, report.floor_lines(None, torch.device("cpu")))
    header = text.splitlines()[0]
    assert "floor MB" in header and "floor GFLOP" in header and "%" not in header
    assert "no CPU peak is assumed" in text

    doc = report.document(rows, torch.device("cpu"), "test", floors=got, peaks=None)
    path = tmp_path / "b.json"
    report.write_json(doc, str(path))
    data = json.loads(path.read_text())
    assert data["peaks"] is None
    assert data["floors"]["prototype_distance"]["small"] == got[("prototype_distance", "small")].to_json()
    for row in data["results"]:
        assert row["floor_bytes"] > 0 and row["floor_flops"] > 0
        assert row["floor_ms"] is None and row["pct_of_floor"] is None


def test_percent_of_floor_with_given_peaks():
    """What a CUDA run computes, with made-up peaks: floor_ms = max(bytes / bw, FLOPs / rate) per
    phase (phases added), % = 100 floor_ms / median."""
    fl = floors.Floor(bytes_fwd=2 * 10 ** 9, flops_fwd=10 ** 12, bytes_bwd=4 * 10 ** 9, flops_bwd=10 ** 14)
    rows = [runner.Result(op="x", size="s", pass_=p, impl="fused", median_ms=10.0, dtype="float32", floor=fl,
                          floor_bytes=fl.bytes(p), floor_flops=fl.flops(p)) for p in ("fwd", "fwd+bwd")]
    rows.append(runner.Result(op="x", size="s", pass_="fwd", impl="eager", dtype="bfloat16", median_ms=1.0,
                              floor=fl, floor_bytes=fl.bytes("fwd"), floor_flops=fl.flops("fwd")))
    peaks = {"copy_gbps": 1000.0, "copy_bytes": 2 ** 30, "gemm_tflops": {"float32": 50.0}, "gemm_n": 8192,
             "float32_matmul_precision": "highest"}
    floors.apply_peaks(rows, peaks)
    # fwd: 2e9 B / 1e12 B/s = 2 ms vs 1e12 / 5e13 = 20 ms -> 20 ms; bwd: 4 ms vs 2000 ms -> 2000 ms
    assert math.isclose(rows[0].floor_ms, 20.0) and math.isclose(rows[0].pct_of_floor, 200.0)
    assert math.isclose(rows[1].floor_ms, 2020.0)
    assert rows[2].floor_ms is None and rows[2].pct_of_floor is None  # no bfloat16 rate measured
    text = report.table(rows, report.floor_lines(peaks, torch.device("cuda")))
    assert "% floor" in text.splitlines()[0] and "200.0%" in text and "1000 GB/s" in text
    assert report.peaks_json(peaks)["gemm_tflops"] == {"float32": 50.0}
    assert rows[0].to_json()["pct_of_floor"] == 200.0 and "floor" not in rows[0].to_json()
