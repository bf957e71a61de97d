"""RDE modules (Sec. 3, Eq. 1-6): FDVAE shapes and readings, each loss against a formula written
here, gradients to every parameter, empty batches, torch.compile(fullgraph=True), bad inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

import sgg_kernels as sk
from sgg_kernels.models.rde import (
    FDVAE,
    RDE,
    information_loss,
    prototype_loss,
    prototype_separation_loss,
    reconstruction_loss,
)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _batch(N=9, D=16, R=5, O=7, seed=0, dtype=torch.float64):
    g = _gen(seed)
    feats = torch.randn(N, D, generator=g, dtype=dtype)
    return (feats, torch.randint(0, R, (N,), generator=g), torch.randint(0, O, (N,), generator=g),
            torch.randint(0, O, (N,), generator=g))


def _rde(D=16, R=5, O=7, classifier=True, **kw):
    torch.manual_seed(0)
    clf = torch.nn.Linear(D, R) if classifier else None
    return RDE(D, R, O, num_blocks=2, classifier=clf, **kw).double()


# ---------------------------------------------------------------------------------------------
# Losses against formulas written here
# ---------------------------------------------------------------------------------------------
def _D(a, b, literal):
    cos = F.normalize(a, dim=1, eps=1e-12) @ F.normalize(b, dim=1, eps=1e-12).T
    dist = torch.sqrt(((a[:, None] - b[None]) ** 2).sum(-1).clamp_min(1e-12))
    return cos + dist if literal else 1 - cos + dist


@pytest.mark.parametrize("literal", [False, True])
def test_prototype_losses_match_formula(literal):
    g = _gen(1)
    mu, protos = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(4, 8, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 3, 1, 2, 0])
    want = _D(mu, protos, literal)[torch.arange(6), labels].mean()
    torch.testing.assert_close(prototype_loss(mu, protos, labels, literal), want, rtol=1e-12, atol=1e-12)
    Dpp = _D(protos, protos, literal)
    off = ~torch.eye(4, dtype=torch.bool)
    want_sep = F.relu(2.5 - Dpp[off]).mean()
    torch.testing.assert_close(prototype_separation_loss(protos, 2.5, literal), want_sep, rtol=1e-12, atol=1e-12)


def test_prototype_loss_default_reading_vanishes_at_the_prototype():
    """(1 - cos) + ||mu - P|| is 0 when mu sits on its prototype; the printed cos + ||.|| is 1 there."""
    protos = torch.randn(3, 5, generator=_gen(2), dtype=torch.float64)
    labels = torch.tensor([2, 0, 1, 1])
    mu = protos[labels]
    assert prototype_loss(mu, protos, labels).item() == pytest.approx(1e-6, abs=1e-9)  # sqrt(eps) of the distance
    assert prototype_loss(mu, protos, labels, literal=True).item() == pytest.approx(1 + 1e-6, abs=1e-9)


def test_separation_hinge_is_zero_for_far_prototypes():
    protos = torch.eye(3, dtype=torch.float64) * 10  # D = 1 + 10 sqrt(2) between any two
    assert prototype_separation_loss(protos, margin=1.0).item() == 0
    assert prototype_separation_loss(protos[:1], margin=1.0).item() == 0  # one prototype: no pair


def test_information_and_reconstruction_losses_match_formula():
    g = _gen(3)
    ls, lo = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    s, o = torch.randint(0, 7, (5,), generator=g), torch.randint(0, 7, (5,), generator=g)
    torch.testing.assert_close(information_loss(ls, lo, s, o), F.cross_entropy(ls, s) + F.cross_entropy(lo, o))
    a, b = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)
    want = F.mse_loss(a, b) + (1 - F.cosine_similarity(a, b, dim=1)).mean()
    torch.testing.assert_close(reconstruction_loss(a, b), want)
    assert reconstruction_loss(a, a).item() == pytest.approx(0, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# FDVAE
# ---------------------------------------------------------------------------------------------
def test_fdvae_shapes_and_decoder():
    m = FDVAE(16, 5, num_blocks=3).double()
    f = torch.randn(7, 16, dtype=torch.float64)
    out = m(f)
    for key in ("mu", "sigma_s", "sigma_o", "sigma", "recon"):
        assert out[key].shape == (7, 16)
    torch.testing.assert_close(out["sigma"], out["sigma_s"] + out["sigma_o"])
    torch.testing.assert_close(out["recon"], m.decoder(out["mu"] + m.lam * out["sigma"]))  # f' = W(mu + lambda sigma)
    assert len(m.mu_blocks) == len(m.sigma_s_blocks) == len(m.sigma_o_blocks) == 3


def test_mu_is_per_sample_and_sigma_reads_the_batch():
    """The mu branch attends over the prototypes only: mu_k does not depend on the other samples.
    The sigma branches attend over the batch's mu: changing another sample changes sigma_k."""
    torch.manual_seed(0)
    m = FDVAE(8, 4, num_blocks=2).double()
    f = torch.randn(5, 8, dtype=torch.float64)
    g = f.clone()
    g[1:] = torch.randn(4, 8, dtype=torch.float64)
    a, b = m(f), m(g)
    torch.testing.assert_close(a["mu"][0], b["mu"][0], rtol=0, atol=1e-14)
    assert not torch.allclose(a["sigma"][0], b["sigma"][0])


@pytest.mark.parametrize("literal", [False, True])
def test_negated_attention_map(literal):
    """Eq. 3's 1 - Attn: rows normalised to 1 by default (N - 1 with literal); one reference: no update."""
    from sgg_kernels.models.rde import _EncoderBlock
    torch.manual_seed(0)
    block = _EncoderBlock(6, negate=True, literal=literal).double()
    x, ref = torch.randn(4, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    attn = torch.softmax(block.q(block.norm(x)) @ block.k(ref).T / math.sqrt(6), dim=-1)
    weights = (1 - attn) if literal else (1 - attn) / 4
    torch.testing.assert_close(block(x, ref), x + block.g(weights @ block.v(ref)))
    if not literal:  # a single reference: 1 - softmax = 0, nothing is added beyond g(0)
        torch.testing.assert_close(block(x, ref[:1]), x + block.g(torch.zeros(4, 6, dtype=torch.float64)))


def test_shuffle_index_takes_another_sample():
    for n in (2, 3, 10):
        for seed in range(5):
            idx = FDVAE.shuffle_index(n, generator=_gen(seed))
            assert sorted(idx.tolist()) == list(range(n))  # a permutation
            assert (idx != torch.arange(n)).all()  # every sample takes another's sigma
    assert FDVAE.shuffle_index(1).tolist() == [0] and FDVAE.shuffle_index(0).shape == (0,)


# ---------------------------------------------------------------------------------------------
# RDE
# ---------------------------------------------------------------------------------------------
def test_rde_losses_and_gradients_reach_every_parameter():
    m = _rde()
    feats, rel, subj, obj = _batch()
    feats.requires_grad_()
    losses = m(feats, rel, subj, obj, FDVAE.shuffle_index(feats.shape[0], generator=_gen(0)))
    assert set(losses) == {"proto", "proto_sep", "info", "re", "pred_rde", "total"}
    for name, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), name
    torch.testing.assert_close(losses["total"], sum(v for k, v in losses.items() if k != "total"))
    losses["total"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert feats.grad is not None and feats.grad.abs().sum() > 0


def test_rde_terms_match_their_functions():
    m = _rde(weights={"proto_sep": 0.5, "re": 2.0})
    feats, rel, subj, obj = _batch(seed=4)
    idx = FDVAE.shuffle_index(feats.shape[0], generator=_gen(1))
    losses = m(feats, rel, subj, obj, idx)
    out = m.fdvae(feats)
    torch.testing.assert_close(losses["proto"], prototype_loss(out["mu"], m.prototypes, rel))
    torch.testing.assert_close(losses["proto_sep"], prototype_separation_loss(m.prototypes, 1.0))
    torch.testing.assert_close(losses["info"], information_loss(m.info_subj(out["sigma_s"]), m.info_obj(out["sigma_o"]),
                                                                subj, obj))
    torch.testing.assert_close(losses["re"], reconstruction_loss(out["recon"], feats))
    shuffled = m.fdvae.decode(out["mu"], out["sigma"][idx])
    want_pred = F.cross_entropy(m.classifier(torch.cat([out["recon"], shuffled])), torch.cat([rel, rel]))
    torch.testing.assert_close(losses["pred_rde"], want_pred)
    want_total = losses["proto"] + 0.5 * losses["proto_sep"] + losses["info"] + 2.0 * losses["re"] + losses["pred_rde"]
    torch.testing.assert_close(losses["total"], want_total)


def test_rde_detached_target_and_no_classifier():
    m = _rde(classifier=False)
    feats, rel, subj, obj = _batch(seed=5)
    feats.requires_grad_()
    losses = m(feats, rel, subj, obj)
    assert "pred_rde" not in losses
    # the target is detached: d re / d f is the gradient through f' only
    (g_detached,) = torch.autograd.grad(losses["re"], feats)
    m2 = _rde(classifier=False, detach_target=False)
    (g_attached,) = torch.autograd.grad(m2(feats, rel, subj, obj)["re"], feats)
    assert not torch.allclose(g_detached, g_attached)


def test_rde_draws_a_shuffle_when_none_is_given():
    """Without an index the shuffle is drawn: seeded, it is the one shuffle_index draws."""
    m = _rde()
    feats, rel, subj, obj = _batch(seed=7)
    torch.manual_seed(11)
    got = m(feats, rel, subj, obj)["pred_rde"]
    torch.manual_seed(11)
    want = m(feats, rel, subj, obj, FDVAE.shuffle_index(feats.shape[0]))["pred_rde"]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_rde_empty_batch():
    m = _rde()
    feats, rel, subj, obj = _batch(N=0)
    feats.requires_grad_()
    losses = m(feats, rel, subj, obj)
    for name in ("proto", "info", "re", "pred_rde"):
        assert losses[name].item() == 0, name
    assert torch.isfinite(losses["total"])
    losses["total"].backward()  # the separation term still trains the prototypes
    assert m.prototypes.grad is not None


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_rde_compile_fullgraph_matches_eager(backend):
    m = _rde()
    feats, rel, subj, obj = _batch(seed=6)
    idx = FDVAE.shuffle_index(feats.shape[0], generator=_gen(3))

    def run(module):
        for p in m.parameters():
            p.grad = None
        x = feats.clone().requires_grad_()
        losses = module(x, rel, subj, obj, idx)
        losses["total"].backward()
        return [losses[k].detach() for k in sorted(losses)] + [x.grad] + [p.grad.clone() for p in m.parameters()]

    eager = run(m)
    compiled = run(torch.compile(m, fullgraph=True, backend=backend))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_rde_bad_inputs():
    m = _rde()
    feats, rel, subj, obj = _batch()
    cases = [
        (lambda: m(feats[:, :5], rel, subj, obj), ValueError, "rel_feats"),
        (lambda: m(feats[0], rel, subj, obj), ValueError, "rel_feats"),
        (lambda: m(feats, rel[:3], subj, obj), ValueError, "rel_labels"),
        (lambda: m(feats, rel.float(), subj, obj), TypeError, "rel_labels"),
        (lambda: m(feats, rel, subj, obj + 7), IndexError, "obj_labels"),
        (lambda: m(feats, rel + 5, subj, obj), IndexError, "rel_labels"),
        (lambda: m(feats, rel, subj, obj, torch.arange(9) + 1), IndexError, "shuffle"),
        (lambda: m(feats, rel, subj, obj, torch.arange(3)), ValueError, "shuffle"),
        (lambda: RDE(0, 3, 3), ValueError, "dim"),
        (lambda: RDE(8, 3, 3, weights={"bogus": 1.0}), ValueError, "weights"),
        (lambda: RDE(8, 3, 3, margin=-1.0), ValueError, "margin"),
        (lambda: FDVAE(8, 0), ValueError, "num_prototypes"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_exported():
    assert sk.models.RDE is RDE and sk.models.FDVAE is FDVAE
