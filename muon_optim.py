"""
muon_optim.py -- Muon (MomentUm Orthogonalized by Newton-Schulz) in one file; needs only torch
(Triton optional, for the CUDA fast path). Copy it into your project:

    from muon_optim import Muon, muon_param_groups
    opt = Muon(muon_param_groups(model, lr=0.02, adam_lr=3e-3))   # hidden matrices -> Muon, rest -> AdamW
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

Muon keeps an SGD-momentum buffer per weight matrix and replaces the update by the nearest
semi-orthogonal matrix (the polar factor U V^T of U S V^T), by a few matmul-only iterations: rare
directions learn as fast as dominant ones. For >= 2D hidden weights only: embeddings, the head, gains
and biases go to the auxiliary AdamW groups (`use_muon=False`). Section 1 is all of plain Muon; then
2. NorMuon, sphere, stats, capturable; 3. Polar Express, Gram-NS, the compute dtype; 4. DDP; 5. FSDP2;
6. Triton; 7. KellerJordan-compatible wrappers, muon_param_groups. `python bench.py` measures it all.
"""
import functools
import math
import os
import sys
import warnings
import zlib

import torch
import torch.distributed as dist

try:  # optional: symmetric-matmul kernels for CUDA (section 6); tests run them under TRITON_INTERPRET=1
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

# -----------------------------------------------------------------------------
# 1. Muon: Newton-Schulz, momentum, the update, the optimizer

NS5_COEFFS = (3.4445, -4.7750, 2.0315)  # KellerJordan's quintic: max slope at 0, converges to ~[0.7, 1.2]


def zeropower_via_newtonschulz5(G, steps=5, dtype=None, eps=1e-7, *, coeffs=None, norm_scale=1.0):
    """Polar factor U V^T of G = U S V^T (..., m, n) by the quintic Newton-Schulz iteration X <- a X + (b A +
    c A^2) X, A = X X^T, one (a, b, c) per step; NS5's maximise the slope at 0: 5 steps give S' in ~[0.7, 1.2],
    which trains as well. In `dtype` (default_ns_dtype). G / (||G||_F * norm_scale + eps), the norm of
    G / max|G| scaled back where fp32 squares overflow or underflow (checked on a CPU only, and not when
    compiled: a check syncs). On the wide orientation (A is m x m, m <= n), X alternating between 2 buffers."""
    if G.ndim < 2:
        raise ValueError(f"orthogonalization needs a (..., m, n) tensor, got shape {tuple(G.shape)}")
    X, tall = (G if G.dtype in (torch.float32, torch.float64) else G.to(torch.float32)), G.size(-2) > G.size(-1)
    cheap_check = X.device.type == "cpu" and not torch.compiler.is_compiling()  # the check syncs
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) if cheap_check else None
    if norm is None or not (torch.isfinite(norm).all() and (norm > 1e-15).all()):
        amax = X.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(X.dtype).tiny)
        norm = (X / amax).norm(dim=(-2, -1), keepdim=True) * amax
    out = torch.empty(X.shape, dtype=dtype or default_ns_dtype(G.device, G.shape), device=X.device)
    X = torch.mul(X, 1.0 / (norm * norm_scale + eps), out=out).reshape(-1, *X.shape[-2:])  # scale, cast: one pass
    X = X.mT if tall else X
    coeffs = [NS5_COEFFS] * steps if coeffs is None else coeffs
    fast, spare = _triton_ok(X), None  # fast: the Triton kernels (section 6)
    for i, (a, b, c) in enumerate(coeffs):
        A = triton_sym_matmul_t(X) if fast else torch.bmm(X, X.mT)
        B = triton_sym_poly(A, b, c) if fast else torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        if tall and i == len(coeffs) - 1:  # last step straight into G's tall layout:
            X = torch.baddbmm(X.mT, X.mT, B, beta=a).mT  # (a X + B X)^T = a X^T + X^T B, B symmetric
        else:
            X, spare = torch.baddbmm(X, B, X, beta=a, out=spare), (X if X.is_contiguous() else None)
    return (X.mT if tall else X).reshape(G.shape)


def momentum_direction(grad, momentum_buffer, momentum=0.95, nesterov=True):
    """EMA momentum as in KellerJordan/Muon and torch.optim.Muon: buf <- lerp(buf, g, 1-mu); with Nesterov
    g.lerp(buf, mu), written into grad as both do (no fresh parameter-sized tensor per step), else buf."""
    momentum_buffer.lerp_(grad, 1 - momentum)
    return grad.lerp_(momentum_buffer, momentum) if nesterov else momentum_buffer


def as_matrices(t):
    """The matrix view Muon orthogonalizes: 2D as is, 3D a batch, >= 4D (conv kernels) as (out, -1)."""
    return t.flatten(1) if t.ndim >= 4 else t


def muon_update(grad, momentum_buffer, momentum=0.95, nesterov=True, method="newton_schulz", steps=5, dtype=None):
    """One Muon direction (momentum, then orthogonalized), unscaled, in grad's shape; Muon.step batches it."""
    g = momentum_direction(grad, momentum_buffer, momentum, nesterov)
    return orthogonalize(as_matrices(g), method, steps, dtype).reshape(grad.shape)


def shape_scale(shape, scale="original"):
    """Update multiplier for an A x B matrix (as orthogonalized):
    'original' sqrt(max(1, A/B)) (KellerJordan, torch default), 'match_adamw' 0.2*sqrt(max(A, B))
    (Moonlight: update RMS ~0.2 like AdamW's, so AdamW's lr and wd carry over), 'spectral' sqrt(A/B)."""
    A, B = shape[-2], shape[-1]
    if scale == "original":
        return math.sqrt(max(1.0, A / B))
    if scale == "match_adamw":
        return 0.2 * math.sqrt(max(A, B))
    if scale == "spectral":
        return math.sqrt(A / B)
    raise ValueError(f"unknown scale {scale!r}; choose 'original', 'match_adamw' or 'spectral'")


def adam_update(grad, exp_avg, exp_avg_sq, step, betas, eps):
    """Bias-corrected Adam direction m_hat / (sqrt(v_hat) + eps); mutates the two moments."""
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2)
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    return (exp_avg / bias1) / (exp_avg_sq / bias2).sqrt().add_(eps)


def apply_update(p, update, *, lr, weight_decay=0.0, cautious_wd=False, sphere=None, sphere_dim=-1,
                 proj_every=1, step=1, scale=1.0):
    """p <- p*(1 - lr*wd) - lr*scale*update (decoupled weight decay; a bf16 update is read once, in p's
    dtype, no upcast copy). cautious_wd (arXiv 2510.12402): decay only where update * p >= 0. With
    `sphere`: sphere_retract ('project' every `proj_every` steps, or geodesic)."""
    if weight_decay:
        if cautious_wd:
            p.sub_(p * (update * p >= 0) * (lr * weight_decay))
        else:
            p.mul_(1 - lr * weight_decay)
    if sphere is None or (sphere == "project" and step % proj_every != 0):
        p.add_(update, alpha=-lr * scale)
    else:
        sphere_retract(p, update.to(p.dtype) * scale, lr, sphere, sphere_dim)


MUON_DEFAULTS = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, ns_method="newton_schulz",
                     ns_steps=5, ns_dtype=None, scale="original", cautious_wd=False, normuon=None,
                     sphere=None, sphere_dim=-1, proj_every=1, split=None)
ADAM_DEFAULTS = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0, cautious_wd=False,
                     sphere=None, sphere_dim=-1, proj_every=1)
OPTIONAL_KEYS = {"use_muon", "name", "initial_lr"}  # name: for logging; initial_lr: set by LR schedulers
APPLY_KEYS = ("lr", "weight_decay", "cautious_wd", "sphere", "sphere_dim", "proj_every")  # group -> apply_update


class Muon(torch.optim.Optimizer):
    """Muon for >= 2D hidden weights, with auxiliary AdamW groups (use_muon=False: lr, betas, eps,
    weight_decay), from a parameter list or param groups. Muon group options (MUON_DEFAULTS):
      ns_method   'newton_schulz' | 'polar_express' | 'gram_newton_schulz';  ns_steps;  cautious_wd;
      ns_dtype    None: default_ns_dtype;  scale  'original' | 'match_adamw' | 'spectral' (shape_scale);
      normuon     None, or beta2 (e.g. 0.95) for NorMuon's per-neuron normalization;
      split       None, n or (rows, ...): row blocks (fused QKV: 3) updated as if each were its own
                  parameter (orthogonalization, scale, NorMuon, stats); kept as the tuple of sizes;
      sphere      None | 'project' | 'geodesic' | 'geodesic_scaled', sphere_dim, proj_every (nGPT).
    With torch.distributed (distributed=True) ranks share the orthogonalizations (section 4; grads
    averaged as by DDP); FSDP2 / HSDP DTensors need nothing else (section 5; each rank keeps its rows
    of every buffer, resharded by torch.distributed.checkpoint); ranks that disagree get an error, not
    a hang. track_stats=True: .stats(). capturable=True: capturable_step, for CUDA graphs, torch.compile."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, *,
                 distributed=True, track_stats=False, capturable=False, **muon_options):
        if unknown := set(muon_options) - set(MUON_DEFAULTS):
            raise TypeError(f"Muon got unknown option(s) {sorted(unknown)}; allowed: {sorted(MUON_DEFAULTS)}")
        defaults = dict(MUON_DEFAULTS, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        **muon_options)
        self.distributed, self.track_stats, self.capturable = distributed, track_stats, capturable
        self._stats, self._muon_defaults, self.has_dtensors = {}, defaults, False
        super().__init__(params, {})  # defaults are applied per group kind in add_param_group
        self.defaults = dict(defaults)  # torch's schedulers read it (OneCycleLR/CyclicLR look for "momentum")

    def __getstate__(self):  # copy.deepcopy / pickle keep the options that are not param-group keys
        return dict(super().__getstate__(), distributed=self.distributed, track_stats=self.track_stats,
                    has_dtensors=self.has_dtensors, _muon_defaults=self._muon_defaults, capturable=self.capturable)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._stats = {}

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient: momentum, the orthogonalization (same-shape
        matrices batched), the shape scale, the update. Distributed or DTensors: distributed_step."""
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        self._stats, self.comm_bytes = ({} if self.track_stats else self._stats), 0  # this step's stats, bytes sent
        if self.capturable or self.has_dtensors or (self.distributed and dist.is_available() and dist.is_initialized()):
            (capturable_step if self.capturable else distributed_step)(self)
            return loss
        for group in self.param_groups:
            params, same_shape = [p for p in group["params"] if p.grad is not None], {}  # same_shape: one batch each
            if not group["use_muon"]:
                self._adam_step(group, params)
                continue
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                state["step"] = state.get("step", 0) + 1
                g = momentum_direction(p.grad, state["momentum_buffer"], group["momentum"], group["nesterov"])
                g, rows = (g.flatten(1) if g.ndim >= 4 else g), group["split"] or len(p)  # as_matrices; blocks
                for i, (pb, gb) in enumerate(zip(p.split(rows), g.split(rows))):  # block i of p: rows pb
                    same_shape.setdefault((gb.shape, gb.dtype, gb.device), []).append((p, i, pb, gb))
            for batch in same_shape.values():
                G = torch.stack([b[3] for b in batch]) if len(batch) > 1 else batch[0][3].unsqueeze(0)
                D = ORTHOGONALIZERS[group["ns_method"]](G, steps=group["ns_steps"], dtype=group["ns_dtype"])
                for (p, i, pb, _), o in zip(batch, D):
                    self._apply_muon(group, p, o, pb, i)
        return loss

    def _apply_muon(self, group, p, D, rows, block):
        """The rest of the update of rows `rows` of a whole (not sharded) parameter p (all, or block `block`
        of a split) from their orthogonalized direction D: stats, NorMuon, the shape scale, decay, the step."""
        state = self.state[p]
        if self.track_stats:
            self._stats[(p, block)] = update_stats(D)
        if group["normuon"]:
            D = normuon_normalize(D, normuon_moment(state, D, group["split"], block), group["normuon"])
        scale = shape_scale(D.shape, group["scale"])
        apply_update(rows, D.view(rows.shape), **{k: group[k] for k in APPLY_KEYS}, step=state["step"], scale=scale)

    def _adam_step(self, group, params):
        """AdamW on every parameter of an AdamW group (on the local rows of DTensors)."""
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                state.update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p), step=state.get("step", 0))
            state["step"] += 1  # in place for capturable_step's step tensors
            update = adam_update(local_part(p.grad), local_part(state["exp_avg"]), local_part(state["exp_avg_sq"]),
                                 state["step"], group["betas"], group["eps"])
            apply_update(local_part(p), update, **{k: group[k] for k in APPLY_KEYS}, step=state["step"])

    def add_param_group(self, group):
        group = dict(group)
        use_muon = group.setdefault("use_muon", True)
        defaults = self._muon_defaults if use_muon else ADAM_DEFAULTS
        allowed = set(defaults) | OPTIONAL_KEYS | {"params"}
        if unknown := set(group) - allowed:
            raise ValueError(f"param group key(s) {sorted(unknown)} are not valid for a "
                             f"{'Muon (use_muon=True)' if use_muon else 'AdamW (use_muon=False)'} group; "
                             f"allowed keys: {sorted(allowed)}")
        group.update({k: v for k, v in defaults.items() if k not in group})
        params = [group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"])
        if use_muon:  # what a Muon group cannot take
            for p in [p for p in params if p.ndim < 2]:
                raise ValueError(f"Muon group{' ' + repr(group['name']) if 'name' in group else ''} holds a parameter "
                                 f"of shape {tuple(p.shape)}: Muon orthogonalizes matrices (>= 2D). Put 0D/1D ones "
                                 "(biases, gains, scalars) in an AdamW group: dict(params=..., use_muon=False), "
                                 "or build the groups with muon_param_groups(model).")
            if group["sphere"] is not None and group["sphere"] not in ("project", "geodesic", "geodesic_scaled"):
                raise ValueError(f"unknown sphere mode {group['sphere']!r}")
            if group["ns_method"] not in ORTHOGONALIZERS:
                raise ValueError(f"unknown ns_method {group['ns_method']!r}; choose one of {sorted(ORTHOGONALIZERS)}")
            shape_scale((1, 1), group["scale"])
            if group["split"] is not None:
                group["split"] = split_sizes(group["split"], params, functools.partial(_param_name, group, len(
                    self.param_groups)))
        for i, p in enumerate(params):
            where = _param_name(group, len(self.param_groups), i)
            if self.capturable and (is_sharded(p) or group["sphere"] == "project"):
                raise ValueError(f"{where}: capturable=True takes plain tensors, no sphere='project' (it branches "
                                 "on the step count); use capturable=False")
            if is_sharded(p):
                check_sharded_param(p, group, self.distributed, where)
                self.has_dtensors = True
        group["params"] = params
        saved, self.defaults = self.defaults, {}  # every key is set above; torch must not add Muon keys to AdamW
        try:
            super().add_param_group(group)
        finally:
            self.defaults = saved

    def load_state_dict(self, state_dict):
        """torch's load_state_dict, checking each group's kind (Muon/AdamW) and state shapes (groups match by
        position). NorMuon's second moment comes back as saved (torch would cast it to p's dtype)."""
        saved_groups, moments, kind = state_dict["param_groups"], {}, {True: "Muon", False: "AdamW"}
        built = [dict(g) for g in self.param_groups]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the checkpoint has {len(saved_groups)} param groups, this optimizer "
                             f"{len(self.param_groups)}: build the groups as when it was saved")
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if saved.get("use_muon", True) != group["use_muon"]:
                raise ValueError(f"param group {i} ({group.get('name', f'group {i}')!r}) is {kind[group['use_muon']]} "
                                 f"here but {kind[saved.get('use_muon', True)]} in the checkpoint: groups are matched "
                                 "by position, pass them in the order they had when the state was saved")
            for index, p in zip(saved["params"], group["params"]):
                state = state_dict["state"].get(index, {})
                moments.update({p: state["second_moment"]} if "second_moment" in state else {})
                for key in [k for k in ("momentum_buffer", "exp_avg", "exp_avg_sq") if k in state]:
                    if tuple(state[key].shape) != tuple(p.shape):
                        raise ValueError(f"param group {i} ({group.get('name', f'group {i}')!r}): checkpoint state "
                                         f"{key!r} has shape {tuple(state[key].shape)} but the parameter has shape "
                                         f"{tuple(p.shape)}: the groups or their parameter order differ from the "
                                         "saved optimizer")
        super().load_state_dict(state_dict)
        for group, before in zip(self.param_groups, built):  # a checkpoint older than an option: the built value
            group.update({k: v for k, v in before.items() if k not in group})
        for p, moment in moments.items():
            self.state[p]["second_moment"] = moment.to(device=p.device)

    def stats(self):
        """Per Muon matrix (per block of a split: with its number 'block') of the last step: {'shape',
        'update_rms' (of D, before lr and scale), 'ortho_error' (||D^T D - I||_F / sqrt(k))}. Needs track_stats."""
        groups, out = {p: (i, g) for i, g in enumerate(self.param_groups) for p in g["params"]}, []
        for (p, j), (rms, err) in self._stats.items():
            i, g = groups[p]
            shape = (g["split"][j], *matrix_shape(p.shape)[1:]) if g["split"] else tuple(p.shape)
            out.append(dict(group=g.get("name", f"group{i}"), shape=shape, **({"block": j} if g["split"] else {}),
                            update_rms=rms.item(), ortho_error=err.item()))
        return out


def capturable_step(opt):
    """Muon.step with capturable=True (one process, plain tensors), for CUDA graphs and torch.compile: no host
    sync (no .item(), no branch on a tensor's value; step counts are tensors on the device, bumped in place),
    foreach kernels for the momentum and a plain update. lr and options are read when captured."""
    for group in opt.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:  # new state: made by the first step, before capturing
            state = opt.state[p]
            if not torch.is_tensor(state.get("step")) or state["step"].device != p.device:  # also an int on resume
                state["step"] = torch.tensor(float(state.get("step", 0)), device=p.device)
            if group["use_muon"] and "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
        if not group["use_muon"] or not params:
            opt._adam_step(group, params)
            continue
        torch._foreach_add_([opt.state[p]["step"] for p in params], 1)
        bufs, grads, same_shape = [opt.state[p]["momentum_buffer"] for p in params], [p.grad for p in params], {}
        torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
        if group["nesterov"]:
            torch._foreach_lerp_(grads, bufs, group["momentum"])  # into grad, as momentum_direction does
        for p, g in zip(params, grads if group["nesterov"] else bufs):
            for i, (rows, gb) in enumerate(split_rows(group["split"], p, g)):
                same_shape.setdefault((gb.shape, gb.dtype, gb.device), []).append((p, i, rows, gb))
        for batch in same_shape.values():
            rows, D = [b[2] for b in batch], orthogonalize(torch.stack([b[3] for b in batch]), group["ns_method"],
                                                           group["ns_steps"], group["ns_dtype"])
            if opt.track_stats or group["normuon"] or group["cautious_wd"] or group["sphere"]:
                for (p, i, r, _), o in zip(batch, D):
                    opt._apply_muon(group, p, o, r, i)
                continue
            if group["weight_decay"]:  # the plain update: decay and apply, one foreach kernel each
                torch._foreach_mul_(rows, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(rows, [o.view(r.shape) for o, r in zip(D, rows)],
                                alpha=-group["lr"] * shape_scale(D.shape, group["scale"]))


# -----------------------------------------------------------------------------
# 2. Options: NorMuon, the sphere retraction, update statistics (cautious weight decay: apply_update)

def _short_axis(shape):
    return -1 if shape[-2] >= shape[-1] else -2


def normuon_moment(state, D, split=None, block=0):
    """NorMuon's second moment for update D (made on first use): D's shape, short axis 1, fp32 (float64 for
    float64 D); with `split`, one flat vector per parameter (moment_lengths per block), block `block`'s view."""
    shape = [*D.shape[:-2], *((D.size(-2), 1) if _short_axis(D.shape) == -1 else (1, D.size(-1)))]
    lengths = moment_lengths(split, D.size(-1)) if split else [math.prod(shape)]
    if "second_moment" not in state:
        state["second_moment"] = torch.zeros(sum(lengths) if split else shape, device=D.device,
                                             dtype=torch.promote_types(D.dtype, torch.float32))
    start = sum(lengths[:block])
    return local_part(state["second_moment"]).view(-1)[start:start + lengths[block]].view(shape)


def moment_lengths(split, n):
    """Entries of NorMuon's statistic per block of `split` rows of an (m, n) matrix: its rows if tall, else n."""
    return [b if b >= n else n for b in split]


def split_sizes(split, params, where):
    """The row blocks of a group's `split` (n equal ones, or a tuple of sizes), checked on each parameter."""
    sizes = None
    for i, p in enumerate(params):
        rows, name = p.shape[0], f"{where(i)} (shape {tuple(p.shape)})"
        if p.ndim == 3:
            raise ValueError(f"{name}: split cuts a matrix into row blocks, and a 3D parameter is a batch of "
                             "matrices orthogonalized one by one already; leave split out of its group")
        n = split if type(split) is int and split > 0 and rows % split == 0 else None  # (not a bool)
        mine = (rows // n,) * n if n else tuple(split) if isinstance(split, (tuple, list)) and all(
            type(b) is int and b > 0 for b in split) and sum(split) == rows else None
        if mine is None:
            raise ValueError(f"{name}: split={split!r} does not cut its {rows} rows into blocks; use n (a "
                             f"divisor of {rows}: n equal blocks) or a tuple of positive row counts summing to {rows}")
        if sizes not in (None, mine):
            raise ValueError(f"{name}: split={split!r} gives blocks {mine} here but {sizes} for parameter 0 of "
                             "its group: put parameters with other row counts in their own param group")
        sizes = mine
    return sizes or split


def normuon_normalize(D, second_moment, beta2, eps=1e-10):
    """NorMuon (arXiv 2510.05491): orthogonalized updates have uneven per-neuron norms; divide each entry
    of the long axis by the root of an EMA of its mean square over the short one (second_moment, updated
    in place; modded-nanogpt's convention), then restore the Frobenius norm (both from the mean squares:
    D read twice, written once, in fp32 or float64). All-zero updates stay zero."""
    axis, dtype = _short_axis(D.shape), torch.promote_types(D.dtype, torch.float32)
    mean_sq = torch.linalg.vector_norm(D, dim=axis, keepdim=True, dtype=dtype).square_().div_(D.shape[axis])
    second_moment.lerp_(mean_sq, 1 - beta2)
    inv_rms = second_moment.add(eps).rsqrt()
    norm_in_sq = mean_sq.sum(dim=(-2, -1), keepdim=True)
    norm_out_sq = (mean_sq * inv_rms.square()).sum(dim=(-2, -1), keepdim=True)
    return D * (inv_rms * (norm_in_sq / norm_out_sq.clamp_min(1e-30)).sqrt())


def sphere_retract(p, update, lr, mode, dim=-1):
    """Step of size lr against `update` keeping each vector of p along `dim` on the unit sphere (nGPT).
    'project': p <- normalize(p - lr*update); 'geodesic': by angle lr along the great circle towards the
    tangent part of -update; 'geodesic_scaled': angle lr * |tangent part|. Zero tangents do not move."""
    if mode == "project":
        p.add_(update, alpha=-lr)
        p.div_(p.norm(dim=dim, keepdim=True).clamp_min(1e-12))
        return
    if mode not in ("geodesic", "geodesic_scaled"):
        raise ValueError(f"unknown sphere mode {mode!r}; choose 'project', 'geodesic' or 'geodesic_scaled'")
    u = update.to(p.dtype)
    tangent = u - (u * p).sum(dim=dim, keepdim=True) * p
    t_norm = tangent.norm(dim=dim, keepdim=True)
    theta = torch.full_like(t_norm, lr) if mode == "geodesic" else lr * t_norm
    direction = tangent / t_norm.clamp_min(1e-30)
    p.mul_(torch.cos(theta)).add_(direction * -torch.sin(theta))
    p.div_(p.norm(dim=dim, keepdim=True).clamp_min(1e-12))  # remove round-off drift only


def stat_sums(D):
    """Per matrix of D (..., m, n): [sum of squares, entries, ||gram - I||_F^2], summable into Muon.stats()."""
    D, k = D.float(), min(D.shape[-2:])
    gram = D @ D.mT if D.size(-2) <= D.size(-1) else D.mT @ D  # the small k x k side
    err = (gram - torch.eye(k, device=D.device)).square().sum(dim=(-2, -1))
    return torch.stack([D.square().sum(dim=(-2, -1)), torch.full_like(err, D.size(-2) * D.size(-1)), err], -1)


def update_stats(D):
    """(update RMS, ||D^T D - I||_F / sqrt(k)) of one (..., m, n) update, as device tensors (no sync)."""
    total, entries, err = stat_sums(D).reshape(-1, 3).sum(0)
    return (total / entries).sqrt(), err.sqrt() / math.sqrt(min(D.shape[-2:]))


# -----------------------------------------------------------------------------
# 3. Other orthogonalizers and the compute dtype

# Amsel et al. 2025 (arXiv 2505.16932), as in modded-nanogpt and dion; tests/test_muon_optim.py regenerates it.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def polar_express(G, steps=5, dtype=None):
    """Polar Express (Amsel et al. 2025): a minimax-optimal quintic per step, closer to U V^T than NS5 after
    5 steps (more reuse the last); the 1.02 safety factor keeps bf16 round-off inside the interval."""
    coeffs = list(POLAR_EXPRESS_COEFFS[:steps]) + [POLAR_EXPRESS_COEFFS[-1]] * max(0, steps - 5)
    return zeropower_via_newtonschulz5(G, dtype=dtype, eps=1e-6, coeffs=coeffs, norm_scale=1.02)


GRAM_MIN_ASPECT = 2.0  # gram_newton_schulz uses the plain iteration when n < this * m (see bench.py --only=speed)


def gram_newton_schulz(G, steps=5, dtype=None, coeffs=None, restart_after=2, eps=1e-7):
    """zeropower_via_newtonschulz5's iteration on the small Gram matrix: for wide X (m < n) a step is
    X <- P(R) X, P(R) = aI + bR + cR^2, R = X X^T; the P's commute, so after k steps X = Q X_0 and
    R <- R P^2, all m x m (m^3 instead of m^2 n per step). Every `restart_after` steps (5 = 2 + 3) X
    and R are recomputed, so round-off cannot compound. 5 steps: 4 m^2 n + 14 m^3 multiply-adds vs
    10 m^2 n + 5 m^3; below n = GRAM_MIN_ASPECT * m the plain iteration runs. Less exact in bf16."""
    if G.ndim < 2:
        raise ValueError(f"orthogonalization needs a (..., m, n) tensor, got shape {tuple(G.shape)}")
    coeffs = list(coeffs or [NS5_COEFFS] * steps)
    m, n = sorted(G.shape[-2:])
    if n < GRAM_MIN_ASPECT * m:  # near-square: the m^3 work costs more than it saves
        return zeropower_via_newtonschulz5(G, dtype=dtype, eps=eps, coeffs=coeffs)
    transposed = G.size(-2) > G.size(-1)  # X: G normalized and cast (0 steps), as (B, m, n) with m <= n
    X = zeropower_via_newtonschulz5(G if not transposed else G.mT, dtype=dtype, eps=eps, coeffs=[]).reshape(-1, m, n)
    size = restart_after or len(coeffs)  # blocks of `size` steps, a short last one joining the one before:
    starts = list(range(0, len(coeffs), size))[:max(1, len(coeffs) // size)]
    fast, spare = _triton_ok(X), None  # fast: the Triton kernels (section 6); X = Q X alternates between 2 buffers
    for start, end in zip(starts, starts[1:] + [len(coeffs)]):
        block = coeffs[start:end]
        R, Q = (triton_sym_matmul_t(X) if fast else torch.bmm(X, X.mT)), None
        for i, (a, b, c) in enumerate(block):
            P = triton_sym_poly(R, b, c) if fast else torch.baddbmm(R, R, R, beta=b, alpha=c)  # b R + c R^2, new ...
            P.diagonal(dim1=-2, dim2=-1).add_(a)  # ... + a I
            Q = P if Q is None else torch.bmm(P, Q)
            if i < len(block) - 1:  # the last R of a block is never used; R P^2 with P^2 = P P^T (symmetric):
                R = torch.bmm(R, triton_sym_matmul_t(P) if fast else torch.bmm(P, P.mT))
        if transposed and end == len(coeffs):  # the last product straight into G's tall layout:
            X = torch.bmm(X.mT, Q).mT  # (Q X)^T = X^T Q: Q is a product of commuting symmetric matrices
        else:
            X, spare = torch.bmm(Q, X, out=spare), (X if X.is_contiguous() else None)
    return (X.mT if transposed else X).reshape(G.shape)


ORTHOGONALIZERS = dict(newton_schulz=zeropower_via_newtonschulz5, polar_express=polar_express,
                       gram_newton_schulz=gram_newton_schulz)


def orthogonalize(G, method="newton_schulz", steps=5, dtype=None):
    """Dispatch by name: 'newton_schulz' (NS5), 'polar_express' or 'gram_newton_schulz'."""
    if method not in ORTHOGONALIZERS:
        raise ValueError(f"unknown ns_method {method!r}; choose one of {sorted(ORTHOGONALIZERS)}")
    return ORTHOGONALIZERS[method](G, steps=steps, dtype=dtype)


NS_DTYPE = None  # global override of the compute dtype (e.g. torch.float32); per group: ns_dtype=...
CPU_BF16_MIN_SIZE = 256  # on a CPU with fast bf16, matrices with a side below this are still faster in fp32


@functools.lru_cache(maxsize=None)
def cpu_fast_bf16():
    """(True/False, why): does this CPU multiply bf16 faster than fp32 (x86 AMX-BF16, the ARM BF16
    extension; without, bf16 is emulated and much slower)? Once per process; MUON_CPU_BF16=1/0 overrides."""
    if (env := os.environ.get("MUON_CPU_BF16")) in ("0", "1"):
        return env == "1", f"MUON_CPU_BF16={env}"
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}  # torch >= 2.8
    if caps.get("amx_bf16") or (not caps and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()):
        return True, "the CPU has AMX-BF16 (torch.cpu.get_capabilities or _is_amx_tile_supported)"
    if caps and caps.get("architecture", "") not in ("aarch64", "arm64"):
        return False, "no AMX-BF16 on this CPU: bf16 matmul would be emulated"
    try:  # ARM: the kernel lists the BF16 extension in /proc/cpuinfo's Features line
        with open("/proc/cpuinfo") as f:
            if any(line.startswith("Features") and " bf16" in f" {line.split(':', 1)[-1]} " for line in f):
                return True, "the CPU has the ARM BF16 extension (/proc/cpuinfo)"
    except OSError:
        pass
    return False, "no fast bf16 matmul found on this CPU"


def default_ns_dtype(device, shape=None):
    """The orthogonalization's compute dtype when none is given: NS_DTYPE if set; bf16 on CUDA; on a CPU
    bf16 where it is fast (cpu_fast_bf16) and the short side >= CPU_BF16_MIN_SIZE; else fp32."""
    if NS_DTYPE is not None:
        return NS_DTYPE
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16
    if kind == "cpu" and cpu_fast_bf16()[0] and (shape is None or min(shape[-2:]) >= CPU_BF16_MIN_SIZE):
        return torch.bfloat16
    return torch.float32


def compute_dtype_rule(device):
    """default_ns_dtype's pick on `device` as text, for a run's identity (no fp32 result reused for bf16)."""
    big, small = default_ns_dtype(device, (CPU_BF16_MIN_SIZE,) * 2), default_ns_dtype(device, (1, 1))
    return str(big) if big == small else f"{big} where the short side >= {CPU_BF16_MIN_SIZE}, else {small}"


# -----------------------------------------------------------------------------
# 4. DDP: with torch.distributed every rank orthogonalizes a share of the matrices

def distributed_step(opt):
    """Muon.step with torch.distributed (distributed=True) or DTensors: the ranks agree on the parameters
    (agree_on_params), plain tensors go through ddp_orthogonalize, DTensors through sharded_muon_step."""
    use_dist = opt.distributed and dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if use_dist else (1, 0)
    for group, params in zip(opt.param_groups, agree_on_params(opt.param_groups, world)):
        if not group["use_muon"]:
            opt._adam_step(group, params)
            continue
        blocks = [(p, i, rows, g) for p in params if not is_sharded(p)  # (param, block, its rows, their direction)
                  for i, (rows, g) in enumerate(split_rows(group["split"], p, _momentum(opt, group, p)))]
        for (p, i, rows, _), D in zip(blocks, ddp_orthogonalize(opt, group, [b[3] for b in blocks], world, rank)):
            opt._apply_muon(group, p, D, rows, i)
        if any(is_sharded(p) for p in params):
            sharded_muon_step(opt, group, [p for p in params if is_sharded(p)])


def _momentum(opt, group, p):
    """momentum_direction of p's gradient (its local rows for a DTensor), the buffer made on first use."""
    state = opt.state[p]
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(p)
    state["step"] = state.get("step", 0) + 1
    return momentum_direction(local_part(p.grad), local_part(state["momentum_buffer"]), group["momentum"],
                              group["nesterov"])


def split_rows(split, p, g):
    """(rows of p, rows of g's matrix view) per block of `split` (one block: all rows, without split)."""
    return zip(p.split(split or len(p)), as_matrices(g).split(split or len(p)))


def share_work(keys, sizes, world):
    """The same plan on every rank: same-key matrices form a bucket (one batched call), cut into <= `world`
    strided chunks, each to the least-loaded rank, largest first: (buckets, chunks, owners, load per rank)."""
    buckets = {}
    for i, k in enumerate(keys):
        buckets.setdefault(k, []).append(i)
    chunks = [idx[k::world] for idx in buckets.values() for k in range(min(world, len(idx)))]
    owner, load = [0] * len(chunks), [0] * world
    for c in sorted(range(len(chunks)), key=lambda c: -len(chunks[c]) * sizes[chunks[c][0]]):
        owner[c] = min(range(world), key=lambda r: load[r])
        load[owner[c]] += len(chunks[c]) * sizes[chunks[c][0]]
    return list(buckets.values()), chunks, owner, load


def ddp_orthogonalize(opt, group, inputs, world, rank):
    """Each rank orthogonalizes its chunks (share_work); one all_gather in the widest NS dtype shares them."""
    mats = [as_matrices(x) for x in inputs]
    keys = [(tuple(m.shape), m.device, m.dtype) for m in mats]  # stacking needs one shape, device and dtype
    _, chunks, owner, load = share_work(keys, [m.numel() for m in mats], world)
    outputs, mine = [None] * len(mats), [c for c in range(len(chunks)) if owner[c] == rank]
    for c in mine:
        stacked = torch.stack([mats[i] for i in chunks[c]])
        for i, D in zip(chunks[c], orthogonalize(stacked, group["ns_method"], group["ns_steps"], group["ns_dtype"])):
            outputs[i] = D
    if world == 1 or not mats:
        return outputs
    if len(devices := {m.device for m in mats}) > 1:
        raise ValueError(f"Muon group {group.get('name', '')!r} holds parameters on {sorted(map(str, devices))}: "
                         "with torch.distributed each rank's Muon parameters must share one device")
    dtype = functools.reduce(torch.promote_types, {group["ns_dtype"] or default_ns_dtype(m.device, m.shape)
                                                   for m in mats})
    buf = torch.zeros(max(load), dtype=dtype, device=mats[0].device)  # all_gather wants equal sizes
    done = torch.cat([outputs[i].reshape(-1) for c in mine for i in chunks[c]]) if mine else buf[:0]
    buf[:done.numel()] = done  # this rank's results, in chunk order
    gathered = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(gathered, buf)
    opt.comm_bytes += (world - 1) * buf.numel() * buf.element_size()
    offsets = [0] * world
    for c in range(len(chunks)):
        r = owner[c]
        for i in chunks[c]:
            outputs[i] = gathered[r][offsets[r]:offsets[r] + mats[i].numel()].view(mats[i].shape)
            offsets[r] += mats[i].numel()
    return outputs


def _param_name(group, group_index, i):
    name = f" ({group['name']!r})" if "name" in group else ""
    return f"parameter {i} of param group {group_index}{name}"


def param_signature(p):
    """What must agree across ranks for the step's collectives to line up."""
    return (tuple(p.shape), str(p.dtype), tuple(str(pl) for pl in p.placements) if is_sharded(p) else ())


def agree_on_params(groups, world):
    """Per group, the parameters to update, agreed on by one small all_gather (group and parameter counts,
    hashes of the shapes/dtypes/placements and of the has-grad masks): a mismatch is an error, not a hang."""
    masks = [[p.grad is not None for p in g["params"]] for g in groups]
    if world > 1:
        params = [p for g in groups for p in g["params"]]
        sigs = [(gi, bool(g["use_muon"]), [param_signature(p) for p in g["params"]]) for gi, g in enumerate(groups)]
        device = params[0].grad.device if params and params[0].grad is not None else (
            local_part(params[0]).device if params else torch.device("cpu"))
        header = torch.tensor([len(groups), len(params), zlib.crc32(repr(sigs).encode()),
                               zlib.crc32(repr(masks).encode())], dtype=torch.int64, device=device)
        gathered = [torch.empty_like(header) for _ in range(world)]
        dist.all_gather(gathered, header)
        table = torch.stack(gathered).cpu()
        if (table[:, :3] != table[0, :3]).any():
            everyone = [None] * world
            dist.all_gather_object(everyone, sigs)
            raise RuntimeError(describe_rank_mismatch(everyone, groups))
        if (table[:, 3] != table[0, 3]).any():
            masks = agree_on_grads(groups, masks, device)
    return [[p for p, h in zip(g["params"], m) if h] for g, m in zip(groups, masks)]


def agree_on_grads(groups, masks, device):
    """One all_reduce agrees on which parameters have gradients: a plain one is skipped on every rank
    if any rank lacks its grad (as DDP does); a sharded one is an error (rows would get no update)."""
    flat = torch.tensor([h for m in masks for h in m], dtype=torch.int32, device=device)
    both = torch.cat([flat, -flat])
    dist.all_reduce(both, op=dist.ReduceOp.MIN)
    lo, hi = both[:len(flat)].tolist(), (-both[len(flat):]).tolist()
    k = 0
    for gi, g in enumerate(groups):
        for i, p in enumerate(g["params"]):
            if is_sharded(p) and lo[k] != hi[k]:
                raise RuntimeError(f"Muon.step: {_param_name(g, gi, i)} (shape {tuple(p.shape)}, sharded) has a "
                                   "gradient on some ranks but not on others; every rank must run backward "
                                   "through it (or zero_grad it on all ranks).")
            masks[gi][i] = bool(lo[k])
            k += 1
    return masks


def describe_rank_mismatch(signatures, groups):
    """The error for disagreeing ranks (signatures[r]: rank r's per-group signatures): the first difference."""
    def differences(ref):
        for r, sig in enumerate(signatures[1:], 1):
            if len(sig) != len(ref):
                yield f"rank 0 has {len(ref)} param groups, rank {r} has {len(sig)}"
            for (gi, muon0, ps0), (_, muon1, ps1) in zip(ref, sig):
                where = _param_name(groups[gi], gi, 0).split(" of ", 1)[1] if gi < len(groups) else f"param group {gi}"
                diff = [i for i, (a, b) in enumerate(zip(ps0, ps1)) if a != b]
                if muon0 != muon1:
                    yield f"{where} has use_muon={muon0} on rank 0 but {muon1} on rank {r}"
                elif len(ps0) != len(ps1):
                    yield f"{where} has {len(ps0)} parameters on rank 0 but {len(ps1)} on rank {r}"
                elif diff:
                    yield (f"parameter {diff[0]} of {where}: rank 0 has (shape, dtype, placements) {ps0[diff[0]]}, "
                           f"rank {r} has {ps1[diff[0]]}")
    problem = next(differences(signatures[0]), "the parameter signatures differ")
    return (f"Muon.step: ranks disagree on the parameters to optimize ({problem}). Every rank must build the "
            "optimizer over the same parameters, in the same order, with the same shapes, dtypes and sharding "
            "(same model code and fully_shard calls on every rank).")


# -----------------------------------------------------------------------------
# 5. FSDP2: DTensor parameters
# FSDP2 makes every parameter a DTensor, Shard(0) (HSDP: (Replicate(), Shard(0))): each rank holds a torch.chunk
# block of rows, where elementwise math is exact. Orthogonalization needs whole matrices: each gets an owner rank;
# one all_to_all per shape bucket brings it the rows, a second sends results back. 3D ones stay where they live.

def is_sharded(t):
    """True for a DTensor; via sys.modules (importing torch.distributed.tensor would slow the import)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def local_part(t):
    """The local block of a DTensor (an alias: in-place ops on it update the DTensor), else t."""
    return t.to_local() if is_sharded(t) else t


def matrix_shape(shape):
    """Global shape of the matrix view (as_matrices) of a parameter of this shape."""
    return (shape[0], math.prod(shape[1:])) if len(shape) >= 4 else tuple(shape)


def chunk_rows(n_rows, world):
    """Rows per rank as FSDP2 splits them (torch.chunk): 7 rows on 2 ranks are 4 + 3, 3 on 4 are 1 + 1 + 1 + 0."""
    size = -(-n_rows // world) if world else 0
    return [max(0, min(size, n_rows - r * size)) for r in range(world)]


def shard_layout(p):
    """(process group, size, rank in it) of the mesh dim sharding p's dim 0, (None, 1, 0) if replicated;
    anything but FSDP2's layout (Shard(0) on one mesh dim, Replicate() on the others) is an error."""
    from torch.distributed.tensor import Replicate, Shard
    shard_dims = [d for d, pl in enumerate(p.placements) if not isinstance(pl, Replicate)]
    if len(shard_dims) > 1 or any(not isinstance(p.placements[d], Shard) or p.placements[d].dim for d in shard_dims):
        raise ValueError(f"Muon supports DTensors laid out like FSDP2's: Shard(0) on one mesh dim, Replicate() on the "
                         f"others; got placements {tuple(p.placements)} for a parameter of shape {tuple(p.shape)}. "
                         "Shard with fully_shard (default shard_placement_fn), or pass plain tensors.")
    if not shard_dims:
        return None, 1, 0
    mesh, d = p.device_mesh, shard_dims[0]
    return mesh.get_group(d), mesh.size(d), mesh.get_local_rank(d)


def check_sharded_param(p, group, distributed, where):
    """Reject at construction foreign placements, a sphere along the sharded dim 0, a single-device wrapper."""
    _, world, _ = shard_layout(p)
    if world > 1 and not distributed:
        raise ValueError(f"{where} (shape {tuple(p.shape)}) is a DTensor sharded over {world} ranks, but this "
                         "optimizer was built with distributed=False (SingleDeviceMuon*): use Muon / MuonWithAuxAdam.")
    if world > 1 and group.get("sphere") is not None and group["sphere_dim"] % p.ndim == 0:
        raise ValueError(f"{where} (shape {tuple(p.shape)}): sphere={group['sphere']!r} with sphere_dim="
                         f"{group['sphere_dim']} normalizes along dim 0, which FSDP2 shards across ranks. Use a "
                         "sphere_dim other than 0 (-1: rows are whole on every rank), or keep it out of fully_shard.")


def sharded_muon_step(opt, group, params):
    """Muon on DTensor (FSDP2) parameters: momentum on the local rows; whole matrices orthogonalized here,
    row-sharded ones by owner ranks; NorMuon with global statistics; the scale of the global (block) shape."""
    layouts, split, by_group = [shard_layout(p) for p in params], group["split"], {}
    inputs = [_momentum(opt, group, p) for p in params]
    whole = [i for i, p in enumerate(params) if p.ndim == 3 or layouts[i][1] == 1]
    D, sums = _whole_directions(opt, group, params, inputs, whole)
    for i in [i for i in range(len(params)) if i not in whole]:
        by_group.setdefault(id(layouts[i][0]), []).append(i)
    for idx in by_group.values():
        rows, row_sums = _row_sharded_directions(opt, group, [params[i] for i in idx], [inputs[i] for i in idx],
                                                 layouts[idx[0]])
        D.update(zip(idx, rows))
        sums.update(zip(idx, row_sums))
    if opt.track_stats:
        record_sharded_stats(opt, group, params, layouts, sums)
    for i, p in enumerate(params):
        local, (m, n), (_, world, rank) = local_part(p), matrix_shape(p.shape)[-2:], layouts[i]
        row0 = sum(chunk_rows(m, world)[:rank]) if p.ndim != 3 else 0  # of this rank's rows
        if group["normuon"] and split:  # per block, on this rank's rows
            D[i] = normuon_split_rows(as_matrices(D[i].view(local.shape)), row0, split, sharded_normuon_state(
                opt, p, split), group["normuon"], layouts[i][0] if world > 1 else None)
        d = D[i].view(local.shape)
        for j, a, b in row_blocks(split or (len(local) if p.ndim == 3 else m,), row0, len(local)):
            apply_update(local[a:b], d[a:b], **{k: group[k] for k in APPLY_KEYS}, step=opt.state[p]["step"],
                         scale=shape_scale(((split or (m,))[j], n), group["scale"]))


def row_blocks(sizes, row0, n_rows):
    """(block, first, end) of each block of `sizes` rows that meets rows row0 .. row0 + n_rows, in local rows."""
    spans = [(j, max(sum(sizes[:j]), row0) - row0, min(sum(sizes[:j + 1]), row0 + n_rows) - row0)
             for j in range(len(sizes))]
    return [(j, a, b) for j, a, b in spans if a < b]


def _whole_directions(opt, group, params, inputs, idx):
    """({i: direction}, {i: stat sums}) for params[i], i in idx, whose matrices are whole on this rank."""
    D, sums, by_shape, parts, split = {}, {}, {}, {}, group["split"]
    for i in idx:  # (B, m, n) matrices, with split each block alone
        for j, x in enumerate(as_matrices(inputs[i]).split(split) if split else [inputs[i]]):
            x = x.reshape(-1, *x.shape[-2:] if split else matrix_shape(params[i].shape)[-2:])
            by_shape.setdefault((x.shape[-2:], x.dtype), []).append((i, j, x))
    for same in by_shape.values():
        stacked = torch.cat([x for _, _, x in same])
        res = (orthogonalize(stacked, group["ns_method"], group["ns_steps"], group["ns_dtype"]) if stacked.size(0)
               else stacked.to(group["ns_dtype"] or default_ns_dtype(stacked.device, stacked.shape)))
        for (i, j, _), r in zip(same, res.split([x.size(0) for _, _, x in same])):
            parts.setdefault(i, {})[j] = r
    for i, blocks in parts.items():
        r = D[i] = torch.cat([blocks[j] for j in sorted(blocks)], dim=-2)
        if opt.track_stats:
            sums[i] = torch.stack([stat_sums(b).sum(0) for _, b in sorted(blocks.items())])
        if group["normuon"] and not split:
            v = sharded_normuon_state(opt, params[i])
            D[i] = normuon_normalize(r, v.view(*r.shape[:-2], *v.shape[-2:]), group["normuon"])
    return D, sums


def _row_sharded_directions(opt, group, params, inputs, layout):
    """(directions, stat sums) of row-sharded parameters of one process group, by owner ranks (share_work)."""
    pg, world, rank = layout
    keys = [(matrix_shape(p.shape), x.dtype) for p, x in zip(params, inputs)]
    buckets, chunks, owner, _ = share_work(keys, [math.prod(k[0]) for k in keys], world)
    owner_of = {j: owner[c] for c, chunk in enumerate(chunks) for j in chunk}
    D, sums = [None] * len(params), [None] * len(params)
    for bucket in buckets:
        shape, owners = keys[bucket[0]][0], [owner_of[j] for j in bucket]
        blocks = [as_matrices(inputs[j]) for j in bucket]
        for j, b in [(j, b) for j, b in zip(bucket, blocks) if b.size(0) != chunk_rows(shape[0], world)[rank]]:
            raise RuntimeError(f"Muon: a parameter of shape {tuple(params[j].shape)} holds {b.size(0)} rows on rank "
                               f"{rank} of {world}, expected {chunk_rows(shape[0], world)} (torch.chunk split, as "
                               "fully_shard does); reshard with fully_shard.")
        res, full, sent = orthogonalize_row_sharded(blocks, shape, owners, pg, world, rank, group["ns_method"],
                                                    group["ns_steps"], group["ns_dtype"], group["split"])
        opt.comm_bytes += sent
        if opt.track_stats:  # (matrices, blocks, 3) from the owner's whole matrices
            owned = iter(torch.stack([stat_sums(b) for b in full.split(group["split"] or shape[0], dim=1)], 1)
                         if full is not None else [])
            for j, o in zip(bucket, owners):
                sums[j] = next(owned) if o == rank else torch.zeros(len(group["split"] or [0]), 3, device=res[0].device)
        if group["normuon"] and not group["split"]:  # split: per block in sharded_muon_step
            moments = [sharded_normuon_state(opt, params[j]) for j in bucket]
            res = normuon_normalize_row_sharded(torch.stack(res), moments, shape, group["normuon"], pg)
        for j, r in zip(bucket, res):
            D[j] = r
    return D, sums


def sharded_normuon_state(opt, p, split=None):
    """NorMuon's second moment for a DTensor parameter (local block returned), an fp32 DTensor that DCP
    reshards: per row (tall matrices, 3D), sharded like p; per column (wide), replicated; with split,
    normuon_moment's flat vector, replicated."""
    from torch.distributed.tensor import DTensor, Replicate
    state = opt.state[p]
    if "second_moment" not in state:
        *batch, m, n = matrix_shape(p.shape)
        shape = [sum(moment_lengths(split, n))] if split else [*batch, *((m, 1) if m >= n else (1, n))]
        by_rows = not split and (p.ndim == 3 or m >= n)
        placements = list(p.placements) if by_rows else [Replicate()] * p.device_mesh.ndim
        local_shape = [local_part(p).shape[0], *shape[1:]] if by_rows else shape
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        local = torch.zeros(local_shape, dtype=torch.float32, device=local_part(p).device)
        state["second_moment"] = DTensor.from_local(local, p.device_mesh, placements, run_check=False,
                                                    shape=torch.Size(shape), stride=stride)
    return local_part(state["second_moment"])


def record_sharded_stats(opt, group, params, layouts, sums):
    """track_stats for DTensors: per-rank partial stat_sums (blocks, 3), one all_reduce per process group."""
    by_group = {}
    for i, (pg, world, _) in enumerate(layouts):
        by_group.setdefault(id(pg) if world > 1 else None, []).append(i)
    for key, idx in by_group.items():
        t = torch.cat([sums[i] for i in idx])
        if key is not None:
            dist.all_reduce(t, group=layouts[idx[0]][0])
        rows = iter(t)
        for i in idx:
            m, n = matrix_shape(params[i].shape)[-2:]
            for j, (size, row) in enumerate(zip(group["split"] or (m,), rows)):
                opt._stats[(params[i], j)] = ((row[0] / row[1]).sqrt(), row[2].sqrt() / math.sqrt(min(size, n)))


def _flat_cat(tensors, dtype, device):
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.empty(0, dtype=dtype, device=device)


def exchange(pieces, recv_sizes, group, dtype, device):
    """One all_to_all: pieces[d] goes to rank d; returns the flat blocks received and the bytes sent."""
    send, recv = _flat_cat(pieces, dtype, device).to(dtype), torch.empty(sum(recv_sizes), dtype=dtype, device=device)
    send_sizes = [t.numel() for t in pieces]
    dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=group)
    sent = (sum(send_sizes) - send_sizes[dist.get_rank(group)]) * send.element_size()
    return list(recv.split(recv_sizes)), sent


def orthogonalize_row_sharded(blocks, shape, owners, group, world, rank, method, steps, dtype, split=None):
    """Orthogonalize K (m, n) matrices whose rows are spread over the ranks (`blocks`: this rank's): all_to_all
    #1 brings owners[j] matrix j, it orthogonalizes its matrices batched (split: by row block), #2 returns the
    rows. Returns (this rank's result blocks, the owner's full results (k, m, n) or None, bytes sent)."""
    (m, n), rows, device = shape, chunk_rows(shape[0], world), blocks[0].device
    starts, out_dtype = [sum(rows[:r]) for r in range(world)], dtype or default_ns_dtype(device, shape)
    mine = [j for j, o in enumerate(owners) if o == rank]
    pieces = [_flat_cat([blocks[j] for j, o in enumerate(owners) if o == d], blocks[0].dtype, device)
              for d in range(world)]
    got, sent1 = exchange(pieces, [len(mine) * rows[s] * n for s in range(world)], group, blocks[0].dtype, device)
    full = torch.cat([g.view(len(mine), rows[s], n) for s, g in enumerate(got)], dim=1) if mine else None
    if mine:  # (split: block by block)
        full = torch.cat([orthogonalize(b, method, steps, dtype) for b in full.split(split or m, dim=1)], dim=1)
    back = [full[:, starts[d]:starts[d] + rows[d]] if mine else torch.empty(0, device=device) for d in range(world)]
    counts = [owners.count(s) for s in range(world)]
    got, sent2 = exchange(back, [counts[s] * rows[rank] * n for s in range(world)], group, out_dtype, device)
    result = [None] * len(owners)
    for s in range(world):
        for block, j in zip(got[s].view(counts[s], rows[rank], n), [j for j, o in enumerate(owners) if o == s]):
            result[j] = block
    return result, full, sent1 + sent2


def normuon_normalize_row_sharded(D, second_moments, shape, beta2, group, eps=1e-10):
    """normuon_normalize for K (m, n) matrices, this rank's rows D (K, rows, n), one all_reduce: tall, per-row
    statistics sharded like p, the norms reduced; wide, the column squares reduced, (1, n) statistics replicated."""
    (m, n), D = shape, D.float()
    cols = D.square().sum(dim=-2, keepdim=True) if m < n else None  # (K, 1, n)
    if m < n and group is not None:
        dist.all_reduce(cols, group=group)
    for v, mean_sq in zip(second_moments, D.square().mean(dim=-1, keepdim=True) if m >= n else cols / m):
        v.lerp_(mean_sq, 1 - beta2)
    V = torch.stack(second_moments).add(eps)
    N = D * V.rsqrt()
    if m >= n:
        sums = torch.stack([D.square().sum(dim=(-2, -1)), N.square().sum(dim=(-2, -1))], dim=-1)
        if group is not None:
            dist.all_reduce(sums, group=group)
    norm_o, norm_n = sums.unbind(-1) if m >= n else (cols.sum(dim=(-2, -1)), (cols / V).sum(dim=(-2, -1)))
    return N * (norm_o.sqrt() / norm_n.sqrt().clamp_min(1e-30)).view(-1, 1, 1)


def normuon_split_rows(D, row0, split, moment, beta2, group, eps=1e-10):
    """normuon_normalize per block of `split` rows, for this rank's rows D (r, n) from global row row0 on:
    one all_reduce over `group` (None: one rank) sums the blocks' row and column squares, so every rank
    updates the replicated flat moment (normuon_moment's layout) alike and scales its rows."""
    m, n, k, spans = sum(split), D.size(-1), len(split), row_blocks(split, row0, len(D))
    D, squares = D.float(), torch.zeros(k * n + m, device=D.device)
    cols, rows = squares[:k * n].view(k, n), squares[k * n:]
    for j, a, b in spans:
        cols[j] = D[a:b].square().sum(0)
    rows[row0:row0 + len(D)] = D.square().sum(1)
    if group is not None:
        dist.all_reduce(squares, group=group)
    for j, (size, v) in enumerate(zip(split, moment.split(moment_lengths(split, n)))):
        top = sum(split[:j])  # block j's first row
        mean_sq = rows[top:top + size, None] / n if size >= n else cols[j:j + 1] / size  # as normuon_normalize
        inv_rms = v.view(mean_sq.shape).lerp_(mean_sq, 1 - beta2).add(eps).rsqrt()
        factor = inv_rms * (mean_sq.sum() / (mean_sq * inv_rms.square()).sum().clamp_min(1e-30)).sqrt()
        for _, a, b in [span for span in spans if span[0] == j]:  # this rank's rows of block j
            D[a:b] *= factor[row0 - top + a:row0 - top + b] if size >= n else factor
    return D


def sharded_comm_bytes(shapes, world, elem_size=4, ns_elem_size=None):
    """Bytes all ranks send per step for FSDP-sharded matrices of these global shapes: the rows each owner
    lacks, there in the param dtype and back in the NS dtype (3D: nothing; NorMuon's all_reduce not counted)."""
    ns_elem_size = ns_elem_size or elem_size
    return sum(matrix_shape(s)[0] * (world - 1) / world * matrix_shape(s)[1] * (elem_size + ns_elem_size)
               for s in shapes if len(s) != 3 and world > 1)


# -----------------------------------------------------------------------------
# 6. Triton: symmetric matmuls for CUDA
# X @ X^T and b*A + c*A@A (A symmetric) are symmetric: the kernels compute one triangle of tiles, half the FLOPs
# of 2 of the 3 matmuls per step (modded-nanogpt record #27), where they measured faster (bench.py gpu_ns).

USE_TRITON = True  # set False to force the torch path
TRITON_MIN_WORK = 4096 ** 3  # use the kernels when the batch's B * m * m * n is at least this (bench.py gpu_ns)
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # kernels run on CPU tensors (tests)


def triton_pays_off(X):
    """X (B, m, n) holds enough matmul work for the kernels to beat torch's (TRITON_MIN_WORK)."""
    return X.shape[0] * X.size(-2) ** 2 * X.size(-1) >= TRITON_MIN_WORK


def kernel_config(M, dtype):
    """(BLOCK_M, BLOCK_K, num_warps) for M x M: 128x128x64, 8 warps if M >= 1024 (fp32: K 32, for shared memory)."""
    big = M >= 1024
    return (128 if big else 64, 64 if big and dtype.itemsize == 2 else 32, 8 if big else 4)


def _triton_ok(X):
    return (USE_TRITON and triton is not None and (X.is_cuda or _TRITON_INTERPRET) and X.ndim == 3
            and X.dtype in (torch.float16, torch.bfloat16, torch.float32) and triton_pays_off(X)
            and triton_verified(X.device, X.dtype, kernel_config(X.size(1), X.dtype)))


_TRITON_VERIFIED = {}  # (device, dtype, kernel config) -> bool: the kernels matched torch on first use


def triton_verified(device, dtype, config=None):
    """Trust the kernels on (device, dtype, kernel_config; None: all) only once they match torch on a small
    batch, once per process: a miscompiling Triton/driver costs a warning and the torch path, never an update."""
    if config is None:
        return all([triton_verified(device, dtype, kernel_config(M, dtype)) for M in (1, 1024)])
    key = (str(device), dtype, tuple(config))
    if key not in _TRITON_VERIFIED:
        _TRITON_VERIFIED[key] = _check_triton_kernels(device, dtype, tuple(config))
    return _TRITON_VERIFIED[key]


def _check_triton_kernels(device, dtype, config, batch=2):
    block_m, block_k, warps = config  # below: several tiles per side, the last ones partial
    X = torch.randn(batch, 2 * block_m + 17, 2 * block_k + 5, generator=torch.Generator().manual_seed(0))
    X = X.to(device=device, dtype=dtype)
    ref = X.float() @ X.float().mT
    A = (ref / ref.norm(dim=(-2, -1), keepdim=True)).to(dtype)  # symmetric, norm 1 as in the iteration
    ref_poly = -4.775 * A.float() + 2.0315 * A.float() @ A.float()
    tol, what = 1e-4 if dtype == torch.float32 else 3e-2, f"on {device} {dtype}, {block_m}x{block_m}x{block_k} " \
        f"tiles, {warps} warps"
    for name, run, expected in (("triton_sym_matmul_t", lambda: triton_sym_matmul_t(X, config), ref),
                                ("triton_sym_poly", lambda: triton_sym_poly(A, -4.775, 2.0315, config), ref_poly)):
        try:
            err = ((run().float() - expected).abs().max() / expected.abs().max()).item()
            problem = None if err <= tol else f"disagrees with torch {what} (max relative error {err:.2e} > {tol:g})"
        except Exception as e:  # compile errors, unsupported GPU, ...
            problem = f"failed {what} ({type(e).__name__}: {e})"
        if problem:  # (a NaN error is a problem too)
            warnings.warn(f"muon_optim: Triton kernel {name} {problem}; using torch matmuls for these shapes for "
                          f"the rest of this process (set muon_optim.USE_TRITON = False to skip Triton, or upgrade "
                          f"it: pip install -U triton)")
            return False
    return True


if triton is not None:

    @triton.jit
    def _sym_kernel(X_ptr, Y_ptr, C_ptr, M, K, sxb, sxm, sxk, syb, sym_, syk, scb, scm, scn, alpha, beta,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ADD_Y: tl.constexpr,
                    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
        """C = alpha * X @ X^T (+ beta * Y) for a lower-triangle tile of one batch entry, and its mirror; fp32
        accumulation ('ieee': fp32 stays exact, not TF32); DOT_FP32: the interpreter's bf16 dot is wrong (#11584)."""
        pid_b = tl.program_id(1)
        pid = tl.program_id(0)
        # map the linear id onto lower-triangle tile coordinates (row i holds tiles 0..i)
        pid_m = ((tl.sqrt(8.0 * pid + 1.0) - 1.0) / 2.0).to(tl.int32)
        pid_m = tl.where((pid_m + 1) * (pid_m + 2) // 2 <= pid, pid_m + 1, pid_m)  # float round-off guard
        pid_m = tl.where(pid_m * (pid_m + 1) // 2 > pid, pid_m - 1, pid_m)
        pid_n = pid - pid_m * (pid_m + 1) // 2
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        Xb = X_ptr + pid_b * sxb
        acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(Xb + rm[:, None] * sxm + kk[None, :] * sxk, mask=(rm[:, None] < M) & (kk[None, :] < K),
                        other=0.0)
            b = tl.load(Xb + rn[:, None] * sxm + kk[None, :] * sxk, mask=(rn[:, None] < M) & (kk[None, :] < K),
                        other=0.0)
            if DOT_FP32:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        acc = acc * alpha
        mask = (rm[:, None] < M) & (rn[None, :] < M)
        if ADD_Y:
            y = tl.load(Y_ptr + pid_b * syb + rm[:, None] * sym_ + rn[None, :] * syk, mask=mask, other=0.0)
            acc += beta * y.to(tl.float32)
        out = acc.to(C_ptr.dtype.element_ty)
        Cb = C_ptr + pid_b * scb
        tl.store(Cb + rm[:, None] * scm + rn[None, :] * scn, out, mask=mask)
        if pid_m != pid_n:
            tl.store(Cb + rn[None, :] * scm + rm[:, None] * scn, out, mask=mask)

    def _launch_sym(X, Y, alpha, beta, config=None):
        """One program per lower-triangle tile per batch entry; config: kernel_config's by default."""
        if X.ndim != 3 or (Y is not None and Y.shape != (X.size(0), X.size(1), X.size(1))):
            raise ValueError(f"symmetric kernel wants X (B, M, K) and Y (B, M, M), got {tuple(X.shape)}, "
                             f"{None if Y is None else tuple(Y.shape)}")
        (Bsz, M, K), (block_m, block_k, num_warps) = X.shape, config or kernel_config(X.size(1), X.dtype)
        C = torch.empty(Bsz, M, M, dtype=X.dtype, device=X.device)
        t, Yarg = triton.cdiv(M, block_m), (Y if Y is not None else C)
        _sym_kernel[(t * (t + 1) // 2, Bsz)](
            X, Yarg, C, M, K, X.stride(0), X.stride(1), X.stride(2),
            Yarg.stride(0), Yarg.stride(1), Yarg.stride(2), C.stride(0), C.stride(1), C.stride(2),
            float(alpha), float(beta), BLOCK_M=block_m, BLOCK_K=block_k, ADD_Y=Y is not None,
            PRECISION="ieee" if X.dtype == torch.float32 else "tf32",
            DOT_FP32=_TRITON_INTERPRET and X.dtype == torch.bfloat16, num_warps=num_warps, num_stages=3)
        return C

    def triton_sym_matmul_t(X, config=None):
        """X @ X^T for (B, m, n) X with the Triton kernel: lower-triangle tiles only, mirrored."""
        return _launch_sym(X, None, 1.0, 0.0, config)

    def triton_sym_poly(A, b, c, config=None):
        """b*A + c*A@A for symmetric (B, m, m) A: since A = A^T, A@A = A@A^T, the same kernel."""
        return _launch_sym(A, A, c, b, config)


# -----------------------------------------------------------------------------
# 7. KellerJordan-compatible wrappers and parameter grouping

def _require_use_muon(param_groups):
    param_groups = list(param_groups)
    if not all(isinstance(g, dict) and "use_muon" in g for g in param_groups):
        raise ValueError("MuonWithAuxAdam takes a list of param-group dicts, each with use_muon=True (Muon: lr, "
                         "momentum, weight_decay) or use_muon=False (AdamW: lr, betas, eps, weight_decay)")
    return param_groups


class MuonWithAuxAdam(Muon):
    """KellerJordan/Muon-compatible: MuonWithAuxAdam([dict(params=..., use_muon=True, lr=0.02,
    weight_decay=0.01), dict(params=..., use_muon=False, lr=3e-4, betas=(0.9, 0.95))])."""

    def __init__(self, param_groups, **kwargs):
        super().__init__(_require_use_muon(param_groups), **kwargs)


class SingleDeviceMuon(Muon):
    """KellerJordan/Muon-compatible single-device Muon (never uses torch.distributed)."""

    def __init__(self, params, lr=0.02, weight_decay=0.0, momentum=0.95, **kwargs):
        super().__init__(params, lr=lr, weight_decay=weight_decay, momentum=momentum, distributed=False, **kwargs)


class SingleDeviceMuonWithAuxAdam(Muon):
    """KellerJordan/Muon-compatible single-device Muon with AdamW groups (use_muon=False)."""

    def __init__(self, param_groups, **kwargs):
        super().__init__(_require_use_muon(param_groups), distributed=False, **kwargs)


HEAD_NAMES = ("lm_head", "head", "classifier", "unembed", "output", "fc_out", "readout")


def muon_param_groups(model, lr=0.02, weight_decay=0.0, adam_lr=3e-4, adam_betas=(0.9, 0.95), adam_eps=1e-10,
                      adam_weight_decay=0.0, head_names=HEAD_NAMES, split_fused=False, **muon_options):
    """Hidden >= 2D weights to Muon; embeddings, the output head and every < 2D parameter to AdamW (an
    embedding or head in Muon is the most common misuse). The head: a Linear tied to an embedding, named
    like `head_names`, or else the last Linear whose output size is a token vocabulary (not 'wpe'); hidden
    layers as wide stay in Muon. split_fused=True: fused (3d, d) QKV weights (c_attn / qkv .weight,
    nn.MultiheadAttention's in_proj_weight) go to a group 'muon_fused' with split=3 (per head: split=3*heads)."""
    embed_ids, vocab_sizes, linears = set(), set(), []
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
            embed_ids.add(id(m.weight))
            if (leaf := name.rsplit(".", 1)[-1].lower()) != "wpe" and not leaf.startswith("pos"):  # not positions
                vocab_sizes.add(m.num_embeddings)
        linears += [(name.rsplit(".", 1)[-1], m)] if isinstance(m, torch.nn.Linear) else []
    head_ids = {id(m.weight) for leaf, m in linears if leaf in head_names or id(m.weight) in embed_ids}
    if not head_ids:  # no named or tied head: the last vocabulary-sized Linear is the readout
        head_ids = set({m.out_features: id(m.weight) for _, m in linears if m.out_features in vocab_sizes}.values())
    kinds = dict(muon=[], muon_fused=[], embed=[], head=[], scalar=[])
    for name, p in model.named_parameters():  # lists a tied weight once
        fused = split_fused and p.ndim == 2 and p.size(0) == 3 * p.size(1) and (
            name.split(".")[-2:] in (["c_attn", "weight"], ["qkv", "weight"]) or name.endswith("in_proj_weight"))
        if p.requires_grad:
            kinds["embed" if id(p) in embed_ids else "head" if id(p) in head_ids else "muon_fused" if fused else
                  "muon" if p.ndim >= 2 else "scalar"].append(p)
    adam = dict(use_muon=False, lr=adam_lr, betas=adam_betas, eps=adam_eps, weight_decay=adam_weight_decay)
    muon = dict(use_muon=True, lr=lr, weight_decay=weight_decay, **muon_options)
    groups = [dict(muon, params=kinds["muon"], name="muon"), dict(muon, params=kinds["muon_fused"], split=3,
                                                                  name="muon_fused")]
    groups += [dict(params=kinds[kind], name=kind, **adam) for kind in ("embed", "head", "scalar")]
    return [g for g in groups if g["params"]]
