#!/usr/bin/env python
# HDP swap, relative to transformers' examples/pytorch/language-modeling/run_clm.py (lines marked "# HDP"):
#   1. one import line after transformers' imports:
#          from hf_hdp import HDPTrainer, HDPTrainingArguments as TrainingArguments
#      (the script's own HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments)) then
#      parses --tokens_per_rank, --planner, --attention_split, ... with no other change)
#   2. the trainer: Trainer(...) -> HDPTrainer(...), same arguments
# and two flags that are not in the stock script: --keep_documents (one document per sample, no group_texts:
# what HDP is for) and --no_compute_accuracy (evaluate the loss / perplexity only, no accuracy metric).
"""Causal language modelling on a text/json/csv file or a dataset, with HDPTrainer: transformers' run_clm.py.

This is a faithful, shortened rendition of the structure of transformers'
``examples/pytorch/language-modeling/run_clm.py`` (Apache-2.0, The HuggingFace Inc. team), written for
this repository rather than copied: the same ``ModelArguments`` / ``DataTrainingArguments``
dataclasses and flags, ``HfArgumentParser`` (or one ``.json`` file), ``load_dataset`` on
``--dataset_name`` or ``--train_file``/``--validation_file``, config / tokenizer / model loading
(``--model_name_or_path``, or ``--model_type`` with ``--config_overrides`` from scratch), the
``tokenize_function``, ``group_texts`` into ``--block_size`` blocks, ``preprocess_logits_for_metrics``
(argmax) and ``compute_metrics`` (accuracy of ``preds[:, :-1]`` against ``labels[:, 1:]``), then
train / save / evaluate with perplexity. Left out: ``--streaming`` (HDP measures a map-style dataset
before training) and the TPU entry point; accuracy is computed with numpy instead of
``evaluate.load("accuracy")`` (which downloads the metric), ignoring -100 labels.

Fixed-size ``group_texts`` blocks all have the same length, which leaves HDP nothing to balance
(HDPTrainer warns). ``--keep_documents`` keeps each document (a line of a .txt file, a row of a
json/csv file) as one sample, as long as it is: HDP packs the short ones and splits the long ones
over ranks (``--tokens_per_rank``; ``--long_sample_policy`` for those longer than all ranks together)::

    torchrun --nproc_per_node 8 examples/run_clm.py --model_name_or_path Qwen/Qwen2.5-0.5B \\
        --train_file train.txt --validation_file valid.txt --keep_documents \\
        --tokens_per_rank 16384 --bf16 --do_train --do_eval --output_dir out/clm

Offline on 4 CPU processes, on the tiny local model and data the demo builds (the validation set is then
``--validation_split_percentage`` of the file)::

    python examples/hdp_demo.py --save_tiny_model hdp_output/tiny
    torchrun --nproc_per_node 4 examples/run_clm.py --use_cpu --model_name_or_path hdp_output/tiny/model \\
        --train_file hdp_output/tiny/stdlib.jsonl --keep_documents --tokens_per_rank 1024 \\
        --long_sample_policy drop --do_train --do_eval --max_steps 10 --output_dir out/clm
"""

import logging
import math
import os
import sys
from dataclasses import dataclass, field
from itertools import chain

import datasets
import numpy as np
import torch
import transformers
from datasets import load_dataset
from transformers import (
    CONFIG_MAPPING,
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    default_data_collator,
    is_torch_xla_available,
    set_seed,
)

from hf_hdp import HDPTrainer  # HDP (1): the import
from hf_hdp import HDPTrainingArguments as TrainingArguments

logger = logging.getLogger(__name__)

MODEL_CONFIG_CLASSES = list(MODEL_FOR_CAUSAL_LM_MAPPING.keys())
MODEL_TYPES = tuple(conf.model_type for conf in MODEL_CONFIG_CLASSES)


@dataclass
class ModelArguments:
    """Which model / config / tokenizer to fine-tune, or train from scratch."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The model checkpoint to start from (a Hub id or a local folder). "
            "Leave unset to train from scratch."
        },
    )
    model_type: str | None = field(
        default=None, metadata={"help": "From scratch: a model type from the list: " + ", ".join(MODEL_TYPES)}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "From scratch: config settings to override, e.g. "
            "hidden_size=64,num_hidden_layers=2,num_attention_heads=4"
        },
    )
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's"})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer name or path, if not the model's"})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and data are stored"})
    use_fast_tokenizer: bool = field(default=True, metadata={"help": "Use a fast (tokenizers-backed) tokenizer."})
    model_revision: str = field(default="main", metadata={"help": "Model version: branch, tag or commit id."})
    token: str = field(
        default=None, metadata={"help": "HTTP bearer token for remote files (default: hf auth login's)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code from the Hub's model/dataset repos."})
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Load the model in this dtype ('auto': the checkpoint's).",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )

    def __post_init__(self):
        if self.config_overrides is not None and (self.config_name is not None or self.model_name_or_path is not None):
            raise ValueError(
                "--config_overrides can't be used in combination with --config_name or --model_name_or_path"
            )


@dataclass
class DataTrainingArguments:
    """What data to train and evaluate on."""

    dataset_name: str | None = field(default=None, metadata={"help": "A dataset name (the datasets library)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_file: str | None = field(default=None, metadata={"help": "Training data: a .txt, .json or .csv file."})
    validation_file: str | None = field(
        default=None, metadata={"help": "Evaluation data (perplexity): a .txt, .json or .csv file."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training samples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many evaluation samples."})
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "Length of the blocks the concatenated, tokenized texts are cut into. Default: the "
            "tokenizer's model_max_length (at most 1024). Not used with --keep_documents."
        },
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Overwrite the cached training and evaluation sets"})
    validation_split_percentage: int | None = field(
        default=5,
        metadata={"help": "Percentage of the train set used for validation when there is no validation split"},
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for preprocessing."})
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep line breaks when using .txt files."})
    keep_documents: bool = field(  # HDP: not in the stock script
        default=False,
        metadata={
            "help": "HDP: one sample per document, whole (no group_texts blocks, --block_size unused), "
            "empty documents dropped. HDP packs short samples and splits long ones over ranks."
        },
    )
    compute_accuracy: bool = field(  # HDP: not in the stock script
        default=True,
        metadata={
            "help": "Compute the token accuracy at evaluation (compute_metrics); --no_compute_accuracy "
            "evaluates the loss and perplexity only."
        },
    )

    def __post_init__(self):
        if self.dataset_name is None and self.train_file is None and self.validation_file is None:
            raise ValueError("Need either a dataset name or a training/validation file.")
        for path in (self.train_file, self.validation_file):
            if path is not None and path.split(".")[-1] not in ("csv", "json", "jsonl", "txt"):
                raise ValueError(f"{path}: train_file / validation_file should be a csv, a json or a txt file.")


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning(
        f"Process rank: {training_args.local_process_index}, device: {training_args.device}, "
        f"n_gpu: {training_args.n_gpu}, distributed training: {training_args.parallel_mode.value == 'distributed'}, "
        f"16-bits training: {training_args.fp16}"
    )
    logger.info(f"Training/evaluation parameters {training_args}")

    set_seed(training_args.seed)

    # Datasets: a dataset by name, or local csv/json/txt files (the 'text' column, else the first one)
    load_kwargs = {"cache_dir": model_args.cache_dir, "token": model_args.token}
    if data_args.dataset_name is not None:
        source = (data_args.dataset_name, data_args.dataset_config_name)
        load_kwargs["trust_remote_code"] = model_args.trust_remote_code
    else:
        data_files = {}
        if data_args.train_file is not None:
            data_files["train"] = data_args.train_file
        if data_args.validation_file is not None:
            data_files["validation"] = data_args.validation_file
        extension = (data_args.train_file or data_args.validation_file).split(".")[-1]
        extension = {"txt": "text", "jsonl": "json"}.get(extension, extension)
        if extension == "text":
            load_kwargs["keep_linebreaks"] = data_args.keep_linebreaks
        source = (extension,)
        load_kwargs["data_files"] = data_files
    raw_datasets = load_dataset(*source, **load_kwargs)
    if "validation" not in raw_datasets:
        pct = data_args.validation_split_percentage
        raw_datasets["validation"] = load_dataset(*source, split=f"train[:{pct}%]", **load_kwargs)
        raw_datasets["train"] = load_dataset(*source, split=f"train[{pct}%:]", **load_kwargs)

    # Config, tokenizer, model
    config_kwargs = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    if model_args.config_name:
        config = AutoConfig.from_pretrained(model_args.config_name, **config_kwargs)
    elif model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, **config_kwargs)
    else:
        config = CONFIG_MAPPING[model_args.model_type]()
        logger.warning("You are instantiating a new config instance from scratch.")
        if model_args.config_overrides is not None:
            logger.info(f"Overriding config: {model_args.config_overrides}")
            config.update_from_string(model_args.config_overrides)
            logger.info(f"New config: {config}")

    tokenizer_kwargs = {
        "cache_dir": model_args.cache_dir,
        "use_fast": model_args.use_fast_tokenizer,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    if model_args.tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name, **tokenizer_kwargs)
    elif model_args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, **tokenizer_kwargs)
    else:
        raise ValueError(
            "You are instantiating a new tokenizer from scratch. This is not supported by this script. "
            "Save one and load it from here with --tokenizer_name."
        )

    if model_args.model_name_or_path:
        dtype = model_args.dtype if model_args.dtype in ["auto", None] else getattr(torch, model_args.dtype)
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
            dtype=dtype,
        )
    else:
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
        n_params = sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())
        logger.info(f"Training new model from scratch - Total size={n_params / 2**20:.2f}M params")

    # resize the embeddings only when the tokenizer has more tokens than the model
    embedding_size = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > embedding_size:
        model.resize_token_embeddings(len(tokenizer))

    # Preprocessing: tokenize every text
    column_names = list(raw_datasets["train" if training_args.do_train else "validation"].features)
    text_column_name = "text" if "text" in column_names else column_names[0]

    def tokenize_function(examples):
        return tokenizer(examples[text_column_name])

    with training_args.main_process_first(desc="dataset map tokenization"):
        tokenized_datasets = raw_datasets.map(
            tokenize_function,
            batched=True,
            num_proc=data_args.preprocessing_num_workers,
            remove_columns=column_names,
            load_from_cache_file=not data_args.overwrite_cache,
            desc="Running tokenizer on dataset",
        )

    max_pos_embeddings = getattr(config, "max_position_embeddings", 1024)
    if data_args.block_size is None:
        block_size = tokenizer.model_max_length
        if block_size > max_pos_embeddings:
            logger.warning(
                f"The tokenizer picked seems to have a very large `model_max_length` ({tokenizer.model_max_length}). "
                f"Using block_size={min(1024, max_pos_embeddings)} instead. You can change that default value by "
                "passing --block_size xxx."
            )
            block_size = min(1024, max_pos_embeddings) if max_pos_embeddings > 0 else 1024
    else:
        if data_args.block_size > tokenizer.model_max_length:
            logger.warning(
                f"The block_size passed ({data_args.block_size}) is larger than the maximum length for the model "
                f"({tokenizer.model_max_length}). Using block_size={tokenizer.model_max_length}."
            )
        block_size = min(data_args.block_size, tokenizer.model_max_length)

    # Concatenate all texts, then cut them into block_size chunks (the remainder is dropped)
    def group_texts(examples):
        concatenated_examples = {k: list(chain(*examples[k])) for k in examples}
        total_length = len(concatenated_examples[list(examples.keys())[0]])
        if total_length < block_size:
            raise ValueError(f"block_size of {block_size} is too big - use a value <={total_length}")
        total_length = (total_length // block_size) * block_size
        result = {
            k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
            for k, t in concatenated_examples.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    def whole_documents(examples):  # HDP: --keep_documents, one sample per non-empty document
        keep = [i for i, ids in enumerate(examples["input_ids"]) if len(ids) > 0]
        result = {k: [examples[k][i] for i in keep] for k in examples}
        result["labels"] = [list(ids) for ids in result["input_ids"]]
        return result

    with training_args.main_process_first(desc="grouping texts together"):
        lm_datasets = tokenized_datasets.map(
            whole_documents if data_args.keep_documents else group_texts,
            batched=True,
            num_proc=data_args.preprocessing_num_workers,
            load_from_cache_file=not data_args.overwrite_cache,
            desc="Keeping whole documents" if data_args.keep_documents else f"Grouping texts in chunks of {block_size}",
        )

    if training_args.do_train:
        if "train" not in tokenized_datasets:
            raise ValueError("--do_train requires a train dataset")
        train_dataset = lm_datasets["train"]
        if data_args.max_train_samples is not None:
            train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))

    if training_args.do_eval:
        if "validation" not in tokenized_datasets:
            raise ValueError("--do_eval requires a validation dataset")
        eval_dataset = lm_datasets["validation"]
        if data_args.max_eval_samples is not None:
            eval_dataset = eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))

        def preprocess_logits_for_metrics(logits, labels):
            if isinstance(logits, tuple):  # logits come first, other outputs (past_key_values) after
                logits = logits[0]
            return logits.argmax(dim=-1)

        def compute_metrics(eval_preds):
            preds, labels = eval_preds
            # preds are the argmax of preprocess_logits_for_metrics, in the labels' shape: shift the labels
            labels = np.asarray(labels)[:, 1:].reshape(-1)
            preds = np.asarray(preds)[:, :-1].reshape(-1)
            scored = labels != -100
            return {"accuracy": float((preds[scored] == labels[scored]).mean()) if scored.any() else float("nan")}

    metrics_on = training_args.do_eval and not is_torch_xla_available() and data_args.compute_accuracy
    trainer = HDPTrainer(  # HDP (2): Trainer -> HDPTrainer
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics if metrics_on else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if metrics_on else None,
    )

    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()  # saves the tokenizer too
        metrics = train_result.metrics
        max_train_samples = (
            data_args.max_train_samples if data_args.max_train_samples is not None else len(train_dataset)
        )
        metrics["train_samples"] = min(max_train_samples, len(train_dataset))
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training_args.do_eval:
        logger.info("*** Evaluate ***")
        metrics = trainer.evaluate()
        max_eval_samples = data_args.max_eval_samples if data_args.max_eval_samples is not None else len(eval_dataset)
        metrics["eval_samples"] = min(max_eval_samples, len(eval_dataset))
        try:
            perplexity = math.exp(metrics["eval_loss"])
        except OverflowError:
            perplexity = float("inf")
        metrics["perplexity"] = perplexity
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-generation"}
    if data_args.dataset_name is not None:
        kwargs["dataset_tags"] = data_args.dataset_name
        if data_args.dataset_config_name is not None:
            kwargs["dataset_args"] = data_args.dataset_config_name
            kwargs["dataset"] = f"{data_args.dataset_name} {data_args.dataset_config_name}"
        else:
            kwargs["dataset"] = data_args.dataset_name
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)


if __name__ == "__main__":
    main()
