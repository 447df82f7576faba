"""Patching: activation, attribution and relevance patching and integrated gradients over prompt pairs."""
from ...contract import Analysis
from .compute import compute, estimate
from .figures import figures
from .page import PAGE
from .spec import PatchingSpec

# Smaller settings for large models: fewer pairs and components, never fewer than MIN_PAIRS pairs, the fewest for
# which the two-sided sign-flip test the page shows can reach p < 0.05 (its floor is 2 / 2^n: 0.031 with 6 pairs,
# 0.125 with 4); a model too large for the last rung keeps it, over the time budget, rather than p-values that
# cannot mean anything.
MIN_PAIRS = 6
ANALYSIS = Analysis(spec=PatchingSpec, version="2", compute=compute, figures=figures, page=PAGE, estimate=estimate,
                    smaller=({"n_pairs": MIN_PAIRS, "components": ("attn_out", "mlp_out", "z_all_pos")},
                             {"n_pairs": MIN_PAIRS, "components": ("attn_out", "z_all_pos")},
                             {"n_pairs": MIN_PAIRS, "components": ("z_all_pos",)}))
ANALYSES = [ANALYSIS]
