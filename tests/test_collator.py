"""The length-aware collator: padding-free packing, global positions, pre-shift labels, metadata.

Every sample used here encodes (sample, position) in its token ids, ``id = sample * B + position``,
so any packed token can be traced back to where it came from.
"""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest
import torch
from plan_helpers import random_plan

from hf_hdp.attention.metadata import HDPAttentionMetadata
from hf_hdp.collators import IGNORE_INDEX, HDPCollator, HDPDataError, count_loss_tokens, shifted_targets
from hf_hdp.planning import MicroBatch, Piece, build_plan, plan_naive, plan_static, zigzag_front_back

B = 100_000  # position base of the encoded token ids
LBASE = 50_000_000  # offset of the encoded label ids (so labels never equal input ids)
CPU = torch.device("cpu")


# ----------------------------------------------------------------- helpers
def enc(s: int, t: int) -> int:
    return s * B + t


def dec(v: int) -> tuple[int, int]:
    return divmod(int(v), B)


def dec_label(v: int) -> tuple[int, int]:
    return divmod(int(v) - LBASE, B)


def random_lengths(rng: random.Random, world: int, cap: int) -> list[int]:
    """A mix of tiny (< 2k), local, odd-sized and distributed lengths, none above world * cap."""
    n = rng.randint(6, 12)
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.3:
            out.append(rng.randint(1, 7))  # shorter than 2k for any k >= 4
        elif kind < 0.6:
            out.append(rng.randint(1, cap))
        else:
            out.append(rng.randint(cap + 1, world * cap))
    # make sure at least one long, odd length not divisible by 2k shows up
    out.append(world * cap - 1 if (world * cap - 1) % 2 else world * cap - 3)
    return out


def make_samples(lengths, with_labels: bool, rng: random.Random | None = None):
    """Encoded samples; with labels, a random prompt prefix is masked with -100 (SFT style)."""
    samples = {}
    for s, n in enumerate(lengths):
        row = {"input_ids": [enc(s, t) for t in range(n)]}
        if with_labels:
            prompt = rng.randint(0, n) if rng is not None else n // 2
            row["labels"] = [IGNORE_INDEX if t < prompt else LBASE + enc(s, t) for t in range(n)]
        samples[s] = row
    return samples


def plans(world: int, cap: int, lengths, rng: random.Random):
    yield plan_naive(lengths, world, cap).validate()
    yield plan_static(lengths, world, cap).validate()
    for _ in range(3):
        yield random_plan(lengths, world, cap, rng).validate()


def cases(n_seeds: int = 6):
    """(plan, lengths, rng) over naive/static/random plans on 4..6 ranks with C in 8..16."""
    for seed in range(n_seeds):
        rng = random.Random(seed)
        world = 4 + seed % 3
        cap = rng.randint(8, 16)
        lengths = random_lengths(rng, world, cap)
        for plan in plans(world, cap, lengths, rng):
            yield plan, lengths, rng


def pack_all(plan, samples, collator=None, rows=None, step=0):
    """Every micro-batch of the plan, packed: {(slot, rank): batch}."""
    collator = collator or HDPCollator()
    return {(mb.slot, mb.rank): collator(mb, samples, rows=rows, step=step) for mb in plan.micro_batches}


def find_segment(batch, group, samples_key):
    for seg in batch["hdp_metadata"].rings:
        if seg.group == group and seg.samples == samples_key:
            return seg
    raise AssertionError(f"no ring segment for group {group} samples {samples_key}")


# ------------------------------------------------------ token accounting
def test_every_token_lands_exactly_once_and_regions_are_contiguous():
    n_plans = 0
    for plan, lengths, _ in cases():
        n_plans += 1
        samples = make_samples(lengths, with_labels=False)
        packed = pack_all(plan, samples)
        seen = Counter()
        for mb in plan.micro_batches:
            out = packed[mb.slot, mb.rank]
            ids, pos, labels = out["input_ids"], out["position_ids"], out["labels"]
            meta: HDPAttentionMetadata = out["hdp_metadata"]
            assert ids.dtype == pos.dtype == labels.dtype == torch.long
            assert ids.shape == pos.shape == labels.shape and ids.shape[0] == 1
            T = ids.shape[1]
            assert plan.tokens_per_rank >= T, (plan.planner, mb)
            assert T == meta.num_tokens == mb.num_tokens
            assert meta.rank == mb.rank and meta.slot == mb.slot
            # regions: [local | seg 0 | seg 1 | ...], contiguous, covering T
            assert sum(meta.local_seqlens) == meta.local_len
            assert meta.local_len + sum(seg.end - seg.start for seg in meta.rings) == T
            cursor = meta.local_len
            for seg in meta.rings:
                assert seg.start == cursor and seg.end >= seg.start
                cursor = seg.end
            assert cursor == T
            firsts = [seg.samples[0] for seg in meta.rings]
            assert firsts == sorted(firsts) and len(set(firsts)) == len(firsts)
            for seg in meta.rings:
                assert list(seg.samples) == sorted(seg.samples)
            decoded = [dec(v) for v in ids[0].tolist()]
            seen.update(decoded)
            # local region: whole sequences, in sample order, as named by local_samples
            off = 0
            assert list(meta.local_samples) == sorted(meta.local_samples)
            for s, n in zip(meta.local_samples, meta.local_seqlens):
                assert n == lengths[s]
                assert decoded[off : off + n] == [(s, t) for t in range(n)]
                off += n
            # pieces of the plan and packed samples agree
            local_plan = sorted(p.sample for p in mb.pieces if not p.distributed)
            assert list(meta.local_samples) == local_plan
            ring_plan = sorted(p.sample for p in mb.pieces if p.distributed)
            assert sorted(s for seg in meta.rings for s in seg.samples) == ring_plan
        expected = Counter((s, t) for s, n in enumerate(lengths) for t in range(n))
        assert seen == expected, plan.planner
    assert n_plans >= 30


def test_ring_segment_rows_are_front_then_back_of_each_document():
    for plan, lengths, _ in cases(4):
        samples = make_samples(lengths, with_labels=False)
        packed = pack_all(plan, samples)
        for mb in plan.micro_batches:
            out = packed[mb.slot, mb.rank]
            decoded = [dec(v) for v in out["input_ids"][0].tolist()]
            for seg in out["hdp_metadata"].rings:
                m = seg.member
                row = seg.start
                for d, s in enumerate(seg.samples):
                    k = seg.k
                    front, back = seg.layout[m][d]
                    piece = next(p for p in mb.pieces if p.sample == s)
                    want = [(s, t) for a, b in piece.token_ranges(mb.rank) for t in range(a, b)]
                    got = decoded[row : row + front + back]
                    assert got == want
                    # front chunk precedes back chunk, all front positions before all back positions
                    positions = [t for _, t in got]
                    assert positions == sorted(positions)
                    assert len(want) == sum(zigzag_front_back(lengths[s], k)[m])
                    row += front + back
                assert row == seg.end


def test_position_ids_are_global_positions_within_each_sequence():
    shard_starts = []
    for plan, lengths, _ in cases():
        samples = make_samples(lengths, with_labels=False)
        for out in pack_all(plan, samples).values():
            pos = out["position_ids"][0].tolist()
            want = [dec(v)[1] for v in out["input_ids"][0].tolist()]
            assert pos == want
            # shards in the middle of a sequence keep their offset (RoPE rotates them correctly)
            for seg in out["hdp_metadata"].rings:
                if seg.end > seg.start:
                    shard_starts.append(pos[seg.start])
    assert any(p > 0 for p in shard_starts), "no shard starts mid-sequence: the cases test nothing"


# ------------------------------------------------------------- labels
def test_labels_are_shifted_before_sharding_without_labels_column():
    for plan, lengths, _ in cases():
        samples = make_samples(lengths, with_labels=False)
        for out in pack_all(plan, samples).values():
            for v, lab in zip(out["input_ids"][0].tolist(), out["labels"][0].tolist()):
                s, t = dec(v)
                if t == lengths[s] - 1:
                    assert lab == IGNORE_INDEX
                else:
                    assert lab == enc(s, t + 1), (s, t, lab)


def test_labels_are_shifted_before_sharding_with_labels_column():
    for plan, lengths, rng in cases():
        samples = make_samples(lengths, with_labels=True, rng=rng)
        for out in pack_all(plan, samples).values():
            for v, lab in zip(out["input_ids"][0].tolist(), out["labels"][0].tolist()):
                s, t = dec(v)
                want = IGNORE_INDEX if t == lengths[s] - 1 else samples[s]["labels"][t + 1]
                assert lab == want, (s, t, lab)


def test_no_label_crosses_a_sequence_boundary():
    # sample 0 = [5, 6, 7], sample 1 = [8, 9, 10, 11] packed on one rank: shifting after packing
    # would train token 7 to predict 8 (the next sequence's first token).
    samples = {0: {"input_ids": [5, 6, 7]}, 1: {"input_ids": [8, 9, 10, 11]}, 2: {"input_ids": [20, 21]}}
    plan = build_plan(
        [3, 4, 2],
        2,
        9,
        [(0, 0, [Piece(0, 3, (0,)), Piece(1, 4, (0,))]), (1, 0, [Piece(2, 2, (1,))])],
        planner="manual",
    ).validate()
    out = HDPCollator()(plan.for_rank(0)[0], samples)
    assert out["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 10, 11]
    assert out["labels"][0].tolist() == [6, 7, -100, 9, 10, 11, -100]
    assert out["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3]
    assert out["hdp_metadata"].local_seqlens == (3, 4)
    # with a labels column the same holds: the boundary token gets -100, never the next label
    samples_l = {s: dict(r, labels=[x + 1000 for x in r["input_ids"]]) for s, r in samples.items()}
    out = HDPCollator()(plan.for_rank(0)[0], samples_l)
    assert out["labels"][0].tolist() == [1006, 1007, -100, 1009, 1010, 1011, -100]


def test_shard_boundaries_keep_their_targets():
    # length 10 on (0, 1): member 0 holds [0, 2) + [7, 10), member 1 holds [2, 7).
    # Token 1 (on rank 0) must still predict token 2 (on rank 1).
    ids = list(range(100, 110))
    plan = build_plan([10], 2, 5, [(0, 0, [Piece(0, 10, (0, 1))]), (1, 0, [Piece(0, 10, (0, 1))])], "manual").validate()
    out0 = HDPCollator()(plan.for_rank(0)[0], {0: {"input_ids": ids}})
    out1 = HDPCollator()(plan.for_rank(1)[0], {0: {"input_ids": ids}})
    assert out0["input_ids"][0].tolist() == [100, 101, 107, 108, 109]
    assert out0["position_ids"][0].tolist() == [0, 1, 7, 8, 9]
    assert out0["labels"][0].tolist() == [101, 102, 108, 109, -100]
    assert out1["input_ids"][0].tolist() == [102, 103, 104, 105, 106]
    assert out1["position_ids"][0].tolist() == [2, 3, 4, 5, 6]
    assert out1["labels"][0].tolist() == [103, 104, 105, 106, 107]
    assert out0["hdp_metadata"].local_len == 0 and len(out0["hdp_metadata"].rings) == 1


def test_shifted_targets_and_count_loss_tokens():
    assert shifted_targets([1, 2, 3], None) == [2, 3, -100]
    assert shifted_targets([1, 2, 3], [-100, -100, 9]) == [-100, 9, -100]
    assert shifted_targets([7], None) == [-100]
    assert count_loss_tokens([1, 2, 3], None) == 2
    assert count_loss_tokens([1, 2, 3], [-100, -100, 9]) == 1
    assert count_loss_tokens([1, 2, 3], [5, -100, -100]) == 0  # labels[0] is never a target
    assert count_loss_tokens([1], None) == 0


def test_prompt_masking_survives_packing_and_sharding():
    for plan, lengths, rng in cases():
        samples = make_samples(lengths, with_labels=True, rng=rng)
        got = Counter()
        for out in pack_all(plan, samples).values():
            for v, lab in zip(out["input_ids"][0].tolist(), out["labels"][0].tolist()):
                if lab != IGNORE_INDEX:
                    got[dec(v)] += 1
                    assert dec_label(lab) == (dec(v)[0], dec(v)[1] + 1)
        want = {
            (s, t) for s, n in enumerate(lengths) for t in range(n - 1) if samples[s]["labels"][t + 1] != IGNORE_INDEX
        }
        assert set(got) == want and all(c == 1 for c in got.values())
        total = sum(count_loss_tokens(r["input_ids"], r["labels"]) for r in samples.values())
        assert sum(got.values()) == total


# ------------------------------------------------------------ metadata
def test_ring_metadata_layout_and_membership_agree_across_members():
    checked = 0
    for plan, lengths, _ in cases():
        samples = make_samples(lengths, with_labels=False)
        packed = pack_all(plan, samples)
        for (slot, rank), out in packed.items():
            order_here = [(seg.group, seg.samples) for seg in out["hdp_metadata"].rings]
            for seg in out["hdp_metadata"].rings:
                checked += 1
                k = seg.k
                assert k == len(seg.group) >= 2
                assert seg.group[seg.member] == rank
                assert seg.next_rank == seg.group[(seg.member + 1) % k]
                assert seg.prev_rank == seg.group[(seg.member - 1) % k]
                assert len(seg.layout) == k
                for m in range(k):
                    assert len(seg.layout[m]) == len(seg.samples)
                    for d, s in enumerate(seg.samples):
                        assert seg.layout[m][d] == zigzag_front_back(lengths[s], k)[m]
                assert seg.rows_of(seg.member) == seg.end - seg.start
                members = set()
                for m, r in enumerate(seg.group):
                    other = packed[slot, r]
                    oseg = find_segment(other, seg.group, seg.samples)
                    assert oseg.member == m
                    members.add(oseg.member)
                    assert oseg.layout == seg.layout
                    assert seg.rows_of(m) == oseg.end - oseg.start
                    # a member's next is the next member's prev
                    nseg = find_segment(packed[slot, seg.next_rank], seg.group, seg.samples)
                    assert nseg.prev_rank == rank
                    # segments shared by two ranks come in the same order on both (no deadlock)
                    order_there = [(g.group, g.samples) for g in other["hdp_metadata"].rings]
                    common_here = [x for x in order_here if x in order_there]
                    common_there = [x for x in order_there if x in order_here]
                    assert common_here == common_there
                assert members == set(range(k))
    assert checked > 50


def _rows_of_block(block, n_q, n_kv):
    q = block.q_index.tolist() if block.q_index is not None else list(range(n_q))
    kv = block.kv_index.tolist() if block.kv_index is not None else list(range(n_kv))
    cu_q, cu_k = block.cu_q.tolist(), block.cu_k.tolist()
    assert len(cu_q) == len(cu_k) and cu_q[0] == cu_k[0] == 0
    assert cu_q[-1] == len(q) and cu_k[-1] == len(kv)
    docs = []
    for n in range(len(cu_q) - 1):
        docs.append((q[cu_q[n] : cu_q[n + 1]], kv[cu_k[n] : cu_k[n + 1]]))
    return docs


def test_ring_block_schedule_covers_exactly_the_causal_keys():
    """Index-level check: over all ring steps each query row sees exactly the keys at positions <= its own."""
    segs_checked = 0
    for plan, lengths, _ in cases():
        samples = make_samples(lengths, with_labels=False)
        packed = pack_all(plan, samples)
        for (slot, _rank), out in packed.items():
            ids = out["input_ids"][0].tolist()
            for seg in out["hdp_metadata"].rings:
                segs_checked += 1
                i, k = seg.member, seg.k
                local = [dec(v) for v in ids[seg.start : seg.end]]
                seen: dict[int, list[int]] = {r: [] for r in range(len(local))}
                for step in range(k):
                    block = seg.block(step, CPU)
                    j = block.source
                    assert j == seg.source_at(step)
                    if step == 0:
                        assert block.causal and j == i
                    else:
                        assert not block.causal and j != i
                    src_out = packed[slot, seg.group[j]]
                    src_seg = find_segment(src_out, seg.group, seg.samples)
                    src = [dec(v) for v in src_out["input_ids"][0].tolist()[src_seg.start : src_seg.end]]
                    docs = _rows_of_block(block, len(local), len(src))
                    assert block.max_q == max((len(q) for q, _ in docs), default=0)
                    assert block.max_k == max((len(kv) for _, kv in docs), default=0)
                    assert block.empty == (not docs)
                    # the zigzag rule, per document, from the layout
                    q_off = kv_off = 0
                    want_docs = []
                    for (fi, bi), (fj, bj) in zip(seg.layout[i], seg.layout[j]):
                        if j == i:
                            q, kv = range(q_off, q_off + fi + bi), range(kv_off, kv_off + fj + bj)
                        elif j < i:  # all local rows attend to the source's front chunk
                            q, kv = range(q_off, q_off + fi + bi), range(kv_off, kv_off + fj)
                        else:  # only the local back chunk attends, to all source rows
                            q, kv = range(q_off + fi, q_off + fi + bi), range(kv_off, kv_off + fj + bj)
                        if len(q) and len(kv):
                            want_docs.append((list(q), list(kv)))
                        q_off += fi + bi
                        kv_off += fj + bj
                    assert docs == want_docs
                    for q_rows, kv_rows in docs:
                        if block.causal:
                            assert len(q_rows) == len(kv_rows)
                        for a, qr in enumerate(q_rows):
                            qs, qt = local[qr]
                            keys = kv_rows[: a + 1] if block.causal else kv_rows
                            for kr in keys:
                                ks, kt = src[kr]
                                assert ks == qs, "a block mixes documents"
                                assert kt <= qt, f"query at {qt} attends to a later key at {kt}"
                                seen[qr].append(kt)
                for r, (s, t) in enumerate(local):
                    assert sorted(seen[r]) == list(range(t + 1)), (s, t, sorted(seen[r]))
    assert segs_checked > 50


def test_rows_mapping_names_dataset_rows_in_metadata():
    lengths = [5, 30, 3, 17]
    plan = plan_naive(lengths, 4, 10).validate()
    samples = make_samples(lengths, with_labels=False)
    rows = {s: 1000 + 7 * s for s in range(len(lengths))}
    packed = pack_all(plan, samples, rows=rows, step=3)
    named = set()
    for out in packed.values():
        meta = out["hdp_metadata"]
        assert meta.step == 3
        named.update(meta.local_samples)
        for seg in meta.rings:
            named.update(seg.samples)
    assert named == set(rows.values())


# ------------------------------------------------------------- errors
def _single(length: int = 3) -> MicroBatch:
    return MicroBatch(rank=0, slot=0, pieces=(Piece(sample=0, length=length, group=(0,)),))


ROWS = {0: 1234}


def _raises(sample, *patterns, length=3, vocab_size=None):
    with pytest.raises(HDPDataError) as info:
        HDPCollator(vocab_size=vocab_size)(_single(length), {0: sample}, rows=ROWS)
    msg = str(info.value)
    assert re.search(r"\bsample 1234\b", msg), msg
    assert not re.search(r"\bsample 0\b", msg), msg  # the dataset row, not the batch position
    for p in patterns:
        assert re.search(p, msg, re.I), (p, msg)
    return msg


def test_empty_sample_is_refused():
    _raises({"input_ids": []}, r"empty", r"filter")


def test_labels_of_another_length_are_refused():
    _raises({"input_ids": [1, 2, 3], "labels": [1, 2]}, r"labels.*2 entries", r"input_ids.*3", r"-100")


@pytest.mark.parametrize("ids, bad", [([1, 2, 10], "10"), ([1, 99, 2], "99"), ([-1, 2, 3], "-1")])
def test_out_of_vocabulary_token_is_refused(ids, bad):
    _raises({"input_ids": ids}, rf"token id {bad}\b", r"\[0, 10\)", r"tokenizer|resize", vocab_size=10)


def test_in_vocabulary_tokens_pass():
    out = HDPCollator(vocab_size=10)(_single(), {0: {"input_ids": [0, 5, 9]}}, rows=ROWS)
    assert out["input_ids"][0].tolist() == [0, 5, 9]


def test_nested_input_ids_are_refused():
    _raises({"input_ids": [[1, 2], [3]]}, r"input_ids", r"flatten|flat", length=2)


@pytest.mark.parametrize("ids", [[1.0, 2.0, 3.0], [1, 2.5, 3], torch.tensor([1.0, 2.0, 3.0])])
def test_float_input_ids_are_refused(ids):
    _raises({"input_ids": ids}, r"input_ids", r"int")


def test_string_input_ids_are_refused():
    _raises({"input_ids": "abc"}, r"input_ids", r"tokeni[sz]e")


def test_missing_input_ids_is_refused():
    msg = _raises({"text": "hello", "labels": [1, 2, 3]}, r"input_ids", r"tokeni[sz]e")
    assert "text" in msg  # lists the columns it did find


def test_length_column_disagreeing_with_tokens_is_refused():
    _raises({"input_ids": [1, 2, 3]}, r"3 tokens", r"says 4", r"length", length=4)


def test_error_names_the_failing_row_among_many():
    # three samples on one rank, the bad one is position 1 = dataset row 77
    mb = MicroBatch(rank=0, slot=0, pieces=(Piece(0, 2, (0,)), Piece(1, 2, (0,)), Piece(2, 2, (0,))))
    samples = {0: {"input_ids": [1, 2]}, 1: {"input_ids": [1, 2], "labels": [1]}, 2: {"input_ids": [3, 4]}}
    with pytest.raises(HDPDataError, match=r"\bsample 77\b"):
        HDPCollator()(mb, samples, rows={0: 10, 1: 77, 2: 5})


def test_integer_tensor_input_ids_are_accepted():
    out = HDPCollator()(_single(), {0: {"input_ids": torch.tensor([4, 5, 6]), "labels": torch.tensor([-100, 5, 6])}})
    assert out["input_ids"][0].tolist() == [4, 5, 6]
    assert out["labels"][0].tolist() == [5, 6, -100]


@pytest.mark.parametrize("labels", [[-100, 2.5, 7, 8], [-100, [2], 7, 8], [-100, None, 7, 8], [-100, "x", 7, 8]])
def test_non_integer_labels_inside_the_sample_are_refused(labels):
    """Every label is type-checked: a float in the middle must not be cut to an int (a wrong target),
    and a nested/None/str value must raise an HDPDataError naming the row, not a bare TypeError."""
    _raises({"input_ids": [1, 2, 3, 4], "labels": labels}, r"labels", r"int", length=4)
