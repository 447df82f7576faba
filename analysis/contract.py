"""The analysis contract: what one analysis declares, so that the runner, the CLI, the export and the app can
all use it without knowing it.

    ANALYSIS = Analysis(
        spec=MySpec,                         # a frozen Spec subclass (its `analysis` name is the registry key)
        version="1",                         # bump whenever the computation's output changes
        compute=compute,                     # compute(session, spec, inputs, progress) -> Result; pure
        figures=figures,                     # figures(result) -> {name: plotly Figure}, for reports
        inputs=(Needs("probes", probes_spec),),  # stored runs (or datasets) it builds on
        page=Page(...),                      # how it shows in the app (optional)
        estimate=estimate,                   # estimate(plan) -> Estimate: peak memory and work, before a run
        smaller=({"n": 100}, {"n": 20}),     # settings for large models, tried in order, each smaller (see below)
    )

`compute` is a pure function of (model session, spec, its resolved inputs, progress): it never calls the
runner, never opens the store and never takes a lock. The runner resolves the declared inputs first (from the
store, or by running them), opens the model session (the lock held for the whole compute) and is the only code
that writes to the store.

`estimate` (analysis/estimate.py) gives the run's peak memory by part and its work from the model's shape and the
spec; the runner refuses a run that does not fit free memory, and the app one estimated past its time limit.

`smaller` is a ladder of settings: when a model is so large that the spec's defaults would take longer than a minute
on the reference machine (2 CPU cores), pages and the command line start from the first rung that fits instead, and
say so (with what the defaults would take, on the same basis as the run's own estimate). A ladder only goes down:
each rung does no more of any kind of work (products, block invocations, other work) than the rung before it, the
first than the defaults, so no machine's pace can make a rung slower than the defaults (tests/test_estimate.py
checks every ladder on a large model); a rung is judged with the fields the user gave, which it never changes. A
rung never cuts a setting below what the analysis's statistics need (patching keeps 6 pairs, the fewest for which
its sign-flip test can reach p < 0.05); a model too large even for the last rung runs the last rung, and its
estimate says how long.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd

from .result import Progress, Result
from .specs import Spec, coerce


@dataclass(frozen=True)
class Needs:
    """A stored run this analysis builds on. `spec(spec, inputs)` derives the input's spec from this one (and
    the inputs resolved before it); it returns None when this spec does not need it, or a dict {input name: spec}
    for several runs of one kind (a feature circuit's SAE at each layer). The runner hands each input's
    `RunOutcome` (its `.key` and `.result`) to compute under its name. With `scaled`, the derived spec's
    fields left at their defaults take the input analysis's smaller settings for a large model (as its page would)."""

    name: str
    spec: Callable[[Spec, dict[str, Any]], Spec | None]
    scaled: bool = False


@dataclass(frozen=True)
class Dataset:
    """A dataset a spec names in one of its fields (the shipped one, or a user's upload kept in the store).
    `load(value, get_stored)` returns the frame; `get_stored(id)` reads an uploaded dataset (or None)."""

    name: str
    load: Callable[[str, Callable[[str], pd.DataFrame | None]], pd.DataFrame]
    field: str = "dataset"


Input = Needs | Dataset
Compute = Callable[[Any, Spec, dict[str, Any], Progress], Result]


# ----------------------------------------------------------------------------------------------------------
# Pages
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Widget:
    """How one spec field shows on a page, where the default (from the field's type and metadata) reads worse.

    kind: text | text_area | lines (a tuple, one item a line) | number | checkbox | select | multiselect | radio |
    slider; `options` replaces the field's choices, `labels` names each option; `span` is a slider's (low, high)
    where the field's bounds are too wide to slide along (widened to hold a link's value)."""

    label: str = ""
    kind: str = ""
    help: str = ""
    labels: dict | None = None
    options: tuple | None = None
    height: int | None = None
    step: float | None = None
    key: str | None = None
    span: tuple | None = None


@dataclass(frozen=True)
class ViewState:
    """The view state of a page that is not part of a spec (selected layer, head, method): one typed object per
    page, read from the link and written back to it in one place. A value that does not parse is the default."""

    @classmethod
    def from_query(cls, query: dict[str, str]):
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in query:
                try:
                    values[f.name] = coerce(f.name, query[f.name], hints[f.name], {})
                except Exception:  # noqa: BLE001 - a view value that does not parse falls back to the default
                    continue
        return cls(**values)

    def to_query(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def pick(self, name: str, options: list, fallback=None):
        """This view's value for `name` if it is one of `options`, else `fallback` (default: the first)."""
        v = getattr(self, name)
        if v in options:
            return v
        return fallback if fallback is not None else (options[0] if options else None)


@dataclass(frozen=True)
class Page:
    """An analysis's place in the app. `render(ctx)` draws the page from a page context the app hands it (the
    UI toolkit, the model choice, the link's state, generated spec widgets, the runner, share and export), so
    nothing in analysis/ imports streamlit and a worker imports every analysis without it.

    `section_of` makes the page a section of another page (the Concepts page's probes, bottleneck, …)."""

    title: str
    render: Callable[[Any], None]
    url_path: str = ""
    icon: str = ":material/analytics:"
    order: int = 100
    section_of: str = ""
    default: bool = False
    defaults: dict = dataclasses.field(default_factory=dict, hash=False)  # spec fields the page starts from


# ----------------------------------------------------------------------------------------------------------
# The entry
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Analysis:
    spec: type[Spec]
    version: str
    compute: Compute
    figures: Callable[[Result], dict] | None = None
    inputs: tuple[Input, ...] = ()
    page: Page | None = None
    description: str = ""
    estimate: Callable[[Any], Any] | None = None  # estimate(plan: estimate.Plan) -> estimate.Estimate
    smaller: tuple[dict, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.analysis

    @property
    def spec_cls(self) -> type[Spec]:
        return self.spec

    @property
    def title(self) -> str:
        return self.description or self.spec.title or self.name


__all__ = ["Analysis", "Dataset", "Input", "Needs", "Page", "ViewState", "Widget"]


def standard_page(spec: type[Spec], figures: Callable[[Result], dict] | None = None, *, title: str = "",
                  defaults: dict | None = None, widgets: dict[str, Widget] | None = None) -> Callable[[Any], None]:
    """A page for an analysis that needs nothing custom: a widget for every field of the spec (generated from its
    metadata), the run, the analysis's figures and its table, share and export."""
    def render(ctx) -> None:
        st = ctx.st
        model = ctx.start(title or spec.title)
        url = ctx.link(spec, defaults)
        fields = [f.name for f in dataclasses.fields(spec) if f.name not in ("model", "revision", "dtype", "token_ids")]
        with st.form(spec.analysis):
            values = ctx.spec_widgets(spec, url, fields, widgets)
            ctx.run_button()
        if "token_ids" in spec.field_names():  # a link's ids replay what ran while its prompt is unchanged
            values["token_ids"] = url.token_ids if values.get("prompt") == getattr(url, "prompt", None) else ()
        outcome = ctx.run(lambda: ctx.make_spec(spec, model, url, values), model)
        figs = figures(outcome.result) if figures is not None else {}
        for fig in figs.values():
            st.plotly_chart(fig, width="stretch")
        st.dataframe(outcome.result.table, hide_index=True, width="stretch")
        ctx.share(outcome, ctx.spec_params(outcome.spec), figs, title or spec.title)

    return render
