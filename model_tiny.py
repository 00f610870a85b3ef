"""
model_tiny.py -- the small transformer of the grokking literature (Power et al. 2022, nanuGPT's
prime223 config), in one file.

Input: a short token sequence such as `x op y =`; output: logits over the `n_classes` answers,
read at the LAST position only. Attention is causal, so position t never sees tokens after t,
and the answer token is never part of the input (no label leak).

    from model_tiny import TinyConfig, TinyTransformer
    model = TinyTransformer(TinyConfig(vocab_size=p + 2, n_classes=p))
    logits = model(idx)            # (B, n_classes)
    all_logits = model.forward_all(idx)   # (B, T, n_classes), for checks such as the causal-mask test
"""
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class TinyConfig:
    vocab_size: int = 99  # p numbers + the op token + the '=' token
    n_classes: int = 97  # answer classes (p)
    block_size: int = 4  # sequence length: x op y =
    n_layer: int = 2
    d_model: int = 128
    n_head: int = 4
    d_mlp: int = 512
    prenorm: bool = False  # False: post-norm blocks as in Power et al.; True: GPT-2 style pre-norm


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.proj = nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, x):
        return self.proj(torch.relu(self.fc(x)))


class Block(nn.Module):
    """One transformer block. Post-norm: x = LN(x + f(x)); pre-norm: x = x + f(LN(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.prenorm = cfg.prenorm
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = nn.MultiheadAttention(cfg.d_model, cfg.n_head, batch_first=True)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x, mask, last_only=False):
        """x: (B, T, d). With last_only, only the last position is computed (it attends to all
        positions, so no mask is needed): the same numbers as [:, -1:] of the full output for
        ~40% less work in the final block, where nothing else is read."""
        h = self.ln1(x) if self.prenorm else x
        q, mask = (h[:, -1:], None) if last_only else (h, mask)
        a = self.attn(q, h, h, attn_mask=mask, need_weights=False)[0]
        x = x[:, -1:] if last_only else x
        if self.prenorm:
            x = x + a
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + a)
        return self.ln2(x + self.mlp(x))


class TinyTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.d_model % cfg.n_head:
            raise ValueError(f"d_model={cfg.d_model} must be divisible by n_head={cfg.n_head}")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)  # learned absolute positions
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model) if cfg.prenorm else nn.Identity()  # post-norm blocks end normed
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)  # untied: answers are classes, not input tokens
        # True above the diagonal = "may not attend": position t sees only positions <= t
        causal = torch.triu(torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool), diagonal=1)
        self.register_buffer("causal_mask", causal, persistent=False)

    def forward_all(self, idx, last_only=False):
        """Logits at every position, (B, T, n_classes); with last_only, (B, 1, n_classes)."""
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.cfg.block_size}")
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device))
        mask = self.causal_mask[:T, :T]
        for i, block in enumerate(self.blocks):
            x = block(x, mask, last_only=last_only and i == len(self.blocks) - 1)
        return self.head(self.ln_f(x))

    def forward(self, idx):
        """Logits of the answer, read at the last position (the '=' token), (B, n_classes)."""
        return self.forward_all(idx, last_only=True)[:, -1]

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


if __name__ == "__main__":
    for p in (97, 223):
        model = TinyTransformer(TinyConfig(vocab_size=p + 2, n_classes=p))
        print(f"p={p}: {model.num_params():,} parameters")
