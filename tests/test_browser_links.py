"""A finding's link in a real browser (issue 26, item 3): saved from /lens, it was "not into this app" on /findings.
Now it is a live link there, and following it opens the lens view with the state it was saved with.

The server and the browser are test_browser.py's fixtures (one server for this module, the default model)."""
from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

from test_browser import page, pytestmark, server  # noqa: F401 - fixtures and the skip when chromium is missing

PROMPT = "The capital of Peru is"


def _settled(tab) -> None:
    """Wait until the app's script run is over (a click while it reruns can land on an element it replaces): the
    status widget's running icon is gone (the widget itself also says when a source file changed)."""
    tab.wait_for_timeout(500)
    tab.locator("[data-testid='stStatusWidgetRunningIcon']").wait_for(state="detached", timeout=180_000)


def _state(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query))


def test_a_findings_link_opens_its_view(server, page):  # noqa: F811 - the imported fixtures
    # /lens on the default model, run with a prompt of our own
    page.goto(f"{server}/lens")
    main = page.locator("[data-testid='stMain']")
    main.get_by_text("Share and export").wait_for(timeout=180_000)
    _settled(page)
    main.get_by_role("textbox", name="Prompt").fill(PROMPT)
    main.get_by_role("button", name="Run", exact=True).click()
    page.wait_for_url(re.compile(r"prompt=The\+capital\+of\+Peru\+is"), timeout=120_000)
    code = main.locator("[data-testid='stCode']").filter(has_text="Peru")
    code.wait_for(timeout=60_000)
    link = code.inner_text().strip()
    _settled(page)
    assert urlsplit(link).path == "/lens" and _state(link)["prompt"] == PROMPT and _state(link)["token_ids"]

    # saved as a finding
    main.get_by_text("Save as a finding").click()
    title = main.get_by_role("textbox", name="Title")
    title.fill("Lens on Peru")
    title.blur()  # a text field commits its value when it loses focus
    main.get_by_role("button", name="Save finding").click()
    main.get_by_text("Saved finding").wait_for(timeout=30_000)

    # /findings: the finding's link is a live link into the app, not "not into this app"
    page.goto(f"{server}/findings")
    main.get_by_text("Lens on Peru").wait_for(timeout=90_000)
    opener = main.get_by_role("link", name="Open the view")
    opener.first.wait_for(timeout=60_000)
    _settled(page)
    assert opener.count() == 1 and opener.get_attribute("href") == link
    assert "Peru" not in " ".join(t for t in main.locator("[data-testid='stText']").all_inner_texts()
                                  if "not into this app" in t)
    assert main.locator("a[href^='javascript']").count() == 0  # the seeded hostile finding stays dead

    # following it opens the lens view with the same state, from the store
    with page.context.expect_page() as opened:
        opener.click()
    view = opened.value
    shown = view.locator("[data-testid='stMain']")
    shown.get_by_text("from the store").wait_for(timeout=120_000)
    _settled(view)
    assert urlsplit(view.url).path == "/lens" and _state(view.url) == _state(link)
    assert shown.get_by_role("textbox", name="Prompt").input_value() == PROMPT
    assert view.locator("[data-testid='stException']").count() == 0


def test_a_circuit_link_opens_pins_a_node_follows_the_edge_count_and_exports(server, page):  # noqa: F811
    """Issue 28: the Circuits page opened from a link with a pinned node and an edge count shows that node's
    edges; a keystroke on the slider changes the count in the link; the graph downloads as the EAP-IG library's
    JSON; a link pinning a node the model does not have says so."""
    import json

    page.goto(f"{server}/circuits?n_pairs=4&n_points=6&methods=eap,eap_ig&n_edges=20&pinned=input")
    main = page.locator("[data-testid='stMain']")
    main.get_by_text("Share and export").wait_for(timeout=180_000)
    _settled(page)
    assert main.get_by_text("Out of input").count() == 1
    assert _state(page.url)["n_edges"] == "20" and _state(page.url)["pinned"] == "input"
    # the graph, the faithfulness curves; the intervention on the pinned node: its metric and next tokens
    main.locator(".js-plotly-plot").nth(3).wait_for(timeout=30_000)
    assert main.locator(".js-plotly-plot").count() == 4
    assert _state(page.url)["nodes"] == "input" and _state(page.url)["value"] == "other"

    thumb = main.get_by_role("slider")
    thumb.focus()
    thumb.press("ArrowRight")
    page.wait_for_url(re.compile(r"n_edges=21"), timeout=60_000)
    _settled(page)

    with page.expect_download() as got:
        main.get_by_role("button", name="Download the graph (EAP-IG JSON)").click()
    graph = json.loads(open(got.value.path()).read())
    assert set(graph) == {"cfg", "nodes", "edges"} and len(graph["edges"]) == 1108
    kept = [k for k, v in graph["edges"].items() if v["in_graph"]]
    assert 0 < len(kept) <= 21 and all(graph["nodes"][k.split("->")[0]]["in_graph"] for k in kept)

    # an intervention from the graph: the pinned node mean-ablated instead; the link follows
    main.get_by_text("its mean (mean ablation)").click()
    main.get_by_role("button", name="Intervene").click()
    page.wait_for_url(re.compile(r"value=mean"), timeout=120_000)
    _settled(page)
    assert _state(page.url)["nodes"] == "input" and _state(page.url)["n_edges"] == "21"
    assert main.get_by_text("between the corrupted (0) and the clean run (1)").count() >= 1
    assert page.locator("[data-testid='stException']").count() == 0

    page.goto(f"{server}/circuits?n_pairs=4&n_points=6&methods=eap,eap_ig&n_edges=20&pinned=a9.h9")
    main.get_by_text("not a node of this model's graph").wait_for(timeout=180_000)
    assert page.locator("[data-testid='stException']").count() == 0


def test_a_circuit_by_position_link_pins_the_logits_follows_the_edge_count_and_exports(server, page):  # noqa: F811
    """Edges by position from a link: the graph with the prompt's tokens across, the pinned logits' inputs (edges
    at the last position), the slider in the link, the graph downloaded as Neuronpedia's JSON with a position per
    node; a link pinning a position the prompts lack says so."""
    import json

    link = f"{server}/circuits?positions=each&n_pairs=3&n_points=4&methods=eap,eap_ig&n_edges=30"
    page.goto(f"{link}&pinned=logits")
    main = page.locator("[data-testid='stMain']")
    main.get_by_text("Share and export").wait_for(timeout=180_000)
    _settled(page)
    assert main.get_by_text("Into logits").count() == 1
    assert main.get_by_text("by position (1,108 at each of 16").count() >= 1
    thumb = main.get_by_role("slider")
    thumb.focus()
    thumb.press("ArrowRight")
    page.wait_for_url(re.compile(r"n_edges=31"), timeout=60_000)
    _settled(page)
    assert _state(page.url)["positions"] == "each" and _state(page.url)["pinned"] == "logits"
    with page.expect_download() as got:
        main.get_by_role("button", name="Download the graph (Neuronpedia attribution-graph JSON)").click()
    graph = json.loads(open(got.value.path()).read())
    ids = {n["node_id"] for n in graph["nodes"]}
    assert graph["links"] and all(lk["source"] in ids and lk["target"] in ids for lk in graph["links"])
    assert {n["ctx_idx"] for n in graph["nodes"]} <= set(range(16)) and any("@" in n["clerp"] for n in graph["nodes"])
    assert page.locator("[data-testid='stException']").count() == 0
    page.goto(f"{link}&pinned=a0.h0@99")
    main.get_by_text("not a node of this model's graph").wait_for(timeout=180_000)
    assert page.locator("[data-testid='stException']").count() == 0


def test_a_feature_circuit_link_opens_pins_a_node_links_its_feature_page_and_exports(server, page):  # noqa: F811
    """Issue 28: a feature circuit opened from a link (small SAEs trained on the way) shows the graph with the
    pinned node's edges; a feature node's page link opens the Features page at that SAE and feature; the graph
    downloads in Neuronpedia's attribution-graph JSON; a link pinning a node the circuit lacks says so."""
    import json

    small = ("level=features&n_pairs=4&layers=1,3&methods=eap,relp&n_points=4&edge_nodes=40&sae_width=64"
             "&sae_steps=100&sae_max_tokens=2048")
    page.goto(f"{server}/circuits?{small}&n_edges=60")
    main = page.locator("[data-testid='stMain']")
    main.get_by_text("Share and export").wait_for(timeout=240_000)
    _settled(page)
    assert _state(page.url)["n_edges"] == "60" and _state(page.url)["level"] == "features"
    # the graph, the faithfulness curves; the intervention's metric and next tokens
    main.locator(".js-plotly-plot").nth(3).wait_for(timeout=30_000)
    assert main.locator(".js-plotly-plot").count() == 4

    with page.expect_download() as got:
        main.get_by_role("button", name="Download the graph (Neuronpedia attribution-graph JSON)").click()
    graph = json.loads(open(got.value.path()).read())
    assert set(graph) == {"metadata", "qParams", "nodes", "links"} and len(graph["links"]) == 60
    feature = next(n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder")
    node = f"f{feature['layer']}.{feature['feature']}@{feature['ctx_idx']}"

    page.goto(f"{server}/circuits?{small}&n_edges=60&pinned={node}")
    main.get_by_text(f"Out of {node}").wait_for(timeout=120_000)
    _settled(page)
    assert _state(page.url)["pinned"] == node
    # the node table's link to the feature's page (a canvas grid: its address is the page's own helper's) opens
    # the Features page at that SAE, from the store, and that feature
    from analysis.analyses.circuit.page import feature_page_link
    from analysis.analyses.circuit.spec import CircuitSpec

    spec = CircuitSpec.from_dict({k: v for k, v in _state(page.url).items() if k in CircuitSpec.field_names()})
    href = feature_page_link(spec, int(feature["layer"]), int(feature["feature"]))
    page.goto(f"{server}/{href.removeprefix('./')}")
    main.get_by_text("Share and export").first.wait_for(timeout=120_000)
    _settled(page)
    state = _state(page.url)
    assert state["feature"] == str(feature["feature"]) and state["layer"] == str(feature["layer"])
    assert state["width"] == "64" and page.locator("[data-testid='stException']").count() == 0

    page.goto(f"{server}/circuits?{small}&n_edges=60&pinned=f1.99999@3")
    main.get_by_text("not a node of this circuit").wait_for(timeout=120_000)
    assert page.locator("[data-testid='stException']").count() == 0
