"""GPU check of one HDP step on one device: correctness of the fused kernels inside a real model,
and step throughput of padding-free HDP packing against the padded-batch SDPA baseline.

    python benchmarks/gpu_step.py            # needs CUDA; prints a table, exits non-zero on a mismatch

Part A (correctness): a small Llama-architecture model in bf16 runs one packed micro-batch through
the "hdp" attention with the fused ``torch_varlen`` (or ``flash_attn``) backend and with the
``reference`` backend, and one sample at a time through SDPA. Loss and gradients must agree to bf16
accuracy.

Part B (throughput): a ~1.1B-parameter Llama-architecture model in bf16 runs forward+backward on
the same long-tailed mix of samples, packed padding-free by HDP (one rank's micro-batch of C
tokens) and padded to the longest sample as a plain SDPA batch. Figures are tokens/s and an MFU
estimate (6 x params x tokens + causal attention FLOPs over the card's dense bf16 peak).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_hdp.attention.backends import backend_unavailable_reason
from hf_hdp.collators import HDPCollator, count_loss_tokens
from hf_hdp.distributed.mesh import DynamicMesh
from hf_hdp.engine import enable_hdp_attention, run_micro_batches
from hf_hdp.planning import plan_naive

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}


def _lengths(total: int, seed: int) -> list[int]:
    """A long-tailed mix (a few long, many short) adding up to ``total`` tokens."""
    torch.manual_seed(seed)
    lengths, left = [], total
    while left > 0:
        s = int(torch.distributions.LogNormal(7.5, 1.0).sample().item())
        s = max(16, min(s, left, total // 2))
        lengths.append(s)
        left -= s
    return lengths


def _samples(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return {i: {"input_ids": torch.randint(0, vocab, (n,), generator=g).tolist()} for i, n in enumerate(lengths)}


def _hdp_step(model, samples, lengths, C, backend):
    plan = plan_naive(lengths, 1, C)
    collator = HDPCollator(model.config.vocab_size)
    micro = [collator(mb, samples) for mb in plan.for_rank(0)]
    n = sum(count_loss_tokens(s["input_ids"], None) for s in samples.values())
    model.zero_grad(set_to_none=True)
    loss = run_micro_batches(model, micro, n, DynamicMesh(device=torch.device("cuda")), backend, torch.device("cuda"))
    return loss, {k: p.grad.float().clone() for k, p in model.named_parameters()}


def _sdpa_step(model, samples):
    model.set_attn_implementation("sdpa")
    n = sum(len(s["input_ids"]) - 1 for s in samples.values())
    model.zero_grad(set_to_none=True)
    total = 0.0
    for s in samples.values():
        ids = torch.tensor([s["input_ids"]], device="cuda")
        logits = model(input_ids=ids).logits[0, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum") / n
        loss.backward()
        total += float(loss.detach())
    enable_hdp_attention(model)
    return total, {k: p.grad.float().clone() for k, p in model.named_parameters()}


def _compare(name, a, b):
    worst = 0.0
    for k in b:
        rel = float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12))
        worst = max(worst, rel)
    return worst


def part_a(fused: str) -> bool:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16384,
    )
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    enable_hdp_attention(model)
    lengths = [3000, 1200, 700, 90, 17, 2048, 5]
    samples = _samples(lengths, cfg.vocab_size, 1)
    l_fused, g_fused = _hdp_step(model, samples, lengths, 4096, fused)
    l_ref, g_ref = _hdp_step(model, samples, lengths, 4096, "reference")
    l_sdpa, g_sdpa = _sdpa_step(model, samples)
    r1, r2 = _compare("ref", g_fused, g_ref), _compare("sdpa", g_fused, g_sdpa)
    print(f"A. correctness ({fused} vs reference vs per-sample SDPA, bf16, lengths {lengths}, C=4096)")
    print(f"   loss: {fused} {l_fused:.5f}  reference {l_ref:.5f}  sdpa {l_sdpa:.5f}")
    print(f"   worst relative grad error (norm): vs reference {r1:.2e}, vs sdpa {r2:.2e}")
    ok = abs(l_fused - l_sdpa) < 2e-2 * abs(l_sdpa) and r1 < 5e-2 and r2 < 5e-2
    print(f"   {'OK' if ok else 'MISMATCH'}")
    return ok


def _time(fn, reps):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def part_b(fused: str, C: int, reps: int) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=65536,
    )
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    model.gradient_checkpointing_enable()
    enable_hdp_attention(model)
    params = model.num_parameters()
    lengths = _lengths(C, seed=3)
    samples = _samples(lengths, cfg.vocab_size, 2)
    tokens = sum(lengths)
    attn_flops = sum(
        2 * 2 * s * s / 2 * cfg.hidden_size * cfg.num_hidden_layers * 3 for s in lengths
    )  # fwd+bwd, causal
    flops = 6 * params * tokens + attn_flops
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), 989e12)

    t_hdp = _time(lambda: _hdp_step(model, samples, lengths, C, fused), reps)

    model.set_attn_implementation("sdpa")
    longest = max(lengths)
    ids = torch.zeros(len(lengths), longest, dtype=torch.long, device="cuda")
    mask = torch.zeros(len(lengths), longest, dtype=torch.long, device="cuda")
    for i, s in samples.items():
        ids[i, : len(s["input_ids"])] = torch.tensor(s["input_ids"], device="cuda")
        mask[i, : len(s["input_ids"])] = 1
    labels = ids.masked_fill(mask == 0, -100)

    def padded():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()

    try:
        t_pad = _time(padded, reps)
    except torch.OutOfMemoryError:
        t_pad = float("nan")
    enable_hdp_attention(model)
    print(f"B. step throughput on {name}: Llama-arch {params / 1e9:.2f}B params, bf16, gradient checkpointing")
    print(
        f"   one micro-batch of {tokens} tokens = {len(lengths)} samples (longest {longest}, median "
        f"{sorted(lengths)[len(lengths) // 2]}), {reps} timed reps"
    )
    print(f"   {'path':<34}{'step s':>9}{'tokens/s':>12}{'MFU':>8}")
    for label, t in ((f"HDP packed varlen ({fused})", t_hdp), ("padded batch, SDPA (baseline)", t_pad)):
        print(f"   {label:<34}{t:>9.3f}{tokens / t:>12,.0f}{flops / t / peak:>8.1%}")
    print(
        f"   HDP / padded speedup: {t_pad / t_hdp:.2f}x  (padding wastes "
        f"{1 - tokens / (len(lengths) * longest):.0%} of the padded batch)"
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    fused = "flash_attn" if backend_unavailable_reason("flash_attn", torch.device("cuda")) is None else "torch_varlen"
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {torch.cuda.get_device_name()}")
    ok = part_a(fused)
    part_b(fused, a.tokens, a.reps)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
