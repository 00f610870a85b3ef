"""
train_ngpt.py -- nGPT (the normalized transformer, Loshchilov et al. 2024, arXiv 2410.01131) trained
with Adam or with Muon while every weight vector stays on its unit hypersphere (results/ngpt.md).

    python train_ngpt.py                                   # GPU-sized defaults, shards from prepare_fineweb.py
    python train_ngpt.py --optimizer=adam --lr_adam=5e-4   # the paper's baseline
    python train_ngpt.py --sphere=geodesic                 # Muon steps along great circles
    python train_ngpt.py --stop_after_steps=500            # checkpoint and exit; --resume=True continues exactly
    python train_ngpt.py --wandb_log=True                  # also log metrics.json's numbers to Weights & Biases
    python study_ngpt.py --sweep=lr                        # the sweeps: lr | proj_every | update | toggles

Every constant below can be overridden as --name=value (--help lists them). The model lives in this file;
staying on the sphere ('project', 'geodesic', 'geodesic_scaled', lazy projection) is a per-group option of
muon_optim.Muon. Data: llm.c / modded-nanogpt token shards (prepare_fineweb.py). metrics.json and ckpt.pt
record the run's identity (settings, code, data); --resume=True continues only a matching checkpoint.
"""
import glob
import hashlib
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import muon_optim
from muon_optim import Muon

# -----------------------------------------------------------------------------
# Config: edit here or override with --name=value

# data (shards from prepare_fineweb.py)
data_dir = "data/fineweb_edu"
train_files = "fineweb_train_*.bin"
val_files = "fineweb_val_*.bin"
vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 64 (the padding rows are never targets)
vocab_top = 0  # 0: the tokens as they are; N: keep the N-1 most frequent train tokens, the rest -> id N-1 (CPU recipe)
# model (GPT-2 small class, the size of train_muon.py's GPT)
n_layer = 12
n_head = 6
n_embd = 768
block_size = 1024
mlp_ratio = 4  # SwiGLU hidden size = mlp_ratio * n_embd (for each of u and v)
# batch: batch_size x block_size tokens per micro-step, grad_accum_steps micro-steps per step (65,536 tokens)
batch_size = 8
grad_accum_steps = 8
# optimizer and schedule (nGPT: no warmup, no weight decay)
optimizer = "muon"  # 'muon' (Muon on the matrices, Adam on embed/head/scalars) | 'adam' (the paper's baseline)
max_steps = 6000
cooldown_frac = 0.3  # constant LR, then linear decay to 0 over the last 30%
lr_muon = 0.01  # Muon on the hidden matrices
momentum_muon = 0.95
ns_method = "newton_schulz"  # 'newton_schulz' (NS5) | 'polar_express' | 'gram_newton_schulz'
normuon = 0.0  # NorMuon beta2 (e.g. 0.95); 0.0 = off
weight_decay_muon = 0.0  # on the hidden matrices; a uniform decay is undone by the projection anyway
lr_embed = 5e-4  # the Muon run's Adam groups: embedding, head, scalars (alphas and scales)
lr_head = 5e-4
lr_scalar = 5e-4
lr_adam = 5e-4  # optimizer='adam': Adam on every parameter
weight_decay = 0.0  # optimizer='adam': decay on the hidden matrices
betas_adam = "0.9,0.95"  # every Adam group, in both runs
eps_adam = 1e-8
cautious_wd = False  # decay only where update and weight agree in sign (this one survives the projection)
sphere = "project"  # how hidden matrices stay on the sphere: 'project' | 'geodesic' | 'geodesic_scaled'
proj_every = 1  # lazy projection: renormalize every k steps ('project' only; embed/head follow it too)
# evaluation, checkpoints, logging
eval_every = 250
eval_tokens = 10 * 65536  # a fixed slice from the start of the val shard
ckpt_every = 1000  # 0 = only at the end and on Ctrl-C
stop_after_steps = 0  # > 0: train at most this many steps per invocation, checkpoint, exit; --resume=True continues
save_checkpoint = True  # False: no ckpt.pt (study_ngpt.py's runs)
resume = False  # continue from out_dir/ckpt.pt (its run identity required, except the RESUMABLE settings)
dry_run = False  # True: check every setting, print the run identity as JSON (no data hash), exit (study_ngpt.py)
out_dir = "out/ngpt"
wandb_log = False  # True: also log the metrics.json numbers to wandb (pip install wandb)
wandb_project = "muon-lab"
wandb_run_name = ""  # '' = ngpt-<optimizer>-<out_dir's last folder>
# system
device = "auto"  # auto = cuda if available, else cpu
compile = True  # torch.compile (CUDA only; ignored on CPU)
threads = 0  # CPU threads for torch (0 = torch's default)
seed = 1337
# -----------------------------------------------------------------------------
CONFIG = {k: v for k, v in dict(globals()).items()
          if not k.startswith("_") and k.islower() and isinstance(v, (int, float, str))}
# not in a run's identity: where the data and the run are, how fast it runs and how often it saves (device and
# compile enter resolved, the data as the fingerprint of the shards read); an Adam run ignores the Muon knobs
# and a Muon run the Adam baseline's, so the sweeps share those runs
NOT_RUN_SETTINGS = ("data_dir", "train_files", "val_files", "out_dir", "resume", "dry_run", "save_checkpoint",
                    "ckpt_every", "stop_after_steps", "device", "compile", "threads", "wandb_log", "wandb_project",
                    "wandb_run_name")
MUON_ONLY = ("lr_muon", "momentum_muon", "ns_method", "normuon", "weight_decay_muon", "lr_embed", "lr_head",
             "lr_scalar")
ADAM_ONLY = ("lr_adam", "weight_decay")
# what --resume=True may change, all else in the identity must match: the resumed run computes the same numbers
# (moved shards have the same fingerprint; eval_every moves only the evals, compile only CUDA's float rounding)
RESUMABLE = ("eval_every", "ckpt_every", "stop_after_steps", "save_checkpoint", "out_dir", "data_dir", "train_files",
             "val_files", "threads", "compile", "wandb_log", "wandb_project", "wandb_run_name")
AT_LEAST_1 = ("n_layer", "n_head", "n_embd", "block_size", "mlp_ratio", "batch_size", "grad_accum_steps", "max_steps",
              "eval_every", "eval_tokens", "proj_every", "vocab_size")
AT_LEAST_0 = ("ckpt_every", "stop_after_steps", "threads", "lr_muon", "lr_embed", "lr_head", "lr_scalar", "lr_adam",
              "weight_decay_muon", "weight_decay")
CHOICES = dict(optimizer=("muon", "adam"), sphere=("project", "geodesic", "geodesic_scaled"),
               ns_method=("newton_schulz", "polar_express", "gram_newton_schulz"))
SOURCE_FILES = (os.path.abspath(__file__), muon_optim.__file__)  # the code a run executes

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


SOURCE_HASH = source_hash(*SOURCE_FILES)


# -----------------------------------------------------------------------------
# Settings: checked before anything runs; a run's identity

def check_config(cfg):
    """Stop with the bad setting, its value and the fix before anything is built or trained."""
    def bad(name, why):
        raise SystemExit(f"error: --{name}={cfg[name]}: {why}")
    for name in AT_LEAST_1:
        if cfg[name] < 1:
            bad(name, "must be >= 1")
    for name in AT_LEAST_0:
        if cfg[name] < 0:
            bad(name, "must be >= 0")
    for name, choices in CHOICES.items():
        if cfg[name] not in choices:
            bad(name, "choose one of " + ", ".join(repr(c) for c in choices))
    if not 0 <= cfg["cooldown_frac"] <= 1:
        bad("cooldown_frac", "must be in [0, 1]")
    for name in ("momentum_muon", "normuon"):
        if not 0 <= cfg[name] < 1:
            bad(name, "must be in [0, 1)")
    if cfg["eps_adam"] <= 0:
        bad("eps_adam", "must be > 0, e.g. 1e-8")
    if cfg["n_embd"] % cfg["n_head"] or (cfg["n_embd"] // cfg["n_head"]) % 2:
        raise SystemExit(f"error: --n_embd={cfg['n_embd']} --n_head={cfg['n_head']}: the width must split into "
                         "n_head heads of even size (RoPE); pick n_head dividing n_embd / 2")
    if cfg["vocab_top"] and not 2 <= cfg["vocab_top"] <= 65536:
        bad("vocab_top", "use 0 (full vocab) or a size in 2..65536")
    if cfg["proj_every"] > 1 and cfg["sphere"] != "project":
        bad("proj_every", "lazy projection (> 1) needs --sphere=project (the geodesic steps stay on the sphere)")
    try:
        betas = [float(b) for b in cfg["betas_adam"].split(",")]
    except ValueError:
        betas = []
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        bad("betas_adam", "expected two numbers in [0, 1), e.g. 0.9,0.95")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg["device"]):
        bad("device", "use auto, cpu, cuda or cuda:N")
    if resolve_device(cfg).type == "cuda" and not torch.cuda.is_available():
        bad("device", "CUDA is not available on this machine; use --device=cpu (or auto)")


def resolve_device(cfg):
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg["device"] == "auto" else cfg["device"])


def run_identity_of(cfg, data_hash):
    """The run's identity (see NOT_RUN_SETTINGS): its settings resolved on this device, the code, the data."""
    dev = resolve_device(cfg)
    skip = NOT_RUN_SETTINGS + (MUON_ONLY if cfg["optimizer"] == "adam" else ADAM_ONLY)
    settings = {k: v for k, v in cfg.items() if k not in skip}
    settings.update(vocab_size=cfg["vocab_top"] or cfg["vocab_size"], device=dev.type,
                    compile=bool(cfg["compile"] and dev.type == "cuda"),
                    compute_dtype=muon_optim.compute_dtype_rule(dev))
    return run_identity(settings, SOURCE_HASH, data_hash)


# -----------------------------------------------------------------------------
# Data: llm.c / modded-nanogpt token shards

def shard_paths(data_dir, pattern):
    paths = sorted(glob.glob(os.path.join(data_dir, pattern)))
    if not paths:
        raise SystemExit(f"error: no shards matching {pattern!r} in {data_dir!r}; point --data_dir at the folder "
                         "that holds them, or write them with `python prepare_fineweb.py` (--input for local text)")
    return paths


def data_files(cfg):
    """The shards a run reads: every train shard, then the first val shard (the run identity's data)."""
    return shard_paths(cfg["data_dir"], cfg["train_files"]) + shard_paths(cfg["data_dir"], cfg["val_files"])[:1]


def build_vocab_map(shards, top):
    """Lookup table token id -> new id: the top-1 most frequent ids of the (train) shards get 0..top-2 by
    frequency, every other id maps to top-1 (so nothing is learned from the val shard)."""
    counts = np.zeros(65536, dtype=np.int64)
    for tokens in shards:
        counts += np.bincount(tokens, minlength=65536)
    table = np.full(65536, top - 1, dtype=np.int64)
    table[np.argsort(-counts, kind="stable")[:top - 1]] = np.arange(top - 1)
    return table


def batch_at(tokens, pos, B, T, vocab_map):
    """(x, y): B x T tokens from `pos` and the same shifted by one, ids mapped through vocab_map if any."""
    buf = np.asarray(tokens[pos:pos + B * T + 1], dtype=np.int64)
    buf = torch.from_numpy(buf if vocab_map is None else vocab_map[buf])
    return buf[:-1].view(B, T), buf[1:].view(B, T)


class ShardLoader:
    """Consecutive (batch, block_size) windows through the shards in order, wrapping around; the
    state (shard index, position) is two ints, so a resumed run sees exactly the same batches."""

    def __init__(self, paths, batch_size, block_size, vocab_map=None):
        self.paths, self.B, self.T, self.vocab_map = paths, batch_size, block_size, vocab_map
        self.load_state(dict(shard=0, pos=0))

    def state(self):
        return dict(shard=self.shard, pos=self.pos)

    def load_state(self, state):
        self.shard, self.pos = state["shard"], state["pos"]
        self.tokens = read_shard(self.paths[self.shard])

    def next_batch(self):
        if self.pos + self.B * self.T + 1 > len(self.tokens):
            self.load_state(dict(shard=(self.shard + 1) % len(self.paths), pos=0))
        x, y = batch_at(self.tokens, self.pos, self.B, self.T, self.vocab_map)
        self.pos += self.B * self.T
        return x, y


def load_data(cfg):
    """(train loader, val token slice, vocab_map or None, vocab size, data fingerprint), after checking
    every shard's header and that the data fits the model: a bad shard stops here with the file and the fix."""
    paths, batch = data_files(cfg), cfg["batch_size"] * cfg["block_size"] + 1
    try:
        shards = [read_shard(path) for path in paths]
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for path, tokens in zip(paths, shards[:-1]):
        if len(tokens) < batch:
            raise SystemExit(f"error: {path} has {len(tokens)} tokens, fewer than one batch ({batch}); lower "
                             "--batch_size or --block_size")
    val = shards[-1][:cfg["eval_tokens"] + 1]
    if len(val) < batch:
        raise SystemExit(f"error: --eval_tokens={cfg['eval_tokens']}: the val slice ({len(val)} tokens) holds less "
                         "than one batch; raise --eval_tokens or lower --batch_size/--block_size")
    vocab_map = build_vocab_map(shards[:-1], cfg["vocab_top"]) if cfg["vocab_top"] else None
    vocab_size = cfg["vocab_top"] or cfg["vocab_size"]
    top_id = int(np.max(val if vocab_map is None else vocab_map[np.asarray(val)]))
    if top_id >= vocab_size:
        raise SystemExit(f"error: the data holds token id {top_id} but vocab_size={vocab_size}; raise --vocab_size "
                         "(50304 for GPT-2 tokens) or use --vocab_top=N")
    loader = ShardLoader(paths[:-1], cfg["batch_size"], cfg["block_size"], vocab_map)
    return loader, val, vocab_map, vocab_size, data_fingerprint(paths)


# -----------------------------------------------------------------------------
# The model: nGPT (results/ngpt.md, "The model")

def unit(x, dim=-1):
    """Scale to unit L2 norm along `dim` (nGPT's justnorm)."""
    return F.normalize(x, dim=dim, eps=1e-12)


class Scale(nn.Module):
    """A learnable per-dimension scale stored as `init_scaling` and used as param * init_value / init_scaling,
    so one Adam LR suits alphas and logit scales alike (paper sec. 2.5)."""

    def __init__(self, size, init_value, init_scaling):
        super().__init__()
        self.multiplier = init_value / init_scaling
        self.param = nn.Parameter(torch.full((size,), float(init_scaling)))

    def forward(self):
        return self.param * self.multiplier


def rotary(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head, self.head_dim = n_head, n_embd // n_head
        self.q = nn.Linear(n_embd, n_embd, bias=False)
        self.k = nn.Linear(n_embd, n_embd, bias=False)
        self.v = nn.Linear(n_embd, n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        self.s_qk = Scale(n_embd, 1.0, n_embd ** -0.5)

    def forward(self, h, cos, sin):
        B, T, C = h.shape
        q, k, v = (lin(h).view(B, T, self.n_head, self.head_dim).transpose(1, 2) for lin in (self.q, self.k, self.v))
        s_qk = self.s_qk().view(self.n_head, 1, self.head_dim)
        # q, k on the unit sphere (after RoPE), so q.k is a cosine; s_qk and the sqrt(d_head)
        # softmax scale (instead of 1/sqrt(d_head)) give the logits their range back
        q, k = s_qk * unit(rotary(q, cos, sin)), s_qk * unit(rotary(k, cos, sin))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.head_dim ** 0.5)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """SwiGLU; u and v are rescaled by s_uv * sqrt(n_embd) because their inputs are unit vectors
    (as in NVIDIA/ngpt, both halves get the sqrt(d) factor)."""

    def __init__(self, n_embd, hidden):
        super().__init__()
        self.fc = nn.Linear(n_embd, 2 * hidden, bias=False)
        self.s_uv = Scale(2 * hidden, 1.0, 1.0)
        self.proj = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, h):
        u, v = (self.fc(h) * (self.s_uv() * h.size(-1) ** 0.5)).chunk(2, dim=-1)
        return self.proj(u * F.silu(v))


class Block(nn.Module):
    """h <- norm(h + |alpha| * (norm(block(h)) - h)): a step from h towards the block's suggestion
    on the sphere, with a learned per-dimension step size alpha (effective init 0.05)."""

    def __init__(self, n_embd, n_head, hidden):
        super().__init__()
        self.attn = Attention(n_embd, n_head)
        self.mlp = MLP(n_embd, hidden)
        self.alpha_attn = Scale(n_embd, 0.05, n_embd ** -0.5)
        self.alpha_mlp = Scale(n_embd, 0.05, n_embd ** -0.5)

    def forward(self, h, cos, sin):
        h = unit(h + self.alpha_attn().abs() * (unit(self.attn(h, cos, sin)) - h))
        return unit(h + self.alpha_mlp().abs() * (unit(self.mlp(h)) - h))


class NGPT(nn.Module):
    """No norm layers: embeddings, head rows and every matrix are unit vectors along n_embd
    (see sphere_params), hidden states live on the sphere, logits are cosines times s_z."""

    def __init__(self, vocab_size, n_layer=12, n_embd=768, n_head=6, block_size=1024, mlp_ratio=4):
        super().__init__()
        if n_embd % n_head or (n_embd // n_head) % 2:
            raise ValueError(f"n_embd={n_embd} must split into n_head={n_head} heads of even size (RoPE)")
        self.embed = nn.Embedding(vocab_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, mlp_ratio * n_embd) for _ in range(n_layer))
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.s_z = Scale(vocab_size, 1.0, n_embd ** -0.5)
        head_dim = n_embd // n_head
        freqs = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float32), freqs)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        for p, _ in self.sphere_params():
            nn.init.normal_(p, std=n_embd ** -0.5)
        self.normalize_()

    def sphere_params(self):
        """(parameter, dim) for every matrix kept on the sphere. Weights are (out, in): q, k, v, the MLP
        input, embedding and head rows are unit along n_embd (-1); the attention and MLP output projections
        map into n_embd, so their columns are (-2)."""
        return [(p, -2 if name.endswith(("attn.proj.weight", "mlp.proj.weight")) else -1)
                for name, p in self.named_parameters() if p.ndim == 2]

    @torch.no_grad()
    def normalize_(self):
        for p, dim in self.sphere_params():
            p.copy_(unit(p, dim))

    def forward(self, idx, targets=None):
        T = idx.size(1)
        h = self.embed(idx)
        for block in self.blocks:
            h = block(h, self.cos[:T], self.sin[:T])
        logits = self.head(h) * self.s_z()
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


# -----------------------------------------------------------------------------
# Optimizer: Muon or Adam on the matrices, always with a sphere retraction

def make_optimizer(model, cfg):
    """Hidden matrices normalized along rows and along columns (Muon, or Adam for the paper's
    baseline); embedding and head (Adam, projected back to the sphere); alphas and scales (Adam,
    unconstrained). No decay outside the hidden matrices: nGPT uses none."""
    dims = {id(p): d for p, d in model.sphere_params()}
    rows = [p for p in model.blocks.parameters() if dims.get(id(p)) == -1]
    cols = [p for p in model.blocks.parameters() if dims.get(id(p)) == -2]
    scalars = [p for p in model.parameters() if id(p) not in dims]
    betas = tuple(float(b) for b in cfg["betas_adam"].split(","))
    if cfg["optimizer"] == "muon":
        hidden = dict(use_muon=True, lr=cfg["lr_muon"], momentum=cfg["momentum_muon"],
                      weight_decay=cfg["weight_decay_muon"], ns_method=cfg["ns_method"], normuon=cfg["normuon"] or None)
        lr_embed, lr_head, lr_scalar = cfg["lr_embed"], cfg["lr_head"], cfg["lr_scalar"]
    else:  # the paper's baseline: Adam on every parameter
        hidden = dict(use_muon=False, lr=cfg["lr_adam"], betas=betas, eps=cfg["eps_adam"],
                      weight_decay=cfg["weight_decay"])
        lr_embed = lr_head = lr_scalar = cfg["lr_adam"]
    on_sphere = dict(sphere=cfg["sphere"], proj_every=cfg["proj_every"], cautious_wd=cfg["cautious_wd"], **hidden)
    adam = dict(use_muon=False, betas=betas, eps=cfg["eps_adam"], weight_decay=0.0)
    projected = dict(sphere="project", sphere_dim=-1, proj_every=cfg["proj_every"], **adam)
    groups = [dict(params=rows, name="hidden_rows", sphere_dim=-1, **on_sphere),
              dict(params=cols, name="hidden_cols", sphere_dim=-2, **on_sphere),
              dict(params=[model.embed.weight], name="embed", lr=lr_embed, **projected),
              dict(params=[model.head.weight], name="head", lr=lr_head, **projected),
              dict(params=scalars, name="scalars", lr=lr_scalar, **adam)]
    return Muon([dict(g, initial_lr=g["lr"]) for g in groups], distributed=False)


def lr_factor(step, max_steps, cooldown_frac):
    """1 until the last cooldown_frac of training, then linear to 0 (no warmup)."""
    warmdown = int(cooldown_frac * max_steps)
    if step < max_steps - warmdown:
        return 1.0
    return max(0.0, (max_steps - step) / max(1, warmdown))


# -----------------------------------------------------------------------------
# Training

@torch.no_grad()
def evaluate(model, tokens, cfg, device, vocab_map, autocast):
    """Mean loss over the full batches in the val token slice."""
    model.eval()
    B, T, losses = cfg["batch_size"], cfg["block_size"], []
    for pos in range(0, len(tokens) - B * T, B * T):
        x, y = batch_at(tokens, pos, B, T, vocab_map)
        with autocast:
            losses.append(model(x.to(device), y.to(device))[1].item())
    model.train()
    return float(np.mean(losses))


def setup_torch(cfg):
    """(device, autocast): threads, denormals and TF32 set for this machine; bf16 autocast on CUDA."""
    dev = resolve_device(cfg)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    torch.set_flush_denormal(True)  # CPU: subnormal floats late in long runs make float math slow; flush them to 0
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return dev, torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()


def run_label(cfg):
    return f"ngpt-{cfg['optimizer']}"


def start_wandb(cfg):
    """A wandb run that gets the numbers metrics.json gets; wandb is imported only when asked for."""
    try:
        import wandb
    except ImportError:
        raise SystemExit("error: --wandb_log=True needs wandb: pip install wandb (or --wandb_log=False)") from None
    name = cfg["wandb_run_name"] or f"{run_label(cfg)}-{os.path.basename(os.path.normpath(cfg['out_dir']))}"
    return wandb.init(project=cfg["wandb_project"], name=name, config=cfg, dir=cfg["out_dir"])


def save_run(cfg, step, model, opt, loader_state, metrics, train_time):
    """metrics.json, and ckpt.pt (unless save_checkpoint=False): everything an exact resume needs, at the
    start of step `step` (loader_state: where that step's batches start)."""
    if cfg["save_checkpoint"]:
        atomic_save(dict(script="train_ngpt.py", step=step, config=cfg, identity=metrics["identity"],
                         loader=loader_state, rng=rng_state(), metrics=metrics,
                         runs={run_label(cfg): dict(model=model.state_dict(), optimizer=opt.state_dict(),
                                                    train_time=train_time)}), os.path.join(cfg["out_dir"], "ckpt.pt"))
    atomic_write_json(metrics, os.path.join(cfg["out_dir"], "metrics.json"))


def resume_from(ckpt_path, cfg, model, opt, loader, metrics):
    """Load model, optimizer, data position, RNGs and curves from ckpt.pt, whose run identity must equal
    this run's except for the RESUMABLE settings; returns (step, train_time)."""
    ckpt = load_checkpoint(ckpt_path, "train_ngpt.py")
    if "identity" not in ckpt:
        raise SystemExit(f"error: {ckpt_path} holds no run identity (an older train_ngpt.py wrote it); "
                         "--resume=False to start over, or another --out_dir")
    diff = identity_diff(ckpt["identity"], metrics["identity"], may_differ=RESUMABLE)
    if diff:
        raise SystemExit(f"error: cannot resume {ckpt_path}: this run differs from the checkpoint's "
                         f"({'; '.join(diff)}); pass the checkpoint's values, or --resume=False to start over, "
                         "or another --out_dir")
    state = ckpt["runs"][run_label(cfg)]
    model.load_state_dict(state["model"])
    own = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    opt.load_state_dict(state["optimizer"])  # this also sets each group's options to the checkpoint's:
    for group, options in zip(opt.param_groups, own):  # the command line's settings win
        group.update(options)
    loader.load_state(ckpt["loader"])
    set_rng_state(ckpt["rng"])
    metrics["runs"] = ckpt["metrics"]["runs"]
    return ckpt["step"], state["train_time"]


def train(cfg, progress=True):
    """Train one nGPT with `cfg` (the constants above as a dict). Returns the metrics, also written to
    out_dir/metrics.json with loss.png (and ckpt.pt unless save_checkpoint=False); as in train_muon.py,
    metrics["runs"][label] holds "train" and "val" lists of {step, loss, time, ...}."""
    check_config(cfg)
    dev, autocast = setup_torch(cfg)
    loader, val, vocab_map, vocab_size, data_hash = load_data(cfg)
    os.makedirs(cfg["out_dir"], exist_ok=True)
    ckpt_path, metrics_path = os.path.join(cfg["out_dir"], "ckpt.pt"), os.path.join(cfg["out_dir"], "metrics.json")
    torch.manual_seed(cfg["seed"])
    model = NGPT(vocab_size, cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["block_size"], cfg["mlp_ratio"]).to(dev)
    opt = make_optimizer(model, cfg)
    label, tokens_per_step = run_label(cfg), cfg["batch_size"] * cfg["block_size"] * cfg["grad_accum_steps"]
    metrics = dict(config=cfg, identity=run_identity_of(cfg, data_hash),
                   source_files=[os.path.basename(f) for f in SOURCE_FILES], tokens_per_step=tokens_per_step,
                   device=str(dev), vocab_size=vocab_size, num_params=sum(p.numel() for p in model.parameters()),
                   runs={label: dict(train=[], val=[])})
    step, train_time = resume_from(ckpt_path, cfg, model, opt, loader, metrics) if cfg["resume"] else (0, 0.0)
    run, first_step = metrics["runs"][label], step  # stop_after_steps counts the steps of this invocation
    saved = (f"checkpoint {ckpt_path}; continue with --resume=True" if cfg["save_checkpoint"] else
             "nothing saved to continue from (--save_checkpoint=False)")
    fwd = torch.compile(model) if cfg["compile"] and dev.type == "cuda" else model
    wandb_run = start_wandb(cfg) if cfg["wandb_log"] else None
    bar = tqdm(total=cfg["max_steps"], initial=step, disable=not progress, desc=cfg["out_dir"], dynamic_ncols=True)
    loader_state, updating = loader.state(), False  # where step `step`'s batches start: what a Ctrl-C saves
    try:
        while True:
            last = step >= cfg["max_steps"]
            if (step % cfg["eval_every"] == 0 or last) and not (run["val"] and run["val"][-1]["step"] == step):
                loss = evaluate(model, val, cfg, dev, vocab_map, autocast)
                run["val"].append(dict(step=step, loss=loss, time=train_time, tokens=step * tokens_per_step))
                atomic_write_json(metrics, metrics_path)
                if wandb_run:
                    wandb_run.log({f"val/{k}": v for k, v in run["val"][-1].items()}, step=step)
                bar.set_postfix(val=f"{loss:.3f}")
            if last:
                break
            t0 = time.perf_counter()
            lr_mult = lr_factor(step, cfg["max_steps"], cfg["cooldown_frac"])
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * lr_mult
            loss_sum = torch.zeros((), device=dev)
            for _ in range(cfg["grad_accum_steps"]):
                x, y = loader.next_batch()
                with autocast:
                    _, loss = fwd(x.to(dev, non_blocking=True), y.to(dev, non_blocking=True))
                (loss / cfg["grad_accum_steps"]).backward()
                loss_sum += loss.detach()
            loss_value = loss_sum.item() / cfg["grad_accum_steps"]
            if not math.isfinite(loss_value):  # stop before the step: the last checkpoint stays good
                run["diverged"] = True
                tqdm.write(f"{cfg['out_dir']}: non-finite training loss ({loss_value}) at step {step + 1}; stopping "
                           "without applying it. Lower the learning rate.")
                break
            updating = True  # a Ctrl-C inside opt.step would leave a half-updated model: that is not saved
            opt.step()
            opt.zero_grad(set_to_none=True)
            updating, step, loader_state = False, step + 1, loader.state()  # Ctrl-C from here on saves `step`
            dt = time.perf_counter() - t0
            train_time += dt
            run["train"].append(dict(step=step, loss=loss_value, lr=lr_mult, tok_s=tokens_per_step / dt,
                                     time=train_time))
            if wandb_run:
                wandb_run.log({f"train/{k}": v for k, v in run["train"][-1].items()}, step=step)
            bar.update(1)
            stop = cfg["stop_after_steps"] and cfg["max_steps"] > step >= first_step + cfg["stop_after_steps"]
            if stop or (cfg["ckpt_every"] and step % cfg["ckpt_every"] == 0):
                save_run(cfg, step, model, opt, loader_state, metrics, train_time)
            if stop:
                tqdm.write(f"stopped at step {step}; {saved}")
                return metrics
        vals = [p["loss"] for p in run["val"]]
        diverged = bool(run.get("diverged"))
        run.update(diverged=diverged, final_val_loss=float("nan") if diverged else vals[-1], best_val_loss=min(vals),
                   train_time=train_time, tok_s=step * tokens_per_step / max(train_time, 1e-9))
        metrics["finished"] = True
        if diverged:  # no checkpoint of a diverged run: the last one saved stays the good one
            atomic_write_json(metrics, metrics_path)
        else:
            save_run(cfg, step, model, opt, loader.state(), metrics, train_time)
        if wandb_run:
            wandb_run.summary.update({k: run[k] for k in ("diverged", "final_val_loss", "best_val_loss", "tok_s")})
    except KeyboardInterrupt:
        if not updating:
            save_run(cfg, step, model, opt, loader_state, metrics, train_time)
            tqdm.write(f"interrupted at step {step}; {saved}")
        raise
    finally:
        bar.close()
        if wandb_run:
            wandb_run.finish()
    plot_losses(metrics["runs"], os.path.join(cfg["out_dir"], "loss.png"), f"nGPT ({cfg['optimizer']})")
    return metrics


def plot_losses(runs, path, title):
    """Train (thin) and validation (markers) loss per run against step, and validation loss against time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (label, run) in enumerate(runs.items()):
        color, val = f"C{i % 10}", run["val"]
        ax1.plot([p["step"] for p in run["train"]], [p["loss"] for p in run["train"]], color=color, alpha=0.25, lw=0.7)
        if val:
            ax1.plot([p["step"] for p in val], [p["loss"] for p in val], "o-", color=color, ms=3,
                     label=f"{label} (val {val[-1]['loss']:.3f})")
            ax2.plot([p["time"] for p in val], [p["loss"] for p in val], "o-", color=color, ms=3, label=label)
    vals = [p["loss"] for r in runs.values() for p in r["val"] if math.isfinite(p["loss"])]
    if vals:  # zoom on the interesting part: the first eval (ln vocab) dwarfs the rest
        lo, hi = min(vals), sorted(vals)[len(vals) // 2]
        ax1.set_ylim(lo - 0.1 * (hi - lo) - 0.05, hi + 0.6 * (hi - lo) + 0.1)
        ax2.set_ylim(*ax1.get_ylim())
    ax1.set(xlabel="step", ylabel="loss", title=f"{title}: train (thin) and validation loss")
    ax2.set(xlabel="training time (s, excluding eval)", ylabel="validation loss", title="validation loss vs time")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv):
    """python train_ngpt.py [--name=value ...]: one run (the sweeps: study_ngpt.py)."""
    for arg in argv:
        if arg.startswith(("--sweep=", "--sweep_")):  # the settings of the sweeps this script used to run
            raise SystemExit(f"error: {arg}: the sweeps are in study_ngpt.py; run python study_ngpt.py {arg} "
                             "with the same train_ngpt.py flags")
    cfg = parse_overrides(argv, CONFIG)
    if cfg["dry_run"]:  # what study_ngpt.py plans with: the settings checked and the identity, shards unread
        check_config(cfg)
        print(json.dumps(dict(identity=run_identity_of(cfg, None), data_files=data_files(cfg))))
        return
    r = train(cfg)["runs"][run_label(cfg)]
    if r.get("final_val_loss") is not None:
        print(f"final val loss {r['final_val_loss']:.4f} after {r['train'][-1]['step']} steps "
              f"({r['tok_s']:,.0f} tok/s, {r['train_time']:.0f} s); wrote {cfg['out_dir']}/metrics.json, loss.png")


if __name__ == "__main__":
    main(sys.argv[1:])
