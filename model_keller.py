"""
model_keller.py -- a small modern GPT in the modded-nanogpt line (Keller Jordan et al.), readable like
nanoGPT's model.py. Used by train_muon.py; copy it into your own project as one file (imports torch only:
the optimizer, Muon or AdamW, is built by the trainer, see train_muon.make_optimizer).

Differences from GPT-2 / nanoGPT, each from the modded-nanogpt speedrun:
  - RMSNorm without learnable parameters (pre-norm, plus a norm right after the embedding)
  - rotary position embeddings instead of a learned position table
  - QK-norm: queries and keys are RMS-normalized per head before attention (stable logits, high lr)
  - ReLU^2 MLP (4x) instead of GELU
  - no biases anywhere, untied output head
  - separate q, k, v matrices (Muon orthogonalizes each on its own); GPTConfig(fused_qkv=True) makes one
    (3*n_embd, n_embd) weight `qkv` per block instead, rows q | k | v as in GPT-2's c_attn, initialized
    block by block so that the same seed gives the same weights (muon_optim's split=3 takes it apart)
  - residual projections (attention c_proj, MLP c_proj) and the head are zero-initialized.
    Why zero rather than GPT-2's N(0, 0.02/sqrt(2*n_layer)): every block then starts as the identity, so
    the initial residual stream and loss (exactly ln(vocab)) do not depend on depth, and there is no
    depth-dependent scale to tune. Zero delays the start by two steps but does not stall it: at step 0
    only lm_head has a gradient (the zero head passes none back into the residual stream); from step 1
    the residual projections and the embedding have one too (their inputs are not zero), from step 2
    every matrix. Muon's orthogonalized step gives each a full-rank update of a well-defined size as soon
    as its gradient is non-zero (AdamW's step is also scale-free).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50257 rounded up to a multiple of 128 (faster matmuls)
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 6
    n_embd: int = 768  # head_dim = n_embd / n_head = 128
    fused_qkv: bool = False  # one (3*n_embd, n_embd) weight qkv per block instead of c_q, c_k, c_v


def norm(x):
    """RMSNorm with no learnable gain: the following matrix can learn any per-channel scale."""
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    """Rotary position embedding: rotates pairs of channels of q and k by position-dependent angles, so
    q.k depends only on the relative position. cos/sin tables are buffers (not saved in checkpoints)."""

    def __init__(self, head_dim, max_seq_len, base=10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (T, head_dim/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x):
        """x: (B, n_head, T, head_dim)."""
        T = x.size(-2)
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, -x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        if config.fused_qkv:  # one matrix, rows q | k | v: Muon on it as a whole mixes three roles in one
            self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)  # polar factor unless split
            self.qkv.fused_blocks = 3
        else:  # separate q, k, v matrices: Muon orthogonalizes each on its own
            self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
            self.c_k = nn.Linear(config.n_embd, config.n_embd, bias=False)
            self.c_v = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj.is_residual_projection = True
        self.rotary = Rotary(self.head_dim, config.block_size)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(x).split(C, dim=-1) if hasattr(self, "qkv") else (self.c_q(x), self.c_k(x), self.c_v(x))
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in qkv)
        q, k = self.rotary(norm(q)), self.rotary(norm(k))  # QK-norm, then rotate
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.c_proj.is_residual_projection = True

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2: cheap, and trains better than GELU here


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(norm(x))
        return x + self.mlp(norm(x))


# Peak dense bf16 tensor-core FLOP/s (fp32 accumulate) by GPU name substring, for MFU. First match wins.
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
    ("RTX 6000 Ada", 364e12), ("A6000", 155e12),
    ("4090", 165e12), ("4080", 97e12), ("4070 Ti", 80e12), ("4070", 58e12), ("4060 Ti", 44e12),
    ("3090", 71e12), ("3080", 59e12), ("V100", 125e12), ("T4", 65e12),
)


def peak_flops(device_name):
    """Peak bf16 FLOP/s of a GPU from PEAK_FLOPS, or None if unknown (e.g. a CPU)."""
    for key, flops in PEAK_FLOPS:
        if key.lower() in (device_name or "").lower():
            return flops
    return None


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_projection", False):
                nn.init.zeros_(module.weight)  # block starts as the identity (see module docstring)
            else:  # std 0.5/sqrt(fan_in), uniform, as in modded-nanogpt: unit-RMS inputs -> O(0.5) outputs
                bound = math.sqrt(3) * 0.5 / math.sqrt(module.in_features)
                for block in module.weight.data.chunk(getattr(module, "fused_blocks", 1)):  # fused: q, k, v in turn
                    nn.init.uniform_(block, -bound, bound)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0)  # scale is irrelevant to the forward (normed right after)
        if module is getattr(self, "lm_head", None):
            nn.init.zeros_(module.weight)  # initial logits 0: the loss starts at exactly ln(vocab_size)

    def forward(self, idx, targets=None):
        """idx: (B, T) token ids. Returns logits (B, T, vocab) in fp32, or the mean cross-entropy if targets
        (B, T) are given (positions with target -1 are ignored; a slice such as x[:, 1:] is fine)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        x = norm(self.wte(idx))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(norm(x)).float()
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def num_params(self, non_embedding=False):
        """Parameter count; non_embedding=True leaves out the token embedding (a lookup, not a matmul)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N for the matmuls plus
        12 * n_layer * n_embd * T for attention scores and values."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * T

    def estimate_mfu(self, tokens_per_iter, dt, device_name=None, seq_len=None):
        """Model FLOPs utilization: achieved training FLOP/s (tokens_per_iter tokens in dt seconds) over
        the device's peak bf16 FLOP/s (PEAK_FLOPS; device_name defaults to the current CUDA device).
        Returns None where the peak is unknown (CPU, unlisted GPU)."""
        if device_name is None:
            device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        peak = peak_flops(device_name)
        if peak is None or dt <= 0:
            return None
        return self.flops_per_token(seq_len) * tokens_per_iter / dt / peak
