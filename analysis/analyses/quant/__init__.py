"""Quantization sensitivity (measured per matrix, layer and type, predicted by HAWQ-V2) and the mixed-precision
bit allocation built on it; both on the Quantization page."""
from ...contract import Analysis, Needs
from .compute import (
                      QuantAllocationSpec,
                      QuantSensitivitySpec,
                      compute_allocation,
                      compute_sensitivity,
    estimate_allocation,
    estimate_sensitivity,
                      sensitivity_spec,
)
from .figures import allocation_figures, sensitivity_figures
from .page import PAGE

SENSITIVITY = Analysis(spec=QuantSensitivitySpec, version="1", compute=compute_sensitivity,
                       figures=sensitivity_figures, page=PAGE, estimate=estimate_sensitivity, smaller=(
                           {"formats": ("int8-channel", "int4-g128", "int4-channel", "fp8_e4m3-channel"),
                            "units": ("layer", "type"), "n_seqs": 8, "seq_len": 32},
                           {"formats": ("int8-channel", "int4-g128"), "activation_formats": ("int8-channel",),
                            "units": ("layer", "type"), "n_seqs": 4, "seq_len": 32, "max_samples": 30},
                           {"formats": ("int8-channel", "int4-g128"), "activation_formats": (), "units": ("type",),
                            "n_seqs": 2, "seq_len": 16, "max_samples": 10}))
ALLOCATION = Analysis(spec=QuantAllocationSpec, version="1", compute=compute_allocation, figures=allocation_figures,
                      inputs=(Needs("sensitivity", sensitivity_spec),), estimate=estimate_allocation, smaller=(
                          {"n_seqs": 8, "seq_len": 32}, {"n_seqs": 4, "seq_len": 32, "max_samples": 30},
                          {"n_seqs": 2, "seq_len": 16, "max_samples": 10}))
ANALYSES = [SENSITIVITY, ALLOCATION]
