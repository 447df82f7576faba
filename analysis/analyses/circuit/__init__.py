"""Circuits: edges between components scored by edge activation patching, EAP, EAP-IG and RelP, pruned by
faithfulness."""
from ...contract import Analysis, Needs
from .compute import compute, estimate
from .figures import figures, intervention_figures
from .intervene import CircuitInterventionSpec, compute_intervention, estimate_intervention, sae_inputs
from .page import PAGE
from .spec import CircuitSpec, sae_specs

# Smaller settings for large models: activation patching on fewer edges first (it is most of the work), then
# without it, then fewer curve points
ANALYSIS = Analysis(spec=CircuitSpec, version="1", compute=compute, figures=figures, page=PAGE, estimate=estimate,
                    inputs=(Needs("sae", sae_specs),),  # feature circuits: the SAE at each layer
                    smaller=({"patch_limit": 1000, "n_pairs": 6},
                             {"methods": ("eap", "eap_ig", "relp"), "n_pairs": 6},
                             {"methods": ("eap", "eap_ig", "relp"), "n_pairs": 6, "n_points": 8, "ig_steps": 4}))
# a chosen set of the graph's nodes ablated or patched (shown on the Circuits page, below the graph)
INTERVENTION = Analysis(spec=CircuitInterventionSpec, version="1", compute=compute_intervention,
                        figures=intervention_figures, estimate=estimate_intervention,
                        inputs=(Needs("sae", sae_inputs),))
ANALYSES = [ANALYSIS, INTERVENTION]
