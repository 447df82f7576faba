"""The information plane: per layer, entropy and mutual information of sampled representations, over training."""
from ...contract import Analysis
from .compute import InfoPlaneSpec, compute, estimate
from .figures import figures
from .page import PAGE

ANALYSIS = Analysis(spec=InfoPlaneSpec, version="2", compute=compute, figures=figures, page=PAGE, estimate=estimate,
                    smaller=({"n_samples": 600}, {"n_samples": 400}, {"n_samples": 250}))
ANALYSES = [ANALYSIS]
