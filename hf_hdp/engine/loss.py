"""Chunked LM head and cross-entropy: the token loss without the full ``[T, vocab]`` logits.

At long context the logits are the largest tensor of a step: ``[C, vocab]`` in float32 is 10 GB at
C = 16K tokens and a 152K vocabulary. :func:`chunked_cross_entropy` computes the summed token
cross-entropy of the final hidden states ``[T, H]`` against the LM head weight ``[V, H]`` in chunks of
``chunk_tokens`` rows. Forward keeps, per row, only the log-sum-exp of its logits; backward recomputes
each chunk's logits and softmax and adds the chunk's share of dHidden, dWeight and dBias. Peak memory
is ``O(chunk_tokens x V)``, plus a float32 ``[V, H]`` accumulator of dWeight when the weight is
bf16/fp16 and trains (the model's own head keeps its ``[T, V]`` logits and their gradient instead).

Precision follows the model's own head and today's loss: the head's matmul runs in the inputs' dtype
(after bf16/fp16 autocast, as ``nn.Linear`` under autocast does), the logits are upcast to float32
when that dtype is bf16/fp16 (float32 and float64 stay as they are) and the logit transform, the
log-sum-exp and the softmax run in that precision. Rows labelled ``ignore_index`` (-100) are never
computed.

:func:`chunked_head` decides per model whether the chunked path reproduces the model's own logits;
``hdp_loss(..., chunk_tokens=n)`` (:mod:`hf_hdp.engine.step`) falls back to the full logits for the
rest.

Other token losses (TRL's DFT, ...) share the hook and the chunking: :meth:`ChunkedHead.map_chunks`
runs the model, takes the final hidden states at the head, and calls a ``per_chunk(h, weight, bias,
t)`` function on every chunk of labelled rows (:func:`map_head_chunks`); it computes the chunk's
logits with :meth:`ChunkedHead.logits` / :func:`head_logits` and returns its terms (a summed loss,
metrics), and activation checkpointing recomputes those logits in backward. :meth:`ChunkedHead.capture`
is the hook alone: any function of the ``[T, H]`` hidden states and the head's weight and bias.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from ..collators.documents import IGNORE_INDEX
from ..models import UnsupportedModelError, hdp_base_model

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to its head's output ``x`` before the softmax, in this order:
    ``x * scale``, then ``/ divisor``, then ``softcap * tanh(. / softcap)`` when ``softcap`` is set."""

    scale: float = 1.0
    divisor: float = 1.0
    softcap: float | None = None

    def apply_(self, x: torch.Tensor) -> torch.Tensor:
        """Transform ``x`` in place (the same operations, in the same order, as the model's forward)."""
        if self.scale != 1.0:
            x.mul_(self.scale)
        if self.divisor != 1.0:
            x.div_(self.divisor)
        if self.softcap is not None:
            x.div_(self.softcap).tanh_().mul_(self.softcap)
        return x

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The same operations out of place: differentiable (``tanh_`` keeps its output for backward, which
        the in-place ``mul_`` after it would overwrite)."""
        if self.scale != 1.0:
            x = x * self.scale
        if self.divisor != 1.0:
            x = x / self.divisor
        if self.softcap is not None:
            x = torch.tanh(x / self.softcap) * self.softcap
        return x


# ---------------------------------------------------------------------------- per-chunk helpers
def _chunk_rows(hidden, rows, start, end):
    """Rows ``start:end`` of the labelled rows: a view when every row is labelled (``rows`` None)."""
    return hidden[start:end] if rows is None else hidden.index_select(0, rows[start:end])


def head_logits(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, transform: LogitTransform | None = None
) -> torch.Tensor:
    """The transformed logits of rows ``h`` ``[n, H]``, as the model's head and loss see them: the head's
    matmul in the inputs' dtype, then float32 for bf16/fp16 inputs (float32 and float64 as they are),
    then ``transform``. Differentiable: the transform runs out of place when the logits need a gradient,
    in place otherwise."""
    z = F.linear(h, weight, bias)
    if z.dtype in _LOW_PRECISION:
        z = z.float()
    transform = transform or LogitTransform()
    return transform.apply(z) if z.requires_grad else transform.apply_(z)


def _forward_chunks(hidden, weight, bias, targets, rows, chunk, transform):
    """``(summed loss, log-sum-exp of every labelled row)``; ``targets`` are the labelled rows' targets."""
    n = targets.shape[0]
    dtype = torch.float32 if weight.dtype in _LOW_PRECISION else weight.dtype
    lse = torch.empty(n, dtype=dtype, device=hidden.device)
    loss = torch.zeros((), dtype=dtype, device=hidden.device)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        z = head_logits(_chunk_rows(hidden, rows, start, end), weight, bias, transform)
        lse[start:end] = torch.logsumexp(z, dim=-1)
        loss += (lse[start:end] - z.gather(1, targets[start:end, None])[:, 0]).sum()
    return loss, lse


def _dlogits_(z, lse, targets, grad, transform: LogitTransform) -> torch.Tensor:
    """d(loss)/d(head output) of one chunk from its transformed logits ``z`` (overwritten):
    ``(softmax(z) - onehot(target)) * grad``, times the derivative of the transform."""
    slope = None
    if transform.softcap is not None:  # d/du [c * tanh(u / c)] = 1 - tanh(u / c)^2 = 1 - (z / c)^2
        slope = (z / transform.softcap).square_().neg_().add_(1)
    g = z.sub_(lse[:, None]).exp_()
    g[torch.arange(g.shape[0], device=g.device), targets] -= 1
    g.mul_(grad * transform.scale / transform.divisor)
    if slope is not None:
        g.mul_(slope)
    return g


def _backward_chunks(grad, hidden, weight, bias, targets, rows, lse, chunk, transform, needs):
    """``(dHidden, dWeight, dBias)``, each None where ``needs`` says no gradient is wanted."""
    need_h, need_w, need_b = needs
    acc = torch.float32 if weight.dtype in _LOW_PRECISION else weight.dtype
    dh = torch.zeros_like(hidden) if need_h else None
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    db = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
    for start in range(0, targets.shape[0], chunk):
        end = min(start + chunk, targets.shape[0])
        h = _chunk_rows(hidden, rows, start, end)
        g = _dlogits_(head_logits(h, weight, bias, transform), lse[start:end], targets[start:end], grad, transform)
        if need_b:
            db += g.sum(0)
        g = g.to(weight.dtype)  # as the model's head gets the gradient of its logits
        if need_h:
            if rows is None:
                dh[start:end] = g @ weight
            else:
                dh.index_copy_(0, rows[start:end], g @ weight)
        if need_w:
            dw += g.t() @ h
    return dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype)


@contextlib.contextmanager
def _autocast_off(device_type: str):
    """Autocast disabled on ``device_type`` while the chunks run: their dtypes are chosen explicitly."""
    if _autocast_dtype(device_type) is None:
        yield
    else:
        with torch.autocast(device_type, enabled=False):
            yield


def _autocast_dtype(device_type: str):
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except (RuntimeError, TypeError, ValueError):  # a device type without autocast
        return None


# ---------------------------------------------------------------------------- autograd Function
class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed token cross-entropy of ``F.linear(hidden, weight, bias)``, chunk by chunk (see the module)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, transform: LogitTransform, ignore_index: int):
        rows = (targets != ignore_index).nonzero()[:, 0]  # only labelled rows are computed
        if rows.numel() == targets.shape[0]:
            rows = None  # every row: chunks are views
        else:
            targets = targets.index_select(0, rows)
        loss, lse = _forward_chunks(hidden, weight, bias, targets, rows, chunk, transform)
        ctx.save_for_backward(hidden, weight, bias, targets, rows, lse)
        ctx.chunk, ctx.transform = chunk, transform
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        hidden, weight, bias, targets, rows, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        with _autocast_off(hidden.device.type):
            dh, dw, db = _backward_chunks(
                grad, hidden, weight, bias, targets, rows, lse, ctx.chunk, ctx.transform, needs
            )
        return dh, dw, db, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_tokens: int = 4096,
    transform: LogitTransform | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Summed token cross-entropy of ``transform(hidden @ weight.T + bias)`` against ``targets``.

    ``hidden``: ``[T, H]`` final hidden states; ``weight``: the head's ``[V, H]``; ``bias``: ``[V]`` or
    None; ``targets``: ``[T]`` token ids, ``ignore_index`` for no loss. Equals
    ``F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")`` of the full
    logits, computed ``chunk_tokens`` labelled rows at a time. Under autocast the inputs are cast to the
    autocast dtype first, as ``nn.Linear`` casts them.
    """
    _check_shapes(hidden, weight, targets, chunk_tokens)
    hidden, weight, bias = _as_linear_inputs(hidden, weight, bias)
    with _autocast_off(hidden.device.type):
        return ChunkedCrossEntropy.apply(
            hidden, weight, bias, targets, chunk_tokens, transform or LogitTransform(), ignore_index
        )


def _check_shapes(hidden, weight, targets, chunk_tokens) -> None:
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [T, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets [T] expected for hidden {tuple(hidden.shape)}, got {tuple(targets.shape)}")


def _as_linear_inputs(hidden, weight, bias):
    """``(hidden, weight, bias)`` cast as autocast casts ``nn.Linear``'s inputs (float64 is never cast)."""
    dtype = _autocast_dtype(hidden.device.type)
    if dtype is not None:
        hidden, weight, bias = (
            t if t is None or t.dtype == torch.float64 else t.to(dtype) for t in (hidden, weight, bias)
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden is {hidden.dtype} but the head's weight is {weight.dtype}")
    return hidden, weight, bias


def map_head_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    per_chunk,
    *,
    chunk_tokens: int = 4096,
    ignore_index: int = IGNORE_INDEX,
    recompute: bool = True,
) -> list:
    """``per_chunk(h, weight, bias, t)`` of every ``chunk_tokens`` labelled rows, in order: a list of its results.

    ``hidden`` ``[T, H]``, ``weight`` ``[V, H]``, ``bias`` and ``targets`` ``[T]`` are those of
    :func:`chunked_cross_entropy`; ``h`` is ``[n, H]``, the rows whose target is not ``ignore_index``,
    and ``t`` their targets ``[n]``. The head's inputs are cast as ``nn.Linear`` is under autocast, and
    autocast is off while ``per_chunk`` runs: it computes the logits with :func:`head_logits` (or
    :meth:`ChunkedHead.logits`), in the precision the model's head and loss use. ``per_chunk`` returns
    tensors (or anything, under ``torch.no_grad``), e.g. a chunk's summed loss terms.

    With gradients enabled and ``recompute`` True, each call runs under activation checkpointing
    (``torch.utils.checkpoint``, non-reentrant): its logits are not kept but recomputed in backward,
    so the peak holds one chunk's ``[n, V]`` logits, as :func:`chunked_cross_entropy` does.
    """
    _check_shapes(hidden, weight, targets, chunk_tokens)
    hidden, weight, bias = _as_linear_inputs(hidden, weight, bias)
    rows = (targets != ignore_index).nonzero()[:, 0]
    checkpointed = recompute and torch.is_grad_enabled()
    results = []
    with _autocast_off(hidden.device.type):
        for start in range(0, rows.numel(), chunk_tokens):
            r = rows[start : start + chunk_tokens]
            h, t = hidden.index_select(0, r), targets.index_select(0, r)
            if checkpointed:
                results.append(checkpoint(per_chunk, h, weight, bias, t, use_reentrant=False))
            else:
                results.append(per_chunk(h, weight, bias, t))
    return results


# ---------------------------------------------------------------------------- which models
# ForCausalLM classes whose forward, read in transformers' modeling code (5.x), is: base model -> final
# hidden states -> ``logits = self.lm_head(hidden_states)`` (a plain nn.Linear) -> at most the transform
# named here -> ``outputs.logits``. class name -> (transformers.models package, transform)
_SCALE = "logit_scale"  # logits * self.logit_scale (Cohere)
_DIVIDE = "logits_scaling"  # logits / config.logits_scaling (Granite)
_SOFTCAP = "final_logit_softcapping"  # cap * tanh(logits / cap) unless None (Gemma 2 and 3)
CHUNKED_HEADS: dict[str, tuple[str, str | None]] = {
    "LlamaForCausalLM": ("llama", None),
    "Qwen2ForCausalLM": ("qwen2", None),
    "Qwen3ForCausalLM": ("qwen3", None),
    "MistralForCausalLM": ("mistral", None),
    "MinistralForCausalLM": ("ministral", None),
    "GemmaForCausalLM": ("gemma", None),
    "Phi3ForCausalLM": ("phi3", None),
    "Olmo2ForCausalLM": ("olmo2", None),
    "Olmo3ForCausalLM": ("olmo3", None),
    "MixtralForCausalLM": ("mixtral", None),
    "Qwen2MoeForCausalLM": ("qwen2_moe", None),
    "Qwen3MoeForCausalLM": ("qwen3_moe", None),
    "OlmoeForCausalLM": ("olmoe", None),
    "Starcoder2ForCausalLM": ("starcoder2", None),
    "PhiForCausalLM": ("phi", None),  # a head with a bias
    "GPTNeoXForCausalLM": ("gpt_neox", None),
    "GlmForCausalLM": ("glm", None),
    "SmolLM3ForCausalLM": ("smollm3", None),
    "CohereForCausalLM": ("cohere", _SCALE),
    "Cohere2ForCausalLM": ("cohere2", _SCALE),
    "GraniteForCausalLM": ("granite", _DIVIDE),
    "GraniteMoeForCausalLM": ("granitemoe", _DIVIDE),
    "Gemma2ForCausalLM": ("gemma2", _SOFTCAP),
    "Gemma3ForCausalLM": ("gemma3", _SOFTCAP),
}


@dataclass(frozen=True)
class ChunkedHead:
    """A model whose head :func:`chunked_head` accepted: its ``nn.Linear`` head and logit transform."""

    head: nn.Linear
    transform: LogitTransform

    def logits(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`head_logits` of rows ``h`` with this model's logit transform (for a ``per_chunk`` function)."""
        return head_logits(h, weight, bias, self.transform)

    def capture(self, model, on_hidden, **model_kwargs):
        """``(on_hidden(hidden, weight, bias), outputs)`` of ``model(**model_kwargs)``, without the full logits.

        The model runs its own forward (PEFT wrapper, accelerate's autocast wrapper and all); a pre-hook on
        the head hands ``on_hidden`` the final hidden states flattened to ``[T, H]`` (under the autocast
        the head would run under) with the head's weight and bias, and gives the head an empty sequence,
        so ``outputs.logits`` is empty. Refuses a model that calls its head other than once.
        """
        found = []

        def take_hidden(head, args):
            (hidden,) = args
            found.append(on_hidden(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias))
            return (hidden[..., :0, :],)

        handle = self.head.register_forward_pre_hook(take_hidden)
        try:
            outputs = model(**model_kwargs)
        finally:
            handle.remove()
        if len(found) != 1:
            raise RuntimeError(f"{type(model).__name__} called its LM head {len(found)} times in one forward, not once")
        return found[0], outputs

    def map_chunks(
        self, model, targets: torch.Tensor, per_chunk, chunk_tokens: int, *, recompute: bool = True, **model_kwargs
    ):
        """``(results, outputs)``: :func:`map_head_chunks` of ``per_chunk(h, weight, bias, t)`` over the final
        hidden states of ``model(**model_kwargs)`` against ``targets`` (the model's input shape, e.g.
        ``[1, T]``), without the full logits (see :meth:`capture`); ``per_chunk`` gets the logits from
        :meth:`logits`."""
        return self.capture(
            model,
            lambda hidden, weight, bias: map_head_chunks(
                hidden,
                weight,
                bias,
                targets.reshape(-1),
                per_chunk,
                chunk_tokens=chunk_tokens,
                recompute=recompute,
            ),
            **model_kwargs,
        )

    def __call__(self, model, targets: torch.Tensor, chunk_tokens: int, **model_kwargs):
        """``(summed token cross-entropy, model outputs)`` of ``model(**model_kwargs)`` against ``targets``
        (:func:`chunked_cross_entropy`), without the full logits (see :meth:`capture`)."""
        return self.capture(
            model,
            lambda hidden, weight, bias: chunked_cross_entropy(
                hidden,
                weight,
                targets.reshape(-1),
                bias,
                chunk_tokens=chunk_tokens,
                transform=self.transform,
            ),
            **model_kwargs,
        )


def _source(fn):
    """The function a (possibly wrapped or bound) forward finally runs."""
    return inspect.unwrap(getattr(fn, "__func__", fn))


def _registered_class(lm):
    """The class of :data:`CHUNKED_HEADS` that ``lm`` is an instance of, or None."""
    for c in type(lm).__mro__:
        family = CHUNKED_HEADS.get(c.__name__, (None, None))[0]
        if family is not None and c.__module__ == f"transformers.models.{family}.modeling_{family}":
            return c
    return None


def chunked_head(model) -> ChunkedHead | None:
    """The :class:`ChunkedHead` of ``model`` when chunking reproduces its own logits exactly, else None.

    Accepted: ``model`` (or the LM inside a PEFT wrapper, except prompt-learning methods, which add
    virtual tokens) is one of :data:`CHUNKED_HEADS` or a subclass that keeps its forward, that forward
    is the class's own (wrappers that declare ``__wrapped__``, such as accelerate's autocast, are
    fine; a replaced forward, e.g. a kernel library's patch, is not), and its ``lm_head`` is a plain
    ``nn.Linear`` without hooks, as is the model (a LoRA or ``modules_to_save`` head is not). Heads:

    - plain linear (weight, Phi's bias): Llama, Qwen2, Qwen3, Mistral, Ministral, Gemma, Phi-3,
      OLMo 2, OLMo 3, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, StarCoder2, Phi, GPT-NeoX, GLM, SmolLM3;
    - scaled: Cohere and Cohere 2 (``logits * logit_scale``), Granite and GraniteMoE
      (``logits / config.logits_scaling``);
    - soft-capped: Gemma 2 and Gemma 3 (``cap * tanh(logits / cap)``, ``config.final_logit_softcapping``).

    Everything else (another family, a custom ``ForCausalLM`` forward) computes the full logits.
    """
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return None
    try:
        lm = hdp_base_model(model)
    except UnsupportedModelError:
        return None
    cls = _registered_class(lm)
    if cls is None or type(lm).forward is not cls.forward:
        return None
    own = _source(cls.forward)
    if own.__qualname__ != f"{cls.__name__}.forward" or own.__module__ != cls.__module__:
        return None
    if _source(lm.forward) is not own:  # a replaced forward; wrappers that declare __wrapped__ are fine
        return None
    head = lm.get_output_embeddings()
    if type(head) is not nn.Linear or head is not getattr(lm, "lm_head", None):
        return None
    if head._forward_hooks or head._forward_pre_hooks or lm._forward_hooks:
        return None
    kind = CHUNKED_HEADS[cls.__name__][1]
    if kind == _SCALE:
        transform = LogitTransform(scale=float(lm.logit_scale))
    elif kind == _DIVIDE:
        transform = LogitTransform(divisor=float(lm.config.logits_scaling))
    elif kind == _SOFTCAP and lm.config.final_logit_softcapping is not None:
        transform = LogitTransform(softcap=float(lm.config.final_logit_softcapping))
    else:
        transform = LogitTransform()
    return ChunkedHead(head, transform)


__all__ = [
    "CHUNKED_HEADS",
    "ChunkedCrossEntropy",
    "ChunkedHead",
    "LogitTransform",
    "chunked_cross_entropy",
    "chunked_head",
    "head_logits",
    "map_head_chunks",
]
