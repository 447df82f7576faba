"""A toy analysis added the way any analysis is: one package with an `ANALYSES` list (here outside analysis/, named
by WORKBENCH_ANALYSES, as a lab's own analyses would be)."""
from analysis.contract import Analysis

from .norms import ResidualNormSpec, compute, figures

ANALYSIS = Analysis(spec=ResidualNormSpec, version="1", compute=compute, figures=figures)
ANALYSES = [ANALYSIS]
