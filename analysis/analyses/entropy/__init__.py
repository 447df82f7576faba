"""Attention and predictive entropy over one prompt, for a model or across its training checkpoints."""
from ...contract import Analysis
from .compute import EntropySpec, compute, estimate
from .figures import figures
from .page import PAGE

ANALYSIS = Analysis(spec=EntropySpec, version="2", compute=compute, figures=figures, page=PAGE, estimate=estimate)
ANALYSES = [ANALYSIS]
