"""Sparse features: sparse autoencoders trained here or loaded in SAELens's format, feature pages, feature-level
attribution, steering, and discover-then-name concept bottlenecks (the Features page and its sections)."""
from ...contract import Analysis, Needs
from ..concepts import DATA
from . import attribution, browse, naming, steer
from .figures import features_figures, sae_figures
from .page import PAGE
from .sae import SAESpec, sae_spec
from .sae import compute as compute_sae
from .sae import estimate as estimate_sae

NEEDS_SAE = Needs("sae", lambda spec, got: sae_spec(spec))

SAE = Analysis(spec=SAESpec, version="1", compute=compute_sae, estimate=estimate_sae, page=PAGE, figures=sae_figures,
               smaller=({"max_tokens": 32_768, "steps": 800}, {"max_tokens": 16_384, "steps": 400}))
FEATURES = Analysis(spec=browse.FeaturesSpec, version="1", compute=browse.compute, estimate=browse.estimate,
                    figures=features_figures,
                    inputs=(NEEDS_SAE,))
ENCODE = Analysis(spec=steer.FeatureEncodeSpec, version="1", compute=steer.compute_encode,
                  estimate=steer.estimate_prompt, inputs=(NEEDS_SAE,))
ATTRIBUTION = Analysis(spec=attribution.FeatureAttributionSpec, version="1", compute=attribution.compute,
                       estimate=attribution.estimate, inputs=(NEEDS_SAE,))
STEER = Analysis(spec=steer.SteerSpec, version="1", compute=steer.compute_steer, estimate=steer.estimate_prompt,
                 inputs=(NEEDS_SAE, Needs("probes", steer.steer_probes_spec)))
NAMES = Analysis(spec=naming.FeatureNamesSpec, version="1", compute=naming.compute, estimate=naming.estimate,
                 inputs=(DATA, NEEDS_SAE, Needs("bottleneck", naming.probe_bottleneck_spec)))
ANALYSES = [SAE, FEATURES, ENCODE, ATTRIBUTION, STEER, NAMES]
