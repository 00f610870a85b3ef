"""
muon_optim.py -- Muon (MomentUm Orthogonalized by Newton-Schulz) in one file.

Copy this file into your project; it needs only torch (Triton optional, for the CUDA fast path).

    from muon_optim import Muon, muon_param_groups
    opt = Muon(muon_param_groups(model, lr=0.02, adam_lr=3e-3))   # hidden matrices -> Muon, rest -> AdamW
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

Muon keeps an SGD-momentum buffer per weight matrix and replaces the update by the nearest
semi-orthogonal matrix (the polar factor U V^T of U S V^T), computed approximately with a few
matmul-only iterations. That equalises the update's singular values, so rare-but-important
directions learn as fast as dominant ones. It is for >= 2D hidden weights only: embeddings, the
output head, gains and biases go to the auxiliary AdamW groups (`use_muon=False`).

Contents
  compute dtype      default_ns_dtype, cpu_fast_bf16 (bf16 where the hardware makes it fast), NS_DTYPE
  orthogonalization  zeropower_via_newtonschulz5, polar_express, polar_express_coefficients,
                     gram_newton_schulz, orthogonalize (dispatch); Triton kernels verified on first use
  update math        momentum_direction, muon_update, normuon_normalize, adam_update, apply_update, sphere_retract
  FSDP2 / DTensor    share_work, chunk_rows, orthogonalize_row_sharded, normuon_normalize_row_sharded, ...
  optimizer          Muon (+ KellerJordan-compatible SingleDeviceMuon, MuonWithAuxAdam, ...)
  helpers            muon_param_groups
  self-check         python muon_optim.py
"""
import functools
import math
import os
import sys
import time
import warnings
import zlib

import torch
import torch.distributed as dist

try:  # optional: symmetric-matmul kernels for CUDA (see triton_* below); tests run them under TRITON_INTERPRET=1
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

# -----------------------------------------------------------------------------
# Orthogonalization: pure functions on (..., m, n) tensors

NS5_COEFFS = (3.4445, -4.7750, 2.0315)  # KellerJordan's quintic: max slope at 0, converges to ~[0.7, 1.2]

# Amsel et al. 2025 (arXiv 2505.16932), the 5-step list used by modded-nanogpt and dion.
# polar_express_coefficients(5) regenerates it (tested to 1e-6).
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


NS_DTYPE = None  # global override of the compute dtype (e.g. torch.float32); per group: ns_dtype=...
CPU_BF16_MIN_SIZE = 256  # on a CPU with fast bf16, matrices with a side below this are still faster in fp32


@functools.lru_cache(maxsize=None)
def cpu_fast_bf16():
    """(True/False, why): does this CPU multiply bf16 matrices faster than fp32? Decided once per
    process. x86 with AMX-BF16 (Sapphire Rapids and later): bf16 NS5 ~3x faster than fp32 at
    768x768. Without AMX, bf16 matmul is emulated and 10-100x SLOWER. ARM with the BF16 extension
    (Graviton3, Neoverse V1/V2): fast. The environment variable MUON_CPU_BF16=1/0 overrides the probe."""
    env = os.environ.get("MUON_CPU_BF16")
    if env in ("0", "1"):
        return env == "1", f"MUON_CPU_BF16={env}"
    try:
        caps = torch.cpu.get_capabilities()
        if caps.get("amx_bf16"):
            return True, "the CPU has AMX-BF16 (torch.cpu.get_capabilities)"
        if caps.get("architecture", "") not in ("aarch64", "arm64"):
            return False, "no AMX-BF16 on this CPU: bf16 matmul would be emulated"
    except Exception:  # torch < 2.8 has no get_capabilities: the older private probe
        try:
            if torch.cpu._is_amx_tile_supported():
                return True, "the CPU has AMX tiles (torch.cpu._is_amx_tile_supported)"
        except Exception:
            pass
    try:  # ARM: the kernel lists the BF16 extension in /proc/cpuinfo's Features line
        with open("/proc/cpuinfo") as f:
            if any(line.startswith("Features") and " bf16" in f" {line.split(':', 1)[-1]} " for line in f):
                return True, "the CPU has the ARM BF16 extension (/proc/cpuinfo)"
    except OSError:
        pass
    return False, "no fast bf16 matmul found on this CPU"


def default_ns_dtype(device, shape=None):
    """The compute dtype of the orthogonalization when none is given: NS_DTYPE if set; bf16 on CUDA
    (tensor cores; the iteration is robust to bf16); on a CPU, bf16 only where it is fast
    (cpu_fast_bf16) and the matrix is large enough to gain (min side >= CPU_BF16_MIN_SIZE, measured
    with bench.py), fp32 everywhere else."""
    if NS_DTYPE is not None:
        return NS_DTYPE
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16
    if kind == "cpu" and cpu_fast_bf16()[0] and (shape is None or min(shape[-2:]) >= CPU_BF16_MIN_SIZE):
        return torch.bfloat16
    return torch.float32


def compute_dtype_rule(device):
    """What default_ns_dtype picks on `device`, as text: part of a run's identity, so that a result
    computed in fp32 is never reused for a bf16 run (CUDA, a CPU with AMX, MUON_CPU_BF16=1)."""
    kind = torch.device(device).type
    if NS_DTYPE is not None:
        return str(NS_DTYPE)
    if kind == "cuda":
        return "torch.bfloat16"
    if kind == "cpu" and cpu_fast_bf16()[0]:
        return f"torch.bfloat16 where the short side >= {CPU_BF16_MIN_SIZE}, else torch.float32"
    return "torch.float32"


def _normalized(G, dtype, scale, eps):
    """Cast to the compute dtype and divide by (||G||_F * scale + eps), so that every singular
    value is <= 1/scale. A plain fp32 sum of squares overflows for entries ~1e20 and underflows
    for ~1e-20; then the norm is taken of G / max|G| and scaled back. On a CPU that safe path runs
    only when the plain norm is not usable (checking costs nothing there); on GPUs, where a check
    would sync, it always runs (its extra passes are cheap next to the matmuls)."""
    X = G if G.dtype in (torch.float32, torch.float64) else G.to(torch.float32)
    norm = None
    if X.device.type == "cpu":
        norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
        if not (torch.isfinite(norm).all() and (norm > 1e-15).all()):
            norm = None
    if norm is None:
        amax = X.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(X.dtype).tiny)
        norm = (X / amax).norm(dim=(-2, -1), keepdim=True) * amax
    out = torch.empty(X.shape, dtype=dtype, device=X.device)
    return torch.mul(X, 1.0 / (norm * scale + eps), out=out)  # scale and cast in one pass


def _wide(G, dtype, norm_scale, eps):
    """G normalized (_normalized) as a (B, m, n) batch in its wide orientation (m <= n), and whether
    that took a transpose. A tall G is normalized in its own memory layout and only viewed
    transposed: matmuls read either layout at full speed, a transposing copy would be a strided
    pass over the whole matrix."""
    transposed = G.size(-2) > G.size(-1)
    X = _normalized(G, dtype, norm_scale, eps)
    X = X.reshape(-1, X.size(-2), X.size(-1))  # (baddbmm wants exactly one batch dim)
    return (X.mT if transposed else X), transposed


def _unwide(X, G, transposed):
    """Back from _wide's (B, m, n) batch to G's shape and orientation (a view where possible)."""
    X = X.mT if transposed else X
    return X.reshape(G.shape)


def _odd_polynomial_iteration(G, coeffs, dtype, norm_scale, eps):
    """X <- a X + (b A + c A^2) X with A = X X^T, one (a, b, c) per step. Works on the wide
    orientation (m <= n) so that A is the small m x m Gram matrix."""
    if G.ndim < 2:
        raise ValueError(f"orthogonalization needs a (..., m, n) tensor, got shape {tuple(G.shape)}")
    dtype = dtype or default_ns_dtype(G.device, G.shape)
    X, transposed = _wide(G, dtype, norm_scale, eps)
    spare = None  # X alternates between two buffers: no fresh m x n tensor per step
    for i, (a, b, c) in enumerate(coeffs):
        A = sym_matmul_t(X)  # X @ X^T, symmetric
        B = sym_poly(A, b, c)  # b*A + c*A@A
        if transposed and i == len(coeffs) - 1:  # last step straight into G's tall layout:
            X = torch.baddbmm(X.mT, X.mT, B, beta=a).mT  # (a X + B X)^T = a X^T + X^T B, B symmetric
        else:
            X, spare = torch.baddbmm(X, B, X, beta=a, out=spare), (X if X.is_contiguous() else None)
    return _unwide(X, G, transposed)


def zeropower_via_newtonschulz5(G, steps=5, dtype=None, eps=1e-7):
    """Approximate polar factor U V^T of G = U S V^T by the quintic Newton-Schulz iteration.

    The coefficients (3.4445, -4.7750, 2.0315) maximise the slope at zero instead of converging:
    the result is U S' V^T with S' roughly in [0.7, 1.2], which trains as well as the exact factor
    and needs only 5 steps. Input: (..., m, n), tall or wide; returned in `dtype`
    (default: default_ns_dtype, bf16 on CUDA and on CPUs with fast bf16 for large matrices)."""
    return _odd_polynomial_iteration(G, [NS5_COEFFS] * steps, dtype, 1.0, eps)


def polar_express(G, steps=5, dtype=None):
    """Polar Express (Amsel et al. 2025): a different minimax-optimal quintic per step, so
    5 steps land closer to U V^T than NS5 (see the table of `python muon_optim.py`). The 1.02 safety factor on the norm guards against bf16 round-off pushing a singular
    value past the interval the polynomials were designed for. Steps beyond the published 5 reuse
    the last (already converged) coefficients; use polar_express_coefficients(n) for an exact n-list."""
    coeffs = list(POLAR_EXPRESS_COEFFS[:steps]) + [POLAR_EXPRESS_COEFFS[-1]] * max(0, steps - 5)
    return _odd_polynomial_iteration(G, coeffs, dtype, 1.02, 1e-6)


def _minimax_odd_quintic(lo, hi):
    """Odd p(x) = a x + b x^3 + c x^5 minimising max |1 - p(x)| on [lo, hi], by Remez exchange:
    the optimum equioscillates at lo, q, r, hi, where q, r are p's interior extrema."""
    if lo / hi > 1 - 5e-6:  # interval too narrow for the exchange: the limit is the Taylor-like 15/8 rule
        return 15 / 8 / hi, -10 / 8 / hi**3, 3 / 8 / hi**5
    q, r = (3 * lo + hi) / 4, (lo + 3 * hi) / 4
    err_prev = None
    for _ in range(100):
        M = torch.tensor([[x, x**3, x**5, s] for x, s in ((lo, 1.0), (q, -1.0), (r, 1.0), (hi, -1.0))],
                         dtype=torch.float64)
        a, b, c, err = torch.linalg.solve(M, torch.ones(4, dtype=torch.float64)).tolist()
        disc = math.sqrt(9 * b * b - 20 * a * c)  # roots of p'(x) = a + 3b x^2 + 5c x^4
        q, r = math.sqrt((-3 * b - disc) / (10 * c)), math.sqrt((-3 * b + disc) / (10 * c))
        if err_prev is not None and abs(err - err_prev) < 1e-15:
            break
        err_prev = err
    return a, b, c


def polar_express_coefficients(steps, l=1e-3, cushion=0.02, safety=1.02):
    """Regenerate Polar Express coefficients (Amsel et al. 2025, Appendix G).

    Start with singular values in [l, u=1]. Each step takes the minimax odd quintic on
    [max(l, cushion*u), u] (the cushion stops the first polynomials from being absurdly steep),
    rescales it so that p(l) and p(u) are centred on 1, divides by the safety factor (a/s, b/s^3,
    c/s^5, all but the last step) and maps the interval: l <- p(l), u <- 2 - l.
    polar_express_coefficients(5) reproduces POLAR_EXPRESS_COEFFS."""
    u, out = 1.0, []
    for i in range(steps):
        a, b, c = _minimax_odd_quintic(max(l, cushion * u), u)
        p_l, p_u = (a * x + b * x**3 + c * x**5 for x in (l, u))
        k = 2 / (p_l + p_u)
        a, b, c = a * k, b * k, c * k
        if i < steps - 1:
            a, b, c = a / safety, b / safety**3, c / safety**5
        l = a * l + b * l**3 + c * l**5
        u = 2 - l
        out.append((a, b, c))
    return out


GRAM_MIN_ASPECT = 2.0  # gram_newton_schulz uses the plain iteration when n < this * m (see bench.py --only=speed)


def gram_newton_schulz(G, steps=5, dtype=None, coeffs=None, restart_after=2, eps=1e-7):
    """The same polynomial iteration as zeropower_via_newtonschulz5, run on the small Gram matrix.

    For wide X (m x n, m < n) every step is X <- P(R) X with P(R) = aI + bR + cR^2, R = X X^T.
    All P's of a run are polynomials in the first R, so they commute: after k steps X = Q X_0 with
    Q = P_k...P_1, and R <- P R P = R P^2. Q and R are m x m, so the steps cost m^3 instead of
    m^2 n. Every `restart_after` steps (a short last block joins the one before: 5 steps run as
    2 + 3) X is rebuilt (X = Q X_0) and R recomputed from it. That stops round-off in Q and R from
    compounding: R = X X^T only resolves singular values down to sqrt(eps) of the largest, and Q
    amplifies what R lost by ~3.4x per step (fp32, 768x3072, cond 1e4, 10 steps: relative error
    1.6 without restarts, 1.8e-4 restarting every 2, plain iteration 1.4e-4). Five steps cost
    4 m^2 n + 14 m^3 multiply-adds vs 10 m^2 n + 5 m^3 for the plain iteration: a win once
    n > 1.5 m in theory; below n = GRAM_MIN_ASPECT * m (measured with bench.py) it runs the plain
    iteration. In bf16 the result is ~3x less exact than the plain iteration's (bench.py quality)."""
    if G.ndim < 2:
        raise ValueError(f"orthogonalization needs a (..., m, n) tensor, got shape {tuple(G.shape)}")
    coeffs = list(coeffs or [NS5_COEFFS] * steps)
    m, n = sorted(G.shape[-2:])
    if n < GRAM_MIN_ASPECT * m:  # near-square: the m^3 work costs more than it saves
        return _odd_polynomial_iteration(G, coeffs, dtype, 1.0, eps)
    dtype = dtype or default_ns_dtype(G.device, G.shape)
    X, transposed = _wide(G, dtype, 1.0, eps)
    size = restart_after or len(coeffs)
    starts = list(range(0, len(coeffs), size))
    if len(starts) > 1 and len(coeffs) - starts[-1] < size:
        starts.pop()  # a short last block joins the previous one
    spare = None  # X = Q X alternates between two buffers
    for start, end in zip(starts, starts[1:] + [len(coeffs)]):
        block = coeffs[start:end]
        R = sym_matmul_t(X)
        Q = None
        for i, (a, b, c) in enumerate(block):
            P = sym_poly(R, b, c)  # b R + c R^2 (a fresh tensor) ...
            P.diagonal(dim1=-2, dim2=-1).add_(a)  # ... + a I
            Q = P if Q is None else torch.bmm(P, Q)
            if i < len(block) - 1:  # the last R of a block is never used
                R = torch.bmm(R, sym_matmul_t(P))  # R P^2, with P^2 = P P^T (symmetric kernel on CUDA)
        if transposed and end == len(coeffs):  # the last product straight into G's tall layout:
            X = torch.bmm(X.mT, Q).mT  # (Q X)^T = X^T Q: Q is a product of commuting symmetric matrices
        else:
            X, spare = torch.bmm(Q, X, out=spare), (X if X.is_contiguous() else None)
    return _unwide(X, G, transposed)


ORTHOGONALIZERS = {
    "newton_schulz": zeropower_via_newtonschulz5,
    "polar_express": polar_express,
    "gram_newton_schulz": gram_newton_schulz,
}


def orthogonalize(G, method="newton_schulz", steps=5, dtype=None):
    """Dispatch by name: 'newton_schulz' (NS5), 'polar_express' or 'gram_newton_schulz'."""
    if method not in ORTHOGONALIZERS:
        raise ValueError(f"unknown ns_method {method!r}; choose one of {sorted(ORTHOGONALIZERS)}")
    return ORTHOGONALIZERS[method](G, steps=steps, dtype=dtype)


# -----------------------------------------------------------------------------
# Symmetric matmuls: torch by default, Triton kernels on CUDA when available.
# X @ X^T and b*A + c*A@A (A symmetric) are symmetric, so only one triangle of tiles needs
# computing; the kernels write each off-diagonal tile twice. Halves the FLOPs of 2 of the 3
# matmuls per iteration (idea from modded-nanogpt record #27).

USE_TRITON = True  # set False to force the torch path
# When the kernels pay off, measured on an H100 (torch 2.11, bf16 NS5, `python bench.py --only=gpu_ns`,
# results/bench.md): up to 2048^2 an NS5 call is launch-bound (0.5-0.9 ms at any size) and the
# kernels run at 0.65-0.70x torch's speed (GPT-2 small's 768 x 768 and 768 x 3072 included); wide
# 2048 x 8192 0.93x, 16 x 1024^2 0.94-1.04x; they win at 4096^2 (1.21-1.25x) and 8 x 2048^2
# (1.17-1.18x), both B*m*m*n = 4096^3 of work.
TRITON_MIN_WORK = 4096 ** 3  # use the kernels when the batch's B * m * m * n is at least this
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # kernels run on CPU tensors (tests)


def triton_pays_off(X):
    """X (B, m, n) holds enough matmul work for the kernels to beat torch's (TRITON_MIN_WORK)."""
    return X.shape[0] * X.size(-2) ** 2 * X.size(-1) >= TRITON_MIN_WORK


def _triton_ok(X):
    return (USE_TRITON and triton is not None and (X.is_cuda or _TRITON_INTERPRET) and X.ndim == 3
            and X.dtype in (torch.float16, torch.bfloat16, torch.float32) and triton_pays_off(X)
            and triton_verified(X.device, X.dtype))


_TRITON_VERIFIED = {}  # (device, dtype) -> bool: the kernels matched torch on first use


def triton_verified(device, dtype):
    """Trust the Triton kernels on (device, dtype) only after they match torch on a small random
    batch, checked once per process. A Triton/driver combination that miscompiles (or fails to
    compile) the kernels then costs a warning and the torch path, never a wrong update."""
    key = (str(device), dtype)
    if key not in _TRITON_VERIFIED:
        _TRITON_VERIFIED[key] = _check_triton_kernels(device, dtype)
    return _TRITON_VERIFIED[key]


def _check_triton_kernels(device, dtype, batch=2, m=80, n=96):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(batch, m, n, generator=gen).to(device=device, dtype=dtype)
    ref = X.float() @ X.float().mT
    A = (ref / ref.norm(dim=(-2, -1), keepdim=True)).to(dtype)  # symmetric, norm 1 as in the iteration
    ref_poly = -4.775 * A.float() + 2.0315 * A.float() @ A.float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    fix = "set muon_optim.USE_TRITON = False to skip Triton, or upgrade it (pip install -U triton)"
    for name, run, expected in (("triton_sym_matmul_t", lambda: triton_sym_matmul_t(X), ref),
                                ("triton_sym_poly", lambda: triton_sym_poly(A, -4.775, 2.0315), ref_poly)):
        try:
            err = ((run().float() - expected).abs().max() / expected.abs().max()).item()
        except Exception as e:  # compile errors, unsupported GPU, ...
            warnings.warn(f"muon_optim: Triton kernel {name} failed on {device} {dtype} ({type(e).__name__}: {e}); "
                          f"using torch matmuls for the rest of this process ({fix})")
            return False
        if not err <= tol:  # also catches NaN
            warnings.warn(f"muon_optim: Triton kernel {name} disagrees with torch on {device} {dtype} (max relative "
                          f"error {err:.2e} > {tol:g}); using torch matmuls for the rest of this process ({fix})")
            return False
    return True


def sym_matmul_t(X):
    """X @ X^T for a (B, m, n) batch."""
    if _triton_ok(X):
        return triton_sym_matmul_t(X)
    return torch.bmm(X, X.mT)


def sym_poly(A, b, c):
    """b*A + c*A@A for a symmetric (B, m, m) batch A."""
    if _triton_ok(A):
        return triton_sym_poly(A, b, c)
    return torch.baddbmm(A, A, A, beta=b, alpha=c)


if triton is not None:

    @triton.jit
    def _sym_kernel(X_ptr, Y_ptr, C_ptr, M, K, sxb, sxm, sxk, syb, sym_, syk, scb, scm, scn, alpha, beta,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ADD_Y: tl.constexpr,
                    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
        """C = alpha * X @ X^T (+ beta * Y) for the lower-triangle tile (pid_m >= pid_n) of one
        batch entry; writes the tile and its mirror. X: (B, M, K); Y, C: (B, M, M). Accumulates
        in fp32. PRECISION 'ieee' keeps fp32 inputs exact (torch's CUDA default, not TF32);
        DOT_FP32 upcasts the operands, needed only by the interpreter, whose bf16 tl.dot
        multiplies raw bit patterns (triton-lang/triton#11584)."""
        pid_b = tl.program_id(1)
        pid = tl.program_id(0)
        # map the linear id onto lower-triangle tile coordinates (row i holds tiles 0..i)
        pid_m = ((tl.sqrt(8.0 * pid + 1.0) - 1.0) / 2.0).to(tl.int32)
        pid_m = tl.where((pid_m + 1) * (pid_m + 2) // 2 <= pid, pid_m + 1, pid_m)  # float round-off guard
        pid_m = tl.where(pid_m * (pid_m + 1) // 2 > pid, pid_m - 1, pid_m)
        pid_n = pid - pid_m * (pid_m + 1) // 2
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        Xb = X_ptr + pid_b * sxb
        acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(Xb + rm[:, None] * sxm + kk[None, :] * sxk, mask=(rm[:, None] < M) & (kk[None, :] < K),
                        other=0.0)
            b = tl.load(Xb + rn[:, None] * sxm + kk[None, :] * sxk, mask=(rn[:, None] < M) & (kk[None, :] < K),
                        other=0.0)
            if DOT_FP32:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        acc = acc * alpha
        mask = (rm[:, None] < M) & (rn[None, :] < M)
        if ADD_Y:
            y = tl.load(Y_ptr + pid_b * syb + rm[:, None] * sym_ + rn[None, :] * syk, mask=mask, other=0.0)
            acc += beta * y.to(tl.float32)
        out = acc.to(C_ptr.dtype.element_ty)
        Cb = C_ptr + pid_b * scb
        tl.store(Cb + rm[:, None] * scm + rn[None, :] * scn, out, mask=mask)
        if pid_m != pid_n:
            tl.store(Cb + rn[None, :] * scm + rm[:, None] * scn, out, mask=mask)

    def _launch_sym(X, Y, alpha, beta, block_m=None, block_k=None):
        """One program per lower-triangle tile per batch entry. Default tiles follow Triton's
        matmul tutorial (128x128x64, 8 warps, 3 stages; K tile 32 for fp32) for large M, 64x64x32
        below M = 1024. Not tuned on a GPU yet (see README: the GPU numbers are unmeasured)."""
        if X.ndim != 3 or (Y is not None and Y.shape != (X.size(0), X.size(1), X.size(1))):
            raise ValueError(f"symmetric kernel wants X (B, M, K) and Y (B, M, M), got {tuple(X.shape)}, "
                             f"{None if Y is None else tuple(Y.shape)}")
        Bsz, M, K = X.shape
        big = M >= 1024
        block_m = block_m or (128 if big else 64)
        block_k = block_k or (64 if big and X.element_size() == 2 else 32)  # fp32 128x64 x3 stages: 192 KB smem
        C = torch.empty(Bsz, M, M, dtype=X.dtype, device=X.device)
        t = triton.cdiv(M, block_m)
        Yarg = Y if Y is not None else C
        _sym_kernel[(t * (t + 1) // 2, Bsz)](
            X, Yarg, C, M, K, X.stride(0), X.stride(1), X.stride(2),
            Yarg.stride(0), Yarg.stride(1), Yarg.stride(2), C.stride(0), C.stride(1), C.stride(2),
            float(alpha), float(beta), BLOCK_M=block_m, BLOCK_K=block_k, ADD_Y=Y is not None,
            PRECISION="ieee" if X.dtype == torch.float32 else "tf32",
            DOT_FP32=_TRITON_INTERPRET and X.dtype == torch.bfloat16,
            num_warps=8 if big else 4, num_stages=3)
        return C

    def triton_sym_matmul_t(X):
        """X @ X^T for (B, m, n) X with the Triton kernel: lower-triangle tiles only, mirrored."""
        return _launch_sym(X, None, 1.0, 0.0)

    def triton_sym_poly(A, b, c):
        """b*A + c*A@A for symmetric (B, m, m) A: since A = A^T, A@A = A@A^T, the same kernel."""
        return _launch_sym(A, A, c, b)


# -----------------------------------------------------------------------------
# Update math: pure functions

def momentum_direction(grad, momentum_buffer, momentum=0.95, nesterov=True):
    """EMA momentum, the form of KellerJordan/Muon and torch.optim.Muon: buf <- lerp(buf, g, 1-mu);
    with Nesterov the look-ahead g.lerp(buf, mu), else buf. Mutates momentum_buffer and, with
    Nesterov, grad: the look-ahead is written into it, as both references do, which saves a
    fresh parameter-sized tensor per matrix and step (on a CPU, fresh memory costs page faults)."""
    momentum_buffer.lerp_(grad, 1 - momentum)
    return grad.lerp_(momentum_buffer, momentum) if nesterov else momentum_buffer


def muon_update(grad, momentum_buffer, momentum=0.95, nesterov=True, method="newton_schulz", steps=5, dtype=None):
    """One Muon direction for a single parameter: momentum, then orthogonalization of the matrix
    view (>= 4D conv kernels as (out, -1)). Returned with grad's shape and unscaled (multiply by
    shape_scale and lr). The optimizer below does exactly this, split so ranks can share the
    orthogonalizations."""
    g = momentum_direction(grad, momentum_buffer, momentum, nesterov)
    return orthogonalize(as_matrices(g), method, steps, dtype).reshape(grad.shape)


def as_matrices(t):
    """The matrix view Muon orthogonalizes: 2D as is, 3D a batch of matrices, >= 4D (conv
    kernels out x in x kh x kw) flattened to (out, -1)."""
    return t.flatten(1) if t.ndim >= 4 else t


def shape_scale(shape, scale="original"):
    """Update multiplier for an A x B matrix (as orthogonalized):
    'original' sqrt(max(1, A/B)) (KellerJordan, torch default), 'match_adamw' 0.2*sqrt(max(A, B))
    (Moonlight: update RMS ~0.2 like AdamW's, so AdamW's lr and wd carry over), 'spectral' sqrt(A/B)."""
    A, B = shape[-2], shape[-1]
    if scale == "original":
        return math.sqrt(max(1.0, A / B))
    if scale == "match_adamw":
        return 0.2 * math.sqrt(max(A, B))
    if scale == "spectral":
        return math.sqrt(A / B)
    raise ValueError(f"unknown scale {scale!r}; choose 'original', 'match_adamw' or 'spectral'")


def _short_axis(shape):
    return -1 if shape[-2] >= shape[-1] else -2


def normuon_buffer(O):
    """Zeroed second-moment state for normuon_normalize: O's shape with the short axis of size 1."""
    shape = list(O.shape)
    shape[_short_axis(shape)] = 1
    return torch.zeros(shape, dtype=torch.float32, device=O.device)


def normuon_normalize(O, second_moment, beta2, eps=1e-10):
    """NorMuon (arXiv 2510.05491): orthogonalized updates still have very uneven per-neuron norms;
    divide each row (or column) by the root of an EMA of its mean square, then rescale to keep the
    Frobenius norm. Statistics run along the long axis, one per entry, averaged over the short axis
    (modded-nanogpt's convention; dion and the paper's code normalize per row always).
    second_moment has O's shape with the short axis of size 1; it is updated in place.
    Both Frobenius norms follow from the per-entry mean squares, so O is read twice and written
    once (fp32 result). All-zero updates stay zero (no 0/0)."""
    axis = _short_axis(O.shape)
    k = O.shape[axis]
    mean_sq = torch.linalg.vector_norm(O, dim=axis, keepdim=True, dtype=torch.float32).square_().div_(k)
    second_moment.lerp_(mean_sq, 1 - beta2)
    inv_rms = second_moment.add(eps).rsqrt()
    norm_in_sq = mean_sq.sum(dim=(-2, -1), keepdim=True)
    norm_out_sq = (mean_sq * inv_rms.square()).sum(dim=(-2, -1), keepdim=True)
    return O * (inv_rms * (norm_in_sq / norm_out_sq.clamp_min(1e-30)).sqrt())


def adam_update(grad, exp_avg, exp_avg_sq, step, betas, eps):
    """Bias-corrected Adam direction m_hat / (sqrt(v_hat) + eps); mutates the two moments."""
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2)
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    return (exp_avg / bias1) / (exp_avg_sq / bias2).sqrt().add_(eps)


def sphere_retract(p, update, lr, mode, dim=-1):
    """Take a step of size lr against `update` while keeping every vector of p along `dim` on the
    unit sphere (nGPT's normalized weights). Modes:
      'project'          p <- normalize(p - lr*update)
      'geodesic'         move along each vector's great circle by angle theta = lr, in the
                         direction of the tangent part of -update; stays exactly on the sphere
      'geodesic_scaled'  same with theta = lr * |tangent part| (equals 'project' to first order)
    Rows whose tangent part is zero do not move."""
    if mode == "project":
        p.add_(update, alpha=-lr)
        p.div_(p.norm(dim=dim, keepdim=True).clamp_min(1e-12))
        return
    u = update.to(p.dtype)
    tangent = u - (u * p).sum(dim=dim, keepdim=True) * p
    t_norm = tangent.norm(dim=dim, keepdim=True)
    if mode == "geodesic":
        theta = torch.full_like(t_norm, lr)
    elif mode == "geodesic_scaled":
        theta = lr * t_norm
    else:
        raise ValueError(f"unknown sphere mode {mode!r}; choose 'project', 'geodesic' or 'geodesic_scaled'")
    direction = tangent / t_norm.clamp_min(1e-30)
    p.mul_(torch.cos(theta)).add_(direction * -torch.sin(theta))
    p.div_(p.norm(dim=dim, keepdim=True).clamp_min(1e-12))  # remove round-off drift only


def apply_update(p, update, lr, weight_decay=0.0, cautious_wd=False, sphere=None, sphere_dim=-1,
                 proj_every=1, step=1, scale=1.0):
    """p <- p*(1 - lr*wd) - lr*scale*update, the decoupled-weight-decay step shared by Muon and
    AdamW. `update` may be in a lower precision than p (Muon's bf16 orthogonalization): the
    in-place add reads it once and does the arithmetic in p's dtype, and the scale rides in the
    add's alpha, so no scaled or upcast copy of the update is made. cautious_wd (arXiv
    2510.12402) decays only the entries where the update pushes the same way as the decay
    (update * p >= 0; scale > 0 does not change the sign). With `sphere` the step is a sphere
    retraction instead (project every `proj_every` steps, or geodesic)."""
    if weight_decay:
        if cautious_wd:
            p.sub_(p * (update * p >= 0) * (lr * weight_decay))
        else:
            p.mul_(1 - lr * weight_decay)
    if sphere is None or (sphere == "project" and step % proj_every != 0):
        p.add_(update, alpha=-lr * scale)
    else:
        sphere_retract(p, update.to(p.dtype) * scale, lr, sphere, sphere_dim)


# -----------------------------------------------------------------------------
# Sharded parameters (FSDP2 DTensors): pure functions used by Muon.step
#
# FSDP2 (torch.distributed.fsdp.fully_shard) turns every parameter into a DTensor with placement
# Shard(0) on a 1-D mesh (HSDP: (Replicate(), Shard(0)) on a 2-D mesh); each rank holds a block of
# rows, torch.chunk-style. Elementwise math (momentum, AdamW, weight decay) is exact on the local
# block. Orthogonalization needs whole matrices: every matrix gets one owner rank, one
# all_to_all per shape bucket brings the owner the other ranks' row blocks, and a second one sends
# the orthogonalized rows back. 3D parameters are sharded on the batch dim, so their matrices are
# already whole on each rank and are orthogonalized where they live.

def share_work(keys, sizes, world):
    """Split matrices among ranks. Same-key (same-shape) matrices form a bucket that is
    orthogonalized in one batched call; each bucket is cut into up to `world` strided chunks and
    chunks go to the least-loaded rank, largest first. Both distributed paths use it (all_gather
    for plain tensors, all_to_all for FSDP2 shards), so they balance alike. Deterministic, so every
    rank computes the same plan. Returns (buckets, chunks, owner of each chunk, load per rank);
    buckets and chunks are lists of indices into keys."""
    buckets = {}
    for i, k in enumerate(keys):
        buckets.setdefault(k, []).append(i)
    chunks = [idx[k::world] for idx in buckets.values() for k in range(min(world, len(idx)))]
    owner, load = [0] * len(chunks), [0] * world
    for c in sorted(range(len(chunks)), key=lambda c: -len(chunks[c]) * sizes[chunks[c][0]]):
        owner[c] = min(range(world), key=lambda r: load[r])
        load[owner[c]] += len(chunks[c]) * sizes[chunks[c][0]]
    return list(buckets.values()), chunks, owner, load


def _param_name(group, group_index, i):
    name = f" ({group['name']!r})" if "name" in group else ""
    return f"parameter {i} of param group {group_index}{name}"


def is_sharded(t):
    """True for a DTensor (FSDP2 parameter, its grad or its optimizer state). Looked up in
    sys.modules: a DTensor exists only once torch.distributed.tensor is imported, and importing it
    here would add ~0.7 s to every `import muon_optim`."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def local_part(t):
    """The local block of a DTensor (an alias: in-place ops on it update the DTensor), else t."""
    return t.to_local() if is_sharded(t) else t


def matrix_shape(shape):
    """Global shape of the matrix view (as_matrices) of a parameter of this shape."""
    shape = tuple(shape)
    return (shape[0], math.prod(shape[1:])) if len(shape) >= 4 else shape


def chunk_rows(n_rows, world):
    """Rows held by each rank when n_rows are split the way FSDP2 does (torch.chunk: chunks of
    ceil(n/world) rows, the last ones short or empty): 7 rows on 2 ranks are 4 + 3, 3 on 4 are
    1 + 1 + 1 + 0."""
    size = -(-n_rows // world) if world else 0
    return [max(0, min(size, n_rows - r * size)) for r in range(world)]


def shard_layout(p):
    """(process group, group size, rank in group) of the mesh dim that shards p's dim 0, or
    (None, 1, 0) for a fully replicated DTensor. Anything but FSDP2's layout (Shard(0) on one mesh
    dim, Replicate() on the others) is an error: row blocks are what the exchange moves."""
    from torch.distributed.tensor import Replicate, Shard
    shard_dims = [d for d, pl in enumerate(p.placements) if not isinstance(pl, Replicate)]
    if any(not (isinstance(p.placements[d], Shard) and p.placements[d].dim == 0) for d in shard_dims) \
            or len(shard_dims) > 1:
        raise ValueError(f"Muon supports DTensor parameters laid out like FSDP2's: Shard(0) on one mesh dim and "
                         f"Replicate() on the others; got placements {tuple(p.placements)} for a parameter of "
                         f"shape {tuple(p.shape)}. Shard with torch.distributed.fsdp.fully_shard (default "
                         "shard_placement_fn), or pass plain tensors.")
    if not shard_dims:
        return None, 1, 0
    mesh, d = p.device_mesh, shard_dims[0]
    return mesh.get_group(d), mesh.size(d), mesh.get_local_rank(d)


def check_sharded_param(p, group, distributed, where):
    """Reject, when the optimizer is built, the sharded setups Muon cannot run: foreign
    placements, a sphere retraction that normalizes along the sharded dim 0 (its norm would need
    every rank's rows), and a single-device wrapper over a parameter spread across ranks."""
    _, world, _ = shard_layout(p)
    if world > 1 and not distributed:
        raise ValueError(f"{where} (shape {tuple(p.shape)}) is a DTensor sharded over {world} ranks, but this "
                         "optimizer was built with distributed=False (SingleDeviceMuon*): use Muon / MuonWithAuxAdam.")
    if world > 1 and group.get("sphere") is not None and group["sphere_dim"] % p.ndim == 0:
        raise ValueError(f"{where} (shape {tuple(p.shape)}): sphere={group['sphere']!r} with sphere_dim="
                         f"{group['sphere_dim']} normalizes along dim 0, which FSDP2 shards across ranks. Use a "
                         "sphere_dim other than 0 (e.g. -1; rows are whole on every rank), or keep this parameter "
                         "out of fully_shard (ignored_params).")


def param_signature(p):
    """What must agree across ranks for the step's collectives to line up."""
    return (tuple(p.shape), str(p.dtype), tuple(str(pl) for pl in p.placements) if is_sharded(p) else ())


def sharded_zeros(p, shape, replicate=False, dtype=torch.float32):
    """Zeros of global `shape` laid out like p: rows (dim 0) sharded as p's dim 0 is, or
    replicated on every mesh dim. A DTensor, so torch.distributed.checkpoint can reshard it."""
    from torch.distributed.tensor import DTensor, Replicate
    if replicate:
        placements, local_shape = [Replicate()] * p.device_mesh.ndim, list(shape)
    else:
        placements, local_shape = list(p.placements), [local_part(p).shape[0], *shape[1:]]
    stride = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    local = torch.zeros(local_shape, dtype=dtype, device=local_part(p).device)
    return DTensor.from_local(local, p.device_mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=tuple(stride))


def _flat_cat(tensors, dtype, device):
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.empty(0, dtype=dtype, device=device)


def exchange(pieces, recv_sizes, group, dtype, device):
    """One all_to_all: pieces[d] (any shape) goes to rank d; returns the flat blocks received from
    each rank and the number of bytes this rank sent to others."""
    send = _flat_cat(pieces, dtype, device).to(dtype)
    recv = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
    send_sizes = [t.numel() for t in pieces]
    dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=group)
    rank = dist.get_rank(group)
    sent = (sum(send_sizes) - send_sizes[rank]) * send.element_size()
    return list(recv.split(recv_sizes)), sent


def orthogonalize_row_sharded(blocks, shape, owners, group, world, rank, method, steps, dtype):
    """Orthogonalize K same-shape (m, n) matrices whose rows are spread across `world` ranks
    (torch.chunk blocks; `blocks` are this rank's (rows, n) blocks in bucket order). Matrix j is
    orthogonalized by rank owners[j]: all_to_all #1 sends each owner its matrices' blocks, the
    owner stacks and orthogonalizes its share in one batched call, all_to_all #2 returns the rows.
    Two collectives per bucket whatever K is, and each rank moves (world-1)/world of its blocks
    twice. Returns (this rank's (rows, n) result blocks, the owner's full results (k, m, n) or
    None, bytes sent)."""
    m, n = shape
    rows = chunk_rows(m, world)
    starts = [sum(rows[:r]) for r in range(world)]
    device = blocks[0].device
    out_dtype = dtype or default_ns_dtype(device, shape)
    mine = [j for j, o in enumerate(owners) if o == rank]
    pieces = [_flat_cat([blocks[j] for j, o in enumerate(owners) if o == d], blocks[0].dtype, device)
              for d in range(world)]
    got, sent1 = exchange(pieces, [len(mine) * rows[s] * n for s in range(world)], group, blocks[0].dtype, device)
    full = None
    if mine:
        full = torch.cat([g.view(len(mine), rows[s], n) for s, g in enumerate(got)], dim=1)
        full = orthogonalize(full, method, steps, dtype)
    back = [full[:, starts[d]:starts[d] + rows[d]] if mine else torch.empty(0, device=device) for d in range(world)]
    counts = [owners.count(s) for s in range(world)]
    got, sent2 = exchange(back, [counts[s] * rows[rank] * n for s in range(world)], group, out_dtype, device)
    result = [None] * len(owners)
    for s in range(world):
        for block, j in zip(got[s].view(counts[s], rows[rank], n), [j for j, o in enumerate(owners) if o == s]):
            result[j] = block
    return result, full, sent1 + sent2


def normuon_normalize_row_sharded(O, second_moments, shape, beta2, group, eps=1e-10):
    """normuon_normalize for K (m, n) matrices of which this rank holds rows O (K, rows, n).
    Tall (m >= n): the statistic is per row, so second_moments are row blocks sharded like the
    parameter and the update is local. Wide: it is per column, averaged over the sharded rows, so
    one all_reduce sums the column squares and second_moments (1, n) are replicated (n floats per
    matrix). Either way the Frobenius rescale needs global norms; they ride in the same single
    all_reduce. Updates second_moments (local tensors) in place."""
    m, n = shape
    O = O.float()
    if m >= n:
        for v, o in zip(second_moments, O):
            v.lerp_(o.square().mean(dim=-1, keepdim=True), 1 - beta2)
        V = torch.stack(second_moments).add(eps)
        N = O * V.rsqrt()
        sums = torch.stack([O.square().sum(dim=(-2, -1)), N.square().sum(dim=(-2, -1))], dim=-1)
        if group is not None:
            dist.all_reduce(sums, group=group)
        norm_o, norm_n = sums.unbind(-1)
    else:
        cols = O.square().sum(dim=-2, keepdim=True)  # (K, 1, n)
        if group is not None:
            dist.all_reduce(cols, group=group)
        for v, c in zip(second_moments, cols):
            v.lerp_(c / m, 1 - beta2)
        V = torch.stack(second_moments).add(eps)
        N = O * V.rsqrt()
        norm_o, norm_n = cols.sum(dim=(-2, -1)), (cols / V).sum(dim=(-2, -1))
    return N * (norm_o.sqrt() / norm_n.sqrt().clamp_min(1e-30)).view(-1, 1, 1)


def stat_sums(O):
    """Per matrix of O (..., m, n): [sum of squares, entries, ||gram - I||_F^2], summable across
    ranks and batch entries into _record_stats' update RMS and orthogonality error."""
    O = O.float()
    k = min(O.shape[-2:])
    gram = O @ O.mT if O.size(-2) <= O.size(-1) else O.mT @ O
    err = (gram - torch.eye(k, device=O.device)).square().sum(dim=(-2, -1))
    return torch.stack([O.square().sum(dim=(-2, -1)), torch.full_like(err, O.size(-2) * O.size(-1)), err], -1)


def describe_rank_mismatch(signatures, groups):
    """The error for ranks whose optimizers disagree: the first differing param group or
    parameter, what each rank has, and the fix. signatures[r] is rank r's list of
    (group index, use_muon, [param_signature...])."""
    ref = signatures[0]
    for r, sig in enumerate(signatures[1:], 1):
        if len(sig) != len(ref):
            problem = f"rank 0 has {len(ref)} param groups, rank {r} has {len(sig)}"
            break
        found = None
        for (gi, muon0, ps0), (_, muon1, ps1) in zip(ref, sig):
            where = _param_name(groups[gi], gi, 0).split(" of ", 1)[1] if gi < len(groups) else f"param group {gi}"
            if muon0 != muon1:
                found = f"{where} has use_muon={muon0} on rank 0 but {muon1} on rank {r}"
            elif len(ps0) != len(ps1):
                found = f"{where} has {len(ps0)} parameters on rank 0 but {len(ps1)} on rank {r}"
            else:
                diff = [i for i, (a, b) in enumerate(zip(ps0, ps1)) if a != b]
                if diff:
                    i = diff[0]
                    found = (f"parameter {i} of {where}: rank 0 has (shape, dtype, placements) {ps0[i]}, "
                             f"rank {r} has {ps1[i]}")
            if found:
                break
        if found:
            problem = found
            break
    else:
        problem = "the parameter signatures differ"
    return (f"Muon.step: ranks disagree on the parameters to optimize ({problem}). Every rank must build the "
            "optimizer over the same parameters, in the same order, with the same shapes, dtypes and sharding "
            "(same model code and fully_shard calls on every rank).")


def sharded_comm_bytes(shapes, world, elem_size=4, ns_elem_size=None):
    """Bytes all ranks together send per step to orthogonalize FSDP-sharded matrices of these
    (global) shapes: each 2D / conv (m, n) matrix moves the rows its owner lacks,
    (world-1)/world of them on average (exactly when world divides m), there in the param dtype
    and back in the NS dtype; 3D parameters (sharded on the batch dim) move nothing. NorMuon adds one
    small all_reduce per bucket (2 floats per matrix, or n for a wide one) that is not counted."""
    ns_elem_size = ns_elem_size or elem_size
    total = 0
    for s in shapes:
        if len(s) == 3 or world == 1:
            continue
        m, n = matrix_shape(s)
        total += m * (world - 1) / world * n * (elem_size + ns_elem_size)
    return total


# -----------------------------------------------------------------------------
# The optimizer

MUON_DEFAULTS = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, ns_method="newton_schulz",
                     ns_steps=5, ns_dtype=None, scale="original", cautious_wd=False, normuon=None,
                     sphere=None, sphere_dim=-1, proj_every=1)
ADAM_DEFAULTS = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0, cautious_wd=False,
                     sphere=None, sphere_dim=-1, proj_every=1)
OPTIONAL_KEYS = {"use_muon", "name", "initial_lr"}  # name: for logging; initial_lr: set by LR schedulers


class Muon(torch.optim.Optimizer):
    """Muon for >= 2D hidden weights, with auxiliary AdamW groups, in one code path.

    Muon(params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0, ...) takes a parameter list
    or param groups; a group with use_muon=False is bias-corrected AdamW (lr, betas, eps,
    weight_decay). Muon group options (defaults in MUON_DEFAULTS):
      ns_method   'newton_schulz' | 'polar_express' | 'gram_newton_schulz';  ns_steps;
      ns_dtype    compute dtype of the iteration (None: default_ns_dtype, by device, CPU and size);
      scale       'original' | 'match_adamw' | 'spectral'  (see shape_scale);
      cautious_wd decay only where update and weight agree in sign;
      normuon     None, or beta2 (e.g. 0.95) for NorMuon's per-neuron normalization;
      sphere      None | 'project' | 'geodesic' | 'geodesic_scaled' with sphere_dim, proj_every
                  (weights kept on unit spheres along sphere_dim, as in nGPT; also for Adam groups).
    When torch.distributed is initialized with world size > 1 (and distributed=True), each rank
    orthogonalizes a share of the matrices and the results are all-gathered; gradients must
    already be averaged (DDP). Every rank keeps every buffer, so state_dicts are complete and
    identical. FSDP2 parameters (fully_shard: DTensors, Shard(0); HSDP meshes too) need nothing
    else: each rank keeps only its rows of every buffer (DTensors, which torch.distributed.checkpoint
    reshards), owners orthogonalize whole matrices fetched by all_to_all (see 'Sharded parameters');
    plain and sharded parameters may be mixed. Ranks whose parameters disagree get an error, not a hang. track_stats=True records each matrix's update RMS and orthogonality error (read
    with .stats(), which is the only place that syncs with the device)."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, *,
                 distributed=True, track_stats=False, **muon_options):
        unknown = set(muon_options) - set(MUON_DEFAULTS)
        if unknown:
            raise TypeError(f"Muon got unknown option(s) {sorted(unknown)}; allowed: {sorted(MUON_DEFAULTS)}")
        defaults = dict(MUON_DEFAULTS, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        **muon_options)
        self.distributed = distributed
        self.track_stats = track_stats
        self._stats = {}
        self._muon_defaults = defaults
        super().__init__(params, {})  # defaults are applied per group kind in add_param_group
        # torch's schedulers read optimizer.defaults (OneCycleLR/CyclicLR look for "momentum" there)
        self.defaults = dict(defaults)

    def __getstate__(self):  # copy.deepcopy / pickle keep the options that are not param-group keys
        return dict(super().__getstate__(), distributed=self.distributed, track_stats=self.track_stats,
                    _muon_defaults=self._muon_defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._stats = {}

    def add_param_group(self, group):
        group = dict(group)
        use_muon = group.setdefault("use_muon", True)
        defaults = self._muon_defaults if use_muon else ADAM_DEFAULTS
        allowed = set(defaults) | OPTIONAL_KEYS | {"params"}
        unknown = set(group) - allowed
        if unknown:
            kind = "Muon (use_muon=True)" if use_muon else "AdamW (use_muon=False)"
            raise ValueError(f"param group key(s) {sorted(unknown)} are not valid for a {kind} group; "
                             f"allowed keys: {sorted(allowed)}")
        for k, v in defaults.items():
            group.setdefault(k, v)
        params = [group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"])
        if use_muon:
            for p in params:
                if p.ndim < 2:
                    name = f" {group['name']!r}" if "name" in group else ""
                    raise ValueError(f"Muon group{name} holds a parameter of shape {tuple(p.shape)}: Muon "
                                     "orthogonalizes matrices (>= 2D). Put 0D/1D parameters (biases, gains, "
                                     "scalars) in an AdamW group: dict(params=..., use_muon=False), "
                                     "or build the groups with muon_param_groups(model).")
            if group["sphere"] is not None and group["sphere"] not in ("project", "geodesic", "geodesic_scaled"):
                raise ValueError(f"unknown sphere mode {group['sphere']!r}")
            if group["ns_method"] not in ORTHOGONALIZERS:
                raise ValueError(f"unknown ns_method {group['ns_method']!r}; choose one of {sorted(ORTHOGONALIZERS)}")
            shape_scale((1, 1), group["scale"])
        for i, p in enumerate(params):
            if is_sharded(p):
                check_sharded_param(p, group, self.distributed, _param_name(group, len(self.param_groups), i))
        group["params"] = params
        saved, self.defaults = self.defaults, {}  # every key is set above; torch must not add Muon keys to AdamW
        try:
            super().add_param_group(group)
        finally:
            self.defaults = saved

    def load_state_dict(self, state_dict):
        """torch's load_state_dict, plus two checks torch does not make: groups are matched by
        position, so a checkpoint whose groups come in another order would silently swap Muon and
        AdamW state; each loaded group's kind and state shapes must match. NorMuon's second moment
        stays fp32 (torch casts all state to the parameter's dtype)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the checkpoint has {len(saved_groups)} param groups, this optimizer "
                             f"{len(self.param_groups)}: build the groups as when it was saved")
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            name = group.get("name", f"group {i}")
            kind = lambda muon: "Muon" if muon else "AdamW"  # noqa: E731
            if saved.get("use_muon", True) != group["use_muon"]:
                raise ValueError(f"param group {i} ({name!r}) is {kind(group['use_muon'])} here but "
                                 f"{kind(saved.get('use_muon', True))} in the checkpoint: groups are matched by "
                                 "position, pass them in the order they had when the state was saved")
            for index, p in zip(saved["params"], group["params"]):
                for key, value in state_dict["state"].get(index, {}).items():
                    if key in ("momentum_buffer", "exp_avg", "exp_avg_sq") and tuple(value.shape) != tuple(p.shape):
                        raise ValueError(f"param group {i} ({name!r}): checkpoint state {key!r} has shape "
                                         f"{tuple(value.shape)} but the parameter has shape {tuple(p.shape)}: "
                                         "the groups or their parameter order differ from the saved optimizer")
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if "second_moment" in state:
                state["second_moment"] = state["second_moment"].float()

    # -- distributed helpers --------------------------------------------------
    def _world(self):
        if self.distributed and dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def _agree_on_params(self, world):
        """Per group, the parameters to update this step, agreed on by all ranks with one small
        all_gather per step: (group count, parameter count, hash of every shape/dtype/placement,
        hash of the has-grad mask). A rank whose parameters differ gets a clear error naming the
        first differing parameter on every rank (instead of a collective that never completes).
        If only the masks differ, one all_reduce agrees on them: a plain parameter is skipped on
        every rank if any rank lacks its grad (as with DDP); a sharded one missing its grad on
        some ranks only is an error, since those ranks' rows would get no update."""
        groups = self.param_groups
        masks = [[p.grad is not None for p in g["params"]] for g in groups]
        if world > 1:
            params = [p for g in groups for p in g["params"]]
            sigs = [(gi, bool(g["use_muon"]), [param_signature(p) for p in g["params"]]) for gi, g in enumerate(groups)]
            device = params[0].grad.device if params and params[0].grad is not None else (
                local_part(params[0]).device if params else torch.device("cpu"))
            header = torch.tensor([len(groups), len(params), zlib.crc32(repr(sigs).encode()),
                                   zlib.crc32(repr(masks).encode())], dtype=torch.int64, device=device)
            gathered = [torch.empty_like(header) for _ in range(world)]
            dist.all_gather(gathered, header)
            table = torch.stack(gathered).cpu()
            if (table[:, :3] != table[0, :3]).any():
                everyone = [None] * world
                dist.all_gather_object(everyone, sigs)
                raise RuntimeError(describe_rank_mismatch(everyone, groups))
            if (table[:, 3] != table[0, 3]).any():
                flat = torch.tensor([h for m in masks for h in m], dtype=torch.int32, device=device)
                both = torch.cat([flat, -flat])
                dist.all_reduce(both, op=dist.ReduceOp.MIN)
                lo, hi = both[:len(flat)].tolist(), (-both[len(flat):]).tolist()
                k = 0
                for gi, g in enumerate(groups):
                    for i, p in enumerate(g["params"]):
                        if is_sharded(p) and lo[k] != hi[k]:
                            raise RuntimeError(f"Muon.step: {_param_name(g, gi, i)} (shape {tuple(p.shape)}, sharded) "
                                               "has a gradient on some ranks but not on others; every rank must "
                                               "run backward through it (or zero_grad it on all ranks).")
                        masks[gi][i] = bool(lo[k])
                        k += 1
        return [[p for p, h in zip(g["params"], m) if h] for g, m in zip(groups, masks)]

    def _orthogonalize_all(self, group, inputs, world, rank):
        """Orthogonalize every input. Same-shape matrices are stacked into one batched call (one
        launch and larger matmuls instead of many small ones). With several ranks each bucket is
        split into up to `world` chunks, chunks go to the least-loaded rank (largest first), and one
        all_gather shares the results; with one rank the same code runs without the gather."""
        mats = [as_matrices(x) for x in inputs]
        # stacking needs one shape, device and dtype
        keys = [(tuple(m.shape), m.device, m.dtype) for m in mats]
        _, chunks, owner, load = share_work(keys, [m.numel() for m in mats], world)
        outputs = [None] * len(mats)
        mine = [c for c in range(len(chunks)) if owner[c] == rank]
        for c in mine:
            idx = chunks[c]
            stacked = mats[idx[0]].unsqueeze(0) if len(idx) == 1 else torch.stack([mats[i] for i in idx])
            O = orthogonalize(stacked, group["ns_method"], group["ns_steps"], group["ns_dtype"])
            for j, i in enumerate(idx):
                outputs[i] = O[j]
        if world == 1:
            return outputs
        devices = {m.device for m in mats}
        if len(devices) > 1:
            raise ValueError(f"Muon group {group.get('name', '')!r} holds parameters on {sorted(map(str, devices))}: "
                             "with torch.distributed each rank's Muon parameters must share one device")
        dtypes = {group["ns_dtype"] or default_ns_dtype(m.device, m.shape) for m in mats}
        dtype = torch.bfloat16 if dtypes == {torch.bfloat16} else torch.float32  # the same on every rank
        buf = torch.zeros(max(load), dtype=dtype, device=mats[0].device)  # all_gather wants equal sizes
        offset = 0
        for c in mine:  # this rank's results, in chunk order
            for i in chunks[c]:
                buf[offset:offset + mats[i].numel()] = outputs[i].reshape(-1)
                offset += mats[i].numel()
        gathered = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(gathered, buf)
        self.comm_bytes += (world - 1) * buf.numel() * buf.element_size()
        offsets = [0] * world
        for c in range(len(chunks)):
            r = owner[c]
            for i in chunks[c]:
                outputs[i] = gathered[r][offsets[r]:offsets[r] + mats[i].numel()].view(mats[i].shape)
                offsets[r] += mats[i].numel()
        return outputs

    # -- the step ----------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        world, rank = self._world()
        if self.track_stats:
            self._stats = {}  # stats() covers this step's matrices only
        self.comm_bytes = 0  # bytes this rank sent to other ranks in this step (bench.py reports it)
        for group, params in zip(self.param_groups, self._agree_on_params(world)):
            if not params:
                continue
            if group["use_muon"]:
                updates = self._muon_directions(group, params, world, rank)
            else:
                updates = self._adam_directions(group, params)
            for p, (u, scale) in zip(params, updates):
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                apply_update(local_part(p), u, group["lr"], group["weight_decay"], group["cautious_wd"], group["sphere"],
                             group["sphere_dim"], group["proj_every"], state["step"], scale)
        return loss

    def _muon_directions(self, group, params, world, rank):
        if any(is_sharded(p) for p in params):  # FSDP2 parameters, possibly mixed with plain ones
            plain = [p for p in params if not is_sharded(p)]
            sharded = [p for p in params if is_sharded(p)]
            out = dict(zip(map(id, plain), self._muon_directions(group, plain, world, rank) if plain else []))
            out.update(zip(map(id, sharded), self._sharded_muon_directions(group, sharded)))
            return [out[id(p)] for p in params]
        inputs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            inputs.append(momentum_direction(p.grad, state["momentum_buffer"], group["momentum"], group["nesterov"]))
        directions = []
        for p, O in zip(params, self._orthogonalize_all(group, inputs, world, rank)):
            if self.track_stats:
                self._record_stats(p, O)
            if group["normuon"]:
                state = self.state[p]
                if "second_moment" not in state:
                    state["second_moment"] = normuon_buffer(O)
                O = normuon_normalize(O, state["second_moment"], group["normuon"])
            directions.append((O.view(p.shape), shape_scale(O.shape, group["scale"])))
        return directions

    def _sharded_muon_directions(self, group, params):
        """Muon directions for DTensor (FSDP2) parameters, as local blocks: momentum on the local
        rows; whole matrices (3D parameters, sharded on the batch dim, or unsharded layouts)
        orthogonalized where they are; row-sharded 2D / conv matrices bucketed by shape and
        exchanged with their owners (orthogonalize_row_sharded); NorMuon with global statistics;
        the scale of the GLOBAL matrix shape."""
        method, steps, ns_dtype = group["ns_method"], group["ns_steps"], group["ns_dtype"]
        layouts = [shard_layout(p) for p in params]
        inputs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            inputs.append(momentum_direction(local_part(p.grad), local_part(state["momentum_buffer"]),
                                             group["momentum"], group["nesterov"]))
        O, sums = [None] * len(params), {}
        whole = [i for i, p in enumerate(params) if p.ndim == 3 or layouts[i][1] == 1]
        by_shape = {}
        for i in whole:
            by_shape.setdefault((matrix_shape(params[i].shape)[-2:], inputs[i].dtype), []).append(i)
        for (shape, _), idx in by_shape.items():
            mats = [as_matrices(inputs[i]).reshape(-1, *shape) for i in idx]
            stacked = torch.cat(mats)
            res = (orthogonalize(stacked, method, steps, ns_dtype) if stacked.size(0)
                   else stacked.to(ns_dtype or default_ns_dtype(stacked.device, stacked.shape)))
            for i, r in zip(idx, res.split([x.size(0) for x in mats])):
                O[i] = r
                if self.track_stats:
                    sums[i] = stat_sums(r).sum(0)
                if group["normuon"]:
                    v = self._sharded_normuon_state(params[i])
                    O[i] = normuon_normalize(r, v.view(*r.shape[:-2], *v.shape[-2:]), group["normuon"])
        rowed = {}
        for i in range(len(params)):
            if i not in whole:
                rowed.setdefault(id(layouts[i][0]), []).append(i)
        for idx in rowed.values():
            pg, world, rank = layouts[idx[0]]
            keys = [(matrix_shape(params[i].shape), inputs[i].dtype) for i in idx]
            buckets, chunks, owner, _ = share_work(keys, [math.prod(k[0]) for k in keys], world)
            owner_of = {j: owner[c] for c, chunk in enumerate(chunks) for j in chunk}
            for bucket in buckets:
                shape = keys[bucket[0]][0]
                blocks = [as_matrices(inputs[idx[j]]) for j in bucket]
                for j, b in zip(bucket, blocks):
                    if b.size(0) != chunk_rows(shape[0], world)[rank]:
                        raise RuntimeError(f"Muon: a parameter of shape {tuple(params[idx[j]].shape)} holds {b.size(0)} "
                                           f"rows on rank {rank} of {world}, expected {chunk_rows(shape[0], world)} "
                                           "(torch.chunk split, as fully_shard does); reshard with fully_shard.")
                owners = [owner_of[j] for j in bucket]
                res, full, sent = orthogonalize_row_sharded(blocks, shape, owners, pg, world, rank, method, steps,
                                                            ns_dtype)
                self.comm_bytes += sent
                if self.track_stats:
                    owned = iter(stat_sums(full) if full is not None else [])
                    for j, o in zip(bucket, owners):
                        sums[idx[j]] = next(owned) if o == rank else torch.zeros(3, device=res[0].device)
                if group["normuon"]:
                    moments = [local_part(self._sharded_normuon_state(params[idx[j]])) for j in bucket]
                    res = normuon_normalize_row_sharded(torch.stack(res), moments, shape, group["normuon"], pg)
                for j, r in zip(bucket, res):
                    O[idx[j]] = r
        if self.track_stats:
            self._record_sharded_stats(params, layouts, sums)
        return [(o.view(local_part(p).shape), shape_scale(matrix_shape(p.shape)[-2:], group["scale"]))
                for p, o in zip(params, O)]

    def _sharded_normuon_state(self, p):
        """NorMuon's second moment for a DTensor parameter (a DTensor, so checkpoints reshard):
        per row of each matrix (tall) sharded like p's rows; per column (wide) of a row-sharded
        matrix replicated, n floats, since its statistic averages over the sharded rows."""
        state = self.state[p]
        if "second_moment" not in state:
            shape = list(matrix_shape(p.shape))
            short = _short_axis(shape)
            shape[short] = 1
            state["second_moment"] = sharded_zeros(p, shape, replicate=p.ndim != 3 and short == -2)
        return local_part(state["second_moment"])

    def _record_sharded_stats(self, params, layouts, sums):
        """track_stats for DTensor parameters: the per-rank partial sums (owners hold whole
        matrices, 3D shards their batch slice) are summed with one all_reduce per process group."""
        by_group = {}
        for i, (pg, world, _) in enumerate(layouts):
            by_group.setdefault(id(pg) if world > 1 else None, []).append(i)
        for key, idx in by_group.items():
            t = torch.stack([sums[i] for i in idx])
            if key is not None:
                dist.all_reduce(t, group=layouts[idx[0]][0])
            for row, i in zip(t, idx):
                k = min(matrix_shape(params[i].shape)[-2:])
                self._stats[params[i]] = ((row[0] / row[1]).sqrt(), row[2].sqrt() / math.sqrt(k))

    def _adam_directions(self, group, params):
        directions = []
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            step = state.get("step", 0) + 1
            directions.append((adam_update(local_part(p.grad), local_part(state["exp_avg"]),
                                           local_part(state["exp_avg_sq"]), step, group["betas"], group["eps"]), 1.0))
        return directions

    # -- diagnostics ----------------------------------------------------------------
    def _record_stats(self, p, O):
        O = O.float()
        k = min(O.shape[-2:])
        gram = O @ O.mT if O.size(-2) <= O.size(-1) else O.mT @ O  # the small k x k side
        eye = torch.eye(k, device=O.device)
        self._stats[p] = (O.square().mean().sqrt(), (gram - eye).norm() / math.sqrt(k))

    def stats(self):
        """Per Muon matrix of the last step: {'shape', 'update_rms' (of the orthogonalized update,
        before lr and scale), 'ortho_error' (||O^T O - I||_F / sqrt(k))}. Needs track_stats=True."""
        names = {p: g.get("name", f"group{i}") for i, g in enumerate(self.param_groups) for p in g["params"]}
        return [dict(group=names[p], shape=tuple(p.shape), update_rms=rms.item(), ortho_error=err.item())
                for p, (rms, err) in self._stats.items()]


def _require_use_muon(param_groups):
    param_groups = list(param_groups)
    for g in param_groups:
        if not isinstance(g, dict) or "use_muon" not in g:
            raise ValueError("MuonWithAuxAdam takes a list of param-group dicts, each with use_muon=True "
                             "(Muon: lr, momentum, weight_decay) or use_muon=False (AdamW: lr, betas, eps, "
                             "weight_decay)")
    return param_groups


class MuonWithAuxAdam(Muon):
    """KellerJordan/Muon-compatible: MuonWithAuxAdam([dict(params=..., use_muon=True, lr=0.02,
    weight_decay=0.01), dict(params=..., use_muon=False, lr=3e-4, betas=(0.9, 0.95))])."""

    def __init__(self, param_groups, **kwargs):
        super().__init__(_require_use_muon(param_groups), **kwargs)


class SingleDeviceMuon(Muon):
    """KellerJordan/Muon-compatible single-device Muon (never uses torch.distributed)."""

    def __init__(self, params, lr=0.02, weight_decay=0.0, momentum=0.95, **kwargs):
        super().__init__(params, lr=lr, weight_decay=weight_decay, momentum=momentum, distributed=False, **kwargs)


class SingleDeviceMuonWithAuxAdam(Muon):
    """KellerJordan/Muon-compatible single-device Muon with AdamW groups (use_muon=False)."""

    def __init__(self, param_groups, **kwargs):
        super().__init__(_require_use_muon(param_groups), distributed=False, **kwargs)


# -----------------------------------------------------------------------------
# Parameter grouping

HEAD_NAMES = ("lm_head", "head", "classifier", "unembed", "output", "fc_out", "readout")


def _is_position_embedding(name):
    leaf = name.rsplit(".", 1)[-1].lower()
    return leaf in ("wpe", "pos", "pos_emb", "pos_embed", "pos_embedding", "position_embedding",
                    "position_embeddings", "positional_embedding") or leaf.startswith("pos")


def muon_param_groups(model, lr=0.02, weight_decay=0.0, adam_lr=3e-4, adam_betas=(0.9, 0.95), adam_eps=1e-10,
                      adam_weight_decay=0.0, head_names=HEAD_NAMES, **muon_options):
    """Split a model's parameters the way Muon is meant to be used: hidden >= 2D weights to Muon;
    embeddings (nn.Embedding / nn.EmbeddingBag weights), the output head and every < 2D parameter
    to AdamW. An embedding or head in the Muon group is the most common Muon misuse: their
    inputs/outputs are one-hot-like, not dense features.
    The head is a Linear that is tied to an embedding, or named like `head_names`, or the last
    Linear whose output size is the vocabulary (a token embedding's num_embeddings). Position
    embeddings (named like 'wpe', 'pos', 'position') do not define a vocabulary, and hidden layers
    that happen to have the vocabulary's width (an MLP of 4*d = 1024 with a 1024-token vocabulary)
    stay in Muon: only the last such Linear, the one closest to the output, is the head."""
    embed_ids, vocab_sizes = set(), set()
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
            embed_ids.add(id(m.weight))
            if not _is_position_embedding(name):
                vocab_sizes.add(m.num_embeddings)
    head_ids, last_vocab_sized = set(), {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            if name.rsplit(".", 1)[-1] in head_names or id(m.weight) in embed_ids:
                head_ids.add(id(m.weight))
            elif m.out_features in vocab_sizes:
                last_vocab_sized[m.out_features] = id(m.weight)
    if not head_ids:  # no named or tied head: the last vocabulary-sized Linear is the readout
        head_ids.update(last_vocab_sized.values())
    muon, embed, head, other, seen = [], [], [], [], set()
    for p in model.parameters():  # parameters() deduplicates tied weights
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in embed_ids:
            embed.append(p)
        elif id(p) in head_ids:
            head.append(p)
        elif p.ndim >= 2:
            muon.append(p)
        else:
            other.append(p)
    adam = dict(use_muon=False, lr=adam_lr, betas=adam_betas, eps=adam_eps, weight_decay=adam_weight_decay)
    groups = [dict(params=muon, use_muon=True, lr=lr, weight_decay=weight_decay, name="muon", **muon_options),
              dict(params=embed, name="embed", **adam), dict(params=head, name="head", **adam),
              dict(params=other, name="scalar", **adam)]
    return [g for g in groups if g["params"]]


# -----------------------------------------------------------------------------
# Self-check: python muon_optim.py

def _polar_factor(G):
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


def self_check(shapes=((128, 128), (512, 128), (768, 768), (768, 3072), (4, 256, 256)), repeats=3):
    """For each shape: the compute dtype chosen for it, singular-value range of the output and RMS
    error vs the exact SVD polar factor U V^T, for NS5 and Polar Express, and the median time per
    call on this device."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        why = "CUDA: bf16 (tensor cores)"
    else:
        fast, reason = cpu_fast_bf16()
        why = (f"CPU, {reason}: " + (f"bf16 for matrices with both sides >= {CPU_BF16_MIN_SIZE}, fp32 below"
                                     if fast else "fp32"))
    if NS_DTYPE is not None:
        why = f"muon_optim.NS_DTYPE = {NS_DTYPE}"
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"default compute dtype: {why}")
    print(f"{'shape':>16} {'dtype':>9} {'method':>14} {'sv min':>7} {'sv max':>7} {'err vs UV^T':>11} {'ms/call':>9}")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in shapes:
        G = torch.randn(*shape, generator=gen).to(device)
        ref = _polar_factor(G)
        dtype = default_ns_dtype(device, shape)
        for name, fn in (("newton_schulz", zeropower_via_newtonschulz5), ("polar_express", polar_express)):
            O = fn(G, dtype=dtype)
            times = []
            for _ in range(repeats):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn(G, dtype=dtype)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            sv = torch.linalg.svdvals(O.double())
            err = ((O.double() - ref).square().mean().sqrt() / ref.square().mean().sqrt()).item()
            ms = sorted(times)[len(times) // 2] * 1e3
            dt = str(dtype).replace("torch.", "")
            rows.append(dict(shape=shape, dtype=dt, method=name, sv_min=sv.min().item(), sv_max=sv.max().item(),
                             err=err, ms=ms))
            print(f"{str(tuple(shape)):>16} {dt:>9} {name:>14} {sv.min().item():7.3f} {sv.max().item():7.3f} "
                  f"{err:11.4f} {ms:9.2f}")
    return rows


if __name__ == "__main__":
    self_check()
