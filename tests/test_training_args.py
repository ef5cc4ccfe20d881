"""HDPTrainingArguments (TrainingArguments carrying HDPConfig's fields), hdp_config_from_args, the uniform-length
warning, and examples/run_clm.py (the stock script with the HDP swap) under torchrun on local files."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pickle
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from transformers import HfArgumentParser, LlamaForCausalLM, TrainingArguments

from hf_hdp import HDPConfig, HDPTrainer
from hf_hdp.training_args import HDP_FIELDS, HDPTrainingArguments, hdp_config_from_args, warn_if_uniform_lengths
from tests.dist_utils import free_port
from tests.models import save_bpe_llama, stdlib_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_CLM = os.path.join(ROOT, "examples", "run_clm.py")
HDP_FLAGS = [
    "--tokens_per_rank",
    "64",
    "--global_batch_size",
    "4",
    "--planner",
    "naive",
    "--attention_split",
    "ring",
    "--offload_ratio",
    "0.5",
    "--no_check_plan_hash",
    "--long_sample_policy",
    "drop",
]


def _parse(*argv: str) -> HDPTrainingArguments:
    (args,) = HfArgumentParser(HDPTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "unused_out", "--use_cpu", "--report_to", "none", *argv]
    )
    return args


# ------------------------------------------------------------------ the arguments
def test_every_hdp_config_field_is_carried_with_its_default_and_help():
    ours = {f.name: f for f in dataclasses.fields(HDPTrainingArguments)}
    for f in dataclasses.fields(HDPConfig):
        assert ours[f.name].default == f.default and ours[f.name].metadata["help"] == f.metadata["help"], f.name
    assert set(HDP_FIELDS) <= set(ours) and {f.name for f in dataclasses.fields(TrainingArguments)} <= set(ours)
    assert HDPTrainingArguments(output_dir="x", use_cpu=True).hdp_config == HDPConfig()  # the same defaults
    assert issubclass(HDPTrainingArguments, TrainingArguments)


def test_hf_argument_parser_reads_the_hdp_flags():
    args = _parse(*HDP_FLAGS, "--learning_rate", "0.01")
    cfg = args.hdp_config
    assert isinstance(cfg, HDPConfig) and args.learning_rate == 0.01  # TrainingArguments' own flags still work
    assert (cfg.tokens_per_rank, cfg.global_batch_size, cfg.planner, cfg.attention_split) == (64, 4, "naive", "ring")
    assert (cfg.offload_ratio, cfg.check_plan_hash, cfg.long_sample_policy) == (0.5, False, "drop")
    assert args.tokens_per_rank == 64 and args.offload_ratio == 0.5  # normalised from the command line's text
    assert _parse("--tokens_per_rank", "auto", "--memory_budget_gb", "16").hdp_config.tokens_per_rank == "auto"
    help_text = HfArgumentParser(HDPTrainingArguments).format_help()
    assert "--tokens_per_rank" in help_text and "--attention_split" in help_text and "Capacity C" in help_text


def test_invalid_hdp_values_are_refused_with_hdp_configs_message():
    for flags, kwargs in (
        (["--tokens_per_rank", "0"], {"tokens_per_rank": 0}),
        (["--planner", "naive", "--attention_split", "ulysses"], {"planner": "naive", "attention_split": "ulysses"}),
        (["--memory_budget_gb", "8"], {"memory_budget_gb": 8.0}),
    ):
        with pytest.raises(ValueError) as expected:
            HDPConfig(**kwargs)
        with pytest.raises(ValueError) as got:
            _parse(*flags)
        assert str(got.value) == str(expected.value)
    with pytest.raises(SystemExit):  # a Literal field's choices are argparse's
        _parse("--planner", "nonsense")


def test_json_round_trip():
    args = _parse(*HDP_FLAGS)
    text = args.to_json_string()
    assert json.loads(text)["tokens_per_rank"] == 64 and json.loads(text)["planner"] == "naive"
    (back,) = HfArgumentParser(HDPTrainingArguments).parse_dict(json.loads(text))
    assert back.hdp_config == args.hdp_config and back.to_dict() == args.to_dict()


def test_pickle_and_torch_save_round_trip():
    args = _parse(*HDP_FLAGS)
    for back in (pickle.loads(pickle.dumps(args)), _torch_round_trip(args)):
        assert type(back) is HDPTrainingArguments and back.hdp_config == args.hdp_config
        assert back.to_dict() == args.to_dict()


def _torch_round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)  # how Trainer writes training_args.bin
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_hdp_config_from_args():
    plain = TrainingArguments(output_dir="x", use_cpu=True)
    args = _parse(*HDP_FLAGS)
    given = HDPConfig(tokens_per_rank=32)
    assert hdp_config_from_args(plain, None) == HDPConfig()
    assert hdp_config_from_args(None, None) == HDPConfig()
    assert hdp_config_from_args(plain, given) is given
    assert hdp_config_from_args(args, None) == args.hdp_config
    assert hdp_config_from_args(args, args.hdp_config) == args.hdp_config
    other = dataclasses.replace(args.hdp_config, tokens_per_rank=32, planner="static")
    with pytest.raises(
        ValueError,
        match=r"they differ \(tokens_per_rank: hdp_config=32 vs args=64, planner: "
        r"hdp_config='static' vs args='naive'\)\. Pass the HDP settings one way",
    ):
        hdp_config_from_args(args, other)


def test_uniform_lengths_warn(caplog):
    log = logging.getLogger("test_training_args")
    with caplog.at_level(logging.WARNING, logger="test_training_args"):
        assert warn_if_uniform_lengths([128] * 10, log)
    assert "all 10 samples of train_dataset have the same length (128 tokens)" in caplog.text
    assert "--keep_documents" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="test_training_args"):
        assert not warn_if_uniform_lengths([128, 128, 37], log)
        assert not warn_if_uniform_lengths([128], log)
    assert caplog.text == ""


# ------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A byte-level BPE tokenizer trained on a few stdlib files and a tiny Llama, both save_pretrained."""
    return save_bpe_llama(
        str(tmp_path_factory.mktemp("tiny") / "llama"), ("textwrap.py", "bisect.py", "heapq.py"), max_positions=1024
    )


def test_hdp_trainer_trains_with_hdp_training_arguments(model_dir, tmp_path):
    out = str(tmp_path / "out")
    args = _parse(
        "--output_dir",
        out,
        "--max_steps",
        "2",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "true",
        "--learning_rate",
        "1e-2",
        "--tokens_per_rank",
        "48",
        "--global_batch_size",
        "2",
    )
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = [{"input_ids": [(7 * i + j) % 500 + 1 for j in range(5 + 4 * i)]} for i in range(8)]
    trainer = HDPTrainer(model, args, train_dataset=Dataset.from_list(rows), hdp_config=args.hdp_config)
    assert trainer.hdp_config == args.hdp_config and trainer.global_batch_size == 2
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    trainer.save_model()
    saved = torch.load(os.path.join(out, "training_args.bin"), weights_only=False)  # the checkpoint's copy
    assert type(saved) is HDPTrainingArguments and saved.hdp_config == args.hdp_config


# ------------------------------------------------------------------ examples/run_clm.py
def _write_text(path, lines) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("mode", ["keep_documents", "group_texts"])
def test_run_clm_under_torchrun_trains_and_evaluates_local_files(model_dir, tmp_path, mode):
    """keep_documents: one sample per line, with the accuracy metric; group_texts: the stock 32-token blocks,
    evaluated with --no_compute_accuracy (the loss and perplexity only)."""
    source = [
        ln for ln in stdlib_text("string.py").splitlines() + stdlib_text("colorsys.py").splitlines() if ln.strip()
    ]
    docs = [" ".join(source[i : i + 1 + i % 5]) for i in range(0, 180, 3)]  # documents of uneven length
    train = _write_text(tmp_path / "train.txt", docs[:48])
    valid = _write_text(tmp_path / "valid.txt", docs[48:])
    out = str(tmp_path / "out")
    metrics = mode == "keep_documents"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        RUN_CLM,
        "--model_name_or_path",
        model_dir,
        "--train_file",
        train,
        "--validation_file",
        valid,
        *(["--keep_documents"] if mode == "keep_documents" else ["--block_size", "32"]),
        "--do_train",
        "--do_eval",
        "--output_dir",
        out,
        "--cache_dir",
        str(tmp_path / "cache"),
        "--use_cpu",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--learning_rate",
        "1e-2",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--seed",
        "0",
        "--tokens_per_rank",
        "64",
        "--long_sample_policy",
        "drop",
    ]
    if not metrics:
        cmd.append("--no_compute_accuracy")
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=ROOT,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HOME=str(tmp_path / "hf_home"),
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(os.path.join(out, "train_results.json")) as f:
        train_results = json.load(f)
    with open(os.path.join(out, "eval_results.json")) as f:
        eval_results = json.load(f)
    if mode == "keep_documents":  # one sample per line
        assert train_results["train_samples"] == 48 and eval_results["eval_samples"] == len(docs) - 48
    else:  # the stock path: the corpus cut into 32-token blocks
        assert train_results["train_samples"] > 48 and eval_results["eval_samples"] > len(docs) - 48
    assert train_results["train_loss"] > 0 and eval_results["eval_loss"] > 0
    assert eval_results["perplexity"] == pytest.approx(float(torch.tensor(eval_results["eval_loss"]).exp()), rel=1e-4)
    if metrics:
        assert 0.0 <= eval_results["eval_accuracy"] <= 1.0
    else:
        assert "eval_accuracy" not in eval_results
    saved = torch.load(os.path.join(out, "training_args.bin"), weights_only=False)
    assert type(saved) is HDPTrainingArguments and saved.hdp_config.tokens_per_rank == 64  # the flags reached it
    assert os.path.exists(os.path.join(out, "model.safetensors"))
