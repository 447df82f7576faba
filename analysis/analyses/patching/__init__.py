"""Patching: activation, attribution and relevance patching and integrated gradients over prompt pairs."""
from ...contract import Analysis
from .compute import compute, estimate
from .figures import figures
from .page import PAGE
from .spec import PatchingSpec

ANALYSIS = Analysis(spec=PatchingSpec, version="2", compute=compute, figures=figures, page=PAGE, estimate=estimate,
                    smaller=({"n_pairs": 4, "components": ("attn_out", "mlp_out", "z_all_pos")},
                             {"n_pairs": 4, "components": ("attn_out", "z_all_pos")},
                             {"n_pairs": 2, "components": ("z_all_pos",)}))
ANALYSES = [ANALYSIS]
