"""Muon's `split` group option: the row blocks of a fused weight (QKV, per head, unequal sizes) get
exactly the update of separate parameters (orthogonalization, scale, NorMuon, stats), in one process
and with 2 DDP ranks (gloo); the state round-trips exactly; bad splits name the parameter; and
muon_param_groups(split_fused=True) routes fused QKV weights. FSDP2: tests/test_fsdp.py."""
import datetime
import io
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import muon_optim as M  # noqa: E402

OPTIONS = dict(lr=0.05, weight_decay=0.1, ns_dtype=torch.float32)


def fused_and_separate(sizes, n, seed=0):
    """A fused (sum(sizes), n) parameter and separate (size, n) copies of its row blocks."""
    w = torch.randn(sum(sizes), n, generator=torch.Generator().manual_seed(seed)) * 0.2
    return torch.nn.Parameter(w.clone()), [torch.nn.Parameter(b.clone()) for b in w.split(list(sizes))]


def step_both(fused, opt_fused, parts, opt_parts, steps, start=0):
    for t in range(start, start + steps):
        g = torch.randn(fused.shape, generator=torch.Generator().manual_seed(100 + t)) + fused.detach()
        fused.grad = g.clone()
        for p, gb in zip(parts, g.split([q.size(0) for q in parts])):
            p.grad = gb.clone()
        opt_fused.step()
        opt_parts.step()


@pytest.mark.parametrize("split, sizes, n", [
    (3, (16, 16, 16), 16),                # QKV: 3 square blocks
    (12, (4,) * 12, 16),                  # per head (3 x 4 heads): wide blocks
    ((8, 16, 24), (8, 16, 24), 16),       # unequal: wide, square, tall
])
@pytest.mark.parametrize("normuon", [None, 0.95])
def test_split_equals_separate_parameters(split, sizes, n, normuon):
    fused, parts = fused_and_separate(sizes, n)
    opt_fused = M.Muon([dict(params=[fused], split=split)], normuon=normuon, track_stats=True, **OPTIONS)
    opt_parts = M.Muon(parts, normuon=normuon, track_stats=True, **OPTIONS)
    assert opt_fused.param_groups[0]["split"] == sizes  # stored as the tuple of block sizes
    step_both(fused, opt_fused, parts, opt_parts, 4)
    assert torch.equal(fused.detach(), torch.cat([p.detach() for p in parts]))
    got = sorted(opt_fused.stats(), key=lambda s: s["block"])
    want = opt_parts.stats()
    assert [s["block"] for s in got] == list(range(len(sizes)))
    by_shape = {}
    for s in want:  # separate parameters come out batched by shape, in parameter order within a shape
        by_shape.setdefault(s["shape"], []).append(s)
    for s in got:
        w = by_shape[s["shape"]].pop(0)
        assert (s["update_rms"], s["ortho_error"]) == (w["update_rms"], w["ortho_error"])
    if normuon:  # one flat statistic per parameter, block after block: rows if tall, columns if wide
        moment = opt_fused.state[fused]["second_moment"]
        assert moment.shape == (sum(b if b >= n else n for b in sizes),)
        assert torch.equal(moment, torch.cat([opt_parts.state[p]["second_moment"].flatten() for p in parts]))


def test_split_conv_weight_by_output_rows():
    """A conv kernel (out, in, h, w) splits along its output channels, as its (out, in*h*w) matrix view."""
    w = torch.randn(12, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    fused, parts = torch.nn.Parameter(w.clone()), [torch.nn.Parameter(b.clone()) for b in w.split(4)]
    opt_fused = M.Muon([dict(params=[fused], split=3)], normuon=0.9, **OPTIONS)
    opt_parts = M.Muon(parts, normuon=0.9, **OPTIONS)
    step_both(fused, opt_fused, parts, opt_parts, 3)
    assert torch.equal(fused.detach(), torch.cat([p.detach() for p in parts]))


def test_split_state_dict_round_trip_is_exact():
    fused, _ = fused_and_separate((8, 8, 8), 8)
    resumed = torch.nn.Parameter(fused.detach().clone())

    def make(p):
        return M.Muon([dict(params=[p], split=3, normuon=0.95, name="qkv")], **OPTIONS)

    def steps(p, opt, start, k):
        for t in range(start, start + k):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(t)) + p.detach()
            opt.step()

    opt = make(fused)
    steps(fused, opt, 0, 6)
    opt_r = make(resumed)
    steps(resumed, opt_r, 0, 3)
    blob = io.BytesIO()
    torch.save(opt_r.state_dict(), blob)
    blob.seek(0)
    opt_r = make(resumed)
    opt_r.load_state_dict(torch.load(blob, weights_only=False))
    steps(resumed, opt_r, 3, 3)
    assert torch.equal(fused, resumed)
    assert torch.equal(opt.state[fused]["second_moment"], opt_r.state[resumed]["second_moment"])
    assert opt_r.param_groups[0]["split"] == (8, 8, 8)


@pytest.mark.parametrize("params, split, message", [
    ([(12, 4)], (4, 4), r"parameter 0 of param group 0 \('w'\) \(shape \(12, 4\)\): split=\(4, 4\) does not cut "
                        r"its 12 rows.*summing to 12"),
    ([(12, 4)], 5, r"split=5 does not cut its 12 rows into blocks; use n \(a divisor of 12"),
    ([(12, 4)], 0, r"split=0 does not cut"),
    ([(12, 4)], (6.0, 6), r"split=\(6.0, 6\) does not cut"),
    ([(12, 4)], True, r"split=True does not cut"),
    ([(12, 4), (6, 4)], 3, r"parameter 1 of param group 0 \('w'\) \(shape \(6, 4\)\): split=3 gives blocks \(2, 2, 2\) "
                           r"here but \(4, 4, 4\) for parameter 0.*own param group"),
    ([(3, 4, 4)], 3, r"shape \(3, 4, 4\)\): split cuts a matrix into row blocks, and a 3D parameter"),
])
def test_bad_split_names_the_parameter_and_the_fix(params, split, message):
    ps = [torch.nn.Parameter(torch.randn(*s)) for s in params]
    with pytest.raises(ValueError, match=message):
        M.Muon([dict(params=ps, split=split, name="w")])


def test_split_is_not_an_adamw_option():
    with pytest.raises(ValueError, match=r"\['split'\] are not valid for a AdamW"):
        M.Muon([dict(params=[torch.nn.Parameter(torch.randn(4))], use_muon=False, split=2)])


class GPT2Block(torch.nn.Module):
    """GPT-2 / nanoGPT naming: a fused c_attn Linear(d, 3d), c_proj, an MLP, LayerNorm; plus torch's MHA."""

    def __init__(self, d=16, vocab=50):
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, d)
        self.attn = torch.nn.Module()
        self.attn.c_attn = torch.nn.Linear(d, 3 * d)
        self.attn.c_proj = torch.nn.Linear(d, d)
        self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
        self.mha = torch.nn.MultiheadAttention(d, num_heads=4, batch_first=True)
        self.mlp = torch.nn.Linear(d, 4 * d)
        self.mlp_c_attn = torch.nn.Linear(d, 3 * d)  # only named like it: stays in the plain group
        self.ln = torch.nn.LayerNorm(d)
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.ln(self.wte(idx))
        q, k, v = self.attn.c_attn(x).chunk(3, dim=-1)
        x = x + self.attn.c_proj(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
        x = x + self.qkv(x).chunk(3, dim=-1)[0] + self.mha(x, x, x, need_weights=False)[0]
        x = x + self.mlp(x)[..., :x.size(-1)] + self.mlp_c_attn(x)[..., :x.size(-1)]
        return self.lm_head(x)


def test_muon_param_groups_split_fused_routes_qkv_weights():
    torch.manual_seed(0)
    model = GPT2Block()
    names = {id(p): n for n, p in model.named_parameters()}
    plain = {g["name"]: [names[id(p)] for p in g["params"]] for g in M.muon_param_groups(model)}
    assert "muon_fused" not in plain and "attn.c_attn.weight" in plain["muon"]  # opt-in
    groups = M.muon_param_groups(model, split_fused=True, normuon=0.95)
    by_name = {g["name"]: g for g in groups}
    assert sorted(names[id(p)] for p in by_name["muon_fused"]["params"]) == [
        "attn.c_attn.weight", "mha.in_proj_weight", "qkv.weight"]
    assert by_name["muon_fused"]["split"] == 3 and by_name["muon_fused"]["normuon"] == 0.95
    assert sorted(names[id(p)] for p in by_name["muon"]["params"]) == [
        "attn.c_proj.weight", "mha.out_proj.weight", "mlp.weight", "mlp_c_attn.weight"]
    opt = M.Muon(groups, track_stats=True)
    assert opt.param_groups[1]["split"] == (16, 16, 16)
    idx = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    opt.step()
    fused_stats = [s for s in opt.stats() if s["group"] == "muon_fused"]
    assert len(fused_stats) == 9 and {s["shape"] for s in fused_stats} == {(16, 16)}


# -- DDP: 2 processes (gloo) equal one ---------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
    gen = torch.Generator().manual_seed(0)
    qkv = [torch.nn.Parameter(torch.randn(24, 8, generator=gen) * 0.2) for _ in range(2)]
    heads = torch.nn.Parameter(torch.randn(24, 8, generator=gen) * 0.2)
    other = torch.nn.Parameter(torch.randn(8, 8, generator=gen) * 0.2)
    params = [*qkv, heads, other]
    opt = M.Muon([dict(params=qkv, split=3, normuon=0.95), dict(params=[heads], split=(4, 8, 12)),
                  dict(params=[other])], track_stats=True, **OPTIONS)
    for t in range(4):
        g = torch.Generator().manual_seed(10 + t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) + p.detach()  # the same on every rank (as after DDP)
        opt.step()
    torch.save(dict(params=[p.detach() for p in params], stats=opt.stats(), state=opt.state_dict()),
               os.path.join(out_dir, f"r{rank}_w{world}.pt"))
    if world > 1:
        dist.barrier()  # no rank tears its group down while the other still talks to it
        dist.destroy_process_group()


def test_ddp_two_ranks_equal_one_process(tmp_path):
    ddp_worker(0, 1, None, str(tmp_path))
    port, ctx = free_port(), mp.get_context("spawn")
    procs = [ctx.Process(target=ddp_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung and all(p.exitcode == 0 for p in procs), "the distributed split step failed or hung"
    one = torch.load(tmp_path / "r0_w1.pt", weights_only=False)
    for r in range(2):
        got = torch.load(tmp_path / f"r{r}_w2.pt", weights_only=False)
        for a, b in zip(one["params"], got["params"]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert [(s["group"], s["shape"], s.get("block")) for s in got["stats"]] == \
            [(s["group"], s["shape"], s.get("block")) for s in one["stats"]]
        for s, w in zip(got["stats"], one["stats"]):
            assert s["update_rms"] == pytest.approx(w["update_rms"], rel=1e-5)
        moments = [s["second_moment"] for s in got["state"]["state"].values() if "second_moment" in s]
        assert len(moments) == 2 and all(m.shape == (24,) for m in moments)  # 3 square (8, 8) blocks: 8 rows each


def test_checkpoint_from_before_split_loads_and_resumes():
    """A state_dict whose groups lack `split` (saved before the option existed) loads: the groups keep the
    value they were built with (torch's load_state_dict replaces the group dicts with the saved ones)."""
    def run(opt, p, start, k):
        for t in range(start, start + k):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(t)) + p.detach()
            opt.step()

    a = torch.nn.Parameter(torch.randn(12, 4, generator=torch.Generator().manual_seed(0)))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a = M.Muon([dict(params=[a], normuon=0.9)], **OPTIONS)
    run(opt_a, a, 0, 4)
    opt_b = M.Muon([dict(params=[b], normuon=0.9)], **OPTIONS)
    run(opt_b, b, 0, 2)
    old = opt_b.state_dict()
    for g in old["param_groups"]:
        del g["split"]
    opt_b = M.Muon([dict(params=[b], normuon=0.9)], **OPTIONS)
    opt_b.load_state_dict(old)
    assert opt_b.param_groups[0]["split"] is None
    run(opt_b, b, 2, 2)
    assert torch.equal(a, b)
