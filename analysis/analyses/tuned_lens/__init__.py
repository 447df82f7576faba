"""The tuned lens: per-layer affine translators trained by KL to the final distribution (stored per model; the
Lens page shows it beside the logit lens)."""
from ...contract import Analysis
from .compute import TunedLensSpec, compute, estimate

ANALYSIS = Analysis(spec=TunedLensSpec, version="2", compute=compute, estimate=estimate,
                    smaller=({"max_tokens": 8192, "steps": 150, "batch_tokens": 256},
                             {"max_tokens": 4096, "steps": 100, "batch_tokens": 256},
                             {"max_tokens": 2048, "steps": 60, "batch_tokens": 128}))
ANALYSES = [ANALYSIS]
