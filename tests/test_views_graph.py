"""The attribution graph view and widget: the page's structure checked against the adjacency it draws, and the page
in a real browser (headless Chromium, Playwright): clicking a node opens the card Python would draw, the slider hides
weak edges exactly as Python does. Graphs are built by hand, no model. The page fixtures come from test_views_heads:
a page test fails if the page asks for the network, if a script throws, or if a dialog opens (the hostile token
and label below would open one if they ever ran as markup)."""
import json, re
import pytest
import torch

from test_views_heads import allowed, refused, offline, write        # fixtures and helpers, shared
from headscope.views.style import RDBU
from headscope.views.feature_graph import attribution_graph_html, node_card_html, shown_parts, attribution_edges
from headscope.widgets.graph import AttributionGraphWidget
from headscope.sae.graph import AttributionGraph          # built by hand here: the view's contract with the analysis

XSS = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(2)>"
BLUE, RED = RDBU[-2], RDBU[1]

def make_graph(seed=0, T=5, L=3, per=3, n_edges=60):
    "Tokens (one hostile), `per` features per layer, an error node per layer, 2 logits; edges only from lower to higher layers"
    gen = torch.Generator().manual_seed(seed)
    toks = ["The", XSS, " cat", " sat", " on"][:T]
    ns = [dict(id=f"t{p}", kind="token", layer=-1, pos=p, index=p, label=t, activation=0.0, influence=0.0) for p, t in enumerate(toks)]
    for l in range(L):
        ns += [dict(id=f"f{l}.{j}", kind="feature", layer=l, pos=int(torch.randint(T, (1,), generator=gen)), index=100 * l + j,
                    label=IMG if (l, j) == (1, 0) else f"feature {l}.{j}", activation=1.5, influence=float(torch.rand(1, generator=gen))) for j in range(per)]
        ns.append(dict(id=f"e{l}", kind="error", layer=l, pos=T - 1, index=None, label="error", activation=0.2, influence=0.1))
    ns += [dict(id=f"logit{k}", kind="logit", layer=L, pos=T - 1, index=k, label=[" mat", XSS][k], activation=5.0, influence=1.0) for k in range(2)]
    n = len(ns)
    lay = torch.tensor([d["layer"] for d in ns])
    w = torch.randn(n, n, generator=gen) * (lay[:, None] > lay[None, :])          # [target source], sources below targets
    cut = w.abs().flatten().topk(n_edges).values[-1]
    A = torch.where(w.abs() >= cut, w, torch.zeros(()))
    cards = {"f2.0": dict(top_contexts=[("the cat sat on the", " mat", ".", 3.0), (XSS, "<b>", "</div>", 1.0)],
                          logits_up=[(" mat", 1.5), (" rug", 0.7)], logits_down=[(XSS, -0.4)])}
    return AttributionGraph(ns, A, toks, [0, 1], [0.6, 0.1], cards)

@pytest.fixture(scope="module")
def graph(): return make_graph()

def reference(graph, th):
    "Edges and nodes at threshold `th`, straight from the adjacency: |weight| (to 6 digits) >= th; tokens and logits always"
    A = graph.adjacency
    t, s = (A != 0).nonzero(as_tuple=True)
    keep = [(int(a), int(b)) for a, b in zip(s, t) if abs(float(f"{A[b, a].item():.6g}")) >= th]
    used = {i for e in keep for i in e}
    return keep, {d["id"] for i, d in enumerate(graph.nodes) if i in used or d["kind"] in ("token", "logit")}

def drawn(page):
    "Python's drawing: edge (stroke, title) pairs and the ids of the nodes not hidden"
    es = re.findall(r"<path class='hs-edge' d='[^']*' fill='none' stroke='(#[0-9a-f]{6})'[^>]*><title>([^<]*)</title>", page)
    ns = re.findall(r"<g class='hs-node' data-i='\d+' data-id='([^']*)' data-kind='\w+' tabindex='0' style='cursor:pointer'>", page)
    return es, set(ns)

@pytest.mark.parametrize("th", [0.0, 0.8, 1.6, 100.0])
def test_counts_and_signs(graph, th):
    "Every edge at or above the threshold is drawn, blue when positive and red when negative; nodes follow their edges"
    keep, nodes = reference(graph, th)
    es, ns = drawn(attribution_graph_html(graph, edge_threshold=th))
    assert len(es) == len(keep) and ns == nodes
    A = graph.adjacency
    assert sorted(c for c, _ in es) == sorted(BLUE if A[t, s] > 0 else RED for s, t in keep)
    assert all((c == RED) == (": -" in t) for c, t in es)
    assert [e[:2] for e in shown_parts(graph, th)[0]] == [(graph.nodes[s]["id"], graph.nodes[t]["id"]) for s, t in
                                                           sorted(keep, key=lambda e: -abs(A[e[1], e[0]].item()))]

def test_repr(graph):
    "The result shows as this page"
    assert drawn(graph._repr_html_()) == drawn(attribution_graph_html(graph))

def test_default_and_escaping(graph):
    "60 edges: all drawn by default; hostile tokens and labels are text in the SVG, the card and the data"
    p = attribution_graph_html(graph, selected="f2.0")
    assert len(drawn(p)[0]) == 60 == len(attribution_edges(graph))
    assert p.count("<script") == 2 and "<img" not in p and "<b>" not in p                  # our data and our script, nothing else
    assert "&lt;scri" in p and "&lt;img src=x onerror=alert(2)&gt;" in p                   # drawn as text
    D = json.loads(re.search(r"class='hs-data'>(.*?)</script>", p).group(1))
    assert D["cards"][[d["id"] for d in graph.nodes].index("f2.0")]["c"][1][:3] == [XSS, "<b>", "</div>"]   # data, set as text by the script
    card = node_card_html(graph, "f2.0")
    assert re.findall(r"<mark class='hs-peak'[^>]*>([^<]*)</mark>", card) == [" mat", "&lt;b&gt;"]
    assert "Promotes" in card and "Suppresses" in card and "␣rug" in card
    assert card.split("class='hs-card'")[1] in p                                          # the selected card is in the page

def test_widget_slider(graph):
    "Moving the widget's slider redraws fewer edges, the same ones the static page draws; the dropdown opens a card"
    w = AttributionGraphWidget(graph, edge_threshold=0.0, node="f2.0")
    e0, _ = drawn(w.view.value)
    assert len(e0) == 60 and "data-selected='f2.0'" in w.view.value and "<script" not in w.view.value
    w.slider.value = 1.2
    e1, n1 = drawn(w.view.value)
    keep, nodes = reference(graph, 1.2)
    assert w.threshold == 1.2 and len(e1) == len(keep) < 60 and n1 == nodes
    assert drawn(w.to_html()) == (e1, n1) and len(w.shown[0]) == len(keep)
    w.node_dd.value = "f1.0"
    assert w.selected == "f1.0" and "data-selected='f1.0'" in w.view.value and "&lt;img src=x" in w.view.value

STATE = """() => { const r = document.querySelector('.hs-agraph');
  return {edges: [...r.querySelectorAll('path.hs-edge')].map(e => [e.getAttribute('stroke'), e.querySelector('title').textContent]),
          nodes: [...r.querySelectorAll('g.hs-node')].filter(g => g.style.display !== 'none').map(g => g.dataset.id),
          shown: r.dataset.shown, count: r.querySelector('.hs-count').textContent, selected: r.dataset.selected} }"""
CARD = "() => document.querySelector('.hs-card-panel .hs-card').outerHTML"
PARSED = "(h) => { const t = document.createElement('template'); t.innerHTML = h; return t.content.querySelector('.hs-card').outerHTML; }"

def python(graph, th):
    "What Python draws at `th`, as the browser would read it back"
    es, ns = drawn(attribution_graph_html(graph, edge_threshold=th))
    un = lambda s: s.replace("&lt;", "<").replace("&gt;", ">").replace("&#x27;", "'").replace("&quot;", '"').replace("&amp;", "&")
    return [[c, un(t)] for c, t in es], ns

def test_browser_click_and_slider(offline, tmp_path, graph):
    "Click a node: its card (the one Python draws) opens; the slider hides weak edges and lonely nodes as Python does"
    page = offline
    page.goto(write(tmp_path, attribution_graph_html(graph, edge_threshold=0.8)))
    assert page.is_visible("input.hs-threshold") and page.is_hidden(".hs-nojs")
    assert page.inner_text(".hs-card-panel") == "Click a node to see its card."
    s0 = page.evaluate(STATE)
    assert (s0["edges"], set(s0["nodes"])) == python(graph, 0.8)

    page.locator("g.hs-node[data-id='f2.0']").click()
    assert page.evaluate(STATE)["selected"] == "f2.0"
    assert page.is_visible(".hs-card-panel mark.hs-peak")
    assert page.locator(".hs-card-panel mark.hs-peak").all_text_contents() == [" mat", "<b>"]   # the hostile token, as text
    assert page.evaluate(CARD) == page.evaluate(PARSED, node_card_html(graph, "f2.0"))         # the script's card is Python's
    assert page.get_attribute("g.hs-node[data-id='f2.0'] .hs-shape", "stroke-width") == "2.5"
    for nid in ("f1.0", "t1", "logit1", "e0"):                                                 # hostile label and token, no card data
        page.locator(f"g.hs-node[data-id='{nid}']").click()
        assert page.evaluate(CARD) == page.evaluate(PARSED, node_card_html(graph, nid))
    page.locator("g.hs-node[data-id='t1']").focus(); page.keyboard.press("Enter")
    assert page.evaluate(STATE)["selected"] == "t1"

    page.evaluate("() => { const s = document.querySelector('input.hs-threshold'); s.value = '1.6'; s.dispatchEvent(new Event('input')); }")
    s1 = page.evaluate(STATE)
    keep, nodes = reference(graph, 1.6)
    assert len(s1["edges"]) == len(keep) < len(s0["edges"]) and set(s1["nodes"]) == nodes
    assert (s1["edges"], set(s1["nodes"])) == python(graph, 1.6)
    assert s1["count"] == f"{len(keep)} of 60 edges · {len(nodes)} of {len(graph.nodes)} nodes" and page.inner_text(".hs-th") == "1.6"
    th = abs(attribution_edges(graph)[9][2])                                                   # exactly an edge's weight: kept
    page.evaluate("(v) => { const s = document.querySelector('input.hs-threshold'); s.value = v; s.dispatchEvent(new Event('input')); }", repr(th))
    s2 = page.evaluate(STATE)
    assert len(s2["edges"]) == 10 and (s2["edges"], set(s2["nodes"])) == python(graph, th)
    page.focus("input.hs-threshold"); page.keyboard.press("Home")
    assert (lambda s: (len(s["edges"]), s["shown"]))(page.evaluate(STATE)) == (60, "60")
    page.locator("path.hs-edge").last.hover()                                                  # the strongest, drawn last
    assert page.inner_text(".hs-readout") == python(graph, 0.0)[0][-1][1]
    style = page.evaluate("() => { const c = getComputedStyle(document.querySelector('.hs-card-panel')); return [c.backgroundColor, c.color]; }")
    assert style == ["rgb(255, 255, 255)", "rgb(17, 17, 17)"]                                   # readable on the dark page
