"""
bench.py -- what Muon's orthogonalization costs, how good it is, and what it buys.

    python bench.py                      # the four default sections
    python bench.py --quick=True         # fewer shapes and repeats
    python bench.py --only=speed,step    # any of: speed, quality, step, showdown, distributed, gpu, gpu_ns, trace,
                                         # gpu_step
    python bench.py --only=quality       # after copying muon_optim.py: its compute dtype, error and speed here
    python bench.py --only=trace         # the functions and lines of muon_optim.py one plain update runs
    OMP_NUM_THREADS=1 python bench.py --only=distributed   # DDP-style vs FSDP2 step at 1 and 2 ranks (gloo)
    python bench.py --threads=1          # torch CPU threads (default: torch's choice)
    python bench.py --gpu=True           # the GPU validation: tests/test_cuda.py + one table

Sections (each measured in one process, so the ratios inside a table are fair):
  speed     median ms per orthogonalization (NS5, Polar Express, Gram-NS; Triton/compiled on CUDA)
            for GPT-2-small and tiny-transformer shapes, FLOPs, achieved TFLOP/s and the ratio to
            a plain matmul of the same shape ("matmul bound"); plus Gram-NS vs NS5 by aspect ratio
  quality   singular-value range and ||O O^T - I|| after the iteration vs the exact SVD polar
            factor, for condition numbers 1e1..1e6; and the check to run after copying
            muon_optim.py: the compute dtype it picks here, per shape, with error and time per call
  step      optimizer step time on the 4 GPT-2-small layer matrices: our Muon (NS5, Gram-NS,
            +NorMuon) vs torch.optim.Muon vs torch.optim.AdamW
  showdown  10-layer 64-wide deep linear network: SGD vs Adam vs Muon (loss curves, final
            losses, singular-value spectra of weights and of a gradient vs its Muon update)
  distributed  (not in the default list) Muon step time per rank and bytes sent, plain tensors /
            DDP-style all_gather / FSDP2 all_to_all, at 1 and 2 ranks (gloo on CPU, NCCL on GPU)
  gpu       (not in the default list; --gpu=True) tests/test_cuda.py + one table of GPU numbers
  gpu_ns    (not in the default list; --gpu=True) NS5 with the Triton kernels vs torch by size
  gpu_step  (not in the default list; --gpu=True) the step on GPT-2 small's 48 matrices: eager vs
            Muon(capturable=True) eager, replayed in a CUDA graph and torch.compile'd, vs its matmul bound
  trace     (not in the default list) the code one plain Muon update runs: functions, their
            definition lines and the distinct lines executed (sys.settrace), against the goals
Writes out/bench/results.json (sections merge into an existing file), out/bench/results.md
(the markdown tables) and PNGs.
"""
import os

# On a shared CPU, OpenMP's default spin-waiting makes torch's 2-thread ops many times slower (a
# thread spins at a barrier while its partner is descheduled); sleeping waiters fix it. Must be set
# before torch loads OpenMP. Override by setting OMP_WAIT_POLICY yourself.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import copy
import json
import math
import platform
import shlex
import statistics
import sys
import time

import torch
from tqdm import tqdm

import muon_optim as mo

# -----------------------------------------------------------------------------
# settings, each overridable as --name=value
only = "speed,quality,step,showdown"  # comma list of: speed quality step showdown distributed gpu gpu_ns trace gpu_step
quick = False  # fewer shapes and repeats
gpu = False  # True: the GPU validation (tests/test_cuda.py + tables; needs CUDA), same as --only=gpu,gpu_ns,gpu_step
threads = 0  # 0: torch's default (all cores)
repeats = 5  # timed calls per case (fewer when one call takes long, see case_budget_s)
case_budget_s = 6.0  # rough wall-time budget per timed case on slow devices
label = ""  # machine label for the tables, e.g. "2-core CPU, shared/noisy"; default: detected
out_dir = "out/bench"
seed = 42
# -----------------------------------------------------------------------------
SECTIONS = ("speed", "quality", "step", "showdown", "distributed", "gpu", "gpu_ns", "trace", "gpu_step")


def parse_overrides(argv, defaults):
    """--name=value overrides of the constants at the top of a script (nanoGPT style): flags True/False, numbers
    parsed (--eval_tokens=1e5 is an int if whole), strings and comma lists as written. A wrong name or value
    stops with a message naming the choices; --help (or -h) prints every setting with its default and comment."""
    config = dict(defaults)
    for arg in argv:
        if arg in ("-h", "--help"):
            print(settings_help(defaults))
            raise SystemExit(0)
        key, eq, text = arg[2:].partition("=")
        if not arg.startswith("--") or not eq:
            raise SystemExit(f"bad argument {arg!r}: use --name=value (names: {', '.join(config)}; --help lists them)")
        if key not in config:
            raise SystemExit(f"unknown setting --{key}; known: {', '.join(config)}")
        default, value = config[key], text
        if isinstance(default, bool):
            if text not in ("True", "False"):
                raise SystemExit(f"--{key}={text}: expected True or False")
            value = text == "True"
        elif isinstance(default, (int, float)):
            try:
                value = float(text)
            except ValueError:
                raise SystemExit(f"--{key}={text}: expected a number") from None
            if isinstance(default, int) and not value.is_integer():
                raise SystemExit(f"--{key}={text}: expected a whole number")
            value = type(default)(value)
        config[key] = value
    return config


def settings_help(defaults):
    """Every setting as --name=default with the comment beside its constant at the top of this file."""
    comments = {}
    with open(__file__) as f:
        for name, eq, rest in (line.rstrip("\n").partition(" = ") for line in f):
            if eq and name in defaults and name not in comments:
                comments[name] = rest.split("  # ", 1)[1] if "  # " in rest else ""
    width = min(40, max(len(f"--{k}={v}") for k, v in defaults.items()))
    out = [f"python {os.path.basename(__file__)} [--name=value ...]  (flags True/False, lists comma-separated)"]
    return "\n".join(out + [f"  {f'--{k}={v}':<{width}}  {comments.get(k, '')}".rstrip() for k, v in defaults.items()])


if __name__ in ("__main__", "__mp_main__"):  # __mp_main__: a spawned worker (bench_distributed) runs this
    # file again with the parent's sys.argv, so it sees the same settings
    globals().update(parse_overrides(sys.argv[1:], {k: v for k, v in globals().items() if not k.startswith("_")
                                                    and isinstance(v, (bool, int, float, str))
                                                    and k in ("only", "quick", "gpu", "threads", "repeats",
                                                              "case_budget_s", "label", "out_dir", "seed")}))
    only = "gpu,gpu_ns,gpu_step" if gpu else only
wanted = [s.strip() for s in only.split(",") if s.strip()]
if not wanted or set(wanted) - set(SECTIONS):
    sys.exit(f"--only={only!r}: choose a comma-separated subset of {','.join(SECTIONS)}")
if threads > 0:
    torch.set_num_threads(threads)

device = "cuda" if torch.cuda.is_available() else "cpu"
if device == "cuda":
    machine = torch.cuda.get_device_name()
else:
    machine = (f"{os.cpu_count()}-core CPU ({platform.machine()}, {'with' if mo.cpu_fast_bf16()[0] else 'no'} fast "
               f"bf16 matmul), {torch.get_num_threads()} threads")
label = label or machine
os.makedirs(out_dir, exist_ok=True)


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns, n_repeats=None, warmup=1):
    """Median wall-clock ms per call of each fn, calls interleaved round-robin so that load from
    other processes hits every fn alike; also the median process CPU ms (all threads), which other
    processes on a shared CPU disturb much less. Long calls get fewer repeats (case_budget_s)."""
    first = {}
    for k, f in fns.items():
        for _ in range(warmup):
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            first[k] = time.perf_counter() - t0
    n = n_repeats or repeats
    if warmup and device == "cpu" and not n_repeats:
        n = max(1, min(n, int(case_budget_s / max(sum(first.values()), 1e-9))))
    times, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(n):
        for k, f in fns.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            sync()
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return {k: dict(ms=statistics.median(v) * 1e3, min_ms=min(v) * 1e3, max_ms=max(v) * 1e3, n=len(v),
                    cpu_ms=statistics.median(cpu[k]) * 1e3) for k, v in times.items()}


def md_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_shape(shape):
    return "x".join(map(str, shape))


def plt_module():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# -----------------------------------------------------------------------------
# 1. orthogonalization speed

GPT2_SHAPES = [(768, 768), (2304, 768), (3072, 768), (768, 3072)]
TINY_SHAPES = [(128, 128), (384, 128), (512, 128), (128, 512)]
BATCH_SHAPES = [(12, 768, 768)]


def plain_flops(B, m, n, steps=5):
    """NS5 / Polar Express on the wide orientation (m <= n): X X^T, A A, B X per step."""
    return B * steps * (4 * m * m * n + 2 * m ** 3)


def gram_flops(B, m, n, steps=5, restart_after=2):
    """gram_newton_schulz as written: per block of s steps R = X X^T and X = Q X (m x m x n),
    s polynomials, s-1 updates of Q and of R = R (P P^T) (m x m x m)."""
    if n < mo.GRAM_MIN_ASPECT * m:
        return plain_flops(B, m, n, steps)
    blocks = [restart_after] * (steps // restart_after)
    if steps % restart_after:  # a short last block joins the previous one (5 steps: 2 + 3)
        blocks[-1:] = [blocks[-1] + steps % restart_after] if blocks else [steps]
    return B * sum(2 * (2 * m * m * n) + 2 * m ** 3 * (s + (s - 1) + 2 * (s - 1)) for s in blocks)


def with_triton(fn, enabled):
    """fn with the Triton kernels forced on (at any size: the thresholds are what this measures) or off."""
    def call(G, **kw):
        saved = mo.USE_TRITON, mo.TRITON_MIN_WORK
        mo.USE_TRITON, mo.TRITON_MIN_WORK = enabled, 0
        try:
            return fn(G, **kw)
        finally:
            mo.USE_TRITON, mo.TRITON_MIN_WORK = saved
    return call


def orthogonalizers():
    """(name, fn, flops_fn). On CUDA: the torch-only and the Triton path, and torch.compile."""
    ms = [("NS5", mo.zeropower_via_newtonschulz5, plain_flops), ("Polar Express", mo.polar_express, plain_flops),
          ("Gram-NS", mo.gram_newton_schulz, gram_flops)]
    if device != "cuda":
        return ms
    out = [(name + " (torch)", with_triton(fn, False), fl) for name, fn, fl in ms]
    if mo.triton is not None:
        out += [("NS5 (Triton)", with_triton(mo.zeropower_via_newtonschulz5, True), plain_flops),
                ("Gram-NS (Triton)", with_triton(mo.gram_newton_schulz, True), gram_flops)]
    out.append(("NS5 (torch.compile)", torch.compile(with_triton(mo.zeropower_via_newtonschulz5, False)),
                plain_flops))
    return out


def bench_speed():
    shapes = GPT2_SHAPES + TINY_SHAPES + BATCH_SHAPES
    if quick:
        shapes = [(768, 768), (768, 3072), (384, 128), (128, 512)]
    cases = []
    for shape in shapes:
        if device == "cuda" or mo.cpu_fast_bf16()[0]:
            cases += [(shape, torch.bfloat16), (shape, torch.float32)]
        else:  # bf16 matmul on a CPU without AMX is emulated, far slower: only tiny shapes, to show it
            cases.append((shape, torch.float32))
            if max(shape) <= 512 and shape in (TINY_SHAPES[-1], TINY_SHAPES[1]):
                cases.append((shape, torch.bfloat16))
    methods = orthogonalizers()
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for shape, dtype in tqdm(cases, desc="speed", leave=False, mininterval=10):
        G = torch.randn(*shape, generator=gen).to(device)
        B = math.prod(shape[:-2])
        m, n = sorted(shape[-2:])
        Xw = torch.randn(B, m, n, generator=gen).to(device, dtype)
        fns = {name: (lambda f=fn: f(G, dtype=dtype)) for name, fn, _ in methods}
        fns["matmul"] = lambda: torch.bmm(Xw, Xw.mT)  # a plain m x n x m product: the device's matmul rate
        try:
            t = time_interleaved(fns)
        except Exception as e:  # e.g. torch.compile failing on this setup: report, time the rest
            print(f"  {fmt_shape(shape)} {dtype}: {type(e).__name__}: {e}; timing without torch.compile")
            t = time_interleaved({k: f for k, f in fns.items() if "compile" not in k})
        mm_rate = 2 * B * m * m * n / (t["matmul"]["ms"] / 1e3)  # FLOP/s
        ns5_ms = t[methods[0][0]]["ms"]
        for name, _, flops_fn in methods:
            if name not in t:
                continue
            flops = flops_fn(B, m, n)
            rows.append(dict(shape=list(shape), dtype=str(dtype).replace("torch.", ""), method=name,
                             ms=t[name]["ms"], min_ms=t[name]["min_ms"], max_ms=t[name]["max_ms"], n=t[name]["n"],
                             cpu_ms=t[name]["cpu_ms"],
                             gflop=flops / 1e9, tflops=flops / (t[name]["ms"] / 1e3) / 1e12,
                             bound_ms=flops / mm_rate * 1e3, x_bound=t[name]["ms"] / (flops / mm_rate * 1e3),
                             speedup_vs_ns5=ns5_ms / t[name]["ms"], matmul_tflops=mm_rate / 1e12))
    # Gram-NS vs NS5 by aspect ratio: where does working on the m x m Gram matrix start to pay?
    m = 256 if quick else 384
    sweep = []
    saved = mo.GRAM_MIN_ASPECT
    mo.GRAM_MIN_ASPECT = 1.0  # force the Gram path everywhere
    try:
        for r in tqdm((1, 1.5, 2, 2.5, 3, 4), desc="aspect", leave=False, mininterval=10):
            G = torch.randn(m, int(m * r), generator=gen).to(device)
            t = time_interleaved({"NS5": lambda: mo.zeropower_via_newtonschulz5(G),
                                  "Gram-NS": lambda: mo.gram_newton_schulz(G)})
            sweep.append(dict(m=m, n=int(m * r), aspect=r, ns5_ms=t["NS5"]["ms"], gram_ms=t["Gram-NS"]["ms"],
                              speedup=t["NS5"]["ms"] / t["Gram-NS"]["ms"],
                              cpu_speedup=t["NS5"]["cpu_ms"] / t["Gram-NS"]["cpu_ms"],
                              flop_ratio=plain_flops(1, m, int(m * r)) / gram_flops(1, m, int(m * r))))
    finally:
        mo.GRAM_MIN_ASPECT = saved
    cpu_col = device == "cpu"
    md = md_table(["shape", "dtype", "method", "ms"] + (["CPU ms"] if cpu_col else []) +
                  ["GFLOP", "TFLOP/s", "x matmul bound", "vs NS5"],
                  [[fmt_shape(r["shape"]), r["dtype"], r["method"], f"{r['ms']:.2f}"] +
                   ([f"{r['cpu_ms']:.1f}"] if cpu_col else []) +
                   [f"{r['gflop']:.3g}", f"{r['tflops']:.3f}", f"{r['x_bound']:.2f}", f"{r['speedup_vs_ns5']:.2f}x"]
                   for r in rows])
    md += ("\n\nms: median wall-clock per call (interleaved repeats, after warm-up); CPU ms: median process CPU "
           "time per call, summed over threads. GFLOP: dense-matmul FLOPs "
           "of the algorithm as written (a Triton path does the same work with half the FLOPs in its "
           "symmetric products, so its TFLOP/s is an effective rate). x matmul bound: ms / (GFLOP at the rate "
           "of one plain m x n x m matmul of the same shape and dtype on this device).\n\n")
    md += md_table(["m x n", "n/m", "NS5 ms", "Gram-NS ms (forced)", "Gram speedup (wall)", "(CPU time)", "FLOP ratio"],
                   [(f"{s['m']}x{s['n']}", s["aspect"], f"{s['ns5_ms']:.2f}", f"{s['gram_ms']:.2f}",
                     f"{s['speedup']:.2f}x", f"{s['cpu_speedup']:.2f}x", f"{s['flop_ratio']:.2f}x") for s in sweep])
    md += (f"\n\ngram_newton_schulz falls back to the plain iteration below n/m = {mo.GRAM_MIN_ASPECT} "
           "(muon_optim.GRAM_MIN_ASPECT); the table above forces the Gram path to show the crossover.")
    plot_speed(rows, sweep)
    return dict(rows=rows, aspect_sweep=sweep, md=md)


def plot_speed(rows, sweep):
    plt = plt_module()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw=dict(width_ratios=[2.2, 1]))
    main = [r for r in rows if r["dtype"] == ("bfloat16" if device == "cuda" else "float32")]
    shapes = list(dict.fromkeys(fmt_shape(r["shape"]) for r in main))
    methods = list(dict.fromkeys(r["method"] for r in main))
    w = 0.8 / len(methods)
    for j, meth in enumerate(methods):
        xs, ys, bounds = [], [], []
        for i, s in enumerate(shapes):
            for r in main:
                if fmt_shape(r["shape"]) == s and r["method"] == meth:
                    xs.append(i + (j - (len(methods) - 1) / 2) * w)
                    ys.append(r["ms"])
                    bounds.append(r["bound_ms"])
        ax.bar(xs, ys, w, label=meth)
        ax.scatter(xs, bounds, marker="_", color="k", s=120, zorder=3, label="matmul bound" if j == 0 else None)
    ax.set_xticks(range(len(shapes)), shapes, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per orthogonalization (median)")
    ax.set_title(f"orthogonalization time, {main[0]['dtype'] if main else ''} [{label}]", fontsize=9)
    ax.legend(fontsize=7)
    ax2.plot([s["aspect"] for s in sweep], [s["speedup"] for s in sweep], "o-", label="measured")
    ax2.plot([s["aspect"] for s in sweep], [s["flop_ratio"] for s in sweep], "k--", label="FLOP ratio")
    ax2.axhline(1.0, color="gray", lw=0.8)
    ax2.set_xlabel("aspect ratio n/m")
    ax2.set_ylabel("NS5 time / Gram-NS time")
    ax2.set_title(f"Gram-NS speedup, m={sweep[0]['m']}", fontsize=9)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "bench_speed.png"), dpi=90)
    plt.close(fig)


# -----------------------------------------------------------------------------
# 2. orthogonalization quality

def bench_quality():
    m, n = 128, 384  # n/m = 3, so Gram-NS takes its Gram path
    conds = (1e1, 1e3, 1e6) if quick else (1e1, 1e2, 1e3, 1e4, 1e5, 1e6)
    dtypes = (torch.float32, torch.bfloat16)
    methods = [("NS5", mo.zeropower_via_newtonschulz5), ("Polar Express", mo.polar_express),
               ("Gram-NS", mo.gram_newton_schulz)]
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))
    polar = U @ V.T
    rows = []
    for cond in tqdm(conds, desc="quality", leave=False, mininterval=10):
        s = torch.logspace(0, -math.log10(cond), m, dtype=torch.float64)
        G = ((U * s) @ V.T).float().to(device)
        for dtype in dtypes:
            for name, fn in methods:
                out = fn(G, dtype=dtype).double().cpu()
                sv = torch.linalg.svdvals(out)
                ortho = ((out @ out.T - torch.eye(m, dtype=torch.float64)).norm() / math.sqrt(m)).item()
                err = ((out - polar).norm() / polar.norm()).item()
                below = (sv < 0.5).float().mean().item()
                rows.append(dict(cond=cond, dtype=str(dtype).replace("torch.", ""), method=name, sv_min=sv.min().item(),
                                 sv_max=sv.max().item(), ortho_err=ortho, err_vs_polar=err, frac_sv_below_half=below))
    md = md_table(["cond", "dtype", "method", "sv min", "sv max", "share of sv < 0.5", "‖O Oᵀ − I‖ / √m",
                   "‖O − U Vᵀ‖ / ‖U Vᵀ‖"],
                  [(f"{r['cond']:.0e}", r["dtype"], r["method"], f"{r['sv_min']:.3f}", f"{r['sv_max']:.3f}",
                    f"{r['frac_sv_below_half']:.2f}", f"{r['ortho_err']:.3f}", f"{r['err_vs_polar']:.3f}")
                   for r in rows])
    md += (f"\n\nInput: {m}x{n} matrices U diag(s) V^T with s log-spaced from 1 to 1/cond; 5 steps each. "
           "NS5 trades exactness for speed on purpose (singular values ~[0.7, 1.2] once they have grown); "
           "the smallest singular values of ill-conditioned inputs need more steps to grow for every method.")
    plot_quality(rows, conds)
    check = default_dtype_check()
    md += "\n\n" + check.pop("md")
    return dict(rows=rows, shape=[m, n], default_dtype_check=check, md=md)


def default_dtype_check():
    """The check to run after copying muon_optim.py to a machine: per shape, the compute dtype
    muon_optim picks here (and why), then for NS5 and Polar Express in that dtype the singular-value
    range of the output, its RMS error vs the exact SVD polar factor U V^T, and the time per call."""
    shapes = [(128, 128), (768, 768)] if quick else [(128, 128), (512, 128), (768, 768), (768, 3072), (4, 256, 256)]
    why = ("CUDA: bf16 (tensor cores)" if device == "cuda" else
           f"CPU, {mo.cpu_fast_bf16()[1]}: {mo.compute_dtype_rule(device)}")
    why = f"muon_optim.NS_DTYPE = {mo.NS_DTYPE}" if mo.NS_DTYPE is not None else why
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for shape in shapes:
        G = torch.randn(*shape, generator=gen).to(device)
        U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
        polar = U @ Vh
        dtype = mo.default_ns_dtype(device, shape)
        fns = {"NS5": lambda: mo.zeropower_via_newtonschulz5(G, dtype=dtype),
               "Polar Express": lambda: mo.polar_express(G, dtype=dtype)}
        times = time_interleaved(fns)
        for name, fn in fns.items():
            out = fn().double()
            sv = torch.linalg.svdvals(out)
            err = ((out - polar).square().mean().sqrt() / polar.square().mean().sqrt()).item()
            rows.append(dict(shape=list(shape), dtype=str(dtype).replace("torch.", ""), method=name,
                             sv_min=sv.min().item(), sv_max=sv.max().item(), err=err, ms=times[name]["ms"]))
    md = f"Default compute dtype here: {why}.\n\n" + md_table(
        ["shape", "dtype", "method", "sv min", "sv max", "RMS error vs U Vᵀ", "ms / call"],
        [(fmt_shape(r["shape"]), r["dtype"], r["method"], f"{r['sv_min']:.3f}", f"{r['sv_max']:.3f}",
          f"{r['err']:.4f}", f"{r['ms']:.2f}") for r in rows])
    return dict(rows=rows, why=why, md=md)


def plot_quality(rows, conds):
    plt = plt_module()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, dtype in zip(axes, ("float32", "bfloat16")):
        for name, color in (("NS5", "C0"), ("Polar Express", "C1"), ("Gram-NS", "C2")):
            rs = [r for r in rows if r["dtype"] == dtype and r["method"] == name]
            ax.fill_between([r["cond"] for r in rs], [r["sv_min"] for r in rs], [r["sv_max"] for r in rs],
                            color=color, alpha=0.2)
            ax.plot([r["cond"] for r in rs], [r["sv_max"] for r in rs], color=color, label=name)
            ax.plot([r["cond"] for r in rs], [r["sv_min"] for r in rs], color=color, ls="--")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("condition number of the input")
        ax.set_title(f"singular values after 5 steps ({dtype}): max solid, min dashed", fontsize=9)
    axes[0].set_ylabel("singular value of the output")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "bench_quality.png"), dpi=90)
    plt.close(fig)


# -----------------------------------------------------------------------------
# 3. optimizer step time

GPT2_LAYERS = {"attn.c_attn": (2304, 768), "attn.c_proj": (768, 768), "mlp.c_fc": (3072, 768),
               "mlp.c_proj": (768, 3072)}  # nn.Linear weights (out, in) of one GPT-2-small block


def bench_step():
    """One optimizer.step() on GPT-2-small's 4 layer matrices. The goals follow the hardware: where
    bf16 matmul is fast (CUDA, a CPU with AMX) torch.optim.Muon's bf16 iteration is a real
    competitor (ours by default <= 1.1x its time, the fastest variant <= 0.8x, <= 8x AdamW's);
    on a CPU without it, torch.optim.Muon's bf16 crawls and ours (fp32) must be >= 50x faster."""
    layers = {"attn.c_proj": (768, 768)} if quick else GPT2_LAYERS
    gen = torch.Generator().manual_seed(seed)
    weights = {k: torch.randn(*s, generator=gen) * 0.02 for k, s in layers.items()}
    grads = {k: torch.randn(*s, generator=gen) * 1e-3 for k, s in layers.items()}
    fast_bf16 = device == "cuda" or mo.cpu_fast_bf16()[0]
    default_dtype = str(mo.default_ns_dtype(device, (768, 768))).replace("torch.", "")

    def make(kind):
        params = [torch.nn.Parameter(w.clone().to(device)) for w in weights.values()]
        for p, g in zip(params, grads.values()):
            p.grad = g.clone().to(device)
        opt = {f"ours: Muon (NS5, default {default_dtype})": lambda: mo.Muon(params, lr=0.02, weight_decay=0.01),
               "ours: Muon (NS5, fp32)": lambda: mo.Muon(params, lr=0.02, weight_decay=0.01, ns_dtype=torch.float32),
               "ours: Muon (Gram-NS)": lambda: mo.Muon(params, lr=0.02, weight_decay=0.01,
                                                        ns_method="gram_newton_schulz"),
               "ours: Muon + NorMuon": lambda: mo.Muon(params, lr=0.02, weight_decay=0.01, normuon=0.95),
               "torch.optim.Muon": lambda: torch.optim.Muon(params, lr=0.02, weight_decay=0.01),
               "torch.optim.AdamW": lambda: torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01)}[kind]()
        return opt.step

    kinds = [f"ours: Muon (NS5, default {default_dtype})"] + (["ours: Muon (NS5, fp32)"] if default_dtype != "float32"
                                                              else []) + \
        ["ours: Muon (Gram-NS)", "ours: Muon + NorMuon", "torch.optim.AdamW"]
    steps = {k: make(k) for k in kinds}
    # torch.optim.Muon runs its NS in bf16: very slow on a CPU without fast bf16, so there one
    # timed step without warm-up (its first step does the same work as the later ones); with fast
    # bf16 it is timed like the others, interleaved after a warm-up step
    torch_muon = make("torch.optim.Muon")
    if fast_bf16:
        steps["torch.optim.Muon"] = torch_muon
        t = time_interleaved(steps, n_repeats=repeats)
    else:
        t = time_interleaved(steps, n_repeats=max(3, repeats // 2))
        print("  timing torch.optim.Muon (bf16 Newton-Schulz; ~1 min per step on this CPU) ...", flush=True)
        t.update(time_interleaved({"torch.optim.Muon": torch_muon}, n_repeats=1, warmup=0))
    order = kinds[:-1] + ["torch.optim.Muon", "torch.optim.AdamW"]
    muon_ms, adamw_ms = t["torch.optim.Muon"]["ms"], t["torch.optim.AdamW"]["ms"]
    rows = [dict(optimizer=k, ms=t[k]["ms"], n=t[k]["n"], min_ms=t[k]["min_ms"], max_ms=t[k]["max_ms"],
                 cpu_ms=t[k]["cpu_ms"], speedup_vs_torch_muon=muon_ms / t[k]["ms"], x_adamw=t[k]["ms"] / adamw_ms)
            for k in order]
    ours = rows[0]
    fastest = min(rows[:len(kinds) - 1], key=lambda r: r["ms"])
    if fast_bf16:
        goals = {"default <= 1.1x torch.optim.Muon": ours["ms"] <= 1.1 * muon_ms,
                 f"fastest ({fastest['optimizer']}) <= 0.8x torch.optim.Muon": fastest["ms"] <= 0.8 * muon_ms,
                 "default <= 8x AdamW": ours["x_adamw"] <= 8}
    else:
        goals = {"default >= 50x faster than torch.optim.Muon": ours["speedup_vs_torch_muon"] >= 50,
                 "default within 25x of AdamW": ours["x_adamw"] <= 25}
    md = md_table(["optimizer", "ms / step", "CPU ms / step", "timed steps", "time / torch.optim.Muon's",
                   "time / AdamW's"],
                  [(r["optimizer"], f"{r['ms']:.1f}", f"{r['cpu_ms']:.1f}", r["n"],
                    f"{r['ms'] / muon_ms:.2f}x", f"{r['x_adamw']:.1f}x") for r in rows])
    md += (f"\n\nMatrices: {', '.join(f'{k} {fmt_shape(s)}' for k, s in layers.items())}, gradients given; "
           f"one optimizer.step() each, median of interleaved steps after a warm-up step"
           f"{'' if fast_bf16 else ' (torch.optim.Muon: one step)'}. Default compute dtype here: {default_dtype} "
           f"({'CUDA' if device == 'cuda' else mo.cpu_fast_bf16()[1]}). Goals for this hardware: "
           + "; ".join(f"{g}: {'met' if ok else 'NOT met'}" for g, ok in goals.items()) + ".")
    return dict(rows=rows, layers={k: list(s) for k, s in layers.items()}, goals=goals, fast_bf16=fast_bf16,
                default_dtype=default_dtype, md=md)


# -----------------------------------------------------------------------------
# 4. the deep-linear-network showdown

def deep_linear(depth=10, width=64):
    return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(depth)])


def bench_showdown(depth=10, width=64, n_data=1000, batch=128, n_steps=500):
    torch.manual_seed(seed)
    X, Y = torch.randn(n_data, width), torch.randn(n_data, width)
    model0 = deep_linear(depth, width)
    optimizers = {"SGD (lr 0.01, momentum 0.9)": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9),
                  "Adam (lr 1e-3)": lambda ps: torch.optim.Adam(ps, lr=1e-3),
                  "Muon (lr 0.02)": lambda ps: mo.Muon(ps, lr=0.02)}
    mid = depth // 2
    results = {}
    for name, make in optimizers.items():
        model = copy.deepcopy(model0)
        opt = make(list(model.parameters()))
        order = torch.Generator().manual_seed(seed)  # the same batches for every optimizer
        losses, full_losses, snap = [], [], None
        t0 = time.perf_counter()
        for step in tqdm(range(n_steps), desc=name.split()[0], leave=False, mininterval=10):
            idx = torch.randint(0, n_data, (batch,), generator=order)
            loss = torch.nn.functional.mse_loss(model(X[idx]), Y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if snap is None:  # the raw gradient of the middle layer at step 0 and its Muon update
                g = model[mid].weight.grad.detach().clone()
                snap = dict(grad_sv=torch.linalg.svdvals(g).tolist(),
                            update_sv=torch.linalg.svdvals(mo.zeropower_via_newtonschulz5(g)).tolist())
            opt.step()
            losses.append(loss.item())
            if step % 5 == 4:  # the loss on all 1000 points: the batch loss is too noisy to compare
                with torch.no_grad():
                    full_losses.append((step + 1, torch.nn.functional.mse_loss(model(X), Y).item()))
        with torch.no_grad():
            final = torch.nn.functional.mse_loss(model(X), Y).item()
        results[name] = dict(losses=losses, full_losses=full_losses, final_full_loss=final,
                             final_batch_loss=losses[-1], s=time.perf_counter() - t0,
                             weight_sv={i: torch.linalg.svdvals(model[i].weight.detach()).tolist()
                                        for i in (0, mid, depth - 1)}, **snap)
    init_sv = torch.linalg.svdvals(model0[mid].weight.detach()).tolist()
    with torch.no_grad():
        init_loss = torch.nn.functional.mse_loss(model0(X), Y).item()
    floor = least_squares_floor(X, Y)
    md = md_table(["optimizer", "final loss (all 1000 points)", "above the least-squares floor", "last batch loss",
                   "wall s"],
                  [(k, f"{r['final_full_loss']:.4f}", f"{r['final_full_loss'] - floor:.4f}",
                    f"{r['final_batch_loss']:.4f}", f"{r['s']:.1f}") for k, r in results.items()])
    md += (f"\n\n{depth}-layer {width}-wide linear network without bias, PyTorch default init, MSE to random "
           f"N(0,1) targets, {n_data} N(0,1) inputs, batch {batch}, {n_steps} steps, seed {seed}; loss at init "
           f"{init_loss:.4f}. (A linear map cannot fit random targets exactly: the least-squares floor is "
           f"{floor:.4f}.)")
    plot_showdown(results, init_sv, mid, floor)
    return dict(results=results, init_loss=init_loss, init_sv_mid=init_sv, least_squares_floor=floor, md=md)


def least_squares_floor(X, Y):
    W = torch.linalg.lstsq(X.double(), Y.double()).solution
    return ((X.double() @ W - Y.double()) ** 2).mean().item()


def plot_showdown(results, init_sv, mid, floor):
    plt = plt_module()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, (name, r) in enumerate(results.items()):
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], color=f"C{i}", alpha=0.2, lw=0.8)
        ax.plot(*zip(*r["full_losses"]), color=f"C{i}", label=f"{name}: final {r['final_full_loss']:.3f}")
    ax.axhline(floor, color="k", ls=":", lw=1, label=f"least-squares floor {floor:.3f}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE: all 1000 points (solid), batch (faint)")
    ax.set_title(f"10-layer deep linear network [{label}]", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "showdown_loss.png"), dpi=90)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(init_sv, "k:", label="at init")
    for name, r in results.items():
        a1.plot(r["weight_sv"][mid], label=name.split(" (")[0])
    a1.set_yscale("log")
    a1.set_xlabel("index")
    a1.set_ylabel("singular value")
    a1.set_title(f"singular values of layer {mid}'s weight after training", fontsize=9)
    a1.legend(fontsize=8)
    r = next(iter(results.values()))
    g, u = torch.tensor(r["grad_sv"]), torch.tensor(r["update_sv"])
    a2.plot(g / g.max(), label="raw gradient (normalized to max 1)")
    a2.plot(u, label="Muon update (NS5 of the gradient)")
    a2.set_yscale("log")
    a2.set_xlabel("index")
    a2.set_title(f"layer {mid} at step 0: gradient vs its orthogonalized update", fontsize=9)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "showdown_spectra.png"), dpi=90)
    plt.close(fig)


# -----------------------------------------------------------------------------
# 5. distributed: optimizer step per rank, DDP-style (all_gather) vs FSDP2 (all_to_all)

DIST_MODEL = dict(n_layers=16, width=384)  # 16 Linear(384, 384) weights, fp32


def _dist_step_worker(rank, world, port, out_path, kinds, n_steps):
    """One rank: build the model once per kind, give every weight the gradient a single process
    would see (the rank's rows for FSDP2), then time Muon.step() with the kinds interleaved round
    by round, ranks aligned by a barrier before each step, so that load from other processes on a
    shared machine hits every kind alike. 'plain' is the one-process step: rank 0 steps alone while
    the other ranks wait at the next barrier. Writes {kind: ms, CPU ms, bytes sent} to out_path.rank."""
    import datetime
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.set_num_threads(1)
    dev = f"cuda:{rank}" if device == "cuda" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    n, w = DIST_MODEL["n_layers"], DIST_MODEL["width"]
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(w, w, generator=gen) * 1e-3 for _ in range(n)]
    steps = {}
    for kind in kinds:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(*[torch.nn.Linear(w, w, bias=False) for _ in range(n)]).to(dev)
        if kind == "fsdp2":
            mesh = init_device_mesh(device, (world,))
            for layer in model:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        opt = mo.Muon(model.parameters(), lr=0.02, weight_decay=0.01, ns_dtype=torch.float32,
                      distributed=kind != "plain")
        for p, g in zip(model.parameters(), grads):
            g = g.to(dev)
            if mo.is_sharded(p):
                rows = mo.chunk_rows(w, world)
                start = sum(rows[:rank])
                p.grad = torch.zeros_like(p)
                p.grad.to_local().copy_(g[start:start + rows[rank]])
            else:
                p.grad = g
        steps[kind] = opt
    out = {k: dict(ms=[], cpu_ms=[], bytes_sent=0) for k in kinds}
    for i in range(n_steps + 2):  # 2 warm-up rounds
        for kind, opt in steps.items():
            dist.barrier()
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            if kind != "plain" or rank == 0:
                opt.step()
            sync()
            if i >= 2:
                out[kind]["ms"].append((time.perf_counter() - t0) * 1e3)
                out[kind]["cpu_ms"].append((time.process_time() - c0) * 1e3)
                out[kind]["bytes_sent"] = getattr(opt, "comm_bytes", 0)
    torch.save(dict(out, seed=seed), f"{out_path}.{rank}")
    dist.destroy_process_group()


def _run_dist(world, kinds, n_steps):
    import socket
    import tempfile
    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "times")
        mp.spawn(_dist_step_worker, args=(world, port, path, kinds, n_steps), nprocs=world)
        return [torch.load(f"{path}.{r}") for r in range(world)]


def bench_distributed():
    """Muon.step() time per rank and bytes each rank sends, for plain tensors in one process, the
    DDP-style path (every rank has every matrix; each orthogonalizes a share, one all_gather) and
    FSDP2 (fully_shard; owners get whole matrices by all_to_all and send the rows back), world
    sizes 1 and 2. gloo on CPU (1 thread per process), NCCL on GPUs. Goal (2-core CPU): FSDP2 on 2
    ranks <= 0.75x the one-process step."""
    n_steps = 3 if quick else max(5, repeats * 2)
    worlds = [1, 2] if device == "cpu" or torch.cuda.device_count() >= 2 else [1]
    rows, t, worker_seeds = [], {}, []
    for world in worlds:
        kinds = ["plain", "fsdp2"] if world == 1 else ["plain", "ddp", "fsdp2"]
        ranks = _run_dist(world, kinds, n_steps)
        worker_seeds += [r["seed"] for r in ranks]
        for kind in kinds:
            if kind == "plain":
                ranks = ranks[:1]  # rank 0 alone
            ms = max(statistics.median(r[kind]["ms"]) for r in ranks)  # the step ends when the slowest rank does
            cpu_ms = max(statistics.median(r[kind]["cpu_ms"]) for r in ranks)
            sent = [r[kind]["bytes_sent"] for r in ranks]
            t[(kind, world)] = ms
            rows.append(dict(kind=kind, world=1 if kind == "plain" else world, ms=ms, cpu_ms=cpu_ms,
                             bytes_sent_per_rank=sent, process_set=world))
    base = t[("plain", worlds[-1])]  # measured interleaved with the multi-rank steps
    for r in rows:
        r["x_one_process"] = r["ms"] / base
    names = dict(plain="plain tensors, 1 process", ddp="DDP-style (plain tensors, all_gather)",
                 fsdp2="FSDP2 fully_shard (all_to_all)")
    n, w = DIST_MODEL["n_layers"], DIST_MODEL["width"]
    formula = mo.sharded_comm_bytes([(w, w)] * n, 2)
    md = md_table(["path", "ranks", "timed among", "ms / step (slowest rank)", "CPU ms / step", "x one process",
                   "bytes sent per rank"],
                  [(names[r["kind"]], r["world"], f"{r['process_set']} process(es)", f"{r['ms']:.1f}",
                    f"{r['cpu_ms']:.1f}", f"{r['x_one_process']:.2f}x",
                    " / ".join(f"{b / 1e6:.2f} MB" for b in r["bytes_sent_per_rank"])) for r in rows])
    ratio = t.get(("fsdp2", 2), float("nan")) / base
    cpu = {(r["kind"], r["process_set"]): r["cpu_ms"] for r in rows}
    cpu_ratio = cpu.get(("fsdp2", 2), float("nan")) / cpu[("plain", worlds[-1])]
    goal = ratio <= 0.75
    backend = "gloo, 1 thread per process" if device == "cpu" else "NCCL"
    md += (f"\n\nModel: {n} Linear({w}, {w}) weights, fp32, NS5 in fp32, {backend}; "
           f"median of {n_steps} steps after 2 warm-up steps, ranks aligned by a barrier before each. FSDP2 bytes "
           f"(all ranks, formula mo.sharded_comm_bytes): {formula / 1e6:.2f} MB per step at 2 ranks. Goal: FSDP2 on 2 "
           f"ranks <= 0.75x one process: {'met' if goal else 'NOT met'} ({ratio:.2f}x wall, {cpu_ratio:.2f}x CPU time "
           "per rank; the one-process step is timed in the same process set, interleaved, rank 0 alone).")
    return dict(rows=rows, worker_seeds=worker_seeds, ratio_fsdp2_2_vs_1=ratio, cpu_ratio_fsdp2_2_vs_1=cpu_ratio,
                goal_met=goal, formula_bytes_2_ranks=formula, md=md)


# -----------------------------------------------------------------------------
# 8. the code a reader follows through one plain update

def trace_plain_step(shape=(64, 32)):
    """Which code of muon_optim.py one plain update runs: one process, one 2D tensor, default
    options, the second opt.step() (the first also creates the state), traced with sys.settrace.
    Returns the functions (name, first line, definition lines) and the distinct executed lines."""
    import inspect
    p = torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)))
    opt = mo.Muon([p])
    p.grad = torch.randn_like(p)
    opt.step()
    codes, lines = set(), set()

    def tracer(frame, event, arg):
        if frame.f_code.co_filename != mo.__file__:
            return None
        codes.add(frame.f_code)
        if event == "line":
            lines.add(frame.f_lineno)
        return tracer

    p.grad = torch.randn_like(p)
    sys.settrace(tracer)
    try:
        opt.step()
    finally:
        sys.settrace(None)
    functions = []
    for c in codes:
        if not c.co_name.startswith("<"):  # comprehensions and lambdas belong to the function around them
            src = inspect.getsourcelines(c)[0]  # from the def line on (decorators not counted):
            functions.append((c.co_firstlineno, c.co_name, len(src) - [x.lstrip()[:4] for x in src].index("def ")))
    return sorted(functions), sorted(lines)


def longest_function(path):
    """(lines, name) of the longest function or method defined in the file at path."""
    import ast
    with open(path) as f:
        tree = ast.parse(f.read())
    return max((n.end_lineno - n.lineno + 1, n.name) for n in ast.walk(tree)
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def bench_trace():
    """Goals (issue: a core that reads like KellerJordan's muon.py): one plain update in <= 8
    functions, <= 150 lines of their definitions, <= 60 distinct executed lines; class Muon before
    line 400; the file <= 1,150 lines."""
    functions, lines = trace_plain_step()
    with open(mo.__file__) as f:
        source = f.read().splitlines()
    muon_line = next(i for i, line in enumerate(source, 1) if line.startswith("class Muon("))
    def_lines = sum(n for _, _, n in functions)
    longest = longest_function(mo.__file__)
    goals = {"<= 8 functions": len(functions) <= 8, "<= 150 definition lines": def_lines <= 150,
             "<= 60 executed lines": len(lines) <= 60, "class Muon before line 400": muon_line < 400,
             "file <= 1,150 lines": len(source) <= 1150}
    md = md_table(["function", "line", "definition lines"], [(name, first, n) for first, name, n in functions])
    md += (f"\n\n{len(functions)} functions, {def_lines} lines of their definitions, {len(lines)} distinct executed "
           f"lines (from line {lines[0]} to {lines[-1]}); class Muon at line {muon_line}; muon_optim.py "
           f"{len(source)} lines, its longest function {longest[1]} ({longest[0]} lines). Goals: "
           + "; ".join(f"{g}: {'met' if ok else 'NOT met'}" for g, ok in goals.items()) + ".")
    return dict(functions=[dict(name=name, line=first, lines=n) for first, name, n in functions],
                n_functions=len(functions), definition_lines=def_lines, executed_lines=len(lines),
                class_muon_line=muon_line, file_lines=len(source), longest_function=list(longest), goals=goals,
                md=md)


# -----------------------------------------------------------------------------
# 6. GPU validation: python bench.py --gpu=True (<= 8 min on one H100)

def write_random_shards(data_dir, n_train=2, tokens=4_000_000, vocab=50257):
    """llm.c-format token shards (what prepare_fineweb.py writes) of random GPT-2 ids: throughput
    does not depend on the text."""
    import numpy as np
    os.makedirs(data_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in ["fineweb_val_000000.bin"] + [f"fineweb_train_{k:06d}.bin" for k in range(1, n_train + 1)]:
        header = np.zeros(256, dtype=np.int32)
        header[:3] = 20240520, 1, tokens
        with open(os.path.join(data_dir, name), "wb") as f:
            f.write(header.tobytes())
            f.write(rng.integers(0, vocab, tokens, dtype=np.uint16).tobytes())


def train_throughput(optimizer, data_dir, steps=40):
    """tokens/s and MFU of train_muon.py at its 124M defaults (compile + bf16 autocast), from its
    metrics.json: the median over the steps after the first 10 (compilation, warm-up)."""
    import subprocess
    import tempfile
    out = tempfile.mkdtemp(prefix=f"bench_{optimizer}_")
    cmd = [sys.executable, "train_muon.py", f"--optimizers={optimizer}", f"--data_dir={data_dir}", f"--out_dir={out}",
           f"--max_steps={steps}", f"--eval_every={steps}", "--eval_tokens=65536", "--compile=True",
           "--save_checkpoint=False", "--warmup_steps=5"]
    proc = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(error=(proc.stdout + proc.stderr)[-800:])
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    points = [pt for run in metrics["runs"].values() for pt in run["train"] if pt["step"] > 10]
    mfus = [pt["mfu"] for pt in points if "mfu" in pt]
    return dict(tokens_per_s=statistics.median(pt["tok_s"] for pt in points),
                mfu=statistics.median(mfus) if mfus else float("nan"))


def bench_gpu():
    """One table: tests/test_cuda.py, NS5 vs the matmul bound, Triton vs torch, one optimizer step on
    all 48 matrices of GPT-2 small (Muon vs AdamW), and 124M training throughput with each."""
    import subprocess
    import tempfile
    if device != "cuda":
        sys.exit("--gpu=True needs a CUDA GPU (torch.cuda.is_available() is False here)")
    rows = []
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "tests/test_cuda.py"], capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "test_cuda.log"), "w") as f:  # the whole pytest report, failures included
        f.write(proc.stdout + proc.stderr)
    print(proc.stdout[-4000:], flush=True)
    summary = [line for line in proc.stdout.splitlines() if " passed" in line or " failed" in line or " error" in line]
    rows.append(("tests/test_cuda.py", summary[-1] if summary else proc.stdout[-300:], ""))
    gen = torch.Generator().manual_seed(seed)
    for shape in [(768, 768), (768, 3072), (12, 768, 768)]:
        G = torch.randn(*shape, generator=gen).to(device)
        B = math.prod(shape[:-2])
        m, n = sorted(shape[-2:])
        Xw = torch.randn(B, m, n, generator=gen).to(device, torch.bfloat16)
        fns = {"torch": lambda: with_triton(mo.zeropower_via_newtonschulz5, False)(G),
               "matmul": lambda: torch.bmm(Xw, Xw.mT)}
        if mo.triton is not None:
            fns["triton"] = lambda: with_triton(mo.zeropower_via_newtonschulz5, True)(G)
        t = time_interleaved(fns, n_repeats=20)
        bound_ms = plain_flops(B, m, n) / (2 * B * m * m * n / t["matmul"]["ms"])
        rows.append((f"NS5 bf16 {fmt_shape(shape)}, torch", f"{t['torch']['ms']:.3f} ms",
                     f"{t['torch']['ms'] / bound_ms:.2f}x matmul bound"))
        if "triton" in t:
            rows.append((f"NS5 bf16 {fmt_shape(shape)}, Triton", f"{t['triton']['ms']:.3f} ms",
                         f"{t['triton']['ms'] / bound_ms:.2f}x matmul bound, "
                         f"{t['torch']['ms'] / t['triton']['ms']:.2f}x faster than torch"))
    shapes = [s for _ in range(12) for s in GPT2_LAYERS.values()]
    weights = [torch.randn(*s, generator=gen).to(device) * 0.02 for s in shapes]

    def make(kind):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        return {"ours: Muon": lambda: mo.Muon(params, lr=0.02), "torch.optim.Muon": lambda: torch.optim.Muon(params),
                "torch.optim.AdamW (fused)": lambda: torch.optim.AdamW(params, fused=True)}[kind]().step
    t = time_interleaved({k: make(k) for k in ("ours: Muon", "torch.optim.Muon", "torch.optim.AdamW (fused)")},
                         n_repeats=10)
    adamw_ms = t["torch.optim.AdamW (fused)"]["ms"]
    for k, v in t.items():
        rows.append((f"step, 48 GPT-2-small matrices: {k}", f"{v['ms']:.2f} ms", f"{v['ms'] / adamw_ms:.1f}x AdamW"))
    data_dir = tempfile.mkdtemp(prefix="bench_shards_")
    write_random_shards(data_dir)
    for opt in ("muon", "adamw"):
        r = train_throughput(opt, data_dir)
        if "error" in r:
            rows.append((f"train_muon.py 124M, {opt}", "failed", r["error"].replace("\n", " ")[-300:]))
        else:
            rows.append((f"train_muon.py 124M, {opt} (compile, bf16)", f"{r['tokens_per_s']:,.0f} tokens/s",
                         f"MFU {100 * r['mfu']:.1f}%"))
    md = md_table(["check", "result", "relative"], rows)
    return dict(rows=[list(r) for r in rows], md=md)


def bench_gpu_ns():
    """NS5 in bf16 with the Triton kernels forced on vs torch, over sizes: where the kernels pay off
    (muon_optim.TRITON_MIN_WORK is set from this table)."""
    if device != "cuda":
        sys.exit("--only=gpu_ns needs a CUDA GPU (torch.cuda.is_available() is False here)")
    if mo.triton is None:
        sys.exit("--only=gpu_ns needs triton (pip install triton)")
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for shape in [(256, 256), (768, 768), (1024, 1024), (2048, 2048), (4096, 4096), (768, 3072), (1024, 4096),
                  (2048, 8192), (12, 768, 768), (16, 1024, 1024), (8, 2048, 2048)]:
        G = torch.randn(*shape, generator=gen).to(device)
        t = time_interleaved({"torch": lambda: with_triton(mo.zeropower_via_newtonschulz5, False)(G),
                              "triton": lambda: with_triton(mo.zeropower_via_newtonschulz5, True)(G)}, n_repeats=20)
        m, n = sorted(shape[-2:])
        chosen = "Triton" if math.prod(shape[:-2]) * m * m * n >= mo.TRITON_MIN_WORK else "torch"
        rows.append((fmt_shape(shape), f"{t['torch']['ms']:.3f}", f"{t['triton']['ms']:.3f}",
                     f"{t['torch']['ms'] / t['triton']['ms']:.2f}x", chosen))
    return dict(rows=[list(r) for r in rows],
                md=md_table(["shape", "torch ms", "Triton ms", "Triton speedup", "muon_optim uses"], rows))


def cuda_graph_step(opt, warmup=2):
    """Muon(capturable=True) in a CUDA graph: eager steps on a side stream (they make the state and pick
    the kernels), then one captured step; the returned replay() is a step (p.grad must stay the same
    tensors: copy new gradients into them). The same recipe as tests/test_cuda.py."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph.replay


def bench_gpu_step():
    """One Muon step on all 48 matrices of GPT-2 small (bf16 NS5, default options): the default eager
    step, Muon(capturable=True) run eagerly (foreach kernels), the same replayed in a CUDA graph, and
    torch.compile(opt.step) (default and "reduce-overhead" modes); fused AdamW for scale. The matmul bound
    is the FLOPs of the NS iterations (plain_flops per same-shape batch) / the peak bf16 matmul
    throughput measured here (8192^3 matmuls). Goal: the captured step <= 1.5x the bound."""
    if device != "cuda":
        sys.exit("--only=gpu_step needs a CUDA GPU (torch.cuda.is_available() is False here)")
    gen = torch.Generator().manual_seed(seed)
    shapes = [s for _ in range(12) for s in GPT2_LAYERS.values()]
    weights = [torch.randn(*s, generator=gen).to(device) * 0.02 for s in shapes]

    def params():
        ps = [torch.nn.Parameter(w.clone()) for w in weights]
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-3
        return ps
    fns, errors = {"eager (default)": mo.Muon(params()).step,
                   "capturable=True, eager (foreach)": mo.Muon(params(), capturable=True).step,
                   "torch.optim.AdamW (fused)": torch.optim.AdamW(params(), fused=True).step}, []
    makers = {"capturable=True, CUDA graph replay": lambda opt: cuda_graph_step(opt),
              "capturable=True, torch.compile": lambda opt: torch.compile(opt.step),
              "capturable=True, torch.compile reduce-overhead": lambda opt: torch.compile(opt.step,
                                                                                           mode="reduce-overhead")}
    for name, make in makers.items():
        try:
            fn = make(mo.Muon(params(), capturable=True))
            for _ in range(3):  # compile / capture / warm up
                fn()
            fns[name] = fn
        except Exception as e:  # reported in the table, the other rows still measured
            errors.append((name, "failed", f"{type(e).__name__}: {str(e)[:200]}"))
    t = time_interleaved(fns, n_repeats=50, warmup=3)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    peak = time_interleaved({"matmul": lambda: a @ a}, n_repeats=20)["matmul"]["ms"]
    peak_flops_per_ms = 2 * 8192 ** 3 / peak
    counts = {}
    for s in shapes:
        counts[tuple(sorted(s))] = counts.get(tuple(sorted(s)), 0) + 1
    flops = sum(plain_flops(k, m, n) for (m, n), k in counts.items())
    bound_ms = flops / peak_flops_per_ms
    rows = [(name, f"{v['ms']:.3f} ms", f"{v['ms'] / bound_ms:.2f}x", f"{v['ms'] / t['eager (default)']['ms']:.2f}x")
            for name, v in t.items()] + errors
    captured = [v["ms"] for k, v in t.items() if k.startswith("capturable=True, ") and "eager" not in k]
    goal = bool(captured) and min(captured) <= 1.5 * bound_ms
    md = md_table(["step, 48 GPT-2-small matrices", "median", "vs matmul bound", "vs eager"], rows)
    md += (f"\n\nMatmul bound: {flops / 1e9:.1f} GFLOP of NS5 iterations / {peak_flops_per_ms / 1e9:.0f} TFLOP/s "
           f"(bf16 8192^3 matmul measured here) = {bound_ms:.3f} ms. Goal: a captured step <= 1.5x the bound: "
           f"{'met' if goal else 'NOT met'}.")
    return dict(rows=[list(r) for r in rows], bound_ms=bound_ms, peak_tflops=peak_flops_per_ms / 1e9,
                ns_gflop=flops / 1e9, goal_met=goal, md=md)


RUNNERS = dict(speed=bench_speed, quality=bench_quality, step=bench_step, showdown=bench_showdown,
               distributed=bench_distributed, gpu=bench_gpu, gpu_ns=bench_gpu_ns, trace=bench_trace,
               gpu_step=bench_gpu_step)
TITLES = dict(speed="1. Orthogonalization speed", quality="2. Orthogonalization quality",
              step="3. Optimizer step time (4 GPT-2-small matrices)", showdown="4. Deep-linear-network showdown",
              distributed="5. Distributed optimizer step (DDP-style and FSDP2)", gpu="6. GPU validation",
              gpu_ns="7. NS5 on the GPU: Triton kernels vs torch by size",
              trace="8. The code one plain Muon update runs (muon_optim.py, traced)",
              gpu_step="9. The Muon step on the GPU: eager vs captured, vs the matmul bound")

if __name__ == "__main__":
    json_path = os.path.join(out_dir, "results.json")
    results = {}
    if os.path.exists(json_path):  # keep the other sections from earlier runs
        with open(json_path) as f:
            results = json.load(f)
    print(f"device: {label} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"triton {'yes' if mo.triton is not None else 'no'} | quick={quick}")
    t_all = time.perf_counter()
    for name in wanted:
        t0 = time.perf_counter()
        res = RUNNERS[name]()
        res.update(machine=label, quick=quick, threads=torch.get_num_threads(), torch=torch.__version__,
                   seconds=time.perf_counter() - t0, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   command="python " + shlex.join(["bench.py"] + sys.argv[1:]))
        results[name] = res
        print(f"\n## {TITLES[name]} [{label}{', --quick' if quick else ''}]  ({res['seconds']:.0f} s)\n\n{res['md']}\n",
              flush=True)
        tmp = json_path + ".tmp"
        with open(tmp, "w") as f:  # after every section, atomically: a crash keeps what was measured
            json.dump(results, f, indent=1)
        os.replace(tmp, json_path)
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
        for name in SECTIONS:
            if name in results:
                r = results[name]
                f.write(f"### {TITLES[name]}\n\nMachine: {r['machine']}; command: `{r['command']}` "
                        f"({r['date']}, {r['seconds']:.0f} s)\n\n{r['md']}\n\n")
    print(f"total {time.perf_counter() - t_all:.0f} s; wrote {json_path}, results.md and PNGs in {out_dir}")
