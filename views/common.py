"""Shared pieces of the app's pages: URL state, the model choice, downloads, saving findings.

Not a page itself (st.navigation in app.py lists the pages)."""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlencode

import streamlit as st

from analysis import WorkbenchError
from analysis.export import html_report, item_from_result, to_csv
from analysis.runner import RunOutcome, get_store
from analysis.settings import review_mode
from analysis.untrusted import md_escape

MAX_QUERY_CHARS = 40_000


@dataclass(frozen=True)
class ModelChoice:
    model: str
    revision: str
    dtype: str
    device: str
    bos: str = "auto"


def require_model() -> ModelChoice:
    """The sidebar's model, or a hint and a stop when there is none."""
    model = choice()
    if model is None:
        st.info("Pick a model in the sidebar.")
        st.stop()
    return model


def spec_from_link(spec_cls, fields: tuple[str, ...], defaults: dict | None = None):
    """(query dict, spec) from this page's URL fields, `defaults` under them (but no default text under a link's
    token ids: those replay what ran). A link that does not validate gets a message and the defaults."""
    defaults = defaults or {}
    try:
        qp = query()
        data = {k: qp[k] for k in fields if k in qp}
        return qp, spec_cls.from_dict(data if "token_ids" in data else {**defaults, **data})
    except WorkbenchError as e:
        show_error(f"This link's settings are not valid: {e}")
        return {}, spec_cls(**defaults)


def store():
    return get_store()


def show_error(e: Exception | str, where=None) -> None:
    """A WorkbenchError's message (which may quote what a person typed) as plain text in an error box: no
    Markdown in it renders, so nothing is fetched and no link is live."""
    (where or st).error(md_escape(str(e)))


def app_url(page: bool = True) -> str:
    """This page's address without the query (what a share link adds its query to), or with `page=False` the
    app's base address: scheme, host, port and the server's base path (`server.baseUrlPath`, or a proxy's
    prefix), without the page's path. Links are judged against the base (analysis.untrusted.app_link), so a
    finding's link to /lens is live on /findings and in every export."""
    url = (st.context.url or "").split("?", 1)[0].split("#", 1)[0].rstrip("/")
    if page or not url:
        return url
    # st.context.url is the browser's address with the page's path taken off and the current page's url path
    # (as st.navigation registered it) put back: take that path off again
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    pages = ctx.pages_manager.get_pages() if ctx is not None else {}
    here = pages.get(ctx.pages_manager.current_page_script_hash, {}) if ctx is not None else {}
    path = here.get("url_pathname") or ""
    return url.removesuffix(f"/{path}") if path else url


def choice() -> ModelChoice | None:
    return st.session_state.get("model_choice")


TOKENIZER_KEY = "tok"  # the link's key for the fingerprint of the tokenizer that made its token ids


def tokenizer_of_choice() -> str | None:
    """The fingerprint of the sidebar model's tokenizer (None where it is not known: a review-mode record from before
    it was kept)."""
    return (st.session_state.get("model_summary") or {}).get("tokenizer")


def query() -> dict[str, str]:
    """The query string as a dict (last value of each key), refused whole if it is absurdly large."""
    qp = st.query_params.to_dict()
    if sum(len(k) + len(v) for k, v in qp.items()) > MAX_QUERY_CHARS:
        raise WorkbenchError("This link is too long to be one of ours.", hint="Open the app without it.")
    return qp


MODEL_KEYS = ("model", "revision", "dtype", "device", "bos")


def sync_url(params: dict[str, object]) -> None:
    """Make the URL hold exactly these page params besides the sidebar's model params (a page switch leaves
    no other page's state behind)."""
    qp = st.query_params
    for k in list(qp.keys()):
        if k not in params and k not in MODEL_KEYS:
            del qp[k]
    for k, v in params.items():
        v = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
        if v == "":
            if k in qp:
                del qp[k]
        elif qp.get(k) != v:
            qp[k] = v


def share_link() -> str:
    return f"{app_url()}?{urlencode(st.query_params.to_dict())}"


def spec_params(spec) -> dict[str, object]:
    d = spec.to_dict()
    return {k: v for k, v in d.items() if k not in MODEL_KEYS}


def downloads(outcome: RunOutcome, figures: dict, title: str, link: str) -> None:
    c1, c2 = st.columns(2)
    c1.download_button("Download CSV", to_csv(outcome.result.table), file_name=f"{outcome.spec.analysis}-"
                       f"{outcome.key[:8]}.csv", mime="text/csv", key=f"csv-{outcome.key}")
    report = html_report(title, [item_from_result(title, outcome.spec.analysis, outcome.key, outcome.spec.to_dict(),
                                                  outcome.result, link=link, figures=figures)],
                         app_url=app_url())
    c2.download_button("Download HTML report", report.encode(), file_name=f"{outcome.spec.analysis}-"
                       f"{outcome.key[:8]}.html", mime="text/html", key=f"html-{outcome.key}")


def save_finding(outcome: RunOutcome, link: str) -> None:
    if review_mode():  # the store is read-only here: findings are written in a computing app
        return
    with st.expander("Save as a finding", expanded=False):
        with st.form(f"finding-{outcome.key}", clear_on_submit=True):
            title = st.text_input("Title", max_chars=500)
            notes = st.text_area("Notes", max_chars=50_000)
            author = st.text_input("Author", max_chars=200)
            if st.form_submit_button("Save finding"):
                try:
                    fid = store().add_finding(title, notes, author, runs=[outcome.key], links=[link])
                except WorkbenchError as e:
                    show_error(e)
                else:
                    st.success(f"Saved finding {fid}. It is listed on the Findings page.")


def session_alive_check():
    """A check, callable from any thread, of whether this script's browser session is still connected (None when
    not under a server). A closed tab stops its script before Streamlit marks the session gone, and a rerun stops
    it too (fast reruns), so the script cannot tell the two apart; the run asks this instead (analysis.jobs)."""
    from streamlit.runtime import exists, get_instance
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    if ctx is None or not exists():
        return None
    runtime, sid = get_instance(), ctx.session_id
    return lambda: runtime.is_active_session(sid)


def session_id() -> str:
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    return ctx.session_id if ctx is not None else "local"


WATCHED = "_watched_runs"  # session-state key: how many runs of each analysis this rerun has watched so far


def watch_run(spec, model: ModelChoice, est=None, submitted: bool = False) -> RunOutcome:
    """Run `spec` through the store on its own thread (analysis.jobs) and watch it: a progress bar with what it is
    doing, the time so far and the time left, and a Stop button. A rerun of the page while it runs (Run pressed
    again, a click elsewhere) joins the run in flight instead of starting it over; Stop cancels it (nothing is
    stored, the model is freed) and the page then waits for Run; a closed tab stops it too."""
    from analysis import jobs
    from analysis.estimate import fmt_seconds
    from analysis.runner import run

    key = f"{spec.to_json()}|{model.device}|{store().path}"
    who = session_id()
    stopped = st.session_state.setdefault("stopped_runs", set())
    stop_slot, bar_slot = st.empty(), st.empty()
    counts = st.session_state.setdefault(WATCHED, {})  # a page may run one analysis twice (app.py clears it)
    n = counts[spec.analysis] = counts.get(spec.analysis, 0) + 1
    if stop_slot.button("Stop", key=f"stop-{spec.analysis}-{n}", icon=":material/stop_circle:",
                        help="Stop this run: nothing is stored."):
        if (job := jobs.running(key)) is not None:
            job.stop(who)
        stopped.add(key)
    if key in stopped and not submitted:
        stop_slot.empty()
        st.info("Stopped: nothing was stored.")
        if not st.button("Run it again", key=f"again-{spec.analysis}-{n}"):
            st.stop()
    stopped.discard(key)
    seconds = getattr(est, "total_seconds", None) or getattr(est, "seconds", None)
    job, _ = jobs.start(key, who, lambda progress: run(spec, store=store(), device=model.device, progress=progress))
    alive = session_alive_check()  # None when not under a server (AppTest, bare mode): nobody can leave
    while not job.done.wait(0.25):
        if alive is not None and not alive():
            job.stop(who, "The browser tab that asked for this run has closed; it was stopped.")
            break
        job.watch(who, alive)
        left = job.time_left(seconds)
        bar_slot.progress(job.frac, text=f"{job.what} · {fmt_seconds(job.elapsed)} so far"
                          + (f" · ≈ {fmt_seconds(left)} left" if left is not None else ""))
    job.done.wait()
    stop_slot.empty()
    bar_slot.empty()
    if job.error is not None:
        raise job.error
    return job.outcome


def status_line(outcome: RunOutcome) -> None:
    rec = outcome.record
    how = "from the store" if outcome.hit else f"computed in {rec.duration_s or 0:.2f} s"
    st.caption(f"Run `{outcome.key}` · {how}" + (" · review mode" if review_mode() else ""))


def show_estimate(spec, model: ModelChoice, slot=None, smaller: dict | None = None) -> None:
    """The run's memory and time estimate (beside the Run button when the page has one), and whether the page
    chose smaller settings than the defaults for this model; a run that cannot fit free memory is refused here."""
    from analysis import load_model
    from analysis.estimate import check_fits, check_time, fmt_seconds
    from analysis.registry import get_analysis
    from analysis.runner import estimate_defaults, estimate_unstored, resolve_tokens
    from analysis.settings import max_run_seconds

    handle = load_model(spec.model, revision=spec.revision or None, device=model.device, dtype=spec.dtype)
    analysis = get_analysis(spec.analysis)
    est = estimate_unstored(analysis, resolve_tokens(spec, handle), handle, store())
    if est is None:
        return None
    text = f"Estimated {est.describe()}"
    chosen, full, _ = (smaller or {}).get(spec.analysis, ({}, 0.0, 0.0))
    if chosen and all(getattr(spec, k) == (tuple(v) if isinstance(v, list) else v) for k, v in chosen.items()):
        defaults = type(spec)()
        what = ", ".join(f"{k} {_short(v)} (default {_short(getattr(defaults, k))})" for k, v in chosen.items())
        try:  # the defaults on the same basis as this run's figure (this machine's pace and its finished runs)
            took = f"≈ {fmt_seconds(estimate_defaults(analysis, spec, chosen, handle, store()).total_seconds)}"
        except WorkbenchError:
            took = f"≈ {fmt_seconds(full)} on 2 CPU cores"
        text += (f"  \nSmaller settings than the defaults, chosen for this model's size: {what}; the defaults would "
                 f"take {took} (this run: ≈ {fmt_seconds(est.total_seconds)}).")
    (slot or st).caption(text)
    check_fits(est)
    check_time(est, max_run_seconds())
    return est


def _short(v) -> str:
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(map(str, v)) + ")" if len(v) <= 6 else f"({len(v)} items)"
    return str(v)


def run_or_stop(make_spec, model: ModelChoice, slot=None, smaller: dict | None = None,
                submitted: bool = False) -> RunOutcome:
    """Build the spec (`make_spec()`), validate it as a link or the CLI would, show its estimate and run it
    through the store, watched (`watch_run`: progress, time left, Stop); a bad input gets its message and the page
    stops there (nothing is stored). `submitted`: the page's Run button was pressed in this rerun."""
    from analysis.runner import run

    try:
        spec = make_spec()
        spec = type(spec).from_dict(spec.to_dict())  # the same validation as a link or the CLI
        if review_mode():
            return run(spec, store=store(), device=model.device, allow_compute=False)
        est = show_estimate(spec, model, slot, smaller)
        return watch_run(spec, model, est, submitted)
    except WorkbenchError as e:
        show_error(e)
        st.stop()


def share_and_export(outcome: RunOutcome, params: dict, figures: dict, title: str) -> None:
    """Write the page's state to the URL, then the link, the run's status, downloads and "save as a finding"."""
    sync_url(params)
    link = share_link()
    st.subheader("Share and export")
    st.code(link, language=None)
    status_line(outcome)
    downloads(outcome, figures, title, link)
    save_finding(outcome, link)
