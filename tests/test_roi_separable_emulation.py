"""A float32 emulation of the separable RoIAlign CUDA kernels, checked on the CPU (no GPU needed).

It mirrors csrc/cuda/pairs.cu function by function, one float32 operation at a time (numpy
float32 scalars round every operation as the kernels' Rn<float> does):

- ``read_roi``, ``roi_axis``, ``sample_pos``, ``axis_taps``: the RoI, its axes and the samples'
  bilinear taps (copied rule for rule: pos < -1 or pos > size or NaN reads 0, pos <= 0 clamps to 0,
  low >= size - 1 puts both taps on size - 1 with weights (1, 0));
- ``build_bin`` / ``build_sep_taps``: the dense per-bin weight rows wy [ph, H] (1/count folded in
  as one reciprocal per RoI) and wx [pw, W] with each bin's inclusive range [lo, hi] (lo > hi: no
  valid sample), samples accumulated in order;
- ``roi_align_kernel``'s contraction: out[c, i, j] = sum_{y in [ylo_i, yhi_i]} wy[i, y]
  sum_{x in [xlo_j, xhi_j]} wx[j, x] F[c, y, x] over exactly those index ranges;
- ``compact_axis`` and ``roi_align_backward_kernel``: the touched rows / columns (ascending) with
  the range of bins [a, b] touching each, and grad F[c, y, x] = sum_{i in [a_y, b_y]} wy[i, y]
  sum_{j in [a_x, b_x]} G[c, i, j] wx[j, x] for the touched pixels only (the kernel's register
  path for <= kSepPixelBins bins per axis and its generic loop share these index ranges).

The emulated outputs and feature gradients are compared with the float64 reference
(sgg_kernels/reference/pairs.py) and with the C++ CPU op on random boxes: boxes off the map,
inverted and zero-size boxes, tiny boxes, huge boxes (adaptive n at the 512 cap), non-finite
boxes, aligned True/False, sampling_ratio -1/0/2, with and without pairs (union boxes, invalid
pairs and images). An index or range bug in the tap building (an off-by-one in [lo, hi], a
missed clamp, a wrong compaction) changes the result far beyond the float32 tolerance. The
summation order inside a bin is not the kernel's (numpy dot products), which only moves ulps.
What this cannot check: the CUDA code itself (thread mapping, shared-memory layout, barriers,
atomics); tests/test_pairs.py runs the real kernels against the same oracles on a GPU.
"""
import math

import numpy as np
import pytest
import torch

from sgg_kernels.reference import pairs as ref

F32 = np.float32
MAX_SAMPLES = 512  # kMaxSamplesPerBinDim


# ---------------------------------------------------------------------------------------------
# csrc/cuda/pairs.cu, in float32
# ---------------------------------------------------------------------------------------------
def min_subject(s, o):
    return s if (s <= o or math.isnan(s)) else o


def max_subject(s, o):
    return s if (s >= o or math.isnan(s)) else o


def read_roi(boxes, box_batch, pairs, r, K, B):
    """(valid, (x1, y1, x2, y2) float32, b) of RoI r, as read_roi."""
    if pairs is not None:
        s, o = int(pairs[r, 0]), int(pairs[r, 1])
        if not (0 <= s < K and 0 <= o < K):
            return False, None, 0
        bs, bo = boxes[s], boxes[o]
        box = (min_subject(bs[0], bo[0]), min_subject(bs[1], bo[1]), max_subject(bs[2], bo[2]),
               max_subject(bs[3], bo[3]))
        b = int(box_batch[s])
    else:
        box = tuple(boxes[r])
        b = int(box_batch[r])
    return 0 <= b < B, box, b


def roi_axis(lo, hi, scale, offset, aligned, pooled, sampling_ratio):
    """(start, bin, n) as roi_axis."""
    start = F32(F32(lo) * scale) - offset
    end = F32(F32(hi) * scale) - offset
    extent = F32(end - start)
    if not aligned and extent < F32(1):
        extent = F32(1)
    bin_ = F32(extent / F32(pooled))
    if sampling_ratio > 0:
        n = min(sampling_ratio, MAX_SAMPLES)
    else:
        c = np.ceil(bin_)
        n = 0 if not (c >= F32(1)) else (MAX_SAMPLES if c >= F32(MAX_SAMPLES) else int(c))
    return F32(start), bin_, n


def sample_pos(a, p, i):
    start, bin_, n = a
    base = F32(start + F32(F32(p) * bin_))
    step = F32(F32(F32(F32(i) + F32(0.5)) * bin_) / F32(n))
    return F32(base + step)


def axis_taps(pos, size):
    """(ok, low, high, w_low, w_high) as axis_taps."""
    if not (pos >= F32(-1) and pos <= F32(size)):
        return False, 0, 0, F32(0), F32(0)
    if pos <= F32(0):
        pos = F32(0)
    low = int(pos)
    if low >= size - 1:
        low = high = size - 1
        pos = F32(low)
    else:
        high = low + 1
    frac = F32(pos - F32(low))
    return True, low, high, F32(F32(1) - frac), frac


def build_bin(a, p, size, scale):
    """(w [size] float32, lo, hi) as build_bin: taps in sample order, then scaled over [lo, hi]."""
    w = np.zeros(size, dtype=np.float32)
    lo, hi = size, -1
    for i in range(a[2]):
        ok, tl, th, wl, wh = axis_taps(sample_pos(a, p, i), size)
        if not ok:
            continue
        w[tl] = F32(w[tl] + wl)
        w[th] = F32(w[th] + wh)
        lo, hi = min(lo, tl), max(hi, th)
    if scale != F32(1):
        for y in range(lo, hi + 1):
            w[y] = F32(w[y] * scale)
    return w, lo, hi


def build_sep_taps(boxes, box_batch, pairs, r, K, B, ph, pw, H, W, scale, sampling_ratio, aligned):
    """None for an invalid RoI, else (b, wy [ph, H], ylo, yhi, wx [pw, W], xlo, xhi)."""
    valid, box, b = read_roi(boxes, box_batch, pairs, r, K, B)
    if not valid:
        return None
    x1, y1, x2, y2 = box
    offset = F32(0.5) if aligned else F32(0)
    ay = roi_axis(y1, y2, scale, offset, aligned, ph, sampling_ratio)
    ax = roi_axis(x1, x2, scale, offset, aligned, pw, sampling_ratio)
    cnt = ay[2] * ax[2]
    inv_count = F32(F32(1) / F32(max(cnt, 1)))
    wy, ylo, yhi = np.zeros((ph, H), np.float32), [0] * ph, [0] * ph
    wx, xlo, xhi = np.zeros((pw, W), np.float32), [0] * pw, [0] * pw
    for q in range(ph):
        wy[q], ylo[q], yhi[q] = build_bin(ay, q, H, inv_count)
    for q in range(pw):
        wx[q], xlo[q], xhi[q] = build_bin(ax, q, W, F32(1))
    return b, wy, ylo, yhi, wx, xlo, xhi


def compact_axis(lo, hi, pooled):
    """[(pixel, a, b)] ascending: the pixels some bin's [lo, hi] contains, with the bins' range."""
    spans = [(lo[p], hi[p]) for p in range(pooled) if lo[p] <= hi[p]]
    if not spans:
        return []
    span_lo, span_hi = min(s[0] for s in spans), max(s[1] for s in spans)
    out = []
    for y in range(span_lo, span_hi + 1):
        a, b = pooled, -1
        for p in range(pooled):
            if lo[p] <= y <= hi[p]:
                a, b = min(a, p), max(b, p)
        if a <= b:
            out.append((y, a, b))
    return out


def emulate_forward(f, boxes, box_batch, pairs, ph, pw, scale, sampling_ratio, aligned):
    B, D, H, W = f.shape
    K = boxes.shape[0]
    R = K if pairs is None else pairs.shape[0]
    out = np.zeros((R, D, ph, pw), np.float32)
    sc = F32(scale)
    for r in range(R):
        t = build_sep_taps(boxes, box_batch, pairs, r, K, B, ph, pw, H, W, sc, sampling_ratio, aligned)
        if t is None:
            continue
        b, wy, ylo, yhi, wx, xlo, xhi = t
        fb = f[b]  # [D, H, W]
        for i in range(ph):
            for j in range(pw):
                x0, x1 = xlo[j], xhi[j]
                if x1 < x0:
                    continue
                acc = np.zeros(D, np.float32)
                for y in range(ylo[i], yhi[i] + 1):
                    s = fb[:, y, x0:x1 + 1] @ wx[j, x0:x1 + 1]
                    acc = (acc + wy[i, y] * s).astype(np.float32)
                out[r, :, i, j] = acc
    return out


def emulate_backward(g, boxes, box_batch, pairs, B, H, W, scale, sampling_ratio, aligned):
    R, D, ph, pw = g.shape
    K = boxes.shape[0]
    ws = np.zeros((B, D, H, W), np.float32)
    sc = F32(scale)
    for r in range(R):
        t = build_sep_taps(boxes, box_batch, pairs, r, K, B, ph, pw, H, W, sc, sampling_ratio, aligned)
        if t is None:
            continue
        b, wy, ylo, yhi, wx, xlo, xhi = t
        rows, cols = compact_axis(ylo, yhi, ph), compact_axis(xlo, xhi, pw)
        for y, ia, ib in rows:
            for x, ja, jb in cols:
                v = np.zeros(D, np.float32)
                for i in range(ia, ib + 1):
                    s = g[r, :, i, ja:jb + 1] @ wx[ja:jb + 1, x]
                    v = (v + wy[i, y] * s).astype(np.float32)
                ws[b, :, y, x] += v  # one atomicAdd per (RoI, channel, touched pixel)
    return ws


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------
def _boxes(gen, n, img_w, img_h):
    """Random boxes, many reaching off the map, plus tiny, huge, degenerate and non-finite ones."""
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * torch.tensor([img_w * 1.4, img_h * 1.4]) \
        - 0.2 * torch.tensor([img_w, img_h])
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * torch.tensor([img_w * 0.7, img_h * 0.7]) + 0.3
    b = torch.cat([xy, xy + wh], dim=1)
    extra = torch.tensor([
        [5.0, 7.0, 5.02, 7.01],                              # tiny (well below a pixel)
        [-img_w, -img_h, 2 * img_w, 2 * img_h],              # the whole map and more on every side
        [-3 * img_w, 0.0, -2 * img_w, img_h],                # entirely left of the map
        [0.0, img_h * 1.5, img_w, img_h * 2.0],              # entirely below the map
        [10.0, 10.0, 10.0, 30.0],                            # zero width
        [30.0, 20.0, 12.0, 25.0],                            # inverted
        [-1e4, -1e4, 3e4, 3e4],                              # huge: adaptive n at the cap
        [float("nan"), 3.0, 20.0, 30.0],                     # non-finite
        [0.0, 0.0, float("inf"), 30.0],
        [0.0, 0.0, img_w, img_h],                            # exactly the image
    ], dtype=torch.float64)
    return torch.cat([b, extra]).to(torch.float32)


def _cpu_op():
    try:
        import sgg_kernels  # noqa: F401  (registers the ops)
        op = torch.ops.sgg_kernels._roi_align
        torch.ops.sgg_kernels._roi_align_backward  # noqa: B018
        return op
    except (AttributeError, RuntimeError):
        return None


def _close(got, want, what, tol=3e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    assert np.isfinite(got).all(), what
    err = np.abs(got - want)
    bound = tol * (1.0 + np.abs(want))
    bad = err > bound
    assert not bad.any(), f"{what}: {bad.sum()} of {bad.size} elements off, max err {err.max():.3g}"


def _reference(f, boxes, box_batch, pairs, ph, pw, scale, sr, aligned, G):
    """(out, grad f) of the float64 reference (which reads no sample of a non-finite RoI, as the
    kernels: its n or its positions are NaN)."""
    out = ref.roi_align(f.double(), boxes.double(), box_batch, pairs, ph, pw, scale, sr, aligned)
    gf = ref.roi_align_backward(G.double(), boxes.double(), box_batch, pairs, f.shape[0], f.shape[2], f.shape[3],
                                scale, sr, aligned)
    return out, gf


@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
@pytest.mark.parametrize("union", [False, True], ids=["boxes", "union"])
def test_separable_emulation_matches_reference_and_cpu(aligned, sampling_ratio, union):
    gen = torch.Generator().manual_seed(1234 + 7 * sampling_ratio + 3 * aligned + union)
    B, D, H, W = 3, 3, 11, 17
    scale = 0.25
    ph, pw = 3, 4
    boxes = _boxes(gen, 14, W / scale, H / scale)
    K = boxes.shape[0]
    box_batch = torch.randint(0, B, (K,), generator=gen)
    box_batch[3] = B  # an image outside [0, B): that RoI reads 0 (with pairs: as the subject)
    pairs = None
    if union:
        s = torch.randint(0, K, (40,), generator=gen)
        o = torch.randint(0, K, (40,), generator=gen)
        pairs = torch.stack([s, o], 1)
        pairs[0, 1] = K  # an invalid pair
        pairs[1, 0] = -1
    f = torch.randn(B, D, H, W, generator=gen, dtype=torch.float32)
    R = K if pairs is None else pairs.shape[0]
    G = torch.randn(R, D, ph, pw, generator=gen, dtype=torch.float32)

    with np.errstate(all="ignore"):
        out = emulate_forward(f.numpy(), boxes.numpy(), box_batch.numpy(), None if pairs is None else pairs.numpy(),
                              ph, pw, scale, sampling_ratio, aligned)
        gf = emulate_backward(G.numpy(), boxes.numpy(), box_batch.numpy(), None if pairs is None else pairs.numpy(),
                              B, H, W, scale, sampling_ratio, aligned)

    want_out, want_gf = _reference(f, boxes, box_batch, pairs, ph, pw, scale, sampling_ratio, aligned, G)
    _close(out, want_out, "forward vs reference")
    _close(gf, want_gf, "backward vs reference", tol=1e-4)

    op = _cpu_op()
    if op is None:
        pytest.skip("the C++ CPU op is not built")
    got = op(f, boxes, box_batch, pairs, ph, pw, scale, sampling_ratio, aligned)
    _close(out, got.numpy(), "forward vs CPU op")
    got_g = torch.ops.sgg_kernels._roi_align_backward(G, boxes, box_batch, pairs, B, H, W, scale, sampling_ratio,
                                                       aligned)
    _close(gf, got_g.numpy(), "backward vs CPU op", tol=1e-4)


def test_emulated_taps_are_the_reference_weights():
    """Row by row: the emulated dense rows (times count for y) are the reference's _axis_weights
    (the float64 spec of the same samples), and every nonzero weight lies inside [lo, hi]."""
    gen = torch.Generator().manual_seed(99)
    H, W, scale = 13, 9, 0.5
    boxes = _boxes(gen, 30, W / scale, H / scale)
    fin = torch.isfinite(boxes).all(1)
    boxes = boxes[fin]
    for aligned in (False, True):
        for sr in (-1, 0, 1, 3):
            x0, y0, ew, eh = ref.roi_extents(boxes.double(), scale, aligned)
            Ay, n_h = ref._axis_weights(y0, eh, 5, H, sr)
            Ax, n_w = ref._axis_weights(x0, ew, 4, W, sr)
            with np.errstate(all="ignore"):
                for r in range(boxes.shape[0]):
                    t = build_sep_taps(boxes.numpy(), np.zeros(boxes.shape[0], np.int64), None, r, boxes.shape[0],
                                       1, 5, 4, H, W, F32(scale), sr, aligned)
                    _, wy, ylo, yhi, wx, xlo, xhi = t
                    count = max(int(n_h[r]) * int(n_w[r]), 1)
                    _close(wy.astype(np.float64) * count, Ay[r].numpy(), f"Ay r={r} sr={sr} aligned={aligned}", 1e-5)
                    _close(wx, Ax[r].numpy(), f"Ax r={r} sr={sr} aligned={aligned}", 1e-5)
                    for w, lo, hi in ((wy, ylo, yhi), (wx, xlo, xhi)):
                        for p in range(w.shape[0]):
                            nz = np.nonzero(w[p])[0]
                            if nz.size:
                                assert lo[p] <= nz.min() and nz.max() <= hi[p]
                            # a bin touches at most ceil(|bin| (n - 1) / n) + 3 pixels: the reason the
                            # dense per-bin rows hold few nonzeros (and the direct tap loop is short)
                            assert hi[p] - lo[p] + 1 <= w.shape[1]


# ---------------------------------------------------------------------------------------------
# On a GPU: the real kernels on the same boxes, and the per-sample fallback (a shared-memory
# layout above the device limit: (ph H + pw W) acc_t > ~227 KB) against the separable path.
# ---------------------------------------------------------------------------------------------
def _cuda_ops():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    op = _cpu_op()
    if op is None:
        pytest.skip("the extension is not built")
    return op, torch.ops.sgg_kernels._roi_align_backward


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
@pytest.mark.parametrize("union", [False, True], ids=["boxes", "union"])
def test_cuda_separable_matches_cpu(dtype, aligned, sampling_ratio, union):
    fwd, bwd = _cuda_ops()
    gen = torch.Generator().manual_seed(77 + sampling_ratio + 5 * aligned + 11 * union)
    B, D, H, W, scale, ph, pw = 3, 45, 11, 17, 0.25, 3, 4  # D = 45: two channel blocks, a short last one
    boxes = _boxes(gen, 14, W / scale, H / scale)
    K = boxes.shape[0]
    box_batch = torch.randint(0, B, (K,), generator=gen)
    box_batch[3] = B
    pairs = None
    if union:
        pairs = torch.stack([torch.randint(0, K, (60,), generator=gen), torch.randint(0, K, (60,), generator=gen)], 1)
        pairs[0, 1] = K
    f = torch.randn(B, D, H, W, generator=gen, dtype=dtype)
    R = K if pairs is None else pairs.shape[0]
    G = torch.randn(R, D, ph, pw, generator=gen, dtype=dtype)
    bx = boxes.to(dtype)
    want = fwd(f, bx, box_batch, pairs, ph, pw, scale, sampling_ratio, aligned)
    want_g = bwd(G, bx, box_batch, pairs, B, H, W, scale, sampling_ratio, aligned)
    c = lambda x: None if x is None else x.cuda()  # noqa: E731
    got = fwd(f.cuda(), bx.cuda(), box_batch.cuda(), c(pairs), ph, pw, scale, sampling_ratio, aligned).cpu()
    got_g = bwd(G.cuda(), bx.cuda(), box_batch.cuda(), c(pairs), B, H, W, scale, sampling_ratio, aligned).cpu()
    tol = 3e-5 if dtype == torch.float32 else 1e-12
    _close(got.numpy(), want.numpy(), "cuda forward vs CPU op", tol)
    _close(got_g.numpy(), want_g.numpy(), "cuda backward vs CPU op", 10 * tol)
    # the forward is deterministic
    again = fwd(f.cuda(), bx.cuda(), box_batch.cuda(), c(pairs), ph, pw, scale, sampling_ratio, aligned).cpu()
    assert torch.equal(got, again)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_fallback_for_layouts_above_shared_memory(dtype):
    """W = 70,000 columns: (ph H + pw W) acc_t exceeds any device's opt-in shared memory, so the
    per-sample kernels run; they and the separable kernels (W = 700) must both match the CPU op."""
    fwd, bwd = _cuda_ops()
    gen = torch.Generator().manual_seed(5)
    for W in (700, 70000):
        B, D, H, scale = 2, 3, 3, 1.0
        x1 = torch.rand(12, generator=gen, dtype=torch.float64) * (W - 40) - 10
        y1 = torch.rand(12, generator=gen, dtype=torch.float64) * H - 1
        boxes = torch.stack([x1, y1, x1 + torch.rand(12, generator=gen, dtype=torch.float64) * 60 + 0.5,
                             y1 + torch.rand(12, generator=gen, dtype=torch.float64) * 3 + 0.2], 1).to(dtype)
        box_batch = torch.randint(0, B, (12,), generator=gen)
        f = torch.randn(B, D, H, W, generator=gen, dtype=dtype)
        G = torch.randn(12, D, 2, 3, generator=gen, dtype=dtype)
        want = fwd(f, boxes, box_batch, None, 2, 3, scale, 0, False)
        want_g = bwd(G, boxes, box_batch, None, B, H, W, scale, 0, False)
        got = fwd(f.cuda(), boxes.cuda(), box_batch.cuda(), None, 2, 3, scale, 0, False).cpu()
        got_g = bwd(G.cuda(), boxes.cuda(), box_batch.cuda(), None, B, H, W, scale, 0, False).cpu()
        tol = 3e-5 if dtype == torch.float32 else 1e-12
        _close(got.numpy(), want.numpy(), f"W={W} forward", tol)
        _close(got_g.numpy(), want_g.numpy(), f"W={W} backward", 10 * tol)
