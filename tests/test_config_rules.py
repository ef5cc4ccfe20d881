"""Rules kept in one place: the global batch check (HDPConfig and HDPAccelerator.hdp_steps), the
decoder-only / AttentionInterface refusal (check_model_supported and enable_hdp_attention), the split names
(HDPConfig and the planner), and HDPConfig.check_training_args' table of contradictions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    BloomForCausalLM,
    LlamaConfig,
    T5Config,
    T5ForConditionalGeneration,
)

from hf_hdp.config import HDPConfig, check_global_batch_size
from hf_hdp.engine.setup import enable_hdp_attention
from hf_hdp.models import UnsupportedModelError, check_model_supported, require_hdp_routable
from hf_hdp.planning.cost.recurrent import MODES
from hf_hdp.planning.splits import SPLITS
from hf_hdp.training_checks import TRAINING_ARGS_CHECKS


@pytest.mark.parametrize("value", [8, 1, None])
def test_a_global_batch_passes_as_given(value):
    assert check_global_batch_size(value) == value
    assert HDPConfig(global_batch_size=value).global_batch_size == value


@pytest.mark.parametrize("value", [0, -3, True, 2.0, "8"])
def test_a_global_batch_that_is_not_a_positive_int_is_refused_naming_the_setting(value):
    with pytest.raises(ValueError, match=rf"HDPConfig.global_batch_size must be a positive integer or None.*{value!r}"):
        HDPConfig(global_batch_size=value)


@pytest.mark.parametrize("value", [None, 0, False])
def test_a_caller_that_needs_the_batch_refuses_none_with_its_fix(value):
    with pytest.raises(
        ValueError,
        match=r"HDPAccelerator.hdp_steps needs the global batch .*: pass global_batch_size= "
        rf"or set HDPConfig.global_batch_size; got {value!r}",
    ):
        check_global_batch_size(
            value, "HDPAccelerator.hdp_steps", fix="pass global_batch_size= or set HDPConfig.global_batch_size"
        )
    assert check_global_batch_size(4, "HDPAccelerator.hdp_steps", fix="set it") == 4


def _t5():
    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_ff=32, num_layers=1, num_heads=2))


def test_encoder_decoder_refusal_is_the_same_in_both_places():
    model = _t5()
    errors = []
    for refuse in (
        lambda: check_model_supported(model, 60),
        lambda: enable_hdp_attention(model),
        lambda: require_hdp_routable(model),
    ):
        with pytest.raises(UnsupportedModelError) as err:
            refuse()
        errors.append(str(err.value))
    for text in errors:
        assert "T5ForConditionalGeneration (model_type 't5')" in text and "Seq2SeqTrainer" in text
    line = "- it is an encoder-decoder model (bidirectional encoder, cross-attention)"
    assert all(line in text for text in errors), errors


def test_a_model_outside_the_attention_interface_is_refused_by_enable_hdp_attention_as_by_the_check():
    model = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedModelError, match="BloomForCausalLM does not route its attention through") as a:
        enable_hdp_attention(model)
    with pytest.raises(UnsupportedModelError) as b:
        check_model_supported(model, 60)
    assert str(a.value).splitlines()[1] in str(b.value).splitlines()


def test_a_decoder_only_model_passes_require_hdp_routable():
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = AutoModelForCausalLM.from_config(config)
    assert require_hdp_routable(model) is model


def test_split_names_come_from_the_planner():
    for split in SPLITS:
        kwargs = {} if split in ("auto", "ring") else {"planner": "balanced"}
        assert HDPConfig(attention_split=split, **kwargs).attention_split == split
    for split in MODES:
        assert HDPConfig(state_split=split).state_split == split
    with pytest.raises(
        ValueError,
        match=rf"attention_split must be one of {SPLITS!r}, got 'zigzag'".replace("(", r"\(").replace(")", r"\)"),
    ):
        HDPConfig(attention_split="zigzag")
    with pytest.raises(ValueError, match=r"state_split must be one of \('auto', 'heads', 'scan'\), got 'rows'"):
        HDPConfig(state_split="rows")


_CONTRADICTIONS = [
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4 both set the batch"),
    ({"auto_find_batch_size": True}, "auto_find_batch_size=True contradicts HDP"),
    ({"train_sampling_strategy": "group_by_length"}, "train_sampling_strategy='group_by_length' contradicts HDP"),
    ({"group_by_length": True}, "group_by_length=True contradicts HDP"),
    ({"label_smoothing_factor": 0.1}, "label_smoothing_factor=0.1 would be ignored"),
    ({"use_liger_kernel": True}, "use_liger_kernel=True is not supported"),
    ({"average_tokens_across_devices": False, "world_size": 2}, "average_tokens_across_devices=False"),
    ({"deepspeed": "ds.json"}, "TrainingArguments.deepspeed is set"),
    ({"fsdp": "full_shard"}, "TrainingArguments.fsdp is set"),
    ({"parallelism_config": SimpleNamespace(cp_size=2, tp_size=1)}, "parallelism_config sets {'cp_size': 2}"),
]


@pytest.mark.parametrize("given, message", _CONTRADICTIONS, ids=[next(iter(g)) for g, _ in _CONTRADICTIONS])
def test_each_contradicting_training_argument_is_refused_by_name(given, message):
    config = HDPConfig(global_batch_size=8)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("{", r"\{")):
        config.check_training_args(SimpleNamespace(**given))
    assert sum(check(config, SimpleNamespace(**given)) is not None for check in TRAINING_ARGS_CHECKS) == 1


def test_training_arguments_that_agree_pass():
    args = SimpleNamespace(
        gradient_accumulation_steps=1,
        train_sampling_strategy="random",
        world_size=4,
        average_tokens_across_devices=True,
        parallelism_config=SimpleNamespace(cp_size=1),
    )
    HDPConfig(global_batch_size=8).check_training_args(args)
    HDPConfig().check_training_args(SimpleNamespace(gradient_accumulation_steps=4))  # no global batch: Trainer's
