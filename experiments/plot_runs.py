"""
Val bpb against cumulative training FLOPs for any run folders of stack_gpt.py, one line per run,
with the point where a stacked run grew marked. Run from the repository root:

    python experiments/plot_runs.py runs/d4 runs/d2s4 --out experiments/quick_start_bpb.png

matplotlib is optional (not in requirements.txt): without it the script says how to get it.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import stack_gpt  # noqa: E402  (read_metrics and its one-line UsageError)


def curves(records):
    """
    A run's evaluations as (cumulative FLOPs, val bpb) points, and the FLOPs at which it grew: those of
    its first deep evaluation (None for a run with no shallow phase, such as a baseline).
    """
    evals = [r for r in records if r["kind"] == "eval"]
    points = [(r["flops"], r["val_bpb"]) for r in evals]
    phases = [r["phase"] for r in evals]
    grown = evals[phases.index("deep")]["flops"] if "shallow" in phases and "deep" in phases else None
    return points, grown


def run_name(path):
    """The run folder's name, also when the path is its metrics.jsonl."""
    path = os.path.normpath(path)
    return os.path.basename(os.path.dirname(path) if path.endswith(".jsonl") else path)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Plot val bpb against FLOPs for run folders.")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="a run folder (or its metrics.jsonl)")
    parser.add_argument("--out", default="val_bpb.png", help="the PNG to write (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        runs = [(run_name(path), *curves(stack_gpt.read_metrics(path))) for path in args.runs]
    except stack_gpt.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("error: plotting needs matplotlib, which stack-gpt does not require: pip install matplotlib",
              file=sys.stderr)
        sys.exit(2)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, points, grown in runs:
        flops, bpb = zip(*points)
        line, = ax.plot(flops, bpb, ".-", label=f"{name}, ends at {bpb[-1]:.4f}")
        if grown is not None:
            ax.axvline(grown, color=line.get_color(), ls=":", lw=1.5,
                       label=f"{name} grows here ({grown:.2g} FLOPs)")
    ax.set(xlabel="cumulative training FLOPs", ylabel="val bpb (bits per byte; lower is better)",
           title="Validation loss against training compute")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(args.out, dpi=90, bbox_inches="tight")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
