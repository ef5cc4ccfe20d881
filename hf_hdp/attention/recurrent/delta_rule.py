"""The gated delta rule (Gated DeltaNet: Qwen3.5, Qwen3-Next), exact, in chunks, from any initial state.

One head's state is a matrix ``S`` (``[dk, dv]``). Token ``t`` (query ``q_t``, key ``k_t``, value ``v_t``,
log-decay ``g_t <= 0``, write strength ``beta_t``) updates it and reads it::

    S_t = exp(g_t) S_{t-1} + k_t beta_t (v_t - exp(g_t) S_{t-1}^T k_t)^T        o_t = S_t^T q_t

(Yang, Kautz and Hatamizadeh, "Gated Delta Networks", arXiv 2412.06464). The state is linear in the
state it starts from, which is what lets HDP split a sample over ranks without a serial chain
(:mod:`.scan`): a piece run from the zero state gives outputs ``O0`` and final state ``B``; from a true
incoming state ``S_in`` its final state is ``M S_in + B`` and its outputs ``O0 + R(S_in)``, where the
transition ``M`` (``[dk, dk]``) and the read-out ``R`` are computed from the same chunk quantities.

Chunked form (the "UT transform" of DeltaNet, Yang et al. 2024, arXiv 2406.06484): within a chunk of
``C`` rows with cumulative log-decay ``c_i = g_1 + ... + g_i`` and ``G_ij = exp(c_i - c_j)``,

- ``T = (I + strictly_lower(beta K K^T * G))^-1``, ``U = T (beta V)``, ``W = T (beta exp(c) K)``;
- from the state ``S`` entering the chunk: ``V' = U - W S``, ``O = (exp(c) Q) S + (Q K^T * G * causal) V'``,
  and the state leaving it ``exp(c_C) S + (exp(c_C - c) K)^T V'``.

Every function works on one sequence with heads first (``q``/``k``: ``[H, T, dk]``, already
L2-normalised and, for ``q``, scaled; ``v``: ``[H, T, dv]``; ``g``/``beta``: ``[H, T]``) in the dtype it
is given (HDP computes in float32 at least, float64 in tests), and is differentiable by autograd.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

CHUNK = 64


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(|x|^2 + eps)`` over the last dimension (the normalisation Gated DeltaNet's kernels use)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


@dataclass
class Chunks:
    """A sequence's per-chunk quantities (``N`` chunks of ``C`` rows, the last padded with inert rows)."""

    qd: torch.Tensor  # [H, N, C, dk]  exp(c) * q
    attn: torch.Tensor  # [H, N, C, C]  (q k^T) * G, causal (diagonal included)
    u: torch.Tensor  # [H, N, C, dv]
    w: torch.Tensor | None  # [H, N, C, dk]; None: no delta rule (Mamba-2's SSD, linear attention with decay)
    kd: torch.Tensor  # [H, N, C, dk]  exp(c_C - c) * k
    decay: torch.Tensor  # [H, N, 1, 1]  exp(c_C)
    length: int

    @property
    def num(self) -> int:
        return self.qd.shape[1]

    @cached_property
    def steps(self) -> list[tuple]:
        """Per chunk ``(qd, attn, u, w, kd, decay)``, each ``[H, ...]``: the chunk tensors unbound ONCE, so autograd
        stacks their gradients once (indexing ``t[:, i]`` in a loop would give every chunk's gradient the whole
        tensor's size: quadratic in the chunks)."""
        w = self.w.unbind(1) if self.w is not None else [None] * self.num
        return list(
            zip(self.qd.unbind(1), self.attn.unbind(1), self.u.unbind(1), w, self.kd.unbind(1), self.decay.unbind(1))
        )


def chunk_quantities(q, k, v, g, beta, chunk: int = CHUNK) -> Chunks:
    """The chunk form's quantities of one sequence (see the module docstring)."""
    h, n = q.shape[0], q.shape[1]
    pad = (-n) % chunk
    if pad:  # inert rows: no decay (g = 0), no write (beta = 0), nothing read (q = 0)
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (torch.nn.functional.pad(x, (0, pad)) for x in (g, beta))
    q, k, v = (x.reshape(h, -1, chunk, x.shape[-1]) for x in (q, k, v))
    g, beta = g.reshape(h, -1, chunk), beta.reshape(h, -1, chunk)
    c = g.cumsum(-1)
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    gap = (c.unsqueeze(-1) - c.unsqueeze(-2)).masked_fill(~lower, float("-inf")).exp()  # G, zero above the diagonal
    kb = k * beta.unsqueeze(-1)
    system = (kb @ k.transpose(-1, -2)) * gap
    system = system.masked_fill(
        lower.logical_not().logical_or(torch.eye(chunk, dtype=torch.bool, device=q.device)), 0.0
    ) + torch.eye(chunk, dtype=q.dtype, device=q.device)
    rhs = torch.cat([v * beta.unsqueeze(-1), kb * c.exp().unsqueeze(-1)], dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u, w = solved.split([v.shape[-1], k.shape[-1]], dim=-1)
    last = c[..., -1:]
    return Chunks(
        qd=q * c.exp().unsqueeze(-1),
        attn=(q @ k.transpose(-1, -2)) * gap,
        u=u,
        w=w,
        kd=k * (last - c).exp().unsqueeze(-1),
        decay=last.exp().unsqueeze(-1),
        length=n,
    )


def linear_chunk_quantities(q, k, v, g, chunk: int = CHUNK) -> Chunks:
    """The chunk quantities of the rule without the delta (``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T
    q_t``): Mamba-2's state space dual form (Dao and Gu, arXiv 2405.21060) with ``q = C``, ``k = B``,
    ``v = dt x``, ``g = dt A``. The same as :func:`chunk_quantities` with ``T = I`` and no ``W``."""
    h, n = q.shape[0], q.shape[1]
    pad = (-n) % chunk
    if pad:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g = torch.nn.functional.pad(g, (0, pad))
    q, k, v = (x.reshape(h, -1, chunk, x.shape[-1]) for x in (q, k, v))
    c = g.reshape(h, -1, chunk).cumsum(-1)
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    gap = (c.unsqueeze(-1) - c.unsqueeze(-2)).masked_fill(~lower, float("-inf")).exp()
    last = c[..., -1:]
    return Chunks(
        qd=q * c.exp().unsqueeze(-1),
        attn=(q @ k.transpose(-1, -2)) * gap,
        u=v,
        w=None,
        kd=k * (last - c).exp().unsqueeze(-1),
        decay=last.exp().unsqueeze(-1),
        length=n,
    )


def run_chunks(ch: Chunks, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs ``[H, T, dv]`` and final state ``[H, dk, dv]`` from ``state`` (``None``: zero)."""
    h, dk, dv = ch.u.shape[0], ch.kd.shape[-1], ch.u.shape[-1]
    s = state if state is not None else ch.u.new_zeros(h, dk, dv)
    outs = []
    for qd, attn, u, w, kd, decay in ch.steps:
        v_new = u if w is None else u - w @ s
        outs.append(qd @ s + attn @ v_new)
        s = decay * s + kd.transpose(-1, -2) @ v_new
    return torch.cat(outs, dim=1)[:, : ch.length], s


def _apply_step(step: tuple, x: torch.Tensor) -> torch.Tensor:
    """A chunk's map of an incoming state applied to ``x`` (``[H, dk, n]``): ``exp(c_C) x - (exp(c_C - c) K)^T
    (W x)``, as a rank-``C`` update (``4 C dk n`` FLOPs per head, never the ``[dk, dk]`` matrix itself)."""
    _, _, _, w, kd, decay = step
    if w is None:
        return decay * x
    return decay * x - kd.transpose(-1, -2) @ (w @ x)


def transition(ch: Chunks) -> torch.Tensor:
    """``M`` (``[H, dk, dk]``): the final state from an incoming state ``S`` is ``M S + B``."""
    h, dk = ch.kd.shape[0], ch.kd.shape[-1]
    if ch.w is None:  # no delta: the map is the product of the chunks' decays
        return torch.diag_embed(ch.decay[:, :, 0, 0].prod(dim=1, keepdim=True).expand(h, dk))
    m = torch.eye(dk, dtype=ch.kd.dtype, device=ch.kd.device).expand(h, dk, dk)
    for step in ch.steps:
        m = _apply_step(step, m)
    return m


def read_state(ch: Chunks, state: torch.Tensor) -> torch.Tensor:
    """What an incoming ``state`` adds to the outputs (``[H, T, dv]``): the outputs from ``state`` with no
    values written, the part of ``run_chunks(ch, state)`` that ``run_chunks(ch, None)`` lacks."""
    outs, s = [], state
    for step in ch.steps:
        qd, attn, _, w, _, _ = step
        read = qd @ s
        if w is not None:
            read = read - attn @ (w @ s)
        outs.append(read)
        s = _apply_step(step, s)
    return torch.cat(outs, dim=1)[:, : ch.length]


def delta_rule(q, k, v, g, beta, state: torch.Tensor | None = None, chunk: int = CHUNK):
    """One sequence's outputs and final state from ``state`` (``None``: zero)."""
    if q.shape[1] == 0:
        h, dk, dv = q.shape[0], q.shape[-1], v.shape[-1]
        return v.new_zeros(h, 0, dv), (state if state is not None else v.new_zeros(h, dk, dv))
    return run_chunks(chunk_quantities(q, k, v, g, beta, chunk), state)


def delta_rule_reference(q, k, v, g, beta, state: torch.Tensor | None = None):
    """Token by token (the recurrence as written above): the ground truth of the tests."""
    h, n, dk = q.shape
    s = state if state is not None else v.new_zeros(h, dk, v.shape[-1])
    outs = []
    for t in range(n):
        s = s * g[:, t].exp()[:, None, None]
        delta = (v[:, t] - (s * k[:, t, :, None]).sum(1)) * beta[:, t, None]
        s = s + k[:, t, :, None] * delta[:, None, :]
        outs.append((s * q[:, t, :, None]).sum(1))
    out = torch.stack(outs, dim=1) if outs else v.new_zeros(h, 0, v.shape[-1])
    return out, s
