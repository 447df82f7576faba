"""The tuned lens: per-layer affine translators trained by KL to the final distribution (stored per model; the
Lens page shows it beside the logit lens)."""
from ...contract import Analysis
from .compute import TunedLensSpec, compute

ANALYSIS = Analysis(spec=TunedLensSpec, version="1", compute=compute)
ANALYSES = [ANALYSIS]
