"""
Tests for stack_gpt.py (and its sg.py and sg.py) and prepare_data.py, in the order of
stack_gpt.py: model, optimizer, schedules, stacking, planning, whole runs (with the golden metrics),
flags, machinery, the GPU path, reports; then prepare_data.py. CPU only, no network, under 2
minutes on 2 cores:
    python -m pytest test_stack_gpt.py
CUDA tests run only where a GPU is visible.
"""

import ast
import base64
import gc
import http.server
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
import types
import warnings
import weakref

import numpy as np
import pytest
import regex
import torch

import prepare_data
import stack_gpt as sg

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "experiments"))
import sweeps  # noqa: E402  (experiments/sweeps.py: its statistics are tested with the reports)
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
RUN_TIMEOUT = 600  # seconds for a tiny run in a subprocess: a guard against a hang, generous for a machine under load


def tiny_config(n_layer=3, n_head=2, n_embd=64, vocab_size=100, sequence_len=16, ve_layers=None):
    ve = sg.default_ve_layers(n_layer) if ve_layers is None else ve_layers
    return sg.GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size, sequence_len=sequence_len, ve_layers=ve)


def trained_looking(config, seed=0):
    """A model whose weights are all non-trivial (the real init zeroes the output projections and gates)."""
    torch.manual_seed(seed)
    model = sg.GPT(config)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def block_output(model, i, x, x0, idx):
    """Layer i of `model` as a function: its lambda mixing plus the block."""
    T = idx.size(1)
    h = model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0
    return model.blocks[i](h, idx, model.cos[:, :T], model.sin[:, :T])


def comparable(records):
    """The records that must repeat exactly, without the timings."""
    timing = ("dt", "tok_per_s", "mfu", "elapsed", "wall_time")
    return [{k: v for k, v in r.items() if k not in timing} for r in records if r["kind"] in ("train", "eval", "summary")]


# -----------------------------------------------------------------------------
# Model

def test_value_embedding_layers_follow_nanochat_rule():
    assert sg.default_ve_layers(12) == (1, 3, 5, 7, 9, 11)
    assert sg.default_ve_layers(5) == (0, 2, 4)
    model = sg.GPT(tiny_config(n_layer=4))
    assert [b.attn.value_embed is not None for b in model.blocks] == [False, True, False, True]


def test_model_sizing_matches_nanochat():
    args = types.SimpleNamespace(aspect_ratio=64, head_dim=128, seq_len=2048)
    d12 = sg.model_config(12, 12, args, 32768)
    assert (d12.n_embd, d12.n_head) == (768, 6)
    d6s12 = sg.model_config(6, 12, args, 32768)
    assert (d6s12.n_layer, d6s12.n_embd, d6s12.n_head) == (6, 768, 6)
    d5 = sg.model_config(5, 5, args, 32768)
    assert d5.n_embd == 384  # 5*64 = 320 rounded up to a multiple of 128


def test_init_weights_covers_every_parameter():
    torch.manual_seed(0)
    model = sg.GPT(tiny_config(n_layer=2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.init_weights()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    assert model.wte.weight.std().item() == pytest.approx(1.0, rel=0.1)
    assert model.blocks[0].attn.c_proj.weight.abs().sum() == 0
    assert torch.equal(model.x0_lambdas, torch.full((2,), 0.1))


def test_padded_vocab_and_logits_shape():
    model = trained_looking(tiny_config(vocab_size=100))
    assert model.wte.weight.shape[0] == 128 and model.lm_head.weight.shape[0] == 128
    logits = model(torch.randint(0, 100, (2, 16)))
    assert logits.shape == (2, 16, 100)
    assert logits.abs().max() <= sg.SOFTCAP


def test_flops_per_token_hand_count():
    c = tiny_config(n_layer=3, n_head=2, n_embd=64, vocab_size=100, sequence_len=16)
    model = sg.GPT(c)
    per_layer_matrices = 4 * 64 * 64 + 2 * 64 * 256  # q, k, v, proj; fc and its proj
    ve_gates = 2 * 32 * 2  # layers 0 and 2 have a gate of 32 -> n_head
    lm_head = 128 * 64  # padded vocab
    scaling = 3 * per_layer_matrices + ve_gates + lm_head
    assert model.param_counts()["scaling"] == scaling
    assert model.flops_per_token() == 6 * scaling + 3 * 12 * 2 * 32 * 16


def test_bits_per_byte_hand_computation():
    model = trained_looking(tiny_config(vocab_size=100, sequence_len=8))
    token_bytes = torch.randint(1, 5, (100,))
    token_bytes[7] = 0  # a special token: left out
    x = torch.randint(0, 100, (2, 8))
    y = torch.randint(0, 100, (2, 8))
    y[0, 0] = 7
    bpb = sg.evaluate_bpb(model, [(x, y)], token_bytes, sg.nullcontext())
    logp = torch.log_softmax(model(x), dim=-1)
    nats = bytes_ = 0.0
    for b in range(2):
        for t in range(8):
            n = token_bytes[y[b, t]].item()
            if n:
                nats -= logp[b, t, y[b, t]].item()
                bytes_ += n
    assert bpb == pytest.approx(nats / (math.log(2) * bytes_), rel=1e-5)


def test_causal_model_ignores_future_tokens():
    model = trained_looking(tiny_config())
    idx = torch.randint(0, 100, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 100
    assert torch.allclose(model(idx)[0, :10], model(changed)[0, :10], atol=1e-6)



# The forward pass piece by piece, each against a few lines of plain torch written here

def captured_attention_inputs(monkeypatch):
    """The q, k, v that every attention call hands to scaled_dot_product_attention, call by call."""
    seen, real = [], sg.F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q, k, v))
        return real(q, k, v, **kw)
    monkeypatch.setattr(sg.F, "scaled_dot_product_attention", spy)
    return seen


def test_rotary_scores_depend_only_on_relative_position():
    """Rotary: q.k after rotation depends on the distance between positions, not where the pair sits."""
    torch.manual_seed(0)
    cos, sin = sg.rotary_tables(64, 32)
    q0, k0 = torch.randn(32), torch.randn(32)
    q, k = q0.expand(1, 64, 1, 32), k0.expand(1, 64, 1, 32)  # the same vectors at every position
    rq, rk = sg.apply_rotary(q, cos, sin)[0, :, 0], sg.apply_rotary(k, cos, sin)[0, :, 0]
    scores = rq @ rk.T  # scores[i, j] = q at position i . k at position j
    scale = q0.norm() * k0.norm()
    for distance in (0, 1, 5, 20):
        along = torch.diagonal(scores, offset=-distance)  # every pair (i, i - distance)
        assert (along.max() - along.min()) / scale < 0.005, distance  # bf16 tables: 1.1e-3 measured here
    assert (scores[10, 0] - scores[10, 9]).abs() / scale > 0.05  # and the distance does matter (0.12)
    assert torch.allclose(rq.norm(dim=-1), q0.norm().expand(64), rtol=0.01)  # a rotation keeps lengths


def test_attention_against_a_reference(monkeypatch):
    """
    One attention layer by hand: q and k rotated, then RMS-normalised per head, causal softmax of
    q k^T / sqrt(head_dim), and a fresh value-embedding gate (2 sigmoid(0) = 1) adding its table to v.
    """
    torch.manual_seed(0)
    config = tiny_config(n_layer=1, n_head=2, n_embd=64, sequence_len=8)  # layer 0 has a value embedding
    model = sg.GPT(config)
    model.init_weights()
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.c_proj.weight.normal_()  # zero at init: the output would say nothing
    x, idx = torch.randn(2, 8, 64), torch.randint(0, 100, (2, 8))
    seen = captured_attention_inputs(monkeypatch)
    out = attn(x, idx, model.cos[:, :8], model.sin[:, :8])
    B, T, H, D = 2, 8, 2, 32
    heads = lambda t: t.view(B, T, H, D)  # noqa: E731
    q, k = heads(attn.c_q(x)), heads(attn.c_k(x))
    v = heads(attn.c_v(x) + attn.value_embed(idx))  # the fresh gate: weight 1
    q, k = (sg.apply_rotary(t, model.cos[:, :8], model.sin[:, :8]) for t in (q, k))
    q, k = (t / t.pow(2).mean(-1, keepdim=True).add(torch.finfo(t.dtype).eps).sqrt() for t in (q, k))
    assert torch.allclose(seen[0][0].pow(2).mean(-1), torch.ones(B, H, T), atol=1e-4)  # unit RMS per head
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(B, T, H * D)
    assert torch.allclose(out, attn.c_proj(y), rtol=1e-4, atol=1e-5)


def test_mlp_and_logits_against_a_reference():
    """The MLP's hidden activation is relu(x)^2; the logits are 15 tanh(z / 15) of the head's output z."""
    model = trained_looking(tiny_config())
    x = torch.randn(2, 16, 64)
    mlp = model.blocks[0].mlp
    assert torch.allclose(mlp(x), mlp.c_proj(torch.relu(mlp.c_fc(x)) ** 2), rtol=1e-5, atol=1e-6)
    heads = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: heads.append(output))
    idx = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        model.lm_head.weight.mul_(200)  # logits well past the softcap, where tanh bends
        logits = model(idx)
    z = heads[0][..., :100]
    assert z.abs().max() > 30
    assert torch.allclose(logits, 15 * torch.tanh(z / 15), rtol=1e-5, atol=1e-5)


def test_forward_mixes_each_layer_input_with_the_embedding():
    """The whole forward pass by hand: x0 = norm(wte(idx)); before layer i, x = resid_lambdas[i] x +
    x0_lambdas[i] x0; then the blocks (pinned above), the final norm, the head and the softcap."""
    model = trained_looking(tiny_config())
    idx = torch.randint(0, 100, (2, 16))
    T = idx.size(1)
    rms = lambda t: t / t.pow(2).mean(-1, keepdim=True).add(torch.finfo(t.dtype).eps).sqrt()  # noqa: E731
    with torch.no_grad():
        x = x0 = rms(model.wte(idx))
        for i, block in enumerate(model.blocks):
            x = block(model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0, idx, model.cos[:, :T], model.sin[:, :T])
        logits = 15 * torch.tanh(model.lm_head(rms(x))[..., :100] / 15)
        assert torch.allclose(model(idx), logits, rtol=1e-5, atol=1e-5), "the forward pass's composition"


# -----------------------------------------------------------------------------
# Optimizer

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(4, 64, 256), (4, 256, 64), (2, 96, 96)])
def test_polar_express_singular_values_near_one(shape, dtype):
    """Singular values spread over two decades all come out in a narrow band around 1, in either precision."""
    torch.manual_seed(0)
    n, rows, cols = shape
    k = min(rows, cols)
    U, V = torch.linalg.qr(torch.randn(n, rows, k))[0], torch.linalg.qr(torch.randn(n, cols, k))[0]
    G = U @ torch.diag_embed(torch.logspace(-2, 0, k).expand(n, k)) @ V.mT
    X = sg.polar_express(G, dtype)
    assert X.shape == G.shape and X.dtype == dtype
    S = torch.linalg.svdvals(X.float())
    assert S.min() > 0.8 and S.max() < 1.2, (S.min(), S.max())


def spy_on_polar_express(monkeypatch):
    """The dtypes Polar Express computes in, call by call."""
    seen, real = [], sg.polar_express
    def recording(G, dtype):
        X = real(G, dtype)
        seen.append(X.dtype)
        return X
    monkeypatch.setattr(sg, "polar_express", recording)
    return seen


def test_cpu_runs_everything_in_fp32_by_default(monkeypatch):
    """Many CPUs have no native bf16: emulated, Polar Express alone made a training step 3x slower."""
    args = sg.resolve_args(["--device", "cpu"])
    model = sg.empty_model(tiny_config(), "cpu", sg.PRECISIONS[args.dtype])
    optimizer = sg.build_optimizer(model, args, 2**19, 0.1)
    seen = spy_on_polar_express(monkeypatch)
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long)).backward()
    optimizer.step()
    assert args.dtype == "fp32" and seen and set(seen) == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_adamw_group_matches_torch_adamw():
    torch.manual_seed(0)
    ours, ref = torch.nn.Parameter(torch.randn(5, 7)), torch.nn.Parameter(torch.randn(5, 7))
    with torch.no_grad():
        ref.copy_(ours)
    opt = sg.MuonAdamW([dict(kind="adamw", params=[ours], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)], torch.float32)
    ref_opt = torch.optim.AdamW([ref], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn(5, 7)
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-7)


def optimizer_args(**kw):
    return types.SimpleNamespace(**{**dict(matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.004, scalar_lr=0.5, lr_scale=1.0, dtype="fp32"), **kw})


def test_optimizer_groups_take_nanochat_lrs():
    # (that every parameter is in exactly one group is build_optimizer's own assert, checked on every run)
    model = sg.GPT(tiny_config(n_layer=4, n_embd=192, n_head=3))
    opt = sg.build_optimizer(model, optimizer_args(), batch_size=2**17, weight_decay=0.1)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    batch, width = 0.5, (192 / 768) ** -0.5  # sqrt(2^17 / 2^19), 1/sqrt(192/768)
    assert by_param[id(model.lm_head.weight)]["lr"] == pytest.approx(0.004 * width * batch)
    assert by_param[id(model.wte.weight)]["lr"] == pytest.approx(0.3 * width * batch)
    assert by_param[id(model.blocks[1].attn.value_embed.weight)]["lr"] == pytest.approx(0.3 * width * batch)
    assert by_param[id(model.resid_lambdas)]["lr"] == pytest.approx(0.005 * batch)
    assert by_param[id(model.x0_lambdas)]["betas"] == (0.96, 0.95)
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    assert {p.shape for g in muon for p in g["params"]} == {(192, 192), (768, 192), (192, 768), (3, 32)}
    assert all(g["lr"] == pytest.approx(0.02 * batch) and g["weight_decay"] == 0.1 for g in muon)


def test_lr_scale_multiplies_every_group():
    model = sg.GPT(tiny_config())
    plain, scaled = (sg.build_optimizer(model, optimizer_args(lr_scale=k), 2**17, 0.1) for k in (1.0, 2.5))
    assert [g["lr"] for g in scaled.param_groups] == pytest.approx([2.5 * g["lr"] for g in plain.param_groups])


def test_muon_step_direction_and_cautious_decay():
    """With momentum 0 and no decay, a Muon step moves each matrix by lr * (an orthogonal-ish matrix)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 64))
    start = p.detach().clone()
    p.grad = torch.randn(32, 64)
    opt = sg.MuonAdamW([dict(kind="muon", params=[p], lr=0.1, momentum=0.0, beta2=0.95, weight_decay=0.0)], torch.float32)
    opt.step()
    step = (start - p.detach()) / 0.1
    S = torch.linalg.svdvals(step)
    assert (p.grad.flatten() @ step.flatten()) > 0  # a descent direction
    assert 0.5 < S.mean() < 1.5
    # cautious weight decay only shrinks entries whose update agrees in sign with the weight
    q = torch.nn.Parameter(torch.ones(8, 8))
    q.grad = torch.zeros(8, 8)
    q.grad[0, 0] = 1.0
    opt = sg.MuonAdamW([dict(kind="muon", params=[q], lr=0.01, momentum=0.0, beta2=0.95, weight_decay=1.0)], torch.float32)
    opt.step()
    assert q[0, 0] < 1.0 - 0.01  # update and decay both pull it down



def muon_reference_updates(grads, momentum, beta2):
    """Muon's normalised updates for a gradient sequence, by hand: Nesterov momentum, Polar Express (pinned
    above), then NorMuon's running mean of the squared update per row (tall, square) or column (wide)."""
    rows, cols = grads[0].shape
    buf, variance, out = torch.zeros(rows, cols), torch.zeros((rows, 1) if rows >= cols else (1, cols)), []
    for g in grads:
        buf = momentum * buf + (1 - momentum) * g
        o = sg.polar_express((g + momentum * (buf - g))[None], torch.float32)[0]
        variance = beta2 * variance + (1 - beta2) * o.square().mean(dim=1 if rows >= cols else 0, keepdim=True)
        scaled = o / variance.clamp_min(1e-10).sqrt()
        out.append((scaled * o.norm() / scaled.norm(), variance))
    return out


@pytest.mark.parametrize("shape", [(12, 6), (6, 12), (8, 8)])
def test_normuon_variance_is_the_running_mean_of_squared_updates(shape):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(*shape))
    opt = sg.MuonAdamW([dict(kind="muon", params=[p], lr=0.01, momentum=0.9, beta2=0.95, weight_decay=0.0)], torch.float32)
    grads = [torch.randn(*shape) for _ in range(5)]
    for g in grads:
        p.grad = g.clone()
        opt.step()
    _, variance = muon_reference_updates(grads, 0.9, 0.95)[-1]
    assert torch.allclose(opt.state[p]["variance"], variance, rtol=1e-4), "NorMuon's variance: beta2 = 0.95 mean of o^2"


@pytest.mark.parametrize("shape,lr_factor", [((12, 3), 2.0), ((3, 12), 1.0), ((6, 6), 1.0)])
def test_muon_step_size_follows_the_matrix_shape(shape, lr_factor):
    """A tall matrix steps sqrt(rows / cols) times the base LR (the same RMS per output); wide and square ones
    take the base LR."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(*shape))
    start = p.detach().clone()
    p.grad = torch.randn(*shape)
    opt = sg.MuonAdamW([dict(kind="muon", params=[p], lr=0.01, momentum=0.0, beta2=0.95, weight_decay=0.0)], torch.float32)
    opt.step()
    update, _ = muon_reference_updates([p.grad], 0.0, 0.95)[0]
    assert torch.allclose(start - p.detach(), 0.01 * lr_factor * update, rtol=1e-4, atol=1e-7), "Muon's LR by shape"


# -----------------------------------------------------------------------------
# Schedules

def test_lr_multiplier_boundaries():
    lrm = sg.lr_multiplier
    # nanochat default: warmdown 0.5 of 100 steps -> flat through step 50, then linear to 0 at 100
    assert [lrm(s, 100, 0.0, 0.5, 0.0) for s in (0, 50)] == [1.0, 1.0]
    assert lrm(51, 100, 0.0, 0.5, 0.0) == pytest.approx(49 / 50)
    assert lrm(100, 100, 0.0, 0.5, 0.0) == 0.0
    # warmdown 0: constant; warmdown 1: decay starts at once
    assert all(lrm(s, 100, 0.0, 0.0, 0.0) == 1.0 for s in range(101))
    assert lrm(0, 100, 0.0, 1.0, 0.0) == 1.0 and lrm(1, 100, 0.0, 1.0, 0.0) == pytest.approx(0.99)
    # warmdown 2.0 starts half-way down; a final fraction is the floor
    assert lrm(0, 100, 0.0, 2.0, 0.0) == pytest.approx(0.5)
    assert lrm(100, 100, 0.0, 0.5, 0.1) == pytest.approx(0.1)
    # warmup
    assert [lrm(s, 100, 0.1, 0.5, 0.0) for s in (0, 9, 10)] == [pytest.approx(0.1), 1.0, 1.0]
    # warmup inside a warmdown of 1.0: the lower ramp wins, so the LR rises to where the decay is, then follows it
    overlapping = [lrm(s, 100, 0.2, 1.0, 0.0) for s in range(101)]
    assert overlapping[:5] == [pytest.approx((s + 1) / 20) for s in range(5)]
    assert max(overlapping) == pytest.approx(0.84)  # step 16: warmup would give 0.85, the decay gives 84/100
    assert max(abs(a - b) for a, b in zip(overlapping, overlapping[1:])) <= 1 / 20 + 1e-12  # no jump


def test_momentum_and_weight_decay_schedules():
    assert sg.muon_momentum(0) == pytest.approx(0.85)
    assert sg.muon_momentum(150) == pytest.approx(0.90)
    assert sg.muon_momentum(300) == sg.muon_momentum(5000) == pytest.approx(0.95)
    assert sg.weight_decay_at(0, 10, 0.2) == 0.2 and sg.weight_decay_at(5, 10, 0.2) == pytest.approx(0.1)
    assert sg.weight_decay_at(10, 10, 0.2) == 0.0


# -----------------------------------------------------------------------------
# Stacking

@pytest.mark.parametrize("depth,growth", [(2, 2), (3, 2), (3, 3), (2, 4), (5, 2), (1, 3)])
def test_stacking_copies_every_tensor_to_its_place(depth, growth):
    shallow = trained_looking(tiny_config(n_layer=depth))
    deep = sg.stack_model(shallow, growth)
    assert deep.config.n_layer == depth * growth
    s, d = shallow.state_dict(), deep.state_dict()
    for j in range(depth * growth):
        source = j % depth
        block_keys = [k for k in s if k.startswith(f"blocks.{source}.")]
        assert len(block_keys) == len([k for k in d if k.startswith(f"blocks.{j}.")])
        for k in block_keys:
            assert torch.equal(d[f"blocks.{j}." + k.split(".", 2)[2]], s[k])
        assert d["resid_lambdas"][j] == s["resid_lambdas"][source]
        assert d["x0_lambdas"][j] == s["x0_lambdas"][source]
    for k in ("wte.weight", "lm_head.weight"):
        assert torch.equal(d[k], s[k])
    # the copies are independent tensors, not views of one another
    assert deep.blocks[0].attn.c_q.weight.data_ptr() != deep.blocks[depth].attn.c_q.weight.data_ptr()


@pytest.mark.parametrize("depth,growth", [(3, 2), (2, 3), (3, 4)])
def test_each_copy_computes_its_source_function(depth, growth):
    """Odd depths included: nanochat's value-embedding rule would move the tables; stacking must not."""
    shallow = trained_looking(tiny_config(n_layer=depth))
    deep = sg.stack_model(shallow, growth)
    torch.manual_seed(1)
    idx = torch.randint(0, 100, (2, 16))
    x, x0 = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    with torch.no_grad():
        for j in range(depth * growth):
            assert torch.equal(block_output(deep, j, x, x0, idx), block_output(shallow, j % depth, x, x0, idx))


def test_stacked_model_trains_from_fresh_optimizer():
    shallow = trained_looking(tiny_config(n_layer=2))
    deep = sg.stack_model(shallow, 2)
    opt = sg.build_optimizer(deep, optimizer_args(), 2**19, 0.1)
    assert all(not opt.state[p] for p in deep.parameters())
    loss = deep(torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16)))
    loss.backward()
    opt.step()
    assert all(opt.state[p] for p in deep.parameters())


def test_layer_maps_of_stack_and_interleave():
    assert sg.growth_layer_map(3, 2, "stack") == [0, 1, 2, 0, 1, 2]
    assert sg.growth_layer_map(3, 2, "interleave") == [0, 0, 1, 1, 2, 2]
    assert sg.growth_layer_map(2, 3, "interleave") == [0, 0, 0, 1, 1, 1]
    assert sg.growth_layer_map(2, 3, "identity") == sg.growth_layer_map(2, 3, "random") == [0, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("depth,growth", [(3, 2), (2, 3)])
def test_interleave_places_each_copy_next_to_its_source(depth, growth):
    shallow = trained_looking(tiny_config(n_layer=depth))
    deep = sg.stack_model(shallow, growth, "interleave")
    for j in range(depth * growth):
        source = j // growth
        assert torch.equal(deep.blocks[j].attn.c_q.weight, shallow.blocks[source].attn.c_q.weight)
        assert (deep.blocks[j].attn.value_embed is None) == (shallow.blocks[source].attn.value_embed is None)
        assert deep.x0_lambdas[j] == shallow.x0_lambdas[source]


@pytest.mark.parametrize("growth", [2, 3])
def test_identity_growth_keeps_the_logits(growth):
    shallow = trained_looking(tiny_config(n_layer=3))
    deep = sg.stack_model(shallow, growth, "identity")
    idx = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        assert torch.allclose(deep(idx), shallow(idx), rtol=0, atol=1e-5)
        assert not torch.allclose(sg.stack_model(shallow, growth, "stack")(idx), shallow(idx), atol=1e-3)
    for j in range(3, 3 * growth):  # the copies keep their source's other weights
        assert torch.equal(deep.blocks[j].attn.c_q.weight, shallow.blocks[j % 3].attn.c_q.weight)


def test_identity_growth_writes_what_the_shallow_model_wrote():
    """The text samples in eager fp32: the same seed draws the same tokens, another seed others, and a model
    grown by --grow identity computes the shallow model's function, so it writes the same text."""
    shallow = trained_looking(tiny_config(n_layer=2))
    sample = shallow.generate([1, 2, 3], 24, temperature=0.8, top_k=20, seed=5)  # past sequence_len 16: cropped
    assert len(sample) == 24 and all(0 <= i < 100 for i in sample)
    assert shallow.generate([1, 2, 3], 24, temperature=0.8, top_k=20, seed=5) == sample
    assert shallow.generate([1, 2, 3], 24, temperature=0.8, top_k=20, seed=6) != sample
    identity, stacked = sg.stack_model(shallow, 2, "identity"), sg.stack_model(shallow, 2, "stack")
    before = torch.get_rng_state()
    assert identity.generate([1, 2, 3], 24, 0.8, 20, seed=5) == sample
    assert stacked.generate([1, 2, 3], 24, 0.8, 20, seed=5) != sample
    assert torch.equal(torch.get_rng_state(), before)  # sampling leaves training's random state alone
    top_1 = shallow.generate([1, 2, 3], 1, top_k=1)  # only the most likely token can be drawn
    with torch.no_grad():
        assert top_1 == [shallow(torch.tensor([[1, 2, 3]]))[0, -1].argmax().item()]


def test_random_growth_keeps_sources_and_inits_new_layers_like_a_deep_model():
    shallow = trained_looking(tiny_config(n_layer=2, n_embd=256, n_head=4))
    torch.manual_seed(3)
    deep = sg.stack_model(shallow, 3, "random")
    s = (3 / 256) ** 0.5
    for j in range(2):
        assert torch.equal(deep.blocks[j].mlp.c_fc.weight, shallow.blocks[j].mlp.c_fc.weight)
        assert deep.x0_lambdas[j] == shallow.x0_lambdas[j]
    for j in range(2, 6):
        w = deep.blocks[j].mlp.c_fc.weight
        assert w.abs().max() <= s and w.std().item() == pytest.approx(256 ** -0.5, rel=0.02)
        assert not torch.equal(w, shallow.blocks[j % 2].mlp.c_fc.weight)
        assert deep.blocks[j].attn.c_proj.weight.abs().sum() == 0
        assert (deep.resid_lambdas[j].item(), deep.x0_lambdas[j].item()) == (1.0, pytest.approx(0.1))
    assert torch.equal(deep.wte.weight, shallow.wte.weight)


@pytest.mark.parametrize("grow", ["stack", "interleave"])
def test_carry_gives_every_copy_its_source_optimizer_state(grow):
    shallow = trained_looking(tiny_config(n_layer=2))
    shallow_opt = sg.build_optimizer(shallow, optimizer_args(), 2**19, 0.1)
    for _ in range(2):
        shallow(torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))).backward()
        shallow_opt.step()
        shallow.zero_grad()
    deep = sg.stack_model(shallow, 2, grow)
    reset = sg.build_optimizer(deep, optimizer_args(), 2**19, 0.1)
    assert all(not reset.state[p] for p in deep.parameters())
    carried = sg.build_optimizer(deep, optimizer_args(), 2**19, 0.1)
    layer_map = sg.growth_layer_map(2, 2, grow)
    sg.carry_optimizer_state(shallow, shallow_opt, deep, carried, layer_map)
    for j, source in enumerate(layer_map):
        for name in ("attn.c_q.weight", "mlp.c_proj.weight"):
            mine = carried.state[deep.get_parameter(f"blocks.{j}.{name}")]
            theirs = shallow_opt.state[shallow.get_parameter(f"blocks.{source}.{name}")]
            assert torch.equal(mine["momentum"], theirs["momentum"]) and torch.equal(mine["variance"], theirs["variance"])
            assert mine["momentum"].data_ptr() != theirs["momentum"].data_ptr()
    lambdas = carried.state[deep.x0_lambdas]
    assert lambdas["step"] == 2 and torch.equal(lambdas["exp_avg"], shallow_opt.state[shallow.x0_lambdas]["exp_avg"][layer_map])
    assert torch.equal(carried.state[deep.wte.weight]["exp_avg_sq"], shallow_opt.state[shallow.wte.weight]["exp_avg_sq"])
    loss = deep(torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16)))
    loss.backward()
    carried.step()  # the carried state has the shapes the optimizer expects


# -----------------------------------------------------------------------------
# Planning: horizons and the FLOPs budget

def plan_args(argv, vocab_size=32768):
    args = sg.resolve_args(argv + ["--device", "cpu"])
    return args, sg.plan_phases(args, vocab_size)


def test_default_stacked_run_spends_the_baseline_budget():
    _, (baseline,) = plan_args(["--depth", "12"])
    _, (shallow, deep) = plan_args(["--depth", "6", "--stack-to", "12"])
    assert baseline.batch_size == shallow.batch_size == deep.batch_size == 2**19  # nanochat's d12 batch
    assert shallow.flops + deep.flops == pytest.approx(baseline.flops, rel=0.01)
    # The write-up's step counts: d12 at ratio 10.5 is 2205 steps, its deep phase after d6s12 at 3.25 is 1953.
    # (Its 9.27e17 FLOPs and 0.60 FLOPs ratio counted nanochat's default sliding windows; we use full
    # attention, which costs more per token: 8.87e8 instead of 8.02e8 at d12, and a ratio of 0.585.)
    assert baseline.steps == 2205
    assert deep.steps == pytest.approx(1953, abs=10)
    assert baseline.flops_per_token == pytest.approx(8.87e8, rel=1e-3)
    assert shallow.flops_per_token / deep.flops_per_token == pytest.approx(0.585, abs=0.002)
    assert (shallow.warmdown_ratio, deep.warmdown_ratio, baseline.warmdown_ratio) == (0.0, 1.0, 0.5)
    assert baseline.weight_decay == pytest.approx(0.2) and shallow.weight_decay > 0.2  # wd grows as the model shrinks


def test_gpt2_vocab_plan_matches_the_readme():
    # README's numbers for data/fineweb-edu (GPT-2 tokens): the bigger lm_head lengthens every horizon
    _, (baseline,) = plan_args(["--depth", "12"], vocab_size=50257)
    _, (shallow, deep) = plan_args(["--depth", "6", "--stack-to", "12"], vocab_size=50257)
    assert baseline.flops_per_token == pytest.approx(9.68e8, rel=1e-3)
    assert baseline.flops == pytest.approx(1.26e18, rel=5e-3)
    assert (baseline.steps, shallow.steps, deep.steps) == (2474, 502, 2163)
    assert shallow.flops_per_token / deep.flops_per_token == pytest.approx(0.620, abs=5e-4)


def test_a_stacked_plan_states_its_cheap_token_ceiling():
    """
    By hand, Part 2's d2s4 -> d4 growing after 20% of the budget (width 128, 4 heads of 32, T 256, vocab 2048):
    a block's matrices hold 4 * 128^2 + 2 * 128 * 512 = 196,608 weights, the head 2048 * 128, a value
    embedding's gate 4 * 32, and attention adds 12 * 128 * 256 FLOPs a layer. If every token taught alike,
    the 896 shallow steps would save what their tokens cost less than deep ones, against the whole budget.
    """
    family = ["--aspect-ratio", "32", "--head-dim", "32", "--seq-len", "256", "--device-batch-size", "16",
              "--total-batch-size", "4096"]
    args, (shallow, deep) = plan_args(["--depth", "2", "--stack-to", "4", "--grow-at", "0.2"] + family, 2048)
    f_shallow = 6 * (2 * 196_608 + 2048 * 128 + 1 * 128) + 12 * 128 * 256 * 2  # one value-embedding layer
    f_deep = 6 * (4 * 196_608 + 2048 * 128 + 2 * 128) + 12 * 128 * 256 * 4  # two
    assert (shallow.steps, shallow.flops_per_token, deep.flops_per_token) == (896, f_shallow, f_deep)
    budget = 4096 * (896 * f_shallow + deep.steps * f_deep)
    ceiling = 896 * 4096 * (f_deep - f_shallow) / budget
    assert sg.cheap_token_ceiling(shallow, deep, budget) == pytest.approx(ceiling, rel=1e-12)
    assert round(ceiling, 4) == 0.1334 and round(ceiling / (1 - ceiling), 4) == 0.1539  # saving, speedup
    plan = sg.describe_plan([shallow, deep], args, {"train_tokens": 19_464_830})
    assert "growth after 20.0% of the FLOPs | cheap-token ceiling 13.3% saved (speedup 15.4%)" in plan
    assert plan.startswith("shallow: 2 layers x 128 wide, 4 heads | 896 steps x 4,096 tokens | ")
    d1_args, d1 = plan_args(["--depth", "1"] + family, 2048)
    assert ": 1 layer x 32 wide, 1 head | " in sg.describe_plan(d1, d1_args, {"train_tokens": 1})
    baseline_args, baseline = plan_args(["--depth", "4"] + family, 2048)
    assert "ceiling" not in sg.describe_plan(baseline, baseline_args, {"train_tokens": 1})
    # growth after 80%: the shallow phase alone reads more tokens than the baseline's whole run, so it gets there
    # first, having paid f_shallow / f_deep of the baseline's compute
    args, (shallow, deep) = plan_args(["--depth", "2", "--stack-to", "4", "--grow-at", "0.8"] + family, 2048)
    assert shallow.steps == 3584 > baseline[0].steps == 2688
    assert sg.cheap_token_ceiling(shallow, deep, baseline[0].flops) == pytest.approx(1 - f_shallow / f_deep, rel=1e-12)
    assert "cheap-token ceiling 40.0% saved (speedup 66.7%)" in sg.describe_plan([shallow, deep], args, {"train_tokens": 1})


def announced(phases, args, speed, monkeypatch, train_tokens=3_423_110):
    """announce_plan at a faked speed: (its estimate in seconds or the UsageError it raised, what it printed)."""
    monkeypatch.setattr(sg, "measure_flops_per_second", lambda config, args: speed)
    printed = []
    try:
        result = sg.announce_plan(phases, args, {"train_tokens": train_tokens}, 131072, printed.append)
    except sg.UsageError as e:
        result = e
    return result, "\n".join(printed)


def test_a_gpu_sized_plan_on_a_cpu_says_what_it_costs(monkeypatch):
    """The headline command on a CPU: an estimate from the FLOPs and the speed, evaluations included, and
    a warning that it reads the train tokens too often."""
    args = sg.resolve_args(["--depth", "6", "--stack-to", "12", "--device", "cpu"])
    phases = sg.plan_phases(args, vocab_size=4096)
    seconds, printed = announced(phases, args, 1e11, monkeypatch)
    shallow, deep = phases
    assert (shallow.steps, deep.steps, args.eval_every) == (282, 1619, 250)  # so 3 and 8 evaluations, forward only
    evals = (3 * shallow.flops_per_token + 8 * deep.flops_per_token) * 131072 / 3
    assert seconds == pytest.approx((shallow.flops + deep.flops + evals) / 1e11)
    assert "reads the train tokens 291 times" in printed and "--dataset pylibs" in printed
    quick = sg.resolve_args(sg.CPU_QUICK_START.split()[2:] + ["--device", "cpu"])
    seconds, printed = announced(sg.plan_phases(quick, 4096), quick, 1e10, monkeypatch)
    assert "minutes on this cpu" in printed and "reads the train tokens" not in printed


@pytest.mark.parametrize("device", [[], ["--device", "cpu"]])
def test_the_guard_stops_a_cpu_plan_of_days_unless_asked_by_name(device, monkeypatch):
    """The speed faked: a plan of more than a day on a CPU stops with the quick start to run instead, unless
    --device cpu was given; a plan of hours goes on either way."""
    for speed, days in ((1e9, True), (1e13, False)):
        args = sg.resolve_args(["--depth", "6", "--stack-to", "12"] + device)
        args.device = "cpu"  # as on a machine without a GPU
        result, printed = announced(sg.plan_phases(args, vocab_size=4096), args, speed, monkeypatch, 10**9)
        assert printed.startswith("shallow: 6 layers") and ("days on this cpu" in printed) == days
        if days and not device:
            assert isinstance(result, sg.UsageError) and sg.CPU_QUICK_START in str(result)
            assert str(result).endswith("or pass --device cpu to train it here anyway")
        else:
            assert isinstance(result, float) and (result > 86400) == days


def test_timing_the_machine_leaves_the_run_unchanged():
    """The speed measurement before training builds and runs a scratch model: the run's RNG must not move."""
    args = sg.resolve_args(["--device", "cpu", "--seq-len", "16", "--device-batch-size", "2"])
    before = torch.get_rng_state()
    assert sg.measure_flops_per_second(tiny_config(), args) > 0
    assert torch.equal(torch.get_rng_state(), before)


def test_the_readme_quick_start_is_the_one_the_script_suggests():
    with open(os.path.join(HERE, "README.md")) as f:
        assert sg.CPU_QUICK_START in f.read().replace("\n", " ")


def test_the_readme_things_to_try_name_real_functions_and_flags():
    """Each item of the README's "Things to try" names a function of stack_gpt.py and a flag that exist."""
    with open(os.path.join(HERE, "README.md")) as f:
        section = f.read().split("## Things to try")[1].split("\n## ")[0]
    flags = {option for action in sg.get_parser()._actions for option in action.option_strings}
    items = re.findall(r"^\d+\. (.*?)(?=^\d+\. |\Z)", section, re.M | re.S)
    assert len(items) >= 5
    for item in items:
        names = re.findall(r"`([^`]+)`", item)
        functions = [n for n in names if not n.startswith(("--", "python "))]
        assert functions and any(n.startswith("--") for n in names), item
        for name in functions:
            target = sg
            for part in name.split("."):
                assert hasattr(target, part), f"README names {name}, which stack_gpt.py does not define"
                target = getattr(target, part)
    used = {word for code in re.findall(r"`([^`]+)`", section) for word in code.split() if word.startswith("--")}
    assert used <= flags, used - flags


def test_stack_gpt_runs_alone(tiny_data, tmp_path):
    """The single file runs alone: it imports the standard library, torch and numpy only, and a copy of it
    in an empty folder trains on a folder that prepare_data.py wrote."""
    tree = ast.parse(open(os.path.join(HERE, "stack_gpt.py")).read())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {m.split(".")[0] for m in modules} - set(sys.stdlib_module_names) <= {"torch", "numpy", "tiktoken"}
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(os.path.join(HERE, "stack_gpt.py"), alone)
    argv = TINY + ["--shallow-steps", "2", "--deep-steps", "2", "--data", tiny_data, "--out-dir", "run"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "stack_gpt.py"] + argv, cwd=alone, env=env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert metrics_of(alone / "run")[-1]["kind"] == "summary"


@pytest.mark.parametrize("share", [0.2, 0.8])
def test_grow_at_puts_growth_at_that_share_of_the_budget(share):
    args = sg.resolve_args(["--depth", "2", "--stack-to", "4", "--aspect-ratio", "32", "--head-dim", "32", "--seq-len", "256",
                            "--total-batch-size", "4096", "--device-batch-size", "16", "--grow-at", str(share), "--device", "cpu"])
    shallow, deep = sg.plan_phases(args, vocab_size=2048)
    baseline, = sg.plan_phases(sg.resolve_args(["--depth", "4", "--aspect-ratio", "32", "--head-dim", "32", "--seq-len", "256",
                                                "--total-batch-size", "4096", "--device-batch-size", "16", "--device", "cpu"]), vocab_size=2048)
    assert abs(shallow.flops - share * baseline.flops) <= shallow.step_flops / 2  # the nearest whole step
    assert abs(shallow.flops + deep.flops - baseline.flops) <= deep.step_flops / 2  # and the whole run still costs the baseline's


def test_a_shallow_phase_of_zero_steps_is_refused():
    for flags in (["--shallow-ratio", "0.0001"], ["--grow-at", "0.00001"]):
        with pytest.raises(sg.UsageError, match="shallow phase gets 0 steps"):
            plan_args(["--depth", "2", "--stack-to", "4"] + flags)


def test_an_odd_shallow_depth_keeps_the_baseline_batch_and_budget():
    # d1 -> d4: the copies of d1's value-embedding layer give the deep model 4 tables where d4 has 2
    _, (baseline,) = plan_args(["--depth", "4", "--aspect-ratio", "32", "--head-dim", "32", "--seq-len", "256"])
    _, (shallow, deep) = plan_args(["--depth", "1", "--stack-to", "4", "--aspect-ratio", "32", "--head-dim", "32", "--seq-len", "256"])
    assert len(deep.config.ve_layers) == 4 and len(baseline.config.ve_layers) == 2
    assert (deep.batch_size, deep.weight_decay) == (baseline.batch_size, baseline.weight_decay)
    assert shallow.flops + deep.flops == pytest.approx(baseline.flops, abs=deep.step_flops / 2)  # to the nearest step


@pytest.mark.parametrize("argv,message", [(["--depth", "2", "--ratio", "1e-9"], "less than one step"),
                                          (["--depth", "2", "--stack-to", "4", "--deep-ratio", "1e-9"], "--deep-ratio 1e-09 gives 0 steps"),
                                          (["--depth", "2", "--stack-to", "4", "--ratio", "0.1"], "the shallow phase uses the whole")])
def test_an_empty_deep_phase_names_its_cause(argv, message):
    with pytest.raises(sg.UsageError, match=message):
        plan_args(argv)


def test_explicit_horizons_override_the_budget():
    _, (shallow, deep) = plan_args(["--depth", "2", "--stack-to", "4", "--shallow-steps", "7", "--deep-steps", "9",
                                    "--total-batch-size", "4096", "--device-batch-size", "2", "--seq-len", "2048"])
    assert (shallow.steps, deep.steps, deep.batch_size) == (7, 9, 4096)


def test_global_schedule_is_continuous_across_growth():
    args, (shallow, deep) = plan_args(["--depth", "2", "--stack-to", "4", "--shallow-steps", "30", "--deep-steps", "50",
                                       "--total-batch-size", "4096", "--device-batch-size", "2", "--schedule", "global",
                                       "--final-lr-frac", "0.1", "--aspect-ratio", "32", "--head-dim", "32", "--seq-len", "256"])
    assert args.warmdown_ratio == 0.5
    assert (deep.flops_before, deep.steps_before, deep.run_flops) == (shallow.flops, 30, shallow.flops + deep.flops)
    lrms = [sg.schedule_at(shallow, step, args) for step in range(shallow.steps)]
    lrms += [sg.schedule_at(deep, step, args) for step in range(deep.steps + 1)]
    lr = [x[0] for x in lrms]
    assert lr[0] == 1.0 and lr[-1] == pytest.approx(0.1)  # the final fraction at the end of the run
    assert all(b <= a for a, b in zip(lr, lr[1:]))
    assert max(a - b for a, b in zip(lr, lr[1:])) < 0.05  # no jump at the growth (step 30)
    assert lr[29] == 1.0 and lr[30] == 1.0  # warmdown 0.5 of the FLOPs starts inside the deep phase
    momentum = [x[1] for x in lrms]
    assert momentum[31] == sg.muon_momentum(31)  # Muon's warmup does not restart either
    phases = sg.schedule_at(deep, 0, sg.resolve_args(["--depth", "2", "--stack-to", "4", "--device", "cpu"]))
    assert phases[0] == 1.0 and phases[1] == pytest.approx(0.85)  # the default restarts both



def test_global_schedule_decays_weight_decay_over_the_whole_run():
    """With --schedule global, weight decay falls with the run's FLOPs, continuous across the growth, while
    each phase keeps its own base value (the rules give a shallow model a larger one)."""
    args, (shallow, deep) = plan_args(["--depth", "2", "--stack-to", "4", "--shallow-steps", "30", "--deep-steps", "50",
                                       "--total-batch-size", "4096", "--device-batch-size", "2", "--schedule", "global",
                                       "--aspect-ratio", "32", "--head-dim", "32", "--seq-len", "256"])
    total = shallow.flops + deep.flops
    for step in (0, 17, 29):
        assert sg.schedule_at(shallow, step, args)[2] == pytest.approx(shallow.weight_decay * (1 - step * shallow.step_flops / total))
    for step in (0, 25, 50):
        done = shallow.flops + step * deep.step_flops
        assert sg.schedule_at(deep, step, args)[2] == pytest.approx(deep.weight_decay * (1 - done / total))
    assert shallow.weight_decay != deep.weight_decay


def test_init_from_fills_the_rest_of_the_baseline_budget():
    """--init-from without a deep horizon: the checkpoint's FLOPs plus the deep phase's are the baseline's."""
    _, (baseline,) = plan_args(["--depth", "4", "--aspect-ratio", "32", "--head-dim", "32", "--seq-len", "256"], vocab_size=4096)
    args = sg.resolve_args(["--depth", "2", "--stack-to", "4", "--aspect-ratio", "32", "--head-dim", "32", "--seq-len", "256",
                            "--init-from", "shallow.pt", "--device", "cpu"])
    spent = 0.3 * baseline.flops
    (deep,) = sg.plan_phases(args, 4096, shallow_flops=spent)
    assert abs(spent + deep.flops - baseline.flops) <= deep.step_flops / 2, "--init-from must fill only what is left"


@pytest.mark.parametrize("depth", [4, 24])
def test_default_batch_follows_the_power_law_away_from_d12(depth):
    """nanochat's batch rule, B = 2^19 (N / N_d12)^0.383 rounded to a power of two: near d12 rounding hides
    an error in it, at d4 and d24 it does not (2^18 and 2^20 at the default aspect ratio)."""
    def scaling_params(d):
        args = types.SimpleNamespace(aspect_ratio=64, head_dim=128, seq_len=2048)
        with torch.device("meta"):  # shapes only: a d24 would take gigabytes
            return sg.GPT(sg.model_config(d, d, args, 32768)).param_counts()["scaling"]
    _, (phase,) = plan_args(["--depth", str(depth)])
    ratio = scaling_params(depth) / scaling_params(12)
    assert phase.batch_size == 2 ** round(math.log2(2**19 * ratio ** 0.383))
    assert phase.batch_size == {4: 2**18, 24: 2**20}[depth]


# -----------------------------------------------------------------------------
# Whole runs on tiny data: the two-phase loop end to end

@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A tiny dataset: a few stdlib packages' source, BPE vocab 512."""
    import email
    import json as json_package
    out = tmp_path_factory.mktemp("data") / "tiny"
    paths = [os.path.dirname(json_package.__file__), os.path.dirname(email.__file__)]
    prepare_data.build_text_dataset(paths, str(out), vocab_size=512)
    return str(out)


TINY = ["--depth", "1", "--stack-to", "2", "--aspect-ratio", "64", "--head-dim", "32", "--seq-len", "32",
        "--device-batch-size", "4", "--total-batch-size", "256", "--shallow-steps", "6", "--deep-steps", "10",
        "--eval-every", "5", "--eval-tokens", "512", "--matrix-lr", "0.2", "--embedding-lr", "3",
        "--unembedding-lr", "0.4"]


def metrics_of(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "d1s2")
    sg.main(TINY + ["--data", tiny_data, "--out-dir", out])
    return out


def test_two_phase_run_end_to_end(tiny_run):
    records = metrics_of(tiny_run)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train if r["phase"] == "shallow"] == list(range(1, 7))
    assert [r["step"] for r in train if r["phase"] == "deep"] == list(range(1, 11))
    assert train[-1]["raw_loss"] < train[0]["raw_loss"] - 0.5  # it learns
    evals = [(r["phase"], r["step"]) for r in records if r["kind"] == "eval"]
    assert evals == [("shallow", 0), ("shallow", 5), ("shallow", 6), ("deep", 0), ("deep", 5), ("deep", 10)]
    summary = records[-1]
    assert summary["kind"] == "summary" and set(summary["val_bpb"]) == {"shallow", "deep"}
    # cumulative FLOPs count tokens per optimizer step, and the deep phase starts where the shallow one ended
    plan = records[0]["phases"]
    shallow_flops = plan[0]["flops_per_token"] * 256 * 6
    assert [r["flops"] for r in train][5] == shallow_flops
    assert summary["flops"] == train[-1]["flops"] == shallow_flops + plan[1]["flops_per_token"] * 256 * 10


def test_the_logged_loss_is_the_debiased_moving_average(tiny_run):
    """loss in the log: the EMA (decay 0.9) of every step's raw loss, started from zero within each phase and
    divided by 1 - 0.9^steps, so the first step's is its raw loss."""
    train = [r for r in metrics_of(tiny_run) if r["kind"] == "train"]
    for phase in ("shallow", "deep"):
        ema = 0.0
        for r in (r for r in train if r["phase"] == phase):
            ema = 0.9 * ema + 0.1 * r["raw_loss"]
            assert r["loss"] == pytest.approx(ema / (1 - 0.9 ** r["step"]), rel=1e-6), (phase, r["step"])


def test_checkpoints_reload_and_the_deep_phase_passes_the_shallow_one(tiny_run):
    shallow_ckpt = sg.load_checkpoint(os.path.join(tiny_run, "shallow.pt"))
    final_ckpt = sg.load_checkpoint(os.path.join(tiny_run, "final.pt"))
    assert (shallow_ckpt["phase"], final_ckpt["phase"]) == ("shallow", "deep")
    assert (shallow_ckpt["model_config"]["n_layer"], final_ckpt["model_config"]["n_layer"]) == (1, 2)
    for ckpt in (shallow_ckpt, final_ckpt):
        model = sg.GPT(sg.GPTConfig(**{**ckpt["model_config"], "ve_layers": tuple(ckpt["model_config"]["ve_layers"])}))
        model.load_state_dict(ckpt["model"])  # strict: every tensor present, none extra
        assert ckpt["args"]["stack_to"] == 2 and ckpt["loader"]["cursor"] > 0
    records = metrics_of(tiny_run)
    end_of_shallow = [r for r in records if r["kind"] == "eval" and r["phase"] == "shallow"][-1]
    end_of_deep = [r for r in records if r["kind"] == "eval" and r["phase"] == "deep"][-1]
    # Right after stacking val bpb may jump (at the README's quick-start scale, above an untrained model's);
    # what stacking must give is a deep model that trains on to below where the shallow one stopped.
    assert end_of_deep["val_bpb"] < end_of_shallow["val_bpb"] - 0.05


def samples_in(out):
    """The text samples a run printed: {when: text}."""
    found = re.findall(r"^sample (.*?):\n((?:  \| .*\n?)*)", out, re.M)
    return {when: "\n".join(line[4:] for line in text.splitlines()) for when, text in found}


def test_a_run_prints_text_before_and_after_growth(tiny_data, tmp_path, capsys):
    """Three samples from the start of a document, the same seed each time: the shallow model's, the grown
    model's before its first step, the deep model's at the end; decoded by the data folder's tokenizer.
    A baseline prints one; a data folder without tokenizer.tiktoken prints a line instead."""
    flags = TINY + ["--data", tiny_data, "--deep-steps", "2", "--sample-tokens", "12"]
    sg.main(flags + ["--out-dir", str(tmp_path / "a")])
    samples = samples_in(capsys.readouterr().out)
    assert list(samples) == ["at the end of the shallow phase", "right after growth", "at the end of the deep phase"]
    assert all(text.strip() for text in samples.values())
    tokenizer = sg.load_tokenizer(tiny_data)
    ids = sg.load_checkpoint(str(tmp_path / "a" / "final.pt"))  # the same text from the saved deep model
    model = sg.GPT(sg.GPTConfig(**{**ids["model_config"], "ve_layers": tuple(ids["model_config"]["ve_layers"])}))
    model.load_state_dict(ids["model"])
    text = tokenizer.decode(model.generate([tokenizer.eot_token], 12, seed=0))
    assert samples["at the end of the deep phase"] == "\n".join(text.replace("<|endoftext|>", "\n").splitlines())
    sg.main(flags + ["--out-dir", str(tmp_path / "b")])
    assert samples_in(capsys.readouterr().out) == samples  # the same seed: the same text
    no_tokenizer = tmp_path / "data"
    shutil.copytree(tiny_data, no_tokenizer)
    os.remove(no_tokenizer / "tokenizer.tiktoken")
    sg.main(["--depth", "2"] + TINY[4:] + ["--data", str(no_tokenizer), "--out-dir", str(tmp_path / "c"), "--deep-steps", "2"])
    assert re.findall(r"^sample .*", capsys.readouterr().out, re.M) == [
        f"sample at the end of the baseline phase: none, {no_tokenizer} has no tokenizer.tiktoken to decode it with"]


def test_resume_with_plan_writes_nothing(tiny_data, tmp_path, capsys):
    """--resume --plan: the interrupted run's plan and estimate, and its folder left as it was."""
    out = tmp_path / "run"
    sg.main(TINY + ["--data", tiny_data, "--out-dir", str(out), "--save-every", "3", "--sample-tokens", "0"])
    os.remove(out / "final.pt")  # as if it had stopped after its last checkpoint.pt
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    capsys.readouterr()
    sg.main(["--resume", "--out-dir", str(out), "--plan"])
    assert capsys.readouterr().out.startswith("shallow: 1 layer x")
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_samples_decode_with_the_data_folders_own_tokenizer(tiny_data, tmp_path):
    """The tokenizer is read from the folder each time: a dataset rebuilt at the same path with other ranks
    decodes with its new ones (tiktoken's own loader would serve the old file from its cache)."""
    folder = tmp_path / "data"
    shutil.copytree(tiny_data, folder)
    assert sg.load_tokenizer(str(folder)).n_vocab == 512
    path = folder / "tokenizer.tiktoken"
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:300]))  # a 300-token vocabulary
    meta = json.loads((folder / "meta.json").read_text())
    meta["special_tokens"] = {"<|endoftext|>": 300}
    (folder / "meta.json").write_text(json.dumps(meta))
    tokenizer = sg.load_tokenizer(str(folder))
    assert tokenizer.n_vocab == 301 and tokenizer.decode(tokenizer.encode("def f(x): pass")) == "def f(x): pass"


def test_plan_prints_the_plan_and_writes_nothing(tiny_data, tmp_path, capsys, monkeypatch):
    """--plan: the plan and its estimate, exit 0, no run folder; on a CPU the malloc thresholds are set."""
    calls = []
    monkeypatch.setattr(sg, "keep_freed_memory", lambda args: calls.append(args.device))
    sg.main(TINY + ["--data", tiny_data, "--out-dir", str(tmp_path / "run"), "--plan", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.startswith("shallow: 1 layer x") and "estimated time: about" in out and "val bpb" not in out
    assert not os.path.exists(tmp_path / "run") and calls == ["cpu"]


@pytest.mark.parametrize("libc", [("glibc", "2.36"), ("", "")])
@pytest.mark.parametrize("accepts", [1, 0])
def test_cpu_runs_keep_freed_memory_on_glibc_only(monkeypatch, libc, accepts):
    """mallopt through ctypes, with values that fit a C int (2**32 would arrive as 0), and only on glibc; a
    glibc that refuses the mmap threshold (mallopt returns 0) keeps all its defaults."""
    set_options = []
    fake_libc = types.SimpleNamespace(mallopt=lambda option, value: set_options.append((option, value)) or accepts)
    monkeypatch.setattr(sg.ctypes, "CDLL", lambda name: fake_libc if name == "libc.so.6" else None)
    monkeypatch.setattr(sg.platform, "system", lambda: "Linux")
    monkeypatch.setattr(sg.platform, "libc_ver", lambda: libc)
    sg.keep_freed_memory(types.SimpleNamespace(device="cuda"))
    assert set_options == []  # a GPU run's host memory is not the bottleneck
    sg.keep_freed_memory(types.SimpleNamespace(device="cpu"))
    if libc[0] == "glibc":  # M_MMAP_THRESHOLD, then M_TRIM_THRESHOLD and M_TOP_PAD
        assert set_options == [(-3, 2**30), (-1, 2**31 - 1), (-2, 2**30)][:3 if accepts else 1]
        assert all(0 < value < 2**31 for _, value in set_options)
    else:
        assert set_options == []


def test_init_from_reproduces_phase_two(tiny_run, tiny_data, tmp_path):
    out = str(tmp_path / "again")
    sg.main(TINY + ["--data", tiny_data, "--out-dir", out, "--init-from", os.path.join(tiny_run, "shallow.pt")])
    deep = lambda recs: [(r["kind"], r["step"], r.get("raw_loss"), r.get("val_bpb"), r["flops"])
                         for r in recs if r.get("phase") == "deep" and r["kind"] in ("train", "eval")]
    assert deep(metrics_of(out)) == deep(metrics_of(tiny_run))
    assert not os.path.exists(os.path.join(out, "shallow.pt"))


def test_baseline_run(tiny_data, tmp_path):
    out = str(tmp_path / "d2")
    sg.main(["--depth", "2"] + TINY[4:] + ["--data", tiny_data, "--out-dir", out])
    records = metrics_of(out)
    assert {r["phase"] for r in records if r["kind"] == "train"} == {"baseline"}
    assert records[-1]["kind"] == "summary" and os.path.exists(os.path.join(out, "final.pt"))
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["depth"] == 2 and config["data"] == tiny_data
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (CI's is): the run names the commit its code is at
        assert config["code_commit"].removesuffix("+dirty") == head.stdout.strip()


@pytest.mark.parametrize("flags", [
    ["--grow", "interleave"], ["--grow", "identity", "--grow-optim", "carry"], ["--grow", "random", "--schedule", "global"],
    ["--grow-optim", "carry", "--schedule", "global", "--stack-to", "3"],
])
def test_growth_flags_end_to_end(tiny_data, tiny_run, tmp_path, flags, capsys):
    out = str(tmp_path / "run")
    sg.main(TINY + ["--data", tiny_data, "--out-dir", out, "--baseline", tiny_run] + flags)
    records = metrics_of(out)
    assert records[-1]["kind"] == "summary" and math.isfinite(records[-1]["val_bpb"]["deep"])
    assert "| reaches baseline train loss at |" in capsys.readouterr().out
    if "identity" in flags:  # G_zero keeps the function: no jump at the growth
        evals = [r for r in records if r["kind"] == "eval"]
        shallow_end, deep_start = [r["val_bpb"] for r in evals if (r["phase"], r["step"]) in (("shallow", 6), ("deep", 0))]
        assert deep_start == pytest.approx(shallow_end, abs=1e-5)
    plan = records[0]["phases"]
    assert plan[1]["config"]["n_layer"] == (3 if "3" in flags else 2)


def test_init_from_with_carry_uses_the_saved_optimizer(tiny_run, tiny_data, tmp_path):
    runs = []
    for name, extra in (("full", []), ("resumed", ["--init-from", os.path.join(str(tmp_path), "full", "shallow.pt")])):
        out = str(tmp_path / name)
        sg.main(TINY + ["--data", tiny_data, "--out-dir", out, "--grow-optim", "carry", "--schedule", "global"] + extra)
        runs.append([(r["step"], r["raw_loss"], r["lrm"]) for r in metrics_of(out) if r["kind"] == "train" and r["phase"] == "deep"])
    assert runs[0] == runs[1]


def growth_freeing_probes(monkeypatch):
    """Probes for the growth: weak references to the shallow model and to every optimizer built before the
    deep one, and at the deep phase's first step, whether each is gone."""
    refs, freed, real_stack, real_build, real_step = [], [], sg.stack_model, sg.build_optimizer, sg.train_step

    def stack_model(shallow, *rest):
        refs.append(weakref.ref(shallow))
        return real_stack(shallow, *rest)

    def build_optimizer(model, *rest):
        optimizer = real_build(model, *rest)
        if model.config.n_layer == 1:  # the shallow model's (restore builds it for --init-from)
            refs.append(weakref.ref(optimizer))
        return optimizer

    def train_step(step_model, model, optimizer, loader, phase, step, args):
        if phase.name == "deep" and step == 0:
            gc.collect()
            freed.append([ref() is None for ref in refs])
        return real_step(step_model, model, optimizer, loader, phase, step, args)
    for name, probe in (("stack_model", stack_model), ("build_optimizer", build_optimizer), ("train_step", train_step)):
        monkeypatch.setattr(sg, name, probe)
    return freed


@pytest.mark.parametrize("start", ["new", "init-from"])
def test_growth_frees_the_shallow_model_and_its_optimizer(tiny_data, tiny_run, tmp_path, monkeypatch, start):
    """Nothing may hold the shallow model once it is grown: on a GPU it and its optimizer state would
    otherwise sit in memory through the deep phase (1.1 GiB of a d6s12's 30.2 GiB peak, seen on an H200).
    The compiled run is checked in test_compiled_bf16_run_on_the_cpu_matches_eager."""
    extra = {"new": [], "init-from": ["--init-from", os.path.join(tiny_run, "shallow.pt")]}[start]
    freed = growth_freeing_probes(monkeypatch)
    sg.main(TINY + ["--data", tiny_data, "--out-dir", str(tmp_path / "run")] + extra)
    assert freed == [[True, True]]


def test_weight_decay_reaching_the_optimizer_falls_to_zero(tiny_data, tmp_path, monkeypatch):
    """What Muon applies in training, step by step: the phase's weight decay times (1 - step / steps)."""
    applied, real_step = [], sg.MuonAdamW.step

    def recording_step(optimizer):
        applied.append(next(g["weight_decay"] for g in optimizer.param_groups if g["kind"] == "muon"))
        return real_step(optimizer)
    monkeypatch.setattr(sg.MuonAdamW, "step", recording_step)
    out = str(tmp_path / "run")
    sg.main(TINY + ["--data", tiny_data, "--out-dir", out, "--eval-every", "0"])
    shallow, deep = metrics_of(out)[0]["phases"]
    expected = [p["weight_decay"] * (1 - s / p["steps"]) for p in (shallow, deep) for s in range(p["steps"])]
    assert applied == pytest.approx(expected, rel=1e-12), "weight decay must fall linearly to zero in each phase"


def test_sparse_logging_keeps_the_per_step_smoothed_loss(tiny_data, tmp_path):
    """--log-every only thins the records: the smoothed loss is still an EMA over every step."""
    logged = {}
    for every in ("1", "4"):
        out = str(tmp_path / every)
        sg.main(["--depth", "2"] + TINY[4:] + ["--data", tiny_data, "--out-dir", out, "--log-every", every])
        logged[every] = {r["step"]: r["loss"] for r in metrics_of(out) if r["kind"] == "train"}
    assert sorted(logged["4"]) == [4, 8, 10]
    for step, loss in logged["4"].items():
        assert loss == pytest.approx(logged["1"][step], rel=1e-6)


def test_a_step_averages_its_micro_batches():
    """Gradient accumulation: the gradient a step applies is the mean over its micro-batches, the gradient of
    the whole batch's mean loss (a sum would be as hard to see in the losses as a sum over ranks)."""
    model = trained_looking(tiny_config(n_layer=1))
    x, y = torch.randint(0, 100, (4, 16)), torch.randint(0, 100, (4, 16))
    micro = iter([(x[:2], y[:2]), (x[2:], y[2:])])
    seen = []
    optimizer = types.SimpleNamespace(param_groups=[], step=lambda: seen.extend(p.grad.clone() for p in model.parameters()))
    loader = types.SimpleNamespace(next_batch=lambda rows: next(micro))
    args = types.SimpleNamespace(device_batch_size=2, seq_len=16, device="cpu", schedule="phases", warmup_ratio=0.0,
                                 final_lr_frac=0.0, dtype="fp32")
    phase = sg.Phase("baseline", model.config, 10, 2 * 2 * 16, 1000, 0.1, 0.5)
    loss, _ = sg.train_step(model, model, optimizer, loader, phase, 0, args)
    whole = model(x, y)
    whole.backward()
    assert loss.item() == pytest.approx(whole.item(), rel=1e-6)
    for got, p in zip(seen, model.parameters()):
        assert torch.allclose(got, p.grad, rtol=1e-4, atol=1e-7), "a step's gradient is its micro-batches' mean"


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "nan")
    real = sg.lr_multiplier
    monkeypatch.setattr(sg, "lr_multiplier", lambda step, steps, *a: float("nan") if steps == 10 and step == 3 else real(step, steps, *a))
    with pytest.raises(SystemExit) as e:
        sg.main(TINY + ["--data", tiny_data, "--out-dir", out])
    assert e.value.code == 1
    assert "deep phase: loss is nan at step 5" in capsys.readouterr().err
    assert sg.load_checkpoint(os.path.join(out, "shallow.pt"))["phase"] == "shallow"
    assert not os.path.exists(os.path.join(out, "final.pt"))


# -----------------------------------------------------------------------------
# Golden metrics: the numbers a tiny stacked run, baseline and --init-from run give, pinned bit for bit on
# the CPU and torch they were recorded with, and within a measured tolerance on any other

GOLDEN = os.path.join(HERE, "experiments", "golden.json")
# The same numbers on any x86 CPU: ATen's generic kernels and MKL's reproducible mode, one thread
PORTABLE = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
GOLDEN_FLAGS = ["--aspect-ratio", "64", "--head-dim", "32", "--seq-len", "32", "--device-batch-size", "4", "--total-batch-size", "256",
                "--shallow-steps", "6", "--deep-steps", "10", "--eval-every", "5", "--eval-tokens", "512",
                "--matrix-lr", "0.2", "--embedding-lr", "3", "--unembedding-lr", "0.4", "--device", "cpu"]
GOLDEN_RUNS = {"stacked": ["--depth", "1", "--stack-to", "2"], "baseline": ["--depth", "2"],
               "init-from": ["--depth", "1", "--stack-to", "2", "--init-from", "{stacked}/shallow.pt", "--grow", "interleave",
                             "--grow-optim", "carry", "--schedule", "global"]}


def golden_corpus(folder):
    """Text of pseudo-words from a fixed linear congruential generator: the same on every Python."""
    state, syllables = 12345, ["ka", "lo", "mi", "ne", "ru", "ta", "so", "vi", "de", "po", "an", "el"]

    def draw(n):
        nonlocal state
        state = (state * 1103515245 + 12345) % 2**31
        return state % n
    words = ["".join(syllables[draw(12)] for _ in range(1 + draw(3))) for _ in range(300)]
    os.makedirs(folder)
    for f in range(40):
        lines = [" ".join(words[draw(300)] for _ in range(3 + draw(8))) + ("." if draw(3) else ":") for _ in range(60)]
        with open(os.path.join(folder, f"doc{f:02d}.txt"), "w") as out:
            out.write("\n".join(lines) + "\n")


def golden_data(tmp_path):
    golden_corpus(tmp_path / "text")
    prepare_data.build_text_dataset([str(tmp_path / "text")], str(tmp_path / "data"), vocab_size=512)
    return str(tmp_path / "data")


def golden_run(records):
    """A run's plan and the records that must repeat, without the timings."""
    return {"plan": [{k: v for k, v in p.items() if k != "config"} for p in records[0]["phases"]],
            "records": comparable(records)}


def golden_metrics(tmp_path):
    """Every run's losses, val bpb, FLOPs, steps and plan, without the timings. Each run is single-threaded
    (PORTABLE), so the runs that do not wait for another's shallow.pt go side by side: same bits, less time."""
    data = golden_data(tmp_path)

    def start(name):
        flags = [f.format(stacked=tmp_path / "stacked") for f in GOLDEN_RUNS[name]]
        return subprocess.Popen([sys.executable, "stack_gpt.py"] + GOLDEN_FLAGS + flags + ["--data", data, "--out-dir", str(tmp_path / name)],
                                cwd=HERE, env={**os.environ, **PORTABLE}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for batch in (["stacked", "baseline"], ["init-from"]):  # init-from grows the stacked run's shallow.pt
        for proc in [start(name) for name in batch]:
            _, stderr = proc.communicate(timeout=RUN_TIMEOUT)
            assert proc.returncode == 0, stderr[-2000:]
    return {name: golden_run(metrics_of(tmp_path / name)) for name in GOLDEN_RUNS}


def this_machine():
    """What the golden numbers' bits depend on: the torch version and the CPU (its model and vector instructions)."""
    cpuinfo = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.M)
    return {"torch": torch.__version__.split("+")[0], "cpu": model.group(1).strip() if model else None,
            "cpu_flags": sorted(f for f in flags.group(1).split() if f.startswith(("avx", "amx", "fma"))) if flags else []}


# Measured (experiments.md, "The golden test's tolerance"): the same runs with this AMD EPYC's own AVX-512 or
# AVX2 kernels instead of the generic ones, or with every initial weight moved by a relative 1e-6, differ
# from the record by at most 1e-6 up to train step 2, then grow to 3.2e-4 by the end, because the test's
# 10x LRs and Adam's sign-like steps on near-zero gradients amplify rounding. An Intel Xeon was off by 6e-7
# at step 2. So: 1e-5 over the steps before that growth, where rounding cannot hide a changed init (10% on
# the lm_head's init moves step 2 by 4e-5); 3e-3 everywhere, where one step at twice its LR moves 3e-2.
GOLDEN_EARLY_STEPS, GOLDEN_EARLY_REL, GOLDEN_REL = 2, 1e-5, 3e-3


def golden_mismatches(got, want):
    """Where `got` differs from the golden `want` beyond the tolerances above: a list of (run, record, field)."""
    bad = []
    for name, run in want.items():
        if run["plan"] != got[name]["plan"] or len(run["records"]) != len(got[name]["records"]):
            bad.append((name, "plan or record count", None))
            continue
        fresh = name != "init-from"  # the runs that start from new weights, not from a trained shallow model
        for want_record, got_record in zip(run["records"], got[name]["records"]):
            first_phase = want_record.get("phase") == run["records"][0]["phase"]
            early = fresh and first_phase and want_record.get("step", math.inf) <= GOLDEN_EARLY_STEPS
            rel = GOLDEN_EARLY_REL if early else GOLDEN_REL
            for key, value in flat(want_record).items():
                other = flat(got_record).get(key)
                if isinstance(value, float) and isinstance(other, float):
                    ok = abs(other - value) <= rel * abs(value)
                else:
                    ok = other == value  # kinds, phases, steps, FLOPs: exact
                if not ok:
                    bad.append((name, want_record.get("step"), key))
    return bad


def test_golden_metrics_are_reproduced(tmp_path):
    """
    Pins the numerics through refactors: on the recording CPU and torch, a change that moves any loss by one
    bit fails here; elsewhere, one that moves them beyond rounding. Set STACK_GPT_RECORD_GOLDEN=1 to rewrite
    experiments/golden.json, only for a change meant to move them, and say why in the commit.
    """
    metrics = golden_metrics(tmp_path)
    if os.environ.get("STACK_GPT_RECORD_GOLDEN"):
        with open(GOLDEN, "w") as f:
            json.dump({"recorded_on": this_machine(), "metrics": metrics}, f, indent=1)
    with open(GOLDEN) as f:
        golden = json.load(f)
    if golden["recorded_on"] == this_machine():
        assert metrics == golden["metrics"]
    assert golden_mismatches(metrics, golden["metrics"]) == []


def test_golden_tolerance_passes_rounding_and_fails_real_changes(tmp_path, monkeypatch):
    """The tolerance branch itself: rounding-sized differences pass, a changed init or LR does not."""
    with open(GOLDEN) as f:
        golden = json.load(f)["metrics"]

    def scaled(value, factor):  # every loss, val bpb and LR multiplier times factor (the plans are exact)
        if isinstance(value, dict):
            return {k: v if k == "plan" else scaled(v, factor) for k, v in value.items()}
        if isinstance(value, list):
            return [scaled(v, factor) for v in value]
        return value * factor if isinstance(value, float) else value
    for factor in (1 + 1e-6, 1 - 1e-6):
        assert golden_mismatches(scaled(golden, factor), golden) == []
    assert golden_mismatches(scaled(golden, 1 + 2e-5), golden) != []  # caught early on
    assert golden_mismatches(scaled(golden, 1 + 4e-3), golden) != []  # caught everywhere
    # real changes: runs made here (this CPU's own kernels, so rounding differs from the record too)
    data, runs = golden_data(tmp_path), {}
    real_init, real_step, steps = sg.GPT.init_weights, sg.MuonAdamW.step, []

    def bigger_head(model):
        real_init(model)
        model.lm_head.weight.data *= 1.1

    def one_step_at_twice_the_lr(optimizer):  # the logged LR multiplier stays as it was: only the losses tell
        steps.append(len(steps))
        for group in optimizer.param_groups:
            group["lr"] *= 2 if len(steps) == 4 else 1  # train_step sets every step's LR afresh
        real_step(optimizer)
    for change, patch in [("init", (sg.GPT, "init_weights", bigger_head)), ("lr", (sg.MuonAdamW, "step", one_step_at_twice_the_lr)),
                          ("none", None)]:
        with monkeypatch.context() as m:
            if patch:
                m.setattr(*patch)
            out = str(tmp_path / change)
            sg.main(GOLDEN_FLAGS + GOLDEN_RUNS["stacked"] + ["--data", data, "--out-dir", out])
            runs[change] = {"stacked": golden_run(metrics_of(out))}
    stacked_only = {"stacked": golden["stacked"]}
    assert golden_mismatches(runs["none"], stacked_only) == []  # this CPU's kernels, not the generic ones: within
    assert golden_mismatches(runs["init"], stacked_only) != []
    assert golden_mismatches(runs["lr"], stacked_only) != []


def flat(record, prefix=""):
    """A record with its nested dicts (val_bpb, phase_flops) spread into dotted keys."""
    fields = {}
    for key, value in record.items():
        fields.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return fields


# -----------------------------------------------------------------------------
# Flags and bad input: one line naming the fix, exit code 2, nothing written

def run_script(*argv):
    return subprocess.run([sys.executable, os.path.join(HERE, "stack_gpt.py"), *argv], capture_output=True, text=True, cwd=HERE)


def expect_usage_error(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as e:
        sg.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_bad_input_exits_2_without_traceback(tmp_path):
    result = run_script("--depth", "4", "--stack-to", "6", "--out-dir", str(tmp_path / "x"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "multiple of --depth" in result.stderr and not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("argv,fragment", [
    (["--depth", "4", "--stack-to", "4"], "larger multiple of --depth"),
    (["--depth", "0"], "argument --depth: must be a whole number > 0 (got '0')"),
    (["--depth", "1.5"], "argument --depth: must be a whole number > 0 (got '1.5')"),
    (["--shallow-ratio", "-1"], "argument --shallow-ratio: must be a finite number > 0"),
    (["--deep-steps", "0"], "argument --deep-steps: must be a whole number > 0"),
    (["--total-batch-size", "0"], "argument --total-batch-size: must be a whole number > 0"),
    (["--warmdown-ratio", "-0.5"], "argument --warmdown-ratio: must be a finite number >= 0"),
    (["--eval-every", "-1"], "argument --eval-every: must be a whole number >= 0"),
    (["--init-from", "x.pt"], "give --stack-to too"),
    (["--eval-tokens", "100", "--seq-len", "256"], "at least --seq-len"),
    (["--head-dim", "33"], "must be even"),
    (["--warmup-ratio", "1.5"], "<= 1"),
    (["--lr-scale", "0"], "argument --lr-scale: must be a finite number > 0"),
    (["--device", "tpu"], "argument --device: invalid choice"),
    (["--depth", "2", "--stack-to", "4", "--grow-at", "1.2"], "argument --grow-at: must be a finite number > 0 and < 1"),
    (["--depth", "2", "--stack-to", "4", "--grow-at", "1"], "argument --grow-at: must be a finite number > 0 and < 1"),
    (["--grow-at", "0.5"], "give --stack-to too"),
    (["--compare", "runs/d12"], "at least one run to compare"),
    (["--depth", "2", "--stack-to", "4", "--grow-at", "0.5", "--shallow-steps", "10"], "leave out --shallow-steps"),
    (["--depth", "1", "--aspect-ratio", "16", "--head-dim", "8"], "narrower than the 32 channels"),
])
def test_bad_flags(capsys, tmp_path, argv, fragment):
    # no dataset: should a check ever let these through, the run stops at the data instead of training
    expect_usage_error(capsys, argv + ["--out-dir", str(tmp_path / "run"), "--data", str(tmp_path / "no-data")], fragment)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_flag_refuses_nan_and_infinity(capsys, tmp_path, value):
    number_flags = [a.option_strings[0] for a in sg.get_parser()._actions if a.type not in (None, int, str)]
    assert {"--ratio", "--lr-scale", "--final-lr-frac", "--weight-decay", "--depth", "--eval-every"} <= set(number_flags)
    for flag in number_flags:
        argv = [f"{flag}={value}", "--out-dir", str(tmp_path / "run"), "--data", str(tmp_path / "no-data")]
        expect_usage_error(capsys, argv, f"argument {flag}: must be a ", f"(got '{value}')")
    assert not os.path.exists(tmp_path / "run")


def test_missing_data_names_the_command(capsys, tmp_path):
    expect_usage_error(capsys, ["--data", str(tmp_path / "nothing"), "--out-dir", str(tmp_path / "run")], "prepare_data.py")
    assert not os.path.exists(tmp_path / "run")


def test_batch_not_divisible(capsys, tiny_data, tmp_path):
    argv = TINY + ["--data", tiny_data, "--out-dir", str(tmp_path / "run"), "--total-batch-size", "200"]
    expect_usage_error(capsys, argv, "not a multiple of --device-batch-size 4 x --seq-len 32")
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="only meaningful without a GPU")
def test_cuda_requested_without_gpu(capsys):
    expect_usage_error(capsys, ["--device", "cuda"], "--device cpu")


def test_unfinished_run_or_a_file_is_not_overwritten(capsys, tiny_data, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    expect_usage_error(capsys, TINY + ["--data", tiny_data, "--out-dir", str(tmp_path / "file")], "cannot write the run folder")
    os.makedirs(tmp_path / "half")
    (tmp_path / "half" / "metrics.jsonl").write_text('{"kind": "plan"}\n')
    (tmp_path / "half" / "checkpoint.pt").write_text("a checkpoint")
    expect_usage_error(capsys, TINY + ["--data", tiny_data, "--out-dir", str(tmp_path / "half")], "--resume continues it")
    assert (tmp_path / "half" / "metrics.jsonl").read_text() == '{"kind": "plan"}\n'


def test_a_run_stopped_before_its_first_checkpoint_starts_again_without_overwrite(tiny_data, tmp_path):
    """Ctrl-C before any checkpoint leaves a run folder with nothing to resume or lose: the same command
    starts afresh there."""
    out = tmp_path / "stopped"
    os.makedirs(out)
    (out / "metrics.jsonl").write_text('{"kind": "plan"}\n{"kind": "train", "step": 1}\n')
    (out / "config.json").write_text("{}")
    sg.main(TINY + ["--data", tiny_data, "--out-dir", str(out), "--deep-steps", "2", "--sample-tokens", "0"])
    records = metrics_of(out)
    assert records[0]["kind"] == "plan" and records[-1]["kind"] == "summary" and len(records[0]["phases"]) == 2


def test_compare_names_a_broken_metrics_line(capsys, tiny_run, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(open(os.path.join(tiny_run, "metrics.jsonl")).read() + '{"kind": "tra')
    expect_usage_error(capsys, ["--compare", tiny_run, str(broken)], f"after {len(open(os.path.join(tiny_run, 'metrics.jsonl')).readlines())} records")


def test_compare_refuses_what_is_not_a_metrics_file(capsys, tiny_run, tmp_path):
    (tmp_path / "binary").write_bytes(b"\x80\xff" * 100)
    expect_usage_error(capsys, ["--compare", tiny_run, str(tmp_path / "binary")], "cannot read the metrics")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    expect_usage_error(capsys, ["--compare", tiny_run, str(tmp_path / "list.jsonl")], "cannot read the metrics")
    evals_only = [line for line in open(os.path.join(tiny_run, "metrics.jsonl")) if '"kind": "eval"' in line]
    (tmp_path / "evals.jsonl").write_text("".join(evals_only))
    expect_usage_error(capsys, ["--compare", str(tmp_path / "evals.jsonl"), tiny_run], "no train and eval records")


def test_init_from_inside_the_run_folder_is_refused(capsys, tiny_run, tiny_data):
    shallow = os.path.join(tiny_run, "shallow.pt")
    before = open(shallow, "rb").read()
    argv = TINY + ["--data", tiny_data, "--out-dir", tiny_run, "--init-from", shallow, "--overwrite"]
    expect_usage_error(capsys, argv, "lies in the --out-dir")
    assert open(shallow, "rb").read() == before


def test_finished_run_is_not_overwritten(capsys, tiny_run, tiny_data):
    before = open(os.path.join(tiny_run, "metrics.jsonl")).read()
    expect_usage_error(capsys, TINY + ["--data", tiny_data, "--out-dir", tiny_run], "--overwrite")
    assert open(os.path.join(tiny_run, "metrics.jsonl")).read() == before


def test_init_from_checkpoint_that_does_not_fit(capsys, tiny_run, tiny_data, tmp_path):
    shallow = os.path.join(tiny_run, "shallow.pt")
    wider = TINY + ["--data", tiny_data, "--out-dir", str(tmp_path / "a"), "--init-from", shallow, "--aspect-ratio", "128"]
    expect_usage_error(capsys, wider, "n_embd=128 (this run: 256)", "n_head=4 (this run: 8)")
    import json as json_package
    other_vocab = str(tmp_path / "vocab300")
    prepare_data.build_text_dataset([os.path.dirname(json_package.__file__)], other_vocab, vocab_size=300)
    capsys.readouterr()  # the build's progress lines
    argv = TINY + ["--data", other_vocab, "--out-dir", str(tmp_path / "d"), "--init-from", shallow]
    expect_usage_error(capsys, argv, "vocab_size=512 (this run: 300)")
    final = os.path.join(tiny_run, "final.pt")
    expect_usage_error(capsys, TINY + ["--data", tiny_data, "--out-dir", str(tmp_path / "b"), "--init-from", final], "takes a shallow.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(1000))
    expect_usage_error(capsys, TINY + ["--data", tiny_data, "--out-dir", str(tmp_path / "c"), "--init-from", str(junk)], "is no intact stack_gpt checkpoint")
    assert not any(os.path.exists(tmp_path / d) for d in "abcd")


# -----------------------------------------------------------------------------
# Machinery: data parallel, resume, and checkpoints that survive

def torchrun_two(argv, timeout):
    """stack_gpt.py under torchrun with 2 gloo processes on this machine."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "stack_gpt.py"] + argv,
                          cwd=HERE, capture_output=True, text=True, timeout=timeout)


def test_ranks_split_every_batch_between_them():
    """Under torchrun each rank takes its own rows of every micro-batch: together, exactly one process's rows."""
    shards = [np.arange(5000, dtype=np.uint16), np.arange(7000, 9000, dtype=np.uint16)]
    one = sg.TokenWindows(shards, 16, seed=3, device="cpu")
    ranks = [sg.TokenWindows(shards, 16, seed=3, device="cpu", rank=r, world=2) for r in (0, 1)]
    for _ in range(200):  # past the end of an epoch (436 windows, 4 a step): the next one's order too
        x, y = one.next_batch(4)
        halves = [loader.next_batch(2) for loader in ranks]
        assert torch.equal(torch.cat([h[0] for h in halves]), x) and torch.equal(torch.cat([h[1] for h in halves]), y)
    assert one.state_dict() == ranks[0].state_dict() == ranks[1].state_dict()


def test_ranks_average_their_gradients(monkeypatch):
    """Data parallel: each rank ends up with the mean of the ranks' gradients, not their sum. (Muon and
    Adam hardly notice a gradient's scale, so the losses of a two-process run cannot tell; this can.)"""
    model = trained_looking(tiny_config(n_layer=1))
    model(torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))).backward()
    mine = [p.grad.clone() for p in model.parameters()]
    others = [torch.randn_like(g) for g in mine]  # what the other rank computed on its rows
    pending = iter(others)
    monkeypatch.setattr(sg.dist, "all_reduce", lambda t: t.add_(next(pending)))  # gloo's sum over 2 ranks
    sg.average_gradients(model, world=2)
    for p, a, b in zip(model.parameters(), mine, others):
        assert torch.allclose(p.grad, (a + b) / 2), "gradients must be averaged over ranks"


def test_two_processes_match_one(tiny_data, tmp_path):
    """
    torchrun with 2 gloo processes trains like 1 process: each rank takes half of every batch and the ranks
    average their gradients, so the losses, val bpb and data position are one process's. The run itself
    checks that both ranks end each phase with the same weights, bit for bit. At nanochat's LRs the two agree
    to rounding (8e-8 on the AMD EPYC we measured; a 1e-6 change of the initial weights moves these
    losses by about 3e-6 by the end), so 1e-5 holds on any CPU while a rank that skipped the averaging or
    read the wrong rows would be off by percents. (At the 10x LRs of TINY, Adam's sign-like steps on
    near-zero gradients amplify rounding 300-fold, and the weights of the two runs differ where they flip:
    neither says anything about data parallelism.)
    """
    flags = TINY[:TINY.index("--matrix-lr")] + ["--data", tiny_data, "--device", "cpu"]
    sg.main(flags + ["--out-dir", str(tmp_path / "one")])
    result = torchrun_two(flags + ["--out-dir", str(tmp_path / "two")], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]  # includes the check that both ranks hold the same weights
    one, two = comparable(metrics_of(tmp_path / "one")), comparable(metrics_of(tmp_path / "two"))
    assert [(r["kind"], r.get("phase"), r.get("step")) for r in one] == [(r["kind"], r.get("phase"), r.get("step")) for r in two]
    for a, b in zip(one, two):
        for key in ("raw_loss", "loss", "val_bpb"):
            if key in a and isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a, b)
    final = [torch.load(tmp_path / d / "final.pt", weights_only=True) for d in ("one", "two")]
    assert final[0]["loader"] == final[1]["loader"]


@pytest.mark.parametrize("blocked", ["config.json", "checkpoint.pt"])
def test_a_failed_write_on_rank_0_stops_every_rank(tiny_data, tmp_path, blocked):
    """Only rank 0 writes files; when a write fails it exits with its one-line error, and torchrun stops the
    other rank, which would otherwise wait for rank 0 in the next collective (the timeout catches a hang)."""
    out = tmp_path / "run"
    os.makedirs(out / (blocked + ".tmp"))  # a folder where write_atomic wants its temp file: the write fails
    flags = TINY + ["--data", tiny_data, "--device", "cpu", "--save-every", "3", "--out-dir", str(out)]
    result = torchrun_two(flags, timeout=120)
    assert result.returncode != 0
    assert len(re.findall(r"^error: (cannot|could not) write", result.stderr, re.M)) == 1, result.stderr[-3000:]
    assert not os.path.exists(out / "final.pt")


LONG = TINY + ["--shallow-steps", "40", "--deep-steps", "40", "--eval-every", "10", "--save-every", "7"]


def run_and_kill_at(argv, phase, step):
    """
    Run stack_gpt.py in a subprocess that SIGKILLs itself right after logging `step` of `phase`:
    the same as a kill from outside at that moment (no cleanup runs), but at the same place on any machine.
    """
    child = ("import os, signal, sys, stack_gpt as sg\n"
             "log_train_line = sg.log_train_line\n"
             "def log_then_die(phase, steps_done, *rest):\n"
             "    log_train_line(phase, steps_done, *rest)\n"
             f"    if (phase.name, steps_done) == ({phase!r}, {step}):\n"
             "        os.kill(os.getpid(), signal.SIGKILL)\n"
             "sg.log_train_line = log_then_die\n"
             "sg.main(sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, "-c", child] + argv, cwd=HERE, capture_output=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def long_run(tiny_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "long")
    sg.main(LONG + ["--data", tiny_data, "--out-dir", out])
    return out


@pytest.mark.parametrize("phase", ["shallow", "deep"])
def test_killed_run_resumes_to_the_same_result(tiny_data, long_run, tmp_path, phase):
    out = str(tmp_path / "killed")
    run_and_kill_at(LONG + ["--data", tiny_data, "--out-dir", out], phase, 24)
    assert not os.path.exists(os.path.join(out, "final.pt"))
    _, saved = sg.resume_point(sg.resolve_args(["--resume", "--out-dir", out, "--compile"]))
    assert saved.compile and saved.shallow_steps == 40  # the machine's settings from this command, the rest from the run
    sg.main(["--resume", "--out-dir", out])  # the flags come from the checkpoint
    assert comparable(metrics_of(out)) == comparable(metrics_of(long_run))
    whole, resumed = (torch.load(os.path.join(d, "final.pt"), weights_only=True) for d in (long_run, out))
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])
    assert whole["loader"] == resumed["loader"]


def test_random_growth_is_reproduced_by_resume_and_init_from(tiny_data, tmp_path):
    """--grow random draws the new layers from the run's RNG: a run resumed before the growth, and one grown
    from the saved shallow model, draw the same layers as the uninterrupted run."""
    flags = TINY + ["--data", tiny_data, "--grow", "random", "--save-every", "2"]
    whole, resumed, grown = (str(tmp_path / name) for name in ("whole", "resumed", "grown"))
    sg.main(flags + ["--out-dir", whole])
    run_and_kill_at(flags + ["--out-dir", resumed], "shallow", 5)  # the last checkpoint is step 4
    sg.main(["--resume", "--out-dir", resumed])
    assert comparable(metrics_of(resumed)) == comparable(metrics_of(whole))
    sg.main(flags + ["--out-dir", grown, "--init-from", os.path.join(whole, "shallow.pt")])
    deep = lambda run: [r for r in comparable(metrics_of(run)) if r.get("phase") == "deep"]  # noqa: E731
    assert deep(grown) == deep(whole)


@pytest.mark.parametrize("stop_at, then", [(1, "the same command"), (8, "--resume --out-dir")])
def test_ctrl_c_names_the_command_that_goes_on(tiny_data, tmp_path, capsys, monkeypatch, stop_at, then):
    """
    Ctrl-C in training step `stop_at`: one line, exit 130, and the command it names works. Without --save-every
    the only checkpoint is shallow.pt, there from step 7 on, the deep phase.
    """
    flags, out, calls = TINY + ["--data", tiny_data], str(tmp_path / "run"), []

    def ctrl_c_in(*args):
        calls.append(len(calls) + 1)
        if calls[-1] == stop_at:
            raise KeyboardInterrupt
        return train_step(*args)

    train_step = sg.train_step
    monkeypatch.setattr(sg, "train_step", ctrl_c_in)
    with pytest.raises(SystemExit) as e:
        sg.main(flags + ["--out-dir", out])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 130 and err.startswith("stopped by Ctrl-C: ") and "\n" not in err and then in err, err
    monkeypatch.setattr(sg, "train_step", train_step)
    sg.main(["--resume", "--out-dir", out] if stop_at > 2 else flags + ["--out-dir", out])
    assert os.path.exists(os.path.join(out, "final.pt"))


def test_resume_of_a_finished_run_says_so(tiny_run, capsys):
    before = open(os.path.join(tiny_run, "metrics.jsonl")).read()
    sg.main(["--resume", "--out-dir", tiny_run])
    assert "already finished" in capsys.readouterr().out
    assert open(os.path.join(tiny_run, "metrics.jsonl")).read() == before


def test_resume_without_a_checkpoint(capsys, tmp_path):
    expect_usage_error(capsys, ["--resume", "--out-dir", str(tmp_path)], "--save-every")


def test_resume_of_a_checkpoint_older_than_a_flag_takes_its_default(tiny_run, tmp_path):
    ckpt = torch.load(os.path.join(tiny_run, "shallow.pt"), weights_only=True)
    for newer in ("lr_scale", "grow_at", "dtype"):
        del ckpt["args"][newer]
    torch.save(ckpt, tmp_path / "shallow.pt")
    _, saved = sg.resume_point(sg.resolve_args(["--resume", "--out-dir", str(tmp_path), "--device", "cpu"]))
    assert (saved.lr_scale, saved.grow_at, saved.dtype, saved.depth) == (1.0, None, "fp32", 1)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo this should never run",))


def test_bad_checkpoints_are_refused(capsys, tiny_run, tiny_data, tmp_path):
    good = open(os.path.join(tiny_run, "shallow.pt"), "rb").read()
    files = {"truncated.pt": good[:len(good) // 2], "random.pt": os.urandom(4096),
             "bare-pickle.pt": __import__("pickle").dumps(_Evil())}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"format": sg.CHECKPOINT_FORMAT, "payload": _Evil()}, tmp_path / "code.pt")
    torch.save({"model": {}}, tmp_path / "foreign.pt")  # a torch file, but not ours
    for name in ["truncated.pt", "random.pt", "bare-pickle.pt", "code.pt", "foreign.pt"]:
        argv = TINY + ["--data", tiny_data, "--out-dir", str(tmp_path / "run"), "--init-from", str(tmp_path / name)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            expect_usage_error(capsys, argv, f"{name} is no intact stack_gpt checkpoint (or it holds code): refused")
        assert [str(w.message) for w in caught] == []  # a warning would print lines around the one-line error
    assert not os.path.exists(tmp_path / "run")


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = trained_looking(tiny_config())
    optimizer = sg.build_optimizer(model, optimizer_args(), 2**19, 0.1)
    phase = sg.Phase("shallow", model.config, 10, 4096, 1000, 0.1, 0.0)
    loop = dict(loader=types.SimpleNamespace(state_dict=lambda: {"epoch": 0, "cursor": 3}),
                log=types.SimpleNamespace(lines=4), smooth_loss=torch.tensor(1.5), val_bpb={})
    args = types.SimpleNamespace(device="cpu", out_dir=str(tmp_path), x=1)
    path = str(tmp_path / "checkpoint.pt")
    sg.save_checkpoint("checkpoint.pt", model, optimizer, args, phase, 1, **loop)

    def interrupted(*a):
        raise KeyboardInterrupt  # Ctrl-C (or a crash) after the temp file is written, before the rename
    monkeypatch.setattr(sg.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sg.save_checkpoint("checkpoint.pt", model, optimizer, args, phase, 2, **loop)
    monkeypatch.undo()

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(sg.torch, "save", disk_full)
    with pytest.raises(sg.UsageError, match="free some disk space"):
        sg.save_checkpoint("checkpoint.pt", model, optimizer, args, phase, 3, **loop)
    monkeypatch.undo()
    assert sg.load_checkpoint(path)["step"] == 1 and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_a_metrics_file_that_cannot_be_appended_is_a_usage_error(tmp_path, capsys):
    log = sg.MetricsLog(str(tmp_path / "gone" / "metrics.jsonl"), 0)  # the run folder vanished mid-run
    with pytest.raises(sg.UsageError, match="cannot write to .*gone/metrics.jsonl .No such file or directory.: fix it, then --resume"):
        log("step 10", step=10)
    log.path = "/dev/full"  # Linux's always-full device: every write fails with ENOSPC
    with pytest.raises(sg.UsageError, match="No space left on device"):
        log("step 10", step=10)
    assert log.lines == 0


def test_nan_between_log_lines_never_becomes_a_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "nan")
    real = sg.lr_multiplier
    monkeypatch.setattr(sg, "lr_multiplier", lambda step, steps, *a: float("nan") if steps == 10 and step == 1 else real(step, steps, *a))
    with pytest.raises(SystemExit) as e:
        sg.main(TINY + ["--data", tiny_data, "--out-dir", out, "--log-every", "10", "--save-every", "4"])
    assert e.value.code == 1 and "by step 4" in capsys.readouterr().err
    ckpt = sg.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert (ckpt["phase"], ckpt["step"]) == ("shallow", 4) and math.isfinite(ckpt["smooth_loss"])


# -----------------------------------------------------------------------------
# The GPU path (bf16 autocast, bf16 tables and Polar Express, torch.compile), run on the CPU too

SHORT_BASELINE = ["--depth", "1"] + TINY[4:] + ["--deep-steps", "4", "--eval-every", "0", "--device", "cpu"]


def train_losses(run_dir):
    return [r["raw_loss"] for r in metrics_of(run_dir) if r["kind"] == "train"]


def final_bpb(run_dir):
    return metrics_of(run_dir)[-1]["val_bpb"]["baseline"]


@pytest.fixture(scope="module")
def bf16_run(tiny_data, tmp_path_factory):
    """A short run in the GPU's precision (eager), recording the dtypes Polar Express computed in."""
    out = str(tmp_path_factory.mktemp("runs") / "bf16")
    with pytest.MonkeyPatch.context() as monkeypatch:
        seen = spy_on_polar_express(monkeypatch)
        sg.main(SHORT_BASELINE + ["--data", tiny_data, "--out-dir", out, "--dtype", "bf16"])
    return out, seen


def test_bf16_on_the_cpu_trains_like_fp32(bf16_run, tiny_data, tmp_path):
    out, polar_dtypes = bf16_run
    fp32_run = str(tmp_path / "fp32")
    sg.main(SHORT_BASELINE + ["--data", tiny_data, "--out-dir", fp32_run])
    bf16, fp32 = train_losses(out), train_losses(fp32_run)
    assert set(polar_dtypes) == {torch.bfloat16}
    assert bf16 != fp32  # autocast really changed the arithmetic ...
    assert bf16 == pytest.approx(fp32, rel=0.02) and final_bpb(out) == pytest.approx(final_bpb(fp32_run), rel=0.02)  # ... by rounding only
    ckpt = sg.load_checkpoint(os.path.join(out, "final.pt"))
    assert ckpt["model"]["wte.weight"].dtype == torch.bfloat16 and ckpt["model"]["lm_head.weight"].dtype == torch.float32
    assert ckpt["args"]["dtype"] == "bf16"


def test_compiled_bf16_run_on_the_cpu_matches_eager(tiny_data, tmp_path, monkeypatch):
    """The GPU path (bf16 and compile: training steps and evaluations, through a growth) by inductor on the
    CPU, against the same run eager; and growth frees the compiled shallow model as it does the eager one.
    Inductor writes plain C++ here, with no vector instructions to probe for or compile: the same graphs, and
    a first run (a cold inductor cache) that takes about 22 s instead of 38 s (experiments.md, "The suite")."""
    import torch._inductor.config  # torch.compile's own import of it comes later
    monkeypatch.setattr(torch._inductor.config.cpp, "vec_isa_ok", False)
    flags = TINY + ["--data", tiny_data, "--shallow-steps", "2", "--deep-steps", "3", "--eval-every", "0",
                    "--dtype", "bf16", "--device", "cpu", "--sample-tokens", "0"]
    sg.main(flags + ["--out-dir", str(tmp_path / "eager")])
    freed = growth_freeing_probes(monkeypatch)
    sg.main(flags + ["--out-dir", str(tmp_path / "compiled"), "--compile"])
    assert freed == [[True, True]]
    assert train_losses(tmp_path / "compiled") == pytest.approx(train_losses(tmp_path / "eager"), rel=0.01)
    bpb = [metrics_of(tmp_path / run)[-1]["val_bpb"]["deep"] for run in ("compiled", "eager")]
    assert bpb[0] == pytest.approx(bpb[1], rel=0.01)


# CUDA only: MFU and the real thing

@cuda_only
def test_cuda_bf16_compiled_training_step_and_mfu(tiny_data, tmp_path, capsys):
    out = str(tmp_path / "cuda")
    sg.main(TINY + ["--data", tiny_data, "--out-dir", out, "--device", "cuda", "--compile"])
    records = metrics_of(out)
    train = [r for r in records if r["kind"] == "train"]
    assert all(math.isfinite(r["raw_loss"]) for r in train)
    name = torch.cuda.get_device_name().lower()
    if any(all(k in name for k in keys) for keys, _ in sg.PEAK_BF16_FLOPS):  # a GPU in the table
        assert all(r["mfu"] is not None and r["mfu"] > 0 for r in train)
    ckpt = sg.load_checkpoint(os.path.join(out, "final.pt"))
    assert ckpt["model"]["wte.weight"].dtype == torch.bfloat16


# -----------------------------------------------------------------------------
# Reports: the acceleration report and --compare (sg.py)

def writeup_metrics():
    """The write-up's numbers as metrics: baseline d12 ends at train loss 2.980 after 9.27e17 FLOPs;
    the stacked run spends 1.06e17 on d6s12, then 8.21e17 over 1953 deep steps, reaching 2.980 at step 1835."""
    baseline = [{"kind": "train", "phase": "baseline", "step": 2205, "loss": 2.980, "flops": 9.27e17},
                {"kind": "eval", "phase": "baseline", "step": 2205, "val_bpb": 0.9095, "flops": 9.27e17}]
    stacked = [{"kind": "eval", "phase": "shallow", "step": 0, "val_bpb": 3.0, "flops": 0.0}]
    for step in range(1, 1954):
        loss = 2.980 + 0.001 * (1835 - step) if step != 1835 else 2.980
        stacked.append({"kind": "train", "phase": "deep", "step": step, "loss": loss, "flops": 1.06e17 + step / 1953 * 8.21e17})
    stacked.append({"kind": "eval", "phase": "deep", "step": 1953, "val_bpb": 0.9086, "flops": 1.06e17 + 8.21e17})
    return baseline, stacked


def test_acceleration_report_reproduces_the_writeup():
    baseline, stacked = writeup_metrics()
    row = sg.acceleration(baseline, stacked, "d6s12")
    assert row["loss_fraction"] == pytest.approx(0.946, abs=5e-4)
    assert row["loss_saving"] == pytest.approx(0.054, abs=5e-4)
    assert row["loss_speedup"] == pytest.approx(1 / 0.946 - 1, abs=1e-3)
    # 3.0 at 0 FLOPs, 0.9086 at 9.27e17: the straight line between them meets 0.9095 just before the end
    assert row["bpb_fraction"] == pytest.approx((3.0 - 0.9095) / (3.0 - 0.9086)) and row["val_bpb_at_budget"] == 0.9086
    table = sg.format_report([row])
    assert "| d6s12 | 0.9086 | 9.270e+17 | 0.9086 | 94.6% | 5.4% | 5.7% |" in table


def test_acceleration_report_when_the_baseline_is_never_reached(tmp_path, capsys):
    baseline, stacked = writeup_metrics()
    worse = [{**r, "loss": r["loss"] + 1} if r["kind"] == "train" else {**r, "val_bpb": r["val_bpb"] + 1} for r in stacked]
    row = sg.acceleration(baseline, worse, "worse")
    assert row["loss_fraction"] is None and row["bpb_saving"] is None
    assert "| not reached | not reached | not reached |" in sg.format_report([row])
    for name, records in (("base", baseline), ("worse", worse)):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    sg.main(["--compare", str(tmp_path / "base"), str(tmp_path / "worse" / "metrics.jsonl")])
    assert "not reached" in capsys.readouterr().out
    expect_usage_error(capsys, ["--compare", str(tmp_path / "base"), str(tmp_path / "missing")], "cannot read the metrics")
    expect_usage_error(capsys, ["--compare", str(tmp_path / "base")], "at least one run")


def crossing_metrics(run_bpb):
    """A baseline ending at val bpb 1.0 (train loss 2.0) after 100 FLOPs, and a run whose evaluations are
    run_bpb: [(flops, val bpb)], with its train loss at twice its val bpb."""
    baseline = [{"kind": "train", "loss": 2.0, "flops": 100.0}, {"kind": "eval", "val_bpb": 1.0, "flops": 100.0}]
    run = []
    for flops, bpb in run_bpb:
        run += [{"kind": "train", "loss": 2 * bpb, "flops": flops}, {"kind": "eval", "val_bpb": bpb, "flops": flops}]
    return baseline, run


def test_acceleration_interpolates_the_crossing_between_records():
    # 1.5 at 40 FLOPs, 0.5 at 60: the straight line between them meets 1.0 halfway, at 50
    row = sg.acceleration(*crossing_metrics([(0.0, 3.0), (40.0, 1.5), (60.0, 0.5), (100.0, 0.4)]), "run")
    assert row["bpb_fraction"] == pytest.approx(0.5) and row["bpb_saving"] == pytest.approx(0.5) and row["bpb_speedup"] == pytest.approx(1.0)
    assert row["loss_fraction"] == pytest.approx(0.5)  # the train loss crosses the same way
    # the first record at or below the target, not the last one above it: 1.2 at 20 -> 0.9 at 30 (after 1.1 at 10)
    row = sg.acceleration(*crossing_metrics([(0.0, 3.0), (10.0, 1.1), (20.0, 1.2), (30.0, 0.9), (100.0, 0.4)]), "run")
    assert row["bpb_fraction"] == pytest.approx((20 + 10 * 0.2 / 0.3) / 100)
    # a record exactly at the target is where it is reached
    row = sg.acceleration(*crossing_metrics([(0.0, 3.0), (70.0, 1.0), (100.0, 0.4)]), "run")
    assert row["bpb_fraction"] == pytest.approx(0.7)


def test_acceleration_when_the_first_record_is_already_there_or_never():
    row = sg.acceleration(*crossing_metrics([(10.0, 0.9), (100.0, 0.4)]), "run")
    assert row["bpb_fraction"] == pytest.approx(0.1)  # its own FLOPs: there is nothing before it to interpolate from
    row = sg.acceleration(*crossing_metrics([(0.0, 3.0), (100.0, 1.01)]), "run")
    assert row["bpb_fraction"] is None and row["bpb_saving"] is None
    assert "not reached" in sg.format_report([row])


def test_compute_ratio_at_the_val_bpb_both_reach():
    """sweeps.py's compute ratio: a run that never reaches the baseline is charged its FLOPs over the baseline's to the run's final val bpb; one that does, bpb_fraction."""
    baseline = [{"kind": "train", "loss": 2.0, "flops": 100.0}] + [{"kind": "eval", "val_bpb": bpb, "flops": flops}
                                                                    for flops, bpb in ((0.0, 3.0), (50.0, 1.2), (100.0, 1.0))]
    # ends at 1.1 after 100 FLOPs, where the baseline's line from 1.2 at 50 to 1.0 at 100 is at 75
    row = sweeps.acceleration(baseline, crossing_metrics([(0.0, 3.0), (100.0, 1.1)])[1], "worse")
    assert row["bpb_fraction"] is None and row["bpb_compute_ratio"] == pytest.approx(100 / 75)
    row = sweeps.acceleration(baseline, crossing_metrics([(0.0, 3.0), (40.0, 1.5), (60.0, 0.5), (100.0, 0.4)])[1], "better")
    assert row["bpb_compute_ratio"] == row["bpb_fraction"] == pytest.approx(0.5)
    row = sweeps.acceleration(baseline, crossing_metrics([(0.0, 3.0), (100.0, 3.5)])[1], "diverged")  # the untrained baseline is better
    assert row["bpb_compute_ratio"] is None


def test_plot_runs_curves_and_growth_without_matplotlib(tmp_path, monkeypatch, capsys):
    """experiments/plot_runs.py: val bpb against FLOPs, growth at the first deep eval; without
    matplotlib (or given a folder without metrics) one line and exit 2."""
    import plot_runs  # experiments/ is on sys.path (above)

    def log(phase, evals):
        return [{"kind": "eval", "phase": phase, "val_bpb": bpb, "flops": flops} for flops, bpb in evals]
    # made up: the last shallow eval (FLOPs 40) apart from the first deep one (50), a train record between
    stacked = log("shallow", [(0.0, 3.4), (40.0, 1.7)]) + [{"kind": "train", "phase": "deep", "flops": 45.0}]
    stacked += log("deep", [(50.0, 4.7), (100.0, 1.4)])
    assert plot_runs.curves(stacked) == ([(0.0, 3.4), (40.0, 1.7), (50.0, 4.7), (100.0, 1.4)], 50.0)
    baseline = log("baseline", [(0.0, 3.4), (60.0, 1.6), (100.0, 1.3)])
    assert plot_runs.curves(baseline) == ([(0.0, 3.4), (60.0, 1.6), (100.0, 1.3)], None)
    for name, records in (("d2s4", stacked), ("d4", baseline)):
        (tmp_path / name).mkdir()
        records = records + [{"kind": "train", "phase": records[0]["phase"], "flops": 1.0}]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = ["--out", str(tmp_path / "plot.png")]
    for runs, hint in ((["d4", "d2s4"], "pip install matplotlib"), (["."], "cannot read the metrics")):
        with pytest.raises(SystemExit) as exit:
            plot_runs.main([str(tmp_path / run) for run in runs] + out)
        err = capsys.readouterr().err
        assert exit.value.code == 2 and hint in err and err.count("\n") == 1, err
    assert not (tmp_path / "plot.png").exists()


# Student's t in experiments/sweeps.py (no scipy)

def test_t_p_values_match_the_tables_and_closed_forms():
    for t, df, p in [(2.306, 8, 0.05), (4.303, 2, 0.05), (12.706, 1, 0.05), (3.355, 8, 0.01), (1.96, 1e6, 0.05)]:
        assert sweeps.t_two_sided_p(t, df) == pytest.approx(p, abs=5e-4)
    for t in (0.0, 0.3, 1.0, 2.5, 10.0, 300.0):
        assert sweeps.t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-9, abs=1e-12)  # Cauchy
        assert sweeps.t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9, abs=1e-12)
        assert sweeps.t_two_sided_p(-t, 5) == sweeps.t_two_sided_p(t, 5)


def test_t_critical_values_match_the_table():
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228, 30: 2.042}
    for df, t in table.items():
        assert sweeps.t_critical(0.05, df) == pytest.approx(t, abs=5e-4)
    assert sweeps.t_critical(0.01, 8) == pytest.approx(3.355, abs=5e-4)
    assert sweeps.t_two_sided_p(sweeps.t_critical(0.05, 2.5), 2.5) == pytest.approx(0.05)  # a Welch-like df between whole ones


def test_paired_and_welch_tests():
    mean, half, t, p = sweeps.paired_test([1.0, 2.0, 3.0])  # mean 2, std 1, standard error 1/sqrt(3)
    assert (mean, t) == (2.0, pytest.approx(2 * math.sqrt(3)))
    assert half == pytest.approx(4.303 / math.sqrt(3), abs=1e-3) and p == pytest.approx(1 - t / math.sqrt(t * t + 2))
    assert sweeps.paired_difference([0.01, 0.02, 0.03]) == "+0.0200 ± 0.0248, worse in 3/3 seeds: no significant difference"
    difference, half, t, df, p = sweeps.welch_test([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])  # variances of the means 1/3 and 4/3
    assert difference == -2.0 and t == pytest.approx(-2 / math.sqrt(5 / 3))
    assert df == pytest.approx((5 / 3) ** 2 / ((1 / 3) ** 2 / 2 + (4 / 3) ** 2 / 2))  # Welch-Satterthwaite: 50/17
    assert p == pytest.approx(sweeps.t_two_sided_p(t, 50 / 17)) and half == pytest.approx(sweeps.t_critical(0.05, 50 / 17) * math.sqrt(5 / 3))
    # no spread at all: every seed moved by the same amount (certain), or by nothing (no evidence)
    assert sweeps.paired_test([0.01, 0.01, 0.01])[2:] == (math.inf, 0.0) and sweeps.paired_test([0.0, 0.0])[2:] == (0.0, 1.0)
    assert sweeps.welch_test([1.0, 1.0], [2.0, 2.0])[2:] == (-math.inf, 2, 0.0)


def test_rank_tests_need_no_normality():
    # one negative difference, the smallest: of the 256 equally likely sign patterns, 4 put a rank sum of 0 or 1 on one side
    differences = [0.0028, 0.0024, 0.0038, 0.0074, 0.0025, 0.0029, -0.0011, 0.0060]
    assert sweeps.signed_rank_p(differences) == 4 / 256 and sweeps.signed_rank_p([-d for d in differences]) == 4 / 256
    assert sweeps.signed_rank_p([1.0, 2.0, 3.0, 4.0, 5.0]) == 2 / 32  # all positive: the smallest p five seeds can give
    assert sweeps.signed_rank_p([1.0, 1.0, 1.0]) == 2 / 8  # ties share rank 2: sums 0, 2, 4 or 6, and only 0 and 6 are as far out
    assert sweeps.signed_rank_p([1.0, -1.0, 2.0, -2.0]) == 1.0 and sweeps.signed_rank_p([0.0, 3.0]) == 1.0  # balanced; a zero drops out
    assert sweeps.sign_test_p(differences) == pytest.approx(2 * 9 / 256)  # 7 of 8: 2 * (C(8,0) + C(8,1)) / 2^8
    assert sweeps.sign_test_p([0.0, 1.0, -1.0]) == 1.0 and sweeps.sign_test_p([1.0] * 10) == pytest.approx(2 / 1024)



def fake_sweep_run(sweep, name, final_bpb, stacked=False, grow_at=0.2, budget=8.66e13, start_bpb=3.0):
    """
    A finished run's metrics as sweeps.py reads them: val bpb falling in a straight line from start_bpb to final_bpb.
    A stacked run's plan grows after `grow_at` of the budget from a shallow model at 0.6 of the deep one's FLOPs per token.
    """
    phase = "deep" if stacked else "baseline"
    shallow, deep = {"flops": grow_at * budget, "flops_per_token": 0.6}, {"flops": (1 - grow_at) * budget, "flops_per_token": 1}
    plan = {"kind": "plan", "phases": [shallow, deep]}
    evals = [{"kind": "eval", "phase": phase, "step": i, "flops": budget * i / 10,
              "val_bpb": start_bpb + (final_bpb - start_bpb) * i / 10}
             for i in range(11)]
    trains = [{"kind": "train", "phase": phase, "step": i, "flops": r["flops"], "loss": r["val_bpb"] * 2} for i, r in enumerate(evals)]
    summary = {"kind": "summary", "val_bpb": {**({"shallow": 1.7} if stacked else {}), phase: final_bpb}, "flops": budget}
    os.makedirs(f"{sweeps.RUNS}/{sweep}/{name}", exist_ok=True)
    with open(f"{sweeps.RUNS}/{sweep}/{name}/metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in [plan] * stacked + trains + evals + [summary])


def test_sweep_streams_skip_runs_of_other_streams_and_wait_for_them(tmp_path, monkeypatch):
    """run(): a finished run is skipped, one another stream is writing is left to it, and with only such left the stream waits."""
    monkeypatch.chdir(tmp_path)
    os.makedirs(sweeps.DATA)
    open(f"{sweeps.DATA}/meta.json", "w").close()
    monkeypatch.setattr(sweeps, "sweeps", lambda: {"demo": [(name, ["--depth", "4"]) for name in ("a-s0", "b-s0", "c-s0", "d-s0")]})
    fake_sweep_run("demo", "a-s0", 1.0)
    os.makedirs(f"{sweeps.RUNS}/demo/b-s0")
    with open(f"{sweeps.RUNS}/demo/b-s0/metrics.jsonl", "w") as f:  # started, unfinished, and still being written
        f.write(json.dumps({"kind": "plan"}) + "\n")
    stale = time.time() - sweeps.RUNNING_SECONDS - 1
    fake_sweep_run("demo", "c-s0", 1.0)
    with open(f"{sweeps.RUNS}/demo/c-s0/metrics.jsonl", "w") as f:  # an interrupted run: its file stopped changing
        f.write(json.dumps({"kind": "plan"}) + "\n")
    os.utime(f"{sweeps.RUNS}/demo/c-s0/metrics.jsonl", (stale, stale))
    started, waits = [], []

    def train(command, check):  # a run that finishes at once; meanwhile its claim marks it as taken
        name = os.path.basename(command[command.index("--out-dir") + 1])
        assert sweeps.running_elsewhere("demo", name)
        started.append(name)
        fake_sweep_run("demo", name, 1.0)

    def sleep(seconds):  # the other stream finishes b-s0 while this one waits
        waits.append(seconds)
        fake_sweep_run("demo", "b-s0", 1.0)

    monkeypatch.setattr(sweeps.subprocess, "run", train)
    monkeypatch.setattr(sweeps.time, "sleep", sleep)
    sweeps.run(["demo"], [])
    assert started == ["c-s0", "d-s0"] and waits == [60] and sweeps.claim("demo", []) is None
    monkeypatch.setattr(sweeps, "sweeps", lambda: {"demo": [("e-s0", []), ("f-s0", [])]})
    assert [sweeps.claim("demo", []) for _ in range(3)] == [("e-s0", []), ("f-s0", []), "wait"]  # a claimed run is not handed out twice


def test_sweep_streams_go_on_to_the_next_sweep_and_wait_for_a_checkpoint(tmp_path, monkeypatch):
    """next_run(): while a sweep's unfinished runs all run elsewhere, a stream takes the next sweep's; a run waits
    while the run whose checkpoint it starts from (--init-from) is still running in another stream."""
    monkeypatch.chdir(tmp_path)
    shallow = f"{sweeps.RUNS}/one/a-s0/shallow.pt"
    monkeypatch.setattr(sweeps, "sweeps", lambda: {"one": [("a-s0", []), ("b-s0", ["--init-from", shallow])],
                                                   "two": [("c-s0", [])]})
    assert sweeps.next_run(["one", "two"], []) == ("one", "a-s0", [])
    assert sweeps.next_run(["one", "two"], []) == ("two", "c-s0", [])  # b-s0 needs a-s0's checkpoint, still being written
    assert sweeps.next_run(["one", "two"], []) == "wait"
    stale = time.time() - sweeps.RUNNING_SECONDS - 1
    os.utime(sweeps.metrics_path("one", "a-s0"), (stale, stale))  # a-s0's stream died: its run is handed out again
    assert sweeps.next_run(["one", "two"], []) == ("one", "a-s0", [])
    fake_sweep_run("one", "a-s0", 1.0)
    assert sweeps.next_run(["one", "two"], []) == ("one", "b-s0", ["--init-from", shallow])
    fake_sweep_run("one", "b-s0", 1.0)
    fake_sweep_run("two", "c-s0", 1.0)
    assert sweeps.next_run(["one", "two"], []) is None


def test_part2_rules_pick_each_step_and_list_the_next(tmp_path, monkeypatch):
    """Part 2's decision rules (experiments.md) on made-up results: each step's winner, and the runs it adds."""
    monkeypatch.chdir(tmp_path)
    names = lambda sweep: [name for name, _ in sweeps.sweeps()[sweep]]
    for scale, bpb in {"1": 1.12, "2": 1.02, "4": 0.99, "0.5": 1.38}.items():
        for seed in (0, 1):
            fake_sweep_run("tune-lr", f"lr{scale}-s{seed}", bpb + 0.001 * seed)
    assert sweeps.tuned_lr_scale() is None and "lr8-s1" in names("tune-lr")  # x4 won at the edge: the range grows
    for scale, bpb in {"8": 0.987, "16": 1.003}.items():
        for seed in (0, 1):
            fake_sweep_run("tune-lr", f"lr{scale}-s{seed}", bpb)
    assert sweeps.tuned_lr_scale() == "8" and "lr32-s0" not in names("tune-lr")  # x8 is inside the range now
    assert names("tune-warmdown") == ["lr8-wd0.3-s0", "lr8-wd0.7-s0", "lr8-wd0.3-s1", "lr8-wd0.7-s1"] and names("grow-at") == []
    for seed in (0, 1):
        fake_sweep_run("tune-warmdown", f"lr8-wd0.3-s{seed}", 0.9855)  # better by 0.0015, within the tie margin: 0.5 stays
        fake_sweep_run("tune-warmdown", f"lr8-wd0.7-s{seed}", 0.990)
    assert sweeps.tuned_settings() == ("8", "0.5")
    arms = ["at0.2", "at0.4", "at0.6", "at0.6-wd0.15", "at0.8", "at0.8-wd0.15"]  # growth inside the decay also runs at 0.15
    assert names("grow-at") == [f"{arm}-s0" for arm in arms] + [f"{arm}-s1" for arm in arms] + ["baseline-s2"] + [f"{arm}-s2" for arm in arms]
    assert names("confirm") == [f"baseline-s{s}" for s in range(3, 8)]  # the arm's runs wait for step 2's winner
    fake_sweep_run("grow-at", "baseline-s2", 0.990)
    for seed in (0, 1, 2):
        for arm, bpb in zip(arms, (1.01, 0.995, 0.985, 0.982, 0.99, 0.975)):
            fake_sweep_run("grow-at", f"{arm}-s{seed}", bpb + 0.001 * seed, stacked=True)
    assert sweeps.best_growth_arm("8", "0.5") == "at0.8-wd0.15"
    # every fake curve is a straight line from 3.0, so a run at final val bpb x and its baseline at b reach the worse
    # of the two at FLOPs in the ratio (3 - b) / (3 - x), whichever ends better: the signed saving is 1 minus that
    row = next(line for line in sweeps.part2_report() if line.startswith("| at0.2 |"))
    savings = [1 - (3 - b) / (3 - (1.01 + 0.001 * seed)) for seed, b in ((0, 0.987), (1, 0.987), (2, 0.990))]
    assert f"| {100 * statistics.mean(savings):+.1f}% ± " in row and "-1.2%" in row
    assert names("confirm") == [f"baseline-s{s}" for s in range(3, 8)] + [f"at0.8-wd0.15-s{s}" for s in range(3, 8)]
    for seed in range(3, 8):
        fake_sweep_run("confirm", f"baseline-s{seed}", 0.988 + 0.001 * seed)
        fake_sweep_run("confirm", f"at0.8-wd0.15-s{seed}", 0.975 + 0.0012 * seed, stacked=True)
    report = "\n".join(sweeps.part2_report())
    assert "Winner by the rule (lowest mean, ties within 0.002 to the multiplier nearer 1): --lr-scale 8." in report
    assert "The tuned baseline: --lr-scale 8 --warmdown-ratio 0.5." in report and "Best arm by the rule (lowest mean final val bpb): at0.8-wd0.15." in report
    assert "| at0.8-wd0.15 | 80% | 0.15 | 3 |" in report and "- Paired t-test (arm minus the baseline of the same seed, 8 seeds)" in report
    assert "Verdict (stacking beats the tuned baseline only if the paired 95% interval lies below zero): stacking (at0.8-wd0.15) beats the tuned baseline." in report
    assert "Compute saved over the 8 seeds (mean ± std): +" in report and "; ahead of the baseline in 8 of 8." in report
    during = next(line for line in report.splitlines() if line.startswith("Stacked minus baseline during the run"))
    at = {share: float(re.search(rf"at {share}% ([-+][0-9.]+) ", during).group(1)) for share in (25, 50, 75, 100)}
    for share in (25, 50, 75):  # straight lines from the same start: the gap grows in proportion to the FLOPs spent
        assert at[share] == pytest.approx(share / 100 * at[100], abs=1e-4)
    assert at[100] < 0 and during.endswith("(8 of 8 ahead).")
    assert "above 0 too large" in report and "- Without assuming normal differences: Wilcoxon's signed-rank test (exact) p = " in report
    saving = 1 - (3 - 0.991) / (3 - 0.9786)  # seed 3, reached: the same straight-line ratio as in step 2
    assert f"| 3 | 0.9910 | 0.9786 | -0.0124 | {100 * saving:+.1f}% | {100 * (1 / (1 - saving) - 1):+.1f}% |" in report
    fake_sweep_run("confirm", "at0.8-wd0.15-s3", 3.5, stacked=True)  # diverged: worse than the untrained baseline
    assert "| 3 | 0.9910 | 3.5000 | +2.5090 | not reached | not reached |" in "\n".join(sweeps.part2_report())
    for seed in range(3, 8):  # the same arm, but worse than the baseline in the confirmation seeds
        fake_sweep_run("confirm", f"at0.8-wd0.15-s{seed}", 0.999, stacked=True)
    report = "\n".join(sweeps.part2_report())
    assert "stacking (at0.8-wd0.15) does not beat the tuned baseline." in report and "ahead of the baseline in 3 of 8." in report

def test_part3_rules_confirm_an_arm_only_when_it_is_ahead(tmp_path, monkeypatch):
    """
    Part 3, step 2 (experiments.md) on made-up results: an arm goes on to the fresh seeds only if its paired mean over
    seeds 0-2 is below zero; the parabola through growth at 20% at three LRs; each arm beside its cheap-token ceiling.
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweeps, "tuned_settings", lambda: ("8", "0.5"))
    names = lambda sweep: [name for name, _ in sweeps.sweeps()[sweep]]
    arms = ("at0.2-lr5.66", "at0.2-lr11.3", "at0.1")
    assert names("tune-stacked") == [f"{arm}-s{s}" for arm in arms for s in (0, 1, 2)] and names("confirm-stacked") == []
    for seed, (sweep, name) in enumerate([("tune-lr", "lr8-s0"), ("tune-lr", "lr8-s1"), ("grow-at", "baseline-s2")]):
        fake_sweep_run(sweep, name, 0.990)
        fake_sweep_run("grow-at", f"at0.2-s{seed}", 0.993, stacked=True)
        for arm, bpb in zip(arms, (0.995, 0.997, 0.9885 + 0.0005 * seed)):  # at0.1: ahead by 0.001 on average
            if (arm, seed) != ("at0.1", 2):
                fake_sweep_run("tune-stacked", f"{arm}-s{seed}", bpb, stacked=True, grow_at=float(arm[2:5]))
    assert sweeps.arms_ahead("8", "0.5") is None and names("confirm-stacked") == []  # at0.1-s2 is still running
    fake_sweep_run("tune-stacked", "at0.1-s2", 0.9895, stacked=True, grow_at=0.1)
    assert sweeps.arms_ahead("8", "0.5") == ["at0.1"]
    fresh = range(8, 14)
    assert names("confirm-stacked") == [f"baseline-s{s}" for s in fresh] + [f"at0.1-s{s}" for s in fresh]
    # by hand, for LRs half an octave apart: the vertex sits h (y- - y+) / (2 (y- - 2 y0 + y+)) = -1/12 octave from x8,
    # and the curvature (y- - 2 y0 + y+) / (2 h^2) = 0.012 per octave squared puts it 0.012 / 144 below x8's value
    report = "\n".join(sweeps.part3_report())
    best, gain = map(float, re.search(r"best --lr-scale ([0-9.]+), ([-+][0-9.]+) bpb", report).groups())
    assert best == pytest.approx(8 * 2 ** (-1 / 12), rel=2e-3) and gain == -0.0001
    assert "where at0.2 ends +0.0030 behind the tuned baseline." in report and "extrapolation" not in report
    assert "By the rule (paired mean below zero): at0.1 goes on to seeds 8-13." in report
    assert "| at0.1 | 10% | 8 | 3 | 0.9890 ± 0.0005 | -0.0010 ± 0.0012, worse in 0/3 seeds: no significant difference |" in report
    assert "| Part 3 | at0.1 | 3 | 6.7% |" in report and "| Part 2 | at0.2 | 3 | 13.3% | " in report  # 0.1 and 0.2 * (1 / 0.6 - 1)
    for seed in fresh:
        fake_sweep_run("confirm-stacked", f"baseline-s{seed}", 0.990 + 0.0001 * seed)
        fake_sweep_run("confirm-stacked", f"at0.1-s{seed}", 0.988 + 0.0001 * seed + 0.0005 * (seed % 2), stacked=True, grow_at=0.1)
    report = "\n".join(sweeps.part3_report())
    assert "Verdict: at0.1 beats the tuned baseline." in report and "its cheap-token ceiling: 6.7%." in report
    assert "| Part 3, fresh seeds | at0.1 | 6 | 6.7% |" in report and "| Part 3 | at0.1 | 3 | 6.7% |" in report
    assert "| 8 | 0.9908 | 0.9888 | -0.0020 |" in report and "| 13 | 0.9913 | 0.9898 | -0.0015 |" in report
    # the fake curves are straight lines at the same FLOPs, so the mean difference grows with the share: -0.00175 x share
    assert "during the run (val bpb at equal FLOPs, mean of the seeds; share of the budget): at 25% -0.0004 (6 of 6 " \
           "ahead), at 50% -0.0009 (6 of 6 ahead), at 75% -0.0013 (6 of 6 ahead)" in report
    for seed in fresh:
        fake_sweep_run("confirm-stacked", f"at0.1-s{seed}", 0.991, stacked=True, grow_at=0.1)
    assert "Verdict: at0.1 does not beat the tuned baseline." in "\n".join(sweeps.part3_report())


def test_part3_room_rules_tune_the_baseline_then_the_growth_point_then_its_lr(tmp_path, monkeypatch):
    """Part 3, step 3 (experiments.md) on made-up results: each rule's choice, and the runs it adds."""
    monkeypatch.chdir(tmp_path)
    names = lambda sweep: [name for name, _ in sweeps.sweeps()[sweep]]
    assert names("room-lr") == [f"lr{m}-s{s}" for s in (0, 1) for m in ("8", "4", "16")] and names("room-grow") == []
    assert "data/pylibs-512" in sweeps.command("room-lr", "lr8-s0", sweeps.sweeps()["room-lr"][0][1])
    for seed in (0, 1):
        for scale, bpb in {"8": 1.000, "4": 1.010, "16": 0.9985}.items():  # x16 better by 0.0015: a tie, x8 stays
            fake_sweep_run("room-lr", f"lr{scale}-s{seed}", bpb)
    assert sweeps.room_lr() == "8" and names("room-grow") == [f"at{x}-s{s}" for x in ("0.1", "0.2", "0.4") for s in (0, 1)]
    flags = dict(sweeps.sweeps()["room-grow"])["at0.2-s0"]
    assert flags[:4] == ["--data", "data/pylibs-512", "--depth", "1"] and sweeps.flag_value(flags, "--grow-at") == "0.2"
    for seed in (0, 1):
        for share, bpb in {"0.1": 1.002, "0.2": 0.997, "0.4": 1.004}.items():
            fake_sweep_run("room-grow", f"at{share}-s{seed}", bpb, stacked=True)
    assert names("room-grow")[6:] == ["at0.2-lr5.66-s0", "at0.2-lr5.66-s1", "at0.2-lr11.3-s0", "at0.2-lr11.3-s1"]
    assert sweeps.best_room_arm("8") is None and names("room-confirm") == []  # the LR arms are still to run
    for seed in (0, 1):
        fake_sweep_run("room-grow", f"at0.2-lr5.66-s{seed}", 0.999, stacked=True)
        fake_sweep_run("room-grow", f"at0.2-lr11.3-s{seed}", 0.996, stacked=True)
    assert sweeps.best_room_arm("8") == "at0.2-lr11.3"
    fresh = range(8, 14)
    assert names("room-confirm") == [f"baseline-s{s}" for s in fresh] + [f"at0.2-lr11.3-s{s}" for s in fresh]
    assert sweeps.flag_value(dict(sweeps.sweeps()["room-confirm"])["baseline-s8"], "--lr-scale") == "8"
    report = "\n".join(sweeps.part3_report())
    assert "| at0.2-lr11.3 | 20% | 11.3 | 2 | 0.9960 ± 0.0000 | -0.0040 ± 0.0000, worse in 0/2 seeds: better |" in report
    assert "| Part 3, room | at0.2-lr11.3 | 2 | 13.3% |" in report  # fake plans: 0.2 * (1 / 0.6 - 1)
    for seed in fresh:
        fake_sweep_run("room-confirm", f"baseline-s{seed}", 1.0 + 0.001 * seed)
        fake_sweep_run("room-confirm", f"at0.2-lr11.3-s{seed}", 1.0 + 0.001 * seed + 0.0005 * (-1) ** seed, stacked=True)
    assert "Verdict: at0.2-lr11.3 does not beat the tuned baseline." in "\n".join(sweeps.part3_report())
    assert names("room-ve") == [f"baseline-s{s}" for s in (8, 9, 10, 11)] and "every-layer" not in "\n".join(sweeps.part3_report())
    assert sweeps.command("room-ve", "baseline-s8", dict(sweeps.sweeps()["room-ve"])["baseline-s8"])[:2] == \
        ["python", "experiments/every_layer_ve.py"]
    for seed in (8, 9):  # the control: 0.002 better than the tuned baseline of its seed
        fake_sweep_run("room-ve", f"baseline-s{seed}", 0.998 + 0.001 * seed)
    report = "\n".join(sweeps.part3_report())
    assert "| 8 | 1.0060 | 1.0085 | +0.0025 |" in report and "| 9 | 1.0070 | 1.0085 | +0.0015 |" in report
    assert "- at0.2-lr11.3 minus the every-layer baseline: +0.0020 ± 0.0064, worse in 2/2 seeds: no significant" in report
    assert "- The every-layer baseline minus the tuned one (two value embeddings): -0.0020 ± 0.0000, worse in 0/2" in report


def test_part4_fair_baseline_takes_a_change_only_if_it_beats_the_baseline_run_beside_it(tmp_path, monkeypatch):
    """Part 4, step 1 (experiments.md) on made-up results: the runs, the rule's choice, and the runs it adds."""
    monkeypatch.chdir(tmp_path)
    names = lambda sweep: [name for name, _ in sweeps.sweeps()[sweep]]
    assert names("fair-baseline") == []  # it runs at step 3's tuned LR, not yet chosen
    for seed in (0, 1):
        for scale, bpb in {"8": 1.010, "4": 1.020, "16": 1.030}.items():  # Part 3's runs of the baseline: 1.010
            fake_sweep_run("room-lr", f"lr{scale}-s{seed}", bpb)
    settings = ("baseline", "warmdown0.7", "warmdown0.3", "weight-decay0.1", "weight-decay0.4")
    assert names("fair-baseline") == [f"{x}-s{s}" for x in settings for s in (0, 1)]
    values = lambda sweep, run, *options: [sweeps.flag_value(dict(sweeps.sweeps()[sweep])[run], option)
                                           for option in options]
    options = ("--data", "--depth", "--lr-scale", "--warmdown-ratio", "--weight-decay", "--seed")
    assert values("fair-baseline", "warmdown0.3-s1", *options) == ["data/pylibs-512", "4", "8", "0.3", "0.2", "1"]
    assert values("fair-baseline", "weight-decay0.4-s0", "--warmdown-ratio", "--weight-decay") == ["0.5", "0.4"]
    assert values("fair-baseline", "baseline-s0", "--warmdown-ratio", "--weight-decay") == ["0.5", "0.2"]
    # against the baseline run here (1.000): 0.0019 ahead is a tie, and Part 3's runs (1.010) do not count
    results = {"baseline": 1.000, "warmdown0.7": 0.9981, "warmdown0.3": 1.003, "weight-decay0.1": 0.9985,
               "weight-decay0.4": 1.0015}
    for setting, bpb in results.items():
        for seed in (0, 1):
            if (setting, seed) != ("weight-decay0.4", 1):
                fake_sweep_run("fair-baseline", f"{setting}-s{seed}", bpb)
    assert sweeps.fair_baseline() is None and names("fair-confirm") == []  # one run to go
    fake_sweep_run("fair-baseline", "weight-decay0.4-s1", 1.0015)
    assert sweeps.fair_baseline() == "baseline"
    report = "\n".join(sweeps.fair_baseline_report())
    assert "| baseline, Part 3's runs (AMD EPYC) | 1.0100 | 1.0100 | 1.0100 |" in report
    assert "| warmdown0.7 (warmdown 0.7, weight decay 0.2) | 0.9981 | 0.9981 | 0.9981 |" in report
    assert "minus Part 3's runs of it, by seed: -0.0100, -0.0100. Each change's mean minus the baseline's here: " \
           "warmdown0.7 -0.0019, warmdown0.3 +0.0030, weight-decay0.1 -0.0015, weight-decay0.4 +0.0015." in report
    assert "wins): the baseline stays." in report
    assert names("fair-confirm") == []  # Part 3's growth arm is not chosen yet in this made-up history
    for seed in (0, 1):
        for arm in ("at0.1", "at0.2", "at0.4", "at0.1-lr5.66", "at0.1-lr11.3"):
            bpb = 1.0 if arm == "at0.1" else 1.005
            fake_sweep_run("room-grow", f"{arm}-s{seed}", bpb, stacked=True, grow_at=0.1)
    # Part 3's confirmation again on this machine, seed by seed, with the chosen baseline and the same growth command
    assert names("fair-confirm") == [f"{x}-s{s}" for s in range(8, 14) for x in ("baseline", "at0.1")]
    assert dict(sweeps.sweeps()["fair-confirm"])["at0.1-s9"] == dict(sweeps.sweeps()["room-confirm"])["at0.1-s9"]
    assert values("fair-confirm", "baseline-s8", *options) == ["data/pylibs-512", "4", "8", "0.5", "0.2", "8"]
    for seed in range(8, 14):
        fake_sweep_run("room-confirm", f"at0.1-s{seed}", 0.990 + 0.001 * (seed % 2), stacked=True, grow_at=0.1)
        fake_sweep_run("room-confirm", f"baseline-s{seed}", 1.0)
        fake_sweep_run("fair-confirm", f"at0.1-s{seed}", 0.992 + 0.001 * (seed % 2), stacked=True, grow_at=0.1)
        if seed < 13:
            fake_sweep_run("fair-confirm", f"baseline-s{seed}", 0.997)
    ran_on = lambda cpu, name: json.dump({"cpu": cpu}, open(f"{sweeps.RUNS}/fair-confirm/{name}/machine.json", "w"))
    for name in os.listdir(f"{sweeps.RUNS}/fair-confirm"):
        ran_on("Some CPU" if name != "baseline-s12" else "Other CPU", name)  # one run pairs with none
    report = "\n".join(sweeps.fair_baseline_report())
    assert "at0.1 against the baseline (baseline), fresh seeds, all runs on Some CPU" in report
    assert "Left out, run on another CPU than Some CPU: fair-confirm/baseline-s12." in report
    assert "No verdict yet: 4 of 6 seeds." in report and "Verdict" not in report
    assert "- at0.1 here minus Part 3's run of the seed (AMD EPYC): +0.0020 ± 0.0000, worse in 6/6 seeds" in report
    assert "- baseline here minus Part 3's run of the seed (AMD EPYC): -0.0030 ± 0.0000, worse in 0/4" in report
    fake_sweep_run("fair-confirm", "baseline-s13", 0.997)
    ran_on("Some CPU", "baseline-s13"), ran_on("Some CPU", "baseline-s12")
    report = "\n".join(sweeps.fair_baseline_report())
    assert "| 13 | 0.9970 | 0.9930 | -0.0040 |" in report and "Verdict: at0.1 beats the tuned baseline." in report
    assert "mixed machines" not in report
    for seed in (0, 1):  # now two changes are ahead by more than 0.002: the lower mean wins
        fake_sweep_run("fair-baseline", f"warmdown0.3-s{seed}", 0.9975)
        fake_sweep_run("fair-baseline", f"weight-decay0.1-s{seed}", 0.997)
    assert sweeps.fair_baseline() == "weight-decay0.1"
    assert names("fair-confirm") == [f"{x}-s{s}" for s in range(8, 14) for x in ("weight-decay0.1", "at0.1")]
    assert values("fair-confirm", "weight-decay0.1-s8", *options) == ["data/pylibs-512", "4", "8", "0.5", "0.1", "8"]
    assert "wins): weight-decay0.1 becomes the baseline." in "\n".join(sweeps.fair_baseline_report())
    for seed in range(8, 14):  # Part 3's verdict restated against the new baseline, on both machines' growth runs
        fake_sweep_run("fair-confirm", f"weight-decay0.1-s{seed}", 0.995)
        ran_on("Some CPU", f"weight-decay0.1-s{seed}")
    report = "\n".join(sweeps.fair_baseline_report())
    assert "| 13 | 0.9950 | 0.9930 | -0.0020 |" in report and "- baseline here minus" not in report
    assert "Part 3's at0.1 (AMD EPYC) against the new baseline (weight-decay0.1): mixed machines" in report
    assert "| 13 | 0.9950 | 0.9910 | -0.0040 |" in report and report.count("Verdict: at0.1 beats") == 2


def test_part4_steps_2_to_4_pair_with_the_confirmation_here_and_apply_their_rules(tmp_path, monkeypatch):
    """Part 4, steps 2-4 (experiments.md) on made-up results: the runs each lists, the measures and the verdicts."""
    monkeypatch.chdir(tmp_path)
    names = lambda sweep: [name for name, _ in sweeps.sweeps()[sweep]]
    for seed in (0, 1):  # step 3's history and step 1's: Part 3's at0.1 and the baseline, which stays
        for scale, bpb in {"8": 1.010, "4": 1.020, "16": 1.030}.items():
            fake_sweep_run("room-lr", f"lr{scale}-s{seed}", bpb)
        for arm in ("at0.1", "at0.2", "at0.4", "at0.1-lr5.66", "at0.1-lr11.3"):
            fake_sweep_run("room-grow", f"{arm}-s{seed}", 1.0 if arm == "at0.1" else 1.005, stacked=True, grow_at=0.1)
        for setting in sweeps.FAIR_SETTINGS:
            fake_sweep_run("fair-baseline", f"{setting}-s{seed}", 1.0)
    seeds, ratios = range(8, 14), ("12.075", "13.65", "15.75")
    assert names("equal-loss") == [f"baseline-ratio{r}-s{s}" for s in range(8, 12) for r in ratios]
    assert names("horizon") == [f"{x}-ratio21-s{s}" for s in range(8, 12) for x in ("baseline", "at0.1")]
    assert names("ve-reverse") == [f"at0.1-s{s}" for s in seeds] and names("ve-every-layer") == [f"baseline-s{s}" for s in seeds]
    flags = lambda sweep, name: dict(sweeps.sweeps()[sweep])[name]
    assert flags("equal-loss", "baseline-ratio13.65-s9")[:-2] == flags("fair-confirm", "baseline-s9")[:-2] + ["--ratio", "13.65"]
    assert flags("horizon", "at0.1-ratio21-s8")[:-2] == flags("fair-confirm", "at0.1-s8")[:-2] + ["--ratio", "21"]
    assert flags("ve-reverse", "at0.1-s13") == flags("fair-confirm", "at0.1-s13")
    script = lambda sweep, name: sweeps.command(sweep, name, flags(sweep, name))[1]
    assert script("ve-reverse", "at0.1-s8") == "experiments/nanochat_ve_stack.py"
    assert script("ve-every-layer", "baseline-s8") == "experiments/every_layer_ve.py"
    assert script("equal-loss", "baseline-ratio12.075-s8") == script("horizon", "at0.1-ratio21-s8") == "stack_gpt.py"
    assert sweeps.part4_report() == []
    budget = 6e13  # the baseline falls 0.03 bpb per e-fold of compute; each stacked run matches it at 1.2x or 1.25x
    for seed in seeds:
        needed = 1.2 if seed % 2 == 0 else 1.25
        fake_sweep_run("fair-confirm", f"baseline-s{seed}", 1.0, budget=budget)
        fake_sweep_run("fair-confirm", f"at0.1-s{seed}", 1.0 - 0.03 * math.log(needed), stacked=True, grow_at=0.1,
                       budget=budget, start_bpb=1.5)
    for seed in range(8, 12):
        for ratio in ratios:
            k = float(ratio) / 10.5
            fake_sweep_run("equal-loss", f"baseline-ratio{ratio}-s{seed}", 1.0 - 0.03 * math.log(k), budget=k * budget)
    report = "\n".join(sweeps.part4_report())
    assert "| 8 | 4 | -0.0208 | 0.0000 | 0.9945 | +20.0% | +16.7% |" in report
    assert "| 9 | 4 | -0.0208 | 0.0000 | 0.9933 | +25.0% | +20.0% |" in report
    assert "stacked run's compute, over 4 seeds: +22.5% ± 2.9 (std), 95% CI [+17.9%, +27.1%]" in report
    needed, per_doubling, miss = sweeps.compute_to_reach([(1e13, 1.0), (2e13, 0.97)], 0.94)  # two doublings on
    assert math.isclose(needed, 4e13) and math.isclose(per_doubling, -0.03) and miss < 1e-12
    assert sweeps.compute_to_reach([(1e13, 1.0), (2e13, 1.01)], 0.94)[0] is None  # a line that does not fall
    assert "step 3" not in report and "step 4" not in report
    for seed in seeds:  # two tables: 0.001 worse than four, still ahead of the baseline; 0.1 worse right after growth
        fake_sweep_run("ve-reverse", f"at0.1-s{seed}", 1.0 - 0.03 * math.log(1.2) + 0.001 * (seed < 13), stacked=True,
                       grow_at=0.1, budget=budget, start_bpb=1.6)
    report = "\n".join(sweeps.part4_report())
    assert "- Val bpb right after growth, two tables minus four: +0.1000 ± 0.0000, worse in 6/6" in report
    assert "Verdict (growth with two tables beats the baseline's interval below zero): the lead is growth, not tables." in report
    fake_sweep_run("ve-reverse", "at0.1-s13", 1.01, stacked=True, grow_at=0.1, budget=budget)  # one seed far behind
    step3 = "\n".join(sweeps.part4_report()).split("## Part 4, step 3")[1]
    assert "the control shows nothing either way." in step3
    assert re.search(r"- Two tables minus four during the run .*: at 25% \S+ \(0 of 6 ahead\), .* at 100% \+0\.0040 \(0 of 6", step3)
    assert "- Final val bpb, two tables minus four: +0.0040" in step3  # the run's last point is its end
    assert re.search(r"- Paired t-test \(arm minus the baseline of the same seed, 6 seeds\): mean \S+, 95% CI \[-\S+, \+", step3)
    for seed in range(8, 12):  # the every-layer baseline, 0.002 better than two tables
        fake_sweep_run("ve-every-layer", f"baseline-s{seed}", 0.998, budget=budget)
    report = "\n".join(sweeps.part4_report())
    assert "- The every-layer baseline minus baseline: -0.0020 ± 0.0000, worse in 0/4 seeds: better" in report
    long_base = 1.0 - 0.03 * math.log(2)  # on the same line, so step 2's fit stays exact with five budgets
    for seed in range(8, 12):  # at 2x each seed's lead halves
        needed = 1.2 if seed % 2 == 0 else 1.25
        fake_sweep_run("horizon", f"baseline-ratio21-s{seed}", long_base, budget=2 * budget)
        if seed < 11:
            fake_sweep_run("horizon", f"at0.1-ratio21-s{seed}", long_base - 0.015 * math.log(needed), stacked=True,
                           grow_at=0.1, budget=2 * budget)
    assert "Verdict (the interval of 2x minus 1x above zero: shrinks; below: grows): none yet (3 of 4" in \
        "\n".join(sweeps.part4_report())
    fake_sweep_run("horizon", "at0.1-ratio21-s11", long_base - 0.015 * math.log(1.25), stacked=True,
                   grow_at=0.1, budget=2 * budget)
    report = "\n".join(sweeps.part4_report())
    assert "| 8 | 0.9792 | 0.9765 | -0.0055 | -0.0027 | +0.0027 |" in report
    assert "| -0.0067 | -0.0033 | +0.0033 |" in report  # seed 9
    assert "- Lead at 2x: -0.0030 ± " in report
    assert re.search(r"- Stacked minus baseline during the run at 1x .*: at 25% .* at 100% -0\.0061 \(4 of 4 ahead\)", report)
    assert re.search(r"- Stacked minus baseline during the run at 2x .*: at 25% .* at 100% -0\.0030 \(4 of 4 ahead\)", report)
    assert "the lead shrinks." in report and "| 8 | 5 | -0.0208 | 0.0000 | 0.9945 | +20.0% |" in report
    # the map's rows: fake plans grow after 10% from a shallow model at 0.6 of the deep one's cost, a 6.7% ceiling
    assert "| at0.1, this machine | 1x | compute the baseline needs to reach the stacked run's loss | 4 | 6.7% | " \
           "+18.3% ± 1.9 | +11.7% |" in report
    assert "| at0.1 | 2x | where the stacked run reaches the baseline's final loss | 4 | 6.7% |" in report
    assert report.count("| at0.1, two tables | 1x |") == 1


def test_part4_reverse_control_keeps_value_embeddings_only_where_nanochat_puts_them(tiny_data, tmp_path, monkeypatch):
    """experiments/nanochat_ve_stack.py: d1 -> d4 keeps the copied table in layers 1 and 3 only, all else as G_stack."""
    import nanochat_ve_stack as reverse
    monkeypatch.setattr(sg, "stacked_config", reverse.nanochat_layout)
    monkeypatch.setattr(sg, "stack_model", reverse.stack_dropping_tables)
    shallow = trained_looking(tiny_config(n_layer=1))
    deep = sg.stack_model(shallow, 4)
    assert deep.config.ve_layers == (1, 3) and sg.stacked_config(shallow.config, [0, 0, 0, 0]) == deep.config
    assert reverse.nanochat_layout(tiny_config(n_layer=3), [0, 1, 2, 0, 1, 2]).ve_layers == (3, 5)  # copies of 0, 2
    s, d = shallow.state_dict(), deep.state_dict()
    for j in range(4):
        for k in s:
            if k.startswith("blocks.0."):
                dropped = j in (0, 2) and (".value_embed." in k or ".ve_gate." in k)
                name = f"blocks.{j}." + k.split(".", 2)[2]
                assert (name not in d) if dropped else torch.equal(d[name], s[k]), name
    assert torch.equal(d["wte.weight"], s["wte.weight"]) and torch.equal(d["lm_head.weight"], s["lm_head.weight"])
    assert all(torch.equal(d[k], s[k].repeat(4)) for k in ("resid_lambdas", "x0_lambdas"))
    sg.main(TINY[:2] + ["--stack-to", "4"] + TINY[4:] + ["--data", tiny_data, "--out-dir", str(tmp_path / "r"),
                                                          "--shallow-steps", "2", "--deep-steps", "2", "--eval-every",
                                                          "0", "--sample-tokens", "0", "--aspect-ratio", "32"])
    plan, *_, summary = metrics_of(tmp_path / "r")
    assert plan["phases"][1]["config"]["ve_layers"] == [1, 3] and summary["kind"] == "summary"


# -----------------------------------------------------------------------------
# prepare_data.py: datasets, tokenizer, shards and the train/val windows (helpers first)

STDLIB = sysconfig.get_paths()["stdlib"]
UNICODE_TEXTS = [
    "héllo wörld, ça va? naïve café", "日本語のテキストと中文", "emoji 👩‍👩‍👧 and 🐍🐍",
    "tabs\t\tand  spaces   \n\n\n  \r\n\r\n", "   leading", "trailing   \n", "",
    "e\u0301 combining, a\u00a0no-break space, \u200bzero width", "<|endoftext|> as plain text",
    "x" * 3000, " " * 100 + "\n" * 50, "mixed123456789 numbers 3.14159 and 1,000,000",
]


def _data_text_dir(tmp_path, n_files=40):
    """A folder of a few hundred KB of text: stdlib modules plus some unicode."""
    folder = tmp_path / "text"
    folder.mkdir()
    sources = [os.path.join(STDLIB, f) for f in ("json/decoder.py", "json/encoder.py", "textwrap.py",
                                                 "argparse.py", "string.py", "heapq.py", "bisect.py")]
    for i in range(n_files):
        with open(sources[i % len(sources)], encoding="utf-8") as f:
            text = f.read()
        (folder / f"doc_{i:03d}.txt").write_text(f"# copy {i}\n" + text + UNICODE_TEXTS[i % len(UNICODE_TEXTS)],
                                                 encoding="utf-8")
    return folder


def _data_fake_gpt2_ranks(tmp_path):
    """A 'gpt2-like' ranks file: only the 256 byte tokens (GPT-2's own ranks need a download)."""
    path = tmp_path / "fake_gpt2.tiktoken"
    path.write_bytes(b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(256)))
    return str(path)


def _data_shard_bytes(tmp_path, tokens):
    path = tmp_path / "shard_source.bin"
    prepare_data.write_shard(str(path), np.asarray(tokens, np.uint16))
    return path.read_bytes()


def _data_run(*args, cwd=HERE):
    return subprocess.run([sys.executable, os.path.join(HERE, "prepare_data.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def _data_split_docs(tokens, eot):
    """The documents of a shard: runs of tokens after each <|endoftext|>."""
    starts = list(np.flatnonzero(tokens == eot)) + [len(tokens)]
    assert starts[0] == 0, "every document must be preceded by <|endoftext|>"
    return [tokens[a + 1:b] for a, b in zip(starts, starts[1:])]


class _DataServer:
    """An HTTP server on 127.0.0.1 (port 0) in a thread. plan maps a file name to a list
    of responses used in turn, the last one repeating: bytes (served whole), an int (that
    HTTP status), ("cut", bytes) (announce all, send half, close) or ("stall", bytes) (announce
    all, send half, then wait up to a minute for the client to hang up)."""

    def __init__(self, plan):
        self.plan, self.hits = plan, []

    def __enter__(self):
        plan, hits = self.plan, self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                hits.append(name)
                steps = plan.get(name, [404])
                step = steps.pop(0) if len(steps) > 1 else steps[0]
                if isinstance(step, int):
                    self.send_response(step)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                mode, body = step if isinstance(step, tuple) else ("whole", step)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mode == "whole":
                    self.wfile.write(body)
                elif mode == "cut":
                    self.wfile.write(body[:len(body) // 2])
                else:  # stall: the download stays half done however slow the client is
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.connection.settimeout(60)
                    self.connection.recv(1)  # returns when the client closes the connection (or after the timeout)

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a client that hangs up mid-response is part of the tests

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/repo"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _data_valid_shards(folder):
    """Names of files in folder that pass the shard checks."""
    good = []
    for f in os.listdir(folder) if os.path.isdir(folder) else []:
        try:
            prepare_data.shard_token_count(os.path.join(folder, f))
            good.append(f)
        except (prepare_data.DataError, ValueError):
            pass
    return good


# -----------------------------------------------------------------------------
# prepare_data.py: the tokenizer

def test_data_bpe_matches_training_order():
    with open(os.path.join(STDLIB, "argparse.py"), encoding="utf-8") as f:
        train_text = f.read() + "\n".join(UNICODE_TEXTS)
    with open(os.path.join(STDLIB, "textwrap.py"), encoding="utf-8") as f:
        other_text = f.read()
    ranks = prepare_data.train_bpe([train_text], 700)
    assert len(ranks) == 699 and sorted(ranks.values()) == list(range(699))
    vocab = {rank: token for token, rank in ranks.items()}
    split = regex.compile(prepare_data.GPT4_PATTERN)

    def merges_in_training_order(text):
        out = []
        for chunk in split.findall(text):
            ids, last = list(chunk.encode("utf-8")), -1
            while True:  # the next merge, in training order, that applies to this chunk
                found = [ranks.get(vocab[a] + vocab[b], -1) for a, b in zip(ids, ids[1:])]
                found = [r for r in found if r > last]
                if not found:
                    break
                last = min(found)
                i, merged = 0, []
                while i < len(ids):
                    if i + 1 < len(ids) and vocab[ids[i]] + vocab[ids[i + 1]] == vocab[last]:
                        merged.append(last)
                        i += 2
                    else:
                        merged.append(ids[i])
                        i += 1
                ids = merged
            out += ids
        return out

    enc = prepare_data.make_encoding(ranks, "test")
    for text in [train_text[:60000], other_text] + UNICODE_TEXTS:
        assert enc.encode_ordinary(text) == merges_in_training_order(text)
    assert enc.eot_token == 699 and enc.n_vocab == 700


def test_data_roundtrip_unicode_whitespace_and_default_corpus():
    docs, replaced, source = prepare_data.builtin_corpus("stdlib")
    assert replaced == 0 and len(docs) > 500 and "standard library" in source
    assert sum(len(text) for _, text in docs) > 5e6
    ranks = prepare_data.train_bpe(prepare_data.bpe_sample(docs, 1.5) + UNICODE_TEXTS, 1024)
    enc = prepare_data.make_encoding(ranks, "test")
    for text in UNICODE_TEXTS:
        assert enc.decode(enc.encode_ordinary(text)) == text
    texts = [text for _, text in docs]  # every document of the default corpus
    assert enc.decode_batch(enc.encode_ordinary_batch(texts)) == texts


# -----------------------------------------------------------------------------
# prepare_data.py: shards, the val split and the val windows

def test_data_shard_roundtrip_and_header_checks(tmp_path):
    path = str(tmp_path / "a.bin")
    tokens = np.random.default_rng(0).integers(0, 65536, 5000).astype(np.uint16)
    prepare_data.write_shard(path, tokens)
    assert np.array_equal(prepare_data.read_shard(path), tokens) and prepare_data.shard_token_count(path) == 5000
    assert os.path.getsize(path) == 1024 + 2 * 5000 and os.listdir(tmp_path) == ["a.bin"]
    prepare_data.write_shard(str(tmp_path / "empty.bin"), [])
    assert len(prepare_data.read_shard(str(tmp_path / "empty.bin"))) == 0
    raw = open(path, "rb").read()
    bad_magic = np.frombuffer(raw, np.uint8).copy()
    bad_magic[:4] = np.frombuffer(np.int32(12345).tobytes(), np.uint8)
    cases = {"magic.bin": bad_magic.tobytes(), "truncated.bin": raw[:-10], "longer.bin": raw + b"xx",
             "tiny.bin": raw[:100]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(prepare_data.DataError, match="prepare_data.py") as e:
            prepare_data.read_shard(str(tmp_path / name))
        assert name in str(e.value) and "\n" not in str(e.value)


def test_data_val_split_rule():
    docs = [(f"dir/file_{i}.py", f"text {i}") for i in range(2000)]
    train, val = prepare_data.split_documents(docs, 0.05)
    assert 60 < len(val) < 140 and len(train) + len(val) == 2000
    assert not {n for n, _ in train} & {n for n, _ in val}
    train2, val2 = prepare_data.split_documents(docs[::-1], 0.05)  # the rule looks at names, not order
    assert {n for n, _ in val2} == {n for n, _ in val}
    train, val = prepare_data.split_documents(docs[:3], 0.001)  # always at least one of each
    assert len(val) >= 1 and len(train) >= 1
    with pytest.raises(prepare_data.DataError, match="single short document"):
        prepare_data.split_documents(docs[:1], 0.05)
    pieces = prepare_data.cut_pieces("book.txt", ("a line of a long book\n" * 20000))
    assert len(pieces) > 5 and "".join(t for _, t in pieces) == "a line of a long book\n" * 20000


def test_data_build_tiny_dataset(tmp_path):
    folder = _data_text_dir(tmp_path)
    (folder / "image.bin").write_bytes(b"\x89PNG\0\0binary")  # skipped: not text
    out = str(tmp_path / "out" / "tiny")
    meta = prepare_data.build_text_dataset([str(folder)], out, vocab_size=512, shard_tokens=30000)
    assert meta == prepare_data.load_meta(out) and meta["complete"] is True and list(meta)[-1] == "complete"
    for key in ("name", "source", "tokenizer", "vocab_size", "pattern", "special_tokens", "eot_id",
                "train_shards", "val_shards", "train_tokens", "val_tokens", "bytes_per_token", "sha256"):
        assert key in meta
    assert meta["name"] == "tiny" and meta["tokenizer"] == "bpe" and meta["vocab_size"] == 512
    assert meta["special_tokens"] == {"<|endoftext|>": 511} == {"<|endoftext|>": meta["eot_id"]}
    assert len(meta["train_shards"]) > 1 and meta["val_shards"] == ["val_000000.bin"]
    for f, digest in meta["sha256"].items():
        assert prepare_data.file_sha256(os.path.join(out, f)) == digest
    enc, token_bytes = prepare_data.load_tokenizer(out), prepare_data.load_token_bytes(out)
    assert enc.n_vocab == 512 and token_bytes.dtype == np.int32 and token_bytes.shape == (512,)
    assert token_bytes[511] == 0 and token_bytes[:256].tolist() == [1] * 256
    splits = {}
    for split in ("train", "val"):
        tokens = np.concatenate([prepare_data.read_shard(os.path.join(out, f)) for f in meta[f"{split}_shards"]])
        assert len(tokens) == meta[f"{split}_tokens"]
        assert token_bytes[tokens].sum() == meta[f"{split}_bytes"]  # what bits per byte relies on
        splits[split] = {enc.decode(doc.tolist()) for doc in _data_split_docs(tokens, 511)}
    originals = {text for _, text in prepare_data.read_documents(prepare_data.text_files([str(folder)]))[0]}
    assert any("#" in name for name, _ in prepare_data.read_documents(prepare_data.text_files([str(folder)]))[0])
    assert splits["train"] | splits["val"] == originals  # exact round trip through the shards
    assert not splits["train"] & splits["val"] and len(splits["val"]) >= 1
    again = prepare_data.build_text_dataset([str(folder)], out, vocab_size=512, shard_tokens=30000)
    assert again["sha256"] == meta["sha256"]  # deterministic


def test_data_undecodable_bytes_are_replaced_and_counted(tmp_path):
    folder = _data_text_dir(tmp_path, n_files=4)
    (folder / "latin1.txt").write_bytes("caf\u00e9 \ufffd ok ".encode() + b"\xff\xfe bad \xc3")
    meta = prepare_data.build_text_dataset([str(folder)], str(tmp_path / "out"), vocab_size=300)
    assert meta["replaced_chars"] == 3  # \xff, \xfe, a cut-off \xc3; the real U+FFFD is text


def test_data_gpt2_like_tokenizer(tmp_path, monkeypatch):
    folder, ranks_file = _data_text_dir(tmp_path, n_files=4), _data_fake_gpt2_ranks(tmp_path)
    out = str(tmp_path / "g")
    meta = prepare_data.build_text_dataset([str(folder)], out, tokenizer="gpt2", tiktoken_file=ranks_file)
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["eot_id"] == 50256
    assert meta["pattern"] == prepare_data.GPT2_PATTERN and meta["bytes_per_token"] == 1.0
    token_bytes = prepare_data.load_token_bytes(out)
    assert token_bytes.shape == (50257,) and token_bytes.sum() == 256
    enc = prepare_data.load_tokenizer(out)
    assert enc.decode(enc.encode_ordinary("héllo  \n\tworld")) == "héllo  \n\tworld"
    monkeypatch.setattr(prepare_data.tiktoken, "get_encoding", lambda name: 1 / 0)  # offline, like here
    with pytest.raises(prepare_data.DataError, match="--tiktoken-file"):
        prepare_data.build_text_dataset([str(folder)], str(tmp_path / "g2"), tokenizer="gpt2")
    assert not os.path.exists(tmp_path / "g2")
    # stack_gpt.py trains on it and measures bits per byte with GPT-2's ids (here every token is one byte)
    run = str(tmp_path / "run")
    # no samples: the fake ranks have gaps, ids no token has (the real GPT-2 ranks have none)
    sg.main(["--sample-tokens", "0", "--data", out, "--depth", "1", "--aspect-ratio", "32", "--head-dim", "32", "--seq-len", "32", "--device-batch-size", "2",
             "--total-batch-size", "64", "--deep-steps", "2", "--eval-tokens", "256", "--out-dir", run])
    bpb = [r["val_bpb"] for r in metrics_of(run) if r["kind"] == "eval"]
    assert bpb[0] == pytest.approx(math.log2(50257) / 1.0, rel=0.05)  # a near-uniform model pays log2(vocab) bits a byte


def test_each_epoch_visits_every_window_in_a_new_order():
    """A run longer than the data reads every train window once per epoch, each epoch in a new shuffled order."""
    shards = [np.arange(330, dtype=np.uint16), np.arange(1000, 1250, dtype=np.uint16)]  # 32 + 24 windows of 10
    loader = sg.TokenWindows(shards, 10, seed=0, device="cpu")
    assert loader.num_windows == 56
    epochs = [torch.cat([loader.next_batch(8)[0][:, 0] for _ in range(7)]).tolist() for _ in range(3)]
    every_window = sorted(int(w[0]) for w in (loader.window(i) for i in range(56)))
    for order in epochs:
        assert sorted(order) == every_window
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]


def test_val_windows_are_spread_over_the_whole_split():
    """A small eval samples all of the val split, not its first documents; the same windows every time."""
    shards = [np.arange(1000, dtype=np.uint16), np.arange(1000, 1401, dtype=np.uint16)]  # 10 + 4 windows, one every 99 tokens
    batches = sg.val_batches(shards, 4 * 99, 99, 3, "cpu")
    firsts = [int(x[row, 0]) for x, _ in batches for row in range(x.size(0))]
    assert firsts == [0, 4 * 99, 9 * 99, 1000 + 3 * 99]  # windows 0, 4, 9, 13 of 14: the first, the last and evenly between
    assert [x.shape[0] for x, _ in batches] == [3, 1]
    assert firsts == [int(x[row, 0]) for x, _ in sg.val_batches(shards, 4 * 99, 99, 3, "cpu") for row in range(x.size(0))]


# -----------------------------------------------------------------------------
# prepare_data.py: FineWeb-Edu downloads against a local server

def test_data_fineweb_download_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_data, "RETRY_DELAY", 0.01)
    rng = np.random.default_rng(0)
    shards = {name: np.concatenate([[50256], rng.integers(0, 256, 3000)]).astype(np.uint16)
              for name in ("finewebedu_val_000000.bin", "finewebedu_train_000001.bin",
                           "finewebedu_train_000002.bin")}
    body = {name: _data_shard_bytes(tmp_path, t) for name, t in shards.items()}
    plan = {"finewebedu_val_000000.bin": [body["finewebedu_val_000000.bin"]],
            "finewebedu_train_000001.bin": [503, ("cut", body["finewebedu_train_000001.bin"]),
                                            body["finewebedu_train_000001.bin"]],
            "finewebedu_train_000002.bin": [body["finewebedu_train_000002.bin"]]}
    out, ranks_file = str(tmp_path / "fw"), _data_fake_gpt2_ranks(tmp_path)
    with _DataServer(plan) as server:
        meta = prepare_data.download_fineweb(out, 2, server.url, retries=3, tiktoken_file=ranks_file)
        assert server.hits.count("finewebedu_train_000001.bin") == 3  # error, cut, success
        assert meta == prepare_data.load_meta(out) and meta["train_tokens"] == 6002 and meta["val_tokens"] == 3001
        for name, tokens in shards.items():
            assert np.array_equal(prepare_data.read_shard(os.path.join(out, name)), tokens)
        assert meta["bytes_per_token"] == 1.0 and prepare_data.load_token_bytes(out).shape == (50257,)
        assert sorted(os.listdir(out)) == sorted(list(shards) + ["meta.json", "token_bytes.npy",
                                                                  "tokenizer.tiktoken"])
        hits = len(server.hits)
        prepare_data.download_fineweb(out, 2, server.url, retries=3, tiktoken_file=ranks_file)
        assert len(server.hits) == hits  # complete shards are skipped
        # without the GPT-2 ranks the shards still download; bits per byte says what is missing
        monkeypatch.setattr(prepare_data.tiktoken, "get_encoding", lambda name: 1 / 0)
        meta = prepare_data.download_fineweb(str(tmp_path / "fw2"), 1, server.url, retries=1)
        assert meta["token_bytes"] is False and meta["bytes_per_token"] is None
        with pytest.raises(prepare_data.DataError, match="--tiktoken-file"):
            prepare_data.load_token_bytes(str(tmp_path / "fw2"))


def test_data_fineweb_bad_downloads(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_data, "RETRY_DELAY", 0.01)
    good = _data_shard_bytes(tmp_path, np.arange(2000) % 300)
    cases = {"cut": (("cut", good), "closed after"), "short": (good[:-6], "truncated"),
             "foreign": (b"<html>not found</html>" * 100, "not a token shard"),
             "error": (500, "HTTP 500"), "missing": (404, "HTTP 404")}
    for case, (response, message) in cases.items():
        out = str(tmp_path / case)
        with _DataServer({"finewebedu_val_000000.bin": [response]}) as server:
            with pytest.raises(prepare_data.DataError, match=message) as e:
                prepare_data.download_fineweb(out, 1, server.url, retries=2, tiktoken_file=_data_fake_gpt2_ranks(tmp_path))
            assert server.hits.count("finewebedu_val_000000.bin") == (1 if case == "missing" else 2)
        assert server.url in str(e.value) and "--base-url" in str(e.value) and prepare_data.URL_ENV in str(e.value)
        assert _data_valid_shards(out) == [] and os.listdir(out) == []  # nothing half-written


def test_data_interrupted_download_leaves_no_shard(tmp_path):
    ranks_file = _data_fake_gpt2_ranks(tmp_path)
    body = _data_shard_bytes(tmp_path, np.arange(20000) % 300)
    out_root = tmp_path / "data"
    args = ["--dataset", "fineweb-edu", "--shards", "1", "--out-dir", out_root, "--tiktoken-file", ranks_file]
    plan = {"finewebedu_val_000000.bin": [("stall", body), body], "finewebedu_train_000001.bin": [body]}
    # A child inherits an ignored SIGINT (as under `nohup ... &`, which is how this test once failed), and
    # Python then never raises KeyboardInterrupt. Ignore it here on purpose, so the test always sees the
    # worst case, and let the child put Ctrl-C's usual handler back before it runs the script.
    child = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    with _DataServer(plan) as server:
        inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            proc = subprocess.Popen([sys.executable, "-c", child, os.path.join(HERE, "prepare_data.py"), *map(str, args),
                                     "--base-url", server.url], stderr=subprocess.PIPE, text=True, cwd=HERE)
        finally:
            signal.signal(signal.SIGINT, inherited)
        part = out_root / "fineweb-edu" / "finewebedu_val_000000.bin.part"
        deadline = time.time() + 20
        while not part.exists() and time.time() < deadline:
            time.sleep(0.02)
        assert part.exists(), "the download never started"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
        assert _data_valid_shards(out_root / "fineweb-edu") == []
        assert os.listdir(out_root / "fineweb-edu") == []
        with pytest.raises(prepare_data.DataError, match="no dataset"):
            prepare_data.load_meta(str(out_root / "fineweb-edu"))
        result = _data_run(*args, "--base-url", server.url)  # a rerun finishes the job
        assert result.returncode == 0, result.stderr
    assert prepare_data.load_meta(str(out_root / "fineweb-edu"))["val_tokens"] == 20000


# -----------------------------------------------------------------------------
# prepare_data.py: bad input, one line, exit code 2, nothing left behind

def test_data_bad_inputs_give_one_line_errors(tmp_path, monkeypatch):
    folder = _data_text_dir(tmp_path, n_files=6)
    (tmp_path / "binary_only").mkdir()
    (tmp_path / "binary_only" / "x.bin").write_bytes(b"\0\1\2")
    out = tmp_path / "out"
    with _DataServer({"finewebedu_val_000000.bin": [500]}) as failing, \
         _DataServer({"finewebedu_val_000000.bin": [b"\x01\x02" * 700]}) as foreign:
        cases = [
            (["--dataset", "nope"], "unknown dataset"),
            (["--input", tmp_path / "missing"], "input path not found"),
            (["--input", tmp_path / "binary_only"], "no text found"),
            (["--input", folder, "--vocab-size", 70000], "too large"),
            (["--input", folder, "--vocab-size", 100], "too small"),
            (["--input", folder, "--vocab-size", "abc"], "invalid int"),
            (["--input", folder, "--bpe-sample-mb", "nan"], "finite number"),
            (["--input", folder, "--tokenizer", "gpt3"], "unknown --tokenizer"),
            (["--dataset", "fineweb-edu", "--base-url", failing.url, "--retries", 1], "download failed"),
            (["--dataset", "fineweb-edu", "--base-url", foreign.url, "--retries", 1], "not a token shard"),
        ]
        for args, message in cases:
            result = _data_run(*args, "--out-dir", out)
            assert result.returncode == 2, (args, result.stderr)
            last = result.stderr.splitlines()[-1]  # downloads show their progress lines first
            assert last.startswith("error: ") and message in last, (args, result.stderr)
            assert "Traceback" not in result.stderr
            assert "fineweb" in str(args) or result.stderr.count("\n") == 1
            assert not out.exists() or _data_valid_shards(out / "fineweb-edu") == []
    assert "--base-url" in _data_run("--dataset", "fineweb-edu", "--base-url", "http://127.0.0.1:9/x",
                                     "--retries", 1, "--out-dir", out).stderr
    # an output folder holding a different dataset is refused unless --overwrite
    assert _data_run("--input", folder, "--name", "tiny", "--out-dir", out, "--vocab-size", 300).returncode == 0
    result = _data_run("--input", folder, "--name", "tiny", "--out-dir", out, "--vocab-size", 400)
    assert result.returncode == 2 and "different dataset" in result.stderr and "--overwrite" in result.stderr
    assert json.load(open(out / "tiny" / "meta.json"))["vocab_size"] == 300  # untouched
    result = _data_run("--input", folder, "--name", "tiny", "--out-dir", out, "--vocab-size", 400, "--overwrite")
    assert result.returncode == 0 and prepare_data.load_meta(str(out / "tiny"))["vocab_size"] == 400
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my own notes")
    result = _data_run("--input", folder, "--name", "mine", "--out-dir", tmp_path)
    assert result.returncode == 2 and "not ours" in result.stderr
    monkeypatch.chdir(tmp_path)  # stack_gpt.py's default --data, before any build
    with pytest.raises(prepare_data.DataError, match=r"no dataset in data/stdlib .*run: python prepare_data.py$"):
        prepare_data.load_meta("data/stdlib")
