"""
What stack_gpt.py prints about a run, kept out of the lesson: the plan and its expected cost before
training (from one timed forward and backward of a scratch model), MFU while training, and after it
the acceleration report against a baseline (--baseline, --compare). A module of its own because
those flags of the training script need it; experiments/sweeps.py uses it too.
"""

import json
import math
import os
import time

import torch

from machinery import UsageError

# The README's quick start: what to run on a CPU instead of a plan sized for a GPU (a test keeps the two the same).
CPU_QUICK_START = ("python stack_gpt.py --depth 2 --stack-to 4 --aspect-ratio 32 --head-dim 32 --seq-len 256 --device-batch-size 16 "
                   "--total-batch-size 4096 --ratio 2.5 --shallow-ratio 1.25 --eval-every 100 --eval-tokens 65536")
MEMORIZING_EPOCHS = 10  # past this many passes over the train tokens, a model starts to memorize them


# -----------------------------------------------------------------------------
# Before training: the plan and what it will cost

def measure_flops_per_second(model, args, autocast):
    """
    This machine's speed on this model: one eager forward and backward of `model` (a scratch copy)
    over one micro-batch, or fewer rows where that would take long on a CPU, timed on the second
    call (the first pays for allocation and kernel selection), in FLOPs per second. A compiled run
    is faster than this.
    """
    row_flops = model.flops_per_token() * args.seq_len
    rows = args.device_batch_size if args.device == "cuda" else max(1, min(args.device_batch_size, int(1e11 // row_flops)))  # CPU: ~1 s
    tokens = torch.zeros(rows, args.seq_len, dtype=torch.long, device=args.device)
    for _ in range(2):
        start = time.perf_counter()
        with autocast:
            model(tokens, tokens).backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the summary's peak memory is the run's, not this copy's
    return row_flops * rows / seconds


def estimate_seconds(phases, args, val_tokens, flops_per_second):
    """Training plus evaluations (forward only: a third of a training token's FLOPs), at the measured speed."""
    seconds = 0
    for p in phases:
        evals = p.steps // args.eval_every + 1 + (p.steps % args.eval_every > 0) if args.eval_every else 1  # step 0, every N, the end
        seconds += (p.flops + evals * val_tokens * p.flops_per_token / 3) / flops_per_second
    return seconds


def describe_cost(seconds, flops_per_second, args):
    """The expected wall time, and the CPU command to run instead when that is days."""
    days, hours, minutes = seconds / 86400, seconds / 3600, seconds / 60
    when = f"{days:.1f} days" if days >= 2 else f"{hours:.1f} hours" if hours >= 2 else f"{minutes:.1f} minutes"
    lines = [f"estimated time: about {when} on this {args.device} ({flops_per_second:.3g} FLOP/s in a timed eager forward and backward "
             f"of the first model; optimizer steps not counted)"]
    if days >= 1 and args.device == "cpu":
        lines.append(f"this plan is sized for a GPU. On a CPU, try the README's quick start instead: {CPU_QUICK_START}")
    return "\n".join(lines)


def paper_growth_tokens(params, flops):
    """Du et al.'s fit for how many tokens to train before growing: log10 d = 0.88 log10 N + 163.27 / log10 C - 5.74."""
    return 10 ** (0.88 * math.log10(params) + 163.27 / math.log10(flops) - 5.74)


def describe_plan(phases, args, meta, deep_params, flops_before=0):
    """What the run will do, in FLOPs and tokens, before it starts (deep_params: the final model's parameters)."""
    lines = []
    for p in phases:
        c = p.config
        lines.append(f"{p.name}: {c.n_layer} layers x {c.n_embd} wide, {c.n_head} heads | {p.steps} steps x {p.batch_size:,} tokens"
                     f" | {p.flops_per_token:.3e} FLOPs/token | {p.flops:.3e} FLOPs | warmdown {p.warmdown_ratio} | wd {p.weight_decay:.4f}")
    tokens = [p.batch_size * p.steps for p in phases]
    total_flops = flops_before + sum(p.flops for p in phases)
    epochs = sum(tokens) / meta["train_tokens"]
    lines.append(f"total: {total_flops:.3e} FLOPs, {sum(tokens):,} tokens"
                 + (f" = {epochs:.2f} epochs of the {meta['train_tokens']:,} train tokens" if epochs > 1 else "")
                 + (f" | one LR schedule over the whole run, warmdown {args.warmdown_ratio}" if args.schedule == "global" else ""))
    if args.stacked and not flops_before:
        fit = paper_growth_tokens(deep_params, total_flops)
        lines.append(f"growth after {phases[0].flops / total_flops:.1%} of the FLOPs and {tokens[0] / sum(tokens):.1%} of the tokens; "
                     f"the paper's fit for {deep_params:,} params and {total_flops:.2e} FLOPs grows after {fit:.3g} tokens"
                     + (" (beyond this whole run: its fit does not reach down to this scale)" if fit > sum(tokens) else ""))
    if epochs > MEMORIZING_EPOCHS:
        lines.append(f"this plan reads the train tokens {epochs:.0f} times: past about {MEMORIZING_EPOCHS} the model memorizes them and val bpb "
                     f"stops meaning much; build a larger dataset (python prepare_data.py --dataset pylibs, or fineweb-edu) or lower --ratio")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# While training: model FLOPs utilization

PEAK_BF16_FLOPS = [  # (substrings of the device name, dense bf16 FLOP/s); first match wins
    (("h100", "pcie"), 756e12), (("h100", "nvl"), 835e12), (("h100",), 989e12), (("h200",), 989e12),
    (("b200",), 2.25e15), (("a100",), 312e12), (("l40s",), 362e12), (("l40",), 181e12), (("l4",), 121e12),
    (("rtx pro 6000",), 503.8e12), (("5090",), 209.5e12), (("4090",), 165.2e12), (("3090",), 71e12),
]


def peak_flops(device):
    """The GPU's peak from the table, or None (CPU, unknown GPU): then no MFU is shown."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name().lower()
    return next((peak for keys, peak in PEAK_BF16_FLOPS if all(k in name for k in keys)), None)


# -----------------------------------------------------------------------------
# After training: how much of the baseline's compute did the stacked run need?

def read_metrics(path):
    """The records of a run's metrics.jsonl (path to the file or to its run folder)."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UsageError(f"no metrics file at {path}: give a run folder or its metrics.jsonl")
    needs = {"train": ("flops", "loss"), "eval": ("flops", "val_bpb")}  # what the acceleration report reads
    records = []
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise UsageError(f"{path} line {n} is not JSON (a run killed mid-write?): remove that line") from None
                if not isinstance(record, dict) or not all(k in record for k in needs.get(record.get("kind"), ())):
                    raise UsageError(f"{path} line {n} is not a stack_gpt metrics record: give the metrics.jsonl of a run")
                records.append(record)
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a text file: give a run folder or its metrics.jsonl") from None
    for kind in needs:
        if not any(r.get("kind") == kind for r in records):
            raise UsageError(f"{path} has no {kind} records yet: give the metrics of a run that has trained and evaluated")
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
            share = (above[key] - target) / (above[key] - below[key])  # how far from `above` to `below` the line meets target
            return above["flops"] + share * (below["flops"] - above["flops"])
    return None


def acceleration(baseline, run, name):
    """
    Compare a run with a baseline as the paper and the write-up do: the fraction of the
    baseline's total FLOPs at which the run (shallow phase included) first reaches the
    baseline's final smoothed train loss, and its final val bpb. saving = 1 - fraction,
    and the paper's speedup = 1/fraction - 1 (compute the baseline needed over what we needed).
    The crossing is interpolated linearly between the two records around it (flops_reaching).
    A run that never reaches the baseline's val bpb has no saving in that sense, so bpb_compute_ratio
    compares the two where both get to: where the run reaches the baseline's final val bpb it is
    bpb_fraction, else it is the run's total FLOPs over the baseline's FLOPs to the run's final val bpb
    (above 1: the run cost more than the baseline needed for it).
    """
    base_train = [r for r in baseline if r["kind"] == "train"]
    base_evals = [r for r in baseline if r["kind"] == "eval"]
    train = [r for r in run if r["kind"] == "train"]
    evals = [r for r in run if r["kind"] == "eval"]
    budget = base_evals[-1]["flops"]
    at_budget = [r for r in evals if r["flops"] <= budget * (1 + 1e-9)]
    row = dict(name=name, val_bpb=evals[-1]["val_bpb"], flops=evals[-1]["flops"], baseline_val_bpb=base_evals[-1]["val_bpb"],
               baseline_flops=budget, val_bpb_at_budget=at_budget[-1]["val_bpb"] if at_budget else None)
    for metric, records, key, target in [("loss", train, "loss", base_train[-1]["loss"]), ("bpb", evals, "val_bpb", base_evals[-1]["val_bpb"])]:
        reached = flops_reaching(records, key, target)
        fraction = reached / budget if reached is not None else None
        row[f"{metric}_fraction"] = fraction
        row[f"{metric}_saving"] = 1 - fraction if fraction else None
        row[f"{metric}_speedup"] = 1 / fraction - 1 if fraction else None
    if row["bpb_fraction"]:
        row["bpb_compute_ratio"] = row["bpb_fraction"]
    else:  # the run ends worse, so the baseline gets to the run's final val bpb at or before its own end
        reached = flops_reaching(base_evals, "val_bpb", row["val_bpb"])
        row["bpb_compute_ratio"] = row["flops"] / reached if reached else None  # None: a NaN, or worse than the untrained baseline
    return row


def format_report(rows):
    """The rows of acceleration() as a markdown table."""
    pct = lambda x: "not reached" if x is None else f"{100 * x:.1f}%"
    lines = [f"baseline: val bpb {rows[0]['baseline_val_bpb']:.4f} at {rows[0]['baseline_flops']:.3e} FLOPs", "",
             "| run | val bpb | FLOPs | val bpb at baseline FLOPs | reaches baseline train loss at | saving | speedup "
             "| reaches baseline val bpb at | saving | speedup |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        at_budget = "-" if r["val_bpb_at_budget"] is None else f"{r['val_bpb_at_budget']:.4f}"
        lines.append(f"| {r['name']} | {r['val_bpb']:.4f} | {r['flops']:.3e} | {at_budget} | "
                     + " | ".join(f"{pct(r[m + '_fraction'])} | {pct(r[m + '_saving'])} | {pct(r[m + '_speedup'])}" for m in ("loss", "bpb")) + " |")
    return "\n".join(lines)


def compare_runs(paths):
    baseline = read_metrics(paths[0])
    return format_report([acceleration(baseline, read_metrics(p), p) for p in paths[1:]])
