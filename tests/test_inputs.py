"""Honour or refuse: every Trainer input either changes training exactly as stock Trainer would, or is refused
at construction naming the input and the fix (issue 8). Gradients are compared with one process running
the same samples unpacked (float64)."""

from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorWithFlattening,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from hf_hdp import HDPConfig, HDPTrainer
from hf_hdp.collators import HDPDataError, RowRules, row_documents
from hf_hdp.trainer.checkpoint import STATE_FILE, ResumeMismatchError, check_resume, hdp_state
from tests.dist_utils import run_distributed
from tests.models import VOCAB, load_model, reference_step, save_tiny_model

PAD = 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model("llama", str(tmp_path_factory.mktemp("m") / "llama"))


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models

    vocab = {"<pad>": PAD, **{f"t{i}": i for i in range(1, VOCAB)}}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
        pad_token="<pad>",
        eos_token="t1",
        mask_token="t2",
    )
    return tok


def _args(tmp_path, **kw):
    kw = {
        "max_steps": 1,
        "learning_rate": 1.0,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,
        **kw,
    }
    return TrainingArguments(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **kw,
    )


def _ids(n, start=1):
    return [(start + 3 * t) % (VOCAB - 1) + 1 for t in range(n)]  # never the pad id


def _one_step(trainer):
    """Loss and gradients of the trainer's first global batch (its whole dataset)."""
    inputs = next(iter(trainer.get_train_dataloader()))
    trainer.model.zero_grad(set_to_none=True)
    loss = float(trainer.training_step(trainer.model, inputs))
    return loss, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _assert_equal_step(got, want, scale=1.0, rtol=1e-8, atol=1e-12):
    """``got`` equals ``want`` times ``scale``. Llama's RMSNorm computes in float32 even in a float64 model, so a
    scaled loss rounds its gradients differently there: ``scale != 1`` is compared to float32 accuracy."""
    if scale != 1.0:
        rtol, atol = max(rtol, 1e-5), max(atol, 1e-7)
    loss, grads = got
    ref_loss, ref_grads = want
    assert loss == pytest.approx(scale * ref_loss, rel=1e-6)  # training_step reports the loss in float32
    assert set(grads) == set(ref_grads)
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k], scale * g, rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def _dataset(rows) -> Dataset:
    """``Dataset.from_list`` takes its columns from the first row: give every row every column (None if absent)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return Dataset.from_list([{k: r.get(k) for k in keys} for r in rows])


def _trainer(tiny, tmp_path, rows, args=None, **kw):
    cfg = kw.pop("hdp_config", None) or HDPConfig(tokens_per_rank=64, global_batch_size=len(rows))
    return HDPTrainer(load_model(tiny), args or _args(tmp_path), train_dataset=_dataset(rows), hdp_config=cfg, **kw)


# ------------------------------------------------------------------ 1. attention_mask
def _padded_rows():
    a, b, c, d = _ids(7, 2), _ids(5, 9), _ids(6, 4), _ids(4, 30)
    rows = [
        {"input_ids": a + [PAD] * 3, "attention_mask": [1] * 7 + [0] * 3},  # right-padded, no labels
        {"input_ids": [PAD] * 4 + b, "attention_mask": [0] * 4 + [1] * 5},  # left-padded, no labels
        {
            "input_ids": [PAD] * 2 + c + [PAD],
            "attention_mask": [0, 0] + [1] * 6 + [0],
            "labels": [-100, -100, -100, -100] + c[2:] + [PAD],
        },  # both sides, SFT labels that train the pad
        {"input_ids": d, "attention_mask": [1] * 4},
    ]
    unpadded = [{"input_ids": a}, {"input_ids": b}, {"input_ids": c, "labels": [-100, -100] + c[2:]}, {"input_ids": d}]
    return rows, unpadded


def test_padding_is_removed_so_a_padded_dataset_trains_like_the_unpadded_one(tiny, tmp_path):
    rows, unpadded = _padded_rows()
    trainer = _trainer(tiny, tmp_path, rows)
    assert trainer.hdp_train_data.lengths.tolist() == [7, 5, 6, 4]  # padding takes no capacity
    assert trainer.hdp_train_data.loss_tokens.tolist() == [6, 4, 4, 3]  # and gets no loss
    _assert_equal_step(_one_step(trainer), reference_step(load_model(tiny), unpadded))
    (mb,) = next(iter(trainer.get_train_dataloader()))["hdp_step"].micro_batches
    assert sorted(mb["position_ids"][0].tolist()) == sorted(t for n in (7, 5, 6, 4) for t in range(n))


def test_a_zero_between_real_tokens_is_refused_naming_the_row(tiny, tmp_path):
    rows = [
        {"input_ids": _ids(4), "attention_mask": [1] * 4},
        {"input_ids": _ids(5), "attention_mask": [1, 1, 0, 1, 1]},
    ]
    with pytest.raises(HDPDataError, match=r"sample 1: `attention_mask` is 0 at position 2, between real tokens"):
        _trainer(tiny, tmp_path, rows)
    with pytest.raises(HDPDataError, match=r"sample 0 is all padding"):
        _trainer(tiny, tmp_path, [{"input_ids": [PAD] * 3, "attention_mask": [0] * 3}])


# ------------------------------------------------------------------ 2. position_ids / seq_lengths
def _packed_rows():
    a, b, c, d, e = _ids(6, 1), _ids(9, 5), _ids(3, 7), _ids(11, 2), _ids(5, 40)
    rows = [
        {
            "input_ids": a + b + c,
            "position_ids": [*range(6), *range(9), *range(3)],
            "labels": [-100] + a[1:] + [-100] + b[1:] + [-100] + c[1:],
        },  # DataCollatorWithFlattening's labels
        {"input_ids": d + e, "seq_lengths": [11, 5]},  # TRL's packing
        {"input_ids": _ids(8, 3)},  # a plain row
    ]
    docs = [
        {"input_ids": a, "labels": [-100] + a[1:]},
        {"input_ids": b, "labels": [-100] + b[1:]},
        {"input_ids": c, "labels": [-100] + c[1:]},
        {"input_ids": d},
        {"input_ids": e},
        {"input_ids": _ids(8, 3)},
    ]
    return rows, docs


def test_pre_packed_rows_are_split_into_documents_at_position_restarts(tiny, tmp_path):
    rows, docs = _packed_rows()
    trainer = _trainer(tiny, tmp_path, rows)
    m = trainer.hdp_train_data
    assert [m.documents(r) for r in range(3)] == [[6, 9, 3], [11, 5], [8]]
    assert m.loss_tokens.tolist() == [5 + 8 + 2, 10 + 4, 7]  # no label crosses a document boundary
    _assert_equal_step(_one_step(trainer), reference_step(load_model(tiny), docs))
    (mb,) = next(iter(trainer.get_train_dataloader()))["hdp_step"].micro_batches
    assert sorted(mb["hdp_metadata"].local_seqlens) == [3, 5, 6, 8, 9, 11]  # each its own sequence


def test_bad_positions_are_refused_naming_the_row():
    cases = [
        (
            {"input_ids": _ids(6), "position_ids": [0, 1, 2, 5, 6, 7]},
            r"sample 3: .*starting at token 3 with position 5",
        ),
        ({"input_ids": _ids(4), "position_ids": [0, 1, 2]}, r"sample 3: `position_ids` has 3 entries .* 4 tokens"),
        (
            {"input_ids": _ids(5), "seq_lengths": [2, 2]},
            r"sample 3: `seq_lengths` \[2, 2\] must .* add up to the row's 5",
        ),
        (
            {"input_ids": _ids(5), "seq_lengths": [2, 3], "position_ids": [0, 1, 2, 0, 1]},
            r"sample 3: `position_ids` restart at tokens \[0, 3\] but `seq_lengths` start documents at \[0, 2\]",
        ),
    ]
    for row, pattern in cases:
        with pytest.raises(HDPDataError, match=pattern):
            row_documents(row, 3)


def _split_worker(rank, world_size, model_path, out_dir, case):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size)
    )
    rows, _ = _packed_rows() if case == "packed" else _padded_rows()
    args = TrainingArguments(
        output_dir=out_dir,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        max_steps=1,
        optim="sgd",
        logging_steps=1,
        learning_rate=1.0,
        max_grad_norm=0.0,
        save_strategy="no",
    )
    model = load_model(model_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = HDPTrainer(
        model,
        args,
        train_dataset=_dataset(rows),
        hdp_config=HDPConfig(tokens_per_rank=6, global_batch_size=len(rows), planner="naive"),
    )
    trainer.train()
    grads = {n: before[n] - p.detach() for n, p in trainer.model.named_parameters()}  # SGD, lr 1: w -= g
    plan = trainer.hdp_history[0]
    return grads, trainer.state.num_input_tokens_seen, trainer.mesh.stats.bytes_sent, plan["rows"]


@pytest.mark.parametrize("case", ["packed", "padded"])
def test_documents_split_over_two_ranks_equal_one_process(tiny, tmp_path, case):
    rows, want = _packed_rows() if case == "packed" else _padded_rows()
    results = run_distributed(_split_worker, 2, tiny, str(tmp_path / "out"), case)
    _, ref = reference_step(load_model(tiny), want)
    for grads, seen, _sent, _ in results:
        for k, g in ref.items():
            torch.testing.assert_close(grads[k], g, rtol=1e-8, atol=1e-12, msg=lambda m: f"{k}: {m}")
        # num_input_tokens_seen: the real tokens of the global batch, summed over both ranks
        assert seen == sum(len(d["input_ids"]) for d in want)
    assert all(sent > 0 for _, _, sent, _ in results)  # documents longer than C = 6 ran as rings


# ------------------------------------------------------------------ 3. data_collator
class CompletionOnly:
    """A user's per-sample collator: no loss on the first ``prompt_len`` tokens (a column)."""

    def __call__(self, features):
        out = {"input_ids": [], "labels": []}
        for f in features:
            out["input_ids"].append(list(f["input_ids"]))
            out["labels"].append([-100] * f["prompt_len"] + list(f["input_ids"][f["prompt_len"] :]))
        return {k: torch.tensor(v) for k, v in out.items()}


def test_a_completion_only_collator_is_run_per_sample(tiny, tmp_path):
    rows = [{"input_ids": _ids(n, n), "prompt_len": p} for n, p in ((9, 3), (5, 4), (12, 0), (7, 6))]
    want = [
        {"input_ids": r["input_ids"], "labels": [-100] * r["prompt_len"] + r["input_ids"][r["prompt_len"] :]}
        for r in rows
    ]
    # stock Trainer drops `prompt_len` before the collator under remove_unused_columns=True; so does HDP
    with pytest.raises(KeyError, match="prompt_len"):
        _trainer(tiny, tmp_path, rows, data_collator=CompletionOnly())
    trainer = _trainer(
        tiny, tmp_path, rows, _args(tmp_path, remove_unused_columns=False), data_collator=CompletionOnly()
    )
    assert trainer.hdp_train_data.loss_tokens.tolist() == [6, 1, 11, 1]
    _assert_equal_step(_one_step(trainer), reference_step(load_model(tiny), want))


def test_stock_collators_give_the_labels_they_give_in_stock_trainer(tiny, tmp_path, tokenizer):
    # DataCollatorForLanguageModeling(mlm=False) trains on input_ids but masks the pad id, also inside a sample
    rows = [{"input_ids": [5, 6, PAD, 7, 8]}, {"input_ids": _ids(6)}, {"input_ids": [9, PAD, PAD, 4]}]
    want = [{"input_ids": r["input_ids"], "labels": [-100 if t == PAD else t for t in r["input_ids"]]} for r in rows]
    trainer = _trainer(tiny, tmp_path, rows, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    assert trainer.hdp_train_data.loss_tokens.tolist() == [3, 5, 1]
    _assert_equal_step(_one_step(trainer), reference_step(load_model(tiny), want))
    # padding collators (to a multiple of 8) and DataCollatorWithFlattening change nothing for one sample
    plain = reference_step(load_model(tiny), [{"input_ids": r["input_ids"]} for r in rows])
    for collator in (DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8), DataCollatorWithFlattening()):
        _assert_equal_step(_one_step(_trainer(tiny, tmp_path, rows, data_collator=collator)), plain)


class Packing:
    """Concatenates the batch and cuts it into rows of 4: it packs, which HDP does itself."""

    def __call__(self, features):
        flat = [t for f in features for t in f["input_ids"]]
        return {"input_ids": torch.tensor([flat[i : i + 4] for i in range(0, len(flat) - 3, 4)])}


class Reversing:
    def __call__(self, features):
        return {"input_ids": torch.tensor([list(reversed(f["input_ids"])) for f in features])}


class Extra:
    def __call__(self, features):
        return {
            "input_ids": torch.tensor([f["input_ids"] for f in features]),
            "token_type_ids": torch.zeros(len(features), len(features[0]["input_ids"]), dtype=torch.long),
        }


class Noisy:
    """Random label masking: a different output for the same sample."""

    def __init__(self):
        self.calls = 0

    def __call__(self, features):
        self.calls += 1
        ids = [list(f["input_ids"]) for f in features]
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor([[-100] * (self.calls % 3) + i[self.calls % 3 :] for i in ids]),
        }


def test_collators_that_pack_change_tokens_or_add_inputs_are_refused(tiny, tmp_path, tokenizer):
    rows = [{"input_ids": _ids(9)}, {"input_ids": _ids(6, 3)}]
    cases = [
        (
            Packing(),
            HDPDataError,
            r"sample 0: the data collator Packing returned `input_ids` with 2 rows for one sample",
        ),
        (Reversing(), HDPDataError, r"sample 0: the data collator Reversing changed the sample's tokens"),
        (Extra(), HDPDataError, r"sample 0: the data collator Extra returned \['token_type_ids'\]"),
        (Noisy(), HDPDataError, r"data collator Noisy gave a different output for the same sample \(sample 0\)"),
        (DataCollatorForLanguageModeling(tokenizer, mlm=True), ValueError, r"mlm=True\) masks and replaces tokens"),
        (DataCollatorWithFlattening(separator_id=7), ValueError, r"separator_id=7\) would train"),
    ]
    for collator, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            _trainer(tiny, tmp_path, rows, data_collator=collator)


# ------------------------------------------------------------------ columns stock Trainer would pass
def test_columns_stock_trainer_would_pass_to_the_model_are_honoured_or_refused(tiny, tmp_path):
    rows = [{"input_ids": _ids(5), "label": 1, "text": "a"}, {"input_ids": _ids(4), "label": 0, "text": "b"}]
    with pytest.raises(ValueError, match=r"column\(s\) \['label'\].*rename it to `labels`"):
        _trainer(tiny, tmp_path, rows)
    rows = [{"input_ids": _ids(5), "score": 0.5, "text": "a"}, {"input_ids": _ids(4), "score": 1.0, "text": "b"}]
    _trainer(tiny, tmp_path, rows)  # remove_unused_columns=True: `score` and `text` are dropped, as in stock
    with pytest.raises(ValueError, match=r"column\(s\) \['score'\], which stock Trainer would pass to the model"):
        _trainer(tiny, tmp_path, rows, _args(tmp_path, remove_unused_columns=False))


# ------------------------------------------------------------------ 4. compute_loss_func
def test_compute_loss_func_is_called_per_micro_batch_with_the_global_count(tiny, tmp_path):
    from transformers.loss.loss_utils import ForCausalLMLoss

    rows, docs = _packed_rows()
    calls = []

    def stock_loss(outputs, labels, num_items_in_batch=None):
        calls.append(int(num_items_in_batch))
        return ForCausalLMLoss(outputs.logits, labels, vocab_size=VOCAB, num_items_in_batch=num_items_in_batch)

    def doubled(outputs, labels, num_items_in_batch=None):
        logits, labels = outputs.logits[:, :-1], labels[:, 1:]  # the usual shift, written out
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        return 2 * ce / num_items_in_batch

    ref = reference_step(load_model(tiny), docs)
    # transformers' causal-LM loss computes in float32 (logits.float()), hence the float32 tolerance
    _assert_equal_step(
        _one_step(_trainer(tiny, tmp_path, rows, compute_loss_func=stock_loss)), ref, rtol=1e-4, atol=1e-6
    )
    assert calls == [sum(r for r in [15, 14, 7])]
    _assert_equal_step(_one_step(_trainer(tiny, tmp_path, rows, compute_loss_func=doubled)), ref, scale=2.0)


# ------------------------------------------------------------------ 6. stale measurement columns
def test_a_measured_dataset_edited_afterwards_is_measured_again(tiny, tmp_path):
    rows = [{"input_ids": _ids(n, n), "labels": _ids(n, n)} for n in (6, 9, 4, 7)]
    first = _trainer(tiny, tmp_path, rows)
    measured = first.train_dataset
    assert "hdp_loss_tokens" in measured.column_names
    edited = measured.map(lambda r: {"labels": [-100] * 3 + r["labels"][3:]})  # new labels, old hdp_* columns
    want = [{"input_ids": r["input_ids"], "labels": [-100] * 3 + r["labels"][3:]} for r in rows]
    second = HDPTrainer(
        load_model(tiny),
        _args(tmp_path),
        train_dataset=edited,
        hdp_config=HDPConfig(tokens_per_rank=64, global_batch_size=4),
    )
    assert second.hdp_train_data.loss_tokens.tolist() == [3, 6, 1, 4]
    _assert_equal_step(_one_step(second), reference_step(load_model(tiny), want))


# ------------------------------------------------------------------ 7. the user's TrainingArguments
def test_the_users_training_arguments_are_not_changed(tiny, tmp_path):
    rows = [{"input_ids": _ids(n, n)} for n in (6, 9, 4, 7, 5, 3, 8, 2)]
    args = _args(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=2, neftune_noise_alpha=5.0)
    trainers = [
        HDPTrainer(
            load_model(tiny), args, train_dataset=Dataset.from_list(rows), hdp_config=HDPConfig(tokens_per_rank=64)
        )
        for _ in range(2)
    ]
    assert args.gradient_accumulation_steps == 2 and args.neftune_noise_alpha == 5.0
    assert [t.global_batch_size for t in trainers] == [4, 4]
    assert trainers[0].args is not args and trainers[0].args.gradient_accumulation_steps == 1


# ------------------------------------------------------------------ 8. resume checks the content
def test_resume_refuses_other_content_with_the_same_lengths(tiny, tmp_path):
    rows = [{"input_ids": _ids(6, n)} for n in (1, 5, 9, 13)]  # a fixed-length corpus: every length is 6
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    saved = _trainer(tiny, tmp_path, rows)
    (ckpt / STATE_FILE).write_text(json.dumps(hdp_state(saved)))
    assert check_resume(_trainer(tiny, tmp_path, rows), str(ckpt))["content_sha256"] == saved.hdp_train_data.digest
    other_tokens = [{"input_ids": _ids(6, n + 1)} for n in (1, 5, 9, 13)]
    reshuffled = [rows[1], rows[0], rows[3], rows[2]]
    other_labels = [dict(r, labels=[-100] + r["input_ids"][1:]) for r in rows]
    for changed in (other_tokens, reshuffled, other_labels):
        trainer = _trainer(tiny, tmp_path, changed)
        assert trainer.hdp_train_data.lengths.tolist() == saved.hdp_train_data.lengths.tolist()
        with pytest.raises(ResumeMismatchError, match=r"dataset's content differs .*content_sha256"):
            check_resume(trainer, str(ckpt))


# ------------------------------------------------------------------ 9. tokens seen, NEFTune
def test_num_input_tokens_seen_counts_the_real_tokens_of_each_global_batch(tiny, tmp_path):
    rows, unpadded = _padded_rows()
    for mode in ("all", "non_padding"):
        args = _args(tmp_path, max_steps=2, include_num_input_tokens_seen=mode, logging_steps=1)
        trainer = _trainer(tiny, tmp_path, rows, args, hdp_config=HDPConfig(tokens_per_rank=64, global_batch_size=2))
        trainer.train()
        real = sum(len(d["input_ids"]) for d in unpadded)
        assert trainer.state.num_input_tokens_seen == real  # two steps of 2 rows: the whole dataset once
        logged = [e["num_input_tokens_seen"] for e in trainer.state.log_history if "loss" in e]
        assert logged[-1] == real and logged[0] < real


def test_neftune_noise_is_scaled_by_each_samples_own_length(tiny, tmp_path):
    alpha, d = 5.0, 64
    rows = [{"input_ids": _ids(n, n)} for n in (4, 16, 9)]
    trainer = _trainer(tiny, tmp_path, rows, _args(tmp_path, neftune_noise_alpha=alpha))
    (mb,) = next(iter(trainer.get_train_dataloader()))["hdp_step"].micro_batches
    model = trainer.model
    emb = model.get_input_embeddings()
    captured = []
    hook = emb.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    trainer.hdp_neftune.attach(model)  # what train() does; the noise hook runs after the capture hook
    model.train()
    noisy = []
    probe = emb.register_forward_hook(lambda m, i, o: noisy.append(o.detach()))
    model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], hdp_metadata=mb["hdp_metadata"])
    trainer.hdp_neftune.detach()
    hook.remove()
    probe.remove()
    noise = (noisy[0] - captured[0])[0]  # [T, d]
    lengths = torch.tensor([n for n in mb["hdp_metadata"].local_seqlens for _ in range(n)], dtype=torch.float64)
    mag = alpha / torch.sqrt(lengths * d)
    per_token = noise.abs().max(dim=-1).values
    assert (per_token <= mag * (1 + 1e-9)).all() and (per_token >= 0.5 * mag).all()
    # stock Trainer would use the packed length (29) for every token: the short sample's noise is larger here
    assert per_token[:4].max() > alpha / np.sqrt(29 * d)
    model.eval()  # no noise outside training
    out = emb(mb["input_ids"])
    assert torch.equal(out, captured[0])


# ------------------------------------------------------------------ 10. another Trainer's step in the MRO
class OtherTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_a_class_order_that_bypasses_hdps_step_is_refused_naming_the_order_that_works(tiny, tmp_path):
    rows = [{"input_ids": _ids(5)}]

    class Wrong(OtherTrainer, HDPTrainer):
        pass

    class Right(HDPTrainer, OtherTrainer):
        pass

    class Predicting(HDPTrainer):
        def prediction_step(self, *a, **kw):
            return None

    class OwnLoss(HDPTrainer):  # a subclass of HDPTrainer may override compute_loss: it is called per micro-batch
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return 3 * super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    with pytest.raises(
        TypeError,
        match=r"Wrong\(OtherTrainer, HDPTrainer\): OtherTrainer\.compute_loss comes before "
        r"HDPTrainer's.*class Wrong\(HDPTrainer, OtherTrainer\)",
    ):
        Wrong(load_model(tiny), _args(tmp_path), train_dataset=Dataset.from_list(rows))
    Right(load_model(tiny), _args(tmp_path), train_dataset=Dataset.from_list(rows))
    with pytest.raises(
        TypeError, match=r"Predicting overrides Predicting\.prediction_step, which HDPTrainer never calls"
    ):
        Predicting(load_model(tiny), _args(tmp_path), train_dataset=Dataset.from_list(rows))
    rows = [{"input_ids": _ids(n, n)} for n in (6, 9, 4)]
    own = OwnLoss(
        load_model(tiny),
        _args(tmp_path),
        train_dataset=Dataset.from_list(rows),
        hdp_config=HDPConfig(tokens_per_rank=64, global_batch_size=3),
    )
    _assert_equal_step(_one_step(own), reference_step(load_model(tiny), rows), scale=3.0)


# ------------------------------------------------------------------ Trainer's own entry points
def test_create_optimizer_and_scheduler_works_as_in_stock_trainer(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path, [{"input_ids": _ids(6)}, {"input_ids": _ids(3)}])
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    assert trainer.lr_scheduler is not None and trainer.optimizer._hdp_step_guard
    trainer.train()
    assert trainer.state.global_step == 1


def test_the_start_up_log_shows_hdps_global_batch_and_planner(tiny, tmp_path, caplog):
    trainer = _trainer(tiny, tmp_path, [{"input_ids": _ids(n)} for n in (6, 3, 5)])
    with caplog.at_level(logging.INFO, logger="hf_hdp.trainer.trainer"):
        trainer.train()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert re.search(r"Global batch = 3 samples per optimizer step", text), text
    assert "Planner = balanced, tokens per rank C = 64, world = 1" in text and "3 documents, 14 tokens" in text


def test_row_rules_truncate_documents_not_rows():
    docs = row_documents(
        {"input_ids": _ids(9), "position_ids": [0, 1, 2, 3, 4, 0, 1, 2, 3]}, 0, RowRules(truncate_to=3)
    )
    assert [len(d) for d in docs] == [3, 3]


def test_resume_refusals_name_the_fix(tiny, tmp_path):
    """A resume that would change the batches names the argument that makes it exact, with the checkpoint's value."""
    rows = [{"input_ids": _ids(n, n)} for n in (6, 9, 4, 7)]
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    saved = _trainer(tiny, tmp_path, rows, hdp_config=HDPConfig(tokens_per_rank=64, global_batch_size=4))
    (ckpt / STATE_FILE).write_text(json.dumps(hdp_state(saved)))
    cases = [
        (
            dict(hdp_config=HDPConfig(tokens_per_rank=64, global_batch_size=2)),
            r"global batch size differs \(global_batch_size: checkpoint 4, now 2\).*HDPConfig\(global_batch_size=4\)",
        ),
        (
            dict(args=_args(tmp_path, data_seed=7), hdp_config=HDPConfig(tokens_per_rank=64, global_batch_size=4)),
            r"data seed differs \(seed: checkpoint 0, now 7\).*TrainingArguments\(data_seed=0\)",
        ),
        (
            dict(
                args=_args(tmp_path, dataloader_drop_last=True),
                hdp_config=HDPConfig(tokens_per_rank=64, global_batch_size=4),
            ),
            r"TrainingArguments\(dataloader_drop_last=False\)",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(ResumeMismatchError, match=message):
            check_resume(_trainer(tiny, tmp_path, rows, **kwargs), str(ckpt))
