"""TCAV through captum.concept: a concept class against random concepts, per layer (a section of the Concepts
page)."""
from ...contract import Analysis
from ..concepts import DATA
from .compute import TCAVSpec, compute
from .figures import figures

ANALYSIS = Analysis(spec=TCAVSpec, version="1", compute=compute, figures=figures, inputs=(DATA,))
ANALYSES = [ANALYSIS]
