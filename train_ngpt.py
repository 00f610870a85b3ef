"""
train_ngpt.py -- nGPT (the normalized transformer, Loshchilov et al. 2024, arXiv 2410.01131) trained
with Adam or with Muon while every weight vector stays on its unit hypersphere (results/ngpt.md).

    python train_ngpt.py                                   # GPU-sized defaults, shards from prepare_fineweb.py
    python train_ngpt.py --optimizer=adam --lr_adam=5e-4   # the paper's baseline
    python study_ngpt.py --sweep=lr                        # the sweeps: lr | proj_every | update | toggles
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

# -----------------------------------------------------------------------------
# Config: edit here or override with --name=value (--help lists them)

# data (shards from prepare_fineweb.py)
data_dir = "data/fineweb_edu"
train_files = "fineweb_train_*.bin"
val_files = "fineweb_val_*.bin"
vocab_size = 50304  # GPT-2's vocab, padded for fast matmuls (the padding rows are never targets)
vocab_top = 0  # 0: the tokens as they are; N: keep the N-1 most frequent train tokens, the rest -> id N-1 (CPU recipe)
# model (GPT-2 small class, the size of train_muon.py's GPT)
n_layer = 12
n_head = 6
n_embd = 768
block_size = 1024
mlp_ratio = 4  # SwiGLU hidden size = mlp_ratio * n_embd (for each of u and v)
# batch: batch_size x block_size tokens per micro-step, grad_accum_steps micro-steps per step
batch_size = 8
grad_accum_steps = 8
# optimizer and schedule (nGPT: no warmup, no weight decay)
optimizer = "muon"  # 'muon' (Muon on the matrices, Adam on embed/head/scalars) | 'adam' (the paper's baseline)
max_steps = 6000
cooldown_frac = 0.3  # constant LR, then linear decay to 0 over this last fraction of the steps
lr_muon = 0.01  # Muon on the hidden matrices
momentum_muon = 0.95
ns_method = "newton_schulz"  # 'newton_schulz' (NS5) | 'polar_express' | 'gram_newton_schulz'
normuon = 0.0  # NorMuon beta2; 0.0 = off
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
CONFIG = {k: v for k, v in dict(globals()).items() if k[0] != "_" and k.islower() and isinstance(v, (int, float, str))}
MUON_ONLY = ("lr_muon", "momentum_muon", "ns_method", "normuon", "weight_decay_muon", "lr_embed", "lr_head",
             "lr_scalar")
ADAM_ONLY = ("lr_adam", "weight_decay")  # a run ignores the other optimizer's settings, so the sweeps share runs
# what --resume=True may change; all else in the identity must match, as the resumed run computes the same numbers
RESUMABLE = ("eval_every", "ckpt_every", "stop_after_steps", "save_checkpoint", "out_dir", "data_dir", "train_files",
             "val_files", "threads", "compile", "wandb_log", "wandb_project", "wandb_run_name")
# not in a run's identity: RESUMABLE but eval_every, and how to run (device and compile enter it resolved)
NOT_RUN_SETTINGS = tuple(k for k in RESUMABLE if k != "eval_every") + ("resume", "dry_run", "device")
OPTIMIZERS, SPHERES = ("muon", "adam"), ("project", "geodesic", "geodesic_scaled")
NS_METHODS = ("newton_schulz", "polar_express", "gram_newton_schulz")
SOURCE_FILES = (os.path.abspath(__file__), muon_optim.__file__)  # the code a run executes


# ---- pasted helpers (identical in every script, see tests/test_consistency.py)
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


SOURCE_HASH = source_hash(*SOURCE_FILES)


# ---- Settings: checked before anything runs; a run's identity
def check_config(c):
    """Stop with the bad setting, its value and the fix before anything is built or trained."""
    rules = [  # (settings, the test each one's value must pass, the fix), checked in this order
        (("n_layer", "n_head", "n_embd", "block_size", "mlp_ratio", "batch_size", "grad_accum_steps", "max_steps",
          "eval_every", "eval_tokens", "proj_every", "vocab_size"), lambda v: v >= 1, "must be >= 1"),
        (("ckpt_every", "stop_after_steps", "threads", "lr_muon", "lr_embed", "lr_head", "lr_scalar", "lr_adam",
          "weight_decay_muon", "weight_decay"), lambda v: v >= 0, "must be >= 0"),
        (("optimizer",), lambda v: v in OPTIMIZERS, f"choose one of {', '.join(OPTIMIZERS)}"),
        (("sphere",), lambda v: v in SPHERES, f"choose one of {', '.join(SPHERES)}"),
        (("ns_method",), lambda v: v in NS_METHODS, f"choose one of {', '.join(NS_METHODS)}"),
        (("cooldown_frac",), lambda v: 0 <= v <= 1, "must be in [0, 1]"),
        (("momentum_muon", "normuon"), lambda v: 0 <= v < 1, "must be in [0, 1)"),
        (("eps_adam",), lambda v: v > 0, "must be > 0, e.g. 1e-8"),
        (("n_head",), lambda v: c["n_embd"] % (2 * v) == 0, f"--n_embd={c['n_embd']}: pick n_head dividing n_embd / 2"),
        (("vocab_top",), lambda v: v == 0 or 2 <= v <= 65536, "use 0 (full vocab) or a size in 2..65536"),
        (("proj_every",), lambda v: v == 1 or c["sphere"] == "project", "lazy projection needs --sphere=project"),
        (("betas_adam",), lambda v: re.fullmatch(r"(0|0?\.\d+), *(0|0?\.\d+)", v), "two in [0, 1), e.g. 0.9,0.95"),
        (("device",), lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v), "use auto, cpu, cuda or cuda:N"),
        (("device",), lambda v: "cuda" not in v or torch.cuda.is_available(), "no CUDA here: use --device=cpu")]
    for names, ok, fix in rules:
        for name in names:
            if not ok(c[name]):
                raise SystemExit(f"error: --{name}={c[name]}: {fix}")


def resolve_device(cfg):
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg["device"] == "auto" else cfg["device"])


def run_identity_of(cfg, data_hash):
    """The run's identity (see NOT_RUN_SETTINGS): its settings resolved on this device, the code, the data."""
    dev, skip = resolve_device(cfg), NOT_RUN_SETTINGS + (MUON_ONLY if cfg["optimizer"] == "adam" else ADAM_ONLY)
    settings = dict({k: v for k, v in cfg.items() if k not in skip}, vocab_size=cfg["vocab_top"] or cfg["vocab_size"],
                    device=dev.type, compile=bool(cfg["compile"] and dev.type == "cuda"),
                    compute_dtype=muon_optim.compute_dtype_rule(dev))
    return run_identity(settings, SOURCE_HASH, data_hash)


# ---- Data: llm.c / modded-nanogpt token shards
def data_files(cfg):
    """The shards a run reads: every train shard, then the first val shard (the run identity's data)."""
    found = {k: sorted(glob.glob(os.path.join(cfg["data_dir"], cfg[k]))) for k in ("train_files", "val_files")}
    for k, paths in found.items():
        if not paths:
            raise SystemExit(f"error: no shards matching {cfg[k]!r} in {cfg['data_dir']!r}; point --data_dir at "
                             "their folder, or write them with `python prepare_fineweb.py` (--input for local text)")
    return found["train_files"] + found["val_files"][:1]


def build_vocab_map(shards, top):
    """Lookup table token id -> new id: the top-1 most frequent ids of the (train) shards get 0..top-2 by
    frequency, every other id maps to top-1 (so nothing is learned from the val shard)."""
    counts = np.zeros(65536, dtype=np.int64)
    for tokens in shards:
        counts += np.bincount(tokens, minlength=65536)
    table = np.full(65536, top - 1, dtype=np.int64)
    table[np.argsort(-counts, kind="stable")[:top - 1]] = np.arange(top - 1)
    return table


def batch_at(tokens, pos, B, T, vocab_map, dev):
    """(x, y) on dev: B x T tokens from `pos` and the same shifted by one, ids mapped through vocab_map if any."""
    buf = np.asarray(tokens[pos:pos + B * T + 1], dtype=np.int64)
    buf = torch.from_numpy(buf if vocab_map is None else vocab_map[buf]).to(dev, non_blocking=True)
    return buf[:-1].view(B, T), buf[1:].view(B, T)


class ShardLoader:
    """B x T windows through the train shards in order, wrapping around; `at` (shard, pos) is all its state."""

    def __init__(self, shards, B, T, vocab_map, dev):
        self.shards, self.B, self.T, self.vocab_map, self.dev = shards, B, T, vocab_map, dev
        self.at = dict(shard=0, pos=0)

    def next_batch(self):
        shard, pos, n = self.at["shard"], self.at["pos"], self.B * self.T
        if pos + n + 1 > len(self.shards[shard]):
            shard, pos = (shard + 1) % len(self.shards), 0
        self.at = dict(shard=shard, pos=pos + n)
        return batch_at(self.shards[shard], pos, self.B, self.T, self.vocab_map, self.dev)


def load_data(cfg, dev):
    """(train loader, val batches, vocab size, data fingerprint), every shard checked: a bad one stops here."""
    paths, B, T = data_files(cfg), cfg["batch_size"], cfg["block_size"]
    try:
        shards = [read_shard(path) for path in paths]
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    val = shards[-1][:cfg["eval_tokens"] + 1]
    for name, tokens in [*zip(paths, shards[:-1]), (f"the val slice of --eval_tokens={cfg['eval_tokens']}", val)]:
        if len(tokens) < B * T + 1:
            raise SystemExit(f"error: {name} has {len(tokens)} tokens, fewer than one batch ({B * T + 1}); lower "
                             "--batch_size or --block_size (or raise --eval_tokens)")
    vocab_map = build_vocab_map(shards[:-1], cfg["vocab_top"]) if cfg["vocab_top"] else None
    vocab_size = cfg["vocab_top"] or cfg["vocab_size"]
    top_id = int(np.max(val if vocab_map is None else vocab_map[np.asarray(val)]))
    if top_id >= vocab_size:
        raise SystemExit(f"error: the data holds token id {top_id} but vocab_size={vocab_size}; raise --vocab_size "
                         "(50304 for GPT-2 tokens) or use --vocab_top=N")
    val_batches = [batch_at(val, pos, B, T, vocab_map, dev) for pos in range(0, len(val) - B * T, B * T)]
    return ShardLoader(shards[:-1], B, T, vocab_map, dev), val_batches, vocab_size, data_fingerprint(paths)


# ---- The model: nGPT (results/ngpt.md, "The model", says why each norm and scale is where it is)
def unit(x, dim=-1):
    """Scale to unit L2 norm along `dim` (nGPT's justnorm)."""
    return F.normalize(x, dim=dim, eps=1e-12)


class Scale(nn.Module):
    """A learnable per-dimension scale, stored as `init_scaling` and used as param * init_value / init_scaling."""

    def __init__(self, size, init_value, init_scaling):
        super().__init__()
        self.multiplier, self.param = init_value / init_scaling, nn.Parameter(torch.full((size,), float(init_scaling)))

    def forward(self):
        return self.param * self.multiplier


def rotary(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head, self.head_dim = n_head, n_embd // n_head
        self.q, self.k, self.v, self.proj = (nn.Linear(n_embd, n_embd, bias=False) for _ in range(4))
        self.s_qk = Scale(n_embd, 1.0, n_embd ** -0.5)

    def forward(self, h, cos, sin):
        q, k, v = (lin(h).unflatten(-1, (self.n_head, -1)).transpose(1, 2) for lin in (self.q, self.k, self.v))
        s_qk = self.s_qk().view(self.n_head, 1, self.head_dim)  # unit q and k: q.k is a cosine, rescaled by s_qk
        q, k = (s_qk * unit(rotary(t, cos, sin)) for t in (q, k))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.head_dim ** 0.5)
        return self.proj(y.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    """SwiGLU whose u and v are rescaled by s_uv * sqrt(n_embd), as its input is a unit vector."""

    def __init__(self, n_embd, hidden):
        super().__init__()
        self.fc, self.s_uv = nn.Linear(n_embd, 2 * hidden, bias=False), Scale(2 * hidden, 1.0, 1.0)
        self.proj = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, h):
        u, v = (self.fc(h) * (self.s_uv() * h.size(-1) ** 0.5)).chunk(2, dim=-1)
        return self.proj(u * F.silu(v))


class Block(nn.Module):
    """h <- norm(h + |alpha| * (norm(sublayer(h)) - h)): a learned step towards each sublayer's suggestion."""

    def __init__(self, n_embd, n_head, hidden):
        super().__init__()
        self.attn, self.mlp = Attention(n_embd, n_head), MLP(n_embd, hidden)
        self.alpha_attn, self.alpha_mlp = (Scale(n_embd, 0.05, n_embd ** -0.5) for _ in range(2))

    def forward(self, h, cos, sin):
        h = unit(h + self.alpha_attn().abs() * (unit(self.attn(h, cos, sin)) - h))
        return unit(h + self.alpha_mlp().abs() * (unit(self.mlp(h)) - h))


class NGPT(nn.Module):
    """No norm layers: every matrix holds unit vectors along n_embd, hidden states live on the sphere."""

    def __init__(self, vocab_size, n_layer=12, n_embd=768, n_head=6, block_size=1024, mlp_ratio=4):
        super().__init__()
        if n_embd % n_head or (n_embd // n_head) % 2:
            raise ValueError(f"n_embd={n_embd} must split into n_head={n_head} heads of even size (RoPE)")
        self.embed = nn.Embedding(vocab_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, mlp_ratio * n_embd) for _ in range(n_layer))
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.s_z = Scale(vocab_size, 1.0, n_embd ** -0.5)
        head_dim = n_embd // n_head  # RoPE: the angle of each position and frequency
        angles = torch.outer(torch.arange(block_size, dtype=torch.float32),
                             1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("rope", torch.stack([angles.cos(), angles.sin()]), persistent=False)
        with torch.no_grad():  # normal with std 1/sqrt(n_embd), then onto the sphere
            for p, dim in self.sphere_params():
                p.copy_(unit(nn.init.normal_(p, std=n_embd ** -0.5), dim))

    def sphere_params(self):
        """(parameter, dim) of every matrix: unit rows (-1), except the columns (-2) of the output projections."""
        return [(p, -2 if name.endswith(("attn.proj.weight", "mlp.proj.weight")) else -1)
                for name, p in self.named_parameters() if p.ndim == 2]

    def forward(self, idx, targets=None):
        (cos, sin), h = self.rope[:, :idx.size(1)], self.embed(idx)
        for block in self.blocks:
            h = block(h, cos, sin)
        logits = self.head(h) * self.s_z()  # cosines times s_z
        return logits, None if targets is None else F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


# ---- Optimizer: Muon or Adam on the matrices, always with a sphere retraction
def make_optimizer(model, cfg):
    """Five groups (results/ngpt.md, "Staying on the sphere"): hidden matrices unit along rows and along columns
    (Muon, or Adam in the paper's baseline), embedding and head (Adam, projected), alphas and scales (Adam)."""
    dims = {id(p): d for p, d in model.sphere_params()}
    rows, cols = ([p for p in model.blocks.parameters() if dims.get(id(p)) == d] for d in (-1, -2))
    scalars = [p for p in model.parameters() if id(p) not in dims]
    betas, muon = tuple(float(b) for b in cfg["betas_adam"].split(",")), cfg["optimizer"] == "muon"
    adam = dict(use_muon=False, betas=betas, eps=cfg["eps_adam"], weight_decay=0.0)
    hidden = (dict(use_muon=True, lr=cfg["lr_muon"], momentum=cfg["momentum_muon"], ns_method=cfg["ns_method"],
                   weight_decay=cfg["weight_decay_muon"], normuon=cfg["normuon"] or None) if muon
              else dict(adam, lr=cfg["lr_adam"], weight_decay=cfg["weight_decay"]))  # the paper's baseline: Adam
    lr = {k: cfg[f"lr_{k}"] if muon else cfg["lr_adam"] for k in ("embed", "head", "scalar")}
    on_sphere = dict(hidden, sphere=cfg["sphere"], proj_every=cfg["proj_every"], cautious_wd=cfg["cautious_wd"])
    projected = dict(adam, sphere="project", sphere_dim=-1, proj_every=cfg["proj_every"])
    groups = [dict(params=rows, name="hidden_rows", sphere_dim=-1, **on_sphere),
              dict(params=cols, name="hidden_cols", sphere_dim=-2, **on_sphere),
              dict(params=[model.embed.weight], name="embed", lr=lr["embed"], **projected),
              dict(params=[model.head.weight], name="head", lr=lr["head"], **projected),
              dict(params=scalars, name="scalars", lr=lr["scalar"], **adam)]
    return muon_optim.Muon([dict(g, initial_lr=g["lr"]) for g in groups], distributed=False)


# ---- Training
@torch.no_grad()
def evaluate(model, batches, autocast):
    """Mean loss over the fixed val batches (nGPT has no dropout, so no eval mode)."""
    with autocast:
        return float(np.mean([model(x, y)[1].item() for x, y in batches]))


def run_label(cfg):
    return f"ngpt-{cfg['optimizer']}"


def save_run(cfg, step, model, opt, loader_at, metrics, train_time, checkpoint=True):
    """metrics.json, and ckpt.pt (unless save_checkpoint=False): what the resume in train reads to go on at `step`."""
    if checkpoint and cfg["save_checkpoint"]:
        run = dict(model=model.state_dict(), optimizer=opt.state_dict(), train_time=train_time)
        atomic_save(dict(script="train_ngpt.py", step=step, config=cfg, identity=metrics["identity"], loader=loader_at,
                         rng=rng_state(), metrics=metrics, runs={run_label(cfg): run}), f"{cfg['out_dir']}/ckpt.pt")
    atomic_write_json(metrics, f"{cfg['out_dir']}/metrics.json")


def train(cfg, progress=True):
    """Train one nGPT; returns the metrics (as in train_muon.py), also in out_dir with loss.png and ckpt.pt."""
    check_config(cfg)
    dev = resolve_device(cfg)
    torch.set_num_threads(cfg["threads"] or torch.get_num_threads())
    torch.set_flush_denormal(True)  # CPU: subnormal floats late in long runs make float math slow; flush them to 0
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
    loader, val_batches, vocab_size, data_hash = load_data(cfg, dev)
    os.makedirs(cfg["out_dir"], exist_ok=True)
    torch.manual_seed(cfg["seed"])
    model = NGPT(vocab_size, cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["block_size"], cfg["mlp_ratio"]).to(dev)
    opt = make_optimizer(model, cfg)
    label, accum, max_steps = run_label(cfg), cfg["grad_accum_steps"], cfg["max_steps"]
    tokens_per_step, cooldown = cfg["batch_size"] * cfg["block_size"] * accum, int(cfg["cooldown_frac"] * max_steps)
    metrics = dict(config=cfg, identity=run_identity_of(cfg, data_hash), device=str(dev), vocab_size=vocab_size,
                   source_files=[os.path.basename(f) for f in SOURCE_FILES], tokens_per_step=tokens_per_step,
                   num_params=sum(p.numel() for p in model.parameters()), runs={label: dict(train=[], val=[])})
    step, train_time, ckpt_path, updating = 0, 0.0, f"{cfg['out_dir']}/ckpt.pt", False
    if cfg["resume"]:  # what save_run wrote, if its run identity equals this run's but for RESUMABLE
        ckpt = load_checkpoint(ckpt_path, "train_ngpt.py")
        if "identity" not in ckpt:
            raise SystemExit(f"error: {ckpt_path} holds no run identity (an older train_ngpt.py wrote it); "
                             "--resume=False to start over, or another --out_dir")
        diff = identity_diff(ckpt["identity"], metrics["identity"], may_differ=RESUMABLE)
        if diff:
            raise SystemExit(f"error: cannot resume {ckpt_path}: this run differs from the checkpoint's "
                             f"({'; '.join(diff)}); pass the checkpoint's values, or --resume=False to start over, "
                             "or another --out_dir")
        state, own = ckpt["runs"][label], [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])  # this also sets each group's options to the checkpoint's:
        for group, options in zip(opt.param_groups, own):  # the command line's settings win
            group.update(options)
        step, train_time, loader.at = ckpt["step"], state["train_time"], ckpt["loader"]
        metrics["runs"] = ckpt["metrics"]["runs"]
        set_rng_state(ckpt["rng"])
    run, first_step, loader_at = metrics["runs"][label], step, loader.at  # loader_at: where step `step`'s batches start
    saved = (f"checkpoint {ckpt_path}; continue with --resume=True" if cfg["save_checkpoint"] else
             "nothing saved to continue from (--save_checkpoint=False)")
    fwd = torch.compile(model) if cfg["compile"] and dev.type == "cuda" else model
    wandb_run = None
    if cfg["wandb_log"]:  # the numbers metrics.json gets; wandb is imported only when asked for
        try:
            import wandb
        except ImportError:
            raise SystemExit("error: --wandb_log=True needs wandb: pip install wandb (or --wandb_log=False)") from None
        wandb_run = wandb.init(project=cfg["wandb_project"], config=cfg, dir=cfg["out_dir"], name=cfg["wandb_run_name"]
                               or f"{label}-{os.path.basename(os.path.normpath(cfg['out_dir']))}")
    bar = tqdm(total=max_steps, initial=step, disable=not progress, desc=cfg["out_dir"], dynamic_ncols=True)
    try:
        while True:
            last = step >= max_steps
            if (step % cfg["eval_every"] == 0 or last) and not (run["val"] and run["val"][-1]["step"] == step):
                loss = evaluate(model, val_batches, autocast)
                run["val"].append(dict(step=step, loss=loss, time=train_time, tokens=step * tokens_per_step))
                atomic_write_json(metrics, f"{cfg['out_dir']}/metrics.json")
                if wandb_run:
                    wandb_run.log({f"val/{k}": v for k, v in run["val"][-1].items()}, step=step)
                bar.set_postfix(val=f"{loss:.3f}")
            if last:
                break
            t0, lr = time.perf_counter(), min(1.0, (max_steps - step) / max(1, cooldown))  # constant, then linear to 0
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * lr
            loss_sum = torch.zeros((), device=dev)
            for _ in range(accum):
                with autocast:
                    _, loss = fwd(*loader.next_batch())
                (loss / accum).backward()
                loss_sum += loss.detach()
            loss = loss_sum.item() / accum
            if not math.isfinite(loss):  # stop before the step: the last checkpoint stays good
                run["diverged"] = True
                tqdm.write(f"{cfg['out_dir']}: loss {loss} at step {step + 1}, not applied; lower the learning rate")
                break
            updating = True  # a Ctrl-C inside opt.step would leave a half-updated model: that is not saved
            opt.step()
            opt.zero_grad(set_to_none=True)
            updating, step, loader_at = False, step + 1, loader.at  # a Ctrl-C from here on saves `step`
            dt = time.perf_counter() - t0
            train_time += dt
            run["train"].append(dict(step=step, loss=loss, lr=lr, tok_s=tokens_per_step / dt, time=train_time))
            if wandb_run:
                wandb_run.log({f"train/{k}": v for k, v in run["train"][-1].items()}, step=step)
            bar.update(1)
            stop = cfg["stop_after_steps"] and max_steps > step >= first_step + cfg["stop_after_steps"]
            if stop or (cfg["ckpt_every"] and step % cfg["ckpt_every"] == 0):
                save_run(cfg, step, model, opt, loader_at, metrics, train_time)
            if stop:
                tqdm.write(f"stopped at step {step}; {saved}")
                return metrics
        vals, diverged = [p["loss"] for p in run["val"]], bool(run.get("diverged"))
        run.update(diverged=diverged, final_val_loss=float("nan") if diverged else vals[-1], best_val_loss=min(vals),
                   train_time=train_time, tok_s=step * tokens_per_step / max(train_time, 1e-9))
        metrics["finished"] = True  # a diverged run keeps its last checkpoint: the good one
        save_run(cfg, step, model, opt, loader_at, metrics, train_time, checkpoint=not diverged)
        if wandb_run:
            wandb_run.summary.update({k: run[k] for k in ("diverged", "final_val_loss", "best_val_loss", "tok_s")})
    except KeyboardInterrupt:
        if not updating:
            save_run(cfg, step, model, opt, loader_at, metrics, train_time)
            tqdm.write(f"interrupted at step {step}; {saved}")
        raise
    finally:
        bar.close()
        if wandb_run:
            wandb_run.finish()
    plot_losses(metrics["runs"], f"{cfg['out_dir']}/loss.png", f"nGPT ({cfg['optimizer']})")
    return metrics


def plot_losses(runs, path, title):
    """Train (thin) and validation (markers) loss per run against step, and validation loss against time."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing to close
    fig = Figure(figsize=(12, 4.5))
    by_step, by_time = fig.subplots(1, 2)
    for i, (label, run) in enumerate(runs.items()):
        train, val, line = run["train"], run["val"], dict(color=f"C{i % 10}", ms=3, marker="o")
        by_step.plot([p["step"] for p in train], [p["loss"] for p in train], color=line["color"], alpha=0.25, lw=0.7)
        by_step.plot([p["step"] for p in val], [p["loss"] for p in val], **line,
                     label=f"{label} (val {val[-1]['loss']:.3f})" if val else label)
        by_time.plot([p["time"] for p in val], [p["loss"] for p in val], **line, label=label)
    vals = sorted(p["loss"] for r in runs.values() for p in r["val"] if math.isfinite(p["loss"]))
    by_step.set(xlabel="step", ylabel="loss", title=f"{title}: train (thin) and validation loss")
    by_time.set(xlabel="training time (s, excluding eval)", ylabel="validation loss", title="validation loss vs time")
    for ax in (by_step, by_time):
        if vals:  # zoom on the interesting part: the first eval (ln vocab) dwarfs the rest
            lo, hi = vals[0], vals[len(vals) // 2]
            ax.set_ylim(lo - 0.1 * (hi - lo) - 0.05, hi + 0.6 * (hi - lo) + 0.1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


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
