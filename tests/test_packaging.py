"""pyproject.toml installs the optimizer file alone: `pip install <checkout>` then `import muon_optim`."""
import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def copy_project(dst):
    """The files a `pip install` of the checkout reads (a copy, so the build leaves nothing in the checkout)."""
    dst.mkdir()
    for name in ("pyproject.toml", "muon_optim.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), dst / name)
    (dst / "train_muon.py").write_text("raise SystemExit('a script, never installed')\n")
    return dst


def test_wheel_holds_only_muon_optim(tmp_path):
    src = copy_project(tmp_path / "src")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("muon_optim-*.whl")
    modules = [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")]
    assert modules == ["muon_optim.py"], modules


def test_pip_install_target_then_import(tmp_path):
    src = copy_project(tmp_path / "src")
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                           "--target", str(target), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    code = ("import muon_optim, torch; p = torch.nn.Parameter(torch.randn(8, 4)); p.grad = torch.randn(8, 4); "
            "muon_optim.Muon([p], lr=0.02).step(); print(muon_optim.__file__)")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(target)))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().startswith(str(target)), run.stdout
    assert not (target / "train_muon.py").exists()
