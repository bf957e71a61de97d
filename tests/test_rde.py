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
@pytest.mark.parametrize("attn_dim", [None, 4], ids=["full", "narrow"])
def test_rde_losses_and_gradients_reach_every_parameter(attn_dim):
    m = _rde(attn_dim=attn_dim)
    assert m.attn_dim == (16 if attn_dim is None else 4)
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


@pytest.mark.parametrize("attn_dim", [None, 4], ids=["full", "narrow"])
def test_rde_terms_match_their_functions(attn_dim):
    m = _rde(weights={"proto_sep": 0.5, "re": 2.0}, attn_dim=attn_dim)
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


@pytest.mark.parametrize("backend,attn_dim", [
    ("aot_eager", None), ("aot_eager", 4),
    pytest.param("inductor", None, marks=pytest.mark.slow), pytest.param("inductor", 4, marks=pytest.mark.slow)])
def test_rde_compile_fullgraph_matches_eager(backend, attn_dim):
    m = _rde(attn_dim=attn_dim)
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


# ---------------------------------------------------------------------------------------------
# Attention width (attn_dim): sizes at the widths users have, the paper's full width as an option
# ---------------------------------------------------------------------------------------------
PAPER_WIDTH_PARAMS_4096 = 1_259_970_863  # RDE(4096, 51, 151) before attn_dim existed: q, k, v, g all D x D


def _num_params(module):
    return sum(p.numel() for p in module.parameters())


def test_rde_default_width_fits_at_dim_4096():
    """Built on the meta device (no memory): the default stays under 100 M parameters at D = 4096, the
    full width reproduces the paper-width count, and both agree with the docstring's table."""
    with torch.device("meta"):
        default = RDE(dim=4096, num_rel_classes=51, num_obj_classes=151)
        full = RDE(dim=4096, num_rel_classes=51, num_obj_classes=151, attn_dim=None)
        named_full = RDE(dim=4096, num_rel_classes=51, num_obj_classes=151, attn_dim="full")
    assert all(p.is_meta for p in default.parameters())
    assert default.attn_dim == 128 and full.attn_dim == named_full.attn_dim == 4096
    assert _num_params(default) <= 100_000_000
    assert _num_params(full) == _num_params(named_full) == PAPER_WIDTH_PARAMS_4096
    for n in (_num_params(default), _num_params(full)):
        assert f"{n:,}" in RDE.__doc__
    block = default.fdvae.sigma_s_blocks[0]
    assert block.q.weight.shape == block.k.weight.shape == block.v.weight.shape == (128, 4096)
    assert block.g[0].weight.shape == (4096, 128)


@pytest.mark.parametrize("dim", [512, 1024, 2048])
def test_rde_parameter_counts_in_docstring(dim):
    with torch.device("meta"):
        counts = [_num_params(RDE(dim, 51, 151, attn_dim=a)) for a in ("auto", None)]
    for n in counts:
        assert f"{n:,}" in RDE.__doc__, (dim, n)


def test_attn_dim_resolution_and_bad_values():
    from sgg_kernels.models.rde import resolve_attn_dim
    assert resolve_attn_dim("auto", 4096, 51) == 128
    assert resolve_attn_dim("auto", 4096, 300) == 300  # a >= Q: the mu branch loses nothing
    assert resolve_attn_dim("auto", 64, 51) == 64  # never wider than D
    assert resolve_attn_dim(None, 4096, 51) == resolve_attn_dim("full", 4096, 51) == 4096
    assert resolve_attn_dim(32, 4096, 51) == 32
    for bad in (0, -3, 2.5, True, "wide"):
        with pytest.raises(ValueError, match="attn_dim"):
            RDE(16, 5, 7, attn_dim=bad)
    assert FDVAE(16, 5, attn_dim=4).attn_dim == 4


def test_narrow_encoder_block_matches_formula():
    """q, k, v: D -> a; scores scaled by 1 / sqrt(a); g = Linear(a, D) + ReLU back to the residual."""
    from sgg_kernels.models.rde import _EncoderBlock
    torch.manual_seed(0)
    for negate in (False, True):
        block = _EncoderBlock(6, negate=negate, attn_dim=3).double()
        x, ref = torch.randn(4, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
        attn = torch.softmax(block.q(block.norm(x)) @ block.k(ref).T / math.sqrt(3), dim=-1)
        weights = (1 - attn) / 4 if negate else attn
        torch.testing.assert_close(block(x, ref), x + block.g(weights @ block.v(ref)))
        assert block.v(ref).shape == (5, 3)


# ---------------------------------------------------------------------------------------------
# Mixed dtypes and invalid labels
# ---------------------------------------------------------------------------------------------
def test_rde_mixed_dtypes_name_the_argument():
    feats, rel, subj, obj = _batch(dtype=torch.float64)
    torch.manual_seed(0)
    m32 = RDE(16, 5, 7, num_blocks=1, classifier=torch.nn.Linear(16, 5))  # float32 parameters
    with pytest.raises(ValueError, match=r"rel_feats is float64 but the parameters of RDE are float32"):
        m32(feats, rel, subj, obj)
    with pytest.raises(ValueError, match=r"rel_feats is float16 .* float32.*autocast"):
        m32(feats.half(), rel, subj, obj)
    with pytest.raises(ValueError, match=r"rel_feats is float32 but the parameters of RDE are float64"):
        _rde()(feats.float(), rel, subj, obj)
    with pytest.raises(ValueError, match=r"f is float64 but the parameters of FDVAE are float32"):
        FDVAE(16, 5, num_blocks=1)(feats)
    mixed = _rde()
    mixed.classifier.float()
    with pytest.raises(ValueError, match="classifier's parameters are float32 but RDE's are float64"):
        mixed(feats, rel, subj, obj)


def test_rde_under_autocast_takes_lower_precision_features():
    """Under torch.autocast the matmuls cast, so bfloat16 features with float32 parameters are fine."""
    feats, rel, subj, obj = _batch(dtype=torch.float32)
    torch.manual_seed(0)
    m = RDE(16, 5, 7, num_blocks=1, classifier=torch.nn.Linear(16, 5), attn_dim=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = m(feats.bfloat16(), rel, subj, obj)
    assert torch.isfinite(losses["total"])
    losses["total"].backward()


def test_rde_labels_out_of_range_with_checks_on():
    m = _rde()
    feats, rel, subj, obj = _batch()
    idx = torch.arange(9)
    cases = [
        (dict(rel_labels=rel + 5), r"rel_labels holds \d+, outside \[0, 5\) \(num_rel_classes\)"),
        (dict(rel_labels=rel - 10), r"rel_labels holds -\d+, outside \[0, 5\)"),
        (dict(subj_labels=subj + 7), r"subj_labels holds \d+, outside \[0, 7\) \(num_obj_classes\)"),
        (dict(obj_labels=obj - 8), r"obj_labels holds -\d+, outside \[0, 7\) \(num_obj_classes\)"),
        (dict(shuffle=idx - 1), r"shuffle holds -1, outside \[0, 9\)"),
    ]
    for change, match in cases:
        args = dict(rel_labels=rel, subj_labels=subj, obj_labels=obj, shuffle=idx)
        args.update(change)
        with pytest.raises(IndexError, match=match):
            m(feats, **args)


def _invalid_batch():
    feats, rel, subj, obj = _batch(N=9, seed=8)
    bad_rel, bad_subj, bad_obj = rel.clone(), subj.clone(), obj.clone()
    bad_rel[[1, 4]] = torch.tensor([5, -1])        # R = 5
    bad_subj[[0, 7]] = torch.tensor([7, -100])     # O = 7
    bad_obj[[2]] = torch.tensor([1000])
    shuffle = FDVAE.shuffle_index(9, generator=_gen(4))
    bad_shuffle = shuffle.clone()
    bad_shuffle[[3]] = 9                           # [0, P)
    return feats, (rel, subj, obj, shuffle), (bad_rel, bad_subj, bad_obj, bad_shuffle)


def test_rde_invalid_labels_with_checks_off_contribute_zeros(monkeypatch):
    """sk.set_checks(False): no value check runs (so no host sync), no error, no out-of-bounds read,
    and each invalid entry removes its sample from the terms that use it (means still over P)."""
    from sgg_kernels import _checks
    m = _rde()
    feats, _, (rel, subj, obj, shuffle) = _invalid_batch()
    sk.set_checks(False)

    def no_value_checks(*a, **k):
        raise AssertionError("a value check (a host sync) ran with checks off")

    monkeypatch.setattr(_checks, "index_range", no_value_checks)
    x = feats.clone().requires_grad_()
    losses = m(x, rel, subj, obj, shuffle)
    for name, v in losses.items():
        assert torch.isfinite(v), name
    losses["total"].backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in m.parameters())

    # against the formulas on the valid entries only
    N = 9
    out = m.fdvae(feats)
    ok_rel, ok_subj, ok_obj = (rel >= 0) & (rel < 5), (subj >= 0) & (subj < 7), (obj >= 0) & (obj < 7)
    ok_shuffle = (shuffle >= 0) & (shuffle < N)
    D = _D(out["mu"], m.prototypes, literal=False)
    want_proto = D[ok_rel.nonzero()[:, 0], rel[ok_rel]].sum() / N
    torch.testing.assert_close(losses["proto"], want_proto)
    ls, lo = m.info_subj(out["sigma_s"]), m.info_obj(out["sigma_o"])
    want_info = (F.cross_entropy(ls[ok_subj], subj[ok_subj], reduction="sum")
                 + F.cross_entropy(lo[ok_obj], obj[ok_obj], reduction="sum")) / N
    torch.testing.assert_close(losses["info"], want_info)
    shuffled = m.fdvae.decode(out["mu"][ok_shuffle], out["sigma"][shuffle[ok_shuffle]])
    ce_recon = F.cross_entropy(m.classifier(out["recon"][ok_rel]), rel[ok_rel], reduction="sum")
    ok_both = ok_rel[ok_shuffle]
    ce_shuf = F.cross_entropy(m.classifier(shuffled[ok_both]), rel[ok_shuffle][ok_both], reduction="sum")
    torch.testing.assert_close(losses["pred_rde"], (ce_recon + ce_shuf) / (2 * N))
    torch.testing.assert_close(losses["re"], reconstruction_loss(out["recon"], feats))  # uses no label


def test_rde_invalid_labels_compiled_fullgraph_match_eager():
    """The masking is data-independent: it traces in one graph and gives eager's values."""
    m = _rde()
    feats, _, (rel, subj, obj, shuffle) = _invalid_batch()
    sk.set_checks(False)
    eager = m(feats, rel, subj, obj, shuffle)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(feats, rel, subj, obj, shuffle)
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-9, atol=1e-9)


def test_loss_functions_mask_invalid_labels():
    g = _gen(9)
    mu, protos = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, -1, 2])
    want = _D(mu, protos, False)[[0, 3], [0, 2]].sum() / 4
    torch.testing.assert_close(prototype_loss(mu, protos, labels), want)
    assert prototype_loss(mu, protos[:0], labels).item() == 0
    ls, lo = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    s, o = torch.tensor([0, 5, 4, 1]), torch.tensor([-2, 1, 2, 3])
    want = (F.cross_entropy(ls[[0, 2, 3]], s[[0, 2, 3]], reduction="sum")
            + F.cross_entropy(lo[1:], o[1:], reduction="sum")) / 4
    torch.testing.assert_close(information_loss(ls, lo, s, o), want)


def test_rde_rel_labels_beyond_num_rel_classes_are_masked_out_of_pred_rde_too():
    """Checks off, a classifier with more outputs than num_rel_classes: a label in [R, C) is invalid for
    RDE (it has no prototype) and leaves pred_rde as well as proto, not only the indices C cannot take."""
    torch.manual_seed(0)
    m = RDE(16, 5, 7, num_blocks=1, classifier=torch.nn.Linear(16, 8)).double()
    feats, rel, subj, obj = _batch()
    idx = FDVAE.shuffle_index(9, generator=_gen(2))
    bad = rel.clone()
    bad[0] = 6  # < 8 outputs, >= 5 classes
    sk.set_checks(False)
    got = m(feats, bad, subj, obj, idx)["pred_rde"]
    out = m.fdvae(feats)
    ok = torch.arange(9) != 0
    logits_recon = m.classifier(out["recon"][ok])
    logits_shuf = m.classifier(m.fdvae.decode(out["mu"], out["sigma"][idx])[ok])
    want = (F.cross_entropy(logits_recon, rel[ok], reduction="sum")
            + F.cross_entropy(logits_shuf, rel[ok], reduction="sum")) / 18
    torch.testing.assert_close(got, want)
