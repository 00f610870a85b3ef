"""Regression tests for defects an independent review reproduced in muon_optim.py (each failed
before its fix): head routing, NorMuon resume in low precision, deepcopy/pickle, mixed devices,
torch's cyclic schedulers, stale stats, and group order on load."""
import copy
import os
import pickle
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import muon_optim as M  # noqa: E402


def grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_normuon_resume_with_low_or_high_precision_params(dtype):
    params = [torch.nn.Parameter(torch.randn(16, 8).to(dtype)) for _ in range(2)]
    opt = M.Muon(params, normuon=0.95, ns_dtype=torch.float32)
    grads(params, 0)
    opt.step()
    fresh = M.Muon(params, normuon=0.95, ns_dtype=torch.float32)
    fresh.load_state_dict(opt.state_dict())
    assert all(s["second_moment"].dtype == torch.float32 for s in fresh.state.values())
    grads(params, 1)
    fresh.step()  # failed: "expected dtype c10::BFloat16 for end"
    assert all(torch.isfinite(p.float()).all() for p in params)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_steps_and_adds_groups(how):
    params = [torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8))]
    opt = M.Muon([dict(params=params[:1]), dict(params=params[1:], use_muon=False, lr=1e-3)], track_stats=True)
    grads(params, 0)
    opt.step()
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert clone.track_stats and clone.distributed
    new_params = [p for g in clone.param_groups for p in g["params"]]
    grads(new_params, 1)
    clone.step()
    clone.add_param_group(dict(params=[torch.nn.Parameter(torch.randn(4, 4))]))
    assert clone.param_groups[-1]["ns_method"] == "newton_schulz"
    assert len(clone.stats()) == 1


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
        grads(params, t)
        opt.step()
        sched.step()
        momenta.append(opt.param_groups[0]["momentum"])
    assert len(set(momenta)) > 1  # Muon's momentum is cycled
    assert opt.param_groups[1]["betas"] == (0.9, 0.95)  # AdamW groups keep their betas
    assert all(torch.isfinite(p).all() for p in params)


def test_stats_cover_only_the_last_step():
    a, b = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8, 4))
    opt = M.Muon([a, b], track_stats=True)
    grads([a, b], 0)
    opt.step()
    assert len(opt.stats()) == 2
    a.grad, b.grad = torch.randn(8, 8), None
    opt.step()
    assert [s["shape"] for s in opt.stats()] == [(8, 8)]


def test_loading_groups_in_another_order_is_a_clear_error():
    w, bias = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8))
    opt = M.Muon([dict(params=[w], name="hidden"), dict(params=[bias], use_muon=False, name="bias")])
    grads([w, bias], 0)
    opt.step()
    swapped = M.Muon([dict(params=[bias], use_muon=False, name="bias"), dict(params=[w], name="hidden")])
    with pytest.raises(ValueError, match="group 0 .*'bias'.* AdamW here but Muon in the checkpoint"):
        swapped.load_state_dict(opt.state_dict())
    w2 = torch.nn.Parameter(torch.randn(4, 8))
    other = M.Muon([dict(params=[w2], name="hidden"), dict(params=[bias], use_muon=False, name="bias")])
    with pytest.raises(ValueError, match=r"shape \(8, 8\) but the parameter has shape \(4, 8\)"):
        other.load_state_dict(opt.state_dict())
