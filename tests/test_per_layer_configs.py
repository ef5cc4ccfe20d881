"""Per-layer configs (Gemma 4) and multi-head latent attention (DeepSeek-V3) as HDP reads them at construction.

transformers keeps Gemma 4's ``head_dim`` and ``num_key_value_heads`` per layer (``config.per_layer_config``;
reading ``config.head_dim`` raises ``AmbiguousGlobalPerLayerAttributeError``), and DeepSeek-V3's ``head_dim`` is
only the rope part of its q/k heads. HDPTrainer must build for both, and the cost model must price each layer's
K/V with that layer's own heads (the P2P byte counts against real messages are in tests/test_mla_splits.py).
"""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import TrainingArguments

from hf_hdp import HDPConfig, HDPTrainer
from hf_hdp.planning.cost import CostModel, ModelSpec
from hf_hdp.planning.layers import attention_head_dims, kernel_head_dim, layer_attention_shapes
from hf_hdp.planning.reach import FULL, LayerMask
from tests.family_models import build_family_model, family_config


def test_layer_shapes_are_read_per_layer():
    gemma4 = family_config("gemma4_text")
    assert gemma4.is_heterogeneous  # reading config.head_dim would raise
    assert layer_attention_shapes(gemma4) == [(2, 16, 16), (1, 32, 32), (1, 32, 32)]
    deepseek = family_config("deepseek_v3")
    assert deepseek.head_dim == 8  # the rope part only: not the attention's head size
    assert layer_attention_shapes(deepseek) == [(4, 24, 16)] * 2
    assert attention_head_dims(deepseek) == (16, 24) and kernel_head_dim(deepseek) == 24
    assert layer_attention_shapes(family_config("llama")) == [(2, 16, 16)] * 2


def test_cost_model_prices_each_layer_with_its_own_heads():
    cost = CostModel.from_config(family_config("gemma4_text"), "cpu", bytes_per_value=8)
    assert cost.layer_heads == ((2, 16, 16), (1, 32, 32), (1, 32, 32))
    assert cost.layer_masks == (LayerMask(window=8), FULL, FULL)
    # a ring of 2 over one 40-token sample: per layer, K/V rows of the other member (20) out in forward and backward,
    # every row's dK/dV (float64 accumulators here) once; the sliding layer (window 8) sends only the rows it reaches
    per_member = cost.segment_bytes_by_member([40], 2)
    full_rows = 2 * 20 + 40
    sliding = CostModel(
        a=0,
        b=0,
        c=0,
        num_layers=1,
        kv_bytes_per_token=2 * 2 * 16 * 8,
        value_bytes=8,
        num_heads=4,
        num_kv_heads=2,
        layer_masks=(LayerMask(window=8),),
    ).segment_bytes_by_member([40], 2)
    assert per_member == [s + 2 * full_rows * 1 * 64 * 8 for s in sliding]
    mla = CostModel.from_config(family_config("deepseek_v3"), "cpu", bytes_per_value=2)
    assert mla.layer_heads == ((4, 24, 16),) * 2
    assert mla.ring_bytes(40, 2) == 2 * ((2 - 1) * 2 * 20 * 4 * 40 * 2 + 2 * 20 * 4 * 40 * 4)
    spec = ModelSpec.from_config(family_config("deepseek_v3"))
    assert (spec.head_dim, spec.v_head_dim, spec.kv_bytes_per_token) == (24, 16, 4 * 40 * 2)


@pytest.mark.parametrize("family", ["gemma4_text", "deepseek_v3"])
def test_trainer_builds_for_per_layer_and_mla_models(family, tmp_path):
    model = build_family_model(family)
    ds = datasets.Dataset.from_dict({"input_ids": [list(range(1, 31)), [3, 4, 5] * 7]})
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = HDPTrainer(
        model=model, args=args, train_dataset=ds, hdp_config=HDPConfig(tokens_per_rank=64, global_batch_size=2)
    )
    assert trainer.hdp_model_support.family == "verified"
    expected = tuple(layer_attention_shapes(model.config))
    assert trainer.cost_model.layer_heads == expected
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
