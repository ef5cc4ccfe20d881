"""Step-level data loading: measuring, length checks, the global batch sampler, per-rank step datasets."""

from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np
import pytest
from datasets import Dataset

from hf_hdp.collators import IGNORE_INDEX, HDPCollator, HDPDataError, count_loss_tokens
from hf_hdp.data.checks import LENGTH_COLUMN, LOSS_TOKENS_COLUMN, check_lengths, measure_dataset
from hf_hdp.data.loader import GlobalBatchSampler, HDPStepDataset
from hf_hdp.planning import plan_naive, plan_static

B = 100_000  # token id = row * B + position


def encoded_rows(lengths, prompt_of=None):
    """Rows whose ids encode (row, position); with ``prompt_of``, SFT labels masking a prompt prefix."""
    ids = [[r * B + t for t in range(n)] for r, n in enumerate(lengths)]
    data = {"input_ids": ids}
    if prompt_of is not None:
        data["labels"] = [
            [IGNORE_INDEX if t < prompt_of(r, n) else r * B + t for t in range(n)] for r, n in enumerate(lengths)
        ]
    return data


# ------------------------------------------------------------ measure_dataset
def test_measure_adds_length_and_loss_tokens_with_labels():
    lengths = [5, 1, 8, 3, 12]
    data = encoded_rows(lengths, prompt_of=lambda r, n: min(r + 1, n))
    data["text"] = [f"row {r}" for r in range(len(lengths))]
    ds, lens, loss = measure_dataset(Dataset.from_dict(data))
    assert LENGTH_COLUMN in ds.column_names and LOSS_TOKENS_COLUMN in ds.column_names
    assert "text" in ds.column_names  # other columns are kept
    want_loss = [count_loss_tokens(i, l) for i, l in zip(data["input_ids"], data["labels"])]
    # prompt of r+1 tokens masked: targets are labels[1:] that are not -100
    assert want_loss == [sum(1 for t in range(1, n) if t >= min(r + 1, n)) for r, n in enumerate(lengths)]
    assert lens.tolist() == lengths and ds[LENGTH_COLUMN] == lengths
    assert loss.tolist() == want_loss and ds[LOSS_TOKENS_COLUMN] == want_loss
    assert lens.dtype == np.int64 and loss.dtype == np.int64


def test_measure_without_labels_counts_all_but_the_last_token():
    lengths = [4, 1, 9, 2]
    ds, lens, loss = measure_dataset(Dataset.from_dict(encoded_rows(lengths)))
    assert lens.tolist() == lengths
    assert loss.tolist() == [3, 0, 8, 1]
    assert ds[LOSS_TOKENS_COLUMN] == [3, 0, 8, 1]


def test_measure_keeps_a_correct_length_column():
    lengths = [4, 6, 2]
    data = encoded_rows(lengths)
    data["n_tok"] = list(lengths)
    ds, lens, loss = measure_dataset(Dataset.from_dict(data), length_column="n_tok")
    assert lens.tolist() == lengths and ds["n_tok"] == lengths
    assert "length" not in ds.column_names
    assert loss.tolist() == [3, 5, 1]


def test_measure_refuses_a_wrong_length_column_naming_the_row():
    data = encoded_rows([4, 6, 2, 7])
    data["length"] = [4, 6, 3, 7]  # row 2 is wrong
    with pytest.raises(HDPDataError) as info:
        measure_dataset(Dataset.from_dict(data))
    msg = str(info.value)
    assert re.search(r"\bsample 2\b", msg) and "says 3" in msg and "2 tokens" in msg, msg
    assert "length" in msg and re.search(r"drop the column", msg, re.I), msg


def test_measure_refuses_labels_of_another_length_naming_the_row():
    data = encoded_rows([4, 6, 2, 7])
    data["labels"] = [list(x) for x in data["input_ids"]]
    data["labels"][3] = data["labels"][3][:-1]
    with pytest.raises(HDPDataError) as info:
        measure_dataset(Dataset.from_dict(data))
    msg = str(info.value)
    assert re.search(r"\bsample 3\b", msg) and "6 entries" in msg and "has 7" in msg, msg


def test_measure_names_rows_beyond_the_first_map_batch():
    # datasets.map works in batches of 1000: the index must be the dataset row, not the batch position
    lengths = [3] * 1205
    data = encoded_rows(lengths)
    data["length"] = list(lengths)
    data["length"][1100] = 4
    with pytest.raises(HDPDataError, match=r"\bsample 1100\b"):
        measure_dataset(Dataset.from_dict(data))


def test_measure_requires_input_ids():
    with pytest.raises(HDPDataError, match=r"no `input_ids` column.*text.*tokeni[sz]er"):
        measure_dataset(Dataset.from_dict({"text": ["a", "b"]}))


# ------------------------------------------------------------- check_lengths
def test_check_lengths_accepts_placeable_samples():
    check_lengths(np.array([1, 40, 7]), 4, 10)


def test_check_lengths_names_the_first_empty_sample():
    with pytest.raises(HDPDataError) as info:
        check_lengths(np.array([3, 5, 0, 2, 0]), 4, 10)
    msg = str(info.value)
    assert re.search(r"\bsample 2 is empty\b", msg) and "1 more" in msg, msg
    assert re.search(r"filter", msg, re.I), msg


def test_check_lengths_names_the_first_too_long_sample_and_the_required_capacity():
    with pytest.raises(HDPDataError) as info:
        check_lengths(np.array([3, 41, 5, 57, 40]), 4, 10)
    msg = str(info.value)
    assert re.search(r"\bsample 1 has 41 tokens\b", msg), msg
    assert "4 x 10 = 40" in msg and "1 more" in msg, msg
    # ceil(57 / 4) = 15 holds every sample
    assert re.search(r"tokens_per_rank to at least 15\b", msg), msg
    check_lengths(np.array([3, 41, 5, 57, 40]), 4, 15)


# -------------------------------------------------------- GlobalBatchSampler
def test_sampler_batches_cover_every_row_once_per_epoch_and_change_between_epochs():
    s = GlobalBatchSampler(23, 5, seed=7)
    assert len(s) == 5
    assert list(s) == [[(0, i)] for i in range(5)]
    epochs = []
    for epoch in range(3):
        batches = [s.batch_rows(epoch, i) for i in range(len(s))]
        assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
        flat = [r for b in batches for r in b]
        assert sorted(flat) == list(range(23))
        assert all(isinstance(r, int) for r in flat)
        epochs.append(flat)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != epochs[2]
    s.set_epoch(2)
    assert list(s)[0] == [(2, 0)]


def test_sampler_depends_only_on_seed_epoch_step():
    a = GlobalBatchSampler(40, 6, seed=3)
    b = GlobalBatchSampler(40, 6, seed=3)
    b.set_epoch(5)  # the sampler's current epoch does not change the batch of a key
    for epoch in range(3):
        for step in range(len(a)):
            assert a.batch_rows(epoch, step) == b.batch_rows(epoch, step)
    assert GlobalBatchSampler(40, 6, seed=4).batch_rows(0, 0) != a.batch_rows(0, 0)
    # the global batch is the same whatever the world size: step datasets of 1 and 4 ranks agree
    lengths = np.array([3] * 40)
    ds = Dataset.from_dict(encoded_rows([3] * 40))
    one = HDPStepDataset(ds, lengths, lengths - 1, a, plan_naive, 1, 0, 200, HDPCollator())
    four = HDPStepDataset(ds, lengths, lengths - 1, b, plan_naive, 4, 2, 50, HDPCollator())
    for step in range(len(a)):
        assert one.plan(1, step)[0] == four.plan(1, step)[0] == a.batch_rows(1, step)


def test_sampler_drop_last_and_len():
    assert len(GlobalBatchSampler(23, 5, drop_last=True)) == 4
    assert len(GlobalBatchSampler(23, 5, drop_last=False)) == 5
    assert len(GlobalBatchSampler(20, 5, drop_last=True)) == len(GlobalBatchSampler(20, 5)) == 4
    assert len(GlobalBatchSampler(3, 5, drop_last=False)) == 1
    s = GlobalBatchSampler(23, 5, seed=1, drop_last=True)
    batches = [s.batch_rows(0, i) for i in range(len(s))]
    assert all(len(b) == 5 for b in batches)
    flat = [r for b in batches for r in b]
    assert len(set(flat)) == 20 and set(flat) <= set(range(23))
    assert len(list(s)) == 4


def test_sampler_without_shuffle_is_in_order():
    s = GlobalBatchSampler(7, 3, shuffle=False)
    assert [s.batch_rows(4, i) for i in range(len(s))] == [[0, 1, 2], [3, 4, 5], [6]]


def test_sampler_refuses_an_empty_dataset():
    with pytest.raises(ValueError, match="empty"):
        GlobalBatchSampler(0, 4)


# ------------------------------------------------------------ HDPStepDataset
class RecordingDataset:
    """Wraps the step dataset's rows and records which dataset rows were fetched."""

    def __init__(self, inner):
        self.inner = inner
        self.fetched: list[int] = []

    def __getitem__(self, key):
        assert isinstance(key, list), "rows are fetched in one batched lookup"
        self.fetched.extend(key)
        return self.inner[key]


@pytest.mark.parametrize("planner", [plan_naive, plan_static], ids=["naive", "static"])
def test_step_dataset_each_rank_loads_only_its_samples(planner):
    world, cap, gbs = 4, 12, 9
    rng = random.Random(11)
    lengths = [rng.choice([1, 2, 5, 7, 11, 12, 13, 17, 25, 30, 47]) for _ in range(30)]
    data = encoded_rows(lengths, prompt_of=lambda r, n: r % 4)
    data["text"] = ["x"] * len(lengths)  # dropped by the step dataset: only input_ids/labels move
    ds, lens, loss = measure_dataset(Dataset.from_dict(data))
    sampler = GlobalBatchSampler(len(ds), gbs, seed=5)
    steps = []
    for rank in range(world):
        sd = HDPStepDataset(ds, lens, loss, sampler, planner, world, rank, cap, HDPCollator(vocab_size=B * 40))
        assert set(sd.dataset.column_names) == {"input_ids", "labels"}
        sd.dataset = RecordingDataset(sd.dataset)
        steps.append(sd)
    assert len(steps[0]) == len(sampler) == 4
    for epoch in range(2):
        for step in range(len(sampler)):
            outs = []
            for sd in steps:
                sd.dataset.fetched.clear()
                outs.append(sd[(epoch, step)])
            rows = sampler.batch_rows(epoch, step)
            plan = outs[0].plan
            # identical plans and fingerprints on every rank
            assert all(o.plan == plan and o.fingerprint == outs[0].fingerprint for o in outs)
            assert all(o.rows == rows and o.epoch == epoch and o.step == step for o in outs)
            assert plan.lengths == tuple(lengths[r] for r in rows)
            plan.validate()
            tokens = Counter()
            union = set()
            for rank, (sd, o) in enumerate(zip(steps, outs)):
                mine = plan.for_rank(rank)
                want_rows = sorted({rows[p.sample] for mb in mine for p in mb.pieces})
                # loads exactly the rows its pieces name, each once
                assert sorted(sd.dataset.fetched) == want_rows
                union |= set(sd.dataset.fetched)
                assert len(o.micro_batches) == len(mine)
                assert o.local_tokens == sum(mb.num_tokens for mb in mine)
                for mb, packed in zip(mine, o.micro_batches):
                    meta = packed["hdp_metadata"]
                    assert meta.slot == mb.slot and meta.rank == rank
                    assert meta.step == o.global_step == epoch * len(sampler) + step + 1
                    ids = packed["input_ids"][0].tolist()
                    # (a static-mesh member may hold no token of a sample shorter than its CP degree)
                    assert {v // B for v in ids} == {rows[p.sample] for p in mb.pieces if p.tokens_on(rank)}
                    # metadata names dataset rows
                    named = set(meta.local_samples) | {s for seg in meta.rings for s in seg.samples}
                    assert named == {rows[p.sample] for p in mb.pieces}
                    tokens.update(divmod(v, B) for v in ids)
            assert union == set(rows)
            assert tokens == Counter((r, t) for r in rows for t in range(lengths[r]))
            want_loss = sum(count_loss_tokens(data["input_ids"][r], data["labels"][r]) for r in rows)
            assert all(o.num_loss_tokens == want_loss for o in outs)
            assert all(o.num_tokens == sum(lengths[r] for r in rows) for o in outs)
            # the packed labels carry exactly num_loss_tokens targets over all ranks
            got = sum(int((p["labels"] != IGNORE_INDEX).sum()) for o in outs for p in o.micro_batches)
            assert got == want_loss


def test_step_dataset_rank_without_work_gets_no_micro_batch():
    # two short samples that do not fit together on four ranks: two ranks have nothing to run this step
    ds, lens, loss = measure_dataset(Dataset.from_dict(encoded_rows([5, 6])))
    sampler = GlobalBatchSampler(2, 2, seed=0)
    out = [HDPStepDataset(ds, lens, loss, sampler, plan_naive, 4, r, 8, HDPCollator())[(0, 0)] for r in range(4)]
    assert sorted(len(o.micro_batches) for o in out) == [0, 0, 1, 1]
    assert all(o.num_loss_tokens == 9 and o.num_tokens == 11 for o in out)
    assert len({o.fingerprint for o in out}) == 1


def test_step_dataset_accepts_a_numpy_formatted_dataset():
    """A tokenized dataset in numpy format (``ds.with_format("numpy")``) trains like a plain one: the
    collator takes 1-D integer arrays (it once refused them with wrong advice)."""
    lengths = [3, 2, 4]
    ds = Dataset.from_dict(encoded_rows(lengths, prompt_of=lambda r, n: 1)).with_format("numpy")
    ds, lens, loss = measure_dataset(ds)
    assert lens.tolist() == lengths and loss.tolist() == [2, 1, 3]
    sampler = GlobalBatchSampler(3, 3, shuffle=False)
    out = HDPStepDataset(ds, lens, loss, sampler, plan_naive, 1, 0, 16, HDPCollator())[(0, 0)]
    ids = sorted(v for mb in out.micro_batches for v in mb["input_ids"][0].tolist())
    assert ids == sorted(r * B + t for r, n in enumerate(lengths) for t in range(n))
