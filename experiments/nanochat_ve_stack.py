"""
Part 4's reverse control for the value embeddings (experiments.md, Part 4, step 3). Stacking d1 -> d4 copies
the one layer's value embedding into all four layers, where the d4 baseline has nanochat's two (layers 1 and
3). This runs stack_gpt.py unchanged but for that: at growth the deep model keeps a copied table only where
nanochat's rule puts one, and the other copies (tables and their gates) are dropped. Layers 0 and 2 lose a
table they were trained with; the deep phase's val bpb at step 0 shows what that costs.

    python experiments/nanochat_ve_stack.py --depth 1 --stack-to 4 ...   # stack_gpt.py's flags

It patches two functions that stack_gpt.py has had since Part 3 (stacked_config, stack_model), so it runs
with the code of Part 3's runs (de6e2ad) and with today's.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import stack_gpt  # noqa: E402

copied_layout, copied_stack = stack_gpt.stacked_config, stack_gpt.stack_model  # stack_gpt.py's own


def nanochat_tables(config):
    """The config with value embeddings only in the layers that have one and that nanochat's rule gives one."""
    nanochat = stack_gpt.default_ve_layers(config.n_layer)
    return dataclasses.replace(config, ve_layers=tuple(j for j in config.ve_layers if j in nanochat))


def nanochat_layout(shallow_config, layer_map):
    """The deep model's config, for the plan, the FLOPs and the checkpoints."""
    return nanochat_tables(copied_layout(shallow_config, layer_map))


def stack_dropping_tables(shallow, *args, **kwargs):
    """G_stack as stack_gpt.py grows it (a table in every copy), then without the copies nanochat's rule drops."""
    stack_gpt.stacked_config = copied_layout  # stack_gpt.py's stack_model builds its deep model from this
    try:
        copied = copied_stack(shallow, *args, **kwargs)
    finally:
        stack_gpt.stacked_config = nanochat_layout
    table = shallow.wte.weight
    deep = stack_gpt.empty_model(nanochat_tables(copied.config), table.device.type, table.dtype)
    kept = deep.state_dict()
    dropped = [name for name in copied.state_dict() if name not in kept]
    assert all(".value_embed." in name or ".ve_gate." in name for name in dropped), dropped
    deep.load_state_dict({name: value for name, value in copied.state_dict().items() if name in kept})
    return deep


if __name__ == "__main__":
    stack_gpt.stacked_config, stack_gpt.stack_model = nanochat_layout, stack_dropping_tables
    stack_gpt.main(sys.argv[1:])
