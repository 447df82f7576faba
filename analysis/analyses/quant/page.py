"""The Quantization page: measured damage of quantizing each weight matrix, layer and matrix type (and each
block's input) in each format; HAWQ-V2's predicted sensitivity beside it with their rank correlation; and a
mixed-precision assignment under a size budget, measured."""
from __future__ import annotations

from dataclasses import dataclass

from kernels.quant import WEIGHT_FORMATS

from ...contract import Page, ViewState, Widget
from .compute import ALLOC_FORMATS, TEXT_FIELDS, QuantAllocationSpec, QuantSensitivitySpec
from .figures import pareto_plot, quant_heatmap, quant_scatter

METRICS = {"kl": "KL to full precision", "delta_loss": "Δ loss", "top1_agreement": "top-1 agreement"}
WIDGETS = {
    "formats": Widget("Weight formats", "multiselect", options=WEIGHT_FORMATS),
    "activation_formats": Widget("Activation formats (residual entering each block, per token)", "multiselect",
                                 options=("int8-channel", "int4-channel", "fp8_e4m3-channel", "fp8_e5m2-channel")),
    "units": Widget("Quantize at a time"),
    "n_seqs": Widget("Sequences of the model's own text"),
    "seq_len": Widget("Tokens per sequence"),
    "tol": Widget("Hutchinson tolerance (standard error / trace)", step=0.01),
    "max_samples": Widget("Hutchinson samples at most"),
}
LAYOUT = ["formats", ("activation_formats", "units", "n_seqs"), ("seq_len", "tol", "max_samples")]


@dataclass(frozen=True)
class QuantView(ViewState):
    budget_bits: float = QuantAllocationSpec.budget_bits  # the allocation's size budget (its other fields follow)
    view_kind: str = ""
    view_metric: str = ""
    view_format: str = ""
    alloc_formats: tuple[str, ...] = ALLOC_FORMATS  # the formats the allocation assigns


def run_query(analysis: str, spec: dict) -> dict | None:
    """The Quantization page's link fields (besides the model's) that open a stored traces or allocation run
    there: the text and Hutchinson settings both read, and an allocation's budget and formats (the sweep keeps
    the page's defaults); None for another analysis."""
    if analysis not in ("quant_traces", "quant_allocation"):
        return None
    query = {f: spec[f] for f in TEXT_FIELDS if f in spec}
    if analysis == "quant_allocation":
        query["budget_bits"] = spec.get("budget_bits", QuantAllocationSpec.budget_bits)
        query["alloc_formats"] = spec.get("formats", ALLOC_FORMATS)
    return query


def render(ctx) -> None:
    st = ctx.st
    model = ctx.start("Quantization",
                      "Which matrices tolerate fewer bits: measured on the model's own text, predicted by the Hessian "
                      "trace (HAWQ-V2), and a mixed-precision assignment under a size budget.")
    url, view = ctx.link(QuantSensitivitySpec), ctx.view(QuantView)
    with st.form("quant"):
        values = ctx.spec_widgets(QuantSensitivitySpec, url, LAYOUT, WIDGETS)
        budget = st.number_input("Size budget for the allocation (average bits per weight)", 1.0, 32.0,
                                 min(max(view.budget_bits, 1.0), 32.0), step=0.25)
        ctx.run_button()
    values["min_samples"] = min(url.min_samples, int(values["max_samples"]))
    outcome = ctx.run(lambda: ctx.make_spec(QuantSensitivitySpec, model, url, values), model)
    result = outcome.result
    table = result.table
    m = result.meta
    st.caption(f"{m['n_tokens']:,} tokens of the model's own text · full-precision loss {m['full_loss']:.3f} nats · "
               f"{m['n_units']} weight matrices ({m['n_params']:,} parameters; tied weights once) · Hutchinson "
               f"{m['hutchinson_samples']} samples" + (f" · {m['negative_traces']} negative traces: the second-order "
                                                      "model does not hold there" if m["negative_traces"] else ""))

    kinds = [k for k in ("layer", "type", "matrix", "activation") if (table["unit_kind"] == k).any()]
    v1, v2, v3 = st.columns(3)
    kind = ctx.choose(view, "view_kind", "Heatmap rows", kinds, slot=v1)
    metrics = list(METRICS)
    metric = ctx.choose(view, "view_metric", "Measure", metrics, slot=v2, format_func=METRICS.get)
    corr = result.extra["correlation"]
    fmts = list(corr["format"])
    heat = quant_heatmap(table, kind, metric)
    st.plotly_chart(heat, width="stretch")
    figures = {"heatmap": heat}
    fmt = ""
    if fmts:
        fmt = ctx.choose(view, "view_format", "Predicted vs measured, format", fmts, slot=v3)
        scatter = quant_scatter(result.extra["omega"], corr, fmt)
        st.plotly_chart(scatter, width="stretch")
        figures["predicted_vs_measured"] = scatter
        st.dataframe(corr, hide_index=True, width="stretch")
        st.caption("Spearman rank correlation between Ω = Tr(H)/n · ‖Q(W) − W‖² and the measured KL, per format, "
                   "over the matrices.")
    else:
        st.info("Predicted against measured compares single matrices: add 'matrix' to 'Quantize at a time' to see "
                "it (the Hessian traces per matrix are below either way).")
    with st.expander("Hessian traces per matrix (with 95% intervals)"):
        st.dataframe(result.extra["traces"], hide_index=True, width="stretch")

    st.subheader("Bit allocation")
    s = outcome.spec
    alloc = ctx.run(lambda: QuantAllocationSpec(  # the sweep's text and Hessian traces (one stored traces run)
        model=s.model, revision=s.revision, dtype=s.dtype, formats=tuple(view.alloc_formats),
        budget_bits=float(budget), **{f: getattr(s, f) for f in TEXT_FIELDS}), model)
    am, measured = alloc.result.meta, alloc.result.extra["measured"]
    pareto = pareto_plot(alloc.result.extra["pareto"], measured)
    st.plotly_chart(pareto, width="stretch")
    figures["pareto"] = pareto
    uniform = measured[measured["assignment"].str.startswith("all ") & measured["fits_budget"]]
    best = uniform.loc[uniform["kl_held_out"].idxmin()] if len(uniform) else None
    st.caption(
        f"{am['n_assignments']:,} monotone assignments of {', '.join(am['formats'])} scored by total Ω, each "
        "matrix's Tr(H)/n taken at the upper end of its 95% interval (a noisy or negative estimate cannot make a "
        "matrix look insensitive" + (f"; {am['n_floored']} at or below zero floored at the least sensitive "
                                     "matrix's" if am["n_floored"] else "") + "). "
        f"Chosen: `{am['chosen']}`, {am['chosen_avg_bits']:.3f} bits per weight (budget {am['budget_bits']}), "
        f"KL {am['chosen_kl_held_out']:.4g} on held-out text"
        + (f" against {best['kl_held_out']:.4g} for {best['assignment']}, the best single format that fits."
           if best is not None else " (no single format fits this budget)."))
    st.dataframe(measured, hide_index=True, width="stretch")
    st.caption("Each candidate (the lowest predicted Ω under the budget with every format, then without the "
               "fewest-bit formats, since Ω's quadratic model fails for two-bit errors; and each format alone) is "
               "measured on the text the traces were drawn on (kl_calibration), the lowest that fits the budget "
               "is chosen, and all are measured again on held-out text the model sampled with another seed "
               "(kl_held_out, Δ loss, top-1 agreement): the held-out figures are the ones to quote.")
    st.dataframe(alloc.result.table, hide_index=True, width="stretch")
    st.caption("The chosen assignment per matrix: Tr(H)/n with its 95% interval (low, high), the sensitivity the "
               "allocation used (the interval's upper end) and Ω = sensitivity · ‖Q(W) − W‖² in its format.")

    ctx.share(outcome, ctx.spec_params(outcome.spec), figures, "Quantization sensitivity",
              view=QuantView(float(budget), kind, metric, fmt, tuple(view.alloc_formats)))


PAGE = Page(title="Quantization", render=render, url_path="quant", icon=":material/compress:", order=70)
