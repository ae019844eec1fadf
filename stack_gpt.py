"""
stack_gpt.py: train a small GPT, make it deeper by stacking its layers, keep training.

Model growth by depthwise stacking (G_stack, Du et al. 2024): train a shallow model,
repeat its whole block of layers g times (L1..L4 -> L1..L4,L1..L4), train the deep model.
The question is whether the shallow phase buys the deep model a head start that is worth
more than the compute it cost. This file reads in the order the data flows:

    constants -> model -> optimizer -> schedules -> stacking -> planning -> evaluation
              -> the two-phase loop (train shallow, stack, train deep) -> flags -> machinery

The model and optimizer follow nanochat's base model (Feb 2026): rotary, QK-norm, ReLU^2,
value embeddings, per-layer lambdas, Muon + AdamW. What is not the lesson lives elsewhere:
the token shards and their loader in prepare_data.py; checkpoints, run folders, flag checks and
multi-process helpers in machinery.py; the printed plan and the acceleration report in reports.py.
Examples:

    python stack_gpt.py --depth 6 --stack-to 12   # d6s12 -> d12 on a GPU ("d6s12" in the write-up)
    python stack_gpt.py --depth 12                # the plain d12 baseline on the same FLOPs
"""

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import machinery
import prepare_data
import reports
from machinery import TrainingDiverged, UsageError
from prepare_data import DataError, TokenWindows, finite_float, load_data, val_batches

# -----------------------------------------------------------------------------
# Constants: nanochat's, each named once

REFERENCE_DEPTH, REFERENCE_BATCH, REFERENCE_WIDTH = 12, 2**19, 768  # nanochat's d12, its tokens per step, and the width its LRs were tuned at
BATCH_EXPONENT = 0.383  # batch size grows as (training tokens)^0.383 (Power Lines)
VE_GATE_CHANNELS = 32  # the value-embedding gate reads this many channels of the block input
SOFTCAP = 15  # logits are squashed smoothly into [-15, 15]
ADAMW_BETAS, X0_LAMBDA_BETAS, ADAMW_EPS = (0.8, 0.95), (0.96, 0.95), 1e-10
MUON_MOMENTUM_START, MUON_MOMENTUM_RISE, MUON_MOMENTUM_WARMUP = 0.85, 0.10, 300  # Muon's momentum: 0.85 -> 0.95 over 300 steps
MUON_BETA2 = 0.95  # NorMuon's running mean of the squared update
LOSS_EMA_DECAY = 0.9  # the logged train loss is smoothed over roughly the last 10 steps
PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}  # --dtype
GROW_OPERATORS = ("stack", "interleave", "identity", "random")  # --grow


# -----------------------------------------------------------------------------
# Model: nanochat's GPT with full attention

@dataclass
class GPTConfig:
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    sequence_len: int
    ve_layers: tuple  # indices of the layers that carry a value embedding

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @classmethod
    def from_checkpoint(cls, ckpt):
        """The config a checkpoint saved as plain data (its ve_layers a list)."""
        return cls(**{**ckpt["model_config"], "ve_layers": tuple(ckpt["model_config"]["ve_layers"])})


def default_ve_layers(n_layer):
    """nanochat's rule: every other layer, counted back from the last one (which always has one)."""
    return tuple(i for i in range(n_layer) if i % 2 == (n_layer - 1) % 2)


def model_width(final_depth, args):
    """nanochat's sizing: depth * aspect ratio, rounded up to a whole number of heads."""
    return math.ceil(final_depth * args.aspect_ratio / args.head_dim) * args.head_dim


def model_config(depth, final_depth, args, vocab_size):
    """A depth-layer model at the width and head count of a final_depth model (so a d6s12 is as wide as a d12)."""
    width = model_width(final_depth, args)
    return GPTConfig(n_layer=depth, n_head=width // args.head_dim, n_embd=width, vocab_size=vocab_size,
                     sequence_len=args.seq_len, ve_layers=default_ve_layers(depth))


def norm(x):
    # RMSNorm with no learnable gain; also used as the QK-norm.
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len, head_dim, base=10000):
    """cos/sin of the rotary angles, shape (1, T, 1, head_dim/2). Kept in bf16 as nanochat does."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos().bfloat16()[None, :, None, :], angles.sin().bfloat16()[None, :, None, :]


def apply_rotary(x, cos, sin):
    # Rotate each pair (x1[j], x2[j]) by the angle position * frequency j; pairs are halves, not neighbours.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, has_value_embed):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        n = config.n_embd
        self.c_q = nn.Linear(n, n, bias=False)
        self.c_k = nn.Linear(n, n, bias=False)
        self.c_v = nn.Linear(n, n, bias=False)
        self.c_proj = nn.Linear(n, n, bias=False)
        # Value embeddings (ResFormer): a per-layer table of token vectors mixed into v by a gate
        # that reads the first VE_GATE_CHANNELS channels of the block input.
        self.value_embed = nn.Embedding(padded_vocab(config.vocab_size), n) if has_value_embed else None
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_head, bias=False) if has_value_embed else None

    def forward(self, x, idx, cos, sin):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)
        if self.value_embed is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, n_head), 1.0 at init
            v = v + gate.unsqueeze(-1) * self.value_embed(idx).view(B, T, self.n_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, has_value_embed):
        super().__init__()
        self.attn = CausalSelfAttention(config, has_value_embed)
        self.mlp = MLP(config)

    def forward(self, x, idx, cos, sin):
        x = x + self.attn(norm(x), idx, cos, sin)
        return x + self.mlp(norm(x))


def padded_vocab(vocab_size):
    return -(-vocab_size // 64) * 64  # round up to a multiple of 64 for fast matmuls; logits are sliced back


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(padded_vocab(config.vocab_size), config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i in config.ve_layers) for i in range(config.n_layer))
        self.lm_head = nn.Linear(config.n_embd, padded_vocab(config.vocab_size), bias=False)
        # Per-layer scalars: before layer i, x = resid_lambdas[i] * x + x0_lambdas[i] * x0,
        # where x0 is the normed token embedding (a learned skip connection to the input).
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        cos, sin = rotary_tables(config.sequence_len, config.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self):
        """
        Every parameter's initial value, in one place (s = sqrt(3/n_embd): uniform with std 1/sqrt(n_embd)):
            wte                      normal, std 1
            lm_head                  normal, std 0.001
            attn.c_q, c_k, c_v       uniform(-s, s)
            attn.c_proj, mlp.c_proj  zeros: each block starts as the identity on the residual stream
            mlp.c_fc                 uniform(-s, s)
            attn.value_embed         uniform(-s, s), like c_v
            attn.ve_gate             zeros: gate = 2*sigmoid(0) = 1
            resid_lambdas            1.0
            x0_lambdas               0.1
        """
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        s = (3 / self.config.n_embd) ** 0.5  # uniform(-s, s) has std 1/sqrt(n_embd) and no outliers
        for block in self.blocks:
            for w in (block.attn.c_q.weight, block.attn.c_k.weight, block.attn.c_v.weight, block.mlp.c_fc.weight):
                nn.init.uniform_(w, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.value_embed is not None:
                nn.init.uniform_(block.attn.value_embed.weight, -s, s)
                nn.init.zeros_(block.attn.ve_gate.weight)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)

    def embeddings(self):
        """The lookup tables: the token embedding and every value embedding."""
        return [self.wte] + [b.attn.value_embed for b in self.blocks if b.attn.value_embed is not None]

    def forward(self, idx, targets=None, reduction="mean"):
        T = idx.size(1)
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = x0 = norm(self.wte(idx))
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            x = block(x, idx, cos, sin)
        logits = self.lm_head(norm(x))[..., :self.config.vocab_size].float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)
        return loss if reduction == "mean" else loss.view_as(targets)

    def param_counts(self):
        """Parameters by kind; 'scaling' (block matrices + lm_head) is what nanochat's horizon rule counts."""
        embeddings = sum(e.weight.numel() for e in self.embeddings())
        scalars = self.resid_lambdas.numel() + self.x0_lambdas.numel()
        total = sum(p.numel() for p in self.parameters())
        return {"total": total, "embeddings": embeddings, "scalars": scalars, "scaling": total - embeddings - scalars}

    def flops_per_token(self):
        """
        Training FLOPs per token (forward + backward). Each weight in a matmul costs 2 FLOPs
        forward (multiply, add) and 4 backward (grads of input and of weight): 6 per weight,
        for the block matrices and the lm_head. Lookups (embeddings) and scalars are free.
        Attention's two T x T matmuls (q@k and att@v) add 2 * 2 * T * head_dim * n_head
        per token forward, times 3 with backward: 12 * n_head * head_dim * T per layer.
        (The causal mask would halve it; like nanochat and PaLM we count the full square.)
        """
        c = self.config
        return 6 * self.param_counts()["scaling"] + 12 * c.n_head * c.head_dim * c.sequence_len * c.n_layer

    @torch.no_grad()
    def generate(self, tokens, max_tokens, temperature=0.8, seed=0):
        """Sample tokens one at a time (no KV cache: short samples, clarity over speed)."""
        device = self.wte.weight.device
        g = torch.Generator(device=device).manual_seed(seed)
        ids = torch.tensor([tokens], device=device)
        for _ in range(max_tokens):
            logits = self(ids[:, -self.config.sequence_len:])[0, -1]
            probs = F.softmax(logits / temperature, dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)[None]], dim=1)
        return ids[0, len(tokens):].tolist()


def empty_model(config, device, table_dtype=torch.float32):
    """
    A model on `device` whose weights are still to be set: by init_weights, a checkpoint or stacking.
    In bf16 runs its lookup tables are stored in bf16, as nanochat does.
    """
    model = GPT(config).to(device)
    for table in model.embeddings():
        table.to(table_dtype)  # only looked up, never multiplied: bf16 halves their memory
    return model


def autocast_for(device, dtype):
    """--dtype bf16: the matmuls of every forward (and so backward) run in bf16; fp32: nothing changes."""
    return torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


# -----------------------------------------------------------------------------
# Optimizer: Muon for the block matrices, AdamW for everything else

# Polar Express (Amsel et al. 2025): five odd polynomial steps, each (a, b, c) tuned so that all
# singular values in [~0.001, 1] land near 1 (an approximation of U V^T from G = U S V^T).
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def polar_express(G, dtype):
    """Orthogonalize a stack of matrices (n, rows, cols), computing in `dtype` (bf16 on GPUs, as nanochat does)."""
    X = G.to(dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)  # all singular values now <= 1
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT  # iterate on the wide orientation: the Gram matrix X X^T is then the small one
    for a, b, c in POLAR_EXPRESS_COEFFS:  # X <- a X + (b A + c A^2) X with A = X X^T
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A A, in one fused call
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    return X.mT if tall else X


def normalize_variance(update, variance, beta2):
    """
    NorMuon: Muon's output has uneven scales across neurons. Keep a running mean of the squared
    update per row (for tall/square matrices) or per column (wide), divide by its square root,
    then restore each matrix's Frobenius norm so only the relative scales change.
    """
    update = update.float()
    reduce_dim = -1 if update.size(-2) >= update.size(-1) else -2
    variance.lerp_(update.square().mean(dim=reduce_dim, keepdim=True), 1 - beta2)
    scaled = update * variance.clamp_min(1e-10).rsqrt()
    old_norm = update.norm(dim=(-2, -1), keepdim=True)
    return scaled * (old_norm / scaled.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))


class MuonAdamW(torch.optim.Optimizer):
    """
    One optimizer, two kinds of groups. A group with kind='adamw' is plain AdamW. A group with
    kind='muon' holds matrices of one shape and takes the Muon step: Nesterov momentum,
    Polar Express orthogonalization, NorMuon variance normalization, cautious weight decay.
    All state is per parameter, so it can follow its parameter through stacking.
    polar_dtype: what Polar Express computes in (bf16 or fp32, from --dtype).
    """

    def __init__(self, param_groups, polar_dtype):
        super().__init__(param_groups, defaults={})
        self.polar_dtype = polar_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._adamw(group)
            else:
                self._muon(group)

    def _adamw(self, group):
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            state = self.state[p]
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].lerp_(p.grad.square(), 1 - beta2)
            bias1, bias2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
            denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(group["eps"])
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / bias1)

    def _muon(self, group):
        params = group["params"]
        rows, cols = params[0].shape
        for p in params:
            if not self.state[p]:
                variance_shape = (rows, 1) if rows >= cols else (1, cols)
                self.state[p].update(momentum=torch.zeros_like(p), variance=p.new_zeros(variance_shape))
        grads = [p.grad for p in params]
        momenta = [self.state[p]["momentum"] for p in params]
        mu = group["momentum"]
        torch._foreach_lerp_(momenta, grads, 1 - mu)  # m <- mu m + (1-mu) g
        update = torch.stack(torch._foreach_lerp(grads, momenta, mu))  # Nesterov: look ahead along m
        update = polar_express(update, self.polar_dtype)
        variance = torch.stack([self.state[p]["variance"] for p in params])
        update = normalize_variance(update, variance, group["beta2"])
        torch._foreach_copy_([self.state[p]["variance"] for p in params], list(variance.unbind(0)))
        lr = group["lr"] * max(1.0, rows / cols) ** 0.5  # tall matrices get a larger step (same RMS per output)
        weights = torch.stack(params)
        decay = (update * weights >= 0) * weights  # cautious weight decay: only where the update agrees in sign with p
        weights.sub_(lr * update + lr * group["weight_decay"] * decay)
        torch._foreach_copy_(params, list(weights.unbind(0)))


def build_optimizer(model, args, batch_size, weight_decay):
    """
    The parameter groups and their learning rates. nanochat's rules: every LR scales with
    sqrt(B / 2^19) (bigger batches take bigger steps); embedding and head LRs also with
    1/sqrt(width/768), because their updates add up over the width. --lr-scale multiplies them all.
    """
    scale = args.lr_scale * (batch_size / REFERENCE_BATCH) ** 0.5
    width_scale = (model.config.n_embd / REFERENCE_WIDTH) ** -0.5
    tables = [e.weight for e in model.embeddings()]
    matrices = [p for b in model.blocks for p in b.parameters() if p.ndim == 2 and all(p is not t for t in tables)]
    adamw = dict(kind="adamw", betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=0.0)
    groups = [
        dict(adamw, params=[model.lm_head.weight], lr=args.unembedding_lr * width_scale * scale),
        dict(adamw, params=tables, lr=args.embedding_lr * width_scale * scale),
        dict(adamw, params=[model.resid_lambdas], lr=args.scalar_lr * 0.01 * scale),
        dict(adamw, params=[model.x0_lambdas], lr=args.scalar_lr * scale, betas=X0_LAMBDA_BETAS),
    ]
    for shape in sorted({p.shape for p in matrices}):  # Muon works on a stack of same-shape matrices at once
        groups.append(dict(kind="muon", params=[p for p in matrices if p.shape == shape], lr=args.matrix_lr * scale,
                           momentum=muon_momentum(MUON_MOMENTUM_WARMUP), beta2=MUON_BETA2, weight_decay=weight_decay))  # train_step sets each step's
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters()), "every parameter must be in exactly one group"
    optimizer = MuonAdamW(groups, PRECISIONS[args.dtype])
    for g in optimizer.param_groups:
        g["initial_lr"] = g["lr"]
    return optimizer


# -----------------------------------------------------------------------------
# Schedules: LR, Muon momentum and weight decay, as functions of the step

def lr_multiplier(position, length, warmup_ratio, warmdown_ratio, final_lr_frac):
    """
    Linear warmup, then 1.0, then a linear decay over the last warmdown_ratio of the length, down to
    final_lr_frac. `position` and `length` count steps of the current phase (fractional ones for the
    global schedule). Where the two ramps overlap (e.g. warmup with warmdown 1.0), the lower one wins.
    """
    warmup, warmdown = round(warmup_ratio * length), round(warmdown_ratio * length)
    rising = (position + 1) / warmup if position < warmup else 1.0
    if position <= length - warmdown:
        return rising
    progress = (length - position) / warmdown  # 1 -> 0 over the warmdown (a ratio > 1 starts part-way down)
    return min(rising, progress + (1 - progress) * final_lr_frac)


def muon_momentum(step):
    """Muon's momentum warms up linearly over its first steps."""
    return MUON_MOMENTUM_START + MUON_MOMENTUM_RISE * min(step / MUON_MOMENTUM_WARMUP, 1.0)


def weight_decay_at(done, total, weight_decay):
    """Muon's weight decay falls linearly to zero: `done` of `total` (steps, or FLOPs for the global schedule)."""
    return weight_decay * (1 - done / total)


def flops_at(phase, step, state):
    """FLOPs the run has spent by the end of `step` of `phase`, the phases before it included."""
    return state.flops_before + phase.step_flops * step


def schedule_at(phase, step, args, state):
    """
    (LR multiplier, Muon momentum, weight decay) for a step. With --schedule phases each phase
    runs its own schedules over its own steps (the write-up and the paper restart at growth).
    With --schedule global one schedule runs over the whole run, measured in FLOPs, so the LR
    is continuous across the growth and decays only at the end.
    """
    if args.schedule == "phases":
        return (lr_multiplier(step, phase.steps, args.warmup_ratio, phase.warmdown_ratio, args.final_lr_frac),
                muon_momentum(step), weight_decay_at(step, phase.steps, phase.weight_decay))
    done = flops_at(phase, step, state)
    # the whole run's position and length, in steps of this phase (fractional), so that warmup's "+1" is one step
    return (lr_multiplier(done / phase.step_flops, state.total_flops / phase.step_flops, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac),
            muon_momentum(state.steps_before + step), weight_decay_at(done, state.total_flops, phase.weight_decay))


# -----------------------------------------------------------------------------
# Stacking: grow a shallow model into a deep one
#
# G_stack, the paper's operator, is this simple: deep layer j starts as a copy of shallow layer
# j % n_layer, and everything outside the blocks (embeddings, head) is carried over as it is:
#
#     deep.blocks[j].load_state_dict(shallow.blocks[j % n_layer].state_dict())   for j < g * n_layer
#
# The code below is that, written once for weights and optimizer state alike (a layer map and a
# renaming of tensors), plus the per-layer scalars and three other operators to compare with.

def growth_layer_map(n_layer, growth_factor, operator="stack"):
    """
    Which shallow layer each deep layer starts from. `interleave` repeats each layer in place,
    [0,0,1,1,...]; the others keep G_stack's block order [0..L-1] * g, where the first pass
    holds the original layers and the later passes their copies.
    """
    if operator == "interleave":
        return [i for i in range(n_layer) for _ in range(growth_factor)]
    return [i for _ in range(growth_factor) for i in range(n_layer)]


PER_LAYER_VECTORS = ("resid_lambdas", "x0_lambdas")


def grow_tensors(named, layer_map):
    """
    Map a shallow model's named values to the deep model's: deep layer j takes everything of
    shallow layer layer_map[j], per-layer vectors are indexed by the map, everything else
    (embeddings, head) is carried over. Values are tensors (a state dict) or dicts of them
    (each parameter's optimizer state), so weights and optimizer state move by one rule.
    """
    def take(value, layers=None):
        if isinstance(value, dict):
            return {k: take(v, layers) for k, v in value.items()}
        if not torch.is_tensor(value):
            return value  # e.g. AdamW's step count
        return value[layers].clone() if layers is not None else value.clone()

    deep = {name: take(v, layer_map if name in PER_LAYER_VECTORS else None)
            for name, v in named.items() if not name.startswith("blocks.")}
    for j, source in enumerate(layer_map):
        prefix = f"blocks.{source}."
        deep.update({f"blocks.{j}.{name[len(prefix):]}": take(v) for name, v in named.items() if name.startswith(prefix)})
    return deep


def stacked_config(shallow_config, layer_map):
    """The deep model's config. A copy of a layer with a value embedding gets one too, wherever it lands."""
    ve_layers = tuple(j for j, source in enumerate(layer_map) if source in shallow_config.ve_layers)
    return GPTConfig(**{**asdict(shallow_config), "n_layer": len(layer_map), "ve_layers": ve_layers})


def stack_model(shallow, growth_factor, operator="stack"):
    """
    The deep model, grown from the shallow one by one of four operators:
      stack       G_stack: copies in block order, each computing exactly what its source did
      interleave  the same copies, each next to its source
      identity    G_zero: copies whose output projections are zero and whose lambdas pass the
                  residual stream through (resid 1, x0 0): the deep model's logits equal the shallow one's
      random      G_random without a mask: the later passes are new layers, initialized as a deep model's
    nanochat's even/odd rule for value-embedding layers would move them when the depth changes, so
    the deep config takes its layout from the sources instead.
    """
    n_layer = shallow.config.n_layer
    layer_map = growth_layer_map(n_layer, growth_factor, operator)
    deep = empty_model(stacked_config(shallow.config, layer_map), shallow.wte.weight.device.type, shallow.wte.weight.dtype)
    grown = grow_tensors(shallow.state_dict(), layer_map)
    copies = range(n_layer, len(layer_map))
    if operator == "identity":
        for j in copies:
            grown[f"blocks.{j}.attn.c_proj.weight"].zero_()
            grown[f"blocks.{j}.mlp.c_proj.weight"].zero_()
            grown["resid_lambdas"][j], grown["x0_lambdas"][j] = 1.0, 0.0  # so the layer maps x to x
    elif operator == "random":
        deep.init_weights()
        fresh = deep.state_dict()
        for j in copies:
            grown.update({k: v for k, v in fresh.items() if k.startswith(f"blocks.{j}.")})
            for name in PER_LAYER_VECTORS:
                grown[name][j] = fresh[name][j]
    deep.load_state_dict(grown)
    return deep


def carry_optimizer_state(shallow, shallow_optimizer, deep, deep_optimizer, growth_factor, operator):
    """--grow-optim carry: every deep parameter starts with its source's optimizer state (momenta, variances, steps)."""
    layer_map = growth_layer_map(shallow.config.n_layer, growth_factor, operator)
    state = {name: shallow_optimizer.state[p] for name, p in shallow.named_parameters() if shallow_optimizer.state[p]}
    grown = grow_tensors(state, layer_map)
    for name, p in deep.named_parameters():
        if name in grown:
            deep_optimizer.state[p] = grown[name]


# -----------------------------------------------------------------------------
# Planning the run: each phase's model, batch size, steps and FLOPs

@dataclass
class Phase:
    name: str  # "shallow", "deep" (after stacking) or "baseline"
    config: GPTConfig
    steps: int
    batch_size: int  # tokens per optimizer step
    flops_per_token: int
    weight_decay: float
    warmdown_ratio: float

    @property
    def step_flops(self):
        return self.flops_per_token * self.batch_size

    @property
    def flops(self):
        return self.step_flops * self.steps


def measure(config):
    """(scaling params, FLOPs per token) of a model, counted on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        model = GPT(config)
    return model.param_counts()["scaling"], model.flops_per_token()


def batch_and_weight_decay(scaling_params, ref_params, args):
    """
    nanochat's transfer rules from its d12 reference (B = 2^19 tokens there), with D = ratio * N tokens:
      batch size    B  = 2^19 * (D / D_ref)^0.383, rounded to a power of 2 (Power Lines)
      weight decay  wd = wd_ref * sqrt(B / 2^19) * D_ref / D (keeps B / (lr * wd * D) constant)
    nanochat takes D_ref at the same ratio as D, so the ratio cancels: only the size relative to d12 counts.
    """
    batch = args.total_batch_size or 2 ** round(math.log2(REFERENCE_BATCH * (scaling_params / ref_params) ** BATCH_EXPONENT))
    return batch, args.weight_decay * (batch / REFERENCE_BATCH) ** 0.5 * ref_params / scaling_params


def plan_phases(args, vocab_size, shallow_flops=None, world=1):
    """
    The phases of this run. The FLOPs budget is the baseline's: the final-depth model trained at
    --ratio (or --target-flops). A stacked run spends part of it on the shallow phase and, unless
    told otherwise, gives the deep phase exactly what is left, so both runs cost the same.
    shallow_flops: FLOPs already spent by a shallow checkpoint (--init-from), which then is not planned.
    """
    ref_params, _ = measure(model_config(REFERENCE_DEPTH, REFERENCE_DEPTH, args, vocab_size))
    final_config = model_config(args.final_depth, args.final_depth, args, vocab_size)  # the baseline's
    baseline_params, baseline_flops_per_token = measure(final_config)
    batch, wd = batch_and_weight_decay(baseline_params, ref_params, args)
    budget = args.target_flops or baseline_flops_per_token * batch * (int(args.ratio * baseline_params) // batch)
    phases = []
    if args.stacked:
        shallow_config = model_config(args.depth, args.final_depth, args, vocab_size)
        final_config = stacked_config(shallow_config, growth_layer_map(args.depth, args.stack_to // args.depth, args.grow))
        if shallow_flops is None:
            params, flops_per_token = measure(shallow_config)
            shallow_batch, shallow_wd = batch_and_weight_decay(params, ref_params, args)
            if args.shallow_steps:
                steps = args.shallow_steps
            elif args.grow_at is not None:
                steps = round(args.grow_at * budget / (flops_per_token * shallow_batch))  # the nearest whole step to that share
            else:
                steps = int(args.shallow_ratio * params) // shallow_batch
            if steps == 0:
                raise UsageError(f"the shallow phase gets 0 steps of {shallow_batch} tokens: raise --shallow-ratio (or --grow-at)")
            phases.append(Phase("shallow", shallow_config, steps, shallow_batch, flops_per_token, shallow_wd, args.shallow_warmdown_ratio))
            shallow_flops = phases[0].flops
    # The deep model has the baseline's shape (with an odd shallow depth, more value-embedding tables and
    # their small gates), so it takes the baseline's batch and weight decay and fills the rest of its budget.
    _, flops_per_token = measure(final_config)
    if args.deep_steps:
        steps = args.deep_steps
    elif args.deep_ratio:
        steps = int(args.deep_ratio * baseline_params) // batch
        if steps == 0:
            raise UsageError(f"--deep-ratio {args.deep_ratio} gives 0 steps of {batch} tokens: raise it")
    else:
        steps = round((budget - (shallow_flops or 0)) / (flops_per_token * batch))  # the nearest whole step to an equal budget
        if steps <= 0 and shallow_flops:
            raise UsageError(f"the shallow phase uses the whole FLOPs budget ({budget:.3g}): lower --shallow-ratio or raise --ratio")
        if steps <= 0:
            raise UsageError(f"the FLOPs budget ({budget:.3g}) is less than one step of {batch} tokens: raise --ratio or --target-flops")
    phases.append(Phase("deep" if args.stacked else "baseline", final_config, steps, batch, flops_per_token, wd, args.warmdown_ratio))
    machinery.check_micro_batches(phases, args, world)  # each step must split into whole micro-batches
    return phases


# -----------------------------------------------------------------------------
# Evaluation: bits per byte on fixed val tokens (the val windows come from prepare_data.val_batches)

@torch.no_grad()
def evaluate_bpb(model, val_batches, token_bytes, autocast):
    """
    Bits per byte: total loss in nats over the val tokens, divided by ln 2 and by the number of
    UTF-8 bytes those tokens stand for, so models with different tokenizers compare fairly.
    Special tokens have 0 bytes and are left out of both sums.
    """
    nats, nbytes = 0.0, 0
    for x, y in val_batches:
        with autocast:
            loss = model(x, y, reduction="none")
        counted_bytes = token_bytes[y]
        nats += (loss * (counted_bytes > 0)).sum()
        nbytes += counted_bytes.sum()
    if dist.is_initialized():  # each rank evaluated its share of the batches
        nats, nbytes = torch.as_tensor(nats, device=token_bytes.device), torch.as_tensor(nbytes, device=token_bytes.device)
        dist.all_reduce(nats)
        dist.all_reduce(nbytes)
    return float(nats) / (math.log(2) * float(nbytes))


# -----------------------------------------------------------------------------
# The training loop: train shallow, stack, train deep

@dataclass
class RunState:
    """What the loop carries from step to step and across the growth (the flags are in args)."""
    loader: TokenWindows  # the train windows, and where the run is in them
    log: machinery.RunLog  # prints a line and appends its record to metrics.jsonl
    total_flops: int  # the whole run's budget: the length of the global LR schedule
    flops_before: int = 0  # FLOPs spent before the current phase (the shallow phase, or the --init-from model)
    steps_before: int = 0  # optimizer steps taken before the current phase
    smooth_loss: torch.Tensor = None  # EMA of the train loss, kept on the device: read on log lines only
    val_bpb: dict = field(default_factory=dict)  # each finished phase's final val bpb
    rank: int = 0
    world: int = 1  # processes under torchrun: each takes its share of every batch
    peak_flops: float = None  # the GPU's peak, for MFU (None on CPUs and unknown GPUs)
    autocast: object = nullcontext()  # what every forward runs under (autocast_for: bf16 or nothing)


def train_step(step_model, model, optimizer, phase, step, args, state):
    """
    One optimizer step: gradients averaged over micro-batches and ranks, then the update at this
    step's schedule. `step_model` (the compiled model, or the model itself) runs forward and backward;
    `model` holds the parameters the gradients land in. Returns the step's mean loss (a tensor: no
    host sync) and the LR multiplier.
    """
    accum = phase.batch_size // (args.device_batch_size * args.seq_len * state.world)  # micro-batches per step and rank
    loss_sum = torch.zeros((), device=args.device)
    for _ in range(accum):
        x, y = state.loader.next_batch(args.device_batch_size)
        with state.autocast:
            loss = step_model(x, y)
        (loss / accum).backward()  # gradients add up over micro-batches: divide to get the mean
        loss_sum += loss.detach()
    machinery.average_gradients(model, state.world)
    lrm, momentum, weight_decay = schedule_at(phase, step, args, state)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"], group["weight_decay"] = momentum, weight_decay
    optimizer.step()
    model.zero_grad(set_to_none=True)
    if state.world > 1:
        dist.all_reduce(loss_sum)
        loss_sum /= state.world
    return loss_sum / accum, lrm


def log_train_line(phase, steps_done, loss, smoothed, lrm, dt, elapsed, eta, state):
    """
    The log line and metrics record after `steps_done` steps, from the last step's loss and the loss
    EMA (floats; the EMA is debiased here). A loss that is not finite stops the run instead.
    """
    smoothed /= 1 - LOSS_EMA_DECAY ** steps_done  # debias: the EMA started from zero
    if not math.isfinite(loss):
        raise TrainingDiverged(f"{phase.name} phase: loss is {loss} at step {steps_done}; the last checkpoint is left as it was")
    tok_per_s = phase.batch_size / dt
    # model FLOPs utilization: the FLOP/s our FLOPs count says we do, over the peak of all GPUs together
    mfu = 100 * phase.flops_per_token * tok_per_s / (state.peak_flops * state.world) if state.peak_flops else None
    state.log(f"{phase.name} step {steps_done}/{phase.steps} | loss {smoothed:.4f} | lrm {lrm:.3f} | dt {dt * 1000:.0f}ms | "
              f"tok/s {tok_per_s:,.0f}" + (f" | mfu {mfu:.1f}%" if mfu is not None else "") +
              f" | elapsed {elapsed / 60:.1f}m | eta {eta / 60:.1f}m",
              kind="train", phase=phase.name, step=steps_done, loss=smoothed, raw_loss=loss, lrm=lrm, dt=dt,
              tok_per_s=tok_per_s, mfu=mfu, flops=flops_at(phase, steps_done, state), elapsed=elapsed)


def train_phase(phase, model, optimizer, args, state, evaluate, start_step=0):
    """Train `model` from start_step to phase.steps optimizer steps, evaluating on the way and at the end."""
    step_model = torch.compile(model, dynamic=False) if args.compile else model
    phase_start = last_log_time = time.time()
    last_log_step = start_step
    for step in range(start_step, phase.steps + 1):
        if step == phase.steps or (args.eval_every and step % args.eval_every == 0):
            model.eval()
            bpb = evaluate(step_model)
            model.train()
            state.log(f"{phase.name} step {step}/{phase.steps} | val bpb {bpb:.4f}", kind="eval", phase=phase.name, step=step,
                      val_bpb=bpb, flops=flops_at(phase, step, state))
            last_log_time, last_log_step = time.time(), step  # keep eval time out of the step timings
        if step == phase.steps:
            break
        loss, lrm = train_step(step_model, model, optimizer, phase, step, args, state)
        state.smooth_loss.lerp_(loss, 1 - LOSS_EMA_DECAY)  # smooth = decay * smooth + (1 - decay) * loss
        if not (step + 1) % args.log_every or step + 1 == phase.steps:  # the host syncs only on logged steps
            loss, smoothed = torch.stack([loss, state.smooth_loss]).tolist()  # waits for the GPU: time after this
            now = time.time()
            dt = (now - last_log_time) / (step + 1 - last_log_step)  # mean over the steps since the last log line
            elapsed = now - phase_start
            eta = elapsed / (step + 1 - start_step) * (phase.steps - step - 1)
            log_train_line(phase, step + 1, loss, smoothed, lrm, dt, elapsed, eta, state)
            last_log_time, last_log_step = now, step + 1
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < phase.steps:
            machinery.save_checkpoint(os.path.join(args.out_dir, "checkpoint.pt"), model, optimizer, args, phase, step + 1,
                                      flops_at(phase, step + 1, state), state)
    machinery.check_replicas_agree(model, state.world)
    state.val_bpb[phase.name] = bpb


def grow_deep_model(shallow, shallow_optimizer, deep_phase, args, state):
    """The deep model and its optimizer, grown from the trained shallow model (--grow, --grow-optim)."""
    growth_factor = args.stack_to // args.depth
    deep = stack_model(shallow, growth_factor, args.grow)
    machinery.broadcast_weights(deep, state.world)
    optimizer = build_optimizer(deep, args, deep_phase.batch_size, deep_phase.weight_decay)
    if args.grow_optim == "carry":
        carry_optimizer_state(shallow, shallow_optimizer, deep, optimizer, growth_factor, args.grow)
    state.log(f"grew {args.depth} -> {args.stack_to} layers by {args.grow}, optimizer state {args.grow_optim}")
    return deep, optimizer


def train(phases, resume, init, args, state, evaluate, sample):
    """
    The two-phase loop: train the shallow model, stack it into the deep one, train that. A baseline
    has one phase; a resumed run starts inside its phase and step, an --init-from run at the growth. The model
    and optimizer are made here so that nothing else holds them: growing frees the shallow ones' memory.
    """
    model, optimizer, first, start_step = starting_point(phases, resume, init, args, state)
    machinery.broadcast_weights(model, state.world)
    for phase in phases[first:]:
        if model.config.n_layer != phase.config.n_layer:
            # The shallow phase is over: grow. The deep model's first val bpb can jump (in the README's quick
            # start, above an untrained model's): the second pass of copies reads a residual stream that the
            # first pass has already written to, which these layers never saw in training. Within about a
            # hundred steps it is below where the shallow model stopped. (--grow identity starts the copies
            # as pass-throughs: no jump, but also no head start from them.)
            model, optimizer = grow_deep_model(model, optimizer, phase, args, state)
        if start_step < phase.steps:
            train_phase(phase, model, optimizer, args, state, evaluate, start_step)
            sample(model, phase)
            name = "shallow.pt" if phase.name == "shallow" else "final.pt"
            machinery.save_checkpoint(os.path.join(args.out_dir, name), model, optimizer, args, phase, phase.steps,
                                      flops_at(phase, phase.steps, state), state)
        state.flops_before += phase.flops
        state.steps_before += phase.steps
        state.smooth_loss.zero_()
        start_step = 0


def run(args):
    """Set up, then train. Everything that can fail on bad input is checked before the run folder is touched."""
    resume = None
    if args.resume:
        found = machinery.resume_point(args, get_parser())
        if found is None:
            print(f"{args.out_dir} already finished: nothing to resume")
            return
        resume, args = found
    machinery.check_run_dir(args)
    rank, world = machinery.setup_distributed(args.device)
    torch.manual_seed(args.seed)
    meta, train_shards, val_shards = load_data(args.data)
    init = machinery.load_checkpoint(args.init_from) if args.init_from else None
    if init:
        machinery.check_init_from(init, args, model_config(args.depth, args.final_depth, args, meta["vocab_size"]))
    baseline = reports.read_metrics(args.baseline) if args.baseline else None
    phases = plan_phases(args, meta["vocab_size"], shallow_flops=init["flops"] if init else None, world=world)
    loader = TokenWindows(train_shards, args.seq_len, args.seed, args.device, rank, world)
    val = val_batches(val_shards, args.eval_tokens, args.seq_len, args.device_batch_size, args.device)
    tokenizer, token_bytes = prepare_data.load_tokenizer(args.data), torch.tensor(prepare_data.load_token_bytes(args.data), device=args.device)
    flops_before, metrics_lines = init["flops"] if init else 0, resume["metrics_lines"] if resume else None  # the records a resumed run keeps
    machinery.on_rank0(lambda: machinery.prepare_run_dir(args, metrics_lines), rank, world)  # before anyone logs to it
    state = RunState(loader=loader, log=machinery.RunLog(args.out_dir, enabled=rank == 0, lines=metrics_lines or 0),
                     total_flops=flops_before + sum(p.flops for p in phases), flops_before=flops_before, steps_before=init["step"] if init else 0,
                     smooth_loss=torch.zeros((), device=args.device), rank=rank, world=world, peak_flops=reports.peak_flops(args.device),
                     autocast=autocast_for(args.device, args.dtype))
    state.log(f"config: {json.dumps(vars(args))}")
    if args.device == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls outside autocast
    if not resume:
        log_plan(phases, args, meta, sum(x.numel() for x, _ in val), state)
    start = time.time()
    prompt = [int(t) for t in val_shards[0][:8]]  # the sample's prompt: the first tokens of the val split

    def sample(model, phase):
        if args.sample_tokens and rank == 0:
            with state.autocast:
                text = tokenizer.decode(prompt) + "|" + tokenizer.decode(model.generate(prompt, args.sample_tokens))
            state.log(f"{phase.name} sample: {text!r}", kind="sample", phase=phase.name, text=text)

    train(phases, resume, init, args, state, lambda m: evaluate_bpb(m, val[rank::world], token_bytes, state.autocast), sample)
    wall = time.time() - start
    memory = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    state.log(f"done: val bpb {' | '.join(f'{k} {v:.4f}' for k, v in state.val_bpb.items())} | {state.flops_before:.3e} FLOPs | {wall / 60:.1f} min"
              + (f" | peak memory {memory:.1f} GiB" if memory else ""), kind="summary", val_bpb=state.val_bpb, flops=state.flops_before,
              phase_flops={p.name: p.flops for p in phases}, wall_time=wall, peak_memory_gib=memory)
    if baseline:
        state.log(reports.format_report([reports.acceleration(baseline, reports.read_metrics(state.log.path), args.out_dir)]))
    if world > 1:
        dist.barrier()  # leave together, then skip the interpreter's teardown: with gloo it can abort at exit
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)


# -----------------------------------------------------------------------------
# Command line

def get_parser():
    p = prepare_data.OneLineParser(description="Train a GPT, optionally grow it by layer stacking, and train the deep model.",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model_flags = p.add_argument_group("model")
    model_flags.add_argument("--depth", type=int, default=12, help="number of layers of the model trained first (the shallow model when --stack-to is set)")
    model_flags.add_argument("--stack-to", type=int, default=None, help="final depth after stacking; a multiple of --depth (omit for a plain baseline run)")
    model_flags.add_argument("--aspect-ratio", type=int, default=64, help="model width = final depth * aspect ratio, rounded up to a multiple of --head-dim")
    model_flags.add_argument("--head-dim", type=int, default=128, help="attention head dimension")
    model_flags.add_argument("--seq-len", type=int, default=2048, help="context length in tokens")
    horizon_flags = p.add_argument_group("horizon")
    horizon_flags.add_argument("--ratio", type=finite_float, default=10.5, help="data:param ratio of the baseline: the final-depth model trained at this ratio sets the FLOPs budget of the whole run")
    horizon_flags.add_argument("--target-flops", type=finite_float, default=None, help="total FLOPs budget of the run (overrides --ratio)")
    horizon_flags.add_argument("--shallow-ratio", type=finite_float, default=3.25, help="data:param ratio of the shallow phase")
    horizon_flags.add_argument("--grow-at", type=finite_float, default=None, help="grow after this share of the FLOPs budget, between 0 and 1 (overrides --shallow-ratio)")
    horizon_flags.add_argument("--shallow-steps", type=int, default=None, help="explicit number of shallow-phase steps (overrides --shallow-ratio)")
    horizon_flags.add_argument("--deep-ratio", type=finite_float, default=None, help="data:param ratio of the deep phase (default: whatever fills the FLOPs budget)")
    horizon_flags.add_argument("--deep-steps", type=int, default=None, help="explicit number of steps of the deep (or only) phase")
    optim_flags = p.add_argument_group("optimization")
    optim_flags.add_argument("--total-batch-size", type=int, default=None, help=f"tokens per optimizer step (default: nanochat's rule, 2^19 at d12, scaled by model size^{BATCH_EXPONENT})")
    optim_flags.add_argument("--device-batch-size", type=int, default=32, help="sequences per forward pass; gradients are accumulated up to the total batch")
    optim_flags.add_argument("--lr-scale", type=finite_float, default=1.0, help="multiplies every learning rate below (a one-knob LR sweep)")
    optim_flags.add_argument("--matrix-lr", type=finite_float, default=0.02, help="Muon learning rate for the block matrices")
    optim_flags.add_argument("--embedding-lr", type=finite_float, default=0.3, help="AdamW learning rate for token and value embeddings")
    optim_flags.add_argument("--unembedding-lr", type=finite_float, default=0.004, help="AdamW learning rate for the lm_head")
    optim_flags.add_argument("--scalar-lr", type=finite_float, default=0.5, help="AdamW learning rate for x0_lambdas (resid_lambdas get 1%% of it)")
    optim_flags.add_argument("--weight-decay", type=finite_float, default=0.2, help="Muon cautious weight decay at d12 (scaled with batch and horizon)")
    optim_flags.add_argument("--warmup-ratio", type=finite_float, default=0.0, help="fraction of each phase (of the whole run with --schedule global) spent in linear LR warmup")
    optim_flags.add_argument("--warmdown-ratio", type=finite_float, default=None, help="fraction of the deep (or only) phase spent decaying the LR (default: 1.0 after stacking, 0.5 for a baseline or a global schedule)")
    optim_flags.add_argument("--shallow-warmdown-ratio", type=finite_float, default=0.0, help="warmdown ratio of the shallow phase")
    optim_flags.add_argument("--final-lr-frac", type=finite_float, default=0.0, help="LR multiplier at the end of warmdown")
    evaluation_flags = p.add_argument_group("evaluation and logging")
    evaluation_flags.add_argument("--eval-every", type=int, default=250, help="evaluate val bpb every N steps (and at the end of each phase); 0 = only at the end")
    evaluation_flags.add_argument("--eval-tokens", type=int, default=40 * REFERENCE_BATCH, help="number of val tokens per evaluation (the same ones every time; nanochat's size)")
    evaluation_flags.add_argument("--sample-tokens", type=int, default=48, help="tokens to sample at the end of each phase (0 = no sample)")
    evaluation_flags.add_argument("--log-every", type=int, default=1, help="print and record the train loss every N steps")
    growth_flags = p.add_argument_group("growth (see the README for what each choice tests)")
    growth_flags.add_argument("--grow", choices=GROW_OPERATORS, default="stack", help="how the shallow layers become the deep ones")
    growth_flags.add_argument("--grow-optim", choices=("reset", "carry"), default="reset", help="start the deep phase's optimizer fresh, or carry each parameter's state to its copies")
    growth_flags.add_argument("--schedule", choices=("phases", "global"), default="phases", help="each phase its own LR schedule, or one schedule over the whole run's FLOPs")
    growth_flags.add_argument("--baseline", default=None, help="metrics.jsonl (or run folder) of a baseline run: end with the acceleration report against it")
    growth_flags.add_argument("--compare", nargs="+", metavar="METRICS", default=None, help="print the acceleration report of finished runs against the first one (a baseline) and exit")
    run_flags = p.add_argument_group("run")
    run_flags.add_argument("--data", default=prepare_data.DEFAULT_DATA_DIR, help="dataset folder written by prepare_data.py")
    run_flags.add_argument("--out-dir", default=None, help="run folder for config, metrics and checkpoints (default: runs/<d6s12 or d12>)")
    run_flags.add_argument("--overwrite", action="store_true", help="start over in a run folder that holds another run, finished or not (its checkpoints are deleted)")
    run_flags.add_argument("--save-every", type=int, default=0, help="also write checkpoint.pt every N steps of either phase, for --resume (0 = never)")
    run_flags.add_argument("--resume", action="store_true", help="continue the interrupted run in --out-dir from its latest checkpoint, with the flags it was started with (--device, --compile and --dtype: this command's)")
    run_flags.add_argument("--init-from", default=None, help="shallow checkpoint to start from: skips phase 1 (one shallow model can serve many deep runs)")
    run_flags.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    run_flags.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model (default: on for CUDA, off for CPU)")
    run_flags.add_argument("--dtype", choices=PRECISIONS, default=None, help="bf16: autocast matmuls, bf16 lookup tables and Polar Express (the GPU path); "
                           "fp32: all but the rotary tables (bf16, as nanochat's) in fp32 (default: bf16 on CUDA, fp32 on CPU, where bf16 is often emulated and slow)")
    run_flags.add_argument("--seed", type=int, default=0, help="seed for the initialization and the data order")
    return p


def resolve_args(argv=None):
    """Parse the flags, check them (machinery.check_flags), and fill in the defaults that depend on other flags."""
    args = get_parser().parse_args(argv)
    machinery.check_flags(args)
    args.stacked = args.stack_to is not None
    args.final_depth = args.stack_to if args.stacked else args.depth
    if model_width(args.final_depth, args) < VE_GATE_CHANNELS:
        raise UsageError(f"the model is narrower than the {VE_GATE_CHANNELS} channels the value-embedding gate reads: raise --aspect-ratio")
    if args.warmdown_ratio is None:  # the write-up's best deep-phase value after stacking, else nanochat's default
        args.warmdown_ratio = 1.0 if args.stacked and args.schedule == "phases" else 0.5
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.compile is None:
        args.compile = args.device == "cuda"
    if args.dtype is None:  # GPUs are fast in bf16; many CPUs have no native bf16 and emulate it, tens of times slower than fp32
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.out_dir is None:
        args.out_dir = os.path.join("runs", f"d{args.depth}s{args.stack_to}" if args.stacked else f"d{args.depth}")
    return args


def main(argv=None):
    try:
        args = resolve_args(argv)
        if args.compare:
            if len(args.compare) < 2:
                raise UsageError("--compare needs a baseline run and at least one run to compare with it")
            print(reports.compare_runs(args.compare))
        else:
            run(args)
    except (UsageError, DataError, TrainingDiverged) as e:  # one line, no traceback: exit 2 for bad input, 1 for a diverged run
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1 if isinstance(e, TrainingDiverged) else 2)


# -----------------------------------------------------------------------------
# Machinery: checkpoints, the plan's printout, devices (machinery.py has the rest; skip on a first reading)

def restore(ckpt, args, state, same_data=True):
    """Model and optimizer from a checkpoint (its tensors taken out: no second copy), its RNG and, same data and seed, data position."""
    model = empty_model(GPTConfig.from_checkpoint(ckpt), args.device, PRECISIONS[args.dtype])
    model.load_state_dict(ckpt.pop("model"))
    optimizer = build_optimizer(model, args, ckpt["batch_size"], ckpt["weight_decay"])
    optimizer.load_state_dict(ckpt.pop("optimizer"))
    if same_data:
        state.loader.load_state_dict(ckpt["loader"])
    torch.set_rng_state(ckpt["rng"])
    if args.device == "cuda" and ckpt["cuda_rng"].numel():  # empty when it was saved on a CPU
        torch.cuda.set_rng_state(ckpt["cuda_rng"])
    return model, optimizer


def starting_point(phases, resume, init, args, state):
    """
    The model and optimizer to train, and the phase and step to start at: an interrupted run (--resume, which also
    puts back the loop's state), a trained shallow model (--init-from), or a new model.
    """
    if resume:
        model, optimizer = restore(resume, args, state)
        state.flops_before, state.steps_before, state.val_bpb = resume["phase_flops_before"], resume["phase_steps_before"], resume["val_bpb"]
        state.smooth_loss.fill_(resume["smooth_loss"])
        state.log(f"resuming {args.out_dir}: {resume['phase']} step {resume['step']}, {resume['flops']:.3e} FLOPs spent")
        return model, optimizer, [p.name for p in phases].index(resume["phase"]), resume["step"]
    if init:
        same_data = os.path.realpath(init["args"]["data"]) == os.path.realpath(args.data) and init["args"]["seed"] == args.seed
        model, optimizer = restore(init, args, state, same_data)
        state.log(f"shallow model from {args.init_from} ({init['flops']:.3e} FLOPs spent); the deep phase reads "
                   + ("on from where it stopped" if same_data else "its data from the start (other data or seed)"))
        return model, optimizer, 0, 0
    model = empty_model(phases[0].config, args.device, PRECISIONS[args.dtype])
    model.init_weights()
    return model, build_optimizer(model, args, phases[0].batch_size, phases[0].weight_decay), 0, 0


def log_plan(phases, args, meta, val_tokens, state):
    """Before training: the plan and its expected wall time, in words (reports.py) and as a record."""
    with torch.random.fork_rng(devices=[]):  # a scratch model: its random init leaves the run's own unchanged
        scratch = empty_model(phases[0].config, args.device, PRECISIONS[args.dtype])
    flops_per_second = reports.measure_flops_per_second(scratch, args, state.autocast) * state.world
    seconds = reports.estimate_seconds(phases, args, val_tokens, flops_per_second)
    with torch.device("meta"):
        deep_params = GPT(phases[-1].config).param_counts()["total"]
    state.log(reports.describe_plan(phases, args, meta, deep_params, state.flops_before) + "\n" + reports.describe_cost(seconds, flops_per_second, args),
              kind="plan", phases=[{**asdict(p), "flops": p.flops} for p in phases], estimated_seconds=seconds)


if __name__ == "__main__":
    main()
