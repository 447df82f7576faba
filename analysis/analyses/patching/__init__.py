"""Patching: activation, attribution and relevance patching and integrated gradients over prompt pairs."""
from ...contract import Analysis
from .compute import compute
from .figures import figures
from .page import PAGE
from .spec import PatchingSpec

ANALYSIS = Analysis(spec=PatchingSpec, version="1", compute=compute, figures=figures, page=PAGE)
ANALYSES = [ANALYSIS]
