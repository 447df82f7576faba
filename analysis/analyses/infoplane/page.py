"""The Information-plane page: per layer, the entropy of the representation and its mutual information with the
input and with a target, over the default model's training checkpoints (or any list)."""
from __future__ import annotations

from dataclasses import dataclass

from ...contract import Page, ViewState, Widget
from .compute import CAVEAT, InfoPlaneSpec
from .figures import info_plane

ESTIMATORS = {"renyi": "matrix-based Rényi", "dse": "diffusion spectral"}
WIDGETS = {
    "dataset": Widget("Text", "radio", labels={"concepts": "shipped concept sentences", "text": "my text"}),
    "target": Widget("Target Y"),
    "n_samples": Widget("Token positions sampled", step=50),
    "text": Widget("My text (one passage per line)", "text_area", height=90),
    "normalize": Widget("Unit-length residuals"),
    "drop_first": Widget("Drop position 0"),
    "alpha": Widget("Rényi α", step=0.01),
    "diffusion_t": Widget("Diffusion time"),
    "checkpoints": Widget("Checkpoints in training order, one per line (empty: the shipped ones)", "lines",
                          height=70),
}
LAYOUT = [("dataset", "target", "n_samples"), "text", ("normalize", "drop_first", "alpha", "diffusion_t", "seed"),
          "checkpoints"]


@dataclass(frozen=True)
class InfoPlaneView(ViewState):
    view_estimator: str = "renyi"


def render(ctx) -> None:
    st = ctx.st
    st.title("Information plane")
    st.warning(CAVEAT, icon=":material/info:")
    model = ctx.require_model()
    url, view = ctx.link(InfoPlaneSpec), ctx.view(InfoPlaneView)
    with st.form("infoplane"):
        values = ctx.spec_widgets(InfoPlaneSpec, url, LAYOUT, WIDGETS)
        ctx.run_button()
    outcome = ctx.run(lambda: ctx.make_spec(InfoPlaneSpec, model, url, values), model)

    table = outcome.result.table
    names = list(ESTIMATORS)
    estimator = ctx.choose(view, "view_estimator", "Estimator", names, kind="radio", format_func=ESTIMATORS.get)
    plane = info_plane(table, estimator)
    st.plotly_chart(plane, width="stretch")
    st.caption(f"{outcome.result.meta['n_samples']} token positions · Y = {outcome.result.meta['target']} · X = the "
               "input embedding · T = the residual after each block")
    st.dataframe(table[table["estimator"] == estimator], hide_index=True, width="stretch")

    ctx.share(outcome, ctx.spec_params(outcome.spec), {"plane": plane},
              f"Information plane: Y = {outcome.spec.target}", view=InfoPlaneView(estimator))


PAGE = Page(title="Information plane", render=render, url_path="infoplane", icon=":material/timeline:", order=40)
