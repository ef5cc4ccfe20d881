"""Sliding-window and chunked layers in the cost model: compute per layer kind, and the direct exchange's exact bytes.

Pure Python and fast: brute-force counts come from :mod:`hf_hdp.planning.reach` on small layouts.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from hf_hdp.cli import main
from hf_hdp.planning.cost import HARDWARE_PRESETS, MODEL_PRESETS, CostModel, ModelSpec
from hf_hdp.planning.cost.windows import doc_exchange, pattern_masks, rect_pairs, segment_exchange
from hf_hdp.planning.layout import head_split, member_token_ranges, zigzag_front_back
from hf_hdp.planning.reach import FULL, LayerMask, mask_pairs, needed_count

BASE = CostModel.default()  # llama-7b on h100, every layer full
S = 128 * 1024


def gemma_like(layers: int = 6, window: int = 1024) -> CostModel:
    """Layers of 5 sliding (``window``) then 1 full, as Gemma 3."""
    return replace(BASE, num_layers=layers, layer_masks=pattern_masks(layers, window, None, "5:1"))


def layout_of(lengths, k):
    return tuple(tuple(zigzag_front_back(s, k)[m] for s in lengths) for m in range(k))


def brute_bytes(cost, lengths, k, mask):
    """Bytes member i sends in ONE layer under the direct protocol, from reach.needed_count."""
    lay = layout_of(lengths, k)
    kvb, acc = cost.kv_bytes_per_token, cost.grad_hop_bytes / cost.value_bytes
    return [
        kvb
        * (
            2 * sum(needed_count(lay, m, i, mask) for m in range(k) if m != i)
            + acc * sum(needed_count(lay, i, j, mask) for j in range(k) if j != i)
        )
        for i in range(k)
    ]


def brute_messages(lengths, k, mask):
    lay = layout_of(lengths, k)
    return [
        2 * sum(needed_count(lay, m, i, mask) > 0 for m in range(k) if m != i)
        + sum(needed_count(lay, i, j, mask) > 0 for j in range(k) if j != i)
        for i in range(k)
    ]


# --------------------------------------------------------------------------- compute per layer kind


def test_gemma_like_attention_time_is_the_mask_pairs_share_of_the_full_one():
    cost, full = gemma_like(), replace(BASE, num_layers=6)
    w = 1024
    expected = (5 * (2 * S * w - w * w) + S * S) / 6 / (S * S)
    assert cost.attention_time(S) / full.attention_time(S) == pytest.approx(expected, rel=1e-12)
    assert cost.attention_time(S) / full.attention_time(S) < 0.2
    # the linear and constant terms are untouched
    assert cost.sequence_time(S) - cost.attention_time(S) == pytest.approx(
        full.sequence_time(S) - full.attention_time(S)
    )
    assert cost.local_time(S) == pytest.approx(cost.attention_time(S) + cost.linear_time(S))
    # a split sample: the slowest member's rows, a little more than 1/k of it (its rows see whole windows)
    assert cost.local_time(S) / 8 < cost.piece_compute_time(S, 8) < 1.001 * cost.local_time(S) / 8


def test_a_windowed_piece_is_priced_by_its_slowest_member():
    """With a window twice the zigzag chunk, the first members' rows see fewer keys: 4 x 4,096 rows under a
    4,096-token window do 0.625 : 0.875 : 1 : 1 of the last member's pairs (measured by
    benchmarks/windowed_ring.py as CPU time: 0.63), and the piece takes the slowest member's time."""
    s, k, w = 16384, 4, 4096
    cost = replace(BASE, num_layers=1, layer_masks=(LayerMask(window=w),))
    from hf_hdp.planning.cost.windows import member_work
    from hf_hdp.planning.reach import visible_keys

    work = member_work(s, k, LayerMask(window=w))
    assert [x / work[-1] for x in work] == pytest.approx([0.625, 0.875, 1.0, 1.0], rel=1e-3)
    bounds = zigzag_front_back(s, k)
    assert sum(work) == sum(visible_keys(q, s, LayerMask(window=w)) for q in range(s))
    assert all(f + b == s // k for f, b in bounds)
    compute, _ = cost.segment_breakdown([s], k)
    assert compute == pytest.approx(cost.a * 2 * work[-1] + cost.b * s / k, rel=1e-12)
    assert cost.piece_compute_time(s, k) == pytest.approx(compute, rel=1e-12)
    # the average member (1/k of the layer) would underprice the attention by 1 - 0.875 = 12.5%
    assert compute - cost.b * s / k == pytest.approx(cost.attention_time(s) / k / 0.875, rel=1e-3)


def test_a_window_at_least_the_sample_prices_exactly_as_full():
    cost = replace(BASE, layer_masks=pattern_masks(BASE.num_layers, 4096, None, "1:1"))
    for s in (100, 4000, 4096):
        assert cost.attention_time(s) == BASE.attention_time(s)
        assert cost.sequence_time(s) == BASE.sequence_time(s)
        assert cost.local_time(s) == BASE.local_time(s)
        assert cost.piece_compute_time(s, 2) == BASE.piece_compute_time(s, 2)
    for k in (2, 3, 4):
        assert cost.segment_breakdown([4000, 96], k) == BASE.segment_breakdown([4000, 96], k)
        assert cost.segment_bytes_by_member([4000, 96], k) == BASE.segment_bytes_by_member([4000, 96], k)
        assert cost.split_breakdown([4096], tuple(range(2 * k)), 2) == BASE.split_breakdown(
            [4096], tuple(range(2 * k)), 2
        )
    assert cost.attention_time(5000) < BASE.attention_time(5000)


def test_chunked_layers_cost_the_sum_of_chunk_squares():
    c, s = 8192, 20000
    cost = replace(BASE, num_layers=4, layer_masks=pattern_masks(4, None, c, "3:1"))
    full = replace(BASE, num_layers=4)
    chunked = 2 * c * c + (s - 2 * c) ** 2
    assert mask_pairs(s, LayerMask(chunk=c)) == chunked
    assert cost.attention_time(s) == pytest.approx(BASE.a * (3 * chunked + s * s), rel=1e-12)
    assert cost.attention_time(s) < full.attention_time(s)
    assert cost.describe_layers() == "3 chunked (c=8,192), 1 full"


def test_the_uniform_model_is_unchanged():
    same = BASE.with_layer_masks((FULL,) * BASE.num_layers)
    assert same == BASE and same.layer_masks == () and hash(same) == hash(BASE)
    assert BASE.describe_layers() == "32 full"
    for s, k in ((S, 8), (20000, 3)):
        assert BASE.segment_messages(k, 1, [s]) == BASE.segment_messages(k) == 32 * (3 * k - 2)
        assert BASE.segment_messages_by_member([s], k) == [32 * (3 * k - 2)] * k
        assert BASE.ring_bytes(s, k) == pytest.approx(sum(BASE.segment_bytes_by_member([s], k)) / k)
    with pytest.raises(ValueError):
        replace(BASE, layer_masks=(FULL,) * 3)


def test_cost_models_stay_hashable_and_json_friendly():
    cost = gemma_like(BASE.num_layers)
    hash(cost)
    d = cost.to_dict()
    json.dumps(d)
    assert len(d["layer_masks"]) == 32 and d["layer_masks"][0] == {"window": 1024, "chunk": None}
    assert (
        CostModel(
            **{
                **d,
                "intra_bandwidth": BASE.intra_bandwidth,
                "inter_bandwidth": BASE.inter_bandwidth,
                "ranks_per_node": BASE.ranks_per_node,
            }
        ).layer_masks
        == cost.layer_masks
    )
    assert cost.describe_layers() == "27 sliding (w=1,024), 5 full"


# --------------------------------------------------------------------------- the direct exchange, exactly


def _brute_pairs(a, b, x, y, m):
    return sum(
        1
        for q in range(a, b)
        for kk in range(x, y)
        if kk <= q and (m.window is None or q - kk < m.window) and (m.chunk is None or q // m.chunk == kk // m.chunk)
    )


def test_the_fast_exchange_counts_equal_reach_brute_force():
    rng = random.Random(0)
    for _trial in range(400):
        k = rng.randint(2, 7)
        lengths = tuple(rng.randint(1, 70) for _ in range(rng.randint(1, 3)))
        mask = LayerMask(rng.choice([None, 1, 2, 3, 5, 9, 16, 200]), rng.choice([None, None, 3, 4, 7, 16]))
        lay = layout_of(lengths, k)
        ex = segment_exchange(lengths, k, mask)
        need = [[needed_count(lay, i, j, mask) if i != j else 0 for j in range(k)] for i in range(k)]
        case = (lengths, k, mask)
        assert list(ex.received_rows) == [sum(row) for row in need], case
        assert list(ex.sent_rows) == [sum(need[i][j] for i in range(k)) for j in range(k)], case
        assert list(ex.received_messages) == [sum(n > 0 for n in row) for row in need], case
        assert list(ex.sent_messages) == [sum(need[i][j] > 0 for i in range(k)) for j in range(k)], case
        for i in range(k):
            own = sum(
                _brute_pairs(a, b, x, y, mask)
                for s in lengths
                for a, b in member_token_ranges(s, k, i)
                for x, y in member_token_ranges(s, k, i)
            )
            assert ex.own[i] == own, case
    for _ in range(300):
        m = LayerMask(rng.choice([None, 1, 4, 9]), rng.choice([None, 2, 5]))
        qa, ka = rng.randint(0, 30), rng.randint(0, 30)
        qb, kb = qa + rng.randint(0, 15), ka + rng.randint(0, 15)
        assert rect_pairs((qa, qb), (ka, kb), m) == _brute_pairs(qa, qb, ka, kb, m)


@pytest.mark.parametrize("lengths,k,window", [([300], 4, 20), ([250, 97], 3, 40), ([500], 5, 128), ([64, 300], 2, 200)])
def test_windowed_ring_bytes_equal_the_protocol_and_beat_the_relay_ring(lengths, k, window):
    masks = pattern_masks(6, window, None, "5:1")
    cost = replace(BASE, num_layers=6, layer_masks=masks)
    full = replace(BASE, num_layers=6)
    per_layer = brute_bytes(cost, lengths, k, LayerMask(window=window))
    ring = [b / 6 for b in full.segment_bytes_by_member(lengths, k)]
    expected = [5 * w + r for w, r in zip(per_layer, ring)]
    assert cost.segment_bytes_by_member(lengths, k) == pytest.approx(expected, rel=1e-12)
    assert all(w < r for w, r in zip(per_layer, ring))
    assert sum(cost.segment_bytes_by_member(lengths, k)) < sum(full.segment_bytes_by_member(lengths, k))
    msgs = brute_messages(lengths, k, LayerMask(window=window))
    assert cost.segment_messages_by_member(lengths, k) == [5 * m + (3 * k - 2) for m in msgs]
    assert cost.segment_messages(k, 1, lengths, member=1) == 5 * msgs[1] + 3 * k - 2


def test_chunked_ring_bytes_equal_the_protocol():
    cost = replace(BASE, num_layers=4, layer_masks=pattern_masks(4, None, 64, "all"))
    lengths, k = [400, 130], 4
    assert cost.segment_bytes_by_member(lengths, k) == pytest.approx(
        [4 * b for b in brute_bytes(cost, lengths, k, LayerMask(chunk=64))], rel=1e-12
    )


def test_windowed_ring_pieces_expose_less_than_the_relay_ring():
    cost = gemma_like(BASE.num_layers)
    for k in (2, 4, 16):
        c_full, e_full = BASE.segment_breakdown([S], k, True)
        c_win, e_win = cost.segment_breakdown([S], k, True)
        assert cost.local_time(S) / k <= c_win < 1.01 * cost.local_time(S) / k  # the slowest member's rows
        assert 0 < e_win < e_full
    # with a slow link the direct messages of a member are exposed beyond its own-rows block
    slow = replace(cost, inter_bandwidth=1e6)
    assert slow.segment_breakdown([S], 4, True)[1] > cost.segment_breakdown([S], 4, True)[1]
    # and the overlap of the dK/dV messages helps
    assert (
        replace(slow, overlap_grad_hops=True).segment_breakdown([S], 4, True)[1]
        < slow.segment_breakdown([S], 4, True)[1]
    )


def test_ulysses_segments_use_the_direct_exchange_over_the_positions():
    spec = MODEL_PRESETS["llama-70b"]  # GQA: 64 query heads, 8 K/V heads
    full = replace(CostModel.from_specs(spec, HARDWARE_PRESETS["h100"]), num_layers=6)
    window = 50
    cost = replace(full, layer_masks=pattern_masks(6, window, None, "5:1"))
    lengths, k, u = [600, 333], 8, 2
    r = k // u
    got, ref = cost.segment_bytes_by_member(lengths, k, u), full.segment_bytes_by_member(lengths, k, u)
    # the all-to-alls and the full layer's ring are unchanged: the difference is the windowed layers' ring
    lay = layout_of(lengths, r)
    acc = cost.grad_hop_bytes / cost.value_bytes
    ring_full = [b / 6 for b in full.segment_bytes_by_member(lengths, r)]  # a plain ring over the positions...
    mask = LayerMask(window=window)
    splits = head_split(cost.num_heads, cost.num_kv_heads, u)
    for m in range(k):
        p, j = divmod(m, u)
        per_row = 2 * len(splits[j].kv_heads) * cost.head_bytes
        direct = per_row * (
            2 * sum(needed_count(lay, q, p, mask) for q in range(r) if q != p)
            + acc * sum(needed_count(lay, p, q, mask) for q in range(r) if q != p)
        )
        relay = ring_full[p] * per_row / cost.kv_bytes_per_token  # ...carrying this member's heads
        assert ref[m] - got[m] == pytest.approx(5 * (relay - direct), rel=1e-9)
        assert direct < relay
    msgs = cost.segment_messages_by_member(lengths, k, u)
    per_pos = brute_messages(lengths, r, mask)
    assert msgs == [6 * 6 * (u - 1) + 5 * per_pos[m // u] + (3 * r - 2) for m in range(k)]
    # time: the same compute share, less exposed ring
    c0, e0 = full.head_parallel_breakdown([S], 16, 2, False, True)
    c1, e1 = cost.head_parallel_breakdown([S], 16, 2, False, True)
    assert c1 == pytest.approx(cost.local_time(S) / 16) and c1 < c0
    assert e1 < e0
    # pure Ulysses (one position): only the all-to-alls, unchanged
    assert (
        cost.head_parallel_breakdown([S], 8, 8, False, False)[1]
        == full.head_parallel_breakdown([S], 8, 8, False, False)[1]
    )


def test_a_windowed_piece_is_priced_from_cached_exchanges():
    """The planner prices the same (length, group size, mask) many times: the exchange arithmetic runs once
    (how fast that is, is for benchmarks/planner_scale.py, not a test)."""
    cost = gemma_like(BASE.num_layers)
    s, group = (1 << 20) + 7, tuple(range(128))
    first = cost.split_piece_time(s, group)
    before = segment_exchange.cache_info().hits
    assert cost.split_piece_time(s, group) == first
    assert segment_exchange.cache_info().hits > before
    assert sum(doc_exchange(1 << 20, 128, LayerMask(window=1024)).received) > 0


# --------------------------------------------------------------------------- configs and the command line


def test_model_spec_reads_layer_masks_from_transformers_configs():
    from transformers import AutoConfig

    gemma = AutoConfig.for_model("gemma3_text", sliding_window=512, num_hidden_layers=12)
    spec = ModelSpec.from_config(gemma)
    assert spec.layer_masks.count(LayerMask(window=512)) == 10 and spec.layer_masks.count(FULL) == 2
    cost = CostModel.from_config(gemma)
    assert cost.layer_masks == spec.layer_masks and cost.describe_layers() == "10 sliding (w=512), 2 full"
    assert cost.attention_time(S) < replace(cost, layer_masks=()).attention_time(S)

    mistral = AutoConfig.for_model("mistral", sliding_window=4096, num_hidden_layers=4)
    assert CostModel.from_config(mistral).layer_masks == (LayerMask(window=4096),) * 4
    assert (
        CostModel.from_config(AutoConfig.for_model("mistral", sliding_window=None, num_hidden_layers=4)).layer_masks
        == ()
    )

    llama4 = AutoConfig.for_model("llama4_text", attention_chunk_size=8192, num_hidden_layers=8)
    cost = CostModel.from_config(llama4)
    assert cost.describe_layers() == "6 chunked (c=8,192), 2 full"
    assert CostModel.from_config(AutoConfig.for_model("llama", num_hidden_layers=2)).layer_masks == ()


def _step(text):
    return next(line for line in text.splitlines() if line.startswith("step time"))


def test_the_cli_prices_sliding_layers(tmp_path, capsys):
    path = tmp_path / "lengths.txt"
    path.write_text("1000\n30000\n2000\n12000\n")
    args = ["plan", "--lengths", str(path), "--world-size", "8", "--global-batch-samples", "4"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--sliding-window", "1K", "--sliding-layers", "5:1"]) == 0
    slid = capsys.readouterr().out
    assert "layers: 27 sliding (w=1,024), 5 full" in slid and "layers:" not in plain
    assert _step(slid) != _step(plain)
    assert main(args + ["--attention-chunk", "4K", "--sliding-layers", "24", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["layers"]["description"] == "24 chunked (c=4,096), 8 full"
    assert main(args + ["--sliding-layers", "5:1"]) == 2
    assert "--sliding-layers applies only" in capsys.readouterr().err
    assert main(args + ["--sliding-window", "1K", "--sliding-layers", "x"]) == 2
    capsys.readouterr()


def test_the_cli_reads_a_model_config(tmp_path, capsys):
    cfg = {
        "model_type": "gemma3_text",
        "hidden_size": 256,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "intermediate_size": 512,
        "vocab_size": 1000,
        "sliding_window": 512,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    path = tmp_path / "lengths.txt"
    path.write_text("1000\n30000\n")
    args = ["plan", "--lengths", str(path), "--world-size", "8"]
    assert main(args + ["--model-config", str(tmp_path / "config.json")]) == 0
    out = capsys.readouterr().out
    assert "layers: 5 sliding (w=512), 1 full" in out
    assert main(args + ["--model-config", str(tmp_path / "config.json"), "--model", "llama-13b"]) == 2
    # the default preset named explicitly is an input too: refused beside a config, not silently dropped
    assert main(args + ["--model-config", str(tmp_path / "config.json"), "--model", "llama-7b"]) == 2
    assert "not both" in capsys.readouterr().err
