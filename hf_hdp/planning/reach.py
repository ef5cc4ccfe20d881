"""Which keys a sliding-window or chunked attention layer lets each row see, over a zigzag group (pure Python).

A *full* causal layer lets row ``q`` see every key ``k <= q`` of its sample. Two layer kinds see less:

- a **sliding window** of ``w`` tokens: key ``k`` is visible iff ``0 <= q - k < w`` (transformers'
  ``sliding_window_overlay``: ``kv_idx > q_idx - w``);
- **chunked attention** of ``c`` tokens (Llama 4's ``attention_chunk_size``): visible iff also
  ``q // c == k // c``, positions counted from the sample's first token.

A :class:`LayerMask` says which of these a layer adds (both may; neither is a full layer).

Over a zigzag group (:mod:`.layout`) member ``m`` holds, per document, a *front* chunk and a *back*
chunk of positions; its rows are, document by document, the front rows then the back rows.
:func:`visible_pairs` cuts the (query span) x (key span) rectangle of two such chunks into trimmed
pairs of contiguous positions that each hold a visible key for every query row: where a chunked
layer's chunk boundary runs through a span the pair is split there, so keys of another attention
chunk never pair with the rows. :func:`member_pairs` lists the pairs member ``i`` computes with the
K/V of member ``j``; :func:`needed_rows` is the union of their key rows, which is all ``j`` must send
``i`` for such a layer. For windows much shorter than the chunks, that is the last ``w - 1`` rows of
one neighbouring chunk per zigzag chunk, and no rows at all from the other members: their messages
are skipped (:mod:`hf_hdp.attention.ring`).

How one zigzag layout serves both layer kinds: zigzag balances the *causal* work of full layers
(early front chunks pair with late back chunks). A windowed layer's work is ``~w`` keys per row
wherever the row lies, so it is balanced by the row count alone, which zigzag also keeps equal
(every member holds ``s // k`` or ``s // k + 1`` rows). Chunked layers are balanced the same way as
long as the attention chunks are much shorter than the sample. So no layer needs another layout,
and the cost model prices a sliding layer by ``s·w`` (:func:`mask_pairs`), not ``s²``.

Everything here is in positions and rows, so the planner's byte estimates
(:meth:`~hf_hdp.planning.cost.CostModel.segment_bytes_by_member`) and the attention's messages come
from the same arithmetic and agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from .layers import is_heterogeneous

Layout = tuple[tuple[tuple[int, int], ...], ...]  # layout[m][d] = (front_len, back_len) of document d on member m


@dataclass(frozen=True)
class LayerMask:
    """What a layer adds to causal attention: a sliding ``window`` and/or an attention ``chunk`` (tokens)."""

    window: int | None = None
    chunk: int | None = None

    def __post_init__(self) -> None:
        for name in ("window", "chunk"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"LayerMask.{name} must be a positive number of tokens or None, got {v!r}")

    @property
    def full(self) -> bool:
        return self.window is None and self.chunk is None

    def restricts(self, length: int) -> bool:
        """Whether this mask differs from plain causal attention for a sample of ``length`` tokens."""
        return (self.window is not None and self.window < length) or (self.chunk is not None and self.chunk < length)

    def for_length(self, length: int) -> LayerMask:
        """This mask with every part a sample of ``length`` tokens cannot feel removed."""
        w = self.window if self.window is not None and self.window < length else None
        c = self.chunk if self.chunk is not None and self.chunk < length else None
        return self if (w, c) == (self.window, self.chunk) else LayerMask(w, c)


FULL = LayerMask()


def visible_keys(q: int, length: int, mask: LayerMask) -> int:
    """How many keys row ``q`` (a position) of a sample of ``length`` tokens sees under ``mask``."""
    lo = 0
    if mask.window is not None:
        lo = max(lo, q - mask.window + 1)
    if mask.chunk is not None:
        lo = max(lo, q - q % mask.chunk)
    return min(q, length - 1) - lo + 1


def mask_pairs(length: int, mask: LayerMask) -> float:
    """(query, key) pairs one layer computes for a sample of ``length`` tokens, in units of ``s²``'s causal half
    counted twice: ``s²`` for a full layer (the cost model's ``a·s²``), ``2·s·w - w²`` for a window ``w < s``
    (``s·w`` up to the triangle at the start), ``Σ chunk²`` over the attention chunks of a chunked layer."""
    s = int(length)
    if s <= 0:
        return 0.0
    w = mask.window if mask.window is not None and mask.window < s else None
    c = mask.chunk if mask.chunk is not None and mask.chunk < s else None
    if c is None:
        return float(s * s) if w is None else float(2 * s * w - w * w)
    total = 0.0
    for start in range(0, s, c):
        total += mask_pairs(min(c, s - start), LayerMask(w, None))
    return total


class Span(NamedTuple):
    """A zigzag chunk of a member: positions ``[start, end)`` of its document, at member row ``row``."""

    start: int
    end: int
    row: int


class Pair(NamedTuple):
    """Query rows ``[q_row, q_row + q_len)`` of the member attend to key rows ``[k_row, k_row + k_len)`` of the
    source (rows of their segments), which sit at positions ``q_pos`` and ``k_pos`` of document ``doc``.
    ``k_chunk`` is 0 for the source's front chunk, 1 for its back chunk."""

    doc: int
    q_row: int
    q_len: int
    k_row: int
    k_len: int
    q_pos: int
    k_pos: int
    k_chunk: int


def visible_pairs(q_span: tuple[int, int], k_span: tuple[int, int], mask: LayerMask) -> list[tuple[int, int, int, int]]:
    """``(q_start, q_end, k_start, k_end)`` in positions: the parts of queries ``q_span`` x keys ``k_span`` that
    see a key, trimmed so that every query row of a part sees at least one of its keys and every key is seen.
    A chunked mask splits the spans at its chunk boundaries."""
    (qa, qb), (ka, kb) = q_span, k_span
    if qa >= qb or ka >= kb:
        return []
    if mask.chunk is None:
        cuts = [(qa, qb, ka, kb)]
    else:
        c = mask.chunk
        cuts = []
        for idx in range(max(qa, ka) // c, (min(qb, kb) - 1) // c + 1):
            lo, hi = idx * c, (idx + 1) * c
            cuts.append((max(qa, lo), min(qb, hi), max(ka, lo), min(kb, hi)))
    out = []
    for a, b, x, y in cuts:
        qs, ke = max(a, x), min(y, b)  # causal: queries before the first key, keys after the last query
        ks, qe = x, b
        if mask.window is not None:
            ks, qe = max(x, qs - mask.window + 1), min(b, ke + mask.window - 1)
        if qs < qe and ks < ke:
            out.append((qs, qe, ks, ke))
    return out


@lru_cache(maxsize=4096)
def member_spans(doc_layout: tuple[tuple[int, int], ...]) -> tuple[tuple[Span, Span], ...]:
    """Per member, its front and back chunk of one document (rows counted within the document)."""
    k = len(doc_layout)
    length = sum(f + b for f, b in doc_layout)
    out, front_at, back_end = [], 0, length
    for f, b in doc_layout:
        out.append((Span(front_at, front_at + f, 0), Span(back_end - b, back_end, f)))
        front_at += f
        back_end -= b
    assert len(out) == k and front_at == back_end, doc_layout
    return tuple(out)


@lru_cache(maxsize=65536)
def member_pairs(layout: Layout, member: int, source: int, mask: LayerMask) -> tuple[Pair, ...]:
    """Every pair member ``member``'s rows compute with member ``source``'s K/V under ``mask``, document by
    document, the source's front chunk before its back chunk (so within one ``k_chunk`` no query row repeats)."""
    pairs = []
    q_off = k_off = 0
    for d in range(len(layout[0])):
        doc = tuple(layout[m][d] for m in range(len(layout)))
        spans = member_spans(doc)
        for kc, ks in enumerate(spans[source]):
            for qs in spans[member]:
                for a, b, x, y in visible_pairs((qs.start, qs.end), (ks.start, ks.end), mask):
                    pairs.append(
                        Pair(d, q_off + qs.row + a - qs.start, b - a, k_off + ks.row + x - ks.start, y - x, a, x, kc)
                    )
        q_off += sum(layout[member][d])
        k_off += sum(layout[source][d])
    return tuple(pairs)


@lru_cache(maxsize=65536)
def needed_rows(layout: Layout, member: int, source: int, mask: LayerMask) -> tuple[tuple[int, int], ...]:
    """The source's rows ``[start, end)`` (sorted, merged) that member ``member`` attends to under ``mask``."""
    spans = sorted((p.k_row, p.k_row + p.k_len) for p in member_pairs(layout, member, source, mask))
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return tuple(merged)


def needed_count(layout: Layout, member: int, source: int, mask: LayerMask) -> int:
    return sum(b - a for a, b in needed_rows(layout, member, source, mask))


def layer_masks(config) -> tuple[LayerMask, ...]:
    """Every decoder layer's :class:`LayerMask` (:func:`layer_mask` of each)."""
    if not hasattr(config, "num_hidden_layers") and getattr(config, "text_config", None) is not None:
        config = config.text_config
    return tuple(layer_mask(config, i) for i in range(int(getattr(config, "num_hidden_layers", None) or 1)))


def layer_mask(config, index: int) -> LayerMask:
    """Decoder layer ``index``'s :class:`LayerMask`, from a transformers config (``text_config`` for multimodal ones).

    Sliding layers: ``layer_types`` entries ``"sliding_attention"`` get ``config.sliding_window``; without
    ``layer_types`` every layer slides when ``sliding_window`` is set and ``use_sliding_window`` is not False.
    Chunked layers: ``"chunked_attention"`` entries get ``config.attention_chunk_size``. The config is the source
    of truth, as for transformers' masks (layer modules are no guide: Exaone 4 keeps ``sliding_window`` on its
    full layers too). A heterogeneous config (``per_layer_config``) is read from the layer's own config.
    """
    if not hasattr(config, "num_hidden_layers") and getattr(config, "text_config", None) is not None:
        config = config.text_config
    if is_heterogeneous(config):
        config = config.per_layer_config[index]
    window = getattr(config, "sliding_window", None)
    window = window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None
    chunk = getattr(config, "attention_chunk_size", None)
    chunk = chunk if isinstance(chunk, int) and not isinstance(chunk, bool) and chunk > 0 else None
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        kind = layer_types[index] if index < len(layer_types) else None
        if kind == "sliding_attention" and window is not None:
            return LayerMask(window=window)
        if kind == "chunked_attention" and chunk is not None:
            return LayerMask(chunk=chunk)
        return FULL
    if window is not None and getattr(config, "use_sliding_window", True) is not False:
        return LayerMask(window=window)
    return FULL
