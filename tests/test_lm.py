"""Tests for model_keller.py and train_muon.py on tiny models and synthetic shards written here.
The 2-process test runs the real `torchrun` with gloo on CPU."""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, ROOT)
import train_muon  # noqa: E402
from model_keller import GPT, GPTConfig  # noqa: E402
from prepare_fineweb import shard_path, write_shard  # noqa: E402

VOCAB = 64
TINY = dict(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, grad_accum_steps=2,
            eval_every=10, eval_tokens=256, log_every=1000, ckpt_every=0, warmup_steps=2, momentum_muon_warmup=5,
            compile=False, device="cpu", threads=1)


def synthetic_tokens(n, seed):
    """A learnable stream: runs of an arithmetic sequence mod VOCAB with random starts and strides."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        start, stride, length = rng.integers(VOCAB), rng.integers(1, 4), rng.integers(8, 24)
        out.extend((start + stride * np.arange(length)) % VOCAB)
    return np.array(out[:n])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("shards"))
    for i in range(3):
        write_shard(shard_path(d, i), synthetic_tokens(6000, seed=i))
    return d


def config(data_dir, out_dir, **overrides):
    return {**train_muon.CONFIG, **TINY, "data_dir": data_dir, "out_dir": str(out_dir), **overrides}


def train_losses(metrics, label):
    return [p["loss"] for p in metrics["runs"][label]["train"]]


def val_losses(metrics, label):
    return [p["loss"] for p in metrics["runs"][label]["val"]]


def load_metrics(out):
    return json.load(open(os.path.join(out, "metrics.json")))


def cli_args(data_dir, out_dir, **overrides):
    """The --name=value arguments of config(...): the same tiny run as a train_muon.py process."""
    return [f"--{k}={v}" for k, v in {**TINY, "data_dir": data_dir, "out_dir": str(out_dir), **overrides}.items()]


def run_script(*args, timeout=300):
    return subprocess.run([sys.executable, "train_muon.py", *args], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=timeout)


# -- model ------------------------------------------------------------------------------------

def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=32))


def test_model_shapes_and_initial_loss():
    model = tiny_model()
    idx = torch.randint(0, VOCAB, (3, 16))
    assert model(idx).shape == (3, 16, VOCAB)
    loss = model(idx, idx)
    assert loss.ndim == 0 and abs(loss.item() - np.log(VOCAB)) < 1e-5  # zero head: uniform prediction
    assert model.num_params() == model.num_params(non_embedding=True) + VOCAB * 32
    assert model.estimate_mfu(1000, 1.0, device_name="NVIDIA H100 80GB HBM3") > 0
    assert model.estimate_mfu(1000, 1.0, device_name="cpu") is None
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_model_is_causal():
    model = tiny_model()
    for p in model.parameters():  # zero-initialized projections/head would hide any leak
        torch.nn.init.normal_(p, std=0.2)
    a = torch.randint(0, VOCAB, (2, 16))
    b = a.clone()
    b[:, 9:] = torch.randint(0, VOCAB, (2, 7))
    la, lb = model(a), model(b)
    assert torch.allclose(la[:, :9], lb[:, :9], atol=1e-5)
    assert not torch.allclose(la[:, 9:], lb[:, 9:], atol=1e-3)


def test_loss_takes_non_contiguous_targets():
    model = tiny_model()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randint(0, VOCAB, (3, 17))
    assert torch.equal(model(x[:, :-1], x[:, 1:]), model(x[:, :-1], x[:, 1:].contiguous()))


def test_with_the_zero_head_only_the_head_has_a_gradient_at_step_0():
    """What model_keller's docstring says about the zero-initialized head and residual projections."""
    model = tiny_model()
    x = torch.randint(0, VOCAB, (3, 17))
    model(x[:, :-1], x[:, 1:]).backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0]
    assert with_grad == ["lm_head.weight"]


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_optimizer_groups_cover_every_parameter_once(name):
    model = tiny_model()
    opt = train_muon.make_optimizer(name, model, train_muon.CONFIG)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    if name == "muon":
        groups = {g["name"]: g for g in opt.param_groups}
        assert all(p.ndim == 2 for p in groups["muon"]["params"]) and groups["muon"]["lr"] == 0.05
        assert groups["head"]["params"][0] is model.lm_head.weight and groups["head"]["lr"] == 0.008
        assert groups["embed"]["params"][0] is model.wte.weight and groups["embed"]["lr"] == 0.6
        assert groups["head"]["betas"] == (0.8, 0.95) and groups["head"]["eps"] == 1e-10
    else:
        assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["weight_decay"] == 0.1


def test_muon_run_settings_reach_the_muon_group():
    cfg = dict(train_muon.CONFIG, weight_decay_muon=0.1, normuon=0.95, cautious_wd=True, ns_method="polar_express",
               betas_adam="0.9,0.99")
    groups = {g["name"]: g for g in train_muon.make_optimizer("muon", tiny_model(), cfg, lr=0.03).param_groups}
    muon = groups["muon"]
    assert muon["weight_decay"] == 0.1 and muon["normuon"] == 0.95 and muon["cautious_wd"] and muon["lr"] == 0.03
    assert muon["ns_method"] == "polar_express" and groups["embed"]["betas"] == (0.9, 0.99)
    assert groups["head"]["weight_decay"] == 0.0
    with pytest.raises(SystemExit, match="--betas_adam=0.9: expected two comma-separated numbers"):
        train_muon.make_optimizer("muon", tiny_model(), dict(cfg, betas_adam="0.9"))


def ids(params):
    return [id(p) for p in params]


def model_with_a_gain(fused_qkv=False):
    """The tiny model plus a < 2D parameter, so that the scalar group is not empty."""
    model = tiny_model()
    if fused_qkv:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=32, fused_qkv=True))
    model.blocks[0].gain = torch.nn.Parameter(torch.ones(32))
    return model


def test_the_adamw_run_differs_from_the_muon_run_only_in_the_hidden_matrices():
    """adamw_groups=per_group (the default): the head, the embedding and the scalars get the Muon run's Adam groups
    (their LR knobs, betas_adam, eps_adam, no weight decay); only the hidden matrices get AdamW instead of Muon."""
    cfg = dict(train_muon.CONFIG, lr_head=0.02, lr_embed=0.3, lr_scalar=0.05, betas_adam="0.7,0.9", eps_adam=1e-9)
    model = model_with_a_gain()
    muon = {g["name"]: g for g in train_muon.make_optimizer("muon", model, cfg).param_groups}
    opt = train_muon.make_optimizer("adamw", model, cfg, lr=3e-3)
    adamw = {g["name"]: g for g in opt.param_groups}
    assert isinstance(opt, torch.optim.AdamW) and set(muon) == {"muon", "head", "embed", "scalar"}
    assert set(adamw) == {"adamw", "head", "embed", "scalar"}
    for name in ("head", "embed", "scalar"):
        assert ids(adamw[name]["params"]) == ids(muon[name]["params"])
        assert [adamw[name][k] for k in ("lr", "betas", "eps", "weight_decay")] == \
            [muon[name][k] for k in ("lr", "betas", "eps", "weight_decay")]
    assert muon["embed"]["lr"] == 0.3 and muon["scalar"]["betas"] == (0.7, 0.9) and muon["head"]["weight_decay"] == 0
    hidden = [p for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2]
    assert ids(adamw["adamw"]["params"]) == ids(muon["muon"]["params"]) == ids(hidden)
    assert [adamw["adamw"][k] for k in ("lr", "betas", "eps", "weight_decay")] == [3e-3, (0.9, 0.95), 1e-8, 0.1]


def test_one_lr_adamw_steps_exactly_like_the_earlier_adamw_arm():
    """adamw_groups=one_lr: torch AdamW at lr_adamw on every parameter, weight decay on every matrix (embedding
    and head too), none on < 2D parameters, betas_adamw, eps_adamw: the AdamW arm of the earlier results."""
    ours, earlier = model_with_a_gain(), model_with_a_gain()
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.2)
    earlier.load_state_dict(ours.state_dict())
    opt = train_muon.make_optimizer("adamw", ours, dict(train_muon.CONFIG, adamw_groups="one_lr"))
    ref = torch.optim.AdamW([dict(params=[p for p in earlier.parameters() if p.ndim >= 2], weight_decay=0.1),
                             dict(params=[p for p in earlier.parameters() if p.ndim < 2], weight_decay=0.0)],
                            lr=1.5e-3, betas=(0.9, 0.95), eps=1e-8)
    x = torch.randint(0, VOCAB, (3, 17))
    for _ in range(3):
        for model, o in ((ours, opt), (earlier, ref)):
            (model(x[:, :-1], x[:, 1:]) + model.blocks[0].gain.square().sum()).backward()
            o.step()
            o.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), earlier.parameters()))


def test_fused_qkv_model_gives_the_logits_of_the_separate_one():
    """GPTConfig(fused_qkv=True): one (3d, d) weight qkv, rows q | k | v. With the weights copied from the
    model with separate c_q, c_k, c_v it computes the same logits; from the same seed it has those weights."""
    separate = tiny_model()
    for p in separate.parameters():
        torch.nn.init.normal_(p, std=0.2)
    torch.manual_seed(0)
    fused = GPT(GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=32, fused_qkv=True))
    state = separate.state_dict()
    for i in range(2):
        q, k, v = (state.pop(f"blocks.{i}.attn.c_{n}.weight") for n in "qkv")
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, k, v])
    fused.load_state_dict(state)  # strict: no other parameter differs
    idx = torch.randint(0, VOCAB, (3, 16))
    torch.testing.assert_close(fused(idx), separate(idx), rtol=1e-6, atol=1e-6)
    torch.manual_seed(0)
    seeded = GPT(GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=32, fused_qkv=True))
    init = tiny_model().state_dict()
    qkv = torch.cat([init[f"blocks.1.attn.c_{n}.weight"] for n in "qkv"])
    assert torch.equal(seeded.blocks[1].attn.qkv.weight, qkv)
    assert "blocks.0.attn.c_q.weight" in init and "blocks.0.attn.qkv.weight" not in init  # the default: unchanged


@pytest.mark.parametrize("muon_split, blocks", [("none", None), ("qkv", (32,) * 3), ("heads", (16,) * 6)])
def test_muon_split_puts_the_fused_qkv_weights_in_a_split_muon_group(muon_split, blocks):
    model = model_with_a_gain(fused_qkv=True)
    cfg = dict(train_muon.CONFIG, n_head=2, fused_qkv=True, muon_split=muon_split)
    groups = {g["name"]: g for g in train_muon.make_optimizer("muon", model, cfg).param_groups}
    qkv = [model.blocks[i].attn.qkv.weight for i in range(2)]
    if blocks is None:
        assert "muon_fused" not in groups and set(ids(qkv)) <= set(ids(groups["muon"]["params"]))
    else:
        assert ids(groups["muon_fused"]["params"]) == ids(qkv) and tuple(groups["muon_fused"]["split"]) == blocks
        assert not set(ids(qkv)) & set(ids(groups["muon"]["params"]))
        assert groups["muon_fused"]["lr"] == groups["muon"]["lr"] == 0.05


def test_fused_qkv_split_in_three_trains_like_separate_q_k_v(data_dir, tmp_path):
    """The same seed gives the fused model the separate model's weights, and split=3 updates the three blocks as
    three matrices: the runs agree to float rounding (the fused matmul sums in another order)."""
    cfg = config(data_dir, tmp_path, max_steps=6, optimizers="muon", eval_every=3, save_checkpoint=False)
    separate = train_muon.train(dict(cfg, out_dir=str(tmp_path / "separate")))
    split = train_muon.train(dict(cfg, out_dir=str(tmp_path / "split"), fused_qkv=True, muon_split="qkv"))
    whole = train_muon.train(dict(cfg, out_dir=str(tmp_path / "whole"), fused_qkv=True))
    gap = {k: np.abs(np.subtract(train_losses(m, "muon"), train_losses(separate, "muon"))).max()
           for k, m in (("split", split), ("whole", whole))}
    assert gap["split"] < 1e-6 and gap["whole"] > 5e-6, gap  # whole: one polar factor for q, k and v together
    assert split["runs"]["muon"]["identity"]["muon_split"] == "qkv" and split["runs"]["muon"]["identity"]["fused_qkv"]


def test_model_file_imports_torch_only():
    import ast
    tree = ast.parse(open(os.path.join(ROOT, "model_keller.py")).read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"math", "dataclasses", "torch"} and not hasattr(GPT, "configure_optimizers")


# -- schedule, loader, overrides --------------------------------------------------------------------

def test_wsd_schedule_and_momentum_warmup():
    lr = [train_muon.lr_multiplier(s, 100, 10, 0.4) for s in range(100)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == 1.0 and lr[59] == 1.0
    assert lr[60] == 1.0 and lr[80] == pytest.approx(0.5) and lr[99] == pytest.approx(1 / 40)
    assert train_muon.muon_momentum_at(0, 300) == pytest.approx(0.85)
    assert train_muon.muon_momentum_at(150, 300) == pytest.approx(0.90)
    assert train_muon.muon_momentum_at(1000, 300) == pytest.approx(0.95)


def test_ddp_ranks_read_disjoint_windows_that_tile_the_single_process_stream(data_dir):
    files = train_muon.find_shards(data_dir, "fineweb_train_*.bin")
    single = train_muon.DataLoader(files, 4, 16, accum=2, seed=3)
    ranks = [train_muon.DataLoader(files, 4, 16, rank=r, world=2, seed=3) for r in range(2)]
    seen = []
    for _ in range(200):  # crosses shard boundaries and wraps around
        (x0, y0), (x1, y1) = single.next_batches()
        [(a, b)], [(c, d)] = ranks[0].next_batches(), ranks[1].next_batches()
        assert torch.equal(a, x0) and torch.equal(b, y0) and torch.equal(c, x1) and torch.equal(d, y1)
        assert torch.equal(x0[:, 1:], y0[:, :-1]) and torch.equal(x1[0, :1], y0[-1, -1:])  # adjacent windows
        seen.append((single.shard, single.step))
    assert {s for s, _ in seen} == {0, 1}  # both train shards used


def test_the_seed_changes_the_batch_order_and_no_window_repeats_within_a_shard(data_dir):
    files = train_muon.find_shards(data_dir, "fineweb_train_*.bin")
    span = 4 * 16

    def first_shard_windows(seed):
        loader, windows = train_muon.DataLoader(files, 4, 16, seed=seed), []
        while loader.shard == 0 and loader.step < len(loader.shards[0]) // span:
            [(x, _)] = loader.next_batches()
            windows.append(tuple(x.flatten().tolist()))
        return windows

    in_order, seed0, seed1 = first_shard_windows(None), first_shard_windows(0), first_shard_windows(1)
    assert len(set(in_order)) == len(in_order) > 10  # each window once
    assert sorted(seed0) == sorted(seed1) == sorted(in_order)  # the same windows ...
    assert len({tuple(in_order), tuple(seed0), tuple(seed1)}) == 3  # ... in three orders
    assert first_shard_windows(1) == seed1


def test_the_val_windows_are_spread_over_the_whole_val_shard(tmp_path):
    write_shard(str(tmp_path / "fineweb_val_000000.bin"), np.arange(10001) % 60000)  # token = its position
    write_shard(str(tmp_path / "fineweb_train_000001.bin"), np.arange(2000))
    files = [str(tmp_path / "fineweb_train_000001.bin")]
    cfg = dict(train_muon.CONFIG, batch_size=2, block_size=8, grad_accum_steps=1, eval_tokens=160, vocab_top=0)
    _, windows = train_muon.load_data(cfg, files, str(tmp_path / "fineweb_val_000000.bin"), world=1)
    starts = [int(x[0, 0]) for x, _ in windows]
    assert len(windows) == 10 and starts[0] == 0 and starts[-1] >= 10000 - 2 * 16  # first to last part
    assert all(b - a >= 16 for a, b in zip(starts, starts[1:]))  # disjoint windows
    assert all(torch.equal(x.flatten()[1:], y.flatten()[:-1]) for x, y in windows)
    with pytest.raises(SystemExit, match="less than one batch"):
        train_muon.load_data(dict(cfg, eval_tokens=15), files, str(tmp_path / "fineweb_val_000000.bin"), world=1)


def test_vocab_top_maps_rare_tokens_to_one_id(tmp_path):
    path = str(tmp_path / "fineweb_train_000001.bin")
    write_shard(path, np.array([5] * 50 + [9] * 30 + [7] * 20 + [1, 2, 3] * 10))
    table = train_muon.build_vocab_map([train_muon.read_shard(path)], 4)
    assert table[5] == 0 and table[9] == 1 and table[7] == 2 and table[1] == table[2] == table[3] == table[60000] == 3
    loader = train_muon.DataLoader([path], 2, 8, vocab_map=table)
    [(x, y)] = loader.next_batches()
    assert x.max() <= 3 and x[0, 0] == 0


def test_overrides_parse_and_reject():
    cfg = train_muon.parse_overrides(["--max_steps=20", "--lr_muon=1", "--optimizers=muon,adamw", "--eval_tokens=1e4",
                                      "--resume=True", "--compile=False", "--betas_adamw=0.9,0.99"], train_muon.CONFIG)
    assert cfg["max_steps"] == 20 and cfg["lr_muon"] == 1.0 and cfg["optimizers"] == "muon,adamw"
    assert cfg["eval_tokens"] == 10000 and cfg["resume"] is True and cfg["compile"] is False
    assert cfg["betas_adamw"] == "0.9,0.99"
    with pytest.raises(SystemExit, match="unknown setting --max_step;"):
        train_muon.parse_overrides(["--max_step=20"], train_muon.CONFIG)
    with pytest.raises(SystemExit, match="unknown setting --muon_lr"):  # renamed: lr_muon
        train_muon.parse_overrides(["--muon_lr=0.1"], train_muon.CONFIG)
    with pytest.raises(SystemExit, match="expected a number"):
        train_muon.parse_overrides(["--max_steps=abc"], train_muon.CONFIG)
    with pytest.raises(SystemExit, match="expected True or False"):
        train_muon.parse_overrides(["--resume=1"], train_muon.CONFIG)
    assert train_muon.parse_optimizers("muon:0.03,adamw") == [("muon", 0.03, "muon:0.03"), ("adamw", None, "adamw")]
    with pytest.raises(SystemExit, match="unknown optimizer 'sgd'"):
        train_muon.parse_optimizers("sgd")


# -- training ------------------------------------------------------------------------------------

def test_30_steps_lower_the_loss_for_both(data_dir, tmp_path, capsys):
    metrics = train_muon.train(config(data_dir, tmp_path, max_steps=30, optimizers="muon,adamw:3e-3"))
    for label in ("muon", "adamw:0.003"):
        val = [p["loss"] for p in metrics["runs"][label]["val"]]
        assert val[0] == pytest.approx(np.log(VOCAB), abs=1e-4)  # same init: uniform prediction
        assert val[-1] < val[0] - 0.5, (label, val)
        assert metrics["summary"]["final_val"][label] == val[-1]
    saved = json.load(open(tmp_path / "metrics.json"))
    assert len(saved["runs"]["muon"]["train"]) == 30 and saved["summary"] == metrics["summary"]
    assert (tmp_path / "loss.png").stat().st_size > 1000 and (tmp_path / "ckpt" / "adamw_0.003.pt").exists()
    assert saved["code"] == train_muon.code_hash() == saved["runs"]["muon"]["identity"]["source_hash"]
    assert torch.load(tmp_path / "ckpt" / "muon.pt", weights_only=False)["code"] == saved["code"]
    assert f"adamw:0.003: final val loss {val[-1]:.4f}" in capsys.readouterr().out


def test_resume_reproduces_the_uninterrupted_loss_curve_exactly(data_dir, tmp_path):
    """Runs train one after another: stop inside the first run, then inside the second, resume each time."""
    straight = train_muon.train(config(data_dir, tmp_path / "a", max_steps=20, optimizers="muon,adamw"))
    cfg = config(data_dir, tmp_path / "b", max_steps=20, optimizers="muon,adamw", stop_after_steps=15)
    train_muon.train(cfg)
    ckpt = torch.load(tmp_path / "b" / "ckpt" / "muon.pt", weights_only=False)
    assert ckpt["step"] == 15 and ckpt["loader"]["step"] > 0 and not ckpt["finished"]
    assert not (tmp_path / "b" / "ckpt" / "adamw.pt").exists()
    assert load_metrics(tmp_path / "b")["runs"]["muon"]["status"] == "stopped"
    train_muon.train(dict(cfg, resume=True))  # muon 15 -> 20 (finished), adamw 0 -> 10
    assert torch.load(tmp_path / "b" / "ckpt" / "adamw.pt", weights_only=False)["step"] == 10
    resumed = train_muon.train(dict(cfg, resume=True, stop_after_steps=0))
    for label in ("muon", "adamw"):
        assert train_losses(resumed, label) == train_losses(straight, label)  # bit-identical on CPU
        assert [p["loss"] for p in resumed["runs"][label]["val"]] == [p["loss"] for p in straight["runs"][label]["val"]]
    assert resumed["summary"]["final_val"] == straight["summary"]["final_val"]
    assert {r["status"] for r in resumed["runs"].values()} == {"finished"}
    with pytest.raises(SystemExit, match="n_layer: 2 -> 3"):
        train_muon.train(dict(cfg, resume=True, n_layer=3))


def test_stop_after_steps_counts_steps_per_invocation(data_dir, tmp_path):
    """A job script rerunning the same command with --resume=True advances stop_after_steps per job."""
    cfg = config(data_dir, tmp_path, max_steps=12, optimizers="adamw", stop_after_steps=5, eval_every=100)
    steps = []
    for job in range(3):
        train_muon.train(dict(cfg, resume=job > 0))
        steps.append(torch.load(tmp_path / "ckpt" / "adamw.pt", weights_only=False)["step"])
    assert steps == [5, 10, 12]


def test_resume_of_a_vocab_top_run_continues_exactly_and_refuses_other_shards(tmp_path):
    """The documented job-script workflow with --vocab_top (vocab_size left at its default); a run is tied to
    the data it was trained on: shards added or changed since are other data, not resumed."""
    d = tmp_path / "data"
    d.mkdir()
    for i in range(2):
        write_shard(shard_path(str(d), i), synthetic_tokens(3000, seed=i))
    cfg = config(str(d), tmp_path / "b", max_steps=8, optimizers="adamw", vocab_top=32, eval_every=4)
    straight = train_muon.train(dict(cfg, out_dir=str(tmp_path / "a")))
    train_muon.train(dict(cfg, stop_after_steps=4))
    resumed = train_muon.train(dict(cfg, resume=True))
    assert train_losses(resumed, "adamw") == train_losses(straight, "adamw")
    assert val_losses(resumed, "adamw") == val_losses(straight, "adamw")
    assert resumed["runs"]["adamw"]["identity"]["vocab_size"] == 32
    write_shard(shard_path(str(d), 2), np.random.default_rng(5).integers(32, VOCAB, 3000))
    with pytest.raises(SystemExit, match=r"data_hash: '[0-9a-f]{16}' -> '[0-9a-f]{16}'.*--resume=False"):
        train_muon.train(dict(cfg, resume=True))


def test_resume_from_a_bad_checkpoint_says_so(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path, max_steps=4, optimizers="adamw", eval_every=100)
    with pytest.raises(SystemExit, match="no checkpoint at .*adamw.pt; run without --resume"):
        train_muon.train(dict(cfg, resume=True))
    train_muon.train(dict(cfg, stop_after_steps=2))
    path = tmp_path / "ckpt" / "adamw.pt"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # truncated (e.g. copied while being written)
    with pytest.raises(SystemExit, match="not a readable checkpoint .*truncated"):
        train_muon.train(dict(cfg, resume=True))
    torch.save({"step": 3}, path)  # some other script's file
    with pytest.raises(SystemExit, match="was not written by train_muon.py"):
        train_muon.train(dict(cfg, resume=True))


# -- run identity, resume, settings, statuses and exit codes ---------------------------------------------

def test_run_identity_and_status_are_recorded_in_metrics_and_checkpoints(data_dir, tmp_path):
    from muon_optim import compute_dtype_rule
    train_muon.train(config(data_dir, tmp_path, max_steps=3, optimizers="muon,adamw:3e-3", eval_every=100))
    saved = load_metrics(tmp_path)
    shards = sorted(glob.glob(os.path.join(data_dir, "fineweb_train_*.bin"))) + [shard_path(data_dir, 0)]
    for label, file in (("muon", "muon.pt"), ("adamw:0.003", "adamw_0.003.pt")):
        identity = saved["runs"][label]["identity"]
        assert saved["runs"][label]["status"] == "finished" and identity["run"] == label
        assert identity["source_hash"] == saved["code"] == train_muon.code_hash()
        assert identity["data_hash"] == train_muon.data_fingerprint(shards)
        assert identity["compute_dtype"] == compute_dtype_rule("cpu") and identity["max_steps"] == 3
        assert torch.load(tmp_path / "ckpt" / file, weights_only=False)["identity"] == identity
    assert saved["runs"]["muon"]["identity"] != saved["runs"]["adamw:0.003"]["identity"]


def test_resume_with_other_optimizer_settings_is_refused_naming_each(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path, max_steps=6, optimizers="muon", stop_after_steps=2, eval_every=100)
    train_muon.train(cfg)
    refused = (r"normuon: 0.0 -> 0.95; ns_method: 'newton_schulz' -> 'polar_express'; weight_decay_muon: 0.0 -> "
               r"5.0\). Resume with the checkpoint's settings, code and data, or use --resume=False to start over, "
               r"or another --out_dir")
    with pytest.raises(SystemExit, match=refused) as e:
        train_muon.train(dict(cfg, resume=True, weight_decay_muon=5.0, normuon=0.95, ns_method="polar_express"))
    assert "\n" not in str(e.value)
    resumed = train_muon.train(dict(cfg, resume=True, stop_after_steps=0, eval_every=3, log_every=2, ckpt_every=4))
    assert resumed["runs"]["muon"]["status"] == "finished"  # cadences are resumable


def test_resumed_optimizer_groups_hold_the_command_lines_values(data_dir, tmp_path):
    """torch's Optimizer.load_state_dict restores every group option from the checkpoint: the command line's
    must win (here the checkpoint's groups are edited as if made with another weight decay)."""
    cfg = config(data_dir, tmp_path / "b", max_steps=6, optimizers="muon", eval_every=3)
    straight = train_muon.train(dict(cfg, out_dir=str(tmp_path / "a")))
    train_muon.train(dict(cfg, stop_after_steps=3))
    path = tmp_path / "b" / "ckpt" / "muon.pt"
    ckpt = torch.load(path, weights_only=False)
    for group in ckpt["optimizer"]["param_groups"]:
        group["weight_decay"] = 5.0
    torch.save(ckpt, path)
    resumed = train_muon.train(dict(cfg, resume=True))
    assert train_losses(resumed, "muon") == train_losses(straight, "muon")


def test_resume_does_not_keep_a_finished_run_of_other_settings_or_code(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path, max_steps=3, optimizers="adamw", eval_every=100)
    train_muon.train(cfg)
    with pytest.raises(SystemExit, match=r"lr_adamw: 0.0015 -> 0.003"):
        train_muon.train(dict(cfg, resume=True, lr_adamw=3e-3))
    path = tmp_path / "ckpt" / "adamw.pt"
    ckpt = torch.load(path, weights_only=False)
    # as if train_muon.py, model_keller.py or muon_optim.py had changed since
    ckpt["code"], ckpt.setdefault("identity", {})["source_hash"] = "0123456789abcdef", "0123456789abcdef"
    torch.save(ckpt, path)
    with pytest.raises(SystemExit, match=r"source_hash: '0123456789abcdef' -> '[0-9a-f]{16}'\). .*--resume=False"):
        train_muon.train(dict(cfg, resume=True))
    del ckpt["identity"]  # a checkpoint from before run identities
    torch.save(ckpt, path)
    with pytest.raises(SystemExit, match=r"records no run identity.*--resume=False"):
        train_muon.train(dict(cfg, resume=True))


def test_fsdp_checkpoint_interrupted_between_its_two_renames_is_resumed(data_dir, tmp_path):
    """write_checkpoint moves the old FSDP checkpoint directory aside, then renames the new one into place: a
    crash between the two leaves <run>.old and a complete <run>.tmp; resume must find one of them."""
    args = cli_args(data_dir, tmp_path, max_steps=6, optimizers="adamw", eval_every=100, fsdp=True)
    first = run_script(*args, "--stop_after_steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt = str(tmp_path / "ckpt" / "adamw")
    shutil.copytree(ckpt, ckpt + ".step2")
    second = run_script(*args, "--stop_after_steps=2", "--resume=True")
    assert second.returncode == 0, second.stderr[-2000:]
    os.rename(ckpt, ckpt + ".tmp")  # step 4, complete (meta.pt is written last)
    os.rename(ckpt + ".step2", ckpt + ".old")
    third = run_script(*args, "--resume=True")
    assert third.returncode == 0 and "resumed from" in third.stdout and "at step 4" in third.stdout, third.stderr
    run = load_metrics(tmp_path)["runs"]["adamw"]
    assert run["status"] == "finished" and [p["step"] for p in run["train"]] == list(range(1, 7))
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["adamw"]


def test_checkpoint_lookup_skips_an_incomplete_fsdp_temp_directory(tmp_path):
    path = str(tmp_path / "ckpt" / "muon")
    os.makedirs(path + ".tmp")  # dcp.save was interrupted: no meta.pt
    assert train_muon.find_checkpoint(path, use_fsdp=True) is None
    os.makedirs(path + ".old")
    torch.save({}, os.path.join(path + ".old", "meta.pt"))
    assert train_muon.find_checkpoint(path, use_fsdp=True) == path + ".old"


BAD_SETTINGS = [("eval_every", 0), ("log_every", 0), ("batch_size", 0), ("grad_accum_steps", 0),
                ("optimizers", "muon:abc"), ("optimizers", "adamw,muon:-1"), ("n_head", 3), ("n_embd", 30),
                ("ns_method", "newton_shulz"), ("normuon", 1.0), ("momentum_muon", 1.5), ("betas_adam", "0.9"),
                ("betas_adamw", "0.9,1.5"), ("max_steps", 0), ("warmup_steps", -1), ("cooldown_frac", 1.5),
                ("eval_tokens", 0), ("vocab_top", 1), ("grad_clip", -1.0), ("ckpt_every", -1),
                ("stop_after_steps", -1), ("threads", -1), ("device", "gpu"), ("lr_muon", 0.0), ("weight_decay", -0.1),
                ("adamw_groups", "per_param"), ("muon_split", "rows"), ("muon_split", "qkv")]


@pytest.mark.parametrize("setting, value", BAD_SETTINGS)
def test_a_bad_setting_stops_before_the_first_step_with_one_line(data_dir, tmp_path, setting, value):
    """The Muon run comes second: a setting only it reads must still stop before the AdamW run trains."""
    cfg = config(data_dir, tmp_path, **{**dict(max_steps=3, optimizers="adamw,muon", eval_every=100), setting: value})
    with pytest.raises(SystemExit, match=f"^--{setting}={re.escape(str(value))}: ") as e:
        train_muon.train(cfg)
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "metrics.json")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(data_dir, tmp_path):
    with pytest.raises(SystemExit, match="^--device=cuda: no CUDA device .*--device=cpu"):
        train_muon.train(config(data_dir, tmp_path, max_steps=3, device="cuda"))


def test_help_and_a_bad_setting_on_the_command_line(data_dir, tmp_path):
    r = run_script("--help")
    assert r.returncode == 0 and "--eval_every=250" in r.stdout
    assert re.search(r"--ns_method=newton_schulz +or polar_express", r.stdout)
    r = run_script(*cli_args(data_dir, tmp_path, n_head=3))
    assert r.returncode == 1 and r.stderr.strip().startswith("--n_head=3: ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_stop_without_checkpoints_promises_none(data_dir, tmp_path, capsys):
    metrics = train_muon.train(config(data_dir, tmp_path, max_steps=6, optimizers="adamw", eval_every=100,
                                      save_checkpoint=False, stop_after_steps=2))
    out = capsys.readouterr().out
    assert "stopped at step 2" in out and "--resume=True" not in out and "no checkpoint" in out
    assert metrics["runs"]["adamw"]["status"] == "stopped" and not os.path.exists(tmp_path / "ckpt")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_with_a_checkpoint_status_stopped_and_its_exit_code(data_dir, tmp_path, sig, code):
    args = cli_args(data_dir, tmp_path, max_steps=100000, optimizers="adamw", eval_every=100000)
    proc = subprocess.Popen([sys.executable, "train_muon.py", *args], cwd=ROOT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not os.path.exists(tmp_path / "metrics.json") and time.time() < deadline:  # written at the step-0 eval
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    run = load_metrics(tmp_path)["runs"]["adamw"]
    step = torch.load(tmp_path / "ckpt" / "adamw.pt", weights_only=False)["step"]
    assert run["status"] == "stopped" and step == len(run["train"]) > 0 and "Traceback" not in err


def test_a_diverged_run_exits_3_keeps_the_last_good_checkpoint_and_the_next_run_trains(data_dir, tmp_path):
    args = cli_args(data_dir, tmp_path, max_steps=30, optimizers="adamw,muon", ckpt_every=1, warmup_steps=0,
                    eval_every=100, lr_adamw=1e36)
    r = run_script(*args)
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert re.search(r"non-finite .* run .adamw. .* last good checkpoint .*, step 1\) is kept", r.stderr)
    runs = load_metrics(tmp_path)["runs"]
    assert runs["adamw"]["status"] == "diverged" and runs["muon"]["status"] == "finished"
    kept = torch.load(tmp_path / "ckpt" / "adamw.pt", weights_only=False)
    assert kept["step"] == 1 and all(torch.isfinite(p).all() for p in kept["model"].values())


def test_unknown_option_and_bad_shards_on_the_command_line(data_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "train_muon.py", "--muon_lr=0.1"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "unknown setting --muon_lr; known:" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    write_shard(shard_path(str(bad), 0), synthetic_tokens(1000, seed=0))
    (bad / "fineweb_train_000001.bin").write_bytes(b"not a shard")
    with pytest.raises(SystemExit, match="is not a token shard.*write shards with prepare_fineweb.py"):
        train_muon.train(config(str(bad), tmp_path / "o", max_steps=2))


def test_wandb_logs_the_metrics_offline(data_dir, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    real_init = wandb.init

    def spy_init(*args, **kwargs):
        run = real_init(*args, **kwargs)
        real_log = run.log
        run.log = lambda d, step=None: (logged.append(dict(d, step=step)), real_log(d, step=step))
        return run
    monkeypatch.setattr(wandb, "init", spy_init)
    metrics = train_muon.train(config(data_dir, tmp_path, max_steps=4, optimizers="adamw", eval_every=2,
                                      wandb_log=True, wandb_run_name="t"))
    run = metrics["runs"]["adamw"]
    for key, points in (("train_loss", run["train"]), ("val_loss", run["val"])):
        assert [(p["step"], p[key]) for p in logged if key in p] == [(p["step"], p["loss"]) for p in points]
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def torchrun(tmp_path, configs, nproc=2):
    """One torchrun launch (gloo on CPU) that trains each config in turn (tests/lm_dist_worker.py)."""
    path = tmp_path / "configs.json"
    path.write_text(json.dumps(configs))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        "tests/lm_dist_worker.py", str(path)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_torchrun_ddp_and_fsdp_match_one_process_and_resume(data_dir, tmp_path):
    """2 ranks x 1 micro-step (DDP) == 1 process x 2 micro-steps; FSDP on 2 ranks == DDP on 2 ranks; an FSDP
    run stopped and resumed == uninterrupted; a 2-rank FSDP checkpoint resumes on 1 rank; a fused qkv weight
    split per head under FSDP (blocks that span the two ranks' shards) == one process."""
    base = config(data_dir, tmp_path, max_steps=8, eval_every=4, optimizers="muon,adamw")
    out = {k: str(tmp_path / k) for k in ("ddp", "fsdp", "stopped", "half", "heads")}
    fsdp = dict(base, fsdp=True)
    heads = dict(base, optimizers="muon", fused_qkv=True, muon_split="heads")
    torchrun(tmp_path, [dict(base, out_dir=out["ddp"]), dict(fsdp, out_dir=out["fsdp"]),
                        dict(fsdp, out_dir=out["stopped"], stop_after_steps=5),
                        dict(fsdp, out_dir=out["stopped"], resume=True),
                        dict(fsdp, out_dir=out["half"], stop_after_steps=5),
                        dict(heads, fsdp=True, out_dir=out["heads"])])
    heads_one = train_muon.train(dict(heads, out_dir=str(tmp_path / "heads_one")))
    np.testing.assert_allclose(train_losses(load_metrics(out["heads"]), "muon"), train_losses(heads_one, "muon"),
                               atol=1e-5)
    one = train_muon.train(dict(base, out_dir=str(tmp_path / "one")))
    ddp, m_fsdp, resumed = load_metrics(out["ddp"]), load_metrics(out["fsdp"]), load_metrics(out["stopped"])
    assert ddp["world_size"] == 2 and ddp["tokens_per_step"] == one["tokens_per_step"]
    for label in ("muon", "adamw"):
        np.testing.assert_allclose(train_losses(ddp, label), train_losses(one, label), rtol=1e-4)
        np.testing.assert_allclose(val_losses(ddp, label), val_losses(one, label), rtol=1e-4)
    assert train_losses(one, "muon")[-1] < train_losses(one, "muon")[0]
    for label in ("muon", "adamw"):
        np.testing.assert_allclose(train_losses(m_fsdp, label), train_losses(ddp, label), atol=1e-5)
        np.testing.assert_allclose(val_losses(m_fsdp, label), val_losses(ddp, label), atol=1e-5)
        assert train_losses(resumed, label) == train_losses(m_fsdp, label)  # same ranks: exact
        assert val_losses(resumed, label) == val_losses(m_fsdp, label)
    assert os.path.isdir(os.path.join(out["fsdp"], "ckpt", "adamw"))  # a torch.distributed.checkpoint directory
    single = train_muon.train(dict(fsdp, out_dir=out["half"], resume=True))  # 2-rank checkpoint, 1 rank now
    for label in ("muon", "adamw"):
        np.testing.assert_allclose(train_losses(single, label), train_losses(m_fsdp, label), atol=1e-5)


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="data_dir .* does not exist; create shards with `python prepare_fineweb.py`"):
        train_muon.train(config(str(tmp_path / "nowhere"), tmp_path / "o", max_steps=2))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(SystemExit, match="no shards matching"):
        train_muon.train(config(str(tmp_path / "empty"), tmp_path / "o", max_steps=2))


def test_dry_run_checks_every_setting_and_trains_nothing(tmp_path):
    ok = subprocess.run([sys.executable, "train_muon.py", "--dry_run=True", f"--out_dir={tmp_path / 'out'}"], cwd=ROOT,
                        env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "every setting is valid" in ok.stdout, ok.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # no data read, nothing written
    bad = subprocess.run([sys.executable, "train_muon.py", "--dry_run=True", "--normuon=2"], cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--normuon=2" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]
