"""Findings: what the team saved, with links back to the views, for review; exported together."""
from __future__ import annotations

import streamlit as st

from analysis import WorkbenchError
from analysis.export import findings_report
from analysis.untrusted import app_link, md_escape
from views.common import app_url, show_error, store

st.title("Findings")
try:
    df = store().findings()
except WorkbenchError as e:  # the store is busy or unreadable: say so, change nothing
    show_error(e)
    st.stop()
if df.empty:
    st.info("No findings yet. Save one from an analysis page (\"Save as a finding\").")
    st.stop()

base = app_url(page=False)  # links are judged against the app's base address, not this page's (/findings)
html, csv = findings_report(store(), base)
c1, c2 = st.columns(2)
c1.download_button("Download all as HTML", html.encode(), file_name="findings.html", mime="text/html")
c2.download_button("Download all as CSV", csv, file_name="findings.csv", mime="text/csv")

for f in df.itertuples(index=False):
    with st.container(border=True):
        # what a person typed is shown as typed: no Markdown renders (an image in a title would be fetched by
        # every reader's browser), and a link is a button only when it leads into this app
        st.subheader(md_escape(f.title), anchor=False)
        st.caption(f"{md_escape(f.author or 'anonymous')} · {f.created:%Y-%m-%d %H:%M} · runs: "
                   + ", ".join(md_escape(k) for k in f.runs))
        if f.notes:
            st.text(f.notes)
        for link in f.links:
            if app_link(link, base):
                st.link_button("Open the view", link)
            else:
                st.text(f"Link (not into this app, so not opened from here): {link}")
