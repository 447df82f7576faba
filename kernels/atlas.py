"""2-d maps of activations: UMAP (umap-learn) or PCA.

UMAP's cost on a small machine is mostly numba compiling its kernels: ~20 s to import umap/pynndescent and
~15 s for the first fit in a process, on 2 cores. Two things keep that out of the user's way:

- the k nearest neighbours come from scikit-learn's exact search (0.2 s for 5,000 x 128) and are handed to UMAP,
  so pynndescent's approximate search (another ~40 s of compiling) never runs;
- numba's on-disk cache is switched on for umap's kernels that do not ask for it and pointed at a persistent
  folder (NUMBA_CACHE_DIR, default ~/.cache/interp-workbench/numba), so only the first process on a machine
  compiles; later processes load the machine code (import ~3 s, fit ~5 s). `warm_up()` does that first compile
  on a tiny input (the app runs it in a background thread at start).
"""
from __future__ import annotations

import os
import re
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

_lock = threading.Lock()
_ready = False


def _numba_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "interp-workbench" / "numba"


def _umap():
    """Import umap with numba's cache persistent and enabled for all of umap's kernels."""
    global _ready
    with _lock:
        if not _ready:
            if "NUMBA_CACHE_DIR" not in os.environ:
                os.environ["NUMBA_CACHE_DIR"] = str(_numba_cache_dir())
                if "numba" in sys.modules:  # numba reads its settings when imported: make it read them again
                    from numba.core import config

                    config.reload_config()
            import umap.layouts
            import umap.spectral
            import umap.umap_
            import umap.utils
            from numba.core.registry import CPUDispatcher

            for mod in (umap.umap_, umap.layouts, umap.utils, umap.spectral):
                for obj in vars(mod).values():
                    if isinstance(obj, CPUDispatcher) and type(obj._cache).__name__ == "NullCache":
                        obj.enable_caching()
            _ready = True
    import umap

    return umap


def pca_2d(X: np.ndarray) -> tuple[np.ndarray, dict]:
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, random_state=0).fit(X)
    return pca.transform(X).astype(np.float32), {"explained_variance": [float(v) for v in
                                                                         pca.explained_variance_ratio_]}


class _EpochSink:
    """A file for the progress bar umap draws over its layout's epochs (tqdm, with a bar format of "n/total"):
    each draw becomes a report of the epochs done."""

    def __init__(self, report: Callable[[int, int], None]):
        self.report = report

    def write(self, text: str) -> None:
        found = re.findall(r"(\d+)/(\d+)", text)
        if found:
            done, total = map(int, found[-1])
            if total:
                self.report(done, total)

    def flush(self) -> None:
        pass


def umap_2d(X: np.ndarray, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0,
            progress: Callable[[float, str], None] | None = None) -> tuple[np.ndarray, dict]:
    """UMAP with exact neighbours; deterministic for a seed (umap then runs single-threaded). `progress(frac,
    what)` hears of the neighbours, umap's loading, and (every 0.2 s or so) the layout's epochs."""
    from sklearn.neighbors import NearestNeighbors

    report = progress or (lambda frac, what: None)
    X = np.ascontiguousarray(X, dtype=np.float32)
    n_neighbors = min(n_neighbors, len(X) - 1)
    report(0.0, f"nearest neighbours of {len(X):,} points")
    dist, idx = NearestNeighbors(n_neighbors=n_neighbors).fit(X).kneighbors(X)
    report(0.1, "loading UMAP")
    umap = _umap()
    report(0.15, "UMAP: the neighbour graph and its spectral layout")
    # the layout's epochs are most of a fit (the graph and the spectral start come first)
    epochs = {} if progress is None else {"tqdm_kwds": {
        "disable": False, "file": _EpochSink(lambda n, total: report(0.3 + 0.7 * n / total,
                                                                     f"UMAP: epoch {n} of {total}")),
        "bar_format": "{n}/{total}", "mininterval": 0.2, "ascii": True}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no NNDescent index: transform unavailable"; disconnected graphs
        emb = umap.UMAP(n_neighbors=n_neighbors, min_dist=min_dist, random_state=seed,
                        precomputed_knn=(idx, dist, None), **epochs).fit_transform(X)
    return emb.astype(np.float32), {"n_neighbors": n_neighbors, "min_dist": min_dist}


def warm_up() -> None:
    """Compile (or load from the cache) umap's kernels on a tiny input."""
    rng = np.random.default_rng(0)
    umap_2d(rng.normal(size=(64, 8)).astype(np.float32), n_neighbors=5)


def warm_up_in_background() -> threading.Thread:
    t = threading.Thread(target=lambda: _safe(warm_up), name="umap-warm-up", daemon=True)
    t.start()
    return t


def _safe(fn):
    try:
        fn()
    except Exception:  # warming up is an optimisation; a failure shows up (with its message) on first real use
        pass
