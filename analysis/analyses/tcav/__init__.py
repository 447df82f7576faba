"""TCAV through captum.concept: a concept class against random concepts, per layer (a section of the Concepts
page)."""
from ...contract import Analysis
from ..concepts import DATA
from .compute import TCAVSpec, compute, estimate, spread_layers
from .figures import figures
from .page import PAGE

ANALYSIS = Analysis(spec=TCAVSpec, version="1", compute=compute, figures=figures, page=PAGE, inputs=(DATA,),
                    estimate=estimate, smaller=({"layers": spread_layers(9), "n_inputs": 100},
                                                {"layers": spread_layers(6), "n_inputs": 60, "n_random": 6},
                                                {"layers": spread_layers(4), "n_inputs": 30, "n_random": 4}))
ANALYSES = [ANALYSIS]
