"""Small statistics shared by analyses and figures."""
from __future__ import annotations

import numpy as np


def pearson(a, b) -> float:
    """Pearson's correlation of two equal-length sequences (nan when either is constant or too short)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


N_BOOT = 1000  # bootstrap resamples behind every 95% interval we report


def resample_weights(n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """[n_boot, n] weights that turn a mean over n examples into the mean of a bootstrap resample (multinomial
    counts / n; resample b's mean of values v is weights[b] @ v). Seeded: a stored run's interval is
    reproducible."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64) / n


def bootstrap_means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Bootstrap means of each row: values [rows, n] -> [rows, n_boot]."""
    return np.asarray(values, dtype=np.float64) @ weights.T


def interval(boot: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of bootstrap replicates [rows, n_boot] -> (low [rows], high [rows])."""
    a = (1 - level) / 2
    return np.nanquantile(boot, a, axis=-1), np.nanquantile(boot, 1 - a, axis=-1)


CHUNK_ELEMENTS = 1 << 23  # rows x resamples held at once (64 MiB of float64)


def bootstrap_interval(values: np.ndarray, weights: np.ndarray, transform=None,
                       level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) per row of values [rows, n]: the percentile interval of the bootstrap means (through
    `transform`, e.g. a normalisation that uses each resample's own reference means), in chunks of rows so that
    a sweep of many nodes never holds rows x resamples at once."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    step = max(1, CHUNK_ELEMENTS // weights.shape[0])
    lows, highs = [], []
    for r in range(0, values.shape[0], step):
        boot = bootstrap_means(values[r:r + step], weights)
        low, high = interval(transform(boot) if transform is not None else boot, level)
        lows.append(low)
        highs.append(high)
    if not lows:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(lows), np.concatenate(highs)


def mean_ci(values: np.ndarray, level: float = 0.95, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, low, high) per row of values [rows, n]: the mean over examples and its bootstrap interval."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    low, high = bootstrap_interval(values, resample_weights(values.shape[1], seed=seed), level=level)
    return values.mean(-1), low, high


def sign_flip_p(diffs: np.ndarray, n_perm: int = 9999, seed: int = 0) -> np.ndarray:
    """Two-sided paired permutation (sign-flip) test per row of diffs [rows, n] (each example's effect against
    its own unpatched run): under no effect each example's sign is exchangeable. Exact over all 2^n sign patterns
    when n <= 13, else n_perm random ones with the observed count included (p >= 1 / (n_perm + 1))."""
    diffs = np.atleast_2d(np.asarray(diffs, dtype=np.float64))
    n = diffs.shape[1]
    if n <= 13:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)  # every pattern, the observed included
        extra = 0
    else:
        signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_perm, n))
        extra = 1
    observed = np.abs(diffs.mean(-1))
    count = np.zeros(len(diffs))
    step = max(1, CHUNK_ELEMENTS // signs.shape[0])
    for r in range(0, len(diffs), step):  # [rows, patterns] a chunk of rows at a time
        null = np.abs(diffs[r:r + step] @ signs.T / n)
        obs = observed[r:r + step, None]
        count[r:r + step] = (null >= obs - 1e-12 * np.maximum(1.0, obs)).sum(-1)
    return (count + extra) / (signs.shape[0] + extra)
