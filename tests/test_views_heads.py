"""The head views in a real browser: headless Chromium (Playwright) on the static pages, and Voila for the
widgets' Python callbacks.

Most pages are tiny (3 layers x 4 heads x 6 tokens); one is the issue's big case (30 layers x 9 heads x 260
tokens), drawn by our own canvas script from compact data. Each page test fails if the page asks for anything but file:, data:, blob: or about: URLs, or if a dialog opens (the
hostile token below would open one if it ever ran as markup)."""
import contextlib, os, socket, subprocess, sys, time, urllib.error, urllib.request
from pathlib import Path
import pytest
import torch

import json, re
from headscope.views.attention import attention_explorer_html, _drop_bos
from headscope.views.heads import head_heatmap_html, census_html
from headscope.views.pattern_data import encode_patterns, decode_patterns, PatternData
from headscope.views.style import colours

XSS = " </script><script>alert(1)</script>"
TOKS = ["<bos>", "When", " Mary", " met", " John", XSS]

def causal_softmax(x):
    n = x.shape[-1]
    return x.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)

@pytest.fixture(scope="module")
def data():
    "Patterns [3 layer, 4 head, 6, 6] with a sink at L1H2, and three scores (one signed, one NaN)"
    g = torch.Generator().manual_seed(0)
    pats = causal_softmax(torch.randn(3, 4, 6, 6, generator=g) * 2)
    pats[1, 2] = 0.9 * torch.eye(6)[[0] * 6] + 0.1 * torch.eye(6)                 # 90% on BOS, 10% on itself
    scores = {"prev_token": pats.diagonal(-1, -2, -1).mean(-1), "sink": pats[..., 1:, 0].mean(-1),
              "attr": torch.randn(3, 4, generator=g)}
    scores["attr"][2, 3] = float("nan")
    return pats, scores

@pytest.fixture
def allowed():
    "URL prefixes a page may request: local files and inline data (a test may add its own local server)"
    return ["file:", "data:", "blob:", "about:"]

@pytest.fixture
def refused():
    "URL prefixes refused without failing the test (requests made by tools around our pages, not by them)"
    return []

@pytest.fixture
def offline(page, allowed, refused):
    "`page` with every request outside `allowed` refused and recorded, and dialogs and script errors recorded"
    sent, dialogs, errors = [], [], []
    ok = lambda url: url.startswith(tuple(allowed + refused))
    def route(r):
        if r.request.url.startswith(tuple(allowed)): r.continue_()
        else: r.abort()
    page.route("**/*", route)
    page.on("request", lambda r: None if ok(r.url) else sent.append(r.url))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    assert not sent, f"the page tried to reach the network: {sent}"
    assert not dialogs, f"a dialog opened (script injection?): {dialogs}"
    assert not errors, f"script errors: {errors}"

def write(tmp_path, body):
    "`body` in a page whose own background is dark, as in JupyterLab's dark theme; its file: URL"
    p = tmp_path/"page.html"
    p.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'></head>"
                 f"<body style='background:#111111;color:#eeeeee;color-scheme:dark'>{body}</body></html>", encoding="utf-8")
    return p.as_uri()

def painted(root=".hs-explorer"):
    "JS: has the canvas of the explorer `root` (a selector) been drawn at a real size, and not blank?"
    return """() => { const r = document.querySelector(%s); const c = r && r.querySelector('.hs-cv canvas');
        if (!c || c.width < 50 || c.height < 50 || r.querySelector('.hs-cv').offsetWidth < 50) return false;
        const blank = document.createElement('canvas'); blank.width = c.width; blank.height = c.height;
        return c.toDataURL() !== blank.toDataURL(); }""" % json.dumps(root)

def shown(page, root=".hs-explorer"):
    "What the explorer shows, once its canvas is painted: its data-* state, the numbers drawn, the canvas pixels, the heading"
    page.wait_for_function(painted(root))
    return page.evaluate("""(q) => { const r = document.querySelector(q), c = r.querySelector('.hs-cv canvas');
        return {layer: r.dataset.layer, head: r.dataset.head, mode: r.dataset.mode, values: r.hsShown, pixels: c.toDataURL(),
                now: r.querySelector('.hs-now').textContent, size: [c.offsetWidth, c.offsetHeight]} }""", root)

def embedded(page_html):
    "The explorer's embedded data (the first explorer of `page_html`), as `PatternData`"
    D = json.loads(re.search(r"class='hs-data'>(.*?)</script>", page_html).group(1))
    m = D["data"]
    return D, PatternData(m["nl"], m["nh"], m["n"], m["levels"], m["causal"], m["mass"], m["b64"])

def close(values, ref, eps):
    "Are the rows drawn (JS numbers) within `eps` of `ref` (a [q k] tensor)?"
    return bool((torch.tensor(values, dtype=torch.float64) - ref.double()).abs().max() <= eps)

def test_explorer(offline, tmp_path, data):
    "It draws on a canvas; layer, head and the BOS toggle each change what is drawn, to the right numbers"
    pats, _ = data
    page = offline
    title = "<img src=x onerror=alert(2)> heads"
    h = attention_explorer_html(TOKS, pats, n_kv_heads=2, title=title)
    ref, bos = decode_patterns(embedded(h)[1]), decode_patterns(embedded(h)[1], "bos")
    page.goto(write(tmp_path, h))
    s0 = shown(page)
    assert (s0["layer"], s0["head"], s0["mode"], s0["now"]) == ("0", "0", "raw", "L0H0 · kv0")
    assert close(s0["values"], ref[0, 0], 1e-12) and close(s0["values"], pats[0, 0], 1 / 255)
    assert page.is_hidden(".hs-fallback") and page.is_visible(".hs-controls")      # the static copy gives way
    assert page.locator(".hs-cv canvas").count() == 1                               # one head drawn, not twelve

    page.select_option("select.hs-layer", "1")
    s1 = shown(page)
    assert (s1["layer"], s1["head"], s1["now"]) == ("1", "0", "L1H0 · kv0")
    assert close(s1["values"], ref[1, 0], 1e-12) and s1["pixels"] != s0["pixels"]
    assert page.locator("select.hs-head option").all_inner_texts() == ["L1H0 · kv0", "L1H1 · kv0", "L1H2 · kv1", "L1H3 · kv1"]

    page.select_option("select.hs-head", "2")                                       # the sink head
    s2 = shown(page)
    assert (s2["head"], s2["now"]) == ("2", "L1H2 · kv1") and close(s2["values"], pats[1, 2], 1 / 255) and s2["pixels"] != s1["pixels"]

    page.check("input.hs-mode[value=bos]")
    s3 = shown(page)
    assert (s3["mode"], s3["now"]) == ("bos", "L1H2 · kv1 (BOS removed)")
    assert close(s3["values"], bos[1, 2], 1e-12) and close(s3["values"], _drop_bos(pats[1, 2]), 1 / 255) and s3["pixels"] != s2["pixels"]
    assert s3["values"][0] == [0] * 6 and [r[0] for r in s3["values"]] == [0] * 6   # no key 0; query 0 empty
    assert [s3["values"][q][q] for q in range(1, 6)] == [1] * 5                     # what the sink hid: itself

    page.click("button.hs-chip[data-h='3']")                                        # the head buttons, grouped by KV head
    s4 = shown(page)
    assert (s4["head"], s4["mode"], page.input_value("select.hs-head")) == ("3", "bos", "3")
    assert page.locator(".hs-group[data-kv='1'] button.hs-chip").all_inner_texts() == ["H2", "H3"]
    page.check("input.hs-mode[value=raw]")
    assert close(shown(page)["values"], ref[1, 3], 1e-12)
    page.hover(".hs-cv canvas", position={"x": s4["size"][0] - 5, "y": s4["size"][1] - 5})   # the last query, the last key
    assert page.inner_text(".hs-read").startswith("query 5 ␣</script>") and "→ key 5" in page.inner_text(".hs-read")

    # untrusted text stays text: no element or script came from the token or the title, no dialog opened
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    assert page.evaluate("[...document.scripts].every(s => !s.text.includes('alert(1)') || s.type === 'application/json')")
    assert title in page.inner_text(".hs-explorer > div")
    assert XSS.strip().replace(" ", "␣") in page.evaluate("document.querySelector('.hs-fallback').textContent")

def test_heatmap(offline, tmp_path, data):
    "Score picker recolours; hover reads out a value; a click opens that head in the explorer and marks it; a white panel on a dark page"
    pats, scores = data
    page = offline
    page.goto(write(tmp_path, head_heatmap_html(scores, TOKS, pats, n_kv_heads=2, descriptions={"attr": "a signed toy score"})))
    first = shown(page)
    assert (first["layer"], first["head"]) == ("0", "0")
    cell = lambda l, h: page.locator(f".hs-panel:visible rect.hs-cell[data-l='{l}'][data-h='{h}']")
    assert page.locator(".hs-panel:visible").count() == 1 and page.locator(".hs-panel:visible .hs-kv").count() == 2
    assert cell(0, 0).get_attribute("fill") == colours(scores["prev_token"], False)[0][0]
    assert page.locator(".hs-panel:visible rect.hs-mark").is_hidden()               # nothing selected yet

    page.select_option("select.hs-score", "attr")
    assert page.get_attribute(".hs-heads", "data-score") == "attr"
    attr = colours(scores["attr"], True)                                           # diverging RdBu
    assert [cell(0, h).get_attribute("fill") for h in range(4)] == attr[0]
    assert attr[0] != colours(scores["prev_token"], False)[0]
    assert cell(2, 3).get_attribute("fill") == "#d4d4d4"                            # NaN: not computed
    assert "a signed toy score" in page.inner_text(".hs-panel:visible .hs-desc")
    assert page.locator(".hs-panel:visible .hs-colourbar text").all_text_contents()[-1] == "0"   # zero marked mid-bar

    cell(2, 1).hover()
    v = scores["attr"][2, 1].item()
    assert page.inner_text(".hs-readout") == f"L2H1 · kv0: attr = {v:.3g}"

    cell(2, 3).click()
    s = shown(page)
    assert (s["layer"], s["head"], s["now"]) == ("2", "3", "L2H3 · kv1") and close(s["values"], pats[2, 3], 1 / 255)
    assert s["pixels"] != first["pixels"]
    assert (page.input_value("select.hs-layer"), page.input_value("select.hs-head")) == ("2", "3")
    assert page.get_attribute(".hs-heads", "data-selected") == "2,3"
    for score in ("attr", "sink"):                                                  # the mark, in this panel and in the next one shown
        page.select_option("select.hs-score", score)
        mark = page.locator(".hs-panel:visible rect.hs-mark")
        assert mark.is_visible() and (mark.get_attribute("x"), mark.get_attribute("y")) == (cell(2, 3).get_attribute("x"), cell(2, 3).get_attribute("y"))
        assert mark.bounding_box()["width"] > 10

    style = page.evaluate("""() => ['.hs-heads', '.hs-explorer', 'select.hs-score'].map(q => {
        const c = getComputedStyle(document.querySelector(q)); return [c.backgroundColor, c.color]; })""")
    assert style == [["rgb(255, 255, 255)", "rgb(17, 17, 17)"]] * 3                 # readable on a dark page

def test_without_javascript(browser, tmp_path, data):
    "With scripts off, every score panel and the static pattern stay visible, and the dead controls stay hidden"
    pats, scores = data
    ctx = browser.new_context(java_script_enabled=False)
    page = ctx.new_page()
    page.goto(write(tmp_path, head_heatmap_html(scores, TOKS, pats, n_kv_heads=2)))
    assert page.locator(".hs-panel:visible").count() == 3
    assert page.is_visible(".hs-fallback svg") and page.is_hidden(".hs-controls") and page.is_hidden(".hs-picker") and page.is_hidden(".hs-cv")
    assert XSS.replace(" ", "␣") in page.locator(".hs-fallback").text_content()    # a label's tooltip, as text
    assert page.evaluate("document.querySelectorAll('.hs-fallback script').length") == 0
    page.goto(write(tmp_path, attention_explorer_html([f"t{i}" for i in range(100)], causal_softmax(torch.randn(1, 2, 100, 100)))))
    assert page.locator(".hs-fallback img").bounding_box()["width"] >= 500           # over 64 tokens: a PNG, scaled up
    ctx.close()

# --- issue 14, item 11: one token display ---------------------------------------------------------------------

def test_tokenizer_pieces_shown_as_text(data):
    "A list a tokenizer made (`convert_ids_to_tokens`: ĠMary, Ċ) is shown like decoded text: ␣Mary, ↵; shown tokens stay as they are"
    from headscope.models import byte_tokenizer
    from headscope.tokens import show_tokens
    from headscope.widgets.heads import AttentionExplorer
    pats, _ = data
    gpt2 = ["<|endoftext|>", "When", "ĠMary", "Ċ", "ĠJohn", "Ã©"]                 # GPT-2 / SmolLM2 vocabulary pieces
    h = attention_explorer_html(gpt2, pats)
    assert "ĠMary" not in h and "Ċ" not in h and "␣Mary" in h and "↵" in h and "é" in h
    assert embedded(h)[0]["tokens"] == ["<|endoftext|>", "When", "␣Mary", "↵", "␣John", "é"]
    bt = byte_tokenizer()
    ids = bt("When Mary\n")["input_ids"]
    pieces = bt.convert_ids_to_tokens(ids)
    assert "Ġ" in pieces
    t = torch.eye(len(ids))[None, None]
    assert embedded(attention_explorer_html(pieces, t))[0]["tokens"] == show_tokens(bt, ids)      # pieces, as cache.tokens shows them
    assert embedded(attention_explorer_html(show_tokens(bt, ids), t))[0]["tokens"] == show_tokens(bt, ids)   # idempotent
    assert AttentionExplorer(gpt2, pats).tokens[2] == "␣Mary"
    assert "ĠMary" not in head_heatmap_html({"s": torch.rand(3, 4)}, gpt2, pats)

# --- item 12: BOS or not ---------------------------------------------------------------------------------------

def test_first_token_wording(data):
    "Without a BOS the mode says 'first token removed' and the help names the attention sink; with one, 'BOS removed'"
    from headscope.widgets.heads import AttentionExplorer, census_explorer
    pats, scores = data
    words = ["When", "␣Mary", "␣met", "␣John", "↵", "."]
    no = attention_explorer_html(words, pats, first_is_special=False, remove_bos=True)
    assert "BOS removed" not in no and "first token removed, renormalised" in no and "attention sink" in no
    assert "L0H0 (first token removed)" in no                                        # the static heading
    assert "BOS removed, renormalised" in attention_explorer_html(words, pats, first_is_special=True)
    assert "BOS removed, renormalised" in attention_explorer_html(TOKS, pats)        # None: `<bos>` looks special
    assert "first token removed" in attention_explorer_html(words, pats)             # None: `When` does not
    w = AttentionExplorer(words, pats, first_is_special=False)
    assert w.mode_tb.options[1][0] == "first token removed, renormalised" and "attention sink" in w.mode_tb.tooltips[1]
    w.mode = "bos"
    assert w.out.outputs[0]["data"]["text/plain"] == "L0H0 (first token removed)"
    assert "BOS removed" not in w.to_html()

    class Census:                                                                    # census_explorer reads these fields only
        n_layers, n_heads, n_kv_heads, descriptions = 2, 4, 2, {}
        scores = {"s": torch.rand(2, 4)}
    from headscope.models import tiny_model
    m = tiny_model("llama", n_layers=2, n_heads=4, n_kv_heads=2, attn_implementation="eager")
    v = census_explorer(Census(), m, "When Mary")
    assert v.explorer.first_is_special is True and v.explorer.mode_tb.options[1][0] == "BOS removed, renormalised"
    m.tokenizer.add_bos_token = False                                                # a tokenizer without a BOS, like SmolLM2's
    m.tokenizer._tokenizer.post_processor = None
    v = census_explorer(Census(), m, "When Mary")
    assert v.explorer.tokens[0] == "W" and v.explorer.first_is_special is False
    assert v.explorer.mode_tb.options[1][0] == "first token removed, renormalised"

# --- item 13: sizes, and the data decoded in the browser --------------------------------------------------------

def causal(n_layers, n_heads, n, g):
    return causal_softmax(torch.randn(n_layers, n_heads, n, n, generator=g))

def test_page_sizes():
    "A static explorer of 30 layers x 9 heads: under 1.5 MB for 260 tokens, under 200 KB for 14 (random causal patterns: the worst case)"
    g = torch.Generator().manual_seed(0)
    toks = [f"␣w{i}" for i in range(260)]
    big = attention_explorer_html(toks, causal(30, 9, 260, g), n_kv_heads=3)
    small = attention_explorer_html(toks[:14], causal(30, 9, 14, g), n_kv_heads=3)
    assert len(big.encode()) < 1_500_000, len(big.encode())
    assert len(small.encode()) < 200_000, len(small.encode())
    assert embedded(small)[1].levels == 255                                          # small pages lose nothing
    for h in (big, small): assert not re.search(r"<script[^>]*\bsrc\s*=", h) and "CircuitsVis" not in h

def test_decoded_in_browser(offline, tmp_path):
    "In Chromium, every head decodes (both modes) to the quantised weights, within 1/255 of the patterns; sink, non-causal and unnormalised rows too"
    g = torch.Generator().manual_seed(3)
    toks = [f"t{i}" for i in range(20)]
    cases = {"causal": causal(2, 3, 20, g)}
    cases["causal"][1, 1] = 0.995 * torch.eye(20)[[0] * 20] + 0.005 * torch.eye(20)   # a sink: 0.5% outside key 0
    full = torch.rand(2, 3, 20, 20, generator=g)
    cases["not causal"], cases["rows sum to 0.5"] = full / full.sum(-1, keepdim=True), 0.5 * full / full.sum(-1, keepdim=True)
    page = offline
    for name, p in cases.items():
        h = attention_explorer_html(toks, p)
        D, d = embedded(h)
        page.goto(write(tmp_path, h))
        page.wait_for_function(painted())
        got = page.evaluate("""async (M) => { const S = await window.hsPatterns1.load(M), out = {raw: [], bos: []};
            for (const m of ["raw", "bos"]) for (let l = 0; l < M.nl; l++) for (let h = 0; h < M.nh; h++) out[m].push(S.head(l, h, m));
            return out; }""", D["data"])
        for mode, ref in (("raw", p), ("bos", _drop_bos(p))):
            js = torch.tensor(got[mode], dtype=torch.float64).view(2, 3, 20, 20)
            assert (js - decode_patterns(d, mode)).abs().max() < 1e-12, name                  # the browser decodes as Python does
            assert (js - ref.double()).abs().max() <= 1 / 255, (name, mode)                 # and that is the pattern, to 1/255
    assert (d.causal, d.mass) == (False, True)

def test_big_page_draws(offline, tmp_path):
    "The issue's big case (30 x 9 x 260, 1.4 MB) opens and draws in Chromium, decoded to the quantised weights"
    g = torch.Generator().manual_seed(4)
    p = causal(30, 9, 260, g)
    h = attention_explorer_html([f"␣w{i}" for i in range(260)], p, n_kv_heads=3, layer=29, head=8)
    D, d = embedded(h)
    page = offline
    page.goto(write(tmp_path, h))
    s = shown(page)
    assert (s["layer"], s["head"]) == ("29", "8") and min(s["size"]) > 500
    ref = decode_patterns(d)
    assert close(s["values"], ref[29, 8], 1e-12) and close(s["values"], p[29, 8], 1 / (2 * d.levels) + 1e-4)
    page.select_option("select.hs-layer", "3")
    assert close(shown(page)["values"], ref[3, 8], 1e-12)

# --- item 14: the static copy opens where the widget is ---------------------------------------------------------

def test_static_copy_opens_at_selection(offline, tmp_path, data):
    "Set the widgets' traits; their static copies (the MIME bundle's text/html) open at that layer, head, mode and mark, in Chromium too"
    from headscope.widgets.heads import AttentionExplorer, head_views
    pats, scores = data
    ex = AttentionExplorer(TOKS, pats, n_kv_heads=2)
    ex.layer, ex.head, ex.mode = 2, 3, "bos"
    h = ex._repr_mimebundle_()["text/html"]
    D, _ = embedded(h)
    assert (D["layer"], D["head"], D["mode"]) == (2, 3, "bos")
    page = offline
    page.goto(write(tmp_path, h))
    s = shown(page)
    assert (s["layer"], s["head"], s["mode"], s["now"]) == ("2", "3", "bos", "L2H3 · kv1 (BOS removed)")
    assert (page.input_value("select.hs-layer"), page.input_value("select.hs-head"), page.is_checked("input.hs-mode[value=bos]")) == ("2", "3", True)

    v = head_views(scores, TOKS, pats, n_kv_heads=2)
    v.heatmap.score.value = "attr"
    v.heatmap.buttons[1][2].click()
    v.explorer.mode = "bos"
    page.goto(write(tmp_path, v._repr_mimebundle_()["text/html"]))
    s = shown(page)
    assert (s["layer"], s["head"], s["mode"]) == ("1", "2", "bos")
    assert page.get_attribute(".hs-heads", "data-score") == "attr"
    mark = page.locator(".hs-panel:visible rect.hs-mark")
    cell = page.locator(".hs-panel:visible rect.hs-cell[data-l='1'][data-h='2']")
    assert mark.is_visible() and (mark.get_attribute("x"), mark.get_attribute("y")) == (cell.get_attribute("x"), cell.get_attribute("y"))

def test_displayed_copy_follows_the_widget(monkeypatch, data):
    "Displayed in a notebook, a widget's saved output is updated on every change of its selection (so the saved notebook reopens there)"
    import IPython.display as ipd
    from headscope.widgets.heads import head_views
    pats, scores = data
    handles = []
    class Handle:
        def __init__(self, d): self.data = [d]; handles.append(self)
        def update(self, d, raw=False): assert raw; self.data.append(d)
    monkeypatch.setattr(ipd, "display", lambda d, raw=False, display_id=None: Handle(d))
    v = head_views(scores, TOKS, pats, n_kv_heads=2)
    v._ipython_display_()
    v.heatmap.buttons[2][1].click()
    v.explorer.mode_tb.value = "bos"
    v.heatmap.score.value = "sink"
    (h,) = handles
    opened = [(embedded(d["text/html"])[0]["layer"], embedded(d["text/html"])[0]["head"], embedded(d["text/html"])[0]["mode"]) for d in h.data]
    assert opened == [(0, 0, "raw"), (2, 1, "raw"), (2, 1, "bos"), (2, 1, "bos")]
    assert "<option value='sink' selected" in h.data[-1]["text/html"]
    assert all("application/vnd.jupyter.widget-view+json" in d for d in h.data)
    assert v.heatmap.buttons[2][1].description == "●" and v.heatmap.buttons[0][0].description == ""   # the live heatmap marks its head

# --- item 15: every view draws on load ----------------------------------------------------------------------------

def test_two_explorers_draw_on_load(offline, tmp_path, data):
    "Two explorers (and a third inside a heatmap) on one page: each has a real size and a painted canvas right after load, no click"
    pats, scores = data
    body = (attention_explorer_html(TOKS, pats, layer=1, head=2) + attention_explorer_html(TOKS[:4], pats[:, :, :4, :4], layer=2)
            + head_heatmap_html(scores, TOKS, pats))
    page = offline
    page.goto(write(tmp_path, body))
    ids = page.evaluate("[...document.querySelectorAll('.hs-explorer')].map(e => e.id)")
    assert len(ids) == 3
    for i in ids:
        s = shown(page, f"#{i}")
        assert min(s["size"]) > 100, s["size"]
    assert page.evaluate("[...document.querySelectorAll('.hs-fallback')].every(f => getComputedStyle(f).display === 'none')")

# --- item 19: the census page in a dark theme ---------------------------------------------------------------------

class ToyCensus:
    "What census_html reads of a HeadCensus"
    model_name, n_kv_heads = "toy", 2
    def __init__(self, scores):
        self.scores = scores
        self.descriptions = {"sink": "mean over q ≥ 1 of A[q, 0]"}
        self.thresholds = {"sink": ("sink", ">=", 0.5), "previous token": ("prev_token", ">=", 0.5)}
    def heads(self, role):
        sc, _, v = self.thresholds[role]
        s = self.scores[sc]
        return sorted(((l, h) for l in range(s.shape[0]) for h in range(s.shape[1]) if s[l, h] >= v), key=lambda lh: -float(s[lh]))
    def __repr__(self): return "HeadCensus(toy, 3 layers x 4 heads)"

# JupyterLab's dark theme styles these tags inside an output (tables, code, rows on hover...): a view must not inherit any of it
DARK = ("<style>table,thead,tbody,tr,th,td,code,b,span,div,label,select,option,button,small,p{color:#eeeeee;background-color:#222222}"
        "tbody tr:nth-child(odd){background-color:#333333}</style>")

def test_census_in_a_dark_theme(offline, tmp_path, data):
    "Under dark-theme CSS every element of the census page has its own dark-on-white colours; a click marks the head"
    pats, scores = data
    page = offline
    page.goto(write(tmp_path, DARK + census_html(ToyCensus(scores), TOKS, pats)))
    shown(page)
    bad = page.evaluate("""() => [...document.querySelectorAll('.hs-census, .hs-census *')]
        .filter(e => !(e instanceof SVGElement) && !['SCRIPT', 'STYLE', 'BR', 'CANVAS', 'OPTGROUP', 'IMG', 'INPUT'].includes(e.tagName))
        .map(e => { const c = getComputedStyle(e); return [e.tagName + '.' + e.className, c.color, c.backgroundColor]; })
        .filter(([n, fg, bg]) => fg === 'rgb(238, 238, 238)' || !['rgb(255, 255, 255)', 'rgb(17, 17, 17)'].includes(bg))""")
    assert bad == [], bad
    cells = page.evaluate("""() => ['.hs-roles td', '.hs-roles th', '.hs-roles b', '.hs-roles code', '.hs-census .hs-title', '.hs-heads .hs-title', '.hs-desc b']
        .map(q => { const c = getComputedStyle(document.querySelector(q)); return [q, c.color, c.backgroundColor]; })""")
    assert all(fg == "rgb(17, 17, 17)" and bg == "rgb(255, 255, 255)" for _, fg, bg in cells), cells
    assert page.inner_text(".hs-roles tbody tr:first-child td:first-child") == "sink"
    page.locator(".hs-panel:visible rect.hs-cell[data-l='1'][data-h='2']").click()
    assert page.locator(".hs-panel:visible rect.hs-mark").is_visible() and page.get_attribute(".hs-heads", "data-selected") == "1,2"
    assert shown(page)["head"] == "2"

NOTEBOOK = r'''
import torch
from headscope.widgets.heads import AttentionExplorer, HeadHeatmap
g = torch.Generator().manual_seed(0)
pats = torch.randn(3, 4, 6, 6, generator=g).softmax(-1)
toks = ["<bos>", "a", "b", "c", "d", "e"]
ex = AttentionExplorer(toks, pats, n_kv_heads=2)
hm = HeadHeatmap({"score": torch.rand(3, 4, generator=g)}, explorer=ex)
display(hm, ex)
'''

def free_port()->int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

@contextlib.contextmanager
def voila_page(source:str, tmp_path, page, allowed, refused):
    "Serve a one-cell notebook holding `source` with Voila on 127.0.0.1, open it in `page` (offline but for that server), stop the server after"
    import nbformat
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    nbformat.write(nb, tmp_path/"nb.ipynb")
    port, bin_ = free_port(), Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_}{os.pathsep}{os.environ.get('PATH', '')}", "JUPYTER_RUNTIME_DIR": str(tmp_path/"rt")}
    log = open(tmp_path/"voila.log", "wb")
    # cwd=tmp_path: the kernel must not start in the repo root, whose kernels/ folder shadows Hugging Face's `kernels`
    proc = subprocess.Popen([str(bin_/"voila"), "nb.ipynb", "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1"],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url, t = f"http://127.0.0.1:{port}/", time.time()
        while True:
            try: urllib.request.urlopen(url + "voila/static/", timeout=2); break
            except urllib.error.HTTPError: break                                   # the server answers
            except OSError:
                assert proc.poll() is None and time.time() - t < 60, (tmp_path/"voila.log").read_text()[-3000:]
                time.sleep(0.2)
        allowed.append(url)                                                         # this one local server, nothing else
        refused.append("https://cdn.jsdelivr.net/npm/@fortawesome/")                # Voila's own page links Font Awesome from a CDN
        page.goto(url, timeout=120_000)
        yield page
    finally:
        proc.terminate()
        try: proc.wait(10)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()
        log.close()

@pytest.mark.slow
def test_widgets_in_voila(offline, allowed, refused, tmp_path):
    "Live kernel: changing the layer dropdown, then clicking a heatmap button, redraws the Output through Python (~25-35 s)"
    if not os.environ.get("CI"): pytest.importorskip("voila")
    with voila_page(NOTEBOOK, tmp_path, offline, allowed, refused) as page:
        out = page.locator(".widget-output")
        out.get_by_text("L0H0 · kv0").first.wait_for(timeout=120_000)             # the Python side drew the first head
        out.locator("canvas").first.wait_for(timeout=30_000)                        # and the canvas script drew it in the Output
        layer = page.locator(".widget-dropdown", has_text="Layer").locator("select")
        layer.select_option(label="L2")
        out.get_by_text("L2H0 · kv0").first.wait_for(timeout=30_000)             # ... and redrew through the callback
        assert out.get_by_text("L0H0 · kv0").count() == 0
        page.locator("button[title^='L1H3 · kv1: score = ']").click()               # a heatmap cell
        out.get_by_text("L1H3 · kv1").first.wait_for(timeout=30_000)             # the click reached the explorer
        picked = lambda label: page.locator(".widget-dropdown", has_text=label).locator("select option:checked").inner_text().replace("\xa0", " ")   # ipywidgets writes spaces as &nbsp;
        assert (picked("Layer"), picked("Head")) == ("L1", "L1H3 · kv1")           # and set its pickers
