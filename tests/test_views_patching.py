"""The patching views in a real browser: headless Chromium (Playwright) on the static pages, and Voila for
`CircuitGraph`'s Python callback.

The page fixtures come from test_views_heads: each page test fails if the page asks for anything but file:,
data:, blob: or about: URLs, if a script throws, or if a dialog opens (the hostile token and node names below
would open one if they ever ran as markup)."""
import json, math, os, re
import pytest
import torch

from test_views_heads import allowed, refused, offline, write, voila_page       # fixtures and helpers, shared
from headscope.views.style import RDBU as _RDBU, NAN as _NAN, colour as _colour
from headscope.views.patching import patching_heatmap_html, agreement_scatter_html
from headscope.views.graph import circuit_graph_html
from headscope.causal.metrics import agreement

XSS = "<script>alert(1)</script>"
TOKS = ["<bos>", "When", " Mary", XSS, " to"]
EDGES = [("embed", "L0H1", 0.6), ("embed", "L1H2", 0.3), ("L0H1", "L1H2.k", 0.5), ("L1H2", "L2H0.q", 0.7),
         ("L0H1", "L2H0.q", 0.2), ("L2H0", "L3H1.q", 0.9), ("L2H0", "L3H3.q", 0.4), ("L3H1", "logits", 1.2),
         ("L3H3", "logits", -0.6), ("L1H2", "MLP1", 0.05), ("MLP1", "logits", 0.08), ("embed", "MLP0", -0.04),
         ("MLP0", "L2H0.<img src=x onerror=alert(2)>", 0.03), ("L1KV0", "L3H1.k", -0.15)]

@pytest.fixture(scope="module")
def grid():
    "[3 layer, 4 head, 5 pos] with L2H1 planted at the last position and one NaN"
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, 5, generator=g) * 0.1
    s[2, 1, -1], s[0, 0, 0] = 0.9, float("nan")
    return s

def fill(v, m):
    "The RdBu colour of `v` on [-m, m] (grey for NaN), computed here from the scale, not read from the page"
    return _NAN if math.isnan(v) else _colour((v + m) / (2 * m), _RDBU)

CELLS = """() => [...document.querySelectorAll('.hs-patching rect.hs-cell')].map(c =>
    [+c.dataset.r, +c.dataset.c, c.getAttribute('fill'), c.querySelector('title').textContent])"""

def test_heatmap_position_picker(offline, tmp_path, grid):
    "The [layer head pos] page draws the last position; picking another redraws every cell, its value and its tooltip"
    page = offline
    page.goto(write(tmp_path, patching_heatmap_html(grid, tokens=TOKS, title="<img src=x onerror=alert(3)> z")))
    m = grid.nan_to_num(0).abs().max().item()
    assert page.is_visible(".hs-picker select.hs-pos")                               # the script ran and showed the picker
    assert page.locator("select.hs-pos option").all_inner_texts() == [f"pos {p} ‘{t.replace(' ', '␣')}’" for p, t in enumerate(TOKS)]
    cells = page.evaluate(CELLS)
    assert len(cells) == 12 and page.locator(".hs-patching svg.hs-grid").count() == 1
    assert [c[2] for c in cells] == [fill(grid[l, h, 4].item(), m) for l in range(3) for h in range(4)]
    assert cells[9][3] == "L2H1 · pos 4 ‘␣to’: 0.9"
    assert page.inner_text(".hs-slice") == "pos 4 ‘␣to’"

    page.select_option("select.hs-pos", "3")                                         # the hostile token's position
    after = page.evaluate(CELLS)
    assert [c[2] for c in after] == [fill(grid[l, h, 3].item(), m) for l in range(3) for h in range(4)]
    assert [c[2] for c in after] != [c[2] for c in cells]
    assert after[6][3] == f"L1H2 · pos 3 ‘{XSS}’: {grid[1, 2, 3].item():.3g}"         # the token, as text
    assert page.get_attribute(".hs-patching", "data-pos") == "3" and page.inner_text(".hs-slice") == f"pos 3 ‘{XSS}’"
    vals = page.locator("text.hs-val").all_text_contents()
    assert vals[6] == f"{grid[1, 2, 3].item():.2f}"

    page.select_option("select.hs-pos", "0")
    c0 = page.evaluate(CELLS)[0]
    assert (c0[2], c0[3]) == (_NAN, "L0H0 · pos 0 ‘<bos>’: not computed")             # NaN: grey, said in words
    assert page.locator("text.hs-val").first.text_content() == ""

    page.locator(".hs-patching rect.hs-cell[data-r='2'][data-c='1']").hover()
    assert page.inner_text(".hs-readout") == f"L2H1 · pos 0 ‘<bos>’: {grid[2, 1, 0].item():.3g}"
    assert page.evaluate("document.querySelectorAll('img').length") == 0             # nothing from the title or token became markup
    assert page.evaluate("[...document.scripts].every(s => !s.text.includes('alert(1)') || s.type === 'application/json')")
    style = page.evaluate("() => { const c = getComputedStyle(document.querySelector('.hs-patching')); return [c.backgroundColor, c.color]; }")
    assert style == ["rgb(255, 255, 255)", "rgb(17, 17, 17)"]                        # readable on the dark page

def test_heatmap_tokens_on_x(offline, tmp_path, grid):
    "A [layer pos] grid: one column per token, labelled with the escaped token; hover reads the cell out"
    page = offline
    resid = grid[:, 0]                                                                # [layer pos]
    page.goto(write(tmp_path, patching_heatmap_html(resid, tokens=TOKS)))
    assert page.locator("rect.hs-cell").count() == 15 and page.locator("select.hs-pos").count() == 0
    assert page.locator("text.hs-col").evaluate_all("ts => ts.map(t => t.lastChild.textContent)") == ["<bos>", "When", "␣Mary", "<script>a…", "␣to"]
    assert page.locator("text.hs-col").nth(3).locator("title").text_content() == f"pos 3 ‘{XSS}’"
    page.locator("rect.hs-cell[data-r='1'][data-c='2']").hover()
    assert page.inner_text(".hs-readout") == f"L1 · pos 2 ‘␣Mary’: {resid[1, 2].item():.3g}"
    box = page.locator("svg.hs-grid").bounding_box()
    for t in page.locator("text.hs-col").all():                                       # rotated labels stay inside the picture
        b = t.bounding_box()
        assert b["y"] >= box["y"] - 1 and b["x"] + b["width"] <= box["x"] + box["width"] + 1

def test_scatter(offline, tmp_path):
    "One point per component with its name on hover, the y = x line, and the agreement figures"
    page = offline
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, generator=g); y = x + 0.3 * torch.randn(12, generator=g)
    labels = [f"L{l}H{h}" for l in range(3) for h in range(4)]; labels[4] = "<img src=x onerror=alert(4)>"
    page.goto(write(tmp_path, agreement_scatter_html(x, y, labels, title="attribution vs exact")))
    assert page.locator("circle.hs-point").count() == 12 and page.locator("line.hs-diag").count() == 1
    assert page.locator("text.hs-tick").count() >= 6
    a = agreement(y, x)
    assert page.inner_text(".hs-stats").startswith(f"Pearson r = {a['pearson']:.3f} · Spearman ρ = {a['spearman']:.3f} · top-10 overlap")
    page.locator("circle.hs-point").nth(7).hover()
    assert page.inner_text(".hs-agreement .hs-readout") == f"L1H3: exact patching {x[7].item():.3g}, attribution patching {y[7].item():.3g}"
    assert page.locator("circle.hs-point").nth(4).locator("title").text_content().startswith("<img src=x onerror=alert(4)>: ")
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    # the diagonal is y = x: its ends sit at equal data values on both axes (the plot is square)
    d = page.locator("line.hs-diag")
    x1, y1, x2, y2 = (float(d.get_attribute(k)) for k in ("x1", "y1", "x2", "y2"))
    assert abs((x2 - x1) + (y2 - y1)) < 0.2 and x2 > x1

EDGE_STATE = """() => ({edges: [...document.querySelectorAll('.hs-graph path.hs-edge')].map(e => e.querySelector('title').textContent),
    nodes: [...document.querySelectorAll('.hs-graph g.hs-node')].map(n => n.dataset.name),
    shown: document.querySelector('.hs-graph').dataset.shown, count: document.querySelector('.hs-graph .hs-count').textContent})"""

def python_state(th):
    "What Python draws at threshold `th` (its own rendering, read back from the markup)"
    page = circuit_graph_html(EDGES, threshold=th)
    unesc = lambda s: s.replace("&lt;", "<").replace("&gt;", ">").replace("&#x27;", "'").replace("&quot;", '"').replace("&amp;", "&")
    return ([unesc(t) for t in re.findall(r"<path class='hs-edge'[^>]*><title>([^<]*)</title>", page)],
            [unesc(n) for n in re.findall(r"<g class='hs-node' data-name='([^']*)'", page)])

def test_graph_slider(offline, tmp_path):
    "Moving the threshold slider hides weak edges and the nodes they leave alone, and matches Python's drawing"
    page = offline
    page.goto(write(tmp_path, circuit_graph_html(EDGES, threshold=0.1, title="toy", node_scores={"L3H1": 0.8, "L1H2.k": -0.2})))
    assert page.is_visible("input.hs-threshold") and page.is_hidden(".hs-nojs")
    s0 = page.evaluate(EDGE_STATE)
    assert len(s0["edges"]) == 10 and s0["count"] == "10 of 14 edges"                # |score| ≥ 0.1
    assert (s0["edges"], s0["nodes"]) == python_state(0.1)
    assert "MLP0" not in s0["nodes"] and "L1KV0" in s0["nodes"]

    page.focus("input.hs-threshold"); page.keyboard.press("Home")                     # to 0: every edge
    s1 = page.evaluate(EDGE_STATE)
    assert len(s1["edges"]) == 14 and s1["shown"] == "14" and "MLP0" in s1["nodes"]
    assert (s1["edges"], s1["nodes"]) == python_state(0.0)
    assert "MLP0 → L2H0.<img src=x onerror=alert(2)>: +0.03" in s1["edges"]           # the hostile suffix, as text

    page.evaluate("() => { const s = document.querySelector('input.hs-threshold'); s.value = '0.55'; s.dispatchEvent(new Event('input')); }")
    s2 = page.evaluate(EDGE_STATE)
    assert len(s2["edges"]) == 5 and s2["count"] == "5 of 14 edges" and page.inner_text(".hs-th") == "0.55"
    assert (s2["edges"], s2["nodes"]) == python_state(0.55)
    assert set(s2["nodes"]) == {"embed", "L0H1", "L1H2", "L2H0", "L3H1", "L3H3", "logits"}   # MLPs and L1KV0: no edge left

    page.keyboard.press("End")                                                        # to the maximum: the strongest edge only
    s3 = page.evaluate(EDGE_STATE)
    assert s3["edges"] == ["L3H1 → logits: +1.2"] and s3["nodes"] == ["L3H1", "logits"]

    page.keyboard.press("Home")
    page.locator("path.hs-edge").last.hover()                                         # strongest, drawn last
    assert page.inner_text(".hs-graph .hs-readout") == "L3H1 → logits: +1.2"
    page.locator("g.hs-node[data-name='L3H1']").hover()
    assert page.inner_text(".hs-graph .hs-readout") == "L3H1: score 0.8"
    neg = page.locator("path.hs-edge", has_text="L3H3 → logits")
    assert neg.get_attribute("stroke") == _RDBU[1] and page.locator("path.hs-edge", has_text="L3H1 → logits").get_attribute("stroke") == _RDBU[-2]
    assert page.evaluate("document.querySelectorAll('img').length") == 0

def test_without_javascript(browser, tmp_path, grid):
    "With scripts off: the graph Python drew at its threshold and a note that the slider needs JavaScript; the heatmap's slice"
    ctx = browser.new_context(java_script_enabled=False)
    page = ctx.new_page()
    page.goto(write(tmp_path, circuit_graph_html(EDGES, threshold=0.5) + patching_heatmap_html(grid, tokens=TOKS, pos=2)))
    assert page.locator("path.hs-edge").count() == 6 and page.locator("g.hs-node").count() == 7
    assert page.is_visible(".hs-nojs") and "needs JavaScript" in page.inner_text(".hs-nojs") and page.is_hidden(".hs-controls")
    assert page.locator("rect.hs-cell").count() == 12 and page.is_hidden(".hs-picker")
    assert page.inner_text(".hs-slice") == "pos 2 ‘␣Mary’"
    ctx.close()

NOTEBOOK = r'''
from headscope.widgets.patching import CircuitGraph
edges = [("embed", "L0H1", 0.6), ("embed", "L1H2", 0.3), ("L0H1", "L1H2.k", 0.5), ("L1H2", "L2H0.q", 0.7),
         ("L0H1", "L2H0.q", 0.2), ("L2H0", "L3H1.q", 0.9), ("L2H0", "L3H3.q", 0.4), ("L3H1", "logits", 1.2),
         ("L3H3", "logits", -0.6), ("L1H2", "MLP1", 0.05), ("MLP1", "logits", 0.08)]
cg = CircuitGraph(edges, threshold=0.1)
display(cg)
'''

@pytest.mark.slow
def test_circuit_graph_in_voila(offline, allowed, refused, tmp_path):
    "Live kernel: typing a threshold into the FloatSlider redraws the graph through Python (~25-35 s)"
    if not os.environ.get("CI"): pytest.importorskip("voila")
    with voila_page(NOTEBOOK, tmp_path, offline, allowed, refused) as page:
        view = page.locator(".widget-html")
        view.locator("path.hs-edge").first.wait_for(timeout=120_000)                    # the Python side drew the graph
        count = lambda: view.locator("path.hs-edge").count()
        assert count() == 9 and "9 of 11 edges" in view.locator(".hs-count").inner_text()
        readout = page.locator(".widget-slider .widget-readout")
        readout.click(); page.keyboard.press("Control+A"); page.keyboard.type("0.55"); page.keyboard.press("Enter")
        page.wait_for_function("() => document.querySelectorAll('.widget-html path.hs-edge').length === 5", timeout=30_000)
        assert "5 of 11 edges" in view.locator(".hs-count").inner_text()                # ... redrawn through the kernel
        assert sorted(view.locator("g.hs-node").evaluate_all("ns => ns.map(n => n.dataset.name)")) == ["L0H1", "L1H2", "L2H0", "L3H1", "L3H3", "embed", "logits"]
        assert view.locator("script").count() == 0                                       # no script in the widget: Python drew it
