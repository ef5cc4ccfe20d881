"""What sliding-window and chunked layers exchange and compute over a zigzag group, fast (pure Python).

:mod:`hf_hdp.planning.reach` defines which rows a member of a zigzag group needs from another under a
:class:`~hf_hdp.planning.reach.LayerMask`, pair by pair over the whole segment layout (``k²`` calls of
:func:`~hf_hdp.planning.reach.needed_rows` for a segment on ``k`` ranks). The cost model needs the same
counts for every candidate ``(length, k)`` the planner tries, at thousands of ranks, so this module
computes per-member totals document by document in ``O(k log k)`` from the zigzag chunk bounds
(:func:`doc_exchange` says why that is exact), with the counts equal to ``needed_count``'s
(``tests/test_cost_windows.py`` checks them against the brute force).

Rows of different documents never overlap, so a segment's counts are the sums of its documents'
(:func:`segment_exchange`), and everything is cached per ``(length, k, mask)``.

Work: zigzag gives every member the same number of rows, but a windowed or chunked row's keys depend on
where it lies (the first ``w - 1`` rows of a sample, and of each attention chunk, see fewer), so the
members of a piece do not quite do the same work: :func:`member_work` counts each member's visible pairs
in closed form, and the cost model prices a direct layer of a piece by its slowest member (the others
wait for it at the layer's exchange).
"""

from __future__ import annotations

from bisect import bisect_right
from functools import lru_cache
from typing import NamedTuple

from ..layout import zigzag_chunk_bounds, zigzag_front_back
from ..reach import FULL, LayerMask


def group_masks(masks: tuple) -> tuple[tuple[LayerMask, int], ...]:
    """``(mask, number of layers)`` per distinct mask, in first-seen order; ``()`` when every layer is full."""
    counts: dict = {}
    for m in masks:
        counts[m] = counts.get(m, 0) + 1
    if all(m.full for m in counts):
        return ()
    return tuple(counts.items())


def _window_count(a: int, b: int, x: int, y: int, depth: int) -> int:
    """``#{(q, key): q in [a, b), key in [x, y), key >= q - depth}``."""
    n_keys = y - x
    if n_keys <= 0 or b <= a:
        return 0
    top = y + depth  # g(q) = min(n_keys, max(0, top - q))
    full_end = min(b, top - n_keys + 1)
    total = n_keys * max(0, full_end - a)
    lo, hi = max(a, top - n_keys + 1), min(b, top)
    if hi > lo:
        n = hi - lo
        total += n * top - n * (lo + hi - 1) // 2
    return total


def rect_pairs(q_span: tuple[int, int], k_span: tuple[int, int], mask: LayerMask) -> int:
    """Visible (query, key) pairs of queries ``q_span`` x keys ``k_span`` (positions of one sample) under ``mask``
    (causal, plus the window and the attention chunks)."""
    (qa, qb), (ka, kb) = q_span, k_span
    if qa >= qb or ka >= kb:
        return 0
    if mask.chunk is None:
        cuts = [(qa, qb, ka, kb)]
    else:
        c = mask.chunk
        cuts = [
            (max(qa, i * c), min(qb, (i + 1) * c), max(ka, i * c), min(kb, (i + 1) * c))
            for i in range(max(qa, ka) // c, (min(qb, kb) - 1) // c + 1)
        ]
    depth = (mask.window - 1) if mask.window is not None else None
    total = 0
    for a, b, x, y in cuts:
        d = depth if depth is not None else b - x  # no window: every earlier key
        total += _window_count(a, b, x, y, d) - _window_count(a, b, x, y, -1)
    return total


class DocExchange(NamedTuple):
    """One document of ``s`` tokens on a ``k``-rank zigzag group under one mask, per member ``i``: ``received[i]``
    the rows of other members it needs, ``sent[i]`` its rows the others need, ``sources[i]`` the members it needs
    rows from (disjoint ``[start, stop)`` ranges of member indices, ``i`` left out), ``own[i]`` the visible pairs of
    its rows with its own keys."""

    received: tuple[int, ...]
    sent: tuple[int, ...]
    sources: tuple[tuple[tuple[int, int], ...], ...]
    own: tuple[int, ...]


def _lowest_key(q: int, mask: LayerMask) -> int:
    lo = 0
    if mask.window is not None:
        lo = max(lo, q - mask.window + 1)
    if mask.chunk is not None:
        lo = max(lo, q - q % mask.chunk)
    return lo


def _merge(ranges) -> tuple[tuple[int, int], ...]:
    if isinstance(ranges, list) and len(ranges) <= 1:
        return tuple(ranges)
    out: list[list[int]] = []
    for a, b in sorted(r for r in ranges if r[0] < r[1]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


@lru_cache(maxsize=65536)
def doc_exchange(length: int, k: int, mask: LayerMask) -> DocExchange:
    """:class:`DocExchange` of one document, in ``O(k log k)``.

    Why it is exact: a key chunk ``K = [x, y)`` lying before a query chunk starting at ``qa`` gives that chunk's
    rows the keys ``[max(x, lo(qa)), y)`` (:func:`~hf_hdp.planning.reach.visible_pairs`' trimming; ``lo(qa)`` the
    lowest key row ``qa`` sees, and later rows see no lower one), a suffix of ``K``; of a member's two query
    chunks the earlier one after ``K`` needs the longer suffix. Zigzag's fronts precede all backs, ``F_j``
    precedes ``F_i`` iff ``j < i`` and ``B_j`` precedes ``B_i`` iff ``j > i``, and the chunks a query chunk reaches
    are contiguous, so each member needs rows from at most three contiguous ranges of members, all fully but
    the earliest chunk.
    """
    mask = mask.for_length(length) if length > 0 else FULL
    bounds = zigzag_chunk_bounds(length, k)
    fb = zigzag_front_back(length, k)
    t_f = sum(1 for f, _ in fb if f > 0)  # fronts (backs) are non-empty for a prefix of the members
    t_b = sum(1 for f, b in fb if f + b > 0)
    fs = [bounds[j][0] for j in range(t_f)]
    fe = [bounds[j][1] for j in range(t_f)]
    bs = [bounds[2 * k - 1 - j][0] for j in range(t_b)]
    be = [bounds[2 * k - 1 - j][1] for j in range(t_b)]
    be_rev = be[::-1]  # increasing
    received, own = [0] * k, [0] * k
    sent = [0] * (k + 1)
    cover_f, cover_b = [0] * (k + 1), [0] * (k + 1)  # members fully sent (difference arrays)
    sources: list[tuple[tuple[int, int], ...]] = [()] * k

    def fronts(p: int, q: int, lo: int) -> int:  # rows of F_p..F_{q-1} needed by a chunk whose rows see down to lo
        part = fe[p] - max(fs[p], lo)
        sent[p] += part
        cover_f[p + 1] += 1
        cover_f[q] -= 1
        return fe[q - 1] - max(fs[p], lo)

    def backs(p: int, q: int, lo: int) -> int:  # rows of B_p..B_{q-1} (B_{q-1} the earliest)
        part = be[q - 1] - max(bs[q - 1], lo)
        sent[q - 1] += part
        cover_b[p] += 1
        cover_b[q - 1] -= 1
        return be[p] - max(bs[q - 1], lo)

    for i in range(t_b):
        f_span, b_span = bounds[i], bounds[2 * k - 1 - i]
        mine = [(f_span[0], f_span[1]), (b_span[0], b_span[1])]
        if mask.full:  # causal: both chunks' triangles and the back chunk's rows over the front chunk
            f, b = fb[i]
            own[i] = f * (f + 1) // 2 + b * (b + 1) // 2 + f * b
        else:
            own[i] = (
                rect_pairs(mine[0], mine[0], mask)
                + rect_pairs(mine[1], mine[1], mask)
                + rect_pairs(mine[1], mine[0], mask)
            )
        ranges, rows = [], 0
        lo_b = _lowest_key(b_span[0], mask)
        if i < t_f:  # F_i: the fronts before it
            lo_f = _lowest_key(f_span[0], mask)
            a1 = bisect_right(fe, lo_f)
            if a1 < i:
                rows += fronts(a1, i, lo_f)
                ranges.append((a1, i))
            p2 = max(bisect_right(fe, lo_b), i + 1)
        else:
            p2 = bisect_right(fe, lo_b)
        if p2 < t_f:  # B_i: the fronts F_i's rows did not reach
            rows += fronts(p2, t_f, lo_b)
            ranges.append((p2, t_f))
        m = t_b - bisect_right(be_rev, lo_b)  # B_j with j < m end after lo_b
        if i + 1 < m:  # B_i: the backs before it
            rows += backs(i + 1, m, lo_b)
            ranges.append((i + 1, m))
        received[i] = rows
        sources[i] = _merge(ranges)
    run_f = run_b = 0
    out_sent = [0] * k
    for j in range(k):
        run_f += cover_f[j]
        run_b += cover_b[j]
        out_sent[j] = sent[j] + run_f * fb[j][0] + run_b * fb[j][1]
    return DocExchange(tuple(received), tuple(out_sent), tuple(sources), tuple(own))


def _sum_min(t0: int, t1: int, w: int | None) -> int:
    """``Σ_{t=t0}^{t1-1} min(t + 1, w)`` (``w=None``: ``Σ (t + 1)``)."""
    if t1 <= t0:
        return 0

    def tri(n: int) -> int:
        return n * (n + 1) // 2

    if w is None:
        return tri(t1) - tri(t0)
    cut = min(max(w - 1, t0), t1)
    return tri(cut) - tri(t0) + (t1 - cut) * w


def span_work(a: int, b: int, mask: LayerMask) -> int:
    """Visible (query, key) pairs of the query rows at positions ``[a, b)`` of a sample under ``mask``, causal:
    ``Σ_q visible_keys(q)`` (:func:`~hf_hdp.planning.reach.visible_keys`) in closed form per attention chunk."""
    if mask.chunk is None:
        return _sum_min(a, b, mask.window)
    c, total = mask.chunk, 0
    for c0 in range(a - a % c, b, c):
        total += _sum_min(max(a, c0) - c0, min(b, c0 + c) - c0, mask.window)
    return total


@lru_cache(maxsize=65536)
def member_work(length: int, k: int, mask: LayerMask) -> tuple[int, ...]:
    """Each member's visible (query, key) pairs for one document of ``length`` tokens zigzagged over ``k``."""
    bounds = zigzag_chunk_bounds(length, k)
    return tuple(span_work(*bounds[m], mask) + span_work(*bounds[2 * k - 1 - m], mask) for m in range(k))


def slowest_member_pairs(lengths, k: int, mask: LayerMask) -> float:
    """The slowest member's attention of a segment of ``lengths`` on ``k`` members, one layer, in the units of
    :func:`~hf_hdp.planning.reach.mask_pairs` (``s²`` for a whole full layer: twice the visible pairs)."""
    totals = [0] * k
    for s in lengths:
        for i, w in enumerate(member_work(int(s), k, mask)):
            totals[i] += w
    return 2.0 * max(totals)


class SegmentExchange(NamedTuple):
    """A segment (several documents on the same ``k`` members) under one mask, per member ``i``: the rows and the
    messages of its forward K/V exchange, sent (``sent_rows[i]`` to ``sent_messages[i]`` members) and received
    (``received_rows[i]`` from ``received_messages[i]`` members), and ``own[i]``, the visible pairs of its rows with
    its own keys. A message carries all the rows one member needs of another, every document together."""

    sent_rows: tuple[int, ...]
    sent_messages: tuple[int, ...]
    received_rows: tuple[int, ...]
    received_messages: tuple[int, ...]
    own: tuple[int, ...]


@lru_cache(maxsize=16384)
def segment_exchange(lengths: tuple[int, ...], k: int, mask: LayerMask) -> SegmentExchange:
    """:class:`SegmentExchange` of the documents ``lengths`` on ``k`` members (see :func:`doc_exchange`)."""
    sent, received, own = [0] * k, [0] * k, [0] * k
    docs = [doc_exchange(int(s), k, mask) for s in lengths]
    for ex in docs:
        for i in range(k):
            sent[i] += ex.sent[i]
            received[i] += ex.received[i]
            own[i] += ex.own[i]
    received_messages = [0] * k
    cover = [0] * (k + 1)
    for i in range(k):
        ranges = docs[0].sources[i] if len(docs) == 1 else _merge([r for ex in docs for r in ex.sources[i]])
        for a, b in ranges:
            received_messages[i] += b - a
            cover[a] += 1
            cover[b] -= 1
    sent_messages, run = [0] * k, 0
    for j in range(k):
        run += cover[j]
        sent_messages[j] = run
    return SegmentExchange(tuple(sent), tuple(sent_messages), tuple(received), tuple(received_messages), tuple(own))


def describe_layer_masks(masks: tuple, num_layers: int) -> str:
    """``"40 sliding (w=1024), 8 full"``, ``"36 chunked (c=8192), 12 full"``; ``"32 full"`` without masks."""
    groups = group_masks(tuple(masks))
    if not groups:
        return f"{num_layers} full"
    parts, full = [], 0
    for m, n in groups:
        if m.full:
            full += n
        elif m.chunk is None:
            parts.append(f"{n} sliding (w={m.window:,})")
        elif m.window is None:
            parts.append(f"{n} chunked (c={m.chunk:,})")
        else:
            parts.append(f"{n} sliding and chunked (w={m.window:,}, c={m.chunk:,})")
    if full:
        parts.append(f"{full} full")
    return ", ".join(parts)


def pattern_masks(
    num_layers: int, window: int | None = None, chunk: int | None = None, layers: str | None = None
) -> tuple[LayerMask, ...]:
    """One mask per layer: ``LayerMask(window, chunk)`` on the layers ``layers`` names, the others full.

    ``layers``: ``None`` or ``"all"`` (every layer), a count ``"40"`` (that many layers; their order does not
    change the cost), or a pattern ``"5:1"`` (5 restricted layers then 1 full, repeated from the first layer,
    as Gemma 3's ``layer_types``). ``ValueError`` on anything else.
    """
    restricted = LayerMask(window, chunk)
    if restricted.full:
        if layers not in (None, "all"):
            raise ValueError("a layer pattern needs a sliding window or an attention chunk")
        return (FULL,) * num_layers
    text = "all" if layers is None else str(layers).strip().lower()
    if text == "all":
        return (restricted,) * num_layers
    if ":" in text:
        a, _, b = text.partition(":")
        try:
            on, off = int(a), int(b)
        except ValueError:
            raise ValueError(f"expected a pattern such as 5:1 (restricted:full layers), got {layers!r}") from None
        if on < 0 or off < 0 or on + off == 0:
            raise ValueError(f"a layer pattern needs non-negative counts, not both 0, got {layers!r}")
        return tuple(restricted if i % (on + off) < on else FULL for i in range(num_layers))
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"expected 'all', a number of layers or a pattern such as 5:1, got {layers!r}") from None
    if not 0 <= n <= num_layers:
        raise ValueError(f"the model has {num_layers} layers; cannot restrict {n}")
    return (restricted,) * n + (FULL,) * (num_layers - n)
