"""Tests for study_ngpt.py: the nGPT sweeps, each run one `python train_ngpt.py` process, reused only on an
equal run identity. Tiny models on shards written here, one thread."""
import ast
import glob
import json
import os
import shutil
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import study_ngpt  # noqa: E402

CHECKOUT_TRAINER = study_ngpt.TRAINER  # the tests run a snapshot of it (see `trainer`)


def write_shard(path, tokens):
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (20240520, 1, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def write_toy_shards(data_dir, seed):
    """A learnable toy language: a few repeated 'sentences' of GPT-2-range token ids."""
    rng = np.random.default_rng(seed)
    sentences = [rng.integers(0, 50257, size=rng.integers(5, 12)) for _ in range(8)]
    stream = np.concatenate([sentences[i] for i in rng.integers(0, 8, size=3000)])
    write_shard(os.path.join(data_dir, "toy_val_000000.bin"), stream[:2000])
    write_shard(os.path.join(data_dir, "toy_train_000001.bin"), stream[2000:])


@pytest.fixture
def shards(tmp_path):
    write_toy_shards(str(tmp_path), seed=0)
    return str(tmp_path)


def tiny(data_dir, **overrides):
    """train_ngpt.py flags of a tiny run, as a study passes them."""
    flags = dict(data_dir=data_dir, train_files="toy_train_*.bin", val_files="toy_val_*.bin", vocab_top=64,
                 n_layer=1, n_embd=16, n_head=2, block_size=8, batch_size=2, grad_accum_steps=1, max_steps=2,
                 eval_every=2, eval_tokens=64, ckpt_every=0, lr_muon=0.02, device="cpu", threads=1, compile=False)
    return [f"--{k}={v}" for k, v in dict(flags, **overrides).items()]


@pytest.fixture(autouse=True)
def trainer(tmp_path, monkeypatch):
    """The study runs a snapshot of train_ngpt.py and muon_optim.py, so an edit of the checkout while the
    tests run (which the study rightly reports as code changed during the study) cannot reach them."""
    code = tmp_path / "code"
    code.mkdir()
    for name in ("train_ngpt.py", "muon_optim.py"):
        shutil.copy(os.path.join(ROOT, name), code / name)
    monkeypatch.setattr(study_ngpt, "TRAINER", str(code / "train_ngpt.py"))
    return code


@pytest.fixture
def launches(monkeypatch):
    """The out_dir of every train_ngpt.py process the study starts (the real process still runs)."""
    started, real = [], study_ngpt.launch
    monkeypatch.setattr(study_ngpt, "launch", lambda args: started.append(
        next(a for a in args if a.startswith("--out_dir="))) or real(args))
    return started


def study(out, sweep, flags, **settings):
    argv = [f"--out_dir={out}", f"--sweep={sweep}"] + [f"--{k}={v}" for k, v in settings.items()] + flags
    return study_ngpt.main(argv)


def test_the_study_runs_the_trainer_and_never_imports_it():
    with open(os.path.join(ROOT, "study_ngpt.py")) as f:
        tree = ast.parse(f.read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [ast.alias(n.module)])}
    assert imported <= {"glob", "hashlib", "json", "math", "os", "subprocess", "sys", "matplotlib"}, imported
    assert CHECKOUT_TRAINER == os.path.join(ROOT, "train_ngpt.py")


def test_sweep_runs_cover_each_optimizer():
    cfg = dict(study_ngpt.CONFIG)
    assert len(study_ngpt.sweep_runs(dict(cfg, sweep="lr"), [])) == 6 + 6
    assert len(study_ngpt.sweep_runs(dict(cfg, sweep="proj_every"), [])) == 7 + 7
    assert len(study_ngpt.sweep_runs(dict(cfg, sweep="update"), [])) == 3 + 3
    toggles = study_ngpt.sweep_runs(dict(cfg, sweep="toggles"), ["--weight_decay_muon=0.3"])
    assert [label for _, label, _, _ in toggles] == ["muon NS5 (baseline)", "muon polar_express", "muon normuon",
                                                     "muon wd=0.3", "muon cautious wd=0.3"]
    assert toggles[4][3] == dict(optimizer="muon", ns_method="newton_schulz", normuon=0.0, weight_decay_muon=0.3,
                                 cautious_wd=True)


def test_sweep_writes_results_plot_and_best_and_shares_runs_between_sweeps(shards, tmp_path, launches):
    out = tmp_path / "out"
    study(out, "lr", tiny(shards), sweep_optimizers="muon", sweep_lrs_muon="0.02")
    assert launches == [f"--out_dir={out}/sweep_lr/muon_lr0.02"]
    results, best = study(out, "update", tiny(shards), sweep_optimizers="muon")
    # lr_muon=0.02 with project every step is the lr sweep's run: reused from its folder
    assert launches[1:] == [f"--out_dir={out}/sweep_update/muon_geodesic",
                            f"--out_dir={out}/sweep_update/muon_geodesic_scaled"]
    assert [r["label"] for r in results] == ["muon project", "muon geodesic", "muon geodesic_scaled"]
    assert results[0]["out_dir"] == f"{out}/sweep_lr/muon_lr0.02"
    assert all(np.isfinite(r["final_val_loss"]) and r["val"][-1]["step"] == 2 for r in results)
    assert best["muon"]["final_val_loss"] == min(r["final_val_loss"] for r in results)
    with open(out / "sweep_update" / "results.json") as f:
        saved = json.load(f)
    assert saved["best"]["muon"]["label"] == best["muon"]["label"]
    assert [r["final_val_loss"] for r in saved["runs"]] == [r["final_val_loss"] for r in results]
    assert os.path.exists(out / "sweep_update" / "sweep_update.png")
    results, _ = study(out, "proj_every", tiny(shards), sweep_optimizers="muon", sweep_proj_every="1")
    assert len(launches) == 3 and results[0]["out_dir"] == f"{out}/sweep_lr/muon_lr0.02"  # only reused runs:
    assert os.path.exists(out / "sweep_proj_every" / "results.json")  # the sweep's own folder is made anyway
    for run_dir in ("sweep_update/muon_geodesic", "sweep_lr/muon_lr0.02"):
        with open(out / run_dir / "metrics.json") as f:
            m = json.load(f)
        assert m["finished"] and m["config"]["save_checkpoint"] is False
        assert not os.path.exists(out / run_dir / "ckpt.pt")


def test_a_finished_run_is_reused_only_with_an_equal_identity(shards, tmp_path, launches, trainer, monkeypatch):
    """Settings, code, shards and compute dtype: any change retrains; settings outside the identity do not."""
    out, flags = tmp_path / "out", tiny(shards)
    metrics = out / "sweep_lr" / "muon_lr0.02" / "metrics.json"

    def rerun(*extra):
        study(out, "lr", flags + list(extra), sweep_optimizers="muon", sweep_lrs_muon="0.02")
        return len(launches)

    def edit_metrics(change):
        m = json.loads(metrics.read_text())
        change(m)
        metrics.write_text(json.dumps(m))

    assert rerun() == 1
    assert rerun("--lr_adam=0.1", "--compile=True", "--ckpt_every=5", "--wandb_project=other") == 1  # outside it
    edit_metrics(lambda m: m.pop("finished"))  # what an interrupted run leaves
    assert rerun() == 2
    edit_metrics(lambda m: m["identity"].update(compute_dtype="torch.bfloat16"))  # a run from another machine
    assert rerun() == 3
    write_toy_shards(shards, seed=1)  # other tokens under the same file names
    assert rerun() == 4
    assert json.loads(metrics.read_text())["identity"]["data_hash"] == study_ngpt.data_fingerprint(
        [os.path.join(shards, "toy_train_000001.bin"), os.path.join(shards, "toy_val_000000.bin")])
    code = shutil.copytree(trainer, tmp_path / "elsewhere")
    monkeypatch.setattr(study_ngpt, "TRAINER", str(code / "train_ngpt.py"))
    assert rerun() == 4  # the same code elsewhere: the same source_hash
    with open(code / "train_ngpt.py", "a") as f:
        f.write("# an edit\n")
    assert rerun() == 5
    assert rerun("--eps_adam=1e-6") == 6  # any setting of the run, not a hand-picked list


def test_every_run_is_checked_before_the_first_is_trained(shards, tmp_path, monkeypatch):
    monkeypatch.setattr(study_ngpt, "launch", lambda args: pytest.fail("trained before checking every run"))
    out, flags = tmp_path / "out", tiny(shards)
    with pytest.raises(SystemExit, match=r"error: --proj_every=0: must be >= 1 \(sweep run 'muon proj_every=0'\)"):
        study(out, "proj_every", flags, sweep_optimizers="muon", sweep_proj_every="1,0")
    with pytest.raises(SystemExit, match=r"error: --eval_every=0: must be >= 1 \(sweep run 'muon project'\)"):
        study(out, "update", flags + ["--eval_every=0"], sweep_optimizers="muon")
    with pytest.raises(SystemExit, match=r"unknown setting --lr_muonn; known: .*\(sweep run 'muon project'\)"):
        study(out, "update", flags + ["--lr_muonn=0.1"], sweep_optimizers="muon")
    for sweep, settings, message in [
            ("lrs", {}, "error: --sweep=lrs: choose one of lr, proj_every, update, toggles"),
            ("lr", dict(sweep_optimizers="muon,sgd"), "error: --sweep_optimizers=muon,sgd: use muon and/or adam"),
            ("toggles", dict(sweep_optimizers="adam"), "error: --sweep=toggles --sweep_optimizers=adam: no runs"),
            ("lr", dict(sweep_lrs_adam="0.01,fast"), "error: --sweep_lrs_adam=0.01,fast: expected a comma list"),
            ("proj_every", dict(sweep_proj_every="1,1"), "error: --sweep_proj_every=1,1: expected a comma list of "
                                                         "distinct ints")]:
        with pytest.raises(SystemExit, match=message):
            study(out, sweep, flags, **settings)
    for flag in ("--resume=True", "--stop_after_steps=5", "--save_checkpoint=True", "--dry_run=True", "lr=1"):
        with pytest.raises(SystemExit, match="which the study sets for each run"):
            study(out, "update", flags + [flag])
    assert not os.path.exists(out)


def test_a_run_that_does_not_finish_or_is_not_the_planned_one_stops_the_study(tmp_path, monkeypatch):
    """Planned with a fixed identity (no trainer process): the launched run's metrics.json decides."""
    (tmp_path / "toy.bin").write_bytes(b"tokens")
    identity = dict(lr_muon=0.02, source_hash="0123456789abcdef", data_hash=None)
    monkeypatch.setattr(study_ngpt, "planned_identity", lambda args, label: (identity, [str(tmp_path / "toy.bin")]))
    run_dir = tmp_path / "out" / "sweep_update" / "muon_project"
    planned = dict(identity, data_hash=study_ngpt.data_fingerprint([str(tmp_path / "toy.bin")]))

    def fake_run(finished, recorded, code=0):
        def launch(args):
            run_dir.mkdir(parents=True, exist_ok=True)
            m = dict(identity=recorded, config=dict(out_dir=str(run_dir)), runs={"ngpt-muon": {}})
            (run_dir / "metrics.json").write_text(json.dumps(dict(m, finished=True) if finished else m))
            return code
        monkeypatch.setattr(study_ngpt, "launch", launch)

    fake_run(finished=False, recorded=planned, code=130)  # Ctrl-C or a job's time limit
    with pytest.raises(SystemExit, match=r"sweep run 'muon project' did not finish \(train_ngpt.py exit 130\)"):
        study(tmp_path / "out", "update", [], sweep_optimizers="muon")
    fake_run(finished=False, recorded=planned)
    with pytest.raises(SystemExit, match="did not finish"):
        study(tmp_path / "out", "update", [], sweep_optimizers="muon")
    fake_run(finished=True, recorded=dict(planned, source_hash="edited00code0000"))
    with pytest.raises(SystemExit, match="records another identity than planned .*source_hash: 'edited00code0000' -> "
                                         "'0123456789abcdef'.*changed during the study"):
        study(tmp_path / "out", "update", [], sweep_optimizers="muon")
    assert not glob.glob(str(tmp_path / "out" / "sweep_update" / "results.json"))


def test_help_lists_the_study_settings_and_points_at_the_trainer(capsys):
    with pytest.raises(SystemExit) as e:
        study_ngpt.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "train_ngpt.py --help" in out
    for name, value in study_ngpt.CONFIG.items():
        assert f"--{name}={value}" in out, name
