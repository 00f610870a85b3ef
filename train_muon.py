"""
train_muon.py -- train a GPT (model_keller.py) on token shards with Muon or AdamW. Guide: results/lm.md.

    python prepare_fineweb.py                                    # FineWeb-Edu shards -> data/fineweb_edu
    python train_muon.py --optimizers=muon,adamw                 # both, same init, same batches, one plot
    torchrun --standalone --nproc_per_node=8 train_muon.py       # 8 GPUs, DDP (NCCL); on CPU it uses gloo
    torchrun --standalone --nproc_per_node=8 train_muon.py --fsdp=True   # FSDP2: models that don't fit one GPU
    python train_muon.py --resume=True                           # continue from out_dir/ckpt/ (same run identity)
    python train_muon.py --help                                  # every setting with its default

Outputs in out_dir: metrics.json (per run its identity, status finished / stopped / diverged, every train and
eval point), loss.png, ckpt/<run>.pt (ckpt/<run>/ with --fsdp=True). Exit status: 0; 3 if a run diverged;
130 / 143 after Ctrl-C / SIGTERM (the run checkpointed first).
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
from muon_optim import ORTHOGONALIZERS, Muon, compute_dtype_rule

# -----------------------------------------------------------------------------
# Constants (nanoGPT style): edit here or override as --name=value
# data: shards from prepare_fineweb.py
data_dir = "data/fineweb_edu"
train_files = "fineweb_train_*.bin"
val_files = "fineweb_val_*.bin"
vocab_top = 0  # 0: tokens as they are; N: the N-1 most frequent train tokens, the rest -> id N-1; vocab_size=N
# model (GPT-2 small class, 124M)
vocab_size = 50304
block_size = 1024
n_layer = 12
n_head = 6
n_embd = 768
fused_qkv = False  # one (3*n_embd, n_embd) weight qkv per block instead of separate q, k, v
batch_size = 8  # sequences of block_size tokens per micro-step
grad_accum_steps = 8  # micro-steps per step, divided among the processes
# optimizers and schedule
optimizers = "muon"  # comma list of muon / adamw, each optionally :lr (the hidden matrices' lr)
max_steps = 6000
warmup_steps = 100  # linear warmup ...
cooldown_frac = 0.4  # ... constant, then linear cooldown to min_lr_frac over the last cooldown_frac of the steps (WSD)
min_lr_frac = 0.0
lr_muon = 0.05  # the Muon run: Muon on the hidden matrices ...
momentum_muon = 0.95
momentum_muon_warmup = 300  # Muon momentum 0.85 -> momentum_muon over the first steps
weight_decay_muon = 0.0  # decoupled, on the hidden matrices (p -= lr * wd * p)
ns_method = "newton_schulz"  # or polar_express, gram_newton_schulz (muon_optim.ORTHOGONALIZERS)
normuon = 0.0  # > 0: NorMuon's per-neuron normalization with this beta2 (e.g. 0.95); 0.0 = off
cautious_wd = False  # decay only where the update and the weight agree in sign
muon_split = "none"  # with fused_qkv: none (qkv is one matrix) | qkv (split=3) | heads (split=3*n_head)
lr_adamw = 1.5e-3  # the AdamW run: AdamW on the hidden matrices ...
betas_adamw = "0.9,0.95"
eps_adamw = 1e-8
weight_decay = 0.1  # decoupled, on the AdamW run's hidden matrices
adamw_groups = "per_group"  # per_group: both runs use the Adam groups below; one_lr: AdamW at lr_adamw on all
lr_head = 0.008  # ... and in both runs Adam on the head, the embedding and < 2D parameters (no weight decay)
lr_embed = 0.6
lr_scalar = 0.04
betas_adam = "0.8,0.95"
eps_adam = 1e-10
grad_clip = 0.0  # clip the global grad norm (0 = off)
# evaluation, logging, checkpoints
eval_every = 250  # steps between evaluations of the val loss (and at the end)
eval_tokens = 10 * 65536  # val tokens per evaluation: windows of batch_size x block_size spread over the val shard
log_every = 10  # steps between printed train losses (every step goes to metrics.json)
ckpt_every = 1000  # 0 = only at the end, on Ctrl-C and at stop_after_steps
save_checkpoint = True  # False: write no checkpoints (then --resume has nothing to continue)
stop_after_steps = 0  # > 0: train at most this many steps in this invocation (all runs), checkpoint, exit
resume = False  # continue each run from its checkpoint in out_dir/ckpt/ of the same identity (finished: kept)
out_dir = "out/muon"
wandb_log = False  # True: also log the metrics of metrics.json to Weights & Biases (one wandb run per run)
wandb_project = "muon-lab"
wandb_run_name = ""  # "" = out_dir's last component; each run logs as <name>-<run>
# system
device = "auto"  # auto = cuda if available, else cpu
compile = True  # torch.compile (CUDA only; ignored on CPU)
fsdp = False  # True: FSDP2 (fully_shard per block, then the root) instead of DDP; checkpoints via DCP
threads = 0  # CPU threads for torch (0 = torch's default)
seed = 1337  # the initial weights and the order of the batches (every run of one invocation: the same)
dry_run = False  # True: check every setting, then exit without training (study_lm.py checks each run with it)
# -----------------------------------------------------------------------------
CONFIG = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, str))}

SCRIPT = "train_muon.py"
CODE_FILES = ("train_muon.py", "model_keller.py", "muon_optim.py")  # what a run's code hash covers
# settings a resumed run may change (they do not change what is learned; the data's content is in the identity)
RESUMABLE = ("resume", "stop_after_steps", "eval_every", "log_every", "ckpt_every", "save_checkpoint", "out_dir",
             "data_dir", "threads", "wandb_log", "wandb_project", "wandb_run_name")

# ---- Small helpers pasted into each script that needs them (tests/test_consistency.py keeps the copies identical)
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
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") is not None and torch.cuda.is_available():
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


# ---- Settings, checked before anything trains
# (settings, test of the value (value, all settings), what to do): check_settings stops at the first failing row
CHECKS = (
    (("max_steps", "batch_size", "grad_accum_steps", "block_size", "n_layer", "n_head", "n_embd", "vocab_size",
      "eval_every", "log_every", "eval_tokens", "lr_muon", "lr_head", "lr_embed", "lr_scalar", "lr_adamw", "eps_adam",
      "eps_adamw"), lambda v, c: v > 0, "must be > 0"),
    (("warmup_steps", "momentum_muon_warmup", "weight_decay", "weight_decay_muon", "grad_clip", "ckpt_every",
      "stop_after_steps", "threads", "seed"), lambda v, c: v >= 0, "must be >= 0"),
    (("cooldown_frac", "min_lr_frac"), lambda v, c: 0 <= v <= 1, "must be in [0, 1]"),
    (("momentum_muon", "normuon"), lambda v, c: 0 <= v <= 0.999, "must be in [0, 0.999]"),
    (("n_head",), lambda v, c: c["n_embd"] % v == 0, "must divide n_embd={n_embd} (the head size is n_embd / n_head)"),
    (("n_embd",), lambda v, c: v // c["n_head"] % 2 == 0,
     "n_embd / n_head must be even (rotary rotates channel pairs; n_head={n_head})"),
    (("vocab_top",), lambda v, c: v == 0 or 2 <= v <= 65536, "use 0 (all tokens) or a size in 2..65536"),
    (("ns_method",), lambda v, c: v in ORTHOGONALIZERS, f"use one of {', '.join(ORTHOGONALIZERS)}"),
    (("adamw_groups",), lambda v, c: v in ("per_group", "one_lr"), "use per_group or one_lr"),
    (("muon_split",), lambda v, c: v in ("none", "qkv", "heads"), "use none, qkv or heads"),
    (("muon_split",), lambda v, c: v == "none" or c["fused_qkv"],
     "splits the fused qkv weight: set --fused_qkv=True too (separate q, k, v are orthogonalized apart already)"),
    (("grad_accum_steps",), lambda v, c: v % int(os.environ.get("WORLD_SIZE", 1)) == 0,
     "must be divisible by the number of processes (WORLD_SIZE, set by torchrun)"),
    (("device",), lambda v, c: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"), "use auto, cpu or cuda"),
    (("device",), lambda v, c: v in ("auto", "cpu") or torch.cuda.is_available(),
     "no CUDA device on this machine; use --device=cpu (or auto)"),
)


def check_settings(cfg):
    """Stop with one line (the setting, its bad value, the fix) before anything trains; returns the runs."""
    for keys, ok, fix in CHECKS:
        for key in (k for k in keys if not ok(cfg[k], cfg)):
            raise SystemExit(f"--{key}={cfg[key]}: {fix.format(**cfg)}")
    parse_betas(cfg["betas_adam"], "betas_adam"), parse_betas(cfg["betas_adamw"], "betas_adamw")
    return parse_optimizers(cfg["optimizers"])


def parse_optimizers(spec):
    """'muon,adamw:2e-3' -> [('muon', None, 'muon'), ('adamw', 0.002, 'adamw:0.002')]: name, lr, run label."""
    runs = []
    for item in spec.split(","):
        name, _, lr = item.strip().partition(":")
        if name not in ("muon", "adamw"):
            raise SystemExit(f"--optimizers={spec}: unknown optimizer {name!r}; use muon and/or adamw, each "
                             f"optionally with :lr")
        try:
            lr = float(lr) if lr else None
        except ValueError:
            raise SystemExit(f"--optimizers={spec}: {lr!r} is not a learning rate; write e.g. muon:0.03") from None
        if lr is not None and not lr > 0:
            raise SystemExit(f"--optimizers={spec}: a learning rate must be > 0")
        runs.append((name, lr, name if lr is None else f"{name}:{lr:g}"))
    if len({label for _, _, label in runs}) != len(runs):
        raise SystemExit(f"--optimizers={spec}: lists a run twice; give each its own lr")
    return runs


def parse_betas(text, key):
    """'0.9,0.95' -> (0.9, 0.95), each in [0, 1)."""
    try:
        b1, b2 = (float(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"--{key}={text}: expected two comma-separated numbers, e.g. --{key}=0.9,0.95") from None
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise SystemExit(f"--{key}={text}: each beta must be in [0, 1), e.g. --{key}=0.9,0.95")
    return b1, b2


def code_hash():
    """Hash of the code that determines a run (trainer, model, optimizer)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return source_hash(*(os.path.join(here, f) for f in CODE_FILES))


# ---- Data: llm.c shards, memory-mapped
def find_shards(data_dir, pattern):
    if not os.path.isdir(data_dir):
        raise SystemExit(f"error: data_dir {data_dir!r} does not exist; create shards with `python prepare_fineweb.py` "
                         f"(FineWeb-Edu) or `python prepare_fineweb.py --input='texts/*.txt' --out_dir={data_dir}`, "
                         f"or pass --data_dir=...")
    files = sorted(glob.glob(os.path.join(data_dir, pattern)))
    if not files:
        raise SystemExit(f"error: no shards matching {pattern!r} in {data_dir!r}; prepare_fineweb.py writes "
                         f"fineweb_val_000000.bin and fineweb_train_000001.bin, ... (if only the val shard is there, "
                         f"rerun it with a smaller --shard_size)")
    return files


def build_vocab_map(shards, top):
    """Lookup table token id -> new id: the top-1 most frequent ids of the (train) shards get 0..top-2 by
    frequency, every other id maps to top-1 (so nothing is learned from the val shard)."""
    counts = np.zeros(65536, dtype=np.int64)
    for tokens in shards:
        counts += np.bincount(tokens, minlength=65536)
    table = np.full(65536, top - 1, dtype=np.int64)
    table[np.argsort(-counts, kind="stable")[:top - 1]] = np.arange(top - 1)
    return table


class DataLoader:
    """Each step's (x, y) micro-batches. A shard is cut into steps of `span` tokens (every rank's windows of one step);
    the seed shuffles the order of a shard's steps (None: in order), so each seed sees other batches and none twice
    before the shard is used up. Micro-step i of rank r reads window i * world + r of its step: ranks read disjoint
    data. (shard, step) is where to resume."""

    def __init__(self, files, B, T, rank=0, world=1, accum=1, vocab_map=None, seed=None):
        self.shards, self.vocab_map, self.seed = [read_shard(f) for f in files], vocab_map, seed
        self.B, self.T, self.rank, self.world, self.accum = B, T, rank, world, accum
        self.span = world * accum * B * T  # tokens per step, all ranks together
        if all(len(s) < self.span + 1 for s in self.shards):
            raise ValueError(f"every shard is shorter than one step of {self.span + 1:,} tokens (processes x "
                             f"grad_accum_steps x batch {B} x block {T} + 1); use a smaller batch_size/block_size "
                             f"or a larger --shard_size in prepare_fineweb.py")
        self.shard, self.step, self.order = 0, 0, None

    def next_batches(self):
        """accum (x, y) pairs of shape (B, T) for this rank's share of the next step."""
        while self.step >= (len(self.shards[self.shard]) - 1) // self.span:
            self.shard, self.step, self.order = (self.shard + 1) % len(self.shards), 0, None
        if self.order is None:  # the shard's steps in this seed's order
            n = (len(self.shards[self.shard]) - 1) // self.span
            rng = None if self.seed is None else np.random.default_rng([self.seed, self.shard])
            self.order = np.arange(n) if rng is None else rng.permutation(n)
        pos = int(self.order[self.step]) * self.span
        self.step += 1
        starts = [pos + (i * self.world + self.rank) * self.B * self.T for i in range(self.accum)]
        return [batch(self.shards[self.shard], start, self.B, self.T, self.vocab_map) for start in starts]


def batch(tokens, start, B, T, vocab_map=None):
    """(x, y) of shape (B, T): B*T tokens from `start` and, shifted by one, the tokens that follow them."""
    buf = np.asarray(tokens[start:start + B * T + 1], dtype=np.int64)
    buf = torch.from_numpy(vocab_map[buf] if vocab_map is not None else buf)
    return buf[:-1].view(B, T), buf[1:].view(B, T)


def load_data(cfg, files, val_file, world, vocab_map=None):
    """(vocab table or None, val windows), checked so that the first errors say what is wrong and how to fix it. The
    val windows are eval_tokens // (batch_size * block_size) (x, y) batches spread evenly over the val shard, so the
    val loss covers many of its documents. A resumed run passes its checkpoint's vocab table (not recounted)."""
    B, T = cfg["batch_size"], cfg["block_size"]
    try:
        DataLoader(files, B, T, 0, world, cfg["grad_accum_steps"] // world)
        if cfg["vocab_top"] and vocab_map is None:
            vocab_map = build_vocab_map([read_shard(f) for f in files], cfg["vocab_top"])
        val, first = read_shard(val_file), read_shard(files[0])
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    n = min(cfg["eval_tokens"], len(val) - 1) // (B * T)
    if n == 0:
        raise SystemExit(f"error: {min(cfg['eval_tokens'], len(val) - 1)} val tokens (eval_tokens, or the val shard's "
                         f"size) are less than one batch ({B}x{T}); raise eval_tokens or lower batch_size/block_size")
    stride = (len(val) - 1 - B * T) // max(n - 1, 1)
    windows = [batch(val, i * stride, B, T, vocab_map) for i in range(n)]
    first = vocab_map[first] if vocab_map is not None else first
    top_id = max(int(first.max()), *(int(torch.cat([x, y]).max()) for x, y in windows))
    if top_id >= cfg["vocab_size"]:
        raise SystemExit(f"error: the shards hold token id {top_id} but vocab_size={cfg['vocab_size']}; raise "
                         f"--vocab_size (50304 for GPT-2 BPE) or use --vocab_top=N")
    return vocab_map, windows


# ---- Schedules: pure functions of the step
def lr_multiplier(step, max_steps, warmup_steps, cooldown_frac, min_lr_frac=0.0):
    """WSD: linear warmup to 1, constant, then linear decay to min_lr_frac over the last cooldown_frac."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    cooldown_start = max_steps * (1 - cooldown_frac)
    progress = (step - cooldown_start) / max(1.0, max_steps - cooldown_start)
    return 1.0 if step < cooldown_start else 1.0 - (1.0 - min_lr_frac) * min(progress, 1.0)


def muon_momentum_at(step, warmup, final=0.95, start=0.85):
    """Muon's momentum rises linearly from `start` to `final` over the first `warmup` steps (modded-nanogpt)."""
    return final if warmup <= 0 else start + (final - start) * min(step / warmup, 1.0)


# ---- Model, optimizer, distributed setup
def make_optimizer(name, model, cfg, lr=None):
    """Muon or AdamW on the hidden matrices (>= 2D, in the blocks), the same Adam groups on the head, the embedding
    and < 2D parameters (one_lr: AdamW on all); `lr` overrides the hidden matrices' lr. See results/lm.md."""
    params = dict(model.named_parameters())
    adamw = dict(lr=lr or cfg["lr_adamw"], betas=parse_betas(cfg["betas_adamw"], "betas_adamw"), eps=cfg["eps_adamw"])
    if name == "adamw" and cfg["adamw_groups"] == "one_lr":
        groups = [dict(params=[p for p in params.values() if p.ndim >= 2], weight_decay=cfg["weight_decay"]),
                  dict(params=[p for p in params.values() if p.ndim < 2], weight_decay=0.0)]
        return torch.optim.AdamW([g for g in groups if g["params"]], **adamw)
    adam = dict(use_muon=False, betas=parse_betas(cfg["betas_adam"], "betas_adam"), eps=cfg["eps_adam"],
                weight_decay=0.0)
    groups = [dict(params=[model.lm_head.weight], lr=cfg["lr_head"], name="head", **adam),
              dict(params=[model.wte.weight], lr=cfg["lr_embed"], name="embed", **adam),
              dict(params=[p for p in params.values() if p.ndim < 2], lr=cfg["lr_scalar"], name="scalar", **adam)]
    hidden = {n: p for n, p in params.items() if n.startswith("blocks.") and p.ndim >= 2}
    if name == "adamw":
        hidden_group = dict(params=list(hidden.values()), weight_decay=cfg["weight_decay"], name="adamw", **adamw)
        return torch.optim.AdamW([g for g in [hidden_group] + groups if g["params"]])
    split = dict(none=None, qkv=3, heads=3 * cfg["n_head"])[cfg["muon_split"]]  # rows of qkv in blocks
    fused = [n for n in hidden if split and n.endswith(".attn.qkv.weight")]
    muon = dict(use_muon=True, lr=lr or cfg["lr_muon"], momentum=cfg["momentum_muon"], ns_method=cfg["ns_method"],
                weight_decay=cfg["weight_decay_muon"], normuon=cfg["normuon"] or None, cautious_wd=cfg["cautious_wd"])
    groups[:0] = [dict(params=[p for n, p in hidden.items() if n not in fused], name="muon", **muon),
                  dict(params=[hidden[n] for n in fused], name="muon_fused", split=split, **muon)]
    return Muon([g for g in groups if g["params"]])


def setup_distributed(cfg):
    """rank, world size, device. Under torchrun (RANK set) this joins the process group (NCCL on CUDA, gloo on
    CPU); --fsdp=True in a plain process makes a 1-rank group. A group the caller made is used as it is."""
    launched, cuda = "RANK" in os.environ, torch.cuda.is_available() and cfg["device"] != "cpu"
    if (launched or cfg["fsdp"]) and not dist.is_initialized():
        store = {} if launched else dict(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group(backend="nccl" if cuda else "gloo", **store)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not cuda:
        device = "cpu"
    elif launched:
        device = f"cuda:{local_rank}"
    else:  # set_device needs an index: "cuda" is the current device (CUDA_VISIBLE_DEVICES picks it)
        device = cfg["device"] if cfg["device"].startswith("cuda:") else f"cuda:{torch.cuda.current_device()}"
    if cuda:
        torch.cuda.set_device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return dict(rank=rank, world=world, local_rank=local_rank, device=device, master=rank == 0, fsdp=cfg["fsdp"],
                device_type="cuda" if cuda else "cpu", ddp=launched and not cfg["fsdp"])


def build_run(name, lr, cfg, env):
    """The model (seeded: every run starts from the same weights; FSDP: each block sharded, then the root), its
    optimizer, and the module that runs the training forward pass (compiled, then DDP-wrapped, as in nanoGPT)."""
    torch.manual_seed(cfg["seed"])
    model = GPT(GPTConfig(**{k: cfg[k] for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd",
                                                  "fused_qkv")})).to(env["device"])
    cuda = env["device_type"] == "cuda"
    if env["fsdp"]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(env["device_type"], (env["world"],))  # on this process group
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else None, reduce_dtype=torch.float32)
        for module in (*model.blocks, model):
            fully_shard(module, mesh=mesh, mp_policy=policy)
    optimizer = make_optimizer(name, model, cfg, lr)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    fwd = torch.compile(model) if cfg["compile"] and cuda else model
    if env["ddp"]:
        fwd = torch.nn.parallel.DistributedDataParallel(fwd, device_ids=[env["local_rank"]] if cuda else None)
    return model, optimizer, fwd


def any_rank(flag, env):
    """True if `flag` is true on any rank: every rank must take the same branch before a collective."""
    if env["world"] == 1:
        return bool(flag)
    t = torch.tensor([int(bool(flag))], device=env["device"])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ---- Checkpoints: one per run in out_dir/ckpt/, atomic
def checkpoint_path(out, label, use_fsdp):
    """out/ckpt/<run>.pt, or under FSDP a torch.distributed.checkpoint directory out/ckpt/<run>/ (meta.pt inside)."""
    return os.path.join(out, "ckpt", label.replace(":", "_") + ("" if use_fsdp else ".pt"))


def meta_file(path, use_fsdp):
    return os.path.join(path, "meta.pt") if use_fsdp else path


def find_checkpoint(path, use_fsdp):
    """The checkpoint to resume from, or None. An FSDP checkpoint is swapped in by two renames (path -> path.old,
    path.tmp -> path): after a crash between them path.tmp is the newest whole one (meta.pt is written last)."""
    candidates = (path, path + ".tmp", path + ".old") if use_fsdp else (path,)
    return next((p for p in candidates if os.path.exists(meta_file(p, use_fsdp))), None)


def write_checkpoint(path, meta, model, optimizer, env):
    """One process / DDP: rank 0 saves one file. FSDP: every rank's shards go into path.tmp, rank 0 adds meta.pt and
    swaps it into place (first finishing a swap a crash interrupted): find_checkpoint always finds a whole one."""
    if not env["fsdp"]:
        if env["master"]:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_save(dict(meta, model=model.state_dict(), optimizer=optimizer.state_dict()), path)
        return
    tmp, old = path + ".tmp", path + ".old"
    if env["master"]:
        if not os.path.exists(path) and os.path.exists(meta_file(tmp, True)):
            os.replace(tmp, path)
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    import torch.distributed.checkpoint as dcp  # imported only here: it takes a second, and only FSDP needs it
    from torch.distributed.checkpoint.state_dict import get_state_dict
    dcp.save(dict(zip(("model", "optimizer"), get_state_dict(model, optimizer))), checkpoint_id=tmp)
    if env["master"]:
        atomic_save(meta, meta_file(tmp, True))
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def read_checkpoint(path, meta, model, optimizer, env):
    """Load what write_checkpoint wrote (meta: what resume_point read; FSDP reshards from any number of ranks).
    load_state_dict restores the saved param-group options: this run's are put back, so the command line wins."""
    configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if env["fsdp"]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        state = dict(zip(("model", "optimizer"), get_state_dict(model, optimizer)))
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    else:
        model.load_state_dict(meta.pop("model"))
        optimizer.load_state_dict(meta.pop("optimizer"))
    for group, options in zip(optimizer.param_groups, configured):
        group.update(options)


def resume_point(label, identity, cfg):
    """(path, meta) of the run's checkpoint, or (None, {}) if it has none. Stops unless the checkpoint is of this
    very run: its identity may differ only in RESUMABLE settings."""
    path = find_checkpoint(checkpoint_path(cfg["out_dir"], label, cfg["fsdp"]), cfg["fsdp"])
    if path is None:
        other = find_checkpoint(checkpoint_path(cfg["out_dir"], label, not cfg["fsdp"]), not cfg["fsdp"])
        if other:
            raise SystemExit(f"{other} was written {'without' if cfg['fsdp'] else 'with'} --fsdp=True; resume with "
                             f"--fsdp={not cfg['fsdp']}")
        return None, {}
    meta = load_checkpoint(meta_file(path, cfg["fsdp"]), SCRIPT)
    fix = "--resume=False to start over, or another --out_dir"
    if "identity" not in meta:
        raise SystemExit(f"cannot resume from {path}: it records no run identity (an older train_muon.py); {fix}")
    diff = identity_diff(meta["identity"], identity, RESUMABLE)
    if diff:
        raise SystemExit(f"cannot resume from {path}: it is another run ({'; '.join(diff)}). Resume with the "
                         f"checkpoint's settings, code and data, or use {fix}")
    return path, meta


# ---- Evaluation, the plot, stop requests
def evaluate(model, windows, env, autocast):
    """Mean loss over the val windows, split among ranks. Under FSDP every rank runs as many forward passes as the
    others (each all-gathers weights): a rank short of one runs an uncounted padding one."""
    n = len(windows)
    rounds = -(-n // env["world"]) * env["world"] if env["fsdp"] else n
    total = torch.zeros(2, dtype=torch.float64, device=env["device"])  # loss sum, windows
    model.eval()
    with torch.no_grad():
        for i in range(env["rank"], rounds, env["world"]):
            x, y = windows[i if i < n else 0]
            with autocast:
                loss = model(x.to(env["device"]), y.to(env["device"])).item()
            total += torch.tensor([loss, 1.0], dtype=torch.float64, device=env["device"]) * (i < n)
    model.train()
    if env["world"] > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def save_metrics(metrics, out):
    """metrics.json, and loss.png: per run the train loss (thin, smoothed) and the val loss against step and time."""
    atomic_write_json(metrics, os.path.join(out, "metrics.json"))
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing to close
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for i, (label, run) in enumerate(metrics["runs"].items()):
        if run["train"]:  # moving average: per-step losses of small batches are noisy
            k = max(1, len(run["train"]) // 50)
            smooth = np.convolve([p["loss"] for p in run["train"]], np.ones(k) / k, mode="valid")
            ax1.plot([p["step"] for p in run["train"]][k - 1:], smooth, color=f"C{i}", alpha=0.35, lw=0.8)
        for ax, x in ((ax1, "step"), (ax2, "time")):
            ax.plot([p[x] for p in run["val"]], [p["loss"] for p in run["val"]], "o-", color=f"C{i}", ms=3, label=label)
    ax1.set(xlabel="step", ylabel="loss", title="train (thin, smoothed) and validation loss")
    ax2.set(xlabel="training time (s, excluding eval)", ylabel="validation loss", title="validation loss vs time")
    vals = sorted(p["loss"] for r in metrics["runs"].values() for p in r["val"]) or [0.0]
    lo, hi = vals[0], vals[len(vals) // 2]  # zoom on the interesting part: the first eval (ln vocab) dwarfs the rest
    for ax in (ax1, ax2):
        ax.set(ylim=(lo - 0.1 * (hi - lo) - 0.05, hi + 0.6 * (hi - lo) + 0.1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=80)


class StopRequest:
    """First Ctrl-C (SIGINT) or SIGTERM: finish the current step, checkpoint and exit; a second Ctrl-C aborts at
    once. Deferring to the step boundary keeps every run's model and optimizer consistent."""

    def __init__(self):
        self.signal, self._old = None, {}  # signal: "SIGINT" or "SIGTERM" once one came
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. under some test runners)
                pass

    def _handler(self, signum, frame):
        if self.signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---- Training
def train_step(step, model, optimizer, fwd, loader, cfg, env, autocast):
    """One optimizer step: the scheduled lr (and Muon momentum), grad_accum_steps micro-steps split among the ranks
    (gradients reduced on the last one only), clipping, the update. Returns (mean train loss, lr multiplier)."""
    lr_mult = lr_multiplier(step, cfg["max_steps"], cfg["warmup_steps"], cfg["cooldown_frac"], cfg["min_lr_frac"])
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_mult
        if group.get("use_muon"):
            group["momentum"] = muon_momentum_at(step, cfg["momentum_muon_warmup"], cfg["momentum_muon"])
    accum, loss_sum = cfg["grad_accum_steps"] // env["world"], torch.zeros((), device=env["device"])
    for i, (x, y) in enumerate(loader.next_batches()):
        if env["ddp"]:
            fwd.require_backward_grad_sync = i == accum - 1
        if env["fsdp"]:
            model.set_requires_gradient_sync(i == accum - 1)
        with autocast:
            loss = fwd(x.to(env["device"], non_blocking=True), y.to(env["device"], non_blocking=True))
        (loss / accum).backward()
        loss_sum += loss.detach()
    if cfg["grad_clip"]:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if env["world"] > 1:
        dist.all_reduce(loss_sum)
    return loss_sum.item() / (accum * env["world"]), lr_mult


def print_end(label, status, what, step, path, last_good, cfg):
    """How a run that did not finish ended, and how to go on."""
    if status == "diverged":
        kept = f"the last good checkpoint ({path}, step {last_good}) is kept" if last_good else "none was saved before"
        print(f"error: non-finite {what} in run {label!r} at step {step}; stopping without saving this state, "
              f"{kept}. Lower the learning rate, add warmup (--warmup_steps) or set --grad_clip=1.0, and "
              f"start over with --resume=False", file=sys.stderr)
    elif status == "stopped":
        tqdm.write(f"{label}: stopped at step {step}; " + (
            f"checkpoint {path}; continue with --resume=True" if cfg["save_checkpoint"] else
            "no checkpoint (--save_checkpoint=False): a rerun starts this run over"))


def train_run(label, name, lr, cfg, env, data, metrics, budget, stop):
    """Train one run to max_steps, from the shared initial weights or where its checkpoint left off (weights,
    optimizer, data position, RNG, the metrics so far). Returns (steps trained here, status): "finished";
    "stopped" after `budget` steps of this invocation or on Ctrl-C / SIGTERM, checkpointed; "diverged" on a
    non-finite loss or weights, that state unsaved (the last good checkpoint stays)."""
    model, optimizer, fwd = build_run(name, lr, cfg, env)
    B, T, world, device, master = cfg["batch_size"], cfg["block_size"], env["world"], env["device"], env["master"]
    accum, tokens_per_step, max_steps = cfg["grad_accum_steps"] // world, metrics["tokens_per_step"], cfg["max_steps"]
    loader = DataLoader(data["files"], B, T, env["rank"], world, accum, data["vocab_map"], cfg["seed"])
    run = metrics["runs"][label] = dict(identity=data["identities"][label], status="training", train=[], val=[])
    resumed_from, meta = data["resume"].get(label, (None, {}))
    if meta:
        read_checkpoint(resumed_from, meta, model, optimizer, env)
        loader.shard, loader.step = meta["loader"]["shard"], meta["loader"]["step"]
        set_rng_state(meta["rng"])
        run.update(meta["run_metrics"], identity=run["identity"], status="training")
    metrics["num_params"] = model.num_params()
    if master:
        print(f"{label}: {model.num_params() / 1e6:.1f}M parameters, {tokens_per_step:,} tokens/step "
              f"({world} x {accum} x {B} x {T}), device {device}{', FSDP' if env['fsdp'] else ''}"
              + (f", resumed from {resumed_from} at step {meta['step']}" if meta else ""))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if env["device_type"] == "cuda" else nullcontext()
    path = checkpoint_path(cfg["out_dir"], label, env["fsdp"])
    step, train_time, last_good, trained = meta.get("step", 0), meta.get("train_time", 0.0), meta.get("step"), 0
    wb = None
    if master and cfg["wandb_log"]:  # wandb is imported only when asked for; a resumed run continues its own
        import wandb
        wb = wandb.init(project=cfg["wandb_project"], id=meta.get("wandb_id"), resume="allow", dir=cfg["out_dir"],
                        name=f"{cfg['wandb_run_name'] or os.path.basename(os.path.normpath(cfg['out_dir']))}-{label}",
                        config=dict(cfg, run=label))

    def checkpoint(status):
        """Save the run (unless --save_checkpoint=False); False, saving nothing, if a weight is not finite."""
        local = (p.to_local() if hasattr(p, "to_local") else p for p in model.parameters())
        if any_rank(not all(torch.isfinite(p).all() for p in local), env):
            return False
        run["status"] = status
        if cfg["save_checkpoint"]:
            write_checkpoint(path, dict(
                script=SCRIPT, code=metrics["code"], identity=run["identity"], config=cfg, label=label, step=step,
                train_time=train_time, loader=dict(shard=loader.shard, step=loader.step), rng=rng_state(),
                run_metrics=run, vocab_map=data["vocab_map"], finished=status == "finished",
                train_shards=[os.path.basename(f) for f in data["files"]],
                wandb_id=wb.id if wb else meta.get("wandb_id")), model, optimizer, env)
        return True

    bar = tqdm(total=max_steps, initial=step, desc=label, disable=not master, dynamic_ncols=True)
    status, what = "training", "weights"  # what: the non-finite thing if the run diverges
    try:
        while status == "training":
            if step % cfg["eval_every"] == 0 or step == max_steps:
                loss = evaluate(model, data["val_windows"], env, autocast)
                run["val"].append(dict(step=step, loss=loss, time=train_time, tokens=step * tokens_per_step))
                if wb:
                    wb.log(dict(val_loss=loss, time=train_time, tokens=step * tokens_per_step), step=step)
                if master:
                    tqdm.write(f"step {step:5d} | {label:>12} | val loss {loss:.4f}")
                    save_metrics(metrics, cfg["out_dir"])
            if step == max_steps:
                status = "finished"
                break
            t0 = time.perf_counter()
            loss_value, lr_mult = train_step(step, model, optimizer, fwd, loader, cfg, env, autocast)
            dt = time.perf_counter() - t0  # train_step ends in .item(), which syncs the device: the time is real
            train_time, step, trained = train_time + dt, step + 1, trained + 1
            if not math.isfinite(loss_value):
                status, what = "diverged", f"training loss ({loss_value})"
                break
            mfu = model.estimate_mfu(tokens_per_step / world, dt, seq_len=T) if env["device_type"] == "cuda" else None
            point = dict(step=step, loss=loss_value, lr=lr_mult, tok_s=tokens_per_step / dt, time=train_time)
            run["train"].append(point if mfu is None else dict(point, mfu=mfu))  # MFU: CUDA with a known peak
            if wb:
                wb.log(dict(train_loss=loss_value, lr=lr_mult, tok_s=tokens_per_step / dt, time=train_time), step=step)
            if master and (step % cfg["log_every"] == 0 or step == 1):
                tqdm.write(f"step {step:5d} | {label:>12} | loss {loss_value:.4f} | lr x{lr_mult:.3f} | "
                           f"{tokens_per_step / dt:,.0f} tok/s" + (f" | mfu {100 * mfu:.1f}%" if mfu else ""))
            bar.update(1)
            if step < max_steps and any_rank(stop.signal or trained >= budget, env):
                status = "stopped"
            elif cfg["ckpt_every"] and step % cfg["ckpt_every"] == 0:
                if not checkpoint("training"):
                    status = "diverged"
                elif cfg["save_checkpoint"]:
                    last_good = step
        if status != "diverged" and not checkpoint(status):  # finished or stopped: checkpointed
            status = "diverged"
        run["status"] = status
        if master:
            save_metrics(metrics, cfg["out_dir"])
            print_end(label, status, what, step, path, last_good, cfg)
        return trained, status
    finally:
        bar.close()
        if wb:
            wb.finish()


def train(cfg):
    """Check every setting, find the data and the checkpoints, then train the runs of cfg['optimizers'] one after
    another until they finish or this invocation stops. Returns the metrics (also in out_dir/metrics.json)."""
    runs = check_settings(cfg)
    own_group = not dist.is_initialized()
    env = setup_distributed(cfg)
    stop = StopRequest()
    try:
        if cfg["threads"]:
            torch.set_num_threads(cfg["threads"])
        torch.set_flush_denormal(True)  # CPU: subnormal floats late in long runs slow float math; flush them to 0
        files, (val_file, *_) = (find_shards(cfg["data_dir"], cfg[k]) for k in ("train_files", "val_files"))
        cfg = dict(cfg, vocab_size=cfg["vocab_top"] or cfg["vocab_size"])
        # a run's identity: the resolved settings (its label for the optimizer list), the compute dtype, code and data
        settings = dict({k: v for k, v in cfg.items() if k != "optimizers"}, device=env["device_type"],
                        compute_dtype=compute_dtype_rule(env["device"]))
        code, data_hash = code_hash(), data_fingerprint(files + [val_file])
        identities = {label: run_identity(dict(settings, run=label), code, data_hash) for _, _, label in runs}
        resume = {label: resume_point(label, identities[label], cfg) for label in identities} if cfg["resume"] else {}
        if cfg["resume"] and not any(meta for _, meta in resume.values()):  # stops with "no checkpoint at ..."
            load_checkpoint(meta_file(checkpoint_path(cfg["out_dir"], runs[0][2], cfg["fsdp"]), cfg["fsdp"]), SCRIPT)
        saved = next((meta for _, meta in resume.values() if meta), {})
        vocab_map, val_windows = load_data(cfg, files, val_file, env["world"], saved.get("vocab_map"))
        data = dict(files=files, vocab_map=vocab_map, val_windows=val_windows, resume=resume, identities=identities)
        metrics = dict(config=cfg, code=code, tokens_per_step=cfg["batch_size"] * cfg["block_size"] *
                       cfg["grad_accum_steps"], world_size=env["world"], device=env["device"], runs={})
        os.makedirs(cfg["out_dir"], exist_ok=True)
        budget = cfg["stop_after_steps"] or math.inf  # steps left in this invocation, all runs together
        for name, lr, label in runs:
            meta = resume.get(label, (None, {}))[1]
            if meta.get("finished"):
                metrics["runs"][label] = meta["run_metrics"]
                continue
            if budget <= 0 or stop.signal:
                if env["master"]:
                    print(f"stopped before run {label}" + ("; continue with --resume=True" if cfg["save_checkpoint"]
                                                          else " (--save_checkpoint=False: a rerun starts over)"))
                break
            trained, status = train_run(label, name, lr, cfg, env, data, metrics, budget, stop)
            budget -= trained
            if status == "stopped":
                break
        finals = {label: r["val"][-1]["loss"] for label, r in metrics["runs"].items() if r["status"] == "finished"}
        complete = len(finals) == len(runs)
        metrics["stopped_by"] = None if complete else stop.signal  # SIGINT / SIGTERM: the exit status says so
        if complete:
            metrics["summary"] = dict(final_val=finals)
        if env["master"]:
            print("".join(f"{label:>12}: final val loss {loss:.4f}\n" for label, loss in finals.items()), end="")
            save_metrics(metrics, cfg["out_dir"])
        return metrics
    finally:
        stop.restore()
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def exit_status(metrics):
    """3 if a run diverged; 130 / 143 if Ctrl-C / SIGTERM stopped a run; else 0 (finished, or stop_after_steps)."""
    if any(run["status"] == "diverged" for run in metrics["runs"].values()):
        return 3
    return 128 + signal.Signals[metrics["stopped_by"]] if metrics["stopped_by"] else 0


if __name__ == "__main__":
    config = parse_overrides(sys.argv[1:], CONFIG)
    if config["dry_run"]:
        check_settings(config)
        print("dry run: every setting is valid")
        raise SystemExit(0)
    raise SystemExit(exit_status(train(config)))
