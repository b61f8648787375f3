"""Activation patching on every tiny architecture, against independent references.

- the batched and the prefix-KV paths equal the naive loop (one plain hooked forward per patch);
- patching clean into clean changes nothing; restoring the whole last residual stream gives the clean run;
- the clean baseline equals a plain HF forward of the clean prompt (no hooks of ours attached);
- bad input says what was wrong, and no hook is left behind;
- grids over some layers name the real layers and heads (top, to_pandas, heatmap rows), for activation,
  attribution and path patching alike."""
import re
import pytest, torch
from headscope.models import tiny_model, TINY_ARCHS
from headscope.causal.metrics import logit_diff
from headscope.causal.patching import activation_patching
from headscope.causal.reference import naive_patching
from headscope.causal.attribution import attribution_patching
from headscope.causal.paths import path_patching
from headscope.data.pairs import ioi_pairs, fact_pairs, FACTS
from headscope.results import Top
from _checks import assert_no_hooks

def _pair(seed=0, n_pos=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 200, (2, n_pos), generator=g), torch.randint(3, 200, (2, n_pos), generator=g)

metric = lambda lg: logit_diff(lg, 5, 6)

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_fast_paths_equal_naive_loop(arch):
    m = tiny_model(arch, n_layers=2, seed=1)
    clean, corrupt = _pair()
    for kind, pos in [("z", -1), ("v", -1), ("resid_pre", "each")]:
        ref = naive_patching(m, clean, corrupt, metric, kind, pos)
        for bs, reuse in [(3, False), (64, True)]:
            got = activation_patching(m, clean, corrupt, metric, kind, pos, batch_size=bs, reuse_prefix=reuse, progress=False)
            torch.testing.assert_close(got.raw, ref, atol=1e-4, rtol=0)

@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2", "gpt_neox"])
def test_sanity_and_baselines(arch):
    m = tiny_model(arch, n_layers=2, seed=2)
    clean, corrupt = _pair(1)
    same = activation_patching(m, clean, clean, metric, "z", -1, progress=False)
    torch.testing.assert_close(same.raw, torch.full_like(same.raw, same.clean), atol=1e-4, rtol=0)
    full = activation_patching(m, clean, corrupt, metric, "resid_post", None, layers=[1], progress=False)
    torch.testing.assert_close(full.scores, torch.ones(1), atol=1e-4, rtol=0)
    with torch.no_grad():                                     # baselines from plain HF forwards
        ref_c = metric(m(input_ids=clean).logits[:, -1]).mean()
        ref_k = metric(m(input_ids=corrupt).logits[:, -1]).mean()
    assert abs(full.clean - float(ref_c)) < 1e-4 and abs(full.corrupt - float(ref_k)) < 1e-4

def test_errors_and_no_leftover_hooks():
    m = tiny_model("llama", n_layers=2)
    clean, corrupt = _pair()
    with pytest.raises(ValueError, match=r"clean is \[2, 6\], corrupted is \[2, 4\]"):
        activation_patching(m, clean, corrupt[:, :4], metric, progress=False)
    with pytest.raises(ValueError, match="choose one of"):
        activation_patching(m, clean, corrupt, metric, kind="mlp", progress=False)
    def bad(lg): raise RuntimeError("metric failed")
    with pytest.raises(RuntimeError, match="metric failed"):
        activation_patching(m, clean, corrupt, bad, progress=False)
    assert_no_hooks(m)
    with torch.no_grad(): a = m(input_ids=clean).logits
    activation_patching(m, clean, corrupt, metric, progress=False)
    with torch.no_grad(): assert torch.equal(m(input_ids=clean).logits, a)

@pytest.mark.slow
def test_smollm2_datasets_and_prefix(smollm2):
    pairs = ioi_pairs(smollm2.tokenizer, n=4)
    tok = smollm2.tokenizer
    lens = {len(tok.encode(p, add_special_tokens=False)) for p in pairs.clean + pairs.corrupt}
    assert len(lens) == 1                                        # one token length: patchable
    assert all(len(tok.encode(tok.decode(int(i)), add_special_tokens=False)) == 1 for i in torch.cat([pairs.correct, pairs.wrong]))
    ev = pairs.evaluate(smollm2)
    assert ev["clean"]["top1"] >= 0.75 and ev["clean"]["logit_diff"] > ev["corrupt"]["logit_diff"] + 2
    fp = fact_pairs(tok, model=smollm2)
    assert fp.evaluate(smollm2)["clean"]["top1"] == 1.0          # only facts the model gets right are kept
    metric = pairs.logit_diff()
    layers = [22, 23]
    ref = naive_patching(smollm2, pairs.clean, pairs.corrupt, metric, "z", -1, layers=layers)
    got = activation_patching(smollm2, pairs.clean, pairs.corrupt, metric, "z", -1, layers=layers, progress=False)
    torch.testing.assert_close(got.raw, ref, atol=1e-4, rtol=0)

def _rows(page): return re.findall(r"<text class='hs-row'[^>]*>([^<]*)</text>", page)

@pytest.fixture(scope="module")
def deep():
    "6 layers, 4 heads: grids over layers 2-5 must name layer 5 'L5', not 'L3'"
    m = tiny_model("llama", n_layers=6, n_heads=4, seed=3, initializer_range=0.2)
    clean, corrupt = _pair(4, n_pos=7)
    return m, clean, corrupt

def _check_names(res, a, b):
    "`top()`, `to_pandas()` and the heatmap rows all use the real layers a..b-1"
    H = res.scores.shape[1]
    top = res.top(res.scores[..., :].numel())
    assert all(isinstance(t, Top) for t in top)
    for t in top:
        l, h = t.index[:2]
        assert a <= l < b and t.name.startswith(f"L{l}H{h}")
        row = res.scores[l - a, h] if res.scores.ndim == 2 else res.scores[l - a, h, t.index[2]]
        assert t.score == pytest.approx(float(row))
    df = res.to_pandas()
    assert sorted(df["layer"].unique().tolist()) == list(range(a, b))
    r = df[(df["layer"] == a + 3) & (df["head"] == H - 1)]
    assert r["name"].iloc[0].startswith(f"L{a + 3}H{H - 1}")
    assert r["score"].iloc[0] == pytest.approx(float(res.scores[3, H - 1].flatten()[0]))
    assert _rows(res._repr_html_()) == [f"L{l}" for l in range(a, b)]

def test_grids_name_real_layers(deep):
    "The acceptance test of the re-cut: layers=range(2, 6) names layer 5's head h 'L5H{h}' everywhere"
    m, clean, corrupt = deep
    a, b = 2, 6
    _check_names(activation_patching(m, clean, corrupt, metric, "z", -1, layers=range(a, b), progress=False), a, b)
    _check_names(attribution_patching(m, clean, corrupt, metric, "z", -1, layers=range(a, b), progress=False), a, b)
    pp = path_patching(m, clean, corrupt, metric, "each", "logits", layers=range(a, b), progress=False)
    _check_names(pp, a, b)
    full = path_patching(m, clean, corrupt, metric, "each", "logits", progress=False)
    torch.testing.assert_close(pp.raw, full.raw[a:b], atol=1e-5, rtol=0)      # the same paths, on the rows asked for
    kv = activation_patching(m, clean, corrupt, metric, "k", -1, layers=[5], progress=False)
    assert kv.axes == ["layer", "kv_head"] and kv.top(1)[0].name.startswith("L5KV")

def test_pos_each_names_real_positions(deep):
    m, clean, corrupt = deep
    res = activation_patching(m, clean, corrupt, metric, "resid_pre", "each", layers=[4, 5], progress=False)
    best = res.top(1)[0]
    l, p = best.index
    assert l in (4, 5) and best.name.startswith(f"L{l} pos {p}") and best.score == pytest.approx(float(res.scores[l - 4, p]))
    assert res.index["pos"] == list(range(7)) and _rows(res._repr_html_()) == ["L4", "L5"]
    z = activation_patching(m, clean, corrupt, metric, "z", "each", layers=[5], progress=False)
    t = z.top(1)[0]
    assert t.name.startswith(f"L5H{t.index[1]} pos {t.index[2]}") and t.score == pytest.approx(float(z.scores[0, t.index[1], t.index[2]]))

def test_sender_groups_use_cell_labels(deep):
    m, clean, corrupt = deep
    grp = path_patching(m, clean, corrupt, metric, [[(0, 1), (1, 2)], "MLP3", (4, 0)], "logits", progress=False)
    assert sorted(t.name for t in grp.top(3)) == ["L0H1+L1H2", "L4H0", "MLP3"]
    assert grp.to_pandas()["name"].tolist() == ["L0H1+L1H2", "MLP3", "L4H0"]
    assert [t.name for t in grp.top(3, "neg")] == [t.name for t in grp.top(3, largest=False, absolute=False)]
