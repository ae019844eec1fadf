"""
The machinery around a run, kept out of the lesson in stack_gpt.py: checking the flags, the run's
files (checkpoints written atomically and loaded without running code from them, the run folder and
its metrics log, what --resume reads back), and the helpers for several processes under torchrun
(gradients averaged over ranks, weights broadcast from rank 0). A first reading of stack_gpt.py can
skip it: none of it is about stacking, and a single-process run does the same without it.
"""

import argparse
import errno
import json
import math
import os
import subprocess
import warnings
from dataclasses import asdict

import torch
import torch.distributed as dist

import prepare_data

CHECKPOINT_FORMAT = "stack-gpt-1"
RUN_FILES = ("final.pt", "checkpoint.pt", "shallow.pt", "metrics.jsonl")


class UsageError(Exception):
    """A mistake in the flags or files the user gave us: reported in one line, exit code 2."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite: reported in one line, exit code 1, the last checkpoint kept."""


def check_flags(args):
    """Refuse flags that cannot work, each with a one-line UsageError that names the fix."""
    positive = ["depth", "aspect_ratio", "head_dim", "seq_len", "ratio", "target_flops", "shallow_ratio", "shallow_steps", "lr_scale",
                "deep_ratio", "deep_steps", "total_batch_size", "device_batch_size", "log_every"]
    for name in positive:
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive (got {value})")
    if args.eval_every < 0 or args.sample_tokens < 0 or args.save_every < 0:
        raise UsageError("--eval-every, --sample-tokens and --save-every must be >= 0")
    if args.eval_tokens < args.seq_len:
        raise UsageError(f"--eval-tokens {args.eval_tokens} is less than one sequence: give at least --seq-len {args.seq_len}")
    if args.head_dim % 2:
        raise UsageError(f"--head-dim {args.head_dim} must be even (rotary turns pairs of channels)")
    for name in ["warmup_ratio", "warmdown_ratio", "shallow_warmdown_ratio", "final_lr_frac"]:
        value = getattr(args, name)
        if value is not None and value < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0 (got {value})")
    if args.warmup_ratio > 1:
        raise UsageError(f"--warmup-ratio {args.warmup_ratio} is longer than the phase: give a fraction of it, at most 1")
    if args.stack_to is not None and (args.stack_to <= args.depth or args.stack_to % args.depth):
        raise UsageError(f"--stack-to {args.stack_to} must be a larger multiple of --depth {args.depth} (e.g. --depth 6 --stack-to 12)")
    if args.grow_at is not None and not (0 < args.grow_at < 1 and args.stack_to):
        raise UsageError(f"--grow-at {args.grow_at} is a share of the budget: give a number between 0 and 1, and --stack-to")
    if args.grow_at is not None and (args.shallow_steps or args.init_from):
        raise UsageError("--grow-at sets the shallow phase's length: leave out --shallow-steps and --init-from")
    if args.init_from and args.stack_to is None:
        raise UsageError("--init-from starts the deep phase from a shallow checkpoint: give --stack-to too")
    if args.device not in (None, "cuda", "cpu"):
        raise UsageError(f"--device must be cuda or cpu (got {args.device})")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA GPU is visible: use --device cpu")


def check_micro_batches(phases, args, world):
    """Every phase's batch must be a whole number of micro-batches (device batch x context x processes)."""
    micro_step_tokens = args.device_batch_size * args.seq_len * world
    for phase in phases:
        if phase.batch_size % micro_step_tokens:
            raise UsageError(f"{phase.name} phase: total batch {phase.batch_size} tokens is not a multiple of --device-batch-size "
                             f"{args.device_batch_size} x --seq-len {args.seq_len}" + (f" x {world} processes" if world > 1 else "") +
                             f" = {micro_step_tokens}: change --total-batch-size or --device-batch-size")


def on_rank0(write, rank, world):
    """
    Run `write` (which saves a file) on rank 0 only, then tell every rank how it went: a UsageError
    there (a full disk, a folder that cannot be written) is raised on all ranks, so that none is
    left waiting for rank 0 in the next collective. The broadcast also keeps the ranks in step.
    """
    error = None
    if rank == 0:
        try:
            write()
        except UsageError as e:
            error = str(e)
    if world > 1:
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error:
        raise UsageError(error)


def save_checkpoint(path, model, optimizer, args, phase, step, flops, state):
    """
    Everything needed to continue after `step` of `phase` (--resume) or to grow from it (--init-from),
    `flops` spent by then: the model, optimizer, data position, RNG, the loop's state and how many
    metrics lines were written. Rank 0 writes it.
    """
    # a NaN since the last logged step must not become the checkpoint to resume; the smoothed loss is
    # averaged over ranks, so every rank stops here together
    if not math.isfinite(state.smooth_loss):
        raise TrainingDiverged(f"{phase.name} phase: the loss became {float(state.smooth_loss)} by step {step}; "
                               "the last checkpoint is left as it was")
    saved = lambda: {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_config": asdict(model.config), "args": vars(args),
        "phase": phase.name, "step": step, "batch_size": phase.batch_size, "weight_decay": phase.weight_decay,
        "flops": flops, "phase_flops_before": state.flops_before, "phase_steps_before": state.steps_before,
        "smooth_loss": float(state.smooth_loss), "val_bpb": dict(state.val_bpb), "metrics_lines": state.log.lines,
        "loader": state.loader.state_dict(), "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if args.device == "cuda" else torch.zeros(0, dtype=torch.uint8)}
    on_rank0(lambda: write_checkpoint(path, saved()), state.rank, state.world)


def write_checkpoint(path, state):
    """
    torch.save through prepare_data.write_atomic (a temp file, flushed to disk, renamed over the old
    one), so a crash or a full disk at any moment leaves the previous checkpoint whole.
    """
    try:
        prepare_data.write_atomic(path, lambda f: torch.save({"format": CHECKPOINT_FORMAT, **state}, f))
    except OSError as e:
        raise UsageError(f"could not write {path} ({e.strerror}); the previous checkpoint is untouched: free some disk space")


def load_checkpoint(path):
    """Load with weights_only=True: tensors and plain data only, never code from the file."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}: give the shallow.pt of a finished phase 1")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles; the refusal below says it in one line
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)  # CPU: every rank, whatever its GPU
    except Exception as e:
        with open(path, "rb") as f:
            head = f.read(4)
        zipped, pickled = head == b"PK\x03\x04", head[:1] == b"\x80"  # torch.save's zip archive; a bare pickle
        if "GLOBAL" in str(e) or (pickled and not zipped):
            raise UsageError(f"{path} holds code or objects other than tensors: refused (checkpoints load with weights_only=True)")
        why = "is truncated or damaged" if zipped else "is not a torch checkpoint"
        raise UsageError(f"{path} {why}: use an intact checkpoint written by stack_gpt.py")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not a stack_gpt checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    return ckpt


def check_init_from(ckpt, args, want):
    """A shallow checkpoint must have the shape (`want`, a model config) that these flags would have trained."""
    if ckpt["phase"] != "shallow":
        raise UsageError(f"{args.init_from} is a {ckpt['phase']} checkpoint: --init-from takes the shallow.pt of phase 1")
    have, want = ckpt["model_config"], asdict(want)
    wrong = [f"{k}={have[k]} (this run: {want[k]})" for k in ("n_layer", "n_embd", "n_head", "vocab_size", "sequence_len") if have[k] != want[k]]
    if wrong:
        raise UsageError(f"--init-from checkpoint does not fit the flags or data: {', '.join(wrong)}; "
                         "use the --depth/--stack-to/--aspect-ratio/--head-dim/--seq-len/--data it was trained with")


def resume_point(args, parser):
    """
    --resume: the most advanced checkpoint of the run in --out-dir (the periodic checkpoint.pt or
    the end of phase 1), and the flags it was started with. None when the run already finished.
    """
    if os.path.exists(os.path.join(args.out_dir, "final.pt")):
        return None
    found = [load_checkpoint(p) for p in (os.path.join(args.out_dir, n) for n in ("checkpoint.pt", "shallow.pt")) if os.path.exists(p)]
    if not found:
        raise UsageError(f"nothing to resume in {args.out_dir}: no checkpoint.pt or shallow.pt (start runs with --save-every N)")
    ckpt = max(found, key=lambda c: (c["phase"] != "shallow", c["step"]))  # a later phase, then a later step
    # the machine's settings come from this command, everything else from the run's own flags
    defaults = vars(parser.parse_args([]))  # flags added since the checkpoint was written take their defaults
    saved = argparse.Namespace(**{**defaults, **ckpt["args"], "resume": True, "device": args.device, "compile": args.compile, "dtype": args.dtype, "out_dir": args.out_dir})
    return ckpt, saved


def check_run_dir(args):
    """Refuse to mix a new run into a folder holding another one, finished or not, without --overwrite."""
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UsageError(f"--out-dir {args.out_dir} is a file: choose a folder")
    if args.init_from and os.path.realpath(os.path.dirname(os.path.abspath(args.init_from))) == os.path.realpath(args.out_dir):
        raise UsageError(f"--init-from {args.init_from} lies in --out-dir {args.out_dir}, which this run clears: give another --out-dir")
    if args.resume or args.overwrite:
        return
    if os.path.exists(os.path.join(args.out_dir, "final.pt")):
        raise UsageError(f"{args.out_dir} already holds a finished run: pass --overwrite or choose another --out-dir")
    if any(os.path.exists(os.path.join(args.out_dir, name)) for name in RUN_FILES):
        raise UsageError(f"{args.out_dir} holds an unfinished run: --resume continues it, --overwrite starts over")


def code_commit():
    """The git commit this code is at ("+dirty" with uncommitted changes), so that a run says which code made it; None outside git."""
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty=+dirty", "--abbrev=40", "--exclude=*"],  # no tag names
                                   capture_output=True, text=True, timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.TimeoutExpired):  # no git here
        return None
    return described.stdout.strip() if described.returncode == 0 else None


def prepare_run_dir(args, metrics_lines=None):
    """Save the config; start a fresh metrics file (and drop an old run's checkpoints), or cut a resumed one back."""
    path = os.path.join(args.out_dir, "metrics.jsonl")
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        kept = []
        if metrics_lines is None:
            for name in RUN_FILES[:3]:
                if os.path.exists(os.path.join(args.out_dir, name)):
                    os.remove(os.path.join(args.out_dir, name))
        elif os.path.exists(path):
            kept = [line for line in open(path).readlines()[:metrics_lines] if line.endswith("\n")]
        config = json.dumps({**vars(args), "code_commit": code_commit()}, indent=2)
        prepare_data.write_atomic(os.path.join(args.out_dir, "config.json"), lambda f: f.write(config.encode()))
        prepare_data.write_atomic(path, lambda f: f.write("".join(kept).encode()))
    except OSError as e:
        raise UsageError(f"cannot write the run folder {args.out_dir} ({e.strerror}): choose another --out-dir")


class RunLog:
    """Prints a line and appends the same record to the run's metrics.jsonl (rank 0 only)."""

    def __init__(self, out_dir, enabled, lines=0):
        self.path, self.enabled, self.lines = os.path.join(out_dir, "metrics.jsonl"), enabled, lines

    def __call__(self, line, **record):
        if not self.enabled:
            return
        print(line, flush=True)
        if record:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:  # rank 0 exits with the message; torchrun then stops the other ranks
                fix = "free some disk space" if e.errno == errno.ENOSPC else f"check that {os.path.dirname(self.path)} exists and is writable"
                raise UsageError(f"cannot append to {self.path} ({e.strerror or e}): {fix}, "
                                 "then rerun with --resume (if a checkpoint was saved) or --overwrite")
            self.lines += 1


# -----------------------------------------------------------------------------
# Several processes under torchrun: one data-parallel replica each

def setup_distributed(device):
    """Under torchrun (which sets RANK and WORLD_SIZE) join the process group: NCCL on GPUs, gloo on CPU."""
    if "RANK" not in os.environ:
        return 0, 1
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def average_gradients(model, world):
    """Every rank ends up with the mean of all ranks' gradients (each rank saw its own rows of the batch)."""
    if world == 1:
        return
    grads = [p.grad for p in model.parameters()]
    for g in grads:
        dist.all_reduce(g)  # a sum over ranks (with NCCL these calls queue on the GPU and return at once)
    torch._foreach_div_(grads, world)


def broadcast_weights(model, world):
    """Start every rank from rank 0's weights (they agree anyway: same seed, same growth)."""
    if world > 1:
        for t in model.state_dict().values():
            dist.broadcast(t, 0)


def check_replicas_agree(model, world):
    """A cheap guard at the end of each phase: every rank must hold the same weights."""
    if world > 1:
        sums = torch.stack([p.detach().float().sum() for p in model.parameters()])
        gathered = [torch.empty_like(sums) for _ in range(world)]
        dist.all_gather(gathered, sums)
        assert all(torch.equal(g, gathered[0]) for g in gathered), "the ranks' weights diverged"
