"""Findings: what the team saved, with links back to the views, for review; exported together."""
from __future__ import annotations

import streamlit as st

from analysis import WorkbenchError
from analysis.export import findings_report
from views.common import store

st.title("Findings")
try:
    df = store().findings()
except WorkbenchError as e:  # the store is busy or unreadable: say so, change nothing
    st.error(str(e))
    st.stop()
if df.empty:
    st.info("No findings yet. Save one from an analysis page (\"Save as a finding\").")
    st.stop()

html, csv = findings_report(store())
c1, c2 = st.columns(2)
c1.download_button("Download all as HTML", html.encode(), file_name="findings.html", mime="text/html")
c2.download_button("Download all as CSV", csv, file_name="findings.csv", mime="text/csv")

for f in df.itertuples(index=False):
    with st.container(border=True):
        st.subheader(f.title, anchor=False)
        st.caption(f"{f.author or 'anonymous'} · {f.created:%Y-%m-%d %H:%M} · runs: "
                   + ", ".join(f"`{k}`" for k in f.runs))
        if f.notes:
            st.text(f.notes)
        for link in f.links:
            if link.startswith(("http://", "https://", "?")):  # never a javascript: or data: link
                st.link_button("Open the view", link)
