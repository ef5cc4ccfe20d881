"""Fine-tune a causal LM from the Hub (or a local folder) with Hybrid Data Parallelism.

One script for one CPU, one GPU, one node or many; launch it with ``torchrun`` or ``accelerate launch``
(exact lines in ``examples/README.md``)::

    torchrun --nproc_per_node 8 examples/finetune.py \\
        --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name <dataset> --text_column text \\
        --tokens_per_rank 16384 --global_batch_size 64 --bf16 --max_steps 1000 --output_dir out/qwen

Offline on 4 CPU processes, on a tiny Llama, its BPE tokenizer and a jsonl of standard-library files that the
demo builds locally in about 10 s (from the repository root)::

    python examples/hdp_demo.py --save_tiny_model hdp_output/tiny
    torchrun --nproc_per_node 4 examples/finetune.py --use_cpu --model_name_or_path hdp_output/tiny/model \\
        --train_file hdp_output/tiny/stdlib.jsonl --drop_long_samples \\
        --tokens_per_rank 1024 --global_batch_size 16 --max_steps 20 --output_dir out/cpu

The arguments are those of four dataclasses, parsed by ``HfArgumentParser``:
:class:`ModelArguments` and :class:`DataArguments` below, ``transformers.TrainingArguments`` and
:class:`hf_hdp.HDPConfig` (``--tokens_per_rank``, ``--global_batch_size``, ``--planner``, ...).
A single ``.json`` or ``.yaml`` file holding them all works too: ``finetune.py args.yaml``.

Data:

- ``--dataset_name`` (a Hub id or a local dataset folder, with ``--dataset_config_name`` and
  ``--dataset_split``) or ``--train_file`` (``.json``, ``.jsonl``, ``.txt``, ``.parquet``, ``.csv``);
- plain mode: ``--text_column`` is tokenized with the model's own tokenizer (its special tokens,
  BOS included where the tokenizer adds one) and EOS is appended, so the model learns where a
  document ends; the loss covers every token;
- ``--sft``: supervised fine-tuning. Either ``--prompt_column``/``--response_column`` (the prompt
  text then the response text, EOS appended) or a ``--messages_column`` of chat turns
  (``[{"role": ..., "content": ...}, ...]``) rendered with the tokenizer's chat template. Only
  response / assistant tokens carry loss; everything else is -100 in ``labels``.

Samples are neither truncated nor concatenated: HDP packs them itself, and a sample longer than one
rank's ``--tokens_per_rank`` is split over ``ceil(length / tokens_per_rank)`` ranks. A sample longer
than ``world_size x tokens_per_rank`` fits nowhere: by default HDPTrainer stops with an error that
names it; ``--drop_long_samples`` leaves such samples out and logs how many.

At the end the model and tokenizer are saved to ``--output_dir`` (``trainer.save_model``) and the
main process prints HDP's summary (samples per group size, micro-batches, P2P traffic per rank).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field

import datasets
import torch
import torch.distributed as dist
import transformers
from datasets import load_dataset, load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainingArguments, set_seed

from hf_hdp import HDPConfig, HDPDataError, HDPTrainer

logger = logging.getLogger("finetune")

IGNORE_INDEX = -100
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".txt": "text",
    ".text": "text",
    ".parquet": "parquet",
    ".csv": "csv",
}

# Used for a `messages` column when the tokenizer has no chat template and --chat_template is not given.
# Each turn is "<|role|>\n" + content + EOS, so an assistant turn ends with EOS (the model learns to stop).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "A Hub model id (e.g. Qwen/Qwen2.5-0.5B) or a local folder saved with save_pretrained."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer id or folder, if not the model's own."}
    )
    dtype: str = field(
        default="auto",
        metadata={"help": f"Weights dtype to load the model in, one of {DTYPES}. 'auto': the checkpoint's own."},
    )
    revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit) of the model."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where downloaded models and datasets and the tokenization cache are stored."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Allow model code from the Hub. HDP needs a model whose attention goes through "
            "transformers' AttentionInterface, which remote-code models rarely do."
        },
    )

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A dataset on the Hub, or a local dataset folder (load_dataset or save_to_disk)."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on, e.g. 'train' or 'train[:10%%]'."})
    train_file: str | None = field(
        default=None, metadata={"help": "A local file: .json / .jsonl (one object per line), .txt, .parquet or .csv."}
    )
    text_sample_by: str = field(
        default="line",
        metadata={"help": "For a .txt train_file: one sample per 'line', 'paragraph' or 'document'."},
    )
    text_column: str = field(default="text", metadata={"help": "Column with the text (plain mode)."})
    sft: bool = field(
        default=False,
        metadata={"help": "Supervised fine-tuning: loss on the response / assistant tokens only (the rest is -100)."},
    )
    prompt_column: str = field(default="prompt", metadata={"help": "SFT: column with the prompt text."})
    response_column: str = field(default="response", metadata={"help": "SFT: column with the response text."})
    messages_column: str = field(
        default="messages",
        metadata={
            "help": "SFT: column of chat turns [{'role', 'content'}, ...]; used when there is no prompt/response "
            "pair. Rendered with the tokenizer's chat template."
        },
    )
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "SFT: a Jinja chat template, or a file holding one, instead of the tokenizer's. Without either, "
            "a minimal '<|role|>\\ncontent<eos>' template is used (and a warning says so)."
        },
    )
    add_eos: bool = field(default=True, metadata={"help": "Append the tokenizer's EOS token to each text / response."})
    max_samples: int | None = field(
        default=None, metadata={"help": "Train on the first N samples only (before tokenization)."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenization (datasets.map num_proc)."}
    )
    drop_long_samples: bool = field(
        default=False,
        metadata={
            "help": "Leave out samples longer than world_size x tokens_per_rank (the count is logged). "
            "Default: stop with an error naming the first such sample."
        },
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Re-run tokenization instead of using the cache."})

    def __post_init__(self):
        if (self.dataset_name is None) == (self.train_file is None):
            raise ValueError("Give exactly one of --dataset_name and --train_file.")
        if self.train_file is not None and _file_builder(self.train_file) is None:
            raise ValueError(
                f"--train_file {self.train_file!r}: unknown extension; use one of {sorted(FILE_BUILDERS)}."
            )
        if self.text_sample_by not in ("line", "paragraph", "document"):
            raise ValueError(f"--text_sample_by must be 'line', 'paragraph' or 'document', got {self.text_sample_by!r}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"--max_samples must be at least 1, got {self.max_samples}")


def _file_builder(path: str) -> str | None:
    return FILE_BUILDERS.get(os.path.splitext(path)[1].lower())


# --------------------------------------------------------------------------- data
def load_raw_dataset(data_args: DataArguments, cache_dir: str | None = None) -> datasets.Dataset:
    """The training split as a map-style ``datasets.Dataset``, first ``max_samples`` rows if set."""
    if data_args.train_file is not None:
        builder = _file_builder(data_args.train_file)
        kwargs = {"sample_by": data_args.text_sample_by} if builder == "text" else {}
        ds = load_dataset(
            builder, data_files={"train": data_args.train_file}, split="train", cache_dir=cache_dir, **kwargs
        )
    elif os.path.isfile(os.path.join(data_args.dataset_name, "dataset_info.json")) or os.path.isfile(
        os.path.join(data_args.dataset_name, "dataset_dict.json")
    ):
        ds = load_from_disk(data_args.dataset_name)  # a folder written by save_to_disk
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[data_args.dataset_split]
    else:
        ds = load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, split=data_args.dataset_split, cache_dir=cache_dir
        )
    if not isinstance(ds, datasets.Dataset):
        raise TypeError(f"expected a map-style datasets.Dataset, got {type(ds).__name__}")
    if data_args.max_samples is not None:
        ds = ds.select(range(min(data_args.max_samples, len(ds))))
    return ds


def detect_format(column_names: list[str], data_args: DataArguments) -> str:
    """``'text'``, ``'prompt_response'`` or ``'messages'``, from the flags and the dataset's columns."""
    cols = set(column_names)
    if not data_args.sft:
        if data_args.text_column not in cols:
            raise ValueError(
                f"the dataset has no column {data_args.text_column!r} (columns: {column_names}). Pass --text_column, "
                "or --sft for prompt/response or chat data."
            )
        return "text"
    if data_args.prompt_column in cols and data_args.response_column in cols:
        return "prompt_response"
    if data_args.messages_column in cols:
        return "messages"
    raise ValueError(
        f"--sft needs a prompt and a response column ({data_args.prompt_column!r}, {data_args.response_column!r}) or a "
        f"chat column ({data_args.messages_column!r}); the dataset has {column_names}. Name yours with "
        "--prompt_column/--response_column or --messages_column."
    )


def resolve_chat_template(tokenizer, data_args: DataArguments, warn: bool = True) -> str | None:
    """The template to render ``messages`` with: --chat_template, else the tokenizer's (None), else the default."""
    if data_args.chat_template:
        if os.path.isfile(data_args.chat_template):
            with open(data_args.chat_template, encoding="utf-8") as f:
                return f.read()
        return data_args.chat_template
    if getattr(tokenizer, "chat_template", None):
        return None
    if warn:
        logger.warning(
            "the tokenizer has no chat template; rendering messages as '<|role|>\\ncontent<eos>'. Pass --chat_template "
            "to use another format."
        )
    return DEFAULT_CHAT_TEMPLATE


def _eos(tokenizer, data_args: DataArguments) -> list[int]:
    if not data_args.add_eos:
        return []
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"the tokenizer of {tokenizer.name_or_path!r} has no EOS token to append; set one with "
            "--tokenizer_name, or pass --add_eos false."
        )
    return [tokenizer.eos_token_id]


def _tokenize_text(texts, tokenizer, data_args):
    eos = _eos(tokenizer, data_args)
    ids = tokenizer([t or "" for t in texts], add_special_tokens=True)["input_ids"]
    return {"input_ids": [x + eos if eos and (not x or x[-1] != eos[0]) else x for x in ids]}


def _tokenize_prompt_response(prompts, responses, tokenizer, data_args):
    eos = _eos(tokenizer, data_args)
    prompt_ids = tokenizer([p or "" for p in prompts], add_special_tokens=True)["input_ids"]
    response_ids = tokenizer([r or "" for r in responses], add_special_tokens=False)["input_ids"]
    out = {"input_ids": [], "labels": []}
    for p, r in zip(prompt_ids, response_ids):
        r = r + eos
        out["input_ids"].append(p + r)
        out["labels"].append([IGNORE_INDEX] * len(p) + r)
    return out


def _render(tokenizer, messages, chat_template, add_generation_prompt=False) -> str:
    if not messages and not add_generation_prompt:
        return ""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template
    )


def _tokenize_messages(conversations, tokenizer, chat_template):
    """Render each conversation; label the tokens that start inside an assistant turn's reply."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "chat SFT needs a fast tokenizer (for character offsets); use --prompt_column/--response_column"
        )
    out = {"input_ids": [], "labels": []}
    for messages in conversations:
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]  # datasets pads struct fields
        text = _render(tokenizer, messages, chat_template)
        spans = []
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            start = len(_render(tokenizer, messages[:i], chat_template, add_generation_prompt=True))
            through = _render(tokenizer, messages[: i + 1], chat_template)
            if not text.startswith(through) or start > len(through):
                raise ValueError(
                    "the chat template does not render a conversation as the concatenation of its turns (it rewrites "
                    "earlier turns), so assistant tokens cannot be located. Pass --chat_template, or give "
                    "--prompt_column/--response_column data."
                )
            spans.append((start, len(through)))
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = [
            tok if any(s <= a < e for s, e in spans) else IGNORE_INDEX
            for tok, (a, _) in zip(ids, enc["offset_mapping"])
        ]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return out


def tokenize_batch(
    batch: dict,
    tokenizer,
    data_args: DataArguments,
    fmt: str,
    chat_template: str | None = None,
    length_column: str = "length",
) -> dict:
    """``datasets.map`` function (batched): ``input_ids``, ``labels`` in SFT modes, and the length column."""
    if fmt == "text":
        out = _tokenize_text(batch[data_args.text_column], tokenizer, data_args)
    elif fmt == "prompt_response":
        out = _tokenize_prompt_response(
            batch[data_args.prompt_column], batch[data_args.response_column], tokenizer, data_args
        )
    elif fmt == "messages":
        out = _tokenize_messages(batch[data_args.messages_column], tokenizer, chat_template)
    else:
        raise ValueError(f"unknown data format {fmt!r}")
    out[length_column] = [len(x) for x in out["input_ids"]]
    return out


def prepare_dataset(
    raw: datasets.Dataset,
    tokenizer,
    data_args: DataArguments,
    length_column: str,
    max_tokens: int | None,
    is_main: bool,
) -> datasets.Dataset:
    """Tokenize ``raw``; leave out samples with nothing to predict and, with --drop_long_samples, those over
    ``max_tokens``. Every sample left out is counted in the log."""
    fmt = detect_format(raw.column_names, data_args)
    chat_template = resolve_chat_template(tokenizer, data_args, warn=is_main) if fmt == "messages" else None
    ds = raw.map(
        tokenize_batch,
        batched=True,
        num_proc=data_args.preprocessing_num_workers,
        remove_columns=raw.column_names,
        load_from_cache_file=not data_args.overwrite_cache,
        fn_kwargs={
            "tokenizer": tokenizer,
            "data_args": data_args,
            "fmt": fmt,
            "chat_template": chat_template,
            "length_column": length_column,
        },
        desc=f"tokenizing ({fmt})",
    )
    before = len(ds)
    ds = ds.filter(
        lambda n: [x > 1 for x in n],
        input_columns=[length_column],
        batched=True,
        num_proc=data_args.preprocessing_num_workers,
        desc="leaving out samples with nothing to predict",
    )
    if len(ds) < before and is_main:
        logger.warning(
            "left out %d of %d samples with fewer than 2 tokens (empty text: nothing to predict)",
            before - len(ds),
            before,
        )
    if data_args.drop_long_samples and max_tokens is not None:
        before = len(ds)
        ds = ds.filter(
            lambda n: [x <= max_tokens for x in n],
            input_columns=[length_column],
            batched=True,
            num_proc=data_args.preprocessing_num_workers,
            desc="leaving out samples that fit no plan",
        )
        if is_main:
            logger.warning(
                "--drop_long_samples: dropped %d of %d samples longer than world_size x tokens_per_rank = %d tokens",
                before - len(ds),
                before,
                max_tokens,
            )
    if fmt != "text" and is_main:
        unlabeled = len(
            ds.filter(
                lambda col: [all(t == IGNORE_INDEX for t in lab[1:]) for lab in col],
                input_columns=["labels"],
                batched=True,
                desc="counting samples without a response",
            )
        )
        if unlabeled:
            logger.warning("%d of %d SFT samples have no response token to learn from", unlabeled, len(ds))
    if len(ds) == 0:
        raise ValueError("no training samples left after tokenization and filtering")
    return ds


# --------------------------------------------------------------------------- main
def make_parser() -> HfArgumentParser:
    return HfArgumentParser(
        (ModelArguments, DataArguments, TrainingArguments, HDPConfig), description=__doc__.splitlines()[0]
    )


def parse_args(argv: list[str] | None = None):
    parser = make_parser()
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def _setup_logging(training_args: TrainingArguments) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = training_args.get_process_log_level()
    logger.setLevel(level if training_args.process_index == 0 else max(level, logging.WARNING))
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args, hdp_config = parse_args(argv)
    _setup_logging(training_args)
    set_seed(training_args.seed)
    world, rank = training_args.world_size, training_args.process_index
    is_main = rank == 0

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path,
        revision=model_args.revision,
        cache_dir=model_args.cache_dir,
        trust_remote_code=model_args.trust_remote_code,
    )
    if hdp_config.tokens_per_rank == "auto":  # C is chosen by HDPTrainer from the memory budget: HDP drops
        max_tokens = None
        if data_args.drop_long_samples:
            hdp_config = dataclasses.replace(hdp_config, long_sample_policy="drop")
    else:
        max_tokens = world * hdp_config.tokens_per_rank
    with training_args.main_process_first(desc="loading and tokenizing the data"):
        raw = load_raw_dataset(data_args, model_args.cache_dir)
        train_dataset = prepare_dataset(raw, tokenizer, data_args, hdp_config.length_column, max_tokens, is_main)

    dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        dtype=dtype,
        revision=model_args.revision,
        cache_dir=model_args.cache_dir,
        trust_remote_code=model_args.trust_remote_code,
    )
    if is_main:
        logger.info(
            "model %s: %.1fM parameters, %s; %d samples, %d tokens; %d ranks x %s tokens_per_rank",
            model_args.model_name_or_path,
            model.num_parameters() / 1e6,
            model.dtype,
            len(train_dataset),
            sum(train_dataset[hdp_config.length_column]),
            world,
            hdp_config.tokens_per_rank,
        )

    try:
        trainer = HDPTrainer(
            model=model,
            args=training_args,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            hdp_config=hdp_config,
        )
    except HDPDataError as err:
        if "world_size x tokens_per_rank" in str(err):
            logger.error(
                "%s\nfinetune.py: pass --drop_long_samples to leave such samples out (the count is logged).", err
            )
        raise

    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()  # model and tokenizer, to --output_dir
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()

    summary = trainer.hdp_summary()
    everyone = [summary]
    if dist.is_available() and dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, summary)
    if is_main:
        summary = dict(summary)
        for key in ("micro_batches_this_rank", "p2p_bytes_this_rank", "busy_cpu_s_this_rank"):
            summary[key.replace("_this_rank", "_per_rank")] = [s[key] for s in everyone]
        summary.update(
            world_size=world,
            tokens_per_rank=hdp_config.tokens_per_rank,
            global_batch_size=trainer.global_batch_size,
            planner=hdp_config.planner,
            train_loss=result.training_loss,
            output_dir=training_args.output_dir,
        )
        print("hf_hdp summary: " + json.dumps(summary), flush=True)
    # Destroy the process group before the interpreter exits: otherwise gloo's worker threads may still hold
    # tensors at finalization and a rank can die with SIGABRT ("terminate called without an active exception").
    trainer.accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
