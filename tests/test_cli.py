"""``hf-hdp plan``: run in-process through ``main(argv)``; small worlds so the whole file takes seconds."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import pytest

from hf_hdp.cli import main, parse_size
from hf_hdp.planning.compare import DoesNotFit, LengthPool, check_fits, draw_batches

REQUIRED = ("step_time_s", "speedup_vs_static", "imbalance", "idle_fraction", "p2p_bytes", "planning_time_s")


def run_cli(capsys, *argv):
    rc = main(["plan", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def write_lengths(tmp_path, text, name="lengths.txt"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------- --json


def test_json_structure_and_sanity(capsys):
    rc, out, err = run_cli(capsys, "--json", "--world-size", "32", "--global-batch-tokens", "512K", "--steps", "2")
    assert rc == 0, err
    data = json.loads(out)  # stdout holds the JSON and nothing else
    assert list(data) == ["static", "naive", "balanced", "inputs"]
    inputs = data.pop("inputs")
    assert inputs["world_size"] == 32 and inputs["tokens_per_rank"] == 8192 and inputs["steps"] == 2
    for name, d in data.items():
        for key in REQUIRED:
            assert isinstance(d[key], (int, float)) and math.isfinite(d[key]), (name, key, d[key])
        assert d["step_time_s"] > 0 and d["planning_time_s"] >= 0 and d["p2p_bytes"] >= 0
        assert d["imbalance"] >= 1.0 - 1e-9
        assert 0.0 <= d["idle_fraction"] < 1.0
        assert d["steps"] == 2 and d["tokens"] >= 512 * 1024
        assert sum(d["group_sizes"].values()) == 2 * d["samples"]
    assert data["static"]["speedup_vs_static"] == 1.0
    assert data["balanced"]["step_time_s"] <= data["naive"]["step_time_s"] * (1 + 1e-9)
    assert data["naive"]["speedup_vs_static"] == pytest.approx(
        data["static"]["step_time_s"] / data["naive"]["step_time_s"]
    )
    # the static mesh sizes CP by the longest sample: every sample sits on a CP group
    assert set(data["static"]["group_sizes"]) == {str(c) for c in data["static"]["cp_per_step"]}
    # HDP keeps short samples on one rank
    assert data["naive"]["group_sizes"]["1"] > 0 and data["balanced"]["group_sizes"]["1"] > 0


def test_stdlib_is_the_default_and_prints_a_table(capsys):
    rc, out, err = run_cli(capsys, "--world-size", "32", "--global-batch-samples", "200")
    assert rc == 0, err
    assert "Python standard library" in out
    for title in ("static mesh", "naive HDP", "balanced HDP", "speedup vs static", "P2P bytes", "planning time"):
        assert title in out
    assert "llama-7b on h100" in out
    # same as naming --stdlib explicitly
    rc2, out2, _ = run_cli(capsys, "--stdlib", "--world-size", "32", "--global-batch-samples", "200")
    strip = lambda text: [line for line in text.splitlines() if "planning time" not in line]
    assert rc2 == 0 and strip(out2) == strip(out)


def test_progress_bar_stays_off_stdout(capsys):
    rc, out, err = run_cli(capsys, "--json", "--progress", "--world-size", "32", "--global-batch-samples", "100")
    assert rc == 0
    json.loads(out)


# --------------------------------------------------------------------------- --lengths


def test_lengths_file(tmp_path, capsys):
    path = write_lengths(tmp_path, "100\n\n  2000 \n# a comment\n30000\n\n")
    rc, out, err = run_cli(
        capsys, "--lengths", path, "--world-size", "8", "--global-batch-samples", "7", "--json", "--seed", "3"
    )
    assert rc == 0, err
    data = json.loads(out)
    assert data["naive"]["samples"] == 7  # pool of 3, drawn with replacement
    assert data["static"]["cp"] == 4  # 30000 tokens need ceil(30000 / 8192) = 4 ranks
    assert set(data["naive"]["group_sizes"]) <= {"1", "4"}


def test_lengths_file_bad_line_names_it(tmp_path, capsys):
    path = write_lengths(tmp_path, "100\n\n12k\n300\n")
    rc, out, err = run_cli(capsys, "--lengths", path)
    assert rc == 2 and out == ""
    assert "line 3" in err and "'12k'" in err


def test_lengths_file_rejects_nonpositive_and_empty(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "--lengths", write_lengths(tmp_path, "5\n0\n"))
    assert rc == 2 and "line 2" in err and "at least 1" in err
    rc, _, err = run_cli(capsys, "--lengths", write_lengths(tmp_path, "\n\n", "empty.txt"))
    assert rc == 2 and "no lengths" in err
    rc, _, err = run_cli(capsys, "--lengths", str(tmp_path / "missing.txt"))
    assert rc == 2 and "cannot read" in err


def test_too_long_sample_names_it_and_suggests_capacity(tmp_path, capsys):
    path = write_lengths(tmp_path, "100\n100000\n50\n")
    rc, out, err = run_cli(capsys, "--lengths", path, "--world-size", "4", "--tokens-per-rank", "8K")
    assert rc == 2 and out == ""
    assert "line 2" in err and "100,000" in err
    assert "--tokens-per-rank 25600" in err  # ceil(100000 / 4) = 25000, rounded up to 1K
    assert "--world-size 13" in err  # ceil(100000 / 8192)


# --------------------------------------------------------------------------- --dataset and --model


def test_dataset_column_of_lengths_and_of_token_ids(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in (300, 5000, 20000)], "length": [300, 5000, 20000]})
    ds.save_to_disk(str(tmp_path / "ds"))
    results = []
    for column in ("length", "input_ids"):
        rc, out, err = run_cli(
            capsys,
            "--dataset",
            str(tmp_path / "ds"),
            "--column",
            column,
            "--world-size",
            "4",
            "--global-batch-samples",
            "6",
            "--json",
        )
        assert rc == 0, err
        results.append(json.loads(out))
    strip = lambda d: {k: {f: v for f, v in x.items() if f != "planning_time_s"} for k, x in d.items() if k != "inputs"}
    assert strip(results[0]) == strip(results[1])
    assert "[length]" in results[0]["inputs"]["lengths"] and "[input_ids]" in results[1]["inputs"]["lengths"]
    rc, _, err = run_cli(capsys, "--dataset", str(tmp_path / "ds"), "--column", "labels")
    assert rc == 2 and "no column 'labels'" in err and "input_ids" in err


def test_model_from_a_config_folder(tmp_path, capsys):
    cfg = {
        "model_type": "llama",
        "hidden_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 512,
        "vocab_size": 1000,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    path = write_lengths(tmp_path, "1000\n20000\n")
    rc, out, err = run_cli(capsys, "--model", str(tmp_path), "--lengths", path, "--world-size", "4")
    assert rc == 0, err
    small = out
    rc, out, err = run_cli(capsys, "--lengths", path, "--world-size", "4")
    assert rc == 0
    step = lambda text: next(line for line in text.splitlines() if line.startswith("step time"))
    assert step(small) != step(out)  # a 2-layer toy is not LLaMA-7B


def test_unknown_presets_list_the_valid_ones(capsys):
    rc, out, err = run_cli(capsys, "--model", "llama-8b")
    assert rc == 2 and out == ""
    for preset in ("llama-7b", "llama-13b", "llama-30b", "llama-70b"):
        assert preset in err
    rc, _, err = run_cli(capsys, "--hardware", "a100")
    assert rc == 2 and "h100" in err and "cpu" in err


def test_check_fits_names_the_sample_and_what_would_hold_it():
    pool = LengthPool([100, 100_000, 7], "test", names=lambda i: f"row {i}")
    check_fits(pool, 13, 8192)
    with pytest.raises(DoesNotFit) as info:
        check_fits(pool, 4, 8192)
    e = info.value
    assert (e.min_tokens_per_rank, e.suggested_tokens_per_rank, e.min_world_size) == (25_000, 25_600, 13)
    assert str(e).startswith("row 1 has 100,000 tokens") and "use tokens_per_rank 25600 or more" in str(e)


def test_bytescale_hardware_matches_the_fitted_cost_model(tmp_path, capsys):
    from hf_hdp.cli import load_hardware
    from hf_hdp.planning.cost import MODEL_PRESETS, CostModel

    derived = CostModel.from_specs(MODEL_PRESETS["llama-7b"], load_hardware("bytescale"))
    fitted = CostModel.bytescale()
    assert derived.a == pytest.approx(fitted.a) and derived.b == pytest.approx(fitted.b)
    assert derived.c == pytest.approx(fitted.c)
    rc, out, err = run_cli(
        capsys,
        "--hardware",
        "bytescale",
        "--lengths",
        write_lengths(tmp_path, "100\n20000\n"),
        "--world-size",
        "4",
        "--json",
    )
    assert rc == 0, err
    assert json.loads(out)["static"]["speedup_vs_static"] == 1.0


def test_usage_errors_return_2(capsys):
    assert main(["plan", "--global-batch-samples", "10", "--global-batch-tokens", "10"]) == 2
    assert main(["plan", "--column", "input_ids"]) == 2
    assert main(["plan", "--tokens-per-rank", "lots"]) == 2
    assert main([]) == 2
    capsys.readouterr()


# --------------------------------------------------------------------------- --plot


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "timelines.png"
    rc, out, err = run_cli(capsys, "--world-size", "80", "--global-batch-samples", "300", "--plot", str(png))
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "only ranks 0-63 of 80" in out  # truncation is said


def test_plot_without_matplotlib_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    path = write_lengths(tmp_path, "100\n200\n")
    rc, out, err = run_cli(capsys, "--lengths", path, "--world-size", "2", "--plot", str(tmp_path / "x.png"))
    assert rc == 2 and "pip install matplotlib" in err


# --------------------------------------------------------------------------- helpers


def test_draw_batches_meets_the_token_budget_deterministically():
    pool = [10, 20, 30, 40, 50]
    a = draw_batches(pool, steps=3, seed=1, tokens=400)
    assert a == draw_batches(pool, steps=3, seed=1, tokens=400)
    for batch in a:
        assert sum(batch) >= 400 and sum(batch) - batch[-1] < 400  # stops as soon as the budget is met
    # without replacement while the pool lasts
    b = draw_batches(pool, steps=1, seed=0, tokens=150)[0]
    assert len(set(b)) == len(b)
    assert sorted(draw_batches(pool, steps=1, seed=0, samples=5)[0]) == pool
    assert len(draw_batches(pool, steps=1, seed=0, samples=12)[0]) == 12


def test_parse_size():
    assert parse_size("8192") == 8192
    assert parse_size("8K") == 8192
    assert parse_size("32M") == 32 * 2**20
    assert parse_size("1.5k") == 1536
    with pytest.raises(argparse.ArgumentTypeError, match="positive integer"):
        parse_size("0")


def test_python_dash_m(tmp_path):
    path = write_lengths(tmp_path, "100\n5000\n9000\n")
    proc = subprocess.run(
        [sys.executable, "-m", "hf_hdp", "plan", "--lengths", path, "--world-size", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert list(json.loads(proc.stdout)) == ["static", "naive", "balanced", "inputs"]


def _hybrid_config(tmp_path, layer_types, name):
    cfg = {
        "model_type": "qwen3_5_text",
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "intermediate_size": 512,
        "vocab_size": 1000,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 32,
        "linear_num_value_heads": 8,
        "linear_value_head_dim": 32,
        "linear_conv_kernel_dim": 4,
        "layer_types": layer_types,
    }
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


def test_model_config_prices_each_layer_type(tmp_path, capsys):
    """A Qwen3.5 config's Gated DeltaNet layers are listed and priced beside its attention layers; the same shapes with
    attention everywhere plan a slower step; the split method of the linear layers is an option."""
    hybrid = _hybrid_config(tmp_path, ["linear_attention"] * 3 + ["full_attention"], "hybrid.json")
    dense = _hybrid_config(tmp_path, ["full_attention"] * 4, "dense.json")
    args = [
        "--lengths",
        write_lengths(tmp_path, "1000\n30000\n2000\n12000\n60000\n"),
        "--world-size",
        "8",
        "--tokens-per-rank",
        "8192",
    ]
    rc, out, err = run_cli(capsys, "--model-config", hybrid, *args)
    assert rc == 0, err
    assert "layers: 3 Gated DeltaNet (2x32 key, 8x32 value heads, kernel 4), 1 full" in out
    assert "one layer, forward + backward, a 8,192-token sample alone on a rank:" in out
    gdn = next(line for line in out.splitlines() if line.strip().startswith("3 x Gated DeltaNet"))
    full = next(line for line in out.splitlines() if line.strip().startswith("1 x full"))
    assert "convolution and recurrence" in gdn and "attention" not in gdn.split(":", 1)[1] and "attention" in full
    rc, out_dense, err = run_cli(capsys, "--model-config", dense, *args)
    assert rc == 0, err
    assert "Gated DeltaNet" not in out_dense and "layers:" not in out_dense

    def step(path, *extra):
        rc, out, err = run_cli(capsys, "--model-config", path, *args, *extra, "--json")
        assert rc == 0, err
        return json.loads(out)

    h, d = step(hybrid), step(dense)
    assert "layers" not in d
    types = {t["layer"]: t for t in h["layers"]["types"]}
    assert types["full"]["layers"] == 1 and types["full"]["quadratic"] > 0
    linear = types["Gated DeltaNet (2x32 key, 8x32 value heads, kernel 4)"]
    assert linear["layers"] == 3 and linear["quadratic"] == 0 and linear["state"] > 0
    assert h["layers"]["reference_tokens"] == 8192 and h["layers"]["state_split"] == "auto"
    for planner in ("static", "balanced"):
        assert h[planner]["step_time_s"] < d[planner]["step_time_s"]
    # the split method of the linear layers moves different bytes (static: groups of 8, which divide 8 value heads)
    heads, scan = step(hybrid, "--state-split", "heads"), step(hybrid, "--state-split", "scan")
    assert heads["layers"]["state_split"] == "heads"
    assert heads["static"]["p2p_bytes"] != scan["static"]["p2p_bytes"]


def test_model_config_prints_mamba2_hybrid_and_short_convolution_layers(tmp_path, capsys):
    """Nemotron-H (Mamba-2, attention and MLP-only layers), Falcon-H1 (every layer attention beside a Mamba-2 mixer) and
    LFM2 (short convolutions) configs: each layer type gets its own ``layers:`` line, priced as what it is."""
    from transformers import AutoConfig

    args = [
        "--lengths",
        write_lengths(tmp_path, "1000\n30000\n2000\n12000\n60000\n"),
        "--world-size",
        "8",
        "--tokens-per-rank",
        "8192",
    ]
    configs = {
        "nemotron_h": dict(
            hidden_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            intermediate_size=512,
            vocab_size=1000,
            mamba_num_heads=8,
            mamba_head_dim=32,
            ssm_state_size=16,
            n_groups=2,
            layer_types=["mamba", "mlp", "mamba", "attention"],
        ),
        "falcon_h1": dict(
            hidden_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            intermediate_size=512,
            vocab_size=1000,
            num_hidden_layers=2,
            mamba_n_heads=8,
            mamba_d_head=32,
            mamba_d_state=16,
            mamba_n_groups=2,
            mamba_d_ssm=256,
        ),
        "lfm2": dict(
            hidden_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=512,
            vocab_size=1000,
            num_hidden_layers=4,
            conv_L_cache=3,
            layer_types=["conv", "conv", "full_attention", "conv"],
        ),
    }
    out = {}
    for family, kw in configs.items():
        path = tmp_path / family
        AutoConfig.for_model(family, **kw).save_pretrained(str(path))
        rc, out[family], err = run_cli(capsys, "--model-config", str(path), *args)
        assert rc == 0, err
    lines = lambda text: [line.strip() for line in text.splitlines()]
    nem = lines(out["nemotron_h"])
    assert (
        "layers: 2 Mamba-2 (2 groups x 16 state, 8x32 heads, kernel 4), 1 MLP only, 1 full (Mamba-2 layers priced "
        "as such, split samples' Mamba-2 layers by 'auto')" in nem
    )
    mamba = next(line for line in nem if line.startswith("2 x Mamba-2"))
    mlp = next(line for line in nem if line.startswith("1 x MLP only"))
    assert "convolution and recurrence" in mamba and "attention" not in mamba.split(":", 1)[1]
    assert "attention" not in mlp.split(":", 1)[1] and "recurrence" not in mlp
    falcon = next(line for line in lines(out["falcon_h1"]) if line.startswith("2 x hybrid (full attention + Mamba-2"))
    assert "attention" in falcon.split(":", 1)[1] and "convolution and recurrence" in falcon
    lfm = lines(out["lfm2"])
    assert (
        "layers: 3 short convolution (256 channels, kernel 3), 1 full (short convolution layers priced as such)" in lfm
    )
    conv = next(line for line in lfm if line.startswith("3 x short convolution"))
    assert "convolution" in conv and "recurrence" not in conv and "attention" not in conv.split(":", 1)[1]


def test_json_holds_its_inputs(capsys, tmp_path):
    """--json says what it planned from: world, C, the model (as given and its shape), hardware, planner and splits."""
    cfg = {
        "model_type": "llama",
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "intermediate_size": 512,
        "vocab_size": 1000,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    path = write_lengths(tmp_path, "\n".join(str(n) for n in [100, 900, 3000, 200] * 4))
    rc, out, err = run_cli(
        capsys,
        "--lengths",
        path,
        "--model-config",
        str(tmp_path / "config.json"),
        "--hardware",
        "h200",
        "--world-size",
        "4",
        "--tokens-per-rank",
        "1K",
        "--delta",
        "0.1",
        "--attention-split",
        "ring",
        "--state-split",
        "scan",
        "--ranks-per-node",
        "2",
        "--global-batch-samples",
        "12",
        "--seed",
        "5",
        "--json",
    )
    assert rc == 0, err
    inputs = json.loads(out)["inputs"]
    assert inputs["world_size"] == 4 and inputs["tokens_per_rank"] == 1024
    assert inputs["tokens_per_rank_from"] == "--tokens-per-rank"
    model = inputs["model"]
    assert model["flag"] == "--model-config" and model["value"] == str(tmp_path / "config.json")
    assert (model["hidden_size"], model["num_layers"], model["num_heads"], model["num_kv_heads"]) == (256, 4, 8, 4)
    assert inputs["hardware"]["name"] == "h200" and inputs["hardware"]["ranks_per_node"] == 2
    assert inputs["planners"] == ["static", "naive", "balanced"] and inputs["delta"] == 0.1
    assert (inputs["attention_split"], inputs["state_split"]) == ("ring", "scan")
    assert inputs["global_batch_samples"] == 12 and inputs["global_batch_tokens"] is None and inputs["seed"] == 5
    assert path in inputs["lengths"]
    # a preset by default, and C from the default
    rc, out, err = run_cli(capsys, "--lengths", path, "--world-size", "4", "--json")
    inputs = json.loads(out)["inputs"]
    assert inputs["model"]["value"] == "llama-7b" and inputs["model"]["flag"] == "--model"
    assert inputs["tokens_per_rank"] == 8192 and inputs["tokens_per_rank_from"] == "default"
