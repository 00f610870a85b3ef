"""study_lm.py: the star grids, the per-seed ratio and its statistics, and tiny studies on shards the test
writes, each run a real train_muon.py process: only finished runs of the identity the study asked for count
(a stopped run, a run of other code or other data never becomes a score), a diverging configuration is
recorded as failed, every setting is checked before the first run, and --compare keeps every run."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import study_lm as S  # noqa: E402

TINY = ("--vocab_top=256 --n_layer=1 --n_embd=32 --n_head=2 --block_size=32 --batch_size=4 --grad_accum_steps=1 "
        "--warmup_steps=1 --momentum_muon_warmup=2 --eval_every=6 --eval_tokens=512")
CODE = ("study_lm.py", "train_muon.py", "model_keller.py", "muon_optim.py")


def test_star_grid_one_axis_at_a_time_with_tied_settings():
    axes = S.parse_grid("lr_muon=0.0125,0.025,0.05;normuon=0,0.95;weight_decay_muon+cautious_wd=0+False,0.1+True",
                        "grid_muon")
    configs = S.star_configs(axes)
    center = {"lr_muon": "0.0125", "normuon": "0", "weight_decay_muon": "0", "cautious_wd": "False"}
    assert len(configs) == 1 + 2 + 1 + 1 and configs[0] == center
    assert dict(center, weight_decay_muon="0.1", cautious_wd="True") in configs  # tied axis moves both settings
    assert all(sum(c[k] != center[k] for k in center) in (1, 2) for c in configs[1:])
    assert S.at_edge(dict(center, lr_muon="0.05"), axes) == ["lr_muon", "normuon"]  # 0 is normuon's lowest
    assert S.at_edge(dict(center, lr_muon="0.025", normuon="0.95"), axes) == ["normuon"]
    assert S.at_edge(dict(center, lr_muon="0.025", normuon="0.95"), axes[:1]) == []
    for text, match in [("lr_muon", "is not name=v1"), ("lr_muon=0.1,0.1", "distinct"),
                        ("a+b=1+2,3", "one part per name"), ("lr_muon=1,2;lr_muon=3,4", "appears twice")]:
        with pytest.raises(ValueError, match=match):
            S.parse_grid(text, "grid_muon")


def curve(losses, every=10, seconds_per_step=1.0):
    return [dict(step=i * every, loss=x, time=i * every * seconds_per_step) for i, x in enumerate(losses)]


def test_ratio_per_seed_interpolates_and_censors():
    assert S.interpolated_step(curve([5.0, 4.0, 3.0]), 3.5) == pytest.approx(15.0)
    assert S.interpolated_step(curve([5.0, 4.0]), 3.0) is None
    adamw = [dict(seed=s, val=curve([6.0, 5.0, 4.0]), final_val=4.0, status="finished") for s in (0, 1, 2)]
    muon = [dict(seed=0, val=curve([6.0, 4.0, 3.5], seconds_per_step=1.5), final_val=3.5, status="finished"),  # 0.5
            dict(seed=1, val=curve([6.0, 5.0, 4.0]), final_val=4.0, status="finished"),  # at step 20: ratio 1.0
            dict(seed=2, val=curve([6.0, 5.0, 4.5]), final_val=4.5, status="finished")]  # never: censored at 1.0
    out = S.compare_horizon(muon, adamw, 20, n_boot=2000)
    assert [r["ratio"] for r in out["per_seed"]] == [0.5, 1.0, 1.0]
    assert [r["censored"] for r in out["per_seed"]] == [False, False, True]
    assert [r["time_ratio"] for r in out["per_seed"]] == [0.75, 1.0, None]  # 10 steps of 1.5 s vs AdamW's 20 s
    assert out["mean_time_ratio"] == pytest.approx(0.875)
    assert [r["stays_ratio"] for r in out["per_seed"]] == [0.5, 1.0, 1.0]
    dip = dict(seed=0, val=curve([6.0, 4.0, 4.5, 3.8, 3.7]), final_val=3.7, status="finished")  # at 10, not for good
    (r,) = S.compare_horizon([dip], adamw[:1], 40, n_boot=100)["per_seed"]
    assert r["ratio"] == 0.25 and r["stays_ratio"] == 0.75
    assert out["mean_ratio"] == pytest.approx(2.5 / 3) and 0.5 <= out["ratio_ci"][0] <= out["ratio_ci"][1] <= 1.0
    same = S.compare_horizon(muon[:1] * 3, adamw, 20, n_boot=100)
    assert same["ratio_test"] is None  # no spread: the t-test is undefined, not p=0
    muon[2] = dict(muon[2], status="diverged", final_val=None)  # the worst outcome for its side: never reaches
    adamw[1] = dict(adamw[1], status="diverged", final_val=None)  # Muon reaches a diverged AdamW at once
    out = S.compare_horizon(muon, adamw, 20, n_boot=100)
    assert [(r["ratio"], r["censored"], r["diverged"]) for r in out["per_seed"]] == [
        (0.5, False, []), (0.0, False, ["adamw"]), (1.0, True, ["muon"])]
    assert out["mean_loss_gap"] == pytest.approx(-0.5)  # only the seed where both finished


def test_compare_groups_runs_that_differ_only_in_the_seed():
    def run(seed, split, loss, out_dir):
        identity = dict(seed=seed, muon_split=split, out_dir=out_dir, source_hash="c", data_hash="d")
        return dict(identity=identity, val=[dict(step=0, loss=9.0), dict(step=10, loss=loss)])
    runs = {"a:muon": run(0, "none", 3.0, "a"), "b:muon": run(1, "none", 3.2, "b"), "c:muon": run(0, "qkv", 2.9, "c"),
            "d:muon": run(1, "qkv", 2.9, "d"), "e:muon": run(2, "qkv", 3.2, "e")}
    none, qkv = S.seed_groups(runs)
    assert none["runs"] == ["a:muon", "b:muon"] and none["differs"] == [] and none["seeds"] == [0, 1]
    assert none["final_val_mean"] == pytest.approx(3.1) and none["final_val_sd"] == pytest.approx(0.02 ** 0.5)
    assert qkv["differs"] == ["muon_split: 'none' -> 'qkv'"] and qkv["final_val_mean"] == pytest.approx(3.0)


def write_shards(d, seed, n_train=2, tokens=20000, vocab=300):
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in ["fineweb_val_000000.bin"] + [f"fineweb_train_{k:06d}.bin" for k in range(1, n_train + 1)]:
        header = np.zeros(256, dtype=np.int32)
        header[:3] = 20240520, 1, tokens
        # a learnable stream: runs of one token, so the loss falls within a few steps
        toks = np.repeat(rng.integers(0, vocab, tokens // 4), 4).astype(np.uint16)
        with open(os.path.join(d, name), "wb") as f:
            f.write(header.tobytes())
            f.write(toks.tobytes())


def study_args(tmp_path, script="study_lm.py", **over):
    """A tiny study: 2 configurations per optimizer on one tune seed, 1 report seed, 6 steps, 1 run at a time."""
    settings = dict(tune_data=tmp_path / "tune", report_data=tmp_path / "report", tune_steps=6, horizons=6, seeds=0,
                    tune_seeds=100, grid_adamw="lr_adamw=2e-3,8e-3", grid_muon="lr_muon=0.02,0.05", jobs=1,
                    device="cpu", out_dir=tmp_path / "out", model=TINY)
    settings.update(over)
    return [sys.executable, script] + [f"--{k}={v}" for k, v in settings.items()]


def run(args, cwd=ROOT, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def stamps(out):
    runs = out / "runs"
    return {d: os.path.getmtime(runs / d / "metrics.json") for d in sorted(os.listdir(runs))}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One tiny study whose AdamW grid holds a configuration that diverges (lr 1e30): 6 runs."""
    tmp_path = tmp_path_factory.mktemp("study")
    write_shards(tmp_path / "tune", 0)
    write_shards(tmp_path / "report", 1)
    args = study_args(tmp_path, grid_adamw="lr_adamw=2e-3,1e30", jobs=2)
    proc = run(args)
    return tmp_path, args, proc


@pytest.mark.xdist_group("tiny_study")  # one worker runs the module fixture they share, once
def test_a_diverging_configuration_is_recorded_as_failed_and_the_study_goes_on(study):
    tmp_path, args, proc = study
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "out" / "results.json") as f:
        out = json.load(f)
    scores = {s["values"]["lr_adamw"]: s for s in out["tuning"]["adamw"]["scores"]}
    assert scores["1e30"]["status"] == "diverged" and scores["1e30"]["final_val"] is None
    assert scores["2e-3"]["status"] == "finished" and out["winners"]["adamw"] == {"lr_adamw": "2e-3"}
    assert len(out["tuning"]["muon"]["scores"]) == 2
    tune_runs = [r for r in out["runs"] if r["phase"] == "tune"]
    report_runs = [r for r in out["runs"] if r["phase"] == "report"]
    assert {r["data"] for r in tune_runs} == {str(tmp_path / "tune")} and {r["seed"] for r in tune_runs} == {100}
    assert {r["data"] for r in report_runs} == {str(tmp_path / "report")} and {r["seed"] for r in report_runs} == {0}
    (h,) = out["horizons"]
    assert h["horizon"] == 6 and len(h["per_seed"]) == 1 and 0 < h["mean_ratio"] <= 1
    with open(tmp_path / "out" / "study.md") as f:
        table = f.read()
    assert "lr_adamw=1e30 | diverged |" in table  # shown, ranked last
    assert table.index("lr_adamw=2e-3") < table.index("lr_adamw=1e30")
    assert os.path.exists(tmp_path / "out" / "study.png")


@pytest.mark.xdist_group("tiny_study")  # one worker runs the module fixture they share, once
def test_rerun_reuses_only_runs_of_an_equal_identity(study):
    """A rerun reuses every run; after the report shards are rewritten under the same paths, the report runs
    retrain (the tune runs, on unchanged data, are still reused)."""
    tmp_path, args, proc = study
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = stamps(tmp_path / "out")
    assert len(before) == 6
    again = run(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert stamps(tmp_path / "out") == before  # nothing retrained
    shutil.rmtree(tmp_path / "report")
    write_shards(tmp_path / "report", 2)  # same names and sizes, other tokens
    third = run(args)
    assert third.returncode == 0, third.stderr[-3000:]
    after = stamps(tmp_path / "out")
    assert {d for d in after if after[d] != before[d]} == {d for d in after if d.startswith("report_")}


def study_config(tmp_path, **over):
    """study_args as a settings dict, for calling study_lm.main in this process."""
    cfg = dict(S.CONFIG, **{a[2:].split("=", 1)[0]: a.split("=", 1)[1] for a in study_args(tmp_path)[2:]})
    cfg.update(tune_steps=6, jobs=1)
    cfg.update(over)
    return cfg


def no_trainer(*args, **kwargs):
    raise AssertionError(f"a run started before every setting was checked: {args[0]}")


def test_bad_values_stop_before_any_run(tmp_path, monkeypatch):
    write_shards(tmp_path / "tune", 0)
    write_shards(tmp_path / "report", 1)
    monkeypatch.setattr(S.subprocess, "run", no_trainer)  # how the study would start a train_muon.py process
    monkeypatch.setattr(S.subprocess, "Popen", no_trainer)
    for over, msg in [(dict(jobs=0), "--jobs=0"), (dict(seeds="a"), "--seeds=a"), (dict(tune_seeds=""), "--tune_seeds"),
                      (dict(horizons="0"), "--horizons=0"), (dict(seeds="0,0"), "--seeds=0,0"),
                      (dict(tune_steps=0), "--tune_steps=0"), (dict(n_boot=0), "--n_boot=0"),
                      (dict(device="gpu"), "--device=gpu"), (dict(seeds="100"), "overlap --seeds"),
                      (dict(report_data=str(tmp_path / "tune")), "report on text the tuning"),
                      (dict(tune_data=str(tmp_path / "none")), "no data dir"),
                      (dict(grid_muon="lr_muon=0.02,0.05,0.1"), "unequal tuning budgets: adamw 2, muon 3"),
                      (dict(grid_muon="lr_muon=0.02"), "2 or more values"),
                      (dict(grid_muon="lr_muonn=0.02,0.05"), "lr_muonn"),  # misspelled: found after the AdamW runs
                      (dict(grid_muon="lr_muon=0.02,fast"), "lr_muon=fast"),
                      (dict(model=TINY + " --n_layers=2"), "n_layers"), (dict(model=TINY + " n_layer=2"), "n_layer=2")]:
        with pytest.raises((ValueError, RuntimeError, SystemExit), match=msg.replace("+", "\\+")):
            S.main(study_config(tmp_path, **over))
    monkeypatch.undo()
    help_ = run([sys.executable, "study_lm.py", "--help"])
    assert help_.returncode == 0 and "--grid_muon=" in help_.stdout and "--compare=" in help_.stdout
    proc = run(study_args(tmp_path, jobs=0, seeds="a"))
    assert proc.returncode != 0 and "--jobs=0" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_model_flags_may_not_set_the_studys_per_run_settings(tmp_path, monkeypatch):
    write_shards(tmp_path / "tune", 0)
    write_shards(tmp_path / "report", 1)
    monkeypatch.setattr(S.subprocess, "run", no_trainer)
    monkeypatch.setattr(S.subprocess, "Popen", no_trainer)
    model = TINY + f" --seed=1337 --max_steps=5 --data_dir={tmp_path / 'report'} --lr_muon=0.1"
    with pytest.raises((ValueError, RuntimeError, SystemExit)) as e:
        S.main(study_config(tmp_path, model=model))
    assert all(f"--{k}" in str(e.value) for k in ("seed", "max_steps", "data_dir", "lr_muon")), str(e.value)


def child_pids(text):
    """Process ids of the train_muon.py processes whose command line contains `text`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if "train_muon.py" in cmd and text in cmd:
            pids.append(int(pid))
    return pids


def first_metrics(out, timeout=120):
    """The run dir of the first run that wrote a metrics.json (its step-0 eval), polled."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        for d in sorted(os.listdir(out / "runs")) if os.path.isdir(out / "runs") else []:
            if os.path.exists(out / "runs" / d / "metrics.json"):
                return out / "runs" / d
        time.sleep(0.02)
    raise AssertionError("no run wrote metrics.json")


def wait_or_kill(proc, timeout):
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError("the study did not stop:\n" + stderr[-2000:]) from None
    return stdout, stderr


def test_a_run_stopped_by_a_signal_is_not_a_score(tmp_path):
    """SIGTERM to a tuning run (e.g. a job system or the OOM handler): the trainer stops at the step boundary;
    the study must not score its partial curve (the step-0 loss), nor start more runs."""
    write_shards(tmp_path / "tune", 0)
    write_shards(tmp_path / "report", 1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(study_args(tmp_path, tune_steps=100000), cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    run_dir = first_metrics(tmp_path / "out")
    (pid,) = child_pids(f"--out_dir={run_dir}")
    os.kill(pid, signal.SIGTERM)
    stdout, stderr = wait_or_kill(proc, 60)
    assert proc.returncode != 0 and "Traceback" not in stderr, stderr
    assert run_dir.name in stderr and "stopped" in stderr, stderr
    assert not os.path.exists(tmp_path / "out" / "results.json")
    assert len(os.listdir(tmp_path / "out" / "runs")) == 1  # no run started after it


def test_a_file_edited_during_the_study_is_refused(tmp_path):
    """The study hashes the trainer's code at start; a run that executed other code (model_keller.py is edited
    once the study has started) is an error naming the run, never a score mixed into the study."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for f in CODE:
        shutil.copy(os.path.join(ROOT, f), repo / f)
    write_shards(tmp_path / "tune", 0)
    write_shards(tmp_path / "report", 1)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(study_args(tmp_path, script=str(repo / "study_lm.py")), cwd=repo, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    assert proc.stdout.readline().startswith("tuning:")  # printed once the study took its code hash
    with open(repo / "model_keller.py", "a") as f:
        f.write("# edited while the study runs\n")
    stdout, stderr = wait_or_kill(proc, 120)
    assert proc.returncode != 0 and "Traceback" not in stderr, stderr
    assert "run tune_adamw_" in stderr and "changed during the study" in stderr, stderr
    assert not os.path.exists(tmp_path / "out" / "results.json")


@pytest.mark.xdist_group("tiny_study")  # one worker runs the module fixture they share, once
def test_compare_keeps_every_run_and_refuses_other_data(study):
    """--compare identifies runs by identity: the two tuning dirs both hold a run labeled `muon` and both are
    shown, labeled by dir; a run on the report data next to one on the tune data is refused."""
    tmp_path, args, proc = study
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = tmp_path / "out" / "runs"
    muon = sorted(str(runs / d) for d in os.listdir(runs) if d.startswith("tune_muon"))
    adamw = [str(runs / d) for d in os.listdir(runs) if d.startswith("tune_adamw_lr_adamw2e-3")]
    assert len(muon) == 2 and len(adamw) == 1
    out = tmp_path / "cmp"
    proc = run([sys.executable, "study_lm.py", f"--compare={','.join(muon + adamw)}", f"--out_dir={out}"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "compare.json") as f:
        cmp = json.load(f)
    assert sorted(cmp["runs"]) == sorted(f"{d}:{lab}" for d, lab in zip(muon + adamw, ["muon", "muon", "adamw"]))
    assert all(f"{d}:muon" in proc.stdout for d in muon)
    assert cmp["summary"]["muon_vs_adamw"]["adamw_run"] == f"{adamw[0]}:adamw"
    report = [str(runs / d) for d in os.listdir(runs) if d.startswith("report_muon")]
    proc = run([sys.executable, "study_lm.py", f"--compare={muon[0]},{report[0]}", f"--out_dir={out}"], timeout=120)
    assert proc.returncode != 0 and "other data" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    stopped = tmp_path / "stopped"
    shutil.copytree(muon[1], stopped)
    with open(stopped / "metrics.json") as f:
        m = json.load(f)
    m["runs"]["muon"]["status"] = "stopped"
    with open(stopped / "metrics.json", "w") as f:
        json.dump(m, f)
    for dirs, msg in [(f"{muon[0]},{stopped}", "'stopped', not finished"), (f"{muon[0]},{tmp_path / 'none'}", "no "),
                      (f"{muon[0]},{muon[0]}", "list each out_dir once")]:
        proc = run([sys.executable, "study_lm.py", f"--compare={dirs}", f"--out_dir={out}"])
        assert proc.returncode != 0 and msg in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_grid_value_the_trainer_refuses_stops_the_study_before_any_run(tmp_path):
    """Names and types are checked by the study; ranges and choices (ns_method, normuon) only the trainer
    knows: each configuration is checked with train_muon.py --dry_run=True before the first run trains."""
    write_shards(tmp_path / "tune", 0)
    write_shards(tmp_path / "report", 1)
    cfg = study_config(tmp_path, grid_adamw="lr_adamw=1e-3,2e-3", grid_muon="ns_method=newton_schulz,polar_expres")
    with pytest.raises(ValueError, match="--grid_muon configuration .*--ns_method=polar_expres: use one of"):
        S.main(cfg)
    assert not (tmp_path / "out" / "runs").exists() or not any((tmp_path / "out" / "runs").iterdir())
