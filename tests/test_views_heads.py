"""The head views in a real browser: headless Chromium (Playwright) on the static pages, and Voila for the
widgets' Python callbacks.

Every page is tiny (3 layers x 4 heads x 6 tokens): circuitsvis is slow to draw big views headless. Each page
test fails if the page asks for anything but file:, data:, blob: or about: URLs, or if a dialog opens (the
hostile token below would open one if it ever ran as markup)."""
import contextlib, os, socket, subprocess, sys, time, urllib.error, urllib.request
from pathlib import Path
import pytest
import torch

from headscope.views.heads import attention_explorer_html, head_heatmap_html, _colours, _drop_bos, _milli

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

PAINTED = """() => { const c = document.querySelector('.hs-explorer .hs-cv canvas');
    if (!c || !c.width) return false;
    const blank = document.createElement('canvas'); blank.width = c.width; blank.height = c.height;
    return c.toDataURL() !== blank.toDataURL(); }"""

def shown(page):
    "What the explorer shows, once circuitsvis has painted: its data-* state, the numbers drawn, the canvas pixels, the heading"
    page.wait_for_function(PAINTED)
    return page.evaluate("""() => { const r = document.querySelector('.hs-explorer');
        return {layer: r.dataset.layer, head: r.dataset.head, mode: r.dataset.mode, values: r.hsShown,
                pixels: r.querySelector('.hs-cv canvas').toDataURL(), now: r.querySelector('.hs-now').textContent,
                cv: r.querySelector('.hs-cv > div').id} }""")

def expect(p):
    "The numbers the page should draw for pattern `p`: thousandths, as embedded"
    return [[v / 1000 for v in row] for row in _milli(p)]

def test_explorer(offline, tmp_path, data):
    "It draws with circuitsvis; layer, head and the BOS toggle each change what is drawn, to the right numbers"
    pats, _ = data
    page = offline
    title = "<img src=x onerror=alert(2)> heads"
    page.goto(write(tmp_path, attention_explorer_html(TOKS, pats, n_kv_heads=2, title=title)))
    s0 = shown(page)
    assert (s0["layer"], s0["head"], s0["mode"], s0["now"]) == ("0", "0", "raw", "L0H0 · kv0")
    assert s0["values"] == expect(pats[0, 0])
    assert page.is_hidden(".hs-fallback") and page.is_visible(".hs-controls")      # the static copy gives way
    assert page.locator(".hs-cv canvas").count() == 1                               # one head drawn, not twelve

    page.select_option("select.hs-layer", "1")
    s1 = shown(page)
    assert (s1["layer"], s1["head"], s1["now"]) == ("1", "0", "L1H0 · kv0")
    assert s1["values"] == expect(pats[1, 0]) and s1["pixels"] != s0["pixels"] and s1["cv"] != s0["cv"]
    assert page.locator("select.hs-head option").all_inner_texts() == ["L1H0 · kv0", "L1H1 · kv0", "L1H2 · kv1", "L1H3 · kv1"]

    page.select_option("select.hs-head", "2")                                       # the sink head
    s2 = shown(page)
    assert (s2["head"], s2["now"]) == ("2", "L1H2 · kv1") and s2["values"] == expect(pats[1, 2]) and s2["pixels"] != s1["pixels"]

    page.check("input.hs-mode[value=bos]")
    s3 = shown(page)
    assert (s3["mode"], s3["now"]) == ("bos", "L1H2 · kv1 (BOS removed)")
    assert s3["values"] == expect(_drop_bos(pats[1, 2])) and s3["pixels"] != s2["pixels"]
    assert s3["values"][0] == [0] * 6 and [r[0] for r in s3["values"]] == [0] * 6   # no key 0; query 0 empty
    assert [s3["values"][q][q] for q in range(1, 6)] == [1] * 5                     # what the sink hid: itself

    page.click("button.hs-chip[data-h='3']")                                        # the head buttons, grouped by KV head
    s4 = shown(page)
    assert (s4["head"], s4["mode"], page.input_value("select.hs-head")) == ("3", "bos", "3")
    assert page.locator(".hs-group[data-kv='1'] button.hs-chip").all_inner_texts() == ["H2", "H3"]
    page.check("input.hs-mode[value=raw]")
    assert shown(page)["values"] == expect(pats[1, 3])

    # untrusted text stays text: no element or script came from the token or the title, no dialog opened
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    assert page.evaluate("[...document.scripts].every(s => !s.text.includes('alert(1)') || s.type === 'application/json')")
    assert title in page.inner_text(".hs-explorer > div")
    assert XSS.strip() in page.evaluate("document.querySelector('.hs-fallback').textContent")

def test_heatmap(offline, tmp_path, data):
    "Score picker recolours; hover reads out a value; a click opens that head in the explorer; a white panel on a dark page"
    pats, scores = data
    page = offline
    page.goto(write(tmp_path, head_heatmap_html(scores, TOKS, pats, n_kv_heads=2, descriptions={"attr": "a signed toy score"})))
    first = shown(page)
    assert (first["layer"], first["head"]) == ("0", "0")
    cell = lambda l, h: page.locator(f".hs-panel:visible rect.hs-cell[data-l='{l}'][data-h='{h}']")
    assert page.locator(".hs-panel:visible").count() == 1 and page.locator(".hs-panel:visible .hs-kv").count() == 2
    assert cell(0, 0).get_attribute("fill") == _colours(scores["prev_token"], False)[0][0]

    page.select_option("select.hs-score", "attr")
    assert page.get_attribute(".hs-heads", "data-score") == "attr"
    attr = _colours(scores["attr"], True)                                           # diverging RdBu
    assert [cell(0, h).get_attribute("fill") for h in range(4)] == attr[0]
    assert attr[0] != _colours(scores["prev_token"], False)[0]
    assert cell(2, 3).get_attribute("fill") == "#d4d4d4"                            # NaN: not computed
    assert "a signed toy score" in page.inner_text(".hs-panel:visible .hs-desc")
    assert page.locator(".hs-panel:visible .hs-colourbar text").all_text_contents()[-1] == "0"   # zero marked mid-bar

    cell(2, 1).hover()
    v = scores["attr"][2, 1].item()
    assert page.inner_text(".hs-readout") == f"L2H1 · kv0: attr = {v:.3g}"

    cell(2, 3).click()
    s = shown(page)
    assert (s["layer"], s["head"], s["now"]) == ("2", "3", "L2H3 · kv1") and s["values"] == expect(pats[2, 3])
    assert s["pixels"] != first["pixels"]
    assert (page.input_value("select.hs-layer"), page.input_value("select.hs-head")) == ("2", "3")
    assert page.get_attribute(".hs-heads", "data-selected") == "2,3"
    mark = page.locator(".hs-panel:visible rect.hs-mark")
    assert mark.is_visible() and (mark.get_attribute("x"), mark.get_attribute("y")) == (cell(2, 3).get_attribute("x"), cell(2, 3).get_attribute("y"))

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
    assert page.is_visible(".hs-fallback svg") and page.is_hidden(".hs-controls") and page.is_hidden(".hs-picker")
    assert XSS.replace(" ", "␣") in page.locator(".hs-fallback").text_content()    # a label's tooltip, as text
    assert page.evaluate("document.querySelectorAll('.hs-fallback script').length") == 0
    ctx.close()

NOTEBOOK = r'''
import torch
from headscope.views.heads import AttentionExplorer, HeadHeatmap
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
        out.locator("canvas").first.wait_for(timeout=30_000)                        # and circuitsvis drew it in the Output
        layer = page.locator(".widget-dropdown", has_text="Layer").locator("select")
        layer.select_option(label="L2")
        out.get_by_text("L2H0 · kv0").first.wait_for(timeout=30_000)             # ... and redrew through the callback
        assert out.get_by_text("L0H0 · kv0").count() == 0
        page.locator("button[title^='L1H3 · kv1: score = ']").click()               # a heatmap cell
        out.get_by_text("L1H3 · kv1").first.wait_for(timeout=30_000)             # the click reached the explorer
        picked = lambda label: page.locator(".widget-dropdown", has_text=label).locator("select option:checked").inner_text().replace("\xa0", " ")   # ipywidgets writes spaces as &nbsp;
        assert (picked("Layer"), picked("Head")) == ("L1", "L1H3 · kv1")           # and set its pickers
