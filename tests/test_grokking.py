"""Tests for model_tiny.py and train_grokking.py (fast: tiny p, few steps)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train_grokking as tg  # noqa: E402
from model_tiny import TinyConfig, TinyTransformer  # noqa: E402


def tiny(out_dir, *args):
    """A seconds-long config: add mod 11, a small model, a few dozen steps."""
    return tg.parse_overrides(["--p=11", "--task=add", "--max_steps=30", "--eval_every=10", "--batch_size=32",
                               "--d_model=32", "--n_head=2", "--d_mlp=64", "--threads=1", "--stop_on_grok=False",
                               f"--out_dir={out_dir}", *args], {k: getattr(tg, k) for k in tg.CONFIG_KEYS})


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
    cfg = tg.parse_overrides([f"--out_dir={tmp_path}", "--task=divide"], {k: getattr(tg, k) for k in tg.CONFIG_KEYS})
    with pytest.raises(ValueError, match="unknown task 'divide'"):
        tg.main(cfg)
    cfg = tg.parse_overrides(["--seeds=0,1", "--tune_seeds=1,2", "--tune_lrs_adamw=1e-3", f"--out_dir={tmp_path}"],
                             {k: getattr(tg, k) for k in tg.CONFIG_KEYS})
    with pytest.raises(ValueError, match="overlap"):
        tg.main(cfg)
    with pytest.raises(SystemExit, match="unknown setting --lr;"):
        tg.parse_overrides(["--lr=3"], {k: getattr(tg, k) for k in tg.CONFIG_KEYS})
    with pytest.raises(SystemExit, match="--resume=1: expected True or False"):
        tg.parse_overrides(["--resume=1"], {k: getattr(tg, k) for k in tg.CONFIG_KEYS})
    with pytest.raises(SystemExit, match="betas_adamw"):
        tg.main(dict(cfg, tune_lrs_adamw="", tune_seeds="", betas_adamw="0.9"))


def test_first_error_is_a_one_line_message_not_a_traceback(tmp_path):
    """What a user meets first from the command line: the cause and the fix, no traceback (unknown
    settings stop in parse_overrides with SystemExit, tested above)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_grokking.py"), f"--out_dir={tmp_path}",
                           "--task=divide"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: unknown task 'divide'; choose one of add, sub"), proc.stderr


def test_overrides_parse_types():
    cfg = tg.parse_overrides(["--seeds=0,1,2", "--lr_muon=1e-2", "--max_steps=5", "--prenorm=True", "--task=add",
                              "--resume=False", "--save_checkpoint=False", "--betas_adamw=0.9,0.95"],
                             {k: getattr(tg, k) for k in tg.CONFIG_KEYS})
    assert cfg["seeds"] == "0,1,2" and cfg["lr_muon"] == 0.01 and cfg["max_steps"] == 5 and cfg["prenorm"] is True
    assert cfg["resume"] is False and cfg["save_checkpoint"] is False and tg.parse_betas(cfg["betas_adamw"], "b") == (0.9, 0.95)
    assert tg.parse_list(cfg["seeds"], int, "seeds") == [0, 1, 2]


def test_short_run_memorizes_and_writes_results(tmp_path):
    """Both optimizers, same init and batches, p=11: each memorizes the training set (train accuracy
    reaches 1.0 at some evaluation; the last evaluation may dip, and by how much depends on the CPU's
    summation order, so only a margin is asserted there)."""
    torch.set_num_threads(1)
    cfg = tg.parse_overrides(["--p=11", "--task=add", "--train_frac=0.5", "--max_steps=150", "--eval_every=10",
                              "--batch_size=32", "--seeds=0", "--threads=1", "--stop_on_grok=False",
                              "--d_model=64", "--n_head=2", "--d_mlp=128",
                              f"--out_dir={tmp_path}"], {k: getattr(tg, k) for k in tg.CONFIG_KEYS})
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
    # a finished run is reused, not retrained
    again = tg.main(cfg)
    assert [r["wall_s"] for r in again["runs"]] == [r["wall_s"] for r in runs]


def test_study_summary_counts_censored_runs():
    def rec(opt, seed, step):
        return dict(task="add", optimizer=opt, seed=seed, grok_step=step, max_steps=1000, lr=1.0, memorize_step=5)
    records = [rec("adamw", s, st) for s, st in enumerate([400, 600, None])] + \
              [rec("muon", s, st) for s, st in enumerate([100, 150, 200])]
    s = tg.summarize(records, ["add"], ["adamw", "muon"])
    row = s["per_task"]["add"]
    assert row["adamw"]["grokked"] == 2 and row["adamw"]["n"] == 3
    assert row["adamw"]["steps"] == [400, 600, 1000]  # censored counted at max_steps, not dropped
    assert row["muon"]["speedup"] == pytest.approx(600 / 150)
    lo, hi = row["muon"]["speedup_ci95"]
    assert lo <= 4.0 <= hi
    assert row["muon"]["welch"]["p"] < 0.2


def test_ctrl_c_saves_checkpoint_and_partial_results(tmp_path):
    """A real SIGINT (what Ctrl-C sends) during training: checkpoint written, results.json marked interrupted."""
    import signal
    import threading
    torch.set_num_threads(1)
    cfg = tg.parse_overrides(["--p=11", "--task=add", "--optimizers=adamw", "--max_steps=1000000", "--batch_size=16",
                              "--d_model=32", "--n_head=2", "--d_mlp=64", "--threads=1", "--stop_on_grok=False",
                              f"--out_dir={tmp_path}"], {k: getattr(tg, k) for k in tg.CONFIG_KEYS})
    tg.train_run(dict(cfg, max_steps=2, out_dir=str(tmp_path / "warmup")), "add", "adamw", 3e-3, 0, show_bar=False)
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
    opt = tg.make_optimizer("muon", model, {k: getattr(tg, k) for k in tg.CONFIG_KEYS}, lr=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    adam = {names[id(p)] for g in opt.param_groups if not g["use_muon"] for p in g["params"]}
    assert muon == {f"blocks.{i}.{w}" for i in range(2) for w in
                    ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.fc.weight", "mlp.proj.weight")}
    assert {"tok_emb.weight", "pos_emb.weight", "head.weight", "head.bias"} <= adam
    assert len(muon) + len(adam) == len(list(model.parameters()))


def test_rerun_reuses_only_runs_with_the_same_settings(tmp_path):
    """Any constant that can change a run (not just a hand-picked list) is part of its cache key; the
    AdamW run does not depend on the Muon knobs, so it stays cached when only those change."""
    torch.set_num_threads(1)
    first = {r["optimizer"]: r for r in tg.main(tiny(tmp_path))["runs"]}
    assert all(r["source_hash"] == tg.SOURCE_HASH and r["source_files"] ==
               ["train_grokking.py", "model_tiny.py", "muon_optim.py"] for r in first.values())
    same = {r["optimizer"]: r for r in tg.main(tiny(tmp_path))["runs"]}
    assert all(same[o]["wall_s"] == first[o]["wall_s"] for o in first)  # reused
    muon_knob = {r["optimizer"]: r for r in tg.main(tiny(tmp_path, "--momentum_muon=0.9"))["runs"]}
    assert muon_knob["adamw"]["wall_s"] == first["adamw"]["wall_s"]
    assert muon_knob["muon"]["settings"]["momentum_muon"] == 0.9
    betas = {r["optimizer"]: r for r in tg.main(tiny(tmp_path, "--betas_adamw=0.9,0.95"))["runs"]}
    assert all(betas[o]["settings"]["betas_adamw"] == "0.9,0.95" for o in first)  # both use AdamW betas
    eps = tg.main(tiny(tmp_path, "--eps_adamw=1e-6", "--optimizers=adamw"))["runs"][0]
    assert eps["settings"]["eps_adamw"] == 1e-6
    forced = tg.main(tiny(tmp_path, "--resume=False", "--optimizers=adamw"))["runs"][0]
    assert forced["settings"] == first["adamw"]["settings"]
    with open(tmp_path / "runs" / f"{forced['name']}.json") as f:
        assert json.load(f)["wall_s"] == forced["wall_s"]  # retrained and rewritten
    (tmp_path / "runs" / f"{forced['name']}.json").write_text('{"name": "trunc')  # e.g. edited by hand
    redone = tg.main(tiny(tmp_path, "--optimizers=adamw"))["runs"][0]
    assert redone["settings"] == first["adamw"]["settings"] and redone["source_hash"] == tg.SOURCE_HASH


def test_edit_and_rerun_retrains(tmp_path):
    """The user story of issue 11: run, edit model_tiny.py, run the same command again -> retrained
    (the record's source_hash covers the trainer, the model file and muon_optim.py); unchanged -> reused."""
    for name in ("train_grokking.py", "model_tiny.py", "muon_optim.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    args = ["--p=5", "--task=add", "--optimizers=muon", "--lr_muon=0.05", "--max_steps=4", "--eval_every=2", "--batch_size=8",
            "--d_model=16", "--n_head=2", "--d_mlp=16", "--threads=1", "--save_checkpoint=False", "--out_dir=out"]
    torch.set_num_threads(1)
    first = tg.main(tg.parse_overrides(args[:-1] + [f"--out_dir={tmp_path / 'out'}"],
                                       {k: getattr(tg, k) for k in tg.CONFIG_KEYS}))["runs"][0]

    def rerun():  # the same command, from the copied scripts
        proc = subprocess.run([sys.executable, "train_grokking.py", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg"))
        assert proc.returncode == 0, proc.stderr
        with open(tmp_path / "out" / "runs" / "add_muon_lr0.05_seed0.json") as f:
            return proc.stdout, json.load(f)

    out, again = rerun()
    assert "reusing 1 finished run(s)" in out and again["wall_s"] == first["wall_s"]
    with open(tmp_path / "model_tiny.py", "a") as f:
        f.write("\n# an edit\n")
    out, edited = rerun()
    assert "retraining 1 (code changed)" in out
    assert edited["source_hash"] != first["source_hash"] and edited["settings"] == first["settings"]


def defaults():
    return {k: getattr(tg, k) for k in tg.CONFIG_KEYS}


def test_tune_grid_parsing_and_clear_errors():
    grid = tg.parse_grid("lr_muon=0.05,0.1; weight_decay_muon=0.25,0.5,1;ns_method=newton_schulz,polar_express;"
                         "batch_size=256,512", "muon", defaults())
    assert grid == {"lr_muon": [0.05, 0.1], "weight_decay_muon": [0.25, 0.5, 1.0],
                    "ns_method": ["newton_schulz", "polar_express"], "batch_size": [256, 512]}
    assert isinstance(grid["batch_size"][0], int) and isinstance(grid["weight_decay_muon"][2], float)
    assert len(tg.grid_configs(grid)) == 24 and tg.grid_configs({}) == [{}]
    assert tg.grid_configs({"a": [1, 2], "b": [3]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
    for text, match in [("lr_adamw=1e-3;momentum_muon=0.9", "cannot tune 'momentum_muon' \\(it does not change a adamw run"),
                        ("lr_muon=0.05", "cannot tune 'lr_muon' \\(it does not change a adamw run"),
                        ("lr=1e-3", "cannot tune 'lr' \\(no such setting\\); tunable for adamw: .*lr_adamw"),
                        ("max_steps=100,200", "cannot tune 'max_steps' \\(it defines the task or the measurement"),
                        ("seeds=1,2", "cannot tune 'seeds'"),
                        ("lr_adamw", "is not name=v1,v2"),
                        ("lr_adamw=1e-3;lr_adamw=3e-3", "appears twice"),
                        ("lr_adamw=1e-3,1e-3", "distinct values"),
                        ("lr_adamw=", "distinct values"),
                        ("lr_adamw=fast", "expected a number"),
                        ("batch_size=256.5", "expected a whole number")]:
        with pytest.raises(ValueError, match=match):
            tg.parse_grid(text, "adamw", defaults())


def test_tune_budgets_must_be_equal_and_seeds_disjoint(tmp_path):
    cfg = dict(defaults(), tune_grid_adamw="lr_adamw=1e-3,3e-3,1e-2;weight_decay=0.3,1,3",
               tune_grid_muon="lr_muon=0.05,0.1;weight_decay_muon=0.25,1;lr_muon_aux=3e-3,3e-2")
    with pytest.raises(ValueError, match=r"unequal tuning budgets: adamw 9 \(3 x 3\); muon 8 \(2 x 2 x 2\) "
                                         r"configurations.*--tune_unequal_ok=True"):
        tg.tuning_grids(cfg, ["adamw", "muon"])
    assert len(tg.tuning_grids(dict(cfg, tune_unequal_ok=True), ["adamw", "muon"])["adamw"]) == 2
    assert tg.tuning_grids(cfg, ["muon"])["muon"]["lr_muon"] == [0.05, 0.1]  # one optimizer: nothing to compare
    with pytest.raises(ValueError, match=r"adamw 1 \(no grid: its defaults\); muon 2"):
        tg.tuning_grids(dict(defaults(), tune_lrs_muon="0.05,0.1"), ["adamw", "muon"])
    with pytest.raises(ValueError, match="not both"):
        tg.tuning_grids(dict(cfg, tune_lrs_adamw="1e-3"), ["adamw", "muon"])
    # the old LR-list flags are a shorthand for a one-axis grid
    old = tg.tuning_grids(dict(defaults(), tune_lrs_adamw="1e-3,3e-3", tune_lrs_muon="0.05,0.1"), ["adamw", "muon"])
    assert old == {"adamw": {"lr_adamw": [1e-3, 3e-3]}, "muon": {"lr_muon": [0.05, 0.1]}}
    ok = dict(cfg, tune_grid_adamw="lr_adamw=1e-3,3e-3,1e-2,3e-2;weight_decay=0.3,1", out_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"--tune_seeds \[2\] overlap --seeds"):
        tg.main(dict(ok, seeds="0,1,2", tune_seeds="2,3"))
    with pytest.raises(ValueError, match="tuning grids given but no --tune_seeds"):
        tg.main(dict(ok, seeds="0"))


def test_pick_config_mean_grok_step_ties_and_edge_flags():
    def rec(step, acc=1.0):
        return dict(grok_step=step, max_steps=400, final_val_acc=acc)
    grid = {"lr_muon": [0.05, 0.1, 0.2], "ns_method": ["newton_schulz", "polar_express"]}
    configs = tg.grid_configs(grid)
    per = [[rec(300), rec(None)], [rec(200), rec(220)], [rec(140), rec(180)],  # product order: lr 0.05 ns, pe,
           [rec(150), rec(200)], [rec(None, 0.5), rec(None, 0.6)], [rec(None, 0.5), rec(None, 0.7)]]  # 0.1 ns, ...
    w = tg.pick_config(per, "div", "muon", configs, grid, [100, 101])
    assert w["values"] == {"lr_muon": 0.1, "ns_method": "newton_schulz"}  # mean 160 beats 175
    assert w["at_edge"] == [] and w["scores"][0]["steps"] == [300, 400]  # censored counted at max_steps
    per[3] = [rec(140), rec(180)]  # a tie at 160: the first in grid order (0.1 newton_schulz) wins
    assert tg.pick_config(per, "div", "muon", configs, grid, [100, 101])["values"]["ns_method"] == "newton_schulz"
    per = [[rec(None, 0.1)]] * 4 + [[rec(None, 0.3)], [rec(None, 0.2)]]  # all censored: best final val acc
    w = tg.pick_config(per, "div", "muon", configs, grid, [100])
    assert w["values"] == {"lr_muon": 0.2, "ns_method": "newton_schulz"}
    assert w["at_edge"] == [dict(name="lr_muon", value=0.2, side="high", grid=[0.05, 0.1, 0.2])]  # strings: no order
    assert tg.grid_edges({"x": 1.0}, {"x": [1.0]}) == []  # a single value is not tuned, not an edge


def test_grid_tuning_end_to_end(tmp_path, capsys):
    """p=11: both optimizers tuned over 2-setting grids (2 configurations each) on seed 100, reported
    on seed 0 with each winner's values; names carry the tuned values; a rerun reuses every run."""
    torch.set_num_threads(1)
    args = ["--seeds=0", "--tune_seeds=100", "--max_steps=20", "--save_checkpoint=False",
            "--tune_grid_adamw=lr_adamw=1e-3,1e-2;weight_decay=0.3", "--tune_grid_muon=lr_muon=0.05;lr_muon_aux=3e-3,3e-2"]
    out = tg.main(tiny(tmp_path, *args))
    tune = [r for r in out["runs"] if r["phase"] == "tune"]
    evals = {r["optimizer"]: r for r in out["runs"] if r["phase"] == "eval"}
    assert len(tune) == 4 and {r["seed"] for r in tune} == {100} and {r["seed"] for r in evals.values()} == {0}
    assert len({r["name"] for r in out["runs"]}) == 6 and "add_muon_lr0.05_lr_muon_aux0.003_seed100" in {r["name"] for r in tune}
    for o, lr_key in (("adamw", "lr_adamw"), ("muon", "lr_muon")):
        won = out["tuned"][f"add/{o}"]["values"]
        assert evals[o]["hparams"] == won and evals[o]["lr"] == won[lr_key] == out["tuned_lr"][f"add/{o}"]
        assert all(evals[o]["settings"][k] == v for k, v in won.items() if k != lr_key)
        assert out["tuned"][f"add/{o}"]["n_configs"] == 2 and len(out["tuned"][f"add/{o}"]["scores"]) == 2
    assert evals["adamw"]["settings"]["weight_decay"] == 0.3
    assert {(e["optimizer"], e["name"]) for e in out["tuning_edges"]} == {("adamw", "lr_adamw"), ("muon", "lr_muon_aux")}
    text = capsys.readouterr().out
    assert "at the edge: extend the grid (add/adamw: lr_adamw=" in text and "tuned add/muon (2 configuration(s)" in text
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["tuning_edges"] == out["tuning_edges"]
    again = tg.main(tiny(tmp_path, *args))
    assert [r["wall_s"] for r in again["runs"]] == [r["wall_s"] for r in out["runs"]]
    assert "tuning add: reusing 4 finished run(s)" in capsys.readouterr().out


def test_star_design_varies_one_setting_at_a_time_around_the_current_values():
    grid = tg.parse_grid("lr_muon=0.05,0.1,0.2;weight_decay_muon=0.25,0.5,1;lr_muon_aux=3e-3,1e-2,3e-2", "muon", defaults())
    cfg = dict(defaults(), tune_design="star", lr_muon=0.1, weight_decay_muon=0.5, lr_muon_aux=1e-2)
    center = tg.star_center(cfg, "muon", grid)
    configs = tg.grid_configs(grid, "star", center)
    assert len(configs) == 7 and configs[0] == {"lr_muon": 0.1, "weight_decay_muon": 0.5, "lr_muon_aux": 1e-2}
    assert all(sum(c[k] != center[k] for k in grid) == 1 for c in configs[1:])  # one setting off the center
    assert {c["lr_muon"] for c in configs} == {0.05, 0.1, 0.2} and len({tuple(c.items()) for c in configs}) == 7
    both = dict(cfg, tune_grid_muon="lr_muon=0.05,0.1,0.2;weight_decay_muon=0.25,0.5,1;lr_muon_aux=3e-3,1e-2,3e-2",
                tune_grid_adamw="lr_adamw=1e-3,2e-3,3e-3,5e-3,1e-2;weight_decay=0.3,1,3", lr_adamw=3e-3, weight_decay=1.0)
    assert set(tg.tuning_grids(both, ["adamw", "muon"])) == {"adamw", "muon"}  # 1 + 4 + 2 == 1 + 2 + 2 + 2
    with pytest.raises(ValueError, match=r"unequal tuning budgets: adamw 6 \(4 \+ 3\); muon 7"):
        tg.tuning_grids(dict(both, tune_grid_adamw="lr_adamw=1e-3,2e-3,3e-3,5e-3;weight_decay=0.3,1,3"), ["adamw", "muon"])
    with pytest.raises(ValueError, match=r"weight_decay_muon's list must hold its current value 0.4"):
        tg.tuning_grids(dict(both, weight_decay_muon=0.4), ["adamw", "muon"])
    with pytest.raises(ValueError, match="choose product or star"):
        tg.tuning_grids(dict(both, tune_design="random"), ["adamw", "muon"])
    # the winner's setting at the end of its list is flagged as in the product design
    per = [[dict(grok_step=s, max_steps=400, final_val_acc=1.0)] for s in (200, 300, 150, 250, 260, 270, 280)]
    w = tg.pick_config(per, "div", "muon", configs, grid, [100])
    assert w["values"] == configs[2] and [e["name"] for e in w["at_edge"]] == ["lr_muon"]


def test_a_run_still_near_chance_at_give_up_at_stops_as_censored(tmp_path):
    """A diverging AdamW run (lr 3) stops at the first evaluation at or after give_up_at and counts as
    censored at max_steps; a learning run (Muon) and give_up_at=0 train to the end."""
    torch.set_num_threads(1)
    out = tg.main(tiny(tmp_path, "--optimizers=adamw,muon", "--lr_adamw=3.0", "--weight_decay=0",
                       "--give_up_at=15", "--max_steps=60", "--p=23", "--batch_size=128"))
    adamw, muon = (next(r for r in out["runs"] if r["optimizer"] == o) for o in ("adamw", "muon"))
    assert adamw["gave_up"] and adamw["steps_run"] == 20 and adamw["censored"] and adamw["final_train_acc"] < 0.1
    assert tg.steps_or_max([adamw]) == [60] and tg.fmt_step(adamw) == ">60*"
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
