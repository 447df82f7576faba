"""The information plane: per layer, entropy and mutual information of sampled representations, over training."""
from ...contract import Analysis
from .compute import InfoPlaneSpec, compute
from .figures import figures

ANALYSIS = Analysis(spec=InfoPlaneSpec, version="1", compute=compute, figures=figures)
ANALYSES = [ANALYSIS]
