"""Survey: does every causal-LM family of the installed transformers either train with HDP or get refused?

For each ``model_type`` of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (or ``--families a,b``), in its own subprocess
bounded by ``--timeout`` seconds:

1. build a tiny config (``AutoConfig.for_model`` with small sizes for the keys the family's config has, nested
   ``text_config``/``vision_config``/... shrunk the same way; :data:`OVERRIDES` where the generic shrinking fails),
   a randomly initialised model, ``save_pretrained`` and ``from_pretrained`` it (float32);
2. build ``HDPTrainer`` on 2 gloo ranks: a refusal at construction (``UnsupportedModelError``, or another error an
   hf_hdp check raises on purpose) is recorded with its message;
3. otherwise run ONE real HDP training step on 2 gloo ranks (forked processes) with ``tokens_per_rank=16`` over a few
   samples, two of them longer than 16 tokens (so they are split over both ranks), and compare the step's loss with
   one process running each sample alone with the model's stock attention.

Anything else (an exception in the step, a rank that never finishes) is a CRASH: a bug in hf_hdp to fix. The
result is a markdown table (``--out``, default docs/model_table.md) naming the transformers version, and a summary.
Not part of the test suite (minutes per dozen families). Usage::

    .venv/bin/python scripts/survey_models.py --out docs/model_table.md [--families llama,qwen3_next] [--jobs 2]
    .venv/bin/python scripts/survey_models.py --families qwen3_next --update   # re-survey some rows of the table
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.abspath(__file__)

# ---------------------------------------------------------------- the data of the one step
TOKENS_PER_RANK = 16  # on 2 ranks: the samples of 24 and 30 tokens are split over both
LENGTHS = (5, 24, 9, 30, 3, 12)
VOCAB = 128
LOSS_RTOL = 1e-4  # float32 model: HDP's loss and one process's agree to float32 rounding (a few 1e-7)


def samples(vocab: int = VOCAB) -> list[dict]:
    import random

    rng = random.Random(0)
    rows = []
    for i, n in enumerate(LENGTHS):
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        labels = [-100] * (n // 4) + ids[n // 4 :] if i % 2 else list(ids)
        rows.append({"input_ids": ids, "labels": labels})
    return rows


# ---------------------------------------------------------------- tiny configs
# every key a family's config may use for a size, and its tiny value; only keys the config already has are set
SHRINK = {
    # widths, depths, heads
    "hidden_size": 64,
    "n_embd": 64,
    "d_model": 64,
    "dim": 64,
    "embed_dim": 64,
    "model_dim": 64,
    "hidden_dim": 64,
    "intermediate_size": 128,
    "n_inner": 128,
    "ffn_dim": 128,
    "ffn_hidden_size": 128,
    "d_ff": 128,
    "mlp_dim": 128,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
    "intermediate_size_mlp": 128,
    "dense_intermediate_size": 128,
    "num_hidden_layers": 2,
    "n_layer": 2,
    "n_layers": 2,
    "num_layers": 2,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "depth": 2,
    "num_decoder_layers": 2,
    "n_head": 4,
    "num_attention_heads": 4,
    "num_heads": 4,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "num_key_value_heads": 2,
    "n_kv_heads": 2,
    "num_kv_heads": 2,
    "multi_query_group_num": 2,
    "head_dim": 16,
    "kv_channels": 16,
    "attention_head_dim": 16,
    "vocab_size": VOCAB,
    "padded_vocab_size": VOCAB,
    "num_global_key_value_heads": 2,
    # MoE
    "num_local_experts": 4,
    "num_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "moe_k": 2,
    "top_k": 2,
    "moe_intermediate_size": 32,
    "expert_intermediate_size": 32,
    "shared_expert_intermediate_size": 64,
    "moe_shared_expert_intermediate_size": 64,
    "n_group": 1,
    "topk_group": 1,
    "num_expert_group": 1,
    "first_k_dense_replace": 1,
    "n_shared_experts": 1,
    # multi-head latent attention (q/k head 24, v head 16: they differ, as in DeepSeek-V3)
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "qk_head_dim": 24,
    "rotary_dim": 8,
    # linear attention / state space / convolution
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "mamba_n_heads": 4,
    "mamba_num_heads": 4,
    "mamba_d_head": 32,
    "mamba_head_dim": 32,  # 4 x 32 = 2 x 64
    "mamba_d_state": 8,
    "mamba_d_ssm": 128,
    "ssm_state_size": 8,
    "state_size": 8,
    "mamba_n_groups": 1,
    "n_groups": 1,
    "mamba_expand": 2,
    "time_step_rank": 8,
    # vision / audio towers of composite configs
    "image_size": 32,
    "patch_size": 8,
    "out_hidden_size": 64,
    "projection_dim": 64,
    "vision_output_dim": 64,
    "num_channels": 3,
}
# list-valued per-layer keys resized to the tiny depth when the config does not derive them itself
PER_LAYER = (
    "layer_types",
    "no_rope_layers",
    "mlp_only_layers",
    "layers_block_type",
    "block_types",
    "sliding_window_pattern_list",
    "moe_layers",
    "full_attn_idxs",
    "attn_layer_indices",
)
SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# size keys set even where the default config leaves them None (the model needs a value)
NONE_DEFAULTS = (
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "n_routed_experts",
    "num_experts",
    "num_local_experts",
    "moe_intermediate_size",
    "n_shared_experts",
    "head_dim",
    "num_key_value_heads",
)
# per-layer keys of a nested config that its own __init__ derives from its depth: dropped before it is rebuilt
LAYER_INDEXED = PER_LAYER + ("per_layer_config",)
SUB_CONFIGS = (
    "text_config",
    "vision_config",
    "audio_config",
    "decoder_config",
    "encoder_config",
    "depth_decoder_config",
    "vision_tower_config",
    "speech_config",
    "perceiver_config",
)
# model_type -> config kwargs applied after the generic shrinking (where it fails for the family)
OVERRIDES: dict[str, dict] = {
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},  # one (global, local) pair = 2 layers
    "mamba2": {"head_dim": 32},  # num_heads x head_dim = expand x hidden_size
    "zaya": {"num_experts_per_tok": 1},  # the only value it supports
    "reformer": {"is_decoder": True},
}


def _tiny_kwargs(default, depth: int) -> dict:
    """The shrinking kwargs of ``default`` (a config instance): only keys it has, through its attribute_map."""
    have = default.to_dict()
    amap = getattr(default, "attribute_map", {}) or {}
    out = {}
    layers = next((have[k] for k in ("num_hidden_layers", "num_layers", "n_layer") if isinstance(have.get(k), int)), 0)
    for key, value in SHRINK.items():
        real = amap.get(key, key)
        if real not in have:
            continue
        tiny = depth if value == 2 and "layer" in key or key == "depth" else value
        current = have[real]
        if isinstance(current, int) and not isinstance(current, bool) or current is None and real in NONE_DEFAULTS:
            out[real] = tiny
        elif (
            isinstance(current, list) and layers and len(current) == layers and all(isinstance(v, int) for v in current)
        ):  # one size per layer (Gemma 3n's intermediate_size)
            out[real] = [tiny] * depth
    for key, value in have.items():  # per-layer lists of the default depth (layer_types, ...): the first layers
        if key not in out and isinstance(value, list) and layers and len(value) == layers and layers > depth:
            out[key] = value[:depth]
    per_layer = getattr(default, "per_layer_config", None)
    if isinstance(per_layer, dict):  # per-layer overrides keyed by layer index: those of the tiny depth
        out["per_layer_config"] = {k: v for k, v in per_layer.items() if int(k) < depth}
    if "qk_rope_head_dim" in out and "head_dim" in out:  # MLA configs: head_dim is the rotary part
        out["head_dim"] = out["qk_rope_head_dim"]
    if "kv_lora_rank" in out and "num_key_value_heads" in out:  # MLA: K and V per query head (no GQA)
        out["num_key_value_heads"] = out.get("num_attention_heads", 4)
    for key, value in SPECIAL_IDS.items():
        if key in have and isinstance(have[key], int):
            out[key] = value
    for key, value in have.items():  # every dropout off: one process's loss (eval mode) is then comparable
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            out[key] = 0.0
    if "output_router_logits" in have:
        out["output_router_logits"] = False  # the router aux loss is refused by design: survey the rest
    for key in SUB_CONFIGS:
        sub = getattr(default, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            sub_layers = getattr(sub, "num_hidden_layers", None)
            sub_dict = {
                k: v
                for k, v in sub.to_dict().items()
                if k not in LAYER_INDEXED and not (isinstance(v, list) and sub_layers and len(v) == sub_layers)
            }
            out[key] = dict(sub_dict, **_tiny_kwargs(sub, depth))
    return out


def _resize_per_layer(config, depth: int) -> None:
    """Per-layer lists the config kept at its default depth: keep the first ``depth`` entries."""
    for cfg in [config] + [getattr(config, k) for k in SUB_CONFIGS if getattr(config, k, None) is not None]:
        layers = getattr(cfg, "num_hidden_layers", None)
        for key in PER_LAYER:
            value = getattr(cfg, key, None)
            if isinstance(value, list) and layers and len(value) > layers:
                setattr(cfg, key, value[:layers])


def _kinds(config) -> set:
    """The layer kinds of a config (attention, linear attention, Mamba, ...), to keep each in the tiny model."""
    for key in ("layer_types", "layers_block_type", "layer_block_types", "block_types"):
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and value:
            return {str(t) for t in value}
    return set()


def tiny_config(model_type: str):
    """A tiny config of ``model_type``: 2 layers, or more when needed to keep every layer kind of the default."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    kinds = _kinds(getattr(default, "text_config", None) or default)
    config = None
    for depth in (2, 4, 8):
        config = AutoConfig.for_model(model_type, **dict(_tiny_kwargs(default, depth), **OVERRIDES.get(model_type, {})))
        _resize_per_layer(config, depth)
        if _kinds(getattr(config, "text_config", None) or config) >= kinds:
            break
    return config


# ---------------------------------------------------------------- one family (its own subprocess)
def _is_refusal(err: BaseException) -> bool:
    """An error hf_hdp raises on purpose at construction: UnsupportedModelError, or a ValueError/
    NotImplementedError/TypeError raised by a ``raise`` in hf_hdp itself (not deep inside torch/transformers)."""
    from hf_hdp.models import UnsupportedModelError

    if isinstance(err, UnsupportedModelError):
        return True
    if not isinstance(err, (ValueError, NotImplementedError, TypeError)):
        return False
    tb = traceback.extract_tb(err.__traceback__)
    return bool(tb) and f"{os.sep}hf_hdp{os.sep}" in tb[-1].filename and tb[-1].line.lstrip().startswith("raise")


def _first_sentence(text: str) -> str:
    text = " ".join(str(text).split())
    m = re.search(r"(?<=[.!?])\s", text[40:])  # not the "... cannot train X (model_type 'y'):" head alone
    return text[: 40 + m.start()] if m else text


def _message(err: BaseException) -> str:
    msg = str(err)
    # hf_hdp's refusal lists problems as "- ..." lines: the first problem is the reason
    lines = [ln[2:] for ln in msg.splitlines() if ln.startswith("- ")]
    return _first_sentence(lines[0] if lines else msg)


def _last_line(tb_text: str) -> str:
    lines = [ln for ln in tb_text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "?"


def _training_args(out: str):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out,
        use_cpu=True,
        max_steps=1,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )


def _trainer_class():
    from hf_hdp import HDPTrainer

    class SurveyTrainer(HDPTrainer):
        """HDPTrainer keeping each step's loss (the global batch's mean over its label tokens) unrounded."""

        survey_losses: list

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.survey_losses = getattr(self, "survey_losses", []) + [float(loss)]
            return loss

    return SurveyTrainer


def _build_trainer(path: str, out: str, tokens_per_rank: int):
    import logging

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from hf_hdp import HDPConfig

    warnings: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    logging.getLogger("hf_hdp").addHandler(Keep(level=logging.WARNING))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = _trainer_class()(
        model,
        _training_args(out),
        train_dataset=Dataset.from_list(samples()),
        hdp_config=HDPConfig(tokens_per_rank=tokens_per_rank, global_batch_size=len(LENGTHS), planner="naive"),
    )
    return trainer, warnings


def reference_loss(path: str) -> float:
    """One process, each sample alone, the model's stock attention: the sum of shifted token losses / label count."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()  # no dropout (the tiny configs set it to 0 anyway)
    rows = samples()
    targets = [torch.tensor(r["labels"])[1:] for r in rows]
    n = sum(int((t != -100).sum()) for t in targets)
    total = 0.0
    with torch.no_grad():
        for r, t in zip(rows, targets):
            logits = model(input_ids=torch.tensor([r["input_ids"]]), use_cache=False).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, t, ignore_index=-100, reduction="sum")) / n
    return total


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def survey_one(model_type: str, work: str, step_timeout: float) -> dict:
    """Everything about one family, as a dict (written as JSON by ``--one``)."""
    import torch

    res: dict = {"family": model_type}
    try:
        config = tiny_config(model_type)
    except Exception as err:  # noqa: BLE001
        return dict(res, status="no-config", detail=_first_sentence(f"{type(err).__name__}: {err}"))
    path = os.path.join(work, "model")
    try:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        res["class"] = type(model).__name__
        res["params"] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(path)
        del model
    except Exception as err:  # noqa: BLE001
        return dict(res, status="no-config", detail=_first_sentence(f"tiny model: {type(err).__name__}: {err}"))

    # construction and the step on 2 gloo ranks, forked from this process (its imports are shared); a refusal at
    # construction is recorded by the ranks
    ranks = os.path.join(work, "ranks")
    os.makedirs(ranks, exist_ok=True)
    started = time.monotonic()
    exitcodes = _run_forked_ranks(path, ranks, step_timeout)
    res["step_s"] = round(time.monotonic() - started, 1)
    results = []
    for r in range(2):
        f = os.path.join(ranks, f"rank{r}.json")
        results.append(json.load(open(f)) if os.path.exists(f) else None)
    failed = [r for r in results if r is not None and not r.get("ok")]
    hung = exitcodes is None
    refused = [r for r in failed if r["stage"] == "construction" and r.get("refusal")]
    if not refused and (failed or hung or any(c != 0 for c in exitcodes)):
        try:  # a tiny model that fails on one process too is a bad tiny config, not an HDP crash
            reference_loss(path)
        except Exception as err:  # noqa: BLE001
            return dict(
                res,
                status="no-config",
                detail=_first_sentence(f"the tiny model fails on one process too: {type(err).__name__}: {err}"),
            )
    if failed:
        r = failed[0]
        if r["stage"] == "construction" and r.get("refusal"):
            return dict(res, status="refused", detail=r["message"], error_type=r["type"])
        return dict(
            res, status="crash", stage=r["stage"], detail=_last_line(r["traceback"]), traceback=r["traceback"][-3000:]
        )
    if hung:
        return dict(res, status="crash", stage="step", detail=f"hang: no result after {int(step_timeout)} s")
    if any(c != 0 for c in exitcodes) or any(r is None for r in results):
        return dict(res, status="crash", stage="step", detail=f"a rank died without a result (exit codes {exitcodes})")
    res["support"] = results[0]["support"]
    res["warnings"] = results[0]["warnings"]
    hdp = results[0]["loss"]
    res["hdp_loss"] = hdp
    res["split"] = results[0].get("group_sizes")
    try:
        ref = reference_loss(path)
        res["ref_loss"] = ref
        res["loss_rel_diff"] = abs(hdp - ref) / max(abs(ref), 1e-30)
    except Exception as err:  # noqa: BLE001  (the reference is a nice-to-have: its own failure is not HDP's)
        res["ref_error"] = _first_sentence(f"{type(err).__name__}: {err}")
    res["status"] = "trained"
    return res


def _run_forked_ranks(path: str, work: str, timeout: float) -> list[int] | None:
    """Fork 2 ranks running :func:`rank_step`; their exit codes, or None when one was still running at ``timeout``
    (a hang). When a rank fails, its peer (perhaps waiting in a collective) is stopped after a 5 s grace."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_forked_rank, args=(r, 2, port, path, work)) for r in range(2)]
    for p in procs:
        p.start()
    deadline, failed_at = time.monotonic() + timeout, None
    while any(p.is_alive() for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + 5):
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join()
            return None if failed_at is None else [p.exitcode for p in procs]
        time.sleep(0.2)
    return [p.exitcode for p in procs]


def _forked_rank(rank: int, world: int, port: int, path: str, work: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    rank_step(path, work)


def rank_step(path: str, work: str) -> None:
    """One rank of the 2-rank step (RANK/WORLD_SIZE/MASTER_* set): writes rank{r}.json; exits non-zero on failure."""
    import torch
    import torch.distributed as dist

    from hf_hdp.distributed.launch import init_process_group

    torch.set_num_threads(1)
    init_process_group("gloo", timeout_s=120)
    rank = dist.get_rank()
    out = {"ok": False, "stage": "construction"}
    code = 1
    try:
        try:
            trainer, warnings = _build_trainer(path, os.path.join(work, "trainer"), tokens_per_rank=TOKENS_PER_RANK)
        except Exception as err:
            out.update(
                type=type(err).__name__,
                refusal=_is_refusal(err),
                message=_message(err),
                traceback=traceback.format_exc(),
            )
            raise
        out["stage"] = "step"
        trainer.train()
        summary = trainer.hdp_summary()
        out = {
            "ok": True,
            "loss": trainer.survey_losses[0],
            "group_sizes": summary.get("group_sizes"),
            "support": trainer.hdp_model_support.family,
            "warnings": [_first_sentence(w) for w in warnings],
        }
        code = 0
    except Exception:  # noqa: BLE001
        out.setdefault("traceback", traceback.format_exc())
    finally:
        with open(os.path.join(work, f"rank{rank}.json"), "w") as f:
            json.dump(out, f, default=str)
    os._exit(code)  # a failed rank ends now: the parent then stops its peer instead of leaving it in a collective


# ---------------------------------------------------------------- the driver
def _run_family(model_type: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"survey_{model_type}_") as work:
        result_file = os.path.join(work, "result.json")
        cmd = [
            "timeout",
            "-k",
            "10",
            str(int(timeout)),
            sys.executable,
            SCRIPT,
            "--one",
            model_type,
            "--work",
            work,
            "--step-timeout",
            str(max(30, timeout - 60)),
        ]
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            TRANSFORMERS_VERBOSITY="error",
        )
        started = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if os.path.exists(result_file):
            res = json.load(open(result_file))
        elif proc.returncode in (124, 137):
            res = {
                "family": model_type,
                "status": "crash",
                "stage": "?",
                "detail": f"hang: no result after {int(timeout)} s",
            }
        else:
            res = {
                "family": model_type,
                "status": "crash",
                "stage": "survey process",
                "detail": _last_line(proc.stderr or proc.stdout or f"exit {proc.returncode}"),
                "traceback": (proc.stderr or "")[-3000:],
            }
        res["wall_s"] = round(time.monotonic() - started, 1)
        return res


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def status_text(r: dict) -> str:
    s = r["status"]
    if s == "trained":
        loss = ""
        if "loss_rel_diff" in r:
            ok = r["loss_rel_diff"] <= LOSS_RTOL
            loss = (
                f"; loss = one process's (rel. diff {r['loss_rel_diff']:.0e})"
                if ok
                else f"; **LOSS DIFFERS from one process's** (HDP {r['hdp_loss']:.6f}, one process {r['ref_loss']:.6f})"
            )
        elif "ref_error" in r:
            loss = f"; no one-process loss ({r['ref_error']})"
        if r.get("support") in ("verified", "conditional"):
            return f"verified ({r['support']} in SUPPORTED_FAMILIES){loss}"
        return f"trains with a warning (unverified){loss}"
    if s == "refused":
        return f"refused: {r['detail']}"
    if s == "no-config":
        return f"could not build a tiny config: {r['detail']}"
    return f"**CRASH** ({r.get('stage', '?')}): {r['detail']}"


def _kind(r: dict) -> str:
    if r["status"] == "trained":
        if "loss_rel_diff" in r and r["loss_rel_diff"] > LOSS_RTOL:
            return "loss differs"
        return "verified" if r.get("support") in ("verified", "conditional") else "trains with a warning"
    return {"refused": "refused", "no-config": "no tiny config", "crash": "crash"}[r["status"]]


def write_table(results: list[dict], out: str, families_arg: str | None) -> dict:
    import torch
    import transformers

    counts: dict[str, int] = {}
    for r in results:
        counts[_kind(r)] = counts.get(_kind(r), 0) + 1
    order = ["verified", "trains with a warning", "refused", "no tiny config", "crash", "loss differs"]
    summary = ", ".join(f"{counts[k]} {k}" for k in order if k in counts)
    lines = [
        "# Model families under HDP",
        "",
        f"Made by `scripts/survey_models.py` with transformers {transformers.__version__} and torch "
        f"{torch.__version__} on {datetime.date.today().isoformat()}"
        + (f" (families: {families_arg})" if families_arg else "")
        + ". Each causal-LM family of "
        "transformers' `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, as a tiny float32 model (2 layers, hidden 64, or more "
        "layers where needed to keep every layer kind), either trains one HDP step on 2 gloo ranks "
        f"(tokens_per_rank={TOKENS_PER_RANK}; samples of {', '.join(map(str, LENGTHS))} tokens, the two longest "
        "split over both ranks; its loss compared with one process running each sample alone with the model's "
        "stock attention) or is refused when `HDPTrainer` is built. "
        "*verified*: listed in `hf_hdp.models.SUPPORTED_FAMILIES` (gradient equivalence tested in the suite); "
        "*trains with a warning*: every check passes, equivalence not tested (a warning says so); "
        "a *crash* is a bug.",
        "",
        f"**{len(results)} families: {summary}.** Re-run: "
        "`.venv/bin/python scripts/survey_models.py --out docs/model_table.md [--families a,b]`.",
        "",
        "| family | model class | status |",
        "|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: r["family"]):
        lines.append(f"| `{r['family']}` | {_cell(r.get('class', ''))} | {_cell(status_text(r))} |")
    crashes = [r for r in results if r["status"] == "crash"]
    if crashes:
        lines += ["", "## Crashes", ""]
        for r in sorted(crashes, key=lambda r: r["family"]):
            lines += [
                f"### `{r['family']}` ({r.get('stage', '?')})",
                "",
                "```",
                (r.get("traceback") or r["detail"]).strip()[-1500:],
                "```",
                "",
            ]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(sorted(results, key=lambda r: r["family"]), f, indent=1, default=str)
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "model_table.md"))
    ap.add_argument("--families", default=None, help="comma-separated model_types (default: every causal-LM family)")
    ap.add_argument(
        "--update",
        action="store_true",
        help="with --families: replace those families' rows in the existing table (its .json) and keep the others",
    )
    ap.add_argument("--jobs", type=int, default=2, help="families surveyed at once (each step uses 2 processes)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per family, step included")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--step-timeout", type=float, default=240, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        import logging

        logging.getLogger("transformers").setLevel(logging.ERROR)
        res = survey_one(a.one, a.work, a.step_timeout)
        with open(os.path.join(a.work, "result.json"), "w") as f:
            json.dump(res, f, default=str)
        return 0

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    families = a.families.split(",") if a.families else list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    unknown = [f for f in families if f not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
    if unknown:
        print(f"not causal-LM families of this transformers: {unknown}", file=sys.stderr)
        return 2
    results = []
    with cf.ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        futures = {pool.submit(_run_family, f, a.timeout): f for f in families}
        for i, fut in enumerate(cf.as_completed(futures), 1):
            r = fut.result()
            results.append(r)
            print(f"[{i}/{len(families)}] {r['family']}: {status_text(r)[:160]} ({r['wall_s']} s)", flush=True)
            if (i % 10 == 0 or i == len(families)) and not a.update:  # a partial table survives an interruption
                write_table(results, a.out, a.families)
    families_arg = a.families
    previous = os.path.splitext(a.out)[0] + ".json"
    if a.update and os.path.exists(previous):
        done = {r["family"] for r in results}
        results += [r for r in json.load(open(previous)) if r["family"] not in done]
        families_arg = None if len(results) == len(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) else families_arg
    counts = write_table(results, a.out, families_arg)
    print(f"\n{len(results)} families: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    crashes = sorted(r["family"] for r in results if r["status"] == "crash")
    if crashes:
        print("crashes: " + ", ".join(crashes))
    print(f"table: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
