"""HDPSFTTrainer (hf_hdp.integrations.trl) on 2 gloo ranks equals TRL's stock SFTTrainer on one process.

A character-level tokenizer with a ChatML-like template (``{% generation %}`` marks the assistant
turns) and a tiny Llama in float64, both saved locally; chat conversations of mixed length (the long
ones are split over both ranks at C = 128). Stock and HDP train the same global batch (the whole
dataset each step) with SGD for 2 steps: the same per-step loss, entropy, token accuracy and weights.
Tolerances are float32's: TRL's fused log-prob kernel (stock's loss and metrics) runs in float32 even
for a float64 model; HDP's side is float64 (at world size 1 the weights agree to ~1e-8).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402

from tests.dist_utils import run_distributed  # noqa: E402
from tests.models import load_model, save_tiny_model  # noqa: E402

WORLD = 2
C = 128  # tokens per rank: the 3-turn conversations (about 200 tokens) run split over both ranks
STEPS = 2
ROWS = 8


def _load_example():
    """examples/sft_chat.py as a module: its chat template and tokenizer are the ones tested here."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "sft_chat.py")
    spec = importlib.util.spec_from_file_location("sft_chat_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sft_chat = _load_example()
save_chat_tokenizer = sft_chat.save_chat_tokenizer


def conversations(n: int = ROWS, seed: int = 0) -> list[dict]:
    """Chats of 1 to 3 turns; every third is long enough to be split over both ranks."""
    rng = random.Random(seed)
    words = ["hello", "data", "rank", "ring", "token", "long", "short", "model", "why", "yes", "no", "sure"]

    def say(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    rows = []
    for i in range(n):
        turns = 3 if i % 3 == 0 else 1
        msgs = []
        for _ in range(turns):
            msgs += [
                {"role": "user", "content": say(rng.randint(2, 5)) + "?"},
                {"role": "assistant", "content": say(rng.randint(3, 8)) + "."},
            ]
        rows.append({"messages": msgs})
    return rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("trl") / "llama")
    save_tiny_model("llama", path)
    save_chat_tokenizer(path)
    return path


def sft_config(out: str, per_device: int, **kw):
    from trl import SFTConfig

    base = dict(
        output_dir=out,
        use_cpu=True,
        bf16=False,
        report_to=[],
        max_steps=STEPS,
        per_device_train_batch_size=per_device,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        gradient_checkpointing=False,
        max_length=512,
        seed=0,
        dataset_num_proc=None,
    )
    base.update(kw)
    return SFTConfig(**base)


CASES = {
    "assistant_only": dict(assistant_only_loss=True),
    "packing": dict(packing=True, max_length=256, assistant_only_loss=True),
    "dft": dict(loss_type="dft"),
    # examples/sft_chat.py --packing --loss_type dft: DFT over packed rows (its rising loss is stock's too)
    "packing_dft": dict(packing=True, max_length=256, assistant_only_loss=True, loss_type="dft"),
}


def _history(trainer) -> list[dict]:
    return [
        {k: e[k] for k in ("loss", "entropy", "mean_token_accuracy", "num_tokens") if k in e}
        for e in trainer.state.log_history
        if "loss" in e
    ]


def stock_run(model_path: str, out: str, case: str):
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_path)
    trainer = SFTTrainer(
        load_model(model_path),
        sft_config(out, ROWS, **CASES[case]),
        processing_class=tok,
        train_dataset=Dataset.from_list(conversations()),
    )
    trainer.train()
    history = _history(trainer)
    if case == "assistant_only":  # a raw dataset passed to evaluate() is prepared as at construction
        history.append(trainer.evaluate(Dataset.from_list(conversations(4, seed=1))))
    return history, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _hdp_worker(rank, world_size, model_path, out, cases=tuple(CASES)):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size)
    )
    from transformers import AutoTokenizer

    from hf_hdp import HDPConfig
    from hf_hdp.integrations.trl import HDPSFTTrainer

    results = {}
    for case in cases:
        kw = CASES[case]
        tok = AutoTokenizer.from_pretrained(model_path)
        trainer = HDPSFTTrainer(
            load_model(model_path),
            sft_config(os.path.join(out, case), ROWS // world_size, **kw),
            processing_class=tok,
            train_dataset=Dataset.from_list(conversations()),
            hdp_config=HDPConfig(tokens_per_rank=C, loss_chunk_tokens=16),
        )
        trainer.train()
        split = trainer.hdp_summary()
        history = _history(trainer)
        if case == "assistant_only":
            history.append(trainer.evaluate(Dataset.from_list(conversations(4, seed=1))))
        results[case] = (history, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, split)
    return results


@pytest.fixture(scope="module")
def hdp_runs(tiny, tmp_path_factory):
    return run_distributed(_hdp_worker, WORLD, tiny, str(tmp_path_factory.mktemp("hdp")))


@pytest.mark.parametrize("case", list(CASES))
def test_hdp_sft_on_2_ranks_equals_stock_sft(case, tiny, hdp_runs, tmp_path):
    _check_against_stock(case, tiny, hdp_runs, WORLD, tmp_path)


def test_hdp_sft_on_4_ranks_equals_stock_sft(tiny, tmp_path):
    runs = run_distributed(_hdp_worker, 4, tiny, str(tmp_path / "hdp4"), ("assistant_only",))
    _check_against_stock("assistant_only", tiny, runs, 4, tmp_path)


def _check_against_stock(case, tiny, hdp_runs, world, tmp_path):
    stock_history, stock_weights = stock_run(tiny, str(tmp_path / "stock"), case)
    if case == "assistant_only":  # evaluation: the same loss and SFT metrics, per token over the eval set
        stock_eval = stock_history.pop()
        for rank in range(world):
            got = hdp_runs[rank][case][0][-1]
            for key in ("eval_loss", "eval_entropy", "eval_mean_token_accuracy"):
                assert got[key] == pytest.approx(stock_eval[key], rel=1e-6), (rank, key, got, stock_eval)
    assert len(stock_history) == STEPS
    initial = load_model(tiny).state_dict()
    assert any(not torch.equal(initial[k], stock_weights[k]) for k in initial), "training changed nothing"
    for rank in range(world):
        history, weights, summary = hdp_runs[rank][case]
        history = history[:STEPS]
        assert len(history) == STEPS, history
        for got, want in zip(history, stock_history):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-6), (rank, history, stock_history)
            assert got["entropy"] == pytest.approx(want["entropy"], rel=1e-6)
            assert got["mean_token_accuracy"] == pytest.approx(want["mean_token_accuracy"], abs=1e-6)
            assert got["num_tokens"] == want["num_tokens"]
        for k, w in stock_weights.items():
            torch.testing.assert_close(weights[k], w, rtol=1e-6, atol=1e-7, msg=lambda m: f"{case} {k}: {m}")
    # the long conversations really ran split over two ranks
    assert "2" in {str(k) for k in hdp_runs[0][case][2]["group_sizes"]}, hdp_runs[0][case][2]


def test_packing_keeps_documents_apart(tiny):
    """With packing, a packed row's conversations are separate HDP documents (TRL's seq_lengths)."""
    from transformers import AutoTokenizer

    from hf_hdp import HDPConfig
    from hf_hdp.integrations.trl import HDPSFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny)
    trainer = HDPSFTTrainer(
        load_model(tiny),
        sft_config("unused", ROWS, **CASES["packing"]),
        processing_class=tok,
        train_dataset=Dataset.from_list(conversations()),
        hdp_config=HDPConfig(tokens_per_rank=256),
    )
    measured = trainer.hdp_train_data
    assert len(measured) < ROWS  # rows were packed
    assert len(measured.doc_lengths) == ROWS  # ... and split back into one document per conversation
    assert set(trainer.train_dataset.column_names) >= {"input_ids", "labels", "seq_lengths"}
    assert "messages" not in trainer.train_dataset.column_names


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("activation_offloading", True, r"activation_offloading=True is not supported.*offload_ratio"),
        ("gradient_checkpointing_kwargs", {"selective": True}, r"selective.*Drop 'selective'"),
        ("label_smoothing_factor", 0.1, r"label_smoothing_factor=0.1.*Set label_smoothing_factor=0"),
    ],
)
def test_refused_fields_name_the_fix(tiny, field, value, message):
    from transformers import AutoTokenizer

    from hf_hdp.integrations.trl import HDPSFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny)
    kw = {field: value}
    if field == "gradient_checkpointing_kwargs":
        kw["gradient_checkpointing"] = True
    with pytest.raises(ValueError, match=message):
        HDPSFTTrainer(
            load_model(tiny),
            sft_config("unused", 2, **kw),
            processing_class=tok,
            train_dataset=Dataset.from_list(conversations(2)),
        )


@pytest.mark.parametrize("loss_type", ["dft", "nll"])
def test_chunked_loss_equals_full_logits_on_a_softcapped_head(loss_type, tmp_path):
    """Gemma 2's head soft-caps its logits: one step with the chunked head (logits recomputed in backward)
    trains the weights the full logits do, on one process."""
    from transformers import AutoTokenizer

    from hf_hdp import HDPConfig
    from hf_hdp.integrations.trl import HDPSFTTrainer
    from tests.family_models import load_family_model, save_family_model

    path = save_family_model("gemma2", str(tmp_path / "gemma2"))
    save_chat_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(path)
    runs = {}
    for chunk in (16, None):
        model = load_family_model(path, "gemma2")
        assert model.config.final_logit_softcapping
        trainer = HDPSFTTrainer(
            model,
            sft_config(str(tmp_path / f"out{chunk}"), 4, max_steps=1, loss_type=loss_type),
            processing_class=tok,
            train_dataset=Dataset.from_list(conversations(4)),
            hdp_config=HDPConfig(tokens_per_rank=512, loss_chunk_tokens=chunk),
        )
        trainer.train()
        runs[chunk] = (_history(trainer)[0], {k: v.detach().clone() for k, v in model.state_dict().items()})
    (got, got_w), (want, want_w) = runs[16], runs[None]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-9)
    initial = load_family_model(path, "gemma2").state_dict()
    assert any(not torch.equal(initial[k], want_w[k]) for k in initial), "training changed nothing"
    for k, w in want_w.items():
        torch.testing.assert_close(got_w[k], w, rtol=1e-9, atol=1e-11, msg=lambda m, k=k: f"{k}: {m}")
