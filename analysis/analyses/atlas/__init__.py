"""The activation atlas: a UMAP or PCA map of one layer's activations (a section of the Concepts page)."""
from ...contract import Analysis, Needs
from ..concepts import DATA
from ..concepts.compute import activations_spec
from .compute import AtlasSpec, compute
from .figures import figures
from .page import PAGE

ANALYSIS = Analysis(spec=AtlasSpec, version="1", compute=compute, figures=figures, page=PAGE, inputs=(
    DATA,
    Needs("activations", lambda spec, got: activations_spec(spec) if spec.unit == "text" else None),
))
ANALYSES = [ANALYSIS]
