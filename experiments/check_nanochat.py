"""
Check stack_gpt.py's model and optimizer against nanochat's (we used commit 4585551, 2026-02-18):

    python experiments/check_nanochat.py --nanochat PATH    # a nanochat checkout; it imports filelock

1. Loss: the same weights (random, not the zero-projection init) and tokens through both models,
   fp32 on the CPU. Expect identical losses (nanochat keeps its rotary tables in bf16; so do we).
2. Optimizer: the same weights and gradients, three Muon/AdamW steps in each, comparing every
   parameter's update. nanochat runs Polar Express in bf16, which alone moves its update by a few
   percent against fp32, so we run both in fp32 (ours with dtype fp32, nanochat's bf16 casts replaced) to
   compare the math itself.
   Expect differences of a few 1e-6 (up to ~3e-5); where a product update x weight lies within
   rounding of zero, the cautious weight-decay mask can flip, which shows as up to ~1e-3.
nanochat compiles its optimizer kernels; here they run as plain Python.
"""

import argparse
import sys
import types

import torch

p = argparse.ArgumentParser()
p.add_argument("--nanochat", required=True, help="path of a nanochat checkout")
args = p.parse_args()
sys.path[:0] = [args.nanochat, __file__.rsplit("/experiments/", 1)[0]]
import nanochat.optim as nanochat_optim  # noqa: E402
from nanochat.gpt import GPT as NanoGPT, GPTConfig as NanoConfig  # noqa: E402

import stack_gpt as sg  # noqa: E402

# run nanochat's compiled step functions as plain Python (compiling for each test shape would hit its recompile limit)
for name in ("muon_step_fused", "adamw_step_fused"):
    setattr(nanochat_optim, name, getattr(nanochat_optim, name)._torchdynamo_orig_callable)


def our_name(theirs):
    """nanochat's state-dict names -> ours (its value embeddings live in a model-level dict)."""
    if theirs.startswith("value_embeds."):
        return f"blocks.{theirs.split('.')[1]}.attn.value_embed.weight"
    return theirs.replace("transformer.h.", "blocks.").replace("transformer.wte", "wte")


class fp32_polar_express:
    """Within this block, .bfloat16() is a no-op, so both optimizers orthogonalize in fp32."""

    def __enter__(self):
        self.cast, torch.Tensor.bfloat16 = torch.Tensor.bfloat16, lambda t: t.float()

    def __exit__(self, *exc):
        torch.Tensor.bfloat16 = self.cast


torch.manual_seed(0)
for L, H, D, V, T in [(4, 2, 128, 1000, 64), (3, 4, 256, 4096, 32), (5, 1, 64, 333, 16)]:
    theirs = NanoGPT(NanoConfig(sequence_len=T, vocab_size=V, n_layer=L, n_head=H, n_kv_head=H, n_embd=D, window_pattern="L"))
    theirs.init_weights()
    with torch.no_grad():
        for param in theirs.parameters():
            param.add_(0.05 * torch.randn_like(param))
    ours = sg.GPT(sg.GPTConfig(n_layer=L, n_head=H, n_embd=D, vocab_size=V, sequence_len=T, ve_layers=sg.default_ve_layers(L)))
    ours.load_state_dict({our_name(k): v for k, v in theirs.state_dict().items()})
    idx, targets = torch.randint(0, V, (3, T)), torch.randint(0, V, (3, T))
    loss_theirs, loss_ours = theirs(idx, targets), ours(idx, targets)
    print(f"d{L} width {D} vocab {V}: loss nanochat {loss_theirs.item():.7f}, ours {loss_ours.item():.7f}, "
          f"relative difference {abs(loss_theirs.item() - loss_ours.item()) / loss_theirs.item():.1e}")
    loss_theirs.backward()
    loss_ours.backward()
    opt_theirs = theirs.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.2, scalar_lr=0.5)
    lrs = types.SimpleNamespace(matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.004, scalar_lr=0.5, lr_scale=1.0, dtype="fp32")
    opt_ours = sg.build_optimizer(ours, lrs, 2**19, 0.2)
    named_theirs, named_ours = dict(theirs.named_parameters()), dict(ours.named_parameters())
    for step in range(3):
        if step:  # fresh random gradients, the same for both
            for name, param in named_theirs.items():
                param.grad = 0.01 * torch.randn_like(param)
                named_ours[our_name(name)].grad = param.grad.clone()
        before = {name: param.detach().clone() for name, param in named_theirs.items()}
        with fp32_polar_express():
            opt_theirs.step()
            opt_ours.step()
        worst = max(((named_ours[our_name(n)] - before[n]) - (named_theirs[n] - before[n])).norm().item()
                    / max((named_theirs[n] - before[n]).norm().item(), 1e-12) for n in named_theirs)
        print(f"  step {step}: largest relative difference between the two updates of any parameter {worst:.1e}")
        with torch.no_grad():  # start the next step from identical weights again
            for name, param in named_theirs.items():
                named_ours[our_name(name)].copy_(param)
