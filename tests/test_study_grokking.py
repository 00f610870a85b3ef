"""Tests for study_grokking.py: grids, fair tuning, summaries, reuse by run identity, failures. Each run
is a train_grokking.py process (tiny: add mod 11, a small model, a few dozen steps)."""
import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import study_grokking as sg  # noqa: E402
import train_grokking as tg  # noqa: E402

TINY = ["--p=11", "--task=add", "--max_steps=30", "--eval_every=10", "--batch_size=32", "--d_model=32", "--n_head=2",
        "--d_mlp=64", "--threads=1", "--stop_on_grok=False", "--save_checkpoint=False"]


def tiny(out_dir, *args):
    return sg.parse_overrides([*TINY, f"--out_dir={out_dir}", *args], sg.CONFIG)


@pytest.fixture
def code_copy(tmp_path, monkeypatch):
    """The study's runs execute copies of the code, so an edit elsewhere in the checkout while the
    tests run is not a mid-study code change (which the study refuses)."""
    code = tmp_path / "code"
    code.mkdir()
    for name in ("study_grokking.py", "train_grokking.py", "model_tiny.py", "muon_optim.py"):
        shutil.copy(os.path.join(ROOT, name), code / name)
    monkeypatch.setattr(sg, "CODE_FILES", [str(code / f) for f in ("train_grokking.py", "model_tiny.py",
                                                                    "muon_optim.py")])
    return code


def defaults():
    return dict(sg.CONFIG)


def top_level(path):
    with open(path) as f:
        text = f.read()
    return {n.name: ast.get_source_segment(text, n) for n in ast.parse(text).body if isinstance(n, ast.FunctionDef)}


def test_the_study_reads_the_trainer_and_shares_its_pasted_helpers():
    """No import of the trainer: its settings, task names and run-settings rules are read from its
    source, and the helpers both need are identical copies; the grid parser and the bootstrap are the
    ones study_lm.py has."""
    assert sg.TRAINER_SETTINGS == {k: getattr(tg, k) for k in tg.CONFIG_KEYS}
    assert sg.TASK_NAMES == list(tg.TASKS) and sg.NOT_RUN_SETTINGS == tg.NOT_RUN_SETTINGS
    assert sg.MUON_ONLY == tg.MUON_ONLY and sg.ADAMW_ONLY == tg.ADAMW_ONLY and sg.LR_KEY == tg.LR_KEY
    with open(os.path.join(ROOT, "study_grokking.py")) as f:
        tree = ast.parse(f.read())
    imported = ({a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
                | {n.module for n in tree.body if isinstance(n, ast.ImportFrom)})
    assert "train_grokking" not in imported and "muon_optim" in imported
    study, trainer, lm = (top_level(os.path.join(ROOT, f)) for f in ("study_grokking.py", "train_grokking.py",
                                                                     "study_lm.py"))
    for name in ("parse_overrides", "settings_help", "run_identity", "atomic_write_json", "source_hash",
                 "check_settings", "fmt_step"):
        assert study[name] == trainer[name], name
    for name in ("parse_grid", "bootstrap_ci", "identity_diff"):
        assert name not in lm or study[name] == lm[name], name


def test_tune_grid_parsing_and_clear_errors():
    axes = sg.tuning_axes("lr_muon=0.05,0.1; weight_decay_muon=0.25,0.5,1;ns_method=newton_schulz,polar_express;"
                          "batch_size=256,512", "muon")
    assert axes == [(("lr_muon",), [(0.05,), (0.1,)]), (("weight_decay_muon",), [(0.25,), (0.5,), (1.0,)]),
                    (("ns_method",), [("newton_schulz",), ("polar_express",)]), (("batch_size",), [(256,), (512,)])]
    assert isinstance(axes[3][1][0][0], int) and isinstance(axes[1][1][2][0], float)
    assert len(sg.grid_configs(axes)) == 24 and sg.grid_configs([]) == [{}]
    tied = sg.tuning_axes("lr_muon=0.05;weight_decay_muon+lr_muon_aux=0.25+3e-3,1+1e-2", "muon")  # `+` ties
    assert sg.grid_configs(tied) == [{"lr_muon": 0.05, "weight_decay_muon": 0.25, "lr_muon_aux": 3e-3},
                                     {"lr_muon": 0.05, "weight_decay_muon": 1.0, "lr_muon_aux": 1e-2}]
    for text, match in [("lr_adamw=1e-3;momentum_muon=0.9", "cannot tune 'momentum_muon' \\(it does not change a"),
                        ("lr_muon=0.05", "cannot tune 'lr_muon' \\(it does not change a adamw run"),
                        ("lr=1e-3", "cannot tune 'lr' \\(no such setting\\); tunable for adamw: .*lr_adamw"),
                        ("max_steps=100,200", "cannot tune 'max_steps' \\(it defines the task or the measurement"),
                        ("seed=1,2", "cannot tune 'seed'"),
                        ("lr_adamw", "is not name=v1,v2"),
                        ("lr_adamw=1e-3;lr_adamw=3e-3", "appears twice"),
                        ("lr_adamw=1e-3,1e-3", "distinct values"),
                        ("lr_adamw=1e-3,0.001", "lists a value twice"),
                        ("lr_adamw=", "distinct values"),
                        ("lr_adamw+weight_decay=1e-3", "one part per name"),
                        ("lr_adamw=fast", "expected a number"),
                        ("batch_size=256.5", "expected a whole number")]:
        with pytest.raises(ValueError, match=match):
            sg.tuning_axes(text, "adamw")


def test_lr_adamw_aux_is_tunable_for_adamw_and_in_its_identity_only():
    """The AdamW arm's aux LR is a tuning axis of adamw (not of muon), and the identity the study wants
    is the one the trainer records, for either optimizer, with it moved."""
    assert sg.tuning_axes("lr_adamw_aux=1e-2,2e-2", "adamw") == [(("lr_adamw_aux",), [(1e-2,), (2e-2,)])]
    with pytest.raises(ValueError, match="cannot tune 'lr_adamw_aux' \\(it does not change a muon run"):
        sg.tuning_axes("lr_adamw_aux=1e-2,2e-2", "muon")
    cfg = dict(defaults(), lr_adamw_aux=2e-2, lr_muon_aux=3e-2)
    trainer_cfg = dict({k: cfg[k] for k in tg.CONFIG_KEYS if k in cfg}, task="div", seed=100)
    for o in ("adamw", "muon"):
        spec = sg.config_spec(cfg, "div", o, {}, 100, "tune")
        assert sg.wanted_identity(cfg, spec, "c") == tg.run_identity(tg.run_settings(trainer_cfg, o), "c", "")
    adamw = sg.wanted_identity(cfg, sg.config_spec(cfg, "div", "adamw", {}, 100, "tune"), "c")
    muon = sg.wanted_identity(cfg, sg.config_spec(cfg, "div", "muon", {}, 100, "tune"), "c")
    assert adamw["lr_adamw_aux"] == 2e-2 and "lr_muon_aux" not in adamw
    assert muon["lr_muon_aux"] == 3e-2 and "lr_adamw_aux" not in muon


def test_tune_budgets_must_be_equal_and_seeds_disjoint(tmp_path):
    cfg = dict(defaults(), tune_grid_adamw="lr_adamw=1e-3,3e-3,1e-2;weight_decay=0.3,1,3",
               tune_grid_muon="lr_muon=0.05,0.1;weight_decay_muon=0.25,1;lr_muon_aux=3e-3,3e-2")
    with pytest.raises(ValueError, match=r"unequal tuning budgets: adamw 9 \(3 x 3\); muon 8 \(2 x 2 x 2\) "
                                         r"configurations.*--tune_unequal_ok=True"):
        sg.tuning_grids(cfg, ["adamw", "muon"])
    assert len(sg.tuning_grids(dict(cfg, tune_unequal_ok=True), ["adamw", "muon"])["adamw"]) == 2
    assert sg.tuning_grids(cfg, ["muon"])["muon"][0] == (("lr_muon",), [(0.05,), (0.1,)])  # one optimizer
    with pytest.raises(ValueError, match=r"adamw 1 \(no grid: its defaults\); muon 2"):
        sg.tuning_grids(dict(defaults(), tune_lrs_muon="0.05,0.1"), ["adamw", "muon"])
    with pytest.raises(ValueError, match="not both"):
        sg.tuning_grids(dict(cfg, tune_lrs_adamw="1e-3"), ["adamw", "muon"])
    old = sg.tuning_grids(dict(defaults(), tune_lrs_adamw="1e-3,3e-3", tune_lrs_muon="0.05,0.1"), ["adamw", "muon"])
    assert old == {"adamw": [(("lr_adamw",), [(1e-3,), (3e-3,)])], "muon": [(("lr_muon",), [(0.05,), (0.1,)])]}
    ok = dict(cfg, tune_grid_adamw="lr_adamw=1e-3,3e-3,1e-2,3e-2;weight_decay=0.3,1", out_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"--tune_seeds \[2\] overlap --seeds"):
        sg.main(dict(ok, seeds="0,1,2", tune_seeds="2,3"))
    with pytest.raises(ValueError, match="tuning grids given but no --tune_seeds"):
        sg.main(dict(ok, seeds="0"))


def test_pick_config_mean_grok_step_ties_and_edge_flags():
    def rec(step, acc=1.0, diverged=False):
        return dict(grok_step=step, max_steps=400, final_val_acc=acc, diverged=diverged)
    axes = [(("lr_muon",), [(0.05,), (0.1,), (0.2,)]), (("ns_method",), [("newton_schulz",), ("polar_express",)])]
    configs = sg.grid_configs(axes)
    per = [[rec(300), rec(None)], [rec(200), rec(220)], [rec(140), rec(180)],  # product order: lr 0.05 ns, pe,
           [rec(150), rec(200)], [rec(None, 0.5), rec(None, 0.6)], [rec(None, 0.5), rec(None, 0.7)]]  # 0.1 ns, ...
    w = sg.pick_config(per, "div", "muon", configs, axes, [100, 101])
    assert w["values"] == {"lr_muon": 0.1, "ns_method": "newton_schulz"}  # mean 160 beats 175
    assert w["at_edge"] == [] and w["scores"][0]["steps"] == [300, 400]  # censored counted at max_steps
    per[3] = [rec(140), rec(180)]  # a tie at 160: the first in grid order (0.1 newton_schulz) wins
    assert sg.pick_config(per, "div", "muon", configs, axes, [100, 101])["values"]["ns_method"] == "newton_schulz"
    per = [[rec(None, 0.1)]] * 4 + [[rec(None, 0.3)], [rec(None, 0.2)]]  # all censored: best final val acc
    w = sg.pick_config(per, "div", "muon", configs, axes, [100])
    assert w["values"] == {"lr_muon": 0.2, "ns_method": "newton_schulz"}
    assert w["at_edge"] == [dict(name="lr_muon", value=0.2, side="high", grid=[0.05, 0.1, 0.2])]  # strings: no order
    per[4] = [rec(None, 0.9, diverged=True)]  # a diverged configuration is last, whatever its accuracy
    assert sg.pick_config(per, "div", "muon", configs, axes, [100])["values"]["lr_muon"] == 0.2
    assert sg.grid_edges({"x": 1.0}, [(("x",), [(1.0,)])]) == []  # a single value is not tuned, not an edge


def test_star_design_varies_one_setting_at_a_time_around_the_current_values():
    axes = sg.tuning_axes("lr_muon=0.05,0.1,0.2;weight_decay_muon=0.25,0.5,1;lr_muon_aux=3e-3,1e-2,3e-2", "muon")
    cfg = dict(defaults(), tune_design="star", lr_muon=0.1, weight_decay_muon=0.5, lr_muon_aux=1e-2)
    center = sg.star_center(cfg, "muon", axes)
    configs = sg.grid_configs(axes, "star", center)
    assert len(configs) == 7 and configs[0] == {"lr_muon": 0.1, "weight_decay_muon": 0.5, "lr_muon_aux": 1e-2}
    assert all(sum(c[k] != center[k] for k in center) == 1 for c in configs[1:])  # one setting off the center
    assert {c["lr_muon"] for c in configs} == {0.05, 0.1, 0.2} and len({tuple(c.items()) for c in configs}) == 7
    both = dict(cfg, tune_grid_muon="lr_muon=0.05,0.1,0.2;weight_decay_muon=0.25,0.5,1;lr_muon_aux=3e-3,1e-2,3e-2",
                tune_grid_adamw="lr_adamw=1e-3,2e-3,3e-3,5e-3,1e-2;weight_decay=0.3,1,3", lr_adamw=3e-3,
                weight_decay=1.0)
    assert set(sg.tuning_grids(both, ["adamw", "muon"])) == {"adamw", "muon"}  # 1 + 4 + 2 == 1 + 2 + 2 + 2
    with pytest.raises(ValueError, match=r"unequal tuning budgets: adamw 6 \(4 \+ 3\); muon 7"):
        sg.tuning_grids(dict(both, tune_grid_adamw="lr_adamw=1e-3,2e-3,3e-3,5e-3;weight_decay=0.3,1,3"),
                        ["adamw", "muon"])
    with pytest.raises(ValueError, match=r"weight_decay_muon's list must hold its current value 0.4"):
        sg.tuning_grids(dict(both, weight_decay_muon=0.4), ["adamw", "muon"])
    with pytest.raises(ValueError, match="choose product or star"):
        sg.tuning_grids(dict(both, tune_design="random"), ["adamw", "muon"])
    per = [[dict(grok_step=s, max_steps=400, final_val_acc=1.0)] for s in (200, 300, 150, 250, 260, 270, 280)]
    w = sg.pick_config(per, "div", "muon", configs, axes, [100])
    assert w["values"] == configs[2] and [e["name"] for e in w["at_edge"]] == ["lr_muon"]


def test_study_summary_counts_censored_runs():
    def rec(opt, seed, step):
        return dict(task="add", optimizer=opt, seed=seed, grok_step=step, max_steps=1000, lr=1.0, memorize_step=5)
    records = [rec("adamw", s, st) for s, st in enumerate([400, 600, None])] + \
              [rec("muon", s, st) for s, st in enumerate([100, 150, 200])]
    s = sg.summarize(records, ["add"], ["adamw", "muon"])
    row = s["per_task"]["add"]
    assert row["adamw"]["grokked"] == 2 and row["adamw"]["n"] == 3
    assert row["adamw"]["steps"] == [400, 600, 1000]  # censored counted at max_steps, not dropped
    assert row["muon"]["speedup"] == pytest.approx(600 / 150)
    lo, hi = row["muon"]["speedup_ci95"]
    assert lo <= 4.0 <= hi
    assert row["muon"]["welch"]["p"] < 0.2


@pytest.mark.parametrize("args, match", [
    (["--ns_method=newton"], "ns_method.*'newton'"), (["--batch_size=0"], "--batch_size=0: "),
    (["--tune_seeds=100", "--tune_grid_muon=ns_method=newton_schulz,polar_expres", "--optimizers=muon"],
     "ns_method.*'polar_expres'"),
    (["--tune_seeds=100", "--tune_grid_adamw=batch_size=32,0", "--optimizers=adamw"], "--batch_size=0: "),
    (["--tune_seeds=100", "--tune_grid_muon=n_head=2,3", "--optimizers=muon"], "--n_head=3: "),
    (["--jobs=0"], "--jobs >= 1"), (["--seeds=a"], "--seeds='a': expected a comma list of ints"),
    (["--seeds="], "a seed"), (["--task=add,pow"], "unknown task 'pow'"), (["--task=div", "--p=12"], "prime p"),
    (["--optimizers=adamw,sgd"], "--optimizers=adamw,sgd: ")])
def test_every_value_is_checked_before_the_first_run(tmp_path, args, match):
    """A misspelled value in a grid, or any bad setting, stops the study with one line before any run."""
    with pytest.raises((ValueError, SystemExit), match=match) as exc:
        sg.main(tiny(tmp_path, *args))
    assert "\n" not in str(exc.value) and not (tmp_path / "runs").exists()


def test_help_lists_the_study_and_the_trainer_settings():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "study_grokking.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    for k in ("tune_grid_muon", "tune_seeds", "jobs", "resume", "lr_muon", "max_steps", "ns_method"):
        assert f"--{k}=" in proc.stdout


def test_grid_tuning_end_to_end(tmp_path, capsys, code_copy):
    """p=11: both optimizers tuned over 2-setting grids (2 configurations each) on seed 100, reported
    on seed 0 with each winner's values; names carry the tuned values; a rerun reuses every run."""
    args = ["--seeds=0", "--tune_seeds=100", "--max_steps=20",
            "--tune_grid_adamw=lr_adamw=1e-3,1e-2;weight_decay=0.3",
            "--tune_grid_muon=lr_muon=0.05;lr_muon_aux=3e-3,3e-2"]
    out = sg.main(tiny(tmp_path, *args))
    tune = [r for r in out["runs"] if r["phase"] == "tune"]
    evals = {r["optimizer"]: r for r in out["runs"] if r["phase"] == "eval"}
    assert len(tune) == 4 and {r["seed"] for r in tune} == {100} and {r["seed"] for r in evals.values()} == {0}
    names = {r["name"] for r in out["runs"]}
    assert len(names) == 6 and "add_muon_lr0.05_lr_muon_aux0.003_seed100" in names
    for o, lr_key in (("adamw", "lr_adamw"), ("muon", "lr_muon")):
        won = out["tuned"][f"add/{o}"]["values"]
        assert evals[o]["hparams"] == won and evals[o]["lr"] == won[lr_key] == out["tuned_lr"][f"add/{o}"]
        assert all(evals[o]["settings"][k] == v for k, v in won.items() if k != lr_key)
        assert out["tuned"][f"add/{o}"]["n_configs"] == 2 and len(out["tuned"][f"add/{o}"]["scores"]) == 2
    assert evals["adamw"]["settings"]["weight_decay"] == 0.3 and evals["adamw"]["settings"]["max_steps"] == 20
    edges = {(e["optimizer"], e["name"]) for e in out["tuning_edges"]}
    assert edges == {("adamw", "lr_adamw"), ("muon", "lr_muon_aux")}
    text = capsys.readouterr().out
    assert "at the edge: extend the grid (add/adamw: lr_adamw=" in text and "tuned add/muon (2 configuration(s)" in text
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["tuning_edges"] == out["tuning_edges"]
    assert (tmp_path / "grokking_study.png").stat().st_size > 1000
    again = sg.main(tiny(tmp_path, *args))
    assert [r["wall_s"] for r in again["runs"]] == [r["wall_s"] for r in out["runs"]]
    text = capsys.readouterr().out
    assert "tuning add: reusing 4 finished run(s)" in text and "runs add: reusing 2 finished run(s)" in text


def test_a_diverged_configuration_loses_the_tuning_and_the_study_goes_on(tmp_path, capsys, code_copy):
    """lr 1e4 makes the loss NaN: that run is recorded as diverged, its configuration gets the worst
    score (it once won on the tie-break: argmax of NaN logits scores chance accuracy), the table says
    so, and the study completes with the other configuration."""
    out = sg.main(tiny(tmp_path, "--seeds=0", "--tune_seeds=100", "--give_up_at=0", "--optimizers=adamw",
                       "--tune_grid_adamw=lr_adamw=1e-3,1e4"))
    bad = next(r for r in out["runs"] if r["phase"] == "tune" and r["lr"] == 1e4)
    assert bad["diverged"] and bad["censored"] and bad["steps_run"] == 10 and bad["grok_step"] is None
    assert out["tuned"]["add/adamw"]["values"] == {"lr_adamw": 1e-3}
    assert [r["lr"] for r in out["runs"] if r["phase"] == "eval"] == [1e-3]
    assert "diverged" in capsys.readouterr().out and (tmp_path / "results.json").exists()


def test_a_run_is_reused_only_with_the_same_run_identity(tmp_path, capsys, monkeypatch, code_copy):
    """Every setting that can change a run is in its identity (the AdamW run leaves out the Muon knobs,
    so it is shared), and so is the compute dtype: a CPU fp32 run is never reused for a bf16 request
    (MUON_CPU_BF16=1; d_model 16 stays below the CPU bf16 size, so the runs stay fast)."""
    import muon_optim

    def study(*args, env="0"):
        monkeypatch.setenv("MUON_CPU_BF16", env)
        muon_optim.cpu_fast_bf16.cache_clear()
        out = sg.main(tiny(tmp_path, "--p=5", "--max_steps=2", "--eval_every=1", "--d_model=16", "--d_mlp=16",
                           "--batch_size=8", *args))
        return {r["optimizer"]: r for r in out["runs"]}, capsys.readouterr().out
    try:
        first, _ = study()
        assert all(r["identity"]["compute_dtype"] == "torch.float32" for r in first.values())
        same, text = study()
        assert "reusing 2 finished run(s)" in text and all(same[o]["wall_s"] == first[o]["wall_s"] for o in first)
        knob, text = study("--momentum_muon=0.9")  # a Muon knob: the AdamW baseline stays
        assert "reusing 1 finished run(s)" in text and "retraining 1 (momentum_muon changed)" in text
        assert knob["adamw"]["wall_s"] == first["adamw"]["wall_s"] and knob["muon"]["settings"]["momentum_muon"] == 0.9
        bf16, text = study("--momentum_muon=0.9", env="1")
        assert "reusing 0 finished run(s)" in text and "retraining 2 (compute_dtype changed)" in text
        assert all("bfloat16" in r["identity"]["compute_dtype"] for r in bf16.values())
        assert "reusing 2 finished run(s)" in study("--momentum_muon=0.9", env="1")[1]
        forced, text = study("--resume=False", "--optimizers=adamw")
        assert "reusing" not in text and forced["adamw"]["settings"] == first["adamw"]["settings"]
        (tmp_path / "runs" / forced["adamw"]["name"] / "results.json").write_text('{"runs": [{"na')  # edited by hand
        assert "retraining 1 (unreadable)" in study("--optimizers=adamw")[1]
    finally:
        monkeypatch.delenv("MUON_CPU_BF16")
        muon_optim.cpu_fast_bf16.cache_clear()


def test_edit_and_rerun_retrains(tmp_path, code_copy):
    """Run the study, edit model_tiny.py, run the same command again: retrained (the identity holds the
    hash of train_grokking.py, model_tiny.py and muon_optim.py); unchanged: reused."""
    args = ["--p=5", "--task=add", "--optimizers=muon", "--lr_muon=0.05", "--max_steps=4", "--eval_every=2",
            "--batch_size=8", "--d_model=16", "--n_head=2", "--d_mlp=16", "--threads=1", "--save_checkpoint=False",
            "--out_dir=out"]

    def rerun():  # the same command, from the copied scripts
        proc = subprocess.run([sys.executable, "study_grokking.py", *args], cwd=code_copy, capture_output=True,
                              text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg"))
        assert proc.returncode == 0, proc.stderr
        with open(code_copy / "out" / "results.json") as f:
            return proc.stdout, json.load(f)["runs"][0]

    _, first = rerun()
    out, again = rerun()
    assert "reusing 1 finished run(s)" in out and again["wall_s"] == first["wall_s"]
    with open(code_copy / "model_tiny.py", "a") as f:
        f.write("\n# an edit\n")
    out, edited = rerun()
    assert "retraining 1 (code changed)" in out
    assert edited["source_hash"] != first["source_hash"] and edited["settings"] == first["settings"]


def child_pids(pid):
    """Every descendant of pid with its command line (from /proc)."""
    procs = {}
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                procs[int(d)] = (ppid, f.read().replace(b"\0", b" ").decode())
        except (OSError, ValueError, IndexError):
            continue
    out, front = {}, [pid]
    while front:
        parent = front.pop()
        for k, (ppid, cmd) in procs.items():
            if ppid == parent and k not in out:
                out[k] = cmd
                front.append(k)
    return out


def test_a_dead_worker_is_an_error_naming_the_run_not_a_hang(tmp_path, code_copy):
    """--jobs=2, one training process SIGKILLed (as the OOM killer does): the study stops the other run
    and exits with one line naming the dead run; a study still running 90 s later is a hang."""
    proc = subprocess.Popen([sys.executable, str(code_copy / "study_grokking.py"), "--jobs=2", *TINY,
                             "--optimizers=adamw,muon", "--max_steps=1000000", "--give_up_at=0", "--out_dir=out"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg"))
    try:
        deadline, workers = time.time() + 120, {}
        while time.time() < deadline and len(workers) < 2:
            time.sleep(0.5)
            workers = {k: cmd for k, cmd in child_pids(proc.pid).items() if "train_grokking.py" in cmd}
        assert len(workers) == 2, child_pids(proc.pid)
        victim = next(k for k, cmd in workers.items() if "--optimizers=adamw" in cmd)
        time.sleep(3)  # both are training
        os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        out = "hang: still running 90 s after a worker died"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    last = out.strip().splitlines()[-1]
    assert proc.returncode not in (None, 0) and last.startswith("error: run add_adamw_lr0.003_seed0: "), out
    assert "died from signal SIGKILL" in last, out
    assert not any("train_grokking.py" in cmd for cmd in child_pids(proc.pid).values())


def test_ctrl_c_stops_every_run_with_its_checkpoint(tmp_path, code_copy):
    """SIGINT to the study (--jobs=2): each running train_grokking.py gets SIGINT and saves its
    checkpoint, results.json is written and marked interrupted (no run finished), exit code 130."""
    start = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "  # as in a shell
             "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    tiny_args = [a for a in TINY if not a.startswith("--save_checkpoint=")]
    proc = subprocess.Popen([sys.executable, "-c", start, str(code_copy / "study_grokking.py"), "--jobs=2",
                             *tiny_args, "--max_steps=1000000", "--give_up_at=0", "--out_dir=out"], cwd=code_copy,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg"))
    logs = [code_copy / "out" / "runs" / name / "train.log" for name in ("add_adamw_lr0.003_seed0",
                                                                          "add_muon_lr0.1_seed0")]
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not all(p.exists() and "%|" in p.read_text() for p in logs):
            time.sleep(0.5)  # until both runs show their progress bars: training
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, out
    with open(code_copy / "out" / "results.json") as f:
        saved = json.load(f)
    assert saved["interrupted"] and saved["runs"] == []
    for name in ("add_adamw_lr0.003_seed0", "add_muon_lr0.1_seed0"):
        assert (code_copy / "out" / "runs" / name / "ckpt" / f"{name}.pt").exists()
    assert not any("train_grokking.py" in cmd for cmd in child_pids(proc.pid).values())
