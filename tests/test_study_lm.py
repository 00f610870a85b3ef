"""study_lm.py: the star grids, the per-seed ratio and its statistics, and one tiny end-to-end study
on shards the test writes (tuning on one data dir, reporting on another, reuse on rerun)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import study_lm as S  # noqa: E402


def test_star_grid_one_axis_at_a_time_with_tied_settings():
    axes = S.parse_star_grid("lr_muon=0.0125,0.025,0.05;normuon=0,0.95;weight_decay_muon+cautious_wd=0+False,0.1+True",
                             "muon")
    configs = S.star_configs(axes)
    center = {"lr_muon": "0.0125", "normuon": "0", "weight_decay_muon": "0", "cautious_wd": "False"}
    assert len(configs) == 1 + 2 + 1 + 1 and configs[0] == center
    assert dict(center, weight_decay_muon="0.1", cautious_wd="True") in configs  # tied axis moves both settings
    assert all(sum(c[k] != center[k] for k in center) in (1, 2) for c in configs[1:])
    assert S.at_edge(dict(center, lr_muon="0.05"), axes) == ["lr_muon", "normuon"]  # 0 is normuon's lowest
    assert S.at_edge(dict(center, lr_muon="0.025", normuon="0.95"), axes) == ["normuon"]
    assert S.at_edge(dict(center, lr_muon="0.025", normuon="0.95"), axes[:1]) == []
    for text, match in [("lr_muon", "is not name=center"), ("lr_muon=0.1", "2\\+ distinct values"),
                        ("lr_muon=0.1,0.1", "2\\+ distinct"), ("a+b=1+2,3", "one part per name")]:
        with pytest.raises(ValueError, match=match):
            S.parse_star_grid(text, "muon")


def curve(losses, every=10):
    return [dict(step=i * every, loss=x) for i, x in enumerate(losses)]


def test_ratio_per_seed_interpolates_and_censors():
    assert S.interpolated_step(curve([5.0, 4.0, 3.0]), 3.5) == pytest.approx(15.0)
    assert S.interpolated_step(curve([5.0, 4.0]), 3.0) is None
    adamw = [dict(seed=s, val=curve([6.0, 5.0, 4.0]), final_val=4.0) for s in (0, 1, 2)]
    muon = [dict(seed=0, val=curve([6.0, 4.0, 3.5]), final_val=3.5),  # reaches 4.0 at step 10: ratio 0.5
            dict(seed=1, val=curve([6.0, 5.0, 4.0]), final_val=4.0),  # at step 20: ratio 1.0
            dict(seed=2, val=curve([6.0, 5.0, 4.5]), final_val=4.5)]  # never: censored at 1.0
    out = S.compare_horizon(muon, adamw, 20, n_boot=2000)
    assert [r["ratio"] for r in out["per_seed"]] == [0.5, 1.0, 1.0]
    assert [r["censored"] for r in out["per_seed"]] == [False, False, True]
    assert out["mean_ratio"] == pytest.approx(2.5 / 3) and 0.5 <= out["ratio_ci"][0] <= out["ratio_ci"][1] <= 1.0
    same = S.compare_horizon(muon[:1] * 3, adamw, 20, n_boot=100)
    assert same["ratio_test"] is None  # no spread: the t-test is undefined, not p=0


def write_shards(d, seed, n_train=2, tokens=20000, vocab=300):
    os.makedirs(d)
    rng = np.random.default_rng(seed)
    for name in ["fineweb_val_000000.bin"] + [f"fineweb_train_{k:06d}.bin" for k in range(1, n_train + 1)]:
        header = np.zeros(256, dtype=np.int32)
        header[:3] = 20240520, 1, tokens
        # a learnable stream: runs of one token, so the loss falls within a few steps
        toks = np.repeat(rng.integers(0, vocab, tokens // 4), 4).astype(np.uint16)
        with open(os.path.join(d, name), "wb") as f:
            f.write(header.tobytes())
            f.write(toks.tobytes())


def test_tiny_study_end_to_end_and_rerun_reuses(tmp_path):
    tune, report = str(tmp_path / "tune"), str(tmp_path / "report")
    write_shards(tune, 0)
    write_shards(report, 1)
    args = [sys.executable, "study_lm.py", f"--tune_data={tune}", f"--report_data={report}", "--tune_steps=6",
            "--horizons=6", "--seeds=0,1", "--tune_seeds=100", "--grid_adamw=lr_adamw=2e-3,8e-3",
            "--grid_muon=lr_muon=0.02,0.05", "--jobs=2", "--device=cpu", f"--out_dir={tmp_path / 'out'}",
            "--model=--vocab_top=256 --n_layer=1 --n_embd=32 --n_head=2 --block_size=32 --batch_size=4 "
            "--grad_accum_steps=1 --warmup_steps=1 --momentum_muon_warmup=2 --eval_every=3 --eval_tokens=512"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(tmp_path / "out" / "results.json") as f:
        out = json.load(f)
    assert set(out["winners"]) == {"adamw", "muon"} and len(out["tuning"]["muon"]["scores"]) == 2
    tune_runs = [r for r in out["runs"] if r["phase"] == "tune"]
    report_runs = [r for r in out["runs"] if r["phase"] == "report"]
    assert {r["data"] for r in tune_runs} == {tune} and {r["seed"] for r in tune_runs} == {100}
    assert {r["data"] for r in report_runs} == {report} and {r["seed"] for r in report_runs} == {0, 1}
    (h,) = out["horizons"]
    assert h["horizon"] == 6 and len(h["per_seed"]) == 2 and 0 < h["mean_ratio"] <= 1
    assert os.path.exists(tmp_path / "out" / "study.md") and os.path.exists(tmp_path / "out" / "study.png")
    runs = tmp_path / "out" / "runs"
    stamps = {d: os.path.getmtime(runs / d / "metrics.json") for d in os.listdir(runs)}
    assert len(stamps) == 8
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and json.load(open(tmp_path / "out" / "results.json"))["horizons"] == out["horizons"]
    assert {d: os.path.getmtime(runs / d / "metrics.json") for d in os.listdir(runs)} == stamps  # nothing retrained
    for bad, msg in [(["--seeds=100"], "overlap --seeds"), ([f"--report_data={tune}"], "report on text the tuning"),
                     (["--grid_muon=lr_muon=0.02,0.05,0.1"], "unequal tuning budgets: adamw 2, muon 3"),
                     ([f"--tune_data={tmp_path / 'none'}"], "no data dir")]:
        proc = subprocess.run(args + bad, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and msg in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
