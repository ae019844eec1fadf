"""
stack_gpt.py: train a small GPT, make it deeper by stacking its layers, keep training.

Model growth by depthwise stacking (G_stack, Du et al. 2024): train a shallow model, repeat its
whole block of layers g times (L1..L4 -> L1..L4,L1..L4), train the deep model. The question is
whether the shallow phase buys the deep model a head start worth more than the compute it cost.
The file reads in the order the data flows, the lesson first and the plumbing last:

    constants -> model -> optimizer -> schedules -> stacking -> planning (and the plan's cost) -> evaluation
      -> data -> the two-phase loop (train shallow, stack, train deep) -> reports -> flags -> plumbing

The model and optimizer follow nanochat's base model (Feb 2026): rotary, QK-norm, ReLU^2, value
embeddings, per-layer lambdas, Muon + AdamW. The file runs alone (torch, numpy and tiktoken) on a
data folder written by prepare_data.py. Examples:

    python stack_gpt.py --depth 6 --stack-to 12   # a d6 grown into a d12 ("d6s12" in the write-up)
    python stack_gpt.py --depth 12                # the plain d12 baseline on the same FLOPs
"""

import argparse
import base64
import ctypes
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Constants: nanochat's, each named once

REFERENCE_DEPTH, REFERENCE_BATCH, REFERENCE_WIDTH = 12, 2**19, 768  # d12, its tokens per step, its width
BATCH_EXPONENT = 0.383  # batch size grows as (training tokens)^0.383 (Power Lines)
VE_GATE_CHANNELS = 32  # the value-embedding gate reads this many channels of the block input
SOFTCAP = 15  # logits are squashed smoothly into [-15, 15]
ADAMW_BETAS, X0_LAMBDA_BETAS, ADAMW_EPS = (0.8, 0.95), (0.96, 0.95), 1e-10
MUON_MOMENTUM_START, MUON_MOMENTUM_RISE, MUON_MOMENTUM_WARMUP = 0.85, 0.10, 300  # 0.85 -> 0.95 in 300 steps
MUON_BETA2 = 0.95  # NorMuon's running mean of the squared update
LOSS_EMA_DECAY = 0.9  # the logged train loss is smoothed over roughly the last 10 steps
PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}  # --dtype
GROW_OPERATORS = ("stack", "interleave", "identity", "random")  # --grow
PEAK_BF16_FLOPS = [  # (substrings of the device name, dense bf16 FLOP/s); the first match wins
    (("h100", "pcie"), 756e12), (("h100", "nvl"), 835e12), (("h100",), 989e12), (("h200",), 989e12),
    (("b200",), 2.25e15), (("a100",), 312e12), (("l40s",), 362e12), (("4090",), 165.2e12)]


class UsageError(Exception):
    """A mistake in the flags or files the user gave us: reported in one line, exit code 2."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite: reported in one line, exit code 1, the last checkpoint kept."""


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


def default_ve_layers(n_layer):
    """nanochat's rule: every other layer, counted back from the last one (which always has one)."""
    return tuple(i for i in range(n_layer) if i % 2 == (n_layer - 1) % 2)


def model_width(final_depth, args):
    """nanochat's sizing: depth * aspect ratio, rounded up to a whole number of heads."""
    return math.ceil(final_depth * args.aspect_ratio / args.head_dim) * args.head_dim


def model_config(depth, final_depth, args, vocab_size):
    """A depth-layer model as wide as a final_depth one (so a d6s12 has a d12's width and heads)."""
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
    # Rotate each pair (x1[j], x2[j]) by position * frequency j; the pairs are halves, not neighbours.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, has_value_embed):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        n = config.n_embd
        self.c_q, self.c_k, self.c_v, self.c_proj = (nn.Linear(n, n, bias=False) for _ in range(4))
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
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, n_head), 1 at init
            v = v + gate.unsqueeze(-1) * self.value_embed(idx).view(B, T, self.n_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, n_head, T, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scaled by 1/sqrt(head_dim)
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
            attn, mlp = block.attn, block.mlp
            for w in (attn.c_q.weight, attn.c_k.weight, attn.c_v.weight, mlp.c_fc.weight):
                nn.init.uniform_(w, -s, s)
            nn.init.zeros_(attn.c_proj.weight)
            nn.init.zeros_(mlp.c_proj.weight)
            if attn.value_embed is not None:
                nn.init.uniform_(attn.value_embed.weight, -s, s)
                nn.init.zeros_(attn.ve_gate.weight)
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

    @torch.inference_mode()
    def generate(self, prompt, max_tokens, temperature=0.8, top_k=200, seed=0):
        """
        `max_tokens` token ids sampled one at a time after the ids in `prompt` (one forward per token, over at
        most the last sequence_len: no KV cache, as short samples need none). Its own seeded generator: the
        same seed gives the same text, and training's random state is left alone. (nanoGPT's defaults.)
        """
        ids = torch.tensor([prompt], device=self.lm_head.weight.device)
        generator = torch.Generator(ids.device).manual_seed(seed)
        for _ in range(max_tokens):
            logits = self(ids[:, -self.config.sequence_len:])[:, -1]
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # only the top k are drawn
            logits = logits.masked_fill(logits < kth, -math.inf)
            next_id = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator)
            ids = torch.cat([ids, next_id], dim=1)
        return ids[0, len(prompt):].tolist()

    def param_counts(self):
        """Parameters by kind; 'scaling' (block matrices + lm_head) is what nanochat's horizon rule counts."""
        embeddings = sum(e.weight.numel() for e in self.embeddings())
        scalars = self.resid_lambdas.numel() + self.x0_lambdas.numel()
        total = sum(p.numel() for p in self.parameters())
        return dict(total=total, embeddings=embeddings, scalars=scalars, scaling=total - embeddings - scalars)

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


def empty_model(config, device, table_dtype=torch.float32):
    """A model whose weights are still to be set: by init_weights, a checkpoint or stacking."""
    model = GPT(config).to(device)
    for table in model.embeddings():
        table.to(table_dtype)  # only looked up, never multiplied: bf16 halves their memory
    return model


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
    """Orthogonalize a stack of matrices (n, rows, cols), computing in `dtype` (bf16 on GPUs, as nanochat)."""
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
            (self._adamw if group["kind"] == "adamw" else self._muon)(group)

    def _adamw(self, group):
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            moments = self.state[p]
            if not moments:
                moments.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            moments["step"] += 1
            moments["exp_avg"].lerp_(p.grad, 1 - beta1)
            moments["exp_avg_sq"].lerp_(p.grad.square(), 1 - beta2)
            bias1, bias2 = 1 - beta1 ** moments["step"], 1 - beta2 ** moments["step"]
            denom = (moments["exp_avg_sq"] / bias2).sqrt_().add_(group["eps"])
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.addcdiv_(moments["exp_avg"], denom, value=-group["lr"] / bias1)

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
        lr = group["lr"] * max(1.0, rows / cols) ** 0.5  # tall matrices: a larger step (same RMS per output)
        weights = torch.stack(params)
        decay = (update * weights >= 0) * weights  # cautious weight decay: only where update and p agree
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
    matrices = [p for p in model.blocks.parameters() if p.ndim == 2 and all(p is not t for t in tables)]
    adamw = dict(kind="adamw", betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=0.0)
    groups = [
        dict(adamw, params=[model.lm_head.weight], lr=args.unembedding_lr * width_scale * scale),
        dict(adamw, params=tables, lr=args.embedding_lr * width_scale * scale),
        dict(adamw, params=[model.resid_lambdas], lr=args.scalar_lr * 0.01 * scale),
        dict(adamw, params=[model.x0_lambdas], lr=args.scalar_lr * scale, betas=X0_LAMBDA_BETAS),
    ]
    for shape in sorted({p.shape for p in matrices}):  # Muon works on a stack of same-shape matrices at once
        same_shape = [p for p in matrices if p.shape == shape]  # momentum and decay: train_step sets them
        groups.append(dict(kind="muon", params=same_shape, lr=args.matrix_lr * scale, beta2=MUON_BETA2,
                           momentum=muon_momentum(MUON_MOMENTUM_WARMUP), weight_decay=weight_decay))
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters()), "each parameter in exactly one group"
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
    """Muon's weight decay falls linearly to zero: `done` of `total` (steps, or FLOPs: --schedule global)."""
    return weight_decay * (1 - done / total)


def schedule_at(phase, step, args):
    """
    (LR multiplier, Muon momentum, weight decay) for a step. With --schedule phases each phase
    runs its own schedules over its own steps (the write-up and the paper restart at growth).
    With --schedule global one schedule runs over the whole run, measured in FLOPs, so the LR
    is continuous across the growth and decays only at the end.
    """
    if args.schedule == "phases":
        return (lr_multiplier(step, phase.steps, args.warmup_ratio, phase.warmdown_ratio, args.final_lr_frac),
                muon_momentum(step), weight_decay_at(step, phase.steps, phase.weight_decay))
    done = phase.flops_at(step)
    # the whole run's position and length in steps of this phase (fractional): warmup's "+1" is one step
    position, length = done / phase.step_flops, phase.run_flops / phase.step_flops
    return (lr_multiplier(position, length, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac),
            muon_momentum(phase.steps_before + step),
            weight_decay_at(done, phase.run_flops, phase.weight_decay))


# -----------------------------------------------------------------------------
# Stacking: grow a shallow model into a deep one
#
# G_stack, the paper's operator, is this simple: deep layer j starts as a copy of shallow layer
# j % n_layer, and everything outside the blocks (embeddings, head) is carried over as it is.
# A layer map (which shallow layer each deep one copies) says it once for the weights, the
# per-layer scalars and the optimizer state; three other operators are small changes to it.

def growth_layer_map(n_layer, growth_factor, operator="stack"):
    """
    Which shallow layer each deep layer starts from. `interleave` repeats each layer in place,
    [0,0,1,1,...]; the others keep G_stack's block order [0..L-1] * g, where the first pass
    holds the original layers and the later passes their copies.
    """
    if operator == "interleave":
        return [i for i in range(n_layer) for _ in range(growth_factor)]
    return [i for _ in range(growth_factor) for i in range(n_layer)]


def stacked_config(shallow_config, layer_map):
    """The deep model's config. A copy of a layer with a value embedding gets one too, wherever it lands."""
    ve_layers = tuple(j for j, source in enumerate(layer_map) if source in shallow_config.ve_layers)
    return GPTConfig(**{**asdict(shallow_config), "n_layer": len(layer_map), "ve_layers": ve_layers})


@torch.no_grad()
def stack_model(shallow, growth_factor, operator="stack"):
    """
    The deep model, grown from the shallow one. G_stack: deep block j starts as a copy of shallow block
    layer_map[j] (j % n_layer), its per-layer scalars too; embeddings and head are carried over.
    The other operators are small changes to that:
      interleave  the same copies, each placed next to its source (another layer map)
      identity    G_zero: the copies' output projections are zero and their lambdas pass the residual
                  stream through (resid 1, x0 0), so the deep model computes what the shallow one did
      random      G_random without a mask: the later passes are new layers, initialized as a deep model's
    nanochat's even/odd rule for value-embedding layers would move them when the depth changes, so the
    deep config takes its layout from the sources instead.
    """
    n_layer = shallow.config.n_layer
    layer_map = growth_layer_map(n_layer, growth_factor, operator)
    table = shallow.wte.weight  # where the model lives, and its tables' dtype
    deep = empty_model(stacked_config(shallow.config, layer_map), table.device.type, table.dtype)
    if operator == "random":
        deep.init_weights()  # the copies keep this fresh init; the first pass is overwritten below
        layer_map = layer_map[:n_layer]
    for j, source in enumerate(layer_map):
        deep.blocks[j].load_state_dict(shallow.blocks[source].state_dict())
        deep.resid_lambdas[j], deep.x0_lambdas[j] = shallow.resid_lambdas[source], shallow.x0_lambdas[source]
    deep.wte.load_state_dict(shallow.wte.state_dict())
    deep.lm_head.load_state_dict(shallow.lm_head.state_dict())
    if operator == "identity":
        for j in range(n_layer, len(layer_map)):
            deep.blocks[j].attn.c_proj.weight.zero_()
            deep.blocks[j].mlp.c_proj.weight.zero_()
            deep.resid_lambdas[j], deep.x0_lambdas[j] = 1.0, 0.0  # so the layer maps x to x
    return deep


def carry_optimizer_state(shallow, shallow_optimizer, deep, deep_optimizer, layer_map):
    """--grow-optim carry: every deep parameter starts with a copy of its source's optimizer state."""
    sources = dict(shallow.named_parameters())
    for name, p in deep.named_parameters():
        if name.startswith("blocks."):  # blocks.j.rest comes from blocks.layer_map[j].rest
            _, j, rest = name.split(".", 2)
            name = f"blocks.{layer_map[int(j)]}.{rest}"
        state = shallow_optimizer.state[sources[name]]
        per_layer = name in ("resid_lambdas", "x0_lambdas")  # one entry per layer: indexed by the map too
        deep_optimizer.state[p] = {k: (v[layer_map] if per_layer else v).clone() if torch.is_tensor(v) else v
                                   for k, v in state.items()}


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
    flops_before: int = 0  # FLOPs spent before this phase (the shallow phase's, or --init-from's)
    steps_before: int = 0  # optimizer steps taken before it
    run_flops: int = 0  # the whole run's FLOPs: the length of --schedule global

    @property
    def step_flops(self):
        return self.flops_per_token * self.batch_size

    @property
    def flops(self):
        return self.step_flops * self.steps

    def flops_at(self, step):
        """FLOPs the run has spent by the end of `step` of this phase, the phases before it included."""
        return self.flops_before + self.step_flops * step


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
    auto = 2 ** round(math.log2(REFERENCE_BATCH * (scaling_params / ref_params) ** BATCH_EXPONENT))
    batch = args.total_batch_size or auto
    return batch, args.weight_decay * (batch / REFERENCE_BATCH) ** 0.5 * ref_params / scaling_params


def shallow_phase(args, vocab_size, ref_params, budget):
    """The shallow phase, its length from --shallow-steps, --grow-at or --shallow-ratio."""
    config = model_config(args.depth, args.final_depth, args, vocab_size)
    params, flops_per_token = measure(config)
    batch, wd = batch_and_weight_decay(params, ref_params, args)
    if args.shallow_steps:
        steps = args.shallow_steps
    elif args.grow_at is not None:
        steps = round(args.grow_at * budget / (flops_per_token * batch))  # the nearest step to that share
    else:
        steps = int(args.shallow_ratio * params) // batch
    if steps == 0:
        raise UsageError(f"the shallow phase gets 0 steps of {batch} tokens: raise --shallow-ratio/--grow-at")
    return Phase("shallow", config, steps, batch, flops_per_token, wd, args.shallow_warmdown_ratio)


def plan_phases(args, vocab_size, shallow_flops=None, shallow_steps=0, world=1):
    """
    The phases of this run. The FLOPs budget is the baseline's: the final-depth model trained at
    --ratio. A stacked run spends part of it on the shallow phase and, unless
    told otherwise, gives the deep phase exactly what is left, so both runs cost the same.
    shallow_flops, shallow_steps: spent by a shallow checkpoint (--init-from), which then is not planned.
    """
    spent = (shallow_flops or 0, shallow_steps)  # before the first planned phase
    ref_params, _ = measure(model_config(REFERENCE_DEPTH, REFERENCE_DEPTH, args, vocab_size))
    final_config = model_config(args.final_depth, args.final_depth, args, vocab_size)  # the baseline's
    baseline_params, baseline_flops_per_token = measure(final_config)
    batch, wd = batch_and_weight_decay(baseline_params, ref_params, args)
    baseline_steps = int(args.ratio * baseline_params) // batch
    budget = baseline_flops_per_token * batch * baseline_steps
    phases = []
    if args.stacked:
        layer_map = growth_layer_map(args.depth, args.stack_to // args.depth, args.grow)
        final_config = stacked_config(model_config(args.depth, args.final_depth, args, vocab_size), layer_map)
        if shallow_flops is None:
            phases.append(shallow_phase(args, vocab_size, ref_params, budget))
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
        steps = round((budget - (shallow_flops or 0)) / (flops_per_token * batch))  # nearest to the budget
        if steps <= 0 and shallow_flops:
            raise UsageError(f"the shallow phase uses the whole budget ({budget:.3g}): lower --shallow-ratio")
        if steps <= 0:
            raise UsageError(f"the FLOPs budget ({budget:.3g}) is less than one step: raise --ratio")
    name = "deep" if args.stacked else "baseline"
    phases.append(Phase(name, final_config, steps, batch, flops_per_token, wd, args.warmdown_ratio))
    micro_step = args.device_batch_size * args.seq_len * world  # each step must be whole micro-batches
    for phase in phases:
        phase.flops_before, phase.steps_before = spent
        spent = (spent[0] + phase.flops, spent[1] + phase.steps)
        phase.run_flops = phases[0].flops_before + sum(p.flops for p in phases)
        if phase.batch_size % micro_step:
            per = f" x {world} processes" if world > 1 else ""
            raise UsageError(f"{phase.name} phase: total batch {phase.batch_size} tokens is not a multiple "
                             f"of --device-batch-size {args.device_batch_size} x --seq-len {args.seq_len}"
                             f"{per} = {micro_step}: change --total-batch-size or --device-batch-size")
    return phases


# -----------------------------------------------------------------------------
# The plan in words, and its cost on this machine: printed before anything is written

# The README's quick start: what a CPU runs instead of a plan sized for a GPU (a test keeps the two equal)
CPU_QUICK_START = ("python stack_gpt.py --depth 2 --stack-to 4 --aspect-ratio 32 --head-dim 32 --seq-len 256 "
                   "--device-batch-size 16 --total-batch-size 4096 --ratio 2.5 --shallow-ratio 1.25 "
                   "--eval-every 100 --eval-tokens 65536")
MEMORIZING_EPOCHS = 10  # past this many passes over the train tokens, a model starts to memorize them


def cheap_token_ceiling(shallow, deep, total_flops):
    """
    The saving that growth gives if its whole gain is that the shallow phase's tokens cost less. Were a
    shallow token to teach as much as a deep one, the run would reach the baseline's final loss having
    paid f_shallow instead of f_deep for each shallow token: shallow.flops * (f_deep / f_shallow - 1)
    saved, of the baseline's total_flops (a plan's own total: the baseline that spends the same). A shallow
    phase with as many tokens as the whole baseline gets there before growing: 1 - f_shallow / f_deep.
    A reference, not a bound: a larger saving means the shallow model learned more per token, the growth
    itself helped, or the baseline was weak. In the acceleration report's units: speedup = s / (1 - s).
    """
    cost = shallow.flops_per_token / deep.flops_per_token  # of a deep token, for each shallow one
    return min(shallow.flops / total_flops * (1 / cost - 1), 1 - cost)


def describe_plan(phases, args, meta):
    """What the run will do, in FLOPs and tokens, before it starts."""
    lines = [f"{p.name}: {p.config.n_layer} layer{'s' * (p.config.n_layer > 1)} x {p.config.n_embd} wide, "
             f"{p.config.n_head} head{'s' * (p.config.n_head > 1)} | {p.steps} steps x {p.batch_size:,} "
             f"tokens | {p.flops_per_token:.3e} FLOPs/token | {p.flops:.3e} FLOPs | "
             f"warmdown {p.warmdown_ratio} | wd {p.weight_decay:.4f}" for p in phases]
    tokens, total_flops = sum(p.batch_size * p.steps for p in phases), phases[0].run_flops
    epochs = tokens / meta["train_tokens"]
    lines.append(f"total: {total_flops:.3e} FLOPs, {tokens:,} tokens" + (
        f" = {epochs:.2f} epochs of the {meta['train_tokens']:,} train tokens" if epochs > 1 else "") + (
        f" | one LR schedule, warmdown {args.warmdown_ratio}" if args.schedule == "global" else ""))
    if args.stacked and not phases[0].flops_before:
        ceiling = cheap_token_ceiling(phases[0], phases[1], total_flops)
        lines.append(f"growth after {phases[0].flops / total_flops:.1%} of the FLOPs | cheap-token ceiling "
                     f"{ceiling:.1%} saved (speedup {ceiling / (1 - ceiling):.1%}) if all tokens teach alike")
    if epochs > MEMORIZING_EPOCHS:
        lines.append(f"this plan reads the train tokens {epochs:.0f} times: past about {MEMORIZING_EPOCHS} a "
                     "model memorizes them and val bpb means little; build a larger dataset (python "
                     "prepare_data.py --dataset pylibs, or fineweb-edu) or lower --ratio")
    return "\n".join(lines)


def measure_flops_per_second(config, args):
    """
    This machine's speed, in FLOP/s, on forwards and backwards of a scratch copy of the first model.
    On a GPU: one micro-batch, compiled if the run will be, freed before training (it needs no more memory
    than training). On a CPU: eager, and cut to about 2e10 FLOPs a call, so that a plan sized for a GPU is
    judged in seconds. One call warms up; the median of the next 3 counts.
    """
    rows, tokens = args.device_batch_size, args.seq_len
    if args.device == "cpu":  # about 2e10 FLOPs a call: a shorter context, then fewer rows
        tokens = min(tokens, 2 ** max(3, round(math.log2(2e10 / measure(config)[1]))))
        rows = max(1, min(rows, round(2e10 / (measure(config)[1] * tokens))))
    with torch.random.fork_rng(devices=[]):  # a scratch model: its random init leaves the run's own unchanged
        scratch = empty_model(replace(config, sequence_len=tokens), args.device, PRECISIONS[args.dtype])
    step_model = torch.compile(scratch, dynamic=False) if args.compile and args.device == "cuda" else scratch
    batch = torch.zeros(rows, tokens, dtype=torch.long, device=args.device)
    seconds = []
    for _ in range(4):
        start = time.perf_counter()
        with precision(args):
            step_model(batch, batch).backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    if args.device == "cuda":
        torch._dynamo.reset()  # drop the scratch's compiled graph with it
        torch.cuda.reset_peak_memory_stats()  # the summary's peak memory is the run's, not this copy's
    return scratch.flops_per_token() * rows * tokens / sorted(seconds[1:])[1]  # the median of the last 3


def announce_plan(phases, args, meta, val_tokens, log):
    """
    Before anything is written: print the plan, time this machine, print the estimate (training and the
    evaluations, forward only: a third of a training token's FLOPs). A plan that would take a CPU more than
    a day stops here unless --device cpu was given (or torchrun: several processes chose their hardware, and
    a refusal must not hang on their timings differing). Returns the estimate in seconds.
    """
    log(describe_plan(phases, args, meta))
    speed = measure_flops_per_second(phases[0].config, args) * world_size()
    evals = [math.ceil(p.steps / args.eval_every) + 1 if args.eval_every else 1 for p in phases]  # step 0 too
    seconds = sum(p.flops + n * val_tokens * p.flops_per_token / 3 for p, n in zip(phases, evals)) / speed
    when = f"{seconds / 86400:.1f} days" if seconds > 86400 else f"{seconds / 60:.1f} minutes"
    log(f"estimated time: about {when} on this {args.device} ({speed:.3g} FLOP/s timed in forwards and "
        "backwards of the first model; optimizer steps not counted)")
    cpu = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []  # Linux's CPU flags
    if args.device == "cpu" and args.dtype == "fp32" and ("avx512_bf16" in cpu or "amx_bf16" in cpu):
        log("this CPU has native bf16: --dtype bf16 --compile ran the quick start's step 1.4-2.0x faster "
            "on two such CPUs (experiments.md); fp32, the default, keeps results alike across machines")
    if seconds > 86400 and args.device == "cpu" and not (args.device_given or args.plan or world_size() > 1):
        raise UsageError("this plan is sized for a GPU: run the README's quick start on a CPU "
                         f"({CPU_QUICK_START}), or pass --device cpu to train it here anyway")
    return seconds


# -----------------------------------------------------------------------------
# Evaluation: bits per byte on fixed val tokens (the same windows every time: val_batches)

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
        nats, nbytes = (torch.as_tensor(t, device=token_bytes.device) for t in (nats, nbytes))
        for total in (nats, nbytes):
            dist.all_reduce(total)
    return float(nats) / (math.log(2) * float(nbytes))


# -----------------------------------------------------------------------------
# Data: the folder prepare_data.py writes (its format is the interface, not its code)
#
#   train_000000.bin ..., val_000000.bin ...  llm.c shards: a header of 256 int32 (magic 20240520,
#                                             version 1, token count), then the tokens as uint16
#   tokenizer.tiktoken                        the BPE's ranks (training needs only ids; samples decode)
#   token_bytes.npy                           UTF-8 bytes of each token id (0 for special ones)
#   meta.json                                 shard names, vocab size, the BPE's split pattern and special
#                                             tokens; written last, so its folder is whole

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256


def read_shard(path):
    """The tokens of a shard, memory-mapped so that big shards cost no RAM."""
    magic, version, count = np.fromfile(path, np.int32, count=3)
    whole = os.path.getsize(path) == 4 * HEADER_INTS + 2 * count  # a header's worth of int32, then uint16s
    if (magic, version) != (SHARD_MAGIC, SHARD_VERSION) or not whole:
        raise UsageError(f"{path} is not a whole token shard: rebuild the dataset with prepare_data.py")
    return np.memmap(path, np.uint16, mode="r", offset=4 * HEADER_INTS, shape=(int(count),))


def load_data(data_dir):
    """A dataset folder's meta.json, its train and val shards, and each token id's length in bytes."""
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            meta = json.load(f)
        train, val = ([read_shard(os.path.join(data_dir, n)) for n in meta[f"{split}_shards"]]
                      for split in ("train", "val"))
        token_bytes = np.load(os.path.join(data_dir, "token_bytes.npy")).astype(np.int32)
    except (OSError, ValueError, KeyError, AssertionError):
        raise UsageError(f"no complete dataset in {data_dir}: build one with prepare_data.py") from None
    return meta, train, val, token_bytes


def load_tokenizer(data_dir):
    """The dataset's tiktoken.Encoding, to read samples with: its ranks, meta.json's pattern (or None)."""
    path = os.path.join(data_dir, "tokenizer.tiktoken")
    if not os.path.isfile(path):  # a GPT-2 dataset built without the GPT-2 ranks at hand
        return None
    words = open(path, "rb").read().split()  # a "base64-of-the-token's-bytes rank" line per token
    ranks = {base64.b64decode(token): int(rank) for token, rank in zip(words[::2], words[1::2])}
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    return tiktoken.Encoding(meta["name"], pat_str=meta["pattern"], mergeable_ranks=ranks,
                             special_tokens=meta["special_tokens"])


class TokenWindows:
    """
    Every shard is cut into windows of seq_len+1 tokens (inputs and next-token targets); each epoch
    visits all windows once in a seeded random order. The loader's whole position is (epoch, cursor),
    so it can be saved and restored exactly. Each optimizer step asks for its rows in micro-batches;
    `rank`/`world` pick this process's slice of every micro-batch: the global batch does not depend on them.
    """

    def __init__(self, shards, seq_len, seed, device, rank=0, world=1):
        self.shards, self.seq_len, self.seed, self.device = shards, seq_len, seed, device
        self.rank, self.world = rank, world
        counts = [(len(s) - 1) // seq_len for s in shards]  # -1: the last window needs one more target token
        self.first_window = np.cumsum([0] + counts)  # global window id where each shard starts
        self.num_windows = int(self.first_window[-1])
        if self.num_windows == 0:
            raise UsageError(f"the data has fewer than {seq_len + 1} tokens: lower --seq-len or more data")
        self.load_state_dict({"epoch": 0, "cursor": 0})

    def _order(self, epoch):
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)  # one seed per (seed, epoch < 100003)
        return torch.randperm(self.num_windows, generator=g).numpy()

    def window(self, i):
        shard = int(np.searchsorted(self.first_window, i, side="right")) - 1
        start = (i - self.first_window[shard]) * self.seq_len
        return self.shards[shard][start:start + self.seq_len + 1]

    def next_batch(self, rows):
        """The next `rows` windows of this rank, as (inputs, targets) of shape (rows, seq_len)."""
        ids = []
        for _ in range(rows * self.world):
            if self.cursor == self.num_windows:
                self.epoch, self.cursor = self.epoch + 1, 0
                self.order = self._order(self.epoch)
            ids.append(self.order[self.cursor])
            self.cursor += 1
        mine = ids[self.rank * rows:(self.rank + 1) * rows]
        batch = torch.from_numpy(np.stack([self.window(i) for i in mine]).astype(np.int64))
        if self.device == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self):
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, position):
        self.epoch, self.cursor = position["epoch"], position["cursor"]
        self.order = self._order(self.epoch)


def val_batches(val_shards, eval_tokens, seq_len, batch_rows, device):
    """
    The same eval_tokens each time, in device-sized batches: windows spread evenly over the whole
    val split, so that a small eval still samples every part of it, not only its first documents.
    """
    windows = TokenWindows(val_shards, seq_len, seed=0, device=device)
    n = min(eval_tokens // seq_len, windows.num_windows)
    spread = np.linspace(0, windows.num_windows - 1, n).round().astype(int)  # n distinct ids: spacing >= 1
    rows = torch.from_numpy(np.stack([windows.window(i) for i in spread]).astype(np.int64)).to(device)
    return [(batch[:, :-1], batch[:, 1:]) for batch in rows.split(batch_rows)]


# -----------------------------------------------------------------------------
# The training loop: train shallow, stack, train deep

def precision(args):
    """What every forward runs under: --dtype bf16 runs the matmuls (and so backward) in bf16 by autocast."""
    return torch.autocast(args.device, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()


def train_step(step_model, model, optimizer, loader, phase, step, args):
    """
    One optimizer step: gradients averaged over micro-batches and ranks, then the update at this
    step's schedule. `step_model` (the compiled model, or the model itself) runs forward and backward;
    `model` holds the parameters the gradients land in. Returns the step's mean loss (a tensor: no
    host sync) and the LR multiplier.
    """
    world = world_size()
    accum = phase.batch_size // (args.device_batch_size * args.seq_len * world)  # micro-batches per rank
    loss_sum = torch.zeros((), device=args.device)
    for _ in range(accum):
        x, y = loader.next_batch(args.device_batch_size)
        with precision(args):
            loss = step_model(x, y)
        (loss / accum).backward()  # gradients add up over micro-batches: divide to get the mean
        loss_sum += loss.detach()
    average_gradients(model, world)
    lrm, momentum, weight_decay = schedule_at(phase, step, args)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"], group["weight_decay"] = momentum, weight_decay
    optimizer.step()
    model.zero_grad(set_to_none=True)
    if world > 1:
        dist.all_reduce(loss_sum)
        loss_sum /= world
    return loss_sum / accum, lrm


def train(args, phases, loader, val, token_bytes, log, resume=None, init=None):
    """
    The run from start to end: for each phase, grow the model if this is the deep phase, then train it
    step by step (evaluate, step, log, checkpoint). A baseline has one phase. The model starts new, from
    an interrupted run's checkpoint (--resume), or from a trained shallow model (--init-from: no phase 1).
    Returns each phase's final val bpb.
    """
    if resume or init:
        model, optimizer = restore(resume or init, args, loader, log)
    else:
        model = empty_model(phases[0].config, args.device, PRECISIONS[args.dtype])
        model.init_weights()
        optimizer = build_optimizer(model, args, phases[0].batch_size, phases[0].weight_decay)
    first = [p.name for p in phases].index(resume["phase"]) if resume else 0
    start_step = resume["step"] if resume else 0
    if start_step == phases[first].steps:  # resumed from shallow.pt: the first phase is done
        first, start_step = first + 1, 0
    smooth_loss = torch.tensor(resume["smooth_loss"] if start_step else 0.0, device=args.device)  # loss EMA
    val_bpb = dict(resume["val_bpb"]) if resume else {}
    for phase in phases[first:]:
        # Deep step 0's val bpb can jump (in the README's quick start, above an untrained model's): the second
        # pass of copies reads a residual stream that the first pass has already written to, which these
        # layers never saw in training. Within about a hundred steps it is below where the shallow model
        # stopped. (--grow identity starts the copies as pass-throughs: no jump, no head start.)
        if model.config.n_layer != phase.config.n_layer:  # the shallow phase is over: grow
            layer_map = growth_layer_map(args.depth, args.stack_to // args.depth, args.grow)
            deep = stack_model(model, args.stack_to // args.depth, args.grow)
            deep_optimizer = build_optimizer(deep, args, phase.batch_size, phase.weight_decay)
            if args.grow_optim == "carry":
                carry_optimizer_state(model, optimizer, deep, deep_optimizer, layer_map)
            model, optimizer = deep, deep_optimizer  # the shallow ones go with step_model, just below
            log(f"grew {args.depth} -> {args.stack_to} layers by {args.grow}, optimizer {args.grow_optim}")
            print_sample(model, "right after growth", args)
        step_model = torch.compile(model, dynamic=False) if args.compile else model
        phase_start = last_log = time.time()
        last_log_step = start_step
        for step in range(start_step, phase.steps + 1):
            if step == phase.steps or (args.eval_every and step % args.eval_every == 0):
                bpb = evaluate_bpb(step_model, val, token_bytes, precision(args))  # no dropout: no eval()
                log(f"{phase.name} step {step}/{phase.steps} | val bpb {bpb:.4f}", kind="eval",
                    phase=phase.name, step=step, val_bpb=bpb, flops=phase.flops_at(step))
                last_log, last_log_step = time.time(), step  # keep eval time out of the step timings
            if step == phase.steps:
                break
            loss, lrm = train_step(step_model, model, optimizer, loader, phase, step, args)
            smooth_loss.lerp_(loss, 1 - LOSS_EMA_DECAY)  # smooth = decay * smooth + (1 - decay) * loss
            if (step + 1) % args.log_every == 0 or step + 1 == phase.steps:  # host syncs: log lines only
                loss, smoothed = torch.stack([loss, smooth_loss]).tolist()  # waits for the GPU: time after it
                now = time.time()
                dt = (now - last_log) / (step + 1 - last_log_step)  # mean over the steps since the last log
                eta = (now - phase_start) / (step + 1 - start_step) * (phase.steps - step - 1)
                log_train_line(phase, step + 1, loss, smoothed, lrm, dt, now - phase_start, eta, args, log)
                last_log, last_log_step = now, step + 1
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < phase.steps:
                save_checkpoint("checkpoint.pt", model, optimizer, args, phase, step + 1, loader, log,
                                smooth_loss, val_bpb)
        val_bpb[phase.name] = bpb
        save_checkpoint("shallow.pt" if phase.name == "shallow" else "final.pt", model, optimizer, args,
                        phase, phase.steps, loader, log, smooth_loss, val_bpb)
        check_replicas_agree(model)  # after the checkpoint: a failed check loses no finished phase
        print_sample(model, f"at the end of the {phase.name} phase", args)
        smooth_loss.zero_()
        start_step = 0
    return val_bpb


def log_train_line(phase, steps_done, loss, smoothed, lrm, dt, elapsed, eta, args, log):
    """
    The log line and metrics record after `steps_done` steps, from the last step's loss and the loss
    EMA (floats; the EMA is debiased here). A loss that is not finite stops the run instead.
    """
    smoothed /= 1 - LOSS_EMA_DECAY ** steps_done  # debias: the EMA started from zero
    if not math.isfinite(loss):
        raise TrainingDiverged(f"{phase.name} phase: loss is {loss} at step {steps_done}; checkpoints kept")
    tok_per_s = phase.batch_size / dt
    # model FLOPs utilization: the FLOP/s our FLOPs count says we do, over the peak of all GPUs together
    # (the GPU's peak from the table; none on a CPU or an unknown GPU: then no MFU is shown)
    name = torch.cuda.get_device_name().lower() if args.device == "cuda" else ""  # "" matches no entry
    peak = next((peak for keys, peak in PEAK_BF16_FLOPS if all(k in name for k in keys)), None)
    mfu = 100 * phase.flops_per_token * tok_per_s / (peak * world_size()) if peak else None
    log(f"{phase.name} step {steps_done}/{phase.steps} | loss {smoothed:.4f} | lrm {lrm:.3f} | dt "
        f"{dt * 1000:.0f}ms | tok/s {tok_per_s:,.0f}{f' | mfu {mfu:.1f}%' if mfu else ''} | elapsed "
        f"{elapsed / 60:.1f}m | eta {eta / 60:.1f}m",
        kind="train", phase=phase.name, step=steps_done, loss=smoothed, raw_loss=loss, lrm=lrm, dt=dt,
        tok_per_s=tok_per_s, mfu=mfu, flops=phase.flops_at(steps_done), elapsed=elapsed)


@torch.no_grad()
def print_sample(model, when, args):
    """Text the model writes from the start of a document, with the same seed each time: samples compare."""
    if not args.sample_tokens or rank() != 0:
        return
    tokenizer = load_tokenizer(args.data)
    if tokenizer is None:
        print(f"sample {when}: none, {args.data} has no tokenizer.tiktoken to decode it with")
        return
    with precision(args):
        ids = model.generate([tokenizer.eot_token], args.sample_tokens, seed=args.seed)
    text = tokenizer.decode(ids).replace("<|endoftext|>", "\n")  # a new document starts on a new line
    print(f"sample {when}:\n" + "\n".join("  | " + line for line in text.split("\n")), flush=True)


def launch(args):
    """
    Check the input, plan the run and print the plan at once; time this machine for the estimate (and
    the guard against a CPU run of days); only then write the run folder, and train.
    """
    resume, args = resume_point(args) if args.resume else (None, args)
    if args.resume and resume is None:
        print(f"{args.out_dir} already finished: nothing to resume")
        return
    if not args.plan:
        check_run_dir(args)
    keep_freed_memory(args)
    setup_distributed(args.device)
    torch.manual_seed(args.seed)
    meta, train_shards, val_shards, token_bytes = load_data(args.data)
    init = load_init_from(args, meta["vocab_size"]) if args.init_from else None
    baseline = read_metrics(args.baseline) if args.baseline else None
    spent = (init["flops"], init["step"]) if init else (None, 0)  # by --init-from's shallow phase
    phases = plan_phases(args, meta["vocab_size"], *spent, world=world_size())
    val = val_batches(val_shards, args.eval_tokens, args.seq_len, args.device_batch_size, args.device)
    loader = TokenWindows(train_shards, args.seq_len, args.seed, args.device, rank(), world_size())
    log = MetricsLog(os.path.join(args.out_dir, "metrics.jsonl"), resume["metrics_lines"] if resume else 0)
    if args.device == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls outside autocast
    if not resume or args.plan:
        seconds = announce_plan(phases, args, meta, sum(x.numel() for x, _ in val), log)
    if args.plan:
        return
    if rank() == 0:
        prepare_run_dir(args, log.lines)  # before anyone logs to it; a resumed run keeps its lines
    if not resume:  # the plan is the first record of metrics.jsonl
        log(kind="plan", phases=[{**asdict(p), "flops": p.flops} for p in phases], estimated_seconds=seconds)
    start = time.time()
    token_bytes = torch.tensor(token_bytes, device=args.device)
    val_bpb = train(args, phases, loader, val[rank()::world_size()], token_bytes, log, resume, init)
    # the summary: each phase's final val bpb, the FLOPs, the time, and on a GPU the peak memory
    wall = time.time() - start
    memory = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    bpb, flops = " | ".join(f"{k} {v:.4f}" for k, v in val_bpb.items()), phases[-1].run_flops
    log(f"done: val bpb {bpb} | {flops:.3e} FLOPs | {wall / 60:.1f} min"
        + (f" | peak memory {memory:.1f} GiB" if memory else ""), kind="summary", val_bpb=val_bpb,
        flops=flops, phase_flops={p.name: p.flops for p in phases}, wall_time=wall, peak_memory_gib=memory)
    if args.baseline and rank() == 0:  # only rank 0 has written its records
        log(format_report([acceleration(baseline, read_metrics(log.path), args.out_dir)]))
    if world_size() > 1:  # leave together, and skip the interpreter's teardown: with gloo it can abort
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)


# -----------------------------------------------------------------------------
# Reports: the acceleration report against a baseline (--baseline, --compare; experiments/sweeps.py
# imports it too)



def read_metrics(path):
    """The records of a run's metrics.jsonl (path to the file or to its run folder)."""
    path = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    records = []
    try:
        with open(path) as f:
            for line in f:
                records.append(json.loads(line))
        kinds = {record["kind"] for record in records}
    except (OSError, ValueError, TypeError, KeyError) as e:  # a line cut short by a killed run, binary data..
        raise UsageError(f"cannot read the metrics in {path} after {len(records)} records ({e!r}): remove "
                         "what is broken, or give a run folder or its metrics.jsonl") from None
    if not {"train", "eval"} <= kinds:
        raise UsageError(f"{path} has no train and eval records: give the metrics of a run that trained")
    return records


def flops_reaching(records, key, target):
    """
    Cumulative FLOPs at which `key` first reaches target (at or below it), or None if it never does.
    Evaluations are far apart, so the crossing is read off the straight line between the last record
    above target and the first at or below it (the first record's own FLOPs if it is already there).
    """
    if records[0][key] <= target:
        return records[0]["flops"]
    for above, below in zip(records, records[1:]):
        if below[key] <= target:  # the first record at or below target: every one before it is above
            share = (above[key] - target) / (above[key] - below[key])  # where the line between them meets it
            return above["flops"] + share * (below["flops"] - above["flops"])
    return None


def acceleration(baseline, run, name):
    """
    Compare a run with a baseline as the paper and the write-up do: the fraction of the baseline's
    total FLOPs at which the run (shallow phase included) first reaches the baseline's final smoothed
    train loss, and its final val bpb. saving = 1 - fraction, and the paper's speedup = 1/fraction - 1
    (compute the baseline needed over what we needed), the crossing interpolated (flops_reaching).
    """
    def of(records, kind):
        return [r for r in records if r["kind"] == kind]
    base_evals, evals = of(baseline, "eval"), of(run, "eval")
    budget = base_evals[-1]["flops"]
    at_budget = [r for r in evals if r["flops"] <= budget * (1 + 1e-9)]
    row = dict(name=name, val_bpb=evals[-1]["val_bpb"], flops=evals[-1]["flops"],
               baseline_val_bpb=base_evals[-1]["val_bpb"], baseline_flops=budget,
               val_bpb_at_budget=at_budget[-1]["val_bpb"] if at_budget else None)
    for metric, kind, key in [("loss", "train", "loss"), ("bpb", "eval", "val_bpb")]:
        reached = flops_reaching(of(run, kind), key, of(baseline, kind)[-1][key])
        fraction = reached / budget if reached is not None else None
        row[f"{metric}_fraction"] = fraction
        row[f"{metric}_saving"] = 1 - fraction if fraction else None
        row[f"{metric}_speedup"] = 1 / fraction - 1 if fraction else None
    return row


def format_report(rows):
    """The rows of acceleration() as a markdown table."""
    def pct(x):
        return "not reached" if x is None else f"{100 * x:.1f}%"
    base = rows[0]
    lines = [f"baseline: val bpb {base['baseline_val_bpb']:.4f} at {base['baseline_flops']:.3e} FLOPs", "",
             "| run | val bpb | FLOPs | val bpb at baseline FLOPs | reaches baseline train loss at | saving "
             "| speedup | reaches baseline val bpb at | saving | speedup |", "|---" * 10 + "|"]
    for r in rows:
        at_budget = "-" if r["val_bpb_at_budget"] is None else f"{r['val_bpb_at_budget']:.4f}"
        cells = [r["name"], f"{r['val_bpb']:.4f}", f"{r['flops']:.3e}", at_budget]
        cells += [pct(r[f"{m}_{x}"]) for m in ("loss", "bpb") for x in ("fraction", "saving", "speedup")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Command line

class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line and exit code 2 like every other input error."""

    def error(self, message):
        print(f"error: {message} (see python {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def number(cast, low=0, strict=True, high=math.inf):
    """An argparse type: a finite number between `low` and `high`, excluded if strict, else included."""
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and ((low < value < high) if strict else (low <= value <= high))):
            kind, op = ("a whole number" if cast is int else "a finite number"), ("" if strict else "=")
            bounds = f">{op} {low}" + (f" and <{op} {high}" if high < math.inf else "")
            raise argparse.ArgumentTypeError(f"must be {kind} {bounds} (got {text!r})")
        return value
    return parse


positive_int, count = number(int), number(int, strict=False)
positive, non_negative = number(float), number(float, strict=False)


def get_parser():
    p = OneLineParser(description="Train a GPT, grow it by layer stacking, train the deep model.",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model").add_argument
    g("--depth", type=positive_int, default=12, help="layers of the first (with --stack-to: shallow) model")
    g("--stack-to", type=positive_int, help="final depth after stacking, a multiple of --depth")
    g("--aspect-ratio", type=positive_int, default=64, help="width: final depth * this, to a --head-dim")
    g("--head-dim", type=positive_int, default=128, help="attention head dimension")
    g("--seq-len", type=positive_int, default=2048, help="context length in tokens")
    g = p.add_argument_group("horizon").add_argument
    g("--ratio", type=positive, default=10.5, help="data:param ratio of the baseline: the run's FLOPs budget")
    g("--shallow-ratio", type=positive, default=3.25, help="data:param ratio of the shallow phase")
    g("--grow-at", type=number(float, high=1), help="grow after this share of the FLOPs budget")
    g("--shallow-steps", type=positive_int, help="steps of the shallow phase (overrides --shallow-ratio)")
    g("--deep-ratio", type=positive, help="data:param ratio of the deep phase (default: fill the budget)")
    g("--deep-steps", type=positive_int, help="steps of the deep (or only) phase")
    g = p.add_argument_group("optimization").add_argument
    g("--total-batch-size", type=positive_int, help="tokens per step (default: 2^19 at d12, nanochat's rule)")
    g("--device-batch-size", type=positive_int, default=32, help="sequences per forward pass (accumulated)")
    g("--lr-scale", type=positive, default=1.0, help="multiplies every learning rate (a one-knob LR sweep)")
    g("--matrix-lr", type=non_negative, default=0.02, help="Muon learning rate of the block matrices")
    g("--embedding-lr", type=non_negative, default=0.3, help="AdamW learning rate of the embeddings")
    g("--unembedding-lr", type=non_negative, default=0.004, help="AdamW learning rate of the lm_head")
    g("--scalar-lr", type=non_negative, default=0.5, help="AdamW LR of x0_lambdas (resid_lambdas: 1%% of it)")
    g("--weight-decay", type=non_negative, default=0.2, help="Muon's weight decay at d12 (then scaled)")
    g("--warmup-ratio", type=number(float, strict=False, high=1), default=0.0, help="share with LR warmup")
    g("--warmdown-ratio", type=non_negative, help="share of the deep phase (or run) with LR decay")
    g("--shallow-warmdown-ratio", type=non_negative, default=0.0, help="warmdown ratio of the shallow phase")
    g("--final-lr-frac", type=non_negative, default=0.0, help="LR multiplier at the end of a warmdown")
    g = p.add_argument_group("evaluation and logging").add_argument
    g("--eval-every", type=count, default=250, help="val bpb every N steps and at each phase's end (0: end)")
    g("--eval-tokens", type=positive_int, default=40 * REFERENCE_BATCH, help="val tokens per evaluation")
    g("--log-every", type=positive_int, default=1, help="print and record the train loss every N steps")
    g("--sample-tokens", type=count, default=48, help="tokens of text sampled at growth and each phase's end")
    g = p.add_argument_group("growth (the README says what each choice tests)").add_argument
    g("--grow", choices=GROW_OPERATORS, default="stack", help="how the shallow layers become the deep ones")
    g("--grow-optim", choices=("reset", "carry"), default="reset", help="a new optimizer, or carry the state")
    g("--schedule", choices=("phases", "global"), default="phases", help="LR per phase, or one over the run")
    g("--baseline", help="a baseline's run folder or metrics.jsonl: end with the acceleration report")
    g("--compare", nargs="+", metavar="METRICS", help="report finished runs against the first (a baseline)")
    g = p.add_argument_group("run").add_argument
    g("--data", default="data/stdlib", help="dataset folder written by prepare_data.py")
    g("--out-dir", help="folder for config, metrics and checkpoints (default: runs/<d6s12 or d12>)")
    g("--overwrite", action="store_true", help="start over in a folder that holds another run")
    g("--save-every", type=count, default=0, help="also write checkpoint.pt every N steps, for --resume")
    g("--resume", action="store_true", help="continue the interrupted run in --out-dir, with its flags")
    g("--init-from", help="a shallow.pt to start from: skips phase 1 (one shallow model, many deep runs)")
    g("--device", choices=("cuda", "cpu"), help="default: cuda if any; named, cpu trains a plan of days too")
    g("--plan", action="store_true", help="print the plan and its estimated time, write nothing, exit")
    g("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model (default: on cuda)")
    g("--dtype", choices=PRECISIONS, help="bf16: autocast and bf16 tables, as on GPUs (cuda's default)")
    g("--seed", type=int, default=0, help="seed for the initialization and the data order")
    return p


def resolve_args(argv=None):
    """Parse the flags, refuse combinations that cannot work, fill in the defaults that depend on others."""
    p = get_parser()
    args = p.parse_args(argv)
    args.stacked = args.stack_to is not None
    args.final_depth = args.stack_to if args.stacked else args.depth
    if args.stacked and (args.stack_to <= args.depth or args.stack_to % args.depth):
        p.error("--stack-to must be a larger multiple of --depth (e.g. --depth 6 --stack-to 12)")
    if (args.grow_at is not None or args.init_from) and not args.stacked:
        p.error("--grow-at and --init-from are about growth: give --stack-to too")
    if args.grow_at is not None and (args.shallow_steps or args.init_from):
        p.error("--grow-at sets the shallow phase's length: leave out --shallow-steps and --init-from")
    if args.compare is not None and len(args.compare) < 2:
        p.error("--compare needs a baseline run and at least one run to compare with it")
    if args.eval_tokens < args.seq_len or args.head_dim % 2:
        p.error("--eval-tokens must hold a sequence (at least --seq-len), and --head-dim must be even")
    if model_width(args.final_depth, args) < VE_GATE_CHANNELS:
        p.error(f"the model is narrower than the {VE_GATE_CHANNELS} channels the value-embedding gate reads: "
                "raise --aspect-ratio")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but no CUDA GPU is visible: use --device cpu")
    if args.warmdown_ratio is None:  # the write-up's best deep phase after stacking, else nanochat's default
        args.warmdown_ratio = 1.0 if args.stacked and args.schedule == "phases" else 0.5
    args.device_given = args.device is not None  # a CPU plan of days runs only when asked for by name
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.compile = args.device == "cuda" if args.compile is None else args.compile
    # GPUs are fast in bf16; many CPUs have no native bf16 and emulate it, tens of times slower than fp32
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.out_dir = args.out_dir or os.path.join("runs", f"d{args.depth}" + f"s{args.stack_to}" * args.stacked)
    return args


def main(argv=None):
    try:
        args = resolve_args(argv)
        if args.compare:
            baseline = read_metrics(args.compare[0])
            print(format_report([acceleration(baseline, read_metrics(p), p) for p in args.compare[1:]]))
        else:
            try:
                launch(args)
            except KeyboardInterrupt:  # Ctrl-C: one line on how to go on, not a traceback
                saved = any(os.path.exists(os.path.join(args.out_dir, name)) for name in CHECKPOINTS[1:])
                then = (f"python stack_gpt.py --resume --out-dir {args.out_dir} continues" if saved
                        else "no checkpoint yet, so the same command starts over")
                print(f"\nstopped by Ctrl-C: {then}", file=sys.stderr)
                sys.exit(130)  # the shell's code for a Ctrl-C
    except (UsageError, TrainingDiverged) as e:  # one line, no traceback: 2 for bad input, 1 if diverged
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1 if isinstance(e, TrainingDiverged) else 2)


# -----------------------------------------------------------------------------
# Plumbing: checkpoints, the run folder and its log, --resume, torchrun (skip on a first reading)

CHECKPOINT_FORMAT = "stack-gpt-1"
CHECKPOINTS = ("final.pt", "checkpoint.pt", "shallow.pt")  # --resume continues from the last two


def write_atomic(path, write):
    """Call write(file) on path.tmp, flush it to disk, then rename it over path: never a half-written file."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so a crash cannot leave a renamed empty file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # an error or Ctrl-C midway: leave nothing half-written
            os.remove(tmp)


def save_checkpoint(name, model, optimizer, args, phase, step, loader, log, smooth_loss, val_bpb):
    """
    Everything needed to continue after `step` of `phase` (--resume) or to grow from it (--init-from),
    written by rank 0 to the run folder: the model, optimizer, data position, RNG, the loop's state
    and how many metrics lines were written.
    """
    # a NaN since the last logged step must not become the checkpoint to resume; the smoothed loss is
    # averaged over ranks, so every rank stops here together
    if not math.isfinite(smooth_loss):
        raise TrainingDiverged(f"{phase.name} phase: loss {float(smooth_loss)} by step {step}; last one kept")
    if rank() != 0:
        return
    cuda_rng = torch.cuda.get_rng_state() if args.device == "cuda" else torch.zeros(0, dtype=torch.uint8)
    ckpt = dict(format=CHECKPOINT_FORMAT, model=model.state_dict(), optimizer=optimizer.state_dict(),
                model_config=asdict(model.config), args=vars(args), phase=phase.name, step=step,
                flops=phase.flops_at(step), weight_decay=phase.weight_decay, batch_size=phase.batch_size,
                rng=torch.get_rng_state(), cuda_rng=cuda_rng, smooth_loss=float(smooth_loss),
                val_bpb=dict(val_bpb), metrics_lines=log.lines, loader=loader.state_dict())
    path = os.path.join(args.out_dir, name)
    try:
        write_atomic(path, lambda f: torch.save(ckpt, f))
    except OSError as e:
        raise UsageError(f"could not write {path} ({e.strerror}); the old one stays: free some disk space")


def load_checkpoint(path):
    """A checkpoint, loaded with weights_only=True: tensors and plain data, never code from the file."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}: give the shallow.pt of a finished phase 1")
    try:
        with warnings.catch_warnings():  # torch warns about odd files; the one-line refusal below says it
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)  # every rank, whatever its GPU
        if ckpt["format"] != CHECKPOINT_FORMAT:
            raise ValueError("another format")
    except Exception:
        raise UsageError(f"{path} is no intact stack_gpt checkpoint (or it holds code): refused") from None
    return ckpt


def restore(ckpt, args, loader, log):
    """
    Model, optimizer and RNG from a checkpoint (its tensors taken out: no second copy), and the data
    position: always for --resume, for --init-from only when the data and seed are the same.
    """
    config = GPTConfig(**{**ckpt["model_config"], "ve_layers": tuple(ckpt["model_config"]["ve_layers"])})
    model = empty_model(config, args.device, PRECISIONS[args.dtype])
    model.load_state_dict(ckpt.pop("model"))
    optimizer = build_optimizer(model, args, ckpt["batch_size"], ckpt["weight_decay"])
    optimizer.load_state_dict(ckpt.pop("optimizer"))
    same_data = args.resume or (os.path.realpath(ckpt["args"]["data"]) == os.path.realpath(args.data)
                                and ckpt["args"]["seed"] == args.seed)
    if same_data:
        loader.load_state_dict(ckpt["loader"])
    torch.set_rng_state(ckpt["rng"])
    if args.device == "cuda" and ckpt["cuda_rng"].numel():  # empty when it was saved on a CPU
        torch.cuda.set_rng_state(ckpt["cuda_rng"])
    reads = "on from where it stopped" if same_data else "its data from the start (other data or seed)"
    log(f"resuming {args.out_dir}: {ckpt['phase']} step {ckpt['step']}" if args.resume else
        f"shallow model from {args.init_from}; the deep phase reads {reads}")
    return model, optimizer


def load_init_from(args, vocab_size):
    """--init-from's checkpoint: a shallow one, of the shape these flags would train."""
    ckpt, want = load_checkpoint(args.init_from), model_config(args.depth, args.final_depth, args, vocab_size)
    if ckpt["phase"] != "shallow":
        raise UsageError(f"{args.init_from} is a {ckpt['phase']} checkpoint: --init-from takes a shallow.pt")
    have, want = ckpt["model_config"], asdict(want)
    wrong = [f"{k}={have[k]} (this run: {want[k]})" for k in have if k != "ve_layers" and have[k] != want[k]]
    if wrong:
        raise UsageError(f"--init-from does not fit: {', '.join(wrong)}; use its own flags and data")
    return ckpt


def resume_point(args):
    """--resume: the run's latest checkpoint and the flags it began with; (None, args) if it finished."""
    if os.path.exists(os.path.join(args.out_dir, "final.pt")):
        return None, args
    paths = [os.path.join(args.out_dir, n) for n in CHECKPOINTS[1:]]
    found = [load_checkpoint(p) for p in paths if os.path.exists(p)]
    if not found:
        raise UsageError(f"nothing to resume in {args.out_dir}: start runs with --save-every N")
    ckpt = max(found, key=lambda c: (c["phase"] != "shallow", c["step"]))  # a later phase, then a later step
    # the machine's settings come from this command, everything else from the run's own flags; flags added
    # since the checkpoint was written take their defaults
    machine = {k: getattr(args, k) for k in ("device", "compile", "dtype", "out_dir", "plan")}
    defaults = vars(get_parser().parse_args([]))
    return ckpt, argparse.Namespace(**{**defaults, **ckpt["args"], **machine, "resume": True})


def check_run_dir(args):
    """Refuse to mix a new run into a folder holding another one, finished or not, without --overwrite."""
    init_dir = os.path.dirname(os.path.abspath(args.init_from or ""))
    if args.init_from and os.path.realpath(init_dir) == os.path.realpath(args.out_dir):
        raise UsageError(f"--init-from {args.init_from} lies in the --out-dir this run clears: use another")
    found = [name for name in CHECKPOINTS if os.path.exists(os.path.join(args.out_dir, name))]
    if found and not (args.resume or args.overwrite):  # a folder without checkpoints has nothing to lose
        which = "a finished run" if "final.pt" in found else "an unfinished run (--resume continues it)"
        raise UsageError(f"{args.out_dir} holds {which}: pass --overwrite or choose another --out-dir")


def code_commit():
    """The git commit of this code ("+dirty" with uncommitted changes): a run names the code that made it."""
    command = ["git", "describe", "--always", "--dirty=+dirty", "--abbrev=40", "--exclude=*"]  # no tag names
    try:
        described = subprocess.run(command, capture_output=True, text=True, timeout=10,
                                   cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.TimeoutExpired):  # no git here
        return None
    return described.stdout.strip() if described.returncode == 0 else None


def prepare_run_dir(args, metrics_lines):
    """Save the config; cut a resumed run's metrics back to its checkpoint, or start afresh."""
    path = os.path.join(args.out_dir, "metrics.jsonl")
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        kept = open(path).readlines()[:metrics_lines] if args.resume and os.path.exists(path) else []
        for name in [] if args.resume else CHECKPOINTS:
            if os.path.exists(os.path.join(args.out_dir, name)):
                os.remove(os.path.join(args.out_dir, name))
        config = json.dumps({**vars(args), "code_commit": code_commit()}, indent=2)
        write_atomic(os.path.join(args.out_dir, "config.json"), lambda f: f.write(config.encode()))
        write_atomic(path, lambda f: f.write("".join(kept).encode()))
    except OSError as e:
        raise UsageError(f"cannot write the run folder {args.out_dir} ({e.strerror}): choose another")


class MetricsLog:
    """Prints the log's lines and appends their records to metrics.jsonl (rank 0 only), counting them."""

    def __init__(self, path, lines):
        self.path, self.lines = path, lines  # lines: records written (a checkpoint keeps it, for --resume)

    def __call__(self, line=None, **record):
        if rank() != 0:
            return
        if line:
            print(line, flush=True)
        if record:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise UsageError(f"cannot write to {self.path} ({e.strerror or e}): fix it, then --resume")
            self.lines += 1


def keep_freed_memory(args):
    """
    CPU runs under glibc: keep freed memory instead of handing big buffers back to the OS and mapping
    them again every step (about 1.45x faster, experiments.md). Thresholds as C ints: 2**32 would be 0.
    """
    if args.device != "cpu" or platform.libc_ver()[0] != "glibc":  # musl, macOS, Windows: other allocators
        return
    libc = ctypes.CDLL("libc.so.6")  # mallopt's options (malloc.h): M_MMAP_THRESHOLD -3, M_TRIM_THRESHOLD -1,
    if libc.mallopt(-3, 2**30):  # M_TOP_PAD -2; a glibc that refuses so high a threshold keeps its defaults
        for option, value in ((-1, 2**31 - 1), (-2, 2**30)):
            libc.mallopt(option, value)


# Several processes under torchrun: one data-parallel replica each. They start from the same seed, so
# they build the same weights; only rank 0 prints and writes files. Should it fail, torchrun stops the rest.

def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def setup_distributed(device):
    """Under torchrun (which sets RANK and WORLD_SIZE) join the process group: NCCL on GPUs, gloo on CPU."""
    if "RANK" not in os.environ:
        return
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")


def average_gradients(model, world):
    """Every rank ends up with the mean of all ranks' gradients (each rank saw its own rows of the batch)."""
    if world > 1:
        grads = [p.grad for p in model.parameters()]
        for g in grads:
            dist.all_reduce(g)  # a sum over ranks (with NCCL these calls queue on the GPU and return at once)
        torch._foreach_div_(grads, world)


def check_replicas_agree(model):
    """A cheap guard at the end of each phase: every rank must hold the same weights, bit for bit."""
    if world_size() > 1:
        sums = torch.stack([p.detach().float().sum() for p in model.parameters()])
        gathered = [torch.empty_like(sums) for _ in range(world_size())]
        dist.all_gather(gathered, sums)
        assert all(torch.equal(g, gathered[0]) for g in gathered), "the ranks' weights diverged"


if __name__ == "__main__":
    main()
