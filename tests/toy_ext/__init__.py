"""A toy analysis added the way any analysis is: one package with an `ANALYSES` list (here outside analysis/, named
by WORKBENCH_ANALYSES, as a lab's own analyses would be)."""
from analysis.contract import Analysis, Page, standard_page

from .norms import ResidualNormSpec, compute, figures

PAGE = Page(title="Residual norms", url_path="norms", order=90,
            render=standard_page(ResidualNormSpec, figures, defaults={"prompt": "The capital of France is"}))
ANALYSIS = Analysis(spec=ResidualNormSpec, version="1", compute=compute, figures=figures, page=PAGE)
ANALYSES = [ANALYSIS]
