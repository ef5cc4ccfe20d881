"""Which transformers model families HDP trains correctly, and the checks that refuse the rest.

HDP packs several samples into one row and splits long samples over ranks. Its ``"hdp"`` attention
(:mod:`hf_hdp.attention.interface`) keeps samples apart and runs causal attention within each
sample, so a model trains exactly as on one device when every part of it that mixes tokens is that
attention, and everything else works token by token (norms, MLPs, per-token MoE routing, RoPE from
global ``position_ids``).

The attention implements, locally, in ring pieces and in head-parallel pieces alike:

- **sliding windows** of any length (``sliding_window`` on the layers ``layer_types`` or
  ``use_sliding_window`` make slide): a window is counted in positions of the sample, so a split
  sample's window runs across rank boundaries, and ring pieces exchange only the rows a window
  reaches (:mod:`hf_hdp.planning.reach`);
- **chunked attention** (Llama 4's ``attention_chunk_size``), chunks counted from each sample's first
  token;
- **attention logit soft-capping** (Gemma 2's ``attn_logit_softcapping``: ``c·tanh(s/c)`` on the
  scaled scores, before the mask); the *final* logit soft-capping works on each token's logits;
- **attention sinks** (gpt-oss's ``sinks``, passed to the attention as ``s_aux``): one learned logit
  per head joining each row's softmax denominator.

:func:`check_model_supported` records those and inspects the config and the attention modules for
the features that break HDP's assumptions, raising :class:`UnsupportedModelError` naming the model,
the layer feature, why it breaks and what to do instead. It never lets a model train silently wrong:

- **non-causal attention** (encoder-decoder models, bidirectional attention, encoders): HDP's kernels
  are causal; supporting it would take bidirectional kernels per sample (and, for encoder-decoders,
  cross-attention with its own packing of the encoder side);
- **attention dropout** > 0: HDP's kernels have no dropout, and a dropout mask that matches one
  process's would need the same random stream per (sample, head, query, key) on every rank; other
  dropouts are per token and fine;
- **layers that are not attention** but mix tokens: linear attention (Gated DeltaNet in qwen3_next,
  lightning attention in minimax), Mamba / state-space layers, short convolutions (lfm2). They carry
  a recurrent state (or a convolution window) along the sequence: packing would need the state reset
  at every sample boundary, and splitting a sample would need the state (or the convolution's last
  ``kernel - 1`` rows, a halo) passed from rank to rank in order, a scan over the group. That is a
  different kernel family from attention's, not implemented;
- **RoPE whose frequencies depend on the batch** (``dynamic`` NTK, ``longrope``) once a sample is
  longer than the original context: transformers picks the frequencies from the largest position in
  the forward's ``position_ids``, which under HDP is the longest sample part of the packed row (other
  samples' and other ranks' lengths). Supporting it would need each token's frequencies chosen from
  its own sample's full length, passed per token into the rotary embedding;
- **MoE router auxiliary loss** (``output_router_logits=True``): the load-balancing loss is a
  product of batch-wide averages, not a sum over tokens, so it does not split over micro-batches
  and ranks; it would need the per-expert token counts and router probabilities all-reduced over the
  step before the product. HDP trains the token-level LM loss only, which is also what transformers
  trains with ``output_router_logits=False`` (the default). MoE routing itself is per token (top-k
  over each token's router logits, no expert capacity), so packing does not change it; an **expert
  capacity** would (tokens dropped depend on the batch) and is refused;
- **Llama 4's attention temperature tuning** (``attn_temperature_tuning=True``, on its NoPE layers):
  it scales each query by ``1 + attn_scale·log1p(floor((i + 1) / floor_scale))`` with ``i`` the row
  index of the forward's input (``torch.arange`` of the row), not ``position_ids``, so packing and
  splitting change the scale of every token past ``floor_scale - 1`` rows. Supporting it would need
  transformers to take ``i`` from ``position_ids``;
- **multimodal** models (vision/audio towers, M-RoPE position ids): HDP packs text tokens with 1-D
  positions only; it would need the image/audio tokens placed and the 3-D positions packed with them.

:data:`SUPPORTED_FAMILIES` records what ``tests/test_model_families.py`` verified: 4 CPU ranks
against one process, loss and every gradient, float64. A family not listed there is allowed when
every check passes, with a warning that its equivalence has not been verified; a family listed as
refused is refused whatever its config says.
"""

from .checks import ModelSupport, check_model_supported
from .families import SUPPORTED_FAMILIES, FamilySupport, UnsupportedModelError
from .inspection import hdp_base_model, model_heads, require_hdp_routable, routes_attention

__all__ = [
    "FamilySupport",
    "ModelSupport",
    "SUPPORTED_FAMILIES",
    "UnsupportedModelError",
    "check_model_supported",
    "hdp_base_model",
    "model_heads",
    "require_hdp_routable",
    "routes_attention",
]
