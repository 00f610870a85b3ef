"""
train_grokking.py -- grokking on modular arithmetic: AdamW vs Muon on one task and one seed, from the same
initialization and batches, at each optimizer's fair-study winner on div (tuned on seed 100, results/grokking.md).
A run trains until val accuracy reaches `threshold` ("grokked") or is censored at max_steps. Outputs in out_dir:
results.json, runs/<run>.json (record, run identity, curves), ckpt/<run>.pt (also on Ctrl-C), grokking.png.
Studies (tasks x seeds, tuning, statistics) are study_grokking.py. Override any constant as --name=value.
"""
import hashlib
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import model_tiny
import muon_optim
from muon_optim import Muon

# -----------------------------------------------------------------------------
# config (override with --name=value)
task = "div"  # add | sub | mul | div | x2y2 | x2xyy2 | x3xy
p = 97  # the modulus (prime for div)
train_frac = 0.5  # fraction of all (x, y) pairs used for training; the rest is validation
optimizers = "adamw,muon"  # the runs to compare: adamw, muon or both
seed = 0  # fixes the split, the initialization and the batch order (the same for every optimizer)
max_steps = 3000
batch_size = 1024  # 512 before the speed study (results/grokking_tuning.md): Muon groks in fewer steps at 1024
eval_every = 20  # full train + val evaluation every this many steps (the grok-step resolution)
threshold = 0.99  # memorized: train acc >= threshold; grokked: val acc >= threshold (0.95 also recorded)
stop_on_grok = True  # end a run at its grok step (saves compute in studies)
give_up_at = 500  # a run still below max(10%, 2/p) train accuracy here has stalled: stop, censored. 0: never
warmup_steps = 10  # linear LR warmup, as in Power et al.
# the AdamW run: hidden matrices at lr_adamw, the rest at lr_adamw_aux (as the Muon run's AdamW groups at
# lr_muon_aux). LRs and decays: the fair-study winners on div (results/grokking_fair2/results.json)
lr_adamw = 3e-3  # the fair study's AdamW winner on div
lr_adamw_aux = 2e-2  # the AdamW run's lr for embeddings, head, norms and biases (fair-study winner on div)
betas_adamw = "0.9,0.98"  # (Power et al.) also for the Muon run's AdamW groups
eps_adamw = 1e-8
weight_decay = 1.0  # AdamW decoupled weight decay, both runs' AdamW groups (fair-study winner on div)
# the Muon run: Muon on the hidden matrices (attention and MLP weights), AdamW on the rest
lr_muon = 0.1  # the fair study's Muon winner on div (momentum 0.85 and batch 1024: tuning seeds 100-102)
momentum_muon = 0.85
weight_decay_muon = 0.25  # Muon's decoupled weight decay W <- W * (1 - lr_muon * weight_decay_muon) (fair study)
ns_method = "newton_schulz"  # newton_schulz | polar_express | gram_newton_schulz
normuon = 0.0  # NorMuon's beta2 for per-neuron normalization of the Muon update (e.g. 0.95); 0.0: off
lr_muon_aux = 2e-2  # the Muon run's AdamW lr for embeddings, head, norms and biases (fair-study winner on div)
# model
n_layer = 2
d_model = 128
n_head = 4
d_mlp = 512
prenorm = False
# system
threads = 0  # torch threads; 0: all cores
save_checkpoint = True  # ckpt/<run>.pt at the end of each run and on Ctrl-C
out_dir = "out/grokking"
device = "auto"  # auto | cpu | cuda
# -----------------------------------------------------------------------------
CONFIG_KEYS = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
# not a run's settings (the compute dtype is); an AdamW run also leaves out MUON_ONLY, a Muon run ADAMW_ONLY
NOT_RUN_SETTINGS = ("task", "optimizers", "seed", "lr_adamw", "lr_muon", "threads", "save_checkpoint", "out_dir",
                    "device")
LR_KEY = {"adamw": "lr_adamw", "muon": "lr_muon"}  # the constant that is a run's `lr`
SOURCE_FILES = (os.path.abspath(__file__), model_tiny.__file__, muon_optim.__file__)  # the code a run executes
TASKS = {  # name -> the answer as a function of integer tensors x, y and the modulus p
    "add": lambda x, y, p: (x + y) % p, "sub": lambda x, y, p: (x - y) % p, "mul": lambda x, y, p: (x * y) % p,
    "div": lambda x, y, p: (x * modular_inverse(y, p)) % p, "x2y2": lambda x, y, p: (x * x + y * y) % p,
    "x2xyy2": lambda x, y, p: (x * x + x * y + y * y) % p, "x3xy": lambda x, y, p: (x * x * x + x * y) % p}

# -----------------------------------------------------------------------------
# pasted helpers (identical in every script, see tests/test_consistency.py)

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


SOURCE_HASH = source_hash(*SOURCE_FILES)  # of the code this process runs
MUON_ONLY = ("lr_muon_aux", "momentum_muon", "weight_decay_muon", "ns_method", "normuon")  # not in an AdamW run
ADAMW_ONLY = ("lr_adamw_aux",)  # not in a Muon run
# tuned against tuned needs every setting that shapes the runs at its default; these may move
FREE_OF_TUNING = ("optimizers", "seed", "max_steps", "stop_on_grok", "threads", "save_checkpoint", "out_dir", "device")
TUNED_NOTE = "both optimizers at their div winners tuned on seed 100 (results/grokking.md)"


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


# ---- data: every pair (x, y), input `x op y =`, target the answer class

def modular_inverse(y, p):
    """y^(p-2) mod p (Fermat), elementwise on an integer tensor; valid for prime p and y != 0."""
    return torch.tensor([pow(int(v), p - 2, p) if v else 0 for v in range(p)])[y]


def make_dataset(task_name, p):
    """All pairs: X (N, 4) tokens [x, op=p, y, '='=p+1], Y (N,) in [0, p); N = p^2, or p(p-1) for div (y != 0)."""
    if task_name not in TASKS:
        raise ValueError(f"unknown task {task_name!r}; choose one of {', '.join(TASKS)}")
    if task_name == "div" and not all(p % k for k in range(2, math.isqrt(p) + 1)):
        raise ValueError(f"task 'div' needs a prime p (y must have an inverse mod p), got p={p}; try p=97")
    x, y = torch.arange(p).repeat_interleave(p), torch.arange(p).repeat(p)
    if task_name == "div":
        x, y = x[y != 0], y[y != 0]
    answer = TASKS[task_name](x, y, p)
    X = torch.stack([x, torch.full_like(x, p), y, torch.full_like(x, p + 1)], dim=1)
    return X, answer


def split_indices(n, train_frac, seed):
    """A random disjoint train/val split of range(n), fixed by the seed."""
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


def model_config(cfg):
    keys = ("n_layer", "d_model", "n_head", "d_mlp", "prenorm")
    return model_tiny.TinyConfig(vocab_size=cfg["p"] + 2, n_classes=cfg["p"], **{k: cfg[k] for k in keys})


def make_optimizer(opt_name, model, cfg, lr):
    """The hidden matrices (attention, MLP) at `lr` with AdamW or Muon; the rest (embeddings, head, gains, biases:
    not for Muon) in the same AdamW group in both runs, at that run's aux LR: the runs differ in one optimizer."""
    betas = tuple(float(b) for b in cfg["betas_adamw"].split(","))
    hidden = [p for block in model.blocks for p in block.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if not any(p is h for h in hidden)]  # embeddings, head, gains, biases
    aux = dict(params=rest, lr=cfg["lr_adamw_aux" if opt_name == "adamw" else "lr_muon_aux"], betas=betas,
               eps=cfg["eps_adamw"], weight_decay=cfg["weight_decay"])
    if opt_name == "adamw":
        return torch.optim.AdamW([dict(params=hidden, lr=lr), aux], lr=lr, betas=betas, eps=cfg["eps_adamw"],
                                 weight_decay=cfg["weight_decay"])
    return Muon([dict(params=hidden, use_muon=True, lr=lr, momentum=cfg["momentum_muon"],
                      weight_decay=cfg["weight_decay_muon"], ns_method=cfg["ns_method"],
                      normuon=cfg["normuon"] or None), dict(aux, use_muon=False)], distributed=False)


@torch.no_grad()
def evaluate(model, X, Y, masks, chunk=4096):
    """Loss and accuracy on each index set, from one vectorized pass over all examples."""
    logits = torch.cat([model(c) for c in X.split(chunk)])
    loss = F.cross_entropy(logits, Y, reduction="none")
    correct = (logits.argmax(-1) == Y).float()
    stats = torch.stack([torch.stack([loss[m].mean(), correct[m].mean()]) for m in masks])
    return stats.tolist()  # the one host sync per evaluation


def resolve_device(name):
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def run_settings(cfg, opt_name):
    """Every setting that determines the run (all but NOT_RUN_SETTINGS) and the compute dtype muon_optim picks."""
    skip = NOT_RUN_SETTINGS + (MUON_ONLY if opt_name == "adamw" else ADAMW_ONLY)
    return dict({k: v for k, v in cfg.items() if k not in skip}, task=cfg["task"], optimizer=opt_name,
                lr=cfg[LR_KEY[opt_name]], seed=cfg["seed"],
                compute_dtype=muon_optim.compute_dtype_rule(resolve_device(cfg["device"])))


def tuning_note(cfg):
    """Whether the printed ratio is tuned against tuned (the defaults, FREE_OF_TUNING aside), else what moved."""
    moved = [k for k in CONFIG_KEYS if k not in FREE_OF_TUNING and cfg[k] != globals()[k]]
    return TUNED_NOTE if not moved else (f"not the tuned defaults ({', '.join(moved)} changed); the defaults are "
                                         "both optimizers' div winners, tuned on seed 100 (results/grokking.md)")


def train_run(cfg, opt_name, show_bar=True):
    """Train one model; its record (with curves) is returned and written to runs/<name>.json. Ctrl-C: checkpoint."""
    dev, seed, lr = resolve_device(cfg["device"]), cfg["seed"], cfg[LR_KEY[opt_name]]
    torch.set_flush_denormal(True)  # CPU: subnormal floats late in long runs slow float math; flush them to 0
    X, Y = make_dataset(cfg["task"], cfg["p"])
    train_idx, val_idx = split_indices(len(X), cfg["train_frac"], seed)
    masks = [torch.isin(torch.arange(len(X)), idx) for idx in (train_idx, val_idx)]
    X, Y, masks = X.to(dev), Y.to(dev), [m.to(dev) for m in masks]
    Xtr, Ytr = X[train_idx.to(dev)], Y[train_idx.to(dev)]
    torch.manual_seed(seed)  # same initial weights for every optimizer
    model = model_tiny.TinyTransformer(model_config(cfg)).to(dev)
    opt = make_optimizer(opt_name, model, cfg, lr)
    base_lrs = [g["lr"] for g in opt.param_groups]
    batches = batch_sequence(len(train_idx), cfg["batch_size"], seed)
    name, settings = f"{cfg['task']}_{opt_name}_lr{lr:g}_seed{seed}", run_settings(cfg, opt_name)
    curve = dict(step=[], train_loss=[], train_acc=[], val_loss=[], val_acc=[])
    marks = dict(memorize_step=None, grok_step=None, grok_step_95=None)
    step, t0, gave_up, diverged = 0, time.perf_counter(), False, False
    bar = tqdm(total=cfg["max_steps"], desc=f"{name:<32}", disable=not show_bar, leave=True, dynamic_ncols=True)
    try:
        model.train()
        while True:
            if step % cfg["eval_every"] == 0 or step == cfg["max_steps"]:  # step 0, every eval_every, the last
                (trl, tra), (val, vaa) = evaluate(model, X, Y, masks)
                diverged = not math.isfinite(trl)  # a NaN/inf loss never recovers: a failed run, censored
                for k, v in zip(curve, (step, trl, tra, val, vaa)):
                    curve[k].append(v)
                for mark, acc, level in (("memorize_step", tra, cfg["threshold"]), ("grok_step_95", vaa, 0.95),
                                         ("grok_step", vaa, cfg["threshold"])):
                    if marks[mark] is None and acc >= level:
                        marks[mark] = step
                bar.set_postfix(train=f"{tra:.3f}", val=f"{vaa:.3f}", refresh=False)
                if diverged or step == cfg["max_steps"] or (cfg["stop_on_grok"] and marks["grok_step"] is not None):
                    break
                give_up = 0 < cfg["give_up_at"] <= step < cfg["give_up_at"] + cfg["eval_every"]
                if give_up and tra < max(0.1, 2 / cfg["p"]):
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
                             identity=run_identity(settings, SOURCE_HASH, ""), source_hash=SOURCE_HASH),
                        os.path.join(cfg["out_dir"], "ckpt", name + ".pt"))
    final = {f"final_{k}": curve[k][-1] for k in ("train_loss", "train_acc", "val_loss", "val_acc")}
    record = dict(name=name, task=cfg["task"], p=cfg["p"], train_frac=cfg["train_frac"], optimizer=opt_name, lr=lr,
                  hparams={LR_KEY[opt_name]: lr}, seed=seed, phase="eval", **marks,
                  censored=marks["grok_step"] is None, gave_up=gave_up, diverged=diverged, steps_run=step,
                  max_steps=cfg["max_steps"], **final, wall_s=round(wall_s, 2), n_params=model.num_params(),
                  settings=settings, source_hash=SOURCE_HASH, identity=run_identity(settings, SOURCE_HASH, ""),
                  source_files=[os.path.basename(f) for f in SOURCE_FILES], curve=curve)
    os.makedirs(os.path.join(cfg["out_dir"], "runs"), exist_ok=True)
    atomic_write_json(record, os.path.join(cfg["out_dir"], "runs", name + ".json"))
    return record


def fmt_step(r):
    """The grok step, or >max_steps if censored (*: gave up at give_up_at, near chance; !: diverged)."""
    if r["grok_step"] is not None:
        return str(r["grok_step"])
    return f">{r['max_steps']}" + ("*" if r.get("gave_up") else "") + ("!" if r.get("diverged") else "")


def print_run_table(records):
    """Per run: memorize, grok 95% and grok steps; speedup = the first run's (AdamW's) grok step / this run's."""
    b = records[0]
    print(f"\n{'task':<8} {'optimizer':<9} {'lr':>8} {'seed':>5} {'memorize':>9} {'grok 95%':>9} {'grok':>7} "
          f"{'wall s':>7} {'speedup':>8}")
    for r in records:
        base_step = b["grok_step"] if b["grok_step"] is not None else b["max_steps"]
        speed_txt = "-" if r["grok_step"] is None else (f"{base_step / r['grok_step']:.2f}x"
                                                        + ("+" if b["grok_step"] is None else ""))
        mem, g95 = (r[k] if r[k] is not None else f">{r['steps_run']}" for k in ("memorize_step", "grok_step_95"))
        print(f"{r['task']:<8} {r['optimizer']:<9} {r['lr']:>8g} {r['seed']:>5} {mem!s:>9} {g95!s:>9} "
              f"{fmt_step(r):>7} {r['wall_s']:>7.1f} {speed_txt:>8}")
    print("speedup: AdamW grok step / this run's, same task and seed ('+': AdamW censored, a lower bound); "
          "*: gave up at give_up_at, !: diverged (non-finite loss), both censored")


def plot_curves(records, path):
    """The classic grokking picture: train (dashed) and val (solid) accuracy vs step on a log axis."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.add_subplot()
    for r in records:
        c, s = {"adamw": "tab:blue", "muon": "tab:red"}[r["optimizer"]], [max(x, 1) for x in r["curve"]["step"]]
        ax.plot(s, r["curve"]["train_acc"], "--", color=c, alpha=0.8, label=f"{r['optimizer']} train")
        ax.plot(s, r["curve"]["val_acc"], "-", color=c, label=f"{r['optimizer']} val (grok {fmt_step(r)})")
        if r["grok_step"]:
            ax.axvline(r["grok_step"], color=c, lw=0.8, alpha=0.5)
    r = records[0]
    ax.set(xscale="log", ylim=(-0.02, 1.02), xlabel="step", ylabel="accuracy",
           title=f"{r['task']} mod {r['p']}, train_frac {r['train_frac']}, seed {r['seed']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


# -----------------------------------------------------------------------------

def main(cfg):
    """One comparison: each optimizer on the same task, split, initialization and batches; returns results.json."""
    check_settings(cfg)
    make_dataset(cfg["task"], cfg["p"])  # an unknown task or a non-prime p for div: one line, before training
    opt_names = [o.strip() for o in cfg["optimizers"].split(",") if o.strip()]
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    os.makedirs(cfg["out_dir"], exist_ok=True)
    print(f"device={resolve_device(cfg['device'])} threads={torch.get_num_threads()} task={cfg['task']} p={cfg['p']} "
          f"train_frac={cfg['train_frac']} seed={cfg['seed']} source_hash={SOURCE_HASH}")
    n_params = model_tiny.TinyTransformer(model_config(cfg)).num_params()
    print(f"model: {cfg['n_layer']} layers, d_model {cfg['d_model']}, {n_params:,} parameters\n{tuning_note(cfg)}")
    records, interrupted = [], False
    try:
        for o in opt_names:
            records.append(train_run(cfg, o))
    except KeyboardInterrupt:  # the finished runs are reported; the interrupted one left its checkpoint
        interrupted = True
        print("\ninterrupted: " + ("checkpoint saved; " if cfg["save_checkpoint"] else "") + "writing the results")
    if records:
        print_run_table(records)
    out = dict(config=cfg, source_hash=SOURCE_HASH, interrupted=interrupted,
               runs=[{k: v for k, v in r.items() if k != "curve"} for r in records])
    atomic_write_json(out, os.path.join(cfg["out_dir"], "results.json"))
    print(f"\nwrote {cfg['out_dir']}/results.json (per-run curves in {cfg['out_dir']}/runs/"
          + (f", checkpoints in {cfg['out_dir']}/ckpt/)" if cfg["save_checkpoint"] else ")"))
    if records:
        plot_curves(records, os.path.join(cfg["out_dir"], "grokking.png"))
        print(f"wrote {cfg['out_dir']}/grokking.png")
    if interrupted:
        raise SystemExit(130)
    return out


if __name__ == "__main__":
    config = parse_overrides(sys.argv[1:], {k: globals()[k] for k in CONFIG_KEYS})
    try:
        main(config)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
