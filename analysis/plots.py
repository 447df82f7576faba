"""Shared pieces of the analyses' plotly figures.

Figures are built with plotly.graph_objects and the layout passed to the constructor: plotly.express takes
~40 ms a figure here, which would be most of the 200 ms budget for reopening a stored view.
"""
from __future__ import annotations

import pandas as pd

MARGIN = dict(l=0, r=0, t=40, b=0)


def token_labels(tokens: pd.DataFrame) -> list[str]:
    """Unique axis labels for token positions: "3:' John'"."""
    return [f"{p}:{t!r}" for p, t in zip(tokens["pos"], tokens["token"])]
