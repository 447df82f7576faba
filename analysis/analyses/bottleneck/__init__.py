"""A post-hoc concept bottleneck: concept scores -> a sparse head -> the model's behaviour, with completeness and
the random-direction leakage baseline (a section of the Concepts page)."""
from ...contract import Analysis, Needs
from ..concepts import DATA, SMALLER
from ..concepts.compute import activations_spec, probes_spec
from .compute import BottleneckSpec, bottleneck_concepts, compute, estimate
from .figures import figures
from .page import PAGE

ANALYSIS = Analysis(spec=BottleneckSpec, version="1", compute=compute, figures=figures, page=PAGE,
                    estimate=estimate, smaller=SMALLER, inputs=(
    DATA,
    Needs("probes", lambda spec, got: probes_spec(spec, bottleneck_concepts(spec, got["data"]))),
    Needs("activations", activations_spec),
))
ANALYSES = [ANALYSIS]
