"""Cost model: how long a sequence, a piece and a micro-batch take on one rank, and what fits in its memory.

Pure Python, and nothing runs at import. The modules, each depending only on those above it:

- :mod:`.specs`: :class:`ModelSpec` and :class:`HardwareSpec`, the shapes and rates that set the
  cost, and their presets :data:`MODEL_PRESETS` and :data:`HARDWARE_PRESETS`;
- :mod:`.fit`: least-squares fits of ``a·s² + b·s + c`` (:func:`fit_coefficients`), and ByteScale's
  published per-layer times fitted that way (:func:`bytescale_fit`);
- :mod:`.model`: :class:`CostModel`, the time of whole sequences, ring pieces and micro-batches,
  the ring communication and the gradient all-reduce; its methods by concern in :mod:`.structure` (the
  layers), :mod:`.timing` (time terms), :mod:`.offload` (offloading's copies), :mod:`.volume` (bytes and
  messages per member), with :mod:`.segments` (a micro-batch's segments);
- :mod:`.calibration`: :func:`calibrate`, the coefficients fitted to timings of this machine
  (``benchmarks/calibrate.py`` does it for a real model);
- :mod:`.memory`: peak bytes per rank by kind (:func:`memory_breakdown`), and the ``tokens_per_rank``
  a memory budget allows.
"""

from ..sharding import FSDP_MODES
from .calibration import calibrate, predicted_time, relative_residuals
from .fit import (
    BYTESCALE_LAYER_MS,
    bytescale_fit,
    bytescale_hardware,
    fit_coefficients,
    hardware_from_coefficients,
    length_sums,
)
from .memory import (
    MemoryBreakdown,
    activation_bytes_per_token,
    device_layers,
    head_bytes,
    layer_activation_bytes_per_token,
    layer_input_bytes_per_token,
    logits_bytes_per_token,
    memory_breakdown,
    memory_per_rank,
    model_state_bytes,
    offloaded_layers,
    tokens_per_rank_for_memory,
)
from .model import CostModel, layer_type_times
from .specs import FLOAT32_BYTES, FWD_BWD, HARDWARE_PRESETS, MODEL_PRESETS, HardwareSpec, ModelSpec

__all__ = [
    "BYTESCALE_LAYER_MS",
    "FLOAT32_BYTES",
    "FSDP_MODES",
    "FWD_BWD",
    "HARDWARE_PRESETS",
    "MODEL_PRESETS",
    "CostModel",
    "HardwareSpec",
    "MemoryBreakdown",
    "ModelSpec",
    "activation_bytes_per_token",
    "bytescale_fit",
    "bytescale_hardware",
    "calibrate",
    "device_layers",
    "fit_coefficients",
    "hardware_from_coefficients",
    "head_bytes",
    "layer_activation_bytes_per_token",
    "layer_type_times",
    "layer_input_bytes_per_token",
    "length_sums",
    "logits_bytes_per_token",
    "memory_breakdown",
    "memory_per_rank",
    "model_state_bytes",
    "offloaded_layers",
    "predicted_time",
    "relative_residuals",
    "tokens_per_rank_for_memory",
]
