"""Muon(capturable=True): the step as a tensor program without host syncs (step counts as tensors,
foreach kernels) gives the default step's update, resumes from a default checkpoint, refuses what it
cannot capture, and compiles with torch.compile(fullgraph=True) to the eager result on the CPU.
CUDA graphs: tests/test_cuda.py."""
import os
import signal
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import muon_optim as M  # noqa: E402

SHAPES = [(32, 16), (32, 16), (16, 48), (24, 24), (12, 4, 2, 2)]


def build(capturable, split=None, **muon):
    """Muon matrices of three shapes (two alike, one conv kernel; `split` for the first two) and an
    AdamW vector, seeded."""
    params = [torch.nn.Parameter(torch.randn(*s, generator=torch.Generator().manual_seed(i)) * 0.1)
              for i, s in enumerate(SHAPES)]
    bias = torch.nn.Parameter(torch.randn(7, generator=torch.Generator().manual_seed(99)))
    opt = M.Muon([dict(params=params[:2], weight_decay=0.1, split=split, **muon),
                  dict(params=params[2:], weight_decay=0.1, **muon),
                  dict(params=[bias], use_muon=False, lr=1e-2, weight_decay=0.01)],
                 capturable=capturable, ns_dtype=torch.float32)
    return params + [bias], opt


def grads(params, t):
    gen = torch.Generator().manual_seed(t)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) + p.detach()


def assert_same(a, b, adam_tol=1e-6):
    for x, y in zip(a[:-1], b[:-1]):  # Muon: the same kernels on the same numbers
        assert torch.equal(x, y)
    # AdamW: the bias corrections come from an fp32 step tensor instead of a Python int
    torch.testing.assert_close(a[-1], b[-1], atol=adam_tol, rtol=0)


@pytest.mark.parametrize("muon", [dict(), dict(nesterov=False, scale="match_adamw"),
                                  dict(normuon=0.95, cautious_wd=True, split=4), dict(sphere="geodesic"),
                                  dict(ns_method="polar_express")], ids=str)
def test_capturable_step_equals_default_step(muon):
    a, opt_a = build(False, **muon)
    b, opt_b = build(True, **muon)
    for t in range(4):
        grads(a, t), grads(b, t)
        opt_a.step(), opt_b.step()
    assert_same(a, b)
    steps = [opt_b.state[p]["step"] for p in b]
    assert all(torch.is_tensor(s) and s.item() == 4 for s in steps)  # on the device, bumped in place


def test_capturable_split_and_stats_equal_default():
    a = torch.nn.Parameter(torch.randn(24, 8, generator=torch.Generator().manual_seed(0)))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a = M.Muon([dict(params=[a], split=3, normuon=0.9)], track_stats=True)
    opt_b = M.Muon([dict(params=[b], split=3, normuon=0.9)], track_stats=True, capturable=True)
    for t in range(3):
        a.grad = torch.randn(24, 8, generator=torch.Generator().manual_seed(t))
        b.grad = a.grad.clone()
        opt_a.step(), opt_b.step()
    assert torch.equal(a, b)
    assert opt_a.stats() == opt_b.stats()


def test_capturable_resumes_a_default_checkpoint():
    """A default optimizer's state (int steps) continues under capturable=True: the counts become tensors."""
    a, opt_a = build(False)
    b, opt_b = build(False)
    for t in range(2):
        grads(a, t), grads(b, t)
        opt_a.step(), opt_b.step()
    c, opt_c = build(True)
    with torch.no_grad():
        for p, q in zip(c, b):
            p.copy_(q)
    opt_c.load_state_dict(opt_b.state_dict())
    for t in range(2, 4):
        grads(a, t), grads(c, t)
        opt_a.step(), opt_c.step()
    assert_same(a, c)
    assert opt_c.state[c[0]]["step"].item() == 4


def test_capturable_refuses_what_it_cannot_capture():
    p = torch.nn.Parameter(torch.randn(8, 4))
    with pytest.raises(ValueError, match=r"parameter 0 of param group 0 \('w'\): capturable=True .*no "
                                         r"sphere='project' .*capturable=False"):
        M.Muon([dict(params=[p], sphere="project", name="w")], capturable=True)


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout


@pytest.mark.parametrize("muon", [dict(), dict(normuon=0.95, split=2)], ids=["foreach", "normuon_split"])
def test_compiled_step_equals_eager_step(muon):
    """torch.compile(opt.step, fullgraph=True): one graph (a host sync or a branch on a tensor's value
    would break it), the eager result to fp32 round-off. Skipped, saying why, where inductor cannot
    compile; at most 10 minutes (the first compile on a shared 2-core CPU takes about a minute)."""
    eager, opt_e = build(True, **muon)
    comp, opt_c = build(True, **muon)
    grads(eager, 0), grads(comp, 0)
    opt_e.step(), opt_c.step()  # the first step makes the state (before capturing)
    torch._dynamo.reset()
    step = torch.compile(opt_c.step, fullgraph=True)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(600)
    try:
        for t in range(1, 4):
            grads(eager, t), grads(comp, t)
            opt_e.step()
            try:
                step()
            except Exception as e:  # a compiler the machine lacks (no C compiler, no headers): skip
                if "BackendCompilerFailed" in type(e).__name__ or "InductorError" in type(e).__name__:
                    pytest.skip(f"inductor cannot compile on this machine: {type(e).__name__}: {str(e)[:300]}")
                raise
    except Timeout:
        pytest.fail("torch.compile of the Muon step took over 10 minutes")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    for x, y in zip(eager, comp):
        torch.testing.assert_close(x, y, atol=2e-6, rtol=0)
    assert opt_c.state[comp[0]]["step"].item() == 4
