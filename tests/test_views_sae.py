"""The SAE feature card in headless Chromium (Playwright), `feature_effect` against a plain PyTorch hook, the
import layers (a view imports no analysis), and `FeatureBrowser`'s feature picker and Ablate button in Voila.

The page fixtures come from test_views_heads: each page test fails if the page asks for anything but file:,
data:, blob: or about: URLs, if a script throws, or if a dialog opens (the hostile tokens below would open one
if they ever ran as markup)."""
import math, os
import pytest
import torch

from test_views_heads import allowed, refused, offline, write, voila_page       # fixtures and helpers, shared
from headscope.models import tiny_model
from headscope.hooking import to_inputs
from headscope.sae.core import make_sae
from headscope.sae.features import FeatureActivations, LogitEffects, feature_effect
from headscope.views.sae import feature_card_html
from headscope.widgets.sae import FeatureBrowser

XSS, IMG = "<script>alert(1)</script>", "<img src=x onerror=alert(2)>"
VOCAB = ["<bos>", " The", " cat", " sat", XSS, " on", IMG, " mat", "."]

class Tok:
    "A tokenizer for the toy: id i is VOCAB[i]"
    def decode(self, ids, **kw): return "".join(VOCAB[i] for i in ids)

def toy_acts():
    "Two features; feature 7 has two contexts (the first peaking on the <script> token) and a 3-bin histogram"
    ctx_t = torch.tensor([[[1, 2, 3, 4, 5], [2, 3, 6, 7, 8]], [[-1, 0, 1, 2, 3], [-1, -1, -1, -1, -1]]])
    nan = math.nan
    ctx_a = torch.tensor([[[0., 1., 2., 4., 0.], [0., 0., 1.5, 3., 0.]], [[nan, 0., 0., .5, 0.], [nan] * 5]])
    hist = torch.zeros(2, 6, dtype=torch.long); hist[0, 1:4] = torch.tensor([5, 0, 2]); hist[1, 2] = 1
    return FeatureActivations(features=torch.tensor([7, 2]), values=torch.tensor([[4., 3.], [.5, 0.]]),
                              window=torch.tensor([[0, 3], [1, -1]]), pos=torch.tensor([[4, 7], [2, -1]]),
                              ctx_tokens=ctx_t, ctx_acts=ctx_a, counts=torch.tensor([7, 1]), sums=torch.tensor([14., .5]),
                              hist=hist, edges=torch.logspace(-2, 1, 7), n_tokens=100, context=(3, 1),
                              hook_name="blocks.3.attn.hook_z")

SPANS = """() => [...document.querySelectorAll('.hs-context')].map(c => [...c.querySelectorAll('span.hs-tok')].map(s =>
    [s.textContent, s.className, getComputedStyle(s).backgroundColor]))"""

def test_card(offline, tmp_path):
    "Contexts shaded by activation with the peak outlined, histogram bars, logit tokens, head bars; hostile tokens stay text"
    page = offline
    le = LogitEffects(7, torch.tensor([0., 2., -1., 0., 3., 0., -2., 1., 0.]), torch.tensor([4, 1]), torch.tensor([6, 2]),
                      [XSS, " The"], [IMG, " cat"])
    ha = torch.tensor([0.1, 0.6, 0.3, 0.0])
    page.goto(write(tmp_path, feature_card_html(toy_acts(), 7, Tok(), le, ha)))
    rows = page.evaluate(SPANS)
    assert [[t for t, *_ in r] for r in rows] == [[" The", " cat", " sat", XSS, " on"], [" cat", " sat", IMG, " mat", "."]]
    assert [[i for i, (_, c, _) in enumerate(r) if "hs-peak" in c] for r in rows] == [[3], [3]]
    assert rows[0][3][2] == "rgb(234, 88, 12)"                     # the max activation (4 of 4): opaque orange
    assert rows[0][0][2] == rows[0][4][2] == "rgba(234, 88, 12, 0)"     # zero: no shade
    assert rows[0][2][2] == "rgba(234, 88, 12, 0.5)"                 # 2 of 4
    assert rows[1][3][2] == "rgba(234, 88, 12, 0.75)"                # second context, same scale (3 of 4)
    assert page.locator(".hs-context").first.get_attribute("data-value") == "4"
    bars = page.locator("svg.hs-hist rect.hs-bar")
    assert [bars.nth(i).get_attribute("data-count") for i in range(bars.count())] == ["5", "0", "2"]
    h = [bars.nth(i).bounding_box()["height"] for i in (0, 2)]
    assert h[0] == pytest.approx(2.5 * h[1], rel=0.02)             # heights in proportion to counts
    assert page.locator(".hs-up .hs-ltok").all_text_contents() == [XSS, "␣The"]          # a token list shows its spaces
    assert page.locator(".hs-down .hs-ltok").all_text_contents() == [IMG.replace(" ", "␣"), "␣cat"]
    heads = page.locator(".hs-headbar")
    assert [heads.nth(i).inner_text().split()[0] for i in range(4)] == ["L3H0", "L3H1", "L3H2", "L3H3"]
    w = page.evaluate("[...document.querySelectorAll('.hs-headbar span:nth-child(2)')].map(s => s.getBoundingClientRect().width)")
    assert w[1] == pytest.approx(6 * w[0], rel=0.02) and w[3] == 0
    stats = page.inner_text(".hs-stats")
    assert "fires on 7 of 100 tokens (7%)" in stats and "max 4" in stats and "mean when firing 2" in stats
    assert page.evaluate("document.querySelectorAll('img').length") == 0 and page.evaluate("document.scripts.length") == 0
    style = page.evaluate("() => { const c = getComputedStyle(document.querySelector('.hs-feature')); return [c.backgroundColor, c.color]; }")
    assert style == ["rgb(255, 255, 255)", "rgb(17, 17, 17)"]     # readable on the dark page

def test_card_rare_feature(offline, tmp_path):
    "A feature that fired once: one context cut at the window's start (nothing drawn before BOS), no logit or head sections"
    page = offline
    page.goto(write(tmp_path, feature_card_html(toy_acts(), 2, Tok())))
    assert page.evaluate(SPANS) == [[["<bos>", "hs-tok", "rgba(234, 88, 12, 0)"], [" The", "hs-tok", "rgba(234, 88, 12, 0)"],
                                     [" cat", "hs-tok hs-peak", "rgb(234, 88, 12)"], [" sat", "hs-tok", "rgba(234, 88, 12, 0)"]]]
    assert page.locator(".hs-logits").count() == 0 and page.locator(".hs-headbar").count() == 0
    assert page.locator("svg.hs-hist rect.hs-bar").count() == 1

# --- the import layers: views draw, widgets drive, analyses never import a view at module level -------------------

FAMILY = ["headscope.data.corpora", "headscope.views.sae", "headscope.widgets.sae"] + [
    f"headscope.sae.{m}" for m in ("core", "relu", "topk", "jumprelu", "activations", "train", "eval", "transcoder", "features")]

def _module_imports(name):
    "headscope modules that `name` imports at module level (not inside functions, not under `if TYPE_CHECKING`)"
    import ast, importlib.util
    spec = importlib.util.find_spec(name)
    tree, pkg, out = ast.parse(open(spec.origin).read()), name.rsplit(".", 1)[0], set()
    for node in tree.body:
        if isinstance(node, ast.Import): out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + ([node.module] if node.module else []))
            for a in node.names:   # `from . import kernels` names a module; `from .x import y` the module x
                sub = f"{base}.{a.name}"
                out.add(sub if importlib.util.find_spec(base) and _is_module(sub) else base)
    return {m for m in out if m.startswith("headscope.") or m == "headscope"}

def _is_module(name):
    import importlib.util
    try: return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError: return False

def test_views_import_no_analysis():
    "`import headscope.views.sae` loads no `headscope.sae` module, statically and in a fresh interpreter"
    import subprocess, sys
    assert not [m for m in _module_imports("headscope.views.sae") if m.startswith("headscope.sae")]
    code = "import sys, headscope.views.sae; print([m for m in sys.modules if m.startswith('headscope.sae')])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    for m in FAMILY:
        if m.startswith("headscope.sae.") or m == "headscope.data.corpora":
            assert not [d for d in _module_imports(m) if d.startswith(("headscope.views", "headscope.widgets"))], m

def test_no_import_cycle():
    "The module-level import graph reachable from the SAE family has no cycle"
    graph, todo = {}, list(FAMILY)
    while todo:
        m = todo.pop()
        if m in graph: continue
        graph[m] = {d for d in _module_imports(m) if d != m and _is_module(d)}
        todo += graph[m]
    state = {}
    def visit(m, path):
        if state.get(m) == 1: raise AssertionError(f"import cycle: {' -> '.join(path[path.index(m):] + [m])}")
        if state.get(m) == 2: return
        state[m] = 1
        for d in sorted(graph.get(m, ())): visit(d, path + [m])
        state[m] = 2
    for m in FAMILY: visit(m, [])

# --- ablate and steer against a plain PyTorch hook -----------------------------------------------------------------

@pytest.fixture(scope="module")
def toy():
    "A tiny Llama and a random SAE on its layer-1 residual stream, encoder scaled so features are big enough to matter"
    m = tiny_model("llama", n_layers=2, seed=0)
    sae = make_sae("standard", 64, 32, seed=0, hook_name="blocks.1.hook_resid_post")
    with torch.no_grad(): sae.W_dec.mul_(10); sae.W_enc.mul_(500)   # unit decoder rows (the standard SAE starts at 0.1), big codes
    return m, sae

def reference(m, sae, f, prompt, mode, coeff):
    "Next-token log-probs with the residual edited by a forward hook on the HF block, and f's activation per token"
    ids = to_inputs(m, prompt)["input_ids"]
    got = {}
    def hook(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        a = sae.encode(h)[..., f:f + 1]
        got["a"] = a[0, :, 0]
        h = h - a * sae.W_dec[f] if mode == "ablate" else h + coeff * sae.W_dec[f]
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
    hd = m.model.layers[1].register_forward_hook(hook)
    try:
        with torch.no_grad(): new = m(ids).logits[0, -1].log_softmax(-1)
    finally: hd.remove()
    with torch.no_grad(): clean = m(ids).logits[0, -1].log_softmax(-1)
    return clean, new, got["a"]

@pytest.mark.parametrize("mode,coeff", [("ablate", 0.), ("steer", 3.), ("steer", -2.)])
def test_feature_effect(toy, mode, coeff):
    m, sae = toy
    r = feature_effect(m, sae, 6, "Hello there", mode, coeff)
    clean, new, a = reference(m, sae, 6, "Hello there", mode, coeff)
    torch.testing.assert_close(r["clean"], clean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r["new"], new, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r["acts"], a, rtol=1e-5, atol=1e-6)
    assert r["kl"] == pytest.approx(float((clean.exp() * (clean - new)).sum()), rel=1e-4)
    assert r["new"].argmax() != r["clean"].argmax()                  # big enough to change the top token

def test_effect_of_inactive_feature():
    "Ablating a feature that never fires on the prompt changes nothing: say so, list no +0 rises and falls"
    from headscope.views.sae import effect_html
    lp = torch.randn(len(VOCAB), generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    r = dict(f=3, mode="ablate", coeff=0., clean=lp, new=lp.clone(), kl=0., acts=torch.zeros(3), tokens=[" The", " cat", "."])
    h = effect_html(r, Tok())
    assert "feature inactive on this prompt" in h and "+0" not in h and "hs-rise" not in h and "hs-fall" not in h
    assert "␣The" in h.split("hs-before")[1]                       # the clean list still shows, spaces visible
    r2 = dict(r, acts=torch.tensor([0., 1.5, 0.]), new=lp + torch.linspace(-1, 1, len(VOCAB)), kl=0.3)
    assert "hs-rise" in effect_html(r2, Tok()) and "inactive" not in effect_html(r2, Tok())

def test_browser(toy):
    "Picker and slider stay in step; Ablate draws the effect of the picked feature; a new feature clears it"
    from headscope.sae.features import top_activations
    from headscope.data.corpora import python_docs_corpus
    m, sae = toy
    fa = top_activations(m, sae, python_docs_corpus()[:30], k=3, seq_len=16, max_windows=6, features=[1, 4, 6], progress=False)
    fb = FeatureBrowser(m, sae, fa, prompt="Hello there")
    fb.slider.value = 2
    assert fb.feature.value == 6 and "data-feature='6'" in fb.card.value and fb.effect.value == ""
    fb.ablate.click()
    assert fb.result["f"] == 6 and fb.result["mode"] == "ablate" and "data-mode='ablate'" in fb.effect.value
    torch.testing.assert_close(fb.result["new"], reference(m, sae, 6, "Hello there", "ablate", 0)[1], rtol=1e-5, atol=1e-5)
    fb.feature.value = 4
    assert fb.slider.value == 1 and fb.result is None and "data-feature='4'" in fb.card.value
    with pytest.raises(KeyError, match="not tracked"): FeatureBrowser(m, sae, fa, f=0)
    assert fb.slider.description == "Browse"                        # no unlabelled "#" slider

# --- the live kernel ---------------------------------------------------------------------------------------------

NOTEBOOK = r'''
import torch
from headscope.models import tiny_model
from headscope.sae.core import make_sae
from headscope.sae.features import top_activations
from headscope.widgets.sae import FeatureBrowser
m = tiny_model("llama", n_layers=2, seed=0)
sae = make_sae("standard", 64, 32, seed=0, hook_name="blocks.1.hook_resid_post")
with torch.no_grad(): sae.W_dec.mul_(10); sae.W_enc.mul_(500)
toks = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0))
fa = top_activations(m, sae, toks, k=3, features=[1, 4, 6], progress=False)
display(FeatureBrowser(m, sae, fa, prompt="Hello there", f=1))
'''

@pytest.mark.slow
def test_browser_in_voila(offline, allowed, refused, tmp_path, toy):
    "Live kernel: picking a feature redraws its card, clicking Ablate draws that feature's effect, computed in Python (~25-35 s)"
    if not os.environ.get("CI"): pytest.importorskip("voila")
    m, sae = toy
    clean, new, _ = reference(m, sae, 6, "Hello there", "ablate", 0)
    with voila_page(NOTEBOOK, tmp_path, offline, allowed, refused) as page:
        page.locator(".widget-html .hs-feature[data-feature='1']").wait_for(timeout=120_000)
        assert page.locator(".widget-html .hs-effect").count() == 0
        page.locator(".widget-dropdown", has_text="Feature").locator("select").select_option(label="6")
        page.locator(".widget-html .hs-feature[data-feature='6']").wait_for(timeout=30_000)
        page.get_by_role("button", name="Ablate").click()
        eff = page.locator(".widget-html .hs-effect[data-mode='ablate']")
        eff.wait_for(timeout=30_000)
        assert int(eff.get_attribute("data-top")) == int(new.argmax()) != int(clean.argmax())   # the output changed, as the hook says
        assert float(eff.get_attribute("data-kl")) == pytest.approx(float((clean.exp() * (clean - new)).sum()), rel=1e-3)
        assert "Feature 6 on the prompt" in eff.inner_text()
        assert page.locator(".widget-html script").count() == 0
