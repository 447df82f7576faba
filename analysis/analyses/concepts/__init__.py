"""Concept activations (the residual after every layer of each labelled text, stored as their own run) and
linear probes per concept and layer; the Concepts page, whose other sections are the bottleneck, interventions,
TCAV and the atlas."""
from ... import concept_data
from ...contract import Analysis, Dataset, Needs
from .compute import (
    ConceptActivationsSpec,
    ProbeSpec,
    activations_spec,
    compute_activations,
    compute_probes,
    estimate_activations,
    estimate_probes,
)
from .figures import figures
from .page import PAGE, PROBES_SECTION

DATA = Dataset("data", concept_data.load)
SMALLER = ({"max_sentences": 800}, {"max_sentences": 400}, {"max_sentences": 200})  # for large models
# the Concepts page; its sections are the concept analyses
ACTIVATIONS = Analysis(spec=ConceptActivationsSpec, version="2", compute=compute_activations, inputs=(DATA,),
                       page=PAGE, estimate=estimate_activations, smaller=SMALLER)
PROBES = Analysis(spec=ProbeSpec, version="3", compute=compute_probes, figures=figures,
                  inputs=(Needs("activations", activations_spec),), page=PROBES_SECTION,
                  estimate=estimate_probes, smaller=SMALLER)
ANALYSES = [ACTIVATIONS, PROBES]
