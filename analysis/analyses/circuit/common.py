"""What the two levels of circuits share: the gradient methods' order, effects with bootstrap intervals, the
faithfulness curves' sizes and rows, and rows per forward without a model at hand."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ...errors import WorkbenchError
from ...stats import CHUNK_ELEMENTS, interval

GRADIENT_ORDER = ("eap_ig", "relp", "eap")  # which gradient method picks the edges to patch when not all are
SHIPPED = 15  # a shipped IOI pair's length (without a model to tokenise them)


def mean_effects(values: np.ndarray, base: np.ndarray, source: np.ndarray, normalized: bool,
             weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean effect (patched minus unpatched) of each row of `values` [E, N] with its bootstrap interval; on the
    normalised scale each resample divides by its own (source - base) means. In chunks of CHUNK_ELEMENTS
    resampled means (64 MiB)."""
    chunk = max(1, CHUNK_ELEMENTS // weights.shape[0])
    span = source.mean() - base.mean()
    mean = values.mean(1) - base.mean()
    if normalized:
        mean = mean / span
    lo, hi = np.full(len(values), np.nan), np.full(len(values), np.nan)
    b_base, b_span = weights @ base, weights @ source - weights @ base
    for c0 in range(0, len(values), chunk):
        v = values[c0:c0 + chunk]
        ok = np.isfinite(v).all(1)
        if not ok.any():
            continue
        boot = v[ok] @ weights.T - b_base[None]  # [e, n_boot]
        if normalized:
            with np.errstate(divide="ignore", invalid="ignore"):
                boot = np.where(np.abs(b_span) > 1e-9, boot / b_span, np.nan)
        low, high = interval(boot)
        lo[c0:c0 + chunk][ok], hi[c0:c0 + chunk][ok] = low, high
    return mean, lo, hi


def curve_sizes(n_edges: int, n_points: int) -> list[int]:
    """Circuit sizes of a faithfulness curve: 1 edge to all, spaced logarithmically, with the empty circuit."""
    sizes = np.unique(np.round(np.geomspace(1, n_edges, n_points)).astype(int))
    return [0] + sizes.tolist()


def curves(m: np.ndarray, labels: list, weights: np.ndarray, methods: list[str], unit: str, more,
           flat: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Faithfulness and completeness rows from the circuits' metrics [C, B] (the empty circuit first, the full
    model second; `labels` (method, size, "circuit" | "complement") for the rest), each with a bootstrap interval
    over pairs; `unit` names the size column, `more(method, size)` adds columns; `flat` is the message when the
    empty and the full circuit measure the same."""
    empty, full = m[0], m[1]
    b_empty, b_full = weights @ empty, weights @ full
    span = full.mean() - empty.mean()
    if abs(span) < 1e-9:
        raise WorkbenchError(flat, hint="Pick other pairs or another metric.")
    rows = {"circuit": [], "complement": []}
    for k, (method, size, kind) in enumerate(labels):
        if kind in ("empty", "full"):
            continue
        f = (m[k].mean() - empty.mean()) / span
        with np.errstate(divide="ignore", invalid="ignore"):
            boot = (weights @ m[k] - b_empty) / (b_full - b_empty)
        lo, hi = interval(boot[None])
        rows[kind].append({"method": method, unit: size, **more(method, size),
                           "faithfulness" if kind == "circuit" else "completeness": float(f),
                           "ci_low": float(lo[0]), "ci_high": float(hi[0]), "metric": float(m[k].mean())})
    for kind, (name, value) in (("circuit", ("faithfulness", 0.0)), ("complement", ("completeness", 1.0))):
        # the two ends of every curve, measured: the empty circuit and the full model
        for method in methods:
            rows[kind].insert(0, {"method": method, unit: 0, **{k: 0 for k in more(method, 0)}, name: value,
                                  "ci_low": value, "ci_high": value,
                                  "metric": float((empty if kind == "circuit" else full).mean())})
    faith = pd.DataFrame(rows["circuit"]).sort_values(["method", unit], kind="stable").reset_index(drop=True)
    comp = pd.DataFrame(rows["complement"]).sort_values(["method", unit], kind="stable").reset_index(drop=True)
    return faith, comp


def rows_per_forward(s, n: int) -> int:
    """kernels.patching.default_chunk_rows without a model at hand."""
    if s.device == "cuda":
        return 1 << 20
    per_row = 4 * n * (6 * s.d_model + 2 * s.d_mlp + 3 * s.n_heads * n) + 4 * s.d_vocab
    return max(1, 32 * 2**20 // per_row)
