"""
The experiments behind experiments.md, as data: every run's flags, and the report that turns
their metrics files into the tables and plots. Run from the repository root:

    python experiments/sweeps.py list                     # every run, its command, and whether it finished
    python experiments/sweeps.py run fixed-flops recipes  # run the unfinished runs of these sweeps, one by one
    python experiments/sweeps.py run fixed-flops --seed 1 # only the runs of seed 1 (two such streams fill 2 cores
                                                          # a little better than one run on both: OMP_NUM_THREADS=1 each)
    python experiments/sweeps.py report                   # every table (markdown) and the plots, from experiments/runs/

A run is finished when its folder holds a summary record; an interrupted run starts over.
Checkpoints (*.pt) stay out of git; metrics.jsonl and config.json are kept.
"""

import argparse
import math
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reports  # noqa: E402  (the acceleration arithmetic of stack_gpt.py's --compare)

RUNS = "experiments/runs"
DATA = "data/pylibs-2048"
PREPARE = "python prepare_data.py --dataset pylibs --vocab-size 2048 --name pylibs-2048"
# One CPU-scale family for every sweep: target depth 4 at width 128 (4 heads of 32), context 256,
# 4096-token batches. The shallow d2s4 costs 0.60 of the d4's FLOPs per token, as d6s12 does of d12.
FAMILY = ["--data", DATA, "--aspect-ratio", "32", "--head-dim", "32", "--seq-len", "256", "--device-batch-size", "16",
          "--total-batch-size", "4096", "--eval-every", "100", "--eval-tokens", "131072", "--sample-tokens", "0", "--log-every", "10"]
SEEDS = (0, 1, 2)
SHALLOW_RATIOS = (1.25, 2.25, 3.25, 4.25, 5.25)
BEST_SHALLOW_RATIO = "5.25"  # the fixed-FLOPs sweep's best arm (the top of its range); the recipes sweep runs there
STACKED = ["--depth", "2", "--stack-to", "4"]
# what the write-up could not try, each one change from the plain stack (d2s4 -> d4)
RECIPES = {"g4": ["--depth", "1", "--stack-to", "4"], "interleave": STACKED + ["--grow", "interleave"],
           "identity": STACKED + ["--grow", "identity"], "random": STACKED + ["--grow", "random"],
           "carry": STACKED + ["--grow-optim", "carry"], "global": STACKED + ["--schedule", "global"],
           # the best combination found (experiments.md says how it was chosen): the plain stack with the
           # deep-phase warmdown that won the warmdown sweep, 0.5 (nanochat's default and the baseline's)
           "combo": STACKED + ["--warmdown-ratio", "0.5"]}
# Part 2 (experiments.md, where its provenance is stated): tune the baseline before comparing with it.
# The decision rules are experiments.md's, written before the runs; the functions below apply them to the data.
LR_SCALES = ("1", "2", "4", "0.5")  # --lr-scale: all groups' LRs together, at warmdown 0.5; run in this order (Part 1 suggested "more")
WARMDOWNS = ("0.3", "0.5", "0.7")  # the baseline's --warmdown-ratio, at the winning multiplier (0.5 is tune-lr's run)
TUNING_SEEDS = (0, 1)
TIE = 0.002  # mean final val bpb this close counts as a tie: the setting nearer the default wins
GROW_SHARES = ("0.2", "0.4", "0.6", "0.8")  # --grow-at, with one LR schedule across growth (--schedule global)
# A warmdown short enough that the late growth points come before the decay starts (at 85% of the budget,
# after growth at 80%): the deep model then gets 5% of the budget at the peak LR before the decay.
SHORT_WARMDOWN = "0.15"
GROWTH_SEEDS = (0, 1, 2)
CONFIRM_SEEDS = tuple(range(8))


def sweeps():
    """{sweep: [(run name, flags)]}, in the order they are run."""
    fixed = []
    for s in SEEDS:  # seed by seed, so that a partial sweep is still a complete comparison
        fixed.append((f"baseline-s{s}", ["--depth", "4", "--seed", str(s)]))
        fixed += [(f"r{r}-s{s}", STACKED + ["--shallow-ratio", str(r), "--seed", str(s)]) for r in SHALLOW_RATIOS]
    recipes = [(f"{name}-s{s}", flags + ["--shallow-ratio", BEST_SHALLOW_RATIO, "--seed", str(s)])
               for s in SEEDS for name, flags in RECIPES.items()]
    shallow = f"{RUNS}/warmdown/wd0.5/shallow.pt"
    warmdown = [("wd0.5", STACKED + ["--shallow-warmdown-ratio", "0.5", "--warmdown-ratio", "0.5"])]
    warmdown += [(f"wd{w}", STACKED + ["--init-from", shallow, "--warmdown-ratio", w]) for w in ("0.75", "1.0", "1.5", "2.0")]
    default_schedule = ["--shallow-warmdown-ratio", "0.5", "--warmdown-ratio", "0.5"]
    # the d4 baseline of the miniseries is the fixed-FLOPs sweep's baseline-s0 (the same command)
    mini = [("d2", ["--depth", "2"])]
    mini += [(f"d{d // 2}s{d}", ["--depth", str(d // 2), "--stack-to", str(d), "--shallow-ratio", "10.5", "--deep-ratio", "10.5"] + default_schedule)
             for d in (2, 4)]
    tune_lr = [(f"lr{m}-s{s}", ["--depth", "4", "--lr-scale", m, "--seed", str(s)]) for s in TUNING_SEEDS for m in lr_scales()]
    lr = tuned_lr_scale()  # each later step of Part 2 waits for the one before it (an empty list until then)
    tune_warmdown = [(f"lr{lr}-wd{w}-s{s}", ["--depth", "4", "--lr-scale", lr, "--warmdown-ratio", w, "--seed", str(s)])
                     for s in TUNING_SEEDS for w in WARMDOWNS if w != "0.5"] if lr else []
    tuned = tuned_settings()
    grow_at, confirm = [], []
    if tuned:
        lr, tuned_warmdown = tuned  # (not `warmdown`: that is Part 1's sweep above)
        baseline = ["--depth", "4", "--lr-scale", lr, "--warmdown-ratio", tuned_warmdown]
        for s in GROWTH_SEEDS:
            grow_at += [(f"baseline-s{s}", baseline + ["--seed", str(s)])] if s not in TUNING_SEEDS else []
            grow_at += [(f"{name}-s{s}", flags + ["--seed", str(s)]) for name, flags in growth_arms(lr, tuned_warmdown).items()]
        best = best_growth_arm(lr, tuned_warmdown)
        if best:
            confirm = [(f"baseline-s{s}", baseline + ["--seed", str(s)]) for s in CONFIRM_SEEDS if s not in GROWTH_SEEDS]
            confirm += [(f"{best}-s{s}", growth_arms(lr, tuned_warmdown)[best] + ["--seed", str(s)]) for s in CONFIRM_SEEDS if s not in GROWTH_SEEDS]
    return {"fixed-flops": fixed, "recipes": recipes, "warmdown": warmdown, "miniseries": mini, "tune-lr": tune_lr,
            "tune-warmdown": tune_warmdown, "grow-at": grow_at, "confirm": confirm}


def growth_arms(lr, warmdown):
    """
    Part 2, step 2: {arm: flags}. One schedule over the whole run at the tuned LR and warmdown, growing at
    each share of the budget; a share that would fall inside the decay also runs at SHORT_WARMDOWN.
    Evaluations every 50 steps, so that savings interpolate between close points.
    """
    arms = {}
    for share in GROW_SHARES:
        for w in [warmdown] + [SHORT_WARMDOWN] * (float(share) >= 1 - float(warmdown)):
            name = f"at{share}" + (f"-wd{w}" if w != warmdown else "")
            arms[name] = STACKED + ["--schedule", "global", "--grow-at", share, "--lr-scale", lr, "--warmdown-ratio", w, "--eval-every", "50"]
    return arms


# --- the decision rules of Part 2, on the finished runs ---

def final_bpb(sweep, name):
    """A finished run's final val bpb (None until it finishes)."""
    return records(sweep, name)[-1]["val_bpb"] if finished(sweep, name) else None


def mean_over_seeds(sweep, name, seeds):
    """Mean final val bpb of run `name`-s<seed> over the seeds; None until every one has finished."""
    bpb = [final_bpb(sweep, f"{name}-s{s}") for s in seeds]
    return None if None in bpb else statistics.mean(next(iter(b.values())) for b in bpb)


def pick(means, default):
    """The lowest mean wins; within TIE of it, the candidate nearest the default (by ratio) wins instead."""
    best = min(means.values())
    near = [c for c, m in means.items() if m <= best + TIE]
    return min(near, key=lambda c: (abs(math.log(float(c) / float(default))), means[c]))


def lr_scales():
    """LR_SCALES, extended by a factor of 2 past whichever edge wins, until the winner is inside the range."""
    scales = list(LR_SCALES)
    while True:
        means = {m: mean_over_seeds("tune-lr", f"lr{m}", TUNING_SEEDS) for m in scales}
        if None in means.values():
            return scales
        edges = sorted(scales, key=float)
        winner = pick(means, "1")
        if winner not in (edges[0], edges[-1]):
            return scales
        scales.append(f"{float(winner) * (2 if winner == edges[-1] else 0.5):g}")


def tuned_lr_scale():
    """The winning --lr-scale, or None while tune-lr is unfinished."""
    scales = lr_scales()
    means = {m: mean_over_seeds("tune-lr", f"lr{m}", TUNING_SEEDS) for m in scales}
    return None if None in means.values() else pick(means, "1")


def tuned_settings():
    """(--lr-scale, --warmdown-ratio) of the tuned baseline, or None while tuning is unfinished."""
    lr = tuned_lr_scale()
    if lr is None:
        return None
    means = {w: mean_over_seeds("tune-warmdown", f"lr{lr}-wd{w}", TUNING_SEEDS) for w in WARMDOWNS if w != "0.5"}
    means["0.5"] = mean_over_seeds("tune-lr", f"lr{lr}", TUNING_SEEDS)
    return None if None in means.values() else (lr, pick(means, "0.5"))


def best_growth_arm(lr, warmdown):
    """The growth arm with the lowest mean final val bpb over GROWTH_SEEDS, or None while any is unfinished."""
    means = {arm: mean_over_seeds("grow-at", arm, GROWTH_SEEDS) for arm in growth_arms(lr, warmdown)}
    return None if None in means.values() else min(means, key=means.get)


def command(sweep, name, flags):
    return ["python", "stack_gpt.py"] + FAMILY + flags + ["--out-dir", f"{RUNS}/{sweep}/{name}"]


def finished(sweep, name):
    path = f"{RUNS}/{sweep}/{name}/metrics.jsonl"
    return os.path.exists(path) and '"kind": "summary"' in open(path).read()


def selected(sweep, seeds):
    """The runs of a sweep, or only those of the given seeds (runs without a seed belong to none)."""
    return [(name, flags) for name, flags in sweeps()[sweep] if not seeds or any(name.endswith(f"-s{s}") for s in seeds)]


def fail(message):
    """A one-line error and exit status 2, as stack_gpt.py does for a usage error."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run(names, seeds):
    if not os.path.exists(f"{DATA}/meta.json"):
        subprocess.run(PREPARE.split(), check=True)
    for sweep in names:
        # the list is made anew after every run: a finished step of Part 2 can add runs (its rules decide which)
        while todo := [(name, flags) for name, flags in selected(sweep, seeds) if not finished(sweep, name)]:
            name, flags = todo[0]
            shallow = flags[flags.index("--init-from") + 1] if "--init-from" in flags else None
            if shallow and not os.path.exists(shallow):  # checkpoints stay out of git: a fresh clone lacks them
                fail(f"{name} starts from {shallow}, which is missing: rerun its run first "
                     f"(rm -r {os.path.dirname(shallow)}; python experiments/sweeps.py run {sweep})")
            print(" ".join(command(sweep, name, flags)), flush=True)
            subprocess.run(command(sweep, name, flags) + ["--overwrite"], check=True)


# -----------------------------------------------------------------------------
# Report

def records(sweep, name):
    return reports.read_metrics(f"{RUNS}/{sweep}/{name}")


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return "never"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def pct_mean_std(values):
    if any(v is None for v in values):
        return f"not reached in {sum(v is None for v in values)}/{len(values)}"
    return f"{100 * statistics.mean(values):+.1f}%" + (f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else "")


# Student's t for a two-sided 95% interval, by degrees of freedom (past 10, the value at 10 is a safe bound)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired_difference(differences):
    """
    Mean of (arm - baseline of the same seed) with its 95% confidence interval. Pairing by seed removes
    what the seed does to both (the same data order): the spread that remains is the arm's own.
    """
    if len(differences) < 2:
        return f"{differences[0]:+.4f} (1 seed: no interval)"
    mean = statistics.mean(differences)
    half = T_975[min(len(differences) - 1, 10)] * statistics.stdev(differences) / math.sqrt(len(differences))
    verdict = "worse" if mean - half > 0 else "better" if mean + half < 0 else "no significant difference"
    worse = sum(d > 0 for d in differences)
    return f"{mean:+.4f} ± {half:.4f}, worse in {worse}/{len(differences)} seeds: {verdict}"


def seed_table(sweep, arms, baseline_of):
    """One row per arm: mean ± std over its finished seeds, each seed compared with its own baseline seed."""
    lines = ["| arm | seeds | final val bpb | total FLOPs | saving to baseline train loss | saving to baseline val bpb | val bpb minus baseline's, same seed (95% CI) |",
             "|---|---|---|---|---|---|---|"]
    base_bpb = [r[-1]["val_bpb"]["baseline"] for r in (baseline_of(s) for s in SEEDS) if r]
    for arm in arms:
        rows = []
        for s in SEEDS:
            if finished(sweep, f"{arm}-s{s}") and baseline_of(s):
                rows.append(reports.acceleration(baseline_of(s), records(sweep, f"{arm}-s{s}"), arm))
        if not rows:
            continue
        bpb = [r["val_bpb"] for r in rows]
        lines.append(f"| {arm} | {len(rows)} | {mean_std(bpb)} | {statistics.mean(r['flops'] for r in rows):.3e} | "
                     f"{pct_mean_std([r['loss_saving'] if r['loss_fraction'] else None for r in rows])} | "
                     f"{pct_mean_std([r['bpb_saving'] if r['bpb_fraction'] else None for r in rows])} | "
                     f"{paired_difference([r['val_bpb'] - r['baseline_val_bpb'] for r in rows])} |")
    return "\n".join(lines), base_bpb


def bpb_at(records, flops):
    """Val bpb of the last evaluation at or before `flops`."""
    evals = [r for r in records if r["kind"] == "eval" and r["flops"] <= flops * (1 + 1e-9)]
    return evals[-1]["val_bpb"]


def trajectory_table(seeds):
    """
    The baseline's val bpb at a quarter, half, three quarters and all of its budget (mean over seeds), and
    each fixed-FLOPs arm's difference from the baseline of its own seed at the same points (mean over seeds).
    """
    fractions = (0.25, 0.5, 0.75, 1.0)
    at = lambda run, base: [bpb_at(run, f * base[-1]["flops"]) for f in fractions]
    base_bpb = [at(baseline_records(s), baseline_records(s)) for s in seeds]
    lines = [f"Val bpb on the way (last evaluation at or before each share of the budget; seeds {', '.join(map(str, seeds))}): "
             "the baseline's, then each arm's minus the baseline's of the same seed (negative: the stacked run is ahead).", "",
             "| run | " + " | ".join(f"{f:.0%} of FLOPs" for f in fractions) + " |", "|---|" + "---|" * len(fractions),
             "| baseline (val bpb) | " + " | ".join(f"{statistics.mean(v):.4f}" for v in zip(*base_bpb)) + " |"]
    for r in SHALLOW_RATIOS:
        done = [s for s in seeds if finished("fixed-flops", f"r{r}-s{s}")]
        if done:
            diffs = [[a - b for a, b in zip(at(records("fixed-flops", f"r{r}-s{s}"), baseline_records(s)), base_bpb[seeds.index(s)])] for s in done]
            lines.append(f"| r{r} ({len(done)} seed{'s' * (len(done) > 1)}) | " + " | ".join(f"{statistics.mean(v):+.4f}" for v in zip(*diffs)) + " |")
    return lines


def versus_plain_stack(recipes):
    """Each recipe against the plain stack (d2s4, g=2, fresh optimizer, two schedules) at the same ratio and seed."""
    plain = f"r{BEST_SHALLOW_RATIO}"
    final_bpb = lambda sweep, name: records(sweep, name)[-1]["val_bpb"]["deep"]
    lines = [f"Each recipe minus the plain stack {plain} of the same seed (final val bpb, 95% CI; negative: the recipe is better):", "",
             "| recipe | seeds | val bpb minus plain stack's |", "|---|---|---|"]
    for name in recipes:
        done = [s for s in SEEDS if finished("recipes", f"{name}-s{s}") and finished("fixed-flops", f"{plain}-s{s}")]
        if done:
            diffs = [final_bpb("recipes", f"{name}-s{s}") - final_bpb("fixed-flops", f"{plain}-s{s}") for s in done]
            lines.append(f"| {name} | {len(done)} | {paired_difference(diffs)} |")
    return lines


def tuning_table():
    """Part 2, step 1: the baseline's final val bpb at each LR multiplier, by seed and on average (the decision rule's input)."""
    lines = ["| --lr-scale | " + " | ".join(f"seed {s}" for s in TUNING_SEEDS) + " | mean |", "|---|" + "---|" * (len(TUNING_SEEDS) + 1)]
    for m in sorted(LR_SCALES, key=float):
        bpb = [records("tune-lr", f"lr{m}-s{s}")[-1]["val_bpb"]["baseline"] if finished("tune-lr", f"lr{m}-s{s}") else None for s in TUNING_SEEDS]
        done = [b for b in bpb if b is not None]
        if done:
            lines.append(f"| {m} | " + " | ".join("todo" if b is None else f"{b:.4f}" for b in bpb) +
                         f" | {statistics.mean(done):.4f}{'' if len(done) == len(bpb) else ' (partial)'} |")
    return lines


def baseline_records(seed):
    return records("fixed-flops", f"baseline-s{seed}") if finished("fixed-flops", f"baseline-s{seed}") else None


def report():
    out = []
    base_runs = [s for s in SEEDS if baseline_records(s)]
    if not base_runs:
        fail("no finished baseline yet: python experiments/sweeps.py run fixed-flops")
    table, base_bpb = seed_table("fixed-flops", [f"r{r}" for r in SHALLOW_RATIOS], baseline_records)
    out += ["## Fixed-FLOPs sweep (d2s4 -> d4 against d4 at ratio 10.5)", "",
            f"Baseline d4: final val bpb {mean_std(base_bpb)} over {len(base_bpb)} seed{'s' * (len(base_bpb) > 1)}.", "", table, ""]
    out += trajectory_table(base_runs) + [""]
    table, _ = seed_table("recipes", RECIPES, baseline_records)
    if table.count("\n") > 1:  # a header and at least one row
        out += [f"## Recipes at shallow ratio {BEST_SHALLOW_RATIO}", "", table, ""] + versus_plain_stack(RECIPES) + [""]
    warmdown = [(name, records("warmdown", name)) for name, _ in sweeps()["warmdown"] if finished("warmdown", name)]
    if warmdown and baseline_records(0):
        out += ["## Deep-phase warmdown sweep (one shallow model at ratio 3.25, seed 0, against baseline-s0)", "",
                reports.format_report([reports.acceleration(baseline_records(0), run, name) for name, run in warmdown]), ""]
    pairs = [(f"d{d}", base, f"d{d // 2}s{d}") for d, base in ((2, ("miniseries", "d2")), (4, ("fixed-flops", "baseline-s0")))]
    pairs = [(depth, base, stacked) for depth, base, stacked in pairs if finished(*base) and finished("miniseries", stacked)]
    for depth, base, stacked in pairs:
        out += [f"## Miniseries at target depth {depth[1:]} (both phases at ratio 10.5, seed 0)", "",
                reports.format_report([reports.acceleration(records(*base), records("miniseries", stacked), stacked)]), ""]
    if any(finished("tune-lr", name) for name, _ in sweeps()["tune-lr"]):
        out += ["## Part 2: the baseline's LR multiplier (d4, warmdown 0.5)", ""] + tuning_table() + [""]
    print("\n".join(out))
    plots(base_runs)


def plots(base_runs):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plots)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves = (("fixed-flops", "baseline", "baseline d4"), ("fixed-flops", f"r{BEST_SHALLOW_RATIO}", f"d2s4 -> d4, shallow ratio {BEST_SHALLOW_RATIO}"),
              ("recipes", "combo", "the same, deep warmdown 0.5 (combo)"))
    for sweep, arm, label in curves:
        runs = [records(sweep, f"{arm}-s{s}") for s in base_runs if finished(sweep, f"{arm}-s{s}")]
        if runs:  # every seed of an arm evaluates at the same FLOPs, so the curves average point by point
            evals = [[r for r in run if r["kind"] == "eval"] for run in runs]
            ax.plot([r["flops"] for r in evals[0]], [statistics.mean(v) for v in zip(*([r["val_bpb"] for r in e] for e in evals))],
                    label=f"{label} ({'mean of ' * (len(runs) > 1)}{len(runs)} seed{'s' * (len(runs) > 1)})")
    ax.set(xlabel="cumulative training FLOPs", ylabel="val bpb", ylim=(None, 2.0), title="val bpb against compute")
    ax.legend()
    fig.savefig("experiments/bpb_vs_flops.png", dpi=120, bbox_inches="tight")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = [baseline_records(s)[-1]["val_bpb"]["baseline"] for s in base_runs]
    mean = statistics.mean(base)
    spread = statistics.stdev(base) if len(base) > 1 else 0.0
    ax.axhspan(mean - spread, mean + spread, alpha=0.2, color="gray", label="baseline d4, mean ± std")
    ax.axhline(mean, color="gray")
    for s in SEEDS:
        points = [(r, records("fixed-flops", f"r{r}-s{s}")[-1]["val_bpb"]["deep"]) for r in SHALLOW_RATIOS if finished("fixed-flops", f"r{r}-s{s}")]
        if points:
            ax.plot(*zip(*points), "o-", label=f"stacked, seed {s}")
    ax.set(xlabel="shallow-phase data:param ratio", ylabel="final val bpb", title="fixed FLOPs: final val bpb against shallow ratio")
    ax.legend()
    fig.savefig("experiments/bpb_vs_shallow_ratio.png", dpi=120, bbox_inches="tight")
    print("plots: experiments/bpb_vs_flops.png, experiments/bpb_vs_shallow_ratio.png")


def main():
    parser = argparse.ArgumentParser(description="run the sweeps behind experiments.md, or report on them")
    parser.add_argument("verb", nargs="?", default="list", choices=["list", "run", "report"])
    parser.add_argument("sweeps", nargs="*", help=f"which sweeps, of {', '.join(sweeps())} (default: all)")
    parser.add_argument("--seed", type=int, action="append", default=[], help="only the runs of this seed (repeatable)")
    args = parser.parse_args()
    if set(args.sweeps) - set(sweeps()):
        parser.error(f"unknown sweep {sorted(set(args.sweeps) - set(sweeps()))}: choose from {', '.join(sweeps())}")
    names = args.sweeps or list(sweeps())
    if args.verb == "run":
        run(names, args.seed)
    elif args.verb == "report":
        report()
    else:
        for sweep in names:
            for name, flags in selected(sweep, args.seed):
                print(f"{'done' if finished(sweep, name) else 'todo'}  {' '.join(command(sweep, name, flags))}")


if __name__ == "__main__":
    main()
