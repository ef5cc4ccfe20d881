"""Least-squares fits of ``a·s² + b·s + c``, and ByteScale's published per-layer times fitted that way.

:func:`fit_coefficients` fits per-layer coefficients to measured times (:func:`~.calibration.calibrate`
measures them on this machine); :func:`hardware_from_coefficients` turns fitted coefficients back into a
:class:`~.specs.HardwareSpec`, so that a calibration on one model prices others; :func:`bytescale_fit`
fits the per-layer LLaMA-7B times of ByteScale (arXiv 2502.21231), and :func:`bytescale_hardware`
makes them the ``"bytescale"`` hardware preset.

Pure arithmetic on Python floats: nothing here runs at import.
"""

from __future__ import annotations

import math
from dataclasses import replace

from .specs import FWD_BWD, HARDWARE_PRESETS, MODEL_PRESETS, HardwareSpec, ModelSpec


def length_sums(item) -> tuple[float, float]:
    """``(Σs², Σs)`` of one measurement: a sequence length, or the lengths of a packed micro-batch."""
    if isinstance(item, (int, float)):
        return float(item) * item, float(item)
    items = [float(s) for s in item]
    return sum(s * s for s in items), sum(items)


def fit_coefficients(
    lengths: list, seconds: list[float], num_layers: int = 1, *, relative: bool = False, quadratic: bool = True
) -> tuple[float, float, float]:
    """Least-squares fit of per-layer ``a, b, c >= 0`` to measured whole-model times.

    Each entry of ``lengths`` is one measurement: a sequence length ``s`` (time
    ``L·(a·s² + b·s + c)``), or the lengths of the whole sequences packed into one micro-batch
    (``L·(a·Σs² + b·Σs + c)``). Packed short sequences pin down ``b``: their attention is small.

    ``relative=True`` minimises relative rather than absolute residuals (weights ``1/t``), so short
    sequences count as much as long ones; use it for timings that span orders of magnitude.
    ``quadratic=False`` fixes ``a = 0`` (a purely linear part, e.g. an MLP). Negative coefficients
    are not physical: the most negative term is dropped and the rest refitted (an active-set step).
    """
    if len(lengths) != len(seconds) or len(lengths) < 3:
        raise ValueError("calibration needs at least 3 (length, seconds) measurements of equal count")
    if relative and any(t <= 0 for t in seconds):
        raise ValueError("a relative fit needs positive times")
    rows = [(*length_sums(item), 1.0) for item in lengths]
    ys = [t / num_layers for t in seconds]
    weights = [1.0 / y for y in ys] if relative else [1.0] * len(ys)
    # scale columns so the normal equations are well conditioned
    scale = [max(abs(r[j]) for r in rows) or 1.0 for j in range(3)]
    X = [[w * r[j] / scale[j] for j in range(3)] for r, w in zip(rows, weights)]
    yw = [w * y for w, y in zip(weights, ys)]
    active = [0, 1, 2] if quadratic else [1, 2]
    while True:
        coef = _lstsq([[x[j] for j in active] for x in X], yw)
        if all(c >= 0 for c in coef) or len(active) == 1:
            break
        active.pop(min(range(len(coef)), key=lambda i: coef[i]))  # drop the most negative term
    full = [0.0, 0.0, 0.0]
    for j, c in zip(active, coef):
        full[j] = max(c, 0.0) / scale[j]
    return full[0], full[1], full[2]


def _lstsq(X: list[list[float]], y: list[float]) -> list[float]:
    """Least squares via the normal equations (columns pre-scaled by the caller), Gauss-Jordan with pivoting."""
    n = len(X[0])
    A = [[sum(r[i] * r[j] for r in X) for j in range(n)] for i in range(n)]
    v = [sum(r[i] * yy for r, yy in zip(X, y)) for i in range(n)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(A[r][col]))
        A[col], A[piv] = A[piv], A[col]
        v[col], v[piv] = v[piv], v[col]
        if abs(A[col][col]) < 1e-300:
            continue
        for r in range(n):
            if r != col:
                f = A[r][col] / A[col][col]
                A[r] = [x - f * y for x, y in zip(A[r], A[col])]
                v[r] -= f * v[col]
    return [v[i] / A[i][i] if abs(A[i][i]) > 1e-300 else 0.0 for i in range(n)]


def hardware_from_coefficients(
    model: ModelSpec,
    a: float,
    b: float,
    c: float,
    base: HardwareSpec,
    peak_flops: float | None = None,
    name: str | None = None,
) -> HardwareSpec:
    """The :class:`HardwareSpec` for which :meth:`CostModel.from_specs` (``model``) gives ``a, b, c``:
    efficiencies are the fitted FLOP rates over ``peak_flops`` (default ``base.peak_flops``); the
    links and memory come from ``base``. Turns a calibration on one model into a preset for others."""
    peak = peak_flops or base.peak_flops
    att_rate = FWD_BWD * model.attention_flops_per_s2 / a if a > 0 else peak * base.attention_efficiency
    lin_rate = FWD_BWD * model.linear_flops_per_token / b if b > 0 else peak * base.linear_efficiency
    return replace(
        base,
        name=name or f"{base.name} (calibrated)",
        peak_flops=peak,
        attention_efficiency=att_rate / peak,
        linear_efficiency=lin_rate / peak,
        overhead_per_layer=c,
    )


# ByteScale (arXiv 2502.21231), per-layer time of LLaMA-7B in ms, attention vs MLP (docs/design.md §1).
BYTESCALE_LAYER_MS: dict[int, tuple[float, float]] = {
    4096: (0.8, 0.9),
    8192: (1.8, 1.8),
    16384: (4.8, 3.6),
    32768: (14.1, 7.5),
    65536: (48.2, 15.1),
    131072: (175.5, 28.2),
}


def bytescale_fit() -> dict:
    """Fit ByteScale's published per-layer LLaMA-7B times (forward, one layer, in seconds).

    Attention (its projections included) is fitted as ``a·s² + b_att·s + c_att``, the MLP as
    ``b_mlp·s + c_mlp``, both with relative least squares; the layer is their sum
    (``b = b_att + b_mlp``, ``c = c_att + c_mlp``). Returns the coefficients, the relative residuals
    of attention, MLP and layer at each length, the attention/MLP crossover length, and the FLOP
    rates the fit implies (forward FLOPs of LLaMA-7B's layer over the fitted times).
    """
    S = list(BYTESCALE_LAYER_MS)
    att = [BYTESCALE_LAYER_MS[s][0] * 1e-3 for s in S]
    mlp = [BYTESCALE_LAYER_MS[s][1] * 1e-3 for s in S]
    a, b_att, c_att = fit_coefficients(S, att, relative=True)
    _, b_mlp, c_mlp = fit_coefficients(S, mlp, relative=True, quadratic=False)
    b, c = b_att + b_mlp, c_att + c_mlp

    def rel(pred, ys):
        return [round(p / y - 1.0, 4) for p, y in zip(pred, ys)]

    att_pred = [a * s * s + b_att * s + c_att for s in S]
    mlp_pred = [b_mlp * s + c_mlp for s in S]
    layer_res = rel([x + y for x, y in zip(att_pred, mlp_pred)], [x + y for x, y in zip(att, mlp)])
    # crossover: a s^2 + b_att s + c_att = b_mlp s + c_mlp
    qa, qb, qc = a, b_att - b_mlp, c_att - c_mlp
    disc = qb * qb - 4 * qa * qc
    crossover = (-qb + math.sqrt(disc)) / (2 * qa) if qa > 0 and disc >= 0 else float("nan")
    m = MODEL_PRESETS["llama-7b"]
    mlp_flops = 2.0 * 3 * m.hidden_size * m.intermediate_size
    proj_flops = 2.0 * (m.layer_params - 3 * m.hidden_size * m.intermediate_size)
    return {
        "a": a,
        "b": b,
        "c": c,
        "attention": {"a": a, "b": b_att, "c": c_att, "residuals": rel(att_pred, att)},
        "mlp": {"b": b_mlp, "c": c_mlp, "residuals": rel(mlp_pred, mlp)},
        "layer_residuals": layer_res,
        "max_abs_residual": max(abs(r) for r in layer_res),
        "lengths": S,
        "crossover_tokens": crossover,
        "implied_flops": {
            "attention_core": m.attention_flops_per_s2 / a if a else float("nan"),
            "linear": (mlp_flops + proj_flops) / b if b else float("nan"),
        },
    }


def bytescale_hardware() -> HardwareSpec:
    """H100 links with the compute rates fitted to ByteScale's LLaMA-7B per-layer times, usable with any
    model: ``CostModel.from_specs(llama-7b, bytescale_hardware())`` gives :meth:`CostModel.bytescale`'s
    ``a, b, c``. Fitted afresh on every call; ``HARDWARE_PRESETS["bytescale"]`` stores the result."""
    fit = bytescale_fit()
    return hardware_from_coefficients(
        MODEL_PRESETS["llama-7b"],
        FWD_BWD * fit["a"],
        FWD_BWD * fit["b"],
        FWD_BWD * fit["c"],
        HARDWARE_PRESETS["h100"],
        name="bytescale",
    )
