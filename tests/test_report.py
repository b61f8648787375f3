"""`headscope report` end to end, as a user runs it: a subprocess, a model folder, an HTML file.

The fast tests save a tiny random model with `save_pretrained` (no downloads); the slow one uses the
embedded SmolLM2-135M-Instruct with every default."""
import os, re, shutil, subprocess, sys
from pathlib import Path
import pytest

def cli(*args, cwd, timeout=600):
    """Run `python -m headscope.cli ARGS` in `cwd`; returns the CompletedProcess.
    Never from the repository root: `python -m` puts the working directory on `sys.path`, and the repo's
    top-level `kernels/` folder would then shadow Hugging Face's `kernels` package."""
    return subprocess.run([sys.executable, "-m", "headscope.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    "A tiny random Llama (3 layers) saved as an ordinary Hugging Face folder, with its tokenizer"
    from headscope.models import tiny_model
    d = tmp_path_factory.mktemp("tiny-llama")
    m = tiny_model("llama", n_layers=3, seed=0)
    m.save_pretrained(d); m.tokenizer.save_pretrained(d)
    return d

PROMPT = "Mary & John <script>alert(1)</script> gave"

def no_cdn(page:str)->bool:
    "No script is loaded from anywhere, and no CDN host is named"
    return not re.search(r"<script[^>]*\bsrc\s*=", page) and not re.search(r"unpkg\.com|jsdelivr|cdnjs", page)

def test_report_tiny_model(tiny_dir, tmp_path):
    out = tmp_path/"r.html"
    r = cli("report", "--model", tiny_dir, "--prompt", PROMPT, "--out", out, "--heads", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert out.exists()
    assert f"Wrote {out.resolve()}" in r.stdout and "Top prediction: " in r.stdout
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "Mary &amp; John &lt;script&gt;alert(1)&lt;/script&gt; gave" in page       # the prompt, escaped
    assert "<script>alert(1)</script>" not in page
    assert no_cdn(page)
    assert "class='hs-lens'" in page and len(re.findall(r">L\d+</th>", page)) == 3 and ">final</th>" in page   # logit-lens table
    assert page.count('<div id="circuits-vis-') == 1 and "CircuitsVis.render(" in page                     # attention view, inlined
    assert "hs-attention-static" in page and "<svg" in page                                                # and its static fallback
    attn = page.split("<h2>Attention patterns</h2>", 1)[1].split("<section>", 1)[0]
    assert len(re.findall(r"\bL2H\d \(\d\.\d\d\)", attn)) == 3                                             # three heads, named
    assert "<h2>Head census</h2>" in page                                                                   # the census by default

def test_report_bfloat16(tiny_dir, tmp_path):
    r = cli("report", "--model", tiny_dir, "--prompt", "hello", "--out", tmp_path/"b.html", "--dtype", "bfloat16", "--heads", "0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "bfloat16" in (tmp_path/"b.html").read_text(encoding="utf-8")

@pytest.mark.parametrize("args, says", [
    (["--model", "{tmp}/no-such-model"], "no such path"),
    (["--model", "{tiny}", "--prompt", "   "], "the prompt is empty"),
    (["--model", "{tiny}", "--heads", "-2"], "--heads must be 0 or more"),
])
def test_report_errors(tiny_dir, tmp_path, args, says):
    args = [a.format(tmp=tmp_path, tiny=tiny_dir) for a in args]
    r = cli("report", *args, "--out", tmp_path/"x.html", cwd=tmp_path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("headscope report: error: ") and says in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path/"x.html").exists()

@pytest.mark.slow
def test_report_smollm2_defaults(tmp_path):
    "Every default (embedded SmolLM2, the IOI prompt, reports/report.html under the working directory): ' Mary' comes first"
    r = cli("report", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path/"reports"/"report.html"
    assert f"Wrote {out.resolve()}" in r.stdout and "Top prediction: ' Mary'" in r.stdout
    page = out.read_text(encoding="utf-8")
    first = re.search(r"<td[^>]*>1</td><td[^>]*><code[^>]*>(.*?)</code>", page).group(1)   # rank 1 of the predictions table
    assert first == "␣Mary"
    assert "When Mary and John went to the store, John gave a drink to" in page and no_cdn(page)
    assert "layers 20–29" in page
    assert "<h2>Head census</h2>" in page and "<h3>induction</h3>" in page and "<h3>retrieval</h3>" in page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

def dom_after_scripts(page:Path)->str:
    "The DOM of `page` after its scripts ran, from headless Chromium"
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=10000",
                        "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout

@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)")
def test_views_draw_in_chromium(tmp_path):
    "Two views in one page both draw and hide their static copies; with scripts blocked the static copies stay"
    import torch
    from headscope.views.attention import attention_heads_html
    toks = ["<bos>", "When", " Mary", " </script><b>x"]
    sink = torch.zeros(4, 4); sink[:, 0] = 1
    body = attention_heads_html(toks, torch.stack([sink, torch.eye(4)]), ["L0H0", "L0H1"]) + attention_heads_html(toks, sink[None], ["L1H2"])
    for csp, drawn in (("", True), ("<meta http-equiv='Content-Security-Policy' content=\"script-src 'none'\">", False)):
        page = tmp_path/f"two-{drawn}.html"
        page.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'>{csp}</head><body>{body}</body></html>", encoding="utf-8")
        dom = dom_after_scripts(page)
        vis = re.findall(r'<div id="circuits-vis-[^"]+"[^>]*>(<div)?', dom)
        fb = re.findall(r'<div id="hs-fallback-[^"]+"[^>]*>', dom)
        assert len(vis) == 2 and len(fb) == 2
        assert all(bool(v) == drawn for v in vis)                       # circuitsvis drew into each div (or could not)
        assert all(("display: none" in f) == drawn for f in fb)         # the static copy hides only once the view drew
        assert "<b>x" not in dom.replace("&lt;/script&gt;&lt;b&gt;x", "")
