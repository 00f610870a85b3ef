"""Tests for muon_optim.py: orthogonalization vs SVD, equivalence with torch.optim.Muon, the
KellerJordan-compatible API and parameter routing, state_dict round trips (exact, in any parameter
dtype), copies and LR schedulers, and 2-process distributed sharding (gloo)."""
import copy
import io
import math
import os
import pickle
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings, strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import muon_optim as M  # noqa: E402


# -- orthogonalization ----------------------------------------------------------

def random_with_spectrum(shape, log10_kappa, seed):
    """G = U diag(s) V^T (float64) with random orthonormal U, V and singular values log-uniform
    in [10^-log10_kappa, 1]; returns G and its factors."""
    gen = torch.Generator().manual_seed(seed)
    *batch, m, n = shape
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*batch, m, k, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, k, generator=gen, dtype=torch.float64))
    s = 10 ** (-log10_kappa * torch.rand(*batch, k, generator=gen, dtype=torch.float64))
    return (U * s.unsqueeze(-2)) @ V.mT, U, s, V


def reference_polynomial(s, coeffs, norm_scale, eps):
    """What the iteration must do to the singular values: normalise by the Frobenius norm, then
    apply each odd quintic to every singular value."""
    x = s / (s.norm(dim=-1, keepdim=True) * norm_scale + eps)
    for a, b, c in coeffs:
        x = a * x + b * x**3 + c * x**5
    return x


shapes = st.tuples(st.sampled_from([(), (3,)]), st.integers(2, 64), st.integers(2, 64)).map(
    lambda t: (*t[0], t[1], t[2]))


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
@pytest.mark.parametrize("method", ["newton_schulz", "polar_express"])
def test_orthogonalization_matches_svd(method, shape, seed):
    G, U, s, V = random_with_spectrum(shape, log10_kappa=2.0, seed=seed)
    # 1. the math, in float64: O = U p(s) V^T, with p the composed polynomials applied to s
    coeffs = [M.NS5_COEFFS] * 5 if method == "newton_schulz" else M.POLAR_EXPRESS_COEFFS
    scale, eps = (1.0, 1e-7) if method == "newton_schulz" else (1.02, 1e-6)
    O64 = M.orthogonalize(G, method, steps=5, dtype=torch.float64)
    torch.testing.assert_close(U.mT @ O64 @ V, torch.diag_embed(reference_polynomial(s, coeffs, scale, eps)),
                               atol=1e-9, rtol=0)
    # 2. the default fp32 compute stays close to it (the steep polynomials amplify round-off)
    D = M.orthogonalize(G.float(), method, steps=5).double()
    assert D.shape == G.shape
    torch.testing.assert_close(D, O64, atol=5e-3, rtol=0)
    # 3. singular values inside the iteration's known band (condition number <= 100)
    sv = torch.linalg.svdvals(D)
    lo, hi = (0.67, 1.21) if method == "newton_schulz" else (0.85, 1.15)
    assert sv.min() >= lo and sv.max() <= hi, (sv.min().item(), sv.max().item())
    # 4. close to the exact polar factor U V^T
    polar = U @ V.mT
    rms_err = (D - polar).square().mean(dim=(-2, -1)).sqrt() / polar.square().mean(dim=(-2, -1)).sqrt()
    assert rms_err.max() < (0.33 if method == "newton_schulz" else 0.15)


@pytest.mark.parametrize("method", ["newton_schulz", "polar_express", "gram_newton_schulz"])
@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e30])
def test_orthogonalization_extreme_inputs_are_finite(method, scale):
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(24, 40, generator=gen)
    rank1 = torch.randn(40, 1, generator=gen) @ torch.randn(1, 24, generator=gen)
    for G in (full, rank1):
        D = M.orthogonalize(G * scale, method, steps=5)
        assert torch.isfinite(D).all()
        if scale == 0.0:
            assert (D == 0).all()
        elif scale == 1e-30:  # below eps: the update is damped to ~0, as in KellerJordan/torch (norm + eps)
            assert D.abs().max() < 1e-12
        else:  # huge inputs are not lost to overflow in the norm: same output as unscaled
            torch.testing.assert_close(D, M.orthogonalize(G, method, steps=5), atol=1e-4, rtol=1e-3)
    sv = torch.linalg.svdvals(M.orthogonalize(rank1, method, steps=5).double())
    assert sv[0] > 0.5 and sv[1:].max() < 1e-4  # a rank-1 input stays rank 1


def minimax_odd_quintic(lo, hi):
    """Odd p(x) = a x + b x^3 + c x^5 minimising max |1 - p(x)| on [lo, hi], by Remez exchange:
    the optimum equioscillates at lo, q, r, hi, where q, r are p's interior extrema."""
    if lo / hi > 1 - 5e-6:  # interval too narrow for the exchange: the limit is the Taylor-like 15/8 rule
        return 15 / 8 / hi, -10 / 8 / hi**3, 3 / 8 / hi**5
    q, r = (3 * lo + hi) / 4, (lo + 3 * hi) / 4
    err_prev = None
    for _ in range(100):
        M_ = torch.tensor([[x, x**3, x**5, s] for x, s in ((lo, 1.0), (q, -1.0), (r, 1.0), (hi, -1.0))],
                          dtype=torch.float64)
        a, b, c, err = torch.linalg.solve(M_, torch.ones(4, dtype=torch.float64)).tolist()
        disc = math.sqrt(9 * b * b - 20 * a * c)  # roots of p'(x) = a + 3b x^2 + 5c x^4
        q, r = math.sqrt((-3 * b - disc) / (10 * c)), math.sqrt((-3 * b + disc) / (10 * c))
        if err_prev is not None and abs(err - err_prev) < 1e-15:
            break
        err_prev = err
    return a, b, c


def polar_express_coefficients(steps, lower=1e-3, cushion=0.02, safety=1.02):
    """Regenerate Polar Express coefficients (Amsel et al. 2025, Appendix G).

    Start with singular values in [lower, upper=1]. Each step takes the minimax odd quintic on
    [max(lower, cushion*upper), upper] (the cushion stops the first polynomials from being absurdly
    steep), rescales it so that p(lower) and p(upper) are centred on 1, divides by the safety factor
    (a/s, b/s^3, c/s^5, all but the last step) and maps the interval: lower <- p(lower),
    upper <- 2 - lower. polar_express_coefficients(5) reproduces muon_optim.POLAR_EXPRESS_COEFFS."""
    upper, out = 1.0, []
    for i in range(steps):
        a, b, c = minimax_odd_quintic(max(lower, cushion * upper), upper)
        p_lo, p_up = (a * x + b * x**3 + c * x**5 for x in (lower, upper))
        k = 2 / (p_lo + p_up)
        a, b, c = a * k, b * k, c * k
        if i < steps - 1:
            a, b, c = a / safety, b / safety**3, c / safety**5
        lower = a * lower + b * lower**3 + c * lower**5
        upper = 2 - lower
        out.append((a, b, c))
    return out


def test_polar_express_coefficients_reproduce_published_list():
    generated = polar_express_coefficients(5)
    for got, want in zip(generated, M.POLAR_EXPRESS_COEFFS):
        for g, w in zip(got, want):
            assert abs(g - w) < 1e-6
    # and they are not a copy: other settings give other numbers
    assert abs(polar_express_coefficients(5, lower=1e-2)[0][0] - M.POLAR_EXPRESS_COEFFS[0][0]) > 1e-2


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_default_dtype_follows_the_cpu(monkeypatch, fast_bf16):
    """Both branches of the capability probe, whatever CPU runs the test: fp32 without fast bf16;
    with it, bf16 for matrices whose short side is >= CPU_BF16_MIN_SIZE, fp32 below (where fp32
    is still faster). CUDA is always bf16; NS_DTYPE overrides everything."""
    monkeypatch.setattr(M, "cpu_fast_bf16", lambda: (fast_bf16, "replaced probe"))
    big, small = (M.CPU_BF16_MIN_SIZE, 2 * M.CPU_BF16_MIN_SIZE), (8, 8)
    assert M.default_ns_dtype("cpu", big) == (torch.bfloat16 if fast_bf16 else torch.float32)
    assert M.default_ns_dtype("cpu", small) == torch.float32
    assert M.default_ns_dtype("cuda", small) == torch.bfloat16
    assert M.zeropower_via_newtonschulz5(torch.randn(*big)).dtype == (torch.bfloat16 if fast_bf16 else torch.float32)
    assert M.zeropower_via_newtonschulz5(torch.randn(*small)).dtype == torch.float32
    monkeypatch.setattr(M, "NS_DTYPE", torch.float32)
    assert M.default_ns_dtype("cpu", big) == M.default_ns_dtype("cuda") == torch.float32


def test_cpu_probe_is_cached_and_overridable(monkeypatch):
    fast, why = M.cpu_fast_bf16()
    assert isinstance(fast, bool) and why
    assert M.cpu_fast_bf16() is M.cpu_fast_bf16()  # decided once per process
    for env, want in (("1", True), ("0", False)):
        monkeypatch.setenv("MUON_CPU_BF16", env)
        M.cpu_fast_bf16.cache_clear()
        assert M.cpu_fast_bf16() == (want, f"MUON_CPU_BF16={env}")
    monkeypatch.delenv("MUON_CPU_BF16")
    M.cpu_fast_bf16.cache_clear()
    assert M.cpu_fast_bf16() == (fast, why)


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown ns_method 'newton'.*polar_express"):
        M.orthogonalize(torch.randn(4, 4), "newton")


# -- the optimizer vs torch.optim.Muon ------------------------------------------

def make_params(seed=0, shapes=((32, 16), (16, 48), (24, 24))):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen) * 0.1) for s in shapes]


def run_steps(opt, params, steps, seed=1, start=0):
    """Deterministic pseudo-gradients of a quadratic-ish loss, so both optimizers see the same
    gradient function of the current parameters."""
    for t in range(start, start + steps):
        gen = torch.Generator().manual_seed(seed * 1000 + t)
        for p in params:
            p.grad = p.detach() * 0.5 + torch.randn(p.shape, generator=gen)
        opt.step()
        opt.zero_grad(set_to_none=True)


def random_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_optim_muon(nesterov):
    ours, ref = make_params(), make_params()
    start = [p.detach().clone() for p in ours]
    kw = dict(lr=0.02, momentum=0.95, nesterov=nesterov, weight_decay=0.1)
    run_steps(M.Muon(ours, ns_dtype=torch.bfloat16, **kw), ours, 10)
    run_steps(torch.optim.Muon(ref, adjust_lr_fn="original", **kw), ref, 10)
    fp32 = make_params()
    run_steps(M.Muon(fp32, **kw), fp32, 10)
    for p, r, q, s in zip(ours, ref, fp32, start):
        moved = (r - s).norm()
        assert moved > 0.05  # the test is not vacuous
        assert (p - r).norm() / moved < 0.02  # same math, same bf16 compute: only rounding differs
        assert (q - r).norm() / moved < 0.05  # our fp32 default: up to bf16 noise in torch's NS


def test_match_adamw_scale_matches_torch():
    ours, ref = make_params(), make_params()
    run_steps(M.Muon(ours, lr=0.01, scale="match_adamw", ns_dtype=torch.bfloat16), ours, 5)
    run_steps(torch.optim.Muon(ref, lr=0.01, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"), ref, 5)
    for p, r in zip(ours, ref):
        torch.testing.assert_close(p, r, atol=2e-3, rtol=0)


def test_shape_scales():
    assert M.shape_scale((768, 3072), "original") == 1.0
    assert M.shape_scale((3072, 768), "original") == 2.0
    assert M.shape_scale((768, 3072), "match_adamw") == pytest.approx(0.2 * 3072**0.5)
    assert M.shape_scale((3072, 768), "spectral") == 2.0
    assert M.shape_scale((768, 3072), "spectral") == 0.5


def test_conv_and_batched_shapes():
    conv = torch.nn.Parameter(torch.randn(8, 3, 3, 3))
    batched = torch.nn.Parameter(torch.randn(4, 16, 32))
    opt = M.Muon([conv, batched], lr=0.1, momentum=0.0, nesterov=False)
    conv.grad, batched.grad = torch.randn_like(conv), torch.randn_like(batched)
    g_conv, g_b = conv.grad.clone(), batched.grad.clone()
    before_conv, before_b = conv.detach().clone(), batched.detach().clone()
    opt.step()
    expected_conv = M.zeropower_via_newtonschulz5(g_conv.reshape(8, 27)).reshape(8, 3, 3, 3)
    torch.testing.assert_close(before_conv - conv.detach(), 0.1 * expected_conv)
    expected_b = torch.stack([M.zeropower_via_newtonschulz5(g) for g in g_b])  # independent matrices
    torch.testing.assert_close(before_b - batched.detach(), 0.1 * expected_b, atol=1e-6, rtol=1e-5)


def test_same_shape_batching_equals_muon_update():
    """The optimizer stacks same-shape matrices into one call; each must get exactly the
    single-matrix update (muon_update, the pure function)."""
    params = make_params(shapes=((24, 40), (24, 40), (24, 40), (40, 24)))
    refs = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    opt = M.Muon(params, lr=0.05)
    for t in range(3):
        gen = torch.Generator().manual_seed(t)
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for r, g, b in zip(refs, grads, bufs):
            r -= 0.05 * M.shape_scale(r.shape) * M.muon_update(g, b)
    for p, r in zip(params, refs):
        torch.testing.assert_close(p.detach(), r, atol=1e-6, rtol=1e-5)


def test_same_shape_params_on_different_devices():
    """Buckets are keyed by device (and dtype) too: a CPU and a meta parameter of one shape are not
    stacked together; the CPU one gets exactly the update it gets alone."""
    cpu = torch.nn.Parameter(torch.randn(12, 6))
    meta = torch.nn.Parameter(torch.randn(12, 6, device="meta"))
    alone = torch.nn.Parameter(cpu.detach().clone())
    half = torch.nn.Parameter(cpu.detach().clone().to(torch.float64))
    opt = M.Muon([cpu, meta, half], ns_dtype=torch.float32)
    ref = M.Muon([alone], ns_dtype=torch.float32)
    g = torch.randn(12, 6)
    cpu.grad, meta.grad, alone.grad, half.grad = g.clone(), g.to("meta"), g.clone(), g.double()
    opt.step()
    ref.step()
    assert torch.equal(cpu, alone)
    assert torch.allclose(half.float(), alone, atol=1e-6)


# -- options -----------------------------------------------------------------------

def test_cautious_weight_decay_only_where_update_agrees():
    p = torch.nn.Parameter(torch.tensor([[1.0, -1.0], [1.0, -1.0]]))
    update = torch.tensor([[0.5, 0.5], [-0.5, -0.5]])
    M.apply_update(p.data, update, lr=0.1, weight_decay=1.0, cautious_wd=True)
    # entry (0,0): update*p > 0 -> decayed; (0,1): < 0 -> not decayed
    expected = torch.tensor([[1.0 * 0.9 - 0.05, -1.0 - 0.05], [1.0 + 0.05, -1.0 * 0.9 + 0.05]])
    torch.testing.assert_close(p.data, expected)


def test_normuon_equalizes_rows_and_keeps_norm():
    gen = torch.Generator().manual_seed(0)
    D = torch.randn(64, 16, generator=gen) * torch.linspace(0.1, 3, 64).unsqueeze(1)  # uneven row norms
    v = torch.zeros(64, 1)
    N = M.normuon_normalize(D, v, beta2=0.0)  # beta2=0: v is exactly this step's mean square
    torch.testing.assert_close(N.norm(), D.norm())
    row_rms = N.square().mean(dim=1).sqrt()
    assert row_rms.max() / row_rms.min() < 1.001
    wide = torch.zeros(16, 64)
    assert torch.equal(M.normuon_normalize(wide, torch.zeros(1, 64), 0.95), wide)  # zero update stays zero


def test_normuon_step_is_finite_with_zero_grads():
    p = torch.nn.Parameter(torch.randn(8, 12))
    opt = M.Muon([p], normuon=0.95)
    p.grad = torch.zeros_like(p)
    before = p.detach().clone()
    opt.step()
    assert torch.equal(p.detach(), before)
    assert opt.state[p]["second_moment"].shape == (1, 12)


def test_track_stats():
    params = make_params()
    opt = M.Muon(params, track_stats=True, ns_method="polar_express")
    run_steps(opt, params, 1)
    stats = opt.stats()
    assert len(stats) == 3
    for s in stats:
        assert 0.7 < s["update_rms"] * max(s["shape"]) ** 0.5 < 1.2  # ||O||_F^2 ~ min(m, n)
        assert 0 < s["ortho_error"] < 0.5


def test_stats_cover_only_the_last_step():
    a, b = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8, 4))
    opt = M.Muon([a, b], track_stats=True)
    random_grads([a, b], 0)
    opt.step()
    assert len(opt.stats()) == 2
    a.grad, b.grad = torch.randn(8, 8), None
    opt.step()
    assert [s["shape"] for s in opt.stats()] == [(8, 8)]


# -- KellerJordan-compatible API and errors ------------------------------------

class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 50, bias=False)

    def forward(self, idx):
        return self.head(self.norm(self.fc2(torch.relu(self.fc1(self.embed(idx))))))


def train_a_bit(model, opt, steps=3):
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, 50, (8, 4), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_keller_jordan_seed_snippet_runs_unchanged():
    from muon_optim import SingleDeviceMuonWithAuxAdam
    model = TinyNet()
    hidden = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    optimizer = SingleDeviceMuonWithAuxAdam([dict(params=hidden, use_muon=True, lr=0.02, weight_decay=1e-2),
                                             dict(params=other, use_muon=False, lr=0.002, betas=(0.9, 0.95),
                                                  weight_decay=1e-2)])
    before = [p.detach().clone() for p in model.parameters()]
    losses = train_a_bit(model, optimizer, 10)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert losses[-1] < losses[0]


def test_other_wrappers_construct():
    model = TinyNet()
    M.SingleDeviceMuon([model.fc1.weight], lr=0.02, weight_decay=0, momentum=0.95)
    M.MuonWithAuxAdam([dict(params=[model.fc1.weight], use_muon=True), dict(params=[model.fc1.bias], use_muon=False)])
    with pytest.raises(ValueError, match="use_muon"):
        M.MuonWithAuxAdam([dict(params=[model.fc1.weight])])


def test_wrong_key_lists_allowed_keys():
    model = TinyNet()
    with pytest.raises(ValueError, match=r"\['betas'\].*Muon.*allowed keys.*momentum"):
        M.Muon([dict(params=[model.fc1.weight], use_muon=True, betas=(0.9, 0.95))])
    with pytest.raises(ValueError, match=r"\['momentum'\].*AdamW.*allowed keys.*betas"):
        M.Muon([dict(params=[model.fc1.bias], use_muon=False, momentum=0.9)])
    with pytest.raises(TypeError, match="unknown option"):
        M.Muon([model.fc1.weight], nesterove=True)


def test_1d_param_in_muon_group_names_shape_and_fix():
    with pytest.raises(ValueError, match=r"shape \(32,\).*use_muon=False"):
        M.Muon([torch.nn.Parameter(torch.zeros(32))])
    with pytest.raises(ValueError, match=r"shape \(\)"):
        M.Muon([torch.nn.Parameter(torch.tensor(1.0))])


def test_muon_param_groups_routes_embedding_and_head_to_adam():
    model = TinyNet()
    groups = {g["name"]: g for g in M.muon_param_groups(model, lr=0.02, adam_lr=1e-3)}
    def ids(g):
        return {id(p) for p in g["params"]}
    assert ids(groups["muon"]) == {id(model.fc1.weight), id(model.fc2.weight)}
    assert ids(groups["embed"]) == {id(model.embed.weight)}
    assert ids(groups["head"]) == {id(model.head.weight)}
    assert ids(groups["scalar"]) == {id(model.fc1.bias), id(model.fc2.bias), id(model.norm.weight), id(model.norm.bias)}
    assert not groups["head"]["use_muon"] and groups["muon"]["use_muon"]
    all_ids = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())  # each exactly once
    train_a_bit(model, M.Muon(list(groups.values())))


def test_tied_head_goes_to_adam_once():
    model = TinyNet()
    model.head.weight = model.embed.weight  # tied (50, 16)
    groups = M.muon_param_groups(model)
    counted = [id(p) for g in groups for p in g["params"]]
    assert counted.count(id(model.embed.weight)) == 1
    assert id(model.embed.weight) not in {id(p) for g in groups if g["use_muon"] for p in g["params"]}


class NanoGPTish(torch.nn.Module):
    """nanoGPT's naming: token + learned position embedding, c_fc 4x wider than the model."""

    def __init__(self, vocab=65, d=256, block_size=1024, head_name="lm_head"):
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, d)
        self.wpe = torch.nn.Embedding(block_size, d)
        self.c_fc = torch.nn.Linear(d, 4 * d)
        self.c_proj = torch.nn.Linear(4 * d, d)
        self.add_module(head_name, torch.nn.Linear(d, vocab, bias=False))


def group_of(groups, param):
    return [g["name"] for g in groups if any(p is param for p in g["params"])]


def test_position_embedding_size_does_not_make_a_head():
    model = NanoGPTish(vocab=65, d=256, block_size=1024)  # c_fc: 256 -> 1024 == wpe's 1024 rows
    groups = M.muon_param_groups(model)
    assert group_of(groups, model.c_fc.weight) == ["muon"]
    assert group_of(groups, model.c_proj.weight) == ["muon"]
    assert group_of(groups, model.lm_head.weight) == ["head"]
    assert group_of(groups, model.wpe.weight) == ["embed"]


def test_vocabulary_wide_hidden_layer_stays_in_muon():
    model = NanoGPTish(vocab=1024, d=256, head_name="proj_out")  # unnamed head, c_fc as wide as the vocabulary
    groups = M.muon_param_groups(model)
    assert group_of(groups, model.c_fc.weight) == ["muon"]
    assert group_of(groups, model.proj_out.weight) == ["head"]  # the last vocabulary-sized Linear


# -- state_dict --------------------------------------------------------------------

def build(model):
    groups = M.muon_param_groups(model, lr=0.02, weight_decay=0.01, adam_lr=1e-3, normuon=0.95, cautious_wd=True)
    return M.Muon(groups)


def test_state_dict_round_trip_equals_uninterrupted():
    torch.manual_seed(0)
    model_a = TinyNet()
    model_b = copy.deepcopy(model_a)
    opt_a = build(model_a)
    train_a_bit(model_a, opt_a, 10)

    opt_b = build(model_b)
    train_a_bit(model_b, opt_b, 5)
    blob = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=False)
    model_c = TinyNet()
    model_c.load_state_dict(saved["model"])
    opt_c = build(model_c)
    opt_c.load_state_dict(saved["opt"])
    # continue with the batches the uninterrupted run saw at steps 5..9 (train_a_bit reseeds each call)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 50, (8, 4), generator=gen) for _ in range(10)]
    for idx in batches[5:]:
        loss = torch.nn.functional.cross_entropy(model_c(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        opt_c.step()
        opt_c.zero_grad(set_to_none=True)
    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(pa, pc)


def test_loading_groups_in_another_order_is_a_clear_error():
    w, bias = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8))
    opt = M.Muon([dict(params=[w], name="hidden"), dict(params=[bias], use_muon=False, name="bias")])
    random_grads([w, bias], 0)
    opt.step()
    swapped = M.Muon([dict(params=[bias], use_muon=False, name="bias"), dict(params=[w], name="hidden")])
    with pytest.raises(ValueError, match="group 0 .*'bias'.* AdamW here but Muon in the checkpoint"):
        swapped.load_state_dict(opt.state_dict())
    w2 = torch.nn.Parameter(torch.randn(4, 8))
    other = M.Muon([dict(params=[w2], name="hidden"), dict(params=[bias], use_muon=False, name="bias")])
    with pytest.raises(ValueError, match=r"shape \(8, 8\) but the parameter has shape \(4, 8\)"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_steps_and_adds_groups(how):
    params = [torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8))]
    opt = M.Muon([dict(params=params[:1]), dict(params=params[1:], use_muon=False, lr=1e-3)], track_stats=True)
    random_grads(params, 0)
    opt.step()
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert clone.track_stats and clone.distributed
    new_params = [p for g in clone.param_groups for p in g["params"]]
    random_grads(new_params, 1)
    clone.step()
    clone.add_param_group(dict(params=[torch.nn.Parameter(torch.randn(4, 4))]))
    assert clone.param_groups[-1]["ns_method"] == "newton_schulz"
    assert len(clone.stats()) == 1


@pytest.mark.parametrize("make", [
    lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.02, 1e-3], total_steps=10),
    lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=[0.01, 1e-4], max_lr=[0.02, 1e-3], step_size_up=3),
], ids=["OneCycleLR", "CyclicLR"])
def test_cyclic_schedulers_with_default_cycle_momentum(make):
    params = [torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8))]
    opt = M.Muon([dict(params=params[:1]), dict(params=params[1:], use_muon=False, lr=1e-3)])
    sched = make(opt)  # refused before: "optimizer must support momentum or beta1"
    momenta = []
    for t in range(5):
        random_grads(params, t)
        opt.step()
        sched.step()
        momenta.append(opt.param_groups[0]["momentum"])
    assert len(set(momenta)) > 1  # Muon's momentum is cycled
    assert opt.param_groups[1]["betas"] == (0.9, 0.95)  # AdamW groups keep their betas
    assert all(torch.isfinite(p).all() for p in params)


def steps_in_dtype(opt, params, steps, start=0):
    """run_steps for parameters of any dtype (gradients in the parameter's dtype)."""
    for t in range(start, start + steps):
        gen = torch.Generator().manual_seed(1000 + t)
        for p in params:
            p.grad = (p.detach().double() * 0.5 + torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(p.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_normuon_resume_is_exact_for_low_and_high_precision_params(dtype):
    """torch's Optimizer.load_state_dict casts floating state to the parameter's dtype; NorMuon's
    fp32 second moment must come back bit for bit, so a resumed run equals the uninterrupted one."""
    def make():
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(16, 8, generator=gen).to(dtype)),
                  torch.nn.Parameter(torch.randn(8, 24, generator=gen).to(dtype))]
        return params, M.Muon(params, lr=0.02, normuon=0.95, weight_decay=0.1, ns_dtype=torch.float32)
    params, opt = make()
    steps_in_dtype(opt, params, 3)
    blob = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, blob)
    steps_in_dtype(opt, params, 4, start=3)
    blob.seek(0)
    saved = torch.load(blob)
    resumed, opt2 = make()
    with torch.no_grad():
        for p, v in zip(resumed, saved["params"]):
            p.copy_(v)
    opt2.load_state_dict(saved["opt"])
    steps_in_dtype(opt2, resumed, 4, start=3)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    for a, b in zip(params, resumed):
        sa, sb = opt.state[a], opt2.state[b]
        assert sorted(sa) == sorted(sb) == ["momentum_buffer", "second_moment", "step"]
        assert sa["second_moment"].dtype == sb["second_moment"].dtype
        assert all(torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k] for k in sa)


def test_normuon_in_float64():
    """ns_dtype=torch.float64 runs NorMuon in float64 end to end: the step equals the pure
    functions composed in float64, and is not the fp32 result."""
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(24, 10, generator=gen, dtype=torch.float64))
    start, grad = w.detach().clone(), torch.randn(24, 10, generator=gen, dtype=torch.float64)
    opt = M.Muon([w], lr=0.1, normuon=0.9, ns_dtype=torch.float64)
    w.grad = grad.clone()
    opt.step()
    assert opt.state[w]["second_moment"].dtype == torch.float64
    D = M.zeropower_via_newtonschulz5(grad * 0.05 + grad * 0.95 * 0.05, dtype=torch.float64)
    want = start - 0.1 * M.shape_scale(w.shape) * M.normuon_normalize(D, torch.zeros(24, 1, dtype=torch.float64), 0.9)
    torch.testing.assert_close(w.detach(), want, atol=1e-12, rtol=0)
    w32 = torch.nn.Parameter(start.clone())
    opt32 = M.Muon([w32], lr=0.1, normuon=0.9, ns_dtype=torch.float32)
    w32.grad = grad.clone()
    opt32.step()
    assert not torch.equal(w32, w)  # really computed in another precision ...
    torch.testing.assert_close(w32.detach(), w.detach(), atol=1e-5, rtol=0)  # ... to the same result


# -- distributed (2 processes, gloo) ---------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DIST_SHAPES = ((32, 16), (16, 48), (24, 24), (8, 8, 4, 4), (3, 12, 20), (40, 40), (32, 16), (24, 24), (24, 24))


def dist_worker(rank, world, port, out_dir, dtype=None):
    """6 steps of a Muon with a NorMuon and a Polar Express group; dtype: parameters and ns_dtype."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=__import__("datetime").timedelta(seconds=60))
    params = make_params(shapes=DIST_SHAPES)
    if dtype is not None:
        params = [torch.nn.Parameter(p.detach().to(dtype)) for p in params]
    opt = M.Muon([dict(params=params[:4], normuon=0.9, weight_decay=0.1),
                  dict(params=params[4:], ns_method="polar_express")], lr=0.02, ns_dtype=dtype)
    for t in range(6):
        gen = torch.Generator().manual_seed(t)
        for i, p in enumerate(params):
            g = p.detach() * 0.5 + torch.randn(p.shape, generator=gen).to(p.dtype)  # the same on all ranks (DDP)
            p.grad = None if (t == 3 and i == 1) else g  # a parameter without grad on one step
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.save({"params": [p.detach() for p in params], "state": opt.state_dict()},
               os.path.join(out_dir, f"r{rank}_w{world}.pt"))
    if world > 1:
        dist.barrier()  # no rank tears its group down while the other still talks to it
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [None, torch.float64], ids=["default", "float64"])
def test_distributed_matches_single_process(tmp_path, dtype):
    """2 ranks (gloo) give the one-process result; in float64 to float64 precision (the results
    each rank shares travel in the compute dtype, never rounded to fp32)."""
    dist_worker(0, 1, None, str(tmp_path), dtype)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=dist_worker, args=(r, 2, port, str(tmp_path), dtype)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "distributed step hung"
    assert all(p.exitcode == 0 for p in procs)
    single = torch.load(tmp_path / "r0_w1.pt")
    ranks = [torch.load(tmp_path / f"r{r}_w2.pt") for r in range(2)]
    for res in ranks:
        for a, b in zip(single["params"], res["params"]):
            assert a.dtype == b.dtype == (dtype or torch.float32)
            tol = dict(atol=1e-13, rtol=0) if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(a, b, **tol)
        state = res["state"]["state"]
        assert len(state) == len(DIST_SHAPES)  # every rank holds every buffer
        assert all("momentum_buffer" in s for s in state.values())
        assert state[1]["step"] == 5 and state[0]["step"] == 6  # the no-grad step was skipped
    for k, s0 in ranks[0]["state"]["state"].items():
        for name, v in s0.items():
            v1 = ranks[1]["state"]["state"][k][name]
            assert torch.equal(v, v1) if torch.is_tensor(v) else v == v1
