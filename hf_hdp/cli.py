"""The ``hf-hdp`` command line: see what HDP gains on your data before spending GPU hours.

``hf-hdp plan`` draws global batches from a length distribution, plans each one three ways (the
static DP x CP mesh that today's tools use, naive HDP, balanced HDP), and prints the estimated step
time, speedup over the static mesh, imbalance, idle fraction, P2P traffic, group sizes and planning
time side by side::

    hf-hdp plan                                     # the standard-library corpus, LLaMA-7B on H100
    hf-hdp plan --lengths lengths.txt --world-size 256 --global-batch-tokens 8M
    hf-hdp plan --dataset ./my_ds --column input_ids --model ./my_model --json
    hf-hdp plan --plot timelines.png

Everything here runs on the CPU with the pure-Python planners and the analytic cost model
(:mod:`hf_hdp.planning.cost`); no GPU and no torch.distributed are involved. ``python -m hf_hdp``
is the same command.

:func:`compare_planners` (plan and measure batches with the three planners) and
:func:`draw_batches` are reused by ``benchmarks/paper_check.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

PLANNER_ORDER = ("static", "naive", "balanced")
PLANNER_TITLES = {"static": "static mesh", "naive": "naive HDP", "balanced": "balanced HDP"}
MAX_PLOT_RANKS = 64


class CLIError(Exception):
    """A user error: printed as ``hf-hdp: error: ...`` with exit status 2, no traceback."""


# --------------------------------------------------------------------------- lengths


@dataclass
class LengthPool:
    """Sample lengths to draw global batches from, and how to name one sample in messages."""

    lengths: list[int]
    source: str
    names: Callable[[int], str] = field(default=lambda i: f"sample {i}")


def parse_size(text: str) -> int:
    """``"32M"`` -> 33554432, ``"8K"`` -> 8192, ``"1000"`` -> 1000 (binary suffixes K, M, G)."""
    t = text.strip().upper().replace("_", "").replace(",", "")
    mult = 1
    if t and t[-1] in "KMG":
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[t[-1]]
        t = t[:-1]
    try:
        value = float(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer such as 8192, 8K or 32M, got {text!r}") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a positive integer such as 8192, 8K or 32M, got {text!r}")
    return int(value)


def read_lengths_file(path: str) -> LengthPool:
    """One positive integer per line; blank lines and lines starting with ``#`` are skipped.
    ``-`` reads standard input."""
    if path == "-":
        lines, label = sys.stdin.read().splitlines(), "<stdin>"
    else:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise CLIError(f"cannot read --lengths file {path!r}: {e.strerror or e}") from None
        label = path
    lengths: list[int] = []
    line_of: list[int] = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            value = int(text)
        except ValueError:
            raise CLIError(
                f"{label}, line {number}: expected one integer (a sample's token count) per line, got {text!r}"
            ) from None
        if value < 1:
            raise CLIError(f"{label}, line {number}: a sample length must be at least 1 token, got {value}")
        lengths.append(value)
        line_of.append(number)
    if not lengths:
        raise CLIError(f"{label} holds no lengths: write one integer per line")
    return LengthPool(lengths, f"{label} ({len(lengths):,} lengths)", lambda i: f"line {line_of[i]} of {label}")


def dataset_lengths(name: str, column: str, split: str) -> LengthPool:
    """A column of a HF dataset: integer lengths, or sequences (``input_ids``) whose lengths are taken.

    ``name`` is a folder written by ``save_to_disk``, a data file (``.json``, ``.jsonl``, ``.csv``,
    ``.parquet``), or a name for ``datasets.load_dataset``.
    """
    try:
        import datasets
    except ImportError:  # pragma: no cover - a dependency of hf_hdp
        raise CLIError("--dataset needs the `datasets` package: pip install datasets") from None
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        if os.path.isdir(name) and (
            os.path.exists(os.path.join(name, "dataset_info.json")) or os.path.exists(os.path.join(name, "dataset_dict.json"))
        ):
            ds = datasets.load_from_disk(name)
        elif os.path.isfile(name):
            ext = os.path.splitext(name)[1].lstrip(".").lower()
            builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(ext)
            if builder is None:
                raise CLIError(f"--dataset {name!r}: unknown file type .{ext}; use .json/.jsonl/.csv/.parquet or a folder")
            ds = datasets.load_dataset(builder, data_files=name, split="train")
        else:
            ds = datasets.load_dataset(name, split=split)
    except CLIError:
        raise
    except Exception as e:  # datasets raises many types; the message is what matters
        raise CLIError(f"cannot load --dataset {name!r}: {type(e).__name__}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise CLIError(f"--dataset {name!r} has no split {split!r}; its splits: {', '.join(ds)} (use --split)")
        ds = ds[split]
    if column not in ds.column_names:
        raise CLIError(
            f"--dataset {name!r} has no column {column!r}; its columns: {', '.join(ds.column_names)} "
            f"(use --column; a column of token ids such as input_ids works too)"
        )
    col = ds.select_columns([column]).with_format("arrow")[:].column(column)
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
        values = pc.list_value_length(col).to_pylist()
    elif pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        values = col.to_pylist()
    else:
        raise CLIError(f"column {column!r} of {name!r} has type {col.type}: expected integer lengths or lists of token ids")
    rows = [i for i, v in enumerate(values) if v is not None and v >= 1]
    if not rows:
        raise CLIError(f"column {column!r} of {name!r} has no positive lengths")
    dropped = len(values) - len(rows)
    lengths = [int(values[i]) for i in rows]
    source = f"dataset {name!r} [{column}] ({len(lengths):,} samples" + (f", {dropped:,} empty skipped)" if dropped else ")")
    return LengthPool(lengths, source, lambda i: f"row {rows[i]} of {name!r}")


def stdlib_pool() -> LengthPool:
    """The built-in corpus: approximate token lengths of the Python standard library's files."""
    from hf_hdp.corpus import stdlib_dir, stdlib_files, stdlib_lengths

    lengths = stdlib_lengths()

    def names(i: int) -> str:
        files = [p for p in stdlib_files() if os.path.getsize(p)]
        if len(files) == len(lengths):
            return f"standard-library file {os.path.relpath(files[i], stdlib_dir())}"
        return f"standard-library sample {i}"

    return LengthPool(lengths, f"the Python standard library ({len(lengths):,} files)", names)


# --------------------------------------------------------------------------- model and hardware


def load_model_spec(name: str):
    """A preset name (``llama-7b`` ...), or a transformers config: a folder, a ``config.json``, or a Hub id."""
    from hf_hdp.planning.cost import MODEL_PRESETS, ModelSpec

    if name in MODEL_PRESETS:
        return MODEL_PRESETS[name]
    presets = ", ".join(MODEL_PRESETS)
    if not os.path.exists(name) and ("/" not in name or name.startswith((".", "/"))):
        raise CLIError(
            f"unknown --model {name!r}: use a preset ({presets}), a folder with a transformers config.json, "
            f"or a Hub id as owner/name"
        )
    try:
        from transformers import AutoConfig

        if os.path.isfile(name):
            with open(name, encoding="utf-8") as f:
                raw = json.load(f)
            model_type = raw.pop("model_type", None)
            if model_type is None:
                raise ValueError("config.json has no model_type")
            config = AutoConfig.for_model(model_type, **raw)
        else:
            config = AutoConfig.from_pretrained(name)
    except Exception as e:
        raise CLIError(
            f"cannot load --model {name!r} as a transformers config ({type(e).__name__}: {e}); "
            f"presets: {presets}"
        ) from None
    config = getattr(config, "text_config", None) or config  # multimodal configs keep the decoder here
    missing = [
        a
        for a in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        if getattr(config, a, None) is None
    ]
    if missing:
        raise CLIError(f"--model {name!r}: its config lacks {', '.join(missing)}; use a decoder config or a preset ({presets})")
    if os.path.exists(name):
        folder = os.path.dirname(os.path.abspath(name)) if os.path.isfile(name) else os.path.abspath(name)
        label = os.path.basename(folder) or name
    else:
        label = name
    return ModelSpec.from_config(config, name=label)


def hardware_presets() -> dict:
    """:data:`~hf_hdp.planning.cost.HARDWARE_PRESETS`, plus ``bytescale`` when the module has none:
    H100 links with the compute rates fitted to ByteScale's published LLaMA-7B per-layer times
    (:meth:`~hf_hdp.planning.cost.CostModel.bytescale`), usable with any model."""
    from hf_hdp.planning import cost as cost_mod

    presets = dict(cost_mod.HARDWARE_PRESETS)
    if "bytescale" not in presets and hasattr(cost_mod.CostModel, "bytescale"):
        fitted = cost_mod.CostModel.bytescale()
        presets["bytescale"] = cost_mod.hardware_from_coefficients(
            cost_mod.MODEL_PRESETS["llama-7b"], fitted.a, fitted.b, fitted.c, presets["h100"], name="bytescale"
        )
    return presets


def load_hardware(name: str):
    presets = hardware_presets()
    try:
        return presets[name]
    except KeyError:
        raise CLIError(f"unknown --hardware {name!r}; valid presets: {', '.join(presets)}") from None


# --------------------------------------------------------------------------- batches


def draw_batches(
    lengths: Sequence[int],
    steps: int,
    seed: int,
    samples: int | None = None,
    tokens: int | None = None,
) -> list[list[int]]:
    """``steps`` global batches of sample lengths drawn from ``lengths`` with ``random.Random(seed)``.

    With ``samples``: that many samples per batch, without replacement when the pool is large
    enough, with replacement otherwise. With ``tokens``: samples in a random order (the pool
    reshuffled each time it runs out, i.e. with replacement only when the pool is smaller than the
    budget) until the batch holds at least ``tokens`` tokens.
    """
    if (samples is None) == (tokens is None):
        raise ValueError("give exactly one of samples and tokens")
    rng = random.Random(seed)
    pool = list(lengths)
    batches = []
    for _ in range(steps):
        if samples is not None:
            if samples <= len(pool):
                batch = rng.sample(pool, samples)
            else:
                batch = [rng.choice(pool) for _ in range(samples)]
        else:
            batch, total = [], 0
            while total < tokens:
                order = list(range(len(pool)))
                rng.shuffle(order)
                for i in order:
                    batch.append(pool[i])
                    total += pool[i]
                    if total >= tokens:
                        break
        batches.append(batch)
    return batches


def check_fits(pool: LengthPool, world_size: int, tokens_per_rank: int) -> None:
    """Refuse, with a suggestion, any sample that cannot be placed even on all ranks."""
    limit = world_size * tokens_per_rank
    longest = max(range(len(pool.lengths)), key=lambda i: pool.lengths[i])
    s = pool.lengths[longest]
    if s <= limit:
        return
    need_c = -(-s // world_size)
    suggest_c = -(-need_c // 1024) * 1024
    need_w = -(-s // tokens_per_rank)
    raise CLIError(
        f"{pool.names(longest)} has {s:,} tokens, more than --world-size x --tokens-per-rank = "
        f"{world_size:,} x {tokens_per_rank:,} = {limit:,}: use --tokens-per-rank {suggest_c} or more "
        f"(at least {need_c:,}), or --world-size {need_w} or more"
    )


# --------------------------------------------------------------------------- comparison


@dataclass
class PlannerRuns:
    """One planner's plans, metrics and planning seconds, one entry per global batch."""

    name: str
    plans: list = field(default_factory=list)
    metrics: list = field(default_factory=list)
    seconds: list = field(default_factory=list)


def run_planner(name: str, lengths: Sequence[int], world_size: int, tokens_per_rank: int, cost, delta: float):
    from hf_hdp.planning import plan_naive, plan_static
    from hf_hdp.planning.balanced import plan_balanced

    if name == "static":
        return plan_static(lengths, world_size, tokens_per_rank)
    if name == "naive":
        return plan_naive(lengths, world_size, tokens_per_rank)
    if name == "balanced":
        return plan_balanced(lengths, world_size, tokens_per_rank, cost=cost, delta=delta)
    raise ValueError(f"unknown planner {name!r}")


def compare_planners(
    batches: Sequence[Sequence[int]],
    world_size: int,
    tokens_per_rank: int,
    cost,
    delta: float = 0.05,
    progress: bool = False,
    planners: Sequence[str] = PLANNER_ORDER,
) -> dict[str, PlannerRuns]:
    """Plan every batch with every planner and measure each plan with ``cost``."""
    from hf_hdp.planning.metrics import plan_metrics

    runs = {name: PlannerRuns(name) for name in planners}
    bar = _progress_bar(len(batches) * len(planners), progress)
    try:
        for lengths in batches:
            for name in planners:
                bar.set_description(PLANNER_TITLES.get(name, name), refresh=False)
                t0 = time.perf_counter()
                plan = run_planner(name, lengths, world_size, tokens_per_rank, cost, delta)
                runs[name].seconds.append(time.perf_counter() - t0)
                runs[name].plans.append(plan)
                runs[name].metrics.append(plan_metrics(plan, cost))
                bar.update(1)
    finally:
        bar.close()
    return runs


def _progress_bar(total: int, show: bool):
    """A tqdm bar on stderr when ``show``; otherwise a silent stand-in."""
    if show:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, file=sys.stderr, unit="plan", leave=False, dynamic_ncols=True)
        except ImportError:  # pragma: no cover - tqdm comes with transformers
            pass

    class _Silent:
        def update(self, n=1):
            pass

        def set_description(self, *a, **k):
            pass

        def close(self):
            pass

    return _Silent()


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def summarize(runs: dict[str, PlannerRuns]) -> dict[str, dict]:
    """Per planner, the figures averaged over the batches; the JSON that ``--json`` prints.

    ``speedup_vs_static`` is total static step time over total step time (the batches are the same,
    so it is the throughput ratio); other figures are means per step, group sizes are counts summed
    over all steps.
    """
    base = sum(m.step_time_s for m in runs["static"].metrics) if "static" in runs else None
    out = {}
    for name, r in runs.items():
        ms = r.metrics
        total = sum(m.step_time_s for m in ms)
        groups: dict[int, int] = {}
        for m in ms:
            for k, n in dict(m.group_sizes).items():
                groups[int(k)] = groups.get(int(k), 0) + int(n)
        mbs = [n for m in ms for n in m.micro_batches_per_rank]
        tokens = _mean(m.tokens for m in ms)
        d = {
            "step_time_s": _mean(m.step_time_s for m in ms),
            "speedup_vs_static": (base / total) if base is not None and total > 0 else None,
            "imbalance": _mean(m.imbalance for m in ms),
            "idle_fraction": _mean(m.idle_fraction for m in ms),
            "rank_spread": _mean(m.busy_spread for m in ms),
            "p2p_bytes": _mean(m.p2p_bytes for m in ms),
            "p2p_messages": _mean(m.p2p_messages for m in ms),
            "p2p_time_fraction": _mean(m.p2p_time_fraction for m in ms),
            "allreduce_s": _mean(m.allreduce_s for m in ms),
            "num_slots": _mean(m.num_slots for m in ms),
            "micro_batches_per_rank": {"min": min(mbs), "mean": _mean(mbs), "max": max(mbs)},
            "group_sizes": {str(k): groups[k] for k in sorted(groups)},
            "planning_time_s": _mean(r.seconds),
            "tokens": tokens,
            "samples": _mean(len(p.lengths) for p in r.plans),
            "tokens_per_s": tokens / _mean(m.step_time_s for m in ms) if total > 0 else None,
            "steps": len(ms),
        }
        if name == "static" and r.plans:
            # the static planner sizes CP by each batch's longest sample, so it may differ per step
            cps = [p.meta.get("cp") for p in r.plans]
            d["cp"] = max(c for c in cps if c is not None) if any(c is not None for c in cps) else None
            d["dp"] = r.plans[0].world_size // d["cp"] if d["cp"] else None
            d["cp_per_step"] = cps
        out[name] = d
    return out


# --------------------------------------------------------------------------- text output


def fmt_seconds(s: float) -> str:
    if s >= 60:
        m, sec = divmod(s, 60)
        return f"{s:,.1f} s ({int(m)}m{sec:02.0f}s)"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def fmt_bytes(n: float) -> str:
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_groups(groups: dict[str, int], limit: int = 5) -> str:
    """``{"1": 900, "2": 12, ...}`` -> ``"k=1 x900, k=2 x12, ..."``, longest-k last, truncated."""
    items = [f"k={k}:{n}" for k, n in groups.items()]
    if len(items) > limit:
        ks = [int(k) for k in groups]
        return f"{', '.join(items[: limit - 1])}, ... ({len(items)} sizes, k<={max(ks)})"
    return ", ".join(items)


def _mesh(d: dict) -> str:
    cps = [c for c in d.get("cp_per_step", []) if c is not None]
    if cps and min(cps) != max(cps):
        return f"CP {min(cps)}-{max(cps)} (per batch)"
    return f"DP={d['dp']} x CP={d['cp']}"


def render_table(summary: dict[str, dict], header: str) -> str:
    rows: list[tuple[str, Callable[[str, dict], str]]] = [
        ("mesh", lambda n, d: _mesh(d) if n == "static" else "one pool, any k"),
        ("step time", lambda n, d: fmt_seconds(d["step_time_s"])),
        ("speedup vs static", lambda n, d: "-" if d["speedup_vs_static"] is None else f"{d['speedup_vs_static']:.2f}x"),
        ("tokens/s", lambda n, d: "-" if not d["tokens_per_s"] else f"{d['tokens_per_s']:,.0f}"),
        ("imbalance (max/mean)", lambda n, d: f"{d['imbalance']:.3f}"),
        ("rank spread (max/min)", lambda n, d: f"{d['rank_spread']:.2f}x"),
        ("idle fraction", lambda n, d: f"{d['idle_fraction']:.1%}"),
        ("exposed P2P / busy", lambda n, d: f"{d['p2p_time_fraction']:.1%}"),
        ("P2P bytes / step", lambda n, d: fmt_bytes(d["p2p_bytes"])),
        ("P2P messages / step", lambda n, d: f"{d['p2p_messages']:,.0f}"),
        ("slots", lambda n, d: f"{d['num_slots']:.1f}" if d["steps"] > 1 else f"{d['num_slots']:.0f}"),
        (
            "micro-batches / rank",
            lambda n, d: f"{d['micro_batches_per_rank']['min']}-{d['micro_batches_per_rank']['max']}"
            f" (mean {d['micro_batches_per_rank']['mean']:.1f})",
        ),
        ("group sizes", lambda n, d: fmt_groups(d["group_sizes"], limit=3)),
        ("planning time", lambda n, d: fmt_seconds(d["planning_time_s"])),
    ]
    names = [n for n in PLANNER_ORDER if n in summary]
    table = [[""] + [PLANNER_TITLES[n] for n in names]]
    for label, f in rows:
        table.append([label] + [f(n, summary[n]) for n in names])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = [header, ""]
    for j, r in enumerate(table):
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot

# interval kinds of hf_hdp.planning.metrics.plan_timeline; "wait" is left blank
KIND_COLORS = {
    "local": ("#4C72B0", "whole sequences (no communication)"),
    "distributed": ("#55A868", "ring piece: compute"),
    "p2p": ("#DD8452", "ring piece: exposed P2P"),
    "allreduce": ("#8172B3", "gradient all-reduce"),
}


def plot_timelines(runs: dict[str, PlannerRuns], cost, path: str, max_ranks: int = MAX_PLOT_RANKS) -> str | None:
    """Draw the first batch's per-rank timelines, one planner above the other, into ``path`` (PNG).

    Only the first ``max_ranks`` ranks are drawn; returns a note saying so when ranks were left out.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise CLIError(
            "--plot needs matplotlib, which is not installed: pip install matplotlib "
            "(or pip install 'hf-hdp[plot]')"
        ) from None
    from hf_hdp.planning.metrics import plan_timeline

    names = [n for n in PLANNER_ORDER if n in runs]
    world = runs[names[0]].plans[0].world_size
    shown = min(world, max_ranks)
    horizon = max(runs[n].metrics[0].step_time_s for n in names) or 1.0
    fig, axes = plt.subplots(
        len(names), 1, figsize=(12, 1.5 + len(names) * (0.9 + 0.045 * shown)), sharex=True, squeeze=False
    )
    for ax, name in zip(axes[:, 0], names):
        plan, metrics = runs[name].plans[0], runs[name].metrics[0]
        bars: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for iv in plan_timeline(plan, cost):
            if iv.rank < shown and iv.kind in KIND_COLORS:
                bars.setdefault((iv.kind, iv.rank), []).append((iv.start, iv.end - iv.start))
        for (kind, rank), spans in bars.items():
            ax.broken_barh(spans, (rank - 0.42, 0.84), facecolors=KIND_COLORS[kind][0], edgecolor="none")
        speed = ""
        if name != "static" and "static" in runs:
            speed = f", {runs['static'].metrics[0].step_time_s / metrics.step_time_s:.2f}x vs static"
        mesh = f" (DP={plan.meta.get('dp')} x CP={plan.meta.get('cp')})" if name == "static" else ""
        ax.set_title(
            f"{PLANNER_TITLES[name]}{mesh}: step {fmt_seconds(metrics.step_time_s)}{speed}, "
            f"imbalance {metrics.imbalance:.2f}, idle {metrics.idle_fraction:.0%}",
            fontsize=10,
            loc="left",
        )
        ax.axvline(metrics.step_time_s, color="black", lw=0.8, ls="--")
        ax.set_ylim(shown - 0.5, -0.5)
        ax.set_ylabel("rank")
        ax.set_xlim(0, horizon * 1.02)
    axes[-1, 0].set_xlabel("estimated time in the step (s); blank = waiting")
    note = f"only ranks 0-{shown - 1} of {world} are drawn" if shown < world else None
    fig.suptitle(
        f"per-rank timelines of the first global batch: {cost.label}, {world:,} ranks" + (f" ({note})" if note else ""),
        fontsize=11,
    )
    handles = [Patch(color=color, label=label) for color, label in KIND_COLORS.values()]
    fig.legend(handles=handles, loc="lower center", fontsize=8, ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.03, 1, 0.98))
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise CLIError(f"cannot write --plot {path!r}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return note


# --------------------------------------------------------------------------- argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-hdp", description="Hybrid Data Parallelism (ByteScale) for transformers: planning tools."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser(
        "plan",
        help="compare the static DP x CP mesh, naive HDP and balanced HDP on your length distribution",
        description=(
            "Draw global batches from a length distribution, plan each with the static DP x CP mesh, "
            "naive HDP and balanced HDP, and print estimated step times (from the analytic cost model) "
            "side by side."
        ),
    )
    lengths = p.add_argument_group("lengths (one of; default --stdlib)")
    src = lengths.add_mutually_exclusive_group()
    src.add_argument("--lengths", metavar="FILE", help="text file with one sample length per line ('-' = stdin)")
    src.add_argument("--dataset", metavar="PATH_OR_NAME", help="a HF dataset: save_to_disk folder, data file, or Hub name")
    src.add_argument("--stdlib", action="store_true", help="the built-in corpus: the Python standard library's files")
    lengths.add_argument(
        "--column", default="length", help="with --dataset: a column of lengths, or of token ids such as input_ids (default: length)"
    )
    lengths.add_argument("--split", default="train", help="with --dataset: the split (default: train)")

    m = p.add_argument_group("model and cluster")
    m.add_argument(
        "--model",
        default="llama-7b",
        help="a preset (llama-7b, llama-13b, llama-30b, llama-70b), a folder with a transformers config.json, "
        "or a Hub id (default: llama-7b)",
    )
    m.add_argument("--hardware", default="h100", help=f"hardware preset: {', '.join(hardware_presets())} (default: h100)")
    m.add_argument("--world-size", type=int, default=64, help="number of ranks (GPUs) (default: 64)")
    m.add_argument(
        "--tokens-per-rank", type=parse_size, default=8192, help="C, the tokens of one rank's micro-batch (default: 8K)"
    )
    m.add_argument(
        "--delta", type=float, default=0.05, help="the balance scheduler's tolerance, relative (default: 0.05)"
    )

    b = p.add_argument_group("global batch")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--global-batch-samples", type=parse_size, metavar="N", help="samples per global batch")
    g.add_argument(
        "--global-batch-tokens",
        type=parse_size,
        metavar="T",
        help="tokens per global batch (e.g. 32M); default 4 x world-size x tokens-per-rank",
    )
    b.add_argument("--steps", type=int, default=1, help="global batches to average over (default: 1)")
    b.add_argument("--seed", type=int, default=0, help="seed of the batch sampler (default: 0)")

    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help='print {"static": {...}, "naive": {...}, "balanced": {...}}')
    o.add_argument("--plot", metavar="FILE.png", help=f"draw the per-rank timelines (first {MAX_PLOT_RANKS} ranks)")
    o.add_argument("--progress", action="store_true", help="show a progress bar on stderr even when it is not a terminal")
    p.set_defaults(func=cmd_plan)
    return parser


def cmd_plan(args: argparse.Namespace) -> int:
    from hf_hdp.planning.cost import CostModel
    from hf_hdp.planning.plan import PlanError

    if args.world_size < 1:
        raise CLIError(f"--world-size must be at least 1, got {args.world_size}")
    if args.steps < 1:
        raise CLIError(f"--steps must be at least 1, got {args.steps}")
    if not 0 <= args.delta < 1:
        raise CLIError(f"--delta must be in [0, 1), got {args.delta}")
    if args.plot and not args.plot.lower().endswith(".png"):
        raise CLIError(f"--plot writes a PNG; give a file name ending in .png, got {args.plot!r}")
    if args.dataset is None and (args.column != "length" or args.split != "train"):
        raise CLIError("--column and --split apply only with --dataset")

    model = load_model_spec(args.model)
    hardware = load_hardware(args.hardware)
    cost = CostModel.from_specs(model, hardware)

    if args.lengths is not None:
        pool = read_lengths_file(args.lengths)
    elif args.dataset is not None:
        pool = dataset_lengths(args.dataset, args.column, args.split)
    else:
        pool = stdlib_pool()
    W, C = args.world_size, args.tokens_per_rank
    check_fits(pool, W, C)

    samples, tokens = args.global_batch_samples, args.global_batch_tokens
    if samples is None and tokens is None:
        tokens = 4 * W * C
    batches = draw_batches(pool.lengths, args.steps, args.seed, samples=samples, tokens=tokens)

    show = args.progress or sys.stderr.isatty()
    try:
        runs = compare_planners(batches, W, C, cost, delta=args.delta, progress=show)
    except PlanError as e:
        raise CLIError(str(e)) from None
    summary = summarize(runs)

    note = None
    if args.plot:
        note = plot_timelines(runs, cost, args.plot)

    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=False))
    else:
        n_tokens = summary["static"]["tokens"]
        n_samples = summary["static"]["samples"]
        budget = f"{samples:,} samples" if samples is not None else f"{tokens:,} tokens"
        header = (
            f"hf-hdp plan: {cost.label}; {W:,} ranks x {C:,} tokens (C)\n"
            f"lengths from {pool.source}; global batch {budget} "
            f"(mean {n_samples:,.0f} samples, {n_tokens:,.0f} tokens), "
            f"{args.steps} step{'s' if args.steps > 1 else ''}, seed {args.seed}"
        )
        print(render_table(summary, header))
        print("\nstep times are estimates of the analytic cost model (hf_hdp.planning.cost), not measurements.")
        if args.plot:
            print(f"timelines written to {args.plot}" + (f" ({note})" if note else ""))
    if args.plot and args.json and note:
        print(f"hf-hdp: {note} in {args.plot}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hf-hdp``; returns the exit status (0 ok, 2 usage or input error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    try:
        return args.func(args)
    except CLIError as e:
        print(f"hf-hdp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hf-hdp: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `hf-hdp plan | head`: stop quietly, as other command-line tools do
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
