"""Bad input (issue 5, item 5): every case is refused with an error naming the dataset row, the value
and the fix, or handled as documented; nothing is silently dropped, truncated or trained on wrongly.

Cases covered elsewhere, not repeated here:

- a sample longer than world x tokens_per_rank, refused by default:
  ``test_trainer.py::test_sample_longer_than_world_capacity_is_refused`` and
  ``test_data.py::test_check_lengths_names_the_first_too_long_sample_and_the_required_capacity``;
- an empty sample: ``test_trainer.py::test_empty_sample_is_refused``, ``test_data.py`` and ``test_collator.py``;
- a missing ``input_ids`` column: ``test_trainer.py::test_missing_input_ids_column_is_refused``;
- ``tokens_per_rank`` below 1: ``test_trainer.py::test_config_errors_say_what_to_do``;
- ``global_batch_size`` with ``gradient_accumulation_steps > 1``:
  ``test_trainer.py::test_global_batch_and_gradient_accumulation_cannot_both_be_set``;
- a whole global batch without any label token (the trainer skips the step): the trainer's tests.

Tests marked ``needs_trainer_wiring`` check what HDPTrainer does once it calls
``HDPConfig.check_training_args``, ``HDPConfig.check_attention_backend`` and
``data.prepare_dataset`` at construction; they are skipped while trainer.py does not.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

import hf_hdp.trainer.trainer as trainer_module
from hf_hdp import HDPConfig, HDPTrainer
from hf_hdp.collators import IGNORE_INDEX, HDPCollator, HDPDataError, count_loss_tokens, row_documents
from hf_hdp.data.checks import (
    MAX_ID_COLUMN,
    MIN_ID_COLUMN,
    SOURCE_ROW_COLUMN,
    apply_long_sample_policy,
    measure_dataset,
    prepare_dataset,
)
from hf_hdp.data.loader import GlobalBatchSampler, HDPStepDataset
from hf_hdp.planning import get_planner, plan_naive
from tests.dist_utils import run_distributed
from tests.models import VOCAB, load_model, reference_step, save_tiny_model

needs_trainer_wiring = pytest.mark.skipif(
    not hasattr(trainer_module, "prepare_dataset"),
    reason="HDPTrainer does not call prepare_dataset / check_training_args / check_attention_backend yet",
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model("llama", str(tmp_path_factory.mktemp("m") / "llama"))


def _args(tmp_path, **kw):
    return TrainingArguments(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to=[],
        max_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        **kw,
    )


def _trainer(tiny, tmp_path, rows, args=None, **cfg):
    return HDPTrainer(
        load_model(tiny, dtype=torch.float32),
        args or _args(tmp_path),
        train_dataset=Dataset.from_list(rows),
        hdp_config=HDPConfig(**cfg),
    )


def _ids(n, start=1):
    return [(start + t) % VOCAB for t in range(n)]


# ------------------------------------------------------- samples too long
def _long_rows():
    # limit = 2 ranks x 8 = 16 tokens; rows 1 and 3 are longer, row 3 keeps no label token once cut
    return [
        {"input_ids": _ids(5), "labels": [IGNORE_INDEX] + _ids(4, 2)},
        {"input_ids": _ids(20, 3), "labels": [IGNORE_INDEX] * 6 + _ids(14, 9)},
        {"input_ids": _ids(16, 7), "labels": _ids(16, 7)},
        {"input_ids": _ids(30, 11), "labels": [IGNORE_INDEX] * 20 + _ids(10, 31)},
        {"input_ids": _ids(3, 5)},
    ]


def test_long_sample_error_names_the_row_and_the_opt_in_policies():
    with pytest.raises(HDPDataError) as info:
        prepare_dataset(Dataset.from_list(_long_rows()), HDPConfig(tokens_per_rank=8), world_size=2)
    msg = str(info.value)
    assert re.search(r"\bsample 1 has 20 tokens\b", msg) and "2 x 8 = 16" in msg and "1 more" in msg, msg
    assert "tokens_per_rank to at least 15" in msg and "long_sample_policy" in msg, msg


def test_truncate_policy_cuts_ids_and_labels_together_and_logs_it(caplog):
    rows = _long_rows()
    with caplog.at_level(logging.WARNING, logger="hf_hdp.data.checks"):
        measured = prepare_dataset(
            Dataset.from_list(rows), HDPConfig(tokens_per_rank=8, long_sample_policy="truncate"), world_size=2
        )
    ds, lengths, loss = measured
    assert lengths.tolist() == [5, 16, 16, 16, 3]
    assert len(ds) == 5 and SOURCE_ROW_COLUMN not in ds.column_names  # nothing dropped
    for r, row in enumerate(rows):
        n = min(len(row["input_ids"]), 16)
        assert ds[r]["input_ids"] == row["input_ids"]  # the data is not rewritten: the documents are cut
        (doc,) = row_documents(ds[r], r, measured.rules)
        assert doc.input_ids == row["input_ids"][:n]
        assert doc.labels == (row["labels"][:n] if "labels" in row else None)
        assert ds[r]["hdp_length"] == n
        # the loss-token count is the cut sample's own (labels[1:n] that are not -100)
        assert loss[r] == count_loss_tokens(row["input_ids"][:n], row.get("labels") and row["labels"][:n])
    assert loss.tolist() == [4, 10, 15, 0, 2]
    (doc,) = row_documents(ds[1], 1, measured.rules)
    assert ds[1][MAX_ID_COLUMN] == max(doc.input_ids + [t for t in doc.labels if t != IGNORE_INDEX])
    (record,) = [r for r in caplog.records if "long_sample_policy='truncate'" in r.getMessage()]
    msg = record.getMessage()
    assert "cut 2 sample(s)" in msg and "rows 1, 3" in msg and "first 16 tokens" in msg, msg
    assert "removed 18 of 74 tokens" in msg, msg  # (20 - 16) + (30 - 16)
    assert "14 of 45 label tokens" in msg, msg  # row 1 loses 4 of its 14, row 3 all 10 of its
    assert re.search(r"1 of them keep no label token \(rows 3\)", msg), msg


def test_truncated_sample_trains_on_its_own_targets_only():
    """After truncation the last kept token has no target (-100): it never learns the cut-off token."""
    measured = prepare_dataset(
        Dataset.from_list(_long_rows()), HDPConfig(tokens_per_rank=8, long_sample_policy="truncate"), world_size=2
    )
    ds, lengths, loss = measured
    sampler = GlobalBatchSampler(len(ds), 5, shuffle=False)
    steps = [
        HDPStepDataset.from_measured(measured, sampler, plan_naive, 2, r, 8, HDPCollator(vocab_size=VOCAB))[(0, 0)]
        for r in range(2)
    ]
    packed = sum(int((mb["labels"] != IGNORE_INDEX).sum()) for s in steps for mb in s.micro_batches)
    assert packed == steps[0].num_loss_tokens == int(loss.sum())
    assert steps[0].num_tokens == int(lengths.sum()) == 56


def test_drop_policy_removes_long_samples_logs_it_and_keeps_naming_the_users_rows(caplog):
    rows = _long_rows()
    rows[4]["input_ids"] = [1, VOCAB + 5, 2]  # out of the vocabulary, after two dropped rows
    cfg = HDPConfig(tokens_per_rank=8, long_sample_policy="drop")
    with caplog.at_level(logging.WARNING, logger="hf_hdp.data.checks"):
        ds, lengths, loss = prepare_dataset(Dataset.from_list(rows), cfg, world_size=2)
    assert lengths.tolist() == [5, 16, 3] and loss.tolist() == [4, 15, 2]
    assert ds[SOURCE_ROW_COLUMN] == [0, 2, 4]
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "removed 2 of 5 sample(s)" in msg and "rows 1, 3" in msg, msg
    assert "removed 50 of 74 tokens" in msg and "24 of 45 label tokens" in msg and "now has 3 samples" in msg, msg
    # the vocabulary check and the step-time collator name the user's row 4, not the kept row 2
    with pytest.raises(HDPDataError, match=rf"\bsample 4: token id {VOCAB + 5} is outside .*\(in `input_ids`\)"):
        prepare_dataset(Dataset.from_list(rows), cfg, world_size=2, vocab_size=VOCAB)
    sampler = GlobalBatchSampler(len(ds), 3, shuffle=False)
    step_ds = HDPStepDataset(ds, lengths, loss, sampler, plan_naive, 1, 0, 32, HDPCollator(vocab_size=VOCAB))
    with pytest.raises(HDPDataError, match=rf"\bsample 4: token id {VOCAB + 5}\b"):
        step_ds[(0, 0)]
    step_ds.collator = HDPCollator()
    (mb,) = step_ds[(0, 0)].micro_batches
    assert set(mb["hdp_metadata"].local_samples) == {0, 2, 4}


def test_drop_policy_refuses_to_drop_everything_and_still_refuses_empty_samples():
    long_only = [{"input_ids": _ids(20)}, {"input_ids": _ids(17)}]
    with pytest.raises(HDPDataError, match=r"would drop every sample: all 2 .*tokens_per_rank to at least 10"):
        prepare_dataset(Dataset.from_list(long_only), HDPConfig(tokens_per_rank=8, long_sample_policy="drop"), 2)
    with pytest.raises(HDPDataError, match=r"sample 1 is empty"):
        prepare_dataset(
            Dataset.from_list([{"input_ids": _ids(20)}, {"input_ids": []}]),
            HDPConfig(tokens_per_rank=8, long_sample_policy="drop"),
            2,
        )


def test_policy_does_nothing_when_every_sample_fits():
    measured = measure_dataset(Dataset.from_list([{"input_ids": _ids(4)}, {"input_ids": _ids(9)}]))
    for policy in ("error", "truncate", "drop"):
        out = apply_long_sample_policy(measured, 2, 8, policy)
        assert out is measured and out.source_rows is None


def test_long_sample_policy_is_validated():
    with pytest.raises(ValueError, match=r"long_sample_policy must be one of \('error', 'truncate', 'drop'\)"):
        HDPConfig(long_sample_policy="clip")


@needs_trainer_wiring
def test_trainer_truncates_when_asked(tiny, tmp_path):
    trainer = _trainer(
        tiny, tmp_path, _long_rows(), tokens_per_rank=8, global_batch_size=5, long_sample_policy="truncate"
    )
    assert trainer.hdp_train_data.lengths.tolist() == [5, 8, 8, 8, 3]  # one rank: limit 8
    out = trainer.train()
    assert out.global_step == 1 and np.isfinite(out.training_loss)


# ------------------------------------------------- all labels -100 in a sample
def _unlabelled_batch():
    g = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(0, VOCAB, (n,), generator=g).tolist()
    normal = [{"input_ids": ids(9)}, {"input_ids": (x := ids(12)), "labels": [IGNORE_INDEX] * 4 + x[4:]}]
    masked = [
        {"input_ids": ids(7), "labels": [IGNORE_INDEX] * 7},  # all labels -100
        {"input_ids": (y := ids(5)), "labels": y[:1] + [IGNORE_INDEX] * 4},  # only the first label: never a target
        {"input_ids": ids(1)},  # one token: nothing to predict
    ]
    return normal, masked


def _hdp_grads(model, samples, tokens_per_rank):
    from hf_hdp.distributed.mesh import DynamicMesh
    from hf_hdp.engine import run_micro_batches

    lengths = [len(s["input_ids"]) for s in samples]
    n_loss = sum(count_loss_tokens(s["input_ids"], s.get("labels")) for s in samples)
    plan = plan_naive(lengths, 1, tokens_per_rank)
    collator = HDPCollator(vocab_size=VOCAB)
    micro = [collator(mb, dict(enumerate(samples))) for mb in plan.for_rank(0)]
    model.zero_grad(set_to_none=True)
    loss = run_micro_batches(model, micro, n_loss, DynamicMesh(), "reference", torch.device("cpu"))
    unlabelled = sum(1 for m in micro if bool((m["labels"] == IGNORE_INDEX).all()))
    return loss, {k: p.grad.clone() for k, p in model.named_parameters()}, unlabelled


@pytest.mark.parametrize("tokens_per_rank", [64, 12], ids=["packed-together", "alone-in-a-micro-batch"])
def test_samples_without_label_tokens_add_nothing_and_no_nan(tiny, tokens_per_rank):
    from hf_hdp.engine import enable_hdp_attention

    model = load_model(tiny)  # float64
    enable_hdp_attention(model)
    normal, masked = _unlabelled_batch()
    assert all(count_loss_tokens(s["input_ids"], s.get("labels")) == 0 for s in masked)
    mixed = [masked[0], normal[0], masked[1], normal[1], masked[2]]
    loss, grads, unlabelled = _hdp_grads(model, mixed, tokens_per_rank)
    base_loss, base_grads, _ = _hdp_grads(model, normal, tokens_per_rank)
    # packed with labelled samples, or in a micro-batch without any label token (loss 0 / N, still no NaN)
    assert unlabelled == (0 if tokens_per_rank == 64 else 1)
    assert np.isfinite(loss) and loss == pytest.approx(base_loss, rel=1e-12)
    for k, g in base_grads.items():
        assert torch.isfinite(grads[k]).all(), k
        torch.testing.assert_close(grads[k], g, rtol=1e-10, atol=1e-13, msg=lambda m: f"{k}: {m}")
    # and both equal one device running the batch unpacked
    ref_loss, ref_grads = reference_step(load_model(tiny), mixed)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-9, atol=1e-12, msg=lambda m: f"{k}: {m}")


# ------------------------------------------------- ids and labels that are not token ids
@pytest.mark.parametrize(
    "rows, patterns",
    [
        (
            [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 2.5, 6]}],
            [r"\bsample 1\b", r"2\.5", r"integer", r"cast_column"],
        ),
        ([{"input_ids": [1.0, 2.0]}, {"input_ids": [4.0]}], [r"\bsample 0\b", r"float", r"cast_column"]),
        ([{"input_ids": []}, {"input_ids": [[1, 2], [3]]}], [r"\bsample 1\b", r"nested", r"[Ff]latten"]),
        ([{"input_ids": [1, 2, 3]}, {"input_ids": [4, None, 6]}], [r"\bsample 1\b", r"None", r"position 1"]),
        ([{"input_ids": "hello"}], [r"\bsample 0\b", r"hello", r"[Tt]okenize"]),
        ([{"input_ids": [True, False]}], [r"\bsample 0\b", r"bool", r"int"]),
        (
            [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5, 6], "labels": [-100, 5.5, 6]}],
            [r"\bsample 1\b", r"`labels`", r"5\.5"],
        ),
        (
            [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5, 6], "labels": [-100, None, 6]}],
            [r"\bsample 1\b", r"`labels`", r"None"],
        ),
    ],
    ids=["float-token", "float-column", "nested", "missing-token", "text", "bool", "float-label", "missing-label"],
)
def test_non_integer_or_nested_ids_are_refused_by_the_trainer_naming_the_row(tiny, tmp_path, rows, patterns):
    with pytest.raises(HDPDataError) as info:
        _trainer(tiny, tmp_path, rows, tokens_per_rank=16, global_batch_size=len(rows)).train()
    for p in patterns:
        assert re.search(p, str(info.value)), (p, str(info.value))


def test_out_of_vocabulary_ids_and_labels_are_found_before_training():
    rows = [
        {"input_ids": [1, 2, 3], "labels": [1, 2, 3]},
        {"input_ids": [4, 5, 6], "labels": [-100, 5, VOCAB]},
        {"input_ids": [-2, 5, 6], "labels": None},
    ]
    with pytest.raises(HDPDataError) as info:
        prepare_dataset(Dataset.from_list(rows), HDPConfig(tokens_per_rank=8), 1, vocab_size=VOCAB)
    msg = str(info.value)
    assert re.search(rf"\bsample 1: label id {VOCAB} is outside .*\[0, {VOCAB}\) \(in `labels`\)", msg), msg
    assert "1 more" in msg and "-100" in msg, msg
    ds, _, _ = measure_dataset(Dataset.from_list(rows))
    assert ds[MIN_ID_COLUMN] == [1, 4, -2] and ds[MAX_ID_COLUMN] == [3, VOCAB, 6]
    # -100 labels are not token ids: a fully masked sample passes
    prepare_dataset(
        Dataset.from_list([{"input_ids": [1, 2], "labels": [-100, -100]}]),
        HDPConfig(tokens_per_rank=8),
        1,
        vocab_size=VOCAB,
    )


def test_out_of_vocabulary_label_is_refused_at_step_time_too():
    from hf_hdp.planning import MicroBatch, Piece

    mb = MicroBatch(rank=0, slot=0, pieces=(Piece(sample=0, length=3, group=(0,)),))
    with pytest.raises(HDPDataError, match=r"sample 42: label id -7 is outside .*\[0, 10\).*-100"):
        HDPCollator(vocab_size=10)(mb, {0: {"input_ids": [1, 2, 3], "labels": [1, -7, 3]}}, rows={0: 42})


@needs_trainer_wiring
def test_trainer_refuses_out_of_vocabulary_ids_at_construction(tiny, tmp_path):
    rows = [{"input_ids": [1, 2, 3]}, {"input_ids": [5, 999, 2]}]
    with pytest.raises(HDPDataError, match=r"sample 1: token id 999 is outside the model's vocabulary \[0, 128\)"):
        _trainer(tiny, tmp_path, rows, tokens_per_rank=32)


# ------------------------------------------------- kernel backend and device
def test_fused_backends_are_refused_on_cpu_with_the_fix():
    for name in ("flash_attn", "torch_varlen"):
        with pytest.raises(ValueError) as info:
            HDPConfig(attention_backend=name).check_attention_backend("cpu", torch.float32)
        msg = str(info.value)
        assert f"attention_backend={name!r}" in msg and "cpu" in msg and "'reference'" in msg, msg
    assert HDPConfig().check_attention_backend("cpu", torch.float32) == "cpu_flash"
    assert HDPConfig().check_attention_backend("cpu", torch.float64) == "reference"
    with pytest.raises(ValueError, match=r"attention_backend='cpu_flash' cannot run .*float64.*'reference'"):
        HDPConfig(attention_backend="cpu_flash").check_attention_backend("cpu", torch.float64)
    assert HDPConfig(attention_backend="reference").check_attention_backend("cpu", torch.float64) == "reference"


def test_fused_backends_need_half_precision_and_a_kernel_head_dim(monkeypatch):
    import hf_hdp.attention.backends as kernels

    monkeypatch.setattr(
        kernels, "backend_unavailable_reason", lambda name, device=None, dtype=None: None
    )  # as on a GPU
    cfg = HDPConfig(attention_backend="torch_varlen")
    with pytest.raises(ValueError, match=r"need bfloat16/float16 .*torch.float32.*bf16=True.*'reference'"):
        cfg.check_attention_backend("cuda", torch.float32)
    assert cfg.check_attention_backend("cuda", torch.float32, mixed_precision=True) == "torch_varlen"
    assert cfg.check_attention_backend("cuda", torch.bfloat16, head_dim=128) == "torch_varlen"
    with pytest.raises(ValueError, match=r"head dimension that is a multiple of 8.*is 36"):
        cfg.check_attention_backend("cuda", torch.bfloat16, head_dim=36)


@needs_trainer_wiring
def test_trainer_refuses_a_gpu_backend_on_cpu_at_construction(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"attention_backend='flash_attn' cannot run on this trainer's device \(cpu\)"):
        _trainer(tiny, tmp_path, [{"input_ids": [1, 2, 3]}], attention_backend="flash_attn")


# ------------------------------------------------- HDPConfig vs TrainingArguments
@pytest.mark.parametrize(
    "kw, pattern",
    [
        ({"train_sampling_strategy": "group_by_length"}, r"train_sampling_strategy='group_by_length' contradicts HDP"),
        ({"train_sampling_strategy": "sequential"}, r"train_sampling_strategy='sequential'.*'random'"),
        ({"auto_find_batch_size": True}, r"auto_find_batch_size=True .*tokens_per_rank"),
        ({"label_smoothing_factor": 0.1}, r"label_smoothing_factor=0.1 would be ignored"),
        ({"fsdp": True}, r"fsdp is set: HDPTrainer applies FSDP2 itself"),
    ],
    ids=["group_by_length", "sequential", "auto_find_batch_size", "label_smoothing", "fsdp"],
)
def test_training_arguments_that_hdp_would_ignore_are_refused(tmp_path, kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        HDPConfig().check_training_args(_args(tmp_path, **kw))


def test_context_parallel_config_is_refused(tmp_path):
    from accelerate import ParallelismConfig

    args = _args(tmp_path, parallelism_config=ParallelismConfig(cp_size=2))
    with pytest.raises(ValueError, match=r"parallelism_config sets \{'cp_size': 2\}.*HDP is itself"):
        HDPConfig().check_training_args(args)
    HDPConfig(global_batch_size=4).check_training_args(_args(tmp_path))  # the defaults pass


@needs_trainer_wiring
def test_trainer_refuses_contradicting_arguments_at_construction(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"group_by_length' contradicts HDP"):
        _trainer(
            tiny, tmp_path, [{"input_ids": [1, 2, 3]}], args=_args(tmp_path, train_sampling_strategy="group_by_length")
        )


def test_drop_last_with_a_global_batch_larger_than_the_dataset_is_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"dataloader_drop_last=True drops every global batch.*3 samples.*at most 3"):
        GlobalBatchSampler(3, 4, drop_last=True)
    trainer = _trainer(
        tiny,
        tmp_path,
        [{"input_ids": [1, 2, 3]}] * 3,
        args=_args(tmp_path, dataloader_drop_last=True),
        tokens_per_rank=8,
        global_batch_size=4,
    )
    with pytest.raises(ValueError, match=r"no step would run"):
        trainer.train()


# ------------------------------------------------- more ranks than the batch can keep busy
WORLD = 4
IDLE_LENGTHS = [[5, 7], [20, 5]]  # two short samples; one split over 2 ranks plus a short one (C = 16)


def _idle_rows():
    g = torch.Generator().manual_seed(5)
    rows = []
    for n in [x for step in IDLE_LENGTHS for x in step]:
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 2 + ids[2:]})
    return rows


def _idle_worker(rank, world_size, model_path):
    from hf_hdp.distributed.mesh import DynamicMesh
    from hf_hdp.engine import enable_hdp_attention, run_micro_batches
    from hf_hdp.planning import CostModel

    model = load_model(model_path)
    enable_hdp_attention(model)
    mesh = DynamicMesh()
    ds, lengths, loss = measure_dataset(Dataset.from_list(_idle_rows()))
    sampler = GlobalBatchSampler(len(ds), 2, shuffle=False)
    out = []
    for planner in ("naive", "balanced", "static"):
        steps = HDPStepDataset(
            ds,
            lengths,
            loss,
            sampler,
            get_planner(planner, CostModel.default()),
            world_size,
            rank,
            16,
            HDPCollator(vocab_size=VOCAB),
        )
        for step in range(len(sampler)):
            item = steps[(0, step)]
            mesh.check_plan(item.fingerprint, step)
            model.zero_grad(set_to_none=True)
            total = run_micro_batches(
                model, item.micro_batches, item.num_loss_tokens, mesh, "reference", torch.device("cpu")
            )
            (total,) = mesh.reduce_gradients([p for p in model.parameters()], extras=[total])
            grads = {k: p.grad.clone() for k, p in model.named_parameters()}
            busy = sum(1 for r in range(world_size) if item.plan.for_rank(r))
            out.append((planner, step, item.rows, total, grads if rank == 0 else None, len(item.micro_batches), busy))
    return out


def test_idle_ranks_still_give_single_device_gradients(tiny):
    results = run_distributed(_idle_worker, WORLD, tiny)
    rows = _idle_rows()
    refs = {}
    for i, (planner, step, step_rows, loss, grads, _, busy) in enumerate(results[0]):
        assert busy < WORLD, (planner, step)  # some ranks had nothing to run
        assert sum(1 for r in range(WORLD) if results[r][i][5] == 0) == WORLD - busy
        if step not in refs:
            refs[step] = reference_step(load_model(tiny), [rows[r] for r in step_rows])
        ref_loss, ref_grads = refs[step]
        assert loss == pytest.approx(ref_loss, rel=1e-12), (planner, step)
        for k, g in ref_grads.items():
            torch.testing.assert_close(grads[k], g, rtol=1e-9, atol=1e-12, msg=lambda m: f"{planner} {step} {k}: {m}")
        for r in range(1, WORLD):  # every rank, idle or not, holds the same loss
            assert results[r][i][3] == pytest.approx(loss, rel=1e-12)
    assert {len(s) for s in IDLE_LENGTHS} == {2}


def test_a_labels_column_without_any_value_means_no_labels():
    ds, lengths, loss = measure_dataset(Dataset.from_list([{"input_ids": [1, 2, 3], "labels": None}]))
    assert lengths.tolist() == [3] and loss.tolist() == [2]


def test_an_empty_dataset_is_refused_saying_so(tiny, tmp_path):
    """An empty train (or eval) dataset is refused by name, not with a missing-column error from the measuring step."""
    empty = Dataset.from_dict({"input_ids": []})
    with pytest.raises(HDPDataError, match=r"the training dataset is empty \(train_dataset has 0 rows\)"):
        HDPTrainer(
            load_model(tiny, dtype=torch.float32),
            _args(tmp_path),
            train_dataset=empty,
            hdp_config=HDPConfig(tokens_per_rank=32),
        )
    with pytest.raises(HDPDataError, match=r"eval_dataset is empty"):
        HDPTrainer(
            load_model(tiny, dtype=torch.float32),
            _args(tmp_path, eval_strategy="steps", eval_steps=1),
            train_dataset=Dataset.from_list([{"input_ids": _ids(5)}]),
            eval_dataset=empty,
            hdp_config=HDPConfig(tokens_per_rank=32),
        )
