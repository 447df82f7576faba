"""Quantization sensitivity (measured per matrix, layer and type, predicted by HAWQ-V2) and the mixed-precision
bit allocation built on it; both on the Quantization page."""
from ...contract import Analysis, Needs
from .compute import (
                      QuantAllocationSpec,
                      QuantSensitivitySpec,
                      compute_allocation,
                      compute_sensitivity,
                      sensitivity_spec,
)
from .figures import allocation_figures, sensitivity_figures
from .page import PAGE

SENSITIVITY = Analysis(spec=QuantSensitivitySpec, version="1", compute=compute_sensitivity,
                       figures=sensitivity_figures, page=PAGE)
ALLOCATION = Analysis(spec=QuantAllocationSpec, version="1", compute=compute_allocation, figures=allocation_figures,
                      inputs=(Needs("sensitivity", sensitivity_spec),))
ANALYSES = [SENSITIVITY, ALLOCATION]
