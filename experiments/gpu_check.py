"""
One short check of the CUDA path, meant for a single call on a lent GPU (about 5 minutes on an H100):

    python experiments/gpu_check.py

1. the CUDA tests of test_stack_gpt.py (bf16 autocast + torch.compile, MFU line);
2. about 60 steps of the d12 baseline at nanochat's batch (2^19 tokens) and the same for d6s12,
   reporting tokens/s and MFU after warm-up, and peak memory (d6s12's deep phase is a d12, and the
   shallow model is freed at the growth: the two peaks should be equal);
3. a tiny two-phase stacked run to the end under compile, then --init-from its shallow checkpoint;
then a table. The data is built on the spot (offline, from the standard library) with a 32k BPE,
so nothing needs downloading. Without a GPU it runs the same steps at toy size on the CPU, to
check the plumbing; its numbers then mean nothing.
"""

import json
import os
import statistics
import subprocess
import sys

import torch

CUDA = torch.cuda.is_available()
DATA = "data/stdlib-32k" if CUDA else "data/stdlib"
OUT = "runs/gpu-check"


def sh(*cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def metrics(name):
    with open(f"{OUT}/{name}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def throughput(name, phase):
    """Median tokens/s and MFU over the logged steps after the first 10 (compile and warm-up)."""
    train = [r for r in metrics(name) if r["kind"] == "train" and r["phase"] == phase and r["step"] > 10]
    mfu = [r["mfu"] for r in train if r["mfu"] is not None]
    return statistics.median(r["tok_per_s"] for r in train), (statistics.median(mfu) if mfu else None)


def main():
    if not os.path.exists(f"{DATA}/meta.json"):
        sh(sys.executable, "prepare_data.py", *(["--vocab-size", "32768", "--name", "stdlib-32k"] if CUDA else []))
    sh(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_stack_gpt.py", "-k", "cuda")
    device = ["--device", "cuda" if CUDA else "cpu"]
    common = [sys.executable, "stack_gpt.py", "--data", DATA, "--eval-every", "0", "--overwrite"] + device
    size = ["--eval-tokens", "524288"] if CUDA else ["--aspect-ratio", "8", "--head-dim", "32", "--seq-len", "64", "--total-batch-size", "1024",
                                                    "--device-batch-size", "8", "--eval-tokens", "1024"]
    steps = "60" if CUDA else "14"
    sh(*common, *size, "--depth", "12", "--deep-steps", steps, "--out-dir", f"{OUT}/d12")
    sh(*common, *size, "--depth", "6", "--stack-to", "12", "--shallow-steps", steps, "--deep-steps", "2", "--out-dir", f"{OUT}/d6s12")
    tiny = ["--depth", "2", "--stack-to", "4", "--aspect-ratio", "32", "--head-dim", "32", "--seq-len", "256", "--device-batch-size", "8",
            "--total-batch-size", "8192", "--shallow-steps", "20", "--deep-steps", "20", "--eval-tokens", "65536" if CUDA else "2048", "--compile"]
    sh(*common, *tiny, "--out-dir", f"{OUT}/tiny")
    sh(*common, *tiny, "--init-from", f"{OUT}/tiny/shallow.pt", "--out-dir", f"{OUT}/tiny-init")
    deep_losses = [[r["raw_loss"] for r in metrics(run) if r["kind"] == "train" and r["phase"] == "deep"] for run in ("tiny", "tiny-init")]
    assert len(deep_losses[0]) == len(deep_losses[1]) > 0, "the --init-from run must log the same deep steps"
    gap = max(abs(a - b) for a, b in zip(*deep_losses))
    name = torch.cuda.get_device_name() if CUDA else "CPU (toy sizes: plumbing only)"
    print(f"\n{name} | torch {torch.__version__}\n")
    print("| run | tokens/s | MFU | peak memory |\n|---|---|---|---|")
    for run, phase in (("d12", "baseline"), ("d6s12", "shallow")):
        tok, mfu = throughput(run, phase)
        memory = metrics(run)[-1]["peak_memory_gib"]
        print(f"| {run} | {tok:,.0f} | {'-' if mfu is None else f'{mfu:.1f}%'} | {'-' if memory is None else f'{memory:.1f} GiB'} |")
    bpb = metrics("tiny")[-1]["val_bpb"]
    print(f"\ntiny stacked run under compile finished: val bpb {bpb['shallow']:.4f} -> {bpb['deep']:.4f}")
    print(f"--init-from repeats its deep phase: largest train-loss gap {gap:.1e} over {len(deep_losses[0])} steps "
          + ("(bit for bit)" if gap == 0 else "(a CUDA run is not bit-reproducible unless deterministic kernels are forced)"))


if __name__ == "__main__":
    main()
