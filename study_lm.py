"""
study_lm.py -- the Muon-vs-AdamW language-model study: tune both optimizers on one part of a corpus,
then compare the winners on a disjoint part, at two horizons and over seeds.

    python study_lm.py                                   # the tiny config on the torch-source corpus (below)
    python study_lm.py --jobs=14 --device=cuda           # the same study, 14 runs at a time on one GPU
    python study_lm.py --compare=out/a,out/b             # compare finished train_muon.py runs (no study)

Every run is one `python train_muon.py ...` process (the trainer is not imported), in
out_dir/runs/<run>/ with its metrics.json; `jobs` of them run at a time.
1. Tuning, on `tune_data` with `tune_seeds` and `tune_steps` steps: each optimizer's grid is a star
   around its first values (the first value of every list is the center; each other value is tried
   with the other settings at the center), so both optimizers get 1 + sum(len - 1) configurations,
   which must be equal. The score is the final validation loss on tune_data's val shard; a
   configuration that diverges on any tune seed is recorded as failed (the worst score, shown in the
   table) and the study goes on.
2. Report, on `report_data` (text the tuning never saw) with `seeds`: the two winners train for each
   horizon in `horizons` (its own WSD schedule) on each seed (the seed sets the initial weights
   and the order of the batches). Per seed: the step at which Muon first reaches AdamW's final val loss
   (linear interpolation between evals) over the horizon. Summary per horizon: mean ratio with a
   bootstrap 95% CI over seeds, a one-sided t-test of ratio < 1, and the paired final-loss gap.

Data: two disjoint parts of a corpus, by default the Python source of the installed torch package split by
subpackage (GPT-2 BPE; 9.3M and 11.0M tokens, so 3000 steps of 1,024 tokens never repeat a window):

    for part in "tune:_*" "report:[!_]*"; do
      python prepare_fineweb.py --input="torch:${part#*:}/**/*.py" --encoding=r50k_base --shard_size=5e5 \\
          --shuffle_seed=0 --out_dir=data/torch_${part%%:*}
    done

(results/torch_corpus.md; Shakespeare's plays a*-l* / m*-z*: results/lm.md.)

Only finished runs of the identity the study asks for count. At start the study hashes the trainer's
code (train_muon.py, model_keller.py, muon_optim.py) and the shards of each data part; a run is reused
when its arguments, that code hash, that data hash, the device and the compute dtype are unchanged and
it finished (or diverged), else it retrains. A run stopped by a signal is never a score: the study stops and a
rerun trains it. A fresh run made by other code or data (a file changed during the study) is an error.
Every setting, the grids' and --model's included, is checked before the first run.
Outputs: out_dir/results.json (grids, every score, winners, per-seed ratios, CIs, p-values),
out_dir/study.md (the tables) and out_dir/study.png.

--compare=dirA,dirB,... runs no study: it shows every run of those train_muon.py out_dirs side by side,
each known by its dir and label (`dirA:muon`), with the settings that differ, and the step at which the
fastest Muon run reaches the best AdamW run's final val loss, and per group of runs that differ only in the
seed the mean and sd of the final val loss; out_dir/compare.json and compare.png. It
refuses runs that did not finish and runs on other data or other batch sizes.
Every constant below can be overridden as --name=value (flags: True/False, lists: comma-separated).
"""
import ast
import glob
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

# -----------------------------------------------------------------------------
# config (override with --name=value)
tune_data = "data/torch_tune"  # shards of one part of the corpus (prepare_fineweb.py; results/torch_corpus.md)
report_data = "data/torch_report"  # shards of a disjoint part: the reported comparison
model = ("--vocab_top=4096 --n_layer=4 --n_embd=128 --n_head=4 --block_size=128 --batch_size=8 --grad_accum_steps=1 "
         "--warmup_steps=20 --momentum_muon_warmup=100 --eval_every=50 --eval_tokens=16384")  # train_muon.py flags
tune_steps = 300
tune_seeds = "100"
horizons = "300,1000,3000"
seeds = "0,1,2"  # must be disjoint from tune_seeds
# star grids: "name=center,other,other;name=..."; name+name=a+b,c+d ties two settings (one axis). Both arms tune
# their hidden matrices' lr and weight decay and the Adam groups' lrs (embed, head); 12 configurations each. The
# defaults are round 2 of the study in results/lm.md (centers at round 1's winners; every winner inside its lists)
grid_adamw = ("lr_adamw=2e-3,1e-3,1.5e-3,3e-3,4e-3;weight_decay=1,0.1,0.3,3;lr_embed=0.6,0.2,1.2;"
              "lr_head=0.008,0.004,0.016")
grid_muon = ("lr_muon=0.0125,0.00625,0.025;weight_decay_muon+cautious_wd=0+False,0.1+False,0.1+True;"
             "lr_embed=0.2,0.1,0.6;lr_head=0.008,0.004,0.016;normuon=0.95,0.9,0.99;"
             "ns_method=polar_express,newton_schulz")
n_boot = 10000
jobs = 2  # runs at a time (each: one CPU thread, or a share of the GPU)
device = "auto"  # passed to train_muon.py: auto | cpu | cuda
out_dir = "out/lm_study"
compare = ""  # comma list of train_muon.py out_dirs: no study; compare their finished runs into out_dir/compare.*
# -----------------------------------------------------------------------------
CONFIG = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, str))}
HERE = os.path.dirname(os.path.abspath(__file__))
CODE_FILES = ("train_muon.py", "model_keller.py", "muon_optim.py")  # what train_muon.py's code hash covers
# train_muon.py settings the study sets for every run (run_args), or that would make a run other than the one
# asked for (resume, stop_after_steps): --model may not set them, and neither may a grid
PER_RUN = ("optimizers", "data_dir", "max_steps", "seed", "out_dir", "save_checkpoint", "threads", "device",
           "log_every", "compile", "resume", "stop_after_steps")
STOPPED_EXIT = {130: "SIGINT", 143: "SIGTERM", -2: "SIGINT", -15: "SIGTERM", -9: "SIGKILL"}
DIVERGED_EXIT = 3  # train_muon.py: non-finite loss or weights; metrics.json says status "diverged"


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


def run_identity(settings, code_hash, data_hash):
    """A run's identity, one flat JSON-normal dict: the resolved settings that change its result (the
    compute dtype muon_optim picks included), the hash of the code it runs and of the data it reads.
    A cached run is reused, and a checkpoint resumed, only on an equal identity; never on a path or label."""
    return json.loads(json.dumps({**settings, "source_hash": code_hash, "data_hash": data_hash}, sort_keys=True))


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


def source_hash(*paths):
    """sha256 (first 16 hex digits) of the source files that determine a run: a cached result is
    reused only when the code that made it is unchanged."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------
# grids: pure functions

def parse_grid(text, flag):
    """'a=1,2;b+c=1+x,2+y' -> [(('a',), [('1',), ('2',)]), (('b', 'c'), [('1', 'x'), ('2', 'y')])]: a tuning
    grid's lists in the order written, values as text (the trainer's own parser types them); `+` ties
    settings that move together into one axis. The study decides the design (product or star)."""
    axes = []
    for part in (q.strip() for q in str(text).split(";")):
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"--{flag}: {part!r} is not name=v1,v2,...; "
                             f"e.g. --{flag}=\"lr=1e-3,3e-3;weight_decay=0,1\"")
        names, values = (x.strip() for x in part.split("=", 1))
        names = tuple(n.strip() for n in names.split("+"))
        vals = [tuple(x.strip() for x in v.split("+")) for v in values.split(",") if v.strip()]
        if not vals or len(set(vals)) != len(vals) or any(len(v) != len(names) for v in vals):
            raise ValueError(f"--{flag}: {part!r} needs distinct values, each with one part per name "
                             f"({'+'.join(names)})")
        if any(n in {m for ns, _ in axes for m in ns} for n in names):
            raise ValueError(f"--{flag}: {'+'.join(names)} appears twice; give one list per setting")
        axes.append((names, vals))
    return axes


def bootstrap_ci(samples, statistic, n_boot=10000, seed=0):
    """95% percentile bootstrap CI of statistic(*samples): each sample is resampled with replacement,
    independently; `statistic` maps arrays of shape (n_boot, len(sample)) to n_boot values, e.g.
    lambda a, b: np.median(a, axis=1) / np.median(b, axis=1), or lambda x: x.mean(axis=1)."""
    rng = np.random.default_rng(seed)
    draws = [np.asarray(s, dtype=float)[rng.integers(len(s), size=(n_boot, len(s)))] for s in samples]
    values = statistic(*draws)
    return float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))


def star_configs(axes):
    """The center (every axis at its first value), then each other value of each axis alone."""
    center = {n: v for names, vals in axes for n, v in zip(names, vals[0])}
    configs = [dict(center)]
    for names, vals in axes:
        for v in vals[1:]:
            configs.append(dict(center, **dict(zip(names, v))))
    return configs


def at_edge(winner, axes):
    """Axes whose winning value is the lowest or highest number of its list: extend that list."""
    edges = []
    for names, vals in axes:
        try:
            nums = [float(v[0]) for v in vals]
        except ValueError:
            continue  # not numeric (ns_method): no order
        w = float(winner[names[0]])
        if len(names) == 1 and w in (min(nums), max(nums)):
            edges.append(names[0])
    return edges


def config_name(opt, values):
    """The run-dir name of one configuration: the optimizer, then each grid setting and its value."""
    return opt + "".join(f"_{k}{v}" for k, v in values.items())


# -----------------------------------------------------------------------------
# settings: every value checked before the first run

def trainer_defaults():
    """train_muon.py's settings and defaults, read from the constants at the top of its source (the study
    runs the trainer as a process, never imports it): grids and --model are checked against them."""
    with open(os.path.join(HERE, "train_muon.py")) as f:
        tree = ast.parse(f.read())
    defaults = {}
    for node in tree.body:
        names = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        if names == ["CONFIG"]:
            break
        if isinstance(node, ast.Assign) and len(names) == 1:
            try:  # literals and constant arithmetic (eval_tokens is a product)
                defaults[names[0]] = eval(compile(ast.Expression(node.value), "train_muon.py", "eval"), {})
            except Exception:
                continue
    return {k: v for k, v in defaults.items() if not k.startswith("_") and isinstance(v, (int, float, str))}


def trainer_flags(words, defaults, where):
    """{name: typed value} of train_muon.py --name=value flags; a one-line error naming `where` otherwise."""
    for w in words:
        if not w.startswith("--") or "=" not in w or w[2:].split("=", 1)[0] in ("h", "help"):
            raise ValueError(f"{where}: {w!r} is not a train_muon.py --name=value flag")
    try:
        flags = parse_overrides(words, defaults)
    except SystemExit as e:
        raise ValueError(f"{where}: {e} (train_muon.py's settings)") from None
    return {w[2:].split("=", 1)[0]: flags[w[2:].split("=", 1)[0]] for w in words}


def int_list(cfg, key, lowest):
    """A comma list of distinct whole numbers >= lowest, or a one-line error naming the setting."""
    text = str(cfg[key])
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < lowest or len(set(values)) != len(values):
        raise ValueError(f"--{key}={text}: expected a comma list of distinct whole numbers >= {lowest}, "
                         f"e.g. --{key}={CONFIG[key]}")
    return values


def data_files(data_dir, flags, defaults):
    """The shards a run of train_muon.py reads, as its run identity hashes them: every train shard, then
    the first val shard."""
    def shards(key):
        return sorted(glob.glob(os.path.join(data_dir, flags.get(key, defaults[key]))))
    train, val = shards("train_files"), shards("val_files")
    if not os.path.isdir(data_dir) or not train or not val:
        raise ValueError(f"no data dir {data_dir} with train and val shards; make it with prepare_fineweb.py "
                         "(commands: results/lm.md)")
    return train + val[:1]


def check_settings(cfg):
    """Every study setting, the grids and --model checked (no run starts before this passes); returns the
    plan: seed and horizon lists, grid axes and configurations, the files of each data part."""
    for key, lowest in (("jobs", 1), ("tune_steps", 1), ("n_boot", 1)):
        if cfg[key] < lowest:
            raise ValueError(f"--{key}={cfg[key]}: must be >= {lowest} (default {CONFIG[key]})")
    if cfg["device"] not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device={cfg['device']}: use auto, cpu or cuda")
    plan = dict(tune_seeds=int_list(cfg, "tune_seeds", 0), seeds=int_list(cfg, "seeds", 0),
                horizons=int_list(cfg, "horizons", 1))
    if set(plan["tune_seeds"]) & set(plan["seeds"]):
        raise ValueError(f"--tune_seeds {sorted(set(plan['tune_seeds']) & set(plan['seeds']))} overlap --seeds; "
                         "use disjoint sets")
    if cfg["tune_data"] == cfg["report_data"]:
        raise ValueError("--tune_data and --report_data are the same: report on text the tuning never saw")
    defaults = trainer_defaults()
    model_flags = trainer_flags(cfg["model"].split(), defaults, "--model")
    plan["axes"], plan["configs"] = {}, {}
    for o in ("adamw", "muon"):
        axes = plan["axes"][o] = parse_grid(cfg[f"grid_{o}"], f"grid_{o}")
        if not axes or any(len(vals) < 2 for _, vals in axes):
            raise ValueError(f"--grid_{o}={cfg[f'grid_{o}']}: give every setting 2 or more values (the first is the "
                             "star's center)")
        names = [n for ns, _ in axes for n in ns]
        taken = [n for n in names if n in PER_RUN]
        if taken:
            raise ValueError(f"--grid_{o} sets {', '.join(taken)}, which the study sets per run; tune other settings")
        for names_, vals in axes:
            for v in vals:
                trainer_flags([f"--{n}={x}" for n, x in zip(names_, v)], defaults, f"--grid_{o}")
        plan["configs"][o] = star_configs(axes)
    if len(plan["configs"]["adamw"]) != len(plan["configs"]["muon"]):
        raise ValueError(f"unequal tuning budgets: adamw {len(plan['configs']['adamw'])}, muon "
                         f"{len(plan['configs']['muon'])} configurations; give both grids as many")
    per_run = set(PER_RUN) | {n for axes in plan["axes"].values() for ns, _ in axes for n in ns}
    taken = [k for k in model_flags if k in per_run]
    if taken:
        raise ValueError(f"--model sets {', '.join('--' + k for k in taken)}, which the study sets for each run "
                         "(seed, data, steps, out_dir, the grids' settings); remove them from --model")
    plan["files"] = {d: data_files(cfg[d], model_flags, defaults) for d in ("tune_data", "report_data")}
    return plan


# -----------------------------------------------------------------------------
# runs: one train_muon.py process each, reused only on an equal identity

def run_args(cfg, opt, values, data, seed, steps, run_dir):
    """The train_muon.py command line of one run: the study's per-run settings, then --model, then the grid's."""
    return (["train_muon.py", f"--optimizers={opt}", f"--data_dir={data}", f"--max_steps={steps}", f"--seed={seed}",
             f"--out_dir={run_dir}", "--save_checkpoint=False", "--threads=1", f"--device={cfg['device']}",
             "--log_every=100000", "--compile=False"]  # compiling costs more than these short runs gain
            + cfg["model"].split() + [f"--{k}={v}" for k, v in values.items()])


def check_runs(cfg, plan, wanted):
    """Each configuration's train_muon.py command checked by the trainer itself (--dry_run=True: its ranges and
    choices, e.g. ns_method or normuon) before the first run trains, so a bad grid value never costs other runs.
    A configuration whose tuning runs are all cached was checked when they trained."""
    def check(spec):
        o, values = spec
        args = run_args(cfg, o, values, cfg["tune_data"], plan["tune_seeds"][0], cfg["tune_steps"],
                        os.path.join(cfg["out_dir"], "dry_run"))
        return o, values, subprocess.run([sys.executable, *args, "--dry_run=True"], cwd=HERE, capture_output=True,
                                         text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    new = [(o, c) for o in ("adamw", "muon") for c in plan["configs"][o] if not all(
        cached(cfg, ("tune", o, c, cfg["tune_data"], s, cfg["tune_steps"]), wanted) for s in plan["tune_seeds"])]
    with ThreadPoolExecutor(cfg["jobs"]) as pool:
        for o, values, proc in pool.map(check, new):
            if proc.returncode != 0:
                why = (proc.stderr.strip().splitlines() or [f"train_muon.py exit {proc.returncode}"])[-1]
                raise ValueError(f"--grid_{o} configuration {fmt(values)}: {why}")


def read_metrics(run_dir):
    """The run dir's metrics.json as written by train_muon.py (and the study's arguments), or None."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def result_problems(m, wanted):
    """Why a run dir's metrics.json is not a result of the run the study asks for ([] when it is): one run,
    finished or diverged, whose identity has the wanted entries (wanted_identity)."""
    if m is None:
        return ["no metrics.json"]
    if len(m.get("runs", {})) != 1:
        return [f"{len(m.get('runs', {}))} runs in metrics.json, not one"]
    (run,) = m["runs"].values()
    if run.get("status") not in ("finished", "diverged"):
        return [f"status {run.get('status')!r}, not finished"]
    if "identity" not in run:
        return ["no run identity (written by an older train_muon.py)"]
    return identity_diff({k: run["identity"].get(k) for k in wanted}, wanted)


def run_paths(cfg, spec):
    """(name, run dir, train_muon.py arguments) of one run of the study."""
    phase, opt, values, data, seed, steps = spec
    name = f"{phase}_{config_name(opt, values)}_seed{seed}_steps{steps}"
    run_dir = os.path.join(cfg["out_dir"], "runs", name)
    return name, run_dir, run_args(cfg, opt, values, data, seed, steps, run_dir)


def cached(cfg, spec, wanted):
    """True if the run's dir holds its result: the same arguments and the wanted identity, finished or diverged."""
    _, run_dir, args = run_paths(cfg, spec)
    m = read_metrics(run_dir)
    return m is not None and m.get("study_args") == args and not result_problems(m, wanted[spec[3]])


def run_one(cfg, spec, wanted, launch):
    """One run's record: from a cached run dir when its arguments and identity are the ones wanted, else
    trained now. A run stopped by a signal, or trained on other code or data than the study's, is an error."""
    phase, opt, values, data, seed, steps = spec
    name, run_dir, args = run_paths(cfg, spec)
    m = read_metrics(run_dir)
    if not cached(cfg, spec, wanted):
        if m is not None:
            os.remove(os.path.join(run_dir, "metrics.json"))  # never read back a stale result
        code, output = launch(args)
        if code in STOPPED_EXIT:
            raise RuntimeError(f"run {name} was stopped ({STOPPED_EXIT[code]}, exit {code}) before it finished; a "
                               "stopped run is not a score: rerun the study to train it (finished runs are reused)")
        if code not in (0, DIVERGED_EXIT):
            raise RuntimeError(f"run {name} failed (exit {code}):\n{output[-2000:]}")
        m = read_metrics(run_dir)
        problems = result_problems(m, wanted[data])
        if any(p.startswith(("source_hash:", "data_hash:")) for p in problems):
            raise RuntimeError(f"run {name} is not the run the study asked for ({'; '.join(problems)}): the code "
                               f"({', '.join(CODE_FILES)}) or the data changed during the study; restore it, or rerun "
                               "the study (it then trains every run on the current code and data)")
        if problems:
            raise RuntimeError(f"run {name} is not a result of the run the study asked for ({'; '.join(problems)}); "
                               f"its output:\n{output[-2000:]}")
        m["study_args"] = args
        atomic_write_json(m, os.path.join(run_dir, "metrics.json"))
    (run,) = m["runs"].values()
    finished = run["status"] == "finished"
    return dict(name=name, phase=phase, optimizer=opt, values=values, data=data, seed=seed, steps=steps,
                status=run["status"], val=run["val"], final_val=run["val"][-1]["loss"] if finished else None,
                code=run["identity"]["source_hash"], data_hash=run["identity"]["data_hash"])


def run_all(cfg, specs, desc, wanted):
    """Run the specs, `jobs` at a time, results in spec order. After the first error (or Ctrl-C) no run starts
    and the running ones are stopped (SIGTERM: they end at a step boundary and are never scores); the error
    raised is that first one."""
    lock, running, errors, stopping = threading.Lock(), set(), [], threading.Event()

    def launch(args):
        """(exit code, output) of one train_muon.py process, started unless the study is stopping."""
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with lock:
            if stopping.is_set():
                raise RuntimeError("not started: the study is stopping")
            proc = subprocess.Popen([sys.executable] + args, cwd=HERE, env=env, text=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            running.add(proc)
        try:
            output = proc.communicate()[0]
        finally:
            with lock:
                running.discard(proc)
        return proc.returncode, output

    def stop_all():
        with lock:
            stopping.set()
            for proc in running:
                proc.terminate()

    def one(spec):
        try:
            return run_one(cfg, spec, wanted, launch)
        except BaseException as e:
            if not stopping.is_set():
                errors.append(e)
            stop_all()
            raise

    with ThreadPoolExecutor(cfg["jobs"]) as pool:
        futures = [pool.submit(one, s) for s in specs]
        try:
            for f in tqdm(futures, desc=desc):
                f.result()
        except BaseException as e:
            stop_all()
            pool.shutdown(cancel_futures=True)
            raise (errors[0] if errors else e) from None
        return [f.result() for f in futures]


def wanted_identity(cfg, plan, code):
    """Per data part, the identity entries a run of this study must have besides its arguments: the code hash
    taken at the start, the data part's fingerprint, the device the runs use and the compute dtype muon_optim
    picks there."""
    import muon_optim  # torch: only once the settings are checked
    import torch
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if cfg["device"] == "auto" else cfg["device"]
    dtype = muon_optim.compute_dtype_rule(dev)
    wanted = {d: dict(source_hash=code, data_hash=data_fingerprint(plan["files"][k]), device=dev, compute_dtype=dtype)
              for k, d in (("tune_data", cfg["tune_data"]), ("report_data", cfg["report_data"]))}
    if wanted[cfg["tune_data"]]["data_hash"] == wanted[cfg["report_data"]]["data_hash"]:
        raise ValueError("--tune_data and --report_data hold the same shards: report on text the tuning never saw")
    return wanted


# -----------------------------------------------------------------------------
# statistics: pure functions

def interpolated_step(val, target, x="step"):
    """First step (x="time": training time) where the val curve, linearly interpolated between evals, is at or
    below target."""
    prev = None
    for pt in val:
        if pt["loss"] <= target:
            if prev is None or prev["loss"] == pt["loss"]:
                return float(pt[x])
            frac = (prev["loss"] - target) / (prev["loss"] - pt["loss"])
            return prev[x] + frac * (pt[x] - prev[x])
        prev = pt
    return None


def stays_below_step(val, target):
    """The first eval step from which the val curve stays at or below target to the end (None if its end is
    above): unlike the first crossing, a dip of the curve that the data causes and that it climbs out of again
    does not count."""
    above = [i for i, pt in enumerate(val) if pt["loss"] > target]
    if not above:
        return float(val[0]["step"])
    return float(val[above[-1] + 1]["step"]) if above[-1] + 1 < len(val) else None


def mean_ci(xs, n_boot):
    """95% bootstrap CI of the mean over seeds."""
    return bootstrap_ci([xs], lambda x: x.mean(axis=1), n_boot)


def t_test_less(xs, mu):
    """One-sided one-sample t-test of mean(xs) < mu (scipy); None if undefined."""
    from scipy import stats
    if len(xs) < 2 or statistics.pstdev(xs) == 0:
        return None
    res = stats.ttest_1samp(xs, mu, alternative="less")
    return dict(t=float(res.statistic), p=float(res.pvalue))


def compare_horizon(muon_runs, adamw_runs, horizon, n_boot):
    """Per seed: Muon's step to reach AdamW's final val loss over the horizon (censored: 1.0, flagged), and the
    same in training time (Muon's time to reach it over AdamW's time for the horizon: a Muon step costs more).
    A diverged run is the worst outcome for its side: Muon diverged never reaches (1.0, censored); AdamW
    diverged is reached at once (0.0). The loss gap is over the seeds where both finished."""
    per_seed = []
    for m, a in zip(muon_runs, adamw_runs):
        diverged = [o for o, r in (("adamw", a), ("muon", m)) if r["status"] == "diverged"]
        if m["status"] == "diverged":
            step = time = None
        elif a["status"] == "diverged":
            step = time = 0.0
        else:
            step, time = (interpolated_step(m["val"], a["final_val"], x) for x in ("step", "time"))
        stays = stays_below_step(m["val"], a["final_val"]) if step else step  # None: never; 0.0: AdamW diverged
        adamw_time = a["val"][-1]["time"] if a["val"] else 0.0
        per_seed.append(dict(seed=m["seed"], adamw_final_val=a["final_val"], muon_final_val=m["final_val"],
                             muon_step=step, ratio=(step / horizon) if step is not None else 1.0,
                             time_ratio=time / adamw_time if time is not None and adamw_time else None,
                             stays_ratio=(stays / horizon) if stays is not None else 1.0,
                             censored=step is None, diverged=diverged))
    ratios = [r["ratio"] for r in per_seed]
    time_ratios = [r["time_ratio"] for r in per_seed if r["time_ratio"] is not None]
    gaps = [r["muon_final_val"] - r["adamw_final_val"] for r in per_seed if not r["diverged"]]
    return dict(horizon=horizon, per_seed=per_seed, mean_ratio=statistics.mean(ratios),
                ratio_ci=mean_ci(ratios, n_boot), ratio_test=t_test_less(ratios, 1.0),
                mean_stays_ratio=statistics.mean(r["stays_ratio"] for r in per_seed),
                stays_ratio_ci=mean_ci([r["stays_ratio"] for r in per_seed], n_boot),
                mean_time_ratio=statistics.mean(time_ratios) if time_ratios else None,
                time_ratio_ci=mean_ci(time_ratios, n_boot) if time_ratios else None,
                mean_loss_gap=statistics.mean(gaps) if gaps else None,
                loss_gap_ci=mean_ci(gaps, n_boot) if gaps else None,
                loss_gap_test=t_test_less(gaps, 0.0))


# -----------------------------------------------------------------------------
# the study

def fmt(values):
    """A configuration as text for the tables: name=value ..."""
    return " ".join(f"{k}={v}" for k, v in values.items())


def tuning_scores(configs, runs):
    """Per configuration: the mean final val loss over the tune seeds, or status 'diverged' (worst) when a
    seed diverged."""
    scores = []
    for c in configs:
        rs = [r for r in runs if r["values"] == c]
        ok = all(r["status"] == "finished" for r in rs)
        scores.append(dict(values=c, status="finished" if ok else "diverged",
                           final_val=statistics.mean(r["final_val"] for r in rs) if ok else None))
    return scores


def study(cfg):
    """Check every setting, tune both optimizers on tune_data, report the winners on report_data; returns
    the results (also written to out_dir/results.json, study.md and study.png)."""
    cfg = dict(cfg, **{k: os.path.abspath(cfg[k]) for k in ("tune_data", "report_data", "out_dir")})
    plan = check_settings(cfg)
    configs, axes = plan["configs"], plan["axes"]
    code = source_hash(*(os.path.join(HERE, f) for f in CODE_FILES))
    wanted = wanted_identity(cfg, plan, code)
    check_runs(cfg, plan, wanted)
    os.makedirs(cfg["out_dir"], exist_ok=True)
    print(f"tuning: {len(configs['adamw'])} configurations per optimizer on {cfg['tune_data']}, seeds "
          f"{plan['tune_seeds']}, {cfg['tune_steps']} steps; report: {cfg['report_data']}, seeds {plan['seeds']}, "
          f"horizons {plan['horizons']}; code {code}")
    t0 = time.time()
    specs = [("tune", o, c, cfg["tune_data"], s, cfg["tune_steps"]) for o in ("adamw", "muon") for c in configs[o]
             for s in plan["tune_seeds"]]
    tune_runs = run_all(cfg, specs, "tuning", wanted)
    winners, tuning = {}, {}
    for o in ("adamw", "muon"):
        scores = tuning_scores(configs[o], [r for r in tune_runs if r["optimizer"] == o])
        done = [i for i, s in enumerate(scores) if s["status"] == "finished"]
        if not done:
            raise RuntimeError(f"every {o} configuration of --grid_{o} diverged; lower its learning rates")
        best = min(done, key=lambda i: (scores[i]["final_val"], i))
        winners[o] = configs[o][best]
        tuning[o] = dict(scores=scores, winner=winners[o], at_edge=at_edge(winners[o], axes[o]))
        failed = len(scores) - len(done)
        print(f"tuned {o}: {fmt(winners[o])} (val {scores[best]['final_val']:.4f})"
              + (f"; at the edge: {', '.join(tuning[o]['at_edge'])}" if tuning[o]["at_edge"] else "")
              + (f"; {failed} configuration(s) diverged" if failed else ""))
    specs = [("report", o, winners[o], cfg["report_data"], s, h) for h in plan["horizons"] for o in ("adamw", "muon")
             for s in plan["seeds"]]
    report_runs = run_all(cfg, specs, "report", wanted)
    horizons_out = []
    for h in plan["horizons"]:
        pick = lambda o: [r for r in report_runs if r["optimizer"] == o and r["steps"] == h]  # noqa: E731
        horizons_out.append(compare_horizon(pick("muon"), pick("adamw"), h, cfg["n_boot"]))
    out = dict(config=cfg, code=code, identity=wanted, minutes=(time.time() - t0) / 60, tuning=tuning,
               winners=winners, horizons=horizons_out,
               runs=[{k: v for k, v in r.items() if k != "val"} for r in tune_runs + report_runs],
               curves={r["name"]: r["val"] for r in report_runs})
    atomic_write_json(out, os.path.join(cfg["out_dir"], "results.json"))
    md, path = tables(out), os.path.join(cfg["out_dir"], "study.md")
    with open(path + ".tmp", "w") as f:
        f.write(md)
    os.replace(path + ".tmp", path)
    print("\n" + md)
    plot(out, os.path.join(cfg["out_dir"], "study.png"))
    return out


def num(x, spec=".4f"):
    """A loss as text, '-' where there is none (every run of that side diverged)."""
    return "-" if x is None else format(x, spec)


def tables(out):
    """study.md: per horizon the comparison (means over the seeds that finished), then every tuning score,
    the winner in bold and diverged configurations last."""
    lines = ["| horizon | AdamW final val (mean) | Muon final val (mean) | Muon/AdamW steps (mean) "
             "| 95% CI (bootstrap) | p (ratio < 1) | per seed | Muon/AdamW time (mean, 95% CI) "
             "| steps until Muon stays below (mean, 95% CI) |", "|---|---|---|---|---|---|---|---|---|"]
    for h in out["horizons"]:
        p = h["ratio_test"]["p"] if h["ratio_test"] else float("nan")
        per = ", ".join(f"{r['ratio']:.2f}" + ("*" if r["censored"] else "") + ("†" if r["diverged"] else "")
                        for r in h["per_seed"])
        finals = {k: [r[k] for r in h["per_seed"] if r[k] is not None] for k in ("adamw_final_val", "muon_final_val")}
        adamw_mean, muon_mean = (statistics.mean(xs) if xs else None for xs in finals.values())
        lines.append(f"| {h['horizon']} | {num(adamw_mean)} | {num(muon_mean)} | "
                     f"{h['mean_ratio']:.3f} | {h['ratio_ci'][0]:.3f}-{h['ratio_ci'][1]:.3f} | {p:.2g} | {per} | "
                     + (f"{h['mean_time_ratio']:.3f} ({h['time_ratio_ci'][0]:.3f}-{h['time_ratio_ci'][1]:.3f}) |"
                        if h.get("mean_time_ratio") is not None else "- |")
                     + f" {h['mean_stays_ratio']:.3f} ({h['stays_ratio_ci'][0]:.3f}-{h['stays_ratio_ci'][1]:.3f}) |")
    lines += ["", "\\* censored: Muon did not reach AdamW's final loss; † a run diverged (the worst outcome for it)",
              "", "| optimizer | configuration | tuning val loss |", "|---|---|---|"]
    for o, t in out["tuning"].items():
        for s in sorted(t["scores"], key=lambda s: (s["final_val"] is None, s["final_val"] or 0.0)):
            mark = "**" if s["values"] == t["winner"] else ""
            score = "diverged" if s["final_val"] is None else f"{s['final_val']:.4f}"
            lines.append(f"| {o} | {mark}{fmt(s['values'])}{mark} | {score} |")
    return "\n".join(lines) + "\n"


def plot(out, path):
    """study.png: the report runs' validation curves, one panel per horizon (nothing without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axs = plt.subplots(1, len(out["horizons"]), figsize=(6 * len(out["horizons"]), 4), squeeze=False)
    for ax, h in zip(axs[0], out["horizons"]):
        for name, val in out["curves"].items():
            if name.endswith(f"_steps{h['horizon']}"):
                color = "tab:red" if name.startswith("report_muon") else "tab:blue"
                ax.plot([p["step"] for p in val], [p["loss"] for p in val], color=color, alpha=0.6,
                        label="Muon" if color == "tab:red" else "AdamW")
        finals = [r[k] for r in h["per_seed"] for k in ("adamw_final_val", "muon_final_val") if r[k] is not None]
        if finals:  # the first evals (near ln(vocab)) would flatten the rest
            ax.set_ylim(min(finals) - 0.2, min(finals) + 2.5)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys())
        ax.set_title(f"{h['horizon']} steps: Muon/AdamW {h['mean_ratio']:.2f} "
                     f"(CI {h['ratio_ci'][0]:.2f}-{h['ratio_ci'][1]:.2f})")
        ax.set_xlabel("step")
        ax.set_ylabel("val loss (report data)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------
# --compare: finished train_muon.py runs from several out_dirs, side by side

def load_compared(out_dirs):
    """{'<out_dir>:<run label>': run} for every run of every out_dir (labels repeat across dirs: a run is
    known by its dir and its identity, never by its label alone). Refuses what cannot be compared: a
    missing dir, a run that did not finish, a run without an identity, other data or other batch sizes."""
    if len(set(out_dirs)) != len(out_dirs) or not all(out_dirs):
        raise ValueError(f"--compare={','.join(out_dirs)}: list each out_dir once")
    runs = {}
    for d in out_dirs:
        m = read_metrics(d)
        if m is None:
            raise ValueError(f"--compare: no {os.path.join(d, 'metrics.json')}; run train_muon.py with --out_dir={d} "
                             "first")
        for label, run in m["runs"].items():
            name = f"{d}:{label}"
            if "identity" not in run:
                raise ValueError(f"--compare: {name} has no run identity (an older train_muon.py wrote it); retrain it")
            if run.get("status") != "finished":
                fix = "" if run.get("status") == "diverged" else "finish it (train_muon.py --resume=True ...), or "
                raise ValueError(f"--compare: {name} is {run.get('status')!r}, not finished; {fix}leave {d} out")
            runs[name] = dict(run, optimizer=label.split(":")[0], tokens_per_step=m["tokens_per_step"])
        if not m["runs"]:
            raise ValueError(f"--compare: {d}/metrics.json holds no run; leave {d} out")
    first, *others = runs
    for name in others:
        theirs, mine = runs[first], runs[name]
        if mine["identity"]["data_hash"] != theirs["identity"]["data_hash"]:
            raise ValueError(f"--compare: {name} ran on other data (data_hash {mine['identity']['data_hash']}) than "
                             f"{first} ({theirs['identity']['data_hash']}); compare only runs on the same data")
        if mine["tokens_per_step"] != theirs["tokens_per_step"]:
            raise ValueError(f"--compare: {name} used {mine['tokens_per_step']} tokens/step, {first} "
                             f"{theirs['tokens_per_step']}; only runs on the same batches are comparable")
    return runs


def compare_summary(runs):
    """Final val loss per run and, with Muon and AdamW runs, the step at which the fastest Muon run first
    reaches the best AdamW run's final val loss (at an eval, and interpolated between evals), with the
    step and training-time ratios. Prints it and returns it."""
    finals = {name: run["val"][-1]["loss"] for name, run in runs.items()}
    first = next(iter(runs))
    for name, run in runs.items():
        differs = identity_diff(runs[first]["identity"], run["identity"], may_differ=("out_dir",))
        print(f"{name}: final val loss {finals[name]:.4f}, train time {run['val'][-1]['time']:.1f} s"
              + (f"; vs {first}: {', '.join(differs)}" if name != first and differs else ""))
    summary = dict(final_val=finals)
    adamw = [n for n in runs if runs[n]["optimizer"] == "adamw"]
    muon = [n for n in runs if runs[n]["optimizer"] == "muon"]
    if adamw and muon:
        best_adamw = min(adamw, key=finals.get)
        target, last = finals[best_adamw], runs[best_adamw]["val"][-1]
        reached = {n: next((p for p in runs[n]["val"] if p["loss"] <= target), None) for n in muon}
        hits = [n for n in muon if reached[n] is not None]
        summary["muon_vs_adamw"] = dict(adamw_run=best_adamw, adamw_final_val=target, adamw_steps=last["step"],
                                        muon_step=None)
        if not hits:
            print(f"Muon does not reach AdamW's final val loss ({target:.4f}, {best_adamw}) in {last['step']} steps")
            return summary
        best = min(hits, key=lambda n: reached[n]["step"])
        at, interp = reached[best], interpolated_step(runs[best]["val"], target)
        summary["muon_vs_adamw"].update(muon_run=best, muon_step=at["step"], step_ratio=at["step"] / last["step"],
                                        muon_step_interpolated=interp, step_ratio_interpolated=interp / last["step"],
                                        time_ratio=at["time"] / last["time"] if last["time"] else None)
        print(f"Muon reaches AdamW's final val loss ({target:.4f}, {best_adamw}) at step {at['step']} ({best}): "
              f"{at['step'] / last['step']:.2f}x AdamW's {last['step']} steps (interpolated between evals: step "
              f"{interp:.0f}, {interp / last['step']:.2f}x)"
              + (f", {at['time'] / last['time']:.2f}x its training time" if last["time"] else ""))
    return summary


def plot_compare(runs, path):
    """Validation loss of every compared run against step and against training time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        for ax, x in ((ax1, "step"), (ax2, "time")):
            ax.plot([p[x] for p in run["val"]], [p["loss"] for p in run["val"]], "o-", ms=3, label=name)
    ax1.set(xlabel="step", ylabel="validation loss")
    ax2.set(xlabel="training time (s, excluding eval)", ylabel="validation loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


NOT_A_SETTING = ("seed", "out_dir", "data_dir", "threads", "resume", "stop_after_steps", "log_every", "ckpt_every",
                 "save_checkpoint", "wandb_log", "wandb_project", "wandb_run_name")  # the same run, other seeds or dirs


def seed_groups(runs):
    """Runs whose identities differ only in the seed (or in NOT_A_SETTING) form one group: per group the settings
    in which it differs from the first group, its runs, seeds, and the mean and standard deviation of the final
    val loss over them. Prints one line per group and returns the groups."""
    keyed = {}
    for name, run in runs.items():
        key = json.dumps({k: v for k, v in run["identity"].items() if k not in NOT_A_SETTING}, sort_keys=True)
        keyed.setdefault(key, []).append(name)
    groups, first = [], json.loads(next(iter(keyed)))
    for key, names in keyed.items():
        finals = [runs[n]["val"][-1]["loss"] for n in names]
        differs = identity_diff(first, json.loads(key))
        groups.append(dict(differs=differs, runs=names, seeds=[runs[n]["identity"]["seed"] for n in names],
                           final_val_mean=statistics.mean(finals),
                           final_val_sd=statistics.stdev(finals) if len(finals) > 1 else None))
        sd = f" ± {groups[-1]['final_val_sd']:.4f} (sd)" if len(finals) > 1 else ""
        print(f"{'; '.join(differs) or 'the first group'}: seeds {groups[-1]['seeds']}, final val loss "
              f"{groups[-1]['final_val_mean']:.4f}{sd}")
    return groups


def compare_dirs(out_dirs, out):
    """--compare: every finished run of the out_dirs side by side -> out/compare.json and out/compare.png."""
    runs = load_compared(out_dirs)
    summary = compare_summary(runs)
    summary["seed_groups"] = seed_groups(runs)
    os.makedirs(out, exist_ok=True)
    kept = {name: {k: v for k, v in run.items() if k != "train"} for name, run in runs.items()}
    atomic_write_json(dict(compared=out_dirs, runs=kept, summary=summary), os.path.join(out, "compare.json"))
    plot_compare(runs, os.path.join(out, "compare.png"))
    print(f"written: {os.path.join(out, 'compare.json')}, {os.path.join(out, 'compare.png')}")
    return summary


def stop_study(signum, frame):
    """SIGTERM as Ctrl-C: no run starts, the running ones stop at a step boundary, the study exits."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(cfg):
    """--compare, or the study."""
    if cfg["compare"]:
        return compare_dirs(cfg["compare"].split(","), cfg["out_dir"])
    return study(cfg)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, stop_study)
    try:
        main(parse_overrides(sys.argv[1:], CONFIG))
    except KeyboardInterrupt as e:
        name = str(e) or "SIGINT"
        print(f"stopped ({name}): finished runs are kept in out_dir/runs and reused by a rerun", file=sys.stderr)
        raise SystemExit(128 + signal.Signals[name]) from None
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
