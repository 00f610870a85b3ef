"""
train_muon.py -- train a GPT (model_keller.py) on token shards with Muon, and compare it with AdamW.

    python prepare_fineweb.py                                    # FineWeb-Edu shards -> data/fineweb_edu
    python train_muon.py                                         # 1 GPU, 124M model, Muon
    python train_muon.py --optimizers=muon,adamw                 # both, same init, same batches, one plot
    torchrun --standalone --nproc_per_node=8 train_muon.py       # 8 GPUs (NCCL); on CPU it uses gloo
    python train_muon.py --resume=1                              # continue from out_dir/ckpt.pt

Every constant below can be overridden as --name=value. `optimizers` is a comma list of "muon" and
"adamw", each optionally with a learning rate, e.g. "muon:0.03,adamw:2e-3" (muon:LR sets the Muon lr
of the hidden matrices; its Adam groups keep head_lr/embed_lr/scalar_lr). All runs start from the
same weights and see the same batches, in lock step.

Outputs in out_dir: metrics.json (every train and eval point of every run), loss.png (train and
validation curves), ckpt.pt (model, optimizer, step, data position, RNG state, config; atomic).
"""
import math
import os
import signal
import sys
import time
from ast import literal_eval
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from model_keller import GPT, GPTConfig

# -----------------------------------------------------------------------------
# Constants (nanoGPT style): edit here or override as --name=value
# data (shards from prepare_fineweb.py)
data_dir = "data/fineweb_edu"
train_files = "fineweb_train_*.bin"
val_files = "fineweb_val_*.bin"
vocab_top = 0  # 0: tokens as they are; N: keep the N-1 most frequent train tokens, map the rest to id N-1 and
# set vocab_size=N (a CPU-recipe shortcut, as in train_ngpt.py: in a tiny model the 50k-way head is most of the step)
# model (GPT-2 small class, 124M)
vocab_size = 50304
block_size = 1024
n_layer = 12
n_head = 6
n_embd = 768
# batch: batch_size x block_size tokens per micro-step, grad_accum_steps micro-steps per step in total
# (divided among DDP ranks): 8 x 1024 x 8 = 65,536 tokens per step; fits a 16 GB GPU
batch_size = 8
grad_accum_steps = 8
# optimizers and schedule
optimizers = "muon"  # comma list of muon / adamw, each optionally :lr
max_steps = 6000
warmup_steps = 100  # linear warmup ...
cooldown_frac = 0.4  # ... constant, then linear cooldown to min_lr_frac over the last 40% (WSD)
min_lr_frac = 0.0
muon_lr = 0.05  # Muon on the hidden matrices
muon_momentum = 0.95
muon_momentum_warmup = 300  # Muon momentum 0.85 -> muon_momentum over the first steps
head_lr = 0.008  # the Adam groups that go with Muon (betas (0.8, 0.95), eps 1e-10)
embed_lr = 0.6
scalar_lr = 0.04
adamw_lr = 1.5e-3  # the AdamW baseline (betas (0.9, 0.95)), weight decay on matrices
weight_decay = 0.1
grad_clip = 0.0  # clip the global grad norm (0 = off)
# evaluation, logging, checkpoints
eval_every = 250
eval_tokens = 10 * 65536  # a fixed slice from the start of the val shard
log_every = 10
ckpt_every = 1000  # 0 = only at the end and on Ctrl-C
stop_after_steps = 0  # > 0: checkpoint and exit after this many steps (job time limits); --resume=1 continues
resume = 0
out_dir = "out/muon"
# system
device = "auto"  # auto = cuda if available, else cpu
compile = True  # torch.compile (CUDA only; ignored on CPU)
num_threads = 0  # CPU threads for torch (0 = torch's default)
seed = 1337
compare = ""  # comma list of out_dirs: skip training, merge their metrics.json (e.g. sweeps run as separate jobs)
# -----------------------------------------------------------------------------
CONFIG = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, str))}

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256  # llm.c shard header
# settings a resumed run must share with its checkpoint (others, e.g. eval_every or out_dir, may change)
RESUME_MUST_MATCH = ("data_dir", "train_files", "vocab_top", "vocab_size", "block_size", "n_layer", "n_head", "n_embd",
                     "batch_size", "grad_accum_steps", "optimizers", "seed")


def parse_overrides(argv, defaults):
    """--name=value overrides (Python literals; strings may be bare). Unknown names and wrong types fail."""
    config = dict(defaults)
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"bad argument {arg!r}: use --name=value (names: {', '.join(config)})")
        key, value = arg[2:].split("=", 1)
        if key not in config:
            raise SystemExit(f"unknown setting {key!r}; known: {', '.join(config)}")
        default = config[key]
        if not isinstance(default, str):
            try:
                value = literal_eval(value)
            except (ValueError, SyntaxError):
                raise SystemExit(f"--{key}={value}: expected a {type(default).__name__}")
            if isinstance(default, float) and isinstance(value, int):
                value = float(value)
            if isinstance(default, int) and isinstance(value, float) and value.is_integer():
                value = int(value)  # --eval_tokens=1e5
            if type(value) is not type(default):
                raise SystemExit(f"--{key}={value!r}: expected a {type(default).__name__}")
        config[key] = value
    return config


def parse_optimizers(spec):
    """'muon,adamw:2e-3' -> [('muon', None), ('adamw', 0.002)]; names must be unique (add the lr)."""
    runs = []
    for item in spec.split(","):
        name, _, lr = item.strip().partition(":")
        if name not in ("muon", "adamw"):
            raise SystemExit(f"optimizers={spec!r}: unknown optimizer {name!r}; use muon and/or adamw")
        runs.append((name, float(lr) if lr else None))
    labels = [run_label(n, lr) for n, lr in runs]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"optimizers={spec!r} lists a run twice")
    return runs


def run_label(name, lr):
    return name if lr is None else f"{name}:{lr:g}"


# -----------------------------------------------------------------------------
# Data: llm.c shards, memory-mapped

def open_shard(path):
    """The tokens of one shard as a read-only uint16 memmap, after checking the header; the error says
    what is wrong (missing, truncated, not a shard) and how to fix it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard {path} does not exist; create shards with prepare_fineweb.py")
    size = os.path.getsize(path)
    if size < HEADER_INTS * 4:
        raise ValueError(f"{path} is {size} bytes, shorter than the 1024-byte shard header: truncated or not a "
                         f"token shard; delete it and rerun prepare_fineweb.py")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ValueError(f"{path} is not an llm.c token shard (magic {header[0]}, expected {MAGIC}); "
                         f"point data_dir at the output of prepare_fineweb.py")
    if header[1] != VERSION:
        raise ValueError(f"{path}: shard version {header[1]}, expected {VERSION} (uint16 tokens)")
    count = int(header[2])
    if size != HEADER_INTS * 4 + 2 * count:
        raise ValueError(f"{path}: header says {count:,} tokens ({HEADER_INTS * 4 + 2 * count:,} bytes) but the file "
                         f"has {size:,} bytes (truncated copy or interrupted write); delete it and rerun "
                         f"prepare_fineweb.py")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_INTS * 4, shape=(count,))


def find_shards(data_dir, pattern):
    import glob
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir {data_dir!r} does not exist; create shards with `python prepare_fineweb.py` "
                                f"(FineWeb-Edu) or `python prepare_fineweb.py --input='texts/*.txt' "
                                f"--out_dir={data_dir}`, or pass --data_dir=...")
    files = sorted(glob.glob(os.path.join(data_dir, pattern)))
    if not files:
        raise FileNotFoundError(f"no shards matching {pattern!r} in {data_dir!r}; prepare_fineweb.py writes "
                                f"fineweb_val_000000.bin and fineweb_train_000001.bin, ... (if only the val shard is "
                                f"there, rerun it with a smaller --shard_size)")
    return files


def build_vocab_map(shards, top):
    """Lookup table token id -> new id: the top-1 most frequent ids of the (train) shards get 0..top-2 by
    frequency, every other id maps to top-1 (so nothing is learned from the val shard)."""
    counts = np.zeros(65536, dtype=np.int64)
    for tokens in shards:
        counts += np.bincount(tokens, minlength=65536)
    keep = np.argsort(-counts, kind="stable")[:top - 1]
    table = np.full(65536, top - 1, dtype=np.int64)
    table[keep] = np.arange(top - 1)
    return table


class DataLoader:
    """The (x, y) micro-batches of one optimizer step, read in order from the shards. A step covers
    world * accum windows of B*T tokens (+1: y is x shifted by one); micro-step i of DDP rank r reads window
    i * world + r. So ranks read disjoint data, and every (world, accum) with the same product reads the
    same tokens per step: 2 ranks x 1 micro-step == 1 process x 2 micro-steps. A step that does not fit in
    the rest of a shard starts at the next shard (wrapping around after the last). The position is two
    integers (state_dict), so a resumed run continues with the very next batch."""

    def __init__(self, files, B, T, rank=0, world=1, accum=1, vocab_map=None):
        self.shards = [open_shard(f) for f in files]
        self.vocab_map = vocab_map
        self.files, self.B, self.T, self.rank, self.world, self.accum = files, B, T, rank, world, accum
        self.span = world * accum * B * T  # tokens per step, all ranks together
        if all(len(s) < self.span + 1 for s in self.shards):
            raise ValueError(f"every shard is shorter than one step of {self.span + 1:,} tokens (processes x "
                             f"grad_accum_steps x batch {B} x block {T} + 1); use a smaller batch_size/block_size "
                             f"or a larger --shard_size in prepare_fineweb.py")
        self.shard, self.pos = 0, 0

    def next_batches(self):
        """accum (x, y) pairs of shape (B, T) for this rank's share of the next step."""
        B, T = self.B, self.T
        while self.pos + self.span + 1 > len(self.shards[self.shard]):
            self.shard, self.pos = (self.shard + 1) % len(self.shards), 0
        batches = []
        for i in range(self.accum):
            start = self.pos + (i * self.world + self.rank) * B * T
            buf = self.shards[self.shard][start:start + B * T + 1].astype(np.int64)
            buf = torch.from_numpy(self.vocab_map[buf] if self.vocab_map is not None else buf)
            batches.append((buf[:-1].view(B, T), buf[1:].view(B, T)))
        self.pos += self.span
        return batches

    def state_dict(self):
        return dict(shard=self.shard, pos=self.pos)

    def load_state_dict(self, state):
        self.shard, self.pos = state["shard"], state["pos"]


# -----------------------------------------------------------------------------
# Schedules: pure functions of the step

def lr_multiplier(step, max_steps, warmup_steps, cooldown_frac, min_lr_frac=0.0):
    """WSD: linear warmup to 1, constant, then linear decay to min_lr_frac over the last cooldown_frac."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    cooldown_start = max_steps * (1 - cooldown_frac)
    if step < cooldown_start:
        return 1.0
    progress = (step - cooldown_start) / max(1.0, max_steps - cooldown_start)
    return 1.0 - (1.0 - min_lr_frac) * min(progress, 1.0)


def muon_momentum_at(step, warmup, final=0.95, start=0.85):
    """Muon's momentum rises linearly from `start` to `final` over the first `warmup` steps (modded-nanogpt):
    less momentum early, while the gradient direction changes fast."""
    return final if warmup <= 0 else start + (final - start) * min(step / warmup, 1.0)


# -----------------------------------------------------------------------------
# Checkpoints and metrics: atomic writes

def atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_json(obj, path):
    import json
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def rng_state():
    state = dict(torch=torch.get_rng_state(), numpy=np.random.get_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def first_step_reaching(val_points, target):
    """The first eval step whose val loss is <= target, or None."""
    return next((p["step"] for p in val_points if p["loss"] <= target), None)


def interpolated_step_reaching(val_points, target):
    """The step where the val curve, linearly interpolated between evals, first reaches target, or None."""
    for prev, p in zip(val_points, val_points[1:]):
        if p["loss"] <= target < prev["loss"]:
            return prev["step"] + (prev["loss"] - target) / (prev["loss"] - p["loss"]) * (p["step"] - prev["step"])
    return val_points[0]["step"] if val_points and val_points[0]["loss"] <= target else None


def plot_losses(metrics, path):
    """Train (thin) and validation (markers) loss per run against step, and validation against time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, run) in enumerate(metrics["runs"].items()):
        color = f"C{i}"
        if run["train"]:  # moving average over ~2% of the run: per-step losses of small batches are noisy
            losses = np.array([p["loss"] for p in run["train"]])
            k = max(1, len(losses) // 50)
            smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
            ax1.plot([p["step"] for p in run["train"]][k - 1:], smooth, color=color, alpha=0.35, lw=0.8)
        if run["val"]:
            ax1.plot([p["step"] for p in run["val"]], [p["loss"] for p in run["val"]], "o-", color=color, ms=3,
                     label=f"{label} (val {run['val'][-1]['loss']:.3f})")
            ax2.plot([p["time"] for p in run["val"]], [p["loss"] for p in run["val"]], "o-", color=color, ms=3, label=label)
    ax1.set(xlabel="step", ylabel="loss", title="train (thin, smoothed) and validation loss")
    ax2.set(xlabel="training time (s, excluding eval)", ylabel="validation loss", title="validation loss vs time")
    vals = [p["loss"] for r in metrics["runs"].values() for p in r["val"]]
    if vals:  # zoom on the interesting part: the first eval (ln vocab) dwarfs the rest
        lo, hi = min(vals), sorted(vals)[len(vals) // 2]
        for ax in (ax1, ax2):
            ax.set_ylim(lo - 0.1 * (hi - lo) - 0.05, hi + 0.6 * (hi - lo) + 0.1)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# -----------------------------------------------------------------------------
# Training

class StopRequest:
    """First Ctrl-C (SIGINT) or SIGTERM: finish the current step, checkpoint and exit; a second Ctrl-C
    aborts at once. Deferring to the step boundary keeps every run's model and optimizer consistent."""

    def __init__(self):
        self.requested = False
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. under some test runners)
                pass

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def evaluate(model, val_tokens, B, T, rank, world, autocast):
    """Mean loss over the fixed val slice; the B*T windows are split among ranks and averaged."""
    n_batches = (len(val_tokens) - 1) // (B * T)
    losses = []
    model.eval()
    with torch.no_grad():
        for i in range(rank, n_batches, world):
            buf = torch.from_numpy(np.asarray(val_tokens[i * B * T:(i + 1) * B * T + 1], dtype=np.int64))
            x, y = buf[:-1].view(B, T), buf[1:].view(B, T)
            with autocast:
                losses.append(model(x.to(DEVICE), y.to(DEVICE)).item())
    model.train()
    total = torch.tensor([sum(losses), len(losses)], dtype=torch.float64, device=DEVICE)
    if world > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


DEVICE = "cpu"


def train(cfg):
    """Train every run of cfg['optimizers'] in lock step; returns the metrics dict (also in metrics.json)."""
    global DEVICE
    runs_spec = parse_optimizers(cfg["optimizers"])
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        use_cuda = torch.cuda.is_available() and cfg["device"] in ("auto", "cuda")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
        DEVICE = f"cuda:{local_rank}" if use_cuda else "cpu"
        if use_cuda:
            torch.cuda.set_device(DEVICE)
    else:
        rank, world = 0, 1
        DEVICE = ("cuda" if torch.cuda.is_available() else "cpu") if cfg["device"] == "auto" else cfg["device"]
    master = rank == 0
    device_type = "cuda" if DEVICE.startswith("cuda") else "cpu"
    if cfg["num_threads"]:
        torch.set_num_threads(cfg["num_threads"])
    if cfg["grad_accum_steps"] % world:
        raise SystemExit(f"grad_accum_steps={cfg['grad_accum_steps']} must be divisible by the number of "
                         f"processes ({world})")
    accum = cfg["grad_accum_steps"] // world
    B, T = cfg["batch_size"], cfg["block_size"]
    tokens_per_step = B * T * cfg["grad_accum_steps"]
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()

    try:
        train_files = find_shards(cfg["data_dir"], cfg["train_files"])
        vocab_map = None
        if cfg["vocab_top"]:
            if not 2 <= cfg["vocab_top"] <= 65536:
                raise ValueError(f"--vocab_top={cfg['vocab_top']}: use 0 (all tokens) or a size in 2..65536")
            vocab_map = build_vocab_map([open_shard(f) for f in train_files], cfg["vocab_top"])
            cfg = dict(cfg, vocab_size=cfg["vocab_top"])
        train_loader = DataLoader(train_files, B, T, rank, world, accum, vocab_map)
        val_tokens = open_shard(find_shards(cfg["data_dir"], cfg["val_files"])[0])[:cfg["eval_tokens"] + 1]
        if vocab_map is not None:
            val_tokens = vocab_map[val_tokens]
    except (FileNotFoundError, ValueError) as e:
        if ddp:
            dist.destroy_process_group()
        raise SystemExit(f"error: {e}")
    first_train = train_loader.shards[0] if vocab_map is None else vocab_map[train_loader.shards[0]]
    top_id = max(int(val_tokens.max()), int(first_train.max()))
    if top_id >= cfg["vocab_size"]:
        raise SystemExit(f"error: the shards hold token id {top_id} but vocab_size={cfg['vocab_size']}; raise "
                         f"--vocab_size (50304 for GPT-2 BPE) or use --vocab_top=N")
    if len(val_tokens) < B * T + 1:
        raise SystemExit(f"error: the val slice has {len(val_tokens)} tokens, less than one batch "
                         f"({B}x{T}+1); raise eval_tokens or lower batch_size/block_size")

    # models: one init, copied to every run, so all runs start from the same weights
    model_config = GPTConfig(vocab_size=cfg["vocab_size"], block_size=T, n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                             n_embd=cfg["n_embd"])
    torch.manual_seed(cfg["seed"])
    init_state = GPT(model_config).state_dict()
    runs = {}
    for name, lr in runs_spec:
        model = GPT(model_config).to(DEVICE)
        model.load_state_dict(init_state)
        opt_kwargs = dict(muon_momentum=cfg["muon_momentum"], head_lr=cfg["head_lr"], embed_lr=cfg["embed_lr"],
                          scalar_lr=cfg["scalar_lr"], weight_decay=cfg["weight_decay"], device_type=device_type,
                          muon_lr=lr if name == "muon" and lr else cfg["muon_lr"],
                          adamw_lr=lr if name == "adamw" and lr else cfg["adamw_lr"])
        optimizer = model.configure_optimizers(name, **opt_kwargs)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        fwd = torch.compile(model) if cfg["compile"] and device_type == "cuda" else model  # as nanoGPT: compile, then DDP
        ddp_model = None
        if ddp:
            fwd = ddp_model = torch.nn.parallel.DistributedDataParallel(
                fwd, device_ids=[local_rank] if device_type == "cuda" else None)
        runs[run_label(name, lr)] = dict(name=name, model=model, fwd=fwd, ddp=ddp_model, optimizer=optimizer,
                                         train_time=0.0)
    metrics = dict(config=cfg, tokens_per_step=tokens_per_step, world_size=world, device=DEVICE,
                   num_params=next(iter(runs.values()))["model"].num_params(),
                   runs={label: dict(train=[], val=[]) for label in runs})

    os.makedirs(cfg["out_dir"], exist_ok=True)
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    step = 0
    if cfg["resume"]:
        if not os.path.exists(ckpt_path):
            raise SystemExit(f"error: --resume=1 but there is no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location=DEVICE, weights_only=False)
        diff = [f"{k}: checkpoint {ckpt['config'][k]!r}, now {cfg[k]!r}" for k in RESUME_MUST_MATCH
                if ckpt["config"].get(k) != cfg[k]]
        if diff:
            raise SystemExit("error: cannot resume, settings differ from the checkpoint's (" + "; ".join(diff) +
                             "); pass the same values or use a fresh out_dir")
        for label, run in runs.items():
            run["model"].load_state_dict(ckpt["runs"][label]["model"])
            configured = [g["initial_lr"] for g in run["optimizer"].param_groups]
            run["optimizer"].load_state_dict(ckpt["runs"][label]["optimizer"])
            for g, lr in zip(run["optimizer"].param_groups, configured):  # this run's lr settings win
                g["initial_lr"] = lr
            run["train_time"] = ckpt["runs"][label]["train_time"]
        train_loader.load_state_dict(ckpt["loader"])
        set_rng_state(ckpt["rng"])
        metrics["runs"] = ckpt["metrics"]["runs"]
        step = ckpt["step"]
        if master:
            print(f"resumed from {ckpt_path} at step {step}")
        del ckpt

    def fail_non_finite(what):
        where = (f"the last good checkpoint ({ckpt_path}, step {last_good}) is kept" if last_good is not None
                 else "no checkpoint was written yet")
        save_metrics()
        raise SystemExit(f"error: non-finite {what}; stopping without saving this state, {where}. Lower the "
                         f"learning rate or add warmup (--warmup_steps), or set --grad_clip=1.0.")

    def save_checkpoint():
        for label, run in runs.items():  # the loss is measured before the update: check the weights too
            if not all(torch.isfinite(p).all() for p in run["model"].parameters()):
                fail_non_finite(f"weights in run {label!r} after step {step}")
        if master:
            atomic_save(dict(step=step, config=cfg, loader=train_loader.state_dict(), rng=rng_state(), metrics=metrics,
                             runs={label: dict(model=run["model"].state_dict(), optimizer=run["optimizer"].state_dict(),
                                               train_time=run["train_time"]) for label, run in runs.items()}),
                        ckpt_path)

    def save_metrics():
        if master:
            atomic_write_json(metrics, os.path.join(cfg["out_dir"], "metrics.json"))
            plot_losses(metrics, os.path.join(cfg["out_dir"], "loss.png"))

    def run_eval():
        for label, run in runs.items():
            loss = evaluate(run["model"], val_tokens, B, T, rank, world, autocast)
            metrics["runs"][label]["val"].append(dict(step=step, loss=loss, time=run["train_time"],
                                                      tokens=step * tokens_per_step))
            if master:
                tqdm.write(f"step {step:5d} | {label:>12} | val loss {loss:.4f}")
        save_metrics()

    if master:
        print(f"{metrics['num_params'] / 1e6:.1f}M parameters, {tokens_per_step:,} tokens/step "
              f"({world} x {accum} x {B} x {T}), device {DEVICE}, runs: {', '.join(runs)}")
    stop = StopRequest()
    bar = tqdm(total=cfg["max_steps"], initial=step, desc="train", disable=not master, dynamic_ncols=True)
    last_good = step if cfg["resume"] else None
    stopped_early = False
    try:
        while step < cfg["max_steps"]:
            if step % cfg["eval_every"] == 0:
                run_eval()
            batches = train_loader.next_batches()
            lr_mult = lr_multiplier(step, cfg["max_steps"], cfg["warmup_steps"], cfg["cooldown_frac"], cfg["min_lr_frac"])
            for label, run in runs.items():
                t0 = time.perf_counter()
                for group in run["optimizer"].param_groups:
                    group["lr"] = group["initial_lr"] * lr_mult
                    if group.get("use_muon"):
                        group["momentum"] = muon_momentum_at(step, cfg["muon_momentum_warmup"], cfg["muon_momentum"])
                loss_sum = torch.zeros((), device=DEVICE)
                for i, (x, y) in enumerate(batches):
                    if ddp:  # all-reduce the gradients only on the last micro-step
                        run["ddp"].require_backward_grad_sync = i == accum - 1
                    with autocast:
                        loss = run["fwd"](x.to(DEVICE, non_blocking=True), y.to(DEVICE, non_blocking=True))
                    (loss / accum).backward()
                    loss_sum += loss.detach()
                if cfg["grad_clip"]:
                    torch.nn.utils.clip_grad_norm_(run["model"].parameters(), cfg["grad_clip"])
                run["optimizer"].step()
                run["optimizer"].zero_grad(set_to_none=True)
                loss_avg = loss_sum / accum
                if ddp:
                    dist.all_reduce(loss_avg)
                    loss_avg /= world
                loss_value = loss_avg.item()  # syncs the device, so the time below is real
                dt = time.perf_counter() - t0
                run["train_time"] += dt
                if not math.isfinite(loss_value):
                    fail_non_finite(f"training loss ({loss_value}) in run {label!r} at step {step + 1}")
                tok_s = tokens_per_step / dt
                mfu = run["model"].estimate_mfu(tokens_per_step / world, dt, seq_len=T) if device_type == "cuda" else None
                metrics["runs"][label]["train"].append(dict(step=step + 1, loss=loss_value, lr=lr_mult, tok_s=tok_s,
                                                            time=run["train_time"]))
                if master and ((step + 1) % cfg["log_every"] == 0 or step == 0):
                    mfu_text = f" | mfu {100 * mfu:.1f}%" if mfu is not None else ""
                    tqdm.write(f"step {step + 1:5d} | {label:>12} | loss {loss_value:.4f} | lr x{lr_mult:.3f} | "
                               f"{tok_s:,.0f} tok/s{mfu_text}")
            step += 1
            bar.update(1)
            stop_now = stop.requested or (cfg["stop_after_steps"] and step >= cfg["stop_after_steps"])
            if ddp:  # every rank must agree to stop (only some may have seen the signal)
                flag = torch.tensor([int(bool(stop_now))], device=DEVICE)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop_now = bool(flag.item())
            if stop_now and step < cfg["max_steps"]:
                save_checkpoint()
                save_metrics()
                if master:
                    tqdm.write(f"stopped at step {step}; checkpoint {ckpt_path}; continue with --resume=1")
                stopped_early = True
                break
            if cfg["ckpt_every"] and step % cfg["ckpt_every"] == 0:
                save_checkpoint()
                last_good = step
        if not stopped_early:
            run_eval()
            if master:
                metrics["summary"] = report(metrics, os.path.join(cfg["out_dir"], "loss.png"))
                save_metrics()
            save_checkpoint()
    finally:
        bar.close()
        stop.restore()
        if ddp:
            dist.destroy_process_group()

    return metrics


def report(metrics, plot_path):
    """Print the final val loss per run and, with Muon and AdamW runs, the step at which the fastest Muon run
    first reaches the best AdamW run's final validation loss (resolution: eval_every). Returns a summary."""
    summary = dict(final_val={label: run["val"][-1]["loss"] for label, run in metrics["runs"].items() if run["val"]})
    finals = {label: run["val"][-1]["loss"] for label, run in metrics["runs"].items() if run["val"]}
    for label, loss in finals.items():
        print(f"{label:>12}: final val loss {loss:.4f}, train time {metrics['runs'][label]['val'][-1]['time']:.1f} s")
    adamw = [l for l in finals if l.startswith("adamw")]
    muon = [l for l in finals if l.startswith("muon")]
    if adamw and muon:
        best_adamw = min(adamw, key=finals.get)
        target, adamw_steps = finals[best_adamw], metrics["runs"][best_adamw]["val"][-1]["step"]
        reached = {l: first_step_reaching(metrics["runs"][l]["val"], target) for l in muon}
        hits = [l for l in muon if reached[l] is not None]
        if hits:
            best = min(hits, key=lambda l: reached[l])
            at = next(p for p in metrics["runs"][best]["val"] if p["step"] == reached[best])
            adamw_time = metrics["runs"][best_adamw]["val"][-1]["time"]
            interp = interpolated_step_reaching(metrics["runs"][best]["val"], target)
            summary["muon_vs_adamw"] = dict(adamw_run=best_adamw, adamw_final_val=target, adamw_steps=adamw_steps,
                                            muon_run=best, muon_step=reached[best], step_ratio=reached[best] / adamw_steps,
                                            muon_step_interpolated=interp, step_ratio_interpolated=interp / adamw_steps,
                                            time_ratio=at["time"] / adamw_time if adamw_time else None)
            print(f"Muon reaches AdamW's final val loss ({target:.4f}, {best_adamw}) at step {reached[best]} "
                  f"({best}): {reached[best] / adamw_steps:.2f}x AdamW's {adamw_steps} steps "
                  f"(interpolated between evals: step {interp:.0f}, {interp / adamw_steps:.2f}x), "
                  f"{at['time'] / adamw_time:.2f}x its training time")
        else:
            summary["muon_vs_adamw"] = dict(adamw_run=best_adamw, adamw_final_val=target, adamw_steps=adamw_steps,
                                            muon_step=None)
            print(f"Muon does not reach AdamW's final val loss ({target:.4f}, {best_adamw}) within {adamw_steps} steps")
    print(f"plot: {plot_path}")
    return summary


def compare_runs(out_dirs, out_dir):
    """Merge the runs of several metrics.json files (same data and batches, e.g. an LR sweep split over
    jobs) into out_dir/metrics.json and out_dir/loss.png, and print the Muon-vs-AdamW report."""
    import json
    merged = None
    for d in out_dirs:
        path = os.path.join(d, "metrics.json")
        if not os.path.exists(path):
            raise SystemExit(f"error: --compare: no {path}; run train_muon.py with --out_dir={d} first")
        with open(path) as f:
            m = json.load(f)
        if merged is None:
            merged = dict(m, runs={}, merged_from=list(out_dirs))
        elif m["tokens_per_step"] != merged["tokens_per_step"]:
            raise SystemExit(f"error: --compare: {d} used {m['tokens_per_step']} tokens/step, {out_dirs[0]} used "
                             f"{merged['tokens_per_step']}; only runs on the same batches are comparable")
        merged["runs"].update(m["runs"])
    os.makedirs(out_dir, exist_ok=True)
    merged["summary"] = report(merged, os.path.join(out_dir, "loss.png"))
    atomic_write_json(merged, os.path.join(out_dir, "metrics.json"))
    plot_losses(merged, os.path.join(out_dir, "loss.png"))
    return merged


if __name__ == "__main__":
    config = parse_overrides(sys.argv[1:], CONFIG)
    if config["compare"]:
        compare_runs(config["compare"].split(","), config["out_dir"])
    else:
        train(config)
