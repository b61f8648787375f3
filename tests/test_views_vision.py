"""The image-grid attention view: escaping, size, the embedded data against the patterns, the page's own JS decoder
(run in node) against the Python decoder, and, where Chromium is installed, clicks and the head selector in a real
browser (skipped cleanly otherwise)."""
import json, re, shutil, subprocess
import pytest
import torch

from headscope.heads.vision import PatchGrid, vision_head_scores
from headscope.views.vision import image_attention_html, image_attention_figure, vision_scores_html, _decode, _DECODE_JS

XSS = "</script><script>alert(1)</script>"
G = PatchGrid(8, 8)                       # 64 patches + CLS = 65 tokens

@pytest.fixture(scope="module")
def data():
    "A random image and random patterns [layer=2 batch=2 head=4 65 65], seeded"
    g = torch.Generator().manual_seed(0)
    pats = (torch.randn(2, 2, 4, 65, 65, generator=g) * 3).softmax(-1)
    return torch.rand(3, 32, 32, generator=g), pats

def embedded(page):
    return json.loads(re.search(r"class='hs-data'>(.*?)</script>", page).group(1))

def test_data_and_size(data):
    "2 layers x 4 heads x 65 tokens stays far under 300 kB; the embedded rows are the patterns of the chosen image"
    image, pats = data
    page = image_attention_html(image, {"blocks.3.attn.hook_pattern": pats[0], "blocks.7.attn.hook_pattern": pats[1]}, G, row=1, layer=7, head=2)
    assert len(page.encode()) < 100_000, len(page.encode())
    D = embedded(page)
    A = _decode(D["data"])
    ref = pats[:, 1].double()
    assert A.shape == ref.shape
    assert ((A - ref).abs() <= ref.amax(-1, keepdim=True) / 510 + 1e-3 * ref.amax(-1, keepdim=True)).all()
    assert (A.argmax(-1) == ref.argmax(-1)).float().mean() > 0.99
    assert D["names"] == [[f"L3H{h}" for h in range(4)], [f"L7H{h}" for h in range(4)]]
    assert "value='1,2' selected" in page                      # the requested first head
    # the static cells (drawn before any JS) show the decoded row of the central patch, scaled by its maximum
    q = G.token(4, 4)
    alphas = torch.tensor([float(a) for a in re.findall(r"class='hs-cell'[^>]*rgba\(17,17,17,([0-9.]+)\)", page)])
    row = A[1, 2, q, 1:]
    assert torch.allclose(alphas, (0.8 * (1 - row / row.max())).float(), atol=6e-4)

def test_escaping(data):
    "Title and prefix names stay text; the data script cannot be closed from inside"
    image, pats = data
    page = image_attention_html(image, pats[0], G, title=XSS + " & <b>", prefix_names=[XSS])
    assert "alert(1)" not in page.replace("\\u003c/script\\u003e\\u003cscript\\u003ealert(1)", "").replace("&lt;/script&gt;&lt;script&gt;alert(1)", "")
    assert page.count("<script") == 2 and page.count("</script>") == 2
    assert "&amp; &lt;b&gt;" in page
    assert embedded(page)["prefix"] == [XSS]                     # the JSON parses back to the very string

def test_bad_input(data):
    image, pats = data
    with pytest.raises(ValueError, match="q = k = 50"): image_attention_html(image, pats, PatchGrid(7, 7))
    with pytest.raises(ValueError, match=r"\[3 H W\]"): image_attention_html(torch.zeros(4, 8, 8), pats, G)
    with pytest.raises(ValueError, match="images 0..1"): image_attention_html(image, pats, G, row=2)
    with pytest.raises(ValueError, match="heads 0..3"): image_attention_html(image, pats, G, head=4)

@pytest.mark.skipif(shutil.which("node") is None, reason="needs node")
def test_js_decoder_matches_python(data):
    "The page's own `hsVisionDecode`, run in node on the embedded data, gives the Python decoder's numbers"
    image, pats = data
    page = image_attention_html(image, pats, G)
    assert _DECODE_JS in page
    D = embedded(page)["data"]
    js = _DECODE_JS + "\nconst atob = s => Buffer.from(s, 'base64').toString('latin1');\n" \
         "const D = JSON.parse(require('fs').readFileSync(0, 'utf8'));\nprocess.stdout.write(JSON.stringify(Array.from(hsVisionDecode(D))));"
    out = subprocess.run(["node", "-e", js], input=json.dumps(D), capture_output=True, text=True, timeout=60, check=True).stdout
    got = torch.tensor(json.loads(out), dtype=torch.float64).view(2, 4, 65, 65)
    assert torch.equal(got, _decode(D))

def test_figure(data):
    "One panel per head; each spotlight dims the patches by 1 - the head's row from the query over its maximum"
    import matplotlib.pyplot as plt
    image, pats = data
    fig = image_attention_figure(image, pats, G, query=(1, 6), layer=1, heads=[0, 3], row=1)
    try:
        assert [a.get_title().split()[0] for a in fig.axes] == ["L1H0", "L1H3"]
        for ax, h in zip(fig.axes, [0, 3]):
            r = pats[1, 1, h, G.token(1, 6), 1:].double().view(8, 8)
            assert torch.allclose(torch.tensor(ax.images[1].get_array()[..., 3]).double(), 0.8 * (1 - r / r.max()), atol=1e-6)
    finally: plt.close(fig)

def test_scores_table():
    "The table names each head by its class and escapes the title"
    n = G.n_tokens
    A = torch.stack([torch.eye(n), torch.full((n, n), 1 / n)])[None]          # [batch head q k]: on itself, uniform
    res = vision_head_scores(A, G)
    h = vision_scores_html(res, title="<x>")
    assert re.findall(r">(\w+)<br>", h) == ["local", "global"] and "&lt;x&gt;" in h and "<x>" not in h

# ---------------------------------------------------------------- in a real browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
browser = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)")

@pytest.fixture
def offline(page):
    "`page` with every request off file:/data: refused and recorded, and dialogs and script errors recorded"
    sent, dialogs, errors = [], [], []
    ok = ("file:", "data:", "blob:", "about:")
    page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(ok) else r.abort())
    page.on("request", lambda r: None if r.url.startswith(ok) else sent.append(r.url))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    assert not sent and not dialogs and not errors, (sent, dialogs, errors)

@browser
def test_clicks_in_browser(offline, tmp_path, data):
    "Clicking a patch, the head selector and the CLS button each show the right row, as the Python decoder reads it"
    image, pats = data
    page_html = image_attention_html(image, pats[:, 0:1], G, title=XSS, prefix_names=[XSS])   # [layer batch=1 head q k]
    A = _decode(embedded(page_html)["data"])
    p = tmp_path / "v.html"
    p.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'></head><body style='background:#111;color:#eee'>"
                 + page_html + "</body></html>", encoding="utf-8")
    page = offline
    page.goto(p.as_uri())
    shown = lambda: page.evaluate("document.querySelector('.hs-vision').hsShown")
    s = shown()
    assert (s["layer"], s["head"], s["query"]) == (0, 0, G.token(4, 4))
    assert torch.equal(torch.tensor(s["values"], dtype=torch.float64), A[0, 0, G.token(4, 4)])
    page.click(".hs-cell[data-r='2'][data-c='5']")
    assert page.inner_text(".hs-read").startswith("→ patch (2, 5):")
    s = shown()
    assert s["query"] == G.token(2, 5) and torch.equal(torch.tensor(s["values"], dtype=torch.float64), A[0, 0, G.token(2, 5)])
    page.select_option("select.hs-head", "1,3")
    s = shown()
    assert (s["layer"], s["head"]) == (1, 3) and torch.equal(torch.tensor(s["values"], dtype=torch.float64), A[1, 3, G.token(2, 5)])
    assert "L1H3" in page.inner_text(".hs-now")
    page.click("button.hs-pre")
    s = shown()
    assert s["query"] == 0 and torch.equal(torch.tensor(s["values"], dtype=torch.float64), A[1, 3, 0])
    # the cells now carry the CLS row, scaled by its maximum over the patches
    alpha = page.evaluate("[...document.querySelectorAll('.hs-cell')].map(c => parseFloat(c.style.backgroundColor.split(',')[3]))")
    r = A[1, 3, 0, 1:]
    assert torch.allclose(torch.tensor(alpha, dtype=torch.float64), 0.8 * (1 - r / r.max()), atol=1 / 255)   # Chromium keeps alpha in 8 bits
    page.hover(".hs-cell[data-r='0'][data-c='0']")
    assert page.inner_text(".hs-read").startswith("→ patch (0, 0):")
    assert page.evaluate("document.querySelectorAll('img').length") == 1         # only the image: no markup from the title
    assert XSS in page.inner_text(".hs-vision > div")
