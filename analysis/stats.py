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
    if not np.isnan(boot).any():  # the same quantiles, 3x faster than nanquantile (felt over 70,000 edges)
        low, high = np.quantile(boot, [a, 1 - a], axis=-1)
        return low, high
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


EXACT_UP_TO = 13  # sign_flip_p enumerates every sign pattern up to this many examples, samples above
N_PERM = 9999  # random sign patterns above EXACT_UP_TO


def sign_flip_p(diffs: np.ndarray, n_perm: int = N_PERM, seed: int = 0) -> np.ndarray:
    """Two-sided paired permutation (sign-flip) test per row of diffs [rows, n] (each example's effect against
    its own unpatched run): under no effect each example's sign is exchangeable. Exact over all 2^n sign patterns
    when n <= 13, else n_perm random ones with the observed count included (p >= 1 / (n_perm + 1))."""
    diffs = np.atleast_2d(np.asarray(diffs, dtype=np.float64))
    n = diffs.shape[1]
    if n <= EXACT_UP_TO:
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


def sign_flip_min_p(diffs: np.ndarray, n_perm: int = N_PERM) -> np.ndarray:
    """The smallest p-value `sign_flip_p` can give each row of diffs [rows, n], whatever the signs of its
    examples: with n examples, z of them exactly zero (their flips leave the mean as it is), the observed pattern,
    its mirror image and their 2^z copies always count, so the exact test gives at least 2 / 2^(n - z) (1 when
    every example is zero); sampled patterns (n > EXACT_UP_TO) give at least that, and never below
    1 / (n_perm + 1). Ties among non-zero values do not raise it (flipping any non-zero example lowers |mean|)."""
    diffs = np.atleast_2d(np.asarray(diffs, dtype=np.float64))
    n = diffs.shape[1]
    if n == 0:
        return np.ones(len(diffs))
    obs = np.abs(diffs.mean(-1, keepdims=True))
    nonzero = (2 * np.abs(diffs) / n > 1e-12 * np.maximum(1.0, obs)).sum(-1)  # a flip sign_flip_p's tolerance sees
    floor = np.minimum(1.0, 2.0 ** (1 - nonzero.astype(np.float64)))
    return floor if n <= EXACT_UP_TO else np.maximum(floor, 1.0 / (n_perm + 1))


def sign_flip_floor(n: int, n_perm: int = N_PERM) -> float:
    """The smallest p-value `sign_flip_p` can give with n examples (none of them zero): 2 / 2^n when exact (4
    examples: 0.125; 5 cannot reach 0.05; 6 give 0.031), 1 / (n_perm + 1) or that, whichever is larger, above."""
    return float(sign_flip_min_p(np.ones((1, max(0, n))), n_perm)[0]) if n > 0 else 1.0


def unreachable_note(min_p: float, n: int, alpha: float = 0.05) -> str:
    """A warning when no p-value of a table can fall below `alpha` whatever the data (min_p: the smallest any row
    can reach), else "" (nothing to say)."""
    if not min_p > alpha:
        return ""
    return (f"With {n} pairs the sign-flip test cannot give p below {min_p:.3g}, so no node can reach "
            f"p < {alpha:g} whatever its effect: read the intervals, or run more pairs (6 reach 2/64 ≈ 0.031).")
