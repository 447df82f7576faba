"""The page context: what the app hands an analysis's page (`contract.Page.render(ctx)`).

A page lives in its analysis's package but imports no streamlit: it gets the UI toolkit and the shared pieces
here — the model choice, the link's spec and typed view state, widgets generated from the spec's field metadata,
the runner with a progress bar, and share/export — so analysis/ stays importable without the UI.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

import streamlit as st

from analysis import WorkbenchError
from analysis.contract import Analysis, ViewState, Widget
from analysis.estimate import smaller_defaults
from analysis.models import display_name
from analysis.registry import get_analysis
from analysis.runner import RunOutcome
from analysis.specs import MAX_TOKENS, Spec
from views import common

MODEL_FIELDS = ("model", "revision", "dtype")


def default_kind(typ, meta: dict) -> str:
    """The widget a field gets when its page does not say: from its type and metadata."""
    origin = typing.get_origin(typ)
    if typ is bool:
        return "checkbox"
    if origin is tuple:
        return "multiselect" if "choices" in meta else "text"
    if "choices" in meta:
        return "select"
    if typ in (int, float):
        return "number"
    return "text_area" if meta.get("max_len", 0) > 2_000 else "text"


class PageContext:
    """Everything a page needs besides its own spec and figures. `st` is the UI toolkit (streamlit)."""

    st = st

    def __init__(self, analyses: list[Analysis]):
        self.analyses = analyses
        self._slot = None  # the caption beside the Run button (the estimate goes there)
        self._submitted = False  # the Run button was pressed in this rerun
        self._smaller: dict[str, tuple[dict, float, float]] = {}  # analysis -> settings chosen for the model

    # -- the model and the link ------------------------------------------------------------------------------
    def require_model(self) -> common.ModelChoice:
        return common.require_model()

    def start(self, title: str, caption: str = "") -> common.ModelChoice:
        """The page's title and caption, then the sidebar's model (or a hint and a stop when there is none)."""
        st.title(title)
        if caption:
            st.caption(caption)
        return common.require_model()

    def query(self) -> dict[str, str]:
        try:
            return common.query()
        except WorkbenchError:
            return {}

    def link(self, spec_cls: type[Spec], defaults: dict | None = None) -> Spec:
        """The spec this page's link describes: every spec field the link carries (a field a link writes is a
        field it reads), the defaults under them (smaller ones for a large model, see `smaller`); a link that does
        not validate gets a message and the defaults."""
        defaults = {**(defaults or {}), **self.smaller(spec_cls, defaults or {})}
        spec = common.spec_from_link(spec_cls, [f for f in spec_cls.field_names() if f not in MODEL_FIELDS],
                                     defaults)[1]
        return self.own_token_ids(spec, defaults)

    def own_token_ids(self, spec: Spec, defaults: dict) -> Spec:
        """The link's spec with token ids only where they belong to the sidebar model's tokenizer: the link names
        the tokenizer that made its ids (`tok`, its fingerprint); for another one (a model switch, a link made
        with another model) they are made again from the link's text, and said so; ids with no text are
        refused with a message (the page starts from its defaults)."""
        made_by, current = self.query().get(common.TOKENIZER_KEY), common.tokenizer_of_choice()
        if not spec.holds_token_ids() or current is None or made_by == current:
            return spec
        model = common.choice()
        try:
            fresh = spec.without_token_ids()
        except WorkbenchError as e:
            common.show_error(f"This link's token ids were made by another tokenizer than that of "
                              f"{display_name(model.model)}, so they cannot be replayed on it: {e} Open the link "
                              "with the model it was made with, or give the text.")
            return type(spec).from_dict(defaults)
        st.info(f"The token ids in this page's link were made by another model's tokenizer; the text was tokenised "
                f"again for {display_name(model.model)}.", icon=":material/sync:")
        return fresh

    def smaller(self, spec_cls: type[Spec], defaults: dict) -> dict:
        """The analysis's smaller settings for the sidebar's model when its defaults would run longer than a
        minute on 2 CPU cores (contract.Analysis.smaller); remembered so the Run button's caption can say so."""
        model, summary = common.choice(), st.session_state.get("model_summary")
        if model is None or not summary:
            return {}
        qp = self.query()  # what the link gives is kept, and the rungs are estimated with it
        given = {k: qp[k] for k in spec_cls.field_names() if k in qp and k not in (*MODEL_FIELDS, "bos")}
        base = {**defaults, **given, "model": model.model, "revision": model.revision, "dtype": model.dtype,
                "bos": model.bos}
        try:
            chosen, full, took = smaller_defaults(get_analysis(spec_cls.analysis), summary, base, keep=set(given))
        except WorkbenchError:
            return {}
        if chosen:
            self._smaller[spec_cls.analysis] = (chosen, full, took)
        return chosen

    def run_button(self, label: str = "Run") -> None:
        """The form's submit button, with the run's memory and time estimate beside it."""
        left, right = st.columns([1, 6], vertical_alignment="center")
        self._submitted = left.form_submit_button(label)
        self._slot = right.empty()

    def view(self, view_cls: type[ViewState]) -> ViewState:
        """The page's view state (not part of a spec) from the link; values that do not parse are defaults."""
        return view_cls.from_query(self.query())

    def error(self, e: Exception | str) -> None:
        """A message that may quote what a person typed, shown as plain text (no Markdown renders)."""
        common.show_error(e)

    def store(self):
        return common.store()

    def choose(self, view: ViewState, name: str, label: str, options, *, slot=None, fallback=None,
               kind: str = "select", format_func=str):
        """The widget for one view-state field among the options a result offers (the link's value when it is one
        of them, else `fallback`, else the first); keyed by the field's name, so `share(..., view=...)` writes back
        what it shows. kind: select | radio | slider (a select_slider)."""
        options = list(options)
        value = view.pick(name, options, fallback)
        slot = slot or st
        if kind == "slider":
            return slot.select_slider(label, options=options, value=value, key=name, format_func=format_func)
        if kind == "radio":
            return slot.radio(label, options, index=options.index(value), key=name, format_func=format_func,
                              horizontal=True)
        return slot.selectbox(label, options, index=options.index(value), key=name, format_func=format_func)

    def sections(self, page: str) -> list[Analysis]:
        return sorted([a for a in self.analyses if a.page is not None and a.page.section_of == page],
                      key=lambda a: a.page.order)

    # -- widgets from the spec's field metadata --------------------------------------------------------------
    def spec_widgets(self, spec_cls: type[Spec], url: Spec, layout, widgets: dict[str, Widget] | None = None) -> dict:
        """One widget per field named in `layout` (rows of field names; a row is a name or a tuple of names shown
        in columns), each from the field's type and metadata unless `widgets` says otherwise; returns the raw
        values by field name (text for lists: the spec coerces them as it does a link's)."""
        widgets = widgets or {}
        fields = {f.name: f for f in dataclasses.fields(spec_cls)}
        hints = typing.get_type_hints(spec_cls)
        values: dict[str, Any] = {}
        for row in layout:
            names = (row,) if isinstance(row, str) else tuple(row)
            slots = [st] if len(names) == 1 else st.columns(len(names))
            for slot, name in zip(slots, names):
                f = fields[name]
                values[name] = field_widget(slot, name, hints[name], dict(f.metadata), getattr(url, name),
                                            widgets.get(name, Widget()))
        return values

    def make_spec(self, spec_cls: type[Spec], model: common.ModelChoice, url: Spec, values: dict) -> Spec:
        """The spec from the link's fields, the widgets' values over them, and the sidebar's model."""
        data = {**url.to_dict(), **values, "model": model.model, "revision": model.revision, "dtype": model.dtype,
                "bos": model.bos}
        return spec_cls.from_dict(data)

    # -- running, sharing ------------------------------------------------------------------------------------
    def run(self, make_spec, model: common.ModelChoice) -> RunOutcome:
        slot, self._slot = self._slot, None
        submitted, self._submitted = self._submitted, False
        return common.run_or_stop(make_spec, model, slot=slot, smaller=self._smaller, submitted=submitted)

    def run_part(self, make_spec, model: common.ModelChoice) -> tuple[Spec | None, RunOutcome | None]:
        """A second run on a page, below the first (an intervention on a circuit's nodes): (spec, outcome). Unlike
        `run`, what is wrong with it does not stop the page (the rest of it, its link and exports stay): a spec
        that does not validate or does not fit the model gets its message and (None, None); in review mode a run
        the store does not hold is said so, (spec, None)."""
        from analysis import load_model
        from analysis.runner import resolve_tokens, run
        from analysis.settings import review_mode

        try:
            spec = make_spec()
            spec = type(spec).from_dict(spec.to_dict())
            handle = load_model(spec.model, revision=spec.revision or None, device=model.device, dtype=spec.dtype)
            resolve_tokens(spec, handle)  # against this model, before anything runs
        except WorkbenchError as e:
            common.show_error(e)
            return None, None
        if review_mode():
            try:
                return spec, run(spec, store=common.store(), device=model.device, allow_compute=False)
            except WorkbenchError as e:
                st.info(f"Not in the store (review mode shows stored results only): {e}")
                return spec, None
        return spec, self.run(lambda: spec, model)

    def share(self, outcome: RunOutcome, params: dict, figures: dict, title: str,
              view: ViewState | None = None) -> None:
        params = {**params, **(view.to_query() if view is not None else {})}
        spec_cls = type(outcome.spec)
        if any(spec_cls.holds_ids(k, params.get(k)) for k in spec_cls.token_id_fields):
            params[common.TOKENIZER_KEY] = common.tokenizer_of_choice() or ""  # whose ids these are
        common.share_and_export(outcome, params, figures, title)

    def spec_params(self, spec: Spec) -> dict:
        return common.spec_params(spec)


def field_widget(slot, name: str, typ, meta: dict, value, w: Widget):
    """One spec field's widget in `slot` (streamlit or a column); returns its raw value."""
    kind = w.kind or default_kind(typ, meta)
    label = w.label or name.replace("_", " ").capitalize()
    help_ = w.help or meta.get("help")
    fmt = (lambda v: w.labels.get(v, str(v))) if w.labels else str
    options = list(w.options if w.options is not None else meta.get("choices", ()))
    kw = {"help": help_, **({"key": w.key} if w.key else {})}
    if kind == "checkbox":
        return slot.checkbox(label, value=bool(value), **kw)
    if kind in ("select", "radio"):
        index = options.index(value) if value in options else 0
        if kind == "radio":
            return slot.radio(label, options, index=index, format_func=fmt, horizontal=True, **kw)
        return slot.selectbox(label, options, index=index, format_func=fmt, **kw)
    if kind == "multiselect":
        return tuple(slot.multiselect(label, options, default=[v for v in value if v in options], format_func=fmt,
                                      **kw))
    if kind in ("number", "slider"):
        num = float if typ is float else int
        lo, hi = meta.get("min"), meta.get("max")
        step = w.step if w.step is not None else (1 if num is int else None)
        if kind == "slider" and w.span is not None:
            lo, hi = min(w.span[0], value), max(w.span[1], value)
        if kind == "slider":
            return slot.slider(label, num(lo), num(hi), num(value), step=step, **kw)
        return slot.number_input(label, min_value=None if lo is None else num(lo), max_value=None if hi is None
                                 else num(hi), value=num(value), step=step, **kw)
    if kind == "lines":
        text = slot.text_area(label, value="\n".join(map(str, value)), height=w.height, **kw)
        return tuple(line.strip() for line in text.splitlines() if line.strip())
    text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    max_chars = meta.get("max_len") if typ is str and meta.get("max_len", MAX_TOKENS) <= 20_000 else None
    if kind == "text_area":
        return slot.text_area(label, value=text, height=w.height, max_chars=max_chars, **kw)
    return slot.text_input(label, value=text, max_chars=max_chars, **kw)
