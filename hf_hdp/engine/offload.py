"""Selective activation offloading (ByteScale, arXiv 2502.21231): ``HDPConfig(offload_ratio=...)``.

During a training micro-batch's forward, the activations that some decoder layers save for backward
are copied to host memory and their device memory is released; backward brings them back. A rank
then holds fewer layers' activations, so the same memory holds more tokens: ``tokens_per_rank="auto"``
(:func:`~hf_hdp.planning.cost.memory_breakdown` with ``offload_ratio``) gives a larger ``C``, and a
long sample needs ``ceil(s / C)``, fewer, ranks.

**What a micro-batch offloads: whole decoder layers, the first ``n``** (ByteScale offloads per layer;
the first layers' activations wait longest for their backward). Every tensor autograd saves while
one of the layers ``0 .. n-1`` runs (between its forward pre-hook and its forward hook: norms,
projections, the attention kernel or ring, the MLP) goes to the host, except

- parameters, views of parameters (a tensor sharing a parameter's storage), and under autocast a
  weight's cast copy (a tensor in the autocast dtype with the shape of a weight of another dtype):
  they are weights, on the device anyway;
- tensors under :data:`MIN_OFFLOAD_BYTES` (scalars, ``cu_seqlens``, small index tensors), tensors
  not on the model's device, tensor subclasses and non-strided (sparse) tensors.

With gradient checkpointing a layer saves only its input (``torch.utils.checkpoint`` saves it through
autograd, inside the layer's call), so that is what goes; the recomputed working set lives only
during the layer's backward and stays. The embedding, the final norm, the LM head and the loss are
never offloaded. A tensor saved twice (the same tensor, unchanged) is copied once.

**How many layers** (``L`` decoder layers):

- ``offload_ratio = r``: ``n = ceil(r · L)`` in *every* training micro-batch. Memory has to hold for
  every micro-batch of up to ``C`` tokens, and a micro-batch packed of short samples reaches ``C``
  tokens as a piece of a long one does, so ``memory_breakdown`` (and with it
  ``tokens_per_rank="auto"``) counts the saving for every micro-batch.
- ``offload_ratio = "auto"``: per micro-batch, ByteScale's rule under the trainer's
  :class:`~hf_hdp.planning.cost.CostModel`: ``r`` = the largest fraction whose copy to the host
  takes no longer than the micro-batch's forward attention
  (:meth:`~hf_hdp.planning.cost.CostModel.hidden_offload_ratio`; a piece of a sequence split over
  ``k`` ranks counts ``1/k`` of that sequence's attention), capped at 1, and ``n = floor(r · L)``
  (rounded down: the copy stays hidden). Pieces of long samples offload the most, micro-batches of
  short samples (little attention per token) little or nothing. The copy is free of time but not
  promised: ``tokens_per_rank="auto"`` counts no saving for ``"auto"``.

**Copies.** On CUDA: into pinned host memory on a side stream, which first waits for the compute
that made the tensor; the tensor's memory returns to the allocator only when its copy is done
(``record_stream``), so the copy overlaps the layers that follow. In backward, the first time a
tensor of layer ``l`` is needed, all of layer ``l``'s tensors are copied back (the compute stream
waits for them) and layer ``l - 1``'s are prefetched on the side stream behind layer ``l``'s backward:
at most two offloaded layers' activations are on the device at a time
(:data:`~hf_hdp.planning.cost.memory.OFFLOAD_PREFETCH_LAYERS`). On a CPU device the "host copy"
is a real copy into separate host tensors and back: it saves nothing and costs time, but it is exact
and moves exactly the bytes the rule selects (what the tests count). Gradients are bit-for-bit
those without offloading: the copies are exact.

:class:`OffloadStats` counts the bytes moved each way; HDPTrainer logs ``hdp/offloaded_bytes``
(this rank's bytes moved to the host per step, :mod:`hf_hdp.trainer.stats`).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..models import UnsupportedModelError, hdp_base_model
from ..planning.cost import CostModel, offloaded_layers
from ..planning.cost.memory import check_offload_ratio

AUTO = "auto"
MIN_OFFLOAD_BYTES = 1024


@dataclass
class OffloadStats:
    """What offloading moved on this rank, summed since the trainer was built."""

    bytes_to_host: int = 0
    bytes_from_host: int = 0
    tensors: int = 0  # tensors copied to the host
    micro_batches: int = 0  # training micro-batches that offloaded at least one layer
    layers: int = 0  # decoder layers offloaded, summed over micro-batches

    def copy(self) -> OffloadStats:
        return replace(self)


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of ``model`` (a PEFT wrapper's LM included): its ``nn.ModuleList`` of
    ``config.num_hidden_layers`` modules, the first in module order (``model.layers`` for Llama-style LMs)."""
    base = hdp_base_model(model)
    config = base.config
    n = getattr(config, "num_hidden_layers", None) or getattr(
        getattr(config, "text_config", None), "num_hidden_layers", None
    )
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and n and len(module) == n:
            return module
    raise UnsupportedModelError(
        f"{type(base).__name__}: no list of its {n} decoder layers (an nn.ModuleList of config.num_hidden_layers "
        "modules) was found, so activation offloading cannot tell its layers apart. Use offload_ratio=0."
    )


def is_checkpointing(model) -> bool:
    """Whether ``model``'s layers are recomputed in backward (transformers' activation / gradient checkpointing)."""
    base = hdp_base_model(model)
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # the newer name first
        if isinstance(getattr(type(base), name, None), property):
            return bool(getattr(base, name))
    return False


def run_recomputes_layers(args, model) -> bool:
    """Whether a run recomputes its layers in backward: ``TrainingArguments.activation_checkpointing`` /
    ``gradient_checkpointing`` (Trainer turns it on when training starts), or a model that has it on."""
    return bool(
        getattr(args, "activation_checkpointing", None)
        or getattr(args, "gradient_checkpointing", False)
        or is_checkpointing(model)
    )


def micro_batch_attention_time(cost: CostModel, meta) -> float:
    """The attention part of a packed micro-batch's time (forward and backward, all layers) under ``cost``,
    from its :class:`~hf_hdp.attention.metadata.HDPAttentionMetadata`: each whole local sequence's
    :meth:`~hf_hdp.planning.cost.CostModel.attention_time`, and ``1/k`` of it for each piece of a sequence
    split over ``k`` ranks. Equals :meth:`CostModel.micro_batch_attention_time` of the plan's micro-batch."""
    total = sum(cost.attention_time(s) for s in meta.local_seqlens)
    for seg in meta.rings:
        total += sum(cost.attention_time(length) for length in seg.doc_lengths()) / seg.k
    return total


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses without a plain storage
        return None


class _Offloaded:
    """One saved tensor's host copy (``host``), and after it came back its device copy (``restored``)."""

    __slots__ = ("host", "restored", "ready", "layer", "nbytes", "__weakref__")

    def __init__(self, host: torch.Tensor, layer: int, nbytes: int):
        self.host: torch.Tensor | None = host
        self.restored: torch.Tensor | None = None
        self.ready = None  # CUDA event: the copy back is done
        self.layer = layer
        self.nbytes = nbytes


class _Session:
    """The offloading of one micro-batch's forward: layer hooks, and the saved-tensor hooks' pack and unpack.

    Autograd keeps the unpack hook (and through it this object) with every saved tensor it packed, until
    the tensor's backward has run; this object holds its records only weakly, so a layer's restored
    tensors are freed as soon as autograd has used them, as the original tensors would have been.
    """

    def __init__(self, offloader: ActivationOffloader, model, layers, device: torch.device):
        self.stats = offloader.stats
        self.min_bytes = offloader.min_bytes
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = offloader._side_stream(device) if self.cuda else None
        self.current: int | None = None
        self.records: list[list[weakref.ref]] = [[] for _ in layers]
        self.seen: dict[int, tuple] = {}  # id(tensor) -> (weakref to it, its version, weakref to its record)
        self.skip_storages = {k for k in map(_storage_key, model.parameters()) if k is not None}
        self.weight_shapes: set[tuple[int, ...]] = set()
        self.autocast_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        self.handles = []
        for i, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(self._enter_hook(i)))
            self.handles.append(layer.register_forward_hook(self._leave, always_call=True))

    def _enter_hook(self, index: int):
        def enter(module, args):
            self.current = index
            for p in module.parameters():  # the layer's parameters as they are now (FSDP's gathered ones too)
                key = _storage_key(p)
                if key is not None:
                    self.skip_storages.add(key)
                if self.autocast_dtype is not None and p.is_floating_point() and p.dtype != self.autocast_dtype:
                    self.weight_shapes.add(tuple(p.shape))

        return enter

    def _leave(self, module, args, output):
        self.current = None

    def close(self) -> None:
        """The forward is over: no more packing; drop the hooks and the strong state."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.seen.clear()
        self.current = None

    # --------------------------------------------------------------- pack
    def offloadable(self, t: torch.Tensor) -> bool:
        """The rule of the module docstring, for one saved tensor of an offloaded layer."""
        if type(t) is not torch.Tensor or t.layout != torch.strided or t.device != self.device:
            return False  # parameters (nn.Parameter), subclasses, sparse tensors, other devices
        if t.numel() * t.element_size() < self.min_bytes:
            return False
        if _storage_key(t) in self.skip_storages:
            return False  # a view of a parameter
        if self.autocast_dtype is not None and t.dtype == self.autocast_dtype and tuple(t.shape) in self.weight_shapes:
            return False  # autocast's cast copy of a weight
        return True

    def pack(self, t: torch.Tensor):
        layer = self.current
        if layer is None or not self.offloadable(t):
            return t
        seen = self.seen.get(id(t))
        if seen is not None:
            ref, version, record_ref = seen
            record = record_ref()
            if ref() is t and version == t._version and record is not None:
                return record
        record = self._to_host(t, layer)
        self.seen[id(t)] = (weakref.ref(t), t._version, weakref.ref(record))
        self.records[layer].append(weakref.ref(record))
        return record

    def _to_host(self, t: torch.Tensor, layer: int) -> _Offloaded:
        nbytes = t.numel() * t.element_size()
        with torch.no_grad():
            source = t.detach()
            if self.cuda:
                self.stream.wait_stream(torch.cuda.current_stream(self.device))  # t is complete on the side stream
                with torch.cuda.stream(self.stream):
                    host = torch.empty(source.size(), dtype=source.dtype, pin_memory=True)
                    host.copy_(source, non_blocking=True)
                t.record_stream(self.stream)  # t's memory is not reused before the copy is done
            else:
                host = torch.empty(source.size(), dtype=source.dtype)
                host.copy_(source)
        self.stats.bytes_to_host += nbytes
        self.stats.tensors += 1
        return _Offloaded(host, layer, nbytes)

    # ------------------------------------------------------------- unpack
    def unpack(self, packed):
        if not isinstance(packed, _Offloaded):
            return packed
        if packed.restored is None:
            self._restore_layer(packed.layer)
            if packed.layer > 0:
                self._restore_layer(packed.layer - 1)  # prefetch: the layer whose backward comes next
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(packed.ready)
            packed.restored.record_stream(current)  # used on the compute stream: freed only after that use
        return packed.restored

    def _restore_layer(self, layer: int) -> None:
        for ref in self.records[layer]:
            record = ref()
            if record is not None and record.restored is None:
                self._restore(record)

    def _restore(self, record: _Offloaded) -> None:
        host = record.host
        with torch.no_grad():
            if self.cuda:
                with torch.cuda.stream(self.stream):  # behind the copy to the host, on the same stream
                    restored = torch.empty(host.size(), dtype=host.dtype, device=self.device)
                    restored.copy_(host, non_blocking=True)
                    record.ready = torch.cuda.Event()
                    record.ready.record(self.stream)
            else:
                restored = torch.empty(host.size(), dtype=host.dtype)
                restored.copy_(host)
        record.restored = restored
        record.host = None  # pinned blocks go back to torch's host allocator once the copy is done
        self.stats.bytes_from_host += record.nbytes


class ActivationOffloader:
    """Offloads the saved activations of a micro-batch's first decoder layers (see the module docstring).

    ``ratio``: a number in [0, 1] (``ceil(ratio · layers)`` layers in every micro-batch) or ``"auto"``
    (per micro-batch, from ``cost_model``: a :class:`~hf_hdp.planning.cost.CostModel`, or a callable
    returning one, so that HDPTrainer's offloader always prices with the trainer's current cost
    model). ``min_bytes``: smaller saved tensors stay on the device.

    ``with offloader.offloading(model, meta, device): loss = ...`` around a micro-batch's forward
    (:func:`~hf_hdp.engine.step.forward_micro_batch` does it with ``offload=``); the backward after
    it brings the tensors back.
    """

    def __init__(self, ratio: float | str, *, cost_model=None, min_bytes: int = MIN_OFFLOAD_BYTES):
        if ratio != AUTO:
            ratio = check_offload_ratio(ratio)
        elif cost_model is None:
            raise ValueError(
                "offload_ratio='auto' needs a cost model (cost_model=) to price the copies against the "
                "attention compute"
            )
        if isinstance(min_bytes, bool) or not isinstance(min_bytes, int) or min_bytes < 0:
            raise ValueError(f"min_bytes must be a non-negative integer, got {min_bytes!r}")
        self.ratio = ratio
        self._cost_model = cost_model
        self.min_bytes = min_bytes
        self.stats = OffloadStats()
        self.last_layers: int | None = None  # layers the last micro-batch offloaded
        self._streams: dict = {}

    @classmethod
    def from_config(cls, config, cost_model=None) -> ActivationOffloader | None:
        """The offloader of an :class:`~hf_hdp.HDPConfig`, or None when ``offload_ratio`` is 0 (off)."""
        if config.offload_ratio == 0:
            return None
        return cls(config.offload_ratio, cost_model=cost_model)

    @property
    def cost_model(self) -> CostModel | None:
        cost = self._cost_model
        return cost() if callable(cost) else cost

    def micro_batch_ratio(self, meta, checkpointing: bool = False) -> float:
        """The fraction of the layers a micro-batch offloads, before whole layers are counted: the fixed
        ratio, or with ``"auto"`` :meth:`CostModel.hidden_offload_ratio` of its tokens and attention time."""
        if self.ratio != AUTO:
            return self.ratio
        cost = self.cost_model
        return cost.hidden_offload_ratio(meta.num_tokens, micro_batch_attention_time(cost, meta), checkpointing)

    def layers_to_offload(self, meta, num_layers: int, checkpointing: bool = False) -> int:
        """Decoder layers a micro-batch offloads: ``ceil(r · L)`` for a fixed ``r``, ``floor(r · L)`` with "auto"."""
        r = self.micro_batch_ratio(meta, checkpointing)
        if self.ratio != AUTO:
            return offloaded_layers(r, num_layers)
        return min(num_layers, math.floor(round(r * num_layers, 9)))

    @contextlib.contextmanager
    def offloading(self, model, meta, device):
        """Offload this micro-batch's selected layers while the block runs (its forward)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.type == "cpu":
            device = torch.device("cpu")  # distributed CPU runs name it "cpu:0"; tensors say "cpu"
        layers = decoder_layers(model)
        checkpointing = is_checkpointing(model)
        n = self.layers_to_offload(meta, len(layers), checkpointing)
        self.last_layers = n
        if n == 0 or not torch.is_grad_enabled():
            yield
            return
        self.stats.micro_batches += 1
        self.stats.layers += n
        session = _Session(self, model, list(layers)[:n], device)
        try:
            with torch.autograd.graph.saved_tensors_hooks(session.pack, session.unpack):
                yield
        finally:
            session.close()

    def _side_stream(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]
