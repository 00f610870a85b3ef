"""
train_grokking.py -- grokking on modular arithmetic, AdamW vs Muon, from the same initialization
and the same batches.

    python train_grokking.py                                   # default run: div mod 97, both optimizers
    python train_grokking.py --task=all --seeds=0,1,2,3,4      # study mode: 7 tasks x 5 seeds
    python train_grokking.py --task=all --seeds=0,1,2,3,4 --tune_seeds=100 \\
        --tune_lrs_adamw=1e-3,3e-3 --tune_lrs_muon=0.02,0.05   # fair tuning: pick LRs on seed 100, report 0-4
    python train_grokking.py --task=div --seeds=0,1,2,3,4 --tune_seeds=100,101,102 \\
        --tune_grid_adamw="lr_adamw=3e-4,5e-4,1e-3,2e-3,3e-3,5e-3,1e-2,2e-2,3e-2;weight_decay=0.3,1,3" \\
        --tune_grid_muon="lr_muon=0.025,0.05,0.1;weight_decay_muon=0.25,0.5,1;lr_muon_aux=3e-3,1e-2,3e-2"
        # product grids, 27 configurations each (an unequal count is an error unless --tune_unequal_ok=True)

A run trains until validation accuracy reaches `threshold` (it has "grokked") or `max_steps`; a run
that never groks is reported as censored at max_steps, never dropped. Outputs in out_dir:
results.json (one record per run + the study summary), runs/<run>.json (record + curves),
ckpt/<run>.pt (model + optimizer + step, written atomically, also on Ctrl-C), grokking.png and,
in study mode, grokking_study.png.

Rerunning a command reuses a finished run in out_dir/runs only if its record has the same settings
(every constant below that can change the run) and the same source_hash (of this file,
model_tiny.py and muon_optim.py); anything else is retrained. --resume=False retrains everything.

Every constant below can be overridden as --name=value (flags: True/False, lists: comma-separated).
"""
import hashlib
import itertools
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import model_tiny
import muon_optim
from model_tiny import TinyConfig, TinyTransformer
from muon_optim import Muon

# -----------------------------------------------------------------------------
# config (override with --name=value)
task = "div"  # add | sub | mul | div | x2y2 | x2xyy2 | x3xy | all | a comma list
p = 97  # the modulus (prime for div)
train_frac = 0.5  # fraction of all (x, y) pairs used for training; the rest is validation
optimizers = "adamw,muon"
seeds = "0"  # comma list; a seed fixes the split, the initialization and the batch order
max_steps = 3000
batch_size = 1024  # 512 before the speed study (results/grokking_tuning.md): Muon groks in fewer steps at 1024
eval_every = 20  # full train + val evaluation every this many steps (the grok-step resolution)
threshold = 0.99  # memorized: train acc >= threshold; grokked: val acc >= threshold (0.95 also recorded)
stop_on_grok = True  # end a run at its grok step (saves compute in studies)
give_up_at = 500  # a run whose train accuracy is still below max(10%, 2/p) at this step has diverged or
# stalled (seen: AdamW at lr >= 2e-2, or wd >= 3 at lr 1e-2, batch 1024, never left chance in 3000 steps):
# it stops and counts as censored at max_steps, like any run that never groks. 0: never give up
warmup_steps = 10  # linear LR warmup, as in Power et al.
# the AdamW run: AdamW on every parameter (Power et al.: lr 1e-3, betas (0.9, 0.98), wd 1)
lr_adamw = 3e-3
betas_adamw = "0.9,0.98"  # also for the Muon run's AdamW groups
eps_adamw = 1e-8
weight_decay = 1.0  # AdamW decoupled weight decay (also for the Muon run's AdamW groups)
# the Muon run: Muon on the hidden matrices (attention and MLP weights), AdamW on the rest
lr_muon = 0.1  # with momentum 0.85 and batch 1024: chosen on tuning seeds 100-102 (results/grokking_tuning.md)
momentum_muon = 0.85
weight_decay_muon = 0.5  # Muon's decoupled weight decay: W <- W * (1 - lr_muon * weight_decay_muon)
ns_method = "newton_schulz"  # newton_schulz | polar_express | gram_newton_schulz
normuon = 0.0  # NorMuon's beta2 for per-neuron normalization of the Muon update (e.g. 0.95); 0.0: off
lr_muon_aux = 1e-2  # the Muon run's AdamW lr for embeddings, head, norms and biases
# model
n_layer = 2
d_model = 128
n_head = 4
d_mlp = 512
prenorm = False
# fair tuning: per task, every configuration of an optimizer's grid runs on tune_seeds; the best
# (lowest mean grok step, censored at max_steps; ties: higher mean final val acc, then grid order)
# is used on `seeds`. A grid is "name=v1,v2;name=v1,v2,v3": the product of the lists, over
# constants that change that optimizer's run. Both optimizers must get as many configurations.
tune_grid_adamw = ""  # e.g. "lr_adamw=1e-3,3e-3,1e-2;weight_decay=0.3,1,3"
tune_grid_muon = ""  # e.g. "lr_muon=0.05,0.1,0.2;weight_decay_muon=0.25,0.5,1"
tune_lrs_adamw = ""  # shorthand for tune_grid_adamw="lr_adamw=<this list>" ...
tune_lrs_muon = ""  # ... and tune_grid_muon="lr_muon=<this list>"
tune_seeds = ""  # must be disjoint from `seeds`
tune_design = "product"  # product: every combination of the lists | star: the constants' current values (the
# center) plus one setting changed at a time (1 + sum(len - 1) configurations; each list must hold the center)
tune_unequal_ok = False  # allow different configuration counts per optimizer (then not a like-for-like budget)
# system
jobs = 1  # runs in parallel processes (each with 1 thread); 1: in this process, live tqdm per run
threads = 0  # torch threads for jobs=1; 0: all cores
resume = True  # reuse finished runs in out_dir/runs with the same settings and source_hash; False: retrain
save_checkpoint = True  # ckpt/<run>.pt at the end of each run and on Ctrl-C
out_dir = "out/grokking"
device = "auto"  # auto | cpu | cuda
# -----------------------------------------------------------------------------
CONFIG_KEYS = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
# settings that choose which runs a study holds, or where / how fast they run, not what a run computes
# (device, threads and jobs change results only at float rounding); every other constant is part of a
# run's settings. The Muon knobs are left out of an AdamW run, so the AdamW baseline is shared.
NOT_RUN_SETTINGS = ("task", "optimizers", "seeds", "lr_adamw", "lr_muon", "tune_grid_adamw", "tune_grid_muon",
                    "tune_lrs_adamw", "tune_lrs_muon", "tune_seeds", "tune_design", "tune_unequal_ok", "jobs", "threads", "resume",
                    "save_checkpoint", "out_dir", "device")
LR_KEY = {"adamw": "lr_adamw", "muon": "lr_muon"}  # the constant that is a run's `lr`
# run settings that define the task or the measurement (or hold a comma): never a tuning-grid axis
NOT_TUNABLE = ("p", "train_frac", "max_steps", "eval_every", "threshold", "stop_on_grok", "give_up_at", "betas_adamw")
MUON_ONLY = ("lr_muon_aux", "momentum_muon", "weight_decay_muon", "ns_method", "normuon")
SOURCE_FILES = (os.path.abspath(__file__), model_tiny.__file__, muon_optim.__file__)  # the code a run executes
TASKS = {  # name -> (answer as a function of integer tensors x, y and the modulus, op token text)
    "add": (lambda x, y, p: (x + y) % p, "+"),
    "sub": (lambda x, y, p: (x - y) % p, "-"),
    "mul": (lambda x, y, p: (x * y) % p, "*"),
    "div": (lambda x, y, p: (x * modular_inverse(y, p)) % p, "/"),
    "x2y2": (lambda x, y, p: (x * x + y * y) % p, "x^2+y^2"),
    "x2xyy2": (lambda x, y, p: (x * x + x * y + y * y) % p, "x^2+xy+y^2"),
    "x3xy": (lambda x, y, p: (x * x * x + x * y) % p, "x^3+xy"),
}

# -----------------------------------------------------------------------------
# pasted helpers (identical in every script, see tests/test_consistency.py)

def parse_overrides(argv, defaults):
    """--name=value overrides of the constants at the top of a script (nanoGPT style).
    Flags are True/False; ints and floats are parsed as numbers (--eval_tokens=1e5 is an int if
    whole); strings are taken as written; lists are comma-separated strings. Unknown names and
    values of the wrong type stop with a message that lists the valid choices; --help (or -h)
    prints every setting with its default and comment."""
    config = dict(defaults)
    for arg in argv:
        if arg in ("-h", "--help"):
            print(settings_help(defaults))
            raise SystemExit(0)
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"bad argument {arg!r}: use --name=value (names: {', '.join(config)}; --help lists them)")
        key, text = arg[2:].split("=", 1)
        if key not in config:
            raise SystemExit(f"unknown setting --{key}; known: {', '.join(config)}")
        default = config[key]
        if isinstance(default, bool):
            if text not in ("True", "False"):
                raise SystemExit(f"--{key}={text}: expected True or False")
            value = text == "True"
        elif isinstance(default, (int, float)):
            try:
                value = float(text)
            except ValueError:
                raise SystemExit(f"--{key}={text}: expected a number") from None
            if isinstance(default, int):
                if not value.is_integer():
                    raise SystemExit(f"--{key}={text}: expected a whole number")
                value = int(value)
        else:
            value = text
        config[key] = value
    return config


def settings_help(defaults):
    """Every setting as --name=default with the comment beside its constant at the top of this file."""
    with open(__file__) as f:
        lines = f.read().splitlines()
    comments = {}
    for line in lines:
        name, eq, rest = line.partition(" = ")
        if eq and name in defaults and name not in comments:
            comments[name] = rest.split("  # ", 1)[1] if "  # " in rest else ""
    shown = {k: f"--{k}={v}" for k, v in defaults.items()}
    width = min(40, max(map(len, shown.values())))
    out = [f"python {os.path.basename(__file__)} [--name=value ...]  (flags True/False, lists comma-separated)"]
    out += [f"  {shown[k]:<{width}}  {comments.get(k, '')}".rstrip() for k in defaults]
    return "\n".join(out)


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


def atomic_save(obj, path):
    """torch.save to a temp file, then rename: an interrupted save never leaves a truncated file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


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

SOURCE_HASH = source_hash(*SOURCE_FILES)  # of the code this process runs (a spawned job hashes its own)


def parse_list(text, kind, name):
    try:
        return [kind(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"--{name}={text!r}: expected a comma list of {kind.__name__}s, e.g. 0,1,2") from None


def parse_betas(text, name):
    betas = parse_list(text, float, name)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise SystemExit(f"--{name}={text!r}: expected two numbers in [0, 1), e.g. --{name}=0.9,0.98")
    return tuple(betas)


# -----------------------------------------------------------------------------
# data: every pair (x, y), input `x op y =`, target the answer class

def is_prime(n):
    return n >= 2 and all(n % k for k in range(2, math.isqrt(n) + 1))


def modular_inverse(y, p):
    """y^(p-2) mod p (Fermat), elementwise on an integer tensor; valid for prime p and y != 0."""
    table = torch.tensor([pow(int(v), p - 2, p) if v else 0 for v in range(p)])
    return table[y]


def make_dataset(task_name, p):
    """All pairs of the task: X (N, 4) tokens [x, op, y, =] with op = p and '=' = p + 1, Y (N,)
    answers in [0, p). N = p^2, or p(p-1) for div (y = 0 excluded)."""
    if task_name not in TASKS:
        raise ValueError(f"unknown task {task_name!r}; choose one of {', '.join(TASKS)} or 'all'")
    if p < 2:
        raise ValueError(f"p={p}: the modulus must be >= 2")
    if task_name == "div" and not is_prime(p):
        raise ValueError(f"task 'div' needs a prime p (y must have an inverse mod p), got p={p}; try p=97")
    x = torch.arange(p).repeat_interleave(p)
    y = torch.arange(p).repeat(p)
    if task_name == "div":
        x, y = x[y != 0], y[y != 0]
    answer = TASKS[task_name][0](x, y, p)
    X = torch.stack([x, torch.full_like(x, p), y, torch.full_like(x, p + 1)], dim=1)
    return X, answer


def split_indices(n, train_frac, seed):
    """A random disjoint train/val split of range(n), fixed by the seed."""
    if not 0 < train_frac < 1:
        raise ValueError(f"train_frac={train_frac} must be strictly between 0 and 1")
    n_train = round(train_frac * n)
    if n_train < 1 or n_train >= n:
        raise ValueError(f"train_frac={train_frac} leaves an empty train or val set for {n} examples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n_train], perm[n_train:]


def batch_sequence(n_train, batch_size, seed):
    """Endless batches of train indices: shuffled epochs, fixed by the seed (same for every optimizer)."""
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    bs = min(batch_size, n_train)
    buf = torch.empty(0, dtype=torch.long)
    while True:
        while len(buf) < bs:
            buf = torch.cat([buf, torch.randperm(n_train, generator=gen)])
        yield buf[:bs]
        buf = buf[bs:]


# -----------------------------------------------------------------------------
# one run

def model_config(cfg):
    return TinyConfig(vocab_size=cfg["p"] + 2, n_classes=cfg["p"], n_layer=cfg["n_layer"], d_model=cfg["d_model"],
                      n_head=cfg["n_head"], d_mlp=cfg["d_mlp"], prenorm=cfg["prenorm"])


def make_optimizer(opt_name, model, cfg, lr):
    """AdamW on every parameter; or Muon on the hidden matrices (attention and MLP weights) with
    AdamW on what Muon is not meant for: embeddings and head (one-hot-like inputs and outputs),
    LayerNorm gains and biases (not matrices)."""
    betas = parse_betas(cfg["betas_adamw"], "betas_adamw")
    if opt_name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=cfg["eps_adamw"],
                                 weight_decay=cfg["weight_decay"])
    if opt_name != "muon":
        raise ValueError(f"unknown optimizer {opt_name!r}; choose adamw or muon")
    hidden = [p for block in model.blocks for p in block.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if not any(p is h for h in hidden)]  # embeddings, head, gains, biases
    return Muon([dict(params=hidden, use_muon=True, lr=lr, momentum=cfg["momentum_muon"],
                      weight_decay=cfg["weight_decay_muon"], ns_method=cfg["ns_method"],
                      normuon=cfg["normuon"] or None),
                 dict(params=rest, use_muon=False, lr=cfg["lr_muon_aux"], betas=betas, eps=cfg["eps_adamw"],
                      weight_decay=cfg["weight_decay"])], distributed=False)


@torch.no_grad()
def evaluate(model, X, Y, masks, chunk=4096):
    """Loss and accuracy on each index set, from one vectorized pass over all examples."""
    logits = torch.cat([model(c) for c in X.split(chunk)])
    loss = F.cross_entropy(logits, Y, reduction="none")
    correct = (logits.argmax(-1) == Y).float()
    stats = torch.stack([torch.stack([loss[m].mean(), correct[m].mean()]) for m in masks])
    return stats.tolist()  # the one host sync per evaluation


def run_name(task_name, opt_name, lr, seed, extra=()):
    """<task>_<optimizer>_lr<lr>[_<name><value> for each tuned setting besides the LR]_seed<seed>."""
    tail = "".join(f"_{k}{v:g}" if isinstance(v, float) else f"_{k}{v}" for k, v in extra)
    return f"{task_name}_{opt_name}_lr{lr:g}{tail}_seed{seed}"


def run_settings(cfg, task_name, opt_name, lr, seed):
    """Every setting that determines a run (see NOT_RUN_SETTINGS for the few that do not): a cached
    run is reused only when these and the source_hash match, so a new constant is covered by default."""
    skip = NOT_RUN_SETTINGS + (MUON_ONLY if opt_name == "adamw" else ())
    return dict({k: v for k, v in cfg.items() if k not in skip}, task=task_name, optimizer=opt_name, lr=lr, seed=seed)


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device=cuda but no CUDA device is available; use --device=cpu")
    return name


def train_run(cfg, task_name, opt_name, lr, seed, phase="eval", show_bar=True, extra=()):
    """Train one model; returns the run's record (with its curves), also written to runs/<name>.json.
    extra: ((name, value), ...) settings besides the LR that a tuning grid set (already in cfg; they
    go into the run's name and record). Ctrl-C saves a checkpoint and re-raises."""
    dev = resolve_device(cfg["device"])
    torch.set_flush_denormal(True)  # CPU: subnormal floats late in long runs slow float math ~4x; flush to 0
    X, Y = make_dataset(task_name, cfg["p"])
    train_idx, val_idx = split_indices(len(X), cfg["train_frac"], seed)
    masks = [torch.zeros(len(X), dtype=torch.bool) for _ in range(2)]
    masks[0][train_idx], masks[1][val_idx] = True, True
    X, Y, masks = X.to(dev), Y.to(dev), [m.to(dev) for m in masks]
    Xtr, Ytr = X[train_idx.to(dev)], Y[train_idx.to(dev)]
    torch.manual_seed(seed)  # same initial weights for every optimizer
    model = TinyTransformer(model_config(cfg)).to(dev)
    opt = make_optimizer(opt_name, model, cfg, lr)
    base_lrs = [g["lr"] for g in opt.param_groups]
    batches = batch_sequence(len(train_idx), cfg["batch_size"], seed)
    name, settings = run_name(task_name, opt_name, lr, seed, extra), run_settings(cfg, task_name, opt_name, lr, seed)
    curve = dict(step=[], train_loss=[], train_acc=[], val_loss=[], val_acc=[])
    marks = dict(memorize_step=None, grok_step=None, grok_step_95=None)
    step, t0, gave_up = 0, time.perf_counter(), False
    bar = tqdm(total=cfg["max_steps"], desc=f"{name:<32}", disable=not show_bar, leave=True, dynamic_ncols=True)
    try:
        model.train()
        while True:
            if step % cfg["eval_every"] == 0 or step == cfg["max_steps"]:  # step 0, every eval_every, the last
                (trl, tra), (val, vaa) = evaluate(model, X, Y, masks)
                for k, v in zip(curve, (step, trl, tra, val, vaa)):
                    curve[k].append(v)
                for mark, acc, level in (("memorize_step", tra, cfg["threshold"]), ("grok_step_95", vaa, 0.95),
                                         ("grok_step", vaa, cfg["threshold"])):
                    if marks[mark] is None and acc >= level:
                        marks[mark] = step
                bar.set_postfix(train=f"{tra:.3f}", val=f"{vaa:.3f}", refresh=False)
                if step == cfg["max_steps"] or (cfg["stop_on_grok"] and marks["grok_step"] is not None):
                    break
                if 0 < cfg["give_up_at"] <= step < cfg["give_up_at"] + cfg["eval_every"] and tra < max(0.1, 2 / cfg["p"]):
                    gave_up = True  # the first evaluation at or after give_up_at: still near chance
                    break
            scale = min(1.0, (step + 1) / cfg["warmup_steps"]) if cfg["warmup_steps"] > 0 else 1.0
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * scale
            idx = next(batches).to(dev)
            loss = F.cross_entropy(model(Xtr[idx]), Ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
    finally:  # also on Ctrl-C: the checkpoint holds the model at `step`
        bar.close()
        wall_s = time.perf_counter() - t0
        if cfg["save_checkpoint"]:
            os.makedirs(os.path.join(cfg["out_dir"], "ckpt"), exist_ok=True)
            atomic_save(dict(script="train_grokking.py", model=model.state_dict(), optimizer=opt.state_dict(),
                             step=step, model_config=vars(model_config(cfg)), settings=settings,
                             source_hash=SOURCE_HASH), os.path.join(cfg["out_dir"], "ckpt", name + ".pt"))
    record = dict(name=name, task=task_name, p=cfg["p"], train_frac=cfg["train_frac"], optimizer=opt_name, lr=lr,
                  hparams={LR_KEY[opt_name]: lr, **dict(extra)}, seed=seed, phase=phase, **marks, censored=marks["grok_step"] is None, gave_up=gave_up, steps_run=step,
                  max_steps=cfg["max_steps"], final_train_loss=curve["train_loss"][-1],
                  final_train_acc=curve["train_acc"][-1], final_val_loss=curve["val_loss"][-1],
                  final_val_acc=curve["val_acc"][-1], wall_s=round(wall_s, 2), n_params=model.num_params(),
                  settings=settings, source_hash=SOURCE_HASH,
                  source_files=[os.path.basename(f) for f in SOURCE_FILES], curve=curve)
    os.makedirs(os.path.join(cfg["out_dir"], "runs"), exist_ok=True)
    atomic_write_json(record, os.path.join(cfg["out_dir"], "runs", name + ".json"))
    return record


def spec_cfg(cfg, spec):
    """The config of one run spec (task, optimizer, lr, seed, phase, extra): cfg with the extra settings."""
    return dict(cfg, **dict(spec[5])) if len(spec) > 5 else cfg


def cached_run(cfg, spec, phase=None):
    """(record, why): the finished run of this spec in out_dir/runs if its settings and source_hash
    match the current ones (then why is None); else None and the reason it cannot be reused."""
    extra = spec[5] if len(spec) > 5 else ()
    path = os.path.join(cfg["out_dir"], "runs", run_name(*spec[:4], extra) + ".json")
    if not ((cfg["resume"] or phase) and os.path.exists(path)):
        return None, None
    try:
        with open(path) as f:
            record = json.load(f)
    except ValueError:
        return None, "unreadable"
    if record.get("settings") != run_settings(spec_cfg(cfg, spec), *spec[:4]):
        return None, "settings changed"
    if record.get("source_hash") != SOURCE_HASH:
        return None, "code changed"
    record["phase"] = spec[4]  # the same run can serve as a tuning run of one study and an eval run of another
    return record, None


def _worker(args):
    cfg, spec = args
    torch.set_num_threads(1)  # parallel jobs share the cores; more threads per job only contend
    return train_run(spec_cfg(cfg, spec), *spec[:5], show_bar=False, extra=spec[5] if len(spec) > 5 else ())


def run_many(cfg, specs, desc, pool=None):
    """Run (task, optimizer, lr, seed, phase[, extra]) specs, reusing cached ones; returns records in spec order.
    With a process pool the runs go in parallel and one bar counts finished runs."""
    cached = [cached_run(cfg, s) for s in specs]
    results = {i: r for i, (r, _) in enumerate(cached) if r is not None}
    todo = [i for i in range(len(specs)) if i not in results]
    stale = [why for _, why in cached if why]
    if results or stale:
        print(f"{desc}: reusing {len(results)} finished run(s) from {cfg['out_dir']}/runs"
              + (f"; retraining {len(stale)} ({', '.join(sorted(set(stale)))})" if stale else ""))
    if pool is None:
        for i in todo:
            s = specs[i]
            results[i] = train_run(spec_cfg(cfg, s), *s[:5], extra=s[5] if len(s) > 5 else ())
    elif todo:
        it = pool.imap(_worker, [(cfg, specs[i]) for i in todo])
        for i, rec in zip(todo, tqdm(it, total=len(todo), desc=desc, dynamic_ncols=True)):
            results[i] = rec
            tqdm.write(f"  {rec['name']:<32} grok {fmt_step(rec):>6}  ({rec['wall_s']:.0f} s)")
    return [results[i] for i in range(len(specs))]


# -----------------------------------------------------------------------------
# summaries

def steps_or_max(records):
    """Grok steps with censored runs counted at max_steps (an underestimate of the true step)."""
    return [r["grok_step"] if r["grok_step"] is not None else r["max_steps"] for r in records]


def fmt_step(r):
    if r["grok_step"] is not None:
        return str(r["grok_step"])
    return f">{r['max_steps']}" + ("*" if r.get("gave_up") else "")  # *: stopped at give_up_at, near chance


def fmt_median(records):
    steps = steps_or_max(records)
    med = statistics.median(steps)
    censored_med = sum(r["grok_step"] is None for r in records) * 2 >= len(records)
    return (f">{records[0]['max_steps']}" if censored_med else f"{med:g}"), med


def bootstrap_ratio_ci(a, b, n_boot=10000, seed=0):
    """95% CI of median(a) / median(b), resampling each sample independently."""
    gen = torch.Generator().manual_seed(seed)
    A, B = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    ia = torch.randint(len(a), (n_boot, len(a)), generator=gen)
    ib = torch.randint(len(b), (n_boot, len(b)), generator=gen)
    ratios = A[ia].median(dim=1).values / B[ib].median(dim=1).values
    return torch.quantile(ratios, 0.025).item(), torch.quantile(ratios, 0.975).item()


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
                row[o]["speedup_ci95"] = bootstrap_ratio_ci(a, b) if len(a) > 1 and len(b) > 1 else None
                row[o]["welch"] = welch(a, b)
        summary["per_task"][t] = row
    for o in opt_names[1:]:
        a = steps_or_max([r for r in records if r["optimizer"] == base])
        b = steps_or_max([r for r in records if r["optimizer"] == o])
        summary[f"welch_all_{base}_vs_{o}"] = welch(a, b)
    return summary


def print_run_table(records, opt_names):
    base = {(r["task"], r["seed"]): r for r in records if r["optimizer"] == opt_names[0]}
    print(f"\n{'task':<8} {'optimizer':<9} {'lr':>8} {'seed':>5} {'memorize':>9} {'grok 95%':>9} {'grok':>7} "
          f"{'wall s':>7} {'speedup':>8}")
    for r in records:
        b = base.get((r["task"], r["seed"]))
        if b is None or r["grok_step"] is None:  # no reference, or this run never grokked: no ratio to give
            speed_txt = "-"
        else:  # '+': the AdamW run never grokked, so the true ratio is larger
            speed_txt = f"{steps_or_max([b])[0] / r['grok_step']:.2f}x" + ("+" if b["grok_step"] is None else "")
        mem = r["memorize_step"] if r["memorize_step"] is not None else f">{r['steps_run']}"
        g95 = r["grok_step_95"] if r["grok_step_95"] is not None else f">{r['steps_run']}"
        print(f"{r['task']:<8} {r['optimizer']:<9} {r['lr']:>8g} {r['seed']:>5} {mem!s:>9} {g95!s:>9} "
              f"{fmt_step(r):>7} {r['wall_s']:>7.1f} {speed_txt:>8}")
    print("speedup: AdamW grok step / this run's grok step, same task and seed ('+': AdamW censored, a lower bound); "
          "*: gave up at give_up_at (still near chance), counted as censored")


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
          f"'>=': {base}'s median is censored, so the speedup is a lower bound)")


# -----------------------------------------------------------------------------
# plots

COLORS = {"adamw": "tab:blue", "muon": "tab:red"}


def plot_curves(records, path):
    """The classic grokking picture, one panel per task (first seed): train (dashed) and val (solid)
    accuracy vs step on a log axis, both optimizers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = list(dict.fromkeys(r["task"] for r in records))
    seed = records[0]["seed"]
    cols = min(len(tasks), 4)
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
    for ax, t in zip(axes.flat, tasks):
        for r in records:
            if r["task"] != t or r["seed"] != seed:
                continue
            c, s = COLORS.get(r["optimizer"], None), [max(x, 1) for x in r["curve"]["step"]]
            ax.plot(s, r["curve"]["train_acc"], "--", color=c, alpha=0.8, label=f"{r['optimizer']} train")
            ax.plot(s, r["curve"]["val_acc"], "-", color=c, label=f"{r['optimizer']} val (grok {fmt_step(r)})")
            if r["grok_step"]:
                ax.axvline(r["grok_step"], color=c, lw=0.8, alpha=0.5)
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{t} mod {records[0]['p']}, train_frac {records[0]['train_frac']}, seed {seed}")
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


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


def main(cfg):
    """The study: for each task, (fair tuning on tune_seeds, then) every optimizer on every seed.
    Returns what it writes to results.json."""
    task_names = list(TASKS) if cfg["task"] == "all" else parse_list(cfg["task"], str, "task")
    for t in task_names:
        make_dataset(t, cfg["p"])  # fails early and clearly on an unknown task or a non-prime p for div
    opt_names = parse_list(cfg["optimizers"], str, "optimizers")
    for o in opt_names:
        if o not in ("adamw", "muon"):
            raise ValueError(f"unknown optimizer {o!r} in --optimizers; choose from adamw,muon")
    seed_list = parse_list(cfg["seeds"], int, "seeds")
    tune_seed_list = parse_list(cfg["tune_seeds"], int, "tune_seeds")
    if not opt_names or not seed_list:
        raise ValueError("need at least one optimizer (--optimizers=adamw,muon) and one seed (--seeds=0)")
    grids = tuning_grids(cfg, opt_names)
    if any(grids.values()) and not tune_seed_list:
        raise ValueError("tuning grids given but no --tune_seeds; give seeds disjoint from --seeds, e.g. --tune_seeds=100")
    if set(tune_seed_list) & set(seed_list):
        raise ValueError(f"--tune_seeds {sorted(set(tune_seed_list) & set(seed_list))} overlap --seeds: tuning "
                         "and reporting on the same seeds is not a fair comparison; use disjoint sets")
    if cfg["eval_every"] < 1 or cfg["max_steps"] < 1 or cfg["batch_size"] < 1:
        raise ValueError("eval_every, max_steps and batch_size must be >= 1")
    parse_betas(cfg["betas_adamw"], "betas_adamw")
    if not 0 <= cfg["normuon"] < 1:
        raise ValueError(f"normuon={cfg['normuon']}: NorMuon's beta2 must be in [0, 1) (0.0: off), e.g. 0.95")
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    os.makedirs(cfg["out_dir"], exist_ok=True)
    print(f"device={resolve_device(cfg['device'])} threads={torch.get_num_threads()} jobs={cfg['jobs']} "
          f"tasks={','.join(task_names)} p={cfg['p']} train_frac={cfg['train_frac']} seeds={seed_list} "
          f"source_hash={SOURCE_HASH}")
    n_params = TinyTransformer(model_config(cfg)).num_params()
    print(f"model: {cfg['n_layer']} layers, d_model {cfg['d_model']}, {n_params:,} parameters")

    records, tuned = [], {}
    configs = {o: grid_configs(grids[o], cfg["tune_design"], star_center(cfg, o, grids[o])) for o in opt_names}
    tuning = bool(tune_seed_list and any(grids.values()))
    if tuning:
        print("fair tuning on seeds " + str(tune_seed_list) + ": " + "; ".join(
            f"{o} {len(configs[o])} configuration(s)" + (f" ({cfg['tune_design']}: {', '.join(f'{k} {len(v)}' for k, v in grids[o].items())})"
                                                         if grids[o] else " (its defaults)") for o in opt_names))
    all_specs = []
    pool = mp.get_context("spawn").Pool(cfg["jobs"]) if cfg["jobs"] > 1 else None
    try:
        for t in task_names:  # task by task, so that an interrupted study still has complete tasks
            if tuning:  # fair tuning: choose each optimizer's settings on tune_seeds only
                owner = [(o, i, s) for o in opt_names for i in range(len(configs[o])) for s in tune_seed_list]
                specs = [config_spec(cfg, t, o, configs[o][i], s, "tune") for o, i, s in owner]
                all_specs += specs
                tune_records = run_many(cfg, specs, f"tuning {t}", pool)
                records += tune_records
                for o in opt_names:
                    per_config = [[r for (oo, ii, _), r in zip(owner, tune_records) if (oo, ii) == (o, i)]
                                  for i in range(len(configs[o]))]
                    tuned[(t, o)] = pick_config(per_config, t, o, configs[o], grids[o], tune_seed_list)
            specs = [config_spec(cfg, t, o, tuned[(t, o)]["values"] if (t, o) in tuned else {}, s, "eval")
                     for s in seed_list for o in opt_names]
            all_specs += specs
            records += run_many(cfg, specs, f"runs {t}", pool)
    except KeyboardInterrupt:
        if pool is not None:
            pool.terminate()
        print("\ninterrupted: checkpoints saved; writing the results of the finished runs")
        done = [r for s in all_specs if (r := cached_run(cfg, s, phase=s[4])[0]) is not None]
        write_results(cfg, done, task_names, opt_names, tuned, interrupted=True)
        raise SystemExit(130)
    finally:
        if pool is not None:
            pool.close()
    return write_results(cfg, records, task_names, opt_names, tuned)


# -----------------------------------------------------------------------------
# fair tuning: grids

def parse_grid(text, opt_name, defaults):
    """'name=v1,v2;name=v1' -> {name: [values]} (in the order written, typed like the constant).
    A name must be a constant that changes this optimizer's run and is not one that defines the
    task or the measurement (NOT_TUNABLE); the LR is lr_adamw for adamw and lr_muon for muon."""
    flag = f"tune_grid_{opt_name}"
    allowed = [k for k in defaults if (k not in NOT_RUN_SETTINGS or k == LR_KEY[opt_name]) and k not in NOT_TUNABLE
               and not (opt_name == "adamw" and k in MUON_ONLY)]
    grid = {}
    for part in (q.strip() for q in str(text).split(";")):
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"--{flag}: {part!r} is not name=v1,v2,...; e.g. --{flag}=\"{LR_KEY[opt_name]}=1e-3,3e-3\"")
        name, values = (x.strip() for x in part.split("=", 1))
        if name not in allowed:
            why = ("it defines the task or the measurement, or holds a comma" if name in NOT_TUNABLE else
                   f"it does not change a {opt_name} run" if name in defaults else "no such setting")
            raise ValueError(f"--{flag}: cannot tune {name!r} ({why}); tunable for {opt_name}: {', '.join(allowed)}")
        if name in grid:
            raise ValueError(f"--{flag}: {name} appears twice; give one list per setting")
        try:
            vals = [parse_overrides([f"--{name}={v.strip()}"], defaults)[name] for v in values.split(",") if v.strip()]
        except SystemExit as e:
            raise ValueError(f"--{flag}: {e}") from None
        if not vals or len(set(vals)) != len(vals):
            raise ValueError(f"--{flag}: {name}={values!r} needs one or more distinct values")
        grid[name] = vals
    return grid


def tuning_grids(cfg, opt_names):
    """{optimizer: grid} from tune_grid_<opt> (or its shorthand tune_lrs_<opt>); an optimizer without
    a grid runs its defaults. Every optimizer must get as many configurations (the same tuning
    budget), unless tune_unequal_ok."""
    defaults = {k: cfg[k] for k in CONFIG_KEYS if k in cfg}
    grids = {}
    for o in opt_names:
        if cfg[f"tune_grid_{o}"] and cfg[f"tune_lrs_{o}"]:
            raise ValueError(f"give --tune_grid_{o} or its shorthand --tune_lrs_{o}, not both "
                             f"(put the LRs in the grid: {LR_KEY[o]}=...)")
        text = cfg[f"tune_grid_{o}"] or (f"{LR_KEY[o]}={cfg[f'tune_lrs_{o}']}" if cfg[f"tune_lrs_{o}"] else "")
        grids[o] = parse_grid(text, o, defaults)
    if cfg["tune_design"] not in ("product", "star"):
        raise ValueError(f"--tune_design={cfg['tune_design']!r}: choose product or star")
    counts = {o: len(grid_configs(grids[o], cfg["tune_design"], star_center(cfg, o, grids[o]))) for o in opt_names}
    if any(grids.values()) and len(set(counts.values())) > 1 and not cfg["tune_unequal_ok"]:
        sep = " x " if cfg["tune_design"] == "product" else " + "
        sizes = "; ".join(f"{o} {counts[o]}" + (f" ({sep.join(str(len(v)) for v in grids[o].values())})"
                                                if grids[o] else " (no grid: its defaults)") for o in opt_names)
        raise ValueError(f"unequal tuning budgets: {sizes} configurations; a fair comparison tries as many per "
                         "optimizer (e.g. adamw lr 4 x wd 2 = 8 and muon lr 2 x wd 2 x aux lr 2 = 8); change the "
                         "grids, or pass --tune_unequal_ok=True to run anyway")
    return grids


def star_center(cfg, opt_name, grid):
    """The star design's center: each tuned setting at its constant's current value (--name=value
    moves it). Each list must hold it, so that every axis is tried on both sides of one point."""
    center = {k: cfg[k] for k in grid}
    if cfg["tune_design"] == "star":
        for k, vals in grid.items():
            if center[k] not in vals:
                raise ValueError(f"--tune_grid_{opt_name}: a star design varies one setting at a time around the "
                                 f"current values, so {k}'s list must hold its current value {center[k]} (add it, "
                                 f"or move the center with --{k}=<a listed value>)")
    return center


def grid_configs(grid, design="product", center=None):
    """A grid's configurations as dicts. product: every combination, first axis slowest; star: the
    center, then each setting's other values one at a time (the others at the center). [{}] for an
    empty grid."""
    if design == "product" or not grid:
        return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    return [dict(center)] + [dict(center, **{k: v}) for k, vals in grid.items() for v in vals if v != center[k]]


def config_spec(cfg, t, o, values, seed, phase):
    """The run spec of one configuration: (task, optimizer, lr, seed, phase, extra settings)."""
    lr = values.get(LR_KEY[o], cfg[LR_KEY[o]])
    return (t, o, lr, seed, phase, tuple((k, v) for k, v in values.items() if k != LR_KEY[o]))


def grid_edges(values, grid):
    """The tuned numeric settings whose winning value is the lowest or highest of its list (of 2+):
    the optimum may lie outside the grid."""
    edges = []
    for k, vals in grid.items():
        if len(vals) < 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            continue
        if values[k] in (min(vals), max(vals)):
            edges.append(dict(name=k, value=values[k], side="low" if values[k] == min(vals) else "high",
                              grid=vals))
    return edges


def pick_config(per_config, t, o, configs, grid, tune_seed_list):
    """Fair tuning: the configuration with the lowest mean grok step on the tuning seeds (censored
    at max_steps); ties (e.g. all censored) go to the higher mean final val acc, then the first in
    grid order. per_config[i]: the tuning records of configs[i]. Returns the winner's values, the
    settings at the edge of their list, and every configuration's score."""
    scores = []
    for c, rs in zip(configs, per_config):
        steps = steps_or_max(rs)
        scores.append(dict(values=c, steps=steps, mean_grok_step=statistics.mean(steps),
                           mean_final_val_acc=statistics.mean(r["final_val_acc"] for r in rs)))
    best = min(range(len(configs)), key=lambda i: (scores[i]["mean_grok_step"], -scores[i]["mean_final_val_acc"], i))
    values = configs[best]
    edges = grid_edges(values, grid)
    print(f"tuning {t:<8} {o:<6} on seeds {tune_seed_list} (mean grok step, censored at max_steps; final val acc):")
    for i, sc in enumerate(scores):
        desc = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sc["values"].items())
        print(f"  {'->' if i == best else '  '} {desc or 'defaults'}: {sc['mean_grok_step']:g} "
              f"({sc['mean_final_val_acc']:.3f}) steps {sc['steps']}")
    for e in edges:
        print(f"  at the edge: extend the grid ({t}/{o}: {e['name']}={e['value']:g} is the {'lowest' if e['side'] == 'low' else 'highest'} "
              f"of {','.join(f'{v:g}' for v in e['grid'])})")
    return dict(values=values, at_edge=edges, n_configs=len(configs), tune_seeds=tune_seed_list, scores=scores)


def write_results(cfg, records, task_names, opt_names, tuned, interrupted=False):
    eval_records = [r for r in records if r["phase"] == "eval"]
    if eval_records:
        print_run_table(eval_records, opt_names)
    summary = summarize(eval_records, task_names, opt_names) if eval_records else {}
    study = len(task_names) > 1 or len({r["seed"] for r in eval_records}) > 1
    if study and eval_records:
        print_study_table(summary, opt_names)
    for (t, o), w in tuned.items():
        desc = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in w["values"].items())
        edge = "; at the edge: extend the grid (" + ", ".join(e["name"] for e in w["at_edge"]) + ")" if w["at_edge"] else ""
        print(f"tuned {t}/{o} ({w['n_configs']} configuration(s), seeds {w['tune_seeds']}): {desc or 'defaults'}{edge}")
    out = dict(config=cfg, source_hash=SOURCE_HASH, interrupted=interrupted,
               tuned_lr={f"{t}/{o}": w["values"].get(LR_KEY[o], cfg[LR_KEY[o]]) for (t, o), w in tuned.items()},
               tuned={f"{t}/{o}": w for (t, o), w in tuned.items()},
               tuning_edges=[dict(task=t, optimizer=o, **e) for (t, o), w in tuned.items() for e in w["at_edge"]],
               summary=summary,
               runs=[{k: v for k, v in r.items() if k != "curve"} for r in records])
    path = os.path.join(cfg["out_dir"], "results.json")
    atomic_write_json(out, path)
    print(f"\nwrote {path} (per-run curves in {cfg['out_dir']}/runs/, checkpoints in {cfg['out_dir']}/ckpt/)")
    if eval_records:
        plot_curves(eval_records, os.path.join(cfg["out_dir"], "grokking.png"))
        print(f"wrote {cfg['out_dir']}/grokking.png")
        if study:
            plot_study(eval_records, opt_names, os.path.join(cfg["out_dir"], "grokking_study.png"))
            print(f"wrote {cfg['out_dir']}/grokking_study.png")
    return out


if __name__ == "__main__":
    config = parse_overrides(sys.argv[1:], {k: globals()[k] for k in CONFIG_KEYS})
    try:
        main(config)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
