"""One adapter per family of Gated DeltaNet layers: HDP's packed and split recurrence inside the family's module.

transformers routes these layers' kernels through its hub-kernel decorators, which pick an implementation
when the model file is imported and keep only the keywords that implementation names, so HDP's metadata
cannot reach a kernel registered there. The layer's module is the seam instead: :func:`enable_hdp_mixers`
gives each Gated DeltaNet module of the model (this instance only; the class is untouched) a forward that,
when the call carries ``hdp_metadata``, runs the module's own projections, gates and norm around HDP's
convolution and recurrence (:func:`~.split.gated_delta_net`), and otherwise runs the module's own forward
(generation, evaluation on padded batches).

An adapter knows one family's projections; before it is installed it checks the module's structure and
that, on a small random input, it reproduces the module's own forward (float32, one sample). A module
whose math differs (a future transformers release changing the layer) is refused, naming the module
and the transformers version, rather than trained wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..metadata import HDPAttentionMetadata
from .split import SPLITS, DeltaNetShape, gated_delta_net


class UnsupportedLayerError(ValueError):
    """A state-carrying layer HDP has no adapter for, or whose forward the adapter does not reproduce."""


def _qwen3_5_inputs(module, hidden):
    """Qwen3.5 (dense and MoE): separate q/k/v, z, b and a projections."""
    t = hidden.shape[1]
    x = module.in_proj_qkv(hidden)[0]
    z = module.in_proj_z(hidden)[0].reshape(t, -1, module.head_v_dim)
    return x, z, module.in_proj_b(hidden)[0], module.in_proj_a(hidden)[0]


def _qwen3_next_inputs(module, hidden):
    """Qwen3-Next: fused qkvz and ba projections, grouped per key head (the module's own reordering)."""
    q, k, v, z, b, a = module.fix_query_key_value_ordering(module.in_proj_qkvz(hidden), module.in_proj_ba(hidden))
    x = torch.cat([y.reshape(1, y.shape[1], -1) for y in (q, k, v)], dim=-1)[0]
    return x, z[0], b[0], a[0]


@dataclass(frozen=True)
class DeltaNetAdapter:
    family: str
    classes: tuple[str, ...]
    inputs: Callable
    attributes: tuple[str, ...]


_COMMON = ("conv1d", "A_log", "dt_bias", "norm", "out_proj", "num_k_heads", "num_v_heads", "head_k_dim",
           "head_v_dim", "activation")
ADAPTERS = (
    DeltaNetAdapter("qwen3_5", ("Qwen3_5GatedDeltaNet", "Qwen3_5MoeGatedDeltaNet"), _qwen3_5_inputs,
                    _COMMON + ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")),
    DeltaNetAdapter("qwen3_next", ("Qwen3NextGatedDeltaNet",), _qwen3_next_inputs,
                    _COMMON + ("in_proj_qkvz", "in_proj_ba", "fix_query_key_value_ordering")),
)
DELTA_NET_CLASSES = {c: a for a in ADAPTERS for c in a.classes}


def module_shape(module) -> DeltaNetShape:
    return DeltaNetShape(module.num_k_heads, module.head_k_dim, module.num_v_heads, module.head_v_dim,
                         module.conv1d.kernel_size[0], module.activation)


def hdp_delta_net_forward(module, adapter: DeltaNetAdapter, hidden, meta: HDPAttentionMetadata, split: str):
    """The layer's output ``[1, T, hidden]`` for a packed micro-batch."""
    if hidden.shape[0] != 1 or hidden.shape[1] != meta.num_tokens:
        raise ValueError(f"{type(module).__name__} (layer {module.layer_idx}) expects one packed row of "
                         f"{meta.num_tokens} tokens, got hidden states of shape {tuple(hidden.shape)} ({meta.describe()})")
    x, z, b, a = adapter.inputs(module, hidden)
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    beta = b.sigmoid()
    g = -module.A_log.to(dtype).exp() * F.softplus(a.to(dtype) + module.dt_bias.to(dtype))
    conv = module.conv1d
    core = gated_delta_net(x, g, beta, conv.weight[:, 0, :], conv.bias, module_shape(module), meta,
                           meta.runtime.mesh, split)
    meta.runtime.calls += 1
    core = core.to(hidden.dtype).reshape(-1, module.head_v_dim)
    out = module.norm(core, z.reshape(-1, module.head_v_dim)).reshape(1, hidden.shape[1], -1)
    return module.out_proj(out)


def _install(module, adapter: DeltaNetAdapter, split: str) -> None:
    original = module.forward

    def forward(hidden_states, cache=None, attention_mask=None, **kwargs):
        meta = kwargs.get("hdp_metadata")
        if meta is None:
            return original(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        if cache is not None:
            raise ValueError(f"{type(module).__name__} (layer {module.layer_idx}): HDP training runs without a "
                             "cache; call the model with use_cache=False")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(f"{type(module).__name__} (layer {module.layer_idx}): a packed HDP micro-batch has no "
                             "padding, but an attention_mask with zeros was passed")
        return hdp_delta_net_forward(module, adapter, hidden_states, meta, module._hdp_split)

    module.forward = forward
    module._hdp_adapter, module._hdp_split = adapter, split


def _self_check(module, adapter: DeltaNetAdapter, name: str) -> None:
    """Refuse a module whose own forward the adapter does not reproduce (one float32 sample of 12 tokens)."""
    import transformers

    param = next(module.parameters())
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 12, module.hidden_size, generator=gen).to(param.device, param.dtype)
    meta = HDPAttentionMetadata(num_tokens=12, local_len=12, local_seqlens=(12,), rings=())
    with torch.no_grad():
        ours = hdp_delta_net_forward(module, adapter, hidden, meta, "auto").double()
        theirs = module.forward.__wrapped_original__(hidden, cache=None, attention_mask=None).double()
    tol = 1e-3 if param.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if not torch.allclose(ours, theirs, rtol=tol, atol=tol * float(theirs.abs().max().clamp_min(1e-6))):
        raise UnsupportedLayerError(
            f"{name} ({type(module).__name__}): HDP's {adapter.family} adapter does not reproduce this module's "
            f"forward under transformers {transformers.__version__} (largest difference "
            f"{float((ours - theirs).abs().max()):.3g}); the layer's math has changed. Use a transformers version "
            "the adapter knows (see the README's tested versions) or train this model with the stock Trainer."
        )


def delta_net_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """The model's modules that look like Gated DeltaNet layers (by class name)."""
    return [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("GatedDeltaNet")]


def enable_hdp_mixers(model, split: str = "auto") -> int:
    """Install the adapter on every Gated DeltaNet module of ``model`` (idempotent; ``split``: how a split sample's
    recurrence runs, see :func:`~.split.choose_split`); returns how many. Raises :class:`UnsupportedLayerError`
    for a module no adapter knows or reproduces."""
    if split not in SPLITS:
        raise ValueError(f"the split of state-carrying layers must be one of {SPLITS}, got {split!r}")
    count = 0
    for name, module in delta_net_modules(model):
        if getattr(module, "_hdp_adapter", None) is not None:
            module._hdp_split = split
            count += 1
            continue
        adapter = DELTA_NET_CLASSES.get(type(module).__name__)
        if adapter is None:
            raise UnsupportedLayerError(
                f"{name} is a {type(module).__name__}, a Gated DeltaNet layer of a family HDP has no adapter for "
                f"(known: {', '.join(sorted(DELTA_NET_CLASSES))}); train this model with the stock Trainer."
            )
        missing = [a for a in adapter.attributes if not hasattr(module, a)]
        if missing:
            raise UnsupportedLayerError(
                f"{name} ({type(module).__name__}) lacks {missing}, which HDP's {adapter.family} adapter reads: this "
                "transformers version changed the layer. Use a tested transformers version (README) or the stock "
                "Trainer."
            )
        original = module.forward
        _install(module, adapter, split)
        module.forward.__wrapped_original__ = original
        try:
            _self_check(module, adapter, name)
        except Exception:
            module.forward = original
            module._hdp_adapter = None
            raise
        count += 1
    return count
