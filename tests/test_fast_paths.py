"""Fast paths of muon_optim: the Triton symmetric kernels (run on CPU by Triton's interpreter)
and gram_newton_schulz (pure torch, compared with the standard iteration)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import muon_optim as mo  # noqa: E402

# -----------------------------------------------------------------------------
# Triton kernels. TRITON_INTERPRET must be set before triton is imported, so the kernels run in a
# child process (this pytest process may already hold a compiled-mode triton). The child returns
# max relative errors as JSON; the assertions are made here.

KERNEL_SCRIPT = r"""
import json, os, sys
assert os.environ["TRITON_INTERPRET"] == "1"
sys.path.insert(0, sys.argv[1])
import torch
import muon_optim as mo
torch.manual_seed(0)
out = {}
def rel(C, ref):
    return ((C.float() - ref).abs().max() / ref.abs().max()).item()
cases = [  # (B, M, K, block_m, block_k): M, K not multiples of the tile; batch > 1
    (1, 70, 90, 32, 32), (3, 33, 17, 16, 16), (2, 45, 70, 32, 16)]
for dtype in ("float32", "bfloat16", "float16"):
    dt = getattr(torch, dtype)
    for B, M, K, bm, bk in cases:
        X = torch.randn(B, M, K).to(dt)
        ref = X.float() @ X.float().mT
        C = mo._launch_sym(X, None, 1.0, 0.0, config=(bm, bk, 4))
        key = f"{dtype}/{B}x{M}x{K}"
        out["xxt/" + key] = rel(C, ref)
        out["xxt_asym/" + key] = (C.float() - C.float().mT).abs().max().item() / ref.abs().max().item()
        out["xxt_dtype_ok/" + key] = float(C.dtype == dt and C.shape == (B, M, M))
        Xt = torch.randn(B, K, M).to(dt).mT  # a strided (transposed) view
        out["xxt_strided/" + key] = rel(mo._launch_sym(Xt, None, 1.0, 0.0, config=(bm, bk, 4)),
                                        Xt.float() @ Xt.float().mT)
        A = (ref / ref.norm(dim=(-2, -1), keepdim=True)).to(dt)  # symmetric, norm 1 like in the iteration
        b, c = -4.7750, 2.0315
        ref2 = b * A.float() + c * A.float() @ A.float()
        out["poly/" + key] = rel(mo._launch_sym(A, A, c, b, config=(bm, bk, 4)), ref2)
# the dispatch: with the size gate lowered, the iterations run through the kernels on CPU tensors
assert mo.triton_verified(torch.device("cpu"), torch.float32)  # the first-use check, before counting
launches = []
launch = mo._launch_sym
mo._launch_sym = lambda *a, **k: launches.append(1) or launch(*a, **k)
mo.TRITON_MIN_WORK = 0
G = torch.randn(2, 70, 150)
with_kernels = {"ns5": mo.zeropower_via_newtonschulz5(G), "gram": mo.gram_newton_schulz(G)}
out["launches"] = len(launches)
mo.USE_TRITON = False
out["ns5_e2e"] = rel(with_kernels["ns5"], mo.zeropower_via_newtonschulz5(G))
out["gram_e2e"] = rel(with_kernels["gram"], mo.gram_newton_schulz(G))
out["launches_after_off"] = len(launches) - out["launches"]
print("RESULT" + json.dumps(out))
"""

TOL = {"float32": 1e-5, "bfloat16": 1.6e-2, "float16": 2e-3}  # output rounding: fp32 ~1e-7, bf16 2^-8, fp16 2^-11


@pytest.fixture(scope="module")
def kernel_results():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")  # the interpreter is numpy, one thread
    proc = subprocess.run([sys.executable, "-c", KERNEL_SCRIPT, str(REPO)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.mark.xdist_group("triton_interpreter")  # one worker runs the module fixture they share, once
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("op", ["xxt", "xxt_strided", "poly"])
def test_triton_kernels_match_torch(kernel_results, op, dtype):
    errs = {k: v for k, v in kernel_results.items() if k.startswith(f"{op}/{dtype}/")}
    assert len(errs) == 3, errs
    bad = {k: v for k, v in errs.items() if not v < TOL[dtype]}
    assert not bad, f"relative error above {TOL[dtype]}: {bad}"


@pytest.mark.xdist_group("triton_interpreter")  # one worker runs the module fixture they share, once
def test_triton_xxt_is_symmetric_with_input_dtype(kernel_results):
    # off-diagonal tiles are written twice from the same registers: exactly mirrored; diagonal
    # tiles are computed whole, so allow fp32 round-off there
    for k, v in kernel_results.items():
        if k.startswith("xxt_asym/"):
            assert v < 1e-6, (k, v)
        if k.startswith("xxt_dtype_ok/"):
            assert v == 1.0, k


WRONG_KERNEL_SCRIPT = r"""
import json, sys, warnings
sys.path.insert(0, sys.argv[1])
import torch
import muon_optim as mo
mo.TRITON_MIN_WORK = 0
right = mo.triton_sym_matmul_t
mo.triton_sym_matmul_t = lambda X, config=None: right(X, config) * 1.01  # a kernel that is 1% off
torch.manual_seed(0)
G = [torch.randn(40, 90), torch.randn(40, 90)]
def step():
    params = [torch.nn.Parameter(torch.zeros(40, 90)) for _ in G]
    opt = mo.Muon(params, lr=0.1, ns_dtype=torch.float32)
    for _ in range(2):
        for p, g in zip(params, G):
            p.grad = g.clone()
        opt.step()
    return torch.stack([p.detach() for p in params])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = step()
    again = step()
mo.USE_TRITON = False
want = step()
print("RESULT" + json.dumps(dict(
    warnings=[str(w.message) for w in caught], err=(got - want).abs().max().item(),
    err_again=(again - want).abs().max().item(), verified=mo.triton_verified(torch.device("cpu"), torch.float32))))
"""


def test_wrong_triton_kernel_warns_once_and_falls_back():
    """A kernel that disagrees with torch on its first-use check is never trusted: one warning
    that says how to turn Triton off, then the torch path, so the optimizer's result is exact."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", WRONG_KERNEL_SCRIPT, str(REPO)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT")][-1][len("RESULT"):])
    triton_warnings = [w for w in out["warnings"] if "Triton kernel" in w]
    assert len(triton_warnings) == 1, out["warnings"]
    assert "triton_sym_matmul_t" in triton_warnings[0] and "USE_TRITON = False" in triton_warnings[0]
    assert out["verified"] is False
    assert out["err"] == 0.0 and out["err_again"] == 0.0


CONFIG_KERNEL_SCRIPT = r"""
import json, sys, warnings
sys.path.insert(0, sys.argv[1])
import torch
import muon_optim as mo
mo.TRITON_MIN_WORK = 0
kernel = mo._sym_kernel
class WrongForLargeTiles:  # a kernel that miscompiles for the large-matrix tiles only (BLOCK_M=128)
    def __getitem__(self, grid):
        def launch(*args, **kw):
            kernel[grid](*args, **kw)
            if kw["BLOCK_M"] == 128:
                args[2].mul_(1.01)  # C
        return launch
mo._sym_kernel = WrongForLargeTiles()
X = torch.randn(1, 1030, 40, generator=torch.Generator().manual_seed(0))  # M >= 1024: the large tiles
def x_xt(X):  # the iterations' dispatch: the kernel where _triton_ok (which runs the first-use check), else torch
    return (mo.triton_sym_matmul_t(X), True) if mo._triton_ok(X) else (torch.bmm(X, X.mT), False)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    small, small_used = x_xt(X[:, :100])  # the small tiles: correct, used
    got, used = x_xt(X)
print("RESULT" + json.dumps(dict(warnings=[str(w.message) for w in caught], small_used=small_used, used=used,
                                 err=(got - torch.bmm(X, X.mT)).abs().max().item(),
                                 small_err=(small - torch.bmm(X[:, :100], X[:, :100].mT)).abs().max().item())))
"""


def test_triton_self_check_covers_every_kernel_configuration():
    """Large matrices launch the kernel with other tiles and warps than small ones; a configuration
    that miscompiles is caught by its own first-use check (one warning, then torch) instead of
    giving a wrong result because another configuration passed."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", CONFIG_KERNEL_SCRIPT, str(REPO)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT")][-1][len("RESULT"):])
    assert out["small_used"] and out["small_err"] < 1e-4
    assert out["err"] < 1e-4, f"large-tile result off by {out['err']}: its configuration was never checked"
    triton_warnings = [w for w in out["warnings"] if "Triton kernel" in w]
    assert len(triton_warnings) == 1 and "128" in triton_warnings[0], out["warnings"]
    assert not out["used"]


@pytest.mark.xdist_group("triton_interpreter")  # one worker runs the module fixture they share, once
def test_iterations_dispatch_to_kernels(kernel_results):
    # NS5: X X^T and the polynomial per step; Gram (restart after 2): R, 2 P, 1 P^2, then R, 3 P, 2 P^2
    assert kernel_results["launches"] == 5 * 2 + (1 + 2 + 1) + (1 + 3 + 2)
    assert kernel_results["launches_after_off"] == 0
    assert kernel_results["ns5_e2e"] < 1e-5
    assert kernel_results["gram_e2e"] < 1e-5


# -----------------------------------------------------------------------------
# Gram Newton-Schulz: the same polynomial as the standard iteration, computed differently.

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These matrices are tiny: a second thread only adds sync cost (and, on a busy shared CPU,
    spin-waiting at OpenMP barriers). Restored for the other test files."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _rel(A, B):
    return ((A.double() - B.double()).norm() / B.double().norm()).item()


@pytest.mark.parametrize("shape", [(64, 256), (300, 70), (3, 40, 200), (2, 2, 24, 100), (128, 512)])
def test_gram_equals_standard_iteration_fp32(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    D = mo.gram_newton_schulz(G, dtype=torch.float32)
    ref = mo.zeropower_via_newtonschulz5(G.double(), dtype=torch.float64)
    assert D.shape == G.shape and D.dtype == torch.float32
    assert _rel(D, ref) < 1e-5


@pytest.mark.parametrize("restart_after", [2, 1, None])
@pytest.mark.parametrize("shape", [(64, 256), (300, 70), (3, 40, 200)])
def test_gram_bf16_close_to_standard(shape, restart_after):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    ref = mo.zeropower_via_newtonschulz5(G.double(), dtype=torch.float64)
    D = mo.gram_newton_schulz(G, dtype=torch.bfloat16, restart_after=restart_after)
    plain = mo.zeropower_via_newtonschulz5(G, dtype=torch.bfloat16)
    assert D.dtype == torch.bfloat16
    # measured: plain bf16 ~1.5e-2, Gram bf16 2-5e-2 from the exact fp64 iteration (NS5 itself is
    # ~0.3 away from U V^T, so both are far inside what Muon tolerates)
    assert _rel(plain, ref) < 0.03
    assert _rel(D, ref) < 0.08
    sv = torch.linalg.svdvals(D.double())
    assert sv.min() > 0.5 and sv.max() < 1.3


def test_gram_custom_coeffs_and_steps():
    G = torch.randn(32, 160, generator=torch.Generator().manual_seed(3))
    for steps in (1, 3, 7):
        D = mo.gram_newton_schulz(G, steps=steps, dtype=torch.float32)
        assert _rel(D, mo.zeropower_via_newtonschulz5(G.double(), steps=steps, dtype=torch.float64)) < 1e-5
    coeffs = mo.POLAR_EXPRESS_COEFFS
    ref = mo.zeropower_via_newtonschulz5(G.double(), dtype=torch.float64, coeffs=coeffs)
    assert _rel(mo.gram_newton_schulz(G, coeffs=coeffs, dtype=torch.float32), ref) < 1e-5


def test_gram_restarts_keep_ill_conditioned_inputs_accurate():
    # R = X X^T cannot resolve singular values below ~sqrt(eps); without restarts Q amplifies that
    # loss ~3.4x per step: with 10 steps in one block the fp32 result is garbage (error ~1)
    gen = torch.Generator().manual_seed(6)
    U, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(256, 64, generator=gen, dtype=torch.float64))
    G = ((U * torch.logspace(0, -4, 64, dtype=torch.float64)) @ V.T).float()
    ref = mo.zeropower_via_newtonschulz5(G.double(), steps=10, dtype=torch.float64)
    assert _rel(mo.gram_newton_schulz(G, steps=10), ref) < 1e-3
    assert _rel(mo.gram_newton_schulz(G, steps=10, restart_after=None), ref) > 1e-2  # why restarts exist


def test_gram_near_square_uses_standard_iteration(monkeypatch):
    G = torch.randn(96, 150, generator=torch.Generator().manual_seed(4))  # n < 2m
    assert torch.equal(mo.gram_newton_schulz(G), mo.zeropower_via_newtonschulz5(G))
    monkeypatch.setattr(mo, "GRAM_MIN_ASPECT", 1.0)  # force the Gram path on a square matrix
    Gs = torch.randn(80, 80, generator=torch.Generator().manual_seed(5))
    D = mo.gram_newton_schulz(Gs)
    assert not torch.equal(D, mo.zeropower_via_newtonschulz5(Gs))  # really the other code path ...
    assert _rel(D, mo.zeropower_via_newtonschulz5(Gs.double(), dtype=torch.float64)) < 1e-5  # ... same result


def test_gram_rejects_vectors_and_muon_accepts_it():
    with pytest.raises(ValueError, match="needs a"):
        mo.gram_newton_schulz(torch.randn(10))
    W = torch.nn.Parameter(torch.randn(16, 64))
    opt = mo.Muon([W], lr=0.02, ns_method="gram_newton_schulz")
    W.grad = torch.randn(16, 64)
    before = W.detach().clone()
    opt.step()
    step = (before - W.detach()) / 0.02
    ref = mo.zeropower_via_newtonschulz5(W.grad.lerp(W.grad * 0.05, 0.95).double(), dtype=torch.float64)
    assert _rel(step, ref) < 1e-4


def test_triton_only_where_it_measured_faster():
    """The H100 measurements (results/bench.md, gpu_ns): torch wins up to 2048^2 and at GPT-2 small's
    shapes; the kernels win from 4096^3 of work (4096^2, 8 x 2048^2)."""
    meta = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    for shape in [(1, 768, 768), (1, 768, 3072), (12, 768, 768), (1, 2048, 2048), (1, 2048, 8192), (16, 1024, 1024)]:
        assert not mo.triton_pays_off(meta(*shape)), shape
    for shape in [(1, 4096, 4096), (8, 2048, 2048), (2, 4096, 8192)]:
        assert mo.triton_pays_off(meta(*shape)), shape
