"""bench.py as a user runs it: --help lists the settings, and the settings reach the worker processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_bench(args, cwd, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "bench.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_help_lists_every_setting(tmp_path):
    proc = run_bench(["--help"], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for setting in ("--only=speed,quality,step,showdown", "--out_dir=out/bench", "--seed=42", "--quick=False"):
        assert setting in proc.stdout, proc.stdout
    assert not (tmp_path / "out").exists()  # --help writes nothing


def test_distributed_workers_get_the_command_line_settings(tmp_path):
    """The worker processes (torch.multiprocessing spawn) import bench.py again; they must run
    with --out_dir and --seed from the command line, not with the defaults."""
    out = tmp_path / "elsewhere"
    proc = run_bench(["--only=distributed", "--quick=True", f"--out_dir={out}", "--seed=7"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "out").exists(), "a worker used the default out_dir"
    res = json.loads((out / "results.json").read_text())["distributed"]
    assert res["worker_seeds"] and set(res["worker_seeds"]) == {7}


def test_one_plain_update_runs_few_functions_and_lines(tmp_path):
    """The reading goals of muon_optim.py, traced by bench.py --only=trace (sys.settrace during one
    plain opt.step(): one process, one 2D tensor, default options): <= 8 functions, <= 150 lines of
    their definitions, <= 60 distinct executed lines; class Muon before line 400; <= 1,150 lines."""
    proc = run_bench(["--only=trace", f"--out_dir={tmp_path}"], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())["trace"]
    names = [f["name"] for f in res["functions"]]
    assert {"step", "momentum_direction", "zeropower_via_newtonschulz5", "apply_update"} <= set(names), names
    assert res["n_functions"] <= 8, names
    assert res["definition_lines"] <= 150
    assert res["executed_lines"] <= 60
    assert res["class_muon_line"] < 400
    assert res["file_lines"] <= 1150


def test_gpu_step_section_says_it_needs_a_gpu(tmp_path):
    """--only=gpu_step (eager vs captured step, matmul bound) runs only on CUDA; elsewhere one clear line."""
    import torch
    if torch.cuda.is_available():
        import pytest
        pytest.skip("a GPU is here: bench.py --only=gpu_step measures instead")
    proc = run_bench(["--only=gpu_step", f"--out_dir={tmp_path}"], tmp_path, timeout=300)
    assert proc.returncode != 0 and "--only=gpu_step needs a CUDA GPU" in proc.stderr, proc.stderr[-2000:]
