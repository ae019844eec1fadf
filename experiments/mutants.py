"""
Seeded bugs: does the test suite catch them? Each mutant below is a small change to stack_gpt.py (the E
mutants: to the experiments' own code, Part 4's rules and control) of the kind a developer could really make
(a sign, a constant, a missing step, a wrong position). For each, a copy of the repository gets the change
and runs the suite without the two golden tests (which catch nearly anything that moves a number, without
saying what broke, and are loosened on other CPUs), stopping at the first failure.

    python experiments/mutants.py              # every mutant: about 20 minutes on 2 cores
    python experiments/mutants.py O3 T1        # some of them
    python experiments/mutants.py --behaviours # each behaviour's own test, alone, against a bug that breaks it

It prints a markdown table: the mutant, its area, the first failing test (or "NOT CAUGHT"), and the count.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MUTANTS = [  # (id, area, what the bug does, text in stack_gpt.py, its replacement)
    ("M1", "model", "rotary turns the wrong way for one half", "x2 * cos - x1 * sin", "x2 * cos + x1 * sin"),
    ("M2", "model", "k is not RMS-normalised",
     "q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))",
     "q, k = norm(apply_rotary(q, cos, sin)), apply_rotary(k, cos, sin)"),
    ("M3", "model", "softcap without the division", "SOFTCAP * torch.tanh(logits / SOFTCAP)", "SOFTCAP * torch.tanh(logits)"),
    ("M4", "model", "value-embedding gate starts at 0.5", "gate = 2 * torch.sigmoid(", "gate = torch.sigmoid("),
    ("M5", "model", "MLP activation relu, not relu^2", "F.relu(self.c_fc(x)).square()", "F.relu(self.c_fc(x))"),
    ("M6", "model", "attention without the 1/sqrt(head_dim) scale", "is_causal=True)", "is_causal=True, scale=1.0)"),
    ("M7", "model", "x0_lambdas start at 0", "self.x0_lambdas.fill_(0.1)", "self.x0_lambdas.fill_(0.0)"),
    ("M8", "model", "the skip connection mixes x instead of x0",
     "self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0", "self.resid_lambdas[i] * x + self.x0_lambdas[i] * x"),
    ("M9", "model", "attention FLOPs counted half", "12 * c.n_head * c.head_dim", "6 * c.n_head * c.head_dim"),
    ("O1", "optimizer", "Nesterov looks ahead by 1 - mu", "torch._foreach_lerp(grads, momenta, mu)",
     "torch._foreach_lerp(grads, momenta, 1 - mu)"),
    ("O2", "optimizer", "NorMuon's running mean uses beta2 as the new weight",
     "keepdim=True), 1 - beta2)", "keepdim=True), beta2)"),
    ("O3", "optimizer", "wide matrices get the larger step", "max(1.0, rows / cols) ** 0.5", "max(1.0, cols / rows) ** 0.5"),
    ("O4", "optimizer", "cautious decay where the signs disagree", "(update * weights >= 0)", "(update * weights <= 0)"),
    ("O5", "optimizer", "AdamW without bias correction of the first moment", 'value=-group["lr"] / bias1)',
     'value=-group["lr"])'),
    ("O6", "optimizer", "LRs scale with the batch, not its square root",
     "scale = args.lr_scale * (batch_size / REFERENCE_BATCH) ** 0.5", "scale = args.lr_scale * (batch_size / REFERENCE_BATCH)"),
    ("O7", "optimizer", "resid_lambdas at 10% of the scalar LR", "args.scalar_lr * 0.01 * scale", "args.scalar_lr * 0.1 * scale"),
    ("S1", "schedules", "warmdown one step early", "progress = (length - position) / warmdown",
     "progress = (length - position - 1) / warmdown"),
    ("S2", "schedules", "Muon momentum keeps rising after its warmup", "min(step / MUON_MOMENTUM_WARMUP, 1.0)",
     "min(step / MUON_MOMENTUM_WARMUP, 1.5)"),
    ("S3", "schedules", "training never updates Muon's weight decay",
     'group["momentum"], group["weight_decay"] = momentum, weight_decay', 'group["momentum"] = momentum'),
    ("S4", "schedules", "global schedule: weight decay restarts at growth",
     "weight_decay_at(done, phase.run_flops, phase.weight_decay)", "weight_decay_at(step, phase.steps, phase.weight_decay)"),
    ("S5", "schedules", "global schedule: momentum warmup restarts at growth", "muon_momentum(phase.steps_before + step)",
     "muon_momentum(step)"),
    ("T1", "stacking", "stack repeats each layer in place", "return [i for _ in range(growth_factor) for i in range(n_layer)]",
     "return [i for i in range(n_layer) for _ in range(growth_factor)]"),
    ("T2", "stacking", "identity copies keep a x0 skip", "deep.x0_lambdas[j] = 1.0, 0.0", "deep.x0_lambdas[j] = 1.0, 0.1"),
    ("T3", "stacking", "random growth copies the sources into the new layers too", "        layer_map = layer_map[:n_layer]\n", ""),
    ("T4", "stacking", "carry gives every block layer 0's state", 'name = f"blocks.{layer_map[int(j)]}.{rest}"',
     'name = f"blocks.0.{rest}"'),
    ("T6", "stacking", "carry copies the per-layer scalars' state unmapped",
     'per_layer = name in ("resid_lambdas", "x0_lambdas")', "per_layer = False"),
    ("T5", "stacking", "value embeddings placed by deep index", "if source in shallow_config.ve_layers",
     "if j in shallow_config.ve_layers"),
    ("P1", "planning", "the deep phase fills the whole budget again",
     "steps = round((budget - (shallow_flops or 0)) / (flops_per_token * batch))",
     "steps = round(budget / (flops_per_token * batch))"),
    ("P2", "planning", "auto batch rounded down", "auto = 2 ** round(math.log2(", "auto = 2 ** math.floor(math.log2("),
    ("P3", "planning", "--grow-at counts half the share", "steps = round(args.grow_at * budget / (flops_per_token * batch))",
     "steps = round(args.grow_at * budget / (2 * flops_per_token * batch))"),
    ("P4", "planning", "weight decay rule inverted", "* ref_params / scaling_params", "* scaling_params / ref_params"),
    ("P5", "planning", "batch power law inverted", "(scaling_params / ref_params) ** BATCH_EXPONENT",
     "(ref_params / scaling_params) ** BATCH_EXPONENT"),
    ("R1", "resume", "the smoothed loss is not restored", 'torch.tensor(resume["smooth_loss"] if start_step else 0.0',
     "torch.tensor(0.0"),
    ("R2", "resume", "the RNG is not restored", '    torch.set_rng_state(ckpt["rng"])\n', ""),
    ("R3", "resume", "the data position is not restored", "    if same_data:\n        loader.load_state_dict",
     "    if False:\n        loader.load_state_dict"),
    ("D1", "DDP", "gradients summed over ranks, not averaged", "        torch._foreach_div_(grads, world)\n", ""),
    ("D2", "DDP", "every rank reads the first rows", "mine = ids[self.rank * rows:(self.rank + 1) * rows]", "mine = ids[:rows]"),
    ("A1", "report", "the crossing is not interpolated", "share = (above[key] - target) / (above[key] - below[key])",
     "share = 0.5"),
    ("A2", "report", "speedup computed as a saving", 'row[f"{metric}_speedup"] = 1 / fraction - 1',
     'row[f"{metric}_speedup"] = 1 - fraction'),
    ("A3", "report", "saving reported as the fraction", 'row[f"{metric}_saving"] = 1 - fraction',
     'row[f"{metric}_saving"] = fraction'),
    ("X1", "data", "every epoch in the same order", "manual_seed(self.seed * 100003 + epoch)", "manual_seed(self.seed * 100003)"),
    ("X2", "data", "val windows from the start of the split only", "np.linspace(0, windows.num_windows - 1, n).round()",
     "np.arange(n)"),
    ("X3", "data", "special tokens counted in bpb", "nats += (loss * (counted_bytes > 0)).sum()", "nats += loss.sum()"),
    ("L1", "loop", "evaluations off by one step", "step % args.eval_every == 0", "step % args.eval_every == 1"),
    ("L2", "loop", "the loss EMA is not debiased", "    smoothed /= 1 - LOSS_EMA_DECAY ** steps_done  # debias: the EMA started from zero\n", ""),
    ("L3", "loop", "gradients summed over micro-batches", "(loss / accum).backward()", "loss.backward()"),
    ("L4", "loop", "cumulative FLOPs forget the phases before", "return self.flops_before + self.step_flops * step",
     "return self.step_flops * step"),
    ("L5", "loop", "the deep phase starts from a fresh model, not the grown one",
     "            model, optimizer = deep, deep_optimizer", "            optimizer = deep_optimizer"),
    ("L6", "loop", "growth keeps the shallow phase's (compiled) model alive",
     "            log(f\"grew {args.depth}", "            kept = step_model\n            log(f\"grew {args.depth}"),
    ("F1", "first contact", "the guard stops a CPU plan of days even with --device cpu named",
     "not (args.device_given or args.plan", "not (args.plan"),
    ("F2", "first contact", "--plan goes on to write the run folder", "    if args.plan:\n        return\n", ""),
    ("F3", "first contact", "a folder with metrics but no checkpoint is refused",
     "for name in CHECKPOINTS if os.path.exists", 'for name in CHECKPOINTS + ("metrics.jsonl",) if os.path.exists'),
    ("F4", "first contact", "a malloc threshold that a C int turns into 0", "(-1, 2**31 - 1)", "(-1, 2**32)"),
    ("F5", "first contact", "samples draw from training's random state", "1, generator=generator)", "1)"),
    ("F6", "first contact", "the sample ignores the seed", "manual_seed(seed)\n", "manual_seed(0)\n"),
    ("F7", "first contact", "--resume --plan trains", '"out_dir", "plan")}', '"out_dir")}'),
    ("F8", "first contact", "the tokenizer read through tiktoken's cache, keyed by the path",
     "ranks = {base64.b64decode(token): int(rank) for token, rank in zip(words[::2], words[1::2])}",
     'ranks = __import__("tiktoken.load").load.load_tiktoken_bpe(path)'),
    ("F9", "first contact", "after Ctrl-C, --resume is named only for a periodic checkpoint",
     'for name in CHECKPOINTS[1:])', 'for name in CHECKPOINTS[1:2])'),
    ("F10", "first contact", "the plan says \"1 layers\"", "'s' * (p.config.n_layer > 1)", "'s' * (p.config.n_layer > 0)"),
]


# Seeded bugs in the experiments' own code: Part 4's rules and reports (sweeps.py) and its control script
EXPERIMENT_MUTANTS = [  # (id, area, what the bug does, file, text in it, its replacement)
    ("E1", "part 4", "the confirmation here runs only if the baseline changes", "experiments/sweeps.py",
     "if winner and arm else []", "if winner not in (None, FAIR_CURRENT) and arm else []"),
    ("E2", "part 4", "the machine's shift taken the wrong way round", "experiments/sweeps.py",
     'last(here(name, s)) - last(finished_records("room-confirm", f"{name}-s{s}"))',
     'last(finished_records("room-confirm", f"{name}-s{s}")) - last(here(name, s))'),
    ("E3", "part 4", "the verdict here pairs Part 3's growth runs", "experiments/sweeps.py",
     "verdict = fresh_seed_verdict(arm, here, lambda s: here(winner, s))",
     "verdict = fresh_seed_verdict(arm, room_run, lambda s: here(winner, s))"),
    ("E4", "part 4", "a run of another CPU pairs", "experiments/sweeps.py",
     "if finished(sweep, name) and machine_of(sweep, name) == part4_machine() else None",
     "if finished(sweep, name) else None"),
    ("E5", "part 4", "step 2 reads the line the wrong way", "experiments/sweeps.py",
     "math.exp((target - intercept) / slope)", "math.exp((intercept - target) / slope)"),
    ("E6", "part 4", "step 2 leaves out the 2x baseline", "experiments/sweeps.py",
     '    runs.append(("horizon", f"{baseline}-ratio{HORIZON_RATIO}-s{seed}"))\n', ""),
    ("E7", "part 4", "the reverse control's verdict from the mean alone", "experiments/sweeps.py",
     '"the lead is growth, not tables" if mean + half < 0', '"the lead is growth, not tables" if mean < 0'),
    ("E8", "part 4", "the horizon's verdicts swapped", "experiments/sweeps.py",
     'verdict = "the lead shrinks" if mean - half > 0 else "the lead grows"',
     'verdict = "the lead grows" if mean - half > 0 else "the lead shrinks"'),
    ("E9", "part 4", "the cost of growth read at the deep phase's end", "experiments/sweeps.py",
     'r["phase"] == "deep" and r["step"] == 0', 'r["phase"] == "deep" and r["step"] == 10'),
    ("E10", "part 4", "the reverse control runs the every-layer script", "experiments/sweeps.py",
     '"ve-reverse": "experiments/nanochat_ve_stack.py"', '"ve-reverse": "experiments/every_layer_ve.py"'),
    ("E11", "part 4", "the reverse control keeps nanochat's layers, table or not", "experiments/nanochat_ve_stack.py",
     "tuple(j for j in config.ve_layers if j in nanochat)", "tuple(j for j in nanochat)"),
    ("E12", "part 4", "the plan records every copied table", "experiments/nanochat_ve_stack.py",
     "return nanochat_tables(copied_layout(shallow_config, layer_map))", "return copied_layout(shallow_config, layer_map)"),
    ("E13", "part 4", "step 4's lead during the run read as baseline minus stacked", "experiments/sweeps.py",
     "during_the_run(lambda s: run(arm, s), lambda s: run(baseline, s), seeds)",
     "during_the_run(lambda s: run(baseline, s), lambda s: run(arm, s), seeds)"),
]


PART4_STEP1_TEST = "test_part4_fair_baseline_takes_a_change_only_if_it_beats_the_baseline_run_beside_it"
PART4_STEPS_TEST = "test_part4_steps_2_to_4_pair_with_the_confirmation_here_and_apply_their_rules"
PART4_REVERSE_TEST = "test_part4_reverse_control_keeps_value_embeddings_only_where_nanochat_puts_them"


# The behaviours that issue 26 found untested, each with a bug that breaks it and the test that must catch it
BEHAVIOURS = [
    ("rotary: attention depends on relative position only", "M1", "test_rotary_scores_depend_only_on_relative_position"),
    ("q and k RMS-normalised per head", "M2", "test_attention_against_a_reference"),
    ("attention scaled by 1/sqrt(head_dim)", "M6", "test_attention_against_a_reference"),
    ("a fresh value-embedding gate adds its table at weight 1", "M4", "test_attention_against_a_reference"),
    ("logits 15 tanh(z / 15)", "M3", "test_mlp_and_logits_against_a_reference"),
    ("MLP activation relu(x)^2", "M5", "test_mlp_and_logits_against_a_reference"),
    ("each layer mixes its input with x0", "M8", "test_forward_mixes_each_layer_input_with_the_embedding"),
    ("NorMuon's variance: the beta2 = 0.95 mean of squared updates", "O2",
     "test_normuon_variance_is_the_running_mean_of_squared_updates"),
    ("Muon's LR by matrix shape", "O3", "test_muon_step_size_follows_the_matrix_shape"),
    ("weight decay in training falls linearly to zero", "S3", "test_weight_decay_reaching_the_optimizer_falls_to_zero"),
    ("global schedule: weight decay over the run's FLOPs", "S4", "test_global_schedule_decays_weight_decay_over_the_whole_run"),
    ("--init-from fills only the rest of the budget", "P1", "test_init_from_fills_the_rest_of_the_baseline_budget"),
    ("default batch: the power law away from d12", "P5", "test_default_batch_follows_the_power_law_away_from_d12"),
    ("--grow random under resume and --init-from", "R2", "test_random_growth_is_reproduced_by_resume_and_init_from"),
    ("several processes: averaged gradients", "D1", "test_ranks_average_their_gradients"),
    ("several processes: one process's losses", "D2", "test_two_processes_match_one"),
    ("several processes: the batch split", "D2", "test_ranks_split_every_batch_between_them"),
    ("each epoch in a new shuffled order", "X1", "test_each_epoch_visits_every_window_in_a_new_order"),
    # issue 33's rewrite: the stacking as a layer map, the loop in one function, first contact
    ("identity growth: copies pass the residual stream through", "T2", "test_identity_growth_keeps_the_logits"),
    ("random growth: the later passes are new layers", "T3", "test_random_growth_keeps_sources_and_inits_new_layers"),
    ("carry: each block from its source's state", "T4", "test_carry_gives_every_copy_its_source_optimizer_state"),
    ("carry: the per-layer scalars' state by the map", "T6", "test_carry_gives_every_copy_its_source_optimizer_state"),
    ("global schedule: momentum warmup not restarted", "S5", "test_global_schedule_is_continuous_across_growth"),
    ("the deep phase trains the grown model", "L5", "test_two_phase_run_end_to_end"),
    ("cumulative FLOPs across phases", "L4", "test_two_phase_run_end_to_end"),
    ("growth frees the compiled shallow model", "L6", "test_compiled_bf16_run_on_the_cpu_matches_eager"),
    ("resume: the smoothed loss", "R1", "test_killed_run_resumes_to_the_same_result"),
    ("resume: the data position", "R3", "test_killed_run_resumes_to_the_same_result"),
    ("the report's saving", "A3", "test_acceleration_report_reproduces_the_writeup"),
    ("the guard: a CPU plan of days runs when --device cpu is named", "F1",
     "test_the_guard_stops_a_cpu_plan_of_days_unless_asked_by_name"),
    ("--plan writes nothing", "F2", "test_plan_prints_the_plan_and_writes_nothing"),
    ("a folder without a checkpoint is reused", "F3", "test_a_run_stopped_before_its_first_checkpoint"),
    ("malloc thresholds that fit a C int", "F4", "test_cpu_runs_keep_freed_memory_on_glibc_only"),
    ("samples leave training's random state alone", "F5", "test_identity_growth_writes_what_the_shallow_model_wrote"),
    ("samples follow the seed", "F6", "test_identity_growth_writes_what_the_shallow_model_wrote"),
    ("--resume --plan writes nothing", "F7", "test_resume_with_plan_writes_nothing"),
    ("the tokenizer read from the data folder", "F8", "test_samples_decode_with_the_data_folders_own_tokenizer"),
    ("Ctrl-C names the command that goes on", "F9", "test_ctrl_c_names_the_command_that_goes_on"),
    ("the plan counts in words", "F10", "test_a_stacked_plan_states_its_cheap_token_ceiling"),
    # Part 4's rules and reports (experiments/sweeps.py) and its reverse control
    ("Part 3's confirmation runs again here", "E1", PART4_STEP1_TEST),
    ("the machine's shift, here minus there", "E2", PART4_STEP1_TEST),
    ("the verdict pairs runs of this machine", "E3", PART4_STEP1_TEST),
    ("runs of another CPU pair with none", "E4", PART4_STEP1_TEST),
    ("step 2: the compute where the line reaches the stacked run", "E5", PART4_STEPS_TEST),
    ("step 2: the 2x baseline as a fifth budget", "E6", PART4_STEPS_TEST),
    ("step 3: the rule's interval", "E7", PART4_STEPS_TEST),
    ("step 4: shrinks above zero, grows below", "E8", PART4_STEPS_TEST),
    ("step 3: the cost right after growth", "E9", PART4_STEPS_TEST),
    ("step 3: the reverse control's own script", "E10", PART4_STEPS_TEST),
    ("the reverse control keeps only copies nanochat's rule keeps", "E11", PART4_REVERSE_TEST),
    ("the plan records the tables kept", "E12", PART4_REVERSE_TEST),
    ("step 4: stacked minus baseline during the run", "E13", PART4_STEPS_TEST),
]


def run_mutant(path, old, new, only=None):
    """The first failing test's name, or None when the suite (or the test `only`) passes with the change to `path`."""
    with open(os.path.join(HERE, path)) as f:
        source = f.read()
    assert old == new or source.count(old) == 1, f"the text to change must occur once in {path}: {old!r}"
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("stack_gpt.py", "prepare_data.py", "test_stack_gpt.py", "README.md"):
            shutil.copy(os.path.join(HERE, name), tmp)
        shutil.copytree(os.path.join(HERE, "experiments"), os.path.join(tmp, "experiments"),
                        ignore=shutil.ignore_patterns("runs"))
        with open(os.path.join(tmp, path), "w") as f:
            f.write(source.replace(old, new))
        select = ["-k", only] if only else ["-k", "not golden"]  # the golden tests pin numbers, not behaviours
        proc = subprocess.run([sys.executable, "-m", "pytest", "test_stack_gpt.py", "-x", "-q", "-p", "no:cacheprovider"]
                              + select, cwd=tmp, capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
    return failed.group(1).split("::")[-1] if failed else f"exit {proc.returncode}"


def main():
    chosen = set(sys.argv[1:])
    mutants = [(key, area, what, "stack_gpt.py", old, new) for key, area, what, old, new in MUTANTS]
    mutants += EXPERIMENT_MUTANTS
    if "--behaviours" in chosen:
        bugs = {key: (path, old, new) for key, _, _, path, old, new in mutants}
        print("| behaviour | bug | its test fails |\n|---|---|---|")
        for behaviour, key, test in BEHAVIOURS:
            failed = run_mutant(*bugs[key], only=test)
            print(f"| {behaviour} | {key} | {'yes' if failed else 'NO'} |", flush=True)
        return
    assert run_mutant("stack_gpt.py", "", "") is None, "the suite must pass on the code as it is"
    print("| mutant | area | the bug | first failing test |\n|---|---|---|---|")
    caught = total = 0
    for key, area, what, path, old, new in mutants:
        if chosen and key not in chosen:
            continue
        first = run_mutant(path, old, new)
        total, caught = total + 1, caught + (first is not None)
        print(f"| {key} | {area} | {what} | {first or 'NOT CAUGHT'} |", flush=True)
    print(f"\ncaught {caught} of {total}")


if __name__ == "__main__":
    main()
