"""
How far rounding moves the test runs, and how far real changes do: the measurements behind the tolerances of
test_stack_gpt.py's golden test (GOLDEN_EARLY_REL up to train step GOLDEN_EARLY_STEPS, GOLDEN_REL after) and
of its two-process test (1e-5).

    python experiments/rounding.py

First table: each variant runs the three golden runs (stacked, baseline, --init-from) in fresh processes and
prints the largest relative difference from experiments/golden.json, up to step 2 of the runs that start
from new weights and over everything, and whether the test accepts it. Rounding variants: this CPU's own
kernels (AVX-512, and AVX2 only) instead of the generic ones the test asks for, and every initial weight
moved by a relative 1e-6. Real changes: the lm_head's init 10% larger, one step at twice its LR.
Second table: the two-process test's run (TINY at nanochat's LRs) against itself with every initial weight
moved by a relative 1e-6, and under torchrun with 2 processes: the largest relative difference in train
loss and val bpb.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
import test_stack_gpt as t  # noqa: E402  (the golden runs and their tolerances)

NOISE = """
real_init = sg.GPT.init_weights
def init_weights(model):
    real_init(model)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.data.mul_(1 + 1e-6 * torch.randn(p.shape, generator=g))
sg.GPT.init_weights = init_weights
"""
BIGGER_HEAD = """
real_init = sg.GPT.init_weights
def init_weights(model):
    real_init(model)
    model.lm_head.weight.data *= 1.1
sg.GPT.init_weights = init_weights
"""
TWICE_THE_LR = """
real_step, steps = sg.MuonAdamW.step, []
def step(optimizer):  # the logged LR multiplier stays as it was: only the losses tell
    steps.append(len(steps))
    for group in optimizer.param_groups:
        group["lr"] *= 2 if len(steps) == 4 else 1
    real_step(optimizer)
sg.MuonAdamW.step = step
"""
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
VARIANTS = [  # (name, environment for the runs, code run before stack_gpt's main)
    ("the record's own setting (generic kernels)", t.PORTABLE, ""),
    ("this CPU's kernels, 2 threads", {}, ""),
    ("this CPU's kernels, AVX2 only", AVX2, ""),
    ("initial weights x (1 + 1e-6 noise)", t.PORTABLE, NOISE),
    ("lm_head init x 1.1", t.PORTABLE, BIGGER_HEAD),
    ("step 3 at twice its LR", t.PORTABLE, TWICE_THE_LR),
]


def run_variant(folder, data, env, patch):
    metrics = {}
    for name, flags in t.GOLDEN_RUNS.items():
        out = folder / name
        flags = [f.format(stacked=folder / "stacked") for f in flags]
        code = "import sys, torch, stack_gpt as sg\n" + patch + "\nsg.main(sys.argv[1:])\n"
        argv = t.GOLDEN_FLAGS + flags + ["--data", data, "--out-dir", str(out)]
        clean = {k: v for k, v in os.environ.items() if k not in t.PORTABLE}
        proc = subprocess.run([sys.executable, "-c", code] + argv, cwd=HERE, env={**clean, **env},
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        metrics[name] = t.golden_run(t.metrics_of(out))
    return metrics


def largest_differences(got, want):
    """(largest relative difference up to step 2 of the fresh runs, largest anywhere) in losses and val bpb."""
    early = anywhere = 0.0
    for name, run in want.items():
        for want_record, got_record in zip(run["records"], got[name]["records"]):
            first = want_record.get("phase") == run["records"][0]["phase"] and want_record.get("step", 99) <= 2
            for key, value in t.flat(want_record).items():
                if isinstance(value, float) and value and key != "lrm":  # the losses and val bpb
                    rel = abs(t.flat(got_record)[key] - value) / abs(value)
                    anywhere = max(anywhere, rel)
                    if first and name != "init-from":
                        early = max(early, rel)
    return early, anywhere


def tiny_differences():
    """The two-process test's run: 1e-6 noise on the initial weights, and 2 processes, against 1 process."""
    import email
    import json as json_package
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = str(tmp / "tiny")
        t.prepare_data.build_text_dataset([os.path.dirname(json_package.__file__), os.path.dirname(email.__file__)],
                                          data, vocab_size=512)
        argv = t.TINY[:t.TINY.index("--matrix-lr")] + ["--data", data, "--device", "cpu"]
        runs = {}
        for name, patch in [("one process", ""), ("initial weights x (1 + 1e-6 noise)", NOISE)]:
            code = "import sys, torch, stack_gpt as sg\n" + patch + "\nsg.main(sys.argv[1:])\n"
            subprocess.run([sys.executable, "-c", code] + argv + ["--out-dir", str(tmp / name)], cwd=HERE, check=True,
                           capture_output=True)
            runs[name] = t.comparable(t.metrics_of(tmp / name))
        proc = t.torchrun_two(argv + ["--out-dir", str(tmp / "two")], timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs["two processes (torchrun)"] = t.comparable(t.metrics_of(tmp / "two"))
        for name, records in list(runs.items())[1:]:
            largest = max(abs(b[k] - a[k]) / abs(a[k]) for a, b in zip(runs["one process"], records)
                          for k in ("raw_loss", "val_bpb") if isinstance(a.get(k), float))
            rows.append((name, largest))
    return rows


def main():
    with open(t.GOLDEN) as f:
        golden = json.load(f)["metrics"]
    print(f"tolerances: {t.GOLDEN_EARLY_REL:g} up to step {t.GOLDEN_EARLY_STEPS}, {t.GOLDEN_REL:g} after")
    print("| variant | largest difference up to step 2 | largest anywhere | the test accepts it |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        data = t.golden_data(Path(tmp))
        for i, (name, env, patch) in enumerate(VARIANTS):
            got = run_variant(Path(tmp) / f"v{i}", data, env, patch)
            early, anywhere = largest_differences(got, golden)
            accepted = "yes" if t.golden_mismatches(got, golden) == [] else "no"
            print(f"| {name} | {early:.1e} | {anywhere:.1e} | {accepted} |", flush=True)
    print("\n| the two-process test's run, against one process | largest difference in train loss and val bpb |")
    print("|---|---|")
    for name, largest in tiny_differences():
        print(f"| {name} | {largest:.1e} |", flush=True)


if __name__ == "__main__":
    main()
