"""Tests for train_ngpt.py (nGPT + Muon on the hypersphere) and muon_optim's sphere options.
Everything runs on tiny models and shards written here."""
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_ngpt  # noqa: E402
from muon_optim import Muon, apply_update, sphere_retract  # noqa: E402
from train_ngpt import NGPT, make_optimizer  # noqa: E402

VARIANTS = [(o, s) for o in ("muon", "adam") for s in ("project", "geodesic", "geodesic_scaled")]


def defaults(**overrides):
    return dict(train_ngpt.CONFIG, **overrides)


def unit_rows(n, d, dim=-1, seed=0, dtype=torch.float64):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x / x.norm(dim=dim, keepdim=True)


def write_shard(path, tokens):
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (20240520, 1, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


@pytest.fixture
def shards(tmp_path):
    """A learnable toy language: a few repeated 'sentences' of GPT-2-range token ids."""
    rng = np.random.default_rng(0)
    sentences = [rng.integers(0, 50257, size=rng.integers(5, 12)) for _ in range(8)]
    stream = np.concatenate([sentences[i] for i in rng.integers(0, 8, size=3000)])
    write_shard(tmp_path / "toy_val_000000.bin", stream[:2000])
    write_shard(tmp_path / "toy_train_000001.bin", stream[2000:])
    return str(tmp_path)


def tiny_cfg(data_dir, out_dir, **overrides):
    cfg = dict(data_dir=data_dir, train_files="toy_train_*.bin", val_files="toy_val_*.bin",
               out_dir=str(out_dir), vocab_top=64, n_layer=2, n_embd=32, n_head=2, block_size=16,
               batch_size=4, grad_accum_steps=1, max_steps=6, eval_every=2, eval_tokens=256,
               ckpt_every=0, lr_muon=0.02, lr_embed=1e-2, lr_head=1e-2, lr_scalar=1e-2, lr_adam=1e-2, device="cpu",
               threads=1)
    return defaults(**dict(cfg, **overrides))


# -----------------------------------------------------------------------------
# muon_optim's sphere options

@pytest.mark.parametrize("optimizer,sphere", VARIANTS)
def test_every_normalized_matrix_stays_unit_after_steps(optimizer, sphere):
    torch.manual_seed(0)
    model = NGPT(97, n_layer=2, n_embd=32, n_head=2, block_size=16)
    opt = make_optimizer(model, defaults(optimizer=optimizer, sphere=sphere, lr_muon=0.05, lr_adam=1e-2,
                                         lr_embed=1e-2, lr_head=1e-2, lr_scalar=1e-2))
    x = torch.randint(0, 97, (4, 16))
    before = [p.detach().clone() for p, _ in model.sphere_params()]
    for _ in range(4):
        _, loss = model(x, x.roll(-1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    for (p, dim), p0 in zip(model.sphere_params(), before):
        assert (p.norm(dim=dim) - 1).abs().max().item() < 1e-5
        assert (p - p0).abs().max().item() > 1e-4  # it did move
    assert len(model.sphere_params()) == 2 + 2 * 6  # embed, head, and q k v proj fc proj per block


def test_sphere_dims_follow_the_paper():
    model = NGPT(50, n_layer=1, n_embd=16, n_head=2, block_size=8)
    names = {id(p): n for n, p in model.named_parameters()}
    dims = {names[id(p)]: d for p, d in model.sphere_params()}
    assert dims == {"embed.weight": -1, "head.weight": -1, "blocks.0.attn.q.weight": -1, "blocks.0.attn.k.weight": -1,
                    "blocks.0.attn.v.weight": -1, "blocks.0.attn.proj.weight": -2, "blocks.0.mlp.fc.weight": -1,
                    "blocks.0.mlp.proj.weight": -2}
    groups = {g["name"]: g for g in make_optimizer(model, defaults()).param_groups}
    for name, group in groups.items():
        for p in group["params"]:
            if name == "scalars":
                assert p.ndim == 1 and group["sphere"] is None
            else:
                assert group["sphere_dim"] == {id(q): d for q, d in model.sphere_params()}[id(p)]
    assert groups["hidden_rows"]["use_muon"] and groups["hidden_cols"]["use_muon"]
    for name in ("embed", "head", "scalars"):
        assert not groups[name]["use_muon"] and groups[name]["weight_decay"] == 0.0
    assert groups["embed"]["sphere"] == groups["head"]["sphere"] == "project"
    assert [g["lr"] for g in groups.values()] == [0.01, 0.01, 5e-4, 5e-4, 5e-4]  # lr_muon, lr_embed/head/scalar
    adam = {g["name"]: g for g in make_optimizer(model, defaults(optimizer="adam", lr_adam=3e-3)).param_groups}
    assert all(not g["use_muon"] and g["lr"] == 3e-3 for g in adam.values())  # the baseline: Adam everywhere


@pytest.mark.parametrize("dim", [-1, -2])
def test_geodesic_is_on_the_sphere_and_moves_by_theta(dim):
    p = unit_rows(64, 48, dim)
    u = torch.randn(64, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for mode in ("geodesic", "geodesic_scaled"):
        q = p.clone()
        sphere_retract(q, u, 0.3, mode, dim)
        assert (q.norm(dim=dim) - 1).abs().max().item() < 1e-12
        angle = torch.arccos((p * q).sum(dim).clamp(-1, 1))
        tangent = u - (u * p).sum(dim, keepdim=True) * p
        expected = 0.3 if mode == "geodesic" else 0.3 * tangent.norm(dim=dim)
        torch.testing.assert_close(angle, torch.full_like(angle, 0.3) if mode == "geodesic" else expected)
        # it moves against the update: the loss-decrease direction
        assert ((q - p) * u).sum().item() < 0


def test_geodesic_scaled_equals_project_to_first_order():
    p = unit_rows(32, 40)
    u = torch.randn(32, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    gaps = []
    for lr in (1e-2, 1e-3, 1e-4):
        a, b = p.clone(), p.clone()
        sphere_retract(a, u, lr, "project")
        sphere_retract(b, u, lr, "geodesic_scaled")
        gaps.append((a - b).abs().max().item())
        assert (a - p).abs().max().item() > 50 * gaps[-1]  # the step itself is first order, the gap is not
    # the gap shrinks like lr^2: each 10x smaller lr gives a ~100x smaller gap
    assert 50 < gaps[0] / gaps[1] < 200 and 50 < gaps[1] / gaps[2] < 200


@pytest.mark.parametrize("use_muon", [True, False])
def test_lazy_projection_renormalizes_exactly_every_k_steps(use_muon):
    torch.manual_seed(0)
    w = torch.nn.Parameter(unit_rows(24, 16, dtype=torch.float32))
    group = dict(params=[w], use_muon=use_muon, lr=0.05, sphere="project", sphere_dim=-1, proj_every=3)
    opt = Muon([group], distributed=False)
    for step in range(1, 10):
        w.grad = torch.randn_like(w)
        opt.step()
        off = (w.norm(dim=-1) - 1).abs().max().item()
        if step % 3 == 0:
            assert off < 1e-6, (step, off)
        else:
            assert off > 1e-4, (step, off)  # drifted off the sphere between projections


def test_apply_update_without_sphere_is_plain_sgd_step():
    p, u = torch.ones(3, 4), torch.full((3, 4), 2.0)
    apply_update(p, u, lr=0.1)
    torch.testing.assert_close(p, torch.full((3, 4), 0.8))


# -----------------------------------------------------------------------------
# The model

def test_init_is_on_the_sphere_forward_finite_and_causal():
    torch.manual_seed(0)
    model = NGPT(101, n_layer=2, n_embd=32, n_head=4, block_size=12)
    for p, dim in model.sphere_params():
        assert (p.norm(dim=dim) - 1).abs().max().item() < 1e-5
    idx = torch.randint(0, 101, (2, 12))
    logits, _ = model(idx)
    assert logits.shape == (2, 12, 101) and torch.isfinite(logits).all()
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 101
    logits2, _ = model(changed)
    torch.testing.assert_close(logits[:, :7], logits2[:, :7])
    assert (logits[:, 7:] - logits2[:, 7:]).abs().max() > 1e-4
    # effective scales start at the paper's values
    block = model.blocks[0]
    torch.testing.assert_close(block.alpha_attn(), torch.full((32,), 0.05))
    torch.testing.assert_close(model.s_z(), torch.ones(101))


# -----------------------------------------------------------------------------
# The trainer

@pytest.mark.parametrize("optimizer", ["muon", "adam"])
def test_short_run_lowers_the_loss(shards, tmp_path, optimizer):
    m = train_ngpt.train(tiny_cfg(shards, tmp_path / optimizer, optimizer=optimizer, max_steps=30, eval_every=30,
                                  lr_adam=2e-2, lr_embed=2e-2, lr_head=2e-2, lr_scalar=2e-2), progress=False)
    run = m["runs"][f"ngpt-{optimizer}"]
    assert m["finished"] and not run["diverged"]
    assert run["val"][-1]["loss"] < run["val"][0]["loss"] - 0.5, run["val"]
    for name in ("metrics.json", "ckpt.pt", "loss.png"):
        assert os.path.exists(tmp_path / optimizer / name)


def test_resume_matches_an_uninterrupted_run(shards, tmp_path, monkeypatch):
    cfg = tiny_cfg(shards, tmp_path / "straight", proj_every=2)
    straight = train_ngpt.train(cfg, progress=False)["runs"]["ngpt-muon"]
    ref = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=False)["runs"]["ngpt-muon"]["model"]

    def check(out_dir):
        resumed = train_ngpt.train(dict(cfg, out_dir=str(out_dir), resume=True), progress=False)["runs"]["ngpt-muon"]
        assert [p["loss"] for p in resumed["train"]] == [p["loss"] for p in straight["train"]]
        assert [(p["step"], p["loss"]) for p in resumed["val"]] == [(p["step"], p["loss"]) for p in straight["val"]]
        got = torch.load(out_dir / "ckpt.pt", weights_only=False)["runs"]["ngpt-muon"]["model"]
        for k, v in ref.items():
            assert torch.equal(v, got[k]), k

    # 1) stop_after_steps (job time limits), mid lazy-projection period
    train_ngpt.train(dict(cfg, out_dir=str(tmp_path / "stopped"), stop_after_steps=3), progress=False)
    assert torch.load(tmp_path / "stopped" / "ckpt.pt", weights_only=False)["step"] == 3
    # the same job command again: stop_after_steps counts this invocation's steps (3 more), not absolute steps
    train_ngpt.train(dict(cfg, out_dir=str(tmp_path / "stopped"), stop_after_steps=3, resume=True), progress=False)
    assert torch.load(tmp_path / "stopped" / "ckpt.pt", weights_only=False)["step"] == 6
    check(tmp_path / "stopped")

    # 2) Ctrl-C while the 5th batch is being fetched: the checkpoint holds step 4 and its data position
    real_next, calls = train_ngpt.ShardLoader.next_batch, {"n": 0}

    def interrupting_next(self):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(train_ngpt.ShardLoader, "next_batch", interrupting_next)
    with pytest.raises(KeyboardInterrupt):
        train_ngpt.train(dict(cfg, out_dir=str(tmp_path / "ctrl_c")), progress=False)
    monkeypatch.setattr(train_ngpt.ShardLoader, "next_batch", real_next)
    assert torch.load(tmp_path / "ctrl_c" / "ckpt.pt", weights_only=False)["step"] == 4
    check(tmp_path / "ctrl_c")

    # 3) Ctrl-C during the evaluation at step 4: the checkpoint holds step 4 and step 4's data position
    real_eval, evals = train_ngpt.evaluate, {"n": 0}

    def interrupting_eval(*args):
        evals["n"] += 1
        if evals["n"] == 3:  # steps 0, 2, 4
            raise KeyboardInterrupt
        return real_eval(*args)

    monkeypatch.setattr(train_ngpt, "evaluate", interrupting_eval)
    with pytest.raises(KeyboardInterrupt):
        train_ngpt.train(dict(cfg, out_dir=str(tmp_path / "ctrl_c_eval")), progress=False)
    monkeypatch.setattr(train_ngpt, "evaluate", real_eval)
    assert torch.load(tmp_path / "ctrl_c_eval" / "ckpt.pt", weights_only=False)["step"] == 4
    check(tmp_path / "ctrl_c_eval")


def test_bad_inputs_fail_clearly(tmp_path, shards):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(np.zeros(300, dtype=np.int32).tobytes())
    with pytest.raises(ValueError, match="not a token shard"):
        train_ngpt.read_shard(str(bad))
    short = tmp_path / "short.bin"
    write_shard(short, np.arange(100))
    short.write_bytes(short.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        train_ngpt.read_shard(str(short))
    for old in ("--muon_lr=0.1", "--adam_lr=0.1", "--num_threads=1", "--adam_betas=0.9,0.95"):  # renamed
        with pytest.raises(SystemExit, match=f"unknown setting {old.split('=')[0]}; known: .*lr_muon"):
            train_ngpt.main([old])
    with pytest.raises(SystemExit, match="expected a number"):
        train_ngpt.parse_overrides(["--lr_muon=fast"], defaults())
    with pytest.raises(SystemExit, match="--resume=1: expected True or False"):
        train_ngpt.parse_overrides(["--resume=1"], defaults())
    cfg = train_ngpt.parse_overrides(["--lr_muon=1", "--sphere=geodesic", "--betas_adam=0.9,0.99", "--resume=True",
                                      "--compile=False", "--cautious_wd=True", "--save_checkpoint=False"], defaults())
    assert cfg["lr_muon"] == 1.0 and cfg["sphere"] == "geodesic" and cfg["betas_adam"] == "0.9,0.99"
    assert cfg["resume"] is True and cfg["compile"] is False and cfg["cautious_wd"] is True
    assert cfg["save_checkpoint"] is False
    with pytest.raises(SystemExit, match="raise --vocab_size"):
        train_ngpt.train(tiny_cfg(shards, tmp_path / "v", vocab_top=0, vocab_size=64), progress=False)
    with pytest.raises(SystemExit, match="lazy projection"):
        train_ngpt.train(tiny_cfg(shards, tmp_path / "x", sphere="geodesic", proj_every=3), progress=False)
    with pytest.raises(SystemExit, match="betas_adam"):
        train_ngpt.train(tiny_cfg(shards, tmp_path / "x", betas_adam="0.9"), progress=False)
    write_shard(tmp_path / "toy_train_000002.bin", np.arange(10))
    (tmp_path / "toy_train_000002.bin").write_bytes((tmp_path / "toy_train_000002.bin").read_bytes()[:-2])
    with pytest.raises(SystemExit, match="toy_train_000002.bin.*truncated, rewrite it"):  # checked before training
        train_ngpt.train(tiny_cfg(shards, tmp_path / "x"), progress=False)


def test_a_train_shard_shorter_than_a_batch_stops_before_training(tmp_path, monkeypatch):
    """Every train shard is checked, not only the first: a short later one used to fail mid-run."""
    monkeypatch.setattr(train_ngpt, "make_optimizer", lambda *a: pytest.fail("built an optimizer"))
    write_shard(tmp_path / "toy_val_000000.bin", np.arange(500))
    write_shard(tmp_path / "toy_train_000001.bin", np.arange(100))
    write_shard(tmp_path / "toy_train_000002.bin", np.arange(10))
    with pytest.raises(SystemExit, match=r"toy_train_000002.bin has 10 tokens, fewer than one batch \(65\)"):
        train_ngpt.train(tiny_cfg(str(tmp_path), tmp_path / "out"), progress=False)


def test_a_val_slice_shorter_than_a_batch_stops_before_training(shards, tmp_path, monkeypatch):
    monkeypatch.setattr(train_ngpt, "make_optimizer", lambda *a: pytest.fail("built an optimizer"))
    with pytest.raises(SystemExit, match=r"the val slice of --eval_tokens=10 has 11 tokens, fewer than one batch "
                                         r"\(65\).*raise --eval_tokens"):
        train_ngpt.train(tiny_cfg(shards, tmp_path / "out", eval_tokens=10), progress=False)


def test_missing_shards_is_a_message_naming_data_dir_and_prepare_fineweb(tmp_path):
    with pytest.raises(SystemExit, match=r"no shards matching .* point --data_dir .* `python prepare_fineweb.py`"):
        train_ngpt.main([f"--data_dir={tmp_path}", f"--out_dir={tmp_path}/out"])
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_ngpt.py"), f"--data_dir={tmp_path}/nowhere",
                           f"--out_dir={tmp_path}/out"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: no shards matching") and "--data_dir" in proc.stderr


def test_resume_from_a_bad_checkpoint_says_what_is_wrong(shards, tmp_path):
    cfg = tiny_cfg(shards, tmp_path / "run", max_steps=2)
    with pytest.raises(SystemExit, match="--resume=True but there is no checkpoint"):
        train_ngpt.train(dict(cfg, resume=True), progress=False)
    train_ngpt.train(cfg, progress=False)
    ckpt = tmp_path / "run" / "ckpt.pt"
    with pytest.raises(SystemExit, match=r"cannot resume .*n_embd: 32 -> 64.*--resume=False"):
        train_ngpt.train(dict(cfg, resume=True, n_embd=64), progress=False)
    old = torch.load(ckpt, weights_only=False)
    torch.save({k: v for k, v in old.items() if k != "identity"}, ckpt)  # written before run identities
    with pytest.raises(SystemExit, match="holds no run identity .*--resume=False to start over"):
        train_ngpt.train(dict(cfg, resume=True), progress=False)
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated
    with pytest.raises(SystemExit, match="not a readable checkpoint .* truncated"):
        train_ngpt.train(dict(cfg, resume=True), progress=False)
    torch.save({"model": {}}, ckpt)  # someone else's
    with pytest.raises(SystemExit, match="not written by train_ngpt.py"):
        train_ngpt.train(dict(cfg, resume=True), progress=False)


def test_dry_run_checks_and_prints_the_identity_the_run_records(shards, tmp_path, capsys):
    """study_ngpt.py plans with --dry_run=True: it trains nothing, writes nothing, and prints the identity the
    run then records (its data hash left to the caller) and the shards the run reads."""
    assert [os.path.basename(f) for f in train_ngpt.SOURCE_FILES] == ["train_ngpt.py", "muon_optim.py"]
    assert train_ngpt.SOURCE_HASH == train_ngpt.source_hash(*train_ngpt.SOURCE_FILES)
    cfg = tiny_cfg(shards, tmp_path / "run", max_steps=2, optimizer="adam")
    argv = [f"--{k}={v}" for k, v in cfg.items() if v != train_ngpt.CONFIG[k]]
    train_ngpt.main(argv + ["--dry_run=True"])
    plan = json.loads(capsys.readouterr().out)
    assert not os.path.exists(tmp_path / "run")
    files = sorted(glob.glob(os.path.join(shards, "toy_train_*.bin"))) + [os.path.join(shards, "toy_val_000000.bin")]
    assert plan["data_files"] == files and plan["identity"]["data_hash"] is None
    recorded = train_ngpt.train(cfg, progress=False)["identity"]
    assert recorded == dict(plan["identity"], data_hash=train_ngpt.data_fingerprint(files))
    assert "lr_adam" in recorded and "lr_muon" not in recorded and "dry_run" not in recorded
    with pytest.raises(SystemExit, match=r"error: --eval_every=0: must be >= 1"):
        train_ngpt.main(argv + ["--dry_run=True", "--eval_every=0"])


def test_the_sweeps_moved_to_study_ngpt(tmp_path):
    for arg in ("--sweep=lr", "--sweep_lrs_muon=0.01,0.02"):
        with pytest.raises(SystemExit, match=f"error: {arg}: the sweeps are in study_ngpt.py"):
            train_ngpt.main([f"--out_dir={tmp_path}", arg])


def test_wandb_logs_what_metrics_json_holds(shards, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    real_log = wandb.Run.log
    monkeypatch.setattr(wandb.Run, "log", lambda self, data, step=None, **kw: logged.append((step, data))
                        or real_log(self, data, step=step, **kw))
    m = train_ngpt.train(tiny_cfg(shards, tmp_path, max_steps=4, wandb_log=True), progress=False)
    run = m["runs"]["ngpt-muon"]
    expected = [(p["step"], {f"train/{k}": v for k, v in p.items()}) for p in run["train"]]
    expected += [(p["step"], {f"val/{k}": v for k, v in p.items()}) for p in run["val"]]
    assert sorted(logged, key=str) == sorted(expected, key=str)
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*"))  # a real offline run, in out_dir


# -----------------------------------------------------------------------------
# Run identity: caches and resume key on settings, code and data, never on a path

def rewrite_shards(data_dir, seed):
    """Other tokens under the same file names (what re-running prepare_fineweb.py on new text does)."""
    rng = np.random.default_rng(seed)
    for path in glob.glob(os.path.join(data_dir, "toy_*.bin")):
        n = len(train_ngpt.read_shard(path))
        write_shard(path, rng.integers(0, 50257, size=n))


def stopped_run(shards, out_dir, **overrides):
    """A 6-step run stopped after 3 steps with its checkpoint (the job-script workflow)."""
    cfg = tiny_cfg(shards, out_dir, proj_every=2, **overrides)
    train_ngpt.train(dict(cfg, stop_after_steps=3), progress=False)
    return cfg


def test_resume_with_resumable_settings_changed_continues_exactly(shards, tmp_path):
    """6 steps straight == 3 steps, then a resume in another out_dir with other cadences, stop and wandb
    settings (all in RESUMABLE) for the other 3: the same losses and bit-identical weights."""
    cfg = tiny_cfg(shards, tmp_path / "straight", proj_every=2)
    straight = train_ngpt.train(cfg, progress=False)["runs"]["ngpt-muon"]
    stopped_run(shards, tmp_path / "half")
    shutil.copytree(tmp_path / "half", tmp_path / "moved")
    changed = dict(out_dir=str(tmp_path / "moved"), eval_every=3, ckpt_every=1, stop_after_steps=10, compile=False,
                   wandb_project="other", wandb_run_name="other", resume=True)
    assert set(changed) - {"resume"} <= set(train_ngpt.RESUMABLE)
    resumed = train_ngpt.train(dict(cfg, **changed), progress=False)["runs"]["ngpt-muon"]
    assert [p["loss"] for p in resumed["train"]] == [p["loss"] for p in straight["train"]]
    val = {p["step"]: p["loss"] for p in straight["val"]}  # steps 0, 2, 4, 6
    assert [p["step"] for p in resumed["val"]] == [0, 2, 3, 6]  # eval_every=3 from step 3 on
    assert all(p["loss"] == val[p["step"]] for p in resumed["val"] if p["step"] in val)
    ref = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=False)["runs"]["ngpt-muon"]["model"]
    got = torch.load(tmp_path / "moved" / "ckpt.pt", weights_only=False)["runs"]["ngpt-muon"]["model"]
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.parametrize("change,named", [
    (dict(weight_decay_muon=5.0), "weight_decay_muon: 0.0 -> 5.0"),
    (dict(normuon=0.95, ns_method="polar_express"),
     "normuon: 0.0 -> 0.95; ns_method: 'newton_schulz' -> 'polar_express'"),
    (dict(max_steps=8), "max_steps: 6 -> 8"),
])
def test_resume_refuses_other_settings_naming_each_with_both_values(shards, tmp_path, change, named):
    cfg = stopped_run(shards, tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        train_ngpt.train(dict(cfg, resume=True, **change), progress=False)
    msg = str(e.value.code)
    assert "\n" not in msg and named in msg and "--resume=False" in msg and "--out_dir" in msg, msg


def test_resume_refuses_other_code_or_other_data(shards, tmp_path, monkeypatch):
    cfg = stopped_run(shards, tmp_path / "run")
    with monkeypatch.context() as m:
        m.setattr(train_ngpt, "SOURCE_HASH", "edited00code0000")  # what editing train_ngpt.py or muon_optim.py does
        with pytest.raises(SystemExit, match=r"cannot resume .*source_hash: '[0-9a-f]{16}' -> 'edited00code0000'"):
            train_ngpt.train(dict(cfg, resume=True), progress=False)
    rewrite_shards(shards, seed=2)
    with pytest.raises(SystemExit, match=r"cannot resume .*data_hash: '\w{16}' -> '\w{16}'.*--resume=False"):
        train_ngpt.train(dict(cfg, resume=True), progress=False)


def test_checkpointed_optimizer_options_never_override_the_command_line(shards, tmp_path):
    """torch's Optimizer.load_state_dict restores each group's options from the checkpoint: a checkpoint
    whose groups say otherwise (edited, or written by other code) must not change the resumed run."""
    cfg = tiny_cfg(shards, tmp_path / "straight", proj_every=2)
    straight = train_ngpt.train(cfg, progress=False)["runs"]["ngpt-muon"]
    stopped_run(shards, tmp_path / "run")
    path = tmp_path / "run" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=False)
    for g in ckpt["runs"]["ngpt-muon"]["optimizer"]["param_groups"]:
        g.update(weight_decay=5.0, momentum=0.5, initial_lr=g["initial_lr"] * 3, ns_method="polar_express")
    torch.save(ckpt, path)
    resumed = train_ngpt.train(dict(cfg, out_dir=str(tmp_path / "run"), resume=True), progress=False)
    resumed = resumed["runs"]["ngpt-muon"]
    assert [p["loss"] for p in resumed["train"]] == [p["loss"] for p in straight["train"]]


BAD_SETTINGS = [("eval_every", "0"), ("batch_size", "0"), ("grad_accum_steps", "0"), ("block_size", "-1"),
                ("n_layer", "0"), ("max_steps", "0"), ("eval_tokens", "0"), ("ckpt_every", "-1"),
                ("stop_after_steps", "-2"), ("threads", "-1"), ("n_head", "3"), ("n_embd", "30"),
                ("mlp_ratio", "0"), ("cooldown_frac", "1.5"), ("lr_muon", "-0.1"), ("momentum_muon", "1"),
                ("normuon", "1"), ("eps_adam", "0"), ("vocab_size", "0"), ("optimizer", "sgd"),
                ("sphere", "flat"), ("ns_method", "newton"), ("device", "gpu"), ("device", "mps"),
                ("betas_adam", "0.9,1"), ("betas_adam", "x,0.95"), ("vocab_top", "1"), ("weight_decay", "-1")]


@pytest.mark.parametrize("name,value", BAD_SETTINGS)
def test_bad_settings_stop_before_the_first_step_naming_setting_and_value(shards, tmp_path, monkeypatch, name,
                                                                         value):
    monkeypatch.setattr(train_ngpt, "make_optimizer", lambda *a: pytest.fail("built an optimizer"))
    argv = [f"--{k}={v}" for k, v in tiny_cfg(shards, tmp_path / "out").items() if k in (
        "data_dir", "train_files", "val_files", "out_dir", "vocab_top", "n_layer", "n_embd", "n_head", "block_size",
        "batch_size", "grad_accum_steps", "max_steps", "eval_every", "eval_tokens", "device", "threads")]
    with pytest.raises(SystemExit) as e:
        train_ngpt.main(argv + [f"--{name}={value}"])
    msg = str(e.value.code)
    assert msg.startswith("error: --") and f"--{name}={value}" in msg and "\n" not in msg, msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line_without_traceback(shards, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_ngpt.py"), f"--data_dir={shards}",
                           f"--out_dir={tmp_path}/out", "--device=cuda"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: --device=cuda") and "--device=cpu" in proc.stderr, proc.stderr


def test_stop_without_checkpoint_promises_none(shards, tmp_path, capsys):
    cfg = tiny_cfg(shards, tmp_path / "run", save_checkpoint=False, stop_after_steps=2)
    train_ngpt.train(cfg, progress=False)
    out = capsys.readouterr().out
    assert "stopped at step 2" in out and "--resume=True" not in out and "ckpt.pt" not in out, out
    assert not os.path.exists(tmp_path / "run" / "ckpt.pt")


def test_help_lists_every_setting_with_default_and_comment():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_ngpt.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name, value in train_ngpt.CONFIG.items():
        assert f"--{name}={value}" in proc.stdout, name
    assert "0 = only at the end and on Ctrl-C" in proc.stdout
