"""Muon on FSDP2-sharded models (torch.distributed.fsdp.fully_shard), CPU + gloo, 1 thread per
process: equality with one plain process, uneven / empty shards, 3D and conv-shaped parameters,
None grads, DCP checkpoints resharded 2 -> 1 ranks, HSDP (2x2 mesh), and rank mismatches that must
raise instead of hanging. Every multi-process run has a join timeout, so a hang fails the test."""
import datetime
import os
import socket
import sys
import traceback
import warnings

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import muon_optim as M  # noqa: E402

VOCAB, STEPS = 20, 6


class Net(torch.nn.Module):
    """An embedding, a 7-row Linear (wide), a tall Linear, a 3D parameter (3 matrices), a conv-shaped
    4D parameter (matrix view (10, 12)), a head and biases. `rows` sets the 7 (3 gives empty shards
    on 4 ranks); `unused` adds a matrix that never gets a grad."""

    def __init__(self, rows=7, unused=False):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.narrow = torch.nn.Linear(16, rows)
        self.up = torch.nn.Linear(rows, 24)
        self.batched = torch.nn.Parameter(torch.randn(3, 16, 4) * 0.3)
        self.conv = torch.nn.Parameter(torch.randn(10, 3, 2, 2) * 0.3)
        self.head = torch.nn.Linear(24 + 12 + 10, VOCAB)
        if unused:
            self.unused = torch.nn.Parameter(torch.randn(6, 8))

    def forward(self, idx):
        x = self.embed(idx)
        a = self.up(torch.relu(self.narrow(x)))
        b = torch.einsum("btd,kde->btke", x, self.batched).flatten(2)
        c = torch.tanh(b) @ self.conv.flatten(1).T
        return self.head(torch.cat([a, b, c], dim=-1))


CONFIGS = {
    "normuon_pe_cwd": dict(ns_method="polar_express", normuon=0.95, cautious_wd=True, weight_decay=0.1),
    "ns5_adamw_scale_stats": dict(ns_method="newton_schulz", scale="match_adamw", weight_decay=0.05,
                                  sphere="project", sphere_dim=-1),
    "gram_spectral": dict(ns_method="gram_newton_schulz", scale="spectral", normuon=0.9, nesterov=False),
}


def build_optimizer(model, config, track_stats=False):
    muon = [p for n, p in model.named_parameters() if n.split(".")[0] in ("narrow", "up", "batched", "conv", "unused")
            and p.ndim >= 2]
    adam = [p for n, p in model.named_parameters() if not any(p is q for q in muon)]
    return M.Muon([dict(params=muon, lr=0.02, ns_dtype=torch.float32, name="muon", **CONFIGS[config]),
                   dict(params=adam, use_muon=False, lr=3e-3, weight_decay=0.01, cautious_wd=True, name="adam"),
                   dict(params=[], lr=0.02, name="empty")],  # an empty group is fine too
                  track_stats=track_stats)


def batch(t):
    gen = torch.Generator().manual_seed(100 + t)
    return torch.randint(0, VOCAB, (4, 5), generator=gen)


def train(model, opt, steps, start=0, drop_grad=None):
    """Every rank feeds the same global batch, so FSDP2's averaged gradients equal one process's."""
    for t in range(start, start + steps):
        idx = batch(t)
        loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.roll(1, -1).flatten())
        loss.backward()
        if drop_grad is not None:
            drop_grad()
        opt.step()
        opt.zero_grad(set_to_none=True)


def full_params(model):
    out = {}
    for n, p in model.named_parameters():
        out[n] = (p.full_tensor() if M.is_sharded(p) else p).detach().clone()
    return out


def reference(config, steps=STEPS, **net_kw):
    torch.manual_seed(0)
    model = Net(**net_kw)
    opt = build_optimizer(model, config, track_stats=True)
    train(model, opt, steps)
    return model, opt


def sharded_model(mesh, mixed=False, **net_kw):
    """fully_shard'ed Net; mixed=True leaves up.weight a plain (replicated) tensor, so one Muon
    group holds both kinds."""
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = Net(**net_kw)
    fully_shard(model.narrow, mesh=mesh)  # a second FSDP unit, as per-layer wrapping does
    fully_shard(model, mesh=mesh, ignored_params={model.up.weight} if mixed else None)
    return model


# -- multi-process harness ------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, out_dir, scenario):
    import torch.distributed as dist
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*returned a view tensor")  # FSDP2 on Linear over 3D input
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        result = globals()[scenario](rank, world, out_dir)  # a suite catches its scenarios' errors
    except Exception as e:  # the parent asserts on it; a traceback helps when it is unexpected
        result = dict(error=f"{type(e).__name__}: {e}", tb=traceback.format_exc())
    torch.save(result, os.path.join(out_dir, f"{scenario}_r{rank}.pt"))
    dist.destroy_process_group()


def spawn(scenario, world, tmp_path, timeout=60):
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, str(tmp_path), scenario)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, f"{scenario}: {len(hung)} rank(s) hung"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(tmp_path / f"{scenario}_r{r}.pt", weights_only=False) for r in range(world)]


def assert_matches(got, ref_model, tol=1e-5):
    assert "error" not in got, got.get("tb")
    for n, p in ref_model.named_parameters():
        torch.testing.assert_close(got["params"][n], p.detach(), atol=tol, rtol=tol, msg=n)


# -- scenarios (run inside the spawned ranks) -----------------------------------

def fsdp_configs(rank, world, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for config in CONFIGS:
        model = sharded_model(mesh)
        opt = build_optimizer(model, config, track_stats=True)
        train(model, opt, STEPS)
        local_rows = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}
        state_types = {k: type(v).__name__ for s in opt.state.values() for k, v in s.items()}
        out[config] = dict(params=full_params(model), stats=opt.stats(), local_rows=local_rows,
                           state_types=state_types, comm_bytes=opt.comm_bytes)
    errors = []
    for bad in (lambda: M.Muon([model.narrow.weight], sphere="project", sphere_dim=0),
                lambda: M.SingleDeviceMuon([model.narrow.weight])):
        try:
            bad()
        except ValueError as e:
            errors.append(str(e))
    out["errors"] = errors
    return out


def fsdp_empty_shards(rank, world, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    model = sharded_model(init_device_mesh("cpu", (world,)), rows=3, unused=True)
    opt = build_optimizer(model, "normuon_pe_cwd")
    train(model, opt, STEPS)
    return dict(params=full_params(model), narrow_rows=model.narrow.weight.to_local().shape[0],
                unused_state=len(opt.state[model.unused]))


def fsdp_mixed(rank, world, out_dir):
    """A plain parameter (identical grads on every rank, as after DDP) next to sharded ones."""
    from torch.distributed.device_mesh import init_device_mesh
    model = sharded_model(init_device_mesh("cpu", (world,)), mixed=True)
    opt = build_optimizer(model, "normuon_pe_cwd")
    train(model, opt, STEPS)
    return dict(params=full_params(model), up_is_plain=not M.is_sharded(model.up.weight))


def dcp_save(rank, world, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    model = sharded_model(init_device_mesh("cpu", (world,)))
    opt = build_optimizer(model, "normuon_pe_cwd")
    train(model, opt, 3)
    msd, osd = get_state_dict(model, opt)
    dcp.save(dict(model=msd, optim=osd), checkpoint_id=os.path.join(out_dir, "ckpt"))
    return {}


def dcp_load(rank, world, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    model = sharded_model(init_device_mesh("cpu", (world,)))
    opt = build_optimizer(model, "normuon_pe_cwd")
    msd, osd = get_state_dict(model, opt)
    sd = dict(model=msd, optim=osd)
    dcp.load(sd, checkpoint_id=os.path.join(out_dir, "ckpt"))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    steps = sorted({s["step"] for s in opt.state.values()})
    train(model, opt, 3, start=3)
    return dict(params=full_params(model), steps_after_load=steps)


def hsdp(rank, world, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    model = sharded_model(mesh)
    opt = build_optimizer(model, "normuon_pe_cwd")
    train(model, opt, STEPS)
    return dict(params=full_params(model), placements=str(model.narrow.weight.placements))


def mismatch_order(rank, world, out_dir):
    """Rank 1 lists the Muon parameters in another order (e.g. built from a set)."""
    from torch.distributed.device_mesh import init_device_mesh
    model = sharded_model(init_device_mesh("cpu", (world,)))
    opt = build_optimizer(model, "normuon_pe_cwd")
    if rank == 1:
        opt.param_groups[0]["params"].reverse()
    train(model, opt, 1)
    return {}


def mismatch_grad(rank, world, out_dir):
    """Rank 1 loses one sharded grad: its rows would get no update."""
    from torch.distributed.device_mesh import init_device_mesh
    model = sharded_model(init_device_mesh("cpu", (world,)))

    def drop():
        if rank == 1:
            model.up.weight.grad = None
    train(model, build_optimizer(model, "normuon_pe_cwd"), 1, drop_grad=drop)
    return {}


class SplitNet(torch.nn.Module):
    """Fused weights for Muon's split: an (18, 6) QKV whose middle block spans the two ranks' rows
    (9 + 9), and a (24, 6) weight in unequal blocks (5, 9, 10): wide, tall, tall."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 6)
        self.qkv = torch.nn.Linear(6, 18, bias=False)
        self.mixed = torch.nn.Linear(6, 24, bias=False)
        self.head = torch.nn.Linear(18 + 24, VOCAB)

    def forward(self, idx):
        x = self.embed(idx)
        return self.head(torch.cat([torch.tanh(self.qkv(x)), torch.tanh(self.mixed(x))], dim=-1))


def split_run(mesh=None, steps=STEPS, start=0, load=None):
    """SplitNet trained with split groups (NorMuon on, stats): fully_shard'ed on `mesh`, or one plain process;
    load: a DCP checkpoint to resume from (at step `start`)."""
    torch.manual_seed(0)
    model = SplitNet()
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard
        fully_shard(model, mesh=mesh)
    adam = [model.embed.weight, *model.head.parameters()]
    opt = M.Muon([dict(params=[model.qkv.weight], split=3, normuon=0.95, weight_decay=0.1, name="qkv"),
                  dict(params=[model.mixed.weight], split=(5, 9, 10), normuon=0.9, name="mixed"),
                  dict(params=adam, use_muon=False, lr=3e-3)], lr=0.02, ns_dtype=torch.float32, track_stats=True)
    if load is not None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        msd, osd = get_state_dict(model, opt)
        sd = dict(model=msd, optim=osd)
        dcp.load(sd, checkpoint_id=load)
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    train(model, opt, steps, start=start)
    return model, opt


def split_dcp_save(rank, world, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    model, opt = split_run(init_device_mesh("cpu", (world,)), steps=3)
    msd, osd = get_state_dict(model, opt)
    dcp.save(dict(model=msd, optim=osd), checkpoint_id=os.path.join(out_dir, "split_ckpt"))
    return {}


def split_dcp_load(rank, world, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    model, _ = split_run(init_device_mesh("cpu", (world,)), steps=3, start=3,
                         load=os.path.join(out_dir, "split_ckpt"))
    return dict(params=full_params(model))


def fsdp_split(rank, world, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    model, opt = split_run(init_device_mesh("cpu", (world,)))
    moments = {n: (type(s["second_moment"]).__name__, str(s["second_moment"].placements),
                   tuple(s["second_moment"].shape)) for n, p in model.named_parameters()
               for s in [opt.state[p]] if "second_moment" in s}
    return dict(params=full_params(model), stats=opt.stats(), moments=moments,
                local_rows=tuple(model.qkv.weight.to_local().shape))


def suite(names):
    """Several scenarios in one set of processes (process start-up dominates the run time).
    Scenarios that raise on every rank leave the group usable; they go last anyway."""
    def run(rank, world, out_dir):
        out = {}
        for name in names:
            try:
                out[name] = globals()[name](rank, world, out_dir)
            except Exception as e:  # the tests assert on it; the traceback helps when unexpected
                out[name] = dict(error=f"{type(e).__name__}: {e}", tb=traceback.format_exc())
        return out
    return run


two_rank_suite = suite(["fsdp_configs", "fsdp_mixed", "fsdp_split", "split_dcp_save", "dcp_save", "mismatch_order",
                        "mismatch_grad"])
one_rank_suite = suite(["dcp_load", "fsdp_split", "split_dcp_load"])
four_rank_suite = suite(["dcp_load", "fsdp_empty_shards", "hsdp"])


# -- tests ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def two_ranks(ckpt_dir):
    return spawn("two_rank_suite", 2, ckpt_dir)


@pytest.fixture(scope="module")
def four_ranks(ckpt_dir, two_ranks):  # loads the checkpoint the 2-rank suite saved
    return spawn("four_rank_suite", 4, ckpt_dir)


@pytest.mark.xdist_group("fsdp_suites")  # one worker runs the module fixture they share, once
def test_fsdp_two_ranks_equal_one_process(two_ranks):
    for config in CONFIGS:
        ref_model, ref_opt = reference(config)
        for got in two_ranks:
            got = got["fsdp_configs"]
            assert "error" not in got, got.get("tb")
            assert_matches(got[config], ref_model)
            # optimizer state is sharded like the parameters (DTensors), so memory is ~1/world
            assert set(got[config]["state_types"].values()) <= {"DTensor", "int"}
            # track_stats: the same numbers as one process, from the owner's whole matrices
            for s, r in zip(got[config]["stats"], ref_opt.stats()):
                assert s["shape"] == r["shape"]
                assert s["update_rms"] == pytest.approx(r["update_rms"], rel=1e-4)
                assert s["ortho_error"] == pytest.approx(r["ortho_error"], rel=1e-3, abs=1e-5)
        r0, r1 = (got["fsdp_configs"][config] for got in two_ranks)
        assert r0["local_rows"]["narrow.weight"] == (4, 16) and r1["local_rows"]["narrow.weight"] == (3, 16)
        assert r0["local_rows"]["batched"] == (2, 16, 4)  # the batch dim is sharded: 2 + 1 matrices
        assert r0["comm_bytes"] > 0
    sphere, single = two_ranks[0]["fsdp_configs"]["errors"]
    assert "sphere_dim=0 normalizes along dim 0, which FSDP2 shards" in sphere and "sphere_dim other than 0" in sphere
    assert "distributed=False" in single and "use Muon" in single


@pytest.mark.xdist_group("fsdp_suites")  # one worker runs the module fixture they share, once
def test_plain_and_sharded_parameters_mixed(two_ranks):
    ref_model, _ = reference("normuon_pe_cwd")
    for got in two_ranks:
        assert got["fsdp_mixed"].get("up_is_plain"), got["fsdp_mixed"].get("tb")
        assert_matches(got["fsdp_mixed"], ref_model)


@pytest.mark.xdist_group("fsdp_suites")  # one worker runs the module fixture they share, once
def test_four_ranks_empty_shards_and_none_grad(four_ranks):
    ref_model, _ = reference("normuon_pe_cwd", rows=3, unused=True)
    for got in four_ranks:
        got = got["fsdp_empty_shards"]
        assert_matches(got, ref_model)
        assert got["unused_state"] == 0  # never had a grad: skipped on every rank, no state
    assert [got["fsdp_empty_shards"]["narrow_rows"] for got in four_ranks] == [1, 1, 1, 0]


@pytest.mark.xdist_group("fsdp_suites")  # one worker runs the module fixture they share, once
def test_dcp_save_two_ranks_load_one_rank(ckpt_dir, two_ranks):
    assert all("error" not in got["dcp_save"] for got in two_ranks), two_ranks[0]["dcp_save"].get("tb")
    (got,) = spawn("one_rank_suite", 1, ckpt_dir)
    got = got["dcp_load"]
    assert "error" not in got, got.get("tb")
    assert got["steps_after_load"] == [3]
    assert_matches(got, reference("normuon_pe_cwd")[0])


@pytest.mark.xdist_group("fsdp_suites")  # one worker runs the module fixture they share, once
def test_dcp_save_two_ranks_load_four_ranks(four_ranks):
    ref_model, _ = reference("normuon_pe_cwd")
    for got in four_ranks:
        assert got["dcp_load"].get("steps_after_load") == [3], got["dcp_load"].get("tb")
        assert_matches(got["dcp_load"], ref_model)


@pytest.mark.xdist_group("fsdp_suites")  # one worker runs the module fixture they share, once
def test_hsdp_2x2_mesh(four_ranks):
    ref_model, _ = reference("normuon_pe_cwd")
    for got in four_ranks:
        assert_matches(got["hsdp"], ref_model)
    assert four_ranks[0]["hsdp"]["placements"] == "(Replicate(), Shard(dim=0))"


@pytest.mark.xdist_group("fsdp_suites")  # one worker runs the module fixture they share, once
def test_split_blocks_spanning_shards_equal_one_process(ckpt_dir, two_ranks):
    """split under FSDP2: blocks that span two ranks' rows, unequal blocks, NorMuon per block (its
    statistic one replicated vector per parameter) and stats per block equal one plain process; so does
    a 1-rank mesh (whole matrices)."""
    ref_model, ref_opt = split_run()
    (one,) = spawn("one_rank_suite", 1, ckpt_dir)
    runs = [got["fsdp_split"] for got in two_ranks] + [one["fsdp_split"]]
    for got in runs:
        assert_matches(got, ref_model)
        assert [(s["group"], s["shape"], s["block"]) for s in got["stats"]] == \
            [(s["group"], s["shape"], s["block"]) for s in ref_opt.stats()]
        for s, r in zip(got["stats"], ref_opt.stats()):
            assert s["update_rms"] == pytest.approx(r["update_rms"], rel=1e-4)
            assert s["ortho_error"] == pytest.approx(r["ortho_error"], rel=1e-3, abs=1e-5)
        assert got["moments"]["qkv.weight"][0] == "DTensor" and got["moments"]["qkv.weight"][2] == (18,)
        assert got["moments"]["mixed.weight"][2] == (6 + 9 + 10,)  # the wide block: a statistic per column
    assert [got["local_rows"] for got in runs] == [(9, 6), (9, 6), (18, 6)]
    # DCP: saved by 2 ranks after 3 steps, loaded by 1 rank, 3 more steps: the uninterrupted 6 steps
    assert all("error" not in got["split_dcp_save"] for got in two_ranks), two_ranks[0]["split_dcp_save"].get("tb")
    assert_matches(one["split_dcp_load"], ref_model)


@pytest.mark.parametrize("scenario, message", [
    ("mismatch_order",
     r"ranks disagree.*parameter 0 of param group 0 \('muon'\): rank 0 has .*\(3, 16, 4\).*rank 1 has"),
    ("mismatch_grad", r"parameter \d of param group 0 \('muon'\) \(shape \(24, 7\), sharded\).*gradient on some ranks"),
])
@pytest.mark.xdist_group("fsdp_suites")  # one worker runs the module fixture they share, once
def test_rank_mismatch_raises_instead_of_hanging(two_ranks, scenario, message):
    import re
    for got in two_ranks:
        got = got[scenario]
        assert "error" in got and re.search(message, got["error"]), got


def test_one_rank_mesh_and_chunk_rows():
    """On a 1-rank mesh nothing is really sharded: sphere along dim 0 and the single-device
    wrappers are fine. chunk_rows follows torch.chunk, as fully_shard does."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.device_mesh import init_device_mesh
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        p = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
        M.Muon([p], sphere="project", sphere_dim=0)  # one rank: dim 0 is whole, fine
        M.SingleDeviceMuon([p])
        assert M.chunk_rows(7, 2) == [4, 3] and M.chunk_rows(3, 4) == [1, 1, 1, 0]
        assert M.chunk_rows(5, 4) == [2, 2, 1, 0]
    finally:
        dist.destroy_process_group()
