"""The steering playground: its generations checked against cached greedy decoding with a plain PyTorch hook, its
static page in headless Chromium (Playwright), and `SteeringPlayground`'s coefficient slider in Voila.

The page fixtures come from test_views_heads: each page test fails if the page asks for anything but file:,
data:, blob: or about: URLs, if a script throws, or if a dialog opens (the hostile prompt below would open one if
it ever ran as markup)."""
import os
import pytest
import torch
from transformers import DynamicCache

from test_views_heads import allowed, refused, offline, write, voila_page       # fixtures and helpers, shared
from headscope.models import tiny_model
from headscope.hooking import hooks
from headscope.tokens import to_inputs, token_strs
from headscope.probes.steering import SteeringVector, steer_generate
from headscope.views.steering import steered_generation_html
from headscope.tokens import token_strs as _tok_strs
from headscope.widgets.steering import SteeringPlayground

XSS = "<script>alert(1)</script>"
PROMPT = ["<bos>", "I", " think", " this", " film", " is", XSS]
UNSTEERED = [" a", " bit", " dull", "."]
STEERED = [" a", " delight", "!", " <img src=x onerror=alert(2)>"]
ACTED = [False] * len(PROMPT) + [True] * len(STEERED)

SPANS = """col => [...document.querySelectorAll('.hs-steering ' + col + ' span.hs-tok')].map(s =>
    [s.textContent, s.className, getComputedStyle(s).backgroundColor, getComputedStyle(s).color])"""

def test_page(offline, tmp_path):
    "Two columns draw; the acted tokens are highlighted, the differing ones marked; the hostile prompt and tokens stay text"
    page = offline
    page.goto(write(tmp_path, steered_generation_html(PROMPT, UNSTEERED, STEERED, ACTED, title="<b>toy</b>", info="L3 · coeff 4")))
    u, s = page.evaluate(SPANS, ".hs-unsteered"), page.evaluate(SPANS, ".hs-steered")
    assert [t for t, *_ in u] == PROMPT + UNSTEERED and [t for t, *_ in s] == PROMPT + STEERED     # every token, as text
    acted = [i for i, (_, c, bg, _) in enumerate(s) if "hs-acted" in c]
    assert acted == list(range(len(PROMPT), len(PROMPT) + len(STEERED)))
    assert {bg for i, (_, c, bg, _) in enumerate(s) if i in acted} == {"rgb(253, 230, 138)"}          # amber, drawn
    assert {bg for _, c, bg, _ in s + u if "hs-acted" not in c} == {"rgba(0, 0, 0, 0)"}               # nothing else
    assert [c for _, c, *_ in u if "hs-acted" in c] == []                                            # the unsteered run: none
    assert [i for i, (_, c, *_) in enumerate(s) if "hs-diff" in c] == [8, 9, 10]                     # " delight", "!", the <img> token
    assert [i for i, (_, c, *_) in enumerate(u) if "hs-diff" in c] == [8, 9, 10]
    assert {col for _, c, _, col in s if "hs-prompt" in c} == {"rgb(107, 114, 128)"}                   # prompt grey
    assert {col for _, c, _, col in s if "hs-gen" in c} == {"rgb(17, 17, 17)"}                         # generated near-black
    deco = page.evaluate("getComputedStyle(document.querySelector('.hs-steered .hs-diff')).textDecorationLine")
    assert deco == "underline"
    assert page.locator(".hs-steering").get_attribute("data-differ") == "3"
    assert "steering vector added" in page.inner_text(".hs-legend") and "3 of 4 generated tokens differ" in page.inner_text(".hs-legend")
    assert page.locator(".hs-steered span.hs-tok").nth(6).get_attribute("title") == f"pos 6 ‘{XSS}’ · prompt"
    assert page.evaluate("document.querySelectorAll('img, b').length") == 0                          # no markup from text
    assert page.evaluate("document.scripts.length") == 0                                             # none at all: a static page
    assert "<b>toy</b>" in page.inner_text(".hs-steering")
    style = page.evaluate("() => { const c = getComputedStyle(document.querySelector('.hs-steering')); return [c.backgroundColor, c.color]; }")
    assert style == ["rgb(255, 255, 255)", "rgb(17, 17, 17)"]                                        # readable on the dark page
    a, b = (page.locator(q).bounding_box() for q in (".hs-unsteered", ".hs-steered"))
    assert abs(a["y"] - b["y"]) < 1 and a["x"] + a["width"] <= b["x"]                                 # side by side

# --- generation against an independent reference -------------------------------------------------------------

@pytest.fixture(scope="module")
def toy():
    "A tiny random Llama and a two-layer SteeringVector of random directions, big enough to change greedy text"
    m = tiny_model("llama", n_layers=3, seed=0)
    g = torch.Generator().manual_seed(1)
    return m, SteeringVector({1: torch.randn(64, generator=g) * 4, 2: torch.randn(64, generator=g) * 4}, label="random")

def picks(pos, n0, start, L):
    "The positions `start..L-1` of a forward over sequence length L that the cached rule picks (n0: prompt length)"
    ps = [pos] if isinstance(pos, int) else pos
    return [pos is None or (pos == "prompt" and i < n0) or (pos == "generated" and i >= n0)
            or (pos not in (None, "prompt", "generated") and any(i == (p if p >= 0 else L + p) for p in ps)) for i in range(start, L)]

def reference(model, prompt, v, layer, coeff, pos, n):
    "Greedy decoding by hand with the KV cache, with a plain forward hook on the HF block adding coeff*v where the cached rule says"
    ids = to_inputs(model, prompt)["input_ids"][0].tolist()
    n0, kv = len(ids), DynamicCache()
    def hook(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        L = kv.get_seq_length()                                   # this layer has written its keys: the sequence length so far
        assert L == len(ids)                                      # ... which the loop below also knows
        m = torch.tensor(picks(pos, n0, L - h.shape[1], L), dtype=h.dtype)[None, :, None]
        h = h + coeff * m * v
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
    hd = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            new = ids
            for _ in range(n):
                nxt = model(torch.tensor([new]), cache=kv, use_cache=True).logits[0, -1].argmax().item()
                ids.append(nxt)
                new = [nxt]
                if nxt == model.config.eos_token_id: break
    finally: hd.remove()
    return _tok_strs(model.tokenizer, torch.tensor(ids[n0:]))

def measured_acted(model, prompt, sv, layer, coeff, pos, n):
    """Where steering changed the residual stream during cached `generate()`: read just before and just after `steer`'s
    own hook, over every forward; positions counted by hand (each forward runs the tokens after the previous ones)"""
    from headscope.probes.steering import steer
    name, before, hit, seen = f"blocks.{layer}.{sv.hook}", {}, set(), []
    def rb(act, hook): before["a"] = act.clone()
    def ra(act, hook):
        start = sum(seen); seen.append(act.shape[1])
        hit.update((start + torch.nonzero((act - before["a"]).abs().amax(-1)[0] > 0)[:, 0]).tolist())
    x = to_inputs(model, prompt)
    with hooks(model, [(name, rb)]), steer(model, sv, coeff, layers=[layer], pos=pos), hooks(model, [(name, ra)]), torch.no_grad():
        out = model.generate(**x, max_new_tokens=n, do_sample=False)[0]
    n0 = x["input_ids"].shape[1]
    assert seen == [n0] + [1] * (len(out) - n0 - 1)                # cached: the prompt once, then one token a step; the last never
    return _tok_strs(model.tokenizer, out[n0:]), [i in hit for i in range(len(out))]

@pytest.mark.parametrize("pos", [None, "prompt", "generated", 2, -1, -2, 14, [0, 14, -3]])
def test_steer_generate(toy, pos):
    "Both runs match cached greedy decoding by hand with a plain PyTorch hook; `acted` is where steering changed the residual stream"
    m, sv = toy
    r = steer_generate(m, "Hello there", sv, layer=1, coeff=3.0, pos=pos, max_new_tokens=8)
    assert r["prompt_tokens"] == token_strs(m.tokenizer, to_inputs(m, "Hello there")["input_ids"][0])      # all ASCII
    assert r["unsteered_tokens"] == reference(m, "Hello there", sv.vectors[1], 1, 0.0, pos, 8)
    assert r["steered_tokens"] == reference(m, "Hello there", sv.vectors[1], 1, 3.0, pos, 8)
    toks, acted = measured_acted(m, "Hello there", sv, 1, 3.0, pos, 8)
    assert toks == r["steered_tokens"] and r["acted"] == acted and any(acted)
    assert not acted[-1]                                                                       # the last token never ran
    if pos in (None, "generated", -1): assert r["steered_tokens"] != r["unsteered_tokens"]    # the vector does something here

def test_playground(toy):
    "The widget's controls: the layer slider spans the vector's layers, and moving coefficient or layer regenerates"
    m, sv = toy
    pg = SteeringPlayground(m, {"random": sv, "<i>other</i>": SteeringVector({0: sv.vectors[1]})}, prompt="Hello there", max_new_tokens=6, coeff=0.0, coeff_max=10.0)
    assert (pg.layer.min, pg.layer.max) == (1, 2) and pg.coeff.value == 0
    r0 = pg.result
    assert r0["steered_tokens"] == r0["unsteered_tokens"] and "data-differ='0'" in pg.view.value
    pg.coeff.value = 3.0
    r1 = steer_generate(m, "Hello there", sv, layer=pg.layer.value, coeff=3.0, pos=None, max_new_tokens=6)
    assert pg.result["steered_tokens"] == r1["steered_tokens"] != r0["steered_tokens"]
    assert pg.view.value == pg.to_html() and pg._repr_mimebundle_()["text/html"] == pg.to_html()
    pg.vector.value = "<i>other</i>"
    assert (pg.layer.min, pg.layer.max, pg.layer.value) == (0, 0, 0)
    assert pg.result["layer"] == 0 and "&lt;i&gt;other&lt;/i&gt;" in pg.view.value

def test_playground_defaults_scale_with_the_residual_stream(toy):
    """Left to itself, the playground opens at a quarter of ‖resid‖/‖v‖ (the residual norm from a plain HF forward, first
    token left out), spans ±1 ratio, shows the ratio next to the slider, and hides the layer slider for a one-layer vector"""
    m, sv = toy
    with torch.no_grad(): hs = m(**to_inputs(m, "Hello there"), output_hidden_states=True).hidden_states
    ratio = float(hs[2][0, 1:].norm(dim=-1).mean() / sv.vectors[1].norm())        # layer 1's output is hidden_states[2]
    pg = SteeringPlayground(m, {"random": sv, "one layer": SteeringVector({1: sv.vectors[1] * 10})}, prompt="Hello there",
                            max_new_tokens=6, layer=1)
    assert abs(pg.ratio - ratio) < 1e-4 * ratio and 0.1 < pg.coeff.value / ratio < 1     # of the order of the ratio: a quarter
    assert pg.coeff.max == -pg.coeff.min == pytest.approx(ratio, rel=1e-4)
    assert f"‖resid‖/‖v‖ = {pg.ratio:.3g} at L1" in pg.ratio_note.value
    assert pg.layer.layout.display is None and pg.result["steered_tokens"] != pg.result["unsteered_tokens"]   # two layers; it steers
    pg.vector.value = "one layer"
    assert pg.layer.layout.display == "none"                                       # nothing to choose
    assert pg.ratio == pytest.approx(ratio / 10, rel=1e-4) and pg.coeff.value == pytest.approx(ratio / 40, rel=1e-4)
    assert f"‖resid‖/‖v‖ = {pg.ratio:.3g} at L1" in pg.ratio_note.value
    pg.coeff.value = 0.0                                                           # the ratio readout follows the coefficient
    assert "coeff = 0 × ratio" in pg.ratio_note.value and pg.result["steered_tokens"] == pg.result["unsteered_tokens"]

# --- the live kernel ---------------------------------------------------------------------------------------------

NOTEBOOK = r'''
import torch
from headscope.models import tiny_model
from headscope.probes.steering import SteeringVector
from headscope.widgets.steering import SteeringPlayground
m = tiny_model("llama", n_layers=3, seed=0)
g = torch.Generator().manual_seed(1)
sv = SteeringVector({1: torch.randn(64, generator=g) * 4, 2: torch.randn(64, generator=g) * 4}, label="random")
pg = SteeringPlayground(m, {"random": sv}, prompt="Hello there", max_new_tokens=8, coeff=0.0, coeff_max=10.0)
display(pg)
'''

@pytest.mark.slow
def test_playground_in_voila(offline, allowed, refused, tmp_path):
    "Live kernel: typing a coefficient into the FloatSlider regenerates the steered column through Python (~25-35 s)"
    if not os.environ.get("CI"): pytest.importorskip("voila")
    with voila_page(NOTEBOOK, tmp_path, offline, allowed, refused) as page:
        view = page.locator(".widget-html .hs-steering")
        view.wait_for(timeout=120_000)                                                  # the Python side drew both runs
        steered = lambda: view.locator(".hs-steered span.hs-gen").all_text_contents()
        unsteered = view.locator(".hs-unsteered span.hs-gen").all_text_contents()
        before = steered()
        assert before == unsteered and view.get_attribute("data-differ") == "0"       # coefficient 0: the same text
        assert view.locator(".hs-steered .hs-acted").count() == 0
        readout = page.locator(".widget-slider", has_text="Coefficient").locator(".widget-readout")
        readout.click(); page.keyboard.press("Control+A"); page.keyboard.type("3"); page.keyboard.press("Enter")
        page.wait_for_function("() => { const v = document.querySelector('.widget-html .hs-steering'); return v && v.dataset.differ !== '0'; }",
                               timeout=30_000)
        view = page.locator(".widget-html .hs-steering")
        assert steered() != before                                                      # ... regenerated through the kernel
        assert view.locator(".hs-unsteered span.hs-gen").all_text_contents() == unsteered
        assert view.locator(".hs-steered .hs-acted").count() == view.locator(".hs-steered span.hs-tok").count() - 1   # pos: all but the last token
        assert page.locator(".widget-html script").count() == 0
