"""
The experiments behind experiments.md, as data: every run's flags, and the report that turns
their metrics files into the tables and plots. Run from the repository root:

    python experiments/sweeps.py list                     # every run, its command, and whether it finished
    python experiments/sweeps.py run fixed-flops recipes  # run the unfinished runs of these sweeps, one by one
    python experiments/sweeps.py run fixed-flops --seed 1 # only the runs of seed 1 (two such streams fill 2 cores
                                                          # a little better than one run on both: OMP_NUM_THREADS=1 each)
    python experiments/sweeps.py run grow-at confirm      # started twice, a minute apart: two streams share the runs
    python experiments/sweeps.py report                   # every table (markdown) and the plots, from experiments/runs/

A run is finished when its folder holds a summary record; an interrupted run starts over once its metrics file
has been still for 10 minutes (until then another stream is taken to be running it).
Checkpoints (*.pt) stay out of git; metrics.jsonl and config.json are kept.
"""

import argparse
import fcntl
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import stack_gpt  # noqa: E402  (the acceleration arithmetic of its --compare)
import torch  # noqa: E402

RUNS = "experiments/runs"
DATA = "data/pylibs-2048"
PREPARE = "python prepare_data.py --dataset pylibs --vocab-size 2048 --name pylibs-2048"
# One CPU-scale family for every sweep: target depth 4 at width 128 (4 heads of 32), context 256,
# 4096-token batches. The shallow d2s4 costs 0.60 of the d4's FLOPs per token, as d6s12 does of d12.
FAMILY = ["--aspect-ratio", "32", "--head-dim", "32", "--seq-len", "256", "--device-batch-size", "16",
          "--total-batch-size", "4096", "--eval-every", "100", "--eval-tokens", "131072", "--log-every", "10"]
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
# Part 3, step 2: the stacked arm tuned too. Growth at 20% half an octave either side of the tuned LR, and growth at
# 10% at it; seeds 0-2 against the tuned baselines of those seeds. An arm ahead on average is confirmed on fresh seeds.
STACKED_TUNING = {"at0.2-lr5.66": ("0.2", "5.66"), "at0.2-lr11.3": ("0.2", "11.3"), "at0.1": ("0.1", None)}
FRESH_SEEDS = tuple(range(8, 14))  # used by no selection before the confirmation
# Part 3, step 3: a configuration with room. d1 -> d4 (g = 4) with a 512-token BPE, where the d1 costs 0.29 of the d4
# per token (Part 2's d2s4: 0.60). Its own baseline LR first (ties go to Part 2's x8), then the growth point at that
# LR, then the best point half an octave either side of it; seeds 0-1 each. The best arm then meets the fresh seeds.
ROOM_DATA = "data/pylibs-512"
DATASETS = {DATA: PREPARE, ROOM_DATA: "python prepare_data.py --dataset pylibs --vocab-size 512 --name pylibs-512"}
ROOM_LR_SCALES, ROOM_DEFAULT_LR = ("8", "4", "16"), "8"
ROOM_SHARES = ("0.1", "0.2", "0.4")
ROOM_STACKED = ["--depth", "1", "--stack-to", "4"]
# Its control, added after the verdict: its stacked d4 has a value embedding in every layer (four copies of the d1's),
# the baseline in two. A d4 baseline with four, on the first four fresh seeds (the time one session had left).
CONTROL_SEEDS = FRESH_SEEDS[:4]
# Part 4, step 1: a fairer baseline. Step 3's tuned d4 with one change at a time to its warmdown or its
# weight decay, seeds 0-1, and the current setting again beside them, so that the rule compares runs of one
# machine (experiments.md says why). {setting: (--warmdown-ratio, --weight-decay)}
FAIR_SETTINGS = {"baseline": ("0.5", "0.2"), "warmdown0.7": ("0.7", "0.2"), "warmdown0.3": ("0.3", "0.2"),
                 "weight-decay0.1": ("0.5", "0.1"), "weight-decay0.4": ("0.5", "0.4")}
FAIR_CURRENT = "baseline"
# Part 4, steps 2-4, on fair-confirm's machine, pairing with its runs of the same seeds. Step 2: the baseline at 1.15,
# 1.3 and 1.5 times Part 3's budget (--ratio 10.5), for the compute it needs to reach the stacked run's val bpb.
# Step 3: the value-embedding control both ways. Step 4: both arms at twice the budget (growth still after 10%).
EQUAL_LOSS_RATIOS, HORIZON_RATIO = ("12.075", "13.65", "15.75"), "21"
EQUAL_LOSS_SEEDS = HORIZON_SEEDS = FRESH_SEEDS[:4]
SCRIPTS = {"room-ve": "experiments/every_layer_ve.py", "ve-every-layer": "experiments/every_layer_ve.py",
           "ve-reverse": "experiments/nanochat_ve_stack.py"}  # any other sweep runs stack_gpt.py
# The CPU of the runs made before sweeps.py wrote machine.json beside each (experiments.md names them)
UNRECORDED_MACHINES = {**dict.fromkeys(("room-lr", "room-grow", "room-confirm", "room-ve"), "AMD EPYC"),
                       "fair-baseline": "Intel(R) Xeon(R) Processor"}
RUNNING_SECONDS = 600  # a metrics file written this recently belongs to a run in progress (see running_elsewhere)


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
        new_seeds = [s for s in CONFIRM_SEEDS if s not in GROWTH_SEEDS]
        # the confirmation's baselines do not depend on which arm wins: they can run while step 2 finishes
        confirm = [(f"baseline-s{s}", baseline + ["--seed", str(s)]) for s in new_seeds]
        best = best_growth_arm(lr, tuned_warmdown)
        if best:
            confirm += [(f"{best}-s{s}", growth_arms(lr, tuned_warmdown)[best] + ["--seed", str(s)]) for s in new_seeds]
    tune_stacked, confirm_stacked = [], []
    if tuned:
        arms = stacked_tuning_arms(*tuned)
        tune_stacked = [(f"{name}-s{s}", flags + ["--seed", str(s)]) for name, flags in arms.items() for s in GROWTH_SEEDS]
        ahead = arms_ahead(*tuned) or []
        confirm_stacked = [(f"baseline-s{s}", baseline + ["--seed", str(s)]) for s in FRESH_SEEDS if ahead]
        confirm_stacked += [(f"{name}-s{s}", arms[name] + ["--seed", str(s)]) for name in ahead for s in FRESH_SEEDS]
    return {"fixed-flops": fixed, "recipes": recipes, "warmdown": warmdown, "miniseries": mini, "tune-lr": tune_lr,
            "tune-warmdown": tune_warmdown, "grow-at": grow_at, "confirm": confirm, "tune-stacked": tune_stacked,
            "confirm-stacked": confirm_stacked, **room_sweeps(), **fair_sweeps()}


def room_sweeps():
    """Part 3, step 3's runs, each step listed once the rule before it has decided."""
    baseline = ["--data", ROOM_DATA, "--depth", "4", "--warmdown-ratio", "0.5", "--lr-scale"]
    room_lr = [(f"lr{m}-s{s}", baseline + [m, "--seed", str(s)]) for s in TUNING_SEEDS
               for m in lr_scales("room-lr", ROOM_LR_SCALES, ROOM_DEFAULT_LR)]
    lr = tuned_lr_scale("room-lr", ROOM_LR_SCALES, ROOM_DEFAULT_LR)
    arms = room_arms(lr) if lr else {}
    best = best_room_arm(lr) if lr else None
    grow = [(f"{name}-s{s}", flags + ["--seed", str(s)]) for name, flags in arms.items() for s in TUNING_SEEDS]
    confirm = [(f"baseline-s{s}", baseline + [lr, "--seed", str(s)]) for s in FRESH_SEEDS if best]
    confirm += [(f"{best}-s{s}", arms[best] + ["--seed", str(s)]) for s in FRESH_SEEDS if best]
    every_layer_ve = [(f"baseline-s{s}", baseline + [lr, "--seed", str(s)]) for s in CONTROL_SEEDS if best]
    return {"room-lr": room_lr, "room-grow": grow, "room-confirm": confirm, "room-ve": every_layer_ve}


def fair_sweeps():
    """
    Part 4, step 1's runs, and once its rule has chosen the baseline, Part 3's confirmation again on this machine:
    that baseline and Part 3's growth arm on the fresh seeds, seed by seed, so that a part of it still pairs.
    """
    lr = room_lr()
    runs = lambda setting, seeds: [(f"{setting}-s{s}", fair_flags(setting, lr) + ["--seed", str(s)])
                                   for s in seeds]
    tune = [run for setting in FAIR_SETTINGS for run in runs(setting, TUNING_SEEDS)] if lr else []
    winner, arm = fair_baseline(), best_room_arm(lr) if lr else None
    confirm = [run for s in FRESH_SEEDS for run in runs(winner, [s]) + [(f"{arm}-s{s}", room_arms(lr)[arm] + [
        "--seed", str(s)])]] if winner and arm else []
    return {"fair-baseline": tune, "fair-confirm": confirm, **part4_sweeps(lr, winner, arm)}


def part4_sweeps(lr, baseline, arm):
    """
    Steps 2-4 of Part 4, seed by seed, once step 1 has chosen the baseline: `baseline` names its setting and `arm`
    Part 3's growth arm. The runs they pair with are fair-confirm's.
    """
    if not (baseline and arm):
        return {"equal-loss": [], "ve-reverse": [], "ve-every-layer": [], "horizon": []}
    base, grow = fair_flags(baseline, lr), room_arms(lr)[arm]
    seed = lambda s: ["--seed", str(s)]
    return {"equal-loss": [(f"{baseline}-ratio{r}-s{s}", base + ["--ratio", r] + seed(s))
                           for s in EQUAL_LOSS_SEEDS for r in EQUAL_LOSS_RATIOS],
            "ve-reverse": [(f"{arm}-s{s}", grow + seed(s)) for s in FRESH_SEEDS],
            "ve-every-layer": [(f"{baseline}-s{s}", base + seed(s)) for s in FRESH_SEEDS],
            "horizon": [(f"{name}-ratio{HORIZON_RATIO}-s{s}", flags + ["--ratio", HORIZON_RATIO] + seed(s))
                        for s in HORIZON_SEEDS for name, flags in ((baseline, base), (arm, grow))]}


def fair_flags(setting, lr):
    warmdown, weight_decay = FAIR_SETTINGS[setting]
    return ["--data", ROOM_DATA, "--depth", "4", "--warmdown-ratio", warmdown, "--lr-scale", lr,
            "--weight-decay", weight_decay]


def fair_baseline():
    """
    Part 4, step 1's rule: the change whose mean final val bpb over seeds 0-1 beats the current setting's (run
    beside it) by more than TIE, the lowest such mean if several do; else the current setting. None until every
    run has finished.
    """
    means = fair_means()
    if None in means.values():
        return None
    ahead = {setting: mean for setting, mean in means.items() if mean < means[FAIR_CURRENT] - TIE}
    return min(ahead, key=ahead.get) if ahead else FAIR_CURRENT


def fair_means():
    """{setting: its mean final val bpb over seeds 0-1, None until both have finished}."""
    return {setting: mean_over_seeds("fair-baseline", setting, TUNING_SEEDS) for setting in FAIR_SETTINGS}


def room_arms(lr):
    """
    {arm: flags} of the growth runs so far: growth at each of ROOM_SHARES at the baseline's LR, and once those have
    finished, the best of them (lowest mean final val bpb, seeds 0-1) at the LRs half an octave either side.
    """
    arms = {f"at{share}": ["--data", ROOM_DATA] + growth_flags(share, lr, "0.5", ROOM_STACKED) for share in ROOM_SHARES}
    means = {name: mean_over_seeds("room-grow", name, TUNING_SEEDS) for name in arms}
    if None in means.values():
        return arms
    best = min(means, key=means.get)
    for other in (float(lr) / math.sqrt(2), float(lr) * math.sqrt(2)):
        arms[f"{best}-lr{other:.3g}"] = ["--data", ROOM_DATA] + growth_flags(best[2:], f"{other:.3g}", "0.5", ROOM_STACKED)
    return arms


def best_room_arm(lr):
    """The growth arm with the lowest mean final val bpb over seeds 0-1 once all five have finished, else None."""
    arms = room_arms(lr)
    means = {name: mean_over_seeds("room-grow", name, TUNING_SEEDS) for name in arms}
    return None if len(arms) < len(ROOM_SHARES) + 2 or None in means.values() else min(means, key=means.get)


def growth_arms(lr, warmdown):
    """
    Part 2, step 2: {arm: flags}. One schedule over the whole run at the tuned LR and warmdown, growing at
    each share of the budget; a share that would fall inside the decay also runs at SHORT_WARMDOWN.
    Evaluations every 50 steps, so that savings interpolate between close points.
    """
    arms = {}
    for share in GROW_SHARES:
        for w in [warmdown] + [SHORT_WARMDOWN] * (float(share) >= 1 - float(warmdown)):
            arms[f"at{share}" + (f"-wd{w}" if w != warmdown else "")] = growth_flags(share, lr, w)
    return arms


def growth_flags(share, lr, warmdown, stacked=STACKED):
    return stacked + ["--schedule", "global", "--grow-at", share, "--lr-scale", lr, "--warmdown-ratio", warmdown, "--eval-every", "50"]


def stacked_tuning_arms(lr, warmdown):
    """Part 3, step 2: {arm: flags}, as step 2's growth arms, at the tuned warmdown and each arm's own LR (None: the tuned one)."""
    return {name: growth_flags(share, arm_lr or lr, warmdown) for name, (share, arm_lr) in STACKED_TUNING.items()}


def paired_mean(arm_of, seeds):
    """Mean over seeds of (arm's final val bpb - the tuned baseline's of the same seed); None until all have finished."""
    differences = []
    for s in seeds:
        arm, base = arm_of(s), tuned_baseline(s)
        if not (arm and base):
            return None
        differences.append(list(arm[-1]["val_bpb"].values())[-1] - base[-1]["val_bpb"]["baseline"])
    return statistics.mean(differences)


def arms_ahead(lr, warmdown):
    """Part 3's rule for step 2: the tuned stacked arms whose paired mean is below zero; None until all have finished."""
    means = {name: paired_mean(lambda s: finished_records("tune-stacked", f"{name}-s{s}"), GROWTH_SEEDS)
             for name in stacked_tuning_arms(lr, warmdown)}
    return None if None in means.values() else [name for name, mean in means.items() if mean < 0]


# --- the decision rules of Part 2, on the finished runs ---

def final_bpb(sweep, name):
    """A finished run's final val bpb (None until it finishes)."""
    run = finished_records(sweep, name)
    return run[-1]["val_bpb"] if run else None


def mean_over_seeds(sweep, name, seeds):
    """Mean final val bpb (of the last phase: a stacked run's deep model) of run `name`-s<seed>; None until every one has finished."""
    bpb = [final_bpb(sweep, f"{name}-s{s}") for s in seeds]
    return None if None in bpb else statistics.mean(list(b.values())[-1] for b in bpb)


def pick(means, default):
    """The lowest mean wins; within TIE of it, the candidate nearest the default (by ratio) wins instead."""
    best = min(means.values())
    near = [c for c, m in means.items() if m <= best + TIE]
    return min(near, key=lambda c: (abs(math.log(float(c) / float(default))), means[c]))


def lr_scales(sweep="tune-lr", first=LR_SCALES, default="1"):
    """`first`, extended by a factor of 2 past whichever edge wins (runs lr<m>-s<seed> of `sweep`), until the winner is inside."""
    scales = list(first)
    while True:
        means = {m: mean_over_seeds(sweep, f"lr{m}", TUNING_SEEDS) for m in scales}
        if None in means.values():
            return scales
        edges = sorted(scales, key=float)
        winner = pick(means, default)
        if winner not in (edges[0], edges[-1]):
            return scales
        scales.append(f"{float(winner) * (2 if winner == edges[-1] else 0.5):g}")


def tuned_lr_scale(sweep="tune-lr", first=LR_SCALES, default="1"):
    """The winning --lr-scale, or None while the sweep is unfinished."""
    scales = lr_scales(sweep, first, default)
    means = {m: mean_over_seeds(sweep, f"lr{m}", TUNING_SEEDS) for m in scales}
    return None if None in means.values() else pick(means, default)


def tuned_settings():
    """(--lr-scale, --warmdown-ratio) of the tuned baseline, or None while tuning is unfinished."""
    lr = tuned_lr_scale()
    if lr is None:
        return None
    means = {w: mean_over_seeds(*tuning_run(lr, w), TUNING_SEEDS) for w in WARMDOWNS}
    return None if None in means.values() else (lr, pick(means, "0.5"))


def tuning_run(lr, warmdown):
    """(sweep, run name less its seed) of the d4 baseline at this multiplier and warmdown: warmdown 0.5 is tune-lr's."""
    return ("tune-lr", f"lr{lr}") if warmdown == "0.5" else ("tune-warmdown", f"lr{lr}-wd{warmdown}")


def best_growth_arm(lr, warmdown):
    """The growth arm with the lowest mean final val bpb over GROWTH_SEEDS, or None while any is unfinished."""
    means = {arm: mean_over_seeds("grow-at", arm, GROWTH_SEEDS) for arm in growth_arms(lr, warmdown)}
    return None if None in means.values() else min(means, key=means.get)


def flag_value(flags, flag):
    """The value given to `flag` in a run's flags."""
    return flags[flags.index(flag) + 1]


def command(sweep, name, flags):
    data = [] if "--data" in flags else ["--data", DATA]  # Part 3's configuration with room names its own
    return ["python", SCRIPTS.get(sweep, "stack_gpt.py")] + data + FAMILY + flags + ["--out-dir", f"{RUNS}/{sweep}/{name}"]


def metrics_path(sweep, name):
    return f"{RUNS}/{sweep}/{name}/metrics.jsonl"


def finished(sweep, name):
    path = metrics_path(sweep, name)
    return os.path.exists(path) and '"kind": "summary"' in open(path).read()


def selected(sweep, seeds):
    """The runs of a sweep, or only those of the given seeds (runs without a seed belong to none)."""
    return [(name, flags) for name, flags in sweeps()[sweep] if not seeds or any(name.endswith(f"-s{s}") for s in seeds)]


def fail(message):
    """A one-line error and exit status 2, as stack_gpt.py does for a usage error."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def running_elsewhere(sweep, name):
    """
    A run is taken to be running in another stream while its metrics file keeps changing (a run logs every
    few seconds); one untouched for RUNNING_SECONDS was interrupted, and is free to start over.
    """
    path = metrics_path(sweep, name)
    return os.path.exists(path) and time.time() - os.path.getmtime(path) < RUNNING_SECONDS


def init_from(flags):
    """The checkpoint a run starts from (--init-from), or None."""
    return flag_value(flags, "--init-from") if "--init-from" in flags else None


def producer_in_flight(flags):
    """Whether this run starts from a checkpoint of a run that another stream is still running."""
    if not init_from(flags):
        return False
    sweep, name = os.path.relpath(os.path.dirname(init_from(flags)), RUNS).split(os.sep)
    return not finished(sweep, name) and running_elsewhere(sweep, name)


def claim(sweep, seeds):
    """
    This stream's next run of `sweep`: (name, flags); "wait" while every unfinished run is running in another
    stream (or starts from a checkpoint that one is still writing); None once all have finished. Streams choose
    under one lock and mark their choice by touching its metrics file before they let go, so two never start
    the same run.
    """
    os.makedirs(RUNS, exist_ok=True)
    with open(f"{RUNS}/.streams.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held until the file closes
        todo = [(name, flags) for name, flags in selected(sweep, seeds) if not finished(sweep, name)]
        free = [(name, flags) for name, flags in todo if not running_elsewhere(sweep, name) and not producer_in_flight(flags)]
        if not free:
            return "wait" if todo else None
        name, flags = free[0]
        os.makedirs(f"{RUNS}/{sweep}/{name}", exist_ok=True)
        open(metrics_path(sweep, name), "a").close()
        os.utime(metrics_path(sweep, name))  # running_elsewhere from now on (the run's --overwrite empties it)
        return name, flags


def next_run(names, seeds):
    """
    This stream's next run, (sweep, name, flags), from the first of the named sweeps with one free; "wait" while
    the rest run in other streams (their results may add runs: Part 2's steps); None once all have finished.
    Name each step after the steps it depends on (tune-lr tune-warmdown grow-at confirm), or a stream can
    finish before a step's results add the next step's runs.
    """
    waiting = False
    for sweep in names:
        claimed = claim(sweep, seeds)
        if claimed == "wait":
            waiting = True
        elif claimed:
            return (sweep, *claimed)
    return "wait" if waiting else None


def run(names, seeds):
    needed = {flag_value(command(sweep, name, flags), "--data") for sweep in names for name, flags in selected(sweep, seeds)}
    for data in sorted(needed):
        if not os.path.exists(f"{data}/meta.json"):
            subprocess.run(DATASETS[data].split(), check=True)
    while claimed := next_run(names, seeds):  # claimed anew after every run: a finished step of Part 2 can add runs
        if claimed == "wait":
            print(f"waiting for the runs of other streams ({' '.join(names)})", flush=True)
            time.sleep(60)
            continue
        sweep, name, flags = claimed
        shallow = init_from(flags)
        if shallow and not os.path.exists(shallow):  # checkpoints stay out of git: a fresh clone lacks them
            fail(f"{name} starts from {shallow}, which is missing: rerun its run first "
                 f"(rm -r {os.path.dirname(shallow)}; python experiments/sweeps.py run {sweep})")
        print(" ".join(command(sweep, name, flags)), flush=True)
        subprocess.run(command(sweep, name, flags) + ["--overwrite"], check=True)
        with open(f"{RUNS}/{sweep}/{name}/machine.json", "w") as f:
            json.dump(this_machine(), f, indent=2)


def this_machine():
    """
    What a run's numbers depend on beyond its command (experiments.md, Part 4: the same command on two CPUs
    does not retrace itself): the CPU, the kernels torch picks for it, torch, and the threads.
    """
    try:  # Linux names the model here; elsewhere platform's word will have to do
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def machine_of(sweep, name):
    """The CPU a run ran on: its machine.json, else the one experiments.md names for the runs before it."""
    path = f"{RUNS}/{sweep}/{name}/machine.json"
    return json.load(open(path))["cpu"] if os.path.exists(path) else UNRECORDED_MACHINES.get(sweep, "an unrecorded CPU")


# -----------------------------------------------------------------------------
# Report

def records(sweep, name):
    return stack_gpt.read_metrics(f"{RUNS}/{sweep}/{name}")


def finished_records(sweep, name):
    """A run's records once it has finished, else None."""
    return records(sweep, name) if finished(sweep, name) else None


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return "never"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def pct(share):
    """A saving or speedup as a signed percentage; None is a baseline value never reached."""
    return "not reached" if share is None else f"{100 * share:+.1f}%"


def saved_minus_ceiling(savings, ceiling):
    """The mean saving less the cheap-token ceiling, as text ("-" where a run diverged and has no saving)."""
    return "-" if None in savings else pct(statistics.mean(savings) - ceiling)


def pct_mean_std(values):
    if any(v is None for v in values):
        return f"not reached in {sum(v is None for v in values)}/{len(values)}"
    return pct(statistics.mean(values)) + (f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else "")


def acceleration(baseline, run, name):
    """
    stack_gpt.acceleration's row, and bpb_compute_ratio: a run that never reaches the baseline's val bpb has
    no saving in the paper's sense, so this compares the two where both get to: bpb_fraction where the run
    reaches the baseline's final val bpb, else the run's FLOPs over the baseline's FLOPs to the run's final
    val bpb (above 1: the run cost more); None where the baseline never gets there either (a NaN, say).
    """
    row = stack_gpt.acceleration(baseline, run, name)
    if row["bpb_fraction"]:
        row["bpb_compute_ratio"] = row["bpb_fraction"]
    else:  # the run ends worse, so the baseline gets to the run's final val bpb at or before its own end
        base_evals = [r for r in baseline if r["kind"] == "eval"]
        reached = stack_gpt.flops_reaching(base_evals, "val_bpb", row["val_bpb"])
        row["bpb_compute_ratio"] = row["flops"] / reached if reached else None
    return row


def matched_saving(row):
    """
    Part 2's saving of a run against its baseline at the val bpb both reach (acceleration's
    bpb_compute_ratio): the saving to the baseline's final val bpb where the run gets there, and
    negative where it never does: the compute it spent beyond what the baseline needed for the run's
    own final val bpb, as a share of the latter. None for a run that diverged.
    """
    return None if row["bpb_compute_ratio"] is None else 1 - row["bpb_compute_ratio"]


def speedup(saving):
    """The paper's unit for a saving (its 54.5%): the baseline's compute over the run's, less one."""
    return None if saving is None else 1 / (1 - saving) - 1


def saving_with_speedup(savings):
    """Savings as mean ± std, with the speedup of their mean."""
    if None in savings:
        return pct_mean_std(savings)
    return f"{pct_mean_std(savings)} (speedup {pct(speedup(statistics.mean(savings)))})"


# --- Student's t, without scipy ---

def incomplete_beta(x, a, b):
    """
    The regularized incomplete beta function I_x(a, b), from its continued fraction
    I_x(a, b) = x^a (1-x)^b / (a B(a, b)) / (1 + d1 / (1 + d2 / (1 + ...))), evaluated front to back by
    Lentz's method: each step multiplies the value so far by the ratio of two successive convergents.
    """
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point: use I_x(a, b) = 1 - I_(1-x)(b, a)
        return 1 - incomplete_beta(1 - x, b, a)
    if x == 0:
        return 0.0
    # x^a (1-x)^b / (a B(a, b)) in logs, with B(a, b) = Γ(a) Γ(b) / Γ(a + b)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)) / a
    tiny = 1e-300  # stands in for a denominator of zero
    value, c, d = 1.0, 1.0, 0.0
    for j in range(1, 200):
        m = j // 2
        if j % 2:  # d_(2m+1)
            term = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:  # d_(2m)
            term = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1 / ((1 + term * d) or tiny)
        c = (1 + term / c) or tiny
        value *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return front / value


def t_two_sided_p(t, df):
    """P(|T| >= |t|) for Student's t with df degrees of freedom (df need not be whole: Welch's is not)."""
    return incomplete_beta(df / (df + t * t), df / 2, 0.5)  # the t distribution's tails, as a beta integral


def t_critical(p, df):
    """The t whose two-sided p-value is p (p = 0.05: the half-width of a 95% interval in standard errors), by bisection."""
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > p:  # p falls as t grows: double until the bracket holds the answer
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if t_two_sided_p(mid, df) > p else (low, mid)
    return (low + high) / 2


def t_statistic(mean, standard_error):
    """mean / standard_error; with no spread at all (every value equal) t is infinite, or 0 for a zero mean."""
    if standard_error == 0:
        return math.copysign(math.inf, mean) if mean else 0.0
    return mean / standard_error


def paired_test(differences):
    """The paired t-test on per-seed differences: (mean, half-width of its 95% interval, t, two-sided p), df = n - 1."""
    n = len(differences)
    mean, standard_error = statistics.mean(differences), statistics.stdev(differences) / math.sqrt(n)
    t = t_statistic(mean, standard_error)
    return mean, t_critical(0.05, n - 1) * standard_error, t, t_two_sided_p(t, n - 1)


def welch_test(a, b):
    """Welch's unpaired t-test of mean(a) - mean(b): (difference, half-width of its 95% interval, t, df, two-sided p)."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)  # each mean's squared standard error
    if va + vb:
        df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))  # Welch-Satterthwaite
    else:  # no spread on either side: the formula is 0/0, take the pooled test's df
        df = len(a) + len(b) - 2
    difference, standard_error = statistics.mean(a) - statistics.mean(b), math.sqrt(va + vb)
    t = t_statistic(difference, standard_error)
    return difference, t_critical(0.05, df) * standard_error, t, df, t_two_sided_p(t, df)


def paired_difference(differences):
    """
    Mean of (arm - baseline of the same seed) with its 95% confidence interval. Pairing by seed removes
    what the seed does to both (the same data order): the spread that remains is the arm's own.
    """
    if len(differences) < 2:
        return f"{differences[0]:+.4f} (1 seed: no interval)"
    mean, half, _, _ = paired_test(differences)
    verdict = "worse" if mean - half > 0 else "better" if mean + half < 0 else "no significant difference"
    worse = sum(d > 0 for d in differences)
    return f"{mean:+.4f} ± {half:.4f}, worse in {worse}/{len(differences)} seeds: {verdict}"


def paired_runs(run_of, baseline_of, seeds):
    """{seed: (baseline's records, run's records)} for each seed where both runs have finished."""
    pairs = {s: (baseline_of(s), run_of(s)) for s in seeds}
    return {s: (base, run) for s, (base, run) in pairs.items() if base and run}


def seed_rows(run_of, baseline_of, seeds):
    """{seed: acceleration row} of each run against the baseline of its own seed."""
    return {s: acceleration(base, run, f"seed {s}") for s, (base, run) in paired_runs(run_of, baseline_of, seeds).items()}


def seed_table(sweep, arms, baseline_of):
    """One row per arm: mean ± std over its finished seeds, each seed compared with its own baseline seed."""
    lines = ["| arm | seeds | final val bpb | total FLOPs | saving to baseline train loss | saving to baseline val bpb | val bpb minus baseline's, same seed (95% CI) |",
             "|---|---|---|---|---|---|---|"]
    base_bpb = [r[-1]["val_bpb"]["baseline"] for r in (baseline_of(s) for s in SEEDS) if r]
    for arm in arms:
        rows = list(seed_rows(lambda s: finished_records(sweep, f"{arm}-s{s}"), baseline_of, SEEDS).values())
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


def baseline_records(seed):
    return finished_records("fixed-flops", f"baseline-s{seed}")


# --- Part 2 ---

def tuning_table(flag, candidates):
    """
    Part 2, step 1: the baseline's final val bpb for each value of `flag`, by seed and on average (the
    decision rule's input). candidates: {value: (sweep, run name less its seed)}.
    """
    lines = [f"| {flag} | " + " | ".join(f"seed {s}" for s in TUNING_SEEDS) + " | mean |", "|---|" + "---|" * (len(TUNING_SEEDS) + 1)]
    for value, (sweep, name) in candidates.items():
        bpb = [final_bpb(sweep, f"{name}-s{s}") for s in TUNING_SEEDS]
        done = [b["baseline"] for b in bpb if b is not None]
        if done:
            lines.append(f"| {value} | " + " | ".join("todo" if b is None else f"{b['baseline']:.4f}" for b in bpb) +
                         f" | {statistics.mean(done):.4f}{'' if len(done) == len(bpb) else ' (partial)'} |")
    return lines


def tuned_baseline(seed):
    """The records of the tuned baseline's run of this seed, wherever Part 2 runs it, or None until it has finished."""
    tuned = tuned_settings()
    if tuned is None:
        return None
    if seed in TUNING_SEEDS:
        sweep, name = tuning_run(*tuned)
    else:  # step 2 runs the growth seeds past the tuning ones, step 3 the rest to 7, Part 3 the fresh seeds
        sweep = "grow-at" if seed in GROWTH_SEEDS else "confirm" if seed in CONFIRM_SEEDS else "confirm-stacked"
        name = "baseline"
    return finished_records(sweep, f"{name}-s{seed}")


def growth_run(arm, seed):
    """The records of a growth arm's run of this seed (step 2 runs seeds 0-2, step 3 the rest), or None until it has finished."""
    return finished_records("grow-at" if seed in GROWTH_SEEDS else "confirm", f"{arm}-s{seed}")


def growth_results(lr, warmdown):
    """[(arm, growth share, warmdown, [acceleration row of each finished seed])] of step 2, for the arms with a finished seed."""
    baselines = {s: tuned_baseline(s) for s in GROWTH_SEEDS}  # looked up once: each lookup applies the tuning rules anew
    results = []
    for arm, flags in growth_arms(lr, warmdown).items():
        rows = seed_rows(lambda s: growth_run(arm, s), baselines.get, GROWTH_SEEDS)
        if rows:
            results.append((arm, flag_value(flags, "--grow-at"), flag_value(flags, "--warmdown-ratio"), list(rows.values())))
    return results


def growth_table(results):
    """Part 2, step 2: one row per growth arm, each seed against the tuned baseline of the same seed."""
    lines = ["| arm | grows at | warmdown | seeds | final val bpb | minus tuned baseline's, same seed (95% CI) | "
             "compute saved at the val bpb both reach (speedup of the mean) |", "|---|---|---|---|---|---|---|"]
    for arm, share, warmdown, rows in results:
        lines.append(f"| {arm} | {float(share):.0%} | {warmdown} | {len(rows)} | {mean_std([r['val_bpb'] for r in rows])} | "
                     f"{paired_difference([r['val_bpb'] - r['baseline_val_bpb'] for r in rows])} | "
                     f"{saving_with_speedup([matched_saving(r) for r in rows])} |")
    return lines


def confirm_tests(arm, base):
    """Step 3's tests on the final val bpb of the arm and of the baseline, listed seed by seed."""
    differences = [a - b for a, b in zip(arm, base)]
    mean, half, t, p = paired_test(differences)
    difference, welch_half, welch_t, df, welch_p = welch_test(arm, base)
    return [f"- Paired t-test (arm minus the baseline of the same seed, {len(arm)} seeds): mean {mean:+.4f}, "
            f"95% CI [{mean - half:+.4f}, {mean + half:+.4f}], t = {t:.2f}, df = {len(arm) - 1}, p = {p:.3g}",
            f"- Welch's unpaired test: difference of means {difference:+.4f}, 95% CI [{difference - welch_half:+.4f}, "
            f"{difference + welch_half:+.4f}], t = {welch_t:.2f}, df = {df:.1f}, p = {welch_p:.3g}",
            f"- Correlation across seeds between the arm's and the baseline's final val bpb: r = {correlation(arm, base)} "
            "(Welch's test assumes 0: below 0 its p-value is too small, above 0 too large)",
            f"- Without assuming normal differences: Wilcoxon's signed-rank test (exact) p = {signed_rank_p(differences):.3g}; "
            f"the sign test ({sum(d > 0 for d in differences)} of {len(differences)} worse) p = {sign_test_p(differences):.3g}"]


def signed_rank_p(differences):
    """
    Wilcoxon's signed-rank test, exact: the two-sided p of the rank sum of the positive differences, over all 2^n sign
    patterns that "no difference" makes equally likely (n is 8 here). Ties share their mean rank; zeros drop out.
    """
    nonzero = [d for d in differences if d]
    magnitudes = sorted(abs(d) for d in nonzero)
    rank = {m: statistics.mean(i + 1 for i, x in enumerate(magnitudes) if x == m) for m in magnitudes}
    ranks = [rank[abs(d)] for d in nonzero]
    center = sum(ranks) / 2  # the rank sum's mean under "no difference"
    observed = abs(sum(r for r, d in zip(ranks, nonzero) if d > 0) - center)
    sums = [sum(r for r, positive in zip(ranks, signs) if positive) for signs in itertools.product((False, True), repeat=len(ranks))]
    return sum(abs(w - center) >= observed - 1e-12 for w in sums) / len(sums)


def sign_test_p(differences):
    """The sign test: the two-sided binomial p of the count of positive differences among the nonzero ones."""
    n, k = sum(d != 0 for d in differences), sum(d > 0 for d in differences)
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def correlation(a, b):
    """Pearson's r as text ("undefined" when either side has no spread at all)."""
    try:
        return f"{statistics.correlation(a, b):+.2f}"
    except statistics.StatisticsError:
        return "undefined (no spread)"


def confirm_section(best):
    """Part 2, step 3: the best growth arm against the tuned baseline seed by seed, the tests, and the rule's verdict."""
    baselines = {s: tuned_baseline(s) for s in CONFIRM_SEEDS}
    rows = seed_rows(lambda s: growth_run(best, s), baselines.get, CONFIRM_SEEDS)
    lines = seed_by_seed(best, rows)
    if len(rows) < 2:
        return lines
    arm, base = [r["val_bpb"] for r in rows.values()], [r["baseline_val_bpb"] for r in rows.values()]
    differences = [a - b for a, b in zip(arm, base)]
    mean, half, _, _ = paired_test(differences)
    ahead = sum(d < 0 for d in differences)
    lines += ["", f"Compute saved over the {len(rows)} seeds (mean ± std): "
              f"{saving_with_speedup([matched_saving(r) for r in rows.values()])}; ahead of the baseline in {ahead} of {len(rows)}."]
    lines.append(f"Stacked minus baseline during the run (val bpb at equal FLOPs, mean of the seeds; share of the budget): "
                 f"{during_the_run(lambda s: growth_run(best, s), baselines.get, CONFIRM_SEEDS)}.")
    if len(rows) < len(CONFIRM_SEEDS):
        verdict = f"none yet ({len(rows)} of {len(CONFIRM_SEEDS)} seeds)"
    else:
        verdict = f"stacking ({best}) {'beats' if mean + half < 0 else 'does not beat'} the tuned baseline"
    rule = "stacking beats the tuned baseline only if the paired 95% interval lies below zero"
    return lines + [""] + confirm_tests(arm, base) + ["", f"Verdict ({rule}): {verdict}."]


def seed_by_seed(arm, rows, baseline="tuned baseline"):
    """The confirmation's table: an arm against the baseline of each seed ({seed: acceleration row})."""
    lines = [f"| seed | {baseline} val bpb | {arm} val bpb | difference | compute saved at the val bpb both reach | speedup |",
             "|---|---|---|---|---|---|"]
    for s, r in rows.items():
        lines.append(f"| {s} | {r['baseline_val_bpb']:.4f} | {r['val_bpb']:.4f} | {r['val_bpb'] - r['baseline_val_bpb']:+.4f} | "
                     f"{pct(matched_saving(r))} | {pct(speedup(matched_saving(r)))} |")
    return lines


def during_the_run(run_of, baseline_of, seeds, shares=(0.25, 0.5, 0.75, 1.0)):
    """A confirmed arm's difference from its seeds' baselines at a few shares of the budget, as text."""
    import numpy as np  # in requirements.txt
    curves = seed_differences(run_of, baseline_of, seeds).values()
    cells = []
    for share in shares:
        at_share = [np.interp(share * flops[-1], flops, difference) for flops, difference in curves]
        cells.append(f"at {share:.0%} {np.mean(at_share):+.4f} ({sum(d < 0 for d in at_share)} of {len(at_share)} ahead)")
    return ", ".join(cells)


def part2_report():
    """Part 2's tables, each once its step has a finished run, with the winner of each rule once it decides."""
    out, lr, tuned = [], tuned_lr_scale(), tuned_settings()
    if any(finished("tune-lr", name) for name, _ in sweeps()["tune-lr"]):
        out += ["## Part 2: the baseline's LR multiplier (d4, warmdown 0.5)", ""]
        out += tuning_table("--lr-scale", {m: ("tune-lr", f"lr{m}") for m in sorted(lr_scales(), key=float)}) + [""]
        if lr:
            out += [f"Winner by the rule (lowest mean, ties within {TIE} to the multiplier nearer 1): --lr-scale {lr}.", ""]
    if lr and any(finished("tune-warmdown", name) for name, _ in sweeps()["tune-warmdown"]):
        out += [f"## Part 2: the baseline's warmdown (d4, --lr-scale {lr})", ""]
        out += tuning_table("--warmdown-ratio", {w: tuning_run(lr, w) for w in WARMDOWNS}) + [""]
        if tuned:
            out += [f"Winner by the rule (ties within {TIE} to 0.5): warmdown {tuned[1]}. "
                    f"The tuned baseline: --lr-scale {lr} --warmdown-ratio {tuned[1]}.", ""]
    results = growth_results(*tuned) if tuned else []
    if results:
        out += [f"## Part 2, step 2: when to grow (d2s4 -> d4, one LR schedule, --lr-scale {lr}; seeds "
                f"{', '.join(map(str, GROWTH_SEEDS))} against the tuned baseline)", ""] + growth_table(results) + [""]
    best = best_growth_arm(*tuned) if tuned else None
    if best:
        out += [f"Best arm by the rule (lowest mean final val bpb): {best}.", "",
                f"## Part 2, step 3: {best} against the tuned baseline, seeds {CONFIRM_SEEDS[0]}-{CONFIRM_SEEDS[-1]}", ""]
        out += confirm_section(best) + [""]
    return out


# --- Part 3 ---

# The anchors' cheap-token ceiling and reported saving: arithmetic on their published sizes and token counts
# (experiments.md, "The cheap-token ceiling of the anchors", names the sources), not runs of ours.
ANCHORS = {"write-up, d6s12 -> d12": (0.076, 0.054), "paper 3B, g = 4": (0.030, 0.353), "paper 7B, g = 4": (0.024, 0.353)}


def ceiling_of(run):
    """A stacked run's cheap-token ceiling, from the plan it recorded before training."""
    shallow, deep = (types.SimpleNamespace(**phase) for phase in run[0]["phases"])
    return stack_gpt.cheap_token_ceiling(shallow, deep, shallow.flops + deep.flops)


def stacked_run(arm, seed):
    """The records of a Part 3 arm's run of this seed (step 2: seeds 0-2, its confirmation: the fresh seeds)."""
    return finished_records("tune-stacked" if seed in GROWTH_SEEDS else "confirm-stacked", f"{arm}-s{seed}")


def equal_flops_arms():
    """
    [(part, arm, cheap-token ceiling, [compute saved at the val bpb both reach, per seed])] for every stacked arm
    of Parts 1-3 that spent its baseline's FLOPs (not the miniseries, nor the warmdown sweep's --init-from runs,
    whose plans leave out their shallow phase). Part 1's arms against its untuned baseline, the rest the tuned one.
    """
    arms = [("Part 1 (untuned baseline)", arm, lambda a, s, sweep=sweep: finished_records(sweep, f"{a}-s{s}"), baseline_records, SEEDS)
            for sweep, names in (("fixed-flops", [f"r{r}" for r in SHALLOW_RATIOS]), ("recipes", RECIPES)) for arm in names]
    tuned = tuned_settings()
    if tuned:
        arms += [("Part 2", arm, growth_run, tuned_baseline, CONFIRM_SEEDS) for arm in growth_arms(*tuned)]
        arms += [(f"Part 3{label}", arm, stacked_run, tuned_baseline, seeds) for arm in stacked_tuning_arms(*tuned)
                 for label, seeds in (("", GROWTH_SEEDS), (", fresh seeds", FRESH_SEEDS))]
    if room_lr():  # the seeds that chose an arm apart from the fresh ones that test it
        arms += [(f"Part 3, room{label}", arm, room_run, room_baseline, seeds) for arm in room_arms(room_lr())
                 for label, seeds in (("", TUNING_SEEDS), (", fresh seeds", FRESH_SEEDS))]
    found = []
    for part, arm, run_of, baseline_of, seeds in arms:
        rows = seed_rows(lambda s: run_of(arm, s), baseline_of, seeds)
        if rows:
            found.append((part, arm, ceiling_of(run_of(arm, next(iter(rows)))), [matched_saving(r) for r in rows.values()]))
    return found


def ceiling_table(arms):
    """Each arm's measured saving beside its cheap-token ceiling, then the anchors'."""
    lines = ["| part | arm | seeds | cheap-token ceiling | compute saved at the val bpb both reach (mean ± std) | saved minus ceiling |",
             "|---|---|---|---|---|---|"]
    for part, arm, ceiling, savings in arms:
        lines.append(f"| {part} | {arm} | {len(savings)} | {100 * ceiling:.1f}% | {pct_mean_std(savings)} | "
                     f"{saved_minus_ceiling(savings, ceiling)} |")
    for anchor, (ceiling, saving) in ANCHORS.items():
        lines.append(f"| anchor | {anchor} | - | {100 * ceiling:.1f}% | {pct(saving)} (reported) | {pct(saving - ceiling)} |")
    return lines


def lr_parabola(lr, warmdown):
    """
    Part 3, step 2, reported beside the rule: the parabola in log2(LR) through the mean final val bpb of growth at
    20% at three LRs, as text (None until all have finished): its best LR, and what that gains over the tuned one
    against at0.2's paired deficit there.
    """
    import numpy as np  # in requirements.txt
    runs = {float(lr): ("grow-at", "at0.2")} | {float(arm_lr): ("tune-stacked", name) for name, (share, arm_lr)
                                               in STACKED_TUNING.items() if share == "0.2"}
    means = {x: mean_over_seeds(sweep, name, GROWTH_SEEDS) for x, (sweep, name) in runs.items()}
    if None in means.values():
        return None
    text = "Parabola in log2(LR) through growth at 20% at the three LRs (mean of seeds 0-2; reported, not a rule): "
    a, b, c = np.polyfit([math.log2(x) for x in means], list(means.values()), 2)
    if a <= 0:
        return text + "it opens downwards, so it names no best LR."
    vertex = -b / (2 * a)
    gain = np.polyval([a, b, c], vertex) - np.polyval([a, b, c], math.log2(float(lr)))
    deficit = paired_mean(lambda s: growth_run("at0.2", s), GROWTH_SEEDS)
    outside = " (outside the LRs tried: an extrapolation)" * (not min(means) <= 2 ** vertex <= max(means))
    return (text + f"best --lr-scale {2 ** vertex:.2f}{outside}, {gain:+.4f} bpb against ×{lr}, "
            f"where at0.2 ends {deficit:+.4f} behind the tuned baseline.")


def stacked_arm_table(arms, run_of, baseline_of, seeds):
    """Part 3: a row per arm with a finished seed, each seed against its own baseline seed, and the arm's ceiling."""
    lines = ["| arm | grows at | --lr-scale | seeds | final val bpb | minus tuned baseline's, same seed (95% CI) | "
             "compute saved at the val bpb both reach (speedup of the mean) | cheap-token ceiling |", "|---|---|---|---|---|---|---|---|"]
    for arm, flags in arms.items():
        rows = seed_rows(lambda s: run_of(arm, s), baseline_of, seeds)
        if rows:
            lines.append(f"| {arm} | {float(flag_value(flags, '--grow-at')):.0%} | {flag_value(flags, '--lr-scale')} | "
                         f"{len(rows)} | {mean_std([r['val_bpb'] for r in rows.values()])} | "
                         f"{paired_difference([r['val_bpb'] - r['baseline_val_bpb'] for r in rows.values()])} | "
                         f"{saving_with_speedup([matched_saving(r) for r in rows.values()])} | "
                         f"{100 * ceiling_of(run_of(arm, next(iter(rows)))):.1f}% |")
    return lines + [""] if len(lines) > 2 else []


def fresh_seed_verdict(arm, run_of, baseline_of):
    """Part 3: an arm against the baseline on the fresh seeds, once all have finished: the tests and the rule's verdict."""
    rows = seed_rows(lambda s: run_of(arm, s), baseline_of, FRESH_SEEDS)
    if len(rows) < len(FRESH_SEEDS):
        return []
    arm_bpb, base_bpb = [r["val_bpb"] for r in rows.values()], [r["baseline_val_bpb"] for r in rows.values()]
    mean, half, _, _ = paired_test([a - b for a, b in zip(arm_bpb, base_bpb)])
    savings = saving_with_speedup([matched_saving(r) for r in rows.values()])
    ceiling = ceiling_of(run_of(arm, FRESH_SEEDS[0]))
    trajectory = during_the_run(lambda s: run_of(arm, s), baseline_of, FRESH_SEEDS)
    lines = seed_by_seed(arm, rows) + [
        "", f"Compute saved over seeds {FRESH_SEEDS[0]}-{FRESH_SEEDS[-1]} (mean ± std): {savings}; its cheap-token ceiling: "
        f"{100 * ceiling:.1f}%.", f"{arm} minus the baseline during the run (val bpb at equal FLOPs, mean of the seeds; "
        f"share of the budget): {trajectory}.", ""]
    return lines + confirm_tests(arm_bpb, base_bpb) + ["", f"Verdict: {arm} {'beats' if mean + half < 0 else 'does not beat'} the tuned baseline.", ""]


def part3_report():
    """Part 3's tables: step 2's arms and the rule's choice, step 3's tuning and growth, every arm against its ceiling."""
    tuned = tuned_settings()
    out = (stacked_tuning_report(*tuned) if tuned else []) + room_report()
    return out + ["## Every equal-FLOPs arm against its cheap-token ceiling", ""] + ceiling_table(equal_flops_arms()) + [""]


def stacked_tuning_report(lr, warmdown):
    """Part 3, step 2: the stacked arm at its own LRs and growth at 10%, the parabola, the rule and its confirmation."""
    out, baselines = [], {s: tuned_baseline(s) for s in GROWTH_SEEDS}
    table = stacked_arm_table(stacked_tuning_arms(lr, warmdown), stacked_run, baselines.get, GROWTH_SEEDS)
    if table:
        out += [f"## Part 3, step 2: the stacked arm tuned (d2s4 -> d4, one LR schedule, warmdown {warmdown}; seeds "
                f"{', '.join(map(str, GROWTH_SEEDS))} against the tuned baseline)", ""] + table
    parabola = lr_parabola(lr, warmdown)
    out += [parabola, ""] if parabola else []
    ahead = arms_ahead(lr, warmdown)
    if ahead is not None:
        out += [f"By the rule (paired mean below zero): {', '.join(ahead) or 'no arm'} goes on to seeds "
                f"{FRESH_SEEDS[0]}-{FRESH_SEEDS[-1]}.", ""]
    for arm in ahead or []:
        verdict = fresh_seed_verdict(arm, stacked_run, tuned_baseline)
        out += ([f"## Part 3, step 2: {arm} against the tuned baseline, fresh seeds", ""] + verdict) if verdict else []
    return out


def room_lr():
    """Step 3's tuned --lr-scale, or None while its tuning is unfinished."""
    return tuned_lr_scale("room-lr", ROOM_LR_SCALES, ROOM_DEFAULT_LR)


def room_baseline(seed):
    """The records of step 3's tuned baseline of this seed (seeds 0-1: its winning tuning runs), or None until finished."""
    lr = room_lr()
    if lr is None:
        return None
    sweep, name = ("room-lr", f"lr{lr}") if seed in TUNING_SEEDS else ("room-confirm", "baseline")
    return finished_records(sweep, f"{name}-s{seed}")


def room_run(arm, seed):
    """The records of a step 3 growth arm's run of this seed (seeds 0-1 in room-grow, the fresh ones in room-confirm)."""
    return finished_records("room-grow" if seed in TUNING_SEEDS else "room-confirm", f"{arm}-s{seed}")


def room_report():
    """Part 3, step 3: the baseline's LR, the growth arms against it, and the best arm on the fresh seeds."""
    if not any(finished("room-lr", name) for name, _ in sweeps()["room-lr"]):
        return []
    scales = lr_scales("room-lr", ROOM_LR_SCALES, ROOM_DEFAULT_LR)
    out = ["## Part 3, step 3: the baseline's LR (d4, 512-token vocab, warmdown 0.5)", ""]
    out += tuning_table("--lr-scale", {m: ("room-lr", f"lr{m}") for m in sorted(scales, key=float)}) + [""]
    lr = room_lr()
    if not lr:
        return out
    out += [f"Winner by the rule (lowest mean, ties within {TIE} to ×{ROOM_DEFAULT_LR}): --lr-scale {lr}.", ""]
    table = stacked_arm_table(room_arms(lr), room_run, room_baseline, TUNING_SEEDS)
    if table:
        out += ["## Part 3, step 3: d1 -> d4 with a 512-token vocab, growth arms (seeds 0-1 against the tuned baseline)", ""] + table
    best = best_room_arm(lr)
    if best:
        out += [f"Best arm by the rule (lowest mean final val bpb over seeds 0-1): {best}.", ""]
        verdict = fresh_seed_verdict(best, room_run, room_baseline)
        out += ([f"## Part 3, step 3: {best} against the tuned baseline, fresh seeds", ""] + verdict) if verdict else []
        out += value_embedding_control(best)
    return out


def value_embedding_control(arm):
    """Part 3, step 3's control: the arm against a baseline with a value embedding in every layer, as its deep model has."""
    control = lambda s: finished_records("room-ve", f"baseline-s{s}")
    rows = seed_rows(lambda s: room_run(arm, s), control, CONTROL_SEEDS)
    if not rows:
        return []
    lead = [r["val_bpb"] - r["baseline_val_bpb"] for r in rows.values()]
    tables = [r["baseline_val_bpb"] - room_baseline(s)[-1]["val_bpb"]["baseline"] for s, r in rows.items()]
    return [f"## Part 3, step 3: {arm} against the d4 with a value embedding in every layer (a control, not a rule)", ""] + \
        seed_by_seed(arm, rows, "every-layer baseline") + [
        "", f"- {arm} minus the every-layer baseline: {paired_difference(lead)}; "
        f"compute saved {saving_with_speedup([matched_saving(r) for r in rows.values()])}",
        f"- The every-layer baseline minus the tuned one (two value embeddings): {paired_difference(tables)}", ""]


def fair_baseline_report():
    """
    Part 4, step 1: each setting by seed beside Part 3's runs, the rule's choice, and Part 3's verdict
    against the new baseline if there is one.
    """
    if not any(finished("fair-baseline", name) for name, _ in sweeps()["fair-baseline"]):
        return []
    lr = room_lr()
    rows = {"baseline, Part 3's runs (AMD EPYC)": ("room-lr", f"lr{lr}")}
    rows |= {f"{name} (warmdown {warmdown}, weight decay {decay})": ("fair-baseline", name)
             for name, (warmdown, decay) in FAIR_SETTINGS.items()}
    out = [f"## Part 4, step 1: a fairer baseline (d4, 512-token vocab, --lr-scale {lr}; seeds 0-1)", ""]
    out += tuning_table("setting", rows) + [""]
    means = fair_means()
    current = means.pop(FAIR_CURRENT)
    if current is not None:
        here = [final_bpb("fair-baseline", f"{FAIR_CURRENT}-s{s}")["baseline"]
                - final_bpb("room-lr", f"lr{lr}-s{s}")["baseline"] for s in TUNING_SEEDS]
        changes = [f"{name} {mean - current:+.4f}" for name, mean in means.items() if mean is not None]
        out += [f"The baseline here minus Part 3's runs of it, by seed: {', '.join(f'{d:+.4f}' for d in here)}. "
                f"Each change's mean minus the baseline's here: {', '.join(changes) or 'none finished yet'}.", ""]
    winner = fair_baseline()
    if winner is None:
        return out
    rule = f"a change must beat the baseline's mean here by more than {TIE}; the lowest such mean wins"
    decision = "the baseline stays" if winner == FAIR_CURRENT else f"{winner} becomes the baseline"
    out += [f"By the rule ({rule}): {decision}.", ""]
    return out + fair_confirm_report(winner, best_room_arm(lr))


def part4_machine():
    """
    The CPU of Part 4 from fair-confirm on: the one its runs of the lowest seed name (experiments.md: a Part 4 rule
    pairs runs of one CPU model only). None before any has finished.
    """
    folder = f"{RUNS}/fair-confirm"
    names = sorted(os.listdir(folder), key=lambda name: int(name.rsplit("-s", 1)[1])) if os.path.isdir(folder) else []
    return next((machine_of("fair-confirm", name) for name in names if finished("fair-confirm", name)), None)


def part4_run(sweep, name):
    """A finished Part 4 run's records if it ran on Part 4's CPU, else None: a run of another CPU pairs with none."""
    return finished_records(sweep, name) if finished(sweep, name) and machine_of(sweep, name) == part4_machine() else None


def other_machines(sweep_names):
    """The line naming the finished runs of these sweeps that ran on another CPU than Part 4's (none: no line)."""
    elsewhere = [f"{sweep}/{name}" for sweep in sweep_names for name, _ in sweeps()[sweep]
                 if finished(sweep, name) and machine_of(sweep, name) != part4_machine()]
    return [f"Left out, run on another CPU than {part4_machine()}: {', '.join(elsewhere)}.", ""] if elsewhere else []


def fair_confirm_report(winner, arm):
    """
    Part 4, step 1: Part 3's confirmation again on this machine (the rule's verdict once all six seeds pair),
    what the change of machine did to each arm, and, if the baseline changed, Part 3's runs against it.
    """
    here = lambda name, s: part4_run("fair-confirm", f"{name}-s{s}")
    rows = seed_rows(lambda s: here(arm, s), lambda s: here(winner, s), FRESH_SEEDS)
    if not rows:
        return []
    out = [f"## Part 4, step 1: {arm} against the baseline ({winner}), fresh seeds, all runs on {part4_machine()}", ""]
    out += other_machines(["fair-confirm"])
    verdict = fresh_seed_verdict(arm, here, lambda s: here(winner, s))
    out += verdict or seed_by_seed(arm, rows) + ["", f"No verdict yet: {len(rows)} of {len(FRESH_SEEDS)} seeds."]
    last = lambda run: list(run[-1]["val_bpb"].values())[-1]  # the final val bpb of a run's last phase
    for name in [arm] + [winner] * (winner == FAIR_CURRENT):  # the runs Part 3 made too, under the same names
        shift = [last(here(name, s)) - last(finished_records("room-confirm", f"{name}-s{s}"))
                 for s in FRESH_SEEDS if here(name, s)]
        out += [f"- {name} here minus Part 3's run of the seed (AMD EPYC): {paired_difference(shift)}"]
    if winner == FAIR_CURRENT:
        return out + [""]
    verdict = fresh_seed_verdict(arm, room_run, lambda s: here(winner, s))
    header = f"## Part 4, step 1: Part 3's {arm} (AMD EPYC) against the new baseline ({winner}): mixed machines"
    return out + (["", header, ""] + verdict if verdict else [""])


def part4_report():
    """Part 4, steps 2-4, each once a run of it has finished, against fair-confirm's runs of the same seeds."""
    lr = room_lr()
    baseline, arm = fair_baseline(), best_room_arm(lr) if lr else None
    if not (baseline and arm):
        return []
    out = equal_loss_report(baseline, arm) + value_embeddings_both_ways(baseline, arm) + horizon_report(baseline, arm)
    return out + map_table(part4_arms())


def map_table(arms):
    """Step 5: Part 4's points of the map, each with its horizon and measure (Parts 1-3's are in the ceiling table)."""
    if not arms:
        return []
    measures = {"reaches": "where the stacked run reaches the baseline's final loss",
                "needs": "compute the baseline needs to reach the stacked run's loss"}
    lines = ["## Part 4, step 5: Part 4's points on the map (saving against the cheap-token ceiling)", "",
             "| arm | budget | measure | seeds | cheap-token ceiling | saving (mean ± std) | saved minus ceiling |",
             "|---|---|---|---|---|---|---|"]
    for label, horizon, measure, ceiling, savings in arms:
        lines.append(f"| {label} | {horizon} | {measures[measure]} | {len(savings)} | {100 * ceiling:.1f}% | "
                     f"{pct_mean_std(savings)} | {saved_minus_ceiling(savings, ceiling)} |")
    return lines + [""]


def budget_points(baseline, seed):
    """(FLOPs, final val bpb) of the baseline's finished runs of this seed at each budget: 1x, step 2's, step 4's 2x."""
    runs = [("fair-confirm", f"{baseline}-s{seed}")] + [("equal-loss", f"{baseline}-ratio{r}-s{seed}")
                                                        for r in EQUAL_LOSS_RATIOS]
    runs.append(("horizon", f"{baseline}-ratio{HORIZON_RATIO}-s{seed}"))
    return [(run[-1]["flops"], run[-1]["val_bpb"]["baseline"]) for run in (part4_run(*r) for r in runs) if run]


def compute_to_reach(points, target):
    """
    Step 2's measure: the least-squares line of final val bpb on ln(FLOPs) through the (FLOPs, bpb) points, and the
    FLOPs at which that line reaches `target`: (FLOPs, or None where the line does not fall; the line's slope per
    doubling; its largest miss).
    """
    x, y = [math.log(flops) for flops, _ in points], [bpb for _, bpb in points]
    slope, intercept = statistics.linear_regression(x, y)
    miss = max(abs(b - (intercept + slope * a)) for a, b in zip(x, y))
    return (math.exp((target - intercept) / slope) if slope < 0 else None), slope * math.log(2), miss


def equal_loss_fits(baseline, arm):
    """
    Step 2 per seed, where the stacked run and two budgets of the baseline have finished: {seed: (budgets, stacked
    val bpb, the baseline's compute to reach it over the stacked run's (None: the line does not fall), slope per
    doubling, largest miss, where the crossing lies: "" among the budgets run, else below or beyond them)}.
    """
    fits = {}
    for s in EQUAL_LOSS_SEEDS:
        points, stacked = budget_points(baseline, s), part4_run("fair-confirm", f"{arm}-s{s}")
        if len(points) < 2 or not stacked:
            continue
        target = stacked[-1]["val_bpb"]["deep"]
        needed, per_doubling, miss = compute_to_reach(points, target)
        budgets = [flops for flops, _ in points]
        where = "" if needed is None or min(budgets) <= needed <= max(budgets) else \
            " (below the budgets run)" if needed < min(budgets) else " (beyond the budgets run)"
        fits[s] = (len(points), target, needed and needed / stacked[-1]["flops"], per_doubling, miss, where)
    return fits


def equal_loss_report(baseline, arm):
    """Step 2: per seed, the compute the baseline needs to reach the stacked run's final val bpb, beside the other measure."""
    fits = equal_loss_fits(baseline, arm)
    if not fits:
        return []
    out = [f"## Part 4, step 2: compute at equal loss, {baseline} at 1x, 1.15x, 1.3x, 1.5x (and 2x) of Part 3's budget", "",
           "| seed | budgets | val bpb per doubling of compute (fit) | largest miss of the fit | stacked run's val bpb | "
           "compute the baseline needs beyond the stacked run's | saving in those terms |", "|---|---|---|---|---|---|---|"]
    for s, (budgets, target, ratio, per_doubling, miss, where) in fits.items():
        need = f"{pct(ratio - 1)}{where} | {pct(1 - 1 / ratio)}" if ratio else "no crossing: the line does not fall | -"
        out.append(f"| {s} | {budgets} | {per_doubling:+.4f} | {miss:.4f} | {target:.4f} | {need} |")
    needs = [ratio - 1 for _, _, ratio, *_ in fits.values() if ratio]
    if len(needs) > 1:
        mean, half, _, _ = paired_test(needs)
        out += ["", f"Compute the baseline needs to reach the stacked run's final val bpb, beyond the stacked run's "
                f"compute, over {len(needs)} seeds: {pct(mean)} ± {100 * statistics.stdev(needs):.1f} (std), "
                f"95% CI [{pct(mean - half)}, {pct(mean + half)}]."]
    rows = seed_rows(lambda s: part4_run("fair-confirm", f"{arm}-s{s}"),
                     lambda s: part4_run("fair-confirm", f"{baseline}-s{s}"), list(fits))
    out += ["", f"Beside it, the other measure on the same seeds (where the stacked run reaches the baseline's final "
            f"val bpb): compute saved {pct_mean_std([matched_saving(r) for r in rows.values()])}."]
    return out + other_machines(["fair-confirm", "equal-loss", "horizon"]) + [""]


def part4_arms():
    """
    Part 4's points for the map: [(label, horizon, measure, cheap-token ceiling, [saving per seed])], each once a
    pair has finished. Measure "reaches": where the stacked run reaches the baseline's final loss; "needs": the
    compute the baseline needs to reach the stacked run's loss (step 2), as the saving 1 - spent / needed.
    """
    lr = room_lr()
    baseline, arm = fair_baseline(), best_room_arm(lr) if lr else None
    if not (baseline and arm):
        return []
    runs = lambda sweep, name: lambda s: part4_run(sweep, f"{name}-s{s}")
    pairs = [(f"{arm}, this machine", "1x", runs("fair-confirm", arm), runs("fair-confirm", baseline), FRESH_SEEDS),
             (f"{arm}, two tables", "1x", runs("ve-reverse", arm), runs("fair-confirm", baseline), FRESH_SEEDS),
             (arm, "2x", runs("horizon", f"{arm}-ratio{HORIZON_RATIO}"),
              runs("horizon", f"{baseline}-ratio{HORIZON_RATIO}"), HORIZON_SEEDS)]
    found = []
    for label, horizon, run_of, baseline_of, seeds in pairs:
        rows = seed_rows(run_of, baseline_of, seeds)
        if rows:
            ceiling = ceiling_of(run_of(next(iter(rows))))
            found.append((label, horizon, "reaches", ceiling, [matched_saving(r) for r in rows.values()]))
    fits = equal_loss_fits(baseline, arm)
    if fits:
        ceiling = ceiling_of(part4_run("fair-confirm", f"{arm}-s{next(iter(fits))}"))
        savings = [1 - 1 / ratio if ratio else None for _, _, ratio, *_ in fits.values()]
        found.append((f"{arm}, this machine", "1x", "needs", ceiling, savings))
    return found


def deep_start(run):
    """A stacked run's val bpb at the deep phase's step 0, right after growth."""
    return next(r["val_bpb"] for r in run if r["kind"] == "eval" and r["phase"] == "deep" and r["step"] == 0)


def value_embeddings_both_ways(baseline, arm):
    """
    Step 3: the stacked run with nanochat's two tables (the reverse control) against the baseline, the rule's verdict;
    and Part 3's control again here, the stacked run against a baseline with a table in every layer.
    """
    base = lambda s: part4_run("fair-confirm", f"{baseline}-s{s}")
    stacked = lambda s: part4_run("fair-confirm", f"{arm}-s{s}")
    reverse = lambda s: part4_run("ve-reverse", f"{arm}-s{s}")
    every = lambda s: part4_run("ve-every-layer", f"{baseline}-s{s}")
    out, rows = [], seed_rows(reverse, base, FRESH_SEEDS)
    if rows:
        out += [f"## Part 4, step 3: {arm} keeping nanochat's two tables (layers 1 and 3) against {baseline}", ""]
        out += seed_by_seed(f"{arm}, two tables", rows) + [""]
        cost = [deep_start(reverse(s)) - deep_start(stacked(s)) for s in rows if stacked(s)]
        together = [r["val_bpb"] - stacked(s)[-1]["val_bpb"]["deep"] for s, r in rows.items() if stacked(s)]
        out += [f"- Val bpb right after growth, two tables minus four: {paired_difference(cost)}"] * bool(cost)
        out += [f"- Final val bpb, two tables minus four: {paired_difference(together)}"] * bool(together)
        out += [f"- Two tables minus four during the run (val bpb at equal FLOPs, mean of the seeds; share of the "
                f"budget): {during_the_run(reverse, stacked, FRESH_SEEDS)}"] * bool(together)
        differences = [r["val_bpb"] - r["baseline_val_bpb"] for r in rows.values()]
        out += confirm_tests(*zip(*[(r["val_bpb"], r["baseline_val_bpb"]) for r in rows.values()])) * (len(rows) > 1)
        verdict = f"none yet ({len(rows)} of {len(FRESH_SEEDS)} seeds)"
        if len(rows) == len(FRESH_SEEDS):
            mean, half, _, _ = paired_test(differences)
            verdict = "the lead is growth, not tables" if mean + half < 0 else "the control shows nothing either way"
        out += ["", f"Verdict (growth with two tables beats the baseline's interval below zero): {verdict}.", ""]
    rows = seed_rows(stacked, every, FRESH_SEEDS)
    if rows:
        tables = [r["baseline_val_bpb"] - base(s)[-1]["val_bpb"]["baseline"] for s, r in rows.items() if base(s)]
        out += [f"## Part 4, step 3: {arm} against {baseline} with a value embedding in every layer", ""]
        out += seed_by_seed(arm, rows, "every-layer baseline") + ["",
                f"- {arm} minus the every-layer baseline: {paired_difference([r['val_bpb'] - r['baseline_val_bpb'] for r in rows.values()])}",
                f"- The every-layer baseline minus {baseline}: {paired_difference(tables) if tables else 'no pairs yet'}", ""]
    return out + other_machines(["ve-reverse", "ve-every-layer"]) * bool(out)


def horizon_report(baseline, arm):
    """Step 4: the lead at twice the budget against the lead at Part 3's, seed by seed, and the rule's verdict."""
    long = lambda name, s: part4_run("horizon", f"{name}-ratio{HORIZON_RATIO}-s{s}")
    short = lambda name, s: part4_run("fair-confirm", f"{name}-s{s}")
    final = lambda run, phase: run[-1]["val_bpb"][phase]
    lead = lambda run, base: final(run, "deep") - final(base, "baseline")
    seeds = [s for s in HORIZON_SEEDS if all((long(baseline, s), long(arm, s), short(baseline, s), short(arm, s)))]
    if not seeds:
        return []
    leads = {s: (lead(short(arm, s), short(baseline, s)), lead(long(arm, s), long(baseline, s))) for s in seeds}
    out = [f"## Part 4, step 4: the lead of {arm} at twice Part 3's budget (--ratio {HORIZON_RATIO})", "",
           "| seed | baseline at 2x val bpb | stacked at 2x val bpb | lead at 1x | lead at 2x | 2x minus 1x |",
           "|---|---|---|---|---|---|"]
    out += [f"| {s} | {final(long(baseline, s), 'baseline'):.4f} | {final(long(arm, s), 'deep'):.4f} | "
            f"{one:+.4f} | {two:+.4f} | {two - one:+.4f} |" for s, (one, two) in leads.items()] + [""]
    changes = [two - one for one, two in leads.values()]
    out += [f"- Lead at 2x minus lead at 1x: {paired_difference(changes)}",
            f"- Lead at 2x: {paired_difference([two for _, two in leads.values()])}"]
    rows = seed_rows(lambda s: long(arm, s), lambda s: long(baseline, s), seeds)
    out += [f"- Compute saved at 2x (where the stacked run reaches the baseline's final val bpb): "
            f"{saving_with_speedup([matched_saving(r) for r in rows.values()])}"]
    for budget, run in (("1x", short), ("2x", long)):  # not a rule: where in each run the lead is
        out += [f"- Stacked minus baseline during the run at {budget} (val bpb at equal FLOPs, mean of the seeds; "
                f"share of the budget): {during_the_run(lambda s: run(arm, s), lambda s: run(baseline, s), seeds)}"]
    verdict = f"none yet ({len(seeds)} of {len(HORIZON_SEEDS)} seeds)"
    if len(seeds) == len(HORIZON_SEEDS):
        mean, half, _, _ = paired_test(changes)
        verdict = "the lead shrinks" if mean - half > 0 else "the lead grows" if mean + half < 0 else \
            "no significant change"
    out += ["", f"Verdict (the interval of 2x minus 1x above zero: shrinks; below: grows): {verdict}.", ""]
    return out + other_machines(["horizon"])


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
                stack_gpt.format_report([stack_gpt.acceleration(baseline_records(0), run, name) for name, run in warmdown]), ""]
    pairs = [(f"d{d}", base, f"d{d // 2}s{d}") for d, base in ((2, ("miniseries", "d2")), (4, ("fixed-flops", "baseline-s0")))]
    pairs = [(depth, base, stacked) for depth, base, stacked in pairs if finished(*base) and finished("miniseries", stacked)]
    for depth, base, stacked in pairs:
        out += [f"## Miniseries at target depth {depth[1:]} (both phases at ratio 10.5, seed 0)", "",
                stack_gpt.format_report([stack_gpt.acceleration(records(*base), records("miniseries", stacked), stacked)]), ""]
    out += part2_report() + part3_report() + fair_baseline_report() + part4_report()
    print("\n".join(out))
    plots(base_runs)


def seeds_label(count):
    """How a plot's legend names the seeds behind a line: '1 seed', or 'mean of 3 seeds'."""
    return "1 seed" if count == 1 else f"mean of {count} seeds"


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
                    label=f"{label} ({seeds_label(len(runs))})")
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
    saved = ["experiments/bpb_vs_flops.png", "experiments/bpb_vs_shallow_ratio.png"]
    tuned = tuned_settings()
    if tuned:
        best = best_growth_arm(*tuned)
        part2 = (plot_differences(plt, list(growth_arms(*tuned)), GROWTH_SEEDS, "experiments/part2_bpb_difference_growth.png"),
                 best and plot_differences(plt, [best], CONFIRM_SEEDS, "experiments/part2_bpb_difference.png"),
                 plot_growth_point(plt, *tuned))
        saved += [path for path in part2 if path] + [plot_ceiling(plt, equal_flops_arms(), part4_arms())]
    print(f"plots: {', '.join(saved)}")


def eval_curve(records):
    """(cumulative FLOPs, val bpb) of a run's evaluations."""
    evals = [r for r in records if r["kind"] == "eval"]
    return [r["flops"] for r in evals], [r["val_bpb"] for r in evals]


def seed_differences(run_of, baseline_of, seeds):
    """
    {seed: (FLOPs of the run's evaluations, its val bpb minus its own seed's tuned baseline's at those FLOPs)} for each
    seed where both have finished. The baseline's curve is taken as linear between its evaluations, 100 steps apart.
    """
    import numpy as np  # in requirements.txt
    differences = {}
    for seed, (base, run) in paired_runs(run_of, baseline_of, seeds).items():
        flops, bpb = eval_curve(run)
        differences[seed] = (flops, np.array(bpb) - np.interp(flops, *eval_curve(base)))
    return differences


def plot_differences(plt, arms, seeds, path):
    """
    Part 2: each stacked run's val bpb minus its own seed's tuned baseline's at the same FLOPs, a thin line
    per seed and a thick mean per arm (step 2: every growth arm over seeds 0-2; step 3: the confirmed arm).
    """
    import numpy as np  # in requirements.txt, and matplotlib needs it anyway
    baselines = {s: tuned_baseline(s) for s in seeds}  # looked up once: each lookup applies the tuning rules anew
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, color in zip(arms, plt.cm.tab10.colors):
        differences = []
        for flops, difference in seed_differences(lambda s, arm=arm: growth_run(arm, s), baselines.get, seeds).values():
            differences.append(difference)
            ax.plot(flops, difference, color=color, lw=0.5, alpha=0.5)
        if differences:  # an arm's seeds evaluate at the same FLOPs, so the mean goes point by point
            ax.plot(flops, np.mean(differences, axis=0), color=color, lw=2.5, label=f"{arm} ({seeds_label(len(differences))})")
    if not ax.lines:
        plt.close(fig)
        return None
    ax.axhline(0, color="gray", lw=0.8)
    ax.set(xlabel="cumulative training FLOPs", ylabel="val bpb minus the tuned baseline's (same seed)", ylim=(-0.3, 0.3),
           title="stacked minus tuned baseline at equal compute (below 0: stacking ahead)")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_growth_point(plt, lr, warmdown):
    """
    Part 2, step 2: the compute saved at the val bpb both runs reach (negative: spent beyond the baseline's)
    against the growth share, a point per seed and a line through the means per warmdown.
    """
    results = growth_results(lr, warmdown)
    if not results:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for w, color in zip(sorted({w for _, _, w, _ in results}, key=float, reverse=True), plt.cm.tab10.colors):
        points = [(float(share), [100 * x for x in map(matched_saving, rows) if x is not None])
                  for _, share, arm_warmdown, rows in results if arm_warmdown == w]
        points = [(share, savings) for share, savings in points if savings]  # a diverged run has no saving to draw
        for share, savings in points:
            ax.plot([share] * len(savings), savings, "o", color=color, alpha=0.4)
        ax.plot([share for share, _ in points], [statistics.mean(savings) for _, savings in points], "-D", color=color, lw=2, ms=5,
                label=f"warmdown {w}{' (tuned)' * (w == warmdown)}, mean of each point's seeds")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set(xlabel="growth share of the FLOPs budget", ylabel="compute saved at the val bpb both reach (%)", xlim=(0.1, 0.9),
           title="when to grow: compute saved (below 0: spent extra) against the growth point")
    ax.legend()
    fig.savefig("experiments/part2_saving_vs_growth_share.png", dpi=120, bbox_inches="tight")
    return "experiments/part2_saving_vs_growth_share.png"


def plot_ceiling(plt, arms, part4=()):
    """
    The map: measured saving against the cheap-token ceiling, a point (mean ± std over seeds) per equal-FLOPs arm of
    Parts 1-4, the anchors' reported savings beside them. Filled: where the stacked run reaches the baseline's final
    loss; open: the compute the baseline needs to reach the stacked run's loss; squares: twice the budget. On the
    diagonal, a saving is all cheap tokens. Part 4's points share one ceiling: they are spread sideways, 0.5 points
    apart, so that none hides another.
    """
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    groups = [(part, "o", "full", 0, [(c, s) for p, _, c, s in arms if p == part])
              for part in sorted({p for p, *_ in arms})]
    groups += [(f"Part 4, {label}, {horizon}{', compute the baseline needs' * (measure == 'needs')}",
                "s" if horizon == "2x" else "o", "none" if measure == "needs" else "full",
                0.5 * (i - (len(part4) - 1) / 2), [(ceiling, savings)])
               for i, (label, horizon, measure, ceiling, savings) in enumerate(part4)]
    for (label, marker, fill, dodge, points), color in zip(groups, plt.cm.tab10.colors + plt.cm.Dark2.colors):
        points = [(ceiling, savings) for ceiling, savings in points if None not in savings]
        ax.errorbar([100 * c + dodge for c, _ in points], [100 * statistics.mean(s) for _, s in points],
                    yerr=[100 * statistics.stdev(s) if len(s) > 1 else 0 for _, s in points],
                    fmt=marker, fillstyle=fill, color=color, capsize=3, label=label)
    for (anchor, (ceiling, saving)), marker in zip(ANCHORS.items(), "*PX"):
        ax.plot(100 * ceiling, 100 * saving, marker, color="black", ms=10, label=f"{anchor} (reported)")
    ax.axline((0, 0), slope=1, color="gray", lw=0.8, ls="--", label="saving = ceiling")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set(xlabel="cheap-token ceiling (% of the budget)", ylabel="compute saved (%)",
           title="measured saving against the cheap-token ceiling")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: no point hidden
    fig.savefig("experiments/saving_vs_ceiling.png", dpi=120, bbox_inches="tight")
    return "experiments/saving_vs_ceiling.png"


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
