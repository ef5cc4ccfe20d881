"""One adapter per family of state-carrying layers: HDP's packed and split recurrence inside the family's module.

Adapters: Qwen3.5 (dense and MoE) and Qwen3-Next Gated DeltaNet; the Mamba-2 mixers of Nemotron-H, Bamba, Granite 4
hybrid, Falcon-H1 and Zamba 2 (one adapter: the same projections, Falcon-H1's multipliers read where present); the
gated short convolutions of LFM2, LFM2-MoE and LFM3.

transformers routes these layers' kernels through its hub-kernel decorators, which pick an implementation
when the model file is imported and keep only the keywords that implementation names, so HDP's metadata
cannot reach a kernel registered there. The layer's module is the seam instead: :func:`enable_hdp_mixers`
gives each such module of the model (this instance only: it becomes an instance of a same-named
subclass of its family class, :func:`_hdp_class`, which outlasts ``model.train()``/``eval()`` re-kernelizing and
``copy.deepcopy``; the family class is untouched) a forward that, when the call carries ``hdp_metadata``, runs
the module's own projections, gates and norm around HDP's convolution and recurrence
(:func:`~.split.gated_delta_net`), and otherwise runs the module's own forward (generation, evaluation on padded
batches).

An adapter knows one family's projections; before it is installed it checks the module's structure and
that, on a small random input, it reproduces the module's own forward (float32, one sample). A module
whose math differs (a future transformers release changing the layer) is refused, naming the module
and the transformers version, rather than trained wrongly.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...planning.layers import StateShape
from ..metadata import HDPAttentionMetadata
from .split import SPLITS, gated_delta_net, short_conv


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
class StateAdapter:
    family: str
    classes: tuple[str, ...]
    inputs: Callable | None
    attributes: tuple[str, ...]
    forward: Callable | None = None  # the layer's HDP forward; None: hdp_delta_net_forward with ``inputs``

    def run(self, module, hidden, meta, split):
        return (self.forward or hdp_delta_net_forward)(module, self, hidden, meta, split)


_COMMON = (
    "conv1d",
    "A_log",
    "dt_bias",
    "norm",
    "out_proj",
    "num_k_heads",
    "num_v_heads",
    "head_k_dim",
    "head_v_dim",
    "activation",
)
ADAPTERS = (
    StateAdapter(
        "qwen3_5",
        ("Qwen3_5GatedDeltaNet", "Qwen3_5MoeGatedDeltaNet"),
        _qwen3_5_inputs,
        _COMMON + ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),
    ),
    StateAdapter(
        "qwen3_next",
        ("Qwen3NextGatedDeltaNet",),
        _qwen3_next_inputs,
        _COMMON + ("in_proj_qkvz", "in_proj_ba", "fix_query_key_value_ordering"),
    ),
)
_MAMBA2 = (
    "in_proj",
    "conv1d",
    "A_log",
    "dt_bias",
    "D",
    "norm",
    "out_proj",
    "num_heads",
    "head_dim",
    "n_groups",
    "ssm_state_size",
    "intermediate_size",
    "conv_dim",
    "time_step_limit",
    "activation",
)


def _mamba2_forward(module, adapter, hidden, meta: HDPAttentionMetadata, split: str):
    """A Mamba-2 mixer (Nemotron-H, Bamba, Granite 4 hybrid, Falcon-H1, Zamba 2): ``in_proj`` to the gate ``z``, the
    convolution's ``x, B, C`` and ``dt``; ``dt = clamp(softplus(dt + dt_bias))``; the state space dual recurrence with
    ``A = -exp(A_log)`` per head and the skip ``D x``; the gated RMSNorm (or Falcon-H1's plain ``silu(z)`` gate
    without it) and ``out_proj``. Falcon-H1's ``ssm_in_multiplier`` and ``mup_vector`` scale the input and the
    projection."""
    if hidden.shape[0] != 1 or hidden.shape[1] != meta.num_tokens:
        raise ValueError(
            f"{type(module).__name__} (layer {module.layer_idx}) expects one packed row of "
            f"{meta.num_tokens} tokens, got hidden states of shape {tuple(hidden.shape)} ({meta.describe()})"
        )
    t = hidden.shape[1]
    h = hidden * module.ssm_in_multiplier if hasattr(module, "ssm_in_multiplier") else hidden
    projected = module.in_proj(h)
    if getattr(module, "mup_vector", None) is not None:
        projected = projected * module.mup_vector
    gate, xbc, dt = projected[0].split([module.intermediate_size, module.conv_dim, module.num_heads], dim=-1)
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    lo, hi = module.time_step_limit
    dt = torch.clamp(F.softplus(dt.to(dtype) + module.dt_bias.to(dtype)), min=lo, max=hi)
    g = -module.A_log.to(dtype).exp() * dt
    inner, bc = module.intermediate_size, module.n_groups * module.ssm_state_size
    # HDP's channel order: queries (C), keys (B), values (x)
    order = torch.cat(
        [torch.arange(inner + bc, inner + 2 * bc), torch.arange(inner, inner + bc), torch.arange(inner)]
    ).to(xbc.device)
    conv = module.conv1d
    bias = None if conv.bias is None else conv.bias[order]
    shape = StateShape(
        module.n_groups, module.ssm_state_size, module.num_heads, module.head_dim, conv.kernel_size[0], "ssd"
    )
    core = gated_delta_net(
        xbc[:, order],
        g,
        dt,
        conv.weight[order, 0, :],
        bias,
        shape,
        meta,
        meta.runtime.mesh,
        split,
        skip=module.D,
        rate=-module.A_log.to(dtype).exp(),
        activation=module.activation,
    )
    meta.runtime.calls += 1
    y = core.reshape(1, t, inner).to(hidden.dtype)
    if getattr(module, "mamba_rms_norm", True):
        y = module.norm(y, gate[None])
    else:
        y = y * F.silu(gate[None])
    return module.out_proj(y.to(hidden.dtype))


ADAPTERS = ADAPTERS + (
    StateAdapter(
        "mamba2",
        ("NemotronHMamba2Mixer", "BambaMixer", "GraniteMoeHybridMambaLayer", "FalconH1Mixer", "Zamba2MambaMixer"),
        None,
        _MAMBA2,
        _mamba2_forward,
    ),
)


def _short_conv_forward(module, adapter, hidden, meta: HDPAttentionMetadata, split: str):
    """LFM2's gated short convolution: ``in_proj`` to ``B, C, x``; ``y = C * conv(B * x)`` (depthwise, causal, no
    activation); ``out_proj``. Only the convolution mixes tokens: its halo is the one message of a split sample."""
    if hidden.shape[0] != 1 or hidden.shape[1] != meta.num_tokens:
        raise ValueError(
            f"{type(module).__name__} (layer {module.layer_idx}) expects one packed row of "
            f"{meta.num_tokens} tokens, got hidden states of shape {tuple(hidden.shape)} ({meta.describe()})"
        )
    b, c, x = module.in_proj(hidden)[0].chunk(3, dim=-1)
    conv = module.conv
    mixed = short_conv(b * x, conv.weight[:, 0, :], conv.bias, None, meta, meta.runtime.mesh)
    meta.runtime.calls += 1
    return module.out_proj((c * mixed.to(hidden.dtype))[None])


ADAPTERS = ADAPTERS + (
    StateAdapter(
        "short_conv",
        ("Lfm2ShortConv", "Lfm2MoeShortConv", "Lfm3ShortConv"),
        None,
        ("in_proj", "conv", "out_proj", "layer_idx"),
        _short_conv_forward,
    ),
)
ADAPTED_CLASSES = {c: a for a in ADAPTERS for c in a.classes}


def module_shape(module) -> StateShape:
    return StateShape(
        module.num_k_heads, module.head_k_dim, module.num_v_heads, module.head_v_dim, module.conv1d.kernel_size[0]
    )


def hdp_delta_net_forward(module, adapter: StateAdapter, hidden, meta: HDPAttentionMetadata, split: str):
    """The layer's output ``[1, T, hidden]`` for a packed micro-batch."""
    if hidden.shape[0] != 1 or hidden.shape[1] != meta.num_tokens:
        raise ValueError(
            f"{type(module).__name__} (layer {module.layer_idx}) expects one packed row of "
            f"{meta.num_tokens} tokens, got hidden states of shape {tuple(hidden.shape)} ({meta.describe()})"
        )
    x, z, b, a = adapter.inputs(module, hidden)
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    beta = b.sigmoid()
    g = -module.A_log.to(dtype).exp() * F.softplus(a.to(dtype) + module.dt_bias.to(dtype))
    conv = module.conv1d
    core = gated_delta_net(
        x,
        g,
        beta,
        conv.weight[:, 0, :],
        conv.bias,
        module_shape(module),
        meta,
        meta.runtime.mesh,
        split,
        activation=module.activation,
    )
    meta.runtime.calls += 1
    core = core.to(hidden.dtype).reshape(-1, module.head_v_dim)
    out = module.norm(core, z.reshape(-1, module.head_v_dim)).reshape(1, hidden.shape[1], -1)
    return module.out_proj(out)


def _original_forward(module):
    """The module's own forward: an instance-level forward it had when the adapter was installed (kept bound to
    this module), else its family class's forward."""
    own = module.__dict__.get("_hdp_original_forward")
    return own if own is not None else types.MethodType(module._hdp_base_class.forward, module)


def _hdp_forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    """The forward of a module with an installed adapter: HDP's for a call carrying ``hdp_metadata``, else the
    module's own (generation, evaluation on padded batches)."""
    meta = kwargs.get("hdp_metadata")
    if meta is None:
        return _original_forward(self)(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
    if cache is not None:
        raise ValueError(
            f"{type(self).__name__} (layer {self.layer_idx}): HDP training runs without a "
            "cache; call the model with use_cache=False"
        )
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            f"{type(self).__name__} (layer {self.layer_idx}): a packed HDP micro-batch has no "
            "padding, but an attention_mask with zeros was passed"
        )
    return self._hdp_adapter.run(self, hidden_states, meta, self._hdp_split)


def _keep_own_forward(module) -> bool:
    """The ``kernel_condition`` the ``kernels`` library reads: never replace the forward of a layer HDP runs."""
    return False


_HDP_CLASSES: dict[type, type] = {}


def _hdp_class(cls: type) -> type:
    """The family class with HDP's forward, one per family class, under the same name (so that everything that
    knows the layer by its class name, and ``isinstance``, still does).

    The forward lives on the class, not on the instance, because an instance-level forward does not last: with the
    ``kernels`` package installed, transformers kernelizes models at ``from_pretrained`` and again on every
    ``model.train()`` / ``model.eval()`` that changes its mode, and ``kernels`` then drops the instance-level
    forward of every layer with a hub-kernel name (``Qwen3_5GatedDeltaNet`` is one), or replaces it with a hub
    kernel that knows nothing of HDP's packing, silently. ``kernel_condition`` keeps ``kernels`` off these modules.
    ``copy.deepcopy`` keeps the class (the copy runs its own weights), and FSDP2's ``fully_shard`` subclasses it."""
    sub = _HDP_CLASSES.get(cls)
    if sub is None:
        sub = type(
            cls.__name__,
            (cls,),
            {
                "forward": _hdp_forward,
                "kernel_condition": staticmethod(_keep_own_forward),
                "_hdp_base_class": cls,
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__doc__": f"{cls.__name__} with HDP's packed and split recurrence (hf_hdp.attention.recurrent).",
            },
        )
        _HDP_CLASSES[cls] = sub
    return sub


def _install(module, adapter: StateAdapter, split: str) -> None:
    # an instance-level forward the module already had (a hub kernel's, a user's) stays its own forward
    module._hdp_original_forward = module.__dict__.pop("forward", None)
    module._hdp_adapter, module._hdp_split = adapter, split
    module.__class__ = _hdp_class(type(module))


def _uninstall(module) -> None:
    module.__class__ = module._hdp_base_class
    own = module.__dict__.pop("_hdp_original_forward", None)
    if own is not None:
        module.forward = own
    module._hdp_adapter = None


def _self_check(module, adapter: StateAdapter, name: str) -> None:
    """Refuse a module whose own forward the adapter does not reproduce (one float32 sample of 12 tokens)."""
    import transformers

    param = next(module.parameters())
    gen = torch.Generator().manual_seed(0)
    width = getattr(module, "hidden_size", None) or module.in_proj.in_features
    hidden = torch.randn(1, 12, width, generator=gen).to(param.device, param.dtype)
    meta = HDPAttentionMetadata(num_tokens=12, local_len=12, local_seqlens=(12,), rings=())
    with torch.no_grad():
        ours = adapter.run(module, hidden, meta, "auto").double()
        theirs = _original_forward(module)(hidden, cache=None, attention_mask=None).double()
    tol = 1e-3 if param.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if not torch.allclose(ours, theirs, rtol=tol, atol=tol * float(theirs.abs().max().clamp_min(1e-6))):
        raise UnsupportedLayerError(
            f"{name} ({type(module).__name__}): HDP's {adapter.family} adapter does not reproduce this module's "
            f"forward under transformers {transformers.__version__} (largest difference "
            f"{float((ours - theirs).abs().max()):.3g}); the layer's math has changed. Use a transformers version "
            "the adapter knows (see the README's tested versions) or train this model with the stock Trainer."
        )


_STATE_SUFFIXES = ("GatedDeltaNet", "Mamba2Mixer", "MambaMixer", "MambaLayer", "ShortConv")


def state_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """The model's state-carrying token mixers: modules an adapter knows, or whose class name says they are one
    (Gated DeltaNet, Mamba mixers, short convolutions), which are then refused."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if type(m).__name__ in ADAPTED_CLASSES or type(m).__name__.endswith(_STATE_SUFFIXES)
    ]


def enable_hdp_mixers(model, split: str = "auto") -> int:
    """Install the adapter on every state-carrying module of ``model`` (idempotent; ``split``: how a split sample's
    recurrence runs, see :func:`~.split.choose_split`); returns how many. Raises :class:`UnsupportedLayerError`
    for a module no adapter knows or reproduces."""
    if split not in SPLITS:
        raise ValueError(f"the split of state-carrying layers must be one of {SPLITS}, got {split!r}")
    count = 0
    for name, module in state_modules(model):
        if getattr(module, "_hdp_adapter", None) is not None:
            module._hdp_split = split
            count += 1
            continue
        adapter = ADAPTED_CLASSES.get(type(module).__name__)
        if adapter is None:
            raise UnsupportedLayerError(
                f"{name} is a {type(module).__name__}, a state-carrying layer of a family HDP has no adapter for "
                f"(known: {', '.join(sorted(ADAPTED_CLASSES))}); train this model with the stock Trainer."
            )
        missing = [a for a in adapter.attributes if not hasattr(module, a)]
        if missing:
            raise UnsupportedLayerError(
                f"{name} ({type(module).__name__}) lacks {missing}, which HDP's {adapter.family} adapter reads: this "
                "transformers version changed the layer. Use a tested transformers version (README) or the stock "
                "Trainer."
            )
        _install(module, adapter, split)
        try:
            _self_check(module, adapter, name)
        except Exception:
            _uninstall(module)
            raise
        count += 1
    return count
