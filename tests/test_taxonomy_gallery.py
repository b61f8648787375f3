"""Pattern gallery, taxonomy scatter and caveat banners against independent references: an eager HF forward's
`output_attentions` recomputed in float64 with plain loops, PCA against an eigen-decomposition of the
covariance, the SVG parsed as HTML."""
import html, re
from html.parser import HTMLParser
import pytest
import torch

from headscope.models import tiny_model
from headscope.heads.gallery import pattern_gallery, downsample_pattern, distance_profile, distance_bins, pca, PatternGallery
from headscope.views.gallery import pattern_gallery_html
from headscope.views.taxonomy import taxonomy_scatter_html, head_scatter_html
from headscope.views.style import caveat_html, CAVEATS
from headscope.views.attention import attention_explorer_html, attention_heads_html

@pytest.fixture(scope="module")
def eager():
    "A tiny random Llama (GQA: 4 heads, 2 KV heads), eager attention, and 3 x 21 random tokens"
    torch.manual_seed(0)
    m = tiny_model("llama", n_layers=2, n_heads=4, n_kv_heads=2, attn_implementation="eager", seed=0)
    ids = torch.randint(0, 100, (3, 21), generator=torch.Generator().manual_seed(1))
    return m, ids

def _ref_thumbs(A, size):
    "Float64 loops: T[a, b] = mean over queries q in block a of the sum over keys k in block b of A[q, k]"
    n = A.shape[-1]
    blk = [i * size // n for i in range(n)]
    T = torch.zeros(*A.shape[:-2], size, size, dtype=torch.float64)
    cnt = torch.zeros(size, dtype=torch.float64)
    for q in range(n):
        cnt[blk[q]] += 1
        for k in range(q + 1):
            T[..., blk[q], blk[k]] += A[..., q, k].double()
    return T / cnt[:, None]

def _ref_profile(A, nobos=False):
    "Float64 loops: for each query, the mass at each binned distance; mean over queries q >= 1 (q >= 2 without key 0)"
    n = A.shape[-1]
    bins = distance_bins(n)
    out = torch.zeros(*A.shape[:-2], len(bins), dtype=torch.float64)
    qs = range(2 if nobos else 1, n)
    for q in qs:
        row = A[..., q, :q + 1].double().clone()
        if nobos: row[..., 0] = 0; row = row / row.sum(-1, keepdim=True)
        for j, (lo, hi) in enumerate(bins):
            for k in range(q + 1):
                if lo <= q - k <= hi: out[..., j] += row[..., k]
    return out / len(qs)

def test_gallery_matches_eager_patterns(eager):
    "Thumbnails and profiles from the hooked run equal a float64 recomputation from HF's own eager attentions"
    m, ids = eager
    with torch.no_grad(): att = m(ids, output_attentions=True).attentions           # plain HF: [batch head q k] per layer
    hooked = lambda: [(n, dict(mod._forward_hooks), dict(mod._forward_pre_hooks)) for n, mod in m.named_modules()]
    before = hooked()                                                                # (HF's output recorders are there now)
    g = pattern_gallery(m, ids, size=5, batch_size=2, progress=False)               # 21 tokens in blocks of 4-5; two batches
    ref_t = torch.stack([_ref_thumbs(a, 5).mean(0) for a in att])
    ref_p = torch.stack([_ref_profile(a).mean(0) for a in att])
    ref_n = torch.stack([_ref_profile(a, nobos=True).mean(0) for a in att])
    torch.testing.assert_close(g.thumbs.double(), ref_t, atol=1e-5, rtol=0)
    torch.testing.assert_close(g.profile.double(), ref_p, atol=1e-5, rtol=0)
    torch.testing.assert_close(g.profile_nobos.double(), ref_n, atol=1e-5, rtol=0)
    assert g.bins == [(0, 0), (1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, 20)] and (g.n_seq, g.n_tokens) == (3, 21)
    assert hooked() == before and m.config._attn_implementation == "eager"           # every hook removed, attention restored
    # the embedding is the PCA of exactly these thumbnails
    c, sh, _ = pca(ref_t.reshape(8, -1), 2)
    torch.testing.assert_close(g.coords.reshape(8, 2).double(), c, atol=1e-4, rtol=0)
    torch.testing.assert_close(g.explained.double(), sh, atol=1e-5, rtol=0)

def test_gallery_bad_input_before_forward(eager):
    m, ids = eager
    calls = []
    h = m.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for bad, msg in ((dict(ids=ids, size=22), "size must be an integer in 1..21"), (dict(ids=ids[:, :2]), "at least 3 positions"),
                         (dict(ids=[[1, 2, 3]]), "ids must be"), (dict(ids=ids, size=True), "size must be")):
            with pytest.raises((ValueError, TypeError), match=re.escape(msg)): pattern_gallery(m, progress=False, **bad)
    finally: h.remove()
    assert calls == []

def test_downsample_irregular_blocks():
    "Block sizes differ by at most one; rows stay distributions; a size equal to n is the pattern itself"
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 11, 11, generator=g).masked_fill(torch.ones(11, 11, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    for s in (1, 3, 4, 7, 11):
        torch.testing.assert_close(downsample_pattern(x, s), _ref_thumbs(x, s))
        torch.testing.assert_close(downsample_pattern(x, s).sum(-1), torch.ones(2, 3, s, dtype=torch.float64))
    torch.testing.assert_close(downsample_pattern(x, 11), x.double())
    torch.testing.assert_close(distance_profile(x), _ref_profile(x))

def test_pca_against_covariance_eigh():
    "Shares and coordinates equal an eigen-decomposition of the covariance (up to each axis' sign); a line has one component"
    g = torch.Generator().manual_seed(3)
    X = torch.randn(40, 6, generator=g, dtype=torch.float64) * torch.tensor([5., 3., 2., 1., .5, .1], dtype=torch.float64)
    c, sh, V = pca(X, 3)
    Xc = X - X.mean(0)
    ev, vec = torch.linalg.eigh(Xc.T @ Xc)
    ev, vec = ev.flip(0), vec.flip(1)
    torch.testing.assert_close(sh, ev / ev.sum())
    for i in range(3):
        ref = Xc @ vec[:, i]
        s = torch.sign((c[:, i] * ref).sum())
        torch.testing.assert_close(c[:, i], s * ref)
        assert V[i, V[i].abs().argmax()] > 0                                           # the sign convention
    t = torch.linspace(0, 1, 10, dtype=torch.float64)[:, None]
    _, sh1, _ = pca(t * torch.tensor([[1., 2., -2.]], dtype=torch.float64) + 3, 2)   # points on a line
    torch.testing.assert_close(sh1, torch.tensor([1., 0., 0.], dtype=torch.float64), atol=1e-12, rtol=0)

class _Svg(HTMLParser):
    "Collects every <circle class='hs-dot'> and the text of its <title>"
    def __init__(self): super().__init__(); self.dots, self.cur = [], None
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "circle" and a.get("class") == "hs-dot": self.cur = [a, ""]; self.dots.append(self.cur)
    def handle_data(self, d):
        if self.cur is not None: self.cur[1] += d
    def handle_endtag(self, tag):
        if tag == "circle": self.cur = None

def test_scatter_one_dot_per_head_escaped():
    g = torch.Generator().manual_seed(4)
    bad = "<img src=x onerror=alert(1)>"
    S = {bad: torch.rand(4, 6, generator=g), "induction": torch.rand(4, 6, generator=g)}
    S["induction"][3, 5] = float("nan")
    roles = {"r&d": (bad, ">=", 0.5), "induction": ("induction", ">=", 0.9)}
    page = taxonomy_scatter_html(S, bad, "induction", roles, n_kv_heads=3)
    assert bad not in page and html.escape(bad) in page
    p = _Svg(); p.feed(page)
    assert len(p.dots) == 23                                                            # 24 heads, one NaN
    assert {(int(a["data-l"]), int(a["data-h"])) for a, _ in p.dots} == {(l, h) for l in range(4) for h in range(6)} - {(3, 5)}
    for a, tip in p.dots:                                                               # the tooltip's numbers and roles are the head's own
        l, h = int(a["data-l"]), int(a["data-h"])
        x, y = S[bad][l, h].item(), S["induction"][l, h].item()
        assert tip.startswith(f"L{l}H{h} · kv{h // 2}: {bad}={x:.3g}, induction={y:.3g}"), tip
        want = [r for r, (sc, _, v) in roles.items() if S[sc][l, h].item() >= v]
        assert tip.endswith("; " + ", ".join(want)) if want else ";" not in tip, tip
    assert page.count("class='hs-threshold'") == 2 and "r&amp;d &gt;= 0.5" in page
    # positions: higher x, further right; higher y, further up
    cx = {(int(a["data-l"]), int(a["data-h"])): (float(a["cx"]), float(a["cy"])) for a, _ in p.dots}
    order = sorted(cx, key=lambda lh: S[bad][lh].item())
    assert [cx[k][0] for k in order] == sorted(cx[k][0] for k in order)
    order = sorted(cx, key=lambda lh: S["induction"][lh].item())
    assert [cx[k][1] for k in order] == sorted((cx[k][1] for k in order), reverse=True)

def test_banners_present_and_absent(eager):
    toks = ["<bos>", "a", "b"]
    pats = torch.tril(torch.ones(2, 4, 3, 3)); pats = pats / pats.sum(-1, keepdim=True)
    kinds = lambda h: re.findall(r"class='hs-caveat' data-kind='(\w+)'", h)
    assert kinds(caveat_html("attention")) == ["attention"] and kinds(caveat_html("probe")) == ["probe"]
    for k, (head, text) in CAVEATS.items(): assert html.escape(head) in caveat_html(k) and html.escape(text) in caveat_html(k)
    assert kinds(attention_explorer_html(toks, pats)) == ["attention"] and kinds(attention_explorer_html(toks, pats, caveat=False)) == []
    assert kinds(attention_heads_html(toks, pats[0], ["L0H0", "L0H1", "L0H2", "L0H3"])) == ["attention"]
    assert kinds(attention_heads_html(toks, pats[0], ["L0H0", "L0H1", "L0H2", "L0H3"], caveat=False)) == []
    x = torch.rand(2, 4)
    assert kinds(taxonomy_scatter_html({"a": x, "b": x}, "a", "b")) == ["attention"]
    assert kinds(taxonomy_scatter_html({"a": x, "b": x}, "a", "b", caveat=False)) == []
    m, ids = eager
    g = pattern_gallery(m, ids[:1], size=4, progress=False)
    assert kinds(g._repr_html_()) == ["attention"] and kinds(pattern_gallery_html(g, caveat=False)) == []
    from headscope.probes.probing import train_probes
    y = torch.arange(40) % 2
    r = train_probes(torch.randn(2, 40, 4, generator=torch.Generator().manual_seed(5)) + y[None, :, None], y, folds=0)
    assert kinds(r._repr_html_()) == ["probe"]
    from headscope.views.probes import probe_result_html
    assert kinds(probe_result_html(r, caveat=False)) == []
