"""The modules on their device's kernels (issues 4 and 5 ask for their tests on a GPU): each module's
forward and the gradients of its inputs and parameters, run in float32 on the default backend of
the device (CPU: the C++ kernels; CUDA: Triton / CUDA C++), against the same module (same weights)
in float64 on the CPU reference backend.

The ``cuda`` params need a CUDA GPU and skip visibly ("needs a CUDA GPU") without one; the ``cpu``
params run the same comparison here.
"""
import copy

import pytest
import torch

import sgg_kernels as sk
from sgg_kernels.models import RDE, FDVAE, GaussianPairMasks, SILBlock, SILNetwork

from helpers import HAS_CUDA, assert_close

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
SCALE = 20.0  # float32 module chains (attention, MLPs, several fused ops) vs the float64 oracle


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _require(device):
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")


def _run(module, inputs, device, dtype, backend, call):
    """(outputs, grads of every float input and parameter) of ``call(module, *inputs)`` on ``device``
    in ``dtype`` under ``backend``; fixed cotangents, identical for both runs."""
    m = copy.deepcopy(module).to(device, dtype)
    args = [x.detach().to(device, dtype).requires_grad_() if x.is_floating_point() else x.to(device) for x in inputs]
    with sk.use_backend(backend):
        outs = call(m, *args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        cots = [torch.randn(o.shape, generator=_gen(7 + i), dtype=torch.float64).to(device, dtype)
                for i, o in enumerate(outs)]
        leaves = [a for a in args if a.is_floating_point()] + list(m.parameters())
        grads = torch.autograd.grad(outs, leaves, cots, allow_unused=True)
    return outs, grads


def _compare(device, module, inputs, call, what):
    _require(device)
    got, got_grads = _run(module, inputs, device, torch.float32, None, call)  # the device's default kernels
    want, want_grads = _run(module, inputs, "cpu", torch.float64, "reference", call)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, torch.float32, f"{what} output {i}", SCALE)
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        if w is None:
            assert g is None or not g.any(), f"{what} grad {i}: reference has none"
            continue
        assert g is not None, f"{what} grad {i} missing on CUDA"
        assert_close(g, w, torch.float32, f"{what} grad {i}", SCALE)


def _boxes(K, B, size, seed):
    g = _gen(seed)
    xy = torch.rand(K, 2, generator=g, dtype=torch.float64) * size * 0.6
    wh = torch.rand(K, 2, generator=g, dtype=torch.float64) * size * 0.4 + 4
    return torch.cat([xy, xy + wh], 1), torch.arange(K) % B


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighting", ["inverse_distance", "attention"])
def test_sil_block(device, weighting):
    torch.manual_seed(0)
    block = SILBlock(32, num_centers=9, heads=2, mlp_hidden=64, encoder_head_dim=8, similarity="sigmoid",
                     intra_weighting=weighting).double().eval()
    fmap = torch.randn(2, 32, 12, 16, generator=_gen(1), dtype=torch.float64)
    boxes, box_batch = _boxes(5, 2, 48, seed=2)
    _compare(device, block, (fmap, boxes, box_batch), lambda m, f, b, bb: m(f, b.detach(), bb, 0.25), f"SILBlock[{weighting}]")


@pytest.mark.parametrize("device", DEVICES)
def test_sil_network(device):
    torch.manual_seed(0)
    net = SILNetwork(32, depth=2, num_centers=9, heads=2, mlp_hidden=64, encoder_head_dim=8).double().eval()
    fmap = torch.randn(2, 32, 10, 10, generator=_gen(3), dtype=torch.float64)
    boxes, box_batch = _boxes(4, 2, 40, seed=4)
    _compare(device, net, (fmap, boxes, box_batch), lambda m, f, b, bb: m(f, b.detach(), bb, 0.25), "SILNetwork")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per", ["pair", "object"])
@pytest.mark.parametrize("frame", ["own", "union"])
def test_gaussian_pair_masks(device, per, frame):
    torch.manual_seed(0)
    module = GaussianPairMasks(3, kernel_size=7, per=per).double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=_gen(5), dtype=torch.float64) * 0.3)
    g = _gen(6)
    K = 6
    masks = torch.rand(K, 3, 14, 14, generator=g, dtype=torch.float64)
    scores = torch.softmax(torch.randn(K, 4, generator=g, dtype=torch.float64), 1)
    pairs = torch.randint(0, K, (11, 2), generator=g)
    boxes, _ = _boxes(K, 1, 60, seed=7)

    def call(m, masks, scores, boxes):
        if frame == "union":
            return m(masks, scores, pairs.to(masks.device), boxes.detach(), 14)
        return m(masks, scores, pairs.to(masks.device))

    _compare(device, module, (masks, scores, boxes), call, f"GaussianPairMasks[{per}, {frame}]")


@pytest.mark.parametrize("device", DEVICES)
def test_rde(device):
    torch.manual_seed(0)
    module = RDE(16, 5, 7, num_blocks=2, classifier=torch.nn.Linear(16, 5)).double()
    g = _gen(8)
    feats = torch.randn(9, 16, generator=g, dtype=torch.float64)
    rel, subj, obj = (torch.randint(0, n, (9,), generator=g) for n in (5, 7, 7))
    shuffle = FDVAE.shuffle_index(9, generator=_gen(9))

    def call(m, f):
        dev = f.device
        losses = m(f, rel.to(dev), subj.to(dev), obj.to(dev), shuffle.to(dev))
        return tuple(losses[k] for k in sorted(losses))

    _compare(device, module, (feats,), call, "RDE")
