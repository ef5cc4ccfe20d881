"""Calibration: time the model on this machine and fit the cost model's ``a, b, c`` to it.

``benchmarks/calibrate.py`` does it for a real model; the fit itself is :func:`~.fit.fit_coefficients`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from .fit import fit_coefficients, length_sums
from .model import CostModel


def predicted_time(cost: CostModel, item) -> float:
    """The model's time of one calibration measurement (a length, or the lengths packed in a micro-batch)."""
    s2, s1 = length_sums(item)
    return cost.num_layers * (cost.a * s2 + cost.b * s1 + cost.c)


def relative_residuals(cost: CostModel, lengths: Sequence, seconds: Sequence[float]) -> list[float]:
    """``model / measured - 1`` of each measurement (see :func:`fit_coefficients` for the entries)."""
    return [predicted_time(cost, item) / t - 1.0 for item, t in zip(lengths, seconds)]


def calibrate(
    measure: Callable,
    lengths: Iterable,
    *,
    base: CostModel | None = None,
    num_layers: int | None = None,
    repeats: int = 3,
    warmup: int = 1,
    relative: bool = True,
    statistic: Callable[[list[float]], float] = statistics.median,
) -> CostModel:
    """Fit ``a, b, c`` to timings of this machine and return the cost model with them.

    ``measure(s)`` runs forward + backward of one sequence of ``s`` tokens through the whole model
    and returns its seconds; an entry of ``lengths`` may also be a tuple of lengths, which
    ``measure`` runs packed as one micro-batch (see :func:`fit_coefficients`). Each length is measured ``warmup`` times unrecorded, then ``repeats``
    times; ``statistic`` of those counts (the median; ``min`` resists noise from other processes).
    The fit is per layer (``num_layers`` defaults to ``base.num_layers``)
    and relative by default (see :func:`fit_coefficients`). Everything but ``a, b, c`` (links,
    K/V size, gradient bytes) comes from ``base``. ``result.extra["calibration"]`` holds the
    lengths, the counted seconds, the relative residuals and the coefficients.
    """
    lengths = [int(s) if isinstance(s, (int, float)) else tuple(int(x) for x in s) for s in lengths]
    base = base or CostModel(0.0, 0.0, 0.0, num_layers=num_layers or 1, label="calibrated")
    num_layers = num_layers or base.num_layers
    seconds = []
    for s in lengths:
        for _ in range(warmup):
            measure(s)
        seconds.append(float(statistic([measure(s) for _ in range(max(1, repeats))])))
    a, b, c = fit_coefficients(lengths, seconds, num_layers, relative=relative)
    same = num_layers == base.num_layers  # per-layer masks and heads cannot follow another count
    masks, heads = (base.layer_masks, base.layer_heads) if same else ((), ())
    fitted = replace(base, a=a, b=b, c=c, num_layers=num_layers, layer_masks=masks, layer_heads=heads)
    residuals = relative_residuals(fitted, lengths, seconds)
    return replace(
        fitted,
        label=f"{base.label} (calibrated)" if base.label != "calibrated" else base.label,
        extra={
            **base.extra,
            "calibration": {
                "lengths": lengths,
                "seconds": seconds,
                "residuals": residuals,
                "a": a,
                "b": b,
                "c": c,
                "num_layers": num_layers,
            },
        },
    )
