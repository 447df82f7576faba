"""Concept interventions: the residual pushed along a probe direction by several amounts, the output at each
(a section of the Concepts page)."""
from ...contract import Analysis, Needs
from ..concepts import SMALLER
from ..concepts.compute import activations_spec, probes_spec
from .compute import InterventionSpec, compute, estimate
from .figures import figures
from .page import PAGE

ANALYSIS = Analysis(spec=InterventionSpec, version="2", compute=compute, figures=figures, page=PAGE,
                    estimate=estimate, smaller=SMALLER, inputs=(
    Needs("probes", lambda spec, got: probes_spec(spec, (spec.concept,))),
    Needs("activations", activations_spec),
))
ANALYSES = [ANALYSIS]
