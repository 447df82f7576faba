"""The Model page: tokenization, top-k next-token predictions and every head's attention pattern."""
from ...contract import Analysis
from .compute import compute, estimate
from .figures import figures
from .page import PAGE
from .spec import ModelViewSpec

ANALYSIS = Analysis(spec=ModelViewSpec, version="1", compute=compute, figures=figures, page=PAGE, estimate=estimate)
ANALYSES = [ANALYSIS]
