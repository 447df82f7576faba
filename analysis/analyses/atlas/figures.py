"""The activation atlas scatter."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ...plots import MARGIN as _MARGIN
from ...result import Result


def atlas_scatter(table: pd.DataFrame, colour: str | None = None) -> go.Figure:
    """The 2-d map, one trace per class of the colouring concept; hover shows the token and its text."""
    colour = colour if colour in table.columns else None
    groups = table.groupby(colour, sort=True) if colour else [("points", table)]
    traces = []
    for value, g in groups:
        traces.append(go.Scattergl(x=g["x"], y=g["y"], mode="markers", name=str(value), marker=dict(size=4),
                                   customdata=np.stack([g["token"].astype(str), g["text"].astype(str)], 1),
                                   hovertemplate="%{customdata[0]}<br>%{customdata[1]}<extra>" + str(value) +
                                                 "</extra>"))
    return go.Figure(traces, layout=dict(title=f"Activation atlas ({len(table):,} points)" +
                                         (f", coloured by {colour}" if colour else ""), height=560, margin=_MARGIN,
                                         xaxis=dict(showticklabels=False), yaxis=dict(showticklabels=False)))


def figures(result: Result, colour: str | None = None) -> dict[str, go.Figure]:
    labels = [c for c in result.table.columns if c not in ("x", "y", "text_index", "position", "text", "token")]
    return {"atlas": atlas_scatter(result.table, colour or (labels[0] if labels else None))}
