"""The one list of analyses, read by the runner, the command line, the export and the app's navigation.

Adding an analysis: a new folder under analysis/analyses/ whose `__init__.py` defines `ANALYSES` (a list of
`contract.Analysis`), and its name in the import and the list below. Packages outside this repository (a lab's
own analyses) join by naming them in WORKBENCH_ANALYSES (comma-separated importable modules, each with `ANALYSES`).
"""
from __future__ import annotations

import importlib
import os

from .analyses import (
    atlas,
    bottleneck,
    circuit,
    concepts,
    entropy,
    features,
    infoplane,
    intervention,
    lens,
    model_view,
    patching,
    quant,
    tcav,
    tuned_lens,
)
from .contract import Analysis
from .errors import WorkbenchError

BUILT_IN = [model_view, patching, circuit, lens, tuned_lens, entropy, infoplane, concepts, bottleneck, intervention,
            tcav, atlas, quant, features]


def _plugins() -> list:
    names = [n.strip() for n in os.environ.get("WORKBENCH_ANALYSES", "").split(",") if n.strip()]
    mods = []
    for name in names:
        try:
            mods.append(importlib.import_module(name))
        except ImportError as e:
            raise WorkbenchError(f"WORKBENCH_ANALYSES names {name!r}, which cannot be imported: {e}") from e
    return mods


ANALYSES: list[Analysis] = [a for m in BUILT_IN + _plugins() for a in m.ANALYSES]
REGISTRY: dict[str, Analysis] = {}
for _a in ANALYSES:
    if _a.name in REGISTRY:
        raise RuntimeError(f"two analyses are called {_a.name!r}")
    REGISTRY[_a.name] = _a


def get_analysis(name) -> Analysis:
    if name not in REGISTRY:
        raise WorkbenchError(f"Unknown analysis {name!r}.", hint=f"Known: {', '.join(sorted(REGISTRY))}.")
    return REGISTRY[name]
