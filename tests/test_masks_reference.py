"""Gaussian pair masks (segmentation-grounded SGG, Eq. 4 and 6): the pure-PyTorch reference against
independent oracles written here (per-pair conv2d loops, F.grid_sample), and its gradients.

The fused ops of this family (issue 4) are not built yet; these tests pin the oracle they will be
checked against.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from sgg_kernels.reference import masks as ref


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_gaussian_kernels_normalised_and_isotropic():
    params = torch.tensor([[math.log(1.5 ** 2), math.log(1.5 ** 2), 0.0]], dtype=torch.float64)
    k = ref.gaussian_kernels(params, 7)[0]
    assert k.shape == (7, 7) and abs(k.sum().item() - 1) < 1e-12
    g = torch.exp(-((torch.arange(7, dtype=torch.float64) - 3) ** 2) / (2 * 1.5 ** 2))
    assert torch.allclose(k, torch.outer(g, g) / torch.outer(g, g).sum(), atol=1e-14)


def test_gaussian_kernels_axes_and_correlation():
    # sx >> sy: spread along columns (x, u); rho > 0: mass on the u = v diagonal
    wide = ref.gaussian_kernels(torch.tensor([math.log(9.0), math.log(0.25), 0.0], dtype=torch.float64), 5)
    assert wide[2, 4] > wide[4, 2]  # (row 2, col 4) = (v 0, u 2) beats (v 2, u 0)
    corr = ref.gaussian_kernels(torch.tensor([0.0, 0.0, 1.5], dtype=torch.float64), 5)
    assert corr[3, 3] > corr[3, 1] and torch.allclose(corr, corr.T)  # symmetric in u <-> v
    tiny = ref.gaussian_kernels(torch.tensor([-80.0, -80.0, 0.0], dtype=torch.float64), 3)
    assert torch.isfinite(tiny).all() and tiny[1, 1] > 1 - 1e-9  # a delta at the centre
    with pytest.raises(ValueError, match="odd"):
        ref.gaussian_kernels(torch.zeros(3), 4)


def _case(seed, K=5, C=3, m=9, d=5, per="pair"):
    g = _gen(seed)
    masks = torch.rand(K, C, m, m, generator=g, dtype=torch.float64)
    pairs = torch.tensor([[0, 1], [1, 0], [2, 4], [3, 3], [4, 2], [1, 3]])
    n = pairs.shape[0] if per == "pair" else K
    params = torch.randn(*((n, 2) if per == "pair" else (n,)), 3, generator=g, dtype=torch.float64)
    kernels = ref.gaussian_kernels(params, d)
    xy = torch.rand(K, 2, generator=g, dtype=torch.float64) * 80
    boxes = torch.cat([xy, xy + torch.rand(K, 2, generator=g, dtype=torch.float64) * 40 + 2], 1)
    return masks, pairs, kernels, boxes, params


def _smooth_loop(mask, kernel):
    """[C, m, m] with one [d, d] kernel, channel by channel, as F.conv2d (cross-correlation)."""
    d = kernel.shape[-1]
    return torch.stack([F.conv2d(c[None, None], kernel[None, None], padding=d // 2)[0, 0] for c in mask])


@pytest.mark.parametrize("per", ["pair", "object"])
def test_pair_mask_conv_own_frame_matches_per_pair_loop(per):
    masks, pairs, kernels, _, _ = _case(1, per=per)
    got = ref.pair_mask_conv(masks, pairs, kernels)
    for p, (s, o) in enumerate(pairs.tolist()):
        ks, ko = (kernels[p, 0], kernels[p, 1]) if per == "pair" else (kernels[s], kernels[o])
        want = _smooth_loop(masks[s], ks) * _smooth_loop(masks[o], ko)
        assert torch.allclose(got[p], want, atol=1e-13)


def _resample_with_grid_sample(smoothed, own, union, R):
    """Independent oracle of the union-frame resampling: F.grid_sample, border padding, times the
    indicator of the object's own box."""
    steps = (torch.arange(R, dtype=smoothed.dtype) + 0.5) / R
    x = union[0] + steps * (union[2] - union[0])
    y = union[1] + steps * (union[3] - union[1])
    gx = 2 * (x - own[0]) / (own[2] - own[0]) - 1  # align_corners=False: -1/+1 are the box edges
    gy = 2 * (y - own[1]) / (own[3] - own[1]) - 1
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]  # (x, y) order
    out = F.grid_sample(smoothed[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    inside = ((y >= own[1]) & (y <= own[3]))[:, None] & ((x >= own[0]) & (x <= own[2]))[None, :]
    return out * inside


def test_pair_mask_conv_union_frame_matches_grid_sample():
    masks, pairs, kernels, boxes, _ = _case(2)
    R = 11
    got = ref.pair_mask_conv(masks, pairs, kernels, boxes=boxes, out_size=R)
    assert got.shape == (pairs.shape[0], masks.shape[1], R, R)
    for p, (s, o) in enumerate(pairs.tolist()):
        union = torch.cat([torch.minimum(boxes[s, :2], boxes[o, :2]), torch.maximum(boxes[s, 2:], boxes[o, 2:])])
        ms = _resample_with_grid_sample(_smooth_loop(masks[s], kernels[p, 0]), boxes[s], union, R)
        mo = _resample_with_grid_sample(_smooth_loop(masks[o], kernels[p, 1]), boxes[o], union, R)
        assert torch.allclose(got[p], ms * mo, atol=1e-12), p
    # a self-pair's union box is its own box: the resampling is the identity when R = m
    self_pair = torch.tensor([[3, 3]])
    own = ref.pair_mask_conv(masks, self_pair, kernels[3:4])
    union = ref.pair_mask_conv(masks, self_pair, kernels[3:4], boxes=boxes, out_size=masks.shape[-1])
    assert torch.allclose(own, union, atol=1e-12)


def test_transfer_masks_matches_loop():
    g = _gen(3)
    logits = torch.randn(4, 6, 5, 5, generator=g, dtype=torch.float64)
    sim = torch.softmax(torch.randn(9, 6, generator=g, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 8, 3, 3])
    got = ref.transfer_masks(logits, sim, labels)
    for k, l in enumerate(labels.tolist()):
        want = sum(sim[l, j] * torch.sigmoid(logits[k, j]) for j in range(6))
        assert torch.allclose(got[k], want, atol=1e-14)


@pytest.mark.parametrize("union_frame", [False, True])
def test_gradcheck_through_gaussian_kernels(union_frame):
    masks, pairs, _, boxes, params = _case(4, K=4, C=2, m=6, d=3)
    pairs = pairs[pairs.max(1).values < 4]
    params = params[: pairs.shape[0]].clone().requires_grad_()
    masks = masks.clone().requires_grad_()

    def fn(masks, params):
        kernels = ref.gaussian_kernels(params, 3)
        if union_frame:
            return ref.pair_mask_conv(masks, pairs, kernels, boxes=boxes, out_size=5)
        return ref.pair_mask_conv(masks, pairs, kernels)

    assert torch.autograd.gradcheck(fn, (masks, params), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_public_functions_and_bad_inputs():
    import sgg_kernels as sk

    params = torch.zeros(2, 4, 3, requires_grad=True)
    k = sk.gaussian_kernels(params, 5)
    assert k.shape == (2, 4, 5, 5)
    k[..., 2, 3].sum().backward()
    assert params.grad is not None and torch.isfinite(params.grad).all()
    logits, sim = torch.randn(3, 4, 6, 6), torch.softmax(torch.randn(5, 4), 1)
    assert sk.transfer_masks(logits, sim, torch.tensor([0, 4, 2])).shape == (3, 6, 6)
    cases = [
        (lambda: sk.gaussian_kernels(torch.zeros(2, 2)), ValueError, "params"),
        (lambda: sk.gaussian_kernels(torch.zeros(2, 3, dtype=torch.int64)), TypeError, "params"),
        (lambda: sk.gaussian_kernels(torch.zeros(3), 4), ValueError, "odd"),
        (lambda: sk.gaussian_kernels(torch.zeros(3), 0), ValueError, "odd"),
        (lambda: sk.transfer_masks(logits, sim[:, :3], torch.tensor([0, 1, 2])), ValueError, "similarity"),
        (lambda: sk.transfer_masks(logits, sim, torch.tensor([0, 1])), ValueError, "labels"),
        (lambda: sk.transfer_masks(logits, sim, torch.tensor([0, 1, 5])), IndexError, "labels"),
        (lambda: sk.transfer_masks(logits[0], sim, torch.tensor([0, 1, 2])), ValueError, "mask_logits"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
