"""The residual stream's norm entering every block, at every position of a prompt."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pandas as pd
import plotly.graph_objects as go
import torch

from analysis.result import Result
from analysis.specs import PromptSpec, param


@dataclass(frozen=True)
class ResidualNormSpec(PromptSpec):
    analysis: ClassVar[str] = "toy_norms"
    title: ClassVar[str] = "Residual norms: the residual's L2 norm entering each block"
    skip_bos: bool = param(False, "leave out position 0")


def compute(session, spec: ResidualNormSpec, inputs, progress) -> Result:
    names = [session.hook("resid_pre", layer) for layer in range(session.n_layers)]
    with torch.no_grad():
        _, cache = session.run_with_cache(session.tensor(spec.token_ids), names)
    first = 1 if spec.skip_bos else 0
    rows = [{"layer": layer, "pos": pos, "norm": float(cache[name][0, pos].float().norm())}
            for layer, name in enumerate(names) for pos in range(first, len(spec.token_ids))]
    return Result(table=pd.DataFrame(rows), meta={"n_tokens": len(spec.token_ids)})


def figures(result: Result) -> dict[str, go.Figure]:
    t = result.table
    grid = t.pivot(index="layer", columns="pos", values="norm")
    return {"norms": go.Figure(go.Heatmap(z=grid.to_numpy(), x=list(grid.columns), y=list(grid.index)))}
