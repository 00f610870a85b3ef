"""Tests for model_keller.py and train_muon.py on tiny models and synthetic shards written here.
The 2-process test runs the real `torchrun` with gloo on CPU."""
import json
import os
import subprocess
import sys

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
            eval_every=10, eval_tokens=256, log_every=1000, ckpt_every=0, warmup_steps=2, muon_momentum_warmup=5,
            compile=False, device="cpu", num_threads=1)


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


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_optimizer_groups_cover_every_parameter_once(name):
    model = tiny_model()
    opt = model.configure_optimizers(name)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    if name == "muon":
        groups = {g["name"]: g for g in opt.param_groups}
        assert all(p.ndim == 2 for p in groups["muon"]["params"]) and groups["muon"]["lr"] == 0.05
        assert groups["head"]["params"][0] is model.lm_head.weight and groups["head"]["lr"] == 0.008
        assert groups["embed"]["params"][0] is model.wte.weight and groups["embed"]["lr"] == 0.6
        assert groups["head"]["betas"] == (0.8, 0.95) and groups["head"]["eps"] == 1e-10


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
    single = train_muon.DataLoader(files, 4, 16, accum=2)
    ranks = [train_muon.DataLoader(files, 4, 16, rank=r, world=2) for r in range(2)]
    seen = []
    for _ in range(200):  # crosses shard boundaries and wraps around
        (x0, y0), (x1, y1) = single.next_batches()
        [(a, b)], [(c, d)] = ranks[0].next_batches(), ranks[1].next_batches()
        assert torch.equal(a, x0) and torch.equal(b, y0) and torch.equal(c, x1) and torch.equal(d, y1)
        assert torch.equal(x0[:, 1:], y0[:, :-1]) and torch.equal(x1[0, :1], y0[-1, -1:])  # adjacent windows
        seen.append((single.shard, single.pos))
    assert {s for s, _ in seen} == {0, 1}  # both train shards used


def test_vocab_top_maps_rare_tokens_to_one_id(tmp_path):
    path = str(tmp_path / "fineweb_train_000001.bin")
    write_shard(path, np.array([5] * 50 + [9] * 30 + [7] * 20 + [1, 2, 3] * 10))
    table = train_muon.build_vocab_map([train_muon.open_shard(path)], 4)
    assert table[5] == 0 and table[9] == 1 and table[7] == 2 and table[1] == table[2] == table[3] == table[60000] == 3
    loader = train_muon.DataLoader([path], 2, 8, vocab_map=table)
    [(x, y)] = loader.next_batches()
    assert x.max() <= 3 and x[0, 0] == 0


def test_overrides_parse_and_reject():
    cfg = train_muon.parse_overrides(["--max_steps=20", "--muon_lr=1", "--optimizers=muon,adamw", "--eval_tokens=1e4"],
                                     train_muon.CONFIG)
    assert cfg["max_steps"] == 20 and cfg["muon_lr"] == 1.0 and cfg["optimizers"] == "muon,adamw"
    assert cfg["eval_tokens"] == 10000
    with pytest.raises(SystemExit, match="unknown setting 'max_step'"):
        train_muon.parse_overrides(["--max_step=20"], train_muon.CONFIG)
    with pytest.raises(SystemExit, match="expected a int"):
        train_muon.parse_overrides(["--max_steps=abc"], train_muon.CONFIG)
    assert train_muon.parse_optimizers("muon:0.03,adamw") == [("muon", 0.03), ("adamw", None)]
    with pytest.raises(SystemExit, match="unknown optimizer 'sgd'"):
        train_muon.parse_optimizers("sgd")


# -- training ------------------------------------------------------------------------------------

def test_30_steps_lower_the_loss_for_both_and_report(data_dir, tmp_path, capsys):
    metrics = train_muon.train(config(data_dir, tmp_path, max_steps=30, optimizers="muon,adamw:3e-3"))
    for label in ("muon", "adamw:0.003"):
        val = [p["loss"] for p in metrics["runs"][label]["val"]]
        assert val[0] == pytest.approx(np.log(VOCAB), abs=1e-4)  # same init: uniform prediction
        assert val[-1] < val[0] - 0.5, (label, val)
    saved = json.load(open(tmp_path / "metrics.json"))
    assert len(saved["runs"]["muon"]["train"]) == 30 and "muon_vs_adamw" in saved["summary"]
    assert (tmp_path / "loss.png").stat().st_size > 1000 and (tmp_path / "ckpt.pt").exists()
    assert "Muon reaches AdamW's final val loss" in capsys.readouterr().out or \
        saved["summary"]["muon_vs_adamw"]["muon_step"] is None


def test_resume_reproduces_the_uninterrupted_loss_curve_exactly(data_dir, tmp_path):
    straight = train_muon.train(config(data_dir, tmp_path / "a", max_steps=20, optimizers="muon,adamw"))
    train_muon.train(config(data_dir, tmp_path / "b", max_steps=20, optimizers="muon,adamw", stop_after_steps=10))
    ckpt = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 10 and ckpt["loader"]["pos"] > 0 and set(ckpt["runs"]) == {"muon", "adamw"}
    resumed = train_muon.train(config(data_dir, tmp_path / "b", max_steps=20, optimizers="muon,adamw", resume=1))
    for label in ("muon", "adamw"):
        assert train_losses(resumed, label) == train_losses(straight, label)  # bit-identical on CPU
        assert [p["loss"] for p in resumed["runs"][label]["val"]] == [p["loss"] for p in straight["runs"][label]["val"]]
    with pytest.raises(SystemExit, match="n_layer: checkpoint 2, now 3"):
        train_muon.train(config(data_dir, tmp_path / "b", max_steps=20, optimizers="muon,adamw", resume=1, n_layer=3))


def test_torchrun_two_processes_match_one(data_dir, tmp_path):
    args = [f"--{k}={v}" for k, v in TINY.items()] + [f"--data_dir={data_dir}", "--max_steps=6", "--eval_every=3",
                                                     "--optimizers=muon,adamw"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "train_muon.py", *args, f"--out_dir={tmp_path / 'one'}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train_muon.py", *args, f"--out_dir={tmp_path / 'two'}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    m1 = json.load(open(tmp_path / "one" / "metrics.json"))
    m2 = json.load(open(tmp_path / "two" / "metrics.json"))
    assert m2["world_size"] == 2 and m2["tokens_per_step"] == m1["tokens_per_step"]
    for label in ("muon", "adamw"):
        np.testing.assert_allclose(train_losses(m2, label), train_losses(m1, label), rtol=1e-4)
        np.testing.assert_allclose([p["loss"] for p in m2["runs"][label]["val"]],
                                   [p["loss"] for p in m1["runs"][label]["val"]], rtol=1e-4)
    assert train_losses(m1, "muon")[-1] < train_losses(m1, "muon")[0]


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="data_dir .* does not exist; create shards with `python prepare_fineweb.py`"):
        train_muon.train(config(str(tmp_path / "nowhere"), tmp_path / "o", max_steps=2))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(SystemExit, match="no shards matching"):
        train_muon.train(config(str(tmp_path / "empty"), tmp_path / "o", max_steps=2))


def test_non_finite_loss_stops_clearly_and_keeps_the_last_checkpoint(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path, max_steps=30, optimizers="adamw", ckpt_every=2, warmup_steps=0, eval_every=100)
    train_muon.train(dict(cfg, max_steps=30, stop_after_steps=2))  # a good checkpoint at step 2
    good = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    with pytest.raises(SystemExit, match=r"non-finite training loss .* run .adamw. .* last good checkpoint .*, step 2\) is kept"):
        train_muon.train(dict(cfg, resume=1, adamw_lr=1e36, ckpt_every=1000))
    kept = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert kept["step"] == 2 and good["step"] == 2
    for p in kept["runs"]["adamw"]["model"].values():
        assert torch.isfinite(p).all()
