"""
study_grokking.py -- grokking studies, AdamW vs Muon: tasks x seeds, fair tuning on held-out seeds,
medians with bootstrap CIs, Welch's t-test and the study plot.

    python study_grokking.py --task=all --seeds=0,1,2,3,4      # 7 tasks x 5 seeds
    python study_grokking.py --task=all --seeds=0,1,2,3,4 --tune_seeds=100 \\
        --tune_lrs_adamw=1e-3,3e-3 --tune_lrs_muon=0.02,0.05   # fair tuning: pick LRs on seed 100, report 0-4
    python study_grokking.py --task=div --seeds=0,1,2,3,4 --tune_seeds=100,101,102 \\
        --tune_grid_adamw="lr_adamw=3e-4,5e-4,1e-3,2e-3,3e-3,5e-3,1e-2,2e-2,3e-2;weight_decay=0.3,1,3" \\
        --tune_grid_muon="lr_muon=0.025,0.05,0.1;weight_decay_muon=0.25,0.5,1;lr_muon_aux=3e-3,1e-2,3e-2"
        # product grids, 27 configurations each (an unequal count is an error unless --tune_unequal_ok=True)

Every run is one `python train_grokking.py ...` process (the trainer is not imported), with its own
out_dir, out_dir/runs/<run>/ (record, curves, checkpoint, plot); `jobs` of them run at a time. Every
train_grokking.py setting is a setting here too (--max_steps=5000, --weight_decay=1, ...) and goes to
each run; the study sets task, optimizers, seed, threads and out_dir per run. A grid is
"name=v1,v2;name+name=a+b,c+d" (`+` ties settings into one axis) over train_grokking.py settings that
change that optimizer's run; the best configuration (lowest mean grok step, censored at max_steps;
ties: higher mean final val acc, then grid order; a diverged run's configuration is last) runs on
`seeds`. Outputs: out_dir/results.json (summary, tuning scores, every run) and grokking_study.png.

Rerunning reuses a finished run only if the run identity train_grokking.py recorded equals the one this
study wants (its settings, the compute dtype muon_optim picks here, the code hash of train_grokking.py,
model_tiny.py and muon_optim.py); anything else retrains, and a run recorded under other code (a file
edited during the study) is an error. --resume=False retrains everything.
Every constant below can be overridden as --name=value (flags: True/False, lists: comma-separated).
"""
import ast
import hashlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
import torch
from tqdm import tqdm

import muon_optim
from muon_optim import Muon

# -----------------------------------------------------------------------------
# config (override with --name=value; every train_grokking.py setting too)
task = "div"  # a train_grokking.py task, a comma list of them, or all
optimizers = "adamw,muon"
seeds = "0"  # comma list: the reported seeds
tune_grid_adamw = ""  # e.g. "lr_adamw=1e-3,3e-3,1e-2;weight_decay=0.3,1,3"
tune_grid_muon = ""  # e.g. "lr_muon=0.05,0.1,0.2;weight_decay_muon=0.25,0.5,1"
tune_lrs_adamw = ""  # shorthand for tune_grid_adamw="lr_adamw=<this list>" ...
tune_lrs_muon = ""  # ... and tune_grid_muon="lr_muon=<this list>"
tune_seeds = ""  # must be disjoint from `seeds`
tune_design = "product"  # product: every combination of the lists | star: the current values (the center)
# plus one axis changed at a time (1 + sum(len - 1) configurations; each list must hold the center)
tune_unequal_ok = False  # allow different configuration counts per optimizer (then not a like-for-like budget)
jobs = 1  # runs at a time (train_grokking.py processes, 1 thread each when jobs > 1)
threads = 0  # torch threads of each run when jobs=1; 0: all cores
resume = True  # reuse finished runs with the same run identity; False: retrain
out_dir = "out/grokking_study"
# -----------------------------------------------------------------------------
STUDY_KEYS = [k for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, str))]
HERE = os.path.dirname(os.path.abspath(__file__))
CODE_FILES = [os.path.join(HERE, f) for f in ("train_grokking.py", "model_tiny.py", "muon_optim.py")]
PER_RUN = ("task", "optimizers", "seed", "threads", "out_dir")  # train_grokking.py settings the study sets per run
# run settings that define the task or the measurement (or hold a comma): never a tuning-grid axis
NOT_TUNABLE = ("p", "train_frac", "max_steps", "eval_every", "threshold", "stop_on_grok", "give_up_at", "betas_adamw")


def trainer_declarations(path=CODE_FILES[0]):
    """What train_grokking.py declares at its top, read from its source (this study never imports it):
    its settings with their defaults, the task names and NOT_RUN_SETTINGS, MUON_ONLY, ADAMW_ONLY, LR_KEY, so
    that the study types, checks and identifies runs exactly as the trainer does."""
    with open(path) as f:
        tree = ast.parse(f.read())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name == "TASKS":
                found[name] = [k.value for k in node.value.keys]
            else:
                try:
                    found[name] = ast.literal_eval(node.value)
                except ValueError:
                    pass  # not a literal (CONFIG_KEYS, SOURCE_FILES, ...)
    return found


TRAINER = trainer_declarations()
TRAINER_SETTINGS = {k: v for k, v in TRAINER.items() if k.islower() and isinstance(v, (int, float, bool, str))}
TASK_NAMES, NOT_RUN_SETTINGS, MUON_ONLY, ADAMW_ONLY, LR_KEY = (
    TRAINER[k] for k in ("TASKS", "NOT_RUN_SETTINGS", "MUON_ONLY", "ADAMW_ONLY", "LR_KEY"))
CONFIG = {**{k: globals()[k] for k in STUDY_KEYS}, **{k: v for k, v in TRAINER_SETTINGS.items()
                                                       if k not in PER_RUN and k not in STUDY_KEYS}}

# -----------------------------------------------------------------------------
# pasted helpers (identical in every script that has them, see tests/test_consistency.py)

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


def check_settings(cfg):
    """Every setting a run uses, before the first step of the first run: one line naming the
    setting, its value and the fix (a bad value found mid-study would waste every run before it)."""
    minimum = dict(max_steps=1, batch_size=1, eval_every=1, n_layer=1, d_model=1, n_head=1, d_mlp=1, p=2,
                   warmup_steps=0, give_up_at=0, threads=0, weight_decay=0, weight_decay_muon=0)
    opt_names = [o.strip() for o in str(cfg["optimizers"]).split(",") if o.strip()]
    try:
        betas = [float(b) for b in str(cfg["betas_adamw"]).split(",")]
    except ValueError:
        betas = []
    rules = [*((k, cfg[k] >= low, f"must be >= {low}") for k, low in minimum.items()),
             *((k, cfg[k] > 0, "must be > 0") for k in ("lr_adamw", "lr_adamw_aux", "lr_muon", "lr_muon_aux",
                                                        "eps_adamw")),
             *((k, 0 <= cfg[k] < 1, "must be in [0, 1), e.g. 0.85 (normuon: 0.0 is off)") for k in
               ("momentum_muon", "normuon")),
             ("train_frac", 0 < cfg["train_frac"] < 1, "must be strictly between 0 and 1, e.g. 0.5"),
             ("threshold", 0 < cfg["threshold"] <= 1, "an accuracy in (0, 1], e.g. 0.99"),
             ("n_head", cfg["n_head"] >= 1 and cfg["d_model"] % cfg["n_head"] == 0,
              f"must divide d_model={cfg['d_model']}, e.g. --n_head=4"),
             ("optimizers", opt_names and set(opt_names) <= set(LR_KEY) and len(set(opt_names)) == len(opt_names),
              "choose adamw, muon or adamw,muon"),
             ("betas_adamw", len(betas) == 2 and all(0 <= b < 1 for b in betas), "two numbers in [0, 1): 0.9,0.98"),
             ("device", cfg["device"] in ("auto", "cpu", "cuda"), "choose auto, cpu or cuda"),
             ("device", cfg["device"] != "cuda" or torch.cuda.is_available(), "no CUDA here; use --device=cpu")]
    for name, ok, fix in rules:
        if not ok:
            value = f"{cfg[name]:g}" if isinstance(cfg[name], float) else cfg[name]
            raise ValueError(f"--{name}={value}: {fix}")
    try:  # muon_optim checks its own options
        Muon([dict(params=[torch.zeros(2, 2)], use_muon=True, ns_method=cfg["ns_method"])], distributed=False)
    except ValueError as e:
        raise ValueError(f"--ns_method={cfg['ns_method']}: {e}") from None


def fmt_step(r):
    """The grok step, or >max_steps if censored (*: gave up at give_up_at, near chance; !: diverged)."""
    if r["grok_step"] is not None:
        return str(r["grok_step"])
    return f">{r['max_steps']}" + ("*" if r.get("gave_up") else "") + ("!" if r.get("diverged") else "")


# -----------------------------------------------------------------------------
# fair tuning: grids

def tuning_axes(text, opt_name):
    """parse_grid's axes with each value typed like its train_grokking.py constant. A name must be a
    setting that changes this optimizer's run and does not define the task or the measurement
    (NOT_TUNABLE); the LR is lr_adamw for adamw and lr_muon for muon."""
    flag = f"tune_grid_{opt_name}"
    allowed = [k for k in TRAINER_SETTINGS if (k not in NOT_RUN_SETTINGS or k == LR_KEY[opt_name])
               and k not in NOT_TUNABLE and k not in (MUON_ONLY if opt_name == "adamw" else ADAMW_ONLY)]
    axes = []
    for names, values in parse_grid(text, flag):
        for name in names:
            if name not in allowed:
                why = ("it defines the task or the measurement, or holds a comma" if name in NOT_TUNABLE else
                       f"it does not change a {opt_name} run" if name in TRAINER_SETTINGS else "no such setting")
                raise ValueError(f"--{flag}: cannot tune {name!r} ({why}); tunable for {opt_name}: "
                                 f"{', '.join(allowed)}")
        try:
            typed = [tuple(parse_overrides([f"--{n}={v}"], TRAINER_SETTINGS)[n] for n, v in zip(names, vals))
                     for vals in values]
        except SystemExit as e:
            raise ValueError(f"--{flag}: {e}") from None
        if len(set(typed)) != len(typed):
            raise ValueError(f"--{flag}: {'+'.join(names)} lists a value twice ({values})")
        axes.append((names, typed))
    return axes


def tuning_grids(cfg, opt_names):
    """{optimizer: axes} from tune_grid_<opt> (or its shorthand tune_lrs_<opt>); an optimizer without
    a grid runs its defaults. Every optimizer must get as many configurations (the same tuning
    budget), unless tune_unequal_ok."""
    grids = {}
    for o in opt_names:
        if cfg[f"tune_grid_{o}"] and cfg[f"tune_lrs_{o}"]:
            raise ValueError(f"give --tune_grid_{o} or its shorthand --tune_lrs_{o}, not both "
                             f"(put the LRs in the grid: {LR_KEY[o]}=...)")
        text = cfg[f"tune_grid_{o}"] or (f"{LR_KEY[o]}={cfg[f'tune_lrs_{o}']}" if cfg[f"tune_lrs_{o}"] else "")
        grids[o] = tuning_axes(text, o)
    if cfg["tune_design"] not in ("product", "star"):
        raise ValueError(f"--tune_design={cfg['tune_design']!r}: choose product or star")
    counts = {o: len(grid_configs(grids[o], cfg["tune_design"], star_center(cfg, o, grids[o]))) for o in opt_names}
    if any(grids.values()) and len(set(counts.values())) > 1 and not cfg["tune_unequal_ok"]:
        sep = " x " if cfg["tune_design"] == "product" else " + "
        sizes = "; ".join(f"{o} {counts[o]}" + (f" ({sep.join(str(len(v)) for _, v in grids[o])})"
                                                if grids[o] else " (no grid: its defaults)") for o in opt_names)
        raise ValueError(f"unequal tuning budgets: {sizes} configurations; a fair comparison tries as many per "
                         "optimizer (e.g. adamw lr 4 x wd 2 = 8 and muon lr 2 x wd 2 x aux lr 2 = 8); change the "
                         "grids, or pass --tune_unequal_ok=True to run anyway")
    return grids


def star_center(cfg, opt_name, axes):
    """The star design's center: each tuned setting at its current value (--name=value moves it).
    Each list must hold it, so that every axis is tried on both sides of one point."""
    center = {n: cfg[n] for names, _ in axes for n in names}
    if cfg["tune_design"] == "star":
        for names, vals in axes:
            point = tuple(center[n] for n in names)
            if point not in vals:
                raise ValueError(f"--tune_grid_{opt_name}: a star design varies one setting at a time around the "
                                 f"current values, so {'+'.join(names)}'s list must hold its current value "
                                 f"{'+'.join(map(str, point))} (add it, or move the center with "
                                 "--name=<a listed value>)")
    return center


def grid_configs(axes, design="product", center=None):
    """A grid's configurations as dicts. product: every combination, first axis slowest; star: the
    center, then each axis's other values one at a time (the others at the center). [{}] for no grid."""
    if design == "product" or not axes:
        return [{n: v for (names, _), vals in zip(axes, combo) for n, v in zip(names, vals)}
                for combo in itertools.product(*(vals for _, vals in axes))]
    return [dict(center)] + [dict(center, **dict(zip(names, v))) for names, vals in axes for v in vals
                             if v != tuple(center[n] for n in names)]


def grid_edges(values, axes):
    """The tuned numeric settings whose winning value is the lowest or highest of its list (of 2+):
    the optimum may lie outside the grid. Tied axes (a+b) have no order."""
    edges = []
    for names, vals in axes:
        flat = [v[0] for v in vals]
        if len(names) > 1 or len(flat) < 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      for v in flat):
            continue
        k = names[0]
        if values[k] in (min(flat), max(flat)):
            edges.append(dict(name=k, value=values[k], side="low" if values[k] == min(flat) else "high", grid=flat))
    return edges


def pick_config(per_config, t, o, configs, axes, tune_seed_list):
    """Fair tuning: the configuration with the lowest mean grok step on the tuning seeds (censored
    at max_steps); ties (e.g. all censored) go to the higher mean final val acc, then the first in
    grid order; a configuration with a diverged run is last. per_config[i]: the tuning records of
    configs[i]. Returns the winner's values, the settings at the edge of their list, every score."""
    scores = []
    for c, rs in zip(configs, per_config):
        steps = steps_or_max(rs)
        scores.append(dict(values=c, steps=steps, mean_grok_step=statistics.mean(steps),
                           mean_final_val_acc=statistics.mean(r["final_val_acc"] for r in rs),
                           diverged=any(r.get("diverged") for r in rs)))
    best = min(range(len(configs)), key=lambda i: (scores[i]["diverged"], scores[i]["mean_grok_step"],
                                                   -scores[i]["mean_final_val_acc"], i))
    values = configs[best]
    edges = grid_edges(values, axes)
    print(f"tuning {t:<8} {o:<6} on seeds {tune_seed_list} (mean grok step, censored at max_steps; final val acc):")
    for i, sc in enumerate(scores):
        print(f"  {'->' if i == best else '  '} {describe(sc['values'])}: {sc['mean_grok_step']:g} "
              f"({sc['mean_final_val_acc']:.3f}) steps {sc['steps']}" + (" diverged" if sc["diverged"] else ""))
    for e in edges:
        print(f"  at the edge: extend the grid ({t}/{o}: {e['name']}={e['value']:g} is the "
              f"{'lowest' if e['side'] == 'low' else 'highest'} of {','.join(f'{v:g}' for v in e['grid'])})")
    return dict(values=values, at_edge=edges, n_configs=len(configs), tune_seeds=tune_seed_list, scores=scores)


def describe(values):
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()) or "defaults"


# -----------------------------------------------------------------------------
# runs: one train_grokking.py process each, reused on an equal run identity

def config_spec(cfg, t, o, values, seed, phase):
    """The run spec of one configuration: (task, optimizer, lr, seed, phase, extra settings)."""
    lr = values.get(LR_KEY[o], cfg[LR_KEY[o]])
    return (t, o, lr, seed, phase, tuple((k, v) for k, v in values.items() if k != LR_KEY[o]))


def run_name(task_name, opt_name, lr, seed, extra=()):
    """<task>_<optimizer>_lr<lr>[_<name><value> for each tuned setting besides the LR]_seed<seed>."""
    tail = "".join(f"_{k}{v:g}" if isinstance(v, float) else f"_{k}{v}" for k, v in extra)
    return f"{task_name}_{opt_name}_lr{lr:g}{tail}_seed{seed}"


def wanted_identity(cfg, spec, code):
    """The run identity train_grokking.py will record for this spec (its run_settings, from the
    declarations it makes: NOT_RUN_SETTINGS, MUON_ONLY, ADAMW_ONLY), so a finished run is reused without starting it."""
    t, o, lr, seed, _, extra = spec
    run = {**{k: cfg[k] for k in TRAINER_SETTINGS if k not in PER_RUN}, **dict(extra), LR_KEY[o]: lr}
    skip = NOT_RUN_SETTINGS + (MUON_ONLY if o == "adamw" else ADAMW_ONLY)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg["device"] == "auto" else cfg["device"]
    settings = dict({k: v for k, v in run.items() if k not in skip}, task=t, optimizer=o, lr=lr, seed=seed,
                    compute_dtype=muon_optim.compute_dtype_rule(device))
    return run_identity(settings, code, "")


def finished_run(run_dir, wanted):
    """(record, why): the finished run in run_dir if its recorded identity equals `wanted` (why None);
    else None and why it cannot be used."""
    try:
        with open(os.path.join(run_dir, "results.json")) as f:
            done = json.load(f)
    except OSError:
        return None, "unfinished" if os.path.exists(run_dir) else None
    except ValueError:
        return None, "unreadable"
    if done.get("interrupted") or len(done.get("runs", [])) != 1:
        return None, "interrupted"
    diff = [d.split(":")[0] for d in identity_diff(done["runs"][0].get("identity", {}), wanted)]
    if diff:
        return None, "code changed" if diff == ["source_hash"] else f"{', '.join(diff)} changed"
    return done["runs"][0], None


class Runner:
    """Starts train_grokking.py processes, `jobs` at a time. A process that fails or dies (e.g. killed
    when memory ran out) is an error naming its run; then, as on Ctrl-C, every other running process
    gets SIGINT (it saves its checkpoint and stops) and no new one starts: never a hang."""

    def __init__(self, cfg, code):
        self.cfg, self.code, self.lock, self.procs = cfg, code, threading.Lock(), {}
        self.stopping, self.seen = False, []  # seen: every spec asked for, to report the finished ones on Ctrl-C

    def finished(self, spec):
        """(the study's record of the spec's finished run with the wanted identity, or None; why not)."""
        name = run_name(*spec[:4], spec[5])
        record, why = finished_run(os.path.join(self.cfg["out_dir"], "runs", name),
                                   wanted_identity(self.cfg, spec, self.code))
        t, o, lr, seed, phase, extra = spec
        return (record and dict(record, name=name, phase=phase, hparams={LR_KEY[o]: lr, **dict(extra)})), why

    def stop(self):
        with self.lock:
            self.stopping = True
            for proc in self.procs.values():
                proc.send_signal(signal.SIGINT)

    def run_one(self, spec):
        cfg, name = self.cfg, run_name(*spec[:4], spec[5])
        run_dir = os.path.join(cfg["out_dir"], "runs", name)
        t, o, lr, seed, _, extra = spec
        passed = {k: cfg[k] for k in TRAINER_SETTINGS if k not in PER_RUN and cfg[k] != TRAINER_SETTINGS[k]}
        args = [sys.executable, CODE_FILES[0], f"--task={t}", f"--optimizers={o}", f"--seed={seed}",
                f"--threads={cfg['threads'] if cfg['jobs'] == 1 else 1}", f"--out_dir={run_dir}",
                *(f"--{k}={v}" for k, v in {**passed, **dict(extra), LR_KEY[o]: lr}.items())]
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "train.log"), "w") as log, self.lock:
            if self.stopping:
                raise RuntimeError(f"run {name}: not started (the study is stopping)")
            proc = self.procs[name] = subprocess.Popen(args, stdout=log, stderr=None if cfg["jobs"] == 1 else log)
        code = proc.wait()
        with self.lock:
            del self.procs[name]
        if code != 0:
            how = (f"died from signal {signal.Signals(-code).name} (e.g. killed when memory ran out: try fewer "
                   "--jobs)" if code < 0 else f"failed with exit code {code}")
            raise RuntimeError(f"run {name}: train_grokking.py {how}; its output: {run_dir}/train.log")
        record, why = self.finished(spec)
        if record is None:
            raise RuntimeError(f"run {name}: train_grokking.py recorded another run identity than this study "
                               f"wants ({why}): was a file edited during the study? Rerun the study")
        return record

    def run_many(self, specs, desc):
        """Records of the specs in spec order: finished ones reused, the others run."""
        cfg, results, stale = self.cfg, {}, []
        self.seen += specs
        for i, spec in enumerate(specs):
            record, why = self.finished(spec) if cfg["resume"] else (None, None)
            if record is not None:
                results[i] = record
            elif why:
                stale.append(why)
        if results or stale:
            print(f"{desc}: reusing {len(results)} finished run(s) from {cfg['out_dir']}/runs"
                  + (f"; retraining {len(stale)} ({'; '.join(sorted(set(stale)))})" if stale else ""))
        todo = [i for i in range(len(specs)) if i not in results]
        with ThreadPoolExecutor(cfg["jobs"]) as pool:
            futures = {pool.submit(self.run_one, specs[i]): i for i in todo}
            try:
                for f in tqdm(as_completed(futures), total=len(todo), desc=desc, dynamic_ncols=True,
                              disable=cfg["jobs"] == 1):  # jobs=1: each run shows its own bar
                    rec = results[futures[f]] = f.result()
                    tqdm.write(f"  {rec['name']:<40} grok {fmt_step(rec):>7}  ({rec['wall_s']:.0f} s)")
            except BaseException:  # a failed run or Ctrl-C: stop the others, cancel the rest
                self.stop()
                for f in futures:
                    f.cancel()
                raise
        return [results[i] for i in range(len(specs))]


# -----------------------------------------------------------------------------
# summaries

def steps_or_max(records):
    """Grok steps with censored runs counted at max_steps (an underestimate of the true step)."""
    return [r["grok_step"] if r["grok_step"] is not None else r["max_steps"] for r in records]


def fmt_median(records):
    steps = steps_or_max(records)
    med = statistics.median(steps)
    censored_med = sum(r["grok_step"] is None for r in records) * 2 >= len(records)
    return (f">{records[0]['max_steps']}" if censored_med else f"{med:g}"), med


def welch(a, b):
    """Welch's t-test (scipy); None when undefined (fewer than 2 runs, or no variance)."""
    from scipy import stats
    if len(a) < 2 or len(b) < 2 or (statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0):
        return None
    t, pval = stats.ttest_ind(a, b, equal_var=False)
    return dict(t=float(t), p=float(pval))


def summarize(records, task_names, opt_names):
    """Per task and optimizer: grokked k/n, median grok step; speedup of medians vs the first
    optimizer (AdamW) with a bootstrap CI; Welch's t-test; censored runs counted at max_steps."""
    summary = dict(per_task={}, note="censored runs (never grokked) are counted at max_steps")
    base = opt_names[0]
    for t in task_names:
        row = {}
        for o in opt_names:
            rs = [r for r in records if r["task"] == t and r["optimizer"] == o]
            if not rs:
                continue
            text, med = fmt_median(rs)
            row[o] = dict(grokked=sum(r["grok_step"] is not None for r in rs), n=len(rs), median=med,
                          median_text=text, lr=rs[0]["lr"], hparams=rs[0].get("hparams"), steps=steps_or_max(rs),
                          memorize_median=statistics.median([r["memorize_step"] if r["memorize_step"] is not None
                                                             else r["max_steps"] for r in rs]))
        for o in opt_names[1:]:
            if base in row and o in row:
                a, b = row[base]["steps"], row[o]["steps"]
                if row[o]["median_text"].startswith(">"):
                    continue  # most runs of this optimizer never grokked: no speedup to report
                row[o]["speedup"] = row[base]["median"] / row[o]["median"]
                row[o]["speedup_is_lower_bound"] = row[base]["median_text"].startswith(">")
                row[o]["speedup_ci95"] = (bootstrap_ci((a, b), lambda a, b: np.median(a, axis=1) / np.median(b, axis=1))
                                          if len(a) > 1 and len(b) > 1 else None)
                row[o]["welch"] = welch(a, b)
        summary["per_task"][t] = row
    for o in opt_names[1:]:
        a = steps_or_max([r for r in records if r["optimizer"] == base])
        b = steps_or_max([r for r in records if r["optimizer"] == o])
        summary[f"welch_all_{base}_vs_{o}"] = welch(a, b)
    return summary


def print_study_table(summary, opt_names):
    base = opt_names[0]
    print(f"\n{'task':<8} " + " ".join(f"{o + ' k/n':>10} {o + ' lr':>10} {o + ' median':>12}" for o in opt_names)
          + f" {'speedup [95% CI]':>22} {'Welch p':>9}")
    for t, row in summary["per_task"].items():
        cells = []
        for o in opt_names:
            c = row.get(o)
            cells.append(f"{c['grokked']:>6}/{c['n']:<3} {c['lr']:>10g} {c['median_text']:>12}" if c else " " * 35)
        o = opt_names[-1]
        c = row.get(o, {})
        sp = (f"{'>=' if c['speedup_is_lower_bound'] else ''}{c['speedup']:.2f}x") if "speedup" in c else "-"
        if c.get("speedup_ci95"):
            sp += f" [{c['speedup_ci95'][0]:.2f}, {c['speedup_ci95'][1]:.2f}]"
        wp = f"{c['welch']['p']:.2g}" if c.get("welch") else "-"
        print(f"{t:<8} " + " ".join(cells) + f" {sp:>22} {wp:>9}")
    for k, v in summary.items():
        if k.startswith("welch_all") and v:
            print(f"Welch's t-test over all runs ({base} vs {k.rsplit('_', 1)[1]}): t={v['t']:.2f}, p={v['p']:.2g}")
    print(f"note: {summary['note']}; speedup = median({base}) / median({opt_names[-1]}) (CI: bootstrap over seeds; "
          f"'>=': {base}'s median is censored, so the speedup is a lower bound); grok steps: *: gave up at "
          "give_up_at, !: diverged")


COLORS = {"adamw": "tab:blue", "muon": "tab:red"}


def plot_study(records, opt_names, path):
    """Grok step per task for each optimizer, seeds as points (hollow: censored at max_steps), medians as bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = list(dict.fromkeys(r["task"] for r in records))
    fig, ax = plt.subplots(figsize=(1.3 * len(tasks) + 3, 4.2))
    width = 0.8 / len(opt_names)
    for j, o in enumerate(opt_names):
        for i, t in enumerate(tasks):
            rs = [r for r in records if r["task"] == t and r["optimizer"] == o]
            if not rs:
                continue
            xc = i + (j - (len(opt_names) - 1) / 2) * width
            steps = steps_or_max(rs)
            ax.bar(xc, statistics.median(steps), width * 0.9, color=COLORS.get(o), alpha=0.25,
                   label=f"{o} median" if i == 0 else None)
            jitter = [xc + width * 0.3 * (k / max(1, len(rs) - 1) - 0.5) for k in range(len(rs))]
            for x, s, r in zip(jitter, steps, rs):
                ax.plot(x, s, "o", color=COLORS.get(o), mfc="none" if r["grok_step"] is None else COLORS.get(o), ms=5)
    ax.axhline(records[0]["max_steps"], color="gray", lw=0.8, ls=":", label="max_steps (hollow: censored)")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yscale("log")
    ax.set_ylabel(f"grok step (val acc >= {records[0]['settings']['threshold']})")
    ax.set_title(f"grokking step per task, mod {records[0]['p']}, train_frac {records[0]['train_frac']}, "
                 f"{len({r['seed'] for r in records})} seeds")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# -----------------------------------------------------------------------------
# the study

def parse_list(text, kind, name):
    try:
        return [kind(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--{name}={text!r}: expected a comma list of {kind.__name__}s, e.g. 0,1,2") from None


def check_study(cfg):
    """Every value, before the first run: (tasks, optimizers, seeds, tune seeds, configurations per optimizer)."""
    task_names = list(TASK_NAMES) if cfg["task"] == "all" else parse_list(cfg["task"], str, "task")
    for t in task_names:
        if t not in TASK_NAMES:
            raise ValueError(f"unknown task {t!r}; choose one of {', '.join(TASK_NAMES)} or 'all'")
    if "div" in task_names and not all(cfg["p"] % k for k in range(2, int(cfg["p"] ** 0.5) + 1)):
        raise ValueError(f"task 'div' needs a prime p (y must have an inverse mod p), got p={cfg['p']}; try p=97")
    opt_names = parse_list(cfg["optimizers"], str, "optimizers")
    seed_list, tune_seed_list = parse_list(cfg["seeds"], int, "seeds"), parse_list(cfg["tune_seeds"], int, "tune_seeds")
    if not task_names or not seed_list or cfg["jobs"] < 1:
        raise ValueError("need a task (--task=div), a seed (--seeds=0) and --jobs >= 1")
    check_settings(cfg)
    grids = tuning_grids(cfg, opt_names)
    if any(grids.values()) and not tune_seed_list:
        raise ValueError("tuning grids given but no --tune_seeds; give seeds disjoint from --seeds, "
                         "e.g. --tune_seeds=100")
    if set(tune_seed_list) & set(seed_list):
        raise ValueError(f"--tune_seeds {sorted(set(tune_seed_list) & set(seed_list))} overlap --seeds: tuning "
                         "and reporting on the same seeds is not a fair comparison; use disjoint sets")
    configs = {o: grid_configs(grids[o], cfg["tune_design"], star_center(cfg, o, grids[o])) for o in opt_names}
    for o in opt_names:
        for values in configs[o]:
            check_settings(dict(cfg, **values))
    return task_names, opt_names, seed_list, tune_seed_list, grids, configs


def main(cfg):
    """For each task, (fair tuning on tune_seeds, then) every optimizer on every seed. Returns what
    it writes to results.json."""
    task_names, opt_names, seed_list, tune_seed_list, grids, configs = check_study(cfg)
    cfg = dict(cfg, out_dir=os.path.abspath(cfg["out_dir"]))
    code = source_hash(*CODE_FILES)
    os.makedirs(cfg["out_dir"], exist_ok=True)
    print(f"tasks={','.join(task_names)} p={cfg['p']} train_frac={cfg['train_frac']} seeds={seed_list} "
          f"jobs={cfg['jobs']} code={code}")
    tuning = bool(tune_seed_list and any(grids.values()))
    if tuning:
        print(f"fair tuning on seeds {tune_seed_list}: " + "; ".join(
            f"{o} {len(configs[o])} configuration(s)" + (f" ({cfg['tune_design']}: "
                                                         + ", ".join(f"{'+'.join(n)} {len(v)}" for n, v in grids[o])
                                                         + ")" if grids[o] else " (its defaults)") for o in opt_names))
    runner, records, tuned = Runner(cfg, code), [], {}
    try:
        for t in task_names:  # task by task, so that an interrupted study still has complete tasks
            if tuning:  # fair tuning: choose each optimizer's settings on tune_seeds only
                owner = [(o, i, s) for o in opt_names for i in range(len(configs[o])) for s in tune_seed_list]
                tune_records = runner.run_many([config_spec(cfg, t, o, configs[o][i], s, "tune") for o, i, s in owner],
                                               f"tuning {t}")
                records += tune_records
                for o in opt_names:
                    per_config = [[r for (oo, ii, _), r in zip(owner, tune_records) if (oo, ii) == (o, i)]
                                  for i in range(len(configs[o]))]
                    tuned[(t, o)] = pick_config(per_config, t, o, configs[o], grids[o], tune_seed_list)
            specs = [config_spec(cfg, t, o, tuned[(t, o)]["values"] if (t, o) in tuned else {}, s, "eval")
                     for s in seed_list for o in opt_names]
            records += runner.run_many(specs, f"runs {t}")
    except KeyboardInterrupt:  # the runs stopped with their checkpoints; report every finished one
        print("\ninterrupted: writing the results of the finished runs")
        done = [r for r in (runner.finished(s)[0] for s in runner.seen) if r is not None]
        write_results(cfg, done, task_names, opt_names, tuned, code, interrupted=True)
        raise SystemExit(130)
    return write_results(cfg, records, task_names, opt_names, tuned, code)


def write_results(cfg, records, task_names, opt_names, tuned, code, interrupted=False):
    eval_records = [r for r in records if r["phase"] == "eval"]
    summary = summarize(eval_records, task_names, opt_names) if eval_records else {}
    if eval_records:
        print_study_table(summary, opt_names)
    for (t, o), w in tuned.items():
        edge = ("; at the edge: extend the grid (" + ", ".join(e["name"] for e in w["at_edge"]) + ")"
                if w["at_edge"] else "")
        print(f"tuned {t}/{o} ({w['n_configs']} configuration(s), seeds {w['tune_seeds']}): "
              f"{describe(w['values'])}{edge}")
    out = dict(config=cfg, source_hash=code, interrupted=interrupted,
               tuned_lr={f"{t}/{o}": w["values"].get(LR_KEY[o], cfg[LR_KEY[o]]) for (t, o), w in tuned.items()},
               tuned={f"{t}/{o}": w for (t, o), w in tuned.items()},
               tuning_edges=[dict(task=t, optimizer=o, **e) for (t, o), w in tuned.items() for e in w["at_edge"]],
               summary=summary, runs=records)
    path = os.path.join(cfg["out_dir"], "results.json")
    atomic_write_json(out, path)
    print(f"\nwrote {path} (each run's own files: {cfg['out_dir']}/runs/<run>/)")
    if eval_records:
        plot_study(eval_records, opt_names, os.path.join(cfg["out_dir"], "grokking_study.png"))
        print(f"wrote {cfg['out_dir']}/grokking_study.png")
    return out


if __name__ == "__main__":
    try:
        main(parse_overrides(sys.argv[1:], CONFIG))
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
