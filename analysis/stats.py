"""Small statistics shared by analyses and figures."""
from __future__ import annotations

import numpy as np


def pearson(a, b) -> float:
    """Pearson's correlation of two equal-length sequences (nan when either is constant or too short)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])
