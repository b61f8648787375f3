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
    assert vals == [("" if abs(x) < 0.005 else f"{x:.2f}") for x in grid[..., 3].flatten().tolist()]   # redrawn; |x| < 0.005 blank
    assert vals[6] == ""                                   # L1H2 is 0.0032: a blank cell, its value on hover (above)

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

# -- every element brings its own colours (dark themes style pre, table, tr, q, ... directly) --------------
from html.parser import HTMLParser

class _Unstyled(HTMLParser):
    "HTML elements (outside SVG and scripts) whose style lacks an explicit text colour or background"
    SKIP = {"br", "script", "style"}
    def __init__(self):
        super().__init__(); self.svg, self.bad = 0, []
    def handle_starttag(self, tag, attrs):
        if tag == "svg": self.svg += 1
        if self.svg or tag in self.SKIP: return
        st = dict(attrs).get("style") or ""
        if not (re.search(r"(^|;)\s*color\s*:", st) and "background" in st): self.bad.append(f"<{tag} style='{st}'>")
    def handle_endtag(self, tag):
        if tag == "svg": self.svg -= 1

def unstyled(page:str)->list:
    p = _Unstyled(); p.feed(page); return p.bad

def test_every_element_has_its_own_colours(grid):
    "No element of the causal views takes its text or background colour from the notebook's theme"
    from headscope.models import tiny_model
    from headscope.causal.metrics import logit_diff
    from headscope.causal.patching import activation_patching
    from headscope.causal.attribution import attribution_patching, edge_attribution_patching
    from headscope.causal.paths import path_patching
    from headscope.causal.lens import top_predictions, logit_lens
    from headscope.causal.circuits import faithfulness_curve
    from headscope.causal.dla import direct_logit_attribution
    from headscope.views.causal import predictions_html, logit_lens_html, faithfulness_curve_html
    from headscope.views.graph import path_patching_html
    m = tiny_model("llama", n_layers=2, n_heads=4, seed=3, initializer_range=0.2)
    g = torch.Generator().manual_seed(0)
    clean, corrupt = torch.randint(3, 200, (2, 6), generator=g), torch.randint(3, 200, (2, 6), generator=g)
    metric = lambda lg: logit_diff(lg, 5, 6)
    act = activation_patching(m, clean, corrupt, metric, "z", -1, progress=False)
    pages = {"heatmap": patching_heatmap_html(grid, tokens=TOKS, title="t"), "scatter": agreement_scatter_html(grid[..., 0], grid[..., 1], None, title="t"),
             "graph": circuit_graph_html(EDGES, title="t"), "graph (widget)": circuit_graph_html(EDGES, title="t", interactive=False),
             "activation": act._repr_html_(),
             "attribution": attribution_patching(m, clean, corrupt, metric, "z", -1, exact=act, progress=False)._repr_html_(),
             "paths": path_patching_html(path_patching(m, clean, corrupt, metric, "each", "logits", progress=False)),
             "path groups": path_patching_html(path_patching(m, clean, corrupt, metric, [(0, 1), "MLP0"], "logits", progress=False)),
             "eap": edge_attribution_patching(m, clean, corrupt, metric, progress=False)._repr_html_(),
             "predictions": predictions_html(top_predictions(m, "<b>hi</b>", k=3)),
             "lens": logit_lens_html(logit_lens(m, "<b>hi</b>", k=3, targets=["h"])),
             "faithfulness": faithfulness_curve_html(faithfulness_curve(m, clean, metric, ["L1H0", "L0H2"], corrupt, progress=False)),
             "dla": direct_logit_attribution(m, clean, 5, 6)._repr_html_()}
    for name, page in pages.items(): assert unstyled(page) == [], name

def test_cells_blank_tiny_values_and_titles_read_the_scores():
    "No '-0.00' in a grid's cells (the tooltip keeps the value); a result's title names the metric and says 1 = clean, 0 = corrupted"
    from headscope.models import tiny_model
    from headscope.data.pairs import PromptPairs
    from headscope.causal.patching import activation_patching
    s = torch.tensor([[0.004, -0.0049, 0.3], [-0.001, -0.5, float("nan")]])
    page = patching_heatmap_html(s)
    assert re.findall(r"<text class='hs-val'[^>]*>([^<]*)</text>", page) == ["", "", "0.30", "", "-0.50", ""]
    assert "<title>L0H1: -0.0049</title>" in page
    m = tiny_model("llama", n_layers=2, n_heads=4, seed=3, initializer_range=0.2)
    g = torch.Generator().manual_seed(0)
    clean, corrupt = torch.randint(3, 200, (2, 6), generator=g), torch.randint(3, 200, (2, 6), generator=g)
    pairs = PromptPairs(clean, corrupt, torch.tensor([5, 7]), torch.tensor([6, 8]))
    res = activation_patching(m, pairs.clean, pairs.corrupt, pairs.logit_diff(), "z", -1, progress=False)
    title = re.search(r"<div style='font-weight:bold[^>]*>([^<]*)</div>", res._repr_html_())[1]
    assert title.startswith("Activation patching of z at pos=-1 · logit_diff: clean ") and title.endswith("score 1 = clean, 0 = corrupted")
    assert "PatchingResult(" not in title
