"""The activation atlas: a UMAP or PCA map of one layer's activations (a section of the Concepts page)."""
from ...contract import Analysis, Needs
from ..concepts import DATA
from ..concepts.compute import activations_spec
from .compute import AtlasSpec, compute, estimate
from .figures import figures
from .page import PAGE

ANALYSIS = Analysis(spec=AtlasSpec, version="1", compute=compute, figures=figures, page=PAGE, estimate=estimate,
                    smaller=({"max_sentences": 800, "max_points": 3000}, {"max_sentences": 400, "max_points": 2000},
                             {"max_sentences": 200, "max_points": 1000}), inputs=(
    DATA,
    Needs("activations", lambda spec, got: activations_spec(spec) if spec.unit == "text" else None),
))
ANALYSES = [ANALYSIS]
