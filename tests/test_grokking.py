"""Tests for model_tiny.py and train_grokking.py, one comparison (fast: tiny p, few steps); the studies
are tests/test_study_grokking.py."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train_grokking as tg  # noqa: E402
from model_tiny import TinyConfig, TinyTransformer  # noqa: E402


TINY = ["--p=11", "--task=add", "--max_steps=30", "--eval_every=10", "--batch_size=32", "--d_model=32", "--n_head=2",
        "--d_mlp=64", "--threads=1", "--stop_on_grok=False"]


def defaults():
    return {k: getattr(tg, k) for k in tg.CONFIG_KEYS}


def tiny(out_dir, *args):
    """A seconds-long config: add mod 11, a small model, a few dozen steps."""
    return tg.parse_overrides([*TINY, f"--out_dir={out_dir}", *args], defaults())


def answers(task, p):
    """{(x, y): answer} from the dataset tensors."""
    X, Y = tg.make_dataset(task, p)
    return {(int(r[0]), int(r[2])): int(a) for r, a in zip(X, Y)}


def test_task_tables_spot_values_and_sizes():
    p = 7
    sizes = {t: len(tg.make_dataset(t, p)[0]) for t in tg.TASKS}
    assert sizes == {"add": 49, "sub": 49, "mul": 49, "div": 42, "x2y2": 49, "x2xyy2": 49, "x3xy": 49}
    assert answers("add", p)[(5, 4)] == 2
    assert answers("sub", p)[(2, 5)] == 4
    assert answers("mul", p)[(3, 5)] == 1
    assert answers("div", p)[(1, 3)] == 5  # 3 * 5 = 15 = 1 mod 7
    assert answers("div", p)[(6, 2)] == 3
    assert answers("x2y2", p)[(3, 4)] == (9 + 16) % 7
    assert answers("x2xyy2", p)[(2, 3)] == (4 + 6 + 9) % 7
    assert answers("x3xy", p)[(2, 5)] == (8 + 10) % 7
    for p in (11, 13):  # every division answer a satisfies a * y = x (mod p), and y = 0 never appears
        table = answers("div", p)
        assert len(table) == p * (p - 1)
        assert all(y != 0 and (a * y) % p == x for (x, y), a in table.items())
    assert torch.equal(tg.modular_inverse(torch.arange(1, 97), 97) * torch.arange(1, 97) % 97, torch.ones(96).long())


def test_inputs_are_x_op_y_eq_and_never_contain_the_answer():
    p = 11
    for t in tg.TASKS:
        X, Y = tg.make_dataset(t, p)
        assert X.shape[1] == 4
        assert (X[:, 1] == p).all() and (X[:, 3] == p + 1).all()  # op and '=' tokens lie outside 0..p-1
        assert (X[:, [0, 2]] < p).all() and (Y < p).all() and (Y >= 0).all()
        # the answer is a function of (x, y) only; no position carries it (a leak would make a
        # column equal to the answer for every example)
        for col in range(4):
            assert not torch.equal(X[:, col], Y)


def test_split_disjoint_covering_and_seed_stable():
    a_tr, a_va = tg.split_indices(100, 0.3, seed=5)
    b_tr, b_va = tg.split_indices(100, 0.3, seed=5)
    c_tr, _ = tg.split_indices(100, 0.3, seed=6)
    assert len(a_tr) == 30 and len(a_va) == 70
    assert set(a_tr.tolist()).isdisjoint(a_va.tolist())
    assert sorted(a_tr.tolist() + a_va.tolist()) == list(range(100))
    assert torch.equal(a_tr, b_tr) and torch.equal(a_va, b_va)
    assert not torch.equal(a_tr, c_tr)
    with pytest.raises(ValueError, match="train_frac"):
        tg.split_indices(100, 1.0, seed=0)


def test_batch_sequence_is_seed_stable():
    s1, s2 = tg.batch_sequence(50, 16, 3), tg.batch_sequence(50, 16, 3)
    for _ in range(10):
        assert torch.equal(next(s1), next(s2))


@pytest.mark.parametrize("prenorm", [False, True])
def test_causal_mask_and_last_position_shortcut(prenorm):
    torch.manual_seed(0)
    model = TinyTransformer(TinyConfig(vocab_size=13, n_classes=11, prenorm=prenorm)).eval()
    idx = torch.randint(0, 13, (8, 4))
    changed = idx.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 13  # change only the last token
    with torch.no_grad():
        out_a, out_b = model.forward_all(idx), model.forward_all(changed)
        assert torch.allclose(out_a[:, :3], out_b[:, :3], atol=1e-6)  # earlier positions cannot see it
        assert not torch.allclose(out_a[:, 3], out_b[:, 3], atol=1e-4)  # the last one does
        changed2 = idx.clone()
        changed2[:, 1] = (changed2[:, 1] + 1) % 13
        out_c = model.forward_all(changed2)
        assert torch.allclose(out_a[:, :1], out_c[:, :1], atol=1e-6)
        assert torch.allclose(model(idx), out_a[:, -1], atol=1e-5)  # forward() computes only the last position


def test_param_count_near_nanugpt_prime223():
    n = TinyTransformer(TinyConfig(vocab_size=225, n_classes=223)).num_params()
    assert 0.44e6 < n < 0.47e6  # nanuGPT prime223: 457,578


def test_bad_inputs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="prime"):
        tg.make_dataset("div", 12)
    with pytest.raises(ValueError, match="unknown task"):
        tg.make_dataset("pow", 11)
    cfg = tg.parse_overrides([f"--out_dir={tmp_path}", "--task=divide"], defaults())
    with pytest.raises(ValueError, match="unknown task 'divide'"):
        tg.main(cfg)
    with pytest.raises(SystemExit, match="unknown setting --lr;"):
        tg.parse_overrides(["--lr=3"], defaults())
    with pytest.raises(SystemExit, match="--save_checkpoint=1: expected True or False"):
        tg.parse_overrides(["--save_checkpoint=1"], defaults())
    for betas in ("0.9", "0.9,1", "a,b"):
        with pytest.raises(ValueError, match=f"--betas_adamw={betas}: two numbers"):
            tg.main(dict(cfg, task="add", betas_adamw=betas))


def test_first_error_is_a_one_line_message_not_a_traceback(tmp_path):
    """What a user meets first from the command line: the cause and the fix, no traceback (unknown
    settings stop in parse_overrides with SystemExit, tested above)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_grokking.py"), f"--out_dir={tmp_path}",
                           "--task=divide"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: unknown task 'divide'; choose one of add, sub"), proc.stderr


def test_overrides_parse_types():
    cfg = tg.parse_overrides(["--seed=3", "--lr_muon=1e-2", "--max_steps=5", "--prenorm=True", "--task=add",
                              "--save_checkpoint=False", "--betas_adamw=0.9,0.95"], defaults())
    assert cfg["seed"] == 3 and cfg["lr_muon"] == 0.01 and cfg["max_steps"] == 5 and cfg["prenorm"] is True
    assert cfg["save_checkpoint"] is False and cfg["betas_adamw"] == "0.9,0.95"


def test_short_run_memorizes_and_writes_results(tmp_path):
    """Both optimizers, same init and batches, p=11: each memorizes the training set (train accuracy
    reaches 1.0 at some evaluation; the last evaluation may dip, and by how much depends on the CPU's
    summation order, so only a margin is asserted there)."""
    torch.set_num_threads(1)
    cfg = tg.parse_overrides(["--p=11", "--task=add", "--train_frac=0.5", "--max_steps=150", "--eval_every=10",
                              "--batch_size=32", "--seed=0", "--threads=1", "--stop_on_grok=False",
                              "--d_model=64", "--n_head=2", "--d_mlp=128", f"--out_dir={tmp_path}"], defaults())
    out = tg.main(cfg)
    runs = out["runs"]
    assert [r["optimizer"] for r in runs] == ["adamw", "muon"]
    fields = {"task", "p", "train_frac", "optimizer", "lr", "seed", "memorize_step", "grok_step", "steps_run",
              "final_train_acc", "final_val_acc", "wall_s"}
    for r in runs:
        assert fields <= set(r)
        assert r["memorize_step"] is not None and r["memorize_step"] <= 150
        assert r["final_train_acc"] >= 0.8
        assert r["steps_run"] == 150 and r["p"] == 11
        assert r["grok_step"] is None or r["grok_step"] <= 150
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert saved["runs"][0]["optimizer"] == "adamw" and fields <= set(saved["runs"][1])
    assert (tmp_path / "grokking.png").stat().st_size > 1000
    for r in runs:  # per-run curves and checkpoints
        with open(tmp_path / "runs" / f"{r['name']}.json") as f:
            curve = json.load(f)["curve"]
        assert max(curve["train_acc"]) == 1.0
        assert curve["step"][0] == 0 and curve["step"][-1] == 150 and len(curve["val_acc"]) == 16
        ckpt = torch.load(tmp_path / "ckpt" / f"{r['name']}.pt", weights_only=False)
        assert ckpt["step"] == 150 and "model" in ckpt and "optimizer" in ckpt
    # the two optimizers started from the same weights: same first evaluation
    a, m = (json.load(open(tmp_path / "runs" / f"{r['name']}.json"))["curve"] for r in runs)
    assert a["val_loss"][0] == m["val_loss"][0]
    assert all(r["identity"]["source_hash"] == tg.SOURCE_HASH and r["source_files"] ==
               ["train_grokking.py", "model_tiny.py", "muon_optim.py"] for r in runs)


def test_ctrl_c_saves_checkpoint_and_partial_results(tmp_path):
    """A real SIGINT (what Ctrl-C sends) during training: checkpoint written, results.json marked interrupted."""
    import signal
    import threading
    torch.set_num_threads(1)
    cfg = tg.parse_overrides(["--p=11", "--task=add", "--optimizers=adamw", "--max_steps=1000000", "--batch_size=16",
                              "--d_model=32", "--n_head=2", "--d_mlp=64", "--threads=1", "--stop_on_grok=False",
                              f"--out_dir={tmp_path}"], defaults())
    tg.train_run(dict(cfg, max_steps=2, out_dir=str(tmp_path / "warmup")), "adamw", show_bar=False)
    # a shell's background job starts with SIGINT ignored, and Python then installs no handler:
    # install the default one, so the test means the same however the suite was started
    saved_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(2.0, signal.raise_signal, args=(signal.SIGINT,))  # after torch's lazy imports
    timer.start()
    try:
        with pytest.raises(SystemExit) as exc:
            tg.main(cfg)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, saved_handler)
    assert exc.value.code == 130
    ckpt = torch.load(tmp_path / "ckpt" / "add_adamw_lr0.003_seed0.pt", weights_only=False)
    assert 0 < ckpt["step"] < 1000000 and "model" in ckpt and "optimizer" in ckpt
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert saved["interrupted"] is True and saved["runs"] == []  # the interrupted run is not reported as finished
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path / "ckpt"))


def test_muon_run_puts_only_hidden_matrices_in_muon():
    model = TinyTransformer(TinyConfig(vocab_size=13, n_classes=11))
    opt = tg.make_optimizer("muon", model, defaults(), lr=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    adam = {names[id(p)] for g in opt.param_groups if not g["use_muon"] for p in g["params"]}
    assert muon == {f"blocks.{i}.{w}" for i in range(2) for w in
                    ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.fc.weight", "mlp.proj.weight")}
    assert {"tok_emb.weight", "pos_emb.weight", "head.weight", "head.bias"} <= adam
    assert len(muon) + len(adam) == len(list(model.parameters()))


def test_the_adamw_run_differs_from_the_muon_run_only_in_the_hidden_matrices_optimizer():
    """Issue 20 item 3: the AdamW run gives the embeddings, head, gains and biases their own LR
    (lr_adamw_aux), the same groups, betas, eps and weight decay as the Muon run's AdamW groups; only
    the hidden matrices differ (AdamW at lr_adamw with weight_decay vs Muon)."""
    model = TinyTransformer(TinyConfig(vocab_size=13, n_classes=11))
    cfg = dict(defaults(), lr_adamw_aux=2e-2, lr_muon_aux=2e-2, weight_decay=0.7, eps_adamw=1e-7, betas_adamw="0.8,0.9")
    adamw, muon = tg.make_optimizer("adamw", model, cfg, lr=5e-3), tg.make_optimizer("muon", model, cfg, lr=0.1)
    (muon_hidden,), muon_aux = ([g for g in muon.param_groups if g["use_muon"] is u] for u in (True, False))
    assert len(adamw.param_groups) == 1 + len(muon_aux)
    hidden, *aux = adamw.param_groups
    same_params = lambda a, b: len(a) == len(b) and all(x is y for x, y in zip(a, b))  # noqa: E731
    assert same_params(hidden["params"], muon_hidden["params"])
    assert hidden["lr"] == 5e-3 and hidden["weight_decay"] == 0.7
    for a, m in zip(aux, muon_aux):
        assert same_params(a["params"], m["params"])
        assert {k: a[k] for k in ("lr", "betas", "eps", "weight_decay")} == {k: m[k] for k in
                                                                          ("lr", "betas", "eps", "weight_decay")}
    assert aux[0]["lr"] == 2e-2 and tuple(aux[0]["betas"]) == (0.8, 0.9) and aux[0]["eps"] == 1e-7
    assert sum(len(g["params"]) for g in adamw.param_groups) == len(list(model.parameters()))


def test_each_aux_lr_is_in_its_own_runs_identity_only():
    """lr_adamw_aux changes an AdamW run, lr_muon_aux a Muon run; neither is in the other's identity
    (changing one optimizer's knob keeps the other's runs)."""
    cfg = defaults()
    adamw, muon = tg.run_settings(cfg, "adamw"), tg.run_settings(cfg, "muon")
    assert adamw["lr_adamw_aux"] == cfg["lr_adamw_aux"] and "lr_muon_aux" not in adamw
    assert muon["lr_muon_aux"] == cfg["lr_muon_aux"] and "lr_adamw_aux" not in muon
    moved = dict(cfg, lr_adamw_aux=cfg["lr_adamw_aux"] * 2)
    assert tg.run_settings(moved, "adamw") != adamw and tg.run_settings(moved, "muon") == muon


def test_the_defaults_are_both_optimizers_winners_in_the_committed_tuning_record(tmp_path, capsys):
    """Issue 20 item 1: `python train_grokking.py` compares tuned against tuned: its defaults are each
    optimizer's winner of the fair study on div, chosen on tuning seed 100 (never a reported seed), as the
    committed record says, and the run says so; moving a setting that shapes the runs says that instead."""
    with open(os.path.join(ROOT, "results", "grokking_fair2", "results.json")) as f:
        record = json.load(f)
    cfg, study = defaults(), record["config"]
    reported = {int(s) for s in str(study["seeds"]).split(",")}
    assert study["task"] == cfg["task"] == "div"
    tuned = {}
    for o in ("adamw", "muon"):
        winner = record["tuned"][f"div/{o}"]
        assert winner["tune_seeds"] == [100] and not reported & set(winner["tune_seeds"])
        tuned.update(winner["values"])
        assert {k: cfg[k] for k in winner["values"]} == winner["values"], o
    for k in tg.CONFIG_KEYS:  # what the study held fixed is the default too (the winners hold under it)
        if k not in tuned and k not in tg.FREE_OF_TUNING and k in study:
            assert cfg[k] == study[k], k
    assert tg.tuning_note(cfg) == tg.TUNED_NOTE
    tg.main(tiny(tmp_path, "--optimizers=adamw", "--max_steps=2", "--save_checkpoint=False"))
    assert "not the tuned defaults (task, p, batch_size, eval_every, d_model, n_head, d_mlp changed)" in (
        capsys.readouterr().out)


def test_a_run_still_near_chance_at_give_up_at_stops_as_censored(tmp_path):
    """A diverging AdamW run (lr 3) stops at the first evaluation at or after give_up_at and counts as
    censored at max_steps; a learning run (Muon) and give_up_at=0 train to the end."""
    torch.set_num_threads(1)
    out = tg.main(tiny(tmp_path, "--optimizers=adamw,muon", "--lr_adamw=3.0", "--weight_decay=0",
                       "--give_up_at=15", "--max_steps=60", "--p=23", "--batch_size=128"))
    adamw, muon = (next(r for r in out["runs"] if r["optimizer"] == o) for o in ("adamw", "muon"))
    assert adamw["gave_up"] and adamw["steps_run"] == 20 and adamw["censored"] and adamw["final_train_acc"] < 0.1
    assert adamw["grok_step"] is None and tg.fmt_step(adamw) == ">60*"
    assert not muon["gave_up"] and muon["steps_run"] == 60
    kept = tg.main(tiny(tmp_path / "b", "--optimizers=adamw", "--lr_adamw=3.0", "--weight_decay=0",
                        "--give_up_at=0", "--max_steps=30", "--p=23"))
    assert not kept["runs"][0]["gave_up"] and kept["runs"][0]["steps_run"] == 30


def test_hard_task_analysis_reads_the_committed_records_and_a_checkpoint(tmp_path):
    """results/grokking_hard/analyze.py: the documented tables come from the committed records (12
    runs, none grokked, which the write-up claims), and the error report works on a real checkpoint."""
    import glob
    import importlib.util
    path = os.path.join(ROOT, "results", "grokking_hard", "analyze.py")
    spec = importlib.util.spec_from_file_location("analyze_hard", path)
    an = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(an)
    curve = dict(step=[0, 10, 20], val_acc=[0.1, 0.6, 0.9])
    assert an.first_step(curve, "val_acc", 0.5) == 10 and an.first_step(curve, "val_acc", 0.95) is None
    runs = an.load_runs()
    assert len(runs) == 12 and {r["task"] for r in runs} == {"x2xyy2", "x3xy"}
    assert all(r["grok_step"] is None and r["steps_run"] == r["max_steps"] == 10000 for r in runs)
    assert len(an.curve_table(runs).splitlines()) == 2 + 4
    reported = an.reported_runs()  # round 2 replaced the two AdamW winners
    assert len(reported) == 12 and all(r["grok_step"] is None for r in reported)
    assert {(r["task"], r["settings"]["lr"], r["settings"]["weight_decay"]) for r in reported
            if r["optimizer"] == "adamw"} == {("x2xyy2", 0.015, 1.0), ("x3xy", 0.005, 3.0)}
    assert "x3xy val >= 0.5" in an.threshold_ratios(reported)
    tg.main(tiny(tmp_path, "--task=x2xyy2", "--optimizers=muon"))
    (ckpt,) = glob.glob(str(tmp_path / "ckpt" / "*.pt"))
    assert "val acc" in an.error_report(ckpt)
    tg.main(tiny(tmp_path / "add", "--optimizers=muon"))
    with pytest.raises(SystemExit, match="x2xyy2"):
        an.error_report(glob.glob(str(tmp_path / "add" / "ckpt" / "*.pt"))[0])


# -----------------------------------------------------------------------------
# issue 18: the run identity; every setting checked before the first step; diverged runs marked

def test_the_record_holds_the_run_identity_with_the_compute_dtype(tmp_path, monkeypatch):
    """The compute dtype muon_optim picks (bf16 with MUON_CPU_BF16=1) is part of the recorded identity,
    so a study never reuses an fp32 run for a bf16 request (tests/test_study_grokking.py)."""
    import muon_optim
    dtypes = []
    try:
        for env in ("0", "1"):
            monkeypatch.setenv("MUON_CPU_BF16", env)
            muon_optim.cpu_fast_bf16.cache_clear()
            rec = tg.main(tiny(tmp_path / env, "--optimizers=muon", "--p=5", "--max_steps=2", "--d_model=16",
                               "--d_mlp=16", "--save_checkpoint=False"))["runs"][0]
            dtypes.append(rec["identity"]["compute_dtype"])
            assert rec["identity"] == tg.run_identity(rec["settings"], tg.SOURCE_HASH, "")
    finally:
        monkeypatch.delenv("MUON_CPU_BF16")
        muon_optim.cpu_fast_bf16.cache_clear()
    assert dtypes[0] == "torch.float32" and "bfloat16" in dtypes[1]


def test_a_diverged_run_stops_and_is_marked(tmp_path):
    """lr 1e4 makes the loss NaN by the first evaluation: the run stops there, censored and marked
    diverged (argmax of NaN logits would otherwise score chance accuracy as if it were learning)."""
    rec = tg.main(tiny(tmp_path, "--optimizers=adamw", "--lr_adamw=1e4", "--give_up_at=0"))["runs"][0]
    assert rec["diverged"] and rec["censored"] and rec["steps_run"] == 10 and tg.fmt_step(rec) == ">30!"


BAD_SETTINGS = [
    ("--eval_every=0", "--eval_every=0: "), ("--batch_size=0", "--batch_size=0: "),
    ("--max_steps=0", "--max_steps=0: "),
    ("--n_head=3", "--n_head=3: .*d_model=32"), ("--device=cuda", "--device=cuda: .*--device=cpu"),
    ("--device=gpu", "--device=gpu: "), ("--ns_method=newton", "ns_method.*'newton'"),
    ("--threshold=1.5", "--threshold=1.5: "), ("--warmup_steps=-1", "--warmup_steps=-1: "),
    ("--give_up_at=-5", "--give_up_at=-5: "), ("--lr_muon=0", "--lr_muon=0: "), ("--lr_adamw=-1", "--lr_adamw=-1: "),
    ("--weight_decay=-1", "--weight_decay=-1: "), ("--momentum_muon=1", "--momentum_muon=1: "),
    ("--optimizers=sgd", "--optimizers=sgd: "), ("--threads=-1", "--threads=-1: "), ("--n_layer=0", "--n_layer=0: "),
    ("--p=1", "--p=1: "), ("--d_mlp=0", "--d_mlp=0: "), ("--eps_adamw=0", "--eps_adamw=0: "),
    ("--lr_muon_aux=0", "--lr_muon_aux=0: "), ("--weight_decay_muon=-1", "--weight_decay_muon=-1: "),
    ("--lr_adamw_aux=0", "--lr_adamw_aux=0: ")]


@pytest.mark.parametrize("arg, match", BAD_SETTINGS)
def test_every_setting_is_checked_before_the_first_run(tmp_path, arg, match):
    """One line naming the setting, its value and the fix, before any run trains (a misspelled
    ns_method was reported only after the whole AdamW run had trained)."""
    if arg == "--device=cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises((ValueError, SystemExit), match=match) as exc:
        tg.main(tiny(tmp_path, "--max_steps=5" if arg != "--max_steps=0" else "--seed=0", arg))
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "runs").exists()


def test_help_lists_every_setting():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_grokking.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    for k in tg.CONFIG_KEYS:
        assert f"--{k}=" in proc.stdout
    assert "--lr_muon=0.1" in proc.stdout and "momentum 0.85" in proc.stdout


def test_no_checkpoint_is_promised_without_save_checkpoint(tmp_path, capsys, monkeypatch):
    tg.main(tiny(tmp_path, "--optimizers=adamw", "--max_steps=2", "--save_checkpoint=False"))
    out = capsys.readouterr().out
    assert "wrote" in out and "checkpoints in" not in out and "ckpt" not in out
    assert not (tmp_path / "ckpt").exists()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(tg, "train_run", interrupted)
    with pytest.raises(SystemExit):
        tg.main(tiny(tmp_path / "b", "--optimizers=adamw", "--max_steps=2", "--save_checkpoint=False"))
    (line,) = [t for t in capsys.readouterr().out.splitlines() if "interrupted" in t]
    assert "checkpoint" not in line


