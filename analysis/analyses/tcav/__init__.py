"""TCAV through captum.concept: a concept class against random concepts, per layer (a section of the Concepts
page)."""
from ...contract import Analysis
from ..concepts import DATA
from .compute import TCAVSpec, compute
from .figures import figures
from .page import PAGE

ANALYSIS = Analysis(spec=TCAVSpec, version="1", compute=compute, figures=figures, page=PAGE, inputs=(DATA,))
ANALYSES = [ANALYSIS]
