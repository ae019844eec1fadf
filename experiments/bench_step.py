"""
Training-step throughput of stack_gpt.py against nanochat's model and optimizer at the same tiny
config, on the CPU in fp32 (median of 30 steps after 5 warm-up steps):

    python experiments/bench_step.py ours
    python experiments/bench_step.py nanochat --nanochat PATH   # a nanochat checkout (we used commit 4585551)

Run the two alternately a few times: they differ by less than the noise between runs.
nanochat imports filelock (pip install filelock).

    python experiments/bench_step.py ours --profile             # where our step's time goes
    python experiments/bench_step.py ours --default-malloc      # without the malloc thresholds stack_gpt.py sets
    python experiments/bench_step.py ours --dtype bf16 --compile

--default-malloc leaves glibc's allocator as it is (stack_gpt.py's CPU runs change it: keep_freed_memory).
--dtype bf16 and --compile run our step as stack_gpt.py does with those flags.

--profile times forward, backward, optimizer and an evaluation forward separately (medians) and
prints torch.profiler's top operators of the whole step.
"""

import argparse
import contextlib
import os
import sys
import time
import types

import torch

p = argparse.ArgumentParser()
p.add_argument("which", choices=["ours", "nanochat"])
p.add_argument("--nanochat", help="path of a nanochat checkout")
p.add_argument("--profile", action="store_true", help="break the step down into its parts and list the top operators")
p.add_argument("--default-malloc", action="store_true", help="ours: leave glibc's malloc thresholds alone")
p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="ours: bf16 autocast, tables and Polar Express")
p.add_argument("--compile", action="store_true", help="ours: torch.compile the model")
args = p.parse_args()
if args.profile and args.which != "ours":
    p.error("--profile breaks down our step only")
sys.path.insert(0, args.nanochat or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.manual_seed(0)
step_model, precision = None, contextlib.nullcontext()  # ours may compile the model and run it in bf16
L, H, D, V, T, B = 4, 4, 128, 4096, 256, 16  # d4 at width 128, vocab 4096, 16 x 256 tokens a step
if args.which == "nanochat":
    from nanochat.gpt import GPT, GPTConfig
    model = GPT(GPTConfig(sequence_len=T, vocab_size=V, n_layer=L, n_head=H, n_kv_head=H, n_embd=D, window_pattern="L"))
    model.init_weights()
    step_model = model
    optimizer = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.2, scalar_lr=0.5)
else:
    import stack_gpt as sg
    run_args = types.SimpleNamespace(device="cpu", dtype=args.dtype)
    if not args.default_malloc:
        sg.keep_freed_memory(run_args)
    config = sg.GPTConfig(n_layer=L, n_head=H, n_embd=D, vocab_size=V, sequence_len=T, ve_layers=sg.default_ve_layers(L))
    model = sg.empty_model(config, "cpu", sg.PRECISIONS[args.dtype])
    model.init_weights()
    lrs = types.SimpleNamespace(matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.004, scalar_lr=0.5, lr_scale=1.0, dtype=args.dtype)
    optimizer = sg.build_optimizer(model, lrs, 2**19, 0.2)
    step_model, precision = torch.compile(model, dynamic=False) if args.compile else model, sg.precision(run_args)
for group in optimizer.param_groups:
    if group["kind"] == "muon":
        group["momentum"] = 0.95
x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))


def step():
    with precision:
        loss = step_model(x, y)
    loss.backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)


def upper_median(values):
    return sorted(values)[len(values) // 2]


def eval_forward():
    with torch.no_grad():
        model(x, y, reduction="none")


def profile():
    for _ in range(5):
        step()
    state = {}
    parts = {
        "forward": lambda: state.update(loss=model(x, y)),
        "backward": lambda: state.pop("loss").backward(),
        "optimizer": lambda: (optimizer.step(), model.zero_grad(set_to_none=True)),
        "eval forward (reduction='none', no grad)": eval_forward,
    }
    times = {name: [] for name in parts}
    for _ in range(20):
        for name, fn in parts.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        print(f"{name}: {1000 * upper_median(ts):.1f} ms")
    with torch.profiler.profile() as prof:
        for _ in range(5):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if args.profile:
    profile()
    sys.exit()
times = []
for i in range(35):
    t0 = time.perf_counter()
    step()
    if i >= 5:
        times.append(time.perf_counter() - t0)
median = upper_median(times)
flags = [f for f, on in (("--default-malloc", args.default_malloc), (f"--dtype {args.dtype}", args.dtype != "fp32"),
                         ("--compile", args.compile)) if on]
print(f"{' '.join([args.which] + flags)}: median step {median * 1000:.1f} ms, {B * T / median:,.0f} tok/s")
