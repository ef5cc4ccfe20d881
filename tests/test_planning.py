"""Planning: zigzag layout, the naive HDP and static-mesh planners, random plans, plan serialisation."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
from plan_helpers import random_plan

from hf_hdp.planning import (
    PLANNERS,
    CostModel,
    MicroBatch,
    Piece,
    PlanError,
    StepPlan,
    get_planner,
    make_plan,
    member_token_ranges,
    plan_naive,
    plan_static,
    zigzag_chunk_bounds,
    zigzag_front_back,
    zigzag_member_sizes,
)
from hf_hdp.planning.packing import BestFit


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------- length mixes


def random_lengths(rng: random.Random, n: int, world_size: int, tokens_per_rank: int) -> list[int]:
    """Mostly short samples with a long tail up to the largest that fits the world."""
    limit = world_size * tokens_per_rank
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.7:
            out.append(rng.randint(1, tokens_per_rank // 2))
        elif kind < 0.9:
            out.append(rng.randint(tokens_per_rank // 2, tokens_per_rank))
        else:
            out.append(rng.randint(tokens_per_rank + 1, limit) if limit > tokens_per_rank else tokens_per_rank)
    return out


def stdlib_lengths() -> list[int]:
    """A real long-tailed mix: byte sizes // 4 of the files in the Python standard library directory."""
    root = os.path.dirname(os.__file__)
    paths = (os.path.join(root, f) for f in sorted(os.listdir(root)))
    sizes = (os.path.getsize(p) // 4 for p in paths if os.path.isfile(p))
    return [s for s in sizes if s > 0]


# ------------------------------------------------------------------ plan checks


def check_plan(plan: StepPlan) -> None:
    """The invariants of docs/design.md §7, checked directly rather than only through ``validate``."""
    plan.validate()
    C = plan.tokens_per_rank
    # No micro-batch holds more than C tokens. One may hold none only when each of its pieces is
    # shorter than its group (the static mesh cuts even tiny samples over all CP ranks).
    for mb in plan.micro_batches:
        assert mb.num_tokens <= C, (mb.rank, mb.slot, mb.num_tokens)
        assert mb.num_tokens > 0 or all(p.length < p.k for p in mb.pieces), mb
    # Every sample has exactly one piece; its members' ranges partition [0, s).
    pieces = plan.pieces()
    assert [p.sample for p in pieces] == list(range(len(plan.lengths)))
    for p in pieces:
        ranges = sorted(r for rank in p.group for r in p.token_ranges(rank))
        assert ranges[0][0] == 0 and ranges[-1][1] == p.length
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), ranges
        assert sum(p.tokens_on(rank) for rank in p.group) == p.length
    # All members hold a piece in one slot.
    where: dict[int, set[tuple[int, int]]] = {}
    for mb in plan.micro_batches:
        for p in mb.pieces:
            where.setdefault(p.sample, set()).add((mb.rank, mb.slot))
    for p in pieces:
        assert {r for r, _ in where[p.sample]} == set(p.group)
        assert len({s for _, s in where[p.sample]}) == 1


def placements(plan: StepPlan) -> dict[tuple[int, int], list[tuple[int, tuple[int, ...]]]]:
    """``(rank, slot) -> [(sample, group), ...]``, for exact expectations."""
    return {(mb.rank, mb.slot): [(p.sample, p.group) for p in mb.pieces] for mb in plan.micro_batches}


MIX_CASES = [(seed, world) for seed in range(4) for world in (1, 2, 3, 5, 8)]


# ----------------------------------------------------------------------- layout


@pytest.mark.parametrize("k", range(1, 10))
def test_member_sizes_sum_to_length_and_never_exceed_ceil(k):
    for s in range(0, 60):
        sizes = zigzag_member_sizes(s, k)
        assert len(sizes) == k and sum(sizes) == s
        assert sizes == tuple(s // k + (i < s % k) for i in range(k))
        assert max(sizes) == ceil_div(s, k)
        assert [f + b for f, b in zigzag_front_back(s, k)] == list(sizes)


@pytest.mark.parametrize("k", range(1, 10))
def test_chunk_bounds_partition_the_sequence(k):
    for s in range(0, 60):
        bounds = zigzag_chunk_bounds(s, k)
        assert len(bounds) == 2 * k
        assert bounds[0][0] == 0 and bounds[-1][1] == s
        assert all(a[1] == b[0] and a[0] <= a[1] for a, b in zip(bounds, bounds[1:]))


@pytest.mark.parametrize("k", range(1, 10))
def test_member_holds_chunks_i_and_mirror(k):
    for s in range(0, 60):
        bounds = zigzag_chunk_bounds(s, k)
        fb = zigzag_front_back(s, k)
        covered = []
        for i in range(k):
            front, back = bounds[i], bounds[2 * k - 1 - i]
            assert (front[1] - front[0], back[1] - back[0]) == fb[i]
            tokens = [t for a, b in member_token_ranges(s, k, i) for t in range(a, b)]
            assert tokens == list(range(*front)) + list(range(*back))
            covered += tokens
        assert sorted(covered) == list(range(s))


def test_layout_examples():
    # Divisible: 16 tokens on 4 ranks, chunks of 2; the middle member's chunks touch and merge.
    assert member_token_ranges(16, 4, 0) == [(0, 2), (14, 16)]
    assert member_token_ranges(16, 4, 3) == [(6, 10)]
    # Not divisible by 2k: 10 tokens on 3 ranks hold 4, 3, 3.
    assert zigzag_member_sizes(10, 3) == (4, 3, 3)
    assert zigzag_front_back(10, 3) == ((2, 2), (1, 2), (1, 2))
    assert zigzag_chunk_bounds(10, 3) == ((0, 2), (2, 3), (3, 4), (4, 6), (6, 8), (8, 10))
    assert member_token_ranges(10, 3, 0) == [(0, 2), (8, 10)]
    assert member_token_ranges(10, 3, 2) == [(3, 6)]
    # s < 2k: empty chunks are dropped from a member's ranges.
    assert zigzag_chunk_bounds(3, 2) == ((0, 1), (1, 1), (1, 2), (2, 3))
    assert member_token_ranges(3, 2, 0) == [(0, 1), (2, 3)]
    assert member_token_ranges(3, 2, 1) == [(1, 2)]
    assert member_token_ranges(2, 4, 3) == []
    # k == 1 holds the whole sequence.
    assert member_token_ranges(7, 1, 0) == [(0, 7)]


def test_layout_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k=0"):
        zigzag_member_sizes(5, 0)
    with pytest.raises(ValueError, match="negative"):
        zigzag_member_sizes(-1, 2)
    with pytest.raises(ValueError, match="member 3"):
        member_token_ranges(10, 3, 3)


# ---------------------------------------------------------------- naive planner


@pytest.mark.parametrize("seed,world", MIX_CASES)
def test_naive_random_mix(seed, world):
    C = 64
    lengths = random_lengths(random.Random(seed), 40, world, C)
    plan = plan_naive(lengths, world, C)
    check_plan(plan)
    assert plan.planner == "naive"
    for p in plan.pieces():
        assert p.k == ceil_div(p.length, C)
        assert list(p.group) == sorted(p.group)
    # A distributed piece never shares its micro-batch with another distributed piece, and every
    # micro-batch holds tokens (k = ceil(s / C) <= s).
    for mb in plan.micro_batches:
        assert sum(p.distributed for p in mb.pieces) <= 1
        assert mb.num_tokens > 0


def test_naive_uses_odd_group_sizes_on_8_ranks():
    C = 100
    lengths = [650, 450, 250, 30, 70, 120, 800, 5]
    plan = plan_naive(lengths, 8, C)
    check_plan(plan)
    assert plan.group_sizes() == {1: 3, 2: 1, 3: 1, 5: 1, 7: 1, 8: 1}
    assert {p.sample: p.k for p in plan.pieces()} == {i: ceil_div(s, C) for i, s in enumerate(lengths)}


def test_naive_exact_small_plan():
    # Sample 0 (k=3) takes ranks 0-2 in slot 0. Sample 2 (k=2) takes rank 3 (no slot yet) and
    # rank 1 (fewest tokens of the rest), in slot 1: rank 3 skips slot 0. Sample 1 (5 tokens) fits
    # only rank 3's empty slot 0; sample 3 (3 tokens) goes best-fit into the spare 4 tokens next
    # to sample 2, earliest slot then lowest rank.
    plan = plan_naive([25, 5, 12, 3], 4, 10)
    check_plan(plan)
    assert placements(plan) == {
        (0, 0): [(0, (0, 1, 2))],
        (1, 0): [(0, (0, 1, 2))],
        (2, 0): [(0, (0, 1, 2))],
        (3, 0): [(1, (3,))],
        (1, 1): [(2, (1, 3)), (3, (1,))],
        (3, 1): [(2, (1, 3))],
    }


def test_naive_opens_slots_on_the_lightest_rank():
    plan = plan_naive([10, 10, 4, 10], 2, 10)
    check_plan(plan)
    # Longest first: 10s go to ranks 0, 1, then 0 again (tie on tokens -> fewer slots -> rank id);
    # the 4 then opens a slot on rank 1, the lightest.
    assert placements(plan) == {
        (0, 0): [(0, (0,))],
        (1, 0): [(1, (1,))],
        (0, 1): [(3, (0,))],
        (1, 1): [(2, (1,))],
    }


def test_naive_stdlib_mix():
    lengths = stdlib_lengths()
    plan = plan_naive(lengths, 8, 8192)
    check_plan(plan)
    assert all(p.k == ceil_div(p.length, 8192) for p in plan.pieces())
    assert max(plan.group_sizes()) > 1


# --------------------------------------------------------------- static planner


@pytest.mark.parametrize(
    "world,max_len,cp",
    [
        (8, 250, 4),  # needs 3 ranks -> 4
        (6, 350, 6),  # needs 4 ranks -> 6
        (8, 100, 1),  # fits one rank: plain data parallel
        (7, 150, 7),  # prime world: any need above 1 takes the whole world
        (12, 450, 6),  # needs 5 -> 6
    ],
)
def test_static_cp_rounds_up_to_a_divisor(world, max_len, cp):
    C = 100
    lengths = [max_len, 3, 60, 99, 1, 40, 100]
    plan = plan_static(lengths, world, C)
    check_plan(plan)
    assert plan.meta == {"cp": cp, "dp": world // cp}
    groups = {tuple(range(d * cp, (d + 1) * cp)) for d in range(world // cp)}
    for p in plan.pieces():
        assert p.group in groups


@pytest.mark.parametrize("seed,world", MIX_CASES)
def test_static_random_mix(seed, world):
    C = 64
    lengths = random_lengths(random.Random(seed), 40, world, C)
    plan = plan_static(lengths, world, C)
    check_plan(plan)
    assert plan.planner == "static"
    cp, dp = plan.meta["cp"], plan.meta["dp"]
    assert cp * dp == world and world % cp == 0
    assert cp >= ceil_div(max(lengths), C)
    # Every rank of a CP group runs the same micro-batches, in slots 0, 1, 2, ...
    dp_tokens = []
    for d in range(dp):
        group = tuple(range(d * cp, (d + 1) * cp))
        per_rank = [[(mb.slot, mb.pieces) for mb in plan.for_rank(r)] for r in group]
        assert all(x == per_rank[0] for x in per_rank)
        assert [slot for slot, _ in per_rank[0]] == list(range(len(per_rank[0])))
        assert all(p.group == group for _, ps in per_rank[0] for p in ps)
        dp_tokens.append(sum(p.length for _, ps in per_rank[0] for p in ps))
    # Greedy balancing: the DP groups differ by at most one micro-batch's tokens.
    biggest = max(sum(p.length for p in mb.pieces) for mb in plan.micro_batches)
    assert max(dp_tokens) - min(dp_tokens) <= biggest


def test_static_short_samples_pay_for_the_long_one():
    plan = plan_static([350, 5, 5], 4, 100)
    check_plan(plan)
    # CP = 4 for the 350; the 5s are cut over the same 4 ranks and fit next to it (weight 2 each).
    assert plan.group_sizes() == {4: 3}
    assert plan.num_slots == 1
    assert all(len(mb.pieces) == 3 for mb in plan.micro_batches)


def test_static_stdlib_mix():
    lengths = stdlib_lengths()
    plan = plan_static(lengths, 8, 8192)
    check_plan(plan)
    need = ceil_div(max(lengths), 8192)
    assert plan.meta["cp"] == min(d for d in (1, 2, 4, 8) if d >= need)


# ----------------------------------------------------------------- random plans


@pytest.mark.parametrize("seed,world", MIX_CASES)
def test_random_plans_are_valid(seed, world):
    rng = random.Random(seed)
    C = 64
    lengths = random_lengths(rng, 30, world, C)
    plan = random_plan(lengths, world, C, rng)
    check_plan(plan)


def test_random_plans_explore_many_shapes():
    rng = random.Random(0)
    oversized = unordered = shared = gaps = 0
    for _ in range(30):
        lengths = random_lengths(rng, 30, 6, 64)
        plan = random_plan(lengths, 6, 64, rng)
        check_plan(plan)
        for p in plan.pieces():
            oversized += p.k > ceil_div(p.length, 64)
            unordered += list(p.group) != sorted(p.group)
        shared += sum(sum(p.distributed for p in mb.pieces) > 1 for mb in plan.micro_batches)
        gaps += sum([mb.slot for mb in plan.for_rank(r)] != list(range(len(plan.for_rank(r)))) for r in range(6))
    assert oversized and unordered and shared and gaps


def test_random_plan_stdlib_mix():
    lengths = stdlib_lengths()
    check_plan(random_plan(lengths, 8, 8192, random.Random(1)))


# ------------------------------------------------------- determinism and JSON


@pytest.mark.parametrize("name", sorted(PLANNERS))
def test_planners_are_deterministic(name):
    lengths = random_lengths(random.Random(7), 60, 8, 128)
    a, b = make_plan(name, lengths, 8, 128), make_plan(name, list(lengths), 8, 128)
    assert a == b and a.to_json() == b.to_json() and a.fingerprint() == b.fingerprint()


@pytest.mark.parametrize("make", [plan_naive, plan_static, lambda *a: random_plan(*a, random.Random(3))])
def test_json_round_trip(make):
    plan = make(random_lengths(random.Random(5), 50, 8, 128), 8, 128)
    back = StepPlan.from_json(plan.to_json())
    assert back == plan
    assert back.fingerprint() == plan.fingerprint()
    back.validate()


def test_fingerprint_changes_with_the_plan():
    lengths = random_lengths(random.Random(2), 50, 8, 128)
    naive = plan_naive(lengths, 8, 128)
    assert naive.fingerprint() != plan_static(lengths, 8, 128).fingerprint()
    # Reversing one distributed group's member order changes which tokens each rank holds.
    mbs = list(naive.micro_batches)
    i = next(j for j, mb in enumerate(mbs) if mb.pieces[0].distributed)
    target = mbs[i].pieces[0]
    flipped = Piece(sample=target.sample, length=target.length, group=target.group[::-1])
    mbs = [MicroBatch(mb.rank, mb.slot, tuple(flipped if p == target else p for p in mb.pieces)) for mb in mbs]
    changed = StepPlan(naive.world_size, naive.tokens_per_rank, naive.lengths, tuple(mbs), naive.planner)
    changed.validate()
    assert changed != naive and changed.fingerprint() != naive.fingerprint()


# ----------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", sorted(PLANNERS))
def test_too_long_sample_names_sample_and_fix(name):
    with pytest.raises(PlanError) as err:
        make_plan(name, [5, 1000, 3], 4, 100)
    msg = str(err.value)
    assert "sample 1" in msg and "1000" in msg and "400" in msg
    assert "raise tokens_per_rank or use more ranks" in msg
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("name", sorted(PLANNERS))
def test_empty_sample_is_rejected(name):
    with pytest.raises(PlanError, match="sample 2 has length 0"):
        make_plan(name, [5, 7, 0], 4, 100)


@pytest.mark.parametrize("name", sorted(PLANNERS))
def test_bad_world_or_capacity(name):
    with pytest.raises(PlanError, match="world_size"):
        make_plan(name, [5], 0, 100)
    with pytest.raises(PlanError, match="tokens_per_rank"):
        make_plan(name, [5], 2, 0)


@pytest.mark.parametrize("name", sorted(PLANNERS))
def test_empty_batch_gives_empty_plan(name):
    plan = make_plan(name, [], 4, 100).validate()
    assert plan.micro_batches == () and plan.num_slots == 0


def test_unknown_planner_lists_valid_names():
    with pytest.raises(ValueError, match="unknown planner 'fancy'.*naive, static"):
        make_plan("fancy", [5], 2, 10)


def test_make_plan_dispatches():
    assert make_plan("naive", [30, 5], 2, 20) == plan_naive([30, 5], 2, 20)
    assert make_plan("static", [30, 5], 2, 20) == plan_static([30, 5], 2, 20)


def test_get_planner_binds_only_the_keywords_a_planner_takes():
    cost = CostModel(1e-9, 1e-6, 0.0)
    balanced = get_planner("balanced", cost, delta=0.2)
    assert balanced.keywords == {"cost": cost, "delta": 0.2}
    assert get_planner("naive", cost, delta=0.2) is plan_naive
    assert get_planner("static") is plan_static
    with pytest.raises(TypeError, match="no planner takes detla"):
        get_planner("balanced", cost, detla=0.2)


def test_best_fit_takes_the_tightest_bin_then_the_smallest_key():
    bins = BestFit()
    for key, free in (((2,), 5), ((0,), 9), ((1,), 5), ((3,), 0)):
        bins.add(key, free)
    assert bins.fits(9) and not bins.fits(10)
    assert bins.take(4) == (1,)  # 5 free in bins 1 and 2: the smaller key
    assert bins.take(6) == (0,)
    bins.discard((2,), 5)
    assert bins.take(1) is None and not bins.fits(1)  # bin 3 was full, so never kept
    with pytest.raises(KeyError):
        bins.discard((2,), 5)


def test_planning_does_not_import_torch():
    code = "import sys, hf_hdp.planning; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_no_planning_module_imports_torch_or_matplotlib():
    code = (
        "import importlib, pkgutil, sys, hf_hdp.planning as p\n"
        "for m in pkgutil.walk_packages(p.__path__, 'hf_hdp.planning.'):\n"
        "    importlib.import_module(m.name)\n"
        "import hf_hdp.cli\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'matplotlib'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
