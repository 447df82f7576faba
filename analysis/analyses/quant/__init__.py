"""Quantization sensitivity (measured per matrix, layer and type, predicted by HAWQ-V2) and the mixed-precision
bit allocation, both on the Quantization page, and the Hessian traces (Hutchinson) both build on: one stored
traces run serves every format and unit choice of a sweep and every budget of an allocation."""
from ...contract import Analysis, Needs
from .compute import (
    HessianTracesSpec,
    QuantAllocationSpec,
    QuantSensitivitySpec,
    compute_allocation,
    compute_sensitivity,
    compute_traces,
    estimate_allocation,
    estimate_sensitivity,
    estimate_traces,
    traces_spec,
)
from .figures import allocation_figures, sensitivity_figures, traces_figures
from .page import PAGE

TEXT_LADDER = ({"n_seqs": 8, "seq_len": 32}, {"n_seqs": 4, "seq_len": 32, "max_samples": 30},
               {"n_seqs": 2, "seq_len": 16, "max_samples": 10})
# version 2: each trace's 95% interval (Student's t over the Hutchinson samples) beside its standard error
TRACES = Analysis(spec=HessianTracesSpec, version="2", compute=compute_traces, figures=traces_figures,
                  estimate=estimate_traces, smaller=TEXT_LADDER)
# version 2: the Hessian traces come from their own stored run, drawn with faster Rademacher vectors
# version 3: the traces table it shows carries each trace's 95% interval
SENSITIVITY = Analysis(spec=QuantSensitivitySpec, version="3", compute=compute_sensitivity,
                       figures=sensitivity_figures, page=PAGE, inputs=(Needs("traces", traces_spec),),
                       estimate=estimate_sensitivity, smaller=(
                           {"formats": ("int8-channel", "int4-g128", "int4-channel", "fp8_e4m3-channel"),
                            "units": ("layer", "type"), "n_seqs": 8, "seq_len": 32},
                           {"formats": ("int8-channel", "int4-g128"), "activation_formats": ("int8-channel",),
                            "units": ("layer", "type"), "n_seqs": 4, "seq_len": 32, "max_samples": 30},
                           {"formats": ("int8-channel", "int4-g128"), "activation_formats": (), "units": ("type",),
                            "n_seqs": 2, "seq_len": 16, "max_samples": 10}))
# version 3: allocated by the upper end of each trace's interval; candidates (lowest predicted Omega with every
# format and without the fewest-bit ones, each format alone) measured on the traces' text, the lowest KL chosen and
# every candidate measured again on held-out text
ALLOCATION = Analysis(spec=QuantAllocationSpec, version="3", compute=compute_allocation, figures=allocation_figures,
                      inputs=(Needs("traces", traces_spec),), estimate=estimate_allocation, smaller=TEXT_LADDER)
ANALYSES = [TRACES, SENSITIVITY, ALLOCATION]
