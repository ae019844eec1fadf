"""
Part 3's control for the value embeddings (experiments.md, Part 3, step 3). Stacking d1 -> d4 copies the one
layer's value embedding into all four layers, where a d4 baseline has nanochat's two (every other layer). This
runs stack_gpt.py unchanged but for that rule: every layer of every model gets a value embedding, so a d4
baseline has the four tables of the stacked model.

    python experiments/every_layer_ve.py --depth 4 ...   # stack_gpt.py's flags
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import stack_gpt  # noqa: E402

stack_gpt.default_ve_layers = lambda n_layer: tuple(range(n_layer))
stack_gpt.main(sys.argv[1:])
