"""
train_muon.py -- train a GPT (model_keller.py) on token shards with Muon, and compare it with AdamW.

    python prepare_fineweb.py                                    # FineWeb-Edu shards -> data/fineweb_edu
    python train_muon.py                                         # 1 GPU, 124M model, Muon
    python train_muon.py --optimizers=muon,adamw                 # both, same init, same batches, one plot
    torchrun --standalone --nproc_per_node=8 train_muon.py       # 8 GPUs, DDP (NCCL); on CPU it uses gloo
    torchrun --standalone --nproc_per_node=8 train_muon.py --fsdp=True   # FSDP2: models that don't fit one GPU
    python train_muon.py --resume=True                           # continue from out_dir/ckpt/

Every constant below can be overridden as --name=value (flags are True/False, lists comma-separated).
`optimizers` is a comma list of "muon" and "adamw", each optionally with a learning rate, e.g.
"muon:0.03,adamw:2e-3" (muon:LR sets lr_muon; its Adam groups keep lr_head/lr_embed/lr_scalar). The runs
train one after another, each from the same initial weights on the same batches in the same order.

stop_after_steps=N trains at most N steps in this invocation (all runs together), then checkpoints and
exits: a job script that reruns the same command with --resume=True advances N steps per job.

Outputs in out_dir: metrics.json (every train and eval point of every run, the config and the hash of the
code), loss.png (train and validation curves), ckpt/<run>.pt (model, optimizer, step, data position, RNG
state, vocab table, config, code hash; written atomically). With --fsdp=True, ckpt/<run>/ is a
torch.distributed.checkpoint directory instead (sharded; any number of ranks can resume from it).
"""
import glob
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
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
# (divided among ranks): 8 x 1024 x 8 = 65,536 tokens per step; fits a 16 GB GPU
batch_size = 8
grad_accum_steps = 8
# optimizers and schedule
optimizers = "muon"  # comma list of muon / adamw, each optionally :lr
max_steps = 6000
warmup_steps = 100  # linear warmup ...
cooldown_frac = 0.4  # ... constant, then linear cooldown to min_lr_frac over the last 40% (WSD)
min_lr_frac = 0.0
lr_muon = 0.05  # the Muon run: Muon on the hidden matrices ...
momentum_muon = 0.95
momentum_muon_warmup = 300  # Muon momentum 0.85 -> momentum_muon over the first steps
weight_decay_muon = 0.0  # decoupled, on the hidden matrices (p -= lr * wd * p); 0 = the README's measured runs
ns_method = "newton_schulz"  # or polar_express, gram_newton_schulz (muon_optim.ORTHOGONALIZERS)
normuon = 0.0  # > 0: NorMuon's per-neuron normalization with this beta2 (e.g. 0.95); 0.0 = off
cautious_wd = False  # decay only where the update and the weight agree in sign
lr_head = 0.008  # ... and Adam on the head, the embedding and < 2D parameters (no weight decay)
lr_embed = 0.6
lr_scalar = 0.04
betas_adam = "0.8,0.95"
eps_adam = 1e-10
lr_adamw = 1.5e-3  # the AdamW baseline, weight decay on matrices only
betas_adamw = "0.9,0.95"
eps_adamw = 1e-8
weight_decay = 0.1
grad_clip = 0.0  # clip the global grad norm (0 = off)
# evaluation, logging, checkpoints
eval_every = 250
eval_tokens = 10 * 65536  # a fixed slice from the start of the val shard
log_every = 10
ckpt_every = 1000  # 0 = only at the end, on Ctrl-C and at stop_after_steps
save_checkpoint = True  # False: write no checkpoints (then --resume has nothing to continue)
stop_after_steps = 0  # > 0: train at most this many steps in this invocation, checkpoint, exit (job time limits)
resume = False  # continue every run from its checkpoint in out_dir/ckpt/ (finished runs are kept as they are)
out_dir = "out/muon"
wandb_log = False  # True: also log the metrics of metrics.json to Weights & Biases (one wandb run per run)
wandb_project = "muon-lab"
wandb_run_name = ""  # "" = out_dir's last component; each run logs as <name>-<run>
# system
device = "auto"  # auto = cuda if available, else cpu
compile = True  # torch.compile (CUDA only; ignored on CPU)
fsdp = False  # True: FSDP2 (fully_shard per block, then the root) instead of DDP; checkpoints via torch.distributed.checkpoint
threads = 0  # CPU threads for torch (0 = torch's default)
seed = 1337
compare = ""  # comma list of out_dirs: skip training, merge their metrics.json (e.g. sweeps run as separate jobs)
# -----------------------------------------------------------------------------
CONFIG = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, str))}

SCRIPT = "train_muon.py"
CODE_FILES = ("train_muon.py", "model_keller.py", "muon_optim.py")  # what a run's code hash covers
# settings a resumed run must share with its checkpoint (others, e.g. eval_every or out_dir, may change)
RESUME_MUST_MATCH = ("data_dir", "train_files", "vocab_top", "vocab_size", "block_size", "n_layer", "n_head", "n_embd",
                     "batch_size", "grad_accum_steps", "seed")

# -----------------------------------------------------------------------------
# Small helpers pasted verbatim from shared_helpers.py (tests/test_consistency.py keeps the copies identical)

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


def load_checkpoint(path, script):
    """torch.load a checkpoint written by `script`, or stop with a message saying what is wrong
    (missing, truncated, or not one of this script's checkpoints) and how to go on."""
    if not os.path.exists(path):
        raise SystemExit(f"--resume=True but there is no checkpoint at {path}; run without --resume to start fresh")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file: torch raises OSError, RuntimeError, pickle errors, ...
        raise SystemExit(f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); it may be truncated. "
                         "Delete it and start fresh (without --resume), or point --out_dir elsewhere") from None
    if not isinstance(ckpt, dict) or ckpt.get("script") != script:
        raise SystemExit(f"{path} was not written by {script}; point --out_dir at a {script} run")
    return ckpt


def rng_state():
    """Every RNG a run draws from (torch CPU, CUDA, numpy), for exact resume."""
    state = dict(torch=torch.get_rng_state(), numpy=np.random.get_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def source_hash(*paths):
    """sha256 (first 16 hex digits) of the source files that determine a run: a cached result is
    reused only when the code that made it is unchanged."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256


def read_shard(path):
    """The uint16 tokens of one shard, memory-mapped, after checking the header and the size."""
    header = np.fromfile(path, dtype=np.int32, count=SHARD_HEADER_INTS)
    if header.size < SHARD_HEADER_INTS or header[0] != SHARD_MAGIC:
        raise ValueError(f"{path} is not a token shard (magic {header[:1].tolist()} != {SHARD_MAGIC}); "
                         "write shards with prepare_fineweb.py")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: shard version {header[1]}, this script reads version {SHARD_VERSION}")
    n = int(header[2])
    expected = SHARD_HEADER_INTS * 4 + 2 * n
    if os.path.getsize(path) != expected:
        raise ValueError(f"{path}: header says {n} tokens ({expected} bytes) but the file has "
                         f"{os.path.getsize(path)} bytes; the shard is truncated, rewrite it")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=SHARD_HEADER_INTS * 4, shape=(n,))


def code_hash():
    """Hash of the code that determines a run (trainer, model, optimizer), stored in metrics and checkpoints."""
    here = os.path.dirname(os.path.abspath(__file__))
    return source_hash(*(os.path.join(here, f) for f in CODE_FILES))


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


def parse_betas(text, key):
    """'0.9,0.95' -> (0.9, 0.95): lists are comma-separated strings on the command line."""
    try:
        b1, b2 = (float(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"--{key}={text}: expected two comma-separated numbers, e.g. --{key}=0.9,0.95") from None
    return b1, b2


# -----------------------------------------------------------------------------
# Data: llm.c shards, memory-mapped

def find_shards(data_dir, pattern):
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
    world * accum windows of B*T tokens (+1: y is x shifted by one); micro-step i of rank r reads window
    i * world + r. So ranks read disjoint data, and every (world, accum) with the same product reads the
    same tokens per step: 2 ranks x 1 micro-step == 1 process x 2 micro-steps. A step that does not fit in
    the rest of a shard starts at the next shard (wrapping around after the last). The position is two
    integers (state_dict), so a resumed run continues with the very next batch."""

    def __init__(self, files, B, T, rank=0, world=1, accum=1, vocab_map=None):
        self.shards = [read_shard(f) for f in files]
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


def load_data(cfg, vocab_map=None):
    """(train files, vocab table or None, val tokens, cfg), checked so that the first errors a user meets
    say what is missing and how to make it. A resumed run passes its checkpoint's vocab table: rebuilt from
    the shards as they are now, embedding rows would silently change meaning if shards were added."""
    files = find_shards(cfg["data_dir"], cfg["train_files"])
    if cfg["vocab_top"]:
        if not 2 <= cfg["vocab_top"] <= 65536:
            raise ValueError(f"--vocab_top={cfg['vocab_top']}: use 0 (all tokens) or a size in 2..65536")
        if vocab_map is None:
            vocab_map = build_vocab_map([read_shard(f) for f in files], cfg["vocab_top"])
        cfg = dict(cfg, vocab_size=cfg["vocab_top"])
    val = read_shard(find_shards(cfg["data_dir"], cfg["val_files"])[0])[:cfg["eval_tokens"] + 1]
    first = read_shard(files[0])
    if vocab_map is not None:
        val, first = vocab_map[val], vocab_map[first]
    top_id = max(int(val.max()), int(first.max()))
    if top_id >= cfg["vocab_size"]:
        raise ValueError(f"the shards hold token id {top_id} but vocab_size={cfg['vocab_size']}; raise "
                         f"--vocab_size (50304 for GPT-2 BPE) or use --vocab_top=N")
    if len(val) < cfg["batch_size"] * cfg["block_size"] + 1:
        raise ValueError(f"the val slice has {len(val)} tokens, less than one batch ({cfg['batch_size']}x"
                         f"{cfg['block_size']}+1); raise eval_tokens or lower batch_size/block_size")
    return files, vocab_map, val, cfg


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
# Model, optimizer, distributed setup

def make_optimizer(name, model, cfg, lr=None):
    """'muon': Muon on the hidden matrices (>= 2D weights inside the blocks), Adam on the head, the
    embedding and any < 2D parameter, one muon_optim.Muon with use_muon groups (as in KellerJordan/Muon's
    README). 'adamw': the baseline, AdamW on everything, weight decay on matrices only. `lr` overrides
    the run's main lr (lr_muon or lr_adamw): --optimizers=muon:0.03."""
    if name == "adamw":
        matrices, others = [p for p in model.parameters() if p.ndim >= 2], [p for p in model.parameters() if p.ndim < 2]
        groups = [dict(params=matrices, weight_decay=cfg["weight_decay"]), dict(params=others, weight_decay=0.0)]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr or cfg["lr_adamw"], eps=cfg["eps_adamw"],
                                 betas=parse_betas(cfg["betas_adamw"], "betas_adamw"))
    from muon_optim import Muon
    hidden = [p for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim >= 2]
    adam = dict(use_muon=False, betas=parse_betas(cfg["betas_adam"], "betas_adam"), eps=cfg["eps_adam"], weight_decay=0.0)
    groups = [dict(params=hidden, use_muon=True, lr=lr or cfg["lr_muon"], momentum=cfg["momentum_muon"],
                   weight_decay=cfg["weight_decay_muon"], ns_method=cfg["ns_method"], normuon=cfg["normuon"] or None,
                   cautious_wd=cfg["cautious_wd"], name="muon"),
              dict(params=[model.lm_head.weight], lr=cfg["lr_head"], name="head", **adam),
              dict(params=[model.wte.weight], lr=cfg["lr_embed"], name="embed", **adam),
              dict(params=[p for p in model.parameters() if p.ndim < 2], lr=cfg["lr_scalar"], name="scalar", **adam)]
    return Muon([g for g in groups if g["params"]])


def setup_distributed(cfg):
    """rank, world size, device. Under torchrun (RANK set) this joins the process group (NCCL on CUDA,
    gloo on CPU); --fsdp=True in a plain process makes a 1-rank group, since FSDP needs one. A group the
    caller made already is used as it is (tests/lm_dist_worker.py trains several configs in one launch)."""
    launched = "RANK" in os.environ
    use_cuda = torch.cuda.is_available() and cfg["device"] in ("auto", "cuda") if launched or cfg["fsdp"] else None
    if launched:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        local_rank = int(os.environ["LOCAL_RANK"])
        device = f"cuda:{local_rank}" if use_cuda else "cpu"
    elif cfg["fsdp"]:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
        local_rank, device = 0, "cuda:0" if use_cuda else "cpu"
    else:
        local_rank = 0
        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg["device"] == "auto" else cfg["device"]
        if device == "cuda":  # set_device needs an index: the current device (CUDA_VISIBLE_DEVICES picks it)
            device = f"cuda:{torch.cuda.current_device()}"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return dict(rank=rank, world=world, local_rank=local_rank, device=device, master=rank == 0,
                device_type="cuda" if device.startswith("cuda") else "cpu", ddp=launched and not cfg["fsdp"],
                fsdp=cfg["fsdp"])


def build_run(name, lr, cfg, env):
    """The model (the same initial weights for every run: seeded), its optimizer, and the module that
    runs the forward pass (compiled, then DDP-wrapped, as in nanoGPT). With FSDP each block is sharded,
    then the root (bf16 compute and fp32 gradient reduction on CUDA; fp32 on CPU)."""
    torch.manual_seed(cfg["seed"])
    model = GPT(GPTConfig(vocab_size=cfg["vocab_size"], block_size=cfg["block_size"], n_layer=cfg["n_layer"],
                          n_head=cfg["n_head"], n_embd=cfg["n_embd"])).to(env["device"])
    if env["fsdp"]:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        cuda = env["device_type"] == "cuda"
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(env["device_type"], (env["world"],))  # on this process group (see train)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else None, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    optimizer = make_optimizer(name, model, cfg, lr)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    fwd = torch.compile(model) if cfg["compile"] and env["device_type"] == "cuda" else model
    if env["ddp"]:
        fwd = torch.nn.parallel.DistributedDataParallel(
            fwd, device_ids=[env["local_rank"]] if env["device_type"] == "cuda" else None)
    return model, optimizer, fwd


def all_ranks_agree(flag, env):
    """True if `flag` is true on any rank: every rank must take the same branch before a collective."""
    if env["world"] == 1:
        return bool(flag)
    t = torch.tensor([int(bool(flag))], device=env["device"])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def weights_finite(model, env):
    """The loss is measured before the update: check the weights too (local shards under FSDP)."""
    local = (p.to_local() if hasattr(p, "to_local") else p for p in model.parameters())
    return not all_ranks_agree(not all(torch.isfinite(p).all() for p in local), env)


# -----------------------------------------------------------------------------
# Checkpoints: one per run in out_dir/ckpt/, atomic

def checkpoint_path(out, label, use_fsdp):
    """out/ckpt/<run>.pt (DDP and single process: one torch.save'd dict) or out/ckpt/<run>/ (FSDP: a
    torch.distributed.checkpoint directory with meta.pt, the non-tensor part, inside)."""
    name = label.replace(":", "_")
    return os.path.join(out, "ckpt", name if use_fsdp else name + ".pt")


def meta_file(path, use_fsdp):
    return os.path.join(path, "meta.pt") if use_fsdp else path


def write_checkpoint(path, meta, model, optimizer, env):
    """Single process / DDP: rank 0 saves one file (temp, then rename). FSDP: every rank writes its shards
    with dcp.save into path.tmp, rank 0 adds meta.pt and renames the directory into place, so a crash
    mid-save leaves the previous checkpoint whole."""
    if not env["fsdp"]:
        if env["master"]:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_save(dict(meta, model=model.state_dict(), optimizer=optimizer.state_dict()), path)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)
    tmp, old = path + ".tmp", path + ".old"
    if env["master"]:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save(dict(model=model_state, optimizer=optim_state), checkpoint_id=tmp)
    if env["master"]:
        torch.save(meta, os.path.join(tmp, "meta.pt"))
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def read_checkpoint(path, model, optimizer, env):
    """Load a run's checkpoint into model and optimizer; returns its meta dict. FSDP checkpoints reshard
    on load, so a run saved on N ranks resumes on M."""
    meta = load_checkpoint(meta_file(path, env["fsdp"]), SCRIPT)
    if env["fsdp"]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model_state, optim_state = get_state_dict(model, optimizer)
        state = dict(model=model_state, optimizer=optim_state)
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    else:
        model.load_state_dict(meta.pop("model"))
        optimizer.load_state_dict(meta.pop("optimizer"))
    return meta


def check_resumable(path, cfg):
    """The meta of a run's checkpoint (None if there is none), after checking that it fits this config."""
    other = checkpoint_path(cfg["out_dir"], os.path.basename(path).removesuffix(".pt"), not cfg["fsdp"])
    if not os.path.exists(path):
        if os.path.exists(other):
            raise SystemExit(f"{other} was written {'without' if cfg['fsdp'] else 'with'} --fsdp=True; resume with "
                             f"--fsdp={not cfg['fsdp']}")
        return None
    meta = load_checkpoint(meta_file(path, cfg["fsdp"]), SCRIPT)
    diff = [f"{k}: checkpoint {meta['config'][k]!r}, now {cfg[k]!r}" for k in RESUME_MUST_MATCH
            if meta["config"].get(k) != cfg[k]]
    if diff:
        raise SystemExit(f"cannot resume from {path}: settings differ from the checkpoint's (" + "; ".join(diff) +
                         "); pass the same values or use a fresh out_dir")
    return meta


# -----------------------------------------------------------------------------
# Evaluation, logging

def evaluate(model, val_tokens, B, T, env, autocast):
    """Mean loss over the fixed val slice; the B*T windows are split among ranks and averaged. Under FSDP
    every rank must run as many forward passes as the others (each one all-gathers weights), so ranks
    with one window fewer run a padding window that is not counted."""
    n_batches = (len(val_tokens) - 1) // (B * T)
    rounds = -(-n_batches // env["world"]) if env["fsdp"] else None
    todo = range(env["rank"], rounds * env["world"] if rounds else n_batches, env["world"])
    losses = []
    model.eval()
    with torch.no_grad():
        for i in todo:
            j = i if i < n_batches else 0
            buf = torch.from_numpy(np.asarray(val_tokens[j * B * T:(j + 1) * B * T + 1], dtype=np.int64))
            with autocast:
                loss = model(buf[:-1].view(B, T).to(env["device"]), buf[1:].view(B, T).to(env["device"])).item()
            if i < n_batches:
                losses.append(loss)
    model.train()
    total = torch.tensor([sum(losses), len(losses)], dtype=torch.float64, device=env["device"])
    if env["world"] > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def start_wandb(cfg, label, run_id=None):
    """A wandb run for one training run (imported only here: wandb_log=False needs no wandb). A resumed
    run continues its wandb run (same id)."""
    import wandb
    name = f"{cfg['wandb_run_name'] or os.path.basename(os.path.normpath(cfg['out_dir']))}-{label}"
    return wandb.init(project=cfg["wandb_project"], name=name, id=run_id,
                      resume="allow", config=dict(cfg, run=label), dir=cfg["out_dir"])


def save_metrics(metrics, out):
    atomic_write_json(metrics, os.path.join(out, "metrics.json"))
    plot_losses(metrics, os.path.join(out, "loss.png"))


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



# -----------------------------------------------------------------------------
# Training

def resume_run(path, model, optimizer, loader, run, code, env):
    """Restore a run from its checkpoint and return the checkpoint's meta dict. This invocation's lr
    settings win over the checkpoint's. A checkpoint made by other code (trainer, model or optimizer
    changed) is resumed with a warning, and the change is recorded in the run's metrics ('code')."""
    configured = [g["initial_lr"] for g in optimizer.param_groups]
    meta = read_checkpoint(path, model, optimizer, env)
    for g, lr in zip(optimizer.param_groups, configured):
        g["initial_lr"] = lr
    loader.load_state_dict(meta["loader"])
    set_rng_state(meta["rng"])
    run.update(meta["run_metrics"])
    if meta["code"] != code:
        if env["master"]:
            print(f"warning: {path} was written by other code (hash {meta['code']}, now {code}: {', '.join(CODE_FILES)} "
                  f"changed); the resumed run mixes both versions (recorded in metrics.json, runs/<run>/code)")
        run["code"].append(dict(step=meta["step"], code=code))
    return meta


def stop_non_finite(what, path, last_good, metrics, cfg, master):
    """Exit without checkpointing a state that has diverged: the last good checkpoint stays resumable."""
    where = f"the last good checkpoint ({path}, step {last_good}) is kept" if last_good is not None else \
        "no checkpoint was written yet"
    if master:
        save_metrics(metrics, cfg["out_dir"])
    raise SystemExit(f"error: non-finite {what}; stopping without saving this state, {where}. Lower the "
                     f"learning rate or add warmup (--warmup_steps), or set --grad_clip=1.0.")


def train_run(label, name, lr, cfg, env, data, metrics, budget, stop):
    """Train one run to max_steps, from the shared initial weights or from its checkpoint (resume). Stops
    early, with a checkpoint, after `budget` steps of this invocation or on Ctrl-C / SIGTERM. Returns
    (steps trained here, whether it stopped early). The loop reads top to bottom, like nanoGPT's train.py."""
    B, T, world, device, master = cfg["batch_size"], cfg["block_size"], env["world"], env["device"], env["master"]
    accum, tokens_per_step = cfg["grad_accum_steps"] // world, B * T * cfg["grad_accum_steps"]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if env["device_type"] == "cuda" else nullcontext()
    model, optimizer, fwd = build_run(name, lr, cfg, env)
    loader = DataLoader(data["files"], B, T, env["rank"], world, accum, data["vocab_map"])
    path = checkpoint_path(cfg["out_dir"], label, env["fsdp"])
    run = metrics["runs"][label] = dict(train=[], val=[], code=[dict(step=0, code=metrics["code"])])
    meta = resume_run(path, model, optimizer, loader, run, metrics["code"], env) if data["resume"].get(label) else {}
    step, train_time, last_good, trained = meta.get("step", 0), meta.get("train_time", 0.0), meta.get("step"), 0
    metrics["num_params"] = model.num_params()
    if master:
        print(f"{label}: {model.num_params() / 1e6:.1f}M parameters, {tokens_per_step:,} tokens/step ({world} x {accum} "
              f"x {B} x {T}), device {device}{', FSDP' if env['fsdp'] else ''}"
              f"{f', resumed from {path} at step {step}' if meta else ''}")
    wb = start_wandb(cfg, label, meta.get("wandb_id")) if master and cfg["wandb_log"] else None

    def checkpoint(finished=False):
        if not weights_finite(model, env):
            stop_non_finite(f"weights in run {label!r} after step {step}", path, last_good, metrics, cfg, master)
        if cfg["save_checkpoint"]:
            write_checkpoint(path, dict(script=SCRIPT, code=metrics["code"], config=cfg, label=label, step=step,
                                        train_time=train_time, loader=loader.state_dict(), rng=rng_state(),
                                        run_metrics=run, vocab_map=data["vocab_map"], finished=finished,
                                        train_shards=[os.path.basename(f) for f in data["files"]],
                                        wandb_id=wb.id if wb else meta.get("wandb_id")), model, optimizer, env)

    def log_eval():
        loss = evaluate(model, data["val_tokens"], B, T, env, autocast)
        run["val"].append(dict(step=step, loss=loss, time=train_time, tokens=step * tokens_per_step))
        if master:
            tqdm.write(f"step {step:5d} | {label:>12} | val loss {loss:.4f}")
            save_metrics(metrics, cfg["out_dir"])
        if wb:
            wb.log(dict(val_loss=loss, time=train_time, tokens=step * tokens_per_step), step=step)

    bar = tqdm(total=cfg["max_steps"], initial=step, desc=label, disable=not master, dynamic_ncols=True)
    try:
        while step < cfg["max_steps"]:
            if step % cfg["eval_every"] == 0:
                log_eval()
            lr_mult = lr_multiplier(step, cfg["max_steps"], cfg["warmup_steps"], cfg["cooldown_frac"], cfg["min_lr_frac"])
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lr_mult
                if group.get("use_muon"):
                    group["momentum"] = muon_momentum_at(step, cfg["momentum_muon_warmup"], cfg["momentum_muon"])
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            for i, (x, y) in enumerate(loader.next_batches()):
                if env["ddp"]:  # reduce the gradients only on the last micro-step
                    fwd.require_backward_grad_sync = i == accum - 1
                if env["fsdp"]:
                    model.set_requires_gradient_sync(i == accum - 1)
                with autocast:
                    loss = fwd(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                (loss / accum).backward()
                loss_sum += loss.detach()
            if cfg["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_avg = loss_sum / accum
            if world > 1:
                dist.all_reduce(loss_avg)
                loss_avg /= world
            loss_value = loss_avg.item()  # syncs the device, so the time below is real
            dt = time.perf_counter() - t0
            train_time += dt
            step, trained = step + 1, trained + 1
            if not math.isfinite(loss_value):
                stop_non_finite(f"training loss ({loss_value}) in run {label!r} at step {step}", path, last_good,
                                metrics, cfg, master)
            point = dict(step=step, loss=loss_value, lr=lr_mult, tok_s=tokens_per_step / dt, time=train_time)
            mfu = model.estimate_mfu(tokens_per_step / world, dt, seq_len=T) if env["device_type"] == "cuda" else None
            if mfu is not None:  # CUDA with a known peak: model FLOPs utilization per GPU
                point["mfu"] = mfu
            run["train"].append(point)
            if wb:
                wb.log(dict(train_loss=loss_value, lr=lr_mult, tok_s=tokens_per_step / dt, time=train_time), step=step)
            if master and (step % cfg["log_every"] == 0 or step == 1):
                tqdm.write(f"step {step:5d} | {label:>12} | loss {loss_value:.4f} | lr x{lr_mult:.3f} | "
                           f"{tokens_per_step / dt:,.0f} tok/s" + (f" | mfu {100 * mfu:.1f}%" if mfu else ""))
            bar.update(1)
            if step < cfg["max_steps"] and all_ranks_agree(stop.requested or trained >= budget, env):
                checkpoint()
                if master:
                    save_metrics(metrics, cfg["out_dir"])
                    tqdm.write(f"{label}: stopped at step {step}; checkpoint {path}; continue with --resume=True")
                return trained, True
            if cfg["ckpt_every"] and step % cfg["ckpt_every"] == 0:
                checkpoint()
                last_good = step
        log_eval()
        checkpoint(finished=True)
        return trained, False
    finally:
        bar.close()
        if wb:
            wb.finish()


def train(cfg):
    """Train the runs of cfg['optimizers'] one after another (same initial weights, same batches in the
    same order); returns the metrics dict (also in out_dir/metrics.json)."""
    runs = parse_optimizers(cfg["optimizers"])
    own_group = not dist.is_initialized()
    env = setup_distributed(cfg)
    try:
        return train_runs(runs, cfg, env)
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def train_runs(runs, cfg, env):
    """Check the settings, the checkpoints (resume) and the data, then train each run in turn; with Muon
    and AdamW runs, report how many steps Muon needs to reach AdamW's final loss."""
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    torch.set_flush_denormal(True)  # CPU: subnormal floats late in long runs slow float math ~4x; flush to 0
    if cfg["grad_accum_steps"] % env["world"]:
        raise SystemExit(f"grad_accum_steps={cfg['grad_accum_steps']} must be divisible by the number of "
                         f"processes ({env['world']})")
    labels = [run_label(name, lr) for name, lr in runs]
    resume = {}
    if cfg["resume"]:
        resume = {label: check_resumable(checkpoint_path(cfg["out_dir"], label, cfg["fsdp"]), cfg) for label in labels}
        if not any(resume.values()):  # stops with "no checkpoint at ..."
            load_checkpoint(meta_file(checkpoint_path(cfg["out_dir"], labels[0], cfg["fsdp"]), cfg["fsdp"]), SCRIPT)
    saved = next((meta for meta in resume.values() if meta), {})
    try:
        files, vocab_map, val_tokens, cfg = load_data(cfg, saved.get("vocab_map"))
        DataLoader(files, cfg["batch_size"], cfg["block_size"], 0, env["world"], cfg["grad_accum_steps"] // env["world"])
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if saved and saved["train_shards"] != [os.path.basename(f) for f in files] and env["master"]:
        print(f"warning: the train shards changed since the checkpoint ({len(saved['train_shards'])} then, {len(files)} "
              f"now); the data order differs from an uninterrupted run (the vocab table is the checkpoint's)")
    data = dict(files=files, vocab_map=vocab_map, val_tokens=val_tokens, resume=resume)
    metrics = dict(config=cfg, code=code_hash(), tokens_per_step=cfg["batch_size"] * cfg["block_size"] *
                   cfg["grad_accum_steps"], world_size=env["world"], device=env["device"], runs={})
    os.makedirs(cfg["out_dir"], exist_ok=True)
    budget = cfg["stop_after_steps"] or math.inf  # steps left in this invocation, all runs together
    stop = StopRequest()
    try:
        for (name, lr), label in zip(runs, labels):
            meta = resume.get(label)
            if meta and meta["finished"]:
                metrics["runs"][label] = meta["run_metrics"]
                continue
            if budget <= 0 or stop.requested:
                if env["master"]:
                    print(f"stopped before run {label}; continue with --resume=True")
                return metrics
            trained, stopped = train_run(label, name, lr, cfg, env, data, metrics, budget, stop)
            budget -= trained
            if stopped:
                return metrics
        if env["master"]:
            metrics["summary"] = report(metrics, os.path.join(cfg["out_dir"], "loss.png"))
            save_metrics(metrics, cfg["out_dir"])
        return metrics
    finally:
        stop.restore()


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
    merged = None
    for d in out_dirs:
        path = os.path.join(d, "metrics.json")
        if not os.path.exists(path):
            raise SystemExit(f"error: --compare: no {path}; run train_muon.py with --out_dir={d} first")
        with open(path) as f:
            m = json.load(f)
        if merged is None:
            merged = dict(m, runs={}, merged_from=list(out_dirs))
        elif m.get("code") != merged.get("code"):
            print(f"warning: --compare: {d} was trained by other code (hash {m.get('code')}) than {out_dirs[0]} "
                  f"({merged.get('code')}); the runs differ in more than their settings")
        if m["tokens_per_step"] != merged["tokens_per_step"]:
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
