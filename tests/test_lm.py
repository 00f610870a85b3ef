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
    assert (tmp_path / "loss.png").stat().st_size > 1000 and (tmp_path / "ckpt" / "adamw_0.003.pt").exists()
    assert saved["code"] == train_muon.code_hash() and saved["runs"]["muon"]["code"] == [dict(step=0, code=saved["code"])]
    assert torch.load(tmp_path / "ckpt" / "muon.pt", weights_only=False)["code"] == saved["code"]
    assert "Muon reaches AdamW's final val loss" in capsys.readouterr().out or \
        saved["summary"]["muon_vs_adamw"]["muon_step"] is None


def test_resume_reproduces_the_uninterrupted_loss_curve_exactly(data_dir, tmp_path):
    """Runs train one after another: stop inside the first run, then inside the second, resume each time."""
    straight = train_muon.train(config(data_dir, tmp_path / "a", max_steps=20, optimizers="muon,adamw"))
    cfg = config(data_dir, tmp_path / "b", max_steps=20, optimizers="muon,adamw", stop_after_steps=15)
    train_muon.train(cfg)
    ckpt = torch.load(tmp_path / "b" / "ckpt" / "muon.pt", weights_only=False)
    assert ckpt["step"] == 15 and ckpt["loader"]["pos"] > 0 and not ckpt["finished"]
    assert not (tmp_path / "b" / "ckpt" / "adamw.pt").exists()
    train_muon.train(dict(cfg, resume=True))  # muon 15 -> 20 (finished), adamw 0 -> 10
    assert torch.load(tmp_path / "b" / "ckpt" / "adamw.pt", weights_only=False)["step"] == 10
    resumed = train_muon.train(dict(cfg, resume=True, stop_after_steps=0))
    for label in ("muon", "adamw"):
        assert train_losses(resumed, label) == train_losses(straight, label)  # bit-identical on CPU
        assert [p["loss"] for p in resumed["runs"][label]["val"]] == [p["loss"] for p in straight["runs"][label]["val"]]
    assert resumed["summary"]["final_val"] == straight["summary"]["final_val"]
    with pytest.raises(SystemExit, match="n_layer: checkpoint 2, now 3"):
        train_muon.train(dict(cfg, resume=True, n_layer=3))


def test_stop_after_steps_counts_steps_per_invocation(data_dir, tmp_path):
    """Issue 13.7: a job script rerunning the same command with --resume=True advances stop_after_steps per job."""
    cfg = config(data_dir, tmp_path, max_steps=12, optimizers="adamw", stop_after_steps=5, eval_every=100)
    steps = []
    for job in range(3):
        train_muon.train(dict(cfg, resume=job > 0))
        steps.append(torch.load(tmp_path / "ckpt" / "adamw.pt", weights_only=False)["step"])
    assert steps == [5, 10, 12]


def test_resume_with_vocab_top_keeps_the_checkpoints_table(tmp_path):
    """Issue 13.3: shards added before --resume=True must not change what the embedding rows mean."""
    d = tmp_path / "data"
    d.mkdir()
    for i in range(2):
        write_shard(shard_path(str(d), i), synthetic_tokens(3000, seed=i))
    cfg = config(str(d), tmp_path / "b", max_steps=8, optimizers="adamw", vocab_top=32, vocab_size=32, eval_every=4)
    straight = train_muon.train(dict(cfg, out_dir=str(tmp_path / "a")))
    train_muon.train(dict(cfg, stop_after_steps=4))
    rng = np.random.default_rng(5)  # a shard with other token frequencies: a rebuilt table would differ
    write_shard(shard_path(str(d), 2), rng.integers(32, VOCAB, 3000))
    resumed = train_muon.train(dict(cfg, resume=True))
    assert train_losses(resumed, "adamw") == train_losses(straight, "adamw")
    saved = torch.load(tmp_path / "b" / "ckpt" / "adamw.pt", weights_only=False)
    rebuilt = train_muon.build_vocab_map([train_muon.read_shard(f) for f in sorted(d.glob("*train*"))], 32)
    assert not np.array_equal(saved["vocab_map"], rebuilt)


def test_resume_from_a_bad_checkpoint_or_other_code_says_so(data_dir, tmp_path, capsys):
    cfg = config(data_dir, tmp_path, max_steps=4, optimizers="adamw", eval_every=100)
    with pytest.raises(SystemExit, match="no checkpoint at .*adamw.pt; run without --resume"):
        train_muon.train(dict(cfg, resume=True))
    train_muon.train(dict(cfg, stop_after_steps=2))
    path = tmp_path / "ckpt" / "adamw.pt"
    ckpt = torch.load(path, weights_only=False)
    ckpt["run_metrics"]["code"] = [dict(step=0, code="0123456789abcdef")]  # as if train_muon.py had changed since
    torch.save(dict(ckpt, code="0123456789abcdef"), path)
    resumed = train_muon.train(dict(cfg, resume=True))
    assert "was written by other code (hash 0123456789abcdef" in capsys.readouterr().out
    assert resumed["runs"]["adamw"]["code"] == [dict(step=0, code="0123456789abcdef"),
                                                dict(step=2, code=train_muon.code_hash())]
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # truncated (e.g. copied while being written)
    with pytest.raises(SystemExit, match="not a readable checkpoint .*truncated"):
        train_muon.train(dict(cfg, resume=True))
    torch.save({"step": 3}, path)  # some other script's file
    with pytest.raises(SystemExit, match="was not written by train_muon.py"):
        train_muon.train(dict(cfg, resume=True))


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
    assert [(p["step"], p["train_loss"]) for p in logged if "train_loss" in p] == [(p["step"], p["loss"]) for p in run["train"]]
    assert [(p["step"], p["val_loss"]) for p in logged if "val_loss" in p] == [(p["step"], p["loss"]) for p in run["val"]]
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


def val_losses(metrics, label):
    return [p["loss"] for p in metrics["runs"][label]["val"]]


def load_metrics(out):
    return json.load(open(os.path.join(out, "metrics.json")))


def test_torchrun_ddp_and_fsdp_match_one_process_and_resume(data_dir, tmp_path):
    """2 ranks x 1 micro-step (DDP) == 1 process x 2 micro-steps; FSDP on 2 ranks == DDP on 2 ranks; an FSDP
    run stopped and resumed == uninterrupted; a 2-rank FSDP checkpoint resumes on 1 rank."""
    base = config(data_dir, tmp_path, max_steps=8, eval_every=4, optimizers="muon,adamw")
    out = {k: str(tmp_path / k) for k in ("ddp", "fsdp", "stopped", "half")}
    fsdp = dict(base, fsdp=True)
    torchrun(tmp_path, [dict(base, out_dir=out["ddp"]), dict(fsdp, out_dir=out["fsdp"]),
                        dict(fsdp, out_dir=out["stopped"], stop_after_steps=5),
                        dict(fsdp, out_dir=out["stopped"], resume=True),
                        dict(fsdp, out_dir=out["half"], stop_after_steps=5)])
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


def test_non_finite_loss_stops_clearly_and_keeps_the_last_checkpoint(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path, max_steps=30, optimizers="adamw", ckpt_every=2, warmup_steps=0, eval_every=100)
    train_muon.train(dict(cfg, max_steps=30, stop_after_steps=2))  # a good checkpoint at step 2
    good = torch.load(tmp_path / "ckpt" / "adamw.pt", weights_only=False)
    with pytest.raises(SystemExit, match=r"non-finite training loss .* run .adamw. .* last good checkpoint .*, step 2\) is kept"):
        train_muon.train(dict(cfg, resume=True, lr_adamw=1e36, ckpt_every=1000))
    kept = torch.load(tmp_path / "ckpt" / "adamw.pt", weights_only=False)
    assert kept["step"] == 2 and good["step"] == 2
    for p in kept["model"].values():
        assert torch.isfinite(p).all()
