"""
study_ngpt.py -- the nGPT sweeps of results/ngpt.md: every setting of one sweep trained by train_ngpt.py from
the same init (seed) on the same batches; then results.json, a plot and the best setting per optimizer.

    python study_ngpt.py --sweep=lr                   # lr_muon and lr_adam
    python study_ngpt.py --sweep=proj_every           # lazy projection every k steps
    python study_ngpt.py --sweep=update               # project vs geodesic vs geodesic_scaled
    python study_ngpt.py --sweep=toggles              # NS5 vs Polar Express, NorMuon, wd, cautious wd (Muon)
    python study_ngpt.py --sweep=lr --n_layer=4 --threads=1   # any train_ngpt.py --name=value goes to every run

Every run is one `python train_ngpt.py ...` process (the trainer is not imported), in
out_dir/sweep_NAME/<label> (spaces as _, '=' dropped). Its flags: the train_ngpt.py flags given here, then
the sweep's settings, then --out_dir, --resume=False, --save_checkpoint=False, --stop_after_steps=0 and
--wandb_run_name='<wandb_run_name or ngpt> sweep_NAME <label>'.
Before the first run, `train_ngpt.py --dry_run=True` checks each run's flags and prints its run identity
(settings resolved on this machine, compute dtype, source_hash of train_ngpt.py and muon_optim.py); the study
adds the fingerprint of the shards, hashed once. A finished run of any sweep under out_dir whose metrics.json
records an equal identity is reused, so sweeps share runs and an interrupted sweep goes on where it stopped;
every other run is trained. A run that ends unfinished, or records another identity than the one planned
(the code or the data changed during the study), stops the study with a message; it never counts.
Outputs: out_dir/sweep_NAME/results.json and sweep_NAME.png; the best setting per optimizer is printed.
"""
import glob
import hashlib
import json
import math
import os
import subprocess
import sys

# -----------------------------------------------------------------------------
# config (override with --name=value; any other --name=value is a train_ngpt.py flag for every run)
sweep = "lr"  # 'lr' | 'proj_every' | 'update' | 'toggles'
sweep_optimizers = "muon,adam"  # which optimizers a sweep covers (toggles: Muon only)
sweep_lrs_muon = "0.001,0.003,0.01,0.023,0.05,0.1"  # the lr sweep's lr_muon values
sweep_lrs_adam = "5e-4,1.5e-3,5e-3,1.5e-2,3e-2,5e-2"  # ... and lr_adam values
sweep_proj_every = "1,3,5,7,10,15,20"  # the proj_every sweep's values
out_dir = "out/ngpt"  # the runs go to out_dir/sweep_NAME/<label>
# -----------------------------------------------------------------------------
CONFIG = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, str))}
TRAINER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_ngpt.py")
SWEEPS = dict(lr="learning rate", proj_every="proj_every", update="update (0 project, 1 geodesic, 2 geodesic_scaled)",
              toggles="toggle (0 NS5, 1 PE, 2 NorMuon, 3 wd, 4 cautious wd)")  # name: the plot's x axis
STUDY_SETS = ("resume", "save_checkpoint", "stop_after_steps", "dry_run")  # per run, never from the flags


# -----------------------------------------------------------------------------
# Small helpers pasted identically into each script that needs them (tests/test_consistency.py compares them)

def parse_overrides(argv, defaults):
    """--name=value overrides of the constants at the top of a script (nanoGPT style): flags True/False, numbers
    parsed (--eval_tokens=1e5 is an int if whole), strings and comma lists as written. A wrong name or value
    stops with a message naming the choices; --help (or -h) prints every setting with its default and comment."""
    config = dict(defaults)
    for arg in argv:
        if arg in ("-h", "--help"):
            print(settings_help(defaults))
            raise SystemExit(0)
        key, eq, text = arg[2:].partition("=")
        if not arg.startswith("--") or not eq:
            raise SystemExit(f"bad argument {arg!r}: use --name=value (names: {', '.join(config)}; --help lists them)")
        if key not in config:
            raise SystemExit(f"unknown setting --{key}; known: {', '.join(config)}")
        default, value = config[key], text
        if isinstance(default, bool):
            if text not in ("True", "False"):
                raise SystemExit(f"--{key}={text}: expected True or False")
            value = text == "True"
        elif isinstance(default, (int, float)):
            try:
                value = float(text)
            except ValueError:
                raise SystemExit(f"--{key}={text}: expected a number") from None
            if isinstance(default, int) and not value.is_integer():
                raise SystemExit(f"--{key}={text}: expected a whole number")
            value = type(default)(value)
        config[key] = value
    return config


def settings_help(defaults):
    """Every setting as --name=default with the comment beside its constant at the top of this file."""
    comments = {}
    with open(__file__) as f:
        for name, eq, rest in (line.rstrip("\n").partition(" = ") for line in f):
            if eq and name in defaults and name not in comments:
                comments[name] = rest.split("  # ", 1)[1] if "  # " in rest else ""
    width = min(40, max(len(f"--{k}={v}") for k, v in defaults.items()))
    out = [f"python {os.path.basename(__file__)} [--name=value ...]  (flags True/False, lists comma-separated)"]
    return "\n".join(out + [f"  {f'--{k}={v}':<{width}}  {comments.get(k, '')}".rstrip() for k, v in defaults.items()])


def data_fingerprint(paths):
    """sha256 (first 16 hex digits) of the data files a run reads, in order: each file's name, size
    and content. Caches and resume key on it, so shards rewritten under the same path are noticed
    (hashing reads each file once, about a second per GB)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(f"{os.path.basename(path)}\0{os.path.getsize(path)}\0".encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def identity_diff(old, new, may_differ=()):
    """['name: old -> new', ...] for each entry in which two run identities differ, except `may_differ`."""
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in may_differ and old.get(k) != new.get(k)]


def atomic_write_json(obj, path):
    """json.dump to a temp file, then rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# The plan: every run's flags checked and its identity known before the first run

def values(cfg, key, kind):
    """A sweep's comma list as numbers, or a one-line error naming the setting."""
    try:
        out = [kind(t) for t in str(cfg[key]).split(",") if t.strip()]
    except ValueError:
        out = []
    if not out or len(set(out)) != len(out):
        raise SystemExit(f"error: --{key}={cfg[key]}: expected a comma list of distinct {kind.__name__}s, "
                         f"e.g. --{key}={CONFIG[key]}")
    return out


def sweep_runs(cfg, flags):
    """[(group, label, x, overrides)]: the sweep's runs for each optimizer in sweep_optimizers, in order."""
    given = dict(f[2:].split("=", 1) for f in flags)
    runs = []
    for o in cfg["sweep_optimizers"].split(","):
        if cfg["sweep"] == "lr":  # lr_muon or lr_adam
            runs += [(o, f"{o} lr={v:g}", v, {"optimizer": o, f"lr_{o}": v})
                     for v in values(cfg, f"sweep_lrs_{o}", float)]
        elif cfg["sweep"] == "proj_every":
            runs += [(o, f"{o} proj_every={k}", k, dict(optimizer=o, sphere="project", proj_every=k))
                     for k in values(cfg, "sweep_proj_every", int)]
        elif cfg["sweep"] == "update":
            runs += [(o, f"{o} {m}", i, dict(optimizer=o, sphere=m, proj_every=1))
                     for i, m in enumerate(("project", "geodesic", "geodesic_scaled"))]
        elif o == "muon":  # toggles: which modded-nanogpt additions carry over to Muon on the sphere
            wd = given.get("weight_decay_muon", "0")
            try:
                wd = float(wd) or 0.1  # the decay of the two wd toggles: the one given, else 0.1
            except ValueError:
                raise SystemExit(f"error: --weight_decay_muon={wd}: expected a number") from None
            toggles = [("NS5 (baseline)", {}), ("polar_express", dict(ns_method="polar_express")),
                       ("normuon", dict(normuon=0.95)), (f"wd={wd:g}", dict(weight_decay_muon=wd, cautious_wd=False)),
                       (f"cautious wd={wd:g}", dict(weight_decay_muon=wd, cautious_wd=True))]
            plain = dict(optimizer="muon", ns_method="newton_schulz", normuon=0.0, weight_decay_muon=0.0,
                         cautious_wd=False)
            runs += [(o, f"muon {t}", i, dict(plain, **extra)) for i, (t, extra) in enumerate(toggles)]
    return runs


def run_flags(cfg, flags, label, overrides, run_dir):
    """train_ngpt.py's flags for one run: the study's train_ngpt.py flags, the sweep's, then the per-run ones."""
    prefix = dict(f[2:].split("=", 1) for f in flags).get("wandb_run_name") or "ngpt"
    return flags + [f"--{k}={v}" for k, v in overrides.items()] + [
        f"--out_dir={run_dir}", "--resume=False", "--save_checkpoint=False", "--stop_after_steps=0",
        f"--wandb_run_name={prefix} sweep_{cfg['sweep']} {label}"]


def planned_identity(args, label):
    """(identity without the data hash, data files) of one run, from `train_ngpt.py --dry_run=True`: the
    trainer checks its flags with its own rules; a bad one stops the study naming the run."""
    proc = subprocess.run([sys.executable, TRAINER, *args, "--dry_run=True"], capture_output=True, text=True)
    if proc.returncode:
        why = (proc.stderr.strip().splitlines() or [f"train_ngpt.py exit {proc.returncode}"])[-1]
        raise SystemExit(f"{why} (sweep run {label!r})")
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    return plan["identity"], plan["data_files"]


def plan_sweep(cfg, flags):
    """[(group, label, x, overrides, run_dir, args, identity)] for every run of the sweep, each checked by the
    trainer and with its full run identity (the shards hashed once), before anything is trained."""
    if cfg["sweep"] not in SWEEPS:
        raise SystemExit(f"error: --sweep={cfg['sweep']}: choose one of {', '.join(SWEEPS)}")
    if not cfg["sweep_optimizers"] or set(cfg["sweep_optimizers"].split(",")) - {"muon", "adam"}:
        raise SystemExit(f"error: --sweep_optimizers={cfg['sweep_optimizers']}: use muon and/or adam, e.g. muon,adam")
    for f in flags:
        if not f.startswith("--") or "=" not in f or f[2:].split("=", 1)[0] in STUDY_SETS:
            raise SystemExit(f"error: {f}: give train_ngpt.py flags as --name=value, except "
                             f"{', '.join('--' + k for k in STUDY_SETS)}, which the study sets for each run")
    runs = sweep_runs(cfg, flags)
    if not runs:
        raise SystemExit(f"error: --sweep={cfg['sweep']} --sweep_optimizers={cfg['sweep_optimizers']}: no runs "
                         "(the toggles sweep is Muon only); add muon to --sweep_optimizers")
    plan, hashes = [], {}
    for group, label, x, overrides in runs:
        run_dir = os.path.join(cfg["out_dir"], f"sweep_{cfg['sweep']}", label.replace(" ", "_").replace("=", ""))
        args = run_flags(cfg, flags, label, overrides, run_dir)
        identity, files = planned_identity(args, label)
        if tuple(files) not in hashes:
            hashes[tuple(files)] = data_fingerprint(files)
        plan.append((group, label, x, overrides, run_dir, args, dict(identity, data_hash=hashes[tuple(files)])))
    return plan


# -----------------------------------------------------------------------------
# Runs: reused on an equal identity, else trained; only finished runs count

def read_metrics(path):
    with open(path) as f:
        return json.load(f)


def find_finished_run(root, identity):
    """The metrics of a finished run in any sweep under root that records this identity, or None."""
    for path in sorted(glob.glob(os.path.join(root, "sweep_*", "*", "metrics.json"))):
        m = read_metrics(path)
        if m.get("finished") and identity_diff(m.get("identity", {}), identity) == []:
            return m
    return None


def launch(args):
    """One train_ngpt.py process, its progress shown; returns its exit code."""
    return subprocess.run([sys.executable, TRAINER, *args]).returncode


def run_or_reuse(label, run_dir, args, identity, root):
    """The metrics of the run with this identity: a finished one under root, else trained now. A run that
    fails, ends unfinished or records another identity stops the study (finished runs stay for a rerun)."""
    m = find_finished_run(root, identity)
    if m is not None:
        print(f"{label}: reusing the finished run in {m['config']['out_dir']} (the same run identity)")
        return m
    path = os.path.join(run_dir, "metrics.json")
    if os.path.exists(path):
        os.remove(path)  # another identity's result: never read back
    code = launch(args)
    m = read_metrics(path) if os.path.exists(path) else {}
    if code or not m.get("finished"):
        raise SystemExit(f"error: sweep run {label!r} did not finish (train_ngpt.py exit {code}); a run that did not "
                         "finish is no result: fix the cause and rerun the study (finished runs are reused)")
    diff = identity_diff(m.get("identity", {}), identity)
    if diff:
        raise SystemExit(f"error: sweep run {label!r} records another identity than planned ({'; '.join(diff)}): "
                         "train_ngpt.py, muon_optim.py or the shards changed during the study; rerun the study")
    return m


def run_sweep(cfg, flags):
    """Plan (every run checked), then reuse or train each run; write results.json and the plot, print the
    best setting per optimizer. Returns (results, best)."""
    plan = plan_sweep(cfg, flags)
    root = os.path.join(cfg["out_dir"], f"sweep_{cfg['sweep']}")
    runs, results, best, series = {}, [], {}, {}
    for group, label, x, overrides, run_dir, args, identity in plan:
        m = run_or_reuse(label, run_dir, args, identity, cfg["out_dir"])
        (r,) = m["runs"].values()
        runs[label] = r
        results.append(dict(group=group, label=label, x=x, overrides=overrides, final_val_loss=r["final_val_loss"],
                            best_val_loss=r["best_val_loss"], diverged=r["diverged"], train_time=r["train_time"],
                            out_dir=m["config"]["out_dir"], val=r["val"]))
        print(f"{label:>28}: final val {r['final_val_loss']:.4f}, {r['train_time']:.0f} s"
              + ("  (diverged)" if r["diverged"] else ""))
        series.setdefault(group, []).append((x, r["final_val_loss"]))
        best_so_far = best.get(group, dict(final_val_loss=math.inf))["final_val_loss"]
        if math.isfinite(r["final_val_loss"]) and r["final_val_loss"] < best_so_far:  # a diverged run is nan
            best[group] = results[-1]
    for group, r in best.items():
        print(f"best {group}: {r['label']} -> val loss {r['final_val_loss']:.4f}")
    identity = plan[0][-1]
    os.makedirs(root, exist_ok=True)  # every run may have been reused from other sweeps' folders
    atomic_write_json(dict(sweep=cfg["sweep"], config=cfg, train_ngpt_flags=flags, source_hash=identity["source_hash"],
                           data_hash=identity["data_hash"], runs=results,
                           best={g: dict(label=r["label"], overrides=r["overrides"], final_val_loss=r["final_val_loss"])
                                 for g, r in best.items()}), os.path.join(root, "results.json"))
    plot_sweep(runs, series, os.path.join(root, f"sweep_{cfg['sweep']}.png"), cfg["sweep"])
    print(f"wrote {root}/results.json and {root}/sweep_{cfg['sweep']}.png")
    return results, best


def plot_sweep(runs, series, path, name):
    """Left: validation loss of every run against step. Right: final validation loss against the swept value,
    one line per optimizer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, run in runs.items():
        ax1.plot([p["step"] for p in run["val"]], [p["loss"] for p in run["val"]], "o-", ms=3,
                 label=f"{label} (val {run['val'][-1]['loss']:.3f})")
    vals = sorted(p["loss"] for r in runs.values() for p in r["val"] if math.isfinite(p["loss"]))
    if vals:  # zoom on the interesting part: the first eval (ln vocab) dwarfs the rest
        lo, hi = vals[0], vals[len(vals) // 2]
        ax1.set_ylim(lo - 0.1 * (hi - lo) - 0.05, hi + 0.6 * (hi - lo) + 0.1)
    for group, points in series.items():
        ax2.plot(*zip(*points), "o-", label=group)
    ax2.set_xscale("log" if name == "lr" else "linear")
    ax1.set(xlabel="step", ylabel="loss", title=f"nGPT sweep {name}: validation loss")
    ax2.set(xlabel=SWEEPS[name], ylabel="final validation loss", title=f"final validation loss vs {SWEEPS[name]}")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv):
    """python study_ngpt.py [--name=value ...]: the study's settings above, and train_ngpt.py flags for every run."""
    if any(a in ("-h", "--help") for a in argv):
        print("any other --name=value is a train_ngpt.py flag for every run (python train_ngpt.py --help lists them)")
    mine = [a for a in argv if a in ("-h", "--help") or a[2:].split("=", 1)[0] in CONFIG]
    cfg = parse_overrides(mine, CONFIG)
    return run_sweep(cfg, [a for a in argv if a not in mine])


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        print("stopped (Ctrl-C): finished runs are kept under out_dir and reused by a rerun", file=sys.stderr)
        raise SystemExit(130) from None
