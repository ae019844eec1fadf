"""
Tests for stack_gpt.py and prepare_data.py. CPU only, no network, a few minutes on 2 cores:
    python -m pytest test_stack_gpt.py
CUDA tests run only where a GPU is visible.
"""

import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import prepare_data
import stack_gpt as sg

HERE = os.path.dirname(os.path.abspath(__file__))
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
    assert logits.abs().max() <= sg.GPT.SOFTCAP


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


# -----------------------------------------------------------------------------
# Optimizer

@pytest.mark.parametrize("shape", [(4, 64, 256), (4, 256, 64), (2, 96, 96)])
def test_polar_express_singular_values_near_one(shape):
    """Singular values spread over two decades all come out in a narrow band around 1."""
    torch.manual_seed(0)
    n, rows, cols = shape
    k = min(rows, cols)
    U, V = torch.linalg.qr(torch.randn(n, rows, k))[0], torch.linalg.qr(torch.randn(n, cols, k))[0]
    G = U @ torch.diag_embed(torch.logspace(-2, 0, k).expand(n, k)) @ V.mT
    S = torch.linalg.svdvals(sg.polar_express(G).float())
    assert sg.polar_express(G).shape == G.shape
    assert S.min() > 0.8 and S.max() < 1.2, (S.min(), S.max())


def test_adamw_group_matches_torch_adamw():
    torch.manual_seed(0)
    ours, ref = torch.nn.Parameter(torch.randn(5, 7)), torch.nn.Parameter(torch.randn(5, 7))
    with torch.no_grad():
        ref.copy_(ours)
    opt = sg.MuonAdamW([dict(kind="adamw", params=[ours], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)])
    ref_opt = torch.optim.AdamW([ref], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn(5, 7)
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-7)


def optimizer_args(**kw):
    return types.SimpleNamespace(**{**dict(matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.004, scalar_lr=0.5), **kw})


def test_every_parameter_in_exactly_one_group_with_nanochat_lrs():
    model = sg.GPT(tiny_config(n_layer=4, n_embd=192, n_head=3))
    opt = sg.build_optimizer(model, optimizer_args(), batch_size=2**17, weight_decay=0.1)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
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


def test_muon_step_direction_and_cautious_decay():
    """With momentum 0 and no decay, a Muon step moves each matrix by lr * (an orthogonal-ish matrix)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 64))
    start = p.detach().clone()
    p.grad = torch.randn(32, 64)
    opt = sg.MuonAdamW([dict(kind="muon", params=[p], lr=0.1, momentum=0.0, beta2=0.95, weight_decay=0.0)])
    opt.step()
    step = (start - p.detach()) / 0.1
    S = torch.linalg.svdvals(step)
    assert (p.grad.flatten() @ step.flatten()) > 0  # a descent direction
    assert 0.5 < S.mean() < 1.5
    # cautious weight decay only shrinks entries whose update agrees in sign with the weight
    q = torch.nn.Parameter(torch.ones(8, 8))
    q.grad = torch.zeros(8, 8)
    q.grad[0, 0] = 1.0
    opt = sg.MuonAdamW([dict(kind="muon", params=[q], lr=0.01, momentum=0.0, beta2=0.95, weight_decay=1.0)])
    opt.step()
    assert q[0, 0] < 1.0 - 0.01  # update and decay both pull it down


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


# -----------------------------------------------------------------------------
# Planning: horizons and the FLOPs budget

def plan_args(argv):
    args = sg.resolve_args(argv + ["--device", "cpu"])
    return args, sg.plan_phases(args, 32768)


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


def test_explicit_horizons_override_the_budget():
    _, (shallow, deep) = plan_args(["--depth", "2", "--stack-to", "4", "--shallow-steps", "7", "--deep-steps", "9",
                                    "--total-batch-size", "4096", "--device-batch-size", "2", "--seq-len", "2048"])
    assert (shallow.steps, deep.steps, deep.batch_size) == (7, 9, 4096)


# -----------------------------------------------------------------------------
# End to end on tiny data

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
        "--eval-every", "5", "--eval-tokens", "512", "--sample-tokens", "4", "--matrix-lr", "0.2", "--embedding-lr", "3",
        "--unembedding-lr", "0.4"]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "d1s2")
    sg.main(TINY + ["--data", tiny_data, "--out-dir", out])
    return out


def test_two_phase_run_end_to_end(tiny_run):
    records = read_metrics(tiny_run)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train if r["phase"] == "shallow"] == list(range(1, 7))
    assert [r["step"] for r in train if r["phase"] == "deep"] == list(range(1, 11))
    assert train[-1]["raw_loss"] < train[0]["raw_loss"] - 0.5  # it learns
    evals = [(r["phase"], r["step"]) for r in records if r["kind"] == "eval"]
    assert evals == [("shallow", 0), ("shallow", 5), ("shallow", 6), ("deep", 0), ("deep", 5), ("deep", 10)]
    assert [r["phase"] for r in records if r["kind"] == "sample"] == ["shallow", "deep"]
    summary = records[-1]
    assert summary["kind"] == "summary" and set(summary["val_bpb"]) == {"shallow", "deep"}
    # cumulative FLOPs count tokens per optimizer step, and the deep phase starts where the shallow one ended
    plan = records[0]["phases"]
    shallow_flops = plan[0]["flops_per_token"] * 256 * 6
    assert [r["flops"] for r in train][5] == shallow_flops
    assert summary["flops"] == train[-1]["flops"] == shallow_flops + plan[1]["flops_per_token"] * 256 * 10


def test_checkpoints_reload_and_stacking_keeps_the_loss(tiny_run):
    shallow_ckpt = sg.load_checkpoint(os.path.join(tiny_run, "shallow.pt"), "cpu")
    final_ckpt = sg.load_checkpoint(os.path.join(tiny_run, "final.pt"), "cpu")
    assert (shallow_ckpt["phase"], final_ckpt["phase"]) == ("shallow", "deep")
    assert (shallow_ckpt["model_config"].n_layer, final_ckpt["model_config"].n_layer) == (1, 2)
    for ckpt in (shallow_ckpt, final_ckpt):
        model = sg.GPT(ckpt["model_config"])
        model.load_state_dict(ckpt["model"])  # strict: every tensor present, none extra
        assert ckpt["args"]["stack_to"] == 2 and ckpt["loader"]["cursor"] > 0
    records = read_metrics(tiny_run)
    end_of_shallow = [r for r in records if r["kind"] == "eval" and r["phase"] == "shallow"][-1]
    start_of_deep = [r for r in records if r["kind"] == "eval" and r["phase"] == "deep"][0]
    assert start_of_deep["val_bpb"] < end_of_shallow["val_bpb"] + 0.5  # stacking gives a head start, not a reset


def test_init_from_reproduces_phase_two(tiny_run, tiny_data, tmp_path):
    out = str(tmp_path / "again")
    sg.main(TINY + ["--data", tiny_data, "--out-dir", out, "--init-from", os.path.join(tiny_run, "shallow.pt")])
    deep = lambda recs: [(r["kind"], r["step"], r.get("raw_loss"), r.get("val_bpb"), r["flops"])
                         for r in recs if r.get("phase") == "deep" and r["kind"] in ("train", "eval")]
    assert deep(read_metrics(out)) == deep(read_metrics(tiny_run))
    assert not os.path.exists(os.path.join(out, "shallow.pt"))


def test_baseline_run(tiny_data, tmp_path):
    out = str(tmp_path / "d2")
    sg.main(["--depth", "2"] + TINY[4:] + ["--data", tiny_data, "--out-dir", out])
    records = read_metrics(out)
    assert {r["phase"] for r in records if r["kind"] == "train"} == {"baseline"}
    assert records[-1]["kind"] == "summary" and os.path.exists(os.path.join(out, "final.pt"))


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "nan")
    real = sg.lr_multiplier
    monkeypatch.setattr(sg, "lr_multiplier", lambda step, steps, *a: float("nan") if steps == 10 and step == 3 else real(step, steps, *a))
    with pytest.raises(SystemExit) as e:
        sg.main(TINY + ["--data", tiny_data, "--out-dir", out])
    assert e.value.code == 1
    assert "deep phase: loss is nan at step 4" in capsys.readouterr().err
    assert sg.load_checkpoint(os.path.join(out, "shallow.pt"), "cpu")["phase"] == "shallow"
    assert not os.path.exists(os.path.join(out, "final.pt"))


# -----------------------------------------------------------------------------
# Bad input: one line naming the fix, exit code 2, nothing written

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
    (["--depth", "0"], "--depth must be positive"),
    (["--shallow-ratio", "-1"], "--shallow-ratio must be positive"),
    (["--deep-steps", "0"], "--deep-steps must be positive"),
    (["--total-batch-size", "0"], "--total-batch-size must be positive"),
    (["--warmdown-ratio", "-0.5"], "--warmdown-ratio must be >= 0"),
    (["--init-from", "x.pt"], "give --stack-to too"),
])
def test_bad_flags(capsys, tmp_path, argv, fragment):
    expect_usage_error(capsys, argv + ["--out-dir", str(tmp_path / "run")], fragment)
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
    argv = TINY + ["--data", other_vocab, "--out-dir", str(tmp_path / "d"), "--init-from", shallow]
    expect_usage_error(capsys, argv, "vocab_size=512 (this run: 300)")
    final = os.path.join(tiny_run, "final.pt")
    expect_usage_error(capsys, TINY + ["--data", tiny_data, "--out-dir", str(tmp_path / "b"), "--init-from", final], "takes the shallow.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(1000))
    expect_usage_error(capsys, TINY + ["--data", tiny_data, "--out-dir", str(tmp_path / "c"), "--init-from", str(junk)], "not a readable")
    assert not any(os.path.exists(tmp_path / d) for d in "abcd")


# -----------------------------------------------------------------------------
# CUDA only: bf16 autocast, compile and MFU

@cuda_only
def test_cuda_bf16_compiled_training_step_and_mfu(tiny_data, tmp_path, capsys):
    out = str(tmp_path / "cuda")
    sg.main(TINY + ["--data", tiny_data, "--out-dir", out, "--device", "cuda", "--compile"])
    records = read_metrics(out)
    train = [r for r in records if r["kind"] == "train"]
    assert all(math.isfinite(r["raw_loss"]) for r in train)
    if sg.peak_flops("cuda"):
        assert all(r["mfu"] is not None and r["mfu"] > 0 for r in train)
    ckpt = sg.load_checkpoint(os.path.join(out, "final.pt"), "cuda")
    assert ckpt["model"]["wte.weight"].dtype == torch.bfloat16
