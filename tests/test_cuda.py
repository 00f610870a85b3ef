"""GPU checks, skipped without CUDA: the Triton kernels at real shapes in bf16, our Muon step vs
torch.optim.Muon on the GPU, Muon(capturable=True) replayed in a CUDA graph vs the eager step, a
compiled bf16 train_muon.py run at its 124M defaults, a train_ngpt.py smoke run, and FSDP2 on one GPU.
`python bench.py --gpu=True` runs this file and then measures the GPU numbers in one table."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import muon_optim as M  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPT2_SHAPES = [(768, 768), (768, 3072), (3072, 768), (4, 768, 768)]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("shape", GPT2_SHAPES)
def test_triton_kernels_match_torch_at_real_shapes(shape):
    if M.triton is None:
        pytest.skip("triton is not installed")
    assert M.triton_verified(torch.device("cuda"), torch.bfloat16), "the first-use check rejected the kernels"
    gen = torch.Generator(device="cuda").manual_seed(0)
    G = torch.randn(*shape, device="cuda", generator=gen)
    X = M.zeropower_via_newtonschulz5(G if G.ndim == 3 else G[None], dtype=torch.bfloat16, coeffs=[])  # normalized
    X = X if X.size(-2) <= X.size(-1) else X.mT.contiguous()
    ref = torch.bmm(X.float(), X.float().mT)
    assert rel_err(M.triton_sym_matmul_t(X), ref) < 1e-2
    A = (ref / ref.norm(dim=(-2, -1), keepdim=True)).bfloat16()
    assert rel_err(M.triton_sym_poly(A, -4.775, 2.0315), -4.775 * A.float() + 2.0315 * A.float() @ A.float()) < 1e-2
    saved = M.USE_TRITON
    try:
        with_triton = M.zeropower_via_newtonschulz5(G)
        M.USE_TRITON = False
        without = M.zeropower_via_newtonschulz5(G)
    finally:
        M.USE_TRITON = saved
    assert rel_err(with_triton, without) < 3e-2  # bf16 round-off, 5 iterations


def test_muon_step_matches_torch_optim_muon_on_cuda():
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
    ours = [torch.nn.Parameter(torch.randn(*s, device="cuda", generator=gen) * 0.02) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    opt = M.Muon(ours, lr=0.02, weight_decay=0.01)
    opt_ref = torch.optim.Muon(ref, lr=0.02, weight_decay=0.01)
    for step in range(5):
        g = torch.Generator(device="cuda").manual_seed(step)
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, device="cuda", generator=g) * 1e-3
            q.grad = p.grad.clone()
        opt.step()
        opt_ref.step()
    for p, q, s in zip(ours, ref, start):  # both bf16 NS5: the moves agree up to bf16 round-off
        assert rel_err(p - s, q - s) < 0.05


def write_random_shards(data_dir, n_train=2, tokens=2_000_000, vocab=50257):
    """Token shards in the llm.c format (what prepare_fineweb.py writes), random GPT-2 ids."""
    os.makedirs(data_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    names = ["fineweb_val_000000.bin"] + [f"fineweb_train_{k:06d}.bin" for k in range(1, n_train + 1)]
    for i, name in enumerate(names):
        header = np.zeros(256, dtype=np.int32)
        header[:3] = 20240520, 1, tokens
        with open(os.path.join(data_dir, name), "wb") as f:
            f.write(header.tobytes())
            f.write(rng.integers(0, vocab, tokens, dtype=np.uint16).tobytes())


def run_script(args, tmp_path, timeout=600, nproc=None):
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc
                              else []) + args
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def load_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_train_muon_124m_compiled_bf16(tmp_path, optimizer):
    """The default 124M model, torch.compile + bf16 autocast, 20 steps on tokens drawn from 1000 ids:
    the loss falls from ln(50304) = 10.8 towards ln(1000) = 6.9, and MFU is recorded."""
    data = str(tmp_path / "data")
    write_random_shards(data, vocab=1000)
    out = str(tmp_path / "out")
    run_script(["train_muon.py", f"--optimizers={optimizer}", f"--data_dir={data}", f"--out_dir={out}",
                "--max_steps=20", "--eval_every=10", "--eval_tokens=65536", "--compile=True", "--warmup_steps=2",
                "--save_checkpoint=False"], tmp_path)
    train = load_metrics(out)["runs"][optimizer]["train"]
    losses = [pt["loss"] for pt in train]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 1.0, losses
    assert all(0 < pt["mfu"] < 1 for pt in train[5:]), "MFU missing or out of range (unknown GPU in PEAK_FLOPS?)"


def cuda_graph_step(opt, warmup=2):
    """The recipe for Muon(capturable=True) in a CUDA graph: eager steps on a side stream (they make the
    state and pick the kernels), then one captured step; replay() is a step. Gradients must stay the same
    tensors (copy new ones into p.grad)."""
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


@pytest.mark.parametrize("muon", [dict(), dict(normuon=0.95, split=3)], ids=["foreach", "normuon_split"])
def test_capturable_step_in_a_cuda_graph_equals_eager(muon):
    """Replaying the captured step equals the default eager step: momentum, weight decay, the
    orthogonalization (bf16, Triton where it pays) and AdamW's bias corrections from the step count,
    which the graph bumps in place (a count baked in at capture would be caught here)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(2304, 768), (768, 768), (768, 768), (3072, 768), (768, 3072), (768,)]
    start = [torch.randn(*s, device="cuda", generator=gen) * 0.02 for s in shapes]
    graphed, eager = ([torch.nn.Parameter(w.clone()) for w in start] for _ in range(2))

    def build(params, capturable):
        return M.Muon([dict(params=params[:-1], weight_decay=0.01, **muon),
                       dict(params=params[-1:], use_muon=False, lr=1e-3)], lr=0.02, capturable=capturable)

    opt_g, opt_e = build(graphed, True), build(eager, False)
    for p in graphed:
        p.grad = torch.zeros_like(p)

    def grads(t):
        g = torch.Generator(device="cuda").manual_seed(100 + t)
        for p, q in zip(graphed, eager):
            q.grad = torch.randn(p.shape, device="cuda", generator=g) * 1e-3
            p.grad.copy_(q.grad)

    grads(0)
    replay = cuda_graph_step(opt_g, warmup=1)  # one eager step, then the capture (which computes nothing)
    opt_e.step()
    for t in range(1, 6):
        grads(t)
        replay()
        opt_e.step()
    torch.cuda.synchronize()
    assert opt_g.state[graphed[0]]["step"].item() == 6 and opt_g.state[graphed[-1]]["step"].item() == 6
    for p, q, w in zip(graphed, eager, start):
        assert not torch.equal(p, w)  # the replays moved every parameter ...
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-4, rtol=0)  # ... as the eager steps did


def test_train_ngpt_smoke(tmp_path):
    data = str(tmp_path / "data")
    write_random_shards(data)
    out = str(tmp_path / "out")
    run_script(["train_ngpt.py", f"--data_dir={data}", f"--out_dir={out}", "--max_steps=10", "--eval_every=5",
                "--eval_tokens=65536", "--n_layer=2", "--n_embd=256", "--n_head=4", "--compile=False"], tmp_path)
    assert os.path.exists(os.path.join(out, "metrics.json"))


def test_fsdp2_on_one_gpu(tmp_path):
    data = str(tmp_path / "data")
    write_random_shards(data)
    out = str(tmp_path / "out")
    run_script(["train_muon.py", "--fsdp=True", f"--data_dir={data}", f"--out_dir={out}", "--max_steps=10",
                "--eval_every=5", "--eval_tokens=65536", "--n_layer=2", "--compile=False"], tmp_path, nproc=1)
    assert os.path.exists(os.path.join(out, "metrics.json"))
