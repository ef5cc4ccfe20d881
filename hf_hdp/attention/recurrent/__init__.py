"""State-carrying token mixers (Gated DeltaNet): exact packing and splitting over ranks.

- :mod:`.delta_rule`: the gated delta rule in chunks, from any initial state, with its transition;
- :mod:`.pieces`: where a split sample's rows live (pure);
- :mod:`.exchange`: the P2P messages of one phase as one autograd node;
- :mod:`.split`: a packed micro-batch's layer: local samples, head-parallel and state-scan segments;
- :mod:`.adapters`: one adapter per family, installed on the model's modules.
"""

from .adapters import UnsupportedLayerError, delta_net_modules, enable_hdp_mixers
from .split import SPLITS, DeltaNetShape, choose_split, gated_delta_net

__all__ = ["SPLITS", "DeltaNetShape", "UnsupportedLayerError", "choose_split", "delta_net_modules",
           "enable_hdp_mixers", "gated_delta_net"]
