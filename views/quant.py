"""Quantization page: measured damage of quantizing each weight matrix, layer and matrix type (and each block's
input) in each format; HAWQ-V2's predicted sensitivity beside it with their rank correlation; and a mixed-precision
assignment under a size budget, measured. Everything runs through the pipeline and lives in the URL."""
from __future__ import annotations

import streamlit as st

from analysis.analyses.quant.compute import ALLOC_FORMATS, QuantAllocationSpec, QuantSensitivitySpec
from analysis.analyses.quant.figures import pareto_plot, quant_heatmap, quant_scatter
from kernels.quant import WEIGHT_FORMATS
from views.common import require_model, run_or_stop, share_and_export, spec_from_link, spec_params

FIELDS = ("formats", "activation_formats", "units", "n_seqs", "seq_len", "tol", "min_samples", "max_samples", "seed")
METRICS = {"kl": "KL to full precision", "delta_loss": "Δ loss", "top1_agreement": "top-1 agreement"}



def _budget(value) -> float:
    try:
        return min(max(float(value), 1.0), 32.0)
    except (TypeError, ValueError):
        return QuantAllocationSpec.budget_bits


st.title("Quantization")
st.caption("Which matrices tolerate fewer bits: measured on the model's own text, predicted by the Hessian trace "
           "(HAWQ-V2), and a mixed-precision assignment under a size budget.")
model = require_model()
qp, url = spec_from_link(QuantSensitivitySpec, FIELDS)

with st.form("quant"):
    formats = st.multiselect("Weight formats", list(WEIGHT_FORMATS), default=list(url.formats))
    c1, c2, c3 = st.columns(3)
    acts = c1.multiselect("Activation formats (residual entering each block, per token)",
                          ["int8-channel", "int4-channel", "fp8_e4m3-channel", "fp8_e5m2-channel"],
                          default=[f for f in url.activation_formats])
    units = c2.multiselect("Quantize at a time", ["matrix", "layer", "type"], default=list(url.units))
    n_seqs = c3.number_input("Sequences of the model's own text", 1, 512, url.n_seqs)
    c4, c5, c6 = st.columns(3)
    seq_len = c4.number_input("Tokens per sequence", 4, 2048, url.seq_len)
    tol = c5.number_input("Hutchinson tolerance (standard error / trace)", 1e-4, 1.0, url.tol, step=0.01,
                          format="%.3f")
    max_samples = c6.number_input("Hutchinson samples at most", 2, 10_000, url.max_samples)
    budget = st.number_input("Size budget for the allocation (average bits per weight)", 1.0, 32.0,
                             _budget(qp.get("budget_bits")), step=0.25)
    st.form_submit_button("Run")

outcome = run_or_stop(lambda: QuantSensitivitySpec(
    model=model.model, revision=model.revision, dtype=model.dtype, formats=tuple(formats),
    activation_formats=tuple(acts), units=tuple(units), n_seqs=int(n_seqs), seq_len=int(seq_len), tol=float(tol),
    min_samples=min(url.min_samples, int(max_samples)), max_samples=int(max_samples), seed=url.seed), model)
result = outcome.result
table = result.table
m = result.meta
st.caption(f"{m['n_tokens']:,} tokens of the model's own text · full-precision loss {m['full_loss']:.3f} nats · "
           f"{m['n_units']} weight matrices ({m['n_params']:,} parameters; tied weights once) · Hutchinson "
           f"{m['hutchinson_samples']} samples" + (f" · {m['negative_traces']} negative traces: the second-order "
                                                  "model does not hold there" if m["negative_traces"] else ""))

kinds = [k for k in ("layer", "type", "matrix", "activation") if (table["unit_kind"] == k).any()]
v1, v2, v3 = st.columns(3)
kind = v1.selectbox("Heatmap rows", kinds, key="view_kind",
                    index=kinds.index(qp["view_kind"]) if qp.get("view_kind") in kinds else 0)
metrics = list(METRICS)
metric = v2.selectbox("Measure", metrics, format_func=METRICS.get, key="view_metric",
                      index=metrics.index(qp["view_metric"]) if qp.get("view_metric") in metrics else 0)
corr = result.extra["correlation"]
fmts = list(corr["format"])
figures = {}
heat = quant_heatmap(table, kind, metric)
st.plotly_chart(heat, width="stretch")
figures["heatmap"] = heat
if fmts:
    fmt = v3.selectbox("Predicted vs measured, format", fmts, key="view_format",
                       index=fmts.index(qp["view_format"]) if qp.get("view_format") in fmts else 0)
    scatter = quant_scatter(result.extra["omega"], corr, fmt)
    st.plotly_chart(scatter, width="stretch")
    figures["predicted_vs_measured"] = scatter
    st.dataframe(corr, hide_index=True, width="stretch")
    st.caption("Spearman rank correlation between Ω = Tr(H)/n · ‖Q(W) − W‖² and the measured KL, per format, over "
               "the matrices.")
else:
    fmt = ""
with st.expander("Hessian traces per matrix"):
    st.dataframe(result.extra["traces"], hide_index=True, width="stretch")

st.subheader("Bit allocation")
alloc = run_or_stop(lambda: QuantAllocationSpec(
    model=model.model, revision=model.revision, dtype=model.dtype, formats=ALLOC_FORMATS, budget_bits=float(budget),
    n_seqs=int(n_seqs), seq_len=int(seq_len), tol=float(tol), min_samples=min(url.min_samples, int(max_samples)),
    max_samples=int(max_samples), seed=url.seed), model)
am = alloc.result.meta
pareto = pareto_plot(alloc.result.extra["pareto"], alloc.result.extra["measured"])
st.plotly_chart(pareto, width="stretch")
figures["pareto"] = pareto
st.caption(f"{am['n_assignments']:,} monotone assignments of {', '.join(am['formats'])} scored; the pick uses "
           f"{am['chosen_avg_bits']:.3f} bits per weight (budget {am['budget_bits']}).")
st.dataframe(alloc.result.extra["measured"], hide_index=True, width="stretch")
st.caption("Predicted (total Ω) and measured damage side by side: the chosen assignment and each format alone.")
st.dataframe(alloc.result.table, hide_index=True, width="stretch")

share_and_export(outcome, {**spec_params(outcome.spec), "budget_bits": budget, "view_kind": kind,
                           "view_metric": metric, "view_format": fmt}, figures, "Quantization sensitivity")
