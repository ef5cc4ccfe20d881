"""examples/finetune.py end to end, offline: a tiny Llama and a locally trained BPE tokenizer, saved with
save_pretrained, fine-tuned on 2 CPU processes under torchrun and under accelerate launch."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_hdp import HDPDataError
from tests.dist_utils import free_port
from tests.models import save_bpe_llama, stdlib_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "finetune.py")
CPU_CONFIG = os.path.join(ROOT, "examples", "accelerate_configs", "cpu_gloo_4proc.yaml")
TOKENS_PER_RANK = 64  # on 2 ranks a sample may have up to 128 tokens


def _load_script():
    spec = importlib.util.spec_from_file_location("finetune_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


finetune = _load_script()


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A byte-level BPE tokenizer trained on a few stdlib files and a tiny Llama, both save_pretrained."""
    return save_bpe_llama(
        str(tmp_path_factory.mktemp("tiny") / "llama"),
        ("textwrap.py", "bisect.py", "heapq.py", "colorsys.py"),
        max_positions=4096,
    )


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def _write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _texts() -> list[str]:
    """Short snippets (one rank each), medium ones (split over both ranks) and one too long for 2 x 64 tokens."""
    src = stdlib_text("string.py")
    texts = []
    for i in range(14):
        size = 170 if i % 3 == 0 else 30 + 4 * i  # chars; ~2 chars per token with this small vocabulary
        texts.append(src[400 * i : 400 * i + size])
    texts.append(src[:3000])  # far over 128 tokens
    return texts


@pytest.fixture(scope="module")
def data_files(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("data")
    texts = _texts()
    plain = _write_jsonl(d / "plain.jsonl", [{"text": t} for t in texts])
    lengths = [len(tokenizer(t)["input_ids"]) + 1 for t in texts]  # + EOS
    sft_rows = [
        {
            "prompt": f"Question {i}: what does this code do?\n{t[:60]}\nAnswer:",
            "response": f" It is part {i} of string.py." + t[60:100],
        }
        for i, t in enumerate(texts[:12])
    ]
    sft = _write_jsonl(d / "sft.jsonl", sft_rows)
    return {"plain": plain, "plain_lengths": lengths, "sft": sft, "sft_rows": sft_rows}


def _common_args(model_dir: str, out: str, train_file: str, cache: str) -> list[str]:
    return [
        "--model_name_or_path",
        model_dir,
        "--train_file",
        train_file,
        "--output_dir",
        out,
        "--cache_dir",
        cache,
        "--use_cpu",
        "--dtype",
        "float32",
        "--max_steps",
        "3",
        "--global_batch_size",
        "4",
        "--tokens_per_rank",
        str(TOKENS_PER_RANK),
        "--learning_rate",
        "1e-2",
        "--lr_scheduler_type",
        "constant",
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--seed",
        "0",
    ]


def _env(tmp_path) -> dict:
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=ROOT,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HOME=str(tmp_path / "hf_home"),
    )


def _launch(cmd: list[str], tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=ROOT)


def _summary(proc) -> dict:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("hf_hdp summary: ")]
    assert len(lines) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # printed by the main process only
    return json.loads(lines[0][len("hf_hdp summary: ") :])


def _assert_trained(model_dir: str, out: str) -> None:
    initial = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert trained.keys() == initial.keys()
    changed = [k for k in initial if not torch.equal(initial[k], trained[k])]
    assert len(changed) >= len(initial) // 2, f"training changed only {changed}"
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|endoftext|>"  # the tokenizer is saved too


# ------------------------------------------------------------------ end to end
def test_plain_text_under_torchrun_drops_long_samples_and_saves(model_dir, data_files, tmp_path):
    out = str(tmp_path / "out")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        SCRIPT,
        *_common_args(model_dir, out, data_files["plain"], str(tmp_path / "cache")),
        "--drop_long_samples",
    ]
    proc = _launch(cmd, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lengths = data_files["plain_lengths"]
    too_long = sum(n > 2 * TOKENS_PER_RANK for n in lengths)
    assert too_long == 1 and sum(TOKENS_PER_RANK < n <= 2 * TOKENS_PER_RANK for n in lengths) >= 3, lengths
    log = proc.stdout + proc.stderr
    assert f"dropped {too_long} of {len(lengths)} samples longer than world_size x tokens_per_rank = 128" in log, log
    summary = _summary(proc)
    assert summary["world_size"] == 2 and summary["steps"] == 3 and summary["samples"] == 12
    assert "2" in summary["group_sizes"], summary  # a medium sample ran split over both ranks
    assert sum(summary["p2p_bytes_per_rank"]) > 0
    _assert_trained(model_dir, out)


def test_sft_under_accelerate_launch(model_dir, data_files, tmp_path):
    out = str(tmp_path / "out")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        CPU_CONFIG,
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        SCRIPT,
        *_common_args(model_dir, out, data_files["sft"], str(tmp_path / "cache")),
        "--sft",
    ]
    proc = _launch(cmd, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = _summary(proc)
    assert summary["world_size"] == 2 and summary["steps"] == 3, summary
    _assert_trained(model_dir, out)


# ------------------------------------------------------------------ in process
def _data_args(**kw):
    return finetune.DataArguments(train_file="x.jsonl", **kw)


def test_plain_text_appends_eos_and_has_no_labels(tokenizer):
    out = finetune.tokenize_batch({"text": ["def f(x):", ""]}, tokenizer, _data_args(), "text")
    eos = tokenizer.eos_token_id
    assert out["input_ids"][0] == tokenizer("def f(x):")["input_ids"] + [eos]
    assert out["input_ids"][1] == [eos]
    assert out["length"] == [len(x) for x in out["input_ids"]] and "labels" not in out


def test_sft_prompt_tokens_are_masked(tokenizer, data_files):
    rows = data_files["sft_rows"][:3]
    batch = {"prompt": [r["prompt"] for r in rows], "response": [r["response"] for r in rows]}
    out = finetune.tokenize_batch(batch, tokenizer, _data_args(sft=True), "prompt_response")
    for r, ids, labels in zip(rows, out["input_ids"], out["labels"]):
        n_prompt = len(tokenizer(r["prompt"])["input_ids"])
        response = tokenizer(r["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert ids == tokenizer(r["prompt"])["input_ids"] + response
        assert labels[:n_prompt] == [-100] * n_prompt  # prompt tokens carry no loss
        assert labels[n_prompt:] == response  # every response token does, EOS included
    assert finetune.detect_format(["prompt", "response", "id"], _data_args(sft=True)) == "prompt_response"


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.parametrize("template", ["tokenizer", "default"])
def test_chat_messages_train_on_assistant_turns_only(tokenizer, template):
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    if template == "tokenizer":
        tok.chat_template = CHATML
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Sort [3, 1, 2]."},
        {"role": "assistant", "content": "[1, 2, 3]"},
        {"role": "user", "content": "Reverse it."},
        {"role": "assistant", "content": "[3, 2, 1]"},
    ]
    args = _data_args(sft=True)
    fmt = finetune.detect_format(["messages"], args)
    out = finetune.tokenize_batch({"messages": [messages]}, tok, args, fmt, finetune.resolve_chat_template(tok, args))
    ids, labels = out["input_ids"][0], out["labels"][0]
    trained = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
    masked = tok.decode([t for t, lab in zip(ids, labels) if lab == -100])
    end = "<|im_end|>" if template == "tokenizer" else tok.eos_token
    assert trained.replace("\n", "") == f"[1, 2, 3]{end}[3, 2, 1]{end}".replace("\n", ""), trained
    for text in ("Be brief.", "Sort [3, 1, 2].", "Reverse it.", "assistant"):
        assert text in masked
    assert all(lab in (-100, t) for t, lab in zip(ids, labels))


def test_sample_too_long_errors_by_default(model_dir, data_files, tmp_path):
    """One process: a sample over 1 x tokens_per_rank stops HDPTrainer unless --drop_long_samples is given."""
    argv = _common_args(model_dir, str(tmp_path / "out"), data_files["plain"], str(tmp_path / "cache"))
    with pytest.raises(HDPDataError, match=r"tokens, more than world_size x tokens_per_rank = 1 x 64 = 64"):
        finetune.main(argv)


def test_help_lists_every_group_of_arguments():
    text = finetune.make_parser().format_help()
    for flag in (
        "--model_name_or_path",
        "--train_file",
        "--sft",
        "--drop_long_samples",
        "--learning_rate",
        "--tokens_per_rank",
        "--planner",
    ):
        assert flag in text


def test_sft_without_usable_columns_says_what_to_pass():
    with pytest.raises(ValueError, match=r"--prompt_column/--response_column or --messages_column"):
        finetune.detect_format(["text"], _data_args(sft=True))
    with pytest.raises(ValueError, match=r"no column 'body'"):
        finetune.detect_format(["text"], _data_args(text_column="body"))
    with pytest.raises(ValueError, match=r"unknown extension"):
        finetune.DataArguments(train_file="data.xml")
