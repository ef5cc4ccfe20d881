"""State-carrying token mixers (Gated DeltaNet, Mamba-2, short convolutions): exact packing and splitting over ranks.

- :mod:`.delta_rule`: the gated delta rule and Mamba-2's SSD in chunks, from any initial state, with transitions;
- :mod:`hf_hdp.planning.pieces`: where a split sample's rows live (pure, shared with the cost model);
- :mod:`.exchange`: the P2P messages of one phase as one autograd node;
- :mod:`.split`: a packed micro-batch's layer: local samples, head-parallel and state-scan segments, halos;
- :mod:`.fused`: the CUDA packages' varlen kernels for whole samples, where installed;
- :mod:`.adapters`: one adapter per family, installed on the model's modules.
"""

from .adapters import UnsupportedLayerError, enable_hdp_mixers, state_modules
from .split import SPLITS, choose_split, gated_delta_net, short_conv

__all__ = [
    "SPLITS",
    "UnsupportedLayerError",
    "choose_split",
    "state_modules",
    "enable_hdp_mixers",
    "gated_delta_net",
    "short_conv",
]
