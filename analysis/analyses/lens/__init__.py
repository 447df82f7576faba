"""The logit lens and the tuned lens: every layer's residual decoded as a next-token distribution."""
from ...contract import Analysis, Needs
from ..tuned_lens import TunedLensSpec
from .compute import compute, estimate
from .figures import figures
from .page import PAGE
from .spec import LensSpec


def _tuned_lens(spec: LensSpec, inputs) -> TunedLensSpec | None:
    """The model's tuned lens, trained once with the default settings, when the spec asks for it."""
    if "tuned" not in spec.lenses:
        return None
    return TunedLensSpec(model=spec.model, revision=spec.revision, dtype=spec.dtype)


ANALYSIS = Analysis(spec=LensSpec, version="2", compute=compute, figures=figures, page=PAGE,
                    inputs=(Needs("tuned_lens", _tuned_lens, scaled=True),), estimate=estimate)
ANALYSES = [ANALYSIS]
